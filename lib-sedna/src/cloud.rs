//! The cloud side of joint inference: dynamic batching of concurrent requests
//! ([`Batcher`]), the gRPC service that serves a model through it ([`serve_grpc`], protocol
//! `sedna.inference.v1.Inference` in `proto/inference.proto`), and the edge's gRPC client
//! ([`GrpcCloud`], a [`Cloud`]).
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

struct Service {
    batcher: Batcher,
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
        let reply = self.batcher.infer(inputs).await.map_err(|e| match e {
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

/// The largest gRPC message either side accepts.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 << 20;

/// Serves `batcher` as the `Inference` gRPC service on `listener` until `shutdown`.
pub async fn serve_grpc(
    listener: tokio::net::TcpListener,
    batcher: Batcher,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service = InferenceServer::new(Service {
        batcher,
        limits: FrameLimits::default(),
    })
    .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(service, tokio_stream_listener(listener), shutdown)
        .await
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

/// The edge's client of a cloud worker's `Inference` gRPC service.
#[derive(Debug, Clone)]
pub struct GrpcCloud {
    client: InferenceClient<tonic::transport::Channel>,
    endpoint: String,
    limits: FrameLimits,
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
        })
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
            let response = client
                .predict(PredictRequest {
                    id: String::new(),
                    tensors,
                })
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::InvalidArgument => {
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
