//! The IncrementalLearningJob controller: Sedna's stage machine, Train → Eval → Deploy →
//! Train …, each stage Waiting / Ready / Starting / Running / Completed / Failed.
//!
//! For a job `J` it keeps, owned by `J`:
//! - Pod `J-infer` from `deploySpec.template` (`sedna-edge-worker infer`), always: it serves
//!   the deployed Model (`MODEL_URL`; with `hotUpdateEnabled` it polls the Model every
//!   `pollPeriodSeconds` through the node's local API and reloads it in place, else a deploy
//!   recreates the pod), mines hard examples with `HEM_NAME`/`HEM_PARAMETERS` and saves them
//!   beside the Dataset's index (`SEDNA_HARD_EXAMPLES_DIR`).
//! - Pod `J-train-<round>` from `trainSpec.template` (`sedna-cloud-worker train`) per round:
//!   Sedna's `BASE_MODEL_URL` (the deployed model; the initial model in round 1), `MODEL_URL`
//!   (where the candidate goes: `outputDir/round-<n>/model.onnx`), `TRAIN_DATASET_URL`,
//!   `SEDNA_TRAIN_PROB`.
//! - Pod `J-eval-<round>` from `evalSpec.template` (`sedna-cloud-worker evaluate`):
//!   `MODEL_URLS` (`candidate;deployed`), `TEST_DATASET_URL`, `SEDNA_TRAIN_PROB`.
//!
//! A round starts when the node holding the Dataset reports that the train trigger fired
//! (`status.trainTrigger`, evaluated on the node so it works while the cloud is unreachable)
//! or when the train-request annotation gets a new value. After evaluation the deploy
//! trigger's condition is checked on the metrics (`accuracy_delta` = candidate − deployed,
//! Sedna's `precision_delta[0]`); a candidate that passes is deployed by pointing the deploy
//! Model at it; the stage completes when the inference worker reports serving it.
//!
//! Unlike Sedna: a failed stage is retried from that stage (three tries, growing delays), not
//! sent back to Train; a worker deleted while its stage runs is recreated; a deploy that
//! cannot load is rolled back (the Model points at the previous model again); conditions are
//! one per type; every error requeues. The decisions are [`step`], a pure function of the
//! status and what was observed; the reconcile shell observes, applies its effects and writes the
//! status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Client, Resource, ResourceExt};
use sedna_api::common::{Condition, ConditionStatus, WorkloadPhase, set_condition};
use sedna_api::dataset::Dataset;
use sedna_api::incremental_learning::{
    IncrementalLearningJob, IncrementalLearningJobStatus as Status, MAX_ROUNDS_KEPT, ModelVersion,
    RoundRecord, Stage, StageState, TriggerCondition, deploy_metric,
};
use sedna_api::model::Model;

use crate::Error;
use crate::workers::{self, Context, PodPlan, Stopped, pod_phase};

/// Label naming the job a worker belongs to.
pub const JOB_LABEL: &str = "incrementallearningjob.sedna.io/name";
/// Label saying which worker a pod is (`train`, `eval` or `inference`), as Sedna's.
pub const WORKER_LABEL: &str = "incrementallearningjob.sedna.io/worker-type";
/// Label with the round a train or eval worker belongs to.
pub const ROUND_LABEL: &str = "incrementallearningjob.sedna.io/round";
/// Tries of a stage before it stays Failed (until a train request retries it).
pub const MAX_ATTEMPTS: i64 = 3;
/// How long a worker that exited successfully may take to have its report arrive.
pub const REPORT_GRACE: Duration = Duration::from_secs(300);

/// What the decisions depend on in the spec, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `initialModel`'s URL: what round 1 trains from.
    pub initial_url: String,
    /// What the first evaluation compares with (`evalSpec.initialEvalModel`, else the deployed
    /// model).
    pub initial_eval_url: Option<String>,
    /// The deploy Model's URL when the job started: the model served before any round.
    pub deploy_url: String,
    /// `outputDir`.
    pub output_dir: String,
    /// `deploySpec.trigger.condition`.
    pub deploy_condition: TriggerCondition,
}

impl Settings {
    /// Where round `round`'s candidate is written.
    pub fn candidate_url(&self, round: i64) -> String {
        format!(
            "{}/round-{round}/model.onnx",
            self.output_dir.trim_end_matches('/')
        )
    }
}

/// A worker pod as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// Not there (never created, or deleted).
    Absent,
    /// Created, not running yet.
    Pending,
    /// Running.
    Running,
    /// Exited successfully.
    Succeeded,
    /// Failed.
    Failed,
}

impl PodState {
    /// The state of an optional pod.
    pub fn of(pod: Option<&Pod>) -> PodState {
        match pod.map(pod_phase) {
            None => PodState::Absent,
            Some("Running") => PodState::Running,
            Some("Succeeded") => PodState::Succeeded,
            Some("Failed") => PodState::Failed,
            Some(_) => PodState::Pending,
        }
    }
}

/// What the shell observed for one step.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// Now.
    pub now: Timestamp,
    /// A train request not acted on yet (the annotation's new value).
    pub request: Option<&'a str>,
    /// The current round's worker of the current stage (train or eval).
    pub worker: PodState,
}

/// What the shell does for a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Make sure the current round's worker of this stage exists.
    CreateWorker(Stage),
    /// Delete the current round's worker of this stage (before a retry).
    DeleteWorker(Stage),
    /// Point the deploy Model at this URL.
    PointDeployModel(String),
    /// Record an Event.
    Event {
        /// Warning rather than Normal.
        warning: bool,
        /// Reason (CamelCase).
        reason: &'static str,
        /// What happened.
        message: String,
    },
}

fn event(warning: bool, reason: &'static str, message: String) -> Effect {
    Effect::Event {
        warning,
        reason,
        message,
    }
}

fn seconds_since(since: Option<&Time>, now: Timestamp) -> Option<f64> {
    since.map(|t| (now.as_millisecond() - t.0.as_millisecond()).max(0) as f64 / 1e3)
}

/// The delay before try `attempts + 1` of a failed stage: 10 s doubling.
pub fn retry_delay(attempts: i64) -> Duration {
    Duration::from_secs(10u64 << attempts.clamp(1, 6).saturating_sub(1))
}

