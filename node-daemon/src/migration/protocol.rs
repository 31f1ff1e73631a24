//! The migration wire protocol between two VMM processes.
//!
//! Every message is a frame: a fixed 16-byte header followed by a payload.
//!
//! ```text
//!  0       4       6       8           12          16
//!  +-------+-------+-------+-----------+-----------+----------------
//!  | magic |version|command|  length   | reserved  | payload (length bytes)
//!  +-------+-------+-------+-----------+-----------+----------------
//!  magic "GDWT" (0x47445754), all integers little-endian, reserved = 0
//! ```
//!
//! The receiver accepts versions [`MIN_VERSION`]`..=`[`VERSION`] and refuses
//! anything else with [`ProtocolError::Version`] before reading a payload; it
//! refuses unknown commands, non-zero reserved bits and payloads larger than
//! [`MAX_PAYLOAD`] the same way, so a malformed stream ends the migration with an
//! error instead of a guess.
//!
//! A live migration, as the source ([`super::sender`]) and target
//! ([`super::receiver`]) drive it:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as Source VMM
//!     participant T as Target VMM
//!     S->>T: Hello (config, memory layout, features)
//!     T->>S: HelloAck (features accepted)
//!     loop pre-copy rounds (guest running)
//!         S->>T: Pages (data runs; zero runs carry no data)
//!         S->>T: RoundEnd (round, pages sent)
//!     end
//!     Note over S: pause vCPUs (downtime starts)
//!     S->>T: Pages (last dirty set)
//!     S->>T: State (vCPUs, irqchip, clock, devices)
//!     S->>T: Complete
//!     Note over T: restore state
//!     T->>S: Ready (consistent image)
//!     S->>T: Commit (source will never resume)
//!     Note over T: resume vCPUs (downtime ends), announce MACs
//!     T->>S: Activated
//!     Note over S: discard its copy and exit
//! ```
//!
//! Post-copy replaces stop-and-copy when pre-copy does not converge:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as Source VMM
//!     participant T as Target VMM
//!     S->>T: Discard (runs of pages rewritten since they were sent)
//!     Note over T: drop those stale pages
//!     T->>S: Discarded
//!     Note over S: pause vCPUs (downtime starts)
//!     S->>T: State
//!     S->>T: PostCopy (runs of pages still to fetch)
//!     Note over T: drop stale pages, register userfaultfd, restore, resume
//!     T->>S: Activated (downtime ends)
//!     par background push
//!         S->>T: Pages (the rest, in order)
//!     and demand paging
//!         T->>S: PageRequest (faulting pages)
//!         S->>T: Pages (those first)
//!     end
//!     S->>T: Complete
//!     T->>S: Ready (all memory local, userfaultfd released)
//! ```
//!
//! If the link fails during post-copy without either VMM closing its end
//! (no data and no answer for the stall timeout), both keep the guest:
//! the target's vCPUs that touch a missing page wait, the source keeps its
//! copy, and the source dials the target's address again until the
//! recovery timeout ([`super::postcopy`] has the outcomes):
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as Source VMM
//!     participant T as Target VMM
//!     Note over S,T: link lost (stall timeout), old connection dropped
//!     S->>T: Resume (new connection; VM name)
//!     T->>S: ResumeAck (guest running here?, runs of pages still missing)
//!     T->>S: PageRequest (pages faulted before the break, not yet arrived)
//!     S->>T: Pages (those first, then the rest), Complete ...
//! ```
//!
//! Either side may send `Abort` before `Commit` (pre-copy) or before
//! `Activated` (post-copy); the source then resumes the guest, and nothing is
//! lost. After that point the guest belongs to the target.
//!
//! ## Versions
//!
//! Version 2 adds live storage migration: [`Hello::disks`] lists the
//! node-local disks the source copies, [`HelloAck::disks`] says for each
//! whether the target already holds its base image, and
//! [`Command::DiskBlocks`] frames carry disk data (see
//! [`super::storage`]). Each frame carries the oldest version that has its
//! command ([`Command::since`]), except that a source copying disks sends
//! its Hello as version 2: a memory-only migration still reaches a version 1
//! target, and a version 1 target refuses a storage migration with
//! [`ProtocolError::Version`] at the Hello, before it builds anything.
//!
//! Version 3 adds post-copy recovery ([`Command::Resume`],
//! [`Command::ResumeAck`]), sent only on a connection that resumes a
//! post-copy migration; the first connection is unchanged. Within it,
//! [`Command::Discard`] and [`Command::Discarded`] go only to a target
//! whose [`HelloAck::discard`] says it takes them (an older target never
//! sets it and gets the plain switch to post-copy).

