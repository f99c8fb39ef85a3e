//! The Model controller's resolution against a real S3-compatible server (moto, installed by
//! scripts/setup), with the endpoint and credentials of a Sedna-style Secret.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sedna_controllers::model::{Resolved, resolve, s3_settings};
use sedna_testkit::s3::S3Server;

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
    let server = S3Server::start().unwrap();
    let port = server.port();
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
    let status = server.create_bucket("models").unwrap();
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
