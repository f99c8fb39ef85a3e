//! Protobuf bodies of apps/v1 Deployments and batch/v1 Jobs, as `kubectl create deployment`
//! and `kubectl create job` send them: the fields those commands (and common tools) set are
//! decoded; every other field must be unset (Go writes unset fields as zeros), else the body is
//! refused naming the field — nothing a client sent is silently dropped.

use std::collections::BTreeMap;

use prost::Message;
use serde_json::{Map, Value, json};

use crate::protobuf::{ObjectMeta, metadata_json};

/// Which fields of a message are decoded, by number; nested messages are checked too.
pub(crate) struct Schema {
    name: &'static str,
    fields: &'static [(u32, &'static str, Option<&'static Schema>)],
}

const META: Schema = Schema {
    name: "metadata",
    fields: &[
        (1, "name", None),
        (2, "generateName", None),
        (3, "namespace", None),
        (11, "labels", None),
        (12, "annotations", None),
        (13, "ownerReferences", None),
        (14, "finalizers", None),
    ],
};
const SELECTOR: Schema = Schema {
    name: "selector",
    fields: &[(1, "matchLabels", None), (2, "matchExpressions", None)],
};
const RESOURCES: Schema = Schema {
    name: "resources",
    fields: &[(1, "limits", None), (2, "requests", None)],
};
const PORT: Schema = Schema {
    name: "ports",
    fields: &[
        (1, "name", None),
        (3, "containerPort", None),
        (4, "protocol", None),
    ],
};
const ENV: Schema = Schema {
    name: "env",
    fields: &[(1, "name", None), (2, "value", None)],
};
const CONTAINER: Schema = Schema {
    name: "containers",
    fields: &[
        (1, "name", None),
        (2, "image", None),
        (3, "command", None),
        (4, "args", None),
        (5, "workingDir", None),
        (6, "ports", Some(&PORT)),
        (7, "env", Some(&ENV)),
        (8, "resources", Some(&RESOURCES)),
        (14, "imagePullPolicy", None),
    ],
};
const TOLERATION: Schema = Schema {
    name: "tolerations",
    fields: &[
        (1, "key", None),
        (2, "operator", None),
        (3, "value", None),
        (4, "effect", None),
    ],
};
const POD_SPEC: Schema = Schema {
    name: "spec",
    fields: &[
        (2, "containers", Some(&CONTAINER)),
        (3, "restartPolicy", None),
        (4, "terminationGracePeriodSeconds", None),
        (7, "nodeSelector", None),
        (8, "serviceAccountName", None),
        (10, "nodeName", None),
        (22, "tolerations", Some(&TOLERATION)),
    ],
};
const TEMPLATE: Schema = Schema {
    name: "template",
    fields: &[(1, "metadata", Some(&META)), (2, "spec", Some(&POD_SPEC))],
};
const ROLLING: Schema = Schema {
    name: "rollingUpdate",
    fields: &[(1, "maxUnavailable", None), (2, "maxSurge", None)],
};
const STRATEGY: Schema = Schema {
    name: "strategy",
    fields: &[(1, "type", None), (2, "rollingUpdate", Some(&ROLLING))],
};
const DEPLOYMENT_SPEC: Schema = Schema {
    name: "spec",
    fields: &[
        (1, "replicas", None),
        (2, "selector", Some(&SELECTOR)),
        (3, "template", Some(&TEMPLATE)),
        (4, "strategy", Some(&STRATEGY)),
        (5, "minReadySeconds", None),
        (6, "revisionHistoryLimit", None),
        (9, "progressDeadlineSeconds", None),
    ],
};
/// A Deployment (its status, written by Go as zeros, must be empty).
pub(crate) const DEPLOYMENT: Schema = Schema {
    name: "Deployment",
    fields: &[
        (1, "metadata", Some(&META)),
        (2, "spec", Some(&DEPLOYMENT_SPEC)),
    ],
};
const JOB_SPEC: Schema = Schema {
    name: "spec",
    fields: &[
        (1, "parallelism", None),
        (2, "completions", None),
        (3, "activeDeadlineSeconds", None),
        (4, "selector", Some(&SELECTOR)),
        (5, "manualSelector", None),
        (6, "template", Some(&TEMPLATE)),
        (7, "backoffLimit", None),
        (8, "ttlSecondsAfterFinished", None),
    ],
};
/// A Job.
pub(crate) const JOB: Schema = Schema {
    name: "Job",
    fields: &[(1, "metadata", Some(&META)), (2, "spec", Some(&JOB_SPEC))],
};

