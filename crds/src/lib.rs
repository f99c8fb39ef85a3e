//! Kubernetes API of the Sedna platform: the Rust types of its custom resources, the CRD
//! manifests generated from them, and the structural-schema validator the API server applies.
//!
//! | group/version | kinds |
//! |---|---|
//! | `sedna.io/v1alpha1` | [`Dataset`](dataset::Dataset), [`Model`](model::Model), [`JointInferenceService`](joint_inference::JointInferenceService) (`ji`), [`IncrementalLearningJob`](incremental_learning::IncrementalLearningJob) (`il`), [`FederatedLearningJob`](federated_learning::FederatedLearningJob) (`fl`) |
//! | `devices.sedna.io/v1beta1` | [`DeviceModel`](devices::DeviceModel), [`Device`](devices::Device) |
//!
//! Field names are Sedna's and KubeEdge's, so their users' YAML applies unchanged. Where those
//! projects are weak this API is stricter or richer: schemas validate enums, ranges, name
//! patterns and list uniqueness; statuses carry a `phase` and at most
//! [`MAX_CONDITIONS`](common::MAX_CONDITIONS) conditions, one per type; a Dataset may be placed
//! with a `nodeSelector`; a FederatedLearningJob has `rounds`, `aggregation`, `minClients` and
//! `roundTimeoutSeconds`; an IncrementalLearningJob can be triggered by hand; credentials are
//! Secrets mounted as files (`credentialName`), never values in the resource.
//!
//! Check a document the way the API server will:
//!
//! ```
//! let mut doc: serde_json::Value = serde_norway::from_str(r#"
//! apiVersion: sedna.io/v1alpha1
//! kind: IncrementalLearningJob
//! metadata: { name: helmet }
//! spec:
//!   dataset: { name: helmet-data, trainProb: 1.5 }
//! "#).unwrap();
//! let err = sedna_api::admit(&mut doc, sedna_api::schema::UnknownFields::Strict).unwrap_err();
//! let text = err.to_string();
//! assert!(text.starts_with(r#"IncrementalLearningJob.sedna.io "helmet" is invalid: ["#));
//! assert!(text.contains("spec.dataset.trainProb: Invalid value: 1.5: spec.dataset.trainProb \
//!                        in body should be less than or equal to 1"));
//! assert!(text.contains("spec.initialModel: Required value"));
//! ```

pub mod common;
pub mod dataset;
pub mod devices;
pub mod federated_learning;
pub mod incremental_learning;
pub mod joint_inference;
pub mod manifests;
pub mod model;
pub mod references;
pub mod schema;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use schema::{SchemaError, StructuralSchema, UnknownFields, ValidationErrors};

/// Every CRD of the platform, AI kinds first.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        dataset::Dataset::crd(),
        model::Model::crd(),
        joint_inference::JointInferenceService::crd(),
        incremental_learning::IncrementalLearningJob::crd(),
        federated_learning::FederatedLearningJob::crd(),
        devices::DeviceModel::crd(),
        devices::Device::crd(),
    ]
}

/// The CRD that serves `apiVersion` and `kind`, if it is one of the platform's.
pub fn find_crd(api_version: &str, kind: &str) -> Option<CustomResourceDefinition> {
    let (group, version) = api_version.split_once('/')?;
    crds().into_iter().find(|crd| {
        crd.spec.group == group
            && crd.spec.names.kind == kind
            && crd.spec.versions.iter().any(|v| v.name == version)
    })
}

/// Why a document was refused by [`admit`].
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The document is not a JSON/YAML object with `apiVersion` and `kind`.
    #[error("the document is not an object with apiVersion and kind")]
    NotAnObject,
    /// The kind is not one of the platform's.
    #[error("no kind {kind:?} is registered for version {api_version:?} in this platform")]
    UnknownKind {
        /// The document's `apiVersion`.
        api_version: String,
        /// The document's `kind`.
        kind: String,
    },
    /// The CRD's own schema could not be used (a bug in this crate).
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The document breaks the schema; every field error is listed.
    #[error("{kind}.{group} {name:?} is invalid: {errors}")]
    Invalid {
        /// The kind.
        kind: String,
        /// The API group.
        group: String,
        /// `metadata.name` (empty when missing).
        name: String,
        /// What is wrong, field by field.
        errors: ValidationErrors,
    },
    /// The document passed the schema but does not decode into the Rust type.
    #[error("{kind} {name:?} does not decode: {source}")]
    Decode {
        /// The kind.
        kind: String,
        /// `metadata.name`.
        name: String,
        /// The decoder's error, with the field it stopped at.
        source: serde_json::Error,
    },
}

