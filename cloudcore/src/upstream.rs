//! Upstream writes from nodes, authorized by what the node is: it may write its own Node and
//! Lease, the status of pods bound to it, the status of the sedna.io objects and devices in
//! its view, and events about itself or the objects in its view. Nothing else.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use sedna_proto::channel::{ObjectRef, Upstream, upstream::Kind as UpstreamKind};
use serde_json::Value;

use crate::router::{Kind, ObjKey, Router};
use crate::session::UpstreamOutcome;

/// The field manager of writes the hub makes on a node's behalf.
pub const FIELD_MANAGER: &str = "sedna-edgecore";

/// The Kubernetes API resource of a routed kind.
pub fn api_resource(kind: Kind) -> ApiResource {
    let (group, version) = match kind.api_version().split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", kind.api_version()),
    };
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: kind.api_version().to_owned(),
        kind: kind.name().to_owned(),
        plural: kind.plural().to_owned(),
    }
}

/// What the node may do, decided from the hub's view of the cluster.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Refused, with the reason.
    Deny(String),
}

fn deny(node: &str, what: &str) -> Decision {
    Decision::Deny(format!("node {node:?} may not {what}"))
}

fn key_of(r: &ObjectRef) -> Option<ObjKey> {
    Kind::of(&r.api_version, &r.kind).map(|k| ObjKey::new(k, &r.namespace, &r.name))
}

/// Decides whether `node` may make this write.
pub fn authorize(router: &Router, node: &str, u: &Upstream) -> Decision {
    // Only the names are read: a Node status or a Lease is not built as a whole document to
    // be authorized (every node renews its Lease every 10 s).
    #[derive(serde::Deserialize)]
    struct Named {
        metadata: Meta,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(default)]
        namespace: Option<String>,
        name: String,
    }
    let name_of = |payload: &[u8]| -> Option<(String, String)> {
        let m = serde_json::from_slice::<Named>(payload).ok()?.metadata;
        Some((m.namespace.unwrap_or_default(), m.name))
    };
    match UpstreamKind::try_from(u.kind).unwrap_or(UpstreamKind::Unspecified) {
        UpstreamKind::Node => match name_of(&u.payload) {
            Some((_, name)) if name == node => Decision::Allow,
            _ => deny(node, "write another node's Node object"),
        },
        UpstreamKind::Lease => match name_of(&u.payload) {
            Some((ns, name)) if name == node && ns == "kube-node-lease" => Decision::Allow,
            _ => deny(node, "write a Lease other than kube-node-lease/<its name>"),
        },
        UpstreamKind::PodStopped => {
            let Some(key) = u
                .object
                .as_ref()
                .and_then(key_of)
                .filter(|k| k.kind == Kind::Pod)
            else {
                return deny(node, "confirm the deletion of something that is not a pod");
            };
            let bound = router
                .get(&key)
                .and_then(|p| p.node_name())
                .is_some_and(|n| n == node);
            if bound {
                Decision::Allow
            } else {
                deny(node, &format!("delete pod {}/{}", key.namespace, key.name))
            }
        }
        UpstreamKind::Status => {
            let Some(key) = u.object.as_ref().and_then(key_of) else {
                return deny(node, "write the status of an unknown kind");
            };
            let allowed = match key.kind {
                Kind::Pod => router
                    .get(&key)
                    .and_then(|p| p.node_name())
                    .is_some_and(|n| n == node),
                Kind::Dataset
                | Kind::Model
                | Kind::JointInferenceService
                | Kind::IncrementalLearningJob
                | Kind::FederatedLearningJob
                | Kind::Device => router.in_view(node, &key),
                _ => false,
            };
            if allowed {
                Decision::Allow
            } else {
                deny(
                    node,
                    &format!(
                        "write the status of {} {}/{}",
                        key.kind.name(),
                        key.namespace,
                        key.name
                    ),
                )
            }
        }
        UpstreamKind::Event => {
            let Ok(event) = serde_json::from_slice::<Value>(&u.payload) else {
                return Decision::Deny("malformed event".into());
            };
            let involved = &event["involvedObject"];
            let (v, k, ns, n) = (
                involved["apiVersion"].as_str().unwrap_or_default(),
                involved["kind"].as_str().unwrap_or_default(),
                involved["namespace"].as_str().unwrap_or_default(),
                involved["name"].as_str().unwrap_or_default(),
            );
            let about_itself = k == "Node" && n == node;
            let in_view =
                Kind::of(v, k).is_some_and(|kind| router.in_view(node, &ObjKey::new(kind, ns, n)));
            let event_ns = event
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default");
            // An event lives in the namespace of the object it is about.
            let namespace_ok = about_itself || event_ns == ns;
            if (about_itself || in_view) && namespace_ok {
                Decision::Allow
            } else {
                deny(node, &format!("record events about {k} {ns}/{n}"))
            }
        }
        UpstreamKind::Unspecified => Decision::Deny("unknown upstream kind".into()),
    }
}

