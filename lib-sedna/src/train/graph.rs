//! The part of an ONNX graph that training runs: from the data input to the trained output,
//! pruned, in topological order, each node checked and turned into an [`Op`] before any
//! training starts. An operator (or an attribute value) the candle backend cannot
//! differentiate is an error naming the operator and the node.

use std::collections::{HashMap, HashSet};

use sedna_proto::onnx as pb;

use super::TrainError;
use super::onnx::{FLOAT, INT64, OnnxModel, ValueInfo};

/// One operation the interpreter runs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    /// `alpha·A'·B' + beta·C`.
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
    Add,
    Sub,
    Mul,
    Div,
    /// 2-D convolution, one group; `pads` are top, left, bottom, right.
    Conv {
        strides: [usize; 2],
        pads: [usize; 4],
        dilations: [usize; 2],
    },
    Relu,
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    Tanh,
    MaxPool {
        kernel: [usize; 2],
        strides: [usize; 2],
        pads: [usize; 4],
    },
    AveragePool {
        kernel: [usize; 2],
        strides: [usize; 2],
        pads: [usize; 4],
    },
    GlobalAveragePool,
    Flatten {
        axis: usize,
    },
    Reshape {
        shape: Vec<i64>,
    },
    Transpose {
        perm: Vec<usize>,
    },
    Softmax {
        axis: i64,
    },
    LogSoftmax {
        axis: i64,
    },
    /// Dropout: active while training, identity otherwise.
    Dropout {
        ratio: f32,
    },
    Identity,
}

/// A node of the program: the op, its inputs (tensor names; `None` for an omitted optional
/// input) and the one output it computes.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) node: String,
    pub(crate) op: Op,
    pub(crate) inputs: Vec<Option<String>>,
    pub(crate) output: String,
}

/// The training program of a model.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    /// The data input.
    pub(crate) input: ValueInfo,
    /// The tensor the loss is computed on (logits for classification).
    pub(crate) target: String,
    /// The model output the program was built for (the target, or a softmax of it).
    pub(crate) output: String,
    pub(crate) steps: Vec<Step>,
    /// Float initializers the steps read: the trainable parameters, in file order.
    pub(crate) params: Vec<String>,
    /// Float constants from `Constant` nodes (not trained).
    pub(crate) constants: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn unsupported(node: &pb::NodeProto, reason: impl std::fmt::Display) -> TrainError {
    TrainError::UnsupportedOp {
        op: if node.domain.is_empty() || node.domain == "ai.onnx" {
            node.op_type.clone()
        } else {
            format!("{}.{}", node.domain, node.op_type)
        },
        node: node_name(node),
        reason: reason.to_string(),
    }
}

fn node_name(node: &pb::NodeProto) -> String {
    if node.name.is_empty() {
        node.output.first().cloned().unwrap_or_default()
    } else {
        node.name.clone()
    }
}

struct Attrs<'a>(&'a pb::NodeProto);

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.0.attribute.iter().find(|a| a.name == name)
    }
    fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map(|a| a.i).unwrap_or(default)
    }
    fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map(|a| a.f).unwrap_or(default)
    }
    fn ints(&self, name: &str) -> Option<&[i64]> {
        self.get(name).map(|a| a.ints.as_slice())
    }
    fn string(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
}

fn usizes(node: &pb::NodeProto, what: &str, values: &[i64]) -> Result<Vec<usize>, TrainError> {
    values
        .iter()
        .map(|v| {
            usize::try_from(*v)
                .map_err(|_| unsupported(node, format!("{what} {values:?} has a negative value")))
        })
        .collect()
}

/// Two spatial values from an attribute (`[a, b]`), `default` when absent.
fn pair(node: &pb::NodeProto, name: &str, default: usize) -> Result<[usize; 2], TrainError> {
    match Attrs(node).ints(name) {
        None => Ok([default; 2]),
        Some(v) => match usizes(node, name, v)?.as_slice() {
            [a, b] => Ok([*a, *b]),
            other => Err(unsupported(
                node,
                format!("{name} {other:?}: only 2-D (two values) is supported"),
            )),
        },
    }
}

fn pads(node: &pb::NodeProto) -> Result<[usize; 4], TrainError> {
    let attrs = Attrs(node);
    if let Some(auto) = attrs.string("auto_pad")
        && auto != "NOTSET"
        && auto != "VALID"
    {
        return Err(unsupported(
            node,
            format!("auto_pad {auto} is not supported; export with explicit pads"),
        ));
    }
    match attrs.ints("pads") {
        None => Ok([0; 4]),
        Some(v) => match usizes(node, "pads", v)?.as_slice() {
            [t, l, b, r] => Ok([*t, *l, *b, *r]),
            other => Err(unsupported(
                node,
                format!("pads {other:?}: only 2-D (four values) is supported"),
            )),
        },
    }
}

