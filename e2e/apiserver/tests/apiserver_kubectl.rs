//! `kubectl` round trips against the in-memory API test server: real
//! kubectl (on PATH) talks to a server started in this process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use godwit_apiserver::{ServerConfig, ServerThread};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A temp dir, a server and a kubeconfig; removed on drop.
struct Cluster {
    server: ServerThread,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn start() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "godwit-apiserver-kubectl-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let server = ServerThread::start("127.0.0.1:0".parse().unwrap(), ServerConfig::default())
            .expect("server starts");
        let kubeconfig = dir.join("kubeconfig");
        server
            .write_kubeconfig(&kubeconfig, "tester")
            .expect("kubeconfig");
        Self {
            server,
            dir,
            kubeconfig,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args)
            .env("HOME", &self.dir)
            .env_remove("KUBECONFIG");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("kubectl runs")
    }

    /// Runs kubectl, asserts success and a clean stderr, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {stderr}\n{}",
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(
            !stderr.contains("couldn't get") && !stderr.contains("discovery"),
            "kubectl {args:?} printed discovery errors: {stderr}"
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn apply_fixture(&self, name: &str) -> String {
        self.ok(&["apply", "-f", &fixture(name)])
    }

    fn with_widget(self) -> Self {
        self.apply_fixture("widget-crd.yaml");
        self.apply_fixture("widget.yaml");
        self
    }

    fn write(&self, name: &str, content: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, content).expect("write manifest");
        path.display().to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(name: &str) -> String {
    Path::new(FIXTURES).join(name).display().to_string()
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn apply_crd_then_get_as_table_yaml_and_jsonpath_and_describe() {
    let cluster = Cluster::start();
    let out = cluster.apply_fixture("widget-crd.yaml");
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/widgets.test.godwit.dev created"
        ),
        "{out}"
    );
    let out = cluster.apply_fixture("widget.yaml");
    assert!(out.contains("widget.test.godwit.dev/w1 created"), "{out}");

    let table = cluster.ok(&["get", "wd"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "CPU", "PHASE", "READY", "AGE"], "{table}");
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], ["w1", "2"], "{table}");

    let yaml = cluster.ok(&["get", "widgets.test.godwit.dev", "w1", "-o", "yaml"]);
    assert!(
        yaml.contains("runStrategy: Always"),
        "defaulted field missing: {yaml}"
    );
    assert!(yaml.contains("uid: "), "{yaml}");
    assert!(yaml.contains("generation: 1"), "{yaml}");

    let cpu = cluster.ok(&[
        "get",
        "widget",
        "w1",
        "-o",
        "jsonpath={.spec.cpu} {.metadata.labels.app}",
    ]);
    assert_eq!(cpu, "2 demo");

    let described = cluster.ok(&["describe", "wd", "w1"]);
    assert!(described.contains("Name:         w1"), "{described}");
    assert!(described.contains("Cpu:"), "{described}");

    let resources = cluster.ok(&["api-resources", "--api-group", "test.godwit.dev"]);
    assert!(
        resources.contains("widgets") && resources.contains("wd"),
        "{resources}"
    );
    let crds = cluster.ok(&["get", "crd"]);
    assert!(crds.contains("widgets.test.godwit.dev"), "{crds}");
    cluster.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.test.godwit.dev",
        "--timeout=5s",
    ]);
}

