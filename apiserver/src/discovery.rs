//! `/version`, API discovery (legacy and aggregated v2) and OpenAPI (`/openapi/v2`,
//! `/openapi/v3`): what `kubectl` and kube-rs read before anything else.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::registry::ResourceType;

/// The Kubernetes minor version the server reports (kubectl's dispatcher picks the bundled
/// client matching it).
pub const KUBERNETES_MINOR: u32 = 33;

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBERNETES_MINOR.to_string(),
        "gitVersion": format!("v1.{KUBERNETES_MINOR}.0+sedna.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "n/a (Rust)",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    })
}

/// Groups in discovery order: core first, then by name; versions in order of appearance.
fn groups(types: &[Arc<ResourceType>]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for t in types {
        match out.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, versions)) => {
                if !versions.contains(&t.version) {
                    versions.push(t.version.clone());
                }
            }
            None => out.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    for g in RESOURCELESS_GROUPS {
        if !out.iter().any(|(name, _)| name == g) {
            out.push((g.to_owned(), vec!["v1".to_owned()]));
        }
    }
    out.sort_by(|a, b| (!a.0.is_empty(), &a.0).cmp(&(!b.0.is_empty(), &b.0)));
    out
}

/// `/api` (legacy).
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }],
    })
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let gvs: Vec<Value> = versions
        .iter()
        .map(|v| json!({ "groupVersion": format!("{name}/{v}"), "version": v }))
        .collect();
    json!({
        "name": name,
        "versions": gvs,
        "preferredVersion": gvs.first().cloned().unwrap_or(Value::Null),
    })
}

/// `/apis` (legacy).
pub fn group_list(types: &[Arc<ResourceType>]) -> Value {
    let groups: Vec<Value> = groups(types)
        .iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| group_json(g, vs))
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

/// `/apis/<group>` (legacy).
pub fn group(types: &[Arc<ResourceType>], name: &str) -> Option<Value> {
    let (g, versions) = groups(types).into_iter().find(|(g, _)| g == name)?;
    let mut v = group_json(&g, &versions);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Some(v)
}

