//! `hub-bench`: a hub tier under a simulated fleet, everything on this machine as separate
//! processes — `sedna apiserver`, one or more `sedna cloudcore` hubs, and simulator processes
//! (this binary's `sim` mode) each running many nodes with the real edge code: join with a
//! CSR, mutual TLS, attach, resync, heartbeats, the outbox, redirects, and the agent's own
//! Node and Lease reporting (`sedna_edgecore::node::run`); stores in memory; each simulator
//! process connects from its own loopback address.
//!
//! Measures: time to connect and sync the fleet; hub RSS and CPU per connected idle node;
//! one change every node needs (a ConfigMap used by a pod on every node) → persisted on every
//! node (p50 / p99 / max); a pod created for one node → Running in the API (p50 / p99 / max,
//! the node reporting it Running as it arrives); the API server's write rate while idle (node
//! liveness) and, with
//! several hubs, during the storm after `kill -9` of one hub, with the time until every node is
//! connected and synced again. A timeline (seconds, connected, synced, hubs' RSS) goes to a
//! CSV file, the fan-out delays beside it, and both are plotted to an SVG
//! (`hub-bench plot --out x.svg a.csv b.csv` draws several runs together). Each hub's log
//! goes to `$TMPDIR/hub-bench-<id>.log`, each simulator's to `$TMPDIR/hub-bench-sim-<k>.log`.
//!
//! ```text
//! cargo build --release -p sedna-cli -p sedna-bench --bin sedna --bin hub-bench
//! target/release/hub-bench --nodes 10000 --hubs 1 --sims 1
//! target/release/hub-bench --nodes 10000 --hubs 3 --sims 2 --kill
//! ```

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use common::{Killed, free_port, kube_client, sedna_binary};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    sim: Option<Mode>,
    /// Simulated nodes in all.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Hubs (more than one: a multi-primary tier).
    #[arg(long, default_value_t = 1)]
    hubs: usize,
    /// Simulator processes (each from its own loopback address).
    #[arg(long, default_value_t = 1)]
    sims: usize,
    /// Seconds of idle fleet to measure CPU and the API write rate over.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Partitions of a tier.
    #[arg(long, default_value_t = 32)]
    partitions: u32,
    /// Pods created one by one (10 a second, each for another node) to time pod → Running.
    #[arg(long, default_value_t = 200)]
    pod_runs: usize,
    /// Nodes each simulator brings up per second after they joined (0: all at once). A
    /// fleet larger than the machine can handshake at once (30,000 nodes) needs a ramp.
    #[arg(long, default_value_t = 0)]
    ramp: usize,
    /// The simulated nodes attach over gRPC instead of the framed channel (to compare).
    #[arg(long)]
    grpc_channel: bool,
    /// Kill -9 one hub at the end and time the takeover (with --hubs > 1).
    #[arg(long)]
    kill: bool,
    /// Where the timeline CSV goes.
    #[arg(long, default_value = "hub-bench-timeline.csv")]
    timeline: PathBuf,
    /// A program that runs each hub (a profiler: `--hub-wrapper heaptrack`), split on spaces.
    #[arg(long)]
    hub_wrapper: Option<String>,
    /// A program that runs each simulator (`--sim-wrapper heaptrack`), split on spaces.
    #[arg(long)]
    sim_wrapper: Option<String>,
}

#[derive(Subcommand)]
enum Mode {
    /// Plots timeline CSVs (and their `.fanout.csv`, when present) to one SVG.
    Plot {
        /// Where the SVG goes.
        #[arg(long)]
        out: PathBuf,
        /// Timeline CSVs written by earlier runs.
        timelines: Vec<PathBuf>,
    },
    /// Internal: one simulator process.
    Sim {
        #[arg(long)]
        hubs: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        source: std::net::IpAddr,
        #[arg(long, default_value_t = 0)]
        ramp: usize,
        #[arg(long)]
        grpc_channel: bool,
    },
}

/// How a simulator brings its nodes up.
#[derive(Clone, Copy, Debug)]
struct SimOptions {
    /// Nodes per second (0: all at once).
    ramp: usize,
    /// Attach over gRPC instead of the framed channel.
    grpc_channel: bool,
}

/// Names of the pods of the pod-to-running test.
const RUN_POD_PREFIX: &str = "run-";

fn node_name(i: usize) -> String {
    format!("sim-{i:06}")
}

