//! The HTTPS server: TLS (HTTP/2 and HTTP/1.1), bearer-token authentication, request routing,
//! body limits, and the background tasks (compaction, garbage collection).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::authz::{Attributes, Authenticator, Authorizer};
use crate::discovery;
use crate::error::ApiError;
use crate::handlers::{self, Call, Reply};
use crate::pki::{self, Layout, Pki, Tokens, User};
use crate::registry::{Registry, ResourceType};
use crate::request::{self, Query, Representation, Route};
use crate::store::{Mutation, Precondition, Store, StoreError, StoreOptions};
use crate::watch as watches;

/// Server settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the database, PKI, token file and kubeconfig live.
    pub data_dir: PathBuf,
    /// Address to listen on (default `127.0.0.1:6443`; port 0 picks a free port).
    pub listen: SocketAddr,
    /// Extra names or IP addresses for the serving certificate.
    pub extra_sans: Vec<String>,
    /// Storage settings.
    pub store: StoreOptions,
    /// Largest accepted request body (default 3 MiB, as kube-apiserver).
    pub max_body_bytes: usize,
    /// How often the log is compacted.
    pub compaction_interval: Duration,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// The longest a watch lasts (a client's shorter `timeoutSeconds` wins); clients then
    /// watch again from their last resourceVersion.
    pub watch_timeout: Duration,
    /// How often the garbage collector sweeps everything.
    pub gc_interval: Duration,
    /// Whether the garbage collector runs (off for a cache of another API server, whose
    /// owners may not all be cached).
    pub garbage_collection: bool,
    /// Which writes clients may make (default: every write of an authenticated client).
    pub write_policy: Option<WritePolicy>,
    /// Who may do what (default: [`crate::authz::rbac`] over the stored RBAC objects, with
    /// Kubernetes' default ClusterRoles created at start).
    pub authorizer: Option<Authorizer>,
    /// Bearer tokens beyond the token file (default: none).
    pub authenticator: Option<Authenticator>,
    /// Opens streams to nodes for `pods/log`, `exec`, `attach` and `portforward` (default:
    /// none; those answer 503).
    pub node_dialer: Option<crate::nodestream::NodeDialer>,
    /// Most client connections open at once (handshaking, idle or busy); a connection beyond
    /// it is closed at once, so the server never runs out of file descriptors.
    pub max_connections: usize,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long a client may take to send a request's headers (HTTP/1).
    pub header_read_timeout: Duration,
}

/// A write a client asks for, as the write policy sees it.
#[derive(Clone, Debug)]
pub struct WriteRequest<'a> {
    /// HTTP method (`POST`, `PUT`, `PATCH`, `DELETE`).
    pub method: &'a str,
    /// API group (`""` for core).
    pub group: &'a str,
    /// Plural resource.
    pub resource: &'a str,
    /// Subresource (`status`…).
    pub subresource: Option<&'a str>,
    /// Namespace.
    pub namespace: Option<&'a str>,
    /// Name (absent for a create or a collection).
    pub name: Option<&'a str>,
}

/// The decision function of a [`WritePolicy`]: `Err` carries the reason for the client.
pub type WriteCheck = dyn Fn(&WriteRequest<'_>) -> Result<(), String> + Send + Sync;

/// Decides whether a write is allowed; a refusal is answered 403 Forbidden with the message.
#[derive(Clone)]
pub struct WritePolicy(pub Arc<WriteCheck>);

impl std::fmt::Debug for WritePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WritePolicy")
    }
}

impl Config {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
            extra_sans: vec![],
            store: StoreOptions::default(),
            max_body_bytes: 3 * 1024 * 1024,
            compaction_interval: Duration::from_secs(60),
            bookmark_interval: Duration::from_secs(60),
            watch_timeout: Duration::from_secs(1800),
            gc_interval: Duration::from_secs(30),
            garbage_collection: true,
            write_policy: None,
            authorizer: None,
            authenticator: None,
            node_dialer: None,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store failed to open.
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    /// Certificates, keys or tokens failed.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The listener could not bind.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

impl StartError {
    /// Whether trying again could succeed (a port or lock held by another process may be
    /// released).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StartError::Listen { .. } | StartError::Store(StoreError::Locked(_))
        )
    }
}

