//! The Model controller's resolution against a real S3-compatible server (moto, installed by
//! scripts/setup), with the endpoint and credentials of a Sedna-style Secret.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sedna_controllers::model::{Resolved, resolve, s3_settings};

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> (Moto, u16) {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Moto(child), port)
}

fn secret(port: u16) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("model-store".into()),
            annotations: Some(BTreeMap::from([
                ("s3-endpoint".to_string(), format!("127.0.0.1:{port}")),
                ("s3-usehttps".to_string(), "0".to_string()),
            ])),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([
            ("ACCESS_KEY_ID".to_string(), "AKIDEXAMPLE".to_string()),
            (
                "SECRET_ACCESS_KEY".to_string(),
                "not-a-real-secret".to_string(),
            ),
        ])),
        ..Secret::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_models_resolve_with_the_secrets_endpoint_and_credentials() {
    let (_moto, port) = moto();
    let secret = secret(port);
    let (endpoint, credentials) = s3_settings(&secret);
    assert_eq!(
        endpoint.as_deref(),
        Some(format!("http://127.0.0.1:{port}").as_str())
    );
    assert_eq!(credentials.as_ref().unwrap().access_key_id, "AKIDEXAMPLE");

    // A bucket with the edge model in it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut options = sedna::storage::StorageOptions::new(dir.path().join("upload"));
    options.s3_endpoint = endpoint;
    options.allow_http = true;
    options.credentials = credentials;
    let storage = sedna::storage::Storage::new(options).unwrap();
    let status = create_bucket(port, "models").await;
    assert!(status < 300, "bucket not created: {status}");
    let model = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mnist/edge/model.onnx"),
    )
    .unwrap();
    storage
        .upload("s3://models/mnist/edge.onnx", model.clone().into())
        .await
        .unwrap();

    let cache = dir.path().join("gm");
    match resolve("s3://models/mnist/edge.onnx", Some(&secret), &cache)
        .await
        .unwrap()
    {
        Resolved::Object {
            size,
            last_modified,
        } => {
            assert_eq!(size, model.len() as u64);
            assert!(
                last_modified.parse::<jiff::Timestamp>().is_ok(),
                "{last_modified}"
            );
        }
        other => panic!("{other:?}"),
    }
    let err = resolve("s3://models/mnist/missing.onnx", Some(&secret), &cache)
        .await
        .unwrap_err();
    assert!(err.contains("no such object"), "{err}");
    assert_eq!(
        resolve("/models/edge.onnx", None, &cache).await.unwrap(),
        Resolved::NodePath
    );
    let err = resolve("ftp://models/edge.onnx", None, &cache)
        .await
        .unwrap_err();
    assert!(err.contains("unsupported scheme"), "{err}");
}

/// Creates a bucket (moto accepts unsigned requests).
async fn create_bucket(port: u16, bucket: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    response[9..12].parse().unwrap()
}
