//! Live migration between two godwit-vmm processes under real KVM, in two
//! network namespaces (the "nodes") joined by a veth pair that carries both the
//! migration stream and the VM's own traffic, with a TCP client in a third
//! namespace holding a connection to the guest through the move.
//!
//! ```text
//!   client ns            node A ns                    node B ns
//!   10.88.0.100 ---veth--- brA (10.88.0.1) ---veth--- brB (10.88.0.2)
//!                          |  tap: source VMM          |  tap: target VMM
//!                          guest 10.88.0.10  ==moves==> guest 10.88.0.10
//! ```

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guest, start_vm, Scratch, Vm, BOOT, VMM};
use godwit_testkit::guest::{parse_heartbeat, Console};
use godwit_testkit::netns::{unique_name, Netns, Veth};
use godwit_vmm_control::{Command as Cmd, MigrateSend};
use serde_json::Value;

const GUEST_IP: &str = "10.88.0.10";
const GUEST_PORT: u16 = 7000;
const TARGET_IP: &str = "10.88.0.2";

/// Two nodes and a client on one L2 segment.
struct Topology {
    a: Netns,
    b: Netns,
    client: Netns,
    br_a: String,
    br_b: String,
    /// Node A's end of the A–B link (shaped or cut by the tests).
    link_a: String,
    _links: Vec<Veth>,
}

fn topology() -> Topology {
    let a = Netns::new("gma").expect("create node A namespace");
    let b = Netns::new("gmb").expect("create node B namespace");
    let client = Netns::new("gmc").expect("create client namespace");
    let (br_a, br_b) = (unique_name("bra"), unique_name("brb"));
    a.add_bridge(&br_a).unwrap();
    b.add_bridge(&br_b).unwrap();
    let (link_a, link_b) = (unique_name("lab"), unique_name("lba"));
    let ab = Veth::new(&a, &link_a, &b, &link_b).unwrap();
    a.attach(&link_a, &br_a).unwrap();
    b.attach(&link_b, &br_b).unwrap();
    a.add_addr(&br_a, "10.88.0.1/24").unwrap();
    b.add_addr(&br_b, &format!("{TARGET_IP}/24")).unwrap();
    let (ca, cc) = (unique_name("lac"), unique_name("lca"));
    let ac = Veth::new(&a, &ca, &client, &cc).unwrap();
    a.attach(&ca, &br_a).unwrap();
    client.add_addr(&cc, "10.88.0.100/24").unwrap();
    Topology {
        a,
        b,
        client,
        br_a,
        br_b,
        link_a,
        _links: vec![ab, ac],
    }
}

