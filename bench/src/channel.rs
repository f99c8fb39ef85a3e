//! Benchmark of the cloud-edge channel, in one process: the embedded API server, the hub, and
//! edges (the real client; stores on disk for one edge, in memory for the simulated fleet).
//!
//! 1. Bytes on the wire for a reconnect after 1% of 10,000 node-relevant objects changed,
//!    against the full sync of the same objects (a TCP proxy counts both directions).
//! 2. Idle bandwidth of one connected node with the default heartbeat.
//! 3. Change → persisted-on-edge latency with 1,000 connected nodes.
//!
//! `cargo run --release -p sedna-bench --bin channel-bench -- --help`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use rand::RngExt;
use sedna_cloudcore::{Hub, HubConfig};
use sedna_edgecore::store::Change;
use sedna_edgecore::{EdgeConfig, EdgeHub};
use serde_json::json;

mod common;
use common::percentile;

#[derive(Parser)]
struct Args {
    /// Node-relevant objects for the reconnect measurement (half pods, half config maps).
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Seconds of idle connection to measure.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Simulated nodes for the latency measurement.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Changes whose delivery is timed.
    #[arg(long, default_value_t = 2000)]
    changes: usize,
    /// Skip a measurement: reconnect, idle, latency.
    #[arg(long)]
    skip: Vec<String>,
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !f() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn pod(name: &str, node: &str, cm: &str, sent: u128) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": "bench" },
                      "annotations": { "bench/sent-ns": sent.to_string() } },
        "spec": { "nodeName": node, "containers": [{ "name": "worker", "image": "sedna-edge-worker",
                  "args": ["--model", "/models/edge.onnx"],
                  "env": [{ "name": "MODE", "valueFrom": { "configMapKeyRef": { "name": cm, "key": "v" } } }] }] }
    }))
    .unwrap_or_default()
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({ "metadata": { "name": name },
        "data": { "v": value, "settings": "threshold_img=0.9,threshold_box=0.9,".repeat(10) } }))
    .unwrap_or_default()
}

struct Cluster {
    _api: sedna_apiserver::ApiServer,
    client: kube::Client,
    hub: Hub,
    dir: tempfile::TempDir,
}

async fn cluster() -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let mut config = sedna_apiserver::Config::new(dir.path().join("api"));
    config.listen = "127.0.0.1:0".parse()?;
    let api = sedna_apiserver::ApiServer::start(config).await?;
    let file = kube::config::Kubeconfig::read_from(api.kubeconfig_path())?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(file, &Default::default()).await?,
    )?;
    let mut hub_config = HubConfig::new(dir.path().join("hub"));
    hub_config.listen = "127.0.0.1:0".parse()?;
    let hub = Hub::start(hub_config, client.clone()).await?;
    Ok(Cluster {
        _api: api,
        client,
        hub,
        dir,
    })
}

