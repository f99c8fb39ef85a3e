//! The channel in one process: the embedded API server, the hub, and edges on 127.0.0.1.
//! Joins, mutual TLS, node-scoped routing, upstream authorization, resync after a hub
//! restart, status written while the hub is away, certificate renewal, and a fault test that
//! cuts the connection at random points a hundred times.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use rand::RngExt;
use sedna_cloudcore::{Hub, HubConfig};
use sedna_edgecore::join::JoinError;
use sedna_edgecore::{EdgeConfig, EdgeHub};
use sedna_proto::channel::{ObjectRef, Upstream, upstream::Kind as UpstreamKind};
use serde_json::json;

mod support;

struct Cluster {
    _api: sedna_apiserver::ApiServer,
    client: kube::Client,
    hub: Option<Hub>,
    hub_addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

fn fast_hub(dir: &std::path::Path, listen: std::net::SocketAddr) -> HubConfig {
    let mut c = HubConfig::new(dir.join("hub"));
    c.listen = listen;
    c.session.heartbeat = Duration::from_millis(200);
    c.session.read_deadline = Duration::from_millis(1500);
    c.session.retransmit_after = Duration::from_millis(500);
    c.session.upstream_retry = Duration::from_millis(100);
    c
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster::start_with(|_| {}).await
    }

    async fn start_with(tune: impl FnOnce(&mut HubConfig)) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (api, client) = support::embedded_api(dir.path(), true).await;
        let mut config = fast_hub(dir.path(), "127.0.0.1:0".parse().unwrap());
        tune(&mut config);
        let hub = Hub::start(config, client.clone()).await.unwrap();
        let hub_addr = hub.addr();
        Cluster {
            _api: api,
            client,
            hub: Some(hub),
            hub_addr,
            dir,
        }
    }

    fn hub(&self) -> &Hub {
        self.hub.as_ref().unwrap()
    }

    async fn stop_hub(&mut self) {
        if let Some(h) = self.hub.take() {
            h.shutdown().await;
        }
    }

    async fn restart_hub(&mut self) {
        let hub = Hub::start(
            fast_hub(self.dir.path(), self.hub_addr),
            self.client.clone(),
        )
        .await
        .unwrap();
        self.hub = Some(hub);
    }

    async fn token(&self, node: Option<&str>, ttl: Duration) -> String {
        sedna_cloudcore::tokens::create(&self.client, node, ttl)
            .await
            .unwrap()
            .to_string()
    }

    fn edge_dir(&self, node: &str) -> std::path::PathBuf {
        self.dir.path().join("edges").join(node)
    }

    async fn join(&self, node: &str) {
        let token = self.token(Some(node), Duration::from_secs(600)).await;
        sedna_edgecore::join::join(
            &self.hub_addr.to_string(),
            &token,
            node,
            &self.edge_dir(node),
        )
        .await
        .unwrap();
    }

    async fn edge_at(&self, node: &str, hub: &str) -> EdgeHub {
        EdgeHub::start(support::fast_edge(hub, &self.edge_dir(node), node))
            .await
            .unwrap()
    }

    async fn edge(&self, node: &str) -> EdgeHub {
        self.join(node).await;
        self.edge_at(node, &self.hub_addr.to_string()).await
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn names(edge: &EdgeHub, kind: &str) -> BTreeSet<String> {
    edge.store()
        .list(kind)
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn pod(name: &str, node: &str, cm: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "worker",
                  "envFrom": [{ "configMapRef": { "name": cm } }] }] }
    }))
    .unwrap()
}

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(json!({ "metadata": { "name": name }, "data": { "v": value } })).unwrap()
}

