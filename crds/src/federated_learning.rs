//! `FederatedLearningJob` (`sedna.io/v1alpha1`, short name `fl`): training workers on edge
//! nodes train on their local data; an aggregation worker in the cloud combines their updates
//! round after round. Raw data never leaves the edge.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Condition, KeyValue, NAME_PATTERN, NameRef, WorkerTemplate, WorkloadPhase, pod_template_schema,
    time_schema,
};

/// The most training workers a job may list.
pub const MAX_TRAINING_WORKERS: usize = 1024;

/// The most rounds a job may ask for.
pub const MAX_ROUNDS: i64 = 100_000;

/// How many of the latest rounds the status keeps (every round is in the aggregator's
/// `rounds.jsonl`).
pub const MAX_ROUND_HISTORY: usize = 100;

/// The aggregation worker, the training workers, and how rounds run.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sedna.io",
    version = "v1alpha1",
    kind = "FederatedLearningJob",
    namespaced,
    status = "FederatedLearningJobStatus",
    shortname = "fl",
    category = "sedna",
    doc = "Federated learning: edge workers train locally, a cloud worker aggregates each round.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Round", type_ = "integer", json_path = ".status.round"),
    printcolumn(name = "Rounds", type_ = "integer", json_path = ".spec.rounds"),
    printcolumn(
        name = "Algorithm",
        type_ = "string",
        json_path = ".spec.aggregation.algorithm",
        priority = 1
    ),
    printcolumn(name = "Active", type_ = "integer", json_path = ".status.active"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FederatedLearningJobSpec {
    /// The cloud worker that aggregates the updates.
    pub aggregation_worker: AggregationWorker,
    /// The edge workers, one per dataset.
    #[schemars(length(min = 1, max = MAX_TRAINING_WORKERS))]
    pub training_workers: Vec<TrainingWorker>,
    /// The model training starts from (default: the workers' own initialisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained_model: Option<NameRef>,
    /// How updates travel between workers (default: the aggregation worker's own stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transmitter: Option<Transmitter>,
    /// Number of rounds. When absent, the aggregation worker's `exit_round` environment value
    /// is used (as in Sedna), else 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_ROUNDS))]
    pub rounds: Option<i64>,
    /// How the updates of a round are combined.
    #[serde(default)]
    pub aggregation: Aggregation,
    /// The fewest updates that close a round. Default: every training worker (Sedna's
    /// behaviour); set it lower, with `roundTimeoutSeconds`, to tolerate stragglers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_TRAINING_WORKERS))]
    pub min_clients: Option<i64>,
    /// Stop before `rounds` once the global model reaches this held-out figure (measured on
    /// `aggregationWorker.testDataset` after every round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// How weights travel between the workers: `f32` (exact), `f16` (half the bytes) or
    /// `int8` (a quarter, quantized per tensor). Default `f32`.
    #[serde(
        default,
        rename = "updateEncoding",
        skip_serializing_if = "Option::is_none"
    )]
    pub update_encoding: Option<UpdateEncoding>,
    /// How long a round waits for updates. When it passes with at least `minClients` updates
    /// the round closes without the stragglers; with fewer, the round fails. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub round_timeout_seconds: Option<i64>,
}

/// The aggregation (cloud) worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct AggregationWorker {
    /// The Model the aggregated weights are written to.
    pub model: NameRef,
    /// A held-out Dataset on the aggregation worker's node: the global model is evaluated on
    /// it after every round (accuracy and loss per round in the status).
    #[serde(
        default,
        rename = "testDataset",
        skip_serializing_if = "Option::is_none"
    )]
    pub test_dataset: Option<NameRef>,
    /// Pod template of the aggregation worker.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: WorkerTemplate,
}

/// A training (edge) worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TrainingWorker {
    /// The Dataset it trains on; the worker runs where the dataset is.
    pub dataset: NameRef,
    /// Pod template of the training worker.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: WorkerTemplate,
}

