//! Protobuf request bodies, decoded with the `k8s-pb` message types.
//!
//! kubectl's typed commands (`kubectl create namespace`, `create configmap`,
//! `create secret`, `create serviceaccount`) always send
//! `application/vnd.kubernetes.protobuf` bodies, and kubectl 1.32 does not
//! fall back to JSON when a server answers such a body with 406 or 415 (it
//! reports the error). So the server decodes these kinds: `k8s-pb` (prost)
//! parses the `k8s\0` envelope and the typed message, and this module maps
//! the typed message onto the `k8s-openapi` type of the same kind, whose
//! serde form is the JSON the store keeps. Other kinds are refused
//! ([`ProtobufError::UnsupportedKind`], answered as 415). Responses are
//! always JSON, which client-go accepts because it lists JSON in `Accept`.

use k8s_openapi::api::core::v1 as json_core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as json_meta;
use k8s_openapi::ByteString;
use k8s_pb::api::core::v1 as pb_core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as pb_meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::Value;

/// The magic prefix of the Kubernetes protobuf envelope.
const ENVELOPE: &[u8] = b"k8s\0";

/// Errors decoding a protobuf body.
#[derive(Debug, thiserror::Error)]
pub enum ProtobufError {
    /// The body lacks the `k8s\0` magic prefix.
    #[error("Missing the k8s protobuf envelope")]
    Envelope,
    /// The envelope or the object inside it is not valid protobuf.
    #[error("Malformed protobuf message")]
    Decode(#[source] prost::DecodeError),
    /// The envelope names a kind this server does not decode.
    #[error("Kind {0} is not decoded from protobuf here; send it as JSON")]
    UnsupportedKind(String),
}

/// Decodes an enveloped protobuf body into the JSON object it encodes.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let envelope = body.strip_prefix(ENVELOPE).ok_or(ProtobufError::Envelope)?;
    let unknown = Unknown::decode(envelope).map_err(ProtobufError::Decode)?;
    let type_meta = unknown.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let raw = unknown.raw.unwrap_or_default();
    let raw = raw.as_slice();
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => to_json(namespace(decode_kind(raw)?)),
        ("v1", "ConfigMap") => to_json(config_map(decode_kind(raw)?)),
        ("v1", "Secret") => to_json(secret(decode_kind(raw)?)),
        ("v1", "ServiceAccount") => to_json(service_account(decode_kind(raw)?)),
        _ => {
            return Err(ProtobufError::UnsupportedKind(format!(
                "{api_version}/{kind}"
            )))
        }
    };
    Ok(object)
}

fn decode_kind<M: Message + Default>(raw: &[u8]) -> Result<M, ProtobufError> {
    M::decode(raw).map_err(ProtobufError::Decode)
}

/// The serde form of a `k8s-openapi` object, with `apiVersion` and `kind`.
fn to_json<K: k8s_openapi::Resource + serde::Serialize>(object: K) -> Value {
    let mut value = serde_json::to_value(&object).unwrap_or_default();
    value["apiVersion"] = Value::String(K::API_VERSION.to_string());
    value["kind"] = Value::String(K::KIND.to_string());
    value
}

/// Go's encoder writes empty strings; JSON omits them.
fn text(value: Option<String>) -> Option<String> {
    value.filter(|s| !s.is_empty())
}

fn map<V>(
    map: std::collections::BTreeMap<String, V>,
) -> Option<std::collections::BTreeMap<String, V>> {
    (!map.is_empty()).then_some(map)
}

fn list<V>(items: Vec<V>) -> Option<Vec<V>> {
    (!items.is_empty()).then_some(items)
}

