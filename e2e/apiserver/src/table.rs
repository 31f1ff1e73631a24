//! `meta.k8s.io/v1` Table output for `kubectl get`.
//!
//! Columns are Name plus the resource's printer columns (from the CRD's
//! `additionalPrinterColumns`, or a fixed set for built-ins). Printer-column
//! JSONPaths support `.a.b`, `.a[0]`, `.a[*]` and `[?(@.k=="v")]` filters;
//! `date` columns are shown as an age (`5m`), as the real server does.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::crd::{ResourceDef, CSR_CONDITION, NODE_STATUS};

/// Whether an Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

#[derive(Debug, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
    Filter(String, String),
}

fn parse_path(path: &str) -> Vec<Step> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut steps = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            if end > 0 {
                steps.push(Step::Field(after[..end].to_string()));
            }
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let Some(end) = after.find(']') else { break };
            let inner = after[..end].trim();
            if inner == "*" {
                steps.push(Step::All);
            } else if let Ok(index) = inner.parse() {
                steps.push(Step::Index(index));
            } else if let Some(filter) =
                inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')'))
            {
                if let Some((key, value)) = filter.split_once("==") {
                    let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
                    steps.push(Step::Filter(key.trim().to_string(), value.to_string()));
                }
            } else {
                let key = inner.trim_matches(|c| c == '"' || c == '\'');
                steps.push(Step::Field(key.to_string()));
            }
            rest = &after[end + 1..];
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            steps.push(Step::Field(rest[..end].to_string()));
            rest = &rest[end..];
        }
    }
    steps
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Evaluates a simple JSONPath; returns every match.
pub fn evaluate<'a>(object: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![object];
    for step in parse_path(path) {
        let mut next = Vec::new();
        for value in current {
            match &step {
                Step::Field(name) => next.extend(value.get(name.as_str())),
                Step::Index(index) => next.extend(value.get(*index)),
                Step::All => match value {
                    Value::Array(items) => next.extend(items.iter()),
                    Value::Object(map) => next.extend(map.values()),
                    _ => {}
                },
                Step::Filter(key, want) => {
                    if let Value::Array(items) = value {
                        next.extend(items.iter().filter(|item| {
                            item.get(key.as_str()).map(scalar_text).as_deref() == Some(want)
                        }));
                    }
                }
            }
        }
        current = next;
    }
    current
}

/// A duration as kubectl shows ages: `45s`, `5m10s`, `3h`, `2d`.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=599 => format!("{}m{}s", s / 60, s % 60),
        600..=10_799 => format!("{}m", s / 60),
        10_800..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn cell(def_type: &str, found: &[&Value]) -> Value {
    let Some(first) = found.first() else {
        return Value::Null;
    };
    if def_type == "date" {
        if let Some(time) = first
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        {
            let age = Utc::now().signed_duration_since(time.with_timezone(&Utc));
            return Value::String(human_duration(age.num_seconds()));
        }
    }
    match first {
        Value::String(_) | Value::Number(_) | Value::Bool(_) if found.len() == 1 => {
            (*first).clone()
        }
        _ => Value::String(
            found
                .iter()
                .map(|v| scalar_text(v))
                .collect::<Vec<_>>()
                .join(","),
        ),
    }
}

fn node_status(node: &Value, ready: &[&Value]) -> Value {
    let mut status = match ready.first().and_then(|v| v.as_str()) {
        Some("True") => "Ready".to_string(),
        Some("False") => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if node.pointer("/spec/unschedulable") == Some(&Value::Bool(true)) {
        status.push_str(",SchedulingDisabled");
    }
    Value::String(status)
}

/// Column definitions of a resource's table.
fn column_definitions(def: &ResourceDef) -> Vec<Value> {
    let mut columns = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace."
    })];
    columns.extend(def.columns.iter().map(|c| {
        json!({
            "name": c.name, "type": if c.type_ == "date" { "string" } else { c.type_.as_str() },
            "format": c.format, "priority": c.priority, "description": c.description
        })
    }));
    columns
}

/// What the row's `object` holds (the `includeObject` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    /// No object.
    None,
    /// Only metadata, as `PartialObjectMetadata`.
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parses the query parameter; kubectl's default is `Metadata`.
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

fn row(def: &ResourceDef, object: &Value, include: IncludeObject) -> Value {
    let mut cells = vec![object
        .pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null)];
    cells.extend(def.columns.iter().map(|c| {
        let found = evaluate(object, &c.json_path);
        if c.format == NODE_STATUS {
            return node_status(object, &found);
        }
        if c.format == CSR_CONDITION {
            return Value::String(crate::csr::condition_text(object));
        }
        cell(&c.type_, &found)
    }));
    let embedded = match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => object.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object.get("metadata").cloned().unwrap_or(Value::Null),
        }),
    };
    json!({"cells": cells, "object": embedded})
}

/// A Table of the given objects.
pub fn table(
    def: &ResourceDef,
    objects: &[Value],
    resource_version: u64,
    include: IncludeObject,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": column_definitions(def),
        "rows": objects.iter().map(|o| row(def, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_fields_indexes_and_filters() {
        let obj = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"}, {"type": "Migratable", "status": "False"}
        ]}, "spec": {"disks": [{"name": "root"}, {"name": "data"}]}});
        assert_eq!(evaluate(&obj, ".status.phase"), vec![&json!("Running")]);
        assert_eq!(
            evaluate(&obj, ".status.conditions[?(@.type==\"Ready\")].status"),
            vec![&json!("True")]
        );
        assert_eq!(
            evaluate(&obj, "{.spec.disks[1].name}"),
            vec![&json!("data")]
        );
        assert_eq!(evaluate(&obj, ".spec.disks[*].name").len(), 2);
        assert!(evaluate(&obj, ".status.nodeName").is_empty());
    }

    #[test]
    fn node_status_reads_like_kubectl() {
        let node = json!({"spec": {"unschedulable": true}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let ready = evaluate(&node, ".status.conditions[?(@.type==\"Ready\")].status");
        assert_eq!(node_status(&node, &ready), "Ready,SchedulingDisabled");
        assert_eq!(node_status(&json!({}), &[]), "Unknown");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(130), "2m10s");
        assert_eq!(human_duration(3600 * 5), "5h");
        assert_eq!(human_duration(86_400 * 3), "3d");
    }

    #[test]
    fn accept_header_detection() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
