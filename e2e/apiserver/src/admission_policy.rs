//! ValidatingAdmissionPolicy: the policies and their bindings stored in the
//! server, applied to every write as kube-apiserver's admission plugin does.
//!
//! A policy applies to a request when one of its `matchConstraints.
//! resourceRules` matches the operation, group, version and resource (with
//! its subresource, `*` and `*/sub` allowed), its binding's `matchResources`
//! (if any) match too, and every `matchConditions` expression is true. Its
//! `variables` are evaluated in order into `variables`, then each of its
//! `validations` must be true; the first that is not denies the request with
//! its `message` (or `"failed expression: <expression>"`), when the binding's
//! `validationActions` include `Deny`. An expression that cannot be compiled
//! or evaluated denies under `failurePolicy: Fail` (the default) and is
//! skipped under `Ignore`.
//!
//! CEL sees `object` and `oldObject` (null when absent: a create has no old
//! object, a delete no new one), and `request` with `operation`,
//! `userInfo` (`username`, `groups`, `extra`), `resource` (`group`,
//! `version`, `resource`), `subResource`, `name` and `namespace`.
//!
//! Not supported (refused nowhere, simply absent): `paramKind` and params,
//! namespace and object selectors, `auditAnnotations`, type checking.

use serde_json::{json, Value};

/// What admission knows about a write.
#[derive(Clone, Debug)]
pub struct AdmissionRequest<'a> {
    /// `CREATE`, `UPDATE` or `DELETE`.
    pub operation: &'a str,
    /// API group (empty for core).
    pub group: &'a str,
    /// API version.
    pub version: &'a str,
    /// Resource (plural).
    pub resource: &'a str,
    /// Subresource, or empty.
    pub subresource: &'a str,
    /// Namespace, or empty.
    pub namespace: &'a str,
    /// Object name.
    pub name: &'a str,
    /// `{"username", "groups", "extra"}` of the requester.
    pub user_info: Value,
    /// The object after the write (none for a delete).
    pub object: Option<&'a Value>,
    /// The object before the write (none for a create).
    pub old_object: Option<&'a Value>,
}

