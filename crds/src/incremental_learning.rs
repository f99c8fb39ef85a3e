//! `IncrementalLearningJob` (`sedna.io/v1alpha1`, short name `il`): retrain a model on the
//! samples an edge node collects, evaluate it, and deploy it when it is better; repeat.
//!
//! A round is Train → Eval → Deploy. Training starts when `trainSpec.trigger` fires, or at once
//! when the job's [`TRAIN_REQUEST_ANNOTATION`] is given a new value:
//!
//! ```text
//! kubectl annotate --overwrite il/helmet-detection sedna.io/train-request="$(date +%s)"
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Condition, HardExampleMining, NAME_PATTERN, NameRef, WorkerTemplate, WorkloadPhase,
    pod_template_schema, time_schema,
};

/// Annotation that requests a training round now, whatever the trigger says. Each new value
/// starts one round; the controller records the value it acted on in
/// `status.lastTrainRequest`.
pub const TRAIN_REQUEST_ANNOTATION: &str = "sedna.io/train-request";

/// Regular expression of a time of day as Sedna accepts it: `HH:MM` or `H:MM`, and `24:00`
/// (the end of the day).
const TIME_OF_DAY_PATTERN: &str = r"^(([01]?[0-9]|2[0-3]):[0-5][0-9]|24:00)$";

/// The dataset, the initial model, and the three stages of every round.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sedna.io",
    version = "v1alpha1",
    kind = "IncrementalLearningJob",
    namespaced,
    status = "IncrementalLearningJobStatus",
    shortname = "il",
    category = "sedna",
    doc = "Incremental learning: train on new edge samples, evaluate, deploy if better, repeat.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Round", type_ = "integer", json_path = ".status.round"),
    printcolumn(name = "Stage", type_ = "string", json_path = ".status.stage"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.stageState"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct IncrementalLearningJobSpec {
    /// The dataset new samples arrive in.
    pub dataset: IlDataset,
    /// The model the first round starts from.
    pub initial_model: NameRef,
    /// How and when to train.
    pub train_spec: TrainSpec,
    /// How to evaluate a trained model.
    pub eval_spec: EvalSpec,
    /// When and where to deploy an evaluated model.
    pub deploy_spec: DeploySpec,
    /// Name of a Secret for `outputDir`, mounted as files, never copied into environment
    /// variables or annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub credential_name: Option<String>,
    /// Where trained models and evaluation results are written (a path or an `s3://` URL).
    #[schemars(length(min = 1, max = 4096))]
    pub output_dir: String,
}

/// The dataset of an incremental learning job and how it is split.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IlDataset {
    /// Name of the Dataset.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Fraction of the samples used for training; the rest is used for evaluation.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub train_prob: f64,
}

/// The training stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TrainSpec {
    /// Pod template of the training worker.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: WorkerTemplate,
    /// When a training round starts (metric: `num_of_samples`, the samples added since the
    /// last round).
    pub trigger: Trigger,
}

/// The evaluation stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalSpec {
    /// The model the trained one is compared with in the first round (default: the initial
    /// model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_eval_model: Option<NameRef>,
    /// Pod template of the evaluation worker.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: WorkerTemplate,
}

/// The deployment stage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploySpec {
    /// The model the inference worker serves, and how it learns of a new version.
    pub model: DeployModel,
    /// When an evaluated model is deployed (metrics from the evaluation, e.g.
    /// `precision_delta` = new − old).
    pub trigger: Trigger,
    /// How the inference worker picks the hard examples that become new samples.
    pub hard_example_mining: HardExampleMining,
    /// Pod template of the inference worker.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: WorkerTemplate,
}

/// The deployed model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeployModel {
    /// Name of the Model that holds the deployed version.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Whether the inference worker reloads a new version in place (no restart).
    #[serde(default)]
    pub hot_update_enabled: bool,
    /// How often, in seconds, the inference worker checks for a new version.
    #[serde(default = "default_poll_period")]
    #[schemars(range(min = 1, max = 86400))]
    pub poll_period_seconds: i64,
}

fn default_poll_period() -> i64 {
    60
}

/// When a stage starts: a condition on a metric, checked periodically, optionally only within
/// a daily time window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// How often, in seconds, the condition is checked.
    #[serde(default = "default_check_period")]
    #[schemars(range(min = 1, max = 86400))]
    pub check_period_seconds: i64,
    /// The daily window in which the stage may start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<Timer>,
    /// The condition that starts the stage.
    pub condition: TriggerCondition,
}

