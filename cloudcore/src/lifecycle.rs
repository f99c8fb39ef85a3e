//! Node lifecycle: a node whose Lease expired is marked NotReady (its conditions become
//! `Unknown`, reason `NodeStatusUnknown`). Its pods keep running on the node and stay in the
//! API: an edge that lost the cloud is still doing its work. They are evicted (deleted) only
//! when the node carries an autonomy period, annotation `node.sedna.io/autonomy-duration`
//! (e.g. `30m`, `24h`), and the node has been unreachable for longer than that.
//!
//! [`judge`] is the pure decision; the hub applies it to its cache of Nodes, Leases and
//! Pods every period.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use serde_json::Value;

use crate::liveness::{Contact, LeasePolicy};
use crate::router::{Kind, ObjKey, Router};

/// The annotation that allows evicting the pods of a node unreachable for this long.
pub const AUTONOMY_ANNOTATION: &str = "node.sedna.io/autonomy-duration";

/// Reason of the conditions of an unreachable node.
pub const UNKNOWN_REASON: &str = "NodeStatusUnknown";

/// How old the API's copy of a connected node's Lease may grow by default: a node whose hub
/// dies while it dies too is NotReady at most this much later than otherwise.
pub const DEFAULT_LEASE_REFRESH: Duration = Duration::from_secs(120);

/// Lifecycle settings.
#[derive(Clone, Copy, Debug)]
pub struct LifecycleConfig {
    /// How often nodes are checked.
    pub period: Duration,
    /// Extra time beyond the lease's own duration before a node is marked unreachable.
    pub grace: Duration,
    /// How old the API's copy of a connected node's Lease may grow ([`LeasePolicy::Refresh`]):
    /// the hub judges the nodes it holds sessions with by their sessions, and writes their
    /// Leases this often instead of every 20–30 s. Zero writes them as the node renews them
    /// ([`LeasePolicy::Follow`]).
    pub lease_refresh: Duration,
}

impl LifecycleConfig {
    /// How node Lease renewals reach the API while this lifecycle runs.
    pub fn lease_policy(&self) -> LeasePolicy {
        if self.lease_refresh.is_zero() {
            LeasePolicy::Follow
        } else {
            LeasePolicy::Refresh(self.lease_refresh)
        }
    }
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(5),
            grace: Duration::from_secs(0),
            lease_refresh: DEFAULT_LEASE_REFRESH,
        }
    }
}

/// What the lifecycle knows of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    /// Newest sign of life: lease renewal, Ready heartbeat or creation.
    pub last_seen: Option<Timestamp>,
    /// How long a sign of life counts.
    pub lease_duration: Duration,
    /// The Ready condition's status (`True`, `False`, `Unknown`), if any.
    pub ready: Option<String>,
    /// When the Ready condition last changed.
    pub ready_since: Option<Timestamp>,
    /// The autonomy annotation, parsed; `Err` holds a value that does not parse.
    pub autonomy: Option<Result<Duration, String>>,
    /// Pods bound to the node.
    pub pods: usize,
    /// It carries the [`UNREACHABLE_TAINT`].
    pub tainted: bool,
}

/// The taint an unreachable node carries (`NoSchedule`): schedulers keep new pods off it;
/// removed when the node reports Ready again. (No `NoExecute` taint: its pods are evicted only
/// after the node's autonomy period, below.)
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// The decision for one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Heard from recently enough, or already handled.
    Fine,
    /// Lease expired: mark its conditions Unknown.
    MarkUnknown,
    /// Unreachable for longer than its autonomy period: delete its pods.
    Evict,
    /// Ready again but still tainted unreachable: remove the taint.
    Untaint,
}

impl NodeView {
    /// Adds what this hub knows first-hand: a connected node was heard just now; a node
    /// whose session here ended is judged from its last message and its own lease duration
    /// (the API's Lease, written less often and stretched by [`LeasePolicy::Refresh`], would
    /// give it longer), unless the API shows a later sign of life.
    pub fn with_contact(mut self, contact: Option<Contact>, now: Timestamp) -> NodeView {
        match contact {
            Some(Contact::Connected) => self.last_seen = Some(now),
            Some(Contact::Lost { at, lease }) if self.last_seen.is_none_or(|seen| seen <= at) => {
                self.last_seen = Some(at);
                self.lease_duration = lease;
            }
            None | Some(Contact::Lost { .. }) => {}
        }
        self
    }
}

