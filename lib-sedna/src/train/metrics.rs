//! Evaluation figures computed from a model's outputs: loss, accuracy, per-class precision,
//! recall and F1, the confusion matrix — under the metric names incremental learning's deploy
//! trigger and federated learning's status use ([`Evaluation::metrics`]).

use std::collections::BTreeMap;

use ndarray::ArrayView2;

use super::data::TargetsRef;

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassMetrics {
    /// Of the samples predicted as this class, the share that are.
    pub precision: f64,
    /// Of the samples of this class, the share predicted so.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Samples of this class.
    pub support: u64,
}

/// What [`super::Trainer::evaluate`] measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Samples evaluated.
    pub samples: usize,
    /// Mean loss: cross-entropy of the softmax for classification, mean squared error for
    /// regression.
    pub loss: f64,
    /// Share of samples whose highest output is their class (classification only).
    pub accuracy: Option<f64>,
    /// Per-class figures, by class index (classification only).
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true][predicted]` counts (classification only).
    pub confusion: Vec<Vec<u64>>,
}

impl Evaluation {
    /// The figures by name: `loss`, `samples`, and for classification `accuracy`,
    /// `precision`, `recall`, `f1` (macro averages over the classes that occur) and
    /// `precision_<c>`, `recall_<c>`, `f1_<c>` per class index.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        out.insert("loss".into(), self.loss);
        out.insert("samples".into(), self.samples as f64);
        if let Some(accuracy) = self.accuracy {
            out.insert("accuracy".into(), accuracy);
            let present: Vec<&ClassMetrics> = self
                .per_class
                .iter()
                .filter(|c| c.support > 0 || c.precision > 0.0)
                .collect();
            let mean = |f: fn(&ClassMetrics) -> f64| {
                if present.is_empty() {
                    0.0
                } else {
                    present.iter().map(|c| f(c)).sum::<f64>() / present.len() as f64
                }
            };
            out.insert("precision".into(), mean(|c| c.precision));
            out.insert("recall".into(), mean(|c| c.recall));
            out.insert("f1".into(), mean(|c| c.f1));
            for (i, c) in self.per_class.iter().enumerate() {
                out.insert(format!("precision_{i}"), c.precision);
                out.insert(format!("recall_{i}"), c.recall);
                out.insert(format!("f1_{i}"), c.f1);
            }
        }
        out
    }
}

/// Log of the softmax of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .fold(f64::NEG_INFINITY, |m, v| m.max(f64::from(*v)));
    let sum: f64 = row.iter().map(|v| (f64::from(*v) - max).exp()).sum();
    let log_sum = sum.ln() + max;
    row.iter().map(|v| f64::from(*v) - log_sum).collect()
}

/// Evaluates outputs (logits, or regression values) against targets.
pub(crate) fn evaluate(outputs: ArrayView2<'_, f32>, targets: TargetsRef<'_>) -> Evaluation {
    let n = outputs.nrows();
    match targets {
        TargetsRef::Classes(labels) => {
            let classes = outputs.ncols();
            let mut confusion = vec![vec![0u64; classes]; classes];
            let mut loss = 0.0;
            for (row, &label) in outputs.rows().into_iter().zip(labels) {
                let row = row.to_vec();
                let logp = log_softmax(&row);
                loss -= logp
                    .get(label as usize)
                    .copied()
                    .unwrap_or(f64::NEG_INFINITY);
                // The first highest output wins ties, as argmax does everywhere else.
                let predicted = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| {
                        if *v > bv { (i, *v) } else { (bi, bv) }
                    })
                    .0;
                if let Some(r) = confusion.get_mut(label as usize) {
                    r[predicted] += 1;
                }
            }
            let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
            let per_class = (0..classes)
                .map(|c| {
                    let tp = confusion[c][c] as f64;
                    let predicted: u64 = confusion.iter().map(|r| r[c]).sum();
                    let support: u64 = confusion[c].iter().sum();
                    let precision = if predicted == 0 {
                        0.0
                    } else {
                        tp / predicted as f64
                    };
                    let recall = if support == 0 {
                        0.0
                    } else {
                        tp / support as f64
                    };
                    let f1 = if precision + recall == 0.0 {
                        0.0
                    } else {
                        2.0 * precision * recall / (precision + recall)
                    };
                    ClassMetrics {
                        precision,
                        recall,
                        f1,
                        support,
                    }
                })
                .collect();
            Evaluation {
                samples: n,
                loss: loss / n.max(1) as f64,
                accuracy: Some(correct as f64 / n.max(1) as f64),
                per_class,
                confusion,
            }
        }
        TargetsRef::Values(values) => {
            let sum: f64 = outputs
                .iter()
                .zip(values.iter())
                .map(|(o, t)| (f64::from(*o) - f64::from(*t)).powi(2))
                .sum();
            Evaluation {
                samples: n,
                loss: sum / outputs.len().max(1) as f64,
                accuracy: None,
                per_class: vec![],
                confusion: vec![],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn classification_figures_match_a_hand_computation() {
        // Three classes; predictions: 0→0, 0→1, 1→1, 2→1.
        let logits = array![
            [2.0f32, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 3.0, 0.0],
            [0.0, 1.0, 0.5]
        ];
        let e = evaluate(logits.view(), TargetsRef::Classes(&[0, 0, 1, 2]));
        assert_eq!(e.accuracy, Some(0.5));
        assert_eq!(
            e.confusion,
            vec![vec![1, 1, 0], vec![0, 1, 0], vec![0, 1, 0]]
        );
        assert_eq!(
            e.per_class[0],
            ClassMetrics {
                precision: 1.0,
                recall: 0.5,
                f1: 2.0 / 3.0,
                support: 2
            }
        );
        assert_eq!(e.per_class[1].precision, 1.0 / 3.0);
        assert_eq!(
            e.per_class[2],
            ClassMetrics {
                precision: 0.0,
                recall: 0.0,
                f1: 0.0,
                support: 1
            }
        );
        let ce = |row: [f64; 3], c: usize| {
            let s: f64 = row.iter().map(|v| v.exp()).sum();
            -(row[c].exp() / s).ln()
        };
        let want = (ce([2.0, 0.0, 0.0], 0)
            + ce([0.0, 1.0, 0.0], 0)
            + ce([0.0, 3.0, 0.0], 1)
            + ce([0.0, 1.0, 0.5], 2))
            / 4.0;
        assert!((e.loss - want).abs() < 1e-9);
        let m = e.metrics();
        assert_eq!(m["accuracy"], 0.5);
        assert!((m["precision"] - (1.0 + 1.0 / 3.0 + 0.0) / 3.0).abs() < 1e-12);
        assert_eq!(m["recall_1"], 1.0);
    }

    #[test]
    fn regression_loss_is_the_mean_squared_error() {
        let e = evaluate(
            array![[1.0f32, 2.0], [3.0, 4.0]].view(),
            TargetsRef::Values(array![[1.0f32, 0.0], [3.0, 6.0]].view()),
        );
        assert_eq!(e.loss, 2.0);
        assert_eq!(e.accuracy, None);
        assert!(!e.metrics().contains_key("accuracy"));
    }
}
