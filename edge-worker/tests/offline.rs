//! The edge worker as a real process, reading real MNIST digits as PGM files as they arrive,
//! with the cloud side (lib-sedna's batcher and gRPC service, what `sedna-cloud-worker`
//! runs) stopped mid-stream and started again: every input gets a result, hard examples
//! wait on disk and all get their cloud answer, nothing is lost.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sedna::cloud::{BatchOptions, Batcher, serve_grpc};
use sedna::inference::{Model, SessionOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The held-out digits as (pixels, label).
fn digits() -> Vec<(Vec<u8>, i64)> {
    let images = std::fs::read(root().join("models/mnist/test-images.idx3-ubyte")).unwrap();
    let labels = std::fs::read(root().join("models/mnist/test-labels.idx1-ubyte")).unwrap();
    images[16..]
        .chunks_exact(784)
        .zip(&labels[8..])
        .map(|(p, l)| (p.to_vec(), i64::from(*l)))
        .collect()
}

fn write_pgm(dir: &Path, name: &str, pixels: &[u8]) {
    let mut bytes = b"P5\n28 28\n255\n".to_vec();
    bytes.extend_from_slice(pixels);
    let tmp = dir.join(format!(".{name}"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

fn feed(inputs: &Path, digits: &[(Vec<u8>, i64)], range: std::ops::Range<usize>) {
    for (i, (pixels, _)) in digits.iter().enumerate().take(range.end).skip(range.start) {
        write_pgm(inputs, &format!("{i:04}.pgm"), pixels);
    }
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Cloud {
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Cloud {
    fn start(address: std::net::SocketAddr, model: Arc<Model>) -> (Cloud, std::net::SocketAddr) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .unwrap();
        let bound = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = runtime.spawn(async move {
            let batcher = Batcher::spawn(model, BatchOptions::default());
            serve_grpc(listener, batcher, async {
                let _ = stopped.await;
            })
            .await
        });
        (
            Cloud {
                runtime,
                stop: Some(stop),
                server: Some(server),
            },
            bound,
        )
    }

    fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let server = self.server.take().unwrap();
        self.runtime.block_on(server).unwrap().unwrap();
        self.runtime.shutdown_timeout(Duration::from_secs(1));
    }
}

/// The worker on the MNIST edge model, CrossEntropy mining, reading PGM files from `inputs`,
/// asking the cloud at `address`, until `exit_after` answers in all.
fn worker(
    dir: &Path,
    inputs: &Path,
    output: &Path,
    address: std::net::SocketAddr,
    exit_after: usize,
) -> Command {
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
        .env("HEM_NAME", "CrossEntropy")
        .env(
            "HEM_PARAMETERS",
            r#"[{"key": "threshold_cross_entropy", "value": "0.67"}]"#,
        )
        .env("SEDNA_CLOUD_URL", format!("http://{address}"))
        .env("SEDNA_INPUT", format!("dir:{}", inputs.display()))
        .env("SEDNA_OUTPUT_DIR", output)
        .env("SEDNA_CACHE_DIR", dir.join("cache"))
        .env("SEDNA_EXIT_AFTER", exit_after.to_string())
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    c
}

/// A model of the repository, run on one thread.
fn one_thread_model(path: &str) -> Arc<Model> {
    let options = SessionOptions {
        intra_threads: 1,
        ..SessionOptions::default()
    };
    Arc::new(Model::load(root().join(path), &options).unwrap())
}

#[test]
fn the_cloud_stops_mid_stream_and_every_hard_example_still_gets_its_cloud_answer() {
    let digits = digits();
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs");
    let output = dir.path().join("output");
    std::fs::create_dir_all(&inputs).unwrap();
    let cloud_model = one_thread_model("models/mnist/cloud/model.onnx");
    let (cloud, address) = Cloud::start("127.0.0.1:0".parse().unwrap(), cloud_model.clone());
    feed(&inputs, &digits, 0..100);
    let mut worker = worker(dir.path(), &inputs, &output, address, 300)
        .env("SEDNA_CLOUD_TIMEOUT_MS", "500")
        .env("SEDNA_SAVE_HARD_EXAMPLES", "true")
        .spawn()
        .unwrap();
    let results = output.join("results.jsonl");
    let answered = |v: &serde_json::Value| v.get("late").is_none() && v.get("error").is_none();
    wait_for("the first 100 results", Duration::from_secs(60), || {
        lines(&results).iter().filter(|v| answered(v)).count() >= 100
    });

    // The cloud goes away: the edge keeps answering, hard examples are queued.
    cloud.stop();
    feed(&inputs, &digits, 100..200);
    wait_for(
        "results while the cloud is down",
        Duration::from_secs(60),
        || lines(&results).iter().filter(|v| answered(v)).count() >= 200,
    );
    let queued_while_down: Vec<String> = lines(&results)
        .iter()
        .filter(|v| v["queued"] == true)
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !queued_while_down.is_empty(),
        "some hard examples were queued"
    );

    // The cloud comes back on the same address; the rest of the stream arrives.
    let (cloud, _) = Cloud::start(address, cloud_model);
    feed(&inputs, &digits, 200..300);
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the worker did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    cloud.stop();

    let all = lines(&results);
    let first: Vec<&serde_json::Value> = all.iter().filter(|v| answered(v)).collect();
    let ids: HashSet<&str> = first.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(first.len(), 300, "one result per input");
    assert_eq!(ids.len(), 300, "no input answered twice");
    let late: HashMap<&str, &serde_json::Value> = all
        .iter()
        .filter(|v| v.get("late").is_some())
        .map(|v| (v["id"].as_str().unwrap(), v))
        .collect();
    let mut correct = 0;
    for v in &first {
        let id = v["id"].as_str().unwrap();
        let index: usize = id.trim_end_matches(".pgm").parse().unwrap();
        let mut label = v["label"].as_i64().unwrap();
        if v["is_hard"] == true {
            if v["queued"] == true {
                let answer = late
                    .get(id)
                    .unwrap_or_else(|| panic!("{id} was queued and never answered"));
                assert_eq!(answer["source"], "cloud");
                label = answer["label"].as_i64().unwrap();
            } else {
                assert_eq!(v["source"], "cloud", "{v}");
                assert!(v["cloud_label"].is_i64());
            }
        } else {
            assert_eq!(v["source"], "edge");
        }
        if label == digits[index].1 {
            correct += 1;
        }
    }
    assert_eq!(
        late.len(),
        first.iter().filter(|v| v["queued"] == true).count()
    );
    assert!(correct >= 270, "joint accuracy {correct}/300");

    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("figures.json")).unwrap())
            .unwrap();
    let hard = first.iter().filter(|v| v["is_hard"] == true).count() as u64;
    assert_eq!(figures["inferences"], 300);
    assert_eq!(figures["hardExamples"].as_u64().unwrap(), hard);
    assert_eq!(
        figures["cloudAnswers"].as_u64().unwrap(),
        hard,
        "every hard example answered"
    );
    assert_eq!(figures["queued"], 0);
    assert!(figures["uplinkBytes"].as_u64().unwrap() >= hard * 784 * 4);
    // Every hard example's image was kept, byte for byte.
    let kept: Vec<PathBuf> = std::fs::read_dir(output.join("hard-examples"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(kept.len() as u64, hard);
    let one = first.iter().find(|v| v["is_hard"] == true).unwrap();
    let id = one["id"].as_str().unwrap();
    let index: usize = id.trim_end_matches(".pgm").parse().unwrap();
    let saved = std::fs::read(output.join("hard-examples").join(id)).unwrap();
    assert_eq!(&saved[saved.len() - 784..], digits[index].0.as_slice());
}

#[test]
fn a_sample_the_cloud_refuses_gets_an_error_line_the_worker_goes_on_and_its_figures_survive_a_restart()
 {
    let digits = digits();
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs");
    let output = dir.path().join("output");
    std::fs::create_dir_all(&inputs).unwrap();
    // A cloud model that takes images (N, 1, 28, 28), not the edge's flat 784 values: the
    // cloud refuses every hard example.
    let cloud_model = one_thread_model("models/mnist/cnn/init.onnx");
    let (cloud, address) = Cloud::start("127.0.0.1:0".parse().unwrap(), cloud_model);
    feed(&inputs, &digits, 0..60);
    let run = |exit_after: usize| {
        worker(dir.path(), &inputs, &output, address, exit_after)
            .status()
            .unwrap()
    };
    let status = run(60);
    let inferences = || {
        let figures: serde_json::Value =
            serde_json::from_slice(&std::fs::read(output.join("figures.json")).unwrap()).unwrap();
        figures["inferences"].as_u64().unwrap()
    };
    assert_eq!(inferences(), 60);
    // Restarted on 30 new digits: its figures go on from where they were.
    feed(&inputs, &digits, 60..90);
    assert!(
        run(90).success(),
        "SEDNA_EXIT_AFTER counts every answer, before the restart too"
    );
    assert_eq!(inferences(), 90, "figures are cumulative across restarts");
    cloud.stop();
    assert!(status.success(), "the worker ended with {status}");
    let results = lines(&output.join("results.jsonl"));
    assert_eq!(results.len(), 90, "every sample has a line");
    let refused: Vec<&serde_json::Value> = results
        .iter()
        .filter(|v| v.get("error").is_some())
        .collect();
    assert!(!refused.is_empty(), "some hard examples went to the cloud");
    assert!(
        refused
            .iter()
            .all(|v| v["error"].as_str().unwrap().contains("cloud refused")),
        "{refused:?}"
    );
    assert!(
        results.iter().any(|v| v.get("label").is_some()),
        "easy samples were answered at the edge"
    );
}
