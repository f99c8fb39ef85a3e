//! The node's local Kubernetes API (MetaServer): edge apps list and watch the node's objects
//! on 127.0.0.1 with any Kubernetes client, also while the cloud is unreachable.
//!
//! It is the platform's API server (`sedna-apiserver`) run as a cache: every object of the
//! edge store is mirrored into it, as the hub sent it, and it follows the store's changes.
//! It is read-mostly: clients may only update the `status` of Pods and of the platform's
//! objects, and create Events; such writes are applied locally at once and queued upstream
//! through the outbox (the cloud's answer then replaces the local copy). Everything else is
//! refused with 403 Forbidden: change objects through the cloud API.
//!
//! Devices are shown with their live values: the device manager's latest twins (at most one
//! update per device per second) laid over the status the cloud last sent.
//!
//! The node's administrator authenticates with the token in `<data>/metaserver/kubeconfig`
//! (mode 0600) and reads everything; each pod gets its own token, scoped to what the pod
//! uses ([`crate::podtoken`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use sedna_apiserver::store::{Durability, EventKind};
use sedna_apiserver::{ApiServer, Config, MirrorError, WritePolicy, WriteRequest};
use sedna_proto::channel::{ObjectRef, Upstream, upstream::Kind as UpstreamKind};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::devices::twin::LiveTwins;
use crate::podtoken::{PodApi, PodTokens};
use crate::runtime::Reporter;
use crate::store::{Change, EdgeStore};

/// MetaServer settings.
#[derive(Clone, Debug)]
pub struct MetaConfig {
    /// Address to listen on (keep it on loopback).
    pub listen: SocketAddr,
    /// Where its cache, certificates and kubeconfig live.
    pub data_dir: PathBuf,
}

/// Why the MetaServer could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The API server failed to start (retryable when its port or lock is busy).
    #[error("starting the local API: {0}")]
    Start(#[from] sedna_apiserver::StartError),
    /// Mirroring failed.
    #[error("mirroring the store: {0}")]
    Mirror(#[from] MirrorError),
    /// The edge store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The pod-token key could not be read or written (not retryable: fix the directory).
    #[error("the pod-token key: {0}")]
    Key(#[from] sedna_apiserver::pki::PkiError),
}

impl MetaError {
    /// Whether trying again could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            MetaError::Start(e) => e.is_retryable(),
            MetaError::Mirror(e) => e.is_retryable(),
            MetaError::Store(e) => e.is_retryable(),
            MetaError::Key(_) => false,
        }
    }
}

/// Groups whose objects' status the node's apps may update.
const PLATFORM_GROUP_SUFFIX: &str = "sedna.io";

/// The writes the local API accepts.
pub fn allowed(w: &WriteRequest<'_>) -> Result<(), String> {
    let status_of_workload = matches!(w.method, "PUT" | "PATCH")
        && w.subresource == Some("status")
        && w.name.is_some()
        && ((w.group.is_empty() && w.resource == "pods")
            || w.group.ends_with(PLATFORM_GROUP_SUFFIX));
    let event = w.method == "POST"
        && w.subresource.is_none()
        && w.resource == "events"
        && (w.group.is_empty() || w.group == "events.k8s.io");
    if status_of_workload || event {
        Ok(())
    } else {
        Err(format!(
            "the node's local API is read-only for {} {}: it accepts only status updates of pods \
             and platform objects, and new events; make other changes through the cloud API",
            w.method,
            if w.group.is_empty() {
                w.resource.to_owned()
            } else {
                format!("{}.{}", w.resource, w.group)
            }
        ))
    }
}

/// The running local API.
pub struct MetaServer {
    server: Arc<ApiServer>,
    pod_api: PodApi,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MetaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaServer")
            .field("url", &self.server.url())
            .finish()
    }
}

struct Mirror {
    server: Arc<ApiServer>,
    live: LiveTwins,
    store: EdgeStore,
    reporter: Arc<dyn Reporter>,
    /// Revisions the mirror wrote itself (not forwarded upstream).
    own: HashSet<u64>,
    /// kind → apiVersion, for deletions (which name the kind only).
    versions: HashMap<String, String>,
    cursor: u64,
}

