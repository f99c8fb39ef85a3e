//! Subresources with handlers of their own: `pods/binding` (the scheduler's placement),
//! `pods/eviction` (a pod removed on request, as `kubectl drain` asks), and `scale` (the
//! replicas of Deployments, ReplicaSets and custom resources that declare it, as
//! autoscaling/v1 `Scale`, which `kubectl scale` and autoscalers read and write).

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::handlers::{self, Call, Reply};
use crate::meta;
use crate::patch::{self, PatchType};
use crate::registry::ResourceType;
use crate::request::ResourcePath;
use crate::server::Api;
use crate::store::{Mutation, Precondition, StoreError};

fn success(code: u16) -> Reply {
    Reply {
        code,
        body: json!({ "kind": "Status", "apiVersion": "v1", "metadata": {},
                      "status": "Success", "code": code }),
        raw: None,
        warnings: vec![],
    }
}

fn name_matches(call: &Call, body: &Value) -> Result<(), ApiError> {
    match meta::meta_str(body, "name") {
        Some(n) if !n.is_empty() && n != call.path.name.as_deref().unwrap_or_default() => {
            Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({})",
                call.path.name.as_deref().unwrap_or_default()
            )))
        }
        _ => Ok(()),
    }
}

/// `POST pods/NAME/binding`: puts a pending pod on a node (once: a bound pod stays bound) and
/// marks it scheduled.
pub async fn bind(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    let body = handlers::decode_body(&call.content_type, &call.body)?;
    name_matches(call, &body)?;
    let node = body
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_field(
                "Binding",
                "",
                call.path.name.as_deref().unwrap_or_default(),
                "target.name",
                "Required value",
            )
        })?
        .to_owned();
    let key = call.t.key(
        call.path.namespace.as_deref(),
        call.path.name.as_deref().unwrap_or_default(),
    );
    let name = call.path.name.clone().unwrap_or_default();
    for _ in 0..5 {
        let current = api
            .store
            .get(&key)
            .ok_or_else(|| ApiError::not_found("", "pods", &name))?;
        let mut pod = current.value.as_ref().clone();
        if let Some(bound) = pod.pointer("/spec/nodeName").and_then(Value::as_str)
            && !bound.is_empty()
        {
            return Err(ApiError::conflict_with(
                "",
                "pods",
                &name,
                &format!("pod {name} is already assigned to node {bound:?}"),
                vec![],
            ));
        }
        if meta::is_deleting(&pod) {
            return Err(ApiError::conflict_with(
                "",
                "pods",
                &name,
                &format!("pod {name} is being deleted, cannot be assigned to a host"),
                vec![],
            ));
        }
        pod["spec"]["nodeName"] = json!(node);
        set_condition(
            &mut pod,
            json!({ "type": "PodScheduled", "status": "True", "lastProbeTime": null,
                    "lastTransitionTime": meta::now() }),
        );
        match api
            .store
            .write(
                key.clone(),
                Precondition::Revision(current.rev),
                Mutation::Put(pod),
            )
            .await
        {
            Ok(_) => return Ok(success(201)),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(ApiError::from_store(e, "", "pods", &name)),
        }
    }
    Err(ApiError::conflict("", "pods", &name))
}

/// Sets (or replaces) a condition of the same type in `status.conditions`.
pub fn set_condition(obj: &mut Value, condition: Value) {
    if !obj["status"].is_object() {
        obj["status"] = json!({});
    }
    let conditions = &mut obj["status"]["conditions"];
    if !conditions.is_array() {
        *conditions = json!([]);
    }
    if let Some(list) = conditions.as_array_mut() {
        list.retain(|c| c["type"] != condition["type"]);
        list.push(condition);
    }
}

