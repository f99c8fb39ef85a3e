//! `sedna-cloud-worker`: the cloud side of a JointInferenceService (and, with the `aggregate`
//! subcommand, a FederatedLearningJob's aggregation worker: [`AggregateArgs`]; with `train` and
//! `evaluate`, an IncrementalLearningJob's train and eval workers: [`IncrementalArgs`]). Loads the big model from
//! `MODEL_URL` (through lib-sedna's storage: `s3://`, `file://` or a path; credentials from
//! mounted files) and serves it as the `sedna.inference.v1.Inference` gRPC service with
//! dynamic batching, until SIGTERM or Ctrl-C; on the same port it answers Sedna's HTTP JSON
//! protocol for the big model (`POST /<service>/predict`, `{"data": …}` → `{"result": …}`),
//! so an unmodified Sedna little-model app can use it.
//!
//! Configured like a Sedna worker, from the environment the controller injects, with flags
//! overriding it: `MODEL_URL`, `BIG_MODEL_PORT` (default 5000), `SEDNA_LISTEN_HOST`
//! (default 127.0.0.1; the controller sets 0.0.0.0 inside a pod), `SEDNA_MAX_BATCH`,
//! `SEDNA_MAX_DELAY_MS`, `SEDNA_CACHE_DIR`, `SEDNA_PROVIDERS`, `SEDNA_INTRA_THREADS`,
//! `SEDNA_MAX_REQUEST_BYTES` (16 MiB), `SEDNA_MAX_IN_FLIGHT` (64). With
//! `SEDNA_SERVICE_TOKEN_FILE` (the controller mounts the service's token) every request must
//! carry `authorization: Bearer <token>`; others are refused (gRPC `UNAUTHENTICATED`, HTTP 401).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use sedna::cloud::{BatchOptions, Batcher, Protocols, ServeOptions, serve};
use sedna::config::Config;
use sedna::inference::{Model, Provider, SessionOptions};
use sedna::storage::Storage;

mod aggregate;
mod incremental;
pub use aggregate::AggregateArgs;
pub use incremental::IncrementalArgs;

/// The worker's modes besides serving the big model.
#[derive(clap::Subcommand, Debug)]
pub enum Mode {
    /// Aggregate a FederatedLearningJob's updates (its aggregation worker).
    Aggregate(Box<AggregateArgs>),
    /// Train an IncrementalLearningJob's candidate model (its train worker).
    Train(IncrementalArgs),
    /// Evaluate an IncrementalLearningJob's candidate against the deployed model (its eval
    /// worker).
    Evaluate(IncrementalArgs),
}

/// Flags (each with an environment variable the controller sets).
#[derive(Parser, Debug)]
#[command(
    name = "sedna-cloud-worker",
    version,
    about = "Serves a JointInferenceService's big model over gRPC with dynamic batching"
)]
pub struct Args {
    /// Another mode (default: serve the big model).
    #[command(subcommand)]
    pub mode: Option<Mode>,
    /// The model (`s3://bucket/key`, `file:///path` or an absolute path); default: MODEL_URL.
    #[arg(long)]
    pub model_url: Option<String>,
    /// Address to listen on; default SEDNA_LISTEN_HOST (127.0.0.1) and BIG_MODEL_PORT (5000).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Most requests run together.
    #[arg(long, env = "SEDNA_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,
    /// Longest a request waits for others, in milliseconds.
    #[arg(long, env = "SEDNA_MAX_DELAY_MS", default_value_t = 2)]
    pub max_delay_ms: u64,
    /// Most requests waiting; more are answered "overloaded".
    #[arg(long, env = "SEDNA_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,
    /// Where fetched models are cached.
    #[arg(long, env = "SEDNA_CACHE_DIR", default_value = "model-cache")]
    pub cache_dir: std::path::PathBuf,
    /// Execution providers, comma-separated (`cpu`, `cuda`, `cuda:N`, `tensorrt`, `tensorrt:N`).
    #[arg(long, env = "SEDNA_PROVIDERS", default_value = "cpu")]
    pub providers: String,
    /// Threads per inference (0: ONNX Runtime's default).
    #[arg(long, env = "SEDNA_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,
    /// Largest request accepted (gRPC message or JSON body), in bytes.
    #[arg(long, env = "SEDNA_MAX_REQUEST_BYTES", default_value_t = sedna::cloud::DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Most requests read or answered at once (memory for requests stays under this times
    /// the largest request).
    #[arg(long, env = "SEDNA_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: usize,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long, env = "SEDNA_S3_ALLOW_HTTP")]
    s3_allow_http: bool,
}

