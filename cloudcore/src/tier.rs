//! The tokio shell of the hub tier (see [`crate::partitions`]): renews this hub's membership
//! Lease, reads the tier's Leases, writes what [`crate::partitions::plan`] says, and keeps what
//! the hub serves and where every partition is served.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::{ListParams, PostParams};

use crate::partitions::{
    self, ADDRESS_ANNOTATION, Action, Held, MEMBER_LABEL, Member, Mode, PARTITION_LEASE_LABEL,
    PRIMARY_ANNOTATION, PartitionLease, STANDBY_ANNOTATION,
};

/// Where the tier's Leases live.
pub const NAMESPACE: &str = "kube-system";

/// This hub's place in a tier of hubs.
#[derive(Clone, Debug)]
pub struct TierConfig {
    /// This hub's id (a DNS label, unique in the tier).
    pub id: String,
    /// Where edges reach this hub (`host:port`), told to edges redirected here.
    pub address: String,
    /// Partitions of the tier (every hub must agree).
    pub partitions: u32,
    /// Static partitions or every hub active.
    pub mode: Mode,
    /// Static mode: the partitions this hub is primary for.
    pub primary: Vec<u32>,
    /// Static mode: the partitions this hub is standby for.
    pub standby: Vec<u32>,
    /// Duration of the membership and partition Leases; renewed three times per duration.
    pub lease: Duration,
}

/// Where a node's session belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// This hub serves the node's partition.
    Here,
    /// Another hub does.
    Elsewhere {
        /// The partition.
        partition: u32,
        /// The hub's id.
        hub: String,
        /// Where edges reach it.
        address: String,
    },
    /// Nobody does yet (a takeover is under way).
    Nobody {
        /// The partition.
        partition: u32,
        /// When to try again (see [`partitions::retry_after`]).
        retry_after: Duration,
        /// Where the partition should be served by then (the hub the tier's rules choose
        /// among the members live now, leaving out the one the node could not reach), if
        /// known.
        successor: Option<String>,
    },
}

#[derive(Default)]
struct State {
    held: Held,
    /// Partition → (hub id, address), from the last read.
    owners: HashMap<u32, (String, String)>,
    /// Partition → when its Lease expires (unix ms), from the last read.
    expires: HashMap<u32, i64>,
    /// The tier's members, from the last read.
    members: Vec<partitions::Member>,
    /// Partitions to keep warm besides those served ([`partitions::warm_partitions`]), from
    /// the last read.
    warm: Vec<u32>,
}

