//! Joint inference: a small edge model answers every input; hard examples (as a
//! [`crate::hem`] algorithm judges them) also go to a big cloud model, whose answer wins.
//!
//! [`JointInference::inference`] returns a [`JointResult`]: whether the input was hard, the
//! final result, the edge result and the cloud result. When the cloud cannot be reached the
//! edge result is final and the hard example is written to a bounded on-disk
//! [`HardExampleQueue`]; [`JointInference::resend`] sends queued examples later (oldest
//! first) and hands back their cloud results. If the queue is full the example is refused
//! and counted ([`Stats::refused`]), never dropped silently.
//!
//! The cloud is anything that implements [`Cloud`]; [`HttpCloud`] speaks Sedna's
//! `POST /sedna/predict` with tensors in the binary [`encode_tensors`] format.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use sedna::hem;
//! use sedna::inference::{Model, SessionOptions, Tensor};
//! use sedna::joint::{HardExampleQueue, HttpCloud, JointInference, QueueLimits};
//!
//! let edge = Arc::new(Model::load("models/digits/model.onnx", &SessionOptions::default())?);
//! let mining = hem::registry().build("Threshold", &[("threshold", "0.9")])?;
//! let cloud = HttpCloud::new("http://10.0.0.7:5000", std::time::Duration::from_secs(2))?;
//! let queue = HardExampleQueue::open("/var/lib/sedna/hard-examples", QueueLimits::default())?;
//! let ji = JointInference::new(edge, mining, Box::new(cloud), queue);
//! let pixels = ndarray::Array2::<f32>::zeros((1, 64)).into_dyn();
//! let result = ji.inference("frame-1", &[("input".into(), Tensor::F32(pixels))]).await?;
//! println!("hard: {}, answer from the {}", result.is_hard, if result.cloud.is_some() { "cloud" } else { "edge" });
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ndarray::{ArrayD, IxDyn};

use crate::hem::{HardExampleMining, Input};
use crate::inference::{InferenceError, Model, Outputs, Tensor, TensorView};

const MAGIC: &[u8; 4] = b"SDNT";
const VERSION: u8 = 1;

/// Errors of joint inference.
#[derive(Debug, thiserror::Error)]
pub enum JointError {
    /// The edge model failed (bad input or model). Not retryable.
    #[error("edge model: {0}")]
    Edge(#[from] InferenceError),
    /// A tensor message is malformed or exceeds a limit. Not retryable.
    #[error("tensor message: {0}")]
    Frame(String),
    /// The cloud could not be reached or failed. Retryable.
    #[error("cloud: {0}")]
    Cloud(String),
    /// The cloud refused the request (bad input for its model). Not retryable.
    #[error("cloud refused the request: {0}")]
    CloudRefused(String),
    /// The on-disk queue failed. Retryable once the disk is fixed.
    #[error("hard-example queue {path}: {source}")]
    Queue {
        /// File or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Bad configuration. Not retryable.
    #[error("joint inference configuration: {0}")]
    Config(String),
}

impl JointError {
    /// Whether trying again unchanged can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, JointError::Cloud(_) | JointError::Queue { .. })
    }
}

type Result<T, E = JointError> = std::result::Result<T, E>;

// ----- tensor frames -------------------------------------------------------------------------

/// Bounds on decoded tensor messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Most tensors.
    pub max_tensors: usize,
    /// Most bytes of tensor data in total.
    pub max_bytes: usize,
    /// Highest rank.
    pub max_rank: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            max_tensors: 64,
            max_bytes: 64 << 20,
            max_rank: 8,
        }
    }
}

fn dtype_tag(t: &Tensor) -> u8 {
    match t {
        Tensor::F32(_) => 1,
        Tensor::F64(_) => 2,
        Tensor::I64(_) => 3,
        Tensor::I32(_) => 4,
        Tensor::U8(_) => 5,
    }
}

