//! The verbs on resources: get, list, create, update, patch, delete and deletecollection, with
//! the status subresource, finalizers, preconditions and dry runs. Watch is in `watch.rs`.

use std::sync::Arc;

use base64::Engine;
use serde_json::{Value, json};

use crate::apply;
use crate::builtin;
use crate::error::{ApiError, Cause};
use crate::meta::{self, Part};
use crate::patch::{self, PatchType};
use crate::registry::{ResourceType, types_of_crd};
use crate::request::{Query, Representation, ResourcePath};
use crate::selector::{FieldSelector, LabelSelector};
use crate::server::Api;
use crate::store::{Mutation, Precondition, StoreError, Stored};
use crate::subresources;
use crate::table;
use sedna_api::schema::UnknownFields;

/// Finalizer the server puts on CRDs so that their objects are removed before them.
pub const CRD_CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// A parsed call on a resource.
pub struct Call {
    /// HTTP method.
    pub method: http::Method,
    /// The resource path.
    pub path: ResourcePath,
    /// Query parameters.
    pub query: Query,
    /// The representation the client accepts.
    pub repr: Representation,
    /// Request content type.
    pub content_type: String,
    /// Request body.
    pub body: bytes::Bytes,
    /// First word of the User-Agent, the default field manager.
    pub agent: String,
    /// The resource type.
    pub t: Arc<ResourceType>,
}

/// A successful answer.
pub struct Reply {
    /// HTTP status.
    pub code: u16,
    /// Body.
    pub body: Value,
    /// The body already serialized (large lists are written without building a `Value`);
    /// when set, `body` is ignored.
    pub raw: Option<bytes::Bytes>,
    /// `Warning` headers.
    pub warnings: Vec<String>,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Self {
            code: 200,
            body,
            raw: None,
            warnings: vec![],
        }
    }
}

impl Call {
    fn name(&self) -> &str {
        self.path.name.as_deref().unwrap_or_default()
    }

    fn namespace(&self) -> Option<&str> {
        self.path.namespace.as_deref()
    }

    fn key(&self) -> String {
        self.t.key(self.namespace(), self.name())
    }

    fn part(&self) -> Result<Part, ApiError> {
        match self.path.subresource.as_deref() {
            None => Ok(Part::Main),
            Some("status") if self.t.status_subresource => Ok(Part::Status),
            Some(other) => Err(ApiError::not_found(
                &self.t.group,
                &format!("{}/{other}", self.t.resource),
                self.name(),
            )),
        }
    }

    fn subresource(&self) -> Option<&str> {
        self.path.subresource.as_deref()
    }

    fn manager(&self) -> String {
        self.query
            .get("fieldManager")
            .map(str::to_owned)
            .unwrap_or_else(|| self.agent.clone())
    }

    fn unknown_fields(&self) -> Result<UnknownFields, ApiError> {
        match self.query.get("fieldValidation") {
            None | Some("Warn") => Ok(UnknownFields::Warn),
            Some("Strict") => Ok(UnknownFields::Strict),
            Some("Ignore") => Ok(UnknownFields::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be Ignore, Warn or Strict, not {other:?}"
            ))),
        }
    }

    fn not_found(&self) -> ApiError {
        ApiError::not_found(&self.t.group, &self.t.resource, self.name())
    }

    fn store_error(&self, e: StoreError) -> ApiError {
        ApiError::from_store(e, &self.t.group, &self.t.resource, self.name())
    }
}

/// The object as served by `t` (Events are stored in their core/v1 form).
pub fn served(t: &ResourceType, stored: &Value) -> Value {
    if served_as_stored(t) {
        stored.clone()
    } else {
        builtin::event_from_core(stored)
    }
}

/// Whether `t` serves its objects exactly as they are stored (all but events.k8s.io).
pub fn served_as_stored(t: &ResourceType) -> bool {
    t.group != "events.k8s.io"
}

fn to_storage(t: &ResourceType, obj: Value) -> Value {
    if t.group == "events.k8s.io" {
        builtin::event_to_core(&obj)
    } else {
        obj
    }
}

/// Decodes a request body by content type.
pub fn decode_body(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if media == crate::protobuf::CONTENT_TYPE || body.starts_with(crate::protobuf::MAGIC) {
        return crate::protobuf::decode(body).map_err(ApiError::unsupported_media_type);
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    match media {
        "application/yaml" | "application/apply-patch+yaml" | "application/x-yaml" => {
            // JSON is YAML, and clients (kube-rs, client-go's apply) send JSON under these
            // types: the JSON parser reads it several times faster. Anything it refuses is
            // read as YAML, so YAML that only looks like JSON (`{a: b}`) still parses.
            if let Some(value) = json_in_yaml(body) {
                return Ok(value);
            }
            yaml_flow_work_allowed(body)?;
            serde_norway::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")))
        }
        _ => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}"))),
    }
}

