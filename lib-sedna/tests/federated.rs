//! Federated learning through the client API, the binary frames and a real aggregator on
//! real data: softmax regression on the digits held-out split, spread over three clients
//! that each see only some classes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
mod common;

use ndarray::{Array1, Array2, Axis};
use sedna::aggregate::{self, Update};
use sedna::fl::{Estimator, EstimatorError, FederatedLearning, Message, TrainReport};
use sedna::weights::{Encoding, Limits, Weights};

fn digits() -> (Array2<f32>, Vec<usize>) {
    let (x, y) = common::held_out();
    (x, y.into_iter().map(|v| v as usize).collect())
}

/// Multinomial logistic regression trained by full-batch gradient descent.
struct Softmax {
    w: Array2<f32>,
    b: Array1<f32>,
    x: Array2<f32>,
    y: Vec<usize>,
    test_x: Array2<f32>,
    test_y: Vec<usize>,
}

impl Softmax {
    fn probabilities(&self, x: &Array2<f32>) -> Array2<f32> {
        let mut logits = x.dot(&self.w) + &self.b;
        for mut row in logits.axis_iter_mut(Axis(0)) {
            let max = row.fold(f32::MIN, |m, v| m.max(*v));
            row.mapv_inplace(|v| (v - max).exp());
            let sum = row.sum();
            row.mapv_inplace(|v| v / sum);
        }
        logits
    }

    fn accuracy(&self, x: &Array2<f32>, y: &[usize]) -> f64 {
        let p = self.probabilities(x);
        let correct = p
            .axis_iter(Axis(0))
            .zip(y)
            .filter(|(row, label)| {
                row.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0
                    == **label
            })
            .count();
        correct as f64 / y.len() as f64
    }
}

