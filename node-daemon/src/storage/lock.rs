//! Image locks: the split-brain guard for disks on shared storage.
//!
//! A VMM holds an exclusive lock on every disk image it opens read-write
//! and a shared lock on every image it only reads (read-only disks and the
//! backing images under a qcow2 overlay). A second VMM, on this node or on
//! another node that sees the same file system, cannot then open the image
//! read-write: its exclusive lock is refused and it exits with an error
//! naming the holder. HA restarts rely on this: a VM whose node merely lost
//! its network cannot be started a second time on the same disk.
//!
//! The locks are open file description locks (`F_OFD_SETLK`) over the whole
//! file: they work across processes and, on NFS and other cluster file
//! systems that forward POSIX locks, across nodes; they belong to the open
//! file and go away when the process exits, however it exits, so a crashed
//! VMM never leaves a stale lock. They conflict with QEMU's own image locks
//! (OFD locks on bytes 100 and up), so QEMU and `qemu-img` (without `-U`)
//! also refuse an image a Godwit VMM is running.
//!
//! # Hand-over at live migration (shared storage)
//!
//! Source and target both have the disk open during a migration, but only
//! one may hold the exclusive lock. The order the migration engine keeps:
//!
//! 1. The target builds the VM in incoming mode *without* taking locks
//!    (`vmm::BuildMode::Incoming` opens disks unlocked).
//! 2. When the source has decided to commit (the target reported Ready),
//!    its vCPUs are stopped for good: it flushes and calls
//!    `vmm::Vmm::release_disks`, then sends Commit
//!    (`migration::sender`). Should Commit not go out, it takes
//!    the locks back before it resumes the guest.
//! 3. On Commit, before it runs the guest, the target calls
//!    `vmm::Vmm::activate_disks` (`migration::receiver`),
//!    which reopens each image (a qcow2 image's metadata may have changed
//!    while the source ran) and takes the locks. If that fails, the target
//!    does not resume the guest.
//!
//! A post-copy target runs the guest before any hand-over (post-copy is
//! off when disks are copied, but a shared disk may be in use): its block
//! device does the reopen itself before its first request and takes the
//! locks if they are free, warning when the source still holds them. A
//! snapshot restore takes the locks at once, so a
//! snapshot of a running VM cannot be started next to it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{io_error, StorageError};

/// How an image is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Readers: any number, but no writer.
    Shared,
    /// One writer, nobody else.
    Exclusive,
}

/// A held lock on one image; released on drop (or with [`ImageLock::release`]).
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
    mode: LockMode,
}

fn ofd_lock(file: &File, kind: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock is plain data; zeroed is a valid (unlock, whole file)
    // value that we fill in below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however it grows
                  // SAFETY: F_OFD_SETLK reads the flock struct we pass; the fd is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl ImageLock {
    /// Takes the lock on `path` without waiting. When another open file
    /// holds a conflicting lock the error is [`StorageError::Locked`], with
    /// the holder's pid and command when this node can see it.
    pub fn acquire(path: &Path, mode: LockMode) -> Result<ImageLock, StorageError> {
        // A write lock needs a file opened for writing.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(mode == LockMode::Exclusive)
            .open(path)
            .map_err(|e| io_error(path, "open", e))?;
        let kind = match mode {
            LockMode::Shared => libc::F_RDLCK,
            LockMode::Exclusive => libc::F_WRLCK,
        };
        match ofd_lock(&file, kind) {
            Ok(()) => Ok(ImageLock {
                file,
                path: path.to_path_buf(),
                mode,
            }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                Err(StorageError::Locked {
                    path: path.display().to_string(),
                    holder: holder(path).unwrap_or_else(|| "another process or node".into()),
                })
            }
            Err(e) => Err(StorageError::Lock(path.display().to_string(), e)),
        }
    }

    /// The locked image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Shared or exclusive.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Releases the lock now (dropping does the same).
    pub fn release(self) {
        let _ = ofd_lock(&self.file, libc::F_UNLCK);
    }
}

/// Who holds an OFD lock on `path`, as `pid N (command)`: found by looking
/// for the file's device and inode in every process's `fdinfo` (the kernel
/// reports OFD locks with pid -1 in `/proc/locks`, but lists each lock
/// under the fd that holds it). `None` when no process of this node (or of
/// this pid namespace) holds one, e.g. when the holder is on another node.
pub fn holder(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let me = std::process::id();
    // /proc/locks prints the device as major:minor in hex.
    let key = format!(" {:02x}:{:02x}:{ino} ", libc::major(dev), libc::minor(dev));
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(text) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if text
                .lines()
                .any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains(&key))
            {
                let cmd = std::fs::read(proc_entry.path().join("cmdline"))
                    .map(|c| {
                        c.split(|b| *b == 0)
                            .filter(|a| !a.is_empty())
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                let cmd: String = cmd.chars().take(120).collect();
                return Some(format!("pid {pid} ({cmd})"));
            }
        }
    }
    None
}

/// Removes a VM's disk image. Refused (with [`StorageError::Locked`]) while
/// a VMM has it open: a running VM's disk is never deleted under it. A disk
/// that does not exist is not an error (removal is idempotent).
pub fn remove(path: &Path) -> Result<(), StorageError> {
    if !path.exists() {
        return Ok(());
    }
    let lock = ImageLock::acquire(path, LockMode::Exclusive)?;
    std::fs::remove_file(path).map_err(|e| io_error(path, "write", e))?;
    drop(lock);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_release_frees() {
        let p = std::env::temp_dir().join(format!("godwit-lock-{}", std::process::id()));
        std::fs::write(&p, [0u8; 512]).unwrap();
        let a = ImageLock::acquire(&p, LockMode::Exclusive).unwrap();
        // A second open file description conflicts, even in this process.
        let e = ImageLock::acquire(&p, LockMode::Exclusive).unwrap_err();
        assert!(matches!(e, StorageError::Locked { .. }), "{e}");
        assert!(ImageLock::acquire(&p, LockMode::Shared).is_err());
        a.release();
        let s1 = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        let s2 = ImageLock::acquire(&p, LockMode::Shared).unwrap();
        assert!(ImageLock::acquire(&p, LockMode::Exclusive).is_err());
        drop(s1);
        drop(s2);
        ImageLock::acquire(&p, LockMode::Exclusive).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
}
