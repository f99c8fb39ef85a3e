//! `stream-bench`: `kubectl exec` and `kubectl logs` to a pod on an edge node, through the hub
//! of a real `sedna up` (release build) with the real kubectl — what an operator waits for.
//!
//! For each per-node byte rate given: the latency of `kubectl exec <pod> -- true` (and of
//! `kubectl get pod`, the same kubectl start and API round trip without the node, for
//! comparison) and the time to read an 8 MiB container log with `kubectl logs`.
//!
//! ```text
//! cargo build --release -p sedna-cli -p sedna-bench
//! target/release/stream-bench --runs 20
//! ```

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use common::{Killed, free_port, percentile, sedna_binary};

#[derive(Parser)]
struct Args {
    /// Runs of each command.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Per-node stream byte rates to measure with (bytes/s).
    #[arg(long, value_delimiter = ',', default_value = "8388608,1073741824")]
    rates: Vec<u64>,
}

const LOG_BYTES: u64 = 8 * 1024 * 1024;

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

fn ok(kubeconfig: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = kubectl(kubeconfig, args)?;
    if !out.status.success() {
        bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn timed(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn log_size(data: &Path) -> u64 {
    let Ok(pods) = std::fs::read_dir(data.join("nodes/edge-1/pods")) else {
        return 0;
    };
    pods.flatten()
        .filter(|p| p.file_name().to_string_lossy().starts_with("default_big_"))
        .filter_map(|p| std::fs::metadata(p.path().join("logs/main.log")).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

fn measure(args: &Args, rate: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("up");
    let _up = Killed(
        Command::new(sedna_binary()?)
            .args(["up", "--edges", "1", "--no-fsync", "--metrics-addr", "off"])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--api-listen",
                &format!("127.0.0.1:{}", free_port()?),
                "--hub-listen",
                &format!("127.0.0.1:{}", free_port()?),
                "--local-api",
                "127.0.0.1:0",
                "--stream-bytes-per-second",
                &rate.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sedna up")?,
    );
    let kubeconfig = data.join("kubeconfig");
    wait_for("the kubeconfig", Duration::from_secs(60), || {
        kubeconfig.exists()
    })?;
    wait_for("edge-1 Ready", Duration::from_secs(60), || {
        kubectl(&kubeconfig, &["get", "node", "edge-1", "--no-headers"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(" Ready"))
    })?;
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: big}}\nspec:\n  nodeName: edge-1\n  \
         containers:\n  - name: main\n    image: sh\n    command: [sh, -c, \"head -c {} \
         /dev/urandom | base64 -w 100; while true; do sleep 1; done\"]\n",
        LOG_BYTES / 4 * 3
    );
    let mut apply = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    std::io::Write::write_all(
        &mut apply.stdin.take().context("kubectl stdin")?,
        manifest.as_bytes(),
    )?;
    apply.wait()?;
    wait_for("the 8 MiB log", Duration::from_secs(120), || {
        log_size(&data) >= LOG_BYTES
    })?;
    let expected = log_size(&data);

    let get = timed(args.runs, || {
        ok(&kubeconfig, &["get", "pod", "big", "-o", "name"]).map(drop)
    })?;
    let exec = timed(args.runs, || {
        ok(&kubeconfig, &["exec", "big", "--", "true"]).map(drop)
    })?;
    let exec_spdy = timed(args.runs, || {
        let out = Command::new("kubectl")
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["exec", "big", "--", "true"])
            .output()?;
        if !out.status.success() {
            bail!("exec over SPDY: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    })?;
    let mut read = 0;
    let logs = timed(3, || {
        read = ok(&kubeconfig, &["logs", "big"])?.len() as u64;
        Ok(())
    })?;
    if read != expected {
        bail!("kubectl logs read {read} bytes of {expected}");
    }
    let mib = expected as f64 / (1024.0 * 1024.0);
    println!(
        "| {:.0} MiB/s | {} / {} | {} / {} | {} / {} | {:.1} MiB in {} ({:.1} MiB/s) |",
        rate as f64 / (1024.0 * 1024.0),
        ms(percentile(&get, 0.5)),
        ms(percentile(&get, 0.99)),
        ms(percentile(&exec, 0.5)),
        ms(percentile(&exec, 0.99)),
        ms(percentile(&exec_spdy, 0.5)),
        ms(percentile(&exec_spdy, 0.99)),
        mib,
        ms(logs[1]),
        mib / logs[1].as_secs_f64(),
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "| node byte rate | kubectl get pod p50 / p99 | exec (websocket) p50 / p99 | exec (SPDY) p50 / p99 | kubectl logs (median of 3) |"
    );
    println!("|---|---|---|---|---|");
    for &rate in &args.rates {
        measure(&args, rate)?;
    }
    Ok(())
}
