//! This node's VMM processes: how they are started (to boot a VM, or to
//! receive one), stopped, and reaped.
//!
//! VMM processes run in their own session (`setsid`) and their VM's own
//! cgroup ([`super::cgroup`], joined between fork and exec), so they
//! outlive the agent: with the host's PID namespace (the chart's
//! `hostPID: true`) and outside the agent container's cgroup, a daemon
//! restart or upgrade leaves the guests running, and the next agent adopts
//! them through their VM directories ([`super::vm_dir`]) or, when a `pid`
//! file is lost, their cgroups ([`settle_cgroups`]).
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
use std::time::{Duration, Instant, SystemTime};

use godwit_crds::contract::Machine;

use super::boot::{self, Boot, BootError};
use super::cgroup::{CgroupError, Cgroups, Limits};
use super::disks::{self, provision_disk, DiskError};
use super::image_dirs::{ImageDirs, PathRefused};
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
    /// The VM names a file outside the node's image directories.
    #[error(transparent)]
    PathRefused(#[from] PathRefused),
    /// What the VMM's own user needs could not be prepared.
    #[error(transparent)]
    User(#[from] VmmUserError),
    /// The VM's cgroup could not be made.
    #[error("Cannot prepare the cgroup of the VMM")]
    Cgroup(#[from] CgroupError),
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
    /// Start each VMM in its VM's own cgroup ([`super::cgroup`]); `None`:
    /// in the agent's.
    pub cgroups: Option<Cgroups>,
    /// Where the files a VM names may be: every one is checked before
    /// anything is made or started ([`ImageDirs::check_machine`]), and the
    /// kernel and initrd are handed over as the descriptors opened there.
    pub image_dirs: ImageDirs,
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
            // A handed descriptor needs no path in the VMM's mounts.
            let named = |p: &str| (!p.starts_with("/proc/self/fd/")).then(|| PathBuf::from(p));
            keep.extend(named(&boot.kernel).map(|p| (p, Access::ReadOnly)));
            if let Some(initrd) = &boot.initrd {
                keep.extend(named(initrd).map(|p| (p, Access::ReadOnly)));
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
        opened: Vec<std::os::fd::OwnedFd>,
    ) -> Result<Child, VmmProcessError> {
        for f in ["exit", STOP_MARKER, OOM_MARKER, "api.sock", "console.sock"] {
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
                    if !args[i + 1].starts_with("/proc/self/fd/") {
                        args[i + 1] = handover.reachable(Path::new(&args[i + 1]), 0o004)?;
                    }
                }
            }
        }
        handover.fds.extend(opened);
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
        // Held from the cgroup's making until the VMM is in it: a sweep
        // ([`super::cgroup`]) never removes it in between.
        let _cgroup_lock = self.cgroups.as_ref().map(Cgroups::lock);
        let joiner = match &self.cgroups {
            Some(cg) => Some({
                // A VMM that ended left its cgroup (and its OOM count):
                // the new one starts in a fresh cgroup.
                if cg.exists(&dir.namespace, &dir.name)
                    && cg.procs(&dir.namespace, &dir.name).is_empty()
                {
                    cg.remove(&dir.namespace, &dir.name);
                }
                cg.prepare(
                    &dir.namespace,
                    &dir.name,
                    &Limits::of(machine, cg.overhead_bytes),
                )?
            }),
            None => None,
        };
        // SAFETY: write, fcntl, setsid, prctl, the raw set*id calls and what
        // `Jail::enter_for_exec` does (mount, unshare, mkdir, open on
        // prepared paths) are async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // First, as root: into the VM's cgroup (the VMM's user could
                // not write these files).
                if let Some(joiner) = &joiner {
                    joiner.join_for_exec()?;
                }
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
        // Nothing of a VM whose files are not all where they may be is
        // made, read or started.
        self.image_dirs.check_machine(machine)?;
        dir.create()?;
        let _ = fs::remove_file(dir.file("incoming"));
        dir.write_machine(machine)?;
        let mut boot = boot::resolve(dir, machine)?;
        // A kernel and initrd the VM names are handed over as the
        // descriptors opened beneath their image directory; one taken out of
        // the VM's image (`fromImage`) is the agent's own file in its cache.
        let mut opened = Vec::new();
        if machine.boot_image.is_none() {
            let mut hand = |what: &str, path: &mut String| -> Result<(), VmmProcessError> {
                use std::os::fd::AsRawFd;
                let template = machine.cluster_template.as_deref();
                let file = self.image_dirs.open_for(template, what, path, false)?;
                *path = format!("/proc/self/fd/{}", file.as_raw_fd());
                opened.push(std::os::fd::OwnedFd::from(file));
                Ok(())
            };
            hand("boot.kernel", &mut boot.kernel)?;
            if let Some(initrd) = boot.initrd.as_mut() {
                hand("boot.initrd", initrd)?;
            }
        }
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
        self.spawn(
            dir,
            machine,
            &args,
            self.keep(dir, Some(&boot), &disks),
            opened,
        )
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
        self.image_dirs.check_machine(machine)?;
        dir.create()?;
        fs::write(dir.file("incoming"), migration).map_err(io("write incoming"))?;
        // [`wait_listening`] reads only what this VMM logs after this line:
        // a directory kept from an earlier attempt holds an older address.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.file("vmm.log"))
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(f, "{INCOMING_MARK}{migration}")
            })
            .map_err(io("write vmm.log"))?;
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
        self.spawn(
            dir,
            machine,
            &args,
            self.keep(dir, named.as_ref(), &disks),
            Vec::new(),
        )
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