fn free_port() -> u16 {
    // Ports are per namespace; any port unused here is free in node B too,
    // as nothing else runs there.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The source VM in node A.
fn start_source(t: &Topology, dir: &Scratch, mib: u64, cmdline: &str) -> Vm {
    let args: Vec<String> = vec![
        "--kernel".into(),
        guest().display().to_string(),
        "--memory-mib".into(),
        mib.to_string(),
        "--cmdline".into(),
        format!("{cmdline} ip={GUEST_IP}/24 tcp_port={GUEST_PORT}"),
        "--net".into(),
        format!(
            "tap={},bridge={},mac=52:54:00:88:00:0a",
            unique_name("tsa"),
            t.br_a
        ),
    ];
    let mut vm = start_vm(dir, "src", &["ip", "netns", "exec", t.a.name()], &args);
    vm.console
        .wait_prefix("READY", BOOT)
        .expect("source guest boots");
    vm.console
        .heartbeats(2, Duration::from_secs(10))
        .expect("source heartbeats");
    vm
}

/// A target godwit-vmm waiting for the migration in node B.
struct Target {
    child: Child,
    port: u16,
    tap: String,
    console: PathBuf,
    log: PathBuf,
    api: PathBuf,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_target(t: &Topology, dir: &Scratch) -> Target {
    let port = free_port();
    let tap = unique_name("ttb");
    let (console, log, api) = (
        dir.path("dst.console"),
        dir.path("dst.log"),
        dir.path("dst.api"),
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", t.b.name()])
        .args(common::BOUNDED)
        .arg(VMM)
        .args(["--incoming", &format!("{TARGET_IP}:{port}")])
        .args(["--net", &format!("tap={tap},bridge={}", t.br_b)])
        .arg("--console-sock")
        .arg(&console)
        .arg("--serial-log")
        .arg(&log)
        .arg("--api-sock")
        .arg(&api)
        .args(["--timeout-s", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn target godwit-vmm");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("waiting for a migration"),
        "target said {line:?}"
    );
    Target {
        child,
        port,
        tap,
        console,
        log,
        api,
    }
}

/// A TCP client in the client namespace reading the guest's heartbeat stream
/// and checking, line by line, that the counter goes up by exactly one. It
/// reads until it has seen the counter [`StreamWatch::finish_at`] names.
struct StreamWatch {
    stop_at: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<Result<StreamReport, godwit_testkit::netns::NetnsError>>,
}

#[derive(Debug)]
struct StreamReport {
    counters: Vec<u64>,
    max_gap: Duration,
    error: Option<String>,
}

fn watch_stream(t: &Topology) -> StreamWatch {
    let stop_at = Arc::new(AtomicU64::new(u64::MAX));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let s = stop_at.clone();
    let handle = t
        .client
        .spawn_in(move || {
            let addr: SocketAddr = format!("{GUEST_IP}:{GUEST_PORT}").parse().unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            let stream = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(st) => break st,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    Err(e) => panic!("cannot connect to the guest: {e}"),
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut report = StreamReport {
                counters: Vec::new(),
                max_gap: Duration::ZERO,
                error: None,
            };
            let mut last = Instant::now();
            let mut lines = BufReader::new(stream).lines();
            while report.counters.last() < Some(&s.load(Ordering::Relaxed)) {
                match lines.next() {
                    Some(Ok(l)) => {
                        if let Some(hb) = parse_heartbeat(l.trim_end()) {
                            let now = Instant::now();
                            if !report.counters.is_empty() {
                                report.max_gap = report.max_gap.max(now - last);
                            } else {
                                let _ = started_tx.send(());
                            }
                            last = now;
                            report.counters.push(hb.counter);
                        }
                    }
                    Some(Err(e)) => {
                        report.error = Some(e.to_string());
                        break;
                    }
                    None => {
                        report.error = Some("connection closed".into());
                        break;
                    }
                }
            }
            report
        })
        .unwrap();
    started_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the TCP client receives heartbeats before the migration");
    StreamWatch { stop_at, handle }
}

impl StreamWatch {
    /// Reads on until heartbeat `counter` came (or the stream broke, or
    /// was silent for 10 s), then reports.
    fn finish_at(self, counter: u64) -> StreamReport {
        self.stop_at.store(counter, Ordering::Relaxed);
        self.handle
            .join()
            .expect("stream watcher")
            .expect("enter the client namespace")
    }
}

/// Sends migrate-send and waits for the migration to end; returns the final
/// migrate-status result (or the last one seen before the source exited).
fn migrate(src: &Vm, target: &Target, extra: MigrateSend) -> Value {
    let req = MigrateSend {
        addr: format!("{TARGET_IP}:{}", target.port),
        ..extra
    };
    let r = src.api(Cmd::MigrateSend(req));
    assert_eq!(r["ok"], true, "migrate-send: {r}");
    wait_migration(src, Duration::from_secs(120))
}

fn wait_migration(src: &Vm, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = src.api(Cmd::MigrateStatus);
        let status = r["result"].clone();
        match status["stage"].as_str() {
            Some("Completed") | Some("Failed") => return status,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "migration did not end; last status {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn attach(path: &PathBuf) -> Console {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(path) {
            return Console::new(s.try_clone().unwrap(), s);
        }
        assert!(
            Instant::now() < deadline,
            "no console at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Heartbeat counters in a serial log, in order.
fn log_counters(path: &PathBuf) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| parse_heartbeat(l.trim_end()).map(|h| h.counter))
        .collect()
}

/// After a successful migration: the source process exited, the target's
/// heartbeat continues where the source's stopped, MEMCHECK passes on the
/// target, and the TCP stream saw every counter once, in order.
fn check_moved(mut src: Vm, target: &Target, stream: Option<StreamWatch>, workload: bool) {
    let r = src.api(Cmd::Status);
    assert_eq!(r["ok"], true, "{r}");
    src.api(Cmd::Stop);
    let status = src.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "source exited with {status}");
    let mut con = attach(&target.console);
    con.heartbeats(5, Duration::from_secs(20))
        .expect("heartbeats on the target");
    let source_last = *log_counters(&src.serial_log)
        .last()
        .expect("source heartbeats");
    let target_first = *log_counters(&target.log)
        .first()
        .expect("target heartbeats");
    // A switch-over in the middle of a heartbeat line leaves its start on the
    // source and the rest on the target; when the cut falls inside the
    // counter, neither half parses and that one counter is on neither log.
    let cut = !std::fs::read_to_string(&src.serial_log)
        .unwrap_or_default()
        .ends_with('\n');
    assert!(
        target_first == source_last + 1 || (cut && target_first == source_last + 2),
        "heartbeat counter did not continue: source ended at {source_last} (mid-line: {cut}), target began at {target_first}"
    );
    if workload {
        con.send("memcheck").unwrap();
        let m = con
            .wait_prefix("MEMCHECK", Duration::from_secs(60))
            .unwrap();
        assert!(m.text.starts_with("MEMCHECK ok"), "{}", m.text);
        assert!(
            !m.text.contains("pages=0"),
            "memcheck checked nothing: {}",
            m.text
        );
    }
    let Some(stream) = stream else {
        return;
    };
    // Ten heartbeats from the target: a segment lost in the switch-over
    // costs the guest a retransmission timeout (1 s) before they come.
    let report = stream.finish_at(source_last + 10);
    assert!(report.error.is_none(), "TCP connection broke: {report:?}");
    assert!(report.counters.len() > 10, "{report:?}");
    for w in report.counters.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "TCP stream skipped or repeated a heartbeat: {:?}",
            report.counters
        );
    }
    assert!(
        *report.counters.last().unwrap() > source_last,
        "TCP stream saw nothing from the target"
    );
    let _ = target.api.exists();
}

#[test]
fn idle_guest_moves_with_its_tcp_connection() {
    common::require_kvm();
    let t = topology();
    let dir = Scratch::new("mig-idle");
    let src = start_source(&t, &dir, 256, "hb_ms=20");
    let stream = watch_stream(&t);
    let target = start_target(&t, &dir);
    let result = migrate(&src, &target, MigrateSend::default());
    eprintln!("idle migration: {result}");
    assert_eq!(result["stage"], "Completed", "{result}");
    assert_eq!(result["result"]["mode"], "PreCopy", "{result}");
    check_moved(src, &target, Some(stream), false);
}

#[test]
fn dirtying_guest_moves_over_a_1gbit_link() {
    common::require_kvm();
    let t = topology();
    t.a.shape(&t.link_a, "1gbit", "256kb", "50ms").unwrap();
    let dir = Scratch::new("mig-dirty");
    let mut src = start_source(&t, &dir, 256, "hb_ms=20 dirty_mib=64 dirty_rate=5000");
    // 16384 pages at 5000 pages/s: let the workload touch all of them first.
    src.console
        .heartbeats(200, Duration::from_secs(30))
        .unwrap();
    let stream = watch_stream(&t);
    let target = start_target(&t, &dir);
    let result = migrate(&src, &target, MigrateSend::default());
    eprintln!("dirty migration over 1gbit: {result}");
    assert_eq!(result["stage"], "Completed", "{result}");
    check_moved(src, &target, Some(stream), true);
}

#[test]
fn guest_with_scattered_writes_and_mixed_memory_moves_and_verifies() {
    common::require_kvm();
    let t = topology();
    let dir = Scratch::new("mig-mix");
    // A 64 MiB region of zero, text-like and random pages (written before
    // READY), 16 MiB of it rewritten in a new random order each pass.
    let mut src = start_source(
        &t,
        &dir,
        256,
        "hb_ms=20 dirty_mib=16 dirty_rate=5000 dirty_order=random dirty_fill=mix mix_mib=64",
    );
    // 4096 hot pages at 5000 pages/s: more than one pass before the move.
    src.console
        .heartbeats(100, Duration::from_secs(30))
        .unwrap();
    let target = start_target(&t, &dir);
    let result = migrate(&src, &target, MigrateSend::default());
    eprintln!("scattered mixed migration: {result}");
    assert_eq!(result["stage"], "Completed", "{result}");
    check_moved(src, &target, None, true);
}

fn fast_dirtier_over_slow_link(name: &str, policy: MigrateSend, expect_mode: &str) {
    common::require_kvm();
    let t = topology();
    // 50 Mbit/s carries about 6 MB/s; the guest rewrites its 32 MiB working
    // set many times faster than that even on a loaded machine, so plain
    // pre-copy never gets below 50 ms.
    t.a.shape(&t.link_a, "50mbit", "64kb", "20ms").unwrap();
    let dir = Scratch::new(name);
    let src = start_source(&t, &dir, 160, "hb_ms=20 dirty_mib=32 dirty_rate=0");
    let stream = watch_stream(&t);
    let target = start_target(&t, &dir);
    let extra = MigrateSend {
        timeout_s: Some(90),
        ..policy
    };
    let result = migrate(&src, &target, extra);
    eprintln!("{name}: {result}");
    assert_eq!(result["stage"], "Completed", "{result}");
    assert_eq!(result["result"]["mode"], expect_mode, "{result}");
    check_moved(src, &target, Some(stream), true);
}

#[test]
fn fast_dirtier_completes_with_post_copy() {
    fast_dirtier_over_slow_link(
        "mig-postcopy",
        MigrateSend {
            allow_auto_converge: Some(false),
            allow_post_copy: Some(true),
            ..MigrateSend::default()
        },
        "PostCopy",
    );
}

#[test]
fn fast_dirtier_completes_with_auto_converge() {
    fast_dirtier_over_slow_link(
        "mig-autoconv",
        MigrateSend {
            allow_auto_converge: Some(true),
            allow_post_copy: Some(false),
            ..MigrateSend::default()
        },
        "AutoConverge",
    );
}

/// Post-copy recovery (`node-daemon/src/migration/postcopy/recovery.rs`): the link
/// between the nodes goes down in post-copy for longer than the stall
/// timeout; both VMMs keep the guest, the source dials the target again
/// once the link is back, and the migration completes with nothing lost.
#[test]
fn link_cut_during_post_copy_resumes_when_the_link_returns() {
    common::require_kvm();
    let t = topology();
    t.a.shape(&t.link_a, "50mbit", "64kb", "20ms").unwrap();
    let dir = Scratch::new("mig-pc-cut");
    let src = start_source(&t, &dir, 160, "hb_ms=20 dirty_mib=32 dirty_rate=0");
    // No TCP client: vCPUs waiting for pages can hold the guest's stack
    // longer than a client's read timeout while the link is down.
    let target = start_target(&t, &dir);
    let r = src.api(Cmd::MigrateSend(MigrateSend {
        allow_auto_converge: Some(false),
        allow_post_copy: Some(true),
        stall_timeout_s: Some(2),
        recover_timeout_s: Some(60),
        timeout_s: Some(120),
        ..MigrateSend::to(format!("{TARGET_IP}:{}", target.port))
    }));
    assert_eq!(r["ok"], true, "{r}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = src.api(Cmd::MigrateStatus)["result"].clone();
        if s["stage"] == "PostCopy" && s["memory_remaining_bytes"].as_u64().unwrap_or(0) > 16 << 20
        {
            break;
        }
        assert!(
            s["stage"] != "Completed" && s["stage"] != "Failed" && Instant::now() < deadline,
            "no post-copy phase to cut: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t.a.cut(&t.link_a).unwrap();
    // Longer than the source's stall timeout (2 s): it gives the connection
    // up and dials again until the link is back.
    let cut_at = Instant::now();
    let mut reconnecting = false;
    let mut restored = false;
    let result = loop {
        let s = src.api(Cmd::MigrateStatus)["result"].clone();
        reconnecting |= s["reconnecting"] == true;
        if !restored && cut_at.elapsed() >= Duration::from_secs(6) {
            assert_ne!(s["stage"], "Failed", "gave up while the link was down: {s}");
            t.a.restore(&t.link_a).unwrap();
            restored = true;
        }
        if restored && matches!(s["stage"].as_str(), Some("Completed" | "Failed")) {
            break s;
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(120),
            "migration did not end: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(reconnecting, "the source never said it was reconnecting");
    eprintln!("post-copy with a 6 s link cut: {result}");
    assert_eq!(result["stage"], "Completed", "{result}");
    assert_eq!(result["result"]["mode"], "PostCopy", "{result}");
    check_moved(src, &target, None, true);
}

/// The source keeps running its guest after a failed migration, and the
/// target leaves no tap behind.
fn check_stayed(src: &mut Vm, t: &Topology, target: &mut Target, status: &Value) {
    assert_eq!(status["stage"], "Failed", "{status}");
    let before = src
        .console
        .heartbeats(1, Duration::from_secs(10))
        .expect("source heartbeat after failure")[0]
        .0
        .counter;
    let after = src.console.heartbeats(3, Duration::from_secs(10)).unwrap()[2]
        .0
        .counter;
    assert!(after > before, "source guest does not run");
    let r = src.api(Cmd::Status);
    assert_eq!(r["result"]["state"], "running", "{r}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while target.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "target did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    let links = t.b.ip(&["-o", "link", "show"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&target.tap),
        "target left its tap behind"
    );
}

/// Waits until the running migration has sent more than `bytes`.
fn wait_transferred(src: &Vm, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = src.api(Cmd::MigrateStatus);
        if s["result"]["transferred_bytes"].as_u64().unwrap_or(0) > bytes {
            return;
        }
        assert!(Instant::now() < deadline, "migration did not start: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn target_killed_during_precopy_leaves_the_guest_on_the_source() {
    common::require_kvm();
    let t = topology();
    t.a.shape(&t.link_a, "100mbit", "256kb", "100ms").unwrap();
    let dir = Scratch::new("mig-kill");
    let mut src = start_source(&t, &dir, 256, "hb_ms=20 dirty_mib=96 dirty_rate=0");
    let mut target = start_target(&t, &dir);
    let r = src.api(Cmd::MigrateSend(MigrateSend {
        allow_post_copy: Some(false),
        ..MigrateSend::to(format!("{TARGET_IP}:{}", target.port))
    }));
    assert_eq!(r["ok"], true, "{r}");
    // Wait until pages flow, then kill the target.
    wait_transferred(&src, 8 << 20);
    target.child.kill().unwrap();
    let status = wait_migration(&src, Duration::from_secs(30));
    check_stayed(&mut src, &t, &mut target, &status);
}

#[test]
fn link_cut_during_precopy_leaves_the_guest_on_the_source() {
    common::require_kvm();
    let t = topology();
    t.a.shape(&t.link_a, "100mbit", "256kb", "100ms").unwrap();
    let dir = Scratch::new("mig-cut");
    let mut src = start_source(&t, &dir, 256, "hb_ms=20 dirty_mib=96 dirty_rate=0");
    let mut target = start_target(&t, &dir);
    let r = src.api(Cmd::MigrateSend(MigrateSend {
        allow_post_copy: Some(false),
        stall_timeout_s: Some(2),
        ..MigrateSend::to(format!("{TARGET_IP}:{}", target.port))
    }));
    assert_eq!(r["ok"], true, "{r}");
    wait_transferred(&src, 8 << 20);
    t.a.cut(&t.link_a).unwrap();
    let status = wait_migration(&src, Duration::from_secs(30));
    assert!(
        status["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    // The target notices the silence too and gives up.
    check_stayed(&mut src, &t, &mut target, &status);
}

#[test]
fn malformed_stream_is_refused_and_the_target_leaves_nothing() {
    common::require_kvm();
    let t = topology();
    let dir = Scratch::new("mig-garbage");
    let mut target = start_target(&t, &dir);
    let port = target.port;
    t.b.run_in(move || {
        use std::io::Write;
        let mut s = TcpStream::connect((TARGET_IP, port)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: godwit\r\n\r\n")
            .unwrap();
        let mut reply = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut reply);
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = target.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "target did not exit on garbage");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(3), "target exit status");
    assert!(!target.console.exists() && !target.api.exists());
}
