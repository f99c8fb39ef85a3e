//! Patches: JSON merge patch (RFC 7386), JSON patch (RFC 6902, with Kubernetes' reading of a
//! `test` against `null`), and strategic merge patch for built-in kinds.
//!
//! A patch is hostile input: a few kilobytes of JSON patch `copy` operations that copy a value
//! into itself double the document per operation. Every patch result is held to
//! [`Limits`] — operations counted before any is applied, a `copy`'s growth measured before it
//! is made, and the result's depth and size checked — so a patch bomb is refused with a reason
//! instead of exhausting the stack or the memory.

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

/// The most operations a JSON patch may carry (as in Kubernetes).
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

/// The deepest nesting of objects and arrays a patched object may reach. Request bodies are
/// read with a limit of 128 levels, so a stored object deeper than that could not be read back.
pub const MAX_DEPTH: usize = 100;

/// What a patch result is held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The result's largest size, as JSON (the server uses its request body limit).
    pub max_bytes: usize,
}

/// Why a patch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch is malformed or does not apply (a failed `test`, a missing path…).
    #[error("{0}")]
    Invalid(String),
    /// A JSON patch with more than [`MAX_JSON_PATCH_OPERATIONS`] operations.
    #[error(
        "the allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPERATIONS}, got {0}"
    )]
    TooManyOperations(usize),
    /// The result would be larger than [`Limits::max_bytes`].
    #[error("the patched object would be larger than the limit of {0} bytes")]
    TooLarge(usize),
    /// The result would nest deeper than [`MAX_DEPTH`].
    #[error("the patched object would nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Checks a patch result against the limits (depth first, without recursion; then its size,
/// counted while serializing and abandoned at the limit).
pub fn check_result(value: &Value, limits: &Limits) -> Result<(), PatchError> {
    if depth_exceeds(value, MAX_DEPTH) {
        return Err(PatchError::TooDeep);
    }
    if size_exceeds(value, limits.max_bytes) {
        return Err(PatchError::TooLarge(limits.max_bytes));
    }
    Ok(())
}

/// Whether `value` nests more than `max` levels (a scalar is 0, `{}` or `[]` is 1).
fn depth_exceeds(value: &Value, max: usize) -> bool {
    let mut stack = vec![(value, 0usize)];
    while let Some((v, above)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Object(m) => Box::new(m.values()),
            Value::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        if above + 1 > max {
            return true;
        }
        stack.extend(children.map(|c| (c, above + 1)));
    }
    false
}