fn pod_status(name: &str, phase: &str) -> Upstream {
    Upstream {
        kind: UpstreamKind::Status as i32,
        object: Some(ObjectRef {
            api_version: "v1".into(),
            kind: "Pod".into(),
            namespace: "default".into(),
            name: name.into(),
            uid: String::new(),
        }),
        payload: json!({ "status": { "phase": phase, "message": format!("{phase} at the edge") } })
            .to_string()
            .into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_valid_token_joins_and_bad_tokens_or_requests_are_refused() {
    let c = Cluster::start().await;
    let hub = c.hub_addr.to_string();
    let dir = |n: &str| c.dir.path().join(n);
    let good = c.token(Some("edge-a"), Duration::from_secs(60)).await;
    sedna_edgecore::join::join(&hub, &good, "edge-a", &dir("a"))
        .await
        .unwrap();
    let key = std::fs::metadata(dir("a").join("pki/node.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key.permissions().mode() & 0o777, 0o600);

    let refused = |r: Result<_, JoinError>| match r {
        Err(JoinError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let other_name = refused(sedna_edgecore::join::join(&hub, &good, "edge-b", &dir("b")).await);
    assert!(
        other_name.contains("is for node \"edge-a\""),
        "{other_name}"
    );

    let short = c.token(None, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = refused(sedna_edgecore::join::join(&hub, &short, "edge-c", &dir("c")).await);
    assert!(expired.contains("expired"), "{expired}");

    let mut forged: sedna_proto::identity::JoinToken = good.parse().unwrap();
    forged.secret = "0".repeat(32);
    let wrong_secret =
        refused(sedna_edgecore::join::join(&hub, &forged.to_string(), "edge-a", &dir("d")).await);
    assert!(wrong_secret.contains("not valid"), "{wrong_secret}");

    // A token pinning another CA: the edge refuses the hub before sending anything.
    let mut other_pin: sedna_proto::identity::JoinToken = good.parse().unwrap();
    other_pin.ca_pin = "f".repeat(64);
    let unreachable =
        sedna_edgecore::join::join(&hub, &other_pin.to_string(), "edge-a", &dir("e")).await;
    assert!(
        matches!(unreachable, Err(JoinError::Unreachable { .. })),
        "{unreachable:?}"
    );

    // A CSR for another node than the one asked for.
    let any = c.token(None, Duration::from_secs(60)).await;
    let (_, csr) = sedna_edgecore::join::new_request("edge-x").unwrap();
    let token: sedna_proto::identity::JoinToken = any.parse().unwrap();
    let verifier = sedna_edgecore::tls::PinVerifier::new(&token.ca_pin);
    let channel =
        sedna_edgecore::tls::connect(&hub, sedna_edgecore::tls::join_config(verifier).unwrap())
            .await
            .unwrap();
    let status = sedna_proto::channel::hub_client::HubClient::new(channel)
        .join(sedna_proto::channel::JoinRequest {
            token: any.clone(),
            node_name: "edge-y".into(),
            csr_der: csr,
            replace: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("system:node:edge-x"),
        "{}",
        status.message()
    );
    assert_eq!(c.hub().stats().joins.load(Ordering::Relaxed), 1);
    assert!(c.hub().stats().joins_refused.load(Ordering::Relaxed) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_use_token_joins_once_and_a_connected_name_is_replaced_only_when_asked() {
    let c = Cluster::start().await;
    let hub = c.hub_addr.to_string();
    let once = sedna_cloudcore::tokens::create_with(
        &c.client,
        Some("edge-s"),
        Duration::from_secs(60),
        true,
    )
    .await
    .unwrap()
    .to_string();
    sedna_edgecore::join::join(&hub, &once, "edge-s", &c.edge_dir("edge-s"))
        .await
        .unwrap();
    let again = sedna_edgecore::join::join(&hub, &once, "edge-s", &c.edge_dir("other"))
        .await
        .unwrap_err();
    assert!(matches!(again, JoinError::Refused(_)), "{again}");

    // edge-s is connected: another machine joining under its name is refused …
    let _edge = c.edge_at("edge-s", &hub).await;
    eventually("edge-s connects", || {
        c.hub().stats().connected.load(Ordering::Relaxed) == 1
    })
    .await;
    let token = c.token(Some("edge-s"), Duration::from_secs(60)).await;
    let taken = sedna_edgecore::join::join(&hub, &token, "edge-s", &c.edge_dir("other"))
        .await
        .unwrap_err();
    assert!(
        taken
            .to_string()
            .contains("is connected now; join with --replace"),
        "{taken}"
    );
    // … unless replacing it is asked for.
    sedna_edgecore::join::join_with(&hub, &token, "edge-s", &c.edge_dir("other"), true)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_node_revokes_its_certificate_until_it_joins_again() {
    use k8s_openapi::api::core::v1::Node;
    let c = Cluster::start().await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "edge-r" } })).unwrap(),
        )
        .await
        .unwrap();
    let edge = c.edge("edge-r").await;
    let connected = || c.hub().stats().connected.load(Ordering::Relaxed);
    eventually("edge-r connects", || connected() == 1).await;
    let refused_before = c.hub().stats().unauthenticated.load(Ordering::Relaxed);
    nodes
        .delete("edge-r", &DeleteParams::default())
        .await
        .unwrap();
    // Its session ends, its reconnection is refused, and it stops dialing (a refused
    // certificate is not a network blip).
    eventually("edge-r is refused", || {
        connected() == 0
            && c.hub().stats().unauthenticated.load(Ordering::Relaxed) > refused_before
            && edge.status().borrow().refused.is_some()
    })
    .await;
    let reason = edge.status().borrow().refused.clone().unwrap();
    assert!(reason.contains("revoked"), "{reason}");
    assert!(!edge.status().borrow().connected);
    edge.shutdown().await;
    let kept: Api<ConfigMap> = Api::namespaced(c.client.clone(), "kube-system");
    let kept = kept.get("sedna-revoked-nodes").await.unwrap();
    assert!(kept.data.unwrap().contains_key("edge-r"));
    // Joined again with a new token, it gets a certificate that is not revoked.
    let edge = c.edge("edge-r").await;
    eventually("edge-r connects again", || connected() == 1).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_recorded_in_the_api_ends_a_connected_nodes_session_at_once() {
    use k8s_openapi::api::core::v1::Node;
    let c = Cluster::start().await;
    let nodes: Api<Node> = Api::all(c.client.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "edge-v" } })).unwrap(),
        )
        .await
        .unwrap();
    let edge = c.edge("edge-v").await;
    let connected = || c.hub().stats().connected.load(Ordering::Relaxed);
    eventually("edge-v connects", || connected() == 1).await;
    // What `sedna node revoke edge-v` records (the Node stays).
    sedna_cloudcore::revocation::Revocations::persist(
        &c.client,
        "edge-v",
        sedna_cloudcore::revocation::now_ms(),
    )
    .await
    .unwrap();
    eventually("edge-v is refused", || {
        connected() == 0 && edge.status().borrow().refused.is_some()
    })
    .await;
    let reason = edge.status().borrow().refused.clone().unwrap();
    assert!(reason.contains("revoked"), "{reason}");
    assert!(nodes.get_opt("edge-v").await.unwrap().is_some());
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_without_a_valid_client_certificate_is_refused() {
    let c = Cluster::start().await;
    let hub = c.hub_addr.to_string();
    let token: sedna_proto::identity::JoinToken = c
        .token(None, Duration::from_secs(60))
        .await
        .parse()
        .unwrap();
    // No client certificate: the TLS handshake passes (joins need it), Attach does not.
    let verifier = sedna_edgecore::tls::PinVerifier::new(&token.ca_pin);
    let channel =
        sedna_edgecore::tls::connect(&hub, sedna_edgecore::tls::join_config(verifier).unwrap())
            .await
            .unwrap();
    let outgoing = futures_util::stream::empty();
    let status = sedna_proto::channel::hub_client::HubClient::new(channel)
        .attach(outgoing)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(c.hub().stats().unauthenticated.load(Ordering::Relaxed), 1);

    // A certificate from another CA: the TLS handshake itself fails.
    let other = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "system:node:intruder");
    let self_signed = params.self_signed(&other).unwrap();
    let published: Api<ConfigMap> = Api::namespaced(c.client.clone(), "kube-public");
    let ca_pem = published.get("sedna-hub-ca").await.unwrap().data.unwrap()["ca.crt"].clone();
    let config =
        sedna_edgecore::tls::channel_config(&ca_pem, &self_signed.pem(), &other.serialize_pem())
            .unwrap();
    let result = async {
        let channel = sedna_edgecore::tls::connect(&hub, config).await?;
        sedna_proto::channel::hub_client::HubClient::new(channel)
            .attach(futures_util::stream::empty())
            .await
            .map_err(|s| s.to_string())
    }
    .await;
    assert!(
        result.is_err(),
        "a foreign certificate must not open a stream"
    );
}

/// A TLS connection offering only the framed channel, with the node's certificate if
/// `identity` is given (otherwise none, the hub checked against `ca_pin`).
async fn framed_tls(
    hub: &str,
    ca_pin: &str,
    identity: Option<&sedna_edgecore::join::Identity>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = match identity {
        Some(id) => {
            sedna_edgecore::tls::framed_config(&id.ca_pem, &id.cert_pem, &id.key_pem).unwrap()
        }
        None => {
            let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(sedna_edgecore::tls::PinVerifier::new(ca_pin))
            .with_no_client_auth();
            config.alpn_protocols = vec![sedna_proto::frame::ALPN.to_vec()];
            std::sync::Arc::new(config)
        }
    };
    let tls = sedna_edgecore::tls::connect_framed(hub, config, None)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(sedna_proto::frame::ALPN),
        "the hub chose the framed channel"
    );
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_attach_over_the_framed_channel_by_default_and_over_grpc_when_asked() {
    let c = Cluster::start().await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    cms.create(&PostParams::default(), &config_map("shared", "1"))
        .await
        .unwrap();
    for node in ["framed", "grpc"] {
        pods.create(
            &PostParams::default(),
            &pod(&format!("pod-{node}"), node, "shared"),
        )
        .await
        .unwrap();
    }
    let framed = c.edge("framed").await;
    c.join("grpc").await;
    let mut config = support::fast_edge(&c.hub_addr.to_string(), &c.edge_dir("grpc"), "grpc");
    config.grpc_channel = true;
    let grpc = EdgeHub::start(config).await.unwrap();
    for (edge, node) in [(&framed, "framed"), (&grpc, "grpc")] {
        eventually(&format!("{node} has its pod and config map"), || {
            names(edge, "Pod") == set(&[&format!("pod-{node}")])
                && names(edge, "ConfigMap") == set(&["shared"])
        })
        .await;
    }
    let stats = c.hub().stats();
    assert_eq!(stats.sessions.load(Ordering::Relaxed), 2);
    assert_eq!(stats.framed_sessions.load(Ordering::Relaxed), 1);
    // The hub judges its nodes by their sessions (its lifecycle, 2-minute Lease refresh) and
    // says so over either channel: renew every 30 s.
    for edge in [&framed, &grpc] {
        assert_eq!(
            edge.status().borrow().lease_renewal,
            Some(Duration::from_secs(30))
        );
    }
    // A change reaches both, and both report upstream (the pod's status).
    cms.patch(
        "shared",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "v": "2" } })),
    )
    .await
    .unwrap();
    for edge in [&framed, &grpc] {
        eventually("the new version arrives", || {
            edge.store()
                .get("ConfigMap", "default", "shared")
                .unwrap()
                .is_some_and(|o| String::from_utf8_lossy(&o.value).contains("\"v\":\"2\""))
        })
        .await;
    }
    framed.report(&pod_status("pod-framed", "Running")).unwrap();
    eventually("the framed node's outbox drains", || {
        framed.store().outbox_len().unwrap() == 0
    })
    .await;
    let written = pods.get_status("pod-framed").await.unwrap();
    assert_eq!(written.status.unwrap().phase.as_deref(), Some("Running"));
    framed.shutdown().await;
    grpc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_framed_channel_without_a_certificate_a_request_or_within_its_limit_is_closed() {
    use sedna_proto::frame::{self, AttachAnswer, AttachRequest, FrameReader};
    use tokio::io::AsyncWriteExt;
    let c = Cluster::start_with(|h| {
        h.client_hello_timeout = Duration::from_millis(500);
        h.handshake_timeout = Duration::from_secs(2);
    })
    .await;
    let hub = c.hub_addr.to_string();
    let token: sedna_proto::identity::JoinToken = c
        .token(None, Duration::from_secs(60))
        .await
        .parse()
        .unwrap();
    let stats = c.hub().stats();

    // No client certificate: refused with the code gRPC would use.
    let (read, mut write) = tokio::io::split(framed_tls(&hub, &token.ca_pin, None).await);
    frame::write_frame(&mut write, &AttachRequest::default())
        .await
        .unwrap();
    let answer = FrameReader::new(read, 4096)
        .read::<AttachAnswer>()
        .await
        .unwrap()
        .expect("an answer");
    let status = frame::status_of(&answer).expect("a refusal");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(stats.unauthenticated.load(Ordering::Relaxed), 1);

    c.join("quiet").await;
    let identity = sedna_edgecore::join::Identity::load(&c.edge_dir("quiet"))
        .unwrap()
        .unwrap();
    // Silent after the handshake: closed at the handshake deadline, without an answer.
    let (read, _write) = tokio::io::split(framed_tls(&hub, &token.ca_pin, Some(&identity)).await);
    let mut reader = FrameReader::new(read, 4096);
    let ended = tokio::time::timeout(Duration::from_secs(5), reader.read::<AttachAnswer>())
        .await
        .expect("closed by the hub");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");

    // A first frame over the request limit: closed without reading it.
    let (read, mut write) =
        tokio::io::split(framed_tls(&hub, &token.ca_pin, Some(&identity)).await);
    let over = u32::try_from(frame::MAX_REQUEST_BYTES + 1).unwrap();
    write.write_all(&over.to_be_bytes()).await.unwrap();
    write.flush().await.unwrap();
    let ended = tokio::time::timeout(
        Duration::from_secs(5),
        FrameReader::new(read, 4096).read::<AttachAnswer>(),
    )
    .await
    .expect("closed by the hub");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    assert_eq!(stats.sessions.load(Ordering::Relaxed), 0);

    // The node itself still attaches.
    let edge = c.edge_at("quiet", &hub).await;
    eventually("the node connects", || edge.status().borrow().connected).await;
    assert_eq!(stats.framed_sessions.load(Ordering::Relaxed), 1);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hub_at_its_connection_limit_refuses_newcomers_until_a_node_leaves() {
    let c = Cluster::start_with(|h| h.max_connections = 1).await;
    c.join("edge-b").await;
    let a = c.edge("edge-a").await;
    eventually("a connects", || a.status().borrow().connected).await;
    let b = c.edge_at("edge-b", &c.hub_addr.to_string()).await;
    let stats = c.hub().stats();
    eventually("b's dials are refused on arrival", || {
        stats
            .handshakes_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    assert!(!b.status().borrow().connected, "over the limit");
    assert_eq!(c.hub().connected_nodes(), vec!["edge-a".to_string()]);
    a.shutdown().await;
    eventually("b connects once a left", || b.status().borrow().connected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_for_node_a_never_reach_node_b() {
    let c = Cluster::start().await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    for name in ["cfg-a", "cfg-b", "cfg-unused"] {
        cms.create(&PostParams::default(), &config_map(name, "1"))
            .await
            .unwrap();
    }
    pods.create(&PostParams::default(), &pod("pod-a", "edge-a", "cfg-a"))
        .await
        .unwrap();
    let a = c.edge("edge-a").await;
    let b = c.edge("edge-b").await;
    pods.create(&PostParams::default(), &pod("pod-b", "edge-b", "cfg-b"))
        .await
        .unwrap();
    eventually("a has its pod and config map", || {
        names(&a, "Pod") == set(&["pod-a"]) && names(&a, "ConfigMap") == set(&["cfg-a"])
    })
    .await;
    eventually("b has its pod and config map", || {
        names(&b, "Pod") == set(&["pod-b"]) && names(&b, "ConfigMap") == set(&["cfg-b"])
    })
    .await;
    // A change to a's config map reaches a only; moving a pod moves what follows it.
    cms.patch(
        "cfg-a",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "v": "2" } })),
    )
    .await
    .unwrap();
    eventually("a sees the new version", || {
        a.store()
            .get("ConfigMap", "default", "cfg-a")
            .unwrap()
            .is_some_and(|o| String::from_utf8_lossy(&o.value).contains("\"v\":\"2\""))
    })
    .await;
    // Bound pods are deleted gracefully (the node confirms); grace 0 removes them at once.
    pods.delete("pod-a", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("pod-a2", "edge-b", "cfg-a"))
        .await
        .unwrap();
    eventually("a holds nothing of b's", || {
        names(&a, "Pod").is_empty() && names(&a, "ConfigMap").is_empty()
    })
    .await;
    eventually("b gets the moved pod's config map", || {
        names(&b, "ConfigMap") == set(&["cfg-a", "cfg-b"])
            && names(&b, "Pod") == set(&["pod-a2", "pod-b"])
    })
    .await;
    assert!(names(&b, "ConfigMap").iter().all(|n| n != "cfg-unused"));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_writes_are_authorized_per_node() {
    let c = Cluster::start().await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    cms.create(&PostParams::default(), &config_map("cfg", "1"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("mine", "edge-a", "cfg"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("theirs", "edge-b", "cfg"))
        .await
        .unwrap();
    let a = c.edge("edge-a").await;
    let mut status = a.status();
    while !status.borrow().synced {
        status.changed().await.unwrap();
    }
    a.report(&pod_status("mine", "Running")).unwrap();
    a.report(&pod_status("theirs", "Failed")).unwrap();
    let node = Upstream {
        kind: UpstreamKind::Node as i32,
        object: None,
        payload: json!({ "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": "edge-a", "labels": { "node-role.sedna.io/edge": "" } },
            "status": { "conditions": [{ "type": "Ready", "status": "True" }] } })
        .to_string()
        .into_bytes(),
    };
    a.report(&node).unwrap();
    let other_node = Upstream {
        kind: UpstreamKind::Node as i32,
        object: None,
        payload: json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "edge-b" } })
            .to_string()
            .into_bytes(),
    };
    a.report(&other_node).unwrap();
    eventually("the outbox drains", || a.store().outbox_len().unwrap() == 0).await;
    let mine = pods.get_status("mine").await.unwrap();
    assert_eq!(mine.status.unwrap().phase.as_deref(), Some("Running"));
    let theirs = pods.get_status("theirs").await.unwrap();
    assert_eq!(
        theirs.status.unwrap().phase.as_deref(),
        Some("Pending"),
        "refused, not applied"
    );
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(c.client.clone());
    let node = nodes.get("edge-a").await.unwrap();
    assert!(
        node.metadata
            .labels
            .unwrap()
            .contains_key("node-role.sedna.io/edge")
    );
    assert!(nodes.get_opt("edge-b").await.unwrap().is_none());
    assert_eq!(c.hub().stats().upstream_rejected.load(Ordering::Relaxed), 2);
    a.shutdown().await;
}

