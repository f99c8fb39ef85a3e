//! The JointInferenceService controller.
//!
//! For a service `S` it keeps, owned by `S` (so deleting `S` removes them):
//! - Pod `S-cloud` from `cloudWorker.template`, running the big model: `MODEL_URL`,
//!   `BIG_MODEL_PORT`, `SEDNA_LISTEN_HOST=0.0.0.0`, `SERVICE_NAME`, `NAMESPACE`,
//!   `WORKER_NAME`; and Service `S-cloud` in front of it;
//! - Pod `S-edge` from `edgeWorker.template`, once the cloud pod has an address:
//!   `MODEL_URL`, `HEM_NAME`, `HEM_PARAMETERS` (Sedna's JSON list), `SEDNA_CLOUD_TUNNEL`
//!   (`<namespace>/S`: the edge worker reaches the cloud worker through its node's
//!   connection to the hub), `BIG_MODEL_IP` / `BIG_MODEL_PORT` (the direct route), and the
//!   same identity variables.
//!
//! A template placed with `nodeSelector` is bound to the first Ready node that matches (by
//! name), so no scheduler is needed. Credentials of a Model's `credentialName` Secret are
//! mounted as files in `/var/run/secrets/sedna/credentials` (`SEDNA_CREDENTIALS_DIR`), never
//! put in the environment. Each pod carries a hash of what it was built from; a spec change
//! deletes and recreates it ("rolls" the worker), as does a worker that failed or was deleted.
//! The status reports `phase`, `active`, `failed`, a `Ready` condition and `startTime`; the
//! edge worker reports `metrics` itself through its node.
//!
//! The cloud worker's port is `sedna.io/cloud-port` if the service sets it, else derived
//! from the service's namespace and name (20000–29999), so several services share a node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{
    EnvVar, Node, Pod, PodSpec, SecretVolumeSource, Service, ServicePort, ServiceSpec, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use sedna_api::common::{Condition, ConditionStatus, WorkloadPhase, set_condition};
use sedna_api::joint_inference::JointInferenceService;
use sedna_api::model::Model;
use sha2::{Digest, Sha256};

use crate::Error;

/// Hard-example mining algorithms the generic edge worker knows.
pub const KNOWN_HEM: [&str; 6] = [
    "Threshold",
    "CrossEntropy",
    "IBT",
    "Random",
    "CloudOnly",
    "EdgeOnly",
];
/// Annotation choosing the cloud worker's port.
pub const PORT_ANNOTATION: &str = "sedna.io/cloud-port";
/// Annotation carrying the hash of what a worker pod was built from.
pub const HASH_ANNOTATION: &str = "sedna.io/spec-hash";
/// Label naming the service a worker belongs to.
pub const SERVICE_LABEL: &str = "sedna.io/joint-inference-service";
/// Label saying which worker a pod is (`cloud` or `edge`).
pub const WORKER_LABEL: &str = "sedna.io/worker";
/// Where a Model's credentials are mounted in a worker.
pub const CREDENTIALS_DIR: &str = "/var/run/secrets/sedna/credentials";

/// The cloud worker's port for a service.
pub fn cloud_port(ji: &JointInferenceService) -> Result<u16, Error> {
    if let Some(value) = ji.annotations().get(PORT_ANNOTATION) {
        return value.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            Error::Invalid(format!(
                "annotation {PORT_ANNOTATION}={value:?} is not a port"
            ))
        });
    }
    let key = format!("{}/{}", ji.namespace().unwrap_or_default(), ji.name_any());
    let digest = Sha256::digest(key.as_bytes());
    Ok(20_000 + u16::from_be_bytes([digest[0], digest[1]]) % 10_000)
}

