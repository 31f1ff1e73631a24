//! Engine tests over real TCP on loopback with VMs whose "guest" is a thread
//! writing pages of an anonymous mapping, with software dirty tracking. The
//! real-KVM migration tests are in `node-daemon/tests/`.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;

use super::convergence::Policy;
use super::guest::{DirtyPages, GuestError, GuestRegion, SourceVm, TargetVm};
use super::progress::{ModeUsed, ProgressHandle};
use super::protocol::{self, Command, PAGE_SIZE};
use super::receiver::receive;
use super::sender::send;
use super::session::{ReceiveOptions, SendOptions};
use super::tls::{self, TlsFiles, TlsIdentity};
use super::transport::Conn;
use super::userfaultfd::Userfault;
use super::MigrationError;

/// Anonymous private memory, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; tests share it between threads the way
// a VMM shares guest RAM with its vCPU threads.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `huge`: transparent huge pages where the kernel can (as the VMM's
    /// guest RAM); otherwise small pages only, so that a test can tell which
    /// pages were touched.
    fn new(len: usize, huge: bool) -> Mapping {
        // SAFETY: a fresh anonymous mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let advice = if huge {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on the mapping just made.
        unsafe { libc::madvise(ptr, len, advice) };
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }

    /// Bytes backed by huge pages (`AnonHugePages`) in the /proc/self/smaps
    /// entry that holds this mapping (the kernel may have merged it with a
    /// neighbour).
    fn huge_bytes(&self) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let at = self.ptr as u64;
        let holds = |header: &str| {
            let range = header.split_whitespace().next().unwrap_or("");
            let (start, end) = range.split_once('-').unwrap_or(("", ""));
            let hex = |h: &str| u64::from_str_radix(h, 16).ok();
            matches!((hex(start), hex(end)), (Some(s), Some(e)) if s <= at && at < e)
        };
        let mut lines = smaps.lines().skip_while(|l| !holds(l));
        lines.next().expect("the mapping is in smaps");
        lines
            .take_while(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|k| k.ends_with(':'))
            })
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib << 10)
    }

    fn page(&self, i: usize) -> *mut u64 {
        // SAFETY: callers pass i < len / PAGE_SIZE.
        unsafe { self.ptr.add(i * PAGE_SIZE).cast() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM whose guest writes `gen * 1_000_000 + page` into the first word of
/// pages of its working set, as fast as it can, while not paused.
struct TestVm {
    mem: Mapping,
    dirty: Vec<AtomicU64>,
    logging: AtomicBool,
    paused: AtomicBool,
    running: Mutex<()>,
    generation: AtomicU64,
    restored: Mutex<Option<Vec<u8>>>,
    /// On the target: a thread started on resume that reads the first word of
    /// every page, last page first, racing the background push so that most
    /// reads fault and are fetched on demand in post-copy.
    toucher: Mutex<Option<std::thread::JoinHandle<Vec<u64>>>>,
    /// The guest rests this long (µs) after each 64-page chunk; 0 = never.
    pace_us: AtomicU64,
}

impl TestVm {
    fn new(mib: usize) -> Arc<TestVm> {
        TestVm::backed(mib, false)
    }

    /// `huge`: guest RAM on transparent huge pages ([`Mapping::new`]).
    fn backed(mib: usize, huge: bool) -> Arc<TestVm> {
        let pages = mib * 256;
        Arc::new(TestVm {
            mem: Mapping::new(mib << 20, huge),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            logging: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            running: Mutex::new(()),
            generation: AtomicU64::new(0),
            restored: Mutex::new(None),
            toucher: Mutex::new(None),
            pace_us: AtomicU64::new(0),
        })
    }

    fn pages(&self) -> usize {
        self.mem.len / PAGE_SIZE
    }

    /// Writes every page of `0..working_set` once per generation until `stop`.
    fn run_guest(
        self: &Arc<Self>,
        working_set: usize,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let vm = self.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if working_set == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let gen = vm.generation.fetch_add(1, Ordering::Relaxed) + 1;
                for chunk in (0..working_set).collect::<Vec<_>>().chunks(64) {
                    // Check `paused` under the lock that `pause` takes, so no
                    // chunk is written after `pause` returns.
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let running = vm.running.lock().unwrap();
                        if vm.paused.load(Ordering::SeqCst) {
                            drop(running);
                            std::thread::sleep(Duration::from_micros(200));
                            continue;
                        }
                        for &p in chunk {
                            // SAFETY: p < pages; word-aligned write into the mapping.
                            unsafe {
                                std::ptr::write_volatile(vm.mem.page(p), gen * 1_000_000 + p as u64)
                            };
                            vm.dirty[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
                        }
                        break;
                    }
                    let pace = vm.pace_us.load(Ordering::Relaxed);
                    if pace > 0 {
                        std::thread::sleep(Duration::from_micros(pace));
                    }
                }
            }
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the whole mapping, read while its writers are paused.
        unsafe { std::slice::from_raw_parts(self.mem.ptr, self.mem.len) }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        // The toucher reads the mapping: it must end before the unmap.
        if let Some(t) = self.toucher.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

impl SourceVm for TestVm {
    fn regions(&self) -> Vec<GuestRegion> {
        vec![GuestRegion {
            gpa: 0,
            size: self.mem.len as u64,
            host: self.mem.ptr,
        }]
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({"mib": self.mem.len >> 20})
    }
    fn set_dirty_log(&self, on: bool) -> Result<(), GuestError> {
        for w in &self.dirty {
            w.store(0, Ordering::Relaxed);
        }
        self.logging.store(on, Ordering::Relaxed);
        Ok(())
    }
    fn take_dirty(&self) -> Result<Vec<DirtyPages>, GuestError> {
        Ok(vec![DirtyPages {
            gpa: 0,
            bitmap: self
                .dirty
                .iter()
                .map(|w| w.swap(0, Ordering::AcqRel))
                .collect(),
        }])
    }
    fn dirty_count(&self) -> Result<Option<u64>, GuestError> {
        let n = self
            .dirty
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones());
        Ok(Some(n.map(u64::from).sum()))
    }
    fn populated(&self, region: &GuestRegion, first: u64, count: u64) -> Option<Vec<u64>> {
        // An anonymous private mapping, as the VMM's guest RAM is.
        let host = region.host_ptr(region.gpa + first * PAGE_SIZE as u64);
        super::pagemap::populated(host, count)
    }
    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        drop(self.running.lock().unwrap());
    }
    fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }
    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        Ok(self
            .generation
            .load(Ordering::Relaxed)
            .to_le_bytes()
            .to_vec())
    }
}