use std::io::{IoSlice, Read, Write};

/// Frame magic, "GDWT".
pub const MAGIC: u32 = 0x4744_5754;
/// The protocol version this build speaks.
pub const VERSION: u16 = 3;
/// The first version with live storage migration ([`Command::DiskBlocks`]).
pub const STORAGE_VERSION: u16 = 2;
/// The first version with post-copy recovery ([`Command::Resume`]).
pub const RECOVERY_VERSION: u16 = 3;
/// The oldest version this build accepts from a peer.
pub const MIN_VERSION: u16 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload a peer may announce (64 MiB).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Guest page size on the wire.
pub const PAGE_SIZE: usize = 4096;

/// Errors of encoding and decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed or closed.
    #[error("Migration stream I/O failed")]
    Io(#[source] std::io::Error),
    /// The peer is not speaking this protocol.
    #[error("Not a Godwit migration stream (bad magic {0:#010x})")]
    Magic(u32),
    /// The peer opened with a TLS handshake, and this side runs without TLS.
    #[error("The peer started a TLS handshake, but this VMM runs without migration TLS: give both VMMs --tls-cert, --tls-key and --tls-ca, or neither")]
    TlsPeer,
    /// The peer speaks a version this build does not accept.
    #[error("Peer speaks migration protocol version {0}; this node accepts {MIN_VERSION}..={VERSION}: run the same Godwit release on both nodes")]
    Version(u16),
    /// The header names a command this version does not have.
    #[error("Unknown migration command {0}")]
    UnknownCommand(u16),
    /// Reserved header bits are set.
    #[error("Reserved header field is {0:#x}, expected 0")]
    Reserved(u32),
    /// The payload is larger than any message may be.
    #[error("Migration frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    /// The payload does not decode as the command's message.
    #[error("Malformed {command:?} payload: {reason}")]
    Malformed {
        /// The frame's command.
        command: Command,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A JSON payload does not parse.
    #[error("Malformed {0:?} payload")]
    Json(Command, #[source] serde_json::Error),
    /// The peer sent a message the protocol does not allow at this point.
    #[error("Unexpected {got:?} while waiting for {expected}")]
    Unexpected {
        /// What arrived.
        got: Command,
        /// What the state machine was waiting for.
        expected: &'static str,
    },
}

/// Frame commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// Source → target: VM config, memory layout and features (JSON).
    Hello = 1,
    /// Target → source: features accepted (JSON).
    HelloAck = 2,
    /// Source → target: guest pages (binary runs).
    Pages = 3,
    /// Source → target: end of a pre-copy round.
    RoundEnd = 4,
    /// Source → target: vCPU, VM and device state (opaque JSON of the VMM).
    State = 5,
    /// Source → target: everything has been sent.
    Complete = 6,
    /// Target → source: the image is restored and consistent.
    Ready = 7,
    /// Source → target: the source will never resume; run the guest.
    Commit = 8,
    /// Target → source: the guest runs on the target.
    Activated = 9,
    /// Either way: give up; the source keeps (or resumes) the guest.
    Abort = 10,
    /// Target → source: pages the post-copy guest is waiting for.
    PageRequest = 11,
    /// Source → target: switch to post-copy; resume now and fault in the rest.
    PostCopy = 12,
    /// Source → target: blocks of one disk (binary runs; version 2).
    DiskBlocks = 13,
    /// Source → target, first frame of a new connection: resume the
    /// post-copy migration of this VM (JSON [`Resume`]; version 3).
    Resume = 14,
    /// Target → source: whether the guest runs here, and the pages still
    /// missing ([`encode_resume_ack`]; version 3).
    ResumeAck = 15,
    /// Source → target, when pre-copy gives way to post-copy and before the
    /// guest pauses: runs of pages ([`encode_page_runs`]) the guest rewrote
    /// since they were sent, whose copies the target drops now rather than
    /// in the downtime (version 3; only to a target whose
    /// [`HelloAck::discard`] is set).
    Discard = 16,
    /// Target → source: the pages of a [`Command::Discard`] are dropped.
    Discarded = 17,
}

impl Command {
    /// The first protocol version with this command: what its frames carry.
    pub fn since(self) -> u16 {
        match self {
            Command::DiskBlocks => STORAGE_VERSION,
            Command::Resume | Command::ResumeAck | Command::Discard | Command::Discarded => {
                RECOVERY_VERSION
            }
            _ => MIN_VERSION,
        }
    }
}

impl TryFrom<u16> for Command {
    type Error = ProtocolError;

    fn try_from(value: u16) -> Result<Self, ProtocolError> {
        use Command::*;
        Ok(match value {
            1 => Hello,
            2 => HelloAck,
            3 => Pages,
            4 => RoundEnd,
            5 => State,
            6 => Complete,
            7 => Ready,
            8 => Commit,
            9 => Activated,
            10 => Abort,
            11 => PageRequest,
            12 => PostCopy,
            13 => DiskBlocks,
            14 => Resume,
            15 => ResumeAck,
            16 => Discard,
            17 => Discarded,
            other => return Err(ProtocolError::UnknownCommand(other)),
        })
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The sender's protocol version.
    pub version: u16,
    /// What the payload is.
    pub command: Command,
    /// Payload length in bytes.
    pub length: u32,
}

impl Header {
    /// The header of a frame this build sends (in [`Command::since`]).
    pub fn new(command: Command, length: usize) -> Header {
        Header::with_version(command.since(), command, length)
    }

    /// The header of a frame sent in `version` (see the module docs).
    pub fn with_version(version: u16, command: Command, length: usize) -> Header {
        Header {
            version,
            command,
            length: u32::try_from(length).expect("payload length checked by the caller"),
        }
    }

    /// The header's 16 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&(self.command as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.length.to_le_bytes());
        out
    }

    /// Decodes and checks a header: magic, version, command, reserved bits and
    /// length limit.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let u16_at = |i: usize| u16::from_le_bytes(bytes[i..i + 2].try_into().unwrap());
        let magic = u32_at(0);
        if magic != MAGIC {
            // A TLS record: handshake (22) or alert (21), version 3.x.
            if matches!(bytes[..2], [0x16 | 0x15, 0x03]) {
                return Err(ProtocolError::TlsPeer);
            }
            return Err(ProtocolError::Magic(magic));
        }
        let version = u16_at(4);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(ProtocolError::Version(version));
        }
        let command = Command::try_from(u16_at(6))?;
        let length = u32_at(8);
        if length > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge(length));
        }
        let reserved = u32_at(12);
        if reserved != 0 {
            return Err(ProtocolError::Reserved(reserved));
        }
        Ok(Header {
            version,
            command,
            length,
        })
    }
}

