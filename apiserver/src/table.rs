//! `meta.k8s.io/v1` Tables, what `kubectl get` prints: CRD `additionalPrinterColumns` for
//! custom resources and the usual columns for built-in kinds.

use serde_json::{Value, json};

use crate::meta;
use crate::registry::{Column, ResourceType};

fn col(name: &str, type_: &str, priority: i32, description: &str) -> Column {
    Column {
        name: name.to_owned(),
        type_: type_.to_owned(),
        json_path: String::new(),
        priority,
        description: description.to_owned(),
    }
}

/// The columns of a resource's table (after `Name`).
pub fn columns(t: &ResourceType) -> Vec<Column> {
    if t.custom {
        if t.columns.is_empty() {
            return vec![col("Age", "date", 0, "creation time")];
        }
        return t.columns.clone();
    }
    match (t.group.as_str(), t.resource.as_str()) {
        ("", "pods") => vec![
            col("Ready", "string", 0, "ready containers / containers"),
            col("Status", "string", 0, "pod status"),
            col("Restarts", "string", 0, "container restarts"),
            col("Age", "date", 0, "creation time"),
            col("IP", "string", 1, "pod IP"),
            col("Node", "string", 1, "node the pod runs on"),
        ],
        ("", "nodes") => vec![
            col("Status", "string", 0, "node readiness"),
            col("Roles", "string", 0, "node roles"),
            col("Age", "date", 0, "creation time"),
            col("Version", "string", 0, "agent version"),
            col("Internal-IP", "string", 1, "internal address"),
            col("OS-Image", "string", 1, "operating system"),
        ],
        ("", "namespaces") => vec![
            col("Status", "string", 0, "namespace phase"),
            col("Age", "date", 0, "creation time"),
        ],
        ("", "configmaps") => vec![
            col("Data", "integer", 0, "number of keys"),
            col("Age", "date", 0, "creation time"),
        ],
        ("", "secrets") => vec![
            col("Type", "string", 0, "secret type"),
            col("Data", "integer", 0, "number of keys"),
            col("Age", "date", 0, "creation time"),
        ],
        ("", "services") => vec![
            col("Type", "string", 0, "service type"),
            col("Cluster-IP", "string", 0, "cluster IP"),
            col("External-IP", "string", 0, "external IPs"),
            col("Port(s)", "string", 0, "ports"),
            col("Age", "date", 0, "creation time"),
        ],
        ("", "events") | ("events.k8s.io", "events") => vec![
            col("Last Seen", "string", 0, "when the event was last seen"),
            col("Type", "string", 0, "Normal or Warning"),
            col("Reason", "string", 0, "why"),
            col("Object", "string", 0, "the object the event is about"),
            col("Message", "string", 0, "what happened"),
        ],
        ("coordination.k8s.io", "leases") => vec![
            col("Holder", "string", 0, "holder identity"),
            col("Age", "date", 0, "creation time"),
        ],
        ("apiextensions.k8s.io", _) => vec![col("Created At", "date", 0, "creation time")],
        ("apps", "deployments") => vec![
            col("Ready", "string", 0, "ready replicas / desired"),
            col(
                "Up-to-date",
                "integer",
                0,
                "replicas of the newest template",
            ),
            col("Available", "integer", 0, "available replicas"),
            col("Age", "date", 0, "creation time"),
        ],
        ("apps", "replicasets") => vec![
            col("Desired", "integer", 0, "desired replicas"),
            col("Current", "integer", 0, "replicas created"),
            col("Ready", "integer", 0, "ready replicas"),
            col("Age", "date", 0, "creation time"),
        ],
        ("apps", "daemonsets") => vec![
            col("Desired", "integer", 0, "nodes that should run the pod"),
            col("Current", "integer", 0, "nodes running it"),
            col("Ready", "integer", 0, "ready pods"),
            col("Up-to-date", "integer", 0, "pods of the newest template"),
            col("Available", "integer", 0, "available pods"),
            col("Node Selector", "string", 0, "the template's nodeSelector"),
            col("Age", "date", 0, "creation time"),
        ],
        ("batch", "jobs") => vec![
            col("Status", "string", 0, "Running, Complete or Failed"),
            col("Completions", "string", 0, "succeeded / wanted"),
            col("Duration", "string", 0, "how long it ran"),
            col("Age", "date", 0, "creation time"),
        ],
        _ => vec![col("Age", "date", 0, "creation time")],
    }
}

