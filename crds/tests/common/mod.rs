//! Helpers shared by the CRD integration tests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Drops `false`, `null`, empty lists and empty objects, which a type may omit when
/// serializing, and writes integral numbers as integers (`500.0` is the JSON number `500`).
pub fn without_empty_values(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), without_empty_values(v)))
                .filter(|(_, v)| !matches!(v, Value::Bool(false) | Value::Null))
                .filter(|(_, v)| v.as_array().is_none_or(|a| !a.is_empty()))
                .filter(|(_, v)| v.as_object().is_none_or(|o| !o.is_empty()))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_empty_values).collect()),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => json!(f as i64),
            _ => Value::Number(n.clone()),
        },
        other => other.clone(),
    }
}

/// `doc` decoded into `T` and encoded back.
pub fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Value {
    let typed: T = serde_json::from_value(doc.clone()).unwrap();
    serde_json::to_value(&typed).unwrap()
}
