//! Model weights as named tensors, and their binary encoding — never JSON lists of numbers
//! (Sedna's federated learning sends those: about 10 bytes per parameter instead of 4, 2 or 1).
//!
//! A [`Weights`] value is an ordered list of named `f32` tensors (an ONNX model's
//! initializers, a network's layers). [`Weights::encode`] writes them in one of three
//! encodings, chosen per message:
//!
//! | encoding | bytes per value | error after a round trip |
//! |---|---|---|
//! | [`Encoding::F32`] | 4 | none (bit-exact) |
//! | [`Encoding::F16`] | 2 | ≤ 2⁻¹¹·\|x\| (relative) for \|x\| ≥ 2⁻¹⁴; ≤ 2⁻²⁵ (absolute) below; \|x\| > 65504 is refused |
//! | [`Encoding::Int8`] | 1 (+ 8 per tensor) | ≤ (max − min) / 510 of the tensor, plus `f32` rounding |
//!
//! Format (little-endian): `SDNW`, version `1`, u32 tensor count; per tensor: u16 name
//! length, UTF-8 name, u8 encoding, u8 rank, u64 per dimension, for int8 the f32 minimum and
//! f32 scale, then the values. [`Weights::decode`] checks every length against [`Limits`]
//! before allocating, so a malformed or hostile message is an error, not a crash.
//!
//! ```
//! use sedna::weights::{Encoding, Limits, Weights};
//! use ndarray::{ArrayD, IxDyn};
//!
//! let w = Weights::new(vec![
//!     ("fc.weight".into(), ArrayD::from_elem(IxDyn(&[2, 3]), 0.25f32)),
//!     ("fc.bias".into(), ArrayD::zeros(IxDyn(&[2]))),
//! ])?;
//! let bytes = w.encode(Encoding::F16)?;
//! let back = Weights::decode(&bytes, &Limits::default())?;
//! assert_eq!(back, w); // 0.25 and 0 are exact in fp16
//! # Ok::<(), sedna::weights::WeightsError>(())
//! ```

use half::f16;
use ndarray::{ArrayD, IxDyn};

const MAGIC: &[u8; 4] = b"SDNW";
const VERSION: u8 = 1;

/// How values are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// 32-bit floats, exact.
    F32,
    /// 16-bit floats (IEEE half).
    F16,
    /// 8-bit affine quantization per tensor (minimum and scale kept as f32).
    Int8,
}

impl Encoding {
    fn tag(self) -> u8 {
        match self {
            Encoding::F32 => 0,
            Encoding::F16 => 1,
            Encoding::Int8 => 2,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(Encoding::F32),
            1 => Some(Encoding::F16),
            2 => Some(Encoding::Int8),
            _ => None,
        }
    }

    fn width(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::F16 => 2,
            Encoding::Int8 => 1,
        }
    }

    /// The name [`Encoding::parse`] reads back: `f32`, `fp16` or `int8`.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "fp16",
            Encoding::Int8 => "int8",
        }
    }

    /// Parses `f32`, `fp16`/`f16`, `int8`.
    pub fn parse(s: &str) -> Result<Self, WeightsError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Encoding::F32),
            "f16" | "fp16" | "float16" => Ok(Encoding::F16),
            "int8" | "i8" => Ok(Encoding::Int8),
            other => Err(WeightsError::Invalid(format!(
                "unknown encoding {other:?}: use f32, fp16 or int8"
            ))),
        }
    }
}

/// Bounds on what [`Weights::decode`] accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most tensors in one message.
    pub max_tensors: usize,
    /// Most values over all tensors.
    pub max_values: usize,
    /// Longest tensor name, in bytes.
    pub max_name_bytes: usize,
    /// Highest rank.
    pub max_rank: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tensors: 65_536,
            max_values: 1 << 30,
            max_name_bytes: 1024,
            max_rank: 8,
        }
    }
}

