//! `sedna`: the platform's command line.
//!
//! - `sedna crds` prints every CustomResourceDefinition (pipe it to `kubectl apply -f -`);
//!   `sedna crds --out-dir crds/manifests` writes one file per CRD.
//! - `sedna validate FILE|DIR...` checks YAML documents against the platform's schemas, offline,
//!   exactly as the API server will.
//! - `sedna apiserver --data-dir D` runs the embedded Kubernetes-compatible API server and
//!   writes the admin kubeconfig to `D/kubeconfig`.
//! - `sedna cloudcore`, `sedna token create`, `sedna join`, `sedna edgecore`: the node layer
//!   (hub, join tokens, joining an edge node, the edge agent).
//! - `sedna up --data-dir D --edges N`: all of it on one machine, in one process.
//! - `sedna train --model M.onnx --data D --out O.onnx`: trains a model (lib-sedna's trainer).
//! - `sedna gm --kubeconfig K`: the controllers; `sedna edge-worker`, `sedna cloud-worker`: the
//!   joint-inference workers (also run when this binary is called `sedna-edge-worker` or
//!   `sedna-cloud-worker`).

mod node;
mod ops;
mod train;
mod up;
mod validate;

use std::path::PathBuf;
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
    /// Log as JSON lines instead of text (long-running commands).
    #[arg(long, global = true)]
    log_json: bool,
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
        /// Where to serve /metrics and /healthz ("off" to disable).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9440", value_parser = node::parse_optional_addr)]
        metrics_addr: node::MaybeAddr,
    },
    /// Run the cloud hub edge nodes connect to.
    Cloudcore(node::CloudcoreArgs),
    /// Manage join tokens.
    Token {
        #[command(subcommand)]
        command: node::TokenCommand,
    },
    /// Manage edge nodes' identities.
    Node {
        #[command(subcommand)]
        command: node::NodeCommand,
    },
    /// Join this machine to a hub as an edge node (once; then run `sedna edgecore`).
    Join(node::JoinArgs),
    /// Run the edge agent of a joined node.
    Edgecore(node::EdgecoreArgs),
    /// Run everything on this machine: API server, hub, a cloud node and N edge nodes.
    Up(up::UpArgs),
    /// Run the global manager: the controllers of Models and JointInferenceServices.
    Gm {
        /// Kubeconfig of the cluster (the embedded API server's `D/kubeconfig`, or a real one).
        #[arg(long, value_name = "FILE", env = "KUBECONFIG")]
        kubeconfig: PathBuf,
        /// Also run a scheduler and the Deployment, ReplicaSet, DaemonSet and Job controllers,
        /// for an API server without them (`sedna apiserver`); never on a real cluster.
        #[arg(long)]
        workloads: bool,
    },
    /// Run a JointInferenceService's edge worker (what a pod with image `sedna-edge-worker`
    /// runs; configured by the environment the controller injects).
    EdgeWorker(sedna_edge_worker::Args),
    /// Train an ONNX model on a dataset; writes the same graph with the trained weights.
    Train(train::TrainArgs),
    /// Run a JointInferenceService's cloud worker (image `sedna-cloud-worker`).
    CloudWorker(sedna_cloud_worker::Args),
}

/// Programs this binary also is, by the name it is called with (pods name them as images;
/// `sedna up` links them to this binary in each node's program directory).
pub(crate) const WORKERS: [&str; 2] = ["sedna-edge-worker", "sedna-cloud-worker"];

