//! The edge worker's other sources, as real processes: a video file decoded by ffmpeg, and
//! the HTTP request API apps call. Real MNIST digits; the edge model only (EdgeOnly).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn digits(count: usize) -> Vec<(Vec<u8>, i64)> {
    let images = std::fs::read(root().join("models/mnist/test-images.idx3-ubyte")).unwrap();
    let labels = std::fs::read(root().join("models/mnist/test-labels.idx1-ubyte")).unwrap();
    images[16..]
        .chunks_exact(784)
        .zip(&labels[8..])
        .take(count)
        .map(|(p, l)| (p.to_vec(), i64::from(*l)))
        .collect()
}

fn pgm(pixels: &[u8]) -> Vec<u8> {
    let mut bytes = b"P5\n28 28\n255\n".to_vec();
    bytes.extend_from_slice(pixels);
    bytes
}

fn worker(input: &str, output: &Path, exit_after: Option<usize>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sedna-edge-worker"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "MODEL_URL",
            root()
                .join("models/mnist/edge/model.onnx")
                .canonicalize()
                .unwrap(),
        )
        .env("HEM_NAME", "EdgeOnly")
        .env("SEDNA_CLOUD_URL", "http://127.0.0.1:9")
        .env("SEDNA_INPUT", input)
        .env("SEDNA_OUTPUT_DIR", output)
        .env("SEDNA_CACHE_DIR", output.join("cache"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(n) = exit_after {
        c.env("SEDNA_EXIT_AFTER", n.to_string());
    }
    c.spawn().unwrap()
}

fn results(output: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(output.join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn frames_of_a_video_file_are_decoded_by_ffmpeg_and_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    let digits = digits(100);
    for (i, (pixels, _)) in digits.iter().enumerate() {
        std::fs::write(frames.join(format!("{i:04}.pgm")), pgm(pixels)).unwrap();
    }
    // A lossless grey video, as a camera recording of the digits.
    let video = dir.path().join("digits.mkv");
    let status = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-framerate", "25", "-i"])
        .arg(frames.join("%04d.pgm"))
        .args(["-c:v", "ffv1", "-pix_fmt", "gray"])
        .arg(&video)
        .status()
        .expect("ffmpeg is installed by scripts/setup");
    assert!(status.success());
    let output = dir.path().join("output");
    let mut child = worker(&format!("video:{}", video.display()), &output, Some(100));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the worker did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let results = results(&output);
    assert_eq!(results.len(), 100, "one result per frame");
    let mut correct = 0;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["id"], format!("frame-{i:08}"), "frames in order");
        if r["label"].as_i64() == Some(digits[i].1) {
            correct += 1;
        }
    }
    // The edge model scores 0.8945 on the held-out split; lossless frames change nothing.
    assert!(correct >= 85, "{correct}/100");
}

#[test]
fn apps_post_images_to_the_request_api_and_get_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("output");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = worker(&format!("http:127.0.0.1:{port}"), &output, None);
    let post = |path: &str, body: &[u8]| -> (u16, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stream = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("the request API never listened: {e}"),
            }
        };
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let code = response[9..12].parse().unwrap();
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        (
            code,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    };
    let digits = digits(20);
    let mut correct = 0;
    for (i, (pixels, label)) in digits.iter().enumerate() {
        let (code, answer) = post(&format!("/infer?id=app-{i}"), &pgm(pixels));
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["id"], format!("app-{i}"));
        assert_eq!(answer["source"], "edge");
        if answer["label"].as_i64() == Some(*label) {
            correct += 1;
        }
    }
    assert!(correct >= 16, "{correct}/20");
    let (code, answer) = post("/infer", b"not an image");
    assert_eq!(code, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("PGM"),
        "{answer}"
    );
    let (code, _) = post("/elsewhere", b"");
    assert_eq!(code, 404);
    // Answers are recorded like every other result.
    assert_eq!(
        results(&output)
            .iter()
            .filter(|r| r.get("error").is_none())
            .count(),
        20
    );
    let _ = child.kill();
    let _ = child.wait();
}
