//! Live migration of this VMM's VM, the VMM's side of the migration
//! engine ([`crate::migration`]): the engine's guest traits for our VM
//! ([`SourceVm`] for a running [`Vmm`]; [`TargetVm`] for an [`IncomingVm`],
//! a VM built on the target from the source's configuration with its
//! memory left for the stream to fill), an outgoing migration on its own
//! thread ([`start_outgoing`], [`OutgoingMigration`]), and the incoming one
//! ([`receive_incoming`]). What the node lends this VMM (its taps, disk
//! paths and `/dev/userfaultfd`) reaches the engine from here.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::handover;
use super::state::VmmSnapshot;
use super::vm::VmExit;
use super::{BuildMode, RuntimeConfig, VmConfig, Vmm};
use crate::migration::connect::{self, OutgoingTls};
use crate::migration::tls::TlsIdentity;
use crate::migration::{
    receiver, sender, DirtyPages, GuestError, GuestRegion, MigrationError, MigrationSummary,
    ProgressHandle, ReceiveOptions, Reconnect, SendOptions, SourceVm, TargetVm,
};

fn regions_of(vmm: &Vmm) -> Vec<GuestRegion> {
    vmm.regions()
        .into_iter()
        .map(|(gpa, size, host)| GuestRegion { gpa, size, host })
        .collect()
}

impl SourceVm for Vmm {
    fn regions(&self) -> Vec<GuestRegion> {
        regions_of(self)
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("VM config serializes")
    }

    fn set_dirty_log(&self, on: bool) -> Result<(), GuestError> {
        Vmm::set_dirty_log(self, on).map_err(Into::into)
    }

    fn take_dirty(&self) -> Result<Vec<DirtyPages>, GuestError> {
        Ok(Vmm::take_dirty(self)?
            .into_iter()
            .map(|d| DirtyPages {
                gpa: d.gpa,
                bitmap: d.bitmap,
            })
            .collect())
    }

    fn dirty_count(&self) -> Result<Option<u64>, GuestError> {
        Ok(Vmm::peek_dirty_count(self)?)
    }

    fn populated(&self, region: &GuestRegion, first: u64, count: u64) -> Option<Vec<u64>> {
        // Guest RAM is anonymous private memory of this process
        // (`memory::create`): a page the page table does not hold is zero.
        let offset = first * super::memory::PAGE_SIZE;
        crate::migration::pagemap::populated(region.host_ptr(region.gpa + offset), count)
    }

    fn pause(&self) {
        Vmm::pause(self)
    }

    fn resume(&self) {
        Vmm::resume(self)
    }

    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        let snap = Vmm::save_state(self)?;
        Ok(serde_json::to_vec(&snap)?)
    }

    fn disk_describe(&self, disk: usize) -> Result<(u64, Option<String>), GuestError> {
        describe(self, disk)
    }

    fn disk_track(&self, disk: usize, on: bool) -> Result<(), GuestError> {
        if on {
            self.disk_dirty_start(disk)?;
        } else {
            self.disk_dirty_stop(disk)?;
        }
        Ok(())
    }

    fn disk_extents(&self, disk: usize, own_only: bool) -> Result<Vec<(u64, u64)>, GuestError> {
        Ok(self.with_disk(disk, |b| {
            crate::storage::copy::copy_extents(b.disk(), own_only)
        })??)
    }

    fn disk_read(&self, disk: usize, buf: &mut [u8], offset: u64) -> Result<(), GuestError> {
        Ok(self.with_disk(disk, |b| b.disk().read_at(buf, offset))??)
    }

    fn disk_take_dirty(&self, disk: usize) -> Result<crate::storage::ChangedBlocks, GuestError> {
        Ok(Vmm::disk_take_dirty(self, disk)?)
    }

    fn release_disks(&self) -> Result<(), GuestError> {
        Ok(Vmm::release_disks(self)?)
    }

    fn relock_disks(&self) {
        for i in 0..self.disk_count() {
            if let Ok(Err(e)) = self.with_disk(i, |b| b.lock()) {
                tracing::warn!(
                    disk = i,
                    "Cannot take the image lock back: {}",
                    godwit_crds::error_chain(&e)
                );
            }
        }
    }
}

