//! The FederatedLearningJob controller.
//!
//! For a job `J` it keeps, owned by `J` (deleting `J` removes them):
//! - Pod `J-aggregator` from `aggregationWorker.template` (`sedna-cloud-worker aggregate`):
//!   `JOB_NAME`, `NAMESPACE`, `WORKER_NAME`, `MODEL_URL` (the job's Model: where the final
//!   model is written), `BASE_MODEL_URL` (`pretrainedModel`, the starting point),
//!   `TEST_DATASET_URL` (`aggregationWorker.testDataset`), `PARTICIPANTS_COUNT`, `AGG_PORT`,
//!   `SEDNA_LISTEN_HOST=0.0.0.0` and the job's settings as `SEDNA_FL_*` (rounds, minClients,
//!   roundTimeoutSeconds, the aggregation algorithm and its parameters).
//! - Pod `J-train-<i>` per `trainingWorkers[i]` (`sedna-edge-worker train`), on its Dataset's
//!   node (`nodeName`, or the first Ready node matching `nodeSelector`), once the aggregator
//!   runs: `MODEL_URL` (the starting model), `TRAIN_DATASET_URL`, `AGG_IP`/`AGG_PORT` (the
//!   direct route) and `SEDNA_AGG_TUNNEL` (the default: through the node's connection to the
//!   hub, to the `aggregator` endpoint the pod declares).
//! - Secret `J-service-token`, mounted in every worker (`SEDNA_SERVICE_TOKEN_FILE`): the
//!   aggregator admits only connections that open with it.
//!
//! Workers restart on failure (`OnFailure`); the aggregator resumes after its last
//! checkpointed round. A finished worker is left as it is. Status: `phase` (Pending until
//! every worker runs, Running, Succeeded when the aggregator finished, Failed when it failed
//! or the job cannot run), `active`/`succeeded`/`failed` pods, a `Training` condition,
//! `startTime`/`completionTime`, Events; the aggregator reports `round`, `lastRoundClients`
//! and the per-round `metrics` itself. On success the job's Model gets the final metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Client, Resource, ResourceExt};
use sedna_api::common::{Condition, ConditionStatus, WorkloadPhase, set_condition};
use sedna_api::dataset::Dataset;
use sedna_api::federated_learning::FederatedLearningJob;
use sedna_api::model::Model;

use crate::Error;
use crate::workers::{self, Context, ENDPOINTS_ANNOTATION, PodPlan, Stopped, pod_phase};

/// Annotation choosing the aggregator's port.
pub const PORT_ANNOTATION: &str = "sedna.io/aggregator-port";
/// Label naming the job a worker belongs to.
pub const JOB_LABEL: &str = "sedna.io/federated-learning-job";
/// Label saying which worker a pod is (`aggregator` or `train`).
pub const WORKER_LABEL: &str = "sedna.io/worker";

/// What the job's workers are built from, resolved from its Models and Datasets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInputs {
    /// Where the final model goes (the job's Model) and its credentials Secret.
    pub output: (String, Option<String>),
    /// The model training starts from.
    pub start: String,
    /// The held-out data on the aggregator's node, if any.
    pub test: Option<String>,
    /// The aggregator's node, when its template uses `nodeSelector`.
    pub aggregator_node: Option<String>,
    /// Per training worker: its Dataset's URL, its node, its Secret.
    pub trainers: Vec<(String, String, Option<String>)>,
    /// The aggregator's port.
    pub port: u16,
}

fn owner(job: &FederatedLearningJob) -> Option<OwnerReference> {
    job.controller_owner_ref(&())
}

fn labels(job: &FederatedLearningJob, worker: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (JOB_LABEL.to_string(), job.name_any()),
        (WORKER_LABEL.to_string(), worker.to_string()),
    ])
}

