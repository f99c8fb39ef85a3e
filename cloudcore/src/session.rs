//! One node's connection, as a pure state machine: [`Session::step`] takes an input and the
//! current time and returns what to do. The tokio shell in `hub.rs` feeds it envelopes,
//! routed changes and ticks, and carries out its outputs; tests drive it with simulated time.
//!
//! Protocol: the edge opens with `HELLO` (its inventory digest); the session answers a
//! `MANIFEST` for each bucket whose digest differs from the node's view, then
//! `MANIFESTS_DONE`; the edge replies `WANT` with the objects it lacks or holds stale; the
//! session sends them, then `SYNC_DONE`, then live changes. Downstream delivery is
//! at-least-once with a window of unacknowledged envelopes, retransmitted after a timeout;
//! queued changes to the same object coalesce, keeping the newest version. Upstream writes are
//! applied one at a time, in order, and acknowledged (or rejected) after the API answered.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use sedna_proto::Message;
use sedna_proto::channel::{Digest, Envelope, Manifest, ObjectRef, Op, Upstream, Want};
use sedna_proto::sync;
use tokio::time::Instant;

use crate::router::{Downstream, ObjKey, Object};

/// Timing and flow settings of a session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Most downstream envelopes awaiting acknowledgement.
    pub window: usize,
    /// When an unacknowledged envelope is sent again.
    pub retransmit_after: Duration,
    /// Send a heartbeat when nothing else was sent for this long.
    pub heartbeat: Duration,
    /// Close the connection when nothing was received for this long.
    pub read_deadline: Duration,
    /// Delay before retrying an upstream write the API failed to take.
    pub upstream_retry: Duration,
    /// Largest object payload sent; a larger object is skipped with an error (it could never
    /// cross the channel, and retrying would break the stream forever).
    pub max_payload: usize,
    /// Most upstream writes queued for the API; beyond it a write is left unacknowledged
    /// (the edge keeps it and sends it again), so a node cannot grow the hub's memory.
    pub max_upstream_queue: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            window: 256,
            retransmit_after: Duration::from_secs(10),
            // KubeEdge's EdgeHub heartbeat; the deadline stays within the kubelet's 40 s
            // lease, with 20 s for a heartbeat late on a busy machine.
            heartbeat: Duration::from_secs(15),
            read_deadline: Duration::from_secs(35),
            upstream_retry: Duration::from_secs(2),
            max_payload: sedna_proto::DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024,
            max_upstream_queue: 1024,
        }
    }
}

/// Outcome of an upstream write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// Applied: acknowledge it.
    Applied,
    /// Refused for good (not authorized, invalid): tell the edge to drop it.
    Rejected(String),
    /// The API failed: try again later.
    Retry,
}

/// What the session reacts to.
#[derive(Debug)]
pub enum Input {
    /// An envelope from the edge.
    Received(Envelope),
    /// The node's view, asked for with [`Output::RequestView`].
    View(Vec<Arc<Object>>),
    /// The current versions of wanted objects, asked for with [`Output::Lookup`] (objects no
    /// longer in the node's view are absent).
    Found(Vec<Arc<Object>>),
    /// A change routed to this node.
    Routed(Downstream),
    /// The outcome of an [`Output::Apply`].
    Applied {
        /// The upstream envelope id.
        id: u64,
        /// What happened.
        outcome: UpstreamOutcome,
    },
    /// The outcome of an [`Output::Sign`]: a certificate (PEM) or why not.
    Signed {
        /// The RENEW envelope id.
        id: u64,
        /// The certificate or the reason.
        result: Result<String, String>,
    },
    /// Time passed.
    Tick,
}

