//! QEMU/KVM running the test guest: spawning `qemu-system-x86_64 -enable-kvm
//! -M microvm` with the guest ELF, its serial console on a unix socket (so a
//! test can read and write it), a QMP client for migration, and killing QEMU
//! and removing its files on Drop.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{guest_elf, Console, GuestError};

/// The QEMU binary the tests use.
pub const QEMU: &str = "qemu-system-x86_64";

/// Errors of running QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("/dev/kvm is missing or not accessible: these tests need KVM")]
    NoKvm(#[source] std::io::Error),
    #[error("{QEMU} not found in PATH: install Debian's qemu-system-x86")]
    NoQemu,
    #[error("Test guest unavailable")]
    Guest(#[source] GuestError),
    #[error("Failed to create a scratch directory")]
    RunDir(#[source] std::io::Error),
    #[error("Failed to open the network namespace")]
    Netns(#[source] std::io::Error),
    #[error("Failed to start {QEMU}")]
    Spawn(#[source] std::io::Error),
    #[error("QEMU exited early ({status}); its stderr:\n{stderr}")]
    Exited { status: String, stderr: String },
    #[error("Timed out connecting to {0}")]
    ConnectTimeout(String),
    #[error("Failed to clone the console socket")]
    Console(#[source] std::io::Error),
    #[error("QMP I/O failed")]
    QmpIo(#[source] std::io::Error),
    #[error("QMP closed the connection")]
    QmpClosed,
    #[error("QMP sent invalid JSON")]
    QmpJson(#[source] serde_json::Error),
    #[error("QMP command {command} failed: {error}")]
    QmpCommand { command: String, error: String },
    #[error("Migration failed: {0}")]
    Migration(String),
    #[error("Migration did not complete in {0:?}")]
    MigrationTimeout(Duration),
    #[error("Failed to pick a free TCP port")]
    FreePort(#[source] std::io::Error),
}

/// How to run the guest.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Guest command line (`-append`).
    pub append: String,
    /// Whether microvm describes the machine with ACPI. With `false`, QEMU
    /// appends `virtio_mmio.device=` entries to the command line (the convention
    /// our VMM uses) and the firmware provides an MP table.
    pub acpi: bool,
    /// Raw block images to attach as virtio-blk devices.
    pub disks: Vec<PathBuf>,
    /// Tap devices (in `netns`) to attach as virtio-net devices.
    pub taps: Vec<String>,
    /// Network namespace to run QEMU in.
    pub netns: Option<String>,
    /// `-incoming` URI for a migration destination.
    pub incoming: Option<String>,
    /// Extra QEMU arguments.
    pub extra: Vec<String>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            memory_mib: 256,
            cpus: 1,
            append: String::new(),
            acpi: true,
            disks: Vec::new(),
            taps: Vec::new(),
            netns: None,
            incoming: None,
            extra: Vec::new(),
        }
    }
}

/// Fails with a clear error when KVM or QEMU is missing.
pub fn check_host() -> Result<(), QemuError> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(QemuError::NoKvm)?;
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(QEMU).is_file()))
        .unwrap_or(false);
    if !found {
        return Err(QemuError::NoQemu);
    }
    Ok(())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, QemuError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(QemuError::FreePort)?;
    Ok(l.local_addr().map_err(QemuError::FreePort)?.port())
}

/// A unique directory for one QEMU process's sockets and logs.
fn run_dir() -> Result<PathBuf, QemuError> {
    unique_dir("qemu").map_err(QemuError::RunDir)
}

fn unique_dir(tag: &str) -> std::io::Result<PathBuf> {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "godwit-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d)?;
    Ok(d)
}

/// A uniquely named scratch directory (disk images and the like), removed
/// with its contents on Drop, also when a test panics.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `$TMPDIR/godwit-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<ScratchDir, QemuError> {
        Ok(ScratchDir {
            path: unique_dir(tag).map_err(QemuError::RunDir)?,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A running QEMU with the test guest; killed on Drop.
pub struct Qemu {
    child: Child,
    dir: PathBuf,
    /// The guest's serial console.
    pub console: Console,
}

impl Qemu {
    /// Starts QEMU and connects to the guest's console (QEMU waits for that
    /// connection before it runs the guest, so no line is missed).
    pub fn spawn(cfg: &QemuConfig) -> Result<Qemu, QemuError> {
        check_host()?;
        let elf = guest_elf().map_err(QemuError::Guest)?;
        let dir = run_dir()?;
        let console_path = dir.join("console.sock");
        let qmp_path = dir.join("qmp.sock");
        let stderr = File::create(dir.join("qemu.stderr")).map_err(QemuError::RunDir)?;

        let mut cmd = Command::new(QEMU);
        let machine = if cfg.acpi {
            "microvm".to_string()
        } else {
            "microvm,acpi=off".to_string()
        };
        cmd.args(["-enable-kvm", "-M", &machine])
            .args(["-m", &cfg.memory_mib.to_string()])
            .args(["-smp", &cfg.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-kernel")
            .arg(&elf)
            .args(["-append", &cfg.append])
            .arg("-chardev")
            .arg(format!(
                "socket,id=con0,path={},server=on,wait=on",
                console_path.display()
            ))
            .args(["-serial", "chardev:con0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        for (i, d) in cfg.disks.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "id=disk{i},file={},format=raw,if=none,cache=writethrough",
                    d.display()
                ))
                .args(["-device", &format!("virtio-blk-device,drive=disk{i}")]);
        }
        for (i, t) in cfg.taps.iter().enumerate() {
            cmd.arg("-netdev")
                .arg(format!("tap,id=net{i},ifname={t},script=no,downscript=no"))
                .args(["-device", &format!("virtio-net-device,netdev=net{i}")]);
        }
        if let Some(uri) = &cfg.incoming {
            cmd.args(["-incoming", uri]);
        }
        cmd.args(&cfg.extra);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        let ns_file = match &cfg.netns {
            Some(ns) => {
                Some(File::open(Path::new("/var/run/netns").join(ns)).map_err(QemuError::Netns)?)
            }
            None => None,
        };
        if let Some(f) = &ns_file {
            let fd = f.as_raw_fd();
            // SAFETY: between fork and exec the closure only calls setns(2),
            // which is async-signal-safe; the file stays open until after spawn.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(QemuError::Spawn)?;
        drop(ns_file);
        Self::finish_spawn(child, dir, &console_path)
    }

    fn finish_spawn(
        mut child: Child,
        dir: PathBuf,
        console_path: &Path,
    ) -> Result<Qemu, QemuError> {
        let stream = match connect_unix(&mut child, &dir, console_path, Duration::from_secs(30)) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let reader = stream.try_clone().map_err(QemuError::Console)?;
        Ok(Qemu {
            child,
            dir,
            console: Console::new(reader, stream),
        })
    }

    /// Connects a QMP client.
    pub fn qmp(&mut self) -> Result<Qmp, QemuError> {
        let path = self.dir.join("qmp.sock");
        let s = connect_unix(&mut self.child, &self.dir, &path, Duration::from_secs(30))?;
        Qmp::handshake(s)
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for QEMU to exit by itself (a guest power-off);
    /// its exit status, or `None` when it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn connect_unix(
    child: &mut Child,
    dir: &Path,
    path: &Path,
    timeout: Duration,
) -> Result<UnixStream, QemuError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return Ok(s);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(QemuError::Exited {
                status: status.to_string(),
                stderr: fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default(),
            });
        }
        if Instant::now() >= deadline {
            return Err(QemuError::ConnectTimeout(path.display().to_string()));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A QMP client (one command at a time; events are skipped).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn handshake(stream: UnixStream) -> Result<Qmp, QemuError> {
        let writer = stream.try_clone().map_err(QemuError::QmpIo)?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        q.read_message()?; // greeting
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, QemuError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(QemuError::QmpIo)?;
        if n == 0 {
            return Err(QemuError::QmpClosed);
        }
        serde_json::from_str(&line).map_err(QemuError::QmpJson)
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        let msg = json!({ "execute": command, "arguments": arguments });
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(QemuError::QmpIo)?;
        loop {
            let v = self.read_message()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QemuError::QmpCommand {
                    command: command.into(),
                    error: e.to_string(),
                });
            }
            // An asynchronous event: skip it.
        }
    }

    /// `migrate-set-capabilities` with one capability.
    pub fn set_capability(&mut self, name: &str, state: bool) -> Result<(), QemuError> {
        self.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [ { "capability": name, "state": state } ] }),
        )
        .map(|_| ())
    }

    /// `migrate-set-parameters`, e.g. `{"max-bandwidth": 1073741824}`.
    pub fn set_parameters(&mut self, params: Value) -> Result<(), QemuError> {
        self.execute("migrate-set-parameters", params).map(|_| ())
    }

    /// Starts a migration to `uri` (e.g. `tcp:127.0.0.1:4444`).
    pub fn migrate(&mut self, uri: &str) -> Result<(), QemuError> {
        self.execute("migrate", json!({ "uri": uri })).map(|_| ())
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<Value, QemuError> {
        self.execute("query-migrate", json!({}))
    }

    /// Polls `query-migrate` until the migration completes; returns the final
    /// status object.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.query_migrate()?;
            match v.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(v),
                Some("failed") | Some("cancelled") => {
                    return Err(QemuError::Migration(v.to_string()))
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(QemuError::MigrationTimeout(timeout));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}