/// Encodes named tensors: `SDNT`, version, u32 count; per tensor u16 name length, name, u8
/// type (1 f32, 2 f64, 3 i64, 4 i32, 5 u8), u8 rank, u64 dimensions, values little-endian.
pub fn encode_tensors(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    for (name, tensor) in tensors {
        let name_len = u16::try_from(name.len())
            .map_err(|_| JointError::Frame(format!("tensor name of {} bytes", name.len())))?;
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(dtype_tag(tensor));
        let shape = tensor.shape();
        out.push(
            u8::try_from(shape.len())
                .map_err(|_| JointError::Frame(format!("{name}: rank {}", shape.len())))?,
        );
        for d in shape {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        macro_rules! put {
            ($a:expr) => {
                for v in $a.iter() {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            };
        }
        match tensor {
            Tensor::F32(a) => put!(a),
            Tensor::F64(a) => put!(a),
            Tensor::I64(a) => put!(a),
            Tensor::I32(a) => put!(a),
            Tensor::U8(a) => out.extend(a.iter().copied()),
        }
    }
    Ok(out)
}

/// Decodes [`encode_tensors`]' format, checking every length against `limits` first.
pub fn decode_tensors(bytes: &[u8], limits: &FrameLimits) -> Result<Vec<(String, Tensor)>> {
    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8]> {
            let end = self
                .at
                .checked_add(n)
                .filter(|end| *end <= self.bytes.len())
                .ok_or_else(|| JointError::Frame(format!("truncated at byte {}", self.at)))?;
            let slice = &self.bytes[self.at..end];
            self.at = end;
            Ok(slice)
        }
        fn u8(&mut self) -> Result<u8> {
            Ok(self.take(1)?[0])
        }
        fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
            let mut a = [0u8; N];
            a.copy_from_slice(self.take(N)?);
            Ok(a)
        }
    }
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != MAGIC {
        return Err(JointError::Frame("does not start with SDNT".into()));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(JointError::Frame(format!("version {version}")));
    }
    let count = u32::from_le_bytes(r.array()?) as usize;
    if count > limits.max_tensors {
        return Err(JointError::Frame(format!(
            "{count} tensors, more than {}",
            limits.max_tensors
        )));
    }
    let mut total = 0usize;
    let mut tensors = Vec::with_capacity(count);
    for _ in 0..count {
        let name_len = u16::from_le_bytes(r.array()?) as usize;
        let name = std::str::from_utf8(r.take(name_len)?)
            .map_err(|_| JointError::Frame("tensor name is not UTF-8".into()))?
            .to_string();
        let tag = r.u8()?;
        let rank = r.u8()? as usize;
        if rank > limits.max_rank {
            return Err(JointError::Frame(format!("{name}: rank {rank}")));
        }
        let mut shape = Vec::with_capacity(rank);
        let mut elements = 1usize;
        for _ in 0..rank {
            let d = usize::try_from(u64::from_le_bytes(r.array()?))
                .map_err(|_| JointError::Frame(format!("{name}: dimension too large")))?;
            elements = elements
                .checked_mul(d)
                .ok_or_else(|| JointError::Frame(format!("{name}: shape overflows")))?;
            shape.push(d);
        }
        let width = match tag {
            1 | 4 => 4,
            2 | 3 => 8,
            5 => 1,
            other => return Err(JointError::Frame(format!("{name}: unknown type {other}"))),
        };
        let nbytes = elements
            .checked_mul(width)
            .ok_or_else(|| JointError::Frame(format!("{name}: shape overflows")))?;
        total = total.saturating_add(nbytes);
        if total > limits.max_bytes {
            return Err(JointError::Frame(format!(
                "more than {} bytes of tensor data",
                limits.max_bytes
            )));
        }
        let data = r.take(nbytes)?;
        let shape = IxDyn(&shape);
        let shape_error = |e: ndarray::ShapeError| JointError::Frame(format!("{name}: {e}"));
        macro_rules! get {
            ($ty:ty, $n:literal) => {
                ArrayD::from_shape_vec(
                    shape,
                    data.chunks_exact($n)
                        .map(|c| {
                            let mut a = [0u8; $n];
                            a.copy_from_slice(c);
                            <$ty>::from_le_bytes(a)
                        })
                        .collect(),
                )
                .map_err(shape_error)?
            };
        }
        let tensor = match tag {
            1 => Tensor::F32(get!(f32, 4)),
            2 => Tensor::F64(get!(f64, 8)),
            3 => Tensor::I64(get!(i64, 8)),
            4 => Tensor::I32(get!(i32, 4)),
            _ => Tensor::U8(ArrayD::from_shape_vec(shape, data.to_vec()).map_err(shape_error)?),
        };
        tensors.push((name, tensor));
    }
    if r.at != bytes.len() {
        return Err(JointError::Frame(format!(
            "{} bytes after the last tensor",
            bytes.len() - r.at
        )));
    }
    Ok(tensors)
}

