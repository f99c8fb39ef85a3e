//! `sedna validate`: manifests checked offline against the platform's schemas.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use sedna_api::schema::UnknownFields;

/// Validates every document of every file; prints one line per document.
pub(crate) fn validate(paths: &[PathBuf], unknown: UnknownFields) -> Result<ExitCode> {
    let mut files = Vec::new();
    for path in paths {
        collect_yaml(path, &mut files)?;
    }
    let mut failed = 0usize;
    let mut total = 0usize;
    let mut skipped = 0usize;
    for file in &files {
        let text = if file.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            text
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        let documents = match sedna_api::yaml_documents(&text) {
            Ok(documents) => documents,
            Err(e) => {
                println!("{}: invalid YAML: {e}", file.display());
                failed += 1;
                continue;
            }
        };
        for mut document in documents {
            total += 1;
            let kind = document["kind"].as_str().unwrap_or("?").to_owned();
            let name = document["metadata"]["name"]
                .as_str()
                .unwrap_or("?")
                .to_owned();
            let api_version = document["apiVersion"].as_str().unwrap_or_default();
            if is_kubernetes_kind(api_version) {
                skipped += 1;
                println!(
                    "{}: {kind}/{name} skipped: a Kubernetes kind ({api_version}), which the \
                     API server validates on apply",
                    file.display()
                );
                continue;
            }
            match sedna_api::admit(&mut document, unknown) {
                Ok(warnings) => {
                    println!("{}: {kind}/{name} valid", file.display());
                    for warning in warnings {
                        println!("{}: {kind}/{name} warning: {warning}", file.display());
                    }
                }
                Err(e) => {
                    failed += 1;
                    println!("{}: {e}", file.display());
                }
            }
        }
    }
    if skipped > 0 {
        eprintln!("{total} documents, {failed} invalid, {skipped} Kubernetes kinds skipped");
    } else {
        eprintln!("{total} documents, {failed} invalid");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Whether `api_version` belongs to one of Kubernetes' own groups (their kinds have no CRD
/// schema here; an unknown group stays an error).
fn is_kubernetes_kind(api_version: &str) -> bool {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    matches!(
        group,
        "" | "apps"
            | "batch"
            | "policy"
            | "autoscaling"
            | "rbac.authorization.k8s.io"
            | "networking.k8s.io"
            | "coordination.k8s.io"
            | "storage.k8s.io"
            | "scheduling.k8s.io"
    ) && !api_version.is_empty()
}

fn collect_yaml(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.as_os_str() == "-" || path.is_file() {
        out.push(path.to_owned());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", path.display()))?;
    entries.sort();
    for entry in entries {
        let yaml = entry.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if entry.is_dir() {
            collect_yaml(&entry, out)?;
        } else if yaml {
            out.push(entry);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_kinds_are_told_apart_from_unknown_groups() {
        for v in ["v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1"] {
            assert!(is_kubernetes_kind(v), "{v}");
        }
        for v in [
            "sedna.io/v1alpha1",
            "devices.sedna.io/v1beta1",
            "example.com/v1",
            "",
        ] {
            assert!(!is_kubernetes_kind(v), "{v}");
        }
    }
}