/// The most work a YAML body may ask of the YAML parser, in bytes times `[` and `{` characters.
///
/// libyaml (under serde_norway) scans a flow collection (`[..]`, `{..}`) in time that grows
/// with the body's length times its flow nesting: a 400 KB body of `{a: ` nested 100,000 deep
/// took 60 s of CPU before the parser refused it for depth (bench/RESULTS.md, "Hostile YAML
/// bodies"; the worst body the bound lets through costs 1.5 times a flat one of its size). The nesting is at most the number of `[` and `{` characters, which needs no
/// parsing to count, so their product with the length bounds the work from above whatever the
/// body hides in quotes, comments or block scalars. At this bound a 3 MiB body may have 42 of
/// them, 1 MiB 128, 64 KiB 2,048 (sedna's largest CRD manifest, 55 KB, has 114); JSON bodies
/// (what kubectl, client-go and kube-rs send, also under the YAML content types) never count.
pub const MAX_YAML_FLOW_WORK: usize = 1 << 27;

/// Refuses a YAML body whose `[` and `{` characters, times its length, exceed
/// [`MAX_YAML_FLOW_WORK`].
fn yaml_flow_work_allowed(body: &[u8]) -> Result<(), ApiError> {
    let openers = body.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if openers.saturating_mul(body.len()) <= MAX_YAML_FLOW_WORK {
        return Ok(());
    }
    Err(ApiError::bad_request(format!(
        "the YAML body has {openers} '[' and '{{' characters in {} bytes; a YAML body this \
         size may have at most {} (the YAML parser's work grows with both; send the object \
         as JSON, which has no such limit)",
        body.len(),
        MAX_YAML_FLOW_WORK / body.len().max(1)
    )))
}

/// A YAML body that is a JSON object, parsed as JSON; `None` when it is not one.
fn json_in_yaml(body: &[u8]) -> Option<Value> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[start] != b'{' {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Prunes, defaults and validates an object of `t` (built-ins through their typed form, custom
/// resources through their CRD schema). Returns warnings.
fn normalize(
    api: &Api,
    t: &ResourceType,
    obj: &mut Value,
    unknown: UnknownFields,
) -> Result<Vec<String>, ApiError> {
    let name = meta::meta_str(obj, "name").unwrap_or_default().to_owned();
    if let Some(schema) = &t.schema {
        return schema.admit(obj, unknown).map_err(|errors| {
            let unknown: Vec<String> = errors
                .0
                .iter()
                .filter(|e| e.kind == sedna_api::schema::FieldErrorKind::Unknown)
                .map(|e| e.to_string())
                .collect();
            if !unknown.is_empty() {
                return ApiError::bad_request(format!(
                    "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
                    t.kind,
                    t.version,
                    t.kind,
                    unknown.join(", ")
                ));
            }
            let causes = errors
                .0
                .iter()
                .map(|e| Cause {
                    reason: e.kind.reason().to_owned(),
                    message: e.detail(),
                    field: e.path.clone(),
                })
                .collect();
            ApiError::invalid(&t.kind, &t.group, &name, causes)
        });
    }
    let (normalized, unknown_paths) = builtin::decode(t, obj)?;
    *obj = normalized;
    builtin::validate(t, obj).map_err(|(field, message)| {
        ApiError::invalid_field(&t.kind, &t.group, &name, &field, &message)
    })?;
    if t.group == "apiextensions.k8s.io" {
        check_crd(api, obj)?;
    }
    let described: Vec<String> = unknown_paths
        .iter()
        .map(|p| format!("unknown field {p:?}"))
        .collect();
    match unknown {
        UnknownFields::Strict if !described.is_empty() => Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            described.join(", ")
        ))),
        UnknownFields::Warn => Ok(described),
        _ => Ok(vec![]),
    }
}

/// Checks a CRD's schemas and names; fills in its status.
pub(crate) fn check_crd(api: &Api, obj: &mut Value) -> Result<(), ApiError> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let name = meta::meta_str(obj, "name").unwrap_or_default().to_owned();
    let invalid = |message: String| {
        ApiError::invalid(
            "CustomResourceDefinition",
            "apiextensions.k8s.io",
            &name,
            vec![Cause {
                reason: "FieldValueInvalid".into(),
                message,
                field: "spec".into(),
            }],
        )
    };
    let crd: CustomResourceDefinition =
        serde_json::from_value(obj.clone()).map_err(|e| invalid(e.to_string()))?;
    let types = types_of_crd(&crd).map_err(|e| invalid(e.to_string()))?;
    let clash = types.iter().find_map(|t| api.registry.name_clash(&name, t));
    let now = meta::now();
    let condition = |type_: &str, ok: bool, reason: &str, message: &str| {
        json!({ "type": type_, "status": if ok { "True" } else { "False" },
                "lastTransitionTime": now, "reason": reason, "message": message })
    };
    let accepted = clash.is_none();
    let mut names = serde_json::to_value(&crd.spec.names).unwrap_or_default();
    if names.get("listKind").is_none() {
        names["listKind"] = json!(format!("{}List", crd.spec.names.kind));
    }
    if names.get("singular").is_none() {
        names["singular"] = json!(crd.spec.names.kind.to_lowercase());
    }
    let stored_versions: Vec<&str> = crd
        .spec
        .versions
        .iter()
        .filter(|v| v.storage)
        .map(|v| v.name.as_str())
        .collect();
    obj["status"] = json!({
        "conditions": [
            condition("NamesAccepted", accepted,
                      if accepted { "NoConflicts" } else { "NameConflict" },
                      clash.as_deref().unwrap_or("no conflicts found")),
            condition("Established", accepted,
                      if accepted { "InitialNamesAccepted" } else { "NotAccepted" },
                      if accepted { "the initial names have been accepted" }
                      else { "not all names are accepted" }),
        ],
        "acceptedNames": if accepted { names } else { json!({ "plural": "", "kind": "" }) },
        "storedVersions": stored_versions,
    });
    Ok(())
}