impl TargetVm for TestVm {
    fn regions(&self) -> Vec<GuestRegion> {
        SourceVm::regions(self)
    }
    fn restore_state(&self, state: &[u8]) -> Result<(), GuestError> {
        *self.restored.lock().unwrap() = Some(state.to_vec());
        Ok(())
    }
    fn resume(&self) -> Result<(), GuestError> {
        let base = self.mem.ptr as usize;
        let pages = self.pages();
        *self.toucher.lock().unwrap() = Some(std::thread::spawn(move || {
            (0..pages)
                .rev()
                // SAFETY: p < pages; the mapping outlives the thread (the test
                // joins it before dropping the VM).
                .map(|p| unsafe { std::ptr::read_volatile((base + p * PAGE_SIZE) as *const u64) })
                .collect()
        }));
        Ok(())
    }
    fn announce(&self) {}
}

struct Pair {
    source: Arc<TestVm>,
    target: Arc<TestVm>,
    result: Result<super::MigrationSummary, MigrationError>,
    received: Result<(), MigrationError>,
}

fn migrate(
    mib: usize,
    working_set: usize,
    opts: SendOptions,
    mangle: Option<fn(&mut TcpStream)>,
) -> Pair {
    migrate_over(mib, working_set, opts, mangle, Wire::default())
}

/// How the two ends connect: each side with or without a TLS identity.
#[derive(Clone, Default)]
struct Wire {
    source: Option<TlsIdentity>,
    target: Option<TlsIdentity>,
    /// The name the source checks the target's certificate against.
    server_name: &'static str,
    /// The target's guest RAM on transparent huge pages, as the VMM's.
    target_huge_pages: bool,
    /// The source's guest rests this long after each 64-page chunk.
    guest_pace: Duration,
    /// Content in every page before the migration, not every eighth.
    fill: bool,
}

