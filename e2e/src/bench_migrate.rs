//! `bench migrate`: live migration of the test guest, godwit-vmm against
//! QEMU/KVM (`qemu-system-x86_64 -enable-kvm -M microvm,acpi=off`), same
//! guest binary, same workload, same topology.
//!
//! Source and target run in two network namespaces joined by a veth pair
//! (`10.93.0.1` ↔ `10.93.0.2`); on the `1gbit` link both ends are shaped with
//! `tc tbf rate 1gbit`. Scenarios: `idle-1g`, `dirty64m-1g`, `dirty512m-1g`
//! (1 GiB guests, heartbeat every 2 ms, the working set written as fast as
//! the guest can). Per run it measures the engine's own total time, downtime,
//! bytes sent and rounds, and the *observed pause*: the largest gap between
//! consecutive heartbeat lines as the host timestamps their arrival on the
//! source's and then the target's console, minus the 2 ms period (floor 0).
//!
//! Configurations: godwit `default` (its own policy: auto-converge and
//! post-copy allowed); QEMU `default` (no parameter changed, so its 128 MiB/s
//! bandwidth cap applies); QEMU `best` (no cap on the unlimited link, the
//! link rate on the shaped one, and auto-converge or post-copy, both tried,
//! the one with the lower observed pause kept). A migration that does not
//! finish within the timeout reports `converged: false` and is cancelled.
//!
//! `--engine godwit-tls` runs our engine alone over mutual TLS instead of
//! plain TCP (both VMMs started with `--tls-cert/--tls-key/--tls-ca`, ECDSA
//! P-256 certificates made with `openssl` for the run), reported as engine
//! `godwit`, config `tls`, to measure what the encryption costs.
//!
//! A benchmark prints numbers; nothing here asserts on time.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{field, guest_elf, parse_heartbeat, Console, GuestError, Line};
use crate::netns::{unique_name, Netns, NetnsError, Veth};
use crate::qemu::{Qemu, QemuConfig, QemuError, ScratchDir};

/// Heartbeat period the benchmark guests use (ms).
pub const HB_MS: u64 = 2;
/// Guest RAM of every scenario (MiB).
pub const MEMORY_MIB: u64 = 1024;
const SRC_IP: &str = "10.93.0.1";
const DST_IP: &str = "10.93.0.2";
const BOOT: Duration = Duration::from_secs(60);

/// Errors of the migration benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("Network namespace setup failed")]
    Netns(#[from] NetnsError),
    #[error("QEMU failed")]
    Qemu(#[from] QemuError),
    #[error("Test guest failed")]
    Guest(#[from] GuestError),
    #[error("I/O failed: {0}")]
    Io(String, #[source] std::io::Error),
    #[error("godwit-vmm: {0}")]
    Vmm(String),
    #[error("Building godwit-vmm failed: {0}")]
    Build(String),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Only the unlimited link.
    pub quick: bool,
    /// The godwit-vmm binary (default: `target/release/godwit-vmm`, built if missing).
    pub vmm: Option<PathBuf>,
    /// Only scenarios whose name contains this.
    pub scenario: Option<String>,
    /// Only this engine (`godwit` or `qemu`; `godwit-tls`: ours over mutual TLS).
    pub engine: Option<String>,
    /// Completion timeout of one migration.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            quick: false,
            vmm: None,
            scenario: None,
            engine: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// One benchmark scenario: the guest's working set.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Name as reported (`idle-1g`, ...).
    pub name: &'static str,
    /// Working set in MiB, 0 = idle.
    pub dirty_mib: u64,
}

/// The scenarios, in order.
pub const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "idle-1g",
        dirty_mib: 0,
    },
    Scenario {
        name: "dirty64m-1g",
        dirty_mib: 64,
    },
    Scenario {
        name: "dirty512m-1g",
        dirty_mib: 512,
    },
];

/// The guest command line for a scenario.
pub fn cmdline(s: &Scenario) -> String {
    if s.dirty_mib == 0 {
        format!("hb_ms={HB_MS}")
    } else {
        format!("hb_ms={HB_MS} dirty_mib={} dirty_rate=0", s.dirty_mib)
    }
}

/// One migration's figures.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// `godwit` or `qemu`.
    pub engine: &'static str,
    /// `default` or `best`.
    pub config: &'static str,
    /// Scenario name.
    pub scenario: &'static str,
    /// `unlimited` or `1gbit`.
    pub link: &'static str,
    /// Whether the migration completed within the timeout.
    pub converged: bool,
    /// Engine-reported total time (ms); elapsed time when not converged.
    pub total_ms: f64,
    /// Engine-reported downtime (ms); `None` when not converged.
    pub downtime_ms: Option<f64>,
    /// Largest heartbeat gap seen by the host minus the period (ms).
    pub observed_pause_ms: Option<f64>,
    /// Bytes the engine sent.
    pub bytes_sent: u64,
    /// Pre-copy rounds (QEMU: dirty-sync-count).
    pub rounds: u64,
    /// How it converged (engine's words), or the variant tried.
    pub mode: String,
    /// Heartbeat counters never seen on either console during the run.
    pub hb_missing: u64,
    /// Our engine's downtime breakdown, as reported.
    pub breakdown: Option<Value>,
    /// Why a run failed, if it did.
    pub error: Option<String>,
}