/// What a client may set in `metadata`; the server owns the rest
/// (uid, timestamps, generation, managed fields).
fn metadata(meta: Option<pb_meta::ObjectMeta>) -> json_meta::ObjectMeta {
    let meta = meta.unwrap_or_default();
    json_meta::ObjectMeta {
        name: text(meta.name),
        generate_name: text(meta.generate_name),
        namespace: text(meta.namespace),
        resource_version: text(meta.resource_version),
        labels: map(meta.labels),
        annotations: map(meta.annotations),
        owner_references: list(
            meta.owner_references
                .into_iter()
                .map(|owner| json_meta::OwnerReference {
                    api_version: owner.api_version.unwrap_or_default(),
                    kind: owner.kind.unwrap_or_default(),
                    name: owner.name.unwrap_or_default(),
                    uid: owner.uid.unwrap_or_default(),
                    controller: owner.controller,
                    block_owner_deletion: owner.block_owner_deletion,
                })
                .collect(),
        ),
        finalizers: list(meta.finalizers),
        ..Default::default()
    }
}

fn namespace(namespace: pb_core::Namespace) -> json_core::Namespace {
    json_core::Namespace {
        metadata: metadata(namespace.metadata),
        spec: namespace
            .spec
            .and_then(|spec| list(spec.finalizers))
            .map(|finalizers| json_core::NamespaceSpec {
                finalizers: Some(finalizers),
            }),
        status: None,
    }
}

fn config_map(config_map: pb_core::ConfigMap) -> json_core::ConfigMap {
    json_core::ConfigMap {
        metadata: metadata(config_map.metadata),
        data: map(config_map.data),
        binary_data: map(bytes(config_map.binary_data)),
        immutable: config_map.immutable,
    }
}

fn secret(secret: pb_core::Secret) -> json_core::Secret {
    json_core::Secret {
        metadata: metadata(secret.metadata),
        data: map(bytes(secret.data)),
        string_data: map(secret.string_data),
        type_: text(secret.r#type),
        immutable: secret.immutable,
    }
}

fn service_account(account: pb_core::ServiceAccount) -> json_core::ServiceAccount {
    json_core::ServiceAccount {
        metadata: metadata(account.metadata),
        automount_service_account_token: account.automount_service_account_token,
        ..Default::default()
    }
}

fn bytes(
    map: std::collections::BTreeMap<String, Vec<u8>>,
) -> std::collections::BTreeMap<String, ByteString> {
    map.into_iter().map(|(k, v)| (k, ByteString(v))).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use k8s_pb::apimachinery::pkg::runtime::TypeMeta;

    /// An envelope as client-go writes it, encoded by prost.
    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        [ENVELOPE, &unknown.encode_to_vec()].concat()
    }

    #[test]
    fn decodes_an_enveloped_config_map_and_secret() {
        let meta = pb_meta::ObjectMeta {
            name: Some("settings".into()),
            namespace: Some("vms".into()),
            generate_name: Some(String::new()),
            labels: [("app".to_string(), "godwit".to_string())].into(),
            ..Default::default()
        };
        let config_map = pb_core::ConfigMap {
            metadata: Some(meta.clone()),
            data: [("a".to_string(), "1".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            decode(&envelope("v1", "ConfigMap", config_map.encode_to_vec())).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "settings", "namespace": "vms", "labels": {"app": "godwit"}},
                   "data": {"a": "1"}})
        );
        let secret = pb_core::Secret {
            metadata: Some(meta),
            data: [("user".to_string(), b"admin".to_vec())].into(),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let decoded = decode(&envelope("v1", "Secret", secret.encode_to_vec())).unwrap();
        assert_eq!(decoded["data"], json!({"user": "YWRtaW4="}));
        assert_eq!(decoded["type"], "Opaque");
    }

    #[test]
    fn refuses_unknown_kinds_bare_and_malformed_bodies() {
        let body = envelope("apps/v1", "Deployment", Vec::new());
        let error = decode(&body).unwrap_err();
        assert!(
            matches!(error, ProtobufError::UnsupportedKind(ref k) if k == "apps/v1/Deployment")
        );
        assert!(matches!(decode(b"{}"), Err(ProtobufError::Envelope)));
        assert!(matches!(
            decode(b"k8s\0\x0a\x05ab"),
            Err(ProtobufError::Decode(_))
        ));
    }
}
