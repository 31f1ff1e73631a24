//! The chart's RBAC grants what Godwit uses: the local-cluster flows (a VM
//! from a template runs, migrates live, is deleted; on a second cluster a VM
//! fails over when its node is lost, and is deleted) run with the operator as
//! user `godwit-operator` and the agents as `godwit-node` (the chart's
//! ServiceAccount names; both also serve a `/metrics` scrape, which they
//! check with the API server), and every request the API server recorded for
//! them must be allowed by the rules Helm renders for that ServiceAccount:
//! verb, API group, resource with its subresource, and the namespace for
//! rules bound by a RoleBinding. The test fails listing each request that is not allowed.
//!
//! Discovery (`/api`, `/apis`, `/version`) is left out: every authenticated
//! user may read it (the cluster's `system:discovery` role).
//!
//! Needs /dev/kvm, the release binaries (as e2e/test.sh builds them) and
//! helm-python-sdk (e2e/install-deps.sh).

use std::collections::BTreeMap;
use std::time::Duration;

use godwit_apiserver::audit::AuditRecord;
use godwit_apiserver::rbac::{Attributes, Rbac, UserInfo};
use godwit_e2e::cluster::{NODE_USER, OPERATOR_USER};
use godwit_e2e::driver::{
    http_get, ClusterDriver, EXAMPLE_MIGRATION, EXAMPLE_TEMPLATE, EXAMPLE_VM, METRICS_SCRAPER,
};
use godwit_e2e::helm;
use serde_json::Value;

const NAMESPACE: &str = "godwit-system";

/// The user a recorded request of ServiceAccount `sa` acts as.
fn service_account(sa: &str) -> UserInfo {
    UserInfo::from_token(&format!("system:serviceaccount:{NAMESPACE}:{sa}")).unwrap()
}

/// The RBAC attributes of a recorded resource request.
fn attributes(r: &AuditRecord) -> Attributes {
    Attributes::Resource {
        namespace: r.namespace.clone(),
        verb: r.verb.clone(),
        group: r.api_group.clone(),
        resource: r.resource.clone(),
        subresource: r.subresource.clone(),
        name: r.name.clone(),
    }
}

/// One line per kind of denied request: who, verb, group, resource, where, how often.
fn denied(rbac: &Rbac, records: &[AuditRecord]) -> Vec<String> {
    let mut seen: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for r in records.iter().filter(|r| !r.resource.is_empty()) {
        if rbac
            .authorize(&service_account(&r.user), &attributes(r))
            .is_ok()
        {
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

/// The rules of the operator's and the agents' roles that no recorded
/// request needs: without each one alone, every request is still allowed.
fn needless_rules(docs: &[Value], records: &[AuditRecord]) -> Vec<String> {
    let mut needless = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        if !matches!(kind, "Role" | "ClusterRole") || !name.starts_with("godwit-") {
            continue;
        }
        let rules = doc["rules"].as_array().cloned().unwrap_or_default();
        for (j, rule) in rules.iter().enumerate() {
            let mut without = docs.to_vec();
            without[i]["rules"].as_array_mut().unwrap().remove(j);
            if denied(&Rbac::from_objects(&without), records).is_empty() {
                needless.push(format!("{kind} {name}: {rule}"));
            }
        }
    }
    needless
}

/// The requests of the operator and the agents in `g` so far. Each agent's
/// token is bound to its node (`godwit-node@<node>`); RBAC sees the service
/// account.
fn requests(g: &ClusterDriver) -> Vec<AuditRecord> {
    g.cluster
        .api
        .requests()
        .into_iter()
        .map(|mut r| {
            if r.user.starts_with(&format!("{NODE_USER}@")) {
                r.user = NODE_USER.to_string();
            }
            r
        })
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
    // A scrape of the operator and of a node daemon: each asks the API
    // server who the token is and what it may do.
    g.allow_metrics_scraper().unwrap();
    let op = g.cluster.operator_metrics().unwrap().to_string();
    assert_eq!(
        http_get(&op, "/metrics", Some(METRICS_SCRAPER)).unwrap().0,
        200
    );
    let node = &g.cluster.fabric.nodes[0];
    let addr = format!("{}:{}", node.ip, godwit_crds::contract::NODE_METRICS_PORT);
    let code = node
        .ns
        .run_in(move || {
            http_get(&addr, "/metrics", Some(METRICS_SCRAPER))
                .unwrap()
                .0
        })
        .unwrap();
    assert_eq!(code, 200);
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
    let rbac = Rbac::from_objects(&docs);

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
    let denied = denied(&rbac, &records);
    assert!(
        denied.is_empty(),
        "requests the chart's RBAC does not allow:\n  {}",
        denied.join("\n  ")
    );
    let needless = needless_rules(&docs, &records);
    println!(
        "rules no flow here needs ({}):\n  {}",
        needless.len(),
        needless.join("\n  ")
    );
}
