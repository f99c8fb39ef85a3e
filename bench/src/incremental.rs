//! Incremental-learning benchmark. Two parts:
//!
//! 1. The whole loop on `sedna up` (release build, one edge node, the real kubectl): the
//!    example `examples/incremental-learning/mnist-digits.yaml`; the shifted stream
//!    (`models/digits-shift`) arrives in `--chunks` parts; after each, the hard examples are
//!    labelled and the round it triggers is awaited. Per round: held-out accuracy (shifted
//!    digits and MNIST) of the deployed and the candidate model, whether it was deployed,
//!    and the time from the node's trigger to the new model serving on the edge, in parts
//!    (trigger → round start, train, eval, deploy). Writes `bench/il-rounds.svg`.
//! 2. Hot reload under load: `sedna edge-worker infer` with the request API, `--clients`
//!    apps posting digits without pause; the deployed model is replaced `--reloads` times;
//!    requests failed (target 0) and throughput in the second around each reload compared
//!    with steady state.
//!
//! `cargo build --release -p sedna-cli && cargo run --release -p sedna-bench --bin il-bench`

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use common::{Killed, free_port, root, sedna_binary};
use plotters::prelude::*;
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// Parts the 1,297-digit stream arrives in (one round each).
    #[arg(long, default_value_t = 3)]
    chunks: usize,
    /// Hot reloads measured under load.
    #[arg(long, default_value_t = 5)]
    reloads: usize,
    /// Apps posting concurrently during the reloads.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Skip the `sedna up` part.
    #[arg(long)]
    reload_only: bool,
}

fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn python(args: &[&str]) -> Result<String> {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("examples/incremental-learning/edge_stream.py"))
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "edge_stream.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("kubectl (scripts/setup installs it)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn seconds_between(a: &Value, b: &Value) -> Option<f64> {
    let parse = |v: &Value| v.as_str()?.parse::<jiff::Timestamp>().ok();
    Some((parse(b)?.as_millisecond() - parse(a)?.as_millisecond()) as f64 / 1e3)
}