/// Why a mirror write failed.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The server does not serve the kind (install its CRD first). Not retryable.
    #[error("unknown kind {0}")]
    UnknownKind(String),
    /// The object cannot be stored. Not retryable.
    #[error("invalid object: {0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl MirrorError {
    /// Whether trying again could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MirrorError::Store(e) if e.is_retryable())
    }
}

/// What every request handler shares.
pub struct Api {
    /// The revision log.
    pub store: Store,
    /// Served types.
    pub registry: Registry,
    /// Settings.
    pub config: Config,
    /// Bearer tokens.
    pub tokens: Tokens,
    /// Flips to `true` at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// `host:port` clients reach the server at.
    pub address: String,
    /// ServiceAccount tokens (TokenRequest).
    pub sa_tokens: crate::tokenrequest::ServiceAccountTokens,
}

/// A running server.
pub struct ApiServer {
    api: Arc<Api>,
    addr: SocketAddr,
    ca_pem: String,
    admin_token: String,
    kubeconfig_path: PathBuf,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}

const DEFAULT_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

impl ApiServer {
    /// Opens the data directory, prepares certificates and tokens, starts listening, writes
    /// the admin kubeconfig, and starts the background tasks.
    pub async fn start(config: Config) -> Result<ApiServer, StartError> {
        let layout = Layout {
            dir: config.data_dir.clone(),
        };
        create_private_dir(&layout.dir)?;
        let store = Store::open(&layout.database(), config.store.clone())?;
        let pki = Pki::load_or_create(&layout.pki(), &config.extra_sans)?;
        let (tokens, admin_token) = Tokens::load_or_create(&layout.tokens())?;
        let tls = pki.server_config()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
        let client_host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            match addr.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            }
        };
        let address = format!("{client_host}:{}", addr.port());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let api = Arc::new(Api {
            store,
            registry: Registry::new(),
            config: config.clone(),
            tokens,
            shutdown: shutdown_rx,
            address: address.clone(),
            sa_tokens: crate::tokenrequest::ServiceAccountTokens::load_or_create(
                &layout.dir.join("serviceaccount-token.key"),
            )?,
        });
        for crd in api
            .store
            .list("apiextensions.k8s.io/customresourcedefinitions/")
            .0
        {
            let name = crate::meta::meta_str(&crd.value, "name").unwrap_or_default();
            handlers::sync_crd(&api, name, Some(&crd.value));
        }
        for ns in DEFAULT_NAMESPACES {
            ensure_namespace(&api, ns).await?;
        }
        if config.authorizer.is_none() {
            for role in crate::authz::default_cluster_roles() {
                ensure_cluster_role(&api, role).await?;
            }
            ensure_kubernetes_service(&api, addr.port()).await?;
            for ns in DEFAULT_NAMESPACES {
                ensure_default_service_account(&api, ns).await?;
            }
            ensure_api_services(&api).await?;
        }
        let kubeconfig_path = layout.kubeconfig();
        pki::write_private(
            &kubeconfig_path,
            pki::kubeconfig(&format!("https://{address}"), &pki.ca_pem, &admin_token),
        )?;
        let mut tasks = vec![
            tokio::spawn(accept_loop(api.clone(), listener, tls)),
            tokio::spawn(compaction_loop(api.clone())),
        ];
        if config.garbage_collection {
            tasks.push(tokio::spawn(crate::gc::run(
                api.clone(),
                config.gc_interval,
            )));
        }
        tracing::info!(%address, data_dir = %config.data_dir.display(), "API server started");
        Ok(ApiServer {
            api,
            addr,
            ca_pem: pki.ca_pem,
            admin_token,
            kubeconfig_path,
            shutdown: shutdown_tx,
            tasks,
        })
    }

    /// Stores an object exactly as given (its `resourceVersion` replaced by the local one),
    /// without admission or defaulting: for caches that mirror another API server. Returns
    /// the local revision, or `None` when the stored object was already identical.
    pub async fn mirror_put(&self, mut object: Value) -> Result<Option<u64>, MirrorError> {
        let (key, t) = self.mirror_key(&object)?;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        let is_crd = t.group == "apiextensions.k8s.io" && t.resource == "customresourcedefinitions";
        if is_crd && object.get("status").is_none() {
            // A CRD that no API server has accepted yet (say, one generated locally): check
            // and establish it here, as a create would.
            handlers::check_crd(&self.api, &mut object)
                .map_err(|e| MirrorError::Invalid(e.to_string()))?;
        }
        if let Some(current) = self.api.store.get(&key) {
            let mut old = current.value.as_ref().clone();
            if let Some(meta) = old.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("resourceVersion");
            }
            if old == object {
                return Ok(None);
            }
        }
        let stored = self
            .api
            .store
            .write(key, Precondition::Any, Mutation::Put(object))
            .await?;
        if is_crd {
            let name = crate::meta::meta_str(&stored.value, "name").unwrap_or_default();
            handlers::sync_crd(&self.api, name, Some(&stored.value));
        }
        Ok(Some(stored.rev))
    }

    /// Removes a mirrored object; `None` when it was not there.
    pub async fn mirror_delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<u64>, MirrorError> {
        let object = serde_json::json!({ "apiVersion": api_version, "kind": kind,
                                         "metadata": { "namespace": namespace, "name": name } });
        let (key, _) = self.mirror_key(&object)?;
        match self
            .api
            .store
            .write(key, Precondition::Exists, Mutation::Delete)
            .await
        {
            Ok(s) => Ok(Some(s.rev)),
            Err(StoreError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `(namespace, name, uid)` of every stored object of a kind.
    pub fn mirror_list(&self, api_version: &str, kind: &str) -> Vec<(String, String, String)> {
        let Some(t) = self.api.registry.by_kind(api_version, kind) else {
            return vec![];
        };
        self.api
            .store
            .list(&t.key_prefix(None))
            .0
            .iter()
            .map(|s| {
                let m = |f: &str| {
                    crate::meta::meta_str(&s.value, f)
                        .unwrap_or_default()
                        .to_owned()
                };
                (m("namespace"), m("name"), m("uid"))
            })
            .collect()
    }

    fn mirror_key(&self, object: &Value) -> Result<(String, Arc<ResourceType>), MirrorError> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let t = self
            .api
            .registry
            .by_kind(api_version, kind)
            .ok_or_else(|| MirrorError::UnknownKind(format!("{api_version} {kind}")))?;
        let name = crate::meta::meta_str(object, "name").unwrap_or_default();
        if name.is_empty() {
            return Err(MirrorError::Invalid("an object without a name".into()));
        }
        let namespace = crate::meta::meta_str(object, "namespace")
            .filter(|n| !n.is_empty())
            .unwrap_or("default");
        let key = t.key(t.namespaced.then_some(namespace), name);
        Ok((key, t))
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://host:port`.
    pub fn url(&self) -> String {
        format!("https://{}", self.api.address)
    }

    /// The CA certificate clients must trust (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The admin bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Where the admin kubeconfig was written.
    pub fn kubeconfig_path(&self) -> &std::path::Path {
        &self.kubeconfig_path
    }

    /// The store (for embedding components in the same process).
    pub fn store(&self) -> &Store {
        &self.api.store
    }

    /// Stops accepting, ends watches, waits for the background tasks and closes the store.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        self.api.store.close();
    }
}

fn create_private_dir(dir: &std::path::Path) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| {
        StartError::Pki(pki::PkiError::Io {
            path: dir.display().to_string(),
            source,
        })
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    Ok(())
}

async fn ensure_namespace(api: &Api, name: &str) -> Result<(), StartError> {
    let key = format!("core/namespaces//{name}");
    if api.store.get(&key).is_some() {
        return Ok(());
    }
    let ns = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": name, "uid": crate::meta::new_uid(),
                      "creationTimestamp": crate::meta::now(),
                      "labels": { "kubernetes.io/metadata.name": name } },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    });
    create_if_absent(api, key, ns).await
}

