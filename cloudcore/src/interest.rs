//! Which of the fleet's objects a hub keeps (pure): in a tier, only those of the nodes whose
//! partitions it serves.
//!
//! Three kinds grow with the fleet: Nodes, node Leases and the Pods bound to nodes. A hub
//! that cached all of them for every node of the tier held `hubs` copies of the fleet, the
//! first limit at 100,000 nodes; each hub also parsed every one of their writes. A hub now
//! keeps a fleet object only if its node's partition is *wanted*: in static mode the
//! partitions it is primary or standby for, in multi-primary mode those it serves and those
//! it would take over if any one other hub died ([`crate::partitions::warm_partitions`]).
//! Either way the hub that takes a dead hub's partition over already holds its objects and
//! lists nothing in the storm. Each fleet object is kept by two hubs, not by all of them.
//! Every other kind (ConfigMaps, Secrets, workloads, Models, Datasets, Devices) is still kept
//! whole: any node may need any of them.
//!
//! The wanted partitions change only in multi-primary mode, when hubs join, leave or die. A
//! gained partition's objects are not cached, so the fleet kinds are listed again (a
//! *generation*); until that list has completed for all three kinds the partition is
//! *loading*, and its nodes' sessions wait before they are sent their view: an empty view
//! would tell a node to delete what it runs. A dropped partition's objects are forgotten
//! once its nodes' sessions have ended.
//!
//! A node's partition is its partition label if it has one, else a hash of its name
//! ([`crate::partitions::partition_of_labelled`]). The label of every Node is kept, cached
//! or not (a few dozen bytes per node), so a Pod or Lease arriving for a node is judged right
//! and a node dialling the wrong hub is redirected right. A label that moves a node into a
//! wanted partition makes the node *pending* until the next list has brought its objects;
//! one that moves it out makes the hub forget them.
//!
//! Outside a tier everything is wanted, always loaded.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::router::Kind;

/// The kinds that grow with the fleet, in the order of [`Interest::listed`]'s slots.
pub const FLEET: [Kind; 3] = [Kind::Node, Kind::Lease, Kind::Pod];

/// What a hub keeps of the fleet, and what it has loaded.
#[derive(Debug)]
pub struct Interest {
    /// Partitions of the tier; 0 outside a tier (everything is wanted).
    partitions: u32,
    /// Partitions whose nodes' objects are kept (loaded or loading).
    wanted: BTreeSet<u32>,
    /// Wanted partitions not loaded yet → the generation whose lists load them.
    loading: BTreeMap<u32, u64>,
    /// Nodes moved into a wanted partition by a label change → the generation whose lists
    /// load their objects.
    pending: HashMap<Box<str>, u64>,
    /// Every Node seen, with its partition label if it has one.
    nodes: HashMap<Box<str>, Option<Box<str>>>,
    /// Lists asked for: the fleet kinds list again when it grows (0: none yet, the first
    /// waits for the tier's first round in multi-primary mode).
    generation: u64,
    /// For each of [`FLEET`], the last generation it listed completely.
    listed: [u64; 3],
}

/// What a change of the wanted partitions asks of the hub.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The fleet kinds must be listed again (the generation grew).
    pub relist: bool,
    /// Partitions no longer wanted: their nodes' objects are to be forgotten.
    pub dropped: Vec<u32>,
}

/// What a Node's arrival or change asks of the hub.
#[derive(Debug, PartialEq, Eq)]
pub enum NodeSeen {
    /// Keep its objects (its partition is wanted); nothing else changes.
    Keep,
    /// Do not keep it; nothing of it is kept.
    Skip,
    /// Its label moved it into a wanted partition: keep it, and list the fleet kinds again
    /// for its other objects (it is pending until then).
    KeepAndRelist,
    /// Its label moved it out of a wanted partition: end its session and forget its objects.
    Forget,
}

impl Interest {
    /// Outside a tier: every object is kept, every node is ready.
    pub fn everything() -> Self {
        Self {
            partitions: 0,
            wanted: BTreeSet::new(),
            loading: BTreeMap::new(),
            pending: HashMap::new(),
            nodes: HashMap::new(),
            generation: 1,
            listed: [0; 3],
        }
    }

    /// In a tier of `partitions`: `wanted` known from the start (static mode: primary and
    /// standby), loaded by the first lists; `None` (multi-primary): known after the tier's
    /// first round ([`Interest::want`]), and nothing is listed before.
    pub fn tier(partitions: u32, wanted: Option<&[u32]>) -> Self {
        let mut me = Self {
            partitions: partitions.max(1),
            ..Self::everything()
        };
        me.generation = 0;
        if let Some(w) = wanted {
            me.want(w);
        }
        me
    }

    /// The generation the fleet kinds should have listed (0: do not list yet).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The partition of `node` (0 outside a tier).
    pub fn partition(&self, node: &str) -> u32 {
        if self.partitions == 0 {
            return 0;
        }
        crate::partitions::partition_of_labelled(node, self.label(node), self.partitions)
    }

