//! Joint inference on the held-out MNIST split (`models/mnist`): edge-only and cloud-only
//! accuracy; joint accuracy, share of samples uploaded and uplink bytes for a sweep of
//! Threshold and CrossEntropy thresholds (plotted to `bench/ji-tradeoff.svg`); per-inference
//! latency (easy vs hard, cloud over HTTP on loopback) and throughput against a bare `ort`
//! loop on the edge model.
//!
//! `cargo build --release -p sedna-edge-worker && cargo run --release -p sedna-bench --bin ji-bench`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ndarray::{Array2, ArrayD, Axis};
use plotters::prelude::*;
use sedna::cloud::{BatchOptions, Batcher, GrpcCloud, serve_grpc};
use sedna::hem::{self, Input};
use sedna::inference::{Model, SessionOptions, Tensor, TensorView};
use sedna::joint::{self, HardExampleQueue, JointInference, QueueLimits};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The IDX held-out split: pixels / 255 and labels.
fn held_out() -> Result<(Array2<f32>, Vec<i64>)> {
    let images = std::fs::read(root().join("models/mnist/test-images.idx3-ubyte"))?;
    let labels = std::fs::read(root().join("models/mnist/test-labels.idx1-ubyte"))?;
    let be =
        |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
    if be(&images, 0) != 0x803 || be(&labels, 0) != 0x801 {
        bail!("not IDX files");
    }
    let (n, rows, cols) = (be(&images, 4), be(&images, 8), be(&images, 12));
    let pixels: Vec<f32> = images[16..16 + n * rows * cols]
        .iter()
        .map(|p| f32::from(*p) / 255.0)
        .collect();
    let y = labels[8..8 + n].iter().map(|l| i64::from(*l)).collect();
    Ok((Array2::from_shape_vec((n, rows * cols), pixels)?, y))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Point {
    algorithm: &'static str,
    threshold: f64,
    accuracy: f64,
    uploaded: f64,
    uplink_bytes: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (x, y) = held_out()?;
    let n = y.len();
    let options = SessionOptions {
        intra_threads: 1,
        inter_threads: 1,
        ..SessionOptions::default()
    };
    let edge = Arc::new(Model::load(
        root().join("models/mnist/edge/model.onnx"),
        &options,
    )?);
    let cloud = Arc::new(Model::load(
        root().join("models/mnist/cloud/model.onnx"),
        &options,
    )?);
    let requests: Vec<Vec<(String, Tensor)>> = x
        .axis_iter(Axis(0))
        .map(|r| {
            vec![(
                "input".to_string(),
                Tensor::F32(r.to_owned().insert_axis(Axis(0)).into_dyn()),
            )]
        })
        .collect();
    let ids: Vec<String> = (0..y.len()).map(|i| i.to_string()).collect();
    let samples: Vec<ArrayD<f32>> = x
        .axis_iter(Axis(0))
        .map(|r| r.to_owned().insert_axis(Axis(0)).into_dyn())
        .collect();

    // Every sample through both models once.
    let mut edge_probs = Vec::with_capacity(n);
    let (mut edge_labels, mut cloud_labels) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for s in &samples {
        let e = edge.run(&[("input", TensorView::F32(s.view()))])?;
        edge_labels.push(e.i64("label")?[[0]]);
        edge_probs.push(
            e.f32("probabilities")?
                .index_axis(Axis(0), 0)
                .to_owned()
                .into_dimensionality::<ndarray::Ix1>()?,
        );
        let c = cloud.run(&[("input", TensorView::F32(s.view()))])?;
        cloud_labels.push(c.i64("label")?[[0]]);
    }
    let acc =
        |labels: &[i64]| labels.iter().zip(&y).filter(|(a, b)| a == b).count() as f64 / n as f64;
    let (edge_acc, cloud_acc) = (acc(&edge_labels), acc(&cloud_labels));
    println!(
        "held-out samples: {n}; edge-only accuracy {edge_acc:.4}; cloud-only accuracy {cloud_acc:.4}"
    );
    let request_bytes =
        joint::encode_tensors(&[("input".into(), Tensor::F32(samples[0].clone()))])?.len();

    let mut points = Vec::new();
    let sweeps: [(&'static str, &'static str, Vec<f64>); 2] = [
        (
            "Threshold",
            "threshold",
            (1..=99).map(|i| f64::from(i) / 100.0).collect(),
        ),
        (
            "CrossEntropy",
            "threshold_cross_entropy",
            (1..=99).map(|i| f64::from(i) / 100.0).collect(),
        ),
    ];
    for (algorithm, key, thresholds) in &sweeps {
        for &t in thresholds {
            let mining = hem::registry().build(algorithm, &[(key, &t.to_string())])?;
            let mut joint_labels = Vec::with_capacity(n);
            let mut hard = 0;
            for i in 0..n {
                if mining.is_hard(&Input::Probabilities(edge_probs[i].view())) {
                    hard += 1;
                    joint_labels.push(cloud_labels[i]);
                } else {
                    joint_labels.push(edge_labels[i]);
                }
            }
            points.push(Point {
                algorithm,
                threshold: t,
                accuracy: acc(&joint_labels),
                uploaded: hard as f64 / n as f64,
                uplink_bytes: hard * request_bytes,
            });
        }
    }
    println!(
        "| algorithm | threshold | joint accuracy | of cloud-only | samples uploaded | uplink bytes |"
    );
    println!("|---|---|---|---|---|---|");
    let mut best: Vec<&Point> = Vec::new();
    for algorithm in ["Threshold", "CrossEntropy"] {
        let of: Vec<&Point> = points.iter().filter(|p| p.algorithm == algorithm).collect();
        for p in of
            .iter()
            .filter(|p| (p.threshold * 100.0).round() as i64 % 10 == 0 || p.threshold >= 0.95)
        {
            println!(
                "| {} | {:.2} | {:.4} | {:.1} % | {:.1} % | {} |",
                p.algorithm,
                p.threshold,
                p.accuracy,
                p.accuracy / cloud_acc * 100.0,
                p.uploaded * 100.0,
                p.uplink_bytes
            );
        }
        if let Some(p) = of
            .iter()
            .filter(|p| p.accuracy >= 0.99 * cloud_acc)
            .min_by(|a, b| a.uploaded.total_cmp(&b.uploaded))
        {
            best.push(p);
        }
    }
    for p in &best {
        println!(
            "cheapest {} reaching 99 % of cloud-only accuracy: threshold {:.2}: accuracy {:.4} ({:.1} % of cloud), {:.1} % uploaded, {} uplink bytes",
            p.algorithm,
            p.threshold,
            p.accuracy,
            p.accuracy / cloud_acc * 100.0,
            p.uploaded * 100.0,
            p.uplink_bytes
        );
    }
    plot(&points, edge_acc, cloud_acc)?;

    // Latency and throughput through JointInference with the cloud worker's gRPC service
    // (dynamic batching) on loopback, as the workers run it.
    let chosen = best
        .iter()
        .find(|p| p.algorithm == "CrossEntropy")
        .map_or(0.8, |p| p.threshold);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let batcher = Batcher::spawn(cloud.clone(), BatchOptions::default());
    let server = tokio::spawn(serve_grpc(listener, batcher, async {
        let _ = stopped.await;
    }));
    let queue_dir = tempfile::tempdir()?;
    let ji = JointInference::new(
        edge.clone(),
        hem::registry().build(
            "CrossEntropy",
            &[("threshold_cross_entropy", &chosen.to_string())],
        )?,
        Box::new(GrpcCloud::new(&url, Duration::from_secs(5))?),
        HardExampleQueue::open(queue_dir.path(), QueueLimits::default())?,
    );
    let (mut easy, mut hard) = (Vec::new(), Vec::new());
    let mut correct = 0;
    let start = Instant::now();
    for (i, request) in requests.iter().enumerate() {
        let t = Instant::now();
        let r = ji.inference(&ids[i], request).await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if r.is_hard {
            hard.push(ms)
        } else {
            easy.push(ms)
        }
        let label = r
            .result()
            .iter()
            .find(|(n, _)| n == "label")
            .context("no label")?;
        if let Tensor::I64(l) = &label.1
            && l[[0]] == y[i]
        {
            correct += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    easy.sort_by(f64::total_cmp);
    hard.sort_by(f64::total_cmp);
    let stats = ji.stats();
    println!(
        "JointInference, CrossEntropy {chosen:.2}, cloud worker over loopback gRPC: {:.0} samples/s, accuracy {:.4}, uploaded {:.1} %, uplink {} bytes; latency easy p50 {:.3} ms p99 {:.3} ms ({} samples), hard p50 {:.3} ms p99 {:.3} ms ({} samples)",
        n as f64 / elapsed,
        f64::from(correct) / n as f64,
        stats.upload_ratio() * 100.0,
        stats.uplink_bytes,
        percentile(&easy, 0.5),
        percentile(&easy, 0.99),
        easy.len(),
        percentile(&hard, 0.5),
        percentile(&hard, 0.99),
        hard.len()
    );
    let _ = stop.send(());
    server.await??;

    // Edge side alone: JointInference with EdgeOnly against a bare ort loop, same model.
    let edge_only = JointInference::new(
        edge.clone(),
        hem::registry().build("EdgeOnly", &[])?,
        Box::new(GrpcCloud::new(&url, Duration::from_secs(1))?),
        HardExampleQueue::open(queue_dir.path().join("edge-only"), QueueLimits::default())?,
    );
    let env = sedna::inference::ort_environment()?;
    let mut bare = ort::session::Session::builder(&env)?
        .with_intra_threads(1)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_inter_threads(1)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .commit_from_file(root().join("models/mnist/edge/model.onnx"))?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        for (id, request) in ids.iter().zip(&requests) {
            let r = edge_only.inference(id, request).await?;
            std::hint::black_box(r);
        }
        ours.push(n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for s in &samples {
            let input = ort::value::TensorRef::from_array_view(s)?;
            let out = bare.run(ort::inputs!["input" => input])?;
            let l = out["label"].try_extract_array::<i64>()?.to_owned();
            let p = out["probabilities"].try_extract_array::<f32>()?.to_owned();
            std::hint::black_box((l, p));
        }
        theirs.push(n as f64 / t.elapsed().as_secs_f64());
    }
    ours.sort_by(f64::total_cmp);
    theirs.sort_by(f64::total_cmp);
    println!(
        "edge throughput (batch 1, 1 thread): JointInference (EdgeOnly, owned results) {:.0}/s vs bare ort {:.0}/s -> {:.3}x",
        ours[2],
        theirs[2],
        ours[2] / theirs[2]
    );
    worker_throughput(theirs[2])?;
    Ok(())
}

/// The edge worker process (`sedna-edge-worker`, built next to this benchmark) replaying an
/// IDX file with EdgeOnly: its rate per sample, startup excluded (a 1-sample run is timed and
/// subtracted), against the bare ort loop's.
fn worker_throughput(bare: f64) -> Result<()> {
    let bin = std::env::current_exe()?.with_file_name("sedna-edge-worker");
    if !bin.exists() {
        println!(
            "edge worker process: skipped ({} missing: cargo build --release -p sedna-edge-worker)",
            bin.display()
        );
        return Ok(());
    }
    let images = std::fs::read(root().join("models/mnist/test-images.idx3-ubyte"))?;
    let dir = tempfile::tempdir()?;
    let write_idx = |name: &str, count: usize| -> Result<PathBuf> {
        let mut bytes = Vec::with_capacity(16 + count * 784);
        for word in [0x803u32, count as u32, 28, 28] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        let pixels = &images[16..];
        for i in 0..count {
            let at = (i % 2000) * 784;
            bytes.extend_from_slice(&pixels[at..at + 784]);
        }
        let path = dir.path().join(name);
        std::fs::write(&path, bytes)?;
        Ok(path)
    };
    let run = |idx: &PathBuf, count: usize, out: &str| -> Result<f64> {
        let start = Instant::now();
        let status = std::process::Command::new(&bin)
            .env(
                "MODEL_URL",
                root().join("models/mnist/edge/model.onnx").canonicalize()?,
            )
            .env("HEM_NAME", "EdgeOnly")
            .env("SEDNA_CLOUD_URL", "http://127.0.0.1:9")
            .env("SEDNA_INPUT", format!("idx:{}", idx.display()))
            .env("SEDNA_EXIT_AFTER", count.to_string())
            .env("SEDNA_OUTPUT_DIR", dir.path().join(out))
            .env("SEDNA_CACHE_DIR", dir.path().join("cache"))
            .env("SEDNA_INTRA_THREADS", "1")
            .env("RUST_LOG", "error")
            .status()?;
        if !status.success() {
            bail!("the edge worker failed: {status}");
        }
        Ok(start.elapsed().as_secs_f64())
    };
    let n = 20_000;
    let one = write_idx("one.idx3-ubyte", 1)?;
    let many = write_idx("many.idx3-ubyte", n)?;
    let (mut startup, mut total) = (Vec::new(), Vec::new());
    for round in 0..3 {
        startup.push(run(&one, 1, &format!("one-{round}"))?);
        total.push(run(&many, n, &format!("many-{round}"))?);
    }
    startup.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    let rate = (n - 1) as f64 / (total[1] - startup[1]);
    println!(
        "edge worker process (IDX replay, EdgeOnly, a JSON result line per sample): {rate:.0}/s vs bare ort {bare:.0}/s -> {:.3}x (startup {:.0} ms excluded)",
        rate / bare,
        startup[1] * 1e3
    );
    Ok(())
}

fn plot(points: &[Point], edge_acc: f64, cloud_acc: f64) -> Result<()> {
    let path = root().join("bench/ji-tradeoff.svg");
    let area = SVGBackend::new(&path, (800, 520)).into_drawing_area();
    area.fill(&WHITE)?;
    let low = (edge_acc - 0.01).min(0.85);
    let mut chart = ChartBuilder::on(&area)
        .caption(
            "Joint inference on held-out MNIST: accuracy vs samples uploaded",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..100f64, low..(cloud_acc + 0.01).min(1.0))?;
    chart
        .configure_mesh()
        .x_desc("samples uploaded to the cloud (%)")
        .y_desc("accuracy")
        .draw()?;
    for (algorithm, color) in [("Threshold", BLUE), ("CrossEntropy", RED)] {
        let mut series: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.algorithm == algorithm)
            .map(|p| (p.uploaded * 100.0, p.accuracy))
            .collect();
        series.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(series, color.stroke_width(2)))?
            .label(algorithm)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    for (name, value, color) in [
        ("cloud only", cloud_acc, BLACK),
        ("99 % of cloud only", 0.99 * cloud_acc, GREEN),
        ("edge only", edge_acc, MAGENTA),
    ] {
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, value), (100.0, value)],
                color.stroke_width(1),
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(25.0, low), (25.0, cloud_acc + 0.01)],
        BLACK.mix(0.3),
    )))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    area.present()?;
    println!("plot: {}", path.display());
    Ok(())
}
