//! Cold migration: a stopped VM's disks and configuration move to another
//! node, are verified there, and only then count as moved.
//!
//! No VMM runs on either side; the node agents drive it. The source reads
//! the VM's files, the target writes into the files a fresh VM would get on
//! its node (an overlay on its cached template base, or a blank image,
//! `agent::disks::prepare_target`). They talk over the live migration's
//! framed stream ([`super::protocol`], mutual TLS when the cluster has a
//! migration CA), with a Hello of their own that a live target refuses and
//! that a cold target refuses from a live source:
//!
//! ```text
//!  S->T Hello      (ColdHello: VM, its machine config, disks: index, size, base digest)
//!  T->S HelloAck   (ColdAck: per disk, whether the target holds the same base)
//!  S->T DiskBlocks (the allocated ranges only; chunks that read as zero as zero runs)
//!  S->T Complete   (ColdDone: sha256 of the config and of each disk's content)
//!       T flushes, reads every disk back as a guest would see it, hashes it
//!  T->S Ready      (everything matched) | Abort (what differed, or failed)
//! ```
//!
//! What travels is what live storage migration sends in its bulk copy
//! ([`crate::storage::copy::copy_extents`]): holes and unallocated
//! clusters stay behind, and when the target caches the template base an
//! overlay sits on, only the overlay's own clusters go.
//!
//! Verification hashes each disk's whole virtual content on both sides,
//! through the overlay and its base, so it checks the copy end to end
//! (what was sent, what was written, what the target's base holds) at the
//! price of reading the disk once more on each node. Nothing is removed
//! here: the source's agent removes the VM's files only after the
//! migration has Succeeded and the VM is placed on the target; until then
//! the source has everything, whatever failed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use ring::digest::{Context, SHA256};

use super::error::MigrationError;
use super::progress::{MigrationSummary, ModeUsed, ProgressHandle, Stage, StorageResult};
use super::protocol::{
    self, read_frame, Command, DiskAccept, DiskBatch, DiskOffer, ProtocolError, DISK_SECTOR,
};
use super::session::{command_name, BATCH_BYTES};
use super::transport::{self, Conn, FrameWriter, Incoming};
use crate::storage::copy::{base_digest, copy_extents};
use crate::storage::DiskImage;

/// Bytes read per disk chunk (sending and hashing).
const CHUNK: u64 = 1 << 20;

/// What the source says first.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdHello {
    /// Always true: tells a cold target from a live one.
    pub cold: bool,
    /// The VM's name.
    pub vm_name: String,
    /// The VM's machine config, as the source's agent keeps it (`machine.json`).
    pub machine: String,
    /// The disks that travel; `index` is the disk's index in the machine.
    pub disks: Vec<DiskOffer>,
}

/// The target's answer.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdAck {
    /// One answer per offered disk, in offer order.
    pub disks: Vec<DiskAccept>,
}

/// What the source checks the target against once everything is sent.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdDone {
    /// sha256 (hex) of [`ColdHello::machine`].
    pub machine_sha256: String,
    /// sha256 (hex) of each disk's virtual content, in offer order.
    pub disks_sha256: Vec<String>,
}

/// One disk of a stopped VM: its index in the machine, and the image.
pub struct ColdDisk {
    /// Index in the machine's disks.
    pub index: u32,
    /// The image, open read-only on the source, writable on the target.
    pub image: DiskImage,
}

/// How the source sends.
#[derive(Clone, Debug)]
pub struct ColdOptions {
    /// Bytes per second at most (`None`: as fast as the link goes).
    pub bandwidth: Option<u64>,
    /// How long to wait for the peer's next word.
    pub stall_timeout: Duration,
}

