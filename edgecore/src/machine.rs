//! The edge's side of the channel, as a pure state machine: [`EdgeMachine::step`] takes an
//! input and the current time and returns what to do; the tokio shell (`client.rs`) dials,
//! reads and writes the stream, and runs store operations. Tests drive it with simulated time.
//!
//! - Reconnects with exponential backoff and full jitter (a random delay between zero and the
//!   current cap), so a fleet that lost its hub does not come back in lockstep.
//! - Heartbeats when idle; gives up a connection when nothing arrived within the read
//!   deadline (a half-open connection is detected in seconds).
//! - Resync: `HELLO` with the inventory digest; each `MANIFEST` is reconciled against the
//!   store; after `MANIFESTS_DONE`, one `WANT` with everything missing or stale.
//! - Downstream envelopes are acknowledged after the shell persisted them.
//! - Upstream: the outbox is sent in order with a window; entries leave the outbox only when
//!   the hub acknowledges (or rejects) them; after a reconnect, sending restarts from the
//!   oldest unacknowledged entry.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::RngExt;
use rand::SeedableRng;
use sedna_proto::channel::{Envelope, Op, Want};
use sedna_proto::{Message, sync};
use tokio::time::Instant;

use crate::store::OutboxEntry;

/// Timing and flow settings.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// First reconnect delay cap.
    pub backoff_base: Duration,
    /// Largest reconnect delay cap.
    pub backoff_max: Duration,
    /// Jitter added to the delay a hub asks for ([`ConnectError::Later`]), so the nodes of a
    /// partition taken over do not all dial its new hub at the same instant.
    pub later_spread: Duration,
    /// Send a heartbeat when nothing else was sent for this long.
    pub heartbeat: Duration,
    /// Drop the connection when nothing was received for this long.
    pub read_deadline: Duration,
    /// Most upstream writes in flight.
    pub upstream_window: usize,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            later_spread: Duration::from_secs(5),
            // KubeEdge's EdgeHub heartbeat; the deadline stays within the kubelet's 40 s
            // lease, with 20 s for a heartbeat late on a busy machine.
            heartbeat: Duration::from_secs(15),
            read_deadline: Duration::from_secs(35),
            upstream_window: 64,
        }
    }
}

/// Why a connection to the hub could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The hub could not be reached, or failed (retryable).
    #[error("cannot reach the hub: {0}")]
    Unreachable(String),
    /// The hub took the TCP connection, then the TLS or HTTP/2 handshake failed (a hub
    /// bounding its handshakes closes it early): a process is there, so this is not a sign
    /// that the hub is gone (retryable).
    #[error("the hub took the connection but the handshake failed: {0}")]
    Busy(String),
    /// The hub refused this node's certificate (revoked, or not a node certificate): trying
    /// again cannot help; the node must join again.
    #[error("the hub refused this node's certificate: {0}")]
    Refused(String),
    /// Another hub of the tier serves this node: dial it (`host:port`; retryable).
    #[error("the node is served by the hub at {0}")]
    Redirect(String),
    /// No hub of the tier serves this node's partition yet (a takeover is under way): dial
    /// again after this long (retryable; the hub knows when the partition can be claimed),
    /// the `successor` hub if the tier named one.
    #[error("no hub serves this node yet; dial again in {after:?}")]
    Later {
        /// How long to wait.
        after: Duration,
        /// The hub expected to serve the node by then (`host:port`).
        successor: Option<String>,
    },
}

impl ConnectError {
    /// Whether dialing again could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ConnectError::Unreachable(_)
                | ConnectError::Busy(_)
                | ConnectError::Redirect(_)
                | ConnectError::Later { .. }
        )
    }
}

