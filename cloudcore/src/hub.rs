//! The hub's tokio shell: the TLS listener (handshakes admitted by [`crate::gate`]), the gRPC
//! service (`Join`, `Attach`), one shared watch per routed kind feeding the router, and one
//! task per connected node running its [`Session`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use sedna_proto::channel::hub_server::{Hub as HubService, HubServer};
use sedna_proto::channel::{Envelope, JoinRequest, JoinResponse, TunnelFrame, Upstream};
use sedna_proto::identity::{self, JoinToken};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};

use crate::gate::{GateLimits, HandshakeGate};
use crate::interest::{FLEET, Interest, NodeSeen};
use crate::pki::HubPki;
use crate::router::{Downstream, Kind, ObjKey, Object, Router};
use crate::session::{Input, Output, Session, SessionConfig};
use crate::upstream::{self, Decision};

/// An edge write that took at least this long (queued for a permit plus the API call) is
/// logged with both parts, to find where slow status reports lose their time.
const SLOW_UPSTREAM: Duration = Duration::from_secs(1);

/// Hub settings.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Where the CA lives.
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Extra names or addresses for the serving certificate.
    pub extra_sans: Vec<String>,
    /// Session timing.
    pub session: SessionConfig,
    /// Validity of node certificates.
    pub node_cert_validity: Duration,
    /// Largest envelope accepted or sent.
    pub max_message_bytes: usize,
    /// Most TLS handshakes in progress at once; beyond it a newcomer takes a slot from the
    /// source holding the most (see [`crate::gate`]).
    pub max_concurrent_handshakes: usize,
    /// Most TLS handshakes in progress from one source address (and, separately, most
    /// connections from one address waiting for a handshake slot).
    pub max_handshakes_per_source: usize,
    /// Most connections waiting for a handshake slot (first come, first served): a
    /// reconnection storm beyond the slots waits instead of being refused, since a refused
    /// edge backs off for longer after each refusal. Each holds a file descriptor: with the
    /// slots and the connected nodes it must fit the process's limit. 0: none wait.
    pub max_waiting_handshakes: usize,
    /// How long a connection may wait for a handshake slot before it is closed (an edge gives
    /// up a dial after 10 s, handshake included).
    pub handshake_wait: Duration,
    /// Most node connections (connected, handshaking and waiting together); beyond it a new
    /// connection is closed at once. By default the process's open-file limit less 512 kept
    /// for the hub's own connections to the API server and its files: a hub that ran out of
    /// file descriptors could not renew its Leases either.
    pub max_connections: usize,
    /// Most TLS handshakes started per second (with bursts of one second's worth): after a hub
    /// dies, its nodes' reconnection storm is admitted at this pace, which also bounds the
    /// API writes their reconnections cause.
    pub max_handshakes_per_second: u32,
    /// How long a new connection has to send its TLS ClientHello.
    pub client_hello_timeout: Duration,
    /// How long a whole TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Node lifecycle (NotReady on lease expiry, eviction after an autonomy period); `None`
    /// leaves it to another controller (e.g. kube-controller-manager on a real cluster).
    pub lifecycle: Option<crate::lifecycle::LifecycleConfig>,
    /// Bounds on streams to nodes (`kubectl logs`, `exec`, `port-forward`).
    pub streams: crate::streams::StreamLimits,
    /// Most edge writes (Node status, Leases, pod status…) in flight to the API server at
    /// once, over all nodes. Beyond it writes wait their turn (in order): after a storm of
    /// reconnections the API server sees a bounded number of requests and connections from
    /// this hub, and the hub's own Lease renewals are not queued behind thousands of them.
    /// A quarter of it is kept for workload writes (pod and job status, events, pod
    /// deletions), so a backlog of node liveness writes never delays a pod's Running
    /// ([`upstream::permit_split`]).
    pub max_upstream_in_flight: usize,
    /// This hub's place in a tier of hubs sharing the nodes (`None`: it serves every node).
    pub tier: Option<crate::tier::TierConfig>,
}

impl HubConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 10000)),
            extra_sans: vec![],
            session: SessionConfig::default(),
            node_cert_validity: Duration::from_secs(30 * 86400),
            max_message_bytes: sedna_proto::DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent_handshakes: 256,
            max_handshakes_per_source: 32,
            max_waiting_handshakes: 1024,
            handshake_wait: Duration::from_secs(5),
            max_connections: default_max_connections(),
            max_handshakes_per_second: 1000,
            client_hello_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(10),
            lifecycle: Some(crate::lifecycle::LifecycleConfig::default()),
            streams: crate::streams::StreamLimits::default(),
            max_upstream_in_flight: 64,
            tier: None,
        }
    }
}

/// Counters an operator (and the tests) read.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Nodes connected now.
    pub connected: AtomicU64,
    /// Sessions started.
    pub sessions: AtomicU64,
    /// Of those, sessions over the framed channel (the rest over gRPC `Attach`).
    pub framed_sessions: AtomicU64,
    /// Buckets sent as manifests during resyncs.
    pub manifest_buckets: AtomicU64,
    /// Objects edges asked for during resyncs.
    pub objects_wanted: AtomicU64,
    /// UPSERT envelopes sent (first transmissions and retransmissions).
    pub upserts_sent: AtomicU64,
    /// DELETE envelopes sent.
    pub deletes_sent: AtomicU64,
    /// Payload bytes of UPSERT envelopes sent.
    pub payload_bytes_sent: AtomicU64,
    /// Upstream writes applied.
    pub upstream_applied: AtomicU64,
    /// Upstream writes refused.
    pub upstream_rejected: AtomicU64,
    /// Successful joins.
    pub joins: AtomicU64,
    /// Refused joins.
    pub joins_refused: AtomicU64,
    /// Connections refused for want of a valid node certificate.
    pub unauthenticated: AtomicU64,
    /// Connections closed before their TLS handshake: over the handshake bounds, evicted for
    /// another source, silent past the ClientHello deadline, or failed.
    pub handshakes_dropped: AtomicU64,
    /// Of those, connections refused on arrival (every handshake slot and waiting place
    /// taken, or the hub at `max_connections`).
    pub handshakes_refused: AtomicU64,
    /// Connections that waited for a handshake slot (whether they got one or not).
    pub handshakes_queued: AtomicU64,
    /// In a tier: partitions this hub serves now.
    pub partitions_served: AtomicU64,
    /// In a tier: partitions this hub stopped serving without giving them up (not renewed
    /// in time: a slow or unreachable API server, or another hub took them).
    pub partitions_lost: AtomicU64,
    /// In a tier: nodes sent to the hub that serves them.
    pub redirects: AtomicU64,
    /// Node Lease renewals acknowledged without an API write (the stored one was recent).
    pub lease_writes_skipped: AtomicU64,
    /// Nodes this hub's lifecycle marked NotReady.
    pub nodes_marked_not_ready: AtomicU64,
    /// Node status reports applied without their metadata (this session applied it already
    /// and the API still holds it): one API request instead of two.
    pub node_status_only: AtomicU64,
}

/// Why the hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Certificates could not be prepared.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// The listener could not bind.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Error.
        source: std::io::Error,
    },
    /// The API refused to publish the CA.
    #[error(transparent)]
    Token(#[from] crate::tokens::TokenError),
    /// The revoked certificates could not be read from the API.
    #[error("reading revoked node certificates: {0}")]
    Revocations(#[from] kube::Error),
}

impl HubError {
    /// Whether trying again could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, HubError::Listen { .. } | HubError::Revocations(_))
            || matches!(self, HubError::Token(t) if t.is_retryable())
    }
}