/// Cells of the workload kinds (apps/v1, batch/v1), as kubectl prints them.
fn workload_cells(t: &ResourceType, obj: &Value, age: Value) -> Option<Vec<Value>> {
    let n = |p: &str| obj.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    Some(match (t.group.as_str(), t.resource.as_str()) {
        ("apps", "deployments") => vec![
            json!(format!(
                "{}/{}",
                n("/status/readyReplicas"),
                n("/spec/replicas")
            )),
            json!(n("/status/updatedReplicas")),
            json!(n("/status/availableReplicas")),
            age,
        ],
        ("apps", "replicasets") => vec![
            json!(n("/spec/replicas")),
            json!(n("/status/replicas")),
            json!(n("/status/readyReplicas")),
            age,
        ],
        ("apps", "daemonsets") => {
            let selector = obj
                .pointer("/spec/template/spec/nodeSelector")
                .and_then(Value::as_object)
                .filter(|m| !m.is_empty())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "<none>".into());
            vec![
                json!(n("/status/desiredNumberScheduled")),
                json!(n("/status/currentNumberScheduled")),
                json!(n("/status/numberReady")),
                json!(n("/status/updatedNumberScheduled")),
                json!(n("/status/numberAvailable")),
                json!(selector),
                age,
            ]
        }
        ("batch", "jobs") => {
            let conditions = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let holds = |t: &str| {
                conditions
                    .iter()
                    .any(|c| c["type"] == t && c["status"] == "True")
            };
            let status = if holds("Complete") {
                "Complete"
            } else if holds("Failed") {
                "Failed"
            } else {
                "Running"
            };
            let time = |p: &str| {
                obj.pointer(p)
                    .and_then(Value::as_str)
                    .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            };
            let now = k8s_openapi::jiff::Timestamp::now();
            let duration = match (time("/status/startTime"), time("/status/completionTime")) {
                (Some(a), b) => human_duration(b.unwrap_or(now).as_second() - a.as_second()),
                _ => String::new(),
            };
            vec![
                json!(status),
                json!(format!(
                    "{}/{}",
                    n("/status/succeeded"),
                    n("/spec/completions").max(1)
                )),
                json!(duration),
                age,
            ]
        }
        _ => return None,
    })
}

/// Evaluates a simple JSONPath (`.status.phase`, `.spec.items[0].name`, `.a.b[*].c`).
pub fn json_path(obj: &Value, path: &str) -> Value {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut current = vec![obj.clone()];
    for part in path
        .trim_start_matches('.')
        .split('.')
        .filter(|p| !p.is_empty())
    {
        let (field, index) = match part.split_once('[') {
            Some((f, rest)) => (f, Some(rest.trim_end_matches(']'))),
            None => (part, None),
        };
        let mut next = Vec::new();
        for v in &current {
            let v = if field.is_empty() {
                Some(v)
            } else {
                v.get(field)
            };
            let Some(v) = v else { continue };
            match index {
                None => next.push(v.clone()),
                Some("*") => next.extend(v.as_array().cloned().unwrap_or_default()),
                Some(i) => {
                    if let (Some(items), Ok(i)) = (v.as_array(), i.parse::<i64>()) {
                        let i = if i < 0 { items.len() as i64 + i } else { i };
                        if let Some(item) = usize::try_from(i).ok().and_then(|i| items.get(i)) {
                            next.push(item.clone());
                        }
                    }
                }
            }
        }
        current = next;
    }
    match current.len() {
        0 => Value::Null,
        1 => current.remove(0),
        _ => Value::Array(current),
    }
}

