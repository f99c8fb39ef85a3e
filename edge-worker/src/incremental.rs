//! `sedna-edge-worker infer`: an IncrementalLearningJob's inference worker. It serves the
//! deployed model on a stream of samples, mines hard examples and keeps them for labelling,
//! and reloads the model in place when a new one is deployed.
//!
//! - Model: `MODEL_URL` at start; with `MODEL_HOT_UPDATE=true`, every
//!   `MODEL_POLL_PERIOD_SECONDS` it reads the URL of Model `SEDNA_DEPLOY_MODEL` through the
//!   node's local API (the node's copy while the cloud is unreachable; `MODEL_URL` when the
//!   pod has no local API) and, when the URL or its content changed, loads the new model
//!   beside the serving one and swaps it in: samples in flight finish on the old model, none
//!   waits for the load. A model that fails to load leaves the old one serving and is
//!   reported (`failedUrl`, `lastError`).
//! - Samples from `SEDNA_INPUT` (`dir:`, `idx:`, `video:`, `http:` as the joint-inference
//!   worker reads them); one JSON line per sample in `SEDNA_OUTPUT_DIR/results.jsonl`:
//!   `{"id", "label", "is_hard", "model_version", "model_url"}`.
//! - Hard examples (`HEM_NAME`/`HEM_PARAMETERS` on the `probabilities` output) are written as
//!   PGM files into `SEDNA_HARD_EXAMPLES_DIR` (beside the Dataset's index), at most
//!   `SEDNA_HARD_EXAMPLES_MAX` (the oldest are removed and counted); a labeller adds them to
//!   the index with their labels, which grows the Dataset and feeds the train trigger.
//! - Reports `status.inference` of the job through the local API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sedna::config::Config;
use sedna::hem::{HardExampleMining, Input};
use sedna::inference::{Model, Provider, SessionOptions, TensorInfo};
use sedna::storage::Storage;
use sedna_api::incremental_learning::InferenceReport;
use tokio::sync::Mutex;

use crate::input::{self, Source};

/// Flags of `infer`.
#[derive(clap::Args, Debug, Clone)]
pub struct InferArgs {
    /// Samples (as for joint inference): `dir:/path`, `idx:/path`, `video:<url>`,
    /// `http:<host:port>`.
    #[arg(long, env = "SEDNA_INPUT")]
    pub input: String,
    /// Where results and the serving model go.
    #[arg(long, env = "SEDNA_OUTPUT_DIR", default_value = "output")]
    pub output_dir: PathBuf,
    /// Where hard examples are kept (default: `output/hard-examples`).
    #[arg(long, env = "SEDNA_HARD_EXAMPLES_DIR")]
    pub hard_examples_dir: Option<PathBuf>,
    /// Most hard examples kept; the oldest go first.
    #[arg(long, env = "SEDNA_HARD_EXAMPLES_MAX", default_value_t = 10_000)]
    pub hard_examples_max: usize,
    /// Pixel scale applied before the model (default 1/255).
    #[arg(long, env = "SEDNA_INPUT_SCALE", default_value_t = 1.0 / 255.0)]
    pub input_scale: f32,
    /// Where fetched models are cached.
    #[arg(long, env = "SEDNA_CACHE_DIR", default_value = "model-cache")]
    pub cache_dir: PathBuf,
    /// Execution providers, comma-separated.
    #[arg(long, env = "SEDNA_PROVIDERS", default_value = "cpu")]
    pub providers: String,
    /// Threads per inference (0: ONNX Runtime's default).
    #[arg(long, env = "SEDNA_INTRA_THREADS", default_value_t = 1)]
    pub intra_threads: usize,
    /// How often the figures go to the job's status, in milliseconds.
    #[arg(long, env = "SEDNA_REPORT_INTERVAL_MS", default_value_t = 2000)]
    pub report_interval_ms: u64,
    /// Exit once the input is exhausted (idx) or this many samples were answered.
    #[arg(long, env = "SEDNA_EXIT_AFTER")]
    pub exit_after: Option<usize>,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long, env = "SEDNA_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
}

/// What serves, and what the worker reports.
#[derive(Debug, Default)]
struct Serving {
    url: String,
    sha256: String,
    report: InferenceReport,
}

/// The model slot: the serving file in the output directory, reloaded in place.
struct Slot {
    model: Model,
    file: PathBuf,
    serving: Mutex<Serving>,
    inferences: AtomicU64,
    hard_examples: AtomicU64,
    dropped: AtomicU64,
}

