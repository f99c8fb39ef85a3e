//! The node's cloud proxy: workers on the node reach a cloud worker through the hub, over the
//! node's outbound, mutually authenticated connection, with no route to the cloud network.
//!
//! A worker connects to the proxy (loopback; `SEDNA_CLOUD_PROXY` in its environment) and asks
//! `CONNECT <namespace>/<its pod>/<endpoint> HTTP/1.1`; the proxy opens a `Hub.Tunnel` stream
//! naming that target, answers `200` once the hub has connected to the endpoint its pod
//! declares (or `403` / `502` with the hub's reason), then relays bytes both ways. The hub
//! decides whether this node may reach that target.

use std::net::SocketAddr;
use std::path::PathBuf;

use sedna_proto::channel::TunnelFrame;
use sedna_proto::channel::hub_client::HubClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use crate::join::Identity;

/// The largest CONNECT request head accepted.
const MAX_HEAD: usize = 4096;

/// A running proxy.
#[derive(Debug)]
pub struct CloudProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl CloudProxy {
    /// Listens on `listen` and tunnels through the hub `hub` names now, with the node identity kept
    /// in `data_dir` (read at each new hub connection, so renewed certificates are used).
    pub async fn start(
        listen: SocketAddr,
        hub: tokio::sync::watch::Receiver<String>,
        data_dir: PathBuf,
    ) -> std::io::Result<CloudProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let channel: std::sync::Arc<Mutex<Option<tonic::transport::Channel>>> =
            std::sync::Arc::default();
        let task = tokio::spawn(async move {
            let mut dialed = String::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                // Any hub of a tier serves tunnels: the one the node is connected to.
                let hub = hub.borrow().clone();
                if hub != dialed {
                    *channel.lock().await = None;
                    dialed = hub.clone();
                }
                let (data_dir, channel) = (data_dir.clone(), channel.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, &hub, &data_dir, &channel).await {
                        tracing::debug!(error = %e, "cloud proxy connection ended");
                    }
                });
            }
        });
        Ok(CloudProxy { addr, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for CloudProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hub_channel(
    hub: &str,
    data_dir: &std::path::Path,
    cached: &Mutex<Option<tonic::transport::Channel>>,
) -> Result<tonic::transport::Channel, String> {
    let mut guard = cached.lock().await;
    if let Some(channel) = guard.as_ref() {
        return Ok(channel.clone());
    }
    let identity = Identity::load(data_dir)
        .map_err(|e| e.to_string())?
        .ok_or("the node has not joined")?;
    let config =
        crate::tls::channel_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)
            .map_err(|e| e.to_string())?;
    let channel = crate::tls::connect(hub, config).await?;
    *guard = Some(channel.clone());
    Ok(channel)
}

/// Answers the worker with the hub's refusal (403 when the node may not reach the target,
/// 502 otherwise); returns the reason.
async fn refuse(stream: &mut TcpStream, status: &tonic::Status) -> String {
    let code = if status.code() == tonic::Code::PermissionDenied {
        "403 Forbidden"
    } else {
        "502 Bad Gateway"
    };
    let _ = stream
        .write_all(format!("HTTP/1.1 {code}\r\n\r\n{}\n", status.message()).as_bytes())
        .await;
    status.message().to_string()
}

async fn serve(
    mut stream: TcpStream,
    hub: &str,
    data_dir: &std::path::Path,
    cached: &Mutex<Option<tonic::transport::Channel>>,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    // The request head: `CONNECT target HTTP/1.1` ... blank line.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            let _ = stream
                .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")
                .await;
            return Err("request head too large".into());
        }
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return Err("connection closed before the request".into()),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _ = stream
            .write_all(
                b"HTTP/1.1 405 Method Not Allowed\r\n\r\nuse CONNECT <namespace>/<pod>/<endpoint>\n",
            )
            .await;
        return Err("not a CONNECT request".into());
    };
    let target = target.to_string();
    let mut tunnel = match open(hub, data_dir, cached, target).await {
        Ok(t) => t,
        Err(status) => return Err(refuse(&mut stream, &status).await),
    };
    stream
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tunnel).await;
    Ok(())
}

/// Opens `Hub.Tunnel` to `target` and waits for the hub's first (empty) frame, which says
/// the other end is reached; returns the tunnel as a byte stream.
pub(crate) async fn open(
    hub: &str,
    data_dir: &std::path::Path,
    cached: &Mutex<Option<tonic::transport::Channel>>,
    target: String,
) -> Result<tokio::io::DuplexStream, tonic::Status> {
    let channel = hub_channel(hub, data_dir, cached)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("hub unreachable: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<TunnelFrame>(64);
    let _ = tx
        .send(TunnelFrame {
            target,
            data: Vec::new(),
        })
        .await;
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut inbound = match HubClient::new(channel).tunnel(outgoing).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown
            ) {
                // The hub connection may be stale: dial afresh next time.
                *cached.lock().await = None;
            }
            return Err(status);
        }
    };
    match inbound.message().await? {
        Some(_) => {}
        None => return Err(tonic::Status::unavailable("the hub closed the tunnel")),
    }
    let (near, far) = tokio::io::duplex(64 * 1024);
    let (mut read, mut write) = tokio::io::split(far);
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = TunnelFrame {
                        target: String::new(),
                        data: buf[..n].to_vec(),
                    };
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Ok(Some(frame)) = inbound.message().await {
            if write.write_all(&frame.data).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
        // The hub's side ended: nothing more goes up either.
        upstream.abort();
    });
    Ok(near)
}