/// Stops the VM by force: the VMM's `stop`, then SIGTERM, then SIGKILL to
/// its process group, each after `grace`. Records that the stop was asked
/// for (an empty [`STOP_MARKER`]).
pub fn stop(dir: &VmDir, grace: Duration) {
    let _ = fs::write(dir.file(STOP_MARKER), "");
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

/// The VM directory's marker of an OOM kill in the VMM's cgroup, written
/// when the agent finds the VMM gone and its cgroup's `oom_kill` counter
/// above zero ([`super::cgroup`]); the exit is then reported `OOMKilled`.
pub const OOM_MARKER: &str = "oom-killed";

/// The VM directory's marker of a stop the agent asked for. Empty: a
/// forced stop. Holding a number: the power button was pressed with that
/// grace in seconds, at the file's modification time; so an agent that
/// restarts meanwhile neither presses the button again nor loses the
/// deadline.
pub const STOP_MARKER: &str = "stop-requested";

/// How long past the grace the agent waits for the VMM's own forced stop
/// before it forces the stop itself.
pub const SHUTDOWN_BACKSTOP: Duration = Duration::from_secs(5);

/// What [`STOP_MARKER`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMarker {
    /// No stop was asked for.
    Absent,
    /// A forced stop was asked for.
    Forced,
    /// The power button was pressed at `at`, giving the guest `grace`.
    Pressed {
        /// When.
        at: SystemTime,
        /// The grace it was pressed with.
        grace: Duration,
    },
}

impl StopMarker {
    /// What `dir`'s marker records.
    pub fn read(dir: &VmDir) -> StopMarker {
        let path = dir.file(STOP_MARKER);
        let Ok(text) = fs::read_to_string(&path) else {
            return StopMarker::Absent;
        };
        let at = fs::metadata(&path).and_then(|m| m.modified());
        match (text.trim().parse::<u64>(), at) {
            (Ok(secs), Ok(at)) => StopMarker::Pressed {
                at,
                grace: Duration::from_secs(secs),
            },
            _ => StopMarker::Forced,
        }
    }
}

/// Why the agent stopped a VM by force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForceReason {
    /// The grace is zero (`spec.terminationGracePeriodSeconds: 0`, or
    /// `kubectl godwit stop --force`).
    NoGrace,
    /// The VMM did not take the button press (started with `--acpi off`,
    /// or no answer); what it said.
    Refused(String),
    /// The guest did not power off within the grace and the backstop.
    GraceOver(Duration),
    /// A forced stop was asked for earlier and the VMM still runs.
    Again,
}

impl std::fmt::Display for ForceReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForceReason::NoGrace => write!(f, "no grace period (forced stop asked for)"),
            ForceReason::Refused(why) => write!(f, "the power button was refused: {why}"),
            ForceReason::GraceOver(grace) => {
                write!(f, "the guest did not power off within {}s", grace.as_secs())
            }
            ForceReason::Again => write!(f, "a forced stop was asked for and it still runs"),
        }
    }
}

/// The next step of a stop, from what the marker records, the grace the VM
/// has now and the clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShutdownStep {
    /// Press the power button.
    Press,
    /// Pressed: wait this much longer.
    Wait(Duration),
    /// Stop it by force now.
    Force(ForceReason),
}

