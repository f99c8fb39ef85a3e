//! The server's own controllers, which kube-controller-manager runs in a real cluster: the
//! garbage collector (ownerReferences with background, foreground and orphan propagation),
//! namespace deletion, and removal of a CRD's objects before the CRD.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::handlers::{CRD_CLEANUP_FINALIZER, delete_object, sync_crd};
use crate::meta;
use crate::registry::ResourceType;
use crate::server::Api;
use crate::store::{EventKind, Mutation, Precondition, StoreError, Stored};

/// Runs until shutdown: reacts to every committed change, and sweeps everything periodically
/// (which also catches up after a restart).
pub(crate) async fn run(api: Arc<Api>, sweep_interval: Duration) {
    let mut head = api.store.subscribe();
    let mut shutdown = api.shutdown.clone();
    let mut cursor = api.store.head();
    // Objects whose deletion waits for other objects to go (namespaces, CRDs, foreground
    // owners): looked at again whenever something is deleted.
    let mut waiting: BTreeSet<String> = sweep(&api).await;
    let mut ticker = tokio::time::interval(sweep_interval);
    ticker.tick().await;
    loop {
        loop {
            match api.store.events_since(cursor, "", 1000) {
                Ok(events) if events.is_empty() => break,
                Ok(events) => {
                    let mut deletions = false;
                    for event in &events {
                        cursor = event.rev;
                        if event.kind == EventKind::Deleted {
                            deletions = true;
                            if let Some(uid) = meta::meta_str(&event.object, "uid") {
                                for key in api.store.dependents(uid) {
                                    check_owners(&api, &key).await;
                                }
                            }
                        } else if meta::is_deleting(&event.object)
                            && finalize(&api, &event.key).await
                        {
                            waiting.insert(event.key.clone());
                        }
                    }
                    if deletions {
                        let keys: Vec<String> = waiting.iter().cloned().collect();
                        for key in keys {
                            if !finalize(&api, &key).await {
                                waiting.remove(&key);
                            }
                        }
                    }
                }
                Err(StoreError::Compacted { .. }) => {
                    cursor = api.store.head();
                    waiting = sweep(&api).await;
                    break;
                }
                Err(_) => break,
            }
        }
        tokio::select! {
            changed = head.changed() => if changed.is_err() { return },
            _ = ticker.tick() => waiting = sweep(&api).await,
            _ = shutdown.changed() => return,
        }
    }
}

/// One pass over every object: dangling owners and pending deletions. Returns the objects
/// still waiting for others to go.
pub(crate) async fn sweep(api: &Api) -> BTreeSet<String> {
    let mut waiting = BTreeSet::new();
    let (items, _) = api.store.list("");
    for stored in items {
        let key = key_of(api, &stored.value);
        let Some(key) = key else { continue };
        if meta::is_deleting(&stored.value) && finalize(api, &key).await {
            waiting.insert(key.clone());
        }
        // Every node's Lease names its Node: the common case, all owners there, is judged on
        // the listed object without copying anything.
        if !owners_alive(api, &stored) {
            check_owners(api, &key).await;
        }
    }
    waiting
}

fn type_of(api: &Api, obj: &Value) -> Option<Arc<ResourceType>> {
    let api_version = obj.get("apiVersion")?.as_str()?;
    let kind = obj.get("kind")?.as_str()?;
    api.registry.by_kind(api_version, kind)
}

fn key_of(api: &Api, obj: &Value) -> Option<String> {
    let t = type_of(api, obj)?;
    Some(t.key(
        meta::meta_str(obj, "namespace"),
        meta::meta_str(obj, "name")?,
    ))
}

