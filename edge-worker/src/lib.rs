//! `sedna-edge-worker`: the edge side of a JointInferenceService (and, with the `train`
//! subcommand, a FederatedLearningJob's training worker: [`TrainArgs`]; with `infer`, an
//! IncrementalLearningJob's inference worker: [`InferArgs`]), configured entirely by
//! the environment the controller injects (Sedna's names), so no custom image or code is needed.
//!
//! It loads the small model from `MODEL_URL`, mines hard examples with `HEM_NAME` /
//! `HEM_PARAMETERS`, sends them to the cloud worker at `BIG_MODEL_IP`:`BIG_MODEL_PORT`
//! (gRPC, or `SEDNA_CLOUD_URL`), reads samples from `SEDNA_INPUT` (`dir:/path`: `.pgm`
//! images as they arrive; `idx:/path`: an IDX file replayed), and appends one JSON line per
//! sample to `SEDNA_OUTPUT_DIR/results.jsonl`:
//! `{"id", "is_hard", "label", "source": "edge"|"cloud", "edge_label", "cloud_label",
//! "queued", "latency_ms"}`. Hard examples the cloud could not take are queued on disk
//! (`SEDNA_OUTPUT_DIR/queue`) and answered later, each with a line `{"id", "late": true,
//! "label", "source": "cloud"}`. Figures (inferences, hard examples, upload ratio, uplink
//! bytes, latencies) go to `SEDNA_OUTPUT_DIR/figures.json` every second; with
//! `SEDNA_SAVE_HARD_EXAMPLES=true` each hard example's image is kept in
//! `SEDNA_OUTPUT_DIR/hard-examples/`. Samples already in
//! `results.jsonl` are not processed again after a restart.

mod http;
mod incremental;
mod input;
mod train;

pub use incremental::InferArgs;
pub use train::TrainArgs;

/// The worker's modes besides joint inference.
#[derive(clap::Subcommand, Debug)]
pub enum Mode {
    /// Train in a FederatedLearningJob (its training worker).
    Train(TrainArgs),
    /// Serve an IncrementalLearningJob's deployed model, reloading each new one in place
    /// (its inference worker).
    Infer(InferArgs),
}

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use sedna::cloud::GrpcCloud;
use sedna::config::Config;
use sedna::inference::{Model, Provider, SessionOptions, Tensor};
use sedna::joint::{Backoff, Deferred, HardExampleQueue, JointInference, QueueLimits};
use sedna::storage::Storage;

use crate::input::Source;