/// One transition of the stage machine (pure): the new status and what to do. The shell
/// calls it until the status stops changing.
pub fn step(status: &Status, settings: &Settings, seen: &Observed<'_>) -> (Status, Vec<Effect>) {
    let mut next = status.clone();
    let mut effects = Vec::new();
    let now = Time(seen.now);
    let enter = |next: &mut Status, stage: Stage, state: StageState| {
        next.stage = Some(stage);
        next.stage_state = Some(state);
        next.stage_time = Some(now.clone());
    };
    if next.deployed.is_none() {
        next.deployed = Some(ModelVersion {
            round: 0,
            url: settings.deploy_url.clone(),
            metrics: BTreeMap::new(),
        });
    }
    let (stage, state) = match (status.stage, status.stage_state) {
        (Some(stage), Some(state)) => (stage, state),
        _ => {
            enter(&mut next, Stage::Train, StageState::Waiting);
            return (next, effects);
        }
    };
    let round = status.round;
    match (stage, state) {
        (Stage::Train, StageState::Waiting) => {
            let fired = status
                .train_trigger
                .as_ref()
                .filter(|t| t.round == round + 1);
            let started_by = match (seen.request, fired) {
                (Some(request), _) => {
                    next.last_train_request = Some(request.to_string());
                    "request"
                }
                (None, Some(_)) => "trigger",
                (None, None) => return (next, effects),
            };
            let samples = fired.map_or(status.last_round_samples, |t| t.samples);
            next.round = round + 1;
            next.last_round_samples = samples;
            next.attempts = 0;
            next.current = Some(RoundRecord {
                round: round + 1,
                triggered: fired
                    .filter(|_| started_by == "trigger")
                    .and_then(|t| t.time.clone()),
                started: Some(now.clone()),
                started_by: started_by.into(),
                samples,
                candidate_url: settings.candidate_url(round + 1),
                ..RoundRecord::default()
            });
            next.candidate = None;
            enter(&mut next, Stage::Train, StageState::Ready);
            let why = match fired {
                Some(t) if started_by == "trigger" => {
                    format!("{} new samples ({} in all)", t.new_samples, t.samples)
                }
                _ => "a train request".to_string(),
            };
            effects.push(event(
                false,
                "RoundStarted",
                format!("round {} started by {why}", round + 1),
            ));
        }
        (Stage::Train | Stage::Eval, StageState::Ready) => {
            effects.push(Effect::CreateWorker(stage));
            enter(&mut next, stage, StageState::Starting);
        }
        (Stage::Train | Stage::Eval, StageState::Starting | StageState::Running) => {
            match seen.worker {
                PodState::Absent => {
                    effects.push(event(
                        true,
                        "WorkerRecreated",
                        format!("the {stage:?} worker of round {round} was deleted; recreating it"),
                    ));
                    enter(&mut next, stage, StageState::Ready);
                }
                PodState::Pending => {}
                PodState::Running if state == StageState::Starting => {
                    enter(&mut next, stage, StageState::Running);
                }
                PodState::Running => {}
                PodState::Failed => {
                    next.attempts = status.attempts + 1;
                    effects.push(event(
                        true,
                        "StageFailed",
                        format!(
                            "the {stage:?} worker of round {round} failed (try {} of {MAX_ATTEMPTS})",
                            next.attempts
                        ),
                    ));
                    enter(&mut next, stage, StageState::Failed);
                }
                PodState::Succeeded => {
                    if stage_reported(status, stage) {
                        enter(&mut next, stage, StageState::Completed);
                    } else if seconds_since(status.stage_time.as_ref(), seen.now)
                        .is_some_and(|s| s > REPORT_GRACE.as_secs_f64())
                    {
                        next.attempts = status.attempts + 1;
                        effects.push(event(
                            true,
                            "StageFailed",
                            format!(
                                "the {stage:?} worker of round {round} exited without reporting"
                            ),
                        ));
                        enter(&mut next, stage, StageState::Failed);
                    }
                }
            }
        }
        (Stage::Train, StageState::Completed) => {
            let training = status.training.as_ref().filter(|t| t.round == round);
            let url = training
                .map(|t| t.model_url.clone())
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| settings.candidate_url(round));
            next.candidate = Some(ModelVersion {
                round,
                url,
                metrics: BTreeMap::new(),
            });
            if let Some(current) = next.current.as_mut() {
                current.train_seconds = seconds_since(current.started.as_ref(), seen.now);
            }
            next.attempts = 0;
            enter(&mut next, Stage::Eval, StageState::Ready);
        }
        (Stage::Eval, StageState::Completed) => {
            let Some(evaluation) = status.evaluation.as_ref().filter(|e| e.round == round) else {
                enter(&mut next, Stage::Eval, StageState::Ready);
                return (next, effects);
            };
            let verdict = settings
                .deploy_condition
                .check(|name| deploy_metric(name, &evaluation.candidate, &evaluation.deployed));
            if let Some(candidate) = next.candidate.as_mut() {
                candidate.metrics = evaluation.candidate.clone();
            }
            let condition = settings.deploy_condition.describe();
            let (deploy, reason) = match verdict {
                Ok((true, value)) => (true, format!("{condition} holds ({value:.4})")),
                Ok((false, value)) => (false, format!("{condition} does not hold ({value:.4})")),
                Err(e) => (false, format!("{condition} cannot be checked: {e}")),
            };
            if let Some(current) = next.current.as_mut() {
                current.candidate_metrics = headline(&evaluation.candidate);
                current.deployed_metrics = headline(&evaluation.deployed);
                current.eval_seconds = seconds_since(current.started.as_ref(), seen.now)
                    .map(|all| all - current.train_seconds.unwrap_or(0.0));
                current.reason = reason.clone();
                current.deployed = deploy;
            }
            next.attempts = 0;
            if deploy {
                enter(&mut next, Stage::Deploy, StageState::Ready);
            } else {
                effects.push(event(
                    false,
                    "NotDeployed",
                    format!("round {round}'s model is not deployed: {reason}"),
                ));
                finish_round(&mut next);
                enter(&mut next, Stage::Train, StageState::Waiting);
            }
        }
        (Stage::Deploy, StageState::Ready) => {
            let url = candidate_url(status, settings);
            effects.push(Effect::PointDeployModel(url.clone()));
            effects.push(event(
                false,
                "Deploying",
                format!("round {round}: deploying {url}"),
            ));
            enter(&mut next, Stage::Deploy, StageState::Starting);
        }
        (Stage::Deploy, StageState::Starting | StageState::Running) => {
            let url = candidate_url(status, settings);
            let inference = status.inference.as_ref();
            if inference.is_some_and(|i| i.model_url == url) {
                let mut deployed = next.candidate.clone().unwrap_or(ModelVersion {
                    round,
                    url: url.clone(),
                    metrics: BTreeMap::new(),
                });
                deployed.url = url.clone();
                next.deployed = Some(deployed);
                if let Some(current) = next.current.as_mut() {
                    current.deploy_seconds =
                        seconds_since(current.started.as_ref(), seen.now).map(|all| {
                            all - current.train_seconds.unwrap_or(0.0)
                                - current.eval_seconds.unwrap_or(0.0)
                        });
                }
                effects.push(event(
                    false,
                    "Deployed",
                    format!("round {round}: the inference worker serves {url}"),
                ));
                finish_round(&mut next);
                next.attempts = 0;
                enter(&mut next, Stage::Train, StageState::Waiting);
            } else if let Some(error) = inference
                .filter(|i| i.failed_url.as_deref() == Some(url.as_str()))
                .and_then(|i| i.last_error.clone())
            {
                next.attempts = status.attempts + 1;
                effects.push(event(
                    true,
                    "StageFailed",
                    format!("round {round}: the inference worker cannot load {url}: {error}"),
                ));
                enter(&mut next, Stage::Deploy, StageState::Failed);
            } else if state == StageState::Starting {
                enter(&mut next, Stage::Deploy, StageState::Running);
            }
        }
        (_, StageState::Failed) => {
            let retry = seen.request.is_some()
                || (status.attempts < MAX_ATTEMPTS
                    && seconds_since(status.stage_time.as_ref(), seen.now)
                        .is_some_and(|s| s >= retry_delay(status.attempts).as_secs_f64()));
            if let Some(request) = seen.request {
                next.last_train_request = Some(request.to_string());
                next.attempts = 0;
            }
            if retry {
                effects.push(event(
                    false,
                    "Retrying",
                    format!("round {round}: retrying the {stage:?} stage"),
                ));
                if stage != Stage::Deploy {
                    effects.push(Effect::DeleteWorker(stage));
                }
                enter(&mut next, stage, StageState::Ready);
            } else if stage == Stage::Deploy
                && status.attempts >= MAX_ATTEMPTS
                && next.current.as_ref().is_some_and(|c| c.deployed)
            {
                // Give up on this model: the Model points at the one still serving.
                let previous = status
                    .deployed
                    .as_ref()
                    .map_or(settings.deploy_url.clone(), |d| d.url.clone());
                effects.push(Effect::PointDeployModel(previous.clone()));
                effects.push(event(
                    true,
                    "RolledBack",
                    format!(
                        "round {round}: gave up deploying; the Model points at {previous} again"
                    ),
                ));
                if let Some(current) = next.current.as_mut() {
                    current.deployed = false;
                    current.reason = "the inference worker could not load it".into();
                }
            }
        }
        (_, StageState::Waiting) => enter(&mut next, stage, StageState::Ready),
        (Stage::Deploy, StageState::Completed) => {
            finish_round(&mut next);
            enter(&mut next, Stage::Train, StageState::Waiting);
        }
    }
    (next, effects)
}

