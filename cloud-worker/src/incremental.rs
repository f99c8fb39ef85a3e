//! `sedna-cloud-worker train` and `evaluate`: an IncrementalLearningJob's train and eval
//! workers, configured by Sedna's environment.
//!
//! Both split the Dataset (`TRAIN_DATASET_URL` / `TEST_DATASET_URL`: a Sedna txt index of
//! labelled PGM images, IDX, csv or a directory) by `SEDNA_TRAIN_PROB` with a stable rule per
//! sample (a hash of its path, or of its position for files without paths), so a sample stays
//! on its side as the dataset grows and the two workers agree.
//!
//! - `train`: trains `BASE_MODEL_URL` (the deployed model) on the train split (plus as many
//!   samples of Sedna's `ORIGINAL_DATASET_URL`, when set, against forgetting) with the
//!   template's hyperparameters (`PARAMETERS`, or variables named `epochs`, `batch_size`,
//!   `learning_rate`, `fedprox_mu` …), writes the candidate to `MODEL_URL` and reports
//!   `status.training` (round, model, samples, epochs, loss, seconds).
//! - `evaluate`: scores each of `MODEL_URLS` (`candidate;deployed`) on the test split and on
//!   any `SEDNA_EVAL_HELD_OUT` sets (`name=url;…`, reported as `<name>_accuracy`, …), writes
//!   `eval.json` beside the candidate and reports `status.evaluation`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sedna::config::Config;
use sedna::dataset::{Limits, load_txt};
use sedna::storage::Storage;
use sedna::train::{TrainData, Trainer, TrainerOptions, parameters_with_env, parse_parameters};
use sedna_api::incremental_learning::{EvaluationReport, MAX_METRICS, Metrics, TrainingReport};

/// Flags of `train` and `evaluate`.
#[derive(clap::Args, Debug, Clone)]
pub struct IncrementalArgs {
    /// Where fetched models are cached.
    #[arg(long, env = "SEDNA_CACHE_DIR", default_value = "model-cache")]
    pub cache_dir: PathBuf,
    /// The share of the dataset used for training (the rest is the test split).
    #[arg(long, env = "SEDNA_TRAIN_PROB", default_value_t = 0.8)]
    pub train_prob: f64,
    /// The round (reported with the results).
    #[arg(long, env = "SEDNA_ROUND", default_value_t = 0)]
    pub round: i64,
    /// Extra held-out sets for `evaluate`: `name=url;…`.
    #[arg(long, env = "SEDNA_EVAL_HELD_OUT")]
    pub held_out: Option<String>,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long, env = "SEDNA_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
}

/// Which side of the split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Train,
    Test,
}

/// Loads one side of a dataset's stable split.
async fn load_split(storage: &Storage, url: &str, fraction: f64, side: Side) -> Result<TrainData> {
    if !(0.0..=1.0).contains(&fraction) {
        bail!("SEDNA_TRAIN_PROB={fraction} is not between 0 and 1");
    }
    let path = storage.dataset_path(url).await?;
    let is_txt = path.extension().is_some_and(|e| e == "txt");
    let (train, test) = if is_txt {
        // Keyed by each sample's path relative to the index: stable whatever order the index
        // is in and wherever the dataset is mounted.
        let samples =
            load_txt(&path, &Limits::default()).with_context(|| format!("dataset {url}"))?;
        let base = path.parent().unwrap_or(std::path::Path::new("/"));
        let (a, b): (Vec<_>, Vec<_>) = samples.into_iter().partition(|s| {
            let key = s.path.strip_prefix(base).unwrap_or(&s.path);
            sedna::train::in_first_split(&key.display().to_string(), fraction)
        });
        let load = |s: &[sedna::dataset::Sample]| -> Result<Option<TrainData>> {
            if s.is_empty() {
                return Ok(None);
            }
            Ok(Some(TrainData::from_images(s, 1.0 / 255.0)?))
        };
        (load(&a)?, load(&b)?)
    } else {
        let all =
            TrainData::load(&path, &Limits::default()).with_context(|| format!("dataset {url}"))?;
        let (a, b) = all.split_by_key(fraction, |i| i.to_string());
        ((!a.is_empty()).then_some(a), (!b.is_empty()).then_some(b))
    };
    let (picked, name) = match side {
        Side::Train => (train, "train"),
        Side::Test => (test, "test"),
    };
    picked
        .with_context(|| format!("the {name} split of {url} (trainProb {fraction}) has no samples"))
}

