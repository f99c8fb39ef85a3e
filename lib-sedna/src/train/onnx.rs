//! ONNX files as the trainer sees them: the graph (decoded with `sedna_proto::onnx`), the float
//! initializers with the byte ranges that hold their values, and saving a trained model by
//! overwriting exactly those bytes, so the written file differs from the original only in the
//! initializers' values (same length, same everything else, including fields this crate does
//! not know).

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use sedna_proto::Message;
use sedna_proto::onnx as pb;

use super::TrainError;

/// The largest ONNX file the trainer loads (protobuf's own limit is 2 GiB).
pub const MAX_MODEL_BYTES: usize = 1 << 30;
/// The most nodes a trainable graph may have.
pub const MAX_NODES: usize = 100_000;

/// ONNX's `TensorProto.DataType` values the trainer uses.
pub(crate) const FLOAT: i32 = 1;
pub(crate) const INT64: i32 = 7;

/// A float initializer: its name, shape, values and where the values lie in the file.
#[derive(Debug, Clone)]
pub(crate) struct Initializer {
    pub(crate) name: String,
    pub(crate) dims: Vec<usize>,
    pub(crate) values: Vec<f32>,
    /// Byte ranges of the file holding the values as little-endian f32, in order.
    ranges: Vec<Range<usize>>,
}

/// A model input or output: name, element type, dimensions (None when symbolic).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValueInfo {
    pub(crate) name: String,
    pub(crate) elem_type: i32,
    pub(crate) dims: Vec<Option<usize>>,
}

/// An ONNX model read for training.
#[derive(Debug, Clone)]
pub(crate) struct OnnxModel {
    bytes: Vec<u8>,
    /// The graph's nodes, as stored.
    pub(crate) nodes: Vec<pb::NodeProto>,
    /// Inputs that are not initializers.
    pub(crate) inputs: Vec<ValueInfo>,
    pub(crate) outputs: Vec<ValueInfo>,
    /// Float initializers, in file order.
    pub(crate) floats: Vec<Initializer>,
    /// Int64 initializers (shapes for Reshape, axes, …).
    pub(crate) int64s: HashMap<String, Vec<i64>>,
    /// Names of initializers of other types (not trainable, not interpreted).
    pub(crate) others: HashSet<String>,
    /// The default domain's opset version.
    pub(crate) opset: i64,
}

fn bad(reason: impl Into<String>) -> TrainError {
    TrainError::Model(reason.into())
}

impl OnnxModel {
    /// Reads a model from its bytes.
    pub(crate) fn parse(bytes: Vec<u8>) -> Result<Self, TrainError> {
        if bytes.len() > MAX_MODEL_BYTES {
            return Err(bad(format!(
                "the file is {} bytes; the trainer loads at most {MAX_MODEL_BYTES}",
                bytes.len()
            )));
        }
        let model = pb::ModelProto::decode(bytes.as_slice())
            .map_err(|e| bad(format!("not an ONNX model: {e}")))?;
        let graph = model.graph.ok_or_else(|| bad("the model has no graph"))?;
        if graph.node.len() > MAX_NODES {
            return Err(bad(format!(
                "the graph has {} nodes; at most {MAX_NODES} are trained",
                graph.node.len()
            )));
        }
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .unwrap_or(1);
        let located = locate_initializers(&bytes)?;
        let mut floats = Vec::new();
        let mut int64s = HashMap::new();
        let mut others = HashSet::new();
        for (tensor, location) in graph.initializer.iter().zip(located) {
            if tensor.name != location.name {
                return Err(bad(format!(
                    "initializer {:?} could not be located in the file",
                    tensor.name
                )));
            }
            if tensor.data_location == 1 || !tensor.external_data.is_empty() {
                return Err(bad(format!(
                    "initializer {:?} keeps its data in an external file, which the trainer does not support",
                    tensor.name
                )));
            }
            let dims = dims_of(&tensor.name, &tensor.dims)?;
            let count: usize = dims.iter().product();
            match tensor.data_type {
                FLOAT => {
                    let bytes_needed = count * 4;
                    let have: usize = location.ranges.iter().map(|r| r.len()).sum();
                    if have != bytes_needed {
                        return Err(bad(format!(
                            "initializer {:?} has shape {dims:?} ({count} values) but {} bytes of data",
                            tensor.name, have
                        )));
                    }
                    let mut values = Vec::with_capacity(count);
                    for range in &location.ranges {
                        values.extend(
                            bytes[range.clone()]
                                .chunks_exact(4)
                                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                        );
                    }
                    floats.push(Initializer {
                        name: tensor.name.clone(),
                        dims,
                        values,
                        ranges: location.ranges,
                    });
                }
                INT64 => {
                    let values: Vec<i64> = if !tensor.raw_data.is_empty() {
                        tensor
                            .raw_data
                            .chunks_exact(8)
                            .map(|b| {
                                i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                            })
                            .collect()
                    } else {
                        tensor.int64_data.clone()
                    };
                    if values.len() != count {
                        return Err(bad(format!(
                            "initializer {:?} has shape {dims:?} but {} values",
                            tensor.name,
                            values.len()
                        )));
                    }
                    int64s.insert(tensor.name.clone(), values);
                }
                _ => {
                    others.insert(tensor.name.clone());
                }
            }
        }
        let initializer_names: HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs = graph
            .input
            .iter()
            .filter(|v| !initializer_names.contains(v.name.as_str()))
            .map(value_info)
            .collect();
        let outputs = graph.output.iter().map(value_info).collect();
        Ok(OnnxModel {
            bytes,
            nodes: graph.node,
            inputs,
            outputs,
            floats,
            int64s,
            others,
            opset,
        })
    }