/// Writes one frame.
pub fn write_frame(
    w: &mut impl Write,
    command: Command,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    write_frame_version(w, command.since(), command, payload)
}

/// Writes one frame in protocol `version`.
pub fn write_frame_version(
    w: &mut impl Write,
    version: u16,
    command: Command,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    if payload.len() > MAX_PAYLOAD as usize {
        return Err(ProtocolError::TooLarge(
            payload.len().min(u32::MAX as usize) as u32,
        ));
    }
    let header = Header::with_version(version, command, payload.len()).encode();
    write_all_vectored(w, &mut [IoSlice::new(&header), IoSlice::new(payload)])
        .map_err(ProtocolError::Io)
}

/// Writes all of `bufs`, in as few writes as the writer takes. A frame's
/// header and payload go to the socket in one call: on a stream without
/// Nagle's delay, two calls would send the 16-byte header as a packet of
/// its own (and draw an acknowledgement of its own), which on a stream of
/// small frames (post-copy's pushes) costs more than a percent of the bytes
/// on the wire.
fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one frame into `payload` (reusing its allocation) and returns its header.
pub fn read_frame(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Header, ProtocolError> {
    let mut bytes = [0u8; HEADER_LEN];
    r.read_exact(&mut bytes).map_err(ProtocolError::Io)?;
    let header = Header::decode(&bytes)?;
    payload.clear();
    payload.resize(header.length as usize, 0);
    r.read_exact(payload).map_err(ProtocolError::Io)?;
    Ok(header)
}

/// What the source tells the target first.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// The VM's name, for logs and for refusing a stream meant for another VM.
    pub vm_name: String,
    /// Guest RAM regions as (guest-physical start, length in bytes).
    pub memory: Vec<(u64, u64)>,
    /// The VMM configuration the target builds the VM from (opaque JSON).
    pub config: serde_json::Value,
    /// Whether the source may switch to post-copy.
    #[serde(default)]
    pub post_copy: bool,
    /// Node-local disks the source copies in the stream (version 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskOffer>,
}

