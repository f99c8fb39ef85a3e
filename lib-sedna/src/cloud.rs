//! The cloud side of joint inference: dynamic batching of concurrent requests
//! ([`Batcher`]), the gRPC service that serves a model through it ([`serve_grpc`], protocol
//! `sedna.inference.v1.Inference` in `proto/inference.proto`; [`serve_grpc_and_json`] adds
//! Sedna's HTTP JSON protocol on the same port), and the edge's gRPC client ([`GrpcCloud`], a
//! [`Cloud`]).
//!
//! The batcher takes the requests already waiting (up to [`BatchOptions::max_batch`]); a
//! lone request runs at once, while under load (several waiting) the batch waits up to
//! [`BatchOptions::max_delay`] to fill. It runs the model once on the requests stacked along
//! the first axis and splits the outputs back; requests arriving meanwhile form the next
//! batch. Requests whose
//! inputs cannot be stacked with the others (other names or shapes) run in their own batch.
//! The queue is bounded ([`BatchOptions::max_queue`]): a full queue answers "overloaded"
//! (retryable) at once instead of growing.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use sedna::cloud::{BatchOptions, Batcher};
//! use sedna::inference::{Model, SessionOptions, Tensor};
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits/model.onnx");
//! let model = Arc::new(Model::load(path, &SessionOptions::default())?);
//! let batcher = Batcher::spawn(model, BatchOptions::default());
//! let sample = Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 64])));
//! let reply = batcher.infer(vec![("input".into(), sample)]).await?;
//! assert_eq!(reply.model_version, 1);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use sedna_proto::inference::inference_client::InferenceClient;
use sedna_proto::inference::inference_server::{Inference, InferenceServer};
use sedna_proto::inference::{PredictRequest, PredictResponse};
use tokio::sync::{mpsc, oneshot};

use crate::inference::{Model, Tensor, TensorView};
use crate::joint::{Cloud, CloudReply, FrameLimits, JointError, decode_tensors, encode_tensors};

type Result<T, E = JointError> = std::result::Result<T, E>;

/// How the batcher groups requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most requests run together.
    pub max_batch: usize,
    /// Longest a request waits for others.
    pub max_delay: Duration,
    /// Most requests waiting; more are refused as overloaded.
    pub max_queue: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch: 32,
            max_delay: Duration::from_millis(2),
            max_queue: 1024,
        }
    }
}

/// One request's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchReply {
    /// The outputs for this request.
    pub outputs: Vec<(String, Tensor)>,
    /// The model version that ran.
    pub model_version: u64,
    /// Requests run together.
    pub batch_size: usize,
}

struct Job {
    inputs: Vec<(String, Tensor)>,
    reply: oneshot::Sender<Result<BatchReply>>,
}

/// Dynamic batching in front of a model.
#[derive(Debug, Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the batching task for `model` on the current tokio runtime.
    pub fn spawn(model: Arc<Model>, options: BatchOptions) -> Batcher {
        let options = BatchOptions {
            max_batch: options.max_batch.max(1),
            max_queue: options.max_queue.max(1),
            ..options
        };
        let (queue, jobs) = mpsc::channel(options.max_queue);
        tokio::spawn(run_batches(model, options, jobs));
        Batcher { queue }
    }

    /// Runs one request (inputs with a first axis of 1) in the next batch.
    pub async fn infer(&self, inputs: Vec<(String, Tensor)>) -> Result<BatchReply> {
        for (name, tensor) in &inputs {
            if tensor.shape().first() != Some(&1) {
                return Err(JointError::CloudRefused(format!(
                    "input {name} has shape {:?}: send one sample (first axis 1)",
                    tensor.shape()
                )));
            }
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Job { inputs, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    JointError::Cloud("the cloud worker is overloaded (queue full)".into())
                }
                mpsc::error::TrySendError::Closed(_) => {
                    JointError::Cloud("the cloud worker is shutting down".into())
                }
            })?;
        answer
            .await
            .map_err(|_| JointError::Cloud("the batch was dropped".into()))?
    }
}

/// A batch key: input names, element types and per-sample shapes.
fn signature(inputs: &[(String, Tensor)]) -> Vec<(String, crate::inference::DType, Vec<usize>)> {
    inputs
        .iter()
        .map(|(name, t)| (name.clone(), t.dtype(), t.shape()[1..].to_vec()))
        .collect()
}

