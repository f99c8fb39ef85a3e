//! The aggregator's side of the round protocol as a pure state machine: [`Server::step`]
//! takes what happened (a connection, a message, a disconnection, the passing of time) and
//! returns what to do (messages to send, connections to close, a round closed, the job
//! finished or failed). No sockets, no clock: the caller owns both, which is what lets the
//! tests drive whole jobs — stragglers, reconnections, stale and malformed updates — in
//! microseconds.
//!
//! Rounds: once `expected_clients` have joined (or, after `round_timeout`, at least
//! `min_clients`), round 1 sends the global weights to every joined client. A round closes
//! when every client it was sent to has answered, or at `round_timeout` with at least
//! `min_clients` answers (the others are stragglers); with fewer the job fails, as the
//! FederatedLearningJob's `roundTimeoutSeconds` promises. Closing aggregates the answers by
//! name (any [`crate::aggregate`] algorithm), then the next round starts; after `rounds` every
//! client gets the final weights.
//!
//! - A client that reconnects (joins again under its worker name) takes over its old place:
//!   the old connection is closed and, if it owes the current round, it gets the round again.
//! - A straggler's late update for a closed round, from a worker the current round was
//!   already sent to, is dropped and the connection kept: the worker answers the current
//!   round next. Any other update for another round is refused with a retryable rejection
//!   (the client joins again and gets the current round); an update whose tensors do not match the global
//!   weights is refused for good, with the mismatch named. Neither disturbs the round.
//! - A client that joins mid-round is given the round too.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Duration;
//! use sedna::fl::Message;
//! use sedna::fl::server::{Input, Output, Server, ServerConfig};
//! use sedna::weights::{Encoding, Weights};
//! use ndarray::{ArrayD, IxDyn};
//!
//! let w = |v: f32| Weights::new(vec![("w".into(), ArrayD::from_elem(IxDyn(&[1]), v))]).unwrap();
//! let config = ServerConfig { job: "job".into(), rounds: 1, expected_clients: 1, ..Default::default() };
//! let fedavg = sedna::aggregate::build("FedAvg", &[]).unwrap();
//! let mut server = Server::new(config, fedavg, w(0.0), 0);
//! let now = Duration::ZERO;
//! server.step(Input::Connected(7), now);
//! let join = Message::Join { job: "job".into(), worker: "edge-1".into(), num_samples: 10, encodings: vec![Encoding::F32] };
//! let out = server.step(Input::Message { conn: 7, message: join, bytes: 60 }, now);
//! assert!(matches!(&out[0], Output::Send { conn: 7, message: Message::Train { round: 1, .. } }));
//! let update = Message::Update { round: 1, num_samples: 10, metrics: BTreeMap::new(), weights: w(4.0) };
//! let out = server.step(Input::Message { conn: 7, message: update, bytes: 60 }, now);
//! assert!(out.iter().any(|o| matches!(o, Output::RoundClosed(r) if r.round == 1)));
//! assert!(out.iter().any(|o| matches!(o, Output::Send { message: Message::Finish { round: 1, .. }, .. })));
//! assert_eq!(server.global().get("w").unwrap()[[0]], 4.0);
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use super::Message;
use crate::aggregate::{Aggregator, Update};
use crate::weights::{Encoding, Weights};

/// A connection, as the caller numbers them.
pub type ConnId = u64;

