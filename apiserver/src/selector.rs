//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!` not-exists) and field selectors
//! (`=`, `==`, `!=` on the fields each kind supports).

use serde_json::Value;

use crate::error::ApiError;
use crate::registry::ResourceType;

#[derive(Clone, Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelRequirement>);

/// Splits on commas outside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    /// Parses `app=web,tier in (a,b),!legacy`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |part: &str, why: &str| {
            ApiError::bad_request(format!("unable to parse requirement {part:?}: {why}"))
        };
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let req = if let Some(key) = part.strip_prefix('!') {
                LabelRequirement::NotExists(key.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("!=") {
                LabelRequirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once("==") {
                LabelRequirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = part.split_once('=') {
                LabelRequirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, rest)) = part.split_once(" notin ") {
                LabelRequirement::NotIn(
                    k.trim().to_owned(),
                    set_values(rest)
                        .ok_or_else(|| bad(part, "expected a parenthesised list of values"))?,
                )
            } else if let Some((k, rest)) = part.split_once(" in ") {
                LabelRequirement::In(
                    k.trim().to_owned(),
                    set_values(rest)
                        .ok_or_else(|| bad(part, "expected a parenthesised list of values"))?,
                )
            } else {
                LabelRequirement::Exists(part.to_owned())
            };
            let (key, values): (&str, Vec<&str>) = match &req {
                LabelRequirement::Equals(k, v) | LabelRequirement::NotEquals(k, v) => {
                    (k, vec![v.as_str()])
                }
                LabelRequirement::In(k, vs) | LabelRequirement::NotIn(k, vs) => {
                    (k, vs.iter().map(String::as_str).collect())
                }
                LabelRequirement::Exists(k) | LabelRequirement::NotExists(k) => (k, vec![]),
            };
            if !valid_key(key) {
                return Err(bad(part, "invalid label key"));
            }
            if values.iter().any(|v| !valid_value(v)) {
                return Err(bad(part, "invalid label value"));
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Whether an object's labels satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::NotExists(k) => get(k).is_none(),
        })
    }

    /// Whether the selector is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn set_values(rest: &str) -> Option<Vec<String>> {
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

/// A parsed field selector: (field, `=` or `!=`, value, the field's value when absent).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String, &'static str)>);

/// What a built-in field reads as when the object lacks it: Kubernetes selects on its typed
/// objects, where an absent boolean is `false` (`spec.unschedulable==false` matches a node
/// without the field).
fn zero_value(t: &ResourceType, field: &str) -> &'static str {
    match (t.group.as_str(), t.resource.as_str(), field) {
        ("", "nodes", "spec.unschedulable") | ("", "pods", "spec.hostNetwork") => "false",
        _ => "",
    }
}

/// Field selector paths each built-in kind supports beyond `metadata.name` and
/// `metadata.namespace`.
fn builtin_fields(t: &ResourceType) -> &'static [&'static str] {
    match (t.group.as_str(), t.resource.as_str()) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
        ("", "namespaces") => &["status.phase"],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "secrets") => &["type"],
        _ => &[],
    }
}

impl FieldSelector {
    /// Parses `spec.nodeName=n1,status.phase!=Succeeded` for resource `t`.
    pub fn parse(s: &str, t: &ResourceType) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector {part:?}: expected field=value or field!=value"
                )));
            };
            let field = field.trim();
            let supported = matches!(field, "metadata.name" | "metadata.namespace")
                || builtin_fields(t).contains(&field)
                || t.selectable_fields.iter().any(|f| f == field);
            if !supported {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push((
                field.to_owned(),
                equal,
                value.trim().to_owned(),
                zero_value(t, field),
            ));
        }
        Ok(Self(reqs))
    }

    /// Whether the object satisfies every requirement. Events are matched in their stored
    /// (core/v1) form, so `regarding.*` reads `involvedObject.*`.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, want, zero)| {
            let got = field_value(object, field);
            let got = if got.is_empty() { zero } else { got.as_str() };
            (got == want) == *equal
        })
    }

    /// The value of `field` that every match must have, if one requirement pins it (used to
    /// narrow a list to one namespace or one node).
    pub fn pinned(&self, field: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, equal, _, _)| f == field && *equal)
            .map(|(_, _, v, _)| v.as_str())
    }

    /// Whether the selector is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The string value of a dotted field path, `""` when absent.