fn default_check_period() -> i64 {
    60
}

/// A daily time window, `start` to `end` in the node's local time (`HH:MM`); when `end` is
/// earlier than `start` the window wraps past midnight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct Timer {
    /// Start of the window, `HH:MM`.
    #[schemars(regex(pattern = TIME_OF_DAY_PATTERN))]
    pub start: String,
    /// End of the window, `HH:MM`.
    #[schemars(regex(pattern = TIME_OF_DAY_PATTERN))]
    pub end: String,
}

impl Timer {
    /// Whether the minute of the day `now` (0..1440) is in the window; `end` before `start`
    /// wraps past midnight, `start == end` is the whole day. Unparsable times (the schema
    /// refuses them) never match.
    ///
    /// ```
    /// use sedna_api::incremental_learning::Timer;
    /// let night = Timer { start: "22:00".into(), end: "2:00".into() };
    /// assert!(night.contains(23 * 60) && night.contains(60) && !night.contains(12 * 60));
    /// ```
    pub fn contains(&self, now: u32) -> bool {
        let (Some(start), Some(end)) = (minute_of_day(&self.start), minute_of_day(&self.end))
        else {
            return false;
        };
        match start.cmp(&end) {
            std::cmp::Ordering::Less => (start..end).contains(&now),
            std::cmp::Ordering::Greater => now >= start || now < end,
            std::cmp::Ordering::Equal => true,
        }
    }
}

/// The minute of the day of `H:MM`, `HH:MM` or `24:00` (1440).
pub fn minute_of_day(text: &str) -> Option<u32> {
    let (h, m) = text.trim().split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) => Some(1440),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

/// `metric operator threshold`, e.g. `num_of_samples > 500`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct TriggerCondition {
    /// Comparison operator.
    pub operator: Operator,
    /// Value the metric is compared with.
    pub threshold: f64,
    /// Name of the metric.
    #[schemars(length(min = 1, max = 256))]
    pub metric: String,
}

/// A comparison operator, in any of Sedna's spellings: `>`, `>=`, `=`, `==`, `!=`, `<=`,
/// `<`, or the words `gt`, `ge`, `eq`, `ne`, `le`, `lt` (written back as the symbol).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    /// Greater than.
    #[serde(rename = ">", alias = "gt")]
    Gt,
    /// Greater than or equal.
    #[serde(rename = ">=", alias = "ge")]
    Ge,
    /// Equal.
    #[serde(rename = "=", alias = "eq")]
    Eq,
    /// Equal (alternative spelling).
    #[serde(rename = "==")]
    EqEq,
    /// Not equal.
    #[serde(rename = "!=", alias = "ne")]
    Ne,
    /// Less than or equal.
    #[serde(rename = "<=", alias = "le")]
    Le,
    /// Less than.
    #[serde(rename = "<", alias = "lt")]
    Lt,
}

/// Every spelling of an operator the API accepts.
pub const OPERATOR_SPELLINGS: [&str; 13] = [
    ">", ">=", "=", "==", "!=", "<=", "<", "gt", "ge", "eq", "ne", "le", "lt",
];

impl JsonSchema for Operator {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Operator".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Comparison operator: >, >=, =, ==, !=, <=, < or gt, ge, eq, ne, le, lt.",
            "type": "string",
            "enum": OPERATOR_SPELLINGS,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

impl TriggerCondition {
    /// Checks the condition with `lookup` giving a metric's value by name; returns whether it
    /// holds and the value it was checked on. Sedna's indexed form `name[0]` is the metric
    /// `name` (Sedna reports metrics as one-element lists); other indices are refused.
    ///
    /// ```
    /// use sedna_api::incremental_learning::TriggerCondition;
    /// let c: TriggerCondition = serde_json::from_str(
    ///     r#"{"operator": "ge", "threshold": 100, "metric": "num_of_samples"}"#).unwrap();
    /// assert_eq!(c.check(|_| Some(120.0)), Ok((true, 120.0)));
    /// ```
    pub fn check(&self, lookup: impl Fn(&str) -> Option<f64>) -> Result<(bool, f64), String> {
        let name = metric_name(&self.metric)?;
        let value = lookup(name).ok_or_else(|| format!("no metric {name:?}"))?;
        Ok((self.operator.holds(value, self.threshold), value))
    }

