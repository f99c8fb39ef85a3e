//! Authorization: what an authenticated user may do.
//!
//! Every resource request is described by Kubernetes' authorization [`Attributes`] (verb,
//! API group, resource, subresource, namespace, name) and put to the server's
//! [`Authorizer`]. The default one is [`rbac`]: the `rbac.authorization.k8s.io/v1` Roles,
//! ClusterRoles, RoleBindings and ClusterRoleBindings stored in the server, matched against
//! the user's name and groups from the token file (`token,user,uid,"group1,group2"`).
//! Members of `system:masters` may do everything (as in Kubernetes); everyone authenticated
//! may read discovery and OpenAPI documents. The server creates Kubernetes' four user-facing
//! ClusterRoles at start when they are missing: `cluster-admin`, `admin`, `edit` and `view`.
//!
//! Escalation is not possible through RBAC objects: creating, changing or deleting a Role,
//! ClusterRole or binding needs every verb on every resource in that scope (a namespace's
//! `admin`, or `cluster-admin`), so nobody can grant rights they do not hold.
//!
//! ```
//! use sedna_apiserver::authz::{Attributes, rule_allows};
//! let rule = serde_json::json!({ "apiGroups": [""], "resources": ["pods", "pods/log"],
//!                                "verbs": ["get", "list", "watch"] });
//! let get_pod = Attributes::new("get", "", "pods").in_namespace("default").named("web");
//! assert!(rule_allows(&rule, &get_pod));
//! assert!(!rule_allows(&rule, &Attributes::new("delete", "", "pods").in_namespace("default")));
//! ```

use std::sync::Arc;

use serde_json::{Value, json};

use crate::pki::User;
use crate::store::Store;

/// The group whose members may do everything.
pub const MASTERS: &str = "system:masters";

/// The RBAC API group.
pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// What a request asks to do, in Kubernetes' terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes<'a> {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or `deletecollection`.
    pub verb: &'a str,
    /// API group (`""` for core).
    pub group: &'a str,
    /// Plural resource.
    pub resource: &'a str,
    /// Subresource (`status`…).
    pub subresource: Option<&'a str>,
    /// Namespace (absent for cluster-scoped objects and requests across namespaces).
    pub namespace: Option<&'a str>,
    /// Object name (absent for creates and collections).
    pub name: Option<&'a str>,
    /// The request's field selector (lists and watches).
    pub field_selector: Option<&'a str>,
}

impl<'a> Attributes<'a> {
    /// A request for `verb` on `resource` in `group`, across the cluster.
    pub fn new(verb: &'a str, group: &'a str, resource: &'a str) -> Self {
        Self {
            verb,
            group,
            resource,
            ..Self::default()
        }
    }

    /// The same request in `namespace`.
    pub fn in_namespace(mut self, namespace: &'a str) -> Self {
        self.namespace = Some(namespace);
        self
    }

    /// The same request for the object `name`.
    pub fn named(mut self, name: &'a str) -> Self {
        self.name = Some(name);
        self
    }

    /// The same request on a subresource.
    pub fn on_subresource(mut self, subresource: &'a str) -> Self {
        self.subresource = Some(subresource);
        self
    }

    /// The one object a list or watch is restricted to by `metadata.name=<name>` in its field
    /// selector (how clients watch a single object), if any.
    pub fn selected_name(&self) -> Option<&'a str> {
        self.field_selector?.split(',').find_map(|term| {
            let term = term.trim();
            let value = term
                .strip_prefix("metadata.name==")
                .or_else(|| term.strip_prefix("metadata.name="))?;
            (!value.is_empty()).then_some(value)
        })
    }

    /// The name the request concerns: its own, or the one its field selector picks.
    pub fn object_name(&self) -> Option<&'a str> {
        self.name.or_else(|| self.selected_name())
    }

    /// Whether the request changes something.
    pub fn is_write(&self) -> bool {
        !matches!(self.verb, "get" | "list" | "watch")
    }

    /// Kubernetes' refusal message: `pods "web" is forbidden: User "alice" cannot delete
    /// resource "pods" in API group "" in the namespace "default"`, with `reason` appended.
    pub fn forbidden(&self, user: &str, reason: &str) -> String {
        let resource = match self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.to_owned(),
        };
        let qualified = if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let object = match self.name {
            Some(name) => format!("{qualified} {name:?}"),
            None => qualified,
        };
        let scope = match self.namespace {
            Some(ns) => format!("in the namespace {ns:?}"),
            None => "at the cluster scope".to_owned(),
        };
        let mut message = format!(
            "{object} is forbidden: User {user:?} cannot {} resource {resource:?} in API group {:?} {scope}",
            self.verb, self.group
        );
        if !reason.is_empty() {
            message.push_str(": ");
            message.push_str(reason);
        }
        message
    }
}

