//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Every write records which manager set which fields, in the `FieldsV1` format kubectl and
//! client libraries read (`f:` fields, `k:` list-map items, `v:` set values, `.` the item
//! itself). An apply merges the applied configuration into the live object (maps field by
//! field, list-maps item by item, sets value by value, anything else as a whole), refuses to
//! change a field another manager set to a different value unless forced, and removes the
//! fields the applier set before but no longer sets, unless someone else also owns them.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::builtin::{ListType, list_type_of};
use crate::meta;
use crate::registry::ResourceType;

/// A set of field paths in `FieldsV1` form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSet(BTreeMap<String, FieldSet>);

type Path = Vec<String>;

impl FieldSet {
    /// Parses a `fieldsV1` object.
    pub fn from_json(v: &Value) -> Self {
        let mut set = BTreeMap::new();
        if let Some(map) = v.as_object() {
            for (k, child) in map {
                set.insert(k.clone(), FieldSet::from_json(child));
            }
        }
        FieldSet(set)
    }

    /// The `fieldsV1` object.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect::<Map<_, _>>(),
        )
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every leaf path (a member with no children).
    pub fn leaves(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.collect_leaves(&mut Vec::new(), &mut out);
        out
    }

    fn collect_leaves(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        for (k, child) in &self.0 {
            prefix.push(k.clone());
            if child.is_empty() {
                out.push(prefix.clone());
            } else {
                child.collect_leaves(prefix, out);
            }
            prefix.pop();
        }
    }

    /// Whether `path` is in the set (as a leaf or an inner member).
    pub fn contains(&self, path: &[String]) -> bool {
        match path.split_first() {
            None => true,
            Some((head, rest)) => self.0.get(head).is_some_and(|c| c.contains(rest)),
        }
    }

    /// Whether the set holds any path under the member `path`.
    pub fn has_under(&self, path: &[String]) -> bool {
        match path.split_first() {
            None => true,
            Some((head, rest)) => self.0.get(head).is_some_and(|c| c.has_under(rest)),
        }
    }

    fn insert(&mut self, path: &[String]) {
        if let Some((head, rest)) = path.split_first() {
            self.0.entry(head.clone()).or_default().insert(rest);
        }
    }

    /// Removes a leaf path, and the members it leaves empty.
    pub fn remove(&mut self, path: &[String]) {
        if let Some((head, rest)) = path.split_first() {
            if rest.is_empty() {
                self.0.remove(head);
            } else if let Some(child) = self.0.get_mut(head) {
                child.remove(rest);
                if child.is_empty() {
                    self.0.remove(head);
                }
            }
        }
    }

    fn union(&mut self, other: &FieldSet) {
        for (k, child) in &other.0 {
            self.0.entry(k.clone()).or_default().union(child);
        }
    }
}

/// Which part of an object a manager writes.
fn tracked_root_key(key: &str, subresource: Option<&str>, t: &ResourceType) -> bool {
    match subresource {
        Some("status") => key == "status",
        _ => {
            let server_owned = matches!(key, "apiVersion" | "kind");
            let status_elsewhere = key == "status" && t.status_subresource;
            !(server_owned || status_elsewhere)
        }
    }
}

/// The fields a value sets, as a manager would own them.
pub fn fields_of(t: &ResourceType, value: &Value, subresource: Option<&str>) -> FieldSet {
    let mut set = FieldSet::default();
    let Some(root) = value.as_object() else {
        return set;
    };
    for (k, v) in root {
        if !tracked_root_key(k, subresource, t) {
            continue;
        }
        if k == "metadata" {
            let mut meta_set = FieldSet::default();
            if let Some(m) = v.as_object() {
                for field in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(fv) = m.get(field) {
                        let mut names = vec!["metadata".to_owned(), field.to_owned()];
                        meta_set
                            .0
                            .insert(format!("f:{field}"), fields_of_value(t, fv, &mut names));
                    }
                }
            }
            if !meta_set.is_empty() {
                set.0.insert("f:metadata".into(), meta_set);
            }
            continue;
        }
        let mut names = vec![k.clone()];
        set.0
            .insert(format!("f:{k}"), fields_of_value(t, v, &mut names));
    }
    set
}

