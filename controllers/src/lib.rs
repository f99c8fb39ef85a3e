//! The global manager (Sedna's GM): controllers that turn the AI resources into workers.
//! They talk to any Kubernetes API through kube-rs (a real cluster, or `sedna-apiserver`),
//! run with `sedna gm` or inside `sedna up`.
//!
//! - [`model`]: checks each Model's URL and reports readiness in its status.
//! - [`joint_inference`]: a JointInferenceService becomes a cloud-worker Pod (with a Service)
//!   and an edge-worker Pod, configured through Sedna's environment names.
//! - [`federated_learning`]: a FederatedLearningJob becomes an aggregation-worker Pod and one
//!   training-worker Pod per dataset, on the dataset's node.
//! - [`incremental_learning`]: an IncrementalLearningJob's rounds, Train → Eval → Deploy, with
//!   an inference worker on the dataset's node that reloads each deployed model in place.
//! - [`workers`]: building, placing and keeping worker pods, shared by the above.
//! - [`scheduler`] and [`workloads`] (ReplicaSet, Deployment, DaemonSet, Job): what a cluster
//!   without kube-scheduler and kube-controller-manager lacks (`sedna up`'s embedded control
//!   plane); off against a real cluster (see [`run_with`]).
//!
//! Reconciles are idempotent; errors requeue with jittered backoff; every transition is an
//! Event on the resource.
#![forbid(unsafe_code)]

pub mod federated_learning;
pub mod incremental_learning;
pub mod joint_inference;
pub mod model;
pub mod scheduler;
pub mod workers;
pub mod workloads;

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

/// Consecutive reconcile failures per object: each failure doubles the object's retry delay
/// (see [`backoff`]), a success resets it. Objects are keyed by namespace and name.
#[derive(Debug, Default)]
pub struct Failures(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl Failures {
    fn key<K: kube::Resource>(object: &K) -> String {
        format!(
            "{}/{}",
            object.meta().namespace.as_deref().unwrap_or_default(),
            object.meta().name.as_deref().unwrap_or_default()
        )
    }

    /// Records a failure of `object`; returns the delay before its next try.
    pub fn failed<K: kube::Resource>(&self, object: &K) -> Duration {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = map.entry(Self::key(object)).or_insert(0);
        let delay = backoff(*count);
        *count = count.saturating_add(1);
        delay
    }

    /// Records a success of `object` (its next failure starts from the shortest delay).
    pub fn succeeded<K: kube::Resource>(&self, object: &K) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&Self::key(object));
    }
}

/// Runs every controller of the AI resources until `shutdown` completes.
pub async fn run(client: kube::Client, shutdown: impl std::future::Future<Output = ()> + Send) {
    run_with(client, false, shutdown).await;
}

/// Runs every controller until `shutdown` completes; with `workloads`, also the scheduler and
/// the ReplicaSet, Deployment, DaemonSet and Job controllers (for a control plane that lacks
/// them, never next to kube-scheduler and kube-controller-manager).
pub async fn run_with(
    client: kube::Client,
    workloads: bool,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let extra = workloads.then(|| {
        (
            tokio::spawn(scheduler::run(client.clone(), wait(rx.clone()))),
            tokio::spawn(workloads::run(client.clone(), wait(rx.clone()))),
        )
    });
    let models = tokio::spawn(model::run(client.clone(), wait(rx.clone())));
    let services = tokio::spawn(joint_inference::run(client.clone(), wait(rx.clone())));
    let jobs = tokio::spawn(federated_learning::run(client.clone(), wait(rx.clone())));
    let rounds = tokio::spawn(incremental_learning::run(client, wait(rx)));
    shutdown.await;
    let _ = tx.send(true);
    let _ = models.await;
    let _ = services.await;
    let _ = jobs.await;
    let _ = rounds.await;
    if let Some((scheduler, workloads)) = extra {
        let _ = scheduler.await;
        let _ = workloads.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_of_one_object_grow_and_reset_on_success_independently_of_others() {
        let object = |name: &str| sedna_api::model::Model {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: serde_json::from_value(serde_json::json!({ "url": "/m.onnx", "format": "onnx" }))
                .unwrap(),
            status: None,
        };
        let (a, b) = (object("a"), object("b"));
        let failures = Failures::default();
        let delays: Vec<Duration> = (0..6).map(|_| failures.failed(&a)).collect();
        for (n, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_secs(1 << n);
            assert!(*d <= ceiling && *d >= ceiling / 2, "failure {n}: {d:?}");
        }
        assert!(
            failures.failed(&b) <= Duration::from_secs(1),
            "b has its own count"
        );
        failures.succeeded(&a);
        assert!(
            failures.failed(&a) <= Duration::from_secs(1),
            "reset by a success"
        );
    }

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
