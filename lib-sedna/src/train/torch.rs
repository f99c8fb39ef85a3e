//! The tch backend: trains the model's TorchScript twin with libtorch (the PyPI torch wheel)
//! on the CPU or a CUDA GPU, with libtorch's own optimizers, and hands its parameters to the
//! trainer under the ONNX initializer names, so the trained ONNX file is written exactly as
//! with the candle backend.
//!
//! Names: TorchScript parameter `conv1.weight` is the ONNX initializer `conv1.weight` (the
//! TorchScript-based exporter without constant folding keeps them). A twin parameter without
//! an ONNX initializer of the same name and shape is an error listing both sides. State that
//! is not a parameter (batch-norm running statistics) reaches the ONNX file when the twin
//! exports a method `sedna_buffers() -> Dict[str, Tensor]` returning it by ONNX name; an ONNX
//! file whose BatchNormalization statistics the twin does not provide is refused.

use std::collections::HashMap;
use std::path::Path;

use tch::nn::{OptimizerConfig, VarStore};
use tch::{IValue, Kind, Tensor};

use super::graph::Program;
use super::onnx::OnnxModel;
use super::{
    Backend, Batch, Device, Loss, Optimizer, Parameter, TargetsRef, TrainConfig, TrainError, Values,
};

fn torch_error(e: tch::TchError) -> TrainError {
    TrainError::Backend {
        backend: "tch",
        message: e.to_string(),
    }
}

/// A trainable tensor: its ONNX name, the VarStore key, its shape.
struct Param {
    onnx: String,
    key: String,
    shape: Vec<usize>,
}

pub(crate) struct TchBackend {
    module: tch::TrainableCModule,
    vs: VarStore,
    device: tch::Device,
    params: Vec<Param>,
    /// ONNX names of state the twin reports through `sedna_buffers()`.
    buffers: Vec<(String, Vec<usize>)>,
    sample_shape: Vec<usize>,
    optimizer: Option<tch::nn::Optimizer>,
    anchor: Vec<Tensor>,
}

fn torch_device(device: Device) -> Result<tch::Device, TrainError> {
    match device {
        Device::Cpu => Ok(tch::Device::Cpu),
        Device::Cuda(n) => {
            let available = tch::Cuda::device_count();
            if !tch::Cuda::is_available() || n >= usize::try_from(available).unwrap_or(0) {
                return Err(TrainError::Unavailable(format!(
                    "device cuda:{n} was requested but this machine has {} CUDA device(s) visible to libtorch (no fallback to CPU)",
                    available.max(0)
                )));
            }
            Ok(tch::Device::Cuda(n))
        }
    }
}

impl TchBackend {
    pub(crate) fn new(
        model: &OnnxModel,
        program: &Program,
        twin: &Path,
        device: Device,
        threads: usize,
        sample_shape: &[usize],
    ) -> Result<Self, TrainError> {
        let device = torch_device(device)?;
        tch::set_num_threads(i32::try_from(threads).unwrap_or(1));
        if !twin.is_file() {
            return Err(TrainError::Model(format!(
                "the tch backend trains the model's TorchScript twin, and {} does not exist",
                twin.display()
            )));
        }
        let vs = VarStore::new(device);
        let module = tch::TrainableCModule::load(twin, vs.root()).map_err(|e| {
            TrainError::Model(format!("{}: not a TorchScript module: {e}", twin.display()))
        })?;
        let onnx: HashMap<&str, &[usize]> = model
            .floats
            .iter()
            .map(|f| (f.name.as_str(), f.dims.as_slice()))
            .collect();
        // VarStore keys are the parameter names with '.' replaced by '_'.
        let by_key: HashMap<String, &str> = model
            .floats
            .iter()
            .map(|f| (f.name.replace('.', "_"), f.name.as_str()))
            .collect();
        let mut params = Vec::new();
        let mut unmatched = Vec::new();
        let variables = vs.variables();
        let mut keys: Vec<&String> = variables.keys().collect();
        keys.sort();
        for key in keys {
            let shape: Vec<usize> = variables[key].size().iter().map(|d| *d as usize).collect();
            match by_key.get(key.as_str()) {
                Some(name) if onnx.get(name) == Some(&shape.as_slice()) => params.push(Param {
                    onnx: (*name).to_string(),
                    key: key.clone(),
                    shape,
                }),
                Some(name) => {
                    return Err(TrainError::Model(format!(
                        "twin parameter {name} has shape {shape:?}; the ONNX initializer's is {:?}",
                        onnx.get(name).copied().unwrap_or_default()
                    )));
                }
                None => unmatched.push(key.clone()),
            }
        }
        if !unmatched.is_empty() {
            let mut names: Vec<&str> = model.floats.iter().map(|f| f.name.as_str()).collect();
            names.sort();
            return Err(TrainError::Model(format!(
                "the TorchScript twin's parameters {} have no ONNX initializer of the same name (twin: {}; ONNX: {})",
                unmatched.join(", "),
                variables.keys().cloned().collect::<Vec<_>>().join(", "),
                names.join(", ")
            )));
        }
        // ONNX order, as the candle backend reports them.
        let order = model.file_order();
        params.sort_by_key(|p| order.get(p.onnx.as_str()).copied().unwrap_or(usize::MAX));

        let mut backend = TchBackend {
            module,
            vs,
            device,
            params,
            buffers: Vec::new(),
            sample_shape: sample_shape.to_vec(),
            optimizer: None,
            anchor: Vec::new(),
        };
        let reported = backend.reported_buffers()?;
        for (name, tensor) in &reported {
            let shape: Vec<usize> = tensor.size().iter().map(|d| *d as usize).collect();
            match onnx.get(name.as_str()) {
                Some(dims) if *dims == shape.as_slice() => {
                    backend.buffers.push((name.clone(), shape))
                }
                _ => {
                    return Err(TrainError::Model(format!(
                        "sedna_buffers() reports {name} {shape:?}, which is not an ONNX float initializer of that shape"
                    )));
                }
            }
        }
        // Batch-norm statistics the twin does not report would go stale in the ONNX file.
        for node in model
            .nodes
            .iter()
            .filter(|n| n.op_type == "BatchNormalization")
        {
            for stat in node.input.iter().skip(3).take(2) {
                if onnx.contains_key(stat.as_str()) && !reported.contains_key(stat) {
                    return Err(TrainError::Model(format!(
                        "BatchNormalization statistic {stat} is not reported by the twin; export `sedna_buffers() -> Dict[str, Tensor]` returning it"
                    )));
                }
            }
        }
        let _ = program;
        Ok(backend)
    }

