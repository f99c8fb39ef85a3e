//! Federated learning, client side: the [`Estimator`] an app implements, the
//! [`FederatedLearning`] client that drives it round by round, and the round protocol's
//! [`Message`]s with their binary framing (weights travel as [`crate::weights`] tensors,
//! never as JSON lists).
//!
//! The client is a pure state machine: [`FederatedLearning::join`] gives the first message,
//! [`FederatedLearning::handle`] turns each server message into the reply (training or
//! evaluating on the way). The transport (a stream to the aggregator, or object storage) is
//! the caller's: anything that moves [`Message::encode`]d frames works.
//!
//! Protocol, one job:
//! 1. client → `Join { job, worker, num_samples, encodings }`
//! 2. server → `Train { round, weights, settings }`; client trains from those weights and
//!    answers `Update { round, num_samples, metrics, weights }`
//! 3. (optional) server → `Evaluate { round, weights }`; client answers `Evaluation`
//! 4. server → `Finish { round, weights }`: the final model; the client keeps it and stops.
//!
//! Either side may send `Reject { reason, retryable }`. A `Train` for a round the client has
//! already answered is answered again from its last update (the reply was lost), never
//! trained twice.
//!
//! ```
//! use std::collections::BTreeMap;
//! use sedna::fl::{Estimator, EstimatorError, FederatedLearning, Message, TrainReport};
//! use sedna::weights::{Encoding, Weights};
//! use ndarray::{ArrayD, IxDyn};
//!
//! /// Learns the mean of its data: one weight.
//! struct Mean { w: f32, data: Vec<f32> }
//! impl Estimator for Mean {
//!     fn get_weights(&self) -> Weights {
//!         Weights::new(vec![("w".into(), ArrayD::from_elem(IxDyn(&[1]), self.w))]).unwrap()
//!     }
//!     fn set_weights(&mut self, weights: &Weights) -> Result<(), EstimatorError> {
//!         self.w = weights.get("w").ok_or_else(|| EstimatorError::new("no w"))?[[0]];
//!         Ok(())
//!     }
//!     fn train(&mut self, _: &BTreeMap<String, String>) -> Result<TrainReport, EstimatorError> {
//!         self.w = self.data.iter().sum::<f32>() / self.data.len() as f32;
//!         Ok(TrainReport { num_samples: self.data.len() as u64, metrics: BTreeMap::new() })
//!     }
//!     fn evaluate(&mut self) -> Result<BTreeMap<String, f64>, EstimatorError> {
//!         Ok(BTreeMap::new())
//!     }
//!     fn num_samples(&self) -> u64 { self.data.len() as u64 }
//! }
//!
//! let mut client = FederatedLearning::new("job", "edge-0", Mean { w: 0.0, data: vec![1.0, 3.0] }, Encoding::F32);
//! let _join = client.join();
//! let train = Message::Train { round: 1, weights: client.estimator().get_weights(), settings: BTreeMap::new() };
//! let reply = client.handle(train).unwrap().unwrap();
//! assert!(matches!(reply, Message::Update { round: 1, num_samples: 2, .. }));
//! # Ok::<(), sedna::fl::FlError>(())
//! ```

use std::collections::BTreeMap;

use crate::weights::{Encoding, Limits, Weights, WeightsError};

pub mod client;
pub mod estimator;
pub mod server;
pub mod wire;

const MAGIC: &[u8; 4] = b"SDNF";
const VERSION: u8 = 1;
/// The largest JSON header a frame may carry.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
const PREFIX_BYTES: usize = 4 + 1 + 3 + 4 + 8;

/// An error from an [`Estimator`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EstimatorError {
    /// What failed.
    pub message: String,
}

impl EstimatorError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        EstimatorError {
            message: message.into(),
        }
    }
}

