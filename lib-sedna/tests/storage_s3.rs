//! Storage against a real S3-compatible server (moto, installed by scripts/setup), on
//! 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use sedna::config::Credentials;
use sedna::storage::{Storage, StorageError, StorageOptions};
use sedna_testkit::s3::S3Server;

#[tokio::test]
async fn s3_objects_are_fetched_with_mounted_credentials_and_cached_by_content() {
    let server = S3Server::start().unwrap();
    assert!(server.create_bucket("models").unwrap() < 300);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("ACCESS_KEY_ID"), "AKIDEXAMPLE").unwrap();
    std::fs::write(secret.join("SECRET_ACCESS_KEY"), "wJalrXUtnFEMI").unwrap();
    let mut options = StorageOptions::new(dir.path().join("cache"));
    options.s3_endpoint = Some(server.endpoint());
    options.allow_http = true;
    options.credentials = Credentials::load(&secret).unwrap();
    assert!(options.credentials.is_some());
    let storage = Storage::new(options).unwrap();

    let model = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/digits/model.onnx"),
    )
    .unwrap();
    let url = "s3://models/digits/v1/model.onnx";
    storage.upload(url, model.clone().into()).await.unwrap();
    let first = storage.fetch(url).await.unwrap();
    assert!(!first.cached);
    assert_eq!(std::fs::read(&first.path).unwrap(), model);
    assert_eq!(
        first.sha256,
        "b524bdf48c5429fcd1b19d3223d93fad5960b5b0dc0bf1315a2fd99a8ccc1994"
    );
    let second = storage.fetch(url).await.unwrap();
    assert!(
        second.cached,
        "the unchanged object is served from the cache"
    );

    // The same bytes under another key share the blob; a new version is downloaded.
    storage
        .upload("s3://models/digits/latest.onnx", model.clone().into())
        .await
        .unwrap();
    let latest = storage
        .fetch("s3://models/digits/latest.onnx")
        .await
        .unwrap();
    assert_eq!(latest.path, first.path);
    storage
        .upload(url, bytes::Bytes::from_static(b"v2"))
        .await
        .unwrap();
    let changed = storage.fetch(url).await.unwrap();
    assert!(!changed.cached);
    assert_eq!(std::fs::read(&changed.path).unwrap(), b"v2");
    assert_eq!(storage.read(url, 1024).await.unwrap().as_ref(), b"v2");

    let err = storage.fetch("s3://models/none.onnx").await.unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
    assert!(!err.is_retryable());
    let err = storage.read(url, 1).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("2 bytes is more than the 1-byte limit"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_store_is_a_retryable_error_naming_the_url() {
    // A port bound and never listened on, held for the whole test: connections to it are
    // refused, and no other test's server can take it meanwhile (a port merely found free
    // and released can be).
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = closed.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut options = StorageOptions::new(dir.path());
    options.s3_endpoint = Some(format!("http://127.0.0.1:{port}"));
    options.allow_http = true;
    let storage = Storage::new(options).unwrap();
    let err = storage.fetch("s3://models/x.onnx").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("s3://models/x.onnx"), "{err}");
    drop(closed);
}