async fn run_batches(model: Arc<Model>, options: BatchOptions, mut jobs: mpsc::Receiver<Job>) {
    let mut pending: Vec<Job> = Vec::new();
    loop {
        if pending.is_empty() {
            match jobs.recv().await {
                Some(job) => pending.push(job),
                None => return,
            }
        }
        // Take what is already waiting; a lone request runs at once (no added latency at low
        // load), while under load the batch waits up to `max_delay` to fill.
        while pending.len() < options.max_batch {
            match jobs.try_recv() {
                Ok(job) => pending.push(job),
                Err(_) => break,
            }
        }
        if pending.len() > 1 {
            let deadline = tokio::time::Instant::now() + options.max_delay;
            while pending.len() < options.max_batch {
                match tokio::time::timeout_at(deadline, jobs.recv()).await {
                    Ok(Some(job)) => pending.push(job),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        // The batch: the first request and every later one stackable with it.
        let key = signature(&pending[0].inputs);
        let (batch, rest): (Vec<Job>, Vec<Job>) = pending
            .drain(..)
            .partition(|job| signature(&job.inputs) == key);
        pending = rest;
        let model = model.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let result = run_one_batch(&model, &batch);
            (batch, result)
        })
        .await;
        match outcome {
            Ok((batch, Ok(mut replies))) => {
                for job in batch.into_iter().rev() {
                    if let Some(reply) = replies.pop() {
                        let _ = job.reply.send(Ok(reply));
                    }
                }
            }
            Ok((batch, Err(e))) => {
                let message = e.to_string();
                for job in batch {
                    let _ = job
                        .reply
                        .send(Err(JointError::CloudRefused(message.clone())));
                }
            }
            Err(e) => tracing::error!(error = %e, "batch task failed"),
        }
    }
}

fn run_one_batch(model: &Model, batch: &[Job]) -> Result<Vec<BatchReply>> {
    let size = batch.len();
    let names: Vec<String> = batch[0].inputs.iter().map(|(n, _)| n.clone()).collect();
    let stacked: Vec<(String, Tensor)> = if size == 1 {
        batch[0].inputs.clone()
    } else {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let parts: Vec<Tensor> = batch.iter().map(|j| j.inputs[i].1.clone()).collect();
                Ok((name.clone(), Tensor::concat(name, &parts)?))
            })
            .collect::<Result<_>>()?
    };
    let views: Vec<(&str, TensorView<'_>)> = stacked
        .iter()
        .map(|(n, t)| (n.as_str(), t.view()))
        .collect();
    let outputs = model.run(&views)?;
    let mut replies = Vec::with_capacity(size);
    for row in 0..size {
        let mut values = Vec::with_capacity(outputs.values.len());
        for (name, tensor) in &outputs.values {
            if tensor.shape().first() != Some(&size) {
                return Err(JointError::Config(format!(
                    "output {name} has shape {:?}, not one row per request ({size})",
                    tensor.shape()
                )));
            }
            values.push((name.clone(), tensor.rows(row, row + 1)));
        }
        replies.push(BatchReply {
            outputs: values,
            model_version: outputs.model_version,
            batch_size: size,
        });
    }
    Ok(replies)
}

/// A function that answers requests itself (e.g. a Python estimator, through the bindings):
/// named inputs in, named outputs out, or why not (the caller's error).
pub type InferFn = Arc<
    dyn Fn(Vec<(String, Tensor)>) -> std::result::Result<Vec<(String, Tensor)>, String>
        + Send
        + Sync,
>;

/// What answers a cloud worker's requests: an ONNX model behind the [`Batcher`], or a function.
#[derive(Clone)]
pub enum Backend {
    /// Dynamic batching in front of a model.
    Batcher(Batcher),
    /// One call per request, on a blocking thread.
    Function(InferFn),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Batcher(b) => f.debug_tuple("Batcher").field(b).finish(),
            Backend::Function(_) => f.write_str("Function"),
        }
    }
}

impl From<Batcher> for Backend {
    fn from(batcher: Batcher) -> Backend {
        Backend::Batcher(batcher)
    }
}

