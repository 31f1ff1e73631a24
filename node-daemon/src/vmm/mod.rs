//! `godwit-vmm`: one KVM virtual machine per process.
//!
//! [`Vmm::build`] turns a [`VmConfig`] into a running VM (or, with a
//! snapshot, into the VM the snapshot was taken of); the control socket
//! ([`control`]) and the migration engine drive it through the methods on
//! [`Vmm`]: pause, resume, save a snapshot, take the dirty set, stop.
//!
//! Module map: [`memory`] owns guest RAM, [`dirty`] the dirty set, [`vcpu`]
//! and [`vm`] are thin KVM wrappers plus the vCPU threads, [`boot`] loads
//! kernels, [`devices`] holds every device, [`state`] the snapshot format.

pub mod boot;
pub mod control;
pub mod devices;
pub mod dirty;
pub mod handover;
pub mod jail;
pub mod memory;
pub mod migrate;
pub mod private_socket;
pub mod sandbox;
pub mod state;
pub mod vcpu;
pub mod vm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use boot::{BootError, KernelKind};
use devices::ged::{Ged, GED_GSI};
use devices::serial::{Console, SerialError, COM1_IRQ};
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, VirtioDevice};
use devices::virtio::net::{parse_mac, tap::Tap, Net};
use devices::virtio::{VirtioError, FIRST_IRQ, MMIO_BASE, MMIO_SIZE};
use devices::Devices;
use dirty::{DirtyBitmap, DirtyError};
use memory::{GuestMemory, MemoryError};
use state::{StateError, VmmSnapshot};
use vcpu::{Vcpu, VcpuError};
use vm::{VcpuSet, VmError, VmExit};

/// One disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Image file (raw or qcow2); must exist.
    pub path: PathBuf,
    /// Expose read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Image format; detected from the file when absent (qcow2 magic, else
    /// raw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<crate::storage::ImageFormat>,
}

/// One NIC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Tap name; created if missing (empty: the kernel picks one).
    #[serde(default)]
    pub tap: String,
    /// Bridge to attach the tap to.
    #[serde(default)]
    pub bridge: Option<String>,
    /// MAC address (default 52:54:00:00:00:<index+1>).
    #[serde(default)]
    pub mac: Option<String>,
}

/// What the VM is: saved in snapshots so a restore rebuilds the same VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// PVH ELF or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk (bzImage boot).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (without ACPI, virtio-mmio entries are
    /// appended).
    #[serde(default)]
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Disks, as virtio-blk devices.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// NICs, as virtio-net devices.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// ACPI platform: tables describing the devices, the power button, S5
    /// and reset. Without it (false, also in configs and snapshots from
    /// before ACPI) the devices go on the kernel command line.
    #[serde(default)]
    pub acpi: bool,
}

/// The exit status of a VMM whose guest reset (ACPI reset register, i8042
/// 0xFE, triple fault): the agent restarts the guest as its run strategy
/// says. A power off, `stop` and SIGTERM exit 0.
pub const GUEST_RESET_EXIT: i32 = 100;

/// Where this process's console, log and control socket go (not part of
/// the VM: a restored VM may get new ones).
#[derive(Clone, Debug, Default)]
pub struct RuntimeConfig {
    /// Serial output log file.
    pub serial_log: Option<PathBuf>,
    /// Console unix socket.
    pub console_sock: Option<PathBuf>,
    /// Control unix socket.
    pub api_sock: Option<PathBuf>,
}

