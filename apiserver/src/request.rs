//! Request parsing: the URL path into a resource request, the query string into options, and
//! the `Accept` header into the representation the client wants.

use std::collections::HashMap;

use crate::error::ApiError;

/// What a path asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/version`.
    Version,
    /// `/healthz`, `/livez`, `/readyz` (and their sub-paths).
    Health,
    /// `/api`.
    CoreGroup,
    /// `/apis`.
    Groups,
    /// `/api/v1` or `/apis/<group>/<version>`.
    GroupVersion {
        /// Group (`""` for core).
        group: String,
        /// Version.
        version: String,
    },
    /// `/apis/<group>`.
    Group {
        /// Group.
        group: String,
    },
    /// `/openapi/v2`.
    OpenApiV2,
    /// `/openapi/v3`.
    OpenApiV3Index,
    /// `/openapi/v3/api/v1` or `/openapi/v3/apis/<group>/<version>`.
    OpenApiV3 {
        /// Group.
        group: String,
        /// Version.
        version: String,
    },
    /// A resource, a collection or a subresource.
    Resource(ResourcePath),
}

/// The resource part of a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourcePath {
    /// Group (`""` for core).
    pub group: String,
    /// Version.
    pub version: String,
    /// Namespace from the path.
    pub namespace: Option<String>,
    /// Plural resource.
    pub resource: String,
    /// Object name; `None` for a collection.
    pub name: Option<String>,
    /// Subresource, e.g. `status`.
    pub subresource: Option<String>,
}

fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// Parses a request path.
pub fn route(path: &str) -> Result<Route, ApiError> {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode)
        .collect();
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let route = match s.as_slice() {
        ["version"] => Route::Version,
        ["healthz" | "livez" | "readyz", ..] => Route::Health,
        ["api"] => Route::CoreGroup,
        ["apis"] => Route::Groups,
        ["api", version] => Route::GroupVersion {
            group: String::new(),
            version: (*version).to_owned(),
        },
        ["apis", group] => Route::Group {
            group: (*group).to_owned(),
        },
        ["apis", group, version] => Route::GroupVersion {
            group: (*group).to_owned(),
            version: (*version).to_owned(),
        },
        ["openapi", "v2"] => Route::OpenApiV2,
        ["openapi", "v3"] => Route::OpenApiV3Index,
        ["openapi", "v3", "api", version] => Route::OpenApiV3 {
            group: String::new(),
            version: (*version).to_owned(),
        },
        ["openapi", "v3", "apis", group, version] => Route::OpenApiV3 {
            group: (*group).to_owned(),
            version: (*version).to_owned(),
        },
        ["api", version, rest @ ..] => {
            Route::Resource(resource_path(String::new(), version, rest)?)
        }
        ["apis", group, version, rest @ ..] => {
            Route::Resource(resource_path((*group).to_owned(), version, rest)?)
        }
        _ => return Err(ApiError::no_route()),
    };
    Ok(route)
}

fn resource_path(group: String, version: &str, rest: &[&str]) -> Result<ResourcePath, ApiError> {
    let own = |s: &&str| (*s).to_owned();
    let (namespace, resource, name, subresource) = match rest {
        // The namespaces resource itself: /namespaces/<name>[/status|/finalize].
        ["namespaces", name, sub @ ("status" | "finalize")] => {
            (None, "namespaces", Some(own(name)), Some(own(sub)))
        }
        ["namespaces"] => (None, "namespaces", None, None),
        ["namespaces", name] => (None, "namespaces", Some(own(name)), None),
        ["namespaces", ns, resource] => (Some(own(ns)), *resource, None, None),
        ["namespaces", ns, resource, name] => (Some(own(ns)), *resource, Some(own(name)), None),
        ["namespaces", ns, resource, name, sub] => {
            (Some(own(ns)), *resource, Some(own(name)), Some(own(sub)))
        }
        [resource] => (None, *resource, None, None),
        [resource, name] => (None, *resource, Some(own(name)), None),
        [resource, name, sub] => (None, *resource, Some(own(name)), Some(own(sub))),
        _ => return Err(ApiError::no_route()),
    };
    Ok(ResourcePath {
        group,
        version: version.to_owned(),
        namespace,
        resource: resource.to_owned(),
        name,
        subresource,
    })
}

/// Query parameters, with empty pairs skipped (kube-rs starts query strings with `?&`).
#[derive(Clone, Debug, Default)]
pub struct Query(HashMap<String, String>);

impl Query {
    /// Parses a query string.
    pub fn parse(query: Option<&str>) -> Self {
        let mut map = HashMap::new();
        for pair in query.unwrap_or_default().split('&') {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode(&k.replace('+', " "));
            let v = decode(&v.replace('+', " "));
            map.insert(k, v);
        }
        Self(map)
    }