/// A writer that counts bytes and fails once more than `limit` were written.
struct Counter {
    written: usize,
    limit: usize,
}

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written += buf.len();
        if self.written > self.limit {
            return Err(std::io::Error::other("limit"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The size of `value` as compact JSON, if at most `limit` (call only on values whose depth
/// is bounded: serialization recurses).
fn size_within(value: &Value, limit: usize) -> Option<usize> {
    let mut counter = Counter { written: 0, limit };
    serde_json::to_writer(&mut counter, value).ok()?;
    Some(counter.written)
}

fn size_exceeds(value: &Value, limit: usize) -> bool {
    size_within(value, limit).is_none()
}

/// Containers a JSON pointer passes through.
fn pointer_depth(pointer: &str) -> usize {
    pointer.matches('/').count()
}

/// Applies a JSON merge patch.
pub fn merge(target: &Value, patch: &Value) -> Value {
    let mut out = target.clone();
    json_patch::merge(&mut out, patch);
    out
}

/// Applies a JSON patch. A `test` of a missing path against `null` passes, as Kubernetes
/// (and kube-rs' finalizer helper) expect. The operations are counted before any is applied;
/// each `add`, `replace`, `copy` and `move` is checked against [`MAX_DEPTH`] before it is made,
/// and each `copy`'s growth against `limits.max_bytes`; the result is checked with
/// [`check_result`].
pub fn json(target: &Value, patch: &Value, limits: &Limits) -> Result<Value, PatchError> {
    use json_patch::PatchOperation as Op;
    let count = patch.as_array().map_or(0, Vec::len);
    if count > MAX_JSON_PATCH_OPERATIONS {
        return Err(PatchError::TooManyOperations(count));
    }
    let ops: Vec<Op> = serde_json::from_value(patch.clone())
        .map_err(|e| PatchError::Invalid(format!("invalid JSON patch: {e}")))?;
    let mut doc = target.clone();
    // What the document may still grow by through copies (adds and replaces are bounded by
    // the patch itself, which is within the request limit).
    let mut budget = limits
        .max_bytes
        .saturating_sub(size_within(&doc, limits.max_bytes).unwrap_or(limits.max_bytes));
    for op in ops {
        let missing = |from: &str| PatchError::Invalid(format!("path {from:?} does not exist"));
        let (path, value) = match &op {
            Op::Test(test) if test.value.is_null() && doc.pointer(test.path.as_str()).is_none() => {
                continue;
            }
            Op::Add(add) => (add.path.as_str(), Some(&add.value)),
            Op::Replace(replace) => (replace.path.as_str(), Some(&replace.value)),
            Op::Copy(copy) => {
                let source = doc
                    .pointer(copy.from.as_str())
                    .ok_or_else(|| missing(copy.from.as_str()))?;
                let size =
                    size_within(source, budget).ok_or(PatchError::TooLarge(limits.max_bytes))?;
                budget -= size;
                (copy.path.as_str(), Some(source))
            }
            Op::Move(mv) => (
                mv.path.as_str(),
                Some(
                    doc.pointer(mv.from.as_str())
                        .ok_or_else(|| missing(mv.from.as_str()))?,
                ),
            ),
            Op::Remove(_) | Op::Test(_) => ("", None),
        };
        if let Some(value) = value
            && depth_exceeds(value, MAX_DEPTH.saturating_sub(pointer_depth(path)))
        {
            return Err(PatchError::TooDeep);
        }
        json_patch::patch(&mut doc, &[op]).map_err(|e| PatchError::Invalid(e.to_string()))?;
    }
    check_result(&doc, limits)?;
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

    const LIMITS: Limits = Limits {
        max_bytes: 3 * 1024 * 1024,
    };

    #[test]
    fn copies_of_a_value_into_itself_are_refused_before_the_stack_or_memory_runs_out() {
        let doc = json!({ "metadata": { "name": "x" }, "spec": { "a": { "b": [1, 2, 3, 4] } } });
        // Depth: each copy nests the value one level deeper inside itself (17 KB of ops).
        let deeper: Vec<Value> = (0..400)
            .map(|_| json!({ "op": "copy", "from": "/spec/a", "path": "/spec/a/a" }))
            .collect();
        assert_eq!(
            json(&doc, &Value::Array(deeper), &LIMITS),
            Err(PatchError::TooDeep)
        );
        // Memory: each copy appends the list to itself, doubling it (40 ops, 2 KB).
        let doubling: Vec<Value> = (0..40)
            .map(|_| json!({ "op": "copy", "from": "/spec/a/b", "path": "/spec/a/b/-" }))
            .collect();
        assert_eq!(
            json(&doc, &Value::Array(doubling.clone()), &LIMITS),
            Err(PatchError::TooLarge(LIMITS.max_bytes))
        );
        // A few of the same copies are an ordinary patch.
        let out = json(&doc, &Value::Array(doubling[..3].to_vec()), &LIMITS).unwrap();
        assert_eq!(out.pointer("/spec/a/b/4"), Some(&json!([1, 2, 3, 4])));
        assert_eq!(out.pointer("/spec/a/b/6/5/4"), Some(&json!([1, 2, 3, 4])));
        // Depth reached by moving a deep value deeper, or by adding one at a deep path.
        let deep_value = (0..98).fold(json!(1), |v, _| json!([v]));
        let add = json!([{ "op": "add", "path": "/spec/a/c", "value": deep_value }]);
        assert_eq!(json(&doc, &add, &LIMITS), Err(PatchError::TooDeep));
    }

    #[test]
    fn a_json_patch_of_more_than_ten_thousand_operations_is_refused_unapplied() {
        let doc = json!({ "metadata": { "name": "x" } });
        let ops = |n: usize| {
            Value::Array(
                (0..n)
                    .map(|i| json!({ "op": "add", "path": format!("/k{}", i % 10), "value": i }))
                    .collect(),
            )
        };
        assert_eq!(
            json(&doc, &ops(10_001), &LIMITS),
            Err(PatchError::TooManyOperations(10_001))
        );
        assert!(json(&doc, &ops(10_000), &LIMITS).is_ok());
    }

    #[test]
    fn results_of_any_patch_are_checked_for_depth_and_size() {
        let deep = (0..120).fold(json!(1), |v, _| json!({ "a": v }));
        assert_eq!(check_result(&deep, &LIMITS), Err(PatchError::TooDeep));
        let shallow = (0..99).fold(json!(1), |v, _| json!({ "a": v }));
        assert_eq!(check_result(&shallow, &LIMITS), Ok(()));
        let big = json!({ "data": "x".repeat(100) });
        let small = Limits { max_bytes: 64 };
        assert_eq!(check_result(&big, &small), Err(PatchError::TooLarge(64)));
        assert_eq!(check_result(&json!({ "data": "x" }), &small), Ok(()));
    }

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
        let out = json(&doc, &patch, &LIMITS).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["f"]));
        let failing = json!([{ "op": "test", "path": "/metadata/name", "value": "y" }]);
        assert!(json(&doc, &failing, &LIMITS).is_err());
        assert!(json(&doc, &json!({ "op": "add" }), &LIMITS).is_err());
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
