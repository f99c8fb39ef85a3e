//! The YAML in `examples/`: every document is valid against its CRD schema and decodes into
//! its Rust type without losing a field; a wrong type, an out-of-range value, a bad enum or a
//! misspelt field in any of them is refused with the field's path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test panics

mod common;
use common::{round_trip, without_empty_values};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sedna_api::schema::UnknownFields;
use sedna_api::{AdmitError, admit, yaml_documents};
use serde_json::{Value, json};

/// A kind, an edit that breaks its example, and an excerpt of the expected error.
type Case = (&'static str, fn(&mut Value), &'static str);

fn example_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"),
        &mut files,
    );
    files.sort();
    assert!(!files.is_empty());
    files
}

/// The documents of the platform's kinds (`sedna.io`, `devices.sedna.io`); examples of
/// Kubernetes' own kinds (a DaemonSet for operators) are checked by the API server's tests.
fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for path in example_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in yaml_documents(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            let group = doc["apiVersion"].as_str().unwrap_or_default();
            if group.starts_with("sedna.io/") || group.starts_with("devices.sedna.io/") {
                docs.push((path.display().to_string(), doc));
            }
        }
    }
    docs
}

fn example(kind: &str) -> Value {
    documents()
        .into_iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} example"))
}

/// Admits `doc` after `edit`, returning the error text.
fn refused(mut doc: Value, edit: impl FnOnce(&mut Value)) -> String {
    edit(&mut doc);
    match admit(&mut doc, UnknownFields::Strict) {
        Ok(_) => panic!("accepted: {doc:#}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_example_is_valid_against_its_schema() {
    for (file, mut doc) in documents() {
        let warnings =
            admit(&mut doc, UnknownFields::Strict).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(warnings.is_empty(), "{file}: {warnings:?}");
    }
}

#[test]
fn the_examples_cover_every_kind() {
    let covered: BTreeSet<String> = documents()
        .into_iter()
        .map(|(_, d)| d["kind"].as_str().unwrap().to_owned())
        .collect();
    let all: BTreeSet<String> = sedna_api::crds()
        .into_iter()
        .map(|c| c.spec.names.kind)
        .collect();
    assert_eq!(covered, all);
}

#[test]
fn examples_round_trip_through_the_rust_types_without_losing_fields() {
    use sedna_api::{
        dataset, devices, federated_learning, incremental_learning, joint_inference, model,
    };
    for (file, mut doc) in documents() {
        admit(&mut doc, UnknownFields::Strict).unwrap();
        let back = match doc["kind"].as_str().unwrap() {
            "Dataset" => round_trip::<dataset::Dataset>(&doc),
            "Model" => round_trip::<model::Model>(&doc),
            "JointInferenceService" => round_trip::<joint_inference::JointInferenceService>(&doc),
            "IncrementalLearningJob" => {
                round_trip::<incremental_learning::IncrementalLearningJob>(&doc)
            }
            "FederatedLearningJob" => round_trip::<federated_learning::FederatedLearningJob>(&doc),
            "DeviceModel" => round_trip::<devices::DeviceModel>(&doc),
            "Device" => round_trip::<devices::Device>(&doc),
            other => panic!("{file}: unexpected kind {other}"),
        };
        pretty_assertions::assert_eq!(
            without_empty_values(&doc),
            without_empty_values(&back),
            "{file}"
        );
    }
}

#[test]
fn schema_defaults_are_applied_to_the_examples() {
    let mut il = example("IncrementalLearningJob");
    il["spec"]["deploySpec"]["trigger"]
        .as_object_mut()
        .unwrap()
        .remove("checkPeriodSeconds");
    il["spec"]["deploySpec"]["model"]
        .as_object_mut()
        .unwrap()
        .remove("pollPeriodSeconds");
    admit(&mut il, UnknownFields::Strict).unwrap();
    assert_eq!(
        il["spec"]["deploySpec"]["trigger"]["checkPeriodSeconds"],
        60
    );
    assert_eq!(il["spec"]["deploySpec"]["model"]["pollPeriodSeconds"], 60);

    let mut fl = example("FederatedLearningJob");
    fl["spec"].as_object_mut().unwrap().remove("aggregation");
    admit(&mut fl, UnknownFields::Strict).unwrap();
    assert_eq!(fl["spec"]["aggregation"]["algorithm"], "FedAvg");
}

#[test]
fn a_wrong_field_type_is_refused_with_its_path() {
    let err = refused(example("IncrementalLearningJob"), |d| {
        d["spec"]["dataset"]["trainProb"] = json!("most");
    });
    assert!(err.contains(r#"spec.dataset.trainProb: Invalid value: "string": spec.dataset.trainProb in body must be of type number: "string""#), "{err}");

    let err = refused(example("JointInferenceService"), |d| {
        d["spec"]["edgeWorker"]["hardExampleMining"]["parameters"][0]["value"] = json!(0.9);
    });
    assert!(
        err.contains(
            "spec.edgeWorker.hardExampleMining.parameters[0].value: Invalid value: \"number\""
        ),
        "{err}"
    );

    let err = refused(example("JointInferenceService"), |d| {
        d["spec"]["cloudWorker"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
            json!("5000");
    });
    assert!(
        err.contains("spec.cloudWorker.template.spec.containers[0].ports[0].containerPort"),
        "{err}"
    );

    let err = refused(example("Device"), |d| {
        d["spec"]["properties"] = json!({ "name": "fps" })
    });
    assert!(
        err.contains("spec.properties: Invalid value: \"object\""),
        "{err}"
    );
}

#[test]
fn an_out_of_range_value_is_refused_with_its_path() {
    let cases: [Case; 6] = [
        (
            "IncrementalLearningJob",
            |d| d["spec"]["dataset"]["trainProb"] = json!(1.5),
            "spec.dataset.trainProb: Invalid value: 1.5: spec.dataset.trainProb in body should be less than or equal to 1",
        ),
        (
            "IncrementalLearningJob",
            |d| d["spec"]["deploySpec"]["model"]["pollPeriodSeconds"] = json!(0),
            "spec.deploySpec.model.pollPeriodSeconds: Invalid value: 0: spec.deploySpec.model.pollPeriodSeconds in body should be greater than or equal to 1",
        ),
        (
            "FederatedLearningJob",
            |d| d["spec"]["rounds"] = json!(0),
            "spec.rounds: Invalid value: 0: spec.rounds in body should be greater than or equal to 1",
        ),
        (
            "FederatedLearningJob",
            |d| d["spec"]["trainingWorkers"] = json!([]),
            "spec.trainingWorkers: Invalid value: 0: spec.trainingWorkers in body should have at least 1 items",
        ),
        (
            "Device",
            |d| d["spec"]["properties"][0]["collectCycle"] = json!(-1),
            "spec.properties[0].collectCycle: Invalid value: -1: spec.properties[0].collectCycle in body should be greater than or equal to 0",
        ),
        (
            "JointInferenceService",
            |d| {
                d["spec"]["cloudWorker"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                    json!(70000)
            },
            "spec.cloudWorker.template.spec.containers[0].ports[0].containerPort: Invalid value: 70000",
        ),
    ];
    for (kind, edit, expected) in cases {
        let err = refused(example(kind), edit);
        assert!(err.contains(expected), "{kind}: {err}");
    }
}

#[test]
fn enums_patterns_and_required_fields_are_enforced() {
    let cases: [Case; 7] = [
        (
            "IncrementalLearningJob",
            |d| d["spec"]["trainSpec"]["trigger"]["condition"]["operator"] = json!("=>"),
            r#"spec.trainSpec.trigger.condition.operator: Unsupported value: "=>": supported values: ">", ">=", "=", "==", "!=", "<=", "<""#,
        ),
        (
            "IncrementalLearningJob",
            |d| d["spec"]["trainSpec"]["trigger"]["timer"]["start"] = json!("25:00"),
            r#"spec.trainSpec.trigger.timer.start: Invalid value: "25:00""#,
        ),
        (
            "DeviceModel",
            |d| d["spec"]["properties"][0]["type"] = json!("VIDEO"),
            r#"spec.properties[0].type: Unsupported value: "VIDEO""#,
        ),
        (
            "FederatedLearningJob",
            |d| d["spec"]["aggregation"]["algorithm"] = json!("FedSum"),
            r#"spec.aggregation.algorithm: Unsupported value: "FedSum""#,
        ),
        (
            "Dataset",
            |d| {
                d["spec"].as_object_mut().unwrap().remove("nodeName");
            },
            r#"spec: Invalid value: "object": exactly one of nodeName, nodeSelector must be set"#,
        ),
        (
            "JointInferenceService",
            |d| {
                d["spec"]["edgeWorker"]
                    .as_object_mut()
                    .unwrap()
                    .remove("model");
            },
            "spec.edgeWorker.model: Required value",
        ),
        (
            "JointInferenceService",
            |d| d["spec"]["edgeWorker"]["model"]["name"] = json!("Little_Model"),
            r#"spec.edgeWorker.model.name: Invalid value: "Little_Model": spec.edgeWorker.model.name in body should match"#,
        ),
    ];
    for (kind, edit, expected) in cases {
        let err = refused(example(kind), edit);
        assert!(err.contains(expected), "{kind}: {err}");
    }
}

#[test]
fn duplicate_list_keys_are_refused() {
    let err = refused(example("Device"), |d| {
        let first = d["spec"]["properties"][0].clone();
        d["spec"]["properties"].as_array_mut().unwrap().push(first);
    });
    assert!(
        err.contains(r#"spec.properties[2]: Duplicate value: {"name":"saveFrame"}"#)
            || err.contains(r#"Duplicate value: {"name":"temperature"}"#),
        "{err}"
    );
}

#[test]
fn a_misspelt_field_is_refused_when_strict_and_dropped_with_a_warning_otherwise() {
    let mut doc = example("JointInferenceService");
    doc["spec"]["edgeWorker"]["hardExampleMinning"] = json!({ "name": "IBT" });
    let err = refused(doc.clone(), |_| {});
    assert!(
        err.contains(r#"unknown field "spec.edgeWorker.hardExampleMinning""#),
        "{err}"
    );

    let warnings = admit(&mut doc, UnknownFields::Warn).unwrap();
    assert_eq!(
        warnings,
        [r#"unknown field "spec.edgeWorker.hardExampleMinning""#]
    );
    assert!(
        doc["spec"]["edgeWorker"]
            .get("hardExampleMinning")
            .is_none()
    );
}

#[test]
fn unknown_pod_fields_in_a_worker_template_are_kept() {
    let mut doc = example("JointInferenceService");
    let spec = &mut doc["spec"]["edgeWorker"]["template"]["spec"];
    spec["tolerations"] = json!([{ "key": "node-role.sedna.io/edge", "effect": "NoSchedule" }]);
    spec["containers"][0]["securityContext"] = json!({ "runAsNonRoot": true });
    admit(&mut doc, UnknownFields::Strict).unwrap();
    let spec = &doc["spec"]["edgeWorker"]["template"]["spec"];
    assert_eq!(spec["tolerations"][0]["effect"], "NoSchedule");
    assert_eq!(
        spec["containers"][0]["securityContext"]["runAsNonRoot"],
        true
    );
}

#[test]
fn a_document_that_passes_the_schema_must_also_decode() {
    // Every error reaches the user as an AdmitError, never as a panic.
    let mut doc = json!({ "apiVersion": "sedna.io/v1alpha1", "kind": "Model",
                          "metadata": { "name": "m" }, "spec": { "url": "/m.onnx", "format": "onnx" } });
    assert!(admit(&mut doc, UnknownFields::Strict).is_ok());
    let mut doc = json!({ "apiVersion": "sedna.io/v1alpha1", "kind": "Model",
                          "metadata": { "name": "m" } });
    assert!(matches!(
        admit(&mut doc, UnknownFields::Strict),
        Err(AdmitError::Invalid { .. })
    ));
}
