//! Incremental learning end to end, as a user runs it: `sedna up` with one edge node, then
//! `kubectl apply` of `examples/incremental-learning/mnist-digits.yaml`. The MNIST model
//! serves shifted digits on edge-1; the hard examples it keeps are labelled into the
//! Dataset; edge-1's trigger starts round 1; the cloud trains, evaluates and deploys; the
//! inference worker reloads the new model in place (its reported model version goes up).
//! A candidate that does not pass the deploy condition is recorded and not deployed; the
//! train-request annotation starts a round; new samples start the next round.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

mod support;
use support::{Kubectl, root, up, wait_until};

fn python() -> std::path::PathBuf {
    root().join(".venv/bin/python")
}

fn stream(args: &[&str]) {
    let status = std::process::Command::new(python())
        .arg(root().join("examples/incremental-learning/edge_stream.py"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "edge_stream.py {args:?}");
}

fn status(kubectl: &Kubectl) -> serde_json::Value {
    let out = kubectl.run(&["get", "il", "digits", "-o", "jsonpath={.status}"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn label(data: &Path) {
    stream(&[
        "label",
        "--hard-examples",
        data.join("hard-examples").to_str().unwrap(),
        "--index",
        data.join("index.txt").to_str().unwrap(),
    ]);
}

/// Waits until round `round` has ended (it is in `status.rounds`); returns its record.
fn round_ended(kubectl: &Kubectl, round: i64, what: &str) -> serde_json::Value {
    wait_until(what, Duration::from_secs(240), || {
        let s = status(kubectl);
        s["rounds"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["round"] == round).cloned())
    })
}

#[test]
fn an_incremental_learning_job_retrains_on_edge_samples_deploys_only_better_models_and_hot_reloads()
{
    if !python().exists() {
        panic!("the Python environment is missing (scripts/setup creates .venv)");
    }
    let dir = tempfile::tempdir().unwrap();
    let (_up, kubectl) = up(&dir.path().join("cluster"), 1);
    let output = dir.path().join("output");
    let manifest =
        std::fs::read_to_string(root().join("examples/incremental-learning/mnist-digits.yaml"))
            .unwrap()
            .replace("/opt/sedna-output", output.to_str().unwrap())
            .replace("/opt/sedna", root().to_str().unwrap())
            .replace("checkPeriodSeconds: 5", "checkPeriodSeconds: 1")
            .replace("threshold: 200", "threshold: 100");
    kubectl.apply(&manifest);
    let data = output.join("incremental/data");
    let feed = output.join("incremental/stream");

    // The inference worker serves the initial model on edge-1.
    let first = wait_until("the inference worker", Duration::from_secs(120), || {
        let s = status(&kubectl);
        (s["phase"] == "Running" && s["inference"]["modelVersion"] == 1).then_some(s)
    });
    assert_eq!(first["stage"], "Train");
    assert_eq!(first["stageState"], "Waiting");
    assert_eq!(
        kubectl.ok(&[
            "get",
            "pod",
            "digits-infer",
            "-o",
            "jsonpath={.spec.nodeName}"
        ]),
        "edge-1"
    );

    // 600 shifted digits arrive; the unsure ones are kept and labelled; the trigger fires.
    stream(&[
        "feed",
        "--start",
        "0",
        "--count",
        "600",
        "--to",
        feed.to_str().unwrap(),
    ]);
    wait_until("600 answers", Duration::from_secs(120), || {
        (status(&kubectl)["inference"]["inferences"].as_i64() >= Some(600)).then_some(())
    });
    label(&data);
    let round1 = round_ended(&kubectl, 1, "round 1");
    assert_eq!(round1["startedBy"], "trigger", "{round1}");
    assert_eq!(round1["deployed"], true, "{round1}");
    let (new, old) = (&round1["candidateMetrics"], &round1["deployedMetrics"]);
    let gain =
        new["shifted_accuracy"].as_f64().unwrap() - old["shifted_accuracy"].as_f64().unwrap();
    assert!(
        gain > 0.10,
        "shifted held-out accuracy gained {gain}: {round1}"
    );
    let loss =
        old["original_accuracy"].as_f64().unwrap() - new["original_accuracy"].as_f64().unwrap();
    assert!(
        loss < 0.02,
        "original held-out accuracy lost {loss}: {round1}"
    );
    // The edge serves the new model, reloaded in place (same pod, version 2).
    let s = wait_until(
        "the edge to serve round 1's model",
        Duration::from_secs(60),
        || {
            let s = status(&kubectl);
            (s["inference"]["modelVersion"] == 2).then_some(s)
        },
    );
    let candidate = round1["candidateUrl"].as_str().unwrap().to_string();
    assert_eq!(s["inference"]["modelUrl"], candidate.as_str());
    assert_eq!(s["deployed"]["url"], candidate.as_str());
    assert!(
        output
            .join("incremental/models/round-1/model.onnx")
            .exists()
    );
    assert_eq!(
        kubectl.ok(&[
            "get",
            "model",
            "digits-deployed",
            "-o",
            "jsonpath={.spec.url}"
        ]),
        candidate
    );
    assert_eq!(
        kubectl.ok(&[
            "get",
            "pod",
            "digits-infer",
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}"
        ]),
        "0",
        "hot reload, not a restart"
    );

    // A deploy condition the candidate cannot meet, and a train request: round 2 runs and
    // its model is recorded, not deployed.
    kubectl.ok(&[
        "patch", "il", "digits", "--type", "merge", "-p",
        r#"{"spec":{"deploySpec":{"trigger":{"condition":{"operator":"gt","threshold":1,"metric":"accuracy_delta[0]"}}}}}"#,
    ]);
    kubectl.ok(&[
        "annotate",
        "--overwrite",
        "il/digits",
        "sedna.io/train-request=one",
    ]);
    let round2 = round_ended(&kubectl, 2, "round 2");
    assert_eq!(round2["startedBy"], "request", "{round2}");
    assert_eq!(round2["deployed"], false, "{round2}");
    assert!(
        round2["reason"].as_str().unwrap().contains("does not hold"),
        "{round2}"
    );
    let s = status(&kubectl);
    assert_eq!(s["deployed"]["round"], 1);
    assert_eq!(s["inference"]["modelVersion"], 2);
    assert_eq!(s["lastTrainRequest"], "one");

    // The rest of the stream: new hard examples, labelled, start round 3 by the trigger.
    kubectl.ok(&[
        "patch", "il", "digits", "--type", "merge", "-p",
        r#"{"spec":{"deploySpec":{"trigger":{"condition":{"operator":">=","threshold":-1,"metric":"accuracy_delta"}}}}}"#,
    ]);
    stream(&[
        "feed",
        "--start",
        "600",
        "--count",
        "697",
        "--to",
        feed.to_str().unwrap(),
    ]);
    wait_until("1297 answers", Duration::from_secs(120), || {
        (status(&kubectl)["inference"]["inferences"].as_i64() >= Some(1297)).then_some(())
    });
    label(&data);
    let round3 = round_ended(&kubectl, 3, "round 3");
    assert_eq!(round3["startedBy"], "trigger", "{round3}");
    assert!(
        round3["samples"].as_i64().unwrap() >= round1["samples"].as_i64().unwrap() + 100,
        "round 3 counts the new samples: {round3} after {round1}"
    );
    assert_eq!(round3["deployed"], true, "{round3}");
    wait_until(
        "the edge to serve round 3's model",
        Duration::from_secs(60),
        || (status(&kubectl)["inference"]["modelVersion"] == 3).then_some(()),
    );
    eprintln!(
        "rounds: {}",
        serde_json::to_string_pretty(&status(&kubectl)["rounds"]).unwrap()
    );
    let events = kubectl.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=digits",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    for reason in ["RoundStarted", "Deployed", "NotDeployed", "CreatedWorker"] {
        assert!(events.contains(reason), "{reason} in {events}");
    }
}
