//! Shared harness for the godwit-vmm integration tests: runs the real
//! binary under real KVM against the Godwit test guest, with a private
//! scratch directory, the console attached before the guest starts, and
//! everything cleaned up in Drop.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use godwit_testkit::guest::{guest_elf, Console};
use godwit_testkit::vmmproc::{call_envelope, CONTROL_TIMEOUT};
use godwit_vmm_control::{Command as Cmd, ControlClient};
use serde_json::Value;

/// The godwit-vmm binary built with these tests.
pub const VMM: &str = env!("CARGO_BIN_EXE_godwit-vmm");

/// Fails the test (never skips) when KVM is not there.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: these tests boot a real guest under KVM; run them on a host with KVM"
    );
}

/// The test guest ELF (built once per process).
pub fn guest() -> PathBuf {
    guest_elf().expect("build the test guest (e2e/testguest/build.sh)")
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `/tmp/godwit-vmm-<name>-<pid>`, fresh.
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("godwit-vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    /// A path inside.
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running godwit-vmm with its console attached.
pub struct Vm {
    pub child: Child,
    pub api: PathBuf,
    pub console: Console,
    pub serial_log: PathBuf,
}

/// The client of the control socket at `api`.
pub fn control(api: &Path) -> ControlClient {
    ControlClient::new(api).with_timeout(CONTROL_TIMEOUT)
}

/// One control call to the socket at `api`; returns the response object
/// (`ok` with its `result`, or not `ok` with the VMM's `error`).
pub fn call(api: &Path, cmd: Cmd) -> Value {
    call_envelope(&control(api), cmd).unwrap_or_else(|e| panic!("control call: {e}"))
}

/// Runs the VMM with the capabilities the node agent leaves it (only
/// CAP_NET_ADMIN; see `vmm::sandbox::bound_capabilities_for_exec`), so the
/// suites prove it needs no more.
pub const BOUNDED: &[&str] = &["setpriv", "--bounding-set=-all,+net_admin", "--"];

/// Starts godwit-vmm with `args` plus `--paused` and sockets/log under
/// `dir/<tag>.*`, attaches the console, then resumes the guest so no
/// output is missed. `prefix` runs the binary through another program
/// (e.g. `ip netns exec NS`).
pub fn start_vm(dir: &Scratch, tag: &str, prefix: &[&str], args: &[String]) -> Vm {
    require_kvm();
    let api = dir.path(&format!("{tag}.api"));
    let con = dir.path(&format!("{tag}.console"));
    let log = dir.path(&format!("{tag}.log"));
    let mut all: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    all.extend(BOUNDED.iter().map(|s| s.to_string()));
    all.push(VMM.into());
    all.extend(args.iter().cloned());
    all.extend([
        "--paused".into(),
        "--api-sock".into(),
        api.display().to_string(),
        "--console-sock".into(),
        con.display().to_string(),
        "--serial-log".into(),
        log.display().to_string(),
        "--timeout-s".into(),
        "120".into(),
    ]);
    let mut child = Command::new(&all[0])
        .args(&all[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn godwit-vmm");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !api.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("godwit-vmm exited early ({st}): {err}");
        }
        assert!(
            Instant::now() < deadline,
            "godwit-vmm did not create its control socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let stream = UnixStream::connect(&con).expect("connect console");
    let console = Console::new(stream.try_clone().unwrap(), stream);
    let vm = Vm {
        child,
        api,
        console,
        serial_log: log,
    };
    let r = vm.api(Cmd::Resume);
    assert_eq!(r["ok"], true, "resume: {r}");
    vm
}

impl Vm {
    /// The client of this VMM's control socket.
    pub fn control(&self) -> ControlClient {
        control(&self.api)
    }

    /// One control call; returns the response object (see [`call`]).
    pub fn api(&self, cmd: Cmd) -> Value {
        call(&self.api, cmd)
    }

    /// One request line sent as it is (a malformed or unknown request);
    /// returns the response object.
    pub fn raw(&self, line: &str) -> Value {
        let response = self
            .control()
            .send_line(line)
            .expect("control socket answers");
        serde_json::to_value(response).expect("responses serialise")
    }

    /// Waits for the process to exit (up to `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "godwit-vmm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs godwit-vmm to completion (for bad-input cases).
pub fn run_vmm(args: &[&str]) -> Output {
    Command::new(VMM)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run godwit-vmm")
}

/// Time allowed for the test guest to boot on this nested KVM (its 32-bit
/// entry code runs emulated and takes over a second).
pub const BOOT: Duration = Duration::from_secs(30);