// ----- the cloud -----------------------------------------------------------------------------

/// A cloud model endpoint.
pub trait Cloud: Send + Sync + std::fmt::Debug {
    /// Runs the cloud model on `inputs`; returns its outputs and the bytes sent and received.
    fn infer<'a>(
        &'a self,
        inputs: &'a [(String, Tensor)],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<CloudReply>> + Send + 'a>>;
}

/// The cloud's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudReply {
    /// Output tensors.
    pub outputs: Vec<(String, Tensor)>,
    /// The cloud model's version, if it says.
    pub model_version: Option<String>,
    /// Request bytes sent.
    pub bytes_sent: u64,
    /// Response bytes received.
    pub bytes_received: u64,
}

/// The content type of [`encode_tensors`] bodies.
pub const TENSORS_CONTENT_TYPE: &str = "application/x-sedna-tensors";
/// The header carrying the cloud model's version.
pub const MODEL_VERSION_HEADER: &str = "x-sedna-model-version";

/// A cloud reached over HTTP: `POST {base}/sedna/predict` with an [`encode_tensors`] body.
#[derive(Debug, Clone)]
pub struct HttpCloud {
    client: reqwest::Client,
    url: String,
    limits: FrameLimits,
}

impl HttpCloud {
    /// A client of the cloud at `base` (e.g. `http://10.0.0.7:5000`), giving up on a request
    /// after `timeout`.
    pub fn new(base: &str, timeout: Duration) -> Result<HttpCloud> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(JointError::Config(format!(
                "cloud endpoint {base:?} must start with http:// or https://"
            )));
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| JointError::Config(e.to_string()))?;
        Ok(HttpCloud {
            client,
            url: format!("{}/sedna/predict", base.trim_end_matches('/')),
            limits: FrameLimits::default(),
        })
    }
}

impl Cloud for HttpCloud {
    fn infer<'a>(
        &'a self,
        inputs: &'a [(String, Tensor)],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<CloudReply>> + Send + 'a>> {
        Box::pin(async move {
            let body = encode_tensors(inputs)?;
            let bytes_sent = body.len() as u64;
            let response = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, TENSORS_CONTENT_TYPE)
                .body(body)
                .send()
                .await
                .map_err(|e| JointError::Cloud(format!("{}: {e}", self.url)))?;
            let status = response.status();
            let model_version = response
                .headers()
                .get(MODEL_VERSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = response
                .bytes()
                .await
                .map_err(|e| JointError::Cloud(format!("{}: {e}", self.url)))?;
            if status.is_client_error() {
                return Err(JointError::CloudRefused(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(512)])
                )));
            }
            if !status.is_success() {
                return Err(JointError::Cloud(format!("{}: {status}", self.url)));
            }
            Ok(CloudReply {
                outputs: decode_tensors(&bytes, &self.limits)?,
                model_version,
                bytes_sent,
                bytes_received: bytes.len() as u64,
            })
        })
    }
}

// ----- the queue -----------------------------------------------------------------------------

/// Bounds of the on-disk queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most queued examples.
    pub max_items: usize,
    /// Most bytes queued.
    pub max_bytes: u64,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_items: 10_000,
            max_bytes: 1 << 30,
        }
    }
}

/// A queued hard example.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedExample {
    /// Its position (increasing).
    pub seq: u64,
    /// The caller's id for the input.
    pub id: String,
    /// The inputs.
    pub inputs: Vec<(String, Tensor)>,
}

/// Hard examples waiting for the cloud: one file per example in a directory, written
/// atomically (temporary file, fsync, rename), oldest first, bounded in count and bytes.
#[derive(Debug)]
pub struct HardExampleQueue {
    dir: PathBuf,
    limits: QueueLimits,
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    items: std::collections::BTreeMap<u64, u64>,
    bytes: u64,
    next: u64,
}