/// Federated-learning errors.
#[derive(Debug, thiserror::Error)]
pub enum FlError {
    /// A frame is malformed. Not retryable.
    #[error("malformed federated-learning frame: {0}")]
    Frame(String),
    /// The weights in a frame are malformed or too large. Not retryable.
    #[error("federated-learning weights: {0}")]
    Weights(#[from] WeightsError),
    /// The estimator failed. Retryable: the server may send the round again.
    #[error("estimator failed in round {round}: {source}")]
    Estimator {
        /// The round.
        round: u32,
        /// The estimator's error.
        source: EstimatorError,
    },
    /// A message that does not fit the client's state. Not retryable.
    #[error("unexpected {message} while {state}")]
    Unexpected {
        /// The message kind.
        message: &'static str,
        /// The client's state.
        state: &'static str,
    },
    /// The server rejected the client.
    #[error("rejected by the aggregator: {reason}")]
    Rejected {
        /// Why.
        reason: String,
        /// Whether joining again later can succeed.
        retryable: bool,
    },
}

impl FlError {
    /// Whether trying again can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            FlError::Estimator { .. } => true,
            FlError::Rejected { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// What one round of local training reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Samples trained on (FedAvg weighs by it).
    pub num_samples: u64,
    /// Metrics (loss, accuracy, …).
    pub metrics: BTreeMap<String, f64>,
}

/// A model that trains locally. Implement it over any framework: the weights are named
/// `f32` tensors.
pub trait Estimator {
    /// The current weights.
    fn get_weights(&self) -> Weights;
    /// Replaces the weights (from the aggregator).
    fn set_weights(&mut self, weights: &Weights) -> Result<(), EstimatorError>;
    /// Trains locally with the round's settings (epochs, learning rate, …).
    fn train(&mut self, settings: &BTreeMap<String, String>)
    -> Result<TrainReport, EstimatorError>;
    /// Evaluates on local test data.
    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>, EstimatorError>;
    /// Local training samples.
    fn num_samples(&self) -> u64;
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Client → server: join a job.
    Join {
        /// Job name.
        job: String,
        /// Worker name.
        worker: String,
        /// Local training samples.
        num_samples: u64,
        /// Weight encodings the client reads, preferred first.
        encodings: Vec<Encoding>,
    },
    /// Server → client: train from these weights.
    Train {
        /// Round, from 1.
        round: u32,
        /// Global weights.
        weights: Weights,
        /// Settings for this round.
        settings: BTreeMap<String, String>,
    },
    /// Client → server: the result of a round.
    Update {
        /// Round answered.
        round: u32,
        /// Samples trained on.
        num_samples: u64,
        /// Training metrics.
        metrics: BTreeMap<String, f64>,
        /// Local weights after training.
        weights: Weights,
    },
    /// Server → client: evaluate these weights.
    Evaluate {
        /// Round.
        round: u32,
        /// Weights to evaluate.
        weights: Weights,
    },
    /// Client → server: evaluation metrics.
    Evaluation {
        /// Round.
        round: u32,
        /// Local test samples' metrics.
        metrics: BTreeMap<String, f64>,
    },
    /// Server → client: the job is over; these are the final weights.
    Finish {
        /// Last round.
        round: u32,
        /// Final weights.
        weights: Weights,
    },
    /// Either way: refusal.
    Reject {
        /// Why.
        reason: String,
        /// Whether trying again later can succeed.
        retryable: bool,
    },
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Header {
    Join {
        job: String,
        worker: String,
        num_samples: u64,
        encodings: Vec<String>,
    },
    Train {
        round: u32,
        #[serde(default)]
        settings: BTreeMap<String, String>,
    },
    Update {
        round: u32,
        num_samples: u64,
        #[serde(default)]
        metrics: BTreeMap<String, f64>,
    },
    Evaluate {
        round: u32,
    },
    Evaluation {
        round: u32,
        #[serde(default)]
        metrics: BTreeMap<String, f64>,
    },
    Finish {
        round: u32,
    },
    Reject {
        reason: String,
        retryable: bool,
    },
}

impl Message {
    /// The message kind, as named in the protocol.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Join { .. } => "join",
            Message::Train { .. } => "train",
            Message::Update { .. } => "update",
            Message::Evaluate { .. } => "evaluate",
            Message::Evaluation { .. } => "evaluation",
            Message::Finish { .. } => "finish",
            Message::Reject { .. } => "reject",
        }
    }