fn list_key(item: &Value, keys: &[String]) -> Option<String> {
    let mut key = Map::new();
    for k in keys {
        key.insert(k.clone(), item.get(k)?.clone());
    }
    Some(format!("k:{}", Value::Object(key)))
}

fn fields_of_value(t: &ResourceType, v: &Value, names: &mut Vec<String>) -> FieldSet {
    let mut set = FieldSet::default();
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                names.push(k.clone());
                set.0
                    .insert(format!("f:{k}"), fields_of_value(t, child, names));
                names.pop();
            }
        }
        Value::Array(items) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            match list_type_of(t, &refs) {
                ListType::Atomic => {}
                ListType::Set => {
                    for item in items {
                        set.0.insert(format!("v:{item}"), FieldSet::default());
                    }
                }
                ListType::Map(keys) => {
                    for item in items {
                        let Some(key) = list_key(item, &keys) else {
                            continue;
                        };
                        let mut member = fields_of_value(t, item, names);
                        member.0.insert(".".into(), FieldSet::default());
                        set.0.insert(key, member);
                    }
                }
            }
        }
        _ => {}
    }
    set
}

/// The value at a field path.
fn value_at<'a>(root: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = root;
    for element in path {
        if element == "." {
            continue;
        }
        v = step(v, element)?;
    }
    Some(v)
}

fn step<'a>(v: &'a Value, element: &str) -> Option<&'a Value> {
    if let Some(field) = element.strip_prefix("f:") {
        return v.get(field);
    }
    let items = v.as_array()?;
    if let Some(key) = element.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(key).ok()?;
        return items
            .iter()
            .find(|item| key.iter().all(|(k, want)| item.get(k) == Some(want)));
    }
    if let Some(value) = element.strip_prefix("v:") {
        let value: Value = serde_json::from_str(value).ok()?;
        return items.iter().find(|item| **item == value);
    }
    None
}

/// Removes the value at a leaf path (a field, a set value, or a list item for `k:…/.`).
fn remove_at(root: &mut Value, path: &[String]) {
    let (parent_path, last) = match path.split_last() {
        Some((last, parent)) if last == "." => match parent.split_last() {
            Some((item, grand)) => (grand, item.as_str()),
            None => return,
        },
        Some((last, parent)) => (parent, last.as_str()),
        None => return,
    };
    let mut v = root;
    for element in parent_path {
        let next = if let Some(field) = element.strip_prefix("f:") {
            v.get_mut(field)
        } else {
            let idx = step(v, element).and_then(|target| {
                v.as_array()
                    .and_then(|a| a.iter().position(|x| std::ptr::eq(x, target)))
            });
            match idx {
                Some(i) => v.get_mut(i),
                None => None,
            }
        };
        match next {
            Some(n) => v = n,
            None => return,
        }
    }
    if let Some(field) = last.strip_prefix("f:") {
        if let Some(map) = v.as_object_mut() {
            map.remove(field);
        }
    } else if let Some(key) = last.strip_prefix("k:") {
        let Ok(key) = serde_json::from_str::<Map<String, Value>>(key) else {
            return;
        };
        if let Some(items) = v.as_array_mut() {
            items.retain(|item| !key.iter().all(|(k, want)| item.get(k) == Some(want)));
        }
    } else if let Some(value) = last.strip_prefix("v:") {
        let Ok(value) = serde_json::from_str::<Value>(value) else {
            return;
        };
        if let Some(items) = v.as_array_mut() {
            items.retain(|item| *item != value);
        }
    }
}

