//! Object metadata: names, uids, timestamps, generation, and what create and update may change.

use rand::RngExt;
use serde_json::{Map, Value, json};

use crate::error::{ApiError, Cause};
use crate::registry::ResourceType;

/// The current time as Kubernetes writes it (`2026-11-26T16:00:00Z`).
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A fresh object uid.
pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `prefix` plus five random characters, as `generateName` asks.
pub fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    // Cut the prefix at a character boundary (the name is then validated as any other).
    let mut keep = prefix.len().min(253 - 5);
    while !prefix.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &prefix[..keep])
}

/// `metadata` of an object (empty when absent).
pub fn metadata(obj: &Value) -> &Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    obj.get("metadata")
        .and_then(Value::as_object)
        .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
}

/// `metadata` of an object, created when absent (a non-object value becomes an object).
pub fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let Value::Object(root) = obj else {
        unreachable!("the value was just made an object")
    };
    let meta = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    let Value::Object(meta) = meta else {
        unreachable!("metadata was just made an object")
    };
    meta
}

/// A string field of `metadata`.
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    metadata(obj).get(field).and_then(Value::as_str)
}

/// The strings of a JSON list (other items skipped; not a list: none).
pub fn strings(list: Option<&Value>) -> Vec<String> {
    list.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `metadata.finalizers`.
pub fn finalizers(obj: &Value) -> Vec<String> {
    strings(metadata(obj).get("finalizers"))
}

/// Whether the object is being deleted (has a `deletionTimestamp`).
pub fn is_deleting(obj: &Value) -> bool {
    metadata(obj)
        .get("deletionTimestamp")
        .is_some_and(|v| !v.is_null())
}

/// Sets `metadata.finalizers` (removing the field when empty).
pub fn set_finalizers(obj: &mut Value, list: &[String]) {
    let meta = metadata_mut(obj);
    if list.is_empty() {
        meta.remove("finalizers");
    } else {
        meta.insert("finalizers".into(), json!(list));
    }
}

const SUBDOMAIN_MESSAGE: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
    alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character \
    (e.g. 'example.com', regex used for validation is \
    '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

const LABEL_MESSAGE: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric \
    characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  \
    or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

/// Whether names of this resource are DNS labels (no dots) rather than subdomains.
fn label_names(t: &ResourceType) -> bool {
    t.group.is_empty() && matches!(t.resource.as_str(), "namespaces" | "services")
}

/// Checks `metadata.name` for the resource's naming rule.
pub fn validate_name(t: &ResourceType, name: &str) -> Result<(), ApiError> {
    let (ok, message) = if label_names(t) {
        (is_label(name), LABEL_MESSAGE)
    } else if t.resource == "events" {
        (
            !name.is_empty() && name.len() <= 253 && !name.contains('/'),
            SUBDOMAIN_MESSAGE,
        )
    } else {
        (is_subdomain(name), SUBDOMAIN_MESSAGE)
    };
    if ok {
        return Ok(());
    }
    Err(ApiError::invalid(
        &t.kind,
        &t.group,
        name,
        vec![Cause {
            reason: "FieldValueInvalid".into(),
            message: format!("Invalid value: {name:?}: {message}"),
            field: "metadata.name".into(),
        }],
    ))
}

/// Fills in what the server owns on create: apiVersion and kind, namespace, a generated name,
/// uid, creationTimestamp and generation; drops what clients may not set. Returns the name.
pub fn prepare_create(
    t: &ResourceType,
    obj: &mut Value,
    path_namespace: Option<&str>,
) -> Result<String, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    obj["apiVersion"] = json!(t.api_version());
    obj["kind"] = json!(t.kind);
    let kind = t.kind.clone();
    let group = t.group.clone();
    let namespaced = t.namespaced;
    let meta = metadata_mut(obj);
    if namespaced {
        let body_ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        match (path_namespace, body_ns) {
            (Some(p), Some(b)) if p != b => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on \
                     the request",
                ));
            }
            (Some(p), _) => {
                meta.insert("namespace".into(), json!(p));
            }
            (None, _) => {
                return Err(ApiError::bad_request(
                    "a namespaced object must be created within a namespace",
                ));
            }
        }
    } else {
        meta.remove("namespace");
    }
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let name = match name {
        Some(n) => n,
        None => match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) if !prefix.is_empty() => generate_name(prefix),
            _ => {
                return Err(ApiError::invalid(
                    &kind,
                    &group,
                    "",
                    vec![Cause {
                        reason: "FieldValueRequired".into(),
                        message: "Required value: name or generateName is required".into(),
                        field: "metadata.name".into(),
                    }],
                ));
            }
        },
    };
    meta.insert("name".into(), json!(name));
    meta.insert("uid".into(), json!(new_uid()));
    meta.insert("creationTimestamp".into(), json!(now()));
    meta.insert("generation".into(), json!(1));
    for field in [
        "resourceVersion",
        "selfLink",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        meta.remove(field);
    }
    validate_name(t, &name)?;
    if t.status_subresource
        && t.custom
        && let Some(o) = obj.as_object_mut()
    {
        o.remove("status");
    }
    Ok(name)
}

