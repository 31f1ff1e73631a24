//! Label and field selectors for list, watch and deletecollection.
//!
//! Label selectors support `=`, `==`, `!=`, `in`, `notin`, existence and
//! `!` non-existence. Field selectors support `=`, `==` and `!=` on any
//! dotted path into the object (`metadata.name`, `spec.nodeName`,
//! `involvedObject.uid`, ...); a missing field compares as the empty string.
//! A real API server only allows a fixed set of fields per kind; this one
//! allows any path.

use serde_json::Value;

/// Errors parsing a selector.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    /// A requirement could not be parsed.
    #[error("Unable to parse requirement: {0:?}")]
    Parse(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<(String, LabelOp)>,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(input: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for ch in input.chars() {
        match ch {
            '(' => {
                depth += 1;
                current.push(ch);
            }
            ')' => {
                depth = depth.saturating_sub(1);
                current.push(ch);
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut current)),
            _ => current.push(ch),
        }
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|part| part.trim().to_string())
        .filter(|part| !part.is_empty())
        .collect()
}

fn parse_set(text: &str, original: &str) -> Result<Vec<String>, SelectorError> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| SelectorError::Parse(original.to_string()))?;
    Ok(inner
        .split(',')
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
        .collect())
}

impl LabelSelector {
    /// Parses a selector such as `app=vm,tier in (a,b),!legacy`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for part in split_top_level(input) {
            let requirement = if let Some(key) = part.strip_prefix('!') {
                (key.trim().to_string(), LabelOp::DoesNotExist)
            } else if let Some((key, value)) = part.split_once("!=") {
                (key.trim().into(), LabelOp::NotEquals(value.trim().into()))
            } else if let Some((key, value)) = part.split_once("==") {
                (key.trim().into(), LabelOp::Equals(value.trim().into()))
            } else if let Some((key, value)) = part.split_once('=') {
                (key.trim().into(), LabelOp::Equals(value.trim().into()))
            } else if let Some((key, set)) = part.split_once(" notin ") {
                (key.trim().into(), LabelOp::NotIn(parse_set(set, &part)?))
            } else if let Some((key, set)) = part.split_once(" in ") {
                (key.trim().into(), LabelOp::In(parse_set(set, &part)?))
            } else if part.contains(['(', ')', ' ', '<', '>']) {
                return Err(SelectorError::Parse(part));
            } else {
                (part.clone(), LabelOp::Exists)
            };
            if requirement.0.is_empty() {
                return Err(SelectorError::Parse(part));
            }
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        self.requirements.iter().all(|(key, op)| {
            let value = labels
                .and_then(|labels| labels.get(key))
                .and_then(Value::as_str);
            match op {
                LabelOp::Equals(want) => value == Some(want.as_str()),
                LabelOp::NotEquals(want) => value != Some(want.as_str()),
                LabelOp::In(set) => value.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::NotIn(set) => value.is_none_or(|v| !set.iter().any(|s| s == v)),
                LabelOp::Exists => value.is_some(),
                LabelOp::DoesNotExist => value.is_none(),
            }
        })
    }
}

/// A parsed field selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<(String, bool, String)>,
}

impl FieldSelector {
    /// Parses a selector such as `metadata.name=x,spec.nodeName!=n1`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for part in split_top_level(input) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(SelectorError::Parse(part));
            };
            requirements.push((field.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(Self { requirements })
    }

    /// Whether the object's fields satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|(field, equal, want)| {
            let actual = field_value(object, field);
            (actual == *want) == *equal
        })
    }
}

/// The value of a dotted field path as the string a field selector compares.
fn field_value(object: &Value, field: &str) -> String {
    let mut current = object;
    for segment in field.split('.') {
        match current.get(segment) {
            Some(next) => current = next,
            None => return String::new(),
        }
    }
    match current {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "vm1", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn equality_and_inequality() {
        let sel = LabelSelector::parse("app=vm,tier!=db").unwrap();
        assert!(sel.matches(&obj(json!({"app": "vm", "tier": "web"}))));
        assert!(sel.matches(&obj(json!({"app": "vm"}))));
        assert!(!sel.matches(&obj(json!({"app": "vm", "tier": "db"}))));
        assert!(!sel.matches(&obj(json!({"app": "other"}))));
    }

    #[test]
    fn set_based_requirements() {
        let sel =
            LabelSelector::parse("env in (prod, staging),zone notin (a),gpu,!legacy").unwrap();
        assert!(sel.matches(&obj(json!({"env": "prod", "zone": "b", "gpu": ""}))));
        assert!(!sel.matches(&obj(json!({"env": "dev", "gpu": ""}))));
        assert!(!sel.matches(&obj(json!({"env": "prod", "zone": "a", "gpu": ""}))));
        assert!(!sel.matches(&obj(json!({"env": "prod"}))));
        assert!(!sel.matches(&obj(json!({"env": "prod", "gpu": "", "legacy": "1"}))));
    }

    #[test]
    fn empty_selector_matches_all_and_garbage_is_refused() {
        assert!(LabelSelector::parse("").unwrap().matches(&obj(json!({}))));
        assert!(LabelSelector::parse("a in b").is_err());
        assert!(FieldSelector::parse("metadata.name").is_err());
    }

    #[test]
    fn field_selectors_follow_paths() {
        let o = obj(json!({}));
        assert!(
            FieldSelector::parse("metadata.name=vm1,metadata.namespace==ns")
                .unwrap()
                .matches(&o)
        );
        assert!(FieldSelector::parse("spec.nodeName!=n2")
            .unwrap()
            .matches(&o));
        assert!(!FieldSelector::parse("spec.nodeName=n2")
            .unwrap()
            .matches(&o));
        assert!(FieldSelector::parse("status.phase=").unwrap().matches(&o));
    }
}
