//! Delegated authentication and authorization, as kube-apiserver serves
//! them to other components: `TokenReview` (`authentication.k8s.io/v1`),
//! `SubjectAccessReview` and `SelfSubjectAccessReview`
//! (`authorization.k8s.io/v1`), decided by the RBAC rules stored in this
//! server (Roles, ClusterRoles, their bindings, and aggregated ClusterRoles).
//!
//! Simplifications versus a real API server:
//! - **Tokens are user names** (as everywhere in this server, see
//!   [`crate::audit`]): any non-empty bearer token authenticates as the user
//!   it names. `system:serviceaccount:<ns>:<name>` gets the service-account
//!   groups; every user gets `system:authenticated`. A token
//!   `<user>@<node>` stands for a token bound to a pod on `<node>`: the user
//!   is `<user>`, with the node in its extra
//!   (`authentication.kubernetes.io/node-name`), as Kubernetes gives
//!   pod-bound service-account tokens.
//! - Ordinary requests to this server are **not** authorized: the reviews
//!   answer what RBAC would allow, for the components that ask (Godwit's
//!   `/metrics`); the request log ([`crate::audit`]) checks the rest.
//! - No `system:masters` superuser, no default cluster roles besides
//!   discovery (non-resource `get` on `/api*`, `/apis*`, `/version`,
//!   `/healthz`, `/readyz`, `/livez` for every authenticated user, as
//!   `system:discovery` and `system:public-info-viewer` grant).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::store::{ResourceId, Store};

/// The user a request acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// User name (`system:serviceaccount:<ns>:<name>` for service accounts).
    pub name: String,
    /// Groups, including `system:authenticated`.
    pub groups: Vec<String>,
    /// Extra attributes (the node a pod-bound token belongs to).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The extra key of the node a pod-bound service-account token belongs to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

impl UserInfo {
    /// The user a bearer token stands for (`None` for an empty token).
    pub fn from_token(token: &str) -> Option<Self> {
        let token = token.trim();
        if token.is_empty() || token.contains(char::is_whitespace) {
            return None;
        }
        let mut extra = BTreeMap::new();
        let name = match token.rsplit_once('@') {
            Some((name, node)) if !name.is_empty() && !node.is_empty() => {
                extra.insert(NODE_NAME_EXTRA.to_string(), vec![node.to_string()]);
                name
            }
            _ => token,
        };
        let mut groups = Vec::new();
        if let Some(rest) = name.strip_prefix("system:serviceaccount:") {
            if let Some((ns, _)) = rest.split_once(':') {
                groups.push("system:serviceaccounts".to_string());
                groups.push(format!("system:serviceaccounts:{ns}"));
            }
        }
        groups.push("system:authenticated".to_string());
        Some(UserInfo {
            name: name.to_string(),
            groups,
            extra,
        })
    }
}

/// What is asked: a verb on a resource (possibly a subresource, possibly
/// one object) or on a non-resource URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attributes {
    /// A request on an API resource.
    Resource {
        /// Namespace, empty for cluster-scoped objects or all namespaces.
        namespace: String,
        /// API verb (`get`, `list`, `create`, ...).
        verb: String,
        /// API group, empty for the core group.
        group: String,
        /// Plural resource name.
        resource: String,
        /// Subresource, empty for none.
        subresource: String,
        /// Object name, empty for collections.
        name: String,
    },
    /// A request on a path outside the resource API (`/metrics`).
    NonResource {
        /// The URL path.
        path: String,
        /// The lower-case HTTP verb.
        verb: String,
    },
}

impl Attributes {
    /// `resource/subresource` as RBAC rules name it (`resource` alone
    /// without a subresource).
    pub fn full_resource(resource: &str, subresource: &str) -> String {
        if subresource.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}/{subresource}")
        }
    }

    /// From a review's `spec` (`resourceAttributes` or `nonResourceAttributes`).
    pub fn from_spec(spec: &Value) -> Option<Self> {
        let s = |v: &Value, key: &str| v[key].as_str().unwrap_or("").to_string();
        if let Some(r) = spec.get("resourceAttributes").filter(|r| r.is_object()) {
            return Some(Attributes::Resource {
                namespace: s(r, "namespace"),
                verb: s(r, "verb"),
                group: s(r, "group"),
                resource: s(r, "resource"),
                subresource: s(r, "subresource"),
                name: s(r, "name"),
            });
        }
        let n = spec
            .get("nonResourceAttributes")
            .filter(|n| n.is_object())?;
        Some(Attributes::NonResource {
            path: s(n, "path"),
            verb: s(n, "verb"),
        })
    }
}

