//! The node as the API sees it: its Node object (labels, capacity and allocatable CPU,
//! memory, ephemeral storage, pods and — through NVML when its library is present —
//! `nvidia.com/gpu`; conditions Ready, MemoryPressure, DiskPressure, PIDPressure; node info;
//! addresses) and its Lease in `kube-node-lease`, renewed as a heartbeat. Both go upstream
//! through the outbox, where a newer snapshot replaces a queued one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sedna_proto::channel::{Upstream, upstream::Kind as UpstreamKind};
use serde_json::{Value, json};

use crate::runtime::Reporter;

/// Node settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Node name.
    pub name: String,
    /// Labels to set (besides the standard hostname, os, arch and role labels).
    pub labels: BTreeMap<String, String>,
    /// Role label suffix: `node-role.sedna.io/<role>`.
    pub role: String,
    /// The node's address.
    pub host_ip: String,
    /// Where the data lives (for ephemeral-storage and disk pressure).
    pub data_dir: std::path::PathBuf,
    /// How often the Lease is renewed.
    pub lease_interval: Duration,
    /// Lease duration announced.
    pub lease_duration: Duration,
    /// How often the full node status is sent even when nothing changed.
    pub status_interval: Duration,
}

/// Resources of the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// CPUs.
    pub cpus: u64,
    /// Memory in bytes.
    pub memory: u64,
    /// Available memory in bytes.
    pub memory_available: u64,
    /// Filesystem size of the data directory in bytes.
    pub storage: u64,
    /// Free bytes on it.
    pub storage_free: u64,
    /// NVIDIA GPUs (NVML); `None` when NVML is absent.
    pub gpus: Option<u32>,
}

fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

/// Counts NVIDIA GPUs through NVML; `None` when the library or a driver is missing. Asked
/// once per process (loading NVML takes tens of milliseconds).
pub fn gpu_count() -> Option<u32> {
    static COUNT: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| {
        let nvml = nvml_wrapper::Nvml::init().ok()?;
        nvml.device_count().ok()
    })
}

/// The machine's CPUs and memory, read once per process, as the kubelet reads its machine
/// information at start: an agent samples every few seconds, and a simulator runs thousands of
/// agents in one process.
fn machine() -> (u64, u64) {
    static MACHINE: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    *MACHINE.get_or_init(|| {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        (cpus, meminfo("MemTotal:").unwrap_or(0))
    })
}

/// Free memory, read from the kernel at most once a second per process: every agent samples
/// it, and a simulator runs thousands of agents in one process.
fn memory_available() -> u64 {
    static LAST: std::sync::Mutex<Option<(tokio::time::Instant, u64)>> =
        std::sync::Mutex::new(None);
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = tokio::time::Instant::now();
    match *last {
        Some((at, bytes)) if now.duration_since(at) < Duration::from_secs(1) => bytes,
        _ => {
            let bytes = meminfo("MemAvailable:").unwrap_or(0);
            *last = Some((now, bytes));
            bytes
        }
    }
}