    fn reported_buffers(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let Ok(value) = self.module.method_is::<IValue>("sedna_buffers", &[]) else {
            return Ok(HashMap::new());
        };
        let IValue::GenericDict(entries) = value else {
            return Err(TrainError::Model(
                "sedna_buffers() must return Dict[str, Tensor]".into(),
            ));
        };
        entries
            .into_iter()
            .map(|(k, v)| match (k, v) {
                (IValue::String(k), IValue::Tensor(t)) => Ok((k, t)),
                _ => Err(TrainError::Model(
                    "sedna_buffers() must return Dict[str, Tensor]".into(),
                )),
            })
            .collect()
    }

    fn input(&self, x: &[f32], n: usize) -> Result<Tensor, TrainError> {
        let mut shape = vec![n as i64];
        shape.extend(self.sample_shape.iter().map(|d| *d as i64));
        Tensor::f_from_slice(x)
            .and_then(|t| t.f_view(shape.as_slice()))
            .and_then(|t| t.f_to_device(self.device))
            .map_err(torch_error)
    }

    fn variable(&self, key: &str) -> Result<Tensor, TrainError> {
        self.vs
            .variables()
            .remove(key)
            .ok_or_else(|| TrainError::Model(format!("the twin lost its parameter {key}")))
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, TrainError> {
    let flat = t
        .f_to_device(tch::Device::Cpu)
        .and_then(|t| t.f_to_kind(Kind::Float))
        .and_then(|t| t.f_flatten(0, -1))
        .map_err(torch_error)?;
    Vec::<f32>::try_from(&flat).map_err(torch_error)
}

impl Backend for TchBackend {
    fn name(&self) -> &'static str {
        "tch"
    }

    fn begin(&mut self, config: &TrainConfig) -> Result<(), TrainError> {
        tch::manual_seed(config.seed as i64);
        let wd = config.weight_decay;
        let lr = config.learning_rate;
        let optimizer = match config.optimizer {
            Optimizer::Sgd { momentum, nesterov } => tch::nn::Sgd {
                momentum,
                dampening: 0.0,
                wd,
                nesterov,
            }
            .build(&self.vs, lr),
            Optimizer::Adam { beta1, beta2, eps } => tch::nn::Adam {
                beta1,
                beta2,
                wd,
                eps,
                amsgrad: false,
            }
            .build(&self.vs, lr),
            Optimizer::AdamW { beta1, beta2, eps } => tch::nn::AdamW {
                beta1,
                beta2,
                wd,
                eps,
                amsgrad: false,
            }
            .build(&self.vs, lr),
        }
        .map_err(torch_error)?;
        self.optimizer = Some(optimizer);
        self.anchor = if config.fedprox_mu > 0.0 {
            let mut anchor = Vec::with_capacity(self.params.len());
            for p in &self.params {
                anchor.push(
                    self.variable(&p.key)?
                        .f_detach_copy()
                        .map_err(torch_error)?,
                );
            }
            anchor
        } else {
            Vec::new()
        };
        Ok(())
    }

    fn train_step(
        &mut self,
        batch: &Batch<'_>,
        config: &TrainConfig,
        learning_rate: f64,
    ) -> Result<f64, TrainError> {
        self.module.f_set_train().map_err(torch_error)?;
        let x = self.input(batch.x, batch.n)?;
        let out = self.module.forward_ts(&[x]).map_err(torch_error)?;
        let out = out.f_reshape([batch.n as i64, -1]).map_err(torch_error)?;
        let mut loss = match (config.loss, batch.targets) {
            (Loss::CrossEntropy, TargetsRef::Classes(labels)) => {
                let labels: Vec<i64> = labels.iter().map(|l| i64::from(*l)).collect();
                let labels = Tensor::f_from_slice(&labels)
                    .and_then(|t| t.f_to_device(self.device))
                    .map_err(torch_error)?;
                out.f_log_softmax(-1, Kind::Float)
                    .and_then(|l| l.f_nll_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100))
                    .map_err(torch_error)?
            }
            (Loss::Mse, TargetsRef::Values(values)) => {
                let values = values.as_standard_layout();
                let target =
                    self.input_like(values.as_slice().unwrap_or_default(), values.dim())?;
                out.f_mse_loss(&target, tch::Reduction::Mean)
                    .map_err(torch_error)?
            }
            _ => return Err(TrainError::Data("the loss does not fit the targets".into())),
        };
        let value = loss.f_double_value(&[]).map_err(torch_error)?;
        if !value.is_finite() {
            return Ok(value);
        }
        if config.fedprox_mu > 0.0 {
            // mu/2 · ‖w − w₀‖², whose gradient is mu · (w − w₀).
            for (p, anchor) in self.params.iter().zip(&self.anchor) {
                let w = self.variable(&p.key)?;
                let term = w
                    .f_sub(anchor)
                    .and_then(|d| d.f_square())
                    .and_then(|d| d.f_sum(Kind::Float))
                    .and_then(|d| d.f_mul_scalar(config.fedprox_mu / 2.0))
                    .map_err(torch_error)?;
                loss = loss.f_add(&term).map_err(torch_error)?;
            }
        }
        let optimizer = self
            .optimizer
            .as_mut()
            .ok_or_else(|| TrainError::Model("training step before begin".into()))?;
        optimizer.set_lr(learning_rate);
        optimizer.zero_grad();
        loss.f_backward().map_err(torch_error)?;
        optimizer.step();
        Ok(value)
    }