    /// The partition label of `node`'s Node, if it has one.
    pub fn label(&self, node: &str) -> Option<&str> {
        self.nodes.get(node)?.as_deref()
    }

    /// Whether the objects of `node` are kept.
    pub fn keeps(&self, node: &str) -> bool {
        self.partitions == 0 || self.wanted.contains(&self.partition(node))
    }

    /// Whether everything of `node` is loaded: a session may be sent its view, the lifecycle
    /// may judge it.
    pub fn ready(&self, node: &str) -> bool {
        if self.partitions == 0 {
            return true;
        }
        let p = self.partition(node);
        self.wanted.contains(&p)
            && !self.loading.contains_key(&p)
            && !self.pending.contains_key(node)
    }

    /// The partitions wanted now. New ones load with the next generation; dropped ones are
    /// returned, to be forgotten. The first call always starts the first generation.
    pub fn want(&mut self, partitions: &[u32]) -> Wanted {
        if self.partitions == 0 {
            return Wanted::default();
        }
        let now: BTreeSet<u32> = partitions
            .iter()
            .copied()
            .filter(|p| *p < self.partitions)
            .collect();
        let dropped: Vec<u32> = self.wanted.difference(&now).copied().collect();
        let gained: Vec<u32> = now.difference(&self.wanted).copied().collect();
        let relist = !gained.is_empty() || self.generation == 0;
        if relist {
            self.generation += 1;
        }
        for p in &dropped {
            self.loading.remove(p);
        }
        for p in gained {
            self.loading.insert(p, self.generation);
        }
        self.wanted = now;
        Wanted { relist, dropped }
    }

    /// `kind` (one of [`FLEET`]) has listed completely for `generation`. Returns whether
    /// some partition or node became ready.
    pub fn listed(&mut self, kind: Kind, generation: u64) -> bool {
        let Some(i) = FLEET.iter().position(|k| *k == kind) else {
            return false;
        };
        self.listed[i] = self.listed[i].max(generation);
        let all = self.listed.iter().copied().min().unwrap_or(0);
        let before = self.loading.len() + self.pending.len();
        self.loading.retain(|_, g| *g > all);
        self.pending.retain(|_, g| *g > all);
        self.loading.len() + self.pending.len() < before
    }

    /// A Node arrived or changed, with this partition label. A Node seen for the first time
    /// counts as moved from the partition of its name's hash: its Pods and Lease, arriving
    /// first, were judged by it.
    pub fn node_seen(&mut self, node: &str, label: Option<&str>) -> NodeSeen {
        let before = match self.nodes.get(node) {
            Some(l) => self.keeps_labelled(node, l.as_deref()),
            None => self.keeps_labelled(node, None),
        };
        if self.nodes.get(node).map(Option::as_deref) != Some(label) {
            self.nodes.insert(node.into(), label.map(Into::into));
        }
        let now = self.keeps(node);
        match (before, now) {
            (false, true) => {
                self.generation += 1;
                self.pending.insert(node.into(), self.generation);
                NodeSeen::KeepAndRelist
            }
            (true, false) => {
                self.pending.remove(node);
                NodeSeen::Forget
            }
            (true, true) => NodeSeen::Keep,
            (false, false) => NodeSeen::Skip,
        }
    }

    fn keeps_labelled(&self, node: &str, label: Option<&str>) -> bool {
        self.partitions == 0
            || self
                .wanted
                .contains(&crate::partitions::partition_of_labelled(
                    node,
                    label,
                    self.partitions,
                ))
    }

    /// A Node was deleted.
    pub fn node_gone(&mut self, node: &str) {
        self.nodes.remove(node);
        self.pending.remove(node);
    }

    /// Every Node seen and not deleted.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(|n| &**n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node name whose hash falls in partition `p` of `of`.
    fn node_in(p: u32, of: u32) -> String {
        (0..)
            .map(|i| format!("n{i}"))
            .find(|n| crate::partitions::partition_of_labelled(n, None, of) == p)
            .unwrap_or_default()
    }

    fn list_all(i: &mut Interest, generation: u64) -> bool {
        FLEET
            .iter()
            .map(|k| i.listed(*k, generation))
            .fold(false, |a, b| a | b)
    }

    #[test]
    fn outside_a_tier_everything_is_kept_and_ready() {
        let mut i = Interest::everything();
        assert_eq!(i.generation(), 1);
        assert_eq!(i.node_seen("a", Some("3")), NodeSeen::Keep);
        assert!(i.keeps("a") && i.ready("a") && i.keeps("b") && i.ready("b"));
        assert_eq!(i.want(&[1]), Wanted::default());
        assert!(i.keeps("b"));
    }

