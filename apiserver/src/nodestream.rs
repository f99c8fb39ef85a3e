//! `pods/log`, `pods/exec`, `pods/attach` and `pods/portforward`: after authorization (RBAC
//! on the subresource; `create` for the three interactive ones, whatever the method, as
//! Kubernetes ≥ 1.31 asks for websocket upgrades too), the request goes to the pod's node
//! as the kubelet's path (`/containerLogs/…`, `/exec/…`, `/attach/…`, `/portForward/…`) over
//! a byte stream the server's [`NodeDialer`] opens — on `sedna up`, through the hub and the
//! node's own outbound connection. The answer comes back unchanged; an upgrade (websocket or
//! SPDY) is relayed byte for byte both ways, so the protocol is spoken end to end by kubectl
//! and the node.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::ApiError;

/// A byte stream to a node's stream server.
pub trait NodeIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> NodeIo for T {}

/// Why no stream to a node could be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The node has no connection to the hub now.
    #[error("node {0} is not connected")]
    NotConnected(String),
    /// A limit on the node's streams is reached; the message names it.
    #[error("{0}")]
    Limited(String),
    /// The node did not answer in time, or the stream failed.
    #[error("{0}")]
    Failed(String),
}

impl DialError {
    /// Every case may succeed later.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// What [`NodeDialer`] returns.
pub type DialFuture = Pin<Box<dyn Future<Output = Result<Box<dyn NodeIo>, DialError>> + Send>>;

/// Opens a byte stream to the named node's stream server (`None` in the server's config:
/// these subresources answer 503).
#[derive(Clone)]
pub struct NodeDialer(pub Arc<dyn Fn(&str) -> DialFuture + Send + Sync>);

impl std::fmt::Debug for NodeDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeDialer")
    }
}

/// The subresources served here.
pub fn is_stream(resource: &str, subresource: Option<&str>) -> bool {
    resource == "pods" && matches!(subresource, Some("log" | "exec" | "attach" | "portforward"))
}

/// The verb RBAC checks for a stream subresource.
pub fn verb(subresource: &str, method: &Method) -> &'static str {
    match subresource {
        "log" if method == Method::GET => "get",
        _ => "create",
    }
}

/// Where on the node a request goes: the kubelet path and query for this pod.
pub(crate) fn node_path(
    pod: &Value,
    subresource: &str,
    query: Option<&str>,
) -> Result<(String, String), ApiError> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let node = pod["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?
        .to_owned();
    let query = query.unwrap_or_default();
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let asked = crate::request::Query::parse(Some(query));
    let container = match asked.get("container").filter(|c| !c.is_empty()) {
        Some(c) if containers.contains(&c) => c.to_owned(),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        None => match pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"]
            .as_str()
            .filter(|c| containers.contains(c))
        {
            Some(c) => c.to_owned(),
            None if containers.len() == 1 => containers[0].to_owned(),
            None if subresource == "portforward" => String::new(),
            None => {
                return Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    containers.join(" ")
                )));
            }
        },
    };
    let path = match subresource {
        "log" => format!("/containerLogs/{ns}/{name}/{container}"),
        "exec" => format!("/exec/{ns}/{name}/{container}"),
        "attach" => format!("/attach/{ns}/{name}/{container}"),
        _ => format!("/portForward/{ns}/{name}"),
    };
    let path = if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    };
    Ok((node, path))
}

/// Headers that belong to the client's hop and are not passed to the node.
fn hop_only(name: &http::HeaderName) -> bool {
    name == http::header::AUTHORIZATION || name == http::header::HOST
}

/// Sends the request to the node and relays the answer (and an upgraded connection).
pub(crate) async fn proxy(
    dialer: Option<&NodeDialer>,
    node: &str,
    path: &str,
    mut req: Request<Incoming>,
) -> Result<Response<crate::server::Body>, ApiError> {
    let dialer = dialer.ok_or_else(|| {
        ApiError::unavailable("this server has no route to nodes' streams (no hub is attached)")
    })?;
    let io = (dialer.0)(node).await.map_err(|e| match e {
        DialError::Limited(m) => ApiError::too_many_requests(m),
        other => ApiError::unavailable(format!("error dialing backend: {other}")),
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ApiError::unavailable(format!("error dialing backend: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "node stream connection ended");
        }
    });
    let mut upstream = Request::builder().method(req.method().clone()).uri(path);
    for (name, value) in req.headers() {
        if !hop_only(name) {
            upstream = upstream.header(name, value);
        }
    }
    let upstream = upstream
        .header(http::header::HOST, "node")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut answer = sender
        .send_request(upstream)
        .await
        .map_err(|e| ApiError::unavailable(format!("error dialing backend: {e}")))?;
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        response = response.header(name, value);
    }
    if answer.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let node_upgrade = hyper::upgrade::on(&mut answer);
        tokio::spawn(async move {
            let (Ok(client), Ok(node)) = (client_upgrade.await, node_upgrade.await) else {
                return;
            };
            let mut client = TokioIo::new(client);
            let mut node = TokioIo::new(node);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut node).await;
        });
        return response
            .body(BodyExt::boxed(http_body_util::Empty::new()))
            .map_err(|e| ApiError::internal(e.to_string()));
    }
    // A body error from the node ends the relayed body early; the client sees it cut.
    let frames = futures_util::stream::unfold(answer.into_body(), |mut body| async move {
        match body.frame().await {
            Some(Ok(frame)) => Some((Ok::<_, std::convert::Infallible>(frame), body)),
            _ => None,
        }
    });
    response
        .body(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
        .map_err(|e| ApiError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(containers: &[&str], node: Option<&str>) -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "nodeName": node,
                "containers": containers.iter().map(|c| json!({"name": c})).collect::<Vec<_>>(),
            }
        })
    }

    #[test]
    fn requests_map_to_the_kubelet_paths_of_the_pods_node() {
        let (node, path) =
            node_path(&pod(&["main"], Some("edge-1")), "log", Some("follow=true")).unwrap();
        assert_eq!(node, "edge-1");
        assert_eq!(path, "/containerLogs/shop/web/main?follow=true");
        let (_, path) = node_path(
            &pod(&["a", "b"], Some("edge-1")),
            "exec",
            Some("container=b&command=ls&stdout=true"),
        )
        .unwrap();
        assert_eq!(path, "/exec/shop/web/b?container=b&command=ls&stdout=true");
        let (_, path) = node_path(&pod(&["a", "b"], Some("e")), "portforward", None).unwrap();
        assert_eq!(path, "/portForward/shop/web");
    }

    #[test]
    fn unbound_pods_and_unknown_or_ambiguous_containers_are_refused_with_kubernetes_words() {
        let message = |p: Value, q: &str| node_path(&p, "log", Some(q)).unwrap_err().message;
        assert_eq!(
            message(pod(&["main"], None), ""),
            "pod web does not have a host assigned"
        );
        assert_eq!(
            message(pod(&["main"], Some("e")), "container=side"),
            "container side is not valid for pod web"
        );
        assert_eq!(
            message(pod(&["a", "b"], Some("e")), ""),
            "a container name must be specified for pod web, choose one of: [a b]"
        );
        assert!(!is_stream("pods", Some("status")));
        assert!(is_stream("pods", Some("portforward")));
        assert_eq!(verb("exec", &Method::GET), "create");
        assert_eq!(verb("log", &Method::GET), "get");
    }
}
