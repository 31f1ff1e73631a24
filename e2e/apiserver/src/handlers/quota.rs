//! ResourceQuota admission and status against the store (the rules are in
//! [`crate::quota`]).

use serde_json::Value;

use super::error::ApiError;
use super::state::ServerState;
use crate::crd::ResourceDef;
use crate::quota;
use crate::store::{Mutation, ObjectKey, ResourceId};

fn pods() -> ResourceId {
    ResourceId::new("", "pods")
}

fn quotas() -> ResourceId {
    ResourceId::new("", "resourcequotas")
}

fn namespace_pods(state: &ServerState, namespace: &str) -> Vec<Value> {
    state.store.list(&pods(), Some(namespace)).0
}

/// Refuses `pod` (named `name`, not stored yet) when a quota of `namespace`
/// has no room for it: `403 Forbidden`, as kube-apiserver words it. The
/// caller holds [`ServerState::quota_lock`] until the pod is stored.
pub(crate) fn admit_pod(
    state: &ServerState,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
    pod: &Value,
) -> Result<(), ApiError> {
    let (limits, _) = state.store.list(&quotas(), Some(namespace));
    if limits.is_empty() {
        return Ok(());
    }
    let used = quota::namespace_usage(&namespace_pods(state, namespace));
    let requested = quota::pod_usage(pod);
    for limit in &limits {
        if let Err(why) = quota::check(limit, &used, &requested) {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!("{} \"{name}\" is forbidden: {why}", def.group_resource()),
            ));
        }
    }
    Ok(())
}

/// The status `quota` shows now, from the pods of `namespace`.
pub(crate) fn status_of(state: &ServerState, namespace: &str, quota: &Value) -> Value {
    quota::status(
        quota,
        &quota::namespace_usage(&namespace_pods(state, namespace)),
    )
}

/// Writes `status.hard` and `status.used` of every quota in `namespace`
/// (after a pod of it came or went).
pub(crate) fn refresh(state: &ServerState, namespace: &str) {
    let used = quota::namespace_usage(&namespace_pods(state, namespace));
    let (limits, _) = state.store.list(&quotas(), Some(namespace));
    for limit in limits {
        let name = limit
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let _ = state.store.mutate::<ApiError, _>(
            &quotas(),
            &ObjectKey::new(namespace, &name),
            |current, _| {
                let Some(current) = current else {
                    return Ok(Mutation::Keep(Value::Null));
                };
                let status = quota::status(current, &used);
                if current.get("status") == Some(&status) {
                    return Ok(Mutation::Keep(current.clone()));
                }
                let mut next = current.clone();
                next["status"] = status;
                Ok(Mutation::Put(next))
            },
        );
    }
}