/// Serves (or stops serving) the types of a stored CRD.
pub fn sync_crd(api: &Api, name: &str, stored: Option<&Value>) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let established = stored.is_some_and(|crd| {
        crd.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            })
    });
    let types = stored
        .filter(|_| established)
        .and_then(|v| serde_json::from_value::<CustomResourceDefinition>(v.clone()).ok())
        .and_then(|crd| types_of_crd(&crd).ok());
    match types {
        Some(types) => api.registry.put_crd(name, types),
        None => api.registry.remove_crd(name),
    }
}

fn respond_object(call: &Call, obj: &Value, code: u16, warnings: Vec<String>) -> Reply {
    let obj = served(&call.t, obj);
    let body = match call.repr {
        Representation::Table => {
            let rv = meta::meta_str(&obj, "resourceVersion")
                .unwrap_or_default()
                .to_owned();
            table::table(&call.t, &[&obj], &rv, None, true, include_object(call))
        }
        Representation::PartialMetadata => table::partial_metadata(&obj),
        Representation::Object => obj,
    };
    Reply {
        code,
        body,
        raw: None,
        warnings,
    }
}

fn include_object(call: &Call) -> &str {
    call.query.get("includeObject").unwrap_or("Metadata")
}

/// GET of one object.
pub fn get(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    if subresources::which(&call.path, &call.t) == Some("scale") {
        return subresources::get_scale(api, call);
    }
    call.part()?;
    let stored = api.store.get(&call.key()).ok_or_else(|| call.not_found())?;
    Ok(respond_object(call, &stored.value, 200, vec![]))
}

/// A `continue` token: where a paged list resumes, at which revision.
#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    start: String,
}

fn encode_continue(rv: u64, start: &str) -> String {
    let json = json!({ "rv": rv, "start": start }).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ApiError::bad_request("invalid continue token"))
}

/// The selectors of a list or watch.
pub struct Filter {
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
}

impl Filter {
    /// Parses the selectors of a call.
    pub fn of(call: &Call) -> Result<Self, ApiError> {
        Ok(Self {
            labels: LabelSelector::parse(call.query.get("labelSelector").unwrap_or_default())?,
            fields: FieldSelector::parse(
                call.query.get("fieldSelector").unwrap_or_default(),
                &call.t,
            )?,
        })
    }

    /// Whether a stored object matches.
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

/// The key prefix a list or watch reads: the namespace from the path, else one pinned by a
/// `metadata.namespace` field selector, else all namespaces.
pub fn list_prefix(call: &Call, filter: &Filter) -> String {
    let ns = call
        .namespace()
        .or_else(|| filter.fields.pinned("metadata.namespace"));
    call.t.key_prefix(ns)
}

/// LIST of a collection.
pub fn list(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    let filter = Filter::of(call)?;
    let prefix = list_prefix(call, &filter);
    let limit = call
        .query
        .number("limit")?
        .filter(|l| *l > 0)
        .map(|l| l as usize);
    let continue_token = call
        .query
        .get("continue")
        .map(decode_continue)
        .transpose()?;
    let rv_param = call.query.get("resourceVersion");
    let rv_match = call.query.get("resourceVersionMatch");
    let (items, rv): (Vec<Arc<Stored>>, u64) = match (&continue_token, rv_param, rv_match) {
        (Some(token), _, _) => {
            if token.rv < api.store.compacted() {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            let items = if token.rv == api.store.head() {
                api.store.list(&prefix).0
            } else {
                api.store
                    .list_at(&prefix, token.rv)
                    .map_err(|e| call.store_error(e))?
            };
            (items, token.rv)
        }
        (None, Some(rv), Some("Exact")) => {
            let rv: u64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?;
            let items = api
                .store
                .list_at(&prefix, rv)
                .map_err(|e| call.store_error(e))?;
            (items, rv)
        }
        (None, Some(rv), _) if rv != "0" => {
            let rv: u64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?;
            let (items, head) = api.store.list(&prefix);
            if rv > head {
                return Err(ApiError::timeout(format!(
                    "Too large resource version: {rv}, current: {head}"
                )));
            }
            (items, head)
        }
        _ => api.store.list(&prefix),
    };
    let start = continue_token.as_ref().map(|t| t.start.as_str());
    let mut selected: Vec<&Arc<Stored>> = Vec::new();
    let mut remaining = 0usize;
    for stored in &items {
        if let Some(s) = start
            && key_of(&call.t, &stored.value).as_str() <= s
        {
            continue;
        }
        if !filter.matches(&stored.value) {
            continue;
        }
        if let Some(limit) = limit
            && selected.len() >= limit
        {
            remaining += 1;
            continue;
        }
        selected.push(stored);
    }
    let continue_value = (remaining > 0)
        .then(|| selected.last().map(|s| key_of(&call.t, &s.value)))
        .flatten()
        .map(|last| encode_continue(rv, &last));
    if call.repr == Representation::Table {
        let objects: Vec<Value> = selected.iter().map(|s| served(&call.t, &s.value)).collect();
        let refs: Vec<&Value> = objects.iter().collect();
        return Ok(Reply::ok(table::table(
            &call.t,
            &refs,
            &rv.to_string(),
            continue_value.as_deref(),
            true,
            include_object(call),
        )));
    }
    let partial = call.repr == Representation::PartialMetadata;
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if let Some(c) = &continue_value {
        metadata["continue"] = json!(c);
        metadata["remainingItemCount"] = json!(remaining);
    }
    let (kind, api_version) = if partial {
        (
            "PartialObjectMetadataList".to_owned(),
            "meta.k8s.io/v1".to_owned(),
        )
    } else {
        (format!("{}List", call.t.kind), call.t.api_version())
    };
    // Written item by item from the stored objects: no copy of the list is built.
    let mut out = Vec::with_capacity(256 + selected.len() * 512);
    let head = json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata });
    let head = serde_json::to_vec(&head).map_err(|e| ApiError::internal(e.to_string()))?;
    out.extend_from_slice(&head[..head.len() - 1]);
    out.extend_from_slice(b",\"items\":[");
    for (i, stored) in selected.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let written = if partial {
            serde_json::to_writer(&mut out, &table::partial_metadata(&stored.value))
        } else if call.t.storage_group != call.t.group {
            serde_json::to_writer(&mut out, &served(&call.t, &stored.value))
        } else {
            serde_json::to_writer(&mut out, stored.value.as_ref())
        };
        written.map_err(|e| ApiError::internal(e.to_string()))?;
    }
    out.extend_from_slice(b"]}");
    Ok(Reply {
        code: 200,
        body: Value::Null,
        raw: Some(out.into()),
        warnings: vec![],
    })
}

