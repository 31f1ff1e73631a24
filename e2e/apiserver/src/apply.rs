//! Server-side apply: merging an applied configuration into the live object
//! and tracking which field manager owns which fields, in
//! `metadata.managedFields` (`FieldsV1`, as kube-apiserver writes them).
//!
//! An apply by manager M with configuration C:
//! 1. merges C into the live object: objects field by field, lists marked
//!    `x-kubernetes-list-type: map` item by item on their
//!    `x-kubernetes-list-map-keys`, every other list and scalar replaced;
//! 2. records the fields C sets as M's field set (for the main resource or
//!    the `status` subresource, each with its own entry);
//! 3. removes what M owned before, no longer sets, and no other manager
//!    owns: a field, or a whole list item when nobody owns anything in it.
//!
//! So two managers may each apply their own conditions to one list and
//! keep both, and a manager that stops applying a condition removes only
//! its own.
//!
//! Simplifications versus a real API server:
//! - only apply operations are tracked; other writes (update, merge patch)
//!   neither take ownership nor appear as `Update` entries;
//! - conflicts are only between apply managers: setting a field another
//!   apply manager owns to another value is refused (409) unless `force`,
//!   which moves the field to the new manager; setting it to the same value
//!   shares it;
//! - in `metadata` only `labels` and `annotations` are owned;
//! - list-type `set` lists and lists without a schema are atomic.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

/// A field path as `FieldsV1` spells its steps: `f:spec`, `k:{"name":"a"}`.
type FieldPath = Vec<String>;

/// The fields one manager owns: every leaf it set, and every list-map
/// item it named.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet(BTreeSet<FieldPath>);

impl FieldSet {
    /// The fields an applied configuration sets. `status` says which part
    /// of the object the apply targets: the `status` subresource, or the
    /// main resource (without status when it is a subresource).
    pub fn of_config(schema: Option<&Value>, config: &Value, part: Part) -> Self {
        let mut set = BTreeSet::new();
        let Some(fields) = config.as_object() else {
            return Self(set);
        };
        for (name, value) in fields {
            let tracked = match name.as_str() {
                "apiVersion" | "kind" => false,
                "status" => part != Part::MainWithoutStatus,
                _ => part != Part::Status,
            };
            if !tracked || value.is_null() {
                continue;
            }
            let path = vec![format!("f:{name}")];
            if name == "metadata" {
                for owned in ["labels", "annotations"] {
                    if let Some(value) = value.get(owned).filter(|v| !v.is_null()) {
                        let path = vec![path[0].clone(), format!("f:{owned}")];
                        collect(None, value, path, &mut set);
                    }
                }
                continue;
            }
            collect(property(schema, name), value, path, &mut set);
        }
        Self(set)
    }

    /// Reads a `fieldsV1` document.
    pub fn from_fields_v1(fields: &Value) -> Self {
        let mut set = BTreeSet::new();
        read_fields_v1(fields, Vec::new(), &mut set);
        Self(set)
    }

    /// The `fieldsV1` document of this set.
    pub fn to_fields_v1(&self) -> Value {
        let mut root = Map::new();
        for path in &self.0 {
            let mut node = &mut root;
            for step in path {
                node = node
                    .entry(step.clone())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .expect("fieldsV1 nodes are objects");
            }
            if path.last().is_some_and(|step| step.starts_with("k:")) {
                node.insert(".".into(), json!({}));
            }
        }
        Value::Object(root)
    }

    fn touches(&self, path: &[String]) -> bool {
        self.0
            .iter()
            .any(|owned| owned.starts_with(path) || path.starts_with(owned))
    }
}

/// Which part of an object an apply writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The main resource of a kind without a status subresource.
    Main,
    /// The main resource of a kind with a status subresource.
    MainWithoutStatus,
    /// The `status` subresource.
    Status,
}

impl Part {
    fn subresource(self) -> Option<&'static str> {
        (self == Part::Status).then_some("status")
    }
}

fn property<'a>(schema: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    schema?.get("properties")?.get(name)
}

fn list_map_keys(schema: Option<&Value>) -> Option<Vec<String>> {
    let schema = schema?;
    if schema.get("x-kubernetes-list-type")?.as_str()? != "map" {
        return None;
    }
    let keys = schema.get("x-kubernetes-list-map-keys")?.as_array()?;
    Some(
        keys.iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
    )
}

