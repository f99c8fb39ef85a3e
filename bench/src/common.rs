//! What the benchmark binaries share: the repository root, the release binary, free ports, a
//! child process stopped with SIGTERM when dropped, a kube-rs client from a kubeconfig, and
//! percentiles.
//! Included with `mod common;`; each binary uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::{Result, bail};

/// The repository's root.
pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The release `sedna` binary (built beforehand: the benchmarks measure it, not the build).
pub(crate) fn sedna_binary() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let path = target.join("release/sedna");
    if !path.exists() {
        bail!(
            "{} does not exist: cargo build --release -p sedna-cli",
            path.display()
        );
    }
    Ok(path)
}

/// A port free on 127.0.0.1 now.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process, sent SIGTERM and reaped when dropped; the signal goes to its process
/// group when it leads one (a profiler wrapping the program), otherwise to it alone.
pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let pid = self.0.id() as i32;
        let term = nix::sys::signal::Signal::SIGTERM;
        if nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), term).is_err() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), term);
        }
        let _ = self.0.wait();
    }
}

/// The `p` quantile (0 to 1) of sorted durations, nearest rank; zero when there are none.
pub(crate) fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The embedded API server started in `dir` on a free loopback port (writes acknowledged
/// after fsync when `durable`), and a client of it.
pub(crate) async fn start_apiserver(
    dir: &Path,
    durable: bool,
) -> Result<(sedna_apiserver::ApiServer, kube::Client)> {
    let mut config = sedna_apiserver::Config::new(dir.join("apiserver"));
    config.listen = "127.0.0.1:0".parse()?;
    if !durable {
        config.store.durability = sedna_apiserver::store::Durability::Process;
    }
    let server = sedna_apiserver::ApiServer::start(config).await?;
    let client = kube_client(server.kubeconfig_path()).await?;
    Ok((server, client))
}

/// A kube-rs client from a kubeconfig file.
pub(crate) async fn kube_client(path: &Path) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}