/// Decides the next step of a stop: press the button once, wait for the
/// guest until the grace (the smaller of the grace at the press and now,
/// so a later `--force` shortens it) plus [`SHUTDOWN_BACKSTOP`] is over,
/// then force. A zero grace forces at once.
pub fn shutdown_step(marker: StopMarker, grace: Duration, now: SystemTime) -> ShutdownStep {
    if grace.is_zero() {
        return ShutdownStep::Force(ForceReason::NoGrace);
    }
    match marker {
        StopMarker::Absent => ShutdownStep::Press,
        StopMarker::Forced => ShutdownStep::Force(ForceReason::Again),
        StopMarker::Pressed { at, grace: pressed } => {
            let grace = grace.min(pressed);
            // A press time in the future (the clock stepped back) counts as now.
            let since = now.duration_since(at).unwrap_or_default();
            match (grace + SHUTDOWN_BACKSTOP).checked_sub(since) {
                Some(left) if !left.is_zero() => ShutdownStep::Wait(left),
                _ => ShutdownStep::Force(ForceReason::GraceOver(grace)),
            }
        }
    }
}

/// Where a graceful stop stands after [`request_shutdown`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShutdownProgress {
    /// The power button was pressed just now; the guest has `grace`.
    ButtonPressed {
        /// The grace the VMM was given.
        grace: Duration,
    },
    /// Pressed earlier: the agent forces the stop in `left` unless the
    /// guest powers off first.
    Waiting {
        /// Time left.
        left: Duration,
    },
    /// Stopped by force just now.
    Forced(ForceReason),
    /// No VMM runs.
    NotRunning,
}

/// Stops the VM gracefully, one step per call (the agent calls it on every
/// pass while the VM is stopping): presses the ACPI power button with
/// `grace` (the VMM forces the stop itself when it is over), then waits;
/// forces the stop ([`stop`]) at once when `grace` is zero or the VMM
/// refuses the button, and after the grace plus [`SHUTDOWN_BACKSTOP`]
/// otherwise. Blocks only while forcing.
pub fn request_shutdown(dir: &VmDir, grace: Duration) -> ShutdownProgress {
    if !dir.state().alive {
        return ShutdownProgress::NotRunning;
    }
    let force = |why: ForceReason| {
        stop(dir, Duration::from_secs(5));
        ShutdownProgress::Forced(why)
    };
    match shutdown_step(StopMarker::read(dir), grace, SystemTime::now()) {
        ShutdownStep::Press => {
            // Recorded before the press: an agent that dies in between
            // waits out the grace instead of pressing twice.
            if let Err(e) = fs::write(dir.file(STOP_MARKER), format!("{}\n", grace.as_secs())) {
                return force(ForceReason::Refused(format!(
                    "cannot record the stop in {}: {e}",
                    dir.path.display()
                )));
            }
            match dir
                .control()
                .with_timeout(Duration::from_secs(5))
                .shutdown(Some(grace))
            {
                Ok(_) => ShutdownProgress::ButtonPressed { grace },
                Err(e) => force(ForceReason::Refused(
                    e.refusal()
                        .map(str::to_string)
                        .unwrap_or_else(|| godwit_crds::error_chain(&e)),
                )),
            }
        }
        ShutdownStep::Wait(left) => ShutdownProgress::Waiting { left },
        ShutdownStep::Force(why) => force(why),
    }
}

/// The line [`Runner::incoming`] writes into `vmm.log` before it starts
/// the VMM (followed by the migration's name).
pub const INCOMING_MARK: &str = "godwit-node: incoming VMM for migration ";

