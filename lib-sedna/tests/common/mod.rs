//! What the integration tests share: the digits model and its held-out split.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

use ndarray::Array2;

/// The repository root.
pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `models/digits/model.onnx`.
pub(crate) fn model_path() -> PathBuf {
    root().join("models/digits/model.onnx")
}

/// The held-out split: pixels scaled to 0..1 (one row per sample) and labels.
pub(crate) fn held_out() -> (Array2<f32>, Vec<i64>) {
    let text = std::fs::read_to_string(root().join("models/digits/test.csv")).unwrap();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for line in text.lines().skip(1) {
        let mut fields = line.split(',');
        y.push(fields.next().unwrap().parse::<i64>().unwrap());
        x.extend(fields.map(|v| v.parse::<f32>().unwrap() / 16.0));
    }
    (Array2::from_shape_vec((y.len(), 64), x).unwrap(), y)
}

/// A small regression model written as ONNX here, with operators the MNIST models do not
/// use: `x` [N, 1, 4, 4] → AveragePool 2x2 → Reshape [-1, 4] → MatMul + Add → Sigmoid →
/// Dropout 0.1 → MatMul + Add → Identity → `y` [N, 1].
pub(crate) fn regression_model() -> Vec<u8> {
    use sedna_proto::Message;
    use sedna_proto::onnx::{self as pb, tensor_shape_proto::dimension::Value};
    let float = |name: &str, dims: &[i64], values: Vec<f32>| pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], output: &str, attribute: Vec<pb::AttributeProto>| {
        pb::NodeProto {
            op_type: op.into(),
            name: format!("{op}_{output}"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        }
    };
    let ints = |name: &str, v: &[i64]| pb::AttributeProto {
        name: name.into(),
        r#type: 7,
        ints: v.to_vec(),
        ..Default::default()
    };
    let value = |name: &str, dims: &[Option<i64>]| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| pb::tensor_shape_proto::Dimension {
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
    };
    let w1: Vec<f32> = (0..32)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
        .collect();
    let w2: Vec<f32> = (0..8).map(|i| ((i * 5 % 7) as f32 - 3.0) / 10.0).collect();
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        producer_name: "sedna tests".into(),
        graph: Some(pb::GraphProto {
            name: "regression".into(),
            node: vec![
                node(
                    "AveragePool",
                    &["x"],
                    "pooled",
                    vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])],
                ),
                node("Reshape", &["pooled", "shape"], "flat", vec![]),
                node("MatMul", &["flat", "w1"], "h0", vec![]),
                node("Add", &["h0", "b1"], "h1", vec![]),
                node("Sigmoid", &["h1"], "h2", vec![]),
                node("Dropout", &["h2", "ratio"], "h3", vec![]),
                node("MatMul", &["h3", "w2"], "o0", vec![]),
                node("Add", &["o0", "b2"], "o1", vec![]),
                node("Identity", &["o1"], "y", vec![]),
            ],
            initializer: vec![
                pb::TensorProto {
                    name: "shape".into(),
                    dims: vec![2],
                    data_type: 7,
                    int64_data: vec![-1, 4],
                    ..Default::default()
                },
                float("w1", &[4, 8], w1),
                float("b1", &[8], vec![0.0; 8]),
                float("ratio", &[], vec![0.1]),
                float("w2", &[8, 1], w2),
                float("b2", &[1], vec![0.0]),
            ],
            input: vec![value("x", &[None, Some(1), Some(4), Some(4)])],
            output: vec![value("y", &[None, Some(1)])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}
