//! Decoding of the Kubernetes protobuf encoding for request bodies.
//!
//! kubectl's typed commands (`kubectl create namespace`, `create configmap`,
//! `create secret`, `create serviceaccount`) send
//! `application/vnd.kubernetes.protobuf` bodies. This module decodes the
//! `k8s\0` envelope and those kinds into JSON; other kinds are refused with
//! `415 Unsupported Media Type`. Responses are always JSON, which client-go
//! accepts. Only the fields those commands set are known; unknown fields
//! are dropped.

use chrono::{DateTime, SecondsFormat};
use serde_json::{Map, Value};

use crate::base64;

/// Errors decoding a protobuf body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtobufError {
    /// The body lacks the `k8s\0` magic prefix.
    #[error("Missing protobuf envelope")]
    Envelope,
    /// The body ends inside a field.
    #[error("Truncated protobuf message")]
    Truncated,
    /// A wire type this decoder does not handle.
    #[error("Unsupported protobuf wire type {0}")]
    WireType(u64),
    /// The envelope names a kind this decoder has no schema for.
    #[error("No protobuf schema for kind {0:?}")]
    UnknownKind(String),
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    Bytes,
    Time,
    StrMap,
    BytesMap,
    Msg(&'static [Field]),
}

#[derive(Clone, Copy)]
struct Field {
    number: u64,
    name: &'static str,
    kind: Kind,
    repeated: bool,
}

const fn f(number: u64, name: &'static str, kind: Kind) -> Field {
    Field {
        number,
        name,
        kind,
        repeated: false,
    }
}

const fn many(number: u64, name: &'static str, kind: Kind) -> Field {
    Field {
        number,
        name,
        kind,
        repeated: true,
    }
}

const TYPE_META: &[Field] = &[f(1, "apiVersion", Kind::Str), f(2, "kind", Kind::Str)];
const UNKNOWN: &[Field] = &[
    f(1, "typeMeta", Kind::Msg(TYPE_META)),
    f(2, "raw", Kind::Bytes),
];
const OWNER_REFERENCE: &[Field] = &[
    f(1, "kind", Kind::Str),
    f(3, "name", Kind::Str),
    f(4, "uid", Kind::Str),
    f(5, "apiVersion", Kind::Str),
    f(6, "controller", Kind::Bool),
    f(7, "blockOwnerDeletion", Kind::Bool),
];
const OBJECT_META: &[Field] = &[
    f(1, "name", Kind::Str),
    f(2, "generateName", Kind::Str),
    f(3, "namespace", Kind::Str),
    f(5, "uid", Kind::Str),
    f(6, "resourceVersion", Kind::Str),
    f(7, "generation", Kind::Int),
    f(8, "creationTimestamp", Kind::Time),
    f(9, "deletionTimestamp", Kind::Time),
    f(10, "deletionGracePeriodSeconds", Kind::Int),
    f(11, "labels", Kind::StrMap),
    f(12, "annotations", Kind::StrMap),
    many(13, "ownerReferences", Kind::Msg(OWNER_REFERENCE)),
    many(14, "finalizers", Kind::Str),
];
const NAMESPACE_SPEC: &[Field] = &[many(1, "finalizers", Kind::Str)];
const NAMESPACE: &[Field] = &[
    f(1, "metadata", Kind::Msg(OBJECT_META)),
    f(2, "spec", Kind::Msg(NAMESPACE_SPEC)),
];
const CONFIG_MAP: &[Field] = &[
    f(1, "metadata", Kind::Msg(OBJECT_META)),
    f(2, "data", Kind::StrMap),
    f(3, "binaryData", Kind::BytesMap),
    f(4, "immutable", Kind::Bool),
];
const SECRET: &[Field] = &[
    f(1, "metadata", Kind::Msg(OBJECT_META)),
    f(2, "data", Kind::BytesMap),
    f(3, "type", Kind::Str),
    f(4, "stringData", Kind::StrMap),
    f(5, "immutable", Kind::Bool),
];
const SERVICE_ACCOUNT: &[Field] = &[
    f(1, "metadata", Kind::Msg(OBJECT_META)),
    f(4, "automountServiceAccountToken", Kind::Bool),
];
const KEY_VALUE: &[Field] = &[f(1, "key", Kind::Str), f(2, "value", Kind::Bytes)];
const TIME: &[Field] = &[f(1, "seconds", Kind::Int), f(2, "nanos", Kind::Int)];

/// Decodes an enveloped protobuf body into the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let raw = body.strip_prefix(b"k8s\0").ok_or(ProtobufError::Envelope)?;
    let unknown = decode_message(raw, UNKNOWN)?;
    let api_version = unknown["typeMeta"]["apiVersion"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let kind = unknown["typeMeta"]["kind"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let schema = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        _ => return Err(ProtobufError::UnknownKind(format!("{api_version}/{kind}"))),
    };
    let inner = decode_base64_field(&unknown["raw"]);
    let mut object = decode_message(&inner, schema)?;
    object["apiVersion"] = Value::String(api_version);
    object["kind"] = Value::String(kind);
    Ok(object)
}

