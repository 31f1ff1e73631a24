//! Post-copy: the guest resumes on the target before all of its memory has
//! arrived. The target registers guest RAM with userfaultfd; a page the guest
//! (or a device) touches that is still on the source faults, the fault thread
//! asks the source for it (`PageRequest`), and the receiving thread installs it
//! with `UFFDIO_COPY`, which wakes the faulting vCPU. Meanwhile the source
//! pushes the remaining pages in order, serving requested pages first.
//!
//! Pages the target never received as data were zero on the source (round 0
//! sends zero pages as run headers only) and are filled with `UFFDIO_ZEROPAGE`
//! without asking. A page's "still needed" bit is cleared only after its data
//! is installed, so the fault thread can never zero-fill a page whose data is
//! on its way.
//!
//! ## When the link fails
//!
//! In post-copy the guest's memory is split between the two VMMs, so a
//! broken connection must not end the migration while both still run.
//! When the connection breaks, closes or stays quiet for the stall timeout
//! ([`connection_lost`]):
//!
//! - the target keeps the guest running; a vCPU that touches a page still on
//!   the source waits in its fault (the rest of the guest runs on); the
//!   target waits on the port the migration came in on for the source to
//!   connect again;
//! - the source keeps its paused copy and dials the target's address again,
//!   every 200 ms (each attempt bounded by 2 s), and on a new connection sends
//!   `Resume`; the target answers `ResumeAck` with whether the guest already
//!   runs there and the runs of pages it still lacks (pages in flight on the
//!   old connection are lost with it), and asks again for the pages its
//!   vCPUs wait for; the source carries on from that list;
//! - progress says `reconnecting` meanwhile (the node agent turns it into
//!   `LinkLost` / `LinkRestored` Events on the VMMigration).
//!
//! Outcomes:
//!
//! | what happened | outcome |
//! |---|---|
//! | link back within the recovery timeout ([`RECOVER_TIMEOUT`], 60 s; `migrate-send` `recover_timeout_s`) | the migration completes; nothing is lost (pages are only ever installed into missing pages, so a page sent twice is ignored) |
//! | link not back in time | both sides fail with `LinkNotBack` inside `PostCopyLost` (or `CommitUnknown` if the source never heard that the guest runs); the source exits as failed a few seconds later and the VM is restarted as its `runStrategy` says: its memory is lost, its disks are not; nothing runs twice |
//! | target VMM gone (the source's dial is refused) | at once, as above |
//! | source VMM gone (its end of the connection closes) | the target fails at once, as above; it waits only for a link that went quiet, so a half-run guest never lingers next to the VM's restart |
//!
//! A link that is down for less than the stall timeout (10 s by default) is
//! bridged by TCP itself, without a new connection. In a cluster, a node
//! cut off entirely (API server included) fences itself after its Lease
//! runs out (8 s) and HA restarts its VMs elsewhere; recovery is what
//! carries a migration over a failure of the migration network alone.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::convergence::Round;
use super::precopy::Source;
use super::progress::{MigrationResult, ModeUsed, ProgressHandle, Stage};
use super::protocol::{self, Command, PAGE_SIZE};
use super::receiver::TargetMemory;
use super::transport::Conn;
use super::vm::{DirtyPages, GuestRegion, SourceVm, TargetVm};
use super::MigrationError;

/// Pages pushed between two looks at the target's requests.
const PUSH_PAGES: u64 = 32;

// userfaultfd ABI (linux/userfaultfd.h).
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

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

/// A userfaultfd handling missing-page faults of guest RAM.
pub struct Userfault {
    fd: OwnedFd,
}

