//! The write verbs: create (with `generateName`), update and patch, on
//! main resources and the `status` subresource. Each write goes through
//! admission: name checks, for custom resources pruning, defaulting, and
//! OpenAPI and CEL validation against the CRD schema, and last the
//! ValidatingAdmissionPolicies ([`super::admission`]).
//!
//! Simplifications versus a real API server:
//! - status in a create body is dropped for custom resources with a status
//!   subresource, kept for built-ins (so test Nodes can be created whole);
//! - an update that changes nothing keeps the resource version and sends no
//!   watch event (as the real server does); `metadata.generation` moves when
//!   anything but metadata and status changes, for every kind;
//! - `managedFields` record server-side apply only ([`crate::apply`]);
//!   other writes keep them as they are (a body without them keeps the
//!   stored ones) and add no `Update` entry; `fieldManager` is required
//!   for apply patches (with `force` deciding conflicts) and otherwise
//!   ignored.

use bytes::Bytes;
use http::Response;
use k8s_openapi::ByteString;
use serde_json::{json, Value};

use super::admission::Policies;
use super::error::{source_text, ApiError};
use super::gc::after_delete;
use super::request::{check_metadata, key_of, parse_object, Query, Target};
use super::response::{json_response, present, Body};
use super::state::{now, ServerState};
use crate::apply::{self, Part};
use crate::convert;
use crate::crd::{established_status, ResourceDef};
use crate::csr;
use crate::patch::{self, PatchKind};
use crate::schema;
use crate::store::{Mutation, ObjectKey, ResourceId};

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Checks the body against the resource's schema (custom resources):
/// prunes unknown fields (or refuses them under `fieldValidation=Strict`),
/// applies defaults and validates.
fn admit(
    def: &ResourceDef,
    object: &mut Value,
    old: Option<&Value>,
    query: &Query,
    name: &str,
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    let meta_name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    // RBAC objects are named by path segments (`system:aggregate-to-view`),
    // as kube-apiserver's ValidateRBACName allows.
    let rbac_name = def.group == "rbac.authorization.k8s.io"
        && !meta_name.is_empty()
        && meta_name != "."
        && meta_name != ".."
        && !meta_name.contains(['/', '%']);
    if rbac_name {
    } else if !is_dns_subdomain(meta_name) {
        errors.push(schema::FieldError {
            field: "metadata.name".into(),
            reason: "FieldValueInvalid",
            message: format!("metadata.name: Invalid value: {meta_name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
        });
    }
    if let Some(schema_doc) = &def.schema {
        let unknown = schema::prune_and_default(schema_doc, object);
        if !unknown.is_empty() && query.get("fieldValidation") == Some("Strict") {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                list.join(", ")
            )));
        }
        errors.extend(schema::validate(schema_doc, object, old));
        if errors.is_empty() {
            errors.extend(schema::validate_cel(schema_doc, object, old));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(def, name, &errors))
    }
}

/// Normalizes a Secret: `stringData` is folded into base64 `data`.
fn fold_string_data(def: &ResourceDef, object: &mut Value) {
    if def.group.is_empty() && def.plural == "secrets" {
        if let Some(Value::Object(string_data)) =
            object.as_object_mut().and_then(|o| o.remove("stringData"))
        {
            let data = object
                .as_object_mut()
                .map(|o| o.entry("data").or_insert_with(|| json!({})));
            if let Some(Value::Object(data)) = data {
                for (key, value) in string_data {
                    let bytes = ByteString(value.as_str().unwrap_or("").as_bytes().to_vec());
                    data.insert(key, serde_json::to_value(bytes).unwrap_or_default());
                }
            }
        }
    }
}

/// Creates an object (shared by POST, apply-patch to a missing object and
/// the startup namespaces). Returns the stored (or dry-run) object.
pub(crate) fn create_object(
    state: &ServerState,
    def: &ResourceDef,
    namespace: Option<&str>,
    mut object: Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    create_object_with(
        state,
        def,
        namespace,
        &mut object,
        dry_run,
        &Query::default(),
        &|_| Ok(()),
    )
}

