//! Hyperparameters: typed, with defaults, read from Sedna-style `[{key, value}]` parameters
//! (or any key/value pairs) with errors naming the key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::TrainError;

/// The loss function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Softmax cross-entropy on the logits; targets are class indices.
    CrossEntropy,
    /// Mean squared error; targets are values, one per output.
    Mse,
}

/// The optimizer (PyTorch's semantics: `torch.optim.SGD`, `Adam`, `AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// Stochastic gradient descent with momentum (0 for none); weight decay is added to the
    /// gradient (L2).
    Sgd {
        /// Momentum factor.
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// Adam; weight decay is added to the gradient (L2).
    Adam {
        /// β₁.
        beta1: f64,
        /// β₂.
        beta2: f64,
        /// ε.
        eps: f64,
    },
    /// AdamW: Adam with decoupled weight decay.
    AdamW {
        /// β₁.
        beta1: f64,
        /// β₂.
        beta2: f64,
        /// ε.
        eps: f64,
    },
}

/// How the learning rate changes over training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// The same learning rate throughout.
    Constant,
    /// Multiplied by `gamma` every `every_epochs` epochs.
    Step {
        /// Epochs between decays.
        every_epochs: usize,
        /// Factor.
        gamma: f64,
    },
    /// Cosine annealing over all steps, down to `min_lr`.
    Cosine {
        /// The final learning rate.
        min_lr: f64,
    },
}

impl Schedule {
    /// The learning rate at `step` (0-based) of `total_steps`, in `epoch` (0-based).
    pub fn learning_rate(&self, base: f64, epoch: usize, step: usize, total_steps: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step {
                every_epochs,
                gamma,
            } => base * gamma.powi((epoch / every_epochs.max(1)) as i32),
            Schedule::Cosine { min_lr } => {
                let progress = step as f64 / total_steps.max(1) as f64;
                min_lr + (base - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0
            }
        }
    }
}

/// The training backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// candle: pure Rust, trains the ONNX graph itself (CPU).
    #[default]
    Candle,
    /// tch (libtorch): trains the model's TorchScript twin and writes its parameters into the
    /// ONNX file by name (CPU or CUDA). Needs the `tch` cargo feature.
    Tch,
}

impl BackendKind {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Candle => "candle",
            BackendKind::Tch => "tch",
        }
    }
}

/// Where training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU.
    #[default]
    Cpu,
    /// A CUDA GPU by index.
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    pub fn parse(text: &str) -> Result<Device, String> {
        match text {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("{text:?} is not a device (cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How a [`super::Trainer`] is set up: backend, device, threads, which output trains.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainerOptions {
    /// The backend.
    pub backend: BackendKind,
    /// The device (the candle backend runs on the CPU only).
    pub device: Device,
    /// Compute threads; 0 = all cores.
    pub threads: usize,
    /// The model output to train (default: `logits`, else the first float output; a softmax
    /// at the end is left out, so the loss sees the logits).
    pub output: Option<String>,
    /// The TorchScript twin for the tch backend (default: the ONNX file's path with `.pt`).
    pub torchscript: Option<PathBuf>,
}

/// Training hyperparameters. `Default` gives a sensible classification setup (Adam, 1e-3,
/// 5 epochs, batch 64).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Passes over the training data.
    pub epochs: usize,
    /// Stop after this many optimizer steps (all epochs together), if set.
    pub max_steps: Option<usize>,
    /// Samples per step.
    pub batch_size: usize,
    /// Base learning rate.
    pub learning_rate: f64,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Weight decay (L2 for SGD and Adam, decoupled for AdamW).
    pub weight_decay: f64,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// The loss.
    pub loss: Loss,
    /// Seed of shuffling, the validation split and dropout.
    pub seed: u64,
    /// Shuffle the training samples every epoch.
    pub shuffle: bool,
    /// Share of the training data held out for validation (0 = none).
    pub validation_split: f64,
    /// Stop when the validation loss has not improved for this many epochs (the best
    /// weights are kept); needs a validation split.
    pub early_stop_patience: Option<usize>,
    /// FedProx: the proximal term `mu/2 · ‖w − w₀‖²` keeps the weights near those training
    /// started from (0 = off).
    pub fedprox_mu: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 5,
            max_steps: None,
            batch_size: 64,
            learning_rate: 1e-3,
            optimizer: Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            loss: Loss::CrossEntropy,
            seed: 0,
            shuffle: true,
            validation_split: 0.0,
            early_stop_patience: None,
            fedprox_mu: 0.0,
        }
    }
}

