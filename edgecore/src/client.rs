//! The edge's tokio shell around [`EdgeMachine`]: dials the hub with the node certificate,
//! runs the stream, persists what arrives before acknowledging it, drains the outbox, and
//! renews the certificate before it expires (at about two thirds of its life, jittered).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use rand::RngExt;
use sedna_proto::channel::hub_client::HubClient;
use sedna_proto::channel::{Digest, Envelope, Manifest, Op, Upstream};
use sedna_proto::{
    LEASE_RENEWAL_METADATA, Message, REDIRECT_METADATA, RETRY_AFTER_METADATA, SUCCESSOR_METADATA,
    UNREACHABLE_METADATA, sync,
};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::join::{self, Identity};
use crate::machine::{ConnectError, EdgeMachine, Input, MachineConfig, Output};
use crate::store::{Change, EdgeStore, StoreError, Write};
use crate::tls;

/// Edge settings.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// The hub, `host:port`; in a tier of hubs, several, comma-separated (dialed in turn;
    /// a hub that does not serve this node redirects it to the one that does).
    pub hub: String,
    /// Where the identity and the store live.
    pub data_dir: PathBuf,
    /// Keep the store in memory, nothing on disk ([`EdgeStore::in_memory`]: simulated edges
    /// in benchmarks).
    pub in_memory: bool,
    /// Channel timing.
    pub machine: MachineConfig,
    /// Largest envelope sent or accepted.
    pub max_message_bytes: usize,
    /// Most queued upstream writes.
    pub outbox_limit: usize,
    /// Seed of the reconnect jitter (different per node; fixed in tests).
    pub seed: u64,
    /// Local address to connect from (`None`: the system's choice).
    pub source_address: Option<std::net::IpAddr>,
    /// Store changes buffered for subscribers (see [`EdgeHub::subscribe`]); every slot is
    /// allocated up front (≈ 150 bytes). A subscriber further behind reads the store again.
    pub change_buffer: usize,
    /// Attach over gRPC even where the hub speaks the framed channel
    /// ([`sedna_proto::frame`], the default: it costs both sides less memory per connection).
    pub grpc_channel: bool,
}

impl EdgeConfig {
    /// Defaults for a hub address and data directory.
    pub fn new(hub: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            hub: hub.into(),
            data_dir: data_dir.into(),
            in_memory: false,
            machine: MachineConfig::default(),
            max_message_bytes: sedna_proto::DEFAULT_MAX_MESSAGE_BYTES,
            outbox_limit: 100_000,
            seed: rand::rng().random(),
            source_address: None,
            change_buffer: CHANGE_BUFFER,
            grpc_channel: false,
        }
    }
}

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The node has not joined (no identity in the data directory).
    #[error("no node identity in {0}: run `sedna join` first")]
    NotJoined(String),
    /// The identity could not be read.
    #[error(transparent)]
    Join(#[from] join::JoinError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The agent's settings cannot work (not retryable: change them).
    #[error("invalid agent settings: {0}")]
    Config(String),
}

impl EdgeError {
    /// Whether trying again could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            EdgeError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// The connection state, for observers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EdgeStatus {
    /// A stream to the hub is open.
    pub connected: bool,
    /// The current connection finished its resync.
    pub synced: bool,
    /// Completed resyncs since start.
    pub syncs: u64,
    /// Connections opened since start.
    pub connections: u64,
    /// Certificates renewed since start.
    pub renewals: u64,
    /// Why the hub refused this node for good (it then stops dialing and works offline).
    pub refused: Option<String>,
    /// How often the hub of the current connection asked for the node's Lease to be renewed
    /// (`sedna-lease-renewal-ms`; it judges the node by the session); `None`: the node's own
    /// cadence.
    pub lease_renewal: Option<Duration>,
}

/// A running hub client.
pub struct EdgeHub {
    store: EdgeStore,
    changes: broadcast::Sender<Change>,
    outbox: Arc<Notify>,
    status: watch::Receiver<EdgeStatus>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    node: String,
    stream_requests: std::sync::Mutex<Option<mpsc::Receiver<String>>>,
    hub_address: watch::Receiver<String>,
}

/// Redirects followed in a row before dialing the configured hubs again.
const MAX_REDIRECTS: u32 = 3;

/// Most downstream envelopes already received that are persisted in one transaction (the
/// hub's window of unacknowledged envelopes is 256 by default).
const PERSIST_BATCH: usize = 256;

/// Stream requests (tokens) waiting at most for the agent to answer them.
const STREAM_REQUEST_QUEUE: usize = 64;

/// Store changes kept by default for subscribers that have not read them yet. A broadcast channel
/// allocates all its slots up front (≈ 150 bytes each), so this is memory every node pays:
/// 4,096 slots were ≈ 600 KiB per node. A subscriber further behind gets
/// `RecvError::Lagged` and reads the store again (the runtime, the local API and the devices
/// all do), so a burst larger than this (a first sync of many objects) costs a re-read, not
/// a lost change.
const CHANGE_BUFFER: usize = 256;

