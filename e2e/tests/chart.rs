//! The Helm chart checked with real Helm (Helm's Go SDK inside the
//! helm-python-sdk package, driven by e2e/helm/chart.py): strict lint is
//! clean, it renders with the default values and with every knob moved
//! (e2e/helm/values/custom.yaml), the schema refuses each bad values file in
//! e2e/helm/values/bad-*.yaml naming the bad key, the rendered manifests
//! apply to the local test cluster with `kubectl`, and the kind script
//! (which cannot run here) parses and installs with values the chart takes;
//! two releases in two namespaces share no object name but the CRDs.

use std::path::PathBuf;

use godwit_apiserver::rbac::{Attributes, Rbac, UserInfo};
use godwit_e2e::cluster::LocalCluster;
use godwit_e2e::helm;
use serde_json::Value;

fn values(name: &str) -> PathBuf {
    helm::repo_root().join("e2e/helm/values").join(name)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn args(workload: &Value) -> Vec<String> {
    workload["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn lint_is_clean_with_default_and_custom_values() {
    for v in [
        None,
        Some(values("custom.yaml")),
        Some(values("monitoring.yaml")),
    ] {
        let report = helm::lint(v.as_deref()).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        println!("lint {v:?}: {report}");
    }
}

#[test]
fn renders_with_default_values() {
    let docs = helm::documents(&helm::render(None, "godwit-system").unwrap()).unwrap();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "DaemonSet",
        "Service",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in {kinds:?}");
    }
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "CustomResourceDefinition")
            .count(),
        5
    );

    let op = find(&docs, "Deployment", "godwit-operator");
    assert_eq!(op["spec"]["replicas"], 2);
    let pod = &op["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    let a = args(op);
    for flag in [
        "--cpu-allocation-ratio=10",
        "--reservation-image=registry.k8s.io/pause:3.9",
        "--finished-migrations-kept=5",
    ] {
        assert!(a.contains(&flag.to_string()), "{flag} not in {a:?}");
    }
    let a = args(op);
    assert!(
        a.contains(&"--lease-namespace=godwit-system".into()),
        "{a:?}"
    );
    assert!(a.contains(&"--placement=spread".into()), "{a:?}");

    let ds = find(&docs, "DaemonSet", "godwit-node");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    // VMMs outlive the container: host PID namespace, own cgroups on the
    // host's hierarchy.
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["nodeSelector"]["godwit.dev/vm-host"], "true");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    let a = args(ds);
    for flag in [
        "--cgroup-root=/sys/fs/cgroup",
        "--cgroup-parent=godwit.slice",
        "--vmm-memory-overhead-mib=128",
        "--metrics-addr=0.0.0.0:9411",
        "--image-dir=/var/lib/godwit/images",
        "--image-dir=/var/lib/godwit/kernels",
    ] {
        assert!(a.contains(&flag.to_string()), "{flag} not in {a:?}");
    }
    assert!(c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "cgroup" && m["mountPath"] == "/sys/fs/cgroup"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 9411);
    // Sized for the agent alone (VMMs are charged to their own cgroups).
    assert_eq!(c["resources"]["requests"]["memory"], "64Mi");
    assert_eq!(c["resources"]["limits"]["memory"], "256Mi");
    let env: Vec<(&str, &str)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?,
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?,
            ))
        })
        .collect();
    assert!(env.contains(&("NODE_NAME", "spec.nodeName")), "{env:?}");
    assert!(env.contains(&("NODE_IP", "status.hostIP")), "{env:?}");
    let paths: Vec<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    for p in [
        "/var/lib/godwit",
        "/var/lib/godwit-shared",
        "/dev/kvm",
        "/dev/net/tun",
        "/dev/userfaultfd",
        "/sys/fs/cgroup",
    ] {
        assert!(paths.contains(&p), "no hostPath {p} in {paths:?}");
    }

    // The operator: at most one replica evicted at a time, replicas spread
    // over nodes.
    let pdb = find(&docs, "PodDisruptionBudget", "godwit-operator");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "operator"
    );
    let anti = &op["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        anti["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );

    // No key material in the chart: the operator makes the CA's Secret.
    assert!(
        !docs.iter().any(|d| d["kind"] == "Secret"),
        "the chart renders a Secret"
    );
    let a = args(op);
    assert!(
        a.contains(&"--migration-ca-secret=godwit-migration-ca".to_string()),
        "{a:?}"
    );
}

