//! A run of our engine: two `godwit-vmm` processes (the test kit's
//! [`VmmProc`]), the source booted in the source namespace, the target
//! waiting in the target's; with `--engine godwit-tls`, both with
//! certificates made by `openssl` for the run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use godwit_testkit::guest::guest_elf;
use godwit_testkit::qemu::ScratchDir;
use godwit_testkit::vmmproc::{attach_console, VmmProc};
use godwit_vmm_control::{MigrateSend, Stage};

use super::error::BenchError;
use super::report::RunResult;
use super::scenario::{after, cmdline, drain, read_until, warm_up, Scenario, BOOT, MEMORY_MIB};
use super::topology::{free_port, Link, Topology, DST_IP, SRC_IP};

/// Every VMM of the benchmark gives up after this long (`--timeout-s`).
const VMM_TIMEOUT: [&str; 2] = ["--timeout-s", "300"];

/// The godwit-vmm binary: the given one, or `godwit-vmm` next to this
/// executable, (re)built first with `cargo build --release` so that a
/// benchmark never measures a stale VMM.
pub fn vmm_binary(given: Option<PathBuf>) -> Result<PathBuf, BenchError> {
    if let Some(p) = given {
        return Ok(p);
    }
    let exe = std::env::current_exe().map_err(|e| BenchError::Io("current_exe".into(), e))?;
    let p = exe
        .parent()
        .map(|d| d.join("godwit-vmm"))
        .ok_or_else(|| BenchError::Build("bench has no directory".into()))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "godwit-node",
            "--bin",
            "godwit-vmm",
        ])
        .status()
        .map_err(|e| BenchError::Io("run cargo build".into(), e))?;
    if !st.success() || !p.exists() {
        return Err(BenchError::Build(format!(
            "cargo build -p godwit-node --bin godwit-vmm: {st}; pass --vmm PATH"
        )));
    }
    Ok(p)
}