/// The `default/kubernetes` Service clients look for: ClusterIP 10.96.0.1 (the first address
/// of the service range, which no other Service gets), port 443 `https` to this server's port
/// (brought up to date at every start).
async fn ensure_kubernetes_service(api: &Api, port: u16) -> Result<(), StartError> {
    let key = "core/services/default/kubernetes".to_owned();
    let ports = json!([{ "name": "https", "port": 443, "protocol": "TCP", "targetPort": port }]);
    match api.store.get(&key) {
        Some(current) if current.value.pointer("/spec/ports") == Some(&ports) => Ok(()),
        Some(current) => {
            let mut service = current.value.as_ref().clone();
            service["spec"]["ports"] = ports;
            match api
                .store
                .write(
                    key,
                    Precondition::Revision(current.rev),
                    Mutation::Put(service),
                )
                .await
            {
                Ok(_) | Err(StoreError::Conflict) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        None => {
            let service = json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": "kubernetes", "namespace": "default",
                              "uid": crate::meta::new_uid(),
                              "creationTimestamp": crate::meta::now(),
                              "labels": { "component": "apiserver", "provider": "kubernetes" } },
                "spec": { "type": "ClusterIP", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                          "ports": ports, "sessionAffinity": "None",
                          "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack" },
                "status": { "loadBalancer": {} },
            });
            create_if_absent(api, key, service).await
        }
    }
}