/// The decision function of an [`Authorizer`]; `Err` carries the message for the client.
pub type AuthorizeFn = dyn Fn(&User, &Attributes<'_>, &Store) -> Result<(), String> + Send + Sync;

/// Decides whether a user may make a request; a refusal is answered 403 Forbidden.
#[derive(Clone)]
pub struct Authorizer(pub Arc<AuthorizeFn>);

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorizer")
    }
}

/// Maps a bearer token the token file does not hold to a user (tokens minted at run time,
/// such as the edge agent's per-pod tokens), or `None` to refuse it.
pub type AuthenticateFn = dyn Fn(&str) -> Option<User> + Send + Sync;

/// Extra bearer-token authentication, consulted after the token file.
#[derive(Clone)]
pub struct Authenticator(pub Arc<AuthenticateFn>);

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator")
    }
}

fn strings(rule: &Value, field: &str) -> Vec<String> {
    crate::meta::strings(rule.get(field))
}

/// Whether one RBAC `PolicyRule` allows a request (verbs, apiGroups, resources with
/// `resource/subresource` and `*` forms, resourceNames).
pub fn rule_allows(rule: &Value, a: &Attributes<'_>) -> bool {
    let has =
        |field: &str, value: &str| strings(rule, field).iter().any(|v| v == "*" || v == value);
    let resource_ok = strings(rule, "resources")
        .iter()
        .any(|r| match a.subresource {
            None => r == "*" || r == a.resource,
            Some(sub) => {
                r == "*"
                    || *r == format!("{}/{sub}", a.resource)
                    || *r == format!("*/{sub}")
                    || *r == format!("{}/*", a.resource)
            }
        });
    let names = strings(rule, "resourceNames");
    let name_ok = names.is_empty() || a.name.is_some_and(|n| names.iter().any(|m| m == n));
    has("verbs", a.verb) && has("apiGroups", a.group) && resource_ok && name_ok
}

fn subject_matches(binding: &Value, user: &User) -> bool {
    binding
        .get("subjects")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|s| {
            let name = s.get("name").and_then(Value::as_str).unwrap_or_default();
            match s.get("kind").and_then(Value::as_str) {
                Some("User") => name == user.name,
                Some("ServiceAccount") => {
                    let ns = s
                        .get("namespace")
                        .or_else(|| binding.pointer("/metadata/namespace"))
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    user.name == format!("system:serviceaccount:{ns}:{name}")
                }
                Some("Group") => {
                    name == "system:authenticated" || user.groups.iter().any(|g| g == name)
                }
                _ => false,
            }
        })
}

