//! Per-pod identities on the node's local API.
//!
//! Each pod gets its own bearer token, minted by the agent when it prepares the pod and
//! written, readable by the pod alone, to `<pod dir>/local-api.kubeconfig`
//! (`SEDNA_LOCAL_KUBECONFIG`). A token is `sp1.<identity>.<mac>`: the pod's namespace, name and
//! uid, and an HMAC-SHA256 of them under a key only the agent reads
//! (`<data>/metaserver/pod-token.key`, 0600). The local API checks the MAC and then that
//! the pod still exists with that uid, so a deleted pod's token is worthless at once and
//! nothing has to be stored per pod.
//!
//! What a pod's token may do ([`authorize`]), as Kubernetes' node authorizer and a service
//! account would allow: read its own Pod, the ConfigMaps and Secrets its spec uses, the
//! platform workload that owns it and the Models and Datasets that workload names (`get`, or
//! `list`/`watch` restricted to one of them by `metadata.name`); update the status of its own
//! Pod and of its owner; create Events in its namespace. Everything else is 403 Forbidden.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use hmac::{Hmac, Mac};
use sedna_api::references::{Reference, WORKLOAD_KINDS, pod_references, workload_references};
use sedna_apiserver::authz::{Attributes, Authenticator, Authorizer, MASTERS};
use sedna_apiserver::pki::{PkiError, User};
use sedna_apiserver::store::Store;
use serde_json::Value;
use sha2::Sha256;

/// The group every pod identity belongs to.
pub const PODS_GROUP: &str = "system:pods";

const PREFIX: &str = "sp1";
const USER_PREFIX: &str = "system:pod:";

/// A pod, as its token names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// uid.
    pub uid: String,
}

