//! The whole edge agent: the hub client and store, the process runtime, the device manager,
//! and the node's status and lease. Everything runs from the local store, so pods start, restart and report
//! while the hub is unreachable; reports reach the cloud when it returns.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::client::{EdgeConfig, EdgeError, EdgeHub};
use crate::metaserver::{MetaConfig, MetaServer};
use crate::node::{self, NodeConfig};
use crate::runtime::process::LogLimits;
use crate::runtime::supervisor::Backoff;
use crate::runtime::users::PodUsers;
use crate::runtime::{Runtime, RuntimeConfig, RuntimeStats};

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The hub connection and data directory.
    pub edge: EdgeConfig,
    /// Labels of the Node object.
    pub labels: BTreeMap<String, String>,
    /// `node-role.sedna.io/<role>`.
    pub role: String,
    /// The node's address (default: the first non-loopback IPv4 address, else 127.0.0.1).
    pub host_ip: Option<String>,
    /// Container restart back-off.
    pub backoff: Backoff,
    /// Extra directories searched for programs.
    pub program_dirs: Vec<PathBuf>,
    /// Lease renewal interval.
    pub lease_interval: Duration,
    /// Announced lease duration.
    pub lease_duration: Duration,
    /// How often the full node status is sent when nothing in it changed (5 minutes, as the
    /// kubelet's `nodeStatusReportFrequency`: the Lease is the heartbeat, and a change of a
    /// condition or of capacity is sent within the 10 s sampling period).
    pub status_interval: Duration,
    /// The local API (`None`: not served).
    pub metaserver: Option<MetaConfig>,
    /// Where workers reach cloud workers through the hub (`None`: no proxy; port 0: any free
    /// port, which workers learn from `SEDNA_CLOUD_PROXY`).
    pub cloud_proxy: Option<std::net::SocketAddr>,
    /// How often the node's Datasets are counted.
    pub dataset_interval: Duration,
    /// Run each pod under its own uid from this range (`None`: pods run as the agent's user;
    /// only an agent running as root can switch users).
    pub pod_users: Option<Arc<PodUsers>>,
    /// The device manager (twin coalescing, mapper restarts).
    pub devices: crate::devices::DevicesConfig,
}

impl AgentConfig {
    /// Defaults around an edge configuration.
    pub fn new(edge: EdgeConfig) -> Self {
        let program_dirs = vec![edge.data_dir.join("bin")];
        let mut devices = crate::devices::DevicesConfig::new(edge.data_dir.join("captured"));
        devices.mapper_socket = Some(edge.data_dir.join("mappers.sock"));
        let metaserver = Some(MetaConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 10550)),
            data_dir: edge.data_dir.join("metaserver"),
        });
        Self {
            edge,
            labels: BTreeMap::new(),
            role: "edge".into(),
            host_ip: None,
            backoff: Backoff::default(),
            program_dirs,
            lease_interval: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
            status_interval: Duration::from_secs(300),
            metaserver,
            cloud_proxy: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            dataset_interval: Duration::from_secs(10),
            pod_users: None,
            devices,
        }
    }
}

/// The address other machines reach this one at, as far as routing tells.
pub fn host_ip() -> String {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("10.255.255.255:9")?;
            s.local_addr()
        })
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "127.0.0.1".into())
}

/// A running agent.
pub struct Agent {
    hub: EdgeHub,
    runtime: Runtime,
    node_task: tokio::task::JoinHandle<()>,
    metaserver: Option<MetaServer>,
    cloud_proxy: Option<crate::tunnel::CloudProxy>,
    datasets_task: tokio::task::JoinHandle<()>,
    triggers_task: tokio::task::JoinHandle<()>,
    devices_task: tokio::task::JoinHandle<()>,
    mapper_server: Option<tokio::task::JoinHandle<()>>,
    mapper_socket: Option<PathBuf>,
    streams_task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.hub.node())
            .finish()
    }
}

