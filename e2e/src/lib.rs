//! Godwit end-to-end support: the test guest harness, the Kubernetes API test
//! server, the local multi-node cluster and the benchmarks.

pub mod apiserver;
pub mod bench_migrate;
pub mod guest;
pub mod netns;
pub mod qemu;
