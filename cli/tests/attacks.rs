//! The attack suite: real `sedna` processes (API server, hub, an edge node) on 127.0.0.1, each
//! probe of the security review replayed as an attacker would send it (patch bombs through the
//! cloud API and a node's local API, a node labelling itself with roles it was not given, a
//! flood of idle connections against the hub). Every probe must fail
//! cleanly — a clear refusal, no crash — while legitimate clients keep working.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Child;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

mod support;
use support::{Procs, apiserver, client, edge, edge_with, eventually, free_port, hub, join, token};

/// A JSON patch whose copies nest a value inside itself, one level deeper per operation
/// (17 KB: it overflowed the stack before patches were bounded).
fn depth_bomb(at: &str) -> Vec<u8> {
    let ops: Vec<Value> = std::iter::once(json!({ "op": "add", "path": at, "value": {} }))
        .chain((0..400).map(|_| json!({ "op": "copy", "from": at, "path": format!("{at}/x") })))
        .collect();
    serde_json::to_vec(&ops).unwrap()
}

/// A JSON patch whose copies append a list to itself, doubling it per operation (2 KB: it
/// exhausted the memory before patches were bounded).
fn size_bomb(at: &str) -> Vec<u8> {
    let ops: Vec<Value> = std::iter::once(json!({ "op": "add", "path": at, "value": [1, 2, 3] }))
        .chain((0..40).map(|_| json!({ "op": "copy", "from": at, "path": format!("{at}/-") })))
        .collect();
    serde_json::to_vec(&ops).unwrap()
}

/// Sends a JSON patch; returns the HTTP status of the refusal (panics if it was accepted).
async fn refused_patch(client: &kube::Client, uri: &str, body: Vec<u8>) -> (u16, String) {
    let request = http::Request::patch(uri)
        .header("content-type", "application/json-patch+json")
        .body(body)
        .unwrap();
    match client.request_text(request).await {
        Ok(text) => panic!("the patch was accepted: {text:.200}"),
        Err(kube::Error::Api(status)) => (status.code, status.message),
        Err(other) => panic!("the server did not answer the patch: {other}"),
    }
}

/// `sedna apiserver` in a new temporary directory, and an admin client of it.
async fn api_server() -> (tempfile::TempDir, Procs, std::path::PathBuf, kube::Client) {
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = apiserver(&dir.path().join("api"));
    let kube = client(&kubeconfig).await;
    (dir, Procs(vec![api]), kubeconfig, kube)
}