/// The storage key of a stored object of `t`.
fn key_of(t: &ResourceType, obj: &Value) -> String {
    t.key(
        meta::meta_str(obj, "namespace"),
        meta::meta_str(obj, "name").unwrap_or_default(),
    )
}

fn check_kind(call: &Call, obj: &Value) -> Result<(), ApiError> {
    if let Some(v) = obj.get("apiVersion").and_then(Value::as_str)
        && v != call.t.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({v}) does not match the expected API version ({})",
            call.t.api_version()
        )));
    }
    if let Some(k) = obj.get("kind").and_then(Value::as_str)
        && k != call.t.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            call.t.kind
        )));
    }
    Ok(())
}

/// Whether creating in a namespace is allowed (it exists and is not terminating).
fn check_namespace(api: &Api, t: &ResourceType, ns: Option<&str>) -> Result<(), ApiError> {
    let Some(ns) = ns.filter(|_| t.namespaced) else {
        return Ok(());
    };
    match api.store.get(&format!("core/namespaces//{ns}")) {
        None => Err(ApiError::not_found("", "namespaces", ns)),
        Some(n) if meta::is_deleting(&n.value) => Err(ApiError::forbidden(format!(
            "{} is forbidden: unable to create new content in namespace {ns} because it is \
             being terminated",
            t.resource
        ))),
        Some(_) => Ok(()),
    }
}