impl Slot {
    /// Swaps in the model at `fetched` (its URL and content hash): copies it beside the serving
    /// file, renames it over, reloads; on failure the previous file is put back and the old
    /// model keeps serving.
    async fn swap(&self, url: &str, fetched: &sedna::storage::Fetched) -> Result<u64> {
        let previous = self.file.with_extension("previous");
        let next = self.file.with_extension("next");
        std::fs::copy(&fetched.path, &next).with_context(|| format!("copying {url}"))?;
        std::fs::copy(&self.file, &previous).context("keeping the serving model")?;
        std::fs::rename(&next, &self.file).context("placing the new model")?;
        // Loading takes a while: off the async threads; samples keep using the old session.
        let model = &self.model;
        let loaded = tokio::task::block_in_place(|| model.reload());
        match loaded {
            Ok(version) => Ok(version),
            Err(e) => {
                let _ = std::fs::rename(&previous, &self.file);
                Err(e.into())
            }
        }
    }
}

/// The URL the worker should serve now.
async fn desired_url(
    local: Option<&kube::Client>,
    namespace: &str,
    deploy_model: Option<&str>,
    fallback: &str,
) -> String {
    if let (Some(client), Some(name)) = (local, deploy_model) {
        match sedna::report::model_url(client, namespace, name).await {
            Ok(url) if !url.is_empty() => return url,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, model = name, "deploy Model not readable"),
        }
    }
    fallback.to_string()
}

/// Checks for a new model every `period` and swaps it in.
async fn follow_deploys(
    slot: Arc<Slot>,
    storage: Storage,
    config: Config,
    fallback: String,
    period: Duration,
) {
    let local = sedna::report::local_client().await;
    let deploy_model = std::env::var("SEDNA_DEPLOY_MODEL")
        .ok()
        .filter(|s| !s.is_empty());
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let url = desired_url(
            local.as_ref(),
            &config.namespace,
            deploy_model.as_deref(),
            &fallback,
        )
        .await;
        let fetched = match storage.fetch(&url).await {
            Ok(f) => f,
            Err(e) => {
                record_failure(&slot, &url, &format!("fetching: {e}")).await;
                continue;
            }
        };
        {
            let serving = slot.serving.lock().await;
            let failed_same = serving.report.failed_url.as_deref() == Some(url.as_str())
                && serving.sha256 == fetched.sha256;
            if (serving.url == url && serving.sha256 == fetched.sha256) || failed_same {
                continue;
            }
        }
        match slot.swap(&url, &fetched).await {
            Ok(version) => {
                let mut serving = slot.serving.lock().await;
                serving.url = url.clone();
                serving.sha256 = fetched.sha256.clone();
                serving.report.model_url = url.clone();
                serving.report.model_version = version as i64;
                serving.report.failed_url = None;
                serving.report.last_error = None;
                tracing::info!(model = %url, version, "hot reload: serving the new model");
            }
            Err(e) => record_failure(&slot, &url, &format!("{e:#}")).await,
        }
    }
}

async fn record_failure(slot: &Slot, url: &str, error: &str) {
    let mut serving = slot.serving.lock().await;
    if serving.report.failed_url.as_deref() != Some(url)
        || serving.report.last_error.as_deref() != Some(error)
    {
        serving.report.reload_failures += 1;
        tracing::warn!(
            model = url,
            error,
            "the new model is not served; the previous one stays"
        );
    }
    serving.report.failed_url = Some(url.to_string());
    serving.report.last_error = Some(error.chars().take(1000).collect());
}

/// Keeps hard examples as PGM files, at most `max` (the oldest removed first).
struct HardExamples {
    dir: PathBuf,
    max: usize,
    kept: std::collections::VecDeque<PathBuf>,
}