/// What the shell must do.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Send an envelope to the edge.
    Send(Envelope),
    /// Compute the node's view and feed it back as [`Input::View`].
    RequestView,
    /// Look up the current versions of these uids in the node's view ([`Input::Found`]).
    Lookup(Vec<String>),
    /// Apply an upstream write and feed back [`Input::Applied`].
    Apply {
        /// Envelope id.
        id: u64,
        /// The write.
        upstream: Upstream,
    },
    /// Sign a certificate request (DER) for this node and feed back [`Input::Signed`].
    Sign {
        /// Envelope id.
        id: u64,
        /// The request.
        csr: Vec<u8>,
    },
    /// A resync finished its negotiation: how many buckets differed, how many objects the
    /// edge wanted (for metrics).
    Resynced {
        /// Buckets sent as manifests.
        buckets: usize,
        /// Objects the edge asked for.
        wanted: usize,
    },
    /// Close the connection.
    Close(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    AwaitView,
    AwaitWant,
    AwaitFound,
    Syncing,
    Live,
}

enum Item {
    Change(Downstream),
    SyncDone,
}

struct InFlight {
    envelope: Envelope,
    sent_at: Instant,
}

/// Lanes of a node's writes: see [`lane_of`].
const LANES: usize = 2;

/// A node's writes go in two lanes, each applied one at a time and in the order sent: its
/// liveness (its Node and Lease) and everything else (pod and workload status, events, pod
/// deletions). Order matters within a lane (a pod's statuses) but not across them, and a
/// pod's status must not wait behind a Lease renewal queued for the API server (hub-bench
/// at 30,000 nodes: pod statuses reached the API after two minutes in one lane).
fn lane_of(u: &Upstream) -> usize {
    usize::from(!crate::upstream::is_liveness(u))
}

/// One node's session.
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    digest: Option<Digest>,
    next_id: u64,
    queue: BTreeMap<u64, Item>,
    queued_uids: HashMap<String, u64>,
    next_order: u64,
    in_flight: BTreeMap<u64, InFlight>,
    upstream: VecDeque<(u64, Upstream)>,
    /// Per lane (see [`lane_of`]): the write being applied, and when to try a refused
    /// one again.
    applying: [Option<u64>; LANES],
    retry_at: [Option<Instant>; LANES],
    pending_acks: Vec<u64>,
    last_rx: Instant,
    last_tx: Instant,
    closed: bool,
}

fn object_ref(o: &Object) -> ObjectRef {
    ObjectRef {
        api_version: o.key.kind.api_version().to_owned(),
        kind: o.key.kind.name().to_owned(),
        namespace: o.key.namespace.clone(),
        name: o.key.name.clone(),
        uid: o.uid.clone(),
    }
}

