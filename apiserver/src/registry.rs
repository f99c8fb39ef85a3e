//! The resource types the server serves: the built-in kinds, and one type per served version
//! of every established CustomResourceDefinition.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, JSONSchemaProps,
};
use sedna_api::schema::StructuralSchema;

/// A printer column: a header and a JSONPath into the object.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    /// Header.
    pub name: String,
    /// `string`, `integer`, `number`, `boolean` or `date`.
    pub type_: String,
    /// Where the value comes from, e.g. `.status.phase`.
    pub json_path: String,
    /// Shown only with `-o wide` when above 0.
    pub priority: i32,
    /// Column description.
    pub description: String,
}

/// One resource the server serves.
#[derive(Clone, Debug)]
pub struct ResourceType {
    /// API group (`""` for the core group).
    pub group: String,
    /// Version.
    pub version: String,
    /// Plural resource name in URLs.
    pub resource: String,
    /// Singular name.
    pub singular: String,
    /// Kind.
    pub kind: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Short names for kubectl.
    pub short_names: Vec<String>,
    /// Categories (`kubectl get all`, `kubectl get sedna`).
    pub categories: Vec<String>,
    /// Whether the status subresource exists.
    pub status_subresource: bool,
    /// Group of the storage key (differs when a kind is served in two groups: Events).
    pub storage_group: String,
    /// For custom resources: the validation schema of this version.
    pub schema: Option<Arc<StructuralSchema>>,
    /// For custom resources: the raw OpenAPI schema (for `/openapi/v3` and `kubectl explain`).
    pub openapi: Option<JSONSchemaProps>,
    /// For custom resources: `additionalPrinterColumns`.
    pub columns: Vec<Column>,
    /// For custom resources: field paths usable in field selectors.
    pub selectable_fields: Vec<String>,
    /// Whether the type comes from a CustomResourceDefinition.
    pub custom: bool,
    /// The `scale` subresource, when served.
    pub scale: Option<ScalePaths>,
}

/// Where the `scale` subresource reads and writes (JSON paths such as `.spec.replicas`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalePaths {
    /// The desired replicas.
    pub spec_replicas: String,
    /// The observed replicas.
    pub status_replicas: String,
    /// A string field holding the label selector (custom resources); `None`: the object's
    /// `spec.selector` (a LabelSelector, as apps/v1 kinds have).
    pub label_selector: Option<String>,
}

impl ScalePaths {
    fn replicas() -> Self {
        Self {
            spec_replicas: ".spec.replicas".into(),
            status_replicas: ".status.replicas".into(),
            label_selector: None,
        }
    }
}

impl ResourceType {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether `api_version` is this type's [`api_version`](Self::api_version), compared
    /// without building it.
    pub fn has_api_version(&self, api_version: &str) -> bool {
        if self.group.is_empty() {
            return api_version == self.version;
        }
        api_version
            .strip_prefix(self.group.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            == Some(self.version.as_str())
    }

    /// Key prefix of this resource's objects in `namespace` (all namespaces when `None`).
    pub fn key_prefix(&self, namespace: Option<&str>) -> String {
        let group = if self.storage_group.is_empty() {
            "core"
        } else {
            &self.storage_group
        };
        match namespace {
            Some(ns) if self.namespaced => format!("{group}/{}/{ns}/", self.resource),
            _ => format!("{group}/{}/", self.resource),
        }
    }

    /// Whether this is `authorization.k8s.io` SelfSubjectAccessReview, which is answered and
    /// never stored.
    pub fn is_access_review(&self) -> bool {
        self.group == "authorization.k8s.io" && self.resource == "selfsubjectaccessreviews"
    }

    /// Storage key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        let ns = if self.namespaced {
            namespace.unwrap_or("")
        } else {
            ""
        };
        let group = if self.storage_group.is_empty() {
            "core"
        } else {
            &self.storage_group
        };
        format!("{group}/{}/{ns}/{name}", self.resource)
    }

    /// The verbs this resource supports, for discovery.
    pub fn verbs(&self) -> Vec<&'static str> {
        if self.is_access_review() {
            return vec!["create"];
        }
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