impl Program {
    /// Builds the program that computes `output` (by default: an output named `logits`, else
    /// the first float output) from the model's data input.
    pub(crate) fn build(model: &OnnxModel, output: Option<&str>) -> Result<Program, TrainError> {
        let output = select_output(model, output)?;
        let producer: HashMap<&str, &pb::NodeProto> = model
            .nodes
            .iter()
            .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
            .collect();
        // A softmax (or log-softmax) head is dropped: the loss works on the logits before it.
        let target = match producer.get(output.name.as_str()) {
            Some(n)
                if (n.op_type == "Softmax" || n.op_type == "LogSoftmax")
                    && n.domain.is_empty()
                    && !n.input.is_empty() =>
            {
                n.input[0].clone()
            }
            _ => output.name.clone(),
        };
        let floats: HashSet<&str> = model.floats.iter().map(|i| i.name.as_str()).collect();
        let data_inputs: HashMap<&str, &ValueInfo> =
            model.inputs.iter().map(|i| (i.name.as_str(), i)).collect();

        // Depth-first from the target, ordering nodes after their inputs (an explicit stack:
        // no recursion a deep graph could overflow).
        let mut order: Vec<&pb::NodeProto> = Vec::new();
        let mut done: HashSet<&str> = HashSet::new();
        let mut visiting: HashSet<&str> = HashSet::new();
        let mut used_inputs: Vec<&ValueInfo> = Vec::new();
        let mut stack: Vec<(&str, bool)> = vec![(target.as_str(), false)];
        while let Some((name, expanded)) = stack.pop() {
            if done.contains(name) {
                continue;
            }
            if floats.contains(name)
                || model.int64s.contains_key(name)
                || model.others.contains(name)
            {
                done.insert(name);
                continue;
            }
            if let Some(input) = data_inputs.get(name) {
                done.insert(name);
                if !used_inputs.iter().any(|i| i.name == input.name) {
                    used_inputs.push(input);
                }
                continue;
            }
            let node = producer.get(name).ok_or_else(|| {
                TrainError::Model(format!(
                    "tensor {name:?} is neither an input, an initializer nor a node's output"
                ))
            })?;
            if expanded {
                visiting.remove(name);
                for o in &node.output {
                    done.insert(o.as_str());
                }
                order.push(node);
                continue;
            }
            if !visiting.insert(name) {
                return Err(TrainError::Model(format!(
                    "the graph has a cycle through {name:?}"
                )));
            }
            stack.push((name, true));
            for input in node.input.iter().filter(|i| !i.is_empty()) {
                if !done.contains(input.as_str()) {
                    stack.push((input.as_str(), false));
                }
            }
        }
        let input = match used_inputs.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(TrainError::Model(format!(
                    "output {:?} does not depend on any model input",
                    output.name
                )));
            }
            many => {
                return Err(TrainError::Model(format!(
                    "output {:?} depends on several inputs ({}); the trainer feeds one",
                    output.name,
                    names(&many.iter().map(|v| (*v).clone()).collect::<Vec<_>>())
                )));
            }
        };
        if input.elem_type != FLOAT {
            return Err(TrainError::Model(format!(
                "the model's input {:?} is not float32",
                input.name
            )));
        }

        let mut steps = Vec::with_capacity(order.len());
        let mut constants = HashMap::new();
        let mut params = Vec::new();
        let mut int64_constants: HashMap<String, Vec<i64>> = HashMap::new();
        for node in order {
            if !(node.domain.is_empty() || node.domain == "ai.onnx") {
                return Err(unsupported(
                    node,
                    "operators outside the default ONNX domain cannot be trained",
                ));
            }
            let output = node
                .output
                .first()
                .filter(|o| !o.is_empty())
                .ok_or_else(|| unsupported(node, "the node has no output"))?
                .clone();
            if node.op_type == "Constant" {
                let attrs = Attrs(node);
                let tensor = attrs
                    .get("value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| {
                        unsupported(node, "only a Constant with a `value` tensor is supported")
                    })?;
                let dims: Vec<usize> = usizes(node, "dims", &tensor.dims)?;
                match tensor.data_type {
                    FLOAT => {
                        let values: Vec<f32> = if tensor.raw_data.is_empty() {
                            tensor.float_data.clone()
                        } else {
                            tensor
                                .raw_data
                                .chunks_exact(4)
                                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                                .collect()
                        };
                        constants.insert(output, (dims, values));
                    }
                    INT64 => {
                        let values: Vec<i64> = if tensor.raw_data.is_empty() {
                            tensor.int64_data.clone()
                        } else {
                            tensor
                                .raw_data
                                .chunks_exact(8)
                                .map(|b| {
                                    i64::from_le_bytes([
                                        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
                                    ])
                                })
                                .collect()
                        };
                        int64_constants.insert(output, values);
                    }
                    other => {
                        return Err(unsupported(node, format!("constant of data type {other}")));
                    }
                }
                continue;
            }
            let op = Self::op(node, model, &int64_constants)?;
            let arity = match op {
                Op::Gemm { .. } | Op::Conv { .. } => 3,
                Op::MatMul | Op::Add | Op::Sub | Op::Mul | Op::Div => 2,
                Op::Reshape { .. } => 2,
                Op::Dropout { .. } => 3,
                _ => 1,
            };
            let mut inputs: Vec<Option<String>> = node
                .input
                .iter()
                .take(arity)
                .map(|i| (!i.is_empty()).then(|| i.clone()))
                .collect();
            if matches!(op, Op::Reshape { .. } | Op::Dropout { .. }) {
                // Their extra inputs were read into the op; only the data flows.
                inputs.truncate(1);
            }
            if inputs.first().and_then(|i| i.as_ref()).is_none() {
                return Err(unsupported(node, "the first input is missing"));
            }
            for name in inputs.iter().flatten() {
                if model.int64s.contains_key(name)
                    || model.others.contains(name)
                    || int64_constants.contains_key(name)
                {
                    return Err(unsupported(
                        node,
                        format!("input {name:?} is not a float tensor"),
                    ));
                }
                if floats.contains(name.as_str()) && !params.contains(name) {
                    params.push(name.clone());
                }
            }
            steps.push(Step {
                node: node_name(node),
                op,
                inputs,
                output,
            });
        }
        // Parameters in file order.
        let order = model.file_order();
        params.sort_by_key(|p| order.get(p.as_str()).copied().unwrap_or(usize::MAX));
        Ok(Program {
            input,
            target,
            output: output.name.clone(),
            steps,
            params,
            constants,
        })
    }

    fn op(
        node: &pb::NodeProto,
        model: &OnnxModel,
        int64_constants: &HashMap<String, Vec<i64>>,
    ) -> Result<Op, TrainError> {
        let attrs = Attrs(node);
        let one = |name: &str| -> Result<(), TrainError> {
            match attrs.ints(name) {
                Some(v) if v.iter().any(|x| *x != 1) => Err(unsupported(
                    node,
                    format!("{name} {v:?} is not supported (only 1)"),
                )),
                _ => Ok(()),
            }
        };
        Ok(match node.op_type.as_str() {
            "Gemm" => Op::Gemm {
                alpha: attrs.float("alpha", 1.0),
                beta: attrs.float("beta", 1.0),
                trans_a: attrs.int("transA", 0) != 0,
                trans_b: attrs.int("transB", 0) != 0,
            },
            "MatMul" => Op::MatMul,
            "Add" => Op::Add,
            "Sub" => Op::Sub,
            "Mul" => Op::Mul,
            "Div" => Op::Div,
            "Conv" => {
                if attrs.int("group", 1) != 1 {
                    return Err(unsupported(
                        node,
                        format!("group {} is not supported (only 1)", attrs.int("group", 1)),
                    ));
                }
                let strides = pair(node, "strides", 1)?;
                let dilations = pair(node, "dilations", 1)?;
                if let Some(kernel) = attrs.ints("kernel_shape")
                    && kernel.len() != 2
                {
                    return Err(unsupported(
                        node,
                        format!("kernel_shape {kernel:?}: only 2-D convolutions are supported"),
                    ));
                }
                if strides[0] != strides[1] || dilations[0] != dilations[1] {
                    return Err(unsupported(
                        node,
                        "different strides or dilations per axis are not supported",
                    ));
                }
                Op::Conv {
                    strides,
                    pads: pads(node)?,
                    dilations,
                }
            }
            "Relu" => Op::Relu,
            "LeakyRelu" => Op::LeakyRelu {
                alpha: attrs.float("alpha", 0.01),
            },
            "Sigmoid" => Op::Sigmoid,
            "Tanh" => Op::Tanh,
            "MaxPool" | "AveragePool" => {
                let kernel = match attrs
                    .ints("kernel_shape")
                    .map(|k| usizes(node, "kernel_shape", k))
                    .transpose()?
                {
                    Some(k) if k.len() == 2 => [k[0], k[1]],
                    _ => {
                        return Err(unsupported(
                            node,
                            "kernel_shape must have two values (2-D pooling)",
                        ));
                    }
                };
                let strides = pair(node, "strides", 1)?;
                if attrs.int("ceil_mode", 0) != 0 {
                    return Err(unsupported(node, "ceil_mode 1 is not supported"));
                }
                one("dilations")?;
                if kernel != strides {
                    return Err(unsupported(
                        node,
                        format!(
                            "kernel {kernel:?} with strides {strides:?}: the candle backend differentiates pooling only when they are equal"
                        ),
                    ));
                }
                let pads = pads(node)?;
                if node.op_type == "MaxPool" {
                    if node.output.len() > 1 && !node.output[1].is_empty() {
                        return Err(unsupported(node, "the Indices output is not supported"));
                    }
                    Op::MaxPool {
                        kernel,
                        strides,
                        pads,
                    }
                } else {
                    if pads != [0; 4] && attrs.int("count_include_pad", 0) == 0 {
                        return Err(unsupported(
                            node,
                            "padding with count_include_pad 0 is not supported",
                        ));
                    }
                    Op::AveragePool {
                        kernel,
                        strides,
                        pads,
                    }
                }
            }
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "Flatten" => {
                let axis = attrs.int("axis", 1);
                Op::Flatten {
                    axis: usize::try_from(axis).map_err(|_| {
                        unsupported(node, format!("negative axis {axis} is not supported"))
                    })?,
                }
            }
            "Reshape" => {
                let shape_name = node
                    .input
                    .get(1)
                    .ok_or_else(|| unsupported(node, "the shape input is missing"))?;
                let shape = model
                    .int64s
                    .get(shape_name)
                    .or_else(|| int64_constants.get(shape_name))
                    .ok_or_else(|| {
                        unsupported(node, format!("its shape {shape_name:?} is computed, not a constant; export with a constant shape (or use Flatten)"))
                    })?;
                if attrs.int("allowzero", 0) != 0 {
                    return Err(unsupported(node, "allowzero 1 is not supported"));
                }
                Op::Reshape {
                    shape: shape.clone(),
                }
            }
            "Transpose" => {
                let perm = attrs
                    .ints("perm")
                    .ok_or_else(|| unsupported(node, "perm is required"))?;
                Op::Transpose {
                    perm: usizes(node, "perm", perm)?,
                }
            }
            "Softmax" => Op::Softmax {
                axis: attrs.int("axis", if model.opset >= 13 { -1 } else { 1 }),
            },
            "LogSoftmax" => Op::LogSoftmax {
                axis: attrs.int("axis", if model.opset >= 13 { -1 } else { 1 }),
            },
            "Dropout" => {
                let ratio = match node.input.get(1).filter(|n| !n.is_empty()) {
                    None => attrs.float("ratio", 0.5),
                    Some(name) => model
                        .floats
                        .iter()
                        .find(|f| &f.name == name)
                        .and_then(|f| f.values.first().copied())
                        .ok_or_else(|| {
                            unsupported(node, "its ratio must be a constant initializer")
                        })?,
                };
                if !(0.0..1.0).contains(&ratio) {
                    return Err(unsupported(
                        node,
                        format!("ratio {ratio} is outside [0, 1)"),
                    ));
                }
                if node.output.len() > 1 && !node.output[1].is_empty() {
                    return Err(unsupported(node, "the mask output is not supported"));
                }
                Op::Dropout { ratio }
            }
            "Identity" => Op::Identity,
            "BatchNormalization" => {
                return Err(unsupported(
                    node,
                    "the candle backend cannot train batch normalization (running statistics); use the tch backend",
                ));
            }
            other => {
                return Err(unsupported(
                    node,
                    format!("the candle backend has no gradient for {other}"),
                ));
            }
        })
    }

    /// A program that only names the data input and the output, for a backend that does not
    /// interpret the graph (tch trains the TorchScript twin).
    #[cfg(feature = "tch")]
    pub(crate) fn describe(model: &OnnxModel, output: Option<&str>) -> Result<Program, TrainError> {
        let output = select_output(model, output)?;
        let input = match model.inputs.as_slice() {
            [one] if one.elem_type == FLOAT => one.clone(),
            [one] => {
                return Err(TrainError::Model(format!(
                    "the model's input {:?} is not float32",
                    one.name
                )));
            }
            other => {
                return Err(TrainError::Model(format!(
                    "the model has {} inputs ({}); the trainer feeds one",
                    other.len(),
                    names(other)
                )));
            }
        };
        Ok(Program {
            input,
            target: output.name.clone(),
            output: output.name.clone(),
            steps: Vec::new(),
            params: Vec::new(),
            constants: HashMap::new(),
        })
    }

    /// The per-sample shape the input takes (its dimensions after the batch), when fixed.
    pub(crate) fn sample_shape(&self) -> Option<Vec<usize>> {
        self.input.dims.iter().skip(1).copied().collect()
    }
}