/// What the machine reacts to.
#[derive(Debug)]
pub enum Input {
    /// Begin (dial at once).
    Start,
    /// The stream is open; `hello` is the `HELLO` envelope with the store's digest.
    Connected {
        /// The HELLO to send.
        hello: Envelope,
    },
    /// Dialing failed.
    ConnectFailed(ConnectError),
    /// The stream ended or failed.
    Closed(String),
    /// An envelope from the hub.
    Received(Envelope),
    /// The shell persisted (or skipped as stale) these downstream envelopes.
    Persisted(Vec<u64>),
    /// The shell reconciled a manifest: these uids are wanted.
    Reconciled(Vec<String>),
    /// Outbox entries, as asked for with [`Output::FetchUpstream`].
    Outbox(Vec<OutboxEntry>),
    /// New entries were added to the outbox.
    OutboxChanged,
    /// Renew the certificate with this request (DER).
    Renew(Vec<u8>),
    /// Time passed.
    Tick,
}

/// What the shell must do.
#[derive(Debug, PartialEq)]
pub enum Output {
    /// Open a connection.
    Dial,
    /// Send an envelope.
    Send(Envelope),
    /// Persist an UPSERT or DELETE, then feed [`Input::Persisted`].
    Persist(Envelope),
    /// Reconcile a manifest against the store, then feed [`Input::Reconciled`].
    Reconcile(Envelope),
    /// Read up to `max` outbox entries after `after` and feed [`Input::Outbox`].
    FetchUpstream {
        /// Last sequence number sent.
        after: u64,
        /// How many.
        max: usize,
    },
    /// The hub took these upstream writes: remove them from the outbox.
    UpstreamDone(Vec<u64>),
    /// The hub refused this write for good: remove it and log why.
    UpstreamRejected(u64, String),
    /// A renewed certificate (PEM) arrived.
    Certificate(String),
    /// The renewal was refused.
    RenewRefused(String),
    /// The resync is complete; the node is in sync with the hub.
    Synced,
    /// Drop the connection (read deadline, protocol error).
    Disconnect(String),
    /// The hub refused this node for good: no more dialing (the node works offline until it
    /// joins again).
    GaveUp(ConnectError),
}

#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Stopped,
    Refused,
    Waiting { until: Instant },
    Dialing,
    Resync,
    Live,
}

/// The edge machine.
pub struct EdgeMachine {
    config: MachineConfig,
    phase: Phase,
    attempt: u32,
    rng: rand::rngs::SmallRng,
    last_rx: Instant,
    last_tx: Instant,
    wanted: Vec<String>,
    upstream_sent: u64,
    upstream_in_flight: BTreeSet<u64>,
    fetching: bool,
    renew_id: u64,
}

fn envelope(op: Op) -> Envelope {
    Envelope {
        op: op as i32,
        ..Default::default()
    }
}

impl EdgeMachine {
    /// A stopped machine; `seed` makes the jitter reproducible in tests.
    pub fn new(config: MachineConfig, seed: u64, now: Instant) -> Self {
        Self {
            config,
            phase: Phase::Stopped,
            attempt: 0,
            rng: rand::rngs::SmallRng::seed_from_u64(seed),
            last_rx: now,
            last_tx: now,
            wanted: Vec::new(),
            upstream_sent: 0,
            upstream_in_flight: BTreeSet::new(),
            fetching: false,
            renew_id: u64::MAX / 2,
        }
    }

    /// Whether a stream is open.
    pub fn connected(&self) -> bool {
        matches!(self.phase, Phase::Resync | Phase::Live)
    }

    /// Whether the initial resync of this connection completed.
    pub fn synced(&self) -> bool {
        self.phase == Phase::Live
    }