/// Status fields of workloads that their controller owns: a node's report (a worker's figures,
/// forwarded with whatever the node's copy of the status held) never overwrites them, so a
/// late or replayed report cannot turn a finished job back to Running.
pub const CONTROLLER_STATUS_FIELDS: &[&str] = &[
    "phase",
    "conditions",
    "startTime",
    "completionTime",
    "active",
    "succeeded",
    "failed",
];

/// Removes the controller's fields from a node's status patch of a workload (a Pod's status
/// is the node's own and is left whole).
pub fn strip_controller_fields(kind: Kind, patch: &mut Value) {
    let workload = matches!(
        kind,
        Kind::JointInferenceService | Kind::IncrementalLearningJob | Kind::FederatedLearningJob
    );
    if let (true, Some(status)) = (
        workload,
        patch.get_mut("status").and_then(Value::as_object_mut),
    ) {
        if kind == Kind::IncrementalLearningJob {
            // The stage machine's fields are the controller's: a node reports only its
            // trigger and its workers' reports.
            status.retain(|k, _| {
                sedna_api::incremental_learning::NODE_STATUS_FIELDS.contains(&k.as_str())
            });
        } else {
            status.retain(|k, _| !CONTROLLER_STATUS_FIELDS.contains(&k.as_str()));
        }
    }
}

/// Labels a node may give itself although their prefix is reserved (as Kubernetes'
/// NodeRestriction admits for kubelets, plus the default role of this platform).
const SELF_SETTABLE_LABELS: &[&str] = &[
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
    "node.kubernetes.io/instance-type",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "node-role.sedna.io/edge",
];

/// Whether a label key is under a prefix only an administrator may set on a Node
/// (`kubernetes.io`, `k8s.io`, `sedna.io` and their subdomains: roles, restrictions…).
pub fn reserved_node_label(key: &str) -> bool {
    let Some((prefix, _)) = key.split_once('/') else {
        return false;
    };
    if SELF_SETTABLE_LABELS.contains(&key) {
        return false;
    }
    ["kubernetes.io", "k8s.io", "sedna.io"]
        .iter()
        .any(|d| prefix == *d || prefix.ends_with(&format!(".{d}")))
}

/// A node's write of its own Node with the reserved labels it may not give itself removed —
/// unless `current` (the Node as the API holds it) already carries the label with the same
/// value, granted by an administrator. Returns the payload to apply and the keys removed;
/// `None` for a payload that is not a JSON object.
pub fn restrict_node_labels(
    current: Option<&Value>,
    payload: &[u8],
) -> Option<(Vec<u8>, Vec<String>)> {
    let mut obj: Value = serde_json::from_slice(payload).ok()?;
    let granted = current.and_then(|c| c.pointer("/metadata/labels"));
    let mut removed = Vec::new();
    if let Some(labels) = obj
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.retain(|key, value| {
            let keep = !reserved_node_label(key)
                || granted.and_then(|g| g.get(key)).is_some_and(|g| g == value);
            if !keep {
                removed.push(key.clone());
            }
            keep
        });
    }
    if removed.is_empty() {
        return Some((payload.to_vec(), removed));
    }
    Some((serde_json::to_vec(&obj).ok()?, removed))
}