/// Decides what to do with a node at `now`.
pub fn judge(view: &NodeView, now: Timestamp, grace: Duration) -> Verdict {
    let Some(last) = view.last_seen else {
        return Verdict::Fine;
    };
    let deadline = last
        .checked_add(view.lease_duration + grace)
        .unwrap_or(Timestamp::MAX);
    if now <= deadline {
        return if view.tainted && view.ready.as_deref() == Some("True") {
            Verdict::Untaint
        } else {
            Verdict::Fine
        };
    }
    if view.ready.as_deref() != Some("Unknown") || !view.tainted {
        return Verdict::MarkUnknown;
    }
    let Some(Ok(autonomy)) = view.autonomy else {
        return Verdict::Fine;
    };
    // Unreachable since the Ready condition turned Unknown (or the lease ran out).
    let since = view.ready_since.unwrap_or(deadline).max(deadline);
    let evict_at = since.checked_add(autonomy).unwrap_or(Timestamp::MAX);
    if view.pods > 0 && now > evict_at {
        Verdict::Evict
    } else {
        Verdict::Fine
    }
}

/// Parses `90s`, `30m`, `24h`, `1h30m`, `7d`.
pub fn parse_autonomy(s: &str) -> Result<Duration, String> {
    let mut total = 0u64;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 30m, 24h, 1h30m"))?;
        digits.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(format!("invalid duration {s:?}: unknown unit {c:?}")),
        };
        total = total.saturating_add(n.saturating_mul(unit));
    }
    if !digits.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: a number needs a unit (s, m, h, d)"
        ));
    }
    if s.trim().is_empty() {
        return Err("empty duration".into());
    }
    Ok(Duration::from_secs(total))
}

fn timestamp(v: Option<&Value>) -> Option<Timestamp> {
    v.and_then(Value::as_str).and_then(|s| s.parse().ok())
}

/// Builds the view of a node from cached objects.
pub fn view(node: &Value, lease: Option<&Value>, pods: usize) -> NodeView {
    let ready = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"));
    let mut last_seen = timestamp(node.pointer("/metadata/creationTimestamp"));
    let mut lease_duration = Duration::from_secs(40);
    let mut seen = |t: Option<Timestamp>| {
        if let Some(t) = t
            && last_seen.is_none_or(|l| t > l)
        {
            last_seen = Some(t);
        }
    };
    seen(ready.and_then(|c| timestamp(c.get("lastHeartbeatTime"))));
    if let Some(lease) = lease {
        seen(timestamp(lease.pointer("/spec/renewTime")));
        if let Some(d) = lease
            .pointer("/spec/leaseDurationSeconds")
            .and_then(Value::as_u64)
        {
            lease_duration = Duration::from_secs(d);
        }
    }
    NodeView {
        last_seen,
        lease_duration,
        ready: ready.and_then(|c| c["status"].as_str()).map(str::to_owned),
        ready_since: ready.and_then(|c| timestamp(c.get("lastTransitionTime"))),
        autonomy: node
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(AUTONOMY_ANNOTATION))
            .and_then(Value::as_str)
            .map(parse_autonomy),
        pods,
        tainted: has_unreachable_taint(node),
    }
}

/// Whether a Node (as JSON) carries the [`UNREACHABLE_TAINT`].
pub fn has_unreachable_taint(node: &Value) -> bool {
    node.pointer("/spec/taints")
        .and_then(Value::as_array)
        .is_some_and(|ts| ts.iter().any(|t| t["key"] == UNREACHABLE_TAINT))
}

/// Adds (or removes) the unreachable taint, keeping the node's other taints.
async fn set_unreachable_taint(
    client: &kube::Client,
    name: &str,
    present: bool,
) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let mut node = api.get(name).await?;
    let spec = node.spec.get_or_insert_with(Default::default);
    let taints = spec.taints.get_or_insert_with(Vec::new);
    let has = taints.iter().any(|t| t.key == UNREACHABLE_TAINT);
    if has == present {
        return Ok(());
    }
    if present {
        taints.push(k8s_openapi::api::core::v1::Taint {
            key: UNREACHABLE_TAINT.into(),
            effect: "NoSchedule".into(),
            time_added: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::now(),
            )),
            value: None,
        });
    } else {
        taints.retain(|t| t.key != UNREACHABLE_TAINT);
    }
    api.replace(name, &PostParams::default(), &node).await?;
    Ok(())
}

