//! The MQTT mapper: subscribes to each property's topic, reads the value from the payload (the
//! whole payload, or a field of a JSON payload), and publishes desired values on the property's
//! desired topic. Sessions are clean (the subscriptions are made again on every connection);
//! a lost connection ends the mapper and the manager reconnects it with backoff.

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sedna_api::devices::PropertyType;

use super::spec::{MapperSpec, MqttVisitor, PropertySpec, Protocol, Visitor};
use super::twin::MAX_VALUE_BYTES;
use super::{MapperError, MapperIo, Reading};

/// The largest MQTT packet accepted or sent.
pub const MAX_PACKET_BYTES: usize = 64 * 1024;

/// Keep-alive towards the broker.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The value of a property of `type_` in `payload`, as text.
pub fn value_of(
    payload: &[u8],
    pointer: Option<&str>,
    type_: PropertyType,
) -> Result<String, String> {
    let text = match pointer {
        None => std::str::from_utf8(payload)
            .map_err(|_| "the payload is not UTF-8 text".to_owned())?
            .trim()
            .to_owned(),
        Some(pointer) => {
            let json: serde_json::Value = serde_json::from_slice(payload)
                .map_err(|e| format!("the payload is not JSON: {e}"))?;
            match json.pointer(pointer) {
                None => return Err(format!("the payload has no {pointer}")),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    v.to_string()
                }
                Some(other) => return Err(format!("{pointer} is not a value: {other:.40}")),
            }
        }
    };
    if text.chars().any(char::is_control) {
        return Err("the value holds control characters (line breaks, tabs, …)".into());
    }
    if text.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "the value is {} bytes, more than {MAX_VALUE_BYTES}",
            text.len()
        ));
    }
    match type_ {
        PropertyType::Int => text
            .parse::<i64>()
            .map(|v| v.to_string())
            .map_err(|_| format!("{text:.40?} is not an integer")),
        PropertyType::Float | PropertyType::Double => text
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .map(|_| text.clone())
            .ok_or_else(|| format!("{text:.40?} is not a number")),
        PropertyType::Boolean => super::modbus::parse_bit(&text).map(|b| b.to_string()),
        _ => Ok(text),
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Runs the mapper until the connection fails (the manager restarts it) or the manager stops.
pub(crate) async fn run(spec: &MapperSpec, io: &mut MapperIo) -> Result<(), MapperError> {
    let Protocol::Mqtt {
        host,
        port,
        client_id,
        qos: level,
    } = &spec.protocol
    else {
        return Err(MapperError::Unreachable("not an MQTT device".into()));
    };
    let properties: Vec<(&PropertySpec, &MqttVisitor)> = spec
        .properties
        .iter()
        .filter_map(|p| match &p.visitor {
            Visitor::Mqtt(v) => Some((p, v)),
            _ => None,
        })
        .collect();
    let mut options = MqttOptions::new(client_id.clone(), host.clone(), *port);
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    let (client, mut events) = AsyncClient::new(options, sedna_api::devices::MAX_PROPERTIES + 8);
    let qos = qos(*level);
    let mut applied: BTreeMap<String, String> = BTreeMap::new();
    let mut connected = false;
    loop {
        tokio::select! {
            event = events.poll() => match event {
                Err(e) => {
                    return Err(MapperError::Unreachable(format!(
                        "MQTT broker {host}:{port}: {e}"
                    )))
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    let filters = properties
                        .iter()
                        .map(|(_, v)| rumqttc::SubscribeFilter::new(v.topic.clone(), qos));
                    if !properties.is_empty() {
                        client
                            .subscribe_many(filters)
                            .await
                            .map_err(|e| MapperError::Unreachable(e.to_string()))?;
                    }
                    io.send(Reading::State("online")).await?;
                    applied.clear();
                }
                Ok(Event::Incoming(Packet::Publish(message))) => {
                    for (p, v) in properties.iter().filter(|(_, v)| v.topic == message.topic) {
                        let reading = match value_of(&message.payload, v.json_pointer.as_deref(), p.type_) {
                            Ok(value) => Reading::Reported { property: p.name.clone(), value },
                            Err(why) => Reading::Failed {
                                property: p.name.clone(),
                                message: format!("message on {} ignored: {why}", v.topic),
                            },
                        };
                        io.send(reading).await?;
                    }
                }
                Ok(_) => {}
            },
            changed = io.desired.changed() => if changed.is_err() { return Ok(()) },
        }
        if !connected {
            continue;
        }
        let desired = io.desired.borrow_and_update().clone();
        for (p, v) in properties.iter().filter(|(p, _)| p.writable) {
            let Some(want) = desired.get(&p.name) else {
                continue;
            };
            if applied.get(&p.name) == Some(want) {
                continue;
            }
            applied.insert(p.name.clone(), want.clone());
            let reading = match client.try_publish(
                v.desired_topic.clone(),
                qos,
                false,
                want.clone().into_bytes(),
            ) {
                Ok(()) => Reading::Applied {
                    property: p.name.clone(),
                    value: want.clone(),
                },
                Err(e) => Reading::Failed {
                    property: p.name.clone(),
                    message: format!("desired value {want:?} not published: {e}"),
                },
            };
            io.send(reading).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_give_typed_values_or_say_why_not() {
        assert_eq!(
            value_of(b" 21.5\n", None, PropertyType::Double).unwrap(),
            "21.5"
        );
        assert_eq!(
            value_of(
                br#"{"t": 21.5, "ok": true}"#,
                Some("/t"),
                PropertyType::Float
            )
            .unwrap(),
            "21.5"
        );
        assert_eq!(
            value_of(br#"{"ok": true}"#, Some("/ok"), PropertyType::Boolean).unwrap(),
            "true"
        );
        assert_eq!(value_of(b"1", None, PropertyType::Boolean).unwrap(), "true");
        for (payload, pointer, type_, wanted) in [
            (&b"warm"[..], None, PropertyType::Double, "not a number"),
            (b"NaN", None, PropertyType::Double, "not a number"),
            (b"2.5", None, PropertyType::Int, "not an integer"),
            (b"{", Some("/t"), PropertyType::Int, "not JSON"),
            (b"{}", Some("/t"), PropertyType::Int, "no /t"),
            (
                br#"{"t":[1]}"#,
                Some("/t"),
                PropertyType::Int,
                "not a value",
            ),
            (b"\xff", None, PropertyType::String, "not UTF-8"),
            (b"a\nb", None, PropertyType::String, "control characters"),
        ] {
            let e = value_of(payload, pointer, type_).unwrap_err();
            assert!(e.contains(wanted), "{e}");
        }
        let huge = vec![b'7'; MAX_VALUE_BYTES + 1];
        assert!(
            value_of(&huge, None, PropertyType::String)
                .unwrap_err()
                .contains("more than")
        );
    }
}
