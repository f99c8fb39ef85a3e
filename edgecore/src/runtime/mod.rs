//! The process runtime: every Pod bound to this node, as found in the local store, runs as
//! supervised processes — also when the hub is unreachable, and again after the agent
//! restarts (pods are restored from the store; processes a killed agent left behind are
//! killed first). Pod statuses and events are written upstream through the outbox; a pod
//! being deleted is stopped gracefully (SIGTERM, grace period, SIGKILL) and its deletion is
//! then confirmed to the hub.

pub mod process;
pub mod spec;
pub mod supervisor;
pub mod users;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use nix::sys::signal::Signal;
use sedna_proto::channel::{ObjectRef, Upstream, upstream::Kind as UpstreamKind};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::podtoken::{PodApi, PodIdentity};
use crate::store::{Change, EdgeStore, StoreError};
use process::LogLimits;
use spec::{Data, SpecError, VolumePlan};
use supervisor::{Backoff, Decision, Exit, Record, RestartPolicy, State};
use users::{PodUsers, UidLease};

/// Where upstream writes go (the outbox).
pub trait Reporter: Send + Sync {
    /// Queues a write.
    fn report(&self, upstream: &Upstream) -> Result<u64, StoreError>;
}

/// Runtime settings.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// This node.
    pub node: String,
    /// Pods live under `<data_dir>/pods`.
    pub data_dir: PathBuf,
    /// The node's address, reported as pod IP (processes share the host network).
    pub host_ip: String,
    /// Restart back-off.
    pub backoff: Backoff,
    /// Directories searched for programs before `PATH`.
    pub program_dirs: Vec<PathBuf>,
    /// Container log limits.
    pub log_limits: LogLimits,
    /// Variables every container gets from the node (e.g. where its local API is); a pod's
    /// own `env` wins.
    pub node_env: BTreeMap<String, String>,
    /// Gives each pod its own token for the node's local API (`SEDNA_LOCAL_KUBECONFIG`).
    pub pod_api: Option<PodApi>,
    /// Runs each pod under its own uid from this range (the agent must run as root).
    pub pod_users: Option<Arc<PodUsers>>,
}

/// Figures of the runtime.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    /// Containers running now.
    pub running: AtomicU64,
    /// Container restarts since the agent started.
    pub restarts: AtomicU64,
    /// Pods supervised now.
    pub pods: AtomicU64,
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn object_ref(pod: &Pod) -> ObjectRef {
    ObjectRef {
        api_version: "v1".into(),
        kind: "Pod".into(),
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
    }
}

/// The running runtime.
pub struct Runtime {
    task: tokio::task::JoinHandle<()>,
    stats: Arc<RuntimeStats>,
    control: mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

enum Command {
    Update(Box<Pod>),
    Refresh,
    Kill,
    /// Stop the processes, keep the pod's directory (the node is shutting down).
    Stop,
}

struct Entry {
    tx: mpsc::UnboundedSender<Command>,
    /// What the pod reads: a change to anything else does not concern it.
    uses: Uses,
}

/// The ConfigMaps and Secrets a pod reads (volumes, env, envFrom), in its namespace. A
/// change to one of them makes the pod retry a configuration that was missing; a change to
/// anything else leaves it alone (a first sync of N pods and N ConfigMaps must not retry
/// every waiting pod N times).
#[derive(Debug, Default, PartialEq, Eq)]
struct Uses {
    namespace: String,
    objects: std::collections::BTreeSet<(&'static str, String)>,
}

impl Uses {
    fn of(pod: &Pod) -> Uses {
        let objects = serde_json::to_value(pod)
            .map(|v| sedna_api::references::pod_references(&v))
            .unwrap_or_default()
            .into_iter()
            .filter(|r| matches!(r.kind, "ConfigMap" | "Secret"))
            .map(|r| (r.kind, r.name))
            .collect();
        Uses {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            objects,
        }
    }

    fn contains(&self, kind: &str, namespace: &str, name: &str) -> bool {
        self.namespace == namespace && self.objects.iter().any(|(k, n)| *k == kind && n == name)
    }
}

impl Runtime {
    /// Starts supervising the node's pods.
    pub fn start(
        config: RuntimeConfig,
        store: EdgeStore,
        changes: broadcast::Receiver<Change>,
        reporter: Arc<dyn Reporter>,
    ) -> Runtime {
        let stats = Arc::new(RuntimeStats::default());
        let (control, control_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(
            config,
            store,
            changes,
            reporter,
            stats.clone(),
            control_rx,
        ));
        Runtime {
            task,
            stats,
            control,
        }
    }

    /// The runtime's figures.
    pub fn stats(&self) -> Arc<RuntimeStats> {
        self.stats.clone()
    }