impl HardExampleQueue {
    /// Opens (or creates) the queue in `dir`, finding what an earlier process left.
    pub fn open(dir: impl AsRef<Path>, limits: QueueLimits) -> Result<HardExampleQueue> {
        let dir = dir.as_ref().to_path_buf();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JointError::Queue { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut state = QueueState::default();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".hex")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let len = entry.metadata().map_err(io(&entry.path()))?.len();
            state.items.insert(seq, len);
            state.bytes += len;
            state.next = state.next.max(seq + 1);
        }
        Ok(HardExampleQueue {
            dir,
            limits,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.hex"))
    }

    /// Number of queued examples.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes queued.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Queues an example; `Ok(None)` when the queue is full (the caller counts the refusal).
    pub fn push(&self, id: &str, inputs: &[(String, Tensor)]) -> Result<Option<u64>> {
        let mut record = Vec::new();
        let id_len = u16::try_from(id.len())
            .map_err(|_| JointError::Frame(format!("id of {} bytes", id.len())))?;
        record.extend_from_slice(&id_len.to_le_bytes());
        record.extend_from_slice(id.as_bytes());
        record.extend_from_slice(&encode_tensors(inputs)?);
        let len = record.len() as u64;
        let mut state = self.lock();
        if state.items.len() >= self.limits.max_items
            || state.bytes.saturating_add(len) > self.limits.max_bytes
        {
            return Ok(None);
        }
        let seq = state.next;
        let path = self.path(seq);
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&record)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| JointError::Queue {
            path: path.clone(),
            source,
        })?;
        state.next += 1;
        state.items.insert(seq, len);
        state.bytes += len;
        Ok(Some(seq))
    }

    /// The oldest queued example, if any (it stays queued until [`HardExampleQueue::remove`]).
    pub fn oldest(&self) -> Result<Option<QueuedExample>> {
        let Some(seq) = self.lock().items.keys().next().copied() else {
            return Ok(None);
        };
        let path = self.path(seq);
        let bytes = std::fs::read(&path).map_err(|source| JointError::Queue {
            path: path.clone(),
            source,
        })?;
        let corrupt = |reason: String| JointError::Frame(format!("{}: {reason}", path.display()));
        if bytes.len() < 2 {
            return Err(corrupt("truncated".into()));
        }
        let id_len = u16::from_le_bytes([bytes[0], bytes[1]]) as usize;
        let id = bytes
            .get(2..2 + id_len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .ok_or_else(|| corrupt("bad id".into()))?
            .to_string();
        let inputs = decode_tensors(
            &bytes[2 + id_len..],
            &FrameLimits {
                max_bytes: usize::MAX,
                ..FrameLimits::default()
            },
        )?;
        Ok(Some(QueuedExample { seq, id, inputs }))
    }

    /// Removes an example (after the cloud answered it, or to discard a corrupt one).
    pub fn remove(&self, seq: u64) -> Result<()> {
        let path = self.path(seq);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(JointError::Queue { path, source }),
        }
        let mut state = self.lock();
        if let Some(len) = state.items.remove(&seq) {
            state.bytes -= len;
        }
        Ok(())
    }
}

// ----- joint inference -----------------------------------------------------------------------

/// Counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Inputs answered.
    pub inferences: AtomicU64,
    /// Inputs judged hard.
    pub hard_examples: AtomicU64,
    /// Hard examples the cloud answered (at once or after a resend).
    pub cloud_answers: AtomicU64,
    /// Hard examples queued because the cloud was unreachable.
    pub queued: AtomicU64,
    /// Hard examples refused because the queue was full.
    pub refused: AtomicU64,
    /// Failed cloud calls.
    pub cloud_failures: AtomicU64,
    /// Bytes sent to the cloud.
    pub uplink_bytes: AtomicU64,
    /// Bytes received from the cloud.
    pub downlink_bytes: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct StatsSnapshot {
    /// Inputs answered.
    pub inferences: u64,
    /// Inputs judged hard.
    pub hard_examples: u64,
    /// Hard examples the cloud answered.
    pub cloud_answers: u64,
    /// Hard examples queued.
    pub queued: u64,
    /// Hard examples refused (queue full).
    pub refused: u64,
    /// Failed cloud calls.
    pub cloud_failures: u64,
    /// Bytes sent to the cloud.
    pub uplink_bytes: u64,
    /// Bytes received from the cloud.
    pub downlink_bytes: u64,
}

impl StatsSnapshot {
    /// Share of inputs judged hard (0 when there were none).
    pub fn upload_ratio(&self) -> f64 {
        if self.inferences == 0 {
            0.0
        } else {
            self.hard_examples as f64 / self.inferences as f64
        }
    }
}

