//! The scheduler of the embedded control plane: binds each pending pod (no `spec.nodeName`,
//! `schedulerName` default) to a Ready node that fits it, through `pods/binding`, as
//! kube-scheduler does on a real cluster (where this one stays off).
//!
//! A node fits when it is Ready (or the pod tolerates `node.kubernetes.io/not-ready` /
//! `unreachable`), not cordoned (`spec.unschedulable`, unless tolerated), its labels satisfy the
//! pod's `nodeSelector` and required node affinity, the pod tolerates its `NoSchedule` /
//! `NoExecute` taints, and its allocatable cpu, memory, `nvidia.com/gpu` and pod count hold the
//! pod's requests on top of the pods already bound to it. Among fitting nodes it picks the one
//! running the fewest pods of the same owner (replicas spread), then the least requested.
//! A pod that fits nowhere gets `PodScheduled=False` (reason `Unschedulable`) and one
//! `FailedScheduling` event per distinct reason, worded as kube-scheduler words it
//! (`0/3 nodes are available: 1 node(s) were unschedulable, 2 node(s) didn't match Pod's node
//! affinity/selector.`), and is tried again when nodes or pods change.
//!
//! [`place`] is pure (tested without an API); [`run`] is the shell: two reflectors and a loop.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod, Taint, Toleration};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

/// The scheduler's name in pods' `spec.schedulerName`.
pub const SCHEDULER_NAME: &str = "default-scheduler";

/// Amounts of the resources the scheduler accounts for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU, in thousandths of a core.
    pub cpu_milli: i64,
    /// Memory, in bytes.
    pub memory: i64,
    /// `nvidia.com/gpu` devices.
    pub gpus: i64,
    /// Pods.
    pub pods: i64,
}

impl Resources {
    fn add(&mut self, other: &Resources) {
        self.cpu_milli += other.cpu_milli;
        self.memory += other.memory;
        self.gpus += other.gpus;
        self.pods += other.pods;
    }
}

/// A Kubernetes quantity (`100m`, `0.5`, `128Mi`, `1G`, `2e3`) in thousandths of its unit;
/// `None` when malformed.
pub fn milli(quantity: &str) -> Option<i64> {
    let q = quantity.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let value: f64 = if let Some(exp) = suffix.strip_prefix(['e', 'E']) {
        let exp: i32 = exp.parse().ok()?;
        return finite(number.parse::<f64>().ok()? * 10f64.powi(exp) * 1000.0);
    } else {
        number.parse().ok()?
    };
    let factor: f64 = match suffix {
        "" => 1.0,
        "m" => 0.001,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    finite(value * factor * 1000.0)
}

fn finite(v: f64) -> Option<i64> {
    (v.is_finite() && v.abs() < 9.0e18).then(|| v.round() as i64)
}

fn amounts(
    map: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> Resources {
    let get = |k: &str| map.and_then(|m| m.get(k)).and_then(|q| milli(&q.0));
    Resources {
        cpu_milli: get("cpu").unwrap_or(0),
        memory: get("memory").map_or(0, |m| m / 1000),
        gpus: get("nvidia.com/gpu").map_or(0, |g| g / 1000),
        pods: get("pods").map_or(0, |p| p / 1000),
    }
}

/// What a pod asks for: the sum of its containers' requests (a limit stands in for a missing
/// request, as the API defaults it), and one pod.
pub fn requests(pod: &Pod) -> Resources {
    let mut total = Resources {
        pods: 1,
        ..Default::default()
    };
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let r = c.resources.as_ref();
        let requests = amounts(r.and_then(|r| r.requests.as_ref()));
        let limits = amounts(r.and_then(|r| r.limits.as_ref()));
        total.add(&Resources {
            cpu_milli: if requests.cpu_milli > 0 {
                requests.cpu_milli
            } else {
                limits.cpu_milli
            },
            memory: if requests.memory > 0 {
                requests.memory
            } else {
                limits.memory
            },
            gpus: requests.gpus.max(limits.gpus),
            pods: 0,
        });
    }
    total
}

/// A node as the scheduler sees it.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// Cordoned.
    pub unschedulable: bool,
    /// Its Ready condition is True.
    pub ready: bool,
    /// What pods may use.
    pub allocatable: Resources,
    /// What the pods bound to it request.
    pub requested: Resources,
}

