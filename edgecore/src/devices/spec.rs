//! What a mapper needs to know of a device, resolved from the Device and its DeviceModel:
//! the protocol's connection settings and, per property, how to reach it (the device's visitor
//! overrides the model's), its type, cycle and desired value. Every setting is checked here, so
//! a mapper never starts on a configuration it cannot honour, and the error names the field.
//!
//! Settings follow KubeEdge's mappers where they exist:
//! - `modbus` (TCP): protocol `configData` `{ip, port, slaveID}`; a property's visitor
//!   `configData` `{register: CoilRegister | DiscreteInputRegister | HoldingRegister |
//!   InputRegister, offset, dataType: int16 | uint16 | int32 | uint32 | float32, scale,
//!   valueOffset, isSwap (bytes within a register), isRegisterSwap (register order)}`.
//! - `mqtt`: protocol `configData` `{broker: "tcp://host:port", clientId, qos}`; a property's
//!   visitor `configData` `{topic, jsonPointer, desiredTopic}`: `jsonPointer` names a field of a
//!   JSON payload (absent: the payload is the value), `desiredTopic` is where desired values are
//!   published (default: the topic followed by `/set`).

use std::collections::BTreeMap;
use std::time::Duration;

use sedna_api::devices::{AccessMode, Device, DeviceModel, PropertyType};
use serde::de::DeserializeOwned;

/// The shortest collect cycle honoured; shorter ones are raised to it.
pub const MIN_COLLECT_CYCLE: Duration = Duration::from_millis(100);

/// The collect cycle when a property names none.
pub const DEFAULT_COLLECT_CYCLE: Duration = Duration::from_secs(1);

/// Why a device cannot be run as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {device}: {message}")]
pub struct SpecError {
    /// `namespace/name`.
    pub device: String,
    /// What is wrong, naming the field.
    pub message: String,
}

impl SpecError {
    /// Never: the Device or its model must change first.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A device as its mapper runs it. Two specs are equal when the mapper would do the same, so a
/// changed spec restarts the mapper and a changed desired value does not.
#[derive(Clone, Debug, PartialEq)]
pub struct MapperSpec {
    /// `namespace/name`.
    pub device: String,
    /// The protocol and its connection settings.
    pub protocol: Protocol,
    /// The properties the mapper reads (and writes), by name.
    pub properties: Vec<PropertySpec>,
}

/// A property as the mapper reaches it.
#[derive(Clone, Debug, PartialEq)]
pub struct PropertySpec {
    /// Name.
    pub name: String,
    /// Value type (from the model).
    pub type_: PropertyType,
    /// Whether desired values are written.
    pub writable: bool,
    /// How often the value is read (polling protocols).
    pub collect_cycle: Duration,
    /// Where the value lives.
    pub visitor: Visitor,
}

/// A protocol and its connection settings.
#[derive(Clone, Debug, PartialEq)]
pub enum Protocol {
    /// Modbus TCP.
    Modbus {
        /// `ip:port`.
        address: std::net::SocketAddr,
        /// Unit identifier.
        slave: u8,
    },
    /// A camera or video stream, read by ffmpeg.
    Camera {
        /// `rtsp://…`, `http(s)://…` (e.g. MJPEG), or a video file's path.
        url: String,
        /// Frames per second handed over.
        fps: f64,
        /// Frame size (width, height); `None`: the source's.
        size: Option<(u32, u32)>,
        /// Frame encoding.
        format: CameraFormat,
        /// A file starts over at its end.
        looped: bool,
    },
    /// A protocol served by a user's mapper process ([`super::external`]).
    External {
        /// The protocol's name (`opcua`, …).
        name: String,
        /// The protocol's `configData` (the model's, overridden by the device's), as given.
        config: serde_json::Value,
    },
    /// MQTT 3.1.1.
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
        /// Client id (default: `sedna-<namespace>-<name>`).
        client_id: String,
        /// Quality of service of subscriptions and publications (0–2).
        qos: u8,
    },
}

/// How camera frames are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CameraFormat {
    /// JPEG files (`.jpg`).
    Jpeg,
    /// 8-bit grey PGM files (`.pgm`), what the edge worker's `dir:` input reads.
    Pgm,
}

