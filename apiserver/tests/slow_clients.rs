//! Slow and idle clients cannot exhaust the server: connections are bounded (one beyond the
//! bound is closed at once), a TLS handshake and a request's headers have deadlines, and once
//! the idle connections are gone legitimate clients are served again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::TestServer;

/// Reads until the server closes the connection; returns how long that took.
async fn closed_within(stream: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept the connection open for {limit:?}"),
        }
    }
}

async fn tls_client(server: &TestServer) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    for cert in CertificateDer::pem_slice_iter(server.server.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_bounded_and_cut_at_their_deadlines() {
    let server = TestServer::start_with(|c| {
        c.max_connections = 16;
        c.handshake_timeout = Duration::from_secs(1);
        c.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = server.server.addr();
    let client = server.client().await;
    client.apiserver_version().await.unwrap();

    // Sixteen connections that never start TLS fill the server …
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // … so a seventeenth is closed at once, instead of queueing or costing a descriptor.
    let mut extra = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(5)).await < Duration::from_millis(900));
    // The idle ones are cut at the handshake deadline.
    for stream in &mut idle {
        closed_within(stream, Duration::from_secs(5)).await;
    }
    // A client that completes TLS but sends only part of its headers is cut at the header
    // deadline.
    let connector = tls_client(&server).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut slow = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    slow.write_all(b"GET /version HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let took = closed_within(&mut slow, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(800), "cut after {took:?}");
    // Legitimate clients are served again.
    client.apiserver_version().await.unwrap();
}
