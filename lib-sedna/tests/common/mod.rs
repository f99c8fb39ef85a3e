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
