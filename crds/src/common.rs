//! Types shared by several kinds: object references, `{key, value}` pairs, bounded status
//! conditions, phases, and the OpenAPI schemas of fields whose Rust type comes from
//! `k8s-openapi` (pod templates, timestamps, free-form configuration).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The most conditions a status carries. Conditions are keyed by `type`, so a resource has one
/// condition per type whatever the number of rounds or stages it goes through; the bound also
/// holds if a writer invents new types (the oldest transitions are dropped first).
pub const MAX_CONDITIONS: usize = 8;

/// The most `{key, value}` pairs in a parameter or metric list.
pub const MAX_KEY_VALUES: usize = 64;

/// Annotation on a worker pod declaring the cloud endpoints its node may reach through the
/// hub's tunnel, as JSON: `{"<endpoint>": "<pod>:<port>"}` (pods of the same namespace).
/// Controllers write it; nodes cannot (they write only pod statuses). A worker asks its node's
/// cloud proxy for `<namespace>/<its pod>/<endpoint>`.
pub const CLOUD_ENDPOINTS_ANNOTATION: &str = "sedna.io/cloud-endpoints";

/// Regular expression of a Kubernetes object name (RFC 1123 subdomain).
pub(crate) const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";

/// A reference to another object of the same namespace, by name (a Model, a Dataset, a Secret).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct NameRef {
    /// Name of the referenced object, in the namespace of the referring one.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
}

impl NameRef {
    /// A reference to the object called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// A `{key, value}` string pair: Sedna's form for hard-example-mining parameters, aggregation
/// parameters and reported metrics.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct KeyValue {
    /// The parameter or metric name, e.g. `threshold_img` or `precision`.
    #[schemars(length(min = 1, max = 256))]
    pub key: String,
    /// Its value, always a string (numbers are written as decimal text).
    #[schemars(length(max = 4096))]
    pub value: String,
}

impl KeyValue {
    /// A pair from anything string-like.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// Status of a condition, as in every Kubernetes API.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// It is not known whether the condition holds.
    Unknown,
}

/// One observation of a resource's state. A status keeps at most one condition per `type`
/// (see `set_condition`), never a growing history.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition, e.g. `Ready`, `Running`, `Failed`; each kind documents its own.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    /// Whether the condition holds.
    pub status: ConditionStatus,
    /// When the condition was last confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub last_heartbeat_time: Option<Time>,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub last_transition_time: Option<Time>,
    /// A CamelCase word saying why the condition is in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// A human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub message: Option<String>,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A condition of `type_` with `status`, observed now; reason and message empty.
    pub fn new(type_: impl Into<String>, status: ConditionStatus, now: Time) -> Self {
        Self {
            type_: type_.into(),
            status,
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(now),
            reason: None,
            message: None,
            observed_generation: None,
        }
    }

    /// The same condition with a reason.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// The same condition with a message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }
}

/// Records `condition` in `conditions`, keeping one entry per type and at most
/// [`MAX_CONDITIONS`] entries.
///
/// An existing condition of the same type is replaced; its `lastTransitionTime` is kept when the
/// status did not change, so the field keeps meaning "when the status last changed". When the
/// list is full, the condition whose last transition is oldest is dropped. Returns whether the
/// list changed in anything but the heartbeat time.
///
/// ```
/// use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
/// use k8s_openapi::jiff::Timestamp;
/// use sedna_api::common::{set_condition, Condition, ConditionStatus};
///
/// let t0 = Time(Timestamp::from_second(1_000).unwrap());
/// let t1 = Time(Timestamp::from_second(2_000).unwrap());
/// let mut conditions = Vec::new();
/// set_condition(&mut conditions, Condition::new("Running", ConditionStatus::True, t0.clone()));
/// let changed = set_condition(&mut conditions, Condition::new("Running", ConditionStatus::True, t1));
/// assert!(!changed);
/// assert_eq!(conditions.len(), 1);
/// assert_eq!(conditions[0].last_transition_time, Some(t0));
/// ```
pub fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) -> bool {
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        let same_status = existing.status == condition.status;
        if same_status {
            condition.last_transition_time = existing.last_transition_time.clone();
        }
        let changed = !same_status
            || existing.reason != condition.reason
            || existing.message != condition.message
            || existing.observed_generation != condition.observed_generation;
        *existing = condition;
        return changed;
    }
    conditions.push(condition);
    while conditions.len() > MAX_CONDITIONS {
        let oldest = conditions
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.last_transition_time.as_ref().map(|t| t.0))
            .map(|(i, _)| i);
        match oldest {
            Some(i) => conditions.remove(i),
            None => break,
        };
    }
    true
}