/// Waits (30 s at most) until a node's local API serves pod `name` to this client.
async fn served_locally(pods: &Api<Pod>, name: &str) {
    for _ in 0..300 {
        if pods.get_opt(name).await.ok().flatten().is_some() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the node's local API never served pod {name}");
}

fn still_running(child: &mut Child, what: &str) {
    assert!(
        child.try_wait().unwrap().is_none(),
        "{what} exited: {:?}",
        child.try_wait()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_bombs_are_refused_by_both_apis_and_a_node_cannot_give_itself_roles() {
    let (dir, mut procs, kubeconfig, kube) = api_server().await;
    let d = dir.path();
    let hub_port = free_port();

    // The cloud API.
    let config_maps: Api<ConfigMap> = Api::namespaced(kube.clone(), "default");
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({ "metadata": { "name": "target" }, "data": { "k": "v" } }),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let uri = "/api/v1/namespaces/default/configmaps/target";
    let (code, message) = refused_patch(&kube, uri, depth_bomb("/metadata/labels")).await;
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("deeper than 100 levels"), "{message}");
    let (code, message) = refused_patch(&kube, uri, size_bomb("/metadata/finalizers")).await;
    assert_eq!(code, 413, "{message}");
    assert!(message.contains("larger than the limit"), "{message}");
    let many: Vec<Value> = (0..10_001)
        .map(|_| json!({ "op": "test", "path": "/data/k", "value": "v" }))
        .collect();
    let (code, message) = refused_patch(&kube, uri, serde_json::to_vec(&many).unwrap()).await;
    assert_eq!(code, 413, "{message}");
    assert!(message.contains("10000, got 10001"), "{message}");
    still_running(&mut procs.0[0], "the API server");
    // Nothing was changed, and an ordinary patch still works.
    let target = config_maps.get("target").await.unwrap();
    assert!(target.metadata.labels.is_none());
    let fine = json!([{ "op": "add", "path": "/data/k2", "value": "v2" }]);
    config_maps
        .patch(
            "target",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::<()>::Json(serde_json::from_value(fine).unwrap()),
        )
        .await
        .unwrap();

    // A node's local API, with the token every pod on the node receives.
    procs.0.push(hub(d, &kubeconfig, hub_port));
    let cloud = format!("127.0.0.1:{hub_port}");
    let node = d.join("edge-a");
    join(&node, &cloud, &token(&kubeconfig, "edge-a"), "edge-a");
    // The node claims roles it was not given; the hub leaves those labels out.
    procs.0.push(edge_with(
        &node,
        &cloud,
        &[
            "--role",
            "cloud",
            "--labels",
            "node-role.kubernetes.io/control-plane=,site=north",
        ],
    ));
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "default");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": { "name": "victim" },
            "spec": { "nodeName": "edge-a", "containers": [{ "name": "c", "image": "sleep",
                      "command": ["sleep", "3600"] }] }
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let local_kubeconfig = node.join("metaserver/kubeconfig");
    eventually("the node's local API", || local_kubeconfig.exists()).await;
    let local = client(&local_kubeconfig).await;
    let local_pods: Api<Pod> = Api::namespaced(local.clone(), "default");
    served_locally(&local_pods, "victim").await;
    // The pod reaches the node as soon as the hub routes it; the Node object the node reports
    // is written by the hub on its own schedule, so wait for it.
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(kube.clone());
    let mut reported = None;
    for _ in 0..300 {
        reported = nodes.get_opt("edge-a").await.ok().flatten();
        if reported.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let labels = reported
        .expect("the hub never wrote node edge-a")
        .metadata
        .labels
        .unwrap_or_default();
    assert_eq!(labels.get("site").map(String::as_str), Some("north"));
    assert_eq!(
        labels.get("kubernetes.io/hostname").map(String::as_str),
        Some("edge-a")
    );
    assert!(
        !labels.contains_key("node-role.sedna.io/cloud"),
        "{labels:?}"
    );
    assert!(
        !labels.contains_key("node-role.kubernetes.io/control-plane"),
        "{labels:?}"
    );
    let uri = "/api/v1/namespaces/default/pods/victim/status";
    let (code, message) = refused_patch(&local, uri, depth_bomb("/status/bomb")).await;
    assert_eq!(code, 422, "{message}");
    let (code, message) = refused_patch(&local, uri, size_bomb("/status/bomb")).await;
    assert_eq!(code, 413, "{message}");
    still_running(&mut procs.0[2], "the edge agent");
    still_running(&mut procs.0[0], "the API server");
    // The node's local API still serves its pods.
    assert!(local_pods.get("victim").await.is_ok());

    // The operator revokes the node's certificate; the Node object stays.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sedna"))
        .args(["node", "revoke", "edge-a", "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("node/edge-a revoked"));
    let kept = Api::<ConfigMap>::namespaced(kube.clone(), "kube-system")
        .get("sedna-revoked-nodes")
        .await
        .unwrap();
    assert!(kept.data.unwrap_or_default().contains_key("edge-a"));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_sedna"))
        .args(["node", "revoke", "Not_A_Name", "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// Opens idle TCP connections to `target` from 127.0.0.2–127.0.0.(1 + sources) as fast as it
/// can, keeping the latest `hold` open, until `stop` is set. Returns how many it opened.
async fn flood(
    target: std::net::SocketAddr,
    sources: u8,
    hold: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let mut open = std::collections::VecDeque::new();
    let mut opened = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let source =
            std::net::SocketAddr::from(([127, 0, 0, 2 + (opened % sources as usize) as u8], 0));
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(source).unwrap();
        if let Ok(Ok(stream)) =
            tokio::time::timeout(std::time::Duration::from_secs(1), socket.connect(target)).await
        {
            open.push_back(stream);
            opened += 1;
        }
        if open.len() > hold {
            open.pop_front();
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_joins_and_connects_while_idle_connections_flood_the_hub() {
    use k8s_openapi::api::core::v1::Node;
    let (dir, mut procs, kubeconfig, kube) = api_server().await;
    let d = dir.path();
    let hub_port = free_port();
    procs.0.push(hub(d, &kubeconfig, hub_port));
    let cloud = format!("127.0.0.1:{hub_port}");
    let token = token(&kubeconfig, "edge-a");

    // Ten addresses open idle connections that never send a byte, a few hundred a second (the
    // review's probe needed 26 a second), holding up to 1,500 at once: far more than the
    // hub's 256 handshake slots.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = tokio::spawn(flood(cloud.parse().unwrap(), 10, 1500, stop.clone()));
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    let node = d.join("edge-a");
    let joined = {
        let (node, cloud) = (node.clone(), cloud.clone());
        tokio::task::spawn_blocking(move || join(&node, &cloud, &token, "edge-a"))
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), joined)
        .await
        .expect("joining took more than a minute under the flood")
        .unwrap();
    procs.0.push(edge(&node, &cloud));
    let nodes: Api<Node> = Api::all(kube.clone());
    let mut ready = false;
    for _ in 0..600 {
        let node = nodes.get_opt("edge-a").await.ok().flatten();
        ready = node
            .and_then(|n| n.status?.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opened = flooder.await.unwrap();
    assert!(ready, "the edge did not connect during the flood");
    assert!(opened > 500, "the flood opened only {opened} connections");
    still_running(&mut procs.0[1], "the hub");
}

/// The last lines of a container's log on `node` (empty until it exists).
fn container_log(node: &std::path::Path, pod: &str, uid: &str) -> String {
    std::fs::read_to_string(node.join(format!("pods/default_{pod}_{uid}/logs/c.log")))
        .unwrap_or_default()
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_reaches_only_its_own_objects_through_the_local_api_and_only_its_own_files() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, mut procs, kubeconfig, kube) = api_server().await;
    let d = dir.path();
    // Pods with their own uids must be able to walk down to the node's directory.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    let hub_port = free_port();
    procs.0.push(hub(d, &kubeconfig, hub_port));
    let cloud = format!("127.0.0.1:{hub_port}");
    let node = d.join("edge-p");
    join(&node, &cloud, &token(&kubeconfig, "edge-p"), "edge-p");
    let root = running_as_root();
    let uids: &[&str] = if root {
        &["--pod-uids", "300000-300099"]
    } else {
        &[]
    };
    procs.0.push(edge_with(&node, &cloud, uids));

    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(kube.clone(), "default");
    for (name, value) in [("mine", "my-secret"), ("theirs", "their-secret")] {
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({ "metadata": { "name": name }, "stringData": { "key": value } }),
                )
                .unwrap(),
            )
            .await
            .unwrap();
    }
    let pods: Api<Pod> = Api::namespaced(kube.clone(), "default");
    let create = |name: &str, secret: &str, script: String, env: Value| {
        serde_json::from_value::<Pod>(json!({
            "metadata": { "name": name },
            "spec": { "nodeName": "edge-p", "restartPolicy": "Never",
                "volumes": [{ "name": "creds", "secret": { "secretName": secret } }],
                "containers": [{ "name": "c", "image": "sh", "command": ["sh", "-c", script],
                                 "env": env,
                                 "volumeMounts": [{ "name": "creds", "mountPath": "/creds" }] }] }
        }))
        .unwrap()
    };
    let victim = pods
        .create(
            &PostParams::default(),
            &create("victim", "theirs", "id -u; sleep 3600".into(), json!([])),
        )
        .await
        .unwrap();
    let victim_uid = victim.metadata.uid.unwrap();
    let victim_dir = node.join(format!("pods/default_victim_{victim_uid}"));
    // The prober tries every file of the node and of the other pod it should not read.
    let targets = [
        node.join("pki/node.pem"),
        node.join("edge.db"),
        node.join("edge.db-wal"),
        node.join("metaserver/kubeconfig"),
        node.join("metaserver/pod-token.key"),
        node.join("metaserver/tokens.csv"),
        victim_dir.join("volumes/creds/key"),
        victim_dir.join("local-api.kubeconfig"),
        victim_dir.join("home"),
    ];
    let mut script = String::from("id -u\n");
    for t in &targets {
        let t = t.display();
        script.push_str(&format!(
            "if cat '{t}' >/dev/null 2>&1 || ls '{t}/' >/dev/null 2>&1; then echo 'READ {t}'; else echo 'DENIED {t}'; fi\n"
        ));
    }
    script.push_str(&format!(
        "echo tampered > '{}/state.json' 2>/dev/null && echo 'WROTE state'\n\
         echo \"OWN $(cat \"$SEDNA_MOUNT_CREDS/key\")\"\necho DONE\nsleep 3600\n",
        victim_dir.display()
    ));
    let prober = pods
        .create(
            &PostParams::default(),
            &create("prober", "mine", script, json!([])),
        )
        .await
        .unwrap();
    let prober_uid = prober.metadata.uid.unwrap();
    eventually("the prober's probes", || {
        container_log(&node, "prober", &prober_uid).contains("DONE")
    })
    .await;
    let probes = container_log(&node, "prober", &prober_uid);
    assert!(probes.contains("OWN my-secret"), "{probes}");
    if root {
        assert!(!probes.contains("READ "), "{probes}");
        assert!(!probes.contains("WROTE"), "{probes}");
        assert_eq!(probes.matches("DENIED ").count(), targets.len(), "{probes}");
        let uid_of = |log: &str| {
            log.lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok())
        };
        let victim_log = container_log(&node, "victim", &victim_uid);
        let (p, v) = (uid_of(&probes).unwrap(), uid_of(&victim_log).unwrap());
        assert!(
            (300_000..=300_099).contains(&p) && (300_000..=300_099).contains(&v),
            "{p} {v}"
        );
        assert_ne!(p, v, "two pods, two uids");
    } else {
        eprintln!("not root: pods run as the agent's user; only the local API's scoping is tested");
    }

    // The prober's own token on the node's local API.
    let token_kubeconfig = node.join(format!(
        "pods/default_prober_{prober_uid}/local-api.kubeconfig"
    ));
    let local = client(&token_kubeconfig).await;
    let local_pods: Api<Pod> = Api::namespaced(local.clone(), "default");
    let local_secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(local.clone(), "default");
    served_locally(&local_pods, "prober").await;
    assert!(local_secrets.get("mine").await.is_ok());
    let forbidden = |r: Result<_, kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 403 => s.message,
        other => panic!("expected 403, got {:?}", other.map(|_: ()| ())),
    };
    let message = forbidden(local_secrets.get("theirs").await.map(|_| ()));
    assert!(
        message.contains("User \"system:pod:default:prober\""),
        "{message}"
    );
    forbidden(local_secrets.list(&Default::default()).await.map(|_| ()));
    forbidden(local_pods.get("victim").await.map(|_| ()));
    forbidden(
        Api::<k8s_openapi::api::core::v1::Node>::all(local.clone())
            .get("edge-p")
            .await
            .map(|_| ()),
    );
    let status = kube::api::Patch::Merge(json!({ "status": { "message": "hello" } }));
    forbidden(
        local_pods
            .patch_status("victim", &Default::default(), &status)
            .await
            .map(|_| ()),
    );
    local_pods
        .patch_status("prober", &Default::default(), &status)
        .await
        .unwrap();
    // The node's administrator still reads everything.
    let admin = client(&node.join("metaserver/kubeconfig")).await;
    let all = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin, "default")
        .list(&Default::default())
        .await
        .unwrap();
    assert!(all.items.len() >= 2);
    // A deleted pod's token is worthless.
    pods.delete("prober", &Default::default()).await.unwrap();
    let mut refused = String::new();
    for _ in 0..300 {
        if let Err(kube::Error::Api(s)) = local_pods.get("prober").await
            && s.code == 403
        {
            refused = s.message;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(refused.contains("is gone"), "{refused}");
    still_running(&mut procs.0[2], "the edge agent");
}
