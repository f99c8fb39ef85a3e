//! The workload controllers of the embedded control plane — ReplicaSet, Deployment,
//! DaemonSet and Job — for clusters that lack them (`sedna up`); on a real cluster
//! kube-controller-manager runs them and these stay off.
//!
//! Each reconcile reads the object and the pods (or ReplicaSets) it controls, decides with a
//! pure function ([`replica_diff`], [`rollout`], [`daemon_plan`], [`job_step`], tested without
//! an API), then creates, scales or deletes, and writes the status `kubectl rollout status`,
//! `kubectl get` and `kubectl wait` read.
//!
//! - ReplicaSet: keeps `spec.replicas` pods of its template (replacing failed ones), deleting
//!   the least useful first (unscheduled, not ready, newest).
//! - Deployment: one ReplicaSet per template (label `pod-template-hash`, annotation
//!   `deployment.kubernetes.io/revision`), rolled by `RollingUpdate` within `maxSurge` /
//!   `maxUnavailable` or by `Recreate`; `revisionHistoryLimit` old ReplicaSets are kept for
//!   `kubectl rollout undo`.
//! - DaemonSet: one pod per node its template may run on (selector, affinity, taints; it
//!   tolerates a node being cordoned, not ready or unreachable), placed directly on the node,
//!   replaced node by node when the template changes (at most `maxUnavailable` at a time).
//! - Job: runs pods until `completions` succeed, at most `parallelism` at once, and fails after
//!   `backoffLimit` failed pods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};

use crate::Error;

/// Label carrying a Deployment's template hash on its ReplicaSets and pods.
pub const TEMPLATE_HASH: &str = "pod-template-hash";
/// Annotation carrying a ReplicaSet's revision within its Deployment.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Label carrying a DaemonSet's template hash on its pods.
pub const REVISION_HASH: &str = "controller-revision-hash";

const RESYNC: Duration = Duration::from_secs(30);

/// A pod as the controllers weigh it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodState {
    /// Name.
    pub name: String,
    /// The node it is bound to, if any.
    pub node: Option<String>,
    /// Its Ready condition is True.
    pub ready: bool,
    /// `Succeeded`, `Failed`, or `None` while it runs.
    pub finished: Option<bool>,
    /// Creation time (seconds), for "newest first".
    pub created: i64,
    /// Being deleted.
    pub deleting: bool,
    /// Its template hash label, if any.
    pub hash: Option<String>,
}

impl PodState {
    /// The state of `pod`.
    pub fn of(pod: &Pod, hash_label: &str) -> Self {
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        Self {
            name: pod.name_any(),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            finished: match phase {
                Some("Succeeded") => Some(true),
                Some("Failed") => Some(false),
                _ => None,
            },
            created: pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_second()),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            hash: pod.labels().get(hash_label).cloned(),
        }
    }

    fn active(&self) -> bool {
        self.finished.is_none() && !self.deleting
    }
}

/// How many pods a ReplicaSet must create, and which of its pods to delete (the least useful
/// first: unscheduled, then not ready, then newest), to hold `replicas`. Failed pods are
/// deleted too (they are replaced).
pub fn replica_diff(replicas: usize, pods: &[PodState]) -> (usize, Vec<String>) {
    let mut delete: Vec<String> = pods
        .iter()
        .filter(|p| p.finished.is_some() && !p.deleting)
        .map(|p| p.name.clone())
        .collect();
    let mut active: Vec<&PodState> = pods.iter().filter(|p| p.active()).collect();
    if active.len() <= replicas {
        return (replicas - active.len(), delete);
    }
    active.sort_by_key(|p| (p.node.is_some(), p.ready, std::cmp::Reverse(p.created)));
    let extra = active.len() - replicas;
    delete.extend(active.iter().take(extra).map(|p| p.name.clone()));
    (0, delete)
}

/// A ReplicaSet as a rollout weighs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsState {
    /// Name.
    pub name: String,
    /// `spec.replicas`.
    pub replicas: i32,
    /// `status.availableReplicas`.
    pub available: i32,
    /// Revision.
    pub revision: i64,
}

/// `maxSurge` / `maxUnavailable` of `replicas`: a percentage rounds up for the surge and down
/// for unavailability; both zero would never progress, so unavailability becomes 1.
pub fn rolling_bounds(
    replicas: i32,
    surge: Option<&IntOrString>,
    unavailable: Option<&IntOrString>,
) -> (i32, i32) {
    let resolve = |v: Option<&IntOrString>, default: &str, up: bool| -> i32 {
        let text = match v {
            Some(IntOrString::Int(n)) => return (*n).max(0),
            Some(IntOrString::String(s)) => s.as_str(),
            None => default,
        };
        let pct: f64 = text.trim_end_matches('%').parse().unwrap_or(25.0);
        let exact = f64::from(replicas) * pct / 100.0;
        (if up { exact.ceil() } else { exact.floor() }) as i32
    };
    let surge = resolve(surge, "25%", true);
    let mut unavailable = resolve(unavailable, "25%", false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable)
}