/// Errors of building and running a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm missing.
    #[error("/dev/kvm does not exist; load the kvm module (modprobe kvm_intel or kvm_amd) or run on a host with KVM")]
    NoKvm,
    /// /dev/kvm not accessible.
    #[error("No permission to open /dev/kvm; run as root or add this user to the kvm group")]
    KvmPermission,
    /// Bad vCPU count.
    #[error("--vcpus must be between 1 and 254")]
    VcpuCount,
    /// VM-level failure.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// vCPU failure.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Memory failure.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Boot failure.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Serial console failure.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// virtio device failure.
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    /// Dirty tracking failure.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// Snapshot failure.
    #[error(transparent)]
    State(#[from] StateError),
    /// Control socket failure.
    #[error("Cannot bind control socket {0}; check --api-sock")]
    BindApi(String, #[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A disk index that does not exist.
    #[error("No disk {0}; disks are numbered from 0 in --disk order")]
    NoDisk(usize),
    /// Changed-block tracking was not started.
    #[error("Changed-block tracking is off for disk {0}; send disk-dirty-start first")]
    DiskDirtyNotEnabled(usize),
    /// A disk image operation failed (lock, reopen, flush).
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// More virtio devices than free interrupt lines.
    #[error("Too many devices: {0} disks and NICs, at most {MAX_VIRTIO_DEVICES}")]
    TooManyDevices(usize),
    /// `shutdown` on a VM without ACPI.
    #[error("This VM has no ACPI power button (started with --acpi off); use stop")]
    NoPowerButton,
}

/// How many virtio devices fit: GSIs from [`FIRST_IRQ`] up to, not
/// including, the GED's.
pub const MAX_VIRTIO_DEVICES: usize = (devices::ged::GED_GSI - FIRST_IRQ) as usize;
// virtio GSIs lie between COM1's and the GED's.
const _: () = assert!(FIRST_IRQ > COM1_IRQ && devices::ged::GED_GSI < 24);

/// The VMM's counters, as `stats` returns them.
pub use godwit_vmm_control::Stats;

/// How [`Vmm::build`] prepares the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildMode {
    /// Load the kernel and boot it.
    Boot,
    /// Leave memory and vCPUs for a restore (snapshot or migration).
    Incoming,
}

/// A running VM and everything it owns.
pub struct Vmm {
    /// /dev/kvm.
    pub kvm: Kvm,
    /// The VM fd.
    pub vm: VmFd,
    /// Guest RAM (owned by this process).
    pub mem: GuestMemory,
    /// The vCPUs and their threads.
    pub vcpus: VcpuSet,
    /// All devices.
    pub devices: Arc<Devices>,
    /// The VM's configuration (as saved in snapshots).
    pub config: VmConfig,
    console: Console,
    irq_evts: Vec<EventFd>,
    exit_tx: Sender<VmExit>,
    stop_io: Arc<AtomicBool>,
    started: Instant,
    dirty_last: AtomicU64,
    dirty_log: AtomicBool,
    /// KVM's manual dirty-log protection is on (`dirty::enable_manual_protect`).
    dirty_manual: AtomicBool,
    dirty_takes: AtomicU64,
    /// Serialises pause/resume/save from several control clients.
    pub control_lock: Mutex<()>,
}

fn check_kvm() -> Result<(), VmmError> {
    if handover::has_kvm() {
        return Ok(());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(VmmError::NoKvm),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(VmmError::KvmPermission),
        Err(_) => Err(VmmError::NoKvm),
    }
}

