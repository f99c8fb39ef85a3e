//! The incremental-learning inference worker (`sedna-edge-worker infer`) as a real process
//! under load: four apps POST digits to its request API without pause while the deployed
//! model file is replaced (hot update): no request fails or waits for the load, answers move
//! from model version 1 to 2 and never back; a replacement that is not a model leaves the
//! current one serving and is reported; hard examples are kept as PGM files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn digit_pgms(count: usize) -> Vec<Vec<u8>> {
    let images = std::fs::read(root().join("models/mnist/test-images.idx3-ubyte")).unwrap();
    images[16..]
        .chunks_exact(784)
        .take(count)
        .map(|p| {
            let mut bytes = b"P5\n28 28\n255\n".to_vec();
            bytes.extend_from_slice(p);
            bytes
        })
        .collect()
}

fn post(port: u16, body: &[u8]) -> (u16, serde_json::Value) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        code,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn worker(model: &Path, output: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sedna-edge-worker"))
        .arg("infer")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MODEL_URL", model)
        .env("MODEL_HOT_UPDATE", "true")
        .env("MODEL_POLL_PERIOD_SECONDS", "1")
        .env("HEM_NAME", "Threshold")
        .env(
            "HEM_PARAMETERS",
            r#"[{"key": "threshold", "value": "0.9"}]"#,
        )
        .env("SEDNA_INPUT", format!("http:127.0.0.1:{port}"))
        .env("SEDNA_OUTPUT_DIR", output)
        .env("SEDNA_CACHE_DIR", output.join("cache"))
        .env("SEDNA_REPORT_INTERVAL_MS", "100")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn figures(output: &Path) -> serde_json::Value {
    std::fs::read(output.join("figures.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replaces `path` atomically with `bytes` (as a trainer or an object store sync writes it).
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn no_request_fails_while_the_deployed_model_is_replaced_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("deployed.onnx");
    std::fs::copy(root().join("models/mnist/mlp/mnist.onnx"), &model).unwrap();
    let output = dir.path().join("output");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = worker(&model, &output, port);
    let images = Arc::new(digit_pgms(50));
    wait_for("the request API", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });

    let stop = Arc::new(AtomicBool::new(false));
    let apps: Vec<_> = (0..4)
        .map(|app| {
            let (stop, images) = (stop.clone(), images.clone());
            std::thread::spawn(move || {
                let mut answers: Vec<(u16, serde_json::Value)> = Vec::new();
                let mut i = app;
                while !stop.load(Ordering::Relaxed) {
                    answers.push(post(port, &images[i % images.len()]));
                    i += 4;
                }
                answers
            })
        })
        .collect();
    // Load on version 1, then the new model (the untrained MLP: same graph, other weights).
    wait_for("answers on version 1", || {
        (figures(&output)["inference"]["inferences"].as_i64() >= Some(100)).then_some(())
    });
    replace(
        &model,
        &std::fs::read(root().join("models/mnist/mlp/init.onnx")).unwrap(),
    );
    wait_for("the reload", || {
        (figures(&output)["inference"]["modelVersion"] == 2).then_some(())
    });
    // A broken replacement: version 2 keeps serving, the failure is reported.
    let served_before = figures(&output)["inference"]["inferences"]
        .as_i64()
        .unwrap();
    replace(&model, b"not an onnx model");
    let report = wait_for("the failed reload to be reported", || {
        let f = figures(&output);
        (f["inference"]["reloadFailures"] == 1).then_some(f)
    });
    assert_eq!(report["inference"]["modelVersion"], 2, "{report}");
    assert!(
        report["inference"]["lastError"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{report}"
    );
    wait_for("more answers after the failed reload", || {
        (figures(&output)["inference"]["inferences"].as_i64() >= Some(served_before + 100))
            .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let mut versions_seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for app in apps {
        let answers = app.join().unwrap();
        let mut last = 0;
        for (code, answer) in &answers {
            assert_eq!(*code, 200, "{answer}");
            assert!(answer.get("error").is_none(), "{answer}");
            let version = answer["model_version"].as_i64().unwrap();
            assert!(
                version >= last,
                "an answer from an older model after a newer one"
            );
            last = version;
            versions_seen.insert(version);
        }
        total += answers.len();
    }
    assert_eq!(
        versions_seen.into_iter().collect::<Vec<_>>(),
        [1, 2],
        "{total} answers"
    );
    assert!(total >= 200, "{total}");
    // Unsure digits were kept for labelling (the untrained model is unsure of nearly all).
    let kept = std::fs::read_dir(output.join("hard-examples"))
        .unwrap()
        .count();
    assert!(kept > 0);
    let _ = child.kill();
    let _ = child.wait();
}