/// How the job runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// The job's name; joins for another job are refused.
    pub job: String,
    /// Rounds to run.
    pub rounds: u32,
    /// Clients the first round waits for (the job's training workers).
    pub expected_clients: usize,
    /// The fewest answers that close a round at its timeout.
    pub min_clients: usize,
    /// How long a round (and the wait for clients) may take; `None`: no limit.
    pub round_timeout: Option<Duration>,
    /// The most distinct workers that may join.
    pub max_clients: usize,
    /// Settings sent with every round (epochs, batch size, FedProx's mu, …).
    pub settings: BTreeMap<String, String>,
    /// The encoding of the global weights sent down, for clients that read it.
    pub encoding: Encoding,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            job: String::new(),
            rounds: 1,
            expected_clients: 1,
            min_clients: 1,
            round_timeout: None,
            max_clients: 1024,
            settings: BTreeMap::new(),
            encoding: Encoding::F32,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A connection opened.
    Connected(ConnId),
    /// A decoded message arrived (`bytes`: its frame's size, for the figures).
    Message {
        /// From.
        conn: ConnId,
        /// The message.
        message: Message,
        /// Frame size.
        bytes: usize,
    },
    /// A connection closed (or failed, or sent a frame that could not be decoded).
    Disconnected(ConnId),
    /// Time passed (the caller calls this at [`Server::next_deadline`] or on any timer).
    Tick,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this message on that connection (weights in [`Server::encoding_for`]).
    Send {
        /// To.
        conn: ConnId,
        /// The message.
        message: Message,
    },
    /// Close that connection.
    Close {
        /// Which.
        conn: ConnId,
        /// Why (for logs).
        reason: String,
    },
    /// A round closed: checkpoint, evaluate, report.
    RoundClosed(RoundSummary),
    /// The job ran all its rounds; the final weights are [`Server::global`].
    Finished {
        /// The last round.
        round: u32,
    },
    /// The job cannot go on.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The figures of a closed round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSummary {
    /// The round.
    pub round: u32,
    /// Workers whose updates were aggregated, by name.
    pub participants: Vec<String>,
    /// Workers the round was sent to that did not answer in time.
    pub stragglers: Vec<String>,
    /// Samples behind the aggregated updates.
    pub num_samples: u64,
    /// The participants' training metrics, averaged weighted by their samples.
    pub train_metrics: BTreeMap<String, f64>,
    /// Bytes of the updates received (frames).
    pub bytes_up: u64,
    /// Bytes of global weights sent (weights payload, in each client's encoding).
    pub bytes_down: u64,
    /// How long the round took.
    pub duration: Duration,
}

#[derive(Debug, Clone)]
struct Client {
    conn: Option<ConnId>,
    encodings: Vec<Encoding>,
}

#[derive(Debug, Clone)]
struct Answer {
    num_samples: u64,
    metrics: BTreeMap<String, f64>,
    weights: Weights,
}

/// Where the job stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Waiting for clients to join, since then.
    Waiting {
        /// When the wait started.
        since: Duration,
    },
    /// A round is running.
    Round {
        /// The round.
        round: u32,
        /// When it started.
        started: Duration,
        /// Workers it was sent to.
        selected: BTreeSet<String>,
        /// Bytes in and out so far.
        bytes_up: u64,
        /// Bytes of global weights sent.
        bytes_down: u64,
    },
    /// Every round ran.
    Finished {
        /// The last round.
        round: u32,
    },
    /// The job failed.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The aggregator's state machine. See the [module documentation](self).
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    aggregator: Box<dyn Aggregator>,
    global: Weights,
    completed: u32,
    clients: BTreeMap<String, Client>,
    conns: HashMap<ConnId, Option<String>>,
    answers: BTreeMap<String, Answer>,
    phase: Phase,
}

impl Server {
    /// A server starting from `global`, `completed` rounds already done (resuming from a
    /// checkpoint; 0 for a new job).
    pub fn new(
        config: ServerConfig,
        aggregator: Box<dyn Aggregator>,
        global: Weights,
        completed: u32,
    ) -> Self {
        let phase = if completed >= config.rounds {
            Phase::Finished { round: completed }
        } else {
            Phase::Waiting {
                since: Duration::ZERO,
            }
        };
        Server {
            config,
            aggregator,
            global,
            completed,
            clients: BTreeMap::new(),
            conns: HashMap::new(),
            answers: BTreeMap::new(),
            phase,
        }
    }

    /// The global weights (after the last closed round).
    pub fn global(&self) -> &Weights {
        &self.global
    }

    /// Rounds closed so far.
    pub fn completed_rounds(&self) -> u32 {
        self.completed
    }

    /// Where the job stands.
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Workers that joined, with whether they are connected now.
    pub fn clients(&self) -> impl Iterator<Item = (&str, bool)> {
        self.clients
            .iter()
            .map(|(name, c)| (name.as_str(), c.conn.is_some()))
    }

    /// The encoding to send a connection's weights in: the job's, if that client reads it,
    /// else f32.
    pub fn encoding_for(&self, conn: ConnId) -> Encoding {
        let reads = self
            .conns
            .get(&conn)
            .and_then(|n| n.as_ref())
            .and_then(|n| self.clients.get(n))
            .is_some_and(|c| c.encodings.contains(&self.config.encoding));
        if reads {
            self.config.encoding
        } else {
            Encoding::F32
        }
    }

