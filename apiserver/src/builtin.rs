//! Built-in kinds: decoding through their `k8s-openapi` types (which reports wrong types with
//! the field path, and unknown fields), what create does to each kind, the conversion between
//! the two Event APIs, and the list merge rules strategic merge patch and server-side apply
//! follow.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::registry::ResourceType;

/// Decodes a built-in object through its typed form. Returns the normalized object and the
/// paths of fields the type does not declare (which the typed form dropped).
pub fn decode(t: &ResourceType, value: &Value) -> Result<(Value, Vec<String>), ApiError> {
    use k8s_openapi::api::{apps, batch, coordination, core, events};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;
    let typed = match (t.group.as_str(), t.resource.as_str()) {
        ("", "namespaces") => roundtrip::<core::v1::Namespace>(value),
        ("", "nodes") => roundtrip::<core::v1::Node>(value),
        ("", "pods") => roundtrip::<core::v1::Pod>(value),
        ("", "services") => roundtrip::<core::v1::Service>(value),
        ("", "configmaps") => roundtrip::<core::v1::ConfigMap>(value),
        ("", "secrets") => roundtrip::<core::v1::Secret>(value),
        ("", "serviceaccounts") => roundtrip::<core::v1::ServiceAccount>(value),
        ("", "events") => roundtrip::<core::v1::Event>(value),
        ("events.k8s.io", "events") => roundtrip::<events::v1::Event>(value),
        ("coordination.k8s.io", "leases") => roundtrip::<coordination::v1::Lease>(value),
        ("apps", "deployments") => roundtrip::<apps::v1::Deployment>(value),
        ("apiregistration.k8s.io", "apiservices") => roundtrip::<
            k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService,
        >(value),
        ("apps", "replicasets") => roundtrip::<apps::v1::ReplicaSet>(value),
        ("apps", "daemonsets") => roundtrip::<apps::v1::DaemonSet>(value),
        ("batch", "jobs") => roundtrip::<batch::v1::Job>(value),
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            roundtrip::<apiext::CustomResourceDefinition>(value)
        }
        _ => Ok(value.clone()),
    };
    let normalized = typed.map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version {:?} cannot be handled as a {}: {e}",
            t.kind, t.version, t.kind
        ))
    })?;
    let mut unknown = Vec::new();
    dropped_paths(value, &normalized, &mut Vec::new(), &mut unknown);
    Ok((normalized, unknown))
}