/// One step of a rolling update: the new `spec.replicas` of each ReplicaSet that changes.
/// The new ReplicaSet grows while the total stays within `replicas + surge`; old ones shrink
/// (unavailable pods first, oldest revision first) while availability stays at or above
/// `replicas - unavailable`.
pub fn rollout(
    replicas: i32,
    surge: i32,
    unavailable: i32,
    new: &RsState,
    old: &[RsState],
) -> Vec<(String, i32)> {
    let mut changes = Vec::new();
    let total: i32 = new.replicas + old.iter().map(|r| r.replicas).sum::<i32>();
    // Grow the new one.
    let room = replicas + surge - total;
    if new.replicas < replicas && room > 0 {
        let grown = (new.replicas + room).min(replicas);
        changes.push((new.name.clone(), grown));
    } else if new.replicas > replicas {
        changes.push((new.name.clone(), replicas));
    }
    // Shrink old ones: their unavailable pods cost nothing; then what availability allows.
    let available: i32 = new.available + old.iter().map(|r| r.available).sum::<i32>();
    let mut budget = (available - (replicas - unavailable)).max(0);
    let mut olds: Vec<&RsState> = old.iter().filter(|r| r.replicas > 0).collect();
    olds.sort_by_key(|r| r.revision);
    for r in olds {
        let idle = (r.replicas - r.available).max(0);
        let cut = (idle + budget).min(r.replicas);
        if cut > 0 {
            budget -= (cut - idle).max(0);
            changes.push((r.name.clone(), r.replicas - cut));
        }
    }
    changes
}

/// What a Job does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobStep {
    /// Create this many pods.
    Run(usize),
    /// Enough pods succeeded.
    Complete,
    /// Too many pods failed: stop the active ones.
    Failed(String),
}

/// The next step of a Job with `pods`.
pub fn job_step(
    completions: i32,
    parallelism: i32,
    backoff_limit: i32,
    pods: &[PodState],
) -> JobStep {
    let succeeded = pods.iter().filter(|p| p.finished == Some(true)).count() as i32;
    let failed = pods.iter().filter(|p| p.finished == Some(false)).count() as i32;
    let active = pods.iter().filter(|p| p.active()).count() as i32;
    if succeeded >= completions {
        return JobStep::Complete;
    }
    if failed > backoff_limit {
        return JobStep::Failed(format!(
            "Job has reached the specified backoff limit ({failed} failed pods, backoffLimit {backoff_limit})"
        ));
    }
    let wanted = parallelism.min(completions - succeeded);
    JobStep::Run((wanted - active).max(0) as usize)
}

/// Where a DaemonSet's pods must be created (nodes without one) and which to delete (on nodes
/// no longer eligible, duplicates, finished ones, and — at most `unavailable` at a time, when
/// the rest are ready — pods of an older template).
pub fn daemon_plan(
    eligible: &[String],
    pods: &[PodState],
    hash: &str,
    unavailable: usize,
) -> (Vec<String>, Vec<String>) {
    let mut by_node: BTreeMap<&str, Vec<&PodState>> = BTreeMap::new();
    let mut delete = Vec::new();
    for p in pods.iter().filter(|p| !p.deleting) {
        match &p.node {
            Some(n) if p.finished.is_none() && eligible.contains(n) => {
                by_node.entry(n.as_str()).or_default().push(p)
            }
            _ => delete.push(p.name.clone()),
        }
    }
    let mut create = Vec::new();
    let mut not_ready = 0;
    let mut outdated = Vec::new();
    for node in eligible {
        match by_node.get_mut(node.as_str()) {
            None => {
                create.push(node.clone());
                not_ready += 1;
            }
            Some(list) => {
                list.sort_by_key(|p| {
                    std::cmp::Reverse((p.hash.as_deref() == Some(hash), p.ready, p.created))
                });
                for extra in &list[1..] {
                    delete.push(extra.name.clone());
                }
                let kept = list[0];
                if !kept.ready {
                    not_ready += 1;
                }
                if kept.hash.as_deref() != Some(hash) {
                    outdated.push(kept);
                }
            }
        }
    }
    // Replace outdated pods within the unavailability budget, not-ready ones first.
    outdated.sort_by_key(|p| (p.ready, p.name.clone()));
    let mut budget = unavailable.saturating_sub(not_ready);
    for p in outdated {
        if !p.ready {
            delete.push(p.name.clone());
        } else if budget > 0 {
            budget -= 1;
            delete.push(p.name.clone());
        }
    }
    (create, delete)
}

