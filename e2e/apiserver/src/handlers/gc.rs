//! Removing objects from the store and what follows: finalizers (an object
//! with finalizers is only marked), and garbage collection of what a removed
//! object owned: its dependents by owner reference, a namespace's contents,
//! a CRD's custom resources.
//!
//! Simplifications versus a real API server:
//! - garbage collection runs right after the owner is removed (Background)
//!   and deletes every dependent that names the owner's uid, whatever its
//!   other owners; Foreground deletion marks the owner with the
//!   `foregroundDeletion` finalizer, deletes the dependents (in the
//!   background) and removes the owner when none is left;
//!   `blockOwnerDeletion` is not consulted;
//! - deleting a namespace deletes its objects right away (no Terminating
//!   phase); deleting a CRD deletes its custom resources.

use serde_json::{json, Value};

use super::error::ApiError;
use super::state::{now, ServerState};
use crate::crd::ResourceDef;
use crate::store::{Mutation, ObjectKey, ResourceId};

/// Deletes or marks for deletion one object; returns what was stored last
/// and whether it is gone.
pub(crate) fn delete_object(
    state: &ServerState,
    res: &ResourceId,
    key: &ObjectKey,
    preconditions: &Value,
    dry_run: bool,
    def: Option<&ResourceDef>,
) -> Result<(Value, bool), ApiError> {
    let mut gone = false;
    let display = def.cloned().or_else(|| state.defs_of(res));
    let stored = state.store.mutate(res, key, |current, _| {
        let Some(old) = current else {
            return Err(match &display {
                Some(def) => ApiError::not_found(def, &key.name),
                None => ApiError::new(
                    404,
                    "NotFound",
                    format!("{} \"{}\" not found", res.resource, key.name),
                ),
            });
        };
        for (field, pointer) in [
            ("uid", "/metadata/uid"),
            ("resourceVersion", "/metadata/resourceVersion"),
        ] {
            if let Some(want) = preconditions.get(field).and_then(Value::as_str) {
                if old.pointer(pointer).and_then(Value::as_str) != Some(want) {
                    return Err(match &display {
                        Some(def) => ApiError::conflict(def, &key.name),
                        None => ApiError::new(409, "Conflict", "precondition failed".into()),
                    });
                }
            }
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if old.pointer("/metadata/deletionTimestamp").is_some() || dry_run {
                return Ok(Mutation::Keep(old.clone()));
            }
            let mut marked = old.clone();
            marked["metadata"]["deletionTimestamp"] = Value::String(now());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            return Ok(Mutation::Put(marked));
        }
        if dry_run {
            return Ok(Mutation::Keep(old.clone()));
        }
        gone = true;
        Ok(Mutation::Delete)
    })?;
    if gone {
        after_delete(state, res, &stored);
    }
    Ok((stored, gone))
}

/// Cleans up after an object is gone: dependents (owner references), the
/// contents of a namespace, the custom resources of a CRD.
pub(crate) fn after_delete(state: &ServerState, res: &ResourceId, object: &Value) {
    release_foreground_owners(state, object);
    if res.group.is_empty() && res.resource == "pods" {
        if let Some(ns) = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
        {
            super::quota::refresh(state, ns);
        }
    }
    let uid = object
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if res.group == "apiextensions.k8s.io" && res.resource == "customresourcedefinitions" {
        let group = object
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("");
        let plural = object
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or("");
        let crs = ResourceId::new(group, plural);
        let (items, _) = state.store.list(&crs, None);
        for item in items {
            let key = object_key(&item);
            let _ = state
                .store
                .mutate::<ApiError, _>(&crs, &key, |_, _| Ok(Mutation::Delete));
        }
        state.refresh_crds();
    }
    let namespace_deleted = res.group.is_empty() && res.resource == "namespaces";
    for resource in state.store.resources() {
        let (items, _) = state
            .store
            .list(&resource, namespace_deleted.then_some(name.as_str()));
        for item in items {
            let owned = item
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid.as_str())));
            if owned || namespace_deleted {
                let _ = delete_object(
                    state,
                    &resource,
                    &object_key(&item),
                    &Value::Null,
                    false,
                    None,
                );
            }
        }
    }
}

/// The store key of an object, from its metadata.
pub(crate) fn object_key(object: &Value) -> ObjectKey {
    ObjectKey::new(
        object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(""),
        object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or(""),
    )
}

const FOREGROUND: &str = "foregroundDeletion";

fn owned_by(item: &Value, uid: &str) -> bool {
    item.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)))
}

