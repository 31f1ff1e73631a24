//! What a migration may use: its policy (the migration's own, over the
//! VM's) and a free port for the receiving side.

use std::time::Instant;

use godwit_crds::{MigrationPolicy, VMMigration, VirtualMachine};

/// Migration `m`'s policy: what it sets, else what its VM sets.
pub fn policy(m: &VMMigration, vm: Option<&VirtualMachine>) -> MigrationPolicy {
    let from_vm = vm
        .and_then(|v| v.spec.migration_policy.clone())
        .unwrap_or_default();
    m.spec.policy.clone().unwrap_or_default().or(&from_vm)
}

/// A port in `range` nothing listens on at `ip`.
pub fn free_port(ip: &str, range: (u16, u16)) -> Option<u16> {
    // Start at a different place each time so two preparations in a row do
    // not race for the same port.
    let span = u32::from(range.1 - range.0) + 1;
    let start = (std::process::id() ^ Instant::now().elapsed().subsec_nanos() ^ rand_seed()) % span;
    (0..span)
        .map(|i| range.0 + ((start + i) % span) as u16)
        .find(|p| std::net::TcpListener::bind((ip, *p)).is_ok())
}

fn rand_seed() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