impl Vmm {
    /// Builds the VM from `config`. With [`BuildMode::Boot`] the kernel is
    /// loaded and the vCPUs set up to enter it; with
    /// [`BuildMode::Incoming`] memory stays zero and the vCPUs unset, for
    /// [`Vmm::restore_state`] (after the caller filled memory: a snapshot
    /// file or a migration stream). Nothing runs until [`Vmm::start`]. On
    /// error nothing is left behind: taps close with their fds, and files
    /// are only created after every check passed.
    pub fn build(
        config: VmConfig,
        runtime: &RuntimeConfig,
        mode: BuildMode,
    ) -> Result<(Vmm, Receiver<VmExit>), VmmError> {
        if config.vcpus == 0 || config.vcpus > 254 {
            return Err(VmmError::VcpuCount);
        }
        let ndev = config.disks.len() + config.nets.len();
        if ndev > MAX_VIRTIO_DEVICES {
            return Err(VmmError::TooManyDevices(ndev));
        }
        check_kvm()?;
        // Check inputs before creating anything visible outside the process.
        let kernel_kind = match mode {
            BuildMode::Boot => Some(boot::detect_kernel(&config.kernel)?),
            BuildMode::Incoming => None,
        };
        for d in &config.disks {
            if !d.path.exists() {
                return Err(VirtioError::OpenDisk(
                    d.path.display().to_string(),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                )
                .into());
            }
        }
        for n in &config.nets {
            if let Some(b) = &n.bridge {
                if !devices::virtio::net::tap::bridge_exists(b) {
                    return Err(VirtioError::NoBridge(b.clone()).into());
                }
            }
        }
        let mem = memory::create(config.memory_mib)?;
        let (kvm, vm) = vm::create()?;
        // Dirty logging starts off: on this KVM it slows the guest's 32-bit
        // boot code many times over. The migration engine (or --dirty-log)
        // turns it on with Vmm::set_dirty_log.
        memory::register_slots(&vm, &mem, false)?;

        let vcpus = (0..config.vcpus)
            .map(|id| Vcpu::new(&kvm, &vm, id, config.vcpus))
            .collect::<Result<Vec<_>, _>>()?;

        // Devices.
        let mut config = config;
        let mut virtio = Vec::new();
        let mut irq_evts = Vec::new();
        let mut index = 0usize;
        // A booting VM locks its disks now; a VM built for a restore or an
        // incoming migration locks them in restore_snapshot, or when the
        // migration engine activates it (see storage::lock for the order).
        let lock_disks = mode == BuildMode::Boot;
        for (i, d) in config.disks.iter().enumerate() {
            let blk = Block::new(
                d.path.clone(),
                d.format,
                d.read_only,
                format!("godwit-disk{i}"),
                lock_disks,
            )?;
            virtio.push(VirtioDevice::Block(blk));
        }
        for (i, n) in config.nets.iter_mut().enumerate() {
            let tap = Tap::open(&n.tap)?;
            if let Some(b) = &n.bridge {
                tap.attach(b)?;
            }
            tap.up()?;
            n.tap = tap.name.clone();
            let mac_s = n
                .mac
                .clone()
                .unwrap_or_else(|| format!("52:54:00:00:00:{:02x}", i + 1));
            let mac = parse_mac(&mac_s)?;
            n.mac = Some(mac_s);
            virtio.push(VirtioDevice::Net(Net::new(tap, mac)?));
        }
        let mut transports = Vec::new();
        for dev in virtio {
            let base = MMIO_BASE + index as u64 * MMIO_SIZE;
            let gsi = FIRST_IRQ + index as u32;
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
            vm.register_irqfd(&evt, gsi)
                .map_err(|e| VmError::RegisterIrqfd(gsi, e))?;
            let irq = evt.try_clone().map_err(VmmError::EventFd)?;
            irq_evts.push(evt);
            transports.push(Arc::new(Mutex::new(MmioTransport::new(
                dev,
                mem.clone(),
                irq,
                base,
                gsi,
            ))));
            index += 1;
        }

        let (console, serial_evt) = Console::new(runtime.serial_log.as_deref(), None)?;
        vm.register_irqfd(&serial_evt, COM1_IRQ)
            .map_err(|e| VmError::RegisterIrqfd(COM1_IRQ, e))?;
        irq_evts.push(serial_evt);
        let ged = if config.acpi {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
            vm.register_irqfd(&evt, GED_GSI)
                .map_err(|e| VmError::RegisterIrqfd(GED_GSI, e))?;
            let irq = evt.try_clone().map_err(VmmError::EventFd)?;
            irq_evts.push(evt);
            Some(Arc::new(Mutex::new(Ged::new(irq))))
        } else {
            None
        };
        let platform = boot::acpi::Platform {
            vcpus: config.vcpus,
            virtio: transports
                .iter()
                .map(|t| {
                    let t = t.lock().unwrap();
                    boot::acpi::MmioDevice {
                        base: t.base,
                        size: MMIO_SIZE,
                        gsi: t.gsi,
                    }
                })
                .collect(),
        };
        let devices = Arc::new(Devices {
            serial: console.serial.clone(),
            virtio: transports,
            ged,
        });

        match mode {
            BuildMode::Boot => {
                let mut cmdline = config.cmdline.clone();
                // With ACPI the DSDT describes the devices; listing them on
                // the command line too would register each one twice.
                let cmdline_devices = if config.acpi { 0 } else { index };
                for i in 0..cmdline_devices {
                    if !cmdline.is_empty() {
                        cmdline.push(' ');
                    }
                    cmdline.push_str(&devices::virtio::cmdline_entry(i));
                }
                boot::write_cmdline(&mem, &cmdline)?;
                vm::init_legacy_pic(&vm)?;
                boot::mptable::write(&mem, config.vcpus)?;
                let rsdp = if config.acpi {
                    boot::acpi::write(&mem, &platform)?
                } else {
                    0
                };
                Vcpu::write_gdt(&mem)?;
                match kernel_kind.expect("kernel detected when booting") {
                    KernelKind::PvhElf => {
                        let entry = boot::pvh::load(&mem, &config.kernel, rsdp)?;
                        for v in &vcpus {
                            v.setup_pvh(entry, boot::PVH_INFO_ADDR)?;
                        }
                    }
                    KernelKind::BzImage => {
                        let entry = boot::bzimage::load(
                            &mem,
                            &config.kernel,
                            config.initrd.as_deref(),
                            cmdline.len(),
                            rsdp,
                        )?;
                        // The boot CPU enters the kernel; the others wait for
                        // INIT/SIPI (KVM's default MP state for APs).
                        vcpus[0].setup_linux64(&mem, entry + 0x200, boot::ZERO_PAGE_ADDR)?;
                    }
                }
            }
            BuildMode::Incoming => {}
        }

        let (exit_tx, exit_rx) = channel();
        Ok((
            Vmm {
                kvm,
                vm,
                mem,
                vcpus: VcpuSet::new(vcpus),
                devices,
                config,
                console,
                irq_evts,
                exit_tx,
                stop_io: Arc::new(AtomicBool::new(false)),
                started: Instant::now(),
                dirty_last: AtomicU64::new(0),
                dirty_log: AtomicBool::new(false),
                dirty_manual: AtomicBool::new(false),
                dirty_takes: AtomicU64::new(0),
                control_lock: Mutex::new(()),
            },
            exit_rx,
        ))
    }

