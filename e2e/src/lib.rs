//! Godwit end-to-end: the local multi-node cluster and its driver, the demo,
//! the fault matrix and the benchmarks. The Kubernetes API test server is
//! the `godwit-apiserver` crate; what VMM-level tests share (the test guest,
//! network namespaces, simulated nodes, VMM and QEMU processes) is the
//! `godwit-testkit` crate.
//!
//! - [`cluster`]: a [`cluster::LocalCluster`] (API server, nodes, operator,
//!   agents);
//! - [`driver`]: a [`driver::ClusterDriver`] drives Godwit on it as a user does;
//! - [`demo`], [`failover`], [`faults`]: scenarios on the driver;
//! - [`bench`]: the benchmarks of the `bench` binary;
//! - [`helm`]: the chart rendered and installed through Helm's SDK.

pub mod bench;
pub mod cluster;
pub mod control_plane;
pub mod demo;
pub mod driver;
pub mod failover;
pub mod faults;
pub mod forwarder;
pub mod helm;
pub mod vmm_watch;