impl CameraFormat {
    /// File extension.
    pub fn extension(self) -> &'static str {
        match self {
            CameraFormat::Jpeg => "jpg",
            CameraFormat::Pgm => "pgm",
        }
    }
}

/// The most frames per second a camera is read at.
pub const MAX_FPS: f64 = 30.0;

/// The largest frame side, in pixels.
pub const MAX_SIDE: u32 = 4096;

/// Where a property's value lives.
#[derive(Clone, Debug, PartialEq)]
pub enum Visitor {
    /// A Modbus register or coil.
    Modbus(ModbusVisitor),
    /// An MQTT topic.
    Mqtt(MqttVisitor),
    /// A user's mapper reads the visitor's `configData`, as given.
    External(serde_json::Value),
}

/// Modbus register tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    /// Read-write bits.
    Coil,
    /// Read-only bits.
    DiscreteInput,
    /// Read-write 16-bit words.
    Holding,
    /// Read-only 16-bit words.
    Input,
}

/// How register words become a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    /// One register, signed.
    Int16,
    /// One register, unsigned.
    Uint16,
    /// Two registers, signed.
    Int32,
    /// Two registers, unsigned.
    Uint32,
    /// Two registers, IEEE 754.
    Float32,
}

impl DataType {
    /// Registers the type spans.
    pub fn registers(self) -> u16 {
        match self {
            DataType::Int16 | DataType::Uint16 => 1,
            _ => 2,
        }
    }
}

/// A Modbus property's place and encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct ModbusVisitor {
    /// Table.
    pub register: Register,
    /// Protocol address (0-based) of the first register or coil.
    pub offset: u16,
    /// Encoding of register values.
    pub data_type: DataType,
    /// value = raw × scale + value_offset.
    pub scale: f64,
    /// See `scale`.
    pub value_offset: f64,
    /// Swap the two bytes of each register (little-endian devices).
    pub swap_bytes: bool,
    /// Swap the order of the registers of a 32-bit value (low word first).
    pub swap_registers: bool,
}

/// An MQTT property's topics.
#[derive(Clone, Debug, PartialEq)]
pub struct MqttVisitor {
    /// Topic the device publishes the value on.
    pub topic: String,
    /// A field of a JSON payload (RFC 6901 pointer); `None`: the payload is the value.
    pub json_pointer: Option<String>,
    /// Topic desired values are published on.
    pub desired_topic: String,
}

