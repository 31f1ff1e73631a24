//! The chart's RBAC is what Godwit uses, and no more. The local-cluster
//! flows run with the operator as user `godwit-operator` and the agents as
//! `godwit-node` (the chart's ServiceAccount names):
//! - a VM from a ClusterVMTemplate runs, migrates live, is scraped (`/metrics` on the
//!   operator and a node daemon, each asking the API server about the
//!   scraper's token) and deleted; meanwhile namespace users work with VMs as
//!   Kubernetes' `edit` (alice) and `view` (bob) roles let them;
//! - on a second cluster a VM fails over when its node is lost, and is
//!   deleted;
//! - on a third, with DRS recommending, a VM on node-local storage moves
//!   live with its disk, is evacuated from a node put in maintenance, is
//!   stopped and moved cold, and is deleted.
//!
//! Every request the API server recorded for these users must be allowed by
//! the rules Helm renders (verb, API group, resource with its subresource,
//! and the namespace for rules bound by a RoleBinding), and so must the
//! scraper's `get /metrics`. Then, for every rule of every Role and
//! ClusterRole the chart renders, the same requests are checked without
//! that rule: some must be refused, or the rule is one nothing needs and the
//! test fails naming it.
//!
//! Discovery (`/api`, `/apis`, `/version`) is left out: every authenticated
//! user may read it (the cluster's `system:discovery` role).
//!
//! Needs /dev/kvm, the release binaries (as e2e/test.sh builds them) and
//! helm-python-sdk (e2e/install-deps.sh).

use std::collections::BTreeMap;
use std::time::Duration;

use godwit_apiserver::audit::AuditRecord;
use godwit_apiserver::rbac::{kubernetes_user_roles, Attributes, Rbac, UserInfo};
use godwit_crds::contract::MAINTENANCE_LABEL;
use godwit_e2e::cluster::{NODE_USER, OPERATOR_USER};
use godwit_e2e::driver::{
    http_get, node_of, ClusterDriver, EXAMPLE_MIGRATION, EXAMPLE_TEMPLATE, EXAMPLE_VM,
    METRICS_SCRAPER,
};
use godwit_e2e::helm;
use serde_json::Value;

const NAMESPACE: &str = "godwit-system";

/// Namespace users of the first flow: alice edits, bob views.
const EDITOR: &str = "alice";
const VIEWER: &str = "bob";
/// Their namespace.
const TEAM: &str = "team";

/// A request someone needs allowed: who, what, and an example path.
struct Need {
    user: UserInfo,
    attrs: Attributes,
    path: String,
}

/// The user a recorded request acts as (the local cluster's operator and
/// agents act as the chart's ServiceAccounts).
fn user_of(r: &AuditRecord) -> UserInfo {
    UserInfo::from_token(&r.user).unwrap()
}

/// The needs of recorded resource requests.
fn needs(records: &[AuditRecord]) -> Vec<Need> {
    records
        .iter()
        .filter(|r| !r.resource.is_empty())
        .map(|r| Need {
            user: user_of(r),
            attrs: Attributes::Resource {
                // As kube-apiserver's request info: a request for one
                // namespace is in that namespace.
                namespace: if r.resource == "namespaces" && r.api_group.is_empty() {
                    r.name.clone()
                } else {
                    r.namespace.clone()
                },
                verb: r.verb.clone(),
                group: r.api_group.clone(),
                resource: r.resource.clone(),
                subresource: r.subresource.clone(),
                name: r.name.clone(),
            },
            path: r.path.clone(),
        })
        .collect()
}

/// One line per kind of denied need: who, what, how often.
fn denied(rbac: &Rbac, needs: &[Need]) -> Vec<String> {
    let mut seen: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for n in needs {
        if rbac.authorize(&n.user, &n.attrs).is_ok() {
            continue;
        }
        let what = match &n.attrs {
            Attributes::Resource {
                namespace,
                verb,
                group,
                resource,
                subresource,
                ..
            } => {
                let sub = if subresource.is_empty() {
                    String::new()
                } else {
                    format!("/{subresource}")
                };
                let scope = if namespace.is_empty() {
                    "cluster-wide".to_string()
                } else {
                    format!("namespace {namespace}")
                };
                let group = if group.is_empty() { "core" } else { group };
                format!("{verb} {resource}{sub} (group {group}) {scope}")
            }
            Attributes::NonResource { path, verb } => format!("{verb} {path}"),
        };
        let e = seen
            .entry(format!("{}: {what}", n.user.name))
            .or_insert((0, n.path.clone()));
        e.0 += 1;
    }
    seen.into_iter()
        .map(|(k, (n, path))| format!("{k}: {n} request(s), e.g. {path}"))
        .collect()
}