/// A short, stable hash of a pod template (the label values Kubernetes uses are opaque too).
pub fn template_hash(template: &PodTemplateSpec) -> String {
    use sha2::Digest;
    let json = serde_json::to_vec(template).unwrap_or_default();
    let digest = sha2::Sha256::digest(&json);
    hex::encode(&digest[..5])
}

fn selector_string(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in selector.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.meta().name.clone().unwrap_or_default(),
        uid: owner.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// The pods of `namespace` matching `selector` that `uid` controls.
async fn owned_pods(
    client: &Client,
    namespace: &str,
    selector: &LabelSelector,
    uid: &str,
) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&selector_string(selector)))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| owned_by(&p.metadata, uid))
        .collect())
}

/// A pod of `template` controlled by `owner`, named `<prefix>-<random>`.
fn pod_of(
    template: &PodTemplateSpec,
    owner: OwnerReference,
    prefix: &str,
    node: Option<&str>,
    extra_labels: &[(&str, &str)],
) -> Pod {
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{prefix}-"));
    meta.namespace = None;
    meta.owner_references = Some(vec![owner]);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    for (k, v) in extra_labels {
        labels.insert((*k).to_owned(), (*v).to_owned());
    }
    let mut spec = template.spec.clone().unwrap_or_default();
    if let Some(node) = node {
        spec.node_name = Some(node.to_owned());
    }
    Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    }
}

async fn delete_pod(client: &Client, namespace: &str, name: &str) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match pods.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn patch_status<K>(api: &Api<K>, name: &str, status: Value) -> Result<(), Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// The shared state of the workload controllers.
pub struct Ctx {
    client: Client,
    failures: crate::Failures,
}

fn on_error<K: Resource>(object: Arc<K>, error: &Error, ctx: Arc<Ctx>) -> Action {
    tracing::warn!(name = ?object.meta().name, %error, "workload reconcile failed");
    Action::requeue(ctx.failures.failed(&*object))
}

// ---- ReplicaSet ----

async fn reconcile_rs(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = rs.namespace().unwrap_or_default();
    let uid = rs.uid().unwrap_or_default();
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = rs.spec.clone().unwrap_or_default();
    let pods = owned_pods(&ctx.client, &ns, &spec.selector, &uid).await?;
    let states: Vec<PodState> = pods
        .iter()
        .map(|p| PodState::of(p, TEMPLATE_HASH))
        .collect();
    let replicas = spec.replicas.unwrap_or(1).max(0) as usize;
    let (create, delete) = replica_diff(replicas, &states);
    let template = spec.template.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for _ in 0..create.min(500) {
        api.create(
            &PostParams::default(),
            &pod_of(&template, controller_ref(&*rs), &rs.name_any(), None, &[]),
        )
        .await?;
    }
    for name in &delete {
        delete_pod(&ctx.client, &ns, name).await?;
    }
    let active: Vec<&PodState> = states
        .iter()
        .filter(|p| p.active() && !delete.contains(&p.name))
        .collect();
    let ready = active.iter().filter(|p| p.ready).count();
    let status = json!({
        "replicas": active.len() + create,
        "fullyLabeledReplicas": active.len() + create,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "observedGeneration": rs.metadata.generation.unwrap_or(0),
    });
    let rss: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    patch_status(&rss, &rs.name_any(), status).await?;
    ctx.failures.succeeded(&*rs);
    Ok(Action::requeue(RESYNC))
}

// ---- Deployment ----

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

