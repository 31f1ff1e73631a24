//! The node agent: Godwit's hands on one node.
//!
//! It renews the node's Lease, publishes what the node offers VMs, watches the
//! VMs and migrations labelled for its node, and makes the node match them:
//! starts, stops and re-attaches to VMM processes, drives its side of each
//! migration through the VMM control socket, and reports what happened into
//! the objects' status and as Events. It talks to the operator only through
//! API objects; `godwit_crds::contract` says who writes what.
//!
//! The loop is level-triggered ([`pass`]): every change seen by a watch, and
//! a tick every second, runs one pass that compares every VM and migration
//! with the node's VM directories ([`vm_dir`]) and carries out what the pure
//! functions in [`decide`] say. A pass that fails half-way is simply redone.
//!
//! | module | owns |
//! | --- | --- |
//! | [`pass`] | the wiring (watches, tasks) and the pass loop |
//! | [`lease`] | Lease renewal and self-fencing |
//! | [`godwit_node`], [`usage`] | what the node offers, and what its VMs use, in its `GodwitNode` |
//! | [`decide`] | the node's local decisions, pure |
//! | [`vm_reconcile`], [`restart`], [`pause`] | a VM's VMM and the VM's status |
//! | [`migrate`] | this node's side of live and cold migrations |
//! | [`report`] | a migration's status and Events, from the engine's figures |
//! | [`vm_dir`] | a VM's directories on the node and what they say |
//! | [`disks`] | a VM's disk files |
//! | [`boot`] | the kernel a VM boots (its own, or its image's: `fromImage`) |
//! | [`image_dirs`] | where VMs' files may come from, opened beneath it |
//! | [`seed`] | a VM's cloud-init NoCloud seed disk |
//! | [`vmm_process`], [`vmm_user`] | starting and stopping VMM processes, as their own users |
//! | [`cgroup`] | each VMM's own cgroup: limits, OOM kills, adoption |
//! | [`firewall`] | the node's FORWARD rules for VM taps (`br_netfilter` nodes) |
//! | [`certificates`] | the node's migration certificate |
//! | [`console`], [`metrics`] | the console relay and the metrics endpoint |

pub mod boot;
pub mod certificates;
pub mod cgroup;
pub mod cluster_templates;
mod config;
pub mod console;
mod context;
pub mod decide;
pub mod disks;
pub mod firewall;
mod godwit_node;
pub mod image_dirs;
pub mod lease;
pub mod metrics;
mod migrate;
mod pass;
pub mod pause;
mod report;
pub mod restart;
pub mod seed;
pub mod usage;
pub mod vm_dir;
mod vm_reconcile;
pub mod vmm_process;
pub mod vmm_user;

pub use config::AgentConfig;
pub use lease::{renew_period, RESTART_AFTER_FENCE};
pub use pass::{run, AgentError};