fn key_ref(key: &ObjKey, uid: &str) -> ObjectRef {
    ObjectRef {
        api_version: key.kind.api_version().to_owned(),
        kind: key.kind.name().to_owned(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        uid: uid.to_owned(),
    }
}

fn envelope(op: Op) -> Envelope {
    Envelope {
        op: op as i32,
        ..Default::default()
    }
}

impl Session {
    /// A session that waits for the edge's `HELLO`.
    pub fn new(config: SessionConfig, now: Instant) -> Self {
        Self {
            config,
            phase: Phase::AwaitHello,
            digest: None,
            next_id: 1,
            queue: BTreeMap::new(),
            queued_uids: HashMap::new(),
            next_order: 0,
            in_flight: BTreeMap::new(),
            upstream: VecDeque::new(),
            applying: [None; LANES],
            retry_at: [None; LANES],
            pending_acks: Vec::new(),
            last_rx: now,
            last_tx: now,
            closed: false,
        }
    }

    /// Whether the initial resync is over.
    pub fn is_live(&self) -> bool {
        self.phase == Phase::Live
    }

    /// Downstream envelopes awaiting acknowledgement.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Changes queued behind the window.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// When the edge was last heard (its last message of any kind).
    pub fn last_heard(&self) -> Instant {
        self.last_rx
    }

    /// When the shell should call [`Input::Tick`] next.
    pub fn next_deadline(&self) -> Instant {
        let mut at =
            (self.last_tx + self.config.heartbeat).min(self.last_rx + self.config.read_deadline);
        if let Some((_, f)) = self.in_flight.iter().next() {
            at = at.min(f.sent_at + self.config.retransmit_after);
        }
        for r in self.retry_at.into_iter().flatten() {
            at = at.min(r);
        }
        at
    }

    fn enqueue(&mut self, d: Downstream) {
        let uid = d.uid().to_owned();
        if let Some(order) = self.queued_uids.get(&uid).copied() {
            if let Some(Item::Change(existing)) = self.queue.get_mut(&order)
                && d.rv() >= existing.rv()
            {
                *existing = d;
            }
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.queue.insert(order, Item::Change(d));
        self.queued_uids.insert(uid, order);
    }

    fn enqueue_sync_done(&mut self) {
        let order = self.next_order;
        self.next_order += 1;
        self.queue.insert(order, Item::SyncDone);
    }

    fn send(&mut self, out: &mut Vec<Output>, mut e: Envelope, now: Instant, tracked: bool) {
        if tracked {
            e.id = self.next_id;
            self.next_id += 1;
            self.in_flight.insert(
                e.id,
                InFlight {
                    envelope: e.clone(),
                    sent_at: now,
                },
            );
        }
        self.last_tx = now;
        out.push(Output::Send(e));
    }

    fn flush(&mut self, out: &mut Vec<Output>, now: Instant) {
        if !self.pending_acks.is_empty() {
            let mut ack = envelope(Op::Ack);
            ack.ack_of = std::mem::take(&mut self.pending_acks);
            self.send(out, ack, now, false);
        }
        if !matches!(self.phase, Phase::Syncing | Phase::Live) {
            // Until the edge has reconciled every manifest, only manifests travel: a change
            // sent earlier could be undone by a manifest computed before it.
            return;
        }
        while self.in_flight.len() < self.config.window {
            let Some((_, item)) = self.queue.pop_first() else {
                break;
            };
            let e = match item {
                Item::SyncDone => {
                    self.phase = Phase::Live;
                    envelope(Op::SyncDone)
                }
                Item::Change(d) => {
                    self.queued_uids.remove(d.uid());
                    if let Downstream::Upsert(o) = &d
                        && o.json().len() > self.config.max_payload
                    {
                        tracing::error!(
                            object = %format!("{} {}/{}", o.key.kind.name(), o.key.namespace, o.key.name),
                            bytes = o.json().len(),
                            limit = self.config.max_payload,
                            "object too large for the channel; not sent"
                        );
                        continue;
                    }
                    match d {
                        Downstream::Upsert(o) => Envelope {
                            op: Op::Upsert as i32,
                            object: Some(object_ref(&o)),
                            resource_version: o.rv,
                            payload: o.json().to_vec(),
                            ..Default::default()
                        },
                        Downstream::Delete { key, uid, rv } => Envelope {
                            op: Op::Delete as i32,
                            object: Some(key_ref(&key, &uid)),
                            resource_version: rv,
                            ..Default::default()
                        },
                    }
                }
            };
            let tracked = e.op != Op::SyncDone as i32;
            self.send(out, e, now, tracked);
        }
    }

    fn close(&mut self, out: &mut Vec<Output>, reason: String) {
        if !self.closed {
            self.closed = true;
            out.push(Output::Close(reason));
        }
    }

    fn next_upstream(&mut self, out: &mut Vec<Output>) {
        for lane in 0..LANES {
            if self.applying[lane].is_some() || self.retry_at[lane].is_some() {
                continue;
            }
            if let Some((id, upstream)) = self.upstream.iter().find(|(_, u)| lane_of(u) == lane) {
                self.applying[lane] = Some(*id);
                out.push(Output::Apply {
                    id: *id,
                    upstream: upstream.clone(),
                });
            }
        }
    }

    /// Advances the session.
    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.closed {
            return out;
        }
        match input {
            Input::Received(e) => {
                self.last_rx = now;
                self.received(e, now, &mut out);
            }
            Input::View(objects) => self.view(objects, now, &mut out),
            Input::Found(objects) => {
                if self.phase == Phase::AwaitFound {
                    for o in objects {
                        self.enqueue(Downstream::Upsert(o));
                    }
                    self.enqueue_sync_done();
                    self.phase = Phase::Syncing;
                }
            }
            Input::Routed(d) => self.enqueue(d),
            Input::Applied { id, outcome } => {
                if let Some(lane) = self.applying.iter().position(|a| *a == Some(id)) {
                    self.applying[lane] = None;
                    let mut remove = || {
                        if let Some(at) = self.upstream.iter().position(|(i, _)| *i == id) {
                            self.upstream.remove(at);
                        }
                    };
                    match outcome {
                        UpstreamOutcome::Applied => {
                            remove();
                            self.pending_acks.push(id);
                        }
                        UpstreamOutcome::Rejected(reason) => {
                            remove();
                            let mut r = envelope(Op::Reject);
                            r.ack_of = vec![id];
                            r.payload = reason.into_bytes();
                            self.send(&mut out, r, now, false);
                        }
                        UpstreamOutcome::Retry => {
                            self.retry_at[lane] = Some(now + self.config.upstream_retry);
                        }
                    }
                }
            }
            Input::Signed { id, result } => match result {
                Ok(pem) => {
                    let mut c = envelope(Op::Certificate);
                    c.ack_of = vec![id];
                    c.payload = pem.into_bytes();
                    self.send(&mut out, c, now, false);
                }
                Err(reason) => {
                    let mut r = envelope(Op::Reject);
                    r.ack_of = vec![id];
                    r.payload = reason.into_bytes();
                    self.send(&mut out, r, now, false);
                }
            },
            Input::Tick => {
                if now >= self.last_rx + self.config.read_deadline {
                    self.close(
                        &mut out,
                        format!(
                            "no message from the edge for {:?}",
                            self.config.read_deadline
                        ),
                    );
                    return out;
                }
                for r in &mut self.retry_at {
                    if r.is_some_and(|r| now >= r) {
                        *r = None;
                    }
                }
                let due: Vec<u64> = self
                    .in_flight
                    .iter()
                    .filter(|(_, f)| now >= f.sent_at + self.config.retransmit_after)
                    .map(|(id, _)| *id)
                    .collect();
                for id in due {
                    if let Some(f) = self.in_flight.get_mut(&id) {
                        f.sent_at = now;
                        let e = f.envelope.clone();
                        self.last_tx = now;
                        out.push(Output::Send(e));
                    }
                }
                if now >= self.last_tx + self.config.heartbeat {
                    self.send(&mut out, envelope(Op::Heartbeat), now, false);
                }
            }
        }
        self.next_upstream(&mut out);
        self.flush(&mut out, now);
        self.release_idle_buffers();
        out
    }

    /// Lets go of the allocations of queues that are empty again: a map or queue keeps its
    /// first block after its last entry leaves (a B-tree its leaf of eleven slots, ≈ 2 KiB for
    /// envelopes), and an idle node's session would hold them for its whole life.
    fn release_idle_buffers(&mut self) {
        if self.queue.is_empty() {
            self.queue = BTreeMap::new();
        }
        if self.in_flight.is_empty() {
            self.in_flight = BTreeMap::new();
        }
        if self.queued_uids.is_empty() && self.queued_uids.capacity() > 0 {
            self.queued_uids = HashMap::new();
        }
        if self.upstream.is_empty() && self.upstream.capacity() > 0 {
            self.upstream = VecDeque::new();
        }
        if self.pending_acks.is_empty() && self.pending_acks.capacity() > 0 {
            self.pending_acks = Vec::new();
        }
    }

    fn received(&mut self, e: Envelope, now: Instant, out: &mut Vec<Output>) {
        match Op::try_from(e.op).unwrap_or(Op::Unspecified) {
            Op::Heartbeat => {}
            Op::Ack => {
                for id in &e.ack_of {
                    self.in_flight.remove(id);
                }
            }
            Op::Hello if self.phase == Phase::AwaitHello => {
                match Digest::decode(e.payload.as_slice()) {
                    Ok(d) if sync::unpack_digests(&d.digests, d.buckets).is_some() => {
                        self.digest = Some(d);
                        self.phase = Phase::AwaitView;
                        out.push(Output::RequestView);
                    }
                    _ => self.close(out, "malformed HELLO digest".into()),
                }
            }
            Op::Want if self.phase == Phase::AwaitWant => match Want::decode(e.payload.as_slice())
                .ok()
                .and_then(|w| sync::unpack_uids(&w.uids))
            {
                Some(uids) => {
                    out.push(Output::Resynced {
                        buckets: 0,
                        wanted: uids.len(),
                    });
                    self.phase = Phase::AwaitFound;
                    out.push(Output::Lookup(uids));
                }
                None => self.close(out, "malformed WANT".into()),
            },
            Op::Upstream => match Upstream::decode(e.payload.as_slice()) {
                Ok(u) => {
                    let duplicate = self.upstream.iter().any(|(id, _)| *id == e.id);
                    if !duplicate && self.upstream.len() < self.config.max_upstream_queue {
                        self.upstream.push_back((e.id, u));
                    }
                }
                Err(err) => {
                    let mut r = envelope(Op::Reject);
                    r.ack_of = vec![e.id];
                    r.payload = format!("malformed upstream message: {err}").into_bytes();
                    self.send(out, r, now, false);
                }
            },
            Op::Renew => out.push(Output::Sign {
                id: e.id,
                csr: e.payload,
            }),
            other => self.close(out, format!("unexpected {other:?} from the edge")),
        }
    }

    fn view(&mut self, objects: Vec<Arc<Object>>, now: Instant, out: &mut Vec<Output>) {
        if self.phase != Phase::AwaitView {
            return;
        }
        let Some(digest) = self.digest.take() else {
            return;
        };
        let buckets = digest.buckets;
        let edge = sync::unpack_digests(&digest.digests, buckets).unwrap_or_default();
        let pairs: Vec<(&str, u64)> = objects.iter().map(|o| (o.uid.as_str(), o.rv)).collect();
        let hub = sync::digests(pairs.iter().copied(), buckets);
        let differing = sync::differing_buckets(&edge, &hub);
        let grouped = sync::by_bucket(pairs.iter().copied(), buckets);
        for bucket in &differing {
            let entries = grouped.get(bucket).cloned().unwrap_or_default();
            let manifest = Manifest {
                bucket: *bucket,
                uids: sync::pack_uids(entries.iter().map(|(u, _)| *u)).unwrap_or_default(),
                resource_versions: entries.iter().map(|(_, rv)| *rv).collect(),
            };
            let mut m = envelope(Op::Manifest);
            m.payload = manifest.encode_to_vec();
            self.send(out, m, now, false);
        }
        out.push(Output::Resynced {
            buckets: differing.len(),
            wanted: 0,
        });
        self.send(out, envelope(Op::ManifestsDone), now, false);
        self.phase = Phase::AwaitWant;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Kind;
    use sedna_proto::channel::upstream::Kind as UpstreamKind;
    use serde_json::json;

    fn object(name: &str, rv: u64) -> Arc<Object> {
        Arc::new(
            Object::from_value(
                Kind::ConfigMap,
                json!({ "metadata": { "name": name, "namespace": "ns",
                                      "uid": format!("uid-{name}"), "resourceVersion": rv.to_string() } }),
            )
            .unwrap(),
        )
    }

    fn hello(pairs: &[(&str, u64)]) -> Envelope {
        let buckets = 16;
        let d = Digest {
            buckets,
            digests: sync::pack_digests(&sync::digests(pairs.iter().copied(), buckets)),
        };
        Envelope {
            op: Op::Hello as i32,
            payload: d.encode_to_vec(),
            ..Default::default()
        }
    }

    fn sent(out: &[Output]) -> Vec<(Op, String)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(e) => Some((
                    Op::try_from(e.op).unwrap(),
                    e.object
                        .as_ref()
                        .map(|r| r.name.clone())
                        .unwrap_or_default(),
                )),
                _ => None,
            })
            .collect()
    }

    fn want(uids: &[&str]) -> Envelope {
        Envelope {
            op: Op::Want as i32,
            payload: Want {
                uids: sync::pack_uids(uids.iter().copied()).unwrap(),
            }
            .encode_to_vec(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_sends_manifests_only_for_differing_buckets_then_the_wanted_objects() {
        let now = Instant::now();
        let mut s = Session::new(SessionConfig::default(), now);
        let out = s.step(Input::Received(hello(&[("uid-a", 1), ("uid-b", 1)])), now);
        assert_eq!(out, [Output::RequestView]);
        let out = s.step(Input::View(vec![object("a", 1), object("b", 2)]), now);
        let ops = sent(&out);
        assert_eq!(ops.iter().filter(|(op, _)| *op == Op::Manifest).count(), 1);
        assert_eq!(ops.last().unwrap().0, Op::ManifestsDone);
        let out = s.step(Input::Received(want(&["uid-b"])), now);
        assert!(out.contains(&Output::Lookup(vec!["uid-b".into()])));
        let out = s.step(Input::Found(vec![object("b", 2)]), now);
        assert_eq!(
            sent(&out),
            [(Op::Upsert, "b".into()), (Op::SyncDone, String::new())]
        );
        assert!(s.is_live());
    }

    #[tokio::test(start_paused = true)]
    async fn queued_changes_coalesce_to_the_newest_version() {
        let now = Instant::now();
        let mut s = Session::new(SessionConfig::default(), now);
        s.step(Input::Received(hello(&[])), now);
        s.step(Input::View(vec![]), now);
        s.step(Input::Routed(Downstream::Upsert(object("a", 3))), now);
        s.step(Input::Routed(Downstream::Upsert(object("a", 5))), now);
        s.step(Input::Routed(Downstream::Upsert(object("a", 4))), now);
        s.step(Input::Received(want(&[])), now);
        let out = s.step(Input::Found(vec![]), now);
        let upserts: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(e) if e.op == Op::Upsert as i32 => Some(e.resource_version),
                _ => None,
            })
            .collect();
        assert_eq!(upserts, [5]);
    }

    #[tokio::test(start_paused = true)]
    async fn unacknowledged_envelopes_are_sent_again_the_window_is_respected_and_an_idle_session_lets_its_buffers_go()
     {
        let now = Instant::now();
        let config = SessionConfig {
            window: 2,
            ..Default::default()
        };
        let mut s = Session::new(config.clone(), now);
        s.step(Input::Received(hello(&[])), now);
        s.step(Input::View(vec![]), now);
        s.step(Input::Received(want(&[])), now);
        s.step(Input::Found(vec![]), now);
        let mut out = Vec::new();
        for name in ["a", "b", "c"] {
            out.extend(s.step(Input::Routed(Downstream::Upsert(object(name, 1))), now));
        }
        assert_eq!(sent(&out).len(), 2, "a window of two");
        assert_eq!(s.queued(), 1);
        let later = now + config.retransmit_after;
        let out = s.step(Input::Tick, later);
        let resent: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(e) if e.op == Op::Upsert as i32 => Some(e.id),
                _ => None,
            })
            .collect();
        assert_eq!(resent, [1, 2], "the same ids again");
        let ack = Envelope {
            op: Op::Ack as i32,
            ack_of: vec![1, 2],
            ..Default::default()
        };
        let out = s.step(Input::Received(ack), later);
        assert_eq!(sent(&out), [(Op::Upsert, "c".into())]);
        // Acknowledged and idle again: the queues' buffers are let go.
        let ack = Envelope {
            op: Op::Ack as i32,
            ack_of: vec![3],
            ..Default::default()
        };
        s.step(Input::Received(ack), later);
        assert!(s.in_flight.is_empty() && s.queue.is_empty());
        assert_eq!(s.queued_uids.capacity(), 0);
        assert_eq!(s.upstream.capacity(), 0);
        assert_eq!(s.pending_acks.capacity(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_edge_is_dropped_after_the_read_deadline_and_heartbeats_keep_it_alive() {
        let now = Instant::now();
        let config = SessionConfig::default();
        let mut s = Session::new(config.clone(), now);
        let out = s.step(Input::Tick, now + config.heartbeat);
        assert_eq!(sent(&out), [(Op::Heartbeat, String::new())]);
        let hb = Envelope {
            op: Op::Heartbeat as i32,
            ..Default::default()
        };
        s.step(Input::Received(hb), now + config.heartbeat);
        let out = s.step(Input::Tick, now + config.read_deadline);
        assert!(!out.iter().any(|o| matches!(o, Output::Close(_))));
        let out = s.step(Input::Tick, now + config.heartbeat + config.read_deadline);
        assert!(out.iter().any(|o| matches!(o, Output::Close(_))));
    }

    /// An upstream write envelope (a status write) with this id.
    fn up(id: u64) -> Envelope {
        Envelope {
            id,
            op: Op::Upstream as i32,
            payload: Upstream {
                kind: 3,
                object: None,
                payload: vec![],
            }
            .encode_to_vec(),
            ..Default::default()
        }
    }

    fn up_kind(id: u64, kind: UpstreamKind) -> Envelope {
        Envelope {
            id,
            op: Op::Upstream as i32,
            payload: Upstream {
                kind: kind as i32,
                object: None,
                payload: vec![],
            }
            .encode_to_vec(),
            ..Default::default()
        }
    }

    fn applies(out: &[Output]) -> Vec<u64> {
        out.iter()
            .filter_map(|o| match o {
                Output::Apply { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_status_does_not_wait_behind_the_nodes_lease_write() {
        let now = Instant::now();
        let config = SessionConfig::default();
        let mut s = Session::new(config.clone(), now);
        assert_eq!(
            applies(&s.step(Input::Received(up_kind(1, UpstreamKind::Lease)), now)),
            [1]
        );
        assert_eq!(
            applies(&s.step(Input::Received(up_kind(2, UpstreamKind::Status)), now)),
            [2],
            "the status goes while the Lease waits"
        );
        let out = s.step(Input::Received(up_kind(3, UpstreamKind::Node)), now);
        assert!(applies(&out).is_empty(), "liveness: one at a time");
        let out = s.step(Input::Received(up_kind(4, UpstreamKind::Status)), now);
        assert!(applies(&out).is_empty(), "statuses: one at a time");
        // The Lease write is refused for now: the statuses go on.
        let retry = Input::Applied {
            id: 1,
            outcome: UpstreamOutcome::Retry,
        };
        assert!(applies(&s.step(retry, now)).is_empty());
        let done = |id| Input::Applied {
            id,
            outcome: UpstreamOutcome::Applied,
        };
        let out = s.step(done(2), now);
        assert_eq!(applies(&out), [4]);
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Send(e) if e.ack_of == [2])),
            "acknowledged out of the order sent"
        );
        // Retried, the Lease goes first in its lane, before the Node.
        assert_eq!(
            applies(&s.step(Input::Tick, now + config.upstream_retry)),
            [1]
        );
        assert_eq!(applies(&s.step(done(1), now)), [3]);
        let ids: Vec<u64> = s.upstream.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [3, 4], "both still being applied");
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_writes_apply_in_order_and_retry_without_reordering() {
        let now = Instant::now();
        let config = SessionConfig::default();
        let mut s = Session::new(config.clone(), now);
        let out = s.step(Input::Received(up(1)), now);
        assert!(matches!(out[0], Output::Apply { id: 1, .. }));
        let out = s.step(Input::Received(up(2)), now);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Apply { .. })),
            "one at a time"
        );
        let out = s.step(
            Input::Applied {
                id: 1,
                outcome: UpstreamOutcome::Retry,
            },
            now,
        );
        assert!(!out.iter().any(|o| matches!(o, Output::Apply { .. })));
        let out = s.step(Input::Tick, now + config.upstream_retry);
        assert!(
            out.iter().any(|o| matches!(o, Output::Apply { id: 1, .. })),
            "1 again, before 2"
        );
        let out = s.step(
            Input::Applied {
                id: 1,
                outcome: UpstreamOutcome::Applied,
            },
            now,
        );
        assert!(out.iter().any(|o| matches!(o, Output::Apply { id: 2, .. })));
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Send(e) if e.ack_of == [1]))
        );
        let out = s.step(
            Input::Applied {
                id: 2,
                outcome: UpstreamOutcome::Rejected("not yours".into()),
            },
            now,
        );
        assert!(out.iter().any(|o| matches!(o, Output::Send(e)
            if e.op == Op::Reject as i32 && e.ack_of == [2] && e.payload == b"not yours")));
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_writes_beyond_the_queue_bound_are_left_unacknowledged_for_a_resend() {
        let now = Instant::now();
        let config = SessionConfig {
            max_upstream_queue: 3,
            ..Default::default()
        };
        let mut s = Session::new(config, now);
        for id in 1..=10 {
            s.step(Input::Received(up(id)), now);
        }
        assert_eq!(s.upstream.len(), 3, "the queue holds its bound");
        let applied = |s: &mut Session, id| {
            s.step(
                Input::Applied {
                    id,
                    outcome: UpstreamOutcome::Applied,
                },
                now,
            )
        };
        applied(&mut s, 1);
        // The edge sends 4 again (it was never acknowledged); now there is room for it.
        s.step(Input::Received(up(4)), now);
        let order: Vec<u64> = s.upstream.iter().map(|(id, _)| *id).collect();
        assert_eq!(order, [2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_object_over_the_size_cap_is_skipped_not_sent() {
        let now = Instant::now();
        let config = SessionConfig {
            max_payload: 200,
            ..Default::default()
        };
        let mut s = Session::new(config, now);
        s.step(Input::Received(hello(&[])), now);
        s.step(Input::View(vec![]), now);
        s.step(Input::Received(want(&[])), now);
        s.step(Input::Found(vec![]), now);
        let big = Arc::new(
            Object::from_value(
                Kind::ConfigMap,
                json!({ "metadata": { "name": "big", "namespace": "ns", "uid": "uid-big",
                                      "resourceVersion": "1" }, "data": { "x": "y".repeat(500) } }),
            )
            .unwrap(),
        );
        let out = s.step(Input::Routed(Downstream::Upsert(big)), now);
        assert!(sent(&out).is_empty());
        let out = s.step(Input::Routed(Downstream::Upsert(object("small", 1))), now);
        assert_eq!(sent(&out), [(Op::Upsert, "small".into())]);
    }

    #[tokio::test(start_paused = true)]
    async fn protocol_violations_close_the_session() {
        let now = Instant::now();
        let mut s = Session::new(SessionConfig::default(), now);
        let bad = Envelope {
            op: Op::Upsert as i32,
            ..Default::default()
        };
        let out = s.step(Input::Received(bad), now);
        assert!(matches!(out.last(), Some(Output::Close(_))));
        let mut s = Session::new(SessionConfig::default(), now);
        let garbage = Envelope {
            op: Op::Hello as i32,
            payload: vec![1, 2, 3],
            ..Default::default()
        };
        assert!(matches!(
            s.step(Input::Received(garbage), now).last(),
            Some(Output::Close(_))
        ));
    }
}