/// Marks every condition of the node Unknown (optimistically: a concurrent write wins and
/// the next period looks again).
async fn mark_unknown(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let mut node = api.get_status(name).await?;
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now());
    let status = node.status.get_or_insert_with(Default::default);
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    if !conditions.iter().any(|c| c.type_ == "Ready") {
        conditions.push(k8s_openapi::api::core::v1::NodeCondition {
            type_: "Ready".into(),
            ..Default::default()
        });
    }
    for c in conditions.iter_mut() {
        if c.status != "Unknown" {
            c.status = "Unknown".into();
            c.last_transition_time = Some(now.clone());
        }
        c.reason = Some(UNKNOWN_REASON.into());
        c.message = Some("The node stopped renewing its lease.".into());
    }
    api.replace_status(name, &PostParams::default(), &node)
        .await?;
    set_unreachable_taint(client, name, true).await
}

async fn evict(client: &kube::Client, pods: &[(String, String, String)]) {
    for (namespace, name, uid) in pods {
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => tracing::info!(pod = %format!("{namespace}/{name}"), "evicted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => {
                tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "eviction failed")
            }
        }
    }
}

/// Work for one node: its name, the verdict, and its pods `(namespace, name, uid)`.
pub(crate) type Work = (String, Verdict, Vec<(String, String, String)>);

/// Judges the cached nodes this hub looks after at `now`: `serves` is asked with the node's
/// name and its partition label (`sedna.io/hub-partition`), before anything else is read. A
/// node's pods are listed only when they could be evicted, so a healthy fleet costs one
/// pass over its Nodes and Leases. `contact` tells what the hub knows first-hand of a node
/// ([`NodeView::with_contact`]). `warned` remembers nodes whose annotation was reported
/// invalid.
pub(crate) fn plan(
    router: &Router,
    now: Timestamp,
    grace: Duration,
    warned: &mut std::collections::HashSet<String>,
    serves: impl Fn(&str, Option<&str>) -> bool,
    contact: impl Fn(&str) -> Option<Contact>,
) -> Vec<Work> {
    router
        .objects_of(Kind::Node)
        .filter(|node| serves(&node.key.name, node.partition_label.as_deref()))
        .filter_map(|node| {
            let name = &node.key.name;
            let contact = contact(name);
            // A connected node is seen now: fine, unless it still carries the unreachable
            // taint (see `judge`). The common case is decided without parsing its fields.
            if matches!(contact, Some(Contact::Connected)) && !node.unreachable_taint {
                return None;
            }
            let lease = router.get(&ObjKey::new(Kind::Lease, "kube-node-lease", name));
            // Any pods at all, until the verdict could depend on them.
            let mut v = view(&node.value(), lease.map(|l| l.value()).as_ref(), usize::MAX)
                .with_contact(contact, now);
            if let Some(Err(e)) = &v.autonomy
                && warned.insert(name.clone())
            {
                tracing::warn!(node = %name, error = %e, "ignoring {AUTONOMY_ANNOTATION}: pods are never evicted");
            }
            if judge(&v, now, grace) == Verdict::Fine {
                return None;
            }
            let bound = router.pods_on(name);
            v.pods = bound.len();
            let verdict = judge(&v, now, grace);
            (verdict != Verdict::Fine).then(|| (name.clone(), verdict, bound))
        })
        .collect()
}