/// A disk the source copies: which one, its virtual size, and the base
/// image an overlay sits on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskOffer {
    /// Disk index, from 0 in `--disk` order.
    pub index: u32,
    /// Virtual size in bytes; the target's disk must have the same.
    pub size: u64,
    /// The sha256 (hex) of the template base the disk is a qcow2 overlay
    /// on, when it is one from the node's template cache.
    #[serde(default)]
    pub base_digest: Option<String>,
}

/// The target's answer about one [`DiskOffer`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskAccept {
    /// Disk index.
    pub index: u32,
    /// The target's disk is an overlay on the same base: only the
    /// overlay's own clusters need to travel.
    pub base_present: bool,
}

/// The target's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelloAck {
    /// Whether the target can serve post-copy (userfaultfd available).
    #[serde(default)]
    pub post_copy: bool,
    /// One answer per offered disk, in [`Hello::disks`] order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskAccept>,
    /// Whether the target takes [`Command::Discard`] before post-copy.
    #[serde(default)]
    pub discard: bool,
}

/// One run of consecutive pages in a [`Command::Pages`] payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun<'a> {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// The pages' bytes, or `None` for a run of zero pages (no data on the wire).
    pub data: Option<&'a [u8]>,
}

const RUN_HEADER_LEN: usize = 16;
const RUN_ZERO: u8 = 0;
const RUN_DATA: u8 = 1;

/// Builds a [`Command::Pages`] payload: runs of `(gpa u64, pages u32, kind u8,
/// 3 zero bytes)` headers, each data run followed by its pages.
#[derive(Default)]
pub struct PageBatch {
    buf: Vec<u8>,
    pages: u64,
}

impl PageBatch {
    /// An empty batch with room for about `bytes` of pages.
    pub fn with_capacity(bytes: usize) -> PageBatch {
        PageBatch {
            buf: Vec::with_capacity(bytes + bytes / PAGE_SIZE * RUN_HEADER_LEN / 8 + 64),
            pages: 0,
        }
    }

    fn run_header(&mut self, gpa: u64, pages: u32, kind: u8) {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(&pages.to_le_bytes());
        self.buf.extend_from_slice(&[kind, 0, 0, 0]);
        self.pages += u64::from(pages);
    }

    /// Adds `pages` zero pages at `gpa` (no page data is sent).
    pub fn push_zero(&mut self, gpa: u64, pages: u32) {
        self.run_header(gpa, pages, RUN_ZERO);
    }

    /// Adds the pages in `data` (a whole number of pages) at `gpa`.
    pub fn push_data(&mut self, gpa: u64, data: &[u8]) {
        debug_assert_eq!(data.len() % PAGE_SIZE, 0);
        self.run_header(gpa, (data.len() / PAGE_SIZE) as u32, RUN_DATA);
        self.buf.extend_from_slice(data);
    }

    /// Bytes in the payload so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no run was added.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Pages (data and zero) in the batch.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The payload.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Empties the batch, keeping its allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pages = 0;
    }
}

/// Decodes a [`Command::Pages`] payload, checking every run before any is used:
/// page-aligned addresses, no overflow, data lengths within the payload.
pub fn parse_pages(payload: &[u8]) -> Result<Vec<PageRun<'_>>, ProtocolError> {
    let bad = |reason| ProtocolError::Malformed {
        command: Command::Pages,
        reason,
    };
    let mut runs = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let header = payload
            .get(at..at + RUN_HEADER_LEN)
            .ok_or(bad("truncated run header"))?;
        let gpa = u64::from_le_bytes(header[0..8].try_into().unwrap());
        let pages = u32::from_le_bytes(header[8..12].try_into().unwrap());
        let kind = header[12];
        if header[13..16] != [0, 0, 0] {
            return Err(bad("reserved run bytes set"));
        }
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad("page address not page-aligned"));
        }
        if pages == 0 {
            return Err(bad("empty run"));
        }
        let len = pages as usize * PAGE_SIZE;
        gpa.checked_add(len as u64)
            .ok_or(bad("run wraps the address space"))?;
        at += RUN_HEADER_LEN;
        let data = match kind {
            RUN_ZERO => None,
            RUN_DATA => {
                let data = payload
                    .get(at..at + len)
                    .ok_or(bad("truncated page data"))?;
                at += len;
                Some(data)
            }
            _ => return Err(bad("unknown run kind")),
        };
        runs.push(PageRun { gpa, pages, data });
    }
    Ok(runs)
}