/// Flags (each with an environment variable the controller sets).
#[derive(Parser, Debug)]
#[command(
    name = "sedna-edge-worker",
    version,
    about = "Runs a JointInferenceService's edge side"
)]
pub struct Args {
    /// Another mode (default: joint inference's edge side).
    #[command(subcommand)]
    pub mode: Option<Mode>,
    /// Samples: `dir:/path` (PGM images as they arrive), `idx:/path/images.idx3-ubyte`,
    /// `device:<name>` (a camera Device of the node: its stream, found through the local API),
    /// `video:<file or URL>` (any video or stream ffmpeg reads: a file, `rtsp://…`, an HTTP
    /// MJPEG stream), or `http:<host:port>` (apps POST PGM images to `/infer` and get the
    /// result as JSON).
    #[arg(long, env = "SEDNA_INPUT")]
    pub input: Option<String>,
    /// Where results, figures and the hard-example queue go.
    #[arg(long, env = "SEDNA_OUTPUT_DIR", default_value = "output")]
    pub output_dir: PathBuf,
    /// The cloud worker (`http://host:port`); default from BIG_MODEL_IP / BIG_MODEL_PORT.
    #[arg(long, env = "SEDNA_CLOUD_URL")]
    pub cloud_url: Option<String>,
    /// Give up on a cloud request after this many milliseconds.
    #[arg(long, env = "SEDNA_CLOUD_TIMEOUT_MS", default_value_t = 2000)]
    pub cloud_timeout_ms: u64,
    /// Pixel scale applied before the model (default 1/255).
    #[arg(long, env = "SEDNA_INPUT_SCALE", default_value_t = 1.0 / 255.0)]
    pub input_scale: f32,
    /// Most hard examples waiting for the cloud.
    #[arg(long, env = "SEDNA_QUEUE_MAX_ITEMS", default_value_t = 10_000)]
    pub queue_max_items: usize,
    /// Where fetched models are cached.
    #[arg(long, env = "SEDNA_CACHE_DIR", default_value = "model-cache")]
    pub cache_dir: PathBuf,
    /// Execution providers, comma-separated (`cpu`, `cuda`, `cuda:N`, `tensorrt`, `tensorrt:N`).
    #[arg(long, env = "SEDNA_PROVIDERS", default_value = "cpu")]
    pub providers: String,
    /// Threads per inference (0: ONNX Runtime's default).
    #[arg(long, env = "SEDNA_INTRA_THREADS", default_value_t = 1)]
    pub intra_threads: usize,
    /// Exit once the input is exhausted (idx) or this many samples were seen (dir), and every
    /// queued hard example was answered.
    #[arg(long, env = "SEDNA_EXIT_AFTER")]
    pub exit_after: Option<usize>,
    /// How often figures go to the service's status (through the node's local API).
    #[arg(long, env = "SEDNA_REPORT_INTERVAL_MS", default_value_t = 2000)]
    pub report_interval_ms: u64,
    /// Keep each hard example's image in `output/hard-examples/<id>.pgm` (for labelling and
    /// retraining).
    #[arg(long, env = "SEDNA_SAVE_HARD_EXAMPLES")]
    pub save_hard_examples: bool,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long, env = "SEDNA_S3_ALLOW_HTTP")]
    s3_allow_http: bool,
}

/// Results and late answers, one JSON line each, flushed per line.
/// Lines are buffered and flushed every 100 ms, when the input pauses, before an app gets
/// its answer and at exit: a crash loses at most the last 100 ms of lines, and those inputs
/// are answered again after the restart (at least once, never lost).
struct Results {
    file: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl Results {
    fn write(&self, value: &serde_json::Value) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let written = serde_json::to_writer(&mut *file, value)
            .map_err(std::io::Error::from)
            .and_then(|()| file.write_all(b"\n"));
        if let Err(e) = written {
            tracing::error!(error = %e, "writing results");
        }
    }

    fn flush(&self) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.flush() {
            tracing::error!(error = %e, "writing results");
        }
    }
}

/// A file stem from a sample id: letters, digits, `-`, `_` and `.` kept, anything else `_`
/// (an id cannot name a path outside the directory).
pub(crate) fn file_stem(id: &str) -> String {
    id.trim_end_matches(".pgm")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `image` as the binary PGM `dir/<stem>.pgm`, atomically (a temporary file renamed).
pub(crate) fn write_pgm(dir: &Path, stem: &str, image: &input::Image) -> std::io::Result<PathBuf> {
    let mut bytes = format!("P5\n{} {}\n255\n", image.cols, image.rows).into_bytes();
    bytes.extend_from_slice(&image.pixels);
    let path = dir.join(format!("{stem}.pgm"));
    let tmp = dir.join(format!(".{stem}.pgm.tmp"));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, &bytes))
        .and_then(|()| std::fs::rename(&tmp, &path))?;
    Ok(path)
}

/// Writes a hard example's image as a PGM file (atomically), named after its id.
fn save_hard_example(output: &Path, id: &str, image: &input::Image) {
    if let Err(e) = write_pgm(&output.join("hard-examples"), &file_stem(id), image) {
        tracing::warn!(id, error = %e, "hard example image not saved");
    }
}

/// The label of an output set: the `label` output, else the argmax of the first float one.
fn label_of(outputs: &[(String, Tensor)]) -> Option<i64> {
    if let Some((_, Tensor::I64(l))) = outputs.iter().find(|(n, _)| n == "label") {
        return l.iter().next().copied();
    }
    outputs.iter().find_map(|(_, t)| match t {
        Tensor::F32(p) => p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as i64),
        _ => None,
    })
}

