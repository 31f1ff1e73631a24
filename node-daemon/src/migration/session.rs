//! What one live migration carries from phase to phase, on each end.
//!
//! The source's session is `Source`: the guest, its RAM regions, the
//! frame writer and the frames the target sends back, the options and the
//! progress, the state ([`SenderState`]) and the page batch being built.
//! Every source-side phase (pre-copy, the disk copy, post-copy) works on it.
//! The target's is smaller: the options ([`ReceiveOptions`]), the state
//! ([`ReceiverState`]) and guest memory with what has arrived
//! (`TargetMemory`).
//!
//! The two state machines refuse any order the protocol does not have:
//!
//! ```text
//!  source: Handshake -> PreCopy -> PreCopy ... -> StopAndCopy -> Committing -> Completed
//!                                           \-> PostCopy ------/
//!  target: WaitHello -> Receiving -> Restored -> Running      (pre-copy)
//!                                \-> PostCopy -> Running      (post-copy)
//! ```

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::time::{Duration, Instant};

use super::convergence::Policy;
use super::error::MigrationError;
use super::guest::{DirtyPages, GuestRegion, SourceVm};
use super::progress::ProgressHandle;
use super::protocol::{self, Command, PageBatch, PAGE_SIZE};
use super::transport::{self, Conn, FrameWriter, Incoming};
use super::userfaultfd;

/// Payload size of a page or disk batch.
pub const BATCH_BYTES: usize = 1 << 20;

/// How long a post-copy migration whose link was lost waits for it to come
/// back before the guest is given up ([`SendOptions::recover_timeout`],
/// [`ReceiveOptions::recover_timeout`]; see [`super::postcopy`]).
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// How to run an outgoing migration.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// The VM's name (the target checks it).
    pub vm_name: String,
    /// Convergence policy.
    pub policy: Policy,
    /// Cap on the stream in bytes per second.
    pub bandwidth_limit: Option<u64>,
    /// Give up (guest stays here) if not complete by then.
    pub completion_timeout: Duration,
    /// Fail when the peer neither reads nor answers for this long.
    pub stall_timeout: Duration,
    /// Disks (indices in `--disk` order) on node-local storage, copied in
    /// the stream ([`super::storage`]); the others are on shared storage.
    pub disks: Vec<usize>,
    /// How to connect to the target again when the link is lost during
    /// post-copy (`None`: a lost link loses the guest).
    pub reconnect: Option<Reconnect>,
    /// How long to keep dialling the target after such a loss.
    pub recover_timeout: Duration,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            vm_name: String::new(),
            policy: Policy::default(),
            bandwidth_limit: None,
            completion_timeout: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(10),
            disks: Vec::new(),
            reconnect: None,
            recover_timeout: RECOVER_TIMEOUT,
        }
    }
}

/// Dials the target again (one attempt, bounded by the given timeout, TLS
/// handshake included); see [`super::postcopy`] on recovery.
#[derive(Clone)]
pub struct Reconnect(
    pub std::sync::Arc<dyn Fn(Duration) -> Result<Conn, MigrationError> + Send + Sync>,
);

impl std::fmt::Debug for Reconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reconnect")
    }
}

/// The sender's states; [`SenderState::advance`] refuses any other order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SenderState {
    /// Hello sent, waiting for HelloAck.
    Handshake,
    /// Copying while the guest runs.
    PreCopy,
    /// Guest paused, sending the rest.
    StopAndCopy,
    /// Guest runs on the target, pages pushed and served on demand.
    PostCopy,
    /// Everything sent; waiting for Ready / Activated.
    Committing,
    /// The guest runs on the target.
    Completed,
}

impl SenderState {
    /// Moves to `next` if the protocol allows it.
    pub fn advance(self, next: SenderState) -> Result<SenderState, MigrationError> {
        use SenderState::*;
        let ok = matches!(
            (self, next),
            (Handshake, PreCopy)
                | (PreCopy, PreCopy)
                | (PreCopy, StopAndCopy)
                | (PreCopy, PostCopy)
                | (StopAndCopy, Committing)
                | (PostCopy, Committing)
                | (Committing, Completed)
        );
        if ok {
            Ok(next)
        } else {
            Err(MigrationError::InvalidTransition(
                format!("{self:?}"),
                format!("{next:?}"),
            ))
        }
    }
}