impl Mirror {
    async fn put(&mut self, api_version: &str, kind: &str, value: &[u8]) {
        self.versions
            .insert(kind.to_owned(), api_version.to_owned());
        let Ok(mut object) = serde_json::from_slice::<Value>(value) else {
            return;
        };
        if kind == "Device" {
            self.live.overlay(&mut object);
        }
        match self.server.mirror_put(object).await {
            Ok(Some(rev)) => {
                self.own.insert(rev);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(%kind, error = %e, "not mirrored to the local API"),
        }
    }

    async fn delete(&mut self, kind: &str, namespace: &str, name: &str) {
        let Some(api_version) = self.versions.get(kind).cloned() else {
            return;
        };
        match self
            .server
            .mirror_delete(&api_version, kind, namespace, name)
            .await
        {
            Ok(Some(rev)) => {
                self.own.insert(rev);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(%kind, error = %e, "not removed from the local API"),
        }
    }

    /// Makes the local API hold exactly the store's objects.
    async fn reconcile(&mut self) -> Result<(), MetaError> {
        let objects = self.store.list_all()?;
        let mut kinds: BTreeSet<(String, String)> = [
            ("v1", "Pod"),
            ("v1", "ConfigMap"),
            ("v1", "Secret"),
            ("v1", "Node"),
            ("coordination.k8s.io/v1", "Lease"),
        ]
        .iter()
        .map(|(a, k)| ((*a).to_owned(), (*k).to_owned()))
        .collect();
        for crd in sedna_api::crds() {
            for v in &crd.spec.versions {
                kinds.insert((
                    format!("{}/{}", crd.spec.group, v.name),
                    crd.spec.names.kind.clone(),
                ));
            }
        }
        let mut held: HashSet<String> = HashSet::new();
        for o in &objects {
            kinds.insert((o.api_version.clone(), o.kind.clone()));
            held.insert(o.uid.clone());
            self.put(&o.api_version, &o.kind, &o.value).await;
        }
        for (api_version, kind) in kinds {
            self.versions.insert(kind.clone(), api_version.clone());
            for (namespace, name, uid) in self.server.mirror_list(&api_version, &kind) {
                if !held.contains(&uid) {
                    self.delete(&kind, &namespace, &name).await;
                }
            }
        }
        Ok(())
    }

    /// Forwards the clients' writes (every change the mirror did not make) upstream.
    fn forward(&mut self) {
        loop {
            let events = match self.server.store().events_since(self.cursor, "", 512) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "local API log compacted; some client writes may not reach the cloud");
                    self.cursor = self.server.store().head();
                    return;
                }
            };
            if events.is_empty() {
                return;
            }
            for event in events {
                self.cursor = event.rev;
                if self.own.remove(&event.rev) || event.kind == EventKind::Deleted {
                    continue;
                }
                if let Some(upstream) = upstream_of(&event.object, event.prev.as_deref())
                    && let Err(e) = self.reporter.report(&upstream)
                {
                    tracing::warn!(error = %e, "could not queue a local API write");
                }
            }
        }
    }
}