pub fn field_value(object: &Value, field: &str) -> String {
    let path = match field {
        "source" => "source.component".to_owned(),
        "reportingController" => "reportingComponent".to_owned(),
        f => match f.strip_prefix("regarding.") {
            Some(rest) => format!("involvedObject.{rest}"),
            None => f.to_owned(),
        },
    };
    let mut v = object;
    for part in path.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return String::new(),
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
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
    fn label_selectors_support_every_operator() {
        let obj = json!({ "metadata": { "labels": { "app": "web", "tier": "front" } } });
        let yes = [
            "",
            "app=web",
            "app==web",
            "app!=db",
            "tier in (front, back)",
            "tier notin (back)",
            "app",
            "!legacy",
            "app=web,tier in (front),!legacy",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&obj), "{s}");
        }
        let no = [
            "app=db",
            "app!=web",
            "tier in (back)",
            "tier notin (front)",
            "legacy",
            "!app",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&obj), "{s}");
        }
    }

    #[test]
    fn malformed_label_selectors_are_bad_requests() {
        assert_eq!(LabelSelector::parse("app in web").unwrap_err().code, 400);
        assert_eq!(LabelSelector::parse("a b=c").unwrap_err().code, 400);
    }

    #[test]
    fn field_selectors_match_supported_fields_only() {
        let pod = json!({ "metadata": { "name": "p", "namespace": "ns" },
                          "spec": { "nodeName": "edge-1" }, "status": { "phase": "Running" } });
        let s = FieldSelector::parse(
            "spec.nodeName=edge-1,status.phase!=Succeeded,status.phase!=Failed",
            &pods(),
        )
        .unwrap();
        assert!(s.matches(&pod));
        assert_eq!(s.pinned("spec.nodeName"), Some("edge-1"));
        let other = FieldSelector::parse("metadata.name=q", &pods()).unwrap();
        assert!(!other.matches(&pod));
        let err = FieldSelector::parse("spec.color=red", &pods()).unwrap_err();
        assert_eq!(err.message, "field label not supported: spec.color");
    }

    #[test]
    fn an_absent_boolean_field_reads_as_false() {
        let nodes = builtins()
            .into_iter()
            .find(|t| t.resource == "nodes")
            .unwrap();
        let plain = json!({ "metadata": { "name": "edge-1" } });
        let cordoned =
            json!({ "metadata": { "name": "edge-2" }, "spec": { "unschedulable": true } });
        let schedulable = FieldSelector::parse("spec.unschedulable==false", &nodes).unwrap();
        assert!(
            schedulable.matches(&plain),
            "a node without the field is schedulable"
        );
        assert!(!schedulable.matches(&cordoned));
        let not_cordoned = FieldSelector::parse("spec.unschedulable!=true", &nodes).unwrap();
        assert!(not_cordoned.matches(&plain) && !not_cordoned.matches(&cordoned));
        let pod = json!({ "metadata": { "name": "p" }, "spec": {} });
        assert!(
            FieldSelector::parse("spec.hostNetwork=false", &pods())
                .unwrap()
                .matches(&pod)
        );
        // Strings stay empty when absent.
        assert!(
            FieldSelector::parse("spec.nodeName=", &pods())
                .unwrap()
                .matches(&pod)
        );
    }

    #[test]
    fn event_selectors_read_the_involved_object() {
        let events = builtins()
            .into_iter()
            .find(|t| t.resource == "events" && t.group.is_empty())
            .unwrap();
        let ev = json!({ "involvedObject": { "name": "x", "kind": "Model", "uid": "u" },
                         "source": { "component": "gm" } });
        let s = FieldSelector::parse(
            "involvedObject.name=x,involvedObject.kind=Model,source=gm",
            &events,
        )
        .unwrap();
        assert!(s.matches(&ev));
        assert_eq!(field_value(&ev, "regarding.uid"), "u");
    }
}
