//! Godwit end-to-end support: the test guest harness, the Kubernetes API test
//! server, the local multi-node cluster and the benchmarks.

pub mod bench_migrate;
pub mod bench_storage;
pub mod bench_storage_migrate;
pub mod cluster;
pub mod demo;
pub mod failover;
pub mod faults;
pub mod guest;
pub mod helm;
pub mod netns;
pub mod nodes;
pub mod qemu;
pub mod vmmproc;