/// Merges an applied configuration into a live value (taken, so that what the configuration
/// leaves alone moves into the result instead of being copied at every level).
fn merge_applied(t: &ResourceType, live: Value, applied: &Value, names: &mut Vec<String>) -> Value {
    match (live, applied) {
        (Value::Object(mut out), Value::Object(a)) => {
            for (k, av) in a {
                names.push(k.clone());
                let merged = match out.remove(k) {
                    Some(lv) => merge_applied(t, lv, av, names),
                    None => av.clone(),
                };
                names.pop();
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::Array(mut out), Value::Array(a)) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            match list_type_of(t, &refs) {
                ListType::Atomic => applied.clone(),
                ListType::Set => {
                    for v in a {
                        if !out.contains(v) {
                            out.push(v.clone());
                        }
                    }
                    Value::Array(out)
                }
                ListType::Map(keys) => {
                    for item in a {
                        let same = |o: &Value| keys.iter().all(|k| o.get(k) == item.get(k));
                        match out.iter().position(same) {
                            Some(i) => {
                                let live = std::mem::take(&mut out[i]);
                                out[i] = merge_applied(t, live, item, names);
                            }
                            None => out.push(item.clone()),
                        }
                    }
                    Value::Array(out)
                }
            }
        }
        _ => applied.clone(),
    }
}

/// One `managedFields` entry.
#[derive(Clone, Debug)]
struct Entry {
    manager: String,
    operation: String,
    subresource: Option<String>,
    api_version: String,
    time: String,
    fields: FieldSet,
}

fn entries_of(obj: &Value) -> Vec<Entry> {
    meta::metadata(obj)
        .get("managedFields")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|e| Entry {
                    manager: e["manager"].as_str().unwrap_or_default().to_owned(),
                    operation: e["operation"].as_str().unwrap_or("Update").to_owned(),
                    subresource: e
                        .get("subresource")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    api_version: e["apiVersion"].as_str().unwrap_or_default().to_owned(),
                    time: e["time"].as_str().unwrap_or_default().to_owned(),
                    fields: FieldSet::from_json(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn write_entries(obj: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": e.fields.to_json(),
            });
            if let Some(s) = &e.subresource {
                v["subresource"] = json!(s);
            }
            v
        })
        .collect();
    let meta = meta::metadata_mut(obj);
    if list.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

fn same_identity(e: &Entry, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
    e.manager == manager && e.operation == operation && e.subresource.as_deref() == subresource
}

/// Records an ordinary write (create, update, patch) by `manager`: the fields it changed
/// become its own and leave other managers; fields it removed leave everyone.
pub fn record_update(
    t: &ResourceType,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    subresource: Option<&str>,
) {
    let mut entries = old.map(entries_of).unwrap_or_default();
    let new_set = fields_of(t, new, subresource);
    let old_set = old
        .map(|o| fields_of(t, o, subresource))
        .unwrap_or_default();
    let changed: Vec<Path> = new_set
        .leaves()
        .into_iter()
        .filter(|p| match old {
            None => true,
            Some(o) => !old_set.contains(p) || value_at(o, p) != value_at(new, p),
        })
        .collect();
    let removed: Vec<Path> = old_set
        .leaves()
        .into_iter()
        .filter(|p| !new_set.contains(p))
        .collect();
    for e in entries.iter_mut() {
        for p in removed.iter().chain(changed.iter()) {
            if !same_identity(e, manager, "Update", subresource) {
                e.fields.remove(p);
            }
        }
        for p in &removed {
            e.fields.remove(p);
        }
    }
    if !changed.is_empty() {
        let now = meta::now();
        match entries
            .iter_mut()
            .find(|e| same_identity(e, manager, "Update", subresource))
        {
            Some(e) => {
                for p in &changed {
                    e.fields.insert(p);
                }
                e.time = now;
                e.api_version = t.api_version();
            }
            None => {
                let mut fields = FieldSet::default();
                for p in &changed {
                    fields.insert(p);
                }
                entries.push(Entry {
                    manager: manager.to_owned(),
                    operation: "Update".into(),
                    subresource: subresource.map(str::to_owned),
                    api_version: t.api_version(),
                    time: now,
                    fields,
                });
            }
        }
    }
    write_entries(new, &entries);
}

/// A field another manager owns with a different value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// The field, as kubectl prints it (`.spec.replicas`).
    pub field: String,
}

fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for element in path {
        if let Some(f) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = element.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = element.strip_prefix("v:") {
            out.push_str(&format!("[{v}]"));
        }
    }
    out
}