/// Resolves `device` (and its `model`) into what its built-in mapper runs.
pub fn resolve(device: &Device, model: Option<&DeviceModel>) -> Result<MapperSpec, SpecError> {
    let ns = device.metadata.namespace.clone().unwrap_or_default();
    let name = device.metadata.name.clone().unwrap_or_default();
    let id = format!("{ns}/{name}");
    let err = |message: String| SpecError {
        device: id.clone(),
        message,
    };
    let model = model.ok_or_else(|| {
        err(format!(
            "its DeviceModel {:?} is not on this node",
            device.spec.device_model_ref.name
        ))
    })?;
    let protocol_name = device
        .spec
        .protocol
        .protocol_name
        .clone()
        .or_else(|| model.spec.protocol.clone())
        .ok_or_else(|| err("spec.protocol.protocolName is missing".into()))?;
    let mut config = model.spec.protocol_config_data.clone().unwrap_or_default();
    config.extend(device.spec.protocol.config_data.clone().unwrap_or_default());
    let protocol = match protocol_name.as_str() {
        "modbus" | "modbus-tcp" => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase", deny_unknown_fields)]
            struct Raw {
                ip: String,
                port: Option<u16>,
                #[serde(rename = "slaveID")]
                slave_id: Option<u8>,
            }
            let raw: Raw = parse(&config).map_err(|e| err(format!("modbus configData: {e}")))?;
            let ip: std::net::IpAddr = raw.ip.parse().map_err(|_| {
                err(format!(
                    "modbus configData.ip {:?} is not an address",
                    raw.ip
                ))
            })?;
            Protocol::Modbus {
                address: (ip, raw.port.unwrap_or(502)).into(),
                slave: raw.slave_id.unwrap_or(1),
            }
        }
        "mqtt" => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase", deny_unknown_fields)]
            struct Raw {
                broker: String,
                client_id: Option<String>,
                qos: Option<u8>,
            }
            let raw: Raw = parse(&config).map_err(|e| err(format!("mqtt configData: {e}")))?;
            let rest = raw.broker.strip_prefix("tcp://").ok_or_else(|| {
                err(format!(
                    "mqtt configData.broker {:?} must be tcp://HOST:PORT",
                    raw.broker
                ))
            })?;
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().map_err(|_| {
                        err(format!("mqtt configData.broker {:?}: bad port", raw.broker))
                    })?,
                ),
                None => (rest.to_owned(), 1883),
            };
            if host.is_empty() {
                return Err(err("mqtt configData.broker has no host".into()));
            }
            let qos = raw.qos.unwrap_or(1);
            if qos > 2 {
                return Err(err(format!("mqtt configData.qos {qos} is not 0, 1 or 2")));
            }
            let client_id = raw
                .client_id
                .unwrap_or_else(|| format!("sedna-{ns}-{name}"));
            if client_id.is_empty() || client_id.len() > 128 {
                return Err(err("mqtt configData.clientId must be 1-128 bytes".into()));
            }
            Protocol::Mqtt {
                host,
                port,
                client_id,
                qos,
            }
        }
        "camera" | "rtsp" => {
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase", deny_unknown_fields)]
            struct Raw {
                url: String,
                fps: Option<f64>,
                width: Option<u32>,
                height: Option<u32>,
                format: Option<String>,
                #[serde(rename = "loop")]
                looped: Option<bool>,
            }
            let raw: Raw = parse(&config).map_err(|e| err(format!("camera configData: {e}")))?;
            let url_ok = raw.url.starts_with("rtsp://")
                || raw.url.starts_with("http://")
                || raw.url.starts_with("https://")
                || raw.url.starts_with('/');
            if !url_ok || raw.url.len() > 4096 || raw.url.chars().any(char::is_control) {
                return Err(err(format!(
                    "camera configData.url {:?} must be rtsp://, http(s):// or an absolute path",
                    raw.url
                )));
            }
            let fps = raw.fps.unwrap_or(1.0);
            if !(fps > 0.0 && fps <= MAX_FPS) {
                return Err(err(format!(
                    "camera configData.fps {fps} must be above 0 and at most {MAX_FPS}"
                )));
            }
            let size = match (raw.width, raw.height) {
                (None, None) => None,
                (Some(w), Some(h))
                    if (1..=MAX_SIDE).contains(&w) && (1..=MAX_SIDE).contains(&h) =>
                {
                    Some((w, h))
                }
                _ => {
                    return Err(err(format!(
                        "camera configData.width and height go together, 1-{MAX_SIDE} each"
                    )));
                }
            };
            let format = match raw.format.as_deref().unwrap_or("jpg") {
                "jpg" | "jpeg" => CameraFormat::Jpeg,
                "pgm" if size.is_some() => CameraFormat::Pgm,
                "pgm" => {
                    return Err(err(
                        "camera configData.format pgm needs width and height".into()
                    ));
                }
                other => {
                    return Err(err(format!(
                        "camera configData.format {other:?} is not jpg or pgm"
                    )));
                }
            };
            Protocol::Camera {
                url: raw.url,
                fps,
                size,
                format,
                looped: raw.looped.unwrap_or(true),
            }
        }
        other if super::external::valid_protocol_name(other) => Protocol::External {
            name: other.to_owned(),
            config: serde_json::Value::Object(config.into_iter().collect()),
        },
        other => {
            return Err(err(format!(
                "protocol {other:?} is neither built in (modbus, mqtt, camera) nor a valid name \
                 for a mapper of your own (lowercase letters, digits and '-', at most 63)"
            )));
        }
    };
    let mut properties = Vec::new();
    for p in &device.spec.properties {
        let Some(declared) = model.spec.properties.iter().find(|m| m.name == p.name) else {
            return Err(err(format!(
                "property {:?} is not in DeviceModel {:?}",
                p.name, device.spec.device_model_ref.name
            )));
        };
        let mut visitor = declared
            .visitors
            .as_ref()
            .and_then(|v| v.config_data.clone())
            .unwrap_or_default();
        visitor.extend(
            p.visitors
                .as_ref()
                .and_then(|v| v.config_data.clone())
                .unwrap_or_default(),
        );
        let field = |e: String| err(format!("property {:?} visitors.configData: {e}", p.name));
        let visitor = match &protocol {
            Protocol::Modbus { .. } => Visitor::Modbus(modbus_visitor(&visitor).map_err(field)?),
            Protocol::Mqtt { .. } => Visitor::Mqtt(mqtt_visitor(&visitor).map_err(field)?),
            // A camera's properties describe its stream; frames are not property values.
            Protocol::Camera { .. } => continue,
            Protocol::External { .. } => {
                Visitor::External(serde_json::Value::Object(visitor.into_iter().collect()))
            }
        };
        let writable = declared.access_mode == AccessMode::ReadWrite;
        if let Visitor::Modbus(m) = &visitor {
            if writable && matches!(m.register, Register::DiscreteInput | Register::Input) {
                return Err(err(format!(
                    "property {:?} is ReadWrite but lives in a read-only Modbus table",
                    p.name
                )));
            }
            let boolean = declared.type_ == PropertyType::Boolean;
            let bits = matches!(m.register, Register::Coil | Register::DiscreteInput);
            if boolean != bits && !(bits && declared.type_ == PropertyType::Int) {
                return Err(err(format!(
                    "property {:?} of type {:?} cannot live in Modbus {:?}",
                    p.name, declared.type_, m.register
                )));
            }
        }
        let external = matches!(protocol, Protocol::External { .. });
        if !external
            && (declared.type_ == PropertyType::Stream || declared.type_ == PropertyType::Bytes)
        {
            return Err(err(format!(
                "property {:?}: {:?} values have no built-in mapper",
                p.name, declared.type_
            )));
        }
        let collect_cycle = p
            .collect_cycle
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms as u64))
            .unwrap_or(DEFAULT_COLLECT_CYCLE)
            .max(MIN_COLLECT_CYCLE);
        properties.push(PropertySpec {
            name: p.name.clone(),
            type_: declared.type_,
            writable,
            collect_cycle,
            visitor,
        });
    }
    Ok(MapperSpec {
        device: id,
        protocol,
        properties,
    })
}