    /// Each float initializer's position in the file, by name (parameters are listed in it).
    pub(crate) fn file_order(&self) -> HashMap<&str, usize> {
        self.floats
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.as_str(), i))
            .collect()
    }

    /// The file's bytes with the named initializers' values replaced (same length; nothing else
    /// changes). Every name must be a float initializer with the same number of values.
    pub(crate) fn with_values<'a>(
        &self,
        values: impl IntoIterator<Item = (&'a str, &'a [f32])>,
    ) -> Result<Vec<u8>, TrainError> {
        let index: HashMap<&str, &Initializer> =
            self.floats.iter().map(|i| (i.name.as_str(), i)).collect();
        let mut out = self.bytes.clone();
        for (name, new) in values {
            let init = index
                .get(name)
                .ok_or_else(|| bad(format!("the model has no float initializer {name:?}")))?;
            if new.len() != init.values.len() {
                return Err(bad(format!(
                    "initializer {name:?} holds {} values, got {}",
                    init.values.len(),
                    new.len()
                )));
            }
            let mut values = new.iter();
            for range in &init.ranges {
                for chunk in out[range.clone()].chunks_exact_mut(4) {
                    if let Some(v) = values.next() {
                        chunk.copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        Ok(out)
    }

    /// The original file.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

fn dims_of(name: &str, dims: &[i64]) -> Result<Vec<usize>, TrainError> {
    dims.iter()
        .map(|d| {
            usize::try_from(*d)
                .map_err(|_| bad(format!("initializer {name:?} has a negative dimension {d}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|dims| {
            dims.iter()
                .try_fold(1usize, |acc, d| acc.checked_mul(*d))
                .filter(|n| *n <= MAX_MODEL_BYTES)
                .map(|_| dims)
                .ok_or_else(|| bad(format!("initializer {name:?} is too large")))
        })
}

fn value_info(v: &pb::ValueInfoProto) -> ValueInfo {
    let tensor = v
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .map(|pb::type_proto::Value::TensorType(t)| t);
    let dims = tensor
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0 => {
                        usize::try_from(n).ok()
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    ValueInfo {
        name: v.name.clone(),
        elem_type: tensor.map(|t| t.elem_type).unwrap_or(0),
        dims,
    }
}

/// Where one initializer's float values lie in the file.
struct Located {
    name: String,
    ranges: Vec<Range<usize>>,
}

/// Protobuf wire values, with absolute byte offsets.
enum Wire {
    Varint,
    Fixed64,
    Len(Range<usize>),
    Fixed32(usize),
}

/// Walks the fields of the message in `bytes[range]`.
fn walk(
    bytes: &[u8],
    range: Range<usize>,
    mut visit: impl FnMut(u64, Wire) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let mut at = range.start;
    let end = range.end;
    let varint = |at: &mut usize| -> Result<u64, TrainError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *bytes
                .get(*at)
                .filter(|_| *at < end)
                .ok_or_else(|| bad("truncated protobuf varint"))?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad("protobuf varint longer than 10 bytes"))
    };
    while at < end {
        let key = varint(&mut at)?;
        let (field, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => {
                varint(&mut at)?;
                Wire::Varint
            }
            1 => {
                at = at
                    .checked_add(8)
                    .filter(|a| *a <= end)
                    .ok_or_else(|| bad("truncated protobuf field"))?;
                Wire::Fixed64
            }
            2 => {
                let len = usize::try_from(varint(&mut at)?)
                    .map_err(|_| bad("protobuf length too large"))?;
                let start = at;
                at = at
                    .checked_add(len)
                    .filter(|a| *a <= end)
                    .ok_or_else(|| bad("truncated protobuf field"))?;
                Wire::Len(start..at)
            }
            5 => {
                let start = at;
                at = at
                    .checked_add(4)
                    .filter(|a| *a <= end)
                    .ok_or_else(|| bad("truncated protobuf field"))?;
                Wire::Fixed32(start)
            }
            other => return Err(bad(format!("unsupported protobuf wire type {other}"))),
        };
        visit(field, value)?;
    }
    Ok(())
}

/// Finds every initializer of the (single) graph, in order, with the byte ranges of its float
/// values (`raw_data` when present, else `float_data`, packed or not).
fn locate_initializers(bytes: &[u8]) -> Result<Vec<Located>, TrainError> {
    let mut graphs = Vec::new();
    walk(bytes, 0..bytes.len(), |field, wire| {
        if let (7, Wire::Len(range)) = (field, wire) {
            graphs.push(range);
        }
        Ok(())
    })?;
    let [graph] = graphs.as_slice() else {
        return Err(bad(format!(
            "the model has {} graph fields; the trainer needs exactly one",
            graphs.len()
        )));
    };
    let mut tensors = Vec::new();
    walk(bytes, graph.clone(), |field, wire| {
        if let (5, Wire::Len(range)) = (field, wire) {
            tensors.push(range);
        }
        Ok(())
    })?;
    tensors
        .into_iter()
        .map(|tensor| {
            let mut name = String::new();
            let mut raw: Option<Range<usize>> = None;
            let mut float_data = Vec::new();
            walk(bytes, tensor, |field, wire| {
                match (field, wire) {
                    (8, Wire::Len(r)) => {
                        name = String::from_utf8_lossy(&bytes[r]).into_owned();
                    }
                    (9, Wire::Len(r)) => raw = Some(r),
                    (4, Wire::Len(r)) => {
                        if r.len() % 4 != 0 {
                            return Err(bad("packed float_data is not a whole number of floats"));
                        }
                        float_data.push(r);
                    }
                    (4, Wire::Fixed32(at)) => float_data.push(at..at + 4),
                    _ => {}
                }
                Ok(())
            })?;
            let ranges = match raw {
                Some(r) => {
                    if r.len() % 4 != 0 {
                        vec![]
                    } else {
                        vec![r]
                    }
                }
                None => float_data,
            };
            Ok(Located { name, ranges })
        })
        .collect()
}

/// Builds model bytes from parts (tests and tools write small graphs with it).
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    /// A float tensor initializer stored as `raw_data`.
    pub(crate) fn float_init(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: FLOAT,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    /// An int64 tensor initializer.
    pub(crate) fn int64_init(name: &str, values: &[i64]) -> pb::TensorProto {
        pb::TensorProto {
            name: name.into(),
            dims: vec![values.len() as i64],
            data_type: INT64,
            int64_data: values.to_vec(),
            ..Default::default()
        }
    }

    /// A node.
    pub(crate) fn node(
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<pb::AttributeProto>,
    ) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attributes,
            ..Default::default()
        }
    }

    /// An ints attribute.
    pub(crate) fn ints(name: &str, ints: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: 7,
            ints: ints.to_vec(),
            ..Default::default()
        }
    }

    /// A float tensor value description with fixed or symbolic (None) dimensions.
    pub(crate) fn value(name: &str, dims: &[Option<i64>]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::{Dimension, dimension::Value};
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: FLOAT,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| Dimension {
                                value: Some(match d {
                                    Some(n) => Value::DimValue(*n),
                                    None => Value::DimParam("N".into()),
                                }),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A whole model (opset 17).
    pub(crate) fn model(
        nodes: Vec<pb::NodeProto>,
        initializers: Vec<pb::TensorProto>,
        inputs: Vec<pb::ValueInfoProto>,
        outputs: Vec<pb::ValueInfoProto>,
    ) -> Vec<u8> {
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            producer_name: "sedna tests".into(),
            graph: Some(pb::GraphProto {
                node: nodes,
                name: "test".into(),
                initializer: initializers,
                input: inputs,
                output: outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    #[test]
    fn saving_changes_only_the_initializer_bytes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/mnist/cnn/init.onnx");
        let bytes = std::fs::read(path).unwrap();
        let model = OnnxModel::parse(bytes.clone()).unwrap();
        let names: Vec<&str> = model.floats.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "fc.weight",
                "fc.bias"
            ]
        );
        assert_eq!(model.floats[0].dims, [8, 1, 5, 5]);
        let doubled: Vec<(String, Vec<f32>)> = model
            .floats
            .iter()
            .map(|i| {
                (
                    i.name.clone(),
                    i.values.iter().map(|v| v * 2.0 + 1.0).collect(),
                )
            })
            .collect();
        let saved = model
            .with_values(doubled.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
            .unwrap();
        assert_eq!(saved.len(), bytes.len());
        // Every changed byte lies inside an initializer's data, and reading back gives the new values.
        let data: Vec<Range<usize>> = model.floats.iter().flat_map(|i| i.ranges.clone()).collect();
        for (at, (a, b)) in bytes.iter().zip(&saved).enumerate() {
            if a != b {
                assert!(
                    data.iter().any(|r| r.contains(&at)),
                    "byte {at} changed outside the weights"
                );
            }
        }
        let again = OnnxModel::parse(saved).unwrap();
        for (init, (_, want)) in again.floats.iter().zip(&doubled) {
            assert_eq!(&init.values, want);
        }
    }

    #[test]
    fn float_data_packed_and_unpacked_are_rewritten_in_place() {
        // float_data (field 4) as protobuf packs it, then an unpacked variant written by hand.
        let packed = pb::TensorProto {
            name: "w".into(),
            dims: vec![3],
            data_type: FLOAT,
            float_data: vec![1.0, 2.0, 3.0],
            ..Default::default()
        };
        let bytes = model(
            vec![],
            vec![packed],
            vec![value("x", &[None, Some(3)])],
            vec![],
        );
        let parsed = OnnxModel::parse(bytes).unwrap();
        assert_eq!(parsed.floats[0].values, [1.0, 2.0, 3.0]);
        let saved = parsed
            .with_values([("w", &[4.0f32, 5.0, 6.0][..])])
            .unwrap();
        assert_eq!(
            OnnxModel::parse(saved).unwrap().floats[0].values,
            [4.0, 5.0, 6.0]
        );

        // An unpacked tensor: name (8), dims (1), data_type (2), then float_data as fixed32 fields.
        let mut tensor = vec![0x42, 1, b'u', 0x08, 2, 0x10, 1];
        for v in [7.0f32, 8.0] {
            tensor.push(0x25);
            tensor.extend_from_slice(&v.to_le_bytes());
        }
        let mut graph = vec![0x2a, tensor.len() as u8];
        graph.extend(tensor);
        let mut file = vec![0x3a, graph.len() as u8];
        file.extend(graph);
        let parsed = OnnxModel::parse(file).unwrap();
        assert_eq!(parsed.floats[0].values, [7.0, 8.0]);
        let saved = parsed.with_values([("u", &[9.0f32, 10.0][..])]).unwrap();
        assert_eq!(
            OnnxModel::parse(saved).unwrap().floats[0].values,
            [9.0, 10.0]
        );
    }

    #[test]
    fn broken_files_are_refused_with_a_reason() {
        let err = OnnxModel::parse(b"not a model at all".to_vec()).unwrap_err();
        assert!(err.to_string().contains("not an ONNX model"), "{err}");
        let short = pb::TensorProto {
            name: "w".into(),
            dims: vec![4],
            data_type: FLOAT,
            raw_data: vec![0; 8],
            ..Default::default()
        };
        let err = OnnxModel::parse(model(vec![], vec![short], vec![], vec![])).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"w\" has shape [4] (4 values) but 8 bytes"),
            "{err}"
        );
        let external = pb::TensorProto {
            name: "big".into(),
            dims: vec![1],
            data_type: FLOAT,
            data_location: 1,
            ..Default::default()
        };
        let err = OnnxModel::parse(model(vec![], vec![external], vec![], vec![])).unwrap_err();
        assert!(err.to_string().contains("external file"), "{err}");
    }
}
