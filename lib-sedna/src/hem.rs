//! Hard-example mining: deciding, from the edge model's output, whether an input is hard
//! enough to ask the cloud (joint inference) or to keep for retraining (incremental learning).
//!
//! The built-in algorithms are Sedna's, formula for formula:
//!
//! | name | input | hard when | parameters (default) |
//! |---|---|---|---|
//! | `Threshold` | boxes `[x1, y1, x2, y2, score, label]` | mean(score) < `threshold` | `threshold` (0.5) |
//! | `CrossEntropy` | class probabilities p₁…p_N | 1 + Σ pᵢ·ln pᵢ / ln N < `threshold_cross_entropy` | `threshold_cross_entropy` (0.5) |
//! | `IBT` | boxes | count(score ≤ `threshold_box`) / count(boxes) ≥ 1 − `threshold_img` | `threshold_img` (0.5), `threshold_box` (0.5) |
//! | `Random` | anything | a uniform draw < `random_ratio` | `random_ratio` (0.3), `seed` (none) |
//! | `CloudOnly` | anything | always | — |
//! | `EdgeOnly` | anything | never | — |
//!
//! As in Sedna, invalid input is never hard: no boxes, a box with fewer than 5 values,
//! (CrossEntropy, IBT) a score or probability outside \[0, 1\]. Where Sedna raises instead
//! (a probability of exactly 0, whose `p·ln p` is taken as its limit 0; a single class, whose
//! `ln N` is 0), the input is not hard.
//!
//! Parameters come as Sedna passes them (`HEM_PARAMETERS`, a JSON list of `{key, value}` with
//! string values); a bad or unknown parameter is an error naming it.
//!
//! ```
//! use sedna::hem::{self, Input};
//! use ndarray::array;
//!
//! let ibt = hem::registry().build("IBT", &[("threshold_img", "0.9"), ("threshold_box", "0.7")])?;
//! let boxes = array![[0., 0., 10., 10., 0.95, 1.], [5., 5., 8., 8., 0.4, 2.]];
//! // 1 of 2 boxes scores ≤ 0.7: 0.5 ≥ 1 − 0.9.
//! assert!(ibt.is_hard(&Input::Boxes(boxes.view())));
//! # Ok::<(), sedna::hem::HemError>(())
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use ndarray::{ArrayView1, ArrayView2};
use rand::{RngExt, SeedableRng};

/// What a mining algorithm looks at.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// Detections, one row per box: `[x1, y1, x2, y2, score, label, …]`.
    Boxes(ArrayView2<'a, f32>),
    /// Class probabilities of one input.
    Probabilities(ArrayView1<'a, f32>),
    /// Nothing the algorithm can read (only `Random`, `CloudOnly`, `EdgeOnly` decide).
    Opaque,
}

/// A hard-example mining algorithm.
pub trait HardExampleMining: Send + Sync + std::fmt::Debug {
    /// Its name, as in `HEM_NAME`.
    fn name(&self) -> &str;
    /// Whether the input is a hard example.
    fn is_hard(&self, input: &Input<'_>) -> bool;
}

/// Why an algorithm could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HemError {
    /// No algorithm of that name is registered. Not retryable.
    #[error("unknown hard-example mining algorithm {name:?} (known: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The registered names.
        known: String,
    },
    /// A parameter has a bad value. Not retryable.
    #[error("hard-example mining {algorithm}: parameter {key} = {value:?}: {reason}")]
    InvalidParameter {
        /// Algorithm.
        algorithm: String,
        /// Parameter.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A parameter the algorithm does not take. Not retryable.
    #[error("hard-example mining {algorithm}: unknown parameter {key:?} (accepted: {accepted})")]
    UnknownParameter {
        /// Algorithm.
        algorithm: String,
        /// Parameter.
        key: String,
        /// What it accepts.
        accepted: String,
    },
    /// `HEM_PARAMETERS` is not Sedna's JSON list of `{key, value}`. Not retryable.
    #[error("HEM_PARAMETERS is not a JSON list of {{\"key\", \"value\"}} objects: {0}")]
    Parameters(String),
}

impl HemError {
    /// Whether trying again could succeed (never: the configuration must change).
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Parameters of one algorithm, checked as they are read.
#[derive(Debug)]
pub struct Params<'a> {
    algorithm: &'a str,
    values: BTreeMap<&'a str, &'a str>,
    accepted: &'static [&'static str],
}