/// Disk offsets and lengths on the wire are multiples of this.
pub const DISK_SECTOR: u64 = 512;

/// One run of a [`Command::DiskBlocks`] payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskRun<'a> {
    /// Byte offset on the virtual disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// The bytes, or `None` for a run that reads as zero (no data sent).
    pub data: Option<&'a [u8]>,
}

/// Builds a [`Command::DiskBlocks`] payload: `(disk u32, 4 zero bytes)`, then
/// runs of `(offset u64, len u32, kind u8, 3 zero bytes)` headers, each data
/// run followed by its bytes (the same kinds as page runs).
pub struct DiskBatch {
    buf: Vec<u8>,
}

impl DiskBatch {
    /// An empty batch for disk `disk`.
    pub fn new(disk: u32, capacity: usize) -> DiskBatch {
        let mut buf = Vec::with_capacity(capacity + 64);
        buf.extend_from_slice(&disk.to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        DiskBatch { buf }
    }

    fn run_header(&mut self, offset: u64, len: u32, kind: u8) {
        debug_assert!(
            offset.is_multiple_of(DISK_SECTOR) && u64::from(len).is_multiple_of(DISK_SECTOR)
        );
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&[kind, 0, 0, 0]);
    }

    /// Adds `len` zero bytes at `offset` (no data sent).
    pub fn push_zero(&mut self, offset: u64, len: u32) {
        self.run_header(offset, len, RUN_ZERO);
    }

    /// Adds `data` at `offset`.
    pub fn push_data(&mut self, offset: u64, data: &[u8]) {
        self.run_header(offset, data.len() as u32, RUN_DATA);
        self.buf.extend_from_slice(data);
    }

    /// Whether no run was added.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == 8
    }

    /// Bytes in the payload so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The payload.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the runs, keeping the disk and the allocation.
    pub fn clear(&mut self) {
        self.buf.truncate(8);
    }
}