fn migrate_over(
    mib: usize,
    working_set: usize,
    opts: SendOptions,
    mangle: Option<fn(&mut TcpStream)>,
    wire: Wire,
) -> Pair {
    let source = TestVm::new(mib);
    // Content in every eighth page (the rest stays zero), or in all.
    for p in (0..source.pages()).step_by(if wire.fill { 1 } else { 8 }) {
        // SAFETY: p < pages.
        unsafe { *source.mem.page(p) = 7 + p as u64 };
    }
    source
        .pace_us
        .store(wire.guest_pace.as_micros() as u64, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = source.run_guest(working_set, stop.clone());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target_slot: Arc<Mutex<Option<Arc<TestVm>>>> = Arc::default();
    let slot = target_slot.clone();
    let target_tls = wire.target.clone();
    let huge = wire.target_huge_pages;
    let receiver = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let progress = ProgressHandle::default();
        let conn = match &target_tls {
            None => Conn::plain(stream),
            Some(identity) => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let session = tls::accept(&stream, identity)?;
                Conn::tls(stream, session)
            }
        };
        receive(
            conn,
            |hello| {
                let mib = hello.config["mib"].as_u64().unwrap() as usize;
                let vm = TestVm::backed(mib, huge);
                *slot.lock().unwrap() = Some(vm.clone());
                Ok(vm)
            },
            &ReceiveOptions::default(),
            &progress,
        )
        .map(drop)
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    let result = match mangle {
        Some(f) => {
            f(&mut stream);
            Err(MigrationError::StreamClosed)
        }
        None => match &wire.source {
            None => Ok(Conn::plain(stream)),
            Some(identity) => {
                tls::connect(&stream, identity, wire.server_name, Duration::from_secs(10))
                    .map(|session| Conn::tls(stream, session))
                    .map_err(MigrationError::from)
            }
        }
        .and_then(|conn| {
            send(
                &*source,
                conn,
                &opts,
                &ProgressHandle::default(),
                &AtomicBool::new(false),
            )
        }),
    };
    let received = receiver.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    SourceVm::resume(&*source);
    guest.join().unwrap();
    let target = target_slot
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| TestVm::new(1));
    Pair {
        source,
        target,
        result,
        received,
    }
}

fn opts(policy: Policy) -> SendOptions {
    SendOptions {
        vm_name: "test".into(),
        policy,
        ..SendOptions::default()
    }
}

#[test]
fn idle_memory_arrives_identical_with_zero_pages_elided() {
    let pair = migrate(64, 0, opts(Policy::default()), None);
    let result = pair.result.unwrap();
    pair.received.unwrap();
    // The source's page table shows what was read: only the written pages
    // (1 in 8), since the engine skips never-written ones unread.
    let pages = 64 * 256;
    let touched: u32 = super::pagemap::populated(pair.source.mem.ptr, pages)
        .unwrap()
        .iter()
        .map(|w| w.count_ones())
        .sum();
    assert_eq!(
        touched as u64,
        pages / 8,
        "the engine read never-written pages"
    );
    assert!(
        pair.source.bytes() == pair.target.bytes(),
        "target memory differs"
    );
    assert_eq!(result.mode, ModeUsed::PreCopy);
    // 1 page in 8 has content: about an eighth of 64 MiB on the wire.
    assert_eq!(result.pages_sent + result.zero_pages, pages);
    assert!(
        result.bytes_sent < (64 << 20) / 6,
        "zero pages were sent: {result:?}"
    );
    assert_eq!(
        pair.target.restored.lock().unwrap().as_deref(),
        Some(&pair.source.generation.load(Ordering::Relaxed).to_le_bytes()[..])
    );
}

#[test]
fn busy_guest_converges_and_target_matches_source_at_pause() {
    let pair = migrate(64, 2048, opts(Policy::default()), None);
    let result = pair.result.unwrap();
    pair.received.unwrap();
    // The source stayed paused after the final copy, so both must be equal.
    assert!(
        pair.source.bytes() == pair.target.bytes(),
        "target memory differs"
    );
    assert!(result.rounds >= 1);
}