/// Bytes fields are carried as base64 in JSON; decode them back for nesting.
fn decode_base64_field(value: &Value) -> Vec<u8> {
    base64::decode(value.as_str().unwrap_or(""))
}

fn varint(data: &[u8], pos: &mut usize) -> Result<u64, ProtobufError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *data.get(*pos).ok_or(ProtobufError::Truncated)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(ProtobufError::Truncated)
}

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn next_field<'a>(data: &'a [u8], pos: &mut usize) -> Result<(u64, Wire<'a>), ProtobufError> {
    let key = varint(data, pos)?;
    let wire = match key & 7 {
        0 => Wire::Varint(varint(data, pos)?),
        2 => {
            let len = varint(data, pos)? as usize;
            let end = pos
                .checked_add(len)
                .filter(|end| *end <= data.len())
                .ok_or(ProtobufError::Truncated)?;
            let bytes = &data[*pos..end];
            *pos = end;
            Wire::Bytes(bytes)
        }
        1 => {
            *pos += 8;
            Wire::Fixed
        }
        5 => {
            *pos += 4;
            Wire::Fixed
        }
        other => return Err(ProtobufError::WireType(other)),
    };
    Ok((key >> 3, wire))
}

fn decode_message(data: &[u8], schema: &[Field]) -> Result<Value, ProtobufError> {
    let mut object = Map::new();
    let mut pos = 0;
    while pos < data.len() {
        let (number, wire) = next_field(data, &mut pos)?;
        let Some(field) = schema.iter().find(|f| f.number == number) else {
            continue;
        };
        let value = match (field.kind, wire) {
            // Go's protobuf encoding writes empty strings; JSON omits them.
            (Kind::Str, Wire::Bytes([])) => continue,
            (Kind::Str, Wire::Bytes(b)) => Value::String(String::from_utf8_lossy(b).into_owned()),
            (Kind::Bytes, Wire::Bytes(b)) => Value::String(base64::encode(b)),
            (Kind::Int, Wire::Varint(v)) => Value::from(v as i64),
            (Kind::Bool, Wire::Varint(v)) => Value::Bool(v != 0),
            (Kind::Msg(inner), Wire::Bytes(b)) => decode_message(b, inner)?,
            (Kind::Time, Wire::Bytes(b)) => {
                let time = decode_message(b, TIME)?;
                let seconds = time["seconds"].as_i64().unwrap_or(0);
                if seconds == 0 {
                    continue;
                }
                DateTime::from_timestamp(seconds, 0)
                    .map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Secs, true)))
                    .unwrap_or(Value::Null)
            }
            (Kind::StrMap | Kind::BytesMap, Wire::Bytes(b)) => {
                let entry = decode_message(b, KEY_VALUE)?;
                let key = entry["key"].as_str().unwrap_or("").to_string();
                let raw = decode_base64_field(&entry["value"]);
                let value = match field.kind {
                    Kind::StrMap => Value::String(String::from_utf8_lossy(&raw).into_owned()),
                    _ => Value::String(base64::encode(&raw)),
                };
                object
                    .entry(field.name)
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                    .map(|map| map.insert(key, value));
                continue;
            }
            _ => continue,
        };
        if field.repeated {
            if let Some(items) = object
                .entry(field.name)
                .or_insert_with(|| Value::Array(Vec::new()))
                .as_array_mut()
            {
                items.push(value);
            }
        } else {
            object.insert(field.name.to_string(), value);
        }
    }
    Ok(Value::Object(object))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn field(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![((number << 3) | 2) as u8, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn decodes_an_enveloped_config_map() {
        let meta = [
            field(1, b"settings"),
            field(3, b"vms"),
            field(11, &[field(1, b"app"), field(2, b"godwit")].concat()),
        ]
        .concat();
        let config_map = [
            field(1, &meta),
            field(2, &[field(1, b"a"), field(2, b"1")].concat()),
        ]
        .concat();
        let type_meta = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let unknown = [field(1, &type_meta), field(2, &config_map)].concat();
        let body = [b"k8s\0".as_slice(), &unknown].concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "settings", "namespace": "vms", "labels": {"app": "godwit"}},
                   "data": {"a": "1"}})
        );
    }

    #[test]
    fn refuses_unknown_kinds_and_bare_bodies() {
        let type_meta = [field(1, b"apps/v1"), field(2, b"Deployment")].concat();
        let body = [b"k8s\0".as_slice(), &field(1, &type_meta)].concat();
        assert!(matches!(decode(&body), Err(ProtobufError::UnknownKind(_))));
        assert_eq!(decode(b"{}"), Err(ProtobufError::Envelope));
    }
}
