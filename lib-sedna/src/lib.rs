//! `sedna`: the library edge-cloud AI apps program against, in Rust and (through
//! `lib-sedna/python`, the pip package `sedna`) in Python. Its concepts are those of Sedna's
//! Python library, so Sedna users feel at home; its weak spots are fixed (binary weights,
//! explicit execution providers, a bounded on-disk queue instead of lost hard examples,
//! credentials from files rather than the environment).
//!
//! | module | what |
//! |---|---|
//! | [`inference`] | ONNX models on ONNX Runtime: explicit providers, input checks, batching, hot reload |
//! | [`hem`] | hard-example mining: Threshold, CrossEntropy, IBT, Random, CloudOnly, EdgeOnly, your own |
//! | [`joint`] | joint inference: edge model + mining + cloud, queue while the cloud is away, stats |
//! | [`cloud`] | the cloud side: dynamic batching, the gRPC service, the edge's gRPC client |
//! | [`weights`] | model weights as named tensors in binary (fp32, fp16, int8) |
//! | [`aggregate`] | FedAvg, FedAvgM, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum |
//! | [`fl`] | the federated-learning client (`Estimator`, round protocol, frames) |
//! | [`config`] | worker configuration from Sedna's environment names; credentials from files |
//! | `report` | (feature `kube`) workers' figures into their workload's status via the local API |
//! | [`storage`] | models and datasets on `s3://` / `file://`, cached by content hash |
//! | [`dataset`] | Sedna's `txt` and `csv` dataset indexes, directories of files, PGM and IDX images |
//! | [`train`] | training ONNX models (candle; tch for GPU clouds): fit, evaluate, weights, save |
//!
//! # Guide
//!
//! ## Inference
//!
//! ONNX Runtime is loaded from the `onnxruntime` wheel `scripts/setup` installs (or
//! `ORT_DYLIB_PATH`). CPU unless asked; a provider asked for and missing is an error.
//!
//! ```
//! use sedna::inference::{Model, Provider, SessionOptions, TensorView};
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits/model.onnx");
//! let model = Model::load(path, &SessionOptions { intra_threads: 1, ..Default::default() })?;
//! let pixels = ndarray::Array2::<f32>::zeros((4, 64)).into_dyn();
//! let out = model.run(&[("input", TensorView::from(pixels.view()))])?;
//! assert_eq!(out.f32("probabilities")?.shape(), &[4, 10]);
//! assert_eq!(out.i64("label")?.len(), 4);
//!
//! let cuda = SessionOptions { providers: vec![Provider::Cuda { device_id: 0 }], ..Default::default() };
//! if let Err(e) = Model::load(path, &cuda) {
//!     // On a machine without CUDA: "execution provider cuda was requested but could not be registered ..."
//!     assert!(e.to_string().contains("no fallback to CPU"));
//! }
//! # Ok::<(), sedna::inference::InferenceError>(())
//! ```
//!
//! ## Hard-example mining
//!
//! ```
//! use sedna::hem::{registry, Input};
//! // As a JointInferenceService's hardExampleMining field sets HEM_NAME / HEM_PARAMETERS:
//! let hem = registry().build_from("CrossEntropy", Some(r#"[{"key": "threshold_cross_entropy", "value": "0.5"}]"#))?;
//! assert!(hem.is_hard(&Input::Probabilities(ndarray::array![0.5f32, 0.5].view())));
//! assert!(!hem.is_hard(&Input::Probabilities(ndarray::array![0.99f32, 0.01].view())));
//! # Ok::<(), sedna::hem::HemError>(())
//! ```
//!
//! ## Joint inference
//!
//! A cloud (here [`joint::serve_http`] on 127.0.0.1) and an edge client; hard examples get
//! the cloud's answer. See [`joint`] for the queue and resending.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use sedna::{hem, inference::{Model, SessionOptions, Tensor}, joint};
//! let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits/model.onnx");
//! let model = Arc::new(Model::load(path, &SessionOptions::default())?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let cloud_url = format!("http://{}", listener.local_addr()?);
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(joint::serve_http(listener, model.clone(), async { let _ = stopped.await; }));
//!
//! let queue_dir = tempfile::tempdir()?;
//! let ji = joint::JointInference::new(
//!     model,
//!     hem::registry().build("CloudOnly", &[])?,
//!     Box::new(joint::HttpCloud::new(&cloud_url, std::time::Duration::from_secs(2))?),
//!     joint::HardExampleQueue::open(queue_dir.path(), joint::QueueLimits::default())?,
//! );
//! let sample = Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1, 64])));
//! let result = ji.inference("frame-1", &[("input".into(), sample)]).await?;
//! assert!(result.is_hard && result.cloud.is_some());
//! assert_eq!(ji.stats().upload_ratio(), 1.0);
//! let _ = stop.send(());
//! server.await??;
//! # Ok(()) }
//! ```
//!
//! ## Federated learning
//!
//! Weights travel in binary; the server aggregates; clients implement [`fl::Estimator`]
//! (a complete example is in [`fl`]).
//!
//! ```
//! use sedna::aggregate::{self, Update};
//! use sedna::weights::{Encoding, Limits, Weights};
//! use ndarray::{ArrayD, IxDyn};
//! let w = |v: f32| Weights::new(vec![("fc".into(), ArrayD::from_elem(IxDyn(&[2]), v))]).unwrap();
//! let wire = w(1.0).encode(Encoding::F16)?;             // 2 bytes per value, not JSON text
//! let received = Weights::decode(&wire, &Limits::default())?;
//! let mut fedavg = aggregate::build("FedAvg", &[]).unwrap();
//! let global = fedavg
//!     .aggregate(&w(0.0), &[Update { weights: received, num_samples: 30 }, Update { weights: w(3.0), num_samples: 10 }])
//!     .unwrap();
//! assert_eq!(global.get("fc").unwrap()[[0]], 1.5);     // (30·1 + 10·3) / 40
//! # Ok::<(), sedna::weights::WeightsError>(())
//! ```
//!
//! ## Configuration, storage, datasets
//!
//! ```
//! use sedna::config::Config;
//! let config = Config::from_lookup(|name| match name {
//!     "BIG_MODEL_IP" => Some("10.0.0.7".into()),
//!     "BIG_MODEL_PORT" => Some("not-a-port".into()),
//!     _ => None,
//! });
//! assert!(config.unwrap_err().to_string().starts_with("BIG_MODEL_PORT=\"not-a-port\""));
//!
//! let table = sedna::dataset::parse_csv(
//!     "temp,label\n21.5,ok\n35,alarm\n".as_bytes(), Some("label"), &[], &Default::default())?;
//! assert_eq!(table.features_f32()?.shape(), &[2, 1]);
//! # Ok::<(), sedna::dataset::DatasetError>(())
//! ```
//!
//! Storage ([`storage::Storage`]) is async: `storage.fetch("s3://models/edge.onnx").await`
//! gives a local path in the content-addressed cache.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod cloud;
pub mod config;
pub mod dataset;
pub mod fl;
pub mod hem;
pub mod inference;
pub mod joint;
#[cfg(feature = "kube")]
pub mod report;
pub mod storage;
pub mod train;
pub mod weights;