/// The rules of the chart's Roles and ClusterRoles (`chart`) that no need
/// requires: without each one alone, every need is still allowed. `extra`
/// are the objects that are not the chart's (Kubernetes' user roles, the
/// users' bindings).
fn needless_rules(chart: &[Value], extra: &[Value], needs: &[Need]) -> Vec<String> {
    let mut needless = Vec::new();
    for (i, doc) in chart.iter().enumerate() {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if !matches!(kind, "Role" | "ClusterRole") {
            continue;
        }
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        let rules = doc["rules"].as_array().cloned().unwrap_or_default();
        for (j, rule) in rules.iter().enumerate() {
            let mut without = chart.to_vec();
            without[i]["rules"].as_array_mut().unwrap().remove(j);
            without.extend(extra.iter().cloned());
            if denied(&Rbac::from_objects(&without), needs).is_empty() {
                needless.push(format!("{kind} {name}: {rule}"));
            }
        }
    }
    needless
}

/// The RoleBindings of [`EDITOR`] to `edit` and [`VIEWER`] to `view` in
/// [`TEAM`], as a namespace's administrator makes them.
fn team_bindings() -> Vec<Value> {
    [(EDITOR, "edit"), (VIEWER, "view")]
        .iter()
        .map(|(user, role)| {
            serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": format!("{user}-{role}"), "namespace": TEAM},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "User", "name": user}],
            })
        })
        .collect()
}

/// The requests of the operator, the agents and the namespace users in `g`
/// so far. Each agent's token is bound to its node (`<NODE_USER>@<node>`);
/// RBAC sees the service account.
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
        .filter(|r| [OPERATOR_USER, NODE_USER, EDITOR, VIEWER].contains(&r.user.as_str()))
        .collect()
}

/// What a namespace user does with kubectl: alice (`edit`) makes a template,
/// a VM and a migration, changes and deletes them; bob (`view`) lists and
/// reads them, and watches.
fn team_work(g: &ClusterDriver) {
    let as_user = |user: &str, args: &[&str], stdin: Option<&str>| {
        let token = format!("--as={user}");
        g.kubectl(&[&[token.as_str(), "-n", TEAM][..], args].concat(), stdin)
            .unwrap_or_else(|e| panic!("{user}: kubectl {args:?}: {e:#}"))
    };
    g.kubectl(&["create", "namespace", TEAM], None).unwrap();
    let in_team = |text: &str| text.replace("namespace: default", &format!("namespace: {TEAM}"));
    let vm = in_team(&g.example(EXAMPLE_VM)).replace("runStrategy: Always", "runStrategy: Halted");
    let objects = format!(
        "{}\n---\n{vm}\n---\n{}",
        in_team(&g.example(EXAMPLE_TEMPLATE)),
        in_team(&g.example(EXAMPLE_MIGRATION))
    );
    as_user(EDITOR, &["apply", "-f", "-"], Some(&objects));
    as_user(
        EDITOR,
        &["label", "gvm", "demo", "tier=web", "--overwrite"],
        None,
    );
    as_user(VIEWER, &["get", "gvm,gvmt,gvmm", "-o", "name"], None);
    as_user(VIEWER, &["get", "gvm", "demo", "-o", "yaml"], None);
    // alice asks for the console (kubectl's GET is no WebSocket, so the
    // console API refuses it with 400 once both the API server and the
    // console API have authorized her).
    let console =
        format!("/apis/subresources.godwit.dev/v1/namespaces/{TEAM}/virtualmachines/demo/console");
    let _ = g.kubectl(&[&format!("--as={EDITOR}"), "get", "--raw", &console], None);
    // A watch that kubectl ends after a second (so it exits non-zero).
    let _ = g.kubectl(
        &[
            &format!("--as={VIEWER}"),
            "-n",
            TEAM,
            "get",
            "gvm",
            "--watch",
            "--request-timeout=1s",
        ],
        None,
    );
    as_user(
        EDITOR,
        &["delete", "gvmm", "demo-move", "--wait=false"],
        None,
    );
    as_user(EDITOR, &["delete", "gvm", "demo", "--wait=false"], None);
    as_user(EDITOR, &["delete", "gvmt", "testguest"], None);
}

/// A VM from a ClusterVMTemplate, with user-data from a Secret (the agent
/// reads it for the cloud-init seed), runs, migrates live, and is deleted.
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
    // Here the template is a ClusterVMTemplate (the operator reads it, the
    // agents watch them all).
    let template = EXAMPLE_TEMPLATE
        .replace("kind: VMTemplate", "kind: ClusterVMTemplate")
        .replace("  namespace: default\n", "");
    g.apply(&g.example(&template)).unwrap();
    let vm = format!(
        "{}\n  customization:\n    userDataSecretRef:\n      name: demo-userdata\n",
        EXAMPLE_VM.trim_end().replace(
            "templateRef:\n    name: testguest",
            "templateRef:\n    kind: ClusterVMTemplate\n    name: testguest"
        )
    );
    assert!(vm.contains("kind: ClusterVMTemplate"), "{vm}");
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
    team_work(&g);
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

