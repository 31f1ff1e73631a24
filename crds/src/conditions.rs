//! Who writes which condition, and how: each condition type of an object is
//! written by server-side apply under a field manager of its own,
//! [`field_manager`]`(component, type)`, and the applied configuration
//! holds that one condition and nothing else.
//!
//! `status.conditions` is a list-type map keyed on `type`, so the API
//! server merges an applied condition into the list item by item: the
//! operator's `Scheduled`, the node agent's `Ready` and `Paused` live side
//! by side, and none of them is written by rewriting the whole list (a JSON
//! merge patch replaces a list as a whole, which dropped the others).
//! One manager per condition type, rather than one per component, keeps an
//! apply from removing its component's other conditions: an apply removes
//! whatever its manager owned before and no longer sets.
//!
//! Applies are forced: the writer is the authority for its condition, and a
//! field last written by another manager (an older Godwit that wrote
//! conditions with merge patches, or the operator writing `Ready` for a
//! node that is lost) is taken over rather than refused with a conflict.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use serde_json::{json, Value};

/// The field manager that owns condition `condition_type` when `component`
/// (`operator`, `node`) writes it: `godwit-node/Ready`.
pub fn field_manager(component: &str, condition_type: &str) -> String {
    format!(
        "{}/{condition_type}",
        crate::contract::field_manager(component)
    )
}

/// The configuration that applies `condition` to `obj`'s status, and
/// nothing else.
pub fn apply_config<K>(obj: &K, condition: &Condition) -> Value
where
    K: Resource<DynamicType = ()>,
{
    json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": obj.meta().name},
        "status": {"conditions": [condition]},
    })
}

/// `condition` with its `lastTransitionTime` kept from `current` when its
/// status has not changed (as Kubernetes' condition helpers do).
pub fn keep_transition_time(mut condition: Condition, current: &[Condition]) -> Condition {
    if let Some(previous) = current
        .iter()
        .find(|c| c.type_ == condition.type_ && c.status == condition.status)
    {
        condition.last_transition_time = previous.last_transition_time.clone();
    }
    condition
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VirtualMachine;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn condition(type_: &str, status: &str, at: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "R".into(),
            message: "m".into(),
            last_transition_time: Time(at.parse::<Timestamp>().unwrap()),
            observed_generation: None,
        }
    }

    #[test]
    fn an_apply_holds_one_condition_and_names_its_object() {
        let mut vm = VirtualMachine::new("web", Default::default());
        vm.metadata.namespace = Some("team".into());
        let c = condition("Ready", "True", "2026-12-01T00:00:00Z");
        let config = apply_config(&vm, &c);
        assert_eq!(config["apiVersion"], "godwit.dev/v1alpha1");
        assert_eq!(config["kind"], "VirtualMachine");
        assert_eq!(config["metadata"], json!({"name": "web"}));
        assert_eq!(config["status"]["conditions"][0]["type"], "Ready");
        assert_eq!(config["status"].as_object().unwrap().len(), 1);
        assert_eq!(field_manager("node", "Ready"), "godwit-node/Ready");
    }

    #[test]
    fn the_transition_time_moves_only_with_the_status() {
        let current = [
            condition("Ready", "True", "2026-12-01T00:00:00Z"),
            condition("Paused", "False", "2026-12-02T00:00:00Z"),
        ];
        let same =
            keep_transition_time(condition("Ready", "True", "2026-12-05T00:00:00Z"), &current);
        assert_eq!(same.last_transition_time, current[0].last_transition_time);
        let flipped = keep_transition_time(
            condition("Ready", "False", "2026-12-05T00:00:00Z"),
            &current,
        );
        assert_eq!(
            flipped.last_transition_time.0.to_string(),
            "2026-12-05T00:00:00Z"
        );
    }
}