/// The aggregator's port: `sedna.io/aggregator-port`, else derived from the job's kind,
/// namespace and name (a JointInferenceService of the same name gets another port).
pub fn aggregator_port(job: &FederatedLearningJob) -> Result<u16, Error> {
    let key = format!(
        "federatedlearningjob/{}/{}",
        job.namespace().unwrap_or_default(),
        job.name_any()
    );
    workers::endpoint_port(job.annotations(), PORT_ANNOTATION, &key)
}

/// Refuses what the schema cannot: `minClients` above the number of training workers.
pub fn validate(job: &FederatedLearningJob) -> Result<(), String> {
    let workers = job.spec.training_workers.len() as i64;
    if let Some(min) = job.spec.min_clients
        && min > workers
    {
        return Err(format!(
            "minClients {min} is more than the {workers} training workers"
        ));
    }
    if job.spec.target.is_some() && job.spec.aggregation_worker.test_dataset.is_none() {
        return Err(
            "target needs aggregationWorker.testDataset: the target is measured on held-out data"
                .into(),
        );
    }
    Ok(())
}

/// The job's `updateEncoding` as the workers name it.
fn encoding(job: &FederatedLearningJob) -> Option<String> {
    job.spec
        .update_encoding
        .and_then(|e| serde_json::to_value(e).ok())
        .and_then(|v| v.as_str().map(str::to_string))
}

/// The aggregation worker's pod (pure).
pub fn aggregator_pod(job: &FederatedLearningJob, inputs: &JobInputs) -> Result<Pod, Error> {
    let name = job.name_any();
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let pod_name = format!("{name}-aggregator");
    let parameters: Vec<serde_json::Value> = job
        .spec
        .aggregation
        .parameters
        .iter()
        .map(|kv| serde_json::json!({"key": kv.key, "value": kv.value}))
        .collect();
    let algorithm = serde_json::to_value(job.spec.aggregation.algorithm)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "FedAvg".into());
    let mut env = vec![
        ("JOB_NAME".to_string(), name.clone()),
        ("NAMESPACE".to_string(), ns),
        ("WORKER_NAME".to_string(), pod_name.clone()),
        ("MODEL_URL".to_string(), inputs.output.0.clone()),
        ("BASE_MODEL_URL".to_string(), inputs.start.clone()),
        (
            "PARTICIPANTS_COUNT".to_string(),
            job.spec.training_workers.len().to_string(),
        ),
        ("AGG_PORT".to_string(), inputs.port.to_string()),
        ("SEDNA_LISTEN_HOST".to_string(), "0.0.0.0".to_string()),
        ("SEDNA_FL_ALGORITHM".to_string(), algorithm),
        (
            "SEDNA_FL_AGGREGATION_PARAMETERS".to_string(),
            serde_json::Value::Array(parameters).to_string(),
        ),
    ];
    if let Some(rounds) = job.spec.rounds {
        env.push(("SEDNA_FL_ROUNDS".into(), rounds.to_string()));
    }
    if let Some(min) = job.spec.min_clients {
        env.push(("SEDNA_FL_MIN_CLIENTS".into(), min.to_string()));
    }
    if let Some(timeout) = job.spec.round_timeout_seconds {
        env.push(("SEDNA_FL_ROUND_TIMEOUT_SECONDS".into(), timeout.to_string()));
    }
    if let Some(test) = &inputs.test {
        env.push(("TEST_DATASET_URL".into(), test.clone()));
    }
    if let Some(encoding) = encoding(job) {
        env.push(("SEDNA_FL_ENCODING".into(), encoding));
    }
    if let Some(target) = &job.spec.target {
        env.push(("SEDNA_FL_TARGET_METRIC".into(), target.metric.clone()));
        env.push(("SEDNA_FL_TARGET_VALUE".into(), target.value.to_string()));
    }
    workers::build_pod(&PodPlan {
        owner: owner(job),
        namespace: job.namespace(),
        name: pod_name,
        template: &job.spec.aggregation_worker.template,
        labels: labels(job, "aggregator"),
        annotations: BTreeMap::new(),
        env,
        credentials: inputs.output.1.clone(),
        service_token: Some(workers::token_secret_name(&job.name_any())),
        node: inputs.aggregator_node.clone(),
        restart_policy: Some("OnFailure"),
    })
}

