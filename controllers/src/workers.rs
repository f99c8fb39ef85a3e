//! What every controller does with its worker pods: build one from the workload's template
//! (Sedna's environment injected, the template's own variables winning; credentials mounted
//! as files; the owner set so deleting the workload removes it; a hash of what it was built
//! from), place it (`nodeName`, or the first Ready node matching `nodeSelector`), keep it as
//! built (a changed spec, a deleted or a failed pod is recreated), and record every change as
//! an Event on the workload.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;

use k8s_openapi::api::core::v1::{
    EnvVar, Node, ObjectReference, Pod, PodSpec, Secret, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use sedna_api::common::WorkerTemplate;
use sha2::{Digest, Sha256};

use crate::Error;

/// Annotation carrying the hash of what a worker pod was built from.
pub const HASH_ANNOTATION: &str = "sedna.io/spec-hash";
pub use sedna_api::common::CLOUD_ENDPOINTS_ANNOTATION as ENDPOINTS_ANNOTATION;
/// Where a Model's or Dataset's credentials are mounted in a worker.
pub const CREDENTIALS_DIR: &str = "/var/run/secrets/sedna/credentials";
/// Where a service's token is mounted in its workers (the file `token`).
pub const SERVICE_TOKEN_DIR: &str = "/var/run/secrets/sedna/service";

/// The Secret holding a workload's token (key `token`): its cloud-side worker (a JI cloud
/// worker, an FL aggregator) answers only callers that present it; its other workers get it
/// mounted.
pub fn token_secret_name(workload: &str) -> String {
    format!("{workload}-service-token")
}

/// Creates workload `name`'s token Secret (32 random bytes, owned by the workload) unless it
/// exists.
pub async fn ensure_token(
    client: &Client,
    namespace: &str,
    name: &str,
    owner: Option<OwnerReference>,
    labels: BTreeMap<String, String>,
) -> Result<(), Error> {
    use base64::Engine;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret_name = token_secret_name(name);
    if secrets.get_opt(&secret_name).await?.is_some() {
        return Ok(());
    }
    let bytes: [u8; 32] = rand::random();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name),
            namespace: Some(namespace.to_owned()),
            owner_references: owner.map(|o| vec![o]),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([(
            "token".to_string(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
        )])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        // Another reconcile created it meanwhile.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Everything a worker pod is built from.
#[derive(Debug, Clone)]
pub struct PodPlan<'a> {
    /// The workload (owner of the pod).
    pub owner: Option<OwnerReference>,
    /// Namespace.
    pub namespace: Option<String>,
    /// Pod name.
    pub name: String,
    /// The workload's template for this worker.
    pub template: &'a WorkerTemplate,
    /// Labels added to the template's.
    pub labels: BTreeMap<String, String>,
    /// Annotations added (the spec hash is added too).
    pub annotations: BTreeMap<String, String>,
    /// Variables injected (the template's own of the same name win).
    pub env: Vec<(String, String)>,
    /// A Secret mounted as files in [`CREDENTIALS_DIR`].
    pub credentials: Option<String>,
    /// A Secret holding the service's token (key `token`), mounted in [`SERVICE_TOKEN_DIR`]
    /// and named by `SEDNA_SERVICE_TOKEN_FILE`.
    pub service_token: Option<String>,
    /// The node, when the template does not name one.
    pub node: Option<String>,
    /// The restart policy when the template sets none.
    pub restart_policy: Option<&'static str>,
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The pod for a plan (pure).
pub fn build_pod(plan: &PodPlan<'_>) -> Result<Pod, Error> {
    let mut spec: PodSpec = plan.template.spec.clone().unwrap_or_default();
    if spec.containers.is_empty() {
        return Err(Error::Invalid(format!(
            "the template of {} has no containers",
            plan.name
        )));
    }
    if spec.node_name.is_none() {
        spec.node_name = plan.node.clone();
    }
    if spec.restart_policy.is_none() {
        spec.restart_policy = plan.restart_policy.map(str::to_string);
    }
    let mut injected: Vec<EnvVar> = plan.env.iter().map(|(k, v)| env(k, v.clone())).collect();
    if let Some(secret) = &plan.credentials {
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
    if let Some(secret) = &plan.service_token {
        injected.push(env(
            "SEDNA_SERVICE_TOKEN_FILE",
            format!("{SERVICE_TOKEN_DIR}/token"),
        ));
        spec.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: "sedna-service-token".into(),
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
        if plan.credentials.is_some() {
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
        if plan.service_token.is_some() {
            container
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: "sedna-service-token".into(),
                    mount_path: SERVICE_TOKEN_DIR.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
        }
    }
    let mut labels: BTreeMap<String, String> = plan
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.extend(plan.labels.clone());
    let mut annotations = plan.annotations.clone();
    let hash = {
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&spec).map_err(|e| Error::Invalid(e.to_string()))?);
        h.update(serde_json::to_vec(&annotations).map_err(|e| Error::Invalid(e.to_string()))?);
        hex::encode(&h.finalize()[..8])
    };
    annotations.insert(HASH_ANNOTATION.to_string(), hash);
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(plan.name.clone()),
            namespace: plan.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: plan.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// A pod's phase (`Pending` before it has a status).
pub fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
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

/// Where a template's pod goes: `Ok(None)` when it names its node, `Ok(Some(node))` for the
/// first Ready node matching its `nodeSelector`, `Err(why)` when neither works.
pub async fn placement(
    client: &Client,
    spec: Option<&PodSpec>,
) -> Result<Result<Option<String>, String>, Error> {
    let Some(spec) = spec else {
        return Ok(Err("the template has no pod spec".into()));
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

/// Publishes Events about one workload.
pub struct Events<'a> {
    /// The recorder.
    pub recorder: &'a Recorder,
    /// The workload.
    pub object: ObjectReference,
}

impl Events<'_> {
    /// Records an event (failures to record are logged, not fatal).
    pub async fn publish(&self, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &self.object).await {
            tracing::debug!(error = %e, "event not recorded");
        }
    }
}

/// What a workload controller's reconcile gets: the client and the Event recorder.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Records Events as `sedna-gm`.
    pub recorder: Recorder,
    /// Consecutive failures per object (retries back off per object).
    pub failures: crate::Failures,
}

impl Context {
    /// Events about `object`.
    pub fn events<K: Resource<DynamicType = ()>>(&self, object: &K) -> Events<'_> {
        Events {
            recorder: &self.recorder,
            object: object.object_ref(&()),
        }
    }
}