/// Mints and checks pod tokens.
pub struct PodTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for PodTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodTokens")
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl PodTokens {
    /// Reads the key at `path`, creating it (32 random bytes, mode 0600) when missing.
    pub fn load_or_create(path: &Path) -> Result<PodTokens, PkiError> {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(key) = base64::engine::general_purpose::STANDARD.decode(text.trim())
            && key.len() >= 32
        {
            return Ok(PodTokens { key });
        }
        let key: [u8; 32] = rand::random();
        sedna_apiserver::pki::write_private(
            path,
            base64::engine::general_purpose::STANDARD.encode(key),
        )?;
        Ok(PodTokens { key: key.to_vec() })
    }

    fn mac(&self, identity: &str) -> Vec<u8> {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.key) {
            Ok(m) => m,
            // HMAC takes keys of any length.
            Err(_) => return Vec::new(),
        };
        mac.update(identity.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// The token of a pod.
    pub fn token(&self, pod: &PodIdentity) -> String {
        let identity = format!("{}/{}/{}", pod.namespace, pod.name, pod.uid);
        format!(
            "{PREFIX}.{}.{}",
            b64(identity.as_bytes()),
            b64(&self.mac(&identity))
        )
    }

    /// The pod a token was minted for, if the token is genuine.
    pub fn verify(&self, token: &str) -> Option<PodIdentity> {
        let mut parts = token.split('.');
        let (Some(PREFIX), Some(identity), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let identity = String::from_utf8(engine.decode(identity).ok()?).ok()?;
        let mac = engine.decode(mac).ok()?;
        let mut check = Hmac::<Sha256>::new_from_slice(&self.key).ok()?;
        check.update(identity.as_bytes());
        check.verify_slice(&mac).ok()?;
        let mut fields = identity.splitn(3, '/');
        Some(PodIdentity {
            namespace: fields.next()?.to_owned(),
            name: fields.next()?.to_owned(),
            uid: fields.next()?.to_owned(),
        })
    }

    /// The local API's authentication of pod tokens.
    pub fn authenticator(self: &Arc<Self>) -> Authenticator {
        let tokens = self.clone();
        Authenticator(Arc::new(move |token| {
            tokens.verify(token).map(|p| user_of(&p))
        }))
    }
}

/// What the runtime needs to give a pod its own access to the local API.
#[derive(Clone, Debug)]
pub struct PodApi {
    /// `https://127.0.0.1:PORT` of the local API.
    pub url: String,
    /// The CA its serving certificate chains to.
    pub ca_pem: String,
    /// The token minter.
    pub tokens: Arc<PodTokens>,
}

impl PodApi {
    /// A kubeconfig for `pod`: the local API, its CA, the pod's own token.
    pub fn kubeconfig(&self, pod: &PodIdentity) -> String {
        sedna_apiserver::pki::kubeconfig(&self.url, &self.ca_pem, &self.tokens.token(pod))
    }
}

/// The user a pod authenticates as: `system:pod:<namespace>:<name>`, with the pod's uid.
pub fn user_of(pod: &PodIdentity) -> User {
    User {
        name: format!("{USER_PREFIX}{}:{}", pod.namespace, pod.name),
        uid: pod.uid.clone(),
        groups: vec![PODS_GROUP.into(), "system:authenticated".into()],
    }
}

/// `(group, plural)` of a referenced kind (all of them pluralize with `s`).
fn resource_of(r: &Reference) -> (&'static str, String) {
    let group = r.api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    (group, format!("{}s", r.kind.to_lowercase()))
}

fn stored(store: &Store, group: &str, plural: &str, ns: &str, name: &str) -> Option<Arc<Value>> {
    let group = if group.is_empty() { "core" } else { group };
    store
        .get(&format!("{group}/{plural}/{ns}/{name}"))
        .map(|s| s.value.clone())
}

const SCOPE: &str = "a pod's token reaches only its own Pod, the ConfigMaps and Secrets it uses, \
                     the workload that owns it, the Models and Datasets that workload names, \
                     and (to read) the Devices of its namespace on this node";

/// The local API's authorization: the node's administrator (`system:masters`, the token in
/// `<data>/metaserver/kubeconfig`) reads everything; a pod what its spec and owner name.
pub fn authorize(user: &User, a: &Attributes<'_>, store: &Store) -> Result<(), String> {
    if user.groups.iter().any(|g| g == MASTERS) {
        return Ok(());
    }
    let Some((ns, name)) = user
        .name
        .strip_prefix(USER_PREFIX)
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(a.forbidden(&user.name, "unknown user"));
    };
    let pod = stored(store, "", "pods", ns, name)
        .filter(|p| p.pointer("/metadata/uid").and_then(Value::as_str) == Some(&user.uid))
        .ok_or_else(|| a.forbidden(&user.name, "the pod this token was issued to is gone"))?;
    if a.namespace != Some(ns) {
        return Err(a.forbidden(&user.name, "a pod's token reaches only its own namespace"));
    }
    // Events about anything the pod does, in its namespace (the hub checks them again).
    if a.verb == "create"
        && a.resource == "events"
        && (a.group.is_empty() || a.group == "events.k8s.io")
    {
        return Ok(());
    }
    let mut reachable: Vec<(&'static str, String, String)> =
        vec![("", "pods".to_owned(), name.to_owned())];
    let mut owners = Vec::new();
    for r in pod_references(&pod) {
        let (group, plural) = resource_of(&r);
        if WORKLOAD_KINDS.contains(&r.kind) {
            owners.push((group, plural.clone(), r.name.clone()));
            if let Some(w) = stored(store, group, &plural, ns, &r.name) {
                for m in workload_references(r.kind, &w) {
                    let (g, p) = resource_of(&m);
                    reachable.push((g, p, m.name));
                }
            }
        }
        reachable.push((group, plural, r.name));
    }
    let target = a.object_name();
    let is = |list: &[(&'static str, String, String)]| {
        target.is_some_and(|t| {
            list.iter()
                .any(|(g, p, n)| *g == a.group && p == a.resource && n == t)
        })
    };
    // The devices of its namespace on this node (the local API holds no others), to read
    // their live values.
    let device = a.group == "devices.sedna.io"
        && matches!(a.resource, "devices" | "devicemodels")
        && matches!(a.subresource, None | Some("status"));
    let allowed = match a.verb {
        "get" | "list" | "watch" if device => true,
        "get" | "list" | "watch" => {
            matches!(a.subresource, None | Some("status")) && is(&reachable)
        }
        "update" | "patch" => {
            a.subresource == Some("status")
                && (is(&owners)
                    || (a.group.is_empty() && a.resource == "pods" && target == Some(name)))
        }
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(a.forbidden(&user.name, SCOPE))
    }
}

/// The local API's authorizer.
pub fn authorizer() -> Authorizer {
    Authorizer(Arc::new(authorize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sedna_apiserver::store::{Mutation, Precondition, StoreOptions};
    use serde_json::json;

    fn pod_id(name: &str, uid: &str) -> PodIdentity {
        PodIdentity {
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn tokens_name_their_pod_and_cannot_be_forged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod-token.key");
        let tokens = PodTokens::load_or_create(&path).unwrap();
        let id = pod_id("web", "u-1");
        let token = tokens.token(&id);
        assert_eq!(tokens.verify(&token), Some(id.clone()));
        // The key survives a restart; another key does not accept the token.
        assert_eq!(
            PodTokens::load_or_create(&path).unwrap().verify(&token),
            Some(id)
        );
        let other = PodTokens::load_or_create(&dir.path().join("other.key")).unwrap();
        assert_eq!(other.verify(&token), None);
        // Another pod's identity with this pod's MAC is refused.
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged_identity = b64(b"default/victim/u-2");
        parts[1] = &forged_identity;
        assert_eq!(tokens.verify(&parts.join(".")), None);
        for junk in [
            "",
            "sp1",
            "sp1..",
            "sp1.a.b.c",
            "Bearer x",
            &"a".repeat(10_000),
        ] {
            assert_eq!(tokens.verify(junk), None, "{junk:.20}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db"), StoreOptions::default()).unwrap();
        let put = |key: &str, v: Value| {
            let store = &store;
            let key = key.to_owned();
            async move {
                store
                    .write(key, Precondition::Absent, Mutation::Put(v))
                    .await
                    .unwrap();
            }
        };
        put(
            "core/pods/default/worker",
            json!({ "metadata": { "name": "worker", "namespace": "default", "uid": "u-1",
                      "ownerReferences": [{ "apiVersion": "sedna.io/v1alpha1",
                          "kind": "IncrementalLearningJob", "name": "job", "uid": "j" }] },
                    "spec": { "containers": [{ "name": "c", "envFrom": [{ "secretRef": { "name": "mine" } }] }] } }),
        )
        .await;
        put(
            "sedna.io/incrementallearningjobs/default/job",
            json!({ "spec": { "dataset": { "name": "data" },
                              "deploySpec": { "model": { "name": "deployed" } } } }),
        )
        .await;
        (dir, store)
    }

    #[tokio::test]
    async fn a_pod_reaches_what_its_spec_and_owner_name_and_nothing_else() {
        let (_d, store) = store().await;
        let me = user_of(&pod_id("worker", "u-1"));
        let ok = |a: Attributes<'_>| authorize(&me, &a, &store);
        let ns = "default";
        assert!(
            ok(Attributes::new("get", "", "pods")
                .in_namespace(ns)
                .named("worker"))
            .is_ok()
        );
        assert!(
            ok(Attributes::new("get", "", "secrets")
                .in_namespace(ns)
                .named("mine"))
            .is_ok()
        );
        assert!(
            ok(Attributes::new("get", "sedna.io", "models")
                .in_namespace(ns)
                .named("deployed"))
            .is_ok()
        );
        assert!(
            ok(Attributes::new("get", "sedna.io", "datasets")
                .in_namespace(ns)
                .named("data"))
            .is_ok()
        );
        assert!(
            ok(
                Attributes::new("get", "sedna.io", "incrementallearningjobs")
                    .in_namespace(ns)
                    .named("job")
            )
            .is_ok()
        );
        let mut watch_one = Attributes::new("watch", "sedna.io", "models").in_namespace(ns);
        watch_one.field_selector = Some("metadata.name=deployed");
        assert!(ok(watch_one).is_ok());
        assert!(
            ok(Attributes::new("patch", "", "pods")
                .in_namespace(ns)
                .named("worker")
                .on_subresource("status"))
            .is_ok()
        );
        assert!(
            ok(
                Attributes::new("patch", "sedna.io", "incrementallearningjobs")
                    .in_namespace(ns)
                    .named("job")
                    .on_subresource("status")
            )
            .is_ok()
        );
        assert!(ok(Attributes::new("create", "", "events").in_namespace(ns)).is_ok());
        // The node's devices of its namespace, to read their live values; not to change them.
        assert!(
            ok(Attributes::new("list", "devices.sedna.io", "devices").in_namespace(ns)).is_ok()
        );
        assert!(
            ok(Attributes::new("get", "devices.sedna.io", "devices")
                .in_namespace(ns)
                .named("boiler-1"))
            .is_ok()
        );
        assert!(
            ok(Attributes::new("patch", "devices.sedna.io", "devices")
                .in_namespace(ns)
                .named("boiler-1")
                .on_subresource("status"))
            .is_err()
        );
        assert!(
            ok(Attributes::new("list", "devices.sedna.io", "devices").in_namespace("other"))
                .is_err()
        );

        let refused = ok(Attributes::new("get", "", "secrets")
            .in_namespace(ns)
            .named("theirs"))
        .unwrap_err();
        assert!(
            refused
                .starts_with("secrets \"theirs\" is forbidden: User \"system:pod:default:worker\""),
            "{refused}"
        );
        assert!(refused.contains("reaches only its own Pod"), "{refused}");
        assert!(ok(Attributes::new("list", "", "secrets").in_namespace(ns)).is_err());
        assert!(ok(Attributes::new("list", "", "pods")).is_err());
        assert!(
            ok(Attributes::new("get", "", "pods")
                .in_namespace(ns)
                .named("other"))
            .is_err()
        );
        assert!(
            ok(Attributes::new("get", "", "secrets")
                .in_namespace("kube-system")
                .named("mine"))
            .is_err()
        );
        assert!(
            ok(Attributes::new("patch", "", "pods")
                .in_namespace(ns)
                .named("other")
                .on_subresource("status"))
            .is_err()
        );
        assert!(
            ok(Attributes::new("patch", "", "pods")
                .in_namespace(ns)
                .named("worker"))
            .is_err()
        );
        assert!(
            ok(Attributes::new("patch", "sedna.io", "models")
                .in_namespace(ns)
                .named("deployed")
                .on_subresource("status"))
            .is_err()
        );
        assert!(ok(Attributes::new("get", "", "nodes").named("edge-1")).is_err());
        // A token of a pod that is gone (or a new pod under the same name) reaches nothing.
        let gone = user_of(&pod_id("worker", "u-old"));
        let stale = authorize(
            &gone,
            &Attributes::new("get", "", "pods")
                .in_namespace(ns)
                .named("worker"),
            &store,
        )
        .unwrap_err();
        assert!(stale.contains("is gone"), "{stale}");
        let admin = User {
            name: "admin".into(),
            uid: "admin".into(),
            groups: vec![MASTERS.into()],
        };
        assert!(authorize(&admin, &Attributes::new("list", "", "secrets"), &store).is_ok());
    }
}
