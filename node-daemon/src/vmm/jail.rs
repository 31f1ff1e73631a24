//! The VMM's own mount namespace: it sees only its own VM's files.
//!
//! The node agent starts every VMM in a new mount namespace (Firecracker's
//! jailer does the same with a chroot; here the host's tree stays where it
//! is, with the parts a VMM must not see covered up), set up in the child
//! between `fork` and `exec`:
//!
//! 1. `unshare(CLONE_NEWNS)`, and `/` made recursively private, so nothing
//!    done here reaches the host and nothing mounted later on the host
//!    reaches the VMM.
//! 2. Each hidden directory (`<state-dir>/vms`, `<shared-dir>`, the service
//!    account's `/run/secrets`, the migration CA) is covered by an empty
//!    tmpfs; a hidden file by `/dev/null`.
//! 3. Every path the VMM needs that lies under a hidden directory (its VM
//!    directory, its shared directory) is bind-mounted back at its own path,
//!    from a descriptor (`O_PATH`) opened in the new namespace before the
//!    tmpfs covered it.
//! 4. With `read_only_root`, every mount becomes read-only (one recursive
//!    `mount_setattr`; on kernels before 5.12, a remount of each mount the
//!    agent saw) and only the writable paths (the VM's directories and
//!    disks) are made writable again.
//!
//! Devices stay usable on a read-only mount (`/dev/kvm`, `/dev/net/tun`,
//! `/dev/userfaultfd`), and so does everything else the VMM only reads: its
//! binary and libraries, kernels, the template cache `<state-dir>/cache`
//! (qcow2 overlays name their base there), the migration TLS files.
//!
//! [`Jail::prepare`] does everything that allocates or reads the host
//! (resolving paths, opening the descriptors, reading the mount table)
//! before the fork; [`Jail::enter_for_exec`] only makes system calls, as
//! code between `fork` and `exec` must (async-signal-safe). It needs
//! `CAP_SYS_ADMIN`, so it runs before the capability bounding set is
//! dropped (`sandbox::bound_capabilities_for_exec`).
//!
//! A mount namespace keeps a copy of every mount it was made from: a
//! filesystem the host unmounts while a VMM runs stays busy until that VMM
//! ends (private propagation: the host's unmount does not reach it).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Errors preparing a VMM's mount namespace (before the fork).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A path to hide or keep could not be resolved.
    #[error("Cannot resolve {0}")]
    Resolve(PathBuf, #[source] std::io::Error),
    /// `/proc/self/mountinfo` could not be read.
    #[error("Cannot read /proc/self/mountinfo")]
    MountTable(#[source] std::io::Error),
    /// More paths to bind than [`MAX_BINDS`].
    #[error("{0} paths to bind into the VMM's namespace; at most {MAX_BINDS}")]
    TooManyBinds(usize),
    /// A path holds a NUL byte.
    #[error("{0:?} holds a NUL byte")]
    Nul(PathBuf),
}

/// How the VMM may use a path it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read only (under a read-only root).
    ReadOnly,
    /// Read and write.
    ReadWrite,
}

/// What a VMM's mount namespace hides and keeps, as plain paths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JailPolicy {
    /// Directories covered by an empty tmpfs, files by `/dev/null`. Missing
    /// ones are skipped.
    pub hide: Vec<PathBuf>,
    /// Paths the VMM needs. Missing ones are skipped (the VMM then reports
    /// what it cannot open).
    pub keep: Vec<(PathBuf, Access)>,
    /// Every mount read-only but the [`Access::ReadWrite`] paths.
    pub read_only_root: bool,
}

/// A path covered up.
#[derive(Debug)]
struct Hide {
    path: CString,
    dir: bool,
}

