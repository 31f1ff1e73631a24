//! A real Helm release lifecycle against the test API server, through
//! Helm's own SDK (helm-python-sdk, Helm v4: server-side apply, release
//! Secrets), driven by `e2e/helm/chart.py`: install the chart, upgrade it
//! with changed values (visible in the stored objects), roll back (the
//! changes are gone, removed fields included), uninstall (everything the
//! release made is gone but the CRDs). A second release of the same name in
//! another namespace is refused with a message naming the clash; one of
//! another name installs beside the first.
//!
//! The requests Helm makes, read back from the server's audit log (user
//! agent `Helm/…`), are checked step by step:
//! - install: `create secrets` (the release record), `patch` of every
//!   object (server-side apply, the CRDs of crds/ included), `update secrets`
//!   (the record marked deployed);
//! - upgrade and rollback: `patch` of every object, `delete` of the objects
//!   the new revision drops, `create`/`update secrets`;
//! - uninstall: `delete` of every object and of the release's Secrets, never
//!   of a CRD.
//!
//! What the test API server had to learn for this: server-side apply that
//! removes the fields a manager stopped applying (rollback removes the
//! upgrade's `nodeSelector`), with `managedFields` ([`godwit_apiserver::apply`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use godwit_apiserver::{ServerConfig, ServerThread};
use godwit_e2e::helm;
use serde_json::Value;

struct Cluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    audit: PathBuf,
    _server: ServerThread,
}