    /// Encodes the message as one frame: `SDNF`, version, 3 reserved bytes, u32 header
    /// length, u64 payload length (little-endian), a JSON header, then the weights (if any)
    /// in `encoding`.
    pub fn encode(&self, encoding: Encoding) -> Result<Vec<u8>, FlError> {
        let (header, weights) = match self.clone() {
            Message::Join {
                job,
                worker,
                num_samples,
                encodings,
            } => (
                Header::Join {
                    job,
                    worker,
                    num_samples,
                    encodings: encodings.iter().map(|e| e.name().to_string()).collect(),
                },
                None,
            ),
            Message::Train {
                round,
                weights,
                settings,
            } => (Header::Train { round, settings }, Some(weights)),
            Message::Update {
                round,
                num_samples,
                metrics,
                weights,
            } => (
                Header::Update {
                    round,
                    num_samples,
                    metrics,
                },
                Some(weights),
            ),
            Message::Evaluate { round, weights } => (Header::Evaluate { round }, Some(weights)),
            Message::Evaluation { round, metrics } => (Header::Evaluation { round, metrics }, None),
            Message::Finish { round, weights } => (Header::Finish { round }, Some(weights)),
            Message::Reject { reason, retryable } => (Header::Reject { reason, retryable }, None),
        };
        let header = serde_json::to_vec(&header).map_err(|e| FlError::Frame(e.to_string()))?;
        if header.len() > MAX_HEADER_BYTES {
            return Err(FlError::Frame(format!(
                "header of {} bytes exceeds {MAX_HEADER_BYTES}",
                header.len()
            )));
        }
        let payload = match weights {
            Some(w) => w.encode(encoding)?,
            None => Vec::new(),
        };
        let mut frame = Vec::with_capacity(PREFIX_BYTES + header.len() + payload.len());
        frame.extend_from_slice(MAGIC);
        frame.push(VERSION);
        frame.extend_from_slice(&[0, 0, 0]);
        frame.extend_from_slice(&(header.len() as u32).to_le_bytes());
        frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(&payload);
        Ok(frame)
    }

    /// Decodes one frame, checking every length (and the weights against `limits`).
    pub fn decode(frame: &[u8], limits: &Limits) -> Result<Message, FlError> {
        if frame.len() < PREFIX_BYTES {
            return Err(FlError::Frame(format!(
                "{} bytes is shorter than the {PREFIX_BYTES}-byte prefix",
                frame.len()
            )));
        }
        if &frame[..4] != MAGIC {
            return Err(FlError::Frame("does not start with SDNF".into()));
        }
        if frame[4] != VERSION {
            return Err(FlError::Frame(format!(
                "version {} (this library reads {VERSION})",
                frame[4]
            )));
        }
        let header_len = u32::from_le_bytes([frame[8], frame[9], frame[10], frame[11]]) as usize;
        let mut payload_len_bytes = [0u8; 8];
        payload_len_bytes.copy_from_slice(&frame[12..20]);
        let payload_len = u64::from_le_bytes(payload_len_bytes);
        if header_len > MAX_HEADER_BYTES {
            return Err(FlError::Frame(format!(
                "header of {header_len} bytes exceeds {MAX_HEADER_BYTES}"
            )));
        }
        let expected = (PREFIX_BYTES as u64)
            .saturating_add(header_len as u64)
            .saturating_add(payload_len);
        if expected != frame.len() as u64 {
            return Err(FlError::Frame(format!(
                "lengths say {expected} bytes, the frame has {}",
                frame.len()
            )));
        }
        let header: Header =
            serde_json::from_slice(&frame[PREFIX_BYTES..PREFIX_BYTES + header_len])
                .map_err(|e| FlError::Frame(format!("header: {e}")))?;
        let payload = &frame[PREFIX_BYTES + header_len..];
        let weights = |kind: &str| -> Result<Weights, FlError> {
            if payload.is_empty() {
                return Err(FlError::Frame(format!("{kind} carries no weights")));
            }
            Ok(Weights::decode(payload, limits)?)
        };
        let no_payload = |kind: &str| -> Result<(), FlError> {
            if payload.is_empty() {
                Ok(())
            } else {
                Err(FlError::Frame(format!("{kind} must not carry weights")))
            }
        };
        Ok(match header {
            Header::Join {
                job,
                worker,
                num_samples,
                encodings,
            } => {
                no_payload("join")?;
                Message::Join {
                    job,
                    worker,
                    num_samples,
                    encodings: encodings
                        .iter()
                        .map(|e| Encoding::parse(e))
                        .collect::<Result<_, _>>()?,
                }
            }
            Header::Train { round, settings } => Message::Train {
                round,
                weights: weights("train")?,
                settings,
            },
            Header::Update {
                round,
                num_samples,
                metrics,
            } => Message::Update {
                round,
                num_samples,
                metrics,
                weights: weights("update")?,
            },
            Header::Evaluate { round } => Message::Evaluate {
                round,
                weights: weights("evaluate")?,
            },
            Header::Evaluation { round, metrics } => {
                no_payload("evaluation")?;
                Message::Evaluation { round, metrics }
            }
            Header::Finish { round } => Message::Finish {
                round,
                weights: weights("finish")?,
            },
            Header::Reject { reason, retryable } => {
                no_payload("reject")?;
                Message::Reject { reason, retryable }
            }
        })
    }
}

/// Where a client stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientState {
    /// Created; [`FederatedLearning::join`] not called yet.
    New,
    /// Joined; waiting for a round.
    Waiting {
        /// The last round answered (0 before the first).
        last_round: u32,
    },
    /// The job finished after this round; the estimator holds the final weights.
    Finished {
        /// The last round.
        round: u32,
    },
    /// The aggregator rejected the client.
    Rejected {
        /// Why.
        reason: String,
    },
}