/// `POST pods/NAME/eviction`: deletes the pod gracefully (no PodDisruptionBudgets are
/// served, so every eviction is allowed), honouring the Eviction's delete options.
pub async fn evict(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    let body = handlers::decode_body(&call.content_type, &call.body)?;
    name_matches(call, &body)?;
    let name = call.path.name.clone().unwrap_or_default();
    let key = call.t.key(call.path.namespace.as_deref(), &name);
    let grace = body
        .pointer("/deleteOptions/gracePeriodSeconds")
        .and_then(Value::as_i64);
    for _ in 0..5 {
        let current = api
            .store
            .get(&key)
            .ok_or_else(|| ApiError::not_found("", "pods", &name))?;
        if let Some(uid) = body
            .pointer("/deleteOptions/preconditions/uid")
            .and_then(Value::as_str)
            && Some(uid) != meta::meta_str(&current.value, "uid")
        {
            return Err(ApiError::conflict_with(
                "",
                "pods",
                &name,
                "Precondition failed: UID in precondition does not match",
                vec![],
            ));
        }
        match handlers::delete_object(
            api,
            &call.t,
            &key,
            &current,
            "Background",
            grace,
            call.query.dry_run(),
        )
        .await
        {
            Ok(_) => return Ok(success(201)),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(ApiError::from_store(e, "", "pods", &name)),
        }
    }
    Err(ApiError::conflict("", "pods", &name))
}

fn pointer(path: &str) -> String {
    path.trim_start_matches('.')
        .replace('.', "/")
        .replace("//", "/")
        .to_string()
}

fn at<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    obj.pointer(&format!("/{}", pointer(path)))
}

/// A LabelSelector as the string form (`a=b,c in (d)`).
fn selector_string(selector: &Value) -> String {
    let mut parts: Vec<String> = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    for e in selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        parts.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_owned(),
            _ => format!("!{key}"),
        });
    }
    parts.join(",")
}

/// The autoscaling/v1 Scale of an object.
pub fn scale_of(t: &ResourceType, obj: &Value) -> Value {
    let Some(paths) = &t.scale else {
        return Value::Null;
    };
    let spec = at(obj, &paths.spec_replicas)
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let status = at(obj, &paths.status_replicas)
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let selector = match &paths.label_selector {
        Some(path) => at(obj, path)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        None => selector_string(&obj["spec"]["selector"]),
    };
    let m = &obj["metadata"];
    let mut status_json = json!({ "replicas": status });
    if !selector.is_empty() {
        status_json["selector"] = json!(selector);
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": { "name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                      "resourceVersion": m["resourceVersion"],
                      "creationTimestamp": m["creationTimestamp"] },
        "spec": { "replicas": spec },
        "status": status_json,
    })
}

fn scale_reply(body: Value) -> Reply {
    Reply {
        code: 200,
        body,
        raw: None,
        warnings: vec![],
    }
}

/// `GET …/scale`.
pub fn get_scale(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    let name = call.path.name.clone().unwrap_or_default();
    let stored = api
        .store
        .get(&call.t.key(call.path.namespace.as_deref(), &name))
        .ok_or_else(|| ApiError::not_found(&call.t.group, &call.t.resource, &name))?;
    Ok(scale_reply(scale_of(&call.t, &stored.value)))
}

