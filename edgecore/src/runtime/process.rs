//! Container processes: started in their own process group with only the declared
//! environment, their output written by the process itself to a log file the agent rotates
//! by size (copytruncate), stopped with SIGTERM then
//! SIGKILL, limited through cgroups where the OS lets the agent (v2, or v1 memory and cpu;
//! otherwise limits are not enforced and that is logged once), and recorded in pid files so
//! a restarted agent removes the processes a killed agent left behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
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

/// Rotates a container log the container writes to directly (`O_APPEND`): when it has
/// grown past the limit, it is copied to `<log>.1` (older copies shift up to `keep`) and
/// truncated in place, so the process keeps writing to the same open file (copytruncate).
/// Returns whether it rotated. Lines written between the copy and the truncation are lost.
pub fn rotate_if_needed(path: &Path, limits: LogLimits) -> std::io::Result<bool> {
    let size = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if size <= limits.max_bytes {
        return Ok(false);
    }
    let name = |i: usize| PathBuf::from(format!("{}.{i}", path.display()));
    let _ = std::fs::remove_file(name(limits.keep));
    for i in (1..limits.keep).rev() {
        let _ = std::fs::rename(name(i), name(i + 1));
    }
    if limits.keep > 0 {
        std::fs::copy(path, name(1))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
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
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // The process writes its output straight to the file: nothing is buffered in the agent,
    // and the workload keeps its output going when the agent is down.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let _ = rotate_if_needed(log_path, limits);
    let mut command = Command::new(&launch.program);
    command
        .args(&launch.args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .envs(&launch.env)
        .current_dir(&launch.working_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(false);
    if let Some(uid) = launch.run_as {
        // std drops the supplementary groups when it changes the uid of a root process.
        command.uid(uid).gid(uid);
    }
    std::fs::create_dir_all(&launch.working_dir)?;
    let child = command.spawn()?;
    let pid = child.id().unwrap_or_default();
    if let Some(ticks) = start_ticks(pid) {
        std::fs::write(pid_file, format!("{pid} {ticks}\n"))?;
    }
    Ok(child)
}

/// The process a pid file (`<pid> <start ticks>`) records, if it still runs (the same
/// process, not a later one given the same pid).
pub fn live_pid(pid_file: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let mut parts = text.split_whitespace();
    let pid = parts.next()?.parse::<u32>().ok()?;
    let ticks = parts.next()?.parse::<u64>().ok()?;
    (start_ticks(pid) == Some(ticks)).then_some(pid)
}

/// Sends a signal to a container's process group; whether it was delivered.
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
            if let Some(pid) = live_pid(&path)
                && signal(pid, Signal::SIGKILL)
            {
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
    fn logs_rotate_in_place_and_keep_a_bounded_number_of_files() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/current.log");
        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        let limits = LogLimits {
            max_bytes: 100,
            keep: 2,
        };
        // The writer keeps one append-mode handle, as a container does.
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut rotations = 0;
        for i in 0..30 {
            writeln!(writer, "line {i:04} with some padding").unwrap();
            if rotate_if_needed(&path, limits).unwrap() {
                rotations += 1;
            }
        }
        assert!(rotations >= 3);
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        assert!(dir.path().join("c/current.log.1").exists());
        assert!(dir.path().join("c/current.log.2").exists());
        assert!(!dir.path().join("c/current.log.3").exists());
        writeln!(writer, "after rotation").unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(
            current.starts_with("after rotation") || current.contains("line 0029"),
            "{current:?}"
        );
        assert!(
            !current.contains('\0'),
            "writes after a truncation must not leave a hole"
        );
        assert!(!rotate_if_needed(&dir.path().join("missing.log"), limits).unwrap());
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
            run_as: None,
        };
        let log = dir.path().join("logs/c.log");
        let pid_file = dir.path().join("pod/c.pid");
        std::fs::create_dir_all(dir.path().join("pod")).unwrap();
        let mut child = spawn(&launch, &log, &pid_file, LogLimits::default()).unwrap();
        let pid = child.id().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("hello edge"), "{text}");
        assert!(text.contains("oops"), "{text}");
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
            run_as: None,
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