fn main() -> ExitCode {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called = argv
        .first()
        .and_then(|a| {
            std::path::Path::new(a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    if WORKERS.contains(&called.as_str()) {
        argv.splice(
            0..1,
            [
                std::ffi::OsString::from("sedna"),
                called.trim_start_matches("sedna-").into(),
            ],
        );
    }
    let cli = Cli::parse_from(argv);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let runtime = || tokio::runtime::Runtime::new().context("starting the async runtime");
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
            validate::validate(&paths, unknown)
        }
        Command::Apiserver {
            data_dir,
            listen,
            tls_sans,
            no_fsync,
            metrics_addr,
        } => {
            init_logging(cli.log_json);
            runtime()?.block_on(apiserver(
                data_dir,
                listen,
                tls_sans,
                no_fsync,
                metrics_addr,
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cloudcore(args) => {
            init_logging(cli.log_json);
            runtime()?.block_on(node::cloudcore(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { command } => {
            runtime()?.block_on(node::token(command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Node { command } => {
            runtime()?.block_on(node::node(command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Join(args) => {
            init_logging(cli.log_json);
            runtime()?.block_on(node::join(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Edgecore(args) => {
            init_logging(cli.log_json);
            // One thread: an edge agent is mostly idle, and every extra thread costs the
            // node a malloc arena.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(node::edgecore(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(args) => {
            up::check_args(&args)?;
            init_logging(cli.log_json);
            runtime()?.block_on(up::up(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gm {
            kubeconfig,
            workloads,
        } => {
            init_logging(cli.log_json);
            runtime()?.block_on(async move {
                let client = up::client_for(&kubeconfig).await?;
                println!("global manager running against {}", kubeconfig.display());
                sedna_controllers::run_with(client, workloads, wait_for_signal()).await;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) => train::train(args),
        Command::EdgeWorker(args) => {
            init_logging(cli.log_json);
            runtime()?.block_on(sedna_edge_worker::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CloudWorker(args) => {
            init_logging(cli.log_json);
            runtime()?.block_on(sedna_cloud_worker::run(args))?;
            Ok(ExitCode::SUCCESS)
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

async fn apiserver(
    data_dir: PathBuf,
    listen: std::net::SocketAddr,
    tls_sans: Vec<String>,
    no_fsync: bool,
    metrics_addr: node::MaybeAddr,
) -> Result<()> {
    let mut config = sedna_apiserver::Config::new(&data_dir);
    config.listen = listen;
    config.extra_sans = tls_sans;
    if no_fsync {
        config.store.durability = sedna_apiserver::store::Durability::Process;
    }
    let server = sedna_apiserver::ApiServer::start(config)
        .await
        .with_context(|| format!("starting the API server in {}", data_dir.display()))?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("sedna_apiserver");
    registry.register_collector(Box::new(ops::apiserver_figures(&server)));
    ops::start(metrics_addr.0, registry, std::sync::Arc::new(|| true)).await;
    println!("API server listening on {}", server.url());
    println!("kubeconfig: {}", server.kubeconfig_path().display());
    wait_for_signal().await;
    server.shutdown().await;
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM.
pub(crate) async fn wait_for_signal() {
    Signals::install().wait().await;
}

/// SIGTERM and SIGINT handlers installed up front: a signal that arrives while a long start
/// is still under way is kept until [`Signals::wait`] (instead of killing the process with
/// the default disposition).
pub(crate) struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers (needs a tokio runtime).
    pub(crate) fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Completes on the first SIGTERM or SIGINT (received since [`Signals::install`]).
    pub(crate) async fn wait(mut self) {
        let term = async {
            match self.term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let interrupt = async {
            match self.interrupt.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        tokio::select! {
            () = term => {}
            () = interrupt => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_parses_with_its_defaults() {
        Cli::command().debug_assert();
        for args in [
            &["sedna", "apiserver"][..],
            &["sedna", "cloudcore"],
            &["sedna", "edgecore", "--cloud", "127.0.0.1:1"],
            &[
                "sedna",
                "edgecore",
                "--cloud",
                "h:1",
                "--metrics-addr",
                "off",
                "--labels",
                "a=b",
            ],
            &[
                "sedna",
                "join",
                "--cloud",
                "h:1",
                "--token",
                "t",
                "--node-name",
                "n",
            ],
            &["sedna", "token", "create", "--node", "edge-1"],
            &["sedna", "token", "create", "--any-node", "--single-use"],
            &["sedna", "crds"],
            &["sedna", "up"],
            &["sedna", "up", "--edges", "5", "--local-api", "off"],
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }

    #[test]
    fn a_join_token_names_its_node_unless_fleet_wide_is_asked_for() {
        for args in [
            &["sedna", "token", "create"][..],
            &["sedna", "token", "create", "--node", "a", "--any-node"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