    #[test]
    fn a_static_hub_keeps_its_primary_and_standby_partitions_once_listed() {
        let mut i = Interest::tier(4, Some(&[0, 2]));
        assert_eq!(i.generation(), 1);
        let (n0, n1, n2) = (node_in(0, 4), node_in(1, 4), node_in(2, 4));
        assert!(i.keeps(&n0) && i.keeps(&n2) && !i.keeps(&n1));
        assert!(!i.ready(&n0), "not before the first lists");
        assert!(!i.listed(Kind::Node, 1) && !i.listed(Kind::Lease, 1));
        assert!(!i.ready(&n0), "not before all three kinds listed");
        assert!(!i.listed(Kind::ConfigMap, 1), "other kinds do not count");
        assert!(i.listed(Kind::Pod, 1));
        assert!(i.ready(&n0) && i.ready(&n2) && !i.ready(&n1));
        // The same set again asks nothing.
        assert_eq!(i.want(&[2, 0]), Wanted::default());
        assert_eq!(i.generation(), 1);
    }

    #[test]
    fn multi_primary_lists_nothing_before_its_first_round_then_loads_what_it_gains() {
        let mut i = Interest::tier(4, None);
        assert_eq!(
            i.generation(),
            0,
            "nothing is listed before the first round"
        );
        // A first round that wins nothing still starts the lists (labels, revocations).
        assert_eq!(
            i.want(&[]),
            Wanted {
                relist: true,
                dropped: vec![]
            }
        );
        assert_eq!(i.generation(), 1);
        list_all(&mut i, 1);
        let (n1, n3) = (node_in(1, 4), node_in(3, 4));
        assert!(!i.keeps(&n1));
        // Gaining 1 and 3: kept at once (live events are cached), ready after the relist.
        let w = i.want(&[1, 3]);
        assert!(w.relist && w.dropped.is_empty());
        assert_eq!(i.generation(), 2);
        assert!(i.keeps(&n1) && !i.ready(&n1));
        assert!(!list_all(&mut i, 1), "an older list does not load them");
        assert!(!i.ready(&n3));
        assert!(list_all(&mut i, 2));
        assert!(i.ready(&n1) && i.ready(&n3));
        // Losing 1: dropped, neither kept nor ready; no list needed.
        assert_eq!(
            i.want(&[3]),
            Wanted {
                relist: false,
                dropped: vec![1]
            }
        );
        assert!(!i.keeps(&n1) && !i.ready(&n1) && i.ready(&n3));
        // Out of range partitions are ignored.
        assert_eq!(i.want(&[3, 9]), Wanted::default());
    }

    #[test]
    fn a_partition_lost_while_loading_and_won_back_waits_for_the_newer_list() {
        let mut i = Interest::tier(4, None);
        i.want(&[0]);
        let n0 = node_in(0, 4);
        i.want(&[]);
        assert!(i.want(&[0]).relist);
        assert_eq!(i.generation(), 2);
        list_all(&mut i, 1);
        assert!(!i.ready(&n0), "the list of generation 1 may have missed it");
        list_all(&mut i, 2);
        assert!(i.ready(&n0));
    }

    #[test]
    fn a_label_moving_a_node_in_or_out_of_a_wanted_partition_relists_or_forgets() {
        let mut i = Interest::tier(4, Some(&[2]));
        list_all(&mut i, 1);
        let n0 = node_in(0, 4);
        assert_eq!(i.node_seen(&n0, None), NodeSeen::Skip);
        assert_eq!(i.partition(&n0), 0);
        // Labelled into partition 2: kept, pending until the next lists.
        assert_eq!(i.node_seen(&n0, Some("2")), NodeSeen::KeepAndRelist);
        assert_eq!(i.label(&n0), Some("2"));
        assert_eq!(i.generation(), 2);
        assert!(i.keeps(&n0) && !i.ready(&n0));
        assert_eq!(
            i.node_seen(&n0, Some("2")),
            NodeSeen::Keep,
            "no change, no list"
        );
        list_all(&mut i, 2);
        assert!(i.ready(&n0));
        // A label naming no partition in range counts as none.
        assert_eq!(i.node_seen(&n0, Some("99")), NodeSeen::Forget);
        assert!(!i.keeps(&n0));
        // A node first seen: judged against its name's partition, by which its Pods and
        // Lease may have been skipped already.
        let n2 = node_in(2, 4);
        assert_eq!(i.node_seen(&n2, Some("2")), NodeSeen::Keep);
        assert!(i.ready(&n2));
        let other = node_in(1, 4);
        assert_eq!(i.node_seen(&other, Some("2")), NodeSeen::KeepAndRelist);
        assert!(!i.ready(&other));
        let n3 = node_in(3, 4);
        assert_eq!(i.node_seen(&n3, Some("1")), NodeSeen::Skip);
        i.node_gone(&other);
        i.node_gone(&n2);
        assert_eq!(i.label(&other), None);
        let mut seen: Vec<&str> = i.nodes().collect();
        seen.sort();
        let mut want = vec![n0.as_str(), n3.as_str()];
        want.sort();
        assert_eq!(seen, want);
    }
}
