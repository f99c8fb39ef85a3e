//! Which objects each node needs, and what to send when something changes.
//!
//! The hub watches each kind once and feeds every change here. A node's *view* is: its Node,
//! the Pods bound to it, the ConfigMaps and Secrets those pods use, the sedna.io
//! workloads that own its pods or whose templates name it, the Models and Datasets those
//! workloads name, the Datasets placed on it (`nodeName` or a matching `nodeSelector`), the
//! Devices attached to it and their DeviceModels. Nothing else ever reaches the node.
//!
//! Not its own Lease: the node writes it (a renewal every 10 s, one API write every 20–30 s)
//! and needs nothing back; sent down, each write came back to the node as a message and an
//! acknowledgement, a third of a connected idle node's traffic. The hub still caches Leases
//! (the renewal throttle and the node lifecycle read them).
//!
//! Views exist only for connected nodes; a change recomputes the views of the nodes it can
//! affect (those whose view refers to the object, and those the object names) and yields the
//! upserts and deletes that bring each node to its new view.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use sedna_api::references::{Reference, pod_references, workload_references};
use serde_json::Value;

/// The kinds the hub routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 Pod.
    Pod,
    /// core/v1 ConfigMap.
    ConfigMap,
    /// core/v1 Secret.
    Secret,
    /// core/v1 Node.
    Node,
    /// coordination.k8s.io/v1 Lease (node leases, in `kube-node-lease`).
    Lease,
    /// sedna.io Dataset.
    Dataset,
    /// sedna.io Model.
    Model,
    /// sedna.io JointInferenceService.
    JointInferenceService,
    /// sedna.io IncrementalLearningJob.
    IncrementalLearningJob,
    /// sedna.io FederatedLearningJob.
    FederatedLearningJob,
    /// devices.sedna.io Device.
    Device,
    /// devices.sedna.io DeviceModel.
    DeviceModel,
}

impl Kind {
    /// Every routed kind.
    pub const ALL: [Kind; 12] = [
        Kind::Pod,
        Kind::ConfigMap,
        Kind::Secret,
        Kind::Node,
        Kind::Lease,
        Kind::Dataset,
        Kind::Model,
        Kind::JointInferenceService,
        Kind::IncrementalLearningJob,
        Kind::FederatedLearningJob,
        Kind::Device,
        Kind::DeviceModel,
    ];

    /// `apiVersion`.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Pod | Kind::ConfigMap | Kind::Secret | Kind::Node => "v1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::Dataset
            | Kind::Model
            | Kind::JointInferenceService
            | Kind::IncrementalLearningJob
            | Kind::FederatedLearningJob => "sedna.io/v1alpha1",
            Kind::Device | Kind::DeviceModel => "devices.sedna.io/v1beta1",
        }
    }

    /// `kind`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::ConfigMap => "ConfigMap",
            Kind::Secret => "Secret",
            Kind::Node => "Node",
            Kind::Lease => "Lease",
            Kind::Dataset => "Dataset",
            Kind::Model => "Model",
            Kind::JointInferenceService => "JointInferenceService",
            Kind::IncrementalLearningJob => "IncrementalLearningJob",
            Kind::FederatedLearningJob => "FederatedLearningJob",
            Kind::Device => "Device",
            Kind::DeviceModel => "DeviceModel",
        }
    }

    /// Plural resource name.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::ConfigMap => "configmaps",
            Kind::Secret => "secrets",
            Kind::Node => "nodes",
            Kind::Lease => "leases",
            Kind::Dataset => "datasets",
            Kind::Model => "models",
            Kind::JointInferenceService => "jointinferenceservices",
            Kind::IncrementalLearningJob => "incrementallearningjobs",
            Kind::FederatedLearningJob => "federatedlearningjobs",
            Kind::Device => "devices",
            Kind::DeviceModel => "devicemodels",
        }
    }

    /// Whether objects live in namespaces.
    pub fn namespaced(self) -> bool {
        self != Kind::Node
    }

    /// The kind of an `apiVersion`/`kind` pair, if routed.
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }

    fn workload(self) -> bool {
        matches!(
            self,
            Kind::JointInferenceService | Kind::IncrementalLearningJob | Kind::FederatedLearningJob
        )
    }
}

/// Identifies an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    /// Its kind.
    pub kind: Kind,
    /// Namespace (`""` for nodes).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjKey {
    /// A key.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: if kind.namespaced() {
                namespace.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        }
    }
}

