//! The errors the handlers answer with: [`ApiError`], serialized as a
//! `v1 Status` with the reason, code and details a real API server gives
//! (kubectl and kube-rs read them to tell "not found" from "conflict").

use serde_json::{json, Value};

use http::Response;

use super::response::{json_response, Body};
use crate::crd::ResourceDef;
use crate::schema;

/// An error answered as a `v1 Status`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Value,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            details: Value::Null,
        }
    }

    pub(crate) fn with_details(mut self, def: &ResourceDef, name: &str) -> Self {
        self.details = json!({"name": name, "group": def.group, "kind": def.plural});
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into())
    }

    pub(crate) fn not_found(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", def.group_resource()),
        )
        .with_details(def, name)
    }

    pub(crate) fn already_exists(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", def.group_resource()),
        )
        .with_details(def, name)
    }

    pub(crate) fn conflict(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                def.group_resource()
            ),
        )
        .with_details(def, name)
    }

    pub(crate) fn invalid(def: &ResourceDef, name: &str, errors: &[schema::FieldError]) -> Self {
        let detail = if errors.len() == 1 {
            errors[0].message.clone()
        } else {
            let all: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
            format!("[{}]", all.join(", "))
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| {
                let detail = e
                    .message
                    .strip_prefix(&format!("{}: ", e.field))
                    .unwrap_or(&e.message);
                json!({"reason": e.reason, "message": detail, "field": e.field})
            })
            .collect();
        let mut error = Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {detail}", def.group_kind()),
        );
        error.details =
            json!({"name": name, "group": def.group, "kind": def.kind, "causes": causes});
        error
    }

    pub(crate) fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        });
        if !self.details.is_null() {
            status["details"] = self.details.clone();
        }
        status
    }

    pub(crate) fn response(&self) -> Response<Body> {
        json_response(self.code, &self.status())
    }
}

pub(crate) fn expired(rv: u64) -> ApiError {
    ApiError::new(410, "Expired", format!("too old resource version: {rv}"))
}

pub(crate) fn source_text(error: &dyn std::error::Error) -> String {
    match error.source() {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::resources_of_crd;

    #[test]
    fn invalid_status_names_the_field() {
        let def = resources_of_crd(
            &json!({"spec": {"group": "godwit.dev", "scope": "Namespaced",
            "names": {"kind": "VirtualMachine", "plural": "virtualmachines"},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true}]}}),
        )
        .remove(0);
        let errors = schema::validate(
            &json!({"properties": {"spec": {"type": "object", "properties": {"cpu": {"type": "integer", "minimum": 1}}}}}),
            &json!({"spec": {"cpu": 0}}),
            None,
        );
        let status = ApiError::invalid(&def, "x", &errors).status();
        assert_eq!(status["code"], 422);
        assert_eq!(
            status["message"],
            "VirtualMachine.godwit.dev \"x\" is invalid: spec.cpu: Invalid value: 0: spec.cpu in body should be greater than or equal to 1"
        );
        assert_eq!(status["details"]["causes"][0]["field"], "spec.cpu");
    }
}