/// Whether anything of an object but `metadata`, `status`, `apiVersion` and `kind` differs: a
/// change to it bumps `generation`.
fn spec_differs(old: &Value, new: &Value) -> bool {
    !equal_except(old, new, &["metadata", "status", "apiVersion", "kind"])
}

/// Whether two values are equal once the top-level fields `ignored` are left out of both (two
/// values that are not both objects are compared whole). Compares in place, without copies:
/// it runs on every update.
pub(crate) fn equal_except(a: &Value, b: &Value, ignored: &[&str]) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    let kept = |k: &&String| !ignored.contains(&k.as_str());
    a.keys().filter(kept).count() == b.keys().filter(kept).count()
        && a.iter()
            .filter(|(k, _)| kept(k))
            .all(|(k, v)| b.get(k) == Some(v))
}

/// Which part of an object a write targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The main resource: everything but status (when a status subresource exists).
    Main,
    /// The `status` subresource: only status.
    Status,
}

/// Merges an update into the stored object as the API server does: server-owned metadata is
/// kept, the part the write does not own is kept from `old`, and `generation` is bumped when
/// anything outside metadata and status changed.
pub fn prepare_update(
    t: &ResourceType,
    old: &Value,
    new: &mut Value,
    part: Part,
) -> Result<(), ApiError> {
    if !new.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    new["apiVersion"] = json!(t.api_version());
    new["kind"] = json!(t.kind);
    match part {
        Part::Status => {
            let status = new.get("status").cloned();
            let mut merged = old.clone();
            match status {
                Some(s) => merged["status"] = s,
                None => {
                    if let Some(o) = merged.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            // Metadata written through /status is ignored, except managedFields.
            if let Some(mf) = metadata(new).get("managedFields").cloned() {
                metadata_mut(&mut merged).insert("managedFields".into(), mf);
            }
            *new = merged;
        }
        Part::Main => {
            if t.status_subresource {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
        }
    }
    let old_meta = metadata(old).clone();
    let deleting = is_deleting(old);
    let old_finalizers = finalizers(old);
    let new_finalizers = finalizers(new);
    if deleting && new_finalizers.iter().any(|f| !old_finalizers.contains(f)) {
        let name = old_meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        return Err(ApiError::forbidden(format!(
            "{} {name:?} is forbidden: no new finalizers can be added if the object is being \
             deleted",
            t.resource
        )));
    }
    let spec_changed = spec_differs(old, new);
    let meta = metadata_mut(new);
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old_meta.get(field) {
            Some(v) => meta.insert(field.into(), v.clone()),
            None => meta.remove(field),
        };
    }
    meta.remove("resourceVersion");
    meta.remove("selfLink");
    if spec_changed && part == Part::Main {
        let generation = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        meta.insert("generation".into(), json!(generation + 1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{builtins, types_of_crd};
    use kube::CustomResourceExt;

    fn model_type() -> ResourceType {
        types_of_crd(&sedna_api::model::Model::crd())
            .unwrap()
            .remove(0)
    }

    #[test]
    fn create_fills_server_fields_and_generates_names() {
        let t = model_type();
        let mut obj = json!({ "metadata": { "generateName": "m-", "name": "",
                                            "resourceVersion": "9" },
                              "spec": {}, "status": { "phase": "Ready" } });
        let name = prepare_create(&t, &mut obj, Some("default")).unwrap();
        assert!(name.starts_with("m-") && name.len() == 7, "{name}");
        let meta = metadata(&obj);
        assert_eq!(meta["namespace"], "default");
        assert_eq!(meta["generation"], 1);
        assert!(meta.get("resourceVersion").is_none());
        assert_eq!(obj["apiVersion"], "sedna.io/v1alpha1");
        assert!(obj.get("status").is_none(), "status is dropped on create");
    }

    #[test]
    fn a_long_generate_name_ending_in_a_multibyte_character_is_refused_not_a_panic() {
        let t = model_type();
        let prefix = format!("{}é", "a".repeat(247));
        let mut obj = json!({ "metadata": { "generateName": prefix }, "spec": {} });
        let err = prepare_create(&t, &mut obj, Some("default")).unwrap_err();
        assert_eq!(err.code, 422);
        assert!(generate_name(&prefix).starts_with(&"a".repeat(247)));
    }

    #[test]
    fn create_without_a_name_or_with_a_bad_name_is_invalid() {
        let t = model_type();
        let err = prepare_create(&t, &mut json!({ "metadata": {} }), Some("ns")).unwrap_err();
        assert_eq!(err.code, 422);
        let err = prepare_create(
            &t,
            &mut json!({ "metadata": { "name": "Bad_Name" } }),
            Some("ns"),
        )
        .unwrap_err();
        assert!(
            err.message
                .contains("metadata.name: Invalid value: \"Bad_Name\""),
            "{}",
            err.message
        );
        let err = prepare_create(
            &t,
            &mut json!({ "metadata": { "name": "x", "namespace": "a" } }),
            Some("b"),
        )
        .unwrap_err();
        assert_eq!(err.code, 400);
    }

    #[test]
    fn updates_keep_status_on_main_writes_and_only_status_on_status_writes() {
        let t = model_type();
        let old = json!({ "metadata": { "name": "m", "uid": "u", "generation": 3 },
                          "spec": { "url": "/a" }, "status": { "phase": "Ready" } });
        let mut main = json!({ "metadata": { "name": "m", "uid": "other" },
                               "spec": { "url": "/b" }, "status": { "phase": "Failed" } });
        prepare_update(&t, &old, &mut main, Part::Main).unwrap();
        assert_eq!(main["status"]["phase"], "Ready");
        assert_eq!(main["metadata"]["uid"], "u");
        assert_eq!(main["metadata"]["generation"], 4);

        let mut status = json!({ "metadata": { "name": "m", "labels": { "x": "y" } },
                                 "spec": { "url": "/c" }, "status": { "phase": "Failed" } });
        prepare_update(&t, &old, &mut status, Part::Status).unwrap();
        assert_eq!(status["spec"]["url"], "/a");
        assert_eq!(status["status"]["phase"], "Failed");
        assert_eq!(
            status["metadata"]["generation"], 3,
            "status writes never bump generation"
        );
        assert!(status["metadata"].get("labels").is_none());
    }

    #[test]
    fn metadata_only_changes_do_not_bump_generation() {
        let t = model_type();
        let old = json!({ "metadata": { "name": "m", "generation": 2 }, "spec": { "url": "/a" } });
        let mut new = json!({ "metadata": { "name": "m", "labels": { "a": "b" } },
                              "spec": { "url": "/a" } });
        prepare_update(&t, &old, &mut new, Part::Main).unwrap();
        assert_eq!(new["metadata"]["generation"], 2);
    }

    #[test]
    fn equality_leaves_out_only_the_named_top_level_fields() {
        let a = json!({ "metadata": { "name": "a" }, "spec": { "x": 1 }, "status": { "p": 1 } });
        let b = json!({ "metadata": { "name": "b" }, "spec": { "x": 1 } });
        assert!(equal_except(&a, &b, &["metadata", "status"]));
        assert!(!equal_except(&a, &b, &["metadata"]), "status differs");
        let c = json!({ "metadata": { "name": "a" }, "spec": { "x": 2 }, "status": { "p": 1 } });
        assert!(
            !equal_except(&a, &c, &["metadata", "status"]),
            "spec differs"
        );
        let extra = json!({ "metadata": {}, "spec": { "x": 1 }, "more": true });
        assert!(
            !equal_except(&b, &extra, &["metadata"]),
            "a field only one side has"
        );
        assert!(!equal_except(&json!(1), &json!({}), &["metadata"]));
        assert!(equal_except(&json!([1]), &json!([1]), &["metadata"]));
        assert!(spec_differs(&a, &c) && !spec_differs(&a, &b));
    }

    #[test]
    fn finalizers_cannot_be_added_while_deleting() {
        let t = model_type();
        let old = json!({ "metadata": { "name": "m", "deletionTimestamp": "2026-01-01T00:00:00Z",
                                        "finalizers": ["a"] } });
        let mut new = json!({ "metadata": { "name": "m", "finalizers": ["a", "b"] } });
        assert_eq!(
            prepare_update(&t, &old, &mut new, Part::Main)
                .unwrap_err()
                .code,
            403
        );
        let mut fewer = json!({ "metadata": { "name": "m" } });
        assert!(prepare_update(&t, &old, &mut fewer, Part::Main).is_ok());
    }

    #[test]
    fn namespaces_and_services_use_label_names() {
        let ns = builtins()
            .into_iter()
            .find(|t| t.resource == "namespaces")
            .unwrap();
        assert!(validate_name(&ns, "a.b").is_err());
        assert!(validate_name(&ns, "edge-ns").is_ok());
        let cm = builtins()
            .into_iter()
            .find(|t| t.resource == "configmaps")
            .unwrap();
        assert!(validate_name(&cm, "a.b").is_ok());
    }
}