    /// Stops supervising (processes are left running, as after an agent crash).
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Stops every container gracefully (SIGTERM, a short grace, SIGKILL), keeping the pods'
    /// directories; a later runtime starts them again.
    pub async fn stop_workloads(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.control.send(tx).is_ok() {
            let _ = rx.await;
        }
        self.task.abort();
    }
}

fn pods_dir(config: &RuntimeConfig) -> PathBuf {
    config.data_dir.join("pods")
}

fn decode_pod(value: &[u8]) -> Option<Pod> {
    serde_json::from_slice(value).ok()
}

fn bound_here(pod: &Pod, node: &str) -> bool {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
}

async fn run(
    config: RuntimeConfig,
    store: EdgeStore,
    mut changes: broadcast::Receiver<Change>,
    reporter: Arc<dyn Reporter>,
    stats: Arc<RuntimeStats>,
    mut control: mpsc::UnboundedReceiver<tokio::sync::oneshot::Sender<()>>,
) {
    if config.pod_users.is_some() {
        // Pods reach their own directories by name; nobody but the agent lists anything.
        use std::os::unix::fs::PermissionsExt;
        let pods = pods_dir(&config);
        let traversable = std::fs::create_dir_all(&pods).and_then(|()| {
            for d in [&config.data_dir, &pods] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
            }
            Ok(())
        });
        if let Err(e) = traversable {
            tracing::error!(error = %e, "pods with their own uids cannot reach their directories");
        }
    }
    let killed = process::kill_leftovers(&pods_dir(&config));
    if killed > 0 {
        tracing::info!(killed, "removed processes left by a previous agent");
    }
    let config = Arc::new(config);
    let mut pods: HashMap<String, Entry> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let start = |pod: Pod, pods: &mut HashMap<String, Entry>| {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let uses = Uses::of(&pod);
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = Worker::new(
            config.clone(),
            store.clone(),
            reporter.clone(),
            stats.clone(),
            pod,
        );
        let done = done_tx.clone();
        tokio::spawn(async move {
            let uid = worker.uid.clone();
            worker.run(rx).await;
            let _ = done.send(uid);
        });
        pods.insert(uid, Entry { tx, uses });
    };
    let resync = |pods: &mut HashMap<String, Entry>,
                  start: &dyn Fn(Pod, &mut HashMap<String, Entry>)| {
        let stored: Vec<Pod> = store
            .list("Pod")
            .unwrap_or_default()
            .iter()
            .filter_map(|o| decode_pod(&o.value))
            .filter(|p| bound_here(p, &config.node))
            .collect();
        let uids: Vec<String> = stored
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        for (uid, entry) in pods.iter() {
            if !uids.contains(uid) {
                let _ = entry.tx.send(Command::Kill);
            }
        }
        for pod in stored {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            match pods.get_mut(&uid) {
                Some(entry) => {
                    entry.uses = Uses::of(&pod);
                    let _ = entry.tx.send(Command::Update(Box::new(pod)));
                    // Changes were missed: any ConfigMap or Secret may have arrived.
                    let _ = entry.tx.send(Command::Refresh);
                }
                None => start(pod, pods),
            }
        }
    };
    resync(&mut pods, &start);
    remove_stale_dirs(&pods_dir(&config), &pods);
    stats.pods.store(pods.len() as u64, Ordering::Relaxed);
    let mut rotation = tokio::time::interval(Duration::from_secs(10));
    rotation.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut indexing = tokio::time::interval(crate::streams::logs::INDEX_INTERVAL);
    indexing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut log_sizes = HashMap::new();
    loop {
        tokio::select! {
            _ = rotation.tick() => rotate_logs(&pods_dir(&config), config.log_limits),
            _ = indexing.tick() => crate::streams::logs::index_logs(&pods_dir(&config), &mut log_sizes, jiff::Timestamp::now()),
            change = changes.recv() => match change {
                Ok(Change::Upserted(o)) if o.kind == "Pod" => {
                    let stored = store.get("Pod", &o.namespace, &o.name).ok().flatten();
                    let Some(pod) = stored.and_then(|s| decode_pod(&s.value)) else { continue };
                    if !bound_here(&pod, &config.node) {
                        if let Some(e) = pods.get(&o.uid) {
                            let _ = e.tx.send(Command::Kill);
                        }
                        continue;
                    }
                    match pods.get_mut(&o.uid) {
                        Some(e) => {
                            e.uses = Uses::of(&pod);
                            let _ = e.tx.send(Command::Update(Box::new(pod)));
                        }
                        None => start(pod, &mut pods),
                    }
                }
                Ok(Change::Upserted(o)) if o.kind == "ConfigMap" || o.kind == "Secret" => {
                    for e in pods.values().filter(|e| e.uses.contains(&o.kind, &o.namespace, &o.name)) {
                        let _ = e.tx.send(Command::Refresh);
                    }
                }
                Ok(Change::Deleted { kind, uid, .. }) if kind == "Pod" => {
                    if let Some(e) = pods.get(&uid) {
                        let _ = e.tx.send(Command::Kill);
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => resync(&mut pods, &start),
                Err(broadcast::error::RecvError::Closed) => break,
            },
            Some(uid) = done_rx.recv() => {
                pods.remove(&uid);
            }
            Some(reply) = control.recv() => {
                for e in pods.values() {
                    let _ = e.tx.send(Command::Stop);
                }
                while !pods.is_empty() {
                    match tokio::time::timeout(Duration::from_secs(10), done_rx.recv()).await {
                        Ok(Some(uid)) => {
                            pods.remove(&uid);
                        }
                        _ => break,
                    }
                }
                stats.pods.store(0, Ordering::Relaxed);
                let _ = reply.send(());
                return;
            }
        }
        stats.pods.store(pods.len() as u64, Ordering::Relaxed);
    }
}

struct Container {
    spec: k8s_openapi::api::core::v1::Container,
    record: Record,
    pid: Option<u32>,
    started: Option<Instant>,
    restart_at: Option<Instant>,
    generation: u64,
}

struct Worker {
    config: Arc<RuntimeConfig>,
    store: EdgeStore,
    reporter: Arc<dyn Reporter>,
    stats: Arc<RuntimeStats>,
    pod: Pod,
    uid: String,
    dir: PathBuf,
    policy: RestartPolicy,
    containers: Vec<Container>,
    start_time: String,
    last_status: Option<Value>,
    prepared: bool,
    warned: HashMap<String, String>,
    config_retry: Duration,
    exits: mpsc::UnboundedSender<(usize, u64, Exit)>,
    exits_rx: Option<mpsc::UnboundedReceiver<(usize, u64, Exit)>>,
    /// The pod's own uid, when pods run under their own users.
    user: Option<UidLease>,
    /// Variables the runtime gives this pod (its local API kubeconfig…).
    pod_env: BTreeMap<String, String>,
}

impl Worker {
    fn new(
        config: Arc<RuntimeConfig>,
        store: EdgeStore,
        reporter: Arc<dyn Reporter>,
        stats: Arc<RuntimeStats>,
        pod: Pod,
    ) -> Self {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let dir = pods_dir(&config).join(format!("{ns}_{name}_{uid}"));
        let spec = pod.spec.clone().unwrap_or_default();
        let containers = spec
            .containers
            .iter()
            .map(|c| Container {
                record: Record::new(&c.name, c.image.as_deref().unwrap_or_default()),
                spec: c.clone(),
                pid: None,
                started: None,
                restart_at: None,
                generation: 0,
            })
            .collect();
        let mut containers: Vec<Container> = containers;
        restore_state(&dir, &mut containers);
        let (exits, exits_rx) = mpsc::unbounded_channel();
        // Kept across agent restarts, as the kubelet keeps it.
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(now);
        Worker {
            policy: RestartPolicy::of(spec.restart_policy.as_deref()),
            config,
            store,
            reporter,
            stats,
            pod,
            uid,
            dir,
            containers,
            start_time,
            last_status: None,
            prepared: false,
            warned: HashMap::new(),
            config_retry: Duration::from_secs(5),
            exits,
            exits_rx: Some(exits_rx),
            user: None,
            pod_env: BTreeMap::new(),
        }
    }

    fn lookup(&self) -> impl Fn(&str, &str, &str) -> Option<Data> + '_ {
        move |kind, ns, name| {
            let obj = self.store.get(kind, ns, name).ok().flatten()?;
            let v: Value = serde_json::from_slice(&obj.value).ok()?;
            let mut out = BTreeMap::new();
            if let Some(data) = v.get("data").and_then(Value::as_object) {
                for (k, val) in data {
                    let text = val.as_str().unwrap_or_default();
                    let bytes = if kind == "Secret" {
                        use base64::Engine;
                        base64::engine::general_purpose::STANDARD
                            .decode(text)
                            .unwrap_or_default()
                    } else {
                        text.as_bytes().to_vec()
                    };
                    out.insert(k.clone(), bytes);
                }
            }
            if let Some(data) = v.get("binaryData").and_then(Value::as_object) {
                use base64::Engine;
                for (k, val) in data {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(val.as_str().unwrap_or_default())
                        .unwrap_or_default();
                    out.insert(k.clone(), bytes);
                }
            }
            Some(out)
        }
    }

    fn report_status(&mut self) {
        let status = supervisor::status(
            &self
                .containers
                .iter()
                .map(|c| c.record.clone())
                .collect::<Vec<_>>(),
            self.policy,
            &self.config.host_ip,
            &self.start_time,
            &now(),
        );
        // Compare without timestamps of conditions: they change on every computation.
        let mut comparable = status.clone();
        if let Some(cs) = comparable
            .pointer_mut("/status/conditions")
            .and_then(Value::as_array_mut)
        {
            for c in cs {
                if let Some(o) = c.as_object_mut() {
                    o.remove("lastTransitionTime");
                }
            }
        }
        if self.last_status.as_ref() == Some(&comparable) {
            return;
        }
        self.last_status = Some(comparable);
        let upstream = Upstream {
            kind: UpstreamKind::Status as i32,
            object: Some(object_ref(&self.pod)),
            payload: status.to_string().into_bytes(),
        };
        if let Err(e) = self.reporter.report(&upstream) {
            tracing::warn!(pod = %self.uid, error = %e, "could not queue the pod status");
        }
    }

    /// Persists restart counts and final terminations, so that a restarted agent neither
    /// reruns a finished container nor forgets its restarts.
    fn save_state(&self) {
        let saved: BTreeMap<&str, Saved> = self
            .containers
            .iter()
            .map(|c| {
                let terminated = match &c.record.state {
                    State::Terminated(e) => Some(e.clone()),
                    _ => None,
                };
                (
                    c.spec.name.as_str(),
                    Saved {
                        restarts: c.record.restarts,
                        last: c.record.last.clone(),
                        terminated,
                    },
                )
            })
            .collect();
        let Ok(text) = serde_json::to_vec(&saved) else {
            return;
        };
        if let Err(e) = write_file(&self.dir.join("state.json"), &text, true) {
            tracing::warn!(pod = %self.uid, error = %e, "could not save the containers' state");
        }
    }

    /// A warning event, unless the same one was the last sent for this container (a config
    /// error retried every few seconds must not flood the outbox).
    fn warn(&mut self, container: Option<&str>, reason: &str, message: &str) {
        let key = container.unwrap_or_default().to_owned();
        let said = format!("{reason}: {message}");
        if self.warned.get(&key) == Some(&said) {
            return;
        }
        self.warned.insert(key, said);
        self.event(container, "Warning", reason, message);
    }

    /// Delay before retrying a configuration error: 5s doubling to 5m.
    fn next_config_retry(&mut self) -> Duration {
        let d = self.config_retry;
        self.config_retry = (d * 2).min(Duration::from_secs(300));
        d
    }

    fn event(&self, container: Option<&str>, type_: &str, reason: &str, message: &str) {
        let pod = object_ref(&self.pod);
        let stamp = now();
        let suffix: u64 = rand::random();
        let mut involved = json!({ "apiVersion": "v1", "kind": "Pod", "name": pod.name,
                                   "namespace": pod.namespace, "uid": pod.uid });
        if let Some(c) = container {
            involved["fieldPath"] = json!(format!("spec.containers{{{c}}}"));
        }
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": { "name": format!("{}.{suffix:016x}", pod.name), "namespace": pod.namespace },
            "involvedObject": involved,
            "reason": reason, "message": message, "type": type_,
            "source": { "component": "sedna-edgecore", "host": self.config.node },
            "reportingComponent": "sedna-edgecore", "reportingInstance": self.config.node,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        });
        let upstream = Upstream {
            kind: UpstreamKind::Event as i32,
            object: Some(pod),
            payload: event.to_string().into_bytes(),
        };
        if let Err(e) = self.reporter.report(&upstream) {
            tracing::warn!(pod = %self.uid, error = %e, "could not queue an event");
        }
    }

