//! The ValidatingAdmissionPolicies stored in the server, applied to a write
//! ([`crate::admission_policy`] evaluates them). Policies and bindings are
//! read before the store is locked for the write, and checked on the object
//! as it would be stored (`UPDATE`), as sent (`CREATE`), or as it was
//! (`DELETE`). A denial is `422 Invalid` with the policy's message, as
//! kube-apiserver answers by default. Writes the server makes itself
//! (no requester) are not checked.

use serde_json::{json, Value};

use super::error::ApiError;
use super::request::Target;
use super::state::ServerState;
use crate::admission_policy::{admit, AdmissionRequest};
use crate::rbac::UserInfo;
use crate::store::ResourceId;

const GROUP: &str = "admissionregistration.k8s.io";

/// The policies and bindings in force for one write.
pub(crate) struct Policies {
    policies: Vec<Value>,
    bindings: Vec<Value>,
}

impl Policies {
    /// What the store holds now.
    pub(crate) fn load(state: &ServerState) -> Policies {
        let all = |plural: &str| state.store.list(&ResourceId::new(GROUP, plural), None).0;
        Policies {
            policies: all("validatingadmissionpolicies"),
            bindings: all("validatingadmissionpolicybindings"),
        }
    }

    /// Checks `operation` on `target` (`object` after it, `old` before it).
    pub(crate) fn check(
        &self,
        target: &Target,
        operation: &str,
        object: Option<&Value>,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        if self.bindings.is_empty() {
            return Ok(());
        }
        let Some(user) = UserInfo::from_token(&target.user) else {
            return Ok(());
        };
        let meta = |field: &str| {
            object
                .or(old)
                .and_then(|o| o["metadata"][field].as_str())
                .unwrap_or("")
                .to_string()
        };
        let name = target.name.clone().unwrap_or_else(|| meta("name"));
        let namespace = target
            .namespace
            .clone()
            .unwrap_or_else(|| meta("namespace"));
        let def = &target.def;
        let request = AdmissionRequest {
            operation,
            group: &def.group,
            version: &def.version,
            resource: &def.plural,
            subresource: target.subresource.as_deref().unwrap_or(""),
            namespace: &namespace,
            name: &name,
            user_info: json!({"username": user.name, "groups": user.groups, "extra": user.extra}),
            object,
            old_object: old,
        };
        admit(&self.policies, &self.bindings, &request)
            .map_err(|message| ApiError::new(422, "Invalid", message))
    }
}