    /// Starts the console socket, device threads and vCPUs.
    pub fn start(&self, runtime: &RuntimeConfig, paused: bool) -> Result<(), VmmError> {
        if let Some(p) = &runtime.console_sock {
            self.console.serve(p)?;
        }
        for t in &self.devices.virtio {
            if matches!(t.lock().unwrap().device, VirtioDevice::Net(_)) {
                devices::virtio::net::rx::spawn(t.clone(), self.stop_io.clone())
                    .map_err(VmError::SpawnVcpu)?;
            }
        }
        self.vcpus
            .start(self.devices.clone(), self.exit_tx.clone(), paused)?;
        let _ = &self.irq_evts;
        Ok(())
    }

    /// Serves the console socket at `path` before the vCPUs start (a VM
    /// receiving a migration does, so a client can be attached when the
    /// guest arrives); pass a runtime without `console_sock` to
    /// [`Vmm::start`] afterwards.
    pub fn serve_console(&self, path: &Path) -> Result<(), VmmError> {
        self.console.serve(path)?;
        Ok(())
    }

    /// Pauses all vCPUs (returns once none is in KVM_RUN).
    pub fn pause(&self) {
        self.vcpus.pause();
    }

    /// Resumes the vCPUs.
    pub fn resume(&self) {
        self.vcpus.resume();
    }

    /// Stops the vCPUs and device threads for good.
    pub fn stop(&self) {
        self.vcpus.stop();
        self.stop_io.store(true, Ordering::Relaxed);
    }

    /// Announces every NIC's MAC on its tap (after a migration), three times
    /// a few milliseconds apart like QEMU, in case the first is lost.
    pub fn announce(&self) {
        for round in 0..3 {
            if round > 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            for t in &self.devices.virtio {
                if let VirtioDevice::Net(net) = &t.lock().unwrap().device {
                    if let Err(e) = net.announce() {
                        tracing::warn!("Cannot announce the MAC after migration: {e}");
                    }
                }
            }
        }
    }

    /// Ends the VMM as failed with `message` (exit status 1).
    pub fn fail(&self, message: String) {
        let _ = self.exit_tx.send(VmExit::Failed(message));
    }

    /// Asks the main loop to stop the VM (used by the control socket).
    pub fn request_stop(&self) {
        let _ = self
            .exit_tx
            .send(VmExit::Guest(devices::GuestExit::Poweroff(0)));
    }

    /// Presses the ACPI power button (the GED raises its interrupt; a
    /// guest that handles it writes S5). The press is device state: a
    /// press the guest has not read yet travels with a snapshot or a
    /// migration. Fails on a VM without ACPI.
    pub fn press_power_button(&self) -> Result<(), VmmError> {
        let ged = self.devices.ged.as_ref().ok_or(VmmError::NoPowerButton)?;
        ged.lock().unwrap().press_power_button();
        Ok(())
    }

    /// Forces the stop `grace` from now unless the VM ended before (the
    /// end of a `shutdown`'s grace period). The timer belongs to this
    /// process: it does not travel with a migration or a snapshot.
    pub fn force_stop_after(&self, grace: std::time::Duration) -> Result<(), VmmError> {
        let tx = self.exit_tx.clone();
        std::thread::Builder::new()
            .name("shutdown-grace".into())
            .spawn(move || {
                std::thread::sleep(grace);
                let _ = tx.send(VmExit::ShutdownTimedOut(grace.as_secs()));
            })
            .map_err(VmError::SpawnVcpu)?;
        Ok(())
    }

