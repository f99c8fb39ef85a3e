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
            .replace("threshold: 150", "threshold: 100");
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

/// The node holding the Dataset evaluates the train trigger itself: with the hub down it keeps
/// counting and fires into its outbox; after the hub returns, the report reaches the API and
/// the global manager starts the round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_edge_trigger_fires_while_the_hub_is_down_and_the_round_starts_after_reconnection() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, PostParams};
    use sedna_api::incremental_learning::IncrementalLearningJob;
    use support::{Procs, client, edge, eventually, free_port, hub, join, sedna, token};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let api_port = free_port();
    let hub_port = free_port();
    let mut procs = Procs(vec![]);
    procs.0.push(
        sedna(&["apiserver", "--metrics-addr", "off", "--data-dir"])
            .arg(d.join("api"))
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .spawn()
            .unwrap(),
    );
    let kubeconfig = d.join("api/kubeconfig");
    let kube = client(&kubeconfig).await;
    let crds: Api<CustomResourceDefinition> = Api::all(kube.clone());
    for crd in sedna_api::crds() {
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    procs.0.push(hub(d, &kubeconfig, hub_port));
    let cloud = format!("127.0.0.1:{hub_port}");
    let node = d.join("edge-1");
    join(&node, &cloud, &token(&kubeconfig, "edge-1"), "edge-1");
    procs.0.push(edge(&node, &cloud));
    // The global manager, in this process.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gm = tokio::spawn(sedna_controllers::run(kube.clone(), async {
        let _ = stopped.await;
    }));

    // The Dataset on edge-1: 5 labelled samples so far; the trigger wants 10.
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let index = data.join("index.txt");
    let lines = |from: usize, to: usize| -> String {
        (from..to)
            .map(|i| format!("s-{i}.pgm {}\n", i % 10))
            .collect()
    };
    std::fs::write(&index, lines(0, 5)).unwrap();
    let yaml = format!(
        "apiVersion: sedna.io/v1alpha1\nkind: Dataset\nmetadata: {{name: samples, namespace: default}}\n\
         spec: {{url: {index}, format: txt, nodeName: edge-1}}\n---\n\
         apiVersion: sedna.io/v1alpha1\nkind: Model\nmetadata: {{name: m, namespace: default}}\n\
         spec: {{url: /models/m.onnx, format: onnx}}\n---\n\
         apiVersion: sedna.io/v1alpha1\nkind: IncrementalLearningJob\nmetadata: {{name: digits, namespace: default}}\n\
         spec:\n  initialModel: {{name: m}}\n  dataset: {{name: samples, trainProb: 0.8}}\n  outputDir: {out}\n\
         \x20 trainSpec:\n    template: {{spec: {{nodeName: edge-1, containers: [{{name: t, image: sedna-cloud-worker}}]}}}}\n\
         \x20   trigger: {{checkPeriodSeconds: 1, condition: {{operator: ge, threshold: 10, metric: num_of_samples}}}}\n\
         \x20 evalSpec:\n    template: {{spec: {{nodeName: edge-1, containers: [{{name: e, image: sedna-cloud-worker}}]}}}}\n\
         \x20 deploySpec:\n    model: {{name: m}}\n    trigger: {{condition: {{operator: gt, threshold: 0, metric: accuracy_delta}}}}\n\
         \x20   hardExampleMining: {{name: Threshold}}\n\
         \x20   template: {{spec: {{nodeName: edge-1, containers: [{{name: i, image: sedna-edge-worker}}]}}}}\n",
        index = index.display(),
        out = d.join("out").display(),
    );
    for doc in sedna_api::yaml_documents(&yaml).unwrap() {
        let gvk =
            kube::api::GroupVersionKind::gvk("sedna.io", "v1alpha1", doc["kind"].as_str().unwrap());
        let plural = format!("{}s", doc["kind"].as_str().unwrap().to_ascii_lowercase());
        let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, &plural);
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(kube.clone(), "default", &resource);
        api.create(
            &PostParams::default(),
            &serde_json::from_value(doc).unwrap(),
        )
        .await
        .unwrap();
    }
    let jobs: Api<IncrementalLearningJob> = Api::namespaced(kube.clone(), "default");
    let store_path = node.join("edge.db");
    let holds_job = || {
        sedna_edgecore::store::EdgeStore::open(&store_path, 1000, 1 << 20)
            .ok()
            .and_then(|s| {
                s.get("IncrementalLearningJob", "default", "digits")
                    .ok()
                    .flatten()
            })
            .is_some()
    };
    eventually("edge-1 to hold the job", holds_job).await;
    // Waiting, and nothing fired: 5 samples are not 10.
    let waiting = |j: &IncrementalLearningJob| {
        j.status.as_ref().is_some_and(|s| {
            s.stage_state == Some(sedna_api::incremental_learning::StageState::Waiting)
        })
    };
    for _ in 0..100 {
        if waiting(&jobs.get("digits").await.unwrap()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        jobs.get("digits")
            .await
            .unwrap()
            .status
            .unwrap()
            .train_trigger
            .is_none()
    );

    // The hub goes down; 10 more samples arrive on edge-1.
    let mut hub_proc = procs.0.remove(1);
    hub_proc.kill().unwrap();
    hub_proc.wait().unwrap();
    std::fs::write(&index, lines(0, 15)).unwrap();
    let outbox_holds_the_trigger = || {
        sedna_edgecore::store::EdgeStore::open(&store_path, 1000, 1 << 20)
            .ok()
            .and_then(|s| s.outbox_len().ok())
            .is_some_and(|n| n > 0)
    };
    eventually(
        "the trigger to fire into edge-1's outbox",
        outbox_holds_the_trigger,
    )
    .await;
    let status = jobs.get("digits").await.unwrap().status.unwrap();
    assert!(
        status.train_trigger.is_none() && status.round == 0,
        "the cloud cannot know yet"
    );

    // The hub returns: the report arrives and round 1 starts, by the trigger.
    procs.0.insert(1, hub(d, &kubeconfig, hub_port));
    let mut started = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while started.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "round 1 did not start"
        );
        if let Ok(job) = jobs.get("digits").await {
            started = job.status.filter(|s| s.round == 1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = started.unwrap();
    let trigger = status.train_trigger.unwrap();
    // Before the first round every sample is new.
    assert_eq!(
        (trigger.round, trigger.samples, trigger.new_samples),
        (1, 15, 15)
    );
    assert_eq!(status.last_round_samples, 15);
    let current = status.current.unwrap();
    assert_eq!(current.started_by, "trigger");
    assert!(
        current.triggered.unwrap().0 <= current.started.unwrap().0,
        "fired (offline, above) before the round started"
    );
    let _ = stop.send(());
    let _ = gm.await;
}
