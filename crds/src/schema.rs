//! Structural OpenAPI v3 schemas, applied as the Kubernetes API server applies a
//! CustomResourceDefinition's schema to a custom resource.
//!
//! [`StructuralSchema::new`] refuses a schema that is not structural (the rules
//! `apiextensions.k8s.io/v1` enforces). [`StructuralSchema::admit`] then treats an incoming
//! object in the API server's order: nulls of non-nullable fields are dropped, unknown fields
//! are pruned (or refused, with `fieldValidation=Strict`), defaults are applied, and the result
//! is validated. Every error names the field's path (`spec.dataset.trainProb`) and reads like
//! the API server's own message.
//!
//! Not supported: CEL rules (`x-kubernetes-validations`) are ignored, and of the string
//! formats only `date-time`, `date`, `ipv4`, `ipv6` and `uuid` are checked.
//!
//! ```
//! use kube::CustomResourceExt;
//! use sedna_api::dataset::Dataset;
//! use sedna_api::schema::{StructuralSchema, UnknownFields};
//!
//! let schema = StructuralSchema::from_crd(&Dataset::crd(), "v1alpha1").unwrap();
//! let mut object = serde_json::json!({
//!     "apiVersion": "sedna.io/v1alpha1", "kind": "Dataset",
//!     "metadata": { "name": "d" },
//!     "spec": { "url": "/data/index.txt", "format": "xml", "nodeName": "edge-1" }
//! });
//! let errors = schema.admit(&mut object, UnknownFields::Strict).unwrap_err();
//! assert_eq!(
//!     errors.to_string(),
//!     r#"spec.format: Unsupported value: "xml": supported values: "txt", "csv", "dir", "idx""#
//! );
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use regex::Regex;
use serde_json::{Map, Value};

/// Why a schema cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The schema breaks the structural rules; each entry names the offending node.
    #[error("schema is not structural: {}", .0.join("; "))]
    NotStructural(Vec<String>),
    /// A `pattern` is not a valid regular expression.
    #[error("{path}.pattern: invalid regular expression {pattern:?}: {source}")]
    BadPattern {
        /// Path of the schema node.
        path: String,
        /// The pattern as written.
        pattern: String,
        /// What the regex parser said.
        source: Box<regex::Error>,
    },
    /// The CRD has no such version, or the version has no schema.
    #[error("CustomResourceDefinition {crd} has no schema for version {version:?}")]
    NoSchema {
        /// Name of the CRD.
        crd: String,
        /// The version asked for.
        version: String,
    },
}

impl SchemaError {
    /// Whether trying again could succeed: never, the schema itself must change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// What to do with fields the schema does not declare (the API's `fieldValidation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownFields {
    /// Drop them silently.
    Ignore,
    /// Drop them and return a warning for each.
    Warn,
    /// Refuse the object (what `kubectl` asks for by default).
    #[default]
    Strict,
}

/// One problem with one field.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.trainingWorkers[0].dataset.name`.
    pub path: String,
    /// What is wrong.
    pub kind: FieldErrorKind,
}

/// What is wrong with a field.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldErrorKind {
    /// A required field is missing.
    Required,
    /// The field is not declared in the schema (strict field validation).
    Unknown,
    /// The value is not one of the enumerated values.
    NotSupported {
        /// The value given.
        value: Value,
        /// The values allowed.
        supported: Vec<Value>,
    },
    /// A list holds more items than allowed.
    TooMany {
        /// Number of items given.
        got: usize,
        /// The most allowed.
        max: i64,
    },
    /// A list that must hold unique items (or unique keys) repeats one.
    Duplicate {
        /// The repeated item or key.
        value: Value,
    },
    /// Any other invalid value; `detail` says what was expected.
    Invalid {
        /// The value given (for objects and arrays, their type name).
        value: Value,
        /// What was expected.
        detail: String,
    },
}

impl FieldErrorKind {
    /// The Kubernetes `StatusCause.type` for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Unknown => "FieldValueInvalid",
            FieldErrorKind::NotSupported { .. } => "FieldValueNotSupported",
            FieldErrorKind::TooMany { .. } => "FieldValueTooMany",
            FieldErrorKind::Duplicate { .. } => "FieldValueDuplicate",
            FieldErrorKind::Invalid { .. } => "FieldValueInvalid",
        }
    }
}

impl FieldError {
    /// What is wrong, without the path (what Kubernetes puts in a `StatusCause.message`).
    pub fn detail(&self) -> String {
        match &self.kind {
            FieldErrorKind::Required => "Required value".to_owned(),
            FieldErrorKind::Unknown => "field not declared in schema".to_owned(),
            FieldErrorKind::NotSupported { value, supported } => {
                let supported: Vec<String> = supported.iter().map(Value::to_string).collect();
                format!(
                    "Unsupported value: {value}: supported values: {}",
                    supported.join(", ")
                )
            }
            FieldErrorKind::TooMany { got, max } => {
                format!("Too many: {got}: must have at most {max} items")
            }
            FieldErrorKind::Duplicate { value } => format!("Duplicate value: {value}"),
            FieldErrorKind::Invalid { value, detail } => {
                format!("Invalid value: {value}: {detail}")
            }
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FieldErrorKind::Unknown => write!(f, "unknown field {:?}", self.path),
            _ => write!(f, "{}: {}", self.path, self.detail()),
        }
    }
}

/// Every problem found in one object; never empty.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    /// Whether trying again could succeed: never, the object must change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.0.iter().map(FieldError::to_string).collect();
        match all.as_slice() {
            [one] => f.write_str(one),
            many => write!(f, "[{}]", many.join(", ")),
        }
    }
}