/// Why weights could not be built, encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightsError {
    /// Malformed input (a message, a name, a shape). Not retryable.
    #[error("invalid weights: {0}")]
    Invalid(String),
    /// A bound of [`Limits`] was exceeded. Not retryable.
    #[error("weights exceed a limit: {0}")]
    TooLarge(String),
    /// A value cannot be represented in the chosen encoding. Not retryable.
    #[error("tensor {tensor:?}: {reason}")]
    NotRepresentable {
        /// The tensor.
        tensor: String,
        /// Why.
        reason: String,
    },
}

impl WeightsError {
    /// Whether trying again could succeed (never: the input must change).
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Named `f32` tensors, in order; names are unique.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Weights {
    tensors: Vec<(String, ArrayD<f32>)>,
}

impl Weights {
    /// Weights from named tensors (names must be unique and non-empty).
    pub fn new(tensors: Vec<(String, ArrayD<f32>)>) -> Result<Self, WeightsError> {
        let mut seen = std::collections::HashSet::new();
        for (name, _) in &tensors {
            if name.is_empty() {
                return Err(WeightsError::Invalid("a tensor without a name".into()));
            }
            if !seen.insert(name.as_str()) {
                return Err(WeightsError::Invalid(format!(
                    "tensor {name:?} appears twice"
                )));
            }
        }
        Ok(Self { tensors })
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[(String, ArrayD<f32>)] {
        &self.tensors
    }

    /// The tensors, mutable (names and shapes stay as they are).
    pub fn arrays_mut(&mut self) -> impl Iterator<Item = &mut ArrayD<f32>> {
        self.tensors.iter_mut().map(|(_, a)| a)
    }

    /// Takes the tensors out.
    pub fn into_tensors(self) -> Vec<(String, ArrayD<f32>)> {
        self.tensors
    }

    /// A tensor by name.
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    /// The squared Euclidean distance to `other`, tensor by tensor in order (both must have
    /// the same layout; extra tensors on either side are ignored).
    pub fn squared_distance(&self, other: &Weights) -> f64 {
        self.tensors
            .iter()
            .zip(&other.tensors)
            .map(|((_, x), (_, y))| {
                x.iter()
                    .zip(y.iter())
                    .map(|(p, q)| f64::from(p - q).powi(2))
                    .sum::<f64>()
            })
            .sum()
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of values.
    pub fn num_values(&self) -> usize {
        self.tensors.iter().map(|(_, a)| a.len()).sum()
    }

    /// Same names, order and shapes as `other`; the first difference otherwise.
    pub fn check_same_layout(&self, other: &Weights) -> Result<(), String> {
        if self.len() != other.len() {
            return Err(format!("{} tensors, expected {}", other.len(), self.len()));
        }
        for ((a, x), (b, y)) in self.tensors.iter().zip(&other.tensors) {
            if a != b {
                return Err(format!("tensor {b:?} where {a:?} was expected"));
            }
            if x.shape() != y.shape() {
                return Err(format!(
                    "tensor {a:?} has shape {:?}, expected {:?}",
                    y.shape(),
                    x.shape()
                ));
            }
        }
        Ok(())
    }

    /// The encoded size in bytes.
    pub fn encoded_len(&self, encoding: Encoding) -> usize {
        9 + self
            .tensors
            .iter()
            .map(|(n, a)| {
                2 + n.len()
                    + 2
                    + 8 * a.ndim()
                    + if encoding == Encoding::Int8 { 8 } else { 0 }
                    + a.len() * encoding.width()
            })
            .sum::<usize>()
    }

    /// Writes the weights in `encoding`.
    pub fn encode(&self, encoding: Encoding) -> Result<Vec<u8>, WeightsError> {
        let mut out = Vec::with_capacity(self.encoded_len(encoding));
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        let count = u32::try_from(self.tensors.len())
            .map_err(|_| WeightsError::TooLarge("more than 2³² tensors".into()))?;
        out.extend_from_slice(&count.to_le_bytes());
        for (name, array) in &self.tensors {
            let name_len = u16::try_from(name.len()).map_err(|_| {
                WeightsError::Invalid(format!("tensor name of {} bytes", name.len()))
            })?;
            out.extend_from_slice(&name_len.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(encoding.tag());
            out.push(u8::try_from(array.ndim()).map_err(|_| {
                WeightsError::Invalid(format!("tensor {name:?} has rank {}", array.ndim()))
            })?);
            for d in array.shape() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            let values = array.iter().copied();
            match encoding {
                Encoding::F32 => {
                    for v in values {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
                Encoding::F16 => {
                    for v in values {
                        let h = f16::from_f32(v);
                        if h.is_infinite() && v.is_finite() {
                            return Err(WeightsError::NotRepresentable {
                                tensor: name.clone(),
                                reason: format!("{v} is beyond fp16's range (±65504)"),
                            });
                        }
                        out.extend_from_slice(&h.to_le_bytes());
                    }
                }
                Encoding::Int8 => {
                    let (min, scale) =
                        int8_params(array).map_err(|reason| WeightsError::NotRepresentable {
                            tensor: name.clone(),
                            reason,
                        })?;
                    out.extend_from_slice(&min.to_le_bytes());
                    out.extend_from_slice(&scale.to_le_bytes());
                    for v in values {
                        let q = if scale > 0.0 {
                            ((v - min) / scale).round().clamp(0.0, 255.0) as u8
                        } else {
                            0
                        };
                        out.push(q);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads weights written by [`Weights::encode`] (any encoding), within `limits`.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Weights, WeightsError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(WeightsError::Invalid("not an SDNW weights message".into()));
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(WeightsError::Invalid(format!(
                "weights format version {version}, this library reads {VERSION}"
            )));
        }
        let count = r.u32()? as usize;
        if count > limits.max_tensors {
            return Err(WeightsError::TooLarge(format!(
                "{count} tensors (limit {})",
                limits.max_tensors
            )));
        }
        let mut tensors = Vec::with_capacity(count.min(1024));
        let mut total = 0usize;
        for _ in 0..count {
            let name_len = r.u16()? as usize;
            if name_len > limits.max_name_bytes {
                return Err(WeightsError::TooLarge(format!(
                    "a tensor name of {name_len} bytes (limit {})",
                    limits.max_name_bytes
                )));
            }
            let name = std::str::from_utf8(r.take(name_len)?)
                .map_err(|_| WeightsError::Invalid("a tensor name is not UTF-8".into()))?
                .to_owned();
            let encoding = Encoding::from_tag(r.u8()?).ok_or_else(|| {
                WeightsError::Invalid(format!("tensor {name:?} has an unknown encoding"))
            })?;
            let rank = r.u8()? as usize;
            if rank > limits.max_rank {
                return Err(WeightsError::TooLarge(format!(
                    "tensor {name:?} has rank {rank} (limit {})",
                    limits.max_rank
                )));
            }
            let mut shape = Vec::with_capacity(rank);
            let mut len = 1usize;
            for _ in 0..rank {
                let d = usize::try_from(r.u64()?).map_err(|_| {
                    WeightsError::TooLarge(format!("tensor {name:?} has a huge dimension"))
                })?;
                len = len
                    .checked_mul(d)
                    .ok_or_else(|| WeightsError::TooLarge(format!("tensor {name:?} overflows")))?;
                shape.push(d);
            }
            total = total.saturating_add(len);
            if total > limits.max_values {
                return Err(WeightsError::TooLarge(format!(
                    "more than {} values",
                    limits.max_values
                )));
            }
            let params = if encoding == Encoding::Int8 {
                Some((r.f32()?, r.f32()?))
            } else {
                None
            };
            let raw = r
                .take(len.checked_mul(encoding.width()).ok_or_else(|| {
                    WeightsError::TooLarge(format!("tensor {name:?} overflows"))
                })?)?;
            let values: Vec<f32> = match (encoding, params) {
                (Encoding::F32, _) => raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                (Encoding::F16, _) => raw
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                (Encoding::Int8, Some((min, scale))) => {
                    raw.iter().map(|&q| min + f32::from(q) * scale).collect()
                }
                (Encoding::Int8, None) => unreachable_params()?,
            };
            let array = ArrayD::from_shape_vec(IxDyn(&shape), values)
                .map_err(|e| WeightsError::Invalid(format!("tensor {name:?}: {e}")))?;
            tensors.push((name, array));
        }
        if r.at != bytes.len() {
            return Err(WeightsError::Invalid(format!(
                "{} bytes after the last tensor",
                bytes.len() - r.at
            )));
        }
        Weights::new(tensors)
    }
}

fn unreachable_params() -> Result<Vec<f32>, WeightsError> {
    Err(WeightsError::Invalid(
        "int8 tensor without parameters".into(),
    ))
}

/// Minimum and scale of the 8-bit affine quantization of a tensor.
fn int8_params(array: &ArrayD<f32>) -> Result<(f32, f32), String> {
    let mut min = f32::INFINITY;
    let mut max = f32::NEG_INFINITY;
    for &v in array {
        if !v.is_finite() {
            return Err(format!("{v} cannot be quantized"));
        }
        min = min.min(v);
        max = max.max(v);
    }
    if array.is_empty() {
        return Ok((0.0, 0.0));
    }
    Ok((min, (max - min) / 255.0))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WeightsError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                WeightsError::Invalid(format!(
                    "message truncated: {} more bytes expected at offset {}",
                    n, self.at
                ))
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WeightsError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WeightsError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WeightsError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WeightsError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn f32(&mut self) -> Result<f32, WeightsError> {
        Ok(f32::from_bits(self.u32()?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn random(seed: u64, shapes: &[&[usize]], spread: f32) -> Weights {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Weights::new(
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let len = s.iter().product();
                    let v: Vec<f32> = (0..len)
                        .map(|_| (rng.random::<f32>() - 0.5) * 2.0 * spread)
                        .collect();
                    (
                        format!("layer{i}"),
                        ArrayD::from_shape_vec(IxDyn(s), v).unwrap(),
                    )
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn f32_round_trips_bit_exactly() {
        let w = random(1, &[&[3, 4], &[4], &[2, 2, 2], &[]], 10.0);
        let bytes = w.encode(Encoding::F32).unwrap();
        assert_eq!(bytes.len(), w.encoded_len(Encoding::F32));
        assert_eq!(Weights::decode(&bytes, &Limits::default()).unwrap(), w);
    }

    #[test]
    fn fp16_round_trips_within_its_documented_bound() {
        let mut w = random(2, &[&[64, 64]], 100.0);
        // also tiny and zero values
        w.arrays_mut().next().unwrap()[[0, 0]] = 1e-6;
        w.arrays_mut().next().unwrap()[[0, 1]] = 0.0;
        let bytes = w.encode(Encoding::F16).unwrap();
        assert_eq!(bytes.len(), w.encoded_len(Encoding::F16));
        let back = Weights::decode(&bytes, &Limits::default()).unwrap();
        for (x, y) in w.tensors()[0].1.iter().zip(back.tensors()[0].1.iter()) {
            let bound = if x.abs() >= 2f32.powi(-14) {
                x.abs() * 2f32.powi(-11)
            } else {
                2f32.powi(-25)
            };
            assert!((x - y).abs() <= bound, "{x} came back as {y}");
        }
        let big =
            Weights::new(vec![("w".into(), ArrayD::from_elem(IxDyn(&[1]), 70_000.0))]).unwrap();
        let e = big.encode(Encoding::F16).unwrap_err();
        assert!(e.to_string().contains("beyond fp16's range"), "{e}");
    }

    #[test]
    fn int8_round_trips_within_its_documented_bound() {
        let w = random(3, &[&[1000], &[10, 10]], 3.0);
        let bytes = w.encode(Encoding::Int8).unwrap();
        assert_eq!(bytes.len(), w.encoded_len(Encoding::Int8));
        assert!(bytes.len() < w.encoded_len(Encoding::F32) / 3);
        let back = Weights::decode(&bytes, &Limits::default()).unwrap();
        for ((_, a), (_, b)) in w.tensors().iter().zip(back.tensors()) {
            let min = a.iter().copied().fold(f32::INFINITY, f32::min);
            let max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let bound = (max - min) / 510.0 + 1e-6 * max.abs().max(min.abs());
            let worst = a
                .iter()
                .zip(b.iter())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(worst <= bound, "worst error {worst} > bound {bound}");
            assert!(
                worst > 0.0,
                "quantization must actually lose something here"
            );
        }
        // a constant tensor comes back exactly
        let c = Weights::new(vec![("c".into(), ArrayD::from_elem(IxDyn(&[5]), 0.75))]).unwrap();
        let back = Weights::decode(&c.encode(Encoding::Int8).unwrap(), &Limits::default()).unwrap();
        assert_eq!(back, c);
        let nan =
            Weights::new(vec![("n".into(), ArrayD::from_elem(IxDyn(&[1]), f32::NAN))]).unwrap();
        assert!(nan.encode(Encoding::Int8).is_err());
    }

    #[test]
    fn malformed_and_oversized_messages_are_errors() {
        let w = random(4, &[&[8, 8]], 1.0);
        let bytes = w.encode(Encoding::F32).unwrap();
        for cut in [0, 3, 5, 9, 20, bytes.len() - 1] {
            let e = Weights::decode(&bytes[..cut], &Limits::default()).unwrap_err();
            assert!(matches!(e, WeightsError::Invalid(_)), "cut {cut}: {e}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(
            Weights::decode(&extra, &Limits::default())
                .unwrap_err()
                .to_string()
                .contains("after the last tensor")
        );
        let tight = Limits {
            max_values: 63,
            ..Limits::default()
        };
        assert!(matches!(
            Weights::decode(&bytes, &tight),
            Err(WeightsError::TooLarge(_))
        ));
        // a header claiming a huge tensor is refused before allocating
        let mut huge = Vec::new();
        huge.extend_from_slice(b"SDNW\x01");
        huge.extend_from_slice(&1u32.to_le_bytes());
        huge.extend_from_slice(&1u16.to_le_bytes());
        huge.push(b'x');
        huge.push(0);
        huge.push(2);
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Weights::decode(&huge, &Limits::default()),
            Err(WeightsError::TooLarge(_))
        ));
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert!(
            Weights::decode(&wrong, &Limits::default())
                .unwrap_err()
                .to_string()
                .contains("not an SDNW")
        );
    }

    #[test]
    fn names_are_unique_and_layouts_compare() {
        let a = ArrayD::<f32>::zeros(IxDyn(&[2]));
        assert!(Weights::new(vec![("x".into(), a.clone()), ("x".into(), a.clone())]).is_err());
        assert!(Weights::new(vec![(String::new(), a.clone())]).is_err());
        let w1 = random(5, &[&[2, 3]], 1.0);
        let w2 = random(6, &[&[3, 2]], 1.0);
        assert!(
            w1.check_same_layout(&w2)
                .unwrap_err()
                .contains("shape [3, 2]")
        );
        assert!(w1.check_same_layout(&random(7, &[&[2, 3]], 1.0)).is_ok());
        assert_eq!(Encoding::parse("fp16").unwrap(), Encoding::F16);
        assert!(Encoding::parse("int4").is_err());
    }
}