/// Training worker `index`'s pod (pure). Its node may reach the aggregator through the hub:
/// the pod declares it as its `aggregator` endpoint.
pub fn trainer_pod(
    job: &FederatedLearningJob,
    index: usize,
    inputs: &JobInputs,
    aggregator_ip: &str,
) -> Result<Pod, Error> {
    let name = job.name_any();
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let pod_name = format!("{name}-train-{index}");
    let (data_url, node, secret) = inputs
        .trainers
        .get(index)
        .cloned()
        .ok_or_else(|| Error::Invalid(format!("no training worker {index}")))?;
    let template = &job
        .spec
        .training_workers
        .get(index)
        .ok_or_else(|| Error::Invalid(format!("no training worker {index}")))?
        .template;
    let env = vec![
        ("JOB_NAME".to_string(), name.clone()),
        ("NAMESPACE".to_string(), ns.clone()),
        ("WORKER_NAME".to_string(), pod_name.clone()),
        ("MODEL_URL".to_string(), inputs.start.clone()),
        ("TRAIN_DATASET_URL".to_string(), data_url),
        ("AGG_IP".to_string(), aggregator_ip.to_string()),
        ("AGG_PORT".to_string(), inputs.port.to_string()),
        (
            "SEDNA_AGG_TUNNEL".to_string(),
            format!("{ns}/{pod_name}/aggregator"),
        ),
    ];
    let mut env = env;
    if let Some(encoding) = encoding(job) {
        env.push(("SEDNA_FL_UPDATE_ENCODING".into(), encoding));
    }
    let annotations = BTreeMap::from([(
        ENDPOINTS_ANNOTATION.to_string(),
        serde_json::json!({"aggregator": format!("{name}-aggregator:{}", inputs.port)}).to_string(),
    )]);
    workers::build_pod(&PodPlan {
        owner: owner(job),
        namespace: job.namespace(),
        name: pod_name,
        template,
        labels: labels(job, "train"),
        annotations,
        env,
        credentials: secret,
        service_token: Some(workers::token_secret_name(&job.name_any())),
        node: Some(node).filter(|_| template.spec.as_ref().is_none_or(|s| s.node_name.is_none())),
        restart_policy: Some("OnFailure"),
    })
}

/// What the controller concluded, to write into the status.
struct Verdict {
    phase: WorkloadPhase,
    condition: Condition,
    active: i32,
    succeeded: i32,
    failed: i32,
}