/// Runs the worker until its input ends (when asked to) or SIGTERM / Ctrl-C.
pub async fn run(args: Args) -> Result<()> {
    match args.mode {
        Some(Mode::Aggregate(aggregate)) => return aggregate::run(*aggregate).await,
        Some(Mode::Train(il)) => return incremental::train(il).await,
        Some(Mode::Evaluate(il)) => return incremental::evaluate(il).await,
        None => {}
    }
    let config = Config::from_env().context("reading the worker configuration")?;
    for name in &config.ignored_secret_variables {
        tracing::warn!(variable = name, dir = %config.credentials_dir.display(), "secret variable in the environment ignored: mount credentials as files");
    }
    let model_url = match args.model_url.clone() {
        Some(url) => url,
        None => config.require_model_url()?.to_string(),
    };
    let listen = match args.listen {
        Some(listen) => listen,
        None => {
            let host = std::env::var("SEDNA_LISTEN_HOST").unwrap_or_else(|_| "127.0.0.1".into());
            let port = std::env::var("BIG_MODEL_PORT")
                .ok()
                .map(|p| {
                    p.parse::<u16>()
                        .with_context(|| format!("BIG_MODEL_PORT={p:?} is not a port"))
                })
                .transpose()?
                .unwrap_or(sedna::config::DEFAULT_BIG_MODEL_PORT);
            format!("{host}:{port}")
                .parse()
                .with_context(|| format!("SEDNA_LISTEN_HOST={host:?} is not an IP address"))?
        }
    };
    let storage = Storage::for_worker(&config, &args.cache_dir, args.s3_allow_http)?;
    let fetched = storage
        .fetch(&model_url)
        .await
        .with_context(|| format!("fetching the model {model_url}"))?;
    let providers = Provider::parse_list(&args.providers)?;
    let options = SessionOptions {
        providers,
        intra_threads: args.intra_threads,
        ..SessionOptions::default()
    };
    let model = Arc::new(Model::load(&fetched.path, &options)?);
    tracing::info!(model = %model_url, sha256 = %fetched.sha256, inputs = ?model.inputs(), "model loaded");
    let inputs = model.inputs();
    let batcher = Batcher::spawn(
        model,
        BatchOptions {
            max_batch: args.max_batch,
            max_delay: Duration::from_millis(args.max_delay_ms),
            max_queue: args.max_queue,
        },
    );
    let token = sedna::cloud::service_token_from_env().context("reading the service token")?;
    if token.is_none() {
        tracing::warn!(
            "no SEDNA_SERVICE_TOKEN_FILE: any caller that reaches this port is answered"
        );
    }
    let options = ServeOptions {
        max_request_bytes: args.max_request_bytes,
        max_in_flight: args.max_in_flight,
        token,
        ..ServeOptions::default()
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    // Tests and orchestration read this line to learn the port when 0 was asked for.
    println!("listening on {}", listener.local_addr()?);
    tracing::info!(address = %listener.local_addr()?, max_batch = args.max_batch, max_delay_ms = args.max_delay_ms, ?options, "serving");
    let protocols = match inputs.as_slice() {
        // Sedna's little-model apps send {"data": ...} for the model's one input.
        [only] => Protocols::GrpcAndJson {
            input: Some(only.clone()),
        },
        _ => Protocols::Grpc,
    };
    serve(listener, batcher, protocols, options, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Runs the aggregation worker as `sedna-cloud-worker aggregate ARGV…` would (flags, then the
/// environment the controller sets), aggregating with `custom` when given instead of the
/// algorithm `--algorithm` names: how a user's aggregation (e.g. a Python class registered with
/// Sedna's `ClassFactory`) runs inside the platform's aggregation worker.
pub async fn aggregate_with(
    argv: &[String],
    custom: Option<Box<dyn sedna::aggregate::Aggregator>>,
) -> Result<()> {
    #[derive(Parser)]
    #[command(name = "aggregate")]
    struct Flags {
        #[command(flatten)]
        args: AggregateArgs,
    }
    let flags =
        Flags::try_parse_from(std::iter::once("aggregate".to_string()).chain(argv.iter().cloned()))
            .map_err(|e| anyhow::anyhow!("{}", e.render()))?;
    aggregate::run_with(flags.args, custom).await
}

pub(crate) async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
