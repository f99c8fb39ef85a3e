//! `JointInferenceService` (`sedna.io/v1alpha1`, short name `ji`): a small model on an edge
//! node answers what it can and sends hard examples to a big model in the cloud.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Condition, HardExampleMining, Hpa, KeyValue, NameRef, WorkerTemplate, WorkloadPhase,
    pod_template_schema, time_schema,
};

/// Condition types of a JointInferenceService.
pub mod condition_types {
    /// Workers are being created or have not started yet.
    pub const PENDING: &str = "Pending";
    /// Both workers run.
    pub const RUNNING: &str = "Running";
    /// A worker failed and could not be recreated.
    pub const FAILED: &str = "Failed";
}

/// An edge worker, a cloud worker, and how the edge decides what is hard.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sedna.io",
    version = "v1alpha1",
    kind = "JointInferenceService",
    namespaced,
    status = "JointInferenceServiceStatus",
    shortname = "ji",
    category = "sedna",
    doc = "Joint inference: an edge model answers easy inputs, a cloud model the hard examples.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Active", type_ = "integer", json_path = ".status.active"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(
        name = "Inferences",
        type_ = "integer",
        json_path = ".status.inferences"
    ),
    printcolumn(name = "Hard", type_ = "integer", json_path = ".status.hardExamples"),
    printcolumn(name = "Uploaded", type_ = "string", json_path = ".status.uploadRatio"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct JointInferenceServiceSpec {
    /// The worker that runs the small model on an edge node.
    pub edge_worker: EdgeWorker,
    /// The worker that runs the big model in the cloud.
    pub cloud_worker: CloudWorker,
}

/// The edge side of a joint inference service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeWorker {
    /// The small model (a Model in the same namespace).
    pub model: NameRef,
    /// How the edge worker decides that an input is a hard example for the cloud.
    pub hard_example_mining: HardExampleMining,
    /// Pod template of the edge worker; place it with `nodeName` or `nodeSelector`.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: WorkerTemplate,
    /// Horizontal autoscaling of the edge worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpa: Option<Hpa>,
}

/// The cloud side of a joint inference service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudWorker {
    /// The big model (a Model in the same namespace).
    pub model: NameRef,
    /// Pod template of the cloud worker.
    #[schemars(schema_with = "pod_template_schema")]
    pub template: WorkerTemplate,
    /// Horizontal autoscaling of the cloud worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hpa: Option<Hpa>,
}

/// Observed state of a joint inference service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JointInferenceServiceStatus {
    /// Overall phase.
    #[serde(default)]
    pub phase: WorkloadPhase,
    /// Conditions, one per type (see `condition_types`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// When the controller first acted on the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub start_time: Option<Time>,
    /// Number of running workers.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub active: i32,
    /// Number of failed workers.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub failed: i32,
    /// Figures reported by the workers: `inferences`, `hardExamples`, `uploadRatio`,
    /// `uplinkBytes`, `edgeLatencyMs`, `cloudLatencyMs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::key_values_schema")]
    pub metrics: Vec<KeyValue>,
    /// Inputs the edge worker answered (also in `metrics`; here for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub inferences: Option<i64>,
    /// Of those, hard examples sent to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub hard_examples: Option<i64>,
    /// Share of inputs uploaded, e.g. `22.9%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub upload_ratio: Option<String>,
}