/// `/api/v1` or `/apis/<group>/<version>` (legacy).
pub fn resource_list(types: &[Arc<ResourceType>], group: &str, version: &str) -> Option<Value> {
    let mine: Vec<&Arc<ResourceType>> = types
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if mine.is_empty() {
        if RESOURCELESS_GROUPS.contains(&group) && version == "v1" {
            return Some(json!({ "kind": "APIResourceList", "apiVersion": "v1",
                                "groupVersion": format!("{group}/v1"), "resources": [] }));
        }
        return None;
    }
    let mut resources = Vec::new();
    for t in mine {
        let mut r = json!({
            "name": t.resource,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": t.verbs(),
            "storageVersionHash": storage_hash(t),
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        if t.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", t.resource),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if t.scale.is_some() {
            resources.push(json!({
                "name": format!("{}/scale", t.resource),
                "singularName": "",
                "namespaced": t.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        for (sub, group, kind, verbs) in extra_subresources(t) {
            let mut r = json!({
                "name": format!("{}/{sub}", t.resource),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if !group.is_empty() {
                r["group"] = json!(group);
                r["version"] = json!("v1");
            }
            resources.push(r);
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// Subresources served by handlers of their own: (name, group, kind, verbs).
fn extra_subresources(
    t: &ResourceType,
) -> Vec<(&'static str, &'static str, &'static str, Vec<&'static str>)> {
    match (t.group.as_str(), t.resource.as_str()) {
        ("", "pods") => vec![
            ("binding", "", "Binding", vec!["create"]),
            ("eviction", "policy", "Eviction", vec!["create"]),
        ],
        ("", "serviceaccounts") => vec![(
            "token",
            "authentication.k8s.io",
            "TokenRequest",
            vec!["create"],
        )],
        _ => vec![],
    }
}

/// Groups served without resources of their own: `policy/v1` (its Eviction is a subresource
/// of pods; `kubectl drain` evicts only when discovery lists the group).
const RESOURCELESS_GROUPS: [&str; 1] = ["policy"];

fn storage_hash(t: &ResourceType) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&t.group, &t.version, &t.kind).hash(&mut h);
    let bytes = h.finish().to_be_bytes();
    base64_std(&bytes[..8])
}

fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Aggregated discovery (`apidiscovery.k8s.io/<version>` `APIGroupDiscoveryList`) for the
/// core group (`core = true`, `/api`) or every other group (`/apis`).
pub fn aggregated(types: &[Arc<ResourceType>], core: bool, version: &str) -> Value {
    let items: Vec<Value> = groups(types)
        .into_iter()
        .filter(|(g, _)| g.is_empty() == core)
        .map(|(g, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = types
                        .iter()
                        .filter(|t| t.group == g && t.version == *v)
                        .map(|t| {
                            let kind = json!({ "group": t.group, "version": t.version,
                                               "kind": t.kind });
                            let mut r = json!({
                                "resource": t.resource,
                                "responseKind": kind,
                                "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": t.singular,
                                "verbs": t.verbs(),
                            });
                            if !t.short_names.is_empty() {
                                r["shortNames"] = json!(t.short_names);
                            }
                            if !t.categories.is_empty() {
                                r["categories"] = json!(t.categories);
                            }
                            let mut subresources = Vec::new();
                            if t.status_subresource {
                                subresources.push(json!({
                                    "subresource": "status",
                                    "responseKind": kind,
                                    "verbs": ["get", "patch", "update"],
                                }));
                            }
                            if t.scale.is_some() {
                                subresources.push(json!({
                                    "subresource": "scale",
                                    "responseKind": { "group": "autoscaling", "version": "v1",
                                                      "kind": "Scale" },
                                    "verbs": ["get", "patch", "update"],
                                }));
                            }
                            for (sub, group, k, verbs) in extra_subresources(t) {
                                subresources.push(json!({
                                    "subresource": sub,
                                    "responseKind": { "group": group, "version": "v1", "kind": k },
                                    "verbs": verbs,
                                }));
                            }
                            if !subresources.is_empty() {
                                r["subresources"] = json!(subresources);
                            }
                            r
                        })
                        .collect();
                    json!({ "version": v, "resources": resources, "freshness": "Current" })
                })
                .collect();
            json!({ "metadata": { "name": g }, "versions": versions })
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}

/// The content type of an aggregated discovery answer.
pub fn aggregated_content_type(version: &str) -> String {
    format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList")
}

/// Reverse-DNS prefix of a group's schema names, as Kubernetes names them
/// (`sedna.io` → `io.sedna`).
fn schema_name(t: &ResourceType) -> String {
    let group = if t.group.is_empty() {
        "io.k8s.api.core".to_owned()
    } else {
        t.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{}.{}", t.version, t.kind)
}

fn gvk(t: &ResourceType) -> Value {
    json!({ "group": t.group, "version": t.version, "kind": t.kind })
}

/// The OpenAPI v3 document of one group-version: a PATCH (and GET/PUT) operation per kind that
/// announces `fieldValidation` (so kubectl leaves validation to the server) and, for custom
/// resources, their full schemas (for `kubectl explain`).
pub fn openapi_v3(types: &[Arc<ResourceType>], group: &str, version: &str) -> Option<Value> {
    let mine: Vec<&Arc<ResourceType>> = types
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if mine.is_empty() {
        return None;
    }
    let mut paths = BTreeMap::new();
    let mut schemas = BTreeMap::new();
    schemas.insert(
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".to_owned(),
        json!({ "type": "object", "description": "Standard object metadata: name, namespace, \
                labels, annotations, owner references, finalizers and server-set fields." }),
    );
    let query = |name: &str, description: &str| {
        json!({ "name": name, "in": "query", "description": description,
                "schema": { "type": "string", "uniqueItems": true } })
    };
    for t in mine {
        let name = schema_name(t);
        let reference = json!({ "$ref": format!("#/components/schemas/{name}") });
        let response = json!({ "200": { "description": "OK", "content": {
            "application/json": { "schema": reference } } } });
        let operation = |action: &str| {
            json!({
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk(t),
                "parameters": [
                    query("fieldValidation", "Ignore, Warn or Strict handling of unknown fields"),
                    query("fieldManager", "name of the actor making the change"),
                    query("dryRun", "All: validate without persisting"),
                ],
                "responses": response,
            })
        };
        let base = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let item_path = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", t.resource)
        } else {
            format!("{base}/{}/{{name}}", t.resource)
        };
        paths.insert(
            item_path,
            json!({ "get": operation("get"), "put": operation("put"),
                    "patch": operation("patch"), "delete": operation("delete") }),
        );
        let mut schema = match &t.openapi {
            Some(props) => serde_json::to_value(props).unwrap_or_else(|_| json!({})),
            None => json!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true,
                            "description": format!("{} ({})", t.kind, t.api_version()) }),
        };
        if schema.get("properties").is_none() {
            schema["properties"] = json!({});
        }
        schema["properties"]["apiVersion"] = json!({ "type": "string",
            "description": "APIVersion defines the versioned schema of this representation of an object." });
        schema["properties"]["kind"] = json!({ "type": "string",
            "description": "Kind is a string value representing the REST resource this object represents." });
        schema["properties"]["metadata"] = json!({ "allOf": [{ "$ref":
            "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta" }],
            "description": "Standard object's metadata." });
        schema["x-kubernetes-group-version-kind"] = json!([gvk(t)]);
        schemas.insert(name, schema);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes", "version": format!("v1.{KUBERNETES_MINOR}.0") },
        "paths": paths,
        "components": { "schemas": schemas },
    }))
}

/// The OpenAPI v3 index: one entry per group-version, with a hash that changes with the
/// document so clients refresh their caches.
pub fn openapi_v3_index(types: &[Arc<ResourceType>]) -> Value {
    let mut paths = BTreeMap::new();
    for (g, versions) in groups(types) {
        for v in versions {
            let key = if g.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{g}/{v}")
            };
            let doc = openapi_v3(types, &g, &v).unwrap_or(Value::Null);
            let mut h = std::collections::hash_map::DefaultHasher::new();
            doc.to_string().hash(&mut h);
            paths.insert(
                key.clone(),
                json!({ "serverRelativeURL": format!("/openapi/v3/{key}?hash={:016X}", h.finish()) }),
            );
        }
    }
    json!({ "paths": paths })
}

/// The content type `/openapi/v2` answers with (its body is empty: clients fall back to v3).
pub const OPENAPI_V2_CONTENT_TYPE: &str =
    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use crate::registry::types_of_crd;
    use kube::CustomResourceExt;

    fn types() -> Vec<Arc<ResourceType>> {
        let registry = Registry::new();
        let crd = sedna_api::joint_inference::JointInferenceService::crd();
        registry.put_crd(
            "jointinferenceservices.sedna.io",
            types_of_crd(&crd).unwrap(),
        );
        registry.all()
    }

    #[test]
    fn legacy_discovery_lists_groups_and_resources_with_short_names() {
        let types = types();
        let groups = group_list(&types);
        let names: Vec<&str> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"sedna.io") && names.contains(&"coordination.k8s.io"));
        let core = resource_list(&types, "", "v1").unwrap();
        let cm = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "configmaps")
            .unwrap();
        assert_eq!(cm["shortNames"], json!(["cm"]));
        let ji = resource_list(&types, "sedna.io", "v1alpha1").unwrap();
        assert_eq!(ji["resources"][1]["name"], "jointinferenceservices/status");
        assert!(resource_list(&types, "nope", "v1").is_none());
    }

    #[test]
    fn aggregated_discovery_separates_core_from_groups() {
        let types = types();
        let core = aggregated(&types, true, "v2");
        assert_eq!(core["items"].as_array().unwrap().len(), 1);
        assert_eq!(core["items"][0]["metadata"]["name"], "");
        let apis = aggregated(&types, false, "v2");
        let sedna = apis["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == "sedna.io")
            .unwrap();
        let r = &sedna["versions"][0]["resources"][0];
        assert_eq!(r["shortNames"], json!(["ji"]));
        assert_eq!(r["categories"], json!(["sedna"]));
        assert_eq!(r["subresources"][0]["subresource"], "status");
    }

    #[test]
    fn openapi_announces_field_validation_and_carries_crd_schemas() {
        let types = types();
        let doc = openapi_v3(&types, "sedna.io", "v1alpha1").unwrap();
        let path = &doc["paths"]["/apis/sedna.io/v1alpha1/namespaces/{namespace}/jointinferenceservices/{name}"];
        assert_eq!(
            path["patch"]["x-kubernetes-group-version-kind"]["kind"],
            "JointInferenceService"
        );
        assert_eq!(path["patch"]["parameters"][0]["name"], "fieldValidation");
        let schema = &doc["components"]["schemas"]["io.sedna.v1alpha1.JointInferenceService"];
        assert!(schema["properties"]["spec"]["properties"]["edgeWorker"].is_object());
        let index = openapi_v3_index(&types);
        assert!(
            index["paths"]["apis/sedna.io/v1alpha1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/apis/sedna.io/v1alpha1?hash=")
        );
        assert!(index["paths"]["api/v1"].is_object());
    }
}