/// The tier as this hub knows it.
pub struct Tier {
    config: TierConfig,
    state: Mutex<State>,
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

impl Tier {
    pub(crate) fn new(config: TierConfig) -> Self {
        Self {
            config,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The partition of a node with these labels.
    pub fn partition_of(&self, node: &str, labels: Option<&BTreeMap<String, String>>) -> u32 {
        partitions::partition_of(node, labels, self.config.partitions)
    }

    /// Whether this hub serves the partition of `node` now, given its partition label's
    /// value (as [`Tier::place`] answering [`Placement::Here`]).
    pub fn serves_node(&self, node: &str, label: Option<&str>) -> bool {
        let partition = partitions::partition_of_labelled(node, label, self.config.partitions);
        self.state().held.serves(partition, now_ms())
    }

    /// Where the node's session belongs now, given its partition label's value. `unreachable`
    /// is a hub address the node says it was sent to and could not reach: a node of a
    /// partition held there is told to come back when the partition can be claimed instead (a
    /// node can only delay itself with it).
    pub fn place(&self, node: &str, label: Option<&str>, unreachable: Option<&str>) -> Placement {
        let partition = partitions::partition_of_labelled(node, label, self.config.partitions);
        let state = self.state();
        if state.held.serves(partition, now_ms()) {
            return Placement::Here;
        }
        match state.owners.get(&partition) {
            Some((hub, address))
                if *hub != self.config.id && Some(address.as_str()) != unreachable =>
            {
                Placement::Elsewhere {
                    partition,
                    hub: hub.clone(),
                    address: address.clone(),
                }
            }
            _ => {
                let now = now_ms();
                let retry_after = partitions::retry_after(
                    state.expires.get(&partition).copied(),
                    now,
                    self.config.lease,
                );
                // Among the hubs live now, leaving out the one the node could not reach (its
                // membership still reads as live until its Lease runs out).
                let candidates: Vec<partitions::Member> = state
                    .members
                    .iter()
                    .filter(|m| Some(m.address.as_str()) != unreachable)
                    .cloned()
                    .collect();
                let holders: HashMap<u32, &str> = state
                    .owners
                    .iter()
                    .map(|(p, (hub, _))| (*p, hub.as_str()))
                    .collect();
                let successor = partitions::desired_owners(
                    self.config.partitions,
                    &candidates,
                    self.config.mode,
                    &holders,
                    now,
                )
                .get(partition as usize)
                .copied()
                .flatten()
                .map(|m| m.address.clone());
                Placement::Nobody {
                    partition,
                    retry_after,
                    successor,
                }
            }
        }
    }

    /// Which hub serves each partition, as last read (this hub's own from its renewals).
    pub fn owners(&self) -> BTreeMap<u32, String> {
        let state = self.state();
        let mut owners: BTreeMap<u32, String> = state
            .owners
            .iter()
            .map(|(p, (hub, _))| (*p, hub.clone()))
            .collect();
        for p in state.held.partitions(now_ms()) {
            owners.insert(p, self.config.id.clone());
        }
        owners
    }

    /// The partitions this hub serves now.
    pub fn served(&self) -> Vec<u32> {
        self.state().held.partitions(now_ms())
    }

    /// The partitions whose nodes' objects this hub keeps: those it serves, and those it
    /// would serve next ([`partitions::warm_partitions`]).
    pub fn kept(&self) -> Vec<u32> {
        let state = self.state();
        let mut kept = state.held.partitions(now_ms());
        kept.extend(&state.warm);
        kept.sort_unstable();
        kept.dedup();
        kept
    }
}

fn lease_ms(l: &Lease) -> Option<i64> {
    let spec = l.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0.as_millisecond();
    Some(renewed + i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000)
}

/// A membership Lease as a member; its partition lists count only within `partitions` (a
/// list naming others, or a range past them, is ignored rather than expanded).
fn member_of(l: &Lease, partitions: u32) -> Option<Member> {
    let a = l.metadata.annotations.as_ref()?;
    let list = |key: &str| {
        a.get(key)
            .map(|v| partitions::parse_partitions(v, partitions).unwrap_or_default())
            .unwrap_or_default()
    };
    Some(Member {
        id: l.spec.as_ref()?.holder_identity.clone()?,
        address: a.get(ADDRESS_ANNOTATION)?.clone(),
        primary: list(PRIMARY_ANNOTATION),
        standby: list(STANDBY_ANNOTATION),
        expires_ms: lease_ms(l)?,
    })
}

fn partition_lease_of(l: &Lease) -> Option<PartitionLease> {
    let name = l.metadata.name.as_deref()?;
    let partition = name.strip_prefix("sedna-partition-")?.parse().ok()?;
    Some(PartitionLease {
        partition,
        holder: l
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default(),
        expires_ms: lease_ms(l).unwrap_or(0),
        version: l.metadata.resource_version.clone().unwrap_or_default(),
    })
}

fn micro(ms: i64) -> Option<MicroTime> {
    jiff::Timestamp::from_millisecond(ms).ok().map(MicroTime)
}

fn lease(
    name: String,
    label: &str,
    holder: &str,
    sent_ms: i64,
    duration: Duration,
    version: Option<String>,
    annotations: Option<BTreeMap<String, String>>,
) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(NAMESPACE.into()),
            labels: Some([(label.to_string(), "true".to_string())].into()),
            annotations,
            resource_version: version,
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(duration.as_secs().max(1) as i32),
            renew_time: micro(sent_ms),
            acquire_time: micro(sent_ms),
            ..Default::default()
        }),
    }
}

/// Writes `l` (a replace when it carries a resourceVersion, else a create); the version the
/// API gave it.
async fn write(api: &Api<Lease>, l: &Lease) -> Result<String, kube::Error> {
    let name = l.metadata.name.clone().unwrap_or_default();
    let written = if l.metadata.resource_version.is_some() {
        api.replace(&name, &PostParams::default(), l).await?
    } else {
        api.create(&PostParams::default(), l).await?
    };
    Ok(written.metadata.resource_version.unwrap_or_default())
}

/// The resourceVersions of the Leases this hub last wrote: its next renewals replace them
/// without reading them first.
#[derive(Default)]
struct Written {
    member: Option<String>,
    partitions: HashMap<u32, String>,
}