    /// Turns KVM dirty logging on or off for every RAM slot. Turning it on
    /// also clears the VMM's own bitmap, so the first [`Vmm::take_dirty`]
    /// returns the pages written since this call.
    pub fn set_dirty_log(&self, on: bool) -> Result<(), VmmError> {
        if on && !self.dirty_manual.load(Ordering::SeqCst) {
            let manual = dirty::enable_manual_protect(&self.vm);
            tracing::debug!(manual, "KVM manual dirty-log protection");
            self.dirty_manual.store(manual, Ordering::SeqCst);
        }
        memory::register_slots(&self.vm, &self.mem, on)?;
        if on {
            dirty::clear_vmm_bitmap(&self.mem);
        }
        self.dirty_log.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Whether KVM dirty logging is on.
    pub fn dirty_log_enabled(&self) -> bool {
        self.dirty_log.load(Ordering::SeqCst)
    }

    /// Returns the pages dirtied (by vCPUs or devices) since the last call
    /// (or since [`Vmm::set_dirty_log`] turned logging on) and clears the
    /// dirty set, one bitmap per RAM region.
    pub fn take_dirty(&self) -> Result<Vec<DirtyBitmap>, VmmError> {
        if !self.dirty_log_enabled() {
            return Err(DirtyError::NotEnabled.into());
        }
        let d = dirty::take_dirty(
            &self.vm,
            &self.mem,
            self.dirty_manual.load(Ordering::SeqCst),
        )?;
        self.dirty_last
            .store(d.iter().map(|b| b.count()).sum(), Ordering::Relaxed);
        self.dirty_takes.fetch_add(1, Ordering::Relaxed);
        Ok(d)
    }

    /// How many pages the vCPUs wrote since the dirty set was last taken,
    /// without taking it or write-protecting anything again; `None` when
    /// KVM's manual dirty-log protection is off (the log cannot be read
    /// without re-arming it).
    pub fn peek_dirty_count(&self) -> Result<Option<u64>, VmmError> {
        if !self.dirty_log_enabled() {
            return Err(DirtyError::NotEnabled.into());
        }
        if !self.dirty_manual.load(Ordering::SeqCst) {
            return Ok(None);
        }
        Ok(Some(dirty::peek_count(&self.vm, &self.mem)?))
    }

    /// Runs `f` on block device number `disk` (in `--disk` order).
    pub fn with_disk<R>(
        &self,
        disk: usize,
        f: impl FnOnce(&mut Block) -> R,
    ) -> Result<R, VmmError> {
        let t = self
            .devices
            .virtio
            .iter()
            .filter(|t| matches!(t.lock().unwrap().device, VirtioDevice::Block(_)))
            .nth(disk)
            .ok_or(VmmError::NoDisk(disk))?;
        let mut t = t.lock().unwrap();
        match &mut t.device {
            VirtioDevice::Block(b) => Ok(f(b)),
            VirtioDevice::Net(_) => unreachable!("filtered to block devices"),
        }
    }

    /// Starts changed-block tracking on disk `disk` (clears its set).
    pub fn disk_dirty_start(&self, disk: usize) -> Result<(), VmmError> {
        self.with_disk(disk, Block::dirty_start)
    }

    /// Stops changed-block tracking on disk `disk`.
    pub fn disk_dirty_stop(&self, disk: usize) -> Result<(), VmmError> {
        self.with_disk(disk, Block::dirty_stop)
    }

    /// Returns the blocks of disk `disk` written since tracking started or
    /// since the last call, and clears them (the disk's counterpart of
    /// [`Vmm::take_dirty`]).
    pub fn disk_take_dirty(&self, disk: usize) -> Result<crate::storage::ChangedBlocks, VmmError> {
        self.with_disk(disk, Block::take_dirty)?
            .ok_or(VmmError::DiskDirtyNotEnabled(disk))
    }

    /// Number of disks.
    pub fn disk_count(&self) -> usize {
        self.devices
            .virtio
            .iter()
            .filter(|t| matches!(t.lock().unwrap().device, VirtioDevice::Block(_)))
            .count()
    }

    /// Flushes every disk and releases its image locks: the source of a
    /// live migration on shared storage, after Commit, once its vCPUs are
    /// stopped for good (see [`crate::storage::lock`]).
    pub fn release_disks(&self) -> Result<(), VmmError> {
        for i in 0..self.disk_count() {
            self.with_disk(i, Block::unlock)??;
        }
        Ok(())
    }

    /// Reopens every disk and takes its image locks: a VM built with
    /// [`BuildMode::Incoming`] before it runs (a snapshot restore does it
    /// itself; a migration target before Activate). Fails with
    /// [`crate::storage::StorageError::Locked`] while another VMM holds a
    /// disk; the guest must not run then.
    pub fn activate_disks(&self) -> Result<(), VmmError> {
        for i in 0..self.disk_count() {
            self.with_disk(i, Block::reopen_locked)??;
        }
        Ok(())
    }

    /// Reopens every disk of a VM built with [`BuildMode::Incoming`] and
    /// takes the image locks that are free, warning about the others: a
    /// post-copy target before its guest runs, while the source (paused,
    /// its disks flushed) still holds them until it has sent everything.
    /// Done here, on the migration thread, so that no vCPU thread has to
    /// open files on the guest's first disk request.
    pub fn activate_disks_unlocked(&self) -> Result<(), VmmError> {
        for i in 0..self.disk_count() {
            self.with_disk(i, Block::activate_now)?;
        }
        Ok(())
    }

    /// Takes every disk's image locks (a no-op for those held).
    pub fn lock_disks(&self) -> Result<(), VmmError> {
        for i in 0..self.disk_count() {
            self.with_disk(i, Block::lock)??;
        }
        Ok(())
    }

    /// Builds the VM saved in the snapshot directory `dir` and restores it
    /// (memory, VM, vCPU and device state); it runs after [`Vmm::start`].
    pub fn restore_snapshot(
        dir: &Path,
        runtime: &RuntimeConfig,
    ) -> Result<(Vmm, Receiver<VmExit>), VmmError> {
        let snap = VmmSnapshot::load(dir)?;
        let (vmm, rx) = Vmm::build(snap.config.clone(), runtime, BuildMode::Incoming)?;
        vmm.activate_disks()?;
        memory::load_from_file(&vmm.mem, &snap.memory, &dir.join(state::MEMORY_FILE))?;
        vmm.restore_state(&snap)?;
        Ok((vmm, rx))
    }

    /// Captures VM, vCPU and device state (no memory bytes; the snapshot's
    /// memory layout is filled in). Pauses the VM first; it stays paused.
    pub fn save_state(&self) -> Result<VmmSnapshot, VmmError> {
        self.pause();
        Ok(state::capture(self)?)
    }

    /// Restores state captured by [`Vmm::save_state`] into a VM built with
    /// [`BuildMode::Incoming`] whose memory already holds the guest's pages
    /// and whose vCPUs have not run (started paused, or not started).
    pub fn restore_state(&self, snap: &VmmSnapshot) -> Result<(), VmmError> {
        state::restore(self, snap)?;
        Ok(())
    }

    /// Guest RAM regions: (guest-physical start, length, host address).
    /// The host mappings live as long as the `Vmm`.
    pub fn regions(&self) -> Vec<(u64, u64, *mut u8)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.mem
            .iter()
            .map(|r| {
                let host = self
                    .mem
                    .get_host_address(r.start_addr())
                    .expect("region start is in guest memory");
                (r.start_addr().0, r.len(), host)
            })
            .collect()
    }

