//! Replays the fuzz targets' inputs on the stable toolchain, without a
//! sanitizer: the seed corpus (`fuzz/seeds.py` writes it into a temporary
//! directory) and every input that once broke a device
//! (`tests/fuzz_inputs/<target>/<name>`). Each must run to the end
//! without a large allocation, and some must give the answer a real device
//! gives.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use godwit_node::fuzz;
use godwit_node::vmm::devices::GuestExit;

/// The system allocator, noting the largest single allocation each thread
/// makes: an input must not make a device allocate what it did not pay
/// for (a guest's descriptor length is not memory it has).
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to `System` unchanged; the bookkeeping
// touches only a const-initialised thread-local `Cell`, which allocates
// nothing.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is `System`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// No device allocates more than this at once for one input (a 64 KiB
/// frame, a 64 KiB disk, a chain's descriptors).
const MAX_ALLOCATION: usize = 1 << 20;

/// Runs one target's entry point; returns its outcome as text.
fn run(target: &str, data: &[u8]) -> String {
    LARGEST.with(|l| l.set(0));
    let outcome = outcome(target, data);
    let largest = LARGEST.with(Cell::get);
    assert!(
        largest <= MAX_ALLOCATION,
        "{target}: an input of {} bytes made an allocation of {largest} bytes",
        data.len()
    );
    outcome
}

fn outcome(target: &str, data: &[u8]) -> String {
    match target {
        "migration_stream" => format!("{:?}", fuzz::migration_stream(data)),
        "saved_state" => format!("{:?}", fuzz::saved_state(data)),
        "control_request" => format!("{:?}", fuzz::control_request(data)),
        "virtio_queue" => format!("{:?}", fuzz::virtio_queue(data)),
        "virtio_blk" => format!("{:?}", fuzz::virtio_blk(data)),
        "virtio_net" => format!("{:?}", fuzz::virtio_net(data)),
        "virtio_mmio" => format!("{:?}", fuzz::virtio_mmio(data)),
        "port_io" => format!("{:?}", fuzz::port_io(data)),
        "acpi_registers" => format!("{:?}", fuzz::acpi_registers(data)),
        // Not a node-daemon target (the test API server's).
        "apiserver_request" => String::new(),
        other => panic!("no entry point for fuzz target {other}; add it here"),
    }
}

/// Every file under `dir/<target>/`, by target.
fn inputs(dir: &Path) -> BTreeMap<String, Vec<(String, Vec<u8>)>> {
    let mut out = BTreeMap::new();
    let Ok(targets) = std::fs::read_dir(dir) else {
        return out;
    };
    for t in targets.flatten() {
        let target = t.file_name().to_string_lossy().into_owned();
        let mut files: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|f| {
                let name = f.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(f.path()).unwrap())
            })
            .collect();
        files.sort();
        out.insert(target, files);
    }
    out
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn seeds_replay() {
    let dir = std::env::temp_dir().join(format!("godwit-fuzz-seeds-{}", std::process::id()));
    let status = std::process::Command::new("python3")
        .arg(repo().join("fuzz/seeds.py"))
        .arg(&dir)
        .status()
        .expect("python3 runs fuzz/seeds.py");
    assert!(status.success(), "fuzz/seeds.py failed");
    let seeds = inputs(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    for target in [
        "virtio_queue",
        "virtio_blk",
        "virtio_net",
        "virtio_mmio",
        "port_io",
        "acpi_registers",
    ] {
        assert!(seeds.contains_key(target), "no seeds for {target}");
    }
    let mut outcomes = BTreeMap::new();
    for (target, files) in &seeds {
        for (name, data) in files {
            outcomes.insert(format!("{target}/{name}"), run(target, data));
        }
    }
    // The seeds are well-formed: they must do what a guest meant.
    let q = fuzz::virtio_queue(&read(&seeds, "virtio_queue", "seed-walk"));
    assert_eq!((q.restored, q.chains, q.descriptors), (true, 2, 4));
    let q = fuzz::virtio_queue(&read(&seeds, "virtio_queue", "seed-indirect"));
    assert_eq!(
        (q.chains, q.descriptors),
        (1, 2),
        "an indirect table of two"
    );
    let b = fuzz::virtio_blk(&read(&seeds, "virtio_blk", "seed-rw"));
    assert_eq!(
        b.statuses,
        [0, 0, 0, 0],
        "write, read, flush, get-id succeed"
    );
    let b = fuzz::virtio_blk(&read(&seeds, "virtio_blk", "seed-edges"));
    assert_eq!(b.statuses[0], 1, "a read past the end is an I/O error");
    let b = fuzz::virtio_blk(&read(&seeds, "virtio_blk", "seed-read_only"));
    assert_eq!(
        b.statuses,
        [1],
        "a write to a read-only disk is an I/O error"
    );
    let n = fuzz::virtio_net(&read(&seeds, "virtio_net", "seed-tx"));
    assert_eq!(n.sent, [60, 40]);
    let n = fuzz::virtio_net(&read(&seeds, "virtio_net", "seed-rx"));
    assert_eq!(n.received, [72, 72]);
    let m = fuzz::virtio_mmio(&read(&seeds, "virtio_mmio", "seed-net"));
    assert_eq!((m.status, m.frames), (15, 1), "DRIVER_OK, one frame sent");
    let p = fuzz::port_io(&read(&seeds, "port_io", "seed-exits"));
    assert_eq!(p.exits, [GuestExit::Reset, GuestExit::Poweroff(0x31)]);
    let a = fuzz::acpi_registers(&read(&seeds, "acpi_registers", "seed-sleep"));
    assert_eq!(a.exits, [GuestExit::AcpiS5, GuestExit::Reset]);
    println!("{} seeds replayed", outcomes.len());
}

fn read(seeds: &BTreeMap<String, Vec<(String, Vec<u8>)>>, target: &str, name: &str) -> Vec<u8> {
    seeds[target]
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no seed {target}/{name}"))
        .1
        .clone()
}

#[test]
fn crash_inputs_replay() {
    // GODWIT_FUZZ_INPUTS=dir replays another tree of the same shape (a
    // new crash: copy fuzz/artifacts/<target>/crash-* to dir/<target>/).
    let dir = std::env::var_os("GODWIT_FUZZ_INPUTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_inputs"));
    let mut n = 0;
    for (target, files) in inputs(&dir) {
        for (name, data) in files {
            let outcome = run(&target, &data);
            if let Some(check) = regression(&target, &name) {
                check(&data, &outcome);
            }
            n += 1;
        }
    }
    println!("{n} crash inputs replayed");
}

