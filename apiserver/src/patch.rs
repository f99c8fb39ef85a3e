//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902, with Kubernetes' reading of a
//! `test` against `null`), and strategic merge patch for built-in kinds.

use serde_json::{Map, Value};

use crate::builtin::{ListType, list_type};
use crate::registry::ResourceType;

/// The kinds of patch, by request `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json` (built-in kinds only).
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply,
}

impl PatchType {
    /// The patch type of a `Content-Type`, if it is one.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type.split(';').next().unwrap_or_default().trim() {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

/// Applies a JSON merge patch.
pub fn merge(target: &Value, patch: &Value) -> Value {
    let mut out = target.clone();
    json_patch::merge(&mut out, patch);
    out
}

/// Applies a JSON patch. A `test` of a missing path against `null` passes, as Kubernetes
/// (and kube-rs' finalizer helper) expect.
pub fn json(target: &Value, patch: &Value) -> Result<Value, String> {
    let ops: Vec<json_patch::PatchOperation> =
        serde_json::from_value(patch.clone()).map_err(|e| format!("invalid JSON patch: {e}"))?;
    let mut doc = target.clone();
    for op in ops {
        if let json_patch::PatchOperation::Test(test) = &op
            && test.value.is_null()
            && doc.pointer(test.path.as_str()).is_none()
        {
            continue;
        }
        json_patch::patch(&mut doc, &[op]).map_err(|e| e.to_string())?;
    }
    Ok(doc)
}

/// Applies a strategic merge patch to a built-in object.
pub fn strategic(t: &ResourceType, target: &Value, patch: &Value) -> Result<Value, String> {
    let mut path = Vec::new();
    match merge_value(t, Some(target), patch, &mut path)? {
        Some(v) => Ok(v),
        None => Err("the patch deletes the whole object".into()),
    }
}

fn is_directive(key: &str) -> bool {
    key.starts_with('$')
}

/// Merges `patch` into `original`; `None` means "delete this value".
fn merge_value(
    t: &ResourceType,
    original: Option<&Value>,
    patch: &Value,
    path: &mut Vec<String>,
) -> Result<Option<Value>, String> {
    let Value::Object(p) = patch else {
        return Ok(Some(patch.clone()));
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let mut copy = p.clone();
            copy.retain(|k, _| !is_directive(k));
            return Ok(Some(Value::Object(copy)));
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown patch directive $patch: {other}")),
    }
    let mut out: Map<String, Value> = match original {
        Some(Value::Object(o)) => o.clone(),
        _ => Map::new(),
    };
    for (key, value) in p {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<&Value> = value
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            if let Some(Value::Array(list)) = out.get_mut(field) {
                list.retain(|v| !remove.contains(&v));
            }
            continue;
        }
        if is_directive(key) {
            continue;
        }
        if value.is_null() {
            out.remove(key);
            continue;
        }
        path.push(key.clone());
        let merged = match value {
            Value::Array(items) => {
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                let rule = list_type(t, &refs);
                Some(merge_list(t, out.get(key), items, &rule, path)?)
            }
            Value::Object(_) => merge_value(t, out.get(key), value, path)?,
            scalar => Some(scalar.clone()),
        };
        path.pop();
        match merged {
            Some(v) => {
                out.insert(key.clone(), v);
            }
            None => {
                out.remove(key);
            }
        }
    }
    if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(Some(Value::Object(out)))
}