/// A schema checked to be structural, with its patterns compiled.
#[derive(Clone, Debug)]
pub struct StructuralSchema {
    root: JSONSchemaProps,
    patterns: HashMap<String, Regex>,
}

impl StructuralSchema {
    /// Checks that `root` is structural and compiles its patterns.
    pub fn new(root: JSONSchemaProps) -> Result<Self, SchemaError> {
        let problems = structural_problems(&root);
        if !problems.is_empty() {
            return Err(SchemaError::NotStructural(problems));
        }
        let mut patterns = HashMap::new();
        compile_patterns(&root, "openAPIV3Schema", &mut patterns)?;
        let schema = Self { root, patterns };
        let mut default_problems = Vec::new();
        schema.check_defaults(&schema.root, "openAPIV3Schema", &mut default_problems);
        if !default_problems.is_empty() {
            return Err(SchemaError::NotStructural(default_problems));
        }
        Ok(schema)
    }

    /// The schema of `version` in `crd`.
    pub fn from_crd(crd: &CustomResourceDefinition, version: &str) -> Result<Self, SchemaError> {
        let root = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == version)
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.clone())
            .ok_or_else(|| SchemaError::NoSchema {
                crd: crd.metadata.name.clone().unwrap_or_default(),
                version: version.to_owned(),
            })?;
        Self::new(root)
    }

    /// The schema as given.
    pub fn root(&self) -> &JSONSchemaProps {
        &self.root
    }

    /// Prunes, defaults and validates `object` in place, as the API server does on create and
    /// update. Returns the warnings (unknown fields dropped under [`UnknownFields::Warn`]).
    pub fn admit(
        &self,
        object: &mut Value,
        unknown: UnknownFields,
    ) -> Result<Vec<String>, ValidationErrors> {
        let mut unknown_paths = Vec::new();
        normalize(&self.root, object, "", true, &mut unknown_paths);
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        for path in unknown_paths {
            match unknown {
                UnknownFields::Ignore => {}
                UnknownFields::Warn => warnings.push(format!("unknown field {path:?}")),
                UnknownFields::Strict => errors.push(FieldError {
                    path,
                    kind: FieldErrorKind::Unknown,
                }),
            }
        }
        self.validate_node(&self.root, object, "", &mut errors);
        if errors.is_empty() {
            Ok(warnings)
        } else {
            Err(ValidationErrors(errors))
        }
    }

    /// Validates `object` as it is (no pruning, no defaulting); returns every error.
    pub fn validate(&self, object: &Value) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.validate_node(&self.root, object, "", &mut errors);
        errors
    }

    fn check_defaults(&self, node: &JSONSchemaProps, path: &str, problems: &mut Vec<String>) {
        if let Some(default) = &node.default {
            let mut value = default.0.clone();
            let mut unknown = Vec::new();
            normalize(node, &mut value, path, false, &mut unknown);
            let mut errors = Vec::new();
            self.validate_node(node, &value, path, &mut errors);
            if !unknown.is_empty() {
                problems.push(format!(
                    "{path}.default: must not hold fields that are pruned"
                ));
            }
            problems.extend(errors.iter().map(|e| format!("{path}.default: {e}")));
        }
        for_each_child(node, path, &mut |child, child_path| {
            self.check_defaults(child, child_path, problems)
        });
    }

    fn validate_node(
        &self,
        node: &JSONSchemaProps,
        value: &Value,
        path: &str,
        errors: &mut Vec<FieldError>,
    ) {
        if value.is_null() {
            if node.nullable != Some(true) && !is_untyped(node) {
                errors.push(invalid(
                    path,
                    Value::Null,
                    format!(
                        "{} in body must be of type {}: \"null\"",
                        body(path),
                        type_of(node)
                    ),
                ));
            }
            return;
        }
        if !self.type_matches(node, value, path, errors) {
            return;
        }
        if let Some(allowed) = &node.enum_
            && !allowed.iter().any(|a| json_equal(&a.0, value))
        {
            errors.push(FieldError {
                path: path.to_owned(),
                kind: FieldErrorKind::NotSupported {
                    value: value.clone(),
                    supported: allowed.iter().map(|a| a.0.clone()).collect(),
                },
            });
        }
        match value {
            Value::Number(n) => check_number(node, n, path, errors),
            Value::String(s) => self.check_string(node, s, path, errors),
            Value::Array(items) => self.check_array(node, items, path, errors),
            Value::Object(map) => self.check_object(node, map, path, errors),
            Value::Bool(_) | Value::Null => {}
        }
        self.check_junctors(node, value, path, errors);
    }

    fn type_matches(
        &self,
        node: &JSONSchemaProps,
        value: &Value,
        path: &str,
        errors: &mut Vec<FieldError>,
    ) -> bool {
        let ok = if node.x_kubernetes_int_or_string == Some(true) {
            is_integer(value) || value.is_string()
        } else {
            match node.type_.as_deref() {
                None | Some("") => true,
                Some("object") => value.is_object(),
                Some("array") => value.is_array(),
                Some("string") => value.is_string(),
                Some("boolean") => value.is_boolean(),
                Some("number") => value.is_number(),
                Some("integer") => is_integer(value),
                Some(_) => false,
            }
        };
        if !ok {
            let got = json_type_name(value);
            errors.push(invalid(
                path,
                Value::String(got.to_owned()),
                format!(
                    "{} in body must be of type {}: {got:?}",
                    body(path),
                    type_of(node)
                ),
            ));
        }
        ok
    }

    fn check_string(
        &self,
        node: &JSONSchemaProps,
        s: &str,
        path: &str,
        errors: &mut Vec<FieldError>,
    ) {
        let chars = s.chars().count() as i64;
        let shown = || Value::String(s.to_owned());
        if let Some(min) = node.min_length
            && chars < min
        {
            let detail = format!("{} in body should be at least {min} chars long", body(path));
            errors.push(invalid(path, shown(), detail));
        }
        if let Some(max) = node.max_length
            && chars > max
        {
            let detail = format!("{} in body should be at most {max} chars long", body(path));
            errors.push(invalid(path, shown(), detail));
        }
        if let Some(pattern) = &node.pattern
            && let Some(re) = self.patterns.get(pattern)
            && !re.is_match(s)
        {
            let detail = format!("{} in body should match '{pattern}'", body(path));
            errors.push(invalid(path, shown(), detail));
        }
        if let Some(format) = node.format.as_deref()
            && !format_matches(format, s)
        {
            let detail = format!("{} in body must be of type {format}: {s:?}", body(path));
            errors.push(invalid(path, shown(), detail));
        }
    }

    fn check_array(
        &self,
        node: &JSONSchemaProps,
        items: &[Value],
        path: &str,
        errors: &mut Vec<FieldError>,
    ) {
        if let Some(min) = node.min_items
            && (items.len() as i64) < min
        {
            let detail = format!("{} in body should have at least {min} items", body(path));
            errors.push(invalid(path, Value::from(items.len()), detail));
        }
        if let Some(max) = node.max_items
            && (items.len() as i64) > max
        {
            errors.push(FieldError {
                path: path.to_owned(),
                kind: FieldErrorKind::TooMany {
                    got: items.len(),
                    max,
                },
            });
        }
        let item_schema = match &node.items {
            Some(JSONSchemaPropsOrArray::Schema(s)) => Some(s.as_ref()),
            _ => None,
        };
        for (i, item) in items.iter().enumerate() {
            if let Some(schema) = item_schema {
                self.validate_node(schema, item, &format!("{path}[{i}]"), errors);
            }
        }
        let list_type = node.x_kubernetes_list_type.as_deref();
        let keys = node
            .x_kubernetes_list_map_keys
            .as_deref()
            .unwrap_or_default();
        let mut seen = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let identity = match list_type {
                Some("map") if !keys.is_empty() => {
                    let Some(obj) = item.as_object() else {
                        continue;
                    };
                    let key: Map<String, Value> = keys
                        .iter()
                        .filter_map(|k| obj.get(k).map(|v| (k.clone(), v.clone())))
                        .collect();
                    Value::Object(key)
                }
                Some("set") => item.clone(),
                _ if node.unique_items == Some(true) => item.clone(),
                _ => continue,
            };
            if !seen.insert(identity.to_string()) {
                errors.push(FieldError {
                    path: format!("{path}[{i}]"),
                    kind: FieldErrorKind::Duplicate { value: identity },
                });
            }
        }
    }

    fn check_object(
        &self,
        node: &JSONSchemaProps,
        map: &Map<String, Value>,
        path: &str,
        errors: &mut Vec<FieldError>,
    ) {
        let count = map.len() as i64;
        if let Some(min) = node.min_properties
            && count < min
        {
            let detail = format!(
                "{} in body should have at least {min} properties",
                body(path)
            );
            errors.push(invalid(path, Value::from("object"), detail));
        }
        if let Some(max) = node.max_properties
            && count > max
        {
            let detail = format!(
                "{} in body should have at most {max} properties",
                body(path)
            );
            errors.push(invalid(path, Value::from("object"), detail));
        }
        for name in node.required.as_deref().unwrap_or_default() {
            if !map.contains_key(name) {
                errors.push(FieldError {
                    path: join(path, name),
                    kind: FieldErrorKind::Required,
                });
            }
        }
        let properties = node.properties.as_ref();
        for (key, child) in map {
            if let Some(schema) = properties.and_then(|p| p.get(key)) {
                self.validate_node(schema, child, &join(path, key), errors);
            } else if let Some(JSONSchemaPropsOrBool::Schema(schema)) = &node.additional_properties
            {
                self.validate_node(schema, child, &format!("{path}[{key}]"), errors);
            }
        }
    }

    fn check_junctors(
        &self,
        node: &JSONSchemaProps,
        value: &Value,
        path: &str,
        errors: &mut Vec<FieldError>,
    ) {
        let passes = |schema: &JSONSchemaProps| {
            let mut sub = Vec::new();
            self.validate_node(schema, value, path, &mut sub);
            sub.is_empty()
        };
        let shown = Value::from(json_type_name(value));
        for schema in node.all_of.as_deref().unwrap_or_default() {
            self.validate_node(schema, value, path, errors);
        }
        if let Some(any_of) = node.any_of.as_deref()
            && !any_of.is_empty()
            && !any_of.iter().any(passes)
        {
            let detail = match required_only(any_of) {
                Some(fields) => format!("at least one of {fields} must be set"),
                None => format!(
                    "{} in body must validate at least one schema (anyOf)",
                    body(path)
                ),
            };
            errors.push(invalid(path, shown.clone(), detail));
        }
        if let Some(one_of) = node.one_of.as_deref()
            && !one_of.is_empty()
            && one_of.iter().filter(|s| passes(s)).count() != 1
        {
            let detail = match required_only(one_of) {
                Some(fields) => format!("exactly one of {fields} must be set"),
                None => format!(
                    "{} in body must validate one and only one schema (oneOf)",
                    body(path)
                ),
            };
            errors.push(invalid(path, shown.clone(), detail));
        }
        if let Some(not) = node.not.as_deref()
            && passes(not)
        {
            let detail = format!("{} in body must not validate the schema (not)", body(path));
            errors.push(invalid(path, shown, detail));
        }
    }
}

