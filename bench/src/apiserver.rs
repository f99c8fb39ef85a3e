//! Benchmark of the embedded API server, driven over HTTPS by kube-rs clients in the same
//! process (so client and server share the machine's cores):
//!
//! 1. durable creates per second (every write acknowledged after its group commit's fsync);
//! 2. durable updates per second;
//! 3. list latency with 10,000 objects;
//! 4. watch delivery latency with 100 concurrent watchers (time from the start of a write to
//!    its event arriving at each watcher).
//!
//! With `--hostile-yaml` it instead times the request-body decoder on hostile YAML bodies
//! (deep flow nesting, in-process, no server), and with `--before` also the YAML parser alone
//! on them (what the decoder did before it bounded the parser's work).
//!
//! `cargo run --release -p sedna-bench --bin apiserver-bench -- --help`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, ObjectMeta, PostParams, WatchEvent, WatchParams};

mod common;
use common::{percentile, start_apiserver};

#[derive(Parser)]
struct Args {
    /// Objects to create (and then update).
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Lists of all objects to time.
    #[arg(long, default_value_t = 20)]
    lists: usize,
    /// Concurrent watchers.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Writes whose delivery the watchers time.
    #[arg(long, default_value_t = 500)]
    watched_writes: usize,
    /// Acknowledge writes without fsync (survives kill -9, not power loss).
    #[arg(long)]
    no_fsync: bool,
    /// Time the body decoder on hostile YAML bodies instead (no server).
    #[arg(long)]
    hostile_yaml: bool,
    /// With --hostile-yaml, also time the YAML parser alone on each body (minutes).
    #[arg(long)]
    before: bool,
}

/// Times `handlers::decode_body` (and with `before` the YAML parser alone) on bodies that nest
/// flow collections deeply, and on the costliest body the decoder still parses.
fn hostile_yaml(before: bool) {
    use sedna_apiserver::handlers::{MAX_YAML_FLOW_WORK, decode_body};
    let mut bodies = vec![
        ("{a: x 10,000 deep".to_owned(), "{a: ".repeat(10_000)),
        ("{a: x 50,000 deep".to_owned(), "{a: ".repeat(50_000)),
        ("{a: x 100,000 deep".to_owned(), "{a: ".repeat(100_000)),
        ("[ x 200,000 deep".to_owned(), "[".repeat(200_000)),
    ];
    // The worst the limit lets through: as many `{a: ` as allowed, then keys without values
    // (each one a simple key libyaml checks against every open level) up to 3 MiB; and the
    // same keys one level deep, for what a body this size costs anyway.
    let len = 3 << 20;
    for open in [MAX_YAML_FLOW_WORK / len, 1] {
        let mut body = "{a: ".repeat(open);
        while body.len() + 3 + open <= len {
            body.push_str("b, ");
        }
        body.push_str(&"}".repeat(open));
        bodies.push((format!("{open} open, then keys to 3 MiB"), body));
    }
    println!("| body | bytes | decoder | outcome | YAML parser alone |");
    println!("|---|---|---|---|---|");
    for (name, body) in bodies {
        let started = Instant::now();
        let outcome = match decode_body("application/yaml", body.as_bytes()) {
            Ok(_) => "parsed".to_owned(),
            Err(e) => format!(
                "{} {}",
                e.code,
                e.message.chars().take(40).collect::<String>()
            ),
        };
        let decoder = started.elapsed();
        let alone = if before {
            let started = Instant::now();
            let _ = serde_norway::from_slice::<serde_json::Value>(body.as_bytes());
            ms(started.elapsed())
        } else {
            "-".to_owned()
        };
        println!(
            "| {name} | {} | {} | {outcome}… | {alone} |",
            body.len(),
            ms(decoder)
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("bench".to_owned(), "yes".to_owned())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("value".to_owned(), value.to_owned()),
            ("padding".to_owned(), "x".repeat(200)),
        ])),
        ..Default::default()
    }
}