fn merge_list(
    t: &ResourceType,
    original: Option<&Value>,
    patch: &[Value],
    rule: &ListType,
    path: &mut Vec<String>,
) -> Result<Value, String> {
    let replace = patch
        .iter()
        .any(|v| v.get("$patch").and_then(Value::as_str) == Some("replace"));
    let items: Vec<&Value> = patch
        .iter()
        .filter(|v| v.get("$patch").and_then(Value::as_str) != Some("replace"))
        .collect();
    let original: Vec<Value> = match original {
        Some(Value::Array(a)) if !replace => a.clone(),
        _ => Vec::new(),
    };
    match rule {
        ListType::Atomic => Ok(Value::Array(items.into_iter().cloned().collect())),
        ListType::Set => {
            let mut out = original;
            for v in items {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(Value::Array(out))
        }
        ListType::Map(keys) => {
            let mut out = original;
            for item in items {
                let same = |o: &Value| keys.iter().all(|k| o.get(k) == item.get(k));
                let pos = out.iter().position(same);
                if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                    out.retain(|o| !same(o));
                    continue;
                }
                match pos {
                    Some(i) => {
                        if let Some(v) = merge_value(t, Some(&out[i]), item, path)? {
                            out[i] = v;
                        }
                    }
                    None => {
                        if let Some(v) = merge_value(t, None, item, path)? {
                            out.push(v);
                        }
                    }
                }
            }
            Ok(Value::Array(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::builtins;
    use serde_json::json;

    fn pods() -> ResourceType {
        builtins()
            .into_iter()
            .find(|t| t.resource == "pods")
            .unwrap()
    }

    #[test]
    fn merge_patch_nulls_delete_keys() {
        let out = merge(
            &json!({ "a": 1, "b": { "c": 2, "d": 3 } }),
            &json!({ "b": { "c": null } }),
        );
        assert_eq!(out, json!({ "a": 1, "b": { "d": 3 } }));
    }

    #[test]
    fn json_patch_test_of_a_missing_path_against_null_passes() {
        let doc = json!({ "metadata": { "name": "x" } });
        let patch = json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": ["f"] }
        ]);
        let out = json(&doc, &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["f"]));
        let failing = json!([{ "op": "test", "path": "/metadata/name", "value": "y" }]);
        assert!(json(&doc, &failing).is_err());
        assert!(json(&doc, &json!({ "op": "add" })).is_err());
    }

    #[test]
    fn strategic_patch_merges_containers_by_name_and_env_by_name() {
        let pod = json!({ "spec": { "containers": [
            { "name": "a", "image": "x", "env": [{ "name": "E", "value": "1" }] },
            { "name": "b", "image": "y" } ] } });
        let patch = json!({ "spec": {
            "$setElementOrder/containers": [{ "name": "a" }, { "name": "b" }],
            "containers": [{ "name": "a", "env": [{ "name": "F", "value": "2" }] }] } });
        let out = strategic(&pods(), &pod, &patch).unwrap();
        assert_eq!(out["spec"]["containers"][0]["image"], "x");
        assert_eq!(
            out["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(out["spec"]["containers"][1]["name"], "b");
        assert!(out["spec"].get("$setElementOrder/containers").is_none());
    }

    #[test]
    fn strategic_patch_directives_delete_and_replace() {
        let pod = json!({ "metadata": { "finalizers": ["a", "b"], "labels": { "x": "1" } },
                          "spec": { "containers": [{ "name": "a" }, { "name": "b" }],
                                    "args": ["1", "2"] } });
        let patch = json!({
            "metadata": { "$deleteFromPrimitiveList/finalizers": ["a"], "labels": { "x": null } },
            "spec": { "containers": [{ "name": "b", "$patch": "delete" }], "args": ["3"] } });
        let out = strategic(&pods(), &pod, &patch).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(out["metadata"]["labels"], json!({}));
        assert_eq!(out["spec"]["containers"], json!([{ "name": "a" }]));
        assert_eq!(
            out["spec"]["args"],
            json!(["3"]),
            "atomic lists are replaced"
        );

        let replace = json!({ "spec": { "$patch": "replace", "containers": [{ "name": "z" }] } });
        let out = strategic(&pods(), &pod, &replace).unwrap();
        assert_eq!(out["spec"], json!({ "containers": [{ "name": "z" }] }));
    }

    #[test]
    fn content_types_name_patch_kinds() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
    }
}
