//! `sedna-cloud-worker aggregate`: a FederatedLearningJob's aggregation worker. A thin shell
//! around lib-sedna's round state machine ([`sedna::fl::server::Server`]): it listens for
//! training workers (directly, or through the hub tunnel their nodes open), feeds what they
//! send to the machine, sends what it says, and after every round evaluates the global model
//! on the held-out data (when given), checkpoints it to the object store and reports the
//! round into the job's status. A restarted aggregator resumes after the last checkpointed
//! round. After the last round the final model is written to `MODEL_URL` (the job's Model).
//!
//! Environment (flags override): `JOB_NAME`, `NAMESPACE`, `MODEL_URL` (where the final model
//! goes), `BASE_MODEL_URL` (the model to start from; default `MODEL_URL`), `TEST_DATASET_URL`,
//! `PARTICIPANTS_COUNT`, `AGG_PORT` (7363), `SEDNA_LISTEN_HOST` (127.0.0.1), and
//! `SEDNA_FL_*` for the job's settings (rounds, minimum clients, round timeout, algorithm and
//! its parameters, the encoding of weights sent down, the settings each round carries).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sedna::aggregate;
use sedna::config::Config;
use sedna::fl::Message;
use sedna::fl::server::{ConnId, Input, Output, Phase, RoundSummary, Server, ServerConfig};
use sedna::fl::wire::{self, WireLimits};
use sedna::storage::Storage;
use sedna::train::{TrainData, Trainer, TrainerOptions};
use sedna::weights::Encoding;
use sedna_api::federated_learning::{MAX_ROUND_HISTORY, RoundFigures};
use tokio::sync::mpsc;

/// Flags of `aggregate` (each with the environment variable the controller sets).
#[derive(clap::Args, Debug, Clone)]
pub struct AggregateArgs {
    /// Address to listen on; default SEDNA_LISTEN_HOST (127.0.0.1) and AGG_PORT (7363).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Rounds to run.
    #[arg(long, env = "SEDNA_FL_ROUNDS", default_value_t = 10)]
    pub rounds: u32,
    /// Fewest updates that close a round at its timeout (default: every participant).
    #[arg(long, env = "SEDNA_FL_MIN_CLIENTS")]
    pub min_clients: Option<usize>,
    /// Seconds a round may take (default: no limit).
    #[arg(long, env = "SEDNA_FL_ROUND_TIMEOUT_SECONDS")]
    pub round_timeout_seconds: Option<u64>,
    /// Aggregation: FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum.
    #[arg(long, env = "SEDNA_FL_ALGORITHM", default_value = "FedAvg")]
    pub algorithm: String,
    /// The algorithm's parameters, Sedna's `[{"key": …, "value": …}]`.
    #[arg(long, env = "SEDNA_FL_AGGREGATION_PARAMETERS", default_value = "[]")]
    pub aggregation_parameters: String,
    /// Encoding of the global weights sent to workers that read it: f32, f16 or int8.
    #[arg(long, env = "SEDNA_FL_ENCODING", default_value = "f32")]
    pub encoding: String,
    /// Hyperparameters every round carries to the workers (`[{"key": …, "value": …}]`).
    #[arg(long, env = "SEDNA_FL_SETTINGS", default_value = "[]")]
    pub settings: String,
    /// Stop once the global model's held-out metric (`accuracy`, `f1`, …) reaches
    /// `--target-value` (needs TEST_DATASET_URL).
    #[arg(long, env = "SEDNA_FL_TARGET_METRIC", requires = "target_value")]
    pub target_metric: Option<String>,
    /// The value of `--target-metric` that ends the job.
    #[arg(long, env = "SEDNA_FL_TARGET_VALUE", requires = "target_metric")]
    pub target_value: Option<f64>,
    /// Where checkpoints go (default: `file://<output dir>/checkpoints`).
    #[arg(long, env = "SEDNA_FL_CHECKPOINT_URL")]
    pub checkpoint_url: Option<String>,
    /// Local output: `rounds.jsonl` (one line per round), checkpoints by default.
    #[arg(long, env = "SEDNA_OUTPUT_DIR", default_value = "output")]
    pub output_dir: PathBuf,
    /// Where fetched models and datasets are cached.
    #[arg(long, env = "SEDNA_CACHE_DIR", default_value = "model-cache")]
    pub cache_dir: PathBuf,
    /// The largest frame a worker may send, in bytes.
    #[arg(long, env = "SEDNA_FL_MAX_FRAME_BYTES", default_value_t = 256 << 20)]
    pub max_frame_bytes: u64,
    /// Most workers' connections open at once; one beyond is closed at once.
    #[arg(long, env = "SEDNA_FL_MAX_CONNECTIONS", default_value_t = 256)]
    pub max_connections: usize,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long, env = "SEDNA_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
}

