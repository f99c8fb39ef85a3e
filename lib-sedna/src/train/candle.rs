//! The candle backend: interprets the training [`Program`] with candle tensors, lets candle's
//! autograd compute the gradients, and updates the parameters with PyTorch's optimizer
//! formulas (SGD with momentum and Nesterov, Adam, AdamW; L2 or decoupled weight decay;
//! FedProx's proximal gradient). Runs on the CPU, inside the trainer's thread pool.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{RngExt, SeedableRng};

use super::graph::{Op, Program, Step};
use super::kernels;
use super::onnx::OnnxModel;
use super::{
    Backend, Batch, Loss, Optimizer, Parameter, TargetsRef, TrainConfig, TrainError, Values,
};

/// Per-parameter optimizer state.
enum Moments {
    None,
    Momentum(Tensor),
    Adam { m: Tensor, v: Tensor },
}

/// How a step runs after fusion.
#[derive(Debug, Clone, PartialEq)]
enum Fused {
    /// As it is.
    No,
    /// Not at all: a later step applies it.
    Skip,
    /// A MaxPool that applies the ReLU before it itself, reading the ReLU's input.
    ReluInput(String),
}

/// Finds ReLU → MaxPool pairs where the ReLU's output feeds only the pool: the pool applies
/// the ReLU (as `relu(max)`, a quarter of the work) and the ReLU step is skipped.
fn fuse(program: &Program) -> Vec<Fused> {
    let mut fused = vec![Fused::No; program.steps.len()];
    for (i, step) in program.steps.iter().enumerate() {
        if !matches!(step.op, Op::MaxPool { .. }) {
            continue;
        }
        let Some(input) = step.inputs.first().and_then(|n| n.as_deref()) else {
            continue;
        };
        let Some(relu) = program
            .steps
            .iter()
            .position(|s| s.output == input && s.op == Op::Relu)
        else {
            continue;
        };
        let readers = program
            .steps
            .iter()
            .filter(|s| s.inputs.iter().flatten().any(|n| n == input))
            .count();
        if readers == 1
            && program.target != input
            && let Some(Some(relu_input)) = program.steps[relu].inputs.first()
        {
            fused[relu] = Fused::Skip;
            fused[i] = Fused::ReluInput(relu_input.clone());
        }
    }
    fused
}

pub(crate) struct CandleBackend {
    program: Program,
    fused: Vec<Fused>,
    sample_shape: Vec<usize>,
    params: Vec<(String, Var)>,
    constants: HashMap<String, Tensor>,
    moments: Vec<Moments>,
    steps: i32,
    anchor: Vec<Tensor>,
    rng: rand::rngs::StdRng,
}

fn backend_error(e: candle_core::Error) -> TrainError {
    TrainError::Backend {
        backend: "candle",
        message: e.to_string(),
    }
}

impl CandleBackend {
    pub(crate) fn new(
        model: &OnnxModel,
        program: &Program,
        sample_shape: &[usize],
    ) -> Result<Self, TrainError> {
        let device = Device::Cpu;
        let mut params = Vec::with_capacity(program.params.len());
        for name in &program.params {
            let init = model
                .floats
                .iter()
                .find(|f| &f.name == name)
                .ok_or_else(|| TrainError::Model(format!("initializer {name:?} is missing")))?;
            let var = Var::from_slice(&init.values, init.dims.as_slice(), &device)
                .map_err(backend_error)?;
            params.push((name.clone(), var));
        }
        let mut constants = HashMap::new();
        for (name, (dims, values)) in &program.constants {
            constants.insert(
                name.clone(),
                Tensor::from_slice(values, dims.as_slice(), &device).map_err(backend_error)?,
            );
        }
        Ok(CandleBackend {
            program: program.clone(),
            fused: fuse(program),
            sample_shape: sample_shape.to_vec(),
            params,
            constants,
            moments: Vec::new(),
            steps: 0,
            anchor: Vec::new(),
            rng: rand::rngs::StdRng::seed_from_u64(0),
        })
    }