/// Waits until the incoming VMM says where it listens; returns that address.
/// Only what it logged after the last [`INCOMING_MARK`] counts: an address
/// an earlier incoming VMM logged in the same directory is no one's now.
pub fn wait_listening(dir: &VmDir, timeout: Duration) -> Result<String, VmmProcessError> {
    const MARK: &str = "godwit-vmm: waiting for a migration on ";
    let deadline = Instant::now() + timeout;
    loop {
        let log = fs::read_to_string(dir.file("vmm.log")).unwrap_or_default();
        if let Some(addr) = listening_address(&log, MARK) {
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

/// The address in the last `mark` line after the last [`INCOMING_MARK`].
fn listening_address(log: &str, mark: &str) -> Option<String> {
    log.lines()
        .rev()
        .take_while(|l| !l.starts_with(INCOMING_MARK))
        .find_map(|l| l.strip_prefix(mark))
        .map(|a| a.trim().to_string())
}

/// Kills the VMMs of VM cgroups whose VM directory is gone. Such a VMM is
/// no one's (its directory was removed while it ran: an incoming VMM whose
/// migration failed, a stop that could not end it), no agent pass looks at
/// it, and it holds the VM's taps, so the VM's next start or migration here
/// would fail ("Device or resource busy"). Under the cgroups' lock, so a
/// VMM being started (its directory is made before its cgroup) is never
/// taken for one. Its empty cgroup goes in a later [`settle_cgroups`].
/// Returns the cgroups whose processes were killed.
pub fn kill_orphans(cgroups: &Cgroups, state_dir: &Path, shared_dir: &Path) -> Vec<String> {
    let _lock = cgroups.lock();
    let mut killed = Vec::new();
    for leaf in cgroups.list() {
        // A name cut to 255 bytes (with a hash) names no directory we could
        // find from it: left alone.
        let Some((namespace, name)) = leaf.split_once('_').filter(|_| leaf.len() < 255) else {
            continue;
        };
        if VmDir::new(state_dir, shared_dir, namespace, name)
            .path
            .exists()
        {
            continue;
        }
        let procs = cgroups.procs(namespace, name);
        if procs.is_empty() {
            continue;
        }
        for pid in procs {
            // SAFETY: kill(2) on a process in a VM cgroup this agent owns.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        killed.push(leaf);
    }
    killed
}

/// Settles this node's VM cgroups, once per pass (and at an agent's start):
/// - a VM directory whose `pid` file is missing, or names no live process,
///   while its cgroup holds processes gets its `pid` back (the process group
///   of the cgroup's first process): the VMM is adopted by its cgroup;
/// - a cgroup with no process left (the VMM is gone: stopped, exited,
///   migrated away) is removed, after its OOM kills are recorded in the VM
///   directory ([`OOM_MARKER`]) for the exit's report;
/// - an empty cgroup whose VM directory is gone is removed too.
///
/// Returns the VMs adopted by their cgroup.
pub fn settle_cgroups(cgroups: &Cgroups, dirs: &[VmDir]) -> Vec<VmDir> {
    let _lock = cgroups.lock();
    let mut adopted = Vec::new();
    let mut mine = std::collections::BTreeSet::new();
    for dir in dirs {
        mine.insert(super::cgroup::cgroup_name(&dir.namespace, &dir.name));
        if !cgroups.exists(&dir.namespace, &dir.name) {
            continue;
        }
        let procs = cgroups.procs(&dir.namespace, &dir.name);
        if let Some(&first) = procs.first() {
            let st = dir.state();
            if st.exit.is_none() && !st.alive {
                let group = super::cgroup::process_group(first)
                    .filter(|g| procs.contains(g))
                    .unwrap_or(first);
                if fs::write(dir.file("pid"), group.to_string()).is_ok() {
                    adopted.push(dir.clone());
                }
            }
            continue;
        }
        if cgroups.oom_kills(&dir.namespace, &dir.name) > 0 && dir.path.is_dir() {
            let _ = fs::write(dir.file(OOM_MARKER), "");
        }
        cgroups.remove(&dir.namespace, &dir.name);
    }
    for leaf in cgroups.list() {
        if !mine.contains(&leaf) {
            cgroups.remove_leaf(&leaf);
        }
    }
    adopted
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_incoming_vmms_address_counts() {
        let mark = "godwit-vmm: waiting for a migration on ";
        let old = format!("{INCOMING_MARK}m1\n{mark}10.0.0.2:47001\nmigration failed\n");
        assert_eq!(
            listening_address(&old, mark).as_deref(),
            Some("10.0.0.2:47001")
        );
        let retry = format!("{old}{INCOMING_MARK}m2\nstarting\n");
        assert_eq!(listening_address(&retry, mark), None);
        let listening = format!("{retry}{mark}10.0.0.2:47555\n");
        assert_eq!(
            listening_address(&listening, mark).as_deref(),
            Some("10.0.0.2:47555")
        );
    }

    const GRACE: Duration = Duration::from_secs(30);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn a_stop_presses_once_waits_out_the_grace_then_forces() {
        assert_eq!(
            shutdown_step(StopMarker::Absent, GRACE, at(0)),
            ShutdownStep::Press
        );
        let pressed = StopMarker::Pressed {
            at: at(0),
            grace: GRACE,
        };
        assert_eq!(
            shutdown_step(pressed, GRACE, at(10)),
            ShutdownStep::Wait(Duration::from_secs(25))
        );
        // The VMM forces the stop at 30 s; the agent waits 5 s more.
        assert_eq!(
            shutdown_step(pressed, GRACE, at(34)),
            ShutdownStep::Wait(Duration::from_secs(1))
        );
        assert_eq!(
            shutdown_step(pressed, GRACE, at(35)),
            ShutdownStep::Force(ForceReason::GraceOver(GRACE))
        );
        // A press time ahead of the clock counts as now.
        assert_eq!(
            shutdown_step(pressed, GRACE, at(0) - Duration::from_secs(60)),
            ShutdownStep::Wait(GRACE + SHUTDOWN_BACKSTOP)
        );
    }

    #[test]
    fn no_grace_or_a_forced_request_forces_and_a_shorter_grace_wins() {
        for marker in [
            StopMarker::Absent,
            StopMarker::Forced,
            StopMarker::Pressed {
                at: at(0),
                grace: GRACE,
            },
        ] {
            assert_eq!(
                shutdown_step(marker, Duration::ZERO, at(1)),
                ShutdownStep::Force(ForceReason::NoGrace),
                "{marker:?}"
            );
        }
        assert_eq!(
            shutdown_step(StopMarker::Forced, GRACE, at(1)),
            ShutdownStep::Force(ForceReason::Again)
        );
        // The spec's grace was lowered to 3 s after the press.
        let pressed = StopMarker::Pressed {
            at: at(0),
            grace: GRACE,
        };
        let three = Duration::from_secs(3);
        assert_eq!(
            shutdown_step(pressed, three, at(7)),
            ShutdownStep::Wait(Duration::from_secs(1))
        );
        assert_eq!(
            shutdown_step(pressed, three, at(8)),
            ShutdownStep::Force(ForceReason::GraceOver(three))
        );
    }

    fn scratch(tag: &str) -> (PathBuf, VmDir) {
        let root =
            std::env::temp_dir().join(format!("godwit-shutdown-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = VmDir::new(&root, &root.join("shared"), "ns", "vm");
        dir.create().unwrap();
        (root, dir)
    }

    #[test]
    fn the_marker_keeps_the_press_time_and_grace_across_agents() {
        let (root, dir) = scratch("marker");
        assert_eq!(StopMarker::read(&dir), StopMarker::Absent);
        let before = SystemTime::now() - Duration::from_secs(1);
        fs::write(dir.file(STOP_MARKER), "12\n").unwrap();
        let StopMarker::Pressed { at, grace } = StopMarker::read(&dir) else {
            panic!("{:?}", StopMarker::read(&dir));
        };
        assert_eq!(grace, Duration::from_secs(12));
        assert!(at >= before && at <= SystemTime::now(), "{at:?}");
        // What a forced stop writes.
        fs::write(dir.file(STOP_MARKER), "").unwrap();
        assert_eq!(StopMarker::read(&dir), StopMarker::Forced);
        assert!(dir.state().stop_requested);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_vmm_that_does_not_take_the_button_is_stopped_by_force_at_once() {
        let (root, dir) = scratch("refused");
        // A process group with no control socket stands in for a VMM that
        // cannot be asked: the button press fails, the stop is forced.
        let mut child = Command::new("sleep");
        child.arg("600");
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            child.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = child.spawn().unwrap();
        fs::write(dir.file("pid"), child.id().to_string()).unwrap();
        assert!(dir.state().alive);
        let started = Instant::now();
        let progress = request_shutdown(&dir, GRACE);
        let reaped = child.wait();
        assert!(
            matches!(&progress, ShutdownProgress::Forced(ForceReason::Refused(why)) if why.contains("control socket")),
            "{progress:?}"
        );
        assert!(reaped.is_ok());
        assert!(!dir.state().alive);
        assert!(started.elapsed() < Duration::from_secs(15));
        assert_eq!(StopMarker::read(&dir), StopMarker::Forced);
        assert_eq!(request_shutdown(&dir, GRACE), ShutdownProgress::NotRunning);
        fs::remove_dir_all(&root).unwrap();
    }
}