async fn reconcile_deployment(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = d.namespace().unwrap_or_default();
    let uid = d.uid().unwrap_or_default();
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = d.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let mut template = spec.template.clone();
    let hash = template_hash(&template);
    let rss: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let owned: Vec<ReplicaSet> = rss
        .list(&ListParams::default().labels(&selector_string(&spec.selector)))
        .await?
        .items
        .into_iter()
        .filter(|r| owned_by(&r.metadata, &uid))
        .collect();
    let max_revision = owned.iter().map(revision_of).max().unwrap_or(0);
    let existing = owned
        .iter()
        .find(|r| r.labels().get(TEMPLATE_HASH) == Some(&hash))
        .cloned();
    let new = match existing {
        Some(rs) => {
            // A template rolled back to: it becomes the newest revision again.
            if revision_of(&rs) < max_revision {
                let patch = json!({ "metadata": { "annotations": { REVISION: (max_revision + 1).to_string() } } });
                rss.patch(
                    &rs.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await?
            } else {
                rs
            }
        }
        None => {
            let labels = template
                .metadata
                .get_or_insert_with(Default::default)
                .labels
                .get_or_insert_with(BTreeMap::new);
            labels.insert(TEMPLATE_HASH.into(), hash.clone());
            let mut selector = spec.selector.clone();
            selector
                .match_labels
                .get_or_insert_with(BTreeMap::new)
                .insert(TEMPLATE_HASH.into(), hash.clone());
            let recreate =
                spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
            let first = owned
                .iter()
                .all(|r| r.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) == 0);
            let rs = ReplicaSet {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("{}-{hash}", d.name_any())),
                    labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
                    annotations: Some(BTreeMap::from([(
                        REVISION.to_owned(),
                        (max_revision + 1).to_string(),
                    )])),
                    owner_references: Some(vec![controller_ref(&*d)]),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
                    replicas: Some(if first && !recreate { replicas } else { 0 }),
                    selector,
                    template: Some(template.clone()),
                    min_ready_seconds: spec.min_ready_seconds,
                }),
                status: None,
            };
            match rss.create(&PostParams::default(), &rs).await {
                Ok(rs) => rs,
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return Ok(Action::requeue(Duration::from_millis(200)));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    // The Deployment carries its newest revision, as Kubernetes' controller sets it (and
    // `kubectl rollout undo` patches it).
    let revision = revision_of(&new).to_string();
    if d.annotations().get(REVISION) != Some(&revision) {
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({ "metadata": { "annotations": { REVISION: revision } } });
        deployments
            .patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    let state = |r: &ReplicaSet| RsState {
        name: r.name_any(),
        replicas: r.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
        available: r
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0),
        revision: revision_of(r),
    };
    let new_state = state(&new);
    let olds: Vec<&ReplicaSet> = owned
        .iter()
        .filter(|r| r.name_any() != new.name_any())
        .collect();
    let old_states: Vec<RsState> = olds.iter().map(|r| state(r)).collect();
    let strategy = spec.strategy.clone().unwrap_or_default();
    let changes = if strategy.type_.as_deref() == Some("Recreate") {
        let old_pods: i32 = olds
            .iter()
            .map(|r| r.status.as_ref().map_or(0, |s| s.replicas))
            .sum();
        let mut c: Vec<(String, i32)> = old_states
            .iter()
            .filter(|r| r.replicas > 0)
            .map(|r| (r.name.clone(), 0))
            .collect();
        if old_pods == 0 && c.is_empty() && new_state.replicas != replicas {
            c.push((new_state.name.clone(), replicas));
        }
        c
    } else {
        let rolling = strategy.rolling_update.unwrap_or_default();
        let (surge, unavailable) = rolling_bounds(
            replicas,
            rolling.max_surge.as_ref(),
            rolling.max_unavailable.as_ref(),
        );
        rollout(replicas, surge, unavailable, &new_state, &old_states)
    };
    for (name, count) in &changes {
        let patch = json!({ "spec": { "replicas": count } });
        rss.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    // History beyond revisionHistoryLimit: the oldest empty ReplicaSets go.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let mut empty: Vec<&&ReplicaSet> = olds
        .iter()
        .filter(|r| {
            r.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) == 0
                && r.status.as_ref().map_or(0, |s| s.replicas) == 0
        })
        .collect();
    empty.sort_by_key(|r| revision_of(r));
    for r in empty.iter().take(empty.len().saturating_sub(limit)) {
        let _ = rss.delete(&r.name_any(), &DeleteParams::background()).await;
    }
    // Status, from the ReplicaSets' own.
    let all: Vec<&ReplicaSet> = std::iter::once(&new).chain(olds.iter().copied()).collect();
    let sum = |f: fn(&k8s_openapi::api::apps::v1::ReplicaSetStatus) -> i32| -> i32 {
        all.iter().filter_map(|r| r.status.as_ref()).map(f).sum()
    };
    let total = sum(|s| s.replicas);
    let ready = sum(|s| s.ready_replicas.unwrap_or(0));
    let available = sum(|s| s.available_replicas.unwrap_or(0));
    let updated = new.status.as_ref().map_or(0, |s| s.replicas);
    let (_, max_unavailable) = {
        let r = spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.clone())
            .unwrap_or_default();
        rolling_bounds(replicas, r.max_surge.as_ref(), r.max_unavailable.as_ref())
    };
    let now = jiff::Timestamp::now().to_string();
    let complete = updated == replicas && total == replicas && available == replicas;
    let previous = d.status.as_ref();
    let progressing = progress_condition(
        previous
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Progressing"))
            .map(|c| {
                (
                    c.reason.clone().unwrap_or_default(),
                    c.last_update_time.as_ref().map(|t| t.0.as_second()),
                )
            }),
        previous.map(|s| {
            (
                s.updated_replicas.unwrap_or(0),
                s.available_replicas.unwrap_or(0),
            )
        }),
        (updated, available),
        complete,
        spec.progress_deadline_seconds.unwrap_or(600),
        jiff::Timestamp::now().as_second(),
        &new.name_any(),
    );
    let status = json!({
        "observedGeneration": d.metadata.generation.unwrap_or(0),
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (replicas - available).max(0),
        "conditions": [
            { "type": "Available",
              "status": if available >= replicas - max_unavailable { "True" } else { "False" },
              "reason": if available >= replicas - max_unavailable { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
              "message": if available >= replicas - max_unavailable { "Deployment has minimum availability." } else { "Deployment does not have minimum availability." },
              "lastUpdateTime": now, "lastTransitionTime": now },
            progressing,
        ],
    });
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    patch_status(&deployments, &d.name_any(), status).await?;
    ctx.failures.succeeded(&*d);
    Ok(Action::requeue(if complete {
        RESYNC
    } else {
        Duration::from_secs(2)
    }))
}