/// The hyperparameter keys understood, with what they set.
pub const KEYS: &[(&str, &str)] = &[
    ("epochs", "passes over the data (whole number ≥ 1)"),
    ("max_steps", "stop after this many steps"),
    ("batch_size", "samples per step"),
    ("learning_rate", "base learning rate (alias lr)"),
    ("optimizer", "sgd, adam or adamw"),
    ("momentum", "SGD momentum"),
    ("nesterov", "SGD Nesterov momentum (true/false)"),
    ("beta1", "Adam β₁"),
    ("beta2", "Adam β₂"),
    ("eps", "Adam ε"),
    ("weight_decay", "weight decay"),
    ("lr_schedule", "constant, step or cosine"),
    ("lr_step_epochs", "epochs between step decays"),
    ("lr_gamma", "step decay factor"),
    ("min_lr", "cosine schedule's final learning rate"),
    ("loss", "cross_entropy or mse"),
    ("seed", "seed of shuffling, validation split and dropout"),
    ("shuffle", "shuffle every epoch (true/false)"),
    ("validation_split", "share held out for validation, [0, 1)"),
    (
        "early_stop_patience",
        "epochs without validation improvement before stopping",
    ),
    ("fedprox_mu", "FedProx proximal term (alias mu)"),
    ("backend", "candle or tch"),
    ("device", "cpu, cuda or cuda:N"),
    ("threads", "compute threads (0 = all cores)"),
    ("output", "the model output to train"),
];

fn parse_value<T: std::str::FromStr>(key: &str, value: &str, what: &str) -> Result<T, TrainError> {
    value.trim().parse().map_err(|_| TrainError::Parameter {
        key: key.into(),
        reason: format!("{value:?} is not {what}"),
    })
}

fn check(key: &str, ok: bool, reason: &str) -> Result<(), TrainError> {
    if ok {
        Ok(())
    } else {
        Err(TrainError::Parameter {
            key: key.into(),
            reason: reason.into(),
        })
    }
}

/// A worker's hyperparameters: `base` (Sedna's `PARAMETERS`) plus the environment variables
/// named as a key (Sedna's examples set `epochs`, `batch_size`, `learning_rate` that way),
/// `base` winning.
pub fn parameters_with_env(
    base: &std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    let mut parameters = base.clone();
    for (key, _) in KEYS {
        if let Ok(value) = std::env::var(key) {
            parameters.entry(key.to_string()).or_insert(value);
        }
    }
    parameters
}