    /// Saves a snapshot (state.json + memory.bin) into `dir`, pausing the
    /// VM first; it stays paused.
    pub fn save_snapshot(&self, dir: &Path) -> Result<(), VmmError> {
        self.pause();
        state::save(self, dir)?;
        Ok(())
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        Stats {
            memory_mib: self.config.memory_mib,
            vcpu_exits: self
                .vcpus
                .stats
                .iter()
                .map(|s| {
                    (
                        s.exits.load(Ordering::Relaxed),
                        s.io_exits.load(Ordering::Relaxed),
                        s.mmio_exits.load(Ordering::Relaxed),
                    )
                })
                .collect(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            dirty_pages_last: self.dirty_last.load(Ordering::Relaxed),
            dirty_takes: self.dirty_takes.load(Ordering::Relaxed),
            paused: self.vcpus.is_paused(),
            dirty_log: self.dirty_log_enabled(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_from_before_acpi_keep_the_command_line_devices() {
        let old = r#"{"kernel":"/k","cmdline":"x","memory_mib":64,"vcpus":1}"#;
        let c: VmConfig = serde_json::from_str(old).unwrap();
        assert!(!c.acpi);
        let new = serde_json::to_value(VmConfig { acpi: true, ..c }).unwrap();
        assert_eq!(new["acpi"], true);
    }
}
