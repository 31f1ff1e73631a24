//! This node's VMM processes: how they are started (to boot a VM, or to
//! receive one), stopped, and reaped.
//!
//! VMM processes run in their own session (`setsid`), so they outlive the
//! agent: a daemon restart or upgrade leaves the guests running, and the
//! next agent adopts them through their VM directories ([`super::vm_dir`]).
//! Each runs in its own mount namespace ([`node_jail`],
//! [`crate::vmm::jail`]): it sees its own VM's directories and no other
//! VM's, no service account token, and writes only to its own files; then
//! as its VM's own user with no capability at all
//! ([`super::vmm_user::VmmUsers`]; or, as root, with none but
//! `CAP_NET_ADMIN`, [`crate::vmm::sandbox`]).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use godwit_crds::contract::Machine;

use super::boot::{self, Boot, BootError};
use super::disks::{self, provision_disk, DiskError};
use super::seed::seed_path;
use super::vm_dir::{process_alive, tap_name, VmDir, VmDirError};
use super::vmm_user::{hand_over, Handover, VmmUserError, VmmUsers};
use crate::migration::tls::TlsFiles;
use crate::vmm::jail::{Access, Jail, JailPolicy};

/// Errors starting a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmProcessError {
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The VMM did not come up.
    #[error("VMM did not start: {0}")]
    Start(String),
    /// The VMM's mount namespace could not be prepared.
    #[error("Cannot prepare the mount namespace of the VMM of {0}")]
    Jail(PathBuf, #[source] crate::vmm::jail::JailError),
    /// The VM's directory could not be prepared.
    #[error(transparent)]
    Dir(#[from] VmDirError),
    /// The VM's disks could not be made.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The kernel in the VM's image (`boot.fromImage`) could not be found.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// What the VMM's own user needs could not be prepared.
    #[error(transparent)]
    User(#[from] VmmUserError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmProcessError {
    let what = what.into();
    move |e| VmmProcessError::Io(what, e)
}

/// How this node runs VMMs.
#[derive(Clone, Debug)]
pub struct Runner {
    /// The `godwit-vmm` binary.
    pub vmm_binary: PathBuf,
    /// The node's migration identity (mutual TLS), if configured.
    pub tls: Option<TlsFiles>,
    /// What every VMM's mount namespace hides ([`node_jail`]); each VMM
    /// keeps its own files on top. `None`: VMMs share the agent's mounts.
    pub jail: Option<JailPolicy>,
    /// Run each VMM as its own unprivileged user ([`VmmUsers`]); `None`:
    /// as root, with `CAP_NET_ADMIN` alone.
    pub users: Option<VmmUsers>,
}

/// The mount namespace policy of this node's VMMs ([`crate::vmm::jail`]):
/// every VM's directory and shared directory hidden (each VMM gets its own
/// back), the service account's token and `secrets` (e.g. the migration CA)
/// hidden, everything else read-only.
pub fn node_jail(state_dir: &Path, shared_dir: &Path, secrets: &[PathBuf]) -> JailPolicy {
    let mut hide = vec![
        state_dir.join("vms"),
        shared_dir.to_path_buf(),
        PathBuf::from("/run/secrets"),
        PathBuf::from("/var/run/secrets"),
    ];
    hide.extend(secrets.iter().cloned());
    JailPolicy {
        hide,
        keep: Vec::new(),
        read_only_root: true,
    }
}

/// The VMM's exit status is written by the `sh` that runs it, so it is known
/// even when the agent was not running at the time.
const WRAPPER: &str = r#""$0" "$@"; echo $? > "$GODWIT_EXIT_FILE""#;

impl Runner {
    /// What the VMM of `dir` keeps in its mount namespace: its directories
    /// and `disks` writable, everything else it is given to read.
    fn keep(
        &self,
        dir: &VmDir,
        boot: Option<&Boot>,
        disks: &[(PathBuf, bool)],
    ) -> Vec<(PathBuf, Access)> {
        let mut keep = vec![
            (dir.path.clone(), Access::ReadWrite),
            (dir.shared.clone(), Access::ReadWrite),
            (dir.cache.clone(), Access::ReadOnly),
            (self.vmm_binary.clone(), Access::ReadOnly),
        ];
        if let Some(boot) = boot {
            keep.push((PathBuf::from(&boot.kernel), Access::ReadOnly));
            if let Some(initrd) = &boot.initrd {
                keep.push((PathBuf::from(initrd), Access::ReadOnly));
            }
        }
        for (path, read_only) in disks {
            let access = if *read_only {
                Access::ReadOnly
            } else {
                Access::ReadWrite
            };
            keep.push((path.clone(), access));
        }
        if let (Some(tls), None) = (&self.tls, self.users) {
            for f in [&tls.cert, &tls.key, &tls.ca] {
                keep.push((f.clone(), Access::ReadOnly));
            }
        }
        keep
    }

    fn spawn(
        &self,
        dir: &VmDir,
        machine: &Machine,
        args: &[String],
        keep: Vec<(PathBuf, Access)>,
    ) -> Result<Child, VmmProcessError> {
        for f in ["exit", "stop-requested", "api.sock", "console.sock"] {
            let _ = fs::remove_file(dir.file(f));
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.file("vmm.log"))
            .map_err(io(format!("open {}", dir.file("vmm.log").display())))?;
        let err = log.try_clone().map_err(io("dup vmm.log"))?;
        let uid = self.users.map(|u| u.of(&dir.namespace, &dir.name));
        let mut handover = match uid {
            Some(uid) => hand_over(dir, machine, &keep, uid, self.tls.as_ref())?,
            None => Handover::default(),
        };
        let binary = match uid {
            Some(_) => handover.reachable(&self.vmm_binary, 0o005)?,
            None => self.vmm_binary.display().to_string(),
        };
        let mut args = args.to_vec();
        if uid.is_some() {
            for flag in ["--kernel", "--initrd"] {
                if let Some(i) = args.iter().position(|a| a == flag) {
                    args[i + 1] = handover.reachable(Path::new(&args[i + 1]), 0o004)?;
                }
            }
        }
        args.extend(handover.args.iter().cloned());
        let inherited: Vec<i32> = {
            use std::os::fd::AsRawFd;
            handover.fds.iter().map(|f| f.as_raw_fd()).collect()
        };
        let capabilities: &'static [u32] = match uid {
            Some(_) => &[],
            None => crate::vmm::sandbox::VMM_CAPABILITIES,
        };
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg(&binary)
            .args(&args)
            .env("GODWIT_EXIT_FILE", dir.file("exit"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let jail = match &self.jail {
            Some(policy) => {
                let policy = JailPolicy {
                    keep,
                    ..policy.clone()
                };
                Some(
                    Jail::prepare(&policy)
                        .map_err(|e| VmmProcessError::Jail(dir.path.clone(), e))?,
                )
            }
            None => None,
        };
        // SAFETY: fcntl, setsid, prctl, the raw set*id calls and what
        // `Jail::enter_for_exec` does (mount, unshare, mkdir, open on
        // prepared paths) are async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // The handed descriptors survive the exec.
                for &fd in &inherited {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Mounting needs CAP_SYS_ADMIN: before the bounding set goes.
                if let Some(jail) = &jail {
                    jail.enter_for_exec()?;
                }
                // The VMM keeps only the capabilities it needs.
                crate::vmm::sandbox::bound_capabilities_for_exec(capabilities)?;
                match uid {
                    Some(uid) => crate::vmm::sandbox::become_user_for_exec(uid),
                    None => Ok(()),
                }
            });
        }
        let child = cmd
            .spawn()
            .map_err(io(format!("run {}", self.vmm_binary.display())))?;
        // The VMM holds the descriptors now (a tap lives as long as it does).
        drop(handover);
        fs::write(dir.file("pid"), child.id().to_string()).map_err(io("write pid"))?;
        Ok(child)
    }

    /// Creates the VM's disks (when missing) and boots it. With
    /// `boot.fromImage`, the kernel comes out of the image first
    /// ([`boot::resolve`]); when it cannot, no VMM starts. Its cloud-init
    /// seed ([`super::seed::write`], written before) is the last disk.
    pub fn boot(&self, dir: &VmDir, machine: &Machine) -> Result<Child, VmmProcessError> {
        dir.create()?;
        let _ = fs::remove_file(dir.file("incoming"));
        dir.write_machine(machine)?;
        let boot = boot::resolve(dir, machine)?;
        let mut args = vec![
            "--kernel".to_string(),
            boot.kernel.clone(),
            "--memory-mib".into(),
            (machine.memory_bytes >> 20).to_string(),
            "--vcpus".into(),
            machine.cpu.to_string(),
            "--cmdline".into(),
            boot.cmdline.clone(),
        ];
        if let Some(initrd) = &boot.initrd {
            args.extend(["--initrd".into(), initrd.clone()]);
        }
        let mut disks = Vec::new();
        for disk in &machine.disks {
            let path = provision_disk(dir, disk)?;
            args.extend(["--disk".into(), disk_arg(&path, disk.read_only)]);
            disks.push((path, disk.read_only));
        }
        attach_seed(dir, machine, &mut args, &mut disks)?;
        args.extend(self.common_args(dir, machine));
        self.spawn(dir, machine, &args, self.keep(dir, Some(&boot), &disks))
    }

    /// Starts a VMM that waits for `machine`'s migration on `addr`; with
    /// `copy_disks`, first creates the disks the migration copies
    /// ([`super::disks`]).
    pub fn incoming(
        &self,
        dir: &VmDir,
        machine: &Machine,
        migration: &str,
        addr: &str,
        copy_disks: bool,
    ) -> Result<Child, VmmProcessError> {
        dir.create()?;
        fs::write(dir.file("incoming"), migration).map_err(io("write incoming"))?;
        dir.write_machine(machine)?;
        let mut args = vec!["--incoming".to_string(), addr.to_string()];
        let paths = disks::prepare_target(dir, machine, copy_disks)?;
        let mut disks = Vec::new();
        for (disk, path) in machine.disks.iter().zip(paths) {
            args.extend(["--disk".into(), disk_arg(&path, disk.read_only)]);
            disks.push((path, disk.read_only));
        }
        attach_seed(dir, machine, &mut args, &mut disks)?;
        args.extend(self.common_args(dir, machine));
        // A migrated guest brings its kernel in memory; a kernel file named
        // on the node stays visible as before (a fromImage one is in the
        // cache, which the VMM sees anyway).
        let named = (!machine.kernel.is_empty()).then(|| Boot {
            kernel: machine.kernel.clone(),
            initrd: machine.initrd.clone(),
            cmdline: String::new(),
        });
        self.spawn(dir, machine, &args, self.keep(dir, named.as_ref(), &disks))
    }

    fn common_args(&self, dir: &VmDir, machine: &Machine) -> Vec<String> {
        let mut args = vec![
            "--serial-log".to_string(),
            dir.file("console.log").display().to_string(),
            "--console-sock".into(),
            dir.file("console.sock").display().to_string(),
            "--api-sock".into(),
            dir.api_sock().display().to_string(),
        ];
        // A VMM that runs as its own user gets the identity on a pipe
        // ([`hand_over`]).
        if let (Some(tls), None) = (&self.tls, self.users) {
            for (flag, path) in [
                ("--tls-cert", &tls.cert),
                ("--tls-key", &tls.key),
                ("--tls-ca", &tls.ca),
            ] {
                args.extend([flag.to_string(), path.display().to_string()]);
            }
        }
        for (i, nic) in machine.networks.iter().enumerate() {
            args.extend([
                "--net".into(),
                format!(
                    "tap={},bridge={},mac={}",
                    tap_name(&dir.namespace, &dir.name, i),
                    nic.bridge,
                    nic.mac
                ),
            ]);
        }
        args
    }
}

/// Adds the VM's cloud-init seed, read-only, after its other disks: the
/// source and the target of a migration attach the same disks in the same
/// order.
fn attach_seed(
    dir: &VmDir,
    machine: &Machine,
    args: &mut Vec<String>,
    disks: &mut Vec<(PathBuf, bool)>,
) -> Result<(), VmmProcessError> {
    if let Some(path) = seed_path(dir, machine) {
        if !path.exists() {
            return Err(VmmProcessError::Start(format!(
                "the cloud-init seed {} was not written",
                path.display()
            )));
        }
        args.extend(["--disk".into(), disk_arg(&path, true)]);
        disks.push((path, true));
    }
    Ok(())
}

fn disk_arg(path: &Path, read_only: bool) -> String {
    let ro = if read_only { ",ro=on" } else { "" };
    format!("path={}{ro}", path.display())
}

/// Stops the VM: a clean `stop`, then SIGTERM, then SIGKILL to its process
/// group, each after `grace`. Records that the stop was asked for.
pub fn stop(dir: &VmDir, grace: Duration) {
    let _ = fs::write(dir.file("stop-requested"), "");
    let st = dir.state();
    let Some(pid) = st.pid.filter(|_| st.alive) else {
        return;
    };
    let _ = dir.control().stop();
    for signal in [0, libc::SIGTERM, libc::SIGKILL] {
        if signal != 0 {
            // SAFETY: signalling a process group we started.
            unsafe { libc::kill(-pid, signal) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !process_alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits until the incoming VMM says where it listens; returns that address.
pub fn wait_listening(dir: &VmDir, timeout: Duration) -> Result<String, VmmProcessError> {
    const MARK: &str = "godwit-vmm: waiting for a migration on ";
    let deadline = Instant::now() + timeout;
    loop {
        let log = fs::read_to_string(dir.file("vmm.log")).unwrap_or_default();
        if let Some(addr) = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(MARK))
            .map(|a| a.trim().to_string())
        {
            return Ok(addr);
        }
        let st = dir.state();
        if !st.alive && (st.exit.is_some() || Instant::now() > deadline) {
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            return Err(VmmProcessError::Start(format!(
                "incoming VMM exited (status {:?}): {}",
                st.exit,
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )));
        }
        if Instant::now() > deadline {
            return Err(VmmProcessError::Start(format!(
                "incoming VMM did not listen within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Child processes this agent started and must reap; adopted VMMs (started
/// by an earlier agent) are watched through their directory only.
#[derive(Default)]
pub struct Children(BTreeMap<PathBuf, Child>);

impl Children {
    /// Remembers a VMM this agent started.
    pub fn insert(&mut self, dir: &VmDir, child: Child) {
        self.0.insert(dir.path.clone(), child);
    }

    /// Reaps the VMMs that ended (their `exit` file says how).
    pub fn reap(&mut self) {
        self.0
            .retain(|_, child| matches!(child.try_wait(), Ok(None)));
    }
}
