//! Federated learning end to end, as a user runs it: `sedna up` with three edge nodes, then
//! `kubectl apply` of `examples/federated-learning/mnist-digits.yaml` (each edge holds one
//! non-IID shard of the MNIST train split). The global manager starts the aggregation worker
//! on the cloud node and a training worker on each shard's node; the trainers reach the
//! aggregator through their nodes' tunnels to the hub; every round is reported in the job's
//! status; the job succeeds; the final model is written to the job's Model, with its
//! accuracy; only weights and sample counts crossed the network; deleting the job removes its
//! workers. A job whose minClients exceeds its workers is refused with a clear message.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

mod support;
use support::{root, up, wait_until};

#[test]
fn a_federated_learning_job_applied_with_kubectl_trains_across_three_edges_and_lands_in_its_model()
{
    let dir = tempfile::tempdir().unwrap();
    let (_up, kubectl) = up(&dir.path().join("data"), 3);
    let output = dir.path().join("output");
    let manifest =
        std::fs::read_to_string(root().join("examples/federated-learning/mnist-digits.yaml"))
            .unwrap()
            .replace("/opt/sedna-output", output.to_str().unwrap())
            .replace("/opt/sedna", root().to_str().unwrap())
            .replace("rounds: 5", "rounds: 3");
    kubectl.apply(&manifest);

    let field = |field: &str| {
        String::from_utf8_lossy(
            &kubectl
                .run(&[
                    "get",
                    "fl",
                    "digits",
                    "-o",
                    &format!("jsonpath={{.status.{field}}}"),
                ])
                .stdout,
        )
        .into_owned()
    };
    let phase = wait_until("the job to finish", Duration::from_secs(300), || {
        let phase = field("phase");
        matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
    });
    assert_eq!(phase, "Succeeded", "conditions: {}", field("conditions"));
    assert_eq!(field("round"), "3");
    // Every round is in the status, with its figures.
    let history: Vec<serde_json::Value> = serde_json::from_str(&field("rounds")).unwrap();
    assert_eq!(
        history
            .iter()
            .map(|r| r["round"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3],
        "{history:?}"
    );
    for r in &history {
        assert_eq!(r["clients"], 3, "{r}");
        assert!(r["testAccuracy"].as_f64().unwrap() > 0.5, "{r}");
        assert!(r["trainLoss"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["bytesUp"].as_i64().unwrap() > 3 * 45_000, "{r}");
    }
    let metric = |key: &str| field(&format!("metrics[?(@.key==\"{key}\")].value"));
    let accuracy: f64 = metric("test_accuracy").parse().unwrap();
    assert!(
        accuracy > 0.88,
        "held-out accuracy after 3 rounds: {accuracy}"
    );
    // The final report keeps the last round's traffic (it once went to 0).
    let bytes_up: i64 = metric("bytesUp").parse().unwrap();
    assert!(bytes_up > 3 * 45_000, "bytesUp {bytes_up}");
    assert_eq!(
        metric("model"),
        format!("file://{}/federated/digits-cnn.onnx", output.display())
    );
    assert!(field("completionTime").len() > 10);

    // The final model: written to the Model's URL, the same graph as the starting one.
    let trained = std::fs::read(output.join("federated/digits-cnn.onnx")).unwrap();
    let start = std::fs::read(root().join("models/mnist/cnn/init.onnx")).unwrap();
    assert_eq!(trained.len(), start.len());
    assert_ne!(trained, start);
    let model_accuracy = String::from_utf8_lossy(
        &kubectl
            .run(&[
                "get",
                "model",
                "digits-federated",
                "-o",
                "jsonpath={.status.metrics[?(@.key==\"accuracy\")].value}",
            ])
            .stdout,
    )
    .into_owned();
    assert_eq!(model_accuracy.parse::<f64>().unwrap(), accuracy);

    // What the aggregator received per round: three updates of weights (45 KB each for the
    // CNN), not the 6.3 MB of training images.
    let data = dir.path().join("data/nodes/cloud/pods");
    let aggregator = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("default_digits-aggregator_")
        })
        .unwrap()
        .path();
    let rounds = std::fs::read_to_string(aggregator.join("output/rounds.jsonl"))
        .or_else(|_| {
            // The worker's output directory is relative to its working directory.
            walk(&aggregator)
                .into_iter()
                .find(|p| p.ends_with("rounds.jsonl"))
                .map(std::fs::read_to_string)
                .unwrap()
        })
        .unwrap();
    let rounds: Vec<serde_json::Value> = rounds
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds.len(), 3);
    for r in &rounds {
        assert_eq!(r["participants"].as_array().unwrap().len(), 3, "{r}");
        assert!(r["bytesUp"].as_u64().unwrap() < 3 * 46_000, "{r}");
    }
    // Every trainer went through its node's tunnel (no route to the cloud was needed).
    for k in 0..3 {
        let env = kubectl.ok(&[
            "get",
            "pod",
            &format!("digits-train-{k}"),
            "-o",
            "jsonpath={.spec.containers[0].env[?(@.name==\"SEDNA_AGG_TUNNEL\")].value}",
        ]);
        assert_eq!(env, format!("default/digits-train-{k}/aggregator"));
        let node = kubectl.ok(&[
            "get",
            "pod",
            &format!("digits-train-{k}"),
            "-o",
            "jsonpath={.spec.nodeName}",
        ]);
        assert_eq!(node, format!("edge-{}", k + 1));
    }
    let events = kubectl.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=digits",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(
        events.contains("CreatedWorker") && events.contains("Succeeded"),
        "{events}"
    );

    // Deleting the job removes its workers.
    kubectl.ok(&["delete", "fl", "digits"]);
    wait_until("the workers to go", Duration::from_secs(60), || {
        let out = kubectl.ok(&[
            "get",
            "pods",
            "-l",
            "sedna.io/federated-learning-job=digits",
            "--no-headers",
        ]);
        out.trim().is_empty().then_some(())
    });

    // minClients above the number of workers: refused with the reason.
    let bad = manifest
        .replace("  rounds: 3\n", "  rounds: 3\n  minClients: 4\n")
        .replace("  name: digits\nspec:", "  name: too-many\nspec:");
    assert!(bad.contains("name: too-many") && bad.contains("minClients: 4"));
    kubectl.apply(&bad);
    let message = wait_until("the refusal", Duration::from_secs(30), || {
        let out = kubectl.run(&[
            "get",
            "fl",
            "too-many",
            "-o",
            "jsonpath={.status.conditions[0].message}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (!text.is_empty()).then_some(text)
    });
    assert_eq!(message, "minClients 4 is more than the 3 training workers");
    assert_eq!(
        String::from_utf8_lossy(
            &kubectl
                .run(&["get", "fl", "too-many", "-o", "jsonpath={.status.phase}"])
                .stdout
        ),
        "Failed"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