/// The source's session: everything its phases share.
pub(crate) struct Source<'a, V: SourceVm> {
    pub vm: &'a V,
    pub regions: Vec<GuestRegion>,
    pub writer: FrameWriter,
    pub incoming: Receiver<Incoming>,
    pub progress: &'a ProgressHandle,
    pub cancel: &'a AtomicBool,
    pub opts: &'a SendOptions,
    pub started: Instant,
    pub state: SenderState,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// After the switch to post-copy, incoming frames are page requests for
    /// the post-copy loop, not errors.
    pub in_postcopy: bool,
    batch: PageBatch,
    /// Connections given up after a lost post-copy link, shut down when
    /// the migration ends.
    retired: Vec<FrameWriter>,
}

impl<'a, V: SourceVm> Source<'a, V> {
    /// A session writing to `stream` and hearing the target through
    /// `incoming` (fed by a [`transport::reader_loop`] on the same
    /// connection).
    pub fn new(
        vm: &'a V,
        stream: Conn,
        incoming: Receiver<Incoming>,
        opts: &'a SendOptions,
        progress: &'a ProgressHandle,
        cancel: &'a AtomicBool,
    ) -> Source<'a, V> {
        Source {
            vm,
            regions: vm.regions(),
            writer: FrameWriter::new(stream, opts.bandwidth_limit),
            incoming,
            progress,
            cancel,
            opts,
            started: Instant::now(),
            state: SenderState::Handshake,
            pages_sent: 0,
            zero_pages: 0,
            in_postcopy: false,
            batch: PageBatch::with_capacity(BATCH_BYTES + PAGE_SIZE),
            retired: Vec::new(),
        }
    }

    /// Moves the sender to `next` ([`SenderState::advance`]).
    pub fn advance(&mut self, next: SenderState) -> Result<(), MigrationError> {
        self.state = self.state.advance(next)?;
        Ok(())
    }

    /// Fails the migration if it was cancelled, timed out, or the target said
    /// something (an abort, or a broken stream) while we were sending.
    pub fn check_peer(&self) -> Result<(), MigrationError> {
        if self.in_postcopy {
            return Ok(());
        }
        if self.cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        if self.started.elapsed() > self.opts.completion_timeout {
            return Err(MigrationError::Timeout(self.opts.completion_timeout));
        }
        match self.incoming.try_recv() {
            Ok(Ok((Command::Abort, reason))) => Err(MigrationError::PeerAbort(
                String::from_utf8_lossy(&reason).into_owned(),
            )),
            Ok(Ok((got, _))) => Err(protocol::ProtocolError::Unexpected {
                got,
                expected: "nothing during pre-copy",
            }
            .into()),
            Ok(Err(e)) => Err(e.into()),
            Err(TryRecvError::Empty) => Ok(()),
            Err(TryRecvError::Disconnected) => Err(MigrationError::StreamClosed),
        }
    }

    /// Waits for `expected` from the target, failing on anything else.
    pub fn expect(&self, expected: Command, timeout: Duration) -> Result<Vec<u8>, MigrationError> {
        match transport::recv_timeout(&self.incoming, timeout)? {
            (Command::Abort, reason) => Err(MigrationError::PeerAbort(
                String::from_utf8_lossy(&reason).into_owned(),
            )),
            (got, payload) if got == expected => Ok(payload),
            (got, _) => Err(protocol::ProtocolError::Unexpected {
                got,
                expected: command_name(expected),
            }
            .into()),
        }
    }

    /// Carries on over `conn`, a new connection to the same target: the old
    /// stream is retired (shut down when the migration ends), frames go out on the
    /// new one with the same byte count and cap, and a new reader thread
    /// feeds [`Source::incoming`]. A batch cut short by the break is dropped;
    /// the target says what it still needs.
    pub fn replace_stream(&mut self, conn: Conn) -> Result<(), MigrationError> {
        transport::tune(conn.socket(), self.opts.stall_timeout).map_err(MigrationError::Socket)?;
        let read_half = conn.try_clone().map_err(MigrationError::Socket)?;
        let mut writer = FrameWriter::new(conn, self.opts.bandwidth_limit);
        writer.bytes_sent = self.writer.bytes_sent;
        writer.version = self.writer.version;
        // Kept open, not shut down: a FIN reaching the target once the link
        // is back would read as the source having gone away.
        let old = std::mem::replace(&mut self.writer, writer);
        self.retired.push(old);
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("migrate-recv".into())
            .spawn(move || transport::reader_loop(read_half, tx))
            .map_err(MigrationError::Socket)?;
        self.incoming = rx;
        self.batch.clear();
        Ok(())
    }

    /// Closes the stream and every connection retired after a lost link.
    pub fn close(&mut self) {
        self.writer.close();
        for old in &self.retired {
            old.abandon();
        }
    }

    /// Sends the batch built so far.
    pub fn flush_batch(&mut self) -> Result<(), MigrationError> {
        if !self.batch.is_empty() {
            self.writer.send(Command::Pages, self.batch.as_bytes())?;
            self.batch.clear();
            self.progress
                .update(|p| p.transferred_bytes = self.writer.bytes_sent);
        }
        Ok(())
    }

    /// Sends `count` pages of region `r` from page index `first`, splitting the
    /// run into data and zero runs. Reads guest memory as it is now: a page the
    /// guest writes meanwhile is in the next dirty set and is sent again.
    pub fn send_run(&mut self, r: usize, first: u64, count: u64) -> Result<(), MigrationError> {
        let region = self.regions[r];
        let mut page = first;
        let end = first + count;
        // What the scan already found out about the page that ended a run.
        let mut known: Option<bool> = None;
        while page < end {
            let gpa = region.gpa + page * PAGE_SIZE as u64;
            let zero = known
                .take()
                .unwrap_or_else(|| is_zero_page(region.host_ptr(gpa)));
            let mut n = 1;
            let room = (BATCH_BYTES.saturating_sub(self.batch.len()) / PAGE_SIZE).max(1) as u64;
            while page + n < end && (zero || n < room) {
                let next = is_zero_page(region.host_ptr(gpa + n * PAGE_SIZE as u64));
                if next != zero {
                    known = Some(next);
                    break;
                }
                n += 1;
            }
            if zero {
                self.batch.push_zero(gpa, n as u32);
                self.zero_pages += n;
            } else {
                // SAFETY: `gpa .. gpa + n pages` is inside the region (page <
                // end <= region pages), whose mapping outlives the migration.
                // Reading while the guest writes only yields a torn copy of a
                // page that the dirty log will make us send again.
                let data = unsafe {
                    std::slice::from_raw_parts(region.host_ptr(gpa), n as usize * PAGE_SIZE)
                };
                self.batch.push_data(gpa, data);
                self.pages_sent += n;
            }
            page += n;
            if self.batch.len() >= BATCH_BYTES {
                self.flush_batch()?;
                self.check_peer()?;
            }
        }
        Ok(())
    }

    /// Sends pages `first .. first + count` of region `r` whatever their
    /// state (the first round): those the VM says were never populated go
    /// as zero runs without being read, since reading one would fault it in;
    /// the rest through [`Source::send_run`].
    pub fn send_all(&mut self, r: usize, first: u64, count: u64) -> Result<(), MigrationError> {
        let region = self.regions[r];
        let Some(bitmap) = self.vm.populated(&region, first, count) else {
            return self.send_run(r, first, count);
        };
        let populated = DirtyPages {
            gpa: region.gpa,
            bitmap,
        };
        let mut next = 0;
        for (start, n) in populated.runs() {
            self.send_zero_run(r, first + next, start - next)?;
            self.send_run(r, first + start, n)?;
            next = start + n;
        }
        self.send_zero_run(r, first + next, count - next)
    }

    /// Sends `count` pages of region `r` from page index `first` as zero
    /// pages, unread.
    fn send_zero_run(&mut self, r: usize, first: u64, count: u64) -> Result<(), MigrationError> {
        if count == 0 {
            return Ok(());
        }
        let gpa = self.regions[r].gpa + first * PAGE_SIZE as u64;
        self.batch.push_zero(gpa, count as u32);
        self.zero_pages += count;
        if self.batch.len() >= BATCH_BYTES {
            self.flush_batch()?;
            self.check_peer()?;
        }
        Ok(())
    }

    /// Sends every page in `dirty` and returns how many pages that was.
    pub fn send_dirty(&mut self, dirty: &[DirtyPages]) -> Result<u64, MigrationError> {
        let mut pages = 0;
        for (r, d) in dirty.iter().enumerate() {
            for (first, count) in d.runs() {
                self.send_run(r, first, count)?;
                pages += count;
            }
        }
        self.flush_batch()?;
        Ok(pages)
    }
}