fn custom_cell(c: &Column, obj: &Value) -> Value {
    let v = json_path(obj, &c.json_path);
    if c.type_ == "date" {
        return age_cell(&v);
    }
    match (&v, c.type_.as_str()) {
        (Value::Array(items), _) => {
            let parts: Vec<String> = items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| i.to_string())
                })
                .collect();
            json!(parts.join(","))
        }
        (Value::Object(_), _) => json!(v.to_string()),
        _ => v,
    }
}

fn builtin_cells(t: &ResourceType, obj: &Value) -> Vec<Value> {
    let meta = meta::metadata(obj);
    let age = age_cell(meta.get("creationTimestamp").unwrap_or(&Value::Null));
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    if let Some(cells) = workload_cells(t, obj, age.clone()) {
        return cells;
    }
    match (t.group.as_str(), t.resource.as_str()) {
        ("", "pods") => {
            let containers = obj
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = statuses
                .iter()
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .sum();
            let waiting = statuses.iter().find_map(|c| {
                c.pointer("/state/waiting/reason")
                    .or_else(|| c.pointer("/state/terminated/reason"))
                    .and_then(Value::as_str)
            });
            let status = if meta::is_deleting(obj) {
                "Terminating".to_owned()
            } else if let Some(w) = waiting {
                w.to_owned()
            } else if let Some(r) = obj.pointer("/status/reason").and_then(Value::as_str) {
                r.to_owned()
            } else {
                s("/status/phase")
            };
            vec![
                json!(format!("{ready}/{containers}")),
                json!(status),
                json!(restarts.to_string()),
                age,
                json!(or_none(s("/status/podIP"))),
                json!(or_none(s("/spec/nodeName"))),
            ]
        }
        ("", "nodes") => {
            let ready = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                // As kubectl prints it: a Ready condition that is not True is NotReady.
                .map(|c| match c["status"].as_str() {
                    Some("True") => "Ready",
                    _ => "NotReady",
                })
                .unwrap_or("Unknown");
            let mut status = ready.to_owned();
            if obj.pointer("/spec/unschedulable") == Some(&json!(true)) {
                status.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<String> = meta
                .get("labels")
                .and_then(Value::as_object)
                .map(|l| {
                    l.keys()
                        .filter_map(|k| {
                            k.strip_prefix("node-role.kubernetes.io/")
                                .or_else(|| k.strip_prefix("node-role.sedna.io/"))
                                .map(str::to_owned)
                        })
                        .collect()
                })
                .unwrap_or_default();
            roles.sort();
            roles.dedup();
            let internal = obj
                .pointer("/status/addresses")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
                .and_then(|x| x["address"].as_str())
                .unwrap_or("<none>")
                .to_owned();
            vec![
                json!(status),
                json!(if roles.is_empty() {
                    "<none>".to_owned()
                } else {
                    roles.join(",")
                }),
                age,
                json!(s("/status/nodeInfo/kubeletVersion")),
                json!(internal),
                json!(or_none(s("/status/nodeInfo/osImage"))),
            ]
        }
        ("", "namespaces") => vec![json!(s("/status/phase")), age],
        ("", "configmaps") => {
            let count = ["data", "binaryData"]
                .iter()
                .filter_map(|f| obj.get(*f).and_then(Value::as_object))
                .map(|m| m.len())
                .sum::<usize>();
            vec![json!(count), age]
        }
        ("", "secrets") => {
            let count = obj
                .get("data")
                .and_then(Value::as_object)
                .map_or(0, |m| m.len());
            vec![json!(s("/type")), json!(count), age]
        }
        ("", "services") => {
            let ports: Vec<String> = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            let proto = p["protocol"].as_str().unwrap_or("TCP");
                            match p["nodePort"].as_i64() {
                                Some(np) => format!("{}:{np}/{proto}", p["port"]),
                                None => format!("{}/{proto}", p["port"]),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let external = obj
                .pointer("/spec/externalIPs")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "<none>".into());
            vec![
                json!(s("/spec/type")),
                json!(or_none(s("/spec/clusterIP"))),
                json!(external),
                json!(if ports.is_empty() {
                    "<none>".to_owned()
                } else {
                    ports.join(",")
                }),
                age,
            ]
        }
        ("", "events") | ("events.k8s.io", "events") => {
            let last = ["/lastTimestamp", "/eventTime", "/deprecatedLastTimestamp"]
                .iter()
                .find_map(|p| obj.pointer(p).and_then(Value::as_str))
                .map(since)
                .unwrap_or_else(|| "<unknown>".into());
            let involved = obj
                .get("involvedObject")
                .or_else(|| obj.get("regarding"))
                .cloned()
                .unwrap_or(Value::Null);
            let object = format!(
                "{}/{}",
                involved["kind"].as_str().unwrap_or_default().to_lowercase(),
                involved["name"].as_str().unwrap_or_default()
            );
            let message = obj
                .get("message")
                .or_else(|| obj.get("note"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            vec![
                json!(last),
                json!(s("/type")),
                json!(s("/reason")),
                json!(object),
                json!(message),
            ]
        }
        ("coordination.k8s.io", "leases") => {
            vec![json!(or_none(s("/spec/holderIdentity"))), age]
        }
        _ => vec![age],
    }
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

/// The time since an RFC 3339 timestamp, as kubectl shows ages (`45s`, `3m20s`, `5h`, `2d3h`).
fn since(timestamp: &str) -> String {
    let Ok(then) = timestamp.parse::<k8s_openapi::jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    human_duration(k8s_openapi::jiff::Timestamp::now().as_second() - then.as_second())
}

/// Kubernetes' short human form of a duration in seconds.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (minutes, hours, days) = (s / 60, s / 3600, s / 86400);
    let with = |big: i64, unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big}{unit}")
        } else {
            format!("{big}{unit}{small}{small_unit}")
        }
    };
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if minutes < 10 => with(minutes, "m", s % 60, "s"),
        _ if minutes < 180 => format!("{minutes}m"),
        _ if hours < 8 => with(hours, "h", minutes % 60, "m"),
        _ if hours < 48 => format!("{hours}h"),
        _ if hours < 24 * 8 => with(days, "d", hours % 24, "h"),
        _ if hours < 24 * 365 * 2 => format!("{days}d"),
        _ if hours < 24 * 365 * 8 => with(days / 365, "y", days % 365, "d"),
        _ => format!("{}y", days / 365),
    }
}