/// Reads the machine's resources: CPUs and memory as read at start, free memory and the data
/// directory's filesystem now.
pub fn capacity(data_dir: &Path) -> Capacity {
    let (storage, storage_free) = nix::sys::statvfs::statvfs(data_dir)
        .map(|s| {
            let block = s.fragment_size().max(1);
            (s.blocks() * block, s.blocks_available() * block)
        })
        .unwrap_or((0, 0));
    let (cpus, memory) = machine();
    Capacity {
        cpus,
        memory,
        memory_available: memory_available(),
        storage,
        storage_free,
        gpus: gpu_count(),
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "Linux".into())
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Conditions of the node, given its resources.
pub fn conditions(c: &Capacity) -> Vec<(&'static str, bool, &'static str, String)> {
    let memory_pressure = c.memory > 0 && c.memory_available < 100 * 1024 * 1024;
    let disk_pressure = c.storage > 0 && c.storage_free * 10 < c.storage;
    vec![
        (
            "Ready",
            true,
            "KubeletReady",
            "sedna-edgecore is posting ready status".into(),
        ),
        (
            "MemoryPressure",
            memory_pressure,
            if memory_pressure {
                "KubeletHasInsufficientMemory"
            } else {
                "KubeletHasSufficientMemory"
            },
            format!("{} MiB available", c.memory_available / (1024 * 1024)),
        ),
        (
            "DiskPressure",
            disk_pressure,
            if disk_pressure {
                "KubeletHasDiskPressure"
            } else {
                "KubeletHasNoDiskPressure"
            },
            format!(
                "{} MiB free on the data directory's filesystem",
                c.storage_free / (1024 * 1024)
            ),
        ),
        (
            "PIDPressure",
            false,
            "KubeletHasSufficientPID",
            "enough PIDs".into(),
        ),
    ]
}

/// The Node object to apply.
pub fn node_object(
    config: &NodeConfig,
    c: &Capacity,
    transitions: &BTreeMap<String, (bool, String)>,
) -> Value {
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| config.name.clone());
    let mut labels: BTreeMap<String, String> = BTreeMap::from([
        ("kubernetes.io/hostname".into(), config.name.clone()),
        ("kubernetes.io/os".into(), "linux".into()),
        ("kubernetes.io/arch".into(), arch().into()),
        (format!("node-role.sedna.io/{}", config.role), String::new()),
    ]);
    labels.extend(config.labels.clone());
    let mut resources = json!({
        "cpu": c.cpus.to_string(),
        "memory": format!("{}Ki", c.memory / 1024),
        "ephemeral-storage": format!("{}Ki", c.storage / 1024),
        "pods": "110",
    });
    if let Some(g) = c.gpus {
        resources["nvidia.com/gpu"] = json!(g.to_string());
    }
    let stamp = now();
    let conditions: Vec<Value> = conditions(c)
        .into_iter()
        .map(|(t, status, reason, message)| {
            let since = transitions
                .get(t)
                .filter(|(s, _)| *s == status)
                .map(|(_, at)| at.clone())
                .unwrap_or_else(|| stamp.clone());
            json!({ "type": t, "status": if status { "True" } else { "False" }, "reason": reason,
                    "message": message, "lastHeartbeatTime": stamp, "lastTransitionTime": since })
        })
        .collect();
    let uname = nix::sys::utsname::uname().ok();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": config.name, "labels": labels },
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": conditions,
            "addresses": [{ "type": "InternalIP", "address": config.host_ip },
                          { "type": "Hostname", "address": hostname }],
            "nodeInfo": {
                "machineID": read_trim("/etc/machine-id"),
                "systemUUID": read_trim("/etc/machine-id"),
                "bootID": read_trim("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": uname.as_ref().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
                "osImage": os_image(),
                "containerRuntimeVersion": format!("process://sedna-edgecore/{}", env!("CARGO_PKG_VERSION")),
                "kubeletVersion": format!("v1.33.0-sedna.{}", env!("CARGO_PKG_VERSION")),
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": arch(),
            },
            "daemonEndpoints": { "kubeletEndpoint": { "Port": 0 } },
        },
    })
}

/// The Lease object to apply.
pub fn lease_object(config: &NodeConfig) -> Value {
    let renew = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": config.name, "namespace": "kube-node-lease" },
        "spec": {
            "holderIdentity": config.name,
            "leaseDurationSeconds": config.lease_duration.as_secs(),
            "renewTime": renew,
        },
    })
}

/// What a node status report is re-sent for before its interval: the conditions' states and
/// the capacity (not the free memory or disk figures of the conditions' messages, which
/// change all the time and would turn every sample into an API write).
#[derive(PartialEq)]
struct Reported {
    conditions: Vec<(String, bool)>,
    capacity: (u64, u64, u64, Option<u32>),
}

