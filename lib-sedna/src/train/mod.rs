//! Training ONNX models: the [`Trainer`] loads a model, trains it on a dataset, evaluates it
//! and writes a new ONNX file that differs from the original only in the values of its float
//! initializers — so edge inference (ONNX Runtime) runs it exactly as before, federated
//! averaging combines initializers by name, and incremental learning deploys the new file.
//!
//! Two backends, one training loop (epochs, batches, seeded shuffling, learning-rate
//! schedule, validation and early stopping, FedProx, progress events):
//! - [`BackendKind::Candle`] (default, pure Rust): interprets the ONNX graph itself with
//!   candle tensors and their autograd. Trains Gemm, MatMul, Add/Sub/Mul/Div, Conv, Relu,
//!   LeakyRelu, Sigmoid, Tanh, MaxPool, AveragePool, GlobalAveragePool, Flatten, Reshape,
//!   Transpose, Softmax, LogSoftmax, Dropout and Identity graphs (MLPs, small CNNs); any other
//!   operator is an error naming it and its node, before training starts.
//! - [`BackendKind::Tch`] (cargo feature `tch`; libtorch from the PyPI torch wheel): trains
//!   the model's TorchScript twin (`model.pt` beside `model.onnx`) on the CPU or a CUDA GPU
//!   and copies its parameters into the ONNX file by name (models candle cannot train, e.g.
//!   with batch normalization).
//!
//! ```
//! use sedna::train::{parse_parameters, TrainData, Trainer, TrainerOptions};
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/mnist");
//! let data = TrainData::load(format!("{dir}/test-images.idx3-ubyte").as_ref(), &Default::default())?;
//! let (train, test) = data.split(0.5, 0);
//! let mut trainer = Trainer::load(format!("{dir}/mlp/init.onnx"), &TrainerOptions::default())?;
//! let (_, config) = parse_parameters([("epochs", "2"), ("batch_size", "32")])?;
//! let report = trainer.fit(&train, &config, &mut |_progress| {})?;
//! assert_eq!(report.epochs, 2);
//! let evaluation = trainer.evaluate(&test)?;
//! assert!(evaluation.accuracy.unwrap() > 0.8);
//! let out = tempfile::tempdir()?;
//! trainer.save(out.path().join("trained.onnx"))?; // same graph, new weights
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod candle;
mod config;
mod data;
mod graph;
mod kernels;
mod metrics;
mod onnx;
#[cfg(feature = "tch")]
mod torch;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{Array2, ArrayD, ArrayView2, IxDyn};
use rand::SeedableRng;
use rand::seq::SliceRandom;

pub use config::{
    BackendKind, Device, KEYS, Loss, Optimizer, Schedule, TrainConfig, TrainerOptions,
    parameters_with_env, parse_parameters, parse_parameters_json,
};
use data::TargetsRef;
pub use data::{Targets, TrainData, in_first_split};
pub use metrics::{ClassMetrics, Evaluation};
pub use onnx::{MAX_MODEL_BYTES, MAX_NODES};

use crate::weights::Weights;

