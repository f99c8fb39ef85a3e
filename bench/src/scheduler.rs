//! Benchmark of the embedded control plane's scheduler: with N Ready nodes in the API (the
//! embedded API server, in process), P pending pods created at once (a Deployment's worth:
//! one owner, so replicas spread) are bound by `sedna_controllers::scheduler` through
//! `pods/binding`. Reports pods bound per second and each pod's create → bound latency
//! (p50/p99/max), seen by a watch.
//!
//! `cargo run --release -p sedna-bench --bin scheduler-bench -- --nodes 10000 --pods 1000`

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

mod common;
use common::{percentile, start_apiserver};

#[derive(Parser)]
struct Args {
    /// Ready nodes in the API.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Pods created at once and scheduled.
    #[arg(long, default_value_t = 1_000)]
    pods: usize,
    /// Concurrent writers while filling the API.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (server, client) = start_apiserver(dir.path(), false).await?;
    println!(
        "scheduler-bench: {} nodes, {} pods, embedded API server in process",
        args.nodes, args.pods
    );

    // Nodes: created, then made Ready with allocatable resources (the status subresource).
    let nodes: Api<Node> = Api::all(client.clone());
    let started = Instant::now();
    futures_util::stream::iter(0..args.nodes)
        .map(|i| {
            let nodes = nodes.clone();
            async move {
                let name = format!("edge-{i:05}");
                let node: Node = serde_json::from_value(json!({
                    "metadata": { "name": name, "labels": { "zone": format!("z{}", i % 10) } }
                }))?;
                nodes.create(&PostParams::default(), &node).await?;
                let status = json!({ "status": {
                    "conditions": [{ "type": "Ready", "status": "True" }],
                    "allocatable": { "cpu": "4", "memory": "8Gi", "pods": "110" } } });
                nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    println!(
        "  {} Ready nodes written in {:.1} s",
        args.nodes,
        started.elapsed().as_secs_f64()
    );

    // The scheduler, started before the pods so its caches are warm (as in `sedna up`).
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let scheduler = tokio::spawn(sedna_controllers::scheduler::run(
        client.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Watch pods for their binding, then create them all at once.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut watch = pods
        .watch(&WatchParams::default(), "0")
        .await
        .context("watching pods")?
        .boxed();
    let created: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    let begin = Instant::now();
    let creator = {
        let pods = pods.clone();
        let created = created.clone();
        let count = args.pods;
        let concurrency = args.concurrency;
        tokio::spawn(async move {
            futures_util::stream::iter(0..count)
                .map(|i| {
                    let pods = pods.clone();
                    let created = created.clone();
                    async move {
                        let name = format!("web-{i:05}");
                        let pod: Pod = serde_json::from_value(json!({
                            "metadata": { "name": name, "labels": { "app": "web" },
                                "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet",
                                    "name": "web", "uid": "rs-web", "controller": true }] },
                            "spec": { "containers": [{ "name": "c", "image": "sleep",
                                "resources": { "requests": { "cpu": "100m", "memory": "64Mi" } } }] }
                        }))?;
                        created
                            .lock()
                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                            .insert(name, Instant::now());
                        pods.create(&PostParams::default(), &pod).await?;
                        anyhow::Ok(())
                    }
                })
                .buffer_unordered(concurrency)
                .try_collect::<Vec<_>>()
                .await
        })
    };
    let mut bound: BTreeMap<String, (Instant, String)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while bound.len() < args.pods && Instant::now() < deadline {
        let Some(event) = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .context("no pod event for 30 s")?
        else {
            break;
        };
        if let WatchEvent::Modified(pod) | WatchEvent::Added(pod) = event? {
            let name = pod.metadata.name.clone().unwrap_or_default();
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                bound.entry(name).or_insert((Instant::now(), node));
            }
        }
    }
    creator.await??;
    let elapsed = begin.elapsed();
    let created = created
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut latencies: Vec<Duration> = bound
        .iter()
        .filter_map(|(name, (at, _))| created.get(name).map(|c| at.saturating_duration_since(*c)))
        .collect();
    latencies.sort();
    let per_node: HashMap<&str, usize> = bound.values().fold(HashMap::new(), |mut m, (_, n)| {
        *m.entry(n.as_str()).or_default() += 1;
        m
    });
    println!(
        "  {} of {} pods bound in {:.2} s: {:.0} pods/s",
        bound.len(),
        args.pods,
        elapsed.as_secs_f64(),
        bound.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  create -> bound: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );
    println!(
        "  spread: {} nodes used, at most {} pods of the owner on one node",
        per_node.len(),
        per_node.values().max().copied().unwrap_or(0)
    );
    let _ = stop.send(());
    let _ = scheduler.await;
    server.shutdown().await;
    Ok(())
}