/// GitOps tools render with `helm template` on every sync: the output must
/// be the same every time (no generated keys, no timestamps).
#[test]
fn rendering_twice_gives_identical_output() {
    for v in [
        None,
        Some(values("custom.yaml")),
        Some(values("monitoring.yaml")),
    ] {
        let first = helm::render(v.as_deref(), "godwit-system").unwrap();
        let second = helm::render(v.as_deref(), "godwit-system").unwrap();
        assert!(first == second, "{v:?}: two renders differ");
    }
}

/// Objects rendered without a namespace (cluster-scoped), CRDs aside, by
/// kind and name.
fn cluster_scoped(docs: &[Value]) -> Vec<(String, String)> {
    docs.iter()
        .filter(|d| d["metadata"].get("namespace").is_none())
        .filter(|d| d["kind"] != "CustomResourceDefinition")
        .map(|d| {
            let kind = d["kind"].as_str().unwrap().to_string();
            (kind, d["metadata"]["name"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Two releases in two namespaces share only the CRDs and the console's
/// APIService (once per cluster): every other cluster-scoped
/// object is named after its release, every namespaced one lives in its
/// release's namespace, and each release's bindings and policy point at its
/// own objects and service accounts. Each renders the same twice.
#[test]
fn two_releases_in_two_namespaces_do_not_collide() {
    let render = |namespace: &str, name: &str| {
        let first = helm::render_release(namespace, name, &[]).unwrap();
        let second = helm::render_release(namespace, name, &[]).unwrap();
        assert!(first == second, "{name}: two renders differ");
        helm::documents(&first).unwrap()
    };
    let a = render("team-a", "godwit");
    let b = render("team-b", "godwit-b");
    let (names_a, names_b) = (cluster_scoped(&a), cluster_scoped(&b));
    assert!(names_a.len() >= 8, "{names_a:?}");
    assert_eq!(names_a.len(), names_b.len());
    // The console's API group has one backend per cluster, so its
    // APIService is the one cluster-scoped name both render (a second
    // release sets operator.consoleApi.enabled=false).
    let shared: Vec<_> = names_a.iter().filter(|n| names_b.contains(n)).collect();
    assert_eq!(
        shared,
        [&(
            "APIService".to_string(),
            "v1.subresources.godwit.dev".to_string()
        )],
        "both releases make {shared:?}"
    );
    let without_console =
        helm::render_release("team-b", "godwit-b", &["operator.consoleApi.enabled=false"]).unwrap();
    assert!(!without_console.contains("kind: APIService"));
    // The default release keeps the names the docs and tests use.
    for (kind, name) in [
        ("ClusterRole", "godwit-operator"),
        ("ClusterRole", "godwit-edit"),
        ("ValidatingAdmissionPolicy", "godwit-node-restriction"),
    ] {
        find(&a, kind, name);
    }
    for (kind, name) in [
        ("ClusterRole", "godwit-b-operator"),
        ("ClusterRole", "godwit-b-edit"),
        ("ValidatingAdmissionPolicy", "godwit-b-node-restriction"),
    ] {
        find(&b, kind, name);
    }
    // Everything namespaced is in the release's namespace, but the binding
    // of the console API to the role that reads the front proxy's settings.
    for doc in b
        .iter()
        .filter(|d| d["metadata"].get("namespace").is_some())
    {
        if doc["metadata"]["name"] == "godwit-b-operator-auth-reader" {
            assert_eq!(doc["metadata"]["namespace"], "kube-system", "{doc}");
            continue;
        }
        assert_eq!(doc["metadata"]["namespace"], "team-b", "{doc}");
    }
    let binding = find(&b, "ClusterRoleBinding", "godwit-b-operator");
    assert_eq!(binding["roleRef"]["name"], "godwit-b-operator");
    assert_eq!(binding["subjects"][0]["namespace"], "team-b");
    let policy_binding = find(
        &b,
        "ValidatingAdmissionPolicyBinding",
        "godwit-b-node-restriction",
    );
    assert_eq!(
        policy_binding["spec"]["policyName"],
        "godwit-b-node-restriction"
    );
    let policy = find(&b, "ValidatingAdmissionPolicy", "godwit-b-node-restriction");
    assert!(
        policy["spec"]["matchConditions"][0]["expression"]
            .as_str()
            .unwrap()
            .contains("system:serviceaccount:team-b:godwit-node"),
        "{policy}"
    );
    // A release name without "godwit" gets it as a suffix.
    let other = render("team-c", "vms");
    find(&other, "Deployment", "vms-godwit-operator");
    // The CRDs are the one thing both releases render alike (once per cluster).
    let crds = |docs: &[Value]| -> Vec<Value> {
        docs.iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .cloned()
            .collect()
    };
    assert_eq!(crds(&a), crds(&b));
    assert_eq!(crds(&a).len(), 5);
}

/// PodSecurity: the namespace the chart renders (namespace.create) admits
/// the privileged node daemon; by default the chart renders none.
#[test]
fn a_rendered_namespace_is_labelled_privileged() {
    let docs = helm::documents(&helm::render(None, "godwit-system").unwrap()).unwrap();
    assert!(!docs.iter().any(|d| d["kind"] == "Namespace"));
    let rendered = helm::render_release("vm-hosts", "godwit", &["namespace.create=true"]).unwrap();
    let docs = helm::documents(&rendered).unwrap();
    let namespace = find(&docs, "Namespace", "vm-hosts");
    let labels = &namespace["metadata"]["labels"];
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "privileged");
    // Helm keeps it on uninstall: deleting it would delete the release's Secrets.
    assert_eq!(
        namespace["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
}

/// `helm test`: one Pod (a test hook) that explains the five CRDs and
/// asks the release's operator Service for /healthz.
#[test]
fn the_test_hook_checks_the_crds_and_the_operator() {
    let docs = helm::documents(&helm::render_release("team-b", "godwit-b", &[]).unwrap()).unwrap();
    let pod = find(&docs, "Pod", "godwit-b-test");
    assert_eq!(pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    let explained: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["command"][2].as_str().unwrap())
        .collect();
    assert_eq!(
        explained,
        [
            "virtualmachines.godwit.dev",
            "vmtemplates.godwit.dev",
            "clustervmtemplates.godwit.dev",
            "vmmigrations.godwit.dev",
            "godwitnodes.godwit.dev"
        ]
    );
    for crd in docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        let name = crd["metadata"]["name"].as_str().unwrap();
        assert!(explained.contains(&name), "{name} is not checked");
    }
    let script = pod["spec"]["containers"][0]["command"][2].as_str().unwrap();
    let service = find(&docs, "Service", "godwit-b-operator-metrics");
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert!(
        script.contains(&format!(
            "/dev/tcp/godwit-b-operator-metrics.team-b.svc/{port}"
        )) && script.contains("GET /healthz"),
        "{script}"
    );
}

/// The CA key stays with the operator: no node-daemon pod mounts a Secret
/// (the CA's or any other), none is told of a CA directory, every one asks
/// for its certificate through a CSR; the operator signs for the node
/// daemons' service account, with the RBAC Kubernetes demands of a signer.
#[test]
fn no_node_daemon_pod_mounts_the_ca_key() {
    for v in [
        None,
        Some(values("custom.yaml")),
        Some(values("monitoring.yaml")),
    ] {
        let rendered = helm::render(v.as_deref(), "godwit-system").unwrap();
        let docs = helm::documents(&rendered).unwrap();
        let ds = find(&docs, "DaemonSet", "godwit-node");
        let pod = &ds["spec"]["template"]["spec"];
        let volumes = pod["volumes"].as_array().unwrap();
        let secrets: Vec<&Value> = volumes
            .iter()
            .filter(|vol| {
                vol.get("secret").is_some()
                    || vol["projected"]["sources"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s.get("secret").is_some()))
            })
            .collect();
        assert!(secrets.is_empty(), "{v:?}: node-daemon mounts {secrets:?}");
        let a = args(ds);
        assert!(a.contains(&"--migration-csr".to_string()), "{v:?}: {a:?}");
        assert!(
            !a.iter().any(|f| f.starts_with("--migration-ca-dir")),
            "{v:?}: {a:?}"
        );
        let env = pod["containers"][0]["env"].as_array().unwrap();
        assert!(
            !env.iter().any(|e| e["name"] == "GODWIT_MIGRATION_CA_DIR"),
            "{v:?}"
        );

        let sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        let op = find(&docs, "Deployment", "godwit-operator");
        let node_user = format!("--node-user=system:serviceaccount:godwit-system:{sa}");
        assert!(args(op).contains(&node_user), "{v:?}: {:?}", args(op));
        let rbac = Rbac::from_objects(&docs);
        let user = |name: &str| {
            UserInfo::from_token(&format!("system:serviceaccount:godwit-system:{name}")).unwrap()
        };
        let op_sa = op["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        let can = |who: &str, verb: &str, resource: &str, sub: &str, name: &str| {
            let attrs = Attributes::Resource {
                namespace: String::new(),
                verb: verb.into(),
                group: "certificates.k8s.io".into(),
                resource: resource.into(),
                subresource: sub.into(),
                name: name.into(),
            };
            rbac.authorize(&user(who), &attrs).is_ok()
        };
        assert!(can(sa, "create", "certificatesigningrequests", "", ""));
        assert!(can(sa, "get", "certificatesigningrequests", "", "x"));
        assert!(!can(
            sa,
            "update",
            "certificatesigningrequests",
            "approval",
            "x"
        ));
        assert!(!can(sa, "approve", "signers", "", "godwit.dev/migration"));
        assert!(can(op_sa, "watch", "certificatesigningrequests", "", ""));
        assert!(can(
            op_sa,
            "update",
            "certificatesigningrequests",
            "approval",
            "x"
        ));
        assert!(can(
            op_sa,
            "update",
            "certificatesigningrequests",
            "status",
            "x"
        ));
        assert!(can(op_sa, "approve", "signers", "", "godwit.dev/migration"));
        assert!(can(op_sa, "sign", "signers", "", "godwit.dev/migration"));
        assert!(!can(
            op_sa,
            "sign",
            "signers",
            "",
            "kubernetes.io/kube-apiserver-client"
        ));
    }
}

#[test]
fn renders_with_custom_values() {
    let text = helm::render(Some(&values("custom.yaml")), "vms").unwrap();
    let docs = helm::documents(&text).unwrap();
    let op = find(&docs, "Deployment", "godwit-operator");
    assert_eq!(op["metadata"]["namespace"], "vms");
    assert_eq!(op["spec"]["replicas"], 3);
    let pod = &op["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "vm-operator");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example.com/godwit:v9.9.9"
    );
    let a = args(op);
    for flag in [
        "--lease-namespace=vms",
        "--metrics-addr=0.0.0.0:9090",
        "--placement=pack",
        "--reserve-percent=20",
        "--cpu-allocation-ratio=4",
        "--reservation-image=registry.example.com/pause:3.10",
        "--max-migrations-per-node=1",
        "--max-migrations-per-cluster=3",
    ] {
        assert!(a.contains(&flag.to_string()), "{flag} not in {a:?}");
    }

    let ds = find(&docs, "DaemonSet", "godwit-node");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["example.com/kvm"], "yes");
    assert!(pod["tolerations"].is_null(), "{}", pod["tolerations"]);
    let a = args(ds);
    for flag in [
        "--state-dir=/srv/godwit",
        "--shared-dir=/mnt/godwit-shared",
        "--lease-namespace=vms",
        "--lease-seconds=20",
        "--migration-ports=48000-48099",
        "--cpu=16",
        "--memory-mib=65536",
        "--image-dir=/srv/godwit/images",
        "--image-dir=/srv/vm-images",
    ] {
        assert!(a.contains(&flag.to_string()), "{flag} not in {a:?}");
    }
    // An image directory outside the state directory is the host's, read-only.
    let mounts = ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .clone();
    let images: Vec<&Value> = mounts
        .iter()
        .filter(|m| m["name"].as_str().is_some_and(|n| n.starts_with("images-")))
        .collect();
    assert_eq!(images.len(), 1, "{mounts:?}");
    assert_eq!(images[0]["mountPath"], "/srv/vm-images");
    assert_eq!(images[0]["readOnly"], true);
    assert!(pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["hostPath"]["path"] == "/srv/vm-images"));
    let a = args(op);
    assert!(
        a.contains(&"--migration-ca-secret=my-migration-ca".to_string()),
        "{a:?}"
    );
    let role = find(&docs, "Role", "godwit-operator");
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resourceNames"][0] == "my-migration-ca"),
        "{role}"
    );
    for binding in ["RoleBinding", "ClusterRoleBinding"] {
        for d in docs.iter().filter(|d| d["kind"] == binding) {
            let sa = d["subjects"][0]["name"].as_str().unwrap();
            assert!(sa == "vm-operator" || sa == "vm-node", "{d}");
            assert_eq!(d["subjects"][0]["namespace"], "vms");
        }
    }
}

#[test]
fn schema_refuses_bad_values_naming_the_key() {
    let dir = helm::repo_root().join("e2e/helm/values");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("bad-") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{name} lacks its `# expect:` line"));
        let err = helm::validate(&path).expect_err(&name).to_string();
        println!("{name}: {err}");
        assert!(err.contains(expect), "{name}: {err}");
        // Rendering refuses them too, as `helm install` does.
        assert!(
            helm::render(Some(&path), "godwit-system").is_err(),
            "{name}"
        );
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} bad values files");
    helm::validate(&values("custom.yaml")).unwrap();
}

