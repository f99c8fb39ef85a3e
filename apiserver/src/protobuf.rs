//! Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`): `kubectl create
//! configmap|secret|namespace|role|clusterrole|rolebinding|clusterrolebinding` sends them. The envelope is the magic `k8s\0` followed by a
//! `runtime.Unknown` message whose `raw` field holds the object.

use std::collections::BTreeMap;

use base64::Engine;
use prost::Message;
use serde_json::{Map, Value, json};

/// The bytes every Kubernetes protobuf body starts with.
pub const MAGIC: &[u8] = b"k8s\0";

/// The media type of Kubernetes protobuf.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

#[derive(Clone, PartialEq, Message)]
struct Unknown {
    #[prost(message, optional, tag = "1")]
    type_meta: Option<TypeMeta>,
    #[prost(bytes = "vec", optional, tag = "2")]
    raw: Option<Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    content_encoding: Option<String>,
    #[prost(string, optional, tag = "4")]
    content_type: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeMeta {
    #[prost(string, optional, tag = "1")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct OwnerReference {
    #[prost(string, optional, tag = "1")]
    kind: Option<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
    #[prost(string, optional, tag = "4")]
    uid: Option<String>,
    #[prost(string, optional, tag = "5")]
    api_version: Option<String>,
    #[prost(bool, optional, tag = "6")]
    controller: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    block_owner_deletion: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct ObjectMeta {
    #[prost(string, optional, tag = "1")]
    pub(crate) name: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub(crate) generate_name: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub(crate) namespace: Option<String>,
    #[prost(btree_map = "string, string", tag = "11")]
    pub(crate) labels: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "12")]
    pub(crate) annotations: BTreeMap<String, String>,
    #[prost(message, repeated, tag = "13")]
    pub(crate) owner_references: Vec<OwnerReference>,
    #[prost(string, repeated, tag = "14")]
    pub(crate) finalizers: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ConfigMap {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, string", tag = "2")]
    data: BTreeMap<String, String>,
    #[prost(btree_map = "string, bytes", tag = "3")]
    binary_data: BTreeMap<String, Vec<u8>>,
    #[prost(bool, optional, tag = "4")]
    immutable: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct Secret {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(btree_map = "string, bytes", tag = "2")]
    data: BTreeMap<String, Vec<u8>>,
    #[prost(string, optional, tag = "3")]
    type_: Option<String>,
    #[prost(btree_map = "string, string", tag = "4")]
    string_data: BTreeMap<String, String>,
    #[prost(bool, optional, tag = "5")]
    immutable: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct NamespaceSpec {
    #[prost(string, repeated, tag = "1")]
    finalizers: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Namespace {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<NamespaceSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct PolicyRule {
    #[prost(string, repeated, tag = "1")]
    verbs: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    api_groups: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    resources: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    resource_names: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    non_resource_urls: Vec<String>,
}

/// A Role or ClusterRole (the same fields up to `aggregationRule`, which is not read).
#[derive(Clone, PartialEq, Message)]
struct Role {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, repeated, tag = "2")]
    rules: Vec<PolicyRule>,
}

#[derive(Clone, PartialEq, Message)]
struct Subject {
    #[prost(string, optional, tag = "1")]
    kind: Option<String>,
    #[prost(string, optional, tag = "2")]
    api_group: Option<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
    #[prost(string, optional, tag = "4")]
    namespace: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct RoleRef {
    #[prost(string, optional, tag = "1")]
    api_group: Option<String>,
    #[prost(string, optional, tag = "2")]
    kind: Option<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
}

/// A RoleBinding or ClusterRoleBinding.
#[derive(Clone, PartialEq, Message)]
struct RoleBinding {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, repeated, tag = "2")]
    subjects: Vec<Subject>,
    #[prost(message, optional, tag = "3")]
    role_ref: Option<RoleRef>,
}

#[derive(Clone, PartialEq, Message)]
struct ResourceAttributes {
    #[prost(string, optional, tag = "1")]
    namespace: Option<String>,
    #[prost(string, optional, tag = "2")]
    verb: Option<String>,
    #[prost(string, optional, tag = "3")]
    group: Option<String>,
    #[prost(string, optional, tag = "4")]
    version: Option<String>,
    #[prost(string, optional, tag = "5")]
    resource: Option<String>,
    #[prost(string, optional, tag = "6")]
    subresource: Option<String>,
    #[prost(string, optional, tag = "7")]
    name: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct NonResourceAttributes {
    #[prost(string, optional, tag = "1")]
    path: Option<String>,
    #[prost(string, optional, tag = "2")]
    verb: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct SelfSubjectAccessReviewSpec {
    #[prost(message, optional, tag = "1")]
    resource_attributes: Option<ResourceAttributes>,
    #[prost(message, optional, tag = "2")]
    non_resource_attributes: Option<NonResourceAttributes>,
}

/// What `kubectl auth can-i` asks.
#[derive(Clone, PartialEq, Message)]
struct SelfSubjectAccessReview {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<SelfSubjectAccessReviewSpec>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Go's protobuf encoding writes empty strings for unset string fields: read them as unset.
fn set(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

pub(crate) fn metadata_json(meta: Option<ObjectMeta>) -> Value {
    let Some(m) = meta else { return json!({}) };
    let mut out = Map::new();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_owned(), v);
    };
    if let Some(n) = set(m.name) {
        put("name", json!(n));
    }
    if let Some(g) = set(m.generate_name) {
        put("generateName", json!(g));
    }
    if let Some(ns) = set(m.namespace) {
        put("namespace", json!(ns));
    }
    if !m.labels.is_empty() {
        put("labels", json!(m.labels));
    }
    if !m.annotations.is_empty() {
        put("annotations", json!(m.annotations));
    }
    if !m.finalizers.is_empty() {
        put("finalizers", json!(m.finalizers));
    }
    if !m.owner_references.is_empty() {
        let refs: Vec<Value> = m
            .owner_references
            .into_iter()
            .map(|r| {
                let mut v = json!({
                    "apiVersion": r.api_version.unwrap_or_default(),
                    "kind": r.kind.unwrap_or_default(),
                    "name": r.name.unwrap_or_default(),
                    "uid": r.uid.unwrap_or_default(),
                });
                if let Some(c) = r.controller {
                    v["controller"] = json!(c);
                }
                if let Some(b) = r.block_owner_deletion {
                    v["blockOwnerDeletion"] = json!(b);
                }
                v
            })
            .collect();
        put("ownerReferences", Value::Array(refs));
    }
    Value::Object(out)
}

/// Decodes a protobuf body of a ConfigMap, Secret, Namespace or RBAC object into its JSON
/// form.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let payload = body
        .strip_prefix(MAGIC)
        .ok_or("the protobuf body does not start with the Kubernetes magic bytes")?;
    let unknown =
        Unknown::decode(payload).map_err(|e| format!("invalid protobuf envelope: {e}"))?;
    let type_meta = unknown.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let raw = unknown.raw.unwrap_or_default();
    let bad = |e: prost::DecodeError| format!("invalid protobuf {kind}: {e}");
    let mut obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "ConfigMap") => {
            let cm = ConfigMap::decode(raw.as_slice()).map_err(bad)?;
            let mut v = json!({ "metadata": metadata_json(cm.metadata) });
            if !cm.data.is_empty() {
                v["data"] = json!(cm.data);
            }
            if !cm.binary_data.is_empty() {
                let bin: BTreeMap<&String, String> =
                    cm.binary_data.iter().map(|(k, b)| (k, b64(b))).collect();
                v["binaryData"] = json!(bin);
            }
            if let Some(i) = cm.immutable {
                v["immutable"] = json!(i);
            }
            v
        }
        ("v1", "Secret") => {
            let s = Secret::decode(raw.as_slice()).map_err(bad)?;
            let mut v = json!({ "metadata": metadata_json(s.metadata) });
            if !s.data.is_empty() {
                let data: BTreeMap<&String, String> =
                    s.data.iter().map(|(k, b)| (k, b64(b))).collect();
                v["data"] = json!(data);
            }
            if !s.string_data.is_empty() {
                v["stringData"] = json!(s.string_data);
            }
            if let Some(t) = set(s.type_) {
                v["type"] = json!(t);
            }
            if let Some(i) = s.immutable {
                v["immutable"] = json!(i);
            }
            v
        }
        ("v1", "Namespace") => {
            let ns = Namespace::decode(raw.as_slice()).map_err(bad)?;
            let mut v = json!({ "metadata": metadata_json(ns.metadata) });
            if let Some(spec) = ns.spec
                && !spec.finalizers.is_empty()
            {
                v["spec"] = json!({ "finalizers": spec.finalizers });
            }
            v
        }
        ("rbac.authorization.k8s.io/v1", "Role" | "ClusterRole") => {
            let role = Role::decode(raw.as_slice()).map_err(bad)?;
            let rules: Vec<Value> = role
                .rules
                .into_iter()
                .map(|r| {
                    let mut v = json!({ "verbs": r.verbs });
                    for (field, list) in [
                        ("apiGroups", r.api_groups),
                        ("resources", r.resources),
                        ("resourceNames", r.resource_names),
                        ("nonResourceURLs", r.non_resource_urls),
                    ] {
                        if !list.is_empty() {
                            v[field] = json!(list);
                        }
                    }
                    v
                })
                .collect();
            json!({ "metadata": metadata_json(role.metadata), "rules": rules })
        }
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => {
            let b = RoleBinding::decode(raw.as_slice()).map_err(bad)?;
            let subjects: Vec<Value> = b
                .subjects
                .into_iter()
                .map(|s| {
                    let mut v = json!({ "kind": s.kind.unwrap_or_default(),
                                        "name": s.name.unwrap_or_default() });
                    if let Some(g) = set(s.api_group) {
                        v["apiGroup"] = json!(g);
                    }
                    if let Some(ns) = set(s.namespace) {
                        v["namespace"] = json!(ns);
                    }
                    v
                })
                .collect();
            let r = b.role_ref.unwrap_or_default();
            json!({ "metadata": metadata_json(b.metadata), "subjects": subjects,
                    "roleRef": { "apiGroup": r.api_group.unwrap_or_default(),
                                 "kind": r.kind.unwrap_or_default(),
                                 "name": r.name.unwrap_or_default() } })
        }
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => {
            let review = SelfSubjectAccessReview::decode(raw.as_slice()).map_err(bad)?;
            let spec = review.spec.unwrap_or_default();
            let mut out = json!({});
            if let Some(r) = spec.resource_attributes {
                let mut attributes = Map::new();
                for (field, value) in [
                    ("namespace", r.namespace),
                    ("verb", r.verb),
                    ("group", r.group),
                    ("version", r.version),
                    ("resource", r.resource),
                    ("subresource", r.subresource),
                    ("name", r.name),
                ] {
                    if let Some(v) = set(value) {
                        attributes.insert(field.into(), json!(v));
                    }
                }
                out["resourceAttributes"] = Value::Object(attributes);
            }
            if let Some(n) = spec.non_resource_attributes {
                out["nonResourceAttributes"] = json!({
                    "path": n.path.unwrap_or_default(), "verb": n.verb.unwrap_or_default() });
            }
            json!({ "metadata": metadata_json(review.metadata), "spec": out })
        }
        ("v1", "ServiceAccount") => crate::protobuf_workloads::service_account(&raw)?,
        ("apps/v1", "Deployment") => crate::protobuf_workloads::deployment(&raw)?,
        ("batch/v1", "Job") => crate::protobuf_workloads::job(&raw)?,
        ("policy/v1" | "policy/v1beta1", "Eviction") => crate::protobuf_workloads::eviction(&raw)?,
        ("authentication.k8s.io/v1", "TokenRequest") => {
            crate::protobuf_workloads::token_request(&raw)?
        }
        ("v1" | "meta.k8s.io/v1", "DeleteOptions") => {
            // Options, not an object: no apiVersion/kind added.
            return crate::protobuf_workloads::delete_options(&raw);
        }
        _ => {
            return Err(format!(
                "protobuf bodies are accepted for v1 ConfigMap, Secret, Namespace and \
                 ServiceAccount, RBAC roles and bindings, apps/v1 Deployments, batch/v1 \
                 Jobs, Evictions and DeleteOptions, not {api_version} {kind}: send JSON"
            ));
        }
    };
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("v1".into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut body = MAGIC.to_vec();
        body.extend(unknown.encode_to_vec());
        body
    }