struct Registered {
    generation: u64,
    /// Boxed, as the session's other channels: a channel allocates its first block of slots
    /// when created, and an idle node should cost little.
    routed: mpsc::UnboundedSender<Box<Downstream>>,
    /// The session's outbound envelopes (for unsequenced requests such as STREAM_OPEN).
    control: mpsc::Sender<Box<Envelope>>,
}

struct Shared {
    shutdown: watch::Receiver<bool>,
    router: Mutex<Router>,
    sessions: Mutex<HashMap<String, Registered>>,
    /// Nodes whose last session here ended: when they were last heard, and the lease
    /// duration they announced (see [`crate::liveness::Contact`]).
    lost: Mutex<HashMap<String, (jiff::Timestamp, Duration)>>,
    ready: watch::Sender<bool>,
    generation: AtomicU64,
    pki: HubPki,
    client: kube::Client,
    config: HubConfig,
    revocations: crate::revocation::Revocations,
    stats: Arc<HubStats>,
    streams: crate::streams::Streams,
    tier: Option<Arc<crate::tier::Tier>>,
    /// Which of the fleet's objects this hub keeps (see [`crate::interest`]).
    interest: Mutex<Interest>,
    /// The generation the fleet kinds should have listed ([`Interest::generation`]).
    relist: watch::Sender<u64>,
    /// Grows whenever what is loaded or wanted changes (sessions wait for their node).
    loaded: watch::Sender<u64>,
    /// Permits for edge writes to the API (see [`HubConfig::max_upstream_in_flight`]): node
    /// liveness writes (Lease, Node) and the others.
    liveness_permits: Arc<tokio::sync::Semaphore>,
    workload_permits: Arc<tokio::sync::Semaphore>,
}

impl Shared {
    fn router(&self) -> std::sync::MutexGuard<'_, Router> {
        self.router
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registered>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn interest(&self) -> std::sync::MutexGuard<'_, Interest> {
        self.interest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The partitions this hub wants the fleet's objects of now: their objects are listed
    /// again if it gained some, forgotten if it dropped some.
    fn want(&self, partitions: &[u32]) {
        let (wanted, generation) = {
            let mut interest = self.interest();
            (interest.want(partitions), interest.generation())
        };
        if wanted.relist {
            self.relist.send_replace(generation);
        }
        if !wanted.dropped.is_empty() {
            tracing::info!(partitions = ?wanted.dropped, "forgetting the objects of partitions no longer kept");
            self.forget_unkept();
        }
        if wanted.relist || !wanted.dropped.is_empty() {
            self.loaded.send_modify(|g| *g += 1);
        }
    }

    /// Drops the cached objects of nodes this hub no longer keeps (their sessions ended).
    fn forget_unkept(&self) {
        let bound = self.router().node_bound();
        let gone: Vec<ObjKey> = {
            let interest = self.interest();
            bound
                .into_iter()
                .filter(|(_, node)| !interest.keeps(node))
                .map(|(key, _)| key)
                .collect()
        };
        let mut routed = Vec::new();
        {
            let mut router = self.router();
            for key in &gone {
                routed.extend(router.delete(key));
            }
        }
        self.dispatch(routed);
    }

    /// Whether `node`'s session may be sent its view: every kind listed once and its
    /// objects loaded (waits for both); `false` once the tier no longer serves it here.
    async fn view_ready(&self, node: &str) -> bool {
        let mut ready = self.ready.subscribe();
        let mut loaded = self.loaded.subscribe();
        loop {
            loaded.borrow_and_update();
            if *ready.borrow_and_update() {
                let (loaded, label) = {
                    let interest = self.interest();
                    (
                        interest.ready(node),
                        interest.label(node).map(str::to_owned),
                    )
                };
                if loaded {
                    return true;
                }
                // A partition just claimed is served before its objects are wanted.
                if let Some(tier) = &self.tier
                    && !tier.serves_node(node, label.as_deref())
                {
                    return false;
                }
            }
            tokio::select! {
                r = ready.changed() => if r.is_err() { return false },
                l = loaded.changed() => if l.is_err() { return false },
            }
        }
    }

    fn lost(&self) -> std::sync::MutexGuard<'_, HashMap<String, (jiff::Timestamp, Duration)>> {
        self.lost
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What this hub knows first-hand of a node's liveness.
    fn contact(&self, node: &str) -> Option<crate::liveness::Contact> {
        if self.sessions().contains_key(node) {
            return Some(crate::liveness::Contact::Connected);
        }
        self.lost()
            .get(node)
            .map(|&(at, lease)| crate::liveness::Contact::Lost { at, lease })
    }

    /// How node Lease renewals reach the API.
    fn lease_policy(&self) -> crate::liveness::LeasePolicy {
        self.config
            .lifecycle
            .map_or(crate::liveness::LeasePolicy::Follow, |l| l.lease_policy())
    }

    /// What an accepted attach tells the node about renewing its Lease
    /// (`sedna-lease-renewal-ms`), if anything.
    fn renewal_ask_ms(&self) -> Option<u64> {
        let every = self.lease_policy().renewal_interval()?;
        Some(u64::try_from(every.as_millis()).unwrap_or(u64::MAX))
    }

    fn dispatch(&self, routed: Vec<(String, Downstream)>) {
        if routed.is_empty() {
            return;
        }
        let sessions = self.sessions();
        for (node, d) in routed {
            if let Some(s) = sessions.get(&node) {
                let _ = s.routed.send(Box::new(d));
            }
        }
    }
}

/// A running hub.
pub struct Hub {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("addr", &self.addr).finish()
    }
}