fn lease_renewal(node: &str, duration_s: u32) -> Upstream {
    let renewed = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ");
    Upstream {
        kind: UpstreamKind::Lease as i32,
        object: None,
        payload: json!({ "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": node, "namespace": "kube-node-lease" },
            "spec": { "holderIdentity": node, "leaseDurationSeconds": duration_s,
                      "renewTime": renewed.to_string() } })
        .to_string()
        .into_bytes(),
    }
}

fn node_report(node: &str, site: &str, beat: &str) -> Upstream {
    Upstream {
        kind: UpstreamKind::Node as i32,
        object: None,
        payload: json!({ "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": node, "labels": { "site": site } },
            "status": { "conditions": [{ "type": "Ready", "status": "True",
                "lastHeartbeatTime": beat, "lastTransitionTime": "2026-01-01T00:00:00Z" }] } })
        .to_string()
        .into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_status_report_with_unchanged_labels_is_applied_as_its_status_alone() {
    let c = Cluster::start().await;
    let a = c.edge("edge-s").await;
    let mut status = a.status();
    while !status.borrow().synced {
        status.changed().await.unwrap();
    }
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(c.client.clone());
    let heartbeat = || async {
        let node = nodes.get_status("edge-s").await.unwrap();
        let beat = node
            .status
            .and_then(|s| s.conditions)
            .and_then(|cs| cs.into_iter().find(|c| c.type_ == "Ready"))
            .and_then(|c| c.last_heartbeat_time)
            .map(|t| t.0.to_string());
        let site = node.metadata.labels.and_then(|l| l.get("site").cloned());
        (beat, site)
    };
    let stats = c.hub().stats();
    // Reports until one is applied as its status alone: the first of the session applies
    // the labels, and the hub's cache must have seen them before the next can skip them.
    let mut second = 1;
    loop {
        let beat = format!("2026-01-01T00:00:{second:02}Z");
        a.report(&node_report("edge-s", "north", &beat)).unwrap();
        eventually("the outbox drains", || a.store().outbox_len().unwrap() == 0).await;
        assert_eq!(
            heartbeat().await,
            (Some(beat), Some("north".into())),
            "every report's status is applied, its labels kept"
        );
        if stats.node_status_only.load(Ordering::Relaxed) > 0 {
            break;
        }
        assert!(second < 20, "no report was applied as its status alone");
        second += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A changed label is applied.
    let skipped = stats.node_status_only.load(Ordering::Relaxed);
    a.report(&node_report("edge-s", "south", "2026-01-01T00:01:00Z"))
        .unwrap();
    eventually("the outbox drains", || a.store().outbox_len().unwrap() == 0).await;
    assert_eq!(
        heartbeat().await,
        (Some("2026-01-01T00:01:00Z".into()), Some("south".into()))
    );
    assert_eq!(stats.node_status_only.load(Ordering::Relaxed), skipped);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connected_node_stays_ready_on_a_rarely_written_lease_and_turns_not_ready_once_its_session_ends()
 {
    let c = Cluster::start_with(|h| {
        h.lifecycle = Some(sedna_cloudcore::lifecycle::LifecycleConfig {
            period: Duration::from_millis(100),
            lease_refresh: Duration::from_secs(60),
            ..Default::default()
        });
    })
    .await;
    let a = c.edge("edge-l").await;
    let mut status = a.status();
    while !status.borrow().synced {
        status.changed().await.unwrap();
    }
    assert_eq!(
        status.borrow().lease_renewal,
        Some(Duration::from_secs(15)),
        "the hub asks for a renewal every quarter of its 60 s refresh"
    );
    let now = jiff::Timestamp::now().to_string();
    a.report(&Upstream {
        kind: UpstreamKind::Node as i32,
        object: None,
        payload: json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "edge-l" },
            "status": { "conditions": [{ "type": "Ready", "status": "True",
                "lastHeartbeatTime": now, "lastTransitionTime": now }] } })
        .to_string()
        .into_bytes(),
    })
    .unwrap();
    // A 1 s lease renewed every 200 ms, for 3 s.
    for _ in 0..15 {
        a.report(&lease_renewal("edge-l", 1)).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eventually("the outbox drains", || a.store().outbox_len().unwrap() == 0).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.client.clone(), "kube-node-lease");
    let lease = leases.get("edge-l").await.unwrap().spec.unwrap();
    assert_eq!(
        lease.lease_duration_seconds,
        Some(76),
        "stored for the node's 1 s, the 60 s until the next write and the 15 s until the \
         renewal that makes it due"
    );
    let stats = c.hub().stats();
    assert_eq!(
        stats.lease_writes_skipped.load(Ordering::Relaxed),
        14,
        "one renewal written, the others acknowledged"
    );
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(c.client.clone());
    let ready = || async {
        nodes
            .get_status("edge-l")
            .await
            .unwrap()
            .status
            .and_then(|s| s.conditions)
            .and_then(|cs| cs.into_iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status)
    };
    assert_eq!(
        ready().await.as_deref(),
        Some("True"),
        "connected: Ready, though the API's Lease shows a renewal 3 s old"
    );
    assert_eq!(stats.nodes_marked_not_ready.load(Ordering::Relaxed), 0);

    // The session ends: NotReady once the node's own 1 s lease runs out, not the stored 61 s.
    let lost_at = std::time::Instant::now();
    a.shutdown().await;
    while ready().await.as_deref() != Some("Unknown") {
        assert!(
            lost_at.elapsed() < Duration::from_secs(20),
            "never marked NotReady"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The hub counts a lifecycle round's marks once all its writes are done, which may be
    // just after the API already shows this one.
    while stats.nodes_marked_not_ready.load(Ordering::Relaxed) == 0 {
        assert!(lost_at.elapsed() < Duration::from_secs(20), "never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.nodes_marked_not_ready.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_hub_restart_only_changes_cross_and_offline_status_arrives_in_order() {
    let mut c = Cluster::start().await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    for i in 0..100 {
        cms.create(
            &PostParams::default(),
            &config_map(&format!("cfg-{i:03}"), "1"),
        )
        .await
        .unwrap();
        pods.create(
            &PostParams::default(),
            &pod(&format!("pod-{i:03}"), "edge-a", &format!("cfg-{i:03}")),
        )
        .await
        .unwrap();
    }
    let a = c.edge("edge-a").await;
    eventually("initial sync", || a.store().len().unwrap() == 200).await;
    let first_upserts = c.hub().stats().upserts_sent.load(Ordering::Relaxed);
    assert_eq!(first_upserts, 200);

    c.stop_hub().await;
    // While the hub is away: 2 of the 200 objects change, one is deleted, and the edge writes
    // statuses that must arrive in order, exactly as written.
    cms.patch(
        "cfg-007",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "v": "2" } })),
    )
    .await
    .unwrap();
    cms.patch(
        "cfg-042",
        &PatchParams::default(),
        &Patch::Merge(json!({ "data": { "v": "2" } })),
    )
    .await
    .unwrap();
    pods.delete("pod-099", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    for phase in ["Pending", "Running", "Succeeded"] {
        a.report(&pod_status("pod-001", phase)).unwrap();
    }
    let history: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let mut watch = {
        use kube::api::WatchParams;
        let rv = history
            .get("pod-001")
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        Box::pin(
            history
                .watch(&WatchParams::default().fields("metadata.name=pod-001"), &rv)
                .await
                .unwrap(),
        )
    };
    c.restart_hub().await;
    eventually("resync after the restart", || {
        // pod-099 and its config map are gone; two config maps changed.
        a.store().len().unwrap() == 198
            && a.store()
                .get("ConfigMap", "default", "cfg-042")
                .unwrap()
                .is_some_and(|o| String::from_utf8_lossy(&o.value).contains("\"v\":\"2\""))
    })
    .await;
    let stats = c.hub().stats();
    assert_eq!(
        stats.objects_wanted.load(Ordering::Relaxed),
        2,
        "only the two changed objects crossed"
    );
    // Besides them, only pod-001 travels again, changed by the statuses the edge wrote.
    assert!(stats.upserts_sent.load(Ordering::Relaxed) <= 2 + 3);
    // One bucket per changed object at most: two changed, two deleted, and pod-001 when its
    // new status is already in the hub's view.
    assert!(
        stats.manifest_buckets.load(Ordering::Relaxed) <= 5,
        "at most one bucket per change"
    );
    let mut phases = Vec::new();
    use futures_util::StreamExt;
    while phases.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(kube::api::WatchEvent::Modified(p)))) => {
                phases.push(p.status.unwrap().phase.unwrap());
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(phases, ["Pending", "Running", "Succeeded"]);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_are_renewed_over_the_channel_before_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let (api, client) = support::embedded_api(dir.path(), true).await;
    let mut hub_config = fast_hub(dir.path(), "127.0.0.1:0".parse().unwrap());
    hub_config.node_cert_validity = Duration::from_secs(9);
    let hub = Hub::start(hub_config, client.clone()).await.unwrap();
    let token = sedna_cloudcore::tokens::create(&client, None, Duration::from_secs(60))
        .await
        .unwrap();
    let edge_dir = dir.path().join("edge");
    sedna_edgecore::join::join(
        &hub.addr().to_string(),
        &token.to_string(),
        "edge-r",
        &edge_dir,
    )
    .await
    .unwrap();
    let before = std::fs::read_to_string(edge_dir.join("pki/node.pem")).unwrap();
    let mut ec = EdgeConfig::new(hub.addr().to_string(), &edge_dir);
    ec.machine.heartbeat = Duration::from_millis(200);
    ec.machine.read_deadline = Duration::from_millis(1500);
    let edge = EdgeHub::start(ec).await.unwrap();
    let mut status = edge.status();
    let renewed = tokio::time::timeout(Duration::from_secs(20), async {
        while status.borrow().renewals == 0 {
            status.changed().await.unwrap();
        }
    })
    .await;
    assert!(
        renewed.is_ok(),
        "no renewal within 20 s of a 9 s certificate"
    );
    let after = std::fs::read_to_string(edge_dir.join("pki/node.pem")).unwrap();
    assert_ne!(before, after);
    // The node reconnects with the new certificate.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !status.borrow().synced {
            status.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    edge.shutdown().await;
    hub.shutdown().await;
    drop(api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_random_connection_cuts_converge() {
    let c = Cluster::start().await;
    let proxy = sedna_testkit::TcpProxy::start(c.hub_addr).await.unwrap();
    c.join("edge-f").await;
    let edge = c.edge_at("edge-f", &proxy.addr().to_string()).await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    // Seeded, so a failure replays: SEDNA_CHAOS_SEED=<seed printed below>.
    let seed = std::env::var("SEDNA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("SEDNA_CHAOS_SEED={seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    // The last status reported for each pod: what the API must hold in the end.
    let mut reported = std::collections::BTreeMap::new();
    for round in 0..100u32 {
        // Change something, report something, and cut the connection at a random moment.
        let i = rng.random_range(0..20);
        let name = format!("cfg-{i}");
        let value = round.to_string();
        match cms.get_opt(&name).await.unwrap() {
            Some(_) if rng.random_bool(0.2) => {
                cms.delete(&name, &DeleteParams::default()).await.unwrap();
            }
            Some(_) => {
                cms.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "data": { "v": value } })),
                )
                .await
                .unwrap();
            }
            None => {
                cms.create(&PostParams::default(), &config_map(&name, &value))
                    .await
                    .unwrap();
            }
        }
        let pod_name = format!("pod-{i}");
        if pods.get_opt(&pod_name).await.unwrap().is_none() {
            pods.create(&PostParams::default(), &pod(&pod_name, "edge-f", &name))
                .await
                .unwrap();
        }
        if rng.random_bool(0.3) {
            let phase = format!("Running-{round}");
            edge.report(&pod_status(&pod_name, &phase)).unwrap();
            reported.insert(pod_name.clone(), phase);
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        proxy.cut_all();
    }
    // Converged: the edge holds exactly the node's view, every status arrived.
    // The writes are over: these are the final versions the edge must reach.
    let live_rvs: std::collections::BTreeMap<String, String> = cms
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| Some((c.metadata.name?, c.metadata.resource_version?)))
        .filter(|(n, _)| n.starts_with("cfg-"))
        .collect();
    let expected_cms: BTreeSet<String> = live_rvs.keys().cloned().collect();
    let expected_pods: BTreeSet<String> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    eventually("the edge converges", || {
        names(&edge, "ConfigMap") == expected_cms
            && names(&edge, "Pod") == expected_pods
            && live_rvs.iter().all(|(name, rv)| {
                edge.store()
                    .get("ConfigMap", "default", name)
                    .ok()
                    .flatten()
                    .is_some_and(|held| held.rv.to_string() == *rv)
            })
    })
    .await;
    for name in &expected_cms {
        let live = cms.get(name).await.unwrap();
        let held = edge
            .store()
            .get("ConfigMap", "default", name)
            .unwrap()
            .unwrap();
        assert_eq!(
            held.rv.to_string(),
            live.metadata.resource_version.unwrap(),
            "{name}"
        );
    }
    eventually("the outbox drains", || {
        edge.store().outbox_len().unwrap() == 0
    })
    .await;
    assert!(
        proxy.connections() >= 50,
        "the edge reconnected: {}",
        proxy.connections()
    );
    // Every pod's last status arrived (earlier ones may be coalesced into it), and no other.
    assert!(!reported.is_empty(), "seed {seed}");
    for name in &expected_pods {
        let message = pods
            .get_status(name)
            .await
            .unwrap()
            .status
            .and_then(|s| s.message);
        assert_eq!(
            message,
            reported
                .get(name)
                .map(|phase| format!("{phase} at the edge")),
            "{name}, seed {seed}"
        );
    }
    edge.shutdown().await;
}
