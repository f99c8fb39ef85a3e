//! A cloud worker reached directly, as an attacker on its network would: without the
//! service's token, with a wrong one, with requests over the size limit, with more
//! connections than it admits. Each is refused with a reason; the service's own edge keeps
//! being answered.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::model_path;
use sedna::cloud::{BatchOptions, Batcher, GrpcCloud, Protocols, ServeOptions, serve};
use sedna::inference::{Model, SessionOptions, Tensor};
use sedna::joint::{Cloud, JointError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "s3cr3t-service-token";

async fn start(options: ServeOptions) -> (String, tokio::sync::oneshot::Sender<()>) {
    let model = Arc::new(Model::load(model_path(), &SessionOptions::default()).unwrap());
    let input = model.inputs().first().cloned();
    let batcher = Batcher::spawn(model, BatchOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        batcher,
        Protocols::GrpcAndJson { input },
        options,
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

fn digit() -> Vec<(String, Tensor)> {
    vec![(
        "input".into(),
        Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 64]))),
    )]
}

async fn post_json(addr: &str, body: String, token: Option<&str>) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let mut request = client
        .post(format!("http://{addr}/digits/predict"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_worker_answers_only_its_services_token_within_its_size_limit() {
    let (addr, _stop) = start(ServeOptions {
        max_request_bytes: 64 * 1024,
        token: Some(TOKEN.into()),
        ..ServeOptions::default()
    })
    .await;
    let url = format!("http://{addr}");
    let timeout = Duration::from_secs(10);

    let stranger = GrpcCloud::new(&url, timeout).unwrap();
    match stranger.infer(&digit()).await {
        Err(JointError::CloudRefused(m)) => assert!(m.contains("token"), "{m}"),
        other => panic!(
            "answered without the token: {:?}",
            other.map(|r| r.bytes_sent)
        ),
    }
    let wrong = GrpcCloud::new(&url, timeout)
        .unwrap()
        .with_token("not-the-token")
        .unwrap();
    assert!(matches!(
        wrong.infer(&digit()).await,
        Err(JointError::CloudRefused(_))
    ));
    let edge = GrpcCloud::new(&url, timeout)
        .unwrap()
        .with_token(TOKEN)
        .unwrap();
    let reply = edge.infer(&digit()).await.unwrap();
    assert_eq!(
        reply.outputs.len(),
        2,
        "the digits model answers label and probabilities"
    );

    // 128 KiB of input: over the 64 KiB limit, refused before it is decoded.
    let big = vec![(
        "input".into(),
        Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[512, 64]))),
    )];
    match edge.infer(&big).await {
        Err(JointError::CloudRefused(m)) => assert!(m.contains("too large"), "{m}"),
        other => panic!(
            "an oversized request was not refused: {:?}",
            other.map(|r| r.bytes_sent)
        ),
    }

    // Sedna's JSON protocol: the same rules.
    let sample = format!("{{\"data\": {:?}}}", vec![0.0f32; 64]);
    let (code, body) = post_json(&addr, sample.clone(), None).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("token"), "{body}");
    let (code, body) = post_json(&addr, sample, Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    let huge = format!("{{\"data\": {:?}}}", vec![0.0f32; 64 * 1024]);
    let (code, body) = post_json(&addr, huge, Some(TOKEN)).await;
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("over 65536 bytes"), "{body}");
    // The service's edge is still answered.
    assert!(edge.infer(&digit()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_and_the_others_still_served() {
    let (addr, _stop) = start(ServeOptions {
        max_connections: 2,
        ..ServeOptions::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        // An HTTP/1.1 request line and nothing more: the connection stays open.
        c.write_all(b"POST /digits/predict HTTP/1.1\r\n")
            .await
            .unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("the connection over the limit was left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop(held);
    // Freed slots are used again.
    let url = format!("http://{addr}");
    let mut answered = false;
    for _ in 0..50 {
        let client = GrpcCloud::new(&url, Duration::from_secs(5)).unwrap();
        if client.infer(&digit()).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "no answer after the held connections closed");
}