/// What a connection task tells the machine.
enum Event {
    Connected(ConnId, mpsc::Sender<(Message, Encoding)>),
    Input(Input),
}

fn pairs(json: &str, what: &str) -> Result<Vec<(String, String)>> {
    sedna::hem::parse_parameters(json).with_context(|| format!("{what}: {json:?}"))
}

/// The checkpoint index: the last completed round and where its model is.
#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    round: u32,
    model: String,
}

/// Runs the aggregator until the job finishes or fails (or SIGTERM).
pub(crate) async fn run(args: AggregateArgs) -> Result<()> {
    run_with(args, None).await
}

/// Runs the aggregation worker with `custom` in place of the built-in algorithm
/// `args.algorithm` names (a user's aggregation, e.g. a Python class through the bindings).
pub(crate) async fn run_with(
    args: AggregateArgs,
    custom: Option<Box<dyn aggregate::Aggregator>>,
) -> Result<()> {
    let config = Config::from_env().context("reading the worker configuration")?;
    let job = config
        .job_name
        .clone()
        .unwrap_or_else(|| "federated-learning".into());
    let output_url = config.require_model_url()?.to_string();
    let start_url = config
        .base_model_url
        .clone()
        .unwrap_or_else(|| output_url.clone());
    let listen = match args.listen {
        Some(listen) => listen,
        None => {
            let host = std::env::var("SEDNA_LISTEN_HOST").unwrap_or_else(|_| "127.0.0.1".into());
            let port = std::env::var("AGG_PORT")
                .ok()
                .map(|p| {
                    p.parse::<u16>()
                        .with_context(|| format!("AGG_PORT={p:?} is not a port"))
                })
                .transpose()?
                .unwrap_or(sedna::config::DEFAULT_AGG_PORT);
            format!("{host}:{port}")
                .parse()
                .with_context(|| format!("SEDNA_LISTEN_HOST={host:?} is not an IP address"))?
        }
    };
    std::fs::create_dir_all(&args.output_dir)
        .with_context(|| format!("creating {}", args.output_dir.display()))?;
    let storage = Storage::for_worker(&config, &args.cache_dir, args.s3_allow_http)?;
    let checkpoints = match &args.checkpoint_url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            let dir = std::path::absolute(args.output_dir.join("checkpoints"))?;
            std::fs::create_dir_all(&dir)?;
            format!("file://{}", dir.display())
        }
    };

    // The model: the last checkpoint when there is one, else the starting model.
    let index_url = format!("{checkpoints}/checkpoint.json");
    let resumed: Option<Checkpoint> = match storage.read(&index_url, 1 << 20).await {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{index_url} is not a checkpoint index"))?,
        ),
        Err(sedna::storage::StorageError::NotFound { .. }) => None,
        Err(e) => return Err(e).with_context(|| format!("reading {index_url}")),
    };
    let (model_url, completed) = match &resumed {
        Some(c) => (c.model.clone(), c.round),
        None => (start_url.clone(), 0),
    };
    let fetched = storage
        .fetch(&model_url)
        .await
        .with_context(|| format!("fetching the model {model_url}"))?;
    let mut trainer = Trainer::load(
        &fetched.path,
        &TrainerOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading {model_url}"))?;
    if args.target_metric.is_some() && config.test_dataset_url.is_none() {
        bail!(
            "SEDNA_FL_TARGET_METRIC needs TEST_DATASET_URL: the target is measured on held-out data"
        );
    }
    let test = match &config.test_dataset_url {
        Some(url) => {
            let path = storage
                .dataset_path(url)
                .await
                .with_context(|| format!("fetching the test data {url}"))?;
            Some(
                TrainData::load(&path, &Default::default())
                    .with_context(|| format!("test data {url}"))?,
            )
        }
        None => None,
    };

    let participants = config.participants_count.map_or(1, |n| n as usize).max(1);
    let mut aggregation = pairs(
        &args.aggregation_parameters,
        "SEDNA_FL_AGGREGATION_PARAMETERS",
    )?;
    let mut settings: BTreeMap<String, String> = pairs(&args.settings, "SEDNA_FL_SETTINGS")?
        .into_iter()
        .collect();
    let algorithm = if args.algorithm.eq_ignore_ascii_case("FedProx") {
        // FedProx: the clients train with the proximal term; the server averages.
        let mu = aggregation
            .iter()
            .find(|(k, _)| k == "proximal_mu" || k == "mu")
            .map_or("0.01".to_string(), |(_, v)| v.clone());
        aggregation.retain(|(k, _)| k != "proximal_mu" && k != "mu");
        settings.insert("fedprox_mu".into(), mu);
        "FedAvg".to_string()
    } else {
        args.algorithm.clone()
    };
    let refs: Vec<(&str, &str)> = aggregation
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let aggregator = match custom {
        Some(custom) => custom,
        None => aggregate::build(&algorithm, &refs)
            .map_err(|e| anyhow::anyhow!("SEDNA_FL_ALGORITHM={algorithm}: {e}"))?,
    };
    let server_config = ServerConfig {
        job: job.clone(),
        rounds: args.rounds,
        expected_clients: participants,
        min_clients: args
            .min_clients
            .unwrap_or(participants)
            .clamp(1, participants),
        round_timeout: args.round_timeout_seconds.map(Duration::from_secs),
        max_clients: participants.max(1) * 2,
        settings,
        encoding: Encoding::parse(&args.encoding)
            .map_err(|e| anyhow::anyhow!("SEDNA_FL_ENCODING: {e}"))?,
    };
    let global = trainer.weights()?;
    let mut server = Server::new(server_config, aggregator, global, completed);
    if completed > 0 {
        tracing::info!(round = completed, model = %model_url, "resumed from the last checkpoint");
    }

    let reporter = sedna::report::StatusReporter::connect(
        "sedna.io/v1alpha1",
        "FederatedLearningJob",
        &config.namespace,
        &job,
    )
    .await;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    // Tests and orchestration read this line to learn the port when 0 was asked for.
    println!("listening on {}", listener.local_addr()?);
    tracing::info!(address = %listener.local_addr()?, %job, participants, rounds = args.rounds, algorithm = %args.algorithm, "aggregating");

    let limits = WireLimits {
        max_frame_bytes: args.max_frame_bytes,
        ..WireLimits::default()
    };
    let token = sedna::cloud::service_token_from_env().context("reading the job's token")?;
    if token.is_none() {
        tracing::warn!("no SEDNA_SERVICE_TOKEN_FILE: any worker that reaches this port may join");
    }
    let (events_tx, mut events) = mpsc::channel::<Event>(256);
    tokio::spawn(accept(
        listener,
        events_tx,
        Admission {
            limits,
            token: token.map(std::sync::Arc::from),
            connections: std::sync::Arc::new(tokio::sync::Semaphore::new(
                args.max_connections.max(1),
            )),
        },
    ));
    let mut writers: HashMap<ConnId, mpsc::Sender<(Message, Encoding)>> = HashMap::new();
    let started = Instant::now();
    let mut rounds_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.output_dir.join("rounds.jsonl"))?;
    let mut history = History::load(
        &args.output_dir.join("rounds.jsonl"),
        server.completed_rounds(),
    );
    let shutdown = crate::shutdown_signal();
    tokio::pin!(shutdown);
    if let Phase::Finished { round } = server.phase().clone() {
        tracing::info!(round, "the job had already finished");
        finish(
            &storage,
            &trainer,
            &output_url,
            &reporter,
            round,
            &test,
            history.rounds.back(),
        )
        .await?;
        return Ok(());
    }
    loop {
        let deadline = server
            .next_deadline()
            .map(|d| tokio::time::Instant::from_std(started + d));
        let input = tokio::select! {
            event = events.recv() => match event {
                Some(Event::Connected(conn, writer)) => {
                    writers.insert(conn, writer);
                    Input::Connected(conn)
                }
                Some(Event::Input(input)) => input,
                None => bail!("the listener stopped"),
            },
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => Input::Tick,
            _ = &mut shutdown => {
                tracing::info!("stopping; the next start resumes after the last checkpointed round");
                return Ok(());
            }
        };
        if let Input::Disconnected(conn) = &input {
            writers.remove(conn);
        }
        let mut pending: VecDeque<Output> = server.step(input, started.elapsed()).into();
        while let Some(output) = pending.pop_front() {
            match output {
                Output::Send { conn, message } => {
                    let encoding = server.encoding_for(conn);
                    if let Some(writer) = writers.get(&conn)
                        && writer.try_send((message, encoding)).is_err()
                    {
                        // A worker that does not read its frames loses its connection.
                        writers.remove(&conn);
                    }
                }
                Output::Close { conn, reason } => {
                    tracing::info!(conn, %reason, "closing a worker's connection");
                    writers.remove(&conn);
                }
                Output::RoundClosed(summary) => {
                    trainer.set_weights(server.global())?;
                    let evaluation = evaluate(&mut trainer, &test)?;
                    let url = format!("{checkpoints}/round-{:05}.onnx", summary.round);
                    storage
                        .upload(&url, trainer.to_onnx()?.into())
                        .await
                        .with_context(|| format!("checkpointing to {url}"))?;
                    let index = serde_json::to_vec(&Checkpoint {
                        round: summary.round,
                        model: url.clone(),
                    })?;
                    storage
                        .upload(&index_url, index.into())
                        .await
                        .with_context(|| format!("writing {index_url}"))?;
                    let line = round_line(&summary, &evaluation);
                    tracing::info!(round = summary.round, participants = ?summary.participants, stragglers = ?summary.stragglers, metrics = %line, "round closed");
                    use std::io::Write;
                    writeln!(rounds_log, "{line}")?;
                    history.push(&summary, &evaluation);
                    if let Some(reporter) = &reporter {
                        let mut status = status(&summary, &line, "Running", None);
                        status["rounds"] = serde_json::to_value(&history.rounds)?;
                        reporter.report(status).await;
                    }
                    if let (Some(metric), Some(value)) = (&args.target_metric, args.target_value)
                        && evaluation.get(metric).is_some_and(|v| *v >= value)
                    {
                        tracing::info!(round = summary.round, %metric, value, "target reached: stopping");
                        pending.extend(server.stop());
                    }
                }
                Output::Finished { round } => {
                    finish(
                        &storage,
                        &trainer,
                        &output_url,
                        &reporter,
                        round,
                        &test,
                        history.rounds.back(),
                    )
                    .await?;
                    // Let the final frames reach the workers.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return Ok(());
                }
                Output::Failed { reason } => {
                    tracing::error!(%reason, "the job failed");
                    if let Some(reporter) = &reporter {
                        reporter
                            .report(serde_json::json!({"metrics": [{"key": "outcome", "value": "failed"}, {"key": "reason", "value": reason}]}))
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    bail!("federated learning failed: {reason}");
                }
            }
        }
    }
}

