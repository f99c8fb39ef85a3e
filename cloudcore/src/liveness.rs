//! Node liveness: what reaches the API of a node's Lease renewals, and what the hub itself
//! knows of the nodes it holds sessions with.
//!
//! An edge renews its Lease every 10 s over its session (the kubelet's cadence). Written to
//! the API one for one, that is 10,000 writes a second at 100,000 nodes, each watched back by
//! every hub. Which renewals the hub writes depends on who judges liveness ([`LeasePolicy`]):
//!
//! - **The hub's own lifecycle** ([`crate::lifecycle`], the default): the hub that holds a
//!   node's session judges it by the session ([`Contact`]: a session is closed after 35 s
//!   without a message), so the API's Lease is only the record for those who do not hold the
//!   session — a hub that takes the partition over, `kubectl`. It is written once every
//!   `refresh` (default 2 minutes) with its duration stretched by `refresh` and one renewal
//!   interval, so it never reads as expired while the node is connected:
//!   [`LeasePolicy::Refresh`]. Renewals every 10 s would be thrown away eleven times in twelve,
//!   so the hub asks its nodes to renew every quarter `refresh` instead (30 s;
//!   [`LeasePolicy::renewal_interval`], sent as `sedna-lease-renewal-ms` when a node
//!   attaches); the session's heartbeats (every 15 s each way) keep proving it alive in
//!   between, without the edge's outbox, the hub's JSON or an acknowledgement.
//! - **Another controller reading Leases** (kube-controller-manager on a real cluster, hub
//!   started with `--no-node-lifecycle`): the Lease keeps the node's own duration and is
//!   written once the stored one is half that old: [`LeasePolicy::Follow`].

use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;
use serde_json::Value;

/// Which of a node's Lease renewals the hub writes to the API, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeasePolicy {
    /// Written once the stored renewal is half the node's lease duration old, as the node
    /// sent it: for a controller that judges nodes by their Leases.
    Follow,
    /// Written once the stored renewal is this old, with `leaseDurationSeconds` stretched by
    /// the same amount and one renewal interval: for the hub's own lifecycle, which judges
    /// the nodes it holds sessions with by their sessions.
    Refresh(Duration),
}

impl LeasePolicy {
    /// How often the hub asks its nodes to renew their Leases (`None`: as often as they
    /// like; a controller reading Leases needs the node's own cadence). Under
    /// [`LeasePolicy::Refresh`] a quarter of the refresh, at least 10 s (the kubelet's).
    pub fn renewal_interval(self) -> Option<Duration> {
        match self {
            LeasePolicy::Follow => None,
            LeasePolicy::Refresh(refresh) => Some((refresh / 4).max(Duration::from_secs(10))),
        }
    }

    /// The `leaseDurationSeconds` the API's copy of a renewal carries (an int32 in the API):
    /// under [`LeasePolicy::Refresh`] the node's own, plus the refresh (a write is due that
    /// long after the stored one), plus one renewal interval (the renewal that makes it due
    /// comes up to that much later), so a connected node's Lease never reads as expired
    /// while its next write is on the way.
    pub fn stored_duration(self, announced: i64) -> i64 {
        match self {
            LeasePolicy::Follow => announced,
            LeasePolicy::Refresh(refresh) => {
                let stretch = refresh.saturating_add(self.renewal_interval().unwrap_or_default());
                announced
                    .saturating_add(i64::try_from(stretch.as_secs()).unwrap_or(i64::MAX))
                    .min(i64::from(i32::MAX))
            }
        }
    }