/// A path bind-mounted onto itself (back from under a hidden directory, or
/// to be made writable under a read-only root).
#[derive(Debug)]
struct Bind {
    /// Opened (`O_PATH`) in the new namespace before anything is covered,
    /// and bound from `/proc/self/fd/<n>`: a descriptor opened before the
    /// `unshare` names the old namespace's mount, which `mount` refuses.
    path: CString,
    /// Directories to make inside the tmpfs before the bind, outermost first
    /// (a directory's own mount point last).
    mkdirs: Vec<CString>,
    /// A file: the bind needs a file to land on.
    file: bool,
    writable: bool,
}

/// A VMM's mount namespace, ready to be entered by the child between `fork`
/// and `exec` (see the module docs).
#[derive(Debug)]
pub struct Jail {
    hide: Vec<Hide>,
    binds: Vec<Bind>,
    read_only_root: bool,
    /// Every mount point the agent sees, for kernels without `mount_setattr`.
    mounts: Vec<CString>,
}

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Nul(path.to_path_buf()))
}

/// `path` resolved, or `None` when it does not exist.
fn resolve(path: &Path) -> Result<Option<PathBuf>, JailError> {
    match path.canonicalize() {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(JailError::Resolve(path.to_path_buf(), e)),
    }
}

/// A path from `/proc/self/mountinfo` (spaces and the like as `\ooo`).
fn unescape_mount_point(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let n = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |n, d| n * 8 + u32::from(d - b'0'));
            out.push(n as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn mount_points() -> Result<Vec<CString>, JailError> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(JailError::MountTable)?;
    Ok(table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter_map(|m| CString::new(unescape_mount_point(m)).ok())
        .collect())
}

impl Jail {
    /// Resolves `policy` on this host: everything but the system calls
    /// (a path missing now is skipped; one that goes missing before the
    /// fork makes the child fail, and the VMM with it).
    pub fn prepare(policy: &JailPolicy) -> Result<Jail, JailError> {
        // Hidden paths, outermost first; one inside another is hidden already.
        let mut hidden: Vec<PathBuf> = Vec::new();
        for p in &policy.hide {
            if let Some(p) = resolve(p)? {
                hidden.push(p);
            }
        }
        hidden.sort();
        hidden.dedup();
        let mut roots: Vec<PathBuf> = Vec::new();
        for p in hidden {
            if !roots.iter().any(|r| p.starts_with(r)) {
                roots.push(p);
            }
        }
        let mut keep: Vec<(PathBuf, Access)> = Vec::new();
        for (p, access) in &policy.keep {
            if let Some(p) = resolve(p)? {
                keep.push((p, *access));
            }
        }
        // Outer paths first: a bind inside another bind lands on the copy.
        keep.sort_by_key(|(p, _)| p.components().count());
        let mut binds = Vec::new();
        for (path, access) in keep {
            let root = roots.iter().find(|r| path.starts_with(r));
            let writable = access == Access::ReadWrite;
            if root.is_none() && !(writable && policy.read_only_root) {
                continue;
            }
            let mut mkdirs = Vec::new();
            if let Some(root) = root {
                let mut at = root.clone();
                let rest = path.strip_prefix(root).expect("under its root");
                // A directory is its own mount point; a file's is made below.
                let n = rest.components().count() - usize::from(!path.is_dir());
                for c in rest.components().take(n) {
                    at.push(c);
                    mkdirs.push(cstring(&at)?);
                }
            }
            binds.push(Bind {
                path: cstring(&path)?,
                mkdirs,
                file: root.is_some() && !path.is_dir(),
                writable,
            });
        }
        if binds.len() > MAX_BINDS {
            return Err(JailError::TooManyBinds(binds.len()));
        }
        let hide = roots
            .iter()
            .map(|r| {
                Ok(Hide {
                    path: cstring(r)?,
                    dir: r.is_dir(),
                })
            })
            .collect::<Result<_, JailError>>()?;
        let mounts = if policy.read_only_root {
            mount_points()?
        } else {
            Vec::new()
        };
        Ok(Jail {
            hide,
            binds,
            read_only_root: policy.read_only_root,
            mounts,
        })
    }