impl Stats {
    /// A consistent-enough copy.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            inferences: get(&self.inferences),
            hard_examples: get(&self.hard_examples),
            cloud_answers: get(&self.cloud_answers),
            queued: get(&self.queued),
            refused: get(&self.refused),
            cloud_failures: get(&self.cloud_failures),
            uplink_bytes: get(&self.uplink_bytes),
            downlink_bytes: get(&self.downlink_bytes),
        }
    }
}

/// What happened to a hard example the cloud did not answer at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferred {
    /// Answered by the cloud (or not hard): nothing deferred.
    No,
    /// Queued on disk at this position; [`JointInference::resend`] will send it.
    Queued(u64),
    /// The queue was full: refused (counted in [`Stats::refused`]).
    Refused,
}

/// The answer to one input.
#[derive(Debug, Clone, PartialEq)]
pub struct JointResult {
    /// The caller's id.
    pub id: String,
    /// Whether the input was judged hard.
    pub is_hard: bool,
    /// The edge model's result.
    pub edge: Outputs,
    /// The cloud model's result, when it answered.
    pub cloud: Option<CloudReply>,
    /// What happened to a hard example the cloud did not answer.
    pub deferred: Deferred,
}

impl JointResult {
    /// The final result: the cloud's when it answered, else the edge's.
    pub fn result(&self) -> &[(String, Tensor)] {
        match &self.cloud {
            Some(reply) => &reply.outputs,
            None => &self.edge.values,
        }
    }

    /// Consumes the result, giving the final outputs.
    pub fn into_result(self) -> Vec<(String, Tensor)> {
        match self.cloud {
            Some(reply) => reply.outputs,
            None => self.edge.values,
        }
    }
}

/// A cloud answer to a hard example that had been queued.
#[derive(Debug, Clone, PartialEq)]
pub struct LateAnswer {
    /// The caller's id of the input.
    pub id: String,
    /// The cloud's reply.
    pub cloud: CloudReply,
}

/// Which edge output the mining algorithm reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HemSource {
    /// The named output: `[1, classes]` or `[classes]` is read as probabilities,
    /// `[boxes, ≥5]` (or `[1, boxes, ≥5]`) as detections.
    Output(String),
    /// Nothing (for Random, CloudOnly, EdgeOnly).
    Opaque,
}

/// Joint inference: edge model + hard-example mining + cloud + queue.
#[derive(Debug)]
pub struct JointInference {
    edge: Arc<Model>,
    hem: Box<dyn HardExampleMining>,
    cloud: Box<dyn Cloud>,
    queue: HardExampleQueue,
    source: HemSource,
    stats: Stats,
    resend_lock: tokio::sync::Mutex<()>,
}

