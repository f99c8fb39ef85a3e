//! `sedna train` as a user runs it: trains the MNIST CNN from its initialized file on real
//! digits, prints the metrics, writes a model ONNX Runtime's consumers can load; a bad model,
//! data that does not fit, or an unknown hyperparameter is a clear error and writes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sedna"))
        .arg("train")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn train_writes_a_trained_model_and_prints_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cnn.onnx");
    let mnist = root().join("models/mnist");
    // 60 steps on the train split, the held-out split evaluated (quick, not a benchmark).
    let output = train(&[
        "--model",
        mnist.join("cnn/init.onnx").to_str().unwrap(),
        "--data",
        mnist.join("train-images.idx3-ubyte.gz").to_str().unwrap(),
        "--test",
        mnist.join("test-images.idx3-ubyte").to_str().unwrap(),
        "--epochs",
        "1",
        "--param",
        "max_steps=60",
        "--param",
        "optimizer=sgd",
        "--param",
        "momentum=0.9",
        "--lr",
        "0.05",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("epoch   1: train loss"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["steps"], 60);
    assert_eq!(report["evaluated_on"], "held-out");
    let accuracy = report["metrics"]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.8, "after 60 steps: {accuracy}");
    assert_eq!(report["metrics"]["samples"], 2000.0);
    assert_eq!(report["model"].as_str(), out.to_str());
    let written = std::fs::read(&out).unwrap();
    let original = std::fs::read(mnist.join("cnn/init.onnx")).unwrap();
    assert_eq!(written.len(), original.len());
    assert_ne!(written, original);
}

#[test]
fn bad_models_data_and_hyperparameters_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.onnx");
    let mnist = root().join("models/mnist");
    let model = mnist.join("mlp/init.onnx");
    let images = mnist.join("test-images.idx3-ubyte");
    let digits = root().join("models/digits/test.csv");
    let manifest = mnist.join("cnn/MANIFEST.md");
    let edge = mnist.join("edge/model.onnx");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec![
                "--model",
                manifest.to_str().unwrap(),
                "--data",
                images.to_str().unwrap(),
            ],
            "not an ONNX model",
        ),
        (
            vec![
                "--model",
                model.to_str().unwrap(),
                "--data",
                digits.to_str().unwrap(),
            ],
            "the samples have 64 values but the model's input `input` takes [N, 784]",
        ),
        (
            vec![
                "--model",
                model.to_str().unwrap(),
                "--data",
                images.to_str().unwrap(),
                "--param",
                "learnig_rate=0.1",
            ],
            "hyperparameter `learnig_rate`: unknown hyperparameter (known: epochs,",
        ),
        (
            vec![
                "--model",
                edge.to_str().unwrap(),
                "--data",
                images.to_str().unwrap(),
            ],
            "operator ai.onnx.ml.LinearClassifier",
        ),
    ];
    for (args, why) in cases {
        let mut args = args;
        args.extend(["--out", out.to_str().unwrap()]);
        let output = train(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}
