//! PATCH bodies: JSON merge patch, JSON patch, strategic merge patch and
//! server-side apply.
//!
//! Simplifications versus a real API server:
//! - strategic merge patch is applied as a JSON merge patch (lists are
//!   replaced, not merged by key; `$patch` directives are not understood);
//! - server-side apply is [`crate::apply`]'s (list-map merging and field
//!   ownership); [`apply`] here merges an apply body as a merge patch, for
//!   callers without a schema or field manager.

use serde_json::Value;

/// Errors applying a patch.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The Content-Type names no patch type this server knows.
    #[error("Unsupported patch type {0:?}")]
    UnsupportedType(String),
    /// The body is not valid JSON (or YAML for apply).
    #[error("Invalid patch body")]
    Body(#[source] serde_saphyr::Error),
    /// The body is not a JSON patch document.
    #[error("Invalid JSON patch")]
    JsonPatchDocument(#[source] serde_json::Error),
    /// A JSON patch operation failed (missing path, failed test, ...).
    #[error("JSON patch could not be applied")]
    JsonPatch(#[source] json_patch::PatchError),
}

/// The patch formats of the Kubernetes API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/json-patch+json` (RFC 6902).
    Json,
    /// `application/strategic-merge-patch+json`, applied as a merge patch.
    Strategic,
    /// `application/apply-patch+yaml`, server-side apply (simplified).
    Apply,
}

impl PatchKind {
    /// The patch kind named by a Content-Type header.
    pub fn from_content_type(content_type: &str) -> Result<Self, PatchError> {
        let media = content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Ok(PatchKind::Merge),
            "application/json-patch+json" => Ok(PatchKind::Json),
            "application/strategic-merge-patch+json" => Ok(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchKind::Apply),
            other => Err(PatchError::UnsupportedType(other.to_string())),
        }
    }
}

/// Parses a request body that is JSON or YAML (JSON is valid YAML).
pub fn parse_body(body: &[u8]) -> Result<Value, PatchError> {
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    serde_saphyr::from_slice(body).map_err(PatchError::Body)
}

/// Applies a patch body of the given kind to `target`.
pub fn apply(kind: PatchKind, target: &mut Value, body: &[u8]) -> Result<(), PatchError> {
    match kind {
        PatchKind::Json => {
            let mut ops: Vec<Value> =
                serde_json::from_slice(body).map_err(PatchError::JsonPatchDocument)?;
            // As in the Go server, `test` of a missing path against null passes
            // (kube-rs' finalizer helper relies on it).
            ops.retain(|op| {
                let null_test = op["op"] == "test" && op.get("value").is_none_or(Value::is_null);
                !(null_test && target.pointer(op["path"].as_str().unwrap_or("")).is_none())
            });
            let patch: json_patch::Patch =
                serde_json::from_value(Value::Array(ops)).map_err(PatchError::JsonPatchDocument)?;
            json_patch::patch(target, &patch).map_err(PatchError::JsonPatch)
        }
        PatchKind::Merge | PatchKind::Strategic | PatchKind::Apply => {
            let patch = parse_body(body)?;
            json_patch::merge(target, &patch);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_sets_and_removes() {
        let mut obj =
            json!({"spec": {"cpu": 1, "memory": "1Gi"}, "metadata": {"labels": {"a": "1"}}});
        apply(
            PatchKind::Merge,
            &mut obj,
            br#"{"spec": {"cpu": 2, "memory": null}, "metadata": {"labels": {"b": "2"}}}"#,
        )
        .unwrap();
        assert_eq!(
            obj,
            json!({"spec": {"cpu": 2}, "metadata": {"labels": {"a": "1", "b": "2"}}})
        );
    }

    #[test]
    fn json_patch_operations_and_failed_test() {
        let mut obj = json!({"spec": {"disks": ["a"]}});
        apply(
            PatchKind::Json,
            &mut obj,
            br#"[{"op": "add", "path": "/spec/disks/-", "value": "b"}, {"op": "replace", "path": "/spec/disks/0", "value": "c"}]"#,
        )
        .unwrap();
        assert_eq!(obj, json!({"spec": {"disks": ["c", "b"]}}));
        let err = apply(
            PatchKind::Json,
            &mut obj,
            br#"[{"op": "test", "path": "/spec/disks/0", "value": "zz"}]"#,
        );
        assert!(matches!(err, Err(PatchError::JsonPatch(_))));
    }

    #[test]
    fn json_patch_test_of_missing_path_against_null_passes() {
        let mut obj = json!({"metadata": {"name": "x"}});
        apply(
            PatchKind::Json,
            &mut obj,
            br#"[{"op": "test", "path": "/metadata/finalizers", "value": null}, {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}]"#,
        )
        .unwrap();
        assert_eq!(obj["metadata"]["finalizers"], json!(["f"]));
    }

    #[test]
    fn apply_patch_accepts_yaml() {
        let mut obj = json!({"spec": {"cpu": 1}});
        apply(PatchKind::Apply, &mut obj, b"spec:\n  memory: 2Gi\n").unwrap();
        assert_eq!(obj, json!({"spec": {"cpu": 1, "memory": "2Gi"}}));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchKind::Merge
        );
        assert!(PatchKind::from_content_type("text/plain").is_err());
    }
}