/// `k:{"name":"a"}`: an item's key fields as a JSON object, keys sorted.
fn item_step(keys: &[String], item: &Value) -> Option<String> {
    let mut key = Map::new();
    for name in keys {
        key.insert(name.clone(), item.get(name)?.clone());
    }
    Some(format!("k:{}", Value::Object(key)))
}

fn collect(schema: Option<&Value>, value: &Value, path: FieldPath, set: &mut BTreeSet<FieldPath>) {
    match value {
        Value::Object(fields) if !fields.is_empty() => {
            for (name, sub) in fields.iter().filter(|(_, v)| !v.is_null()) {
                let mut path = path.clone();
                path.push(format!("f:{name}"));
                let sub_schema = property(schema, name)
                    .or_else(|| schema.and_then(|s| s.get("additionalProperties")));
                collect(sub_schema, sub, path, set);
            }
        }
        Value::Array(items) => match list_map_keys(schema) {
            Some(keys) => {
                let item_schema = schema.and_then(|s| s.get("items"));
                for item in items {
                    let Some(step) = item_step(&keys, item) else {
                        continue;
                    };
                    let mut path = path.clone();
                    path.push(step);
                    set.insert(path.clone());
                    collect(item_schema, item, path, set);
                }
            }
            None => {
                set.insert(path);
            }
        },
        _ => {
            set.insert(path);
        }
    }
}

fn read_fields_v1(node: &Value, path: FieldPath, set: &mut BTreeSet<FieldPath>) {
    let Some(children) = node.as_object() else {
        return;
    };
    let steps: Vec<&String> = children.keys().filter(|k| *k != ".").collect();
    if (steps.is_empty() || children.contains_key(".")) && !path.is_empty() {
        set.insert(path.clone());
    }
    for step in steps {
        let mut path = path.clone();
        path.push(step.clone());
        read_fields_v1(&children[step], path, set);
    }
}