/// Prepares a new object (metadata, kind strategy, validation, managed fields) from a decoded
/// body. Returns its key, the object and warnings.
fn prepare_new(
    api: &Api,
    call: &Call,
    mut obj: Value,
    manager: Option<&str>,
) -> Result<(String, Value, Vec<String>), ApiError> {
    check_kind(call, &obj)?;
    let t = &call.t;
    let name = meta::prepare_create(t, &mut obj, call.namespace())?;
    check_namespace(api, t, call.namespace())?;
    if !t.custom {
        let used: Vec<String> = if t.resource == "services" && t.group.is_empty() {
            api.store
                .list("core/services/")
                .0
                .iter()
                .filter_map(|s| s.value.pointer("/spec/clusterIP").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        } else {
            vec![]
        };
        builtin::prepare_create(t, &mut obj, &used);
    }
    if t.group == "apiextensions.k8s.io" {
        let mut list = meta::finalizers(&obj);
        if !list.iter().any(|f| f == CRD_CLEANUP_FINALIZER) {
            list.push(CRD_CLEANUP_FINALIZER.to_owned());
        }
        meta::set_finalizers(&mut obj, &list);
    }
    let warnings = normalize(api, t, &mut obj, call.unknown_fields()?)?;
    if let Some(manager) = manager {
        apply::record_update(t, None, &mut obj, manager, call.subresource());
    }
    let key = t.key(call.namespace(), &name);
    Ok((key, to_storage(t, obj), warnings))
}

fn after_write(api: &Api, t: &ResourceType, stored: &Value, deleted: bool) {
    if t.group == "apiextensions.k8s.io" {
        let name = meta::meta_str(stored, "name").unwrap_or_default();
        sync_crd(api, name, if deleted { None } else { Some(stored) });
    }
}

/// POST to a collection.
pub async fn create(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    match subresources::which(&call.path, &call.t) {
        Some("binding") => return subresources::bind(api, call).await,
        Some("eviction") => return subresources::evict(api, call).await,
        Some("token") => return crate::tokenrequest::create(api, call),
        _ => {}
    }
    if call.path.subresource.is_some() {
        return Err(ApiError::method_not_allowed(
            "create is not supported on subresources",
        ));
    }
    let obj = decode_body(&call.content_type, &call.body)?;
    let (key, obj, warnings) = prepare_new(api, call, obj, Some(&call.manager()))?;
    if call.query.dry_run() {
        return Ok(respond_object(call, &obj, 201, warnings));
    }
    let name = meta::meta_str(&obj, "name").unwrap_or_default().to_owned();
    let stored = api
        .store
        .write(key, Precondition::Absent, Mutation::Put(obj))
        .await
        .map_err(|e| ApiError::from_store(e, &call.t.group, &call.t.resource, &name))?;
    after_write(api, &call.t, &stored.value, false);
    Ok(respond_object(call, &stored.value, 201, warnings))
}

/// Equal apart from resourceVersion and managedFields timestamps: such a write is a no-op.
fn unchanged(old: &Value, new: &Value) -> bool {
    // An object without metadata compares as one with empty metadata.
    let empty = Value::Object(serde_json::Map::new());
    meta::equal_except(old, new, &["metadata"])
        && meta::equal_except(
            old.get("metadata").unwrap_or(&empty),
            new.get("metadata").unwrap_or(&empty),
            &["resourceVersion", "managedFields"],
        )
}

/// Finishes an update of `current` into `new`: keeps server-owned fields, validates, records
/// managed fields (unless `manager` is `None`, for applies), and writes it conditionally.
/// An object being deleted whose last finalizer went is removed.
async fn commit_update(
    api: &Api,
    call: &Call,
    current: &Stored,
    mut new: Value,
    manager: Option<&str>,
) -> Result<Reply, ApiError> {
    let t = &call.t;
    let part = call.part()?;
    let old_served = served(t, &current.value);
    meta::prepare_update(t, &old_served, &mut new, part)?;
    if t.group == "apiextensions.k8s.io" {
        // The server owns a CRD's status.
        new["status"] = old_served.get("status").cloned().unwrap_or(Value::Null);
    }
    let warnings = normalize(api, t, &mut new, call.unknown_fields()?)?;
    if let Some(manager) = manager {
        apply::record_update(t, Some(&old_served), &mut new, manager, call.subresource());
    }
    let new = to_storage(t, new);
    if unchanged(&current.value, &new) {
        return Ok(respond_object(call, &current.value, 200, warnings));
    }
    if call.query.dry_run() {
        return Ok(respond_object(call, &new, 200, warnings));
    }
    let key = call.key();
    if meta::is_deleting(&new) && meta::finalizers(&new).is_empty() && !namespace_pending(t, &new) {
        let stored = api
            .store
            .write(key, Precondition::Revision(current.rev), Mutation::Delete)
            .await
            .map_err(|e| call.store_error(e))?;
        after_write(api, t, &stored.value, true);
        return Ok(respond_object(call, &stored.value, 200, warnings));
    }
    let stored = api
        .store
        .write(key, Precondition::Revision(current.rev), Mutation::Put(new))
        .await
        .map_err(|e| call.store_error(e))?;
    after_write(api, t, &stored.value, false);
    Ok(respond_object(call, &stored.value, 200, warnings))
}

/// Whether a namespace still waits for its content to be removed (`spec.finalizers`).
fn namespace_pending(t: &ResourceType, obj: &Value) -> bool {
    t.group.is_empty()
        && t.resource == "namespaces"
        && obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty())
}

/// PUT of one object (or its status).
pub async fn update(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    if subresources::which(&call.path, &call.t) == Some("scale") {
        return subresources::write_scale(api, call).await;
    }
    let new = decode_body(&call.content_type, &call.body)?;
    check_kind(call, &new)?;
    if let Some(body_name) = meta::meta_str(&new, "name")
        && body_name != call.name()
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({})",
            call.name()
        )));
    }
    let current = api.store.get(&call.key()).ok_or_else(|| call.not_found())?;
    match meta::meta_str(&new, "resourceVersion") {
        Some(rv) if rv != current.rev.to_string() => {
            return Err(ApiError::conflict(
                &call.t.group,
                &call.t.resource,
                call.name(),
            ));
        }
        None if call.t.custom => {
            return Err(ApiError::invalid_field(
                &call.t.kind,
                &call.t.group,
                call.name(),
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
            ));
        }
        _ => {}
    }
    commit_update(api, call, &current, new, Some(&call.manager())).await
}