#[test]
fn rendered_manifests_apply_to_the_local_cluster() {
    let dir = std::env::temp_dir().join(format!("godwit-chart-{}", std::process::id()));
    // Nothing runs the pods here (Godwit is not started); the objects are what
    // is checked.
    let cluster = LocalCluster::up(1, 1, 1024, &dir).expect("local cluster");
    let rendered = helm::render(None, "godwit-system").unwrap();
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, &rendered).unwrap();
    // The local cluster installed the CRDs already: apply updates them in place,
    // as a `kubectl apply` of a newer chart does.
    let out = cluster
        .kubectl(&["apply", "--server-side", "-f", file.to_str().unwrap()])
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let docs = helm::documents(&rendered).unwrap();
    assert_eq!(stdout.lines().count(), docs.len(), "{stdout}");
    for (kind, name) in [
        ("deployment", "godwit-operator"),
        ("daemonset", "godwit-node"),
        ("role", "godwit-node"),
        ("serviceaccount", "godwit-operator"),
    ] {
        let out = cluster
            .kubectl(&["-n", "godwit-system", "get", kind, name, "-o", "name"])
            .unwrap();
        assert!(out.status.success(), "{kind} {name}");
    }
    for (kind, name) in [
        ("clusterrole", "godwit-operator"),
        ("clusterrolebinding", "godwit-node"),
        ("crd", "virtualmachines.godwit.dev"),
    ] {
        let out = cluster.kubectl(&["get", kind, name, "-o", "name"]).unwrap();
        assert!(out.status.success(), "{kind} {name}");
    }
    cluster.down();
}

