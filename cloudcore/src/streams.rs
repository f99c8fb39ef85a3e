//! Streams to nodes for `kubectl logs`, `exec`, `attach` and `port-forward` (KubeEdge's
//! CloudStream), over the node's own outbound connection: no port is opened on the node.
//!
//! The API server asks for a stream to a node ([`crate::Hub::open_stream`]); the hub sends
//! the node's session a `STREAM_OPEN` envelope carrying a one-time random token; the node
//! opens `Hub.Tunnel` (mutual TLS, its own certificate) with the target `stream:<token>`; the
//! hub pairs it with the waiting request — only if the token was issued to that very node —
//! and relays bytes. What flows is HTTP between the API server and the node's stream server.
//!
//! Bounds: [`StreamLimits::per_node`] streams open per node (one more is refused at once,
//! saying so), [`StreamLimits::bytes_per_second`] per node across its streams (both
//! directions together; a token bucket holds the relay back), and
//! [`StreamLimits::open_timeout`] for the node to answer.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use sedna_apiserver::nodestream::DialError;
use sedna_proto::channel::TunnelFrame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::oneshot;

use crate::rate::Bucket;
use tonic::Status;

/// The prefix of a tunnel target that answers a `STREAM_OPEN`.
pub const TARGET_PREFIX: &str = "stream:";

/// Bounds on streams to nodes.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    /// Streams open at once per node.
    pub per_node: usize,
    /// Bytes per second per node, all its streams and both directions together.
    pub bytes_per_second: u64,
    /// How long the node has to open a requested stream.
    pub open_timeout: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            per_node: 16,
            bytes_per_second: 8 * 1024 * 1024,
            open_timeout: Duration::from_secs(10),
        }
    }
}

struct NodeState {
    open: usize,
    bucket: Arc<Bucket>,
}

struct Pending {
    node: String,
    reply: oneshot::Sender<DuplexStream>,
}

/// The hub's streams: those waiting for their node, and the per-node bounds.
pub(crate) struct Streams {
    limits: StreamLimits,
    pending: Mutex<HashMap<String, Pending>>,
    nodes: Arc<Mutex<HashMap<String, NodeState>>>,
}

impl Streams {
    pub(crate) fn new(limits: StreamLimits) -> Self {
        Self {
            limits,
            pending: Mutex::default(),
            nodes: Arc::default(),
        }
    }

    pub(crate) fn limits(&self) -> StreamLimits {
        self.limits
    }

    /// Reserves one of the node's stream slots.
    pub(crate) fn reserve(&self, node: &str) -> Result<Slot, DialError> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let state = nodes.entry(node.to_owned()).or_insert_with(|| NodeState {
            open: 0,
            bucket: Arc::new(Bucket::new(self.limits.bytes_per_second)),
        });
        if state.open >= self.limits.per_node {
            return Err(DialError::Limited(format!(
                "node {node} has {} streams open, the most the hub allows per node; close one \
                 (logs -f, exec, attach, port-forward) and try again",
                state.open
            )));
        }
        state.open += 1;
        Ok(Slot {
            node: node.to_owned(),
            nodes: self.nodes.clone(),
            bucket: state.bucket.clone(),
        })
    }

    /// Registers a token the node must answer; returns where its stream will arrive.
    pub(crate) fn expect(&self, node: &str) -> (String, oneshot::Receiver<DuplexStream>) {
        let token = format!("{:032x}", rand::random::<u128>());
        let (reply, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                token.clone(),
                Pending {
                    node: node.to_owned(),
                    reply,
                },
            );
        (token, rx)
    }

    /// Forgets a token (its request gave up).
    pub(crate) fn forget(&self, token: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }

    /// Takes the request waiting for `token`, if it was issued to `node`.
    fn claim(&self, node: &str, token: &str) -> Result<Pending, Status> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.remove(token) {
            Some(p) if p.node == node => Ok(p),
            other => {
                if let Some(p) = other {
                    pending.insert(token.to_owned(), p);
                }
                Err(Status::permission_denied(format!(
                    "no stream was requested from node {node} with this token"
                )))
            }
        }
    }

    /// The node's tunnel for `token`: relays it to the waiting request.
    pub(crate) fn accept(
        &self,
        node: &str,
        token: &str,
        inbound: tonic::Streaming<TunnelFrame>,
        first_data: Vec<u8>,
    ) -> Result<futures_util::stream::BoxStream<'static, Result<TunnelFrame, Status>>, Status> {
        let pending = self.claim(node, token)?;
        let bucket = self
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .map(|s| s.bucket.clone())
            .unwrap_or_else(|| Arc::new(Bucket::new(self.limits.bytes_per_second)));
        let (near, far) = tokio::io::duplex(64 * 1024);
        pending
            .reply
            .send(near)
            .map_err(|_| Status::cancelled("the request for this stream gave up"))?;
        Ok(relay(far, inbound, first_data, bucket))
    }
}