/// After a post-copy migration: the target holds the source's memory, and
/// what its guest read while pages were still arriving is what the source
/// had when it paused.
fn assert_post_copy_arrived_intact(pair: &Pair) {
    assert!(
        pair.source.bytes() == pair.target.bytes(),
        "target memory differs"
    );
    let seen = pair
        .target
        .toucher
        .lock()
        .unwrap()
        .take()
        .unwrap()
        .join()
        .unwrap();
    for (i, value) in seen.iter().enumerate() {
        let page = pair.source.pages() - 1 - i;
        // SAFETY: page < pages.
        let expected = unsafe { *pair.source.mem.page(page) };
        assert_eq!(
            *value, expected,
            "page {page} read wrong data on the target"
        );
    }
}

/// Never stop-and-copy, no throttling: go to post-copy after round 1.
fn post_copy_policy() -> Policy {
    if !Userfault::available(None) {
        panic!("userfaultfd is not available here; post-copy needs root or vm.unprivileged_userfaultfd=1");
    }
    Policy {
        max_downtime: Duration::from_nanos(1),
        allow_auto_converge: false,
        allow_post_copy: true,
        max_rounds: 2,
    }
}

#[test]
fn post_copy_faults_pages_in_and_ends_identical() {
    let pair = migrate(64, 8192, opts(post_copy_policy()), None);
    let result = pair.result.as_ref().unwrap();
    pair.received.as_ref().unwrap();
    assert_eq!(result.mode, ModeUsed::PostCopy);
    assert_post_copy_arrived_intact(&pair);
}

/// A huge page the target filled because one of its pages arrived holds
/// its other pages too, present and zero, so they never fault: post-copy
/// relies on every page still to come being dropped at the switch (the
/// source's dirty set since round 0, which read every page that was not
/// zero). Only every eighth page has content here, so every huge page is
/// such a mix.
#[test]
fn post_copy_into_huge_pages_ends_identical() {
    let wire = Wire {
        target_huge_pages: true,
        ..Wire::default()
    };
    let pair = migrate_over(64, 8192, opts(post_copy_policy()), None, wire);
    let result = pair.result.as_ref().unwrap();
    pair.received.as_ref().unwrap();
    assert_eq!(result.mode, ModeUsed::PostCopy);
    assert_post_copy_arrived_intact(&pair);
    assert!(
        pair.target.mem.huge_bytes() >= 2 << 20,
        "the target got no transparent huge pages, so this tested nothing \
         (is /sys/kernel/mm/transparent_hugepage/enabled set to never?)"
    );
}

/// A guest that writes new pages twice as fast as the link carries them,
/// for longer than round 0 looks ([`convergence::ROUND0_POSTCOPY_AFTER`]):
/// round 0 stops part-way and post-copy sends what it had not reached. The
/// memory ends identical, and fewer pages went than a whole round 0 and
/// the set dirtied during it would have taken (the guest writes every page
/// within round 0's time, so that would be about two per page).
#[test]
fn a_guest_outpacing_the_link_switches_to_post_copy_inside_round_0_and_ends_identical() {
    // 16 MiB/s: round 0 carries the 64 MiB of content in 4 s, and looks at
    // the dirty count after each 16 MiB. The guest writes 64 pages (256 KiB)
    // every 8 ms, 32 MiB/s, through all of its 64 MiB in 2 s.
    let opts = SendOptions {
        bandwidth_limit: Some(16 << 20),
        ..opts(post_copy_policy())
    };
    let wire = Wire {
        guest_pace: Duration::from_millis(8),
        fill: true,
        ..Wire::default()
    };
    let pair = migrate_over(64, 16384, opts, None, wire);
    let result = pair.result.as_ref().unwrap();
    pair.received.as_ref().unwrap();
    assert_eq!(result.mode, ModeUsed::PostCopy);
    assert_eq!(result.rounds, 1);
    assert_post_copy_arrived_intact(&pair);
    let pages = pair.source.pages() as u64;
    assert!(
        result.pages_sent < pages * 3 / 2,
        "{} pages sent for {pages}: round 0 was not cut short",
        result.pages_sent
    );
}

