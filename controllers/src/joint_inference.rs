//! The JointInferenceService controller.
//!
//! For a service `S` it keeps, owned by `S` (so deleting `S` removes them):
//! - Pod `S-cloud` from `cloudWorker.template`, running the big model: `MODEL_URL`,
//!   `BIG_MODEL_PORT`, `SEDNA_LISTEN_HOST=0.0.0.0`, `SERVICE_NAME`, `NAMESPACE`,
//!   `WORKER_NAME`; and Service `S-cloud` in front of it;
//! - Pod `S-edge` from `edgeWorker.template`, once the cloud pod has an address:
//!   `MODEL_URL`, `HEM_NAME`, `HEM_PARAMETERS` (Sedna's JSON list), `SEDNA_CLOUD_TUNNEL`
//!   (`<namespace>/S-edge/cloud`: the edge worker reaches the cloud worker through its node's
//!   connection to the hub, to the endpoint its pod declares), `BIG_MODEL_IP` / `BIG_MODEL_PORT` (the direct route), and the
//!   same identity variables.
//!
//! A template placed with `nodeSelector` is bound to the first Ready node that matches (by
//! name), so no scheduler is needed. Credentials of a Model's `credentialName` Secret are
//! mounted as files in `/var/run/secrets/sedna/credentials` (`SEDNA_CREDENTIALS_DIR`), never
//! put in the environment. Each pod carries a hash of what it was built from; a spec change
//! deletes and recreates it ("rolls" the worker), as does a worker that failed or was deleted.
//! Both workers get the service's token (Secret `S-service-token`, mounted in
//! `/var/run/secrets/sedna/service`, named by `SEDNA_SERVICE_TOKEN_FILE`): the cloud worker
//! answers only requests that carry it.
//! The status reports `phase`, `active`, `failed`, a `Ready` condition and `startTime`; the
//! edge worker reports `metrics` itself through its node.
//!
//! The cloud worker's port is `sedna.io/cloud-port` if the service sets it, else derived
//! from the service's namespace and name (20000–29999), so several services share a node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Client, Resource, ResourceExt};
use sedna_api::common::{Condition, ConditionStatus, WorkloadPhase, set_condition};
use sedna_api::joint_inference::JointInferenceService;
use sedna_api::model::Model;

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
pub use crate::workers::{CREDENTIALS_DIR, ENDPOINTS_ANNOTATION, HASH_ANNOTATION, pick_node};
/// Label naming the service a worker belongs to.
pub const SERVICE_LABEL: &str = "sedna.io/joint-inference-service";
/// Label saying which worker a pod is (`cloud` or `edge`).
pub const WORKER_LABEL: &str = "sedna.io/worker";

/// The cloud worker's port for a service.
pub fn cloud_port(ji: &JointInferenceService) -> Result<u16, Error> {
    let key = format!("{}/{}", ji.namespace().unwrap_or_default(), ji.name_any());
    crate::workers::endpoint_port(ji.annotations(), PORT_ANNOTATION, &key)
}

fn owner(ji: &JointInferenceService) -> Option<OwnerReference> {
    ji.controller_owner_ref(&())
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

/// The Secret holding the service's token: its cloud worker answers only requests that carry
/// it, its edge worker sends it.
pub fn token_secret_name(ji: &JointInferenceService) -> String {
    crate::workers::token_secret_name(&ji.name_any())
}

/// The worker pod for a service (pure: the reconcile creates what this returns). The edge
/// worker's pod declares the cloud worker as its cloud endpoint `cloud` (see
/// [`ENDPOINTS_ANNOTATION`]), which is what lets its node tunnel to it.
pub fn worker_pod(ji: &JointInferenceService, inputs: &WorkerInputs) -> Result<Pod, Error> {
    let name = ji.name_any();
    let template = match inputs.worker {
        "cloud" => &ji.spec.cloud_worker.template,
        _ => &ji.spec.edge_worker.template,
    };
    let pod_name = format!("{name}-{}", inputs.worker);
    let mut env = vec![
        (
            "NAMESPACE".to_string(),
            ji.namespace().unwrap_or_else(|| "default".into()),
        ),
        ("SERVICE_NAME".to_string(), name.clone()),
        ("WORKER_NAME".to_string(), pod_name.clone()),
        ("MODEL_URL".to_string(), inputs.model_url.clone()),
    ];
    env.extend(inputs.env.iter().cloned());
    let mut annotations = BTreeMap::new();
    if inputs.worker == "edge"
        && let Some((_, port)) = inputs.env.iter().find(|(k, _)| k == "BIG_MODEL_PORT")
    {
        annotations.insert(
            ENDPOINTS_ANNOTATION.to_string(),
            serde_json::json!({ "cloud": format!("{name}-cloud:{port}") }).to_string(),
        );
    }
    crate::workers::build_pod(&crate::workers::PodPlan {
        owner: owner(ji),
        namespace: ji.namespace(),
        name: pod_name,
        template,
        labels: BTreeMap::from([
            (SERVICE_LABEL.to_string(), name.clone()),
            (WORKER_LABEL.to_string(), inputs.worker.to_string()),
        ]),
        annotations,
        env,
        credentials: inputs.credentials.clone(),
        service_token: Some(token_secret_name(ji)),
        node: inputs.node.clone(),
        restart_policy: None,
    })
    .map_err(|e| match e {
        Error::Invalid(_) => Error::Invalid(format!(
            "{}Worker.template has no containers",
            inputs.worker
        )),
        other => other,
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

use crate::workers::{self, Context, pod_phase};

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
        ctx.events(ji)
            .publish(EventType::Warning, reason, message)
            .await;
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
    crate::workers::ensure_pod(
        pods,
        &ctx.events(ji),
        desired,
        crate::workers::Stopped::Recreate,
    )
    .await
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
        match crate::workers::placement(&ctx.client, template.spec.as_ref()).await? {
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

    // The token, the Service, then the cloud worker.
    crate::workers::ensure_token(
        &ctx.client,
        &ns,
        &ji.name_any(),
        owner(&ji),
        BTreeMap::from([(SERVICE_LABEL.to_string(), ji.name_any())]),
    )
    .await?;
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
                        format!("{ns}/{}-edge/cloud", ji.name_any()),
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
        ctx.events(&*ji)
            .publish(
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

/// Runs the JointInferenceService controller until `shutdown`.
pub async fn run(
    client: Client,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    workers::run_owning_pods::<JointInferenceService, _>(
        client,
        SERVICE_LABEL,
        "joint inference",
        reconcile,
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;

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
        // The service's token, as a mounted Secret the variable names.
        assert_eq!(
            env["SEDNA_SERVICE_TOKEN_FILE"],
            "/var/run/secrets/sedna/service/token"
        );
        assert_eq!(mounts[1].mount_path, "/var/run/secrets/sedna/service");
        let token_volume = spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == mounts[1].name);
        assert_eq!(
            token_volume
                .and_then(|v| v.secret.as_ref())
                .and_then(|s| s.secret_name.as_deref()),
            Some("digits-service-token")
        );
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