/// Whether the page at `ptr` is all zero. Words are OR-ed a cache line at a
/// time (the compiler vectorises it) and the scan stops at the first line
/// that is not zero: a written page usually shows it in its first line.
fn is_zero_page(ptr: *const u8) -> bool {
    // SAFETY: `ptr` is the page-aligned start of a guest page inside a live
    // mapping that outlives the migration. The guest may write the page
    // meanwhile; as with the page copies, a torn read only decides about a
    // page that the dirty log makes us send again.
    let words = unsafe { std::slice::from_raw_parts(ptr.cast::<u64>(), PAGE_SIZE / 8) };
    words
        .chunks_exact(8)
        .all(|line| line.iter().fold(0, |acc, &w| acc | w) == 0)
}

/// The name of a reply the source waits for, for "expected ..." errors.
pub(crate) fn command_name(c: Command) -> &'static str {
    match c {
        Command::HelloAck => "HelloAck",
        Command::Ready => "Ready",
        Command::Activated => "Activated",
        Command::PageRequest => "PageRequest",
        _ => "a reply",
    }
}

/// The disks a migration copies in the stream, as the pre-copy rounds see
/// them: a round ends by collecting what the guest wrote to them, and the
/// next round starts by sending it ([`super::storage`] implements it).
pub(crate) trait RoundDisks<V: SourceVm> {
    /// Moves what the guest wrote since the last call into the pending
    /// set; returns the pending bytes.
    fn collect(&mut self, vm: &V) -> Result<u64, MigrationError>;
    /// Sends the pending set; returns the bytes sent.
    fn send_pending(&mut self, src: &mut Source<'_, V>) -> Result<u64, MigrationError>;
}

/// How to receive.
#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    /// Refuse a stream for another VM (`None`: accept any).
    pub expected_vm: Option<String>,
    /// Fail when the source is silent this long.
    pub stall_timeout: Duration,
    /// In post-copy, after the link was lost, how long to wait for the
    /// source to connect again ([`super::postcopy`]; needs a [`Rejoin`]).
    pub recover_timeout: Duration,
    /// An open `/dev/userfaultfd` for post-copy, used when the
    /// `userfaultfd` system call is denied (`None`: open the device then).
    pub userfaultfd_device: Option<BorrowedFd<'static>>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            expected_vm: None,
            stall_timeout: Duration::from_secs(10),
            recover_timeout: RECOVER_TIMEOUT,
            userfaultfd_device: None,
        }
    }
}

