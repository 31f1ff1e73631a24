//! Structural OpenAPI v3 schemas of CRDs: pruning, defaulting and validation
//! of custom resources, with the field paths and wording of a real API
//! server (`spec.cpu: Invalid value: 0: spec.cpu in body should be greater
//! than or equal to 1`).
//!
//! Supported: `type`, `nullable`, `properties`, `additionalProperties`,
//! `items`, `required`, `enum`, `minimum`/`maximum` (and the exclusive
//! flags), `minLength`/`maxLength`, `pattern`, `minItems`/`maxItems`,
//! `minProperties`/`maxProperties`, `allOf`/`anyOf`/`oneOf`/`not`, `default`,
//! `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`,
//! `x-kubernetes-embedded-resource`, `x-kubernetes-list-type: set|map`
//! duplicates.
//!
//! CEL (`x-kubernetes-validations`) rules, transition rules included, are
//! evaluated with kube's CEL validator ([`validate_cel`]) once the structural
//! checks pass; rules it cannot compile are skipped. `format` is not checked.

use std::collections::HashSet;

use regex::Regex;
use serde_json::{Map, Value};

/// One rejected field, as a `StatusCause` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Field path, e.g. `spec.cpu`.
    pub field: String,
    /// Cause reason, e.g. `FieldValueInvalid`.
    pub reason: &'static str,
    /// Full message, `<field>: <detail>`.
    pub message: String,
}

impl FieldError {
    fn new(field: &str, reason: &'static str, detail: String) -> Self {
        Self {
            field: field.to_string(),
            reason,
            message: format!("{field}: {detail}"),
        }
    }

    fn invalid(field: &str, value: &Value, detail: &str) -> Self {
        Self::new(
            field,
            "FieldValueInvalid",
            format!("Invalid value: {}: {detail}", go_value(value)),
        )
    }
}

