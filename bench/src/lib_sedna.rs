//! lib-sedna benchmarks: FedAvg against Flower's aggregate and the machine's memory
//! bandwidth; the inference wrapper against a bare `ort` loop and Python onnxruntime.
//! Prints markdown rows for bench/RESULTS.md.
//!
//! `cargo run --release -p sedna-bench --bin lib-bench` (needs scripts/setup's .venv with
//! onnxruntime, plus `flwr` for the Flower comparison: `.venv/bin/pip install flwr`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ndarray::{Array2, ArrayD, Axis, IxDyn};
use sedna::aggregate::{Update, fedavg};
use sedna::inference::{Model, SessionOptions, TensorView};
use sedna::weights::Weights;

#[derive(Parser)]
struct Args {
    /// FedAvg clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Parameters per client model.
    #[arg(long, default_value_t = 1_000_000)]
    params: usize,
    /// Layers the parameters are split into.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Inference iterations per measured round.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Measured rounds (interleaved; medians reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Skip the Python comparisons.
    #[arg(long)]
    no_python: bool,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

fn run_python(script: &str, args: &[String]) -> Result<serde_json::Value> {
    let out = Command::new(python())
        .arg(root().join("bench/python").join(script))
        .args(args)
        .output()
        .with_context(|| format!("running {script}"))?;
    if !out.status.success() {
        bail!("{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Multi-threaded read bandwidth over the same amount of memory FedAvg reads (GB/s).
fn read_bandwidth(buffers: &[Vec<f32>]) -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bytes: usize = buffers.iter().map(|b| b.len() * 4).sum();
    let mut runs = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let mut acc = [0f32; 8];
                        for b in buffers.iter().skip(t).step_by(threads) {
                            for c in b.chunks_exact(8) {
                                for i in 0..8 {
                                    acc[i] += c[i];
                                }
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
        runs.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    median(runs)
}

fn fedavg_bench(args: &Args) -> Result<()> {
    let per_layer = args.params / args.layers;
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let make = |next: &mut dyn FnMut() -> f32| -> Result<Weights> {
        Ok(Weights::new(
            (0..args.layers)
                .map(|l| {
                    let v: Vec<f32> = (0..per_layer).map(|_| next()).collect();
                    (
                        format!("layer{l}"),
                        ArrayD::from_shape_vec(IxDyn(&[per_layer]), v).unwrap_or_default(),
                    )
                })
                .collect(),
        )?)
    };
    let global = make(&mut next)?;
    let updates: Vec<Update> = (0..args.clients)
        .map(|i| {
            Ok(Update {
                weights: make(&mut next)?,
                num_samples: 50 + (i as u64 * 37) % 450,
            })
        })
        .collect::<Result<_>>()?;
    let _ = fedavg(&global, &updates)?;
    let mut runs = Vec::new();
    for _ in 0..args.reps {
        let start = Instant::now();
        let out = fedavg(&global, &updates)?;
        runs.push(start.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    let ours = median(runs);
    let bytes = ((args.clients + 1) * args.layers * per_layer * 4) as f64;
    let buffers: Vec<Vec<f32>> = updates
        .iter()
        .flat_map(|u| {
            u.weights
                .tensors()
                .iter()
                .map(|(_, a)| a.iter().copied().collect())
        })
        .collect();
    let bandwidth = read_bandwidth(&buffers);
    drop(buffers);
    let floor = bytes / (bandwidth * 1e9);
    println!(
        "fedavg: {} clients x {} params ({} layers): sedna {:.1} ms ({:.2} GB/s moved); memory read bandwidth {:.2} GB/s -> floor {:.1} ms ({:.0}% of bandwidth)",
        args.clients,
        args.layers * per_layer,
        args.layers,
        ours * 1e3,
        bytes / ours / 1e9,
        bandwidth,
        floor * 1e3,
        floor / ours * 100.0
    );
    if !args.no_python {
        drop(updates);
        let flower = run_python(
            "fedavg_flower.py",
            &[
                args.clients.to_string(),
                per_layer.to_string(),
                args.layers.to_string(),
                args.reps.to_string(),
            ],
        )?;
        let flower_s = flower["median_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "fedavg: flower {} (numpy {}) {:.1} ms -> sedna is {:.1}x faster",
            flower["flwr"].as_str().unwrap_or("?"),
            flower["numpy"].as_str().unwrap_or("?"),
            flower_s * 1e3,
            flower_s / ours
        );
    }
    Ok(())
}

fn held_out(path: &Path) -> Result<Array2<f32>> {
    let text = std::fs::read_to_string(path)?;
    let mut values = Vec::new();
    let mut rows = 0;
    for line in text.lines().skip(1) {
        values.extend(
            line.split(',')
                .skip(1)
                .map(|v| v.parse::<f32>().unwrap_or(0.0) / 16.0),
        );
        rows += 1;
    }
    Ok(Array2::from_shape_vec((rows, 64), values)?)
}

fn inference_bench(args: &Args) -> Result<()> {
    let model_path = root().join("models/digits/model.onnx");
    let csv = root().join("models/digits/test.csv");
    let x = held_out(&csv)?;
    let rows: Vec<ArrayD<f32>> = x
        .axis_iter(Axis(0))
        .map(|r| r.to_owned().insert_axis(Axis(0)).into_dyn())
        .collect();
    let options = SessionOptions {
        intra_threads: 1,
        inter_threads: 1,
        ..SessionOptions::default()
    };
    let model = Model::load(&model_path, &options)?;
    let env = sedna::inference::ort_environment()?;
    let mut bare = ort::session::Session::builder(&env)?
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_intra_threads(1)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_inter_threads(1)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .commit_from_file(&model_path)?;
    let n = args.iterations;
    let wrapper = |model: &Model, copy: bool| -> Result<f64> {
        let start = Instant::now();
        let mut checksum = 0i64;
        for i in 0..n {
            let input = [("input", TensorView::F32(rows[i % rows.len()].view()))];
            if copy {
                let out = model.run(&input)?;
                checksum += out.i64("label")?[[0]];
            } else {
                checksum += model.run_with(&input, |out| Ok(out.i64("label")?[[0]]))?;
            }
        }
        std::hint::black_box(checksum);
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    let bare_loop = |session: &mut ort::session::Session, copy: bool| -> Result<f64> {
        let start = Instant::now();
        let mut checksum = 0i64;
        for i in 0..n {
            let input = ort::value::TensorRef::from_array_view(&rows[i % rows.len()])?;
            let out = session.run(ort::inputs!["input" => input])?;
            if copy {
                let labels = out["label"].try_extract_array::<i64>()?.to_owned();
                let p = out["probabilities"].try_extract_array::<f32>()?.to_owned();
                checksum += labels[[0]] + p.len() as i64;
            } else {
                checksum += out["label"].try_extract_array::<i64>()?[[0]];
            }
        }
        std::hint::black_box(checksum);
        Ok(n as f64 / start.elapsed().as_secs_f64())
    };
    // Warm up both.
    wrapper(&model, true)?;
    bare_loop(&mut bare, false)?;
    let (mut w, mut wc, mut b, mut bc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        w.push(wrapper(&model, false)?);
        b.push(bare_loop(&mut bare, false)?);
        wc.push(wrapper(&model, true)?);
        bc.push(bare_loop(&mut bare, true)?);
    }
    let (w, wc, b, bc) = (median(w), median(wc), median(b), median(bc));
    println!(
        "inference (digits MLP, batch 1, 1 thread), outputs read in place: Model::run_with {w:.0}/s, bare ort {b:.0}/s -> {:.3}x",
        w / b
    );
    println!(
        "inference (digits MLP, batch 1, 1 thread), outputs copied out: Model::run {wc:.0}/s, bare ort {bc:.0}/s -> {:.3}x",
        wc / bc
    );
    let w = wc;
    if !args.no_python {
        let py = run_python(
            "ort_python.py",
            &[
                model_path.display().to_string(),
                csv.display().to_string(),
                n.to_string(),
                "1".into(),
            ],
        )?;
        let p = py["per_second"].as_f64().unwrap_or(f64::NAN);
        println!(
            "inference: python onnxruntime {} {p:.0}/s -> sedna is {:.2}x",
            py["onnxruntime"].as_str().unwrap_or("?"),
            w / p
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    inference_bench(&args)?;
    fedavg_bench(&args)?;
    Ok(())
}