/// How often the Lease is renewed: as the hub of the connection asked (it judges the node by
/// the session and writes the API's copy only every few minutes, stretched to cover the
/// wait), but never more often than the node's own cadence, nor less often than every
/// [`MAX_RENEWAL_INTERVAL`]. A new connection's hub says again what it wants (a hub that
/// asks nothing gets the node's own cadence), and a reconnection renews at once.
fn renewal_every(config: &NodeConfig, asked: Option<Duration>) -> Duration {
    let most = MAX_RENEWAL_INTERVAL.max(config.lease_interval);
    asked.map_or(config.lease_interval, |a| {
        a.clamp(config.lease_interval, most)
    })
}

/// The longest renewal interval a hub can ask for.
pub const MAX_RENEWAL_INTERVAL: Duration = Duration::from_secs(300);

/// Reports the node status and renews the lease until aborted; reports the full status again
/// on every reconnection (the cloud may have marked the node NotReady meanwhile).
pub async fn run(
    config: NodeConfig,
    reporter: Arc<dyn Reporter>,
    mut hub: tokio::sync::watch::Receiver<crate::client::EdgeStatus>,
) {
    let mut was_connected = hub.borrow().connected;
    let mut transitions: BTreeMap<String, (bool, String)> = BTreeMap::new();
    let mut last_conditions: Option<Reported> = None;
    let mut every = renewal_every(&config, hub.borrow().lease_renewal);
    let mut lease = tokio::time::interval(every);
    let mut status = tokio::time::interval(config.status_interval);
    let mut sample = tokio::time::interval(Duration::from_secs(10).min(config.status_interval));
    let mut force = true;
    loop {
        tokio::select! {
            _ = lease.tick() => {
                let upstream = Upstream {
                    kind: UpstreamKind::Lease as i32,
                    object: None,
                    payload: lease_object(&config).to_string().into_bytes(),
                };
                if let Err(e) = reporter.report(&upstream) {
                    tracing::warn!(error = %e, "could not queue the lease renewal");
                }
            }
            _ = status.tick() => force = true,
            changed = hub.changed() => {
                if changed.is_err() {
                    return;
                }
                let (connected, asked) = {
                    let status = hub.borrow_and_update();
                    (status.connected, status.lease_renewal)
                };
                let wanted = renewal_every(&config, asked);
                if connected && wanted != every {
                    every = wanted;
                    lease = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                }
                let reconnected = connected && !was_connected;
                was_connected = connected;
                if !reconnected {
                    continue;
                }
                force = true;
                // A fresh lease first: the queued one may be older than the cloud's patience.
                let upstream = Upstream {
                    kind: UpstreamKind::Lease as i32,
                    object: None,
                    payload: lease_object(&config).to_string().into_bytes(),
                };
                let _ = reporter.report(&upstream);
            }
            _ = sample.tick() => {}
        }
        let c = capacity(&config.data_dir);
        let current = Reported {
            conditions: conditions(&c)
                .into_iter()
                .map(|(t, s, _, _)| (t.to_owned(), s))
                .collect(),
            capacity: (c.cpus, c.memory, c.storage, c.gpus),
        };
        if !force && last_conditions.as_ref() == Some(&current) {
            continue;
        }
        for (t, s) in &current.conditions {
            if transitions.get(t).is_none_or(|(old, _)| old != s) {
                transitions.insert(t.clone(), (*s, now()));
            }
        }
        last_conditions = Some(current);
        force = false;
        let upstream = Upstream {
            kind: UpstreamKind::Node as i32,
            object: None,
            payload: node_object(&config, &c, &transitions)
                .to_string()
                .into_bytes(),
        };
        if let Err(e) = reporter.report(&upstream) {
            tracing::warn!(error = %e, "could not queue the node status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            name: "edge-1".into(),
            labels: BTreeMap::from([("site".to_owned(), "north".to_owned())]),
            role: "edge".into(),
            host_ip: "10.0.0.5".into(),
            data_dir: std::env::temp_dir(),
            lease_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
            status_interval: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_node_object_carries_capacity_conditions_and_labels() {
        let c = Capacity {
            cpus: 4,
            memory: 8 << 30,
            memory_available: 50 << 20,
            storage: 100 << 30,
            storage_free: 5 << 30,
            gpus: Some(2),
        };
        let node = node_object(&config(), &c, &BTreeMap::new());
        assert_eq!(node["metadata"]["labels"]["node-role.sedna.io/edge"], "");
        assert_eq!(node["metadata"]["labels"]["site"], "north");
        assert_eq!(node["status"]["capacity"]["cpu"], "4");
        assert_eq!(node["status"]["capacity"]["nvidia.com/gpu"], "2");
        let cond = |t: &str| {
            node["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == t)
                .unwrap()["status"]
                .clone()
        };
        assert_eq!(cond("Ready"), "True");
        assert_eq!(cond("MemoryPressure"), "True", "50 MiB available");
        assert_eq!(cond("DiskPressure"), "True", "5% free");
        let without_gpu = node_object(&config(), &Capacity { gpus: None, ..c }, &BTreeMap::new());
        assert!(
            without_gpu["status"]["capacity"]
                .get("nvidia.com/gpu")
                .is_none()
        );
    }

    #[test]
    fn the_machine_is_measured_without_a_gpu_library_crashing_anything() {
        let c = capacity(&std::env::temp_dir());
        assert!(c.cpus >= 1 && c.memory > 0 && c.storage > 0);
        let lease = lease_object(&config());
        assert_eq!(lease["spec"]["holderIdentity"], "edge-1");
        assert!(lease["spec"]["renewTime"].as_str().unwrap().ends_with('Z'));
    }

    /// Counts the Lease renewals queued, by when (paused tokio time).
    struct Renewals(std::sync::Mutex<Vec<tokio::time::Instant>>);

    impl Reporter for Renewals {
        fn report(&self, upstream: &Upstream) -> Result<u64, crate::store::StoreError> {
            if upstream.kind == UpstreamKind::Lease as i32 {
                self.0.lock().unwrap().push(tokio::time::Instant::now());
            }
            Ok(0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_renewed_as_often_as_the_connected_hub_asks_within_bounds() {
        let renewals = Arc::new(Renewals(std::sync::Mutex::new(Vec::new())));
        let (hub, rx) = tokio::sync::watch::channel(crate::client::EdgeStatus::default());
        let task = tokio::spawn(run(config(), renewals.clone(), rx));
        let start = tokio::time::Instant::now();
        let count_in = |from: Duration, to: Duration| {
            renewals
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|t| **t >= start + from && **t < start + to)
                .count()
        };
        // Offline: the node's own 10 s (at 0, 10, 20 s).
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(count_in(Duration::ZERO, Duration::from_secs(25)), 3);
        // A hub that judges by the session asks for 30 s: one renewal at once (a
        // reconnection), then every 30 s (55 and 85 s).
        hub.send_modify(|s| {
            s.connected = true;
            s.lease_renewal = Some(Duration::from_secs(30));
        });
        tokio::time::sleep(Duration::from_secs(65)).await;
        assert_eq!(
            count_in(Duration::from_secs(25), Duration::from_secs(90)),
            3
        );
        // The next hub asks nothing: the node's own cadence again, from the reconnection.
        hub.send_modify(|s| s.connected = false);
        tokio::time::sleep(Duration::from_secs(1)).await;
        hub.send_modify(|s| {
            s.connected = true;
            s.lease_renewal = None;
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(
            count_in(Duration::from_secs(90), Duration::from_secs(116)),
            3
        );
        task.abort();

        // What a hub may ask is bounded both ways.
        let c = config();
        assert_eq!(renewal_every(&c, None), Duration::from_secs(10));
        assert_eq!(
            renewal_every(&c, Some(Duration::from_secs(1))),
            Duration::from_secs(10)
        );
        assert_eq!(
            renewal_every(&c, Some(Duration::from_secs(3600))),
            MAX_RENEWAL_INTERVAL
        );
    }
}