/// Decodes a [`Command::DiskBlocks`] payload into the disk index and its
/// runs, checking every run first: sector-aligned, non-empty, no overflow,
/// data within the payload.
pub fn parse_disk_blocks(payload: &[u8]) -> Result<(u32, Vec<DiskRun<'_>>), ProtocolError> {
    let bad = |reason| ProtocolError::Malformed {
        command: Command::DiskBlocks,
        reason,
    };
    let head = payload.get(..8).ok_or(bad("truncated disk header"))?;
    if head[4..8] != [0; 4] {
        return Err(bad("reserved disk header bytes set"));
    }
    let disk = u32::from_le_bytes(head[0..4].try_into().unwrap());
    let mut runs = Vec::new();
    let mut at = 8;
    while at < payload.len() {
        let h = payload
            .get(at..at + RUN_HEADER_LEN)
            .ok_or(bad("truncated run header"))?;
        let offset = u64::from_le_bytes(h[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if h[13..16] != [0, 0, 0] {
            return Err(bad("reserved run bytes set"));
        }
        if !offset.is_multiple_of(DISK_SECTOR) || !u64::from(len).is_multiple_of(DISK_SECTOR) {
            return Err(bad("disk run not sector-aligned"));
        }
        if len == 0 {
            return Err(bad("empty run"));
        }
        offset
            .checked_add(u64::from(len))
            .ok_or(bad("run wraps the disk"))?;
        at += RUN_HEADER_LEN;
        let data = match h[12] {
            RUN_ZERO => None,
            RUN_DATA => {
                let d = payload
                    .get(at..at + len as usize)
                    .ok_or(bad("truncated disk data"))?;
                at += len as usize;
                Some(d)
            }
            _ => return Err(bad("unknown run kind")),
        };
        runs.push(DiskRun { offset, len, data });
    }
    Ok((disk, runs))
}

/// Encodes the guest-physical addresses of a [`Command::PageRequest`].
pub fn encode_page_request(gpas: &[u64]) -> Vec<u8> {
    gpas.iter().flat_map(|g| g.to_le_bytes()).collect()
}

/// Decodes a [`Command::PageRequest`] payload.
pub fn parse_page_request(payload: &[u8]) -> Result<Vec<u64>, ProtocolError> {
    if !payload.len().is_multiple_of(8) {
        return Err(ProtocolError::Malformed {
            command: Command::PageRequest,
            reason: "length is not a multiple of 8",
        });
    }
    let gpas: Vec<u64> = payload
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if gpas.iter().any(|g| !g.is_multiple_of(PAGE_SIZE as u64)) {
        return Err(ProtocolError::Malformed {
            command: Command::PageRequest,
            reason: "page address not page-aligned",
        });
    }
    Ok(gpas)
}

/// Encodes page runs as `(gpa u64, pages u32, 4 zero bytes)`: the pages a
/// [`Command::PostCopy`] tells the target it must still fetch.
pub fn encode_page_runs(runs: &[(u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * 16);
    for (gpa, pages) in runs {
        out.extend_from_slice(&gpa.to_le_bytes());
        out.extend_from_slice(&pages.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
    }
    out
}

/// Decodes [`encode_page_runs`], checking alignment and overflow.
pub fn parse_page_runs(payload: &[u8]) -> Result<Vec<(u64, u32)>, ProtocolError> {
    let bad = |reason| ProtocolError::Malformed {
        command: Command::PostCopy,
        reason,
    };
    if !payload.len().is_multiple_of(16) {
        return Err(bad("length is not a multiple of 16"));
    }
    payload
        .chunks_exact(16)
        .map(|c| {
            let gpa = u64::from_le_bytes(c[0..8].try_into().unwrap());
            let pages = u32::from_le_bytes(c[8..12].try_into().unwrap());
            if c[12..16] != [0; 4] {
                return Err(bad("reserved run bytes set"));
            }
            if !gpa.is_multiple_of(PAGE_SIZE as u64) || pages == 0 {
                return Err(bad("unaligned or empty run"));
            }
            gpa.checked_add(u64::from(pages) * PAGE_SIZE as u64)
                .ok_or(bad("run wraps the address space"))?;
            Ok((gpa, pages))
        })
        .collect()
}

/// What a source sends to resume a post-copy migration on a new connection.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resume {
    /// The VM being migrated (the target refuses another).
    pub vm_name: String,
}

/// Encodes a [`Command::ResumeAck`]: one byte, 1 when the guest already runs
/// on the target, seven zero bytes, then the runs of pages the target still
/// needs ([`encode_page_runs`]).
pub fn encode_resume_ack(activated: bool, runs: &[(u64, u32)]) -> Vec<u8> {
    let mut out = vec![0u8; 8];
    out[0] = u8::from(activated);
    out.extend_from_slice(&encode_page_runs(runs));
    out
}

/// Decodes a [`Command::ResumeAck`] payload.
pub fn parse_resume_ack(payload: &[u8]) -> Result<(bool, Vec<(u64, u32)>), ProtocolError> {
    let bad = |reason| ProtocolError::Malformed {
        command: Command::ResumeAck,
        reason,
    };
    let (head, runs) = payload
        .split_at_checked(8)
        .ok_or(bad("shorter than 8 bytes"))?;
    if head[0] > 1 || head[1..] != [0; 7] {
        return Err(bad("bad flags"));
    }
    let runs = parse_page_runs(runs).map_err(|e| match e {
        ProtocolError::Malformed { reason, .. } => bad(reason),
        other => other,
    })?;
    Ok((head[0] == 1, runs))
}

/// Encodes a [`Command::RoundEnd`]: the round number and the pages it sent.
pub fn encode_round_end(round: u32, pages: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..4].copy_from_slice(&round.to_le_bytes());
    out[4..12].copy_from_slice(&pages.to_le_bytes());
    out
}

/// Decodes a [`Command::RoundEnd`] payload.
pub fn parse_round_end(payload: &[u8]) -> Result<(u32, u64), ProtocolError> {
    if payload.len() != 12 {
        return Err(ProtocolError::Malformed {
            command: Command::RoundEnd,
            reason: "length is not 12",
        });
    }
    Ok((
        u32::from_le_bytes(payload[0..4].try_into().unwrap()),
        u64::from_le_bytes(payload[4..12].try_into().unwrap()),
    ))
}

/// Encodes a JSON message.
pub fn encode_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("migration messages serialize")
}

/// Decodes a JSON message of `command`.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    command: Command,
    payload: &[u8],
) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Json(command, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(command: Command, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, command, payload).unwrap();
        out
    }

    #[test]
    fn frames_round_trip() {
        let bytes = frame(Command::Abort, b"target disk full");
        assert_eq!(bytes.len(), HEADER_LEN + 16);
        let mut payload = Vec::new();
        let header = read_frame(&mut bytes.as_slice(), &mut payload).unwrap();
        assert_eq!(header.command, Command::Abort);
        assert_eq!(header.version, MIN_VERSION);
        assert_eq!(payload, b"target disk full");
    }

    #[test]
    fn every_command_decodes_to_itself() {
        for code in 1..=17u16 {
            let command = Command::try_from(code).unwrap();
            assert_eq!(command as u16, code);
        }
        assert!(matches!(
            Command::try_from(0),
            Err(ProtocolError::UnknownCommand(0))
        ));
        assert!(matches!(
            Command::try_from(18),
            Err(ProtocolError::UnknownCommand(18))
        ));
    }

    #[test]
    fn wrong_version_is_refused_with_advice() {
        for version in [0u16, VERSION + 1, 0xffff] {
            let mut bytes = frame(Command::Complete, &[]);
            bytes[4..6].copy_from_slice(&version.to_le_bytes());
            let err = read_frame(&mut bytes.as_slice(), &mut Vec::new()).unwrap_err();
            assert!(matches!(err, ProtocolError::Version(v) if v == version));
            assert!(err.to_string().contains("same Godwit release"));
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = frame(Command::Complete, &[]);
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            read_frame(&mut bad_magic.as_slice(), &mut Vec::new()),
            Err(ProtocolError::Magic(_))
        ));
        let mut bad_command = good.clone();
        bad_command[6..8].copy_from_slice(&99u16.to_le_bytes());
        assert!(matches!(
            read_frame(&mut bad_command.as_slice(), &mut Vec::new()),
            Err(ProtocolError::UnknownCommand(99))
        ));
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut huge.as_slice(), &mut Vec::new()),
            Err(ProtocolError::TooLarge(_))
        ));
        let mut tls_hello = good.clone();
        tls_hello[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
        assert!(matches!(
            read_frame(&mut tls_hello.as_slice(), &mut Vec::new()),
            Err(ProtocolError::TlsPeer)
        ));
        let mut reserved = good.clone();
        reserved[12] = 1;
        assert!(matches!(
            read_frame(&mut reserved.as_slice(), &mut Vec::new()),
            Err(ProtocolError::Reserved(1))
        ));
        // A payload shorter than announced is an I/O error, not a short read.
        let mut truncated = frame(Command::Abort, b"abc");
        truncated.pop();
        assert!(matches!(
            read_frame(&mut truncated.as_slice(), &mut Vec::new()),
            Err(ProtocolError::Io(_))
        ));
    }

    #[test]
    fn page_batches_round_trip_and_elide_zero_pages() {
        let page_a = vec![0xabu8; PAGE_SIZE * 2];
        let mut batch = PageBatch::with_capacity(3 * PAGE_SIZE);
        batch.push_data(0x1000, &page_a);
        batch.push_zero(0x10_0000, 256);
        assert_eq!(batch.pages(), 258);
        // Zero pages cost only a run header.
        assert_eq!(batch.len(), 2 * RUN_HEADER_LEN + 2 * PAGE_SIZE);
        let runs = parse_pages(batch.as_bytes()).unwrap();
        assert_eq!(
            runs,
            vec![
                PageRun {
                    gpa: 0x1000,
                    pages: 2,
                    data: Some(&page_a[..])
                },
                PageRun {
                    gpa: 0x10_0000,
                    pages: 256,
                    data: None
                },
            ]
        );
    }

    #[test]
    fn malformed_page_batches_are_refused() {
        let mut batch = PageBatch::default();
        batch.push_data(0x2000, &[1u8; PAGE_SIZE]);
        let good = batch.as_bytes().to_vec();

        let mut truncated = good.clone();
        truncated.truncate(good.len() - 1);
        let mut unaligned = good.clone();
        unaligned[0] = 1;
        let mut bad_kind = good.clone();
        bad_kind[12] = 7;
        let mut wraps = PageBatch::default();
        wraps.push_zero(u64::MAX - 4095, 2);
        let mut empty = PageBatch::default();
        empty.push_zero(0, 0);
        for (name, bytes) in [
            ("truncated", truncated),
            ("unaligned", unaligned),
            ("bad kind", bad_kind),
            ("wraps", wraps.as_bytes().to_vec()),
            ("empty", empty.as_bytes().to_vec()),
            ("short header", vec![0u8; 5]),
        ] {
            assert!(
                matches!(parse_pages(&bytes), Err(ProtocolError::Malformed { .. })),
                "{name} was accepted"
            );
        }
    }

    #[test]
    fn small_messages_round_trip() {
        assert_eq!(
            parse_round_end(&encode_round_end(7, 1234)).unwrap(),
            (7, 1234)
        );
        assert!(parse_round_end(&[0; 11]).is_err());
        let runs = vec![(0x1000, 3), (0x10_0000, 1)];
        assert_eq!(parse_page_runs(&encode_page_runs(&runs)).unwrap(), runs);
        assert!(parse_page_runs(&[0; 15]).is_err());
        assert!(parse_page_runs(&encode_page_runs(&[(0x1001, 1)])).is_err());
        let gpas = vec![0, 0x1000, 0x7fff_f000];
        assert_eq!(
            parse_page_request(&encode_page_request(&gpas)).unwrap(),
            gpas
        );
        assert!(parse_page_request(&[0; 7]).is_err());
        assert!(parse_page_request(&1u64.to_le_bytes()).is_err());
        assert_eq!(
            parse_resume_ack(&encode_resume_ack(true, &runs)).unwrap(),
            (true, runs.clone())
        );
        assert_eq!(
            parse_resume_ack(&encode_resume_ack(false, &[])).unwrap(),
            (false, vec![])
        );
        assert!(parse_resume_ack(&[1; 7]).is_err());
        assert!(parse_resume_ack(&[2, 0, 0, 0, 0, 0, 0, 0]).is_err());
        let mut odd = encode_resume_ack(false, &runs);
        odd.pop();
        assert!(parse_resume_ack(&odd).is_err());
        let hello = Hello {
            vm_name: "demo".into(),
            memory: vec![(0, 256 << 20)],
            config: serde_json::json!({"vcpus": 1}),
            post_copy: true,
            disks: vec![DiskOffer {
                index: 0,
                size: 1 << 30,
                base_digest: Some("ab".repeat(32)),
            }],
        };
        let back: Hello = parse_json(Command::Hello, &encode_json(&hello)).unwrap();
        assert_eq!(back, hello);
        assert!(parse_json::<Hello>(Command::Hello, b"{not json").is_err());
        // A version 1 Hello (no disks) still parses.
        let v1: Hello = parse_json(
            Command::Hello,
            br#"{"vmName":"a","memory":[[0,4096]],"config":{}}"#,
        )
        .unwrap();
        assert!(v1.disks.is_empty());
    }

    #[test]
    fn disk_batches_round_trip_and_refuse_malformed_runs() {
        let data = vec![7u8; 1024];
        let mut batch = DiskBatch::new(3, 4096);
        assert!(batch.is_empty());
        batch.push_data(65536, &data);
        batch.push_zero(1 << 20, 65536);
        let (disk, runs) = parse_disk_blocks(batch.as_bytes()).unwrap();
        assert_eq!(disk, 3);
        assert_eq!(
            runs,
            vec![
                DiskRun {
                    offset: 65536,
                    len: 1024,
                    data: Some(&data[..])
                },
                DiskRun {
                    offset: 1 << 20,
                    len: 65536,
                    data: None
                },
            ]
        );
        let good = batch.as_bytes().to_vec();
        let mut unaligned = good.clone();
        unaligned[8] = 1;
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 10);
        let mut reserved = good.clone();
        reserved[5] = 1;
        for (name, bytes) in [
            ("unaligned", unaligned),
            ("truncated", truncated),
            ("reserved", reserved),
            ("short", vec![0u8; 3]),
        ] {
            assert!(
                matches!(
                    parse_disk_blocks(&bytes),
                    Err(ProtocolError::Malformed { .. })
                ),
                "{name} was accepted"
            );
        }
    }

    #[test]
    fn frames_carry_the_chosen_version() {
        let mut out = Vec::new();
        write_frame(&mut out, Command::DiskBlocks, &[0; 8]).unwrap();
        let h = read_frame(&mut out.as_slice(), &mut Vec::new()).unwrap();
        assert_eq!(h.version, STORAGE_VERSION);
        // A version 1 peer refuses a storage stream clearly.
        let mut v2 = Vec::new();
        write_frame_version(&mut v2, STORAGE_VERSION, Command::Hello, b"{}").unwrap();
        assert_eq!(u16::from_le_bytes([v2[4], v2[5]]), 2);
    }
}
