//! Helpers shared by the CLI's integration tests: the `sedna` binary as real processes
//! (API server, hub, edges), join tokens, kubectl with its own HOME.

#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `sedna ARGS` with its output discarded (set `SEDNA_TEST_LOGS=1` to see it).
pub fn sedna(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sedna"));
    c.args(args);
    if std::env::var_os("SEDNA_TEST_LOGS").is_none() {
        c.stdout(Stdio::null()).stderr(Stdio::null());
    }
    c
}

/// Processes killed (SIGKILL) when dropped.
#[derive(Default)]
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `sedna apiserver` in `dir`; returns the process and its kubeconfig path.
pub fn apiserver(dir: &Path) -> (Child, PathBuf) {
    let port = free_port();
    let child = sedna(&["apiserver", "--metrics-addr", "off", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    (child, dir.join("kubeconfig"))
}

/// A kube client for the kubeconfig, once the API server answers.
pub async fn client(kubeconfig: &Path) -> kube::Client {
    for _ in 0..200 {
        if kubeconfig.exists() {
            let file = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
            let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .unwrap();
            let client = kube::Client::try_from(config).unwrap();
            if client.apiserver_version().await.is_ok() {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the API server did not come up");
}

/// Starts `sedna cloudcore` with fast timings.
pub fn hub(dir: &Path, kubeconfig: &Path, port: u16) -> Child {
    sedna(&["cloudcore", "--metrics-addr", "off", "--data-dir"])
        .arg(dir.join("hub"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--heartbeat",
            "300ms",
            "--read-deadline",
            "2s",
            "--node-monitor-period",
            "500ms",
        ])
        .spawn()
        .unwrap()
}

/// Starts `sedna edgecore` with fast timings.
pub fn edge(dir: &Path, cloud: &str) -> Child {
    edge_with(dir, cloud, &[])
}

/// Starts `sedna edgecore` with fast timings and extra arguments.
pub fn edge_with(dir: &Path, cloud: &str, extra: &[&str]) -> Child {
    sedna(&[
        "edgecore",
        "--metrics-addr",
        "off",
        "--local-api",
        "127.0.0.1:0",
        "--cloud",
        cloud,
        "--data-dir",
    ])
    .arg(dir)
    .args(["--heartbeat", "300ms", "--read-deadline", "2s"])
    .args(extra)
    .spawn()
    .unwrap()
}

/// `sedna token create` for a node (retried until the hub has published its CA).
pub fn token(kubeconfig: &Path, node: &str) -> String {
    for _ in 0..100 {
        let out = Command::new(env!("CARGO_BIN_EXE_sedna"))
            .args([
                "token",
                "create",
                "--node",
                node,
                "--ttl",
                "10m",
                "--kubeconfig",
            ])
            .arg(kubeconfig)
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap().trim().to_owned();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("sedna token create kept failing");
}

/// `sedna join` (retried until the hub listens).
pub fn join(dir: &Path, cloud: &str, token: &str, node: &str) {
    for _ in 0..100 {
        let status = sedna(&[
            "join",
            "--cloud",
            cloud,
            "--token",
            token,
            "--node-name",
            node,
            "--data-dir",
        ])
        .arg(dir)
        .status()
        .unwrap();
        if status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("sedna join kept failing");
}

/// Waits (up to 30 s) for a condition.
pub async fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(30), f).await;
}

/// Waits up to `limit` for a condition.
pub async fn eventually_within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting for: {what}");
}

/// The real `kubectl` with its own HOME (no user config leaks in).
pub struct Kubectl {
    kubeconfig: PathBuf,
    home: tempfile::TempDir,
}

impl Kubectl {
    /// kubectl against a kubeconfig; `None` when no kubectl is installed.
    pub fn new(kubeconfig: &Path) -> Option<Kubectl> {
        let found = Command::new("kubectl")
            .args(["version", "--client"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        found.then(|| Kubectl {
            kubeconfig: kubeconfig.to_owned(),
            home: tempfile::tempdir().unwrap(),
        })
    }

    /// kubectl with these arguments, to add environment or pipes to and run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("kubectl");
        command
            .env("HOME", self.home.path())
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args);
        command
    }

    /// Runs kubectl, returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs kubectl, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs kubectl with extra environment and `input` on its stdin; returns its output.
    pub fn run_with_input(&self, env: &[(&str, &str)], args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// `kubectl apply -f -` with a manifest.
    pub fn apply(&self, manifest: &str) -> String {
        let out = self.run_with_input(&[], &["apply", "-f", "-"], manifest);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The pid recorded for a container of a pod under an edge's data dir.
pub fn container_pid(edge_dir: &Path, pod: &str, container: &str) -> Option<i32> {
    let pods = std::fs::read_dir(edge_dir.join("pods")).ok()?;
    for p in pods.flatten() {
        let name = p.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("default_{pod}_")) {
            let text = std::fs::read_to_string(p.path().join(format!("{container}.pid"))).ok()?;
            return text.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

/// Whether a process runs (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Polls `ok` until it returns a value (every 200 ms), failing after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut ok: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = ok() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `sedna up` as a process, stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Up(pub Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.0.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sedna up` with `edges` edge nodes in `data` (every port picked free), and kubectl once all
/// nodes are Ready and the platform's CRDs are served.
pub fn up(data: &Path, edges: usize) -> (Up, Kubectl) {
    up_with(data, edges, &[])
}

/// [`up`] with extra arguments.
pub fn up_with(data: &Path, edges: usize, extra: &[&str]) -> (Up, Kubectl) {
    let up = Up(sedna(&[
        "up",
        "--edges",
        &edges.to_string(),
        "--no-fsync",
        "--metrics-addr",
        "off",
        "--data-dir",
    ])
    .arg(data)
    .args([
        "--api-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--hub-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--local-api",
        "127.0.0.1:0",
    ])
    .args(extra)
    .spawn()
    .unwrap());
    let kubeconfig = data.join("kubeconfig");
    wait_until("the kubeconfig", Duration::from_secs(60), || {
        kubeconfig.exists().then_some(())
    });
    let Some(kubectl) = Kubectl::new(&kubeconfig) else {
        panic!("kubectl is not installed (scripts/setup installs it)");
    };
    wait_until("every node Ready", Duration::from_secs(60), || {
        let out = kubectl.run(&["get", "nodes", "--no-headers"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (text
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("Ready"))
            .count()
            == edges + 1)
            .then_some(())
    });
    wait_until("the platform's CRDs", Duration::from_secs(30), || {
        kubectl
            .run(&["get", "sedna"])
            .status
            .success()
            .then_some(())
    });
    (up, kubectl)
}
