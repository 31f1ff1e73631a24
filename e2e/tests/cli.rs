//! `kubectl godwit` as a user runs it, on a local cluster with the operator
//! and node agents: through real `kubectl` (the plugin directory on `PATH`),
//! a missing VM is a clear error, `migrate --follow` shows the progress and
//! the result table of a live migration, the operator's and the source node
//! daemon's `/metrics` count it with its bytes and downtime, and `console`
//! in a pseudo-terminal, through the API server (no node address), shows
//! the guest's output, sends it a command and detaches on Ctrl-].
//!
//! Needs the release binaries (`cargo build --release -p godwit-node
//! -p godwit-operator -p godwit-cli --bins`, as e2e/test.sh does), python3
//! (its `pty` module drives the console) and /dev/kvm.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use godwit_e2e::driver::{http_get, ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM, METRICS_SCRAPER};

/// `kubectl <args>` on the host with the plugin on PATH and the cluster's kubeconfig.
fn kubectl(g: &ClusterDriver, plugin_dir: &Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .env("PATH", path_with(plugin_dir))
        .env("KUBECONFIG", &g.cluster.kubeconfig)
        .output()
        .expect("run kubectl")
}

fn path_with(dir: &Path) -> OsString {
    let mut path = OsString::from(dir);
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    path
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// `GET path` over HTTP/1.0 from `addr`; the response body.
/// The value of the sample `name` (exact series text, labels included).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Runs `argv` in a pseudo-terminal: waits for `ready`, types `input`,
/// waits for `answer`, presses Ctrl-] and returns (exit status, everything shown).
const PTY_DRIVER: &str = r#"
import os, pty, sys, time, select
argv = sys.argv[4:]
ready, typed, answer = sys.argv[1].encode(), sys.argv[2].encode(), sys.argv[3].encode()
pid, fd = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)
seen = b""
def wait_for(token, limit):
    global seen
    end = time.time() + limit
    while token not in seen and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                return False
    return token in seen
ok = wait_for(ready, 30)
if ok:
    time.sleep(0.5)
    os.write(fd, typed)
    ok = wait_for(answer, 30)
os.write(fd, b"\x1d")
code = None
end = time.time() + 10
while code is None and time.time() < end:
    r, _, _ = select.select([fd], [], [], 0.1)
    if r:
        try:
            seen += os.read(fd, 4096)
        except OSError:
            pass
    p, status = os.waitpid(pid, os.WNOHANG)
    if p == pid:
        code = os.waitstatus_to_exitcode(status)
if code is None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
while True:
    r, _, _ = select.select([fd], [], [], 0.1)
    if not r:
        break
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        break
    if not chunk:
        break
    seen += chunk
sys.stdout.write(seen.decode("utf-8", "replace"))
sys.stdout.write("\nPTY-DRIVER ready=%s exit=%s\n" % (ok, code))
"#;

