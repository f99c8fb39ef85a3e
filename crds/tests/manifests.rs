//! The checked-in CRD manifests: generated from the types, and acceptable to a Kubernetes API
//! server (apiextensions.k8s.io/v1, structural, status subresource, printer columns).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failing test panics

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use sedna_api::manifests::{REGENERATE, drift};
use sedna_api::schema::StructuralSchema;

fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

fn checked_in() -> Vec<(String, CustomResourceDefinition)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(manifest_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let crd: CustomResourceDefinition =
                serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            found.push((path.display().to_string(), crd));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

#[test]
fn checked_in_manifests_match_what_the_types_generate() {
    let differences = drift(&manifest_dir()).unwrap();
    assert!(
        differences.is_empty(),
        "crds/manifests is out of date: {differences:#?}\nregenerate with `{REGENERATE}`"
    );
}

#[test]
fn there_is_one_manifest_per_kind() {
    let kinds: Vec<String> = checked_in()
        .into_iter()
        .map(|(_, c)| c.spec.names.kind)
        .collect();
    assert_eq!(kinds.len(), sedna_api::crds().len());
    for crd in sedna_api::crds() {
        assert!(
            kinds.contains(&crd.spec.names.kind),
            "{} has no manifest",
            crd.spec.names.kind
        );
    }
}

#[test]
fn every_manifest_is_a_v1_crd_with_a_structural_schema_and_status_subresource() {
    for (path, crd) in checked_in() {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\napiVersion: apiextensions.k8s.io/v1\n"),
            "{path}"
        );
        assert_eq!(crd.spec.scope, "Namespaced", "{path}");
        assert_eq!(crd.spec.versions.len(), 1, "{path}");
        let version = &crd.spec.versions[0];
        assert!(version.served && version.storage, "{path}");
        let subresources = version.subresources.as_ref().expect("subresources");
        assert!(
            subresources.status.is_some(),
            "{path}: no status subresource"
        );
        let columns = version
            .additional_printer_columns
            .as_deref()
            .unwrap_or_default();
        assert!(
            columns.iter().any(|c| c.name == "Age"),
            "{path}: no Age column"
        );
        assert!(columns.len() >= 2, "{path}: too few printer columns");
        StructuralSchema::from_crd(&crd, &version.name).unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| s.properties.as_ref())
            .and_then(|p| p.get("status"));
        assert!(status.is_some(), "{path}: no status in the schema");
    }
}

#[test]
fn every_crd_fits_in_kubectl_apply_last_applied_annotation() {
    // kubectl apply stores the whole manifest in an annotation limited to 256 KiB.
    for (path, _) in checked_in() {
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 128 * 1024, "{path} is {size} bytes");
    }
}

#[test]
fn ai_kinds_are_in_the_sedna_category_with_sednas_short_names() {
    let short = |kind: &str| {
        let crd = sedna_api::crds()
            .into_iter()
            .find(|c| c.spec.names.kind == kind)
            .unwrap();
        assert!(
            crd.spec
                .names
                .categories
                .unwrap_or_default()
                .contains(&"sedna".to_owned())
        );
        crd.spec.names.short_names.unwrap_or_default()
    };
    assert_eq!(short("JointInferenceService"), ["ji"]);
    assert_eq!(short("IncrementalLearningJob"), ["il"]);
    assert_eq!(short("FederatedLearningJob"), ["fl"]);
    assert!(short("Dataset").is_empty(), "ds would shadow daemonsets");
}