impl std::fmt::Debug for EdgeHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeHub").field("node", &self.node).finish()
    }
}

impl EdgeHub {
    /// Opens the store and starts the connection loop; the node must have joined.
    pub async fn start(config: EdgeConfig) -> Result<EdgeHub, EdgeError> {
        if config.change_buffer == 0 {
            return Err(EdgeError::Config(
                "the change buffer must hold at least one change".into(),
            ));
        }
        let identity = Identity::load(&config.data_dir)?
            .ok_or_else(|| EdgeError::NotJoined(config.data_dir.display().to_string()))?;
        let store = if config.in_memory {
            EdgeStore::in_memory(config.outbox_limit, config.max_message_bytes)
        } else {
            EdgeStore::open(
                &config.data_dir.join("edge.db"),
                config.outbox_limit,
                config.max_message_bytes,
            )?
        };
        let (changes, _) = broadcast::channel(config.change_buffer);
        let outbox = Arc::new(Notify::new());
        let (status_tx, status) = watch::channel(EdgeStatus::default());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let node = identity.node.clone();
        let (stream_tx, stream_rx) = mpsc::channel(STREAM_REQUEST_QUEUE);
        let seeds: Vec<String> = config
            .hub
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        let route = Route::new(seeds);
        let (hub_address_tx, hub_address) = watch::channel(route.target.clone());
        let shell = Shell {
            stream_requests: stream_tx,
            route,
            hub_address: hub_address_tx,
            config,
            identity,
            store: store.clone(),
            changes: changes.clone(),
            outbox: outbox.clone(),
            status: status_tx,
            renewing: None,
        };
        let task = tokio::spawn(shell.run(shutdown_rx));
        Ok(EdgeHub {
            store,
            changes,
            outbox,
            status,
            shutdown,
            task,
            node,
            stream_requests: std::sync::Mutex::new(Some(stream_rx)),
            hub_address,
        })
    }

    /// The hub this node is (or was last) connected to: in a tier of hubs, the one serving
    /// it, which streams back to the hub must reach.
    pub fn hub_address(&self) -> watch::Receiver<String> {
        self.hub_address.clone()
    }