/// A node's write of its own Node, as the hub applies it ([`prepare_node_write`]).
#[derive(Debug)]
pub struct NodeWrite {
    /// What to apply.
    pub payload: Vec<u8>,
    /// Reserved labels left out (see [`restrict_node_labels`]).
    pub removed: Vec<String>,
    /// A digest of everything but the status, for the session to compare the next write with.
    pub metadata_digest: u64,
    /// Only the status is applied: the rest is what this session applied last, and the API
    /// still holds it.
    pub status_only: bool,
}

/// Prepares a node's write of its own Node: reserved labels left out
/// ([`restrict_node_labels`]), and the metadata part dropped when it is the same as the one
/// this session last applied (`applied`: its [`NodeWrite::metadata_digest`], 0 for none) and
/// `current` (the Node as cached) still carries every label and annotation it sets. A status
/// report every 5 minutes then costs one API request instead of two, the first of which
/// changed nothing. Anything besides labels and annotations in the metadata part, a label
/// removed by someone else, or a new session applies it again. `None` for a payload that is
/// not a JSON object.
pub fn prepare_node_write(
    current: Option<&Value>,
    payload: &[u8],
    applied: u64,
) -> Option<NodeWrite> {
    use std::hash::{Hash, Hasher};
    let (payload, removed) = restrict_node_labels(current, payload)?;
    let mut obj: serde_json::Map<String, Value> = serde_json::from_slice(&payload).ok()?;
    let status = obj.remove("status");
    let mut hasher = std::hash::DefaultHasher::new();
    serde_json::to_vec(&obj).ok()?.hash(&mut hasher);
    // 0 stands for "nothing applied".
    let metadata_digest = hasher.finish().max(1);
    let held = |field: &str, given: &Value| {
        let have = current.and_then(|c| c.get("metadata")?.get(field));
        given.as_object().is_some_and(|given| {
            given
                .iter()
                .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
        })
    };
    let only_names = obj.iter().all(|(k, v)| match k.as_str() {
        "apiVersion" | "kind" => true,
        "metadata" => v.as_object().is_some_and(|m| {
            m.iter().all(|(k, v)| match k.as_str() {
                "name" => true,
                "labels" | "annotations" => held(k, v),
                _ => false,
            })
        }),
        _ => false,
    });
    let status_only = applied == metadata_digest && only_names && status.is_some();
    let payload = if status_only {
        serde_json::to_vec(&serde_json::json!({ "status": status })).ok()?
    } else {
        payload
    };
    Some(NodeWrite {
        payload,
        removed,
        metadata_digest,
        status_only,
    })
}

fn outcome(e: kube::Error) -> UpstreamOutcome {
    match e {
        kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 409 && s.code != 429 => {
            UpstreamOutcome::Rejected(format!("{} ({}): {}", s.code, s.reason, s.message))
        }
        other => {
            tracing::warn!(error = %other, "upstream write failed; it will be retried");
            UpstreamOutcome::Retry
        }
    }
}

/// Whether a write is node liveness (its Lease, its Node): the writes every node makes all
/// the time, which must not queue ahead of a pod's status.
pub fn is_liveness(u: &Upstream) -> bool {
    matches!(
        UpstreamKind::try_from(u.kind),
        Ok(UpstreamKind::Lease | UpstreamKind::Node)
    )
}