async fn reporter(config: &Config) -> Option<sedna::report::StatusReporter> {
    let job = config.job_name.as_deref()?;
    sedna::report::StatusReporter::connect(
        "sedna.io/v1alpha1",
        "IncrementalLearningJob",
        &config.namespace,
        job,
    )
    .await
}

/// Runs the train worker.
pub(crate) async fn train(args: IncrementalArgs) -> Result<()> {
    let config = Config::from_env().context("reading the worker configuration")?;
    let base = config
        .base_model_url
        .clone()
        .context("BASE_MODEL_URL is not set: which model does training start from?")?;
    let output = config.require_model_url()?.to_string();
    let data_url = config
        .train_dataset_url
        .clone()
        .context("TRAIN_DATASET_URL is not set")?;
    let storage = Storage::for_worker(&config, &args.cache_dir, args.s3_allow_http)?;
    let parameters = parameters_with_env(&config.parameters);
    let (options, train_config) =
        parse_parameters(parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .context("hyperparameters")?;
    let model = storage
        .fetch(&base)
        .await
        .with_context(|| format!("fetching {base}"))?;
    let mut trainer =
        Trainer::load(&model.path, &options).with_context(|| format!("loading {base}"))?;
    let new = load_split(&storage, &data_url, args.train_prob, Side::Train).await?;
    let new_count = new.len();
    // Sedna's ORIGINAL_DATASET_URL: as many samples of the data the model was first trained on
    // as there are new ones, so the model learns the new data without forgetting the old.
    let data = match &config.original_dataset_url {
        Some(url) => {
            let path = storage.dataset_path(url).await?;
            let original = TrainData::load(&path, &Limits::default())
                .with_context(|| format!("ORIGINAL_DATASET_URL {url}"))?;
            let take = new.len().min(original.len());
            // A seeded random share of that size (a different one each round).
            let (_, replay) =
                original.split(take as f64 / original.len() as f64, args.round as u64);
            new.concat(&replay)
                .with_context(|| format!("joining {url} to the new samples"))?
        }
        None => new,
    };
    tracing::info!(round = args.round, new = new_count, samples = data.len(), base = %base, "training");
    let started = Instant::now();
    let report = trainer.fit(&data, &train_config, &mut |_| {})?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = trainer.to_onnx()?;
    storage
        .upload(&output, bytes.into())
        .await
        .with_context(|| format!("writing the trained model to {output}"))?;
    let loss = report.history.last().map_or(0.0, |e| e.train_loss);
    tracing::info!(round = args.round, loss, seconds, model = %output, "trained");
    let training = TrainingReport {
        round: args.round,
        model_url: output,
        samples: data.len() as i64,
        epochs: report.epochs as i64,
        loss,
        seconds,
    };
    println!("{}", serde_json::to_string(&training)?);
    if let Some(reporter) = reporter(&config).await {
        reporter
            .report(serde_json::json!({ "training": training }))
            .await;
    }
    Ok(())
}

/// The metrics of `model` on `data`, with `prefix` (`""` for all of them; a held-out set's
/// name for its headline figures only).
fn score(trainer: &mut Trainer, data: &TrainData, prefix: &str) -> Result<Metrics> {
    let metrics = trainer.evaluate(data)?.metrics();
    Ok(if prefix.is_empty() {
        metrics
    } else {
        metrics
            .into_iter()
            .filter(|(k, _)| {
                matches!(
                    k.as_str(),
                    "accuracy" | "loss" | "f1" | "precision" | "recall"
                )
            })
            .map(|(k, v)| (format!("{prefix}_{k}"), v))
            .collect()
    })
}

/// The metrics a status report carries: all of them when they fit [`MAX_METRICS`], else the
/// headline ones (no per-class figures).
fn reportable(metrics: Metrics) -> Metrics {
    if metrics.len() <= MAX_METRICS {
        return metrics;
    }
    metrics
        .into_iter()
        .filter(|(k, _)| {
            !["precision_", "recall_", "f1_"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .take(MAX_METRICS)
        .collect()
}

/// Parses `name=url;name=url`.
fn held_out_sets(text: &str) -> Result<Vec<(String, String)>> {
    text.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, url) = pair
                .split_once('=')
                .with_context(|| format!("SEDNA_EVAL_HELD_OUT: {pair:?} is not name=url"))?;
            let name = name.trim();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("SEDNA_EVAL_HELD_OUT: the name {name:?} must be letters, digits or _");
            }
            Ok((name.to_string(), url.trim().to_string()))
        })
        .collect()
}