    /// The hub's requests for streams (one-time tokens to open `Hub.Tunnel` with, see
    /// [`crate::streams`]); the first caller gets them.
    pub fn take_stream_requests(&self) -> Option<mpsc::Receiver<String>> {
        self.stream_requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The local store.
    pub fn store(&self) -> &EdgeStore {
        &self.store
    }

    /// Changes to stored objects as they are persisted.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// The connection state.
    pub fn status(&self) -> watch::Receiver<EdgeStatus> {
        self.status.clone()
    }

    /// Queues an upstream write; it is kept until the hub has it.
    pub fn report(&self, upstream: &Upstream) -> Result<u64, StoreError> {
        let seq = self.store.push(upstream)?;
        self.outbox.notify_one();
        Ok(seq)
    }

    /// A handle other components queue upstream writes through.
    pub fn reporter(&self) -> Arc<dyn crate::runtime::Reporter> {
        Arc::new(OutboxReporter {
            store: self.store.clone(),
            outbox: self.outbox.clone(),
        })
    }

    /// Stops the connection loop.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Queues upstream writes in the outbox and wakes the connection loop.
struct OutboxReporter {
    store: EdgeStore,
    outbox: Arc<Notify>,
}

impl crate::runtime::Reporter for OutboxReporter {
    fn report(&self, upstream: &Upstream) -> Result<u64, StoreError> {
        let seq = self.store.push(upstream)?;
        self.outbox.notify_one();
        Ok(seq)
    }
}

/// What the hub sends on a live connection, whichever channel carries it.
type Inbound =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Envelope, tonic::Status>> + Send>>;

struct Live {
    tx: mpsc::Sender<Envelope>,
    inbound: Inbound,
    /// The hub's `sedna-lease-renewal-ms`, if it sent one.
    lease_renewal: Option<Duration>,
    /// The framed channel's writer: stopped with the connection, so a hub that stopped
    /// reading cannot keep it open.
    _writer: Option<AbortOnDrop>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<std::io::Result<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Largest [`AttachAnswer`](sedna_proto::frame::AttachAnswer) the edge reads: a message and
/// a few addresses.
const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// How long the hub has to answer an attach on the framed channel.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The renewal cadence an accepted attach asked for: a whole number of milliseconds, at
/// least 1 s and at most an hour (anything else is ignored and the node keeps its own).
fn lease_renewal(ms: Option<&str>) -> Option<Duration> {
    let ms = ms?.trim().parse::<u64>().ok()?;
    (1_000..=3_600_000)
        .contains(&ms)
        .then(|| Duration::from_millis(ms))
}

/// What a refused `Attach` (or framed attach) means for the node.
fn refusal(s: &tonic::Status) -> ConnectError {
    if let Some(to) = s
        .metadata()
        .get(REDIRECT_METADATA)
        .and_then(|v| v.to_str().ok())
    {
        if !valid_hub_address(to) {
            return ConnectError::Unreachable(format!(
                "the hub redirected to an invalid address {:?}",
                to.chars().take(64).collect::<String>()
            ));
        }
        return ConnectError::Redirect(to.to_owned());
    }
    if let Some(ms) = s
        .metadata()
        .get(RETRY_AFTER_METADATA)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
    {
        let successor = s
            .metadata()
            .get(SUCCESSOR_METADATA)
            .and_then(|v| v.to_str().ok())
            .filter(|a| valid_hub_address(a))
            .map(str::to_owned);
        return ConnectError::Later {
            after: Duration::from_millis(ms),
            successor,
        };
    }
    let reason = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        // Decided by the hub about this certificate: dialing again cannot help.
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            ConnectError::Refused(reason)
        }
        _ => ConnectError::Unreachable(reason),
    }
}

fn dial_failure(f: tls::DialFailure) -> ConnectError {
    if f.reached {
        ConnectError::Busy(f.message)
    } else {
        ConnectError::Unreachable(f.message)
    }
}

/// Attaches over a framed channel ([`sedna_proto::frame`]) the hub accepted in its TLS
/// handshake: the request, the hub's answer (a refusal means what a refused `Attach` means),
/// then envelopes both ways.
async fn attach_framed(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    max: usize,
    unreachable: Option<String>,
) -> Dialed {
    use sedna_proto::frame::{self, AttachAnswer, AttachRequest, FrameReader};
    let (read, mut write) = tokio::io::split(tls);
    let mut reader = FrameReader::new(read, MAX_ANSWER_BYTES);
    let request = AttachRequest {
        unreachable: unreachable.unwrap_or_default(),
    };
    let exchange = async {
        frame::write_frame(&mut write, &request).await?;
        reader.read::<AttachAnswer>().await
    };
    // The hub took the connection and finished the handshake: whatever fails now, it is
    // there (busy, or ending), not gone.
    let answer = match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
        Ok(Ok(Some(answer))) => answer,
        Ok(Ok(None)) => {
            return Err(ConnectError::Busy(
                "the hub closed the channel before answering".into(),
            ));
        }
        Ok(Err(e)) => return Err(ConnectError::Busy(format!("the hub's answer: {e}"))),
        Err(_) => {
            return Err(ConnectError::Busy(format!(
                "the hub did not answer within {} s",
                ANSWER_TIMEOUT.as_secs()
            )));
        }
    };
    if let Some(status) = frame::status_of(&answer) {
        return Err(refusal(&status));
    }
    reader.set_max(max);
    let (tx, rx) = mpsc::channel::<Envelope>(1024);
    let writer = tokio::spawn(frame::write_frames(write, rx));
    let inbound = reader
        .into_stream::<Envelope>()
        .map(|r| r.map_err(|e| tonic::Status::unavailable(e.to_string())));
    Ok(Live {
        tx,
        inbound: Box::pin(inbound),
        lease_renewal: lease_renewal(
            answer
                .metadata
                .get(LEASE_RENEWAL_METADATA)
                .map(String::as_str),
        ),
        _writer: Some(AbortOnDrop(writer)),
    })
}

type Dialed = Result<Live, ConnectError>;

struct Shell {
    config: EdgeConfig,
    identity: Identity,
    store: EdgeStore,
    changes: broadcast::Sender<Change>,
    outbox: Arc<Notify>,
    status: watch::Sender<EdgeStatus>,
    renewing: Option<rcgen::KeyPair>,
    stream_requests: mpsc::Sender<String>,
    route: Route,
    hub_address: watch::Sender<String>,
}

/// Which hub the node dials next, and what it tells that hub: pure, so the tier's answers
/// (redirects, "later", dead hubs) are tested without sockets.
#[derive(Debug)]
struct Route {
    /// The hubs to dial (the configured list, comma-separated in `EdgeConfig::hub`).
    seeds: Vec<String>,
    seed: usize,
    /// The hub dialed next: a seed, or where the last redirect pointed.
    target: String,
    redirects: u32,
    /// Dials of the target in a row that found it busy.
    busy: u32,
    /// Configured hubs still to be tried at once, without a back-off, in this round of dials
    /// (one round per dial the machine asks for): a hub that is gone costs one refused
    /// connection, not a back-off step.
    untried: usize,
    /// A hub this node was redirected to and found no process at, told to the next hub
    /// dialed (which then says when to come back rather than redirecting there again).
    unreachable: Option<String>,
}

/// How many times in a row a busy hub is dialed again before the next configured one.
const MAX_BUSY_IN_A_ROW: u32 = 3;