/// Part 1: the loop on `sedna up`; returns the rounds' records.
fn rounds_on_up(args: &Args) -> Result<Vec<Value>> {
    let sedna = sedna_binary()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("cluster");
    let _up = Killed(
        Command::new(&sedna)
            .args(["up", "--edges", "1", "--metrics-addr", "off", "--data-dir"])
            .arg(&data)
            .args(["--api-listen", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--hub-listen", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--local-api", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let kubeconfig = data.join("kubeconfig");
    wait_for("the cluster", Duration::from_secs(60), || {
        (kubeconfig.exists()
            && kubectl(&kubeconfig, &["get", "nodes", "--no-headers"])
                .ok()?
                .lines()
                .filter(|l| l.contains(" Ready "))
                .count()
                == 2)
            .then_some(())
    })?;
    let output = dir.path().join("output");
    let manifest =
        std::fs::read_to_string(root().join("examples/incremental-learning/mnist-digits.yaml"))?
            .replace("/opt/sedna-output", &output.display().to_string())
            .replace("/opt/sedna", &root().display().to_string())
            .replace("checkPeriodSeconds: 5", "checkPeriodSeconds: 1");
    let mut apply = Command::new("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    apply
        .stdin
        .take()
        .context("stdin")?
        .write_all(manifest.as_bytes())?;
    apply.wait()?;
    let status = || -> Value {
        kubectl(
            &kubeconfig,
            &["get", "il", "digits", "-o", "jsonpath={.status}"],
        )
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
    };
    wait_for("the inference worker", Duration::from_secs(120), || {
        (status()["inference"]["modelVersion"] == 1).then_some(())
    })?;
    let il = output.join("incremental");
    let total = 1297usize;
    let per = total.div_ceil(args.chunks.max(1));
    let mut start = 0;
    let mut round = 0;
    while start < total {
        let count = per.min(total - start);
        python(&[
            "feed",
            "--start",
            &start.to_string(),
            "--count",
            &count.to_string(),
            "--to",
            &il.join("stream").display().to_string(),
        ])?;
        start += count;
        wait_for("the stream's answers", Duration::from_secs(120), || {
            (status()["inference"]["inferences"].as_u64()? >= start as u64).then_some(())
        })?;
        python(&[
            "label",
            "--hard-examples",
            &il.join("data/hard-examples").display().to_string(),
            "--index",
            &il.join("data/index.txt").display().to_string(),
        ])?;
        round += 1;
        let want = round;
        let fired = wait_for("the round", Duration::from_secs(90), || {
            let s = status();
            s["rounds"]
                .as_array()?
                .iter()
                .any(|r| r["round"] == want)
                .then_some(())
        });
        if fired.is_err() {
            eprintln!("chunk ending at {start}: no round (too few new hard examples)");
            round -= 1;
        }
    }
    Ok(status()["rounds"].as_array().cloned().unwrap_or_default())
}

fn post(port: u16, body: &[u8]) -> Option<Value> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .ok()?;
    stream.write_all(body).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    if response.get(9..12) != Some("200") {
        return None;
    }
    let answer: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1)?).ok()?;
    answer.get("error").is_none().then_some(answer)
}

struct ReloadFigures {
    answered: usize,
    failed: usize,
    steady_rps: f64,
    reload_rps: Vec<f64>,
    reload_seconds: Vec<f64>,
}

/// Part 2: hot reloads under load.
fn reloads_under_load(args: &Args) -> Result<ReloadFigures> {
    let sedna = sedna_binary()?;
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("deployed.onnx");
    let versions = [
        std::fs::read(root().join("models/mnist/mlp/mnist.onnx"))?,
        std::fs::read(root().join("models/mnist/mlp/init.onnx"))?,
    ];
    std::fs::write(&model, &versions[0])?;
    let port = free_port()?;
    let output = dir.path().join("output");
    let _worker = Killed(
        Command::new(&sedna)
            .args(["edge-worker", "infer"])
            .env("MODEL_URL", &model)
            .env("MODEL_HOT_UPDATE", "true")
            .env("MODEL_POLL_PERIOD_SECONDS", "1")
            .env("HEM_NAME", "Threshold")
            .env("HEM_PARAMETERS", r#"[{"key":"threshold","value":"0.9"}]"#)
            .env("SEDNA_INPUT", format!("http:127.0.0.1:{port}"))
            .env("SEDNA_OUTPUT_DIR", &output)
            .env("SEDNA_CACHE_DIR", output.join("cache"))
            .env("SEDNA_HARD_EXAMPLES_MAX", "1000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let images = std::fs::read(root().join("models/mnist/test-images.idx3-ubyte"))?;
    let pgms: Arc<Vec<Vec<u8>>> = Arc::new(
        images[16..]
            .chunks_exact(784)
            .take(200)
            .map(|p| [b"P5\n28 28\n255\n".as_slice(), p].concat())
            .collect(),
    );
    wait_for("the request API", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let apps: Vec<_> = (0..args.clients)
        .map(|k| {
            let (stop, pgms) = (stop.clone(), pgms.clone());
            std::thread::spawn(move || {
                let mut log: Vec<(f64, Option<i64>)> = Vec::new();
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    let answer = post(port, &pgms[i % pgms.len()]);
                    log.push((
                        t0.elapsed().as_secs_f64(),
                        answer.and_then(|a| a["model_version"].as_i64()),
                    ));
                    i += 1;
                }
                log
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let mut reloads = Vec::new();
    for r in 0..args.reloads {
        let at = t0.elapsed().as_secs_f64();
        let tmp = model.with_extension("tmp");
        std::fs::write(&tmp, &versions[(r + 1) % 2])?;
        std::fs::rename(&tmp, &model)?;
        let figures = output.join("figures.json");
        let want = (r + 2) as i64;
        wait_for("the reload", Duration::from_secs(30), || {
            let f: Value = serde_json::from_slice(&std::fs::read(&figures).ok()?).ok()?;
            (f["inference"]["modelVersion"].as_i64()? >= want).then_some(())
        })?;
        reloads.push(at);
        std::thread::sleep(Duration::from_secs(3));
    }
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<(f64, Option<i64>)> = apps
        .into_iter()
        .flat_map(|a| a.join().unwrap_or_default())
        .collect();
    let failed = logs.iter().filter(|(_, v)| v.is_none()).count();
    let rate = |from: f64, to: f64| {
        logs.iter()
            .filter(|(t, v)| *t >= from && *t < to && v.is_some())
            .count() as f64
            / (to - from)
    };
    let steady_rps = rate(1.0, 3.0);
    let mut reload_rps = Vec::new();
    let mut reload_seconds = Vec::new();
    for (r, at) in reloads.iter().enumerate() {
        // The window from the file's replacement to the first answer of the new version.
        let first_new = logs
            .iter()
            .filter(|(t, v)| *t >= *at && *v == Some((r + 2) as i64))
            .map(|(t, _)| *t)
            .fold(f64::INFINITY, f64::min);
        reload_seconds.push(first_new - at);
        reload_rps.push(rate(first_new - 0.5, first_new + 0.5));
    }
    Ok(ReloadFigures {
        answered: logs.len() - failed,
        failed,
        steady_rps,
        reload_rps,
        reload_seconds,
    })
}

fn plot(rounds: &[Value], path: &Path) -> Result<()> {
    let root_area = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root_area.fill(&WHITE)?;
    let n = rounds.len() as i32;
    let mut chart = ChartBuilder::on(&root_area)
        .caption(
            "Incremental learning: held-out accuracy of the served model",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0..n.max(1), 0.5f64..1.0)?;
    chart
        .configure_mesh()
        .x_desc("deployed rounds")
        .y_desc("accuracy")
        .draw()?;
    let mut shifted = Vec::new();
    let mut original = Vec::new();
    if let Some(first) = rounds.first() {
        shifted.push((
            0,
            first["deployedMetrics"]["shifted_accuracy"]
                .as_f64()
                .unwrap_or(0.0),
        ));
        original.push((
            0,
            first["deployedMetrics"]["original_accuracy"]
                .as_f64()
                .unwrap_or(0.0),
        ));
    }
    let mut k = 0;
    for r in rounds.iter().filter(|r| r["deployed"] == true) {
        k += 1;
        shifted.push((
            k,
            r["candidateMetrics"]["shifted_accuracy"]
                .as_f64()
                .unwrap_or(0.0),
        ));
        original.push((
            k,
            r["candidateMetrics"]["original_accuracy"]
                .as_f64()
                .unwrap_or(0.0),
        ));
    }
    chart
        .draw_series(LineSeries::new(shifted.clone(), &RED).point_size(3))?
        .label("shifted digits (UCI, 500 held out)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_series(LineSeries::new(original, &BLUE).point_size(3))?
        .label("MNIST (2,000 held out)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root_area.present()?;
    Ok(())
}

fn p50(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.reload_only {
        let rounds = rounds_on_up(&args)?;
        println!(
            "| round | by | samples | deployed | shifted acc (deployed → candidate) | MNIST acc (deployed → candidate) | trigger→start s | train s | eval s | deploy s |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        let mut totals = Vec::new();
        let mut parts: [Vec<f64>; 4] = Default::default();
        for r in &rounds {
            let m = |side: &str, key: &str| r[side][key].as_f64().unwrap_or(f64::NAN);
            let wait = seconds_between(&r["triggered"], &r["started"]).unwrap_or(0.0);
            let (train, eval, deploy) = (
                r["trainSeconds"].as_f64().unwrap_or(0.0),
                r["evalSeconds"].as_f64().unwrap_or(0.0),
                r["deploySeconds"].as_f64().unwrap_or(f64::NAN),
            );
            println!(
                "| {} | {} | {} | {} | {:.4} → {:.4} | {:.4} → {:.4} | {wait:.1} | {train:.1} | {eval:.1} | {deploy:.1} |",
                r["round"],
                r["startedBy"].as_str().unwrap_or(""),
                r["samples"],
                r["deployed"],
                m("deployedMetrics", "shifted_accuracy"),
                m("candidateMetrics", "shifted_accuracy"),
                m("deployedMetrics", "original_accuracy"),
                m("candidateMetrics", "original_accuracy"),
            );
            if r["deployed"] == true {
                totals.push(wait + train + eval + deploy);
                for (p, v) in parts.iter_mut().zip([wait, train, eval, deploy]) {
                    p.push(v);
                }
            }
        }
        let [wait, train, eval, deploy] = parts;
        println!(
            "trigger → serving, deployed rounds: p50 {:.1} s (trigger→start {:.1}, train {:.1}, eval {:.1}, deploy {:.1})",
            p50(totals),
            p50(wait),
            p50(train),
            p50(eval),
            p50(deploy)
        );
        let svg = root().join("bench/il-rounds.svg");
        plot(&rounds, &svg)?;
        println!("plot: {}", svg.display());
    }
    let r = reloads_under_load(&args)?;
    println!(
        "hot reload under load ({} apps, {} reloads): {} answered, {} failed; steady {:.0} req/s; around each reload {:?} req/s; replacement → first answer of the new model {:?} s",
        args.clients,
        args.reloads,
        r.answered,
        r.failed,
        r.steady_rps,
        r.reload_rps.iter().map(|v| v.round()).collect::<Vec<_>>(),
        r.reload_seconds
            .iter()
            .map(|v| (v * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );
    Ok(())
}