    /// The condition as text, e.g. `accuracy_delta > 0.01`.
    pub fn describe(&self) -> String {
        let op = serde_json::to_value(self.operator)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        format!("{} {op} {}", self.metric, self.threshold)
    }
}

/// A metric's name without Sedna's `[0]` index.
fn metric_name(metric: &str) -> Result<&str, String> {
    let metric = metric.trim();
    match metric.split_once('[') {
        None => Ok(metric),
        Some((name, "0]")) => Ok(name.trim()),
        Some(_) => Err(format!(
            "metric {metric:?}: only the index [0] is understood (metrics are single values)"
        )),
    }
}

/// A deploy metric from the two evaluations: `X_delta` is the candidate's `X` minus the
/// deployed model's; any other name is the candidate's own metric.
///
/// ```
/// use sedna_api::incremental_learning::{Metrics, deploy_metric};
/// let new = Metrics::from([("accuracy".into(), 0.9)]);
/// let old = Metrics::from([("accuracy".into(), 0.7)]);
/// assert!((deploy_metric("accuracy_delta", &new, &old).unwrap() - 0.2).abs() < 1e-9);
/// assert_eq!(deploy_metric("accuracy", &new, &old), Some(0.9));
/// ```
pub fn deploy_metric(name: &str, candidate: &Metrics, deployed: &Metrics) -> Option<f64> {
    match name.strip_suffix("_delta") {
        Some(base) => Some(candidate.get(base)? - deployed.get(base)?),
        None => candidate.get(name).copied(),
    }
}

impl Operator {
    /// Whether `value operator threshold` holds.
    ///
    /// ```
    /// use sedna_api::incremental_learning::Operator;
    /// assert!(Operator::Gt.holds(501.0, 500.0));
    /// assert!(!Operator::Gt.holds(500.0, 500.0));
    /// ```
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Operator::Gt => value > threshold,
            Operator::Ge => value >= threshold,
            Operator::Eq | Operator::EqEq => value == threshold,
            Operator::Ne => value != threshold,
            Operator::Le => value <= threshold,
            Operator::Lt => value < threshold,
        }
    }
}

/// A stage of a round.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Stage {
    /// Training a new model.
    Train,
    /// Evaluating it against the deployed one.
    Eval,
    /// Deploying it to the inference worker.
    Deploy,
}

/// Where a stage is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum StageState {
    /// Waiting for its trigger.
    Waiting,
    /// Triggered; its worker is about to be created.
    Ready,
    /// Its worker is starting.
    Starting,
    /// Its worker runs.
    Running,
    /// Done.
    Completed,
    /// Its worker failed.
    Failed,
}

/// Metrics by name (`accuracy`, `precision`, `recall`, `f1`, `loss`, `precision_<class>`, …).
pub type Metrics = std::collections::BTreeMap<String, f64>;

/// The most metrics one evaluation may report (a larger map is refused by the API: a worker
/// reports its headline figures then, and keeps the rest in `eval.json`).
pub const MAX_METRICS: usize = 256;

fn metrics_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": { "type": "number" },
        "maxProperties": MAX_METRICS,
    })
}

/// The most rounds kept in `status.rounds` (the oldest are dropped).
pub const MAX_ROUNDS_KEPT: usize = 100;

/// Observed state of an incremental learning job.
///
/// The controller owns every field except the four its workers and the node report:
/// `trainTrigger` (the node's trigger), `training` (the train worker), `evaluation` (the eval
/// worker) and `inference` (the inference worker).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IncrementalLearningJobStatus {
    /// Overall phase.
    #[serde(default)]
    pub phase: WorkloadPhase,
    /// Current round, from 1; 0 before the first training starts.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub round: i64,
    /// Current stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// State of the current stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_state: Option<StageState>,
    /// When the current stage entered its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub stage_time: Option<Time>,
    /// The round in progress (moved to `rounds` when it ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<RoundRecord>,
    /// Failed tries of the current stage so far (reset when a stage completes).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0))]
    pub attempts: i64,
    /// The last value of the train-request annotation the controller acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub last_train_request: Option<String>,
    /// The dataset's sample count when the current round was triggered: the trigger's
    /// `num_of_samples` counts the samples added since.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0))]
    pub last_round_samples: i64,
    /// The model being trained or evaluated in this round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<ModelVersion>,
    /// The model the inference worker serves (the initial model until a round deploys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed: Option<ModelVersion>,
    /// Finished rounds, the latest last (at most [`MAX_ROUNDS_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub rounds: Vec<RoundRecord>,
    /// Reported by the node holding the dataset: the train trigger fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_trigger: Option<TriggerReport>,
    /// Reported by the train worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingReport>,
    /// Reported by the eval worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationReport>,
    /// Reported by the inference worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceReport>,
    /// Conditions, one per type (`Training`, `Evaluating`, `Deploying`, `Failed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// When the controller first acted on the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub start_time: Option<Time>,
    /// When the job ended (it runs until deleted unless it fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub completion_time: Option<Time>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// A model of a round: where it is and how it scored.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelVersion {
    /// The round that trained it (0: the initial model).
    #[serde(default)]
    pub round: i64,
    /// Where it is.
    #[schemars(length(max = 4096))]
    pub url: String,
    /// Its evaluation on the test split, when evaluated.
    #[serde(default, skip_serializing_if = "Metrics::is_empty")]
    #[schemars(schema_with = "metrics_schema")]
    pub metrics: Metrics,
}