fn describe(vmm: &Vmm, disk: usize) -> Result<(u64, Option<String>), GuestError> {
    Ok(vmm.with_disk(disk, |b| {
        let d = b.disk();
        (
            d.size(),
            crate::storage::copy::base_digest(d.path(), d.format()),
        )
    })?)
}

/// Node-local settings the target applies to the source's VM config: the
/// names of its taps and, where disks were copied, their paths here.
#[derive(Clone, Debug, Default)]
pub struct TargetOverrides {
    /// Tap names per NIC (empty: the kernel picks a name).
    pub taps: Vec<String>,
    /// Bridges per NIC (`None`: keep the source's bridge name).
    pub bridges: Vec<Option<String>>,
    /// Disk paths per disk (`None`: the same path, shared storage).
    pub disks: Vec<Option<std::path::PathBuf>>,
    /// Keep the guest paused once it has arrived (`godwit-vmm --incoming
    /// --paused`; tests compare disks at the switch-over state with it).
    pub start_paused: bool,
}

impl TargetOverrides {
    /// The source's config with this node's taps, bridges and disk paths.
    pub fn apply(&self, mut config: VmConfig) -> VmConfig {
        for (i, net) in config.nets.iter_mut().enumerate() {
            net.tap = self.taps.get(i).cloned().unwrap_or_default();
            if let Some(Some(b)) = self.bridges.get(i) {
                net.bridge = Some(b.clone());
            }
        }
        for (i, disk) in config.disks.iter_mut().enumerate() {
            if let Some(Some(p)) = self.disks.get(i) {
                disk.path = p.clone();
            }
        }
        config
    }
}

/// A VM being received: built in incoming mode, started on commit.
pub struct IncomingVm {
    /// The VM.
    pub vmm: Vmm,
    /// Its exit channel (for the process's main loop once it runs).
    pub exits: Receiver<VmExit>,
    runtime: RuntimeConfig,
    start_paused: bool,
}

// SAFETY: `exits` is only used by the thread that owns the IncomingVm after
// the migration; during the migration the engine calls only the `Vmm`
// methods, which synchronise internally.
unsafe impl Sync for IncomingVm {}

impl IncomingVm {
    /// Builds the VM described by the source's `config` (after `overrides`),
    /// with zero memory and vCPUs waiting for state.
    pub fn build(
        config: &serde_json::Value,
        overrides: &TargetOverrides,
        runtime: RuntimeConfig,
    ) -> Result<IncomingVm, GuestError> {
        let config: VmConfig = serde_json::from_value(config.clone())?;
        let (vmm, exits) = Vmm::build(overrides.apply(config), &runtime, BuildMode::Incoming)?;
        let mut runtime = runtime;
        // The console is there before the guest arrives, so a client attached
        // early sees every line from the switch-over on.
        if let Some(path) = runtime.console_sock.take() {
            vmm.serve_console(&path)?;
        }
        Ok(IncomingVm {
            vmm,
            exits,
            runtime,
            start_paused: overrides.start_paused,
        })
    }
}

impl TargetVm for IncomingVm {
    fn regions(&self) -> Vec<GuestRegion> {
        regions_of(&self.vmm)
    }

    fn restore_state(&self, state: &[u8]) -> Result<(), GuestError> {
        let mut snap: VmmSnapshot = serde_json::from_slice(state)?;
        // Taps and disk paths are this node's, not the source's.
        snap.config = self.vmm.config.clone();
        self.vmm.restore_state(&snap)?;
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        self.vmm.start(&self.runtime, self.start_paused)?;
        Ok(())
    }

    fn announce(&self) {
        self.vmm.announce();
    }