impl NodeView {
    /// The view of `node` with nothing requested yet.
    pub fn of(node: &Node) -> Self {
        let status = node.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let mut allocatable = amounts(status.and_then(|s| s.allocatable.as_ref()));
        if allocatable.pods == 0 {
            allocatable.pods = 110;
        }
        Self {
            name: node.name_any(),
            labels: node.labels().clone(),
            taints: node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default(),
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            ready,
            allocatable,
            requested: Resources::default(),
        }
    }
}

/// Why a node does not fit a pod, in kube-scheduler's words (the plural form it counts with).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Misfit {
    /// Cordoned.
    Unschedulable,
    /// Not Ready.
    NotReady,
    /// `nodeSelector` or required node affinity.
    Selector,
    /// A taint the pod does not tolerate.
    Taint(String),
    /// Not enough of a resource.
    Insufficient(&'static str),
}

impl std::fmt::Display for Misfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misfit::Unschedulable => write!(f, "node(s) were unschedulable"),
            Misfit::NotReady => write!(f, "node(s) were not ready"),
            Misfit::Selector => write!(f, "node(s) didn't match Pod's node affinity/selector"),
            Misfit::Taint(t) => write!(f, "node(s) had untolerated taint {{{t}}}"),
            Misfit::Insufficient(r) => write!(f, "Insufficient {r}"),
        }
    }
}

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = match t.operator.as_deref() {
            Some("Exists") => t
                .key
                .as_deref()
                .is_none_or(|k| k.is_empty() || k == taint.key),
            _ => {
                t.key.as_deref() == Some(taint.key.as_str())
                    && t.value.as_deref().unwrap_or_default()
                        == taint.value.as_deref().unwrap_or_default()
            }
        };
        effect_ok && key_ok
    })
}

fn requirement_holds(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|w| w == v)),
        "NotIn" => value.is_none_or(|v| values.iter().all(|w| w != v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(w)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|w| w.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" { v > w } else { v < w }
        }
        _ => false,
    }
}

fn selected(pod: &Pod, node: &NodeView) -> bool {
    let Some(spec) = &pod.spec else {
        return true;
    };
    let by_selector = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let by_affinity = required.is_none_or(|r| {
        r.node_selector_terms.iter().any(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .all(|e| requirement_holds(e, node.labels.get(&e.key).map(String::as_str)))
                && term
                    .match_fields
                    .iter()
                    .flatten()
                    .all(|e| e.key == "metadata.name" && requirement_holds(e, Some(&node.name)))
        })
    });
    by_selector && by_affinity
}

/// Whether `pod`, asking `wants`, fits `node`; the first reason it does not.
pub fn fits(pod: &Pod, wants: &Resources, node: &NodeView) -> Result<(), Misfit> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let lifecycle = |key: &str| {
        tolerates(
            &tolerations,
            &Taint {
                key: key.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            },
        )
    };
    if node.unschedulable && !lifecycle("node.kubernetes.io/unschedulable") {
        return Err(Misfit::Unschedulable);
    }
    if !node.ready
        && !lifecycle("node.kubernetes.io/not-ready")
        && !lifecycle("node.kubernetes.io/unreachable")
    {
        return Err(Misfit::NotReady);
    }
    if !selected(pod, node) {
        return Err(Misfit::Selector);
    }
    if let Some(t) = node
        .taints
        .iter()
        .find(|t| t.effect != "PreferNoSchedule" && !tolerates(&tolerations, t))
    {
        let shown = match t.value.as_deref() {
            Some(v) if !v.is_empty() => format!("{}: {v}", t.key),
            _ => t.key.clone(),
        };
        return Err(Misfit::Taint(shown));
    }
    let (a, u) = (&node.allocatable, &node.requested);
    // A node that does not report its cpu or memory is not held to them; pods and GPUs it
    // does not report it has none of.
    for (name, want, alloc, used, always) in [
        ("pods", wants.pods, a.pods, u.pods, true),
        ("cpu", wants.cpu_milli, a.cpu_milli, u.cpu_milli, false),
        ("memory", wants.memory, a.memory, u.memory, false),
        ("nvidia.com/gpu", wants.gpus, a.gpus, u.gpus, true),
    ] {
        if want > 0 && (always || alloc > 0) && want > alloc - used {
            return Err(Misfit::Insufficient(name));
        }
    }
    Ok(())
}