    /// Enters the namespace: meant for the child between `fork` and `exec`,
    /// so only system calls on what [`Jail::prepare`] made.
    pub fn enter_for_exec(&self) -> std::io::Result<()> {
        // SAFETY: unshare with a plain flag.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        // SAFETY: the string literals are NUL-terminated; null pointers are
        // allowed for the ignored arguments.
        check(unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        })?;
        // At most a few binds (a VM's directories and disks).
        let mut fds = [-1; MAX_BINDS];
        if self.binds.len() > MAX_BINDS {
            return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
        }
        for (b, fd) in self.binds.iter().zip(fds.iter_mut()) {
            // SAFETY: a CString path.
            *fd = unsafe { libc::open(b.path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            check(*fd)?;
        }
        for h in &self.hide {
            // SAFETY: as above; `h.path` is a CString that outlives the call.
            let r = unsafe {
                if h.dir {
                    libc::mount(
                        c"godwit-hidden".as_ptr(),
                        h.path.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"mode=0755,size=64k".as_ptr().cast(),
                    )
                } else {
                    libc::mount(
                        c"/dev/null".as_ptr(),
                        h.path.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                }
            };
            check(r)?;
        }
        // Mount points for the binds, made while the tmpfs is writable.
        for b in &self.binds {
            for d in &b.mkdirs {
                // SAFETY: a CString path.
                if unsafe { libc::mkdir(d.as_ptr(), 0o755) } != 0 && errno() != libc::EEXIST {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if b.file {
                // SAFETY: as above; the descriptor is closed at once.
                let fd = unsafe {
                    libc::open(
                        b.path.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                        0o600,
                    )
                };
                check(fd)?;
                // SAFETY: closing the descriptor just opened.
                unsafe { libc::close(fd) };
            }
        }
        // Everything read-only before the binds: a bind copies the flags of
        // the mount it comes from, so the binds are read-only too, and the
        // writable ones are the only mounts made writable again.
        let setattr = self.read_only_root && read_only_recursive()?;
        if self.read_only_root && !setattr {
            for m in self.mounts.iter().chain(self.hide.iter().map(|h| &h.path)) {
                // Best effort below `/`: some mount points are hidden now.
                let r = remount(m, true);
                if m.as_bytes() == b"/" {
                    r?;
                }
            }
        }
        for (b, fd) in self.binds.iter().zip(fds) {
            let mut buf = [0u8; 32];
            let source = fd_path(fd, &mut buf);
            // SAFETY: NUL-terminated paths; null for the ignored arguments.
            check(unsafe {
                libc::mount(
                    source,
                    b.path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            })?;
            if self.read_only_root && b.writable {
                if setattr {
                    set_read_only(&b.path, false, false)?;
                } else {
                    remount(&b.path, false)?;
                }
            }
        }
        Ok(())
    }
}

/// The most paths one VMM's namespace binds (its directories, disks and
/// the files it reads from under hidden directories).
pub const MAX_BINDS: usize = 64;

/// `/proc/self/fd/<fd>` in `buf`, NUL-terminated, without allocating.
fn fd_path(fd: libc::c_int, buf: &mut [u8; 32]) -> *const libc::c_char {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = fd.max(0) as u32;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    buf.as_ptr().cast()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Sets or clears read-only on the mount at `path` (and, with `recursive`,
/// every mount below it) with `mount_setattr`.
fn set_read_only(path: &CString, read_only: bool, recursive: bool) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: if read_only { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: if read_only { 0 } else { MOUNT_ATTR_RDONLY },
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: a CString path and a mount_attr of the size given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every mount read-only in one call; `false` when the kernel has no
/// `mount_setattr` (before 5.12).
fn read_only_recursive() -> std::io::Result<bool> {
    match set_read_only(&CString::from(c"/"), true, true) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remounts the mount at `path` read-only or writable, keeping its other
/// per-mount flags (a bind remount sets them all).
fn remount(path: &CString, read_only: bool) -> std::io::Result<()> {
    // The kernel's `struct statfs` on x86-64 (libc's hides `f_flags`).
    #[repr(C)]
    #[derive(Default)]
    struct StatFs {
        counts: [i64; 7],
        fsid: [i32; 2],
        namelen: i64,
        frsize: i64,
        flags: i64,
        spare: [i64; 4],
    }
    let mut st = StatFs::default();
    // SAFETY: a CString path and a buffer of the kernel's struct's size.
    let r = unsafe { libc::syscall(libc::SYS_statfs, path.as_ptr(), &mut st as *mut StatFs) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    const KEPT: u64 = libc::ST_NOSUID
        | libc::ST_NODEV
        | libc::ST_NOEXEC
        | libc::ST_NOATIME
        | libc::ST_NODIRATIME
        | libc::ST_RELATIME;
    // The ST_* bits are the MS_* bits of the same names.
    let mut flags = (st.flags as u64 & KEPT) as libc::c_ulong | libc::MS_BIND | libc::MS_REMOUNT;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: a CString path; null for the ignored arguments.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            path.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("godwit-jail-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p.canonicalize().unwrap()
    }

    #[test]
    fn kept_paths_under_hidden_ones_are_bound_back() {
        let d = tmp("plan");
        let vms = d.join("vms");
        std::fs::create_dir_all(vms.join("ns/a")).unwrap();
        std::fs::create_dir_all(vms.join("ns/b")).unwrap();
        std::fs::create_dir_all(d.join("shared/ns/a")).unwrap();
        std::fs::write(d.join("disk.raw"), "").unwrap();
        std::fs::write(d.join("kernel"), "").unwrap();
        let policy = JailPolicy {
            hide: vec![
                vms.clone(),
                vms.join("ns"), // inside another: dropped
                d.join("shared"),
                d.join("missing"),
            ],
            keep: vec![
                (d.join("shared/ns/a"), Access::ReadWrite),
                (vms.join("ns/a"), Access::ReadWrite),
                (d.join("disk.raw"), Access::ReadWrite),
                (d.join("kernel"), Access::ReadOnly),
                (d.join("missing-disk"), Access::ReadWrite),
            ],
            read_only_root: true,
        };
        let jail = Jail::prepare(&policy).unwrap();
        let s = |p: &Path| cstring(p).unwrap();
        let hidden: Vec<&CString> = jail.hide.iter().map(|h| &h.path).collect();
        assert_eq!(hidden, [&s(&d.join("shared")), &s(&vms)]);
        let binds: Vec<(&CString, &Vec<CString>, bool)> = jail
            .binds
            .iter()
            .map(|b| (&b.path, &b.mkdirs, b.writable))
            .collect();
        assert_eq!(
            binds,
            [
                // The writable disk outside: bound onto itself to be writable.
                (&s(&d.join("disk.raw")), &vec![], true),
                (
                    &s(&d.join("shared/ns/a")),
                    &vec![s(&d.join("shared/ns")), s(&d.join("shared/ns/a"))],
                    true
                ),
                (
                    &s(&vms.join("ns/a")),
                    &vec![s(&vms.join("ns")), s(&vms.join("ns/a"))],
                    true
                ),
            ]
        );
        assert!(jail.mounts.iter().any(|m| m.as_bytes() == b"/"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn descriptor_paths_are_written_in_place() {
        let mut buf = [0u8; 32];
        for (fd, want) in [
            (0, "/proc/self/fd/0"),
            (7, "/proc/self/fd/7"),
            (1234, "/proc/self/fd/1234"),
        ] {
            let p = fd_path(fd, &mut buf);
            // SAFETY: fd_path NUL-terminates inside `buf`.
            let got = unsafe { std::ffi::CStr::from_ptr(p) };
            assert_eq!(got.to_str().unwrap(), want);
        }
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount_point(r"/a\040b"), b"/a b");
        assert_eq!(unescape_mount_point(r"/a\\"), br"/a\\");
    }
}