/// `gate` is the last check before the object is stored (admission
/// policies, for a client's write).
fn create_object_with(
    state: &ServerState,
    def: &ResourceDef,
    namespace: Option<&str>,
    object: &mut Value,
    dry_run: bool,
    query: &Query,
    gate: &dyn Fn(&Value) -> Result<(), ApiError>,
) -> Result<Value, ApiError> {
    if let Some(kind) = object.get("kind").and_then(Value::as_str) {
        if kind != def.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                def.kind
            )));
        }
    }
    let object_map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the body is not an object"))?;
    object_map.insert("apiVersion".into(), Value::String(def.api_version()));
    object_map.insert("kind".into(), Value::String(def.kind.clone()));
    let meta = object_map
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata is not an object"))?;
    let namespace = if def.namespaced {
        let body_ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .map(str::to_string);
        let ns = match (namespace, body_ns.as_deref()) {
            (Some(path), Some(body)) if path != body => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            (Some(path), _) => path.to_string(),
            (None, Some(body)) => body.to_string(),
            (None, None) => "default".to_string(),
        };
        meta.insert("namespace".into(), Value::String(ns.clone()));
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    let name = match meta.get("name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", state.random_suffix()),
            _ => {
                let error = schema::FieldError {
                    field: "metadata.name".into(),
                    reason: "FieldValueRequired",
                    message: "metadata.name: Required value: name or generateName is required"
                        .into(),
                };
                return Err(ApiError::invalid(def, "", &[error]));
            }
        },
    };
    meta.insert("name".into(), Value::String(name.clone()));
    meta.insert("uid".into(), Value::String(state.new_uid()));
    meta.insert("creationTimestamp".into(), Value::String(now()));
    meta.insert("generation".into(), json!(1));
    for field in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    ] {
        meta.remove(field);
    }
    if def.custom && def.status_subresource {
        object_map.remove("status");
    }
    if !namespace.is_empty() {
        let ns_res = ResourceId::new("", "namespaces");
        match state.store.get(&ns_res, &ObjectKey::new("", &namespace)) {
            None => {
                return Err(ApiError::new(404, "NotFound", format!("namespaces \"{namespace}\" not found"))
                    .with_details(&state.def("", "v1", "namespaces").unwrap_or_else(|| def.clone()), &namespace))
            }
            Some(ns) if ns.pointer("/metadata/deletionTimestamp").is_some() => {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!("{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated", def.group_resource()),
                ))
            }
            Some(_) => {}
        }
    }
    match (def.group.as_str(), def.plural.as_str()) {
        ("", "namespaces") => {
            object["status"] = json!({"phase": "Active"});
            object["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            let plural = object
                .pointer("/spec/names/plural")
                .and_then(Value::as_str)
                .unwrap_or("");
            let group = object
                .pointer("/spec/group")
                .and_then(Value::as_str)
                .unwrap_or("");
            if name != format!("{plural}.{group}") {
                let error = schema::FieldError {
                    field: "metadata.name".into(),
                    reason: "FieldValueInvalid",
                    message: format!(
                        "metadata.name: Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"
                    ),
                };
                return Err(ApiError::invalid(def, &name, &[error]));
            }
            let status = established_status(object, &now());
            object["status"] = status;
        }
        // No kubelet: a stored Pod is taken as running.
        ("", "pods") if object.pointer("/status/phase").is_none() => {
            object["status"] = json!({"phase": "Running"});
        }
        ("", "resourcequotas") => {
            object["status"] = super::quota::status_of(state, &namespace, object);
        }
        _ => {}
    }
    fold_string_data(def, object);
    admit(def, object, None, query, &name)?;
    gate(object)?;
    let is_pod = def.group.is_empty() && def.plural == "pods";
    let quota_guard = is_pod.then(|| {
        state
            .quota_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    });
    if is_pod {
        super::quota::admit_pod(state, def, &namespace, &name, object)?;
    }
    if dry_run {
        return Ok(object.clone());
    }
    let key = ObjectKey::new(&namespace, &name);
    let stored_form = convert::to_storage(def, object);
    let stored = state
        .store
        .mutate(&def.id(), &key, |current, _| match current {
            Some(_) => Err(ApiError::already_exists(def, &name)),
            None => Ok(Mutation::Put(stored_form)),
        })?;
    drop(quota_guard);
    if def.group == "apiextensions.k8s.io" {
        state.refresh_crds();
    }
    if is_pod {
        super::quota::refresh(state, &namespace);
    }
    Ok(stored)
}

/// POST of a new object.
pub(crate) fn create(
    state: &ServerState,
    target: &Target,
    query: &Query,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let mut object = parse_object(body)?;
    if csr::is_csr(&target.def.group, &target.def.plural) {
        csr::stamp_requester(&mut object, &target.user);
    }
    let policies = Policies::load(state);
    let stored = create_object_with(
        state,
        &target.def,
        target.namespace.as_deref(),
        &mut object,
        query.dry_run(),
        query,
        &|o| policies.check(target, "CREATE", Some(o), None),
    )?;
    Ok(json_response(201, &present(&target.def, &stored)))
}

