//! The hub tier: several hubs share the nodes, each node belonging to one partition (a stable
//! hash of its name, or the `sedna.io/hub-partition` label of its Node), each partition served
//! by one hub at a time. Ownership is negotiated through Leases in the API; there is no other
//! coordinator.
//!
//! - Membership: each hub renews `kube-system/sedna-hub-<id>`, saying where edges reach it and
//!   which partitions it is primary and standby for.
//! - Ownership: `kube-system/sedna-partition-<p>` names the hub serving `p`. Every hub computes
//!   the same desired owners from the live members and the current holders
//!   ([`desired_owners`]): with static partitions, the live primary, else the live standby
//!   (so a standby takes over when its primary's lease expires, and hands back once the
//!   primary is live again); with every hub active, an exact share per live hub, each keeping
//!   what it holds up to its share and the rest placed by rendezvous hashing (so partitions
//!   rebalance when hubs join or leave, moving only the partitions they must). [`plan`]
//!   turns that into writes: claim a free or expired lease it should own, renew the leases it holds and should keep, release
//!   the ones it should give up. A lease held by another hub is never taken before it
//!   expires, and writes carry the lease's resourceVersion, so two hubs never both succeed.
//! - Serving: a hub serves a partition only while its own last successful claim or renewal is
//!   younger than the lease duration minus a safety margin ([`Held`]); a hub that cannot
//!   renew stops serving before anyone else may claim. A node that dials a hub that does not
//!   serve its partition is told where to go (see [`crate::hub`]).
//!
//! Everything here is pure: the hub's tier loop reads the Leases, calls [`plan`], writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// A Node label that places the node in a partition explicitly.
pub const PARTITION_LABEL: &str = "sedna.io/hub-partition";
/// Label of the membership Leases.
pub const MEMBER_LABEL: &str = "sedna.io/hub-member";
/// Label of the partition Leases.
pub const PARTITION_LEASE_LABEL: &str = "sedna.io/hub-partition-lease";
/// Annotation of a membership Lease: where edges reach the hub.
pub const ADDRESS_ANNOTATION: &str = "sedna.io/hub-address";
/// Annotation of a membership Lease: the partitions the hub is primary for.
pub const PRIMARY_ANNOTATION: &str = "sedna.io/primary-partitions";
/// Annotation of a membership Lease: the partitions the hub is standby for.
pub const STANDBY_ANNOTATION: &str = "sedna.io/standby-partitions";

/// Name of a hub's membership Lease.
pub fn member_lease_name(id: &str) -> String {
    format!("sedna-hub-{id}")
}

/// Name of a partition's Lease.
pub fn partition_lease_name(p: u32) -> String {
    format!("sedna-partition-{p}")
}

/// The partition of a node: its label if it names one in range, else a stable hash of its
/// name (the first 8 bytes of its SHA-256).
pub fn partition_of(node: &str, labels: Option<&BTreeMap<String, String>>, partitions: u32) -> u32 {
    let label = labels.and_then(|l| l.get(PARTITION_LABEL));
    partition_of_labelled(node, label.map(String::as_str), partitions)
}

/// The value of a cached Node's [`PARTITION_LABEL`], if it has one.
pub fn label_of(node: &serde_json::Value) -> Option<&str> {
    node.get("metadata")?
        .get("labels")?
        .get(PARTITION_LABEL)?
        .as_str()
}

/// [`partition_of`], given the value of the node's [`PARTITION_LABEL`] alone.
pub fn partition_of_labelled(node: &str, label: Option<&str>, partitions: u32) -> u32 {
    let partitions = partitions.max(1);
    if let Some(p) = label
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|p| *p < partitions)
    {
        return p;
    }
    (hash64(node.as_bytes()) % u64::from(partitions)) as u32
}

/// The first 8 bytes of the SHA-256 of `bytes`, as a number: stable across hubs, builds and
/// platforms.
fn hash64(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// How partitions are assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Each partition has a primary and a standby hub, given by configuration.
    Static,
    /// Every hub is active; ownership follows the live hubs (rendezvous hashing).
    MultiPrimary,
}