/// One field on the wire: its number and, for a length-delimited one, its bytes; for others
/// whether its value is zero.
fn next_field<'a>(buf: &mut &'a [u8]) -> Result<(u32, Result<&'a [u8], bool>), String> {
    let key = prost::encoding::decode_varint(buf).map_err(|e| e.to_string())?;
    let tag = u32::try_from(key >> 3).map_err(|_| "field number out of range".to_owned())?;
    let value = match key & 7 {
        0 => Err(prost::encoding::decode_varint(buf).map_err(|e| e.to_string())? == 0),
        1 | 5 => {
            let n = if key & 7 == 1 { 8 } else { 4 };
            if buf.len() < n {
                return Err("truncated field".into());
            }
            let (v, rest) = buf.split_at(n);
            *buf = rest;
            Err(v.iter().all(|b| *b == 0))
        }
        2 => {
            let len = prost::encoding::decode_varint(buf).map_err(|e| e.to_string())?;
            let len = usize::try_from(len).map_err(|_| "length out of range".to_owned())?;
            if buf.len() < len {
                return Err("truncated field".into());
            }
            let (v, rest) = buf.split_at(len);
            *buf = rest;
            Ok(v)
        }
        other => return Err(format!("unsupported wire type {other}")),
    };
    Ok((tag, value))
}

/// Whether bytes hold a message whose every field is zero (as Go writes an unset struct).
fn all_zero(mut buf: &[u8], depth: usize) -> bool {
    if depth > 16 {
        return false;
    }
    while !buf.is_empty() {
        match next_field(&mut buf) {
            Ok((_, Err(zero))) if zero => {}
            Ok((_, Ok(bytes))) if bytes.is_empty() || all_zero(bytes, depth + 1) => {}
            _ => return false,
        }
    }
    true
}

/// Refuses a message that sets a field `schema` does not decode, naming it.
pub(crate) fn check(
    mut buf: &[u8],
    schema: &Schema,
    path: &str,
    depth: usize,
) -> Result<(), String> {
    if depth > 32 {
        return Err(format!("{path}: nested too deeply"));
    }
    while !buf.is_empty() {
        let (tag, value) = next_field(&mut buf).map_err(|e| format!("{path}: {e}"))?;
        match schema.fields.iter().find(|(t, _, _)| *t == tag) {
            Some((_, name, Some(sub))) => {
                if let Ok(bytes) = value {
                    check(bytes, sub, &format!("{path}.{name}"), depth + 1)?;
                }
            }
            Some(_) => {}
            None => {
                let zero = match value {
                    Err(zero) => zero,
                    Ok(bytes) => bytes.is_empty() || all_zero(bytes, 0),
                };
                if !zero {
                    return Err(format!(
                        "{path}: field number {tag} of {} is set, and this server decodes only \
                         the fields kubectl create sets from protobuf: send the object as JSON \
                         (kubectl apply -f, or a client's JSON content type)",
                        schema.name
                    ));
                }
            }
        }
    }
    Ok(())
}