    /// When the shell should send [`Input::Tick`] next, if anything is scheduled.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting { until } => Some(*until),
            Phase::Resync | Phase::Live => Some(
                (self.last_tx + self.config.heartbeat)
                    .min(self.last_rx + self.config.read_deadline),
            ),
            _ => None,
        }
    }

    /// The current reconnect delay cap.
    fn backoff_cap(&self) -> Duration {
        let exp = self.attempt.min(20);
        self.config
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.config.backoff_max)
    }

    fn schedule_retry(&mut self, now: Instant) {
        let cap = self.backoff_cap();
        let delay = Duration::from_nanos(self.rng.random_range(0..=cap.as_nanos() as u64));
        self.attempt = self.attempt.saturating_add(1);
        self.phase = Phase::Waiting { until: now + delay };
    }

    fn send(&mut self, out: &mut Vec<Output>, e: Envelope, now: Instant) {
        self.last_tx = now;
        out.push(Output::Send(e));
    }

    fn request_upstream(&mut self, out: &mut Vec<Output>) {
        if !self.connected() || self.fetching {
            return;
        }
        let room = self
            .config
            .upstream_window
            .saturating_sub(self.upstream_in_flight.len());
        if room > 0 {
            self.fetching = true;
            out.push(Output::FetchUpstream {
                after: self.upstream_sent,
                max: room,
            });
        }
    }

    fn lost(&mut self, out: &mut Vec<Output>, now: Instant) {
        self.forget_connection();
        self.schedule_retry(now);
        let _ = out;
    }

    /// Drops what only the lost connection had in flight.
    fn forget_connection(&mut self) {
        self.upstream_in_flight.clear();
        self.upstream_sent = 0;
        self.fetching = false;
        self.wanted.clear();
    }

    /// Advances the machine.
    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Start => {
                if self.phase == Phase::Stopped {
                    self.phase = Phase::Dialing;
                    out.push(Output::Dial);
                }
            }
            Input::Connected { hello } => {
                if self.phase == Phase::Dialing {
                    self.phase = Phase::Resync;
                    self.last_rx = now;
                    self.send(&mut out, hello, now);
                    self.request_upstream(&mut out);
                }
            }
            Input::ConnectFailed(error) => {
                if self.phase == Phase::Dialing {
                    if let ConnectError::Later { after, .. } = error {
                        // The hub said when: wait that long (bounded) plus jitter; the
                        // back-off does not grow, the tier is converging. The failures before
                        // it (a dead hub, redirects to it) are answered: were they kept, the
                        // first busy moment at the new hub after the wait would send this
                        // node into a long back-off, and it would come back long after the
                        // rest of its partition.
                        self.attempt = 0;
                        self.forget_connection();
                        let jitter = self
                            .rng
                            .random_range(0..=self.config.later_spread.as_nanos() as u64);
                        let delay =
                            after.min(self.config.backoff_max) + Duration::from_nanos(jitter);
                        self.phase = Phase::Waiting { until: now + delay };
                    } else if error.is_retryable() {
                        self.lost(&mut out, now);
                    } else {
                        self.phase = Phase::Refused;
                        out.push(Output::GaveUp(error));
                    }
                }
            }
            Input::Closed(_) => {
                if self.connected() || self.phase == Phase::Dialing {
                    self.lost(&mut out, now);
                }
            }
            Input::Received(e) => {
                if self.connected() {
                    self.last_rx = now;
                    self.received(e, now, &mut out);
                }
            }
            Input::Persisted(ids) => {
                if self.connected() && !ids.is_empty() {
                    let mut ack = envelope(Op::Ack);
                    ack.ack_of = ids;
                    self.send(&mut out, ack, now);
                }
            }
            Input::Reconciled(uids) => self.wanted.extend(uids),
            Input::Outbox(entries) => {
                self.fetching = false;
                if self.connected() {
                    for entry in entries {
                        if entry.seq <= self.upstream_sent {
                            continue;
                        }
                        self.upstream_sent = entry.seq;
                        self.upstream_in_flight.insert(entry.seq);
                        let e = Envelope {
                            id: entry.seq,
                            op: Op::Upstream as i32,
                            payload: entry.upstream.encode_to_vec(),
                            ..Default::default()
                        };
                        self.send(&mut out, e, now);
                    }
                }
            }
            Input::OutboxChanged => self.request_upstream(&mut out),
            Input::Renew(csr) => {
                if self.connected() {
                    self.renew_id += 1;
                    let e = Envelope {
                        id: self.renew_id,
                        op: Op::Renew as i32,
                        payload: csr,
                        ..Default::default()
                    };
                    self.send(&mut out, e, now);
                }
            }
            Input::Tick => match self.phase.clone() {
                Phase::Waiting { until } if now >= until => {
                    self.phase = Phase::Dialing;
                    out.push(Output::Dial);
                }
                Phase::Resync | Phase::Live => {
                    if now >= self.last_rx + self.config.read_deadline {
                        out.push(Output::Disconnect(format!(
                            "nothing received from the hub for {:?}",
                            self.config.read_deadline
                        )));
                        self.lost(&mut out, now);
                    } else if now >= self.last_tx + self.config.heartbeat {
                        self.send(&mut out, envelope(Op::Heartbeat), now);
                    }
                }
                _ => {}
            },
        }
        out
    }

    fn received(&mut self, e: Envelope, now: Instant, out: &mut Vec<Output>) {
        match Op::try_from(e.op).unwrap_or(Op::Unspecified) {
            Op::Heartbeat => {}
            Op::Upsert | Op::Delete => out.push(Output::Persist(e)),
            Op::Manifest if self.phase == Phase::Resync => out.push(Output::Reconcile(e)),
            Op::ManifestsDone if self.phase == Phase::Resync => {
                let uids = std::mem::take(&mut self.wanted);
                let packed = sync::pack_uids(uids.iter().map(String::as_str)).unwrap_or_default();
                let mut want = envelope(Op::Want);
                want.payload = Want { uids: packed }.encode_to_vec();
                self.send(out, want, now);
            }
            Op::SyncDone if self.phase == Phase::Resync => {
                self.phase = Phase::Live;
                self.attempt = 0;
                out.push(Output::Synced);
            }
            Op::Ack => {
                let done: Vec<u64> = e
                    .ack_of
                    .iter()
                    .copied()
                    .filter(|id| self.upstream_in_flight.remove(id))
                    .collect();
                if !done.is_empty() {
                    out.push(Output::UpstreamDone(done));
                    self.request_upstream(out);
                }
            }
            Op::Reject => {
                let reason = String::from_utf8_lossy(&e.payload).into_owned();
                for id in e.ack_of {
                    if self.upstream_in_flight.remove(&id) {
                        out.push(Output::UpstreamRejected(id, reason.clone()));
                    } else if id == self.renew_id {
                        out.push(Output::RenewRefused(reason.clone()));
                    }
                }
                self.request_upstream(out);
            }
            Op::Certificate => {
                out.push(Output::Certificate(
                    String::from_utf8_lossy(&e.payload).into_owned(),
                ));
            }
            other => out.push(Output::Disconnect(format!(
                "unexpected {other:?} from the hub"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sedna_proto::channel::Upstream;

    fn hello() -> Envelope {
        envelope(Op::Hello)
    }

    fn connected(m: &mut EdgeMachine, now: Instant) -> Vec<Output> {
        m.step(Input::Start, now);
        m.step(Input::Connected { hello: hello() }, now)
    }

    fn entry(seq: u64) -> OutboxEntry {
        OutboxEntry {
            seq,
            upstream: Upstream {
                kind: 3,
                object: None,
                payload: vec![],
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_delays_grow_with_full_jitter_and_reset_after_a_sync() {
        let now = Instant::now();
        let config = MachineConfig::default();
        let mut m = EdgeMachine::new(config.clone(), 7, now);
        assert_eq!(m.step(Input::Start, now), [Output::Dial]);
        let mut delays = Vec::new();
        let mut t = now;
        for _ in 0..8 {
            m.step(
                Input::ConnectFailed(ConnectError::Unreachable("refused".into())),
                t,
            );
            let until = match m.next_deadline() {
                Some(u) => u,
                None => panic!("no retry"),
            };
            delays.push(until - t);
            assert_eq!(m.step(Input::Tick, until), [Output::Dial]);
            t = until;
        }
        for (i, d) in delays.iter().enumerate() {
            let cap = config
                .backoff_base
                .saturating_mul(1 << i)
                .min(config.backoff_max);
            assert!(*d <= cap, "attempt {i}: {d:?} > {cap:?}");
        }
        assert!(delays.windows(2).any(|w| w[0] != w[1]), "jittered");
        m.step(Input::Connected { hello: hello() }, t);
        m.step(Input::Received(envelope(Op::ManifestsDone)), t);
        m.step(Input::Received(envelope(Op::SyncDone)), t);
        assert!(m.synced());
        m.step(Input::Closed("reset".into()), t);
        let first = m.next_deadline().unwrap() - t;
        assert!(
            first <= config.backoff_base,
            "attempts reset after a successful sync"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hub_asking_to_dial_later_is_obeyed_with_jitter_and_the_backoff_does_not_grow() {
        let now = Instant::now();
        let config = MachineConfig::default();
        let mut seen = BTreeSet::new();
        for seed in 0..20 {
            let mut m = EdgeMachine::new(config.clone(), seed, now);
            m.step(Input::Start, now);
            // The hub went away: a few failed dials first, the back-off growing…
            let mut t = now;
            for _ in 0..4 {
                m.step(
                    Input::ConnectFailed(ConnectError::Unreachable("refused".into())),
                    t,
                );
                t = m.next_deadline().unwrap();
                assert_eq!(m.step(Input::Tick, t), [Output::Dial]);
            }
            // …then several answers to wait while the takeover is under way.
            for _ in 0..6 {
                m.step(
                    Input::ConnectFailed(ConnectError::Later {
                        after: Duration::from_secs(12),
                        successor: None,
                    }),
                    t,
                );
                let d = m.next_deadline().unwrap() - t;
                assert!(d >= Duration::from_secs(12), "{d:?} sooner than asked");
                assert!(d <= Duration::from_secs(12) + config.later_spread, "{d:?}");
                seen.insert(d);
                assert_eq!(m.step(Input::Tick, t + d), [Output::Dial]);
                t += d;
            }
            // The next plain failure (the new hub busy) starts from the first back-off step:
            // the failures before the first answer do not count against the node.
            m.step(
                Input::ConnectFailed(ConnectError::Unreachable("x".into())),
                t,
            );
            assert!(m.next_deadline().unwrap() - t <= config.backoff_base);
            // A hostile or confused hub cannot park the node for longer than the back-off cap.
            let t = m.next_deadline().unwrap();
            assert_eq!(m.step(Input::Tick, t), [Output::Dial]);
            m.step(
                Input::ConnectFailed(ConnectError::Later {
                    after: Duration::from_secs(86_400),
                    successor: None,
                }),
                t,
            );
            assert!(m.next_deadline().unwrap() - t <= config.backoff_max + config.later_spread);
        }
        assert!(seen.len() > 50, "jittered: {} distinct delays", seen.len());
    }

    #[tokio::test(start_paused = true)]
    async fn different_seeds_spread_a_fleet_out() {
        let now = Instant::now();
        let mut firsts = BTreeSet::new();
        for seed in 0..20 {
            let mut m = EdgeMachine::new(MachineConfig::default(), seed, now);
            m.step(Input::Start, now);
            m.step(
                Input::ConnectFailed(ConnectError::Unreachable("x".into())),
                now,
            );
            firsts.insert(m.next_deadline().unwrap());
        }
        assert!(firsts.len() > 15, "reconnects are spread, not in lockstep");
    }

    #[tokio::test(start_paused = true)]
    async fn the_resync_reconciles_manifests_then_wants_what_is_missing() {
        let now = Instant::now();
        let mut m = EdgeMachine::new(MachineConfig::default(), 1, now);
        connected(&mut m, now);
        let manifest = envelope(Op::Manifest);
        assert_eq!(
            m.step(Input::Received(manifest.clone()), now),
            [Output::Reconcile(manifest)]
        );
        m.step(Input::Reconciled(vec!["u1".into()]), now);
        let out = m.step(Input::Received(envelope(Op::ManifestsDone)), now);
        let Output::Send(want) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(want.op, Op::Want as i32);
        let uids = sync::unpack_uids(&Want::decode(want.payload.as_slice()).unwrap().uids).unwrap();
        assert_eq!(uids, ["u1"]);
        let upsert = Envelope {
            id: 9,
            op: Op::Upsert as i32,
            ..Default::default()
        };
        assert_eq!(
            m.step(Input::Received(upsert.clone()), now),
            [Output::Persist(upsert)]
        );
        let out = m.step(Input::Persisted(vec![9]), now);
        assert!(matches!(&out[0], Output::Send(e) if e.op == Op::Ack as i32 && e.ack_of == [9]));
        assert_eq!(
            m.step(Input::Received(envelope(Op::SyncDone)), now),
            [Output::Synced]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_is_sent_in_order_with_a_window_and_resent_after_a_reconnect() {
        let now = Instant::now();
        let config = MachineConfig {
            upstream_window: 2,
            ..Default::default()
        };
        let mut m = EdgeMachine::new(config, 1, now);
        let out = connected(&mut m, now);
        assert!(out.contains(&Output::FetchUpstream { after: 0, max: 2 }));
        let out = m.step(Input::Outbox(vec![entry(1), entry(2)]), now);
        let ids: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(e) => Some(e.id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [1, 2]);
        let ack = Envelope {
            op: Op::Ack as i32,
            ack_of: vec![1],
            ..Default::default()
        };
        let out = m.step(Input::Received(ack), now);
        assert_eq!(
            out,
            [
                Output::UpstreamDone(vec![1]),
                Output::FetchUpstream { after: 2, max: 1 }
            ]
        );
        // The connection drops with 2 unacknowledged: after reconnecting, sending restarts
        // from the oldest entry still in the outbox.
        m.step(Input::Outbox(vec![]), now);
        m.step(Input::Closed("reset".into()), now);
        let retry = m.next_deadline().unwrap();
        m.step(Input::Tick, retry);
        let out = m.step(Input::Connected { hello: hello() }, retry);
        assert!(out.contains(&Output::FetchUpstream { after: 0, max: 2 }));
        let out = m.step(Input::Outbox(vec![entry(2), entry(3)]), retry);
        let ids: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send(e) => Some(e.id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [2, 3]);
        let reject = Envelope {
            op: Op::Reject as i32,
            ack_of: vec![2],
            payload: b"nope".to_vec(),
            ..Default::default()
        };
        let out = m.step(Input::Received(reject), retry);
        assert_eq!(out[0], Output::UpstreamRejected(2, "nope".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_hub_is_given_up_after_the_read_deadline() {
        let now = Instant::now();
        let config = MachineConfig::default();
        let mut m = EdgeMachine::new(config.clone(), 1, now);
        connected(&mut m, now);
        let out = m.step(Input::Tick, now + config.heartbeat);
        assert!(matches!(&out[0], Output::Send(e) if e.op == Op::Heartbeat as i32));
        let out = m.step(Input::Tick, now + config.read_deadline);
        assert!(matches!(&out[0], Output::Disconnect(_)));
        assert!(!m.connected());
        assert!(m.next_deadline().is_some(), "a reconnect is scheduled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_certificate_stops_the_dialing_a_network_failure_does_not() {
        let now = Instant::now();
        let mut m = EdgeMachine::new(MachineConfig::default(), 7, now);
        assert_eq!(m.step(Input::Start, now), [Output::Dial]);
        let out = m.step(
            Input::ConnectFailed(ConnectError::Unreachable("timed out".into())),
            now,
        );
        assert!(out.is_empty());
        let retry = m.next_deadline().expect("a retry is planned");
        assert_eq!(m.step(Input::Tick, retry), [Output::Dial]);
        let refused = ConnectError::Refused("PermissionDenied: revoked".into());
        let out = m.step(Input::ConnectFailed(refused.clone()), retry);
        assert_eq!(out, [Output::GaveUp(refused)]);
        assert_eq!(m.next_deadline(), None, "no retry is planned");
        let later = retry + Duration::from_secs(3600);
        assert!(m.step(Input::Tick, later).is_empty());
    }
}
