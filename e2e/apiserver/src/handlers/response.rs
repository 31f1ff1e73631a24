//! Shaping of successful answers: the response body type, JSON documents,
//! objects converted from storage to the served version, and
//! `PartialObjectMetadata` for clients that ask for metadata only.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use serde_json::{json, Value};

use crate::convert;
use crate::crd::ResourceDef;

/// Response body: whole JSON documents or a watch stream.
pub type Body = BoxBody<Bytes, Infallible>;

pub(crate) fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// The object as served through `def`'s group and version.
pub(crate) fn present(def: &ResourceDef, object: &Value) -> Value {
    convert::from_storage(def, object)
}

/// Whether an Accept header asks for `PartialObjectMetadata` (kube-rs'
/// `get_metadata`, `list_metadata` and `metadata_watcher`).
pub(crate) fn wants_metadata(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
}

pub(crate) fn partial_metadata(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}