async fn set_status(
    ctx: &Context,
    api: &Api<FederatedLearningJob>,
    job: &FederatedLearningJob,
    v: Verdict,
) -> Result<(), Error> {
    let mut status = job.status.clone().unwrap_or_default();
    let old_phase = status.phase;
    let mut changed = set_condition(&mut status.conditions, v.condition.clone());
    changed |= status.phase != v.phase
        || status.active != v.active
        || status.succeeded != v.succeeded
        || status.failed != v.failed;
    let now = Time(jiff::Timestamp::now());
    let start = status.start_time.clone().unwrap_or_else(|| now.clone());
    changed |= status.start_time.is_none();
    let terminal = matches!(v.phase, WorkloadPhase::Succeeded | WorkloadPhase::Failed);
    let completion = if terminal {
        status.completion_time.clone().or(Some(now))
    } else {
        None
    };
    if !changed {
        return Ok(());
    }
    // Only the fields the controller owns: the aggregator owns round, lastRoundClients, metrics.
    let patch = serde_json::json!({"status": {
        "phase": v.phase, "active": v.active, "succeeded": v.succeeded, "failed": v.failed,
        "conditions": status.conditions, "startTime": start, "completionTime": completion,
    }});
    api.patch_status(
        &job.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    if old_phase != v.phase {
        let (type_, reason) = match v.phase {
            WorkloadPhase::Failed => (EventType::Warning, "Failed"),
            WorkloadPhase::Succeeded => (EventType::Normal, "Succeeded"),
            WorkloadPhase::Running => (EventType::Normal, "Running"),
            WorkloadPhase::Pending => (EventType::Normal, "Pending"),
        };
        let note = v
            .condition
            .message
            .clone()
            .unwrap_or_else(|| reason.to_string());
        ctx.events(job).publish(type_, reason, note).await;
    }
    Ok(())
}

async fn fail(
    ctx: &Context,
    api: &Api<FederatedLearningJob>,
    job: &FederatedLearningJob,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let condition = Condition::new(
        "Training",
        ConditionStatus::False,
        Time(jiff::Timestamp::now()),
    )
    .with_reason(reason)
    .with_message(message);
    set_status(
        ctx,
        api,
        job,
        Verdict {
            phase: WorkloadPhase::Failed,
            condition,
            active: 0,
            succeeded: 0,
            failed: 0,
        },
    )
    .await?;
    Ok(Action::await_change())
}

/// A Model's URL and Secret, or why it cannot be used.
async fn model_of(
    models: &Api<Model>,
    name: &str,
) -> Result<Result<(String, Option<String>), String>, Error> {
    Ok(match models.get_opt(name).await? {
        None => Err(format!("Model {name:?} not found")),
        Some(model) => match crate::model::check_url(&model.spec.url) {
            Some(problem) => Err(format!("Model {name:?}: {problem}")),
            None => Ok((model.spec.url.clone(), model.spec.credential_name.clone())),
        },
    })
}

/// A Dataset's URL, node and Secret (its `nodeName`, or the first Ready node of its
/// `nodeSelector`), or why it cannot be used.
async fn dataset_of(
    ctx: &Context,
    datasets: &Api<Dataset>,
    name: &str,
) -> Result<Result<(String, String, Option<String>), String>, Error> {
    let Some(dataset) = datasets.get_opt(name).await? else {
        return Ok(Err(format!("Dataset {name:?} not found")));
    };
    let node = match (&dataset.spec.node_name, &dataset.spec.node_selector) {
        (Some(node), _) => node.clone(),
        (None, Some(selector)) => {
            let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ctx.client.clone());
            let list = nodes.list(&Default::default()).await?;
            match workers::pick_node(selector, &list.items) {
                Some(node) => node,
                None => {
                    return Ok(Err(format!(
                        "Dataset {name:?}: no Ready node matches its nodeSelector {selector:?}"
                    )));
                }
            }
        }
        (None, None) => return Ok(Err(format!("Dataset {name:?} names no node"))),
    };
    Ok(Ok((
        dataset.spec.url.clone(),
        node,
        dataset.spec.credential_name.clone(),
    )))
}

/// The outcome the aggregator reported (`metrics[outcome]`), if any.
fn reported_outcome(job: &FederatedLearningJob) -> Option<(String, Option<String>)> {
    let metrics = &job.status.as_ref()?.metrics;
    let get = |key: &str| {
        metrics
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| kv.value.clone())
    };
    get("outcome").map(|o| (o, get("reason")))
}