/// How model updates travel: `ws` or `s3`. Sedna's own samples give both (`ws: {}` as the
/// default beside an `s3` section); then `s3` is meant, as Sedna's controller decides.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Transmitter {
    /// Updates stream to and from the aggregation worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws: Option<WsTransmitter>,
    /// Updates are exchanged through an S3 bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Transmitter>,
}

/// Updates stream to and from the aggregation worker (no settings).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct WsTransmitter {}

/// Updates are exchanged through an S3 bucket.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Transmitter {
    /// `s3://bucket/prefix` under which each round's updates are written.
    #[serde(rename = "aggDataPath")]
    #[schemars(length(min = 1, max = 4096))]
    pub agg_data_path: String,
    /// Name of a Secret with the S3 credentials, mounted as files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub credential_name: Option<String>,
}

/// An aggregation algorithm and its parameters.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Aggregation {
    /// The algorithm.
    #[serde(default)]
    pub algorithm: AggregationAlgorithm,
    /// Its parameters as strings, e.g. `{key: server_learning_rate, value: "0.1"}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::key_values_schema")]
    pub parameters: Vec<KeyValue>,
}

/// A held-out figure that ends a job early.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Target {
    /// The metric: `accuracy`, `f1`, `precision`, `recall`, or a per-class one (`f1_3`).
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9_]+$"))]
    pub metric: String,
    /// The value at or above which the job stops.
    pub value: f64,
}

/// Encodings of weights on the wire.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpdateEncoding {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// 8-bit, quantized per tensor.
    Int8,
}

/// Aggregation algorithms.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AggregationAlgorithm {
    /// Mean of the updates weighted by each client's number of samples.
    #[default]
    FedAvg,
    /// FedAvg with server momentum (`server_momentum`).
    FedAvgM,
    /// FedAvg with a proximal term on the clients (`proximal_mu`).
    FedProx,
    /// Adam as the server optimizer.
    FedAdam,
    /// Yogi as the server optimizer.
    FedYogi,
    /// Coordinate-wise median (robust).
    FedMedian,
    /// Coordinate-wise trimmed mean (`beta`, robust).
    FedTrimmedAvg,
    /// The update closest to its neighbours (`num_malicious_clients`, robust).
    Krum,
}

/// Observed state of a federated learning job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedLearningJobStatus {
    /// Overall phase.
    #[serde(default)]
    pub phase: WorkloadPhase,
    /// Current round, from 1; 0 before the first round.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub round: i64,
    /// Number of updates aggregated in the last closed round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub last_round_clients: Option<i64>,
    /// Conditions, one per type (`Training`, `Complete`, `Failed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// When the controller first acted on the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub start_time: Option<Time>,
    /// When the job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub completion_time: Option<Time>,
    /// Number of running workers.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub active: i32,
    /// Number of workers that finished successfully.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub succeeded: i32,
    /// Number of workers that failed.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub failed: i32,
    /// Figures of the last round, e.g. `loss`, `accuracy`, `uplinkBytes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::key_values_schema")]
    pub metrics: Vec<KeyValue>,
    /// The latest rounds, oldest first (at most [`MAX_ROUND_HISTORY`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ROUND_HISTORY))]
    pub rounds: Vec<RoundFigures>,
}

/// What one closed round measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoundFigures {
    /// The round, from 1.
    #[schemars(range(min = 1))]
    pub round: i64,
    /// Updates aggregated.
    #[schemars(range(min = 0))]
    pub clients: i64,
    /// Selected clients that did not answer before the round closed.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub stragglers: i64,
    /// Training samples behind the updates.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub samples: i64,
    /// Mean training loss the clients reported (weighted by samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    /// Held-out accuracy of the new global model (with a test Dataset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    /// Held-out loss of the new global model (with a test Dataset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    /// Bytes of updates received from the clients.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub bytes_up: i64,
    /// Bytes of global weights sent to the clients.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub bytes_down: i64,
    /// How long the round took.
    #[serde(default)]
    pub seconds: f64,
}
