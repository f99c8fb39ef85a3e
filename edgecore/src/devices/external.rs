//! Mappers written by users: processes that serve a protocol the agent has no built-in mapper
//! for, over the gRPC interface of `proto/mapper.proto`, served on a Unix socket of the node.
//!
//! - [`Mappers`]: the registry of connected mappers, by protocol; a device task finds its
//!   mapper here and the manager learns when one registers (devices waiting for it start then,
//!   not at their next back-off).
//! - [`Service`]: the gRPC service: registration rules, message checks, routing of reports to
//!   device tasks. [`serve`] runs it on the socket.
//! - `run`: a device's side: hands the device to its mapper, forwards desired values, passes
//!   reports on to the manager, and takes the device back when it stops (Device deleted or
//!   changed, agent stopping).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sedna_api::devices::PropertyType;
use sedna_proto::mapper::device_mapper_server::{DeviceMapper, DeviceMapperServer};
use sedna_proto::mapper::{
    AddDevice, AgentMessage, MapperMessage, Property, Registered, RemoveDevice, SetDesired,
    agent_message, device_state, mapper_message,
};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::spec::{MapperSpec, Protocol, Visitor};
use super::{MapperError, MapperIo, Reading};

/// The most mappers connected at once.
pub const MAX_MAPPERS: usize = 16;
/// The most protocols one mapper serves.
pub const MAX_PROTOCOLS: usize = 16;
/// The largest message either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// How long a new connection has to register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Protocols with built-in mappers, which no user's mapper may take.
pub const BUILT_IN: [&str; 5] = ["modbus", "modbus-tcp", "mqtt", "camera", "rtsp"];

/// Whether `name` may name a protocol served by a user's mapper: a DNS label, not built in.
pub fn valid_protocol_name(name: &str) -> bool {
    crate::runtime::spec::dns_label(name) && !BUILT_IN.contains(&name)
}

/// A device's route inside a mapper's session.
#[derive(Debug)]
struct Route {
    /// The device task's generation (a newer task replaces an older one's route).
    generation: u64,
    types: HashMap<String, PropertyType>,
    readings: mpsc::Sender<Reading>,
}

/// One connected mapper.
#[derive(Debug)]
struct Session {
    name: String,
    protocols: Vec<String>,
    to_mapper: mpsc::Sender<Result<AgentMessage, Status>>,
    devices: Mutex<HashMap<String, Route>>,
}

#[derive(Default)]
struct Registry {
    /// protocol → session.
    by_protocol: HashMap<String, Arc<Session>>,
    sessions: usize,
}

/// The connected mappers, by protocol. Cheap to clone.
#[derive(Clone)]
pub struct Mappers {
    registry: Arc<Mutex<Registry>>,
    changed: watch::Sender<u64>,
}

impl Default for Mappers {
    fn default() -> Self {
        Self {
            registry: Arc::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl std::fmt::Debug for Mappers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Mappers")
            .field(
                "protocols",
                &registry.by_protocol.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Mappers {
    /// Ticks whenever a mapper registers or goes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The protocols served now.
    pub fn protocols(&self) -> Vec<String> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut protocols: Vec<String> = registry.by_protocol.keys().cloned().collect();
        protocols.sort();
        protocols
    }

    fn session(&self, protocol: &str) -> Option<Arc<Session>> {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry.by_protocol.get(protocol).cloned()
    }

    /// Admits a mapper for `protocols`, all or none.
    fn register(
        &self,
        name: &str,
        protocols: &[String],
        to_mapper: mpsc::Sender<Result<AgentMessage, Status>>,
    ) -> Result<Arc<Session>, Status> {
        if name.is_empty() || name.len() > 63 || name.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "register.name must be 1-63 printable characters",
            ));
        }
        if protocols.is_empty() || protocols.len() > MAX_PROTOCOLS {
            return Err(Status::invalid_argument(format!(
                "register.protocols must name 1-{MAX_PROTOCOLS} protocols"
            )));
        }
        for p in protocols {
            if BUILT_IN.contains(&p.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "protocol {p:?} has a built-in mapper; serve another name"
                )));
            }
            if !valid_protocol_name(p) {
                return Err(Status::invalid_argument(format!(
                    "protocol {p:.70?} is not a valid name (lowercase letters, digits and '-', \
                     at most 63)"
                )));
            }
        }
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if registry.sessions >= MAX_MAPPERS {
            return Err(Status::resource_exhausted(format!(
                "this node admits at most {MAX_MAPPERS} mappers"
            )));
        }
        for p in protocols {
            if let Some(other) = registry.by_protocol.get(p) {
                return Err(Status::already_exists(format!(
                    "protocol {p:?} is served by mapper {:?}",
                    other.name
                )));
            }
        }
        let mut unique = protocols.to_vec();
        unique.sort();
        unique.dedup();
        let session = Arc::new(Session {
            name: name.to_owned(),
            protocols: unique,
            to_mapper,
            devices: Mutex::default(),
        });
        for p in &session.protocols {
            registry.by_protocol.insert(p.clone(), session.clone());
        }
        registry.sessions += 1;
        drop(registry);
        self.changed.send_modify(|n| *n += 1);
        Ok(session)
    }

    /// Forgets a session: its devices' tasks see their routes close.
    fn unregister(&self, session: &Arc<Session>) {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        for p in &session.protocols {
            if registry
                .by_protocol
                .get(p)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                registry.by_protocol.remove(p);
            }
        }
        registry.sessions = registry.sessions.saturating_sub(1);
        drop(registry);
        session
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.changed.send_modify(|n| *n += 1);
    }
}