impl Backend {
    /// Answers one request.
    pub async fn infer(&self, inputs: Vec<(String, Tensor)>) -> Result<BatchReply> {
        match self {
            Backend::Batcher(batcher) => batcher.infer(inputs).await,
            Backend::Function(function) => {
                let function = function.clone();
                let outputs = tokio::task::spawn_blocking(move || function(inputs))
                    .await
                    .map_err(|e| JointError::Cloud(format!("the model's call failed: {e}")))?
                    .map_err(JointError::CloudRefused)?;
                Ok(BatchReply {
                    outputs,
                    model_version: 1,
                    batch_size: 1,
                })
            }
        }
    }
}

struct Service {
    backend: Backend,
    limits: FrameLimits,
}

#[tonic::async_trait]
impl Inference for Service {
    async fn predict(
        &self,
        request: tonic::Request<PredictRequest>,
    ) -> std::result::Result<tonic::Response<PredictResponse>, tonic::Status> {
        let request = request.into_inner();
        let inputs = decode_tensors(&request.tensors, &self.limits)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let reply = self.backend.infer(inputs).await.map_err(|e| match e {
            JointError::Cloud(m) => tonic::Status::unavailable(m),
            other => tonic::Status::invalid_argument(other.to_string()),
        })?;
        let tensors =
            encode_tensors(&reply.outputs).map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(PredictResponse {
            tensors,
            model_version: reply.model_version.to_string(),
            batch_size: u32::try_from(reply.batch_size).unwrap_or(u32::MAX),
        }))
    }
}

/// The largest gRPC message the edge's client accepts (answers can be large).
pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 << 20;

/// The largest request a cloud worker accepts by default.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 << 20;

/// The variable naming the file that holds a service's bearer token (its cloud worker
/// requires it; its edge workers send it).
pub const SERVICE_TOKEN_FILE_ENV: &str = "SEDNA_SERVICE_TOKEN_FILE";

/// Who may call a cloud worker, and how much it takes in at once.
#[derive(Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// Largest request accepted: a gRPC message, or a JSON body (default
    /// [`DEFAULT_MAX_REQUEST_BYTES`]). Larger ones are refused before they are decoded.
    pub max_request_bytes: usize,
    /// Most requests being read or answered at once, over all connections (default 64); more
    /// wait, their bodies held back by HTTP/2 flow control. Memory for requests stays under
    /// `max_in_flight × max_request_bytes`.
    pub max_in_flight: usize,
    /// Most connections open at once (default 512); one beyond is closed at once.
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams per connection (default 32).
    pub max_streams_per_connection: u32,
    /// The bearer token every request must carry (`authorization: Bearer <token>`); `None`
    /// accepts any caller (a worker reachable only by its own edge, or a test).
    pub token: Option<String>,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_connections", &self.max_connections)
            .field(
                "max_streams_per_connection",
                &self.max_streams_per_connection,
            )
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_in_flight: 64,
            max_connections: 512,
            max_streams_per_connection: 32,
            token: None,
        }
    }
}

/// The service token named by `SEDNA_SERVICE_TOKEN_FILE`, if the variable is set: the file's
/// first line. An unreadable or empty file is an error naming it (never silently no token).
pub fn service_token_from_env() -> std::io::Result<Option<String>> {
    let Some(path) = std::env::var_os(SERVICE_TOKEN_FILE_ENV) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "{SERVICE_TOKEN_FILE_ENV}={}: {e}",
                std::path::Path::new(&path).display()
            ),
        )
    })?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{SERVICE_TOKEN_FILE_ENV}={}: the file is empty",
                std::path::Path::new(&path).display()
            ),
        ));
    }
    Ok(Some(token))
}

/// Compares secrets in time that depends on their length only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a request carries the token (always, when none is required).
fn authorized<B>(token: Option<&str>, request: &hyper::Request<B>) -> bool {
    let Some(token) = token else { return true };
    request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

/// Serves `batcher` as the `Inference` gRPC service on `listener` until `shutdown`, with the
/// default [`ServeOptions`] (no token).
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    batcher: Batcher,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve(
        listener,
        batcher,
        Protocols::Grpc,
        ServeOptions::default(),
        shutdown,
    )
    .await
}

/// Serves `batcher` on `listener` in two protocols on one port until `shutdown`, with the
/// default [`ServeOptions`]: see [`Protocols::GrpcAndJson`].
pub async fn serve_grpc_and_json(
    listener: tokio::net::TcpListener,
    backend: impl Into<Backend>,
    input: Option<crate::inference::TensorInfo>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve(
        listener,
        backend,
        Protocols::GrpcAndJson { input },
        ServeOptions::default(),
        shutdown,
    )
    .await
}