    fn forward(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>, TrainError> {
        self.module.f_set_eval().map_err(torch_error)?;
        let x = self.input(x, n)?;
        let out = tch::no_grad(|| self.module.forward_ts(&[x])).map_err(torch_error)?;
        to_vec(&out)
    }

    fn parameters(&self) -> Result<Vec<Parameter>, TrainError> {
        let variables = self.vs.variables();
        let mut out = Vec::with_capacity(self.params.len() + self.buffers.len());
        for p in &self.params {
            let t = variables.get(&p.key).ok_or_else(|| {
                TrainError::Model(format!("the twin lost its parameter {}", p.key))
            })?;
            out.push((p.onnx.clone(), p.shape.clone(), to_vec(t)?));
        }
        if !self.buffers.is_empty() {
            let reported = self.reported_buffers()?;
            for (name, shape) in &self.buffers {
                if let Some(t) = reported.get(name) {
                    out.push((name.clone(), shape.clone(), to_vec(t)?));
                }
            }
        }
        Ok(out)
    }

    fn set_parameters(&mut self, values: &[Values]) -> Result<(), TrainError> {
        let mut variables = self.vs.variables();
        let reported = if values
            .iter()
            .any(|(n, _)| self.buffers.iter().any(|(b, _)| b == n))
        {
            self.reported_buffers()?
        } else {
            HashMap::new()
        };
        for (name, new) in values {
            let target = match self.params.iter().find(|p| &p.onnx == name) {
                Some(p) => variables.remove(&p.key),
                None => reported.get(name).map(|t| t.shallow_clone()),
            };
            let Some(mut target) = target else {
                return Err(TrainError::Weights(format!("no trainable tensor {name:?}")));
            };
            let size = target.size();
            let src = Tensor::f_from_slice(new)
                .and_then(|t| t.f_view(size.as_slice()))
                .and_then(|t| t.f_to_device(self.device))
                .map_err(torch_error)?;
            tch::no_grad(|| target.f_copy_(&src)).map_err(torch_error)?;
        }
        Ok(())
    }
}

impl TchBackend {
    fn input_like(&self, values: &[f32], (n, k): (usize, usize)) -> Result<Tensor, TrainError> {
        Tensor::f_from_slice(values)
            .and_then(|t| t.f_view([n as i64, k as i64]))
            .and_then(|t| t.f_to_device(self.device))
            .map_err(torch_error)
    }
}
