//! The read verbs: get and list, answering with the objects as JSON, as
//! `meta.k8s.io/v1` Tables (kubectl's printing) or as
//! `PartialObjectMetadata` when the Accept header asks for them.
//!
//! `limit` and `continue` are ignored: lists are returned whole.

use http::Response;
use serde_json::{json, Value};

use super::error::ApiError;
use super::request::{key_of, selectors, Query, Target};
use super::response::{json_response, partial_metadata, present, wants_metadata, Body};
use super::state::ServerState;
use crate::table::{self, IncludeObject};

/// GET of one object: JSON, a Table, or `PartialObjectMetadata`.
pub(crate) fn get(
    state: &ServerState,
    target: &Target,
    query: &Query,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let name = target.name.as_deref().unwrap_or("");
    let object = state
        .store
        .get(&target.def.id(), &key_of(target, name))
        .ok_or_else(|| ApiError::not_found(&target.def, name))?;
    let object = present(&target.def, &object);
    if table::wants_table(accept) {
        let rv = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let include = IncludeObject::parse(query.get("includeObject"));
        return Ok(json_response(
            200,
            &table::table(&target.def, &[object], rv, include),
        ));
    }
    if wants_metadata(accept) {
        return Ok(json_response(200, &partial_metadata(&object)));
    }
    Ok(json_response(200, &object))
}

/// GET of a collection, filtered by the label and field selectors.
pub(crate) fn list(
    state: &ServerState,
    target: &Target,
    query: &Query,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let (labels, fields) = selectors(query)?;
    let (items, rv) = state
        .store
        .list(&target.def.id(), target.namespace.as_deref());
    let items: Vec<Value> = items
        .iter()
        .map(|o| present(&target.def, o))
        .filter(|o| labels.matches(o) && fields.matches(o))
        .collect();
    if table::wants_table(accept) {
        let include = IncludeObject::parse(query.get("includeObject"));
        return Ok(json_response(
            200,
            &table::table(&target.def, &items, rv, include),
        ));
    }
    if wants_metadata(accept) {
        let items: Vec<Value> = items.iter().map(partial_metadata).collect();
        return Ok(json_response(
            200,
            &json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadataList",
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items,
            }),
        ));
    }
    Ok(json_response(
        200,
        &json!({
            "apiVersion": target.def.api_version(),
            "kind": format!("{}List", target.def.kind),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }),
    ))
}