/// What a cloud worker speaks on its port.
#[derive(Debug, Clone)]
pub enum Protocols {
    /// The `Inference` gRPC service only.
    Grpc,
    /// The `Inference` gRPC service (requests with `content-type: application/grpc`), and
    /// Sedna's HTTP JSON protocol for the big model, which Sedna's little-model apps speak:
    /// `POST /<service>/predict` with `{"data": <nested numbers>}` (one sample, or a batch
    /// when its rank is the model input's) answered with `{"result": <first output>,
    /// "outputs": {name: …}, "model_version": n}`. `input` is the model's (single) input;
    /// without one (a function backend) the data goes as it is, named `data`. Bad JSON, a
    /// ragged or wrongly shaped array, or a body over the request limit get a 4xx naming the
    /// problem.
    GrpcAndJson {
        /// The model's input.
        input: Option<crate::inference::TensorInfo>,
    },
}

fn grpc_refusal(code: tonic::Code, message: &str) -> hyper::Response<tonic::body::Body> {
    let mut response = hyper::Response::new(tonic::body::Body::empty());
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", hyper::header::HeaderValue::from(code as i32));
    if let Ok(v) = hyper::header::HeaderValue::from_str(message) {
        headers.insert("grpc-message", v);
    }
    response
}

/// Serves `backend` on `listener` until `shutdown`: the protocols asked for, every request
/// checked against `options` (token, size, requests in flight, connections).
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: impl Into<Backend>,
    protocols: Protocols,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let batcher: Backend = backend.into();
    let grpc = InferenceServer::new(Service {
        backend: batcher.clone(),
        limits: FrameLimits::default(),
    })
    .max_decoding_message_size(options.max_request_bytes)
    .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let json_input = match protocols {
        Protocols::Grpc => None,
        Protocols::GrpcAndJson { input } => Some(input),
    };
    let json_input = Arc::new(json_input);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(options.max_in_flight.max(1)));
    let connections_left = Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1)));
    let token: Arc<Option<String>> = Arc::new(options.token.clone());
    let max_request_bytes = options.max_request_bytes;
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
                let Ok(slot) = connections_left.clone().try_acquire_owned() else {
                    tracing::warn!("connection limit reached: a connection was closed");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (grpc, batcher, input, in_flight, token) =
                    (grpc.clone(), batcher.clone(), json_input.clone(), in_flight.clone(), token.clone());
                connections.spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let (grpc, batcher, input, in_flight, token) =
                            (grpc.clone(), batcher.clone(), input.clone(), in_flight.clone(), token.clone());
                        async move {
                            let is_grpc = request
                                .headers()
                                .get(hyper::header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .is_some_and(|v| v.starts_with("application/grpc"));
                            let allowed = authorized((*token).as_deref(), &request);
                            if is_grpc {
                                if !allowed {
                                    return Ok(grpc_refusal(
                                        tonic::Code::Unauthenticated,
                                        "this cloud worker needs the service's token (authorization: Bearer; SEDNA_SERVICE_TOKEN_FILE)",
                                    ));
                                }
                                let Ok(_permit) = in_flight.acquire_owned().await else {
                                    return Ok(grpc_refusal(tonic::Code::Unavailable, "shutting down"));
                                };
                                tower::ServiceExt::oneshot(grpc, request).await
                            } else {
                                match (*input).as_ref() {
                                    None => Ok(json_error(
                                        hyper::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                                        "this cloud worker speaks gRPC only".into(),
                                    )),
                                    Some(_) if !allowed => Ok(json_error(
                                        hyper::StatusCode::UNAUTHORIZED,
                                        "this cloud worker needs the service's token (authorization: Bearer)".into(),
                                    )),
                                    Some(input) => {
                                        let Ok(_permit) = in_flight.acquire_owned().await else {
                                            return Ok(json_error(hyper::StatusCode::SERVICE_UNAVAILABLE, "shutting down".into()));
                                        };
                                        Ok(sedna_json(&batcher, input.as_ref(), request, max_request_bytes).await)
                                    }
                                }
                            }
                        }
                    });
                    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                    builder.http2().max_concurrent_streams(options.max_streams_per_connection);
                    let _ = builder
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