    /// Runs the program on `n` samples; returns the trained tensor as `[n, width]`.
    fn run(&mut self, x: &[f32], n: usize, train: bool) -> Result<Tensor, TrainError> {
        let mut shape = vec![n];
        shape.extend_from_slice(&self.sample_shape);
        let input = Tensor::from_slice(x, shape.as_slice(), &Device::Cpu).map_err(backend_error)?;
        let mut values: HashMap<&str, Tensor> =
            HashMap::with_capacity(self.program.steps.len() + self.params.len() + 1);
        values.insert(self.program.input.name.as_str(), input);
        for (name, var) in &self.params {
            values.insert(name.as_str(), var.as_tensor().clone());
        }
        for (name, tensor) in &self.constants {
            values.insert(name.as_str(), tensor.clone());
        }
        for (step, fused) in self.program.steps.iter().zip(&self.fused) {
            let out = match fused {
                Fused::Skip => continue,
                Fused::No => apply(step, None, &values, train, &mut self.rng),
                Fused::ReluInput(input) => apply(step, Some(input), &values, train, &mut self.rng),
            }
            .map_err(|e| TrainError::Backend {
                backend: "candle",
                message: format!("node `{}` ({:?}): {e}", step.node, step.op),
            })?;
            values.insert(step.output.as_str(), out);
        }
        let out = values.remove(self.program.target.as_str()).ok_or_else(|| {
            TrainError::Model(format!("tensor {:?} was not computed", self.program.target))
        })?;
        let width = out.elem_count() / n.max(1);
        out.reshape((n, width)).map_err(backend_error)
    }

    fn loss(&self, out: &Tensor, batch: &Batch<'_>, loss: Loss) -> candle_core::Result<Tensor> {
        match (loss, batch.targets) {
            (Loss::CrossEntropy, TargetsRef::Classes(labels)) => {
                let log_probs = log_softmax(out, 1)?;
                let labels = Tensor::from_slice(labels, (batch.n, 1), &Device::Cpu)?;
                log_probs.gather(&labels, 1)?.mean_all()?.neg()
            }
            (Loss::Mse, TargetsRef::Values(values)) => {
                let values = values.as_standard_layout();
                let target = Tensor::from_slice(
                    values.as_slice().unwrap_or_default(),
                    values.dim(),
                    &Device::Cpu,
                )?;
                out.sub(&target)?.sqr()?.mean_all()
            }
            _ => candle_core::bail!("the loss does not fit the targets"),
        }
    }