/// The gRPC service of `proto/mapper.proto`.
#[derive(Clone, Debug)]
pub struct Service {
    mappers: Mappers,
    node: String,
}

impl Service {
    /// The service of node `node`, registering mappers into `mappers`.
    pub fn new(node: impl Into<String>, mappers: Mappers) -> Self {
        Self {
            mappers,
            node: node.into(),
        }
    }
}

#[tonic::async_trait]
impl DeviceMapper for Service {
    type AttachStream = futures_util::stream::BoxStream<'static, Result<AgentMessage, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<MapperMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "register within {}s of connecting",
                    REGISTER_TIMEOUT.as_secs()
                ))
            })??
            .ok_or_else(|| Status::failed_precondition("the stream ended before register"))?;
        let Some(mapper_message::Kind::Register(register)) = first.kind else {
            return Err(Status::failed_precondition(
                "the first message must be register",
            ));
        };
        let (tx, rx) = mpsc::channel(256);
        let session = self
            .mappers
            .register(&register.name, &register.protocols, tx.clone())?;
        tracing::info!(mapper = %session.name, protocols = ?session.protocols, "mapper registered");
        let _ = tx
            .send(Ok(agent(agent_message::Kind::Registered(Registered {
                node: self.node.clone(),
            }))))
            .await;
        let mappers = self.mappers.clone();
        tokio::spawn(async move {
            let ended = read(&session, &mut inbound).await;
            match &ended {
                Ok(()) => tracing::info!(mapper = %session.name, "mapper disconnected"),
                Err(status) => {
                    tracing::warn!(mapper = %session.name, error = %status.message(), "mapper refused");
                    let _ = session.to_mapper.try_send(Err(status.clone()));
                }
            }
            mappers.unregister(&session);
        });
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            let last = item.is_err();
            // An error ends the stream (its status goes to the mapper).
            if last {
                rx.close();
            }
            Some((item, rx))
        });
        Ok(Response::new(Box::pin(outbound)))
    }
}

fn agent(kind: agent_message::Kind) -> AgentMessage {
    AgentMessage { kind: Some(kind) }
}

/// Reads a registered mapper's messages until it goes (Ok) or breaks a rule (the status).
async fn read(session: &Session, inbound: &mut Streaming<MapperMessage>) -> Result<(), Status> {
    while let Some(message) = inbound.message().await? {
        let Some((device, reading)) = check(session, message)? else {
            continue;
        };
        let route = {
            let devices = session.devices.lock().unwrap_or_else(|e| e.into_inner());
            devices.get(&device).map(|r| r.readings.clone())
        };
        if let Some(route) = route {
            // Waits when the device's reader is behind: the mapper is slowed, nothing is lost.
            let _ = route.send(reading).await;
        }
    }
    Ok(())
}

