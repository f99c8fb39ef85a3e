//! Operability shared by every long-running command: Prometheus `/metrics` and `/healthz` on a
//! loopback port. Figures are read from the components' counters at scrape time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

type Read = Box<dyn Fn() -> u64 + Send + Sync>;

enum Kind {
    Counter,
    Gauge,
}

struct Figure {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    read: Read,
}

/// A set of figures read on each scrape.
#[derive(Default)]
pub(crate) struct Figures(Vec<Figure>);

impl std::fmt::Debug for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|f| f.name))
            .finish()
    }
}

impl Figures {
    /// A monotonically increasing figure.
    pub(crate) fn counter(
        mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.0.push(Figure {
            name,
            help,
            kind: Kind::Counter,
            read: Box::new(read),
        });
        self
    }

    /// A figure that goes up and down.
    pub(crate) fn gauge(
        mut self,
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.0.push(Figure {
            name,
            help,
            kind: Kind::Gauge,
            read: Box::new(read),
        });
        self
    }

    /// A counter read from an atomic.
    pub(crate) fn counter_of<T: Send + Sync + 'static>(
        self,
        name: &'static str,
        help: &'static str,
        owner: Arc<T>,
        field: fn(&T) -> &AtomicU64,
    ) -> Self {
        self.counter(name, help, move || field(&owner).load(Ordering::Relaxed))
    }
}

impl Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let value = (f.read)();
            match f.kind {
                Kind::Counter => {
                    let m = ConstCounter::new(value);
                    m.encode(encoder.encode_descriptor(f.name, f.help, None, m.metric_type())?)?;
                }
                Kind::Gauge => {
                    let m = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                    m.encode(encoder.encode_descriptor(f.name, f.help, None, m.metric_type())?)?;
                }
            }
        }
        Ok(())
    }
}

/// The figures of several nodes in one process (`sedna up`): one family per metric, each node a
/// sample with its `node` label, since the exposition format allows one `# HELP`/`# TYPE` per
/// metric name (strict parsers such as `promtool check metrics` refuse repeats).
#[derive(Debug, Default)]
pub(crate) struct NodeFigures(Vec<(String, Figures)>);

impl NodeFigures {
    /// Adds a node's figures (every node's must list the same metrics, as `agent_figures`).
    pub(crate) fn add(&mut self, node: impl Into<String>, figures: Figures) {
        self.0.push((node.into(), figures));
    }
}

