//! The device manager: runs a mapper for every Device bound to this node, restarts it with
//! growing, jittered back-off when it fails, stops it when the Device goes, and sends the
//! devices' twins upstream through the outbox, coalesced (see [`twin`]).
//!
//! - [`spec`]: a Device and its DeviceModel resolved into what a mapper runs (checked first;
//!   a bad setting is a Warning event on the Device naming the field, and state `unhealthy`).
//! - [`modbus`], [`mqtt`], [`camera`]: the built-in mappers.
//! - [`external`]: mappers written by users, any protocol, over gRPC (`proto/mapper.proto`).
//! - [`twin`]: the latest value per property, sent at most once per device per interval.
//! - [`capture`]: readings recorded as CSV rows, camera frames as files, into a Dataset on the
//!   node, bounded.
//!
//! The manager works from the local store, so devices keep being read while the hub is away;
//! their latest values wait in the outbox as one snapshot per device (a newer one replaces a
//! queued one), however long the node is offline.

pub mod camera;
pub mod capture;
pub mod external;
pub mod modbus;
pub mod mqtt;
pub mod spec;
pub mod twin;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use sedna_api::devices::{Device, DeviceModel};
use sedna_proto::channel::{ObjectRef, Upstream, upstream::Kind as UpstreamKind};
use serde_json::json;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::runtime::Reporter;
use crate::runtime::supervisor::Backoff;
use crate::store::{Change, EdgeStore};
use spec::{MapperSpec, Protocol, SpecError};
use twin::{Coalescer, LiveTwins};

/// The most devices one node runs mappers for; more are reported `unhealthy`.
pub const MAX_DEVICES: usize = 1000;

/// The most readings taken from one device per second (a property polled every 100 ms, a
/// sensor publishing at 10 Hz, are far below); the excess is dropped, and said once.
pub const MAX_READINGS_PER_SECOND: u32 = 200;

/// Readings admitted per one-second window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    per_second: u32,
    window: Option<Instant>,
    taken: u32,
    /// Readings dropped so far.
    pub dropped: u64,
}

impl RateLimit {
    /// At most `per_second` readings per second.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: None,
            taken: 0,
            dropped: 0,
        }
    }

    /// Whether a reading at `now` is admitted.
    pub fn admit(&mut self, now: Instant) -> bool {
        if self
            .window
            .is_none_or(|start| now >= start + Duration::from_secs(1))
        {
            self.window = Some(now);
            self.taken = 0;
        }
        if self.taken < self.per_second {
            self.taken += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

/// Device manager settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicesConfig {
    /// At most one twin write per device per this interval (zero: one per change).
    pub report_interval: Duration,
    /// Restart back-off of failed mappers (jittered, see [`restart_delay`]).
    pub restarts: Backoff,
    /// Captured readings are written only below this directory.
    pub capture_dir: std::path::PathBuf,
    /// Where users' mappers connect ([`external`]; `None`: not served).
    pub mapper_socket: Option<std::path::PathBuf>,
}

impl DevicesConfig {
    /// Defaults, capturing below `capture_dir`.
    pub fn new(capture_dir: impl Into<std::path::PathBuf>) -> Self {
        Self {
            report_interval: Duration::from_secs(10),
            restarts: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(60),
                reset_after: Duration::from_secs(60),
            },
            capture_dir: capture_dir.into(),
            mapper_socket: None,
        }
    }
}

/// The delay before restarting a mapper that failed `failures` times in a row after running
/// `ran_for`: the back-off's delay (doubling, reset by a long run), drawn between half and all
/// of it so that devices that failed together do not return together; and the new count.
pub fn restart_delay(
    backoff: &Backoff,
    failures: u32,
    ran_for: Duration,
    rng: &mut rand::rngs::SmallRng,
) -> (Duration, u32) {
    let failures = if ran_for >= backoff.reset_after {
        0
    } else {
        failures
    };
    let full = backoff.delay(failures, Duration::ZERO);
    let half = full / 2;
    let jitter = rng.random_range(0..=half.as_millis() as u64);
    (half + Duration::from_millis(jitter), failures + 1)
}