impl RunResult {
    fn new(engine: &'static str, config: &'static str, s: &Scenario, link: Link) -> RunResult {
        RunResult {
            engine,
            config,
            scenario: s.name,
            link: link.name(),
            converged: false,
            total_ms: 0.0,
            downtime_ms: None,
            observed_pause_ms: None,
            bytes_sent: 0,
            rounds: 0,
            mode: String::new(),
            hb_missing: 0,
            breakdown: None,
            error: None,
        }
    }

    /// The JSON line: the required fields first, in the documented order
    /// (whatever serde_json's map ordering), then the extras.
    pub fn to_json_line(&self) -> String {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        let mut fields: Vec<(&str, Value)> = vec![
            ("bench", json!("migrate")),
            ("engine", json!(self.engine)),
            ("config", json!(self.config)),
            ("scenario", json!(self.scenario)),
            ("link", json!(self.link)),
            ("converged", json!(self.converged)),
            ("total_ms", json!(r1(self.total_ms))),
            ("downtime_ms", json!(self.downtime_ms.map(r1))),
            ("observed_pause_ms", json!(self.observed_pause_ms.map(r1))),
            ("bytes_sent", json!(self.bytes_sent)),
            ("rounds", json!(self.rounds)),
            ("mode", json!(self.mode)),
            ("hb_missing", json!(self.hb_missing)),
        ];
        if let Some(b) = &self.breakdown {
            fields.push(("downtime_breakdown", b.clone()));
        }
        if let Some(e) = &self.error {
            fields.push(("error", json!(e)));
        }
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", json!(k)))
            .collect();
        format!("{{{}}}", body.join(","))
    }

    /// The table header.
    pub fn header() -> String {
        format!(
            "{:<7} {:<8} {:<13} {:<9} {:>5} {:>9} {:>9} {:>9} {:>12} {:>6} {:>5}  mode",
            "engine",
            "config",
            "scenario",
            "link",
            "conv",
            "total_ms",
            "down_ms",
            "pause_ms",
            "bytes",
            "rounds",
            "hbmis"
        )
    }

    /// One table row.
    pub fn row(&self) -> String {
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
        let mut mode = self.mode.clone();
        if let Some(e) = &self.error {
            mode.push_str(&format!(" error: {e}"));
        }
        format!(
            "{:<7} {:<8} {:<13} {:<9} {:>5} {:>9.1} {:>9} {:>9} {:>12} {:>6} {:>5}  {}",
            self.engine,
            self.config,
            self.scenario,
            self.link,
            if self.converged { "yes" } else { "no" },
            self.total_ms,
            opt(self.downtime_ms),
            opt(self.observed_pause_ms),
            self.bytes_sent,
            self.rounds,
            self.hb_missing,
            mode
        )
    }
}

/// The link between the two namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The veth as it is.
    Unlimited,
    /// Both directions shaped to 1 Gbit/s.
    Gbit,
}

