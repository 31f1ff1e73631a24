//! Live migration over mutual TLS between two godwit-vmm processes under real
//! KVM, on two simulated nodes (`godwit_testkit::nodes`), with certificates made
//! by a test CA at test time: a migration between nodes of one CA succeeds;
//! a source with a certificate from another CA, a plain-TCP source and a
//! client without a certificate are refused, the source's guest runs on, and
//! the target exits with status 3 leaving nothing behind; a post-copy
//! migration whose link is cut reconnects over TLS and completes.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{guest, start_vm, Scratch, Vm, BOOT};
use godwit_testkit::netns::unique_name;
use godwit_testkit::nodes::{Fabric, Node};
use godwit_testkit::vmmproc::VmmProc;
use godwit_vmm_control::{Command as Cmd, MigrateSend};
use serde_json::Value;

/// A test CA that writes node identities as PEM files under a directory.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A node's three TLS files, as godwit-vmm flags.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Identity {
    fn args(&self) -> Vec<String> {
        [
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
            ("--tls-ca", &self.ca),
        ]
        .iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
    }
}

impl Pki {
    fn new(dir: &Path, tag: &str) -> Pki {
        let dir = dir.join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("godwit test CA {tag}"));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        Pki {
            dir,
            ca,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A node certificate naming `node` (DNS SAN) and its address (IP SAN),
    /// good for both TLS roles, trusting this CA.
    fn node(&self, node: &Node) -> Identity {
        let mut params =
            rcgen::CertificateParams::new(vec![node.name.clone(), node.ip.clone()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node.name.clone());
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let id = Identity {
            cert: self.dir.join(format!("{}.pem", node.name)),
            key: self.dir.join(format!("{}.key", node.name)),
            ca: self.ca.clone(),
        };
        std::fs::write(&id.cert, cert.pem()).unwrap();
        std::fs::write(&id.key, key.serialize_pem()).unwrap();
        id
    }
}

const GUEST_MAC: &str = "52:54:00:88:00:0a";

/// The source VM on node 0: a guest dirtying `dirty_mib` with a NIC on the
/// node bridge, started with `extra` flags.
fn start_source(f: &Fabric, dir: &Scratch, dirty_mib: u64, extra: &[String]) -> Vm {
    let node = &f.nodes[0];
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        guest().display().to_string(),
        "--memory-mib".into(),
        "128".into(),
        "--cmdline".into(),
        format!(
            "hb_ms=20 dirty_mib={dirty_mib} dirty_rate=0 ip={}/24",
            Fabric::vm_ip(0)
        ),
        "--net".into(),
        format!(
            "tap={},bridge={},mac={GUEST_MAC}",
            unique_name("tls"),
            node.bridge
        ),
    ];
    args.extend(extra.iter().cloned());
    let mut vm = start_vm(dir, "src", &["ip", "netns", "exec", node.ns.name()], &args);
    vm.console
        .wait_prefix("READY", BOOT)
        .expect("source guest boots");
    vm.console
        .heartbeats(2, Duration::from_secs(10))
        .expect("source heartbeats");
    vm
}

/// A target on node 1 waiting for the migration, started with `extra` flags.
struct Target {
    vmm: VmmProc,
    addr: String,
    tap: String,
}

fn start_target(f: &Fabric, dir: &Scratch, extra: &[String]) -> Target {
    let node = &f.nodes[1];
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("{}:{port}", node.ip);
    let tap = unique_name("tlt");
    let mut args = vec!["--net".into(), format!("tap={tap},bridge={}", node.bridge)];
    args.extend(extra.iter().cloned());
    let vmm = VmmProc::incoming_with(Some(&node.ns), &dir.0, "dst", &addr, &args)
        .expect("target waits for the migration");
    Target { vmm, addr, tap }
}

fn wait_migration(src: &Vm, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = src.api(Cmd::MigrateStatus)["result"].clone();
        if matches!(status["stage"].as_str(), Some("Completed" | "Failed")) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "migration did not end; last status {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The target refused: it exits with status 3 and leaves no tap, console or
/// control socket.
fn assert_target_left_nothing(f: &Fabric, target: &mut Target) {
    assert_eq!(
        target.vmm.wait(Duration::from_secs(20)),
        Some(3),
        "target exit status"
    );
    let links = f.nodes[1].ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&target.tap),
        "target left its tap behind"
    );
    assert!(!target.vmm.api.exists(), "target left its control socket");
    assert!(
        !target.vmm.console_sock.exists(),
        "target left its console socket"
    );
}