/// Non-resource paths every authenticated user may `get`.
const PUBLIC_PATHS: [&str; 8] = [
    "/api", "/api/*", "/apis", "/apis/*", "/version", "/healthz", "/readyz", "/livez",
];

/// RBAC over a set of role and binding objects (as stored or as rendered).
pub struct Rbac {
    roles: Vec<Value>,
    cluster_roles: Vec<Value>,
    bindings: Vec<Value>,
    cluster_bindings: Vec<Value>,
}

impl Rbac {
    /// RBAC from the objects stored in `store`.
    pub fn from_store(store: &Store) -> Self {
        let all = |resource: &str| {
            store
                .list(
                    &ResourceId::new("rbac.authorization.k8s.io", resource),
                    None,
                )
                .0
        };
        Rbac {
            roles: all("roles"),
            cluster_roles: all("clusterroles"),
            bindings: all("rolebindings"),
            cluster_bindings: all("clusterrolebindings"),
        }
    }

    /// RBAC from manifests (e.g. a rendered Helm chart); other kinds are
    /// ignored.
    pub fn from_objects<'a>(objects: impl IntoIterator<Item = &'a Value>) -> Self {
        let mut rbac = Rbac {
            roles: Vec::new(),
            cluster_roles: Vec::new(),
            bindings: Vec::new(),
            cluster_bindings: Vec::new(),
        };
        for o in objects {
            let list = match o["kind"].as_str() {
                Some("Role") => &mut rbac.roles,
                Some("ClusterRole") => &mut rbac.cluster_roles,
                Some("RoleBinding") => &mut rbac.bindings,
                Some("ClusterRoleBinding") => &mut rbac.cluster_bindings,
                _ => continue,
            };
            list.push(o.clone());
        }
        rbac
    }

    /// Whether `user` may do what `attrs` say, and the binding that allows it.
    pub fn authorize(&self, user: &UserInfo, attrs: &Attributes) -> Result<String, String> {
        if let Attributes::NonResource { path, verb } = attrs {
            if verb == "get"
                && user.groups.iter().any(|g| g == "system:authenticated")
                && PUBLIC_PATHS.iter().any(|p| url_matches(p, path))
            {
                return Ok("discovery is public to authenticated users".into());
            }
        }
        for b in &self.cluster_bindings {
            if binds(b, "", user) && self.role_rules(b, "").iter().any(|r| allows(r, attrs)) {
                return Ok(format!(
                    "allowed by ClusterRoleBinding {:?}",
                    name_of(b).unwrap_or("")
                ));
            }
        }
        if let Attributes::Resource { namespace, .. } = attrs {
            for b in self
                .bindings
                .iter()
                .filter(|b| !namespace.is_empty() && namespace_of(b) == Some(namespace))
            {
                if binds(b, namespace, user)
                    && self
                        .role_rules(b, namespace)
                        .iter()
                        .any(|r| allows(r, attrs))
                {
                    return Ok(format!(
                        "allowed by RoleBinding {:?} in {namespace}",
                        name_of(b).unwrap_or("")
                    ));
                }
            }
        }
        Err(format!(
            "no RBAC rule allows {:?} for user {:?}",
            attrs, user.name
        ))
    }

    /// The rules of the role a binding refers to (a Role only in the
    /// binding's namespace).
    fn role_rules(&self, binding: &Value, namespace: &str) -> Vec<Value> {
        let name = binding["roleRef"]["name"].as_str().unwrap_or("");
        match binding["roleRef"]["kind"].as_str() {
            Some("ClusterRole") => self.cluster_role_rules(name),
            Some("Role") => self
                .roles
                .iter()
                .find(|r| name_of(r) == Some(name) && namespace_of(r) == Some(namespace))
                .map(rules_of)
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// A ClusterRole's rules; an aggregated one has the rules of every
    /// ClusterRole its selectors match (what the aggregation controller
    /// writes into it), aggregated ones among them with theirs in turn
    /// (Kubernetes' `view` aggregates into `edit`, `edit` into `admin`).
    fn cluster_role_rules(&self, name: &str) -> Vec<Value> {
        self.aggregated_rules(name, &mut Vec::new())
    }

    fn aggregated_rules<'a>(&'a self, name: &'a str, seen: &mut Vec<&'a str>) -> Vec<Value> {
        let Some(role) = self.cluster_roles.iter().find(|r| name_of(r) == Some(name)) else {
            return Vec::new();
        };
        let Some(selectors) = role["aggregationRule"]["clusterRoleSelectors"].as_array() else {
            return rules_of(role);
        };
        seen.push(name);
        let mut rules = Vec::new();
        for r in &self.cluster_roles {
            let Some(other) = name_of(r) else { continue };
            let selected = selectors
                .iter()
                .any(|s| labels_match(s, &r["metadata"]["labels"]));
            if selected && !seen.contains(&other) {
                rules.extend(self.aggregated_rules(other, seen));
            }
        }
        rules
    }
}