impl JointInference {
    /// Joint inference reading the edge output `probabilities` if the model has one, else its
    /// first float output (change with [`JointInference::with_hem_source`]).
    pub fn new(
        edge: Arc<Model>,
        hem: Box<dyn HardExampleMining>,
        cloud: Box<dyn Cloud>,
        queue: HardExampleQueue,
    ) -> JointInference {
        let outputs = edge.outputs();
        let source = outputs
            .iter()
            .find(|o| o.name == "probabilities")
            .or_else(|| {
                outputs
                    .iter()
                    .find(|o| o.dtype == crate::inference::DType::F32)
            })
            .map_or(HemSource::Opaque, |o| HemSource::Output(o.name.clone()));
        JointInference {
            edge,
            hem,
            cloud,
            queue,
            source,
            stats: Stats::default(),
            resend_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Chooses what the mining algorithm reads.
    pub fn with_hem_source(mut self, source: HemSource) -> Result<JointInference> {
        if let HemSource::Output(name) = &source
            && !self.edge.outputs().iter().any(|o| &o.name == name)
        {
            return Err(JointError::Config(format!(
                "the edge model has no output {name:?}"
            )));
        }
        self.source = source;
        Ok(self)
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Hard examples waiting for the cloud.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The mining algorithm.
    pub fn hem(&self) -> &dyn HardExampleMining {
        self.hem.as_ref()
    }

    /// Answers one input (a batch of one sample).
    pub async fn inference(&self, id: &str, inputs: &[(String, Tensor)]) -> Result<JointResult> {
        let views: Vec<(&str, TensorView<'_>)> = inputs
            .iter()
            .map(|(name, tensor)| (name.as_str(), tensor.view()))
            .collect();
        let edge = self.edge.run(&views)?;
        self.stats.inferences.fetch_add(1, Ordering::Relaxed);
        let is_hard = self.judge(&edge)?;
        if !is_hard {
            return Ok(JointResult {
                id: id.into(),
                is_hard,
                edge,
                cloud: None,
                deferred: Deferred::No,
            });
        }
        self.stats.hard_examples.fetch_add(1, Ordering::Relaxed);
        // Older queued examples go first when the cloud is back; a new one joins the queue
        // rather than overtaking them only if the queue is not empty.
        let reply = if self.queue.is_empty() {
            match self.call_cloud(inputs).await {
                Ok(reply) => Some(reply),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(id, error = %e, "cloud unreachable; hard example queued");
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let deferred = match &reply {
            Some(_) => Deferred::No,
            None => match self.queue.push(id, inputs)? {
                Some(seq) => {
                    self.stats.queued.fetch_add(1, Ordering::Relaxed);
                    Deferred::Queued(seq)
                }
                None => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        id,
                        queued = self.queue.len(),
                        "hard-example queue full; example refused"
                    );
                    Deferred::Refused
                }
            },
        };
        Ok(JointResult {
            id: id.into(),
            is_hard,
            edge,
            cloud: reply,
            deferred,
        })
    }

    async fn call_cloud(&self, inputs: &[(String, Tensor)]) -> Result<CloudReply> {
        match self.cloud.infer(inputs).await {
            Ok(reply) => {
                self.stats.cloud_answers.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .uplink_bytes
                    .fetch_add(reply.bytes_sent, Ordering::Relaxed);
                self.stats
                    .downlink_bytes
                    .fetch_add(reply.bytes_received, Ordering::Relaxed);
                Ok(reply)
            }
            Err(e) => {
                self.stats.cloud_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn judge(&self, edge: &Outputs) -> Result<bool> {
        let HemSource::Output(name) = &self.source else {
            return Ok(self.hem.is_hard(&Input::Opaque));
        };
        let values = edge.f32(name)?;
        let input = match values.shape() {
            [_] => Input::Probabilities(
                values
                    .into_dimensionality()
                    .map_err(|e| JointError::Config(e.to_string()))?,
            ),
            [1, _] => Input::Probabilities(
                values
                    .index_axis_move(ndarray::Axis(0), 0)
                    .into_dimensionality()
                    .map_err(|e| JointError::Config(e.to_string()))?,
            ),
            [_, cols] if *cols >= 5 => Input::Boxes(
                values
                    .into_dimensionality()
                    .map_err(|e| JointError::Config(e.to_string()))?,
            ),
            [1, _, cols] if *cols >= 5 => Input::Boxes(
                values
                    .index_axis_move(ndarray::Axis(0), 0)
                    .into_dimensionality()
                    .map_err(|e| JointError::Config(e.to_string()))?,
            ),
            other => {
                return Err(JointError::Config(format!(
                    "edge output {name} has shape {other:?}: give one sample per call ([1, classes] probabilities or [boxes, ≥5] detections)"
                )));
            }
        };
        Ok(self.hem.is_hard(&input))
    }

    /// Sends queued hard examples, oldest first, until the queue is empty or the cloud fails
    /// again; returns the answers obtained. A queued example the cloud refuses (bad input)
    /// is answered with the refusal and removed, so it cannot block the queue.
    pub async fn resend(&self) -> (Vec<LateAnswer>, Option<JointError>) {
        let _one_at_a_time = self.resend_lock.lock().await;
        let mut answers = Vec::new();
        loop {
            let example = match self.queue.oldest() {
                Ok(Some(example)) => example,
                Ok(None) => return (answers, None),
                Err(JointError::Frame(reason)) => {
                    tracing::error!(%reason, "corrupt queued hard example removed");
                    if let Some(seq) = self.queue.lock().items.keys().next().copied() {
                        let _ = self.queue.remove(seq);
                    }
                    continue;
                }
                Err(e) => return (answers, Some(e)),
            };
            match self.call_cloud(&example.inputs).await {
                Ok(cloud) => {
                    if let Err(e) = self.queue.remove(example.seq) {
                        return (answers, Some(e));
                    }
                    answers.push(LateAnswer {
                        id: example.id,
                        cloud,
                    });
                }
                Err(e) if e.is_retryable() => return (answers, Some(e)),
                Err(e) => {
                    tracing::error!(id = example.id, error = %e, "cloud refused a queued hard example; removed");
                    if let Err(e) = self.queue.remove(example.seq) {
                        return (answers, Some(e));
                    }
                }
            }
        }
    }
}

impl JointInference {
    /// Resends queued hard examples for as long as the returned future runs: right away when
    /// examples are queued, then after jittered exponential backoff while the cloud stays
    /// unreachable, checking an empty queue every `idle`. Each late answer goes to
    /// `on_answer`.
    pub async fn resend_forever(
        self: Arc<Self>,
        idle: Duration,
        backoff: Backoff,
        mut on_answer: impl FnMut(LateAnswer) + Send,
    ) {
        let mut backoff = backoff;
        loop {
            if self.queue.is_empty() {
                tokio::time::sleep(idle).await;
                continue;
            }
            let (answers, error) = self.resend().await;
            for answer in answers {
                on_answer(answer);
            }
            match error {
                None => backoff.reset(),
                Some(e) => {
                    let wait = backoff.next_wait();
                    tracing::debug!(error = %e, ?wait, queued = self.queue.len(), "resend paused");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// The largest request body [`serve_http`] accepts.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// Serves `model` as a cloud for [`HttpCloud`]: `POST /sedna/predict` with an
/// [`encode_tensors`] body, answered with the outputs in the same format and the model
/// version in [`MODEL_VERSION_HEADER`]. Bad input gets a 400 naming the problem. Runs until
/// `shutdown` completes; open connections are closed with it.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    model: Arc<Model>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use http_body_util::{BodyExt, Full, Limited};
    use hyper::{Request, Response, StatusCode};

    async fn handle(
        model: Arc<Model>,
        request: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<bytes::Bytes>>, std::convert::Infallible> {
        let reply = |status: StatusCode, body: Vec<u8>, version: Option<u64>| {
            let mut response = Response::new(Full::new(bytes::Bytes::from(body)));
            *response.status_mut() = status;
            let content_type = if status.is_success() {
                TENSORS_CONTENT_TYPE
            } else {
                "text/plain; charset=utf-8"
            };
            if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, value);
            }
            if let Some(version) = version
                && let Ok(value) = hyper::header::HeaderValue::from_str(&version.to_string())
            {
                response.headers_mut().insert(MODEL_VERSION_HEADER, value);
            }
            Ok(response)
        };
        if request.uri().path() != "/sedna/predict" {
            return reply(
                StatusCode::NOT_FOUND,
                b"not found: use POST /sedna/predict".to_vec(),
                None,
            );
        }
        if request.method() != hyper::Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, b"use POST".to_vec(), None);
        }
        let body = match Limited::new(request.into_body(), MAX_REQUEST_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                let status = if e.is::<http_body_util::LengthLimitError>() {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                };
                return reply(status, e.to_string().into_bytes(), None);
            }
        };
        let inputs = match decode_tensors(&body, &FrameLimits::default()) {
            Ok(inputs) => inputs,
            Err(e) => return reply(StatusCode::BAD_REQUEST, e.to_string().into_bytes(), None),
        };
        let result = tokio::task::spawn_blocking(move || {
            let views: Vec<(&str, TensorView<'_>)> = inputs
                .iter()
                .map(|(name, tensor)| (name.as_str(), tensor.view()))
                .collect();
            model.run(&views)
        })
        .await;
        match result {
            Ok(Ok(outputs)) => match encode_tensors(&outputs.values) {
                Ok(body) => reply(StatusCode::OK, body, Some(outputs.model_version)),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string().into_bytes(),
                    None,
                ),
            },
            Ok(Err(e @ InferenceError::Input(_))) => {
                reply(StatusCode::BAD_REQUEST, e.to_string().into_bytes(), None)
            }
            Ok(Err(e)) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string().into_bytes(),
                None,
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string().into_bytes(),
                None,
            ),
        }
    }

    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let model = model.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| handle(model.clone(), request));
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
    Ok(())
}

/// Exponential backoff with full jitter, for resend loops: the n-th wait is uniform in
/// `[0, min(cap, base·2ⁿ)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Backoff from `base` up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next wait, given a uniform random number in `[0, 1)`.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt.min(30)).unwrap_or(u32::MAX))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The next wait, jittered.
    pub fn next_wait(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    /// Back to the first wait (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Tensor)> {
        vec![
            (
                "input".into(),
                Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 3]), vec![0.5, -1.0, 2.0]).unwrap()),
            ),
            (
                "image".into(),
                Tensor::U8(ArrayD::from_elem(IxDyn(&[2, 2, 3]), 7u8)),
            ),
            (
                "ids".into(),
                Tensor::I64(ArrayD::from_elem(IxDyn(&[2]), -9)),
            ),
            (
                "f64".into(),
                Tensor::F64(ArrayD::from_elem(IxDyn(&[]), 1.5)),
            ),
            (
                "i32".into(),
                Tensor::I32(ArrayD::from_elem(IxDyn(&[0, 4]), 1)),
            ),
        ]
    }

