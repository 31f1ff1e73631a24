//! `certificates.k8s.io/v1` CertificateSigningRequests, as kube-apiserver
//! treats them: the requester's identity is stamped into the spec on
//! create (the requester cannot choose it), the spec never changes after,
//! `/approval` writes only the Approved/Denied conditions, and `/status`
//! writes the certificate and the other conditions.
//!
//! Simplifications versus a real API server:
//! - no signer is built in (`kubernetes.io/*` requests wait forever, as with
//!   the controller manager stopped); an external signer such as Godwit's
//!   operator approves and signs through the subresources;
//! - the approver's `approve` and the signer's `sign` permission on
//!   `signers` are not enforced (no request to this server is authorized),
//!   but each write to `/approval` or `/status` is also logged as that check
//!   ([`signer_check`]), so the request log shows them to RBAC tests;
//! - the PKCS#10 request is not parsed or checked against `usages`.

use serde_json::{json, Value};

use crate::audit::AuditRecord;
use crate::rbac::UserInfo;

/// The group of CertificateSigningRequests.
pub const GROUP: &str = "certificates.k8s.io";
/// Their plural resource name.
pub const PLURAL: &str = "certificatesigningrequests";

/// Whether a request's group and plural are CertificateSigningRequests.
pub fn is_csr(group: &str, plural: &str) -> bool {
    group == GROUP && plural == PLURAL
}

/// The conditions only `/approval` writes.
fn is_approval(condition: &Value) -> bool {
    matches!(condition["type"].as_str(), Some("Approved" | "Denied"))
}

/// On create: the requester's name, uid, groups and extra go into the spec
/// (whatever the body said), and there is no status yet.
pub fn stamp_requester(object: &mut Value, token: &str) {
    let user = UserInfo::from_token(token);
    let Some(map) = object.as_object_mut() else {
        return;
    };
    map.remove("status");
    let spec = map.entry("spec").or_insert_with(|| json!({}));
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    spec.remove("uid");
    match user {
        Some(user) => {
            spec.insert("username".into(), Value::String(user.name));
            spec.insert("groups".into(), json!(user.groups));
            if user.extra.is_empty() {
                spec.remove("extra");
            } else {
                spec.insert("extra".into(), json!(user.extra));
            }
        }
        None => {
            spec.insert("username".into(), json!("system:anonymous"));
            spec.insert("groups".into(), json!(["system:unauthenticated"]));
            spec.remove("extra");
        }
    }
}

/// The next object of a write to `subresource` (none: the main resource,
/// whose spec cannot change), from the stored `old` and the `desired` one.
pub fn merge_write(old: &Value, desired: Value, subresource: Option<&str>) -> Value {
    let mut next = desired;
    match subresource {
        None => next["spec"] = old["spec"].clone(),
        Some("approval") => {
            let mut status = old.get("status").cloned().unwrap_or_else(|| json!({}));
            let others = conditions(old).into_iter().filter(|c| !is_approval(c));
            let approvals = conditions(&next).into_iter().filter(is_approval);
            status["conditions"] = Value::Array(approvals.chain(others).collect());
            next["status"] = status;
        }
        Some(_) => {
            let mut status = next.get("status").cloned().unwrap_or_else(|| json!({}));
            let approvals = conditions(old).into_iter().filter(is_approval);
            let others = conditions(&next).into_iter().filter(|c| !is_approval(c));
            status["conditions"] = Value::Array(approvals.chain(others).collect());
            next["status"] = status;
        }
    }
    if let Some(status) = next.get_mut("status").and_then(Value::as_object_mut) {
        if status["conditions"].as_array().is_some_and(Vec::is_empty) {
            status.remove("conditions");
        }
    }
    next
}

fn conditions(object: &Value) -> Vec<Value> {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The permission kube-apiserver checks besides the subresource write:
/// `approve` (for `/approval`) or `sign` (for `/status`) on the `signers`
/// resource named by the request's `signerName`. `None` for other writes.
pub fn signer_check(record: &AuditRecord, signer: &str) -> Option<AuditRecord> {
    let verb = match record.subresource.as_str() {
        "approval" => "approve",
        "status" => "sign",
        _ => return None,
    };
    Some(AuditRecord {
        verb: verb.into(),
        api_group: GROUP.into(),
        resource: "signers".into(),
        subresource: String::new(),
        namespace: String::new(),
        name: signer.to_string(),
        path: format!("{} (signer check)", record.path),
        ..record.clone()
    })
}

/// `spec.signerName` of a stored object.
pub fn signer_name(object: &Value) -> &str {
    object
        .pointer("/spec/signerName")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// The condition column of `kubectl get csr`: `Approved,Issued`,
/// `Denied`, `Pending`.
pub fn condition_text(object: &Value) -> String {
    let mut parts: Vec<String> = conditions(object)
        .iter()
        .filter(|c| c["status"].as_str() != Some("False"))
        .filter_map(|c| c["type"].as_str().map(str::to_string))
        .collect();
    if object
        .pointer("/status/certificate")
        .and_then(Value::as_str)
        .is_some_and(|c| !c.is_empty())
    {
        parts.push("Issued".into());
    }
    if parts.is_empty() {
        "Pending".into()
    } else {
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> Value {
        json!({"spec": {"request": "UkVR", "signerName": "godwit.dev/migration",
            "username": "root", "groups": ["system:masters"]}})
    }

    #[test]
    fn the_requester_is_the_token_not_the_body() {
        let mut object = csr();
        stamp_requester(
            &mut object,
            "system:serviceaccount:godwit-system:godwit-node@node-0",
        );
        assert_eq!(
            object["spec"]["username"],
            "system:serviceaccount:godwit-system:godwit-node"
        );
        assert!(!object["spec"]["groups"]
            .as_array()
            .unwrap()
            .contains(&json!("system:masters")));
        assert_eq!(
            object["spec"]["extra"]["authentication.kubernetes.io/node-name"],
            json!(["node-0"])
        );
        let mut anonymous = csr();
        stamp_requester(&mut anonymous, "");
        assert_eq!(anonymous["spec"]["username"], "system:anonymous");
    }

    #[test]
    fn approval_and_status_write_their_own_parts() {
        let old = json!({"spec": {"signerName": "a"}, "status": {}});
        // The main resource cannot change the spec.
        let next = merge_write(&old, json!({"spec": {"signerName": "b"}}), None);
        assert_eq!(next["spec"]["signerName"], "a");
        // /approval writes the decision, not a certificate.
        let approved = merge_write(
            &old,
            json!({"spec": {}, "status": {"certificate": "Q0VSVA==",
                "conditions": [{"type": "Approved", "status": "True"}]}}),
            Some("approval"),
        );
        assert!(approved["status"].get("certificate").is_none());
        assert_eq!(condition_text(&approved), "Approved");
        // /status writes the certificate and keeps the decision.
        let issued = merge_write(
            &approved,
            json!({"status": {"certificate": "Q0VSVA==", "conditions": []}}),
            Some("status"),
        );
        assert_eq!(condition_text(&issued), "Approved,Issued");
        assert_eq!(condition_text(&old), "Pending");
    }
}
