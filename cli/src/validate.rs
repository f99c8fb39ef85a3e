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
    eprintln!("{total} documents, {failed} invalid");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