/// Renews this hub's membership Lease (`version`: the one it last wrote; read first when
/// unknown); the version written.
async fn renew_membership(
    api: &Api<Lease>,
    c: &TierConfig,
    version: Option<String>,
    sent: i64,
) -> Result<String, kube::Error> {
    let name = partitions::member_lease_name(&c.id);
    let version = match version {
        Some(v) => Some(v),
        None => api
            .get_opt(&name)
            .await?
            .and_then(|l| l.metadata.resource_version),
    };
    let annotations: BTreeMap<String, String> = [
        (ADDRESS_ANNOTATION.to_string(), c.address.clone()),
        (
            PRIMARY_ANNOTATION.to_string(),
            partitions::format_partitions(&c.primary),
        ),
        (
            STANDBY_ANNOTATION.to_string(),
            partitions::format_partitions(&c.standby),
        ),
    ]
    .into();
    let membership = lease(
        name,
        MEMBER_LABEL,
        &c.id,
        sent,
        c.lease,
        version,
        Some(annotations),
    );
    write(api, &membership).await
}

/// Writes partition `p`'s Lease for `holder` (empty: released) over `version`, waiting no
/// longer than `deadline`; the version written, and when the write was sent (unix ms).
async fn write_partition(
    api: &Api<Lease>,
    c: &TierConfig,
    p: u32,
    holder: &str,
    version: Option<String>,
    deadline: Duration,
) -> (u32, i64, Option<String>) {
    let at = now_ms();
    let l = lease(
        partitions::partition_lease_name(p),
        PARTITION_LEASE_LABEL,
        holder,
        at,
        c.lease,
        version,
        None,
    );
    match tokio::time::timeout(deadline, write(api, &l)).await {
        Ok(Ok(v)) => (p, at, Some(v)),
        Ok(Err(e)) => {
            tracing::debug!(partition = p, error = %e, "partition lease write lost");
            (p, at, None)
        }
        Err(_) => {
            tracing::warn!(partition = p, "partition lease write timed out");
            (p, at, None)
        }
    }
}