/// What one round did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoundRecord {
    /// The round.
    pub round: i64,
    /// When the node's trigger fired (absent for a train request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub triggered: Option<Time>,
    /// When the controller started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub started: Option<Time>,
    /// What started it: `trigger` (the node's train trigger) or `request` (the annotation).
    #[schemars(length(max = 16))]
    pub started_by: String,
    /// The dataset's sample count when it started.
    #[serde(default)]
    pub samples: i64,
    /// The trained model.
    #[schemars(length(max = 4096))]
    pub candidate_url: String,
    /// Whether it was deployed.
    pub deployed: bool,
    /// Why (the deploy condition with the values it was checked on).
    #[schemars(length(max = 1024))]
    pub reason: String,
    /// The candidate's evaluation.
    #[serde(default, skip_serializing_if = "Metrics::is_empty")]
    #[schemars(schema_with = "metrics_schema")]
    pub candidate_metrics: Metrics,
    /// The then-deployed model's evaluation on the same split.
    #[serde(default, skip_serializing_if = "Metrics::is_empty")]
    #[schemars(schema_with = "metrics_schema")]
    pub deployed_metrics: Metrics,
    /// Seconds per stage: from the trigger to the trained model, to the evaluation, to the
    /// model serving at the edge (absent when not deployed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_seconds: Option<f64>,
    /// See `trainSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_seconds: Option<f64>,
    /// See `trainSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_seconds: Option<f64>,
}

/// The node's report that the train trigger fired.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerReport {
    /// The round it asks for (the job's round + 1 when it fired).
    pub round: i64,
    /// The dataset's sample count then.
    pub samples: i64,
    /// Samples added since the last round (the condition's `num_of_samples`).
    pub new_samples: i64,
    /// When it fired.
    #[schemars(schema_with = "time_schema")]
    pub time: Option<Time>,
}

/// The train worker's report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingReport {
    /// The round.
    pub round: i64,
    /// Where the trained model was written.
    #[schemars(length(max = 4096))]
    pub model_url: String,
    /// Training samples (after the split).
    pub samples: i64,
    /// Epochs run.
    pub epochs: i64,
    /// The last epoch's mean training loss.
    pub loss: f64,
    /// Wall time of training, seconds.
    pub seconds: f64,
}

/// The eval worker's report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationReport {
    /// The round.
    pub round: i64,
    /// Test samples.
    pub samples: i64,
    /// The trained model's metrics.
    #[schemars(schema_with = "metrics_schema")]
    pub candidate: Metrics,
    /// The deployed model's metrics on the same samples.
    #[schemars(schema_with = "metrics_schema")]
    pub deployed: Metrics,
}

/// The inference worker's report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceReport {
    /// The model it serves.
    #[schemars(length(max = 4096))]
    pub model_url: String,
    /// Which load of the worker serves: 1 for the first, +1 per hot reload.
    pub model_version: i64,
    /// Samples answered.
    #[serde(default)]
    pub inferences: i64,
    /// Hard examples mined (and saved into the dataset).
    #[serde(default)]
    pub hard_examples: i64,
    /// Reloads that failed (the previous model kept serving).
    #[serde(default)]
    pub reload_failures: i64,
    /// Why the last reload failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub last_error: Option<String>,
    /// The URL of the model that failed to load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub failed_url: Option<String>,
}

