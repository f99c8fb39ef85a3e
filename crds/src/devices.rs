//! `DeviceModel` and `Device` (`devices.sedna.io/v1beta1`): the devices (cameras, sensors) edge
//! nodes talk to, with KubeEdge v1beta1's field names. A device's properties are read and
//! written by a mapper on its node; desired values flow down, reported values (twins) flow up.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, FreeForm, NAME_PATTERN, NameRef, free_form_object_schema};

/// The most properties a device model or a device may declare.
pub const MAX_PROPERTIES: usize = 256;

/// The most methods a device may declare.
pub const MAX_METHODS: usize = 64;

/// The blueprint of a kind of device: its properties and protocol.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "devices.sedna.io",
    version = "v1beta1",
    kind = "DeviceModel",
    namespaced,
    status = "DeviceModelStatus",
    category = "iot",
    doc = "A kind of device: the properties every such device has and the protocol it speaks.",
    printcolumn(name = "Protocol", type_ = "string", json_path = ".spec.protocol"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModelSpec {
    /// The properties of the device, unique by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PROPERTIES), extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"]
    ))]
    pub properties: Vec<ModelProperty>,
    /// Name of the protocol the device speaks (e.g. `modbus`, `mqtt`, `onvif`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub protocol: Option<String>,
    /// Protocol settings shared by every device of this model; a device may override them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_schema")]
    pub protocol_config_data: Option<FreeForm>,
}

/// A property of a device model (a temperature, a switch, a video stream).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelProperty {
    /// Property name. `saveFrame` and `saveVideo` select the built-in stream capture.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// What the property is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Value type.
    #[serde(rename = "type")]
    pub type_: PropertyType,
    /// Whether the property can be written.
    #[serde(default)]
    pub access_mode: AccessMode,
    /// Lowest value, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<String>,
    /// Highest value, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<String>,
    /// Unit of the value (e.g. `Celsius`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub unit: Option<String>,
    /// How a mapper reaches the property; a device may override it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitors: Option<VisitorConfig>,
}

/// Value type of a device property.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PropertyType {
    /// A 64-bit integer.
    Int,
    /// A 32-bit float.
    Float,
    /// A 64-bit float.
    Double,
    /// Text.
    String,
    /// `true` or `false`.
    Boolean,
    /// Raw bytes.
    Bytes,
    /// A media stream (camera): captured as frames or clips, not as twin values.
    Stream,
}

/// Access mode of a device property.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AccessMode {
    /// The property can be read and written (it has a desired value).
    ReadWrite,
    /// The property can only be read.
    #[default]
    ReadOnly,
}

/// How a mapper reaches a property: the protocol and its settings for this property.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VisitorConfig {
    /// Name of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub protocol_name: Option<String>,
    /// Protocol settings for the property (register, topic, offset, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_schema")]
    pub config_data: Option<FreeForm>,
}

/// What the controllers know of a device model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModelStatus {
    /// Conditions, one per type (`Accepted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::common::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// One device: its model, node, protocol settings and property values.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "devices.sedna.io",
    version = "v1beta1",
    kind = "Device",
    namespaced,
    status = "DeviceStatus",
    category = "iot",
    doc = "A device attached to an edge node, with desired and reported property values.",
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.deviceModelRef.name"
    ),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    selectable = ".spec.nodeName"
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// The DeviceModel this device is an instance of.
    pub device_model_ref: NameRef,
    /// The edge node the device is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub node_name: Option<String>,
    /// Per-property settings and desired values, unique by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PROPERTIES), extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"]
    ))]
    pub properties: Vec<DeviceProperty>,
    /// How to connect to the device.
    #[serde(default)]
    pub protocol: ProtocolConfig,
    /// Methods that change several properties at once, unique by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_METHODS), extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"]
    ))]
    pub methods: Vec<DeviceMethod>,
    /// How the device's state (online, offline) is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_report: Option<StateReportConfig>,
    /// Record the device's readings into a Dataset on its node (a Sedna extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
}

/// Recording a device's readings into a Dataset: one CSV row per reading
/// (`timestamp,device,property,value`), appended on the node whether or not the hub is
/// reachable, the oldest rows dropped beyond the bounds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capture {
    /// The Dataset (same namespace, `format: csv`, `nodeName` the device's node, its `url` a
    /// path under the node's capture directory).
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub dataset: String,
    /// The properties recorded (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PROPERTIES))]
    pub properties: Vec<String>,
    /// The most rows kept (default 100,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_samples: Option<i64>,
    /// The most bytes kept (default 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 1_099_511_627_776_i64))]
    pub max_bytes: Option<i64>,
}