/// Kubernetes' user-facing ClusterRoles `view`, `edit` and `admin` as the
/// bootstrap policy makes them: each has the rules of the ClusterRoles
/// labelled `aggregate-to-<it>`, and `view` is labelled into `edit`, `edit`
/// into `admin`. Of the built-in rules (`system:aggregate-to-view` and the
/// like) only reading namespaces is kept; pods, secrets and the rest are
/// left out. With them the Role `extension-apiserver-authentication-reader`
/// in `kube-system`, which aggregated API servers are bound to.
pub fn kubernetes_user_roles() -> Vec<Value> {
    let role = |name: &str, into: Option<&str>| {
        let mut labels = serde_json::Map::new();
        if let Some(into) = into {
            labels.insert(
                format!("rbac.authorization.k8s.io/aggregate-to-{into}"),
                Value::from("true"),
            );
        }
        serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels},
            "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {
                format!("rbac.authorization.k8s.io/aggregate-to-{name}"): "true"
            }}]},
        })
    };
    let builtin_view = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "system:aggregate-to-view",
                     "labels": {"rbac.authorization.k8s.io/aggregate-to-view": "true"}},
        "rules": [{"apiGroups": [""], "resources": ["namespaces"],
                   "verbs": ["get", "list", "watch"]}],
    });
    // Aggregated API servers read the front proxy's settings through it.
    let auth_reader = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "extension-apiserver-authentication-reader", "namespace": "kube-system"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                   "resourceNames": ["extension-apiserver-authentication"],
                   "verbs": ["get", "list", "watch"]}],
    });
    vec![
        role("view", Some("edit")),
        role("edit", Some("admin")),
        role("admin", None),
        builtin_view,
        auth_reader,
    ]
}

fn name_of(o: &Value) -> Option<&str> {
    o["metadata"]["name"].as_str()
}

fn namespace_of(o: &Value) -> Option<&str> {
    o["metadata"]["namespace"].as_str()
}

fn rules_of(role: &Value) -> Vec<Value> {
    role["rules"].as_array().cloned().unwrap_or_default()
}

fn strings(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

/// Whether one of the binding's subjects is `user`. A ServiceAccount
/// subject without a namespace is in the binding's own.
fn binds(binding: &Value, namespace: &str, user: &UserInfo) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| {
            let name = s["name"].as_str().unwrap_or("");
            match s["kind"].as_str() {
                Some("User") => user.name == name,
                Some("Group") => user.groups.iter().any(|g| g == name),
                Some("ServiceAccount") => {
                    let ns = s["namespace"].as_str().unwrap_or(namespace);
                    user.name == format!("system:serviceaccount:{ns}:{name}")
                }
                _ => false,
            }
        })
}

/// Whether one PolicyRule allows `attrs`.
fn allows(rule: &Value, attrs: &Attributes) -> bool {
    let any = |list: &Value, want: &str| strings(list).any(|s| s == "*" || s == want);
    match attrs {
        Attributes::Resource {
            verb,
            group,
            resource,
            subresource,
            name,
            ..
        } => {
            let combined = Attributes::full_resource(resource, subresource);
            let resource_ok = strings(&rule["resources"]).any(|r| {
                r == "*"
                    || r == combined
                    || (!subresource.is_empty() && r == format!("*/{subresource}"))
            });
            let names: Vec<&str> = strings(&rule["resourceNames"]).collect();
            any(&rule["verbs"], verb)
                && any(&rule["apiGroups"], group)
                && resource_ok
                && (names.is_empty() || names.contains(&name.as_str()))
        }
        Attributes::NonResource { path, verb } => {
            any(&rule["verbs"], verb)
                && strings(&rule["nonResourceURLs"]).any(|u| url_matches(u, path))
        }
    }
}