fn evaluate(trainer: &mut Trainer, test: &Option<TrainData>) -> Result<BTreeMap<String, f64>> {
    Ok(match test {
        Some(test) => trainer.evaluate(test)?.metrics(),
        None => BTreeMap::new(),
    })
}

/// The latest rounds' figures, as the job's status lists them.
struct History {
    rounds: VecDeque<RoundFigures>,
}

impl History {
    /// What a resumed aggregator had reported: the rounds up to `completed` in `rounds.jsonl`
    /// (a round logged after its checkpoint was lost is run again, and logged again).
    fn load(log: &Path, completed: u32) -> Self {
        let mut history = History {
            rounds: VecDeque::new(),
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let Ok(line) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // a line cut short by a crash
            };
            let Some(figures) = figures_of_line(&line) else {
                continue;
            };
            if figures.round <= i64::from(completed) {
                history.rounds.retain(|r| r.round != figures.round);
                history.add(figures);
            }
        }
        history
    }

    fn push(&mut self, summary: &RoundSummary, evaluation: &BTreeMap<String, f64>) {
        if let Some(figures) = figures_of_line(&round_line(summary, evaluation)) {
            self.add(figures);
        }
    }

    fn add(&mut self, figures: RoundFigures) {
        self.rounds.push_back(figures);
        while self.rounds.len() > MAX_ROUND_HISTORY {
            self.rounds.pop_front();
        }
    }
}

