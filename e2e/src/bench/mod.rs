//! The benchmarks of the `bench` binary that are more than a loop in it:
//! each prints numbers (a table row or a JSON line per run) and asserts
//! nothing about time.
//!
//! - [`migrate`]: live migration, godwit-vmm against QEMU/KVM;
//! - [`storage`]: provisioning a disk from a cached template;
//! - [`storage_migrate`]: live storage migration against a memory-only one.
//!
//! The failover benchmark is [`crate::failover`], shared with the HA test.

pub mod migrate;
pub mod storage;
pub mod storage_migrate;
