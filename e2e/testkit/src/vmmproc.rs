//! `godwit-vmm` processes driven from outside, as the node agent, the demo,
//! the benchmarks and the tests drive them: boot a guest (in a node's
//! namespace, if given), wait for an incoming migration, talk to the control
//! socket (through `godwit-vmm-control`'s client), attach to the console. Every process is killed and every file
//! removed on drop.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use godwit_vmm_control::{
    Command as ControlCommand, ControlClient, ControlError, MigrateSend, Progress, Response, Stage,
};
use serde_json::Value;

use crate::guest::{parse_heartbeat, Console};
use crate::netns::Netns;

/// Errors of driving a VMM process.
#[derive(Debug, thiserror::Error)]
pub enum VmmProcError {
    /// The binary could not be started.
    #[error("Cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    /// The stderr file could not be created.
    #[error("Cannot create {0}")]
    StderrFile(String, #[source] std::io::Error),
    /// The process ended before it was ready.
    #[error("godwit-vmm exited before it was ready ({0})")]
    Exited(String),
    /// A wait ran out.
    #[error("Timed out waiting for {0}")]
    Timeout(String),
    /// The console socket could not be shared between reader and writer.
    #[error("Console socket {0} failed")]
    Console(String, #[source] std::io::Error),
    /// A control call failed.
    #[error("Control call failed")]
    Control(#[from] ControlError),
}

/// How long the test kit's control calls wait for an answer.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// One control call answered as the whole response envelope
/// (`{"v":1,"ok":true,"result":..}` or `{"v":1,"ok":false,"error":..}`),
/// whether the VMM accepted the command or refused it: for tests that
/// check either. A call that reached no answer is an error.
pub fn call_envelope(client: &ControlClient, cmd: ControlCommand) -> Result<Value, ControlError> {
    let response = match client.call(cmd) {
        Ok(result) => Response::ok(result),
        Err(ControlError::Refused { reason, .. }) => Response::err(reason),
        Err(e) => return Err(e),
    };
    Ok(serde_json::to_value(response).expect("responses serialise"))
}

/// Where the godwit-vmm binary is: `$GODWIT_VMM`, else next to the running
/// executable (or its parent, for test binaries in `deps/`).
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("GODWIT_VMM") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join("godwit-vmm");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("godwit-vmm")
}

/// Attaches to the console socket at `path`, waiting up to `timeout` for it
/// to appear (a migration target's appears when the migration starts).
pub fn attach_console(path: &Path, timeout: Duration) -> Result<Console, VmmProcError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            let w = s
                .try_clone()
                .map_err(|e| VmmProcError::Console(path.display().to_string(), e))?;
            return Ok(Console::new(s, w));
        }
        if Instant::now() > deadline {
            return Err(VmmProcError::Timeout("the console socket".into()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How to start a godwit-vmm (see [`VmmProc::spawn`]): which binary, in
/// which namespace, with which further arguments, where its stderr goes.
/// [`VmmSpawn::boot`] or [`VmmSpawn::incoming`] starts it.
pub struct VmmSpawn<'a> {
    dir: &'a Path,
    tag: &'a str,
    binary: PathBuf,
    ns: Option<&'a Netns>,
    args: Vec<String>,
    stderr_file: bool,
    ready: Duration,
}

impl<'a> VmmSpawn<'a> {
    /// Runs `binary` instead of [`vmm_binary`]'s.
    pub fn binary(mut self, binary: &Path) -> Self {
        self.binary = binary.to_path_buf();
        self
    }

    /// Runs the VMM in `ns` (`ip netns exec`), if given.
    pub fn netns(mut self, ns: Option<&'a Netns>) -> Self {
        self.ns = ns;
        self
    }

    /// Adds arguments (`--kernel`, `--net`, `--disk`, `--tls-cert`, ...).
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Writes stderr to `<dir>/<tag>.stderr` (see [`VmmProc::stderr`]).
    pub fn stderr_to_file(mut self) -> Self {
        self.stderr_file = true;
        self
    }

    /// How long [`VmmSpawn::boot`] waits for the control socket (20 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready = timeout;
        self
    }

    fn files(&self) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let f = |ext: &str| self.dir.join(format!("{}.{ext}", self.tag));
        (f("api"), f("console"), f("log"), f("stderr"))
    }

    /// The command line with the socket and log paths added.
    fn command(&self, api: &Path, console: &Path, log: &Path) -> Command {
        let mut c = match self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.name()]).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        c.args(&self.args)
            .arg("--api-sock")
            .arg(api)
            .arg("--console-sock")
            .arg(console)
            .arg("--serial-log")
            .arg(log)
            .stdin(Stdio::null());
        c
    }

    fn stderr(&self, path: &Path, otherwise: Stdio) -> Result<Stdio, VmmProcError> {
        if !self.stderr_file {
            return Ok(otherwise);
        }
        std::fs::File::create(path)
            .map(Stdio::from)
            .map_err(|e| VmmProcError::StderrFile(path.display().to_string(), e))
    }

    fn start(&self, mut cmd: Command) -> Result<Child, VmmProcError> {
        cmd.spawn()
            .map_err(|e| VmmProcError::Spawn(self.binary.display().to_string(), e))
    }

    /// Boots a VM paused; call [`VmmProc::console`] then `resume` so no line
    /// is missed.
    pub fn boot(mut self) -> Result<VmmProc, VmmProcError> {
        self.args.push("--paused".into());
        let (api, console_sock, serial_log, stderr_log) = self.files();
        let mut cmd = self.command(&api, &console_sock, &serial_log);
        cmd.stdout(Stdio::null())
            .stderr(self.stderr(&stderr_log, Stdio::piped())?);
        let child = self.start(cmd)?;
        let mut vmm = VmmProc {
            child,
            api,
            console_sock,
            serial_log,
            stderr_log: self.stderr_file.then_some(stderr_log),
        };
        let deadline = Instant::now() + self.ready;
        while !vmm.api.exists() {
            if let Ok(Some(status)) = vmm.child.try_wait() {
                return Err(VmmProcError::Exited(format!(
                    "{status}: {}",
                    vmm.stderr().trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(VmmProcError::Timeout("the control socket".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(vmm)
    }

    /// Starts a VMM waiting for a migration on `addr`; returns once it
    /// says it listens.
    pub fn incoming(mut self, addr: &str) -> Result<VmmProc, VmmProcError> {
        self.args
            .splice(0..0, ["--incoming".to_string(), addr.to_string()]);
        let (api, console_sock, serial_log, stderr_log) = self.files();
        let mut cmd = self.command(&api, &console_sock, &serial_log);
        cmd.stdout(Stdio::piped())
            .stderr(self.stderr(&stderr_log, Stdio::inherit())?);
        let mut child = self.start(cmd)?;
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line);
        let mut vmm = VmmProc {
            child,
            api,
            console_sock,
            serial_log,
            stderr_log: self.stderr_file.then_some(stderr_log),
        };
        if !line.contains("waiting for a migration") {
            let _ = vmm.child.kill();
            let status = vmm.child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(VmmProcError::Exited(format!(
                "{status}: {} {}",
                line.trim(),
                vmm.stderr().trim()
            )));
        }
        Ok(vmm)
    }
}

/// A running godwit-vmm.
pub struct VmmProc {
    child: Child,
    /// Control socket.
    pub api: PathBuf,
    /// Console socket.
    pub console_sock: PathBuf,
    /// Serial log file.
    pub serial_log: PathBuf,
    stderr_log: Option<PathBuf>,
}

impl Drop for VmmProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in [&self.api, &self.console_sock, &self.serial_log] {
            let _ = std::fs::remove_file(p);
        }
        if let Some(p) = &self.stderr_log {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl VmmProc {
    /// A godwit-vmm to start with its files under `dir/<tag>.*` (control
    /// socket `.api`, console socket `.console`, serial log `.log`).
    pub fn spawn<'a>(dir: &'a Path, tag: &'a str) -> VmmSpawn<'a> {
        VmmSpawn {
            dir,
            tag,
            binary: vmm_binary(),
            ns: None,
            args: Vec::new(),
            stderr_file: false,
            ready: Duration::from_secs(20),
        }
    }

    /// Boots a VM paused (in `ns` if given) with `args` (kernel, memory,
    /// cmdline, devices), files under `dir/<tag>.*`; call [`VmmProc::console`]
    /// then `resume` so no line is missed.
    pub fn boot(
        ns: Option<&Netns>,
        dir: &Path,
        tag: &str,
        args: &[String],
    ) -> Result<VmmProc, VmmProcError> {
        VmmProc::spawn(dir, tag).netns(ns).args(args).boot()
    }

    /// Starts a VMM waiting for a migration on `addr` (in `ns` if given), with
    /// `net` as its NIC settings (`tap=..,bridge=..`).
    pub fn incoming(
        ns: Option<&Netns>,
        dir: &Path,
        tag: &str,
        addr: &str,
        net: &[String],
    ) -> Result<VmmProc, VmmProcError> {
        let args: Vec<String> = net
            .iter()
            .flat_map(|n| ["--net".to_string(), n.clone()])
            .collect();
        VmmProc::incoming_with(ns, dir, tag, addr, &args)
    }

    /// As [`VmmProc::incoming`], with any further `args` (`--net`, `--disk`,
    /// `--tls-cert`, ...).
    pub fn incoming_with(
        ns: Option<&Netns>,
        dir: &Path,
        tag: &str,
        addr: &str,
        args: &[String],
    ) -> Result<VmmProc, VmmProcError> {
        VmmProc::spawn(dir, tag).netns(ns).args(args).incoming(addr)
    }

    /// What the process wrote to stderr, when it goes to a file
    /// ([`VmmSpawn::stderr_to_file`]) or to a pipe and the process ended.
    pub fn stderr(&mut self) -> String {
        let mut text = String::new();
        match &self.stderr_log {
            Some(p) => text = std::fs::read_to_string(p).unwrap_or_default(),
            None => {
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut text);
                }
            }
        }
        text
    }

    /// The client of this VMM's control socket.
    pub fn control(&self) -> ControlClient {
        ControlClient::new(&self.api).with_timeout(CONTROL_TIMEOUT)
    }

    /// Attaches to the console, waiting up to `timeout` for its socket.
    pub fn console(&self, timeout: Duration) -> Result<Console, VmmProcError> {
        attach_console(&self.console_sock, timeout)
    }

    /// Heartbeat counters in the serial log so far, in order.
    pub fn logged_heartbeats(&self) -> Vec<u64> {
        std::fs::read_to_string(&self.serial_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| parse_heartbeat(l.trim_end()).map(|h| h.counter))
            .collect()
    }

    /// Starts the live migration `send` and polls its status every `poll`,
    /// handing each to `on_progress`, until it completes or fails; returns
    /// the final status.
    pub fn migrate(
        &self,
        send: MigrateSend,
        poll: Duration,
        timeout: Duration,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<Progress, VmmProcError> {
        let control = self.control();
        control.migrate_send(send)?;
        let deadline = Instant::now() + timeout;
        loop {
            let status = control.migrate_status()?;
            on_progress(&status);
            if matches!(status.stage, Stage::Completed | Stage::Failed) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(VmmProcError::Timeout("the migration".into()));
            }
            std::thread::sleep(poll);
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits up to `timeout` for the process to exit; its status code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// Where a migrated guest's heartbeat switched consoles: the source's last
/// heartbeat, the target's first, and whether the line between them was split
/// by the switch-over (the source's log ends mid-line; the guest's README says
/// the target then prints the rest of that line).
pub fn switch_over(source: &VmmProc, target: &VmmProc) -> (u64, u64, bool) {
    let log = std::fs::read_to_string(&source.serial_log).unwrap_or_default();
    let cut = !log.is_empty() && !log.ends_with('\n');
    let last = source.logged_heartbeats().last().copied().unwrap_or(0);
    let first = target.logged_heartbeats().first().copied().unwrap_or(0);
    (last, first, cut)
}
