//! The chart's RBAC grants what Godwit uses: the local-cluster flows (a VM
//! from a template runs, migrates live, is deleted; on a second cluster a VM
//! fails over when its node is lost, and is deleted) run with the operator as
//! user `godwit-operator` and the agents as `godwit-node` (the chart's
//! ServiceAccount names), and every request the API server recorded for them
//! must be allowed by the rules Helm renders for that ServiceAccount: verb,
//! API group, resource with its subresource, and the namespace for rules bound
//! by a RoleBinding. The test fails listing each request that is not allowed.
//!
//! Discovery (`/api`, `/apis`, `/version`) is left out: every authenticated
//! user may read it (the cluster's `system:discovery` role).
//!
//! Needs /dev/kvm, the release binaries (as e2e/test.sh builds them) and
//! helm-python-sdk (e2e/install-deps.sh).

use std::collections::BTreeMap;
use std::time::Duration;

use godwit_apiserver::audit::AuditRecord;
use godwit_e2e::cluster::{NODE_USER, OPERATOR_USER};
use godwit_e2e::driver::{ClusterDriver, EXAMPLE_MIGRATION, EXAMPLE_TEMPLATE, EXAMPLE_VM};
use godwit_e2e::helm;
use serde_json::Value;

const NAMESPACE: &str = "godwit-system";

/// One rendered rule and where it applies.
#[derive(Debug)]
struct Grant {
    /// `None`: every namespace and cluster-scoped objects (ClusterRoleBinding);
    /// `Some(ns)`: only objects in `ns` (RoleBinding).
    namespace: Option<String>,
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// ServiceAccount name to its grants, from the rendered manifests.
fn grants(docs: &[Value]) -> BTreeMap<String, Vec<Grant>> {
    let role = |kind: &str, name: &str, ns: Option<&str>| -> Vec<Value> {
        docs.iter()
            .find(|d| {
                d["kind"] == kind
                    && d["metadata"]["name"] == name
                    && ns.is_none_or(|ns| d["metadata"]["namespace"] == ns)
            })
            .and_then(|d| d["rules"].as_array().cloned())
            .unwrap_or_else(|| panic!("binding refers to missing {kind} {name}"))
    };
    let mut out: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default();
        let scope = match kind {
            "ClusterRoleBinding" => None,
            "RoleBinding" => Some(d["metadata"]["namespace"].as_str().unwrap().to_string()),
            _ => continue,
        };
        let ref_kind = d["roleRef"]["kind"].as_str().unwrap();
        let ref_name = d["roleRef"]["name"].as_str().unwrap();
        let rules = role(
            ref_kind,
            ref_name,
            (ref_kind == "Role").then(|| scope.as_deref().unwrap()),
        );
        for subject in d["subjects"].as_array().into_iter().flatten() {
            assert_eq!(subject["kind"], "ServiceAccount", "{subject}");
            assert_eq!(subject["namespace"], NAMESPACE, "{subject}");
            let sa = subject["name"].as_str().unwrap().to_string();
            for rule in &rules {
                out.entry(sa.clone()).or_default().push(Grant {
                    namespace: scope.clone(),
                    api_groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    verbs: strings(&rule["verbs"]),
                });
            }
        }
    }
    out
}

fn allowed(grants: &[Grant], r: &AuditRecord) -> bool {
    let resource = if r.subresource.is_empty() {
        r.resource.clone()
    } else {
        format!("{}/{}", r.resource, r.subresource)
    };
    let has = |list: &[String], item: &str| list.iter().any(|x| x == item || x == "*");
    grants.iter().any(|g| {
        has(&g.verbs, &r.verb)
            && has(&g.api_groups, &r.api_group)
            && has(&g.resources, &resource)
            && g.namespace.as_ref().is_none_or(|ns| *ns == r.namespace)
    })
}

/// One line per kind of denied request: who, verb, group, resource, where, how often.
fn denied(grants: &BTreeMap<String, Vec<Grant>>, records: &[AuditRecord]) -> Vec<String> {
    let none = Vec::new();
    let mut seen: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for r in records.iter().filter(|r| !r.resource.is_empty()) {
        if allowed(grants.get(&r.user).unwrap_or(&none), r) {
            continue;
        }
        let sub = if r.subresource.is_empty() {
            String::new()
        } else {
            format!("/{}", r.subresource)
        };
        let scope = if r.namespace.is_empty() {
            "cluster-wide".to_string()
        } else {
            format!("namespace {}", r.namespace)
        };
        let group = if r.api_group.is_empty() {
            "core"
        } else {
            &r.api_group
        };
        let key = format!(
            "{}: {} {}{} (group {group}) {scope}",
            r.user, r.verb, r.resource, sub
        );
        let e = seen.entry(key).or_insert((0, r.path.clone()));
        e.0 += 1;
    }
    seen.into_iter()
        .map(|(k, (n, path))| format!("{k}: {n} request(s), e.g. {path}"))
        .collect()
}