/// Splits the hub's bound on edge writes in flight between liveness writes and the others
/// (pod and workload status, events, pod deletions): a quarter, at least one, for the
/// others; each gets at least one.
pub fn permit_split(max_in_flight: usize) -> (usize, usize) {
    let workload = (max_in_flight / 4).max(1);
    (max_in_flight.saturating_sub(workload).max(1), workload)
}

/// Carries out an authorized write.
pub async fn apply(client: &kube::Client, node: &str, u: &Upstream) -> UpstreamOutcome {
    let parsed = || serde_json::from_slice::<Value>(&u.payload);
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    match UpstreamKind::try_from(u.kind).unwrap_or(UpstreamKind::Unspecified) {
        UpstreamKind::Node => {
            let Ok(mut obj) = parsed() else {
                return UpstreamOutcome::Rejected("malformed Node".into());
            };
            let api: Api<Node> = Api::all(client.clone());
            let status = obj.as_object_mut().and_then(|o| o.remove("status"));
            // A status report alone ([`prepare_node_write`]): its metadata is applied already.
            let metadata = obj.as_object().is_none_or(|o| !o.is_empty());
            if metadata && let Err(e) = api.patch(node, &apply, &Patch::Apply(&obj)).await {
                return outcome(e);
            }
            if let Some(status) = status {
                let body = serde_json::json!({ "apiVersion": "v1", "kind": "Node",
                    "metadata": { "name": node }, "status": status });
                if let Err(e) = api.patch_status(node, &apply, &Patch::Apply(&body)).await {
                    return outcome(e);
                }
            }
            UpstreamOutcome::Applied
        }
        UpstreamKind::Lease => {
            let Ok(obj) = parsed() else {
                return UpstreamOutcome::Rejected("malformed Lease".into());
            };
            let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
            match api.patch(node, &apply, &Patch::Apply(&obj)).await {
                Ok(_) => UpstreamOutcome::Applied,
                Err(e) => outcome(e),
            }
        }
        UpstreamKind::Status => {
            let Some(r) = &u.object else {
                return UpstreamOutcome::Rejected("a status write without an object".into());
            };
            let Some(kind) = Kind::of(&r.api_version, &r.kind) else {
                return UpstreamOutcome::Rejected(format!(
                    "unknown kind {} {}",
                    r.api_version, r.kind
                ));
            };
            let Ok(mut patch) = parsed() else {
                return UpstreamOutcome::Rejected("malformed status patch".into());
            };
            strip_controller_fields(kind, &mut patch);
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &r.namespace, &api_resource(kind));
            match api
                .patch_status(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => UpstreamOutcome::Applied,
                Err(e) => outcome(e),
            }
        }
        UpstreamKind::PodStopped => {
            let Some(r) = &u.object else {
                return UpstreamOutcome::Rejected("a pod deletion without a pod".into());
            };
            let api: Api<k8s_openapi::api::core::v1::Pod> =
                Api::namespaced(client.clone(), &r.namespace);
            let mut params = kube::api::DeleteParams::default().grace_period(0);
            if !r.uid.is_empty() {
                params = params.preconditions(kube::api::Preconditions {
                    uid: Some(r.uid.clone()),
                    resource_version: None,
                });
            }
            match api.delete(&r.name, &params).await {
                Ok(_) => UpstreamOutcome::Applied,
                // Already gone, or replaced by a pod of the same name: nothing to do.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
                    UpstreamOutcome::Applied
                }
                Err(e) => outcome(e),
            }
        }
        UpstreamKind::Event => {
            let Ok(event) = serde_json::from_slice::<Event>(&u.payload) else {
                return UpstreamOutcome::Rejected("malformed Event".into());
            };
            let ns = event
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let api: Api<Event> = Api::namespaced(client.clone(), &ns);
            match api.create(&PostParams::default(), &event).await {
                Ok(_) => UpstreamOutcome::Applied,
                Err(kube::Error::Api(s)) if s.code == 409 => UpstreamOutcome::Applied,
                Err(e) => outcome(e),
            }
        }
        UpstreamKind::Unspecified => UpstreamOutcome::Rejected("unknown upstream kind".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_writes_keep_a_quarter_of_the_permits_and_each_class_at_least_one() {
        assert_eq!(permit_split(64), (48, 16));
        assert_eq!(permit_split(1), (1, 1));
        assert_eq!(permit_split(0), (1, 1));
        let of = |kind: UpstreamKind| Upstream {
            kind: kind as i32,
            ..Default::default()
        };
        assert!(is_liveness(&of(UpstreamKind::Lease)));
        assert!(is_liveness(&of(UpstreamKind::Node)));
        assert!(!is_liveness(&of(UpstreamKind::Status)));
        assert!(!is_liveness(&of(UpstreamKind::PodStopped)));
        assert!(!is_liveness(&of(UpstreamKind::Event)));
    }

    use crate::router::Object;
    use serde_json::json;

    #[test]
    fn a_nodes_status_report_of_a_workload_leaves_the_controllers_fields_alone() {
        let report = json!({ "status": { "phase": "Running", "conditions": [], "active": 2,
            "completionTime": null, "round": 4, "metrics": [{ "key": "accuracy", "value": "0.9" }] } });
        let mut job = report.clone();
        strip_controller_fields(Kind::FederatedLearningJob, &mut job);
        assert_eq!(
            job,
            json!({ "status": { "round": 4, "metrics": [{ "key": "accuracy", "value": "0.9" }] } })
        );
        let mut pod = report.clone();
        strip_controller_fields(Kind::Pod, &mut pod);
        assert_eq!(pod, report, "a pod's status is the node's");
        // An incremental learning job's stage machine is the controller's alone: a node may
        // report its trigger and its workers' reports, nothing else.
        let mut il = json!({ "status": { "round": 9, "stage": "Deploy", "stageState": "Ready",
            "deployed": { "round": 9, "url": "/evil.onnx" }, "trainTrigger": { "round": 1 },
            "evaluation": { "round": 1 }, "inference": { "modelUrl": "/m" } } });
        strip_controller_fields(Kind::IncrementalLearningJob, &mut il);
        assert_eq!(
            il,
            json!({ "status": { "trainTrigger": { "round": 1 }, "evaluation": { "round": 1 },
                "inference": { "modelUrl": "/m" } } })
        );
    }

    #[test]
    fn a_nodes_unchanged_metadata_is_applied_once_per_session_while_the_api_holds_it() {
        let report = |site: &str, beat: &str| {
            json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "a",
                "labels": { "kubernetes.io/hostname": "a", "site": site } },
                "status": { "conditions": [{ "type": "Ready", "lastHeartbeatTime": beat }] } })
            .to_string()
            .into_bytes()
        };
        let cached = json!({ "metadata": { "labels": { "kubernetes.io/hostname": "a",
            "site": "north", "example.com/team": "x" } } });
        // The first write of a session applies everything.
        let first = prepare_node_write(Some(&cached), &report("north", "t1"), 0).unwrap();
        assert!(!first.status_only);
        assert_eq!(first.payload, report("north", "t1"));
        // The next report with the same metadata, still held by the API: its status alone.
        let next = prepare_node_write(Some(&cached), &report("north", "t2"), first.metadata_digest)
            .unwrap();
        assert!(next.status_only);
        assert_eq!(next.metadata_digest, first.metadata_digest);
        let sent: Value = serde_json::from_slice(&next.payload).unwrap();
        assert_eq!(
            sent,
            json!({ "status": { "conditions": [{ "type": "Ready", "lastHeartbeatTime": "t2" }] } })
        );
        // A changed label, a label the API lost, no status, or another field: applied whole.
        let moved =
            prepare_node_write(Some(&cached), &report("south", "t2"), first.metadata_digest)
                .unwrap();
        assert!(!moved.status_only && moved.metadata_digest != first.metadata_digest);
        let lost = json!({ "metadata": { "labels": { "kubernetes.io/hostname": "a" } } });
        assert!(
            !prepare_node_write(Some(&lost), &report("north", "t2"), first.metadata_digest)
                .unwrap()
                .status_only
        );
        assert!(
            !prepare_node_write(None, &report("north", "t2"), first.metadata_digest)
                .unwrap()
                .status_only
        );
        // The same body twice in a session: is the second applied as its status alone?
        let twice = |body: Value| {
            let body = body.to_string();
            let w = prepare_node_write(Some(&cached), body.as_bytes(), 0).unwrap();
            prepare_node_write(Some(&cached), body.as_bytes(), w.metadata_digest)
                .unwrap()
                .status_only
        };
        let bare = json!({ "metadata": { "name": "a", "labels": { "site": "north" } } });
        assert!(!twice(bare), "nothing but metadata: applied");
        let spec = json!({ "metadata": { "name": "a" }, "spec": { "unschedulable": true },
            "status": {} });
        assert!(!twice(spec), "a spec is always applied");
        assert!(prepare_node_write(None, b"[1]", 0).is_none());
    }

    #[test]
    fn a_node_cannot_move_itself_to_another_hubs_partition() {
        // Hubs keep and serve nodes by this label: a node that could set it would move
        // itself between hubs and make each list the fleet again.
        let label = crate::partitions::PARTITION_LABEL;
        let body = json!({ "metadata": { "name": "a", "labels": { label: "7", "site": "x" } },
            "status": {} })
        .to_string();
        let w = prepare_node_write(None, body.as_bytes(), 0).unwrap();
        assert_eq!(w.removed, [label]);
        let sent: Value = serde_json::from_slice(&w.payload).unwrap();
        assert_eq!(sent["metadata"]["labels"], json!({ "site": "x" }));
        // Set by an administrator: the node's own write keeps it as it is.
        let granted = json!({ "metadata": { "labels": { label: "7" } } });
        let w = prepare_node_write(Some(&granted), body.as_bytes(), 0).unwrap();
        assert!(w.removed.is_empty());
    }

    #[test]
    fn a_node_cannot_give_itself_reserved_labels_but_keeps_those_an_administrator_granted() {
        let payload = json!({ "metadata": { "name": "a", "labels": {
            "kubernetes.io/hostname": "a", "node-role.sedna.io/edge": "", "site": "north",
            "node-role.sedna.io/cloud": "", "node-role.kubernetes.io/control-plane": "",
            "node-restriction.kubernetes.io/gpu": "true", "example.com/team": "x" } } });
        let bytes = serde_json::to_vec(&payload).unwrap();
        let (out, removed) = restrict_node_labels(None, &bytes).unwrap();
        assert_eq!(
            removed,
            [
                "node-restriction.kubernetes.io/gpu",
                "node-role.kubernetes.io/control-plane",
                "node-role.sedna.io/cloud"
            ]
        );
        let out: Value = serde_json::from_slice(&out).unwrap();
        let kept: Vec<&String> = out["metadata"]["labels"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(
            kept,
            [
                "example.com/team",
                "kubernetes.io/hostname",
                "node-role.sedna.io/edge",
                "site"
            ]
        );
        // Granted by an administrator with this value: kept; with another value: removed.
        let current = json!({ "metadata": { "labels": { "node-role.sedna.io/cloud": "" } } });
        let (_, removed) = restrict_node_labels(Some(&current), &bytes).unwrap();
        assert!(!removed.contains(&"node-role.sedna.io/cloud".to_string()));
        let current =
            json!({ "metadata": { "labels": { "node-restriction.kubernetes.io/gpu": "false" } } });
        let (_, removed) = restrict_node_labels(Some(&current), &bytes).unwrap();
        assert!(removed.contains(&"node-restriction.kubernetes.io/gpu".to_string()));
        // Nothing to remove: the payload is passed through untouched.
        let plain = br#"{"metadata":{"name":"a","labels":{"site":"x"}}}"#;
        assert_eq!(restrict_node_labels(None, plain).unwrap().0, plain);
    }

    fn router() -> Router {
        let mut r = Router::new();
        let pod = |name: &str, node: &str| {
            Object::from_value(Kind::Pod, json!({ "metadata": { "name": name, "namespace": "default",
                "uid": format!("u-{name}"), "resourceVersion": "1" }, "spec": { "nodeName": node } })).unwrap()
        };
        r.upsert(pod("mine", "a"));
        r.upsert(pod("theirs", "b"));
        r.upsert(
            Object::from_value(
                Kind::Device,
                json!({ "metadata": { "name": "cam", "namespace": "default",
            "uid": "u-cam", "resourceVersion": "1" }, "spec": { "nodeName": "a" } }),
            )
            .unwrap(),
        );
        r.attach("a");
        r
    }

    fn status(kind: Kind, name: &str) -> Upstream {
        Upstream {
            kind: UpstreamKind::Status as i32,
            object: Some(ObjectRef {
                api_version: kind.api_version().into(),
                kind: kind.name().into(),
                namespace: "default".into(),
                name: name.into(),
                uid: String::new(),
            }),
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_node_writes_only_its_own_objects() {
        let r = router();
        let node = |name: &str| Upstream {
            kind: UpstreamKind::Node as i32,
            object: None,
            payload: json!({ "metadata": { "name": name } })
                .to_string()
                .into_bytes(),
        };
        assert_eq!(authorize(&r, "a", &node("a")), Decision::Allow);
        assert!(matches!(authorize(&r, "a", &node("b")), Decision::Deny(_)));
        let lease = |ns: &str, name: &str| Upstream {
            kind: UpstreamKind::Lease as i32,
            object: None,
            payload: json!({ "metadata": { "name": name, "namespace": ns } })
                .to_string()
                .into_bytes(),
        };
        assert_eq!(
            authorize(&r, "a", &lease("kube-node-lease", "a")),
            Decision::Allow
        );
        assert!(matches!(
            authorize(&r, "a", &lease("default", "a")),
            Decision::Deny(_)
        ));
        assert_eq!(
            authorize(&r, "a", &status(Kind::Pod, "mine")),
            Decision::Allow
        );
        assert!(matches!(
            authorize(&r, "a", &status(Kind::Pod, "theirs")),
            Decision::Deny(_)
        ));
        assert_eq!(
            authorize(&r, "a", &status(Kind::Device, "cam")),
            Decision::Allow
        );
        assert!(matches!(
            authorize(&r, "b", &status(Kind::Device, "cam")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            authorize(&r, "a", &status(Kind::ConfigMap, "x")),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn events_must_be_about_the_node_or_its_objects() {
        let r = router();
        let event = |kind: &str, name: &str| {
            Upstream {
            kind: UpstreamKind::Event as i32,
            object: None,
            payload: json!({ "metadata": { "name": "e", "namespace": "default" },
                "involvedObject": { "apiVersion": "v1", "kind": kind, "name": name, "namespace": "default" } })
                .to_string().into_bytes(),
        }
        };
        assert_eq!(authorize(&r, "a", &event("Pod", "mine")), Decision::Allow);
        assert!(matches!(
            authorize(&r, "a", &event("Pod", "theirs")),
            Decision::Deny(_)
        ));
        let about_node = Upstream {
            kind: UpstreamKind::Event as i32,
            object: None,
            payload: json!({ "metadata": { "name": "e", "namespace": "default" },
                "involvedObject": { "apiVersion": "v1", "kind": "Node", "name": "a" } })
            .to_string()
            .into_bytes(),
        };
        assert_eq!(authorize(&r, "a", &about_node), Decision::Allow);
    }
}