    fn update(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        config: &TrainConfig,
        lr: f64,
    ) -> candle_core::Result<()> {
        self.steps += 1;
        let t = self.steps;
        let wd = config.weight_decay;
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: the update must not enter the autograd graph (a momentum buffer that
            // records the op that made it would keep every earlier buffer alive).
            let p = &var.as_tensor().detach();
            let mut g = grad.detach();
            if config.fedprox_mu > 0.0
                && let Some(anchor) = self.anchor.get(i)
            {
                g = (g + (p - anchor)?.affine(config.fedprox_mu, 0.0)?)?;
            }
            let new = match config.optimizer {
                Optimizer::Sgd { momentum, nesterov } => {
                    if wd > 0.0 {
                        g = (g + p.affine(wd, 0.0)?)?;
                    }
                    let direction = if momentum > 0.0 {
                        let buf = match &self.moments[i] {
                            Moments::Momentum(buf) => (buf.affine(momentum, 0.0)? + &g)?,
                            _ => g.clone(),
                        };
                        let d = if nesterov {
                            (&g + buf.affine(momentum, 0.0)?)?
                        } else {
                            buf.clone()
                        };
                        self.moments[i] = Moments::Momentum(buf.detach());
                        d
                    } else {
                        g
                    };
                    (p - direction.affine(lr, 0.0)?)?
                }
                Optimizer::Adam { beta1, beta2, eps } | Optimizer::AdamW { beta1, beta2, eps } => {
                    let decoupled = matches!(config.optimizer, Optimizer::AdamW { .. });
                    let p = if decoupled && wd > 0.0 {
                        p.affine(1.0 - lr * wd, 0.0)?
                    } else {
                        p.clone()
                    };
                    if !decoupled && wd > 0.0 {
                        g = (g + p.affine(wd, 0.0)?)?;
                    }
                    let (m, v) = match &self.moments[i] {
                        Moments::Adam { m, v } => (
                            (m.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?,
                            (v.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?,
                        ),
                        _ => (
                            g.affine(1.0 - beta1, 0.0)?,
                            g.sqr()?.affine(1.0 - beta2, 0.0)?,
                        ),
                    };
                    let bias1 = 1.0 - beta1.powi(t);
                    let bias2 = 1.0 - beta2.powi(t);
                    let denom = v.affine(1.0 / bias2, 0.0)?.sqrt()?.affine(1.0, eps)?;
                    let step = m.affine(lr / bias1, 0.0)?.div(&denom)?;
                    self.moments[i] = Moments::Adam {
                        m: m.detach(),
                        v: v.detach(),
                    };
                    (p - step)?
                }
            };
            var.set(&new)?;
        }
        Ok(())
    }
}

impl Backend for CandleBackend {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn begin(&mut self, config: &TrainConfig) -> Result<(), TrainError> {
        self.moments = self.params.iter().map(|_| Moments::None).collect();
        self.steps = 0;
        self.rng = rand::rngs::StdRng::seed_from_u64(config.seed ^ 0x5ed7_ad40);
        self.anchor = if config.fedprox_mu > 0.0 {
            self.params
                .iter()
                .map(|(_, v)| v.as_tensor().copy().map(|t| t.detach()))
                .collect::<candle_core::Result<_>>()
                .map_err(backend_error)?
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
        let out = self.run(batch.x, batch.n, true)?;
        let loss = self.loss(&out, batch, config.loss).map_err(backend_error)?;
        let value = f64::from(loss.to_scalar::<f32>().map_err(backend_error)?);
        if !value.is_finite() {
            return Ok(value);
        }
        let grads = loss.backward().map_err(backend_error)?;
        self.update(&grads, config, learning_rate)
            .map_err(backend_error)?;
        Ok(value)
    }

    fn forward(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>, TrainError> {
        let out = self.run(x, n, false)?;
        out.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(backend_error)
    }

    fn parameters(&self) -> Result<Vec<Parameter>, TrainError> {
        self.params
            .iter()
            .map(|(name, var)| {
                let values = var
                    .as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(backend_error)?;
                Ok((name.clone(), var.dims().to_vec(), values))
            })
            .collect()
    }

    fn set_parameters(&mut self, values: &[Values]) -> Result<(), TrainError> {
        for (name, new) in values {
            let Some((_, var)) = self.params.iter().find(|(n, _)| n == name) else {
                return Err(TrainError::Weights(format!("no trainable tensor {name:?}")));
            };
            let tensor =
                Tensor::from_slice(new, var.dims(), &Device::Cpu).map_err(backend_error)?;
            var.set(&tensor).map_err(backend_error)?;
        }
        Ok(())
    }
}

/// `x - log(sum(exp(x)))` along `dim`, stabilised by the maximum.
fn log_softmax(x: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(dim)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

fn softmax(x: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)
}

fn axis(x: &Tensor, axis: i64) -> candle_core::Result<usize> {
    let rank = x.rank() as i64;
    let a = if axis < 0 { axis + rank } else { axis };
    if !(0..rank).contains(&a) {
        candle_core::bail!("axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}

/// Pads the two spatial dimensions of an NCHW tensor with `value`.
fn pad2d(
    x: &Tensor,
    [top, left, bottom, right]: [usize; 4],
    value: f32,
) -> candle_core::Result<Tensor> {
    if [top, left, bottom, right] == [0; 4] {
        return Ok(x.clone());
    }
    if value == 0.0 {
        return x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right);
    }
    let (n, c, h, w) = x.dims4()?;
    let rows = |k: usize| Tensor::full(value, (n, c, k, w), x.device());
    let x = Tensor::cat(&[rows(top)?, x.clone(), rows(bottom)?], 2)?;
    let device = x.device().clone();
    let cols = |k: usize| Tensor::full(value, (n, c, h + top + bottom, k), &device);
    Tensor::cat(&[cols(left)?, x, cols(right)?], 3)
}

/// Runs one step. `fused_relu`: the ReLU this step absorbed (a MaxPool reads the ReLU's input
/// and applies it itself).
fn apply(
    step: &Step,
    fused_relu: Option<&str>,
    values: &HashMap<&str, Tensor>,
    train: bool,
    rng: &mut rand::rngs::StdRng,
) -> candle_core::Result<Tensor> {
    let get = |i: usize| -> candle_core::Result<&Tensor> {
        let name = match (i, fused_relu) {
            (0, Some(input)) => input,
            _ => step
                .inputs
                .get(i)
                .and_then(|n| n.as_deref())
                .unwrap_or_default(),
        };
        values
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("input {name:?} has no value")))
    };
    let optional = |i: usize| {
        step.inputs
            .get(i)
            .and_then(|n| n.as_deref())
            .and_then(|n| values.get(n))
    };
    let x = get(0)?;
    match &step.op {
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let a = if *trans_a { x.t()? } else { x.clone() };
            let b = get(1)?;
            let b = if *trans_b { b.t()? } else { b.clone() };
            let mut y = a.matmul(&b)?;
            if *alpha != 1.0 {
                y = y.affine(f64::from(*alpha), 0.0)?;
            }
            if let Some(c) = optional(2) {
                let c = if *beta != 1.0 {
                    c.affine(f64::from(*beta), 0.0)?
                } else {
                    c.clone()
                };
                y = y.broadcast_add(&c)?;
            }
            Ok(y)
        }
        Op::MatMul => {
            let b = get(1)?;
            if x.rank() == 2 && b.rank() == 2 {
                x.matmul(b)
            } else {
                x.broadcast_matmul(b)
            }
        }
        Op::Add => x.broadcast_add(get(1)?),
        Op::Sub => x.broadcast_sub(get(1)?),
        Op::Mul => x.broadcast_mul(get(1)?),
        Op::Div => x.broadcast_div(get(1)?),
        Op::Conv {
            strides,
            pads,
            dilations,
        } => kernels::conv2d(x, get(1)?, optional(2), strides[0], dilations[0], *pads),
        Op::Relu => x.relu(),
        Op::LeakyRelu { alpha } => x.relu()? - x.neg()?.relu()?.affine(f64::from(*alpha), 0.0)?,
        Op::Sigmoid => x.neg()?.exp()?.affine(1.0, 1.0)?.recip(),
        Op::Tanh => x.tanh(),
        // Pooling windows do not overlap (checked when the program was built).
        Op::MaxPool { kernel, pads, .. } => {
            let relu = fused_relu.is_some();
            pad2d(x, *pads, f32::MIN)?
                .contiguous()?
                .apply_op1(kernels::MaxPool::new(*kernel, relu))
        }
        Op::AveragePool {
            kernel,
            strides,
            pads,
        } => pad2d(x, *pads, 0.0)?
            .avg_pool2d_with_stride((kernel[0], kernel[1]), (strides[0], strides[1])),
        Op::GlobalAveragePool => x.mean_keepdim(2)?.mean_keepdim(3),
        Op::Flatten { axis } => {
            let dims = x.dims();
            let split = (*axis).min(dims.len());
            let outer: usize = dims[..split].iter().product();
            let inner: usize = dims[split..].iter().product();
            x.reshape((outer, inner))
        }
        Op::Reshape { shape } => {
            let dims = x.dims();
            let mut out = Vec::with_capacity(shape.len());
            let mut hole = None;
            for (i, d) in shape.iter().enumerate() {
                match *d {
                    0 => out.push(*dims.get(i).ok_or_else(|| {
                        candle_core::Error::Msg("shape 0 beyond the input's rank".into())
                    })?),
                    -1 if hole.is_none() => {
                        hole = Some(i);
                        out.push(1);
                    }
                    d if d > 0 => out.push(d as usize),
                    d => candle_core::bail!("bad target dimension {d}"),
                }
            }
            if let Some(i) = hole {
                let known: usize = out.iter().product();
                if known == 0 || x.elem_count() % known != 0 {
                    candle_core::bail!("cannot reshape {:?} into {shape:?}", dims);
                }
                out[i] = x.elem_count() / known;
            }
            x.reshape(out)
        }
        Op::Transpose { perm } => x.permute(perm.as_slice()),
        Op::Softmax { axis: a } => softmax(x, axis(x, *a)?),
        Op::LogSoftmax { axis: a } => log_softmax(x, axis(x, *a)?),
        Op::Dropout { ratio } => {
            if !train || *ratio == 0.0 {
                return Ok(x.clone());
            }
            let keep = 1.0 - f64::from(*ratio);
            let scale = (1.0 / keep) as f32;
            let mask: Vec<f32> = (0..x.elem_count())
                .map(|_| {
                    if rng.random::<f64>() < keep {
                        scale
                    } else {
                        0.0
                    }
                })
                .collect();
            x.mul(&Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(DType::F32)?)
        }
        Op::Identity => Ok(x.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{Optimizer, Schedule, TrainConfig, onnx::OnnxModel};

    /// A momentum buffer or Adam moment that recorded the operations that made it would keep
    /// every earlier step's tensors alive (memory grows without bound).
    #[test]
    fn optimizer_state_and_parameters_stay_out_of_the_autograd_graph() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/mnist/cnn/init.onnx");
        let model = OnnxModel::parse(std::fs::read(path).unwrap()).unwrap();
        let program = Program::build(&model, None).unwrap();
        for optimizer in [
            Optimizer::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
        ] {
            let mut backend = CandleBackend::new(&model, &program, &[1, 28, 28]).unwrap();
            let config = TrainConfig {
                optimizer,
                weight_decay: 1e-3,
                fedprox_mu: 0.1,
                schedule: Schedule::Constant,
                ..TrainConfig::default()
            };
            backend.begin(&config).unwrap();
            let x = vec![0.5f32; 4 * 784];
            let labels = [1u32, 2, 3, 4];
            for _ in 0..3 {
                let batch = Batch {
                    x: &x,
                    n: 4,
                    targets: TargetsRef::Classes(&labels),
                };
                backend.train_step(&batch, &config, 0.01).unwrap();
            }
            for moments in &backend.moments {
                match moments {
                    Moments::Momentum(b) => assert!(!b.track_op()),
                    Moments::Adam { m, v } => assert!(!m.track_op() && !v.track_op()),
                    Moments::None => panic!("no optimizer state after three steps"),
                }
            }
            assert!(backend.anchor.iter().all(|a| !a.track_op()));
        }
    }

    /// Every operator the backend trains, on two small graphs: the forward pass against ONNX
    /// Runtime, and candle's gradients against central differences (MSE, fixed targets).
    #[test]
    fn gradients_match_finite_differences_through_every_operator() {
        use crate::train::onnx::build::*;
        use sedna_proto::onnx as pb;
        let attr = |name: &str, f: f32| pb::AttributeProto {
            name: name.into(),
            r#type: 1,
            f,
            ..Default::default()
        };
        let int = |name: &str, i: i64| pb::AttributeProto {
            name: name.into(),
            r#type: 2,
            i,
            ..Default::default()
        };
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 1000) as f32
                        / 1000.0
                        - 0.5
                })
                .collect()
        };
        let graphs = [
            // x [N,1,4,4] → Conv 3x3 pad 1 → LeakyRelu → MaxPool 2 → GlobalAveragePool →
            // Reshape [-1, 2] → Mul → Sub → Tanh → Gemm (transB) → Softmax.
            model(
                vec![
                    node(
                        "Conv",
                        "conv",
                        &["x", "w", "b"],
                        &["c"],
                        vec![ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])],
                    ),
                    node(
                        "LeakyRelu",
                        "leaky",
                        &["c"],
                        &["l"],
                        vec![attr("alpha", 0.1)],
                    ),
                    node(
                        "MaxPool",
                        "pool",
                        &["l"],
                        &["p"],
                        vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
                    ),
                    node("GlobalAveragePool", "gap", &["p"], &["g"], vec![]),
                    node("Reshape", "reshape", &["g", "shape"], &["r"], vec![]),
                    node("Mul", "mul", &["r", "scale"], &["m"], vec![]),
                    node("Sub", "sub", &["m", "shift"], &["s"], vec![]),
                    node("Tanh", "tanh", &["s"], &["t"], vec![]),
                    node(
                        "Gemm",
                        "fc",
                        &["t", "w2", "b2"],
                        &["o"],
                        vec![int("transB", 1), attr("alpha", 1.5)],
                    ),
                    node("Softmax", "softmax", &["o"], &["y"], vec![int("axis", 1)]),
                ],
                vec![
                    float_init("w", &[2, 1, 3, 3], &values(18, 1)),
                    float_init("b", &[2], &values(2, 2)),
                    int64_init("shape", &[-1, 2]),
                    float_init("scale", &[2], &[1.5, -2.0]),
                    float_init("shift", &[2], &values(2, 3)),
                    float_init("w2", &[3, 2], &values(6, 4)),
                    float_init("b2", &[3], &values(3, 5)),
                ],
                vec![value("x", &[None, Some(1), Some(4), Some(4)])],
                vec![value("y", &[None, Some(3)]), value("o", &[None, Some(3)])],
            ),
            // x [N,1,4,4] → AveragePool 2 → Flatten → MatMul → Add → Sigmoid → Transpose twice →
            // Div → Dropout → LogSoftmax → Identity.
            model(
                vec![
                    node(
                        "AveragePool",
                        "avg",
                        &["x"],
                        &["a"],
                        vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
                    ),
                    node("Flatten", "flat", &["a"], &["f"], vec![]),
                    node("MatMul", "mm", &["f", "w"], &["h"], vec![]),
                    node("Add", "add", &["h", "b"], &["z"], vec![]),
                    node("Sigmoid", "sig", &["z"], &["q"], vec![]),
                    node(
                        "Transpose",
                        "t1",
                        &["q"],
                        &["qt"],
                        vec![ints("perm", &[1, 0])],
                    ),
                    node(
                        "Transpose",
                        "t2",
                        &["qt"],
                        &["q2"],
                        vec![ints("perm", &[1, 0])],
                    ),
                    node("Div", "div", &["q2", "d"], &["v"], vec![]),
                    node("Dropout", "drop", &["v", "ratio"], &["v2"], vec![]),
                    node("LogSoftmax", "lsm", &["v2"], &["ls"], vec![int("axis", -1)]),
                    node("Identity", "id", &["ls"], &["y"], vec![]),
                ],
                vec![
                    float_init("w", &[4, 3], &values(12, 6)),
                    float_init("b", &[3], &values(3, 7)),
                    float_init("d", &[3], &[0.5, 2.0, -1.5]),
                    float_init("ratio", &[], &[0.0]),
                ],
                vec![value("x", &[None, Some(1), Some(4), Some(4)])],
                vec![value("y", &[None, Some(3)])],
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (g, bytes) in graphs.into_iter().enumerate() {
            let model = OnnxModel::parse(bytes.clone()).unwrap();
            let program = Program::build(&model, Some("y")).unwrap();
            let mut backend = CandleBackend::new(&model, &program, &[1, 4, 4]).unwrap();
            let (n, width) = (3, 3);
            let x = values(n * 16, 8);

            // The forward pass computes what ONNX Runtime computes (the trained tensor: the
            // logits before a softmax head).
            let path = dir.path().join(format!("g{g}.onnx"));
            std::fs::write(&path, &bytes).unwrap();
            let ort = crate::inference::Model::load(&path, &Default::default()).unwrap();
            let input =
                ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[n, 1, 4, 4]), x.clone()).unwrap();
            let outputs = ort
                .run(&[("x", crate::inference::TensorView::from(input.view()))])
                .unwrap();
            let want = outputs.f32(&program.target).unwrap();
            let ours = backend.forward(&x, n).unwrap();
            for (a, b) in ours.iter().zip(want.iter()) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "graph {g}: candle {a}, ONNX Runtime {b}"
                );
            }

            let target = Tensor::from_vec(values(n * width, 9), (n, width), &Device::Cpu).unwrap();
            let loss = |backend: &mut CandleBackend| -> Tensor {
                let out = backend.run(&x, n, true).unwrap();
                out.sub(&target).unwrap().sqr().unwrap().mean_all().unwrap()
            };
            let grads = loss(&mut backend).backward().unwrap();
            let params: Vec<(String, Var)> = backend.params.clone();
            assert!(!params.is_empty());
            for (name, var) in &params {
                let analytic = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let original = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (i, want) in analytic.iter().enumerate() {
                    let eps = 1e-2f32;
                    let mut at = |delta: f32| {
                        let mut v = original.clone();
                        v[i] += delta;
                        var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                            .unwrap();
                        f64::from(loss(&mut backend).to_scalar::<f32>().unwrap())
                    };
                    let numeric = ((at(eps) - at(-eps)) / (2.0 * f64::from(eps))) as f32;
                    var.set(&Tensor::from_vec(original.clone(), var.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    assert!(
                        (numeric - want).abs() <= 2e-3 + 0.05 * want.abs(),
                        "{name}[{i}]: candle {want}, finite differences {numeric}"
                    );
                }
            }
        }
    }
}