/// PATCH of one object (or its status), retried on conflicts with concurrent writers.
pub async fn patch(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    if subresources::which(&call.path, &call.t) == Some("scale") {
        return subresources::write_scale(api, call).await;
    }
    let patch_type = PatchType::from_content_type(&call.content_type).ok_or_else(|| {
        ApiError::unsupported_media_type(format!(
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, \
             application/apply-patch+yaml{}",
            if call.t.custom {
                ""
            } else {
                ", application/strategic-merge-patch+json"
            }
        ))
    })?;
    if patch_type == PatchType::Strategic && call.t.custom {
        return Err(ApiError::unsupported_media_type(
            "strategic merge patch is not supported for custom resources: use a merge patch \
             (application/merge-patch+json) or server-side apply",
        ));
    }
    if patch_type != PatchType::Apply && call.query.get("force").is_some() {
        return Err(ApiError::invalid_field(
            "PatchOptions",
            "meta.k8s.io",
            "",
            "force",
            "Forbidden: may not be specified for non-apply patch",
        ));
    }
    let body: Value = if patch_type == PatchType::Apply {
        decode_body("application/apply-patch+yaml", &call.body)?
    } else {
        serde_json::from_slice(&call.body)
            .map_err(|e| ApiError::bad_request(format!("invalid patch body: {e}")))?
    };
    if patch_type == PatchType::Apply {
        return server_side_apply(api, call, body).await;
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current = api.store.get(&call.key()).ok_or_else(|| call.not_found())?;
        let live = served(&call.t, &current.value);
        let limits = patch_limits(api);
        let patched = match patch_type {
            PatchType::Merge => patch::merge(&live, &body),
            PatchType::Json => {
                patch::json(&live, &body, &limits).map_err(|e| patch_error(call, e))?
            }
            PatchType::Strategic => {
                patch::strategic(&call.t, &live, &body).map_err(ApiError::bad_request)?
            }
            PatchType::Apply => unreachable!("handled above"),
        };
        patch::check_result(&patched, &limits).map_err(|e| patch_error(call, e))?;
        // A patch carrying a resourceVersion is a precondition.
        if let Some(rv) = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && rv != current.rev.to_string()
        {
            return Err(ApiError::conflict(
                &call.t.group,
                &call.t.resource,
                call.name(),
            ));
        }
        match commit_update(api, call, &current, patched, Some(&call.manager())).await {
            Err(e) if e.code == 409 && e.reason == "Conflict" && attempt < 5 => continue,
            other => return other,
        }
    }
}

/// What a patch result is held to on this server.
fn patch_limits(api: &Api) -> patch::Limits {
    patch::Limits {
        max_bytes: api.config.max_body_bytes,
    }
}

/// A refused patch: 413 when it is too big (as Kubernetes answers), else 422 with the reason.
fn patch_error(call: &Call, e: patch::PatchError) -> ApiError {
    match e {
        patch::PatchError::TooManyOperations(_) | patch::PatchError::TooLarge(_) => {
            ApiError::too_large_because(e.to_string())
        }
        patch::PatchError::Invalid(_) | patch::PatchError::TooDeep => {
            ApiError::invalid_field(&call.t.kind, &call.t.group, call.name(), "", &e.to_string())
        }
    }
}

async fn server_side_apply(api: &Api, call: &Call, body: Value) -> Result<Reply, ApiError> {
    let manager = call.query.get("fieldManager").ok_or_else(|| {
        ApiError::invalid_field(
            "PatchOptions",
            "meta.k8s.io",
            "",
            "fieldManager",
            "Required value: is required for apply patch",
        )
    })?;
    if body.get("apiVersion").is_none() || body.get("kind").is_none() {
        return Err(ApiError::bad_request(
            "an applied configuration must set apiVersion and kind",
        ));
    }
    check_kind(call, &body)?;
    if let Some(n) = meta::meta_str(&body, "name")
        && n != call.name()
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({})",
            call.name()
        )));
    }
    let force = call.query.flag("force");
    let subresource = call.subresource();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current = api.store.get(&call.key());
        let live = current.as_ref().map(|c| served(&call.t, &c.value));
        let merged = apply::apply(&call.t, live.as_ref(), &body, manager, force, subresource)
            .map_err(|conflicts| {
                let n = conflicts.len();
                let listed: Vec<String> = conflicts
                    .iter()
                    .map(|c| {
                        format!(
                            "conflict with {:?} using {}: {}",
                            c.manager,
                            call.t.api_version(),
                            c.field
                        )
                    })
                    .collect();
                let causes = conflicts
                    .iter()
                    .map(|c| Cause {
                        reason: "FieldManagerConflict".into(),
                        message: format!(
                            "conflict with {:?} using {}",
                            c.manager,
                            call.t.api_version()
                        ),
                        field: c.field.clone(),
                    })
                    .collect();
                let why = format!(
                    "Apply failed with {n} conflict{}: {}",
                    if n == 1 { "" } else { "s" },
                    listed.join("\n")
                );
                let mut e = ApiError::conflict_with(
                    &call.t.group,
                    &call.t.resource,
                    call.name(),
                    &why,
                    causes,
                );
                e.message = why;
                e
            })?;
        patch::check_result(&merged, &patch_limits(api)).map_err(|e| patch_error(call, e))?;
        let result = match &current {
            None => {
                if call.path.subresource.is_some() {
                    return Err(call.not_found());
                }
                let mut obj = merged;
                meta::metadata_mut(&mut obj).insert("name".into(), json!(call.name()));
                let (key, obj, warnings) = prepare_new(api, call, obj, None)?;
                if call.query.dry_run() {
                    return Ok(respond_object(call, &obj, 201, warnings));
                }
                match api
                    .store
                    .write(key, Precondition::Absent, Mutation::Put(obj))
                    .await
                {
                    Ok(stored) => {
                        after_write(api, &call.t, &stored.value, false);
                        Ok(respond_object(call, &stored.value, 201, warnings))
                    }
                    Err(e) => Err(call.store_error(e)),
                }
            }
            Some(current) => commit_update(api, call, current, merged, None).await,
        };
        match result {
            Err(e)
                if e.code == 409
                    && attempt < 5
                    && e.details.as_ref().is_none_or(|d| d.causes.is_empty()) =>
            {
                continue;
            }
            other => return other,
        }
    }
}