/// Training errors. Only I/O errors are retryable; the rest need a different model, dataset
/// or setting.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The file is not a model the trainer can read.
    #[error("bad model: {0}")]
    Model(String),
    /// An operator on the trained path cannot be trained by the chosen backend.
    #[error("operator {op} (node `{node}`) cannot be trained: {reason}")]
    UnsupportedOp {
        /// The operator (with its domain when not ONNX's default).
        op: String,
        /// The node's name (or its first output when unnamed).
        node: String,
        /// Why.
        reason: String,
    },
    /// A hyperparameter is unknown or has a bad value.
    #[error("hyperparameter `{key}`: {reason}")]
    Parameter {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The data does not fit the model (shape, labels) or is malformed.
    #[error("bad training data: {0}")]
    Data(String),
    /// A dataset file could not be parsed.
    #[error(transparent)]
    Dataset(#[from] crate::dataset::DatasetError),
    /// Weights given to `set_weights` do not match the model.
    #[error("weights do not match the model: {0}")]
    Weights(String),
    /// The backend or device asked for is not available here.
    #[error("{0}")]
    Unavailable(String),
    /// The backend failed while computing (a tensor error).
    #[error("{backend} failed: {message}")]
    Backend {
        /// The backend.
        backend: &'static str,
        /// Its message.
        message: String,
    },
    /// Training diverged (the loss is not finite).
    #[error(
        "training diverged at epoch {epoch}, step {step}: the loss is {loss}; lower the learning rate"
    )]
    Diverged {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step.
        step: usize,
        /// The loss.
        loss: f64,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl TrainError {
    /// Whether trying again unchanged can succeed: only for I/O errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            TrainError::Io { .. } => true,
            TrainError::Dataset(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// What the training loop reports as it goes (for logs, statuses and progress bars).
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// One optimizer step done.
    Step {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step over the whole run.
        step: usize,
        /// Steps the run will take (at most).
        total_steps: usize,
        /// The batch's loss.
        loss: f64,
        /// The learning rate used.
        learning_rate: f64,
        /// Training speed so far in this epoch.
        samples_per_sec: f64,
    },
    /// One epoch done.
    Epoch(EpochSummary),
}

/// The figures of one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochSummary {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Validation loss, when there is a validation split.
    pub validation_loss: Option<f64>,
    /// Validation accuracy (classification with a validation split).
    pub validation_accuracy: Option<f64>,
    /// Training speed over the epoch.
    pub samples_per_sec: f64,
    /// Seconds the epoch took.
    pub seconds: f64,
}

/// The outcome of [`Trainer::fit`].
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// Epochs run.
    pub epochs: usize,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Samples trained on (per epoch).
    pub num_samples: usize,
    /// Per-epoch figures.
    pub history: Vec<EpochSummary>,
    /// Whether early stopping ended training (the best epoch's weights were restored).
    pub stopped_early: bool,
    /// The epoch whose weights the trainer holds now (the last, or the best validation epoch).
    pub best_epoch: usize,
    /// Mean training speed.
    pub samples_per_sec: f64,
}

/// One batch handed to a backend: `n` samples of the model's input shape, flattened.
pub(crate) struct Batch<'a> {
    pub(crate) x: &'a [f32],
    pub(crate) n: usize,
    pub(crate) targets: TargetsRef<'a>,
}

/// A trainable tensor as a backend reports it: name, shape, values.
pub(crate) type Parameter = (String, Vec<usize>, Vec<f32>);
/// New values for a tensor, by name.
pub(crate) type Values = (String, Vec<f32>);

/// What a backend does; the loop, the data handling and the metrics are shared.
pub(crate) trait Backend: Send {
    /// The backend's name (for errors and reports).
    fn name(&self) -> &'static str;
    /// Starts a training run: fresh optimizer state, the FedProx anchor (the weights now),
    /// the dropout seed.
    fn begin(&mut self, config: &TrainConfig) -> Result<(), TrainError>;
    /// One optimizer step on a batch; returns the batch's loss.
    fn train_step(
        &mut self,
        batch: &Batch<'_>,
        config: &TrainConfig,
        learning_rate: f64,
    ) -> Result<f64, TrainError>;
    /// The trained output (logits) for `n` samples, in inference mode: `n × width` values.
    fn forward(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>, TrainError>;
    /// The trainable parameters: name, shape, values (ONNX initializer names, file order).
    fn parameters(&self) -> Result<Vec<Parameter>, TrainError>;
    /// Replaces parameters by name (all names and shapes already checked).
    fn set_parameters(&mut self, values: &[Values]) -> Result<(), TrainError>;
}

/// The trained output's width per sample (classes, or regression targets), from one
/// forward pass on zeros.
fn output_width(backend: &mut dyn Backend, sample_len: usize) -> Result<usize, TrainError> {
    Ok(backend.forward(&vec![0.0; sample_len], 1)?.len())
}

/// A backend set up for a model: its program, per-sample input shape and the backend.
type Built = (graph::Program, Vec<usize>, Box<dyn Backend>);

/// Trains one ONNX model. See the [module documentation](self).
pub struct Trainer {
    model: onnx::OnnxModel,
    program: graph::Program,
    /// Per-sample input shape the backend is fed.
    sample_shape: Vec<usize>,
    width: usize,
    backend: Box<dyn Backend>,
    pool: rayon::ThreadPool,
    options: TrainerOptions,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("backend", &self.backend.name())
            .field("input", &self.program.input.name)
            .field("output", &self.program.output)
            .field("parameters", &self.program.params)
            .finish()
    }
}

