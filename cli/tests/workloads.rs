//! Workloads on edge nodes, driven like a user drives them: `kubectl apply` a Pod bound to an
//! edge node and it runs there as a process; `kubectl get pods -o wide` shows it Running;
//! `kubectl delete` stops it gracefully; a crashing container backs off and `kubectl describe`
//! says why; an edge rebooted while the cloud is away runs its pods again and loses none of
//! the statuses written meanwhile; a node whose lease expires turns NotReady and keeps its
//! pods unless an autonomy period was set.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;

mod support;
use support::{
    Kubectl, Procs, alive, apiserver, client, container_pid, edge_with, eventually,
    eventually_within, free_port, hub, join, token,
};

const EDGE_FLAGS: &[&str] = &[
    "--lease-interval",
    "1s",
    "--restart-backoff",
    "1s",
    "--node-ip",
    "127.0.0.1",
];

struct Cluster {
    dir: tempfile::TempDir,
    _procs: Procs,
    hub: Option<Child>,
    edge: Option<Child>,
    hub_port: u16,
    kubeconfig: PathBuf,
    kube: kube::Client,
    kubectl: Kubectl,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut procs = Procs::default();
        let (api, kubeconfig) = apiserver(&dir.path().join("api"));
        procs.0.push(api);
        let kube = client(&kubeconfig).await;
        let kubectl = Kubectl::new(&kubeconfig)
            .expect("kubectl is not installed: run scripts/setup (it installs it)");
        let hub_port = free_port();
        let mut cluster = Cluster {
            hub: Some(hub(dir.path(), &kubeconfig, hub_port)),
            dir,
            _procs: procs,
            edge: None,
            hub_port,
            kubeconfig,
            kube,
            kubectl,
        };
        let t = token(&cluster.kubeconfig, "edge-1");
        join(&cluster.edge_dir(), &cluster.cloud(), &t, "edge-1");
        cluster.start_edge();
        cluster.wait_ready("edge-1", "True").await;
        cluster
    }

    fn cloud(&self) -> String {
        format!("127.0.0.1:{}", self.hub_port)
    }

    fn edge_dir(&self) -> PathBuf {
        self.dir.path().join("edge-1")
    }

    fn start_edge(&mut self) {
        self.edge = Some(edge_with(&self.edge_dir(), &self.cloud(), EDGE_FLAGS));
    }

    fn kill(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn start_hub(&mut self) {
        self.hub = Some(hub(self.dir.path(), &self.kubeconfig, self.hub_port));
    }

    async fn ready(&self, node: &str) -> Option<String> {
        let nodes: Api<Node> = Api::all(self.kube.clone());
        let n = nodes.get_opt(node).await.ok()??;
        n.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status)
    }

    async fn wait_ready(&self, node: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.ready(node).await;
            if now.as_deref() == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} Ready is {now:?}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn pod(&self, name: &str) -> Option<Pod> {
        Api::<Pod>::namespaced(self.kube.clone(), "default")
            .get_opt(name)
            .await
            .unwrap()
    }

    async fn wait_phase(&self, name: &str, phase: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let p = self.pod(name).await;
            let now = p
                .as_ref()
                .and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.clone());
            if now.as_deref() == Some(phase) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pod {name} is {now:?}, want {phase}: {:?}",
                p.and_then(|p| p.status)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self, pod: &str) -> Option<i32> {
        container_pid(&self.edge_dir(), pod, "main")
    }

    fn log(&self, pod: &str) -> String {
        let Ok(dirs) = std::fs::read_dir(self.edge_dir().join("pods")) else {
            return String::new();
        };
        for d in dirs.flatten() {
            if d.file_name()
                .to_string_lossy()
                .starts_with(&format!("default_{pod}_"))
            {
                return std::fs::read_to_string(d.path().join("logs/main.log")).unwrap_or_default();
            }
        }
        String::new()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        Cluster::kill(&mut self.edge);
        Cluster::kill(&mut self.hub);
        // Workloads outlive a killed agent by design: stop them with the test.
        if let Ok(dirs) = std::fs::read_dir(self.edge_dir().join("pods")) {
            for d in dirs.flatten() {
                if let Ok(files) = std::fs::read_dir(d.path()) {
                    for f in files.flatten() {
                        if f.path().extension().is_some_and(|e| e == "pid") {
                            let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                            if let Some(pid) = text
                                .split_whitespace()
                                .next()
                                .and_then(|p| p.parse::<i32>().ok())
                            {
                                let _ = nix::sys::signal::killpg(
                                    nix::unistd::Pid::from_raw(pid),
                                    nix::sys::signal::Signal::SIGKILL,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

fn pod_manifest(name: &str, script: &str, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 10
{extra_spec}  containers:
  - name: main
    image: sh
    command: ["sh", "-c", {script:?}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_applied_with_kubectl_runs_on_its_edge_and_stops_when_deleted() {
    let c = Cluster::start().await;
    c.kubectl.apply(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: greeting
data:
  text: hello-from-the-cloud
---
apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  nodeName: edge-1
  terminationGracePeriodSeconds: 10
  containers:
  - name: main
    image: sh
    command: ["sh", "-c"]
    args: ["echo \"greeting=$GREETING node=$NODE pod=$POD\"; trap 'echo stopping; exit 0' TERM; while true; do sleep 0.1; done"]
    env:
    - name: GREETING
      valueFrom:
        configMapKeyRef: {name: greeting, key: text}
    - name: NODE
      valueFrom:
        fieldRef: {fieldPath: spec.nodeName}
    - name: POD
      valueFrom:
        fieldRef: {fieldPath: metadata.name}
"#,
    );
    c.wait_phase("web", "Running", Duration::from_secs(30))
        .await;
    let wide = c.kubectl.ok(&["get", "pods", "-o", "wide"]);
    let line = wide.lines().find(|l| l.starts_with("web ")).unwrap();
    for want in ["1/1", "Running", "127.0.0.1", "edge-1"] {
        assert!(line.contains(want), "{want} missing in: {wide}");
    }
    let pid = c.pid("web").unwrap();
    assert!(alive(pid));
    eventually("the greeting in the container log", || {
        c.log("web")
            .contains("greeting=hello-from-the-cloud node=edge-1 pod=web")
    })
    .await;

    c.kubectl.ok(&["delete", "pod", "web", "--timeout=60s"]);
    assert!(c.pod("web").await.is_none());
    eventually("the process to end", || !alive(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_container_backs_off_and_kubectl_describe_says_why() {
    let c = Cluster::start().await;
    c.kubectl
        .apply(&pod_manifest("crash", "echo boom >&2; exit 3", ""));
    let restarts = || {
        c.kubectl
            .ok(&[
                "get",
                "pod",
                "crash",
                "-o",
                "jsonpath={.status.containerStatuses[0].restartCount}",
            ])
            .trim()
            .parse::<u32>()
            .unwrap_or(0)
    };
    eventually_within("two restarts", Duration::from_secs(60), || restarts() >= 2).await;
    let described = c.kubectl.ok(&["describe", "pod", "crash"]);
    for want in [
        "CrashLoopBackOff",
        "Exit Code:    3",
        "BackOff",
        "Back-off restarting failed container main (exit code 3)",
        "back-off 1s",
        "back-off 2s",
    ] {
        assert!(
            described.contains(want),
            "{want:?} missing in:\n{described}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_rebooted_while_the_cloud_is_away_runs_its_pods_and_loses_no_status() {
    let mut c = Cluster::start().await;
    let go = c.dir.path().join("go");
    c.kubectl.apply(&pod_manifest(
        "keeper",
        "while true; do sleep 0.1; done",
        "",
    ));
    c.kubectl.apply(&pod_manifest(
        "finisher",
        &format!(
            "while [ ! -e {} ]; do sleep 0.05; done; echo done",
            go.display()
        ),
        "  restartPolicy: Never\n",
    ));
    c.wait_phase("keeper", "Running", Duration::from_secs(30))
        .await;
    c.wait_phase("finisher", "Running", Duration::from_secs(30))
        .await;
    let keeper = c.pid("keeper").unwrap();
    let finisher = c.pid("finisher").unwrap();

    // The cloud goes away; meanwhile a pod finishes (a status only the outbox holds).
    Cluster::kill(&mut c.hub);
    std::fs::write(&go, "").unwrap();
    eventually("the finisher to exit", || !alive(finisher)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The edge reboots while the cloud is still away.
    Cluster::kill(&mut c.edge);
    assert!(alive(keeper), "workloads do not die with their agent");
    let restarted = Instant::now();
    c.start_edge();
    let mut new_keeper = None;
    eventually_within("keeper to run again", Duration::from_secs(30), || {
        new_keeper = c.pid("keeper").filter(|p| *p != keeper && alive(*p));
        new_keeper.is_some()
    })
    .await;
    let offline_restart = restarted.elapsed();
    assert!(!alive(keeper), "the old process was replaced, not doubled");
    assert!(
        c.pid("finisher").is_none_or(|p| p == finisher),
        "a finished Never pod must not run again"
    );
    eprintln!("offline restart: pods running again {offline_restart:?} after edgecore started");

    // The cloud returns: the status written during the outage arrives.
    c.start_hub();
    c.wait_phase("finisher", "Succeeded", Duration::from_secs(60))
        .await;
    c.wait_phase("keeper", "Running", Duration::from_secs(30))
        .await;
    c.wait_ready("edge-1", "True").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_lease_expires_turns_not_ready_and_keeps_its_pods_unless_autonomy_runs_out() {
    let mut c = Cluster::start().await;
    c.kubectl.apply(&pod_manifest(
        "steady",
        "while true; do sleep 0.1; done",
        "",
    ));
    c.wait_phase("steady", "Running", Duration::from_secs(30))
        .await;
    let pid = c.pid("steady").unwrap();

    Cluster::kill(&mut c.edge);
    c.wait_ready("edge-1", "Unknown").await;
    let nodes = c.kubectl.ok(&["get", "nodes"]);
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with("edge-1 ") && l.contains("NotReady")),
        "{nodes}"
    );
    // Without an autonomy period, the pods stay: in the API and on the node.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(c.pod("steady").await.is_some(), "the pod was evicted");
    assert!(alive(pid));

    // The node comes back: Ready again, the same pod still running.
    c.start_edge();
    c.wait_ready("edge-1", "True").await;
    assert!(c.pod("steady").await.is_some());

    // With an autonomy period, the pods of a node unreachable for longer are evicted, and
    // the node stops them when it returns.
    c.kubectl.ok(&[
        "annotate",
        "node",
        "edge-1",
        "node.sedna.io/autonomy-duration=1s",
    ]);
    Cluster::kill(&mut c.edge);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.pod("steady").await.is_some() {
        assert!(Instant::now() < deadline, "the pod was never evicted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let still = c.pid("steady");
    c.start_edge();
    eventually("the evicted pod's process to stop", || {
        still.is_none_or(|p| !alive(p)) && c.pid("steady").is_none_or(|p| !alive(p))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_app_lists_and_watches_its_config_maps_on_the_local_api_while_the_hub_is_down() {
    use futures_util::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};

    let mut c = Cluster::start().await;
    c.kubectl.apply(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: model-config
data:
  threshold: "0.5"
"#,
    );
    c.kubectl.apply(&format!(
        "{}    envFrom:\n    - configMapRef: {{name: model-config}}\n",
        pod_manifest("app", "while true; do sleep 0.1; done", "")
    ));
    c.wait_phase("app", "Running", Duration::from_secs(30))
        .await;
    let local_kubeconfig = c.edge_dir().join("metaserver/kubeconfig");
    let local = client(&local_kubeconfig).await;
    let local_kubectl = Kubectl::new(&local_kubeconfig).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(local.clone(), "default");
    let names = || async {
        cms.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !names().await.contains(&"model-config".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "the local API never had the ConfigMap"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The cloud goes away: the local API still lists, and a watch starts.
    Cluster::kill(&mut c.hub);
    let listed = cms.list(&ListParams::default()).await.unwrap();
    assert!(
        listed
            .items
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some("model-config"))
    );
    let rv = listed.metadata.resource_version.unwrap();
    let mut watch = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let table = local_kubectl.ok(&["get", "configmaps"]);
    assert!(table.contains("model-config"), "{table}");

    // Only statuses and events may be written locally; the refusal says why.
    let refused = local_kubectl.run(&["delete", "configmap", "model-config"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("Forbidden") && why.contains("read-only"),
        "{why}"
    );
    // An app reports through its pod's status while offline; the write is queued upstream.
    let pods: Api<Pod> = Api::namespaced(local.clone(), "default");
    pods.patch_status(
        "app",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": { "message": "model loaded offline" } })),
    )
    .await
    .unwrap();

    // The cloud returns and the ConfigMap changes there: the open local watch sees it.
    c.start_hub();
    let cloud_cms: Api<ConfigMap> = Api::namespaced(c.kube.clone(), "default");
    cloud_cms
        .patch(
            "model-config",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "data": { "threshold": "0.7" } })),
        )
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = watch.next().await {
            if let Ok(WatchEvent::Modified(cm)) = event
                && cm
                    .data
                    .unwrap_or_default()
                    .get("threshold")
                    .map(String::as_str)
                    == Some("0.7")
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "the local watch did not see the change");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let message = c
            .pod("app")
            .await
            .and_then(|p| p.status)
            .and_then(|s| s.message);
        if message.as_deref() == Some("model loaded offline") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the offline status write never reached the cloud: {message:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
