//! Training benchmark: lib-sedna's trainer (candle backend, and tch when built with
//! `--features tch`) against PyTorch eager, on the MNIST train split with the held-out split
//! evaluated after every epoch. Same initial weights, data, batch size, optimizer, schedule,
//! epochs and thread count; each run is a fresh process (so peak RSS is its own), rounds
//! interleave the backends, speeds are medians. Writes `bench/train-curves.svg` (held-out
//! accuracy and training loss per epoch) and prints table rows for RESULTS.md.
//!
//! `cargo run --release -p sedna-bench --bin train-bench` (add `--features tch` with the tch
//! environment of scripts/test to include the tch backend).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Parser;
use plotters::prelude::*;
use sedna::train::{BackendKind, Progress, TrainData, Trainer, TrainerOptions, parse_parameters};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// Rounds (each runs every backend once per model).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Models: mlp, cnn.
    #[arg(long, value_delimiter = ',', default_value = "cnn,mlp")]
    models: Vec<String>,
    /// Compute threads for every backend.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Internal: run one training in this process and print its JSON line.
    #[arg(long, num_args = 2, value_names = ["MODEL", "BACKEND"])]
    child: Option<Vec<String>>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The recipe per model, as the tests use it (lib-sedna/tests/train.rs).
fn recipe(model: &str) -> (usize, usize, f64, f64) {
    // epochs, batch size, learning rate, weight decay (SGD, momentum 0.9, cosine schedule)
    match model {
        "mlp" => (30, 32, 0.1, 0.001),
        _ => (12, 64, 0.05, 0.0005),
    }
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn child(model: &str, backend: &str, threads: usize) -> Result<()> {
    let (epochs, batch, lr, wd) = recipe(model);
    let dir = root().join("models/mnist");
    let train = TrainData::load(&dir.join("train-images.idx3-ubyte.gz"), &Default::default())?;
    let test = TrainData::load(&dir.join("test-images.idx3-ubyte"), &Default::default())?;
    let options = TrainerOptions {
        backend: match backend {
            "tch" => BackendKind::Tch,
            _ => BackendKind::Candle,
        },
        threads,
        ..Default::default()
    };
    let mut trainer = Trainer::load(dir.join(model).join("init.onnx"), &options)?;
    let (_, config) = parse_parameters([
        ("epochs", epochs.to_string().as_str()),
        ("batch_size", batch.to_string().as_str()),
        ("optimizer", "sgd"),
        ("momentum", "0.9"),
        ("learning_rate", lr.to_string().as_str()),
        ("weight_decay", wd.to_string().as_str()),
        ("lr_schedule", "cosine"),
    ])?;
    let mut epochs_out = Vec::new();
    let report = trainer.fit_validated(&train, Some(&test), &config, &mut |p| {
        if let Progress::Epoch(e) = p {
            epochs_out.push(json!({
                "epoch": e.epoch, "train_loss": e.train_loss, "samples_per_sec": e.samples_per_sec,
                "seconds": e.seconds, "test_loss": e.validation_loss, "test_accuracy": e.validation_accuracy,
            }));
        }
    })?;
    let seconds: f64 = report.history.iter().map(|e| e.seconds).sum();
    println!(
        "{}",
        json!({
            "backend": backend, "model": model,
            "samples_per_sec": (report.num_samples * report.epochs) as f64 / seconds,
            "epochs": epochs_out, "peak_rss_kb": peak_rss_kb(),
        })
    );
    Ok(())
}

fn run(model: &str, backend: &str, threads: usize) -> Result<Value> {
    let (epochs, batch, lr, wd) = recipe(model);
    let output = if backend == "pytorch" {
        Command::new(root().join(".venv/bin/python"))
            .arg(root().join("bench/python/train_pytorch.py"))
            .args([
                "--model",
                model,
                "--epochs",
                &epochs.to_string(),
                "--batch-size",
                &batch.to_string(),
            ])
            .args([
                "--lr",
                &lr.to_string(),
                "--weight-decay",
                &wd.to_string(),
                "--threads",
                &threads.to_string(),
            ])
            .output()
            .context(
                "running bench/python/train_pytorch.py (needs torch in .venv: scripts/setup)",
            )?
    } else {
        Command::new(std::env::current_exe()?)
            .args(["--threads", &threads.to_string(), "--child", model, backend])
            // candle sizes its GEMM split and elementwise pool from these (and without
            // RAYON_NUM_THREADS it re-reads the CPU count on every matrix product).
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env("CANDLE_NUM_THREADS", threads.to_string())
            .output()?
    };
    if !output.status.success() {
        bail!(
            "{model}/{backend} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().context("no output")?;
    Ok(serde_json::from_str(line)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(c) = &args.child {
        return child(&c[0], &c[1], args.threads);
    }
    let mut backends = vec!["candle"];
    if cfg!(feature = "tch") {
        backends.push("tch");
    }
    backends.push("pytorch");
    let mut results: Vec<Value> = Vec::new();
    for round in 0..args.rounds {
        for model in &args.models {
            for backend in &backends {
                let r = run(model, backend, args.threads)?;
                eprintln!(
                    "round {} {model:>3} {backend:>7}: {:>8.0} samples/s, final accuracy {:.4}, peak RSS {} MB",
                    round + 1,
                    r["samples_per_sec"].as_f64().unwrap_or(0.0),
                    r["epochs"]
                        .as_array()
                        .and_then(|e| e.last())
                        .and_then(|e| e["test_accuracy"].as_f64())
                        .unwrap_or(0.0),
                    r["peak_rss_kb"].as_u64().unwrap_or(0) / 1024
                );
                results.push(r);
            }
        }
    }
    println!(
        "| model | backend | samples/s (median of {}) | vs PyTorch | held-out accuracy after the last epoch | peak RSS |",
        args.rounds
    );
    println!("|---|---|---|---|---|---|");
    for model in &args.models {
        let of = |backend: &str| -> Vec<&Value> {
            results
                .iter()
                .filter(|r| r["model"] == model.as_str() && r["backend"] == backend)
                .collect()
        };
        let speed = |backend: &str| {
            median(
                of(backend)
                    .iter()
                    .map(|r| r["samples_per_sec"].as_f64().unwrap_or(0.0))
                    .collect(),
            )
        };
        let reference = speed("pytorch");
        for backend in &backends {
            let runs = of(backend);
            let accuracy: Vec<String> = runs
                .iter()
                .map(|r| {
                    let a = r["epochs"]
                        .as_array()
                        .and_then(|e| e.last())
                        .and_then(|e| e["test_accuracy"].as_f64())
                        .unwrap_or(0.0);
                    format!("{a:.4}")
                })
                .collect();
            let rss = median(
                runs.iter()
                    .map(|r| r["peak_rss_kb"].as_f64().unwrap_or(0.0))
                    .collect(),
            );
            println!(
                "| {model} | {backend} | {:.0} | {:.2}× | {} | {:.0} MB |",
                speed(backend),
                speed(backend) / reference,
                accuracy.join(" / "),
                rss / 1024.0
            );
        }
    }
    plot(&results, &args.models, &backends)?;
    Ok(())
}

fn plot(results: &[Value], models: &[String], backends: &[&str]) -> Result<()> {
    let path = root().join("bench/train-curves.svg");
    let area = SVGBackend::new(&path, (1000, 700)).into_drawing_area();
    area.fill(&WHITE)?;
    let rows = area.split_evenly((2, models.len()));
    let colors = [BLUE, RED, BLACK];
    for (column, model) in models.iter().enumerate() {
        // The first round of each backend.
        let runs: Vec<(&str, &Value)> = backends
            .iter()
            .filter_map(|b| {
                results
                    .iter()
                    .find(|r| r["model"] == model.as_str() && r["backend"] == *b)
                    .map(|r| (*b, r))
            })
            .collect();
        let epochs = runs
            .iter()
            .map(|(_, r)| r["epochs"].as_array().map_or(0, |e| e.len()))
            .max()
            .unwrap_or(1) as f64;
        for (row, (metric, label, range)) in [
            ("test_accuracy", "held-out accuracy", 0.85f64..1.0f64),
            ("train_loss", "training loss", 0.0f64..0.7f64),
        ]
        .into_iter()
        .enumerate()
        {
            let mut chart = ChartBuilder::on(&rows[row * models.len() + column])
                .caption(
                    format!("MNIST {model}: {label} per epoch"),
                    ("sans-serif", 18),
                )
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(55)
                .build_cartesian_2d(1f64..epochs, range)?;
            chart.configure_mesh().x_desc("epoch").draw()?;
            for ((backend, run), color) in runs.iter().zip(colors) {
                let series: Vec<(f64, f64)> = run["epochs"]
                    .as_array()
                    .map(|e| {
                        e.iter()
                            .filter_map(|e| Some((e["epoch"].as_f64()?, e[metric].as_f64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                chart
                    .draw_series(LineSeries::new(series, color.stroke_width(2)))?
                    .label(*backend)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(if row == 0 {
                    SeriesLabelPosition::LowerRight
                } else {
                    SeriesLabelPosition::UpperRight
                })
                .border_style(BLACK)
                .background_style(WHITE)
                .draw()?;
        }
    }
    area.present()?;
    eprintln!("plot: {}", path.display());
    Ok(())
}
