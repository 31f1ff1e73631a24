//! `godwit-vmm` processes driven from outside, as the node agent, the demo,
//! the benchmarks and the tests drive them: boot a guest in a node's
//! namespace, wait for an incoming migration, talk to the control socket,
//! attach to the console. Every process is killed and every file removed on
//! drop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{parse_heartbeat, Console};
use crate::netns::Netns;

/// Errors of driving a VMM process.
#[derive(Debug, thiserror::Error)]
pub enum VmmProcError {
    /// The binary could not be started.
    #[error("Cannot start {0}")]
    Spawn(String, #[source] std::io::Error),
    /// The process ended before it was ready.
    #[error("godwit-vmm exited before it was ready ({0})")]
    Exited(String),
    /// A wait ran out.
    #[error("Timed out waiting for {0}")]
    Timeout(String),
    /// The control socket failed.
    #[error("Control socket {0} failed")]
    Api(String, #[source] std::io::Error),
    /// The control socket answered something that is not JSON.
    #[error("Control socket answered {0:?}")]
    BadReply(String),
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

/// A running godwit-vmm.
pub struct VmmProc {
    child: Child,
    /// Control socket.
    pub api: PathBuf,
    /// Console socket.
    pub console_sock: PathBuf,
    /// Serial log file.
    pub serial_log: PathBuf,
}

impl Drop for VmmProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in [&self.api, &self.console_sock, &self.serial_log] {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn files(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("{tag}.api")),
        dir.join(format!("{tag}.console")),
        dir.join(format!("{tag}.log")),
    )
}

fn command(ns: Option<&Netns>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name()]).arg(vmm_binary());
            c
        }
        None => Command::new(vmm_binary()),
    }
}

impl VmmProc {
    /// Boots a VM paused (in `ns` if given) with `args` (kernel, memory,
    /// cmdline, devices), files under `dir/<tag>.*`; call [`VmmProc::console`]
    /// then `resume` so no line is missed.
    pub fn boot(
        ns: Option<&Netns>,
        dir: &Path,
        tag: &str,
        args: &[String],
    ) -> Result<VmmProc, VmmProcError> {
        let (api, console_sock, serial_log) = files(dir, tag);
        let mut child = command(ns)
            .args(args)
            .arg("--paused")
            .arg("--api-sock")
            .arg(&api)
            .arg("--console-sock")
            .arg(&console_sock)
            .arg("--serial-log")
            .arg(&serial_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| VmmProcError::Spawn(vmm_binary().display().to_string(), e))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !api.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
                return Err(VmmProcError::Exited(format!("{status}: {}", err.trim())));
            }
            if Instant::now() > deadline {
                return Err(VmmProcError::Timeout("the control socket".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(VmmProc {
            child,
            api,
            console_sock,
            serial_log,
        })
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
        let (api, console_sock, serial_log) = files(dir, tag);
        let mut cmd = command(ns);
        cmd.args(["--incoming", addr]).args(args);
        let mut child = cmd
            .arg("--api-sock")
            .arg(&api)
            .arg("--console-sock")
            .arg(&console_sock)
            .arg("--serial-log")
            .arg(&serial_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| VmmProcError::Spawn(vmm_binary().display().to_string(), e))?;
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line);
        if !line.contains("waiting for a migration") {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(VmmProcError::Exited(format!("{status}: {}", line.trim())));
        }
        Ok(VmmProc {
            child,
            api,
            console_sock,
            serial_log,
        })
    }

    /// One control request (`"v"` is added); returns the whole response.
    pub fn api(&self, mut request: Value) -> Result<Value, VmmProcError> {
        request["v"] = json!(1);
        let err = |e| VmmProcError::Api(self.api.display().to_string(), e);
        let mut s = UnixStream::connect(&self.api).map_err(err)?;
        s.write_all(format!("{request}\n").as_bytes())
            .map_err(err)?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).map_err(err)?;
        serde_json::from_str(&line).map_err(|_| VmmProcError::BadReply(line))
    }

    /// Attaches to the console, waiting up to `timeout` for its socket.
    pub fn console(&self, timeout: Duration) -> Result<Console, VmmProcError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = UnixStream::connect(&self.console_sock) {
                let w = s
                    .try_clone()
                    .map_err(|e| VmmProcError::Api(self.console_sock.display().to_string(), e))?;
                return Ok(Console::new(s, w));
            }
            if Instant::now() > deadline {
                return Err(VmmProcError::Timeout("the console socket".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Heartbeat counters in the serial log so far, in order.
    pub fn logged_heartbeats(&self) -> Vec<u64> {
        std::fs::read_to_string(&self.serial_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| parse_heartbeat(l.trim_end()).map(|h| h.counter))
            .collect()
    }

    /// Starts a live migration to `addr` with `options` (extra migrate-send
    /// fields) and polls its status every `poll`, handing each to `on_progress`,
    /// until it completes or fails; returns the final status.
    pub fn migrate(
        &self,
        addr: &str,
        options: Value,
        poll: Duration,
        timeout: Duration,
        mut on_progress: impl FnMut(&Value),
    ) -> Result<Value, VmmProcError> {
        let mut req = json!({"cmd": "migrate-send", "addr": addr});
        if let Some(o) = options.as_object() {
            for (k, v) in o {
                req[k] = v.clone();
            }
        }
        let r = self.api(req)?;
        if r["ok"] != true {
            return Err(VmmProcError::BadReply(r.to_string()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.api(json!({"cmd": "migrate-status"}))?["result"].clone();
            on_progress(&status);
            if matches!(status["stage"].as_str(), Some("Completed" | "Failed")) {
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