/// Why a mapper stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapperError {
    /// The device (or its broker) could not be reached or stopped answering; retried.
    #[error("{0}")]
    Unreachable(String),
    /// The manager is gone (the agent is stopping).
    #[error("the device manager stopped")]
    Stopped,
    /// No mapper serves the device's protocol (yet); retried, and at once when one registers.
    #[error(
        "no mapper serves protocol {0:?} (built in: modbus, mqtt, camera; a mapper of your own \
         registers on the agent's mapper socket, see proto/mapper.proto)"
    )]
    NoMapper(String),
}

impl MapperError {
    /// Whether starting the mapper again may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MapperError::Unreachable(_) | MapperError::NoMapper(_))
    }
}

/// What a mapper tells the manager.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Reading {
    /// The device's state (`online`).
    State(&'static str),
    /// A property's value.
    Reported { property: String, value: String },
    /// A desired value was written to the device.
    Applied { property: String, value: String },
    /// A property could not be read or written.
    Failed { property: String, message: String },
    /// A camera frame, encoded as its device's format says.
    Frame(Vec<u8>),
    /// The device is not online (`offline`, `unhealthy`), and why.
    Down {
        state: &'static str,
        message: String,
    },
}

/// A mapper's side of the manager: where readings go, and the desired values.
pub(crate) struct MapperIo {
    uid: String,
    generation: u64,
    readings: mpsc::Sender<Message>,
    pub(crate) desired: watch::Receiver<BTreeMap<String, String>>,
}

impl MapperIo {
    pub(crate) async fn send(&self, reading: Reading) -> Result<(), MapperError> {
        self.readings
            .send((self.uid.clone(), self.generation, reading))
            .await
            .map_err(|_| MapperError::Stopped)
    }
}

async fn run_mapper(
    spec: Arc<MapperSpec>,
    mut io: MapperIo,
    mappers: external::Mappers,
) -> Result<(), MapperError> {
    match spec.protocol {
        Protocol::Modbus { .. } => modbus::run(&spec, &mut io).await,
        Protocol::Mqtt { .. } => mqtt::run(&spec, &mut io).await,
        Protocol::Camera { .. } => camera::run(&spec, &mut io).await,
        Protocol::External { .. } => external::run(&spec, &mut io, &mappers).await,
    }
}

