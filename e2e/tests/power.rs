//! Graceful stop and guest reset through the cluster, on one node of a
//! local cluster with the operator and the node agent, driven with
//! `kubectl godwit` as a user drives it. Three VMs boot the test guest:
//!
//! - `polite` handles the ACPI power button: `kubectl godwit stop` makes the
//!   agent press it, the guest writes S5 (its console's last line says
//!   `POWER button: powering off`) and the VMM exits 0 well within the
//!   grace period (the time is printed);
//! - `deaf` ignores the button (`pwrbtn=ignore`) and has
//!   `terminationGracePeriodSeconds: 3`: the VMM forces the stop after
//!   3 s (`vmm.log`: "did not power off within 3s");
//! - `rebooter` (`runStrategy: Manual`) resets itself (console command
//!   `reset`): the VMM exits 100, the agent reports it Stopped with reason
//!   `GuestReset` (and an Event), and the operator starts it again; its
//!   runStrategy stays Manual. Then `kubectl godwit stop --force` stops it
//!   at once without the button.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node
//! -p godwit-operator -p godwit-cli --bins`, as e2e/test.sh does), the test
//! guest (e2e/testguest/build.sh) and /dev/kvm.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use godwit_e2e::driver::{console_has, type_at, ClusterDriver};
use serde_json::Value;

/// A template and a VM of the test guest, with no NIC: `extra` goes into the
/// VM's spec.
fn manifest(g: &ClusterDriver, name: &str, cmdline: &str, extra: &str) -> String {
    g.example(&format!(
        r#"apiVersion: godwit.dev/v1alpha1
kind: VMTemplate
metadata:
  name: {name}
  namespace: default
spec:
  image:
    source: /var/lib/godwit/images/testguest-root.raw
    format: raw
  boot:
    kernel: /var/lib/godwit/kernels/godwit-testguest.elf
    cmdline: {cmdline}
  cpu: 1
  memory: 128Mi
---
apiVersion: godwit.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
  namespace: default
spec:
  templateRef:
    name: {name}
  disks:
    - name: root
      source:
        template: {{}}
      storage: Shared
{extra}"#
    ))
}

/// `kubectl <args>` with the plugin on PATH and the cluster's kubeconfig.
fn kubectl_plugin(g: &ClusterDriver, plugin_dir: &Path, args: &[&str]) -> Output {
    let mut path = OsString::from(plugin_dir);
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let out = Command::new("kubectl")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", &g.cluster.kubeconfig)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn pid_of(vm_dir: &Path) -> Option<i32> {
    read(&vm_dir.join("pid")).trim().parse().ok()
}

