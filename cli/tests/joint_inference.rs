//! Joint inference end to end, as a user runs it: `sedna up`, then `kubectl apply` of two
//! Models and a JointInferenceService; the global manager starts the cloud and edge workers;
//! the edge worker reads real MNIST digits (PGM files) from a directory, sends the hard ones to
//! the cloud worker through its node's tunnel to the hub, and its figures reach the service's status through the node. Deleting
//! the service removes both workers; invalid services are reported with a clear message.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

mod support;
use support::{root, up, wait_until};

fn write_digits(dir: &Path, count: usize) -> Vec<i64> {
    let images = std::fs::read(root().join("models/mnist/test-images.idx3-ubyte")).unwrap();
    let labels = std::fs::read(root().join("models/mnist/test-labels.idx1-ubyte")).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for (i, pixels) in images[16..].chunks_exact(784).take(count).enumerate() {
        let mut pgm = b"P5\n28 28\n255\n".to_vec();
        pgm.extend_from_slice(pixels);
        std::fs::write(dir.join(format!("{i:04}.pgm")), pgm).unwrap();
    }
    labels[8..8 + count].iter().map(|l| i64::from(*l)).collect()
}

fn manifest(name: &str, hem: &str, edge_model: &str, inputs: &Path) -> String {
    let models = root().join("models/mnist");
    format!(
        r#"apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{name: mnist-edge}}
spec: {{url: "{edge}", format: onnx}}
---
apiVersion: sedna.io/v1alpha1
kind: Model
metadata: {{name: mnist-cloud}}
spec: {{url: "{cloud}", format: onnx}}
---
apiVersion: sedna.io/v1alpha1
kind: JointInferenceService
metadata: {{name: {name}}}
spec:
  edgeWorker:
    model: {{name: {edge_model}}}
    hardExampleMining:
      name: {hem}
      parameters: [{{key: threshold_cross_entropy, value: "0.67"}}]
    template:
      spec:
        nodeName: edge-1
        containers:
          - name: edge
            image: sedna-edge-worker
            env: [{{name: SEDNA_INPUT, value: "dir:{inputs}"}}, {{name: SEDNA_REPORT_INTERVAL_MS, value: "300"}}]
  cloudWorker:
    model: {{name: mnist-cloud}}
    template:
      spec:
        nodeSelector: {{node-role.sedna.io/cloud: ""}}
        containers: [{{name: cloud, image: sedna-cloud-worker}}]
"#,
        edge = models.join("edge/model.onnx").display(),
        cloud = models.join("cloud/model.onnx").display(),
        inputs = inputs.display(),
    )
}

