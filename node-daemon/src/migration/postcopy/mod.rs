//! Post-copy, the phase after pre-copy when pre-copy does not converge: the
//! guest resumes on the target before all of its memory has arrived. The target registers guest RAM with userfaultfd; a page the guest
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
//! (`recovery::connection_lost`):
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
//!
//! ## Layout
//!
//! - [`source`]: the source after the switch: sends the state and the list
//!   of missing pages, pushes them in order and serves requested ones first;
//! - [`target`]: the target after the switch: the fault thread (asks for
//!   missing pages, zero-fills never-sent ones) and the receive thread
//!   (installs pages), around restoring and resuming the guest;
//! - [`recovery`]: what both ends do when the link is lost (which errors
//!   count as a lost link, the `Resume` / `ResumeAck` exchange);
//! - [`needed`]: the target's record of the pages still on the source.
//!
//! The userfaultfd calls themselves are in [`super::userfaultfd`].
//!
//! [`RECOVER_TIMEOUT`]: super::session::RECOVER_TIMEOUT

pub mod needed;
pub mod recovery;
pub mod source;
pub mod target;
