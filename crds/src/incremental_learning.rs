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

/// Regular expression of a `HH:MM` time of day.
const TIME_OF_DAY_PATTERN: &str = r"^([01][0-9]|2[0-3]):[0-5][0-9]$";

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

/// A comparison operator (Sedna's spellings).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Operator {
    /// Greater than.
    #[serde(rename = ">")]
    Gt,
    /// Greater than or equal.
    #[serde(rename = ">=")]
    Ge,
    /// Equal.
    #[serde(rename = "=")]
    Eq,
    /// Equal (alternative spelling).
    #[serde(rename = "==")]
    EqEq,
    /// Not equal.
    #[serde(rename = "!=")]
    Ne,
    /// Less than or equal.
    #[serde(rename = "<=")]
    Le,
    /// Less than.
    #[serde(rename = "<")]
    Lt,
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

/// Observed state of an incremental learning job.
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
    /// The last value of the train-request annotation the controller acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub last_train_request: Option<String>,
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
}