fn ioctl<T>(fd: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is a live, correctly laid-out struct for `request` (the
    // constants above encode its size); the kernel reads and writes only it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;

/// A userfaultfd from /dev/userfaultfd: the one the node agent handed over
/// ([`crate::vmm::handed`]), or opened here.
fn from_device(flags: libc::c_int) -> std::io::Result<i32> {
    let opened;
    let dev = match crate::vmm::handed::userfaultfd_device() {
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
        return Err(std::io::Error::last_os_error());
    }
    Ok(raw)
}

impl Userfault {
    /// Opens a non-blocking userfaultfd and negotiates the API.
    ///
    /// Handling faults the kernel takes on guest memory (KVM touches it from
    /// kernel mode) through the `userfaultfd` system call needs
    /// `CAP_SYS_PTRACE` unless `vm.unprivileged_userfaultfd` is 1. A VMM
    /// started by the node agent has no such capability (see
    /// `vmm::sandbox::bound_capabilities_for_exec`), so on `EPERM` the fd
    /// comes from `/dev/userfaultfd` (Linux 6.1+), which file permissions
    /// guard instead (root only: a VMM running as its own user gets the
    /// device from the agent).
    pub fn new() -> Result<Userfault, MigrationError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the syscall takes only flags and returns a new fd or -1.
        let mut raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if raw < 0 {
            let denied = std::io::Error::last_os_error();
            if denied.raw_os_error() != Some(libc::EPERM) {
                return Err(MigrationError::Userfault("open", denied));
            }
            raw = from_device(flags).map_err(|e| {
                MigrationError::Userfault(
                    "open (the userfaultfd call needs CAP_SYS_PTRACE, and /dev/userfaultfd)",
                    e,
                )
            })? as i64;
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_API, &mut api).map_err(|e| MigrationError::Userfault("UFFDIO_API", e))?;
        Ok(Userfault { fd })
    }

    /// Routes missing-page faults in `host .. host + len` to this fd.
    pub fn register(&self, host: *mut u8, len: u64) -> Result<(), MigrationError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: host as u64,
                len,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut reg)
            .map_err(|e| MigrationError::Userfault("UFFDIO_REGISTER", e))
    }

    /// Stops routing faults of the range (waking anyone blocked in it).
    pub fn unregister(&self, host: *mut u8, len: u64) -> Result<(), MigrationError> {
        let mut range = UffdioRange {
            start: host as u64,
            len,
        };
        ioctl(&self.fd, UFFDIO_UNREGISTER, &mut range)
            .map_err(|e| MigrationError::Userfault("UFFDIO_UNREGISTER", e))
    }

    /// Installs `data` at `dst` page by page where a bulk copy meets pages
    /// that are already present (which keep their contents).
    pub fn copy(&self, dst: *mut u8, data: &[u8]) -> Result<(), MigrationError> {
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
                Err(e) => return Err(MigrationError::Userfault("UFFDIO_COPY", e)),
            }
        }
        Ok(())
    }

    /// Maps zero pages at `dst .. dst + len` where nothing is present.
    pub fn zero(&self, dst: *mut u8, len: u64) -> Result<(), MigrationError> {
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
                Err(e) => return Err(MigrationError::Userfault("UFFDIO_ZEROPAGE", e)),
            }
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for faults and returns their page addresses.
    pub fn faults(&self, timeout_ms: i32) -> Result<Vec<u64>, MigrationError> {
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
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(Vec::new());
            }
            return Err(MigrationError::Userfault("read", e));
        }
        let count = r as usize / std::mem::size_of::<UffdMsg>();
        Ok(msgs[..count]
            .iter()
            .filter(|m| m.event == UFFD_EVENT_PAGEFAULT)
            .map(|m| m.address & !(PAGE_SIZE as u64 - 1))
            .collect())
    }
}

/// Whether this host lets us use userfaultfd (checked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| Userfault::new().is_ok())
}