    /// A parameter's value, if present and non-empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// A boolean parameter (`true`/`1`).
    pub fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }

    /// An integer parameter; a malformed value is a 400.
    pub fn number(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!("invalid value {v:?} for query parameter {name}"))
            }),
        }
    }

    /// Whether `dryRun=All` was asked.
    pub fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

/// The representation a client accepts for a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Representation {
    /// The object or list itself.
    Object,
    /// A `meta.k8s.io/v1` Table.
    Table,
    /// `PartialObjectMetadata` / `PartialObjectMetadataList`.
    PartialMetadata,
}

/// Picks the first representation of the `Accept` header that the server can produce.
pub fn negotiate(accept: Option<&str>) -> Representation {
    for option in accept.unwrap_or("application/json").split(',') {
        let params: Vec<&str> = option.split(';').map(str::trim).collect();
        let media = params.first().copied().unwrap_or_default();
        if !matches!(media, "application/json" | "*/*" | "application/*") {
            continue;
        }
        let param = |name: &str| {
            params
                .iter()
                .find_map(|p| p.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        };
        match (param("as"), param("g")) {
            (Some("Table"), Some("meta.k8s.io")) => return Representation::Table,
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("meta.k8s.io")) => {
                return Representation::PartialMetadata;
            }
            (Some(_), _) => continue,
            (None, _) => return Representation::Object,
        }
    }
    Representation::Object
}

/// Whether the `Accept` header asks for aggregated discovery (`as=APIGroupDiscoveryList`),
/// and in which version (`v2` or `v2beta1`).
pub fn aggregated_discovery(accept: Option<&str>) -> Option<&'static str> {
    for option in accept.unwrap_or_default().split(',') {
        let option = option.replace(' ', "");
        if option.contains("as=APIGroupDiscoveryList") && option.contains("g=apidiscovery.k8s.io") {
            if option.contains("v=v2beta1") {
                return Some("v2beta1");
            }
            if option.contains("v=v2") {
                return Some("v2");
            }
        }
        if option.starts_with("application/json") && !option.contains("as=") {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(path: &str) -> ResourcePath {
        match route(path).unwrap() {
            Route::Resource(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn paths_of_namespaced_and_cluster_resources() {
        let r =
            resource("/apis/sedna.io/v1alpha1/namespaces/default/jointinferenceservices/x/status");
        assert_eq!(r.group, "sedna.io");
        assert_eq!(r.namespace.as_deref(), Some("default"));
        assert_eq!(r.resource, "jointinferenceservices");
        assert_eq!(r.name.as_deref(), Some("x"));
        assert_eq!(r.subresource.as_deref(), Some("status"));

        let r = resource("/api/v1/nodes/edge-1");
        assert_eq!((r.namespace, r.resource.as_str()), (None, "nodes"));

        let r = resource("/api/v1/namespaces/kube-system");
        assert_eq!(r.resource, "namespaces");
        assert_eq!(r.name.as_deref(), Some("kube-system"));

        let r = resource("/api/v1/namespaces/ns1/status");
        assert_eq!(r.resource, "namespaces");
        assert_eq!(r.subresource.as_deref(), Some("status"));

        let r = resource("/api/v1/namespaces/ns1/pods");
        assert_eq!(
            (r.namespace.as_deref(), r.resource.as_str()),
            (Some("ns1"), "pods")
        );
    }

    #[test]
    fn discovery_and_openapi_paths() {
        assert_eq!(route("/api").unwrap(), Route::CoreGroup);
        assert_eq!(
            route("/openapi/v3/apis/sedna.io/v1alpha1").unwrap(),
            Route::OpenApiV3 {
                group: "sedna.io".into(),
                version: "v1alpha1".into()
            }
        );
        assert_eq!(route("/livez/ping").unwrap(), Route::Health);
        assert!(route("/nothing").is_err());
    }

    #[test]
    fn queries_skip_empty_pairs_and_decode_values() {
        let q = Query::parse(Some(
            "&watch=true&&labelSelector=app%3Dweb%2Ctier+in+%28a%29",
        ));
        assert!(q.flag("watch"));
        assert_eq!(q.get("labelSelector"), Some("app=web,tier in (a)"));
        assert_eq!(
            Query::parse(Some("limit=x"))
                .number("limit")
                .unwrap_err()
                .code,
            400
        );
    }

    #[test]
    fn accept_headers_pick_tables_and_metadata() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(Some(kubectl)), Representation::Table);
        assert_eq!(negotiate(Some("application/json")), Representation::Object);
        assert_eq!(
            negotiate(Some(
                "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
            )),
            Representation::PartialMetadata
        );
        assert_eq!(negotiate(None), Representation::Object);
        let discovery = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_discovery(Some(discovery)), Some("v2"));
        assert_eq!(aggregated_discovery(Some("application/json")), None);
    }
}