/// A `rounds.jsonl` line as the status lists it.
fn figures_of_line(line: &serde_json::Value) -> Option<RoundFigures> {
    let count = |key: &str| {
        line.get(key)
            .and_then(|v| v.as_array())
            .map_or(0, |a| a.len() as i64)
    };
    let int = |key: &str| {
        line.get(key)
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0)
    };
    let float = |key: &str| line.get(key).and_then(serde_json::Value::as_f64);
    Some(RoundFigures {
        round: line.get("round")?.as_i64()?,
        clients: count("participants"),
        stragglers: count("stragglers"),
        samples: int("numSamples"),
        train_loss: float("train_loss"),
        test_accuracy: float("test_accuracy"),
        test_loss: float("test_loss"),
        bytes_up: int("bytesUp"),
        bytes_down: int("bytesDown"),
        seconds: float("seconds").unwrap_or(0.0),
    })
}

/// One round's figures as a JSON object (a line of `rounds.jsonl`).
fn round_line(summary: &RoundSummary, evaluation: &BTreeMap<String, f64>) -> serde_json::Value {
    let mut line = serde_json::json!({
        "round": summary.round,
        "participants": summary.participants,
        "stragglers": summary.stragglers,
        "numSamples": summary.num_samples,
        "bytesUp": summary.bytes_up,
        "bytesDown": summary.bytes_down,
        "seconds": summary.duration.as_secs_f64(),
    });
    for (key, value) in &summary.train_metrics {
        line[key] = serde_json::json!(value);
    }
    for key in ["accuracy", "loss", "f1"] {
        if let Some(v) = evaluation.get(key) {
            line[format!("test_{key}")] = serde_json::json!(v);
        }
    }
    line
}