/// A Deployment's `Progressing` condition: progress (more updated or available replicas than
/// the last status said) renews its time; a rollout without progress for longer than
/// `progressDeadlineSeconds` is `ProgressDeadlineExceeded` (status False), which `kubectl
/// rollout status` reports as a failure; a complete rollout is `NewReplicaSetAvailable`.
/// `previous` is the last condition's reason and update time (seconds), `counts` the
/// (updated, available) replicas of the last status and of now.
pub fn progress_condition(
    previous: Option<(String, Option<i64>)>,
    before: Option<(i32, i32)>,
    now_counts: (i32, i32),
    complete: bool,
    deadline_seconds: i32,
    now: i64,
    new_rs: &str,
) -> Value {
    let stamp = |t: i64| {
        jiff::Timestamp::from_second(t)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    if complete {
        return json!({ "type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
            "message": format!("ReplicaSet {new_rs:?} has successfully progressed."),
            "lastUpdateTime": stamp(now), "lastTransitionTime": stamp(now) });
    }
    let progressed = before.is_none_or(|(u, a)| now_counts.0 > u || now_counts.1 > a);
    let (reason, since) = previous.unwrap_or_default();
    let since = match since {
        Some(t) if !progressed && reason == "ReplicaSetUpdated" => t,
        Some(t) if reason == "ProgressDeadlineExceeded" && !progressed => t,
        _ => now,
    };
    if reason == "ProgressDeadlineExceeded" && !progressed
        || now - since > i64::from(deadline_seconds)
    {
        return json!({ "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
            "message": format!("ReplicaSet {new_rs:?} has timed out progressing."),
            "lastUpdateTime": stamp(since), "lastTransitionTime": stamp(since) });
    }
    json!({ "type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated",
        "message": format!("ReplicaSet {new_rs:?} is progressing."),
        "lastUpdateTime": stamp(since), "lastTransitionTime": stamp(since) })
}

// ---- DaemonSet ----

/// The tolerations every DaemonSet pod gets, as Kubernetes adds them.
fn daemon_tolerations() -> Vec<k8s_openapi::api::core::v1::Toleration> {
    [
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/not-ready", "NoSchedule"),
        ("node.kubernetes.io/unreachable", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ]
    .into_iter()
    .map(|(key, effect)| k8s_openapi::api::core::v1::Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    })
    .collect()
}

async fn reconcile_daemonset(ds: Arc<DaemonSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = ds.namespace().unwrap_or_default();
    let uid = ds.uid().unwrap_or_default();
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = ds.spec.clone().unwrap_or_default();
    let mut template = spec.template.clone();
    let hash = template_hash(&template);
    if let Some(pod_spec) = template.spec.as_mut() {
        let tolerations = pod_spec.tolerations.get_or_insert_with(Vec::new);
        for t in daemon_tolerations() {
            if !tolerations.contains(&t) {
                tolerations.push(t);
            }
        }
    }
    let probe = Pod {
        metadata: Default::default(),
        spec: template.spec.clone(),
        status: None,
    };
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let wants = crate::scheduler::Resources::default();
    let mut eligible: Vec<String> = nodes
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(crate::scheduler::NodeView::of)
        .filter(|n| crate::scheduler::fits(&probe, &wants, n).is_ok())
        .map(|n| n.name)
        .collect();
    eligible.sort();
    let pods = owned_pods(&ctx.client, &ns, &spec.selector, &uid).await?;
    let states: Vec<PodState> = pods
        .iter()
        .map(|p| PodState::of(p, REVISION_HASH))
        .collect();
    let unavailable = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.as_ref())
        .map_or(1, |v| match v {
            IntOrString::Int(n) => (*n).max(1) as usize,
            IntOrString::String(s) => {
                let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(0.0);
                ((eligible.len() as f64 * pct / 100.0).floor() as usize).max(1)
            }
        });
    let on_delete = spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        == Some("OnDelete");
    let (create, delete) = daemon_plan(
        &eligible,
        &states,
        &hash,
        if on_delete { 0 } else { unavailable },
    );
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for node in &create {
        let pod = pod_of(
            &template,
            controller_ref(&*ds),
            &ds.name_any(),
            Some(node),
            &[(REVISION_HASH, &hash)],
        );
        api.create(&PostParams::default(), &pod).await?;
    }
    for name in &delete {
        delete_pod(&ctx.client, &ns, name).await?;
    }
    let current: Vec<&PodState> = states
        .iter()
        .filter(|p| p.active() && !delete.contains(&p.name))
        .collect();
    let ready = current.iter().filter(|p| p.ready).count();
    let updated = current
        .iter()
        .filter(|p| p.hash.as_deref() == Some(&hash))
        .count()
        + create.len();
    let status = json!({
        "desiredNumberScheduled": eligible.len(),
        "currentNumberScheduled": current.len() + create.len(),
        "numberMisscheduled": 0,
        "numberReady": ready,
        "numberAvailable": ready,
        "numberUnavailable": eligible.len().saturating_sub(ready),
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.metadata.generation.unwrap_or(0),
    });
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    patch_status(&dss, &ds.name_any(), status).await?;
    ctx.failures.succeeded(&*ds);
    let settled = create.is_empty() && delete.is_empty() && ready == eligible.len();
    Ok(Action::requeue(if settled {
        RESYNC
    } else {
        Duration::from_secs(2)
    }))
}