fn builtin(
    group: &str,
    version: &str,
    resource: &str,
    kind: &str,
    namespaced: bool,
    short_names: &[&str],
    status: bool,
) -> ResourceType {
    ResourceType {
        group: group.to_owned(),
        version: version.to_owned(),
        resource: resource.to_owned(),
        singular: kind.to_lowercase(),
        kind: kind.to_owned(),
        namespaced,
        short_names: short_names.iter().map(|s| (*s).to_owned()).collect(),
        categories: vec![],
        status_subresource: status,
        storage_group: group.to_owned(),
        schema: None,
        openapi: None,
        columns: vec![],
        selectable_fields: vec![],
        custom: false,
        scale: None,
    }
}

const RBAC: &str = crate::authz::RBAC_GROUP;

/// The built-in kinds.
pub fn builtins() -> Vec<ResourceType> {
    let mut pods = builtin("", "v1", "pods", "Pod", true, &["po"], true);
    pods.categories = vec!["all".into()];
    let mut services = builtin("", "v1", "services", "Service", true, &["svc"], true);
    services.categories = vec!["all".into()];
    let mut events_v1 = builtin(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        true,
        &["ev"],
        false,
    );
    events_v1.storage_group = String::new();
    let mut deployments = builtin(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
        true,
    );
    let mut replicasets = builtin(
        "apps",
        "v1",
        "replicasets",
        "ReplicaSet",
        true,
        &["rs"],
        true,
    );
    let mut daemonsets = builtin("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"], true);
    let mut jobs = builtin("batch", "v1", "jobs", "Job", true, &[], true);
    for t in [
        &mut deployments,
        &mut replicasets,
        &mut daemonsets,
        &mut jobs,
    ] {
        t.categories = vec!["all".into()];
    }
    deployments.scale = Some(ScalePaths::replicas());
    replicasets.scale = Some(ScalePaths::replicas());
    vec![
        builtin("", "v1", "namespaces", "Namespace", false, &["ns"], true),
        builtin("", "v1", "nodes", "Node", false, &["no"], true),
        pods,
        services,
        builtin("", "v1", "configmaps", "ConfigMap", true, &["cm"], false),
        builtin("", "v1", "secrets", "Secret", true, &[], false),
        builtin(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
        ),
        builtin("", "v1", "events", "Event", true, &["ev"], false),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            false,
        ),
        events_v1,
        builtin(
            "apiregistration.k8s.io",
            "v1",
            "apiservices",
            "APIService",
            false,
            &[],
            true,
        ),
        deployments,
        replicasets,
        daemonsets,
        jobs,
        builtin(
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
            "SelfSubjectAccessReview",
            false,
            &[],
            false,
        ),
        builtin(RBAC, "v1", "roles", "Role", true, &[], false),
        builtin(RBAC, "v1", "rolebindings", "RoleBinding", true, &[], false),
        builtin(RBAC, "v1", "clusterroles", "ClusterRole", false, &[], false),
        builtin(
            RBAC,
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
            false,
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
        ),
    ]
}

/// Why a CRD cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// A version's schema is not structural or has a bad pattern.
    #[error("spec.versions[{index}].schema.openAPIV3Schema: {message}")]
    Schema {
        /// Index of the version.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// Missing or inconsistent names.
    #[error("{0}")]
    Names(String),
}

