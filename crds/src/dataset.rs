//! `Dataset` (`sedna.io/v1alpha1`): a set of samples on one or more edge nodes, described by an
//! index file or a directory. The node's local controller counts its samples.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, NAME_PATTERN, ResourcePhase, node_selector_schema, time_schema};

/// How a dataset's `url` lists its samples.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// An index file with one sample per line (a path, optionally followed by a label).
    Txt,
    /// A CSV index file whose first line is a header.
    Csv,
    /// A directory: every file in it is a sample.
    Dir,
    /// MNIST's IDX format: `url` names the images file (`…images….idx3-ubyte`, optionally
    /// gzipped), the labels file lies beside it (`…labels….idx1-ubyte`).
    Idx,
}

/// Where a dataset lives and how it is indexed.
///
/// Exactly one of `nodeName` and `nodeSelector` says which nodes hold it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sedna.io",
    version = "v1alpha1",
    kind = "Dataset",
    namespaced,
    status = "DatasetStatus",
    category = "sedna",
    doc = "A set of samples on edge nodes, indexed by a txt or csv file or a directory.",
    printcolumn(name = "Format", type_ = "string", json_path = ".spec.format"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(
        name = "Samples",
        type_ = "integer",
        json_path = ".status.numberOfSamples"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    selectable = ".spec.nodeName"
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{ "required": ["nodeName"] }, { "required": ["nodeSelector"] }]))]
pub struct DatasetSpec {
    /// Location of the index file (or directory): an absolute path on the node, a `file://`
    /// URL, or an `s3://bucket/key` URL.
    #[schemars(length(min = 1, max = 4096))]
    pub url: String,
    /// Index format.
    pub format: DatasetFormat,
    /// The node that holds the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub node_name: Option<String>,
    /// Labels of the nodes that hold a copy of the dataset (each counts its own samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "node_selector_schema")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Name of a Secret whose keys are mounted as files for the workers that read the dataset
    /// (e.g. S3 credentials). Never copied into environment variables or annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub credential_name: Option<String>,
}

/// What the nodes report about a dataset.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetStatus {
    /// Whether the dataset could be read.
    #[serde(default)]
    pub phase: ResourcePhase,
    /// Number of samples last counted.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub number_of_samples: i64,
    /// When the samples were last counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub update_time: Option<Time>,
    /// Conditions: `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
}