fn owner(ji: &JointInferenceService) -> Option<OwnerReference> {
    ji.controller_owner_ref(&())
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// What a worker pod is built from, besides the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInputs {
    /// `cloud` or `edge`.
    pub worker: &'static str,
    /// The model URL.
    pub model_url: String,
    /// The Secret with the model store's credentials, if any.
    pub credentials: Option<String>,
    /// Variables to inject (Sedna's names).
    pub env: Vec<(String, String)>,
    /// The node to bind to, when the template uses `nodeSelector`.
    pub node: Option<String>,
}

/// The worker pod for a service (pure: the reconcile creates what this returns).
pub fn worker_pod(ji: &JointInferenceService, inputs: &WorkerInputs) -> Result<Pod, Error> {
    let name = ji.name_any();
    let template = match inputs.worker {
        "cloud" => &ji.spec.cloud_worker.template,
        _ => &ji.spec.edge_worker.template,
    };
    let mut spec: PodSpec = template.spec.clone().unwrap_or_default();
    if spec.containers.is_empty() {
        return Err(Error::Invalid(format!(
            "{}Worker.template has no containers",
            inputs.worker
        )));
    }
    if spec.node_name.is_none() {
        spec.node_name = inputs.node.clone();
    }
    let pod_name = format!("{name}-{}", inputs.worker);
    let mut injected: Vec<EnvVar> = vec![
        env(
            "NAMESPACE",
            ji.namespace().unwrap_or_else(|| "default".into()),
        ),
        env("SERVICE_NAME", name.clone()),
        env("WORKER_NAME", pod_name.clone()),
        env("MODEL_URL", inputs.model_url.clone()),
    ];
    injected.extend(inputs.env.iter().map(|(k, v)| env(k, v.clone())));
    if let Some(secret) = &inputs.credentials {
        injected.push(env("SEDNA_CREDENTIALS_DIR", CREDENTIALS_DIR));
        spec.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: "sedna-credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    for container in spec.containers.iter_mut() {
        let own: Vec<EnvVar> = container.env.take().unwrap_or_default();
        // The template's own variables win over the injected ones of the same name.
        let mut merged: Vec<EnvVar> = injected
            .iter()
            .filter(|e| !own.iter().any(|o| o.name == e.name))
            .cloned()
            .collect();
        merged.extend(own);
        container.env = Some(merged);
        if inputs.credentials.is_some() {
            container
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: "sedna-credentials".into(),
                    mount_path: CREDENTIALS_DIR.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
        }
    }
    let mut labels: BTreeMap<String, String> = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(SERVICE_LABEL.into(), name.clone());
    labels.insert(WORKER_LABEL.into(), inputs.worker.into());
    let hash = {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&spec).map_err(|e| Error::Invalid(e.to_string()))?);
        hex::encode(&h.finalize()[..8])
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name),
            namespace: ji.namespace(),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(HASH_ANNOTATION.to_string(), hash)])),
            owner_references: owner(ji).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// The Service in front of the cloud worker.