impl<'a> Params<'a> {
    fn new(
        algorithm: &'a str,
        pairs: &'a [(&'a str, &'a str)],
        accepted: &'static [&'static str],
    ) -> Result<Self, HemError> {
        let mut values = BTreeMap::new();
        for (k, v) in pairs {
            if !accepted.contains(k) {
                return Err(HemError::UnknownParameter {
                    algorithm: algorithm.into(),
                    key: (*k).into(),
                    accepted: if accepted.is_empty() {
                        "none".into()
                    } else {
                        accepted.join(", ")
                    },
                });
            }
            values.insert(*k, *v);
        }
        Ok(Self {
            algorithm,
            values,
            accepted,
        })
    }

    fn invalid(&self, key: &str, value: &str, reason: &str) -> HemError {
        HemError::InvalidParameter {
            algorithm: self.algorithm.into(),
            key: key.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// A number in \[0, 1\], or the default.
    pub fn unit(&self, key: &str, default: f64) -> Result<f64, HemError> {
        debug_assert!(self.accepted.contains(&key));
        let Some(raw) = self.values.get(key) else {
            return Ok(default);
        };
        let v: f64 = raw
            .trim()
            .parse()
            .map_err(|_| self.invalid(key, raw, "not a number"))?;
        if !(0.0..=1.0).contains(&v) {
            return Err(self.invalid(key, raw, "must be between 0 and 1"));
        }
        Ok(v)
    }

    /// An unsigned integer, if given.
    pub fn integer(&self, key: &str) -> Result<Option<u64>, HemError> {
        self.values
            .get(key)
            .map(|raw| {
                raw.trim()
                    .parse()
                    .map_err(|_| self.invalid(key, raw, "not a non-negative integer"))
            })
            .transpose()
    }
}

/// `Threshold`: hard when the boxes' mean score is below the threshold (Sedna's rule). For
/// a classifier's probabilities, the score is the top probability (one "box").
#[derive(Clone, Debug)]
pub struct Threshold {
    /// The threshold.
    pub threshold: f64,
}

impl HardExampleMining for Threshold {
    fn name(&self) -> &str {
        "Threshold"
    }
    fn is_hard(&self, input: &Input<'_>) -> bool {
        let b = match input {
            Input::Boxes(b) => b,
            Input::Probabilities(p) => {
                let top = p
                    .iter()
                    .copied()
                    .filter(|x| x.is_finite())
                    .fold(f32::NAN, f32::max);
                return top.is_finite() && f64::from(top) < self.threshold;
            }
            Input::Opaque => return false,
        };
        if b.nrows() == 0 || b.ncols() < 5 {
            return false;
        }
        let mean = b.column(4).iter().map(|&s| f64::from(s)).sum::<f64>() / b.nrows() as f64;
        mean < self.threshold
    }
}

fn in_unit(x: f32) -> bool {
    (0.0..=1.0).contains(&x)
}

/// `CrossEntropy`: hard when the normalized confidence `1 + Σ p ln p / ln N` is below the
/// threshold (uniform probabilities give 0, a one-hot vector 1).
#[derive(Clone, Debug)]
pub struct CrossEntropy {
    /// `threshold_cross_entropy`.
    pub threshold: f64,
}

impl HardExampleMining for CrossEntropy {
    fn name(&self) -> &str {
        "CrossEntropy"
    }
    fn is_hard(&self, input: &Input<'_>) -> bool {
        let Input::Probabilities(p) = input else {
            return false;
        };
        if p.len() < 2 || !p.iter().all(|&x| in_unit(x)) {
            return false;
        }
        let sum: f64 = p
            .iter()
            .map(|&x| f64::from(x))
            .filter(|&x| x > 0.0)
            .map(|x| x * x.ln())
            .sum();
        let confidence = 1.0 + sum / (p.len() as f64).ln();
        confidence < self.threshold
    }
}

/// `IBT` (image-box threshold): hard when the share of boxes scoring at most `threshold_box`
/// is at least `1 − threshold_img`.
#[derive(Clone, Debug)]
pub struct Ibt {
    /// `threshold_img`.
    pub threshold_img: f64,
    /// `threshold_box`.
    pub threshold_box: f64,
}

impl HardExampleMining for Ibt {
    fn name(&self) -> &str {
        "IBT"
    }
    fn is_hard(&self, input: &Input<'_>) -> bool {
        let Input::Boxes(b) = input else { return false };
        if b.nrows() == 0 || b.ncols() < 5 {
            return false;
        }
        let scores = b.column(4);
        if !scores.iter().all(|&s| in_unit(s)) {
            return false;
        }
        let low = scores
            .iter()
            .filter(|&&s| f64::from(s) <= self.threshold_box)
            .count();
        low as f64 / b.nrows() as f64 >= 1.0 - self.threshold_img
    }
}

/// `Random`: hard with probability `random_ratio`.
#[derive(Debug)]
pub struct Random {
    /// `random_ratio`.
    pub ratio: f64,
    rng: Mutex<rand::rngs::StdRng>,
}

impl Random {
    /// With a seed, the sequence of decisions is reproducible.
    pub fn new(ratio: f64, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::seed_from_u64(rand::random()),
        };
        Self {
            ratio,
            rng: Mutex::new(rng),
        }
    }
}