#[test]
fn wrong_version_stream_is_refused_by_the_target() {
    let pair = migrate(
        4,
        0,
        opts(Policy::default()),
        Some(|s| {
            use std::io::Write;
            let mut bytes = protocol::Header::new(Command::Hello, 0).encode();
            bytes[4] = 9;
            s.write_all(&bytes).unwrap();
        }),
    );
    assert!(matches!(
        pair.received,
        Err(MigrationError::Protocol(protocol::ProtocolError::Version(
            9
        )))
    ));
}

#[test]
fn garbage_is_refused_by_the_target() {
    let pair = migrate(
        4,
        0,
        opts(Policy::default()),
        Some(|s| {
            use std::io::Write;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        }),
    );
    assert!(matches!(
        pair.received,
        Err(MigrationError::Protocol(protocol::ProtocolError::Magic(_)))
    ));
}

#[test]
fn target_abort_leaves_the_guest_running_on_the_source() {
    let source = TestVm::new(16);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = source.run_guest(1024, stop.clone());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        // The target refuses to build the VM (say, its disk is full).
        receive::<TestVm, _>(
            Conn::plain(stream),
            |_| Err("no space left on the target".into()),
            &ReceiveOptions::default(),
            &ProgressHandle::default(),
        )
        .map(drop)
    });
    let err = send(
        &*source,
        Conn::plain(TcpStream::connect(addr).unwrap()),
        &opts(Policy::default()),
        &ProgressHandle::default(),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(target.join().unwrap().is_err());
    assert!(
        matches!(&err, MigrationError::PeerAbort(reason) if reason.contains("no space left")),
        "{err:?}"
    );
    // The guest keeps running: its generation still advances.
    assert!(!source.paused.load(Ordering::Relaxed));
    let before = source.generation.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(50));
    assert!(source.generation.load(Ordering::Relaxed) > before);
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
}