#[derive(Clone, PartialEq, Message)]
struct Quantity {
    #[prost(string, optional, tag = "1")]
    string: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Requirement {
    #[prost(string, optional, tag = "1")]
    key: Option<String>,
    #[prost(string, optional, tag = "2")]
    operator: Option<String>,
    #[prost(string, repeated, tag = "3")]
    values: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct LabelSelector {
    #[prost(btree_map = "string, string", tag = "1")]
    match_labels: BTreeMap<String, String>,
    #[prost(message, repeated, tag = "2")]
    match_expressions: Vec<Requirement>,
}

#[derive(Clone, PartialEq, Message)]
struct Resources {
    #[prost(btree_map = "string, message", tag = "1")]
    limits: BTreeMap<String, Quantity>,
    #[prost(btree_map = "string, message", tag = "2")]
    requests: BTreeMap<String, Quantity>,
}

#[derive(Clone, PartialEq, Message)]
struct Port {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(int32, optional, tag = "3")]
    container_port: Option<i32>,
    #[prost(string, optional, tag = "4")]
    protocol: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct EnvVar {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    value: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Container {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    image: Option<String>,
    #[prost(string, repeated, tag = "3")]
    command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    args: Vec<String>,
    #[prost(string, optional, tag = "5")]
    working_dir: Option<String>,
    #[prost(message, repeated, tag = "6")]
    ports: Vec<Port>,
    #[prost(message, repeated, tag = "7")]
    env: Vec<EnvVar>,
    #[prost(message, optional, tag = "8")]
    resources: Option<Resources>,
    #[prost(string, optional, tag = "14")]
    image_pull_policy: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Toleration {
    #[prost(string, optional, tag = "1")]
    key: Option<String>,
    #[prost(string, optional, tag = "2")]
    operator: Option<String>,
    #[prost(string, optional, tag = "3")]
    value: Option<String>,
    #[prost(string, optional, tag = "4")]
    effect: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct PodSpec {
    #[prost(message, repeated, tag = "2")]
    containers: Vec<Container>,
    #[prost(string, optional, tag = "3")]
    restart_policy: Option<String>,
    #[prost(int64, optional, tag = "4")]
    termination_grace_period_seconds: Option<i64>,
    #[prost(btree_map = "string, string", tag = "7")]
    node_selector: BTreeMap<String, String>,
    #[prost(string, optional, tag = "8")]
    service_account_name: Option<String>,
    #[prost(string, optional, tag = "10")]
    node_name: Option<String>,
    #[prost(message, repeated, tag = "22")]
    tolerations: Vec<Toleration>,
}

#[derive(Clone, PartialEq, Message)]
struct PodTemplateSpec {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<PodSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct IntOrString {
    #[prost(int64, optional, tag = "1")]
    type_: Option<i64>,
    #[prost(int32, optional, tag = "2")]
    int_val: Option<i32>,
    #[prost(string, optional, tag = "3")]
    str_val: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct RollingUpdate {
    #[prost(message, optional, tag = "1")]
    max_unavailable: Option<IntOrString>,
    #[prost(message, optional, tag = "2")]
    max_surge: Option<IntOrString>,
}

#[derive(Clone, PartialEq, Message)]
struct Strategy {
    #[prost(string, optional, tag = "1")]
    type_: Option<String>,
    #[prost(message, optional, tag = "2")]
    rolling_update: Option<RollingUpdate>,
}

#[derive(Clone, PartialEq, Message)]
struct DeploymentSpec {
    #[prost(int32, optional, tag = "1")]
    replicas: Option<i32>,
    #[prost(message, optional, tag = "2")]
    selector: Option<LabelSelector>,
    #[prost(message, optional, tag = "3")]
    template: Option<PodTemplateSpec>,
    #[prost(message, optional, tag = "4")]
    strategy: Option<Strategy>,
    #[prost(int32, optional, tag = "5")]
    min_ready_seconds: Option<i32>,
    #[prost(int32, optional, tag = "6")]
    revision_history_limit: Option<i32>,
    #[prost(int32, optional, tag = "9")]
    progress_deadline_seconds: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct Deployment {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<DeploymentSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct JobSpec {
    #[prost(int32, optional, tag = "1")]
    parallelism: Option<i32>,
    #[prost(int32, optional, tag = "2")]
    completions: Option<i32>,
    #[prost(int64, optional, tag = "3")]
    active_deadline_seconds: Option<i64>,
    #[prost(message, optional, tag = "4")]
    selector: Option<LabelSelector>,
    #[prost(bool, optional, tag = "5")]
    manual_selector: Option<bool>,
    #[prost(message, optional, tag = "6")]
    template: Option<PodTemplateSpec>,
    #[prost(int32, optional, tag = "7")]
    backoff_limit: Option<i32>,
    #[prost(int32, optional, tag = "8")]
    ttl_seconds_after_finished: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct Job {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<JobSpec>,
}

/// Inserts `value` under `key` unless it is empty (Go's zero values mean "unset" here).
fn put(out: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    if !empty {
        out.insert(key.to_owned(), value);
    }
}

fn selector_json(s: Option<LabelSelector>) -> Value {
    let Some(s) = s else { return Value::Null };
    let mut out = Map::new();
    put(&mut out, "matchLabels", json!(s.match_labels));
    let expressions: Vec<Value> = s
        .match_expressions
        .into_iter()
        .map(|e| json!({ "key": e.key.unwrap_or_default(), "operator": e.operator.unwrap_or_default(), "values": e.values }))
        .collect();
    put(&mut out, "matchExpressions", json!(expressions));
    Value::Object(out)
}

fn quantities(map: BTreeMap<String, Quantity>) -> Value {
    json!(
        map.into_iter()
            .map(|(k, q)| (k, q.string.unwrap_or_default()))
            .collect::<BTreeMap<_, _>>()
    )
}

fn template_json(t: Option<PodTemplateSpec>) -> Value {
    let Some(t) = t else { return Value::Null };
    let spec = t.spec.unwrap_or_default();
    let containers: Vec<Value> = spec
        .containers
        .into_iter()
        .map(|c| {
            let mut out = Map::new();
            put(&mut out, "name", json!(c.name.unwrap_or_default()));
            put(&mut out, "image", json!(c.image.unwrap_or_default()));
            put(&mut out, "command", json!(c.command));
            put(&mut out, "args", json!(c.args));
            put(&mut out, "workingDir", json!(c.working_dir.unwrap_or_default()));
            let ports: Vec<Value> = c
                .ports
                .into_iter()
                .map(|p| {
                    let mut o = Map::new();
                    put(&mut o, "name", json!(p.name.unwrap_or_default()));
                    o.insert("containerPort".into(), json!(p.container_port.unwrap_or(0)));
                    put(&mut o, "protocol", json!(p.protocol.unwrap_or_default()));
                    Value::Object(o)
                })
                .collect();
            put(&mut out, "ports", json!(ports));
            let env: Vec<Value> = c
                .env
                .into_iter()
                .map(|e| json!({ "name": e.name.unwrap_or_default(), "value": e.value.unwrap_or_default() }))
                .collect();
            put(&mut out, "env", json!(env));
            if let Some(r) = c.resources {
                let mut o = Map::new();
                put(&mut o, "limits", quantities(r.limits));
                put(&mut o, "requests", quantities(r.requests));
                out.insert("resources".into(), Value::Object(o));
            }
            put(&mut out, "imagePullPolicy", json!(c.image_pull_policy.unwrap_or_default()));
            Value::Object(out)
        })
        .collect();
    let mut s = Map::new();
    s.insert("containers".into(), json!(containers));
    put(
        &mut s,
        "restartPolicy",
        json!(spec.restart_policy.unwrap_or_default()),
    );
    if let Some(g) = spec.termination_grace_period_seconds {
        s.insert("terminationGracePeriodSeconds".into(), json!(g));
    }
    put(&mut s, "nodeSelector", json!(spec.node_selector));
    put(
        &mut s,
        "serviceAccountName",
        json!(spec.service_account_name.unwrap_or_default()),
    );
    put(
        &mut s,
        "nodeName",
        json!(spec.node_name.unwrap_or_default()),
    );
    let tolerations: Vec<Value> = spec
        .tolerations
        .into_iter()
        .map(|t| {
            let mut o = Map::new();
            put(&mut o, "key", json!(t.key.unwrap_or_default()));
            put(&mut o, "operator", json!(t.operator.unwrap_or_default()));
            put(&mut o, "value", json!(t.value.unwrap_or_default()));
            put(&mut o, "effect", json!(t.effect.unwrap_or_default()));
            Value::Object(o)
        })
        .collect();
    put(&mut s, "tolerations", json!(tolerations));
    json!({ "metadata": metadata_json(t.metadata), "spec": s })
}

fn int_or_string(v: Option<IntOrString>) -> Value {
    match v {
        None => Value::Null,
        Some(v) if v.type_ == Some(1) => json!(v.str_val.unwrap_or_default()),
        Some(v) => json!(v.int_val.unwrap_or(0)),
    }
}

const PRECONDITIONS: Schema = Schema {
    name: "preconditions",
    fields: &[(1, "uid", None), (2, "resourceVersion", None)],
};
const DELETE_OPTIONS: Schema = Schema {
    name: "DeleteOptions",
    fields: &[
        (1, "gracePeriodSeconds", None),
        (2, "preconditions", Some(&PRECONDITIONS)),
        (3, "orphanDependents", None),
        (4, "propagationPolicy", None),
        (5, "dryRun", None),
    ],
};
const EVICTION: Schema = Schema {
    name: "Eviction",
    fields: &[
        (1, "metadata", Some(&META)),
        (2, "deleteOptions", Some(&DELETE_OPTIONS)),
    ],
};

#[derive(Clone, PartialEq, Message)]
struct Preconditions {
    #[prost(string, optional, tag = "1")]
    uid: Option<String>,
    #[prost(string, optional, tag = "2")]
    resource_version: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct DeleteOptions {
    #[prost(int64, optional, tag = "1")]
    grace_period_seconds: Option<i64>,
    #[prost(message, optional, tag = "2")]
    preconditions: Option<Preconditions>,
    #[prost(bool, optional, tag = "3")]
    orphan_dependents: Option<bool>,
    #[prost(string, optional, tag = "4")]
    propagation_policy: Option<String>,
    #[prost(string, repeated, tag = "5")]
    dry_run: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct Eviction {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    delete_options: Option<DeleteOptions>,
}

fn delete_options_json(d: DeleteOptions) -> Value {
    let mut out = Map::new();
    if let Some(g) = d.grace_period_seconds {
        out.insert("gracePeriodSeconds".into(), json!(g));
    }
    if let Some(p) = d.preconditions {
        let mut o = Map::new();
        put(&mut o, "uid", json!(p.uid.unwrap_or_default()));
        put(
            &mut o,
            "resourceVersion",
            json!(p.resource_version.unwrap_or_default()),
        );
        put(&mut out, "preconditions", Value::Object(o));
    }
    if let Some(o) = d.orphan_dependents {
        out.insert("orphanDependents".into(), json!(o));
    }
    put(
        &mut out,
        "propagationPolicy",
        json!(d.propagation_policy.unwrap_or_default()),
    );
    put(&mut out, "dryRun", json!(d.dry_run));
    Value::Object(out)
}

/// DeleteOptions (the body of a DELETE from a typed Go client, as `kubectl drain` sends).
pub(crate) fn delete_options(raw: &[u8]) -> Result<Value, String> {
    check(raw, &DELETE_OPTIONS, "DeleteOptions", 0)?;
    let d =
        DeleteOptions::decode(raw).map_err(|e| format!("invalid protobuf DeleteOptions: {e}"))?;
    Ok(delete_options_json(d))
}

/// A policy/v1 Eviction (`kubectl drain`).
pub(crate) fn eviction(raw: &[u8]) -> Result<Value, String> {
    check(raw, &EVICTION, "Eviction", 0)?;
    let e = Eviction::decode(raw).map_err(|e| format!("invalid protobuf Eviction: {e}"))?;
    let mut v = json!({ "metadata": metadata_json(e.metadata) });
    if let Some(d) = e.delete_options {
        v["deleteOptions"] = delete_options_json(d);
    }
    Ok(v)
}

const BOUND_REF: Schema = Schema {
    name: "boundObjectRef",
    fields: &[
        (1, "kind", None),
        (2, "apiVersion", None),
        (3, "name", None),
        (4, "uid", None),
    ],
};
const TOKEN_SPEC: Schema = Schema {
    name: "spec",
    fields: &[
        (1, "audiences", None),
        (3, "boundObjectRef", Some(&BOUND_REF)),
        (4, "expirationSeconds", None),
    ],
};
const TOKEN_REQUEST: Schema = Schema {
    name: "TokenRequest",
    fields: &[(1, "metadata", Some(&META)), (2, "spec", Some(&TOKEN_SPEC))],
};

#[derive(Clone, PartialEq, Message)]
struct BoundRef {
    #[prost(string, optional, tag = "1")]
    kind: Option<String>,
    #[prost(string, optional, tag = "2")]
    api_version: Option<String>,
    #[prost(string, optional, tag = "3")]
    name: Option<String>,
    #[prost(string, optional, tag = "4")]
    uid: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
struct TokenSpec {
    #[prost(string, repeated, tag = "1")]
    audiences: Vec<String>,
    #[prost(message, optional, tag = "3")]
    bound_object_ref: Option<BoundRef>,
    #[prost(int64, optional, tag = "4")]
    expiration_seconds: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct TokenRequest {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(message, optional, tag = "2")]
    spec: Option<TokenSpec>,
}

/// An authentication.k8s.io/v1 TokenRequest (`kubectl create token`).
pub(crate) fn token_request(raw: &[u8]) -> Result<Value, String> {
    check(raw, &TOKEN_REQUEST, "TokenRequest", 0)?;
    let t = TokenRequest::decode(raw).map_err(|e| format!("invalid protobuf TokenRequest: {e}"))?;
    let spec = t.spec.unwrap_or_default();
    let mut s = Map::new();
    put(&mut s, "audiences", json!(spec.audiences));
    if let Some(e) = spec.expiration_seconds {
        s.insert("expirationSeconds".into(), json!(e));
    }
    if let Some(r) = spec.bound_object_ref {
        let mut o = Map::new();
        put(&mut o, "kind", json!(r.kind.unwrap_or_default()));
        put(
            &mut o,
            "apiVersion",
            json!(r.api_version.unwrap_or_default()),
        );
        put(&mut o, "name", json!(r.name.unwrap_or_default()));
        put(&mut o, "uid", json!(r.uid.unwrap_or_default()));
        put(&mut s, "boundObjectRef", Value::Object(o));
    }
    Ok(json!({ "metadata": metadata_json(t.metadata), "spec": s }))
}

const SERVICE_ACCOUNT: Schema = Schema {
    name: "ServiceAccount",
    fields: &[
        (1, "metadata", Some(&META)),
        (4, "automountServiceAccountToken", None),
    ],
};

#[derive(Clone, PartialEq, Message)]
struct ServiceAccount {
    #[prost(message, optional, tag = "1")]
    metadata: Option<ObjectMeta>,
    #[prost(bool, optional, tag = "4")]
    automount_service_account_token: Option<bool>,
}

/// A v1 ServiceAccount (`kubectl create serviceaccount`).
pub(crate) fn service_account(raw: &[u8]) -> Result<Value, String> {
    check(raw, &SERVICE_ACCOUNT, "ServiceAccount", 0)?;
    let sa =
        ServiceAccount::decode(raw).map_err(|e| format!("invalid protobuf ServiceAccount: {e}"))?;
    let mut out = json!({ "metadata": metadata_json(sa.metadata) });
    if let Some(automount) = sa.automount_service_account_token {
        out["automountServiceAccountToken"] = json!(automount);
    }
    Ok(out)
}

/// A Deployment's JSON form.
pub(crate) fn deployment(raw: &[u8]) -> Result<Value, String> {
    check(raw, &DEPLOYMENT, "Deployment", 0)?;
    let d = Deployment::decode(raw).map_err(|e| format!("invalid protobuf Deployment: {e}"))?;
    let spec = d.spec.unwrap_or_default();
    let mut s = Map::new();
    if let Some(r) = spec.replicas {
        s.insert("replicas".into(), json!(r));
    }
    put(&mut s, "selector", selector_json(spec.selector));
    put(&mut s, "template", template_json(spec.template));
    if let Some(st) = spec.strategy {
        let mut o = Map::new();
        put(&mut o, "type", json!(st.type_.unwrap_or_default()));
        if let Some(r) = st.rolling_update {
            let mut ro = Map::new();
            put(&mut ro, "maxUnavailable", int_or_string(r.max_unavailable));
            put(&mut ro, "maxSurge", int_or_string(r.max_surge));
            put(&mut o, "rollingUpdate", Value::Object(ro));
        }
        put(&mut s, "strategy", Value::Object(o));
    }
    for (key, v) in [
        ("minReadySeconds", spec.min_ready_seconds),
        ("revisionHistoryLimit", spec.revision_history_limit),
        ("progressDeadlineSeconds", spec.progress_deadline_seconds),
    ] {
        if let Some(v) = v {
            s.insert(key.into(), json!(v));
        }
    }
    Ok(json!({ "metadata": metadata_json(d.metadata), "spec": s }))
}

/// A Job's JSON form.
pub(crate) fn job(raw: &[u8]) -> Result<Value, String> {
    check(raw, &JOB, "Job", 0)?;
    let j = Job::decode(raw).map_err(|e| format!("invalid protobuf Job: {e}"))?;
    let spec = j.spec.unwrap_or_default();
    let mut s = Map::new();
    for (key, v) in [
        ("parallelism", spec.parallelism),
        ("completions", spec.completions),
        ("backoffLimit", spec.backoff_limit),
        ("ttlSecondsAfterFinished", spec.ttl_seconds_after_finished),
    ] {
        if let Some(v) = v {
            s.insert(key.into(), json!(v));
        }
    }
    if let Some(v) = spec.active_deadline_seconds {
        s.insert("activeDeadlineSeconds".into(), json!(v));
    }
    if let Some(m) = spec.manual_selector {
        s.insert("manualSelector".into(), json!(m));
    }
    put(&mut s, "selector", selector_json(spec.selector));
    put(&mut s, "template", template_json(spec.template));
    Ok(json!({ "metadata": metadata_json(j.metadata), "spec": s }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, image: &str, command: &[&str]) -> Container {
        Container {
            name: Some(name.into()),
            image: Some(image.into()),
            command: command.iter().map(|s| s.to_string()).collect(),
            working_dir: Some(String::new()),
            resources: Some(Resources::default()),
            image_pull_policy: Some(String::new()),
            ..Default::default()
        }
    }

    fn labels() -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_owned(), "web".to_owned())])
    }

    #[test]
    fn what_kubectl_create_deployment_sends_decodes_and_more_is_refused() {
        let d = Deployment {
            metadata: Some(ObjectMeta {
                name: Some("web".into()),
                labels: labels(),
                ..Default::default()
            }),
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                selector: Some(LabelSelector {
                    match_labels: labels(),
                    ..Default::default()
                }),
                template: Some(PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: labels(),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container("sleep", "sleep", &["sleep", "3600"])],
                        restart_policy: Some(String::new()),
                        ..Default::default()
                    }),
                }),
                strategy: Some(Strategy::default()),
                ..Default::default()
            }),
        };
        let mut raw = d.encode_to_vec();
        // Go also writes its zero-valued structs: an empty status and a zero creation time.
        raw.extend([0x1a, 0x04, 0x08, 0x00, 0x10, 0x00]);
        let v = deployment(&raw).unwrap();
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(
            v["spec"]["selector"],
            json!({ "matchLabels": { "app": "web" } })
        );
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["command"], json!(["sleep", "3600"]));
        assert_eq!(c["image"], "sleep");
        assert!(
            c.get("workingDir").is_none(),
            "empty strings are unset: {c}"
        );

        // A field this server does not decode, set: refused, named.
        let mut extra = raw.clone();
        extra.extend([0x1a, 0x02, 0x10, 0x05]); // status.replicas = 5
        let e = deployment(&extra).unwrap_err();
        assert!(
            e.contains("Deployment: field number 3 of Deployment is set"),
            "{e}"
        );
        let mut deep = d.clone();
        let spec = deep.spec.as_mut().unwrap();
        spec.template
            .as_mut()
            .unwrap()
            .spec
            .as_mut()
            .unwrap()
            .containers[0]
            .env
            .push(EnvVar {
                name: Some("A".into()),
                value: Some("1".into()),
            });
        assert!(deployment(&deep.encode_to_vec()).is_ok(), "env is decoded");
        let mut pod_spec_raw = PodSpec::default().encode_to_vec();
        pod_spec_raw.extend([0x58, 0x01]); // hostNetwork = true (field 11)
        let e = check(&pod_spec_raw, &POD_SPEC, "Deployment.spec.template.spec", 0).unwrap_err();
        assert!(e.contains("field number 11 of spec is set"), "{e}");
    }

    #[test]
    fn what_kubectl_create_serviceaccount_sends_decodes_and_more_is_refused() {
        let sa = ServiceAccount {
            metadata: Some(ObjectMeta {
                name: Some("viewer".into()),
                namespace: Some("default".into()),
                ..Default::default()
            }),
            automount_service_account_token: Some(false),
        };
        let v = service_account(&sa.encode_to_vec()).unwrap();
        assert_eq!(v["metadata"]["name"], "viewer");
        assert_eq!(v["automountServiceAccountToken"], false);
        // Field 2 (secrets) is not decoded: refused, naming it.
        let mut raw = sa.encode_to_vec();
        raw.extend_from_slice(&[0x12, 0x03, 0x0a, 0x01, b'x']);
        let err = service_account(&raw).unwrap_err();
        assert!(
            err.contains("field number 2 of ServiceAccount is set"),
            "{err}"
        );
    }

    #[test]
    fn what_kubectl_create_job_sends_decodes() {
        let j = Job {
            metadata: Some(ObjectMeta {
                name: Some("count".into()),
                ..Default::default()
            }),
            spec: Some(JobSpec {
                template: Some(PodTemplateSpec {
                    metadata: Some(ObjectMeta::default()),
                    spec: Some(PodSpec {
                        containers: vec![container("count", "sh", &["sh", "-c", "echo hi"])],
                        restart_policy: Some("Never".into()),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        };
        let v = job(&j.encode_to_vec()).unwrap();
        assert_eq!(v["spec"]["template"]["spec"]["restartPolicy"], "Never");
        assert_eq!(v["metadata"]["name"], "count");
        assert!(job(&[0xff, 0xff]).is_err(), "garbage is refused");
    }

    #[test]
    fn evictions_and_delete_options_decode_as_kubectl_drain_sends_them() {
        let e = Eviction {
            metadata: Some(ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("default".into()),
                ..Default::default()
            }),
            delete_options: Some(DeleteOptions {
                grace_period_seconds: Some(5),
                preconditions: Some(Preconditions {
                    uid: Some("u-1".into()),
                    resource_version: Some(String::new()),
                }),
                ..Default::default()
            }),
        };
        let v = eviction(&e.encode_to_vec()).unwrap();
        assert_eq!(v["metadata"]["name"], "web-1");
        assert_eq!(v["deleteOptions"]["gracePeriodSeconds"], 5);
        assert_eq!(v["deleteOptions"]["preconditions"], json!({ "uid": "u-1" }));
        let d = DeleteOptions {
            propagation_policy: Some("Foreground".into()),
            ..Default::default()
        };
        assert_eq!(
            delete_options(&d.encode_to_vec()).unwrap(),
            json!({ "propagationPolicy": "Foreground" })
        );
    }
}
