//! Godwit's test kit for VMM-level tests: what a test of `godwit-vmm` (or of
//! the node agent driving it) needs around the VMM, and nothing of Godwit
//! itself, so that the node daemon's tests can use it without a cycle.
//!
//! - [`guest`]: the test guest seen from the host (its ELF, its console,
//!   its line formats and disk patterns, its heartbeat server);
//! - [`netns`]: network namespaces, veth pairs, bridges, taps, shaping;
//! - [`nodes`]: simulated nodes on one L2 segment (a [`nodes::Fabric`]);
//! - [`vmmproc`]: `godwit-vmm` processes driven from outside;
//! - [`qemu`]: QEMU/KVM running the same guest, as a reference;
//! - [`ca`]: a migration CA as the chart makes one;
//! - [`process`]: whether a process still runs.

pub mod ca;
pub mod guest;
pub mod netns;
pub mod nodes;
pub mod process;
pub mod qemu;
pub mod vmmproc;