/// A test CA writing PEM files for node identities into a scratch directory
/// (made at test time, removed on drop).
struct Pki {
    dir: std::path::PathBuf,
    ca_path: std::path::PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "godwit-pki-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("godwit test CA {tag}"));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, cert.pem()).unwrap();
        Pki {
            dir,
            ca_path,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A node identity with these subject alternative names (IP addresses
    /// become IP SANs), trusting this CA.
    fn node(&self, name: &str, sans: &[&str]) -> TlsFiles {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = TlsFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
            ca: self.ca_path.clone(),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    fn identity(&self, name: &str, sans: &[&str]) -> TlsIdentity {
        TlsIdentity::load(&self.node(name, sans)).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_wire(pki: &Pki) -> Wire {
    Wire {
        source: Some(pki.identity("node-a", &["127.0.0.1", "node-a"])),
        target: Some(pki.identity("node-b", &["127.0.0.1", "node-b"])),
        server_name: "127.0.0.1",
        ..Wire::default()
    }
}

/// After a refused connection: the source's guest still runs.
fn assert_source_runs(pair: &Pair) {
    assert!(!pair.source.paused.load(Ordering::Relaxed));
    let before = pair.source.generation.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let guest = pair.source.run_guest(64, stop.clone());
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    assert!(pair.source.generation.load(Ordering::Relaxed) > before);
}

#[test]
fn tls_busy_guest_converges_and_target_matches_source() {
    let pki = Pki::new("ok");
    let pair = migrate_over(64, 2048, opts(Policy::default()), None, tls_wire(&pki));
    let result = pair.result.unwrap();
    pair.received.unwrap();
    assert!(
        pair.source.bytes() == pair.target.bytes(),
        "target memory differs"
    );
    assert!(result.rounds >= 1);
}

#[test]
fn tls_post_copy_reads_and_writes_one_session_from_two_threads() {
    assert!(Userfault::available(None), "post-copy needs userfaultfd");
    let pki = Pki::new("postcopy");
    let policy = Policy {
        max_downtime: Duration::from_nanos(1),
        allow_auto_converge: false,
        allow_post_copy: true,
        max_rounds: 2,
    };
    let pair = migrate_over(64, 8192, opts(policy), None, tls_wire(&pki));
    let result = pair.result.unwrap();
    pair.received.unwrap();
    assert_eq!(result.mode, ModeUsed::PostCopy);
    assert!(
        pair.source.bytes() == pair.target.bytes(),
        "target memory differs"
    );
}

#[test]
fn tls_target_refuses_a_source_certificate_from_another_ca() {
    let pki = Pki::new("ca");
    let rogue = Pki::new("rogue");
    let mut wire = tls_wire(&pki);
    // The rogue node trusts the real CA, so it would accept the target.
    let mut files = rogue.node("intruder", &["127.0.0.1"]);
    files.ca = pki.ca_path.clone();
    wire.source = Some(TlsIdentity::load(&files).unwrap());
    let pair = migrate_over(8, 64, opts(Policy::default()), None, wire);
    let received = godwit_crds::error_chain(&pair.received.as_ref().unwrap_err());
    assert!(
        received.contains("certificate is not trusted"),
        "target: {received}"
    );
    let sent = godwit_crds::error_chain(&pair.result.as_ref().unwrap_err());
    assert!(
        sent.contains("refused this node's certificate"),
        "source: {sent}"
    );
    assert_source_runs(&pair);
}

#[test]
fn tls_source_refuses_a_target_it_cannot_verify() {
    let pki = Pki::new("src");
    let rogue = Pki::new("rogue-target");
    let mut wire = tls_wire(&pki);
    let mut files = rogue.node("fake-b", &["127.0.0.1"]);
    files.ca = pki.ca_path.clone();
    wire.target = Some(TlsIdentity::load(&files).unwrap());
    let pair = migrate_over(8, 64, opts(Policy::default()), None, wire.clone());
    let sent = godwit_crds::error_chain(&pair.result.as_ref().unwrap_err());
    assert!(
        sent.contains("handshake with the migration target failed") && sent.contains("not trusted"),
        "source: {sent}"
    );
    assert!(pair.received.is_err());
    assert_source_runs(&pair);

    // A certificate from the right CA, but for another name.
    let mut wire = tls_wire(&pki);
    wire.server_name = "node-c";
    let pair = migrate_over(8, 64, opts(Policy::default()), None, wire);
    let sent = godwit_crds::error_chain(&pair.result.as_ref().unwrap_err());
    assert!(sent.contains("not trusted"), "source: {sent}");
    assert_source_runs(&pair);
}

#[test]
fn tls_target_refuses_a_plain_source_and_tells_it_why() {
    let pki = Pki::new("plain");
    let mut wire = tls_wire(&pki);
    wire.source = None;
    let pair = migrate_over(8, 64, opts(Policy::default()), None, wire);
    assert!(
        matches!(
            pair.received,
            Err(MigrationError::Tls(tls::TlsError::PlainPeer))
        ),
        "{:?}",
        pair.received.err()
    );
    assert!(
        matches!(&pair.result, Err(MigrationError::PeerAbort(r)) if r.contains("requires TLS")),
        "{:?}",
        pair.result.as_ref().err()
    );
    assert_source_runs(&pair);
}

#[test]
fn plain_target_refuses_a_tls_source_with_a_hint() {
    let pki = Pki::new("tls-to-plain");
    let mut wire = tls_wire(&pki);
    wire.target = None;
    let pair = migrate_over(8, 64, opts(Policy::default()), None, wire);
    assert!(
        matches!(
            pair.received,
            Err(MigrationError::Protocol(protocol::ProtocolError::TlsPeer))
        ),
        "{:?}",
        pair.received.err()
    );
    let sent = godwit_crds::error_chain(&pair.result.as_ref().unwrap_err());
    assert!(sent.contains("not speaking TLS"), "source: {sent}");
    assert_source_runs(&pair);
}

#[test]
fn tls_target_refuses_a_client_without_a_certificate() {
    let pki = Pki::new("anon");
    let target = pki.identity("node-b", &["127.0.0.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        tls::accept(&stream, &target).map(drop)
    });
    // A client that trusts the CA but has no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(
        rustls::pki_types::CertificateDer::pem_file_iter(&pki.ca_path)
            .unwrap()
            .map(Result::unwrap),
    );
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut client =
        rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // TLS 1.3: the client finishes its side before the server has judged it.
    let _ = client.complete_io(&mut tcp);
    let err = server.join().unwrap().unwrap_err();
    let chain = godwit_crds::error_chain(&err);
    assert!(
        chain.contains("presented no certificate"),
        "target: {chain}"
    );
    let mut buf = [0u8; 16];
    let refused = client.complete_io(&mut tcp).and_then(|_| {
        use std::io::Read;
        client.reader().read(&mut buf)
    });
    assert!(refused.is_err(), "client was not told: {refused:?}");
}

/// A TCP relay between source and target standing for the network: while
/// `cut` is set it holds every byte in both directions and forwards no new
/// connection (as a link that is down does: nothing is refused or reset, it
/// just goes quiet); cleared, everything flows again.
struct Relay {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn new(target: std::net::SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            cut: Arc::default(),
            connections: Arc::default(),
            stop: Arc::default(),
        };
        let (cut, count, stop) = (
            relay.cut.clone(),
            relay.connections.clone(),
            relay.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((near, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                near.set_nonblocking(false).unwrap();
                count.fetch_add(1, Ordering::Relaxed);
                let (cut, stop) = (cut.clone(), stop.clone());
                std::thread::spawn(move || {
                    // A connection made while the link is down waits for it.
                    while cut.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let Ok(far) = TcpStream::connect(target) else {
                        return;
                    };
                    for (from, to) in [
                        (near.try_clone().unwrap(), far.try_clone().unwrap()),
                        (far, near),
                    ] {
                        let (cut, stop) = (cut.clone(), stop.clone());
                        std::thread::spawn(move || Relay::pump(from, to, &cut, &stop));
                    }
                });
            }
        });
        relay
    }

    /// Copies `from` to `to` except while cut; either end closing closes both.
    fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, stop: &AtomicBool) {
        use std::io::{Read, Write};
        from.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut buf = vec![0u8; 64 << 10];
        while !stop.load(Ordering::Relaxed) {
            if cut.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    // Bytes read just before the cut are held until it ends.
                    while cut.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        let _ = from.shutdown(std::net::Shutdown::Both);
        let _ = to.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Recovered {
    pair: Pair,
    connections: u64,
    reconnecting_seen: bool,
}

/// A post-copy migration through a [`Relay`] whose link is cut for `cut_for`
/// (`None`: for good) once the source is in post-copy. Stall timeouts of
/// 1 s, recovery timeout `recover`.
fn post_copy_with_link_cut(cut_for: Option<Duration>, recover: Duration) -> Recovered {
    use super::progress::Stage;
    if !Userfault::available(None) {
        panic!("userfaultfd is not available here; post-copy needs root or vm.unprivileged_userfaultfd=1");
    }
    let source = TestVm::new(64);
    for p in (0..source.pages()).step_by(8) {
        // SAFETY: p < pages.
        unsafe { *source.mem.page(p) = 7 + p as u64 };
    }
    let stop = Arc::new(AtomicBool::new(false));
    let guest = source.run_guest(8192, stop.clone());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = Relay::new(listener.local_addr().unwrap());
    let target_slot: Arc<Mutex<Option<Arc<TestVm>>>> = Arc::default();
    let slot = target_slot.clone();
    let receive_opts = ReceiveOptions {
        stall_timeout: Duration::from_secs(1),
        recover_timeout: recover,
        ..ReceiveOptions::default()
    };
    let target_progress = Arc::new(ProgressHandle::default());
    let tp = target_progress.clone();
    let receiver = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let rejoin = |deadline| {
            super::connect::accept_newest(&listener, None, Duration::from_secs(1), deadline)
        };
        super::receiver::receive_recoverable(
            Conn::plain(stream),
            |hello| {
                let mib = hello.config["mib"].as_u64().unwrap() as usize;
                let vm = TestVm::new(mib);
                *slot.lock().unwrap() = Some(vm.clone());
                Ok(vm)
            },
            &receive_opts,
            &tp,
            Some(&rejoin),
        )
        .map(drop)
    });
    let relay_addr = relay.addr;
    let send_opts = SendOptions {
        vm_name: "test".into(),
        policy: Policy {
            max_downtime: Duration::from_nanos(1),
            allow_auto_converge: false,
            allow_post_copy: true,
            max_rounds: 2,
        },
        // Slow enough that post-copy lasts a few seconds.
        bandwidth_limit: Some(16 << 20),
        stall_timeout: Duration::from_secs(1),
        recover_timeout: recover,
        reconnect: Some(super::session::Reconnect(Arc::new(move |timeout| {
            super::connect::dial(&relay_addr.to_string(), timeout, None)
        }))),
        ..SendOptions::default()
    };
    let progress = Arc::new(ProgressHandle::default());
    let watcher = {
        let (progress, cut) = (progress.clone(), relay.cut.clone());
        std::thread::spawn(move || {
            let ended = || matches!(progress.get().stage, Stage::Failed | Stage::Completed);
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            // Cut once the guest runs on the target.
            while target_progress.get().stage != Stage::PostCopy {
                if std::time::Instant::now() > deadline || ended() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            cut.store(true, Ordering::Relaxed);
            let start = std::time::Instant::now();
            while !ended() {
                if cut_for.is_some_and(|d| start.elapsed() >= d) {
                    cut.store(false, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            cut.store(false, Ordering::Relaxed);
            true
        })
    };
    let result = send(
        &*source,
        Conn::plain(TcpStream::connect(relay.addr).unwrap()),
        &send_opts,
        &progress,
        &AtomicBool::new(false),
    );
    let received = receiver.join().unwrap();
    let cut = watcher.join().unwrap();
    assert!(
        cut,
        "the target never reached post-copy, so the link was never cut"
    );
    // Counted, not polled: a reconnection can be over within milliseconds.
    let reconnecting_seen = progress.get().reconnects > 0;
    stop.store(true, Ordering::Relaxed);
    SourceVm::resume(&*source);
    guest.join().unwrap();
    let target = target_slot.lock().unwrap().clone().unwrap();
    Recovered {
        connections: relay.connections.load(Ordering::Relaxed),
        reconnecting_seen,
        pair: Pair {
            source,
            target,
            result,
            received,
        },
    }
}

#[test]
fn post_copy_resumes_after_the_link_comes_back() {
    let run = post_copy_with_link_cut(Some(Duration::from_secs(3)), Duration::from_secs(30));
    let pair = run.pair;
    let result = pair.result.as_ref().unwrap();
    pair.received.as_ref().unwrap();
    assert_eq!(result.mode, ModeUsed::PostCopy);
    assert!(run.connections >= 2, "never reconnected");
    assert!(
        run.reconnecting_seen,
        "progress never said it was reconnecting"
    );
    // Nothing was lost or corrupted.
    assert_post_copy_arrived_intact(&pair);
}

#[test]
fn post_copy_link_gone_past_the_recovery_timeout_is_reported_on_both_sides() {
    let run = post_copy_with_link_cut(None, Duration::from_secs(2));
    let pair = run.pair;
    for (side, err) in [
        ("source", pair.result.map(drop).unwrap_err()),
        ("target", pair.received.unwrap_err()),
    ] {
        let chain = godwit_crds::error_chain(&err);
        // The cut may come before the source heard Activated (then it
        // cannot know whether the guest ran there: CommitUnknown).
        assert!(
            matches!(
                &err,
                MigrationError::PostCopyLost(inner) | MigrationError::CommitUnknown(inner)
                    if matches!(**inner, MigrationError::LinkNotBack(..))
            ),
            "{side}: {chain}"
        );
        assert!(
            chain.contains("did not come back within 2s"),
            "{side}: {chain}"
        );
    }
    // The target's guest waits on the page it needs: release it so the
    // toucher thread (which faults) can end; the ranges were unregistered.
    let toucher = pair.target.toucher.lock().unwrap().take();
    if let Some(t) = toucher {
        t.join().unwrap();
    }
}