/// Status fields a node (its workers and its trigger) may write; the controller owns the
/// others.
pub const NODE_STATUS_FIELDS: [&str; 4] = ["trainTrigger", "training", "evaluation", "inference"];

impl IncrementalLearningJob {
    /// The train request waiting to be acted on: the annotation's value when it is set,
    /// non-empty, and differs from the one recorded in `status.lastTrainRequest`.
    pub fn pending_train_request(&self) -> Option<&str> {
        let requested = self
            .metadata
            .annotations
            .as_ref()?
            .get(TRAIN_REQUEST_ANNOTATION)?
            .trim();
        let acted_on = self
            .status
            .as_ref()
            .and_then(|s| s.last_train_request.as_deref());
        (!requested.is_empty() && acted_on != Some(requested)).then_some(requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(annotation: Option<&str>, acted_on: Option<&str>) -> IncrementalLearningJob {
        let yaml = include_str!("../../examples/incremental-learning/helmet-detection.yaml");
        let doc = crate::yaml_documents(yaml)
            .unwrap()
            .into_iter()
            .find(|v| v["kind"] == "IncrementalLearningJob")
            .unwrap();
        let mut job: IncrementalLearningJob = serde_json::from_value(doc).unwrap();
        if let Some(value) = annotation {
            job.metadata
                .annotations
                .get_or_insert_default()
                .insert(TRAIN_REQUEST_ANNOTATION.to_owned(), value.to_owned());
        }
        job.status = acted_on.map(|v| IncrementalLearningJobStatus {
            last_train_request: Some(v.to_owned()),
            ..Default::default()
        });
        job
    }

    #[test]
    fn a_new_annotation_value_is_a_pending_train_request() {
        assert_eq!(job(Some("1"), None).pending_train_request(), Some("1"));
        assert_eq!(job(Some("2"), Some("1")).pending_train_request(), Some("2"));
    }

    #[test]
    fn an_acted_on_or_empty_request_is_not_pending() {
        assert_eq!(job(Some("1"), Some("1")).pending_train_request(), None);
        assert_eq!(job(Some("  "), None).pending_train_request(), None);
        assert_eq!(job(None, Some("1")).pending_train_request(), None);
    }

    #[test]
    fn operators_compare_as_sedna_does() {
        let cases = [
            (Operator::Gt, [false, false, true]),
            (Operator::Ge, [false, true, true]),
            (Operator::Eq, [false, true, false]),
            (Operator::EqEq, [false, true, false]),
            (Operator::Ne, [true, false, true]),
            (Operator::Le, [true, true, false]),
            (Operator::Lt, [true, false, false]),
        ];
        for (op, expected) in cases {
            let got = [op.holds(1.0, 2.0), op.holds(2.0, 2.0), op.holds(3.0, 2.0)];
            assert_eq!(got, expected, "{op:?}");
        }
    }

    #[test]
    fn operators_use_sedna_spellings() {
        let ops: Vec<Operator> =
            serde_json::from_str(r#"[">", ">=", "=", "==", "!=", "<=", "<"]"#).unwrap();
        assert_eq!(ops.len(), 7);
        assert!(serde_json::from_str::<Operator>(r#""=>""#).is_err());
    }

    #[test]
    fn operators_accept_sednas_words_and_write_the_symbol_back() {
        let words: Vec<Operator> =
            serde_json::from_str(r#"["gt", "ge", "eq", "ne", "le", "lt"]"#).unwrap();
        assert_eq!(
            words,
            [
                Operator::Gt,
                Operator::Ge,
                Operator::Eq,
                Operator::Ne,
                Operator::Le,
                Operator::Lt
            ]
        );
        assert_eq!(serde_json::to_string(&Operator::Ge).unwrap(), r#"">=""#);
        // The schema the API server checks accepts every spelling.
        let schema = serde_json::to_value(schemars::schema_for!(Operator)).unwrap();
        let listed: Vec<&str> = schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(listed, OPERATOR_SPELLINGS);
        for spelling in OPERATOR_SPELLINGS {
            assert!(
                serde_json::from_value::<Operator>(spelling.into()).is_ok(),
                "{spelling}"
            );
        }
    }

    #[test]
    fn times_of_day_as_sedna_writes_them() {
        assert_eq!(minute_of_day("2:00"), Some(120));
        assert_eq!(minute_of_day("02:00"), Some(120));
        assert_eq!(minute_of_day("24:00"), Some(1440));
        assert_eq!(minute_of_day("23:59"), Some(1439));
        for bad in ["24:01", "25:00", "2:0", "12", ":30", "123:00", "ab:cd"] {
            assert_eq!(minute_of_day(bad), None, "{bad}");
        }
        let pattern = regex_lite(TIME_OF_DAY_PATTERN);
        for ok in ["2:00", "02:00", "24:00", "0:00", "23:59"] {
            assert!(pattern(ok), "{ok}");
        }
        for bad in ["24:01", "2:0", "99:00"] {
            assert!(!pattern(bad), "{bad}");
        }
    }

    /// The schema's pattern, checked the way the API server checks it.
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
        let re = regex::Regex::new(pattern).unwrap();
        move |s| re.is_match(s)
    }

    #[test]
    fn timer_windows_wrap_past_midnight_and_end_at_24_00() {
        let t = |start: &str, end: &str| Timer {
            start: start.into(),
            end: end.into(),
        };
        let day = t("02:00", "20:00");
        assert!(!day.contains(119) && day.contains(120) && day.contains(1199));
        assert!(!day.contains(1200));
        let night = t("22:00", "2:00");
        assert!(night.contains(22 * 60) && night.contains(0) && night.contains(119));
        assert!(!night.contains(120) && !night.contains(21 * 60 + 59));
        let evening = t("18:00", "24:00");
        assert!(evening.contains(23 * 60 + 59) && !evening.contains(0));
        assert!(t("00:00", "24:00").contains(0) && t("00:00", "24:00").contains(1439));
        assert!(t("5:00", "5:00").contains(3), "start == end: all day");
    }

    #[test]
    fn deploy_conditions_read_named_and_indexed_deltas() {
        let new = Metrics::from([("precision".into(), 0.8), ("accuracy".into(), 0.9)]);
        let old = Metrics::from([("precision".into(), 0.6), ("accuracy".into(), 0.95)]);
        let cond = |metric: &str, op: &str, threshold: f64| TriggerCondition {
            operator: serde_json::from_value(op.into()).unwrap(),
            threshold,
            metric: metric.into(),
        };
        let check =
            |c: TriggerCondition| c.check(|name| deploy_metric(name, &new, &old)).map(|r| r.0);
        assert_eq!(check(cond("precision_delta", ">", 0.1)), Ok(true));
        assert_eq!(check(cond("precision_delta[0]", "gt", 0.1)), Ok(true));
        assert_eq!(check(cond("accuracy_delta", ">=", 0.0)), Ok(false));
        assert_eq!(check(cond("accuracy", ">", 0.85)), Ok(true));
        assert!(
            check(cond("precision_delta[1]", ">", 0.1))
                .unwrap_err()
                .contains("[0]")
        );
        assert!(
            check(cond("recall_delta", ">", 0.1))
                .unwrap_err()
                .contains("recall_delta")
        );
        assert_eq!(
            cond("num_of_samples", "ge", 100.0).describe(),
            "num_of_samples >= 100"
        );
    }

    #[test]
    fn a_node_cannot_bloat_the_status_with_metrics() {
        use kube::CustomResourceExt;
        let schema =
            crate::schema::StructuralSchema::from_crd(&IncrementalLearningJob::crd(), "v1alpha1")
                .unwrap();
        let yaml = include_str!("../../examples/incremental-learning/mnist-digits.yaml");
        let mut job = crate::yaml_documents(yaml)
            .unwrap()
            .into_iter()
            .find(|v| v["kind"] == "IncrementalLearningJob")
            .unwrap();
        let metrics = |n: usize| -> serde_json::Value {
            (0..n)
                .map(|k| (format!("precision_{k}"), serde_json::json!(0.5)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        job["status"] = serde_json::json!({"evaluation": {"round": 1, "samples": 10,
            "candidate": metrics(MAX_METRICS), "deployed": metrics(1)}});
        assert!(
            schema
                .admit(&mut job.clone(), crate::schema::UnknownFields::Strict)
                .is_ok()
        );
        job["status"]["evaluation"]["candidate"] = metrics(MAX_METRICS + 1);
        let error = schema
            .admit(&mut job, crate::schema::UnknownFields::Strict)
            .unwrap_err()
            .to_string();
        assert!(error.contains("status.evaluation.candidate"), "{error}");
    }
}