/// The headline metrics of an evaluation (per-class figures stay in `status.evaluation` and
/// `eval.json`), so a round's record stays small.
fn headline(
    metrics: &sedna_api::incremental_learning::Metrics,
) -> sedna_api::incremental_learning::Metrics {
    metrics
        .iter()
        .filter(|(k, _)| {
            !["precision_", "recall_", "f1_"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

fn candidate_url(status: &Status, settings: &Settings) -> String {
    status
        .candidate
        .as_ref()
        .map_or_else(|| settings.candidate_url(status.round), |c| c.url.clone())
}

fn stage_reported(status: &Status, stage: Stage) -> bool {
    match stage {
        Stage::Train => status
            .training
            .as_ref()
            .is_some_and(|t| t.round == status.round),
        Stage::Eval => status
            .evaluation
            .as_ref()
            .is_some_and(|e| e.round == status.round),
        Stage::Deploy => true,
    }
}

fn finish_round(status: &mut Status) {
    if let Some(current) = status.current.take() {
        status.rounds.push(current);
        let excess = status.rounds.len().saturating_sub(MAX_ROUNDS_KEPT);
        status.rounds.drain(..excess);
    }
}

/// Steps until the status settles (at most a few transitions).
pub fn settle(status: &Status, settings: &Settings, seen: &Observed<'_>) -> (Status, Vec<Effect>) {
    let mut current = status.clone();
    let mut effects = Vec::new();
    let mut seen = seen.clone();
    for _ in 0..8 {
        let (next, more) = step(&current, settings, &seen);
        let settled = next == current;
        // A worker created in this pass is not observed yet; a request is acted on once.
        if more
            .iter()
            .any(|e| matches!(e, Effect::CreateWorker(_) | Effect::DeleteWorker(_)))
        {
            seen.worker = PodState::Pending;
        }
        if next.last_train_request != current.last_train_request {
            seen.request = None;
        }
        effects.extend(more);
        current = next;
        if settled {
            break;
        }
    }
    (current, effects)
}

fn owner(job: &IncrementalLearningJob) -> Option<OwnerReference> {
    job.controller_owner_ref(&())
}

fn labels(
    job: &IncrementalLearningJob,
    worker: &str,
    round: Option<i64>,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (JOB_LABEL.to_string(), job.name_any()),
        (WORKER_LABEL.to_string(), worker.to_string()),
    ]);
    if let Some(round) = round {
        labels.insert(ROUND_LABEL.to_string(), round.to_string());
    }
    labels
}

fn base_env(job: &IncrementalLearningJob, worker: &str) -> Vec<(String, String)> {
    vec![
        ("JOB_NAME".into(), job.name_any()),
        (
            "NAMESPACE".into(),
            job.namespace().unwrap_or_else(|| "default".into()),
        ),
        ("WORKER_NAME".into(), worker.to_string()),
    ]
}

/// What the workers are built from, resolved from the job's Models and Dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The decisions' settings.
    pub settings: Settings,
    /// The Dataset's index URL, its node, its format.
    pub dataset: (String, Option<String>, String),
    /// The deploy Model's current URL.
    pub deploy_model_url: String,
    /// The URL the running inference worker was started with, if it runs.
    pub inference_started_with: Option<String>,
    /// A Secret for `outputDir` and the models.
    pub credentials: Option<String>,
}

/// The inference worker's pod (pure).
pub fn inference_pod(job: &IncrementalLearningJob, r: &Resolved) -> Result<Pod, Error> {
    let deploy = &job.spec.deploy_spec;
    let name = format!("{}-infer", job.name_any());
    let mut env = base_env(job, &name);
    let hot = deploy.model.hot_update_enabled;
    // Hot: the URL a running worker started with stays (it follows the Model itself), so a
    // deploy does not change the pod; cold: the Model's current URL, so a deploy recreates it.
    let model_url = match (&r.inference_started_with, hot) {
        (Some(url), true) => url.clone(),
        _ => r.deploy_model_url.clone(),
    };
    env.push(("MODEL_URL".into(), model_url));
    env.push(("SEDNA_DEPLOY_MODEL".into(), deploy.model.name.clone()));
    env.push(("MODEL_HOT_UPDATE".into(), hot.to_string()));
    env.push((
        "MODEL_POLL_PERIOD_SECONDS".into(),
        deploy.model.poll_period_seconds.to_string(),
    ));
    env.push(("HEM_NAME".into(), deploy.hard_example_mining.name.clone()));
    // Sedna's JSON list of {key, value}.
    let parameters: Vec<serde_json::Value> = deploy
        .hard_example_mining
        .parameters
        .iter()
        .map(|kv| serde_json::json!({"key": kv.key, "value": kv.value}))
        .collect();
    env.push((
        "HEM_PARAMETERS".into(),
        serde_json::Value::Array(parameters).to_string(),
    ));
    if let Some(dir) = hard_examples_dir(&r.dataset.0) {
        env.push(("SEDNA_HARD_EXAMPLES_DIR".into(), dir));
    }
    workers::build_pod(&PodPlan {
        owner: owner(job),
        namespace: job.namespace(),
        name,
        template: &deploy.template,
        labels: labels(job, "inference", None),
        annotations: BTreeMap::new(),
        env,
        credentials: r.credentials.clone(),
        service_token: None,
        node: r.dataset.1.clone(),
        restart_policy: Some("Always"),
    })
}

/// Where the inference worker keeps hard examples: `hard-examples/` beside a local Dataset
/// index (an object-store Dataset gets none: the worker keeps them in its output).
pub fn hard_examples_dir(dataset_url: &str) -> Option<String> {
    let path = dataset_url.strip_prefix("file://").unwrap_or(dataset_url);
    if dataset_url.contains("://") && !dataset_url.starts_with("file://") || !path.starts_with('/')
    {
        return None;
    }
    let parent = std::path::Path::new(path).parent()?;
    Some(parent.join("hard-examples").display().to_string())
}

/// The current round's train or eval worker pod (pure).
pub fn stage_pod(
    job: &IncrementalLearningJob,
    stage: Stage,
    status: &Status,
    r: &Resolved,
) -> Result<Pod, Error> {
    let round = status.round;
    let (worker, template) = match stage {
        Stage::Train => ("train", &job.spec.train_spec.template),
        Stage::Eval => ("eval", &job.spec.eval_spec.template),
        Stage::Deploy => return Err(Error::Invalid("the deploy stage has no worker".into())),
    };
    let name = format!("{}-{worker}-{round}", job.name_any());
    let mut env = base_env(job, &name);
    let deployed = status
        .deployed
        .as_ref()
        .map_or(r.settings.deploy_url.clone(), |d| d.url.clone());
    let nothing_deployed_yet = status.deployed.as_ref().is_none_or(|d| d.round == 0);
    env.push(("SEDNA_ROUND".into(), round.to_string()));
    env.push((
        "SEDNA_TRAIN_PROB".into(),
        job.spec.dataset.train_prob.to_string(),
    ));
    env.push(("DATASET_FORMAT".into(), r.dataset.2.clone()));
    match stage {
        Stage::Train => {
            let base = if nothing_deployed_yet {
                r.settings.initial_url.clone()
            } else {
                deployed
            };
            env.push(("BASE_MODEL_URL".into(), base));
            env.push(("MODEL_URL".into(), r.settings.candidate_url(round)));
            env.push(("TRAIN_DATASET_URL".into(), r.dataset.0.clone()));
        }
        _ => {
            let compare = match (&r.settings.initial_eval_url, nothing_deployed_yet) {
                (Some(initial), true) => initial.clone(),
                _ => deployed,
            };
            env.push((
                "MODEL_URLS".into(),
                format!("{};{compare}", candidate_url(status, &r.settings)),
            ));
            env.push(("TEST_DATASET_URL".into(), r.dataset.0.clone()));
        }
    }
    workers::build_pod(&PodPlan {
        owner: owner(job),
        namespace: job.namespace(),
        name,
        template,
        labels: labels(job, worker, Some(round)),
        annotations: BTreeMap::new(),
        env,
        credentials: r.credentials.clone(),
        service_token: None,
        node: r.dataset.1.clone(),
        restart_policy: Some("Never"),
    })
}

async fn model_url(models: &Api<Model>, name: &str) -> Result<Result<String, String>, Error> {
    Ok(match models.get_opt(name).await? {
        None => Err(format!("Model {name:?} not found")),
        Some(model) => match crate::model::check_url(&model.spec.url) {
            Some(problem) => Err(format!("Model {name:?}: {problem}")),
            None => Ok(model.spec.url.clone()),
        },
    })
}

async fn resolve(
    ctx: &Context,
    job: &IncrementalLearningJob,
) -> Result<Result<Resolved, (&'static str, String)>, Error> {
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let models: Api<Model> = Api::namespaced(ctx.client.clone(), &ns);
    let datasets: Api<Dataset> = Api::namespaced(ctx.client.clone(), &ns);
    let spec = &job.spec;
    let initial_url = match model_url(&models, &spec.initial_model.name).await? {
        Ok(url) => url,
        Err(e) => return Ok(Err(("ModelNotReady", e))),
    };
    let initial_eval_url = match &spec.eval_spec.initial_eval_model {
        Some(m) => match model_url(&models, &m.name).await? {
            Ok(url) => Some(url),
            Err(e) => return Ok(Err(("ModelNotReady", e))),
        },
        None => None,
    };
    let deploy_model_url = match model_url(&models, &spec.deploy_spec.model.name).await? {
        Ok(url) => url,
        Err(e) => return Ok(Err(("ModelNotReady", e))),
    };
    let Some(dataset) = datasets.get_opt(&spec.dataset.name).await? else {
        return Ok(Err((
            "DatasetNotReady",
            format!("Dataset {:?} not found", spec.dataset.name),
        )));
    };
    let node = match (&dataset.spec.node_name, &dataset.spec.node_selector) {
        (Some(node), _) => Some(node.clone()),
        (None, Some(selector)) => {
            let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ctx.client.clone());
            workers::pick_node(selector, &nodes.list(&ListParams::default()).await?.items)
        }
        (None, None) => None,
    };
    // The model served before any round is the deploy Model's URL when the job starts.
    let deploy_url = job
        .status
        .as_ref()
        .and_then(|s| s.deployed.as_ref())
        .map_or_else(|| deploy_model_url.clone(), |d| d.url.clone());
    Ok(Ok(Resolved {
        settings: Settings {
            initial_url,
            initial_eval_url,
            deploy_url,
            output_dir: spec.output_dir.clone(),
            deploy_condition: spec.deploy_spec.trigger.condition.clone(),
        },
        dataset: (
            dataset.spec.url.clone(),
            node,
            serde_json::to_value(dataset.spec.format)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        ),
        deploy_model_url,
        inference_started_with: None,
        credentials: spec.credential_name.clone(),
    }))
}