/// What a mapper's message means: the device it is about and the reading; `None` for a
/// device this mapper no longer serves (removed while the report was on its way).
fn check(session: &Session, message: MapperMessage) -> Result<Option<(String, Reading)>, Status> {
    use mapper_message::Kind;
    let (device, property, reading) = match message.kind {
        None => return Err(Status::invalid_argument("a message without a kind")),
        Some(Kind::Register(_)) => {
            return Err(Status::failed_precondition("register was already sent"));
        }
        Some(Kind::Report(r)) => (
            r.device,
            Some(r.property.clone()),
            Reading::Reported {
                property: r.property,
                value: r.value,
            },
        ),
        Some(Kind::Applied(a)) => (
            a.device,
            Some(a.property.clone()),
            Reading::Applied {
                property: a.property,
                value: a.value,
            },
        ),
        Some(Kind::Failed(f)) => {
            let message = printable(&f.message);
            (
                f.device,
                Some(f.property.clone()),
                Reading::Failed {
                    property: f.property,
                    message,
                },
            )
        }
        Some(Kind::State(s)) => {
            let state = match device_state::State::try_from(s.state) {
                Ok(device_state::State::Online) => "online",
                Ok(device_state::State::Offline) => "offline",
                Ok(device_state::State::Unhealthy) => "unhealthy",
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "state of device {:.80?}: {} is not ONLINE, OFFLINE or UNHEALTHY",
                        s.device, s.state
                    )));
                }
            };
            let reading = if state == "online" {
                Reading::State(state)
            } else {
                Reading::Down {
                    state,
                    message: printable(&s.message),
                }
            };
            (s.device, None, reading)
        }
    };
    let devices = session.devices.lock().unwrap_or_else(|e| e.into_inner());
    let Some(route) = devices.get(&device) else {
        return Ok(None);
    };
    let Some(property) = property else {
        return Ok(Some((device, reading)));
    };
    let Some(type_) = route.types.get(&property) else {
        return Err(Status::invalid_argument(format!(
            "device {device}: {property:.80?} is not one of its properties"
        )));
    };
    let reading = match reading {
        Reading::Reported { property, value } => {
            match super::mqtt::value_of(value.as_bytes(), None, *type_) {
                Ok(value) => Reading::Reported { property, value },
                Err(why) => Reading::Failed {
                    message: format!("the mapper reported a bad value: {why}"),
                    property,
                },
            }
        }
        Reading::Applied { property, value } => {
            match super::mqtt::value_of(value.as_bytes(), None, *type_) {
                Ok(value) => Reading::Applied { property, value },
                Err(why) => Reading::Failed {
                    message: format!("the mapper applied a bad value: {why}"),
                    property,
                },
            }
        }
        other => other,
    };
    Ok(Some((device, reading)))
}