/// The owner a pod's replicas share (its controller), for spreading.
fn owner_of(pod: &Pod) -> Option<String> {
    pod.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// Where `pod` goes among `nodes`, or why nowhere (kube-scheduler's message). `spread` counts,
/// per owner and node, the pods already placed.
pub fn place(
    pod: &Pod,
    nodes: &[NodeView],
    spread: &HashMap<(String, String), usize>,
) -> Result<String, String> {
    let wants = requests(pod);
    let owner = owner_of(pod);
    let mut misfits: BTreeMap<Misfit, usize> = BTreeMap::new();
    let mut best: Option<(usize, i64, &NodeView)> = None;
    for node in nodes {
        match fits(pod, &wants, node) {
            Ok(()) => {
                let same = owner
                    .as_ref()
                    .and_then(|o| spread.get(&(o.clone(), node.name.clone())))
                    .copied()
                    .unwrap_or(0);
                // Least requested: the share of its cpu and memory in use (per mille).
                let share = |used: i64, alloc: i64| if alloc > 0 { used * 1000 / alloc } else { 0 };
                let load = share(node.requested.cpu_milli, node.allocatable.cpu_milli)
                    + share(node.requested.memory, node.allocatable.memory)
                    + share(node.requested.pods, node.allocatable.pods);
                let better =
                    best.is_none_or(|(s, l, b)| (same, load, &node.name) < (s, l, &b.name));
                if better {
                    best = Some((same, load, node));
                }
            }
            Err(m) => *misfits.entry(m).or_default() += 1,
        }
    }
    if let Some((_, _, node)) = best {
        return Ok(node.name.clone());
    }
    let mut parts: Vec<String> = misfits.iter().map(|(m, n)| format!("{n} {m}")).collect();
    parts.sort();
    Err(format!(
        "0/{} nodes are available: {}.",
        nodes.len(),
        if parts.is_empty() {
            "no nodes".to_owned()
        } else {
            parts.join(", ")
        }
    ))
}

/// Whether the scheduler should place `pod`.
pub fn is_pending(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.is_some_and(|s| s.node_name.as_deref().unwrap_or_default().is_empty())
        && spec
            .and_then(|s| s.scheduler_name.as_deref())
            .is_none_or(|n| n.is_empty() || n == SCHEDULER_NAME)
        && pod.metadata.deletion_timestamp.is_none()
}

fn terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The scheduler's plan for the cluster as the caches show it: where each pending pod goes
/// (in creation order, each placement counted before the next), or why it cannot.
pub fn plan(nodes: &[Arc<Node>], pods: &[Arc<Pod>]) -> Vec<(Arc<Pod>, Result<String, String>)> {
    let mut views: Vec<NodeView> = nodes.iter().map(|n| NodeView::of(n)).collect();
    let index: HashMap<String, usize> = views
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.clone(), i))
        .collect();
    let mut spread: HashMap<(String, String), usize> = HashMap::new();
    for pod in pods.iter().filter(|p| !terminal(p)) {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if let Some(i) = index.get(&node) {
            views[*i].requested.add(&requests(pod));
        }
        if let Some(owner) = owner_of(pod) {
            *spread.entry((owner, node)).or_default() += 1;
        }
    }
    let mut pending: Vec<&Arc<Pod>> = pods.iter().filter(|p| is_pending(p)).collect();
    pending.sort_by(|a, b| {
        (
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            a.name_any(),
        )
            .cmp(&(
                b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                b.name_any(),
            ))
    });
    let mut out = Vec::new();
    for pod in pending {
        let decision = place(pod, &views, &spread);
        if let Ok(node) = &decision {
            if let Some(i) = index.get(node) {
                views[*i].requested.add(&requests(pod));
            }
            if let Some(owner) = owner_of(pod) {
                *spread.entry((owner, node.clone())).or_default() += 1;
            }
        }
        out.push((pod.clone(), decision));
    }
    out
}