async fn create_all(client: &kube::Client, objects: usize, node: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    futures_util::stream::iter(0..objects / 2)
        .map(|i| {
            let (pods, cms) = (pods.clone(), cms.clone());
            async move {
                let cm = format!("cfg-{i:05}");
                cms.create(&PostParams::default(), &config_map(&cm, "1"))
                    .await?;
                pods.create(
                    &PostParams::default(),
                    &pod(&format!("pod-{i:05}"), node, &cm, 0),
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
    Ok(())
}

async fn reconnect_and_idle(args: &Args) -> Result<()> {
    let c = cluster().await?;
    let proxy = sedna_testkit::TcpProxy::start(c.hub.addr()).await?;
    create_all(&c.client, args.objects, "edge-bench").await?;
    let token =
        sedna_cloudcore::tokens::create(&c.client, Some("edge-bench"), Duration::from_secs(600))
            .await?;
    let edge_dir = c.dir.path().join("edge");
    sedna_edgecore::join::join(
        &c.hub.addr().to_string(),
        &token.to_string(),
        "edge-bench",
        &edge_dir,
    )
    .await?;
    let config = EdgeConfig::new(proxy.addr().to_string(), &edge_dir);

    let total = |p: &sedna_testkit::TcpProxy| p.bytes_to_client() + p.bytes_to_target();
    let started = Instant::now();
    let edge = EdgeHub::start(config.clone()).await?;
    wait_until("the full sync", Duration::from_secs(120), || {
        edge.store().len().unwrap_or(0) >= args.objects && edge.status().borrow().synced
    })
    .await?;
    let full_bytes = total(&proxy);
    println!(
        "full sync of {} objects: {} bytes in {:.2} s",
        args.objects,
        full_bytes,
        started.elapsed().as_secs_f64()
    );

    // Idle: nothing changes; only heartbeats cross.
    let before = total(&proxy);
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let idle = total(&proxy) - before;
    println!(
        "idle: {idle} bytes in {} s = {:.4} kbit/s per node (both directions, default heartbeat)",
        args.idle_seconds,
        idle as f64 * 8.0 / args.idle_seconds as f64 / 1000.0
    );

    // Disconnect, change 1%, reconnect.
    edge.shutdown().await;
    let changed = args.objects / 100;
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    for i in 0..changed {
        let name = format!("cfg-{:05}", i * (args.objects / 2) / changed);
        cms.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": { "v": "2" } })),
        )
        .await
        .with_context(|| format!("patching {name}"))?;
    }
    let before = total(&proxy);
    let started = Instant::now();
    let edge = EdgeHub::start(config).await?;
    let store = edge.store().clone();
    let mut status = edge.status();
    while !status.borrow().synced {
        status.changed().await?;
    }
    let check = format!("cfg-{:05}", (changed - 1) * (args.objects / 2) / changed);
    wait_until("the changes", Duration::from_secs(60), || {
        store
            .get("ConfigMap", "default", &check)
            .ok()
            .flatten()
            .is_some_and(|o| String::from_utf8_lossy(&o.value).contains("\"v\":\"2\""))
    })
    .await?;
    let resync = total(&proxy) - before;
    println!(
        "reconnect after {changed} of {} objects changed: {resync} bytes in {:.2} s = {:.2}% of the full sync (hub: {} buckets, {} objects wanted)",
        args.objects,
        started.elapsed().as_secs_f64(),
        resync as f64 * 100.0 / full_bytes as f64,
        c.hub
            .stats()
            .manifest_buckets
            .load(std::sync::atomic::Ordering::Relaxed),
        c.hub
            .stats()
            .objects_wanted
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    edge.shutdown().await;
    c.hub.shutdown().await;
    Ok(())
}

async fn latency(args: &Args) -> Result<()> {
    let c = cluster().await?;
    let token = sedna_cloudcore::tokens::create(&c.client, None, Duration::from_secs(3600))
        .await?
        .to_string();
    let hub = c.hub.addr().to_string();
    let started = Instant::now();
    let joined: Vec<String> = futures_util::stream::iter(0..args.nodes)
        .map(|i| {
            let (hub, token, dir) = (
                hub.clone(),
                token.clone(),
                c.dir.path().join(format!("n{i}")),
            );
            async move {
                let node = format!("sim-{i:04}");
                sedna_edgecore::join::join(&hub, &token, &node, &dir).await?;
                anyhow::Ok(node)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    println!(
        "{} nodes joined in {:.1} s",
        joined.len(),
        started.elapsed().as_secs_f64()
    );
    let origin = Instant::now();
    let delays: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut edges = Vec::new();
    let started = Instant::now();
    for i in 0..args.nodes {
        let mut config = EdgeConfig::new(hub.clone(), c.dir.path().join(format!("n{i}")));
        config.in_memory = true;
        let edge = EdgeHub::start(config).await?;
        let mut changes = edge.subscribe();
        let store = edge.store().clone();
        let delays = delays.clone();
        tokio::spawn(async move {
            loop {
                // A node's few objects never fill the change buffer; were it to lag, the
                // missed arrivals would show as a run that never completes, not a wrong figure.
                let change = match changes.recv().await {
                    Ok(change) => change,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                if let Change::Upserted(o) = change
                    && o.kind == "Pod"
                    && let Ok(Some(stored)) = store.get("Pod", &o.namespace, &o.name)
                    && let Ok(pod) = serde_json::from_slice::<serde_json::Value>(&stored.value)
                    && let Some(sent) = pod
                        .pointer("/metadata/annotations/bench~1sent-ns")
                        .and_then(|s| s.as_str())
                        .and_then(|s| s.parse::<u128>().ok())
                    && sent > 0
                {
                    let now = origin.elapsed().as_nanos();
                    let mut d = delays
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    d.push(Duration::from_nanos(now.saturating_sub(sent) as u64));
                }
            }
        });
        edges.push(edge);
    }
    let synced = || edges.iter().filter(|e| e.status().borrow().synced).count();
    wait_until("every node connected", Duration::from_secs(300), || {
        synced() == args.nodes
    })
    .await?;
    println!(
        "{} simulated nodes connected and synced in {:.1} s",
        args.nodes,
        started.elapsed().as_secs_f64()
    );
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    cms.create(&PostParams::default(), &config_map("shared", "1"))
        .await?;
    let mut rng = rand::rng();
    let mut per_node: BTreeMap<usize, usize> = BTreeMap::new();
    for i in 0..args.changes {
        let node = rng.random_range(0..args.nodes);
        *per_node.entry(node).or_default() += 1;
        let sent = origin.elapsed().as_nanos();
        pods.create(
            &PostParams::default(),
            &pod(
                &format!("p-{i:05}"),
                &format!("sim-{node:04}"),
                "shared",
                sent,
            ),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_until("every change delivered", Duration::from_secs(60), || {
        delays.lock().map(|d| d.len()).unwrap_or(0) >= args.changes
    })
    .await?;
    let mut d = delays
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    d.sort();
    println!(
        "change -> persisted on edge with {} connected nodes ({} pods created, each with a config map it needs): p50 {}, p99 {}, max {}",
        args.nodes,
        args.changes,
        ms(percentile(&d, 0.5)),
        ms(percentile(&d, 0.99)),
        ms(d.last().copied().unwrap_or_default())
    );
    for e in edges {
        e.shutdown().await;
    }
    c.hub.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.skip.iter().any(|s| s == "reconnect") {
        reconnect_and_idle(&args).await?;
    }
    if !args.skip.iter().any(|s| s == "latency") {
        latency(&args).await?;
    }
    Ok(())
}
