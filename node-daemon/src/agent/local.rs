//! What runs on this node: one directory per VM, one VMM process per VM.
//!
//! A VM's directory (`<state-dir>/vms/<namespace>/<name>/`) holds everything
//! the node knows about it, so a restarted agent finds its VMs again without
//! asking anyone:
//!
//! | file | what |
//! | --- | --- |
//! | `machine.json` | the [`Machine`] the VMM was started with |
//! | `pid` | the process group of the VMM (a small `sh` that records the exit status, and the VMM itself) |
//! | `exit` | the VMM's exit status, written when it ends |
//! | `stop-requested` | the agent asked it to stop (an exit then means Stopped, not Failed) |
//! | `incoming` | the VMM waits for or received a migration (the migration's name) |
//! | `vmm.log` | the VMM's stdout and stderr |
//! | `console.log`, `console.sock` | the serial console (file, and a socket to attach to) |
//! | `api.sock` | the VMM's control socket |
//! | `disks/` | node-local disks |
//!
//! Shared disks live under the shared directory (`<shared-dir>/<namespace>/<name>/`),
//! which every node sees; only deleting the VM removes them.
//!
//! VMM processes run in their own session (`setsid`), so they outlive the
//! agent: a daemon restart or upgrade leaves the guests running. Each runs in
//! its own mount namespace ([`node_jail`], [`crate::vmm::jail`]): it sees its
//! own VM's directories and no other VM's, no service account token, and
//! writes only to its own files; then as its VM's own user with no
//! capability at all ([`VmmUsers`]; or, as root, with none but
//! `CAP_NET_ADMIN`, [`crate::vmm::sandbox`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use godwit_crds::contract::{Machine, MachineDiskSource};
use godwit_crds::vm::{ImageFormat, StorageKind};
use serde_json::{json, Value};

use crate::vmm::jail::{Access, Jail, JailPolicy};

/// Errors of local VM management.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The VMM's control socket answered with an error or not at all.
    #[error("VMM control: {0}")]
    Control(String),
    /// The VMM did not come up.
    #[error("VMM did not start: {0}")]
    Start(String),
    /// The node's template cache could not provide a template's image.
    #[error("template image {0}")]
    Template(String, #[source] crate::storage::StorageError),
    /// The VMM's mount namespace could not be prepared.
    #[error("Cannot prepare the mount namespace of the VMM of {0}")]
    Jail(PathBuf, #[source] crate::vmm::jail::JailError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LocalError {
    let what = what.into();
    move |e| LocalError::Io(what, e)
}

/// Where a VM's files live on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDir {
    /// `<state-dir>/vms/<namespace>/<name>`.
    pub path: PathBuf,
    /// `<shared-dir>/<namespace>/<name>`.
    pub shared: PathBuf,
    /// Namespace of the VM.
    pub namespace: String,
    /// Name of the VM.
    pub name: String,
    /// The node's template cache, `<state-dir>/images`.
    pub cache: PathBuf,
}

impl VmDir {
    /// The directories of VM `namespace/name`.
    pub fn new(state_dir: &Path, shared_dir: &Path, namespace: &str, name: &str) -> VmDir {
        VmDir {
            path: state_dir.join("vms").join(namespace).join(name),
            shared: shared_dir.join(namespace).join(name),
            namespace: namespace.into(),
            name: name.into(),
            cache: state_dir.join("images"),
        }
    }

    /// Every VM directory under `state_dir`.
    pub fn scan(state_dir: &Path, shared_dir: &Path) -> Vec<VmDir> {
        let mut out = Vec::new();
        let Ok(namespaces) = fs::read_dir(state_dir.join("vms")) else {
            return out;
        };
        for ns in namespaces.flatten() {
            let Ok(vms) = fs::read_dir(ns.path()) else {
                continue;
            };
            for vm in vms.flatten() {
                if vm.path().is_dir() {
                    out.push(VmDir::new(
                        state_dir,
                        shared_dir,
                        &ns.file_name().to_string_lossy(),
                        &vm.file_name().to_string_lossy(),
                    ));
                }
            }
        }
        out
    }