/// Node `i`'s loopback address: spread over 127.0.0.2–127.0.0.255 (`base` for other than
/// IPv4 loopback).
fn node_address(base: std::net::IpAddr, i: usize) -> std::net::IpAddr {
    match base {
        std::net::IpAddr::V4(v4) if v4.is_loopback() => {
            std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 254) as u8).into()
        }
        other => other,
    }
}

// ---- the simulator ----

async fn simulate(
    hubs: String,
    token: String,
    dir: PathBuf,
    first: usize,
    count: usize,
    source: std::net::IpAddr,
    options: SimOptions,
) -> Result<()> {
    let SimOptions { ramp, grpc_channel } = options;
    let join_hub = hubs.split(',').next().unwrap_or_default().to_owned();
    let joined: Vec<usize> = futures_util::stream::iter(first..first + count)
        .map(|i| {
            let (hub, token, dir) = (join_hub.clone(), token.clone(), dir.join(i.to_string()));
            async move {
                // A hub under a join storm drops handshakes past its bounds: try again, as an
                // operator's script would.
                let mut attempt = 0u32;
                while sedna_edgecore::join::Identity::load(&dir)?.is_none() {
                    match sedna_edgecore::join::join(&hub, &token, &node_name(i), &dir).await {
                        Ok(_) => break,
                        Err(e) if attempt < 30 => {
                            attempt += 1;
                            let ms = 200 * u64::from(attempt.min(10)) + (i as u64 * 7919) % 500;
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            let _ = e;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                anyhow::Ok(i)
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    println!("joined {}", joined.len());
    let mut edges = Vec::with_capacity(count);
    let mut pace = tokio::time::interval(Duration::from_secs(1));
    for i in first..first + count {
        if ramp > 0 && (i - first).is_multiple_of(ramp) {
            pace.tick().await;
        }
        let mut config = sedna_edgecore::EdgeConfig::new(hubs.clone(), dir.join(i.to_string()));
        config.in_memory = true;
        // A simulated node's few objects (a ConfigMap, a pod or two) never need more.
        config.change_buffer = 16;
        config.seed = i as u64;
        config.grpc_channel = grpc_channel;
        // Each node from its own loopback address, as a real fleet (the hub's per-source
        // handshake bound would otherwise throttle a whole simulator).
        let source = node_address(source, i);
        config.source_address = Some(source);
        let edge = sedna_edgecore::EdgeHub::start(config).await?;
        let node = sedna_edgecore::node::NodeConfig {
            name: node_name(i),
            labels: BTreeMap::new(),
            role: "edge".into(),
            host_ip: source.to_string(),
            data_dir: dir.clone(),
            lease_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
            status_interval: Duration::from_secs(300),
        };
        tokio::spawn(sedna_edgecore::node::run(
            node,
            edge.reporter(),
            edge.status(),
        ));
        // Each arrival of the fan-out ConfigMap: its value and when (unix ns). A pod of the
        // pod-to-running test "runs" as soon as it arrives: the node reports it Running.
        let mut changes = edge.subscribe();
        let store = edge.store().clone();
        let reporter = edge.reporter();
        tokio::spawn(async move {
            loop {
                // A node's few objects never fill the change buffer; were it to lag, the
                // missed arrivals would show as a run that never completes, not a wrong figure.
                let change = match changes.recv().await {
                    Ok(change) => change,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                if let sedna_edgecore::store::Change::Upserted(o) = &change
                    && o.kind == "Pod"
                    && o.name.starts_with(RUN_POD_PREFIX)
                {
                    let at = jiff::Timestamp::now().as_nanosecond();
                    println!("podrun {} {at}", o.name);
                    let upstream = sedna_proto::channel::Upstream {
                        kind: sedna_proto::channel::upstream::Kind::Status as i32,
                        object: Some(sedna_proto::channel::ObjectRef {
                            api_version: "v1".into(),
                            kind: "Pod".into(),
                            namespace: o.namespace.clone(),
                            name: o.name.clone(),
                            uid: o.uid.clone(),
                        }),
                        payload: serde_json::json!({ "status": { "phase": "Running",
                            "conditions": [{ "type": "Ready", "status": "True" }] } })
                        .to_string()
                        .into_bytes(),
                    };
                    let _ = reporter.report(&upstream);
                    continue;
                }
                if let sedna_edgecore::store::Change::Upserted(o) = change
                    && o.kind == "ConfigMap"
                    && o.name == "fanout"
                    && let Ok(Some(stored)) = store.get("ConfigMap", "default", "fanout")
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&stored.value)
                {
                    let at = jiff::Timestamp::now().as_nanosecond();
                    println!("fanout {} {i} {at}", v["data"]["v"].as_str().unwrap_or("?"));
                }
            }
        });
        edges.push(edge);
    }
    loop {
        let (mut connected, mut synced) = (0, 0);
        for e in &edges {
            let s = e.status().borrow().clone();
            connected += usize::from(s.connected);
            synced += usize::from(s.connected && s.synced);
        }
        println!("status {connected} {synced}");
        std::io::stdout().flush()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

// ---- the orchestrator ----

#[derive(Default)]
struct Fleet {
    /// Per simulator: (connected, synced).
    status: BTreeMap<usize, (usize, usize)>,
    /// Fan-out arrivals: value → node → first arrival (unix ns); a node may get the same
    /// version twice (a retransmission), the first counts.
    arrivals: BTreeMap<String, BTreeMap<String, i128>>,
    /// Pods of the pod-to-running test: first arrival on their node (unix ns).
    pod_arrivals: BTreeMap<String, i128>,
}

impl Fleet {
    fn totals(&self) -> (usize, usize) {
        self.status
            .values()
            .fold((0, 0), |(c, s), (a, b)| (c + a, s + b))
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process used.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

/// The API server's newest resource version (every write raises it by one), from its
/// `/metrics` at `addr`.
fn revision(addr: &str) -> Result<u64> {
    metric(addr, "sedna_apiserver_revision")
}

/// A metric's value from the Prometheus text at `addr`'s `/metrics`.
fn metric(addr: &str, name: &str) -> Result<u64> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .with_context(|| format!("no {name} in the metrics of {addr}"))
}

async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn percentile_ns(sorted: &[i128], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

struct Hub {
    id: String,
    addr: String,
    metrics: String,
    process: Option<Killed>,
}

async fn orchestrate(args: Args) -> Result<()> {
    let sedna = sedna_binary()?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (api_port, metrics_port) = (free_port()?, free_port()?);
    let metrics = format!("127.0.0.1:{metrics_port}");
    let api = Killed(
        Command::new(&sedna)
            .args(["apiserver", "--no-fsync", "--listen"])
            .arg(format!("127.0.0.1:{api_port}"))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--data-dir")
            .arg(d.join("api"))
            .stdout(Stdio::null())
            .spawn()?,
    );
    let kubeconfig = d.join("api/kubeconfig");
    wait_for("the API server", Duration::from_secs(60), || {
        kubeconfig.exists().then_some(())
    })
    .await?;
    let client = kube_client(&kubeconfig).await?;
    let mut hubs: Vec<Hub> = Vec::new();
    for h in 0..args.hubs {
        let port = free_port()?;
        let hub_metrics = format!("127.0.0.1:{}", free_port()?);
        let id = format!("h{}", h + 1);
        let mut c = wrapped(args.hub_wrapper.as_deref(), &sedna)?;
        c.arg("cloudcore")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--data-dir")
            .arg(d.join("hub"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--metrics-addr", &hub_metrics]);
        if args.hubs > 1 {
            c.args([
                "--partitions",
                &args.partitions.to_string(),
                "--hub-id",
                &id,
                "--multi-primary",
            ]);
        }
        let log = std::fs::File::create(std::env::temp_dir().join(format!("hub-bench-{id}.log")))?;
        let mut log_out = log.try_clone()?;
        let child = c.stdout(Stdio::piped()).stderr(log).spawn()?;
        let mut hub = Killed(child);
        // A line says it listens (and the shared CA exists for the next hub); a wrapper may
        // print first.
        let mut out = BufReader::new(hub.0.stdout.take().context("hub stdout")?);
        let mut line = String::new();
        for _ in 0..20 {
            line.clear();
            if out.read_line(&mut line)? == 0 || line.contains("hub listening") {
                break;
            }
        }
        anyhow::ensure!(line.contains("hub listening"), "hub {id}: {line}");
        // Keep draining its output (to its log) so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut log_out));
        hubs.push(Hub {
            id,
            addr: format!("127.0.0.1:{port}"),
            metrics: hub_metrics,
            process: Some(hub),
        });
    }
    if args.hubs > 1 {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), "kube-system");
        let start = Instant::now();
        loop {
            let held = leases
                .list(&kube::api::ListParams::default().labels("sedna.io/hub-partition-lease"))
                .await?
                .items
                .iter()
                .filter(|l| {
                    l.spec
                        .as_ref()
                        .and_then(|s| s.holder_identity.as_deref())
                        .is_some_and(|h| !h.is_empty())
                })
                .count();
            if held == args.partitions as usize {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(120),
                "partitions never all held"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Let the tier spread (hubs joined one after another).
        tokio::time::sleep(Duration::from_secs(20)).await;
    }
    let hub_pids: Vec<u32> = hubs
        .iter()
        .filter_map(|h| h.process.as_ref().map(|p| p.0.id()))
        .collect();
    let rss_before: u64 = hub_pids.iter().map(|p| rss_kib(*p)).sum();
    let token = sedna_cloudcore::tokens::create(&client, None, Duration::from_secs(6 * 3600))
        .await?
        .to_string();

    let fleet: Arc<Mutex<Fleet>> = Arc::default();
    let me = std::env::current_exe()?;
    let per = args.nodes.div_ceil(args.sims);
    let mut sims = Vec::new();
    let started = Instant::now();
    for k in 0..args.sims {
        let first = k * per;
        let count = per.min(args.nodes.saturating_sub(first));
        let seeds: Vec<String> = (0..hubs.len())
            .map(|j| hubs[(j + k) % hubs.len()].addr.clone())
            .collect();
        let mut command = wrapped(args.sim_wrapper.as_deref(), &me)?;
        let mut child = command
            .args(["sim", "--hubs", &seeds.join(","), "--token", &token])
            .arg("--dir")
            .arg(d.join(format!("sim-{k}")))
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--source", &format!("127.0.0.{}", 2 + k)])
            .args(["--ramp", &args.ramp.to_string()])
            .args(args.grpc_channel.then_some("--grpc-channel"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(sim_log(k))?)
            .spawn()?;
        let out = BufReader::new(child.stdout.take().context("sim stdout")?);
        let fleet = fleet.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let w: Vec<&str> = line.split_whitespace().collect();
                let mut f = fleet.lock().unwrap_or_else(|e| e.into_inner());
                match w.as_slice() {
                    ["status", c, s] => {
                        f.status
                            .insert(k, (c.parse().unwrap_or(0), s.parse().unwrap_or(0)));
                    }
                    ["fanout", v, node, at] => {
                        f.arrivals
                            .entry(v.to_string())
                            .or_default()
                            .entry(node.to_string())
                            .or_insert(at.parse().unwrap_or(0));
                    }
                    ["podrun", name, at] => {
                        f.pod_arrivals
                            .entry(name.to_string())
                            .or_insert(at.parse().unwrap_or(0));
                    }
                    _ => {}
                }
            }
        });
        sims.push(Killed(child));
    }
    let mut timeline = std::fs::File::create(&args.timeline)?;
    writeln!(timeline, "seconds,connected,synced,hub_rss_kib")?;
    let sample = |timeline: &mut std::fs::File, fleet: &Mutex<Fleet>| -> Result<(usize, usize)> {
        let (c, s) = fleet.lock().unwrap_or_else(|e| e.into_inner()).totals();
        let rss: u64 = hub_pids.iter().map(|p| rss_kib(*p)).sum();
        writeln!(
            timeline,
            "{:.1},{c},{s},{rss}",
            started.elapsed().as_secs_f64()
        )?;
        Ok((c, s))
    };
    loop {
        let (c, s) = sample(&mut timeline, &fleet)?;
        if s == args.nodes {
            break;
        }
        for (k, sim) in sims.iter_mut().enumerate() {
            if let Some(status) = sim.0.try_wait()? {
                bail!(
                    "simulator {k} exited ({status}); its log: {}",
                    sim_log(k).display()
                );
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "only {c} connected, {s} synced after 30 min"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let connect_time = started.elapsed();
    let api_cpu_joined = cpu_seconds(api.0.id());
    let partitions_lost = |hubs: &[Hub]| -> u64 {
        hubs.iter()
            .filter_map(|h| metric(&h.metrics, "sedna_hub_partitions_lost_total").ok())
            .sum()
    };
    println!(
        "{} nodes joined, connected and synced in {:.1} s (API server CPU so far: {:.1} s); partitions the hubs lost (not renewed in time): {}",
        args.nodes,
        connect_time.as_secs_f64(),
        api_cpu_joined,
        partitions_lost(&hubs)
    );

    // One change every node needs: a ConfigMap each node's pod uses.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(
            serde_json::json!({"metadata": {"name": "fanout"}, "data": {"v": "1"}}),
        )?,
    )
    .await?;
    futures_util::stream::iter(0..args.nodes)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("p-{}", node_name(i))},
                    "spec": {"nodeName": node_name(i), "containers": [{"name": "c", "image": "sh",
                        "env": [{"name": "V", "valueFrom": {"configMapKeyRef": {"name": "fanout", "key": "v"}}}]}]},
                }))?;
                pods.create(&PostParams::default(), &pod).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    wait_for("v1 on every node", Duration::from_secs(300), || {
        (fleet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .arrivals
            .get("1")
            .map_or(0, BTreeMap::len)
            >= args.nodes)
            .then_some(())
    })
    .await?;
    let t0 = jiff::Timestamp::now().as_nanosecond();
    cms.patch(
        "fanout",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"v": "2"}})),
    )
    .await?;
    wait_for("v2 on every node", Duration::from_secs(300), || {
        (fleet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .arrivals
            .get("2")
            .map_or(0, BTreeMap::len)
            >= args.nodes)
            .then_some(())
    })
    .await?;
    let mut delays: Vec<i128> = fleet.lock().unwrap_or_else(|e| e.into_inner()).arrivals["2"]
        .values()
        .map(|at| at - t0)
        .collect();
    delays.sort_unstable();
    std::fs::write(
        fanout_path(&args.timeline),
        std::iter::once("ms".to_string())
            .chain(delays.iter().map(|d| format!("{:.1}", *d as f64 / 1e6)))
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    println!(
        "fan-out of one ConfigMap change to {} nodes: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        delays.len(),
        percentile_ns(&delays, 0.5),
        percentile_ns(&delays, 0.99),
        percentile_ns(&delays, 1.0)
    );
    // The join's last writes (each node's first Node status, queued in the hubs for an API
    // permit) may still run after the join is counted: only the sum of both phases compares
    // between runs.
    let api_cpu_fanout = cpu_seconds(api.0.id());
    println!(
        "API server CPU: {:.1} s to join, {:.1} s for the pods and the fan-out, {:.1} s in all",
        api_cpu_joined,
        api_cpu_fanout - api_cpu_joined,
        api_cpu_fanout
    );

    // Idle: hub memory and CPU per node, API writes from node liveness.
    tokio::time::sleep(Duration::from_secs(5)).await;
    // What the hubs did meanwhile, summed over hubs.
    let hub_sum = |name: &str| -> u64 {
        hubs.iter()
            .filter_map(|h| metric(&h.metrics, name).ok())
            .sum()
    };
    let counters = [
        "sedna_hub_upstream_applied_total",
        "sedna_hub_lease_writes_skipped_total",
        "sedna_hub_upserts_sent_total",
        "sedna_hub_nodes_marked_not_ready_total",
        "sedna_hub_node_status_only_total",
    ];
    let before: Vec<u64> = counters.iter().map(|c| hub_sum(c)).collect();
    let sim_cpu = || sims.iter().map(|s| cpu_seconds(s.0.id())).sum::<f64>();
    let api_pid = api.0.id();
    let (rev0, cpu0, sim_cpu0, api_cpu0, at0) = (
        revision(&metrics)?,
        hub_pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>(),
        sim_cpu(),
        cpu_seconds(api_pid),
        Instant::now(),
    );
    for _ in 0..args.idle_seconds {
        sample(&mut timeline, &fleet)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let secs = at0.elapsed().as_secs_f64();
    let writes = (revision(&metrics)? - rev0) as f64 / secs;
    let cpu = (hub_pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0) / secs;
    let (sims_cpu, api_cpu) = (
        (sim_cpu() - sim_cpu0) / secs,
        (cpu_seconds(api_pid) - api_cpu0) / secs,
    );
    let rss_after: u64 = hub_pids.iter().map(|p| rss_kib(*p)).sum();
    println!(
        "hubs: RSS {} MiB idle with the fleet ({} MiB before it), {:.1} KiB per node; CPU {:.1}% of a core, {:.2} µs/s per node",
        rss_after / 1024,
        rss_before / 1024,
        (rss_after.saturating_sub(rss_before)) as f64 / args.nodes as f64,
        cpu * 100.0,
        cpu * 1e6 / args.nodes as f64
    );
    let sim_rss: u64 = sims.iter().map(|s| rss_kib(s.0.id())).sum();
    println!(
        "simulators: RSS {} MiB, {:.1} KiB per simulated node (its client connection, store and agent tasks); CPU idle {:.1}% of a core, {:.2} µs/s per node",
        sim_rss / 1024,
        sim_rss as f64 / args.nodes as f64,
        sims_cpu * 100.0,
        sims_cpu * 1e6 / args.nodes as f64
    );
    println!(
        "API server writes while idle: {writes:.0}/s ({:.1} per node per minute); its CPU {:.1}% of a core",
        writes * 60.0 / args.nodes as f64,
        api_cpu * 100.0
    );
    let per_node_min = |i: usize| {
        (hub_sum(counters[i]).saturating_sub(before[i])) as f64 * 60.0 / secs / args.nodes as f64
    };
    println!(
        "hubs while idle, per node per minute: edge writes applied {:.2}, Lease renewals acknowledged without a write {:.2}, objects sent to edges {:.2}, Node status reports applied without their metadata {:.2}",
        per_node_min(0),
        per_node_min(1),
        per_node_min(2),
        per_node_min(4)
    );

    let marked_idle = hub_sum(counters[3]).saturating_sub(before[3]);
    pod_to_running(&client, &fleet, args.nodes, args.pod_runs).await?;
    // The API's view of liveness: every node of the connected fleet should be Ready (listed
    // after the pod phase: a list of the whole fleet is a burst of work it must not time).
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let not_ready = nodes
        .list(&kube::api::ListParams::default())
        .await?
        .items
        .iter()
        .filter(|n| {
            !n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    println!(
        "liveness: {marked_idle} nodes marked NotReady by the hubs while idle; {not_ready} of {} nodes not Ready in the API after the pod phase",
        args.nodes
    );

    if args.kill && hubs.len() > 1 {
        // Churn of the storm, summed over the hubs that stay.
        let storm_counters = [
            "sedna_hub_sessions_total",
            "sedna_hub_handshakes_dropped_total",
            "sedna_hub_redirects_total",
            "sedna_hub_handshakes_refused_total",
            "sedna_hub_handshakes_queued_total",
        ];
        let survivors = |hubs: &[Hub], name: &str| -> u64 {
            hubs.iter()
                .enumerate()
                .filter(|(j, _)| *j != 1)
                .filter_map(|(_, h)| metric(&h.metrics, name).ok())
                .sum()
        };
        let storm_before: Vec<u64> = storm_counters.iter().map(|c| survivors(&hubs, c)).collect();
        let victim = &mut hubs[1];
        let pid = victim
            .process
            .as_ref()
            .map(|p| p.0.id())
            .unwrap_or_default();
        let rev_kill = revision(&metrics)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let killed_at = Instant::now();
        if let Some(mut p) = victim.process.take() {
            let _ = p.0.wait();
            std::mem::forget(p);
        }
        println!("killed hub {} (kill -9)", victim.id);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut low = args.nodes;
        loop {
            let (c, s) = sample(&mut timeline, &fleet)?;
            low = low.min(c);
            if s == args.nodes && killed_at.elapsed() > Duration::from_secs(3) {
                break;
            }
            anyhow::ensure!(
                killed_at.elapsed() < Duration::from_secs(900),
                "no recovery after 15 min"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let took = killed_at.elapsed();
        let storm_writes = (revision(&metrics)? - rev_kill) as f64 / took.as_secs_f64();
        let storm: Vec<u64> = storm_counters
            .iter()
            .zip(&storm_before)
            .map(|(c, b)| survivors(&hubs, c).saturating_sub(*b))
            .collect();
        println!(
            "kill -9 of one hub: {} nodes dropped, all {} connected and synced again after {:.1} s; API writes {:.0}/s meanwhile",
            args.nodes - low,
            args.nodes,
            took.as_secs_f64(),
            storm_writes
        );
        println!(
            "  the other hubs meanwhile: {} sessions started, {} connections waited for a handshake slot, {} closed before their TLS handshake ({} refused on arrival, every slot and waiting place taken), {} redirects",
            storm[0], storm[4], storm[1], storm[3], storm[2]
        );
        println!(
            "  partitions the hubs lost (not renewed in time) since the start: {}",
            partitions_lost(&hubs)
        );
    }
    drop(sims);
    drop(timeline);
    let svg = args.timeline.with_extension("svg");
    plot(&svg, std::slice::from_ref(&args.timeline))?;
    println!("plots: {}", svg.display());
    Ok(())
}

/// One timed pod: (create → Running, Some((create → on its node, node Running → API
/// watch)) where the node's arrival was seen, pod name, node name); times in ns.
type TimedPod<'a> = (i128, Option<(i128, i128)>, &'a str, &'a str);

/// Creates `runs` pods, 10 a second, each bound to another node, and times each from its
/// create call to the API showing it Running (the simulated node reports it Running when
/// the pod reaches it): the API write, the hub's watch and routing, the channel down, the
/// status up, the hub's write, the API's watch. The time is split at the pod's arrival on
/// its node (the simulator's clock is this machine's): down (API → hub → node) and up
/// (node → hub → API → watch).
async fn pod_to_running(
    client: &kube::Client,
    fleet: &Mutex<Fleet>,
    nodes: usize,
    runs: usize,
) -> Result<()> {
    use kube::api::{WatchEvent, WatchParams};
    if runs == 0 {
        return Ok(());
    }
    let now_ns = || jiff::Timestamp::now().as_nanosecond();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let running: Arc<Mutex<BTreeMap<String, i128>>> = Arc::default();
    let watch = {
        let (pods, running) = (pods.clone(), running.clone());
        let params = WatchParams::default().labels("bench=run").timeout(290);
        let mut stream = pods.watch(&params, "0").await?.boxed();
        tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Some(Ok(WatchEvent::Modified(p) | WatchEvent::Added(p)))
                        if p.status.as_ref().and_then(|s| s.phase.as_deref())
                            == Some("Running") =>
                    {
                        if let Some(name) = p.metadata.name {
                            running
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .entry(name)
                                .or_insert_with(now_ns);
                        }
                    }
                    Some(Ok(_)) => {}
                    // A watch cut off under load: watch again (pods already Running keep the
                    // time they were first seen at).
                    Some(Err(_)) | None => loop {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Ok(s) = pods.watch(&params, "0").await {
                            stream = s.boxed();
                            break;
                        }
                    },
                }
            }
        })
    };
    let mut created: BTreeMap<String, (i128, String)> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for k in 0..runs {
        tick.tick().await;
        // Spread over the fleet: a stride coprime with most fleet sizes.
        let node = node_name((k * 7919) % nodes);
        let name = format!("{RUN_POD_PREFIX}{k:05}");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "bench": "run" } },
            "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "sh" }] },
        }))?;
        created.insert(name, (now_ns(), node));
        pods.create(&PostParams::default(), &pod).await?;
    }
    let all = wait_for("every timed pod Running", Duration::from_secs(120), || {
        (running.lock().unwrap_or_else(|e| e.into_inner()).len() >= runs).then_some(())
    })
    .await;
    watch.abort();
    if let Err(e) = all {
        // Say how far it got (and go on to the kill) rather than lose the run.
        let (on_node, running_now) = (
            fleet
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pod_arrivals
                .len(),
            running.lock().unwrap_or_else(|e| e.into_inner()).len(),
        );
        println!(
            "pod → Running: {e}: {on_node} of {runs} pods on their node, {running_now} Running"
        );
    }
    let running = running.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let arrived = fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pod_arrivals
        .clone();
    let mut timed: Vec<TimedPod<'_>> = created
        .iter()
        .filter_map(|(name, (at, node))| {
            let done = *running.get(name)?;
            let split = arrived.get(name).map(|a| (a - at, done - a));
            Some((done - at, split, name.as_str(), node.as_str()))
        })
        .collect();
    timed.sort_unstable();
    let summary = |mut v: Vec<i128>| {
        v.sort_unstable();
        format!(
            "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            percentile_ns(&v, 0.5),
            percentile_ns(&v, 0.99),
            percentile_ns(&v, 1.0)
        )
    };
    println!(
        "pod created for one node → Running in the API ({} pods, 10/s): {}",
        timed.len(),
        summary(timed.iter().map(|t| t.0).collect())
    );
    println!(
        "  down (create → on its node): {}; up (node reports Running → API watch): {}",
        summary(timed.iter().filter_map(|t| Some(t.1?.0)).collect()),
        summary(timed.iter().filter_map(|t| Some(t.1?.1)).collect()),
    );
    for (total, split, name, node) in timed.iter().rev().take(5) {
        let (down, up) = split.map_or(("?".into(), "?".into()), |(d, u)| {
            (
                format!("{:.0}", d as f64 / 1e6),
                format!("{:.0}", u as f64 / 1e6),
            )
        });
        println!(
            "  slowest: {name} on {node}: {:.0} ms (down {down} ms, up {up} ms)",
            *total as f64 / 1e6
        );
    }
    Ok(())
}