/// An object as the hub caches it: what nodes are sent (its JSON, encoded once) and the few
/// fields the hub itself reads (see [`Object::value`]).
#[derive(Debug)]
pub struct Object {
    /// Its key.
    pub key: ObjKey,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.resourceVersion`, as a number (0 when not numeric).
    pub rv: u64,
    /// What the object names among the routed kinds, read once when it is cached: a pod's
    /// ConfigMaps, Secrets and owning workload; a workload's Models and Datasets; a device's
    /// DeviceModel.
    pub refs: Box<[ObjKey]>,
    /// The nodes it names directly: a pod's, device's or dataset's `spec.nodeName`, a Node
    /// itself, the nodes a workload's templates name.
    pub named: Box<[Box<str>]>,
    /// A Node's [`crate::partitions::PARTITION_LABEL`].
    pub partition_label: Option<Box<str>>,
    /// A Node carries the [`crate::lifecycle::UNREACHABLE_TAINT`]: the lifecycle judges a
    /// connected node without it as fine without reading its other fields.
    pub unreachable_taint: bool,
    /// The fields the hub reads to authorize and judge liveness (see `slim`), as JSON text,
    /// parsed when read ([`Object::value`]): a parsed JSON map costs hundreds of bytes even
    /// nearly empty (a B-tree leaf), so a Node's few fields cost ≈ 4 KiB parsed and a few
    /// hundred bytes as text, and the hub holds three objects for every node.
    slim: Box<str>,
    json: Arc<[u8]>,
}

impl PartialEq for Object {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
            && self.uid == other.uid
            && self.rv == other.rv
            && self.json == other.json
    }
}

/// The part of `value` (of `kind`) the hub reads; see [`Object::value`]. Every fleet-sized
/// kind keeps only its few fields: a Pod its `spec.nodeName` (its references are
/// [`Object::refs`]), a Node its labels, annotations, creation time, taints and Ready
/// condition, a Lease its `spec`. A parsed JSON map costs hundreds of bytes even when
/// nearly empty, and the hub holds three of these objects for every node.
fn slim(kind: Kind, value: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(meta) = value.get("metadata").and_then(Value::as_object) {
        let keep: &[&str] = match kind {
            Kind::Node => &["labels", "annotations", "creationTimestamp"],
            Kind::Pod | Kind::Lease => &[],
            _ => &["labels"],
        };
        let m: serde_json::Map<String, Value> = keep
            .iter()
            .filter_map(|k| Some(((*k).to_owned(), meta.get(*k)?.clone())))
            .collect();
        if !m.is_empty() {
            out.insert("metadata".into(), Value::Object(m));
        }
    }
    let spec = value.get("spec");
    let spec = match kind {
        Kind::ConfigMap | Kind::Secret => None,
        Kind::Pod => spec.map(|s| pick(s, &["nodeName"])),
        Kind::Node => spec.map(|s| pick(s, &["taints"])),
        _ => spec.cloned(),
    };
    if let Some(spec) = spec {
        out.insert("spec".into(), spec);
    }
    if kind == Kind::Node {
        let ready: Vec<Value> = value
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
            .cloned()
            .collect();
        out.insert("status".into(), serde_json::json!({ "conditions": ready }));
    }
    Value::Object(out)
}

/// The `fields` of an object that it has.
fn pick(v: &Value, fields: &[&str]) -> Value {
    Value::Object(
        fields
            .iter()
            .filter_map(|f| Some(((*f).to_owned(), v.get(*f)?.clone())))
            .collect(),
    )
}

/// What an object of `kind` (in namespace `ns`) names among the routed kinds (see
/// [`Object::refs`]).
fn references_of(kind: Kind, ns: &str, value: &Value) -> Box<[ObjKey]> {
    let references = match kind {
        Kind::Pod => pod_references(value),
        k if k.workload() => workload_references(k.name(), value),
        Kind::Device => {
            return str_at(value, &["spec", "deviceModelRef", "name"])
                .map(|model| ObjKey::new(Kind::DeviceModel, ns, model))
                .into_iter()
                .collect();
        }
        _ => return Box::new([]),
    };
    let mut keys = BTreeSet::new();
    add_references(references, ns, &mut keys);
    keys.into_iter().collect()
}

impl Object {
    /// Builds the cached form of an API object of `kind`; `None` without a name or uid.
    /// `metadata.managedFields` (server-side apply's bookkeeping) is left out: nodes never
    /// read it, and it is often the largest part of a small object.
    pub fn from_value(kind: Kind, mut value: Value) -> Option<Object> {
        let meta = value.get_mut("metadata")?.as_object_mut()?;
        meta.remove("managedFields");
        let name = meta.get("name")?.as_str()?.to_owned();
        let namespace = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let uid = meta.get("uid")?.as_str()?.to_owned();
        let rv = meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        Some(Object {
            key: ObjKey::new(kind, &namespace, &name),
            uid,
            rv,
            json: serde_json::to_vec(&value).ok()?.into(),
            refs: references_of(kind, &namespace, &value),
            named: named_nodes(kind, &name, &value)
                .into_iter()
                .map(String::into_boxed_str)
                .collect(),
            partition_label: (kind == Kind::Node)
                .then(|| crate::partitions::label_of(&value).map(Into::into))
                .flatten(),
            unreachable_taint: kind == Kind::Node
                && crate::lifecycle::has_unreachable_taint(&value),
            slim: serde_json::to_string(&slim(kind, &value)).ok()?.into(),
        })
    }

    /// The fields the hub reads (see `slim`): metadata's labels (a Node's annotations and
    /// creation time too), `spec` (a Pod's `nodeName` only, a Node's `taints` only; none for
    /// ConfigMaps and Secrets) and a Node's Ready condition. Parsed on each call.
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.slim).unwrap_or_default()
    }

    /// The node a pod, device or dataset is placed on (`spec.nodeName`), if any.
    pub fn node_name(&self) -> Option<&str> {
        match self.key.kind {
            Kind::Pod | Kind::Device | Kind::Dataset => self.named.first().map(|n| &**n),
            _ => None,
        }
    }

    /// The whole object as JSON bytes (without `managedFields`), shared by every node it is
    /// sent to.
    pub fn json(&self) -> Arc<[u8]> {
        self.json.clone()
    }
}

/// What a node must be told.
#[derive(Clone, Debug, PartialEq)]
pub enum Downstream {
    /// Store (or replace) this object.
    Upsert(Arc<Object>),
    /// Forget this object.
    Delete {
        /// Its key.
        key: ObjKey,
        /// Its uid.
        uid: String,
        /// The last version the node was sent.
        rv: u64,
    },
}

impl Downstream {
    /// The object's uid.
    pub fn uid(&self) -> &str {
        match self {
            Downstream::Upsert(o) => &o.uid,
            Downstream::Delete { uid, .. } => uid,
        }
    }

    /// The version it carries.
    pub fn rv(&self) -> u64 {
        match self {
            Downstream::Upsert(o) => o.rv,
            Downstream::Delete { rv, .. } => *rv,
        }
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = v;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_str()
}

/// Adds what `references` name (in namespace `ns`) to `out`, for the kinds the hub routes.
fn add_references(references: Vec<Reference>, ns: &str, out: &mut BTreeSet<ObjKey>) {
    for r in references {
        if let Some(kind) = Kind::of(r.api_version, r.kind) {
            out.insert(ObjKey::new(kind, ns, &r.name));
        }
    }
}

/// Node names a workload's pod templates name.
fn workload_nodes(kind: Kind, w: &Value) -> BTreeSet<String> {
    let mut templates: Vec<&Value> = Vec::new();
    let spec = w.get("spec");
    let get = |path: &[&str]| {
        let mut v = spec?;
        for p in path {
            v = v.get(*p)?;
        }
        Some(v)
    };
    match kind {
        Kind::JointInferenceService => {
            templates.extend(get(&["edgeWorker", "template"]));
            templates.extend(get(&["cloudWorker", "template"]));
        }
        Kind::IncrementalLearningJob => {
            for stage in ["trainSpec", "evalSpec", "deploySpec"] {
                templates.extend(get(&[stage, "template"]));
            }
        }
        Kind::FederatedLearningJob => {
            templates.extend(get(&["aggregationWorker", "template"]));
            if let Some(ws) = get(&["trainingWorkers"]).and_then(Value::as_array) {
                templates.extend(ws.iter().filter_map(|t| t.get("template")));
            }
        }
        _ => {}
    }
    templates
        .into_iter()
        .filter_map(|t| str_at(t, &["spec", "nodeName"]))
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

fn labels_match(selector: &serde_json::Map<String, Value>, node: Option<&Value>) -> bool {
    let labels = node
        .and_then(|n| n.pointer("/metadata/labels"))
        .and_then(Value::as_object);
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The routing state.
#[derive(Default)]
pub struct Router {
    objects: HashMap<ObjKey, Arc<Object>>,
    pods_by_node: HashMap<String, BTreeSet<ObjKey>>,
    devices_by_node: HashMap<String, BTreeSet<ObjKey>>,
    datasets_by_node: HashMap<String, BTreeSet<ObjKey>>,
    selector_datasets: BTreeSet<ObjKey>,
    workloads: BTreeSet<ObjKey>,
    /// Each connected node's view, sorted by key (a slice, not a map: a B-tree's first leaf
    /// alone is ≈ 700 bytes, for the three or four objects of a typical node).
    views: HashMap<String, Box<[Arc<Object>]>>,
    refs: HashMap<ObjKey, HashSet<String>>,
    node_refs: HashMap<String, Box<[ObjKey]>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("objects", &self.objects.len())
            .field("connected", &self.views.len())
            .finish()
    }
}

/// Nodes an object of `kind` named `name` names directly (see [`Object::named`]).
fn named_nodes(kind: Kind, name: &str, v: &Value) -> BTreeSet<String> {
    let one = |s: Option<&str>| {
        s.filter(|n| !n.is_empty())
            .map(str::to_owned)
            .into_iter()
            .collect()
    };
    match kind {
        Kind::Pod | Kind::Device | Kind::Dataset => one(str_at(v, &["spec", "nodeName"])),
        Kind::Node => one(Some(name)),
        k if k.workload() => workload_nodes(k, v),
        _ => BTreeSet::new(),
    }
}

/// [`Object::named`], as the set [`Router::refresh`] takes.
fn named_set(obj: &Object) -> BTreeSet<String> {
    obj.named.iter().map(|n| n.to_string()).collect()
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached object, if any.
    pub fn get(&self, key: &ObjKey) -> Option<&Arc<Object>> {
        self.objects.get(key)
    }

    /// Number of cached objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Whether `key` is in `node`'s view (for connected nodes).
    pub fn in_view(&self, node: &str, key: &ObjKey) -> bool {
        self.views
            .get(node)
            .is_some_and(|v| v.binary_search_by(|o| o.key.cmp(key)).is_ok())
    }

    /// The objects with these uids in a connected node's view.
    pub fn view_objects(&self, node: &str, uids: &HashSet<String>) -> Vec<Arc<Object>> {
        self.views
            .get(node)
            .map(|v| {
                v.iter()
                    .filter(|o| uids.contains(&o.uid))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The cached objects of `kind`, in no order, without copying them.
    pub fn objects_of(&self, kind: Kind) -> impl Iterator<Item = &Arc<Object>> {
        self.objects.values().filter(move |o| o.key.kind == kind)
    }

    /// The pods bound to `node` (from the index the routing keeps): `(namespace, name, uid)`.
    pub fn pods_on(&self, node: &str) -> Vec<(String, String, String)> {
        self.pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|key| self.objects.get(key))
            .map(|pod| {
                (
                    pod.key.namespace.clone(),
                    pod.key.name.clone(),
                    pod.uid.clone(),
                )
            })
            .collect()
    }

    /// Every cached key of a kind (for relists).
    pub fn keys_of(&self, kind: Kind) -> Vec<ObjKey> {
        self.objects
            .keys()
            .filter(|k| k.kind == kind)
            .cloned()
            .collect()
    }

    /// The cached objects that belong to one node, with it: Nodes, node Leases (named after
    /// their node) and the Pods bound to a node (see [`crate::interest`]).
    pub fn node_bound(&self) -> Vec<(ObjKey, Box<str>)> {
        self.objects
            .iter()
            .filter_map(|(key, obj)| {
                let node = match key.kind {
                    Kind::Node | Kind::Lease => &*key.name,
                    Kind::Pod => obj.node_name()?,
                    _ => return None,
                };
                Some((key.clone(), node.into()))
            })
            .collect()
    }

    fn index(&mut self, obj: &Arc<Object>, insert: bool) {
        let key = obj.key.clone();
        let node = obj.node_name().unwrap_or_default().to_owned();
        let index = match key.kind {
            Kind::Pod => Some(&mut self.pods_by_node),
            Kind::Device => Some(&mut self.devices_by_node),
            Kind::Dataset => Some(&mut self.datasets_by_node),
            _ => None,
        };
        if let Some(index) = index
            && !node.is_empty()
        {
            let set = index.entry(node.clone()).or_default();
            if insert {
                set.insert(key.clone());
            } else {
                set.remove(&key);
                if set.is_empty() {
                    index.remove(&node);
                }
            }
        }
        if key.kind == Kind::Dataset && obj.value().pointer("/spec/nodeSelector").is_some() {
            if insert {
                self.selector_datasets.insert(key.clone());
            } else {
                self.selector_datasets.remove(&key);
            }
        }
        if key.kind.workload() {
            if insert {
                self.workloads.insert(key);
            } else {
                self.workloads.remove(&key);
            }
        }
    }

    /// The view of `node`: the objects present, and every key it refers to (present or not).
    fn compute_view(&self, node: &str) -> (BTreeMap<ObjKey, Arc<Object>>, BTreeSet<ObjKey>) {
        let mut wanted: BTreeSet<ObjKey> = BTreeSet::new();
        let node_key = ObjKey::new(Kind::Node, "", node);
        wanted.insert(node_key.clone());
        let empty = BTreeSet::new();
        let pods = self.pods_by_node.get(node).unwrap_or(&empty);
        for key in pods {
            wanted.insert(key.clone());
            if let Some(pod) = self.objects.get(key) {
                wanted.extend(pod.refs.iter().cloned());
            }
        }
        for key in &self.workloads {
            if let Some(w) = self.objects.get(key)
                && w.named.iter().any(|n| &**n == node)
            {
                wanted.insert(key.clone());
            }
        }
        for key in self.datasets_by_node.get(node).unwrap_or(&empty) {
            wanted.insert(key.clone());
        }
        if !self.selector_datasets.is_empty() {
            let node_value = self.objects.get(&node_key).map(|n| n.value());
            for key in &self.selector_datasets {
                let dataset = self.objects.get(key).map(|d| d.value());
                let selector = dataset
                    .as_ref()
                    .and_then(|d| d.pointer("/spec/nodeSelector"))
                    .and_then(Value::as_object);
                if let Some(sel) = selector
                    && labels_match(sel, node_value.as_ref())
                {
                    wanted.insert(key.clone());
                }
            }
        }
        for key in self.devices_by_node.get(node).unwrap_or(&empty) {
            wanted.insert(key.clone());
            if let Some(d) = self.objects.get(key) {
                wanted.extend(d.refs.iter().cloned());
            }
        }
        let workloads: Vec<ObjKey> = wanted
            .iter()
            .filter(|k| k.kind.workload())
            .cloned()
            .collect();
        for key in workloads {
            if let Some(w) = self.objects.get(&key) {
                wanted.extend(w.refs.iter().cloned());
            }
        }
        let present = wanted
            .iter()
            .filter_map(|k| self.objects.get(k).map(|o| (k.clone(), o.clone())))
            .collect();
        (present, wanted)
    }

    fn set_refs(&mut self, node: &str, refs: BTreeSet<ObjKey>) {
        if let Some(old) = self.node_refs.remove(node) {
            for key in old {
                if let Some(set) = self.refs.get_mut(&key) {
                    set.remove(node);
                    if set.is_empty() {
                        self.refs.remove(&key);
                    }
                }
            }
        }
        for key in &refs {
            self.refs
                .entry(key.clone())
                .or_default()
                .insert(node.to_owned());
        }
        self.node_refs
            .insert(node.to_owned(), refs.into_iter().collect());
    }

    /// Starts tracking a connected node; returns its view.
    pub fn attach(&mut self, node: &str) -> Vec<Arc<Object>> {
        let (present, refs) = self.compute_view(node);
        self.set_refs(node, refs);
        let objects = present.values().cloned().collect();
        self.views
            .insert(node.to_owned(), present.into_values().collect());
        objects
    }

    /// Stops tracking a node.
    pub fn detach(&mut self, node: &str) {
        self.views.remove(node);
        self.set_refs(node, BTreeSet::new());
        self.node_refs.remove(node);
    }

    /// Records a new or changed object; returns what connected nodes must be sent.
    pub fn upsert(&mut self, obj: Object) -> Vec<(String, Downstream)> {
        let obj = Arc::new(obj);
        let old = self.objects.insert(obj.key.clone(), obj.clone());
        if let Some(o) = &old {
            self.index(o, false);
        }
        self.index(&obj, true);
        let mut candidates = named_set(&obj);
        if let Some(o) = &old {
            candidates.extend(named_set(o));
        }
        self.refresh(&obj.key, candidates)
    }

    /// Records a deletion; returns what connected nodes must be sent.
    pub fn delete(&mut self, key: &ObjKey) -> Vec<(String, Downstream)> {
        let Some(old) = self.objects.remove(key) else {
            return Vec::new();
        };
        self.index(&old, false);
        self.refresh(key, named_set(&old))
    }

    fn refresh(&mut self, key: &ObjKey, named: BTreeSet<String>) -> Vec<(String, Downstream)> {
        let mut nodes: BTreeSet<String> = named;
        if let Some(referring) = self.refs.get(key) {
            nodes.extend(referring.iter().cloned());
        }
        if key.kind == Kind::Dataset {
            nodes.extend(self.views.keys().cloned());
        }
        let mut out = Vec::new();
        for node in nodes {
            // The view is computed from the objects and indexes alone, never from views.
            let Some(old_view) = self.views.remove(&node) else {
                continue;
            };
            let (new_view, refs) = self.compute_view(&node);
            for old_obj in &old_view {
                match new_view.get(&old_obj.key) {
                    Some(new_obj) if new_obj.uid == old_obj.uid => {}
                    _ => out.push((
                        node.clone(),
                        Downstream::Delete {
                            key: old_obj.key.clone(),
                            uid: old_obj.uid.clone(),
                            rv: old_obj.rv,
                        },
                    )),
                }
            }
            for (k, new_obj) in &new_view {
                let changed = match old_view.binary_search_by(|o| o.key.cmp(k)) {
                    Ok(i) => !Arc::ptr_eq(&old_view[i], new_obj),
                    Err(_) => true,
                };
                if changed {
                    out.push((node.clone(), Downstream::Upsert(new_obj.clone())));
                }
            }
            self.set_refs(&node, refs);
            self.views.insert(node, new_view.into_values().collect());
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A cached object of `kind`: `extra`'s fields are added, its `metadata` merged.
    pub(crate) fn obj(kind: Kind, ns: &str, name: &str, rv: u64, extra: Value) -> Object {
        let mut v = json!({ "apiVersion": kind.api_version(), "kind": kind.name(),
            "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{name}-{ns}"),
                          "resourceVersion": rv.to_string() } });
        if let (Some(base), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in extra {
                if k == "metadata" {
                    for (mk, mv) in x.as_object().into_iter().flatten() {
                        base["metadata"][mk] = mv.clone();
                    }
                } else {
                    base.insert(k.clone(), x.clone());
                }
            }
        }
        Object::from_value(kind, v).unwrap()
    }

    fn pod(name: &str, node: &str, rv: u64, cm: &str) -> Object {
        obj(
            Kind::Pod,
            "default",
            name,
            rv,
            json!({ "spec": { "nodeName": node,
            "containers": [{ "name": "c", "envFrom": [{ "configMapRef": { "name": cm } }] }],
            "volumes": [{ "name": "s", "secret": { "secretName": "creds" } }] } }),
        )
    }

    fn names(out: &[(String, Downstream)], node: &str) -> Vec<String> {
        out.iter()
            .filter(|(n, _)| n == node)
            .map(|(_, d)| match d {
                Downstream::Upsert(o) => format!("+{}", o.key.name),
                Downstream::Delete { key, .. } => format!("-{}", key.name),
            })
            .collect()
    }

    #[test]
    fn the_cache_keeps_the_whole_object_as_json_and_parses_only_what_the_hub_reads() {
        let node = obj(
            Kind::Node,
            "",
            "a",
            3,
            json!({ "metadata": { "labels": { "zone": "z1" }, "annotations": { "x": "y" },
                    "managedFields": [{ "manager": "kubectl", "fieldsV1": { "f:metadata": {} } }] },
                "spec": { "taints": [] },
                "status": { "conditions": [{ "type": "MemoryPressure", "status": "False" },
                    { "type": "Ready", "status": "True" }], "images": [{ "names": ["x"] }] } }),
        );
        let sent: Value = serde_json::from_slice(&node.json()).unwrap();
        assert!(sent.pointer("/metadata/managedFields").is_none());
        assert_eq!(sent["status"]["images"][0]["names"][0], "x");
        assert_eq!(sent["status"]["conditions"].as_array().unwrap().len(), 2);
        assert_eq!(node.value()["metadata"]["labels"]["zone"], "z1");
        assert_eq!(node.value()["metadata"]["annotations"]["x"], "y");
        assert_eq!(
            node.value()["status"]["conditions"],
            json!([{ "type": "Ready", "status": "True" }])
        );
        assert!(node.value().pointer("/status/images").is_none());
        let cm = obj(
            Kind::ConfigMap,
            "default",
            "c",
            1,
            json!({ "data": { "k": "v" } }),
        );
        assert!(cm.value().get("data").is_none());
        let sent: Value = serde_json::from_slice(&cm.json()).unwrap();
        assert_eq!(sent["data"]["k"], "v");
        let p = pod("p", "a", 2, "cfg");
        assert_eq!(
            p.value(),
            json!({ "spec": { "nodeName": "a" } }),
            "no containers, no names"
        );
        let sent: Value = serde_json::from_slice(&p.json()).unwrap();
        assert_eq!(sent["spec"]["containers"][0]["name"], "c");
        // What it names is read once, as keys.
        assert_eq!(
            p.refs.to_vec(),
            [
                ObjKey::new(Kind::ConfigMap, "default", "cfg"),
                ObjKey::new(Kind::Secret, "default", "creds"),
            ]
        );
        assert_eq!(node.value()["spec"], json!({ "taints": [] }));
        assert!(node.refs.is_empty());
        assert!(!node.unreachable_taint);
        let tainted = obj(
            Kind::Node,
            "",
            "b",
            1,
            json!({ "spec": { "taints": [{ "key": crate::lifecycle::UNREACHABLE_TAINT,
                                            "effect": "NoSchedule" }] } }),
        );
        assert!(tainted.unreachable_taint);
        let lease = obj(
            Kind::Lease,
            "kube-node-lease",
            "a",
            4,
            json!({ "spec": { "holderIdentity": "a", "leaseDurationSeconds": 40 } }),
        );
        assert_eq!(
            lease.value(),
            json!({ "spec": { "holderIdentity": "a", "leaseDurationSeconds": 40 } })
        );
    }

    #[test]
    fn a_node_sees_the_workload_owning_its_pod() {
        let mut r = Router::new();
        r.upsert(obj(
            Kind::FederatedLearningJob,
            "default",
            "fl",
            1,
            json!({ "spec": {} }),
        ));
        r.upsert(obj(
            Kind::Pod,
            "default",
            "fl-agg",
            2,
            json!({ "metadata": { "ownerReferences": [{ "apiVersion": "sedna.io/v1alpha1",
                        "kind": "FederatedLearningJob", "name": "fl", "uid": "u" }] },
                    "spec": { "nodeName": "cloud", "containers": [{ "name": "c" }] } }),
        ));
        r.attach("cloud");
        assert!(r.in_view(
            "cloud",
            &ObjKey::new(Kind::FederatedLearningJob, "default", "fl")
        ));
    }

    #[test]
    fn a_node_sees_its_pods_and_what_they_use_and_nothing_else() {
        let mut r = Router::new();
        r.upsert(obj(Kind::ConfigMap, "default", "cfg-a", 1, json!({})));
        r.upsert(obj(Kind::ConfigMap, "default", "cfg-b", 1, json!({})));
        r.upsert(obj(Kind::Secret, "default", "creds", 1, json!({})));
        r.upsert(obj(Kind::Node, "", "a", 1, json!({})));
        r.upsert(pod("p-a", "a", 2, "cfg-a"));
        r.upsert(pod("p-b", "b", 2, "cfg-b"));
        let mut view: Vec<String> = r.attach("a").iter().map(|o| o.key.name.clone()).collect();
        view.sort();
        assert_eq!(view, ["a", "cfg-a", "creds", "p-a"]);
        let b: Vec<String> = r.attach("b").iter().map(|o| o.key.name.clone()).collect();
        assert!(!b.contains(&"cfg-a".to_owned()) && !b.contains(&"p-a".to_owned()));
    }

    #[test]
    fn a_nodes_own_lease_is_cached_but_never_sent_back_to_it() {
        let mut r = Router::new();
        r.upsert(obj(Kind::Node, "", "a", 1, json!({})));
        let lease = |rv| obj(Kind::Lease, "kube-node-lease", "a", rv, json!({}));
        r.upsert(lease(2));
        let view: Vec<Kind> = r.attach("a").iter().map(|o| o.key.kind).collect();
        assert_eq!(view, [Kind::Node]);
        let renewed = r.upsert(lease(3));
        assert!(names(&renewed, "a").is_empty(), "{renewed:?}");
        let key = ObjKey::new(Kind::Lease, "kube-node-lease", "a");
        assert_eq!(r.get(&key).map(|l| l.rv), Some(3));
        assert!(!r.in_view("a", &key));
    }

    #[test]
    fn changes_reach_exactly_the_nodes_that_need_them() {
        let mut r = Router::new();
        r.upsert(obj(Kind::ConfigMap, "default", "cfg-a", 1, json!({})));
        r.upsert(pod("p-a", "a", 2, "cfg-a"));
        r.attach("a");
        r.attach("b");
        let out = r.upsert(obj(Kind::ConfigMap, "default", "cfg-a", 5, json!({})));
        assert_eq!(names(&out, "a"), ["+cfg-a"]);
        assert!(names(&out, "b").is_empty());
        // A new pod on b using cfg-a brings cfg-a to b.
        let out = r.upsert(pod("p-b", "b", 6, "cfg-a"));
        let mut got = names(&out, "b");
        got.sort();
        assert_eq!(got, ["+cfg-a", "+p-b"]);
        assert!(names(&out, "a").is_empty());
        // Moving p-a away from a removes it and its config map from a.
        let out = r.upsert(pod("p-a", "c", 7, "cfg-a"));
        let mut got = names(&out, "a");
        got.sort();
        assert_eq!(got, ["-cfg-a", "-p-a"]);
        let out = r.delete(&ObjKey::new(Kind::ConfigMap, "default", "cfg-a"));
        assert_eq!(names(&out, "b"), ["-cfg-a"]);
    }

    #[test]
    fn an_object_created_after_the_pod_that_uses_it_is_routed() {
        let mut r = Router::new();
        r.upsert(pod("p-a", "a", 2, "late"));
        r.attach("a");
        let out = r.upsert(obj(Kind::ConfigMap, "default", "late", 3, json!({})));
        assert_eq!(names(&out, "a"), ["+late"]);
    }

    #[test]
    fn workloads_devices_and_datasets_follow_their_nodes() {
        let mut r = Router::new();
        r.upsert(obj(
            Kind::Node,
            "",
            "a",
            1,
            json!({ "metadata": { "labels": { "zone": "north" } } }),
        ));
        r.upsert(obj(Kind::Model, "default", "small", 1, json!({})));
        r.upsert(obj(Kind::Model, "default", "unrelated", 1, json!({})));
        r.upsert(obj(Kind::JointInferenceService, "default", "ji", 1, json!({ "spec": {
            "edgeWorker": { "model": { "name": "small" }, "template": { "spec": { "nodeName": "a" } } },
            "cloudWorker": { "model": { "name": "big" }, "template": { "spec": { "nodeName": "cloud" } } } } })));
        r.upsert(obj(
            Kind::Dataset,
            "default",
            "by-name",
            1,
            json!({ "spec": { "nodeName": "a" } }),
        ));
        r.upsert(obj(
            Kind::Dataset,
            "default",
            "by-label",
            1,
            json!({ "spec": { "nodeSelector": { "zone": "north" } } }),
        ));
        r.upsert(obj(
            Kind::Dataset,
            "default",
            "elsewhere",
            1,
            json!({ "spec": { "nodeSelector": { "zone": "south" } } }),
        ));
        r.upsert(obj(Kind::DeviceModel, "default", "camera", 1, json!({})));
        r.upsert(obj(
            Kind::Device,
            "default",
            "cam-1",
            1,
            json!({ "spec": { "nodeName": "a",
            "deviceModelRef": { "name": "camera" } } }),
        ));
        let mut view: Vec<String> = r.attach("a").iter().map(|o| o.key.name.clone()).collect();
        view.sort();
        assert_eq!(
            view,
            ["a", "by-label", "by-name", "cam-1", "camera", "ji", "small"]
        );
        // Relabelling the node changes which selector datasets it holds.
        let out = r.upsert(obj(
            Kind::Node,
            "",
            "a",
            2,
            json!({ "metadata": { "labels": { "zone": "south" } } }),
        ));
        let mut got = names(&out, "a");
        got.sort();
        assert_eq!(got, ["+a", "+elsewhere", "-by-label"]);
    }

    #[test]
    fn detached_nodes_get_nothing() {
        let mut r = Router::new();
        r.upsert(pod("p-a", "a", 1, "cfg"));
        r.attach("a");
        r.detach("a");
        assert!(r.upsert(pod("p-a", "a", 2, "cfg")).is_empty());
    }
}