/// The desired values of a device's writable properties, by name.
pub fn desired(device: &Device) -> BTreeMap<String, String> {
    device
        .spec
        .properties
        .iter()
        .filter_map(|p| Some((p.name.clone(), p.desired.as_ref()?.value.clone())))
        .collect()
}

fn parse<T: DeserializeOwned>(
    map: &BTreeMap<String, serde_json::Value>,
) -> Result<T, serde_json::Error> {
    serde_json::from_value(serde_json::Value::Object(
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    ))
}

fn modbus_visitor(map: &BTreeMap<String, serde_json::Value>) -> Result<ModbusVisitor, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Raw {
        register: String,
        offset: u16,
        #[serde(default)]
        limit: Option<u16>,
        data_type: Option<String>,
        scale: Option<f64>,
        value_offset: Option<f64>,
        #[serde(default)]
        is_swap: bool,
        #[serde(default)]
        is_register_swap: bool,
    }
    let raw: Raw = parse(map).map_err(|e| e.to_string())?;
    let register = match raw.register.as_str() {
        "CoilRegister" => Register::Coil,
        "DiscreteInputRegister" => Register::DiscreteInput,
        "HoldingRegister" => Register::Holding,
        "InputRegister" => Register::Input,
        other => {
            return Err(format!(
                "register {other:?} is not CoilRegister, DiscreteInputRegister, \
                 HoldingRegister or InputRegister"
            ));
        }
    };
    let data_type = match raw.data_type.as_deref().unwrap_or("int16") {
        "int16" => DataType::Int16,
        "uint16" => DataType::Uint16,
        "int32" => DataType::Int32,
        "uint32" => DataType::Uint32,
        "float32" | "float" => DataType::Float32,
        other => {
            return Err(format!(
                "dataType {other:?} is not int16, uint16, int32, uint32 or float32"
            ));
        }
    };
    let span = match register {
        Register::Coil | Register::DiscreteInput => 1,
        _ => data_type.registers(),
    };
    if let Some(limit) = raw.limit
        && limit != span
    {
        return Err(format!(
            "limit {limit} does not match the {span} registers of dataType"
        ));
    }
    if u32::from(raw.offset) + u32::from(span) > 0x1_0000 {
        return Err(format!("offset {} runs past the last address", raw.offset));
    }
    let scale = raw.scale.unwrap_or(1.0);
    if !scale.is_finite() || scale == 0.0 {
        return Err(format!("scale {scale} must be a finite, non-zero number"));
    }
    let value_offset = raw.value_offset.unwrap_or(0.0);
    if !value_offset.is_finite() {
        return Err("valueOffset must be finite".into());
    }
    Ok(ModbusVisitor {
        register,
        offset: raw.offset,
        data_type,
        scale,
        value_offset,
        swap_bytes: raw.is_swap,
        swap_registers: raw.is_register_swap,
    })
}