impl Link {
    /// Name as reported.
    pub fn name(self) -> &'static str {
        match self {
            Link::Unlimited => "unlimited",
            Link::Gbit => "1gbit",
        }
    }
}

/// Two namespaces joined by a veth pair; removed on Drop.
struct Topology {
    // Field order: the veth goes before its namespaces.
    _veth: Veth,
    a: Netns,
    b: Netns,
}

fn topology(link: Link) -> Result<Topology, BenchError> {
    let a = Netns::new("bma")?;
    let b = Netns::new("bmb")?;
    let (da, db) = (unique_name("bva"), unique_name("bvb"));
    let veth = Veth::new(&a, &da, &b, &db)?;
    a.add_addr(&da, &format!("{SRC_IP}/24"))?;
    b.add_addr(&db, &format!("{DST_IP}/24"))?;
    if link == Link::Gbit {
        a.shape(&da, "1gbit", "1mb", "50ms")?;
        b.shape(&db, "1gbit", "1mb", "50ms")?;
    }
    Ok(Topology { _veth: veth, a, b })
}

/// A TCP port that was free a moment ago (ports are per namespace and the
/// benchmark's namespaces hold nothing else, so any port free here is too).
fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::Io("bind a probe port".into(), e))?;
    Ok(l.local_addr()
        .map_err(|e| BenchError::Io("probe port".into(), e))?
        .port())
}

/// The largest gap between consecutive heartbeats (ordered and deduplicated
/// by counter, timed by host arrival) from `since` on, minus the period.
pub fn observed_pause(lines: &[&Line], since: Instant) -> Option<f64> {
    let mut by_counter: BTreeMap<u64, Instant> = BTreeMap::new();
    for l in lines {
        if l.at < since {
            continue;
        }
        if let Some(hb) = parse_heartbeat(&l.text) {
            let e = by_counter.entry(hb.counter).or_insert(l.at);
            if l.at < *e {
                *e = l.at;
            }
        }
    }
    let times: Vec<Instant> = by_counter.into_values().collect();
    if times.len() < 2 {
        return None;
    }
    let max = times
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()?;
    Some((max.as_secs_f64() * 1000.0 - HB_MS as f64).max(0.0))
}

/// Heartbeat counters missing (holes between the first and the last
/// counter seen from `since` on, across both consoles): a line lost, for
/// instance before the target's console was attached, widens the gap.
pub fn missing_heartbeats(lines: &[&Line], since: Instant) -> u64 {
    let seen: std::collections::BTreeSet<u64> = lines
        .iter()
        .filter(|l| l.at >= since)
        .filter_map(|l| parse_heartbeat(&l.text).map(|h| h.counter))
        .collect();
    match (seen.first(), seen.last()) {
        (Some(a), Some(b)) => (b - a + 1) - seen.len() as u64,
        _ => 0,
    }
}

/// Reads the console until it has been quiet for `quiet` (or `limit` passed).
fn drain(c: &mut Console, quiet: Duration, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        match c.next_line(quiet) {
            Ok(Some(_)) => {}
            _ => return,
        }
    }
}

/// Waits until the working set has been written once (STATUS gen >= 2).
fn warm_up(c: &mut Console, s: &Scenario) -> Result<(), BenchError> {
    c.heartbeats(50, Duration::from_secs(20))?;
    if s.dirty_mib == 0 {
        return Ok(());
    }
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        c.send("status")?;
        let st = c.wait_prefix("STATUS ", Duration::from_secs(10))?;
        let gen: u64 = field(&st.text, "gen")
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        if gen >= 2 {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

// ---------------------------------------------------------------- godwit

/// A godwit-vmm process (source or target), killed on Drop.
struct VmmProc {
    child: Child,
    api: PathBuf,
}

impl Drop for VmmProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl VmmProc {
    fn api(&self, mut req: Value) -> Result<Value, BenchError> {
        req["v"] = json!(1);
        let io = |e| BenchError::Io("control socket".into(), e);
        let mut s = UnixStream::connect(&self.api).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io)?;
        s.write_all(format!("{req}\n").as_bytes()).map_err(io)?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).map_err(io)?;
        serde_json::from_str(&line)
            .map_err(|e| BenchError::Vmm(format!("bad response {line:?}: {e}")))
    }
}