impl Agent {
    /// Starts the hub client, restores and supervises the node's pods, reports the node.
    pub async fn start(config: AgentConfig) -> Result<Agent, EdgeError> {
        if config.pod_users.is_some() && !crate::runtime::users::can_switch_users() {
            return Err(EdgeError::Config(
                "pods can run under their own uids only when the agent runs as root".into(),
            ));
        }
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if config.pod_users.is_none()
            && crate::runtime::users::can_switch_users()
            && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "the agent runs as root and pods run as root too: they can read the node's key \
                 and every pod's files; give pods their own uids with --pod-uids FIRST-LAST"
            );
        }
        let hub = EdgeHub::start(config.edge.clone()).await?;
        let host_ip = config.host_ip.clone().unwrap_or_else(host_ip);
        let cloud_proxy = match config.cloud_proxy {
            Some(listen) => match crate::tunnel::CloudProxy::start(
                listen,
                hub.hub_address(),
                config.edge.data_dir.clone(),
            )
            .await
            {
                Ok(proxy) => Some(proxy),
                Err(e) => {
                    tracing::warn!(%listen, error = %e, "cloud proxy not started");
                    None
                }
            },
            None => None,
        };
        let mut node_env = std::collections::BTreeMap::new();
        if let Some(proxy) = &cloud_proxy {
            // Workers reach their cloud workers through the hub at this address.
            node_env.insert("SEDNA_CLOUD_PROXY".to_string(), proxy.addr().to_string());
        }
        // The devices' latest values, shown by the local API between twin reports.
        let live_twins = crate::devices::twin::LiveTwins::default();
        let metaserver = match config.metaserver {
            Some(meta) => match MetaServer::start(
                meta.clone(),
                hub.store().clone(),
                hub.subscribe(),
                hub.reporter(),
                live_twins.clone(),
            )
            .await
            {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::error!(listen = %meta.listen, error = %e,
                        "the local API is not served (workloads run regardless)");
                    None
                }
            },
            None => None,
        };
        let runtime = Runtime::start(
            RuntimeConfig {
                node: hub.node().to_owned(),
                data_dir: config.edge.data_dir.clone(),
                host_ip: host_ip.clone(),
                backoff: config.backoff,
                program_dirs: config.program_dirs.clone(),
                log_limits: LogLimits::default(),
                node_env,
                // Each pod reaches the node's local API (the local controller's role: its
                // reports go up through the outbox) with a token of its own.
                pod_api: metaserver.as_ref().map(MetaServer::pod_api),
                pod_users: config.pod_users.clone(),
            },
            hub.store().clone(),
            hub.subscribe(),
            hub.reporter(),
        );
        let streams_task = hub.take_stream_requests().map(|requests| {
            let context = crate::streams::StreamContext {
                store: hub.store().clone(),
                pods_dir: config.edge.data_dir.join("pods"),
                program_dirs: config.program_dirs.clone(),
            };
            tokio::spawn(crate::streams::answer(
                requests,
                hub.hub_address(),
                config.edge.data_dir.clone(),
                Arc::new(context),
            ))
        });
        let node_config = NodeConfig {
            name: hub.node().to_owned(),
            labels: config.labels.clone(),
            role: config.role.clone(),
            host_ip,
            data_dir: config.edge.data_dir.clone(),
            lease_interval: config.lease_interval,
            lease_duration: config.lease_duration,
            status_interval: config.status_interval,
        };
        let node_task = tokio::spawn(node::run(node_config, hub.reporter(), hub.status()));
        let datasets_task = tokio::spawn(crate::datasets::run(
            hub.node().to_owned(),
            hub.store().clone(),
            hub.reporter(),
            config.dataset_interval,
        ));
        let triggers_task = tokio::spawn(crate::triggers::run(
            hub.node().to_owned(),
            hub.store().clone(),
            hub.reporter(),
            config
                .dataset_interval
                .min(std::time::Duration::from_secs(1)),
        ));
        let mappers = crate::devices::external::Mappers::default();
        let mapper_server = match &config.devices.mapper_socket {
            Some(path) => {
                let service = crate::devices::external::Service::new(hub.node(), mappers.clone());
                match crate::devices::external::serve(path, service).await {
                    Ok(task) => Some(task),
                    Err(e) => {
                        tracing::error!(socket = %path.display(), error = %e,
                            "the mapper interface is not served (built-in mappers run regardless)");
                        None
                    }
                }
            }
            None => None,
        };
        let devices_task = tokio::spawn(crate::devices::run(
            hub.node().to_owned(),
            hub.store().clone(),
            hub.subscribe(),
            hub.reporter(),
            config.devices.clone(),
            mappers,
            live_twins,
        ));
        Ok(Agent {
            hub,
            runtime,
            node_task,
            metaserver,
            cloud_proxy,
            datasets_task,
            triggers_task,
            devices_task,
            mapper_socket: mapper_server
                .as_ref()
                .and(config.devices.mapper_socket.clone()),
            mapper_server,
            streams_task,
        })
    }

    /// The cloud proxy's address, when it runs.
    pub fn cloud_proxy(&self) -> Option<std::net::SocketAddr> {
        self.cloud_proxy
            .as_ref()
            .map(crate::tunnel::CloudProxy::addr)
    }

    /// The hub client (store, status, outbox).
    pub fn hub(&self) -> &EdgeHub {
        &self.hub
    }

    /// Where users' mappers connect, when served.
    pub fn mapper_socket(&self) -> Option<&std::path::Path> {
        self.mapper_socket.as_deref()
    }

    /// The local API, when served.
    pub fn metaserver(&self) -> Option<&MetaServer> {
        self.metaserver.as_ref()
    }

    /// The runtime's figures.
    pub fn runtime_stats(&self) -> Arc<RuntimeStats> {
        self.runtime.stats()
    }

    /// Stops the workloads gracefully, then the agent (`sedna up` on Ctrl-C).
    pub async fn shutdown_with_workloads(self) {
        self.runtime.stop_workloads().await;
        self.shutdown().await;
    }

    /// Stops the agent; running processes are left alone (as after a crash: a restarted agent
    /// replaces them).
    pub async fn shutdown(self) {
        self.node_task.abort();
        self.datasets_task.abort();
        self.triggers_task.abort();
        self.devices_task.abort();
        if let Some(task) = self.mapper_server {
            task.abort();
        }
        if let Some(task) = self.streams_task {
            task.abort();
        }
        self.runtime.abort();
        if let Some(m) = self.metaserver {
            m.shutdown().await;
        }
        self.hub.shutdown().await;
    }
}