pub fn cloud_service(ji: &JointInferenceService, port: u16) -> Service {
    let name = ji.name_any();
    Service {
        metadata: ObjectMeta {
            name: Some(format!("{name}-cloud")),
            namespace: ji.namespace(),
            labels: Some(BTreeMap::from([(SERVICE_LABEL.to_string(), name.clone())])),
            owner_references: owner(ji).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([
                (SERVICE_LABEL.to_string(), name),
                (WORKER_LABEL.to_string(), "cloud".to_string()),
            ])),
            ports: Some(vec![ServicePort {
                name: Some("inference".into()),
                port: i32::from(port),
                target_port: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(port)),
                ),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The first Ready node (by name) whose labels include `selector`.
pub fn pick_node(selector: &BTreeMap<String, String>, nodes: &[Node]) -> Option<String> {
    let mut matching: Vec<String> = nodes
        .iter()
        .filter(|n| {
            let labels = n.labels();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|n| n.name_any())
        .collect();
    matching.sort();
    matching.into_iter().next()
}

fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

struct Context {
    client: Client,
    recorder: Recorder,
}

impl Context {
    async fn event(
        &self,
        ji: &JointInferenceService,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &ji.object_ref(&())).await {
            tracing::debug!(error = %e, "event not recorded");
        }
    }
}

async fn set_status(
    api: &Api<JointInferenceService>,
    ji: &JointInferenceService,
    phase: WorkloadPhase,
    active: i32,
    failed: i32,
    ready: Condition,
) -> Result<bool, Error> {
    let mut status = ji.status.clone().unwrap_or_default();
    let mut changed = set_condition(&mut status.conditions, ready);
    changed |= status.phase != phase || status.active != active || status.failed != failed;
    let start = status
        .start_time
        .clone()
        .unwrap_or(Time(jiff::Timestamp::now()));
    changed |= status.start_time.is_none();
    if changed {
        // A merge patch of these fields only: the edge worker owns `metrics`.
        let patch = serde_json::json!({"status": {
            "phase": phase, "active": active, "failed": failed,
            "conditions": status.conditions, "startTime": start,
        }});
        api.patch_status(
            &ji.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(changed && status.phase != phase)
}

async fn fail(
    ctx: &Context,
    api: &Api<JointInferenceService>,
    ji: &JointInferenceService,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let condition = Condition::new(
        "Ready",
        ConditionStatus::False,
        Time(jiff::Timestamp::now()),
    )
    .with_reason(reason)
    .with_message(message.clone());
    let already = ji.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.reason.as_deref() == Some(reason) && c.message.as_deref() == Some(&message))
    });
    set_status(api, ji, WorkloadPhase::Failed, 0, 0, condition).await?;
    if !already {
        ctx.event(ji, EventType::Warning, reason, message).await;
    }
    Ok(Action::requeue(Duration::from_secs(30)))
}

async fn model_of(
    models: &Api<Model>,
    name: &str,
) -> Result<Result<(String, Option<String>), String>, Error> {
    match models.get_opt(name).await? {
        None => Ok(Err(format!("Model {name:?} not found"))),
        Some(model) => match crate::model::check_url(&model.spec.url) {
            Some(problem) => Ok(Err(format!("Model {name:?}: {problem}"))),
            None => Ok(Ok((
                model.spec.url.clone(),
                model.spec.credential_name.clone(),
            ))),
        },
    }
}

/// Makes sure the worker pod exists as built; returns it when it exists as built.
async fn ensure_pod(
    ctx: &Context,
    pods: &Api<Pod>,
    ji: &JointInferenceService,
    desired: Pod,
) -> Result<Option<Pod>, Error> {
    let name = desired.name_any();
    let want_hash = desired.annotations().get(HASH_ANNOTATION).cloned();
    match pods.get_opt(&name).await? {
        Some(existing) if existing.metadata.deletion_timestamp.is_some() => Ok(None),
        Some(existing) => {
            let stale = existing.annotations().get(HASH_ANNOTATION) != want_hash.as_ref();
            let failed = matches!(pod_phase(&existing), "Failed" | "Succeeded");
            if stale || failed {
                let why = if stale {
                    "its spec changed"
                } else {
                    "it stopped"
                };
                pods.delete(&name, &DeleteParams::default()).await?;
                ctx.event(
                    ji,
                    EventType::Normal,
                    "RecreatingWorker",
                    format!("deleted pod {name}: {why}"),
                )
                .await;
                return Ok(None);
            }
            Ok(Some(existing))
        }
        None => {
            let created = pods.create(&PostParams::default(), &desired).await?;
            let node = created
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| "no node yet".into());
            ctx.event(
                ji,
                EventType::Normal,
                "CreatedWorker",
                format!("created pod {name} on {node}"),
            )
            .await;
            Ok(Some(created))
        }
    }
}

async fn placement(
    client: &Client,
    template_spec: Option<&PodSpec>,
) -> Result<Result<Option<String>, String>, Error> {
    let Some(spec) = template_spec else {
        return Ok(Ok(None));
    };
    if spec.node_name.is_some() {
        return Ok(Ok(None));
    }
    let Some(selector) = spec.node_selector.as_ref().filter(|s| !s.is_empty()) else {
        return Ok(Err(
            "the template names no node (nodeName or nodeSelector)".into()
        ));
    };
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes.list(&ListParams::default()).await?;
    Ok(match pick_node(selector, &list.items) {
        Some(node) => Ok(Some(node)),
        None => Err(format!("no Ready node matches nodeSelector {selector:?}")),
    })
}

/// Where a worker goes (`None`: its template names the node); a service that cannot be
/// placed is marked failed and the returned action requeues it.
async fn place(
    ctx: &Context,
    api: &Api<JointInferenceService>,
    ji: &JointInferenceService,
    worker: &str,
) -> Result<Result<Option<String>, Action>, Error> {
    let template = match worker {
        "cloud" => &ji.spec.cloud_worker.template,
        _ => &ji.spec.edge_worker.template,
    };
    Ok(
        match placement(&ctx.client, template.spec.as_ref()).await? {
            Ok(node) => Ok(node),
            Err(message) => Err(fail(
                ctx,
                api,
                ji,
                "Unschedulable",
                format!("{worker} worker: {message}"),
            )
            .await?),
        },
    )
}

async fn reconcile(ji: Arc<JointInferenceService>, ctx: Arc<Context>) -> Result<Action, Error> {
    if ji.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ji.namespace().unwrap_or_else(|| "default".into());
    let api: Api<JointInferenceService> = Api::namespaced(ctx.client.clone(), &ns);
    let models: Api<Model> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);

    let hem = &ji.spec.edge_worker.hard_example_mining;
    if !KNOWN_HEM.contains(&hem.name.as_str()) {
        return fail(
            &ctx,
            &api,
            &ji,
            "UnknownHardExampleMining",
            format!(
                "hard-example mining {:?} is not one the edge worker knows ({})",
                hem.name,
                KNOWN_HEM.join(", ")
            ),
        )
        .await;
    }
    let (cloud_url, cloud_secret) =
        match model_of(&models, &ji.spec.cloud_worker.model.name).await? {
            Ok(m) => m,
            Err(message) => return fail(&ctx, &api, &ji, "ModelNotReady", message).await,
        };
    let (edge_url, edge_secret) = match model_of(&models, &ji.spec.edge_worker.model.name).await? {
        Ok(m) => m,
        Err(message) => return fail(&ctx, &api, &ji, "ModelNotReady", message).await,
    };
    let port = match cloud_port(&ji) {
        Ok(port) => port,
        Err(e) => return fail(&ctx, &api, &ji, "InvalidPort", e.to_string()).await,
    };

    // Service, then the cloud worker.
    let service = cloud_service(&ji, port);
    if services.get_opt(&service.name_any()).await?.is_none() {
        services.create(&PostParams::default(), &service).await?;
    }
    let cloud_node = match place(&ctx, &api, &ji, "cloud").await? {
        Ok(node) => node,
        Err(failed) => return Ok(failed),
    };
    let cloud_pod = worker_pod(
        &ji,
        &WorkerInputs {
            worker: "cloud",
            model_url: cloud_url,
            credentials: cloud_secret,
            env: vec![
                ("BIG_MODEL_PORT".into(), port.to_string()),
                ("SEDNA_LISTEN_HOST".into(), "0.0.0.0".into()),
            ],
            node: cloud_node,
        },
    )?;
    let cloud = ensure_pod(&ctx, &pods, &ji, cloud_pod).await?;
    let cloud_ip = cloud
        .as_ref()
        .filter(|p| pod_phase(p) == "Running")
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.pod_ip.clone());

    // The edge worker, once the cloud worker has an address.
    let mut edge = None;
    if let Some(cloud_ip) = &cloud_ip {
        let edge_node = match place(&ctx, &api, &ji, "edge").await? {
            Ok(node) => node,
            Err(failed) => return Ok(failed),
        };
        let parameters: Vec<serde_json::Value> = hem
            .parameters
            .iter()
            .map(|kv| serde_json::json!({"key": kv.key, "value": kv.value}))
            .collect();
        let edge_pod = worker_pod(
            &ji,
            &WorkerInputs {
                worker: "edge",
                model_url: edge_url,
                credentials: edge_secret,
                env: vec![
                    ("HEM_NAME".into(), hem.name.clone()),
                    (
                        "HEM_PARAMETERS".into(),
                        serde_json::Value::Array(parameters).to_string(),
                    ),
                    ("BIG_MODEL_IP".into(), cloud_ip.clone()),
                    ("BIG_MODEL_PORT".into(), port.to_string()),
                    // Through the hub by default (the node's cloud proxy); BIG_MODEL_IP is
                    // the direct route where the edge can reach the cloud network.
                    (
                        "SEDNA_CLOUD_TUNNEL".into(),
                        format!("{ns}/{}", ji.name_any()),
                    ),
                ],
                node: edge_node,
            },
        )?;
        edge = ensure_pod(&ctx, &pods, &ji, edge_pod).await?;
    }

    let workers = [cloud.as_ref(), edge.as_ref()];
    let active = workers
        .iter()
        .flatten()
        .filter(|p| pod_phase(p) == "Running")
        .count() as i32;
    let failed = workers
        .iter()
        .flatten()
        .filter(|p| pod_phase(p) == "Failed")
        .count() as i32;
    let now = Time(jiff::Timestamp::now());
    let (phase, ready) = if active == 2 {
        (
            WorkloadPhase::Running,
            Condition::new("Ready", ConditionStatus::True, now).with_reason("WorkersRunning"),
        )
    } else {
        let waiting = if cloud_ip.is_none() {
            "the cloud worker"
        } else {
            "the edge worker"
        };
        (
            WorkloadPhase::Pending,
            Condition::new("Ready", ConditionStatus::False, now)
                .with_reason("WorkersStarting")
                .with_message(format!("waiting for {waiting} to run")),
        )
    };
    let became = set_status(&api, &ji, phase, active, failed, ready).await?;
    if became && phase == WorkloadPhase::Running {
        ctx.event(
            &ji,
            EventType::Normal,
            "Running",
            "cloud and edge workers are running".into(),
        )
        .await;
    }
    Ok(if phase == WorkloadPhase::Running {
        Action::requeue(Duration::from_secs(60))
    } else {
        Action::requeue(Duration::from_secs(2))
    })
}