#[test]
fn kubectl_godwit_migrates_with_progress_attaches_the_console_and_counts_metrics() {
    let (_, plugin_dir) = godwit_e2e::driver::kubectl_plugin();
    let dir = std::env::temp_dir().join(format!("godwit-cli-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("local cluster with Godwit");

    // A VM that does not exist: a clear error that says what to do.
    let out = kubectl(&g, &plugin_dir, &["godwit", "migrate", "nope", "--follow"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(r#"VirtualMachine "nope" not found in namespace "default""#)
            && err.contains("kubectl get gvm"),
        "{err}"
    );

    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(EXAMPLE_VM)).unwrap();
    let vm = g.wait_running("demo", Duration::from_secs(90)).unwrap();
    let source = vm["status"]["nodeName"].as_str().unwrap().to_string();
    let target = g
        .cluster
        .fabric
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != source)
        .unwrap();

    // status, through kubectl.
    let out = kubectl(&g, &plugin_dir, &["godwit", "status", "demo"]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        shown.contains("Phase:            Running") && shown.contains(&source),
        "{shown}"
    );

    // console, in a pseudo-terminal, through the API server (the
    // aggregated API subresources.godwit.dev; the host reaches no node).
    let console = Command::new("python3")
        .args([
            "-c",
            PTY_DRIVER,
            "Escape character",
            "status\r",
            "STATUS hb=",
            "kubectl",
            "godwit",
            "console",
            "demo",
        ])
        .env("PATH", path_with(&plugin_dir))
        .env("KUBECONFIG", &g.cluster.kubeconfig)
        .output()
        .expect("run the pty driver");
    let seen = text(&console.stdout);
    assert!(
        seen.contains("Connected to VM default/demo on"),
        "{seen}\n{}",
        text(&console.stderr)
    );
    assert!(
        seen.contains("STATUS hb="),
        "the guest did not answer on the console: {seen}"
    );
    assert!(
        seen.contains("Console of default/demo: detached."),
        "{seen}"
    );
    assert!(seen.contains("PTY-DRIVER ready=True exit=0"), "{seen}");

    // migrate --follow, through kubectl; capped so the progress shows.
    let started = std::time::Instant::now();
    let out = kubectl(
        &g,
        &plugin_dir,
        &[
            "godwit",
            "migrate",
            "demo",
            "--to",
            &target,
            "--follow",
            "--bandwidth-mbps",
            "200",
        ],
    );
    let shown = text(&out.stdout);
    println!(
        "kubectl godwit migrate --follow ({:?}):\n{shown}",
        started.elapsed()
    );
    assert!(out.status.success(), "{shown}\n{}", text(&out.stderr));
    assert!(
        shown.contains(&format!("leaves {source} for {target}")),
        "{shown}"
    );
    let progress: Vec<&str> = shown.lines().filter(|l| l.starts_with('[')).collect();
    assert!(
        !progress.is_empty(),
        "no progress line while it ran:\n{shown}"
    );
    assert!(
        progress
            .iter()
            .any(|l| l.contains(" of ") && l.contains("round") && l.contains("ETA")),
        "{shown}"
    );
    for row in [
        "Phase     Succeeded",
        &format!("From      {source}"),
        &format!("To        {target}"),
        "Mode      ",
        "Downtime  ",
        "Bytes     ",
        "Rounds    ",
    ] {
        assert!(shown.contains(row), "missing {row:?} in\n{shown}");
    }
    let vm = g.get("gvm", "demo").unwrap().unwrap();
    assert_eq!(vm["status"]["nodeName"], target.as_str());
    let mig_name = shown
        .lines()
        .find_map(|l| l.strip_prefix("vmmigration/")?.split_whitespace().next())
        .unwrap()
        .to_string();
    let mig = g.get("gvmm", &mig_name).unwrap().unwrap();
    let bytes = mig["status"]["result"]["transferredBytes"]
        .as_u64()
        .unwrap();
    assert!(bytes > 0, "{mig}");

    // A second migrate of a VM that is not migratable says why: the same
    // target it is on now.
    let out = kubectl(
        &g,
        &plugin_dir,
        &["godwit", "migrate", "demo", "--to", &target],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already runs on"),
        "{err}"
    );

    // Metrics: the operator counted the migration; the source node daemon
    // recorded its bytes and downtime.
    // /metrics needs a token whose user RBAC allows it.
    let op = g.cluster.operator_metrics().unwrap().to_string();
    let (code, body) = http_get(&op, "/metrics", None).unwrap();
    assert_eq!(code, 401, "{body}");
    let (code, body) = http_get(&op, "/metrics", Some(METRICS_SCRAPER)).unwrap();
    assert_eq!(code, 403, "not bound yet: {body}");
    g.allow_metrics_scraper().unwrap();
    // A refusal is cached for 10 s (a binding takes effect within that).
    let scrape = |addr: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (code, body) = http_get(addr, "/metrics", Some(METRICS_SCRAPER)).unwrap();
            if code == 200 {
                return body;
            }
            assert!(
                code == 403 && std::time::Instant::now() < deadline,
                "{addr}: {code} {body}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let text_op = scrape(&op);
    assert_eq!(
        sample(&text_op, r#"godwit_migrations_total{result="Succeeded"}"#),
        Some(1.0),
        "{text_op}"
    );
    assert!(
        sample(
            &text_op,
            r#"godwit_operator_reconciles_total{controller="migration",result="ok"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text_op}"
    );
    let src = g.node_index(&source).unwrap();
    let node = &g.cluster.fabric.nodes[src];
    let addr = format!("{}:{}", node.ip, godwit_crds::contract::NODE_METRICS_PORT);
    let (code, body) = node
        .ns
        .run_in({
            let addr = addr.clone();
            move || http_get(&addr, "/metrics", Some("alice"))
        })
        .unwrap()
        .unwrap();
    assert_eq!(code, 403, "a user without RBAC: {body}");
    let text_node = node.ns.run_in(move || scrape(&addr)).unwrap();
    assert_eq!(
        sample(
            &text_node,
            r#"godwit_node_migrations_total{result="Succeeded"}"#
        ),
        Some(1.0),
        "{text_node}"
    );
    assert_eq!(
        sample(&text_node, "godwit_migration_transferred_bytes_sum"),
        Some(bytes as f64),
        "{text_node}"
    );
    assert_eq!(
        sample(&text_node, "godwit_migration_downtime_seconds_count"),
        Some(1.0),
        "{text_node}"
    );
    // The target node runs the VM now and reports its vCPU time and memory.
    let tgt = g.node_index(&target).unwrap();
    let node = &g.cluster.fabric.nodes[tgt];
    let addr = format!("{}:{}", node.ip, godwit_crds::contract::NODE_METRICS_PORT);
    let text_target = node.ns.run_in(move || scrape(&addr)).unwrap();
    assert!(
        sample(
            &text_target,
            r#"godwit_vm_memory_bytes{namespace="default",vm="demo"}"#
        ) == Some((256u64 << 20) as f64),
        "{text_target}"
    );
    assert!(
        text_target.contains(r#"godwit_vm_cpu_seconds_total{namespace="default",vm="demo"}"#),
        "{text_target}"
    );
    // Every metric the Grafana dashboard queries is served by someone.
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/godwit/dashboards/godwit.json"),
    )
    .unwrap();
    let served = format!("{text_op}{text_node}{text_target}");
    let names = regex::Regex::new(r"godwit_[a-z_]+").unwrap();
    let mut queried: Vec<&str> = names.find_iter(&dashboard).map(|m| m.as_str()).collect();
    queried.sort();
    queried.dedup();
    assert!(queried.len() > 10, "{queried:?}");
    for name in queried.iter().filter(|n| **n != "godwit_overview") {
        assert!(
            served.contains(&format!("\n{name}")) || served.contains(&format!(" {name} ")),
            "the dashboard queries {name}, which nobody serves"
        );
    }

    // restart: the VMM is replaced (a new process group) and the VM runs again.
    let pid_of = |g: &ClusterDriver| -> Option<String> {
        let vm = g.get("gvm", "demo").ok()??;
        let node = vm["status"]["nodeName"].as_str()?.to_string();
        let i = g.node_index(&node).ok()?;
        std::fs::read_to_string(g.vm_dir(i, "default", "demo").join("pid")).ok()
    };
    let before = pid_of(&g).expect("the VM's pid file");
    let out = kubectl(&g, &plugin_dir, &["godwit", "restart", "demo"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    g.wait(
        "the VM to run again with a new VMM",
        Duration::from_secs(90),
        || {
            let vm = g.get("gvm", "demo")?;
            let running = vm.is_some_and(|v| v["status"]["phase"] == "Running");
            Ok((running && pid_of(&g).is_some_and(|p| p != before)).then_some(()))
        },
    )
    .unwrap();

    // shutdown (stop's other name: the power button), then start.
    let out = kubectl(&g, &plugin_dir, &["godwit", "shutdown", "demo"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("the guest's power button is pressed"),
        "{}",
        text(&out.stdout)
    );
    g.wait("the VM to stop", Duration::from_secs(60), || {
        let vm = g.get("gvm", "demo")?;
        Ok(vm.filter(|v| v["status"]["phase"] == "Stopped").map(|_| ()))
    })
    .unwrap();
    let out = kubectl(&g, &plugin_dir, &["godwit", "migrate", "demo"]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("is not running")
            && err.contains("kubectl godwit start demo"),
        "{err}"
    );
    let out = kubectl(&g, &plugin_dir, &["godwit", "start", "demo"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    g.wait_running("demo", Duration::from_secs(90)).unwrap();
    drop(g);
}