/// Runs the scheduler until `shutdown`.
pub async fn run(client: Client, shutdown: impl std::future::Future<Output = ()> + Send) {
    let (nodes, node_writer) = reflector::store::<Node>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (changed_tx, mut changed) = tokio::sync::watch::channel(());
    let follow_nodes = {
        let tx = changed_tx.clone();
        let stream = reflector::reflector(
            node_writer,
            watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
        );
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while stream.next().await.is_some() {
                let _ = tx.send(());
            }
        })
    };
    let follow_pods = {
        let tx = changed_tx;
        let stream = reflector::reflector(
            pod_writer,
            watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
        );
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while stream.next().await.is_some() {
                let _ = tx.send(());
            }
        })
    };
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: SCHEDULER_NAME.into(),
            instance: None,
        },
    );
    // The last reason said per pod uid, so an unchanged failure is not said again.
    let mut said: HashMap<String, String> = HashMap::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = changed.changed() => {}
            // Nodes' readiness and capacity change without events the cache would miss, but
            // retry pods that fit nowhere now and then regardless.
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        // Let a burst of changes settle into one pass.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = changed.borrow_and_update();
        let decisions = plan(&nodes.state(), &pods.state());
        said.retain(|uid, _| {
            decisions
                .iter()
                .any(|(p, _)| p.uid().as_deref() == Some(uid))
        });
        for (pod, decision) in decisions {
            let ns = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
            match decision {
                Ok(node) => {
                    let binding = json!({
                        "apiVersion": "v1", "kind": "Binding",
                        "metadata": { "name": pod.name_any(), "namespace": ns },
                        "target": { "apiVersion": "v1", "kind": "Node", "name": node },
                    });
                    match api
                        .create_subresource::<serde_json::Value, serde_json::Value>(
                            "binding",
                            &pod.name_any(),
                            &PostParams::default(),
                            &binding,
                        )
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(pod = %pod.name_any(), %node, "scheduled");
                            publish(
                                &recorder,
                                &pod,
                                false,
                                "Scheduled",
                                &format!("Successfully assigned {ns}/{} to {node}", pod.name_any()),
                            )
                            .await;
                        }
                        Err(e) => {
                            tracing::debug!(pod = %pod.name_any(), error = %e, "binding failed")
                        }
                    }
                }
                Err(why) => {
                    let uid = pod.uid().unwrap_or_default();
                    if said.get(&uid) == Some(&why) {
                        continue;
                    }
                    said.insert(uid, why.clone());
                    let status = json!({ "status": { "conditions": [{
                        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": why, "lastTransitionTime": jiff::Timestamp::now().to_string(),
                        "lastProbeTime": null,
                    }] } });
                    let _ = api
                        .patch_status(
                            &pod.name_any(),
                            &PatchParams::default(),
                            &Patch::Strategic(status),
                        )
                        .await;
                    publish(&recorder, &pod, true, "FailedScheduling", &why).await;
                }
            }
        }
    }
    follow_nodes.abort();
    follow_pods.abort();
}