// ---- Job ----

async fn reconcile_job(job: Arc<Job>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let uid = job.uid().unwrap_or_default();
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let finished = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        });
    if finished {
        return Ok(Action::await_change());
    }
    let spec = job.spec.clone().unwrap_or_default();
    let selector = spec.selector.clone().unwrap_or_default();
    let pods = owned_pods(&ctx.client, &ns, &selector, &uid).await?;
    let states: Vec<PodState> = pods.iter().map(|p| PodState::of(p, "")).collect();
    let completions = spec.completions.unwrap_or(1).max(0);
    let step = job_step(
        completions,
        spec.parallelism.unwrap_or(1).max(0),
        spec.backoff_limit.unwrap_or(6).max(0),
        &states,
    );
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let now = jiff::Timestamp::now().to_string();
    let mut created = 0;
    let mut conditions = Vec::new();
    match &step {
        JobStep::Run(n) => {
            let template = spec.template.clone();
            for _ in 0..*n {
                api.create(
                    &PostParams::default(),
                    &pod_of(&template, controller_ref(&*job), &job.name_any(), None, &[]),
                )
                .await?;
                created += 1;
            }
        }
        JobStep::Complete => conditions.push(json!({ "type": "Complete", "status": "True",
            "lastProbeTime": now, "lastTransitionTime": now })),
        JobStep::Failed(why) => {
            for p in states.iter().filter(|p| p.active()) {
                delete_pod(&ctx.client, &ns, &p.name).await?;
            }
            conditions.push(
                json!({ "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "message": why, "lastProbeTime": now, "lastTransitionTime": now }),
            );
        }
    }
    let succeeded = states.iter().filter(|p| p.finished == Some(true)).count();
    let failed = states.iter().filter(|p| p.finished == Some(false)).count();
    let active = if matches!(step, JobStep::Run(_)) {
        states.iter().filter(|p| p.active()).count() + created
    } else {
        0
    };
    let mut status = json!({
        "active": active,
        "succeeded": succeeded,
        "failed": failed,
        "ready": states.iter().filter(|p| p.active() && p.ready).count(),
    });
    if job
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .is_none()
    {
        status["startTime"] = json!(now);
    }
    if step == JobStep::Complete {
        status["completionTime"] = json!(now);
    }
    if !conditions.is_empty() {
        status["conditions"] = json!(conditions);
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    patch_status(&jobs, &job.name_any(), status).await?;
    ctx.failures.succeeded(&*job);
    Ok(Action::requeue(Duration::from_secs(5)))
}

/// Runs the ReplicaSet, Deployment, DaemonSet and Job controllers until `shutdown`.
pub async fn run(client: Client, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        failures: crate::Failures::default(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let config = watcher::Config::default();
    let pods = || Api::<Pod>::all(client.clone());
    let rs = Controller::new(Api::<ReplicaSet>::all(client.clone()), config.clone())
        .owns(pods(), config.clone())
        .graceful_shutdown_on(stopped())
        .run(reconcile_rs, on_error, ctx.clone())
        .for_each(|_| async {});
    let deployments = Controller::new(Api::<Deployment>::all(client.clone()), config.clone())
        .owns(Api::<ReplicaSet>::all(client.clone()), config.clone())
        .graceful_shutdown_on(stopped())
        .run(reconcile_deployment, on_error, ctx.clone())
        .for_each(|_| async {});
    // A node that joins (or changes) may need every DaemonSet's pod.
    let node_changes =
        watcher(Api::<Node>::all(client.clone()), config.clone()).filter_map(|e| async move {
            matches!(
                e,
                Ok(watcher::Event::Apply(_)) | Ok(watcher::Event::Delete(_))
            )
            .then_some(())
        });
    let daemonsets = Controller::new(Api::<DaemonSet>::all(client.clone()), config.clone())
        .owns(pods(), config.clone())
        .reconcile_all_on(node_changes)
        .graceful_shutdown_on(stopped())
        .run(reconcile_daemonset, on_error, ctx.clone())
        .for_each(|_| async {});
    let jobs = Controller::new(Api::<Job>::all(client.clone()), config.clone())
        .owns(pods(), config)
        .graceful_shutdown_on(stopped())
        .run(reconcile_job, on_error, ctx)
        .for_each(|_| async {});
    let all = futures_util::future::join4(rs, deployments, daemonsets, jobs);
    tokio::pin!(all);
    tokio::select! {
        _ = &mut all => {}
        _ = shutdown => {
            let _ = stop_tx.send(true);
            all.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(
        name: &str,
        node: Option<&str>,
        ready: bool,
        finished: Option<bool>,
        created: i64,
    ) -> PodState {
        PodState {
            name: name.into(),
            node: node.map(Into::into),
            ready,
            finished,
            created,
            deleting: false,
            hash: Some("h1".into()),
        }
    }

    #[test]
    fn a_replica_set_creates_the_missing_and_deletes_the_least_useful_first() {
        let pods = vec![
            pod("ready-old", Some("a"), true, None, 1),
            pod("ready-new", Some("b"), true, None, 5),
            pod("not-ready", Some("a"), false, None, 2),
            pod("pending", None, false, None, 3),
            pod("failed", Some("a"), false, Some(false), 0),
        ];
        assert_eq!(replica_diff(6, &pods), (2, vec!["failed".to_owned()]));
        let (create, delete) = replica_diff(2, &pods);
        assert_eq!(create, 0);
        assert_eq!(delete, ["failed", "pending", "not-ready"]);
        let (_, delete) = replica_diff(1, &pods);
        assert_eq!(
            delete[3], "ready-new",
            "the newest ready goes before the oldest"
        );
    }

    #[test]
    fn surge_and_unavailability_resolve_percentages_as_kubernetes_rounds_them() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(rolling_bounds(10, None, None), (3, 2));
        assert_eq!(
            rolling_bounds(4, Some(&pct("50%")), Some(&pct("10%"))),
            (2, 0)
        );
        assert_eq!(
            rolling_bounds(3, Some(&IntOrString::Int(0)), Some(&IntOrString::Int(0))),
            (0, 1)
        );
    }

    #[test]
    fn a_rolling_update_stays_within_surge_and_availability_until_done() {
        // 4 replicas, surge 1, unavailable 0: simulate the ReplicaSets until the new one holds all.
        let mut new = RsState {
            name: "new".into(),
            replicas: 0,
            available: 0,
            revision: 2,
        };
        let mut old = vec![RsState {
            name: "old".into(),
            replicas: 4,
            available: 4,
            revision: 1,
        }];
        for _ in 0..20 {
            let changes = rollout(4, 1, 0, &new, &old);
            for (name, count) in changes {
                if name == "new" {
                    new.replicas = count;
                } else {
                    old[0].replicas = count;
                }
            }
            let total = new.replicas + old[0].replicas;
            assert!(total <= 5, "surge bound: {total}");
            // Pods become available a step later; old ones vanish when scaled down.
            let available = new.available + old[0].replicas.min(old[0].available);
            assert!(
                available >= 4 || new.available == 0 && old[0].available == 4,
                "availability"
            );
            new.available = new.replicas;
            old[0].available = old[0].replicas;
        }
        assert_eq!((new.replicas, old[0].replicas), (4, 0));
        // Unavailable old pods are removed freely.
        let broken = vec![RsState {
            name: "old".into(),
            replicas: 3,
            available: 0,
            revision: 1,
        }];
        let fresh = RsState {
            name: "new".into(),
            replicas: 3,
            available: 3,
            revision: 2,
        };
        assert_eq!(rollout(3, 1, 0, &fresh, &broken), [("old".to_owned(), 0)]);
    }

    #[test]
    fn a_rollout_without_progress_past_its_deadline_is_reported_failed() {
        let step = |prev: Option<(&str, i64)>, before, now_counts, now| {
            progress_condition(
                prev.map(|(r, t)| (r.to_owned(), Some(t))),
                before,
                now_counts,
                false,
                600,
                now,
                "web-1",
            )
        };
        // Progress renews the clock; no progress lets it run.
        let c = step(
            Some(("ReplicaSetUpdated", 1_000)),
            Some((1, 1)),
            (2, 1),
            1_500,
        );
        assert_eq!(
            (c["reason"].as_str(), c["lastUpdateTime"].as_str()),
            (Some("ReplicaSetUpdated"), Some("1970-01-01T00:25:00Z"))
        );
        let c = step(
            Some(("ReplicaSetUpdated", 1_000)),
            Some((2, 1)),
            (2, 1),
            1_500,
        );
        assert_eq!(c["status"], "True");
        let c = step(
            Some(("ReplicaSetUpdated", 1_000)),
            Some((2, 1)),
            (2, 1),
            1_601,
        );
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("False"), Some("ProgressDeadlineExceeded"))
        );
        // It stays failed until the rollout moves again.
        let c = step(
            Some(("ProgressDeadlineExceeded", 1_000)),
            Some((2, 1)),
            (2, 1),
            1_700,
        );
        assert_eq!(c["reason"], "ProgressDeadlineExceeded");
        let c = step(
            Some(("ProgressDeadlineExceeded", 1_000)),
            Some((2, 1)),
            (3, 1),
            1_700,
        );
        assert_eq!(c["reason"], "ReplicaSetUpdated");
        // Complete wins.
        let done = progress_condition(None, None, (3, 3), true, 600, 5, "web-1");
        assert_eq!(done["reason"], "NewReplicaSetAvailable");
    }

    #[test]
    fn a_job_runs_until_enough_succeed_or_too_many_fail() {
        let ok = |n: &str| pod(n, Some("a"), false, Some(true), 0);
        let bad = |n: &str| pod(n, Some("a"), false, Some(false), 0);
        let running = |n: &str| pod(n, Some("a"), true, None, 0);
        assert_eq!(job_step(3, 2, 6, &[]), JobStep::Run(2));
        assert_eq!(
            job_step(3, 2, 6, &[ok("a"), ok("b"), running("c")]),
            JobStep::Run(0)
        );
        assert_eq!(
            job_step(3, 2, 6, &[ok("a"), ok("b"), bad("x")]),
            JobStep::Run(1)
        );
        assert_eq!(
            job_step(3, 2, 6, &[ok("a"), ok("b"), ok("c")]),
            JobStep::Complete
        );
        let failures: Vec<PodState> = (0..3).map(|i| bad(&format!("f{i}"))).collect();
        assert!(
            matches!(job_step(1, 1, 2, &failures), JobStep::Failed(m) if m.contains("backoff limit"))
        );
    }

    #[test]
    fn a_daemon_set_covers_every_eligible_node_and_replaces_pods_within_its_budget() {
        let nodes: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let old = |name: &str, node: &str| {
            let mut p = pod(name, Some(node), true, None, 0);
            p.hash = Some("h0".into());
            p
        };
        let pods = vec![
            old("pa", "a"),
            old("pb", "b"),
            pod("pc", Some("c"), true, None, 0),
            pod("gone", Some("z"), true, None, 0),
        ];
        let (create, delete) = daemon_plan(&nodes, &pods, "h1", 1);
        assert_eq!(create, ["d"], "the node without a pod gets one");
        // d is missing (unavailable already), so no outdated pod is replaced yet.
        assert_eq!(delete, ["gone"]);
        let mut with_d = pods.clone();
        with_d.push(pod("pd", Some("d"), true, None, 0));
        let (create, delete) = daemon_plan(&nodes, &with_d, "h1", 1);
        assert!(create.is_empty());
        assert_eq!(delete, ["gone", "pa"], "one outdated pod at a time");
    }

    #[test]
    fn a_template_hash_is_stable_and_changes_with_the_template() {
        let t: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": { "labels": { "app": "web" } },
            "spec": { "containers": [{ "name": "c", "image": "sleep" }] }
        }))
        .unwrap();
        let mut u = t.clone();
        u.spec.as_mut().unwrap().containers[0].image = Some("other".into());
        assert_eq!(template_hash(&t), template_hash(&t.clone()));
        assert_ne!(template_hash(&t), template_hash(&u));
        assert_eq!(template_hash(&t).len(), 10);
    }
}