    /// Creates the pod directory and its volumes; returns the volumes' directories.
    ///
    /// With per-pod users the pod directory stays the agent's (0711: the pod reaches its
    /// own entries by name, lists nothing), holding the agent's files (state, pid files,
    /// logs) out of the pod's reach; `home/`, each volume and the local API kubeconfig
    /// belong to the pod's uid. ConfigMap and Secret volumes are written afresh each time.
    fn prepare(&mut self) -> Result<BTreeMap<String, PathBuf>, SpecError> {
        spec::check_names(&self.pod)?;
        let plans = spec::volumes(&self.pod, &self.lookup())?;
        let io = |e: std::io::Error| {
            SpecError::CreateContainerConfigError(format!("preparing volumes: {e}"))
        };
        if self.user.is_none()
            && let Some(users) = &self.config.pod_users
        {
            self.user = Some(users.lease(&self.uid).ok_or_else(|| {
                SpecError::CreateContainerConfigError(format!(
                    "every uid of the pod uid range ({users:?}) is taken"
                ))
            })?);
        }
        let owner = self.user.as_ref().map(|u| u.uid);
        create_private_dir(&self.dir).map_err(io)?;
        let traversable = |d: &Path| -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))
        };
        let volumes = self.dir.join("volumes");
        if let Some(uid) = owner {
            traversable(&self.dir).map_err(io)?;
            create_private_dir(&volumes).map_err(io)?;
            traversable(&volumes).map_err(io)?;
            let home = self.dir.join("home");
            create_private_dir(&home).map_err(io)?;
            users::give(&home, uid).map_err(io)?;
            self.pod_env
                .insert("HOME".into(), home.display().to_string());
            self.pod_env
                .insert("SEDNA_POD_DIR".into(), home.display().to_string());
        }
        let mut dirs = BTreeMap::new();
        for (name, plan) in plans {
            let dir = match plan {
                VolumePlan::Host { path, create } => {
                    if create {
                        std::fs::create_dir_all(&path).map_err(io)?;
                    }
                    path
                }
                VolumePlan::Empty => {
                    let d = volumes.join(&name);
                    create_private_dir(&d).map_err(io)?;
                    if let Some(uid) = owner {
                        users::give(&d, uid).map_err(io)?;
                    }
                    d
                }
                VolumePlan::Files { files, private } => {
                    let d = volumes.join(&name);
                    if owner.is_some() && d.exists() {
                        // The pod owned it: start from nothing it may have planted there.
                        std::fs::remove_dir_all(&d).map_err(io)?;
                    }
                    create_private_dir(&d).map_err(io)?;
                    for (file, content) in files {
                        if file.contains("..") || file.starts_with('/') {
                            continue;
                        }
                        write_file(&d.join(&file), &content, private).map_err(io)?;
                    }
                    if let Some(uid) = owner {
                        users::give_tree(&d, uid).map_err(io)?;
                    }
                    d
                }
            };
            dirs.insert(name, dir);
        }
        if let Some(api) = &self.config.pod_api {
            let path = self.dir.join("local-api.kubeconfig");
            let identity = PodIdentity {
                namespace: self
                    .pod
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                name: self.pod.metadata.name.clone().unwrap_or_default(),
                uid: self.uid.clone(),
            };
            sedna_apiserver::pki::write_private(&path, api.kubeconfig(&identity)).map_err(|e| {
                SpecError::CreateContainerConfigError(format!(
                    "writing the pod's local API kubeconfig: {e}"
                ))
            })?;
            if let Some(uid) = owner {
                users::give(&path, uid).map_err(io)?;
            }
            self.pod_env
                .insert("SEDNA_LOCAL_KUBECONFIG".into(), path.display().to_string());
        }
        Ok(dirs)
    }

    fn start_container(&mut self, i: usize, volume_dirs: &BTreeMap<String, PathBuf>) {
        let launch = {
            let c = &self.containers[i];
            spec::launch(
                &self.pod,
                &c.spec,
                &self.config.node,
                &self.config.host_ip,
                &self.dir,
                volume_dirs,
                &self.config.program_dirs,
                &self.lookup(),
            )
        };
        let launch = match launch {
            Ok(mut l) => {
                for (name, value) in self.pod_env.iter().chain(&self.config.node_env) {
                    l.env.entry(name.clone()).or_insert_with(|| value.clone());
                }
                if let Some(user) = &self.user {
                    l.run_as = Some(user.uid);
                    if self.containers[i].spec.working_dir.is_none() {
                        l.working_dir = self.dir.join("home");
                    }
                    // The runtime's own values: a pod's env cannot point them elsewhere.
                    for key in ["HOME", "SEDNA_POD_DIR"] {
                        if let Some(v) = self.pod_env.get(key) {
                            l.env.insert(key.into(), v.clone());
                        }
                    }
                }
                l
            }
            Err(e) => {
                let name = self.containers[i].spec.name.clone();
                self.containers[i].record.state = State::Waiting {
                    reason: e.reason().into(),
                    message: e.to_string(),
                };
                self.warn(Some(&name), "Failed", &e.to_string());
                return;
            }
        };
        let log = crate::streams::logs::log_path(&self.dir, &launch.name, false);
        if std::fs::metadata(&log).is_ok_and(|m| m.len() > 0) {
            // What `kubectl logs --previous` shows.
            crate::streams::logs::keep_as_previous(&self.dir, &launch.name);
        }
        // What `kubectl exec` runs commands in.
        match serde_json::to_vec(&launch) {
            Ok(context) => {
                let path = crate::streams::exec_context_path(&self.dir, &launch.name);
                if let Err(e) = sedna_apiserver::pki::write_private(&path, context) {
                    tracing::warn!(path = %path.display(), error = %e, "could not keep the exec context");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode the exec context"),
        }
        let pid_file = self.dir.join(format!("{}.pid", launch.name));
        match process::spawn(&launch, &log, &pid_file, self.config.log_limits) {
            Ok(mut child) => {
                let pid = child.id().unwrap_or_default();
                let limit_name = format!("{}_{}", self.uid, launch.name);
                process::apply_limits(
                    pid,
                    &limit_name,
                    launch.memory_limit,
                    launch.cpu_limit_millis,
                );
                let c = &mut self.containers[i];
                c.generation += 1;
                let generation = c.generation;
                let started_at = now();
                c.pid = Some(pid);
                c.started = Some(Instant::now());
                c.record.state = State::Running {
                    started_at: started_at.clone(),
                    pid,
                };
                self.stats.running.fetch_add(1, Ordering::Relaxed);
                let exits = self.exits.clone();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    use std::os::unix::process::ExitStatusExt;
                    let (code, signal) = match status {
                        Ok(s) => match (s.code(), s.signal()) {
                            (Some(c), _) => (c, None),
                            (None, Some(sig)) => (128 + sig, Some(sig)),
                            _ => (-1, None),
                        },
                        Err(_) => (-1, None),
                    };
                    let reason = if code == 0 {
                        "Completed"
                    } else if signal == Some(9) {
                        "Killed"
                    } else {
                        "Error"
                    };
                    let _ = exits.send((
                        i,
                        generation,
                        Exit {
                            code,
                            signal,
                            reason: reason.into(),
                            started_at,
                            finished_at: now(),
                        },
                    ));
                });
                let name = launch.name.clone();
                self.event(
                    Some(&name),
                    "Normal",
                    "Started",
                    &format!("Started container {name} (pid {pid})"),
                );
            }
            Err(e) => {
                let name = self.containers[i].spec.name.clone();
                let message = format!("starting {}: {e}", launch.program.display());
                self.containers[i].record.state = State::Waiting {
                    reason: "RunContainerError".into(),
                    message: message.clone(),
                };
                self.warn(Some(&name), "Failed", &message);
            }
        }
    }

    fn deleting(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    /// SIGTERM every running container, wait up to the grace period, then SIGKILL.
    async fn stop_all(
        &mut self,
        grace: Duration,
        exits: &mut mpsc::UnboundedReceiver<(usize, u64, Exit)>,
    ) {
        let running: Vec<(usize, u32)> = self
            .containers
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c.record.state {
                State::Running { pid, .. } => Some((i, pid)),
                _ => None,
            })
            .collect();
        for (i, pid) in &running {
            let name = self.containers[*i].spec.name.clone();
            self.event(
                Some(&name),
                "Normal",
                "Killing",
                &format!("Stopping container {name}"),
            );
            process::signal(*pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        let mut left = running.len();
        while left > 0 {
            match tokio::time::timeout_at(deadline, exits.recv()).await {
                Ok(Some((i, generation, exit))) => {
                    if self.containers[i].generation == generation {
                        self.containers[i].record.state = State::Terminated(exit);
                        self.containers[i].pid = None;
                        self.stats.running.fetch_sub(1, Ordering::Relaxed);
                        left -= 1;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    for (_, pid) in &running {
                        process::signal(*pid, Signal::SIGKILL);
                    }
                    // Collect the exits of the killed processes.
                    while left > 0 {
                        match tokio::time::timeout(Duration::from_secs(5), exits.recv()).await {
                            Ok(Some((i, generation, exit)))
                                if self.containers[i].generation == generation =>
                            {
                                self.containers[i].record.state = State::Terminated(exit);
                                self.containers[i].pid = None;
                                self.stats.running.fetch_sub(1, Ordering::Relaxed);
                                left -= 1;
                            }
                            Ok(Some(_)) => {}
                            _ => break,
                        }
                    }
                    break;
                }
            }
        }
        for c in &mut self.containers {
            c.restart_at = None;
            if !matches!(c.record.state, State::Terminated(_)) {
                c.record.state = State::Terminated(Exit {
                    code: 0,
                    signal: None,
                    reason: "Completed".into(),
                    started_at: self.start_time.clone(),
                    finished_at: now(),
                });
            }
            process::remove_limits(&format!("{}_{}", self.uid, c.spec.name));
        }
    }

    fn grace(&self) -> Duration {
        let seconds = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(seconds.clamp(0, 3600) as u64)
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let Some(mut exits) = self.exits_rx.take() else {
            return;
        };
        let mut volume_dirs = BTreeMap::new();
        let mut retry_prepare: Option<Instant> = Some(Instant::now());
        loop {
            if self.deleting() {
                let grace = self.grace();
                self.stop_all(grace, &mut exits).await;
                self.report_status();
                let confirm = Upstream {
                    kind: UpstreamKind::PodStopped as i32,
                    object: Some(object_ref(&self.pod)),
                    payload: vec![],
                };
                if let Err(e) = self.reporter.report(&confirm) {
                    tracing::warn!(pod = %self.uid, error = %e, "could not queue the deletion");
                }
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            if retry_prepare.is_some_and(|at| Instant::now() >= at) {
                retry_prepare = None;
                match self.prepare() {
                    Ok(dirs) => {
                        volume_dirs = dirs;
                        self.prepared = true;
                        for i in 0..self.containers.len() {
                            if !matches!(
                                self.containers[i].record.state,
                                State::Running { .. } | State::Terminated(_)
                            ) {
                                self.start_container(i, &volume_dirs);
                            }
                        }
                    }
                    Err(e) => {
                        for c in &mut self.containers {
                            c.record.state = State::Waiting {
                                reason: e.reason().into(),
                                message: e.to_string(),
                            };
                        }
                        self.warn(None, "FailedMount", &e.to_string());
                        retry_prepare = Some(Instant::now() + self.next_config_retry());
                    }
                }
                // Containers that failed to start wait for a retry as well.
                if self.prepared
                    && self.containers.iter().any(|c| matches!(&c.record.state, State::Waiting { reason, .. } if reason != "CrashLoopBackOff"))
                {
                    retry_prepare = Some(Instant::now() + self.next_config_retry());
                } else if retry_prepare.is_none() {
                    self.config_retry = Duration::from_secs(5);
                }
            }
            self.report_status();
            let next_restart = self.containers.iter().filter_map(|c| c.restart_at).min();
            let wake = [next_restart, retry_prepare].into_iter().flatten().min();
            tokio::select! {
                exit = exits.recv() => {
                    let Some((i, generation, exit)) = exit else { return };
                    if self.containers[i].generation != generation {
                        continue;
                    }
                    self.stats.running.fetch_sub(1, Ordering::Relaxed);
                    let ran_for = self.containers[i].started.map(|s| s.elapsed()).unwrap_or_default();
                    let c = &mut self.containers[i];
                    c.pid = None;
                    let (decision, restarts) = supervisor::after_exit(self.policy, exit.code, c.record.restarts, ran_for, self.config.backoff);
                    match decision {
                        Decision::Restart(delay) => {
                            let name = c.spec.name.clone();
                            let message = format!("back-off {} restarting failed container={name} pod={}", human(delay), self.pod.metadata.name.as_deref().unwrap_or_default());
                            c.record.last = Some(exit.clone());
                            c.record.restarts = restarts;
                            c.record.state = State::Waiting { reason: "CrashLoopBackOff".into(), message: message.clone() };
                            c.restart_at = Some(Instant::now() + delay);
                            self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                            self.event(Some(&name), "Warning", "BackOff", &format!("Back-off restarting failed container {name} (exit code {}): {message}", exit.code));
                        }
                        Decision::Stay => {
                            c.record.state = State::Terminated(exit);
                        }
                    }
                    self.save_state();
                }
                _ = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let due: Vec<usize> = self.containers.iter().enumerate()
                        .filter(|(_, c)| c.restart_at.is_some_and(|at| Instant::now() >= at))
                        .map(|(i, _)| i)
                        .collect();
                    for i in due {
                        self.containers[i].restart_at = None;
                        self.start_container(i, &volume_dirs);
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Update(pod)) => self.pod = *pod,
                    Some(Command::Refresh) => {
                        if retry_prepare.is_some() {
                            retry_prepare = Some(Instant::now());
                        }
                    }
                    // The runtime went away (agent shutting down): leave the processes
                    // running; the next agent replaces them.
                    None => return,
                    Some(Command::Stop) => {
                        self.stop_all(Duration::from_secs(5), &mut exits).await;
                        return;
                    }
                    Some(Command::Kill) => {
                        self.stop_all(Duration::from_secs(2), &mut exits).await;
                        let _ = std::fs::remove_dir_all(&self.dir);
                        return;
                    }
                },
            }
        }
    }
}

/// Rotates every container log under the pods directory that outgrew its limit.
fn rotate_logs(dir: &Path, limits: LogLimits) {
    let Ok(pods) = std::fs::read_dir(dir) else {
        return;
    };
    for pod in pods.flatten() {
        let Ok(logs) = std::fs::read_dir(pod.path().join("logs")) else {
            continue;
        };
        for log in logs.flatten() {
            let path = log.path();
            if path.extension().is_some_and(|e| e == "log")
                && let Err(e) = process::rotate_if_needed(&path, limits)
            {
                tracing::warn!(log = %path.display(), error = %e, "could not rotate a container log");
            }
        }
    }
}

/// What survives an agent restart of a container's record.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    restarts: u32,
    last: Option<Exit>,
    terminated: Option<Exit>,
}

fn restore_state(dir: &Path, containers: &mut [Container]) {
    let Ok(text) = std::fs::read(dir.join("state.json")) else {
        return;
    };
    let Ok(mut saved) = serde_json::from_slice::<BTreeMap<String, Saved>>(&text) else {
        tracing::warn!(dir = %dir.display(), "ignoring an unreadable state.json");
        return;
    };
    for c in containers {
        if let Some(s) = saved.remove(&c.spec.name) {
            c.record.restarts = s.restarts;
            c.record.last = s.last;
            if let Some(exit) = s.terminated {
                c.record.state = State::Terminated(exit);
            }
        }
    }
}

/// Removes the directories of pods that are no longer in the store (deleted while the agent
/// was down); their processes were killed as leftovers.
fn remove_stale_dirs(dir: &Path, pods: &HashMap<String, Entry>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let uid = name.rsplit('_').next().unwrap_or_default();
        if !pods.contains_key(uid) {
            tracing::info!(dir = %e.path().display(), "removing the directory of a deleted pod");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `10s`, `2m40s`, `250ms`, as the kubelet writes back-off delays.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match (s / 60, s % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s}s"),
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn write_file(path: &Path, content: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A directory that exists keeps its mode: the pod directory is made traversable for pods
    // with their own uids, and saving the pod's state must not close it again.
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        create_private_dir(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)?;
    f.write_all(content)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_config_change_concerns_only_the_pods_that_read_it() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": "p", "namespace": "shop", "uid": "u" },
            "spec": {
                "containers": [{ "name": "c", "image": "sh",
                    "env": [{ "name": "A", "valueFrom": { "configMapKeyRef": { "name": "cfg", "key": "a" } } }],
                    "envFrom": [{ "secretRef": { "name": "creds" } }] }],
                "volumes": [{ "name": "v", "configMap": { "name": "files" } }]
            }
        }))
        .unwrap();
        let uses = Uses::of(&pod);
        assert!(uses.contains("ConfigMap", "shop", "cfg"));
        assert!(uses.contains("ConfigMap", "shop", "files"));
        assert!(uses.contains("Secret", "shop", "creds"));
        assert!(!uses.contains("ConfigMap", "shop", "other"), "another name");
        assert!(!uses.contains("Secret", "shop", "cfg"), "another kind");
        assert!(
            !uses.contains("ConfigMap", "default", "cfg"),
            "another namespace"
        );
        let bare: Pod = serde_json::from_value(json!({ "metadata": { "name": "b" } })).unwrap();
        assert_eq!(Uses::of(&bare).namespace, "default");
        assert!(Uses::of(&bare).objects.is_empty());
    }

    #[test]
    fn saving_state_keeps_a_traversable_pod_directory_traversable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pod = dir.path().join("default_p_u1");
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::set_permissions(&pod, std::fs::Permissions::from_mode(0o711)).unwrap();
        write_file(&pod.join("state.json"), b"{}", true).unwrap();
        let mode = std::fs::metadata(&pod).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o711);
        // A directory that does not exist yet is created private.
        write_file(&pod.join("volumes/v/f"), b"x", true).unwrap();
        let mode = std::fs::metadata(pod.join("volumes/v"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[derive(Default)]
    struct Collect(Mutex<Vec<Upstream>>);

    impl Reporter for Collect {
        fn report(&self, upstream: &Upstream) -> Result<u64, StoreError> {
            let mut v = self.0.lock().unwrap();
            v.push(upstream.clone());
            Ok(v.len() as u64)
        }
    }

    impl Collect {
        fn statuses(&self) -> Vec<Value> {
            self.of(UpstreamKind::Status)
        }
        fn of(&self, kind: UpstreamKind) -> Vec<Value> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter(|u| u.kind == kind as i32)
                .map(|u| serde_json::from_slice(&u.payload).unwrap_or(Value::Null))
                .collect()
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        config: RuntimeConfig,
        store: EdgeStore,
        changes: broadcast::Sender<Change>,
        reporter: Arc<Collect>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = EdgeStore::open(&dir.path().join("store.db"), 1000, 1 << 20).unwrap();
        let config = RuntimeConfig {
            node: "edge-1".into(),
            data_dir: dir.path().to_owned(),
            host_ip: "192.0.2.7".into(),
            backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_millis(400),
                reset_after: Duration::from_secs(600),
            },
            program_dirs: vec![],
            log_limits: LogLimits::default(),
            node_env: BTreeMap::new(),
            pod_api: None,
            pod_users: None,
        };
        Fixture {
            _dir: dir,
            config,
            store,
            changes: broadcast::channel(64).0,
            reporter: Arc::default(),
        }
    }

    impl Fixture {
        fn start(&self) -> Runtime {
            Runtime::start(
                self.config.clone(),
                self.store.clone(),
                self.changes.subscribe(),
                self.reporter.clone(),
            )
        }

        fn put(&self, pod: &Value, rv: u64) {
            let object = ObjectRef {
                api_version: "v1".into(),
                kind: "Pod".into(),
                namespace: "default".into(),
                name: pod["metadata"]["name"].as_str().unwrap().into(),
                uid: pod["metadata"]["uid"].as_str().unwrap().into(),
            };
            let change = self
                .store
                .upsert(&object, rv, pod.to_string().as_bytes())
                .unwrap();
            if let Some(c) = change {
                let _ = self.changes.send(c);
            }
        }

        fn pid(&self, pod: &str, uid: &str, container: &str) -> Option<i32> {
            let file = self
                .config
                .data_dir
                .join("pods")
                .join(format!("default_{pod}_{uid}"))
                .join(format!("{container}.pid"));
            std::fs::read_to_string(file)
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        }
    }

    fn pod(name: &str, uid: &str, script: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "default", "uid": uid },
            "spec": {
                "nodeName": "edge-1",
                "terminationGracePeriodSeconds": 1,
                "containers": [{ "name": "main", "image": "sh", "command": ["sh", "-c", script] }]
            }
        })
    }

    fn alive(pid: i32) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    }

    async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_bound_pod_runs_reports_running_and_stops_when_deleted() {
        let f = fixture();
        let runtime = f.start();
        f.put(&pod("web", "u1", "echo hello; exec sleep 60"), 1);
        let status = until("Running", || {
            f.reporter
                .statuses()
                .into_iter()
                .find(|s| s["status"]["phase"] == "Running")
        })
        .await;
        assert_eq!(status["status"]["podIP"], "192.0.2.7");
        assert_eq!(
            status["status"]["containerStatuses"][0]["ready"],
            json!(true)
        );
        let pid = until("the pid file", || f.pid("web", "u1", "main")).await;
        assert!(alive(pid));
        assert_eq!(runtime.stats().running.load(Ordering::Relaxed), 1);

        let mut deleting = pod("web", "u1", "echo hello; exec sleep 60");
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        deleting["metadata"]["deletionGracePeriodSeconds"] = json!(1);
        f.put(&deleting, 2);
        until("the deletion to be confirmed", || {
            (!f.reporter.of(UpstreamKind::PodStopped).is_empty()).then_some(())
        })
        .await;
        assert!(!alive(pid), "the process outlived its pod");
        assert_eq!(runtime.stats().running.load(Ordering::Relaxed), 0);
        runtime.abort();
    }

    #[tokio::test]
    async fn a_pod_whose_change_was_overrun_in_the_change_buffer_still_runs() {
        let f = fixture();
        let runtime = f.start();
        // Let the runtime read the (empty) store and wait for changes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A burst larger than the buffer before the runtime reads again (this test's runtime
        // is single-threaded: nothing runs until the test awaits): the pod's own change is
        // overwritten and the runtime learns only that it lagged.
        f.put(&pod("burst", "u9", "exec sleep 60"), 1);
        for i in 0..100u64 {
            let object = ObjectRef {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: "default".into(),
                name: format!("cm-{i}"),
                uid: format!("cm-uid-{i}"),
            };
            let value = json!({ "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": { "name": object.name, "namespace": "default", "uid": object.uid } });
            if let Some(c) = f
                .store
                .upsert(&object, 10 + i, value.to_string().as_bytes())
                .unwrap()
            {
                let _ = f.changes.send(c);
            }
        }
        until(
            "the pod Running after the runtime re-read the store",
            || {
                f.reporter
                    .statuses()
                    .into_iter()
                    .find(|s| s["status"]["phase"] == "Running")
            },
        )
        .await;
        assert!(f.pid("burst", "u9", "main").is_some_and(alive));
        runtime.abort();
    }

    #[tokio::test]
    async fn a_crashing_container_backs_off_and_says_why() {
        let f = fixture();
        let runtime = f.start();
        f.put(&pod("crash", "u2", "echo boom >&2; exit 3"), 1);
        let status = until("three restarts", || {
            f.reporter.statuses().into_iter().find(|s| {
                s["status"]["containerStatuses"][0]["restartCount"]
                    .as_u64()
                    .is_some_and(|n| n >= 3)
            })
        })
        .await;
        let c = &status["status"]["containerStatuses"][0];
        assert_eq!(c["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(c["lastState"]["terminated"]["exitCode"], 3);
        let backoffs: Vec<String> = f
            .reporter
            .of(UpstreamKind::Event)
            .into_iter()
            .filter(|e| e["reason"] == "BackOff")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert!(backoffs[0].contains("back-off 100ms"), "{backoffs:?}");
        assert!(backoffs[1].contains("back-off 200ms"), "{backoffs:?}");
        assert!(backoffs[2].contains("back-off 400ms"), "{backoffs:?}");
        assert!(backoffs[0].contains("exit code 3"), "{backoffs:?}");
        assert!(runtime.stats().restarts.load(Ordering::Relaxed) >= 3);
        runtime.abort();
    }

    #[tokio::test]
    async fn a_finished_container_is_not_rerun_by_a_restarted_runtime() {
        let f = fixture();
        let mut once = pod(
            "once",
            "u5",
            "echo ran >> \"$SEDNA_POD_DIR/../runs\"; exit 0",
        );
        once["spec"]["restartPolicy"] = json!("Never");
        let first = f.start();
        f.put(&once, 1);
        until("Succeeded", || {
            f.reporter
                .statuses()
                .into_iter()
                .find(|s| s["status"]["phase"] == "Succeeded")
        })
        .await;
        first.abort();
        f.reporter.0.lock().unwrap().clear();
        let second = f.start();
        let status = until("the restored status", || f.reporter.statuses().pop()).await;
        assert_eq!(status["status"]["phase"], "Succeeded");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let runs = std::fs::read_to_string(f.config.data_dir.join("pods/runs")).unwrap();
        assert_eq!(runs.lines().count(), 1, "the container ran again");
        second.abort();
    }

    #[tokio::test]
    async fn a_restarted_runtime_replaces_the_processes_it_left_and_forgets_deleted_pods() {
        let f = fixture();
        let first = f.start();
        f.put(&pod("keep", "u3", "exec sleep 60"), 1);
        f.put(&pod("gone", "u4", "exec sleep 60"), 1);
        let old_keep = until("keep's pid", || f.pid("keep", "u3", "main")).await;
        let old_gone = until("gone's pid", || f.pid("gone", "u4", "main")).await;
        first.abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            alive(old_keep),
            "aborting the runtime must not stop workloads"
        );
        // While the agent was down, the cloud deleted one pod.
        f.store.delete("u4", 2).unwrap();

        let second = f.start();
        let new_keep = until("a new pid for keep", || {
            f.pid("keep", "u3", "main").filter(|p| *p != old_keep)
        })
        .await;
        assert!(alive(new_keep));
        assert!(
            !f.config.data_dir.join("pods/default_gone_u4").exists(),
            "the deleted pod's directory was kept"
        );
        until("the leftovers to die", || {
            (!alive(old_keep) && !alive(old_gone)).then_some(())
        })
        .await;
        second.abort();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(new_keep), Signal::SIGKILL).ok();
    }
}
