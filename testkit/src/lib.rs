//! Helpers for tests and benchmarks that need a network between two parts: a TCP proxy on
//! 127.0.0.1 that counts the bytes it forwards each way and can cut every connection, or
//! refuse new ones, or slow the way back to clients, or delay the way to the target, on demand
//! ([`TcpProxy`]); and a real
//! S3-compatible server ([`s3::S3Server`]).

pub mod s3;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Default)]
struct Counters {
    to_target: AtomicU64,
    to_client: AtomicU64,
    connections: AtomicU64,
    blocked: AtomicBool,
    /// Bytes per second towards clients; 0 means unlimited.
    rate_to_client: AtomicU64,
    /// Milliseconds every byte towards the target is held back; 0 means none.
    latency_to_target_ms: AtomicU64,
}

/// A running proxy; dropping it stops it and closes every connection.
pub struct TcpProxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    cut: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let (cut, cut_rx) = watch::channel(0u64);
        let c = counters.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if c.blocked.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                c.connections.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump_delayed(cr, sw, c.clone());
                    let down = pump(sr, cw, c.clone());
                    cut_rx.borrow_and_update();
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Ok(TcpProxy {
            addr,
            counters,
            cut,
            task,
        })
    }

    /// The address clients dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes forwarded from clients to the target.
    pub fn bytes_to_target(&self) -> u64 {
        self.counters.to_target.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from the target to clients.
    pub fn bytes_to_client(&self) -> u64 {
        self.counters.to_client.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::SeqCst)
    }

    /// Closes every open connection abruptly.
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// While blocked, new connections are closed at once (the target looks unreachable).
    pub fn set_blocked(&self, blocked: bool) {
        self.counters.blocked.store(blocked, Ordering::SeqCst);
    }

    /// Paces what the target sends to clients to about `bytes_per_second` on every
    /// connection (a slow link), or lifts the limit with `None`. Applies at once, also to
    /// connections already open.
    pub fn set_rate_to_client(&self, bytes_per_second: Option<u64>) {
        self.counters
            .rate_to_client
            .store(bytes_per_second.unwrap_or(0), Ordering::SeqCst);
    }

    /// Holds back everything clients send for `latency` before the target gets it (a link
    /// with a long way up: each request reaches the target that much later, and requests
    /// sent one after another each pay it), or lifts it with `None`. Applies to what is sent
    /// from then on, also on connections already open.
    pub fn set_latency_to_target(&self, latency: Option<std::time::Duration>) {
        let ms = latency.map_or(0, |l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX));
        self.counters
            .latency_to_target_ms
            .store(ms, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut_all();
        self.task.abort();
    }
}

/// The way from a client to the target: what is read is stamped and written once its
/// latency has passed, so a delay holds each chunk back without slowing the link's rate.
async fn pump_delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counters: Arc<Counters>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let latency = counters.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let ms = latency.latency_to_target_ms.load(Ordering::SeqCst);
            let due = tokio::time::Instant::now() + std::time::Duration::from_millis(ms);
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
            counters
                .to_target
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// The way from the target to a client, paced when a rate is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counters: Arc<Counters>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let rate = counters.rate_to_client.load(Ordering::SeqCst);
        // A paced link moves small chunks, each after its share of time.
        let want = if rate == 0 { buf.len() } else { 1024 };
        let n = match from.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(nanos) = (n as u64).saturating_mul(1_000_000_000).checked_div(rate) {
            tokio::time::sleep(std::time::Duration::from_nanos(nanos)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        counters.to_client.fetch_add(n as u64, Ordering::SeqCst);
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_counts_and_cuts() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = TcpProxy::start(target).await.unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!(proxy.bytes_to_target(), 5);
        assert_eq!(proxy.bytes_to_client(), 5);
        proxy.cut_all();
        let mut rest = Vec::new();
        let n = client.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0, "the connection was closed");
        proxy.set_blocked(true);
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(refused.read(&mut back).await.unwrap_or(0), 0);
        assert_eq!(proxy.connections(), 1);
    }

    #[tokio::test]
    async fn a_paced_link_takes_its_time_and_the_limit_can_be_lifted() {
        let source = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = source.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = source.accept().await.unwrap();
            let mut ask = [0u8; 1];
            while s.read_exact(&mut ask).await.is_ok() {
                if s.write_all(&[7u8; 5000]).await.is_err() {
                    break;
                }
            }
        });
        let proxy = TcpProxy::start(target).await.unwrap();
        proxy.set_rate_to_client(Some(10_000));
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut got = vec![0u8; 5000];
        let started = std::time::Instant::now();
        client.write_all(b"?").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        let paced = started.elapsed();
        // 5,000 bytes at 10,000 bytes per second: half a second at least (a sleep is never
        // shorter than asked; the last chunk may still be in flight, hence 0.4).
        assert!(paced >= std::time::Duration::from_millis(400), "{paced:?}");
        proxy.set_rate_to_client(None);
        client.write_all(b"?").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(proxy.bytes_to_client(), 10_000);
        assert!(got.iter().all(|b| *b == 7));
    }

    /// Sends one byte through an echo and times its return.
    async fn ask(c: &mut TcpStream) -> std::time::Duration {
        let started = std::time::Instant::now();
        c.write_all(b"?").await.unwrap();
        let mut back = [0u8; 1];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"?");
        started.elapsed()
    }

    #[tokio::test]
    async fn a_delayed_link_holds_each_request_back_and_the_delay_can_be_lifted() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 1];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
        let proxy = TcpProxy::start(target).await.unwrap();
        let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.set_latency_to_target(Some(std::time::Duration::from_millis(300)));
        // Two requests one after the other: each pays the delay (a sleep is never shorter
        // than asked).
        let first = ask(&mut client).await;
        let second = ask(&mut client).await;
        assert!(first >= std::time::Duration::from_millis(300), "{first:?}");
        assert!(
            second >= std::time::Duration::from_millis(300),
            "{second:?}"
        );
        proxy.set_latency_to_target(None);
        let lifted = ask(&mut client).await;
        assert!(lifted < std::time::Duration::from_millis(300), "{lifted:?}");
        assert_eq!(proxy.bytes_to_target(), 3);
    }
}