fn status(
    summary: &RoundSummary,
    line: &serde_json::Value,
    outcome: &str,
    model: Option<&str>,
) -> serde_json::Value {
    let mut figures = serde_json::json!({"outcome": outcome});
    for key in [
        "test_accuracy",
        "test_loss",
        "train_loss",
        "bytesUp",
        "bytesDown",
        "seconds",
        "numSamples",
    ] {
        if let Some(v) = line.get(key) {
            figures[key] = v.clone();
        }
    }
    if let Some(model) = model {
        figures["model"] = serde_json::json!(model);
    }
    serde_json::json!({
        "round": summary.round,
        "lastRoundClients": summary.participants.len(),
        "metrics": sedna::report::metrics_list(&figures),
    })
}

async fn finish(
    storage: &Storage,
    trainer: &Trainer,
    output_url: &str,
    reporter: &Option<sedna::report::StatusReporter>,
    round: u32,
    test: &Option<TrainData>,
    last: Option<&RoundFigures>,
) -> Result<()> {
    storage
        .upload(output_url, trainer.to_onnx()?.into())
        .await
        .with_context(|| format!("writing the final model to {output_url}"))?;
    tracing::info!(round, model = %output_url, "finished: the final model is written");
    if let Some(reporter) = reporter {
        let mut trainer = Trainer::from_bytes(
            trainer.to_onnx()?,
            &TrainerOptions {
                threads: 1,
                ..Default::default()
            },
        )?;
        let evaluation = evaluate(&mut trainer, test)?;
        let summary = RoundSummary {
            round,
            participants: Vec::new(),
            stragglers: Vec::new(),
            num_samples: 0,
            train_metrics: BTreeMap::new(),
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
        };
        // The final figures: the model's evaluation, and the last round's traffic and time
        // (the metrics list is replaced as a whole).
        let mut line = round_line(&summary, &evaluation);
        if let Some(last) = last {
            line["bytesUp"] = last.bytes_up.into();
            line["bytesDown"] = last.bytes_down.into();
            line["seconds"] = last.seconds.into();
            line["numSamples"] = last.samples.into();
            if let Some(loss) = last.train_loss {
                line["train_loss"] = loss.into();
            }
        }
        let mut status = status(&summary, &line, "succeeded", Some(output_url));
        if let Some(map) = status.as_object_mut() {
            map.remove("lastRoundClients");
        }
        reporter.report(status).await;
    }
    Ok(())
}

/// What a connection must satisfy to take part.
#[derive(Clone)]
struct Admission {
    limits: WireLimits,
    /// The job's token every connection must open with (`None`: any).
    token: Option<std::sync::Arc<str>>,
    /// Connections left.
    connections: std::sync::Arc<tokio::sync::Semaphore>,
}