impl Estimator for Softmax {
    fn get_weights(&self) -> Weights {
        Weights::new(vec![
            ("w".into(), self.w.clone().into_dyn()),
            ("b".into(), self.b.clone().into_dyn()),
        ])
        .unwrap()
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<(), EstimatorError> {
        let w = weights
            .get("w")
            .ok_or_else(|| EstimatorError::new("no tensor w"))?;
        let b = weights
            .get("b")
            .ok_or_else(|| EstimatorError::new("no tensor b"))?;
        self.w = w
            .clone()
            .into_dimensionality()
            .map_err(|e| EstimatorError::new(e.to_string()))?;
        self.b = b
            .clone()
            .into_dimensionality()
            .map_err(|e| EstimatorError::new(e.to_string()))?;
        Ok(())
    }

    fn train(
        &mut self,
        settings: &BTreeMap<String, String>,
    ) -> Result<TrainReport, EstimatorError> {
        let epochs: usize = settings
            .get("epochs")
            .map_or(Ok(10), |v| v.parse())
            .map_err(|_| EstimatorError::new("epochs"))?;
        let lr = 0.5f32;
        let n = self.y.len() as f32;
        for _ in 0..epochs {
            let mut grad = self.probabilities(&self.x);
            for (mut row, label) in grad.axis_iter_mut(Axis(0)).zip(&self.y) {
                row[*label] -= 1.0;
            }
            let gw = self.x.t().dot(&grad) / n;
            let gb = grad.sum_axis(Axis(0)) / n;
            self.w.scaled_add(-lr, &gw);
            self.b.scaled_add(-lr, &gb);
        }
        Ok(TrainReport {
            num_samples: self.y.len() as u64,
            metrics: BTreeMap::from([("train_accuracy".into(), self.accuracy(&self.x, &self.y))]),
        })
    }

    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>, EstimatorError> {
        Ok(BTreeMap::from([(
            "accuracy".into(),
            self.accuracy(&self.test_x, &self.test_y),
        )]))
    }

    fn num_samples(&self) -> u64 {
        self.y.len() as u64
    }
}

#[test]
fn fedavg_over_clients_with_disjoint_classes_learns_what_none_learns_alone() {
    let (x, y) = digits();
    let (train_rows, test_rows): (Vec<usize>, Vec<usize>) = (0..y.len()).partition(|i| i % 3 != 0);
    let test_x = x.select(Axis(0), &test_rows);
    let test_y: Vec<usize> = test_rows.iter().map(|i| y[*i]).collect();
    let classes = [[0usize, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]];
    let make = |k: usize| {
        let rows: Vec<usize> = train_rows
            .iter()
            .copied()
            .filter(|i| classes[k].contains(&y[*i]))
            .collect();
        Softmax {
            w: Array2::zeros((64, 10)),
            b: Array1::zeros(10),
            x: x.select(Axis(0), &rows),
            y: rows.iter().map(|i| y[*i]).collect(),
            test_x: test_x.clone(),
            test_y: test_y.clone(),
        }
    };
    let mut clients: Vec<_> = (0..3)
        .map(|k| FederatedLearning::new("digits", &format!("edge-{k}"), make(k), Encoding::F16))
        .collect();
    let limits = Limits::default();
    for client in &mut clients {
        let join = Message::decode(&client.join().encode(Encoding::F32).unwrap(), &limits).unwrap();
        assert!(matches!(join, Message::Join { .. }));
    }

    let mut global = clients[0].estimator().get_weights();
    let mut aggregator = aggregate::build("FedAvg", &[]).unwrap();
    let settings = BTreeMap::from([("epochs".to_string(), "10".to_string())]);
    let mut uplink_bytes = 0;
    for round in 1..=15 {
        let train = Message::Train {
            round,
            weights: global.clone(),
            settings: settings.clone(),
        };
        let frame = train.encode(Encoding::F32).unwrap();
        let mut updates = Vec::new();
        for client in &mut clients {
            let received = Message::decode(&frame, &limits).unwrap();
            let reply = client.handle(received).unwrap().unwrap();
            let bytes = reply.encode(client.encoding()).unwrap();
            uplink_bytes += bytes.len();
            match Message::decode(&bytes, &limits).unwrap() {
                Message::Update {
                    round: r,
                    num_samples,
                    weights,
                    ..
                } => {
                    assert_eq!(r, round);
                    updates.push(Update {
                        weights,
                        num_samples,
                    });
                }
                other => panic!("expected an update, got {other:?}"),
            }
        }
        global = aggregator.aggregate(&global, &updates).unwrap();
    }
    // fp16 updates: 2 bytes per parameter plus framing, far from JSON's ~10.
    let parameters = 64 * 10 + 10;
    assert!(
        uplink_bytes < 45 * parameters * 2 + 45 * 400,
        "uplink {uplink_bytes} bytes"
    );

    let mut federated = make(0);
    federated.set_weights(&global).unwrap();
    let federated_accuracy = federated.evaluate().unwrap()["accuracy"];
    for client in &mut clients {
        let reply = client
            .handle(Message::Evaluate {
                round: 16,
                weights: global.clone(),
            })
            .unwrap()
            .unwrap();
        let Message::Evaluation { metrics, .. } = reply else {
            panic!()
        };
        assert!((metrics["accuracy"] - federated_accuracy).abs() < 1e-9);
    }
    let mut alone = make(1);
    alone
        .train(&BTreeMap::from([("epochs".to_string(), "150".to_string())]))
        .unwrap();
    let alone_accuracy = alone.evaluate().unwrap()["accuracy"];
    eprintln!("federated {federated_accuracy:.3}, one client alone {alone_accuracy:.3}");
    assert!(federated_accuracy > 0.85, "federated {federated_accuracy}");
    assert!(alone_accuracy < 0.5, "one client alone {alone_accuracy}");

    for client in &mut clients {
        client
            .handle(Message::Finish {
                round: 15,
                weights: global.clone(),
            })
            .unwrap();
        let w = client.estimator().get_weights();
        assert_eq!(w.get("w").unwrap(), global.get("w").unwrap());
    }
}
