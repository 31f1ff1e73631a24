//! Running a VMM as its VM's own unprivileged user: which user
//! ([`VmmUsers`]), what the agent opens for it and hands over as
//! descriptors ([`hand_over`]), and which files it is given.

use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use godwit_crds::contract::Machine;

use super::vm_dir::{tap_name, vm_hash, VmDir};
use crate::migration::tls::TlsFiles;
use crate::vmm::jail::Access;

/// Errors preparing what a VMM that runs as its own user needs.
#[derive(Debug, thiserror::Error)]
pub enum VmmUserError {
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// What the VMM must be handed could not be made.
    #[error("VMM did not start: {0}")]
    Start(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmUserError {
    let what = what.into();
    move |e| VmmUserError::Io(what, e)
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
/// descriptors ([`crate::vmm::handover`]); it gives the VM's directories and
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
/// and the flags that name them ([`crate::vmm::handover`]).
#[derive(Default)]
pub struct Handover {
    /// The descriptors, kept open until the VMM holds them.
    pub fds: Vec<OwnedFd>,
    /// The VMM's flags that name them.
    pub args: Vec<String>,
}

impl Handover {
    fn pass(&mut self, fd: impl Into<OwnedFd>) -> i32 {
        use std::os::fd::AsRawFd;
        let fd = fd.into();
        let n = fd.as_raw_fd();
        self.fds.push(fd);
        n
    }

    /// `path` itself when every directory on its way lets others through
    /// and the file lets them `need` (mode bits for others), else an open
    /// descriptor of it as `/proc/self/fd/N`.
    pub fn reachable(&mut self, path: &Path, need: u32) -> Result<String, VmmUserError> {
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

/// Opens what a VMM running as `uid` cannot open itself (KVM, userfaultfd,
/// its taps, the migration identity `tls` on a pipe), and gives it its
/// directories and the files `keep` lets it write (see [`VmmUsers`]).
pub fn hand_over(
    dir: &VmDir,
    machine: &Machine,
    keep: &[(PathBuf, Access)],
    uid: u32,
    tls: Option<&TlsFiles>,
) -> Result<Handover, VmmUserError> {
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
            .map_err(|e| VmmUserError::Start(godwit_crds::error_chain(&e)))?;
        let n = h.pass(tap.file);
        h.args.extend(["--tap-fd".into(), format!("{name}={n}")]);
    }
    if let Some(files) = tls {
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

/// Gives `path` (not following symbolic links), and everything under it
/// when it is a directory, to user and group `uid`.
fn give_tree(path: &Path, uid: u32) -> Result<(), VmmUserError> {
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

/// A pipe whose read end holds `bytes` (the write end is closed).
fn pipe_with(bytes: &[u8]) -> Result<OwnedFd, VmmUserError> {
    use std::os::fd::FromRawFd;
    // The pipe must hold it all: nobody reads until the VMM runs.
    if bytes.len() > 60 * 1024 {
        return Err(VmmUserError::Start(format!(
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
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    fs::File::from(write)
        .write_all(bytes)
        .map_err(io("write the migration identity to its pipe"))?;
    Ok(read)
}