impl HardExamples {
    fn open(dir: PathBuf, max: usize) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut existing: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pgm"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        existing.sort();
        Ok(Self {
            dir,
            max: max.max(1),
            kept: existing.into_iter().map(|(_, p)| p).collect(),
        })
    }

    /// Saves one; returns how many old ones were removed to make room.
    fn save(&mut self, id: &str, image: &input::Image) -> Result<u64> {
        let path = crate::write_pgm(&self.dir, &crate::file_stem(id), image)?;
        self.kept.retain(|p| *p != path);
        self.kept.push_back(path);
        let mut dropped = 0;
        while self.kept.len() > self.max {
            if let Some(old) = self.kept.pop_front() {
                let _ = std::fs::remove_file(old);
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

/// The class probabilities of one answer (`probabilities`, else the first float output).
fn probabilities(outputs: &sedna::inference::Outputs) -> Option<Vec<f32>> {
    let name = if outputs.get("probabilities").is_ok() {
        "probabilities".to_string()
    } else {
        outputs
            .values
            .iter()
            .find(|(_, t)| matches!(t, sedna::inference::Tensor::F32(_)))?
            .0
            .clone()
    };
    outputs.f32(&name).ok().map(|v| v.iter().copied().collect())
}

fn answer(
    slot: &Slot,
    hem: &dyn HardExampleMining,
    info: &TensorInfo,
    scale: f32,
    image: &input::Image,
) -> Result<(i64, bool, u64)> {
    let x = input::to_input(image, info, scale)?;
    let outputs = slot.model.run(&[(
        info.name.as_str(),
        sedna::inference::TensorView::F32(x.view()),
    )])?;
    let probs = probabilities(&outputs).context("the model has no float output to judge")?;
    let label = probs
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(-1, |(i, _)| i as i64);
    let is_hard = hem.is_hard(&Input::Probabilities(ndarray::ArrayView1::from(&probs[..])));
    Ok((label, is_hard, outputs.model_version))
}

/// Runs the worker until its input ends (with `SEDNA_EXIT_AFTER`) or SIGTERM.
pub(crate) async fn run(args: InferArgs) -> Result<()> {
    let config = Config::from_env().context("reading the worker configuration")?;
    let source = crate::input::resolve(Source::parse(&args.input)?, &config.namespace).await?;
    if let Source::Dir(dir) = &source {
        // The camera (or whoever drops samples) may not have started yet.
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let model_url = config.require_model_url()?.to_string();
    let hem = config
        .hard_example_mining()?
        .context("HEM_NAME is not set: the inference worker mines hard examples")?;
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("creating {}", args.output_dir.display()))?;
    let storage = Storage::for_worker(&config, &args.cache_dir, args.s3_allow_http)?;
    let local = sedna::report::local_client().await;
    let deploy_model = std::env::var("SEDNA_DEPLOY_MODEL")
        .ok()
        .filter(|s| !s.is_empty());
    // A restarted worker serves what is deployed now, not what it was first given.
    let start_url = if config.model_hot_update {
        desired_url(
            local.as_ref(),
            &config.namespace,
            deploy_model.as_deref(),
            &model_url,
        )
        .await
    } else {
        model_url.clone()
    };
    let fetched = storage
        .fetch(&start_url)
        .await
        .with_context(|| format!("fetching the model {start_url}"))?;
    let file = args.output_dir.join("serving.onnx");
    std::fs::copy(&fetched.path, &file).with_context(|| format!("copying {start_url}"))?;
    let options = SessionOptions {
        providers: Provider::parse_list(&args.providers)?,
        intra_threads: args.intra_threads,
        ..SessionOptions::default()
    };
    let model = Model::load(&file, &options).with_context(|| format!("loading {start_url}"))?;
    let info = match model.inputs().as_slice() {
        [only] => only.clone(),
        many => bail!(
            "the model has {} inputs; the worker feeds one image",
            many.len()
        ),
    };
    let slot = Arc::new(Slot {
        model,
        file,
        serving: Mutex::new(Serving {
            url: start_url.clone(),
            sha256: fetched.sha256.clone(),
            report: InferenceReport {
                model_url: start_url.clone(),
                model_version: 1,
                ..InferenceReport::default()
            },
        }),
        inferences: AtomicU64::new(0),
        hard_examples: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    });
    if config.model_hot_update {
        tokio::spawn(follow_deploys(
            slot.clone(),
            storage.clone(),
            config.clone(),
            model_url.clone(),
            config.model_poll_period,
        ));
    }
    let mut hard = HardExamples::open(
        args.hard_examples_dir
            .clone()
            .unwrap_or_else(|| args.output_dir.join("hard-examples")),
        args.hard_examples_max,
    )?;
    let reporter = match &config.job_name {
        Some(job) => {
            sedna::report::StatusReporter::connect(
                "sedna.io/v1alpha1",
                "IncrementalLearningJob",
                &config.namespace,
                job,
            )
            .await
        }
        None => None,
    };
    tracing::info!(model = %start_url, hot = config.model_hot_update, hem = hem.name(), input = %args.input, "inference worker started");

    let results_path = args.output_dir.join("results.jsonl");
    let mut results = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&results_path)
            .with_context(|| format!("opening {}", results_path.display()))?,
    );
    let done = crate::already_done(&results_path);
    let mut samples = input::spawn_source(source, done, input::frame_size(&info))?;
    let report_every = Duration::from_millis(args.report_interval_ms);
    let mut last_report = Instant::now() - report_every;
    let mut answered = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut ended = false;
    let mut shutdown = std::pin::pin!(crate::shutdown_signal());
    loop {
        let next = tokio::select! {
            sample = samples.recv(), if !ended => sample.or_else(|| { ended = true; None }),
            _ = tick.tick() => None,
            _ = &mut shutdown => break,
        };
        if let Some(input::Sample { id, image, reply }) = next {
            let line = match image.map_err(anyhow::Error::msg).and_then(|image| {
                let (label, is_hard, version) =
                    answer(&slot, hem.as_ref(), &info, args.input_scale, &image)?;
                Ok((image, label, is_hard, version))
            }) {
                Ok((image, label, is_hard, version)) => {
                    slot.inferences.fetch_add(1, Ordering::Relaxed);
                    if is_hard {
                        slot.hard_examples.fetch_add(1, Ordering::Relaxed);
                        match hard.save(&id, &image) {
                            Ok(dropped) => {
                                slot.dropped.fetch_add(dropped, Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!(id, error = %e, "hard example not saved"),
                        }
                    }
                    serde_json::json!({"id": id, "label": label, "is_hard": is_hard, "model_version": version})
                }
                Err(e) => serde_json::json!({"id": id, "error": format!("{e:#}")}),
            };
            answered += 1;
            use std::io::Write;
            let _ = serde_json::to_writer(&mut results, &line);
            let _ = results.write_all(b"\n");
            if let Some(reply) = reply {
                let _ = results.flush();
                let _ = reply.send(line);
            }
        } else {
            use std::io::Write;
            let _ = results.flush();
            if args.exit_after.is_some_and(|n| answered >= n)
                || (ended && args.exit_after.is_some())
            {
                break;
            }
        }
        if last_report.elapsed() >= report_every {
            write_report(&slot, reporter.as_ref(), &args.output_dir).await;
            last_report = Instant::now();
        }
    }
    use std::io::Write;
    let _ = results.flush();
    write_report(&slot, reporter.as_ref(), &args.output_dir).await;
    Ok(())
}

async fn write_report(slot: &Slot, reporter: Option<&sedna::report::StatusReporter>, dir: &Path) {
    let report = {
        let serving = slot.serving.lock().await;
        let mut r = serving.report.clone();
        r.inferences = slot.inferences.load(Ordering::Relaxed) as i64;
        r.hard_examples = slot.hard_examples.load(Ordering::Relaxed) as i64;
        r
    };
    let figures = serde_json::json!({
        "inference": report,
        "hardExamplesDropped": slot.dropped.load(Ordering::Relaxed),
    });
    let tmp = dir.join("figures.json.tmp");
    if std::fs::write(&tmp, figures.to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join("figures.json"));
    }
    if let Some(reporter) = reporter {
        reporter
            .report(serde_json::json!({ "inference": report }))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_examples_are_bounded_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut kept = HardExamples::open(dir.path().join("he"), 3).unwrap();
        let image = input::Image {
            rows: 2,
            cols: 2,
            pixels: vec![0, 64, 128, 255],
        };
        let mut dropped = 0;
        for k in 0..5 {
            dropped += kept.save(&format!("s-{k}.pgm"), &image).unwrap();
        }
        assert_eq!(dropped, 2);
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("he"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["s-2.pgm", "s-3.pgm", "s-4.pgm"]);
        let back =
            sedna::dataset::decode_pgm(&std::fs::read(dir.path().join("he/s-4.pgm")).unwrap())
                .unwrap();
        assert_eq!(back.pixels, image.pixels);
        // A hostile id cannot leave the directory.
        kept.save("../../etc/passwd", &image).unwrap();
        assert!(dir.path().join("he/.._.._etc_passwd.pgm").exists());
    }
}
