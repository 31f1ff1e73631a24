//! The delete verbs: delete and deletecollection, with the propagation
//! policies (Background, Foreground, Orphan) and `dryRun=All`. Removing an
//! object and collecting what it owned is [`super::gc`]'s part.

use bytes::Bytes;
use http::Response;
use serde_json::{json, Value};

use super::admission::Policies;
use super::error::ApiError;
use super::gc::{delete_foreground, delete_object, dependents_of, object_key, orphan_dependents};
use super::request::{key_of, parse_object, selectors, Query, Target};
use super::response::{json_response, present, Body};
use super::state::ServerState;

/// DELETE of one object, with delete options (preconditions, dry run,
/// propagation policy) from the query or the body.
pub(crate) fn delete(
    state: &ServerState,
    target: &Target,
    query: &Query,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let options = if body.is_empty() {
        json!({})
    } else {
        parse_object(body)?
    };
    let name = target.name.clone().unwrap_or_default();
    if let Some(current) = state.store.get(&target.def.id(), &key_of(target, &name)) {
        Policies::load(state).check(target, "DELETE", None, Some(&current))?;
    }
    let dry_run = query.dry_run()
        || options["dryRun"]
            .as_array()
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    let policy = query
        .get("propagationPolicy")
        .map(str::to_string)
        .or_else(|| options["propagationPolicy"].as_str().map(str::to_string))
        .unwrap_or_default();
    if policy == "Orphan" && !dry_run {
        if let Some(current) = state.store.get(&target.def.id(), &key_of(target, &name)) {
            orphan_dependents(
                state,
                current
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            );
        }
    }
    if policy == "Foreground" && !dry_run {
        if let Some(current) = state.store.get(&target.def.id(), &key_of(target, &name)) {
            let uid = current
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if !dependents_of(state, &uid).is_empty() {
                delete_foreground(state, &target.def.id(), &key_of(target, &name), &uid);
                let code = match state.store.get(&target.def.id(), &key_of(target, &name)) {
                    Some(object) => return Ok(json_response(202, &present(&target.def, &object))),
                    None => 200,
                };
                return Ok(json_response(code, &present(&target.def, &current)));
            }
        }
    }
    let (object, gone) = delete_object(
        state,
        &target.def.id(),
        &key_of(target, &name),
        &options["preconditions"],
        dry_run,
        Some(&target.def),
    )?;
    let code = if gone || dry_run { 200 } else { 202 };
    Ok(json_response(code, &present(&target.def, &object)))
}

/// DELETE of a collection: every object the selectors match.
pub(crate) fn delete_collection(
    state: &ServerState,
    target: &Target,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let (labels, fields) = selectors(query)?;
    let (items, rv) = state
        .store
        .list(&target.def.id(), target.namespace.as_deref());
    let mut deleted = Vec::new();
    for item in items.iter().filter(|o| {
        let shown = present(&target.def, o);
        labels.matches(&shown) && fields.matches(&shown)
    }) {
        if let Ok((object, _)) = delete_object(
            state,
            &target.def.id(),
            &object_key(item),
            &Value::Null,
            query.dry_run(),
            Some(&target.def),
        ) {
            deleted.push(present(&target.def, &object));
        }
    }
    Ok(json_response(
        200,
        &json!({
            "apiVersion": target.def.api_version(),
            "kind": format!("{}List", target.def.kind),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": deleted,
        }),
    ))
}