/// `e2e/kind/run.sh` needs Docker and kind, which this machine lacks: check
/// what can be checked here. It parses, its `helm install --set` values pass
/// the schema and select the image it loads, and the example files it applies
/// exist.
#[test]
fn kind_script_parses_and_its_values_render() {
    let script = helm::repo_root().join("e2e/kind/run.sh");
    let status = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(status.success(), "bash -n {}", script.display());
    let text = std::fs::read_to_string(&script).unwrap();
    let sets: Vec<String> = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--set")
        .map(|w| w[1].to_string())
        .collect();
    assert!(sets.len() >= 3, "{sets:?}");
    let docs =
        helm::documents(&helm::render_with_sets(None, "godwit-system", &sets).unwrap()).unwrap();
    for (kind, name) in [
        ("Deployment", "godwit-operator"),
        ("DaemonSet", "godwit-node"),
    ] {
        let c = &find(&docs, kind, name)["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "godwit:kind", "{kind}");
        assert_eq!(c["imagePullPolicy"], "Never", "{kind}");
    }
    assert!(text.contains("image=godwit:kind"));
    for example in [
        "examples/template.yaml",
        "examples/vm.yaml",
        "examples/migration.yaml",
    ] {
        assert!(text.contains(example), "{example} not applied");
        assert!(helm::repo_root().join(example).exists(), "{example}");
    }
    let config = helm::repo_root().join("e2e/kind/cluster.yaml");
    let docs = helm::documents(&std::fs::read_to_string(config).unwrap()).unwrap();
    let workers = docs[0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["role"] == "worker")
        .count();
    assert_eq!(workers, 2, "a migration needs two VM hosts");
}

/// The image is built here only from prebuilt binaries (e2e/podman/node-image.sh,
/// e2e/tests/agent_container.rs); check that the
/// Dockerfile builds exactly what the test suite builds and tests, ships the
/// three binaries, and runs as the non-root user the chart's operator expects.
#[test]
fn dockerfile_builds_what_the_tests_build() {
    let root = helm::repo_root();
    let test_sh = std::fs::read_to_string(root.join("e2e/test.sh")).unwrap();
    let build = test_sh
        .lines()
        .find(|l| l.starts_with("cargo build --release"))
        .expect("e2e/test.sh builds the binaries");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(build),
        "the Dockerfile does not run `{build}` as e2e/test.sh does"
    );
    for bin in ["godwit-operator", "godwit-node", "godwit-vmm"] {
        assert!(
            dockerfile.contains(&format!("target/release/{bin}")),
            "{bin} not in the image"
        );
    }
    assert!(dockerfile.contains("USER 65532:65532"));
    let docs = helm::documents(&helm::render(None, "godwit-system").unwrap()).unwrap();
    let op = find(&docs, "Deployment", "godwit-operator");
    assert_eq!(
        op["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
        65532
    );
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target/"),
        "target/ reaches the build context"
    );
}