/// How the target takes the source's next connection when a post-copy link
/// is lost: waits until the deadline for a connection (TLS handshake done)
/// on the address the migration came in on; `None` if none came.
pub type Rejoin<'a> = dyn Fn(Instant) -> Result<Option<Conn>, MigrationError> + Sync + 'a;

/// The receiver's states; [`ReceiverState::advance`] refuses any other order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverState {
    /// Waiting for Hello.
    WaitHello,
    /// Filling memory.
    Receiving,
    /// State restored, waiting for Commit.
    Restored,
    /// Guest running here, memory arriving on demand.
    PostCopy,
    /// Guest running here, all memory local.
    Running,
}

impl ReceiverState {
    /// Moves to `next` if the protocol allows it.
    pub fn advance(self, next: ReceiverState) -> Result<ReceiverState, MigrationError> {
        use ReceiverState::*;
        let ok = matches!(
            (self, next),
            (WaitHello, Receiving)
                | (Receiving, Restored)
                | (Receiving, PostCopy)
                | (Restored, Running)
                | (PostCopy, Running)
        );
        if ok {
            Ok(next)
        } else {
            Err(MigrationError::InvalidTransition(
                format!("{self:?}"),
                format!("{next:?}"),
            ))
        }
    }
}

/// Guest memory on the target, with a bit per page that has received data (so
/// a page that later turns all-zero is cleared, and one that was always zero
/// is never touched), and one per page dropped before post-copy.
pub(crate) struct TargetMemory {
    pub regions: Vec<GuestRegion>,
    pub written: Vec<Vec<u64>>,
    /// Pages given back to the host ([`TargetMemory::discard`]): not mapped,
    /// so the post-copy guest's next touch faults.
    pub discarded: Vec<Vec<u64>>,
}