/// A hub of the tier, as its membership Lease says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The hub's id.
    pub id: String,
    /// Where edges reach it (`host:port`).
    pub address: String,
    /// Partitions it is primary for (static mode).
    pub primary: Vec<u32>,
    /// Partitions it is standby for (static mode).
    pub standby: Vec<u32>,
    /// When its membership expires (unix ms).
    pub expires_ms: i64,
}

impl Member {
    /// Whether the hub is live at `now_ms`.
    pub fn live(&self, now_ms: i64) -> bool {
        self.expires_ms > now_ms
    }
}

/// A partition's Lease, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLease {
    /// The partition.
    pub partition: u32,
    /// The hub holding it (empty: released).
    pub holder: String,
    /// When the holding expires (unix ms).
    pub expires_ms: i64,
    /// The Lease's resourceVersion, for the conditional write.
    pub version: String,
}

impl PartitionLease {
    /// The hub holding it at `now_ms`, if any.
    pub fn holder_at(&self, now_ms: i64) -> Option<&str> {
        (!self.holder.is_empty() && self.expires_ms > now_ms).then_some(self.holder.as_str())
    }
}

/// Which live hub should serve each partition (indexed by partition), given who holds each
/// now (`holders`: partition → hub id; a holder that is not a live member counts as none).
///
/// With static partitions: the live primary, else the live standby. With every hub active the
/// tier is balanced exactly: with `n` live hubs each serves `P / n` partitions, and the
/// `P % n` hubs holding the most (then by id) one more. A hub keeps the partitions it holds up
/// to its share, preferring those it ranks highest by rendezvous hashing; a partition no hub
/// keeps goes to the hub ranking it highest among those under their share. So a hub that
/// leaves moves only its own partitions, a hub that joins takes partitions only from hubs
/// over their new share, and every hub computes the same answer from the same Leases.
/// (Plain rendezvous hashing, per partition, gave one of four hubs 11 of 32 partitions, and
/// 13 once a fourth hub died: 40% of a 50,000-node fleet on one hub.)
pub fn desired_owners<'a>(
    partitions: u32,
    members: &'a [Member],
    mode: Mode,
    holders: &HashMap<u32, &str>,
    now_ms: i64,
) -> Vec<Option<&'a Member>> {
    let mut live: Vec<&Member> = members.iter().filter(|m| m.live(now_ms)).collect();
    live.sort_by(|a, b| a.id.cmp(&b.id));
    live.dedup_by(|a, b| a.id == b.id);
    match mode {
        Mode::Static => (0..partitions)
            .map(|p| {
                live.iter()
                    .find(|m| m.primary.contains(&p))
                    .or_else(|| live.iter().find(|m| m.standby.contains(&p)))
                    .copied()
            })
            .collect(),
        Mode::MultiPrimary => balanced(partitions, &live, holders),
    }
}

/// The partitions hub `me` should keep warm (their objects cached) besides those it serves:
/// those the tier's rules give it now, and those it would be given if any one other live hub
/// left. So the hub taking a dead hub's partition over already holds its nodes' objects and
/// lists nothing, as a static standby. With every hub active each partition is warm on two
/// hubs, its owner and its heir (`2 P / n` per hub on average); with static partitions, a
/// hub keeps its primary and standby partitions.
pub fn warm_partitions(
    me: &str,
    partitions: u32,
    mode: Mode,
    members: &[Member],
    holders: &HashMap<u32, &str>,
    now_ms: i64,
) -> Vec<u32> {
    let mine = |owners: Vec<Option<&Member>>| -> Vec<u32> {
        owners
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_some_and(|m| m.id == me))
            .map(|(p, _)| p as u32)
            .collect()
    };
    let mut warm: BTreeSet<u32> = mine(desired_owners(partitions, members, mode, holders, now_ms))
        .into_iter()
        .collect();
    if mode == Mode::Static {
        if let Some(m) = members.iter().find(|m| m.id == me) {
            warm.extend(
                m.primary
                    .iter()
                    .chain(&m.standby)
                    .filter(|p| **p < partitions),
            );
        }
        return warm.into_iter().collect();
    }
    let others: BTreeSet<&str> = members
        .iter()
        .filter(|m| m.live(now_ms) && m.id != me)
        .map(|m| m.id.as_str())
        .collect();
    for gone in others {
        let rest: Vec<Member> = members.iter().filter(|m| m.id != gone).cloned().collect();
        let held: HashMap<u32, &str> = holders
            .iter()
            .filter(|(_, h)| **h != gone)
            .map(|(p, h)| (*p, *h))
            .collect();
        warm.extend(mine(desired_owners(partitions, &rest, mode, &held, now_ms)));
    }
    warm.into_iter().collect()
}