/// The types a CRD defines, one per served version.
pub fn types_of_crd(crd: &CustomResourceDefinition) -> Result<Vec<ResourceType>, CrdError> {
    let spec = &crd.spec;
    let expected = format!("{}.{}", spec.names.plural, spec.group);
    if crd.metadata.name.as_deref() != Some(expected.as_str()) {
        return Err(CrdError::Names(format!(
            "metadata.name: Invalid value: {:?}: must be spec.names.plural+\".\"+spec.group",
            crd.metadata.name.as_deref().unwrap_or_default()
        )));
    }
    let mut out = Vec::new();
    for (index, version) in spec.versions.iter().enumerate() {
        if !version.served {
            continue;
        }
        let openapi = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.clone());
        let schema = match &openapi {
            Some(props) => Some(Arc::new(StructuralSchema::new(props.clone()).map_err(
                |e| CrdError::Schema {
                    index,
                    message: e.to_string(),
                },
            )?)),
            None => None,
        };
        let columns = version
            .additional_printer_columns
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(column)
            .collect();
        out.push(ResourceType {
            group: spec.group.clone(),
            version: version.name.clone(),
            resource: spec.names.plural.clone(),
            singular: spec
                .names
                .singular
                .clone()
                .unwrap_or_else(|| spec.names.kind.to_lowercase()),
            kind: spec.names.kind.clone(),
            namespaced: spec.scope == "Namespaced",
            short_names: spec.names.short_names.clone().unwrap_or_default(),
            categories: spec.names.categories.clone().unwrap_or_default(),
            status_subresource: version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()),
            storage_group: spec.group.clone(),
            schema,
            openapi,
            columns,
            selectable_fields: version
                .selectable_fields
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|f| f.json_path.trim_start_matches('.').to_owned())
                .collect(),
            custom: true,
            scale: version
                .subresources
                .as_ref()
                .and_then(|s| s.scale.as_ref())
                .map(|s| ScalePaths {
                    spec_replicas: s.spec_replicas_path.clone(),
                    status_replicas: s.status_replicas_path.clone(),
                    label_selector: s.label_selector_path.clone(),
                }),
        });
    }
    Ok(out)
}

fn column(c: &CustomResourceColumnDefinition) -> Column {
    Column {
        name: c.name.clone(),
        type_: c.type_.clone(),
        json_path: c.json_path.clone(),
        priority: c.priority.unwrap_or(0),
        description: c.description.clone().unwrap_or_default(),
    }
}

/// Every served type, looked up by group, version and resource.
#[derive(Debug, Default)]
pub struct Registry {
    builtin: Vec<Arc<ResourceType>>,
    /// CRD name → its types.
    custom: RwLock<BTreeMap<String, Vec<Arc<ResourceType>>>>,
}

impl Registry {
    /// A registry with the built-in kinds.
    pub fn new() -> Self {
        Self {
            builtin: builtins().into_iter().map(Arc::new).collect(),
            custom: RwLock::default(),
        }
    }

    /// Every type, built-ins first, then custom types by CRD name.
    pub fn all(&self) -> Vec<Arc<ResourceType>> {
        let custom = self
            .custom
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.builtin
            .iter()
            .cloned()
            .chain(custom.values().flatten().cloned())
            .collect()
    }

    /// The first type (built-ins first) that `matches`, found without copying the list: it
    /// runs on every request and, in the garbage collector, for every object.
    fn find(&self, matches: impl Fn(&ResourceType) -> bool) -> Option<Arc<ResourceType>> {
        if let Some(t) = self.builtin.iter().find(|t| matches(t)) {
            return Some(t.clone());
        }
        let custom = self
            .custom
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        custom.values().flatten().find(|t| matches(t)).cloned()
    }

    /// The type serving `group/version/resource`.
    pub fn lookup(&self, group: &str, version: &str, resource: &str) -> Option<Arc<ResourceType>> {
        self.find(|t| t.group == group && t.version == version && t.resource == resource)
    }

