//! `Model` (`sedna.io/v1alpha1`): a model file in an object store, referred to by workers.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, KeyValue, NAME_PATTERN, ResourcePhase, time_schema};

/// Where a model is stored.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sedna.io",
    version = "v1alpha1",
    kind = "Model",
    namespaced,
    status = "ModelStatus",
    category = "sedna",
    doc = "A model file (ONNX or another format) in an object store or on a node.",
    printcolumn(name = "Format", type_ = "string", json_path = ".spec.format"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url", priority = 1),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Location of the model file: an absolute path, a `file://` URL or an `s3://bucket/key`
    /// URL.
    #[schemars(length(min = 1, max = 4096))]
    pub url: String,
    /// Format of the file: `onnx` for models the edge worker runs; Sedna's other formats
    /// (`pb`, `ckpt`, `pth`, `pkl`, …) are accepted for custom workers.
    #[schemars(length(min = 1, max = 63))]
    pub format: String,
    /// Device/SoC versions the model was compiled for (Sedna's `device_soc_versions`).
    #[serde(
        default,
        rename = "device_soc_versions",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 64))]
    pub device_soc_versions: Vec<String>,
    /// Name of a Secret whose keys are mounted as files for the workers that fetch the model.
    /// Never copied into environment variables or annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub credential_name: Option<String>,
}

/// What the controllers know of a model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// Whether the model file could be resolved.
    #[serde(default)]
    pub phase: ResourcePhase,
    /// When the model file last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub update_time: Option<Time>,
    /// Metrics of the model, e.g. from its last evaluation (`precision`, `recall`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::key_values_schema")]
    pub metrics: Vec<KeyValue>,
    /// Conditions: `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
}