impl TargetMemory {
    pub fn new(regions: Vec<GuestRegion>) -> TargetMemory {
        let written: Vec<Vec<u64>> = regions
            .iter()
            .map(|r| vec![0u64; (r.size / PAGE_SIZE as u64).div_ceil(64) as usize])
            .collect();
        let discarded = written.clone();
        TargetMemory {
            regions,
            written,
            discarded,
        }
    }

    /// Gives the `pages` pages at `gpa` back to the host (their copies
    /// here are stale; post-copy fetches them again), skipping those
    /// already given back. The guest must not run here yet.
    pub fn discard(&mut self, gpa: u64, pages: u32) -> Result<(), MigrationError> {
        let len = u64::from(pages) * PAGE_SIZE as u64;
        let (idx, region) = self.find(gpa, len)?;
        let first = (gpa - region.gpa) / PAGE_SIZE as u64;
        let end = first + u64::from(pages);
        let (written, discarded) = (&mut self.written[idx], &mut self.discarded[idx]);
        let mut p = first;
        while p < end {
            let is_dropped = |p: u64| discarded[(p / 64) as usize] & (1 << (p % 64)) != 0;
            if is_dropped(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < end && !is_dropped(p) {
                p += 1;
            }
            let host = region.host_ptr(region.gpa + start * PAGE_SIZE as u64);
            // SAFETY: the run is inside the region (checked by `find`), whose
            // mapping lives as long as the target VM; the guest does not run
            // here yet, and post-copy fetches these pages before it reads them.
            unsafe { userfaultfd::discard(host, ((p - start) * PAGE_SIZE as u64) as usize)? };
            for q in start..p {
                let (w, b) = ((q / 64) as usize, q % 64);
                discarded[w] |= 1 << b;
                written[w] &= !(1 << b);
            }
        }
        Ok(())
    }

    /// The region holding `gpa .. gpa + len`, and its index.
    pub fn find(&self, gpa: u64, len: u64) -> Result<(usize, GuestRegion), MigrationError> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains(gpa, len))
            .map(|(i, r)| (i, *r))
            .ok_or(MigrationError::PageOutOfRange(gpa))
    }

    /// Applies a Pages payload with plain memory writes (the guest is not running).
    pub fn apply(&mut self, payload: &[u8]) -> Result<u64, MigrationError> {
        let runs = protocol::parse_pages(payload)?;
        let mut pages = 0;
        for run in &runs {
            let len = u64::from(run.pages) * PAGE_SIZE as u64;
            let (idx, region) = self.find(run.gpa, len)?;
            let first = (run.gpa - region.gpa) / PAGE_SIZE as u64;
            let written = &mut self.written[idx];
            match run.data {
                Some(data) => {
                    // SAFETY: the run lies inside the region (checked by
                    // `find`), whose mapping lives as long as the target VM;
                    // its vCPUs do not run while pre-copy pages arrive.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            data.as_ptr(),
                            region.host_ptr(run.gpa),
                            data.len(),
                        )
                    };
                    let discarded = &mut self.discarded[idx];
                    for p in first..first + u64::from(run.pages) {
                        written[(p / 64) as usize] |= 1 << (p % 64);
                        discarded[(p / 64) as usize] &= !(1 << (p % 64));
                    }
                }
                None => {
                    for p in first..first + u64::from(run.pages) {
                        let (w, b) = ((p / 64) as usize, p % 64);
                        if written[w] & (1 << b) != 0 {
                            // SAFETY: as above; one page inside the region.
                            unsafe {
                                std::ptr::write_bytes(
                                    region.host_ptr(region.gpa + p * PAGE_SIZE as u64),
                                    0,
                                    PAGE_SIZE,
                                )
                            };
                            written[w] &= !(1 << b);
                        }
                    }
                }
            }
            pages += u64::from(run.pages);
        }
        Ok(pages)
    }
}