/// Frames from the node into `far`, and `far`'s bytes out as frames, within the bucket.
fn relay(
    far: DuplexStream,
    mut inbound: tonic::Streaming<TunnelFrame>,
    first_data: Vec<u8>,
    bucket: Arc<Bucket>,
) -> futures_util::stream::BoxStream<'static, Result<TunnelFrame, Status>> {
    let (read, mut write) = tokio::io::split(far);
    let up = bucket.clone();
    tokio::spawn(async move {
        if !first_data.is_empty() {
            up.take(first_data.len()).await;
            if write.write_all(&first_data).await.is_err() {
                return;
            }
        }
        while let Some(Ok(frame)) = inbound.next().await {
            up.take(frame.data.len()).await;
            if write.write_all(&frame.data).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
    });
    let ready = futures_util::stream::once(async { Ok(TunnelFrame::default()) });
    let down = futures_util::stream::unfold((read, bucket), |(mut read, bucket)| async move {
        let mut buf = vec![0u8; crate::tunnel::FRAME_BYTES];
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                bucket.take(n).await;
                buf.truncate(n);
                Some((
                    Ok(TunnelFrame {
                        target: String::new(),
                        data: buf,
                    }),
                    (read, bucket),
                ))
            }
        }
    });
    ready.chain(down).boxed()
}

/// One of a node's stream slots, given back when dropped.
pub(crate) struct Slot {
    node: String,
    nodes: Arc<Mutex<HashMap<String, NodeState>>>,
    bucket: Arc<Bucket>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = nodes.get_mut(&self.node) {
            s.open = s.open.saturating_sub(1);
            if s.open == 0 && Arc::strong_count(&self.bucket) <= 2 {
                nodes.remove(&self.node);
            }
        }
    }
}

/// A byte stream to a node's stream server; holds one of the node's slots while open.
pub struct NodeStream {
    pub(crate) io: DuplexStream,
    pub(crate) _slot: Slot,
}

impl std::fmt::Debug for NodeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeStream")
            .field("node", &self._slot.node)
            .finish()
    }
}

impl AsyncRead for NodeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_gets_at_most_its_streams_and_slots_come_back_when_dropped() {
        let streams = Streams::new(StreamLimits {
            per_node: 2,
            ..Default::default()
        });
        let a = streams.reserve("edge-1").unwrap();
        let _b = streams.reserve("edge-1").unwrap();
        let err = streams.reserve("edge-1").err().unwrap();
        assert!(
            err.to_string()
                .contains("node edge-1 has 2 streams open, the most the hub allows per node"),
            "{err}"
        );
        assert!(
            streams.reserve("edge-2").is_ok(),
            "another node has its own slots"
        );
        drop(a);
        assert!(streams.reserve("edge-1").is_ok());
    }

    #[test]
    fn a_token_answers_only_for_the_node_it_was_issued_to() {
        let streams = Streams::new(StreamLimits::default());
        let (token, _rx) = streams.expect("edge-1");
        assert_eq!(token.len(), 32);
        let (other, _rx2) = streams.expect("edge-1");
        assert_ne!(token, other, "tokens are random");
        let err = streams.claim("edge-2", &token).err().unwrap();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(streams.claim("edge-1", "guess").is_err());
        assert!(
            streams.claim("edge-1", &token).is_ok(),
            "still there for its node"
        );
        assert!(streams.claim("edge-1", &token).is_err(), "and used once");
    }
}