/// The reasons and messages of the Events about VM `name`.
fn events(g: &ClusterDriver, name: &str) -> Vec<(String, String)> {
    let text = g
        .kubectl(&["get", "events", "-n", "default", "-o", "json"], None)
        .unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["name"] == name)
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_string(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn has_event(g: &ClusterDriver, name: &str, reason: &str) -> Option<String> {
    events(g, name)
        .into_iter()
        .find(|(r, _)| r == reason)
        .map(|(_, m)| m)
}

/// Waits until the guest in `vm_dir` beats on its console (it watches the
/// power button from then on).
fn wait_guest(g: &ClusterDriver, vm_dir: &Path) {
    g.wait(
        &format!("the guest of {} to beat", vm_dir.display()),
        Duration::from_secs(30),
        || Ok(console_has(vm_dir, "HB ").then_some(())),
    )
    .unwrap();
}

/// Waits until the VMM in `vm_dir` has exited; returns its exit status.
fn wait_exit(g: &ClusterDriver, vm_dir: &Path, timeout: Duration) -> i32 {
    g.wait(
        &format!("the VMM of {} to exit", vm_dir.display()),
        timeout,
        || Ok(read(&vm_dir.join("exit")).trim().parse::<i32>().ok()),
    )
    .unwrap()
}

fn wait_phase(g: &ClusterDriver, name: &str, phase: &str) -> Value {
    g.wait(
        &format!("VM {name} to be {phase}"),
        Duration::from_secs(30),
        || {
            Ok(g.get("gvm", name)?
                .filter(|v| v["status"]["phase"] == phase))
        },
    )
    .unwrap()
}

fn ready_reason(vm: &Value) -> String {
    vm["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .and_then(|c| c["reason"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn stop_presses_the_power_button_forces_a_deaf_guest_and_a_guest_reset_restarts() {
    let (_, plugin_dir) = godwit_e2e::driver::kubectl_plugin();
    let dir = std::env::temp_dir().join(format!("godwit-power-{}", std::process::id()));
    let g = ClusterDriver::up(1, &dir).expect("local cluster with Godwit");

    g.apply(&manifest(
        &g,
        "polite",
        "hb_ms=100",
        "  runStrategy: Always\n",
    ))
    .unwrap();
    g.apply(&manifest(
        &g,
        "deaf",
        "hb_ms=100 pwrbtn=ignore",
        "  runStrategy: Always\n  terminationGracePeriodSeconds: 3\n",
    ))
    .unwrap();
    g.apply(&manifest(
        &g,
        "rebooter",
        "hb_ms=100",
        "  runStrategy: Manual\n",
    ))
    .unwrap();
    let dirs: Vec<PathBuf> = ["polite", "deaf", "rebooter"]
        .iter()
        .map(|name| {
            g.wait_running(name, Duration::from_secs(90)).unwrap();
            let d = g.vm_dir(0, "default", name);
            wait_guest(&g, &d);
            d
        })
        .collect();
    let (polite, deaf, rebooter) = (&dirs[0], &dirs[1], &dirs[2]);

    // The polite guest powers off on the button, well within its 30 s.
    let t0 = Instant::now();
    let out = kubectl_plugin(&g, &plugin_dir, &["godwit", "stop", "polite"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("power button") && said.contains("30s"),
        "{said}"
    );
    let status = wait_exit(&g, polite, Duration::from_secs(30));
    let polite_took = t0.elapsed();
    println!("polite guest: stop to VMM exit in {polite_took:?} (grace 30 s)");
    assert_eq!(status, 0, "vmm.log: {}", read(&polite.join("vmm.log")));
    let console = read(&polite.join("console.log"));
    let last = console.lines().rev().find(|l| !l.trim().is_empty());
    assert_eq!(
        last.map(str::trim),
        Some("POWER button: powering off"),
        "the guest's last console lines: {:?}",
        console.lines().rev().take(5).collect::<Vec<_>>()
    );
    assert!(
        read(&polite.join("vmm.log")).contains("guest powered off (ACPI S5)"),
        "{}",
        read(&polite.join("vmm.log"))
    );
    let vm = wait_phase(&g, "polite", "Stopped");
    assert_eq!(ready_reason(&vm), "Stopped", "{vm}");
    let pressed = has_event(&g, "polite", "ShuttingDown").expect("a ShuttingDown event");
    assert!(pressed.contains("power button"), "{pressed}");
    assert!(
        has_event(&g, "polite", "ForcedStop").is_none(),
        "{:?}",
        events(&g, "polite")
    );

    // The deaf guest is stopped by force when its 3 s are over.
    let t0 = Instant::now();
    kubectl_plugin(&g, &plugin_dir, &["godwit", "stop", "deaf"]);
    wait_exit(&g, deaf, Duration::from_secs(20));
    let deaf_took = t0.elapsed();
    println!("deaf guest: stop to VMM exit in {deaf_took:?} (grace 3 s)");
    assert!(
        deaf_took >= Duration::from_secs(3),
        "forced before the grace was over: {deaf_took:?}"
    );
    // The VMM forces it at 3 s; the agent's own backstop would come 5 s
    // later; the agent's pass adds up to a second before the press.
    assert!(
        deaf_took < Duration::from_secs(8),
        "forced late: {deaf_took:?}"
    );
    let log = read(&deaf.join("vmm.log"));
    assert!(log.contains("did not power off within 3s"), "{log}");
    assert!(console_has(deaf, "POWER button: ignored"));
    let vm = wait_phase(&g, "deaf", "Stopped");
    assert_eq!(ready_reason(&vm), "Stopped", "{vm}");

    // The rebooter resets itself: Stopped with reason GuestReset, then
    // started again though its runStrategy is Manual.
    let before = pid_of(rebooter).unwrap();
    let watch = g.watch("gvm", "rebooter").unwrap();
    type_at(rebooter, "reset").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let reset = loop {
        assert!(
            Instant::now() < deadline,
            "no Stopped/GuestReset status seen"
        );
        let Some(vm) = watch.next(Duration::from_secs(1)).unwrap() else {
            continue;
        };
        if vm["status"]["phase"] == "Stopped" {
            break vm;
        }
    };
    assert_eq!(ready_reason(&reset), "GuestReset", "{reset}");
    drop(watch);
    g.wait(
        "the rebooter to run again with a new VMM",
        Duration::from_secs(60),
        || {
            let vm = g.get("gvm", "rebooter")?;
            let running = vm.is_some_and(|v| v["status"]["phase"] == "Running");
            Ok((running && pid_of(rebooter).is_some_and(|p| p != before)).then_some(()))
        },
    )
    .unwrap();
    let vm = g.get("gvm", "rebooter").unwrap().unwrap();
    assert_eq!(vm["spec"]["runStrategy"], "Manual", "{vm}");
    let why = has_event(&g, "rebooter", "GuestReset").expect("a GuestReset event");
    assert!(why.contains("reset"), "{why}");
    wait_guest(&g, rebooter);

    // stop --force: no button, at once.
    let t0 = Instant::now();
    kubectl_plugin(&g, &plugin_dir, &["godwit", "stop", "rebooter", "--force"]);
    wait_exit(&g, rebooter, Duration::from_secs(20));
    println!("forced stop: VMM exit in {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    let forced = has_event(&g, "rebooter", "ForcedStop").expect("a ForcedStop event");
    assert!(forced.contains("no grace period"), "{forced}");
    assert!(
        !read(&rebooter.join("vmm.log")).contains("guest powered off (ACPI S5)"),
        "the button was pressed: {}",
        read(&rebooter.join("vmm.log"))
    );
    wait_phase(&g, "rebooter", "Stopped");
    drop(g);
}