/// Looks up the condition of `type_`.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Lifecycle phase of a workload resource (a service or a job).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WorkloadPhase {
    /// Accepted; not every worker runs yet.
    #[default]
    Pending,
    /// Every worker has started.
    Running,
    /// Finished successfully (jobs only).
    Succeeded,
    /// Failed; see the conditions for why.
    Failed,
}

/// Lifecycle phase of a data resource (a Dataset or a Model).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ResourcePhase {
    /// Not checked yet.
    #[default]
    Pending,
    /// Reachable and usable.
    Ready,
    /// Unreachable or invalid; see the conditions for why.
    Failed,
}

/// Horizontal autoscaling of a worker (Sedna's `hpa`): the controller turns it into a
/// `HorizontalPodAutoscaler` for the worker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hpa {
    /// Lowest number of replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_replicas: Option<i32>,
    /// Highest number of replicas.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// autoscaling/v2 `MetricSpec`s, passed through to the HorizontalPodAutoscaler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "free_form_list_schema")]
    pub metrics: Vec<serde_json::Value>,
    /// autoscaling/v2 `HorizontalPodAutoscalerBehavior`, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_schema")]
    pub behavior: Option<serde_json::Value>,
}

/// A hard-example-mining algorithm and its parameters.
///
/// Built in: `Threshold` (`threshold`), `CrossEntropy` (`threshold_cross_entropy`), `IBT`
/// (`threshold_img`, `threshold_box`), `Random` (`random_ratio`), `EdgeOnly` and `CloudOnly`;
/// workers may register their own names.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct HardExampleMining {
    /// Name of the algorithm.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Parameters as strings, e.g. `{key: threshold_img, value: "0.9"}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "key_values_schema")]
    pub parameters: Vec<KeyValue>,
}

/// Free-form configuration passed through untouched (a device protocol's `configData`,
/// a visitor's settings): a JSON object whose fields are not declared in the schema.
pub type FreeForm = BTreeMap<String, serde_json::Value>;

/// Schema of a status's conditions: at most [`MAX_CONDITIONS`], one per `type`.
pub(crate) fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    keyed_list::<Condition>(generator, "type", MAX_CONDITIONS)
}

/// Schema of a `{key, value}` list: at most [`MAX_KEY_VALUES`], one per `key`.
pub(crate) fn key_values_schema(generator: &mut SchemaGenerator) -> Schema {
    keyed_list::<KeyValue>(generator, "key", MAX_KEY_VALUES)
}

/// Schema of a bounded list of `T` whose items are unique by `key` (a list-map).
fn keyed_list<T: JsonSchema>(generator: &mut SchemaGenerator, key: &str, max: usize) -> Schema {
    let mut schema = <Vec<T>>::json_schema(generator);
    schema.insert("maxItems".to_owned(), max.into());
    schema.insert("x-kubernetes-list-type".to_owned(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".to_owned(),
        serde_json::json!([key]),
    );
    schema
}

/// Schema of a `metav1.Time` field: an RFC 3339 timestamp.
pub(crate) fn time_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "format": "date-time", "nullable": true })
}

/// Schema of an object whose fields are kept as given.
pub(crate) fn free_form_object_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "nullable": true,
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Schema of a list of objects whose fields are kept as given.
pub(crate) fn free_form_list_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
    })
}

/// The pod template of a worker, in Rust the full `core/v1` `PodTemplateSpec`.
///
/// In the schema, the fields a worker needs are validated (containers, their command, args,
/// env, ports, resources, volume mounts, node placement, restart policy) and every other Pod
/// field is preserved and validated when the worker Pod is created. Embedding the whole Pod
/// schema, as Sedna does, makes each CRD over 1 MB: larger than the 256 KiB that
/// `kubectl apply`'s last-applied annotation may hold.
pub type WorkerTemplate = PodTemplateSpec;