/// Runs the eval worker.
pub(crate) async fn evaluate(args: IncrementalArgs) -> Result<()> {
    let config = Config::from_env().context("reading the worker configuration")?;
    let [candidate, deployed] = config.model_urls.as_slice() else {
        bail!(
            "MODEL_URLS must name two models, `candidate;deployed` (it names {})",
            config.model_urls.len()
        );
    };
    let data_url = config
        .test_dataset_url
        .clone()
        .context("TEST_DATASET_URL is not set")?;
    let storage = Storage::for_worker(&config, &args.cache_dir, args.s3_allow_http)?;
    let test = load_split(&storage, &data_url, args.train_prob, Side::Test).await?;
    let mut extra = Vec::new();
    for (name, url) in held_out_sets(args.held_out.as_deref().unwrap_or_default())? {
        let path = storage.dataset_path(&url).await?;
        extra.push((
            name,
            TrainData::load(&path, &Limits::default())
                .with_context(|| format!("held-out set {url}"))?,
        ));
    }
    let mut results: BTreeMap<&str, Metrics> = BTreeMap::new();
    for (role, url) in [("candidate", candidate), ("deployed", deployed)] {
        let model = storage
            .fetch(url)
            .await
            .with_context(|| format!("fetching {url}"))?;
        let mut trainer = Trainer::load(&model.path, &TrainerOptions::default())
            .with_context(|| format!("loading {url}"))?;
        let mut metrics = score(&mut trainer, &test, "")?;
        for (name, data) in &extra {
            metrics.extend(score(&mut trainer, data, name)?);
        }
        tracing::info!(round = args.round, role, model = %url, accuracy = metrics.get("accuracy"), "evaluated");
        results.insert(role, metrics);
    }
    let evaluation = EvaluationReport {
        round: args.round,
        samples: test.len() as i64,
        candidate: results.remove("candidate").unwrap_or_default(),
        deployed: results.remove("deployed").unwrap_or_default(),
    };
    // Everything goes to eval.json; the status gets what the API admits.
    let json = serde_json::to_vec_pretty(&evaluation)?;
    let evaluation = EvaluationReport {
        candidate: reportable(evaluation.candidate.clone()),
        deployed: reportable(evaluation.deployed.clone()),
        ..evaluation
    };
    if let Some((dir, _)) = candidate.rsplit_once('/') {
        let at = format!("{dir}/eval.json");
        if let Err(e) = storage.upload(&at, json.clone().into()).await {
            tracing::warn!(error = %e, at, "eval.json not written");
        }
    }
    println!("{}", serde_json::to_string(&evaluation)?);
    if let Some(reporter) = reporter(&config).await {
        reporter
            .report(serde_json::json!({ "evaluation": evaluation }))
            .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_class_evaluation_reports_its_headline_figures_only() {
        let mut many: Metrics = (0..1000).map(|c| (format!("precision_{c}"), 0.5)).collect();
        many.insert("accuracy".into(), 0.9);
        many.insert("shifted_accuracy".into(), 0.8);
        assert_eq!(
            reportable(many).keys().collect::<Vec<_>>(),
            ["accuracy", "shifted_accuracy"]
        );
        let few: Metrics = (0..10).map(|c| (format!("recall_{c}"), 0.5)).collect();
        assert_eq!(reportable(few.clone()), few);
    }

    #[test]
    fn held_out_sets_are_named_pairs() {
        assert_eq!(
            held_out_sets("shifted=/a/test-images.idx3-ubyte.gz; original=file:///b").unwrap(),
            [
                (
                    "shifted".to_string(),
                    "/a/test-images.idx3-ubyte.gz".to_string()
                ),
                ("original".to_string(), "file:///b".to_string())
            ]
        );
        assert!(
            held_out_sets("nameless")
                .unwrap_err()
                .to_string()
                .contains("name=url")
        );
        assert!(
            held_out_sets("a-b=/x")
                .unwrap_err()
                .to_string()
                .contains("a-b")
        );
        assert!(held_out_sets("").unwrap().is_empty());
    }
}
