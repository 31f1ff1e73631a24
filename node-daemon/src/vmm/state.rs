//! The snapshot format and the one save/restore trait every stateful part
//! implements.
//!
//! A snapshot is a directory:
//! - `state.json`: a [`VmmSnapshot`] (version, VM config, memory layout,
//!   VM/vCPU/device state),
//! - `memory.bin`: guest RAM, regions back to back at the offsets in
//!   [`MemoryState`]; all-zero pages are holes (the file is sparse).
//!
//! Restore order (see [`restore`]): memory, PIC/IOAPIC/PIT, vCPUs (each in
//! the order documented on [`Vcpu::restore`]), devices, then the KVM clock
//! last, right before the vCPUs run.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::devices::{Devices, DevicesState};
use super::memory::{self, MemoryError, MemoryState};
use super::vcpu::{Vcpu, VcpuError, VcpuState};
use super::vm::{self, VmError, VmState};
use super::{VirtioError, VmConfig, Vmm};

/// Current snapshot format version.
pub const SNAPSHOT_VERSION: u32 = 1;
/// Oldest snapshot version this build restores.
pub const SNAPSHOT_MIN_VERSION: u32 = 1;
/// State file name inside a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// Memory file name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";

/// Errors of snapshots.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The snapshot directory could not be created.
    #[error("Cannot create snapshot directory {0}")]
    CreateDir(String, #[source] std::io::Error),
    /// state.json could not be written.
    #[error("Cannot write snapshot state")]
    WriteState(#[source] std::io::Error),
    /// state.json could not be read.
    #[error("Cannot read snapshot {0}; check the --restore directory")]
    ReadState(String, #[source] std::io::Error),
    /// state.json does not parse.
    #[error("Snapshot state does not parse")]
    ParseState(#[source] serde_json::Error),
    /// Unsupported version.
    #[error("Snapshot version {0} is not supported (this build reads {SNAPSHOT_MIN_VERSION}..={SNAPSHOT_VERSION})")]
    Version(u32),
    /// Snapshot and VM disagree on the vCPU or device count.
    #[error("Snapshot does not match the VM built from its config")]
    Mismatch,
    /// Memory save/restore failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU save/restore failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// VM save/restore failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Device restore failed.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// The serial state cannot be restored.
    #[error(transparent)]
    Serial(#[from] crate::vmm::devices::serial::SerialError),
}

/// Saved and restored through one trait, so snapshots, migration and daemon
/// restarts share the code.
pub trait Persist {
    /// The plain, versioned state.
    type State: Serialize + for<'de> Deserialize<'de>;
    /// What can fail.
    type Error;
    /// Captures the state (the VM must be paused).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Puts a captured state back.
    fn restore(&self, state: &Self::State) -> Result<(), Self::Error>;
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Error = VcpuError;
    fn save(&self) -> Result<VcpuState, VcpuError> {
        Vcpu::save(self)
    }
    fn restore(&self, s: &VcpuState) -> Result<(), VcpuError> {
        Vcpu::restore(self, s)
    }
}

impl Persist for Devices {
    type State = DevicesState;
    type Error = StateError;
    fn save(&self) -> Result<DevicesState, StateError> {
        Ok(Devices::save(self))
    }
    fn restore(&self, s: &DevicesState) -> Result<(), StateError> {
        if s.virtio.len() != self.virtio.len() {
            return Err(StateError::Mismatch);
        }
        crate::vmm::devices::serial::restore(&self.serial, &s.serial)?;
        for (t, st) in self.virtio.iter().zip(&s.virtio) {
            t.lock().unwrap().restore(st)?;
        }
        // A snapshot without GED state (older, or taken without ACPI)
        // leaves the GED as built: no event pending.
        if let (Some(g), Some(st)) = (&self.ged, &s.ged) {
            g.lock().unwrap().restore(st);
        }
        Ok(())
    }
}

/// Everything in `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmmSnapshot {
    /// Format version ([`SNAPSHOT_VERSION`] when written).
    pub version: u32,
    /// The VM's configuration.
    pub config: VmConfig,
    /// Memory layout of `memory.bin`.
    pub memory: MemoryState,
    /// PIC, IOAPIC, PIT, kvmclock.
    pub vm: VmState,
    /// One per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DevicesState,
}

impl VmmSnapshot {
    /// Reads `dir/state.json`, checking the version.
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let p = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&p)
            .map_err(|e| StateError::ReadState(p.display().to_string(), e))?;
        let snap: VmmSnapshot = serde_json::from_str(&text).map_err(StateError::ParseState)?;
        if !(SNAPSHOT_MIN_VERSION..=SNAPSHOT_VERSION).contains(&snap.version) {
            return Err(StateError::Version(snap.version));
        }
        Ok(snap)
    }
}

/// Captures the whole VM state with the memory layout (no memory bytes).
/// The VM must be paused.
pub fn capture(vmm: &Vmm) -> Result<VmmSnapshot, StateError> {
    let vm_state = vm::save(&vmm.vm)?;
    let vcpus = vmm
        .vcpus
        .vcpus
        .iter()
        .map(|v| Persist::save(&*v.lock().unwrap()))
        .collect::<Result<Vec<_>, _>>()?;
    let devices = Persist::save(&*vmm.devices)?;
    Ok(VmmSnapshot {
        version: SNAPSHOT_VERSION,
        config: vmm.config.clone(),
        memory: memory::layout(&vmm.mem),
        vm: vm_state,
        vcpus,
        devices,
    })
}

impl VmmSnapshot {
    /// Serialises the state (what `state.json` holds; also the migration
    /// engine's device/vCPU state message).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("snapshot state serialises")
    }

    /// Parses [`VmmSnapshot::to_bytes`] output, checking the version.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let snap: VmmSnapshot = serde_json::from_slice(bytes).map_err(StateError::ParseState)?;
        if !(SNAPSHOT_MIN_VERSION..=SNAPSHOT_VERSION).contains(&snap.version) {
            return Err(StateError::Version(snap.version));
        }
        Ok(snap)
    }
}

/// Writes a snapshot of the paused `vmm` into `dir`.
pub fn save(vmm: &Vmm, dir: &Path) -> Result<(), StateError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StateError::CreateDir(dir.display().to_string(), e))?;
    let snap = capture(vmm)?;
    memory::save_to_file(&vmm.mem, &dir.join(MEMORY_FILE))?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, snap.to_bytes()).map_err(StateError::WriteState)?;
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(StateError::WriteState)?;
    Ok(())
}

/// Restores `snap` into a VM built for it whose memory is already filled
/// and whose vCPUs have not run.
pub fn restore(vmm: &Vmm, snap: &VmmSnapshot) -> Result<(), StateError> {
    if snap.vcpus.len() != vmm.vcpus.vcpus.len() {
        return Err(StateError::Mismatch);
    }
    vm::restore_chips(&vmm.vm, &snap.vm)?;
    for (v, s) in vmm.vcpus.vcpus.iter().zip(&snap.vcpus) {
        Persist::restore(&*v.lock().unwrap(), s)?;
    }
    Persist::restore(&*vmm.devices, &snap.devices)?;
    vm::restore_clock(&vmm.vm, &snap.vm)?;
    Ok(())
}