/// Monitoring, when enabled: ServiceMonitors for both components, the
/// alerts, the dashboard as a ConfigMap with the sidecar's label; the node
/// daemons' metrics Service always. The aggregated roles give namespace
/// users VM rights through the default view, edit and admin roles, as
/// RBAC evaluates them with Kubernetes' aggregation.
#[test]
fn monitoring_and_aggregated_roles_render() {
    let docs = helm::documents(&helm::render(None, "godwit-system").unwrap()).unwrap();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert!(!kinds.contains(&kind), "{kind} rendered by default");
    }
    assert!(!docs
        .iter()
        .any(|d| d["metadata"]["name"] == "godwit-dashboard"));
    let svc = find(&docs, "Service", "godwit-node-metrics");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["port"], 9411);
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/component"],
        "node-daemon"
    );
    // Bound in a namespace to Kubernetes' view, edit or admin, a user reads
    // VMs (view) or also writes them (edit, admin); nowhere else.
    let mut with_defaults = docs.clone();
    with_defaults.extend(godwit_apiserver::rbac::kubernetes_user_roles());
    for (role, user) in [("view", "viewer"), ("edit", "editor"), ("admin", "boss")] {
        with_defaults.push(serde_json::json!({
            "kind": "RoleBinding",
            "metadata": {"name": user, "namespace": "team"},
            "roleRef": {"kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "User", "name": user}],
        }));
    }
    let rbac = Rbac::from_objects(&with_defaults);
    let vm = |namespace: &str, verb: &str| Attributes::Resource {
        namespace: namespace.into(),
        verb: verb.into(),
        group: "godwit.dev".into(),
        resource: "virtualmachines".into(),
        subresource: String::new(),
        name: String::new(),
    };
    for (user, writes) in [("viewer", false), ("editor", true), ("boss", true)] {
        let u = UserInfo::from_token(user).unwrap();
        assert!(rbac.authorize(&u, &vm("team", "list")).is_ok(), "{user}");
        assert_eq!(
            rbac.authorize(&u, &vm("team", "create")).is_ok(),
            writes,
            "{user}"
        );
        assert!(rbac.authorize(&u, &vm("other", "list")).is_err(), "{user}");
        // The serial console: edit and admin, not view.
        let console = Attributes::Resource {
            namespace: "team".into(),
            verb: "get".into(),
            group: "subresources.godwit.dev".into(),
            resource: "virtualmachines".into(),
            subresource: "console".into(),
            name: "demo".into(),
        };
        assert_eq!(
            rbac.authorize(&u, &console).is_ok(),
            writes,
            "{user} console"
        );
    }

    let docs =
        helm::documents(&helm::render(Some(&values("monitoring.yaml")), "mon").unwrap()).unwrap();
    for component in ["operator", "node-daemon"] {
        let sm = find(&docs, "ServiceMonitor", &format!("godwit-{component}"));
        assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
        assert_eq!(
            sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
            component
        );
        assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
        assert_eq!(
            sm["spec"]["endpoints"][0]["bearerTokenFile"],
            "/var/run/secrets/kubernetes.io/serviceaccount/token"
        );
        // The Service it selects exists, with the port it scrapes.
        let service = docs
            .iter()
            .find(|d| {
                d["kind"] == "Service"
                    && d["metadata"]["labels"]["app.kubernetes.io/component"] == component
                    && d["spec"]["ports"][0]["name"] == "metrics"
            })
            .unwrap_or_else(|| panic!("no metrics Service for {component}"));
        assert_eq!(
            service["spec"]["selector"]["app.kubernetes.io/component"],
            component
        );
    }
    // /metrics: the listed scraper may read it, as RBAC evaluates the
    // rendered roles; the daemons may ask the API server who a token is.
    let rbac = Rbac::from_objects(&docs);
    let metrics = Attributes::NonResource {
        path: "/metrics".into(),
        verb: "get".into(),
    };
    let sa = |ns: &str, name: &str| {
        UserInfo::from_token(&format!("system:serviceaccount:{ns}:{name}")).unwrap()
    };
    assert!(rbac
        .authorize(&sa("monitoring", "prometheus-k8s"), &metrics)
        .is_ok());
    assert!(rbac
        .authorize(&sa("monitoring", "other"), &metrics)
        .is_err());
    for daemon in ["godwit-operator", "godwit-node"] {
        for (group, resource) in [
            ("authentication.k8s.io", "tokenreviews"),
            ("authorization.k8s.io", "subjectaccessreviews"),
        ] {
            let create = Attributes::Resource {
                namespace: String::new(),
                verb: "create".into(),
                group: group.into(),
                resource: resource.into(),
                subresource: String::new(),
                name: String::new(),
            };
            assert!(
                rbac.authorize(&sa("mon", daemon), &create).is_ok(),
                "{daemon} cannot create {resource}"
            );
        }
    }
    let default = helm::documents(&helm::render(None, "godwit-system").unwrap()).unwrap();
    assert!(
        Rbac::from_objects(&default)
            .authorize(&sa("monitoring", "prometheus-k8s"), &metrics)
            .is_err(),
        "nobody reads /metrics unless bound"
    );
    find(&default, "ClusterRole", "godwit-metrics-reader");

    let rule = find(&docs, "PrometheusRule", "godwit");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(
        alerts,
        [
            "GodwitMigrationFailed",
            "GodwitNodeLost",
            "GodwitVMFailed",
            "GodwitVMRestartLoop"
        ]
    );
    // A VM restarting in a loop is named in its alert (Prometheus'
    // template, escaped from Helm's).
    let looping = &rule["spec"]["groups"][0]["rules"][3];
    assert_eq!(
        looping["expr"],
        "increase(godwit_vm_restarts_total[30m]) >= 3"
    );
    assert!(
        looping["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("{{ $labels.namespace }}/{{ $labels.name }}"),
        "{looping}"
    );
    let dash = find(&docs, "ConfigMap", "godwit-dashboard");
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(dash["data"]["godwit.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["title"], "Godwit");
}

/// The chart's ValidatingAdmissionPolicy, as the test API server evaluates
/// it: a node daemon changes only its own Node and GodwitNode, the VMs
/// labelled for its node and the migrations whose source or target it is; a token without a
/// node name changes nothing; other users are not its concern. Off with
/// `rbac.nodeRestriction=false`.
#[test]
fn node_restriction_lets_a_node_daemon_change_only_its_own() {
    use godwit_apiserver::admission_policy::{admit, AdmissionRequest};
    use serde_json::json;

    let docs = helm::documents(&helm::render(None, "godwit-system").unwrap()).unwrap();
    let policy = find(
        &docs,
        "ValidatingAdmissionPolicy",
        "godwit-node-restriction",
    )
    .clone();
    let binding = find(
        &docs,
        "ValidatingAdmissionPolicyBinding",
        "godwit-node-restriction",
    )
    .clone();
    let (policies, bindings) = ([policy], [binding]);
    let agent = "system:serviceaccount:godwit-system:godwit-node";
    let user = |name: &str, node: Option<&str>| {
        let extra = node.map_or(
            json!({}),
            |n| json!({"authentication.kubernetes.io/node-name": [n]}),
        );
        json!({"username": name, "groups": ["system:serviceaccounts"], "extra": extra})
    };
    let check = |who: Value, group: &str, resource: &str, sub: &str, object: &Value| {
        let name = object["metadata"]["name"].as_str().unwrap();
        admit(
            &policies,
            &bindings,
            &AdmissionRequest {
                operation: "UPDATE",
                group,
                version: "v1",
                resource,
                subresource: sub,
                namespace: "",
                name,
                user_info: who,
                object: Some(object),
                old_object: Some(object),
            },
        )
    };
    let node_a = json!({"metadata": {"name": "node-a"}});
    let node_b = json!({"metadata": {"name": "node-b"}});
    let vm_on =
        |node: &str| json!({"metadata": {"name": "vm", "labels": {"godwit.dev/node": node}}});
    let unlabelled = json!({"metadata": {"name": "vm"}});
    let migration = json!({"metadata": {"name": "m", "labels": {
        "godwit.dev/source-node": "node-a", "godwit.dev/target-node": "node-b"}}});
    let a = || user(agent, Some("node-a"));
    let c = || user(agent, Some("node-c"));

    assert_eq!(check(a(), "", "nodes", "", &node_a), Ok(()));
    let refused = check(a(), "", "nodes", "", &node_b).unwrap_err();
    assert!(
        refused.contains("may change only its own Node"),
        "{refused}"
    );
    assert_eq!(
        check(
            a(),
            "godwit.dev",
            "virtualmachines",
            "status",
            &vm_on("node-a")
        ),
        Ok(())
    );
    let refused = check(a(), "godwit.dev", "virtualmachines", "", &vm_on("node-b")).unwrap_err();
    assert!(
        refused.contains("only the VMs labelled for its node"),
        "{refused}"
    );
    assert!(check(a(), "godwit.dev", "virtualmachines", "", &unlabelled).is_err());
    assert_eq!(
        check(a(), "godwit.dev", "godwitnodes", "status", &node_a),
        Ok(())
    );
    let refused = check(a(), "godwit.dev", "godwitnodes", "status", &node_b).unwrap_err();
    assert!(
        refused.contains("only its own node's GodwitNode"),
        "{refused}"
    );
    for node in ["node-a", "node-b"] {
        let who = user(agent, Some(node));
        assert_eq!(
            check(who, "godwit.dev", "vmmigrations", "status", &migration),
            Ok(()),
            "{node}"
        );
    }
    let refused = check(c(), "godwit.dev", "vmmigrations", "status", &migration).unwrap_err();
    assert!(
        refused.contains("source or target is its node"),
        "{refused}"
    );
    let refused = check(user(agent, None), "", "nodes", "", &node_a).unwrap_err();
    assert!(refused.contains("names no node"), "{refused}");
    // The operator and people are left to RBAC.
    assert_eq!(
        check(
            user("system:serviceaccount:godwit-system:godwit-operator", None),
            "",
            "nodes",
            "",
            &node_b
        ),
        Ok(())
    );

    let off = helm::render_with_sets(
        None,
        "godwit-system",
        &["rbac.nodeRestriction=false".into()],
    )
    .unwrap();
    let docs = helm::documents(&off).unwrap();
    assert!(!docs
        .iter()
        .any(|d| d["kind"] == "ValidatingAdmissionPolicy"));
}
