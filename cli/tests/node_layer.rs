//! The node layer as users run it: real `sedna apiserver`, `sedna cloudcore`,
//! `sedna token create`, `sedna join` and two `sedna edgecore` processes on 127.0.0.1.
//! Objects for one node never reach the other; an edge killed with SIGKILL mid-sync converges
//! after a restart; after a hub restart only the changes cross the wire; statuses written
//! while the hub is down reach the API after it returns, in order.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use sedna_edgecore::store::EdgeStore;
use sedna_proto::channel::{ObjectRef, Upstream, upstream::Kind as UpstreamKind};
use serde_json::json;

mod support;
use support::{Procs, client, edge, eventually, free_port, hub, join, sedna, token};

/// Opens the store of an edge that may be writing it: SQLite can answer "database is
/// locked" to a second process opening it mid-write (without waiting), so this tries again.
fn open_store(path: &Path) -> EdgeStore {
    let mut tries = 0;
    loop {
        match EdgeStore::open(path, 1000, 1 << 20) {
            Ok(store) => return store,
            Err(e) if tries < 100 => {
                tries += 1;
                eprintln!("opening {}: {e}; again", path.display());
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("opening {}: {e}", path.display()),
        }
    }
}

fn held(dir: &Path, kind: &str) -> BTreeSet<String> {
    let store = open_store(&dir.join("edge.db"));
    store
        .list(kind)
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect()
}

fn pod(name: &str, node: &str, cm: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "nodeName": node, "containers": [{ "name": "worker", "image": "sedna-edge-worker",
                  "env": [{ "name": "MODE", "valueFrom": { "configMapKeyRef": { "name": cm, "key": "v" } } }] }] }
    }))
    .unwrap()
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({ "metadata": { "name": name },
                                   "data": { "v": value, "padding": "x".repeat(400) } }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hub_api_server_and_two_edges_as_processes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let api_port = free_port();
    let hub_port = free_port();
    let mut procs = Procs(vec![]);
    procs.0.push(
        sedna(&["apiserver", "--data-dir"])
            .arg(d.join("api"))
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .spawn()
            .unwrap(),
    );
    let kubeconfig = d.join("api/kubeconfig");
    let kube = client(&kubeconfig).await;
    procs.0.push(hub(d, &kubeconfig, hub_port));
    let cloud = format!("127.0.0.1:{hub_port}");
    // The hub reaches the edges through a proxy that counts bytes.
    let proxy = sedna_testkit::TcpProxy::start(format!("127.0.0.1:{hub_port}").parse().unwrap())
        .await
        .unwrap();
    let via_proxy = proxy.addr().to_string();

    let (a, b) = (d.join("edge-a"), d.join("edge-b"));
    join(&a, &cloud, &token(&kubeconfig, "edge-a"), "edge-a");
    join(&b, &cloud, &token(&kubeconfig, "edge-b"), "edge-b");

    let pods: Api<Pod> = Api::namespaced(kube.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(kube.clone(), "default");
    for i in 0..150 {
        cms.create(
            &PostParams::default(),
            &config_map(&format!("a-cfg-{i:03}"), "1"),
        )
        .await
        .unwrap();
        pods.create(
            &PostParams::default(),
            &pod(&format!("a-pod-{i:03}"), "edge-a", &format!("a-cfg-{i:03}")),
        )
        .await
        .unwrap();
    }
    cms.create(&PostParams::default(), &config_map("b-cfg", "1"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("b-pod", "edge-b", "b-cfg"))
        .await
        .unwrap();

    // Edge A is killed with SIGKILL in the middle of its first sync, then restarted. Its
    // link is slow meanwhile (about 300 KB take seconds), so the kill lands mid-sync however
    // fast this machine persists what arrives.
    proxy.set_rate_to_client(Some(64 * 1024));
    let mut edge_a = edge(&a, &via_proxy);
    let count = || {
        if !a.join("edge.db").exists() {
            return 0;
        }
        held(&a, "Pod").len() + held(&a, "ConfigMap").len()
    };
    for _ in 0..5000 {
        if count() > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    edge_a.kill().unwrap();
    edge_a.wait().unwrap();
    let partial = count();
    proxy.set_rate_to_client(None);
    procs.0.push(edge(&a, &via_proxy));
    procs.0.push(edge(&b, &cloud));
    let want_a: BTreeSet<String> = (0..150).map(|i| format!("a-pod-{i:03}")).collect();
    let want_a_cms: BTreeSet<String> = (0..150).map(|i| format!("a-cfg-{i:03}")).collect();
    eventually("edge A converges after kill -9", || {
        held(&a, "Pod") == want_a && held(&a, "ConfigMap") == want_a_cms
    })
    .await;
    eventually("edge B has its objects", || {
        held(&b, "Pod") == BTreeSet::from(["b-pod".to_owned()])
            && held(&b, "ConfigMap") == BTreeSet::from(["b-cfg".to_owned()])
    })
    .await;
    assert!(
        held(&b, "Pod").iter().all(|n| !n.starts_with("a-")),
        "nothing of A reaches B"
    );
    assert!(
        partial < 300,
        "the kill happened mid-sync ({partial} objects held)"
    );
    // The edge runtime reports the pods' statuses (their program is not installed), and the
    // API echoes the updated pods back: wait until every pod of A has its status in the API
    // (on a loaded machine the runtime may not have reported them all yet), then until that
    // traffic settles.
    let mut reported = 0;
    for _ in 0..600 {
        reported = pods
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| {
                p.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("a-"))
            })
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|c| !c.is_empty())
            })
            .count();
        if reported == 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reported, 150, "edge A reported the status of every pod");
    let mut last = proxy.bytes_to_client();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = proxy.bytes_to_client();
        // Heartbeats and Lease acknowledgements go on; statuses echo in bulk.
        if now - last < 4096 {
            break;
        }
        last = now;
    }
    let full_sync_bytes = proxy.bytes_to_client();

    // Stop the hub; change 1% of A's 300 objects and write statuses at the edge.
    let hub_proc = procs.0.remove(1);
    let mut hub_proc = hub_proc;
    hub_proc.kill().unwrap();
    hub_proc.wait().unwrap();
    for i in [7, 42, 99] {
        cms.patch(
            &format!("a-cfg-{i:03}"),
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": { "v": "2" } })),
        )
        .await
        .unwrap();
    }
    {
        let outbox = open_store(&a.join("edge.db"));
        for phase in ["Pending", "Running", "Succeeded"] {
            outbox
                .push(&Upstream {
                    kind: UpstreamKind::Status as i32,
                    object: Some(ObjectRef {
                        api_version: "v1".into(),
                        kind: "Pod".into(),
                        namespace: "default".into(),
                        name: "a-pod-001".into(),
                        uid: String::new(),
                    }),
                    payload: json!({ "status": { "phase": phase, "message": format!("{phase} at the edge") } })
                        .to_string()
                        .into_bytes(),
                })
                .unwrap();
        }
    }
    let rv_before = pods
        .get("a-pod-001")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut history = {
        use futures_util::StreamExt;
        let params = kube::api::WatchParams::default().fields("metadata.name=a-pod-001");
        pods.watch(&params, &rv_before).await.unwrap().boxed()
    };
    let before_restart = proxy.bytes_to_client();
    procs.0.insert(1, hub(d, &kubeconfig, hub_port));
    let store = open_store(&a.join("edge.db"));
    eventually("the changes reach edge A", || {
        [7, 42, 99].iter().all(|i| {
            store
                .get("ConfigMap", "default", &format!("a-cfg-{i:03}"))
                .unwrap()
                .is_some_and(|o| String::from_utf8_lossy(&o.value).contains("\"v\":\"2\""))
        })
    })
    .await;
    eventually("the statuses reach the API", || {
        store.outbox_len().unwrap() == 0
    })
    .await;
    let resync_bytes = proxy.bytes_to_client() - before_restart;
    assert!(
        resync_bytes * 10 < full_sync_bytes,
        "the resync moved {resync_bytes} bytes, the full sync {full_sync_bytes}"
    );
    // The three statuses were applied in order, exactly as written.
    let mut phases = Vec::new();
    while phases.len() < 3 {
        use futures_util::StreamExt;
        match tokio::time::timeout(Duration::from_secs(10), history.next()).await {
            Ok(Some(Ok(kube::api::WatchEvent::Modified(p)))) => {
                phases.push(p.status.and_then(|s| s.message).unwrap_or_default());
            }
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "{other:?}; phases so far {phases:?}; pod now {:?}",
                pods.get_status("a-pod-001").await.map(|p| p.status)
            ),
        }
    }
    assert_eq!(
        phases,
        [
            "Pending at the edge",
            "Running at the edge",
            "Succeeded at the edge"
        ]
    );
    drop(procs);
}
