//! Test support: a server started in-process on a free loopback port with its own data
//! directory, and runners for the real `kubectl` binaries on this machine.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sedna_apiserver::{ApiServer, Config};

/// A running server and its data directory.
pub struct TestServer {
    pub server: ApiServer,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path().join("apiserver"));
        config.listen = "127.0.0.1:0".parse().unwrap();
        tune(&mut config);
        let server = ApiServer::start(config).await.unwrap();
        Self { server, dir }
    }

    pub fn kubeconfig(&self) -> &Path {
        self.server.kubeconfig_path()
    }

    /// A kube-rs client authenticated as the admin.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.kubeconfig()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }
}

/// The repository root (for `crds/manifests` and `examples`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The kubectl binaries: the dispatcher on the PATH and every bundled `kubectl.1.NN`.
pub struct Kubectls {
    pub dispatcher: PathBuf,
    pub bundled: Vec<(u32, PathBuf)>,
}

pub fn kubectls() -> Kubectls {
    let which = Command::new("sh")
        .args(["-c", "command -v kubectl"])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&which.stdout).trim().to_owned();
    assert!(
        !path.is_empty(),
        "kubectl is not on the PATH: these tests drive the real kubectl (see scripts/setup)"
    );
    let dispatcher = std::fs::canonicalize(&path).unwrap();
    let mut bundled = Vec::new();
    if let Some(dir) = dispatcher.parent() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(minor) = name.strip_prefix("kubectl.1.").and_then(|m| m.parse().ok()) {
                bundled.push((minor, entry.path()));
            }
        }
    }
    bundled.sort();
    Kubectls {
        dispatcher,
        bundled,
    }
}

/// One kubectl binary bound to a kubeconfig, with its own HOME (so discovery caches of
/// different tests never mix).
pub struct Kubectl {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    pub home: tempfile::TempDir,
}

/// What a kubectl run printed.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok={} stdout:\n{}\nstderr:\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

impl Kubectl {
    pub fn new(bin: &Path, kubeconfig: &Path) -> Self {
        Self {
            bin: bin.to_owned(),
            kubeconfig: kubeconfig.to_owned(),
            home: tempfile::tempdir().unwrap(),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.home.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .current_dir(repo_root());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, None)
    }

    pub fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        use std::io::Write;
        let mut c = self.command(args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out: Output = child.wait_with_output().unwrap();
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs and asserts success.
    pub fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args);
        assert!(run.ok, "kubectl {args:?} failed: {run:?}");
        run.stdout
    }
}

/// Waits until `f` returns true (polling every 50 ms), failing after `timeout`.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