impl Default for ColdOptions {
    fn default() -> Self {
        ColdOptions {
            bandwidth: None,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// The sha256 of a disk's whole virtual content, read as a guest reads it.
pub fn disk_sha256(disk: &DiskImage) -> std::io::Result<String> {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = 0;
    while at < disk.size() {
        let n = CHUNK.min(disk.size() - at) as usize;
        disk.read_at(&mut buf[..n], at)?;
        ctx.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex(ctx.finish().as_ref()))
}

fn sha256(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn disk_error(
    i: u32,
    what: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> MigrationError {
    MigrationError::ColdDisk(i as usize, what, Box::new(e))
}

/// Sends a stopped VM over `conn`: its `machine` config and `disks`.
/// Returns once the target has verified everything; on any error the
/// target has been told to abort and the source's files are as they were.
pub fn send(
    conn: Conn,
    vm_name: &str,
    machine: &str,
    disks: &[ColdDisk],
    opts: &ColdOptions,
    progress: &ProgressHandle,
    cancel: &AtomicBool,
) -> Result<MigrationSummary, MigrationError> {
    let started = Instant::now();
    progress.start();
    progress.update(|p| p.stage = Stage::Handshake);
    let reader = conn.try_clone().map_err(MigrationError::Socket)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("cold-reader".into())
        .spawn(move || transport::reader_loop(reader, tx))
        .map_err(MigrationError::Socket)?;
    let mut writer = FrameWriter::new(conn, opts.bandwidth);
    writer.version = protocol::STORAGE_VERSION;
    let outcome = send_all(
        &mut writer,
        &rx,
        vm_name,
        machine,
        disks,
        opts,
        progress,
        cancel,
    )
    .map_err(|e| peer_word(&rx, e));
    let outcome = outcome.map(|mut storage| {
        storage.bytes_sent = writer.bytes_sent;
        MigrationSummary {
            total_ms: started.elapsed().as_millis() as u64,
            downtime_ms: 0.0,
            bytes_sent: writer.bytes_sent,
            rounds: 1,
            mode: ModeUsed::Cold,
            storage: Some(storage),
            ..MigrationSummary::default()
        }
    });
    if let Err(e) = &outcome {
        let _ = writer.send(Command::Abort, godwit_crds::error_chain(e).as_bytes());
    }
    writer.close();
    match &outcome {
        Ok(r) => progress.update(|p| {
            p.stage = Stage::Completed;
            p.disk_remaining_bytes = 0;
            p.transferred_bytes = r.bytes_sent;
            p.result = Some(r.clone());
        }),
        Err(e) => progress.update(|p| {
            p.stage = Stage::Failed;
            p.error = Some(godwit_crds::error_chain(e));
        }),
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
fn send_all(
    writer: &mut FrameWriter,
    rx: &Receiver<Incoming>,
    vm_name: &str,
    machine: &str,
    disks: &[ColdDisk],
    opts: &ColdOptions,
    progress: &ProgressHandle,
    cancel: &AtomicBool,
) -> Result<StorageResult, MigrationError> {
    let offers: Vec<DiskOffer> = disks
        .iter()
        .map(|d| DiskOffer {
            index: d.index,
            size: d.image.size(),
            base_digest: base_digest(d.image.path(), d.image.format()),
        })
        .collect();
    let hello = ColdHello {
        cold: true,
        vm_name: vm_name.to_string(),
        machine: machine.to_string(),
        disks: offers.clone(),
    };
    writer.send(Command::Hello, &protocol::encode_json(&hello))?;
    let ack: ColdAck = protocol::parse_json(
        Command::HelloAck,
        &expect(rx, Command::HelloAck, opts.stall_timeout)?,
    )?;
    if ack.disks.len() != offers.len()
        || ack
            .disks
            .iter()
            .zip(&offers)
            .any(|(a, o)| a.index != o.index)
    {
        return Err(ProtocolError::Malformed {
            command: Command::HelloAck,
            reason: "disk answers do not match the disks offered",
        }
        .into());
    }
    let mut result = StorageResult {
        disks: disks.len() as u32,
        base_on_target: ack.disks.iter().map(|a| a.base_present).collect(),
        ..StorageResult::default()
    };
    let mut plans = Vec::new();
    for (d, a) in disks.iter().zip(&ack.disks) {
        let ranges = copy_extents(&d.image, a.base_present)
            .map_err(|e| disk_error(d.index, "list extents", e))?;
        result.allocated_bytes += ranges.iter().map(|r| r.1).sum::<u64>();
        plans.push(ranges);
    }
    let mut left = result.allocated_bytes;
    progress.update(|p| {
        p.stage = Stage::StopAndCopy;
        p.disk_remaining_bytes = left;
    });
    let mut buf = vec![0u8; CHUNK as usize];
    for (d, ranges) in disks.iter().zip(&plans) {
        let size = d.image.size();
        let mut batch = DiskBatch::new(d.index, BATCH_BYTES + CHUNK as usize);
        for &(offset, len) in ranges {
            let mut at = offset / DISK_SECTOR * DISK_SECTOR;
            let end = ((offset + len).div_ceil(DISK_SECTOR) * DISK_SECTOR).min(size);
            while at < end {
                // Chunks end on CHUNK boundaries so that reads stay aligned.
                let n = ((at / CHUNK + 1) * CHUNK).min(end) - at;
                let b = &mut buf[..n as usize];
                d.image
                    .read_at(b, at)
                    .map_err(|e| disk_error(d.index, "read", e))?;
                if b.iter().all(|x| *x == 0) {
                    batch.push_zero(at, n as u32);
                } else {
                    batch.push_data(at, b);
                }
                at += n;
                left = left.saturating_sub(n);
                if batch.len() >= BATCH_BYTES {
                    writer.send(Command::DiskBlocks, batch.as_bytes())?;
                    batch.clear();
                    check_peer(rx, cancel)?;
                    let sent = writer.bytes_sent;
                    progress.update(|p| {
                        p.transferred_bytes = sent;
                        p.disk_remaining_bytes = left;
                    });
                }
            }
        }
        if !batch.is_empty() {
            writer.send(Command::DiskBlocks, batch.as_bytes())?;
        }
    }
    let done = ColdDone {
        machine_sha256: sha256(machine.as_bytes()),
        disks_sha256: disks
            .iter()
            .map(|d| disk_sha256(&d.image).map_err(|e| disk_error(d.index, "hash", e)))
            .collect::<Result<_, _>>()?,
    };
    writer.send(Command::Complete, &protocol::encode_json(&done))?;
    let sent = writer.bytes_sent;
    progress.update(|p| {
        p.stage = Stage::Committing;
        p.transferred_bytes = sent;
        p.disk_remaining_bytes = 0;
    });
    // The target reads every disk back before it answers: allow for that
    // at a pessimistic 50 MiB/s on top of the usual stall timeout.
    let total: u64 = disks.iter().map(|d| d.image.size()).sum();
    let verify = opts.stall_timeout + Duration::from_secs(total / (50 << 20));
    expect(rx, Command::Ready, verify)?;
    Ok(result)
}

/// Waits for `expected`, failing on an Abort or anything else.
fn expect(
    rx: &Receiver<Incoming>,
    expected: Command,
    timeout: Duration,
) -> Result<Vec<u8>, MigrationError> {
    match transport::recv_timeout(rx, timeout)? {
        (Command::Abort, reason) => Err(MigrationError::PeerAbort(
            String::from_utf8_lossy(&reason).into_owned(),
        )),
        (got, payload) if got == expected => Ok(payload),
        (got, _) => Err(ProtocolError::Unexpected {
            got,
            expected: command_name(expected),
        }
        .into()),
    }
}

/// Fails if the copy was cancelled or the target said something (it only
/// speaks out of turn to abort).
fn check_peer(rx: &Receiver<Incoming>, cancel: &AtomicBool) -> Result<(), MigrationError> {
    if cancel.load(Ordering::Relaxed) {
        return Err(MigrationError::ColdCancelled);
    }
    match rx.try_recv() {
        Err(TryRecvError::Empty) => Ok(()),
        Ok(Ok((Command::Abort, reason))) => Err(MigrationError::PeerAbort(
            String::from_utf8_lossy(&reason).into_owned(),
        )),
        Ok(Ok((got, _))) => Err(ProtocolError::Unexpected {
            got,
            expected: "nothing while disks are sent",
        }
        .into()),
        Ok(Err(e)) => Err(e.into()),
        Err(TryRecvError::Disconnected) => Err(MigrationError::StreamClosed),
    }
}

/// A write that failed because the target hung up says less than the
/// target's Abort, which usually arrives right behind it.
fn peer_word(rx: &Receiver<Incoming>, e: MigrationError) -> MigrationError {
    if !matches!(&e, MigrationError::Protocol(ProtocolError::Io(_))) {
        return e;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(Ok((Command::Abort, reason))) => {
                return MigrationError::PeerAbort(String::from_utf8_lossy(&reason).into_owned())
            }
            Ok(Ok(_)) => continue,
            _ => break,
        }
    }
    e
}

/// Receives a stopped VM on `conn`. `prepare` gets the Hello and returns
/// the target's disks for the offered ones (same order, same virtual
/// sizes), made as a fresh VM on this node would have them. Returns the
/// Hello once every disk and the config verified; on an error the source
/// has been told why, and the caller removes what `prepare` made.
pub fn receive(
    mut conn: Conn,
    expected_vm: &str,
    prepare: impl FnOnce(&ColdHello) -> Result<Vec<ColdDisk>, MigrationError>,
    stall_timeout: Duration,
    progress: &ProgressHandle,
) -> Result<ColdHello, MigrationError> {
    progress.start();
    conn.socket()
        .set_read_timeout(Some(stall_timeout))
        .map_err(MigrationError::Socket)?;
    let mut writer = FrameWriter::new(conn.try_clone().map_err(MigrationError::Socket)?, None);
    let outcome = receive_all(&mut conn, &mut writer, expected_vm, prepare, progress);
    if let Err(e) = &outcome {
        if !matches!(e, MigrationError::PeerAbort(_)) {
            let _ = writer.send(Command::Abort, godwit_crds::error_chain(e).as_bytes());
        }
    }
    writer.close();
    outcome
}

fn receive_all(
    conn: &mut Conn,
    writer: &mut FrameWriter,
    expected_vm: &str,
    prepare: impl FnOnce(&ColdHello) -> Result<Vec<ColdDisk>, MigrationError>,
    progress: &ProgressHandle,
) -> Result<ColdHello, MigrationError> {
    let mut payload = Vec::new();
    let header = read_frame(conn, &mut payload)?;
    if header.command != Command::Hello {
        return Err(ProtocolError::Unexpected {
            got: header.command,
            expected: "Hello",
        }
        .into());
    }
    let hello: ColdHello = protocol::parse_json(Command::Hello, &payload)?;
    if !hello.cold {
        return Err(ProtocolError::Malformed {
            command: Command::Hello,
            reason: "a live migration was sent to a target waiting for a cold one",
        }
        .into());
    }
    if hello.vm_name != expected_vm {
        return Err(MigrationError::WrongVm {
            got: hello.vm_name,
            expected: expected_vm.to_string(),
        });
    }
    let disks = prepare(&hello)?;
    if disks.len() != hello.disks.len()
        || disks
            .iter()
            .zip(&hello.disks)
            .any(|(d, o)| d.index != o.index)
    {
        return Err(ProtocolError::Malformed {
            command: Command::Hello,
            reason: "the disks offered are not the machine's",
        }
        .into());
    }
    let mut acks = Vec::new();
    for (d, o) in disks.iter().zip(&hello.disks) {
        if d.image.size() != o.size {
            return Err(MigrationError::DiskSize {
                disk: o.index as usize,
                source_size: o.size,
                target_size: d.image.size(),
            });
        }
        let mine = base_digest(d.image.path(), d.image.format());
        acks.push(DiskAccept {
            index: o.index,
            base_present: mine.is_some() && mine == o.base_digest,
        });
    }
    writer.send(
        Command::HelloAck,
        &protocol::encode_json(&ColdAck { disks: acks }),
    )?;
    progress.update(|p| p.stage = Stage::StopAndCopy);
    let zeros = vec![0u8; CHUNK as usize];
    let mut received = 0u64;
    let done: ColdDone = loop {
        let header = read_frame(conn, &mut payload)?;
        match header.command {
            Command::DiskBlocks => {
                let (index, runs) = protocol::parse_disk_blocks(&payload)?;
                let disk = disks
                    .iter()
                    .find(|d| d.index == index)
                    .ok_or(MigrationError::DiskNotOffered(index))?;
                for run in runs {
                    if run.offset + u64::from(run.len) > disk.image.size() {
                        return Err(MigrationError::DiskRangeOutOfDisk(index, run.offset));
                    }
                    let write = |data: &[u8], at: u64| {
                        disk.image
                            .write_at(data, at)
                            .map_err(|e| disk_error(index, "write on the target", e))
                    };
                    match run.data {
                        Some(data) => write(data, run.offset)?,
                        None => {
                            let (mut at, end) = (run.offset, run.offset + u64::from(run.len));
                            while at < end {
                                let n = (end - at).min(CHUNK);
                                write(&zeros[..n as usize], at)?;
                                at += n;
                            }
                        }
                    }
                    received += u64::from(run.len);
                }
                progress.update(|p| p.transferred_bytes = received);
            }
            Command::Complete => break protocol::parse_json(Command::Complete, &payload)?,
            Command::Abort => {
                return Err(MigrationError::PeerAbort(
                    String::from_utf8_lossy(&payload).into_owned(),
                ))
            }
            got => {
                return Err(ProtocolError::Unexpected {
                    got,
                    expected: "DiskBlocks or Complete",
                }
                .into())
            }
        }
    };
    progress.update(|p| p.stage = Stage::Committing);
    for d in &disks {
        d.image
            .flush()
            .map_err(|e| disk_error(d.index, "flush on the target", e))?;
    }
    if sha256(hello.machine.as_bytes()) != done.machine_sha256 {
        return Err(MigrationError::ColdVerify(
            "the machine config differs from the source's".into(),
        ));
    }
    if done.disks_sha256.len() != disks.len() {
        return Err(ProtocolError::Malformed {
            command: Command::Complete,
            reason: "one digest per disk expected",
        }
        .into());
    }
    for (d, want) in disks.iter().zip(&done.disks_sha256) {
        let got = disk_sha256(&d.image).map_err(|e| disk_error(d.index, "read back", e))?;
        if &got != want {
            return Err(MigrationError::ColdVerify(format!(
                "disk {} reads differently on the target (sha256 {got}, source {want})",
                d.index
            )));
        }
    }
    writer.send(Command::Ready, &[])?;
    progress.update(|p| p.stage = Stage::Completed);
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::image::{create_blank, create_overlay};
    use crate::storage::ImageFormat;
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};

    /// A directory removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!("godwit-cold-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const MIB: u64 = 1 << 20;

    fn write(path: &Path, offset: u64, byte: u8, len: usize) {
        let d = DiskImage::open(path, None, false, false).unwrap();
        d.write_at(&vec![byte; len], offset).unwrap();
        d.flush().unwrap();
    }

    fn open(path: &Path, read_only: bool) -> ColdDisk {
        ColdDisk {
            index: 0,
            image: DiskImage::open(path, None, read_only, true).unwrap(),
        }
    }

    type Received = Result<ColdHello, MigrationError>;

    /// A target for VM `vm1` on a loopback port, whose disks `prepare` makes.
    fn spawn_target(
        prepare: impl FnOnce() -> Result<Vec<ColdDisk>, MigrationError> + Send + 'static,
    ) -> (std::net::SocketAddr, std::thread::JoinHandle<Received>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            receive(
                Conn::plain(stream),
                "vm1",
                |_hello| prepare(),
                Duration::from_secs(10),
                &ProgressHandle::default(),
            )
        });
        (addr, target)
    }

    /// Runs a cold migration of the disk at `src` into the disk at `dst`
    /// (made by `make_target` when the Hello arrives).
    fn migrate(
        src: &Path,
        dst: PathBuf,
        make_target: fn(&Path),
    ) -> (Result<MigrationSummary, MigrationError>, Received) {
        let (addr, target) = spawn_target(move || {
            make_target(&dst);
            Ok(vec![open(&dst, false)])
        });
        let disks = [open(src, true)];
        let sent = send(
            Conn::plain(TcpStream::connect(addr).unwrap()),
            "vm1",
            "{\"name\":\"vm1\"}",
            &disks,
            &ColdOptions::default(),
            &ProgressHandle::default(),
            &AtomicBool::new(false),
        );
        (sent, target.join().unwrap())
    }

    fn same_content(a: &Path, b: &Path) -> bool {
        let a = DiskImage::open(a, None, true, false).unwrap();
        let b = DiskImage::open(b, None, true, false).unwrap();
        disk_sha256(&a).unwrap() == disk_sha256(&b).unwrap()
    }

    #[test]
    fn a_sparse_raw_disk_arrives_identical_and_only_its_data_travels() {
        let dir = Scratch::new("raw");
        let (src, dst) = (dir.0.join("src.raw"), dir.0.join("dst.raw"));
        create_blank(&src, 64 * MIB, ImageFormat::Raw).unwrap();
        write(&src, 0, 0xa5, 4096);
        write(&src, 40 * MIB + 512, 0x3c, 3 * MIB as usize);
        let (sent, received) = migrate(&src, dst.clone(), |p| {
            create_blank(p, 64 * MIB, ImageFormat::Raw).unwrap()
        });
        let r = sent.expect("cold migration succeeds");
        let hello = received.expect("target verified");
        assert_eq!(hello.machine, "{\"name\":\"vm1\"}");
        assert!(same_content(&src, &dst));
        assert_eq!(r.mode, ModeUsed::Cold);
        let storage = r.storage.unwrap();
        assert!(
            storage.allocated_bytes < 8 * MIB && r.bytes_sent < 8 * MIB,
            "a 64 MiB disk with about 3 MiB of data sent {} bytes ({} allocated)",
            r.bytes_sent,
            storage.allocated_bytes
        );
    }

    #[test]
    fn an_overlay_on_a_base_the_target_caches_sends_only_its_own_clusters() {
        let dir = Scratch::new("overlay");
        let digest = "ab".repeat(32);
        for node in ["a", "b"] {
            std::fs::create_dir_all(dir.0.join(node)).unwrap();
            let base = dir.0.join(node).join(format!("sha256-{digest}.raw"));
            create_blank(&base, 32 * MIB, ImageFormat::Raw).unwrap();
            write(&base, 0, 0x11, 16 * MIB as usize);
        }
        let src = dir.0.join("a/disk.qcow2");
        create_overlay(&src, &dir.0.join(format!("a/sha256-{digest}.raw"))).unwrap();
        write(&src, 8 * MIB, 0x77, 65536);
        let dst = dir.0.join("b/disk.qcow2");
        let (sent, received) = migrate(&src, dst.clone(), |p| {
            let base = p.with_file_name(format!("sha256-{}.raw", "ab".repeat(32)));
            create_overlay(p, &base).unwrap();
        });
        let r = sent.expect("cold migration succeeds");
        received.expect("target verified");
        assert!(same_content(&src, &dst));
        let storage = r.storage.unwrap();
        assert_eq!(storage.base_on_target, vec![true]);
        assert!(
            r.bytes_sent < 2 * MIB,
            "only the overlay's cluster should travel, sent {}",
            r.bytes_sent
        );
    }

    #[test]
    fn a_target_whose_base_differs_fails_verification_and_says_so_on_both_sides() {
        let dir = Scratch::new("verify");
        let digest = "cd".repeat(32);
        for (node, byte) in [("a", 0x11), ("b", 0x12)] {
            std::fs::create_dir_all(dir.0.join(node)).unwrap();
            let base = dir.0.join(node).join(format!("sha256-{digest}.raw"));
            create_blank(&base, 16 * MIB, ImageFormat::Raw).unwrap();
            // Node b's cache entry is corrupt: same name, other content.
            write(&base, MIB, byte, 4096);
        }
        let src = dir.0.join("a/disk.qcow2");
        create_overlay(&src, &dir.0.join(format!("a/sha256-{digest}.raw"))).unwrap();
        let dst = dir.0.join("b/disk.qcow2");
        let (sent, received) = migrate(&src, dst, |p| {
            let base = p.with_file_name(format!("sha256-{}.raw", "cd".repeat(32)));
            create_overlay(p, &base).unwrap();
        });
        let target_error = godwit_crds::error_chain(&received.expect_err("target refuses"));
        assert!(target_error.contains("reads differently"), "{target_error}");
        let source_error = godwit_crds::error_chain(&sent.expect_err("source fails"));
        assert!(
            source_error.contains("reads differently") && source_error.contains("aborted"),
            "{source_error}"
        );
    }

    #[test]
    fn a_target_disk_of_another_size_is_refused_before_any_block() {
        let dir = Scratch::new("size");
        let (src, dst) = (dir.0.join("src.raw"), dir.0.join("dst.raw"));
        create_blank(&src, 8 * MIB, ImageFormat::Raw).unwrap();
        let (sent, received) = migrate(&src, dst, |p| {
            create_blank(p, 4 * MIB, ImageFormat::Raw).unwrap()
        });
        assert!(matches!(received, Err(MigrationError::DiskSize { .. })));
        let e = godwit_crds::error_chain(&sent.expect_err("source fails"));
        assert!(e.contains("8388608 bytes on the source but 4194304"), "{e}");
    }

    #[test]
    fn a_live_hello_is_refused_by_a_cold_target() {
        let (addr, target) = spawn_target(|| Ok(Vec::new()));
        let mut s = TcpStream::connect(addr).unwrap();
        let live = protocol::Hello {
            vm_name: "vm1".into(),
            memory: vec![(0, 1 << 20)],
            config: serde_json::json!({}),
            post_copy: false,
            disks: Vec::new(),
        };
        protocol::write_frame(&mut s, Command::Hello, &protocol::encode_json(&live)).unwrap();
        let e = target.join().unwrap().expect_err("refused");
        assert!(
            matches!(e, MigrationError::Protocol(ProtocolError::Json(..))),
            "{e:?}"
        );
    }
}
