//! How the agent runs: what the `godwit-node` command line sets.

use std::path::PathBuf;

use super::firewall::Backend;
use super::image_dirs::ImageDirs;
use super::vmm_user::VmmUsers;

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name (the Node object and the `godwit.dev/node` label value).
    pub node: String,
    /// The address migration streams to this node use.
    pub node_ip: String,
    /// Node-local state: VM directories and local disks.
    pub state_dir: PathBuf,
    /// A directory every node sees, for shared disks.
    pub shared_dir: PathBuf,
    /// The `godwit-vmm` binary.
    pub vmm_binary: PathBuf,
    /// Namespace of the node Leases.
    pub lease_namespace: String,
    /// Lease duration.
    pub lease_seconds: i32,
    /// vCPUs offered to VMs.
    pub cpu: u64,
    /// Bytes of memory offered to VMs.
    pub memory_bytes: u64,
    /// Ports incoming migrations listen on (`first..=last`).
    pub migration_ports: (u16, u16),
    /// A migration CA with its key to sign this node's certificate here
    /// (bring your own CA, see [`super::certificates`]).
    pub migration_ca_dir: Option<PathBuf>,
    /// Ask for the node's certificate through the CertificateSigningRequest
    /// API and wait this long for it ([`super::certificates::request`]).
    /// With neither this nor `migration_ca_dir`: plain TCP migrations.
    pub migration_csr: Option<std::time::Duration>,
    /// The certificate lifetime to ask for (`None`: the signer's).
    pub migration_certificate_lifetime: Option<std::time::Duration>,
    /// The users VMMs run as ([`VmmUsers`]); `None`: root.
    pub vmm_users: Option<VmmUsers>,
    /// Where the host's cgroup hierarchy is mounted ([`super::cgroup`]).
    pub cgroup_root: PathBuf,
    /// The cgroup (below the root) holding the VMs' own cgroups.
    pub cgroup_parent: String,
    /// What a VMM may use beyond its guest's memory (its cgroup's limit is
    /// the sum; negative only in tests that want an OOM kill).
    pub vmm_memory_overhead_bytes: i64,
    /// Which iptables adds the node's FORWARD rules ([`super::firewall`]).
    pub iptables: Backend,
    /// Where the files VMs name may be ([`super::image_dirs`]).
    pub image_dirs: ImageDirs,
}