/// A mapper's message for an event: printable, at most 1 KiB.
fn printable(message: &str) -> String {
    let mut out: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > 1024 {
        let mut end = 1024;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

fn type_name(t: PropertyType) -> &'static str {
    match t {
        PropertyType::Int => "int",
        PropertyType::Float => "float",
        PropertyType::Double => "double",
        PropertyType::String => "string",
        PropertyType::Boolean => "boolean",
        PropertyType::Bytes => "bytes",
        PropertyType::Stream => "stream",
    }
}

/// What the mapper is told of a device.
fn add_device(spec: &MapperSpec, desired: &BTreeMap<String, String>) -> AddDevice {
    let (protocol, config) = match &spec.protocol {
        Protocol::External { name, config } => (name.clone(), config.to_string()),
        _ => (String::new(), "{}".to_owned()),
    };
    AddDevice {
        device: spec.device.clone(),
        protocol,
        config_json: config,
        properties: spec
            .properties
            .iter()
            .map(|p| Property {
                name: p.name.clone(),
                r#type: type_name(p.type_).to_owned(),
                writable: p.writable,
                collect_cycle_ms: p.collect_cycle.as_millis().min(u32::MAX as u128) as u32,
                visitor_json: match &p.visitor {
                    Visitor::External(v) => v.to_string(),
                    _ => "{}".to_owned(),
                },
                desired: p.writable.then(|| desired.get(&p.name).cloned()).flatten(),
            })
            .collect(),
    }
}

/// Takes a device back from its mapper when its task ends, however it ends.
struct Detach {
    session: Arc<Session>,
    device: String,
    generation: u64,
}

impl Drop for Detach {
    fn drop(&mut self) {
        let mut devices = self
            .session
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if devices
            .get(&self.device)
            .is_some_and(|r| r.generation == self.generation)
        {
            devices.remove(&self.device);
            let _ = self
                .session
                .to_mapper
                .try_send(Ok(agent(agent_message::Kind::Remove(RemoveDevice {
                    device: self.device.clone(),
                }))));
        }
    }
}

/// A device's task: serves the device through the mapper registered for its protocol until
/// that mapper goes (an error: the manager retries with back-off) or the task is stopped.
pub(crate) async fn run(
    spec: &MapperSpec,
    io: &mut MapperIo,
    mappers: &Mappers,
) -> Result<(), MapperError> {
    let Protocol::External { name: protocol, .. } = &spec.protocol else {
        return Err(MapperError::Unreachable("not a user's protocol".into()));
    };
    let session = mappers
        .session(protocol)
        .ok_or_else(|| MapperError::NoMapper(protocol.clone()))?;
    let (tx, mut rx) = mpsc::channel(64);
    {
        let mut devices = session.devices.lock().unwrap_or_else(|e| e.into_inner());
        devices.insert(
            spec.device.clone(),
            Route {
                generation: io.generation,
                types: spec
                    .properties
                    .iter()
                    .map(|p| (p.name.clone(), p.type_))
                    .collect(),
                readings: tx,
            },
        );
    }
    let _detach = Detach {
        session: session.clone(),
        device: spec.device.clone(),
        generation: io.generation,
    };
    let gone = || MapperError::Unreachable(format!("mapper {:?} disconnected", session.name));
    let mut desired = io.desired.borrow_and_update().clone();
    session
        .to_mapper
        .send(Ok(agent(agent_message::Kind::Add(add_device(
            spec, &desired,
        )))))
        .await
        .map_err(|_| gone())?;
    let writable: std::collections::HashSet<&str> = spec
        .properties
        .iter()
        .filter(|p| p.writable)
        .map(|p| p.name.as_str())
        .collect();
    loop {
        tokio::select! {
            reading = rx.recv() => match reading {
                Some(reading) => io.send(reading).await?,
                None => return Err(gone()),
            },
            changed = io.desired.changed() => {
                if changed.is_err() {
                    return Err(MapperError::Stopped);
                }
                let now = io.desired.borrow_and_update().clone();
                for (property, value) in &now {
                    if writable.contains(property.as_str()) && desired.get(property) != Some(value) {
                        let set = SetDesired {
                            device: spec.device.clone(),
                            property: property.clone(),
                            value: value.clone(),
                        };
                        session
                            .to_mapper
                            .send(Ok(agent(agent_message::Kind::Desired(set))))
                            .await
                            .map_err(|_| gone())?;
                    }
                }
                desired = now;
            }
        }
    }
}

/// Serves the mapper interface on the Unix socket `path` (a stale socket there is replaced;
/// the socket is made 0600, so only the agent's user connects).
pub async fn serve(path: &Path, service: Service) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(stream, _)| stream);
        Some((next, listener))
    });
    let server = DeviceMapperServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let shown = path.display().to_string();
    Ok(tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(32)
            .serve_with_incoming(server, incoming)
            .await;
        if let Err(e) = served {
            tracing::error!(socket = %shown, error = %e, "the mapper interface stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sedna_proto::mapper::device_mapper_client::DeviceMapperClient;
    use sedna_proto::mapper::{Register, Report};

    fn register(name: &str, protocols: &[&str]) -> MapperMessage {
        MapperMessage {
            kind: Some(mapper_message::Kind::Register(Register {
                name: name.into(),
                protocols: protocols.iter().map(|p| p.to_string()).collect(),
            })),
        }
    }

    fn report(device: &str, property: &str, value: &str) -> MapperMessage {
        MapperMessage {
            kind: Some(mapper_message::Kind::Report(Report {
                device: device.into(),
                property: property.into(),
                value: value.into(),
            })),
        }
    }

    #[test]
    fn registration_refuses_built_in_taken_and_malformed_protocols() {
        let mappers = Mappers::default();
        let tx = || mpsc::channel(1).0;
        let first = mappers
            .register("opcua-mapper", &["opcua".into()], tx())
            .unwrap();
        let cases: [(&str, Vec<String>, tonic::Code, &str); 5] = [
            (
                "m",
                vec!["modbus".into()],
                tonic::Code::InvalidArgument,
                "built-in",
            ),
            (
                "m",
                vec!["OPC UA".into()],
                tonic::Code::InvalidArgument,
                "not a valid name",
            ),
            ("m", vec![], tonic::Code::InvalidArgument, "1-16 protocols"),
            (
                "m",
                vec!["bacnet".into(), "opcua".into()],
                tonic::Code::AlreadyExists,
                "opcua-mapper",
            ),
            (
                "",
                vec!["bacnet".into()],
                tonic::Code::InvalidArgument,
                "register.name",
            ),
        ];
        for (name, protocols, code, says) in cases {
            let e = mappers.register(name, &protocols, tx()).unwrap_err();
            assert_eq!(e.code(), code, "{protocols:?}: {e:?}");
            assert!(e.message().contains(says), "{protocols:?}: {}", e.message());
        }
        assert_eq!(
            mappers.protocols(),
            ["opcua"],
            "a refusal claims nothing (all or none)"
        );
        for i in 1..MAX_MAPPERS {
            mappers.register("m", &[format!("p{i}")], tx()).unwrap();
        }
        let e = mappers
            .register("m", &["one-more".into()], tx())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        mappers.unregister(&first);
        assert!(!mappers.protocols().contains(&"opcua".to_owned()));
        mappers.register("m", &["opcua".into()], tx()).unwrap();
    }

    /// A gRPC channel to the agent's mapper socket.
    async fn connect(socket: &std::path::Path) -> tonic::transport::Channel {
        let path = socket.to_owned();
        tonic::transport::Endpoint::try_from("http://mapper.invalid")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn an_oversized_message_ends_only_its_own_session() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("mappers.sock");
        let mappers = Mappers::default();
        let server = serve(&socket, Service::new("edge-1", mappers.clone()))
            .await
            .unwrap();
        let open = |protocol: &'static str| {
            let socket = socket.clone();
            async move {
                let (tx, rx) = mpsc::channel(4);
                tx.send(register("m", &[protocol])).await.unwrap();
                let rx = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                });
                let mut from = DeviceMapperClient::new(connect(&socket).await)
                    .attach(rx)
                    .await
                    .unwrap()
                    .into_inner();
                assert!(from.message().await.unwrap().is_some(), "registered");
                (tx, from)
            }
        };
        let (hostile, mut hostile_from) = open("bacnet").await;
        let (_good, _good_from) = open("opcua").await;
        hostile
            .send(report("default/x", "t", &"9".repeat(MAX_MESSAGE_BYTES + 1)))
            .await
            .unwrap();
        let e = hostile_from.message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        assert!(e.message().contains("message length too large"), "{e:?}");
        // The other mapper is still registered and its protocol served.
        for _ in 0..100 {
            if mappers.protocols() == ["opcua"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(mappers.protocols(), ["opcua"]);
        server.abort();
    }

    fn spec() -> MapperSpec {
        use super::super::spec::PropertySpec;
        let property = |name: &str, type_, writable| PropertySpec {
            name: name.into(),
            type_,
            writable,
            collect_cycle: Duration::from_millis(500),
            visitor: Visitor::External(serde_json::json!({ "nodeId": name })),
        };
        MapperSpec {
            device: "default/boiler".into(),
            protocol: Protocol::External {
                name: "opcua".into(),
                config: serde_json::json!({ "endpoint": "opc.tcp://127.0.0.1:1" }),
            },
            properties: vec![
                property("temperature", PropertyType::Double, false),
                property("setpoint", PropertyType::Double, true),
            ],
        }
    }

    #[tokio::test]
    async fn a_mapper_serves_its_devices_over_the_socket_until_they_are_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("mappers.sock");
        let mappers = Mappers::default();
        let server = serve(&socket, Service::new("edge-1", mappers.clone()))
            .await
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the agent's user connects");

        let mut client = DeviceMapperClient::new(connect(&socket).await);
        let (to_agent, outbound) = mpsc::channel(16);
        let outbound = futures_util::stream::unfold(outbound, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        });
        to_agent
            .send(register("opcua-mapper", &["opcua"]))
            .await
            .unwrap();
        let mut from_agent = client.attach(outbound).await.unwrap().into_inner();
        let next = |m: Option<AgentMessage>| m.and_then(|m| m.kind);
        assert_eq!(
            next(from_agent.message().await.unwrap()),
            Some(agent_message::Kind::Registered(Registered {
                node: "edge-1".into()
            }))
        );

        // A device of that protocol is handed over, with its settings and desired values.
        let (readings, mut manager) = mpsc::channel(16);
        let (desired, desired_rx) =
            watch::channel(BTreeMap::from([("setpoint".to_owned(), "40".to_owned())]));
        let mut io = MapperIo {
            uid: "u1".into(),
            generation: 1,
            readings,
            desired: desired_rx,
        };
        let device = {
            let mappers = mappers.clone();
            tokio::spawn(async move { run(&spec(), &mut io, &mappers).await })
        };
        let Some(agent_message::Kind::Add(add)) = next(from_agent.message().await.unwrap()) else {
            panic!("no AddDevice");
        };
        assert_eq!(add.device, "default/boiler");
        assert_eq!(add.protocol, "opcua");
        assert_eq!(add.config_json, r#"{"endpoint":"opc.tcp://127.0.0.1:1"}"#);
        assert_eq!(add.properties[0].r#type, "double");
        assert_eq!(
            add.properties[0].desired, None,
            "read-only: no desired value"
        );
        assert_eq!(add.properties[1].desired.as_deref(), Some("40"));
        assert_eq!(add.properties[1].collect_cycle_ms, 500);

        // Reports reach the manager, typed; a bad value is a property failure.
        to_agent
            .send(report("default/boiler", "temperature", " 21.5 "))
            .await
            .unwrap();
        to_agent
            .send(report("default/boiler", "temperature", "warm"))
            .await
            .unwrap();
        to_agent
            .send(report("default/gone", "temperature", "1"))
            .await
            .unwrap();
        let (uid, generation, reading) = manager.recv().await.unwrap();
        assert_eq!((uid.as_str(), generation), ("u1", 1));
        assert_eq!(
            reading,
            Reading::Reported {
                property: "temperature".into(),
                value: "21.5".into()
            }
        );
        let Reading::Failed { property, message } = manager.recv().await.unwrap().2 else {
            panic!("a bad value is not a reading");
        };
        assert_eq!(property, "temperature");
        assert!(message.contains("\"warm\" is not a number"), "{message}");

        // A new desired value goes down.
        desired.send_replace(BTreeMap::from([("setpoint".to_owned(), "45".to_owned())]));
        assert_eq!(
            next(from_agent.message().await.unwrap()),
            Some(agent_message::Kind::Desired(SetDesired {
                device: "default/boiler".into(),
                property: "setpoint".into(),
                value: "45".into()
            }))
        );

        // The device's task stops (Device deleted): the mapper is told to let it go, and
        // its later reports are dropped.
        device.abort();
        assert_eq!(
            next(from_agent.message().await.unwrap()),
            Some(agent_message::Kind::Remove(RemoveDevice {
                device: "default/boiler".into()
            }))
        );

        // A second mapper for the same protocol is refused while the first is connected.
        let second = DeviceMapperClient::new(connect(&socket).await)
            .attach(futures_util::stream::iter([register("other", &["opcua"])]))
            .await
            .unwrap_err();
        assert_eq!(second.code(), tonic::Code::AlreadyExists, "{second:?}");

        // A report naming a property the device lacks ends the session, saying so.
        let (readings, _manager) = mpsc::channel(16);
        let (_desired, desired_rx) = watch::channel(BTreeMap::new());
        let mut io = MapperIo {
            uid: "u1".into(),
            generation: 2,
            readings,
            desired: desired_rx,
        };
        let device = {
            let mappers = mappers.clone();
            tokio::spawn(async move { run(&spec(), &mut io, &mappers).await })
        };
        assert!(matches!(
            next(from_agent.message().await.unwrap()),
            Some(agent_message::Kind::Add(_))
        ));
        to_agent
            .send(report("default/boiler", "pressure", "1"))
            .await
            .unwrap();
        let e = from_agent.message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message()
                .contains("\"pressure\" is not one of its properties"),
            "{e:?}"
        );
        // Its device is offline until a mapper registers the protocol again.
        let ended = device.await.unwrap().unwrap_err();
        assert!(
            ended
                .to_string()
                .contains("mapper \"opcua-mapper\" disconnected"),
            "{ended}"
        );
        assert!(mappers.protocols().is_empty());
        server.abort();
    }
}