/// A command running `program`, under `wrapper` (a profiler and its arguments) if given. A
/// wrapped program runs in its own process group, so stopping the wrapper stops it too
/// ([`Killed`] signals the group): heaptrack's script does not pass SIGTERM on, and a hub
/// left behind keeps retrying its vanished API server.
fn wrapped(wrapper: Option<&str>, program: &std::path::Path) -> Result<Command> {
    use std::os::unix::process::CommandExt;
    Ok(match wrapper {
        Some(w) => {
            let mut words = w.split_whitespace();
            let mut c = Command::new(words.next().context("empty wrapper")?);
            c.args(words).arg(program).process_group(0);
            c
        }
        None => Command::new(program),
    })
}

fn sim_log(k: usize) -> PathBuf {
    std::env::temp_dir().join(format!("hub-bench-sim-{k}.log"))
}

fn fanout_path(timeline: &std::path::Path) -> PathBuf {
    timeline.with_extension("fanout.csv")
}

/// Rows of a CSV file of numbers (the header skipped).
fn read_csv(path: &std::path::Path) -> Result<Vec<Vec<f64>>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(text
        .lines()
        .skip(1)
        .map(|l| l.split(',').filter_map(|v| v.parse().ok()).collect())
        .collect())
}

/// Three panels: connected nodes and the hubs' RSS over time, and the fan-out CDF.
fn plot(out: &std::path::Path, timelines: &[PathBuf]) -> Result<()> {
    use plotters::prelude::*;
    let area = SVGBackend::new(out, (900, 1000)).into_drawing_area();
    area.fill(&WHITE)?;
    let panels = area.split_evenly((3, 1));
    let name = |p: &PathBuf| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let rows: Vec<(String, Vec<Vec<f64>>)> = timelines
        .iter()
        .map(|t| Ok((name(t), read_csv(t)?)))
        .collect::<Result<_>>()?;
    let column = |c: usize, scale: f64| -> Vec<(String, Vec<(f64, f64)>)> {
        rows.iter()
            .map(|(n, rows)| {
                let points = rows
                    .iter()
                    .filter_map(|r| Some((*r.first()?, *r.get(c)? / scale)))
                    .collect();
                (n.clone(), points)
            })
            .collect()
    };
    let x = "seconds since the simulators started";
    lines(
        &panels[0],
        "connected nodes over time",
        x,
        "connected nodes",
        &column(1, 1.0),
    )?;
    lines(
        &panels[1],
        "hubs' RSS over time",
        x,
        "hubs' RSS (MiB)",
        &column(3, 1024.0),
    )?;
    let cdfs: Vec<(String, Vec<(f64, f64)>)> = timelines
        .iter()
        .filter(|t| fanout_path(t).exists())
        .map(|t| {
            let mut ms: Vec<f64> = read_csv(&fanout_path(t))?
                .into_iter()
                .filter_map(|r| r.first().copied())
                .collect();
            ms.sort_by(f64::total_cmp);
            let n = ms.len().max(1) as f64;
            let points = ms
                .iter()
                .enumerate()
                .map(|(i, v)| (*v, (i + 1) as f64 / n))
                .collect();
            Ok((name(t), points))
        })
        .collect::<Result<_>>()?;
    lines(
        &panels[2],
        "one ConfigMap change → stored on every node: CDF",
        "ms after the change",
        "fraction of nodes",
        &cdfs,
    )?;
    area.present()?;
    Ok(())
}

/// One panel of named line series, axes from zero to the largest values.
fn lines(
    panel: &plotters::drawing::DrawingArea<plotters::prelude::SVGBackend, plotters::coord::Shift>,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    use plotters::prelude::*;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let max = |f: fn(&(f64, f64)) -> f64| {
        series
            .iter()
            .flat_map(|(_, p)| p.iter().map(f))
            .fold(1.0, f64::max)
    };
    let mut chart = ChartBuilder::on(panel)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max(|p| p.0) * 1.02, 0f64..max(|p| p.1) * 1.05)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    for ((name, points), color) in series.iter().zip(colors.iter().cycle()) {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.sim {
        Some(Mode::Plot { out, timelines }) => plot(&out, &timelines),
        Some(Mode::Sim {
            hubs,
            token,
            dir,
            first,
            count,
            source,
            ramp,
            grpc_channel,
        }) => {
            // The simulated agents' own logs go to the simulator's log (warnings unless
            // RUST_LOG says otherwise: thousands of agents log every reconnection).
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            let options = SimOptions { ramp, grpc_channel };
            runtime.block_on(simulate(hubs, token, dir, first, count, source, options))
        }
        None => runtime.block_on(orchestrate(args)),
    }
}