    /// How much newer than the stored renewal a renewal must be to be written, in ms.
    fn due_after_ms(self, announced: i64) -> i64 {
        match self {
            LeasePolicy::Follow => announced.saturating_mul(1000) / 2,
            LeasePolicy::Refresh(refresh) => i64::try_from(refresh.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// The fields of a Lease renewal the hub judges, read without building the whole document.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct Renewal {
    /// `spec`.
    #[serde(default)]
    pub spec: RenewalSpec,
}

/// The judged part of a Lease's `spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RenewalSpec {
    /// `holderIdentity`.
    #[serde(default)]
    pub holder_identity: Option<String>,
    /// `leaseDurationSeconds`.
    #[serde(default)]
    pub lease_duration_seconds: Option<i64>,
    /// `renewTime`, as sent.
    #[serde(default)]
    pub renew_time: Option<String>,
}

impl Renewal {
    /// Reads a renewal's payload (`None`: not a Lease document).
    pub fn parse(payload: &[u8]) -> Option<Renewal> {
        serde_json::from_slice(payload).ok()
    }

    /// Its `renewTime`, if it has a valid one.
    pub fn renewed(&self) -> Option<Timestamp> {
        self.spec.renew_time.as_deref()?.parse().ok()
    }

    /// The duration the node announced (40 s, the kubelet's, when it gave none).
    pub fn announced(&self) -> Duration {
        let secs = self.spec.lease_duration_seconds.unwrap_or(40);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }
}

/// Whether a node's Lease renewal must reach the API, given the Lease the API holds now as the
/// hub's cache has it (`cached`) and the renewal time this session last wrote (`written`, which
/// the cache may not show yet: under load the watch lags, and a lagging cache must not turn
/// every renewal into a write).
///
/// Written when nothing is stored (and this session wrote nothing yet), when the stored one is
/// held or sized other than this renewal would be stored, when the renewal is older than the stored one (the node's clock stepped back), and
/// when it is newer than the stored one by the policy's interval.
///
/// Both times are the node's own clock, and the renewal is judged by when the node made it,
/// not by when the hub gets to it: renewals queued behind a slow API server are skipped as
/// they would have been without the queue. Judged against the hub's clock instead, a backlog
/// turned every renewal into a write and grew itself (10,000 nodes on 3 hubs: 0.02 of 6
/// renewals a minute skipped, writes waiting 25 s for the API).
pub fn lease_due(
    cached: Option<&Value>,
    written: Option<Timestamp>,
    incoming: Option<&Renewal>,
    policy: LeasePolicy,
) -> bool {
    let Some(incoming) = incoming else {
        return true;
    };
    let announced = incoming.spec.lease_duration_seconds.unwrap_or(0);
    let stored = match cached {
        // The cache has not seen this session's write yet: that write is what is stored.
        None if written.is_some() => None,
        None => return true,
        Some(cached) => {
            let spec = |field: &str| cached.get("spec").and_then(|s| s.get(field));
            if spec("holderIdentity").and_then(Value::as_str)
                != incoming.spec.holder_identity.as_deref()
                || spec("leaseDurationSeconds").and_then(Value::as_i64)
                    != Some(policy.stored_duration(announced))
            {
                return true;
            }
            spec("renewTime")
                .and_then(Value::as_str)
                .and_then(|t| t.parse::<Timestamp>().ok())
        }
    };
    let (Some(renewed), Some(renewal)) = (stored.max(written), incoming.renewed()) else {
        return true;
    };
    let newer_by = renewal.as_millisecond() - renewed.as_millisecond();
    newer_by < 0 || newer_by >= policy.due_after_ms(announced)
}

/// The payload to write for a renewal under `policy`: as sent, or with its duration
/// stretched (`None`: the payload is not a JSON object, and is written as sent).
pub fn stored_payload(payload: &[u8], policy: LeasePolicy) -> Option<Vec<u8>> {
    let LeasePolicy::Refresh(_) = policy else {
        return None;
    };
    let mut doc: Value = serde_json::from_slice(payload).ok()?;
    let spec = doc.get_mut("spec")?.as_object_mut()?;
    let announced = spec
        .get("leaseDurationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(40);
    spec.insert(
        "leaseDurationSeconds".into(),
        Value::from(policy.stored_duration(announced)),
    );
    serde_json::to_vec(&doc).ok()
}

/// What a hub knows first-hand of a node it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contact {
    /// A session with the node is open: it was heard within the session's read deadline
    /// (35 s), within its lease.
    Connected,
    /// The node's last session here ended; it was last heard at `at` (the hub's clock) and
    /// had announced leases of `lease`.
    Lost {
        /// When its last message arrived.
        at: Timestamp,
        /// The lease duration it announced.
        lease: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, secs: i64, renewed: &str) -> Value {
        serde_json::json!({"spec": {"holderIdentity": holder, "leaseDurationSeconds": secs,
                                    "renewTime": renewed}})
    }

    fn renewal(holder: &str, renewed: &str) -> Option<Renewal> {
        Renewal::parse(lease(holder, 40, renewed).to_string().as_bytes())
    }

    #[test]
    fn following_writes_a_renewal_once_the_stored_one_is_half_its_duration_old() {
        let follow = LeasePolicy::Follow;
        let written_15s = "2026-12-01T10:00:15Z".parse().ok();
        let incoming = renewal("edge-1", "2026-12-01T10:00:30.000000Z");
        let fresh = lease("edge-1", 40, "2026-12-01T10:00:15.000000Z");
        let old = lease("edge-1", 40, "2026-12-01T10:00:10.000000Z");
        assert!(!lease_due(Some(&fresh), None, incoming.as_ref(), follow));
        assert!(lease_due(Some(&old), None, incoming.as_ref(), follow));
        assert!(lease_due(None, None, incoming.as_ref(), follow), "none yet");
        assert!(
            !lease_due(None, written_15s, incoming.as_ref(), follow),
            "none in the cache yet, but this session wrote one 15 s ago"
        );
        let other = lease("edge-2", 40, "2026-12-01T10:00:29.000000Z");
        assert!(lease_due(Some(&other), None, incoming.as_ref(), follow));
        assert!(lease_due(Some(&fresh), None, None, follow), "not a Lease");
        assert_eq!(Renewal::parse(b"not json"), None);
        // The cache lags behind this session's own last write: that write counts.
        let written = "2026-12-01T10:00:20Z".parse().ok();
        assert!(!lease_due(Some(&old), written, incoming.as_ref(), follow));
        assert!(lease_due(Some(&other), written, incoming.as_ref(), follow));
        // Judged by the renewal's own time, however late the hub gets to it.
        let queued = renewal("edge-1", "2026-12-01T10:00:25.000000Z");
        assert!(!lease_due(Some(&old), None, queued.as_ref(), follow));
        // The node's clock stepped back: its renewal is written so the API follows it.
        let earlier = renewal("edge-1", "2026-12-01T10:00:05.000000Z");
        assert!(lease_due(Some(&fresh), None, earlier.as_ref(), follow));
        let undated =
            Renewal::parse(br#"{"spec":{"holderIdentity":"edge-1","leaseDurationSeconds":40}}"#);
        assert!(lease_due(Some(&fresh), None, undated.as_ref(), follow));
    }

    #[test]
    fn refreshing_writes_a_renewal_every_interval_with_its_duration_stretched_by_it() {
        let refresh = LeasePolicy::Refresh(Duration::from_secs(120));
        assert_eq!(refresh.renewal_interval(), Some(Duration::from_secs(30)));
        assert_eq!(LeasePolicy::Follow.renewal_interval(), None);
        assert_eq!(
            LeasePolicy::Refresh(Duration::from_secs(20)).renewal_interval(),
            Some(Duration::from_secs(10)),
            "never more often than the kubelet's cadence"
        );
        // 40 s of the node's own, 120 s until the next write is due, 30 s until the renewal
        // that makes it due arrives.
        let stored = lease("edge-1", 190, "2026-12-01T10:00:00.000000Z");
        let at = |t: &str| renewal("edge-1", t);
        assert!(!lease_due(
            Some(&stored),
            None,
            at("2026-12-01T10:01:50Z").as_ref(),
            refresh
        ));
        assert!(lease_due(
            Some(&stored),
            None,
            at("2026-12-01T10:02:00Z").as_ref(),
            refresh
        ));
        // Stored as the node sent it (before this policy, or by a hub following): rewritten.
        let unstretched = lease("edge-1", 40, "2026-12-01T10:00:00.000000Z");
        assert!(lease_due(
            Some(&unstretched),
            None,
            at("2026-12-01T10:00:10Z").as_ref(),
            refresh
        ));
        // A stretched Lease is not "fresh" for a hub following the node.
        assert!(lease_due(
            Some(&stored),
            None,
            at("2026-12-01T10:00:10Z").as_ref(),
            LeasePolicy::Follow
        ));

        let payload = lease("edge-1", 40, "2026-12-01T10:00:00Z").to_string();
        let written: Value =
            serde_json::from_slice(&stored_payload(payload.as_bytes(), refresh).unwrap()).unwrap();
        assert_eq!(written["spec"]["leaseDurationSeconds"], 190);
        assert_eq!(written["spec"]["holderIdentity"], "edge-1");
        assert_eq!(written["spec"]["renewTime"], "2026-12-01T10:00:00Z");
        assert_eq!(
            stored_payload(payload.as_bytes(), LeasePolicy::Follow),
            None
        );
        assert_eq!(stored_payload(b"[1]", refresh), None);
        // A node announcing an absurd duration gets the API's int32 bound, not an overflow.
        assert_eq!(refresh.stored_duration(i64::MAX), i64::from(i32::MAX));
        // What the stretched Lease is judged by once written: the node's own duration.
        let back = Renewal::parse(payload.as_bytes()).unwrap();
        assert_eq!(back.announced(), Duration::from_secs(40));
        assert!(!lease_due(Some(&written), None, Some(&back), refresh));
    }
}