/// A non-resource URL rule: exact, `*`, or a prefix ending in `*`.
fn url_matches(rule: &str, path: &str) -> bool {
    match rule.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => rule == path,
    }
}

/// A metav1 LabelSelector (`matchLabels`, `matchExpressions`) against labels.
fn labels_match(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels[k].as_str();
    let by_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| label(k) == v.as_str());
    let by_expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or("");
            let mut values = strings(&e["values"]);
            match e["operator"].as_str() {
                Some("In") => label(key).is_some_and(|l| values.any(|v| v == l)),
                Some("NotIn") => label(key).is_none_or(|l| !values.any(|v| v == l)),
                Some("Exists") => label(key).is_some(),
                Some("DoesNotExist") => label(key).is_none(),
                _ => false,
            }
        });
    by_labels && by_expressions
}

/// The answer to a `TokenReview` (the review object with its status).
pub fn token_review(review: &Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let status = match UserInfo::from_token(token) {
        Some(user) => json!({
            "authenticated": true,
            "user": {"username": user.name, "groups": user.groups, "extra": user.extra},
            "audiences": review["spec"]["audiences"].clone(),
        }),
        None => json!({"authenticated": false, "error": "the token is empty"}),
    };
    answer(review, "authentication.k8s.io/v1", "TokenReview", status)
}