fn already_done(results: &Path) -> HashSet<String> {
    let Ok(text) = std::fs::read_to_string(results) else {
        return HashSet::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("late").is_none())
        .filter_map(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
        .collect()
}

#[derive(Default)]
struct Latencies {
    edge: Vec<f64>,
    cloud: Vec<f64>,
}

fn p50(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Reports the figures into the JointInferenceService's `status.metrics` (and its printer
/// columns) through the node's local API.
async fn report(reporter: &sedna::report::StatusReporter, figures: &serde_json::Value) {
    let number = |key: &str| figures.get(key).and_then(serde_json::Value::as_i64);
    let ratio = figures
        .get("uploadRatio")
        .and_then(serde_json::Value::as_f64)
        .map(|r| format!("{:.1}%", r * 100.0));
    reporter
        .report(serde_json::json!({
            "metrics": sedna::report::metrics_list(figures),
            "inferences": number("inferences"),
            "hardExamples": number("hardExamples"),
            "uploadRatio": ratio,
        }))
        .await;
}

/// What earlier runs of the worker counted (the `figures.json` they left in the same output
/// directory): the service's figures are cumulative across worker and agent restarts.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Earlier {
    inferences: u64,
    hard_examples: u64,
    cloud_answers: u64,
    refused: u64,
    uplink_bytes: u64,
}

impl Earlier {
    fn load(dir: &Path) -> Self {
        let Some(v) = std::fs::read(dir.join("figures.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            return Self::default();
        };
        let n = |key: &str| v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
        Self {
            inferences: n("inferences"),
            hard_examples: n("hardExamples"),
            cloud_answers: n("cloudAnswers"),
            refused: n("refused"),
            uplink_bytes: n("uplinkBytes"),
        }
    }
}

fn figures(
    ji: &JointInference,
    earlier: &Earlier,
    latencies: &Latencies,
    cloud_path: &str,
) -> serde_json::Value {
    let s = ji.stats();
    let inferences = s.inferences + earlier.inferences;
    let hard_examples = s.hard_examples + earlier.hard_examples;
    serde_json::json!({
        "inferences": inferences,
        "hardExamples": hard_examples,
        "cloudAnswers": s.cloud_answers + earlier.cloud_answers,
        "queued": ji.queued(),
        "refused": s.refused + earlier.refused,
        "uploadRatio": if inferences == 0 { 0.0 } else { hard_examples as f64 / inferences as f64 },
        "uplinkBytes": s.uplink_bytes + earlier.uplink_bytes,
        "edgeLatencyMs": p50(&latencies.edge),
        "cloudLatencyMs": p50(&latencies.cloud),
        "cloudPath": cloud_path,
    })
}

fn write_figures(dir: &Path, figures: &serde_json::Value) {
    let tmp = dir.join("figures.json.tmp");
    if std::fs::write(&tmp, figures.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join("figures.json"));
    }
}

/// Runs the worker until its input ends (when asked to) or SIGTERM / Ctrl-C.
pub async fn run(args: Args) -> Result<()> {
    match args.mode {
        Some(Mode::Train(train)) => return train::run(train).await,
        Some(Mode::Infer(infer)) => return incremental::run(infer).await,
        None => {}
    }
    let config = Config::from_env().context("reading the worker configuration")?;
    for name in &config.ignored_secret_variables {
        tracing::warn!(
            variable = name,
            "secret variable in the environment ignored: mount credentials as files"
        );
    }
    let input = args
        .input
        .clone()
        .context("SEDNA_INPUT (--input) is not set: where do the samples come from?")?;
    let source = input::resolve(Source::parse(&input)?, &config.namespace).await?;
    let model_url = config.require_model_url()?.to_string();
    let mining = config
        .hard_example_mining()?
        .context("HEM_NAME is not set: the edge worker needs a hard-example mining algorithm")?;
    // The cloud worker: an explicit URL; else through the node's cloud proxy (the hub
    // tunnel, the default when the node offers one); else directly at BIG_MODEL_IP.
    let timeout = Duration::from_millis(args.cloud_timeout_ms);
    let tunnel = std::env::var("SEDNA_CLOUD_TUNNEL")
        .ok()
        .filter(|t| !t.is_empty());
    let proxy = std::env::var("SEDNA_CLOUD_PROXY")
        .ok()
        .filter(|p| !p.is_empty());
    let (cloud, cloud_url, cloud_path) = match (&args.cloud_url, &proxy, &tunnel) {
        (Some(url), _, _) => (GrpcCloud::new(url, timeout)?, url.clone(), "direct"),
        (None, Some(proxy), Some(target)) => (
            GrpcCloud::via_proxy(proxy, target, timeout)?,
            format!("{target} through the hub (proxy {proxy})"),
            "tunnel",
        ),
        (None, _, _) => match &config.big_model {
            Some(endpoint) => {
                let url = format!("http://{endpoint}");
                (GrpcCloud::new(&url, timeout)?, url, "direct")
            }
            None => bail!(
                "no cloud worker: set SEDNA_CLOUD_URL, or BIG_MODEL_IP, or run on a node with a cloud proxy and SEDNA_CLOUD_TUNNEL"
            ),
        },
    };
    // The service's token, when its controller mounted one (its cloud worker requires it).
    let cloud = match sedna::cloud::service_token_from_env()? {
        Some(token) => cloud.with_token(&token)?,
        None => cloud,
    };
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("creating {}", args.output_dir.display()))?;

    let storage = Storage::for_worker(&config, &args.cache_dir, args.s3_allow_http)?;
    let fetched = storage
        .fetch(&model_url)
        .await
        .with_context(|| format!("fetching the model {model_url}"))?;
    let providers = Provider::parse_list(&args.providers)?;
    let model = Arc::new(Model::load(
        &fetched.path,
        &SessionOptions {
            providers,
            intra_threads: args.intra_threads,
            ..SessionOptions::default()
        },
    )?);
    let input_info = match model.inputs().as_slice() {
        [only] => only.clone(),
        many => bail!(
            "the edge model has {} inputs; the worker feeds one image",
            many.len()
        ),
    };
    let queue = HardExampleQueue::open(
        args.output_dir.join("queue"),
        QueueLimits {
            max_items: args.queue_max_items,
            ..QueueLimits::default()
        },
    )?;
    let ji = Arc::new(JointInference::new(model, mining, Box::new(cloud), queue));
    tracing::info!(model = %model_url, cloud = %cloud_url, hem = ji.hem().name(), %input, "edge worker started");

    let results_path = args.output_dir.join("results.jsonl");
    let done = already_done(&results_path);
    let results = Arc::new(Results {
        file: Mutex::new(std::io::BufWriter::with_capacity(
            256 * 1024,
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&results_path)
                .with_context(|| format!("opening {}", results_path.display()))?,
        )),
    });
    let late_results = results.clone();
    let resender = tokio::spawn(ji.clone().resend_forever(
        Duration::from_millis(200),
        Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
        move |answer| {
            late_results.write(&serde_json::json!({
                "id": answer.id,
                "late": true,
                "label": label_of(&answer.cloud.outputs),
                "source": "cloud",
                "model_version": answer.cloud.model_version,
            }));
        },
    ));

    let latencies = Arc::new(Mutex::new(Latencies::default()));
    let mut seen = done.len();
    let mut last_figures = Instant::now();
    let earlier = Earlier::load(&args.output_dir);
    let reporter = match &config.service_name {
        Some(service) => {
            sedna::report::StatusReporter::connect(
                "sedna.io/v1alpha1",
                "JointInferenceService",
                &config.namespace,
                service,
            )
            .await
        }
        None => None,
    };
    let report_interval = Duration::from_millis(args.report_interval_ms);
    let mut last_report = Instant::now() - report_interval;
    let frame = input::frame_size(&input_info);
    // The sources skip the inputs already answered before a restart.
    let mut samples = input::spawn_source(source.clone(), done, frame)?;
    let mut source_ended = false;
    let mut last_flush = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let next = if source_ended {
            tick.tick().await;
            None
        } else {
            tokio::select! {
                sample = samples.recv() => match sample {
                    Some(sample) => Some(sample),
                    None => {
                        source_ended = true;
                        None
                    }
                },
                _ = tick.tick() => None,
            }
        };
        if let Some(input::Sample { id, image, reply }) = next {
            let answer = match image {
                Err(e) => {
                    tracing::warn!(id, error = %e, "skipping unreadable input");
                    serde_json::json!({"id": id, "error": e})
                }
                Ok(image) => match input::to_input(&image, &input_info, args.input_scale) {
                    Err(e) => serde_json::json!({"id": id, "error": e.to_string()}),
                    Ok(x) => {
                        let started = Instant::now();
                        let r = match ji
                            .inference(&id, &[(input_info.name.clone(), Tensor::F32(x))])
                            .await
                        {
                            Ok(r) => r,
                            // This sample's problem (a bad input, a refused cloud answer, a bad
                            // frame): a result line with the error, and on to the next.
                            Err(e) if sample_error(&e) => {
                                tracing::warn!(id, error = %e, "sample failed");
                                seen += 1;
                                let answer = serde_json::json!({"id": id, "error": e.to_string()});
                                results.write(&answer);
                                if let Some(reply) = reply {
                                    results.flush();
                                    let _ = reply.send(answer);
                                }
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        };
                        let ms = started.elapsed().as_secs_f64() * 1e3;
                        {
                            let mut l = latencies.lock().unwrap_or_else(|p| p.into_inner());
                            let list = if r.cloud.is_some() {
                                &mut l.cloud
                            } else {
                                &mut l.edge
                            };
                            list.push(ms);
                            if list.len() > 10_000 {
                                list.drain(..5_000);
                            }
                        }
                        seen += 1;
                        if r.is_hard && args.save_hard_examples {
                            save_hard_example(&args.output_dir, &r.id, &image);
                        }
                        serde_json::json!({
                            "id": r.id,
                            "is_hard": r.is_hard,
                            "label": label_of(r.result()),
                            "source": if r.cloud.is_some() { "cloud" } else { "edge" },
                            "edge_label": label_of(&r.edge.values),
                            "cloud_label": r.cloud.as_ref().and_then(|c| label_of(&c.outputs)),
                            "queued": matches!(r.deferred, Deferred::Queued(_)),
                            "refused": r.deferred == Deferred::Refused,
                            "latency_ms": ms,
                        })
                    }
                },
            };
            results.write(&answer);
            if let Some(reply) = reply {
                results.flush();
                let _ = reply.send(answer);
            }
            if last_flush.elapsed() >= Duration::from_millis(100) {
                results.flush();
                last_flush = Instant::now();
            }
        } else {
            results.flush();
            last_flush = Instant::now();
            let done_seeing = source_ended || args.exit_after.is_some_and(|n| seen >= n);
            if done_seeing && args.exit_after.is_some() && ji.queued() == 0 {
                break;
            }
        }
        if last_figures.elapsed() >= Duration::from_secs(1) {
            let current = figures(
                &ji,
                &earlier,
                &latencies.lock().unwrap_or_else(|p| p.into_inner()),
                cloud_path,
            );
            write_figures(&args.output_dir, &current);
            if let Some(reporter) = &reporter
                && last_report.elapsed() >= report_interval
            {
                report(reporter, &current).await;
                last_report = Instant::now();
            }
            last_figures = Instant::now();
        }
    }
    resender.abort();
    results.flush();
    let last = figures(
        &ji,
        &earlier,
        &latencies.lock().unwrap_or_else(|p| p.into_inner()),
        cloud_path,
    );
    write_figures(&args.output_dir, &last);
    if let Some(reporter) = &reporter {
        report(reporter, &last).await;
    }
    tracing::info!(stats = ?ji.stats(), "edge worker done");
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Whether an inference error belongs to one sample (the worker answers it with an error
/// and goes on) rather than to the worker (its queue's disk, its configuration).
fn sample_error(e: &sedna::joint::JointError) -> bool {
    use sedna::joint::JointError as E;
    matches!(e, E::Edge(_) | E::Frame(_) | E::CloudRefused(_))
}
