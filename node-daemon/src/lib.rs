//! Godwit node daemon: the per-node agent and the KVM VMM it runs.
//!
//! [`vmm`] is the virtual machine monitor behind the `godwit-vmm` binary: one
//! process per VM, built on the rust-vmm crates. [`migration`] moves a running
//! VM between two VMM processes. [`agent`] is the node agent behind the
//! `godwit-node` binary: it makes the node run what the API says.

pub mod agent;
#[doc(hidden)]
pub mod fuzz;
pub mod migration;
pub mod storage;
pub mod vmm;