/// How long a post-copy migration whose link was lost waits for it to come
/// back before the guest is given up ([`SendOptions::recover_timeout`],
/// `ReceiveOptions::recover_timeout`).
///
/// [`SendOptions::recover_timeout`]: super::precopy::SendOptions::recover_timeout
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether `e` means the connection is gone (it broke, closed, or went
/// quiet for the stall timeout) rather than that the peer refused
/// something (an `Abort`, a malformed frame, a failed TLS record). With a
/// way to reconnect, post-copy then tries to carry on over a new
/// connection: a lost link looks, from either end, like a quiet
/// connection and, once it is back, like one the other end has closed.
/// The source decides on this (its dial is refused when the target VMM is
/// gone) and keeps the connections it gives up open, so that no FIN
/// reaches the target; the target waits only for a quiet link
/// ([`link_quiet`]).
pub(super) fn connection_lost(e: &MigrationError) -> bool {
    match e {
        MigrationError::StreamClosed => true,
        MigrationError::Protocol(protocol::ProtocolError::Io(io)) => !io
            .get_ref()
            .is_some_and(|inner| inner.is::<super::tls::SessionError>()),
        _ => false,
    }
}

/// Whether `e` is a quiet or unreachable link (nothing heard or
/// acknowledged for the stall timeout), as opposed to a connection the peer
/// closed or reset. The target waits for the source only after this: a
/// source that closed its end has exited, and waiting for it would keep a
/// half-run guest alive next to the VM's restart.
pub(super) fn link_quiet(e: &MigrationError) -> bool {
    use std::io::ErrorKind::*;
    let MigrationError::Protocol(protocol::ProtocolError::Io(io)) = e else {
        return false;
    };
    matches!(
        io.kind(),
        WouldBlock | TimedOut | HostUnreachable | NetworkUnreachable
    ) || matches!(
        io.raw_os_error(),
        Some(libc::ETIMEDOUT | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}

/// Where the source stands in post-copy.
struct Serve {
    /// Pages the target still needs, as far as the source knows.
    needed: Vec<DirtyPages>,
    remaining: u64,
    /// Next page of the background push (region, page).
    cursor: (usize, u64),
    /// When the target said the guest runs there (from the pause).
    activated: Option<Duration>,
}

impl Serve {
    /// Replaces what the source thinks the target needs with what the target
    /// says it needs (after a reconnection: pages in flight on the lost
    /// connection never arrived).
    fn reset(
        &mut self,
        regions: &[GuestRegion],
        runs: &[(u64, u32)],
    ) -> Result<(), MigrationError> {
        for d in &mut self.needed {
            d.bitmap.iter_mut().for_each(|w| *w = 0);
        }
        for &(gpa, pages) in runs {
            for p in 0..u64::from(pages) {
                let gpa = gpa + p * PAGE_SIZE as u64;
                let (r, page) = locate(regions, gpa).ok_or(MigrationError::PageOutOfRange(gpa))?;
                self.needed[r].bitmap[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        self.remaining = self.needed.iter().map(DirtyPages::count).sum();
        self.cursor = (0, 0);
        Ok(())
    }
}

/// The source after the switch: sends the state and the list of pages the
/// target still needs, then pushes them in order, serving requested pages
/// first, until all are there.
///
/// Requests are served from the first moment, before the target says the
/// guest runs: restoring the state may already touch a missing page (the
/// kvmclock page). Until `Activated` arrives, an explicit `Abort` still leaves
/// the guest to us; any other failure leaves it unknown (the target may have
/// resumed), so the source stays paused.
///
/// If the connection is lost ([`connection_lost`]) and the options say how to reconnect,
/// the source dials the target again until the recovery timeout, and carries
/// on with what the target says it still needs ([`rejoin`]).
pub(super) fn source_serve<V: SourceVm>(
    src: &mut Source<'_, V>,
    pending: &[DirtyPages],
    vm_state: &[u8],
    pause_start: Instant,
    history: &[Round],
    committed: &mut bool,
) -> Result<MigrationResult, MigrationError> {
    let needed: Vec<DirtyPages> = pending.to_vec();
    let runs: Vec<(u64, u32)> = needed
        .iter()
        .flat_map(|d| {
            d.runs()
                .map(move |(first, n)| (d.gpa + first * PAGE_SIZE as u64, n as u32))
        })
        .collect();
    src.in_postcopy = true;
    src.writer.send(Command::State, vm_state)?;
    src.writer
        .send(Command::PostCopy, &protocol::encode_page_runs(&runs))?;
    src.progress.update(|p| p.stage = Stage::PostCopy);

    let mut serve = Serve {
        remaining: needed.iter().map(DirtyPages::count).sum(),
        needed,
        cursor: (0, 0),
        activated: None,
    };
    loop {
        let outcome = push(src, &mut serve, pause_start, committed).and_then(|()| finish(src));
        let e = match outcome {
            Ok(()) => break,
            Err(e) => e,
        };
        let recoverable = connection_lost(&e) && src.opts.reconnect.is_some();
        let e = if recoverable {
            match rejoin(src, &e) {
                Ok((activated, runs)) => {
                    if activated && serve.activated.is_none() {
                        serve.activated = Some(pause_start.elapsed());
                        *committed = true;
                    }
                    serve.reset(&src.regions, &runs)?;
                    continue;
                }
                Err(again) => {
                    tracing::warn!("post-copy not resumed: {}", crate::error_chain(&again));
                    again
                }
            }
        } else {
            e
        };
        return Err(match (&e, serve.activated) {
            // The target never ran the guest and said so: it is still ours.
            (MigrationError::PeerAbort(_), None) => e,
            (_, None) => {
                *committed = true;
                MigrationError::CommitUnknown(Box::new(e))
            }
            (_, Some(_)) => MigrationError::PostCopyLost(Box::new(e)),
        });
    }
    let downtime = serve
        .activated
        .expect("post-copy ends only once the target runs the guest");
    Ok(MigrationResult {
        total_ms: src.started.elapsed().as_millis() as u64,
        downtime_ms: downtime.as_secs_f64() * 1000.0,
        bytes_sent: src.writer.bytes_sent,
        rounds: history.len() as u32,
        mode: ModeUsed::PostCopy,
        pages_sent: src.pages_sent,
        zero_pages: src.zero_pages,
        downtime_breakdown: None,
        storage: None,
    })
}

/// Serves requests and pushes the rest until the target has every page and
/// runs the guest.
fn push<V: SourceVm>(
    src: &mut Source<'_, V>,
    serve: &mut Serve,
    pause_start: Instant,
    committed: &mut bool,
) -> Result<(), MigrationError> {
    while serve.remaining > 0 || serve.activated.is_none() {
        // Requests and Activated first; with nothing left to push, wait.
        loop {
            let next = if serve.remaining == 0 {
                super::transport::recv_timeout(&src.incoming, src.opts.stall_timeout).map(Some)?
            } else {
                match src.incoming.try_recv() {
                    Ok(item) => Some(item?),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return Err(MigrationError::StreamClosed),
                }
            };
            match next {
                None => break,
                Some((Command::PageRequest, payload)) => {
                    for gpa in protocol::parse_page_request(&payload)? {
                        if let Some((r, page)) = locate(&src.regions, gpa) {
                            if take_bit(&mut serve.needed[r], page) {
                                src.send_run(r, page, 1)?;
                                serve.remaining -= 1;
                            }
                        }
                    }
                    src.flush_batch()?;
                }
                Some((Command::Activated, _)) => {
                    serve.activated = Some(pause_start.elapsed());
                    *committed = true;
                    if serve.remaining == 0 {
                        return Ok(());
                    }
                }
                Some((got, payload)) => {
                    return Err(MigrationError::unexpected(
                        got,
                        &payload,
                        "PageRequest or Activated",
                    ))
                }
            }
            if serve.remaining == 0 && serve.activated.is_some() {
                return Ok(());
            }
        }
        // Then a slice of the background push.
        let mut pushed = 0;
        while serve.remaining > 0 && pushed < PUSH_PAGES && serve.cursor.0 < serve.needed.len() {
            let (r, page) = serve.cursor;
            let pages = serve.needed[r].bitmap.len() as u64 * 64;
            if page >= pages {
                serve.cursor = (r + 1, 0);
                continue;
            }
            if serve.needed[r].bitmap[(page / 64) as usize] == 0 {
                serve.cursor.1 = (page / 64 + 1) * 64;
                continue;
            }
            if take_bit(&mut serve.needed[r], page) {
                src.send_run(r, page, 1)?;
                serve.remaining -= 1;
                pushed += 1;
            }
            serve.cursor.1 += 1;
        }
        src.flush_batch()?;
        src.progress.update(|p| {
            p.memory_remaining_bytes = serve.remaining * PAGE_SIZE as u64;
            p.transferred_bytes = src.writer.bytes_sent;
        });
    }
    Ok(())
}

/// Everything is there: `Complete`, then the target's `Ready`. Requests the
/// target sent for pages already on their way may still be in the stream
/// ahead of Ready; they need no answer.
fn finish<V: SourceVm>(src: &mut Source<'_, V>) -> Result<(), MigrationError> {
    src.writer.send(Command::Complete, &[])?;
    src.progress.update(|p| p.stage = Stage::Committing);
    loop {
        match super::transport::recv_timeout(&src.incoming, src.opts.stall_timeout)? {
            (Command::Ready, _) => return Ok(()),
            (Command::PageRequest, _) => continue,
            (got, payload) => return Err(MigrationError::unexpected(got, &payload, "Ready")),
        }
    }
}

/// After a lost link: drops the old connection and dials the target until
/// the recovery timeout, then sends `Resume` and returns what the target
/// answers (whether the guest runs there, the runs of pages it still needs).
/// A target that refuses the connection outright (its VMM is gone), or
/// answers with anything but `ResumeAck` (an `Abort`, say), ends the
/// attempt for good; a connection that breaks or stays silent is dialled
/// again.
fn rejoin<V: SourceVm>(
    src: &mut Source<'_, V>,
    why: &MigrationError,
) -> Result<(bool, Vec<(u64, u32)>), MigrationError> {
    let reconnect = src
        .opts
        .reconnect
        .clone()
        .expect("rejoin is only called with a way to reconnect");
    let deadline = Instant::now() + src.opts.recover_timeout;
    tracing::warn!(
        timeout = ?src.opts.recover_timeout,
        "post-copy link lost ({}); dialling the target again",
        crate::error_chain(why)
    );
    src.progress.update(|p| {
        p.reconnecting = true;
        p.stage = Stage::PostCopy;
    });
    let mut last = clone_io(why);
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match (reconnect.0)(left.min(Duration::from_secs(2))) {
            Ok(conn) => {
                src.replace_stream(conn)?;
                let resume = protocol::Resume {
                    vm_name: src.opts.vm_name.clone(),
                };
                let answer = src
                    .writer
                    .send(Command::Resume, &protocol::encode_json(&resume))
                    .map_err(MigrationError::from)
                    .and_then(|()| src.expect(Command::ResumeAck, src.opts.stall_timeout));
                match answer {
                    Ok(payload) => {
                        let (activated, runs) = protocol::parse_resume_ack(&payload)?;
                        tracing::info!(
                            activated,
                            pages = runs.iter().map(|r| u64::from(r.1)).sum::<u64>(),
                            "post-copy resumed on a new connection"
                        );
                        src.progress.update(|p| p.reconnecting = false);
                        return Ok((activated, runs));
                    }
                    // This connection broke or went quiet (the target
                    // may have taken a newer one): dial again.
                    Err(
                        e @ (MigrationError::Protocol(protocol::ProtocolError::Io(_))
                        | MigrationError::StreamClosed),
                    ) => last = e,
                    Err(e) => return Err(e),
                }
            }
            Err(MigrationError::Connect(addr, io))
                if io.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                return Err(MigrationError::Connect(addr, io));
            }
            Err(e) => last = e,
        }
        std::thread::sleep(
            Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
    Err(MigrationError::LinkNotBack(
        src.opts.recover_timeout,
        Box::new(last),
    ))
}

/// Region index and page index of `gpa`.
fn locate(regions: &[GuestRegion], gpa: u64) -> Option<(usize, u64)> {
    regions
        .iter()
        .position(|r| r.contains(gpa, PAGE_SIZE as u64))
        .map(|i| (i, (gpa - regions[i].gpa) / PAGE_SIZE as u64))
}

/// Clears the bit of `page`, returning whether it was set.
fn take_bit(d: &mut DirtyPages, page: u64) -> bool {
    let (w, b) = ((page / 64) as usize, page % 64);
    let was = d.bitmap[w] & (1 << b) != 0;
    d.bitmap[w] &= !(1 << b);
    was
}

/// Still-needed pages on the target, shared by the fault and receive threads,
/// and the pages the fault thread has asked for (asked again on a new
/// connection if they have not arrived).
struct Needed {
    regions: Vec<GuestRegion>,
    bits: Vec<Vec<AtomicU64>>,
    requested: Vec<Vec<AtomicU64>>,
}

impl Needed {
    fn new(regions: &[GuestRegion]) -> Needed {
        let words = |r: &GuestRegion| {
            (0..(r.size / PAGE_SIZE as u64).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        Needed {
            bits: regions.iter().map(words).collect(),
            requested: regions.iter().map(words).collect(),
            regions: regions.to_vec(),
        }
    }

    fn locate_host(&self, host: u64) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let start = r.host as u64;
            (host >= start && host < start + r.size).then(|| (i, (host - start) / PAGE_SIZE as u64))
        })
    }

    fn is_needed(&self, r: usize, page: u64) -> bool {
        self.bits[r][(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    fn clear(&self, r: usize, page: u64) {
        self.bits[r][(page / 64) as usize].fetch_and(!(1 << (page % 64)), Ordering::Release);
    }

    fn mark_requested(&self, r: usize, page: u64) {
        self.requested[r][(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Runs of pages still needed, as `(gpa, pages)`.
    fn runs(&self) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        for (r, words) in self.bits.iter().enumerate() {
            let gpa = self.regions[r].gpa;
            for (w, word) in words.iter().enumerate() {
                let mut bits = word.load(Ordering::Acquire);
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let addr = gpa + page * PAGE_SIZE as u64;
                    match out.last_mut() {
                        Some((start, n))
                            if *start + u64::from(*n) * PAGE_SIZE as u64 == addr
                                && *n < u32::MAX =>
                        {
                            *n += 1
                        }
                        _ => out.push((addr, 1)),
                    }
                }
            }
        }
        out
    }

    /// Pages asked for that have not arrived.
    fn outstanding(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (r, words) in self.requested.iter().enumerate() {
            for (w, word) in words.iter().enumerate() {
                let mut bits =
                    word.load(Ordering::Acquire) & self.bits[r][w].load(Ordering::Acquire);
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    out.push(self.regions[r].gpa + page * PAGE_SIZE as u64);
                }
            }
        }
        out
    }
}

/// What the target needs to resume post-copy on a new connection.
pub(super) struct Recovery<'a> {
    /// Takes the source's next connection.
    pub rejoin: &'a super::receiver::Rejoin<'a>,
    /// The VM being received (a `Resume` for another is refused).
    pub vm_name: &'a str,
    /// How long to wait for the source to come back.
    pub timeout: Duration,
    /// Read timeout of the new connection.
    pub stall_timeout: Duration,
}

/// After a lost link: drops the old connection and waits for the source's
/// `Resume` on a new one until `deadline`; answers `ResumeAck`
/// with whether the guest runs here and what is still missing, then asks
/// again for the pages faulting vCPUs wait for, and makes the new
/// connection the one the fault thread writes to. Returns its read half.
fn rejoin_target(
    rec: &Recovery<'_>,
    why: &MigrationError,
    old: &Conn,
    deadline: Instant,
    (needed, running, writer, failed): (&Needed, &AtomicBool, &Mutex<Conn>, &AtomicBool),
    progress: &ProgressHandle,
) -> Result<Conn, MigrationError> {
    tracing::warn!(
        timeout = ?rec.timeout,
        "post-copy link lost ({}); waiting for the source to reconnect",
        crate::error_chain(why)
    );
    let _ = old.socket().shutdown(std::net::Shutdown::Both);
    progress.update(|p| p.reconnecting = true);
    loop {
        if failed.load(Ordering::Acquire) {
            return Err(MigrationError::StreamClosed);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(MigrationError::LinkNotBack(
                rec.timeout,
                Box::new(clone_io(why)),
            ));
        }
        let Some(conn) = (rec.rejoin)(deadline.min(now + Duration::from_secs(1)))? else {
            continue;
        };
        let attempt = (|| -> Result<Conn, MigrationError> {
            conn.socket()
                .set_read_timeout(Some(rec.stall_timeout))
                .and_then(|()| conn.socket().set_nodelay(true))
                .map_err(MigrationError::Socket)?;
            let mut reader = conn.try_clone().map_err(MigrationError::Socket)?;
            let mut payload = Vec::new();
            let header = protocol::read_frame(&mut reader, &mut payload)?;
            if header.command != Command::Resume {
                return Err(protocol::ProtocolError::Unexpected {
                    got: header.command,
                    expected: "Resume",
                }
                .into());
            }
            let resume: protocol::Resume = protocol::parse_json(Command::Resume, &payload)?;
            if resume.vm_name != rec.vm_name {
                return Err(MigrationError::WrongVm {
                    got: resume.vm_name,
                    expected: rec.vm_name.to_string(),
                });
            }
            // Under the writer's lock: the fault thread's next request goes
            // out on the new connection, after these.
            let mut w = writer.lock().unwrap();
            *w = conn.try_clone().map_err(MigrationError::Socket)?;
            let runs = needed.runs();
            protocol::write_frame(
                &mut *w,
                Command::ResumeAck,
                &protocol::encode_resume_ack(running.load(Ordering::Acquire), &runs),
            )?;
            let outstanding = needed.outstanding();
            if !outstanding.is_empty() {
                protocol::write_frame(
                    &mut *w,
                    Command::PageRequest,
                    &protocol::encode_page_request(&outstanding),
                )?;
            }
            w.flush()
                .map_err(|e| MigrationError::Protocol(protocol::ProtocolError::Io(e)))?;
            tracing::info!(
                missing = runs.iter().map(|r| u64::from(r.1)).sum::<u64>(),
                asked = outstanding.len(),
                "post-copy resumed on a new connection"
            );
            Ok(reader)
        })();
        match attempt {
            Ok(reader) => {
                progress.update(|p| p.reconnecting = false);
                return Ok(reader);
            }
            Err(e) => {
                tracing::warn!(
                    "refused a connection to resume post-copy: {}",
                    crate::error_chain(&e)
                );
                let _ = conn.socket().shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// A copy of a lost-link error for the report (I/O errors do not clone).
fn clone_io(e: &MigrationError) -> MigrationError {
    match e {
        MigrationError::Protocol(protocol::ProtocolError::Io(io)) => MigrationError::Protocol(
            protocol::ProtocolError::Io(std::io::Error::new(io.kind(), io.to_string())),
        ),
        _ => MigrationError::StreamClosed,
    }
}

/// Installs pages from `reader` until `Complete`.
fn receive_pages(
    reader: &mut Conn,
    memory: &TargetMemory,
    uffd: &Userfault,
    needed: &Needed,
    progress: &ProgressHandle,
    received: &mut u64,
) -> Result<(), MigrationError> {
    let mut payload = Vec::new();
    loop {
        let header = protocol::read_frame(reader, &mut payload)?;
        *received += (protocol::HEADER_LEN + payload.len()) as u64;
        match header.command {
            Command::Pages => {
                for run in protocol::parse_pages(&payload)? {
                    let len = u64::from(run.pages) * PAGE_SIZE as u64;
                    let (r, region) = memory.find(run.gpa, len)?;
                    let dst = region.host_ptr(run.gpa);
                    // A page sent again after a reconnection may be here
                    // already: `copy` and `zero` leave present pages alone.
                    match run.data {
                        Some(data) => uffd.copy(dst, data)?,
                        None => uffd.zero(dst, len)?,
                    }
                    let first = (run.gpa - region.gpa) / PAGE_SIZE as u64;
                    for p in first..first + u64::from(run.pages) {
                        needed.clear(r, p);
                    }
                }
                progress.update(|p| p.transferred_bytes = *received);
            }
            Command::Complete => return Ok(()),
            got => {
                return Err(MigrationError::unexpected(
                    got,
                    &payload,
                    "Pages or Complete",
                ))
            }
        }
    }
}

fn send_locked(w: &Mutex<Conn>, command: Command, payload: &[u8]) -> Result<(), MigrationError> {
    let mut s = w.lock().unwrap();
    protocol::write_frame(&mut *s, command, payload)?;
    s.flush()
        .map_err(|e| MigrationError::Protocol(protocol::ProtocolError::Io(e)))
}

/// The target after `PostCopy`: fault in what is missing while the guest
/// runs. With `recovery`, a lost link waits for the source to reconnect
/// ([`rejoin_target`]) instead of losing the guest.
#[allow(clippy::too_many_arguments)]
pub(super) fn target_run<T: TargetVm>(
    stream: &mut Conn,
    vm: &T,
    memory: TargetMemory,
    state: &[u8],
    needed_payload: &[u8],
    progress: &ProgressHandle,
    mut received: u64,
    recovery: Option<Recovery<'_>>,
) -> Result<(), MigrationError> {
    let runs = protocol::parse_page_runs(needed_payload)?;
    let needed = Needed::new(&memory.regions);
    for (gpa, pages) in &runs {
        let len = u64::from(*pages) * PAGE_SIZE as u64;
        let (r, region) = memory.find(*gpa, len)?;
        let first = (gpa - region.gpa) / PAGE_SIZE as u64;
        for p in first..first + u64::from(*pages) {
            needed.bits[r][(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
        // Drop the stale copy so the next touch faults and fetches it.
        // SAFETY: the range is inside guest RAM (checked by `find`); the guest
        // is not running yet, and the pages are fetched again before use.
        let r = unsafe {
            libc::madvise(
                region.host_ptr(*gpa).cast(),
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(MigrationError::Userfault(
                "madvise",
                std::io::Error::last_os_error(),
            ));
        }
    }
    let uffd = Userfault::new()?;
    for r in &memory.regions {
        uffd.register(r.host, r.size)?;
    }
    let writer = Mutex::new(stream.try_clone().map_err(MigrationError::Socket)?);
    let stop = AtomicBool::new(false);
    // Set just before the ranges are unregistered at the end.
    let released = AtomicBool::new(false);
    // The guest runs here (told to a reconnecting source).
    let running = AtomicBool::new(false);
    // Restoring or resuming failed: no point waiting for the source.
    let failed = AtomicBool::new(false);

    let outcome = std::thread::scope(|s| {
        let fault_thread = s.spawn(|| -> Result<(), MigrationError> {
            while !stop.load(Ordering::Relaxed) {
                let mut requests = Vec::new();
                for host in uffd.faults(20)? {
                    let Some((r, page)) = needed.locate_host(host) else {
                        continue;
                    };
                    if needed.is_needed(r, page) {
                        needed.mark_requested(r, page);
                        requests.push(needed.regions[r].gpa + page * PAGE_SIZE as u64);
                    } else {
                        // Never sent as data: it was zero on the source.
                        match uffd.zero(host as *mut u8, PAGE_SIZE as u64) {
                            // A fault read just before the ranges were
                            // unregistered: the kernel now fills the page
                            // itself (ENOENT = range no longer registered).
                            Err(MigrationError::Userfault(_, e))
                                if e.raw_os_error() == Some(libc::ENOENT)
                                    && released.load(Ordering::Acquire) => {}
                            other => other?,
                        }
                    }
                }
                if !requests.is_empty() {
                    let sent = send_locked(
                        &writer,
                        Command::PageRequest,
                        &protocol::encode_page_request(&requests),
                    );
                    match sent {
                        Ok(()) => {}
                        // The receive thread sees the lost link too and
                        // asks again for these on the next connection.
                        Err(e) if recovery.is_some() => {
                            tracing::debug!("page request not sent: {}", crate::error_chain(&e))
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(())
        });

        // Pages are read and installed by their own thread from the start:
        // restoring the state may itself fault on a missing page, whose data
        // can only arrive if someone keeps reading the stream.
        let mut reader = stream.try_clone().map_err(MigrationError::Socket)?;
        let (memory, uffd, needed, writer, running, failed, recovery) = (
            &memory, &uffd, &needed, &writer, &running, &failed, &recovery,
        );
        let receive_thread = s.spawn(move || -> Result<u64, MigrationError> {
            let mut received = received;
            // While recovering: when the source must be back by.
            let mut deadline: Option<Instant> = None;
            loop {
                let before = received;
                let e =
                    match receive_pages(&mut reader, memory, uffd, needed, progress, &mut received)
                    {
                        Ok(()) => return Ok(received),
                        Err(e) => e,
                    };
                // A source that closed or reset the connection is gone (its
                // VMM exited, or it gave up): only a quiet or unreachable
                // link is waited for. A resumed connection that ends before
                // it carried a frame was one the source had already given
                // up on (it dials again when our answer is slow).
                let stale = deadline.is_some() && received == before;
                let rec = match recovery {
                    Some(rec)
                        if (link_quiet(&e) || (stale && connection_lost(&e)))
                            && !failed.load(Ordering::Acquire) =>
                    {
                        rec
                    }
                    _ => return Err(e),
                };
                // A new loss once frames flow again; a resumed connection
                // that ends before it carried a frame was one the source had
                // already given up on (it dials again when our answer is
                // slow): the same loss, the same deadline.
                if deadline.is_none() || received != before {
                    deadline = Some(Instant::now() + rec.timeout);
                }
                reader = rejoin_target(
                    rec,
                    &e,
                    &reader,
                    deadline.expect("set above"),
                    (needed, running, writer, failed),
                    progress,
                )?;
            }
        });
        let started = (|| -> Result<(), MigrationError> {
            vm.restore_state(state)
                .map_err(MigrationError::RestoreState)?;
            // The disks, now: a vCPU thread may not open files.
            vm.activate_disks_unlocked()
                .map_err(MigrationError::DiskLocks)?;
            vm.resume().map_err(MigrationError::Resume)?;
            running.store(true, Ordering::Release);
            match send_locked(writer, Command::Activated, &[]) {
                Ok(()) => {}
                // A reconnecting source learns it from ResumeAck.
                Err(e) if recovery.is_some() => {
                    tracing::warn!("Activated not sent: {}", crate::error_chain(&e))
                }
                Err(e) => return Err(e),
            }
            vm.announce();
            progress.update(|p| p.stage = Stage::PostCopy);
            Ok(())
        })();
        if started.is_err() {
            // Unblock the receive thread.
            failed.store(true, Ordering::Release);
            stream.shutdown();
        }
        let joined = receive_thread.join();
        let result = started.and_then(|()| match joined {
            Ok(r) => r.map(|total| received = total),
            Err(_) => Err(MigrationError::StreamClosed),
        });
        // All memory is local (or the migration failed): stop routing faults,
        // which also wakes anything still waiting, then stop the fault thread.
        released.store(true, Ordering::Release);
        for r in &memory.regions {
            let _ = uffd.unregister(r.host, r.size);
        }
        stop.store(true, Ordering::Relaxed);
        let faults = fault_thread.join().unwrap_or(Ok(()));
        result.and(faults)
    });
    outcome.map_err(|e| MigrationError::PostCopyLost(Box::new(e)))?;
    send_locked(&writer, Command::Ready, &[])?;
    // The source lets its image locks go when it exits, right after Ready:
    // take them then (here, not on a vCPU thread).
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = vm.lock_disks() {
        if Instant::now() > deadline {
            tracing::warn!("post-copy target still runs without its disk image locks: {e}");
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    progress.update(|p| {
        p.stage = Stage::Completed;
        p.transferred_bytes = received;
    });
    Ok(())
}