/// Runs `count` operations with `concurrency` workers; returns operations per second.
async fn throughput<F, Fut>(count: usize, concurrency: usize, op: F) -> Result<f64>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let started = Instant::now();
    futures_util::stream::iter(0..count)
        .map(|i| {
            let op = op.clone();
            async move { op(i).await }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.hostile_yaml {
        hostile_yaml(args.before);
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (server, client) = start_apiserver(dir.path(), !args.no_fsync).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    println!(
        "apiserver-bench: {} objects, {} writers, {} watchers, durability {}",
        args.objects,
        args.concurrency,
        args.watchers,
        if args.no_fsync {
            "process (no fsync)"
        } else {
            "full (fsync per group commit)"
        }
    );

    let creates = {
        let cms = cms.clone();
        throughput(args.objects, args.concurrency, move |i| {
            let cms = cms.clone();
            async move {
                cms.create(
                    &PostParams::default(),
                    &config_map(&format!("o{i:06}"), "0"),
                )
                .await
                .map(drop)
                .context("create")
            }
        })
        .await?
    };
    println!("creates: {creates:.0} per second");

    let updates = {
        let cms = cms.clone();
        throughput(args.objects, args.concurrency, move |i| {
            let cms = cms.clone();
            async move {
                let mut obj = config_map(&format!("o{i:06}"), "1");
                obj.metadata.resource_version = None;
                let patch = serde_json::json!({ "data": { "value": "1" } });
                cms.patch(
                    &format!("o{i:06}"),
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .map(drop)
                .context("update")
            }
        })
        .await?
    };
    println!("updates: {updates:.0} per second");

    let mut list_times = Vec::new();
    for _ in 0..args.lists {
        let started = Instant::now();
        let list = cms.list(&ListParams::default()).await?;
        list_times.push(started.elapsed());
        anyhow::ensure!(
            list.items.len() >= args.objects,
            "short list: {}",
            list.items.len()
        );
    }
    list_times.sort();
    println!(
        "list of {} objects: p50 {}, p99 {}",
        args.objects,
        ms(percentile(&list_times, 0.5)),
        ms(percentile(&list_times, 0.99))
    );

    // Watchers on a separate namespace-free selector: only the watched writes match.
    let origin = Instant::now();
    let rv = cms
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        let cms = cms.clone();
        let tx = tx.clone();
        let rv = rv.clone();
        let expected = args.watched_writes;
        watchers.push(tokio::spawn(async move {
            let params = WatchParams::default().labels("watched=yes").timeout(290);
            let mut stream = cms.watch(&params, &rv).await?.boxed();
            let mut seen = 0;
            while let Some(event) = stream.try_next().await? {
                if let WatchEvent::Added(obj) = event {
                    let sent: u128 = obj
                        .data
                        .as_ref()
                        .and_then(|d| d.get("sent"))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_default();
                    let now = origin.elapsed().as_nanos();
                    let _ = tx.send(Duration::from_nanos(now.saturating_sub(sent) as u64));
                    seen += 1;
                    if seen == expected {
                        break;
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writer = Arc::new(cms.clone());
    for i in 0..args.watched_writes {
        let mut obj = config_map(&format!("w{i:05}"), "0");
        obj.metadata
            .labels
            .get_or_insert_default()
            .insert("watched".into(), "yes".into());
        obj.data
            .get_or_insert_default()
            .insert("sent".into(), origin.elapsed().as_nanos().to_string());
        writer.create(&PostParams::default(), &obj).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut delays = Vec::new();
    while let Some(d) = rx.recv().await {
        delays.push(d);
    }
    for w in watchers {
        w.await??;
    }
    delays.sort();
    println!(
        "watch delivery ({} watchers x {} writes = {} events): p50 {}, p99 {}",
        args.watchers,
        args.watched_writes,
        delays.len(),
        ms(percentile(&delays, 0.5)),
        ms(percentile(&delays, 0.99))
    );
    server.shutdown().await;
    Ok(())
}