fn strings(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

/// Whether one `resourceRules` entry matches the request.
fn rule_matches(rule: &Value, req: &AdmissionRequest<'_>) -> bool {
    let any = |field: &str, want: &str| strings(&rule[field]).any(|s| s == "*" || s == want);
    let combined = if req.subresource.is_empty() {
        req.resource.to_string()
    } else {
        format!("{}/{}", req.resource, req.subresource)
    };
    let resource_ok = strings(&rule["resources"]).any(|r| {
        r == combined
            || (r == "*" && req.subresource.is_empty())
            || r == "*/*"
            || (!req.subresource.is_empty() && r == format!("*/{}", req.subresource))
            || (!req.subresource.is_empty() && r == format!("{}/*", req.resource))
    });
    any("operations", req.operation)
        && any("apiGroups", req.group)
        && any("apiVersions", req.version)
        && resource_ok
}

/// Whether a `matchResources`/`matchConstraints` block matches the request
/// (no `resourceRules`: everything).
fn resources_match(block: &Value, req: &AdmissionRequest<'_>) -> bool {
    match block["resourceRules"].as_array() {
        None => true,
        Some(rules) => {
            rules.iter().any(|r| rule_matches(r, req))
                && !block["excludeResourceRules"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| rule_matches(r, req))
        }
    }
}

/// Evaluates one CEL expression that must give a bool.
fn eval(expression: &str, vars: &Value) -> Result<bool, String> {
    match eval_value(expression, vars)? {
        Value::Bool(b) => Ok(b),
        other => Err(format!("{expression:?} gave {other}, not a bool")),
    }
}

/// Evaluates a CEL expression with the request's variables, to JSON.
fn eval_value(expression: &str, vars: &Value) -> Result<Value, String> {
    let program =
        cel::Program::compile(expression).map_err(|e| format!("compile {expression:?}: {e}"))?;
    let mut context = cel::Context::default();
    for name in ["object", "oldObject", "request", "variables"] {
        let value = cel::to_value(&vars[name]).map_err(|e| format!("{name}: {e}"))?;
        context.add_variable_from_value(name, value);
    }
    let value = program
        .execute(&context)
        .map_err(|e| format!("evaluate {expression:?}: {e}"))?;
    Ok(to_json(&value))
}

fn to_json(value: &cel::Value) -> Value {
    match value {
        cel::Value::List(items) => Value::Array(items.iter().map(to_json).collect()),
        cel::Value::Map(map) => Value::Object(
            map.map
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        cel::objects::Key::String(s) => s.to_string(),
                        other => format!("{other:?}"),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        cel::Value::Int(i) => json!(i),
        cel::Value::UInt(u) => json!(u),
        cel::Value::Float(f) => json!(f),
        cel::Value::String(s) => json!(s.as_str()),
        cel::Value::Bool(b) => json!(b),
        _ => Value::Null,
    }
}

/// Applies one policy through one binding; `Err` with the denial message.
fn apply(policy: &Value, binding: &Value, req: &AdmissionRequest<'_>) -> Result<(), String> {
    let spec = &policy["spec"];
    if !resources_match(&spec["matchConstraints"], req)
        || !resources_match(&binding["spec"]["matchResources"], req)
    {
        return Ok(());
    }
    let fail_closed = spec["failurePolicy"].as_str() != Some("Ignore");
    let policy_name = policy["metadata"]["name"].as_str().unwrap_or("");
    let binding_name = binding["metadata"]["name"].as_str().unwrap_or("");
    let denied = |message: String| {
        Err(format!(
            "ValidatingAdmissionPolicy '{policy_name}' with binding '{binding_name}' denied request: {message}"
        ))
    };
    let mut vars = json!({
        "object": req.object.cloned().unwrap_or(Value::Null),
        "oldObject": req.old_object.cloned().unwrap_or(Value::Null),
        "request": {
            "operation": req.operation,
            "userInfo": req.user_info,
            "resource": {"group": req.group, "version": req.version, "resource": req.resource},
            "subResource": req.subresource,
            "name": req.name,
            "namespace": req.namespace,
        },
        "variables": {},
    });
    for condition in spec["matchConditions"].as_array().into_iter().flatten() {
        let expression = condition["expression"].as_str().unwrap_or("false");
        match eval(expression, &vars) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) if fail_closed => return denied(e),
            Err(_) => return Ok(()),
        }
    }
    for variable in spec["variables"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().unwrap_or("");
        let expression = variable["expression"].as_str().unwrap_or("null");
        match eval_value(expression, &vars) {
            Ok(value) => vars["variables"][name] = value,
            Err(e) if fail_closed => return denied(e),
            Err(_) => return Ok(()),
        }
    }
    for validation in spec["validations"].as_array().into_iter().flatten() {
        let expression = validation["expression"].as_str().unwrap_or("false");
        match eval(expression, &vars) {
            Ok(true) => {}
            Ok(false) => {
                let message = validation["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("failed expression: {expression}"));
                return denied(message);
            }
            Err(e) if fail_closed => return denied(e),
            Err(_) => {}
        }
    }
    Ok(())
}

/// Checks a write against every bound policy; `Err` with the first denial.
pub fn admit(
    policies: &[Value],
    bindings: &[Value],
    req: &AdmissionRequest<'_>,
) -> Result<(), String> {
    for binding in bindings {
        let denies = strings(&binding["spec"]["validationActions"]).any(|a| a == "Deny");
        let name = binding["spec"]["policyName"].as_str().unwrap_or("");
        let Some(policy) = policies
            .iter()
            .find(|p| p["metadata"]["name"].as_str() == Some(name))
        else {
            continue;
        };
        if denies {
            apply(policy, binding, req)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the chart's: a node's identity may patch only its own Node.
    fn policy() -> Value {
        json!({
            "metadata": {"name": "own-node"},
            "spec": {
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["UPDATE"], "resources": ["nodes", "nodes/status"],
                }]},
                "matchConditions": [{"name": "agent",
                    "expression": "request.userInfo.username == 'agent'"}],
                "variables": [{"name": "node", "expression":
                    "'node-name' in request.userInfo.extra ? request.userInfo.extra['node-name'][0] : ''"}],
                "validations": [
                    {"expression": "variables.node != ''", "message": "no node name"},
                    {"expression": "object.metadata.name == variables.node"},
                ],
            }
        })
    }

    fn binding(actions: &[&str]) -> Value {
        json!({"metadata": {"name": "own-node-binding"},
               "spec": {"policyName": "own-node", "validationActions": actions}})
    }

    fn request<'a>(user: &str, node: Option<&str>, object: &'a Value) -> AdmissionRequest<'a> {
        let extra = match node {
            Some(n) => json!({"node-name": [n]}),
            None => json!({}),
        };
        AdmissionRequest {
            operation: "UPDATE",
            group: "",
            version: "v1",
            resource: "nodes",
            subresource: "",
            namespace: "",
            name: object["metadata"]["name"].as_str().unwrap(),
            user_info: json!({"username": user, "groups": [], "extra": extra}),
            object: Some(object),
            old_object: Some(object),
        }
    }

    #[test]
    fn a_node_identity_writes_its_own_node_only() {
        let (p, b) = ([policy()], [binding(&["Deny"])]);
        let a = json!({"metadata": {"name": "node-a"}});
        let other = json!({"metadata": {"name": "node-b"}});
        assert_eq!(admit(&p, &b, &request("agent", Some("node-a"), &a)), Ok(()));
        let refused = admit(&p, &b, &request("agent", Some("node-a"), &other)).unwrap_err();
        assert!(
            refused.contains("'own-node' with binding 'own-node-binding' denied request: failed expression: object.metadata.name == variables.node"),
            "{refused}"
        );
        let anonymous = admit(&p, &b, &request("agent", None, &a)).unwrap_err();
        assert!(anonymous.ends_with("no node name"), "{anonymous}");
        // Someone else: the match condition leaves them alone.
        assert_eq!(admit(&p, &b, &request("admin", None, &other)), Ok(()));
        // A binding that only warns or audits denies nothing.
        let warn = [binding(&["Warn"])];
        assert_eq!(
            admit(&p, &warn, &request("agent", Some("node-a"), &other)),
            Ok(())
        );
    }

    #[test]
    fn rules_match_operations_and_subresources() {
        let object = json!({"metadata": {"name": "n"}});
        let mut req = request("agent", Some("n"), &object);
        let rule = json!({"apiGroups": [""], "apiVersions": ["*"], "operations": ["UPDATE"],
                          "resources": ["nodes"]});
        assert!(rule_matches(&rule, &req));
        req.subresource = "status";
        assert!(!rule_matches(&rule, &req));
        let sub = json!({"apiGroups": [""], "apiVersions": ["*"], "operations": ["*"],
                         "resources": ["nodes/*"]});
        assert!(rule_matches(&sub, &req));
        req.subresource = "";
        assert!(!rule_matches(&sub, &req));
        req.operation = "DELETE";
        assert!(!rule_matches(&rule, &req));
    }

    #[test]
    fn a_broken_expression_denies_unless_the_policy_ignores_failures() {
        let mut p = policy();
        p["spec"]["validations"] = json!([{"expression": "object.nope.deeper == 1"}]);
        let b = [binding(&["Deny"])];
        let a = json!({"metadata": {"name": "node-a"}});
        assert!(admit(&[p.clone()], &b, &request("agent", Some("node-a"), &a)).is_err());
        p["spec"]["failurePolicy"] = json!("Ignore");
        assert_eq!(
            admit(&[p], &b, &request("agent", Some("node-a"), &a)),
            Ok(())
        );
    }
}