/// The status patch of the fields the controller owns.
fn controller_patch(status: &Status) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.retain(|k, _| {
            !sedna_api::incremental_learning::NODE_STATUS_FIELDS.contains(&k.as_str())
        });
        // Absent optional fields are cleared explicitly (a merge patch keeps what it omits).
        for key in [
            "stage",
            "stageState",
            "candidate",
            "current",
            "stageTime",
            "lastTrainRequest",
        ] {
            map.entry(key).or_insert(serde_json::Value::Null);
        }
        map.entry("attempts").or_insert(0.into());
    }
    serde_json::json!({ "status": value })
}

async fn fail(
    ctx: &Context,
    api: &Api<IncrementalLearningJob>,
    job: &IncrementalLearningJob,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let mut status = job.status.clone().unwrap_or_default();
    let changed = set_condition(
        &mut status.conditions,
        Condition::new("Failed", ConditionStatus::True, Time(Timestamp::now()))
            .with_reason(reason)
            .with_message(message.clone()),
    ) | (status.phase != WorkloadPhase::Failed);
    if changed {
        status.phase = WorkloadPhase::Failed;
        status.completion_time = Some(Time(Timestamp::now()));
        api.patch_status(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&controller_patch(&status)),
        )
        .await?;
        ctx.events(job)
            .publish(EventType::Warning, reason, message)
            .await;
    }
    // A missing Model or Dataset may be created later (the controller does not watch them).
    Ok(Action::requeue(Duration::from_secs(30)))
}