impl ClientState {
    fn name(&self) -> &'static str {
        match self {
            ClientState::New => "not joined",
            ClientState::Waiting { .. } => "waiting for a round",
            ClientState::Finished { .. } => "finished",
            ClientState::Rejected { .. } => "rejected",
        }
    }
}

/// A federated-learning client around an [`Estimator`].
#[derive(Debug)]
pub struct FederatedLearning<E> {
    job: String,
    worker: String,
    estimator: E,
    encoding: Encoding,
    state: ClientState,
    last_update: Option<Message>,
    history: Vec<(u32, BTreeMap<String, f64>)>,
}

impl<E: Estimator> FederatedLearning<E> {
    /// A client of `job` named `worker`, sending its weights in `encoding`.
    pub fn new(job: &str, worker: &str, estimator: E, encoding: Encoding) -> Self {
        FederatedLearning {
            job: job.into(),
            worker: worker.into(),
            estimator,
            encoding,
            state: ClientState::New,
            last_update: None,
            history: Vec::new(),
        }
    }

    /// The estimator (holding the final weights once finished).
    pub fn estimator(&self) -> &E {
        &self.estimator
    }

    /// The estimator, mutably.
    pub fn estimator_mut(&mut self) -> &mut E {
        &mut self.estimator
    }

    /// Gives the estimator back.
    pub fn into_estimator(self) -> E {
        self.estimator
    }

    /// Where the client stands.
    pub fn state(&self) -> &ClientState {
        &self.state
    }

    /// The encoding the client sends its weights in.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Training metrics per round answered.
    pub fn history(&self) -> &[(u32, BTreeMap<String, f64>)] {
        &self.history
    }

    /// The message that joins the job (also the one to send again after reconnecting, or
    /// after a retryable rejection: the client waits again, its last answer kept).
    pub fn join(&mut self) -> Message {
        if matches!(self.state, ClientState::New | ClientState::Rejected { .. }) {
            let last_round = match &self.last_update {
                Some(Message::Update { round, .. }) => *round,
                _ => 0,
            };
            self.state = ClientState::Waiting { last_round };
        }
        let mut encodings = vec![self.encoding];
        encodings.extend(
            [Encoding::F32, Encoding::F16, Encoding::Int8]
                .into_iter()
                .filter(|e| *e != self.encoding),
        );
        Message::Join {
            job: self.job.clone(),
            worker: self.worker.clone(),
            num_samples: self.estimator.num_samples(),
            encodings,
        }
    }