/// The requests of the operator and the agents in `g` so far.
fn requests(g: &ClusterDriver) -> Vec<AuditRecord> {
    g.cluster
        .api
        .requests()
        .into_iter()
        .filter(|r| r.user == OPERATOR_USER || r.user == NODE_USER)
        .collect()
}

/// A VM from a template, with user-data from a Secret (the agent reads it
/// for the cloud-init seed), runs, migrates live, and is deleted.
fn migrate_and_delete() -> Vec<AuditRecord> {
    let dir = std::env::temp_dir().join(format!("godwit-rbac-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("local cluster with Godwit");
    g.kubectl(
        &[
            "create",
            "secret",
            "generic",
            "demo-userdata",
            "-n",
            "default",
            "--from-literal=userdata=#cloud-config",
        ],
        None,
    )
    .unwrap();
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    let vm = format!(
        "{}\n  customization:\n    userDataSecretRef:\n      name: demo-userdata\n",
        EXAMPLE_VM.trim_end()
    );
    g.apply(&g.example(&vm)).unwrap();
    g.wait_running("demo", Duration::from_secs(90)).unwrap();
    g.apply(&g.example(EXAMPLE_MIGRATION)).unwrap();
    let phase = g
        .wait("the migration to end", Duration::from_secs(300), || {
            let m = g.get("gvmm", "demo-move")?;
            let phase = m.as_ref().and_then(|m| m["status"]["phase"].as_str());
            Ok(phase
                .filter(|p| matches!(*p, "Succeeded" | "Failed" | "Cancelled"))
                .map(String::from))
        })
        .unwrap();
    assert_eq!(phase, "Succeeded");
    g.wait_running("demo", Duration::from_secs(30)).unwrap();
    delete_demo(&g);
    requests(&g)
}

/// A VM runs, its node is lost (cut off: it fences itself, the operator
/// restarts the VM elsewhere), and it is deleted. A cluster of its own, so
/// that the two flows do not depend on each other.
fn fail_over_and_delete() -> Vec<AuditRecord> {
    let dir = std::env::temp_dir().join(format!("godwit-rbac-ha-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("local cluster with Godwit");
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(EXAMPLE_VM)).unwrap();
    godwit_e2e::failover::fail_over(&g, "demo").expect("failover");
    delete_demo(&g);
    requests(&g)
}

fn delete_demo(g: &ClusterDriver) {
    g.kubectl(
        &["delete", "gvm", "demo", "--wait=true", "--timeout=60s"],
        None,
    )
    .unwrap();
}

#[test]
fn chart_rbac_allows_every_request_of_the_operator_and_the_agents() {
    let rendered = helm::render(None, NAMESPACE).expect("helm renders the chart");
    let docs = helm::documents(&rendered).expect("rendered YAML parses");
    let grants = grants(&docs);
    assert!(grants.contains_key(OPERATOR_USER), "{:?}", grants.keys());
    assert!(grants.contains_key(NODE_USER), "{:?}", grants.keys());

    let mut records = migrate_and_delete();
    records.extend(fail_over_and_delete());
    for user in [OPERATOR_USER, NODE_USER] {
        let n = records.iter().filter(|r| r.user == user).count();
        assert!(n > 0, "no requests recorded for {user}");
        println!("{user}: {n} requests checked");
    }
    // The agents read the VM's user-data Secret for its cloud-init seed.
    assert!(
        records
            .iter()
            .any(|r| r.user == NODE_USER && r.resource == "secrets" && r.verb == "get"),
        "the agents never read the user-data Secret"
    );
    // What was used, for a reader judging whether a rule is still needed.
    let used: std::collections::BTreeSet<String> = records
        .iter()
        .filter(|r| !r.resource.is_empty())
        .map(|r| {
            let sub = if r.subresource.is_empty() { "" } else { "/" };
            let ns = if r.namespace.is_empty() {
                "*"
            } else {
                &r.namespace
            };
            format!(
                "{} {} {}.{}{sub}{} in {ns}",
                r.user, r.verb, r.resource, r.api_group, r.subresource
            )
        })
        .collect();
    println!(
        "used:\n  {}",
        used.into_iter().collect::<Vec<_>>().join("\n  ")
    );
    let denied = denied(&grants, &records);
    assert!(
        denied.is_empty(),
        "requests the chart's RBAC does not allow:\n  {}",
        denied.join("\n  ")
    );
}
