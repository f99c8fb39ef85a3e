//! A tier of hubs in one process, with the embedded API server and real edge clients on
//! 127.0.0.1: partitions negotiated through Leases, nodes redirected to the hub that serves
//! them, a stopped hub's nodes taken over, a new hub given its share, and a standby handing
//! its partitions back to the primary — with a sampler asserting all along that no partition
//! and no node is ever served by two hubs at once — and a storm: a stopped hub's nodes all
//! back within a stated time, at the surviving hub's bounded handshake rate, waiting for a
//! handshake slot rather than refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use sedna_cloudcore::partitions::Mode;
use sedna_cloudcore::tier::TierConfig;
use sedna_cloudcore::{Hub, HubConfig};
use sedna_edgecore::EdgeHub;

mod support;

const PARTITIONS: u32 = 8;
const LEASE: Duration = Duration::from_secs(3);

type Hubs = Arc<Mutex<BTreeMap<String, Hub>>>;

struct Tier {
    api: sedna_apiserver::ApiServer,
    client: kube::Client,
    dir: tempfile::TempDir,
    hubs: Hubs,
    addrs: BTreeMap<String, std::net::SocketAddr>,
    mode: Mode,
}

impl Tier {
    async fn start(mode: Mode) -> Tier {
        let dir = tempfile::tempdir().unwrap();
        let (api, client) = support::embedded_api(dir.path(), false).await;
        Tier {
            api,
            client,
            dir,
            hubs: Arc::default(),
            addrs: BTreeMap::new(),
            mode,
        }
    }

    /// Starts hub `id` (on its earlier address when it ran before); every hub shares one CA.
    async fn hub(&mut self, id: &str, primary: &[u32], standby: &[u32]) {
        self.hub_with(id, primary, standby, |_| {}).await;
    }

    /// [`Tier::hub`], with its configuration adjusted by `adjust`.
    async fn hub_with(
        &mut self,
        id: &str,
        primary: &[u32],
        standby: &[u32],
        adjust: impl FnOnce(&mut HubConfig),
    ) {
        let client = self.client.clone();
        self.hub_on(id, primary, standby, adjust, client).await;
    }

    /// [`Tier::hub_with`], the hub reaching the API server through `client`.
    async fn hub_on(
        &mut self,
        id: &str,
        primary: &[u32],
        standby: &[u32],
        adjust: impl FnOnce(&mut HubConfig),
        client: kube::Client,
    ) {
        let listen = self
            .addrs
            .get(id)
            .copied()
            .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
        let mut c = HubConfig::new(self.dir.path().join("hub"));
        c.listen = listen;
        c.session.heartbeat = Duration::from_millis(200);
        c.session.read_deadline = Duration::from_millis(1500);
        c.lifecycle = None;
        // The address is known once bound: start, read it, and it is the advertised one
        // (the listener binds before the tier loop first writes).
        let probe = std::net::TcpListener::bind(listen).unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        c.listen = addr;
        c.tier = Some(TierConfig {
            id: id.into(),
            address: addr.to_string(),
            partitions: PARTITIONS,
            mode: self.mode,
            primary: primary.to_vec(),
            standby: standby.to_vec(),
            lease: LEASE,
        });
        adjust(&mut c);
        let hub = Hub::start(c, client).await.unwrap();
        self.addrs.insert(id.into(), hub.addr());
        self.hubs.lock().unwrap().insert(id.into(), hub);
    }

    async fn stop(&self, id: &str) {
        let hub = self.hubs.lock().unwrap().remove(id).unwrap();
        hub.shutdown().await;
    }

    fn seeds(&self, first: &str) -> String {
        let mut list = vec![self.addrs[first].to_string()];
        list.extend(
            self.addrs
                .iter()
                .filter(|(id, _)| *id != first)
                .map(|(_, a)| a.to_string()),
        );
        list.join(",")
    }

    async fn edge(&self, node: &str, seeds: &str) -> EdgeHub {
        self.edge_from(node, seeds, None).await
    }