impl Route {
    fn new(seeds: Vec<String>) -> Self {
        let target = seeds.first().cloned().unwrap_or_default();
        Route {
            seeds,
            seed: 0,
            target,
            redirects: 0,
            busy: 0,
            untried: 0,
            unreachable: None,
        }
    }

    /// A round of dials begins (the machine's back-off has passed): every other configured
    /// hub may be tried at once if the target cannot be reached.
    fn begin(&mut self) {
        self.untried = self.seeds.len().saturating_sub(1);
    }

    /// After [`Route::failed`]: whether to dial the (new) target at once rather than report
    /// the failure and back off — when the hub could not be reached at all and configured
    /// hubs remain untried in this round.
    fn dial_next_at_once(&mut self, reason: &ConnectError) -> bool {
        if matches!(reason, ConnectError::Unreachable(_)) && self.untried > 0 {
            self.untried -= 1;
            true
        } else {
            false
        }
    }

    /// After a failure: the next configured hub, redirects forgotten.
    fn next_seed(&mut self) {
        self.redirects = 0;
        self.busy = 0;
        self.seed = (self.seed + 1) % self.seeds.len().max(1);
        self.target = self.seeds.get(self.seed).cloned().unwrap_or_default();
    }

    /// A hub redirected the node to `to`: whether to follow (at most [`MAX_REDIRECTS`] in a
    /// row; past that the next configured hub is dialed after a back-off).
    fn redirected(&mut self, to: &str) -> bool {
        if self.redirects < MAX_REDIRECTS {
            self.redirects += 1;
            self.target = to.to_owned();
            true
        } else {
            self.next_seed();
            false
        }
    }

    /// The node is connected to the target.
    fn connected(&mut self) {
        self.redirects = 0;
        self.busy = 0;
        self.unreachable = None;
    }

    /// A dial of the target failed for `reason`.
    fn failed(&mut self, reason: &ConnectError) {
        if self.redirects > 0 && matches!(reason, ConnectError::Unreachable(_)) {
            // The hub the tier pointed at is gone (its Leases have not expired yet): say so
            // to the next one. Not when the hub took the connection and dropped it
            // (`Busy`): that hub is alive, and the claim would hold its nodes back.
            self.unreachable = Some(self.target.clone());
        }
        match reason {
            // A hub that took the connection and dropped the handshake is alive, and it is
            // the one the tier pointed at (or a configured one): dialed again after the
            // back-off, a few times, rather than the next configured hub, which may be the
            // hub that is gone or one that would only redirect back here. Past that (a peer
            // that is not a hub of this tier, say) the next configured hub.
            ConnectError::Busy(_) if self.busy + 1 < MAX_BUSY_IN_A_ROW => self.busy += 1,
            ConnectError::Later { successor, .. } => {
                // The claim was heard and answered: the next dial makes none. Kept, it would
                // be repeated after every wait, and were the hub alive after all, the tier
                // would answer "later" to this node for ever.
                self.unreachable = None;
                match successor {
                    // Dial the hub named to serve the node after the wait, not the next
                    // configured one (which may be the hub that is gone, or one that would
                    // only redirect).
                    Some(to) => {
                        self.redirects = 0;
                        self.target = to.clone();
                    }
                    None => self.next_seed(),
                }
            }
            _ => self.next_seed(),
        }
    }
}

/// Whether a hub named an address the node may dial: `host:port`, at most 255 bytes, a port,
/// a host without spaces or slashes.
fn valid_hub_address(address: &str) -> bool {
    address.len() <= 255
        && address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && port.parse::<u16>().is_ok_and(|p| p > 0)
                && !host
                    .chars()
                    .any(|c| c.is_whitespace() || c == '/' || c.is_control())
        })
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

impl Shell {
    fn renew_at(&self) -> Option<i64> {
        let info = join::certificate_info(&self.identity.cert_pem).ok()?;
        let life = (info.not_after - info.not_before).max(1);
        let jitter = rand::rng().random_range(-(life / 20)..=(life / 20));
        Some(info.not_before + life * 2 / 3 + jitter)
    }

    fn hello(&self) -> Result<Envelope, StoreError> {
        let inventory = self.store.inventory()?;
        let buckets = sync::bucket_count(inventory.len());
        let digests = sync::digests(inventory.iter().map(|(u, r)| (u.as_str(), *r)), buckets);
        Ok(Envelope {
            op: Op::Hello as i32,
            payload: Digest {
                buckets,
                digests: sync::pack_digests(&digests),
            }
            .encode_to_vec(),
            ..Default::default()
        })
    }

    /// Dials the route's target in a task, telling it `unreachable` (a hub found gone).
    fn dial_target(&self, unreachable: Option<String>) -> tokio::task::JoinHandle<Dialed> {
        tokio::spawn(Self::dial(
            self.route.target.clone(),
            self.identity.clone(),
            self.config.max_message_bytes,
            self.config.source_address,
            unreachable,
            self.config.grpc_channel,
        ))
    }