fn json_reply(
    status: hyper::StatusCode,
    body: serde_json::Value,
) -> hyper::Response<tonic::body::Body> {
    use http_body_util::Full;
    let mut response = hyper::Response::new(tonic::body::Body::new(Full::new(bytes::Bytes::from(
        body.to_string(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn json_error(status: hyper::StatusCode, message: String) -> hyper::Response<tonic::body::Body> {
    json_reply(status, serde_json::json!({ "error": message }))
}

/// One request of Sedna's JSON protocol.
async fn sedna_json(
    batcher: &Backend,
    input: Option<&crate::inference::TensorInfo>,
    request: hyper::Request<hyper::body::Incoming>,
    max_request_bytes: usize,
) -> hyper::Response<tonic::body::Body> {
    use http_body_util::{BodyExt, Limited};
    use hyper::StatusCode;
    let reply = json_reply;
    let error = json_error;
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if !matches!(segments.as_slice(), [service, "predict"] if !service.is_empty()) {
        return error(
            StatusCode::NOT_FOUND,
            "use POST /<service>/predict with {\"data\": ...} (Sedna's protocol) or gRPC".into(),
        );
    }
    if request.method() != hyper::Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use POST".into());
    }
    let body = match Limited::new(request.into_body(), max_request_bytes)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over {max_request_bytes} bytes"),
            );
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let tensor = match json_input(&body, input) {
        Ok(t) => t,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let (tensor, added_batch) = tensor;
    let name = input.map_or("data".to_string(), |i| i.name.clone());
    match batcher.infer(vec![(name, tensor)]).await {
        Ok(answer) => {
            let outputs: serde_json::Map<String, serde_json::Value> = answer
                .outputs
                .iter()
                .map(|(name, t)| (name.clone(), tensor_json(t, added_batch)))
                .collect();
            let result = answer
                .outputs
                .iter()
                .find(|(_, t)| matches!(t, Tensor::F32(_)))
                .or(answer.outputs.first())
                .map(|(_, t)| tensor_json(t, added_batch))
                .unwrap_or_default();
            reply(
                StatusCode::OK,
                serde_json::json!({ "result": result, "outputs": outputs, "model_version": answer.model_version }),
            )
        }
        Err(JointError::Cloud(m)) => error(StatusCode::SERVICE_UNAVAILABLE, m),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// The deepest nesting of `data` Sedna's JSON protocol accepts.
const MAX_JSON_RANK: usize = 8;

/// `{"data": nested numbers}` as a float tensor for `input`, with whether a batch axis of 1
/// was added (one sample sent).
fn json_input(
    body: &[u8],
    input: Option<&crate::inference::TensorInfo>,
) -> std::result::Result<(Tensor, bool), String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let data = value
        .get("data")
        .ok_or("the body must be {\"data\": [...]} (Sedna's protocol)")?;
    if let Some(input) = input
        && input.dtype != crate::inference::DType::F32
    {
        return Err(format!(
            "the model's input {} is {}; JSON data is sent as float32",
            input.name,
            input.dtype.name()
        ));
    }
    let mut shape = Vec::new();
    let mut level = data;
    while let serde_json::Value::Array(items) = level {
        if shape.len() == MAX_JSON_RANK {
            return Err(format!("data is nested deeper than {MAX_JSON_RANK}"));
        }
        shape.push(items.len());
        level = items.first().ok_or("data has an empty list")?;
    }
    let mut values = Vec::with_capacity(shape.iter().product());
    flatten(data, &shape, &mut values)?;
    let Some(input) = input else {
        let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), values)
            .map_err(|e| e.to_string())?;
        return Ok((Tensor::F32(array), false));
    };
    let rank = input.shape.len();
    let (shape, added) = match shape.len() {
        n if n == rank => (shape, false),
        n if n + 1 == rank => (std::iter::once(1).chain(shape).collect(), true),
        n => {
            return Err(format!(
                "data has rank {n}; the model's input {} takes {:?} (send one sample or a batch)",
                input.name, input.shape
            ));
        }
    };
    for (axis, (got, want)) in shape.iter().zip(&input.shape).enumerate() {
        if let Some(want) = want
            && got != want
        {
            return Err(format!(
                "data has shape {shape:?}; the model's input {} takes {:?} (axis {axis})",
                input.name, input.shape
            ));
        }
    }
    let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), values)
        .map_err(|e| e.to_string())?;
    Ok((Tensor::F32(array), added))
}

fn flatten(
    value: &serde_json::Value,
    shape: &[usize],
    out: &mut Vec<f32>,
) -> std::result::Result<(), String> {
    match (value, shape) {
        (serde_json::Value::Array(items), [n, rest @ ..]) if items.len() == *n => {
            items.iter().try_for_each(|v| flatten(v, rest, out))
        }
        (serde_json::Value::Number(x), []) => {
            out.push(x.as_f64().unwrap_or(f64::NAN) as f32);
            Ok(())
        }
        _ => Err("data is ragged or not all numbers (every row must have the same length)".into()),
    }
}

/// A tensor as nested JSON lists (without its first axis when that was added).
fn tensor_json(tensor: &Tensor, drop_batch: bool) -> serde_json::Value {
    fn nest<T: Copy + Into<serde_json::Value>>(shape: &[usize], values: &[T]) -> serde_json::Value {
        match shape {
            [] => values.first().map(|v| (*v).into()).unwrap_or_default(),
            [n, rest @ ..] => {
                let step = rest.iter().product::<usize>().max(1);
                serde_json::Value::Array(
                    (0..*n)
                        .map(|i| nest(rest, values.get(i * step..).unwrap_or_default()))
                        .collect(),
                )
            }
        }
    }
    let (shape, json) = match tensor {
        Tensor::F32(a) => (
            a.shape().to_vec(),
            nest(a.shape(), &a.iter().copied().collect::<Vec<_>>()),
        ),
        Tensor::F64(a) => (
            a.shape().to_vec(),
            nest(a.shape(), &a.iter().copied().collect::<Vec<_>>()),
        ),
        Tensor::I64(a) => (
            a.shape().to_vec(),
            nest(a.shape(), &a.iter().copied().collect::<Vec<_>>()),
        ),
        Tensor::I32(a) => (
            a.shape().to_vec(),
            nest(a.shape(), &a.iter().copied().collect::<Vec<_>>()),
        ),
        Tensor::U8(a) => (
            a.shape().to_vec(),
            nest(a.shape(), &a.iter().copied().collect::<Vec<_>>()),
        ),
    };
    match (drop_batch, shape.first(), json) {
        (true, Some(1), serde_json::Value::Array(mut items)) if items.len() == 1 => items.remove(0),
        (_, _, json) => json,
    }
}

/// The edge's client of a cloud worker's `Inference` gRPC service.
#[derive(Debug, Clone)]
pub struct GrpcCloud {
    client: InferenceClient<tonic::transport::Channel>,
    endpoint: String,
    limits: FrameLimits,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl GrpcCloud {
    /// A client of `endpoint` (`http://host:port`), connecting lazily, giving up on a request
    /// after `timeout`.
    pub fn new(endpoint: &str, timeout: Duration) -> Result<GrpcCloud> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| JointError::Config(format!("cloud endpoint {endpoint:?}: {e}")))?
            .timeout(timeout)
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(GrpcCloud {
            client: InferenceClient::new(channel)
                .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES),
            endpoint: endpoint.to_string(),
            limits: FrameLimits::default(),
            token: None,
        })
    }

    /// The same client sending `token` as `authorization: Bearer <token>` (the service's
    /// token, from [`service_token_from_env`]).
    pub fn with_token(mut self, token: &str) -> Result<GrpcCloud> {
        self.token = Some(format!("Bearer {token}").parse().map_err(|_| {
            JointError::Config("the service token has characters a header cannot carry".into())
        })?);
        Ok(self)
    }
}