async fn reconcile(job: Arc<IncrementalLearningJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let api: Api<IncrementalLearningJob> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let models: Api<Model> = Api::namespaced(ctx.client.clone(), &ns);
    let status = job.status.clone().unwrap_or_default();
    let resolved = match resolve(&ctx, &job).await? {
        Ok(r) => r,
        // A missing Model or Dataset may appear: fail visibly, and look again on any change.
        Err((reason, message)) => return fail(&ctx, &api, &job, reason, message).await,
    };
    if resolved.dataset.1.is_none() {
        return fail(
            &ctx,
            &api,
            &job,
            "DatasetNotReady",
            format!("Dataset {:?} names no Ready node", job.spec.dataset.name),
        )
        .await;
    }
    let mut resolved = resolved;
    resolved.inference_started_with = pods
        .get_opt(&format!("{}-infer", job.name_any()))
        .await?
        .and_then(|p| p.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.env)
        .and_then(|env| env.into_iter().find(|e| e.name == "MODEL_URL"))
        .and_then(|e| e.value);
    let events = ctx.events(&*job);
    let inference = workers::ensure_pod(
        &pods,
        &events,
        inference_pod(&job, &resolved)?,
        Stopped::Recreate,
    )
    .await?;

    let worker_name = |stage: Stage, round: i64| match stage {
        Stage::Train => Some(format!("{}-train-{round}", job.name_any())),
        Stage::Eval => Some(format!("{}-eval-{round}", job.name_any())),
        Stage::Deploy => None,
    };
    let observed_worker = match status.stage.and_then(|s| worker_name(s, status.round)) {
        Some(name) => {
            let pod = pods.get_opt(&name).await?;
            PodState::of(
                pod.as_ref()
                    .filter(|p| p.metadata.deletion_timestamp.is_none()),
            )
        }
        None => PodState::Absent,
    };
    let seen = Observed {
        now: Timestamp::now(),
        request: job.pending_train_request(),
        worker: observed_worker,
    };
    let (mut next, effects) = settle(&status, &resolved.settings, &seen);
    for effect in effects {
        match effect {
            Effect::CreateWorker(stage) => {
                workers::ensure_pod(
                    &pods,
                    &events,
                    stage_pod(&job, stage, &next, &resolved)?,
                    Stopped::Keep,
                )
                .await?;
                // Earlier rounds' workers are done: keep only this round's and the last one's.
                let selector = format!("{JOB_LABEL}={},{ROUND_LABEL}", job.name_any());
                for pod in pods.list(&ListParams::default().labels(&selector)).await? {
                    let round: i64 = pod
                        .labels()
                        .get(ROUND_LABEL)
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0);
                    if round + 1 < next.round {
                        let _ = pods.delete(&pod.name_any(), &DeleteParams::default()).await;
                    }
                }
            }
            Effect::DeleteWorker(stage) => {
                if let Some(name) = worker_name(stage, next.round) {
                    match pods.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Effect::PointDeployModel(url) => {
                let patch = serde_json::json!({"spec": {"url": url}});
                models
                    .patch(
                        &job.spec.deploy_spec.model.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
            }
            Effect::Event {
                warning,
                reason,
                message,
            } => {
                let type_ = if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                };
                events.publish(type_, reason, message).await;
            }
        }
    }
    let now = Time(Timestamp::now());
    let serving = inference
        .as_ref()
        .is_some_and(|p| pod_phase(p) == "Running");
    next.phase = if serving {
        WorkloadPhase::Running
    } else {
        WorkloadPhase::Pending
    };
    next.start_time.get_or_insert(now.clone());
    next.completion_time = None;
    let stage_condition = |type_: &str, stage: Stage| {
        let active = next.stage == Some(stage)
            && matches!(
                next.stage_state,
                Some(StageState::Ready | StageState::Starting | StageState::Running)
            );
        Condition::new(
            type_,
            if active {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            now.clone(),
        )
        .with_reason(if active { "StageActive" } else { "StageIdle" })
    };
    let training = stage_condition("Training", Stage::Train);
    let evaluating = stage_condition("Evaluating", Stage::Eval);
    let deploying = stage_condition("Deploying", Stage::Deploy);
    for c in [training, evaluating, deploying] {
        set_condition(&mut next.conditions, c);
    }
    let failed = next.stage_state == Some(StageState::Failed);
    let failure = Condition::new(
        "Failed",
        if failed {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        now.clone(),
    )
    .with_reason(if failed { "StageFailed" } else { "NoFailure" })
    .with_message(if failed {
        format!(
            "round {}: the {:?} stage failed {} time(s){}",
            next.round,
            next.stage.unwrap_or(Stage::Train),
            next.attempts,
            if next.attempts >= MAX_ATTEMPTS {
                "; annotate a train request to retry it"
            } else {
                "; retrying"
            }
        )
    } else {
        String::new()
    });
    set_condition(&mut next.conditions, failure);
    if next != status {
        api.patch_status(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&controller_patch(&next)),
        )
        .await?;
    }
    let check = Duration::from_secs(
        job.spec
            .train_spec
            .trigger
            .check_period_seconds
            .clamp(1, 60) as u64,
    );
    Ok(match (next.stage, next.stage_state) {
        (_, Some(StageState::Failed)) if next.attempts < MAX_ATTEMPTS => {
            Action::requeue(retry_delay(next.attempts).mul_f64(1.0 + rand::random::<f64>() / 4.0))
        }
        (Some(Stage::Train), Some(StageState::Waiting)) => Action::requeue(check),
        _ => Action::requeue(Duration::from_secs(2)),
    })
}

/// Runs the IncrementalLearningJob controller until `shutdown`.
pub async fn run(
    client: Client,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    workers::run_owning_pods::<IncrementalLearningJob, _>(
        client,
        JOB_LABEL,
        "incremental learning",
        reconcile,
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use sedna_api::incremental_learning::{
        EvaluationReport, InferenceReport, Metrics, TrainingReport, TriggerReport,
    };

    fn settings() -> Settings {
        Settings {
            initial_url: "/m/initial.onnx".into(),
            initial_eval_url: None,
            deploy_url: "/m/deploy.onnx".into(),
            output_dir: "/out/".into(),
            deploy_condition: serde_json::from_value(
                serde_json::json!({"operator": "gt", "threshold": 0.01, "metric": "accuracy_delta[0]"}),
            )
            .unwrap(),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn seen(seconds: i64, worker: PodState) -> Observed<'static> {
        Observed {
            now: at(seconds),
            request: None,
            worker,
        }
    }

    fn state(s: &Status) -> (i64, Option<Stage>, Option<StageState>) {
        (s.round, s.stage, s.stage_state)
    }

    fn metrics(accuracy: f64) -> Metrics {
        Metrics::from([("accuracy".into(), accuracy)])
    }

    /// A job waiting for its first trigger.
    fn waiting() -> Status {
        settle(&Status::default(), &settings(), &seen(0, PodState::Absent)).0
    }

    /// Runs one round from the trigger to the evaluation; returns the status after it.
    fn through_eval(mut s: Status, candidate: f64, deployed: f64) -> (Status, Vec<Effect>) {
        let round = s.round + 1;
        s.train_trigger = Some(TriggerReport {
            round,
            samples: 100 * round,
            new_samples: 100,
            time: None,
        });
        let (s, effects) = settle(&s, &settings(), &seen(1, PodState::Absent));
        assert_eq!(
            state(&s),
            (round, Some(Stage::Train), Some(StageState::Starting))
        );
        assert!(effects.contains(&Effect::CreateWorker(Stage::Train)));
        let (s, _) = settle(&s, &settings(), &seen(2, PodState::Running));
        assert_eq!(s.stage_state, Some(StageState::Running));
        let mut s = s;
        s.training = Some(TrainingReport {
            round,
            model_url: settings().candidate_url(round),
            samples: 80,
            epochs: 3,
            loss: 0.2,
            seconds: 4.0,
        });
        let (s, effects) = settle(&s, &settings(), &seen(10, PodState::Succeeded));
        assert_eq!(
            state(&s),
            (round, Some(Stage::Eval), Some(StageState::Starting))
        );
        assert!(effects.contains(&Effect::CreateWorker(Stage::Eval)));
        let mut s = s;
        s.evaluation = Some(EvaluationReport {
            round,
            samples: 20,
            candidate: metrics(candidate),
            deployed: metrics(deployed),
        });
        settle(&s, &settings(), &seen(15, PodState::Succeeded))
    }

    #[test]
    fn a_fired_trigger_runs_train_eval_and_deploys_a_better_model() {
        let s = waiting();
        assert_eq!(
            state(&s),
            (0, Some(Stage::Train), Some(StageState::Waiting))
        );
        assert_eq!(s.deployed.as_ref().unwrap().url, "/m/deploy.onnx");
        // Nothing happens without a trigger or a request.
        assert_eq!(settle(&s, &settings(), &seen(1, PodState::Absent)).0, s);
        let (s, effects) = through_eval(s, 0.9, 0.7);
        assert_eq!(
            state(&s),
            (1, Some(Stage::Deploy), Some(StageState::Running))
        );
        assert!(effects.contains(&Effect::PointDeployModel("/out/round-1/model.onnx".into())));
        // Serving the old model: still deploying.
        let mut s = s;
        s.inference = Some(InferenceReport {
            model_url: "/m/deploy.onnx".into(),
            model_version: 1,
            ..Default::default()
        });
        let (s, _) = settle(&s, &settings(), &seen(16, PodState::Absent));
        assert_eq!(s.stage_state, Some(StageState::Running));
        let mut s = s;
        s.inference = Some(InferenceReport {
            model_url: "/out/round-1/model.onnx".into(),
            model_version: 2,
            ..Default::default()
        });
        let (s, effects) = settle(&s, &settings(), &seen(20, PodState::Absent));
        assert_eq!(
            state(&s),
            (1, Some(Stage::Train), Some(StageState::Waiting))
        );
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Event {
                reason: "Deployed",
                ..
            }
        )));
        let deployed = s.deployed.as_ref().unwrap();
        assert_eq!(
            (deployed.round, deployed.url.as_str()),
            (1, "/out/round-1/model.onnx")
        );
        assert_eq!(deployed.metrics, metrics(0.9));
        let record = &s.rounds[0];
        assert!(record.deployed, "{record:?}");
        assert_eq!(record.started_by, "trigger");
        assert_eq!(record.samples, 100);
        assert_eq!(record.train_seconds, Some(9.0));
        assert_eq!(record.eval_seconds, Some(5.0));
        assert_eq!(record.started.as_ref().map(|t| t.0), Some(at(1)));
        assert_eq!(record.deploy_seconds, Some(5.0));
        assert!(
            record.reason.contains("accuracy_delta[0] > 0.01 holds"),
            "{}",
            record.reason
        );
        assert_eq!(s.last_round_samples, 100);
        assert!(s.current.is_none());
    }

    #[test]
    fn a_candidate_worse_than_the_deployed_model_is_recorded_and_not_deployed() {
        let (s, effects) = through_eval(waiting(), 0.7, 0.9);
        assert_eq!(
            state(&s),
            (1, Some(Stage::Train), Some(StageState::Waiting))
        );
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::PointDeployModel(_)))
        );
        assert!(!s.rounds[0].deployed);
        assert!(
            s.rounds[0].reason.contains("does not hold (-0.2000)"),
            "{}",
            s.rounds[0].reason
        );
        assert_eq!(s.deployed.as_ref().unwrap().url, "/m/deploy.onnx");
        // The next round starts from a new trigger for round 2 only; a stale one is ignored.
        let mut stale = s.clone();
        stale.train_trigger = Some(TriggerReport {
            round: 1,
            samples: 100,
            new_samples: 100,
            time: None,
        });
        assert_eq!(
            settle(&stale, &settings(), &seen(30, PodState::Absent))
                .0
                .round,
            1
        );
        let (s, _) = through_eval(s, 0.95, 0.9);
        assert_eq!(s.round, 2);
        assert_eq!(s.stage, Some(Stage::Deploy));
    }

    #[test]
    fn a_train_request_starts_a_round_once() {
        let s = waiting();
        let mut seen_now = seen(5, PodState::Absent);
        seen_now.request = Some("1700000000");
        let (s, effects) = settle(&s, &settings(), &seen_now);
        assert_eq!(
            state(&s),
            (1, Some(Stage::Train), Some(StageState::Starting))
        );
        assert_eq!(s.last_train_request.as_deref(), Some("1700000000"));
        assert_eq!(s.current.as_ref().unwrap().started_by, "request");
        assert_eq!(
            effects
                .iter()
                .filter(|e| matches!(e, Effect::CreateWorker(_)))
                .count(),
            1
        );
    }

    #[test]
    fn a_failed_stage_is_retried_from_that_stage_with_growing_delays_then_waits_for_a_request() {
        let (s, _) = through_eval(waiting(), 0.9, 0.7);
        assert_eq!(s.stage, Some(Stage::Deploy));
        // Go back to an eval that fails instead.
        let (mut s, _) = {
            let mut s = waiting();
            s.train_trigger = Some(TriggerReport {
                round: 1,
                samples: 10,
                new_samples: 10,
                time: None,
            });
            let (mut s, _) = settle(&s, &settings(), &seen(0, PodState::Absent));
            s.training = Some(TrainingReport {
                round: 1,
                model_url: "/out/round-1/model.onnx".into(),
                ..Default::default()
            });
            settle(&s, &settings(), &seen(1, PodState::Succeeded))
        };
        assert_eq!(s.stage, Some(Stage::Eval));
        let mut t = 2;
        for attempt in 1..=MAX_ATTEMPTS {
            let (failed, effects) = settle(&s, &settings(), &seen(t, PodState::Failed));
            assert_eq!(
                state(&failed),
                (1, Some(Stage::Eval), Some(StageState::Failed))
            );
            assert_eq!(failed.attempts, attempt);
            assert!(effects.iter().any(|e| matches!(
                e,
                Effect::Event {
                    reason: "StageFailed",
                    ..
                }
            )));
            // Not before the delay.
            let early = settle(&failed, &settings(), &seen(t + 1, PodState::Failed)).0;
            assert_eq!(early.stage_state, Some(StageState::Failed));
            let later = t + retry_delay(attempt).as_secs() as i64;
            let (retried, effects) = settle(&failed, &settings(), &seen(later, PodState::Failed));
            if attempt < MAX_ATTEMPTS {
                assert_eq!(
                    state(&retried),
                    (1, Some(Stage::Eval), Some(StageState::Starting))
                );
                assert!(effects.contains(&Effect::DeleteWorker(Stage::Eval)));
                assert!(effects.contains(&Effect::CreateWorker(Stage::Eval)));
                // The trained candidate is kept: no new training.
                assert_eq!(
                    retried.candidate.as_ref().unwrap().url,
                    "/out/round-1/model.onnx"
                );
            } else {
                assert_eq!(
                    retried.stage_state,
                    Some(StageState::Failed),
                    "tries used up"
                );
            }
            s = retried;
            t = later + 1;
        }
        // A train request retries the failed stage, not training.
        let mut with_request = seen(t + 1000, PodState::Failed);
        with_request.request = Some("again");
        let (s, _) = settle(&s, &settings(), &with_request);
        assert_eq!(
            state(&s),
            (1, Some(Stage::Eval), Some(StageState::Starting))
        );
        assert_eq!(s.attempts, 0);
    }

    #[test]
    fn a_worker_deleted_while_its_stage_runs_is_recreated() {
        let mut s = waiting();
        s.train_trigger = Some(TriggerReport {
            round: 1,
            samples: 10,
            new_samples: 10,
            time: None,
        });
        let (s, _) = settle(&s, &settings(), &seen(0, PodState::Absent));
        let (s, _) = settle(&s, &settings(), &seen(1, PodState::Running));
        assert_eq!(s.stage_state, Some(StageState::Running));
        let (s, effects) = settle(&s, &settings(), &seen(2, PodState::Absent));
        assert_eq!(
            state(&s),
            (1, Some(Stage::Train), Some(StageState::Starting))
        );
        assert!(effects.contains(&Effect::CreateWorker(Stage::Train)));
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Event {
                reason: "WorkerRecreated",
                ..
            }
        )));
    }

    #[test]
    fn a_deploy_the_edge_cannot_load_is_retried_then_rolled_back() {
        let (mut s, _) = through_eval(waiting(), 0.9, 0.7);
        let mut t = 20;
        let failing = |s: &mut Status| {
            s.inference = Some(InferenceReport {
                model_url: "/m/deploy.onnx".into(),
                model_version: 1,
                reload_failures: 1,
                last_error: Some("not an ONNX model".into()),
                failed_url: Some("/out/round-1/model.onnx".into()),
                ..Default::default()
            })
        };
        failing(&mut s);
        let mut rolled_back = false;
        for _ in 0..MAX_ATTEMPTS + 1 {
            let (next, effects) = settle(&s, &settings(), &seen(t, PodState::Absent));
            rolled_back |= effects.contains(&Effect::PointDeployModel("/m/deploy.onnx".into()));
            s = next;
            t += 1000;
        }
        assert_eq!(s.stage_state, Some(StageState::Failed));
        assert_eq!(s.attempts, MAX_ATTEMPTS);
        assert!(rolled_back, "the Model points at the serving model again");
        assert_eq!(s.deployed.as_ref().unwrap().url, "/m/deploy.onnx");
    }

    #[test]
    fn round_records_keep_headline_metrics_only() {
        let m = Metrics::from([
            ("accuracy".into(), 0.9),
            ("precision_3".into(), 0.5),
            ("f1_helmet".into(), 0.5),
            ("shifted_precision".into(), 0.7),
        ]);
        assert_eq!(
            headline(&m).keys().collect::<Vec<_>>(),
            ["accuracy", "shifted_precision"]
        );
    }

    #[test]
    fn finished_rounds_are_bounded() {
        let mut s = waiting();
        for _ in 0..MAX_ROUNDS_KEPT + 5 {
            s = through_eval(s, 0.1, 0.9).0;
        }
        assert_eq!(s.rounds.len(), MAX_ROUNDS_KEPT);
        assert_eq!(s.rounds.last().unwrap().round, (MAX_ROUNDS_KEPT + 5) as i64);
        assert_eq!(s.rounds[0].round, 6);
    }

    fn job() -> IncrementalLearningJob {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/incremental-learning/helmet-detection.yaml"
        ))
        .unwrap();
        let doc = sedna_api::yaml_documents(&text)
            .unwrap()
            .into_iter()
            .find(|d| d["kind"] == "IncrementalLearningJob")
            .unwrap();
        let mut job: IncrementalLearningJob = serde_json::from_value(doc).unwrap();
        job.metadata.uid = Some("0a0a".into());
        job.metadata.namespace = Some("default".into());
        job
    }

    fn resolved() -> Resolved {
        Resolved {
            settings: settings(),
            dataset: (
                "/data/il/index.txt".into(),
                Some("edge-1".into()),
                "txt".into(),
            ),
            deploy_model_url: "/out/round-3/model.onnx".into(),
            inference_started_with: None,
            credentials: None,
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
    fn workers_get_sednas_environment() {
        let job = job();
        let mut status = waiting();
        status.round = 2;
        status.candidate = Some(ModelVersion {
            round: 2,
            url: "/out/round-2/model.onnx".into(),
            metrics: Metrics::new(),
        });
        status.deployed = Some(ModelVersion {
            round: 1,
            url: "/out/round-1/model.onnx".into(),
            metrics: Metrics::new(),
        });
        let train = stage_pod(&job, Stage::Train, &status, &resolved()).unwrap();
        assert_eq!(
            train.metadata.name.as_deref(),
            Some("helmet-detection-demo-train-2")
        );
        let e = env(&train);
        assert_eq!(e["BASE_MODEL_URL"], "/out/round-1/model.onnx");
        assert_eq!(e["MODEL_URL"], "/out/round-2/model.onnx");
        assert_eq!(e["TRAIN_DATASET_URL"], "/data/il/index.txt");
        assert_eq!(e["SEDNA_TRAIN_PROB"], "0.8");
        assert_eq!(
            e["batch_size"], "32",
            "the template's own variables are kept"
        );
        assert_eq!(
            train.spec.as_ref().unwrap().restart_policy.as_deref(),
            Some("Never")
        );
        assert_eq!(train.labels()[ROUND_LABEL], "2");
        let eval = stage_pod(&job, Stage::Eval, &status, &resolved()).unwrap();
        assert_eq!(
            env(&eval)["MODEL_URLS"],
            "/out/round-2/model.onnx;/out/round-1/model.onnx"
        );
        // Round 1 trains from the initial model.
        status.deployed.as_mut().unwrap().round = 0;
        assert_eq!(
            env(&stage_pod(&job, Stage::Train, &status, &resolved()).unwrap())["BASE_MODEL_URL"],
            "/m/initial.onnx"
        );

        let infer = inference_pod(&job, &resolved()).unwrap();
        let e = env(&infer);
        assert_eq!(e["HEM_NAME"], "IBT");
        assert_eq!(e["MODEL_HOT_UPDATE"], "true");
        assert_eq!(e["MODEL_POLL_PERIOD_SECONDS"], "60");
        assert_eq!(e["SEDNA_DEPLOY_MODEL"], "deploy-model");
        assert_eq!(e["SEDNA_HARD_EXAMPLES_DIR"], "/data/il/hard-examples");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&e["HEM_PARAMETERS"]).unwrap()[0],
            serde_json::json!({"key": "threshold_img", "value": "0.9"})
        );
        // Hot update: a running worker keeps the pod it has (no recreation on deploy).
        let mut running = resolved();
        running.inference_started_with = Some("/m/deploy.onnx".into());
        assert_eq!(
            env(&inference_pod(&job, &running).unwrap())["MODEL_URL"],
            "/m/deploy.onnx"
        );
        let mut cold = job.clone();
        cold.spec.deploy_spec.model.hot_update_enabled = false;
        assert_eq!(
            env(&inference_pod(&cold, &running).unwrap())["MODEL_URL"],
            "/out/round-3/model.onnx"
        );
        assert_eq!(hard_examples_dir("s3://bucket/index.txt"), None);
    }
}