/// How the value is shown after `Invalid value:`, as the Go server prints it.
fn go_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "\"object\"".to_string(),
        Value::Array(_) => "\"array\"".to_string(),
        Value::Null => "\"null\"".to_string(),
        other => other.to_string(),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn flag(schema: &Value, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Removes fields the schema does not declare and fills in defaults.
///
/// Returns the paths of the removed fields, so strict field validation can
/// refuse them instead.
pub fn prune_and_default(schema: &Value, object: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    if let (Some(properties), Some(fields)) = (
        schema.get("properties").and_then(Value::as_object),
        object.as_object_mut(),
    ) {
        for (name, value) in fields.iter_mut() {
            if matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if let Some(sub) = properties.get(name) {
                prune_value(sub, value, name, &mut unknown);
            }
        }
        let keep: Vec<String> = fields
            .keys()
            .filter(|name| {
                properties.contains_key(*name)
                    || matches!(name.as_str(), "apiVersion" | "kind" | "metadata")
            })
            .cloned()
            .collect();
        if !flag(schema, "x-kubernetes-preserve-unknown-fields") {
            fields.retain(|name, _| {
                let known = keep.contains(name);
                if !known {
                    unknown.push(name.clone());
                }
                known
            });
        }
        apply_defaults(properties, fields);
    }
    unknown
}

fn apply_defaults(properties: &Map<String, Value>, fields: &mut Map<String, Value>) {
    for (name, sub) in properties {
        if !fields.contains_key(name) {
            if let Some(default) = sub.get("default") {
                fields.insert(name.clone(), default.clone());
            }
        }
    }
}

fn prune_value(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            if flag(schema, "x-kubernetes-embedded-resource") {
                // apiVersion, kind and metadata of an embedded object are kept.
            }
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            let embedded = flag(schema, "x-kubernetes-embedded-resource");
            let mut removed = Vec::new();
            for (name, field) in fields.iter_mut() {
                let sub_path = join(path, name);
                if let Some(sub) = properties.and_then(|p| p.get(name)) {
                    prune_value(sub, field, &sub_path, unknown);
                } else if let Some(sub) = additional.filter(|a| a.is_object()) {
                    prune_value(sub, field, &sub_path, unknown);
                } else if preserve
                    || additional == Some(&Value::Bool(true))
                    || (embedded && matches!(name.as_str(), "apiVersion" | "kind" | "metadata"))
                {
                } else if properties.is_some()
                    || additional.is_some()
                    || schema.get("type").is_some()
                {
                    removed.push(name.clone());
                    unknown.push(sub_path);
                }
            }
            fields.retain(|name, _| !removed.contains(name));
            if let Some(properties) = properties {
                apply_defaults(properties, fields);
            }
        }
        Value::Array(items) => {
            if let Some(sub) = schema.get("items") {
                for (index, item) in items.iter_mut().enumerate() {
                    prune_value(sub, item, &format!("{path}[{index}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

/// Validates an object against the schema; `old` is the stored object on
/// update (for transition rules).
pub fn validate(schema: &Value, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return errors;
    };
    for (name, sub) in properties {
        if matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        if let Some(value) = object.get(name) {
            let old_value = old.and_then(|o| o.get(name));
            validate_value(sub, value, old_value, name, &mut errors);
        }
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for field in required.iter().filter_map(Value::as_str) {
            if object.get(field).is_none() {
                errors.push(FieldError::new(
                    field,
                    "FieldValueRequired",
                    "Required value".into(),
                ));
            }
        }
    }
    errors
}

fn validate_value(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if value.is_null() {
        if !flag(schema, "nullable") && schema.get("type").is_some() {
            let want = schema["type"].as_str().unwrap_or("object");
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body must be of type {want}: \"null\""),
            ));
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !matches!(type_name(value), "integer" | "string") {
            errors.push(FieldError::invalid(
                path,
                value,
                &format!(
                    "{path} in body must be of type integer,string: {:?}",
                    type_name(value)
                ),
            ));
            return;
        }
    } else if let Some(want) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(value);
        let ok = actual == want || (want == "number" && actual == "integer");
        if !ok {
            errors.push(FieldError::invalid(
                path,
                &Value::String(actual.to_string()),
                &format!("{path} in body must be of type {want}: {actual:?}"),
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(|v| v.to_string()).collect();
            errors.push(FieldError::new(
                path,
                "FieldValueNotSupported",
                format!(
                    "Unsupported value: {}: supported values: {}",
                    value,
                    list.join(", ")
                ),
            ));
        }
    }
    match value {
        Value::Number(n) => validate_number(schema, value, n.as_f64().unwrap_or(0.0), path, errors),
        Value::String(s) => validate_string(schema, value, s, path, errors),
        Value::Array(items) => validate_array(schema, items, path, errors),
        Value::Object(fields) => validate_object(schema, fields, old, path, errors),
        _ => {}
    }
    validate_combinators(schema, value, old, path, errors);
}

fn number_text(schema: &Value, key: &str) -> String {
    schema.get(key).map(|v| v.to_string()).unwrap_or_default()
}

fn validate_number(
    schema: &Value,
    value: &Value,
    n: f64,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        if flag(schema, "exclusiveMinimum") && n <= min {
            let text = number_text(schema, "minimum");
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should be greater than {text}"),
            ));
        } else if n < min {
            let text = number_text(schema, "minimum");
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should be greater than or equal to {text}"),
            ));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        if flag(schema, "exclusiveMaximum") && n >= max {
            let text = number_text(schema, "maximum");
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should be less than {text}"),
            ));
        } else if n > max {
            let text = number_text(schema, "maximum");
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should be less than or equal to {text}"),
            ));
        }
    }
    if let Some(multiple) = schema.get("multipleOf").and_then(Value::as_f64) {
        if multiple > 0.0 && (n / multiple).fract() != 0.0 {
            let text = number_text(schema, "multipleOf");
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should be a multiple of {text}"),
            ));
        }
    }
}

fn validate_string(
    schema: &Value,
    value: &Value,
    s: &str,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let chars = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
        if chars < min {
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should be at least {min} chars long"),
            ));
        }
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
        if chars > max {
            errors.push(FieldError::new(
                path,
                "FieldValueTooLong",
                format!("Too long: may not be more than {max} bytes"),
            ));
        }
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match Regex::new(pattern) {
            Ok(re) if !re.is_match(s) => errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should match '{pattern}'"),
            )),
            _ => {}
        }
    }
}