#[test]
fn a_joint_inference_service_applied_with_kubectl_answers_every_input_and_reports_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_up, kubectl) = up(&data, 1);

    let inputs = dir.path().join("camera");
    let labels = write_digits(&inputs, 200);
    kubectl.apply(&manifest("digits", "CrossEntropy", "mnist-edge", &inputs));

    let jsonpath = |field: &str| {
        String::from_utf8_lossy(
            &kubectl
                .run(&[
                    "get",
                    "ji",
                    "digits",
                    "-o",
                    &format!("jsonpath={{.status.{field}}}"),
                ])
                .stdout,
        )
        .into_owned()
    };
    wait_until(
        "all 200 inputs reported in the status",
        Duration::from_secs(120),
        || {
            // Every input answered and no hard example still waiting for the cloud.
            let waiting = jsonpath("metrics[?(@.key==\"queued\")].value");
            (jsonpath("inferences") == "200" && waiting == "0").then(String::new)
        },
    );
    assert_eq!(jsonpath("phase"), "Running");
    assert_eq!(jsonpath("active"), "2");
    let table = kubectl.ok(&["get", "ji", "digits"]);
    assert!(
        table.contains("INFERENCES") && table.contains("UPLOADED"),
        "{table}"
    );

    // The results the edge worker wrote on its node.
    let pods = data.join("nodes/edge-1/pods");
    let pod_dir = std::fs::read_dir(&pods)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("default_digits-edge_")
        })
        .expect("the edge worker's pod directory");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(pod_dir.join("output/results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    // One result per input; a hard example queued while the cloud worker was still starting
    // gets its cloud answer later, on a line of its own.
    let results: Vec<&serde_json::Value> =
        lines.iter().filter(|r| r.get("late").is_none()).collect();
    let late: std::collections::HashMap<&str, &serde_json::Value> = lines
        .iter()
        .filter(|r| r.get("late").is_some())
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(results.len(), 200, "one result per input");
    let hard: Vec<&serde_json::Value> = results
        .iter()
        .copied()
        .filter(|r| r["is_hard"] == true)
        .collect();
    assert!(!hard.is_empty());
    for r in &hard {
        if r["queued"] == true {
            let answer = late
                .get(r["id"].as_str().unwrap())
                .expect("a queued hard example is answered later");
            assert_eq!(answer["source"], "cloud");
        } else {
            assert_eq!(
                r["source"], "cloud",
                "a hard example carries the cloud's result: {r}"
            );
            assert!(r["cloud_label"].is_i64());
        }
    }
    let correct = results
        .iter()
        .filter(|r| {
            let id = r["id"].as_str().unwrap();
            let i: usize = id.trim_end_matches(".pgm").parse().unwrap();
            let label = late.get(id).map_or(&r["label"], |answer| &answer["label"]);
            label.as_i64() == Some(labels[i])
        })
        .count();
    assert!(correct >= 180, "joint accuracy {correct}/200");
    // The status figures are the worker's counts.
    assert_eq!(jsonpath("hardExamples"), hard.len().to_string());
    let metrics = kubectl.ok(&["get", "ji", "digits", "-o", "jsonpath={.status.metrics}"]);
    let metrics: Vec<serde_json::Value> = serde_json::from_str(&metrics).unwrap();
    let metric = |key: &str| {
        metrics
            .iter()
            .find(|m| m["key"] == key)
            .map(|m| m["value"].as_str().unwrap().to_string())
    };
    assert_eq!(metric("inferences").as_deref(), Some("200"));
    assert_eq!(
        metric("cloudPath").as_deref(),
        Some("tunnel"),
        "the edge reached the cloud worker through the hub"
    );
    assert_eq!(metric("cloudAnswers"), Some(hard.len().to_string()));
    assert!(metric("uplinkBytes").unwrap().parse::<u64>().unwrap() >= hard.len() as u64 * 3136);
    let events = kubectl.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=digits",
    ]);
    assert!(
        events.contains("CreatedWorker") && events.contains("Running"),
        "{events}"
    );

    // The node's local controller counts the samples of a Dataset placed on it.
    kubectl.apply(&format!(
        "apiVersion: sedna.io/v1alpha1\nkind: Dataset\nmetadata: {{name: camera-digits}}\nspec: {{url: \"{}\", format: dir, nodeName: edge-1}}\n",
        inputs.display()
    ));
    wait_until(
        "the dataset's samples counted",
        Duration::from_secs(30),
        || {
            let out = kubectl.run(&[
                "get",
                "dataset",
                "camera-digits",
                "-o",
                "jsonpath={.status.numberOfSamples}",
            ]);
            (String::from_utf8_lossy(&out.stdout) == "200").then(String::new)
        },
    );

    // Tunnels are node-scoped: a node that runs no edge worker of the service is refused.
    kubectl.ok(&[
        "run",
        "probe",
        "--image=sh",
        "--restart=Never",
        "--overrides",
        r#"{"spec":{"nodeName":"cloud"}}"#,
        "--",
        "-c",
        "echo $SEDNA_CLOUD_PROXY",
    ]);
    let cloud_proxy = wait_until(
        "the cloud node's proxy address",
        Duration::from_secs(30),
        || {
            let pods = data.join("nodes/cloud/pods");
            let dir = std::fs::read_dir(&pods)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("default_probe_")
                })?;
            let text = std::fs::read_to_string(dir.join("logs/probe.log")).ok()?;
            let line = text.trim().to_string();
            (!line.is_empty()).then_some(line)
        },
    );
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&cloud_proxy).unwrap();
        s.write_all(b"CONNECT default/digits-edge/cloud HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        assert!(
            answer.contains("node cloud runs no pod default/digits-edge"),
            "{answer}"
        );
    }

    // Invalid services are reported, naming the problem.
    kubectl.apply(
        manifest("magic", "Magic", "mnist-edge", &inputs)
            .split("---")
            .nth(2)
            .unwrap(),
    );
    let message = wait_until("the unknown HEM reported", Duration::from_secs(30), || {
        let out = kubectl.run(&[
            "get",
            "ji",
            "magic",
            "-o",
            "jsonpath={.status.conditions[0].message}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (!text.is_empty()).then_some(text)
    });
    assert!(
        message.contains("hard-example mining \"Magic\""),
        "{message}"
    );
    kubectl.apply(
        manifest("orphan", "CrossEntropy", "no-such-model", &inputs)
            .split("---")
            .nth(2)
            .unwrap(),
    );
    let message = wait_until(
        "the missing model reported",
        Duration::from_secs(30),
        || {
            let out = kubectl.run(&[
                "get",
                "ji",
                "orphan",
                "-o",
                "jsonpath={.status.conditions[0].message}",
            ]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (!text.is_empty()).then_some(text)
        },
    );
    assert!(
        message.contains("Model \"no-such-model\" not found"),
        "{message}"
    );
    assert_eq!(
        String::from_utf8_lossy(
            &kubectl
                .run(&["get", "ji", "orphan", "-o", "jsonpath={.status.phase}"])
                .stdout
        ),
        "Failed"
    );

    // Deleting the service removes both workers.
    kubectl.ok(&["delete", "ji", "digits"]);
    wait_until("the workers gone", Duration::from_secs(60), || {
        let out = kubectl.ok(&["get", "pods", "--no-headers"]);
        (!out.contains("digits-")).then_some(out)
    });
}