impl Hub {
    /// Prepares the CA, publishes it in the API, starts watching and listening.
    pub async fn start(config: HubConfig, client: kube::Client) -> Result<Hub, HubError> {
        let pki = HubPki::load_or_create(&config.data_dir.join("pki"), &config.extra_sans)?;
        crate::tokens::publish_ca(&client, pki.ca_pem()).await?;
        let tls = pki.server_config()?;
        let listener = listen(config.listen).map_err(|source| HubError::Listen {
            addr: config.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| HubError::Listen {
            addr: config.listen,
            source,
        })?;
        let (ready, _) = watch::channel(false);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let config_streams = config.streams;
        let (liveness_in_flight, workload_in_flight) =
            upstream::permit_split(config.max_upstream_in_flight);
        let tier = config
            .tier
            .clone()
            .map(|t| Arc::new(crate::tier::Tier::new(t)));
        let interest = match &config.tier {
            None => Interest::everything(),
            Some(t) if t.mode == crate::partitions::Mode::Static => Interest::tier(
                t.partitions,
                Some(&[&t.primary[..], &t.standby[..]].concat()),
            ),
            Some(t) => Interest::tier(t.partitions, None),
        };
        let (relist, _) = watch::channel(interest.generation());
        let (loaded, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            shutdown: shutdown_rx.clone(),
            router: Mutex::new(Router::new()),
            sessions: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashMap::new()),
            ready,
            generation: AtomicU64::new(0),
            pki,
            client,
            config,
            stats: Arc::default(),
            revocations: crate::revocation::Revocations::default(),
            streams: crate::streams::Streams::new(config_streams),
            tier,
            interest: Mutex::new(interest),
            relist,
            loaded,
            liveness_permits: Arc::new(tokio::sync::Semaphore::new(liveness_in_flight)),
            workload_permits: Arc::new(tokio::sync::Semaphore::new(workload_in_flight)),
        });
        shared.revocations.load(&shared.client).await?;
        let mut tasks = Vec::new();
        let (init_tx, init_rx) = mpsc::unbounded_channel();
        for kind in Kind::ALL {
            tasks.push(tokio::spawn(watch_kind(
                shared.clone(),
                kind,
                init_tx.clone(),
            )));
        }
        tasks.push(tokio::spawn(track_readiness(shared.clone(), init_rx)));
        tasks.push(tokio::spawn(follow_revocations(shared.clone())));
        if let Some(tier) = shared.tier.clone() {
            let weak = Arc::downgrade(&shared);
            tasks.push(tokio::spawn(crate::tier::run(
                tier,
                shared.client.clone(),
                shared.stats.clone(),
                move |kept, gone| {
                    if let Some(shared) = weak.upgrade() {
                        if !gone.is_empty() {
                            end_sessions_in(&shared, gone);
                        }
                        let multi = shared
                            .config
                            .tier
                            .as_ref()
                            .is_some_and(|t| t.mode == crate::partitions::Mode::MultiPrimary);
                        if multi {
                            shared.want(kept);
                        }
                    }
                },
            )));
        }
        if let Some(lifecycle) = shared.config.lifecycle {
            tasks.push(tokio::spawn(node_lifecycle(shared.clone(), lifecycle)));
        }
        tasks.push(tokio::spawn(serve(
            shared.clone(),
            listener,
            tls,
            shutdown_rx,
        )));
        tracing::info!(%addr, pin = %shared.pki.pin(), "hub listening");
        Ok(Hub {
            shared,
            addr,
            shutdown,
            tasks,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA pin join tokens must carry.
    pub fn pin(&self) -> String {
        self.shared.pki.pin()
    }

    /// The hub's counters.
    pub fn stats(&self) -> Arc<HubStats> {
        self.shared.stats.clone()
    }

    /// Opens a byte stream to `node`'s stream server over its connection (see
    /// [`crate::streams`]).
    pub async fn open_stream(
        &self,
        node: &str,
    ) -> Result<crate::streams::NodeStream, sedna_apiserver::nodestream::DialError> {
        open_stream(&self.shared, node).await
    }

    /// A dialer for the API server's `pods/log`, `exec`, `attach` and `portforward`.
    pub fn node_dialer(&self) -> sedna_apiserver::nodestream::NodeDialer {
        let shared = Arc::downgrade(&self.shared);
        sedna_apiserver::nodestream::NodeDialer(Arc::new(move |node: &str| {
            let (shared, node) = (shared.clone(), node.to_owned());
            Box::pin(async move {
                let shared = shared.upgrade().ok_or_else(|| {
                    sedna_apiserver::nodestream::DialError::Failed("the hub stopped".into())
                })?;
                let stream = open_stream(&shared, &node).await?;
                Ok(Box::new(stream) as Box<dyn sedna_apiserver::nodestream::NodeIo>)
            })
        }))
    }

    /// The partitions this hub serves now (`None` outside a tier).
    pub fn served_partitions(&self) -> Option<Vec<u32>> {
        self.shared.tier.as_ref().map(|t| t.served())
    }

    /// The partitions whose nodes' objects this hub keeps: those it serves and, with every
    /// hub active, those it would take over if one other hub died (`None` outside a tier).
    pub fn kept_partitions(&self) -> Option<Vec<u32>> {
        self.shared.tier.as_ref().map(|t| t.kept())
    }

    /// Which hub of the tier serves each partition, as this hub last read it (`None` outside
    /// a tier).
    pub fn partition_owners(&self) -> Option<std::collections::BTreeMap<u32, String>> {
        self.shared.tier.as_ref().map(|t| t.owners())
    }

    /// Nodes connected to this hub now.
    pub fn connected_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.shared.sessions().keys().cloned().collect();
        nodes.sort();
        nodes
    }

    /// The objects of `kind` this hub caches now, as `namespace/name` (`name` for Nodes),
    /// sorted: in a tier, a Node, node Lease or bound Pod only if its node's partition is
    /// kept here (see [`crate::interest`]).
    pub fn cached(&self, kind: Kind) -> Vec<String> {
        let mut names: Vec<String> = self
            .shared
            .router()
            .keys_of(kind)
            .into_iter()
            .map(|k| {
                if k.namespace.is_empty() {
                    k.name
                } else {
                    format!("{}/{}", k.namespace, k.name)
                }
            })
            .collect();
        names.sort();
        names
    }

    /// Whether every kind has been listed once (sessions wait for it).
    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Stops listening and ends every session.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.shared.sessions().clear();
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

async fn open_stream(
    shared: &Shared,
    node: &str,
) -> Result<crate::streams::NodeStream, sedna_apiserver::nodestream::DialError> {
    use sedna_apiserver::nodestream::DialError;
    let control = shared
        .sessions()
        .get(node)
        .map(|s| s.control.clone())
        .ok_or_else(|| DialError::NotConnected(node.to_owned()))?;
    let slot = shared.streams.reserve(node)?;
    let (token, arrived) = shared.streams.expect(node);
    let ask = Envelope {
        op: sedna_proto::channel::Op::StreamOpen as i32,
        payload: token.clone().into_bytes(),
        ..Default::default()
    };
    let timeout = shared.streams.limits().open_timeout;
    let result = tokio::time::timeout(timeout, async {
        control
            .send(Box::new(ask))
            .await
            .map_err(|_| DialError::NotConnected(node.to_owned()))?;
        arrived
            .await
            .map_err(|_| DialError::Failed(format!("node {node}'s stream was dropped")))
    })
    .await;
    match result {
        Ok(Ok(io)) => Ok(crate::streams::NodeStream { io, _slot: slot }),
        Ok(Err(e)) => {
            shared.streams.forget(&token);
            Err(e)
        }
        Err(_) => {
            shared.streams.forget(&token);
            Err(DialError::Failed(format!(
                "node {node} did not open the stream within {}s",
                timeout.as_secs()
            )))
        }
    }
}

/// Ends `node`'s session here, if it has one (it dials again and is sent where it belongs).
fn end_session(shared: &Shared, node: &str) {
    drop(shared.sessions().remove(node));
    shared.router().detach(node);
}

/// Ends the sessions of nodes in partitions this hub no longer serves; they dial again and
/// are sent to the new owner.
fn end_sessions_in(shared: &Shared, lost: &[u32]) {
    if shared.tier.is_none() {
        return;
    }
    let nodes: Vec<String> = shared.sessions().keys().cloned().collect();
    for node in nodes {
        let partition = shared.interest().partition(&node);
        if lost.contains(&partition) {
            tracing::info!(%node, "partition lost: ending the node's session");
            end_session(shared, &node);
        }
    }
}

/// Applies an authorized edge write in its own task, once a permit of its class is free;
/// `on_applied` runs if the API took it. The outcome goes back to the session.
fn spawn_apply(
    shared: &Shared,
    node: &str,
    id: u64,
    upstream: Upstream,
    done_tx: &mpsc::UnboundedSender<Box<Done>>,
    on_applied: impl FnOnce() + Send + 'static,
) {
    let client = shared.client.clone();
    let node = node.to_owned();
    let done_tx = done_tx.clone();
    let stats = shared.stats.clone();
    let permits = if upstream::is_liveness(&upstream) {
        shared.liveness_permits.clone()
    } else {
        shared.workload_permits.clone()
    };
    tokio::spawn(async move {
        let queued = tokio::time::Instant::now();
        let Ok(_permit) = permits.acquire_owned().await else {
            return;
        };
        let sent = tokio::time::Instant::now();
        let outcome = upstream::apply(&client, &node, &upstream).await;
        if queued.elapsed() >= SLOW_UPSTREAM {
            tracing::info!(
                %node,
                kind = upstream.kind,
                waited_ms = (sent - queued).as_millis() as u64,
                api_ms = sent.elapsed().as_millis() as u64,
                "slow edge write"
            );
        }
        match &outcome {
            crate::session::UpstreamOutcome::Applied => {
                stats.upstream_applied.fetch_add(1, Ordering::Relaxed);
                on_applied();
            }
            crate::session::UpstreamOutcome::Rejected(_) => {
                stats.upstream_rejected.fetch_add(1, Ordering::Relaxed);
            }
            crate::session::UpstreamOutcome::Retry => {}
        }
        let _ = done_tx.send(Box::new(Done::Applied(id, outcome)));
    });
}

/// Marks nodes with expired leases NotReady; evicts after an autonomy period.
async fn node_lifecycle(shared: Arc<Shared>, config: crate::lifecycle::LifecycleConfig) {
    let mut ready = shared.ready.subscribe();
    let _ = ready.wait_for(|r| *r).await;
    let mut tick = tokio::time::interval(config.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = HashSet::new();
    loop {
        tick.tick().await;
        // In a tier, each hub looks after the nodes of its partitions.
        // Not before its objects are loaded (a Lease not listed yet is not an expired one).
        let serves = |node: &str, label: Option<&str>| {
            shared
                .tier
                .as_ref()
                .is_none_or(|t| t.serves_node(node, label))
                && shared.interest().ready(node)
        };
        let work = {
            let router = shared.router();
            // First-hand knowledge of nodes that are gone or served elsewhere now is dropped.
            shared.lost().retain(|node, _| {
                router
                    .get(&ObjKey::new(Kind::Node, "", node))
                    .is_some_and(|n| serves(node, n.partition_label.as_deref()))
            });
            crate::lifecycle::plan(
                &router,
                jiff::Timestamp::now(),
                config.grace,
                &mut warned,
                serves,
                |node| shared.contact(node),
            )
        };
        let marked = crate::lifecycle::apply(&shared.client, work).await;
        shared
            .stats
            .nodes_marked_not_ready
            .fetch_add(marked, Ordering::Relaxed);
    }
}

async fn track_readiness(shared: Arc<Shared>, mut init: mpsc::UnboundedReceiver<Kind>) {
    let mut done: HashSet<Kind> = HashSet::new();
    while let Some(kind) = init.recv().await {
        done.insert(kind);
        if done.len() == Kind::ALL.len() {
            shared.ready.send_replace(true);
            tracing::info!(objects = shared.router().len(), "hub cache ready");
        }
    }
}

/// Follows the kept revocations (`sedna node revoke`, other hubs): a node revoked anew loses
/// its session at once; its certificate is refused from then on.
async fn follow_revocations(shared: Arc<Shared>) {
    use k8s_openapi::api::core::v1::ConfigMap;
    let (namespace, name) = crate::revocation::REVOCATIONS_CONFIGMAP;
    let api: Api<ConfigMap> = Api::namespaced(shared.client.clone(), namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    // kube-runtime's default backoff: growing, with jitter, reset after a success.
    let mut stream = watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                for node in shared.revocations.merge(&cm.data.unwrap_or_default()) {
                    if shared.sessions().remove(&node).is_some() {
                        tracing::warn!(%node, "node revoked: its session ended");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "watching the revocations"),
        }
    }
}

/// A deleted Node: its certificates issued until now are revoked (recorded in the API, so
/// other hubs and restarts see it) and its session, if any, ends.
async fn revoke(shared: &Shared, node: &str) {
    let at = crate::revocation::now_ms();
    shared.revocations.revoke(node, at);
    if let Err(e) = crate::revocation::Revocations::persist(&shared.client, node, at).await {
        tracing::error!(%node, error = %e, "the revocation could not be recorded in the API");
    }
    drop(shared.sessions().remove(node));
    tracing::warn!(%node, "Node deleted: its certificates are revoked");
}

/// Whether this hub keeps `o`, of `kind` (see [`crate::interest`]). A Node moving in or out
/// of what this hub keeps asks for a list of the fleet's kinds, or ends its session here.
fn admit(shared: &Shared, kind: Kind, o: &DynamicObject) -> bool {
    let name = o.metadata.name.as_deref().unwrap_or_default();
    match kind {
        Kind::Node => {
            let label = o
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(crate::partitions::PARTITION_LABEL))
                .map(String::as_str);
            let (seen, generation) = {
                let mut interest = shared.interest();
                (interest.node_seen(name, label), interest.generation())
            };
            match seen {
                NodeSeen::Keep => true,
                NodeSeen::Skip => false,
                NodeSeen::KeepAndRelist => {
                    tracing::info!(
                        node = name,
                        "Node moved into a partition served here: listing its objects"
                    );
                    shared.relist.send_replace(generation);
                    true
                }
                NodeSeen::Forget => {
                    tracing::info!(node = name, "Node moved out of the partitions served here");
                    end_session(shared, name);
                    shared.forget_unkept();
                    shared.loaded.send_modify(|g| *g += 1);
                    false
                }
            }
        }
        Kind::Lease => shared.interest().keeps(name),
        Kind::Pod => match o.data.pointer("/spec/nodeName").and_then(|n| n.as_str()) {
            Some(node) if !node.is_empty() => shared.interest().keeps(node),
            _ => true,
        },
        _ => true,
    }
}

/// The key of a watched object of `kind`.
fn key_of(kind: Kind, o: &DynamicObject) -> ObjKey {
    ObjKey::new(
        kind,
        o.metadata.namespace.as_deref().unwrap_or_default(),
        o.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Caches `o` if this hub keeps it (dropping an older copy otherwise) and routes the change.
fn cache(shared: &Shared, kind: Kind, o: DynamicObject) {
    if !admit(shared, kind, &o) {
        let routed = shared.router().delete(&key_of(kind, &o));
        shared.dispatch(routed);
        return;
    }
    let Some(obj) = serde_json::to_value(o)
        .ok()
        .and_then(|v| Object::from_value(kind, v))
    else {
        return;
    };
    let routed = shared.router().upsert(obj);
    shared.dispatch(routed);
}

/// One shared watch of a kind: feeds the router, reports its first complete list. The fleet's
/// kinds ([`FLEET`]) list only once the hub knows which partitions it keeps, and list again
/// when it keeps more ([`Interest::generation`]); a list under way is finished first.
async fn watch_kind(shared: Arc<Shared>, kind: Kind, init: mpsc::UnboundedSender<Kind>) {
    let resource = upstream::api_resource(kind);
    let api: Api<DynamicObject> = if kind == Kind::Lease {
        Api::namespaced_with(shared.client.clone(), "kube-node-lease", &resource)
    } else {
        Api::all_with(shared.client.clone(), &resource)
    };
    let fleet = FLEET.contains(&kind);
    let mut relist = shared.relist.subscribe();
    let mut reported = false;
    let mut backoff = Duration::from_millis(200);
    loop {
        let generation = if fleet {
            match relist.wait_for(|g| *g > 0).await {
                Ok(g) => *g,
                Err(_) => return,
            }
        } else {
            0
        };
        let started = tokio::time::Instant::now();
        let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
        let mut relisted: Option<HashSet<ObjKey>> = None;
        loop {
            let event = tokio::select! {
                event = stream.next() => match event {
                    Some(event) => event,
                    None => return,
                },
                changed = relist.changed(), if fleet && relisted.is_none() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
            };
            match event {
                Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
                Ok(watcher::Event::InitApply(o)) => {
                    if let Some(seen) = relisted.as_mut() {
                        seen.insert(key_of(kind, &o));
                    }
                    cache(&shared, kind, o);
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(seen) = relisted.take() {
                        if kind == Kind::Node {
                            // Every Node seen before, cached here or not: its certificates
                            // are revoked.
                            let gone: Vec<String> = shared
                                .interest()
                                .nodes()
                                .filter(|n| !seen.contains(&ObjKey::new(Kind::Node, "", n)))
                                .map(str::to_owned)
                                .collect();
                            for node in gone {
                                revoke(&shared, &node).await;
                                shared.interest().node_gone(&node);
                            }
                        }
                        let stale: Vec<ObjKey> = shared
                            .router()
                            .keys_of(kind)
                            .into_iter()
                            .filter(|k| !seen.contains(k))
                            .collect();
                        for key in stale {
                            let routed = shared.router().delete(&key);
                            shared.dispatch(routed);
                        }
                    }
                    if fleet && shared.interest().listed(kind, generation) {
                        shared.loaded.send_modify(|g| *g += 1);
                    }
                    if fleet {
                        tracing::info!(
                            kind = kind.name(),
                            generation,
                            ms = started.elapsed().as_millis() as u64,
                            "fleet kind listed"
                        );
                    }
                    if !reported {
                        reported = true;
                        let _ = init.send(kind);
                    }
                    backoff = Duration::from_millis(200);
                    if fleet && *relist.borrow() != generation {
                        break;
                    }
                }
                Ok(watcher::Event::Apply(o)) => cache(&shared, kind, o),
                Ok(watcher::Event::Delete(o)) => {
                    let name = o.metadata.name.as_deref().unwrap_or_default();
                    if kind == Kind::Node {
                        revoke(&shared, name).await;
                        shared.interest().node_gone(name);
                    }
                    let routed = shared.router().delete(&key_of(kind, &o));
                    shared.dispatch(routed);
                }
                Err(e) => {
                    // A kind whose CRD is not installed lists as empty until it is.
                    let missing = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
                    if missing && !reported {
                        reported = true;
                        let _ = init.send(kind);
                    }
                    if !missing {
                        tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Open files kept for the hub's own use (API connections, files) out of the process's limit.
const RESERVED_FILES: u64 = 512;

/// The process's open-file limit less [`RESERVED_FILES`] (at least 64).
fn default_max_connections() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    usize::try_from(soft.saturating_sub(RESERVED_FILES).max(64)).unwrap_or(usize::MAX)
}

/// How long the accept loop pauses after `failures` failed accepts in a row: 10 ms, doubling,
/// at most 1 s (connections wait in the backlog meanwhile).
fn accept_pause(failures: u32) -> Duration {
    Duration::from_millis(10)
        .saturating_mul(1 << failures.saturating_sub(1).min(7))
        .min(Duration::from_secs(1))
}

/// Connections the kernel may hold for the accept loop (capped by `net.core.somaxconn`).
/// Tokio's default is 1,024: when a hub dies, thousands of its nodes dial the others within a
/// second or two, and beyond the backlog the kernel drops their SYNs, which makes each of them
/// wait for a retransmission (1 s, then 3 s, 7 s: most edges give up the dial at 10 s).
const LISTEN_BACKLOG: u32 = 4096;

/// The hub's listening socket (address reuse as `TcpListener::bind`, a deep backlog).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let gate = HandshakeGate::new(GateLimits {
        per_source: shared.config.max_handshakes_per_source,
        total: shared.config.max_concurrent_handshakes,
        waiting: shared.config.max_waiting_handshakes,
    });
    let pace = Arc::new(crate::rate::Bucket::new(u64::from(
        shared.config.max_handshakes_per_second,
    )));
    let (conn_tx, conn_rx) = mpsc::channel(1024);
    let accept = {
        let mut shutdown = shutdown.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                // Accept first, always: admission is decided per connection, never by
                // leaving connections in the kernel's backlog.
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = shutdown.changed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => {
                        failures = 0;
                        a
                    }
                    Err(e) => {
                        // Out of file descriptors, typically: accepting again at once would
                        // fail at once, a loop burning a core. Pause, longer while it lasts.
                        if failures == 0 {
                            tracing::warn!(error = %e, "accepting connections failed; pausing");
                        }
                        failures = failures.saturating_add(1);
                        tokio::time::sleep(accept_pause(failures)).await;
                        continue;
                    }
                };
                let sessions = usize::try_from(shared.stats.connected.load(Ordering::Relaxed))
                    .unwrap_or(usize::MAX);
                let admitted = gate.admit_below(peer.ip(), sessions, shared.config.max_connections);
                let admission = match admitted {
                    Ok(admission) => admission,
                    Err(why) => {
                        shared
                            .stats
                            .handshakes_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        shared
                            .stats
                            .handshakes_refused
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, %why, "connection closed before its handshake");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                tokio::spawn(handshake(
                    shared.clone(),
                    tcp,
                    tls.clone(),
                    admission,
                    conn_tx.clone(),
                    pace.clone(),
                ));
            }
        })
    };
    let incoming =
        futures_util::stream::unfold(
            conn_rx,
            |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
        );
    let max = shared.config.max_message_bytes;
    let service = HubServer::new(Service {
        shared: shared.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(None)
        .serve_with_incoming_shutdown(service, incoming, async move {
            let _ = shutdown.changed().await;
        });
    if let Err(e) = server.await {
        tracing::error!(error = %e, "hub server stopped");
    }
    accept.abort();
}

/// One TLS handshake, once it has a slot (waiting for one at most `handshake_wait`), under the
/// ClientHello and handshake deadlines, abandoned if its slot is given to another source; a
/// finished one is a framed channel ([`admit_framed`], [`serve_framed`]) or goes to the gRPC server.
async fn handshake(
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    tls: Arc<rustls::ServerConfig>,
    admission: crate::gate::Admission,
    conn_tx: mpsc::Sender<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>,
    pace: Arc<crate::rate::Bucket>,
) {
    let stream = tls_handshake(&shared, tcp, tls, admission, &pace).await;
    match stream {
        Some(stream) if stream.get_ref().1.alpn_protocol() == Some(sedna_proto::frame::ALPN) => {
            // The session in a task of its own: this one's futures (handshake, admission) are
            // several KiB, and a task keeps its largest state's size for its whole life.
            if let Some(admitted) = admit_framed(&shared, stream).await {
                let session = serve_framed(shared, admitted);
                tokio::spawn(session);
            }
        }
        Some(stream) => {
            let _ = conn_tx.send(Ok(stream)).await;
        }
        None => {
            shared
                .stats
                .handshakes_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The TLS handshake of [`handshake`], once it has a slot; `None` if it failed or its slot
/// went to another source.
async fn tls_handshake(
    shared: &Shared,
    tcp: tokio::net::TcpStream,
    tls: Arc<rustls::ServerConfig>,
    admission: crate::gate::Admission,
    pace: &crate::rate::Bucket,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let ticket = match admission {
        crate::gate::Admission::Now(ticket) => Some(ticket),
        crate::gate::Admission::Queued(queued) => {
            shared
                .stats
                .handshakes_queued
                .fetch_add(1, Ordering::Relaxed);
            tokio::time::timeout(shared.config.handshake_wait, queued.turn())
                .await
                .ok()
                .flatten()
        }
    };
    let mut ticket = ticket?;
    let config = &shared.config;
    let work = async {
        // Its turn at the handshake rate (holding its admission slot meanwhile).
        pace.take(1).await;
        let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        let start = tokio::time::timeout(config.client_hello_timeout, hello)
            .await
            .ok()?
            .ok()?;
        let rest = config
            .handshake_timeout
            .saturating_sub(config.client_hello_timeout);
        tokio::time::timeout(rest, start.into_stream(tls))
            .await
            .ok()?
            .ok()
    };
    tokio::select! {
        stream = work => stream,
        _ = &mut ticket.evicted => None,
    }
}

struct Service {
    shared: Arc<Shared>,
}

pub use sedna_proto::{
    REDIRECT_METADATA, RETRY_AFTER_METADATA, SUCCESSOR_METADATA, UNREACHABLE_METADATA,
};

/// The node a client certificate names, and when that certificate was issued.
fn cert_node(leaf: &[u8]) -> Option<(String, Option<u64>)> {
    let info = identity::certificate_info(leaf).ok()?;
    let issued = crate::revocation::issued_ms(&info.serial);
    info.node_name().map(|n| (n.to_owned(), issued))
}

/// The node a connection's client certificate (`leaf`) names, unless it is missing or revoked.
fn authenticate(shared: &Shared, leaf: Option<&[u8]>) -> Result<(String, Option<u64>), Status> {
    let Some((node, issued)) = leaf.and_then(cert_node) else {
        shared.stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
        return Err(Status::unauthenticated(
            "the channel requires a node certificate (join first)",
        ));
    };
    if shared.revocations.is_revoked(&node, issued) {
        shared.stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
        return Err(Status::permission_denied(format!(
            "the certificate of node {node:?} was revoked (its Node was deleted): join again"
        )));
    }
    Ok((node, issued))
}

/// Whether this hub serves `node` now; the refusal otherwise names the hub that does
/// (`sedna-redirect`) or when to try again (`sedna-retry-after-ms`, `sedna-successor`).
/// `unreachable` is the hub the node says it could not reach.
fn place(shared: &Shared, node: &str, unreachable: Option<&str>) -> Result<(), Status> {
    let Some(tier) = &shared.tier else {
        return Ok(());
    };
    let label = shared.interest().label(node).map(str::to_owned);
    match tier.place(node, label.as_deref(), unreachable) {
        crate::tier::Placement::Here => Ok(()),
        crate::tier::Placement::Elsewhere {
            partition,
            hub,
            address,
        } => {
            let mut status = Status::failed_precondition(format!(
                "node {node} is in partition {partition}, served by hub {hub} at {address}"
            ));
            if let Ok(value) = address.parse() {
                status.metadata_mut().insert(REDIRECT_METADATA, value);
            }
            shared.stats.redirects.fetch_add(1, Ordering::Relaxed);
            Err(status)
        }
        crate::tier::Placement::Nobody {
            partition,
            retry_after,
            successor,
        } => {
            let mut status = Status::unavailable(format!(
                "partition {partition} of node {node} has no hub yet; try again in {} ms",
                retry_after.as_millis()
            ));
            if let Ok(value) = retry_after.as_millis().to_string().parse() {
                status.metadata_mut().insert(RETRY_AFTER_METADATA, value);
            }
            if let Some(value) = successor.and_then(|s| s.parse().ok()) {
                status.metadata_mut().insert(SUCCESSOR_METADATA, value);
            }
            Err(status)
        }
    }
}

impl Service {
    /// The request's node, unless its certificate is missing or revoked.
    fn node_of<T>(&self, req: &Request<T>) -> Result<(String, Option<u64>), Status> {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs());
        let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        authenticate(&self.shared, leaf)
    }
}

/// A framed channel ([`sedna_proto::frame`]) the hub admitted: the node, its certificate's
/// issue time, and the channel's two halves.
struct FramedAdmission {
    node: String,
    issued: Option<u64>,
    reader: sedna_proto::frame::FrameReader<
        tokio::io::ReadHalf<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
    write: tokio::io::WriteHalf<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
}

/// A framed channel ([`sedna_proto::frame`]) after its TLS handshake: the node's
/// [`AttachRequest`](sedna_proto::frame::AttachRequest) (within the handshake deadline) and
/// the answer; `Some` if the node was admitted (its session follows, [`serve_framed`]).
async fn admit_framed(
    shared: &Shared,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Option<FramedAdmission> {
    use sedna_proto::frame::{self, AttachRequest, FrameReader};
    use tokio::io::AsyncWriteExt;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let (read, mut write) = tokio::io::split(tls);
    let mut reader = FrameReader::new(read, frame::MAX_REQUEST_BYTES);
    let deadline = shared.config.handshake_timeout;
    let request = match tokio::time::timeout(deadline, reader.read::<AttachRequest>()).await {
        Ok(Ok(Some(request))) => request,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "a framed channel's first frame was refused");
            return None;
        }
        _ => return None,
    };
    let unreachable = Some(request.unreachable.as_str()).filter(|u| !u.is_empty());
    let admitted = authenticate(shared, leaf.as_deref()).and_then(|(node, issued)| {
        place(shared, &node, unreachable)?;
        Ok((node, issued))
    });
    let mut answer = frame::answer_of(admitted.as_ref().map(|_| ()));
    if let (Ok(_), Some(ms)) = (&admitted, shared.renewal_ask_ms()) {
        answer.metadata.insert(
            sedna_proto::LEASE_RENEWAL_METADATA.to_owned(),
            ms.to_string(),
        );
    }
    let answered = tokio::time::timeout(deadline, frame::write_frame(&mut write, &answer)).await;
    let Ok((node, issued)) = admitted else {
        // Closed from this side first, then the node's end awaited (briefly): closing with
        // its bytes unread would reset the connection and could lose the answer.
        let _ = tokio::time::timeout(deadline, write.shutdown()).await;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            while let Ok(Some(_)) = reader.read::<AttachRequest>().await {}
        })
        .await;
        return None;
    };
    matches!(answered, Ok(Ok(()))).then_some(FramedAdmission {
        node,
        issued,
        reader,
        write,
    })
}

/// An admitted framed channel's session, as for `Attach`. The writer is given a few seconds
/// after the session ends to send what is queued, then stopped (a peer that stopped reading
/// cannot hold the connection).
async fn serve_framed(shared: Arc<Shared>, admitted: FramedAdmission) {
    let FramedAdmission {
        node,
        issued,
        mut reader,
        write,
    } = admitted;
    reader.set_max(shared.config.max_message_bytes);
    shared.stats.framed_sessions.fetch_add(1, Ordering::Relaxed);
    // Boxed: the channel's first block of slots is allocated with it, for every node.
    let (out_tx, out_rx) = mpsc::channel::<Box<Envelope>>(1024);
    let mut writer = tokio::spawn(sedna_proto::frame::write_frames(write, out_rx));
    run_session(
        shared,
        node,
        issued,
        reader.into_stream::<Envelope>(),
        out_tx,
    )
    .await;
    if tokio::time::timeout(WRITER_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// How long a refused framed channel waits for the node to close its end.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// How long a framed channel's writer may take to send what was queued when its session ended.
const WRITER_GRACE: Duration = Duration::from_secs(5);

#[tonic::async_trait]
impl HubService for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let shared = &self.shared;
        let req = request.into_inner();
        let refuse = |status: Status| {
            shared.stats.joins_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(node = %req.node_name, reason = %status.message(), "join refused");
            status
        };
        identity::check_node_name(&req.node_name)
            .map_err(|e| refuse(Status::invalid_argument(e.to_string())))?;
        let token: JoinToken = req
            .token
            .parse()
            .map_err(|e: identity::IdentityError| refuse(Status::unauthenticated(e.to_string())))?;
        if token.ca_pin != shared.pki.pin() {
            return Err(refuse(Status::unauthenticated(
                "the token pins another hub's CA",
            )));
        }
        if !req.replace && shared.sessions().contains_key(&req.node_name) {
            return Err(refuse(Status::already_exists(format!(
                "node {:?} is connected now; join with --replace to replace it",
                req.node_name
            ))));
        }
        crate::tokens::validate(&shared.client, &token, &req.node_name)
            .await
            .map_err(|e| {
                if e.is_retryable() {
                    refuse(Status::unavailable(e.to_string()))
                } else {
                    refuse(Status::permission_denied(e.to_string()))
                }
            })?;
        let validity = shared.config.node_cert_validity.as_secs() as i64;
        let cert = shared
            .pki
            .sign_node(&req.csr_der, &req.node_name, validity)
            .map_err(|e| refuse(Status::permission_denied(e.to_string())))?;
        shared.stats.joins.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = %req.node_name, "node joined");
        Ok(Response::new(JoinResponse {
            certificate_pem: cert,
            ca_pem: shared.pki.ca_pem().to_owned(),
        }))
    }

    type AttachStream = futures_util::stream::BoxStream<'static, Result<Envelope, Status>>;
    type TunnelStream = futures_util::stream::BoxStream<'static, Result<TunnelFrame, Status>>;

    async fn tunnel(
        &self,
        request: Request<tonic::Streaming<TunnelFrame>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        let (node, _) = self.node_of(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty tunnel"))?;
        let stream = match first.target.strip_prefix(crate::streams::TARGET_PREFIX) {
            Some(token) => self
                .shared
                .streams
                .accept(&node, token, inbound, first.data)?,
            None => crate::tunnel::serve(self.shared.client.clone(), node, first, inbound).await?,
        };
        Ok(Response::new(stream))
    }

    async fn attach(
        &self,
        request: Request<tonic::Streaming<Envelope>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let (node, issued) = self.node_of(&request)?;
        let unreachable = request
            .metadata()
            .get(UNREACHABLE_METADATA)
            .and_then(|v| v.to_str().ok());
        place(&self.shared, &node, unreachable)?;
        let inbound = request.into_inner();
        // Boxed: the channel's first block of slots is allocated with it, for every node.
        let (out_tx, out_rx) = mpsc::channel::<Box<Envelope>>(1024);
        tokio::spawn(run_session(
            self.shared.clone(),
            node,
            issued,
            inbound,
            out_tx,
        ));
        let stream = futures_util::stream::unfold(out_rx, |mut rx| async move {
            rx.recv().await.map(|m| (Ok(*m), rx))
        });
        let mut response = Response::new(stream.boxed());
        if let Some(ms) = self.shared.renewal_ask_ms() {
            response
                .metadata_mut()
                .insert(sedna_proto::LEASE_RENEWAL_METADATA, ms.into());
        }
        Ok(response)
    }
}

enum Done {
    Applied(u64, crate::session::UpstreamOutcome),
}

/// What the edge's stream yielded, as the session's input; `None` when it ended or failed.
fn from_edge<E: std::fmt::Display>(node: &str, m: Option<Result<Envelope, E>>) -> Option<Input> {
    match m {
        Some(Ok(e)) => Some(Input::Received(e)),
        Some(Err(error)) => {
            tracing::info!(%node, %error, "stream failed");
            None
        }
        None => None,
    }
}

/// A node's session: what the edge sends (`inbound`: a gRPC stream or a framed channel) and
/// what the hub routes to it, through the session machine, until either side ends it.
async fn run_session<S, E>(
    shared: Arc<Shared>,
    node: String,
    issued: Option<u64>,
    mut inbound: S,
    out: mpsc::Sender<Box<Envelope>>,
) where
    S: futures_util::Stream<Item = Result<Envelope, E>> + Unpin,
    E: std::fmt::Display,
{
    let stats = shared.stats.clone();
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let generation = shared.generation.fetch_add(1, Ordering::Relaxed);
    let (routed_tx, mut routed_rx) = mpsc::unbounded_channel::<Box<Downstream>>();
    // The only sender goes into the registry: when a newer connection of the node replaces
    // it, or the hub stops, the channel closes and this session ends.
    let mut routed_tx = Some(routed_tx);
    let mut shutdown = shared.shutdown.clone();
    // Boxed, as the routed changes: a channel allocates its first block of 32 slots with it,
    // for every node.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Box<Done>>();
    let mut session_config = shared.config.session.clone();
    session_config.max_payload = session_config
        .max_payload
        .min(shared.config.max_message_bytes.saturating_sub(64 * 1024));
    let mut session = Session::new(session_config, tokio::time::Instant::now());
    let mut registered = false;
    // The renewTime (unix ms) of the last Lease renewal this session wrote; see
    // `liveness::lease_due`.
    let lease_written = Arc::new(std::sync::atomic::AtomicI64::new(0));
    // The digest of the Node metadata this session last applied (see
    // [`upstream::prepare_node_write`]); 0: none yet.
    let node_metadata = Arc::new(AtomicU64::new(0));
    // The lease duration the node announced in its last renewal.
    let mut announced = Duration::from_secs(40);
    let lease_policy = shared.lease_policy();
    let mut pending: std::collections::VecDeque<Input> = std::collections::VecDeque::new();
    tracing::info!(%node, "node connected");
    'session: loop {
        let input = if let Some(i) = pending.pop_front() {
            Some(i)
        } else {
            if pending.capacity() > 0 {
                // Idle again: its buffer is let go (an input is large, four of them ≈ 1 KiB).
                pending = std::collections::VecDeque::new();
            }
            tokio::select! {
                m = inbound.next() => match from_edge(&node, m) {
                    Some(input) => Some(input),
                    None => break 'session,
                },
                d = routed_rx.recv(), if registered => match d {
                    Some(d) => Some(Input::Routed(*d)),
                    None => {
                        tracing::info!(%node, "superseded by a newer connection");
                        break 'session;
                    }
                },
                d = done_rx.recv() => d.map(|d| {
                    let Done::Applied(id, outcome) = *d;
                    Input::Applied { id, outcome }
                }),
                _ = shutdown.changed() => break 'session,
                _ = tokio::time::sleep_until(session.next_deadline()) => {
                    // `select!` picks among ready branches at random: a message that has
                    // already arrived is read before the edge is judged silent (the tick
                    // follows it).
                    match inbound.next().now_or_never() {
                        Some(m) => {
                            let Some(input) = from_edge(&node, m) else { break 'session };
                            pending.push_back(Input::Tick);
                            Some(input)
                        }
                        None => Some(Input::Tick),
                    }
                }
            }
        };
        let Some(input) = input else { continue };
        // The time the input arrived, not when the wait began (a message received after a
        // long wait would otherwise count as received that much earlier).
        let now = tokio::time::Instant::now();
        for output in session.step(input, now) {
            match output {
                Output::Send(e) => {
                    match sedna_proto::channel::Op::try_from(e.op) {
                        Ok(sedna_proto::channel::Op::Upsert) => {
                            stats.upserts_sent.fetch_add(1, Ordering::Relaxed);
                            stats
                                .payload_bytes_sent
                                .fetch_add(e.payload.len() as u64, Ordering::Relaxed);
                        }
                        Ok(sedna_proto::channel::Op::Delete) => {
                            stats.deletes_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    if out.send(Box::new(e)).await.is_err() {
                        break 'session;
                    }
                }
                Output::RequestView => {
                    if !shared.view_ready(&node).await {
                        tracing::info!(%node, "no longer served here: ending the session");
                        break 'session;
                    }
                    let Some(routed) = routed_tx.take() else {
                        continue;
                    };
                    let view = {
                        let mut router = shared.router();
                        let view = router.attach(&node);
                        let old = shared.sessions().insert(
                            node.clone(),
                            Registered {
                                generation,
                                routed,
                                control: out.clone(),
                            },
                        );
                        drop(old);
                        view
                    };
                    shared.lost().remove(&node);
                    registered = true;
                    pending.push_back(Input::View(view));
                }
                Output::Lookup(uids) => {
                    let wanted: HashSet<String> = uids.into_iter().collect();
                    let found = shared.router().view_objects(&node, &wanted);
                    pending.push_back(Input::Found(found));
                }
                Output::Apply { id, upstream } => {
                    let decision = upstream::authorize(&shared.router(), &node, &upstream);
                    match decision {
                        Decision::Deny(reason) => {
                            stats.upstream_rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%node, %reason, "upstream write refused");
                            pending.push_back(Input::Applied {
                                id,
                                outcome: crate::session::UpstreamOutcome::Rejected(reason),
                            });
                        }
                        Decision::Allow
                            if upstream.kind
                                == sedna_proto::channel::upstream::Kind::Lease as i32 =>
                        {
                            let renewal = crate::liveness::Renewal::parse(&upstream.payload);
                            if let Some(r) = &renewal {
                                announced = r.announced();
                            }
                            let cached = shared
                                .router()
                                .get(&ObjKey::new(Kind::Lease, "kube-node-lease", &node))
                                .map(|o| o.value());
                            let written = jiff::Timestamp::from_millisecond(
                                lease_written.load(Ordering::Relaxed),
                            )
                            .ok()
                            .filter(|t| t.as_millisecond() > 0);
                            if crate::liveness::lease_due(
                                cached.as_ref(),
                                written,
                                renewal.as_ref(),
                                lease_policy,
                            ) {
                                let mut upstream = upstream;
                                if let Some(stored) =
                                    crate::liveness::stored_payload(&upstream.payload, lease_policy)
                                {
                                    upstream.payload = stored;
                                }
                                let written_at = renewal.as_ref().and_then(|r| r.renewed());
                                let lease_written = lease_written.clone();
                                spawn_apply(&shared, &node, id, upstream, &done_tx, move || {
                                    if let Some(t) = written_at {
                                        // The last write, not the latest time: a renewal
                                        // from the future must not make the node's later
                                        // ones look stale forever.
                                        lease_written.store(t.as_millisecond(), Ordering::Relaxed);
                                    }
                                });
                            } else {
                                // The API's Lease is recent enough: acknowledged, not written.
                                stats.lease_writes_skipped.fetch_add(1, Ordering::Relaxed);
                                pending.push_back(Input::Applied {
                                    id,
                                    outcome: crate::session::UpstreamOutcome::Applied,
                                });
                            }
                        }
                        Decision::Allow => {
                            let mut upstream = upstream;
                            let mut digest = None;
                            if upstream.kind == sedna_proto::channel::upstream::Kind::Node as i32 {
                                let current = shared
                                    .router()
                                    .get(&ObjKey::new(Kind::Node, "", &node))
                                    .map(|o| o.value());
                                if let Some(w) = upstream::prepare_node_write(
                                    current.as_ref(),
                                    &upstream.payload,
                                    node_metadata.load(Ordering::Relaxed),
                                ) {
                                    if !w.removed.is_empty() {
                                        tracing::warn!(%node, labels = ?w.removed, "labels a node may not give itself were left out");
                                    }
                                    if w.status_only {
                                        stats.node_status_only.fetch_add(1, Ordering::Relaxed);
                                    }
                                    upstream.payload = w.payload;
                                    digest = Some(w.metadata_digest);
                                }
                            }
                            let node_metadata = node_metadata.clone();
                            spawn_apply(&shared, &node, id, upstream, &done_tx, move || {
                                if let Some(d) = digest {
                                    node_metadata.store(d, Ordering::Relaxed);
                                }
                            });
                        }
                    }
                }
                Output::Sign { id, csr } => {
                    let validity = shared.config.node_cert_validity.as_secs() as i64;
                    let result = if shared.revocations.is_revoked(&node, issued) {
                        Err(format!("the certificate of node {node:?} was revoked"))
                    } else {
                        shared
                            .pki
                            .sign_node(&csr, &node, validity)
                            .map_err(|e| e.to_string())
                    };
                    pending.push_back(Input::Signed { id, result });
                }
                Output::Resynced { buckets, wanted } => {
                    stats
                        .manifest_buckets
                        .fetch_add(buckets as u64, Ordering::Relaxed);
                    stats
                        .objects_wanted
                        .fetch_add(wanted as u64, Ordering::Relaxed);
                }
                Output::Close(reason) => {
                    tracing::info!(%node, %reason, "closing the session");
                    break 'session;
                }
            }
        }
    }
    if registered {
        let mut sessions = shared.sessions();
        if sessions
            .get(&node)
            .is_some_and(|s| s.generation == generation)
        {
            sessions.remove(&node);
            drop(sessions);
            shared.router().detach(&node);
            // What the lifecycle judges the node by until it returns.
            let silent =
                tokio::time::Instant::now().saturating_duration_since(session.last_heard());
            let heard = jiff::Timestamp::now()
                .checked_sub(silent)
                .unwrap_or(jiff::Timestamp::MIN);
            shared.lost().insert(node.clone(), (heard, announced));
        }
    }
    stats.connected.fetch_sub(1, Ordering::Relaxed);
    tracing::info!(%node, "node disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_pause_the_loop_longer_while_they_last_up_to_a_second() {
        assert_eq!(accept_pause(1), Duration::from_millis(10));
        assert_eq!(accept_pause(2), Duration::from_millis(20));
        let pauses: Vec<Duration> = (1..40).map(accept_pause).collect();
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(accept_pause(8), Duration::from_secs(1));
        assert_eq!(accept_pause(u32::MAX), Duration::from_secs(1));
    }
}