/// How long a new connection may take to present the job's token.
const TOKEN_DEADLINE: Duration = Duration::from_secs(10);

/// Accepts workers; each connection (within the connection limit, after presenting the job's
/// token when one is required) gets a reader (frames → events) and a writer (a bounded queue
/// of messages → frames).
async fn accept(
    listener: tokio::net::TcpListener,
    events: mpsc::Sender<Event>,
    admission: Admission,
) {
    let mut next: ConnId = 1;
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let Ok(slot) = admission.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached: a connection was closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = next;
        next += 1;
        let (events, admission) = (events.clone(), admission.clone());
        tokio::spawn(async move {
            let _slot = slot;
            serve_worker(stream, peer, conn, events, admission).await;
        });
    }
}

/// One worker's connection, from its token to its end.
async fn serve_worker(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    conn: ConnId,
    events: mpsc::Sender<Event>,
    admission: Admission,
) {
    let (mut reader, mut writer) = stream.into_split();
    if let Some(token) = &admission.token {
        let presented =
            tokio::time::timeout(TOKEN_DEADLINE, wire::read_token(&mut reader, token)).await;
        if !matches!(presented, Ok(Ok(true))) {
            tracing::warn!(conn, %peer, "a connection without the job's token was refused");
            let refusal = Message::Reject {
                reason: "this aggregator needs the job's token (SEDNA_SERVICE_TOKEN_FILE)".into(),
                retryable: false,
            };
            let _ = wire::write_message(&mut writer, &refusal, Encoding::F32).await;
            return;
        }
    }
    let (tx, mut rx) = mpsc::channel::<(Message, Encoding)>(8);
    if events.send(Event::Connected(conn, tx)).await.is_err() {
        return;
    }
    tokio::spawn(async move {
        while let Some((message, encoding)) = rx.recv().await {
            if let Err(e) = wire::write_message(&mut writer, &message, encoding).await {
                tracing::debug!(conn, error = %e, "writing to a worker failed");
                break;
            }
        }
    });
    loop {
        match wire::read_message(&mut reader, &admission.limits).await {
            Ok(Some((message, bytes))) => {
                if events
                    .send(Event::Input(Input::Message {
                        conn,
                        message,
                        bytes,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(conn, %peer, error = %e, "a worker's frame was refused; closing its connection");
                break;
            }
        }
    }
    let _ = events.send(Event::Input(Input::Disconnected(conn))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(round: u32) -> String {
        serde_json::json!({
            "round": round, "participants": ["a", "b"], "stragglers": ["c"], "numSamples": 200,
            "bytesUp": 90_000, "bytesDown": 135_000, "seconds": 1.5, "train_loss": 0.4,
            "test_accuracy": 0.9, "test_loss": 0.3,
        })
        .to_string()
    }

    #[test]
    fn a_resumed_history_keeps_the_checkpointed_rounds_once_and_at_most_the_limit() {
        let dir = std::env::temp_dir().join(format!("sedna-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("rounds.jsonl");
        // Rounds 1–3 logged, then a crash before round 3's checkpoint; round 2 was logged
        // twice by an earlier restart; a line was cut short.
        let text = [
            line(1),
            line(2),
            line(2),
            line(3),
            "{\"round\": 4, \"partic".into(),
        ]
        .join("\n");
        std::fs::write(&log, text).unwrap();
        let history = History::load(&log, 2);
        let rounds: Vec<i64> = history.rounds.iter().map(|r| r.round).collect();
        assert_eq!(rounds, [1, 2]);
        let first = &history.rounds[0];
        assert_eq!(
            (first.clients, first.stragglers, first.samples),
            (2, 1, 200)
        );
        assert_eq!(first.train_loss, Some(0.4));
        assert_eq!(first.test_accuracy, Some(0.9));
        assert_eq!((first.bytes_up, first.bytes_down), (90_000, 135_000));

        let many: Vec<String> = (1..=250).map(line).collect();
        std::fs::write(&log, many.join("\n")).unwrap();
        let history = History::load(&log, 250);
        assert_eq!(history.rounds.len(), MAX_ROUND_HISTORY);
        assert_eq!(history.rounds.front().unwrap().round, 151);
        assert_eq!(history.rounds.back().unwrap().round, 250);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