/// Runs the tier: every third of the lease duration, and just after another hub's Lease
/// runs out ([`partitions::next_expiry`]), a round. A round first renews what this hub holds
/// (its membership and the partitions it serves, over the versions it last wrote) while it
/// reads the tier's Leases; then it writes what [`partitions::plan`] says beyond those
/// renewals (claims, releases, renewals that could not go over a known version). So a slow
/// API server delays a renewal by one request, not by the round's reads: a hub keeps its
/// partitions as long as one request takes less than the time it may still serve them.
/// `on_change` is called with the partitions whose objects this hub keeps ([`Tier::kept`]) and
/// those it stopped serving (their sessions must end): after every round, and after each
/// claim (a partition claimed cold is then listed without waiting for the round's other
/// writes).
pub(crate) async fn run(
    tier: std::sync::Arc<Tier>,
    client: kube::Client,
    stats: std::sync::Arc<crate::HubStats>,
    on_change: impl Fn(&[u32], &[u32]),
) {
    let api: Api<Lease> = Api::namespaced(client, NAMESPACE);
    let c = tier.config.clone();
    let lease_ms = c.lease.as_millis() as i64;
    let mut tick = tokio::time::interval(c.lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving: Vec<u32> = Vec::new();
    let mut wake_at: Option<i64> = None;
    let mut written = Written::default();
    loop {
        let early =
            wake_at.map(|at| Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64));
        tokio::select! {
            _ = tick.tick() => {}
            _ = async {
                match early {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let sent = now_ms();
        // Renewals over known versions, each given the time its partition may still be
        // served (a renewal confirmed later would confirm nothing), while the tier is read.
        let renewals: Vec<(u32, String, Duration)> = {
            let state = tier.state();
            state
                .held
                .partitions(sent)
                .into_iter()
                .filter_map(|p| {
                    let version = written.partitions.get(&p)?.clone();
                    let left = state.held.until(p)?.saturating_sub(sent).max(0) as u64;
                    Some((p, version, Duration::from_millis(left)))
                })
                .collect()
        };
        // Nothing read or written past the serving window is of use to this round.
        let window = c.lease * 2 / 3;
        let (member_leases, partition_leases) = (
            ListParams::default().labels(MEMBER_LABEL),
            ListParams::default().labels(PARTITION_LEASE_LABEL),
        );
        let (membership, renewed, reads) = tokio::join!(
            tokio::time::timeout(
                window,
                renew_membership(&api, &c, written.member.take(), sent)
            ),
            futures_util::future::join_all(renewals.into_iter().map(|(p, v, deadline)| {
                write_partition(&api, &c, p, &c.id, Some(v), deadline)
            })),
            tokio::time::timeout(window, async {
                tokio::try_join!(api.list(&member_leases), api.list(&partition_leases),)
            })
        );
        match membership {
            Ok(Ok(v)) => written.member = Some(v),
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing this hub's membership lease"),
            Err(_) => tracing::warn!("renewing this hub's membership lease timed out"),
        }
        let mut renewed_now = std::collections::HashSet::new();
        for (p, at, version) in renewed {
            match version {
                Some(v) => {
                    tier.state().held.confirm(p, at, lease_ms);
                    written.partitions.insert(p, v);
                    renewed_now.insert(p);
                }
                None => {
                    written.partitions.remove(&p);
                }
            }
        }
        let (members, leases) = match reads {
            Ok(Ok((m, p))) => (
                m.items
                    .iter()
                    .filter_map(|l| member_of(l, c.partitions))
                    .collect::<Vec<_>>(),
                p.items
                    .iter()
                    .filter_map(partition_lease_of)
                    .collect::<Vec<_>>(),
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the tier's leases");
                continue;
            }
            Err(_) => {
                tracing::warn!("reading the tier's leases timed out");
                continue;
            }
        };
        wake_at = partitions::next_expiry(&c.id, &members, &leases, sent);
        let actions = partitions::plan(&c.id, c.partitions, c.mode, &members, &leases, sent);
        let warm = {
            let holders: HashMap<u32, &str> = leases
                .iter()
                .filter_map(|l| Some((l.partition, l.holder_at(sent)?)))
                .collect();
            partitions::warm_partitions(&c.id, c.partitions, c.mode, &members, &holders, sent)
        };
        tier.state().warm = warm;
        // The plan's other writes at once, each timed from just before it is sent and
        // bounded by a renewal period, so a loaded API server delays one round, not the next.
        let releasing: Vec<u32> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Release { partition, .. } => Some(*partition),
                _ => None,
            })
            .collect();
        let writes = actions
            .into_iter()
            .filter(|a| match a {
                Action::Renew { partition, .. } => !renewed_now.contains(partition),
                _ => true,
            })
            .map(|action| {
                let (p, version, holder) = match &action {
                    Action::Claim { partition, version } => {
                        (*partition, version.clone(), c.id.clone())
                    }
                    Action::Renew { partition, version } => {
                        (*partition, Some(version.clone()), c.id.clone())
                    }
                    // The list may predate this round's renewal: release over what was
                    // written last.
                    Action::Release { partition, version } => (
                        *partition,
                        Some(
                            written
                                .partitions
                                .get(partition)
                                .filter(|_| renewed_now.contains(partition))
                                .unwrap_or(version)
                                .clone(),
                        ),
                        String::new(),
                    ),
                };
                // Releasing: stop serving before the write lets another hub claim.
                if holder.is_empty() {
                    tier.state().held.drop_partition(p);
                }
                let (api, tier, c, on_change) = (&api, &tier, &c, &on_change);
                async move {
                    let (_, at, written) =
                        write_partition(api, c, p, &holder, version, c.lease / 3).await;
                    let outcome = match written {
                        Some(v) if !holder.is_empty() => {
                            tier.state().held.confirm(p, at, lease_ms);
                            if matches!(action, Action::Claim { .. }) {
                                tracing::info!(hub = %c.id, partition = p, "partition claimed");
                                on_change(&tier.kept(), &[]);
                            }
                            Some(v)
                        }
                        Some(_) => {
                            tracing::info!(hub = %c.id, partition = p, "partition released");
                            None
                        }
                        None => None,
                    };
                    (p, outcome)
                }
            });
        for (p, version) in futures_util::future::join_all(writes).await {
            match version {
                Some(v) => written.partitions.insert(p, v),
                None => written.partitions.remove(&p),
            };
        }
        // Where each partition is served, for redirects.
        let addresses: HashMap<&str, &str> = members
            .iter()
            .filter(|m| m.live(sent))
            .map(|m| (m.id.as_str(), m.address.as_str()))
            .collect();
        let owners: HashMap<u32, (String, String)> = leases
            .iter()
            .filter_map(|l| {
                let holder = l.holder_at(sent)?;
                let address = addresses.get(holder)?;
                Some((l.partition, (holder.to_string(), address.to_string())))
            })
            .collect();
        let now_serving = {
            let mut state = tier.state();
            state.owners = owners;
            state.expires = leases.iter().map(|l| (l.partition, l.expires_ms)).collect();
            state.members = members.clone();
            state.held.partitions(now_ms())
        };
        let kept = tier.kept();
        let gone: Vec<u32> = serving
            .iter()
            .filter(|p| !now_serving.contains(p))
            .copied()
            .collect();
        stats.partitions_served.store(
            now_serving.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let lost = gone.iter().filter(|p| !releasing.contains(p)).count();
        if lost > 0 {
            tracing::warn!(hub = %c.id, lost, "partitions not renewed in time: no longer served");
            stats
                .partitions_lost
                .fetch_add(lost as u64, std::sync::atomic::Ordering::Relaxed);
        }
        on_change(&kept, &gone);
        serving = now_serving;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_could_not_reach_the_owner_is_told_when_to_come_back_not_sent_there_again() {
        let tier = Tier::new(TierConfig {
            id: "h1".into(),
            address: "127.0.0.1:1".into(),
            partitions: 4,
            mode: Mode::MultiPrimary,
            primary: vec![],
            standby: vec![],
            lease: Duration::from_secs(15),
        });
        let node = (0..)
            .map(|i| format!("n{i}"))
            .find(|n| tier.partition_of(n, None) == 2)
            .unwrap();
        {
            let mut state = tier.state();
            state.owners.insert(2, ("h2".into(), "127.0.0.1:2".into()));
            state.expires.insert(2, now_ms() + 10_000);
        }
        assert_eq!(
            tier.place(&node, None, None),
            Placement::Elsewhere {
                partition: 2,
                hub: "h2".into(),
                address: "127.0.0.1:2".into()
            }
        );
        assert_eq!(
            tier.place(&node, None, Some("127.0.0.1:3")),
            tier.place(&node, None, None),
            "another unreachable address changes nothing"
        );
        match tier.place(&node, None, Some("127.0.0.1:2")) {
            Placement::Nobody {
                partition: 2,
                retry_after,
                successor: None,
            } => assert!(
                (Duration::from_secs(10)..=Duration::from_secs(11)).contains(&retry_after),
                "{retry_after:?}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_node_told_to_wait_is_told_which_hub_serves_it_by_then() {
        let tier = Tier::new(TierConfig {
            id: "h1".into(),
            address: "127.0.0.1:1".into(),
            partitions: 8,
            mode: Mode::MultiPrimary,
            primary: vec![],
            standby: vec![],
            lease: Duration::from_secs(15),
        });
        let member = |id: &str, address: &str, expires_ms: i64| partitions::Member {
            id: id.into(),
            address: address.into(),
            primary: vec![],
            standby: vec![],
            expires_ms,
        };
        let now = now_ms();
        // h2 died (its membership runs out in 10 s); h1 and h3 live on.
        let members = vec![
            member("h1", "127.0.0.1:1", now + 15_000),
            member("h2", "127.0.0.1:2", now + 10_000),
            member("h3", "127.0.0.1:3", now + 15_000),
        ];
        // A partition of the dead hub whose desired owner after it is h3, one whose is h1.
        let live = [members[0].clone(), members[2].clone()];
        let after = |p: u32| {
            partitions::desired_owners(8, &live, Mode::MultiPrimary, &HashMap::new(), now)
                [p as usize]
                .map(|m| m.address.clone())
        };
        let node_in = |p: u32| {
            (0..)
                .map(|i| format!("n{i}"))
                .find(|n| tier.partition_of(n, None) == p)
                .unwrap()
        };
        {
            let mut state = tier.state();
            state.members = members.clone();
            for p in 0..8 {
                state.owners.insert(p, ("h2".into(), "127.0.0.1:2".into()));
                state.expires.insert(p, now + 10_000);
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in 0..8 {
            match tier.place(&node_in(p), None, Some("127.0.0.1:2")) {
                Placement::Nobody {
                    partition,
                    successor,
                    ..
                } => {
                    assert_eq!(partition, p);
                    assert_eq!(successor, after(p), "partition {p}");
                    assert_ne!(successor.as_deref(), Some("127.0.0.1:2"));
                    seen.extend(successor);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen.len(), 2, "both live hubs take some: {seen:?}");
    }

    #[test]
    fn a_membership_lease_naming_partitions_out_of_range_is_not_expanded() {
        let annotations: BTreeMap<String, String> = [
            (ADDRESS_ANNOTATION.to_string(), "127.0.0.1:1".to_string()),
            (PRIMARY_ANNOTATION.to_string(), "0-4294967294".to_string()),
            (STANDBY_ANNOTATION.to_string(), "1,3".to_string()),
        ]
        .into();
        let l = lease(
            partitions::member_lease_name("h1"),
            MEMBER_LABEL,
            "h1",
            1_000,
            Duration::from_secs(15),
            None,
            Some(annotations),
        );
        let m = member_of(&l, 16).unwrap();
        assert!(
            m.primary.is_empty(),
            "a range past the tier's 16 is ignored"
        );
        assert_eq!(m.standby, vec![1, 3]);
        assert_eq!(m.expires_ms, 16_000);
    }
}