fn roundtrip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, String> {
    let typed: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// One step of a path into a JSON value.
enum Step<'a> {
    Field(&'a str),
    Item(usize),
}

/// Paths present (and non-null) in `before` but missing from `after`, written as
/// `spec.containers[0].x`. The path is spelled out only for what is missing: this walks every
/// field of every write.
fn dropped_paths<'a>(
    before: &'a Value,
    after: &Value,
    path: &mut Vec<Step<'a>>,
    out: &mut Vec<String>,
) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, v) in b {
                path.push(Step::Field(k));
                match a.get(k) {
                    Some(av) => dropped_paths(v, av, path, out),
                    None if v.is_null() => {}
                    None => out.push(spell(path)),
                }
                path.pop();
            }
        }
        (Value::Array(b), Value::Array(a)) => {
            for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                path.push(Step::Item(i));
                dropped_paths(bv, av, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn spell(path: &[Step<'_>]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Field(k) if s.is_empty() => s.push_str(k),
            Step::Field(k) => {
                s.push('.');
                s.push_str(k);
            }
            Step::Item(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// What the server does to a new built-in object before storing it (after metadata is set).
/// `used_cluster_ips` lists the cluster IPs of existing services.
pub fn prepare_create(t: &ResourceType, obj: &mut Value, used_cluster_ips: &[String]) {
    match (t.group.as_str(), t.resource.as_str()) {
        ("", "namespaces") => {
            obj["spec"] = json!({ "finalizers": ["kubernetes"] });
            obj["status"] = json!({ "phase": "Active" });
        }
        ("", "pods") => {
            let qos = pod_qos(obj);
            obj["status"] = json!({ "phase": "Pending", "qosClass": qos });
            if let Some(containers) = obj
                .pointer_mut("/spec/containers")
                .and_then(Value::as_array_mut)
            {
                for c in containers {
                    if c.get("terminationMessagePath").is_none() {
                        c["terminationMessagePath"] = json!("/dev/termination-log");
                    }
                    if c.get("imagePullPolicy").is_none() {
                        c["imagePullPolicy"] = json!("IfNotPresent");
                    }
                }
            }
            let spec = &mut obj["spec"];
            if spec.is_object() {
                for (field, default) in [
                    ("restartPolicy", json!("Always")),
                    ("terminationGracePeriodSeconds", json!(30)),
                    ("dnsPolicy", json!("ClusterFirst")),
                    ("schedulerName", json!("default-scheduler")),
                ] {
                    if spec.get(field).is_none() {
                        spec[field] = default;
                    }
                }
            }
        }
        ("", "secrets") => {
            if obj.get("type").is_none() {
                obj["type"] = json!("Opaque");
            }
            fold_string_data(obj);
        }
        ("", "services") => prepare_service(obj, used_cluster_ips),
        ("", "serviceaccounts") | ("", "configmaps") => {}
        ("apps", "deployments") => {
            default_fields(
                &mut obj["spec"],
                &[
                    ("replicas", json!(1)),
                    ("revisionHistoryLimit", json!(10)),
                    ("progressDeadlineSeconds", json!(600)),
                    (
                        "strategy",
                        json!({ "type": "RollingUpdate",
                                "rollingUpdate": { "maxSurge": "25%", "maxUnavailable": "25%" } }),
                    ),
                ],
            );
            obj["status"] = json!({});
        }
        ("apps", "replicasets") => {
            default_fields(&mut obj["spec"], &[("replicas", json!(1))]);
            obj["status"] = json!({ "replicas": 0 });
        }
        ("apps", "daemonsets") => {
            default_fields(
                &mut obj["spec"],
                &[
                    ("revisionHistoryLimit", json!(10)),
                    (
                        "updateStrategy",
                        json!({ "type": "RollingUpdate",
                                "rollingUpdate": { "maxUnavailable": 1, "maxSurge": 0 } }),
                    ),
                ],
            );
            obj["status"] = json!({ "currentNumberScheduled": 0, "desiredNumberScheduled": 0,
                                    "numberMisscheduled": 0, "numberReady": 0 });
        }
        ("batch", "jobs") => {
            default_fields(
                &mut obj["spec"],
                &[
                    ("parallelism", json!(1)),
                    ("backoffLimit", json!(6)),
                    ("completionMode", json!("NonIndexed")),
                ],
            );
            if obj.pointer("/spec/completions").is_none() {
                obj["spec"]["completions"] = json!(1);
            }
            // The job's own selector, unless the user chose one (spec.manualSelector).
            if obj.pointer("/spec/manualSelector") != Some(&json!(true)) {
                let uid = obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
                let name = obj
                    .pointer("/metadata/name")
                    .cloned()
                    .unwrap_or(Value::Null);
                obj["spec"]["selector"] =
                    json!({ "matchLabels": { "batch.kubernetes.io/controller-uid": uid } });
                let labels = &mut obj["spec"]["template"]["metadata"]["labels"];
                if !labels.is_object() {
                    *labels = json!({});
                }
                labels["batch.kubernetes.io/controller-uid"] = uid;
                labels["batch.kubernetes.io/job-name"] = name;
            }
            obj["status"] = json!({});
        }
        _ => {}
    }
}

/// Sets the fields of `spec` that are absent.
fn default_fields(spec: &mut Value, defaults: &[(&str, Value)]) {
    if !spec.is_object() {
        return;
    }
    for (field, value) in defaults {
        if spec.get(*field).is_none() {
            spec[*field] = value.clone();
        }
    }
}

/// Checks the rules of the workload kinds a typed decode cannot: the selector selects the pod
/// template, counts are not negative, a Job's pods do not restart forever. Returns the field
/// and the reason.
pub fn validate(t: &ResourceType, obj: &Value) -> Result<(), (String, String)> {
    let workload = matches!(
        (t.group.as_str(), t.resource.as_str()),
        ("apps", "deployments" | "replicasets" | "daemonsets") | ("batch", "jobs")
    );
    if !workload {
        return Ok(());
    }
    let spec = &obj["spec"];
    for field in ["replicas", "parallelism", "completions", "backoffLimit"] {
        if spec
            .get(field)
            .and_then(Value::as_i64)
            .is_some_and(|n| n < 0)
        {
            return Err((
                format!("spec.{field}"),
                format!(
                    "Invalid value: {}: must be greater than or equal to 0",
                    spec[field]
                ),
            ));
        }
    }
    let selector = &spec["selector"];
    let match_labels = selector.get("matchLabels").and_then(Value::as_object);
    let expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .is_some_and(|e| !e.is_empty());
    if match_labels.is_none_or(|m| m.is_empty()) && !expressions {
        return Err((
            "spec.selector".into(),
            "Required value: a non-empty selector is required".into(),
        ));
    }
    let labels = spec
        .pointer("/template/metadata/labels")
        .and_then(Value::as_object);
    if let Some(wanted) = match_labels {
        let selected = wanted
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
        if !selected {
            return Err((
                "spec.template.metadata.labels".into(),
                format!(
                    "Invalid value: {}: `selector` does not match template `labels`",
                    spec.pointer("/template/metadata/labels")
                        .unwrap_or(&Value::Null)
                ),
            ));
        }
    }
    let restart = spec
        .pointer("/template/spec/restartPolicy")
        .and_then(Value::as_str)
        .unwrap_or("Always");
    let (allowed, which): (&[&str], &str) = if t.group == "batch" {
        (&["Never", "OnFailure"], "\"OnFailure\", \"Never\"")
    } else {
        (&["Always"], "\"Always\"")
    };
    if !allowed.contains(&restart) {
        return Err((
            "spec.template.spec.restartPolicy".into(),
            format!("Unsupported value: {restart:?}: supported values: {which}"),
        ));
    }
    Ok(())
}

/// Moves a Secret's `stringData` into `data` (base64), as the API server does on every write.
pub fn fold_string_data(obj: &mut Value) {
    use base64::Engine;
    let Some(string_data) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    let Some(entries) = string_data.as_object() else {
        return;
    };
    if !obj.get("data").is_some_and(Value::is_object) {
        obj["data"] = json!({});
    }
    for (k, v) in entries {
        let text = v.as_str().unwrap_or_default();
        obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

fn pod_qos(pod: &Value) -> &'static str {
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut any = false;
    let mut guaranteed = !containers.is_empty();
    for c in &containers {
        let requests = c.pointer("/resources/requests").and_then(Value::as_object);
        let limits = c.pointer("/resources/limits").and_then(Value::as_object);
        any |= requests.is_some_and(|r| !r.is_empty()) || limits.is_some_and(|l| !l.is_empty());
        let full = ["cpu", "memory"].iter().all(|r| {
            let l = limits.and_then(|l| l.get(*r));
            let q = requests.and_then(|q| q.get(*r)).or(l);
            l.is_some() && q == l
        });
        guaranteed &= full;
    }
    if guaranteed {
        "Guaranteed"
    } else if any {
        "Burstable"
    } else {
        "BestEffort"
    }
}

fn prepare_service(obj: &mut Value, used: &[String]) {
    let spec = &mut obj["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    if spec.get("type").is_none() {
        spec["type"] = json!("ClusterIP");
    }
    if spec.get("sessionAffinity").is_none() {
        spec["sessionAffinity"] = json!("None");
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            if p.get("protocol").is_none() {
                p["protocol"] = json!("TCP");
            }
            if p.get("targetPort").is_none()
                && let Some(port) = p.get("port").cloned()
            {
                p["targetPort"] = port;
            }
        }
    }
    let wants_ip = spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    if wants_ip && spec["type"] != "ExternalName" {
        // 10.96.0.0/12, skipping the network and the first (API server) address.
        let ip = (2u32..(1 << 20))
            .map(|n| {
                let addr = (10u32 << 24) | (96 << 16) | n;
                std::net::Ipv4Addr::from(addr).to_string()
            })
            .find(|ip| !used.contains(ip));
        if let Some(ip) = ip {
            spec["clusterIP"] = json!(ip);
            spec["clusterIPs"] = json!([ip]);
        }
    }
    if obj.get("status").is_none() {
        obj["status"] = json!({ "loadBalancer": {} });
    }
}

/// Field renames between `events.k8s.io/v1` (left) and the stored `core/v1` Event (right).
const EVENT_FIELDS: [(&str, &str); 8] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingInstance", "reportingInstance"),
];

fn rename_fields(obj: &Value, forward: bool) -> Value {
    let Some(map) = obj.as_object() else {
        return obj.clone();
    };
    let mut out = Map::new();
    for (k, v) in map {
        let renamed = EVENT_FIELDS
            .iter()
            .find(|(a, b)| if forward { a == k } else { b == k })
            .map(|(a, b)| if forward { *b } else { *a })
            .unwrap_or(k.as_str());
        out.insert(renamed.to_owned(), v.clone());
    }
    Value::Object(out)
}

/// An `events.k8s.io/v1` Event in its stored `core/v1` form.
pub fn event_to_core(event: &Value) -> Value {
    let mut core = rename_fields(event, true);
    core["apiVersion"] = json!("v1");
    core["kind"] = json!("Event");
    if core.get("firstTimestamp").is_none()
        && let Some(t) = event.get("eventTime").and_then(Value::as_str)
    {
        let seconds = t.split('.').next().unwrap_or(t).trim_end_matches('Z');
        core["firstTimestamp"] = json!(format!("{seconds}Z"));
        core["lastTimestamp"] = core["firstTimestamp"].clone();
    }
    if core.get("count").is_none() {
        let count = event.pointer("/series/count").cloned().unwrap_or(json!(1));
        core["count"] = count;
    }
    if core.get("source").is_none()
        && let Some(c) = event.get("reportingController")
    {
        core["source"] = json!({ "component": c });
    }
    core
}

/// A stored `core/v1` Event as `events.k8s.io/v1`.
pub fn event_from_core(core: &Value) -> Value {
    let mut event = rename_fields(core, false);
    event["apiVersion"] = json!("events.k8s.io/v1");
    event["kind"] = json!("Event");
    event
}

/// How a list field merges in strategic merge patch and server-side apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole.
    Atomic,
    /// Items are objects identified by these keys.
    Map(Vec<String>),
    /// Items are unique scalars, merged as a set.
    Set,
}

/// The merge rule of the list at `path` (field names from the object root, without indices)
/// in a built-in kind, following the types' `patchMergeKey`/`listType` markers.
pub fn list_type(t: &ResourceType, path: &[&str]) -> ListType {
    let map = |keys: &[&str]| ListType::Map(keys.iter().map(|k| (*k).to_owned()).collect());
    match path {
        ["metadata", "finalizers"] => return ListType::Set,
        ["metadata", "ownerReferences"] => return map(&["uid"]),
        ["metadata", "managedFields"] => return ListType::Atomic,
        _ => {}
    }
    if t.custom || t.group == "apiextensions.k8s.io" {
        return ListType::Atomic;
    }
    // Pod specs, alone or inside templates.
    let pod_spec_tail = match path {
        ["spec", rest @ ..] if t.resource == "pods" => Some(rest),
        ["spec", "template", "spec", rest @ ..]
            if matches!(
                (t.group.as_str(), t.resource.as_str()),
                ("apps", "deployments" | "replicasets" | "daemonsets") | ("batch", "jobs")
            ) =>
        {
            Some(rest)
        }
        _ => None,
    };
    if let Some(rest) = pod_spec_tail {
        return match rest {
            ["containers" | "initContainers" | "ephemeralContainers"] => map(&["name"]),
            [
                "containers" | "initContainers" | "ephemeralContainers",
                "ports",
            ] => map(&["containerPort", "protocol"]),
            [
                "containers" | "initContainers" | "ephemeralContainers",
                "env",
            ] => map(&["name"]),
            [
                "containers" | "initContainers" | "ephemeralContainers",
                "volumeMounts",
            ] => map(&["mountPath"]),
            [
                "containers" | "initContainers" | "ephemeralContainers",
                "volumeDevices",
            ] => map(&["devicePath"]),
            [
                "containers" | "initContainers" | "ephemeralContainers",
                "resizePolicy",
            ] => map(&["resourceName"]),
            ["volumes"] => map(&["name"]),
            ["imagePullSecrets"] => map(&["name"]),
            ["hostAliases"] => map(&["ip"]),
            ["resourceClaims"] => map(&["name"]),
            ["schedulingGates"] => map(&["name"]),
            _ => ListType::Atomic,
        };
    }
    match (t.resource.as_str(), path) {
        ("pods", ["status", "conditions"]) => map(&["type"]),
        ("pods", ["status", "podIPs" | "hostIPs"]) => map(&["ip"]),
        ("nodes", ["status", "conditions" | "addresses"]) => map(&["type"]),
        ("nodes", ["spec", "podCIDRs"]) => ListType::Set,
        ("namespaces", ["status", "conditions"]) => map(&["type"]),
        ("namespaces", ["spec", "finalizers"]) => ListType::Set,
        ("services", ["spec", "ports"]) => map(&["port", "protocol"]),
        ("services", ["status", "conditions"]) => map(&["type"]),
        ("serviceaccounts", ["secrets"]) => map(&["name"]),
        _ => ListType::Atomic,
    }
}

/// The merge rule of the list at `path` in a custom resource, from its schema.
pub fn custom_list_type(t: &ResourceType, path: &[&str]) -> ListType {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray;
    let Some(mut node) = t.openapi.as_ref() else {
        return ListType::Atomic;
    };
    for part in path {
        let next = node.properties.as_ref().and_then(|p| p.get(*part));
        let next = match next {
            Some(n) => n,
            None => match &node.items {
                Some(JSONSchemaPropsOrArray::Schema(items)) => {
                    match items.properties.as_ref().and_then(|p| p.get(*part)) {
                        Some(n) => n,
                        None => return ListType::Atomic,
                    }
                }
                _ => return ListType::Atomic,
            },
        };
        node = next;
    }
    match node.x_kubernetes_list_type.as_deref() {
        Some("map") => ListType::Map(node.x_kubernetes_list_map_keys.clone().unwrap_or_default()),
        Some("set") => ListType::Set,
        _ => ListType::Atomic,
    }
}

/// The merge rule of the list at `path` for any kind.
pub fn list_type_of(t: &ResourceType, path: &[&str]) -> ListType {
    match path {
        ["metadata", ..] => list_type(t, path),
        _ if t.custom => custom_list_type(t, path),
        _ => list_type(t, path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::builtins;

    fn t(resource: &str) -> ResourceType {
        builtins()
            .into_iter()
            .find(|t| t.resource == resource && t.group.is_empty())
            .unwrap()
    }

    fn workload(group: &str, resource: &str) -> ResourceType {
        builtins()
            .into_iter()
            .find(|t| t.resource == resource && t.group == group)
            .unwrap()
    }

    #[test]
    fn workloads_are_defaulted_and_held_to_their_rules() {
        let deploy = workload("apps", "deployments");
        let mut d = json!({ "metadata": { "name": "web", "uid": "u" },
            "spec": { "selector": { "matchLabels": { "app": "web" } },
                      "template": { "metadata": { "labels": { "app": "web" } },
                                    "spec": { "containers": [{ "name": "c", "image": "sh" }] } } } });
        prepare_create(&deploy, &mut d, &[]);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(validate(&deploy, &d), Ok(()));
        let mut other = d.clone();
        other["spec"]["template"]["metadata"]["labels"]["app"] = json!("db");
        let (field, why) = validate(&deploy, &other).unwrap_err();
        assert_eq!(field, "spec.template.metadata.labels");
        assert!(
            why.contains("`selector` does not match template `labels`"),
            "{why}"
        );
        let mut negative = d.clone();
        negative["spec"]["replicas"] = json!(-1);
        assert_eq!(validate(&deploy, &negative).unwrap_err().0, "spec.replicas");
        let mut none = d.clone();
        none["spec"]["selector"] = json!({});
        assert_eq!(validate(&deploy, &none).unwrap_err().0, "spec.selector");

        // A Job gets its own selector and label, and its pods may not restart forever.
        let jobs = workload("batch", "jobs");
        let mut j = json!({ "metadata": { "name": "count", "uid": "j-1" },
            "spec": { "template": { "spec": { "restartPolicy": "Never",
                                              "containers": [{ "name": "c", "image": "sh" }] } } } });
        prepare_create(&jobs, &mut j, &[]);
        assert_eq!(
            j["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
            "j-1"
        );
        assert_eq!(
            j["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"],
            "count"
        );
        assert_eq!(
            (
                j["spec"]["completions"].clone(),
                j["spec"]["backoffLimit"].clone()
            ),
            (json!(1), json!(6))
        );
        assert_eq!(validate(&jobs, &j), Ok(()));
        j["spec"]["template"]["spec"]["restartPolicy"] = json!("Always");
        let (field, why) = validate(&jobs, &j).unwrap_err();
        assert_eq!(field, "spec.template.spec.restartPolicy");
        assert!(
            why.contains("supported values: \"OnFailure\", \"Never\""),
            "{why}"
        );
    }

    #[test]
    fn wrong_types_in_built_ins_name_the_field() {
        let cm = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" },
                         "data": { "k": 5 } });
        let err = decode(&t("configmaps"), &cm).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(err.message.contains("data.k"), "{}", err.message);
    }

    #[test]
    fn unknown_fields_in_built_ins_are_reported() {
        let pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" },
                          "spec": { "containers": [{ "name": "c", "imagee": "x" }],
                                    "nodeName": "n", "colour": "red" } });
        let (normalized, unknown) = decode(&t("pods"), &pod).unwrap();
        assert_eq!(unknown, ["spec.colour", "spec.containers[0].imagee"]);
        assert_eq!(normalized["spec"]["nodeName"], "n");
    }

    #[test]
    fn secrets_fold_string_data_into_base64_data() {
        let mut s = json!({ "stringData": { "password": "hunter2" }, "data": { "a": "Yg==" } });
        prepare_create(&t("secrets"), &mut s, &[]);
        assert_eq!(s["data"]["password"], "aHVudGVyMg==");
        assert_eq!(s["data"]["a"], "Yg==");
        assert_eq!(s["type"], "Opaque");
        assert!(s.get("stringData").is_none());
    }

    #[test]
    fn services_get_a_free_cluster_ip_and_port_defaults() {
        let mut s = json!({ "spec": { "ports": [{ "port": 80 }] } });
        prepare_create(&t("services"), &mut s, &["10.96.0.2".to_owned()]);
        assert_eq!(s["spec"]["clusterIP"], "10.96.0.3");
        assert_eq!(s["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
    }

    #[test]
    fn pods_start_pending_with_their_qos_class() {
        let mut p = json!({ "spec": { "containers": [{ "name": "c", "resources": {
            "limits": { "cpu": "1", "memory": "1Gi" } } }] } });
        prepare_create(&t("pods"), &mut p, &[]);
        assert_eq!(p["status"]["phase"], "Pending");
        assert_eq!(p["status"]["qosClass"], "Guaranteed");
        assert_eq!(p["spec"]["restartPolicy"], "Always");
    }

    #[test]
    fn events_convert_between_the_two_apis_losslessly() {
        let new = json!({ "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": { "name": "e", "namespace": "ns" },
            "eventTime": "2026-11-26T10:00:00.123456Z", "reason": "Created",
            "regarding": { "kind": "Model", "name": "m" }, "note": "created the worker",
            "reportingController": "sedna-gm", "reportingInstance": "gm-1", "type": "Normal",
            "action": "Create" });
        let core = event_to_core(&new);
        assert_eq!(core["involvedObject"]["name"], "m");
        assert_eq!(core["message"], "created the worker");
        assert_eq!(core["reportingComponent"], "sedna-gm");
        assert_eq!(core["source"]["component"], "sedna-gm");
        assert_eq!(core["firstTimestamp"], "2026-11-26T10:00:00Z");
        let back = event_from_core(&core);
        for field in [
            "regarding",
            "note",
            "reportingController",
            "eventTime",
            "action",
        ] {
            assert_eq!(back[field], new[field], "{field}");
        }
    }

    #[test]
    fn list_merge_rules_follow_the_kubernetes_types() {
        let pods = t("pods");
        assert_eq!(
            list_type(&pods, &["spec", "containers"]),
            ListType::Map(vec!["name".into()])
        );
        assert_eq!(
            list_type(&pods, &["spec", "containers", "env"]),
            ListType::Map(vec!["name".into()])
        );
        assert_eq!(
            list_type(&pods, &["spec", "containers", "args"]),
            ListType::Atomic
        );
        assert_eq!(list_type(&pods, &["metadata", "finalizers"]), ListType::Set);
        // Inside the pod templates of workloads too (`kubectl set env` patches them so).
        let deployments = workload("apps", "deployments");
        assert_eq!(
            list_type(&deployments, &["spec", "template", "spec", "containers"]),
            ListType::Map(vec!["name".into()])
        );
        assert_eq!(
            list_type(
                &workload("batch", "jobs"),
                &["spec", "template", "spec", "containers", "env"]
            ),
            ListType::Map(vec!["name".into()])
        );
    }
}
