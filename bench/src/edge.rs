//! Edge agent benchmark, with real processes: `sedna apiserver`, `sedna cloudcore` and one
//! `sedna edgecore` on 127.0.0.1.
//!
//! - apply → running: a Pod created through the API for the edge node, until its process is
//!   running on the node (its pid file written after the spawn), one pod at a time;
//! - idle RSS of edgecore supervising 100 running pods (each with a ConfigMap), with and
//!   without the local API;
//! - offline restart: hub stopped, edgecore killed with SIGKILL and started again, until
//!   every pod runs again;
//! - a first sync of pods applied while the node was down, each Pod before its ConfigMap,
//!   from the agent's start until every one of them runs.
//!
//! Build the `sedna` binary first: `cargo build --release -p sedna-cli`, then
//! `cargo run --release -p sedna-bench --bin edge-bench`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, PostParams};
use serde_json::json;

mod common;
use common::percentile;

#[derive(Parser)]
struct Args {
    /// The `sedna` binary (default: next to this one).
    #[arg(long)]
    sedna: Option<PathBuf>,
    /// Pods on the node.
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Pods timed one by one from apply to running.
    #[arg(long, default_value_t = 30)]
    timed: usize,
    /// Idle time before RSS is read.
    #[arg(long, default_value_t = 20)]
    idle_seconds: u64,
    /// Offline restarts timed.
    #[arg(long, default_value_t = 5)]
    restarts: usize,
    /// Pods (each with its own ConfigMap, created after it) applied while the node is down,
    /// timed from the agent's start until all run.
    #[arg(long, default_value_t = 150)]
    while_down: usize,
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn rss_kib(pid: u32) -> Result<(u64, u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((
        field("VmRSS:"),
        field("VmHWM:"),
        field("RssAnon:"),
        field("RssFile:"),
    ))
}

/// pid per pod name, from the pid files under the node's data dir.
fn pids(edge: &Path) -> std::collections::HashMap<String, i32> {
    let mut out = std::collections::HashMap::new();
    let Ok(dirs) = std::fs::read_dir(edge.join("pods")) else {
        return out;
    };
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let Some(pod) = name
            .strip_prefix("default_")
            .and_then(|r| r.rsplit_once('_'))
            .map(|(p, _)| p.to_owned())
        else {
            continue;
        };
        if let Some(pid) = std::fs::read_to_string(d.path().join("main.pid"))
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse().ok())
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
        {
            out.insert(pod, pid);
        }
    }
    out
}

