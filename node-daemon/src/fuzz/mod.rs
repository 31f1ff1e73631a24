//! Entry points for the fuzz targets in `fuzz/` (and for the regression tests
//! of what they found). Each takes arbitrary bytes from a peer we do not trust
//! and must answer with an error, never a panic, an abort or an allocation
//! the input did not pay for:
//!
//! - [`migration_stream`]: a migration stream as the target reads it, frame
//!   by frame: header checks, every payload parser, and page runs written
//!   into guest memory (two small regions with a hole between them);
//! - [`saved_state`]: `state.json` of a snapshot, or the State message of a
//!   migration;
//! - [`control_request`]: one line on a VMM's control socket.
//!
//! The guest is the other untrusted peer: whatever it writes to a device
//! register or lays out in its memory, a device answers as hardware would,
//! with an error status, NEEDS_RESET or an ignored write. The device targets
//! build the devices without KVM (guest memory is a small mapping, the tap
//! a socket pair, the disk a 64 KiB raw file) and decode their input as a
//! list of ops with [`input::Input`]:
//!
//! - [`virtio_queue`]: split-virtqueue state, descriptor tables and rings,
//!   walked as the devices walk them;
//! - [`virtio_blk`]: virtio-blk requests against a real image file;
//! - [`virtio_net`]: virtio-net TX and RX buffers and headers;
//! - [`virtio_mmio`]: virtio-mmio register sequences with the block or net
//!   device behind them, and transport state restores;
//! - [`port_io`]: COM1, the i8042 and the debug-exit port;
//! - [`acpi_registers`]: the GED window (event selector, sleep control and
//!   status, reset), checked against a model.
//!
//! Each returns a small outcome that the replay test
//! (`node-daemon/tests/fuzz_replay.rs`) checks for the inputs that once
//! broke a device.

mod block;
mod input;
mod mmio;
mod net;
mod ports;
mod queue;

pub use block::{virtio_blk, BlockOutcome, IMAGE_SIZE, NO_STATUS};
pub use mmio::{virtio_mmio, MmioOutcome};
pub use net::{virtio_net, NetOutcome};
pub use ports::{acpi_registers, port_io, AcpiOutcome, PortOutcome};
pub use queue::{virtio_queue, QueueOutcome};

use crate::migration::guest::GuestRegion;
use crate::migration::protocol::{self, Command, Hello, HelloAck, PAGE_SIZE};
use crate::migration::session::TargetMemory;

/// Guest RAM of the fuzzed target: 16 pages at 0 and 16 pages at 1 MiB.
const REGIONS: [(u64, usize); 2] = [(0, 16 * PAGE_SIZE), (1 << 20, 16 * PAGE_SIZE)];

/// Reads frames from `data` until it ends or a frame is refused.
pub fn migration_stream(data: &[u8]) {
    let mut buffers: Vec<Vec<u8>> = REGIONS.iter().map(|(_, len)| vec![0u8; *len]).collect();
    let regions = REGIONS
        .iter()
        .zip(buffers.iter_mut())
        .map(|((gpa, len), buf)| GuestRegion {
            gpa: *gpa,
            size: *len as u64,
            host: buf.as_mut_ptr(),
        })
        .collect();
    let mut memory = TargetMemory::new(regions);
    let mut reader = data;
    let mut payload = Vec::new();
    while let Ok(header) = protocol::read_frame(&mut reader, &mut payload) {
        let ok = match header.command {
            Command::Hello => protocol::parse_json::<Hello>(header.command, &payload).is_ok(),
            Command::HelloAck => protocol::parse_json::<HelloAck>(header.command, &payload).is_ok(),
            Command::Pages => memory.apply(&payload).is_ok(),
            Command::RoundEnd => protocol::parse_round_end(&payload).is_ok(),
            Command::DiskBlocks => protocol::parse_disk_blocks(&payload).is_ok(),
            Command::Resume => {
                protocol::parse_json::<protocol::Resume>(header.command, &payload).is_ok()
            }
            Command::ResumeAck => protocol::parse_resume_ack(&payload).is_ok(),
            Command::State => {
                saved_state(&payload);
                true
            }
            Command::PageRequest => protocol::parse_page_request(&payload)
                .map(|gpas| {
                    gpas.iter()
                        .all(|g| memory.find(*g, PAGE_SIZE as u64).is_ok())
                })
                .unwrap_or(false),
            Command::PostCopy | Command::Discard => protocol::parse_page_runs(&payload)
                .map(|runs| {
                    runs.iter().all(|(gpa, pages)| {
                        memory
                            .find(*gpa, u64::from(*pages) * PAGE_SIZE as u64)
                            .is_ok()
                    })
                })
                .unwrap_or(false),
            Command::Complete
            | Command::Ready
            | Command::Commit
            | Command::Activated
            | Command::Discarded
            | Command::Abort => true,
        };
        if !ok {
            break;
        }
    }
    drop(memory);
    drop(buffers);
}

/// Parses a snapshot's state as a restore would, before touching KVM.
pub fn saved_state(data: &[u8]) {
    if let Ok(snap) = crate::vmm::state::VmmSnapshot::from_bytes(data) {
        // Whatever parsed must serialize back (a snapshot of it is taken again
        // after a restore).
        let _ = snap.to_bytes();
    }
}

/// Parses one control-socket line.
pub fn control_request(data: &[u8]) {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = godwit_vmm_control::parse_request(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(command: Command, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        protocol::write_frame(&mut out, command, payload).unwrap();
        out
    }

    #[test]
    fn seeds_run_without_panicking() {
        let mut pages = protocol::PageBatch::with_capacity(8 * PAGE_SIZE);
        pages.push_data(4096, &[7u8; PAGE_SIZE]);
        pages.push_zero(1 << 20, 3);
        let mut stream = frame(Command::Pages, pages.as_bytes());
        stream.extend(frame(Command::RoundEnd, &protocol::encode_round_end(1, 4)));
        stream.extend(frame(
            Command::PostCopy,
            &protocol::encode_page_runs(&[(0, 2)]),
        ));
        stream.extend(frame(Command::Commit, &[]));
        migration_stream(&stream);
        // A run that ends past its region, one in the hole, one that wraps.
        for gpa in [15 * 4096u64, 17 * 4096, !4095] {
            let mut bad = protocol::PageBatch::with_capacity(PAGE_SIZE);
            bad.push_zero(gpa, 2);
            migration_stream(&frame(Command::Pages, bad.as_bytes()));
        }
        saved_state(b"{\"version\":1}");
        saved_state(&[0xff; 8]);
        control_request(b"{\"v\":1,\"cmd\":\"status\"}");
        control_request(b"{\"v\":4294967297,\"cmd\":\"status\"}");
        control_request(&[0xc3, 0x28]);
    }

    #[test]
    fn control_version_does_not_wrap() {
        // 2^32 + 1 once truncated to 1 and passed as the current version.
        let err =
            godwit_vmm_control::parse_request("{\"v\":4294967297,\"cmd\":\"status\"}").unwrap_err();
        assert!(err.contains("Unsupported API version 4294967297"), "{err}");
    }
}