impl Collector for NodeFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let Some((_, first)) = self.0.first() else {
            return Ok(());
        };
        for (i, f) in first.0.iter().enumerate() {
            let metric_type = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut family = encoder.encode_descriptor(f.name, f.help, None, metric_type)?;
            for (node, figures) in &self.0 {
                let Some(figure) = figures.0.get(i).filter(|g| g.name == f.name) else {
                    continue;
                };
                let labels = vec![("node".to_owned(), node.clone())];
                let sample = family.encode_family(&labels)?;
                let value = (figure.read)();
                match figure.kind {
                    Kind::Counter => ConstCounter::new(value).encode(sample)?,
                    Kind::Gauge => {
                        ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(sample)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// Health of the process: `/healthz` answers 200 while it says true.
pub(crate) type Health = Arc<dyn Fn() -> bool + Send + Sync>;

/// Serves `/metrics` and `/healthz` on `addr` (keep it on loopback). Returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let registry = registry.clone();
                        let health = health.clone();
                        async move { Ok::<_, Infallible>(answer(&req, &registry, &health)) }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn answer(
    req: &Request<hyper::body::Incoming>,
    registry: &Registry,
    health: &Health,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = http::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        r
    };
    match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        "/healthz" | "/livez" | "/readyz" => {
            if health() {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "unhealthy\n".into(),
                )
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Starts the endpoint when an address is given; a port that is taken is logged, not fatal
/// (the workload matters more than its figures).
pub(crate) async fn start(addr: Option<SocketAddr>, registry: Registry, health: Health) {
    let Some(addr) = addr else { return };
    match serve(addr, registry, health).await {
        Ok(bound) => println!("metrics on http://{bound}/metrics"),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "metrics endpoint not started"),
    }
}

/// The hub's figures.
pub(crate) fn hub_figures(hub: &sedna_cloudcore::Hub) -> Figures {
    use sedna_cloudcore::HubStats as S;
    let s = hub.stats();
    Figures::default()
        .gauge("connected_nodes", "Edge nodes connected now", {
            let s = s.clone();
            move || s.connected.load(Ordering::Relaxed)
        })
        .counter_of("sessions", "Node sessions started", s.clone(), |s: &S| {
            &s.sessions
        })
        .gauge(
            "partitions_served",
            "Partitions of the hub tier this hub serves now",
            {
                let s = s.clone();
                move || s.partitions_served.load(Ordering::Relaxed)
            },
        )
        .counter_of(
            "partitions_lost",
            "Partitions of the hub tier this hub stopped serving without giving them up (not renewed in time)",
            s.clone(),
            |s: &S| &s.partitions_lost,
        )
        .counter_of(
            "redirects",
            "Nodes sent to the hub of the tier that serves them",
            s.clone(),
            |s: &S| &s.redirects,
        )
        .counter_of(
            "lease_writes_skipped",
            "Node Lease renewals acknowledged without an API write (the stored one was recent)",
            s.clone(),
            |s: &S| &s.lease_writes_skipped,
        )
        .counter_of(
            "node_status_only",
            "Node status reports applied without their unchanged metadata (one API request, not two)",
            s.clone(),
            |s: &S| &s.node_status_only,
        )
        .counter_of(
            "nodes_marked_not_ready",
            "Nodes this hub's lifecycle marked NotReady (their lease ran out)",
            s.clone(),
            |s: &S| &s.nodes_marked_not_ready,
        )
        .counter_of(
            "resync_manifest_buckets",
            "Buckets sent as manifests during resyncs",
            s.clone(),
            |s: &S| &s.manifest_buckets,
        )
        .counter_of(
            "resync_objects_wanted",
            "Objects edges asked for during resyncs",
            s.clone(),
            |s: &S| &s.objects_wanted,
        )
        .counter_of(
            "upserts_sent",
            "Objects sent to edges",
            s.clone(),
            |s: &S| &s.upserts_sent,
        )
        .counter_of(
            "deletes_sent",
            "Deletions sent to edges",
            s.clone(),
            |s: &S| &s.deletes_sent,
        )
        .counter_of(
            "payload_bytes_sent",
            "Object bytes sent to edges",
            s.clone(),
            |s: &S| &s.payload_bytes_sent,
        )
        .counter_of(
            "upstream_applied",
            "Edge writes applied to the API",
            s.clone(),
            |s: &S| &s.upstream_applied,
        )
        .counter_of(
            "upstream_rejected",
            "Edge writes refused",
            s.clone(),
            |s: &S| &s.upstream_rejected,
        )
        .counter_of("joins", "Nodes joined", s.clone(), |s: &S| &s.joins)
        .counter_of("joins_refused", "Joins refused", s.clone(), |s: &S| {
            &s.joins_refused
        })
        .counter_of(
            "unauthenticated",
            "Connections refused without a valid node certificate",
            s.clone(),
            |s: &S| &s.unauthenticated,
        )
        .counter_of(
            "handshakes_dropped",
            "Connections closed before their TLS handshake completed (over the bounds, \
             evicted, silent or failed)",
            s.clone(),
            |s: &S| &s.handshakes_dropped,
        )
        .counter_of(
            "handshakes_refused",
            "Of the connections closed before their handshake, those refused on arrival \
             because every handshake slot and waiting place was taken",
            s.clone(),
            |s: &S| &s.handshakes_refused,
        )
        .counter_of(
            "handshakes_queued",
            "Connections that waited for a handshake slot (whether they got one or not)",
            s,
            |s: &S| &s.handshakes_queued,
        )
}

/// An edge agent's figures.
pub(crate) fn agent_figures(agent: &sedna_edgecore::Agent) -> Figures {
    use sedna_edgecore::runtime::RuntimeStats as R;
    let r = agent.runtime_stats();
    let status = agent.hub().status();
    let store = agent.hub().store().clone();
    let outbox = store.clone();
    let coalesced = store.clone();
    Figures::default()
        .gauge("connected", "1 while connected to the hub", {
            let status = status.clone();
            move || u64::from(status.borrow().connected)
        })
        .counter("resyncs", "Resyncs with the hub", {
            let status = status.clone();
            move || status.borrow().syncs
        })
        .counter("connections", "Connections to the hub", move || {
            status.borrow().connections
        })
        .gauge("outbox_depth", "Writes queued for the hub", move || {
            outbox.outbox_len().unwrap_or(0) as u64
        })
        .counter(
            "outbox_statuses_coalesced",
            "Queued statuses replaced by newer ones",
            move || {
                coalesced
                    .outbox_stats()
                    .statuses_coalesced
                    .load(Ordering::Relaxed)
            },
        )
        .gauge("stored_objects", "Objects in the local store", move || {
            store.len().unwrap_or(0) as u64
        })
        .gauge("pods", "Pods supervised", {
            let r = r.clone();
            move || r.pods.load(Ordering::Relaxed)
        })
        .gauge("containers_running", "Containers running", {
            let r = r.clone();
            move || r.running.load(Ordering::Relaxed)
        })
        .counter_of("container_restarts", "Container restarts", r, |r: &R| {
            &r.restarts
        })
}

/// The API server's figures.
pub(crate) fn apiserver_figures(server: &sedna_apiserver::ApiServer) -> Figures {
    let store = server.store().clone();
    Figures::default().gauge("revision", "Newest resource version", move || store.head())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn metrics_and_health_are_served_on_loopback() {
        let count = Arc::new(AtomicU64::new(7));
        let mut registry = Registry::with_prefix("sedna_test");
        let c = count.clone();
        registry.register_collector(Box::new(
            Figures::default()
                .gauge("things", "Things", move || c.load(Ordering::Relaxed))
                .counter("events", "Events", || 3),
        ));
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = healthy.clone();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            registry,
            Arc::new(move || h.load(Ordering::Relaxed)),
        )
        .await
        .unwrap();
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let text = get("/metrics").await;
        assert!(text.contains("sedna_test_things 7"), "{text}");
        assert!(text.contains("sedna_test_events_total 3"), "{text}");
        count.store(9, Ordering::Relaxed);
        assert!(get("/metrics").await.contains("sedna_test_things 9"));
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        healthy.store(false, Ordering::Relaxed);
        assert!(get("/healthz").await.starts_with("HTTP/1.1 503"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    }

    /// Checks the text exposition format strictly, as `promtool check metrics` does for what
    /// matters here: one `# HELP` and one `# TYPE` per metric family, before its samples, and
    /// each family's samples together. Returns the samples by family.
    fn parse_strictly(text: &str) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut families: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let (mut helped, mut typed) = (
            std::collections::HashSet::new(),
            std::collections::HashSet::new(),
        );
        let mut current: Option<String> = None;
        for line in text.lines().filter(|l| !l.is_empty() && *l != "# EOF") {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(
                    helped.insert(name.clone()),
                    "a second HELP for {name}:\n{text}"
                );
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(
                    typed.insert(name.clone()),
                    "a second TYPE for {name}:\n{text}"
                );
                current = Some(name.clone());
                families.entry(name).or_default();
            } else {
                assert!(!line.starts_with('#'), "unknown comment {line}");
                let family = current.clone().expect("a sample before any TYPE");
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    name == family || name == format!("{family}_total"),
                    "sample {name} outside its family {family}:\n{text}"
                );
                families.get_mut(&family).unwrap().push(line.to_owned());
            }
        }
        families
    }

    #[test]
    fn many_nodes_make_one_family_per_metric_with_a_node_label() {
        let mut registry = Registry::default();
        let mut nodes = NodeFigures::default();
        for (node, n) in [("edge-1", 1), ("edge-2", 2), ("cloud", 3)] {
            nodes.add(
                node,
                Figures::default()
                    .gauge("pods", "Pods supervised", move || n)
                    .counter("resyncs", "Resyncs", move || 10 * n),
            );
        }
        registry
            .sub_registry_with_prefix("sedna_edge")
            .register_collector(Box::new(nodes));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let families = parse_strictly(&text);
        assert_eq!(
            families["sedna_edge_pods"],
            [
                "sedna_edge_pods{node=\"edge-1\"} 1",
                "sedna_edge_pods{node=\"edge-2\"} 2",
                "sedna_edge_pods{node=\"cloud\"} 3"
            ]
        );
        assert_eq!(families["sedna_edge_resyncs"].len(), 3, "{text}");
        assert!(
            text.contains("sedna_edge_resyncs_total{node=\"cloud\"} 30"),
            "{text}"
        );

        // What `sedna up` did before: one collector per node under a label, each repeating
        // the HELP and TYPE lines, which the strict check refuses.
        let mut old = Registry::default();
        for node in ["edge-1", "edge-2"] {
            old.sub_registry_with_label((
                std::borrow::Cow::Borrowed("node"),
                std::borrow::Cow::Owned(node.to_owned()),
            ))
            .sub_registry_with_prefix("sedna_edge")
            .register_collector(Box::new(Figures::default().gauge("pods", "Pods", || 1)));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &old).unwrap();
        let refused = std::panic::catch_unwind(|| parse_strictly(&text));
        assert!(
            refused.is_err(),
            "the check must catch repeated families:\n{text}"
        );
    }
}