/// The source's guest keeps running after a refused migration.
fn assert_source_runs(src: &mut Vm) {
    let r = src.api(Cmd::Status);
    assert_eq!(r["result"]["state"], "running", "{r}");
    let beats = src
        .console
        .heartbeats(3, Duration::from_secs(10))
        .expect("source heartbeats after the refusal");
    assert!(beats[2].0.counter > beats[0].0.counter);
}

#[test]
fn tls_migration_moves_a_dirtying_guest() {
    common::require_kvm();
    let f = Fabric::new(2).unwrap();
    let dir = Scratch::new("mig-tls-ok");
    let pki = Pki::new(&dir.0, "ca");
    let (a, b) = (pki.node(&f.nodes[0]), pki.node(&f.nodes[1]));
    let mut src = start_source(&f, &dir, 32, &a.args());
    let target = start_target(&f, &dir, &b.args());
    let r = src.api(Cmd::MigrateSend(MigrateSend::to(target.addr.clone())));
    assert_eq!(r["ok"], true, "migrate-send: {r}");
    let status = wait_migration(&src, Duration::from_secs(120));
    eprintln!("tls migration: {status}");
    assert_eq!(status["stage"], "Completed", "{status}");

    src.api(Cmd::Stop);
    assert!(src.wait_exit(Duration::from_secs(10)).success());
    let mut con = target.vmm.console(Duration::from_secs(20)).unwrap();
    con.heartbeats(5, Duration::from_secs(20))
        .expect("heartbeats on the target");
    let log = std::fs::read_to_string(&src.serial_log).unwrap();
    let source_last = *log
        .lines()
        .filter_map(|l| godwit_testkit::guest::parse_heartbeat(l.trim_end()).map(|h| h.counter))
        .collect::<Vec<_>>()
        .last()
        .expect("source heartbeats");
    let target_first = *target
        .vmm
        .logged_heartbeats()
        .first()
        .expect("target heartbeats");
    // Switched over mid-line with the cut inside the counter: that counter
    // parses on neither log.
    let cut = !log.ends_with('\n');
    assert!(
        target_first == source_last + 1 || (cut && target_first == source_last + 2),
        "heartbeat counter did not continue: source ended at {source_last} (mid-line: {cut}), target began at {target_first}"
    );
    con.send("memcheck").unwrap();
    let m = con
        .wait_prefix("MEMCHECK", Duration::from_secs(60))
        .unwrap();
    assert!(m.text.starts_with("MEMCHECK ok"), "{}", m.text);
    assert!(!m.text.contains("pages=0"), "memcheck checked nothing");
}