    /// Makes the VM's directory, `0700`: it holds the VMM's control and
    /// console sockets, which only the node daemon may use.
    pub fn create(&self) -> Result<(), LocalError> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(&self.path).map_err(io(format!("create {}", self.path.display())))?;
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod 0700 {}", self.path.display())))
    }

    /// A file in the VM's directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The control socket.
    pub fn api_sock(&self) -> PathBuf {
        self.file("api.sock")
    }

    /// Where disk `disk` of this VM lives.
    pub fn disk_path(&self, disk: &str, storage: StorageKind, format: ImageFormat) -> PathBuf {
        let ext = match format {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        };
        let dir = match storage {
            StorageKind::Local => self.path.join("disks"),
            StorageKind::Shared => self.shared.clone(),
        };
        dir.join(format!("{disk}.{ext}"))
    }

    /// What the directory says about the VMM.
    pub fn state(&self) -> LocalState {
        let read = |f: &str| fs::read_to_string(self.file(f)).ok();
        let exit = read("exit").and_then(|s| s.trim().parse::<i32>().ok());
        let pid = read("pid").and_then(|s| s.trim().parse::<i32>().ok());
        let alive = exit.is_none() && pid.is_some_and(process_alive);
        LocalState {
            exists: self.path.is_dir(),
            pid,
            alive,
            exit,
            stop_requested: self.file("stop-requested").exists(),
            incoming: read("incoming").map(|s| s.trim().to_string()),
        }
    }

    /// The machine this VM was started with.
    pub fn machine(&self) -> Option<Machine> {
        serde_json::from_str(&fs::read_to_string(self.file("machine.json")).ok()?).ok()
    }
}

/// The state of a VM's VMM on this node, as its directory records it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalState {
    /// The VM has a directory here.
    pub exists: bool,
    /// The VMM's process group.
    pub pid: Option<i32>,
    /// The VMM process is running.
    pub alive: bool,
    /// Its exit status, once it ended.
    pub exit: Option<i32>,
    /// The agent asked it to stop.
    pub stop_requested: bool,
    /// It was started to receive this migration.
    pub incoming: Option<String>,
}

fn process_alive(pid: i32) -> bool {
    // A zombie has exited; `/proc/<pid>/stat` shows state `Z`.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// How this node runs VMMs.
#[derive(Clone, Debug)]
pub struct Runner {
    /// The `godwit-vmm` binary.
    pub vmm_binary: PathBuf,
    /// The node's migration identity (mutual TLS), if configured.
    pub tls: Option<crate::migration::tls::TlsFiles>,
    /// What every VMM's mount namespace hides ([`node_jail`]); each VMM
    /// keeps its own files on top. `None`: VMMs share the agent's mounts.
    pub jail: Option<JailPolicy>,
    /// Run each VMM as its own unprivileged user ([`VmmUsers`]); `None`:
    /// as root, with `CAP_NET_ADMIN` alone.
    pub users: Option<VmmUsers>,
}

/// How many users a [`VmmUsers`] range holds.
pub const VMM_USER_SLOTS: u32 = 65536;

/// The users VMMs run as: VM `namespace/name` runs as uid (and gid)
/// `base + hash(namespace/name) % 65536`, on every node alike, so a shared
/// disk belongs to the same user wherever its VM runs. Two VMs whose hashes
/// collide share a user; each still sees only its own files (its mount
/// namespace), and neither can trace the other (`PR_SET_DUMPABLE` 0).
///
/// The agent stays root: it opens `/dev/kvm` and `/dev/userfaultfd`, makes
/// the taps, reads the migration key, and hands the VMM the open
/// descriptors ([`crate::vmm::handed`]); it gives the VM's directories and
/// writable disks to the VM's user. Read-only files (binary, kernel,
/// template images) must be readable by others; the binary, kernel and
/// initrd are handed over as descriptors (`/proc/self/fd/N`) when a
/// directory on their path is closed to others. Shared storage must let
/// the node's root change owners (no `root_squash` on NFS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmmUsers {
    /// The first uid of the range.
    pub base: u32,
}

