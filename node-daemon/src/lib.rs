//! Godwit node daemon: the per-node agent and the KVM VMM it runs.
//!
//! [`vmm`] is the virtual machine monitor behind the `godwit-vmm` binary: one
//! process per VM, built on the rust-vmm crates.

pub mod migration;
pub mod vmm;