/// Applies the verdicts through the API; returns how many nodes it marked NotReady.
pub(crate) async fn apply(client: &kube::Client, work: Vec<Work>) -> u64 {
    let mut marked = 0;
    for (node, verdict, pods) in work {
        match verdict {
            Verdict::MarkUnknown => match mark_unknown(client, &node).await {
                Ok(()) => {
                    marked += 1;
                    tracing::warn!(%node, "lease expired: node marked NotReady (pods keep running)")
                }
                Err(e) => {
                    tracing::debug!(%node, error = %e, "could not mark the node NotReady; trying again")
                }
            },
            Verdict::Evict => {
                tracing::warn!(%node, pods = pods.len(), "unreachable beyond its autonomy period: evicting its pods");
                evict(client, &pods).await;
            }
            Verdict::Untaint => match set_unreachable_taint(client, &node, false).await {
                Ok(()) => tracing::info!(%node, "reachable again: unreachable taint removed"),
                Err(e) => {
                    tracing::debug!(%node, error = %e, "could not untaint the node; trying again")
                }
            },
            Verdict::Fine => {}
        }
    }
    marked
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn base() -> NodeView {
        NodeView {
            last_seen: Some(t("2026-01-01T00:00:00Z")),
            lease_duration: Duration::from_secs(40),
            ready: Some("True".into()),
            ready_since: Some(t("2025-12-31T00:00:00Z")),
            autonomy: None,
            pods: 3,
            tainted: false,
        }
    }

    fn cached(kind: Kind, ns: &str, name: &str, mut body: Value) -> crate::router::Object {
        body["metadata"]["uid"] = format!("uid-{name}").into();
        body["metadata"]["creationTimestamp"] = "2025-12-31T00:00:00Z".into();
        crate::router::tests::obj(kind, ns, name, 1, body)
    }

    /// A node last heard from at `seen`, Ready `ready`, with an optional autonomy period and
    /// partition label; its Lease says the same time.
    fn fleet_node(router: &mut Router, name: &str, seen: &str, ready: &str, extra: Value) {
        let mut body = serde_json::json!({
            "status": { "conditions": [{ "type": "Ready", "status": ready,
                "lastHeartbeatTime": seen, "lastTransitionTime": seen }] } });
        for (k, x) in extra.as_object().into_iter().flatten() {
            body[k] = x.clone();
        }
        router.upsert(cached(Kind::Node, "", name, body));
        router.upsert(cached(
            Kind::Lease,
            "kube-node-lease",
            name,
            serde_json::json!({ "spec": { "renewTime": seen, "leaseDurationSeconds": 40 } }),
        ));
    }

    #[test]
    fn the_plan_judges_only_served_nodes_and_lists_pods_only_for_an_eviction() {
        let mut router = Router::new();
        let gone = serde_json::json!({
            "metadata": { "annotations": { AUTONOMY_ANNOTATION: "10m" } },
            "spec": { "taints": [{ "key": UNREACHABLE_TAINT, "effect": "NoSchedule" }] } });
        fleet_node(
            &mut router,
            "fresh",
            "2026-01-01T00:59:50Z",
            "True",
            Value::Null,
        );
        fleet_node(
            &mut router,
            "silent",
            "2026-01-01T00:00:00Z",
            "True",
            Value::Null,
        );
        fleet_node(
            &mut router,
            "other-hubs",
            "2026-01-01T00:00:00Z",
            "True",
            Value::Null,
        );
        let labelled = serde_json::json!({
            "metadata": { "labels": { crate::partitions::PARTITION_LABEL: "7" } } });
        fleet_node(
            &mut router,
            "labelled",
            "2026-01-01T00:00:00Z",
            "True",
            labelled,
        );
        fleet_node(
            &mut router,
            "gone",
            "2026-01-01T00:00:00Z",
            "Unknown",
            gone.clone(),
        );
        fleet_node(
            &mut router,
            "gone-empty",
            "2026-01-01T00:00:00Z",
            "Unknown",
            gone,
        );
        for (pod, node) in [("p1", "gone"), ("p2", "gone"), ("p3", "fresh")] {
            let spec = serde_json::json!({ "spec": { "nodeName": node, "containers": [] } });
            router.upsert(cached(Kind::Pod, "default", pod, spec));
        }
        let asked = std::cell::RefCell::new(Vec::new());
        let mut warned = std::collections::HashSet::new();
        let mut work = plan(
            &router,
            t("2026-01-01T01:00:00Z"),
            Duration::ZERO,
            &mut warned,
            |node, label| {
                asked
                    .borrow_mut()
                    .push((node.to_owned(), label.map(str::to_owned)));
                node != "other-hubs"
            },
            |_| None,
        );
        work.sort_by(|a, b| a.0.cmp(&b.0));
        let verdicts: Vec<(&str, Verdict, usize)> = work
            .iter()
            .map(|(n, v, pods)| (n.as_str(), v.clone(), pods.len()))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("gone", Verdict::Evict, 2),
                ("labelled", Verdict::MarkUnknown, 0),
                ("silent", Verdict::MarkUnknown, 0),
            ],
            "not the other hub's node, not the fresh one, not an empty node's pods"
        );
        let mut pods = work[0].2.clone();
        pods.sort();
        assert_eq!(pods[0], ("default".into(), "p1".into(), "uid-p1".into()));
        let mut asked = asked.into_inner();
        asked.sort();
        assert_eq!(asked.len(), 6, "each node asked about once: {asked:?}");
        assert!(asked.contains(&("labelled".into(), Some("7".into()))));
        assert!(asked.contains(&("silent".into(), None)));
    }

    #[test]
    fn a_hub_judges_the_nodes_it_holds_sessions_with_by_their_sessions_not_the_apis_lease() {
        let mut router = Router::new();
        // All four last wrote their Lease at 00:00:00 (stored for 40 s); it is now 00:02:00.
        for name in ["connected", "lost-late", "lost-early", "elsewhere"] {
            fleet_node(
                &mut router,
                name,
                "2026-01-01T00:00:00Z",
                "True",
                Value::Null,
            );
        }
        // A connected node still carrying the unreachable taint from an earlier outage.
        fleet_node(
            &mut router,
            "connected-tainted",
            "2026-01-01T00:00:00Z",
            "True",
            serde_json::json!({
                "spec": { "taints": [{ "key": UNREACHABLE_TAINT, "effect": "NoSchedule" }] } }),
        );
        // A node whose Lease another hub wrote after its session here ended.
        router.upsert(cached(
            Kind::Lease,
            "kube-node-lease",
            "elsewhere",
            serde_json::json!({ "spec": { "renewTime": "2026-01-01T00:01:50Z",
                                          "leaseDurationSeconds": 160 } }),
        ));
        let contact = |node: &str| match node {
            "connected" | "connected-tainted" => Some(Contact::Connected),
            "lost-late" => Some(Contact::Lost {
                at: t("2026-01-01T00:01:30Z"),
                lease: Duration::from_secs(40),
            }),
            "lost-early" | "elsewhere" => Some(Contact::Lost {
                at: t("2026-01-01T00:01:00Z"),
                lease: Duration::from_secs(40),
            }),
            _ => None,
        };
        let mut work = plan(
            &router,
            t("2026-01-01T00:02:00Z"),
            Duration::ZERO,
            &mut std::collections::HashSet::new(),
            |_, _| true,
            contact,
        );
        work.sort_by(|a, b| a.0.cmp(&b.0));
        let verdicts: Vec<(&str, Verdict)> = work
            .iter()
            .map(|(n, v, _)| (n.as_str(), v.clone()))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("connected-tainted", Verdict::Untaint),
                ("lost-early", Verdict::MarkUnknown)
            ],
            "connected: fine whatever the API's Lease says, untainted if tainted; lost 30 s \
             ago: within its 40 s; lost 60 s ago: expired; heard by another hub since: the \
             API's Lease counts"
        );

        // A stretched Lease in the API does not keep a node this hub lost alive longer.
        let stretched = NodeView {
            lease_duration: Duration::from_secs(160),
            ..base()
        };
        let lost = stretched.clone().with_contact(
            Some(Contact::Lost {
                at: t("2026-01-01T00:00:05Z"),
                lease: Duration::from_secs(40),
            }),
            t("2026-01-01T00:01:00Z"),
        );
        assert_eq!(lost.lease_duration, Duration::from_secs(40));
        assert_eq!(
            judge(&lost, t("2026-01-01T00:01:00Z"), Duration::ZERO),
            Verdict::MarkUnknown
        );
        // Without first-hand knowledge (after a takeover) the stretched Lease counts.
        let unknown_here = stretched.with_contact(None, t("2026-01-01T00:01:00Z"));
        assert_eq!(
            judge(&unknown_here, t("2026-01-01T00:01:00Z"), Duration::ZERO),
            Verdict::Fine
        );
    }

    #[test]
    fn an_unreachable_node_is_tainted_and_untainted_when_it_reports_again() {
        let v = base();
        let lapsed = t("2026-01-01T00:00:41Z");
        assert_eq!(judge(&v, lapsed, Duration::ZERO), Verdict::MarkUnknown);
        // Marked Unknown but the taint write was lost: marked (and tainted) again.
        let unknown = NodeView {
            ready: Some("Unknown".into()),
            ready_since: Some(lapsed),
            ..v.clone()
        };
        assert_eq!(
            judge(&unknown, lapsed, Duration::ZERO),
            Verdict::MarkUnknown
        );
        let tainted = NodeView {
            tainted: true,
            ..unknown
        };
        assert_eq!(judge(&tainted, lapsed, Duration::ZERO), Verdict::Fine);
        // Back: Ready and heard from, still tainted → untaint; then fine.
        let back = NodeView {
            ready: Some("True".into()),
            last_seen: Some(t("2026-01-01T00:05:00Z")),
            tainted: true,
            ..v.clone()
        };
        assert_eq!(
            judge(&back, t("2026-01-01T00:05:01Z"), Duration::ZERO),
            Verdict::Untaint
        );
        let clean = NodeView {
            tainted: false,
            ..back
        };
        assert_eq!(
            judge(&clean, t("2026-01-01T00:05:01Z"), Duration::ZERO),
            Verdict::Fine
        );
        let node = serde_json::json!({ "spec": { "taints": [
            { "key": UNREACHABLE_TAINT, "effect": "NoSchedule" }] } });
        assert!(view(&node, None, 0).tainted);
    }

    #[test]
    fn a_node_is_fine_until_its_lease_runs_out_then_marked_unknown_once() {
        let v = base();
        assert_eq!(
            judge(&v, t("2026-01-01T00:00:40Z"), Duration::ZERO),
            Verdict::Fine
        );
        assert_eq!(
            judge(&v, t("2026-01-01T00:00:41Z"), Duration::ZERO),
            Verdict::MarkUnknown
        );
        assert_eq!(
            judge(&v, t("2026-01-01T00:00:41Z"), Duration::from_secs(5)),
            Verdict::Fine
        );
        let unknown = NodeView {
            ready: Some("Unknown".into()),
            tainted: true,
            ready_since: Some(t("2026-01-01T00:00:41Z")),
            ..v
        };
        assert_eq!(
            judge(&unknown, t("2026-01-09T00:00:00Z"), Duration::ZERO),
            Verdict::Fine
        );
    }

    #[test]
    fn pods_are_evicted_only_after_a_configured_autonomy_period() {
        let unknown = NodeView {
            ready: Some("Unknown".into()),
            tainted: true,
            ready_since: Some(t("2026-01-01T00:00:41Z")),
            autonomy: Some(Ok(Duration::from_secs(600))),
            ..base()
        };
        assert_eq!(
            judge(&unknown, t("2026-01-01T00:10:40Z"), Duration::ZERO),
            Verdict::Fine
        );
        assert_eq!(
            judge(&unknown, t("2026-01-01T00:10:42Z"), Duration::ZERO),
            Verdict::Evict
        );
        let no_pods = NodeView {
            pods: 0,
            ..unknown.clone()
        };
        assert_eq!(
            judge(&no_pods, t("2026-01-02T00:00:00Z"), Duration::ZERO),
            Verdict::Fine
        );
        let bad = NodeView {
            autonomy: Some(Err("soon".into())),
            ..unknown
        };
        assert_eq!(
            judge(&bad, t("2026-02-01T00:00:00Z"), Duration::ZERO),
            Verdict::Fine
        );
    }

    #[test]
    fn a_node_heard_from_again_is_fine() {
        let back = NodeView {
            last_seen: Some(t("2026-01-01T01:00:00Z")),
            ready: Some("Unknown".into()),
            tainted: true,
            autonomy: Some(Ok(Duration::ZERO)),
            ..base()
        };
        assert_eq!(
            judge(&back, t("2026-01-01T01:00:10Z"), Duration::ZERO),
            Verdict::Fine
        );
    }

    #[test]
    fn views_read_lease_heartbeat_and_annotation() {
        let node = serde_json::json!({
            "metadata": { "name": "e", "creationTimestamp": "2026-01-01T00:00:00Z",
                          "annotations": { AUTONOMY_ANNOTATION: "1h30m" } },
            "status": { "conditions": [{ "type": "Ready", "status": "True",
                "lastHeartbeatTime": "2026-01-01T00:05:00Z", "lastTransitionTime": "2026-01-01T00:00:10Z" }] }
        });
        let lease = serde_json::json!({ "spec": { "renewTime": "2026-01-01T00:06:00.123456Z", "leaseDurationSeconds": 8 } });
        let v = view(&node, Some(&lease), 2);
        assert_eq!(v.last_seen, Some(t("2026-01-01T00:06:00.123456Z")));
        assert_eq!(v.lease_duration, Duration::from_secs(8));
        assert_eq!(v.autonomy, Some(Ok(Duration::from_secs(5400))));
        assert_eq!(v.ready.as_deref(), Some("True"));
        let v = view(&node, None, 0);
        assert_eq!(v.last_seen, Some(t("2026-01-01T00:05:00Z")));
    }

    #[test]
    fn autonomy_durations_parse_or_say_why_not() {
        assert_eq!(parse_autonomy("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_autonomy("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_autonomy("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_autonomy("10").unwrap_err().contains("needs a unit"));
        assert!(parse_autonomy("10y").unwrap_err().contains("unknown unit"));
        assert!(parse_autonomy("").is_err());
    }
}