/// Options of a delete, from the body (DeleteOptions) or the query.
struct DeleteOptions {
    propagation: String,
    grace: Option<i64>,
    uid: Option<String>,
    resource_version: Option<String>,
}

fn delete_options(call: &Call) -> Result<DeleteOptions, ApiError> {
    let body: Value = if call.body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        decode_body(&call.content_type, &call.body)?
    };
    let propagation = body["propagationPolicy"]
        .as_str()
        .or(call.query.get("propagationPolicy"))
        .unwrap_or("Background")
        .to_owned();
    if !matches!(propagation.as_str(), "Background" | "Foreground" | "Orphan") {
        return Err(ApiError::bad_request(format!(
            "propagationPolicy must be Background, Foreground or Orphan, not {propagation:?}"
        )));
    }
    if body["orphanDependents"] == true {
        return Ok(DeleteOptions {
            propagation: "Orphan".into(),
            grace: body["gracePeriodSeconds"].as_i64(),
            uid: None,
            resource_version: None,
        });
    }
    Ok(DeleteOptions {
        propagation,
        grace: body["gracePeriodSeconds"]
            .as_i64()
            .or(call.query.number("gracePeriodSeconds")?),
        uid: body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_owned),
        resource_version: body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// Deletes one stored object: marks it for deletion when finalizers, a foreground or orphan
/// policy, or a pod's grace period say so, otherwise removes it. Returns the code (200 when
/// removed, 202 when marked) and the object.
pub async fn delete_object(
    api: &Api,
    t: &ResourceType,
    key: &str,
    current: &Stored,
    propagation: &str,
    grace: Option<i64>,
    dry_run: bool,
) -> Result<(u16, Value), StoreError> {
    let mut obj = current.value.as_ref().clone();
    let mut finalizers = meta::finalizers(&obj);
    let policy_finalizer = match propagation {
        "Foreground" => Some("foregroundDeletion"),
        "Orphan" => Some("orphan"),
        _ => None,
    };
    let already_deleting = meta::is_deleting(&obj);
    if let Some(f) = policy_finalizer
        && !already_deleting
        && !finalizers.iter().any(|x| x == f)
    {
        finalizers.push(f.to_owned());
    }
    let pod_grace = if t.group.is_empty() && t.resource == "pods" {
        let bound = obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let default = obj
            .pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30);
        let grace = grace.unwrap_or(default);
        let running = !matches!(
            obj.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        (bound && running && grace > 0).then_some(grace)
    } else {
        None
    };
    let namespace_content = namespace_pending(t, &obj);
    if finalizers.is_empty() && pod_grace.is_none() && !namespace_content {
        if dry_run {
            return Ok((200, obj));
        }
        let stored = api
            .store
            .write(
                key.to_owned(),
                Precondition::Revision(current.rev),
                Mutation::Delete,
            )
            .await?;
        after_write(api, t, &stored.value, true);
        return Ok((200, stored.value.as_ref().clone()));
    }
    if already_deleting && pod_grace.is_none() {
        return Ok((202, obj));
    }
    meta::set_finalizers(&mut obj, &finalizers);
    let m = meta::metadata_mut(&mut obj);
    let when = match pod_grace {
        Some(g) => k8s_openapi::jiff::Timestamp::now()
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(g))
            .unwrap_or(k8s_openapi::jiff::Timestamp::now())
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
        None => meta::now(),
    };
    if !already_deleting || pod_grace.is_some() {
        m.insert("deletionTimestamp".into(), json!(when));
        m.insert(
            "deletionGracePeriodSeconds".into(),
            json!(pod_grace.unwrap_or(0)),
        );
    }
    if namespace_content {
        obj["status"]["phase"] = json!("Terminating");
    }
    m_remove_rv(&mut obj);
    if dry_run {
        return Ok((202, obj));
    }
    let stored = api
        .store
        .write(
            key.to_owned(),
            Precondition::Revision(current.rev),
            Mutation::Put(obj),
        )
        .await?;
    Ok((202, stored.value.as_ref().clone()))
}

fn m_remove_rv(obj: &mut Value) {
    meta::metadata_mut(obj).remove("resourceVersion");
}

/// DELETE of one object.
pub async fn delete(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    if call.path.subresource.is_some() {
        return Err(ApiError::method_not_allowed(
            "delete is not supported on subresources",
        ));
    }
    let options = delete_options(call)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current = api.store.get(&call.key()).ok_or_else(|| call.not_found())?;
        let uid = meta::meta_str(&current.value, "uid").unwrap_or_default();
        if let Some(want) = &options.uid
            && want != uid
        {
            return Err(ApiError::conflict_with(
                &call.t.group,
                &call.t.resource,
                call.name(),
                &format!(
                    "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                ),
                vec![],
            ));
        }
        if let Some(want) = &options.resource_version
            && *want != current.rev.to_string()
        {
            return Err(ApiError::conflict_with(
                &call.t.group,
                &call.t.resource,
                call.name(),
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {want}, \
                     ResourceVersion in object meta: {}",
                    current.rev
                ),
                vec![],
            ));
        }
        match delete_object(
            api,
            &call.t,
            &call.key(),
            &current,
            &options.propagation,
            options.grace,
            call.query.dry_run(),
        )
        .await
        {
            Ok((code, obj)) => return Ok(respond_object(call, &obj, code, vec![])),
            Err(StoreError::Conflict) if attempt < 5 => continue,
            Err(e) => return Err(call.store_error(e)),
        }
    }
}