/// Merges an applied configuration into `live` (see the module docs).
pub fn merge(schema: Option<&Value>, live: &mut Value, config: &Value) {
    match (live, config) {
        (Value::Object(live), Value::Object(config)) => {
            for (name, value) in config {
                if value.is_null() {
                    continue;
                }
                let sub_schema = property(schema, name)
                    .or_else(|| schema.and_then(|s| s.get("additionalProperties")));
                match live.get_mut(name) {
                    Some(current) => merge(sub_schema, current, value),
                    None => {
                        live.insert(name.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(live), Value::Array(config)) if list_map_keys(schema).is_some() => {
            let keys = list_map_keys(schema).unwrap_or_default();
            let item_schema = schema.and_then(|s| s.get("items"));
            for item in config {
                let step = item_step(&keys, item);
                let existing = live
                    .iter_mut()
                    .find(|current| step.is_some() && item_step(&keys, current) == step);
                match existing {
                    Some(current) => merge(item_schema, current, item),
                    None => live.push(item.clone()),
                }
            }
        }
        (live, config) => *live = config.clone(),
    }
}

/// Removes the value at `path` from `object`; a `k:` step names a list item.
fn remove(object: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = object;
    for step in parents {
        let next = match step_child(node, step) {
            Some(next) => next,
            None => return,
        };
        node = next;
    }
    if let Some(name) = last.strip_prefix("f:") {
        if let Some(fields) = node.as_object_mut() {
            fields.remove(name);
        }
    } else if let Some(key) = last.strip_prefix("k:") {
        let key: Value = serde_json::from_str(key).unwrap_or(Value::Null);
        if let Some(items) = node.as_array_mut() {
            items.retain(|item| !item_matches(item, &key));
        }
    }
}

fn is_empty_at(object: &Value, path: &[String]) -> bool {
    match value_at(object, path) {
        Some(Value::Object(fields)) => fields.is_empty(),
        Some(Value::Array(items)) => items.is_empty(),
        _ => false,
    }
}

/// The value at `path` (`f:` and `k:` steps), if there is one.
fn value_at<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut node = object;
    for step in path {
        let next = if let Some(name) = step.strip_prefix("f:") {
            node.get(name)
        } else {
            let key: Option<Value> = step
                .strip_prefix("k:")
                .and_then(|key| serde_json::from_str(key).ok());
            key.and_then(|key| {
                node.as_array()?
                    .iter()
                    .find(|item| item_matches(item, &key))
            })
        };
        node = next?;
    }
    Some(node)
}

/// `.status.conditions[type="X"].status`, as kube-apiserver names a field
/// in a conflict.
fn field_text(path: &[String]) -> String {
    let mut out = String::new();
    for step in path {
        if let Some(name) = step.strip_prefix("f:") {
            out.push('.');
            out.push_str(name);
        } else if let Some(key) = step.strip_prefix("k:") {
            let key: Value = serde_json::from_str(key).unwrap_or(Value::Null);
            let pairs: Vec<String> = key
                .as_object()
                .map(|key| key.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            out.push_str(&format!("[{}]", pairs.join(",")));
        }
    }
    out
}

/// An apply that would change fields other managers own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Apply failed with {} conflict(s): {}", .0.len(), .0.iter().map(|(manager, field)| format!("conflict with {manager:?}: {field}")).collect::<Vec<_>>().join(", "))]
pub struct ApplyConflicts(pub Vec<(String, String)>);

fn step_child<'a>(node: &'a mut Value, step: &str) -> Option<&'a mut Value> {
    if let Some(name) = step.strip_prefix("f:") {
        return node.get_mut(name);
    }
    let key: Value = serde_json::from_str(step.strip_prefix("k:")?).ok()?;
    node.as_array_mut()?
        .iter_mut()
        .find(|item| item_matches(item, &key))
}

fn item_matches(item: &Value, key: &Value) -> bool {
    key.as_object().is_some_and(|key| {
        key.iter()
            .all(|(name, value)| item.get(name) == Some(value))
    })
}

/// Applies `config` by `manager` to `live`: merges it, records the
/// manager's fields in `metadata.managedFields`, and removes the fields
/// the manager gave up that nobody else owns.
///
/// Without `force`, setting a field another apply manager owns to another
/// value is a conflict, and nothing changes; with `force`, the field moves
/// to `manager`.
pub fn apply(
    schema: Option<&Value>,
    live: &mut Value,
    config: &Value,
    manager: &str,
    part: Part,
    force: bool,
    time: &str,
) -> Result<(), ApplyConflicts> {
    let mut entries: Vec<Value> = live
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let subresource = part.subresource();
    let is_mine = |entry: &Value| {
        entry["manager"] == manager
            && entry["operation"] == "Apply"
            && entry.get("subresource").and_then(Value::as_str) == subresource
    };
    let before = entries
        .iter()
        .find(|entry| is_mine(entry))
        .map(|entry| FieldSet::from_fields_v1(&entry["fieldsV1"]))
        .unwrap_or_default();
    let after = FieldSet::of_config(schema, config, part);
    // Other apply managers' fields this configuration sets to new values.
    let mut conflicts = Vec::new();
    for entry in entries.iter_mut().filter(|entry| !is_mine(entry)) {
        if entry["operation"] != "Apply" {
            continue;
        }
        let mut owned = FieldSet::from_fields_v1(&entry["fieldsV1"]);
        let taken: Vec<FieldPath> = owned
            .0
            .iter()
            .filter(|path| after.0.contains(*path))
            // Values conflict, not list items both name.
            .filter(|path| path.last().is_some_and(|step| step.starts_with("f:")))
            .filter(|path| value_at(live, path) != value_at(config, path))
            .cloned()
            .collect();
        if taken.is_empty() {
            continue;
        }
        if force {
            for path in &taken {
                owned.0.remove(path);
            }
            entry["fieldsV1"] = owned.to_fields_v1();
        } else {
            let other = entry["manager"].as_str().unwrap_or_default().to_string();
            conflicts.extend(taken.iter().map(|path| (other.clone(), field_text(path))));
        }
    }
    if !conflicts.is_empty() {
        return Err(ApplyConflicts(conflicts));
    }
    let others: Vec<FieldSet> = entries
        .iter()
        .filter(|entry| !is_mine(entry))
        .map(|entry| FieldSet::from_fields_v1(&entry["fieldsV1"]))
        .collect();

    let mut config = config.clone();
    if let Some(fields) = config.as_object_mut() {
        match part {
            Part::Status => fields.retain(|name, _| name == "status"),
            Part::MainWithoutStatus => {
                fields.remove("status");
            }
            Part::Main => {}
        }
        if let Some(meta) = fields.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
    }
    merge(schema, live, &config);
    for path in before.0.difference(&after.0) {
        let kept = after.touches(path) || others.iter().any(|set| set.touches(path));
        if !kept {
            remove(live, path);
            // Parents left empty go too, unless someone owns them as a value.
            for depth in (1..path.len()).rev() {
                let parent = &path[..depth];
                let owned_as_value =
                    after.0.contains(parent) || others.iter().any(|set| set.0.contains(parent));
                if owned_as_value || !is_empty_at(live, parent) {
                    break;
                }
                remove(live, parent);
            }
        }
    }

    // The entry keeps its place in the list, so that re-applying the same
    // configuration changes nothing.
    let position = entries.iter().position(&is_mine);
    entries.retain(|entry| !is_mine(entry));
    if !after.0.is_empty() {
        let mut entry = json!({
            "manager": manager,
            "operation": "Apply",
            "apiVersion": live.get("apiVersion").cloned().unwrap_or(Value::Null),
            "time": time,
            "fieldsType": "FieldsV1",
            "fieldsV1": after.to_fields_v1(),
        });
        if let Some(subresource) = subresource {
            entry["subresource"] = Value::String(subresource.into());
        }
        let position = position.unwrap_or(entries.len()).min(entries.len());
        entries.insert(position, entry);
    }
    if !live.get("metadata").is_some_and(Value::is_object) {
        live["metadata"] = json!({});
    }
    live["metadata"]["managedFields"] = Value::Array(entries);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "disks": {"type": "array", "x-kubernetes-list-type": "map",
                          "x-kubernetes-list-map-keys": ["name"],
                          "items": {"type": "object", "properties": {
                              "name": {"type": "string"}, "size": {"type": "string"}}}},
                "cpu": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}}}},
            "status": {"type": "object", "properties": {
                "conditions": {"type": "array", "x-kubernetes-list-type": "map",
                               "x-kubernetes-list-map-keys": ["type"],
                               "items": {"type": "object"}}}}}})
    }

    fn condition(kind: &str, status: &str) -> Value {
        json!({"type": kind, "status": status, "reason": "R"})
    }

    fn status_apply(live: &mut Value, manager: &str, conditions: Vec<Value>) {
        let config = json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "x"},
                            "status": {"conditions": conditions}});
        apply(
            Some(&schema()),
            live,
            &config,
            manager,
            Part::Status,
            false,
            "t",
        )
        .unwrap();
    }

    fn types(live: &Value) -> Vec<&str> {
        live["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn two_managers_keep_their_own_conditions() {
        let mut live = json!({"apiVersion": "v1", "kind": "K", "metadata": {"name": "x"}});
        status_apply(&mut live, "a", vec![condition("X", "True")]);
        status_apply(&mut live, "b", vec![condition("Y", "False")]);
        assert_eq!(types(&live), ["X", "Y"]);
        // a changes X: Y stays.
        status_apply(&mut live, "a", vec![condition("X", "False")]);
        assert_eq!(types(&live), ["X", "Y"]);
        assert_eq!(live["status"]["conditions"][0]["status"], "False");
        // a stops applying X: X goes, Y stays.
        status_apply(&mut live, "a", vec![]);
        assert_eq!(types(&live), ["Y"]);
        // a stops applying Y, which it never owned: Y stays.
        status_apply(&mut live, "a", vec![]);
        assert_eq!(types(&live), ["Y"]);
        let managers: Vec<&str> = live["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        assert_eq!(managers, ["b"]);
    }

    #[test]
    fn a_changed_field_of_another_manager_conflicts_unless_forced() {
        let mut live = json!({"metadata": {"name": "x"}});
        status_apply(&mut live, "a", vec![condition("X", "True")]);
        let config = json!({"metadata": {"name": "x"},
                            "status": {"conditions": [condition("X", "False")]}});
        let refused = apply(
            Some(&schema()),
            &mut live,
            &config,
            "b",
            Part::Status,
            false,
            "t",
        );
        let conflicts = refused.unwrap_err();
        assert_eq!(
            conflicts.0,
            [(
                "a".to_string(),
                ".status.conditions[type=\"X\"].status".to_string()
            )]
        );
        assert_eq!(
            conflicts.to_string(),
            "Apply failed with 1 conflict(s): conflict with \"a\": .status.conditions[type=\"X\"].status"
        );
        assert_eq!(live["status"]["conditions"][0]["status"], "True");
        // Forced, b takes the field: a letting X go keeps b's status.
        apply(
            Some(&schema()),
            &mut live,
            &config,
            "b",
            Part::Status,
            true,
            "t",
        )
        .unwrap();
        assert_eq!(live["status"]["conditions"][0]["status"], "False");
        status_apply(&mut live, "a", vec![]);
        assert_eq!(types(&live), ["X"]);
        assert_eq!(live["status"]["conditions"][0]["status"], "False");
    }

    #[test]
    fn a_shared_condition_survives_one_owner_letting_go() {
        let mut live = json!({"metadata": {"name": "x"}});
        status_apply(&mut live, "a", vec![condition("X", "True")]);
        status_apply(&mut live, "b", vec![condition("X", "True")]);
        status_apply(&mut live, "a", vec![]);
        assert_eq!(types(&live), ["X"]);
    }

    #[test]
    fn dropped_fields_go_and_atomic_lists_are_replaced() {
        let mut live = json!({"metadata": {"name": "x"}});
        let first = json!({"metadata": {"name": "x", "labels": {"a": "1"}},
                           "spec": {"cpu": 2, "tags": ["p", "q"],
                                    "disks": [{"name": "root", "size": "1Gi"}, {"name": "d", "size": "2Gi"}]}});
        apply(
            Some(&schema()),
            &mut live,
            &first,
            "helm",
            Part::Main,
            false,
            "t",
        )
        .unwrap();
        let second = json!({"metadata": {"name": "x"},
                            "spec": {"tags": ["r"], "disks": [{"name": "root", "size": "3Gi"}]}});
        apply(
            Some(&schema()),
            &mut live,
            &second,
            "helm",
            Part::Main,
            false,
            "t",
        )
        .unwrap();
        assert_eq!(
            live["spec"],
            json!({"tags": ["r"], "disks": [{"name": "root", "size": "3Gi"}]})
        );
        assert!(live["metadata"].get("labels").is_none(), "{live}");
    }

    /// Clients may write any `managedFields` (create and update keep what
    /// they send): an apply over garbage entries must not panic, and it
    /// replaces the manager's own entry.
    #[test]
    fn an_apply_over_hand_written_managed_fields() {
        let mut live = json!({"metadata": {"name": "x", "managedFields": [
            1, "x", {"manager": "a", "operation": "Apply",
                     "fieldsV1": {"f:spec": {"k:not json": {}, "f:cpu": {}, "f:x": 3}}}]},
            "spec": {"cpu": 1, "disks": "not a list"}});
        let config = json!({"spec": {"disks": [{"name": "root"}, {"size": "1Gi"}]}});
        apply(
            Some(&schema()),
            &mut live,
            &config,
            "a",
            Part::Main,
            false,
            "t",
        )
        .unwrap();
        assert_eq!(live["spec"]["disks"], config["spec"]["disks"]);
        // a gave up spec.cpu (nobody else owns it).
        assert!(live["spec"].get("cpu").is_none(), "{live}");
        let entries = live["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2]["manager"], "a");
    }

    #[test]
    fn fields_v1_round_trips_in_the_kubernetes_shape() {
        let set = FieldSet::of_config(
            Some(&schema()),
            &json!({"metadata": {"labels": {"a": "1"}},
                    "status": {"conditions": [{"type": "X", "status": "True"}]}}),
            Part::Main,
        );
        let fields = set.to_fields_v1();
        assert_eq!(
            fields,
            json!({"f:metadata": {"f:labels": {"f:a": {}}},
                   "f:status": {"f:conditions": {"k:{\"type\":\"X\"}": {
                       ".": {}, "f:status": {}, "f:type": {}}}}})
        );
        assert_eq!(FieldSet::from_fields_v1(&fields), set);
    }
}