/// Reads hyperparameters from key/value pairs (Sedna's `[{key, value}]` list, a worker's
/// round settings, `--param k=v`): the trainer options and the training configuration.
/// An unknown key or a bad value is an error naming the key.
///
/// ```
/// use sedna::train::{parse_parameters, Optimizer};
/// let (options, config) = parse_parameters([("epochs", "3"), ("optimizer", "sgd"), ("momentum", "0.9"), ("lr", "0.05")])?;
/// assert_eq!(config.epochs, 3);
/// assert_eq!(config.optimizer, Optimizer::Sgd { momentum: 0.9, nesterov: false });
/// assert_eq!(options.threads, 0);
/// let err = parse_parameters([("epoch", "3")]).unwrap_err();
/// assert!(err.to_string().starts_with("hyperparameter `epoch`: unknown"));
/// # Ok::<(), sedna::train::TrainError>(())
/// ```
pub fn parse_parameters<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(TrainerOptions, TrainConfig), TrainError> {
    let mut options = TrainerOptions::default();
    let mut config = TrainConfig::default();
    let mut seen = BTreeMap::new();
    for (key, value) in pairs {
        let canonical = match key {
            "lr" => "learning_rate",
            "mu" => "fedprox_mu",
            other => other,
        };
        if !KEYS.iter().any(|(k, _)| *k == canonical) {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            return Err(TrainError::Parameter {
                key: key.into(),
                reason: format!("unknown hyperparameter (known: {})", known.join(", ")),
            });
        }
        if seen.insert(canonical, value).is_some() {
            return Err(TrainError::Parameter {
                key: key.into(),
                reason: "given twice".into(),
            });
        }
    }
    let get = |k: &str| seen.get(k).copied();
    let float = |k: &str| -> Result<Option<f64>, TrainError> {
        get(k)
            .map(|v| {
                let x: f64 = parse_value(k, v, "a number")?;
                check(k, x.is_finite(), "must be finite")?;
                Ok(x)
            })
            .transpose()
    };
    let whole = |k: &str| -> Result<Option<usize>, TrainError> {
        get(k)
            .map(|v| parse_value(k, v, "a whole number"))
            .transpose()
    };
    let boolean = |k: &str| -> Result<Option<bool>, TrainError> {
        get(k)
            .map(|v| match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(TrainError::Parameter {
                    key: k.into(),
                    reason: format!("{v:?} is not true or false"),
                }),
            })
            .transpose()
    };
    if let Some(epochs) = whole("epochs")? {
        check(
            "epochs",
            (1..=1_000_000).contains(&epochs),
            "must be between 1 and 1000000",
        )?;
        config.epochs = epochs;
    }
    if let Some(steps) = whole("max_steps")? {
        check("max_steps", steps >= 1, "must be at least 1")?;
        config.max_steps = Some(steps);
    }
    if let Some(batch) = whole("batch_size")? {
        check(
            "batch_size",
            (1..=1 << 20).contains(&batch),
            "must be between 1 and 1048576",
        )?;
        config.batch_size = batch;
    }
    if let Some(lr) = float("learning_rate")? {
        check("learning_rate", lr > 0.0, "must be positive")?;
        config.learning_rate = lr;
    }
    let beta1 = float("beta1")?.unwrap_or(0.9);
    let beta2 = float("beta2")?.unwrap_or(0.999);
    let eps = float("eps")?.unwrap_or(1e-8);
    check("beta1", (0.0..1.0).contains(&beta1), "must be in [0, 1)")?;
    check("beta2", (0.0..1.0).contains(&beta2), "must be in [0, 1)")?;
    check("eps", eps > 0.0, "must be positive")?;
    let momentum = float("momentum")?.unwrap_or(0.0);
    check(
        "momentum",
        (0.0..1.0).contains(&momentum),
        "must be in [0, 1)",
    )?;
    let nesterov = boolean("nesterov")?.unwrap_or(false);
    let optimizer = get("optimizer").map(|v| v.trim().to_ascii_lowercase());
    config.optimizer = match optimizer.as_deref() {
        None | Some("adam") => Optimizer::Adam { beta1, beta2, eps },
        Some("sgd") => Optimizer::Sgd { momentum, nesterov },
        Some("adamw") => Optimizer::AdamW { beta1, beta2, eps },
        Some(other) => {
            return Err(TrainError::Parameter {
                key: "optimizer".into(),
                reason: format!("{other:?} is not sgd, adam or adamw"),
            });
        }
    };
    for key in ["momentum", "nesterov"] {
        if get(key).is_some() && !matches!(config.optimizer, Optimizer::Sgd { .. }) {
            return Err(TrainError::Parameter {
                key: key.into(),
                reason: "applies to optimizer sgd; set optimizer=sgd".into(),
            });
        }
    }
    for key in ["beta1", "beta2", "eps"] {
        if get(key).is_some() && matches!(config.optimizer, Optimizer::Sgd { .. }) {
            return Err(TrainError::Parameter {
                key: key.into(),
                reason: "applies to optimizers adam and adamw".into(),
            });
        }
    }
    if nesterov && !matches!(config.optimizer, Optimizer::Sgd { momentum, .. } if momentum > 0.0) {
        return Err(TrainError::Parameter {
            key: "nesterov".into(),
            reason: "needs optimizer sgd with momentum > 0".into(),
        });
    }
    if let Some(wd) = float("weight_decay")? {
        check("weight_decay", wd >= 0.0, "must not be negative")?;
        config.weight_decay = wd;
    }
    config.schedule = match get("lr_schedule").map(|v| v.trim().to_ascii_lowercase()) {
        None => Schedule::Constant,
        Some(name) => match name.as_str() {
            "constant" => Schedule::Constant,
            "step" => {
                let every_epochs = whole("lr_step_epochs")?.unwrap_or(1);
                check("lr_step_epochs", every_epochs >= 1, "must be at least 1")?;
                let gamma = float("lr_gamma")?.unwrap_or(0.1);
                check("lr_gamma", gamma > 0.0 && gamma <= 1.0, "must be in (0, 1]")?;
                Schedule::Step {
                    every_epochs,
                    gamma,
                }
            }
            "cosine" => {
                let min_lr = float("min_lr")?.unwrap_or(0.0);
                check("min_lr", min_lr >= 0.0, "must not be negative")?;
                Schedule::Cosine { min_lr }
            }
            _ => {
                return Err(TrainError::Parameter {
                    key: "lr_schedule".into(),
                    reason: format!("{name:?} is not constant, step or cosine"),
                });
            }
        },
    };
    for (key, needs) in [
        ("lr_step_epochs", "step"),
        ("lr_gamma", "step"),
        ("min_lr", "cosine"),
    ] {
        let active = match config.schedule {
            Schedule::Step { .. } => "step",
            Schedule::Cosine { .. } => "cosine",
            Schedule::Constant => "constant",
        };
        if get(key).is_some() && active != needs {
            return Err(TrainError::Parameter {
                key: key.into(),
                reason: format!("applies to lr_schedule {needs}"),
            });
        }
    }
    if let Some(loss) = get("loss") {
        config.loss = match loss.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "cross_entropy" | "crossentropy" | "ce" => Loss::CrossEntropy,
            "mse" => Loss::Mse,
            _ => {
                return Err(TrainError::Parameter {
                    key: "loss".into(),
                    reason: format!("{loss:?} is not cross_entropy or mse"),
                });
            }
        };
    }
    if let Some(seed) = get("seed") {
        config.seed = parse_value("seed", seed, "a whole number")?;
    }
    if let Some(shuffle) = boolean("shuffle")? {
        config.shuffle = shuffle;
    }
    if let Some(split) = float("validation_split")? {
        check(
            "validation_split",
            (0.0..1.0).contains(&split),
            "must be in [0, 1)",
        )?;
        config.validation_split = split;
    }
    if let Some(patience) = whole("early_stop_patience")? {
        check("early_stop_patience", patience >= 1, "must be at least 1")?;
        check(
            "early_stop_patience",
            config.validation_split > 0.0,
            "needs a validation_split > 0",
        )?;
        config.early_stop_patience = Some(patience);
    }
    if let Some(mu) = float("fedprox_mu")? {
        check("fedprox_mu", mu >= 0.0, "must not be negative")?;
        config.fedprox_mu = mu;
    }
    if let Some(backend) = get("backend") {
        options.backend = match backend.trim() {
            "candle" => BackendKind::Candle,
            "tch" | "torch" | "libtorch" => BackendKind::Tch,
            other => {
                return Err(TrainError::Parameter {
                    key: "backend".into(),
                    reason: format!("{other:?} is not candle or tch"),
                });
            }
        };
    }
    if let Some(device) = get("device") {
        options.device = Device::parse(device.trim()).map_err(|reason| TrainError::Parameter {
            key: "device".into(),
            reason,
        })?;
    }
    if let Some(threads) = whole("threads")? {
        check("threads", threads <= 1024, "must be at most 1024")?;
        options.threads = threads;
    }
    if let Some(output) = get("output") {
        options.output = Some(output.trim().to_string());
    }
    Ok((options, config))
}