/// Writes one frame to `stream` and flushes it (the target's replies, which
/// go out one at a time).
pub(crate) fn send_frame(
    stream: &mut Conn,
    command: Command,
    payload: &[u8],
) -> Result<(), MigrationError> {
    use std::io::Write;
    protocol::write_frame(stream, command, payload)?;
    stream
        .flush()
        .map_err(|e| MigrationError::Protocol(protocol::ProtocolError::Io(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discarded_pages_read_as_zero_and_are_marked_until_data_comes() {
        let len = 16 * PAGE_SIZE;
        // SAFETY: a fresh anonymous mapping, checked below, unmapped at the end.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        // SAFETY: the whole mapping, as bytes; nothing else uses it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host.cast::<u8>(), len) };
        let gpa = 0x10_0000;
        let mut memory = TargetMemory::new(vec![GuestRegion {
            gpa,
            size: len as u64,
            host: host.cast(),
        }]);
        let mut batch = PageBatch::with_capacity(len);
        batch.push_data(gpa, &vec![7u8; len]);
        memory.apply(batch.as_bytes()).unwrap();
        let page = PAGE_SIZE as u64;
        memory.discard(gpa + 2 * page, 3).unwrap();
        // Again, overlapping: only the pages not yet dropped are.
        memory.discard(gpa + 4 * page, 2).unwrap();
        for p in 0..16 {
            let dropped = (2..6).contains(&p);
            let want = if dropped { 0 } else { 7 };
            assert!(
                bytes[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                    .iter()
                    .all(|&b| b == want),
                "page {p}"
            );
            let bit = |m: &[Vec<u64>]| m[0][0] >> p & 1 == 1;
            assert_eq!(bit(&memory.discarded), dropped, "page {p} discarded");
            assert_eq!(bit(&memory.written), !dropped, "page {p} written");
        }
        // Outside guest memory: refused.
        assert!(memory.discard(gpa + 15 * page, 2).is_err());
        // Data for a dropped page makes it an ordinary page again.
        let mut batch = PageBatch::with_capacity(2 * PAGE_SIZE);
        batch.push_data(gpa + 3 * page, &vec![9u8; PAGE_SIZE]);
        memory.apply(batch.as_bytes()).unwrap();
        assert_eq!(memory.discarded[0][0], 0b110100);
        assert_eq!(bytes[3 * PAGE_SIZE], 9);
        // SAFETY: unmapping what was mapped; `memory` is not used after.
        unsafe { libc::munmap(host, len) };
    }

    #[test]
    fn a_page_is_zero_only_when_every_byte_is() {
        // Two pages, page-aligned as guest pages are.
        let mut mem = vec![0u64; 2 * PAGE_SIZE / 8];
        let page = |m: &[u64], k: usize| m[k * PAGE_SIZE / 8..].as_ptr().cast::<u8>();
        assert!(is_zero_page(page(&mem, 0)) && is_zero_page(page(&mem, 1)));
        for byte in [0, 63, 64, PAGE_SIZE - 1] {
            mem.iter_mut().for_each(|w| *w = 0);
            mem[byte / 8] = 1 << (8 * (byte % 8));
            assert!(!is_zero_page(page(&mem, 0)), "byte {byte} set");
            assert!(is_zero_page(page(&mem, 1)), "the next page is untouched");
        }
    }
}
