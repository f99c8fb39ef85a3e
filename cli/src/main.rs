//! `sedna`: the platform's command line.
//!
//! - `sedna crds` prints every CustomResourceDefinition (pipe it to `kubectl apply -f -`);
//!   `sedna crds --out-dir crds/manifests` writes one file per CRD.
//! - `sedna validate FILE|DIR...` checks YAML documents against the platform's schemas, offline,
//!   exactly as the API server will.
//! - `sedna apiserver --data-dir D` runs the embedded Kubernetes-compatible API server and
//!   writes the admin kubeconfig to `D/kubeconfig`.

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
    /// Run the embedded Kubernetes-compatible API server (SQLite storage, HTTPS, tokens).
    Apiserver {
        /// Directory for the database, certificates, tokens and the admin kubeconfig.
        #[arg(long, value_name = "DIR", default_value = "sedna-data/apiserver")]
        data_dir: PathBuf,
        /// Address to listen on; keep it on loopback unless other machines must reach it.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6443")]
        listen: std::net::SocketAddr,
        /// Extra DNS names or IP addresses for the serving certificate.
        #[arg(long = "tls-san", value_name = "NAME")]
        tls_sans: Vec<String>,
        /// Acknowledge writes once in the OS page cache (survives kill -9, not power loss).
        #[arg(long)]
        no_fsync: bool,
        /// Log as JSON lines instead of text.
        #[arg(long)]
        log_json: bool,
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
    let cli = Cli::parse();
    if let Command::Apiserver { .. } = cli.command {
        return match serve(cli.command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(cli) {
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
        Command::Apiserver { .. } => Ok(ExitCode::SUCCESS),
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

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs a long-lived server command until Ctrl-C or SIGTERM.
fn serve(command: Command) -> Result<()> {
    let Command::Apiserver {
        data_dir,
        listen,
        tls_sans,
        no_fsync,
        log_json,
    } = command
    else {
        return Ok(());
    };
    init_logging(log_json);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut config = sedna_apiserver::Config::new(&data_dir);
        config.listen = listen;
        config.extra_sans = tls_sans;
        if no_fsync {
            config.store.durability = sedna_apiserver::store::Durability::Process;
        }
        let server = sedna_apiserver::ApiServer::start(config)
            .await
            .with_context(|| format!("starting the API server in {}", data_dir.display()))?;
        println!("API server listening on {}", server.url());
        println!("kubeconfig: {}", server.kubeconfig_path().display());
        wait_for_signal().await;
        server.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
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