/// Reads Sedna's JSON form, `[{"key": "epochs", "value": "3"}, …]` (values may be numbers).
pub fn parse_parameters_json(json: &str) -> Result<(TrainerOptions, TrainConfig), TrainError> {
    #[derive(serde::Deserialize)]
    struct Pair {
        key: String,
        value: serde_json::Value,
    }
    let pairs: Vec<Pair> = serde_json::from_str(json).map_err(|e| TrainError::Parameter {
        key: "parameters".into(),
        reason: format!("not a list of {{key, value}}: {e}"),
    })?;
    let pairs: Vec<(String, String)> = pairs
        .into_iter()
        .map(|p| {
            let value = match p.value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (p.key, value)
        })
        .collect();
    parse_parameters(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(pairs: &[(&str, &str)]) -> String {
        parse_parameters(pairs.iter().copied())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_setting_is_read_and_bad_values_name_their_key() {
        let (options, config) = parse_parameters([
            ("epochs", "4"),
            ("batch_size", "32"),
            ("learning_rate", "0.1"),
            ("optimizer", "sgd"),
            ("momentum", "0.9"),
            ("nesterov", "true"),
            ("weight_decay", "5e-4"),
            ("lr_schedule", "step"),
            ("lr_step_epochs", "2"),
            ("lr_gamma", "0.5"),
            ("seed", "7"),
            ("validation_split", "0.1"),
            ("early_stop_patience", "2"),
            ("mu", "0.01"),
            ("backend", "tch"),
            ("device", "cuda:1"),
            ("threads", "2"),
        ])
        .unwrap();
        assert_eq!(
            config.optimizer,
            Optimizer::Sgd {
                momentum: 0.9,
                nesterov: true
            }
        );
        assert_eq!(
            config.schedule,
            Schedule::Step {
                every_epochs: 2,
                gamma: 0.5
            }
        );
        assert_eq!((config.epochs, config.batch_size, config.seed), (4, 32, 7));
        assert_eq!(config.fedprox_mu, 0.01);
        assert_eq!(config.early_stop_patience, Some(2));
        assert_eq!(options.backend, BackendKind::Tch);
        assert_eq!(options.device, Device::Cuda(1));

        assert_eq!(
            err(&[("epochs", "ten")]),
            "hyperparameter `epochs`: \"ten\" is not a whole number"
        );
        assert_eq!(
            err(&[("epochs", "0")]),
            "hyperparameter `epochs`: must be between 1 and 1000000"
        );
        assert_eq!(
            err(&[("learning_rate", "-1")]),
            "hyperparameter `learning_rate`: must be positive"
        );
        assert_eq!(
            err(&[("optimizer", "rmsprop")]),
            "hyperparameter `optimizer`: \"rmsprop\" is not sgd, adam or adamw"
        );
        assert_eq!(
            err(&[("momentum", "0.9")]),
            "hyperparameter `momentum`: applies to optimizer sgd; set optimizer=sgd"
        );
        assert_eq!(
            err(&[("early_stop_patience", "3")]),
            "hyperparameter `early_stop_patience`: needs a validation_split > 0"
        );
        assert_eq!(
            err(&[("min_lr", "0.1")]),
            "hyperparameter `min_lr`: applies to lr_schedule cosine"
        );
        assert_eq!(
            err(&[("device", "tpu")]),
            "hyperparameter `device`: \"tpu\" is not a device (cpu, cuda or cuda:N)"
        );
        assert_eq!(
            err(&[("lr", "0.1"), ("learning_rate", "0.2")]),
            "hyperparameter `learning_rate`: given twice"
        );
        assert!(err(&[("learnin_rate", "1")]).contains("unknown hyperparameter (known: epochs, "));
    }

    #[test]
    fn sedna_json_parameters_are_read() {
        let (_, config) = parse_parameters_json(
            r#"[{"key": "epochs", "value": "2"}, {"key": "batch_size", "value": 16}]"#,
        )
        .unwrap();
        assert_eq!((config.epochs, config.batch_size), (2, 16));
        assert!(
            parse_parameters_json("{}")
                .unwrap_err()
                .to_string()
                .contains("`parameters`")
        );
    }

    #[test]
    fn schedules_follow_their_formulas() {
        let cosine = Schedule::Cosine { min_lr: 0.0 };
        assert_eq!(cosine.learning_rate(1.0, 0, 0, 100), 1.0);
        assert!((cosine.learning_rate(1.0, 0, 50, 100) - 0.5).abs() < 1e-12);
        let step = Schedule::Step {
            every_epochs: 2,
            gamma: 0.1,
        };
        assert_eq!(step.learning_rate(1.0, 1, 0, 10), 1.0);
        assert!((step.learning_rate(1.0, 4, 0, 10) - 0.01).abs() < 1e-12);
    }
}
