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
    let mut seen = false;
    for _ in 0..300 {
        if local_pods.get_opt("victim").await.ok().flatten().is_some() {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(seen, "the pod never reached the node");
    let labels = Api::<k8s_openapi::api::core::v1::Node>::all(kube.clone())
        .get("edge-a")
        .await
        .unwrap()
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
