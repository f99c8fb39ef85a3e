//! Operators' everyday Kubernetes on edge nodes, with the real kubectl: Deployments placed by
//! the scheduler on the nodes they select, scaled, rolled and rolled back; cordoned nodes
//! skipped with the reason; a DaemonSet on every matching node, including one that joins
//! later; Jobs that complete or fail; pods evicted; the field selector operators use.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::Value;

mod support;
use support::{Kubectl, Procs, free_port, up_with, wait_until};

/// The pods matching a label selector, as JSON.
fn pods(kubectl: &Kubectl, selector: &str) -> Vec<Value> {
    let out = kubectl.ok(&["get", "pods", "-l", selector, "-o", "json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

fn running(pods: &[Value]) -> Vec<(String, String)> {
    pods.iter()
        .filter(|p| {
            p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
        })
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

/// Waits until exactly `n` pods of `selector` run, each on a node `on` accepts.
fn wait_running(
    kubectl: &Kubectl,
    selector: &str,
    n: usize,
    on: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let mut last = Vec::new();
    for _ in 0..600 {
        last = running(&pods(kubectl, selector));
        let all = pods(kubectl, selector)
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .count();
        if last.len() == n && all == n && last.iter().all(|(_, node)| on(node)) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{n} pods of {selector} never ran where wanted; last running: {last:?}");
}

const SLEEPER: &str = r#"["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]"#;

fn deployment(name: &str, replicas: u32, zone: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{ name: {name} }}
spec:
  replicas: {replicas}
  selector: {{ matchLabels: {{ app: {name} }} }}
  strategy: {{ rollingUpdate: {{ maxSurge: 1, maxUnavailable: 0 }} }}
  template:
    metadata: {{ labels: {{ app: {name} }} }}
    spec:
      nodeSelector: {{ zone: {zone} }}
      terminationGracePeriodSeconds: 5
      containers:
      - name: main
        image: sh
        command: {SLEEPER}
"#
    )
}

#[test]
fn deployments_are_scheduled_scaled_rolled_back_and_kept_off_cordoned_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (_up, kubectl) = up_with(&dir.path().join("up"), 2, &[]);
    kubectl.ok(&["label", "node", "edge-1", "zone=north"]);
    kubectl.ok(&["label", "node", "edge-2", "zone=south"]);

    // kubectl create deployment (a protobuf body) runs pods wherever they fit.
    kubectl.ok(&[
        "create",
        "deployment",
        "hello",
        "--image=sh",
        "--replicas=2",
        "--",
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 1; done",
    ]);
    wait_running(&kubectl, "app=hello", 2, |_| true);
    kubectl.ok(&["rollout", "status", "deployment/hello", "--timeout=60s"]);
    kubectl.ok(&["set", "env", "deployment/hello", "GREETING=hi"]);
    kubectl.ok(&["rollout", "status", "deployment/hello", "--timeout=60s"]);
    // No annotations of its own (no kubectl apply): undo patches the revision the controller set.
    kubectl.ok(&["rollout", "undo", "deployment/hello"]);
    kubectl.ok(&["rollout", "status", "deployment/hello", "--timeout=60s"]);
    let annotations = kubectl.ok(&[
        "get",
        "deployment",
        "hello",
        "-o",
        "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    ]);
    assert_eq!(
        annotations.trim(),
        "3",
        "the undone template is the newest revision"
    );
    kubectl.ok(&["delete", "deployment", "hello"]);

    // The scheduler puts the replicas on the only node of the zone; rollout status says done.
    kubectl.apply(&deployment("web", 2, "south"));
    wait_running(&kubectl, "app=web", 2, |n| n == "edge-2");
    kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let table = kubectl.ok(&["get", "deployments"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web ") && l.contains("2/2")),
        "{table}"
    );

    // kubectl scale goes through the scale subresource.
    kubectl.ok(&["scale", "deployment/web", "--replicas=3"]);
    wait_running(&kubectl, "app=web", 3, |n| n == "edge-2");
    let scale = kubectl.ok(&[
        "get",
        "--raw",
        "/apis/apps/v1/namespaces/default/deployments/web/scale",
    ]);
    let scale: Value = serde_json::from_str(&scale).unwrap();
    assert_eq!(scale["spec"]["replicas"], 3);
    assert_eq!(scale["status"]["selector"], "app=web");

    // A new template rolls out as revision 2; undo goes back to revision 1's template.
    kubectl.ok(&["set", "env", "deployment/web", "VERSION=2"]);
    kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    let envs = |kubectl: &Kubectl| -> Vec<bool> {
        pods(kubectl, "app=web")
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                p["spec"]["containers"][0]["env"]
                    .to_string()
                    .contains("VERSION")
            })
            .collect()
    };
    wait_until(
        "every replica on the new template",
        Duration::from_secs(60),
        || {
            let e = envs(&kubectl);
            (e.len() == 3 && e.iter().all(|v| *v)).then_some(())
        },
    );
    let history = kubectl.ok(&["rollout", "history", "deployment/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    kubectl.ok(&["rollout", "undo", "deployment/web"]);
    kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    wait_until(
        "every replica back on the first template",
        Duration::from_secs(60),
        || {
            let e = envs(&kubectl);
            (e.len() == 3 && e.iter().all(|v| !*v)).then_some(())
        },
    );

    // A cordoned node gets no new pods: the new replica waits, saying why.
    kubectl.ok(&["cordon", "edge-2"]);
    let schedulable = kubectl.ok(&[
        "get",
        "nodes",
        "--field-selector",
        "spec.unschedulable==false",
        "-o",
        "name",
    ]);
    assert!(
        schedulable.contains("node/edge-1") && !schedulable.contains("node/edge-2"),
        "a node without spec.unschedulable is schedulable: {schedulable}"
    );
    kubectl.ok(&["scale", "deployment/web", "--replicas=4"]);
    wait_until(
        "the unschedulable replica said",
        Duration::from_secs(30),
        || {
            let events = kubectl.ok(&[
                "get",
                "events",
                "--field-selector",
                "reason=FailedScheduling",
                "-o",
                "custom-columns=MESSAGE:.message",
            ]);
            events
            .contains("0/3 nodes are available: 1 node(s) were unschedulable, 2 node(s) didn't match Pod's node affinity/selector.")
            .then_some(())
        },
    );
    let pending: Vec<Value> = pods(&kubectl, "app=web")
        .into_iter()
        .filter(|p| p["spec"]["nodeName"].is_null())
        .collect();
    assert_eq!(pending.len(), 1);
    let condition = &pending[0]["status"]["conditions"][0];
    assert_eq!(
        (condition["type"].as_str(), condition["reason"].as_str()),
        (Some("PodScheduled"), Some("Unschedulable"))
    );
    // A rollout that cannot progress fails once its deadline passes.
    kubectl.ok(&[
        "patch",
        "deployment",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"progressDeadlineSeconds":3}}"#,
    ]);
    let stuck = kubectl.run(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    assert!(
        !stuck.status.success()
            && String::from_utf8_lossy(&stuck.stderr).contains("exceeded its progress deadline"),
        "{}",
        String::from_utf8_lossy(&stuck.stderr)
    );
    kubectl.ok(&["uncordon", "edge-2"]);
    wait_running(&kubectl, "app=web", 4, |n| n == "edge-2");

    // Draining evicts the node's pods (pods/eviction) and cordons it.
    let drained = kubectl.run(&["drain", "edge-2", "--ignore-daemonsets", "--timeout=60s"]);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    wait_until("the drained node empty", Duration::from_secs(60), || {
        running(&pods(&kubectl, "app=web")).is_empty().then_some(())
    });
    let node: Value =
        serde_json::from_str(&kubectl.ok(&["get", "node", "edge-2", "-o", "json"])).unwrap();
    assert_eq!(node["spec"]["unschedulable"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_sets_reach_nodes_that_join_later_and_jobs_complete_or_fail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (api, kubeconfig) = support::apiserver(&d.join("api"));
    let mut procs = Procs(vec![api]);
    support::client(&kubeconfig).await;
    let hub_port = free_port();
    procs.0.push(support::hub(d, &kubeconfig, hub_port));
    // A bare API server: the global manager brings the scheduler and workload controllers.
    procs.0.push(
        support::sedna(&["gm", "--workloads", "--kubeconfig"])
            .arg(&kubeconfig)
            .spawn()
            .unwrap(),
    );
    let cloud = format!("127.0.0.1:{hub_port}");
    let join = |name: &str| {
        let node = d.join(name);
        support::join(&node, &cloud, &support::token(&kubeconfig, name), name);
        support::edge_with(&node, &cloud, &["--labels", "fleet=shops"])
    };
    procs.0.push(join("shop-1"));
    let kubectl = Kubectl::new(&kubeconfig).expect("kubectl is installed by scripts/setup");
    wait_until("shop-1 Ready", Duration::from_secs(60), || {
        kubectl
            .ok(&["get", "nodes", "--no-headers"])
            .lines()
            .any(|l| l.starts_with("shop-1 ") && l.contains(" Ready"))
            .then_some(())
    });
    // The shipped example: an agent on every node of zone north.
    kubectl.ok(&[
        "label",
        "node",
        "shop-1",
        "topology.kubernetes.io/zone=north",
    ]);
    kubectl.ok(&[
        "apply",
        "-f",
        support::root()
            .join("examples/operators/node-agent.yaml")
            .to_str()
            .unwrap(),
    ]);
    wait_running(&kubectl, "app=node-agent", 1, |n| n == "shop-1");
    // A node that joins later gets its pod once it is in the zone.
    procs.0.push(join("shop-2"));
    wait_until("shop-2 Ready", Duration::from_secs(60), || {
        kubectl
            .ok(&["get", "nodes", "--no-headers"])
            .lines()
            .any(|l| l.starts_with("shop-2 ") && l.contains(" Ready"))
            .then_some(())
    });
    kubectl.ok(&[
        "label",
        "node",
        "shop-2",
        "topology.kubernetes.io/zone=north",
    ]);
    let on = wait_running(&kubectl, "app=node-agent", 2, |n| n.starts_with("shop-"));
    let mut nodes: Vec<&str> = on.iter().map(|(_, n)| n.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["shop-1", "shop-2"]);
    wait_until("the DaemonSet's status", Duration::from_secs(30), || {
        let ds: Value =
            serde_json::from_str(&kubectl.ok(&["get", "ds", "node-agent", "-o", "json"])).ok()?;
        (ds["status"]["numberReady"] == 2 && ds["status"]["desiredNumberScheduled"] == 2)
            .then_some(())
    });
    // A node leaving the zone loses its pod.
    kubectl.ok(&["label", "node", "shop-1", "topology.kubernetes.io/zone-"]);
    wait_running(&kubectl, "app=node-agent", 1, |n| n == "shop-2");

    // A Job runs its pods to completion, two at a time.
    kubectl.apply(
        r#"apiVersion: batch/v1
kind: Job
metadata: { name: count }
spec:
  completions: 3
  parallelism: 2
  template:
    spec:
      restartPolicy: Never
      nodeSelector: { fleet: shops }
      containers:
      - { name: main, image: sh, command: ["sh", "-c", "echo counted"] }
"#,
    );
    kubectl.ok(&[
        "wait",
        "--for=condition=complete",
        "job/count",
        "--timeout=90s",
    ]);
    let job: Value =
        serde_json::from_str(&kubectl.ok(&["get", "job", "count", "-o", "json"])).unwrap();
    assert_eq!(job["status"]["succeeded"], 3);
    // A Job whose pods fail stops after its backoff limit, saying so.
    kubectl.apply(
        r#"apiVersion: batch/v1
kind: Job
metadata: { name: broken }
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      nodeSelector: { fleet: shops }
      containers:
      - { name: main, image: sh, command: ["sh", "-c", "exit 3"] }
"#,
    );
    kubectl.ok(&[
        "wait",
        "--for=condition=failed",
        "job/broken",
        "--timeout=90s",
    ]);
    let job: Value =
        serde_json::from_str(&kubectl.ok(&["get", "job", "broken", "-o", "json"])).unwrap();
    assert_eq!(job["status"]["failed"], 2);
    assert_eq!(
        job["status"]["conditions"][0]["reason"],
        "BackoffLimitExceeded"
    );
}