/// An object's ownerReferences (none: empty).
fn owner_references(obj: &Value) -> &[Value] {
    meta::metadata(obj)
        .get("ownerReferences")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Whether every owner the object names still exists (true when it names none).
fn owners_alive(api: &Api, stored: &Stored) -> bool {
    let obj = stored.value.as_ref();
    owner_references(obj)
        .iter()
        .all(|o| owner_exists(api, obj, o))
}

/// Whether the owner an ownerReference names still exists (with that uid). An owner of an
/// unknown kind counts as existing: it cannot be checked.
fn owner_exists(api: &Api, dependent: &Value, owner: &Value) -> bool {
    let (Some(api_version), Some(kind), Some(name)) = (
        owner["apiVersion"].as_str(),
        owner["kind"].as_str(),
        owner["name"].as_str(),
    ) else {
        return true;
    };
    let Some(t) = api.registry.by_kind(api_version, kind) else {
        return true;
    };
    let ns = if t.namespaced {
        meta::meta_str(dependent, "namespace")
    } else {
        None
    };
    match api.store.get(&t.key(ns, name)) {
        Some(o) => meta::meta_str(&o.value, "uid") == owner["uid"].as_str(),
        None => false,
    }
}

/// Deletes a dependent whose owners are all gone; drops references to owners that are gone
/// when others remain.
async fn check_owners(api: &Api, key: &str) {
    let Some(stored) = api.store.get(key) else {
        return;
    };
    if owners_alive(api, &stored) {
        return;
    }
    let obj = stored.value.as_ref();
    let alive: Vec<Value> = owner_references(obj)
        .iter()
        .filter(|o| owner_exists(api, obj, o))
        .cloned()
        .collect();
    let Some(t) = type_of(api, obj) else { return };
    if alive.is_empty() {
        if !meta::is_deleting(obj) {
            let _ = delete_object(api, &t, key, &stored, "Background", None, false).await;
        }
        return;
    }
    let mut updated = obj.clone();
    meta::metadata_mut(&mut updated).insert("ownerReferences".into(), json!(alive));
    put(api, key, &stored, updated).await;
}

async fn put(api: &Api, key: &str, current: &Stored, mut obj: Value) {
    meta::metadata_mut(&mut obj).remove("resourceVersion");
    let _ = api
        .store
        .write(
            key.to_owned(),
            Precondition::Revision(current.rev),
            Mutation::Put(obj),
        )
        .await;
}

fn without(list: &[String], item: &str) -> Vec<String> {
    list.iter().filter(|f| *f != item).cloned().collect()
}

/// Works on an object being deleted: the finalizers the server implements, then removal once
/// no finalizer is left. Returns whether it still waits for other objects to go.
async fn finalize(api: &Api, key: &str) -> bool {
    let Some(stored) = api.store.get(key) else {
        return false;
    };
    let obj = stored.value.as_ref().clone();
    if !meta::is_deleting(&obj) {
        return false;
    }
    let Some(t) = type_of(api, &obj) else {
        return false;
    };
    let uid = meta::meta_str(&obj, "uid").unwrap_or_default().to_owned();
    let mut finalizers = meta::finalizers(&obj);
    let mut changed = false;

    if finalizers.iter().any(|f| f == "orphan") {
        for dep_key in api.store.dependents(&uid) {
            let Some(dep) = api.store.get(&dep_key) else {
                continue;
            };
            let refs: Vec<Value> = meta::metadata(&dep.value)
                .get("ownerReferences")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter(|r| r["uid"] != uid.as_str())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let mut updated = dep.value.as_ref().clone();
            let m = meta::metadata_mut(&mut updated);
            if refs.is_empty() {
                m.remove("ownerReferences");
            } else {
                m.insert("ownerReferences".into(), json!(refs));
            }
            put(api, &dep_key, &dep, updated).await;
        }
        if api.store.dependents(&uid).is_empty() {
            finalizers = without(&finalizers, "orphan");
            changed = true;
        }
    }

    if finalizers.iter().any(|f| f == "foregroundDeletion") {
        let dependents = api.store.dependents(&uid);
        for dep_key in &dependents {
            let Some(dep) = api.store.get(dep_key) else {
                continue;
            };
            if meta::is_deleting(&dep.value) {
                continue;
            }
            if let Some(dt) = type_of(api, &dep.value) {
                let _ = delete_object(api, &dt, dep_key, &dep, "Background", None, false).await;
            }
        }
        if api.store.dependents(&uid).is_empty() {
            finalizers = without(&finalizers, "foregroundDeletion");
            changed = true;
        }
    }

    if t.group == "apiextensions.k8s.io" && finalizers.iter().any(|f| f == CRD_CLEANUP_FINALIZER) {
        let group = obj
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let plural = obj
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !group.is_empty() && !plural.is_empty() {
            let prefix = format!("{group}/{plural}/");
            let (items, _) = api.store.list(&prefix);
            for item in &items {
                if meta::is_deleting(&item.value) && !meta::finalizers(&item.value).is_empty() {
                    continue;
                }
                let item_key = key_of(api, &item.value);
                if let (Some(it), Some(item_key)) = (type_of(api, &item.value), item_key) {
                    let _ =
                        delete_object(api, &it, &item_key, item, "Background", None, false).await;
                }
            }
            if api.store.list(&prefix).0.is_empty() {
                finalizers = without(&finalizers, CRD_CLEANUP_FINALIZER);
                changed = true;
            }
        }
    }

    let mut obj = obj;
    if t.group.is_empty() && t.resource == "namespaces" {
        let ns = meta::meta_str(&obj, "name").unwrap_or_default().to_owned();
        let pending = obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x == "kubernetes"));
        if pending {
            let mut remaining = 0;
            for nt in api.registry.all() {
                if !nt.namespaced || nt.storage_group != nt.group {
                    continue;
                }
                let (items, _) = api.store.list(&nt.key_prefix(Some(&ns)));
                for item in &items {
                    remaining += 1;
                    if !meta::is_deleting(&item.value) {
                        let item_key = nt.key(
                            Some(&ns),
                            meta::meta_str(&item.value, "name").unwrap_or_default(),
                        );
                        let _ = delete_object(api, &nt, &item_key, item, "Background", None, false)
                            .await;
                    }
                }
            }
            if remaining == 0 {
                obj["spec"]["finalizers"] = json!([]);
                changed = true;
            }
        }
    }

    let server_owned = ["orphan", "foregroundDeletion", CRD_CLEANUP_FINALIZER];
    let still_waiting = finalizers
        .iter()
        .any(|f| server_owned.contains(&f.as_str()))
        || obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x == "kubernetes"));
    if !changed {
        return still_waiting;
    }
    meta::set_finalizers(&mut obj, &finalizers);
    let namespace_pending = obj
        .pointer("/spec/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    if finalizers.is_empty() && !namespace_pending {
        let removed = api
            .store
            .write(
                key.to_owned(),
                Precondition::Revision(stored.rev),
                Mutation::Delete,
            )
            .await;
        if let Ok(removed) = removed
            && t.group == "apiextensions.k8s.io"
        {
            let name = meta::meta_str(&removed.value, "name").unwrap_or_default();
            sync_crd(api, name, None);
        }
    } else {
        put(api, key, &stored, obj).await;
    }
    still_waiting
}