impl Trainer {
    /// Loads an ONNX model for training.
    pub fn load(path: impl AsRef<Path>, options: &TrainerOptions) -> Result<Trainer, TrainError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut options = options.clone();
        if options.backend == BackendKind::Tch && options.torchscript.is_none() {
            options.torchscript = Some(path.with_extension("pt"));
        }
        Self::from_bytes(bytes, &options)
    }

    /// Reads a model from its bytes (the tch backend needs `options.torchscript`).
    pub fn from_bytes(bytes: Vec<u8>, options: &TrainerOptions) -> Result<Trainer, TrainError> {
        let model = onnx::OnnxModel::parse(bytes)?;
        let threads = if options.threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            options.threads
        };
        // candle computes in this pool. libtorch has its own intra-op threads (set to
        // `threads` by the tch backend), whose OpenMP team belongs to the calling thread: one
        // calling thread, or every pool thread would bring a team of its own.
        let pool_threads = match options.backend {
            BackendKind::Candle => threads,
            BackendKind::Tch => 1,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(pool_threads)
            .thread_name(|i| format!("sedna-train-{i}"))
            .build()
            .map_err(|e| {
                TrainError::Unavailable(format!("cannot start {threads} training threads: {e}"))
            })?;
        let (program, sample_shape, backend): Built = match options.backend {
            BackendKind::Candle => {
                if options.device != Device::Cpu {
                    return Err(TrainError::Unavailable(format!(
                        "the candle backend trains on the CPU only; device {} needs the tch backend",
                        options.device
                    )));
                }
                let program = graph::Program::build(&model, options.output.as_deref())?;
                let shape = Self::fixed_sample_shape(&program)?;
                let backend = candle::CandleBackend::new(&model, &program, &shape)?;
                (program, shape, Box::new(backend))
            }
            BackendKind::Tch => Self::tch_backend(&model, options, threads)?,
        };
        let mut backend = backend;
        let width =
            pool.install(|| output_width(backend.as_mut(), sample_shape.iter().product()))?;
        Ok(Trainer {
            model,
            program,
            sample_shape,
            width,
            backend,
            pool,
            options: TrainerOptions {
                threads,
                ..options.clone()
            },
        })
    }

    #[cfg(feature = "tch")]
    fn tch_backend(
        model: &onnx::OnnxModel,
        options: &TrainerOptions,
        threads: usize,
    ) -> Result<Built, TrainError> {
        let program = graph::Program::describe(model, options.output.as_deref())?;
        let shape = Self::fixed_sample_shape(&program)?;
        let twin = options.torchscript.as_deref().ok_or_else(|| {
            TrainError::Model(
                "the tch backend needs the model's TorchScript twin (torchscript option)".into(),
            )
        })?;
        let backend =
            torch::TchBackend::new(model, &program, twin, options.device, threads, &shape)?;
        Ok((program, shape, Box::new(backend)))
    }

    #[cfg(not(feature = "tch"))]
    fn tch_backend(_: &onnx::OnnxModel, _: &TrainerOptions, _: usize) -> Result<Built, TrainError> {
        Err(TrainError::Unavailable(
            "the tch backend is not built in: build lib-sedna with the cargo feature `tch` (and torch in .venv)".into(),
        ))
    }

    fn fixed_sample_shape(program: &graph::Program) -> Result<Vec<usize>, TrainError> {
        program.sample_shape().ok_or_else(|| {
            TrainError::Model(format!(
                "the model's input {:?} has dimensions {:?}: every dimension after the batch must be fixed",
                program.input.name,
                program.input.dims
            ))
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> BackendKind {
        self.options.backend
    }

    /// The options the trainer runs with (threads resolved).
    pub fn options(&self) -> &TrainerOptions {
        &self.options
    }

    /// The data input's name and its per-sample shape.
    pub fn input(&self) -> (&str, &[usize]) {
        (&self.program.input.name, &self.sample_shape)
    }

    /// The trained output's name and its width per sample (classes for a classifier).
    pub fn output(&self) -> (&str, usize) {
        (&self.program.output, self.width)
    }

    fn check_data(&self, data: &TrainData, loss: Option<Loss>) -> Result<(), TrainError> {
        let want: usize = self.sample_shape.iter().product();
        if data.sample_len() != want {
            return Err(TrainError::Data(format!(
                "the samples have {} values but the model's input `{}` takes [N, {}] ({want} values per sample)",
                data.sample_len(),
                self.program.input.name,
                self.sample_shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        match (data.targets(), loss) {
            (Targets::Classes(labels), None | Some(Loss::CrossEntropy)) => {
                if let Some(max) = labels.iter().max()
                    && *max as usize >= self.width
                {
                    return Err(TrainError::Data(format!(
                        "label {max} does not fit the model's output `{}` of {} classes",
                        self.program.output, self.width
                    )));
                }
            }
            (Targets::Values(values), None | Some(Loss::Mse)) => {
                if values.ncols() != self.width {
                    return Err(TrainError::Data(format!(
                        "the targets have {} values per sample but the model's output `{}` has {}",
                        values.ncols(),
                        self.program.output,
                        self.width
                    )));
                }
            }
            (Targets::Classes(_), Some(Loss::Mse)) => {
                return Err(TrainError::Data(
                    "loss mse needs target values, not class labels".into(),
                ));
            }
            (Targets::Values(_), Some(Loss::CrossEntropy)) => {
                return Err(TrainError::Data(
                    "loss cross_entropy needs class labels, not target values".into(),
                ));
            }
        }
        Ok(())
    }

    /// Trains on `data` with `config`, reporting progress to `progress`. With a validation
    /// split and early stopping, the best epoch's weights are kept.
    pub fn fit(
        &mut self,
        data: &TrainData,
        config: &TrainConfig,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<FitReport, TrainError> {
        if config.validation_split > 0.0 {
            let (train, validation) = data.split(config.validation_split, config.seed);
            self.fit_validated(
                &train,
                Some(&validation),
                &TrainConfig {
                    validation_split: 0.0,
                    ..config.clone()
                },
                progress,
            )
        } else {
            self.fit_validated(data, None, config, progress)
        }
    }

    /// Trains on `train` and evaluates `validation` (a held-out set of your own) after every
    /// epoch: its loss and accuracy are in the epoch summaries, and early stopping watches it.
    pub fn fit_validated(
        &mut self,
        train: &TrainData,
        validation: Option<&TrainData>,
        config: &TrainConfig,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<FitReport, TrainError> {
        if config.validation_split > 0.0 && validation.is_some() {
            return Err(TrainError::Parameter {
                key: "validation_split".into(),
                reason: "validation data is given; a split of the training data would be a second validation set".into(),
            });
        }
        if config.early_stop_patience.is_some() && validation.is_none() {
            return Err(TrainError::Parameter {
                key: "early_stop_patience".into(),
                reason: "needs validation data or a validation_split > 0".into(),
            });
        }
        self.check_data(train, Some(config.loss))?;
        if let Some(v) = validation {
            self.check_data(v, Some(config.loss))?;
        }
        let pool = &self.pool;
        let backend = self.backend.as_mut();
        let width = self.width;
        fit_loop(pool, backend, width, train, validation, config, progress)
    }

    /// Evaluates on `data`: loss, and for classification accuracy, per-class precision,
    /// recall and F1, and the confusion matrix.
    pub fn evaluate(&mut self, data: &TrainData) -> Result<Evaluation, TrainError> {
        self.check_data(data, None)?;
        let outputs = self.predict(data.features())?;
        Ok(metrics::evaluate(outputs.view(), data.targets().as_ref()))
    }

    /// The trained output (logits for a classifier) for each row of `features`, in inference
    /// mode (dropout off).
    pub fn predict(&mut self, features: ArrayView2<'_, f32>) -> Result<Array2<f32>, TrainError> {
        let want: usize = self.sample_shape.iter().product();
        if features.ncols() != want {
            return Err(TrainError::Data(format!(
                "the samples have {} values but the model's input takes {want}",
                features.ncols()
            )));
        }
        let features = features.as_standard_layout();
        let flat = features.as_slice().unwrap_or_default();
        let n = features.nrows();
        let backend = self.backend.as_mut();
        let width = self.width;
        let values = self.pool.install(|| -> Result<Vec<f32>, TrainError> {
            let mut out = Vec::with_capacity(n * width);
            for start in (0..n).step_by(EVAL_BATCH) {
                let end = (start + EVAL_BATCH).min(n);
                out.extend(backend.forward(&flat[start * want..end * want], end - start)?);
            }
            Ok(out)
        })?;
        Array2::from_shape_vec((n, width), values).map_err(|e| TrainError::Backend {
            backend: self.backend.name(),
            message: e.to_string(),
        })
    }

    /// The trainable weights as named tensors (the ONNX initializer names).
    pub fn weights(&self) -> Result<Weights, TrainError> {
        let tensors = self
            .backend
            .parameters()?
            .into_iter()
            .map(|(name, shape, values)| {
                ArrayD::from_shape_vec(IxDyn(&shape), values)
                    .map(|a| (name, a))
                    .map_err(|e| TrainError::Weights(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Weights::new(tensors).map_err(|e| TrainError::Weights(e.to_string()))
    }

    /// Replaces weights by name (from an aggregator). Every name must be a trainable
    /// parameter with the same shape; parameters not named keep their values.
    pub fn set_weights(&mut self, weights: &Weights) -> Result<(), TrainError> {
        let current = self.backend.parameters()?;
        let mut values = Vec::with_capacity(weights.len());
        for (name, tensor) in weights.tensors() {
            let Some((_, shape, _)) = current.iter().find(|(n, _, _)| n == name) else {
                let known: Vec<&str> = current.iter().map(|(n, _, _)| n.as_str()).collect();
                return Err(TrainError::Weights(format!(
                    "the model has no trainable tensor {name:?} (it has: {})",
                    known.join(", ")
                )));
            };
            if tensor.shape() != shape.as_slice() {
                return Err(TrainError::Weights(format!(
                    "{name:?} has shape {:?}; the model's is {shape:?}",
                    tensor.shape()
                )));
            }
            if tensor.iter().any(|v| !v.is_finite()) {
                return Err(TrainError::Weights(format!(
                    "{name:?} holds a value that is not finite"
                )));
            }
            values.push((name.clone(), tensor.iter().copied().collect()));
        }
        self.backend.set_parameters(&values)
    }

    /// The trained model as ONNX bytes: the original file with new initializer values.
    pub fn to_onnx(&self) -> Result<Vec<u8>, TrainError> {
        let parameters = self.backend.parameters()?;
        self.model.with_values(
            parameters
                .iter()
                .map(|(n, _, v)| (n.as_str(), v.as_slice())),
        )
    }

    /// Writes the trained model (atomically: a temporary file renamed into place).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TrainError> {
        let path = path.as_ref();
        let bytes = self.to_onnx()?;
        let io = |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        std::io::Write::write_all(&mut tmp, &bytes).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// The original model's bytes.
    pub fn original_onnx(&self) -> &[u8] {
        self.model.bytes()
    }
}

/// Samples per forward pass when predicting.
const EVAL_BATCH: usize = 128;

/// The training loop. It runs on the caller's thread (so `progress` need not be `Send`); the
/// backend's work runs in the trainer's thread pool.
fn fit_loop(
    pool: &rayon::ThreadPool,
    backend: &mut dyn Backend,
    width: usize,
    train: &TrainData,
    validation: Option<&TrainData>,
    config: &TrainConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<FitReport, TrainError> {
    if config.batch_size == 0 || config.epochs == 0 {
        return Err(TrainError::Parameter {
            key: "epochs".into(),
            reason: "epochs and batch_size must be at least 1".into(),
        });
    }
    pool.install(|| backend.begin(config))?;
    let n = train.len();
    let steps_per_epoch = n.div_ceil(config.batch_size);
    let total_steps = config
        .max_steps
        .map_or(steps_per_epoch * config.epochs, |m| {
            m.min(steps_per_epoch * config.epochs)
        });
    let features = train.features();
    let flat = features.as_slice().unwrap_or_default();
    let sample_len = train.sample_len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = Vec::with_capacity(config.batch_size * sample_len);
    let mut history = Vec::new();
    let mut step = 0;
    let mut best: Option<(f64, usize, Vec<Values>)> = None;
    let mut stopped_early = false;
    let started = Instant::now();
    let mut trained_samples = 0usize;
    'epochs: for epoch in 0..config.epochs {
        if config.shuffle {
            order.shuffle(&mut rng);
        }
        let epoch_start = Instant::now();
        let mut loss_sum = 0.0;
        let mut batches = 0usize;
        let mut epoch_samples = 0usize;
        for chunk in order.chunks(config.batch_size) {
            if step == total_steps {
                break;
            }
            x.clear();
            for &i in chunk {
                x.extend_from_slice(&flat[i * sample_len..(i + 1) * sample_len]);
            }
            let batch_targets = train.targets().gather(chunk);
            let batch = Batch {
                x: &x,
                n: chunk.len(),
                targets: batch_targets.as_ref(),
            };
            let lr = config
                .schedule
                .learning_rate(config.learning_rate, epoch, step, total_steps);
            let loss = pool.install(|| backend.train_step(&batch, config, lr))?;
            step += 1;
            if !loss.is_finite() {
                return Err(TrainError::Diverged {
                    epoch: epoch + 1,
                    step,
                    loss,
                });
            }
            loss_sum += loss;
            batches += 1;
            epoch_samples += chunk.len();
            progress(&Progress::Step {
                epoch: epoch + 1,
                step,
                total_steps,
                loss,
                learning_rate: lr,
                samples_per_sec: epoch_samples as f64
                    / epoch_start.elapsed().as_secs_f64().max(1e-9),
            });
        }
        if batches == 0 {
            break;
        }
        trained_samples += epoch_samples;
        let seconds = epoch_start.elapsed().as_secs_f64();
        let (validation_loss, validation_accuracy) = match validation {
            Some(v) => {
                let outputs = pool.install(|| predict_all(backend, v, width))?;
                let e = metrics::evaluate(outputs.view(), v.targets().as_ref());
                (Some(e.loss), e.accuracy)
            }
            None => (None, None),
        };
        let summary = EpochSummary {
            epoch: epoch + 1,
            train_loss: loss_sum / batches as f64,
            validation_loss,
            validation_accuracy,
            samples_per_sec: epoch_samples as f64 / seconds.max(1e-9),
            seconds,
        };
        progress(&Progress::Epoch(summary.clone()));
        history.push(summary);
        if let (Some(patience), Some(loss)) = (config.early_stop_patience, validation_loss) {
            let improved = best.as_ref().is_none_or(|(b, _, _)| loss < *b);
            if improved {
                let snapshot = backend
                    .parameters()?
                    .into_iter()
                    .map(|(name, _, values)| (name, values))
                    .collect();
                best = Some((loss, epoch + 1, snapshot));
            } else if best
                .as_ref()
                .is_some_and(|(_, e, _)| epoch + 1 - e >= patience)
            {
                stopped_early = true;
                break 'epochs;
            }
        }
        if step == total_steps {
            break;
        }
    }
    let mut best_epoch = history.len();
    if let Some((_, epoch, snapshot)) = best
        && epoch != history.len()
    {
        pool.install(|| backend.set_parameters(&snapshot))?;
        best_epoch = epoch;
    }
    Ok(FitReport {
        epochs: history.len(),
        steps: step,
        num_samples: n,
        history,
        stopped_early,
        best_epoch,
        samples_per_sec: trained_samples as f64 / started.elapsed().as_secs_f64().max(1e-9),
    })
}

fn predict_all(
    backend: &mut dyn Backend,
    data: &TrainData,
    width: usize,
) -> Result<Array2<f32>, TrainError> {
    let features = data.features();
    let flat = features.as_slice().unwrap_or_default();
    let (n, f) = (data.len(), data.sample_len());
    let mut out = Vec::with_capacity(n * width);
    for start in (0..n).step_by(EVAL_BATCH) {
        let end = (start + EVAL_BATCH).min(n);
        out.extend(backend.forward(&flat[start * f..end * f], end - start)?);
    }
    Array2::from_shape_vec((n, width), out).map_err(|e| TrainError::Backend {
        backend: backend.name(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, IxDyn};

    use super::onnx::build::*;
    use super::*;
    use crate::inference::{Model, SessionOptions, TensorView};

    fn config(pairs: &[(&str, &str)]) -> TrainConfig {
        parse_parameters(pairs.iter().copied()).unwrap().1
    }

    fn candle() -> TrainerOptions {
        TrainerOptions {
            threads: 2,
            ..Default::default()
        }
    }

    /// `x` [N, 1, 4, 4] → AveragePool 2x2 → Reshape [-1, 4] → MatMul + Add → Sigmoid →
    /// Dropout 0.1 → MatMul + Add → Identity → `y` [N, 1].
    fn regression_model() -> Vec<u8> {
        let w1: Vec<f32> = (0..32)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
            .collect();
        let w2: Vec<f32> = (0..8).map(|i| ((i * 5 % 7) as f32 - 3.0) / 10.0).collect();
        model(
            vec![
                node(
                    "AveragePool",
                    "pool",
                    &["x"],
                    &["pooled"],
                    vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
                ),
                node("Reshape", "flat", &["pooled", "shape"], &["flat"], vec![]),
                node("MatMul", "mm1", &["flat", "w1"], &["h0"], vec![]),
                node("Add", "add1", &["h0", "b1"], &["h1"], vec![]),
                node("Sigmoid", "sigmoid", &["h1"], &["h2"], vec![]),
                node("Dropout", "dropout", &["h2", "ratio"], &["h3"], vec![]),
                node("MatMul", "mm2", &["h3", "w2"], &["o0"], vec![]),
                node("Add", "add2", &["o0", "b2"], &["o1"], vec![]),
                node("Identity", "id", &["o1"], &["y"], vec![]),
            ],
            vec![
                int64_init("shape", &[-1, 4]),
                float_init("w1", &[4, 8], &w1),
                float_init("b1", &[8], &[0.0; 8]),
                float_init("ratio", &[], &[0.1]),
                float_init("w2", &[8, 1], &w2),
                float_init("b2", &[1], &[0.0]),
            ],
            vec![value("x", &[None, Some(1), Some(4), Some(4)])],
            vec![value("y", &[None, Some(1)])],
        )
    }

    /// A regression graph written here with several operators the CNN does not use
    /// (MatMul, Add, Reshape, AveragePool, Dropout, Sigmoid, Identity), trained with MSE.
    #[test]
    fn a_regression_graph_of_other_operators_trains_with_mse_and_saves() {
        let bytes = regression_model();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("regression.onnx");
        std::fs::write(&path, &bytes).unwrap();
        let mut trainer = Trainer::load(&path, &candle()).unwrap();
        assert_eq!(trainer.input(), ("x", &[1, 4, 4][..]));
        assert_eq!(trainer.output(), ("y", 1));

        // Target: the mean of the image's top-left quadrant minus the bottom-right one.
        let n = 512;
        let mut rng = 1u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 40) as f32 / (1u64 << 24) as f32
        };
        let x = Array2::from_shape_fn((n, 16), |_| next());
        let y = Array2::from_shape_fn((n, 1), |(i, _)| {
            let q = |r0: usize, c0: usize| {
                (0..2)
                    .flat_map(|r| (0..2).map(move |c| (r0 + r) * 4 + c0 + c))
                    .map(|j| x[[i, j]])
                    .sum::<f32>()
                    / 4.0
            };
            q(0, 0) - q(2, 2)
        });
        let data = TrainData::regression(x, y).unwrap();
        let before = trainer.evaluate(&data).unwrap().loss;
        let c = config(&[
            ("loss", "mse"),
            ("epochs", "60"),
            ("batch_size", "32"),
            ("learning_rate", "0.01"),
        ]);
        trainer.fit(&data, &c, &mut |_| {}).unwrap();
        let after = trainer.evaluate(&data).unwrap();
        assert!(after.accuracy.is_none());
        assert!(after.loss < before / 20.0, "MSE {before} -> {}", after.loss);

        // Saved and run by ONNX Runtime: the same outputs (dropout is off outside training).
        let saved = dir.path().join("trained.onnx");
        trainer.save(&saved).unwrap();
        let ours = trainer.predict(data.features()).unwrap();
        let session = Model::load(&saved, &SessionOptions::default()).unwrap();
        let x = data
            .features()
            .to_owned()
            .into_shape_with_order(IxDyn(&[n, 1, 4, 4]))
            .unwrap();
        let outputs = session.run(&[("x", TensorView::from(x.view()))]).unwrap();
        let theirs = outputs.f32("y").unwrap();
        let delta = ours
            .iter()
            .zip(theirs.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(delta <= 1e-5, "ort differs by {delta}");
    }
}