/// With DRS recommending every 2 s, a VM on node-local storage moves live
/// with its disk, is evacuated from a node put in maintenance, is stopped
/// and moved cold, and is deleted.
fn move_local_disk_every_way() -> Vec<AuditRecord> {
    let dir = std::env::temp_dir().join(format!("godwit-rbac-local-{}", std::process::id()));
    let g = ClusterDriver::up_with(2, &dir, &["--drs-mode", "manual", "--drs-interval", "2"])
        .expect("local cluster with Godwit");
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    let local_vm = g
        .example(EXAMPLE_VM)
        .replace("storage: Shared", "storage: Local");
    assert!(local_vm.contains("storage: Local"));
    g.apply(&local_vm).unwrap();
    g.wait_running("demo", Duration::from_secs(90)).unwrap();
    let migration = |name: &str, extra: &str| {
        format!("apiVersion: godwit.dev/v1alpha1\nkind: VMMigration\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  vmName: demo\n{extra}")
    };
    let succeeded = |name: &str| {
        let phase = g
            .wait(
                &format!("migration {name} to end"),
                Duration::from_secs(180),
                || {
                    let m = g.get("gvmm", name)?;
                    let phase = m.as_ref().and_then(|m| m["status"]["phase"].as_str());
                    Ok(phase
                        .filter(|p| matches!(*p, "Succeeded" | "Failed" | "Cancelled"))
                        .map(String::from))
                },
            )
            .unwrap();
        assert_eq!(phase, "Succeeded", "migration {name}");
    };
    g.apply(&migration("copy", "  storage: Copy\n")).unwrap();
    succeeded("copy");
    let vm = g.wait_running("demo", Duration::from_secs(30)).unwrap();

    // Maintenance evacuates the node, copying the disk.
    let from = node_of(&vm);
    let label = format!("{MAINTENANCE_LABEL}=true");
    g.kubectl(&["label", "node", &from, &label], None).unwrap();
    g.wait(
        "demo to leave the node in maintenance",
        Duration::from_secs(180),
        || {
            let vm = g.get("gvm", "demo")?;
            Ok(vm.filter(|v| v["status"]["phase"] == "Running" && node_of(v) != from))
        },
    )
    .unwrap();
    let unlabel = format!("{MAINTENANCE_LABEL}-");
    g.kubectl(&["label", "node", &from, &unlabel], None)
        .unwrap();

    // Stopped, it moves cold.
    g.kubectl(
        &[
            "patch",
            "gvm",
            "demo",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"runStrategy":"Halted"}}"#,
        ],
        None,
    )
    .unwrap();
    g.wait("demo to stop", Duration::from_secs(60), || {
        let vm = g.get("gvm", "demo")?;
        Ok(vm.filter(|v| v["status"]["phase"] == "Stopped"))
    })
    .unwrap();
    g.apply(&migration("cold", "  mode: Cold\n")).unwrap();
    succeeded("cold");

    // DRS has written its plan by now.
    g.wait("the DRS plan", Duration::from_secs(30), || {
        let out = g.kubectl(&["get", "configmap", "-n", NAMESPACE, "-o", "name"], None)?;
        Ok(out.contains("godwit-drs").then_some(()))
    })
    .unwrap();
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
fn chart_rbac_allows_what_godwit_and_its_users_do_and_nothing_more() {
    let (scraper_ns, scraper) = METRICS_SCRAPER
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
        .unwrap();
    let values =
        std::env::temp_dir().join(format!("godwit-rbac-values-{}.yaml", std::process::id()));
    std::fs::write(
        &values,
        format!("monitoring:\n  scrapers:\n    - name: {scraper}\n      namespace: {scraper_ns}\n"),
    )
    .unwrap();
    let rendered = helm::render(Some(&values), NAMESPACE);
    let _ = std::fs::remove_file(&values);
    let rendered = rendered.expect("helm renders the chart");
    let chart = helm::documents(&rendered).expect("rendered YAML parses");
    let mut extra = kubernetes_user_roles();
    extra.extend(team_bindings());
    let all: Vec<Value> = chart.iter().chain(&extra).cloned().collect();
    let rbac = Rbac::from_objects(&all);

    let mut records = migrate_and_delete();
    records.extend(fail_over_and_delete());
    records.extend(move_local_disk_every_way());
    for user in [OPERATOR_USER, NODE_USER, EDITOR, VIEWER] {
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
    let mut needs = needs(&records);
    needs.push(Need {
        user: UserInfo::from_token(METRICS_SCRAPER).unwrap(),
        attrs: Attributes::NonResource {
            path: "/metrics".into(),
            verb: "get".into(),
        },
        path: "/metrics on the operator and a node daemon".into(),
    });
    let denied = denied(&rbac, &needs);
    assert!(
        denied.is_empty(),
        "requests the chart's RBAC does not allow:\n  {}",
        denied.join("\n  ")
    );
    let rules = chart
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Role" | "ClusterRole")))
        .map(|d| d["rules"].as_array().map_or(0, Vec::len))
        .sum::<usize>();
    let needless = needless_rules(&chart, &extra, &needs);
    assert!(
        needless.is_empty(),
        "rules of the chart that no flow needs (remove them, or add the flow that does):\n  {}",
        needless.join("\n  ")
    );
    println!("each of the chart's {rules} rules is needed by some flow");
}
