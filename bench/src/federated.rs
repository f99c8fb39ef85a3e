//! Federated-learning benchmark: this platform (`sedna cloud-worker aggregate` and three
//! `sedna edge-worker train` processes on 127.0.0.1) against Flower 1.42 (its FedAvg strategy
//! driving the same CNN in PyTorch with in-process clients), on the same non-IID shards
//! (`models/mnist/shards`), initial weights, local epochs, batch size, optimizer and rounds;
//! plus centralised training on the union of the shards for the same number of epochs, updates
//! sent as int8, and a client killed mid-round. Prints table rows for RESULTS.md and writes
//! `bench/fl-rounds.svg` (held-out accuracy per round).
//!
//! `cargo build --release -p sedna-cli && .venv/bin/pip install flwr &&
//!  cargo run --release -p sedna-bench --bin fl-bench`

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use common::{root, sedna_binary};
use plotters::prelude::*;
use sedna::train::{TrainData, Trainer, TrainerOptions, parse_parameters};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Rounds.
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    epochs: u32,
}

const LR: &str = "0.05";
const BATCH: &str = "64";

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

struct Run {
    rounds: Vec<Value>,
    aggregator_peak_rss_kb: u64,
    seconds: f64,
}

/// One job on this platform; `kill_client_after` kills client-1 once that many rounds closed.
fn ours(args: &Args, encoding: &str, kill_client_after: Option<usize>) -> Result<Run> {
    let sedna = sedna_binary()?;
    let dir = tempfile::tempdir()?;
    let settings = json!([
        {"key": "epochs", "value": args.epochs.to_string()}, {"key": "batch_size", "value": BATCH},
        {"key": "optimizer", "value": "sgd"}, {"key": "momentum", "value": "0.9"}, {"key": "learning_rate", "value": LR},
    ]);
    let mut aggregator = Command::new(&sedna)
        .args(["cloud-worker", "aggregate", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("JOB_NAME", "digits")
        .env("MODEL_URL", dir.path().join("final.onnx"))
        .env("BASE_MODEL_URL", root().join("models/mnist/cnn/init.onnx"))
        .env(
            "TEST_DATASET_URL",
            root().join("models/mnist/test-images.idx3-ubyte"),
        )
        .env("PARTICIPANTS_COUNT", "3")
        .env("SEDNA_FL_ROUNDS", args.rounds.to_string())
        .env("SEDNA_FL_SETTINGS", settings.to_string())
        .env("SEDNA_FL_ENCODING", encoding)
        .env("SEDNA_OUTPUT_DIR", dir.path().join("aggregator"))
        .env("RAYON_NUM_THREADS", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .envs(
            kill_client_after
                .map(|_| {
                    [
                        ("SEDNA_FL_MIN_CLIENTS", "2"),
                        ("SEDNA_FL_ROUND_TIMEOUT_SECONDS", "5"),
                    ]
                })
                .into_iter()
                .flatten(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(aggregator.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let started = Instant::now();
    let mut clients: Vec<Child> = (0..3)
        .map(|k| {
            Command::new(&sedna)
                .args(["edge-worker", "train"])
                .current_dir(dir.path())
                .env("JOB_NAME", "digits")
                .env("WORKER_NAME", format!("client-{k}"))
                .env("MODEL_URL", root().join("models/mnist/cnn/init.onnx"))
                .env(
                    "TRAIN_DATASET_URL",
                    root().join(format!(
                        "models/mnist/shards/client-{k}-images.idx3-ubyte.gz"
                    )),
                )
                .env("AGG_IP", "127.0.0.1")
                .env("AGG_PORT", &port)
                .env("threads", "1")
                .env("SEDNA_FL_UPDATE_ENCODING", encoding)
                .env("SEDNA_OUTPUT_DIR", dir.path().join(format!("client-{k}")))
                .env("SEDNA_CACHE_DIR", dir.path().join(format!("cache-{k}")))
                .env("RAYON_NUM_THREADS", "1")
                .env("CANDLE_NUM_THREADS", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let log = dir.path().join("aggregator/rounds.jsonl");
    let mut peak = 0;
    let mut killed = false;
    loop {
        if let Some(kb) = vm_hwm_kb(aggregator.id()) {
            peak = peak.max(kb);
        }
        if let (Some(after), false) = (kill_client_after, killed) {
            let done = std::fs::read_to_string(&log)
                .map(|t| t.lines().count())
                .unwrap_or(0);
            if done >= after {
                clients[1].kill()?;
                killed = true;
            }
        }
        if let Some(status) = aggregator.try_wait()? {
            if !status.success() {
                bail!("the aggregator failed: {status}");
            }
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            let _ = aggregator.kill();
            bail!("the job did not finish in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = started.elapsed().as_secs_f64();
    for c in &mut clients {
        let _ = c.wait();
    }
    let rounds = std::fs::read_to_string(&log)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Value>, _>>()?;
    Ok(Run {
        rounds,
        aggregator_peak_rss_kb: peak,
        seconds,
    })
}

fn flower(args: &Args) -> Result<Value> {
    let output = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("bench/python/fl_flower.py"))
        .args([
            "--rounds",
            &args.rounds.to_string(),
            "--epochs",
            &args.epochs.to_string(),
            "--batch-size",
            BATCH,
            "--lr",
            LR,
        ])
        .stderr(Stdio::null())
        .output()
        .context("running bench/python/fl_flower.py")?;
    if !output.status.success() {
        bail!("Flower failed (.venv/bin/pip install flwr)");
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(serde_json::from_str(
        text.lines().last().context("no output")?,
    )?)
}

/// The CNN trained on the union of the shards (the whole train split) for as many epochs as
/// the federated job's rounds × local epochs, same optimizer.
fn centralised(args: &Args) -> Result<f64> {
    let dir = root().join("models/mnist");
    let train = TrainData::load(&dir.join("train-images.idx3-ubyte.gz"), &Default::default())?;
    let test = TrainData::load(&dir.join("test-images.idx3-ubyte"), &Default::default())?;
    let mut trainer = Trainer::load(
        dir.join("cnn/init.onnx"),
        &TrainerOptions {
            threads: 2,
            ..Default::default()
        },
    )?;
    let epochs = (args.rounds * args.epochs).to_string();
    let (_, config) = parse_parameters([
        ("epochs", epochs.as_str()),
        ("batch_size", BATCH),
        ("optimizer", "sgd"),
        ("momentum", "0.9"),
        ("learning_rate", LR),
    ])?;
    trainer.fit(&train, &config, &mut |_| {})?;
    Ok(trainer.evaluate(&test)?.accuracy.unwrap_or(0.0))
}

fn accuracy(rounds: &[Value]) -> Vec<f64> {
    rounds
        .iter()
        .filter_map(|r| r["test_accuracy"].as_f64())
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    eprintln!("this platform, f32 updates …");
    let f32_run = ours(&args, "f32", None)?;
    eprintln!("this platform, int8 updates …");
    let int8_run = ours(&args, "int8", None)?;
    eprintln!("Flower 1.42 …");
    let flower = flower(&args)?;
    eprintln!("centralised …");
    let central = centralised(&args)?;
    eprintln!("a client killed after round 2 …");
    let straggler = ours(
        &Args {
            rounds: 4,
            epochs: args.epochs,
        },
        "f32",
        Some(2),
    )?;

    let flower_rounds = flower["rounds"].as_array().cloned().unwrap_or_default();
    let flower_acc: Vec<f64> = flower_rounds
        .iter()
        .filter_map(|r| r["test_accuracy"].as_f64())
        .collect();
    let per_client = |run: &Run| {
        let r = &run.rounds;
        r.iter().filter_map(|x| x["bytesUp"].as_f64()).sum::<f64>() / r.len().max(1) as f64 / 3.0
    };
    let seconds_per_round = |run: &Run| {
        let r = &run.rounds;
        r.iter().filter_map(|x| x["seconds"].as_f64()).sum::<f64>() / r.len().max(1) as f64
    };
    let flower_bytes = flower_rounds
        .iter()
        .filter_map(|r| r["bytes_up_per_client"].as_f64())
        .sum::<f64>()
        / flower_rounds.len().max(1) as f64;
    let flower_seconds = flower_rounds
        .iter()
        .filter_map(|r| r["seconds"].as_f64())
        .sum::<f64>()
        / flower_rounds.len().max(1) as f64;
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|a| format!("{a:.4}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("held-out accuracy per round:");
    println!("  this platform f32 : {}", fmt(&accuracy(&f32_run.rounds)));
    println!("  this platform int8: {}", fmt(&accuracy(&int8_run.rounds)));
    println!("  Flower FedAvg     : {}", fmt(&flower_acc));
    println!(
        "  centralised, {} epochs: {central:.4}",
        args.rounds * args.epochs
    );
    println!();
    println!(
        "| run | final held-out accuracy | vs centralised | bytes up per client per round | seconds per round | aggregator peak RSS |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, run) in [
        ("this platform, f32", &f32_run),
        ("this platform, int8", &int8_run),
    ] {
        let last = accuracy(&run.rounds).last().copied().unwrap_or(0.0);
        println!(
            "| {name} | {last:.4} | {:.1} % | {:.0} | {:.2} | {:.0} MB |",
            100.0 * last / central,
            per_client(run),
            seconds_per_round(run),
            run.aggregator_peak_rss_kb as f64 / 1024.0
        );
    }
    let flower_last = flower_acc.last().copied().unwrap_or(0.0);
    println!(
        "| Flower 1.42 FedAvg (PyTorch, in-process clients) | {flower_last:.4} | {:.1} % | {flower_bytes:.0} | {flower_seconds:.2} | {:.0} MB (whole process) |",
        100.0 * flower_last / central,
        flower["peak_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0
    );
    println!("| centralised (union of the shards) | {central:.4} | 100 % | — | — | — |");
    println!();
    println!(
        "int8 vs Flower's fp32 bytes per round: {:.2}× fewer",
        flower_bytes / per_client(&int8_run)
    );
    let s = &straggler.rounds;
    let describe = |r: &Value| {
        format!(
            "round {}: {} participants, stragglers {}, {:.1} s",
            r["round"],
            r["participants"].as_array().map_or(0, Vec::len),
            r["stragglers"],
            r["seconds"].as_f64().unwrap_or(0.0)
        )
    };
    println!(
        "client-1 killed after round 2 (minClients 2, roundTimeoutSeconds 5): {} rounds closed in {:.1} s; {}",
        s.len(),
        straggler.seconds,
        s.iter().map(describe).collect::<Vec<_>>().join("; ")
    );
    plot(
        &[
            ("this platform, f32", accuracy(&f32_run.rounds), BLUE),
            ("this platform, int8", accuracy(&int8_run.rounds), GREEN),
            ("Flower FedAvg", flower_acc, RED),
        ],
        central,
    )?;
    Ok(())
}

fn plot(series: &[(&str, Vec<f64>, RGBColor)], central: f64) -> Result<()> {
    let path = root().join("bench/fl-rounds.svg");
    let area = SVGBackend::new(&path, (800, 500)).into_drawing_area();
    area.fill(&WHITE)?;
    let rounds = series.iter().map(|(_, v, _)| v.len()).max().unwrap_or(1) as f64;
    let mut chart = ChartBuilder::on(&area)
        .caption(
            "Federated learning on non-IID MNIST shards: held-out accuracy per round",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(1f64..rounds, 0.8f64..1.0f64)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("held-out accuracy")
        .draw()?;
    for (name, values, color) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                values.iter().enumerate().map(|(i, v)| (i as f64 + 1.0, *v)),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .draw_series(LineSeries::new(
            vec![(1.0, central), (rounds, central)],
            BLACK.stroke_width(1),
        ))?
        .label("centralised, same epochs")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    area.present()?;
    eprintln!("plot: {}", path.display());
    Ok(())
}