impl VmmUsers {
    /// A range from `base`: it must not hold root and must fit in 32 bits.
    pub fn new(base: u32) -> Result<VmmUsers, String> {
        if base == 0
            || base
                .checked_add(VMM_USER_SLOTS)
                .is_none_or(|end| end == u32::MAX)
        {
            return Err(format!(
                "VMM user range {base}..{base}+{VMM_USER_SLOTS} must start above 0 and end below {}",
                u32::MAX
            ));
        }
        Ok(VmmUsers { base })
    }

    /// The uid (and gid) of VM `namespace/name`'s VMM.
    pub fn of(&self, namespace: &str, name: &str) -> u32 {
        self.base + vm_hash(namespace, name) % VMM_USER_SLOTS
    }
}

/// What the agent hands a VMM that runs as its own user: open descriptors,
/// and the flags that name them ([`crate::vmm::handed`]).
#[derive(Default)]
struct Handover {
    fds: Vec<std::os::fd::OwnedFd>,
    args: Vec<String>,
}

impl Handover {
    fn pass(&mut self, fd: impl Into<std::os::fd::OwnedFd>) -> i32 {
        use std::os::fd::AsRawFd;
        let fd = fd.into();
        let n = fd.as_raw_fd();
        self.fds.push(fd);
        n
    }

    /// `path` itself when every directory on its way lets others through
    /// and the file lets them `need` (mode bits for others), else an open
    /// descriptor of it as `/proc/self/fd/N`.
    fn reachable(&mut self, path: &Path, need: u32) -> Result<String, LocalError> {
        use std::os::unix::fs::PermissionsExt;
        let open_to_others = path.ancestors().skip(1).all(|d| {
            d.as_os_str().is_empty()
                || fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
        }) && fs::metadata(path)
            .is_ok_and(|m| m.permissions().mode() & need == need);
        if open_to_others {
            return Ok(path.display().to_string());
        }
        let file = fs::File::open(path).map_err(io(format!("open {}", path.display())))?;
        Ok(format!("/proc/self/fd/{}", self.pass(file)))
    }
}