/// A hub's rendezvous rank of partition `p` (higher first).
fn rank(p: u32, hub: &str) -> u64 {
    hash64(format!("{p}/{hub}").as_bytes())
}

/// [`desired_owners`] with every hub active; `live` sorted by id, without duplicates.
fn balanced<'a>(
    partitions: u32,
    live: &[&'a Member],
    holders: &HashMap<u32, &str>,
) -> Vec<Option<&'a Member>> {
    let mut out: Vec<Option<&'a Member>> = vec![None; partitions as usize];
    if live.is_empty() {
        return out;
    }
    let index: HashMap<&str, usize> = live
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.as_str(), i))
        .collect();
    let mut held: Vec<Vec<u32>> = vec![Vec::new(); live.len()];
    for (p, hub) in holders {
        if let (true, Some(i)) = (*p < partitions, index.get(hub)) {
            held[*i].push(*p);
        }
    }
    // Shares: P / n each, one more for the P % n hubs holding the most (then by id).
    let n = live.len();
    let (base, extra) = (partitions as usize / n, partitions as usize % n);
    let mut by_holding: Vec<usize> = (0..n).collect();
    by_holding.sort_by_key(|i| (std::cmp::Reverse(held[*i].len()), *i));
    let mut share = vec![base; n];
    for i in by_holding.into_iter().take(extra) {
        share[i] += 1;
    }
    // Each hub keeps what it holds up to its share, its highest ranked first.
    let mut load = vec![0usize; n];
    for (i, mine) in held.iter_mut().enumerate() {
        let id = live[i].id.as_str();
        mine.sort_by_key(|p| (std::cmp::Reverse(rank(*p, id)), *p));
        for p in mine.iter().take(share[i]) {
            out[*p as usize] = Some(live[i]);
            load[i] += 1;
        }
    }
    // The rest go to the hub ranking them highest among those under their share (the shares
    // add up to P, so there is always one).
    for p in 0..partitions {
        if out[p as usize].is_some() {
            continue;
        }
        let best = (0..n)
            .filter(|i| load[*i] < share[*i])
            .max_by_key(|i| (rank(p, &live[*i].id), std::cmp::Reverse(*i)));
        if let Some(i) = best {
            out[p as usize] = Some(live[i]);
            load[i] += 1;
        }
    }
    out
}

/// A write this hub should make to a partition Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Take a free or expired lease (`version`: the Lease to replace; `None`: create it).
    Claim {
        /// The partition.
        partition: u32,
        /// The Lease's resourceVersion, if it exists.
        version: Option<String>,
    },
    /// Renew a lease this hub holds.
    Renew {
        /// The partition.
        partition: u32,
        /// The Lease's resourceVersion.
        version: String,
    },
    /// Give a lease up (another live hub should own it).
    Release {
        /// The partition.
        partition: u32,
        /// The Lease's resourceVersion.
        version: String,
    },
}