    /// The type serving `apiVersion` and `kind`.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceType>> {
        self.find(|t| t.kind == kind && t.has_api_version(api_version))
    }

    /// Serves (or re-serves) the types of a CRD.
    pub fn put_crd(&self, name: &str, types: Vec<ResourceType>) {
        let mut custom = self
            .custom
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        custom.insert(name.to_owned(), types.into_iter().map(Arc::new).collect());
    }

    /// Stops serving a CRD's types.
    pub fn remove_crd(&self, name: &str) {
        let mut custom = self
            .custom
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        custom.remove(name);
    }

    /// Whether another CRD or a built-in already uses the plural, kind or a short name of
    /// `candidate` in its group.
    pub fn name_clash(&self, crd_name: &str, candidate: &ResourceType) -> Option<String> {
        let custom = self
            .custom
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let others = self.builtin.iter().chain(
            custom
                .iter()
                .filter(|(n, _)| n.as_str() != crd_name)
                .flat_map(|(_, v)| v.iter()),
        );
        for other in others {
            if other.group == candidate.group && other.resource == candidate.resource {
                return Some(format!("plural {:?} is already in use", candidate.resource));
            }
            if other.group == candidate.group && other.kind == candidate.kind {
                return Some(format!("kind {:?} is already in use", candidate.kind));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn every_platform_crd_becomes_a_served_type_with_its_schema_and_columns() {
        for crd in sedna_api::crds() {
            let types = types_of_crd(&crd).unwrap();
            assert_eq!(types.len(), 1);
            let t = &types[0];
            assert!(t.schema.is_some());
            assert!(t.status_subresource);
            assert!(t.columns.iter().any(|c| c.name == "Age"));
        }
        let ji = types_of_crd(&sedna_api::joint_inference::JointInferenceService::crd()).unwrap();
        assert_eq!(ji[0].short_names, ["ji"]);
        assert_eq!(
            ji[0].key(Some("default"), "x"),
            "sedna.io/jointinferenceservices/default/x"
        );
    }

    #[test]
    fn events_are_served_in_two_groups_from_one_storage() {
        let registry = Registry::new();
        let core = registry.lookup("", "v1", "events").unwrap();
        let new = registry.lookup("events.k8s.io", "v1", "events").unwrap();
        assert_eq!(core.key(Some("ns"), "e"), new.key(Some("ns"), "e"));
        assert_eq!(core.key_prefix(Some("ns")), "core/events/ns/");
    }

    #[test]
    fn kinds_are_found_by_their_exact_api_version_built_in_or_custom() {
        let registry = Registry::new();
        let by = |v: &str, k: &str| registry.by_kind(v, k).map(|t| t.resource.clone());
        assert_eq!(by("v1", "Pod").as_deref(), Some("pods"));
        assert_eq!(by("apps/v1", "Deployment").as_deref(), Some("deployments"));
        assert_eq!(
            by("coordination.k8s.io/v1", "Lease").as_deref(),
            Some("leases")
        );
        for wrong in [
            "apps/v1",
            "v1beta1",
            "/v1",
            "coordination.k8s.io",
            "coordination.k8s.iov1",
        ] {
            assert_eq!(by(wrong, "Pod"), None, "{wrong}");
        }
        assert_eq!(by("coordination.k8s.io/v1beta1", "Lease"), None);
        assert_eq!(by("sedna.io/v1alpha1", "Model"), None, "not served yet");
        let crd = sedna_api::model::Model::crd();
        registry.put_crd(
            crd.metadata.name.as_deref().unwrap(),
            types_of_crd(&crd).unwrap(),
        );
        assert_eq!(by("sedna.io/v1alpha1", "Model").as_deref(), Some("models"));
        assert_eq!(
            registry
                .lookup("sedna.io", "v1alpha1", "models")
                .map(|t| t.kind.clone())
                .as_deref(),
            Some("Model")
        );
    }

    #[test]
    fn a_crd_whose_name_does_not_match_its_names_is_refused() {
        let mut crd = sedna_api::model::Model::crd();
        crd.metadata.name = Some("wrong.sedna.io".into());
        assert!(matches!(types_of_crd(&crd), Err(CrdError::Names(_))));
    }
}