/// Drops non-nullable nulls, prunes unknown fields (recording their paths) and applies defaults.
fn normalize(
    node: &JSONSchemaProps,
    value: &mut Value,
    path: &str,
    is_root: bool,
    unknown: &mut Vec<String>,
) {
    match value {
        Value::Object(map) => {
            let preserve = node.x_kubernetes_preserve_unknown_fields == Some(true);
            let embedded = is_root || node.x_kubernetes_embedded_resource == Some(true);
            let properties = node.properties.as_ref();
            let additional = node.additional_properties.as_ref();
            if node.type_.as_deref() == Some("object") || properties.is_some() {
                let keys: Vec<String> = map.keys().cloned().collect();
                for key in keys {
                    let declared = properties.and_then(|p| p.get(&key));
                    let child_schema = declared.or(match additional {
                        Some(JSONSchemaPropsOrBool::Schema(s)) => Some(s.as_ref()),
                        _ => None,
                    });
                    if let Some(schema) = child_schema {
                        if map.get(&key).is_some_and(Value::is_null)
                            && schema.nullable != Some(true)
                        {
                            map.remove(&key);
                        }
                        continue;
                    }
                    let kept = preserve
                        || matches!(additional, Some(JSONSchemaPropsOrBool::Bool(true)))
                        || (embedded && matches!(key.as_str(), "apiVersion" | "kind" | "metadata"));
                    if !kept {
                        map.remove(&key);
                        unknown.push(join(path, &key));
                    }
                }
            }
            if let Some(properties) = properties {
                for (key, schema) in properties {
                    if !map.contains_key(key)
                        && let Some(default) = &schema.default
                    {
                        map.insert(key.clone(), default.0.clone());
                    }
                }
            }
            for (key, child) in map.iter_mut() {
                if let Some(schema) = properties.and_then(|p| p.get(key)) {
                    normalize(schema, child, &join(path, key), false, unknown);
                } else if let Some(JSONSchemaPropsOrBool::Schema(schema)) = additional {
                    normalize(schema, child, &format!("{path}[{key}]"), false, unknown);
                }
            }
        }
        Value::Array(items) => {
            if let Some(JSONSchemaPropsOrArray::Schema(schema)) = &node.items {
                for (i, item) in items.iter_mut().enumerate() {
                    normalize(schema, item, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}

/// The structural rules of `apiextensions.k8s.io/v1`, checked on a whole schema.
pub fn structural_problems(root: &JSONSchemaProps) -> Vec<String> {
    let mut problems = Vec::new();
    if root.type_.as_deref() != Some("object") {
        problems.push("openAPIV3Schema.type: must be object".to_owned());
    }
    check_node(root, "openAPIV3Schema", &mut problems);
    if let Some(metadata) = root.properties.as_ref().and_then(|p| p.get("metadata")) {
        let allowed_keys = metadata
            .properties
            .as_ref()
            .is_none_or(|p| p.keys().all(|k| k == "name" || k == "generateName"));
        if metadata.type_.as_deref() != Some("object") || !allowed_keys {
            problems.push(
                "openAPIV3Schema.properties[metadata]: must be of type object, and may only \
                 restrict name and generateName"
                    .to_owned(),
            );
        }
    }
    problems
}

fn check_node(node: &JSONSchemaProps, path: &str, problems: &mut Vec<String>) {
    let int_or_string = node.x_kubernetes_int_or_string == Some(true);
    let preserve = node.x_kubernetes_preserve_unknown_fields == Some(true);
    let type_ = node.type_.as_deref().unwrap_or_default();
    if type_.is_empty() && !int_or_string && !preserve {
        problems.push(format!("{path}.type: Required value: must not be empty"));
    }
    if int_or_string && !type_.is_empty() {
        problems.push(format!(
            "{path}.type: must be empty for x-kubernetes-int-or-string"
        ));
    }
    if node.x_kubernetes_preserve_unknown_fields == Some(false) {
        problems.push(format!(
            "{path}.x-kubernetes-preserve-unknown-fields: must be true or undefined"
        ));
    }
    if node.ref_path.is_some() {
        problems.push(format!("{path}.$ref: must not be set"));
    }
    if node.properties.is_some() && node.additional_properties.is_some() {
        problems.push(format!(
            "{path}.additionalProperties: must not be used together with properties"
        ));
    }
    if matches!(
        node.additional_properties,
        Some(JSONSchemaPropsOrBool::Bool(false))
    ) {
        problems.push(format!("{path}.additionalProperties: must not be false"));
    }
    if type_ == "array" {
        match &node.items {
            Some(JSONSchemaPropsOrArray::Schema(_)) => {}
            Some(JSONSchemaPropsOrArray::Schemas(_)) => {
                problems.push(format!("{path}.items: must be a single schema"))
            }
            None => problems.push(format!("{path}.items: Required value: must be specified")),
        }
    }
    if node.x_kubernetes_embedded_resource == Some(true) && type_ != "object" {
        problems.push(format!(
            "{path}.type: must be object if x-kubernetes-embedded-resource is true"
        ));
    }
    match node.x_kubernetes_list_type.as_deref() {
        None | Some("atomic") => {}
        Some("set") => {
            if let Some(JSONSchemaPropsOrArray::Schema(items)) = &node.items
                && matches!(items.type_.as_deref(), Some("object" | "array"))
            {
                problems.push(format!(
                    "{path}.items.type: must be a scalar type if x-kubernetes-list-type is set"
                ));
            }
        }
        Some("map") => {
            let keys = node
                .x_kubernetes_list_map_keys
                .as_deref()
                .unwrap_or_default();
            if keys.is_empty() {
                problems.push(format!(
                    "{path}.x-kubernetes-list-map-keys: Required value: must not be empty if \
                     x-kubernetes-list-type is map"
                ));
            }
            if let Some(JSONSchemaPropsOrArray::Schema(items)) = &node.items {
                let required = items.required.as_deref().unwrap_or_default();
                for key in keys {
                    let declared = items.properties.as_ref().and_then(|p| p.get(key));
                    let ok =
                        declared.is_some_and(|d| d.default.is_some()) || required.contains(key);
                    if declared.is_none() || !ok {
                        problems.push(format!(
                            "{path}.x-kubernetes-list-map-keys: {key:?} must be a required or \
                             defaulted property of the items"
                        ));
                    }
                }
            }
        }
        Some(other) => problems.push(format!(
            "{path}.x-kubernetes-list-type: Unsupported value: {other:?}"
        )),
    }
    let junctors = [
        ("allOf", node.all_of.as_deref()),
        ("anyOf", node.any_of.as_deref()),
        ("oneOf", node.one_of.as_deref()),
    ];
    for (name, list) in junctors {
        for (i, sub) in list.unwrap_or_default().iter().enumerate() {
            check_junctor(
                node,
                sub,
                &format!("{path}.{name}[{i}]"),
                int_or_string,
                problems,
            );
        }
    }
    if let Some(not) = &node.not {
        check_junctor(node, not, &format!("{path}.not"), false, problems);
    }
    for_each_child(node, path, &mut |child, child_path| {
        check_node(child, child_path, problems)
    });
}

/// Inside `allOf`, `anyOf`, `oneOf` and `not`, only value validations may appear, and only for
/// fields the enclosing schema declares.
fn check_junctor(
    outer: &JSONSchemaProps,
    sub: &JSONSchemaProps,
    path: &str,
    int_or_string: bool,
    problems: &mut Vec<String>,
) {
    let int_or_string_branch = int_or_string
        && matches!(sub.type_.as_deref(), Some("integer" | "string"))
        && sub.properties.is_none();
    if sub.type_.is_some() && !int_or_string_branch {
        problems.push(format!("{path}.type: must not be set inside a junctor"));
    }
    let forbidden = [
        ("description", sub.description.is_some()),
        ("default", sub.default.is_some()),
        ("nullable", sub.nullable.is_some()),
        ("additionalProperties", sub.additional_properties.is_some()),
        (
            "x-kubernetes-preserve-unknown-fields",
            sub.x_kubernetes_preserve_unknown_fields.is_some(),
        ),
        (
            "x-kubernetes-embedded-resource",
            sub.x_kubernetes_embedded_resource.is_some(),
        ),
        (
            "x-kubernetes-int-or-string",
            sub.x_kubernetes_int_or_string.is_some(),
        ),
    ];
    for (field, present) in forbidden {
        if present {
            problems.push(format!("{path}.{field}: must not be set inside a junctor"));
        }
    }
    if let Some(properties) = &sub.properties {
        for key in properties.keys() {
            if outer
                .properties
                .as_ref()
                .is_none_or(|p| !p.contains_key(key))
            {
                problems.push(format!(
                    "{path}.properties[{key}]: must only restrict fields the enclosing schema \
                     declares"
                ));
            }
        }
    }
    if sub.items.is_some() && outer.items.is_none() {
        problems.push(format!(
            "{path}.items: must only restrict items the enclosing schema declares"
        ));
    }
}

/// Calls `f` on each directly nested schema that describes a value (not junctors).
fn for_each_child(node: &JSONSchemaProps, path: &str, f: &mut dyn FnMut(&JSONSchemaProps, &str)) {
    if let Some(properties) = &node.properties {
        for (key, child) in properties {
            f(child, &format!("{path}.properties[{key}]"));
        }
    }
    if let Some(JSONSchemaPropsOrBool::Schema(child)) = &node.additional_properties {
        f(child, &format!("{path}.additionalProperties"));
    }
    if let Some(JSONSchemaPropsOrArray::Schema(child)) = &node.items {
        f(child, &format!("{path}.items"));
    }
}

fn compile_patterns(
    node: &JSONSchemaProps,
    path: &str,
    out: &mut HashMap<String, Regex>,
) -> Result<(), SchemaError> {
    if let Some(pattern) = &node.pattern
        && !out.contains_key(pattern)
    {
        let re = Regex::new(pattern).map_err(|source| SchemaError::BadPattern {
            path: path.to_owned(),
            pattern: pattern.clone(),
            source: Box::new(source),
        })?;
        out.insert(pattern.clone(), re);
    }
    let mut result = Ok(());
    let mut visit = |child: &JSONSchemaProps, child_path: &str| {
        if result.is_ok() {
            result = compile_patterns(child, child_path, out);
        }
    };
    for_each_child(node, path, &mut visit);
    let junctors = [&node.all_of, &node.any_of, &node.one_of];
    for (i, sub) in junctors.into_iter().flatten().flatten().enumerate() {
        visit(sub, &format!("{path}.junctor[{i}]"));
    }
    if let Some(not) = &node.not {
        visit(not, &format!("{path}.not"));
    }
    result
}

fn check_number(
    node: &JSONSchemaProps,
    n: &serde_json::Number,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let Some(x) = n.as_f64() else { return };
    let shown = || Value::Number(n.clone());
    if let Some(min) = node.minimum {
        let exclusive = node.exclusive_minimum == Some(true);
        if x < min || (exclusive && x == min) {
            let than = if exclusive {
                "greater than"
            } else {
                "greater than or equal to"
            };
            let detail = format!("{} in body should be {than} {}", body(path), number(min));
            errors.push(invalid(path, shown(), detail));
        }
    }
    if let Some(max) = node.maximum {
        let exclusive = node.exclusive_maximum == Some(true);
        if x > max || (exclusive && x == max) {
            let than = if exclusive {
                "less than"
            } else {
                "less than or equal to"
            };
            let detail = format!("{} in body should be {than} {}", body(path), number(max));
            errors.push(invalid(path, shown(), detail));
        }
    }
    if let Some(factor) = node.multiple_of
        && factor > 0.0
        && ((x / factor).round() * factor - x).abs() > f64::EPSILON * x.abs().max(1.0)
    {
        let detail = format!(
            "{} in body should be a multiple of {}",
            body(path),
            number(factor)
        );
        errors.push(invalid(path, shown(), detail));
    }
}

fn format_matches(format: &str, s: &str) -> bool {
    use k8s_openapi::jiff::{Timestamp, civil::Date};
    match format {
        "date-time" => s.parse::<Timestamp>().is_ok(),
        "date" => s.parse::<Date>().is_ok(),
        "ipv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
        "ipv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
        "uuid" => {
            let hex: Vec<&str> = s.split('-').collect();
            hex.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
                && hex.iter().all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
        }
        _ => true,
    }
}

/// When every branch only lists required fields, those fields, for a readable message.
fn required_only(branches: &[JSONSchemaProps]) -> Option<String> {
    let mut names = Vec::new();
    for branch in branches {
        let only_required = JSONSchemaProps {
            required: branch.required.clone(),
            ..Default::default()
        };
        if *branch != only_required {
            return None;
        }
        names.extend(branch.required.iter().flatten().cloned());
    }
    Some(names.join(", "))
}

fn is_untyped(node: &JSONSchemaProps) -> bool {
    node.type_.as_deref().unwrap_or_default().is_empty()
        && node.x_kubernetes_int_or_string != Some(true)
}

fn is_integer(value: &Value) -> bool {
    match value {
        Value::Number(n) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => false,
    }
}

fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_of(node: &JSONSchemaProps) -> &str {
    if node.x_kubernetes_int_or_string == Some(true) {
        "integer,string"
    } else {
        node.type_.as_deref().unwrap_or("any")
    }
}

/// Formats a bound the way Go prints it: `1`, not `1.0`.
fn number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn invalid(path: &str, value: Value, detail: String) -> FieldError {
    FieldError {
        path: path.to_owned(),
        kind: FieldErrorKind::Invalid { value, detail },
    }
}

fn body(path: &str) -> &str {
    if path.is_empty() { "body" } else { path }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: Value) -> StructuralSchema {
        StructuralSchema::new(serde_json::from_value(v).unwrap()).unwrap()
    }

    fn problems(v: Value) -> Vec<String> {
        structural_problems(&serde_json::from_value(v).unwrap())
    }

    fn admit(s: &StructuralSchema, mut v: Value) -> Result<Value, Vec<String>> {
        match s.admit(&mut v, UnknownFields::Strict) {
            Ok(_) => Ok(v),
            Err(e) => Err(e.0.iter().map(|e| e.to_string()).collect()),
        }
    }

    fn spec_schema(spec: Value) -> StructuralSchema {
        schema(json!({ "type": "object", "properties": { "spec": spec } }))
    }

    #[test]
    fn a_missing_type_is_not_structural() {
        let p = problems(json!({ "type": "object", "properties": { "a": {} } }));
        assert_eq!(
            p,
            ["openAPIV3Schema.properties[a].type: Required value: must not be empty"]
        );
    }

    #[test]
    fn preserve_unknown_fields_and_int_or_string_need_no_type() {
        let p = problems(json!({ "type": "object", "properties": {
            "a": { "x-kubernetes-preserve-unknown-fields": true },
            "b": { "x-kubernetes-int-or-string": true,
                   "anyOf": [{ "type": "integer" }, { "type": "string" }] }
        }}));
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn types_and_descriptions_inside_junctors_are_not_structural() {
        let p = problems(json!({ "type": "object", "properties": { "a": {
            "type": "object",
            "properties": { "x": { "type": "string" } },
            "anyOf": [{ "type": "object" }, { "description": "d", "required": ["x"] }],
            "oneOf": [{ "properties": { "y": { "minLength": 1 } } }]
        }}}));
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("anyOf[0].type"));
        assert!(p[1].contains("anyOf[1].description"));
        assert!(p[2].contains("oneOf[0].properties[y]"));
    }

    #[test]
    fn arrays_need_items_and_map_lists_need_required_keys() {
        let p = problems(json!({ "type": "object", "properties": {
            "a": { "type": "array" },
            "b": { "type": "array", "x-kubernetes-list-type": "map",
                   "x-kubernetes-list-map-keys": ["name"],
                   "items": { "type": "object", "properties": { "name": { "type": "string" } } } }
        }}));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("properties[a].items: Required value"));
        assert!(p[1].contains("\"name\" must be a required or defaulted property"));
    }

    #[test]
    fn properties_with_additional_properties_is_not_structural() {
        let p = problems(json!({ "type": "object", "properties": { "a": {
            "type": "object", "properties": { "x": { "type": "string" } },
            "additionalProperties": { "type": "string" }
        }}}));
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn an_invalid_default_is_refused() {
        let root = json!({ "type": "object", "properties": {
            "a": { "type": "integer", "minimum": 1, "default": 0 }
        }});
        let err = StructuralSchema::new(serde_json::from_value(root).unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .contains("should be greater than or equal to 1"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_pattern_is_refused_with_its_path() {
        let root = json!({ "type": "object", "properties": {
            "a": { "type": "string", "pattern": "([a-z]" }
        }});
        let err = StructuralSchema::new(serde_json::from_value(root).unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("openAPIV3Schema.properties[a].pattern"),
            "{err}"
        );
    }

    #[test]
    fn wrong_types_name_the_field_and_both_types() {
        let s = spec_schema(json!({ "type": "object", "properties": {
            "n": { "type": "number" }, "i": { "type": "integer" }, "b": { "type": "boolean" }
        }}));
        let errors =
            admit(&s, json!({ "spec": { "n": "high", "i": 1.5, "b": "yes" } })).unwrap_err();
        assert_eq!(
            errors,
            [
                r#"spec.b: Invalid value: "string": spec.b in body must be of type boolean: "string""#,
                r#"spec.i: Invalid value: "number": spec.i in body must be of type integer: "number""#,
                r#"spec.n: Invalid value: "string": spec.n in body must be of type number: "string""#,
            ]
        );
    }

    #[test]
    fn integral_floats_are_integers() {
        let s =
            spec_schema(json!({ "type": "object", "properties": { "i": { "type": "integer" } } }));
        assert!(admit(&s, json!({ "spec": { "i": 3.0 } })).is_ok());
    }

    #[test]
    fn ranges_are_inclusive_unless_exclusive() {
        let s = spec_schema(json!({ "type": "object", "properties": {
            "p": { "type": "number", "minimum": 0, "maximum": 1 },
            "q": { "type": "number", "minimum": 0, "exclusiveMinimum": true }
        }}));
        assert!(admit(&s, json!({ "spec": { "p": 1, "q": 0.1 } })).is_ok());
        let errors = admit(&s, json!({ "spec": { "p": 1.5, "q": 0 } })).unwrap_err();
        assert_eq!(
            errors,
            [
                "spec.p: Invalid value: 1.5: spec.p in body should be less than or equal to 1",
                "spec.q: Invalid value: 0: spec.q in body should be greater than 0",
            ]
        );
    }

    #[test]
    fn required_fields_are_reported_by_path() {
        let s = spec_schema(json!({ "type": "object", "required": ["a"], "properties": {
            "a": { "type": "object", "required": ["b"], "properties": { "b": { "type": "string" } } }
        }}));
        assert_eq!(
            admit(&s, json!({ "spec": {} })).unwrap_err(),
            ["spec.a: Required value"]
        );
        assert_eq!(
            admit(&s, json!({ "spec": { "a": {} } })).unwrap_err(),
            ["spec.a.b: Required value"]
        );
    }

    #[test]
    fn strings_check_length_pattern_enum_and_format() {
        let s = spec_schema(json!({ "type": "object", "properties": {
            "name": { "type": "string", "minLength": 1, "maxLength": 3, "pattern": "^[a-z]+$" },
            "mode": { "type": "string", "enum": ["a", "b"] },
            "at": { "type": "string", "format": "date-time" }
        }}));
        assert!(
            admit(
                &s,
                json!({ "spec": { "name": "ab", "mode": "a",
                                            "at": "2026-11-26T10:00:00Z" } })
            )
            .is_ok()
        );
        let errors = admit(
            &s,
            json!({ "spec": { "name": "ABCD", "mode": "c", "at": "noon" } }),
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                r#"spec.at: Invalid value: "noon": spec.at in body must be of type date-time: "noon""#,
                r#"spec.mode: Unsupported value: "c": supported values: "a", "b""#,
                r#"spec.name: Invalid value: "ABCD": spec.name in body should be at most 3 chars long"#,
                r#"spec.name: Invalid value: "ABCD": spec.name in body should match '^[a-z]+$'"#,
            ]
        );
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        let s = spec_schema(json!({ "type": "object", "properties": {
            "u": { "type": "string", "maxLength": 2 }
        }}));
        assert!(admit(&s, json!({ "spec": { "u": "éé" } })).is_ok());
    }

    #[test]
    fn unknown_fields_are_refused_when_strict_and_pruned_otherwise() {
        let s =
            spec_schema(json!({ "type": "object", "properties": { "a": { "type": "string" } } }));
        let obj = json!({ "apiVersion": "x/v1", "kind": "K", "metadata": { "name": "n" },
                          "spec": { "a": "x", "typo": 1 }, "extra": true });
        assert_eq!(
            admit(&s, obj.clone()).unwrap_err(),
            [r#"unknown field "extra""#, r#"unknown field "spec.typo""#]
        );
        let mut pruned = obj.clone();
        let warnings = s.admit(&mut pruned, UnknownFields::Warn).unwrap();
        assert_eq!(
            warnings,
            [r#"unknown field "extra""#, r#"unknown field "spec.typo""#]
        );
        assert_eq!(
            pruned,
            json!({ "apiVersion": "x/v1", "kind": "K", "metadata": { "name": "n" },
                    "spec": { "a": "x" } })
        );
        let mut ignored = obj;
        assert!(
            s.admit(&mut ignored, UnknownFields::Ignore)
                .unwrap()
                .is_empty()
        );
        assert_eq!(ignored, pruned);
    }

    #[test]
    fn preserved_objects_keep_unknown_fields_but_validate_known_ones() {
        let s = spec_schema(
            json!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true,
            "properties": { "port": { "type": "integer", "maximum": 65535 } } }),
        );
        assert_eq!(
            admit(&s, json!({ "spec": { "anything": [1, 2], "port": 1 } })).unwrap(),
            json!({ "spec": { "anything": [1, 2], "port": 1 } })
        );
        assert_eq!(
            admit(&s, json!({ "spec": { "port": 70000 } }))
                .unwrap_err()
                .len(),
            1
        );
    }

    #[test]
    fn defaults_fill_missing_fields_and_replace_non_nullable_nulls() {
        let s = spec_schema(json!({ "type": "object", "properties": {
            "period": { "type": "integer", "default": 60 },
            "opt": { "type": "string", "nullable": true, "default": "d" },
            "plain": { "type": "string" },
            "nested": { "type": "object", "default": {},
                        "properties": { "flag": { "type": "boolean", "default": false } } }
        }}));
        assert_eq!(
            admit(
                &s,
                json!({ "spec": { "period": null, "opt": null, "plain": null } })
            )
            .unwrap(),
            json!({ "spec": { "period": 60, "opt": null, "nested": { "flag": false } } })
        );
    }

    #[test]
    fn map_lists_refuse_duplicate_keys_and_sets_duplicate_values() {
        let s = spec_schema(json!({ "type": "object", "properties": {
            "env": { "type": "array", "x-kubernetes-list-type": "map",
                     "x-kubernetes-list-map-keys": ["name"],
                     "items": { "type": "object", "required": ["name"],
                                "properties": { "name": { "type": "string" },
                                                "value": { "type": "string" } } } },
            "tags": { "type": "array", "x-kubernetes-list-type": "set",
                      "items": { "type": "string" } }
        }}));
        let errors = admit(
            &s,
            json!({ "spec": {
                "env": [{ "name": "A", "value": "1" }, { "name": "A", "value": "2" }],
                "tags": ["x", "y", "x"]
            }}),
        )
        .unwrap_err();
        assert_eq!(
            errors,
            [
                r#"spec.env[1]: Duplicate value: {"name":"A"}"#,
                r#"spec.tags[2]: Duplicate value: "x""#,
            ]
        );
    }

    #[test]
    fn item_counts_are_bounded() {
        let s = spec_schema(json!({ "type": "object", "properties": {
            "xs": { "type": "array", "minItems": 1, "maxItems": 2, "items": { "type": "integer" } }
        }}));
        assert_eq!(
            admit(&s, json!({ "spec": { "xs": [1, 2, 3] } })).unwrap_err(),
            ["spec.xs: Too many: 3: must have at most 2 items"]
        );
        assert_eq!(
            admit(&s, json!({ "spec": { "xs": [] } })).unwrap_err(),
            ["spec.xs: Invalid value: 0: spec.xs in body should have at least 1 items"]
        );
        assert_eq!(
            admit(&s, json!({ "spec": { "xs": [1, "two"] } })).unwrap_err(),
            [
                r#"spec.xs[1]: Invalid value: "string": spec.xs[1] in body must be of type integer: "string""#
            ]
        );
    }

    #[test]
    fn one_of_required_branches_read_as_a_choice() {
        let s = spec_schema(json!({ "type": "object",
            "properties": { "a": { "type": "string" }, "b": { "type": "string" } },
            "oneOf": [{ "required": ["a"] }, { "required": ["b"] }] }));
        assert!(admit(&s, json!({ "spec": { "a": "x" } })).is_ok());
        let want = [r#"spec: Invalid value: "object": exactly one of a, b must be set"#];
        assert_eq!(admit(&s, json!({ "spec": {} })).unwrap_err(), want);
        assert_eq!(
            admit(&s, json!({ "spec": { "a": "x", "b": "y" } })).unwrap_err(),
            want
        );
    }

    #[test]
    fn int_or_string_accepts_both_and_checks_the_pattern_on_strings() {
        let s = spec_schema(json!({ "type": "object", "additionalProperties": {
            "x-kubernetes-int-or-string": true,
            "anyOf": [{ "type": "integer" }, { "type": "string" }],
            "pattern": "^[0-9]+(m|Gi)?$"
        }}));
        assert!(
            admit(
                &s,
                json!({ "spec": { "cpu": "100m", "memory": "2Gi", "n": 3 } })
            )
            .is_ok()
        );
        assert_eq!(
            admit(&s, json!({ "spec": { "cpu": "lots", "gpu": true } })).unwrap_err(),
            [
                r#"spec[cpu]: Invalid value: "lots": spec[cpu] in body should match '^[0-9]+(m|Gi)?$'"#,
                r#"spec[gpu]: Invalid value: "boolean": spec[gpu] in body must be of type integer,string: "boolean""#,
            ]
        );
    }

    #[test]
    fn max_properties_bounds_an_object() {
        let s = spec_schema(
            json!({ "type": "object", "maxProperties": 1, "properties": {
            "ws": { "type": "object" }, "s3": { "type": "object" } } }),
        );
        assert!(admit(&s, json!({ "spec": { "ws": {} } })).is_ok());
        assert_eq!(
            admit(&s, json!({ "spec": { "ws": {}, "s3": {} } })).unwrap_err(),
            [r#"spec: Invalid value: "object": spec in body should have at most 1 properties"#]
        );
    }

    #[test]
    fn an_object_without_declared_fields_prunes_everything_in_it() {
        let s =
            spec_schema(json!({ "type": "object", "properties": { "ws": { "type": "object" } } }));
        let mut v = json!({ "spec": { "ws": { "port": 1 } } });
        s.admit(&mut v, UnknownFields::Ignore).unwrap();
        assert_eq!(v, json!({ "spec": { "ws": {} } }));
    }

    #[test]
    fn errors_carry_kubernetes_cause_types() {
        let s = spec_schema(json!({ "type": "object", "required": ["a"],
            "properties": { "a": { "type": "string" } } }));
        let mut v = json!({ "spec": {} });
        let errors = s.admit(&mut v, UnknownFields::Strict).unwrap_err();
        assert_eq!(errors.0[0].kind.reason(), "FieldValueRequired");
        assert!(!errors.is_retryable());
    }
}