fn validate_array(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
    let count = items.len() as u64;
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
        if count > max {
            errors.push(FieldError::new(
                path,
                "FieldValueTooMany",
                format!("Too many: {count}: must have at most {max} items"),
            ));
        }
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
        if count < min {
            errors.push(FieldError::invalid(
                path,
                &Value::from(count),
                &format!("{path} in body should have at least {min} items"),
            ));
        }
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            let mut seen = HashSet::new();
            for (index, item) in items.iter().enumerate() {
                if !seen.insert(item.to_string()) {
                    errors.push(FieldError::new(
                        &format!("{path}[{index}]"),
                        "FieldValueDuplicate",
                        format!("Duplicate value: {item}"),
                    ));
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|keys| keys.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = HashSet::new();
            for (index, item) in items.iter().enumerate() {
                // Go's `%#v` of the key fields, as kube-apiserver prints them:
                // `map[string]interface {}{"name":"data"}`, keys sorted.
                let mut key: Vec<String> = keys
                    .iter()
                    .filter_map(|k| item.get(*k).map(|v| format!("{k:?}:{v}")))
                    .collect();
                key.sort();
                if !seen.insert(key.clone()) {
                    errors.push(FieldError::new(
                        &format!("{path}[{index}]"),
                        "FieldValueDuplicate",
                        format!(
                            "Duplicate value: map[string]interface {{}}{{{}}}",
                            key.join(", ")
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
    if let Some(sub) = schema.get("items") {
        for (index, item) in items.iter().enumerate() {
            validate_value(sub, item, None, &format!("{path}[{index}]"), errors);
        }
    }
}

fn validate_object(
    schema: &Value,
    fields: &Map<String, Value>,
    old: Option<&Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for field in required.iter().filter_map(Value::as_str) {
            if !fields.contains_key(field) {
                errors.push(FieldError::new(
                    &join(path, field),
                    "FieldValueRequired",
                    "Required value".into(),
                ));
            }
        }
    }
    let count = fields.len() as u64;
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64) {
        if count > max {
            errors.push(FieldError::new(
                path,
                "FieldValueTooMany",
                format!("Too many: {count}: must have at most {max} items"),
            ));
        }
    }
    if let Some(min) = schema.get("minProperties").and_then(Value::as_u64) {
        if count < min {
            errors.push(FieldError::invalid(
                path,
                &Value::from(count),
                &format!("{path} in body should have at least {min} properties"),
            ));
        }
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (name, value) in fields {
        let old_value = old.and_then(|o| o.get(name));
        if let Some(sub) = properties.and_then(|p| p.get(name)) {
            validate_value(sub, value, old_value, &join(path, name), errors);
        } else if let Some(sub) = additional {
            validate_value(sub, value, old_value, &format!("{path}[{name}]"), errors);
        }
    }
}

fn validate_combinators(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let check = |sub: &Value| {
        let mut found = Vec::new();
        validate_value(sub, value, old, path, &mut found);
        found
    };
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for sub in all {
            errors.extend(check(sub));
        }
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        if !any.is_empty() && !any.iter().any(|sub| check(sub).is_empty()) {
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body must match at least one schema in anyOf"),
            ));
        }
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let matching = one.iter().filter(|sub| check(sub).is_empty()).count();
        if !one.is_empty() && matching != 1 {
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body must match exactly one schema in oneOf"),
            ));
        }
    }
    if let Some(not) = schema.get("not") {
        if check(not).is_empty() {
            errors.push(FieldError::invalid(
                path,
                value,
                &format!("{path} in body should not match the schema in not"),
            ));
        }
    }
}

/// Evaluates the schema's `x-kubernetes-validations` CEL rules (with
/// `oldSelf` on update) through kube's CEL validator.
///
/// Rules the validator cannot compile or evaluate are skipped with a log
/// line (a real server would have refused such a CRD).
pub fn validate_cel(schema: &Value, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
    use kube::core::cel::{ErrorKind, Validator};

    let Err(failures) = Validator::new().validate(schema, object, old) else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    for failure in failures.into_vec() {
        match failure.kind {
            ErrorKind::ValidationFailure | ErrorKind::InvalidResult => {
                let path = failure.field_path.trim_start_matches('.');
                let value = value_at(object, path);
                let shown = Value::String(type_name(value.unwrap_or(&Value::Null)).to_string());
                let mut error = FieldError::invalid(path, &shown, &failure.message);
                if let Some(reason) = failure.reason.as_deref() {
                    error.reason = match reason {
                        "FieldValueForbidden" => "FieldValueForbidden",
                        "FieldValueRequired" => "FieldValueRequired",
                        "FieldValueDuplicate" => "FieldValueDuplicate",
                        _ => "FieldValueInvalid",
                    };
                }
                errors.push(error);
            }
            _ => {
                tracing::warn!(rule = %failure.rule, message = %failure.message, "CEL rule skipped")
            }
        }
    }
    errors
}

/// The value at a dotted path with `[index]` steps, e.g. `spec.disks[0]`.
fn value_at<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = object;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (field, indexes) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !field.is_empty() {
            current = current.get(field)?;
        }
        for index in indexes.split(['[', ']']).filter(|i| !i.is_empty()) {
            current = match index.parse::<usize>() {
                Ok(i) => current.get(i)?,
                Err(_) => current.get(index)?,
            };
        }
    }
    Some(current)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["cpu"],
                    "properties": {
                        "cpu": {"type": "integer", "minimum": 1, "maximum": 64},
                        "memory": {"x-kubernetes-int-or-string": true},
                        "runStrategy": {"type": "string", "enum": ["Always", "Halted"], "default": "Always"},
                        "name": {"type": "string", "pattern": "^[a-z]+$", "minLength": 2},
                        "disks": {"type": "array", "maxItems": 2, "items": {"type": "string"}},
                        "image": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "image is immutable"}]},
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    }
                },
                "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
            }
        })
    }

    fn messages(object: &Value, old: Option<&Value>) -> Vec<String> {
        let mut errors = validate(&schema(), object, old);
        if errors.is_empty() {
            errors = validate_cel(&schema(), object, old);
        }
        errors.into_iter().map(|e| e.message).collect()
    }

    #[test]
    fn minimum_is_worded_like_the_real_server() {
        assert_eq!(
            messages(&json!({"spec": {"cpu": 0}}), None),
            vec![
                "spec.cpu: Invalid value: 0: spec.cpu in body should be greater than or equal to 1"
            ]
        );
    }

    #[test]
    fn required_type_enum_pattern_and_length() {
        let found = messages(
            &json!({"spec": {"memory": true, "runStrategy": "Sometimes", "name": "A", "disks": ["a", "b", "c"]}}),
            None,
        );
        assert!(
            found.contains(&"spec.cpu: Required value".to_string()),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("spec.memory: Invalid value: ")),
            "{found:?}"
        );
        assert!(found.contains(&"spec.runStrategy: Unsupported value: \"Sometimes\": supported values: \"Always\", \"Halted\"".to_string()), "{found:?}");
        assert!(
            found.contains(
                &"spec.name: Invalid value: \"A\": spec.name in body should match '^[a-z]+$'"
                    .to_string()
            ),
            "{found:?}"
        );
        assert!(found.contains(&"spec.name: Invalid value: \"A\": spec.name in body should be at least 2 chars long".to_string()), "{found:?}");
        assert!(
            found.contains(&"spec.disks: Too many: 3: must have at most 2 items".to_string()),
            "{found:?}"
        );
    }

    #[test]
    fn type_mismatch_names_both_types() {
        assert_eq!(
            messages(&json!({"spec": {"cpu": "two"}}), None),
            vec!["spec.cpu: Invalid value: \"string\": spec.cpu in body must be of type integer: \"string\""]
        );
    }

    #[test]
    fn int_or_string_accepts_both() {
        assert!(messages(&json!({"spec": {"cpu": 1, "memory": "1Gi"}}), None).is_empty());
        assert!(messages(&json!({"spec": {"cpu": 1, "memory": 1024}}), None).is_empty());
    }

    #[test]
    fn immutability_rule_checks_updates_only() {
        let old = json!({"spec": {"cpu": 1, "image": "a"}});
        assert!(messages(&json!({"spec": {"cpu": 1, "image": "b"}}), None).is_empty());
        assert!(messages(&json!({"spec": {"cpu": 2, "image": "a"}}), Some(&old)).is_empty());
        assert_eq!(
            messages(&json!({"spec": {"cpu": 1, "image": "b"}}), Some(&old)),
            vec!["spec.image: Invalid value: \"string\": image is immutable"]
        );
    }

    #[test]
    fn pruning_drops_unknown_fields_keeps_preserved_and_defaults() {
        let mut object = json!({
            "apiVersion": "godwit.dev/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "x"},
            "spec": {"cpu": 1, "bogus": 1, "extra": {"anything": {"goes": true}}},
            "junk": true
        });
        let unknown = prune_and_default(&schema(), &mut object);
        assert_eq!(unknown, vec!["spec.bogus".to_string(), "junk".to_string()]);
        assert_eq!(object["spec"]["extra"]["anything"]["goes"], true);
        assert_eq!(object["spec"]["runStrategy"], "Always");
        assert!(object.get("junk").is_none());
        assert_eq!(object["metadata"]["name"], "x");
    }
}