/// The answer to a `SubjectAccessReview`, or to a `SelfSubjectAccessReview`
/// when `requester` is given (then the user is the requester).
pub fn access_review(rbac: &Rbac, review: &Value, requester: Option<&UserInfo>) -> Value {
    let spec = &review["spec"];
    let user = match requester {
        Some(user) => user.clone(),
        None => {
            let mut groups: Vec<String> = strings(&spec["groups"]).map(String::from).collect();
            let name = spec["user"].as_str().unwrap_or("").to_string();
            if let Some(from_name) = UserInfo::from_token(&name) {
                for g in from_name.groups {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
            UserInfo {
                name,
                groups,
                extra: BTreeMap::new(),
            }
        }
    };
    let kind = if requester.is_some() {
        "SelfSubjectAccessReview"
    } else {
        "SubjectAccessReview"
    };
    let status = match Attributes::from_spec(spec) {
        None => json!({
            "allowed": false,
            "evaluationError": "spec needs resourceAttributes or nonResourceAttributes",
        }),
        Some(attrs) => match rbac.authorize(&user, &attrs) {
            Ok(reason) => json!({"allowed": true, "reason": reason}),
            Err(reason) => json!({"allowed": false, "reason": reason}),
        },
    };
    answer(review, "authorization.k8s.io/v1", kind, status)
}

fn answer(review: &Value, api_version: &str, kind: &str, status: Value) -> Value {
    let mut out = review.clone();
    if !out.is_object() {
        out = json!({});
    }
    out["apiVersion"] = json!(api_version);
    out["kind"] = json!(kind);
    if !out["metadata"].is_object() {
        out["metadata"] = json!({});
    }
    out["status"] = status;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(ns: &str, name: &str) -> UserInfo {
        UserInfo::from_token(&format!("system:serviceaccount:{ns}:{name}")).unwrap()
    }

    fn metrics() -> Attributes {
        Attributes::NonResource {
            path: "/metrics".into(),
            verb: "get".into(),
        }
    }

    fn console(ns: &str) -> Attributes {
        Attributes::Resource {
            namespace: ns.into(),
            verb: "get".into(),
            group: "subresources.godwit.dev".into(),
            resource: "virtualmachines".into(),
            subresource: "console".into(),
            name: "vm1".into(),
        }
    }

    fn objects() -> Vec<Value> {
        vec![
            json!({"kind": "ClusterRole", "metadata": {"name": "reader"},
                   "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]}),
            json!({"kind": "ClusterRoleBinding", "metadata": {"name": "prom"},
                   "roleRef": {"kind": "ClusterRole", "name": "reader"},
                   "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": "mon"}]}),
            json!({"kind": "ClusterRole", "metadata": {"name": "agg"},
                   "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "true"}}]}}),
            json!({"kind": "ClusterRole", "metadata": {"name": "part", "labels": {"agg": "true"}},
                   "rules": [{"apiGroups": ["subresources.godwit.dev"],
                              "resources": ["virtualmachines/console"], "verbs": ["get"]}]}),
            json!({"kind": "RoleBinding", "metadata": {"name": "team", "namespace": "team-a"},
                   "roleRef": {"kind": "ClusterRole", "name": "agg"},
                   "subjects": [{"kind": "User", "name": "alice"}]}),
        ]
    }

    #[test]
    fn cluster_bindings_grant_non_resource_urls_to_service_accounts() {
        let rbac = Rbac::from_objects(&objects());
        assert!(rbac.authorize(&sa("mon", "prometheus"), &metrics()).is_ok());
        assert!(rbac
            .authorize(&sa("other", "prometheus"), &metrics())
            .is_err());
        let alice = UserInfo::from_token("alice").unwrap();
        assert!(rbac.authorize(&alice, &metrics()).is_err());
    }

    #[test]
    fn role_bindings_grant_aggregated_rules_in_their_namespace_only() {
        let rbac = Rbac::from_objects(&objects());
        let alice = UserInfo::from_token("alice").unwrap();
        assert!(rbac.authorize(&alice, &console("team-a")).is_ok());
        assert!(rbac.authorize(&alice, &console("team-b")).is_err());
        let bob = UserInfo::from_token("bob").unwrap();
        assert!(rbac.authorize(&bob, &console("team-a")).is_err());
    }

    #[test]
    fn aggregation_goes_through_aggregated_roles_and_stops_at_cycles() {
        // As Kubernetes' bootstrap roles: `view` into `edit` into `admin`;
        // `loop` selects itself and `admin`, which selects it back.
        let mut objs = objects();
        objs.extend([
            json!({"kind": "ClusterRole", "metadata": {"name": "admin"},
                   "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"to-admin": "true"}}]}}),
            json!({"kind": "ClusterRole", "metadata": {"name": "edit", "labels": {"to-admin": "true"}},
                   "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "true"}}]}}),
            json!({"kind": "ClusterRole", "metadata": {"name": "loop", "labels": {"to-admin": "true"}},
                   "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"to-admin": "true"}}]}}),
            json!({"kind": "RoleBinding", "metadata": {"name": "boss", "namespace": "team-a"},
                   "roleRef": {"kind": "ClusterRole", "name": "admin"},
                   "subjects": [{"kind": "User", "name": "carol"}]}),
        ]);
        let rbac = Rbac::from_objects(&objs);
        let carol = UserInfo::from_token("carol").unwrap();
        assert!(rbac.authorize(&carol, &console("team-a")).is_ok());
        assert!(rbac.authorize(&carol, &console("team-b")).is_err());
    }

    #[test]
    fn rules_match_subresources_names_and_url_prefixes() {
        let rule = json!({"apiGroups": [""], "resources": ["pods/log"],
                          "resourceNames": ["p1"], "verbs": ["get"]});
        let pod = |sub: &str, name: &str| Attributes::Resource {
            namespace: "ns".into(),
            verb: "get".into(),
            group: String::new(),
            resource: "pods".into(),
            subresource: sub.into(),
            name: name.into(),
        };
        assert!(allows(&rule, &pod("log", "p1")));
        assert!(!allows(&rule, &pod("log", "p2")));
        assert!(!allows(&rule, &pod("", "p1")));
        assert!(url_matches("/metrics*", "/metrics/cadvisor"));
        assert!(!url_matches("/metrics", "/metricsx"));
    }

    #[test]
    fn an_empty_token_is_not_authenticated() {
        let r = token_review(&json!({"spec": {"token": ""}}));
        assert_eq!(r["status"]["authenticated"], false);
        let r = token_review(&json!({"spec": {"token": "system:serviceaccount:a:b"}}));
        assert_eq!(r["status"]["user"]["username"], "system:serviceaccount:a:b");
        assert!(r["status"]["user"]["groups"]
            .as_array()
            .unwrap()
            .contains(&json!("system:serviceaccounts:a")));
    }
}