impl Cluster {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("godwit-helm-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let audit = dir.join("audit.jsonl");
        let config = ServerConfig {
            audit_log: Some(audit.clone()),
            ..Default::default()
        };
        let server = ServerThread::start("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig, "admin").unwrap();
        Self {
            dir,
            kubeconfig,
            audit,
            _server: server,
        }
    }

    fn helm(&self, command: &str, namespace: &str, name: &str, sets: &[&str]) -> Value {
        let out = helm::release(command, &self.kubeconfig, namespace, name, sets)
            .unwrap_or_else(|e| panic!("helm {command} {name}: {e}"));
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"))
    }

    /// `kubectl get ... -o json`, or `None` when the object does not exist.
    fn get(&self, args: &[&str]) -> Option<Value> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("get")
            .args(args)
            .args(["-o", "json", "--show-managed-fields"])
            .output()
            .expect("kubectl runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            assert!(
                stderr.contains("NotFound"),
                "kubectl get {args:?}: {stderr}"
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    fn names(&self, args: &[&str]) -> BTreeSet<String> {
        let list = self.get(args).expect("a list");
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// How many audit lines there are, to read a step's requests after it.
    fn mark(&self) -> usize {
        audit_lines(&self.audit).len()
    }

    /// Helm's writes since `mark`, as `verb resource` (`patch clusterroles`).
    fn helm_writes(&self, mark: usize) -> BTreeSet<String> {
        audit_lines(&self.audit)[mark..]
            .iter()
            .filter(|r| r["userAgent"].as_str().unwrap_or("").starts_with("Helm/"))
            .filter(|r| !matches!(r["verb"].as_str(), Some("get" | "list" | "watch")))
            .map(|r| {
                format!(
                    "{} {}",
                    r["verb"].as_str().unwrap(),
                    r["resource"].as_str().unwrap()
                )
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn expect(writes: &BTreeSet<String>, expected: &[&str]) {
    for request in expected {
        assert!(writes.contains(*request), "no {request:?} in {writes:#?}");
    }
}

const NAMESPACE: &str = "godwit-system";
const CLUSTER_ROLES: [&str; 5] = [
    "godwit-operator",
    "godwit-node",
    "godwit-view",
    "godwit-edit",
    "godwit-metrics-reader",
];

#[test]
fn install_upgrade_rollback_uninstall() {
    let cluster = Cluster::start();
    let operator = ["deployment", "godwit-operator", "-n", NAMESPACE];

    let mark = cluster.mark();
    let installed = cluster.helm("install", NAMESPACE, "godwit", &[]);
    assert_eq!(installed["status"], "deployed", "{installed}");
    assert_eq!(installed["revision"], 1);
    let writes = cluster.helm_writes(mark);
    println!("install: {writes:?}");
    expect(
        &writes,
        &[
            "create secrets",
            "update secrets",
            "patch customresourcedefinitions",
            "patch clusterroles",
            "patch clusterrolebindings",
            "patch validatingadmissionpolicies",
            "patch deployments",
            "patch daemonsets",
            "patch serviceaccounts",
        ],
    );
    let deployment = cluster.get(&operator).expect("the operator Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let managers: Vec<&Value> = deployment["metadata"]["managedFields"]
        .as_array()
        .expect("managed fields")
        .iter()
        .map(|entry| &entry["operation"])
        .collect();
    assert_eq!(managers, [&Value::from("Apply")], "{deployment}");
    for role in CLUSTER_ROLES {
        assert!(cluster.get(&["clusterrole", role]).is_some(), "{role}");
    }
    assert!(cluster
        .get(&["apiservice", "v1.subresources.godwit.dev"])
        .is_some());
    assert!(cluster
        .get(&[
            "rolebinding",
            "godwit-operator-auth-reader",
            "-n",
            "kube-system"
        ])
        .is_some());
    assert!(cluster
        .get(&["clusterrolebinding", "godwit-metrics-reader"])
        .is_none());
    let record = cluster
        .get(&["secret", "sh.helm.release.v1.godwit.v1", "-n", NAMESPACE])
        .expect("the release record");
    assert_eq!(record["type"], "helm.sh/release.v1");

    // Upgrade: more replicas, a node selector, a metrics scraper binding.
    let mark = cluster.mark();
    let upgraded = cluster.helm(
        "upgrade",
        NAMESPACE,
        "godwit",
        &[
            "operator.replicas=3",
            "operator.nodeSelector.disk=ssd",
            "monitoring.scrapers[0].name=prometheus,monitoring.scrapers[0].namespace=monitoring",
        ],
    );
    assert_eq!(upgraded["revision"], 2, "{upgraded}");
    expect(
        &cluster.helm_writes(mark),
        &["create secrets", "update secrets", "patch deployments"],
    );
    let deployment = cluster.get(&operator).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["nodeSelector"]["disk"],
        "ssd"
    );
    let binding = cluster
        .get(&["clusterrolebinding", "godwit-metrics-reader"])
        .expect("the scrapers' binding");
    assert_eq!(binding["subjects"][0]["name"], "prometheus");

    // Rollback to revision 1: the upgrade's changes are gone, the node
    // selector (a field only the upgrade applied) and the binding included.
    let mark = cluster.mark();
    let rolled_back = cluster.helm("rollback", NAMESPACE, "godwit", &[]);
    assert_eq!(rolled_back["revision"], 3, "{rolled_back}");
    assert_eq!(rolled_back["status"], "deployed");
    expect(
        &cluster.helm_writes(mark),
        &["patch deployments", "delete clusterrolebindings"],
    );
    let deployment = cluster.get(&operator).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert!(
        deployment["spec"]["template"]["spec"]
            .get("nodeSelector")
            .is_none(),
        "{}",
        deployment["spec"]["template"]["spec"]
    );
    assert!(cluster
        .get(&["clusterrolebinding", "godwit-metrics-reader"])
        .is_none());

    // A second release: of the same name in another namespace it is refused,
    // naming what clashes; under another name it installs beside the first
    // (without the console's APIService, which is once per cluster).
    let refused = helm::release("install", &cluster.kubeconfig, "team-b", "godwit", &[])
        .expect_err("a second release named godwit");
    let message = refused.to_string();
    assert!(
        message.contains("ClusterRole godwit-operator already belongs to the release godwit in namespace godwit-system"),
        "{message}"
    );
    let second = cluster.helm(
        "install",
        "team-b",
        "godwit-b",
        &["operator.consoleApi.enabled=false"],
    );
    assert_eq!(second["status"], "deployed", "{second}");
    assert!(cluster.get(&["clusterrole", "godwit-b-operator"]).is_some());
    let first = cluster.get(&["clusterrole", "godwit-operator"]).unwrap();
    assert_eq!(
        first["metadata"]["annotations"]["meta.helm.sh/release-namespace"],
        NAMESPACE
    );

    // Uninstall: everything of the release is gone but the CRDs.
    let mark = cluster.mark();
    let uninstalled = cluster.helm("uninstall", NAMESPACE, "godwit", &[]);
    assert_eq!(uninstalled["status"], "uninstalled", "{uninstalled}");
    let writes = cluster.helm_writes(mark);
    println!("uninstall: {writes:?}");
    expect(
        &writes,
        &[
            "delete deployments",
            "delete daemonsets",
            "delete clusterroles",
            "delete validatingadmissionpolicies",
            "delete secrets",
        ],
    );
    assert!(!writes.contains("delete customresourcedefinitions"));
    for role in CLUSTER_ROLES {
        assert!(cluster.get(&["clusterrole", role]).is_none(), "{role}");
    }
    assert!(cluster
        .get(&["validatingadmissionpolicy", "godwit-node-restriction"])
        .is_none());
    // The cluster-scoped and kube-system objects go too: the console API's
    // APIService and the RoleBinding that lets it read the front proxy's CA.
    assert!(cluster
        .get(&["apiservice", "v1.subresources.godwit.dev"])
        .is_none());
    assert!(cluster
        .get(&[
            "rolebinding",
            "godwit-operator-auth-reader",
            "-n",
            "kube-system"
        ])
        .is_none());
    for kind in [
        "deployments",
        "daemonsets",
        "services",
        "serviceaccounts",
        "roles",
        "rolebindings",
        "poddisruptionbudgets",
        "secrets",
    ] {
        let left = cluster.names(&[kind, "-n", NAMESPACE]);
        assert!(left.is_empty(), "{kind} left in {NAMESPACE}: {left:?}");
    }
    let crds = cluster.names(&["customresourcedefinitions"]);
    for crd in [
        "virtualmachines.godwit.dev",
        "vmtemplates.godwit.dev",
        "clustervmtemplates.godwit.dev",
        "vmmigrations.godwit.dev",
        "godwitnodes.godwit.dev",
    ] {
        assert!(crds.contains(crd), "{crd} was removed: {crds:?}");
    }
    // The other release is untouched.
    assert!(cluster.get(&["clusterrole", "godwit-b-operator"]).is_some());
    cluster.helm("uninstall", "team-b", "godwit-b", &[]);
    assert!(cluster.get(&["clusterrole", "godwit-b-operator"]).is_none());
}