/// DELETE of a collection (with selectors).
pub async fn delete_collection(api: &Api, call: &Call) -> Result<Reply, ApiError> {
    let options = delete_options(call)?;
    let filter = Filter::of(call)?;
    let prefix = list_prefix(call, &filter);
    let (items, _) = api.store.list(&prefix);
    let mut deleted = Vec::new();
    for stored in items {
        if !filter.matches(&stored.value) {
            continue;
        }
        let key = key_of(&call.t, &stored.value);
        match delete_object(
            api,
            &call.t,
            &key,
            &stored,
            &options.propagation,
            options.grace,
            call.query.dry_run(),
        )
        .await
        {
            Ok((_, obj)) => deleted.push(served(&call.t, &obj)),
            Err(StoreError::NotFound | StoreError::Conflict) => {}
            Err(e) => return Err(call.store_error(e)),
        }
    }
    Ok(Reply::ok(json!({
        "kind": format!("{}List", call.t.kind),
        "apiVersion": call.t.api_version(),
        "metadata": { "resourceVersion": api.store.head().to_string() },
        "items": deleted,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yaml_body_that_is_json_reads_as_the_yaml_parser_reads_it() {
        let json = br#" {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
            "data": {"a": "1", "b": "yes", "n": null}, "list": [1, 2.5, true]}"#;
        let fast = decode_body("application/apply-patch+yaml", json).unwrap();
        let yaml: Value = serde_norway::from_slice(json).unwrap();
        assert_eq!(fast, yaml);
        assert_eq!(fast["data"]["b"], "yes", "a JSON string stays a string");
    }

    #[test]
    fn a_yaml_body_nested_100000_deep_is_refused_before_the_yaml_parser_sees_it() {
        // Before the limit, libyaml spent 60 s of CPU on the first body (release build).
        for deep in [
            "{a: ".repeat(100_000),
            "{a: \"}\", b: ".repeat(20_000),
            format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000)),
        ] {
            let e = decode_body("application/apply-patch+yaml", deep.as_bytes()).unwrap_err();
            assert_eq!(e.code, 400);
            assert!(
                e.message.contains("'[' and '{' characters in"),
                "{}",
                e.message
            );
            assert!(
                e.message.contains("send the object as JSON"),
                "{}",
                e.message
            );
        }
        // The same nesting as JSON is the JSON parser's to refuse, and it does.
        let json = format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        let e = decode_body("application/json", json.as_bytes()).unwrap_err();
        assert!(e.message.contains("invalid JSON body"), "{}", e.message);
    }

    #[test]
    fn the_yaml_work_limit_is_brackets_times_length() {
        let len = 1 << 17;
        let allowed = MAX_YAML_FLOW_WORK / len;
        let mut body = vec![b'a'; len];
        body[..allowed / 2].fill(b'[');
        body[allowed / 2..allowed].fill(b'{');
        assert!(yaml_flow_work_allowed(&body).is_ok());
        body[allowed] = b'{';
        let e = yaml_flow_work_allowed(&body).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(
            e.message.contains(&format!(
                "{} '[' and '{{' characters in {len} bytes",
                allowed + 1
            )),
            "{}",
            e.message
        );
        assert!(
            e.message.contains(&format!("at most {allowed}")),
            "{}",
            e.message
        );
    }

    #[test]
    fn every_crd_manifest_sent_as_yaml_is_within_the_limit_and_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/manifests");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read(&path).unwrap();
            let served = decode_body("application/yaml", &text)
                .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.message));
            let direct: Value = serde_norway::from_slice(&text).unwrap();
            assert_eq!(served, direct, "{}", path.display());
            seen += 1;
        }
        assert!(seen >= 5, "only {seen} manifests in {}", dir.display());
    }

    #[test]
    fn a_deeply_nested_yaml_body_is_refused_by_both_parsers_without_crashing() {
        let deep = format!("{}{}", "{\"a\":".repeat(2_000), "}".repeat(2_000));
        let e = decode_body("application/apply-patch+yaml", deep.as_bytes()).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(e.message.contains("invalid YAML body"), "{}", e.message);
        let fine = format!("{}1{}", "{\"a\":".repeat(50), "}".repeat(50));
        assert!(decode_body("application/apply-patch+yaml", fine.as_bytes()).is_ok());
    }

    #[test]
    fn a_yaml_body_that_only_looks_like_json_still_parses_as_yaml() {
        let flow = b"{metadata: {name: c}, data: {a: b}}";
        let v = decode_body("application/yaml", flow).unwrap();
        assert_eq!(v["metadata"]["name"], "c");
        let block = b"metadata:\n  name: c\n";
        assert_eq!(
            decode_body("application/apply-patch+yaml", block).unwrap()["metadata"]["name"],
            "c"
        );
        let broken = decode_body("application/yaml", b"{metadata: [").unwrap_err();
        assert!(
            broken.message.contains("invalid YAML body"),
            "{}",
            broken.message
        );
    }
}