/// The godwit-vmm binary: the given one, or `target/release/godwit-vmm`
/// next to this executable, built with cargo when missing.
pub fn vmm_binary(given: Option<PathBuf>) -> Result<PathBuf, BenchError> {
    if let Some(p) = given {
        return Ok(p);
    }
    let exe = std::env::current_exe().map_err(|e| BenchError::Io("current_exe".into(), e))?;
    let p = exe
        .parent()
        .map(|d| d.join("godwit-vmm"))
        .ok_or_else(|| BenchError::Build("bench has no directory".into()))?;
    if p.exists() {
        return Ok(p);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
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

fn spawn_vmm(
    ns: &Netns,
    vmm: &Path,
    dir: &Path,
    tag: &str,
    args: &[String],
) -> Result<(VmmProc, PathBuf), BenchError> {
    let api = dir.join(format!("{tag}.api"));
    let con = dir.join(format!("{tag}.console"));
    let log = dir.join(format!("{tag}.log"));
    let err = File::create(dir.join(format!("{tag}.stderr")))
        .map_err(|e| BenchError::Io("stderr file".into(), e))?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(vmm)
        .args(args)
        .arg("--api-sock")
        .arg(&api)
        .arg("--console-sock")
        .arg(&con)
        .arg("--serial-log")
        .arg(&log)
        .args(["--timeout-s", "300"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| BenchError::Io("spawn godwit-vmm".into(), e))?;
    Ok((VmmProc { child, api }, con))
}

fn vmm_stderr(dir: &Path, tag: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{tag}.stderr"))).unwrap_or_default()
}

fn connect_console(path: &Path, timeout: Duration) -> Option<Console> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(s) = UnixStream::connect(path) {
            let r = s.try_clone().ok()?;
            return Some(Console::new(r, s));
        }
        thread::sleep(Duration::from_millis(1));
    }
    None
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

fn godwit_run(
    t: &Topology,
    vmm: &Path,
    s: &Scenario,
    link: Link,
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
    let (mut dst, dst_con) = spawn_vmm(
        &t.b,
        vmm,
        dir.path(),
        "dst",
        &[
            &["--incoming".into(), format!("{DST_IP}:{port}")][..],
            &dst_tls,
        ]
        .concat(),
    )?;
    let mut line = String::new();
    if let Some(out) = dst.child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if !line.contains("waiting for a migration") {
        return Err(BenchError::Vmm(format!(
            "target said {line:?}: {}",
            vmm_stderr(dir.path(), "dst")
        )));
    }
    let elf = guest_elf()?;
    let (src, src_con) = spawn_vmm(
        &t.a,
        vmm,
        dir.path(),
        "src",
        &[
            "--kernel".into(),
            elf.display().to_string(),
            "--memory-mib".into(),
            MEMORY_MIB.to_string(),
            "--cmdline".into(),
            cmdline(s),
            "--paused".into(),
        ]
        .into_iter()
        .chain(src_tls)
        .collect::<Vec<_>>(),
    )?;
    // The control socket is the last thing godwit-vmm creates before it
    // waits: once it exists, the console is listening too.
    let (mut src, api_end) = (src, Instant::now() + Duration::from_secs(30));
    while !src.api.exists() {
        if let Ok(Some(st)) = src.child.try_wait() {
            return Err(BenchError::Vmm(format!(
                "source exited ({st}): {}",
                vmm_stderr(dir.path(), "src")
            )));
        }
        if Instant::now() >= api_end {
            return Err(BenchError::Vmm("source made no control socket".into()));
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut src_console = connect_console(&src_con, Duration::from_secs(30)).ok_or_else(|| {
        BenchError::Vmm(format!(
            "no source console: {}",
            vmm_stderr(dir.path(), "src")
        ))
    })?;
    let ok = src.api(json!({"cmd": "resume"}))?;
    if ok["ok"] != true {
        return Err(BenchError::Vmm(format!("resume: {ok}")));
    }
    src_console.wait_prefix("READY", BOOT)?;
    warm_up(&mut src_console, s)?;

    // The target's console appears when the migration starts: poll for it.
    let (tx, rx) = mpsc::channel();
    let poll_path = dst_con.clone();
    let poller = thread::spawn(move || {
        let _ = tx.send(connect_console(
            &poll_path,
            timeout + Duration::from_secs(10),
        ));
    });
    let start = Instant::now();
    let resp = src.api(json!({
        "cmd": "migrate-send",
        "addr": format!("{DST_IP}:{port}"),
        "timeout_s": timeout.as_secs(),
    }))?;
    if resp["ok"] != true {
        return Err(BenchError::Vmm(format!("migrate-send: {resp}")));
    }
    let deadline = start + timeout + Duration::from_secs(5);
    let mut status;
    loop {
        status = src.api(json!({"cmd": "migrate-status"}))?["result"].clone();
        // Keep the console's line list current (timestamps come from its reader thread).
        let _ = src_console.next_line(Duration::from_millis(20));
        match status["stage"].as_str() {
            Some("Completed") | Some("Failed") => break,
            _ => {}
        }
        if Instant::now() >= deadline {
            let _ = src.api(json!({"cmd": "migrate-cancel"}));
            break;
        }
    }
    r.converged = status["stage"] == "Completed";
    let res = &status["result"];
    if r.converged {
        r.total_ms = res["total_ms"].as_f64().unwrap_or(0.0);
        r.downtime_ms = res["downtime_ms"].as_f64();
        r.bytes_sent = res["bytes_sent"].as_u64().unwrap_or(0);
        r.rounds = res["rounds"].as_u64().unwrap_or(0);
        r.mode = match &res["mode"] {
            Value::String(m) => m.clone(),
            other => other.to_string(),
        };
        if !res["downtime_breakdown"].is_null() {
            r.breakdown = Some(res["downtime_breakdown"].clone());
        }
    } else {
        r.total_ms = start.elapsed().as_secs_f64() * 1000.0;
        r.bytes_sent = status["progress"]["bytes_sent"].as_u64().unwrap_or(0);
        r.rounds = status["progress"]["round"].as_u64().unwrap_or(0);
        r.error = status["error"]
            .as_str()
            .map(String::from)
            .or_else(|| Some(format!("stage {}", status["stage"])));
    }
    let mut dst_console = rx.recv().ok().flatten();
    let _ = poller.join();
    if let Some(c) = dst_console.as_mut() {
        if r.converged {
            let _ = c.heartbeats(250, Duration::from_secs(10));
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
        let _ = src_console.heartbeats(250, Duration::from_secs(5));
    }
    let mut all: Vec<&Line> = src_console.lines().iter().collect();
    if let Some(c) = &dst_console {
        all.extend(c.lines().iter());
    }
    r.observed_pause_ms = observed_pause(&all, start);
    r.hb_missing = missing_heartbeats(&all, start);
    let _ = src.api(json!({"cmd": "stop"}));
    drop(dst_console);
    drop(src);
    drop(dst);
    Ok(r)
}

// ------------------------------------------------------------------ qemu

/// Which QEMU configuration to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QemuVariant {
    Default,
    AutoConverge,
    PostCopy,
}

fn qemu_run(
    t: &Topology,
    s: &Scenario,
    link: Link,
    variant: QemuVariant,
    timeout: Duration,
) -> Result<RunResult, BenchError> {
    let config = if variant == QemuVariant::Default {
        "default"
    } else {
        "best"
    };
    let mut r = RunResult::new("qemu", config, s, link);
    r.mode = match variant {
        QemuVariant::Default => "precopy",
        QemuVariant::AutoConverge => "auto-converge",
        QemuVariant::PostCopy => "postcopy",
    }
    .into();
    let port = free_port()?;
    let base = QemuConfig {
        memory_mib: MEMORY_MIB,
        cpus: 1,
        append: cmdline(s),
        acpi: false,
        ..Default::default()
    };
    let mut dst = Qemu::spawn(&QemuConfig {
        netns: Some(t.b.name().to_string()),
        incoming: Some(format!("tcp:{DST_IP}:{port}")),
        ..base.clone()
    })?;
    let mut src = Qemu::spawn(&QemuConfig {
        netns: Some(t.a.name().to_string()),
        ..base
    })?;
    src.console.wait_prefix("READY", BOOT)?;
    warm_up(&mut src.console, s)?;
    let mut qmp = src.qmp()?;
    if variant != QemuVariant::Default {
        let bw: u64 = match link {
            Link::Unlimited => 1 << 36,
            Link::Gbit => 125_000_000,
        };
        qmp.set_parameters(json!({ "max-bandwidth": bw }))?;
    }
    match variant {
        QemuVariant::AutoConverge => qmp.set_capability("auto-converge", true)?,
        QemuVariant::PostCopy => {
            qmp.set_capability("postcopy-ram", true)?;
            dst.qmp()?.set_capability("postcopy-ram", true)?;
        }
        QemuVariant::Default => {}
    }
    let start = Instant::now();
    qmp.migrate(&format!("tcp:{DST_IP}:{port}"))?;
    let deadline = start + timeout;
    let mut postcopy_started = false;
    let mut last = Value::Null;
    loop {
        let v = qmp.query_migrate()?;
        let _ = src.console.next_line(Duration::from_millis(20));
        let st = v["status"].as_str().unwrap_or("").to_string();
        last = if v.is_null() { last } else { v };
        if st == "completed" {
            r.converged = true;
            break;
        }
        if st == "failed" || st == "cancelled" {
            r.error = Some(format!("QEMU migration {st}"));
            break;
        }
        if variant == QemuVariant::PostCopy
            && !postcopy_started
            && last["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
        {
            // After the first full pass and one more: switch to post-copy.
            let _ = qmp.execute("migrate-start-postcopy", json!({}));
            postcopy_started = true;
        }
        if Instant::now() >= deadline {
            let _ = qmp.execute("migrate_cancel", json!({}));
            break;
        }
    }
    let ram = &last["ram"];
    r.bytes_sent = ram["transferred"].as_u64().unwrap_or(0);
    r.rounds = ram["dirty-sync-count"].as_u64().unwrap_or(0);
    if r.converged {
        r.total_ms = last["total-time"].as_f64().unwrap_or(0.0);
        r.downtime_ms = last["downtime"].as_f64();
        if variant == QemuVariant::PostCopy && !postcopy_started {
            r.mode = "postcopy (completed in pre-copy)".into();
        }
        let _ = dst.console.heartbeats(250, Duration::from_secs(10));
    } else {
        r.total_ms = start.elapsed().as_secs_f64() * 1000.0;
        let _ = src.console.heartbeats(250, Duration::from_secs(5));
    }
    drain(
        &mut src.console,
        Duration::from_millis(200),
        Duration::from_secs(2),
    );
    let mut all: Vec<&Line> = src.console.lines().iter().collect();
    all.extend(dst.console.lines().iter());
    r.observed_pause_ms = observed_pause(&all, start);
    r.hb_missing = missing_heartbeats(&all, start);
    Ok(r)
}

/// QEMU's best: both variants, the converged one with the lower observed pause.
fn qemu_best(
    t: &Topology,
    s: &Scenario,
    link: Link,
    timeout: Duration,
) -> Result<RunResult, BenchError> {
    let mut best: Option<RunResult> = None;
    let mut errors = Vec::new();
    for v in [QemuVariant::AutoConverge, QemuVariant::PostCopy] {
        match qemu_run(t, s, link, v, timeout) {
            Ok(r) => {
                let better = match &best {
                    None => true,
                    Some(b) => {
                        (r.converged && !b.converged)
                            || (r.converged == b.converged
                                && r.observed_pause_ms.unwrap_or(f64::MAX)
                                    < b.observed_pause_ms.unwrap_or(f64::MAX))
                    }
                };
                if better {
                    best = Some(r);
                }
            }
            Err(e) => errors.push(format!("{v:?}: {}", error_chain(&e))),
        }
    }
    match best {
        Some(b) => Ok(b),
        None => Err(BenchError::Vmm(format!(
            "QEMU best: every variant failed: {}",
            errors.join("; ")
        ))),
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Runs the benchmark; calls `report` with each result as it is measured
/// (a failed run is reported with `error` set, and the benchmark goes on).
pub fn run(
    opts: &Options,
    mut report: impl FnMut(&RunResult),
) -> Result<Vec<RunResult>, BenchError> {
    crate::qemu::check_host()?;
    let want = |e: &str| opts.engine.as_deref().is_none_or(|x| x == e);
    // Only on request: our engine over mutual TLS.
    let tls = opts.engine.as_deref() == Some("godwit-tls");
    let vmm = if want("godwit") || tls {
        Some(vmm_binary(opts.vmm.clone())?)
    } else {
        None
    };
    guest_elf()?;
    let links: &[Link] = if opts.quick {
        &[Link::Unlimited]
    } else {
        &[Link::Unlimited, Link::Gbit]
    };
    let mut out = Vec::new();
    for &link in links {
        let t = topology(link)?;
        for s in SCENARIOS
            .iter()
            .filter(|s| opts.scenario.as_deref().is_none_or(|f| s.name.contains(f)))
        {
            let mut runs: Vec<(&'static str, &'static str, Result<RunResult, BenchError>)> =
                Vec::new();
            if let Some(vmm) = &vmm {
                let config = if tls { "tls" } else { "default" };
                runs.push((
                    "godwit",
                    config,
                    godwit_run(&t, vmm, s, link, opts.timeout, tls),
                ));
                report_last(&mut runs, s, link, &mut out, &mut report);
            }
            if want("qemu") {
                runs.push((
                    "qemu",
                    "default",
                    qemu_run(&t, s, link, QemuVariant::Default, opts.timeout),
                ));
                report_last(&mut runs, s, link, &mut out, &mut report);
                runs.push(("qemu", "best", qemu_best(&t, s, link, opts.timeout)));
                report_last(&mut runs, s, link, &mut out, &mut report);
            }
        }
    }
    Ok(out)
}

type Pending = Vec<(&'static str, &'static str, Result<RunResult, BenchError>)>;

fn report_last(
    runs: &mut Pending,
    s: &Scenario,
    link: Link,
    out: &mut Vec<RunResult>,
    report: &mut impl FnMut(&RunResult),
) {
    if let Some((engine, config, r)) = runs.pop() {
        let r = r.unwrap_or_else(|e| {
            let mut f = RunResult::new(engine, config, s, link);
            f.error = Some(error_chain(&e));
            f
        });
        report(&r);
        out.push(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, at: Instant) -> Line {
        Line {
            text: text.into(),
            at,
        }
    }

    #[test]
    fn pause_is_the_largest_gap_across_both_consoles_minus_the_period() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let src = [
            line("HB 1 0", ms(0)),
            line("HB 2 0", ms(2)),
            line("HB 3 0", ms(4)),
            line("HB", ms(5)),
        ];
        let dst = [
            line("4 0", ms(40)),
            line("HB 4 0", ms(44)),
            line("HB 5 0", ms(46)),
        ];
        let all: Vec<&Line> = src.iter().chain(dst.iter()).collect();
        let p = observed_pause(&all, t0).unwrap();
        assert!((p - 38.0).abs() < 0.01, "{p}");
        // Heartbeats before the start are ignored; one heartbeat is no gap.
        assert_eq!(observed_pause(&all, ms(45)), None);
    }

    #[test]
    fn json_lines_carry_the_required_fields_in_order() {
        let r = RunResult::new("qemu", "best", &SCENARIOS[1], Link::Gbit);
        let text = r.to_json_line();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["rounds"], 0);
        assert!(text.starts_with(
            r#"{"bench":"migrate","engine":"qemu","config":"best","scenario":"dirty64m-1g","link":"1gbit","converged":false,"total_ms":"#
        ), "{text}");
        for k in ["downtime_ms", "observed_pause_ms", "bytes_sent", "rounds"] {
            assert!(text.contains(&format!("\"{k}\":")), "{text}");
        }
    }
}