/// Applies `applied` (a full or partial configuration) for `manager` on top of `live` (absent
/// for a create). Returns the merged object with updated managedFields, or the conflicts.
pub fn apply(
    t: &ResourceType,
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    subresource: Option<&str>,
) -> Result<Value, Vec<Conflict>> {
    let empty = json!({});
    let live_value = live.unwrap_or(&empty);
    let mut entries = entries_of(live_value);
    let applied_set = fields_of(t, applied, subresource);
    // The applied fields whose value the apply changes: another manager's claim on one of
    // them is a conflict (or, forced, is taken from it).
    let changed: Vec<Path> = applied_set
        .leaves()
        .into_iter()
        .filter(|leaf| value_at(live_value, leaf) != value_at(applied, leaf))
        .collect();
    let mut conflicts = Vec::new();
    for e in &entries {
        if same_identity(e, manager, "Apply", subresource) {
            continue;
        }
        for leaf in &changed {
            if leaf.last().is_some_and(|l| l == ".") || !e.fields.contains(leaf) {
                continue;
            }
            conflicts.push(Conflict {
                manager: e.manager.clone(),
                field: display_path(leaf),
            });
        }
    }
    if !conflicts.is_empty() && !force {
        conflicts.sort_by(|a, b| (&a.manager, &a.field).cmp(&(&b.manager, &b.field)));
        conflicts.dedup();
        return Err(conflicts);
    }
    if force {
        for e in entries.iter_mut() {
            if same_identity(e, manager, "Apply", subresource) {
                continue;
            }
            for leaf in &changed {
                e.fields.remove(leaf);
            }
        }
    }
    let mut applied_body = applied.clone();
    if let Some(o) = applied_body.as_object_mut() {
        o.remove("apiVersion");
        o.remove("kind");
        if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
            m.remove("resourceVersion");
        }
    }
    let mut merged = merge_applied(t, live_value.clone(), &applied_body, &mut Vec::new());
    let previous = entries
        .iter()
        .find(|e| same_identity(e, manager, "Apply", subresource))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut others = FieldSet::default();
    for e in &entries {
        if !same_identity(e, manager, "Apply", subresource) {
            others.union(&e.fields);
        }
    }
    for leaf in previous.leaves() {
        if applied_set.contains(&leaf) {
            continue;
        }
        let owner_path: &[String] = match leaf.split_last() {
            Some((last, parent)) if last == "." => parent,
            _ => &leaf,
        };
        if others.has_under(owner_path) || applied_set.has_under(owner_path) {
            continue;
        }
        remove_at(&mut merged, &leaf);
    }
    entries.retain(|e| !same_identity(e, manager, "Apply", subresource));
    entries.push(Entry {
        manager: manager.to_owned(),
        operation: "Apply".into(),
        subresource: subresource.map(str::to_owned),
        api_version: t.api_version(),
        time: meta::now(),
        fields: applied_set,
    });
    write_entries(&mut merged, &entries);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{builtins, types_of_crd};
    use kube::CustomResourceExt;

    fn cm() -> ResourceType {
        builtins()
            .into_iter()
            .find(|t| t.resource == "configmaps")
            .unwrap()
    }

    fn managers(obj: &Value) -> Vec<(String, String)> {
        entries_of(obj)
            .into_iter()
            .map(|e| (e.manager, e.operation))
            .collect()
    }

    #[test]
    fn field_sets_use_the_fields_v1_format() {
        let t = builtins()
            .into_iter()
            .find(|t| t.resource == "pods")
            .unwrap();
        let pod = json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "p", "labels": { "a": "b" }, "finalizers": ["x"] },
            "spec": { "containers": [{ "name": "c", "image": "i", "args": ["1"] }] } });
        let set = fields_of(&t, &pod, None).to_json();
        assert_eq!(
            set,
            json!({
                "f:metadata": { "f:labels": { "f:a": {} }, "f:finalizers": { "v:\"x\"": {} } },
                "f:spec": { "f:containers": { "k:{\"name\":\"c\"}": {
                    ".": {}, "f:args": {}, "f:image": {}, "f:name": {} } } }
            })
        );
        assert_eq!(FieldSet::from_json(&set), fields_of(&t, &pod, None));
    }

    #[test]
    fn apply_creates_then_removes_fields_the_applier_dropped() {
        let t = cm();
        let first = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" },
                            "data": { "a": "1", "b": "2" } });
        let live = apply(&t, None, &first, "kubectl", false, None).unwrap();
        assert_eq!(live["data"], json!({ "a": "1", "b": "2" }));
        assert_eq!(managers(&live), [("kubectl".into(), "Apply".into())]);

        let second = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" },
                             "data": { "a": "1" } });
        let live = apply(&t, Some(&live), &second, "kubectl", false, None).unwrap();
        assert_eq!(live["data"], json!({ "a": "1" }));
    }

    #[test]
    fn apply_conflicts_with_another_manager_unless_forced() {
        let t = cm();
        let mut live = json!({ "apiVersion": "v1", "kind": "ConfigMap",
                               "metadata": { "name": "c" }, "data": { "a": "1" } });
        record_update(&t, None, &mut live, "editor", None);
        let applied = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" },
                              "data": { "a": "2" } });
        let conflicts = apply(&t, Some(&live), &applied, "kubectl", false, None).unwrap_err();
        assert_eq!(
            conflicts,
            [Conflict {
                manager: "editor".into(),
                field: ".data.a".into()
            }]
        );
        let same = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" },
                           "data": { "a": "1" } });
        assert!(
            apply(&t, Some(&live), &same, "kubectl", false, None).is_ok(),
            "equal values share"
        );

        let forced = apply(&t, Some(&live), &applied, "kubectl", true, None).unwrap();
        assert_eq!(forced["data"]["a"], "2");
        assert_eq!(managers(&forced), [("kubectl".into(), "Apply".into())]);
    }

    #[test]
    fn fields_kept_by_another_manager_survive_the_appliers_removal() {
        let t = cm();
        let applied = json!({ "apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": { "name": "c" }, "data": { "a": "1" } });
        let live = apply(&t, None, &applied, "one", false, None).unwrap();
        let live = apply(&t, Some(&live), &applied, "two", false, None).unwrap();
        let empty = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "c" } });
        let live = apply(&t, Some(&live), &empty, "one", false, None).unwrap();
        assert_eq!(live["data"]["a"], "1", "still owned by two");
        let live = apply(&t, Some(&live), &empty, "two", false, None).unwrap();
        assert!(live["data"].get("a").is_none());
    }

    #[test]
    fn updates_move_ownership_of_changed_fields() {
        let t = cm();
        let applied = json!({ "apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": { "name": "c" }, "data": { "a": "1", "b": "1" } });
        let live = apply(&t, None, &applied, "kubectl", false, None).unwrap();
        let mut edited = live.clone();
        edited["data"]["a"] = json!("9");
        record_update(&t, Some(&live), &mut edited, "editor", None);
        let entries = entries_of(&edited);
        let kubectl = entries.iter().find(|e| e.manager == "kubectl").unwrap();
        let editor = entries.iter().find(|e| e.manager == "editor").unwrap();
        let a = vec!["f:data".to_owned(), "f:a".to_owned()];
        assert!(!kubectl.fields.contains(&a));
        assert!(editor.fields.contains(&a));
    }

    #[test]
    fn custom_resources_merge_list_maps_by_their_schema_keys() {
        let t = types_of_crd(&sedna_api::devices::Device::crd())
            .unwrap()
            .remove(0);
        let live = json!({ "apiVersion": "devices.sedna.io/v1beta1", "kind": "Device",
            "metadata": { "name": "d" },
            "spec": { "deviceModelRef": { "name": "m" },
                      "properties": [{ "name": "a", "reportCycle": 1 }] } });
        let live = apply(&t, None, &live, "one", false, None).unwrap();
        let other = json!({ "apiVersion": "devices.sedna.io/v1beta1", "kind": "Device",
            "metadata": { "name": "d" },
            "spec": { "properties": [{ "name": "b", "reportCycle": 2 }] } });
        let merged = apply(&t, Some(&live), &other, "two", false, None).unwrap();
        let names: Vec<&str> = merged["spec"]["properties"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
