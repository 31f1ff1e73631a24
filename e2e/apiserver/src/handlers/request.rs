//! What a request asks for: decoded query parameters, the resource path it
//! targets, its label and field selectors, and its body as an object.

use std::collections::HashMap;

use serde_json::Value;

use super::error::{source_text, ApiError};
use crate::crd::ResourceDef;
use crate::patch;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::ObjectKey;

/// Decoded query parameters.
#[derive(Default)]
pub(crate) struct Query(HashMap<String, String>);

impl Query {
    pub(crate) fn parse(raw: Option<&str>) -> Self {
        let mut map = HashMap::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            map.insert(percent_decode(key), percent_decode(value));
        }
        Self(map)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub(crate) fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    pub(crate) fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request for a resource path.
pub(crate) struct Target {
    pub(crate) def: ResourceDef,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) subresource: Option<String>,
    /// Who asks (the bearer token or impersonated user).
    pub(crate) user: String,
}

pub(crate) fn key_of(target: &Target, name: &str) -> ObjectKey {
    ObjectKey::new(target.namespace.as_deref().unwrap_or(""), name)
}

pub(crate) fn selectors(query: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("unable to parse labelSelector: {e}")))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("unable to parse fieldSelector: {e}")))?;
    Ok((labels, fields))
}

pub(crate) fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let value = patch::parse_body(body)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {}", source_text(&e))))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body is not an object"));
    }
    check_metadata(&value)?;
    Ok(value)
}

/// An object's `metadata`, when present, is an object (as the API server's
/// decoding into ObjectMeta demands); everything after relies on it.
pub(crate) fn check_metadata(object: &Value) -> Result<(), ApiError> {
    match object.get("metadata") {
        None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err(ApiError::bad_request(
            "metadata: Invalid value: must be an object (ObjectMeta)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_of_selectors() {
        assert_eq!(
            percent_decode("app%3Dvm%2Ctier+in+%28a%29"),
            "app=vm,tier in (a)"
        );
        assert_eq!(percent_decode("100%"), "100%");
    }
}