fn error_policy(ji: Arc<JointInferenceService>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(service = %ji.name_any(), %error, "joint inference reconcile failed");
    Action::requeue(crate::backoff(2))
}

/// Runs the JointInferenceService controller until `shutdown`.
pub async fn run(
    client: Client,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "sedna-gm".into(),
            instance: None,
        },
    );
    let services: Api<JointInferenceService> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    Controller::new(services, watcher::Config::default())
        .owns(pods, watcher::Config::default().labels(SERVICE_LABEL))
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            error_policy,
            Arc::new(Context { client, recorder }),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> JointInferenceService {
        let yaml = r#"
apiVersion: sedna.io/v1alpha1
kind: JointInferenceService
metadata: {name: digits, namespace: demo, uid: "0f0f"}
spec:
  edgeWorker:
    model: {name: edge-model}
    hardExampleMining:
      name: CrossEntropy
      parameters: [{key: threshold_cross_entropy, value: "0.67"}]
    template:
      metadata: {labels: {app: digits}}
      spec:
        nodeName: edge-1
        containers:
          - name: edge
            image: sedna-edge-worker
            env: [{name: SEDNA_INPUT, value: "dir:/data"}, {name: BIG_MODEL_PORT, value: "1234"}]
  cloudWorker:
    model: {name: cloud-model}
    template:
      spec:
        nodeSelector: {node-role.sedna.io/cloud: ""}
        containers: [{name: cloud, image: sedna-cloud-worker}]
"#;
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn the_cloud_port_is_stable_per_service_and_can_be_chosen() {
        let mut ji = service();
        let port = cloud_port(&ji).unwrap();
        assert!((20_000..30_000).contains(&port));
        assert_eq!(cloud_port(&ji).unwrap(), port);
        ji.metadata.annotations = Some(BTreeMap::from([(PORT_ANNOTATION.into(), "7000".into())]));
        assert_eq!(cloud_port(&ji).unwrap(), 7000);
        ji.metadata.annotations = Some(BTreeMap::from([(PORT_ANNOTATION.into(), "http".into())]));
        assert!(
            cloud_port(&ji)
                .unwrap_err()
                .to_string()
                .contains("is not a port")
        );
    }

    #[test]
    fn worker_pods_carry_sedna_variables_owner_labels_and_mounted_credentials() {
        let ji = service();
        let pod = worker_pod(
            &ji,
            &WorkerInputs {
                worker: "edge",
                model_url: "s3://models/edge.onnx".into(),
                credentials: Some("store".into()),
                env: vec![
                    ("HEM_NAME".into(), "CrossEntropy".into()),
                    ("BIG_MODEL_PORT".into(), "25000".into()),
                ],
                node: None,
            },
        )
        .unwrap();
        assert_eq!(pod.name_any(), "digits-edge");
        assert_eq!(pod.labels()[SERVICE_LABEL], "digits");
        assert_eq!(pod.labels()["app"], "digits");
        assert_eq!(pod.owner_references()[0].kind, "JointInferenceService");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("edge-1"));
        let env: BTreeMap<_, _> = spec.containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(env["MODEL_URL"], "s3://models/edge.onnx");
        assert_eq!(env["SERVICE_NAME"], "digits");
        assert_eq!(env["WORKER_NAME"], "digits-edge");
        assert_eq!(
            env["BIG_MODEL_PORT"], "1234",
            "the template's own value wins"
        );
        assert_eq!(env["SEDNA_CREDENTIALS_DIR"], CREDENTIALS_DIR);
        assert!(
            !env.keys()
                .any(|k| k.contains("SECRET") || k.contains("ACCESS_KEY"))
        );
        let mounts = spec.containers[0].volume_mounts.as_ref().unwrap();
        assert_eq!(mounts[0].mount_path, CREDENTIALS_DIR);
        // A different model changes the hash (the worker is rolled).
        let other = worker_pod(
            &ji,
            &WorkerInputs {
                worker: "edge",
                model_url: "s3://models/edge-v2.onnx".into(),
                credentials: Some("store".into()),
                env: vec![],
                node: None,
            },
        )
        .unwrap();
        assert_ne!(
            pod.annotations()[HASH_ANNOTATION],
            other.annotations()[HASH_ANNOTATION]
        );
    }

    #[test]
    fn node_selectors_bind_to_the_first_ready_matching_node() {
        let node = |name: &str, role: &str, ready: &str| -> Node {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {format!("node-role.sedna.io/{role}"): ""}},
                "status": {"conditions": [{"type": "Ready", "status": ready}]}
            }))
            .unwrap()
        };
        let nodes = vec![
            node("cloud-b", "cloud", "True"),
            node("cloud-a", "cloud", "False"),
            node("edge-1", "edge", "True"),
        ];
        let selector = BTreeMap::from([("node-role.sedna.io/cloud".to_string(), String::new())]);
        assert_eq!(pick_node(&selector, &nodes).as_deref(), Some("cloud-b"));
        let none = BTreeMap::from([("zone".to_string(), "mars".to_string())]);
        assert_eq!(pick_node(&none, &nodes), None);
        let ji = service();
        let pod = worker_pod(
            &ji,
            &WorkerInputs {
                worker: "cloud",
                model_url: "/models/cloud.onnx".into(),
                credentials: None,
                env: vec![],
                node: Some("cloud-b".into()),
            },
        )
        .unwrap();
        assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("cloud-b"));
    }
}
