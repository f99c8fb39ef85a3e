//! Tunnels from edge workers to cloud workers through the hub (`Hub.Tunnel`), so an edge node
//! needs nothing but its outbound connection to reach the cloud side of a workload (Sedna
//! needs EdgeMesh for this).
//!
//! Authorization is node-scoped: a node may open a tunnel only to a cloud endpoint that a
//! controller declared on a pod bound to that node (the JointInferenceService's cloud worker
//! for its edge worker, the FederatedLearningJob's aggregator for its training workers). The
//! hub resolves the endpoint itself: the declared pod's address and port.

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use sedna_api::common::CLOUD_ENDPOINTS_ANNOTATION;
use sedna_proto::channel::TunnelFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Status;

/// The largest chunk relayed in one frame.
pub const FRAME_BYTES: usize = 64 * 1024;

/// Checks a tunnel target and finds its address. The target is
/// `<namespace>/<pod>/<endpoint>`: `<pod>` must be bound to the asking node and declare
/// `<endpoint>` in its [`CLOUD_ENDPOINTS_ANNOTATION`] (which only controllers write); the
/// endpoint's pod must run on another node, and its address is that pod's IP. Nothing the
/// asking node can write chooses where the hub connects.
pub(crate) async fn resolve(
    client: &kube::Client,
    node: &str,
    target: &str,
) -> Result<std::net::SocketAddr, Status> {
    let (ns, pod, endpoint) = parse_target(target)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let not_yours = || Status::permission_denied(format!("node {node} runs no pod {ns}/{pod}"));
    let own = pods
        .get_opt(pod)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .ok_or_else(not_yours)?;
    if own.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(node) {
        return Err(not_yours());
    }
    let undeclared = || {
        Status::permission_denied(format!(
            "pod {ns}/{pod} declares no cloud endpoint {endpoint:?}"
        ))
    };
    let declared: std::collections::BTreeMap<String, String> = own
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CLOUD_ENDPOINTS_ANNOTATION))
        .and_then(|json| serde_json::from_str(json).ok())
        .ok_or_else(undeclared)?;
    let (target_pod, port) = declared
        .get(endpoint)
        .and_then(|v| v.rsplit_once(':'))
        .and_then(|(p, port)| Some((p.to_string(), port.parse::<u16>().ok()?)))
        .filter(|(p, port)| valid_name(p, 253) && *port > 0)
        .ok_or_else(undeclared)?;
    let cloud = pods
        .get_opt(&target_pod)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .ok_or_else(|| Status::unavailable(format!("{ns}/{target_pod} does not exist (yet)")))?;
    if cloud.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node) {
        // Its address would be one the asking node reports itself.
        return Err(Status::permission_denied(format!(
            "{ns}/{target_pod} runs on node {node} itself"
        )));
    }
    let ip = cloud
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .ok_or_else(|| Status::unavailable(format!("{ns}/{target_pod} has no address yet")))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| Status::unavailable(format!("{ns}/{target_pod} has a bad address {ip:?}")))?;
    Ok(std::net::SocketAddr::new(ip, port))
}

/// A DNS-style name: lowercase letters, digits, `-` and `.`, starting and ending with a
/// letter or digit, at most `max` bytes.
fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// `<namespace>/<pod>/<endpoint>`, each part a valid name.
fn parse_target(target: &str) -> Result<(&str, &str, &str), Status> {
    let parts: Vec<&str> = target.split('/').collect();
    match parts.as_slice() {
        [ns, pod, endpoint]
            if valid_name(ns, 63) && valid_name(pod, 253) && valid_name(endpoint, 63) =>
        {
            Ok((ns, pod, endpoint))
        }
        _ => Err(Status::invalid_argument(format!(
            "tunnel target {:?} is not <namespace>/<pod>/<endpoint>",
            target.chars().take(300).collect::<String>()
        ))),
    }
}

/// Serves one tunnel from its first frame: checks it, connects, relays until either side
/// closes.
pub(crate) async fn serve(
    client: kube::Client,
    node: String,
    first: TunnelFrame,
    mut inbound: tonic::Streaming<TunnelFrame>,
) -> Result<futures_util::stream::BoxStream<'static, Result<TunnelFrame, Status>>, Status> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_three_valid_names_or_refused() {
        assert_eq!(
            parse_target("default/digits-edge/cloud").unwrap(),
            ("default", "digits-edge", "cloud")
        );
        for bad in [
            "default/digits",
            "default/x-edge?/cloud",
            "default/../cloud",
            "default/Digits/cloud",
            "default//cloud",
            "a/b/c/d",
            "-a/b/c",
            "",
        ] {
            let err = parse_target(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(
                err.message().contains("<namespace>/<pod>/<endpoint>"),
                "{bad}: {}",
                err.message()
            );
        }
        let long = format!("default/{}/cloud", "a".repeat(254));
        assert!(parse_target(&long).is_err());
    }
}