/// Opens a byte stream to a cloud endpoint through the node's cloud proxy at `proxy`
/// (`host:port`, from `SEDNA_CLOUD_PROXY`): `CONNECT target`, then the raw stream, tunnelled
/// over the node's own connection to the hub. The proxy's refusal is the error, with its
/// reason.
pub async fn proxy_connect(proxy: &str, target: &str) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        if stream.read(&mut byte).await? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    if !text.starts_with("HTTP/1.1 200") {
        // The reason follows the head; read what is there.
        let mut reason = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut reason))
            .await
            .ok()
            .and_then(std::result::Result::ok)
            .unwrap_or(0);
        return Err(std::io::Error::other(format!(
            "cloud proxy {proxy}: {} {}",
            text.lines().next().unwrap_or("no answer"),
            String::from_utf8_lossy(&reason[..n]).trim()
        )));
    }
    Ok(stream)
}

impl GrpcCloud {
    /// A client of the cloud worker at tunnel target `target`
    /// (`<namespace>/<edge worker pod>/cloud`) through the node's cloud proxy at `proxy` (`host:port`, from
    /// `SEDNA_CLOUD_PROXY`): the bytes travel over the node's own connection to the hub, so the
    /// edge needs no route to the cloud. Connects lazily; the proxy's refusal (say, a node that
    /// does not run this service) is the request's error.
    pub fn via_proxy(proxy: &str, target: &str, timeout: Duration) -> Result<GrpcCloud> {
        if !target.contains('/') {
            return Err(JointError::Config(format!(
                "tunnel target {target:?} is not <namespace>/<pod>/<endpoint>"
            )));
        }
        let endpoint = format!("{target} via the cloud proxy {proxy}");
        let (proxy, target) = (proxy.to_string(), target.to_string());
        let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
            let (proxy, target) = (proxy.clone(), target.clone());
            async move {
                let stream = proxy_connect(&proxy, &target).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        let channel = tonic::transport::Endpoint::from_static("http://cloud-worker.tunnel")
            .timeout(timeout)
            .connect_timeout(timeout)
            .connect_with_connector_lazy(connector);
        Ok(GrpcCloud {
            client: InferenceClient::new(channel)
                .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES),
            endpoint,
            limits: FrameLimits::default(),
            token: None,
        })
    }
}