    /// Handles one server message; returns the reply to send, if any.
    pub fn handle(&mut self, message: Message) -> Result<Option<Message>, FlError> {
        let last_round = match &self.state {
            ClientState::Waiting { last_round } => *last_round,
            state => {
                return Err(FlError::Unexpected {
                    message: message.kind(),
                    state: state.name(),
                });
            }
        };
        match message {
            Message::Train {
                round,
                weights,
                settings,
            } => {
                if round < last_round {
                    tracing::debug!(round, last_round, "stale train message ignored");
                    return Ok(None);
                }
                if round == last_round && round > 0 {
                    // Our update was lost: send it again rather than training twice.
                    return Ok(self.last_update.clone());
                }
                let estimator_error = |source| FlError::Estimator { round, source };
                self.estimator
                    .set_weights(&weights)
                    .map_err(estimator_error)?;
                let report = self.estimator.train(&settings).map_err(estimator_error)?;
                let update = Message::Update {
                    round,
                    num_samples: report.num_samples,
                    metrics: report.metrics.clone(),
                    weights: self.estimator.get_weights(),
                };
                self.history.push((round, report.metrics));
                self.state = ClientState::Waiting { last_round: round };
                self.last_update = Some(update.clone());
                Ok(Some(update))
            }
            Message::Evaluate { round, weights } => {
                let estimator_error = |source| FlError::Estimator { round, source };
                // Evaluate the given weights, then restore ours.
                let own = self.estimator.get_weights();
                self.estimator
                    .set_weights(&weights)
                    .map_err(estimator_error)?;
                let metrics = self.estimator.evaluate();
                self.estimator.set_weights(&own).map_err(estimator_error)?;
                Ok(Some(Message::Evaluation {
                    round,
                    metrics: metrics.map_err(estimator_error)?,
                }))
            }
            Message::Finish { round, weights } => {
                self.estimator
                    .set_weights(&weights)
                    .map_err(|source| FlError::Estimator { round, source })?;
                self.state = ClientState::Finished { round };
                Ok(None)
            }
            Message::Reject { reason, retryable } => {
                self.state = ClientState::Rejected {
                    reason: reason.clone(),
                };
                Err(FlError::Rejected { reason, retryable })
            }
            other => Err(FlError::Unexpected {
                message: other.kind(),
                state: "a client (it is a client-to-server message)",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn weights(v: f32) -> Weights {
        Weights::new(vec![
            ("a".into(), ArrayD::from_elem(IxDyn(&[2, 2]), v)),
            ("b".into(), ArrayD::from_elem(IxDyn(&[3]), -v)),
        ])
        .unwrap()
    }

    #[derive(Debug)]
    struct Counter {
        w: Weights,
        trained: u32,
        fail: bool,
    }

    impl Estimator for Counter {
        fn get_weights(&self) -> Weights {
            self.w.clone()
        }
        fn set_weights(&mut self, weights: &Weights) -> Result<(), EstimatorError> {
            self.w
                .check_same_layout(weights)
                .map_err(EstimatorError::new)?;
            self.w = weights.clone();
            Ok(())
        }
        fn train(&mut self, s: &BTreeMap<String, String>) -> Result<TrainReport, EstimatorError> {
            if self.fail {
                return Err(EstimatorError::new("out of memory"));
            }
            self.trained += 1;
            let step: f32 = s
                .get("step")
                .map_or(Ok(1.0), |v| v.parse())
                .map_err(|_| EstimatorError::new("bad step"))?;
            for a in self.w.arrays_mut() {
                a.mapv_inplace(|x| x + step);
            }
            Ok(TrainReport {
                num_samples: 10,
                metrics: BTreeMap::from([("loss".into(), 0.5)]),
            })
        }
        fn evaluate(&mut self) -> Result<BTreeMap<String, f64>, EstimatorError> {
            Ok(BTreeMap::from([(
                "mean".into(),
                self.w.tensors()[0].1.mean().unwrap_or(0.0) as f64,
            )]))
        }
        fn num_samples(&self) -> u64 {
            10
        }
    }

    fn client() -> FederatedLearning<Counter> {
        FederatedLearning::new(
            "job",
            "w0",
            Counter {
                w: weights(0.0),
                trained: 0,
                fail: false,
            },
            Encoding::F16,
        )
    }

    #[test]
    fn every_message_round_trips_through_a_frame() {
        let messages = vec![
            Message::Join {
                job: "j".into(),
                worker: "w".into(),
                num_samples: 7,
                encodings: vec![Encoding::Int8, Encoding::F32],
            },
            Message::Train {
                round: 3,
                weights: weights(0.5),
                settings: BTreeMap::from([("epochs".into(), "2".into())]),
            },
            Message::Update {
                round: 3,
                num_samples: 12,
                metrics: BTreeMap::from([("loss".into(), 0.25)]),
                weights: weights(1.5),
            },
            Message::Evaluate {
                round: 3,
                weights: weights(2.0),
            },
            Message::Evaluation {
                round: 3,
                metrics: BTreeMap::from([("accuracy".into(), 0.75)]),
            },
            Message::Finish {
                round: 9,
                weights: weights(4.0),
            },
            Message::Reject {
                reason: "job is full".into(),
                retryable: false,
            },
        ];
        for message in messages {
            let frame = message.encode(Encoding::F16).unwrap();
            assert_eq!(
                Message::decode(&frame, &Limits::default()).unwrap(),
                message
            );
        }
    }

    #[test]
    fn malformed_frames_are_refused_with_the_reason() {
        let good = Message::Train {
            round: 1,
            weights: weights(1.0),
            settings: BTreeMap::new(),
        }
        .encode(Encoding::F32)
        .unwrap();
        let limits = Limits::default();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "shorter than"),
            ([b"XXXX".as_slice(), &good[4..]].concat(), "SDNF"),
            (good[..good.len() - 1].to_vec(), "lengths say"),
            (
                {
                    let mut f = good.clone();
                    f[4] = 9;
                    f
                },
                "version 9",
            ),
            (
                {
                    let mut f = good.clone();
                    f[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
                    f
                },
                "exceeds",
            ),
            (
                {
                    // A reject frame carrying weights.
                    let mut f = Message::Reject {
                        reason: "x".into(),
                        retryable: true,
                    }
                    .encode(Encoding::F32)
                    .unwrap();
                    let payload = weights(1.0).encode(Encoding::F32).unwrap();
                    f[12..20].copy_from_slice(&(payload.len() as u64).to_le_bytes());
                    f.extend_from_slice(&payload);
                    f
                },
                "reject must not carry weights",
            ),
        ];
        for (frame, needle) in cases {
            let err = Message::decode(&frame, &limits).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let tiny = Limits {
            max_values: 4,
            ..Limits::default()
        };
        let err = Message::decode(&good, &tiny).unwrap_err().to_string();
        assert!(err.contains("limit"), "{err}");
    }

    #[test]
    fn a_round_trains_once_and_a_repeated_round_resends_the_same_update() {
        let mut c = client();
        assert!(
            matches!(c.join(), Message::Join { num_samples: 10, ref encodings, .. } if encodings[0] == Encoding::F16)
        );
        let train = Message::Train {
            round: 1,
            weights: weights(2.0),
            settings: BTreeMap::from([("step".into(), "0.5".into())]),
        };
        let first = c.handle(train.clone()).unwrap().unwrap();
        let Message::Update {
            round: 1,
            num_samples: 10,
            weights: ref trained,
            ..
        } = first
        else {
            panic!("{first:?}")
        };
        assert_eq!(trained.get("a").unwrap()[[0, 0]], 2.5);
        let again = c.handle(train).unwrap().unwrap();
        assert_eq!(again, first);
        assert_eq!(c.estimator().trained, 1);
        // A stale round is ignored.
        let stale = Message::Train {
            round: 0,
            weights: weights(9.0),
            settings: BTreeMap::new(),
        };
        assert!(c.handle(stale).unwrap().is_none());
        assert_eq!(c.state(), &ClientState::Waiting { last_round: 1 });
        assert_eq!(c.history().len(), 1);
    }

    #[test]
    fn evaluation_leaves_the_local_weights_and_finish_installs_the_final_ones() {
        let mut c = client();
        c.join();
        let reply = c
            .handle(Message::Evaluate {
                round: 1,
                weights: weights(3.0),
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            reply,
            Message::Evaluation {
                round: 1,
                metrics: BTreeMap::from([("mean".into(), 3.0)])
            }
        );
        assert_eq!(c.estimator().w, weights(0.0));
        assert!(
            c.handle(Message::Finish {
                round: 5,
                weights: weights(7.0)
            })
            .unwrap()
            .is_none()
        );
        assert_eq!(c.state(), &ClientState::Finished { round: 5 });
        assert_eq!(c.estimator().w, weights(7.0));
        let err = c
            .handle(Message::Train {
                round: 6,
                weights: weights(1.0),
                settings: BTreeMap::new(),
            })
            .unwrap_err();
        assert!(
            err.to_string().contains("unexpected train while finished"),
            "{err}"
        );
    }

    #[test]
    fn estimator_failures_and_rejections_are_reported_with_retryability() {
        let mut c = client();
        c.join();
        c.estimator_mut().fail = true;
        let err = c
            .handle(Message::Train {
                round: 1,
                weights: weights(1.0),
                settings: BTreeMap::new(),
            })
            .unwrap_err();
        assert!(err.is_retryable());
        assert!(err.to_string().contains("round 1: out of memory"), "{err}");
        // Wrong layout from the server.
        c.estimator_mut().fail = false;
        let other = Weights::new(vec![("z".into(), ArrayD::zeros(IxDyn(&[1])))]).unwrap();
        let err = c
            .handle(Message::Train {
                round: 1,
                weights: other,
                settings: BTreeMap::new(),
            })
            .unwrap_err();
        assert!(matches!(err, FlError::Estimator { round: 1, .. }), "{err}");
        let err = c
            .handle(Message::Reject {
                reason: "unknown job".into(),
                retryable: false,
            })
            .unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(
            c.state(),
            &ClientState::Rejected {
                reason: "unknown job".into()
            }
        );
        let mut fresh = client();
        let err = fresh
            .handle(Message::Finish {
                round: 1,
                weights: weights(1.0),
            })
            .unwrap_err();
        assert!(err.to_string().contains("not joined"), "{err}");
    }
}