/// Runs a workload controller until `shutdown`: `reconcile` on every change of a `K` or of a
/// pod labelled `label` that it owns; a failed reconcile is logged (as `what`) and retried
/// after a growing, jittered delay.
pub async fn run_owning_pods<K, F>(
    client: Client,
    label: &str,
    what: &'static str,
    reconcile: impl FnMut(Arc<K>, Arc<Context>) -> F,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "sedna-gm".into(),
            instance: None,
        },
    );
    let error_policy = move |object: Arc<K>, error: &Error, ctx: Arc<Context>| {
        let delay = ctx.failures.failed(&*object);
        tracing::warn!(%what, name = %object.name_any(), %error, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    };
    let mut reconcile = reconcile;
    let reconcile = move |object: Arc<K>, ctx: Arc<Context>| {
        let work = reconcile(object.clone(), ctx.clone());
        async move {
            let result = work.await;
            if result.is_ok() {
                ctx.failures.succeeded(&*object);
            }
            result
        }
    };
    Controller::new(Api::<K>::all(client.clone()), watcher::Config::default())
        .owns(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(label),
        )
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            error_policy,
            Arc::new(Context {
                client,
                recorder,
                failures: crate::Failures::default(),
            }),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
}

/// What to do with a worker that has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Recreate it (a service's worker should always run).
    Recreate,
    /// Keep it (a job's worker that finished, or failed for good).
    Keep,
}

/// Makes sure the worker pod exists as built; returns it when it does.
pub async fn ensure_pod(
    pods: &Api<Pod>,
    events: &Events<'_>,
    desired: Pod,
    stopped: Stopped,
) -> Result<Option<Pod>, Error> {
    let name = desired.name_any();
    let want_hash = desired.annotations().get(HASH_ANNOTATION).cloned();
    match pods.get_opt(&name).await? {
        Some(existing) if existing.metadata.deletion_timestamp.is_some() => Ok(None),
        Some(existing) => {
            let stale = existing.annotations().get(HASH_ANNOTATION) != want_hash.as_ref();
            let ended = matches!(pod_phase(&existing), "Failed" | "Succeeded");
            if stale || (ended && stopped == Stopped::Recreate) {
                let why = if stale {
                    "its spec changed"
                } else {
                    "it stopped"
                };
                pods.delete(&name, &DeleteParams::default()).await?;
                events
                    .publish(
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
            events
                .publish(
                    EventType::Normal,
                    "CreatedWorker",
                    format!("created pod {name} on {node}"),
                )
                .await;
            Ok(Some(created))
        }
    }
}

/// A port for a workload's cloud endpoint: `annotation` when the workload sets it, else
/// derived from `key` (20000–29999; the key names the workload, e.g. `namespace/name`, and
/// its kind where two kinds may share a name), so several workloads share a node.
pub fn endpoint_port(
    annotations: &BTreeMap<String, String>,
    annotation: &str,
    key: &str,
) -> Result<u16, Error> {
    if let Some(value) = annotations.get(annotation) {
        return value.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            Error::Invalid(format!("annotation {annotation}={value:?} is not a port"))
        });
    }
    let digest = Sha256::digest(key.as_bytes());
    Ok(20_000 + u16::from_be_bytes([digest[0], digest[1]]) % 10_000)
}