    /// When the machine next needs a [`Input::Tick`], if ever.
    pub fn next_deadline(&self) -> Option<Duration> {
        let timeout = self.config.round_timeout?;
        match &self.phase {
            Phase::Waiting { since } => Some(*since + timeout),
            Phase::Round { started, .. } => Some(*started + timeout),
            _ => None,
        }
    }

    /// Ends the job now, after the last closed round (a target metric was reached): the
    /// global weights are final, every connected client gets them; a round under way is
    /// abandoned (late answers are refused).
    pub fn stop(&mut self) -> Vec<Output> {
        if matches!(self.phase, Phase::Finished { .. } | Phase::Failed { .. }) {
            return Vec::new();
        }
        let round = self.completed;
        self.answers.clear();
        self.phase = Phase::Finished { round };
        let mut out: Vec<Output> = self
            .connected()
            .into_iter()
            .map(|(_, conn)| Output::Send {
                conn,
                message: Message::Finish {
                    round,
                    weights: self.global.clone(),
                },
            })
            .collect();
        out.push(Output::Finished { round });
        out
    }

    /// Handles one input at time `now` (any monotonic clock, as an offset).
    pub fn step(&mut self, input: Input, now: Duration) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Connected(conn) => {
                self.conns.insert(conn, None);
            }
            Input::Disconnected(conn) => {
                if let Some(Some(name)) = self.conns.remove(&conn)
                    && let Some(client) = self.clients.get_mut(&name)
                    && client.conn == Some(conn)
                {
                    client.conn = None;
                }
            }
            Input::Message {
                conn,
                message,
                bytes,
            } => self.message(conn, message, bytes, now, &mut out),
            Input::Tick => {}
        }
        self.advance(now, &mut out);
        out
    }

    fn reject(out: &mut Vec<Output>, conn: ConnId, reason: String, retryable: bool) {
        out.push(Output::Send {
            conn,
            message: Message::Reject {
                reason: reason.clone(),
                retryable,
            },
        });
        out.push(Output::Close { conn, reason });
    }

    fn message(
        &mut self,
        conn: ConnId,
        message: Message,
        bytes: usize,
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        let Some(joined) = self.conns.get(&conn).cloned() else {
            return;
        };
        match (message, joined) {
            (
                Message::Join {
                    job,
                    worker,
                    encodings,
                    ..
                },
                None,
            ) => self.join(conn, job, worker, encodings, now, out),
            (Message::Join { .. }, Some(_)) => {
                Self::reject(out, conn, "joined twice on one connection".into(), false);
            }
            (message, None) => Self::reject(
                out,
                conn,
                format!("{} before joining", message.kind()),
                false,
            ),
            (
                Message::Update {
                    round,
                    num_samples,
                    metrics,
                    weights,
                },
                Some(worker),
            ) => self.update(
                conn,
                &worker,
                round,
                Answer {
                    num_samples,
                    metrics,
                    weights,
                },
                bytes,
                out,
            ),
            (Message::Evaluation { .. }, Some(_)) => {}
            (Message::Reject { reason, .. }, Some(worker)) => {
                tracing::warn!(%worker, %reason, "a client gave up");
                out.push(Output::Close { conn, reason });
            }
            (other, Some(_)) => Self::reject(
                out,
                conn,
                format!("{} is a server-to-client message", other.kind()),
                false,
            ),
        }
    }

    fn join(
        &mut self,
        conn: ConnId,
        job: String,
        worker: String,
        encodings: Vec<Encoding>,
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        if job != self.config.job {
            let reason = format!(
                "this aggregator serves job {:?}, not {job:?}",
                self.config.job
            );
            return Self::reject(out, conn, reason, false);
        }
        if worker.is_empty() || worker.len() > 253 {
            return Self::reject(
                out,
                conn,
                "a worker name must have 1 to 253 bytes".into(),
                false,
            );
        }
        if !self.clients.contains_key(&worker) && self.clients.len() >= self.config.max_clients {
            let reason = format!(
                "job {} takes at most {} workers",
                self.config.job, self.config.max_clients
            );
            return Self::reject(out, conn, reason, false);
        }
        let client = self.clients.entry(worker.clone()).or_insert(Client {
            conn: None,
            encodings: Vec::new(),
        });
        if let Some(old) = client.conn.replace(conn)
            && old != conn
        {
            // The worker reconnected: its new connection takes over.
            self.conns.remove(&old);
            out.push(Output::Close {
                conn: old,
                reason: format!("{worker} reconnected"),
            });
        }
        client.encodings = encodings;
        self.conns.insert(conn, Some(worker.clone()));
        match &mut self.phase {
            Phase::Round {
                round, selected, ..
            } => {
                // Joining (or back) mid-round: the round is yours too, unless answered.
                let round = *round;
                selected.insert(worker.clone());
                if !self.answers.contains_key(&worker) {
                    self.send_round(conn, round, out);
                }
            }
            Phase::Finished { round } => {
                let round = *round;
                out.push(Output::Send {
                    conn,
                    message: Message::Finish {
                        round,
                        weights: self.global.clone(),
                    },
                });
            }
            Phase::Failed { reason } => {
                let reason = reason.clone();
                Self::reject(out, conn, reason, false);
            }
            Phase::Waiting { .. } => {}
        }
        let _ = now;
    }

    fn send_round(&mut self, conn: ConnId, round: u32, out: &mut Vec<Output>) {
        let encoding = self.encoding_for(conn);
        let size = self.global.encoded_len(encoding) as u64;
        if let Phase::Round { bytes_down, .. } = &mut self.phase {
            *bytes_down += size;
        }
        out.push(Output::Send {
            conn,
            message: Message::Train {
                round,
                weights: self.global.clone(),
                settings: self.config.settings.clone(),
            },
        });
    }

    fn update(
        &mut self,
        conn: ConnId,
        worker: &str,
        round: u32,
        answer: Answer,
        bytes: usize,
        out: &mut Vec<Output>,
    ) {
        let Phase::Round {
            round: current,
            selected,
            bytes_up,
            ..
        } = &mut self.phase
        else {
            let reason = format!("update for round {round} while no round is running");
            return Self::reject(out, conn, reason, true);
        };
        if round < *current && selected.contains(worker) && !self.answers.contains_key(worker) {
            // A straggler's late answer crossed the next round on the wire: that round is
            // already on its connection and it will answer it. Dropping the stale update
            // (not the connection) keeps a slow worker in the job.
            tracing::debug!(%worker, round, current = *current, "a late update for a closed round dropped");
            return;
        }
        if round != *current {
            let reason = format!("update for round {round}; the current round is {current}");
            return Self::reject(out, conn, reason, true);
        }
        if !selected.contains(worker) {
            let reason = format!("round {round} was not sent to {worker}");
            return Self::reject(out, conn, reason, true);
        }
        if let Err(mismatch) = self.global.check_same_layout(&answer.weights) {
            selected.remove(worker);
            let reason = format!("update of {worker} for round {round} refused: {mismatch}");
            return Self::reject(out, conn, reason, false);
        }
        if answer.num_samples == 0 {
            selected.remove(worker);
            let reason = format!("update of {worker} for round {round} reports no samples");
            return Self::reject(out, conn, reason, false);
        }
        if answer
            .weights
            .tensors()
            .iter()
            .any(|(_, t)| t.iter().any(|v| !v.is_finite()))
        {
            selected.remove(worker);
            let reason =
                format!("update of {worker} for round {round} holds values that are not finite");
            return Self::reject(out, conn, reason, false);
        }
        *bytes_up += bytes as u64;
        self.answers.insert(worker.to_string(), answer);
    }

    /// Starts or closes rounds as the state and the time allow.
    fn advance(&mut self, now: Duration, out: &mut Vec<Output>) {
        loop {
            match &self.phase {
                Phase::Waiting { since } => {
                    let connected = self.connected().len();
                    let waited = self.config.round_timeout.is_some_and(|t| now >= *since + t);
                    let ready = connected >= self.config.expected_clients.max(1)
                        || (waited && connected >= self.config.min_clients.max(1));
                    if !ready {
                        return;
                    }
                    self.start_round(self.completed + 1, now, out);
                }
                Phase::Round {
                    round,
                    started,
                    selected,
                    ..
                } => {
                    let round = *round;
                    if selected.is_empty() {
                        self.fail(format!("round {round}: no worker is left to train it"), out);
                        return;
                    }
                    let all_answered = selected.iter().all(|w| self.answers.contains_key(w));
                    let timed_out = self
                        .config
                        .round_timeout
                        .is_some_and(|t| now >= *started + t);
                    if all_answered
                        || (timed_out && self.answers.len() >= self.config.min_clients.max(1))
                    {
                        self.close_round(now, out);
                        continue;
                    }
                    if timed_out {
                        let reason = format!(
                            "round {round}: {} of at least {} updates arrived within the round timeout",
                            self.answers.len(),
                            self.config.min_clients.max(1)
                        );
                        self.fail(reason, out);
                    }
                    return;
                }
                Phase::Finished { .. } | Phase::Failed { .. } => return,
            }
        }
    }

    fn connected(&self) -> Vec<(String, ConnId)> {
        self.clients
            .iter()
            .filter_map(|(name, c)| c.conn.map(|conn| (name.clone(), conn)))
            .collect()
    }

    fn start_round(&mut self, round: u32, now: Duration, out: &mut Vec<Output>) {
        let connected = self.connected();
        self.answers.clear();
        self.phase = Phase::Round {
            round,
            started: now,
            selected: connected.iter().map(|(name, _)| name.clone()).collect(),
            bytes_up: 0,
            bytes_down: 0,
        };
        for (_, conn) in connected {
            self.send_round(conn, round, out);
        }
    }

    fn close_round(&mut self, now: Duration, out: &mut Vec<Output>) {
        let Phase::Round {
            round,
            started,
            selected,
            bytes_up,
            bytes_down,
        } = std::mem::replace(&mut self.phase, Phase::Waiting { since: now })
        else {
            return;
        };
        let answers = std::mem::take(&mut self.answers);
        let participants: Vec<String> = answers.keys().cloned().collect();
        let stragglers: Vec<String> = selected
            .iter()
            .filter(|w| !answers.contains_key(*w))
            .cloned()
            .collect();
        let num_samples: u64 = answers.values().map(|a| a.num_samples).sum();
        let mut train_metrics = BTreeMap::new();
        for answer in answers.values() {
            for (key, value) in &answer.metrics {
                *train_metrics.entry(key.clone()).or_insert(0.0) +=
                    value * answer.num_samples as f64 / num_samples.max(1) as f64;
            }
        }
        let updates: Vec<Update> = answers
            .into_values()
            .map(|a| Update {
                weights: a.weights,
                num_samples: a.num_samples,
            })
            .collect();
        match self.aggregator.aggregate(&self.global, &updates) {
            Ok(global) => self.global = global,
            Err(e) => return self.fail(format!("round {round}: {e}"), out),
        }
        self.completed = round;
        out.push(Output::RoundClosed(RoundSummary {
            round,
            participants,
            stragglers,
            num_samples,
            train_metrics,
            bytes_up,
            bytes_down,
            duration: now.saturating_sub(started),
        }));
        if round >= self.config.rounds {
            self.phase = Phase::Finished { round };
            for (_, conn) in self.connected() {
                out.push(Output::Send {
                    conn,
                    message: Message::Finish {
                        round,
                        weights: self.global.clone(),
                    },
                });
            }
            out.push(Output::Finished { round });
        } else {
            self.start_round(round + 1, now, out);
        }
    }

    fn fail(&mut self, reason: String, out: &mut Vec<Output>) {
        for (_, conn) in self.connected() {
            Self::reject(out, conn, reason.clone(), false);
        }
        self.phase = Phase::Failed {
            reason: reason.clone(),
        };
        out.push(Output::Failed { reason });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn w(v: f32) -> Weights {
        Weights::new(vec![
            ("a".into(), ArrayD::from_elem(IxDyn(&[2]), v)),
            ("b".into(), ArrayD::from_elem(IxDyn(&[1]), -v)),
        ])
        .unwrap()
    }

    fn server(rounds: u32, expected: usize, min: usize, timeout: Option<u64>) -> Server {
        let config = ServerConfig {
            job: "digits".into(),
            rounds,
            expected_clients: expected,
            min_clients: min,
            round_timeout: timeout.map(Duration::from_secs),
            ..Default::default()
        };
        Server::new(
            config,
            crate::aggregate::build("FedAvg", &[]).unwrap(),
            w(0.0),
            0,
        )
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn join(s: &mut Server, conn: ConnId, worker: &str, at: u64) -> Vec<Output> {
        s.step(Input::Connected(conn), secs(at));
        let message = Message::Join {
            job: "digits".into(),
            worker: worker.into(),
            num_samples: 10,
            encodings: vec![Encoding::F32],
        };
        s.step(
            Input::Message {
                conn,
                message,
                bytes: 50,
            },
            secs(at),
        )
    }

    fn update(
        s: &mut Server,
        conn: ConnId,
        round: u32,
        samples: u64,
        value: f32,
        at: u64,
    ) -> Vec<Output> {
        let mut metrics = BTreeMap::new();
        metrics.insert("loss".to_string(), f64::from(value));
        let message = Message::Update {
            round,
            num_samples: samples,
            metrics,
            weights: w(value),
        };
        s.step(
            Input::Message {
                conn,
                message,
                bytes: 100,
            },
            secs(at),
        )
    }

    fn trains(out: &[Output]) -> Vec<(ConnId, u32)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send {
                    conn,
                    message: Message::Train { round, .. },
                } => Some((*conn, *round)),
                _ => None,
            })
            .collect()
    }

    fn closed(out: &[Output]) -> Option<&RoundSummary> {
        out.iter().find_map(|o| match o {
            Output::RoundClosed(r) => Some(r),
            _ => None,
        })
    }

    fn rejection(out: &[Output], to: ConnId) -> Option<(String, bool)> {
        out.iter().find_map(|o| match o {
            Output::Send {
                conn,
                message: Message::Reject { reason, retryable },
            } if *conn == to => Some((reason.clone(), *retryable)),
            _ => None,
        })
    }

    #[test]
    fn rounds_start_when_every_worker_joined_and_close_when_all_answered() {
        let mut s = server(2, 3, 3, None);
        assert!(trains(&join(&mut s, 1, "edge-1", 0)).is_empty());
        assert!(trains(&join(&mut s, 2, "edge-2", 0)).is_empty());
        assert_eq!(
            trains(&join(&mut s, 3, "edge-3", 1)),
            vec![(1, 1), (2, 1), (3, 1)]
        );
        assert!(closed(&update(&mut s, 1, 1, 10, 1.0, 2)).is_none());
        assert!(closed(&update(&mut s, 2, 1, 30, 3.0, 2)).is_none());
        let out = update(&mut s, 3, 1, 60, 5.0, 4);
        let summary = closed(&out).unwrap();
        assert_eq!(summary.participants, ["edge-1", "edge-2", "edge-3"]);
        assert!(summary.stragglers.is_empty());
        assert_eq!(summary.num_samples, 100);
        assert_eq!(summary.bytes_up, 300);
        assert_eq!(summary.duration, secs(3));
        // Sample-weighted: (10·1 + 30·3 + 60·5) / 100 = 4.
        assert_eq!(s.global(), &w(4.0));
        assert!((summary.train_metrics["loss"] - 4.0).abs() < 1e-9);
        assert_eq!(trains(&out), vec![(1, 2), (2, 2), (3, 2)]);
        update(&mut s, 1, 2, 1, 1.0, 5);
        update(&mut s, 2, 2, 1, 1.0, 5);
        let out = update(&mut s, 3, 2, 2, 4.0, 5);
        assert_eq!(closed(&out).unwrap().round, 2);
        assert!(out.contains(&Output::Finished { round: 2 }));
        let finishes = out
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Output::Send {
                        message: Message::Finish { round: 2, .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!(finishes, 3);
        assert_eq!(s.phase(), &Phase::Finished { round: 2 });
        assert_eq!(s.global(), &w(2.5));
        // A worker that comes back later gets the final weights.
        let out = join(&mut s, 9, "edge-2", 9);
        assert!(matches!(
            &out[..],
            [
                Output::Close { conn: 2, .. },
                Output::Send {
                    conn: 9,
                    message: Message::Finish { round: 2, .. }
                }
            ]
        ));
    }

    #[test]
    fn a_straggler_is_left_behind_at_the_timeout_and_answers_the_next_round() {
        let mut s = server(2, 3, 2, Some(10));
        for (conn, name) in [(1, "edge-1"), (2, "edge-2"), (3, "edge-3")] {
            join(&mut s, conn, name, 0);
        }
        assert_eq!(s.next_deadline(), Some(secs(10)));
        update(&mut s, 1, 1, 10, 1.0, 1);
        update(&mut s, 2, 1, 10, 3.0, 2);
        assert!(closed(&s.step(Input::Tick, secs(9))).is_none());
        let out = s.step(Input::Tick, secs(10));
        let summary = closed(&out).unwrap();
        assert_eq!(summary.participants, ["edge-1", "edge-2"]);
        assert_eq!(summary.stragglers, ["edge-3"]);
        assert_eq!(s.global(), &w(2.0));
        // The straggler's late answer crossed round 2 on the wire: dropped, its connection
        // kept, and its answer to round 2 counts.
        let out = update(&mut s, 3, 1, 10, 100.0, 11);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(s.global(), &w(2.0));
        update(&mut s, 1, 2, 10, 2.0, 12);
        update(&mut s, 2, 2, 10, 2.0, 12);
        let out = update(&mut s, 3, 2, 10, 5.0, 13);
        let summary = closed(&out).unwrap();
        assert_eq!(summary.participants, ["edge-1", "edge-2", "edge-3"]);
        assert!(summary.stragglers.is_empty());
        assert_eq!(s.global(), &w(3.0));
        // A second stale answer for the round it already answered is refused as before.
        let out = update(&mut s, 3, 2, 10, 100.0, 14);
        assert!(rejection(&out, 3).is_some_and(|(_, retryable)| retryable));
    }

    #[test]
    fn too_few_answers_at_the_timeout_fail_the_job_with_the_reason() {
        let mut s = server(3, 2, 2, Some(5));
        join(&mut s, 1, "edge-1", 0);
        join(&mut s, 2, "edge-2", 0);
        update(&mut s, 1, 1, 10, 1.0, 1);
        let out = s.step(Input::Tick, secs(5));
        let reason = out
            .iter()
            .find_map(|o| match o {
                Output::Failed { reason } => Some(reason.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            reason,
            "round 1: 1 of at least 2 updates arrived within the round timeout"
        );
        assert!(rejection(&out, 2).is_some_and(|(r, retryable)| r == reason && !retryable));
        assert!(matches!(s.phase(), Phase::Failed { .. }));
    }

    #[test]
    fn waiting_for_workers_ends_at_the_timeout_with_the_minimum() {
        let mut s = server(1, 3, 2, Some(30));
        join(&mut s, 1, "edge-1", 0);
        assert!(
            trains(&s.step(Input::Tick, secs(31))).is_empty(),
            "one is below the minimum"
        );
        // The second worker arrives after the wait: the round starts at once.
        let out = join(&mut s, 2, "edge-2", 32);
        assert_eq!(trains(&out), vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn a_worker_that_reconnects_mid_round_resumes_without_a_duplicate_or_a_stall() {
        let mut s = server(1, 2, 2, None);
        join(&mut s, 1, "edge-1", 0);
        join(&mut s, 2, "edge-2", 0);
        s.step(Input::Disconnected(2), secs(1));
        let out = join(&mut s, 5, "edge-2", 2);
        assert_eq!(
            trains(&out),
            vec![(5, 1)],
            "the round is sent again on the new connection"
        );
        // Reconnecting again while the old connection looks alive: the old one is closed.
        let out = join(&mut s, 6, "edge-2", 3);
        assert!(out.contains(&Output::Close {
            conn: 5,
            reason: "edge-2 reconnected".into()
        }));
        assert_eq!(trains(&out), vec![(6, 1)]);
        update(&mut s, 1, 1, 10, 2.0, 4);
        let out = update(&mut s, 6, 1, 10, 4.0, 4);
        assert_eq!(closed(&out).unwrap().participants, ["edge-1", "edge-2"]);
        assert_eq!(s.global(), &w(3.0));
        // A message on the replaced connection is ignored.
        assert!(update(&mut s, 5, 1, 10, 9.0, 5).is_empty());
    }

    #[test]
    fn bad_updates_are_refused_with_their_reason_and_the_round_goes_on() {
        let mut s = server(1, 3, 1, None);
        for (conn, name) in [(1, "edge-1"), (2, "edge-2"), (3, "edge-3")] {
            join(&mut s, conn, name, 0);
        }
        let wrong =
            Weights::new(vec![("a".into(), ArrayD::from_elem(IxDyn(&[3]), 1.0f32))]).unwrap();
        let message = Message::Update {
            round: 1,
            num_samples: 5,
            metrics: BTreeMap::new(),
            weights: wrong,
        };
        let out = s.step(
            Input::Message {
                conn: 2,
                message,
                bytes: 10,
            },
            secs(1),
        );
        let (reason, retryable) = rejection(&out, 2).unwrap();
        assert!(
            reason.starts_with("update of edge-2 for round 1 refused:"),
            "{reason}"
        );
        assert!(!retryable);
        let out = update(&mut s, 3, 7, 5, 1.0, 1);
        assert_eq!(
            rejection(&out, 3).unwrap(),
            ("update for round 7; the current round is 1".into(), true)
        );
        let out = update(&mut s, 1, 1, 0, 1.0, 1);
        assert!(rejection(&out, 1).unwrap().0.contains("reports no samples"));
        // edge-1 and edge-2 are out of the round; edge-3 (which only sent a stale update) answers.
        let out = update(&mut s, 3, 1, 5, 8.0, 2);
        assert_eq!(closed(&out).unwrap().participants, ["edge-3"]);
        assert_eq!(s.global(), &w(8.0));
    }

    #[test]
    fn strangers_and_out_of_order_messages_are_refused() {
        let mut s = server(1, 1, 1, None);
        s.step(Input::Connected(1), secs(0));
        let other_job = Message::Join {
            job: "other".into(),
            worker: "x".into(),
            num_samples: 1,
            encodings: vec![],
        };
        let out = s.step(
            Input::Message {
                conn: 1,
                message: other_job,
                bytes: 10,
            },
            secs(0),
        );
        assert!(
            rejection(&out, 1)
                .unwrap()
                .0
                .contains("serves job \"digits\", not \"other\"")
        );
        s.step(Input::Connected(2), secs(0));
        let out = update(&mut s, 2, 1, 1, 1.0, 0);
        assert_eq!(rejection(&out, 2).unwrap().0, "update before joining");
        let mut s = Server::new(
            ServerConfig {
                job: "digits".into(),
                max_clients: 1,
                expected_clients: 2,
                ..Default::default()
            },
            crate::aggregate::build("FedAvg", &[]).unwrap(),
            w(0.0),
            0,
        );
        join(&mut s, 1, "edge-1", 0);
        let out = join(&mut s, 2, "edge-2", 0);
        assert_eq!(
            rejection(&out, 2).unwrap().0,
            "job digits takes at most 1 workers"
        );
    }

    #[test]
    fn stopping_at_a_target_finishes_with_the_last_closed_round() {
        let mut s = server(10, 2, 2, None);
        join(&mut s, 1, "edge-1", 0);
        join(&mut s, 2, "edge-2", 0);
        update(&mut s, 1, 1, 10, 2.0, 1);
        let out = update(&mut s, 2, 1, 10, 4.0, 1);
        assert_eq!(trains(&out), vec![(1, 2), (2, 2)], "round 2 started");
        let out = s.stop();
        assert_eq!(out.last(), Some(&Output::Finished { round: 1 }));
        assert_eq!(
            out.iter()
                .filter(|o| matches!(
                    o,
                    Output::Send {
                        message: Message::Finish { round: 1, .. },
                        ..
                    }
                ))
                .count(),
            2
        );
        assert_eq!(s.global(), &w(3.0));
        // A late answer to the abandoned round is refused; stopping again does nothing.
        assert!(rejection(&update(&mut s, 1, 2, 10, 9.0, 2), 1).is_some());
        assert!(s.stop().is_empty());
        assert_eq!(s.global(), &w(3.0));
    }

    #[test]
    fn a_resumed_job_continues_after_its_last_checkpointed_round() {
        let config = ServerConfig {
            job: "digits".into(),
            rounds: 3,
            ..Default::default()
        };
        let mut s = Server::new(
            config,
            crate::aggregate::build("FedAvg", &[]).unwrap(),
            w(7.0),
            2,
        );
        let out = join(&mut s, 1, "edge-1", 0);
        assert_eq!(trains(&out), vec![(1, 3)]);
        let out = update(&mut s, 1, 3, 5, 1.0, 1);
        assert!(out.contains(&Output::Finished { round: 3 }));
    }

    #[test]
    fn weights_go_down_in_the_jobs_encoding_to_clients_that_read_it() {
        let config = ServerConfig {
            job: "digits".into(),
            encoding: Encoding::Int8,
            expected_clients: 2,
            ..Default::default()
        };
        let mut s = Server::new(
            config,
            crate::aggregate::build("FedAvg", &[]).unwrap(),
            w(0.0),
            0,
        );
        s.step(Input::Connected(1), secs(0));
        let join_int8 = Message::Join {
            job: "digits".into(),
            worker: "a".into(),
            num_samples: 1,
            encodings: vec![Encoding::Int8, Encoding::F32],
        };
        s.step(
            Input::Message {
                conn: 1,
                message: join_int8,
                bytes: 1,
            },
            secs(0),
        );
        join(&mut s, 2, "b", 0);
        assert_eq!(s.encoding_for(1), Encoding::Int8);
        assert_eq!(s.encoding_for(2), Encoding::F32);
    }
}