    #[test]
    fn tensor_frames_round_trip_every_type() {
        let encoded = encode_tensors(&tensors()).unwrap();
        assert_eq!(
            decode_tensors(&encoded, &FrameLimits::default()).unwrap(),
            tensors()
        );
    }

    #[test]
    fn malformed_tensor_frames_are_refused() {
        let good = encode_tensors(&tensors()).unwrap();
        let limits = FrameLimits::default();
        let err = decode_tensors(&good[..good.len() - 1], &limits)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
        let mut extra = good.clone();
        extra.push(0);
        let err = decode_tensors(&extra, &limits).unwrap_err().to_string();
        assert!(err.contains("1 bytes after the last tensor"), "{err}");
        let tight = FrameLimits {
            max_bytes: 8,
            ..limits
        };
        let err = decode_tensors(&good, &tight).unwrap_err().to_string();
        assert!(err.contains("more than 8 bytes"), "{err}");
        // A shape that claims 2^62 elements is refused before allocating.
        let huge = vec![(
            "x".to_string(),
            Tensor::U8(ArrayD::from_elem(IxDyn(&[1]), 0u8)),
        )];
        let mut frame = encode_tensors(&huge).unwrap();
        let dims_at = 4 + 1 + 4 + 2 + 1 + 1 + 1;
        frame[dims_at..dims_at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(decode_tensors(&frame, &limits).is_err());
    }

    #[test]
    fn the_queue_is_bounded_ordered_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let limits = QueueLimits {
            max_items: 2,
            max_bytes: 1 << 20,
        };
        let q = HardExampleQueue::open(dir.path(), limits).unwrap();
        assert_eq!(q.push("a", &tensors()).unwrap(), Some(0));
        assert_eq!(q.push("b", &tensors()).unwrap(), Some(1));
        assert_eq!(q.push("c", &tensors()).unwrap(), None, "full: refused");
        drop(q);
        let q = HardExampleQueue::open(dir.path(), limits).unwrap();
        assert_eq!(q.len(), 2);
        let oldest = q.oldest().unwrap().unwrap();
        assert_eq!((oldest.seq, oldest.id.as_str()), (0, "a"));
        assert_eq!(oldest.inputs, tensors());
        q.remove(0).unwrap();
        assert_eq!(q.oldest().unwrap().unwrap().id, "b");
        assert_eq!(q.push("d", &tensors()).unwrap(), Some(2));
        let small = QueueLimits {
            max_items: 10,
            max_bytes: 10,
        };
        let q2 = HardExampleQueue::open(dir.path().join("small"), small).unwrap();
        assert_eq!(
            q2.push("x", &tensors()).unwrap(),
            None,
            "over the byte limit"
        );
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_with(1.0), Duration::from_millis(100));
        assert_eq!(b.next_with(1.0), Duration::from_millis(200));
        assert_eq!(b.next_with(0.5), Duration::from_millis(200));
        assert_eq!(b.next_with(1.0), Duration::from_millis(800));
        assert_eq!(b.next_with(1.0), Duration::from_secs(1));
        assert_eq!(b.next_with(0.0), Duration::ZERO);
        b.reset();
        assert_eq!(b.next_with(1.0), Duration::from_millis(100));
        for _ in 0..100 {
            assert!(b.next_wait() <= Duration::from_secs(1));
        }
    }
}