/// The rules a binding grants (its role's), empty when the role does not exist.
fn granted_rules(binding: &Value, namespace: Option<&str>, store: &Store) -> Vec<Value> {
    let role = binding.get("roleRef").unwrap_or(&Value::Null);
    let name = role.get("name").and_then(Value::as_str).unwrap_or_default();
    let key = match (role.get("kind").and_then(Value::as_str), namespace) {
        (Some("ClusterRole"), _) => format!("{RBAC_GROUP}/clusterroles//{name}"),
        (Some("Role"), Some(ns)) => format!("{RBAC_GROUP}/roles/{ns}/{name}"),
        _ => return Vec::new(),
    };
    store
        .get(&key)
        .and_then(|r| r.value.get("rules").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// Whether the user's bindings allow the request.
fn bindings_allow(user: &User, a: &Attributes<'_>, store: &Store) -> bool {
    let cluster = store.list(&format!("{RBAC_GROUP}/clusterrolebindings/")).0;
    let allowed_by = |binding: &Value, ns: Option<&str>| {
        subject_matches(binding, user)
            && granted_rules(binding, ns, store)
                .iter()
                .any(|r| rule_allows(r, a))
    };
    if cluster.iter().any(|b| allowed_by(&b.value, None)) {
        return true;
    }
    match a.namespace {
        Some(ns) => store
            .list(&format!("{RBAC_GROUP}/rolebindings/{ns}/"))
            .0
            .iter()
            .any(|b| allowed_by(&b.value, Some(ns))),
        None => false,
    }
}

/// Kubernetes RBAC over the stored Roles and bindings (the default authorizer).
pub fn rbac(user: &User, a: &Attributes<'_>, store: &Store) -> Result<(), String> {
    if user.groups.iter().any(|g| g == MASTERS) {
        return Ok(());
    }
    if !bindings_allow(user, a, store) {
        return Err(a.forbidden(&user.name, ""));
    }
    if a.group == RBAC_GROUP && a.is_write() {
        // No escalation: only who holds everything in this scope may change who holds what.
        let everything = Attributes {
            verb: "*",
            group: "*",
            resource: "*",
            subresource: None,
            namespace: a.namespace,
            name: None,
            field_selector: None,
        };
        if !bindings_allow(user, &everything, store) {
            return Err(a.forbidden(
                &user.name,
                "changing RBAC objects needs every verb on every resource in this scope",
            ));
        }
    }
    Ok(())
}

/// The RBAC authorizer.
pub fn rbac_authorizer() -> Authorizer {
    Authorizer(Arc::new(rbac))
}

const READ: [&str; 3] = ["get", "list", "watch"];
const WRITE: [&str; 8] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// Kubernetes' user-facing ClusterRoles, as this server defines them.
pub fn default_cluster_roles() -> Vec<Value> {
    let role = |name: &str, rules: Value| {
        json!({
            "apiVersion": format!("{RBAC_GROUP}/v1"), "kind": "ClusterRole",
            "metadata": { "name": name,
                          "labels": { "kubernetes.io/bootstrapping": "rbac-defaults" } },
            "rules": rules,
        })
    };
    // Everything an application team uses, except RBAC itself.
    let workloads = |verbs: &[&str], secrets: bool| {
        let mut core = vec![
            "pods",
            "pods/log",
            "pods/status",
            "services",
            "configmaps",
            "events",
            "serviceaccounts",
            "persistentvolumeclaims",
        ];
        if secrets {
            // Editors also reach into pods, as Kubernetes' `edit` role lets them.
            core.extend(["secrets", "pods/exec", "pods/attach", "pods/portforward"]);
        }
        json!([
            { "apiGroups": [""], "resources": core, "verbs": verbs },
            { "apiGroups": ["sedna.io", "devices.sedna.io", "apps", "batch"],
              "resources": ["*"], "verbs": verbs },
            { "apiGroups": ["events.k8s.io", "coordination.k8s.io"],
              "resources": ["*"], "verbs": verbs },
            { "apiGroups": [""], "resources": ["namespaces"], "verbs": READ },
        ])
    };
    vec![
        role(
            "cluster-admin",
            json!([{ "apiGroups": ["*"], "resources": ["*"], "verbs": ["*"] }]),
        ),
        role(
            "admin",
            json!([{ "apiGroups": ["*"], "resources": ["*"], "verbs": ["*"] }]),
        ),
        role("edit", workloads(&WRITE, true)),
        role("view", workloads(&READ, false)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Mutation, Precondition, StoreOptions};

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.into(),
            uid: name.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    async fn store_with(objects: &[(&str, Value)]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db"), StoreOptions::default()).unwrap();
        for (key, value) in objects {
            store
                .write(
                    (*key).to_owned(),
                    Precondition::Absent,
                    Mutation::Put(value.clone()),
                )
                .await
                .unwrap();
        }
        (dir, store)
    }

    #[test]
    fn rules_match_verbs_groups_subresources_and_names() {
        let rule = json!({ "apiGroups": ["sedna.io"], "resources": ["models", "jobs/status"],
                           "verbs": ["get", "update"], "resourceNames": ["m1"] });
        let a = Attributes::new("get", "sedna.io", "models")
            .in_namespace("ns")
            .named("m1");
        assert!(rule_allows(&rule, &a));
        assert!(!rule_allows(&rule, &a.clone().named("m2")));
        assert!(!rule_allows(
            &rule,
            &Attributes::new("list", "sedna.io", "models")
        ));
        assert!(!rule_allows(&rule, &a.clone().on_subresource("status")));
        let status = Attributes::new("update", "sedna.io", "jobs")
            .named("m1")
            .on_subresource("status");
        assert!(rule_allows(&rule, &status));
        assert!(!rule_allows(
            &rule,
            &Attributes::new("update", "sedna.io", "jobs").named("m1")
        ));
        let any = json!({ "apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"] });
        assert!(rule_allows(&any, &status));
    }

    #[test]
    fn field_selectors_name_single_objects() {
        let mut a = Attributes::new("watch", "", "secrets");
        a.field_selector = Some("metadata.namespace=x, metadata.name=creds");
        assert_eq!(a.object_name(), Some("creds"));
        a.field_selector = Some("metadata.name!=creds");
        assert_eq!(a.object_name(), None);
        a.field_selector = Some("metadata.name==");
        assert_eq!(a.object_name(), None);
    }

    #[tokio::test]
    async fn bindings_grant_by_group_and_user_within_their_scope() {
        let roles = default_cluster_roles();
        let view = roles
            .iter()
            .find(|r| r["metadata"]["name"] == "view")
            .unwrap();
        let (_d, store) = store_with(&[
            ("rbac.authorization.k8s.io/clusterroles//view", view.clone()),
            (
                "rbac.authorization.k8s.io/clusterrolebindings//viewers",
                json!({ "roleRef": { "kind": "ClusterRole", "name": "view" },
                        "subjects": [{ "kind": "Group", "name": "viewers" }] }),
            ),
            (
                "rbac.authorization.k8s.io/roles/team-a/deployer",
                json!({ "rules": [{ "apiGroups": [""], "resources": ["configmaps"],
                                    "verbs": ["create", "delete"] }] }),
            ),
            (
                "rbac.authorization.k8s.io/rolebindings/team-a/bob-deploys",
                json!({ "roleRef": { "kind": "Role", "name": "deployer" },
                        "subjects": [{ "kind": "User", "name": "bob" }] }),
            ),
        ])
        .await;
        let viewer = user("alice", &["viewers"]);
        let list_pods = Attributes::new("list", "", "pods");
        assert!(rbac(&viewer, &list_pods, &store).is_ok());
        let delete = Attributes::new("delete", "", "pods")
            .in_namespace("default")
            .named("web");
        let refused = rbac(&viewer, &delete, &store).unwrap_err();
        assert_eq!(
            refused,
            "pods \"web\" is forbidden: User \"alice\" cannot delete resource \"pods\" in API \
             group \"\" in the namespace \"default\""
        );
        // view leaves Secrets out.
        assert!(
            rbac(
                &viewer,
                &Attributes::new("get", "", "secrets").in_namespace("default"),
                &store
            )
            .is_err()
        );
        let bob = user("bob", &[]);
        let create = Attributes::new("create", "", "configmaps").in_namespace("team-a");
        assert!(rbac(&bob, &create, &store).is_ok());
        assert!(rbac(&bob, &create.clone().in_namespace("team-b"), &store).is_err());
        assert!(rbac(&bob, &Attributes::new("create", "", "configmaps"), &store).is_err());
        assert!(rbac(&user("root", &[MASTERS]), &delete, &store).is_ok());
        assert!(rbac(&user("nobody", &[]), &list_pods, &store).is_err());
    }

    #[tokio::test]
    async fn rbac_objects_change_only_with_every_right_in_their_scope() {
        let (_d, store) = store_with(&[
            (
                "rbac.authorization.k8s.io/clusterroles//rbac-editor",
                json!({ "rules": [{ "apiGroups": ["rbac.authorization.k8s.io"],
                                    "resources": ["*"], "verbs": ["*"] }] }),
            ),
            (
                "rbac.authorization.k8s.io/clusterrolebindings//mallory",
                json!({ "roleRef": { "kind": "ClusterRole", "name": "rbac-editor" },
                        "subjects": [{ "kind": "User", "name": "mallory" }] }),
            ),
            (
                "rbac.authorization.k8s.io/clusterroles//admin",
                json!({ "rules": [{ "apiGroups": ["*"], "resources": ["*"], "verbs": ["*"] }] }),
            ),
            (
                "rbac.authorization.k8s.io/rolebindings/team-a/carol-admin",
                json!({ "roleRef": { "kind": "ClusterRole", "name": "admin" },
                        "subjects": [{ "kind": "User", "name": "carol" }] }),
            ),
        ])
        .await;
        let bind = Attributes::new("create", RBAC_GROUP, "clusterrolebindings");
        let refused = rbac(&user("mallory", &[]), &bind, &store).unwrap_err();
        assert!(refused.contains("needs every verb"), "{refused}");
        // A namespace admin manages RBAC in that namespace, and only there.
        let carol = user("carol", &[]);
        let in_a = Attributes::new("create", RBAC_GROUP, "rolebindings").in_namespace("team-a");
        assert!(rbac(&carol, &in_a, &store).is_ok());
        assert!(rbac(&carol, &in_a.clone().in_namespace("team-b"), &store).is_err());
        assert!(rbac(&carol, &bind, &store).is_err());
    }
}
