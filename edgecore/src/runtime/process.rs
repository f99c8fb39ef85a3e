//! Container processes: started in their own process group with only the declared
//! environment, their output written to size-rotated log files, stopped with SIGTERM then
//! SIGKILL, limited through cgroups where the OS lets the agent (v2, or v1 memory and cpu;
//! otherwise limits are not enforced and that is logged once), and recorded in pid files so
//! a restarted agent removes the processes a killed agent left behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::spec::Launch;

/// Log file limits.
#[derive(Clone, Copy, Debug)]
pub struct LogLimits {
    /// Rotate when the current file would exceed this.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            keep: 3,
        }
    }
}

/// A size-rotated log file (`current.log`, `current.log.1`, …).
pub struct RotatingLog {
    path: PathBuf,
    limits: LogLimits,
    file: std::fs::File,
    size: u64,
}

impl RotatingLog {
    /// Opens (appending) the log at `path`.
    pub fn open(path: &Path, limits: LogLimits) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            limits,
            file,
            size,
        })
    }

    /// Appends a line.
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.limits.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let name = |i: usize| PathBuf::from(format!("{}.{i}", self.path.display()));
        let _ = std::fs::remove_file(name(self.limits.keep));
        for i in (1..self.limits.keep).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        if self.limits.keep > 0 {
            std::fs::rename(&self.path, name(1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// The start time of a process (clock ticks since boot), to tell a pid from its reuse.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Starts a container; its output goes to `log_path`, its pid to `pid_file`.
pub fn spawn(
    launch: &Launch,
    log_path: &Path,
    pid_file: &Path,
    limits: LogLimits,
) -> std::io::Result<Child> {
    let mut command = Command::new(&launch.program);
    command
        .args(&launch.args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .envs(&launch.env)
        .current_dir(&launch.working_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    std::fs::create_dir_all(&launch.working_dir)?;
    let mut child = command.spawn()?;
    let pid = child.id().unwrap_or_default();
    if let Some(ticks) = start_ticks(pid) {
        std::fs::write(pid_file, format!("{pid} {ticks}\n"))?;
    }
    let log = Arc::new(std::sync::Mutex::new(RotatingLog::open(log_path, limits)?));
    if let Some(out) = child.stdout.take() {
        pump(out, "stdout", log.clone());
    }
    if let Some(err) = child.stderr.take() {
        pump(err, "stderr", log);
    }
    Ok(child)
}

fn pump<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    reader: R,
    stream: &'static str,
    log: Arc<std::sync::Mutex<RotatingLog>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = log.write_line(&format!("{} {stream} F {line}", now()));
        }
    });
}

/// Sends a signal to a container's process group.
pub fn signal(pid: u32, signal: Signal) -> bool {
    i32::try_from(pid)
        .ok()
        .is_some_and(|p| killpg(Pid::from_raw(p), signal).is_ok())
}

/// Kills the process groups recorded in pid files under `dir` that still run the recorded
/// process (a restarted agent starts its pods afresh). Returns how many it killed.
pub fn kill_leftovers(dir: &Path) -> usize {
    let mut killed = 0;
    let Ok(pods) = std::fs::read_dir(dir) else {
        return 0;
    };
    for pod in pods.flatten() {
        let Ok(files) = std::fs::read_dir(pod.path()) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let mut parts = text.split_whitespace();
            let (Some(pid), Some(ticks)) = (
                parts.next().and_then(|p| p.parse::<u32>().ok()),
                parts.next().and_then(|t| t.parse::<u64>().ok()),
            ) else {
                continue;
            };
            if start_ticks(pid) == Some(ticks) && signal(pid, Signal::SIGKILL) {
                killed += 1;
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    killed
}

static LIMITS_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

fn cgroup_dir(kind: Option<&str>, name: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup");
    match kind {
        Some(controller) => root.join(controller).join("sedna").join(name),
        None => root.join("sedna").join(name),
    }
}

/// Applies memory and CPU limits to a process through cgroups, where possible.
pub fn apply_limits(pid: u32, name: &str, memory: Option<u64>, cpu_millis: Option<u64>) {
    if memory.is_none() && cpu_millis.is_none() {
        return;
    }
    let result: std::io::Result<()> = (|| {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        if v2 {
            let dir = cgroup_dir(None, name);
            std::fs::create_dir_all(&dir)?;
            if let Some(m) = memory {
                std::fs::write(dir.join("memory.max"), m.to_string())?;
            }
            if let Some(c) = cpu_millis {
                std::fs::write(dir.join("cpu.max"), format!("{} 100000", c * 100))?;
            }
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        } else {
            if let Some(m) = memory {
                let dir = cgroup_dir(Some("memory"), name);
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("memory.limit_in_bytes"), m.to_string())?;
                std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
            }
            if let Some(c) = cpu_millis {
                let dir = cgroup_dir(Some("cpu"), name);
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("cpu.cfs_period_us"), "100000")?;
                std::fs::write(dir.join("cpu.cfs_quota_us"), (c * 100).to_string())?;
                std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
            }
        }
        Ok(())
    })();
    if let Err(e) = result
        && !LIMITS_UNAVAILABLE.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(error = %e, "cgroups are not writable here: container resource limits are not enforced");
    }
}

/// Removes a container's cgroups (after its processes ended).
pub fn remove_limits(name: &str) {
    for kind in [None, Some("memory"), Some("cpu")] {
        let _ = std::fs::remove_dir(cgroup_dir(kind, name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_rotate_and_keep_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/current.log");
        let mut log = RotatingLog::open(
            &path,
            LogLimits {
                max_bytes: 100,
                keep: 2,
            },
        )
        .unwrap();
        for i in 0..30 {
            log.write_line(&format!("line {i:04} with some padding"))
                .unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        assert!(dir.path().join("c/current.log.1").exists());
        assert!(dir.path().join("c/current.log.2").exists());
        assert!(!dir.path().join("c/current.log.3").exists());
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.contains("line 0029"));
    }

    #[tokio::test]
    async fn processes_run_with_their_environment_and_logs_and_stop_on_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let launch = Launch {
            name: "c".into(),
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "echo hello $GREETING; echo oops >&2; sleep 30".into(),
            ],
            env: [("GREETING".to_owned(), "edge".to_owned())].into(),
            working_dir: dir.path().join("work"),
            memory_limit: None,
            cpu_limit_millis: None,
        };
        let log = dir.path().join("logs/c.log");
        let pid_file = dir.path().join("pod/c.pid");
        std::fs::create_dir_all(dir.path().join("pod")).unwrap();
        let mut child = spawn(&launch, &log, &pid_file, LogLimits::default()).unwrap();
        let pid = child.id().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("stdout F hello edge"), "{text}");
        assert!(text.contains("stderr F oops"), "{text}");
        assert!(signal(pid, Signal::SIGTERM));
        let status = child.wait().await.unwrap();
        assert!(!status.success());
    }

    #[tokio::test]
    async fn leftovers_of_a_killed_agent_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("pods/ns_p_uid");
        std::fs::create_dir_all(&pod).unwrap();
        let launch = Launch {
            name: "c".into(),
            program: "/bin/sleep".into(),
            args: vec!["30".into()],
            env: Default::default(),
            working_dir: pod.clone(),
            memory_limit: None,
            cpu_limit_millis: None,
        };
        let mut child = spawn(
            &launch,
            &pod.join("c.log"),
            &pod.join("c.pid"),
            LogLimits::default(),
        )
        .unwrap();
        assert_eq!(kill_leftovers(&dir.path().join("pods")), 1);
        assert!(child.wait().await.is_ok());
        assert!(!pod.join("c.pid").exists());
    }
}