impl HardExampleMining for Random {
    fn name(&self) -> &str {
        "Random"
    }
    fn is_hard(&self, _: &Input<'_>) -> bool {
        let draw: f64 = self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .random();
        draw < self.ratio
    }
}

/// `CloudOnly`: every input goes to the cloud.
#[derive(Clone, Copy, Debug)]
pub struct CloudOnly;

impl HardExampleMining for CloudOnly {
    fn name(&self) -> &str {
        "CloudOnly"
    }
    fn is_hard(&self, _: &Input<'_>) -> bool {
        true
    }
}

/// `EdgeOnly`: the edge answers everything.
#[derive(Clone, Copy, Debug)]
pub struct EdgeOnly;

impl HardExampleMining for EdgeOnly {
    fn name(&self) -> &str {
        "EdgeOnly"
    }
    fn is_hard(&self, _: &Input<'_>) -> bool {
        false
    }
}

/// Builds an algorithm from its parameters.
pub type Constructor =
    Arc<dyn Fn(&[(&str, &str)]) -> Result<Box<dyn HardExampleMining>, HemError> + Send + Sync>;

/// Algorithms by name: the built-ins, and whatever an app registers.
#[derive(Clone)]
pub struct Registry {
    constructors: Arc<RwLock<BTreeMap<String, Constructor>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Registry {
    /// A registry with Sedna's algorithms.
    pub fn with_builtins() -> Self {
        let r = Registry {
            constructors: Arc::default(),
        };
        r.register("Threshold", |p| {
            let p = Params::new("Threshold", p, &["threshold"])?;
            Ok(Box::new(Threshold {
                threshold: p.unit("threshold", 0.5)?,
            }))
        });
        r.register("CrossEntropy", |p| {
            let p = Params::new("CrossEntropy", p, &["threshold_cross_entropy"])?;
            Ok(Box::new(CrossEntropy {
                threshold: p.unit("threshold_cross_entropy", 0.5)?,
            }))
        });
        r.register("IBT", |p| {
            let p = Params::new("IBT", p, &["threshold_img", "threshold_box"])?;
            Ok(Box::new(Ibt {
                threshold_img: p.unit("threshold_img", 0.5)?,
                threshold_box: p.unit("threshold_box", 0.5)?,
            }))
        });
        r.register("Random", |p| {
            let p = Params::new("Random", p, &["random_ratio", "seed"])?;
            Ok(Box::new(Random::new(
                p.unit("random_ratio", 0.3)?,
                p.integer("seed")?,
            )))
        });
        r.register("CloudOnly", |p| {
            Params::new("CloudOnly", p, &[])?;
            Ok(Box::new(CloudOnly))
        });
        r.register("EdgeOnly", |p| {
            Params::new("EdgeOnly", p, &[])?;
            Ok(Box::new(EdgeOnly))
        });
        r
    }

    /// Adds (or replaces) an algorithm.
    pub fn register(
        &self,
        name: &str,
        constructor: impl Fn(&[(&str, &str)]) -> Result<Box<dyn HardExampleMining>, HemError>
        + Send
        + Sync
        + 'static,
    ) {
        self.constructors
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), Arc::new(constructor));
    }

    /// Registered names.
    pub fn names(&self) -> Vec<String> {
        self.constructors
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Builds the algorithm `name` with `parameters`.
    pub fn build(
        &self,
        name: &str,
        parameters: &[(&str, &str)],
    ) -> Result<Box<dyn HardExampleMining>, HemError> {
        let constructor = self
            .constructors
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| HemError::Unknown {
                name: name.into(),
                known: self.names().join(", "),
            })?;
        constructor(parameters)
    }

    /// Builds what `HEM_NAME` and `HEM_PARAMETERS` (Sedna's JSON list) ask for.
    pub fn build_from(
        &self,
        name: &str,
        parameters_json: Option<&str>,
    ) -> Result<Box<dyn HardExampleMining>, HemError> {
        let pairs = parse_parameters(parameters_json.unwrap_or("[]"))?;
        let borrowed: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.build(name, &borrowed)
    }
}

