//! `sedna`: the platform's command line.
//!
//! - `sedna crds` prints every CustomResourceDefinition (pipe it to `kubectl apply -f -`);
//!   `sedna crds --out-dir crds/manifests` writes one file per CRD.
//! - `sedna validate FILE|DIR...` checks YAML documents against the platform's schemas, offline,
//!   exactly as the API server will.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sedna_api::schema::UnknownFields;

#[derive(Parser)]
#[command(
    name = "sedna",
    version,
    about = "Edge-cloud AI platform: joint inference, \
    incremental and federated learning on a fleet of edge nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the platform's CustomResourceDefinitions, or write them into a directory.
    Crds {
        /// Write one `<group>_<plural>.yaml` per CRD into this directory (stale files removed).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// With --out-dir: write nothing, fail if the directory differs from the types.
        #[arg(long, requires = "out_dir")]
        check: bool,
    },
    /// Check YAML manifests of the platform's kinds against their schemas, offline.
    Validate {
        /// Files or directories (searched for *.yaml and *.yml); `-` reads standard input.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Accept (and report) fields the schema does not declare instead of refusing them.
        #[arg(long)]
        allow_unknown_fields: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Crds { out_dir: None, .. } => {
            print!("{}", sedna_api::manifests::render_stream()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Crds {
            out_dir: Some(dir),
            check: true,
        } => {
            let differences = sedna_api::manifests::drift(&dir)?;
            for difference in &differences {
                eprintln!("{}: {difference}", dir.display());
            }
            Ok(if differences.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Crds {
            out_dir: Some(dir),
            check: false,
        } => {
            for name in sedna_api::manifests::write_all(&dir)? {
                println!("{}", dir.join(name).display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate {
            paths,
            allow_unknown_fields,
        } => {
            let unknown = if allow_unknown_fields {
                UnknownFields::Warn
            } else {
                UnknownFields::Strict
            };
            validate(&paths, unknown)
        }
    }
}

/// Validates every document of every file; prints one line per document.
fn validate(paths: &[PathBuf], unknown: UnknownFields) -> Result<ExitCode> {
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