/// What hub `me` should write, given the members and the partition Leases read at `now_ms`.
pub fn plan(
    me: &str,
    partitions: u32,
    mode: Mode,
    members: &[Member],
    leases: &[PartitionLease],
    now_ms: i64,
) -> Vec<Action> {
    let by_partition: HashMap<u32, &PartitionLease> =
        leases.iter().map(|l| (l.partition, l)).collect();
    let holders: HashMap<u32, &str> = leases
        .iter()
        .filter_map(|l| Some((l.partition, l.holder_at(now_ms)?)))
        .collect();
    let owners = desired_owners(partitions, members, mode, &holders, now_ms);
    let mut actions = Vec::new();
    for p in 0..partitions {
        let desired = owners[p as usize].map(|m| m.id.as_str());
        let lease = by_partition.get(&p);
        let holder = lease.and_then(|l| l.holder_at(now_ms));
        match (holder, lease) {
            (Some(h), Some(l)) if h == me => {
                if desired.is_none_or(|d| d == me) {
                    actions.push(Action::Renew {
                        partition: p,
                        version: l.version.clone(),
                    });
                } else {
                    actions.push(Action::Release {
                        partition: p,
                        version: l.version.clone(),
                    });
                }
            }
            (None, _) if desired == Some(me) => actions.push(Action::Claim {
                partition: p,
                version: lease.map(|l| l.version.clone()),
            }),
            _ => {}
        }
    }
    actions
}

/// The partitions this hub may serve: each until its last successful claim or renewal (taken
/// at the time the write was sent) plus the lease duration minus a safety margin.
#[derive(Clone, Debug, Default)]
pub struct Held {
    until_ms: HashMap<u32, i64>,
}

impl Held {
    /// A claim or renewal sent at `sent_ms` succeeded.
    pub fn confirm(&mut self, partition: u32, sent_ms: i64, lease_ms: i64) {
        // A third of the lease is kept for clock skew and slow writes.
        self.until_ms.insert(partition, sent_ms + lease_ms * 2 / 3);
    }

    /// The lease was released or lost.
    pub fn drop_partition(&mut self, partition: u32) {
        self.until_ms.remove(&partition);
    }

    /// Until when (unix ms) the hub may serve `partition`, if it holds it.
    pub fn until(&self, partition: u32) -> Option<i64> {
        self.until_ms.get(&partition).copied()
    }

    /// Whether the hub may serve `partition` at `now_ms`.
    pub fn serves(&self, partition: u32, now_ms: i64) -> bool {
        self.until_ms.get(&partition).is_some_and(|u| *u > now_ms)
    }

    /// Partitions held at `now_ms`.
    pub fn partitions(&self, now_ms: i64) -> Vec<u32> {
        let mut p: Vec<u32> = self
            .until_ms
            .iter()
            .filter(|(_, u)| **u > now_ms)
            .map(|(p, _)| *p)
            .collect();
        p.sort_unstable();
        p
    }
}