/// Schema of a [`WorkerTemplate`] field.
pub(crate) fn pod_template_schema(_: &mut SchemaGenerator) -> Schema {
    let string_map = serde_json::json!({
        "type": "object",
        "additionalProperties": { "type": "string" }
    });
    let quantity_map = serde_json::json!({
        "type": "object",
        "additionalProperties": {
            "x-kubernetes-int-or-string": true,
            "anyOf": [{ "type": "integer" }, { "type": "string" }],
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
        }
    });
    let strings = serde_json::json!({ "type": "array", "items": { "type": "string" } });
    let container = serde_json::json!({
        "type": "object",
        "description": "A container of the worker (core/v1 Container). On edge nodes without a \
                        container runtime, `image` names the program to run.",
        "required": ["name"],
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {
            "name": { "type": "string", "minLength": 1, "maxLength": 63,
                      "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" },
            "image": { "type": "string" },
            "imagePullPolicy": { "type": "string", "enum": ["Always", "IfNotPresent", "Never"] },
            "command": strings,
            "args": strings,
            "workingDir": { "type": "string" },
            "env": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": { "type": "string", "minLength": 1 },
                        "value": { "type": "string" },
                        "valueFrom": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
                    }
                }
            },
            "ports": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["containerPort"],
                    "x-kubernetes-preserve-unknown-fields": true,
                    "properties": {
                        "name": { "type": "string", "maxLength": 15 },
                        "containerPort": { "type": "integer", "format": "int32",
                                           "minimum": 1, "maximum": 65535 },
                        "protocol": { "type": "string", "enum": ["TCP", "UDP", "SCTP"] }
                    }
                }
            },
            "resources": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "properties": { "limits": quantity_map, "requests": quantity_map }
            },
            "volumeMounts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "mountPath"],
                    "x-kubernetes-preserve-unknown-fields": true,
                    "properties": {
                        "name": { "type": "string", "minLength": 1 },
                        "mountPath": { "type": "string", "minLength": 1 },
                        "readOnly": { "type": "boolean" }
                    }
                }
            }
        }
    });
    json_schema!({
        "type": "object",
        "description": "Pod template of the worker (core/v1 PodTemplateSpec). The fields listed \
                        here are validated when the resource is applied; the others are kept and \
                        validated when the worker Pod is created.",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {
            "metadata": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "properties": { "labels": string_map, "annotations": string_map }
            },
            "spec": {
                "type": "object",
                "required": ["containers"],
                "x-kubernetes-preserve-unknown-fields": true,
                "properties": {
                    "nodeName": { "type": "string" },
                    "nodeSelector": string_map,
                    "restartPolicy": { "type": "string", "enum": ["Always", "OnFailure", "Never"] },
                    "serviceAccountName": { "type": "string" },
                    "terminationGracePeriodSeconds": { "type": "integer", "format": "int64",
                                                       "minimum": 0 },
                    "containers": {
                        "type": "array",
                        "minItems": 1,
                        "items": container
                    },
                    "volumes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "x-kubernetes-preserve-unknown-fields": true,
                            "properties": { "name": { "type": "string", "minLength": 1 } }
                        }
                    }
                }
            }
        }
    })
}

/// Schema of a `BTreeMap<String, String>` used as a node selector.
pub(crate) fn node_selector_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "nullable": true,
        "description": "Labels a node must carry: the resource applies to every matching node.",
        "minProperties": 1,
        "additionalProperties": { "type": "string" }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let mut conditions = vec![];
        set_condition(
            &mut conditions,
            Condition::new("Ready", ConditionStatus::True, at(10)),
        );
        let changed = set_condition(
            &mut conditions,
            Condition::new("Ready", ConditionStatus::True, at(20)),
        );
        assert!(!changed);
        assert_eq!(conditions[0].last_transition_time, Some(at(10)));
        assert_eq!(conditions[0].last_heartbeat_time, Some(at(20)));
    }

    #[test]
    fn set_condition_moves_transition_time_when_status_changes() {
        let mut conditions = vec![];
        set_condition(
            &mut conditions,
            Condition::new("Ready", ConditionStatus::True, at(10)),
        );
        let changed = set_condition(
            &mut conditions,
            Condition::new("Ready", ConditionStatus::False, at(20)).with_reason("ModelMissing"),
        );
        assert!(changed);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Some(at(20)));
        assert_eq!(conditions[0].reason.as_deref(), Some("ModelMissing"));
    }

    #[test]
    fn set_condition_reports_a_new_message_as_a_change() {
        let mut conditions = vec![];
        set_condition(
            &mut conditions,
            Condition::new("Ready", ConditionStatus::True, at(1)),
        );
        let changed = set_condition(
            &mut conditions,
            Condition::new("Ready", ConditionStatus::True, at(2)).with_message("round 3"),
        );
        assert!(changed);
    }

    #[test]
    fn conditions_stay_bounded_and_drop_the_oldest_transition() {
        let mut conditions = vec![];
        for i in 0..(MAX_CONDITIONS as i64 + 5) {
            set_condition(
                &mut conditions,
                Condition::new(format!("Type{i}"), ConditionStatus::True, at(100 + i)),
            );
        }
        assert_eq!(conditions.len(), MAX_CONDITIONS);
        assert!(find_condition(&conditions, "Type0").is_none());
        assert!(find_condition(&conditions, "Type4").is_none());
        assert!(find_condition(&conditions, "Type5").is_some());
        assert!(find_condition(&conditions, &format!("Type{}", MAX_CONDITIONS + 4)).is_some());
    }

    #[test]
    fn many_rounds_of_the_same_condition_types_never_grow_the_list() {
        let mut conditions = vec![];
        for round in 0..1000 {
            let status = if round % 2 == 0 {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            };
            set_condition(
                &mut conditions,
                Condition::new("Training", status, at(round)),
            );
            set_condition(
                &mut conditions,
                Condition::new("Deployed", status, at(round)),
            );
        }
        assert_eq!(conditions.len(), 2);
    }
}
