//! `sedna-edge-worker train`: a FederatedLearningJob's training worker. It trains the
//! aggregator's global weights on the node's Dataset with lib-sedna's trainer (the data
//! never leaves the node: only weights and a sample count do), round after round, through a
//! direct connection or the node's tunnel to the hub, reconnecting with jittered backoff;
//! at the end it keeps the final model in `SEDNA_OUTPUT_DIR/final.onnx`.
//!
//! Environment (flags override): `JOB_NAME`, `WORKER_NAME`, `MODEL_URL` (the model whose
//! initializers are trained), `TRAIN_DATASET_URL` (a local path or `file://` URL: IDX, csv, a
//! Sedna txt index, a directory; `s3://` for single-file datasets), `TEST_DATASET_URL`
//! (optional), `PARAMETERS` (hyperparameters, Sedna's JSON list) and variables named as
//! hyperparameters (`epochs`, `batch_size`, …, as Sedna's examples set them); each round's
//! settings from the aggregator are laid over them. The aggregator: `SEDNA_AGG_TUNNEL` through
//! the node's `SEDNA_CLOUD_PROXY` (the default where the node has one), else `AGG_IP`/`AGG_PORT`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use sedna::config::Config;
use sedna::fl::client::{self, ClientOptions};
use sedna::fl::estimator::OnnxEstimator;
use sedna::fl::{ClientState, FederatedLearning};
use sedna::storage::Storage;
use sedna::train::{TrainData, Trainer, parse_parameters};
use sedna::weights::Encoding;

/// Flags of `train`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// The aggregator's `host:port`; default AGG_IP:AGG_PORT, else the tunnel.
    #[arg(long, env = "SEDNA_AGG_ADDRESS")]
    pub aggregator: Option<String>,
    /// Encoding of the updates sent up: f32, f16 or int8.
    #[arg(long, env = "SEDNA_FL_UPDATE_ENCODING", default_value = "f32")]
    pub encoding: String,
    /// Where the final model and the round history go.
    #[arg(long, env = "SEDNA_OUTPUT_DIR", default_value = "output")]
    pub output_dir: PathBuf,
    /// Where fetched models are cached.
    #[arg(long, env = "SEDNA_CACHE_DIR", default_value = "model-cache")]
    pub cache_dir: PathBuf,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long, env = "SEDNA_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
}

/// Where the aggregator is.
enum Route {
    Direct(String),
    Tunnel { proxy: String, target: String },
}

/// Runs the worker until the job finishes.
pub(crate) async fn run(args: TrainArgs) -> Result<()> {
    let config = Config::from_env().context("reading the worker configuration")?;
    let job = config.job_name.clone().context("JOB_NAME is not set")?;
    let worker = config.worker_name.clone();
    let model_url = config.require_model_url()?.to_string();
    let data_url = config
        .train_dataset_url
        .clone()
        .context("TRAIN_DATASET_URL is not set: the worker trains on the node's Dataset")?;
    let route = match (&args.aggregator, &config.aggregator) {
        (Some(address), _) => Route::Direct(address.clone()),
        (None, Some(endpoint)) => Route::Direct(format!("{}:{}", endpoint.host, endpoint.port)),
        (None, None) => match (
            std::env::var("SEDNA_CLOUD_PROXY"),
            std::env::var("SEDNA_AGG_TUNNEL"),
        ) {
            (Ok(proxy), Ok(target)) => Route::Tunnel { proxy, target },
            _ => bail!(
                "no aggregator: set AGG_IP (and AGG_PORT), or run on a node with a cloud proxy and SEDNA_AGG_TUNNEL"
            ),
        },
    };
    let encoding = Encoding::parse(&args.encoding)
        .map_err(|e| anyhow::anyhow!("SEDNA_FL_UPDATE_ENCODING: {e}"))?;
    let storage = Storage::for_worker(&config, &args.cache_dir, args.s3_allow_http)?;
    let model = storage
        .fetch(&model_url)
        .await
        .with_context(|| format!("fetching the model {model_url}"))?;
    // Hyperparameters: PARAMETERS (Sedna's JSON list), and variables named as the keys
    // (Sedna's examples set `epochs`, `batch_size`, `learning_rate` that way).
    let parameters = sedna::train::parameters_with_env(&config.parameters);
    let (options, _) = parse_parameters(parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .context("PARAMETERS")?;
    let trainer =
        Trainer::load(&model.path, &options).with_context(|| format!("loading {model_url}"))?;
    let data = TrainData::load(&storage.dataset_path(&data_url).await?, &Default::default())
        .with_context(|| format!("training data {data_url}"))?;
    let test = match &config.test_dataset_url {
        Some(url) => Some(
            TrainData::load(&storage.dataset_path(url).await?, &Default::default())
                .with_context(|| format!("test data {url}"))?,
        ),
        None => None,
    };
    tracing::info!(%job, %worker, samples = data.len(), model = %model_url, "training worker ready");
    let estimator = OnnxEstimator::new(trainer, data, test, parameters)
        .map_err(|e| anyhow::anyhow!("PARAMETERS: {e}"))?;
    let client = FederatedLearning::new(&job, &worker, estimator, encoding);
    // The job's token, when its controller mounted one (its aggregator requires it).
    let token = sedna::cloud::service_token_from_env()?;
    let connect = || {
        let route = match &route {
            Route::Direct(address) => Route::Direct(address.clone()),
            Route::Tunnel { proxy, target } => Route::Tunnel {
                proxy: proxy.clone(),
                target: target.clone(),
            },
        };
        let token = token.clone();
        async move {
            let mut stream = match route {
                Route::Direct(address) => {
                    let stream = tokio::net::TcpStream::connect(&address).await?;
                    stream.set_nodelay(true)?;
                    stream
                }
                Route::Tunnel { proxy, target } => {
                    sedna::cloud::proxy_connect(&proxy, &target).await?
                }
            };
            if let Some(token) = &token {
                sedna::fl::wire::write_token(&mut stream, token).await?;
            }
            Ok(stream)
        }
    };
    let done = client::run(client, connect, ClientOptions::default()).await?;
    let ClientState::Finished { round } = done.state().clone() else {
        bail!("the job ended in state {:?}", done.state());
    };
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("creating {}", args.output_dir.display()))?;
    let out = args.output_dir.join("final.onnx");
    done.estimator().trainer().save(&out)?;
    let history: Vec<serde_json::Value> = done
        .history()
        .iter()
        .map(|(round, metrics)| serde_json::json!({"round": round, "metrics": metrics}))
        .collect();
    std::fs::write(
        args.output_dir.join("history.json"),
        serde_json::to_vec_pretty(&history)?,
    )?;
    tracing::info!(round, model = %out.display(), "the job finished; final model kept");
    Ok(())
}