/// Gives `path` (not following symbolic links), and everything under it
/// when it is a directory, to user and group `uid`.
fn give_tree(path: &Path, uid: u32) -> Result<(), LocalError> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
        .map_err(io(format!("chown {uid} {}", path.display())))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io(format!("list {}", path.display())))? {
            let entry = entry.map_err(io(format!("list {}", path.display())))?;
            give_tree(&entry.path(), uid)?;
        }
    }
    Ok(())
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
        machine: &Machine,
        disks: &[(PathBuf, bool)],
    ) -> Vec<(PathBuf, Access)> {
        let mut keep = vec![
            (dir.path.clone(), Access::ReadWrite),
            (dir.shared.clone(), Access::ReadWrite),
            (dir.cache.clone(), Access::ReadOnly),
            (self.vmm_binary.clone(), Access::ReadOnly),
            (PathBuf::from(&machine.kernel), Access::ReadOnly),
        ];
        if let Some(initrd) = &machine.initrd {
            keep.push((PathBuf::from(initrd), Access::ReadOnly));
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

    /// Opens what a VMM running as `uid` cannot open itself, and gives it
    /// its files (see [`VmmUsers`]).
    fn hand_over(
        &self,
        dir: &VmDir,
        machine: &Machine,
        keep: &[(PathBuf, Access)],
        uid: u32,
    ) -> Result<Handover, LocalError> {
        let mut h = Handover::default();
        let rw = |path: &str| fs::OpenOptions::new().read(true).write(true).open(path);
        let kvm = rw("/dev/kvm").map_err(io("open /dev/kvm"))?;
        let n = h.pass(kvm);
        h.args.extend(["--kvm-fd".into(), n.to_string()]);
        if Path::new("/dev/userfaultfd").exists() {
            let uffd = rw("/dev/userfaultfd").map_err(io("open /dev/userfaultfd"))?;
            let n = h.pass(uffd);
            h.args.extend(["--userfaultfd-fd".into(), n.to_string()]);
        }
        for (i, nic) in machine.networks.iter().enumerate() {
            let name = tap_name(&dir.namespace, &dir.name, i);
            let bridge = Some(nic.bridge.as_str()).filter(|b| !b.is_empty());
            let tap = crate::vmm::devices::virtio::net::tap::Tap::create_for_vmm(&name, bridge)
                .map_err(|e| LocalError::Start(crate::error_chain(&e)))?;
            let n = h.pass(tap.file);
            h.args.extend(["--tap-fd".into(), format!("{name}={n}")]);
        }
        if let Some(files) = &self.tls {
            let pem = files
                .read_pem()
                .map_err(io("read the migration identity"))?;
            let n = h.pass(pipe_with(
                &serde_json::to_vec(&pem).expect("PEM text serialises"),
            )?);
            h.args.extend(["--tls-fd".into(), n.to_string()]);
        }
        // Its directories and writable disks become the VM user's (its VM
        // directory is 0700, `VmDir::create`: no other VM's user gets in).
        give_tree(&dir.path, uid)?;
        give_tree(&dir.shared, uid)?;
        for (path, access) in keep {
            if *access == Access::ReadWrite {
                give_tree(path, uid)?;
            }
        }
        Ok(h)
    }

    fn spawn(
        &self,
        dir: &VmDir,
        machine: &Machine,
        args: &[String],
        keep: Vec<(PathBuf, Access)>,
    ) -> Result<Child, LocalError> {
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
            Some(uid) => self.hand_over(dir, machine, &keep, uid)?,
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
                Some(Jail::prepare(&policy).map_err(|e| LocalError::Jail(dir.path.clone(), e))?)
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

    /// Creates the VM's disks (when missing) and boots it.
    pub fn boot(&self, dir: &VmDir, machine: &Machine) -> Result<Child, LocalError> {
        dir.create()?;
        let _ = fs::remove_file(dir.file("incoming"));
        write_machine(dir, machine)?;
        let mut args = vec![
            "--kernel".to_string(),
            machine.kernel.clone(),
            "--memory-mib".into(),
            (machine.memory_bytes >> 20).to_string(),
            "--vcpus".into(),
            machine.cpu.to_string(),
            "--cmdline".into(),
            machine.cmdline.clone(),
        ];
        if let Some(initrd) = &machine.initrd {
            args.extend(["--initrd".into(), initrd.clone()]);
        }
        let mut disks = Vec::new();
        for disk in &machine.disks {
            let path = provision_disk(dir, disk)?;
            args.extend(["--disk".into(), disk_arg(&path, disk.read_only)]);
            disks.push((path, disk.read_only));
        }
        args.extend(self.common_args(dir, machine));
        self.spawn(dir, machine, &args, self.keep(dir, machine, &disks))
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
    ) -> Result<Child, LocalError> {
        dir.create()?;
        fs::write(dir.file("incoming"), migration).map_err(io("write incoming"))?;
        write_machine(dir, machine)?;
        let mut args = vec!["--incoming".to_string(), addr.to_string()];
        let paths = super::disks::prepare_target(dir, machine, copy_disks)?;
        let mut disks = Vec::new();
        for (disk, path) in machine.disks.iter().zip(paths) {
            args.extend(["--disk".into(), disk_arg(&path, disk.read_only)]);
            disks.push((path, disk.read_only));
        }
        args.extend(self.common_args(dir, machine));
        self.spawn(dir, machine, &args, self.keep(dir, machine, &disks))
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
        // (`Runner::hand_over`).
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

fn write_machine(dir: &VmDir, machine: &Machine) -> Result<(), LocalError> {
    let json = serde_json::to_string_pretty(machine).expect("a Machine serialises");
    fs::write(dir.file("machine.json"), json).map_err(io("write machine.json"))
}

fn disk_arg(path: &Path, read_only: bool) -> String {
    let ro = if read_only { ",ro=on" } else { "" };
    format!("path={}{ro}", path.display())
}

/// A tap name for NIC `index` of VM `namespace/name`: unique on the node,
/// stable across restarts, within the kernel's 15 characters.
pub fn tap_name(namespace: &str, name: &str, index: usize) -> String {
    format!("gwt{:08x}n{index}", vm_hash(namespace, name))
}

/// FNV-1a of `namespace/name`.
fn vm_hash(namespace: &str, name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A pipe whose read end holds `bytes` (the write end is closed).
fn pipe_with(bytes: &[u8]) -> Result<std::os::fd::OwnedFd, LocalError> {
    use std::os::fd::FromRawFd;
    // The pipe must hold it all: nobody reads until the VMM runs.
    if bytes.len() > 60 * 1024 {
        return Err(LocalError::Start(format!(
            "the migration identity is {} bytes; at most 60 KiB can be handed over",
            bytes.len()
        )));
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors or fails.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io("pipe")(std::io::Error::last_os_error()));
    }
    // SAFETY: both are new descriptors owned by nothing else.
    let (read, write) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    fs::File::from(write)
        .write_all(bytes)
        .map_err(io("write the migration identity to its pipe"))?;
    Ok(read)
}

/// Makes disk `disk` exist, and returns its path. A disk that exists is kept
/// (a restarted VM keeps what it wrote).
pub fn provision_disk(
    dir: &VmDir,
    disk: &godwit_crds::contract::MachineDisk,
) -> Result<PathBuf, LocalError> {
    let path = super::disks::disk_file(dir, disk);
    if matches!(disk.source, MachineDiskSource::Image { .. }) || path.exists() {
        return Ok(path);
    }
    let parent = path.parent().expect("disk paths have a parent");
    fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    // Build under a temporary name: a crash never leaves a half disk that
    // looks finished.
    let partial = path.with_extension("partial");
    let made = match &disk.source {
        MachineDiskSource::Clone { path: base, .. } if disk.storage == StorageKind::Local => {
            super::disks::overlay_on_cached(dir, Path::new(base), &partial)
        }
        MachineDiskSource::Clone { path: base, .. } => sparse_copy(Path::new(base), &partial),
        MachineDiskSource::Blank { size_bytes } => fs::File::create(&partial)
            .and_then(|f| f.set_len(*size_bytes))
            .map_err(io(format!("create {}", partial.display()))),
        MachineDiskSource::Image { .. } => unreachable!("returned above"),
    };
    if let Err(e) = made {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    fs::rename(&partial, &path).map_err(io(format!("rename to {}", path.display())))?;
    Ok(path)
}

/// Copies `src` to `dst` keeping holes: only the data extents are read and written.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<(), LocalError> {
    let from = fs::File::open(src).map_err(io(format!("open {}", src.display())))?;
    let len = from
        .metadata()
        .map_err(io(format!("stat {}", src.display())))?
        .len();
    let to = fs::File::create(dst).map_err(io(format!("create {}", dst.display())))?;
    to.set_len(len)
        .map_err(io(format!("size {}", dst.display())))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&from);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut off = data;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], off as u64)
                .map_err(io(format!("read {}", src.display())))?;
            // Zero blocks inside data extents stay holes too.
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], off as u64)
                    .map_err(io(format!("write {}", dst.display())))?;
            }
            off += n as i64;
        }
        pos = end;
    }
    to.sync_all().map_err(io(format!("sync {}", dst.display())))
}

