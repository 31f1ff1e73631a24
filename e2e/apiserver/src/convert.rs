//! Conversion between served versions that share one storage.
//!
//! `events.k8s.io/v1` Events are stored as `v1` Events, as in a real
//! cluster, so events published by kube-rs' `Recorder` show up in
//! `kubectl describe`. Fields are renamed both ways; everything else is
//! kept as it is.

use serde_json::Value;

use super::crd::ResourceDef;

/// `events.k8s.io/v1` field name and its `v1` Event counterpart.
const EVENT_FIELDS: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn is_events_v1(def: &ResourceDef) -> bool {
    def.group == "events.k8s.io" && def.plural == "events"
}

fn rename(object: &mut Value, pairs: impl Iterator<Item = (&'static str, &'static str)>) {
    if let Some(map) = object.as_object_mut() {
        for (from, to) in pairs {
            if let Some(value) = map.remove(from) {
                map.insert(to.to_string(), value);
            }
        }
    }
}

/// The object in its storage form (what the store keeps).
pub fn to_storage(def: &ResourceDef, object: &Value) -> Value {
    let mut object = object.clone();
    if is_events_v1(def) {
        rename(&mut object, EVENT_FIELDS.into_iter());
        object["apiVersion"] = Value::String("v1".into());
    }
    object
}

/// The stored object as served through `def`'s group and version.
pub fn from_storage(def: &ResourceDef, object: &Value) -> Value {
    let mut object = object.clone();
    if is_events_v1(def) {
        rename(
            &mut object,
            EVENT_FIELDS.into_iter().map(|(new, old)| (old, new)),
        );
    }
    if let Some(map) = object.as_object_mut() {
        map.insert("apiVersion".into(), Value::String(def.api_version()));
        map.insert("kind".into(), Value::String(def.kind.clone()));
    }
    object
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::crd::builtin_resources;
    use super::*;

    #[test]
    fn events_round_trip_through_core_storage() {
        let defs = builtin_resources();
        let new_api = defs.iter().find(|d| d.group == "events.k8s.io").unwrap();
        let core = defs
            .iter()
            .find(|d| d.group.is_empty() && d.plural == "events")
            .unwrap();
        assert_eq!(new_api.id(), core.id());
        let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "note": "disk ready",
            "regarding": {"name": "vm1"}, "reason": "Provisioned", "reportingController": "godwit"});
        let stored = to_storage(new_api, &event);
        assert_eq!(stored["message"], "disk ready");
        assert_eq!(stored["involvedObject"]["name"], "vm1");
        let as_core = from_storage(core, &stored);
        assert_eq!(as_core["apiVersion"], "v1");
        assert_eq!(as_core["reportingComponent"], "godwit");
        assert_eq!(from_storage(new_api, &stored), event);
    }
}