async fn reconcile(job: Arc<FederatedLearningJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if matches!(phase, WorkloadPhase::Succeeded | WorkloadPhase::Failed) {
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let api: Api<FederatedLearningJob> = Api::namespaced(ctx.client.clone(), &ns);
    let models: Api<Model> = Api::namespaced(ctx.client.clone(), &ns);
    let datasets: Api<Dataset> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);

    if let Err(message) = validate(&job) {
        return fail(&ctx, &api, &job, "InvalidSpec", message).await;
    }
    let output = match model_of(&models, &job.spec.aggregation_worker.model.name).await? {
        Ok(m) => m,
        Err(message) => return fail(&ctx, &api, &job, "ModelNotReady", message).await,
    };
    let start = match &job.spec.pretrained_model {
        Some(pretrained) => match model_of(&models, &pretrained.name).await? {
            Ok((url, _)) => url,
            Err(message) => return fail(&ctx, &api, &job, "ModelNotReady", message).await,
        },
        None => output.0.clone(),
    };
    let test = match &job.spec.aggregation_worker.test_dataset {
        Some(test) => match dataset_of(&ctx, &datasets, &test.name).await? {
            Ok((url, _, _)) => Some(url),
            Err(message) => return fail(&ctx, &api, &job, "DatasetNotReady", message).await,
        },
        None => None,
    };
    let mut trainers = Vec::with_capacity(job.spec.training_workers.len());
    for worker in &job.spec.training_workers {
        match dataset_of(&ctx, &datasets, &worker.dataset.name).await? {
            Ok(t) => trainers.push(t),
            Err(message) => return fail(&ctx, &api, &job, "DatasetNotReady", message).await,
        }
    }
    let port = match aggregator_port(&job) {
        Ok(port) => port,
        Err(e) => return fail(&ctx, &api, &job, "InvalidPort", e.to_string()).await,
    };
    let aggregator_node = match workers::placement(
        &ctx.client,
        job.spec.aggregation_worker.template.spec.as_ref(),
    )
    .await?
    {
        Ok(node) => node,
        Err(message) => {
            return fail(
                &ctx,
                &api,
                &job,
                "Unschedulable",
                format!("aggregation worker: {message}"),
            )
            .await;
        }
    };
    let inputs = JobInputs {
        output,
        start,
        test,
        aggregator_node,
        trainers,
        port,
    };

    // The job's token: the aggregator admits only workers that present it.
    workers::ensure_token(
        &ctx.client,
        &ns,
        &job.name_any(),
        owner(&job),
        BTreeMap::from([(JOB_LABEL.to_string(), job.name_any())]),
    )
    .await?;
    let events = ctx.events(&*job);
    let aggregator = workers::ensure_pod(
        &pods,
        &events,
        aggregator_pod(&job, &inputs)?,
        Stopped::Keep,
    )
    .await?;
    let aggregator_ip = aggregator
        .as_ref()
        .filter(|p| pod_phase(p) == "Running")
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.pod_ip.clone());
    let mut trainers = Vec::new();
    if let Some(ip) = &aggregator_ip {
        for index in 0..job.spec.training_workers.len() {
            trainers.push(
                workers::ensure_pod(
                    &pods,
                    &events,
                    trainer_pod(&job, index, &inputs, ip)?,
                    Stopped::Keep,
                )
                .await?,
            );
        }
    }

    let all: Vec<&Pod> = std::iter::once(aggregator.as_ref())
        .chain(trainers.iter().map(Option::as_ref))
        .flatten()
        .collect();
    let count = |phase: &str| all.iter().filter(|p| pod_phase(p) == phase).count() as i32;
    let (active, succeeded, failed) = (count("Running"), count("Succeeded"), count("Failed"));
    let now = Time(jiff::Timestamp::now());
    let aggregator_phase = aggregator.as_ref().map(pod_phase).unwrap_or("Pending");
    let outcome = reported_outcome(&job);
    let rounds = job.status.as_ref().map_or(0, |s| s.round);
    let verdict = |phase, condition| Verdict {
        phase,
        condition,
        active,
        succeeded,
        failed,
    };
    let v = match (
        aggregator_phase,
        outcome.as_ref().map(|(o, r)| (o.as_str(), r.clone())),
    ) {
        (_, Some(("failed", reason))) | ("Failed", Some((_, reason))) => verdict(
            WorkloadPhase::Failed,
            Condition::new("Training", ConditionStatus::False, now)
                .with_reason("AggregationFailed")
                .with_message(reason.unwrap_or_else(|| "the aggregation worker failed".into())),
        ),
        ("Failed", None) => verdict(
            WorkloadPhase::Failed,
            Condition::new("Training", ConditionStatus::False, now)
                .with_reason("AggregationFailed")
                .with_message("the aggregation worker failed"),
        ),
        ("Succeeded", _) => verdict(
            WorkloadPhase::Succeeded,
            Condition::new("Training", ConditionStatus::False, now)
                .with_reason("Completed")
                .with_message(format!(
                    "finished after {rounds} rounds; the final model is in Model {}",
                    job.spec.aggregation_worker.model.name
                )),
        ),
        _ if aggregator_ip.is_some()
            && trainers.iter().all(|t| {
                t.as_ref()
                    .is_some_and(|p| matches!(pod_phase(p), "Running" | "Succeeded"))
            }) =>
        {
            verdict(
                WorkloadPhase::Running,
                Condition::new("Training", ConditionStatus::True, now)
                    .with_reason("WorkersRunning"),
            )
        }
        _ => verdict(
            WorkloadPhase::Pending,
            Condition::new("Training", ConditionStatus::False, now)
                .with_reason("WorkersStarting")
                .with_message(if aggregator_ip.is_none() {
                    "waiting for the aggregation worker to run"
                } else {
                    "waiting for the training workers to run"
                }),
        ),
    };
    let phase = v.phase;
    set_status(&ctx, &api, &job, v).await?;
    if phase == WorkloadPhase::Succeeded {
        // The job's Model now holds the trained model: give it the final figures.
        let metrics: Vec<serde_json::Value> = job
            .status
            .as_ref()
            .map(|s| {
                s.metrics
                    .iter()
                    .filter(|kv| kv.key.starts_with("test_"))
                    .map(|kv| serde_json::json!({"key": kv.key.trim_start_matches("test_"), "value": kv.value}))
                    .collect()
            })
            .unwrap_or_default();
        if !metrics.is_empty() {
            let patch = serde_json::json!({"status": {"metrics": metrics}});
            if let Err(e) = models
                .patch_status(
                    &job.spec.aggregation_worker.model.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                tracing::warn!(error = %e, "the trained Model's metrics were not recorded");
            }
        }
        return Ok(Action::await_change());
    }
    Ok(match phase {
        WorkloadPhase::Running => Action::requeue(Duration::from_secs(10)),
        WorkloadPhase::Failed => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(2)),
    })
}

