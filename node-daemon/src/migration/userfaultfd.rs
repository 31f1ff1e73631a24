//! A thin wrapper over Linux's userfaultfd, as post-copy uses it: open a
//! descriptor, register guest RAM for missing-page faults, read the faults,
//! and resolve them by installing data (`UFFDIO_COPY`) or zero pages
//! (`UFFDIO_ZEROPAGE`). The raw ioctls and their structs live here and
//! nowhere else; what to do with a fault is [`super::postcopy`]'s business.
//!
//! Where the descriptor comes from: the `userfaultfd` system call, or, when
//! that is denied (a VMM without `CAP_SYS_PTRACE` cannot handle faults the
//! kernel takes on guest memory unless `vm.unprivileged_userfaultfd` is 1),
//! the `/dev/userfaultfd` device (Linux 6.1+). The caller may pass an open
//! device in: a VMM running as its own user gets it from the node agent and
//! could not open it itself.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::protocol::PAGE_SIZE;

// userfaultfd ABI (linux/userfaultfd.h).
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault, the address is at offset 16.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

/// Errors of the userfaultfd wrapper: one per failing call.
#[derive(Debug, thiserror::Error)]
pub enum UserfaultError {
    /// The `userfaultfd` system call failed for another reason than a
    /// missing capability.
    #[error("Cannot open a userfaultfd")]
    Open(#[source] io::Error),
    /// The system call was denied and `/dev/userfaultfd` could not be used
    /// either.
    #[error("Cannot open a userfaultfd: the userfaultfd call needs CAP_SYS_PTRACE, and /dev/userfaultfd is not usable")]
    OpenDevice(#[source] io::Error),
    /// `UFFDIO_API` failed.
    #[error("UFFDIO_API failed")]
    Api(#[source] io::Error),
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER failed")]
    Register(#[source] io::Error),
    /// `UFFDIO_UNREGISTER` failed.
    #[error("UFFDIO_UNREGISTER failed")]
    Unregister(#[source] io::Error),
    /// `UFFDIO_COPY` failed.
    #[error("UFFDIO_COPY failed")]
    Copy(#[source] io::Error),
    /// `UFFDIO_ZEROPAGE` failed.
    #[error("UFFDIO_ZEROPAGE failed")]
    ZeroPage(#[source] io::Error),
    /// Reading fault messages failed.
    #[error("Cannot read userfaultfd messages")]
    Read(#[source] io::Error),
    /// `madvise(MADV_DONTNEED)` on pages to fault in again failed.
    #[error("Cannot drop stale pages (madvise)")]
    Discard(#[source] io::Error),
}

impl UserfaultError {
    /// The OS error code underneath.
    pub fn raw_os_error(&self) -> Option<i32> {
        use UserfaultError::*;
        match self {
            Open(e) | OpenDevice(e) | Api(e) | Register(e) | Unregister(e) | Copy(e)
            | ZeroPage(e) | Read(e) | Discard(e) => e.raw_os_error(),
        }
    }
}

/// Issues `request` on `fd` with `arg`.
fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, correctly laid-out struct for `request` (the
    // constants above encode its size); the kernel reads and writes only it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A new userfaultfd from `/dev/userfaultfd`: `device` if given, else the
/// device opened here.
fn from_device(device: Option<BorrowedFd<'_>>, flags: libc::c_int) -> io::Result<OwnedFd> {
    let opened;
    let dev = match device {
        Some(fd) => fd.as_raw_fd(),
        None => {
            opened = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")?;
            opened.as_raw_fd()
        }
    };
    // SAFETY: the ioctl takes the flags by value and returns a new fd or -1.
    let raw = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW, flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A userfaultfd handling missing-page faults of guest RAM.
pub struct Userfault {
    fd: OwnedFd,
}

impl Userfault {
    /// Opens a non-blocking userfaultfd and negotiates the API. `device` is
    /// an open `/dev/userfaultfd`, used when the system call is denied
    /// (`None`: open the device here then).
    pub fn open(device: Option<BorrowedFd<'_>>) -> Result<Userfault, UserfaultError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the syscall takes only flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if raw < 0 {
            let denied = io::Error::last_os_error();
            if denied.raw_os_error() != Some(libc::EPERM) {
                return Err(UserfaultError::Open(denied));
            }
            from_device(device, flags).map_err(UserfaultError::OpenDevice)?
        } else {
            // SAFETY: `raw` is a new fd that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw as i32) }
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_API, &mut api).map_err(UserfaultError::Api)?;
        Ok(Userfault { fd })
    }

    /// Whether this host lets us use userfaultfd (with `device` as
    /// [`Userfault::open`] takes it).
    pub fn available(device: Option<BorrowedFd<'_>>) -> bool {
        Userfault::open(device).is_ok()
    }

    /// Routes missing-page faults in `host .. host + len` to this fd.
    pub fn register(&self, host: *mut u8, len: u64) -> Result<(), UserfaultError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: host as u64,
                len,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut reg).map_err(UserfaultError::Register)
    }

    /// Stops routing faults of the range (waking anyone blocked in it).
    pub fn unregister(&self, host: *mut u8, len: u64) -> Result<(), UserfaultError> {
        let mut range = UffdioRange {
            start: host as u64,
            len,
        };
        ioctl(&self.fd, UFFDIO_UNREGISTER, &mut range).map_err(UserfaultError::Unregister)
    }

    /// Installs `data` at `dst` page by page where a bulk copy meets pages
    /// that are already present (which keep their contents).
    pub fn copy(&self, dst: *mut u8, data: &[u8]) -> Result<(), UserfaultError> {
        let mut done = 0usize;
        while done < data.len() {
            let mut c = UffdioCopy {
                dst: dst as u64 + done as u64,
                src: data[done..].as_ptr() as u64,
                len: (data.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            match ioctl(&self.fd, UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Bytes copied before the present page, then skip it.
                    done += c.copy.max(0) as usize + PAGE_SIZE;
                    done -= done % PAGE_SIZE;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    done += c.copy.max(0) as usize;
                }
                Err(e) => return Err(UserfaultError::Copy(e)),
            }
        }
        Ok(())
    }

    /// Maps zero pages at `dst .. dst + len` where nothing is present.
    pub fn zero(&self, dst: *mut u8, len: u64) -> Result<(), UserfaultError> {
        let mut done = 0u64;
        while done < len {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: dst as u64 + done,
                    len: len - done,
                },
                mode: 0,
                zeropage: 0,
            };
            match ioctl(&self.fd, UFFDIO_ZEROPAGE, &mut z) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    done += z.zeropage.max(0) as u64 + PAGE_SIZE as u64;
                    done -= done % PAGE_SIZE as u64;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    done += z.zeropage.max(0) as u64
                }
                Err(e) => return Err(UserfaultError::ZeroPage(e)),
            }
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for faults and returns their page addresses.
    pub fn faults(&self, timeout_ms: i32) -> Result<Vec<u64>, UserfaultError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n <= 0 {
            return Ok(Vec::new());
        }
        let mut msgs = [UffdMsg {
            event: 0,
            _reserved: [0; 7],
            flags: 0,
            address: 0,
            _feat: 0,
        }; 16];
        // SAFETY: reading into a buffer of 16 uffd_msg-sized, plain-data structs.
        let r = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(Vec::new());
            }
            return Err(UserfaultError::Read(e));
        }
        let count = r as usize / std::mem::size_of::<UffdMsg>();
        Ok(msgs[..count]
            .iter()
            .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
            .map(|m| m.address & !(PAGE_SIZE as u64 - 1))
            .collect())
    }
}

/// Drops the pages at `host .. host + len`, so that the next touch of a
/// registered range faults (and the page is fetched again).
///
/// # Safety
///
/// The range must lie inside one mapping of guest RAM that nothing reads
/// while this runs (the guest is not running), and whose old contents no
/// one needs.
pub unsafe fn discard(host: *mut u8, len: usize) -> Result<(), UserfaultError> {
    // SAFETY: the caller guarantees the range is inside a live mapping whose
    // contents may go; MADV_DONTNEED only unmaps its pages.
    let r = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if r != 0 {
        return Err(UserfaultError::Discard(io::Error::last_os_error()));
    }
    Ok(())
}