/// One `Local` APIService per built-in group and version (`v1.`, `v1.apps`, …), as
/// kube-apiserver registers them: served here, Available.
async fn ensure_api_services(api: &Api) -> Result<(), StartError> {
    let mut seen = std::collections::BTreeSet::new();
    for t in api.registry.all().iter().filter(|t| !t.custom) {
        if !seen.insert((t.group.clone(), t.version.clone())) {
            continue;
        }
        let name = format!("{}.{}", t.version, t.group);
        let key = format!("apiregistration.k8s.io/apiservices//{name}");
        if api.store.get(&key).is_some() {
            continue;
        }
        let service = json!({
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": { "name": name, "uid": crate::meta::new_uid(),
                          "creationTimestamp": crate::meta::now(),
                          "labels": { "kube-aggregator.kubernetes.io/automanaged": "onstart" } },
            "spec": { "group": t.group, "version": t.version,
                      "groupPriorityMinimum": if t.group.is_empty() { 18000 } else { 17000 },
                      "versionPriority": 15 },
            "status": { "conditions": [{ "type": "Available", "status": "True",
                                         "reason": "Local", "message": "Local APIServices are always available",
                                         "lastTransitionTime": crate::meta::now() }] },
        });
        create_if_absent(api, key, service).await?;
    }
    Ok(())
}

/// The `default` ServiceAccount of a namespace (what TokenRequests usually name).
async fn ensure_default_service_account(api: &Api, ns: &str) -> Result<(), StartError> {
    let key = format!("core/serviceaccounts/{ns}/default");
    if api.store.get(&key).is_some() {
        return Ok(());
    }
    let account = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": { "name": "default", "namespace": ns, "uid": crate::meta::new_uid(),
                      "creationTimestamp": crate::meta::now() },
    });
    create_if_absent(api, key, account).await
}