/// The process-wide registry (built-ins plus what the app registered).
pub fn registry() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(Registry::with_builtins)
}

/// Parses Sedna's `HEM_PARAMETERS`: `[{"key": "threshold", "value": "0.7"}, …]` (values may
/// also be JSON numbers).
pub fn parse_parameters(json: &str) -> Result<Vec<(String, String)>, HemError> {
    let trimmed = json.trim();
    if trimmed.is_empty() {
        return Ok(vec![]);
    }
    let value: serde_json::Value =
        serde_json::from_str(trimmed).map_err(|e| HemError::Parameters(e.to_string()))?;
    let items = value
        .as_array()
        .ok_or_else(|| HemError::Parameters("not a list".into()))?;
    items
        .iter()
        .map(|item| {
            let key = item
                .get("key")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| HemError::Parameters(format!("{item} has no string \"key\"")))?;
            let value = match item.get("value") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    v.to_string()
                }
                _ => {
                    return Err(HemError::Parameters(format!(
                        "{item} has no string or number \"value\""
                    )));
                }
            };
            Ok((key.to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ndarray::{Array2, array};

    fn boxes(scores: &[f32]) -> Array2<f32> {
        let mut a = Array2::zeros((scores.len(), 6));
        for (i, s) in scores.iter().enumerate() {
            a[[i, 2]] = 10.0;
            a[[i, 3]] = 10.0;
            a[[i, 4]] = *s;
            a[[i, 5]] = 1.0;
        }
        a
    }

    fn build(name: &str, params: &[(&str, &str)]) -> Box<dyn HardExampleMining> {
        registry().build(name, params).unwrap()
    }

    #[test]
    fn threshold_compares_the_mean_score() {
        let t = build("Threshold", &[("threshold", "0.5")]);
        // mean(0.9, 0.2, 0.3) = 0.4667 < 0.5
        assert!(t.is_hard(&Input::Boxes(boxes(&[0.9, 0.2, 0.3]).view())));
        // mean(0.75, 0.25, 0.5) = 0.5 exactly: not below
        assert!(!t.is_hard(&Input::Boxes(boxes(&[0.75, 0.25, 0.5]).view())));
        assert!(!t.is_hard(&Input::Boxes(boxes(&[]).view())), "no boxes");
        let short = Array2::<f32>::zeros((2, 4));
        assert!(
            !t.is_hard(&Input::Boxes(short.view())),
            "boxes without scores"
        );
        // Probabilities: the top probability is the score.
        assert!(!t.is_hard(&Input::Probabilities(array![0.1, 0.9].view())));
        assert!(t.is_hard(&Input::Probabilities(array![0.3, 0.45, 0.25].view())));
        assert!(
            !t.is_hard(&Input::Probabilities(array![0.5, 0.5].view())),
            "0.5 is not below"
        );
        assert!(!t.is_hard(&Input::Opaque));
        let default = build("Threshold", &[]);
        assert!(default.is_hard(&Input::Boxes(boxes(&[0.49]).view())));
    }

    #[test]
    fn cross_entropy_uses_the_normalized_entropy() {
        let c = build("CrossEntropy", &[("threshold_cross_entropy", "0.5")]);
        // p = (0.5, 0.5): 1 + (2 · 0.5 ln 0.5) / ln 2 = 1 − 1 = 0 < 0.5
        assert!(c.is_hard(&Input::Probabilities(array![0.5, 0.5].view())));
        // p = (0.9, 0.1): Σ p ln p = 0.9 ln 0.9 + 0.1 ln 0.1 = −0.0948 − 0.2303 = −0.3251;
        // 1 − 0.3251 / 0.6931 = 0.531 ≥ 0.5
        assert!(!c.is_hard(&Input::Probabilities(array![0.9, 0.1].view())));
        let c6 = build("CrossEntropy", &[("threshold_cross_entropy", "0.54")]);
        assert!(c6.is_hard(&Input::Probabilities(array![0.9, 0.1].view())));
        // (0.7, 0.2, 0.1): Σ = −0.2497 − 0.3219 − 0.2303 = −0.8018; 1 − 0.8018/1.0986 = 0.2702
        let c3 = build("CrossEntropy", &[("threshold_cross_entropy", "0.27")]);
        assert!(!c3.is_hard(&Input::Probabilities(array![0.7, 0.2, 0.1].view())));
        let c3 = build("CrossEntropy", &[("threshold_cross_entropy", "0.271")]);
        assert!(c3.is_hard(&Input::Probabilities(array![0.7, 0.2, 0.1].view())));
        // one-hot: confidence 1 (0 ln 0 taken as 0), never hard
        assert!(!c.is_hard(&Input::Probabilities(array![1.0, 0.0, 0.0].view())));
        // invalid: out of [0, 1], a single class, empty
        assert!(!c.is_hard(&Input::Probabilities(array![1.2, -0.2].view())));
        assert!(!c.is_hard(&Input::Probabilities(array![1.0].view())));
        assert!(!c.is_hard(&Input::Probabilities(array![].view())));
    }

    #[test]
    fn ibt_counts_low_scoring_boxes() {
        let i = build("IBT", &[("threshold_img", "0.5"), ("threshold_box", "0.5")]);
        // 2 of 4 boxes ≤ 0.5: 0.5 ≥ 1 − 0.5
        assert!(i.is_hard(&Input::Boxes(boxes(&[0.9, 0.5, 0.3, 0.8]).view())));
        // 1 of 4: 0.25 < 0.5
        assert!(!i.is_hard(&Input::Boxes(boxes(&[0.9, 0.6, 0.3, 0.8]).view())));
        let strict = build("IBT", &[("threshold_img", "0.8"), ("threshold_box", "0.5")]);
        // 1 of 4 = 0.25 ≥ 0.2
        assert!(strict.is_hard(&Input::Boxes(boxes(&[0.9, 0.6, 0.3, 0.8]).view())));
        // a score outside [0, 1] makes the input invalid
        assert!(!i.is_hard(&Input::Boxes(boxes(&[0.1, 1.5]).view())));
        assert!(!i.is_hard(&Input::Boxes(boxes(&[]).view())));
    }

    #[test]
    fn random_draws_at_the_ratio_and_repeats_with_a_seed() {
        let r = build("Random", &[("random_ratio", "0.3"), ("seed", "7")]);
        let hard = (0..10_000).filter(|_| r.is_hard(&Input::Opaque)).count();
        assert!((2_700..3_300).contains(&hard), "{hard} of 10000");
        let a = build("Random", &[("random_ratio", "0.5"), ("seed", "42")]);
        let b = build("Random", &[("random_ratio", "0.5"), ("seed", "42")]);
        let seq = |h: &dyn HardExampleMining| -> Vec<bool> {
            (0..64).map(|_| h.is_hard(&Input::Opaque)).collect()
        };
        assert_eq!(seq(a.as_ref()), seq(b.as_ref()));
        assert!(!build("Random", &[("random_ratio", "0")]).is_hard(&Input::Opaque));
        assert!(build("Random", &[("random_ratio", "1")]).is_hard(&Input::Opaque));
    }

    #[test]
    fn cloud_only_and_edge_only_ignore_the_input() {
        assert!(build("CloudOnly", &[]).is_hard(&Input::Opaque));
        assert!(!build("EdgeOnly", &[]).is_hard(&Input::Boxes(boxes(&[0.0]).view())));
    }

    #[test]
    fn bad_parameters_name_the_problem() {
        let e = registry()
            .build("Threshold", &[("threshold", "high")])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "hard-example mining Threshold: parameter threshold = \"high\": not a number"
        );
        let e = registry()
            .build("IBT", &[("threshold_img", "1.5")])
            .unwrap_err();
        assert!(e.to_string().contains("must be between 0 and 1"), "{e}");
        let e = registry()
            .build("IBT", &[("threshold", "0.5")])
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("accepted: threshold_img, threshold_box"),
            "{e}"
        );
        let e = registry().build("Fancy", &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("known: CloudOnly, CrossEntropy, EdgeOnly, IBT, Random, Threshold"),
            "{e}"
        );
        let e = registry().build("Random", &[("seed", "-1")]).unwrap_err();
        assert!(e.to_string().contains("seed"), "{e}");
    }

    #[test]
    fn sedna_parameter_lists_parse() {
        let h = registry()
            .build_from(
                "IBT",
                Some(r#"[{"key":"threshold_img","value":"0.9"},{"key":"threshold_box","value":0.7}]"#),
            )
            .unwrap();
        assert!(h.is_hard(&Input::Boxes(boxes(&[0.95, 0.4]).view())));
        assert!(registry().build_from("Threshold", None).is_ok());
        let e = registry()
            .build_from("Threshold", Some(r#"{"threshold": 1}"#))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("HEM_PARAMETERS is not a JSON list"),
            "{e}"
        );
        let e = registry()
            .build_from("Threshold", Some(r#"[{"value": "1"}]"#))
            .unwrap_err();
        assert!(e.to_string().contains("no string \"key\""), "{e}");
    }

    #[test]
    fn apps_register_their_own_algorithms() {
        #[derive(Debug)]
        struct Wide(usize);
        impl HardExampleMining for Wide {
            fn name(&self) -> &str {
                "ManyBoxes"
            }
            fn is_hard(&self, input: &Input<'_>) -> bool {
                matches!(input, Input::Boxes(b) if b.nrows() > self.0)
            }
        }
        let r = Registry::with_builtins();
        r.register("ManyBoxes", |p| {
            let limit = p
                .iter()
                .find(|(k, _)| *k == "limit")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(3);
            Ok(Box::new(Wide(limit)))
        });
        let h = r.build("ManyBoxes", &[("limit", "1")]).unwrap();
        assert!(h.is_hard(&Input::Boxes(boxes(&[0.9, 0.9]).view())));
        assert!(r.names().contains(&"ManyBoxes".to_owned()));
    }
}