/// What a regression input must give beyond not breaking the device.
type Check = fn(&[u8], &str);

fn regression(target: &str, name: &str) -> Option<Check> {
    Some(match (target, name) {
        // Sector 2^55: its byte offset wrapped to 0 and the write landed
        // on sector 0; a sector past the end is an I/O error.
        ("virtio_blk", "sector-wraps-to-zero") => |data, _| {
            assert_eq!(fuzz::virtio_blk(data).statuses, [1]);
        },
        // A request whose end wraps past 2^64.
        ("virtio_blk", "end-wraps") => |data, _| {
            assert_eq!(fuzz::virtio_blk(data).statuses, [1]);
        },
        // A TX descriptor of 4 GiB - 1 with no guest memory behind it: the
        // frame buffer grew to 4 GiB before the read failed. (`run` checks
        // the allocation; nothing may be sent.)
        ("virtio_net", "tx-4gib-descriptor") => |data, _| {
            assert!(fuzz::virtio_net(data).sent.is_empty());
        },
        // 65 bytes of pending serial input in a saved state (the FIFO holds
        // 64): the restore panicked; it must be refused.
        ("port_io", "restore-overfull-fifo") => |data, _| {
            assert_eq!(fuzz::port_io(data).refused, 1);
        },
        // A net transport state without queues: the RX thread indexes
        // queue 0. (The harness asserts the queue count after a restore
        // that succeeds; the state must be refused.)
        ("virtio_mmio", "restore-without-queues") => |data, _| {
            assert_eq!(
                fuzz::virtio_mmio(data).status,
                15,
                "the refused state left DRIVER_OK"
            );
        },
        // A restored queue with the used index one ahead of the next
        // available one and the used ring over the available index: every
        // completion made another chain available and the device loop
        // never ended. Now one queue's worth (16) per notification.
        ("virtio_queue", "used-ring-over-avail-index") => |data, _| {
            let q = fuzz::virtio_queue(data);
            assert!(q.restored);
            assert!(q.chains > 0 && q.chains <= 16, "{q:?}");
        },
        // A restored queue of 4096 (the fuzzer's harness allowed up to
        // 32768): one notification walked up to 4096 chains of up to 65535
        // descriptors each, over 10 s. A restore above the devices' 256 is
        // refused.
        ("virtio_queue", "max-size-4096") => |data, _| {
            assert!(!fuzz::virtio_queue(data).restored);
        },
        _ => return None,
    })
}