#[test]
fn patches_spec_and_status_subresource_and_labels() {
    let cluster = Cluster::start().with_widget();
    cluster.ok(&[
        "patch",
        "wd",
        "w1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"cpu":4}}"#,
    ]);
    cluster.ok(&[
        "patch",
        "wd",
        "w1",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/memory","value":"2Gi"}]"#,
    ]);
    let got = cluster.ok(&[
        "get",
        "wd",
        "w1",
        "-o",
        "jsonpath={.spec.cpu} {.spec.memory} {.metadata.generation}",
    ]);
    assert_eq!(got, "4 2Gi 3");

    // Status through the main resource is ignored; through /status it lands
    // without bumping the generation.
    cluster.ok(&[
        "patch",
        "wd",
        "w1",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Ignored"}}"#,
    ]);
    assert_eq!(
        cluster.ok(&["get", "wd", "w1", "-o", "jsonpath={.status.phase}"]),
        ""
    );
    cluster.ok(&[
        "patch",
        "wd",
        "w1",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"phase":"Running"}}"#,
    ]);
    let got = cluster.ok(&[
        "get",
        "wd",
        "w1",
        "-o",
        "jsonpath={.status.phase} {.metadata.generation}",
    ]);
    assert_eq!(got, "Running 3");
    let table = cluster.ok(&["get", "wd"]);
    assert!(table.lines().nth(1).unwrap().contains("Running"), "{table}");

    cluster.ok(&["label", "wd", "w1", "tier=web"]);
    assert_eq!(
        cluster
            .ok(&["get", "wd", "-l", "tier=web", "-o", "name"])
            .trim(),
        "widget.test.godwit.dev/w1"
    );
    assert_eq!(
        cluster
            .ok(&["get", "wd", "-l", "tier notin (web)", "-o", "name"])
            .trim(),
        ""
    );
    assert_eq!(
        cluster
            .ok(&[
                "get",
                "wd",
                "--field-selector",
                "metadata.name=w1",
                "-o",
                "name"
            ])
            .trim(),
        "widget.test.godwit.dev/w1"
    );

    // Re-applying the same manifest server-side changes nothing.
    cluster.ok(&["apply", "--server-side", "-f", &fixture("widget.yaml")]);
    let before = cluster.ok(&[
        "get",
        "wd",
        "w1",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    cluster.ok(&["apply", "--server-side", "-f", &fixture("widget.yaml")]);
    let after = cluster.ok(&[
        "get",
        "wd",
        "w1",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    assert_eq!(before, after);

    // Re-applying a changed manifest updates the object.
    let manifest = std::fs::read_to_string(fixture("widget.yaml"))
        .unwrap()
        .replace("cpu: 2", "cpu: 8");
    let path = cluster.write("widget-8.yaml", &manifest);
    let out = cluster.ok(&["apply", "-f", &path]);
    assert!(out.contains("configured"), "{out}");
    assert_eq!(
        cluster.ok(&["get", "wd", "w1", "-o", "jsonpath={.spec.cpu}"]),
        "8"
    );
}

#[test]
fn wait_for_condition_set_from_another_thread() {
    let cluster = Cluster::start().with_widget();
    let waiter = cluster
        .command(&[
            "wait",
            "--for=condition=Ready",
            "widget/w1",
            "--timeout=20s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl wait starts");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(700));
            cluster.ok(&[
                "patch", "wd", "w1", "--subresource", "status", "--type", "merge", "-p",
                r#"{"status":{"conditions":[{"type":"Ready","status":"True","reason":"Booted","message":"up","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#,
            ]);
        });
    });
    let output = waiter.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("condition met"));
}