fn pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "nodeName": "edge-1", "terminationGracePeriodSeconds": 1,
                  "containers": [{ "name": "main", "image": "sleep", "args": ["3600"],
                                   "envFrom": [{ "configMapRef": { "name": name } }] }] }
    }))?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let sedna = match args.sedna {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("sedna"),
    };
    if !sedna.exists() {
        bail!(
            "{} not found: run `cargo build --release -p sedna-cli` first",
            sedna.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let run = |args: &[&str]| {
        let mut c = Command::new(&sedna);
        c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        c
    };
    let mut procs = Procs(vec![]);
    let api_port = free_port()?;
    procs.0.push(
        run(&["apiserver", "--metrics-addr", "off", "--data-dir"])
            .arg(d.join("api"))
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .spawn()?,
    );
    let kubeconfig = d.join("api/kubeconfig");
    let client = loop {
        if kubeconfig.exists() {
            let file = kube::config::Kubeconfig::read_from(&kubeconfig)?;
            let config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
            let client = kube::Client::try_from(config)?;
            if client.apiserver_version().await.is_ok() {
                break client;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let hub_port = free_port()?;
    let cloud = format!("127.0.0.1:{hub_port}");
    let start_hub = || {
        run(&["cloudcore", "--metrics-addr", "off", "--data-dir"])
            .arg(d.join("hub"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--listen", &cloud])
            .spawn()
    };
    let mut hub = start_hub()?;
    let token = loop {
        let out = Command::new(&sedna)
            .args(["token", "create", "--node", "edge-1", "--kubeconfig"])
            .arg(&kubeconfig)
            .output()?;
        if out.status.success() {
            break String::from_utf8(out.stdout)?.trim().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let edge_dir = d.join("edge-1");
    for attempt in 0.. {
        let ok = run(&[
            "join",
            "--cloud",
            &cloud,
            "--token",
            &token,
            "--node-name",
            "edge-1",
            "--data-dir",
        ])
        .arg(&edge_dir)
        .status()?
        .success();
        if ok {
            break;
        }
        if attempt > 100 {
            bail!("join failed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start_edge = |local_api: &str| {
        run(&[
            "edgecore",
            "--metrics-addr",
            "off",
            "--local-api",
            local_api,
            "--node-ip",
            "127.0.0.1",
            "--cloud",
            &cloud,
            "--data-dir",
        ])
        .arg(&edge_dir)
        .spawn()
    };
    let mut edge = start_edge("127.0.0.1:0")?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let create = |i: usize| {
        let pods = pods.clone();
        let cms = cms.clone();
        async move {
            let name = format!("p-{i:03}");
            let cm: ConfigMap = serde_json::from_value(
                json!({ "metadata": { "name": name }, "data": { "MODEL": "yolo", "THRESHOLD": "0.5" } }),
            )?;
            cms.create(&PostParams::default(), &cm).await?;
            pods.create(&PostParams::default(), &pod(&name)?).await?;
            anyhow::Ok(name)
        }
    };

    // Apply → running, one pod at a time (the ConfigMap first, then the Pod: timed from the
    // Pod's create request).
    let mut latencies = Vec::new();
    for i in 0..args.timed.min(args.pods) {
        let name = format!("p-{i:03}");
        let cm: ConfigMap = serde_json::from_value(
            json!({ "metadata": { "name": name }, "data": { "MODEL": "yolo", "THRESHOLD": "0.5" } }),
        )?;
        cms.create(&PostParams::default(), &cm).await?;
        let t0 = Instant::now();
        pods.create(&PostParams::default(), &pod(&name)?).await?;
        loop {
            if pids(&edge_dir).contains_key(&name) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("pod {name} never ran");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        latencies.push(t0.elapsed());
    }
    latencies.sort();
    println!(
        "apply -> running ({} pods, one at a time): p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );

    for i in args.timed.min(args.pods)..args.pods {
        create(i).await?;
    }
    let t0 = Instant::now();
    while pids(&edge_dir).len() < args.pods {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("only {} pods running", pids(&edge_dir).len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let measure_rss = |label: &str, pid: u32| -> Result<()> {
        let (rss, hwm, anon, file) = rss_kib(pid)?;
        let mib = |k: u64| k as f64 / 1024.0;
        println!(
            "edgecore RSS idle, {} pods running, {label}: {:.1} MiB (anonymous {:.1}, file-backed {:.1}; peak {:.1} MiB)",
            args.pods,
            mib(rss),
            mib(anon),
            mib(file),
            mib(hwm)
        );
        Ok(())
    };
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    measure_rss("local API on", edge.id())?;

    // The same node without the local API (SIGTERM leaves the pods; the new agent restarts them).
    edge.kill()?;
    edge.wait()?;
    edge = start_edge("off")?;
    let before = pids(&edge_dir);
    let t0 = Instant::now();
    loop {
        let now = pids(&edge_dir);
        if now.len() == args.pods && now.iter().all(|(k, v)| before.get(k) != Some(v)) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("pods did not come back");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    measure_rss("local API off", edge.id())?;

    // Offline restart: the hub goes away, edgecore is killed with SIGKILL and restarted.
    hub.kill()?;
    hub.wait()?;
    let mut times = Vec::new();
    for _ in 0..args.restarts {
        let before = pids(&edge_dir);
        edge.kill()?;
        edge.wait()?;
        let t0 = Instant::now();
        edge = start_edge("127.0.0.1:0")?;
        loop {
            let now = pids(&edge_dir);
            if now.len() == args.pods && now.iter().all(|(k, v)| before.get(k) != Some(v)) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("pods did not come back offline ({} running)", now.len());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t0.elapsed());
    }
    times.sort();
    println!(
        "offline restart (hub down, kill -9, start): all {} pods running again after p50 {:.0?}, max {:.0?} ({} runs)",
        args.pods,
        percentile(&times, 0.5),
        times[times.len() - 1],
        times.len()
    );

    // A first sync of many pods whose ConfigMaps arrive after them: the node is down while
    // they are applied (each Pod before its ConfigMap), then its agent starts.
    let mut hub = start_hub()?;
    edge.kill()?;
    edge.wait()?;
    for i in 0..args.while_down {
        let name = format!("q-{i:03}");
        pods.create(&PostParams::default(), &pod(&name)?).await?;
        let cm: ConfigMap = serde_json::from_value(
            json!({ "metadata": { "name": name }, "data": { "MODEL": "yolo", "THRESHOLD": "0.5" } }),
        )?;
        cms.create(&PostParams::default(), &cm).await?;
    }
    let t0 = Instant::now();
    edge = start_edge("127.0.0.1:0")?;
    loop {
        let running = pids(&edge_dir)
            .keys()
            .filter(|k| k.starts_with("q-"))
            .count();
        if running == args.while_down {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("{running} of the pods applied while the node was down run");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "{} pods applied while the node was down (each before its ConfigMap), agent started: all running after {:.2?}",
        args.while_down,
        t0.elapsed()
    );
    hub.kill()?;
    hub.wait()?;
    edge.kill()?;
    edge.wait()?;
    // Stop the workloads the killed agent left behind.
    for pid in pids(&edge_dir).values() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    drop(procs);
    Ok(())
}
