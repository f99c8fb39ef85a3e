//! What the hub's integration tests share: the embedded API server on a free loopback port
//! and a kube-rs client of it.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

/// The embedded API server in `dir` (writes acknowledged once in the page cache unless
/// `durable`), and a client of it.
pub async fn embedded_api(
    dir: &std::path::Path,
    durable: bool,
) -> (sedna_apiserver::ApiServer, kube::Client) {
    let mut config = sedna_apiserver::Config::new(dir.join("api"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    if !durable {
        config.store.durability = sedna_apiserver::store::Durability::Process;
    }
    let api = sedna_apiserver::ApiServer::start(config).await.unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(api.kubeconfig_path()).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    (api, client)
}

/// A client of `api` that reaches it at `addr` (a proxy in front of it) instead.
pub async fn client_via(
    api: &sedna_apiserver::ApiServer,
    addr: std::net::SocketAddr,
) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(api.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.cluster_url = format!("https://{addr}").parse().unwrap();
    kube::Client::try_from(config).unwrap()
}

/// An edge client's settings for tests: fast heartbeats, a short read deadline and back-off,
/// a jitter seed fixed by the node name.
pub fn fast_edge(hub: &str, dir: &std::path::Path, node: &str) -> sedna_edgecore::EdgeConfig {
    use std::time::Duration;
    let mut config = sedna_edgecore::EdgeConfig::new(hub, dir);
    config.machine.heartbeat = Duration::from_millis(200);
    config.machine.read_deadline = Duration::from_millis(1500);
    config.machine.backoff_base = Duration::from_millis(20);
    config.machine.backoff_max = Duration::from_millis(300);
    config.machine.later_spread = Duration::from_millis(300);
    // Each node its own jitter.
    config.seed = node
        .bytes()
        .fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    config
}
