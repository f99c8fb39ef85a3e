//! [`OnnxEstimator`]: the [`Estimator`] of an ONNX model trained by lib-sedna's
//! [`Trainer`] on local data — what a training worker needs, with no code of the user's.
//! Each round's settings from the aggregator (epochs, batch size, learning rate, FedProx's
//! `fedprox_mu`, …) are laid over the worker's own hyperparameters.

use std::collections::BTreeMap;

use super::{Estimator, EstimatorError, TrainReport};
use crate::train::{TrainData, Trainer, parse_parameters};
use crate::weights::Weights;

/// An ONNX model, its local training data and optionally local test data.
#[derive(Debug)]
pub struct OnnxEstimator {
    trainer: Trainer,
    data: TrainData,
    test: Option<TrainData>,
    parameters: BTreeMap<String, String>,
}

impl OnnxEstimator {
    /// Trains `trainer`'s model on `data`; `parameters` are the worker's hyperparameters
    /// (checked now: an unknown key or bad value is an error before the job starts).
    pub fn new(
        trainer: Trainer,
        data: TrainData,
        test: Option<TrainData>,
        parameters: BTreeMap<String, String>,
    ) -> Result<Self, EstimatorError> {
        parse_parameters(parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| EstimatorError::new(e.to_string()))?;
        Ok(OnnxEstimator {
            trainer,
            data,
            test,
            parameters,
        })
    }

    /// The trainer (the model with the weights it holds now).
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// The trainer, mutably.
    pub fn trainer_mut(&mut self) -> &mut Trainer {
        &mut self.trainer
    }
}

impl Estimator for OnnxEstimator {
    fn get_weights(&self) -> Weights {
        // A trainer always reports its parameters; an empty set would be refused by the
        // aggregator's layout check with a clear message.
        self.trainer.weights().unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading the model's weights failed");
            Weights::default()
        })
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<(), EstimatorError> {
        self.trainer
            .set_weights(weights)
            .map_err(|e| EstimatorError::new(e.to_string()))
    }

    fn train(
        &mut self,
        settings: &BTreeMap<String, String>,
    ) -> Result<TrainReport, EstimatorError> {
        let mut merged = self.parameters.clone();
        merged.extend(settings.iter().map(|(k, v)| (k.clone(), v.clone())));
        let (_, config) = parse_parameters(merged.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| EstimatorError::new(e.to_string()))?;
        let report = self
            .trainer
            .fit(&self.data, &config, &mut |_| {})
            .map_err(|e| EstimatorError::new(e.to_string()))?;
        let mut metrics = BTreeMap::new();
        if let Some(last) = report.history.last() {
            metrics.insert("train_loss".to_string(), last.train_loss);
        }
        metrics.insert("samples_per_sec".to_string(), report.samples_per_sec);
        Ok(TrainReport {
            num_samples: self.data.len() as u64,
            metrics,
        })
    }

    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>, EstimatorError> {
        let data = self.test.as_ref().unwrap_or(&self.data);
        self.trainer
            .evaluate(data)
            .map(|e| e.metrics())
            .map_err(|e| EstimatorError::new(e.to_string()))
    }

    fn num_samples(&self) -> u64 {
        self.data.len() as u64
    }
}