    /// Dials `hub` and attaches: over the framed channel where the hub speaks it (unless
    /// `grpc` asks for gRPC), otherwise over gRPC.
    async fn dial(
        hub: String,
        identity: Identity,
        max: usize,
        source: Option<std::net::IpAddr>,
        unreachable: Option<String>,
        grpc: bool,
    ) -> Dialed {
        let credentials =
            |e: rustls::Error| ConnectError::Refused(format!("the node's credentials: {e}"));
        if !grpc {
            let config =
                tls::framed_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)
                    .map_err(credentials)?;
            let tls = tls::connect_framed(&hub, config, source)
                .await
                .map_err(dial_failure)?;
            if tls.get_ref().1.alpn_protocol() == Some(sedna_proto::frame::ALPN) {
                return attach_framed(tls, max, unreachable).await;
            }
            // A hub that only speaks gRPC.
            tracing::debug!(%hub, "the hub does not speak the framed channel; using gRPC");
        }
        let config = tls::channel_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)
            .map_err(credentials)?;
        let channel = tls::connect_from(&hub, config, source)
            .await
            .map_err(dial_failure)?;
        let (tx, rx) = mpsc::channel::<Envelope>(1024);
        let outgoing =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
            );
        let mut client = HubClient::new(channel)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let mut request = tonic::Request::new(outgoing);
        if let Some(value) = unreachable.and_then(|u| u.parse().ok()) {
            request.metadata_mut().insert(UNREACHABLE_METADATA, value);
        }
        let response = client.attach(request).await.map_err(|s| refusal(&s))?;
        let lease_renewal = lease_renewal(
            response
                .metadata()
                .get(LEASE_RENEWAL_METADATA)
                .and_then(|v| v.to_str().ok()),
        );
        Ok(Live {
            tx,
            inbound: Box::pin(response.into_inner()),
            lease_renewal,
            _writer: None,
        })
    }

    /// Persists downstream envelopes in one transaction and returns the ids to acknowledge.
    /// If the batch fails, each is tried alone: one bad write does not hold back the others.
    fn persist(&self, batch: &[Envelope]) -> Vec<u64> {
        fn write(e: &Envelope) -> Option<Write<'_>> {
            let object = e.object.as_ref()?;
            Some(if e.op == Op::Upsert as i32 {
                Write::Upsert {
                    object,
                    rv: e.resource_version,
                    value: &e.payload,
                }
            } else {
                Write::Delete {
                    uid: &object.uid,
                    rv: e.resource_version,
                }
            })
        }
        let writes: Vec<Write<'_>> = batch.iter().filter_map(write).collect();
        if let Ok(changes) = self.store.write_all(&writes) {
            for c in changes {
                let _ = self.changes.send(c);
            }
            return batch.iter().map(|e| e.id).collect();
        }
        let mut persisted = Vec::with_capacity(batch.len());
        for e in batch {
            match self.store.write_all(write(e).as_slice()) {
                Ok(changes) => {
                    for c in changes {
                        let _ = self.changes.send(c);
                    }
                    persisted.push(e.id);
                }
                Err(err) => {
                    tracing::error!(node = %self.identity.node, id = e.id, error = %err, "could not persist; not acknowledged")
                }
            }
        }
        persisted
    }

    fn reconcile(&self, e: &Envelope, buckets: u32) -> Result<Vec<String>, StoreError> {
        let Ok(m) = Manifest::decode(e.payload.as_slice()) else {
            return Ok(vec![]);
        };
        let uids = sync::unpack_uids(&m.uids).unwrap_or_default();
        let pairs: Vec<(String, u64)> = uids.into_iter().zip(m.resource_versions).collect();
        let (want, changes) = self.store.reconcile_bucket(buckets, m.bucket, &pairs)?;
        for c in changes {
            let _ = self.changes.send(c);
        }
        Ok(want)
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let node = self.identity.node.clone();
        let mut machine = EdgeMachine::new(
            self.config.machine.clone(),
            self.config.seed,
            Instant::now(),
        );
        let mut live: Option<Live> = None;
        let mut dialing: Option<tokio::task::JoinHandle<Dialed>> = None;
        let mut buckets = sync::MIN_BUCKETS;
        let mut renew_at = self.renew_at();
        let mut queue: std::collections::VecDeque<Input> =
            std::collections::VecDeque::from([Input::Start]);
        // What the outputs of a step lead to comes before anything queued after that step
        // (a manifest's reconciliation before the next message that was already read).
        let mut next: std::collections::VecDeque<Input> = std::collections::VecDeque::new();
        // Downstream envelopes received together, persisted together.
        let mut batch: Vec<Envelope> = Vec::new();
        loop {
            while let Some(input) = next.pop_front().or_else(|| queue.pop_front()) {
                let outputs = machine.step(input, Instant::now());
                for output in outputs {
                    if !batch.is_empty() && !matches!(output, Output::Persist(_)) {
                        // What follows may read the store: the batch goes first.
                        next.push_back(Input::Persisted(self.persist(&batch)));
                        batch.clear();
                    }
                    match output {
                        Output::Dial => {
                            self.route.begin();
                            dialing = Some(self.dial_target(self.route.unreachable.clone()));
                        }
                        Output::Send(e) => {
                            if let Some(l) = &live
                                && l.tx.send(e).await.is_err()
                            {
                                next.push_back(Input::Closed("the stream closed".into()));
                            }
                        }
                        Output::Persist(e) => batch.push(e),
                        Output::Reconcile(e) => match self.reconcile(&e, buckets) {
                            Ok(want) => next.push_back(Input::Reconciled(want)),
                            Err(err) => {
                                tracing::error!(%node, error = %err, "could not reconcile a manifest")
                            }
                        },
                        Output::FetchUpstream { after, max } => {
                            match self.store.pending(after, max) {
                                Ok(entries) => next.push_back(Input::Outbox(entries)),
                                Err(err) => {
                                    tracing::error!(%node, error = %err, "could not read the outbox");
                                    next.push_back(Input::Outbox(vec![]));
                                }
                            }
                        }
                        Output::UpstreamDone(seqs) => {
                            if let Err(err) = self.store.remove(&seqs) {
                                tracing::error!(%node, error = %err, "could not trim the outbox");
                            }
                        }
                        Output::UpstreamRejected(seq, reason) => {
                            tracing::warn!(%node, seq, %reason, "the hub refused an upstream write; dropped");
                            let _ = self.store.remove(&[seq]);
                        }
                        Output::Certificate(pem) => {
                            if self.install_certificate(pem, &mut renew_at) {
                                live = None;
                                self.status.send_modify(|s| {
                                    s.connected = false;
                                    s.synced = false;
                                });
                                next.push_back(Input::Closed(
                                    "reconnecting with the renewed certificate".into(),
                                ));
                            }
                        }
                        Output::RenewRefused(reason) => {
                            tracing::warn!(%node, %reason, "certificate renewal refused; will retry");
                            self.renewing = None;
                            renew_at = Some(now_unix() + 60);
                        }
                        Output::Synced => {
                            self.status.send_modify(|s| {
                                s.synced = true;
                                s.syncs += 1;
                            });
                        }
                        Output::GaveUp(error) => {
                            tracing::error!(%node, %error, "no more connection attempts: join the node again (sedna join --replace)");
                            self.status
                                .send_modify(|s| s.refused = Some(error.to_string()));
                        }
                        Output::Disconnect(reason) => {
                            tracing::info!(%node, %reason, "dropping the connection");
                            live = None;
                            self.status.send_modify(|s| {
                                s.connected = false;
                                s.synced = false;
                            });
                        }
                    }
                }
            }
            if !batch.is_empty() {
                queue.push_back(Input::Persisted(self.persist(&batch)));
                batch.clear();
                continue;
            }
            let deadline = machine.next_deadline();
            let renew_due = renew_at.filter(|_| machine.connected() && self.renewing.is_none());
            tokio::select! {
                dialed = async {
                    match dialing.as_mut() {
                        Some(handle) => handle.await,
                        None => std::future::pending().await,
                    }
                }, if dialing.is_some() => {
                    dialing = None;
                    match dialed {
                        Ok(Err(ConnectError::Redirect(to))) => {
                            if self.route.redirected(&to) {
                                // The machine still waits for this dial's outcome: dial the
                                // hub that serves the node instead.
                                tracing::info!(%node, hub = %to, "redirected to the hub serving this node");
                                dialing = Some(self.dial_target(None));
                            } else {
                                queue.push_back(Input::ConnectFailed(ConnectError::Unreachable(format!(
                                    "redirected more than {MAX_REDIRECTS} times in a row (last to {to})"
                                ))));
                            }
                        }
                        Ok(Ok(l)) => match self.hello() {
                            Ok(hello) => {
                                tracing::debug!(%node, hub = %self.route.target, "connected to the hub");
                                self.route.connected();
                                self.hub_address.send_replace(self.route.target.clone());
                                buckets = Digest::decode(hello.payload.as_slice()).map(|d| d.buckets).unwrap_or(sync::MIN_BUCKETS);
                                let lease_renewal = l.lease_renewal;
                                live = Some(l);
                                self.status.send_modify(|s| {
                                    s.connected = true;
                                    s.connections += 1;
                                    s.lease_renewal = lease_renewal;
                                });
                                queue.push_back(Input::Connected { hello });
                            }
                            Err(err) => queue.push_back(Input::ConnectFailed(ConnectError::Unreachable(err.to_string()))),
                        },
                        Ok(Err(reason)) => {
                            tracing::debug!(%node, %reason, "connecting to the hub failed");
                            self.route.failed(&reason);
                            if self.route.dial_next_at_once(&reason) {
                                // The machine still waits for this round's outcome.
                                dialing = Some(self.dial_target(self.route.unreachable.clone()));
                            } else {
                                queue.push_back(Input::ConnectFailed(reason));
                            }
                        }
                        Err(join) => queue.push_back(Input::ConnectFailed(ConnectError::Unreachable(join.to_string()))),
                    }
                }
                message = async {
                    match live.as_mut() {
                        Some(l) => l.inbound.next().await,
                        None => std::future::pending().await,
                    }
                }, if live.is_some() => {
                    self.received(message, &mut live, &mut queue);
                    // What else has arrived is read now, to be persisted in one transaction.
                    for _ in 1..PERSIST_BATCH {
                        let Some(message) = live.as_mut().and_then(|l| l.inbound.next().now_or_never()) else {
                            break;
                        };
                        self.received(message, &mut live, &mut queue);
                    }
                }
                _ = self.outbox.notified() => queue.push_back(Input::OutboxChanged),
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // `select!` picks among ready branches at random: a message that has
                    // already arrived is read before the hub is judged silent (the tick
                    // follows it).
                    if let Some(message) = live.as_mut().and_then(|l| l.inbound.next().now_or_never()) {
                        self.received(message, &mut live, &mut queue);
                    }
                    queue.push_back(Input::Tick);
                }
                _ = async {
                    match renew_due {
                        Some(at) => tokio::time::sleep(Duration::from_secs(at.saturating_sub(now_unix()).max(0) as u64)).await,
                        None => std::future::pending().await,
                    }
                } => {
                    match join::new_request(&self.identity.node) {
                        Ok((key, csr)) => {
                            self.renewing = Some(key);
                            queue.push_back(Input::Renew(csr));
                        }
                        Err(err) => tracing::error!(%node, error = %err, "could not create a renewal request"),
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        if let Some(d) = dialing {
            d.abort();
        }
    }

    /// Handles what the hub's stream yielded: a message, or its end.
    fn received(
        &self,
        message: Option<Result<Envelope, tonic::Status>>,
        live: &mut Option<Live>,
        queue: &mut std::collections::VecDeque<Input>,
    ) {
        let node = &self.identity.node;
        match message {
            Some(Ok(e)) if e.op == Op::StreamOpen as i32 => {
                // Not part of the sync protocol: handed to the stream server.
                let token = String::from_utf8_lossy(&e.payload).into_owned();
                if self.stream_requests.try_send(token).is_err() {
                    tracing::warn!(%node, "too many stream requests waiting; one dropped");
                }
            }
            Some(Ok(e)) => queue.push_back(Input::Received(e)),
            other => {
                let reason = match other {
                    Some(Err(s)) => format!("{:?}: {}", s.code(), s.message()),
                    _ => "the hub closed the stream".into(),
                };
                tracing::info!(%node, %reason, "disconnected from the hub");
                *live = None;
                self.status.send_modify(|s| {
                    s.connected = false;
                    s.synced = false;
                });
                queue.push_back(Input::Closed(reason));
            }
        }
    }

    /// Saves a renewed certificate; returns whether to reconnect with it.
    fn install_certificate(&mut self, pem: String, renew_at: &mut Option<i64>) -> bool {
        let node = self.identity.node.clone();
        let Some(key) = self.renewing.take() else {
            tracing::warn!(%node, "a certificate arrived without a pending renewal; ignored");
            return false;
        };
        match join::certificate_info(&pem) {
            Ok(info) if info.node_name() == Some(node.as_str()) => {
                let identity = Identity {
                    node: node.clone(),
                    ca_pem: self.identity.ca_pem.clone(),
                    cert_pem: pem,
                    key_pem: key.serialize_pem(),
                };
                if let Err(err) = identity.save(&self.config.data_dir) {
                    tracing::error!(%node, error = %err, "could not save the renewed certificate");
                    return false;
                }
                self.identity = identity;
                *renew_at = self.renew_at();
                self.status.send_modify(|s| s.renewals += 1);
                tracing::info!(%node, "certificate renewed; reconnecting with it");
                true
            }
            _ => {
                tracing::warn!(%node, "the renewed certificate does not name this node; ignored");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Route {
        Route::new(vec!["a:1".into(), "b:1".into()])
    }

    #[test]
    fn a_hubs_renewal_cadence_is_read_only_when_sensible() {
        assert_eq!(lease_renewal(Some("30000")), Some(Duration::from_secs(30)));
        assert_eq!(lease_renewal(None), None);
        for odd in [
            "",
            "soon",
            "-5",
            "999",
            "3600001",
            "1e9",
            "18446744073709551616",
        ] {
            assert_eq!(lease_renewal(Some(odd)), None, "{odd:?}");
        }
    }

    #[test]
    fn a_hub_found_gone_after_a_redirect_is_reported_to_the_next_hub_once() {
        let mut r = route();
        assert!(r.redirected("c:1"));
        r.failed(&ConnectError::Unreachable("connection refused".into()));
        assert_eq!(r.unreachable.as_deref(), Some("c:1"));
        assert_eq!((r.target.as_str(), r.redirects), ("b:1", 0));
        // The next hub heard the claim and said when to come back, and who serves then.
        r.failed(&ConnectError::Later {
            after: Duration::from_secs(12),
            successor: Some("d:1".into()),
        });
        assert_eq!(
            r.unreachable, None,
            "the claim is not repeated after the wait"
        );
        assert_eq!(r.target, "d:1");
        // Without a successor: the next configured hub, again without the claim.
        r.unreachable = Some("c:1".into());
        r.failed(&ConnectError::Later {
            after: Duration::from_secs(12),
            successor: None,
        });
        assert_eq!((r.unreachable.as_deref(), r.target.as_str()), (None, "a:1"));
    }

    #[test]
    fn a_busy_hub_is_dialed_again_a_few_times_and_never_reported_gone() {
        let mut r = route();
        assert!(r.redirected("c:1"));
        let busy = || ConnectError::Busy("tls handshake eof".into());
        // Dialed again, a few times in a row, and never reported…
        for _ in 1..MAX_BUSY_IN_A_ROW {
            r.failed(&busy());
            assert_eq!((r.target.as_str(), r.unreachable.as_deref()), ("c:1", None));
        }
        // …then the next configured hub.
        r.failed(&busy());
        assert_eq!(r.unreachable, None);
        assert_eq!(r.target, "b:1");
        // A connection forgets the count.
        r.failed(&busy());
        r.connected();
        assert_eq!(r.busy, 0);
        // Nor is a configured hub that cannot be reached (no redirect pointed there).
        r.failed(&ConnectError::Unreachable("connection refused".into()));
        assert_eq!((r.unreachable.as_deref(), r.target.as_str()), (None, "a:1"));
    }

    #[test]
    fn hubs_that_cannot_be_reached_are_passed_over_at_once_each_once_per_round() {
        let mut r = Route::new(vec!["a:1".into(), "b:1".into(), "c:1".into()]);
        let refused = || ConnectError::Unreachable("connection refused".into());
        r.begin();
        r.failed(&refused());
        assert!(r.dial_next_at_once(&refused()));
        assert_eq!(r.target, "b:1");
        r.failed(&refused());
        assert!(r.dial_next_at_once(&refused()));
        assert_eq!(r.target, "c:1");
        // Every configured hub tried: the failure goes to the machine (a back-off).
        r.failed(&refused());
        assert!(!r.dial_next_at_once(&refused()));
        assert_eq!(r.target, "a:1");
        // A busy hub or an answer is not passed over at once.
        r.begin();
        let busy = ConnectError::Busy("tls handshake eof".into());
        r.failed(&busy);
        assert!(!r.dial_next_at_once(&busy));
        let later = ConnectError::Later {
            after: Duration::from_secs(3),
            successor: None,
        };
        r.failed(&later);
        assert!(!r.dial_next_at_once(&later));
        // A dead hub found after a redirect: the claim goes at once to the next hub.
        r.begin();
        r.target = "a:1".into();
        assert!(r.redirected("dead:1"));
        r.failed(&refused());
        assert!(r.dial_next_at_once(&refused()));
        assert_eq!(r.unreachable.as_deref(), Some("dead:1"));
    }

    #[test]
    fn redirects_in_a_row_are_bounded_then_the_next_configured_hub_is_dialed() {
        let mut r = route();
        for k in 0..MAX_REDIRECTS {
            assert!(r.redirected(&format!("h{k}:1")));
        }
        assert!(!r.redirected("loop:1"));
        assert_eq!((r.target.as_str(), r.redirects), ("b:1", 0));
        // A connection forgets the redirects and any claim.
        assert!(r.redirected("c:1"));
        r.unreachable = Some("x:1".into());
        r.connected();
        assert_eq!((r.redirects, r.unreachable.as_deref()), (0, None));
    }

    #[tokio::test]
    async fn an_empty_change_buffer_is_refused_as_a_setting() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = EdgeConfig::new("127.0.0.1:1", dir.path());
        config.change_buffer = 0;
        let err = EdgeHub::start(config).await.unwrap_err();
        assert!(matches!(err, EdgeError::Config(_)), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn a_hub_address_from_a_redirect_or_successor_must_be_host_and_port() {
        assert!(valid_hub_address("10.0.0.2:10000"));
        assert!(valid_hub_address("hub-2.example.com:443"));
        assert!(valid_hub_address("[::1]:10000"));
        assert!(!valid_hub_address("10.0.0.2"), "no port");
        assert!(!valid_hub_address(":10000"), "no host");
        assert!(!valid_hub_address("hub:0"));
        assert!(!valid_hub_address("hub:99999"));
        assert!(!valid_hub_address("http://hub:1"));
        assert!(!valid_hub_address("hub x:1"));
        assert!(!valid_hub_address(&format!("{}:1", "h".repeat(300))));
    }
}
