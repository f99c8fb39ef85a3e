//! The `sedna-cloud-worker` binary: parses flags and environment, logs to stderr, runs the worker.

use clap::Parser;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    sedna_cloud_worker::run(sedna_cloud_worker::Args::parse()).await
}
