//! Sedna's own manifests (`crds/tests/sedna-upstream/`, vendored from Sedna's repository,
//! Apache-2.0): every one of the three features applies unchanged to this platform's CRDs —
//! valid against the schema the API server checks, strictly (no unknown field) — and survives
//! a round trip through the Rust types without losing a field. The two that are broken
//! upstream are refused with the one reason that applies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test panics

mod common;
use common::{round_trip, without_empty_values};

use std::path::{Path, PathBuf};

use sedna_api::schema::UnknownFields;
use sedna_api::{admit, yaml_documents};
use serde_json::{Value, json};

/// Manifests broken upstream: the Model's spec is indented under `metadata`.
const BROKEN_UPSTREAM: [&str; 2] = [
    "32-storage_s3_incremental_learning_README.yaml",
    "36-storage_s3_joint_inference_README.yaml",
];

fn files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sedna-upstream");
    let mut files: Vec<PathBuf> = ["crd-samples", "examples", "docs"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn sednas_manifests_apply_unchanged_and_round_trip() {
    use sedna_api::{dataset, federated_learning, incremental_learning, joint_inference, model};
    let files = files();
    assert!(files.len() >= 45, "{} files", files.len());
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for mut doc in yaml_documents(&text).unwrap_or_else(|e| panic!("{name}: {e}")) {
            if BROKEN_UPSTREAM.contains(&name.as_str()) && doc["kind"] == "Model" {
                let err = admit(&mut doc, UnknownFields::Strict)
                    .unwrap_err()
                    .to_string();
                assert!(err.ends_with("spec: Required value"), "{name}: {err}");
                continue;
            }
            let original = doc.clone();
            let warnings =
                admit(&mut doc, UnknownFields::Strict).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(warnings.is_empty(), "{name}: {warnings:?}");
            let kind = doc["kind"].as_str().unwrap().to_string();
            let back = match kind.as_str() {
                "Dataset" => round_trip::<dataset::Dataset>(&doc),
                "Model" => round_trip::<model::Model>(&doc),
                "JointInferenceService" => {
                    round_trip::<joint_inference::JointInferenceService>(&doc)
                }
                "IncrementalLearningJob" => {
                    round_trip::<incremental_learning::IncrementalLearningJob>(&doc)
                }
                "FederatedLearningJob" => {
                    round_trip::<federated_learning::FederatedLearningJob>(&doc)
                }
                other => panic!("{name}: unexpected kind {other}"),
            };
            // The typed form keeps every field the user wrote (defaults may be added).
            let (written, kept) = (without_empty_values(&original), without_empty_values(&back));
            assert_subset(&written, &kept, &format!("{name} {kind}"));
            *kinds.entry(kind).or_default() += 1;
        }
    }
    for kind in [
        "JointInferenceService",
        "IncrementalLearningJob",
        "FederatedLearningJob",
    ] {
        assert!(kinds.get(kind).is_some_and(|n| *n >= 3), "{kinds:?}");
    }
}

/// Every field of `written` is in `kept` with the same value (numbers compared as numbers,
/// Sedna's word operators as their symbols).
fn assert_subset(written: &Value, kept: &Value, at: &str) {
    match (written, kept) {
        (Value::Object(w), Value::Object(k)) => {
            for (key, value) in w {
                let other = k.get(key).unwrap_or_else(|| panic!("{at}: {key} lost"));
                assert_subset(value, other, &format!("{at}.{key}"));
            }
        }
        (Value::Array(w), Value::Array(k)) => {
            assert_eq!(w.len(), k.len(), "{at}");
            for (i, (a, b)) in w.iter().zip(k).enumerate() {
                assert_subset(a, b, &format!("{at}[{i}]"));
            }
        }
        (Value::Number(a), Value::Number(b)) => assert_eq!(a.as_f64(), b.as_f64(), "{at}"),
        (Value::String(a), Value::String(b)) if a != b => {
            let spelled: Option<sedna_api::incremental_learning::Operator> =
                serde_json::from_value(written.clone()).ok();
            assert!(
                spelled.is_some_and(|op| serde_json::to_value(op).unwrap() == *kept),
                "{at}: {a:?} became {b:?}"
            );
        }
        (a, b) => assert_eq!(a, b, "{at}"),
    }
}

/// The spellings Sedna accepts that its own manifests happen not to use.
#[test]
fn the_other_spellings_sedna_accepts_apply_too() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sedna-upstream/crd-samples/incrementallearningjob_v1alpha1.yaml");
    let job = yaml_documents(&std::fs::read_to_string(path).unwrap())
        .unwrap()
        .remove(0);
    for (start, end, op) in [
        ("24:00", "2:00", "ge"),
        ("2:00", "24:00", "lt"),
        ("0:00", "23:59", "=="),
    ] {
        let mut doc = job.clone();
        doc["spec"]["trainSpec"]["trigger"]["timer"] = json!({"start": start, "end": end});
        doc["spec"]["trainSpec"]["trigger"]["condition"]["operator"] = json!(op);
        admit(&mut doc, UnknownFields::Strict)
            .unwrap_or_else(|e| panic!("{start}-{end} {op}: {e}"));
        let _: sedna_api::incremental_learning::IncrementalLearningJob =
            serde_json::from_value(doc).unwrap();
    }
}