#[test]
fn delete_with_finalizer_waits_for_its_removal() {
    let cluster = Cluster::start().with_widget();
    cluster.ok(&[
        "patch",
        "wd",
        "w1",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":["test.godwit.dev/hold"]}}"#,
    ]);
    let out = cluster.ok(&["delete", "wd", "w1", "--wait=false"]);
    assert!(out.contains("deleted"), "{out}");
    let stamp = cluster.ok(&[
        "get",
        "wd",
        "w1",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(stamp.ends_with('Z'), "deletionTimestamp missing: {stamp:?}");
    cluster.ok(&[
        "patch",
        "wd",
        "w1",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let output = cluster.run(&["get", "wd", "w1"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("NotFound"));

    // Without finalizers, delete removes at once.
    cluster.apply_fixture("widget.yaml");
    cluster.ok(&["delete", "-f", &fixture("widget.yaml")]);
    assert!(cluster.ok(&["get", "wd", "-o", "name"]).trim().is_empty());
}

#[test]
fn get_watch_streams_changes() {
    let cluster = Cluster::start().with_widget();
    let mut watcher = cluster
        .command(&["get", "wd", "--watch", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get --watch starts");
    let stdout = watcher.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let next_line = || {
        lines_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a watch line")
    };
    while !seen.iter().any(|l: &String| l.contains("ADDED")) {
        seen.push(next_line());
    }
    cluster.ok(&[
        "patch",
        "wd",
        "w1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"cpu":7}}"#,
    ]);
    while !seen
        .iter()
        .any(|l| l.starts_with("MODIFIED") && l.split_whitespace().nth(2) == Some("7"))
    {
        seen.push(next_line());
    }
    cluster.ok(&["delete", "wd", "w1"]);
    while !seen.iter().any(|l| l.contains("DELETED")) {
        seen.push(next_line());
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    let kinds: Vec<&str> = seen
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| *w != "EVENT")
        .collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"], "{seen:?}");
}

#[test]
fn invalid_resources_are_rejected_with_the_field_named() {
    let cluster = Cluster::start().with_widget();
    let output = cluster.run(&["apply", "-f", &fixture("widget-invalid.yaml")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(r#"The Widget "bad" is invalid: spec.cpu: Invalid value: 0: spec.cpu in body should be greater than or equal to 1"#),
        "{stderr}"
    );

    let bad_enum = cluster.write(
        "bad-enum.yaml",
        "apiVersion: test.godwit.dev/v1\nkind: Widget\nmetadata:\n  name: e\nspec:\n  cpu: 1\n  runStrategy: Sometimes\n",
    );
    let stderr =
        String::from_utf8_lossy(&cluster.run(&["apply", "-f", &bad_enum]).stderr).into_owned();
    assert!(
        stderr.contains("spec.runStrategy: Unsupported value: \"Sometimes\""),
        "{stderr}"
    );

    let unknown = cluster.write(
        "unknown.yaml",
        "apiVersion: test.godwit.dev/v1\nkind: Widget\nmetadata:\n  name: u\nspec:\n  cpu: 1\n  colour: red\n",
    );
    let stderr =
        String::from_utf8_lossy(&cluster.run(&["apply", "-f", &unknown]).stderr).into_owned();
    assert!(stderr.contains("unknown field \"spec.colour\""), "{stderr}");

    let output = cluster.run(&[
        "patch",
        "wd",
        "w1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"image":"other"}}"#,
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("spec.image: Invalid value: \"string\": image is immutable"),
        "{stderr}"
    );
    assert_eq!(
        cluster.ok(&["get", "wd", "w1", "-o", "jsonpath={.spec.image}"]),
        "base"
    );
}

#[test]
fn built_in_kinds_generate_name_and_cascading_delete() {
    let cluster = Cluster::start().with_widget();
    // Typed kubectl commands send protobuf bodies.
    cluster.ok(&["create", "namespace", "vms"]);
    let namespaces = cluster.ok(&["get", "ns"]);
    assert!(
        namespaces.contains("vms") && namespaces.contains("Active"),
        "{namespaces}"
    );
    cluster.ok(&[
        "create",
        "configmap",
        "settings",
        "-n",
        "vms",
        "--from-literal",
        "a=1",
    ]);
    assert_eq!(
        cluster.ok(&[
            "get",
            "cm",
            "settings",
            "-n",
            "vms",
            "-o",
            "jsonpath={.data.a}"
        ]),
        "1"
    );
    cluster.ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal",
        "user=admin",
    ]);
    assert_eq!(
        cluster.ok(&["get", "secret", "creds", "-o", "jsonpath={.data.user}"]),
        "YWRtaW4="
    );
    let secret = cluster.write(
        "secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: plain\nstringData:\n  user: admin\n",
    );
    cluster.ok(&["apply", "-f", &secret]);
    assert_eq!(
        cluster.ok(&["get", "secret", "plain", "-o", "jsonpath={.data.user}"]),
        "YWRtaW4="
    );
    let nodes = cluster.run(&["get", "nodes"]);
    assert!(nodes.status.success());
    assert!(String::from_utf8_lossy(&nodes.stderr).contains("No resources found"));
    let node = cluster.write(
        "node.yaml",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\nstatus:\n  conditions:\n  - type: Ready\n    status: \"True\"\n",
    );
    cluster.ok(&["apply", "-f", &node]);
    cluster.ok(&["cordon", "node-1"]);
    let nodes = cluster.ok(&["get", "no"]);
    let row: Vec<&str> = nodes.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], ["node-1", "Ready,SchedulingDisabled"], "{nodes}");

    let generated = cluster.write(
        "generated.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  generateName: gen-\n  namespace: vms\n",
    );
    let out = cluster.ok(&["create", "-f", &generated, "-o", "name"]);
    assert!(
        out.trim().starts_with("configmap/gen-") && out.trim().len() == "configmap/gen-".len() + 5,
        "{out}"
    );

    // A ConfigMap owned by the widget goes away with it.
    let uid = cluster.ok(&["get", "wd", "w1", "-o", "jsonpath={.metadata.uid}"]);
    let owned = cluster.write(
        "owned.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: owned\n  ownerReferences:\n  - apiVersion: test.godwit.dev/v1\n    kind: Widget\n    name: w1\n    uid: {uid}\ndata:\n  x: y\n"
        ),
    );
    cluster.ok(&["apply", "-f", &owned]);
    cluster.ok(&["delete", "wd", "w1"]);
    eventually("the owned ConfigMap to be collected", || {
        !cluster.run(&["get", "cm", "owned"]).status.success()
    });

    // kubectl's requests are in the request log under the kubeconfig's user.
    let requests = cluster.server.requests();
    assert!(requests.iter().any(|r| r.user == "tester"
        && r.verb == "create"
        && r.resource == "namespaces"
        && r.code == 201));

    // Deleting the namespace deletes its contents.
    cluster.ok(&["delete", "ns", "vms"]);
    // What is left is the front proxy's ConfigMap in kube-system, which
    // the server publishes for aggregated API servers.
    assert_eq!(
        cluster.ok(&["get", "cm", "-A", "-o", "name"]).trim(),
        "configmap/extension-apiserver-authentication"
    );
}

#[test]
fn godwit_crds_examples_and_invalid_manifests() {
    let cluster = Cluster::start();
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let crds = repo.join("crds");
    let out = cluster.ok(&["apply", "-f", &crds.display().to_string()]);
    assert_eq!(out.matches("created").count(), 5, "{out}");
    let out = cluster.ok(&["apply", "-f", &repo.join("examples").display().to_string()]);
    assert!(
        out.contains("virtualmachine.godwit.dev/demo created"),
        "{out}"
    );

    let table = cluster.ok(&["get", "gvm"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "READY", "NODE", "IP", "CPU", "MEMORY", "AGE"],
        "{table}"
    );
    assert!(
        table.lines().nth(1).unwrap().starts_with("demo "),
        "{table}"
    );
    let explained = cluster.ok(&["explain", "gvm.spec.runStrategy"]);
    assert!(explained.contains("RerunOnFailure"), "{explained}");
    // The fields of issue 24: template status, conditions keyed on type,
    // the per-node resource and the cluster-scoped template.
    for (path, says) in [
        ("gvmt.status.imageDigest", "imageDigest"),
        ("gvmt.status.cachedNodes", "cachedNodes"),
        ("gvm.status.conditions", "lastTransitionTime"),
        ("gnode.status.capacity", "memory"),
        ("gnode.status.usage", "cpuMillis"),
        ("gcvmt.spec.image", "source"),
    ] {
        let explained = cluster.ok(&["explain", path]);
        assert!(explained.contains(says), "explain {path}: {explained}");
    }
    // examples/: the test guest's template and the fromImage one; one migration.
    for (short, names) in [
        (
            "gvmt",
            &[
                "vmtemplate.godwit.dev/debian-12",
                "vmtemplate.godwit.dev/testguest",
            ][..],
        ),
        ("gvmm", &["vmmigration.godwit.dev/demo-move"][..]),
    ] {
        let listed = cluster.ok(&["get", short, "-o", "name"]);
        assert_eq!(
            listed.lines().collect::<Vec<_>>(),
            names,
            "{short}: {listed}"
        );
    }

    // The migration spec is immutable (CEL transition rule).
    let output = cluster.run(&[
        "patch",
        "gvmm",
        "demo-move",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"vmName":"other"}}"#,
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is invalid: spec"));

    let mut rejected = 0;
    for entry in std::fs::read_dir(crds.join("tests/invalid")).unwrap() {
        let path = entry.unwrap().path();
        let output = cluster.run(&["apply", "-f", &path.display().to_string()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{} was accepted", path.display());
        assert!(
            stderr.contains("is invalid: spec") || stderr.contains("unknown field \"spec."),
            "{}: {stderr}",
            path.display()
        );
        // Each file's first line names what kubectl must show the user.
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks its `# expect:` line", path.display()));
        assert!(
            stderr.contains(expect),
            "{}: expected {expect:?} in {stderr}",
            path.display()
        );
        rejected += 1;
    }
    assert!(rejected >= 20, "only {rejected} bad manifests");
}

#[test]
fn recorder_style_events_show_in_describe() {
    let cluster = Cluster::start().with_widget();
    let uid = cluster.ok(&["get", "wd", "w1", "-o", "jsonpath={.metadata.uid}"]);
    let event = cluster.write(
        "event.yaml",
        &format!(
            "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata:\n  name: w1.provisioned\n  namespace: default\neventTime: \"2026-01-01T00:00:00.000000Z\"\nreportingController: godwit-operator\nreportingInstance: godwit-operator-0\naction: Provision\nreason: Provisioned\ntype: Normal\nnote: root disk ready\nregarding:\n  apiVersion: test.godwit.dev/v1\n  kind: Widget\n  name: w1\n  namespace: default\n  uid: {uid}\n"
        ),
    );
    cluster.ok(&["create", "-f", &event]);
    let described = cluster.ok(&["describe", "wd", "w1"]);
    let events = described.split("Events:").nth(1).unwrap_or_default();
    assert!(
        events.contains("Provisioned") && events.contains("root disk ready"),
        "{described}"
    );
    let core = cluster.ok(&[
        "get",
        "events.v1.",
        "-o",
        "jsonpath={.items[0].message} {.items[0].involvedObject.name}",
    ]);
    assert_eq!(core, "root disk ready w1");
}

#[test]
fn deployment_kinds_apply_idempotently() {
    let cluster = Cluster::start();
    let out = cluster.apply_fixture("deploy-kinds.yaml");
    assert_eq!(out.matches(" created").count(), 6, "{out}");
    let out = cluster.apply_fixture("deploy-kinds.yaml");
    assert_eq!(out.matches(" unchanged").count(), 6, "{out}");
    let bindings = cluster.ok(&["get", "clusterrolebinding", "godwit-operator"]);
    assert!(
        bindings.lines().nth(1).unwrap().contains("godwit-operator"),
        "{bindings}"
    );
    let deployments = cluster.ok(&["get", "deploy", "-n", "godwit-system", "-o", "name"]);
    assert_eq!(deployments.trim(), "deployment.apps/godwit-operator");
}

#[test]
fn pods_are_admitted_by_resource_quota_and_listed_with_budgets() {
    let cluster = Cluster::start();
    cluster.ok(&["create", "namespace", "quota"]);
    let quota = cluster.write(
        "quota.yaml",
        "apiVersion: v1\nkind: ResourceQuota\nmetadata:\n  name: one-vm\n  namespace: quota\nspec:\n  hard:\n    requests.memory: 256Mi\n    pods: \"5\"\n",
    );
    cluster.ok(&["apply", "-f", &quota]);
    let pod = |name: &str| {
        cluster.write(
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: quota\n  labels:\n    app: vm\nspec:\n  nodeName: node-1\n  containers:\n  - name: reserve\n    image: registry.k8s.io/pause:3.9\n    resources:\n      requests:\n        cpu: 100m\n        memory: 192Mi\n      limits:\n        memory: 192Mi\n"
            ),
        )
    };
    cluster.ok(&["apply", "-f", &pod("first")]);
    let refused = cluster.run(&["apply", "-f", &pod("second")]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("is forbidden: exceeded quota: one-vm, requested: requests.memory=192Mi, used: requests.memory=192Mi, limited: requests.memory=256Mi"),
        "{stderr}"
    );
    let pods = cluster.ok(&["get", "pods", "-n", "quota"]);
    assert!(
        pods.contains("first") && pods.contains("Running") && pods.contains("node-1"),
        "{pods}"
    );
    assert!(!pods.contains("second"), "{pods}");
    let described = cluster.ok(&["describe", "pod", "first", "-n", "quota"]);
    assert!(
        described.contains("node-1") && described.contains("pause:3.9"),
        "{described}"
    );
    let used = cluster.ok(&[
        "get",
        "quota",
        "one-vm",
        "-n",
        "quota",
        "-o",
        "jsonpath={.status.used.requests\\.memory} {.status.used.pods}",
    ]);
    assert_eq!(used, "192Mi 1");
    let described = cluster.ok(&["describe", "resourcequota", "one-vm", "-n", "quota"]);
    assert!(described.contains("requests.memory"), "{described}");

    let budget = cluster.write(
        "pdb.yaml",
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: vm\n  namespace: quota\nspec:\n  minAvailable: 1\n  selector:\n    matchLabels:\n      app: vm\n",
    );
    cluster.ok(&["apply", "-f", &budget]);
    let budgets = cluster.ok(&["get", "pdb", "-n", "quota"]);
    assert!(budgets.contains("vm") && budgets.contains('1'), "{budgets}");

    // Room again once the first pod is gone; the quota's status follows.
    cluster.ok(&["delete", "pod", "first", "-n", "quota"]);
    cluster.ok(&["apply", "-f", &pod("second")]);
    let used = cluster.ok(&[
        "get",
        "quota",
        "one-vm",
        "-n",
        "quota",
        "-o",
        "jsonpath={.status.used.pods}",
    ]);
    assert_eq!(used, "1");
}