fn mqtt_visitor(map: &BTreeMap<String, serde_json::Value>) -> Result<MqttVisitor, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Raw {
        topic: String,
        json_pointer: Option<String>,
        desired_topic: Option<String>,
    }
    let raw: Raw = parse(map).map_err(|e| e.to_string())?;
    let topic_ok = |t: &str| !t.is_empty() && t.len() <= 1024 && !t.contains(['+', '#', '\0']);
    if !topic_ok(&raw.topic) {
        return Err(format!(
            "topic {:?} is not one topic (no wildcards, 1-1024 bytes)",
            raw.topic
        ));
    }
    if let Some(p) = &raw.json_pointer
        && !p.is_empty()
        && !p.starts_with('/')
    {
        return Err(format!("jsonPointer {p:?} must start with '/'"));
    }
    let desired_topic = raw
        .desired_topic
        .unwrap_or_else(|| format!("{}/set", raw.topic));
    if !topic_ok(&desired_topic) {
        return Err(format!(
            "desiredTopic {desired_topic:?} is not a topic one can publish on"
        ));
    }
    Ok(MqttVisitor {
        topic: raw.topic,
        json_pointer: raw.json_pointer.filter(|p| !p.is_empty()),
        desired_topic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model(protocol: &str, properties: serde_json::Value) -> DeviceModel {
        serde_json::from_value(json!({
            "apiVersion": "devices.sedna.io/v1beta1", "kind": "DeviceModel",
            "metadata": { "name": "m", "namespace": "default" },
            "spec": { "protocol": protocol, "properties": properties }
        }))
        .unwrap()
    }

    fn device(config: serde_json::Value, properties: serde_json::Value) -> Device {
        serde_json::from_value(json!({
            "apiVersion": "devices.sedna.io/v1beta1", "kind": "Device",
            "metadata": { "name": "d", "namespace": "default" },
            "spec": { "deviceModelRef": { "name": "m" }, "nodeName": "edge-1",
                      "protocol": { "configData": config }, "properties": properties }
        }))
        .unwrap()
    }

    #[test]
    fn a_modbus_device_resolves_with_the_devices_visitor_over_the_models() {
        let m = model(
            "modbus",
            json!([
                { "name": "temperature", "type": "FLOAT",
                  "visitors": { "configData": { "register": "InputRegister", "offset": 0,
                                                "dataType": "int16", "scale": 0.1 } } },
                { "name": "setpoint", "type": "FLOAT", "accessMode": "ReadWrite",
                  "visitors": { "configData": { "register": "HoldingRegister", "offset": 0 } } },
                { "name": "alarm", "type": "BOOLEAN",
                  "visitors": { "configData": { "register": "CoilRegister", "offset": 3 } } }
            ]),
        );
        let d = device(
            json!({ "ip": "127.0.0.1", "port": 5020, "slaveID": 2 }),
            json!([
                { "name": "temperature", "collectCycle": 10,
                  "visitors": { "configData": { "offset": 4 } } },
                { "name": "setpoint", "desired": { "value": "21.5" },
                  "visitors": { "configData": { "dataType": "float32", "isRegisterSwap": true } } },
                { "name": "alarm" }
            ]),
        );
        let spec = resolve(&d, Some(&m)).unwrap();
        assert_eq!(
            spec.protocol,
            Protocol::Modbus {
                address: "127.0.0.1:5020".parse().unwrap(),
                slave: 2
            }
        );
        let Visitor::Modbus(t) = &spec.properties[0].visitor else {
            panic!()
        };
        assert_eq!((t.register, t.offset, t.scale), (Register::Input, 4, 0.1));
        assert_eq!(spec.properties[0].collect_cycle, MIN_COLLECT_CYCLE);
        let Visitor::Modbus(s) = &spec.properties[1].visitor else {
            panic!()
        };
        assert_eq!((s.data_type, s.swap_registers), (DataType::Float32, true));
        assert!(spec.properties[1].writable);
        assert_eq!(spec.properties[2].collect_cycle, DEFAULT_COLLECT_CYCLE);
        assert_eq!(
            desired(&d).get("setpoint").map(String::as_str),
            Some("21.5")
        );
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        let m = model(
            "modbus",
            json!([{ "name": "t", "type": "INT", "accessMode": "ReadWrite",
                     "visitors": { "configData": { "register": "HoldingRegister", "offset": 0 } } }]),
        );
        let cases = [
            (json!({ "ip": "not-an-ip" }), json!([]), "configData.ip"),
            (
                json!({ "ip": "127.0.0.1", "baud": 9600 }),
                json!([]),
                "unknown field `baud`",
            ),
            (
                json!({ "ip": "127.0.0.1" }),
                json!([{ "name": "x" }]),
                "not in DeviceModel",
            ),
            (
                json!({ "ip": "127.0.0.1" }),
                json!([{ "name": "t", "visitors": { "configData": { "register": "Input" } } }]),
                "register \"Input\"",
            ),
            (
                json!({ "ip": "127.0.0.1" }),
                json!([{ "name": "t", "visitors": { "configData": { "register": "InputRegister" } } }]),
                "read-only Modbus table",
            ),
            (
                json!({ "ip": "127.0.0.1" }),
                json!([{ "name": "t", "visitors": { "configData": { "offset": 65535, "dataType": "int32" } } }]),
                "past the last address",
            ),
            (
                json!({ "ip": "127.0.0.1" }),
                json!([{ "name": "t", "visitors": { "configData": { "scale": 0.0 } } }]),
                "non-zero",
            ),
        ];
        for (config, properties, wanted) in cases {
            let e = resolve(&device(config, properties), Some(&m)).unwrap_err();
            assert!(e.to_string().contains(wanted), "{e} lacks {wanted}");
            assert!(e.to_string().starts_with("device default/d: "), "{e}");
        }
        let e = resolve(&device(json!({}), json!([])), None).unwrap_err();
        assert!(e.message.contains("DeviceModel \"m\""), "{e}");
        let e = resolve(
            &device(json!({}), json!([])),
            Some(&model("OPC UA", json!([]))),
        )
        .unwrap_err();
        assert!(e.message.contains("neither built in"), "{e}");
    }

    #[test]
    fn another_protocol_goes_to_a_users_mapper_with_its_settings_as_given() {
        let m = model(
            "opcua",
            json!([{ "name": "t", "type": "DOUBLE", "accessMode": "ReadWrite",
                     "visitors": { "configData": { "nodeId": "ns=2;s=T", "extra": 1 } } }]),
        );
        let d = device(
            json!({ "endpoint": "opc.tcp://127.0.0.1:4840" }),
            json!([{ "name": "t", "visitors": { "configData": { "nodeId": "ns=2;s=T2" } } }]),
        );
        let spec = resolve(&d, Some(&m)).unwrap();
        assert_eq!(
            spec.protocol,
            Protocol::External {
                name: "opcua".into(),
                config: json!({ "endpoint": "opc.tcp://127.0.0.1:4840" }),
            }
        );
        assert_eq!(
            spec.properties[0].visitor,
            Visitor::External(json!({ "nodeId": "ns=2;s=T2", "extra": 1 })),
            "the device's visitor overrides the model's, field by field"
        );
        assert!(spec.properties[0].writable);
    }

    #[test]
    fn a_camera_resolves_its_stream_rate_size_and_format() {
        let m = model("camera", json!([{ "name": "saveFrame", "type": "STREAM" }]));
        let d = device(
            json!({ "url": "http://127.0.0.1:8080/cam.mjpg", "fps": 2.5, "width": 28,
                    "height": 28, "format": "pgm" }),
            json!([{ "name": "saveFrame" }]),
        );
        let spec = resolve(&d, Some(&m)).unwrap();
        assert_eq!(
            spec.protocol,
            Protocol::Camera {
                url: "http://127.0.0.1:8080/cam.mjpg".into(),
                fps: 2.5,
                size: Some((28, 28)),
                format: CameraFormat::Pgm,
                looped: true
            }
        );
        assert!(spec.properties.is_empty(), "frames are not twins");
        for (config, wanted) in [
            (json!({ "url": "ftp://x" }), "must be rtsp://"),
            (json!({ "url": "relative.mp4" }), "must be rtsp://"),
            (json!({ "url": "/v.mp4", "fps": 0 }), "fps 0"),
            (json!({ "url": "/v.mp4", "fps": 120 }), "at most 30"),
            (json!({ "url": "/v.mp4", "width": 28 }), "go together"),
            (
                json!({ "url": "/v.mp4", "width": 9000, "height": 10 }),
                "go together",
            ),
            (
                json!({ "url": "/v.mp4", "format": "pgm" }),
                "needs width and height",
            ),
            (
                json!({ "url": "/v.mp4", "format": "gif" }),
                "not jpg or pgm",
            ),
            (
                json!({ "url": "/v.mp4", "codec": "h264" }),
                "unknown field `codec`",
            ),
        ] {
            let e = resolve(&device(config, json!([])), Some(&m)).unwrap_err();
            assert!(e.message.contains(wanted), "{e} lacks {wanted}");
        }
    }

    #[test]
    fn an_mqtt_device_resolves_its_broker_and_topics() {
        let m = model(
            "mqtt",
            json!([{ "name": "temperature", "type": "DOUBLE",
                     "visitors": { "configData": { "topic": "site/t1", "jsonPointer": "/t" } } },
                   { "name": "fan", "type": "BOOLEAN", "accessMode": "ReadWrite",
                     "visitors": { "configData": { "topic": "site/fan" } } }]),
        );
        let d = device(
            json!({ "broker": "tcp://127.0.0.1:18830" }),
            json!([{ "name": "temperature" }, { "name": "fan" }]),
        );
        let spec = resolve(&d, Some(&m)).unwrap();
        assert_eq!(
            spec.protocol,
            Protocol::Mqtt {
                host: "127.0.0.1".into(),
                port: 18830,
                client_id: "sedna-default-d".into(),
                qos: 1
            }
        );
        let Visitor::Mqtt(fan) = &spec.properties[1].visitor else {
            panic!()
        };
        assert_eq!(fan.desired_topic, "site/fan/set");
        for (config, wanted) in [
            (json!({ "broker": "127.0.0.1:1883" }), "tcp://HOST:PORT"),
            (json!({ "broker": "tcp://h:x" }), "bad port"),
            (json!({ "broker": "tcp://h", "qos": 3 }), "qos 3"),
        ] {
            let e = resolve(&device(config, json!([])), Some(&m)).unwrap_err();
            assert!(e.message.contains(wanted), "{e}");
        }
        let bad = model(
            "mqtt",
            json!([{ "name": "t", "type": "INT",
                     "visitors": { "configData": { "topic": "a/b", "desiredTopic": "a/+/set" } } }]),
        );
        let e = resolve(
            &device(json!({ "broker": "tcp://h" }), json!([{ "name": "t" }])),
            Some(&bad),
        )
        .unwrap_err();
        assert!(e.message.contains("desiredTopic"), "{e}");
        let wild = model(
            "mqtt",
            json!([{ "name": "t", "type": "INT", "visitors": { "configData": { "topic": "a/#" } } }]),
        );
        let e = resolve(
            &device(json!({ "broker": "tcp://h" }), json!([{ "name": "t" }])),
            Some(&wild),
        )
        .unwrap_err();
        assert!(e.message.contains("no wildcards"), "{e}");
    }
}