/// One request to a VMM's control socket.
pub fn control(sock: &Path, cmd: &str, args: Value) -> Result<Value, LocalError> {
    let mut request = json!({"v": 1, "cmd": cmd});
    if let (Value::Object(r), Value::Object(a)) = (&mut request, args) {
        r.extend(a);
    }
    let stream = UnixStream::connect(sock)
        .map_err(|e| LocalError::Control(format!("connect {}: {e}", sock.display())))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| LocalError::Control(e.to_string()))?;
    let mut line = request.to_string();
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .map_err(|e| LocalError::Control(format!("send {cmd}: {e}")))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| LocalError::Control(format!("read the answer to {cmd}: {e}")))?;
    let answer: Value = serde_json::from_str(&answer)
        .map_err(|e| LocalError::Control(format!("answer to {cmd} is not JSON: {e}")))?;
    if answer["ok"].as_bool() == Some(true) {
        Ok(answer["result"].clone())
    } else {
        Err(LocalError::Control(
            answer["error"]
                .as_str()
                .unwrap_or("no error text")
                .to_string(),
        ))
    }
}

/// Stops the VM: a clean `stop`, then SIGTERM, then SIGKILL to its process
/// group, each after `grace`. Records that the stop was asked for.
pub fn stop(dir: &VmDir, grace: Duration) {
    let _ = fs::write(dir.file("stop-requested"), "");
    let st = dir.state();
    let Some(pid) = st.pid.filter(|_| st.alive) else {
        return;
    };
    let _ = control(&dir.api_sock(), "stop", json!({}));
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

/// Removes the VM's node-local files; with `shared`, its shared disks too.
pub fn remove(dir: &VmDir, shared: bool) -> Result<(), LocalError> {
    if dir.path.exists() {
        fs::remove_dir_all(&dir.path).map_err(io(format!("remove {}", dir.path.display())))?;
    }
    if shared && dir.shared.exists() {
        fs::remove_dir_all(&dir.shared).map_err(io(format!("remove {}", dir.shared.display())))?;
    }
    Ok(())
}

/// Waits until the incoming VMM says where it listens; returns that address.
pub fn wait_listening(dir: &VmDir, timeout: Duration) -> Result<String, LocalError> {
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
            return Err(LocalError::Start(format!(
                "incoming VMM exited (status {:?}): {}",
                st.exit,
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )));
        }
        if Instant::now() > deadline {
            return Err(LocalError::Start(format!(
                "incoming VMM did not listen within {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a file (for error messages and events).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
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

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("godwit-local-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let d = tmp("sparse");
        let src = d.join("src");
        let f = fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        drop(f);
        let dst = d.join("dst");
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        let blocks = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&fs::metadata(p).unwrap());
        assert!(
            blocks(&dst) * 512 < 4 << 20,
            "copy is not sparse: {} blocks",
            blocks(&dst)
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn tap_names_are_short_stable_and_distinct() {
        let a = tap_name("default", "web-1", 0);
        assert!(a.len() <= 15, "{a}");
        assert_eq!(a, tap_name("default", "web-1", 0));
        assert_ne!(a, tap_name("default", "web-2", 0));
        assert_ne!(a, tap_name("default", "web-1", 1));
    }

    #[test]
    fn a_directory_tells_the_vmm_state() {
        let d = tmp("state");
        let dir = VmDir::new(&d, &d.join("shared"), "ns", "vm");
        assert!(!dir.state().exists);
        fs::create_dir_all(&dir.path).unwrap();
        fs::write(dir.file("pid"), std::process::id().to_string()).unwrap();
        let st = dir.state();
        assert!(st.exists && st.alive && st.exit.is_none(), "{st:?}");
        fs::write(dir.file("exit"), "3\n").unwrap();
        let st = dir.state();
        assert!(!st.alive && st.exit == Some(3), "{st:?}");
        assert_eq!(VmDir::scan(&d, &d.join("shared")), vec![dir.clone()]);
        remove(&dir, true).unwrap();
        assert!(!dir.path.exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