impl AdmitError {
    /// Whether trying again could succeed: never, the document must change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Prunes, defaults and validates a document of one of the platform's kinds against its CRD
/// schema, as the API server does, then decodes it into its Rust type. Returns the warnings
/// (with [`UnknownFields::Warn`]).
pub fn admit(document: &mut Value, unknown: UnknownFields) -> Result<Vec<String>, AdmitError> {
    let field = |doc: &Value, name: &str| doc.get(name).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (field(document, "apiVersion"), field(document, "kind"))
    else {
        return Err(AdmitError::NotAnObject);
    };
    let crd = find_crd(&api_version, &kind).ok_or_else(|| AdmitError::UnknownKind {
        api_version: api_version.clone(),
        kind: kind.clone(),
    })?;
    let version = api_version
        .split_once('/')
        .map(|(_, v)| v)
        .unwrap_or_default();
    let schema = StructuralSchema::from_crd(&crd, version)?;
    let name = document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let warnings = schema
        .admit(document, unknown)
        .map_err(|errors| AdmitError::Invalid {
            kind: kind.clone(),
            group: crd.spec.group.clone(),
            name: name.clone(),
            errors,
        })?;
    let decoded = match kind.as_str() {
        "Dataset" => decodes::<dataset::Dataset>(document),
        "Model" => decodes::<model::Model>(document),
        "JointInferenceService" => decodes::<joint_inference::JointInferenceService>(document),
        "IncrementalLearningJob" => {
            decodes::<incremental_learning::IncrementalLearningJob>(document)
        }
        "FederatedLearningJob" => decodes::<federated_learning::FederatedLearningJob>(document),
        "DeviceModel" => decodes::<devices::DeviceModel>(document),
        "Device" => decodes::<devices::Device>(document),
        _ => Ok(()),
    };
    decoded.map_err(|source| AdmitError::Decode { kind, name, source })?;
    Ok(warnings)
}

/// Parses a YAML stream (`---`-separated documents, as `kubectl apply -f` reads) into JSON
/// values, skipping empty documents.
///
/// ```
/// let docs = sedna_api::yaml_documents("a: 1\n---\n---\nb: [x]\n").unwrap();
/// assert_eq!(docs, [serde_json::json!({"a": 1}), serde_json::json!({"b": ["x"]})]);
/// ```
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, serde_norway::Error> {
    let mut documents = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

fn decodes<T: DeserializeOwned>(document: &Value) -> Result<(), serde_json::Error> {
    T::deserialize(document).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crd_is_found_by_its_api_version_and_kind() {
        for crd in crds() {
            let version = &crd.spec.versions[0].name;
            let api_version = format!("{}/{version}", crd.spec.group);
            let found = find_crd(&api_version, &crd.spec.names.kind).unwrap();
            assert_eq!(found.metadata.name, crd.metadata.name);
        }
        assert!(find_crd("sedna.io/v1", "Dataset").is_none());
        assert!(find_crd("sedna.io/v1alpha1", "Pod").is_none());
        assert!(find_crd("v1", "Pod").is_none());
    }

    #[test]
    fn an_unknown_kind_is_named_in_the_error() {
        let mut doc = serde_json::json!({ "apiVersion": "sedna.io/v1alpha1", "kind": "Lifelong" });
        let err = admit(&mut doc, UnknownFields::Strict).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"no kind "Lifelong" is registered for version "sedna.io/v1alpha1" in this platform"#
        );
        let mut not_object = serde_json::json!(["Dataset"]);
        assert!(matches!(
            admit(&mut not_object, UnknownFields::Strict),
            Err(AdmitError::NotAnObject)
        ));
    }
}
