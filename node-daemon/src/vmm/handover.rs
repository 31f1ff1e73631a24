//! Descriptors the node agent hands a VMM it runs as an unprivileged user.
//!
//! `/dev/kvm`, `/dev/net/tun` and `/dev/userfaultfd` are usually root-only,
//! and creating a tap or adding it to a bridge needs `CAP_NET_ADMIN`. So the
//! agent (root) opens the devices, creates and attaches each tap, and starts
//! the VMM under its own user (`agent::vmm_user::VmmUsers`) with the open
//! descriptors inherited and named on the command line:
//!
//! - `--kvm-fd N`: `/dev/kvm`; every VM the process creates uses a `dup` of
//!   it ([`kvm`]);
//! - `--userfaultfd-fd N`: `/dev/userfaultfd`, for post-copy
//!   ([`userfaultfd_device`]);
//! - `--tap-fd NAME=N`: tap `NAME`, already up and on its bridge; the NIC
//!   configured with `tap=NAME` takes it ([`take_tap`]) instead of creating
//!   one;
//! - `--tls-fd N`: the migration identity as JSON (cert, key and CA PEM) on
//!   a pipe, so the key file itself can stay root-only (see
//!   `control::MigrationIdentity::from_pem`).
//!
//! Without these flags the VMM opens what it needs itself, as before.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

use kvm_ioctls::Kvm;

static KVM: OnceLock<OwnedFd> = OnceLock::new();
static USERFAULTFD: OnceLock<OwnedFd> = OnceLock::new();
static TAPS: Mutex<Vec<(String, OwnedFd)>> = Mutex::new(Vec::new());

/// Errors adopting a descriptor named on the command line.
#[derive(Debug, thiserror::Error)]
pub enum HandedError {
    /// The number is not an open descriptor of this process.
    #[error("{what} descriptor {fd} is not open in this process")]
    NotOpen {
        /// What it was meant to be.
        what: &'static str,
        /// The number given.
        fd: RawFd,
        /// From `fcntl(F_GETFD)`.
        #[source]
        source: std::io::Error,
    },
    /// The same device was handed twice.
    #[error("{0} was handed over twice")]
    Twice(&'static str),
}

/// Takes ownership of inherited descriptor `fd`, after checking that it is
/// open, and marks it close-on-exec.
fn adopt(what: &'static str, fd: RawFd) -> Result<OwnedFd, HandedError> {
    // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if fd < 3 || flags < 0 {
        return Err(HandedError::NotOpen {
            what,
            fd,
            source: if fd < 3 {
                std::io::Error::from_raw_os_error(libc::EBADF)
            } else {
                std::io::Error::last_os_error()
            },
        });
    }
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the agent handed this descriptor to this process alone, and
    // each number is adopted once (the callers refuse a second time).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adopts the `/dev/kvm` descriptor.
pub fn set_kvm(fd: RawFd) -> Result<(), HandedError> {
    KVM.set(adopt("/dev/kvm", fd)?)
        .map_err(|_| HandedError::Twice("/dev/kvm"))
}

/// Adopts the `/dev/userfaultfd` descriptor.
pub fn set_userfaultfd_device(fd: RawFd) -> Result<(), HandedError> {
    USERFAULTFD
        .set(adopt("/dev/userfaultfd", fd)?)
        .map_err(|_| HandedError::Twice("/dev/userfaultfd"))
}

/// Adopts the descriptor of tap `name`.
pub fn add_tap(name: &str, fd: RawFd) -> Result<(), HandedError> {
    let fd = adopt("tap", fd)?;
    let mut taps = TAPS.lock().unwrap_or_else(|p| p.into_inner());
    if taps.iter().any(|(n, _)| n == name) {
        return Err(HandedError::Twice("a tap"));
    }
    taps.push((name.to_string(), fd));
    Ok(())
}

/// Adopts the read end of a pipe and reads it to its end.
pub fn read_pipe(what: &'static str, fd: RawFd) -> Result<Vec<u8>, std::io::Error> {
    use std::io::Read;
    let fd = adopt(what, fd).map_err(std::io::Error::other)?;
    let mut out = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut out)?;
    Ok(out)
}

/// A KVM handle: a `dup` of the handed `/dev/kvm` descriptor, or
/// `/dev/kvm` opened here.
pub fn kvm() -> Result<Kvm, kvm_ioctls::Error> {
    match KVM.get() {
        Some(fd) => {
            let fd = fd
                .try_clone()
                .map_err(|e| kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)))?;
            // SAFETY: `fd` is a new descriptor of /dev/kvm that the Kvm owns.
            Ok(unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) })
        }
        None => Kvm::new(),
    }
}

/// Whether the agent handed this VMM its `/dev/kvm`.
pub fn has_kvm() -> bool {
    KVM.get().is_some()
}

/// The handed `/dev/userfaultfd`, if any.
pub fn userfaultfd_device() -> Option<BorrowedFd<'static>> {
    USERFAULTFD.get().map(|fd| {
        // SAFETY: the static owns the descriptor for the process's lifetime.
        unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
    })
}

/// The handed descriptor of tap `name`, once.
pub fn take_tap(name: &str) -> Option<OwnedFd> {
    let mut taps = TAPS.lock().unwrap_or_else(|p| p.into_inner());
    let i = taps.iter().position(|(n, _)| n == name)?;
    Some(taps.swap_remove(i).1)
}
