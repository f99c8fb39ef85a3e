//! Tunnels from edge workers to cloud workers through the hub (`Hub.Tunnel`), so an edge node
//! needs nothing but its outbound connection to reach the cloud side of a joint-inference
//! service (Sedna needs EdgeMesh for this).
//!
//! Authorization is node-scoped: a node may open a tunnel only to the cloud worker of a
//! JointInferenceService whose edge worker pod (`<service>-edge`) is bound to that node. The
//! target is resolved by the hub: the cloud worker pod's address and its `BIG_MODEL_PORT`.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use sedna_proto::channel::TunnelFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Status;

/// The largest chunk relayed in one frame.
pub const FRAME_BYTES: usize = 64 * 1024;

/// Why a target is refused, or its address.
pub(crate) async fn resolve(
    client: &kube::Client,
    node: &str,
    target: &str,
) -> Result<std::net::SocketAddr, Status> {
    let (ns, service) = target
        .split_once('/')
        .filter(|(ns, s)| !ns.is_empty() && !s.is_empty() && !s.contains('/'))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "tunnel target {target:?} is not <namespace>/<service>"
            ))
        })?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let not_yours =
        || Status::permission_denied(format!("node {node} runs no edge worker of {target}"));
    let edge = pods
        .get_opt(&format!("{service}-edge"))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .ok_or_else(not_yours)?;
    if edge.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node) {
        return Err(not_yours());
    }
    let cloud = pods
        .get_opt(&format!("{service}-cloud"))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .ok_or_else(|| Status::unavailable(format!("{target} has no cloud worker")))?;
    let ip = cloud
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .ok_or_else(|| {
            Status::unavailable(format!("the cloud worker of {target} has no address yet"))
        })?;
    let port = cloud
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.env.as_ref())
        .and_then(|env| env.iter().find(|e| e.name == "BIG_MODEL_PORT"))
        .and_then(|e| e.value.as_deref())
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| {
            Status::unavailable(format!(
                "the cloud worker of {target} declares no BIG_MODEL_PORT"
            ))
        })?;
    format!("{ip}:{port}")
        .parse()
        .map_err(|_| Status::unavailable(format!("bad cloud worker address {ip}:{port}")))
}

/// Serves one tunnel: checks the first frame, connects, relays until either side closes.
pub(crate) async fn serve(
    client: kube::Client,
    node: String,
    mut inbound: tonic::Streaming<TunnelFrame>,
) -> Result<futures_util::stream::BoxStream<'static, Result<TunnelFrame, Status>>, Status> {
    let first = inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("empty tunnel"))?;
    let address = resolve(&client, &node, &first.target).await?;
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| Status::unavailable(format!("connecting to {address} timed out")))?
    .map_err(|e| Status::unavailable(format!("connecting to {address}: {e}")))?;
    let _ = stream.set_nodelay(true);
    tracing::debug!(%node, target = %first.target, %address, "tunnel open");
    let (read, mut write) = stream.into_split();
    if !first.data.is_empty() {
        write
            .write_all(&first.data)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
    }
    tokio::spawn(async move {
        while let Some(Ok(frame)) = inbound.next().await {
            if write.write_all(&frame.data).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
    });
    let ready = futures_util::stream::once(async { Ok(TunnelFrame::default()) });
    let relay = futures_util::stream::unfold(read, |mut read| async move {
        let mut buf = vec![0u8; FRAME_BYTES];
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((
                    Ok(TunnelFrame {
                        target: String::new(),
                        data: buf,
                    }),
                    read,
                ))
            }
        }
    });
    Ok(ready.chain(relay).boxed())
}