/// `PUT` or `PATCH …/scale`: the new Scale's `spec.replicas` becomes the object's.
pub async fn write_scale(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    let paths = call.t.scale.clone().ok_or_else(|| {
        ApiError::not_found(&call.t.group, &format!("{}/scale", call.t.resource), "")
    })?;
    let name = call.path.name.clone().unwrap_or_default();
    let key = call.t.key(call.path.namespace.as_deref(), &name);
    let body = handlers::decode_body(&call.content_type, &call.body)?;
    for _ in 0..5 {
        let current = api
            .store
            .get(&key)
            .ok_or_else(|| ApiError::not_found(&call.t.group, &call.t.resource, &name))?;
        let scale = scale_of(&call.t, &current.value);
        let wanted = if call.method == http::Method::PUT {
            name_matches(call, &body)?;
            body.clone()
        } else {
            match PatchType::from_content_type(&call.content_type) {
                Some(PatchType::Json) => {
                    patch::json(&scale, &body, &patch::Limits { max_bytes: 1 << 20 })
                        .map_err(|e| ApiError::bad_request(e.to_string()))?
                }
                // A Scale has no lists: a strategic merge patch is a merge patch.
                Some(PatchType::Merge | PatchType::Strategic) => patch::merge(&scale, &body),
                _ => {
                    return Err(ApiError::unsupported_media_type(
                        "patch the scale with application/merge-patch+json, \
                         application/strategic-merge-patch+json or application/json-patch+json",
                    ));
                }
            }
        };
        if let Some(rv) = meta::meta_str(&wanted, "resourceVersion")
            && rv != current.rev.to_string()
        {
            return Err(ApiError::conflict(&call.t.group, &call.t.resource, &name));
        }
        let replicas = wanted
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .filter(|n| (0..=i64::from(i32::MAX)).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_field(
                    "Scale",
                    "autoscaling",
                    &name,
                    "spec.replicas",
                    "Invalid value: must be an integer from 0 to 2147483647",
                )
            })?;
        let mut obj = current.value.as_ref().clone();
        let spec_pointer = format!("/{}", pointer(&paths.spec_replicas));
        if obj.pointer(&spec_pointer) == Some(&json!(replicas)) {
            return Ok(scale_reply(scale_of(&call.t, &obj)));
        }
        set_at(&mut obj, &spec_pointer, json!(replicas));
        // A spec change: the generation moves on, as on any spec update.
        let generation = obj
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        obj["metadata"]["generation"] = json!(generation + 1);
        if call.query.dry_run() {
            return Ok(scale_reply(scale_of(&call.t, &obj)));
        }
        match api
            .store
            .write(
                key.clone(),
                Precondition::Revision(current.rev),
                Mutation::Put(obj),
            )
            .await
        {
            Ok(stored) => return Ok(scale_reply(scale_of(&call.t, &stored.value))),
            Err(StoreError::Conflict) => continue,
            Err(e) => {
                return Err(ApiError::from_store(
                    e,
                    &call.t.group,
                    &call.t.resource,
                    &name,
                ));
            }
        }
    }
    Err(ApiError::conflict(&call.t.group, &call.t.resource, &name))
}

fn set_at(obj: &mut Value, pointer: &str, value: Value) {
    let mut cur = obj;
    let parts: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur[*part] = value;
            return;
        }
        if !cur[*part].is_object() {
            cur[*part] = json!({});
        }
        cur = &mut cur[*part];
    }
}

/// Whether a call names a subresource served here; `None` when it is not one of them.
pub fn which(path: &ResourcePath, t: &ResourceType) -> Option<&'static str> {
    match (
        t.group.as_str(),
        t.resource.as_str(),
        path.subresource.as_deref()?,
    ) {
        ("", "pods", "binding") => Some("binding"),
        ("", "pods", "eviction") => Some("eviction"),
        ("", "serviceaccounts", "token") => Some("token"),
        (_, _, "scale") if t.scale.is_some() => Some("scale"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::builtins;

    #[test]
    fn a_deployments_scale_carries_its_replicas_and_selector() {
        let t = builtins()
            .into_iter()
            .find(|t| t.resource == "deployments")
            .unwrap();
        let d = json!({
            "metadata": { "name": "web", "namespace": "default", "uid": "u", "resourceVersion": "7" },
            "spec": { "replicas": 3, "selector": { "matchLabels": { "app": "web" },
                "matchExpressions": [{ "key": "tier", "operator": "In", "values": ["a", "b"] }] } },
            "status": { "replicas": 2 }
        });
        let s = scale_of(&t, &d);
        assert_eq!(s["spec"]["replicas"], 3);
        assert_eq!(s["status"]["replicas"], 2);
        assert_eq!(s["status"]["selector"], "app=web,tier in (a,b)");
        assert_eq!(s["metadata"]["resourceVersion"], "7");
        let mut obj = json!({});
        set_at(&mut obj, "/spec/replicas", json!(5));
        assert_eq!(obj, json!({ "spec": { "replicas": 5 } }));
    }
}