/// Post-copy link recovery over TLS: the source node's uplink goes down in
/// post-copy for longer than the stall timeout; the source dials the target
/// again (a new TLS handshake with the same identities) once it is back, and
/// the migration completes with the guest's memory intact.
#[test]
fn tls_post_copy_recovers_from_a_cut_link() {
    common::require_kvm();
    let f = Fabric::new(2).unwrap();
    let dir = Scratch::new("mig-tls-pc-cut");
    let pki = Pki::new(&dir.0, "ca");
    let (a, b) = (pki.node(&f.nodes[0]), pki.node(&f.nodes[1]));
    let node = &f.nodes[0];
    node.ns
        .shape(&node.uplink, "50mbit", "64kb", "20ms")
        .unwrap();
    let src = start_source(&f, &dir, 32, &a.args());
    let target = start_target(&f, &dir, &b.args());
    let r = src.api(Cmd::MigrateSend(MigrateSend {
        allow_auto_converge: Some(false),
        allow_post_copy: Some(true),
        stall_timeout_s: Some(2),
        recover_timeout_s: Some(60),
        timeout_s: Some(120),
        ..MigrateSend::to(target.addr.clone())
    }));
    assert_eq!(r["ok"], true, "migrate-send: {r}");
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
    node.ns.cut(&node.uplink).unwrap();
    let cut_at = Instant::now();
    let (mut reconnecting, mut restored) = (false, false);
    let result = loop {
        let s = src.api(Cmd::MigrateStatus)["result"].clone();
        reconnecting |= s["reconnecting"] == true;
        if !restored && cut_at.elapsed() >= Duration::from_secs(6) {
            assert_ne!(s["stage"], "Failed", "gave up while the link was down: {s}");
            node.ns.restore(&node.uplink).unwrap();
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
    eprintln!("tls post-copy with a 6 s link cut: {result}");
    assert!(reconnecting, "the source never said it was reconnecting");
    assert_eq!(result["stage"], "Completed", "{result}");
    assert_eq!(result["result"]["mode"], "PostCopy", "{result}");
    let mut con = target.vmm.console(Duration::from_secs(20)).unwrap();
    con.heartbeats(3, Duration::from_secs(20))
        .expect("heartbeats on the target");
    con.send("memcheck").unwrap();
    let m = con
        .wait_prefix("MEMCHECK", Duration::from_secs(60))
        .unwrap();
    assert!(m.text.starts_with("MEMCHECK ok"), "{}", m.text);
    assert!(!m.text.contains("pages=0"), "memcheck checked nothing");
}

#[test]
fn tls_target_refuses_a_source_certificate_from_another_ca() {
    common::require_kvm();
    let f = Fabric::new(2).unwrap();
    let dir = Scratch::new("mig-tls-rogue");
    let pki = Pki::new(&dir.0, "ca");
    let rogue = Pki::new(&dir.0, "rogue");
    // The rogue source trusts the real CA, so it accepts the target; the
    // target must refuse it.
    let mut a = rogue.node(&f.nodes[0]);
    a.ca = pki.ca.clone();
    let b = pki.node(&f.nodes[1]);
    let mut src = start_source(&f, &dir, 16, &a.args());
    let mut target = start_target(&f, &dir, &b.args());
    let r = src.api(Cmd::MigrateSend(MigrateSend::to(target.addr.clone())));
    let error = if r["ok"] == true {
        let status = wait_migration(&src, Duration::from_secs(30));
        assert_eq!(status["stage"], "Failed", "{status}");
        status["error"].as_str().unwrap_or_default().to_string()
    } else {
        r["error"].as_str().unwrap_or_default().to_string()
    };
    assert!(
        error.contains("refused this node's certificate"),
        "source error: {error}"
    );
    assert_source_runs(&mut src);
    assert_target_left_nothing(&f, &mut target);
}

#[test]
fn tls_source_refuses_a_target_certificate_from_another_ca() {
    common::require_kvm();
    let f = Fabric::new(2).unwrap();
    let dir = Scratch::new("mig-tls-fake-target");
    let pki = Pki::new(&dir.0, "ca");
    let rogue = Pki::new(&dir.0, "rogue");
    let a = pki.node(&f.nodes[0]);
    let mut b = rogue.node(&f.nodes[1]);
    b.ca = pki.ca.clone();
    let mut src = start_source(&f, &dir, 16, &a.args());
    let mut target = start_target(&f, &dir, &b.args());
    let r = src.api(Cmd::MigrateSend(MigrateSend::to(target.addr.clone())));
    assert_eq!(r["ok"], false, "{r}");
    let error = r["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("handshake with the migration target failed")
            && error.contains("not trusted"),
        "source error: {error}"
    );
    assert_source_runs(&mut src);
    assert_target_left_nothing(&f, &mut target);
}

#[test]
fn tls_target_refuses_a_plain_tcp_source() {
    common::require_kvm();
    let f = Fabric::new(2).unwrap();
    let dir = Scratch::new("mig-tls-plain");
    let pki = Pki::new(&dir.0, "ca");
    let b = pki.node(&f.nodes[1]);
    let mut src = start_source(&f, &dir, 16, &[]);
    let mut target = start_target(&f, &dir, &b.args());
    let r = src.api(Cmd::MigrateSend(MigrateSend::to(target.addr.clone())));
    assert_eq!(r["ok"], true, "migrate-send: {r}");
    let status = wait_migration(&src, Duration::from_secs(30));
    assert_eq!(status["stage"], "Failed", "{status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.contains("requires TLS"), "source error: {error}");
    assert_source_runs(&mut src);
    assert_target_left_nothing(&f, &mut target);
}

#[test]
fn tls_target_refuses_a_client_without_a_certificate() {
    common::require_kvm();
    let f = Fabric::new(2).unwrap();
    let dir = Scratch::new("mig-tls-anon");
    let pki = Pki::new(&dir.0, "ca");
    let b = pki.node(&f.nodes[1]);
    let mut target = start_target(&f, &dir, &b.args());
    let (ca, addr) = (pki.ca.clone(), target.addr.clone());
    let alerted = f.nodes[0]
        .ns
        .run_in(move || {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(
                rustls::pki_types::CertificateDer::pem_file_iter(&ca)
                    .unwrap()
                    .map(Result::unwrap),
            );
            let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let ip = addr.split(':').next().unwrap().to_string();
            let mut client =
                rustls::ClientConnection::new(std::sync::Arc::new(config), ip.try_into().unwrap())
                    .unwrap();
            let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // TLS 1.3: the client is done before the server has judged it;
            // the refusal comes as an alert on the next read.
            let _ = client.complete_io(&mut tcp);
            let mut buf = [0u8; 16];
            client
                .complete_io(&mut tcp)
                .and_then(|_| std::io::Read::read(&mut client.reader(), &mut buf))
                .is_err()
        })
        .unwrap();
    assert!(alerted, "the client was not refused");
    assert_target_left_nothing(&f, &mut target);
}