/// Parses a partition list: `0,2,5-7`; each below `partitions`.
pub fn parse_partitions(s: &str, partitions: u32) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let parse = |x: &str| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| format!("{part:?} is not a partition number or range"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b || b >= partitions {
            return Err(format!(
                "partitions {part:?} are not within 0-{}",
                partitions.saturating_sub(1)
            ));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Formats a partition list for an annotation.
pub fn format_partitions(p: &[u32]) -> String {
    p.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// How long after another hub's Lease expires a hub re-reads the tier (clock granularity; a
/// Lease renewed meanwhile is simply seen renewed).
pub const EXPIRY_MARGIN: Duration = Duration::from_millis(200);

/// How long a claim takes once a Lease has expired, as told to waiting nodes: the re-read at
/// [`EXPIRY_MARGIN`], two lists and the writes.
const CLAIM_TIME: Duration = Duration::from_secs(1);

/// When hub `me` should re-read the tier before its next renewal: just after the earliest
/// expiry (after `now_ms`) of another hub's membership or partition Lease. A live hub renews
/// long before (its Leases run for three renewal periods), so this only comes first when a
/// hub stopped renewing: its partitions are then claimed at once, not up to a renewal period
/// later. `None` when no other hub holds anything.
pub fn next_expiry(
    me: &str,
    members: &[Member],
    leases: &[PartitionLease],
    now_ms: i64,
) -> Option<i64> {
    let memberships = members.iter().filter(|m| m.id != me).map(|m| m.expires_ms);
    let holdings = leases
        .iter()
        .filter(|l| l.holder_at(now_ms).is_some_and(|h| h != me))
        .map(|l| l.expires_ms);
    memberships
        .chain(holdings)
        .filter(|e| *e > now_ms)
        .min()
        .map(|e| e.saturating_add(EXPIRY_MARGIN.as_millis() as i64))
}

/// How long a node whose partition no live hub serves should wait before dialing again: until
/// the partition's Lease (held by a hub that is gone) expires, when another hub may claim it
/// (the tier re-reads just after, see [`next_expiry`]), plus the time a claim takes (at most
/// half a renewal period, a third of `lease`); at least one second, at most a lease plus a
/// second. `expires_ms` is `None` when the partition has no Lease yet.
pub fn retry_after(expires_ms: Option<i64>, now_ms: i64, lease: Duration) -> Duration {
    let period = lease / 3;
    let remaining = expires_ms
        .map(|e| Duration::from_millis(e.saturating_sub(now_ms).max(0) as u64))
        .unwrap_or_default()
        .min(lease);
    (remaining + (period / 2).min(CLAIM_TIME)).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_rereads_the_tier_just_after_another_hubs_lease_runs_out() {
        let members = [
            member("a", &[], &[], 40_000),
            member("b", &[], &[], 31_000),
            member("gone", &[], &[], 9_000),
        ];
        let leases = [
            lease(0, "a", 12_000),
            lease(1, "b", 30_000),
            lease(2, "", 11_000),
            lease(3, "gone", 9_500),
        ];
        let margin = EXPIRY_MARGIN.as_millis() as i64;
        // Its own Leases never count; of the others', the earliest still running.
        assert_eq!(
            next_expiry("a", &members, &leases, 10_000),
            Some(30_000 + margin)
        );
        // b's view: a's partition 0 runs out first.
        assert_eq!(
            next_expiry("b", &members, &leases, 10_000),
            Some(12_000 + margin)
        );
        // Before the dead hub's last Lease ran out: that one.
        assert_eq!(
            next_expiry("a", &members, &leases, 9_000),
            Some(9_500 + margin)
        );
        // Nothing held by another hub: no early re-read.
        assert_eq!(next_expiry("a", &members[..1], &leases[..1], 10_000), None);
    }

    #[test]
    fn nodes_of_an_unserved_partition_wait_until_its_lease_can_be_claimed() {
        let lease = Duration::from_secs(15);
        // 10 s left on the dead hub's lease: wait those, then a second for the claim.
        assert_eq!(
            retry_after(Some(20_000), 10_000, lease),
            Duration::from_millis(11_000)
        );
        // Expired, not claimed yet: the time a claim takes.
        assert_eq!(
            retry_after(Some(5_000), 10_000, lease),
            Duration::from_millis(1_000)
        );
        // A lease far in the future (a clock skew, a hostile writer) is bounded by one lease.
        assert_eq!(
            retry_after(Some(i64::MAX), 0, lease),
            Duration::from_millis(16_000)
        );
        // No lease yet; short leases (half a period under a second) still wait a second.
        assert_eq!(retry_after(None, 0, lease), Duration::from_millis(1_000));
        assert_eq!(
            retry_after(Some(1_000), 0, Duration::from_millis(1_500)),
            Duration::from_millis(1_250)
        );
        assert_eq!(
            retry_after(None, 0, Duration::from_secs(3)),
            Duration::from_secs(1)
        );
    }

    fn member(id: &str, primary: &[u32], standby: &[u32], expires_ms: i64) -> Member {
        Member {
            id: id.into(),
            address: format!("{id}:1"),
            primary: primary.to_vec(),
            standby: standby.to_vec(),
            expires_ms,
        }
    }

    #[test]
    fn partitions_are_a_stable_hash_or_the_nodes_label() {
        let p = partition_of("edge-1", None, 16);
        assert_eq!(p, partition_of("edge-1", None, 16), "stable");
        let spread: std::collections::HashSet<u32> = (0..200)
            .map(|i| partition_of(&format!("edge-{i}"), None, 16))
            .collect();
        assert_eq!(spread.len(), 16, "200 names cover 16 partitions");
        let labels: BTreeMap<String, String> =
            [(PARTITION_LABEL.to_string(), "3".to_string())].into();
        assert_eq!(partition_of("edge-1", Some(&labels), 16), 3);
        let out_of_range: BTreeMap<String, String> =
            [(PARTITION_LABEL.to_string(), "99".to_string())].into();
        assert_eq!(partition_of("edge-1", Some(&out_of_range), 16), p);
    }

    #[test]
    fn static_partitions_go_to_the_live_primary_else_the_standby() {
        let members = vec![
            member("a", &[0, 1], &[2, 3], 100),
            member("b", &[2, 3], &[0, 1], 100),
        ];
        let none = HashMap::new();
        let owners = |ms: &[Member]| -> Vec<Option<String>> {
            desired_owners(6, ms, Mode::Static, &none, 50)
                .into_iter()
                .map(|m| m.map(|m| m.id.clone()))
                .collect()
        };
        let a = Some("a".to_string());
        let b = Some("b".to_string());
        assert_eq!(
            owners(&members),
            [a.clone(), a, b.clone(), b.clone(), None, None]
        );
        let a_dead = vec![member("a", &[0, 1], &[2, 3], 10), members[1].clone()];
        assert_eq!(owners(&a_dead)[..4], [b.clone(), b.clone(), b.clone(), b]);
    }

    /// Owner ids of each partition, every hub active.
    fn balanced_owners(partitions: u32, hubs: &[Member], held: &[String]) -> Vec<String> {
        let holders: HashMap<u32, &str> = held
            .iter()
            .enumerate()
            .map(|(p, h)| (p as u32, h.as_str()))
            .collect();
        desired_owners(partitions, hubs, Mode::MultiPrimary, &holders, 50)
            .into_iter()
            .map(|m| m.expect("every partition has an owner").id.clone())
            .collect()
    }

    fn hubs(ids: &[String]) -> Vec<Member> {
        ids.iter().map(|id| member(id, &[], &[], 100)).collect()
    }

    fn loads(owners: &[String]) -> BTreeMap<&str, usize> {
        let mut loads = BTreeMap::new();
        for o in owners {
            *loads.entry(o.as_str()).or_default() += 1;
        }
        loads
    }

    #[test]
    fn every_active_hub_serves_its_exact_share_whatever_the_hashes() {
        for (partitions, n) in [(32, 4), (32, 3), (8, 3), (10, 4), (100, 7), (3, 5), (1, 1)] {
            for set in 0..20 {
                let ids: Vec<String> = (0..n).map(|i| format!("hub-{set}-{i}")).collect();
                let owners = balanced_owners(partitions, &hubs(&ids), &[]);
                let loads = loads(&owners);
                let (low, high) = (
                    partitions as usize / n,
                    partitions.div_ceil(n as u32) as usize,
                );
                for id in &ids {
                    let load = loads.get(id.as_str()).copied().unwrap_or(0);
                    assert!(
                        (low..=high).contains(&load),
                        "{id} serves {load} of {partitions} partitions among {n} hubs"
                    );
                }
            }
        }
        // The 50,000-node bench's four hubs, of which plain rendezvous hashing gave h1 11 of
        // 32 partitions.
        let ids: Vec<String> = (1..=4).map(|i| format!("h{i}")).collect();
        let owners = balanced_owners(32, &hubs(&ids), &[]);
        assert!(loads(&owners).values().all(|l| *l == 8), "{owners:?}");
        assert!(
            desired_owners(4, &[], Mode::MultiPrimary, &HashMap::new(), 50)
                .iter()
                .all(Option::is_none)
        );
    }

    #[test]
    fn a_hub_that_leaves_moves_only_its_own_partitions_and_one_that_joins_takes_only_excess() {
        for set in 0..50 {
            let ids: Vec<String> = (0..4).map(|i| format!("hub-{set}-{i}")).collect();
            let four = balanced_owners(32, &hubs(&ids), &[]);
            // Settled: the same answer with the holders it gave.
            assert_eq!(balanced_owners(32, &hubs(&ids), &four), four);

            let gone = &ids[1];
            let three = balanced_owners(32, &hubs(&[&ids[..1], &ids[2..]].concat()), &four);
            for (before, after) in four.iter().zip(&three) {
                if before != gone {
                    assert_eq!(after, before, "a partition of a hub that stayed moved");
                }
            }
            assert!(loads(&three).values().all(|l| (10..=11).contains(l)));

            let newcomer = format!("hub-{set}-new");
            let mut five_ids = ids.clone();
            five_ids.push(newcomer.clone());
            let five = balanced_owners(32, &hubs(&five_ids), &four);
            for (before, after) in four.iter().zip(&five) {
                assert!(
                    after == before || *after == newcomer,
                    "a partition moved from {before} to {after}, not to the newcomer"
                );
            }
            assert!(
                loads(&five).values().all(|l| (6..=7).contains(l)),
                "{five:?}"
            );
        }
    }

    #[test]
    fn the_hub_taking_over_a_dead_hubs_partition_kept_it_warm_and_each_partition_is_warm_twice() {
        for (partitions, n) in [(32, 3), (36, 6), (8, 3), (32, 4), (10, 2)] {
            for set in 0..20 {
                let ids: Vec<String> = (0..n).map(|i| format!("hub-{set}-{i}")).collect();
                let members = hubs(&ids);
                let owners = balanced_owners(partitions, &members, &[]);
                let holders: HashMap<u32, &str> = owners
                    .iter()
                    .enumerate()
                    .map(|(p, h)| (p as u32, h.as_str()))
                    .collect();
                let warm: BTreeMap<&str, Vec<u32>> = ids
                    .iter()
                    .map(|id| {
                        let w = warm_partitions(
                            id,
                            partitions,
                            Mode::MultiPrimary,
                            &members,
                            &holders,
                            50,
                        );
                        (id.as_str(), w)
                    })
                    .collect();
                for (p, owner) in owners.iter().enumerate() {
                    assert!(
                        warm[owner.as_str()].contains(&(p as u32)),
                        "its own are warm"
                    );
                }
                // Each partition is warm on two hubs: its owner and its one heir.
                let total: usize = warm.values().map(Vec::len).sum();
                assert_eq!(total, 2 * partitions as usize, "{warm:?}");
                // Whichever hub dies, every partition lands on a hub that kept it warm.
                for gone in &ids {
                    let rest: Vec<String> = ids.iter().filter(|i| *i != gone).cloned().collect();
                    let held: Vec<String> = owners
                        .iter()
                        .map(|o| if o == gone { "gone".into() } else { o.clone() })
                        .collect();
                    let after = balanced_owners(partitions, &hubs(&rest), &held);
                    for (p, owner) in after.iter().enumerate() {
                        assert!(
                            warm[owner.as_str()].contains(&(p as u32)),
                            "{gone} died: partition {p} went to {owner}, which kept {:?} warm",
                            warm[owner.as_str()]
                        );
                    }
                }
            }
        }
        // Static: primary and standby, whoever serves now.
        let members = vec![
            member("a", &[0, 1], &[2], 100),
            member("b", &[2], &[0, 1], 100),
        ];
        let w = warm_partitions("a", 4, Mode::Static, &members, &HashMap::new(), 50);
        assert_eq!(w, vec![0, 1, 2]);
    }

    #[test]
    fn holders_that_are_not_live_or_partitions_out_of_range_count_as_free() {
        let ids = ["a".to_string(), "b".to_string()];
        let held: Vec<String> = (0..4).map(|_| "gone".to_string()).collect();
        let owners = balanced_owners(4, &hubs(&ids), &held);
        assert_eq!(loads(&owners).values().copied().collect::<Vec<_>>(), [2, 2]);
        // A hub holding more than its share keeps its share and nothing else.
        let all_a: Vec<String> = (0..4).map(|_| "a".to_string()).collect();
        let owners = balanced_owners(4, &hubs(&ids), &all_a);
        assert_eq!(loads(&owners).values().copied().collect::<Vec<_>>(), [2, 2]);
        let holders: HashMap<u32, &str> = [(9, "a")].into();
        assert_eq!(
            desired_owners(2, &hubs(&ids), Mode::MultiPrimary, &holders, 50).len(),
            2
        );
    }

    fn lease(p: u32, holder: &str, expires_ms: i64) -> PartitionLease {
        PartitionLease {
            partition: p,
            holder: holder.into(),
            expires_ms,
            version: format!("v{p}"),
        }
    }

    #[test]
    fn a_hub_claims_free_or_expired_leases_renews_its_own_and_never_takes_a_live_one() {
        let members = vec![member("a", &[0], &[1], 1000), member("b", &[1], &[0], 1000)];
        let leases = vec![lease(0, "b", 1000)];
        // a is primary for 0 but b holds it unexpired: a waits; 1 is b's.
        assert_eq!(plan("a", 2, Mode::Static, &members, &leases, 500), vec![]);
        // b sees it should give 0 back, and claims its own 1 (no lease yet).
        assert_eq!(
            plan("b", 2, Mode::Static, &members, &leases, 500),
            vec![
                Action::Release {
                    partition: 0,
                    version: "v0".into()
                },
                Action::Claim {
                    partition: 1,
                    version: None
                },
            ]
        );
        // Once released (or expired), a claims it.
        let released = vec![lease(0, "", 0)];
        assert_eq!(
            plan("a", 2, Mode::Static, &members, &released, 500),
            vec![Action::Claim {
                partition: 0,
                version: Some("v0".into())
            }]
        );
        let expired = vec![lease(0, "b", 400)];
        assert_eq!(
            plan("a", 2, Mode::Static, &members, &expired, 500),
            vec![Action::Claim {
                partition: 0,
                version: Some("v0".into())
            }]
        );
        // The holder renews what it should keep.
        let mine = vec![lease(0, "a", 900)];
        assert_eq!(
            plan("a", 2, Mode::Static, &members, &mine, 500),
            vec![Action::Renew {
                partition: 0,
                version: "v0".into()
            }]
        );
    }

    #[test]
    fn a_standby_takes_over_when_the_primary_expires_and_hands_back_when_it_returns() {
        let lease_ms = 300;
        let primary_dead = vec![member("a", &[0], &[], 100), member("b", &[], &[0], 10_000)];
        let held_by_a = vec![lease(0, "a", 400)];
        // Primary's membership expired, but its partition lease not yet: the standby waits.
        assert_eq!(
            plan("b", 1, Mode::Static, &primary_dead, &held_by_a, 200),
            vec![]
        );
        assert_eq!(
            plan("b", 1, Mode::Static, &primary_dead, &held_by_a, 401),
            vec![Action::Claim {
                partition: 0,
                version: Some("v0".into())
            }]
        );
        let mut held = Held::default();
        held.confirm(0, 401, lease_ms);
        assert!(held.serves(0, 500));
        assert!(
            !held.serves(0, 401 + lease_ms * 2 / 3),
            "stops before the lease could pass on"
        );
        // The primary is back: the standby releases, the primary claims.
        let back = vec![
            member("a", &[0], &[], 10_000),
            member("b", &[], &[0], 10_000),
        ];
        let held_by_b = vec![lease(0, "b", 700)];
        assert_eq!(
            plan("b", 1, Mode::Static, &back, &held_by_b, 500),
            vec![Action::Release {
                partition: 0,
                version: "v0".into()
            }]
        );
        assert_eq!(plan("a", 1, Mode::Static, &back, &held_by_b, 500), vec![]);
    }

    #[test]
    fn partition_lists_parse_with_ranges_and_bounds() {
        assert_eq!(parse_partitions("0,2,5-7", 8).unwrap(), vec![0, 2, 5, 6, 7]);
        assert_eq!(parse_partitions("", 8).unwrap(), Vec::<u32>::new());
        assert!(
            parse_partitions("7-9", 8)
                .unwrap_err()
                .contains("within 0-7")
        );
        assert!(
            parse_partitions("x", 8)
                .unwrap_err()
                .contains("not a partition")
        );
        assert_eq!(format_partitions(&[1, 2]), "1,2");
    }
}