async fn publish(
    recorder: &kube::runtime::events::Recorder,
    pod: &Pod,
    warning: bool,
    reason: &str,
    note: &str,
) {
    use kube::Resource;
    let event = kube::runtime::events::Event {
        type_: if warning {
            kube::runtime::events::EventType::Warning
        } else {
            kube::runtime::events::EventType::Normal
        },
        reason: reason.into(),
        note: Some(note.into()),
        action: "Scheduling".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &pod.object_ref(&())).await {
        tracing::debug!(error = %e, "scheduling event not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: serde_json::Value, extra: serde_json::Value) -> NodeView {
        let mut n = json!({
            "metadata": { "name": name, "labels": labels },
            "status": { "conditions": [{ "type": "Ready", "status": "True" }],
                        "allocatable": { "cpu": "2", "memory": "4Gi", "pods": "110" } }
        });
        if let (Some(n), Some(e)) = (n.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                n.insert(k.clone(), v.clone());
            }
        }
        NodeView::of(&serde_json::from_value(n).unwrap())
    }

    fn pod(spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        spec["containers"] = json!([{ "name": "c", "image": "sleep" }]);
        serde_json::from_value(json!({ "metadata": { "name": "p" }, "spec": spec })).unwrap()
    }

    #[test]
    fn quantities_parse_in_thousandths() {
        assert_eq!(milli("100m"), Some(100));
        assert_eq!(milli("2"), Some(2000));
        assert_eq!(milli("0.5"), Some(500));
        assert_eq!(milli("1Ki"), Some(1024 * 1000));
        assert_eq!(milli("128Mi"), Some(128 * 1024 * 1024 * 1000));
        assert_eq!(milli("1G"), Some(1_000_000_000_000));
        assert_eq!(milli("2e3"), Some(2_000_000));
        assert_eq!(milli("12Q"), None);
        assert_eq!(milli("lots"), None);
    }

    #[test]
    fn a_pod_goes_only_where_selector_affinity_taints_and_cordons_allow() {
        let nodes = vec![
            node("a", json!({ "zone": "north" }), json!({})),
            node(
                "b",
                json!({ "zone": "south" }),
                json!({ "spec": { "unschedulable": true } }),
            ),
            node(
                "c",
                json!({ "zone": "south", "gpu": "yes" }),
                json!({ "spec": { "taints": [{ "key": "dedicated", "value": "ml", "effect": "NoSchedule" }] } }),
            ),
            node(
                "d",
                json!({ "zone": "south" }),
                json!({ "status": { "conditions": [{ "type": "Ready", "status": "Unknown" }] } }),
            ),
        ];
        let none = HashMap::new();
        let south = pod(json!({ "nodeSelector": { "zone": "south" } }));
        assert_eq!(
            place(&south, &nodes, &none).unwrap_err(),
            "0/4 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, \
             1 node(s) had untolerated taint {dedicated: ml}, 1 node(s) were not ready, \
             1 node(s) were unschedulable."
        );
        let tolerant = pod(json!({ "nodeSelector": { "zone": "south" },
            "tolerations": [{ "key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule" }] }));
        assert_eq!(place(&tolerant, &nodes, &none).unwrap(), "c");
        let any_taint = pod(json!({ "tolerations": [{ "operator": "Exists" }],
            "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{ "matchExpressions": [{ "key": "gpu", "operator": "Exists" }] }] } } } }));
        assert_eq!(place(&any_taint, &nodes, &none).unwrap(), "c");
        let not_north = pod(json!({ "affinity": { "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [
                { "matchExpressions": [{ "key": "zone", "operator": "NotIn", "values": ["north"] }] }] } } } }));
        assert!(
            place(&not_north, &nodes, &none).is_err(),
            "b cordoned, c tainted, d not ready"
        );
        // A DaemonSet's pod tolerates what a node lifecycle sets and reaches every node.
        let daemon = pod(json!({ "tolerations": [
            { "key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule" },
            { "key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule" }],
            "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{ "matchFields": [{ "key": "metadata.name", "operator": "In", "values": ["d"] }] }] } } } }));
        assert_eq!(place(&daemon, &nodes, &none).unwrap(), "d");
    }

    #[test]
    fn requests_must_fit_what_is_left_and_replicas_spread() {
        let mut nodes = vec![
            node("a", json!({}), json!({})),
            node("b", json!({}), json!({})),
            node(
                "g",
                json!({}),
                json!({ "status": { "conditions": [{ "type": "Ready", "status": "True" }],
                "allocatable": { "cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1" } } }),
            ),
        ];
        let none = HashMap::new();
        let big = pod(json!({}));
        let mut big = big;
        big.spec.as_mut().unwrap().containers[0].resources = Some(
            serde_json::from_value(json!({ "requests": { "cpu": "1500m", "memory": "1Gi" } }))
                .unwrap(),
        );
        nodes[0].requested.cpu_milli = 1000;
        let placed = place(&big, &nodes, &none).unwrap();
        assert_ne!(placed, "a", "only 1 cpu left on a");
        nodes[1].requested.cpu_milli = 1000;
        nodes[2].requested.cpu_milli = 1000;
        assert_eq!(
            place(&big, &nodes, &none).unwrap_err(),
            "0/3 nodes are available: 3 Insufficient cpu."
        );
        let mut gpu = pod(json!({}));
        gpu.spec.as_mut().unwrap().containers[0].resources =
            Some(serde_json::from_value(json!({ "limits": { "nvidia.com/gpu": "1" } })).unwrap());
        assert_eq!(place(&gpu, &nodes, &none).unwrap(), "g");
        nodes[2].requested.gpus = 1;
        assert!(
            place(&gpu, &nodes, &none)
                .unwrap_err()
                .contains("Insufficient nvidia.com/gpu")
        );

        // Replicas of one owner spread: the node with fewer of them wins.
        let mut replica = pod(json!({}));
        replica.metadata.owner_references = Some(vec![serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs-1", "controller": true
        })).unwrap()]);
        let fresh = vec![
            node("a", json!({}), json!({})),
            node("b", json!({}), json!({})),
        ];
        let spread = HashMap::from([(("rs-1".to_owned(), "a".to_owned()), 2)]);
        assert_eq!(place(&replica, &fresh, &spread).unwrap(), "b");
    }

    #[test]
    fn a_plan_counts_each_placement_before_the_next() {
        let nodes: Vec<Arc<Node>> = ["a", "b"]
            .iter()
            .map(|n| {
                Arc::new(
                    serde_json::from_value(json!({ "metadata": { "name": n },
                        "status": { "conditions": [{ "type": "Ready", "status": "True" }],
                                    "allocatable": { "cpu": "1", "pods": "2" } } }))
                    .unwrap(),
                )
            })
            .collect();
        let pods: Vec<Arc<Pod>> = (0..5)
            .map(|i| {
                Arc::new(
                    serde_json::from_value(json!({
                        "metadata": { "name": format!("p{i}"), "ownerReferences": [{
                            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                            "uid": "rs-1", "controller": true }] },
                        "spec": { "containers": [{ "name": "c", "image": "x" }] }
                    }))
                    .unwrap(),
                )
            })
            .collect();
        let decisions = plan(&nodes, &pods);
        let placed: Vec<String> = decisions
            .iter()
            .filter_map(|(_, d)| d.clone().ok())
            .collect();
        assert_eq!(placed.iter().filter(|n| *n == "a").count(), 2);
        assert_eq!(placed.iter().filter(|n| *n == "b").count(), 2);
        assert!(
            decisions[4]
                .1
                .as_ref()
                .unwrap_err()
                .contains("2 Insufficient pods")
        );
    }
}