/// The output to train: the one named, else `logits`, else the first float output.
fn select_output<'a>(
    model: &'a OnnxModel,
    output: Option<&str>,
) -> Result<&'a ValueInfo, TrainError> {
    match output {
        Some(name) => model
            .outputs
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| {
                TrainError::Model(format!(
                    "the model has no output {name:?} (outputs: {})",
                    names(&model.outputs)
                ))
            }),
        None => model
            .outputs
            .iter()
            .find(|o| o.name == "logits" && o.elem_type == FLOAT)
            .or_else(|| model.outputs.iter().find(|o| o.elem_type == FLOAT))
            .ok_or_else(|| {
                TrainError::Model(format!(
                    "the model has no float output to train (outputs: {})",
                    names(&model.outputs)
                ))
            }),
    }
}

fn names(values: &[ValueInfo]) -> String {
    if values.is_empty() {
        return "none".into();
    }
    values
        .iter()
        .map(|v| v.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::onnx::build::*;
    use super::*;

    fn cnn() -> OnnxModel {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/mnist/cnn/init.onnx");
        OnnxModel::parse(std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn the_cnn_trains_its_logits_before_the_softmax() {
        let program = Program::build(&cnn(), None).unwrap();
        assert_eq!(program.output, "logits");
        assert_eq!(program.target, "logits");
        let ops: Vec<&Op> = program.steps.iter().map(|s| &s.op).collect();
        assert!(matches!(
            ops[0],
            Op::Conv {
                pads: [2, 2, 2, 2],
                ..
            }
        ));
        assert_eq!(ops.len(), 8, "{ops:?}");
        assert_eq!(program.params.len(), 6);
        assert_eq!(program.sample_shape(), Some(vec![1, 28, 28]));

        let probabilities = Program::build(&cnn(), Some("probabilities")).unwrap();
        assert_eq!(probabilities.output, "probabilities");
        assert_eq!(probabilities.target, "logits");
    }

    #[test]
    fn an_untrainable_operator_is_named_with_its_node_before_training() {
        let bytes = model(
            vec![
                node(
                    "BatchNormalization",
                    "bn1",
                    &["x", "s", "b", "m", "v"],
                    &["y"],
                    vec![],
                ),
                node("Relu", "relu", &["y"], &["out"], vec![]),
            ],
            ["s", "b", "m", "v"]
                .iter()
                .map(|n| float_init(n, &[2], &[1.0, 1.0]))
                .collect(),
            vec![value("x", &[None, Some(2), Some(4), Some(4)])],
            vec![value("out", &[None, Some(2), Some(4), Some(4)])],
        );
        let err = Program::build(&OnnxModel::parse(bytes).unwrap(), None).unwrap_err();
        assert!(
            matches!(&err, TrainError::UnsupportedOp { op, node, .. } if op == "BatchNormalization" && node == "bn1"),
            "{err}"
        );
        assert!(err.to_string().contains("tch backend"), "{err}");

        // A real model: the logistic-regression edge model is one ai.onnx.ml operator.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/mnist/edge/model.onnx"
        );
        let edge = OnnxModel::parse(std::fs::read(path).unwrap()).unwrap();
        let err = Program::build(&edge, None).unwrap_err();
        assert!(
            err.to_string().contains("ai.onnx.ml.LinearClassifier"),
            "{err}"
        );
    }

    #[test]
    fn pooling_with_overlapping_windows_is_refused() {
        let bytes = model(
            vec![node(
                "MaxPool",
                "pool",
                &["x"],
                &["y"],
                vec![ints("kernel_shape", &[3, 3]), ints("strides", &[2, 2])],
            )],
            vec![],
            vec![value("x", &[None, Some(1), Some(8), Some(8)])],
            vec![value("y", &[None, Some(1), Some(3), Some(3)])],
        );
        let err = Program::build(&OnnxModel::parse(bytes).unwrap(), None).unwrap_err();
        assert!(
            err.to_string().contains("node `pool`") && err.to_string().contains("equal"),
            "{err}"
        );
    }
}