impl Cloud for GrpcCloud {
    fn infer<'a>(
        &'a self,
        inputs: &'a [(String, Tensor)],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<CloudReply>> + Send + 'a>> {
        Box::pin(async move {
            let tensors = encode_tensors(inputs)?;
            let bytes_sent = tensors.len() as u64;
            let mut client = self.client.clone();
            let mut request = tonic::Request::new(PredictRequest {
                id: String::new(),
                tensors,
            });
            if let Some(token) = &self.token {
                request
                    .metadata_mut()
                    .insert("authorization", token.clone());
            }
            let response = client
                .predict(request)
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::InvalidArgument
                    | tonic::Code::Unauthenticated
                    | tonic::Code::OutOfRange
                    | tonic::Code::ResourceExhausted => {
                        JointError::CloudRefused(status.message().to_string())
                    }
                    _ => JointError::Cloud(format!("{}: {}", self.endpoint, status.message())),
                })?
                .into_inner();
            Ok(CloudReply {
                bytes_received: response.tensors.len() as u64,
                outputs: decode_tensors(&response.tensors, &self.limits)?,
                model_version: Some(response.model_version),
                bytes_sent,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input_784() -> crate::inference::TensorInfo {
        crate::inference::TensorInfo {
            name: "input".into(),
            dtype: crate::inference::DType::F32,
            shape: vec![None, Some(784)],
        }
    }

    #[test]
    fn sednas_json_data_becomes_one_sample_or_a_batch_and_bad_data_is_named() {
        let input = input_784();
        let one = serde_json::json!({ "data": vec![0.5f32; 784] }).to_string();
        let (tensor, added) = json_input(one.as_bytes(), Some(&input)).unwrap();
        assert_eq!((tensor.shape(), added), (&[1, 784][..], true));
        let batch = serde_json::json!({ "data": vec![vec![0.0f32; 784]; 3] }).to_string();
        let (tensor, added) = json_input(batch.as_bytes(), Some(&input)).unwrap();
        assert_eq!((tensor.shape(), added), (&[3, 784][..], false));
        let refused = |body: &str| json_input(body.as_bytes(), Some(&input)).unwrap_err();
        assert!(refused("not json").contains("not JSON"));
        assert!(refused(r#"{"samples": [1]}"#).contains("{\"data\""));
        assert!(refused(r#"{"data": [[1, 2], [3]]}"#).contains("ragged"));
        assert!(refused(r#"{"data": [1, "x"]}"#).contains("not all numbers"));
        assert!(refused(r#"{"data": [[]]}"#).contains("empty"));
        assert!(refused(r#"{"data": [1, 2, 3]}"#).contains("784"));
        assert!(refused(r#"{"data": [[[1]]]}"#).contains("rank 3"));
        let deep = format!("{{\"data\": {}1{}}}", "[".repeat(20), "]".repeat(20));
        assert!(refused(&deep).contains("deeper than 8"));
    }

    #[test]
    fn outputs_go_back_as_nested_lists_without_the_added_batch_axis() {
        let t = Tensor::F32(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 3]), vec![0.1, 0.2, 0.7]).unwrap(),
        );
        let flat = tensor_json(&t, true);
        assert_eq!(flat.as_array().unwrap().len(), 3);
        assert_eq!(tensor_json(&t, false).as_array().unwrap().len(), 1);
        let labels = Tensor::I64(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 2]), vec![1, 2, 3, 4]).unwrap(),
        );
        assert_eq!(
            tensor_json(&labels, false),
            serde_json::json!([[1, 2], [3, 4]])
        );
    }

    fn digits() -> Arc<Model> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits/model.onnx");
        let options = crate::inference::SessionOptions {
            intra_threads: 1,
            ..Default::default()
        };
        Arc::new(Model::load(path, &options).unwrap())
    }

    fn sample(v: f32) -> Vec<(String, Tensor)> {
        vec![(
            "input".into(),
            Tensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[1, 64]), v)),
        )]
    }

    // One thread: the eight requests are all queued before the batcher runs, however loaded
    // the machine is (on several threads a busy machine can hand them over one at a time).
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_requests_are_batched_and_each_gets_its_own_row() {
        let model = digits();
        let batcher = Batcher::spawn(
            model.clone(),
            BatchOptions {
                max_batch: 8,
                max_delay: Duration::from_millis(50),
                max_queue: 64,
            },
        );
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.infer(sample(i as f32 / 8.0)).await })
            })
            .collect();
        let mut sizes = Vec::new();
        for (i, h) in handles.into_iter().enumerate() {
            let reply = h.await.unwrap().unwrap();
            sizes.push(reply.batch_size);
            // Each row equals what the model answers for that sample alone.
            let alone = model
                .run(&[("input", sample(i as f32 / 8.0)[0].1.view())])
                .unwrap();
            let got = reply
                .outputs
                .iter()
                .find(|(n, _)| n == "probabilities")
                .unwrap();
            let want = alone.get("probabilities").unwrap();
            match (&got.1, want) {
                (Tensor::F32(a), Tensor::F32(b)) => {
                    assert_eq!(a.shape(), b.shape());
                    assert!(a.iter().zip(b.iter()).all(|(x, y)| (x - y).abs() < 1e-5));
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(sizes, [8; 8], "the eight requests ran as one batch");
    }

    #[tokio::test]
    async fn a_full_queue_answers_overloaded_and_bad_shapes_are_refused() {
        let batcher = Batcher::spawn(
            digits(),
            BatchOptions {
                max_batch: 1,
                max_delay: Duration::from_millis(1),
                max_queue: 1,
            },
        );
        let two = vec![(
            "input".to_string(),
            Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 64]))),
        )];
        let err = batcher.infer(two).await.unwrap_err();
        assert!(err.to_string().contains("send one sample"), "{err}");
        // Fill the queue without letting the batch task run (current-thread runtime).
        let (tx, _rx) = oneshot::channel();
        batcher
            .queue
            .try_send(Job {
                inputs: sample(0.0),
                reply: tx,
            })
            .ok();
        let err = batcher.infer(sample(0.0)).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("overloaded"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grpc_round_trip_with_bad_input_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let batcher = Batcher::spawn(digits(), BatchOptions::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_grpc(listener, batcher, async {
            let _ = stopped.await;
        }));
        let cloud = GrpcCloud::new(&format!("http://{address}"), Duration::from_secs(5)).unwrap();
        let reply = cloud.infer(&sample(0.5)).await.unwrap();
        assert_eq!(reply.model_version.as_deref(), Some("1"));
        assert!(reply.outputs.iter().any(|(n, _)| n == "label"));
        assert!(reply.bytes_sent > 256 && reply.bytes_received > 0);
        let wrong = vec![(
            "input".to_string(),
            Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 3]))),
        )];
        let err = cloud.infer(&wrong).await.unwrap_err();
        assert!(matches!(err, JointError::CloudRefused(_)), "{err}");
        assert!(err.to_string().contains("dimension 1 must be 64"), "{err}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        let err = cloud.infer(&sample(0.5)).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }
}