/// Every object (with its resource) whose owner references name `uid`.
pub(crate) fn dependents_of(state: &ServerState, uid: &str) -> Vec<(ResourceId, Value)> {
    let mut found = Vec::new();
    for resource in state.store.resources() {
        let (items, _) = state.store.list(&resource, None);
        found.extend(
            items
                .into_iter()
                .filter(|item| owned_by(item, uid))
                .map(|item| (resource.clone(), item)),
        );
    }
    found
}

/// Foreground deletion: marks the owner with the `foregroundDeletion`
/// finalizer, deletes its dependents, and lets the owner go once none is
/// left (see [`release_foreground_owners`]).
pub(crate) fn delete_foreground(state: &ServerState, res: &ResourceId, key: &ObjectKey, uid: &str) {
    let _ = state.store.mutate::<ApiError, _>(res, key, |current, _| {
        let Some(current) = current else {
            return Ok(Mutation::Keep(Value::Null));
        };
        let mut marked = current.clone();
        let meta = &mut marked["metadata"];
        if !meta["finalizers"].is_array() {
            meta["finalizers"] = json!([]);
        }
        if let Some(finalizers) = meta["finalizers"].as_array_mut() {
            if !finalizers.iter().any(|f| f == FOREGROUND) {
                finalizers.push(json!(FOREGROUND));
            }
        }
        if meta.get("deletionTimestamp").is_none() {
            meta["deletionTimestamp"] = Value::String(now());
            meta["deletionGracePeriodSeconds"] = json!(0);
        }
        Ok(Mutation::Put(marked))
    });
    for (resource, item) in dependents_of(state, uid) {
        let _ = delete_object(
            state,
            &resource,
            &object_key(&item),
            &Value::Null,
            false,
            None,
        );
    }
    release_foreground_owner(state, res, key, uid);
}

/// Drops the `foregroundDeletion` finalizer of an owner without dependents
/// left, deleting it when no other finalizer remains.
fn release_foreground_owner(state: &ServerState, res: &ResourceId, key: &ObjectKey, uid: &str) {
    if !dependents_of(state, uid).is_empty() {
        return;
    }
    let mut gone = false;
    let result = state.store.mutate::<ApiError, _>(res, key, |current, _| {
        let Some(current) = current else {
            return Ok(Mutation::Keep(Value::Null));
        };
        let mut next = current.clone();
        let Some(finalizers) = next["metadata"]["finalizers"].as_array_mut() else {
            return Ok(Mutation::Keep(current.clone()));
        };
        if !finalizers.iter().any(|f| f == FOREGROUND) {
            return Ok(Mutation::Keep(current.clone()));
        }
        finalizers.retain(|f| f != FOREGROUND);
        if finalizers.is_empty() {
            gone = true;
            return Ok(Mutation::Delete);
        }
        Ok(Mutation::Put(next))
    });
    if let (Ok(object), true) = (result, gone) {
        after_delete(state, res, &object);
    }
}

/// After a dependent is gone, owners waiting in foreground deletion may go.
fn release_foreground_owners(state: &ServerState, dependent: &Value) {
    let Some(refs) = dependent
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
    else {
        return;
    };
    let namespace = dependent
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    for owner_ref in refs {
        let Some(uid) = owner_ref["uid"].as_str() else {
            continue;
        };
        for resource in state.store.resources() {
            let (items, _) = state.store.list(&resource, None);
            let owner = items.into_iter().find(|o| {
                o.pointer("/metadata/uid").and_then(Value::as_str) == Some(uid)
                    && o.pointer("/metadata/finalizers")
                        .and_then(Value::as_array)
                        .is_some_and(|f| f.iter().any(|f| f == FOREGROUND))
            });
            if let Some(owner) = owner {
                let key = object_key(&owner);
                if key.namespace.is_empty() || key.namespace == namespace {
                    release_foreground_owner(state, &resource, &key, uid);
                }
            }
        }
    }
}

/// Orphan deletion: removes `uid` from the owner references of its
/// dependents, which stay.
pub(crate) fn orphan_dependents(state: &ServerState, uid: &str) {
    for resource in state.store.resources() {
        let (items, _) = state.store.list(&resource, None);
        for item in items {
            let owned = item
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)));
            if owned {
                let _ = state.store.mutate::<ApiError, _>(
                    &resource,
                    &object_key(&item),
                    |current, _| {
                        let Some(current) = current else {
                            return Ok(Mutation::Keep(Value::Null));
                        };
                        let mut next = current.clone();
                        if let Some(refs) = next["metadata"]["ownerReferences"].as_array_mut() {
                            refs.retain(|r| r["uid"].as_str() != Some(uid));
                        }
                        Ok(Mutation::Put(next))
                    },
                );
            }
        }
    }
}