/// A `date` column's cell: the age of the timestamp.
fn age_cell(v: &Value) -> Value {
    match v.as_str() {
        Some(t) => json!(since(t)),
        None => Value::Null,
    }
}

/// `PartialObjectMetadata` of an object.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta::metadata(obj),
    })
}

/// A Table of `objects` at `resource_version`; `with_headers` adds the column definitions
/// (a watch sends them with its first event only).
pub fn table(
    t: &ResourceType,
    objects: &[&Value],
    resource_version: &str,
    continue_token: Option<&str>,
    with_headers: bool,
    include_object: &str,
) -> Value {
    let cols = columns(t);
    // Events list their name last, shown only with `-o wide`, as Kubernetes does.
    let name_last = t.resource == "events";
    let name_column = json!({
        "name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.",
        "priority": if name_last { 1 } else { 0 }
    });
    let mut definitions = if name_last {
        vec![]
    } else {
        vec![name_column.clone()]
    };
    definitions.extend(cols.iter().map(|c| {
        json!({ "name": c.name, "type": c.type_, "format": "", "description": c.description,
                "priority": c.priority })
    }));
    if name_last {
        definitions.push(name_column);
    }
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let name = json!(meta::meta_str(obj, "name").unwrap_or_default());
            let mut cells = if name_last {
                vec![]
            } else {
                vec![name.clone()]
            };
            if t.custom {
                cells.extend(cols.iter().map(|c| custom_cell(c, obj)));
            } else {
                cells.extend(builtin_cells(t, obj));
            }
            if name_last {
                cells.push(name);
            }
            let object = match include_object {
                "None" => Value::Null,
                "Object" => (*obj).clone(),
                _ => partial_metadata(obj),
            };
            json!({ "cells": cells, "object": object })
        })
        .collect();
    let mut metadata = json!({ "resourceVersion": resource_version });
    if let Some(c) = continue_token {
        metadata["continue"] = json!(c);
    }
    let mut table = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "rows": rows,
    });
    if with_headers {
        table["columnDefinitions"] = Value::Array(definitions);
    } else {
        table["columnDefinitions"] = json!([]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{builtins, types_of_crd};
    use kube::CustomResourceExt;

    #[test]
    fn json_paths_follow_fields_and_indices() {
        let obj = json!({ "a": { "b": [{ "c": 1 }, { "c": 2 }] } });
        assert_eq!(json_path(&obj, ".a.b[1].c"), json!(2));
        assert_eq!(json_path(&obj, ".a.b[*].c"), json!([1, 2]));
        assert_eq!(json_path(&obj, ".a.b[-1].c"), json!(2));
        assert_eq!(json_path(&obj, ".a.x"), Value::Null);
    }

    #[test]
    fn custom_resources_show_their_printer_columns() {
        let t = types_of_crd(&sedna_api::federated_learning::FederatedLearningJob::crd())
            .unwrap()
            .remove(0);
        let obj = json!({ "metadata": { "name": "fl1", "creationTimestamp": "2026-01-01T00:00:00Z" },
                          "spec": { "rounds": 20, "aggregation": { "algorithm": "FedAvg" } },
                          "status": { "phase": "Running", "round": 3, "active": 3 } });
        let table = table(&t, &[&obj], "42", None, true, "");
        let headers: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            headers,
            [
                "Name",
                "Phase",
                "Round",
                "Rounds",
                "Algorithm",
                "Active",
                "Age"
            ]
        );
        let cells = table["rows"][0]["cells"].as_array().unwrap();
        assert_eq!(
            cells[..6],
            [
                json!("fl1"),
                json!("Running"),
                json!(3),
                json!(20),
                json!("FedAvg"),
                json!(3)
            ]
        );
        assert!(cells[6].as_str().unwrap().ends_with('d'), "{}", cells[6]);
        assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(table["metadata"]["resourceVersion"], "42");
    }

    #[test]
    fn ages_read_like_kubectl() {
        let cases = [
            (5, "5s"),
            (119, "119s"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 120, "3h2m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 7200, "3d2h"),
            (30 * 86400, "30d"),
            (3 * 365 * 86400, "3y"),
            (-5, "<invalid>"),
        ];
        for (seconds, want) in cases {
            assert_eq!(human_duration(seconds), want, "{seconds}");
        }
    }

    #[test]
    fn nodes_show_readiness_and_roles() {
        let t = builtins()
            .into_iter()
            .find(|t| t.resource == "nodes")
            .unwrap();
        let node = json!({ "metadata": { "name": "edge-1",
                                         "labels": { "node-role.sedna.io/edge": "" } },
                           "status": { "conditions": [{ "type": "Ready", "status": "True" }],
                                       "nodeInfo": { "kubeletVersion": "v0.1.0" } } });
        let table = table(&t, &[&node], "1", None, false, "");
        assert_eq!(table["rows"][0]["cells"][1], "Ready");
        assert_eq!(table["rows"][0]["cells"][2], "edge");
        assert_eq!(table["columnDefinitions"], json!([]));
    }
}