    fn disk_describe(&self, disk: usize) -> Result<(u64, Option<String>), GuestError> {
        describe(&self.vmm, disk)
    }

    fn disk_write(&self, disk: usize, data: &[u8], offset: u64) -> Result<(), GuestError> {
        Ok(self
            .vmm
            .with_disk(disk, |b| b.disk().write_at(data, offset))??)
    }

    fn disk_flush(&self, disk: usize) -> Result<(), GuestError> {
        Ok(self.vmm.with_disk(disk, |b| b.disk().flush())??)
    }

    fn activate_disks(&self) -> Result<(), GuestError> {
        Ok(self.vmm.activate_disks()?)
    }

    fn activate_disks_unlocked(&self) -> Result<(), GuestError> {
        Ok(self.vmm.activate_disks_unlocked()?)
    }

    fn lock_disks(&self) -> Result<(), GuestError> {
        Ok(self.vmm.lock_disks()?)
    }
}

/// Waits on `listener` for one migration and receives it into a VM built
/// with `overrides` and `runtime`. With `tls`, the source must complete a
/// mutually authenticated handshake first; a source that does not is refused
/// before anything is built. On success the guest runs here.
pub fn receive_incoming(
    listener: &TcpListener,
    overrides: &TargetOverrides,
    runtime: RuntimeConfig,
    opts: &ReceiveOptions,
    tls: Option<&TlsIdentity>,
    progress: &ProgressHandle,
) -> Result<IncomingVm, MigrationError> {
    let (stream, peer) = listener.accept().map_err(MigrationError::Socket)?;
    tracing::info!(%peer, tls = tls.is_some(), "incoming migration");
    let conn = connect::accept(stream, tls, opts.stall_timeout)?;
    // Post-copy falls back on the /dev/userfaultfd the node agent handed over.
    let mut opts = opts.clone();
    if opts.userfaultfd_device.is_none() {
        opts.userfaultfd_device = handover::userfaultfd_device();
    }
    // A post-copy whose link is lost resumes on the next connection here.
    let rejoin =
        |deadline: Instant| connect::accept_newest(listener, tls, opts.stall_timeout, deadline);
    receiver::receive_recoverable(
        conn,
        |hello| IncomingVm::build(&hello.config, overrides, runtime),
        &opts,
        progress,
        Some(&rejoin),
    )
}

/// An outgoing migration running in its own thread.
pub struct OutgoingMigration {
    /// Pollable figures.
    pub progress: Arc<ProgressHandle>,
    /// Set to cancel (before commit the guest stays here).
    pub cancel: Arc<AtomicBool>,
    /// The migration thread; its result once it ends.
    pub handle: JoinHandle<Result<MigrationSummary, MigrationError>>,
}

/// Connects to the target at `addr` and migrates `vmm` there in a new
/// thread; with `tls`, after a mutually authenticated handshake.
pub fn start_outgoing(
    vmm: Arc<Vmm>,
    addr: &str,
    opts: SendOptions,
    tls: Option<&OutgoingTls>,
) -> Result<OutgoingMigration, MigrationError> {
    let stream = connect::dial(addr, opts.stall_timeout, tls)?;
    let mut opts = opts;
    let (target, tls_again) = (addr.to_string(), tls.cloned());
    opts.reconnect = Some(Reconnect(Arc::new(move |timeout| {
        connect::dial(&target, timeout, tls_again.as_ref())
    })));
    let progress = Arc::new(ProgressHandle::default());
    let cancel = Arc::new(AtomicBool::new(false));
    let (p, c) = (progress.clone(), cancel.clone());
    let handle = std::thread::Builder::new()
        .name("migrate-send".into())
        .spawn(move || sender::send(&*vmm, stream, &opts, &p, &c))
        .map_err(MigrationError::Socket)?;
    Ok(OutgoingMigration {
        progress,
        cancel,
        handle,
    })
}