/// Runs the FederatedLearningJob controller until `shutdown`.
pub async fn run(
    client: Client,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    workers::run_owning_pods::<FederatedLearningJob, _>(
        client,
        JOB_LABEL,
        "federated learning",
        reconcile,
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example's job (its three trainers share one template).
    fn job() -> FederatedLearningJob {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/federated-learning/mnist-digits.yaml"
        ))
        .unwrap();
        let docs = sedna_api::yaml_documents(&text).unwrap();
        let mut job = docs
            .into_iter()
            .find(|d| d["kind"] == "FederatedLearningJob")
            .unwrap();
        job["metadata"]["uid"] = "0f0f".into();
        job["spec"]["minClients"] = 2.into();
        job["spec"]["roundTimeoutSeconds"] = 60.into();
        job["spec"]["updateEncoding"] = "int8".into();
        serde_json::from_value(job).unwrap()
    }

    fn inputs() -> JobInputs {
        JobInputs {
            output: ("file:///out/digits.onnx".into(), Some("store".into())),
            start: "file:///models/init.onnx".into(),
            test: Some("/data/test-images.idx3-ubyte".into()),
            aggregator_node: Some("cloud".into()),
            trainers: (0..3)
                .map(|k| {
                    (
                        format!("/data/shard-{k}-images.idx3-ubyte.gz"),
                        format!("edge-{}", k + 1),
                        None,
                    )
                })
                .collect(),
            port: 23456,
        }
    }

    fn env(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn the_aggregator_gets_the_jobs_settings_in_sednas_names() {
        let job = job();
        let pod = aggregator_pod(&job, &inputs()).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("digits-aggregator"));
        let env = env(&pod);
        for (k, v) in [
            ("JOB_NAME", "digits"),
            ("MODEL_URL", "file:///out/digits.onnx"),
            ("BASE_MODEL_URL", "file:///models/init.onnx"),
            ("TEST_DATASET_URL", "/data/test-images.idx3-ubyte"),
            ("PARTICIPANTS_COUNT", "3"),
            ("AGG_PORT", "23456"),
            ("SEDNA_LISTEN_HOST", "0.0.0.0"),
            ("SEDNA_FL_ROUNDS", "5"),
            ("SEDNA_FL_MIN_CLIENTS", "2"),
            ("SEDNA_FL_ROUND_TIMEOUT_SECONDS", "60"),
            ("SEDNA_FL_ALGORITHM", "FedAvg"),
            ("SEDNA_FL_ENCODING", "int8"),
            ("SEDNA_CREDENTIALS_DIR", workers::CREDENTIALS_DIR),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("cloud"));
        assert_eq!(spec.restart_policy.as_deref(), Some("OnFailure"));
        assert_eq!(pod.metadata.owner_references.unwrap()[0].uid, "0f0f");
    }

    #[test]
    fn each_trainer_runs_on_its_datasets_node_and_may_reach_only_its_aggregator() {
        let job = job();
        let pod = trainer_pod(&job, 2, &inputs(), "10.0.0.7").unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("digits-train-2"));
        assert_eq!(
            pod.spec.as_ref().unwrap().node_name.as_deref(),
            Some("edge-3")
        );
        let env = env(&pod);
        assert_eq!(
            env["TRAIN_DATASET_URL"],
            "/data/shard-2-images.idx3-ubyte.gz"
        );
        assert_eq!(env["MODEL_URL"], "file:///models/init.onnx");
        assert_eq!(env["AGG_IP"], "10.0.0.7");
        assert_eq!(env["SEDNA_FL_UPDATE_ENCODING"], "int8");
        assert_eq!(env["SEDNA_AGG_TUNNEL"], "default/digits-train-2/aggregator");
        // The template's own (Sedna-style) hyperparameters are kept.
        assert_eq!(env["epochs"], "1");
        let declared: serde_json::Value =
            serde_json::from_str(&pod.metadata.annotations.as_ref().unwrap()[ENDPOINTS_ANNOTATION])
                .unwrap();
        assert_eq!(
            declared,
            serde_json::json!({"aggregator": "digits-aggregator:23456"})
        );
        assert!(trainer_pod(&job, 3, &inputs(), "10.0.0.7").is_err());
    }

    #[test]
    fn a_job_and_a_joint_inference_service_of_the_same_name_get_different_ports() {
        let job = job();
        let ji: sedna_api::joint_inference::JointInferenceService = serde_norway::from_str(
            "apiVersion: sedna.io/v1alpha1\nkind: JointInferenceService\nmetadata: {name: digits, namespace: default}\n\
             spec: {edgeWorker: {model: {name: a}, hardExampleMining: {name: EdgeOnly}, template: {}}, cloudWorker: {model: {name: b}, template: {}}}",
        )
        .unwrap();
        assert_ne!(
            aggregator_port(&job).unwrap(),
            crate::joint_inference::cloud_port(&ji).unwrap()
        );
    }

    #[test]
    fn min_clients_above_the_workers_is_refused_with_the_numbers() {
        let mut job = job();
        assert!(validate(&job).is_ok());
        job.spec.min_clients = Some(4);
        assert_eq!(
            validate(&job).unwrap_err(),
            "minClients 4 is more than the 3 training workers"
        );
    }

    #[test]
    fn a_target_is_passed_to_the_aggregator_and_needs_a_test_dataset() {
        let mut job = job();
        job.spec.target = Some(sedna_api::federated_learning::Target {
            metric: "accuracy".into(),
            value: 0.95,
        });
        let env = env(&aggregator_pod(&job, &inputs()).unwrap());
        assert_eq!(env["SEDNA_FL_TARGET_METRIC"], "accuracy");
        assert_eq!(env["SEDNA_FL_TARGET_VALUE"], "0.95");
        assert!(validate(&job).is_ok());
        job.spec.aggregation_worker.test_dataset = None;
        assert!(validate(&job).unwrap_err().contains("testDataset"));
    }
}
