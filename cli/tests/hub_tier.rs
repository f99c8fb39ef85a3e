//! A tier of real hub processes (`sedna cloudcore --multi-primary`) on one `sedna apiserver`,
//! with a fleet of edge clients, each from its own loopback address: the hub serving the most
//! nodes is killed with SIGKILL, and every one of its nodes is connected and synced again on
//! a surviving hub within a stated time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use support::{Procs, apiserver, client, eventually_within, free_port, sedna};

const NODES: usize = 40;
/// The tier's Lease duration: a dead hub's partitions are claimed after at most this long.
const TIER_LEASE: Duration = Duration::from_secs(3);

fn edge_config(seeds: &str, dir: &std::path::Path, i: usize) -> sedna_edgecore::EdgeConfig {
    let mut config = sedna_edgecore::EdgeConfig::new(seeds, dir);
    config.in_memory = true;
    config.seed = i as u64;
    config.source_address = Some(format!("127.0.0.{}", 2 + i).parse().unwrap());
    config.machine.heartbeat = Duration::from_millis(300);
    config.machine.read_deadline = Duration::from_secs(2);
    config.machine.backoff_base = Duration::from_millis(50);
    config.machine.backoff_max = Duration::from_secs(1);
    config.machine.later_spread = Duration::from_millis(500);
    config
}

/// Node → the hub address it is connected and synced to, once every node is.
fn placement(
    edges: &BTreeMap<String, sedna_edgecore::EdgeHub>,
) -> Option<BTreeMap<String, String>> {
    edges
        .iter()
        .map(|(node, e)| {
            let s = e.status().borrow().clone();
            (s.connected && s.synced).then(|| (node.clone(), e.hub_address().borrow().clone()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_process_killed_with_sigkill_loses_no_node_for_long() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = apiserver(&dir.path().join("api"));
    let mut procs = Procs(vec![api]);
    let kube = client(&kubeconfig).await;
    let mut hubs: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for id in ["h1", "h2", "h3"] {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = sedna(&["cloudcore", "--metrics-addr", "off", "--data-dir"])
            .arg(dir.path().join("hub"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "--listen",
                &addr,
                "--heartbeat",
                "300ms",
                "--read-deadline",
                "2s",
            ])
            .args(["--partitions", "8", "--hub-id", id, "--multi-primary"])
            .args(["--tier-lease", "3s"])
            .spawn()
            .unwrap();
        hubs.insert(addr, (id.to_string(), procs.0.len()));
        procs.0.push(child);
        // The first hub creates the shared CA; the others load it.
        if id == "h1" {
            let pki = dir.path().join("hub/pki");
            eventually_within("the first hub's CA", Duration::from_secs(30), || {
                pki.join("ca.crt").exists() && pki.join("ca.key").exists()
            })
            .await;
        }
    }
    // The partitions spread over the three hubs (they joined one after another).
    let leases: Api<Lease> = Api::namespaced(kube.clone(), "kube-system");
    let start = Instant::now();
    loop {
        let holders: std::collections::BTreeSet<String> = leases
            .list(&ListParams::default().labels(sedna_cloudcore::partitions::PARTITION_LEASE_LABEL))
            .await
            .map(|l| {
                l.items
                    .into_iter()
                    .filter_map(|l| l.spec?.holder_identity)
                    .filter(|h| !h.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if holders.len() == 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "partitions held by {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seeds: Vec<String> = hubs.keys().cloned().collect();
    let mut edges = BTreeMap::new();
    for i in 0..NODES {
        let node = format!("tier-{i:02}");
        let edge_dir = dir.path().join("edges").join(&node);
        let token = loop {
            match sedna_cloudcore::tokens::create(&kube, Some(&node), Duration::from_secs(600))
                .await
            {
                Ok(t) => break t.to_string(),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let first = &seeds[i % seeds.len()];
        let mut tries = 0;
        while let Err(e) = sedna_edgecore::join::join(first, &token, &node, &edge_dir).await {
            tries += 1;
            assert!(tries < 100, "join of {node} kept failing: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Each node lists the hubs starting at another one.
        let mut list = seeds.clone();
        list.rotate_left(i % seeds.len());
        let edge = sedna_edgecore::EdgeHub::start(edge_config(&list.join(","), &edge_dir, i))
            .await
            .unwrap();
        edges.insert(node, edge);
    }
    let mut before = BTreeMap::new();
    eventually_within(
        "every node connected and synced",
        Duration::from_secs(60),
        || placement(&edges).map(|p| before = p).is_some(),
    )
    .await;
    // The hub serving the most nodes dies.
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for hub in before.values() {
        *counts.entry(hub.as_str()).or_default() += 1;
    }
    let (victim, served) = counts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(h, n)| (h.to_string(), *n))
        .unwrap();
    let (victim_id, index) = hubs[&victim].clone();
    procs.0[index].kill().unwrap();
    procs.0[index].wait().unwrap();
    let killed = Instant::now();
    // Its Leases expire within TIER_LEASE; the nodes are told when to come back, then
    // resume on the new owners.
    let limit = TIER_LEASE * 5;
    let mut after = BTreeMap::new();
    eventually_within(
        &format!("the {served} nodes of {victim_id} back on the other hubs"),
        limit,
        || {
            placement(&edges)
                .filter(|p| p.values().all(|h| *h != victim))
                .map(|p| after = p)
                .is_some()
        },
    )
    .await;
    let took = killed.elapsed();
    assert_eq!(after.len(), NODES);
    for (node, hub) in &after {
        assert!(
            hubs.contains_key(hub) && *hub != victim,
            "{node} is on {hub}, not a surviving hub"
        );
        if before[node] != victim {
            assert_eq!(&before[node], hub, "{node} moved though its hub lives");
        }
    }
    eprintln!("{served} nodes of {victim_id} (SIGKILL) back after {took:?}");
    drop(edges);
    drop(procs);
}