/// The upstream write for a client's change: an Event, or a status.
fn upstream_of(object: &Value, prev: Option<&Value>) -> Option<Upstream> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let meta = |v: &Value, f: &str| {
        v.pointer(&format!("/metadata/{f}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    if kind == "Event" {
        let mut event = object.clone();
        if let Some(m) = event.get_mut("metadata").and_then(Value::as_object_mut) {
            m.retain(|k, _| k == "name" || k == "namespace");
        }
        let involved = object
            .get("involvedObject")
            .or_else(|| object.get("regarding"))?;
        return Some(Upstream {
            kind: UpstreamKind::Event as i32,
            object: Some(ObjectRef {
                api_version: involved["apiVersion"].as_str().unwrap_or_default().into(),
                kind: involved["kind"].as_str().unwrap_or_default().into(),
                namespace: involved["namespace"].as_str().unwrap_or_default().into(),
                name: involved["name"].as_str().unwrap_or_default().into(),
                uid: involved["uid"].as_str().unwrap_or_default().into(),
            }),
            payload: event.to_string().into_bytes(),
        });
    }
    let status = object.get("status")?;
    if prev.and_then(|p| p.get("status")) == Some(status) {
        return None;
    }
    Some(Upstream {
        kind: UpstreamKind::Status as i32,
        object: Some(ObjectRef {
            api_version: api_version.into(),
            kind: kind.into(),
            namespace: meta(object, "namespace"),
            name: meta(object, "name"),
            uid: meta(object, "uid"),
        }),
        payload: json!({ "status": status }).to_string().into_bytes(),
    })
}

impl MetaServer {
    /// Starts the local API, mirrors the store into it and follows the store's changes.
    pub async fn start(
        config: MetaConfig,
        store: EdgeStore,
        mut changes: broadcast::Receiver<Change>,
        reporter: Arc<dyn Reporter>,
        live: LiveTwins,
    ) -> Result<MetaServer, MetaError> {
        let mut api = Config::new(&config.data_dir);
        api.listen = config.listen;
        api.store.durability = Durability::Process;
        // A small node: the objects live in memory anyway; keep little history and cache.
        api.store.cache_kib = 256;
        api.store.keep_revisions = 200;
        api.garbage_collection = false;
        api.write_policy = Some(WritePolicy(Arc::new(allowed)));
        let tokens = Arc::new(PodTokens::load_or_create(
            &config.data_dir.join("pod-token.key"),
        )?);
        api.authenticator = Some(tokens.authenticator());
        api.authorizer = Some(crate::podtoken::authorizer());
        let server = Arc::new(ApiServer::start(api).await?);
        let pod_api = PodApi {
            url: server.url(),
            ca_pem: server.ca_pem().to_owned(),
            tokens,
        };
        for crd in sedna_api::crds() {
            if let Ok(v) = serde_json::to_value(&crd) {
                server.mirror_put(v).await?;
            }
        }
        let mut live_changes = live.subscribe();
        let mut mirror = Mirror {
            server: server.clone(),
            live,
            store,
            reporter,
            own: HashSet::new(),
            versions: HashMap::new(),
            cursor: 0,
        };
        mirror.reconcile().await?;
        mirror.cursor = server.store().head();
        mirror.own.clear();
        let mut head = server.store().subscribe();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    change = changes.recv() => match change {
                        Ok(Change::Upserted(o)) => {
                            let stored = mirror.store.get(&o.kind, &o.namespace, &o.name).ok().flatten();
                            if let Some(s) = stored {
                                mirror.put(&s.api_version, &s.kind, &s.value).await;
                            }
                        }
                        Ok(Change::Deleted { kind, namespace, name, .. }) => {
                            mirror.delete(&kind, &namespace, &name).await;
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            if let Err(e) = mirror.reconcile().await {
                                tracing::warn!(error = %e, "local API resync failed");
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    changed = head.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    Ok(()) = live_changes.changed() => {
                        for (namespace, name) in mirror.live.take_pending() {
                            let stored = mirror.store.get("Device", &namespace, &name).ok().flatten();
                            if let Some(s) = stored {
                                mirror.put(&s.api_version, &s.kind, &s.value).await;
                            }
                        }
                    }
                }
                mirror.forward();
            }
        });
        tracing::info!(url = %server.url(), "local API serving the node's objects");
        Ok(MetaServer {
            server,
            pod_api,
            task,
        })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// What the runtime needs to give each pod its own token.
    pub fn pod_api(&self) -> PodApi {
        self.pod_api.clone()
    }

    /// The node administrator's kubeconfig (every object of the node, read-only).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.server.kubeconfig_path().to_owned()
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        match Arc::try_unwrap(self.server) {
            Ok(server) => server.shutdown().await,
            Err(_) => tracing::debug!("local API still referenced at shutdown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w<'a>(
        method: &'a str,
        group: &'a str,
        resource: &'a str,
        sub: Option<&'a str>,
    ) -> WriteRequest<'a> {
        WriteRequest {
            method,
            group,
            resource,
            subresource: sub,
            namespace: Some("default"),
            name: if method == "POST" { None } else { Some("x") },
        }
    }

    #[test]
    fn only_statuses_and_events_may_be_written_locally() {
        assert!(allowed(&w("PATCH", "", "pods", Some("status"))).is_ok());
        assert!(
            allowed(&w(
                "PUT",
                "sedna.io",
                "jointinferenceservices",
                Some("status")
            ))
            .is_ok()
        );
        assert!(allowed(&w("POST", "", "events", None)).is_ok());
        assert!(allowed(&w("POST", "events.k8s.io", "events", None)).is_ok());
        let refused = allowed(&w("PATCH", "", "configmaps", None)).unwrap_err();
        assert!(
            refused.contains("read-only for PATCH configmaps"),
            "{refused}"
        );
        assert!(allowed(&w("DELETE", "", "pods", None)).is_err());
        assert!(allowed(&w("PATCH", "", "pods", None)).is_err());
        assert!(allowed(&w("PATCH", "", "secrets", Some("status"))).is_err());
    }

    #[test]
    fn client_writes_become_upstream_statuses_and_events() {
        let pod = json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "p", "namespace": "default", "uid": "u" },
            "status": { "phase": "Running", "message": "model loaded" } });
        let prev = json!({ "apiVersion": "v1", "kind": "Pod", "status": { "phase": "Running" } });
        let u = upstream_of(&pod, Some(&prev)).unwrap_or_default();
        assert_eq!(u.kind, UpstreamKind::Status as i32);
        assert_eq!(u.object.as_ref().map(|o| o.uid.as_str()), Some("u"));
        let payload: Value = serde_json::from_slice(&u.payload).unwrap_or_default();
        assert_eq!(payload["status"]["message"], "model loaded");
        // A change that leaves the status alone is not a status write.
        assert!(upstream_of(&pod, Some(&pod)).is_none());

        let event = json!({ "apiVersion": "v1", "kind": "Event",
            "metadata": { "name": "e", "namespace": "default", "uid": "local", "resourceVersion": "9" },
            "involvedObject": { "apiVersion": "v1", "kind": "Pod", "name": "p", "namespace": "default", "uid": "u" },
            "reason": "Inferred", "message": "hard example uploaded" });
        let u = upstream_of(&event, None).unwrap_or_default();
        assert_eq!(u.kind, UpstreamKind::Event as i32);
        let payload: Value = serde_json::from_slice(&u.payload).unwrap_or_default();
        assert!(payload["metadata"].get("uid").is_none());
        assert_eq!(payload["reason"], "Inferred");
    }
}
