//! The global manager (Sedna's GM): controllers that turn the AI resources into workers.
//! They talk to any Kubernetes API through kube-rs (a real cluster, or `sedna-apiserver`),
//! run with `sedna gm` or inside `sedna up`.
//!
//! - [`model`]: checks each Model's URL and reports readiness in its status.
//! - [`joint_inference`]: a JointInferenceService becomes a cloud-worker Pod (with a Service)
//!   and an edge-worker Pod, configured through Sedna's environment names.
//! - [`federated_learning`]: a FederatedLearningJob becomes an aggregation-worker Pod and one
//!   training-worker Pod per dataset, on the dataset's node.
//! - [`workers`]: building, placing and keeping worker pods, shared by the above.
//!
//! Reconciles are idempotent; errors requeue with jittered backoff; every transition is an
//! Event on the resource.
#![forbid(unsafe_code)]

pub mod federated_learning;
pub mod joint_inference;
pub mod model;
pub mod workers;

use std::time::Duration;

/// Controller errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request. Retryable.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A resource is malformed in a way the schema could not catch. Not retryable until it
    /// changes.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Whether trying again unchanged can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Kube(_))
    }
}

/// The requeue delay after the n-th consecutive failure: 1 s doubling to 5 min, with full
/// jitter.
pub fn backoff(failures: u32) -> Duration {
    let ceiling = Duration::from_secs(1)
        .saturating_mul(1u32.checked_shl(failures.min(9)).unwrap_or(u32::MAX))
        .min(Duration::from_secs(300));
    ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Runs every controller until `shutdown` completes.
pub async fn run(client: kube::Client, shutdown: impl std::future::Future<Output = ()> + Send) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let models = tokio::spawn(model::run(client.clone(), wait(rx.clone())));
    let services = tokio::spawn(joint_inference::run(client.clone(), wait(rx.clone())));
    let jobs = tokio::spawn(federated_learning::run(client, wait(rx)));
    shutdown.await;
    let _ = tx.send(true);
    let _ = models.await;
    let _ = services.await;
    let _ = jobs.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for failures in 0..20 {
            let d = backoff(failures);
            let ceiling =
                Duration::from_secs(1u64 << failures.min(9)).min(Duration::from_secs(300));
            assert!(d <= ceiling && d >= ceiling / 2, "{failures}: {d:?}");
        }
    }
}