/// One device the manager knows.
struct Managed {
    object: ObjectRef,
    spec: Result<Arc<MapperSpec>, SpecError>,
    report_to_cloud: std::collections::BTreeSet<String>,
    generation: u64,
    task: Option<tokio::task::JoinHandle<()>>,
    started: Instant,
    restart_at: Option<Instant>,
    failures: u32,
    desired: watch::Sender<BTreeMap<String, String>>,
    /// The last warning said per subject, so a repeated failure is one event.
    warned: HashMap<String, String>,
    /// Where readings are recorded, if anywhere.
    recorder: Option<capture::Recorder>,
    /// Where a camera's frames are recorded, if anywhere.
    frames: Option<capture::FrameRecorder>,
    /// Readings taken from the device per second.
    limit: RateLimit,
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The manager's shell: reacts to store changes, mapper readings and exits, and flushes twins.
pub async fn run(
    node: String,
    store: EdgeStore,
    mut changes: broadcast::Receiver<Change>,
    reporter: Arc<dyn Reporter>,
    config: DevicesConfig,
    mappers: external::Mappers,
    live: LiveTwins,
) {
    let mut registered = mappers.subscribe();
    let mut manager = Manager {
        mappers,
        node,
        store,
        reporter,
        twins: Twins {
            cloud: Coalescer::new(config.report_interval),
            local: Coalescer::new(twin::LOCAL_INTERVAL),
            live,
        },
        config,
        devices: HashMap::new(),
        readings: mpsc::channel(1024),
        exits: mpsc::unbounded_channel(),
        next_generation: 0,
        rng: rand::SeedableRng::seed_from_u64(rand::random()),
        recording: Default::default(),
    };
    manager.reconcile();
    loop {
        let wake = [
            manager.twins.next_due(),
            manager.devices.values().filter_map(|d| d.restart_at).min(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let mut dirty = false;
        tokio::select! {
            change = changes.recv() => match change {
                Ok(Change::Upserted(id)) => dirty = WATCHED.contains(&id.kind.as_str()),
                Ok(Change::Deleted { kind, .. }) => dirty = WATCHED.contains(&kind.as_str()),
                Err(broadcast::error::RecvError::Lagged(_)) => dirty = true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            Some((uid, generation, reading)) = manager.readings.1.recv() => {
                manager.reading(&uid, generation, reading);
                // Whatever else is waiting, before the bookkeeping below.
                for _ in 0..1024 {
                    let Ok((uid, generation, reading)) = manager.readings.1.try_recv() else {
                        break;
                    };
                    manager.reading(&uid, generation, reading);
                }
            }
            Some((uid, generation, result)) = manager.exits.1.recv() => {
                manager.exited(&uid, generation, result);
            }
            Ok(()) = registered.changed() => manager.mappers_changed(),
            _ = tokio::time::sleep_until(wake) => {}
        }
        if dirty {
            manager.reconcile();
        }
        manager.restart_due();
        manager.flush();
    }
}

/// The devices' twins, coalesced for the cloud (at the report interval) and for the node's
/// local API (at [`twin::LOCAL_INTERVAL`]), which shows them through `live`.
struct Twins {
    cloud: Coalescer,
    local: Coalescer,
    live: LiveTwins,
}

impl Twins {
    fn report(&mut self, uid: &str, property: &str, value: &str, at: &str) {
        self.cloud.report(uid, property, value, at);
        self.local.report(uid, property, value, at);
    }

    fn applied(&mut self, uid: &str, property: &str, value: &str, at: &str) {
        self.cloud.applied(uid, property, value, at);
        self.local.applied(uid, property, value, at);
    }

    fn state(&mut self, uid: &str, state: &str, at: &str) {
        self.cloud.state(uid, state, at);
        self.local.state(uid, state, at);
    }

    fn forget(&mut self, uid: &str) {
        self.cloud.forget(uid);
        self.local.forget(uid);
    }

    fn next_due(&self) -> Option<Instant> {
        self.cloud
            .next_due()
            .into_iter()
            .chain(self.local.next_due())
            .min()
    }
}

/// A mapper's exit: device uid, mapper generation, result.
type Exit = (String, u64, Result<(), MapperError>);
/// The kinds whose changes the manager reacts to.
const WATCHED: [&str; 3] = ["Device", "DeviceModel", "Dataset"];
/// A mapper's reading: device uid, mapper generation, reading.
type Message = (String, u64, Reading);

struct Manager {
    mappers: external::Mappers,
    node: String,
    store: EdgeStore,
    reporter: Arc<dyn Reporter>,
    config: DevicesConfig,
    devices: HashMap<String, Managed>,
    twins: Twins,
    readings: (mpsc::Sender<Message>, mpsc::Receiver<Message>),
    exits: (mpsc::UnboundedSender<Exit>, mpsc::UnboundedReceiver<Exit>),
    next_generation: u64,
    rng: rand::rngs::SmallRng,
    /// Devices with rows waiting to be written.
    recording: std::collections::HashSet<String>,
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

impl Manager {
    /// Brings the running mappers in line with the Devices bound to this node.
    fn reconcile(&mut self) {
        let Ok(stored) = self.store.list("Device") else {
            return;
        };
        let mut seen = std::collections::HashSet::new();
        for object in stored {
            let Ok(device) = serde_json::from_slice::<Device>(&object.value) else {
                continue;
            };
            if device.spec.node_name.as_deref() != Some(self.node.as_str()) {
                continue;
            }
            seen.insert(object.uid.clone());
            let model = self
                .store
                .get(
                    "DeviceModel",
                    &object.namespace,
                    &device.spec.device_model_ref.name,
                )
                .ok()
                .flatten()
                .and_then(|m| serde_json::from_slice::<DeviceModel>(&m.value).ok());
            let spec = if seen.len() > MAX_DEVICES {
                Err(SpecError {
                    device: format!("{}/{}", object.namespace, object.name),
                    message: format!("this node runs at most {MAX_DEVICES} devices"),
                })
            } else {
                spec::resolve(&device, model.as_ref()).map(Arc::new)
            };
            let dataset = device.spec.capture.as_ref().and_then(|c| {
                let d = self
                    .store
                    .get("Dataset", &object.namespace, &c.dataset)
                    .ok()
                    .flatten()?;
                serde_json::from_slice::<sedna_api::dataset::Dataset>(&d.value).ok()
            });
            let camera = matches!(
                spec.as_ref().map(|s| &s.protocol),
                Ok(Protocol::Camera { .. })
            );
            let capture_plan = capture::plan(
                &device,
                dataset.as_ref(),
                &self.node,
                &self.config.capture_dir,
                camera,
            );
            let desired = spec::desired(&device);
            let report_to_cloud = device
                .spec
                .properties
                .iter()
                .filter(|p| p.report_to_cloud)
                .map(|p| p.name.clone())
                .collect();
            let object_ref = ObjectRef {
                api_version: object.api_version.clone(),
                kind: object.kind.clone(),
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                uid: object.uid.clone(),
            };
            match self.devices.get_mut(&object.uid) {
                Some(d) if d.spec == spec => {
                    d.report_to_cloud = report_to_cloud;
                    d.desired.send_if_modified(|old| {
                        let changed = *old != desired;
                        *old = desired;
                        changed
                    });
                    self.capture(&object.uid, capture_plan);
                }
                _ => {
                    let (tx, _) = watch::channel(desired);
                    let managed = Managed {
                        object: object_ref,
                        spec,
                        report_to_cloud,
                        generation: 0,
                        task: None,
                        started: Instant::now(),
                        restart_at: None,
                        failures: 0,
                        desired: tx,
                        warned: HashMap::new(),
                        recorder: None,
                        frames: None,
                        limit: RateLimit::new(MAX_READINGS_PER_SECOND),
                    };
                    // Replacing the entry stops the old mapper (Drop aborts it).
                    if let Some(mut old) = self.devices.insert(object.uid.clone(), managed)
                        && let Some(mut r) = old.recorder.take()
                    {
                        let _ = r.flush();
                    }
                    self.capture(&object.uid, capture_plan);
                    self.start(&object.uid);
                }
            }
        }
        let gone: Vec<String> = self
            .devices
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(d) = self.devices.remove(&uid) {
                self.twins.live.remove(&d.object.namespace, &d.object.name);
            }
            self.twins.forget(&uid);
        }
    }

    /// Starts, keeps or stops a device's recorder as its capture plan says.
    fn capture(&mut self, uid: &str, plan: Result<Option<capture::CapturePlan>, String>) {
        let Some(d) = self.devices.get_mut(uid) else {
            return;
        };
        let plan = match plan {
            Ok(plan) => plan,
            Err(why) => {
                d.recorder = None;
                self.warn(uid, "capture", "CaptureRefused", &why);
                return;
            }
        };
        let camera = matches!(
            d.spec.as_ref().map(|s| &s.protocol),
            Ok(Protocol::Camera { .. })
        );
        let current = match (&d.recorder, &d.frames) {
            (Some(r), _) => Some(r.plan()),
            (_, Some(f)) => Some(f.plan()),
            _ => None,
        };
        if current == plan.as_ref() {
            return;
        }
        if let Some(mut old) = d.recorder.take() {
            let _ = old.flush();
        }
        d.frames = None;
        let Some(plan) = plan else {
            return;
        };
        let path = plan.path.display().to_string();
        let opened = if camera {
            capture::FrameRecorder::open(plan).map(|f| d.frames = Some(f))
        } else {
            capture::Recorder::open(plan).map(|r| d.recorder = Some(r))
        };
        match opened {
            Ok(()) => {
                d.warned.remove("capture");
            }
            Err(e) => self.warn(
                uid,
                "capture",
                "CaptureFailed",
                &format!("capture: cannot open {path}: {e}"),
            ),
        }
    }

    fn start(&mut self, uid: &str) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(d) = self.devices.get_mut(uid) else {
            return;
        };
        d.restart_at = None;
        let spec = match &d.spec {
            Ok(spec) => spec.clone(),
            Err(e) => {
                let message = e.message.clone();
                self.twins.state(uid, "unhealthy", &now());
                self.warn(uid, "spec", "InvalidDevice", &message);
                return;
            }
        };
        d.generation = generation;
        d.started = Instant::now();
        let io = MapperIo {
            uid: uid.to_owned(),
            generation,
            readings: self.readings.0.clone(),
            desired: d.desired.subscribe(),
        };
        let exits = self.exits.0.clone();
        let uid = uid.to_owned();
        let mappers = self.mappers.clone();
        d.task = Some(tokio::spawn(async move {
            let result = run_mapper(spec, io, mappers).await;
            let _ = exits.send((uid, generation, result));
        }));
    }

    fn reading(&mut self, uid: &str, generation: u64, reading: Reading) {
        let Some(d) = self.devices.get_mut(uid) else {
            return;
        };
        if d.generation != generation {
            return;
        }
        let at = now();
        match reading {
            Reading::State(state) => {
                d.warned.remove("mapper");
                self.twins.state(uid, state, &at);
            }
            Reading::Reported { property, value } => {
                if !d.limit.admit(Instant::now()) {
                    self.warn(
                        uid,
                        "rate",
                        "ReadingsDropped",
                        &format!(
                            "more than {MAX_READINGS_PER_SECOND} readings a second: the excess \
                             is dropped, not reported or captured"
                        ),
                    );
                    return;
                }
                d.warned.remove(&property);
                if let Some(r) = d.recorder.as_mut().filter(|r| r.records(&property)) {
                    r.record(&at, &d.object.name, &property, &value);
                    self.recording.insert(uid.to_owned());
                }
                if d.report_to_cloud.contains(&property) {
                    self.twins.report(uid, &property, &value, &at);
                }
            }
            Reading::Applied { property, value } => {
                if d.report_to_cloud.contains(&property) {
                    self.twins.applied(uid, &property, &value, &at);
                }
            }
            Reading::Frame(frame) => {
                let Some(f) = d.frames.as_mut() else {
                    return;
                };
                let extension = match d.spec.as_ref().map(|s| &s.protocol) {
                    Ok(Protocol::Camera { format, .. }) => format.extension(),
                    _ => return,
                };
                let name = d.object.name.clone();
                let said = match f.record(&name, extension, &frame) {
                    Ok(0) => None,
                    // Said on the first deletion and then once per hundred.
                    Ok(dropped) if f.dropped == dropped || f.dropped % 100 < dropped => Some((
                        "CaptureTrimmed",
                        format!(
                            "capture: deleted the oldest frames ({} in all), keeping {} \
                             (bounds: {} frames, {} bytes)",
                            f.dropped,
                            f.frames(),
                            f.plan().max_samples,
                            f.plan().max_bytes
                        ),
                    )),
                    Ok(_) => None,
                    Err(e) => Some((
                        "CaptureFailed",
                        format!(
                            "capture: writing a frame into {}: {e}",
                            f.plan().path.display()
                        ),
                    )),
                };
                match said {
                    Some(("CaptureTrimmed", message)) => {
                        self.event(uid, "Normal", "CaptureTrimmed", &message)
                    }
                    Some((reason, message)) => self.warn(uid, "capture", reason, &message),
                    None => {}
                }
            }
            Reading::Down { state, message } => {
                self.twins.state(uid, state, &at);
                let message = if message.is_empty() {
                    format!("the mapper says the device is {state}")
                } else {
                    message
                };
                self.warn(uid, "mapper", "DeviceUnreachable", &message);
            }
            Reading::Failed { property, message } => {
                self.warn(
                    uid,
                    &property,
                    "PropertyFailed",
                    &format!("property {property}: {message}"),
                );
            }
        }
    }

    fn exited(&mut self, uid: &str, generation: u64, result: Result<(), MapperError>) {
        let Some(d) = self.devices.get_mut(uid) else {
            return;
        };
        if d.generation != generation {
            return;
        }
        d.task = None;
        let (delay, failures) = restart_delay(
            &self.config.restarts,
            d.failures,
            d.started.elapsed(),
            &mut self.rng,
        );
        d.failures = failures;
        d.restart_at = Some(Instant::now() + delay);
        let why = match &result {
            Ok(()) => "the mapper stopped".to_owned(),
            Err(e) => e.to_string(),
        };
        let then = match d.spec.as_ref().map(|s| &s.protocol) {
            // Started again as soon as a mapper registers the protocol (or at the delay).
            Ok(Protocol::External { name, .. }) => {
                format!("; waiting for a mapper of protocol {name:?} to register")
            }
            _ => format!("; retrying in {:.1}s", delay.as_secs_f64()),
        };
        self.twins.state(uid, "offline", &now());
        self.warn(uid, "mapper", "DeviceUnreachable", &format!("{why}{then}"));
    }

    /// A mapper registered or went: devices waiting for a protocol now served start at once.
    fn mappers_changed(&mut self) {
        let served = self.mappers.protocols();
        for d in self.devices.values_mut() {
            if let Ok(spec) = &d.spec
                && let Protocol::External { name, .. } = &spec.protocol
                && served.contains(name)
                && d.restart_at.is_some()
            {
                d.restart_at = Some(Instant::now());
            }
        }
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| d.restart_at.is_some_and(|t| t <= now))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in due {
            self.start(&uid);
        }
    }

    fn flush(&mut self) {
        let mut said = Vec::new();
        for uid in std::mem::take(&mut self.recording) {
            let Some(r) = self.devices.get_mut(&uid).and_then(|d| d.recorder.as_mut()) else {
                continue;
            };
            match r.flush() {
                Ok(0) => {}
                Ok(dropped) => said.push((
                    uid.clone(),
                    "CaptureTrimmed",
                    format!(
                        "capture: dropped the {dropped} oldest rows ({} in all), keeping {} \
                         (bounds: {} rows, {} bytes)",
                        r.dropped,
                        r.rows(),
                        r.plan().max_samples,
                        r.plan().max_bytes
                    ),
                )),
                Err(e) => said.push((
                    uid.clone(),
                    "CaptureFailed",
                    format!("capture: writing {}: {e}", r.plan().path.display()),
                )),
            }
        }
        for (uid, reason, message) in said {
            if reason == "CaptureTrimmed" {
                self.event(&uid, "Normal", reason, &message);
            } else {
                self.warn(&uid, "capture", reason, &message);
            }
        }
        let now = Instant::now();
        for flush in self.twins.local.due(now) {
            if let Some(d) = self.devices.get(&flush.uid) {
                let o = &d.object;
                self.twins
                    .live
                    .publish(&o.namespace, &o.name, flush.status());
            }
        }
        for flush in self.twins.cloud.due(now) {
            let Some(d) = self.devices.get(&flush.uid) else {
                continue;
            };
            let status = flush.status();
            let upstream = Upstream {
                kind: UpstreamKind::Status as i32,
                object: Some(d.object.clone()),
                payload: json!({ "status": status }).to_string().into_bytes(),
            };
            if let Err(e) = self.reporter.report(&upstream) {
                tracing::warn!(device = %d.object.name, error = %e, "device twins not queued");
            }
        }
    }

    /// A Warning event on the device, once per distinct message per subject.
    fn warn(&mut self, uid: &str, subject: &str, reason: &str, message: &str) {
        let Some(d) = self.devices.get_mut(uid) else {
            return;
        };
        // The retry delay changes every time; compare what went wrong only.
        let key = message.split("; retrying").next().unwrap_or(message);
        if d.warned.get(subject).map(String::as_str) == Some(key) {
            return;
        }
        d.warned.insert(subject.to_owned(), key.to_owned());
        tracing::warn!(device = %d.object.name, reason, message);
        self.event(uid, "Warning", reason, message);
    }

    /// An event about the device.
    fn event(&self, uid: &str, type_: &str, reason: &str, message: &str) {
        let Some(d) = self.devices.get(uid) else {
            return;
        };
        let stamp = now();
        let suffix: u64 = rand::random();
        let o = &d.object;
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": { "name": format!("{}.{suffix:016x}", o.name), "namespace": o.namespace },
            "involvedObject": { "apiVersion": o.api_version, "kind": o.kind, "name": o.name,
                                "namespace": o.namespace, "uid": o.uid },
            "reason": reason, "message": message, "type": type_,
            "source": { "component": "sedna-edgecore", "host": self.node },
            "reportingComponent": "sedna-edgecore", "reportingInstance": self.node,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        });
        let upstream = Upstream {
            kind: UpstreamKind::Event as i32,
            object: Some(o.clone()),
            payload: event.to_string().into_bytes(),
        };
        if let Err(e) = self.reporter.report(&upstream) {
            tracing::warn!(device = %o.name, error = %e, "device event not queued");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[tokio::test(start_paused = true)]
    async fn a_flooding_device_is_held_to_its_rate_and_admitted_again_next_second() {
        let mut limit = RateLimit::new(MAX_READINGS_PER_SECOND);
        let start = Instant::now();
        let admitted = (0..10_000)
            .filter(|i| limit.admit(start + Duration::from_micros(*i)))
            .count();
        assert_eq!(admitted, MAX_READINGS_PER_SECOND as usize);
        assert_eq!(limit.dropped, 10_000 - u64::from(MAX_READINGS_PER_SECOND));
        // A sensor at 10 Hz afterwards loses nothing.
        let later = start + Duration::from_secs(1);
        assert!((0..10).all(|i| limit.admit(later + Duration::from_millis(100 * i))));
    }

    #[test]
    fn restarts_back_off_with_jitter_and_reset_after_a_long_run() {
        let policy = DevicesConfig::new("/x").restarts;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut failures = 0;
        let mut delays = Vec::new();
        for _ in 0..10 {
            let (d, f) = restart_delay(&policy, failures, Duration::from_secs(1), &mut rng);
            delays.push(d);
            failures = f;
        }
        for (i, d) in delays.iter().enumerate() {
            let full = (policy.base * (1 << i)).min(policy.max);
            assert!(*d >= full / 2 && *d <= full, "{i}: {d:?} vs {full:?}");
        }
        assert!(delays[9] >= policy.max / 2, "capped, not reset");
        let (d, f) = restart_delay(&policy, failures, policy.reset_after, &mut rng);
        assert!(d <= policy.base && f == 1, "a long run starts over: {d:?}");
        let mut other = rand::rngs::SmallRng::seed_from_u64(8);
        let again: Vec<_> = (0..10)
            .map(|i| restart_delay(&policy, i, Duration::ZERO, &mut other).0)
            .collect();
        assert_ne!(delays, again, "jittered");
    }
}
