//! [`virtio_queue`]: the split-virtqueue walk every device runs, over
//! queue state, descriptor tables and rings the input chooses.

use virtio_queue::QueueT;

use super::input::{guest_memory, patch_memory, Desc, Driver, Input};
use crate::vmm::devices::virtio::{chains_per_notify, VirtqueueState, QUEUE_MAX_SIZE};

/// What one run of [`virtio_queue`] saw.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// The queue state from the input was accepted.
    pub restored: bool,
    /// Descriptor chains popped.
    pub chains: usize,
    /// Descriptors those chains yielded.
    pub descriptors: usize,
}

/// Builds a queue from the input's header (as a snapshot restore does: max
/// size, size, ring indices, EVENT_IDX, table and ring addresses), then runs
/// its ops until the input ends:
///
/// | op | what |
/// | --- | --- |
/// | 0 | patch guest memory |
/// | 1 | the driver adds a chain of 1 to 8 descriptors |
/// | 2 | the device pops every available chain, walks it, returns it used |
/// | 3 | enable notifications, ask whether the driver needs one |
/// | 4 | disable notifications, turn EVENT_IDX on or off |
pub fn virtio_queue(data: &[u8]) -> QueueOutcome {
    let mut input = Input::new(data);
    let mem = guest_memory();
    // Mostly the sizes a restore accepts (1 to 256); now and then any
    // value, which a restore above QUEUE_MAX_SIZE must refuse.
    let shape = input.u8();
    let max_size = if shape & 0x80 != 0 {
        input.u16()
    } else {
        1u16 << (shape % 9)
    };
    let size_byte = input.u8();
    let size = if size_byte & 0x80 != 0 {
        input.u16()
    } else {
        max_size >> (size_byte & 3)
    };
    let state = VirtqueueState {
        max_size,
        size,
        next_avail: input.u16(),
        next_used: input.u16(),
        event_idx_enabled: input.u8() & 1 != 0,
        ready: true,
        desc_table: input.gpa(),
        avail_ring: input.gpa(),
        used_ring: input.gpa(),
    };
    let mut out = QueueOutcome::default();
    let Ok(mut q) = state.restore() else {
        return out;
    };
    assert!(q.max_size() <= QUEUE_MAX_SIZE, "restored {}", q.max_size());
    out.restored = true;
    let mut driver =
        Driver::new(state.desc_table, state.avail_ring, q.size()).with_avail_idx(state.next_avail);
    while !input.is_empty() {
        match input.u8() % 5 {
            0 => patch_memory(&mem, &mut input),
            1 => {
                let n = 1 + usize::from(input.u8() % 8);
                let descs: Vec<Desc> = (0..n).map(|_| Desc::from_input(&mut input)).collect();
                driver.add(&mem, &descs);
            }
            2 => {
                let used_len = input.u32();
                // As the devices do: at most one queue's worth per
                // notification (a ring the device refills itself, its used
                // ring over the available index, would keep a vCPU here
                // forever).
                for _ in 0..chains_per_notify(&q) {
                    let Some(chain) = q.pop_descriptor_chain(&mem) else {
                        break;
                    };
                    let head = chain.head_index();
                    let (mut n, mut total) = (0usize, 0u64);
                    for d in chain {
                        n += 1;
                        total += u64::from(d.len());
                    }
                    assert!(n <= usize::from(q.size()) + usize::from(u16::MAX));
                    assert!(total <= u64::from(u32::MAX));
                    out.chains += 1;
                    out.descriptors += n;
                    let _ = q.add_used(&mem, head, used_len);
                }
            }
            3 => {
                let _ = q.enable_notification(&mem);
                let _ = q.needs_notification(&mem);
            }
            _ => {
                let _ = q.disable_notification(&mem);
                q.set_event_idx(input.u8() & 1 != 0);
            }
        }
    }
    out
}