/// Makes a CA and a certificate for each end (IP SANs of the two
/// addresses) under `dir` with `openssl`; returns the godwit-vmm flags of
/// the source and of the target.
fn make_certs(dir: &Path) -> Result<(Vec<String>, Vec<String>), BenchError> {
    let openssl = |args: &[&str]| -> Result<(), BenchError> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| BenchError::Io("run openssl".into(), e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(BenchError::Vmm(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    openssl(
        &[
            &["req", "-x509", "-nodes", "-days", "2"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-subj", "/CN=godwit bench CA"],
        ]
        .concat(),
    )?;
    let mut flags = Vec::new();
    for (name, ip) in [("src", SRC_IP), ("dst", DST_IP)] {
        let ext = format!(
            "subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext)
            .map_err(|e| BenchError::Io("write openssl extensions".into(), e))?;
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        openssl(
            &[
                &["req", "-nodes"][..],
                &ec,
                &[
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat(),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &extfile,
        ])?;
        let path = |f: &str| dir.join(f).display().to_string();
        flags.push(vec![
            "--tls-cert".into(),
            path(&pem),
            "--tls-key".into(),
            path(&key),
            "--tls-ca".into(),
            path("ca.pem"),
        ]);
    }
    let dst = flags.pop().expect("two identities");
    let src = flags.pop().expect("two identities");
    Ok((src, dst))
}

/// One migration with our engine: the target waits in the target
/// namespace, the source boots paused in the source namespace, the console
/// is attached, the guest warms up, then the source is told to migrate and
/// its status polled until the migration ends (or is cancelled at the
/// timeout).
pub(super) fn godwit_run(
    t: &Topology,
    vmm: &Path,
    s: &Scenario,
    link: Link,
    max_downtime_ms: u64,
    timeout: Duration,
    tls: bool,
) -> Result<RunResult, BenchError> {
    let config = if tls { "tls" } else { "default" };
    let mut r = RunResult::new("godwit", config, s, link);
    let dir = ScratchDir::new("bench-mig")?;
    let (src_tls, dst_tls) = if tls {
        make_certs(dir.path())?
    } else {
        (Vec::new(), Vec::new())
    };
    let port = free_port()?;
    // Target first: it must listen before the source connects.
    let dst = VmmProc::spawn(dir.path(), "dst")
        .binary(vmm)
        .netns(Some(&t.b))
        .args(&dst_tls)
        .args(&VMM_TIMEOUT)
        .stderr_to_file()
        .incoming(&format!("{DST_IP}:{port}"))?;
    let elf = guest_elf()?;
    let mut src = VmmProc::spawn(dir.path(), "src")
        .binary(vmm)
        .netns(Some(&t.a))
        .args(&[
            "--kernel".into(),
            elf.display().to_string(),
            "--memory-mib".into(),
            MEMORY_MIB.to_string(),
            "--cmdline".into(),
            cmdline(s),
        ])
        .args(&src_tls)
        .args(&VMM_TIMEOUT)
        .stderr_to_file()
        .ready_timeout(Duration::from_secs(30))
        .boot()?;
    // The control socket is the last thing godwit-vmm creates before it
    // waits: once it exists, the console is listening too.
    let mut src_console = src
        .console(Duration::from_secs(30))
        .map_err(|e| BenchError::Vmm(format!("no source console ({e}): {}", src.stderr())))?;
    let control = src.control();
    control.resume()?;
    src_console.wait_prefix("READY", BOOT)?;
    warm_up(&mut src_console, s)?;

    // The target's console appears when the migration starts: poll for it.
    let (tx, rx) = mpsc::channel();
    let poll_path = dst.console_sock.clone();
    let poller = thread::spawn(move || {
        let _ = tx.send(attach_console(&poll_path, timeout + Duration::from_secs(10)).ok());
    });
    let wire_before = t.wire_bytes()?;
    let start = Instant::now();
    control.migrate_send(MigrateSend {
        timeout_s: Some(timeout.as_secs()),
        max_downtime_ms: Some(max_downtime_ms),
        ..MigrateSend::to(format!("{DST_IP}:{port}"))
    })?;
    let deadline = start + timeout + Duration::from_secs(5);
    let mut status;
    let done = loop {
        status = control.migrate_status()?;
        if matches!(status.stage, Stage::Completed | Stage::Failed) {
            break Instant::now();
        }
        // Keep the console's line list current (timestamps come from its reader thread).
        let _ = src_console.next_line(Duration::from_millis(20));
        if Instant::now() >= deadline {
            let _ = control.migrate_cancel();
            break Instant::now();
        }
    };
    r.converged = status.stage == Stage::Completed;
    match status.result.filter(|_| r.converged) {
        Some(res) => {
            r.engine_total_ms = res.total_ms as f64;
            r.downtime_ms = Some(res.downtime_ms);
            r.bytes_sent = res.bytes_sent;
            r.rounds = res.rounds.into();
            r.mode = format!("{:?}", res.mode);
            r.breakdown = res
                .downtime_breakdown
                .map(|b| serde_json::to_value(b).expect("figures serialise"));
        }
        None => {
            r.engine_total_ms = start.elapsed().as_secs_f64() * 1000.0;
            r.bytes_sent = status.transferred_bytes;
            r.rounds = status.round.into();
            r.error = status
                .error
                .or_else(|| Some(format!("stage {:?}", status.stage)));
        }
    }
    let mut dst_console = rx.recv().ok().flatten();
    let _ = poller.join();
    if let Some(c) = dst_console.as_mut() {
        if r.converged {
            read_until(c, done + after(s), after(s) + Duration::from_secs(10));
        }
    } else if r.converged {
        r.error = Some("target console never appeared".into());
    }
    drain(
        &mut src_console,
        Duration::from_millis(200),
        Duration::from_secs(2),
    );
    if !r.converged {
        // The guest stayed on the source: a second of its heartbeats after.
        read_until(
            &mut src_console,
            done + after(s),
            after(s) + Duration::from_secs(5),
        );
    }
    r.wire_bytes = t.wire_bytes()?.saturating_sub(wire_before);
    let dst_lines = dst_console.as_ref().map_or(&[][..], |c| c.lines());
    r.measure(src_console.lines(), dst_lines, start, done);
    let _ = control.stop();
    drop(dst_console);
    drop(src);
    drop(dst);
    Ok(r)
}