    #[test]
    fn configmaps_decode_with_data_and_labels() {
        let cm = ConfigMap {
            metadata: Some(ObjectMeta {
                name: Some("settings".into()),
                namespace: Some("default".into()),
                labels: [("app".to_owned(), "demo".to_owned())].into(),
                ..Default::default()
            }),
            data: [("mode".to_owned(), "edge".to_owned())].into(),
            binary_data: [("blob".to_owned(), vec![1, 2, 3])].into(),
            immutable: None,
        };
        let v = decode(&envelope("ConfigMap", cm.encode_to_vec())).unwrap();
        assert_eq!(v["kind"], "ConfigMap");
        assert_eq!(v["metadata"]["name"], "settings");
        assert_eq!(v["metadata"]["labels"]["app"], "demo");
        assert_eq!(v["data"]["mode"], "edge");
        assert_eq!(v["binaryData"]["blob"], "AQID");
    }

    #[test]
    fn secrets_carry_base64_data_and_their_type() {
        let s = Secret {
            metadata: Some(ObjectMeta {
                name: Some("s3".into()),
                generate_name: Some(String::new()),
                ..Default::default()
            }),
            data: [("key".to_owned(), b"secret".to_vec())].into(),
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let v = decode(&envelope("Secret", s.encode_to_vec())).unwrap();
        assert_eq!(v["data"]["key"], "c2VjcmV0");
        assert_eq!(v["type"], "Opaque");
        assert!(
            v["metadata"].get("generateName").is_none(),
            "empty strings are unset"
        );
    }

    #[test]
    fn rbac_bindings_and_roles_decode() {
        let b = RoleBinding {
            metadata: Some(ObjectMeta {
                name: Some("viewers".into()),
                ..Default::default()
            }),
            subjects: vec![Subject {
                kind: Some("Group".into()),
                api_group: Some("rbac.authorization.k8s.io".into()),
                name: Some("viewers".into()),
                namespace: Some(String::new()),
            }],
            role_ref: Some(RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: Some("ClusterRole".into()),
                name: Some("view".into()),
            }),
        };
        let rbac = |kind: &str, raw: Vec<u8>| {
            let unknown = Unknown {
                type_meta: Some(TypeMeta {
                    api_version: Some("rbac.authorization.k8s.io/v1".into()),
                    kind: Some(kind.into()),
                }),
                raw: Some(raw),
                content_encoding: None,
                content_type: None,
            };
            let mut body = MAGIC.to_vec();
            body.extend(unknown.encode_to_vec());
            body
        };
        let body = rbac("ClusterRoleBinding", b.encode_to_vec());
        let v = decode(&body).unwrap();
        assert_eq!(v["roleRef"]["name"], "view");
        assert_eq!(v["subjects"][0]["kind"], "Group");
        assert!(v["subjects"][0].get("namespace").is_none());
        let role = Role {
            metadata: None,
            rules: vec![PolicyRule {
                verbs: vec!["get".into()],
                resources: vec!["pods".into()],
                ..Default::default()
            }],
        };
        let body = rbac("Role", role.encode_to_vec());
        let v = decode(&body).unwrap();
        assert_eq!(
            v["rules"][0],
            json!({ "verbs": ["get"], "resources": ["pods"] })
        );
    }

    #[test]
    fn other_kinds_and_garbage_are_refused_with_a_reason() {
        assert!(decode(b"{}").unwrap_err().contains("magic"));
        let err = decode(&envelope("Pod", vec![])).unwrap_err();
        assert!(err.contains("send JSON"), "{err}");
        let mut truncated = envelope("ConfigMap", vec![0x0a, 0x05, b'a']);
        truncated.truncate(truncated.len() - 1);
        assert!(decode(&truncated).is_err());
    }
}