/// The object without what changes on every write (the resource version,
/// the times of managed-field entries), to tell whether a write changed it.
fn without_volatile(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        if let Some(Value::Array(entries)) = meta.get_mut("managedFields") {
            for entry in entries.iter_mut().filter_map(Value::as_object_mut) {
                entry.remove("time");
            }
        }
    }
    if let Some(map) = object.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    object
}

fn spec_part(object: &Value) -> Value {
    let mut object = without_volatile(object);
    if let Some(map) = object.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    object
}

/// What happened to an object written through update or patch.
enum Outcome {
    Stored(Value),
    Deleted(Value),
}

/// Builds the next version of an existing object from a desired one and
/// decides what to store.
fn next_version(
    def: &ResourceDef,
    old: &Value,
    desired: Value,
    subresource: Option<&str>,
    query: &Query,
    name: &str,
) -> Result<(Mutation, Value), ApiError> {
    let status_only = subresource.is_some();
    let managed_fields = desired
        .pointer("/metadata/managedFields")
        .or_else(|| old.pointer("/metadata/managedFields"))
        .cloned();
    let mut desired = convert::to_storage(def, &desired);
    if csr::is_csr(&def.group, &def.plural) {
        desired = csr::merge_write(old, desired, subresource);
    }
    let mut next = if status_only {
        let mut next = old.clone();
        match desired.get("status") {
            Some(status) => next["status"] = status.clone(),
            None => {
                if let Some(map) = next.as_object_mut() {
                    map.remove("status");
                }
            }
        }
        next
    } else {
        let mut next = desired;
        if def.status_subresource {
            match old.get("status") {
                Some(status) => next["status"] = status.clone(),
                None => {
                    if let Some(map) = next.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
        }
        next
    };
    if !next.get("metadata").is_some_and(Value::is_object) {
        next["metadata"] = json!({});
    }
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(field) {
            Some(value) => next["metadata"][field] = value.clone(),
            None => {
                if let Some(meta) = next["metadata"].as_object_mut() {
                    meta.remove(field);
                }
            }
        }
    }
    if let Some(meta) = next["metadata"].as_object_mut() {
        match managed_fields {
            Some(entries) => meta.insert("managedFields".into(), entries),
            None => meta.remove("managedFields"),
        };
    }
    if let Some(map) = next.as_object_mut() {
        map.insert("apiVersion".into(), Value::String(def.api_version()));
        map.insert("kind".into(), Value::String(def.kind.clone()));
    }
    fold_string_data(def, &mut next);
    if def.group == "apiextensions.k8s.io" && !status_only {
        // The names a CRD is served under follow its spec at once.
        next["status"]["acceptedNames"] = next["spec"]["names"].clone();
    }
    admit(def, &mut next, Some(old), query, name)?;
    // After admission, so that defaults and pruning do not count as changes.
    if spec_part(&next) != spec_part(old) {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        next["metadata"]["generation"] = json!(generation + 1);
    }
    let finalizers_empty = next["metadata"]["finalizers"]
        .as_array()
        .is_none_or(Vec::is_empty);
    if next["metadata"].get("deletionTimestamp").is_some() && finalizers_empty {
        return Ok((Mutation::Delete, next));
    }
    if without_volatile(&next) == without_volatile(old) {
        return Ok((Mutation::Keep(old.clone()), old.clone()));
    }
    Ok((Mutation::Put(next.clone()), next))
}

/// Writes an existing object: `build` makes the desired object from the
/// current one (and may refuse).
fn write_existing<F>(
    state: &ServerState,
    target: &Target,
    query: &Query,
    build: F,
) -> Result<Outcome, ApiError>
where
    F: FnOnce(&Value) -> Result<Value, ApiError>,
{
    let def = &target.def;
    let name = target.name.clone().unwrap_or_default();
    let subresource = target.subresource.as_deref();
    let dry_run = query.dry_run();
    let mut deleted = false;
    // Read before the store is locked for the write.
    let policies = Policies::load(state);
    let stored = state
        .store
        .mutate(&def.id(), &key_of(target, &name), |current, _| {
            let old = current.ok_or_else(|| ApiError::not_found(def, &name))?;
            let desired = build(old)?;
            let (mutation, next) = next_version(def, old, desired, subresource, query, &name)?;
            policies.check(target, "UPDATE", Some(&next), Some(old))?;
            if dry_run {
                return Ok(Mutation::Keep(next));
            }
            deleted = matches!(mutation, Mutation::Delete);
            Ok(mutation)
        })?;
    if deleted {
        after_delete(state, &def.id(), &stored);
        return Ok(Outcome::Deleted(stored));
    }
    if def.group == "apiextensions.k8s.io" && !dry_run {
        state.refresh_crds();
    }
    Ok(Outcome::Stored(stored))
}

fn outcome_response(def: &ResourceDef, outcome: Outcome) -> Response<Body> {
    match outcome {
        Outcome::Stored(object) | Outcome::Deleted(object) => {
            json_response(200, &present(def, &object))
        }
    }
}

fn check_rv_precondition(
    def: &ResourceDef,
    old: &Value,
    desired: &Value,
    name: &str,
) -> Result<(), ApiError> {
    let wanted = desired
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let current = old
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !wanted.is_empty() && wanted != current {
        return Err(ApiError::conflict(def, name));
    }
    Ok(())
}

/// PUT of a whole object (or its `status`).
pub(crate) fn update(
    state: &ServerState,
    target: &Target,
    query: &Query,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let desired = parse_object(body)?;
    let def = &target.def;
    let name = target.name.clone().unwrap_or_default();
    if let Some(body_name) = desired.pointer("/metadata/name").and_then(Value::as_str) {
        if body_name != name {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
    }
    let has_rv = desired
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|rv| !rv.is_empty());
    if !has_rv && !def.unconditional_update {
        let error = schema::FieldError {
            field: "metadata.resourceVersion".into(),
            reason: "FieldValueInvalid",
            message:
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
                    .into(),
        };
        return Err(ApiError::invalid(def, &name, &[error]));
    }
    let outcome = write_existing(state, target, query, |old| {
        check_rv_precondition(def, old, &desired, &name)?;
        Ok(desired.clone())
    })?;
    Ok(outcome_response(def, outcome))
}

/// PATCH of an object (or its `status`); an apply patch to a missing
/// object creates it.
pub(crate) fn patch_object(
    state: &ServerState,
    target: &Target,
    query: &Query,
    content_type: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let kind = PatchKind::from_content_type(content_type)
        .map_err(|e| ApiError::new(415, "UnsupportedMediaType", e.to_string()))?;
    let def = &target.def;
    let name = target.name.clone().unwrap_or_default();
    let manager = query.get("fieldManager").unwrap_or_default();
    let force = query.get("force") == Some("true");
    let part = match (target.subresource.as_deref(), def.status_subresource) {
        (Some(_), _) => Part::Status,
        (None, true) => Part::MainWithoutStatus,
        (None, false) => Part::Main,
    };
    if kind == PatchKind::Apply {
        if manager.is_empty() {
            return Err(ApiError::bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"));
        }
        let exists = state.store.get(&def.id(), &key_of(target, &name)).is_some();
        if !exists && target.subresource.is_none() {
            let mut object = parse_object(body)?;
            let mut applied = json!({});
            apply::apply(
                def.schema.as_deref(),
                &mut applied,
                &object,
                manager,
                part,
                force,
                &now(),
            )
            .map_err(|e| ApiError::new(409, "Conflict", e.to_string()))?;
            object["metadata"]["managedFields"] = applied["metadata"]["managedFields"].take();
            if object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .is_some_and(|n| n != name)
            {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
            object["metadata"]["name"] = Value::String(name.clone());
            if csr::is_csr(&def.group, &def.plural) {
                csr::stamp_requester(&mut object, &target.user);
            }
            let policies = Policies::load(state);
            let stored = create_object_with(
                state,
                def,
                target.namespace.as_deref(),
                &mut object,
                query.dry_run(),
                query,
                &|o| policies.check(target, "CREATE", Some(o), None),
            )?;
            return Ok(json_response(201, &present(def, &stored)));
        }
    }
    let outcome = write_existing(state, target, query, |old| {
        let mut patched = present(def, old);
        if kind == PatchKind::Apply {
            let config = parse_object(body)?;
            apply::apply(
                def.schema.as_deref(),
                &mut patched,
                &config,
                manager,
                part,
                force,
                &now(),
            )
            .map_err(|e| ApiError::new(409, "Conflict", e.to_string()))?;
        } else {
            patch::apply(kind, &mut patched, body).map_err(|e| match e {
                patch::PatchError::JsonPatch(_) => ApiError::new(422, "Invalid", source_text(&e)),
                other => ApiError::bad_request(source_text(&other)),
            })?;
        }
        if !patched.is_object() {
            return Err(ApiError::bad_request("the patch did not produce an object"));
        }
        check_metadata(&patched)?;
        check_rv_precondition(def, old, &patched, &name)?;
        Ok(patched)
    })?;
    Ok(outcome_response(def, outcome))
}