    /// [`Tier::edge`], connecting from `source`.
    async fn edge_from(
        &self,
        node: &str,
        seeds: &str,
        source: Option<std::net::IpAddr>,
    ) -> EdgeHub {
        let token =
            sedna_cloudcore::tokens::create(&self.client, Some(node), Duration::from_secs(600))
                .await
                .unwrap()
                .to_string();
        let dir = self.dir.path().join("edges").join(node);
        let first = seeds.split(',').next().unwrap();
        sedna_edgecore::join::join(first, &token, node, &dir)
            .await
            .unwrap();
        let mut config = support::fast_edge(seeds, &dir, node);
        config.in_memory = true;
        config.source_address = source;
        EdgeHub::start(config).await.unwrap()
    }
}

/// Samples every hub every 20 ms; records any partition or node served by two at once.
fn sampler(hubs: Hubs) -> (Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let v = violations.clone();
    let task = tokio::spawn(async move {
        loop {
            {
                let hubs = hubs.lock().unwrap();
                let mut partitions: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
                let mut nodes: BTreeMap<String, Vec<&str>> = BTreeMap::new();
                for (id, hub) in hubs.iter() {
                    for p in hub.served_partitions().unwrap_or_default() {
                        partitions.entry(p).or_default().push(id);
                    }
                    for n in hub.connected_nodes() {
                        nodes.entry(n).or_default().push(id);
                    }
                }
                for (p, by) in partitions.iter().filter(|(_, by)| by.len() > 1) {
                    v.lock()
                        .unwrap()
                        .push(format!("partition {p} served by {by:?}"));
                }
                for (n, by) in nodes.iter().filter(|(_, by)| by.len() > 1) {
                    v.lock()
                        .unwrap()
                        .push(format!("node {n} connected to {by:?}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (violations, task)
}

/// Waits until the partitions are spread over `ids` as every hub's view agrees.
async fn partitions_settled(tier: &Tier, ids: &[&str]) {
    let start = Instant::now();
    loop {
        let done = {
            let hubs = tier.hubs.lock().unwrap();
            let mut served: BTreeMap<u32, String> = BTreeMap::new();
            for (id, hub) in hubs.iter() {
                for p in hub.served_partitions().unwrap_or_default() {
                    served.insert(p, id.clone());
                }
            }
            let used: BTreeSet<&str> = served.values().map(String::as_str).collect();
            served.len() == PARTITIONS as usize
                && used == ids.iter().copied().collect()
                && hubs
                    .values()
                    .all(|h| h.partition_owners().unwrap() == served)
        };
        if done {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "partitions never spread over {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every running hub serves its exact share of the partitions (multi-primary).
async fn shares_settled(tier: &Tier) {
    let start = Instant::now();
    loop {
        let loads: BTreeMap<String, u32> = {
            let hubs = tier.hubs.lock().unwrap();
            hubs.iter()
                .map(|(id, h)| {
                    (
                        id.clone(),
                        h.served_partitions().unwrap_or_default().len() as u32,
                    )
                })
                .collect()
        };
        let n = loads.len() as u32;
        if loads
            .values()
            .all(|l| (PARTITIONS / n..=PARTITIONS.div_ceil(n)).contains(l))
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "hubs never served their shares of {PARTITIONS} partitions: {loads:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every partition is served by one hub and every node is connected and synced
/// to the hub serving its partition; returns node → hub.
async fn settled(
    tier: &Tier,
    edges: &BTreeMap<String, EdgeHub>,
    limit: Duration,
) -> BTreeMap<String, String> {
    let start = Instant::now();
    loop {
        let placement = {
            let hubs = tier.hubs.lock().unwrap();
            let served: usize = hubs
                .values()
                .map(|h| h.served_partitions().unwrap_or_default().len())
                .sum();
            let mut at: BTreeMap<String, String> = BTreeMap::new();
            for (id, hub) in hubs.iter() {
                for n in hub.connected_nodes() {
                    at.insert(n, id.clone());
                }
            }
            let synced = edges.values().all(|e| {
                let s = e.status().borrow().clone();
                s.connected && s.synced
            });
            (served == PARTITIONS as usize && at.len() == edges.len() && synced).then_some(at)
        };
        if let Some(at) = placement {
            return at;
        }
        assert!(
            start.elapsed() < limit,
            "the tier did not settle within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pod_for(node: &str, n: u32) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("p-{node}-{n}")},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "sh"}]},
    }))
    .unwrap()
}

/// Waits until every hub caches the Node, Lease and Pod of exactly the nodes of the
/// partitions it keeps (those it serves, and those it would take over if one other hub died),
/// and each node's are cached by exactly two hubs (its owner and its heir).
async fn caches_follow_partitions(tier: &Tier, edges: &BTreeMap<String, EdgeHub>) {
    use sedna_cloudcore::router::Kind;
    let start = Instant::now();
    loop {
        let mut wrong: Vec<String> = Vec::new();
        let mut holders: BTreeMap<String, usize> = BTreeMap::new();
        {
            let hubs = tier.hubs.lock().unwrap();
            for (id, hub) in hubs.iter() {
                let kept = hub.kept_partitions().unwrap_or_default();
                let served = hub.served_partitions().unwrap_or_default();
                let mine: Vec<&String> = edges
                    .keys()
                    .filter(|n| {
                        kept.contains(&sedna_cloudcore::partitions::partition_of(
                            n, None, PARTITIONS,
                        ))
                    })
                    .collect();
                let want = |f: &dyn Fn(&str) -> String| {
                    let mut v: Vec<String> = mine.iter().map(|n| f(n)).collect();
                    v.sort();
                    v
                };
                let (nodes, leases, pods) = (
                    hub.cached(Kind::Node),
                    hub.cached(Kind::Lease),
                    hub.cached(Kind::Pod),
                );
                for n in &nodes {
                    *holders.entry(n.clone()).or_default() += 1;
                }
                if !served.iter().all(|p| kept.contains(p))
                    || nodes != want(&|n| n.to_owned())
                    || leases != want(&|n| format!("kube-node-lease/{n}"))
                    || pods != want(&|n| format!("default/p-{n}-1"))
                {
                    wrong.push(format!(
                        "{id} serves {served:?}, keeps {kept:?} and caches {nodes:?} {leases:?} {pods:?}"
                    ));
                }
            }
        }
        for node in edges.keys() {
            let on = holders.get(node).copied().unwrap_or(0);
            if on != 2 {
                wrong.push(format!("{node} cached by {on} hubs"));
            }
        }
        if wrong.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "hubs cache other than what they keep: {wrong:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes the hubs sent to nodes (none is wanted: nothing is deleted in the API).
fn deletes_sent(tier: &Tier) -> u64 {
    tier.hubs
        .lock()
        .unwrap()
        .values()
        .map(|h| {
            h.stats()
                .deletes_sent
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum()
}

/// Every node holds exactly the pods `want` names for it (waits up to 20 s).
async fn every_node_holds(
    edges: &BTreeMap<String, EdgeHub>,
    want: impl Fn(&str) -> BTreeSet<String>,
) {
    let start = Instant::now();
    for (node, edge) in edges {
        let want = want(node);
        loop {
            let held: BTreeSet<String> = edge
                .store()
                .list("Pod")
                .unwrap()
                .into_iter()
                .map(|o| o.name)
                .collect();
            if held == want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{node} holds {held:?}, wants {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Every node holds its own pod, and only it.
async fn every_node_holds_its_pod(edges: &BTreeMap<String, EdgeHub>) {
    every_node_holds(edges, |node| [format!("p-{node}-1")].into()).await;
}

/// Also: each hub caches the fleet's objects (Nodes, Leases, bound Pods) of the partitions it
/// serves or would take over only, loads a gained partition's before serving its nodes (no
/// node is ever told to delete its pod) and forgets those it no longer keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_primary_hubs_share_nodes_redirect_take_over_and_rebalance_never_serving_twice() {
    let mut tier = Tier::start(Mode::MultiPrimary).await;
    for id in ["h1", "h2", "h3"] {
        tier.hub(id, &[], &[]).await;
    }
    let (violations, sampling) = sampler(tier.hubs.clone());
    // Once the partitions are spread (every hub serving its share, h1 knowing it), every
    // node dials h1 first: those h1 does not serve are redirected.
    partitions_settled(&tier, &["h1", "h2", "h3"]).await;
    shares_settled(&tier).await;
    let seeds = tier.seeds("h1");
    let pods: Api<Pod> = Api::namespaced(tier.client.clone(), "default");
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(tier.client.clone());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(tier.client.clone(), "kube-node-lease");
    let mut edges = BTreeMap::new();
    for i in 0..12 {
        let node = format!("edge-{i}");
        pods.create(&PostParams::default(), &pod_for(&node, 1))
            .await
            .unwrap();
        // Its Node and Lease (these edges write neither: the tier runs without a node
        // lifecycle).
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": node}})).unwrap(),
            )
            .await
            .unwrap();
        leases
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": node, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": node},
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        edges.insert(node.clone(), tier.edge(&node, &seeds).await);
    }
    let at = settled(&tier, &edges, Duration::from_secs(30)).await;
    caches_follow_partitions(&tier, &edges).await;
    every_node_holds_its_pod(&edges).await;
    let owners = tier.hubs.lock().unwrap()["h1"].partition_owners().unwrap();
    for (node, hub) in &at {
        let p = sedna_cloudcore::partitions::partition_of(node, None, PARTITIONS);
        assert_eq!(
            &owners[&p], hub,
            "{node} (partition {p}) is on the hub serving it"
        );
    }
    let elsewhere = at.values().filter(|h| *h != "h1").count();
    assert!(elsewhere > 0, "nodes spread over hubs: {at:?}");
    let redirects = tier.hubs.lock().unwrap()["h1"]
        .stats()
        .redirects
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        redirects >= elsewhere as u64,
        "{redirects} redirects for {elsewhere} nodes served elsewhere"
    );

    // h2 stops: its partitions move once their leases expire; its nodes follow.
    let on_h2: Vec<String> = at
        .iter()
        .filter(|(_, h)| *h == "h2")
        .map(|(n, _)| n.clone())
        .collect();
    tier.stop("h2").await;
    let stopped = Instant::now();
    let at = settled(&tier, &edges, Duration::from_secs(30)).await;
    let took = stopped.elapsed();
    assert!(at.values().all(|h| h != "h2"));
    assert!(took < LEASE * 4, "takeover took {took:?}");
    caches_follow_partitions(&tier, &edges).await;
    every_node_holds_its_pod(&edges).await;
    eprintln!(
        "{} nodes of a stopped hub served again after {took:?}",
        on_h2.len()
    );

    // h4 joins: it gets a share; partitions of live hubs that stay do not move.
    tier.hub("h4", &[], &[]).await;
    let before = at.clone();
    let wait_share = Instant::now();
    loop {
        let n = tier.hubs.lock().unwrap()["h4"]
            .served_partitions()
            .unwrap()
            .len();
        if n > 0 {
            break;
        }
        assert!(
            wait_share.elapsed() < Duration::from_secs(20),
            "h4 got no partition"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shares_settled(&tier).await;
    let at = settled(&tier, &edges, Duration::from_secs(30)).await;
    for (node, hub) in &at {
        if hub != "h4" {
            assert_eq!(&before[node], hub, "{node} moved between hubs that stayed");
        }
    }
    caches_follow_partitions(&tier, &edges).await;
    every_node_holds_its_pod(&edges).await;
    assert_eq!(
        deletes_sent(&tier),
        0,
        "a node was told to delete something"
    );
    sampling.abort();
    let v = violations.lock().unwrap();
    assert!(v.is_empty(), "served twice: {:?}", &v[..v.len().min(5)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_takes_over_a_stopped_primary_and_hands_back_when_it_returns() {
    let mut tier = Tier::start(Mode::Static).await;
    tier.hub("a", &[0, 1, 2, 3], &[4, 5, 6, 7]).await;
    tier.hub("b", &[4, 5, 6, 7], &[0, 1, 2, 3]).await;
    let (violations, sampling) = sampler(tier.hubs.clone());
    // a, alone at first, also took b's partitions as their standby: wait for the hand-back.
    partitions_settled(&tier, &["a", "b"]).await;
    let seeds = tier.seeds("b");
    let mut edges = BTreeMap::new();
    for i in 0..10 {
        let node = format!("edge-{i}");
        edges.insert(node.clone(), tier.edge(&node, &seeds).await);
    }
    let at = settled(&tier, &edges, Duration::from_secs(30)).await;
    let on_a: BTreeSet<String> = at
        .iter()
        .filter(|(_, h)| *h == "a")
        .map(|(n, _)| n.clone())
        .collect();
    assert!(!on_a.is_empty() && on_a.len() < edges.len(), "{at:?}");
    let primary_a: BTreeSet<String> = edges
        .keys()
        .filter(|n| sedna_cloudcore::partitions::partition_of(n, None, PARTITIONS) < 4)
        .cloned()
        .collect();
    assert_eq!(on_a, primary_a, "a serves the nodes of its partitions 0-3");

    // A pod for every node before the takeover, another while b serves them all.
    let pods: Api<Pod> = Api::namespaced(tier.client.clone(), "default");
    for node in edges.keys() {
        pods.create(&PostParams::default(), &pod_for(node, 1))
            .await
            .unwrap();
    }

    tier.stop("a").await;
    let at = settled(&tier, &edges, Duration::from_secs(30)).await;
    assert!(at.values().all(|h| h == "b"), "{at:?}");
    for node in edges.keys() {
        pods.create(&PostParams::default(), &pod_for(node, 2))
            .await
            .unwrap();
    }
    assert_eq!(
        tier.hubs.lock().unwrap()["b"].served_partitions().unwrap(),
        (0..PARTITIONS).collect::<Vec<_>>()
    );

    // The primary returns: b hands 0-3 back, their nodes go home.
    tier.hub("a", &[0, 1, 2, 3], &[4, 5, 6, 7]).await;
    let start = Instant::now();
    let at = loop {
        let at = settled(&tier, &edges, Duration::from_secs(30)).await;
        let home: BTreeSet<String> = at
            .iter()
            .filter(|(_, h)| *h == "a")
            .map(|(n, _)| n.clone())
            .collect();
        if home == on_a {
            break at;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let views: Vec<String> = tier
                .hubs
                .lock()
                .unwrap()
                .iter()
                .map(|(id, h)| {
                    format!(
                        "{id} serves {:?}, sees {:?}, has {:?}",
                        h.served_partitions(),
                        h.partition_owners(),
                        h.connected_nodes()
                    )
                })
                .collect();
            panic!("not handed back: {at:?}; wanted {on_a:?} on a; {views:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        tier.hubs.lock().unwrap()["a"].served_partitions().unwrap(),
        vec![0, 1, 2, 3],
        "{at:?}"
    );
    // Every node holds exactly its own two pods: none lost, none of another node's.
    every_node_holds(&edges, |node| {
        [format!("p-{node}-1"), format!("p-{node}-2")].into()
    })
    .await;
    sampling.abort();
    let v = violations.lock().unwrap();
    assert!(v.is_empty(), "served twice: {:?}", &v[..v.len().min(5)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_keeps_its_partitions_and_nodes_while_every_api_request_takes_a_fifth_of_the_lease() {
    // A third of the lease is the renewal period, two thirds the serving window after a
    // renewal is sent. A round that read the tier before renewing (two reads, a write, two
    // lists, then the renewals: five requests one after another) took 3 s here, longer
    // than the window: the hub lost its partitions every round and its nodes with them.
    const LATENCY: Duration = Duration::from_millis(600);
    let mut tier = Tier::start(Mode::MultiPrimary).await;
    let proxy = sedna_testkit::TcpProxy::start(tier.api.addr())
        .await
        .unwrap();
    let slow = support::client_via(&tier.api, proxy.addr()).await;
    tier.hub_on("h1", &[], &[], |_| {}, slow).await;
    tier.hub("h2", &[], &[]).await;
    let (violations, sampling) = sampler(tier.hubs.clone());
    partitions_settled(&tier, &["h1", "h2"]).await;
    shares_settled(&tier).await;
    let seeds = tier.seeds("h1");
    let mut edges = BTreeMap::new();
    for i in 0..8 {
        let node = format!("slow-{i}");
        edges.insert(node.clone(), tier.edge(&node, &seeds).await);
    }
    let at = settled(&tier, &edges, Duration::from_secs(30)).await;
    assert!(
        at.values().any(|h| h == "h1"),
        "h1 serves none of the nodes: {at:?}"
    );
    let (h1, h2) = {
        let hubs = tier.hubs.lock().unwrap();
        (hubs["h1"].stats(), hubs["h2"].stats())
    };
    let sessions = || [&h1, &h2].map(|s| s.sessions.load(std::sync::atomic::Ordering::Relaxed));
    let served = |id: &str| {
        tier.hubs.lock().unwrap()[id]
            .served_partitions()
            .unwrap_or_default()
    };
    let (before, h1_serves) = (sessions(), served("h1"));
    proxy.set_latency_to_target(Some(LATENCY));
    // Fifteen renewal periods: h1 serves the same partitions all along, and no node had to
    // connect again.
    let slowed = Instant::now();
    while slowed.elapsed() < LEASE * 5 {
        assert_eq!(
            served("h1"),
            h1_serves,
            "h1's partitions changed {:?} into the slow API",
            slowed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sessions(), before, "nodes connected again");
    assert_eq!(
        h1.partitions_lost
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(settled(&tier, &edges, Duration::from_secs(5)).await, at);
    sampling.abort();
    let v = violations.lock().unwrap();
    assert!(v.is_empty(), "served twice: {:?}", &v[..v.len().min(5)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_hubs_nodes_all_reconnect_in_time_at_the_bounded_handshake_rate() {
    const RATE: u32 = 10;
    const NODES: usize = 100;
    let mut tier = Tier::start(Mode::MultiPrimary).await;
    // One handshake slot: beyond it the storm waits its turn (it is not refused).
    tier.hub_with("h1", &[], &[], |c| {
        c.max_handshakes_per_second = RATE;
        c.max_concurrent_handshakes = 1;
    })
    .await;
    tier.hub("h2", &[], &[]).await;
    partitions_settled(&tier, &["h1", "h2"]).await;
    // Every node dials h2 first, each from its own loopback address (as a fleet does).
    let seeds = tier.seeds("h2");
    let mut edges = BTreeMap::new();
    for i in 0..NODES {
        let node = format!("storm-{i:03}");
        let source: std::net::IpAddr = format!("127.0.0.{}", 2 + i % 200).parse().unwrap();
        edges.insert(
            node.clone(),
            tier.edge_from(&node, &seeds, Some(source)).await,
        );
    }
    let at = settled(&tier, &edges, Duration::from_secs(60)).await;
    let moving = at.values().filter(|h| *h == "h2").count();
    assert!(
        moving >= 20,
        "h2 serves {moving} of {NODES}: too few for a storm"
    );
    let h1 = tier.hubs.lock().unwrap()["h1"].stats();
    let sessions = || h1.sessions.load(std::sync::atomic::Ordering::Relaxed);
    let before = sessions();
    let refused_before = h1
        .handshakes_refused
        .load(std::sync::atomic::Ordering::Relaxed);
    let queued_before = h1
        .handshakes_queued
        .load(std::sync::atomic::Ordering::Relaxed);
    tier.stop("h2").await;
    let stopped = Instant::now();
    // h1's sessions started, every 100 ms, until every node is back.
    let mut samples: Vec<(Duration, u64)> = vec![(Duration::ZERO, before)];
    let limit = LEASE * 4 + Duration::from_secs(moving as u64 / u64::from(RATE)) * 2;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples.push((stopped.elapsed(), sessions()));
        let back = {
            let hubs = tier.hubs.lock().unwrap();
            hubs["h1"].connected_nodes().len() == NODES
        } && edges.values().all(|e| {
            let s = e.status().borrow().clone();
            s.connected && s.synced
        });
        if back {
            break;
        }
        assert!(
            stopped.elapsed() < limit,
            "only {} of {NODES} nodes back on h1 after {limit:?}",
            tier.hubs.lock().unwrap()["h1"].connected_nodes().len()
        );
    }
    let took = stopped.elapsed();
    let arrived = sessions() - before;
    assert!(
        arrived >= moving as u64,
        "{arrived} sessions for {moving} nodes"
    );
    // No second saw more new sessions than the bucket allows: its burst (one second's worth)
    // plus one second of its rate.
    let most = samples
        .iter()
        .map(|(t, n)| {
            let later = samples
                .iter()
                .filter(|(u, _)| *u <= *t + Duration::from_secs(1))
                .map(|(_, m)| *m)
                .max()
                .unwrap_or(*n);
            later - n
        })
        .max()
        .unwrap_or(0);
    assert!(
        most <= u64::from(RATE) * 2,
        "{most} sessions started within one second at a bound of {RATE}/s"
    );
    // Beyond the one slot the storm waited in the hub's waiting room: none was refused (a
    // refusal would have sent the node into a longer back-off).
    let refused = h1
        .handshakes_refused
        .load(std::sync::atomic::Ordering::Relaxed)
        - refused_before;
    let queued = h1
        .handshakes_queued
        .load(std::sync::atomic::Ordering::Relaxed)
        - queued_before;
    assert_eq!(refused, 0, "connections refused during the storm");
    assert!(
        queued > 0,
        "no connection waited for the one handshake slot"
    );
    // Paced: the nodes could not all have come back at once.
    assert!(
        took >= Duration::from_secs(moving as u64 / u64::from(RATE) / 2),
        "{moving} nodes back after {took:?} at {RATE} handshakes/s"
    );
    eprintln!(
        "{moving} nodes of a stopped hub back after {took:?}; at most {most} sessions per second; {queued} waited for a slot"
    );
}

/// `Attach` by a node's own certificate, with `metadata` added; the refusal, if refused.
async fn attach_with(
    hub: &str,
    identity: &sedna_edgecore::join::Identity,
    metadata: &[(&'static str, String)],
) -> Option<tonic::Status> {
    let config = sedna_edgecore::tls::channel_config(
        &identity.ca_pem,
        &identity.cert_pem,
        &identity.key_pem,
    )
    .unwrap();
    let channel = match sedna_edgecore::tls::connect(hub, config).await {
        Ok(c) => c,
        Err(e) => return Some(tonic::Status::unavailable(e)),
    };
    let mut request =
        tonic::Request::new(futures_util::stream::empty::<sedna_proto::channel::Envelope>());
    for (key, value) in metadata {
        request.metadata_mut().insert(*key, value.parse().unwrap());
    }
    let answer = sedna_proto::channel::hub_client::HubClient::new(channel)
        .attach(request)
        .await;
    answer.err()
}

/// The same over the framed channel: the hub's answer, as a status, if it refuses; `Err` when
/// it closed the connection without answering.
async fn attach_framed_with(
    hub: &str,
    identity: &sedna_edgecore::join::Identity,
    unreachable: &str,
) -> Result<Option<tonic::Status>, String> {
    use sedna_proto::frame::{self, AttachAnswer, AttachRequest, FrameReader};
    let config =
        sedna_edgecore::tls::framed_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)
            .unwrap();
    let tls = sedna_edgecore::tls::connect_framed(hub, config, None)
        .await
        .map_err(|e| e.to_string())?;
    let (read, mut write) = tokio::io::split(tls);
    let request = AttachRequest {
        unreachable: unreachable.to_owned(),
    };
    // A hub that refuses the request may close before it is all written.
    let _ = frame::write_frame(&mut write, &request).await;
    match FrameReader::new(read, 64 * 1024)
        .read::<AttachAnswer>()
        .await
    {
        Ok(Some(answer)) => Ok(frame::status_of(&answer)),
        other => Err(format!("no answer: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_claiming_its_owner_unreachable_only_delays_itself_and_an_oversized_claim_is_refused()
 {
    let mut tier = Tier::start(Mode::MultiPrimary).await;
    tier.hub("h1", &[], &[]).await;
    tier.hub("h2", &[], &[]).await;
    partitions_settled(&tier, &["h1", "h2"]).await;
    // A node whose partition h1 serves, dialling h2.
    let owners = tier.hubs.lock().unwrap()["h1"].partition_owners().unwrap();
    let node = (0..)
        .map(|i| format!("claim-{i}"))
        .find(|n| owners[&sedna_cloudcore::partitions::partition_of(n, None, PARTITIONS)] == "h1")
        .unwrap();
    let token =
        sedna_cloudcore::tokens::create(&tier.client, Some(&node), Duration::from_secs(600))
            .await
            .unwrap()
            .to_string();
    let dir = tier.dir.path().join("edges").join(&node);
    let (h1, h2) = (tier.addrs["h1"].to_string(), tier.addrs["h2"].to_string());
    sedna_edgecore::join::join(&h1, &token, &node, &dir)
        .await
        .unwrap();
    let identity = sedna_edgecore::join::Identity::load(&dir).unwrap().unwrap();

    // Plain: redirected to h1.
    let plain = attach_with(&h2, &identity, &[]).await.unwrap();
    assert_eq!(
        plain
            .metadata()
            .get("sedna-redirect")
            .unwrap()
            .to_str()
            .unwrap(),
        h1
    );
    // Claiming h1 unreachable: told when to come back, not redirected (it delays only itself).
    let claim = attach_with(&h2, &identity, &[("sedna-unreachable", h1.clone())])
        .await
        .unwrap();
    assert_eq!(claim.code(), tonic::Code::Unavailable, "{claim:?}");
    assert!(claim.metadata().get("sedna-redirect").is_none());
    let after: u64 = claim
        .metadata()
        .get("sedna-retry-after-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        after <= (LEASE + LEASE / 3).as_millis() as u64,
        "{after} ms"
    );
    // And where to come back: the hub the tier would choose without the one it cannot reach.
    assert_eq!(
        claim
            .metadata()
            .get("sedna-successor")
            .map(|v| v.to_str().unwrap()),
        Some(h2.as_str())
    );
    // The framed channel answers the same: a redirect, then "later" for the claim.
    let framed = attach_framed_with(&h2, &identity, "")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        framed
            .metadata()
            .get("sedna-redirect")
            .map(|v| v.to_str().unwrap()),
        Some(h1.as_str())
    );
    let framed_claim = attach_framed_with(&h2, &identity, &h1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        framed_claim.code(),
        tonic::Code::Unavailable,
        "{framed_claim:?}"
    );
    assert_eq!(
        framed_claim
            .metadata()
            .get("sedna-successor")
            .map(|v| v.to_str().unwrap()),
        Some(h2.as_str())
    );
    // An oversized framed claim is not read: the connection closes without an answer.
    let huge_framed = attach_framed_with(&h2, &identity, &"x".repeat(64 * 1024)).await;
    assert!(huge_framed.is_err(), "{huge_framed:?}");
    // An oversized claim (64 KiB, past HTTP/2's header list bound) is refused outright.
    let huge = attach_with(
        &h2,
        &identity,
        &[("sedna-unreachable", "x".repeat(64 * 1024))],
    )
    .await
    .unwrap();
    assert!(huge.metadata().get("sedna-redirect").is_none(), "{huge:?}");
    // Meanwhile real nodes keep connecting.
    let mut edges = BTreeMap::new();
    edges.insert(
        "legit".to_string(),
        tier.edge("legit", &tier.seeds("h2")).await,
    );
    settled(&tier, &edges, Duration::from_secs(30)).await;
    assert!(
        attach_with(&h1, &identity, &[]).await.is_none(),
        "its owner serves it"
    );
    assert!(
        attach_framed_with(&h1, &identity, "")
            .await
            .unwrap()
            .is_none(),
        "its owner serves it (framed)"
    );
}