/// How to connect to a device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolConfig {
    /// Name of the protocol (e.g. `modbus`, `mqtt`, `onvif`, `rtsp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub protocol_name: Option<String>,
    /// Protocol settings (address, port, stream URL, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_schema")]
    pub config_data: Option<FreeForm>,
}

/// A property of one device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProperty {
    /// Name of the property, as in the device model.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// The value the device should have (ReadWrite properties).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinProperty>,
    /// How the mapper reaches this property on this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitors: Option<VisitorConfig>,
    /// How often, in milliseconds, the mapper reports the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub report_cycle: Option<i64>,
    /// How often, in milliseconds, the mapper reads the value from the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub collect_cycle: Option<i64>,
    /// Whether reported values are sent to the cloud (otherwise they stay on the edge).
    #[serde(default)]
    pub report_to_cloud: bool,
    /// Where the mapper also pushes each value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_method: Option<PushMethod>,
}

/// A property value with metadata (timestamp, type).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct TwinProperty {
    /// The value, as text.
    pub value: String,
    /// Metadata such as `timestamp` and `type`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// Destinations a mapper pushes property values to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushMethod {
    /// An HTTP endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<PushMethodHttp>,
    /// An MQTT topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<PushMethodMqtt>,
    /// An OpenTelemetry metrics endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otel: Option<PushMethodOtel>,
    /// A database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_method: Option<DbMethod>,
    /// Settings of an anomaly-detection service, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_schema")]
    pub anomaly_detection: Option<FreeForm>,
}

/// Push to an HTTP endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushMethodHttp {
    /// Host name or address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_name: Option<String>,
    /// TCP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i64>,
    /// Request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_path: Option<String>,
    /// Timeout in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub timeout: Option<i64>,
}

/// Publish to an MQTT topic.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushMethodMqtt {
    /// Broker address, e.g. `tcp://127.0.0.1:1883`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Quality of service, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2))]
    pub qos: Option<i32>,
    /// Whether the broker retains the message.
    #[serde(default)]
    pub retained: bool,
}

/// Export to an OpenTelemetry endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PushMethodOtel {
    /// Endpoint URL, e.g. `http://127.0.0.1:4318/v1/metrics`.
    #[serde(
        rename = "endpointURL",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub endpoint_url: Option<String>,
}

/// Write to a database. Settings are passed through to the mapper; credentials come from
/// mounted files, never from these fields.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct DbMethod {
    /// InfluxDB 2 (`influxdb2ClientConfig`, `influxdb2DataConfig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_schema")]
    pub influxdb2: Option<FreeForm>,
    /// Redis (`redisClientConfig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_schema")]
    pub redis: Option<FreeForm>,
    /// TDengine (`TDEngineClientConfig`).
    #[serde(rename = "TDEngine", default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_schema")]
    pub tdengine: Option<FreeForm>,
    /// MySQL (`mysqlClientConfig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object_schema")]
    pub mysql: Option<FreeForm>,
}

/// A method of a device: a named group of properties changed together.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMethod {
    /// Method name.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The properties it changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PROPERTIES))]
    pub property_names: Vec<String>,
}

/// How a device's state is reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateReportConfig {
    /// Whether the state is sent to the cloud.
    #[serde(default)]
    pub report_to_cloud: bool,
    /// How often, in milliseconds, the state is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub report_cycle: Option<i64>,
}

/// What the device's mapper reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// Reported values, one per property, unique by property name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PROPERTIES), extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["propertyName"]
    ))]
    pub twins: Vec<Twin>,
    /// State of the device, e.g. `online`, `offline`, `unhealthy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub state: Option<String>,
    /// When the device was last seen online (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_online_time: Option<String>,
    /// Whether the state is reported to the cloud.
    #[serde(default)]
    pub report_to_cloud: bool,
    /// How often, in milliseconds, the state is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub report_cycle: Option<i64>,
}

/// The reported value of one property, and the desired value the mapper last saw.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    /// Name of the property.
    #[schemars(length(min = 1, max = 128))]
    pub property_name: String,
    /// The value the device reported.
    #[serde(default)]
    pub reported: TwinProperty,
    /// The desired value the mapper has applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_desired: Option<TwinProperty>,
}