/// Stores `object` at `key` unless something is there (a racing creator wins).
async fn create_if_absent(api: &Api, key: String, object: Value) -> Result<(), StartError> {
    match api
        .store
        .write(key, Precondition::Absent, Mutation::Put(object))
        .await
    {
        Ok(_) | Err(StoreError::AlreadyExists) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn ensure_cluster_role(api: &Api, mut role: Value) -> Result<(), StartError> {
    let name = crate::meta::meta_str(&role, "name")
        .unwrap_or_default()
        .to_owned();
    let key = format!("{}/clusterroles//{name}", crate::authz::RBAC_GROUP);
    if api.store.get(&key).is_some() {
        return Ok(());
    }
    if let Some(meta) = role.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("uid".into(), json!(crate::meta::new_uid()));
        meta.insert("creationTimestamp".into(), json!(crate::meta::now()));
    }
    create_if_absent(api, key, role).await
}

async fn accept_loop(api: Arc<Api>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let connections = Arc::new(tokio::sync::Semaphore::new(
        api.config.max_connections.max(1),
    ));
    let mut shutdown = api.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection closed: at the connection limit");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let api = api.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let handshake =
                tokio::time::timeout(api.config.handshake_timeout, acceptor.accept(tcp));
            let tls = match handshake.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let header_read_timeout = api.config.header_read_timeout;
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(handle(api, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

async fn compaction_loop(api: Arc<Api>) {
    let mut shutdown = api.shutdown.clone();
    let mut ticker = tokio::time::interval(api.config.compaction_interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                match api.store.compact().await {
                    Ok(rev) => tracing::debug!(rev, "compacted"),
                    Err(e) => tracing::warn!(error = %e, "compaction failed"),
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Response body: a whole JSON document or a watch stream.
pub type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn respond(code: u16, content_type: &str, body: Body, warnings: &[String]) -> Response<Body> {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CACHE_CONTROL, "no-cache, private");
    for w in warnings {
        let text = format!("299 - {:?}", w.replace('"', "'"));
        if let Ok(v) = HeaderValue::from_str(&text) {
            builder = builder.header(http::header::WARNING, v);
        }
    }
    builder
        .body(body)
        .unwrap_or_else(|_| Response::new(full("")))
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    respond(
        code,
        "application/json",
        full(serde_json::to_vec(value).unwrap_or_default()),
        &[],
    )
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

async fn handle(api: Arc<Api>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = match route(&api, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(),
                    micros = started.elapsed().as_micros() as u64, "request");
    response
}

fn authenticate(api: &Api, req: &Request<Incoming>) -> Result<User, ApiError> {
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(ApiError::unauthorized)?;
    if let Some(user) = api.tokens.authenticate(token) {
        return Ok(user.clone());
    }
    if let Some(user) = api.sa_tokens.authenticate(token, &api.store) {
        return Ok(user);
    }
    api.config
        .authenticator
        .as_ref()
        .and_then(|a| (a.0)(token))
        .ok_or_else(ApiError::unauthorized)
}

/// Answers `kubectl auth can-i`: whether `user` may do what the review's spec describes.
fn access_review(api: &Api, user: &User, mut review: Value) -> Value {
    let spec = review.get("spec").cloned().unwrap_or_default();
    let text = |v: &Value, f: &str| v.get(f).and_then(Value::as_str).map(str::to_owned);
    let decision = match spec.get("resourceAttributes") {
        Some(r) => {
            let (verb, group, resource) = (
                text(r, "verb").unwrap_or_default(),
                text(r, "group").unwrap_or_default(),
                text(r, "resource").unwrap_or_default(),
            );
            let (subresource, namespace, name) = (
                text(r, "subresource"),
                text(r, "namespace"),
                text(r, "name"),
            );
            let attributes = Attributes {
                verb: &verb,
                group: &group,
                resource: &resource,
                subresource: subresource.as_deref().filter(|s| !s.is_empty()),
                namespace: namespace.as_deref().filter(|s| !s.is_empty()),
                name: name.as_deref().filter(|s| !s.is_empty()),
                field_selector: None,
            };
            match &api.config.authorizer {
                Some(authorizer) => (authorizer.0)(user, &attributes, &api.store),
                None => crate::authz::rbac(user, &attributes, &api.store),
            }
        }
        // Discovery and other non-resource paths: readable by every authenticated user.
        None => match spec
            .pointer("/nonResourceAttributes/verb")
            .and_then(Value::as_str)
        {
            Some("get" | "head") => Ok(()),
            _ => Err("only reading non-resource paths is allowed".to_owned()),
        },
    };
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SelfSubjectAccessReview");
    review["status"] = match decision {
        Ok(()) => json!({ "allowed": true }),
        Err(reason) => json!({ "allowed": false, "reason": reason }),
    };
    review
}

/// The verb of a resource request, as RBAC names it.
fn verb_of(method: &Method, has_name: bool, watch: bool) -> &'static str {
    match (method.as_str(), has_name) {
        ("GET" | "HEAD", true) => "get",
        ("GET" | "HEAD", false) if watch => "watch",
        ("GET" | "HEAD", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

async fn read_body(api: &Api, body: Incoming) -> Result<Bytes, ApiError> {
    let limit = api.config.max_body_bytes;
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

async fn route(api: &Arc<Api>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let route = request::route(req.uri().path())?;
    match route {
        Route::Health => return Ok(respond(200, "text/plain; charset=utf-8", full("ok"), &[])),
        Route::Version => return Ok(json_response(200, &discovery::version())),
        _ => {}
    }
    let user = authenticate(api, &req)?;
    let header = |name: http::header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let accept = header(http::header::ACCEPT);
    let types = api.registry.all();
    let discovery_answer = |core: bool| -> Response<Body> {
        match request::aggregated_discovery(accept.as_deref()) {
            Some(version) => respond(
                200,
                &discovery::aggregated_content_type(version),
                full(discovery::aggregated(&types, core, version).to_string()),
                &[],
            ),
            None if core => json_response(200, &discovery::core_versions(&api.address)),
            None => json_response(200, &discovery::group_list(&types)),
        }
    };
    match route {
        Route::CoreGroup => return Ok(discovery_answer(true)),
        Route::Groups => return Ok(discovery_answer(false)),
        Route::Group { group } => {
            return discovery::group(&types, &group)
                .map(|v| json_response(200, &v))
                .ok_or_else(ApiError::no_route);
        }
        Route::GroupVersion { group, version } => {
            return discovery::resource_list(&types, &group, &version)
                .map(|v| json_response(200, &v))
                .ok_or_else(ApiError::no_route);
        }
        Route::OpenApiV2 => {
            return Ok(respond(
                200,
                discovery::OPENAPI_V2_CONTENT_TYPE,
                full(""),
                &[],
            ));
        }
        Route::OpenApiV3Index => {
            return Ok(json_response(200, &discovery::openapi_v3_index(&types)));
        }
        Route::OpenApiV3 { group, version } => {
            return discovery::openapi_v3(&types, &group, &version)
                .map(|v| json_response(200, &v))
                .ok_or_else(ApiError::no_route);
        }
        Route::Resource(_) | Route::Health | Route::Version => {}
    }
    let Route::Resource(path) = route else {
        return Err(ApiError::no_route());
    };
    let t = api
        .registry
        .lookup(&path.group, &path.version, &path.resource)
        .ok_or_else(ApiError::no_route)?;
    if !t.namespaced && path.namespace.is_some() {
        return Err(ApiError::no_route());
    }
    let method = req.method().clone();
    if method != Method::GET
        && let Some(policy) = &api.config.write_policy
    {
        (policy.0)(&WriteRequest {
            method: method.as_str(),
            group: &path.group,
            resource: &path.resource,
            subresource: path.subresource.as_deref(),
            namespace: path.namespace.as_deref(),
            name: path.name.as_deref(),
        })
        .map_err(ApiError::forbidden)?;
    }
    let query = Query::parse(req.uri().query());
    if t.is_access_review() {
        if method != Method::POST {
            return Err(ApiError::method_not_allowed(
                "selfsubjectaccessreviews can only be created",
            ));
        }
        let content_type = header(http::header::CONTENT_TYPE).unwrap_or_default();
        let body = read_body(api, req.into_body()).await?;
        let review = handlers::decode_body(&content_type, &body)?;
        return Ok(json_response(201, &access_review(api, &user, review)));
    }
    let stream = crate::nodestream::is_stream(&path.resource, path.subresource.as_deref());
    let attributes = Attributes {
        verb: match path.subresource.as_deref() {
            Some(sub) if stream => crate::nodestream::verb(sub, &method),
            _ => verb_of(&method, path.name.is_some(), query.flag("watch")),
        },
        group: &path.group,
        resource: &path.resource,
        subresource: path.subresource.as_deref(),
        namespace: path.namespace.as_deref(),
        name: path.name.as_deref(),
        field_selector: query.get("fieldSelector"),
    };
    match &api.config.authorizer {
        Some(authorizer) => (authorizer.0)(&user, &attributes, &api.store),
        None => crate::authz::rbac(&user, &attributes, &api.store),
    }
    .map_err(ApiError::forbidden)?;
    if stream {
        let key = t.key(
            path.namespace.as_deref(),
            path.name.as_deref().unwrap_or_default(),
        );
        return node_stream(api, &path, &key, req).await;
    }
    let repr = request::negotiate(accept.as_deref());
    let content_type = header(http::header::CONTENT_TYPE).unwrap_or_default();
    let agent = header(http::header::USER_AGENT)
        .and_then(|a| a.split('/').next().map(str::to_owned))
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let body = if matches!(
        method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        read_body(api, req.into_body()).await?
    } else {
        Bytes::new()
    };
    let call = Call {
        method: method.clone(),
        path,
        query,
        repr,
        content_type,
        body,
        agent,
        t,
    };
    let has_name = call.path.name.is_some();
    let reply = match (method, has_name) {
        (Method::GET, true) => handlers::get(api, &call)?,
        (Method::GET, false) if call.query.flag("watch") => {
            let rx = watches::start(api, &call)?;
            return Ok(stream_response(rx, call.repr));
        }
        (Method::GET, false) => handlers::list(api, &call)?,
        (Method::POST, false) => handlers::create(api, &call).await?,
        // pods/binding, pods/eviction.
        (Method::POST, true) if call.path.subresource.is_some() => {
            handlers::create(api, &call).await?
        }
        (Method::PUT, true) => handlers::update(api, &call).await?,
        (Method::PATCH, true) => handlers::patch(api, &call).await?,
        (Method::DELETE, true) => handlers::delete(api, &call).await?,
        (Method::DELETE, false) => handlers::delete_collection(api, &call).await?,
        (m, _) => {
            return Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource: {m}"
            )));
        }
    };
    Ok(reply_response(&reply, call.repr, has_name))
}

/// `pods/{log,exec,attach,portforward}`: to the pod's node, through the node dialer.
async fn node_stream(
    api: &Arc<Api>,
    path: &request::ResourcePath,
    key: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let name = path.name.as_deref().unwrap_or_default();
    let pod = api
        .store
        .get(key)
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    let subresource = path.subresource.as_deref().unwrap_or_default();
    let allowed = match subresource {
        "log" => [Method::GET].as_slice(),
        _ => [Method::GET, Method::POST].as_slice(),
    };
    if !allowed.contains(req.method()) {
        return Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource: {}",
            req.method()
        )));
    }
    let (node, node_path) =
        crate::nodestream::node_path(&pod.value, subresource, req.uri().query())?;
    crate::nodestream::proxy(api.config.node_dialer.as_ref(), &node, &node_path, req).await
}

fn content_type(repr: Representation, single: bool) -> &'static str {
    match (repr, single) {
        (Representation::Table, _) => "application/json;as=Table;v=v1;g=meta.k8s.io",
        (Representation::PartialMetadata, true) => {
            "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io"
        }
        (Representation::PartialMetadata, false) => {
            "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"
        }
        (Representation::Object, _) => "application/json",
    }
}

fn reply_response(reply: &Reply, repr: Representation, single: bool) -> Response<Body> {
    respond(
        reply.code,
        content_type(repr, single),
        match &reply.raw {
            Some(bytes) => full(bytes.clone()),
            None => full(serde_json::to_vec(&reply.body).unwrap_or_default()),
        },
        &reply.warnings,
    )
}

fn stream_response(rx: tokio::sync::mpsc::Receiver<Bytes>, repr: Representation) -> Response<Body> {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    respond(
        200,
        content_type(repr, false),
        BodyExt::boxed(StreamBody::new(stream)),
        &[],
    )
}
