//! The KVM VM: creation with the in-kernel irqchip and PIT, VM-wide state
//! (PIC, IOAPIC, PIT, kvmclock), and the vCPU threads with their run loop
//! and the pause/resume machinery.
//!
//! vCPU run states:
//! ```text
//!  Running --pause--> Parked --resume--> Running
//!     \                  \
//!      `----stop--------> `--stop--> Exited
//! ```
//! A pause sets the request, then kicks each vCPU thread with a signal until
//! all are parked (a kick can land just before KVM_RUN, so it repeats).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use serde::{Deserialize, Serialize};

use super::devices::{Devices, GuestExit};
use super::vcpu::Vcpu;

/// Errors of the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error(
        "Cannot open /dev/kvm; load the kvm module and run as root or a member of the kvm group"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("Failed to create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("Failed to set the TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("Failed to create the in-kernel irqchip")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("Failed to create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// KVM_GET_IRQCHIP failed.
    #[error("Failed to get irqchip {0}")]
    GetIrqchip(u32, #[source] kvm_ioctls::Error),
    /// KVM_SET_IRQCHIP failed.
    #[error("Failed to set irqchip {0}")]
    SetIrqchip(u32, #[source] kvm_ioctls::Error),
    /// KVM_GET_PIT2 failed.
    #[error("Failed to get PIT state")]
    GetPit(#[source] kvm_ioctls::Error),
    /// KVM_SET_PIT2 failed.
    #[error("Failed to set PIT state")]
    SetPit(#[source] kvm_ioctls::Error),
    /// KVM_GET_CLOCK failed.
    #[error("Failed to get the KVM clock")]
    GetClock(#[source] kvm_ioctls::Error),
    /// KVM_SET_CLOCK failed.
    #[error("Failed to set the KVM clock")]
    SetClock(#[source] kvm_ioctls::Error),
    /// KVM_IRQFD failed.
    #[error("Failed to register an irqfd for GSI {0}")]
    RegisterIrqfd(u32, #[source] kvm_ioctls::Error),
    /// A vCPU thread could not be started.
    #[error("Failed to start a vCPU thread")]
    SpawnVcpu(#[source] std::io::Error),
}

/// Opens /dev/kvm (or uses the one the agent handed over) and creates a VM
/// with irqchip and PIT.
pub fn create() -> Result<(Kvm, VmFd), VmError> {
    let kvm = super::handover::kvm().map_err(VmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(VmError::SetTssAddress)?;
    // The irqchip must exist before any vCPU is created.
    vm.create_irq_chip().map_err(VmError::CreateIrqchip)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(VmError::CreatePit)?;
    Ok((kvm, vm))
}

/// Leaves the 8259 PICs as a BIOS does before handing over: vector bases
/// 0x08/0x70 and every line masked. KVM resets them unmasked with vector
/// base 0, so with LINT0 in ExtINT mode (KVM's default for the boot CPU) a
/// device interrupt would arrive as an exception vector (IRQ 5 as #BR) in a
/// guest that never programs the PIC. Guests that use the PIC (Linux)
/// reprogram it.
pub fn init_legacy_pic(vm: &VmFd) -> Result<(), VmError> {
    for (id, base) in [
        (KVM_IRQCHIP_PIC_MASTER, 0x08u8),
        (KVM_IRQCHIP_PIC_SLAVE, 0x70u8),
    ] {
        let mut chip = get_chip(vm, id)?;
        // SAFETY: chip_id names a PIC, so `pic` is the union member in use;
        // all its fields are plain integers.
        let pic = unsafe { &mut chip.chip.pic };
        pic.imr = 0xff;
        pic.irq_base = base;
        vm.set_irqchip(&chip)
            .map_err(|e| VmError::SetIrqchip(id, e))?;
    }
    Ok(())
}

/// VM-wide KVM state (snapshot version 1).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, VmError> {
    let mut chip = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| VmError::GetIrqchip(id, e))?;
    Ok(chip)
}

/// Saves irqchip, PIT and clock. The vCPUs must be paused.
pub fn save(vm: &VmFd) -> Result<VmState, VmError> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(VmError::GetPit)?,
        clock: vm.get_clock().map_err(VmError::GetClock)?,
    })
}

/// Restores PIC, IOAPIC and PIT; call before restoring the vCPUs.
pub fn restore_chips(vm: &VmFd, s: &VmState) -> Result<(), VmError> {
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip)
            .map_err(|e| VmError::SetIrqchip(chip.chip_id, e))?;
    }
    vm.set_pit2(&s.pit).map_err(VmError::SetPit)
}

/// Restores kvmclock; call after the vCPUs (their kvmclock MSRs) are
/// restored and right before they run, so guest time resumes from the
/// saved value and never goes back.
pub fn restore_clock(vm: &VmFd, s: &VmState) -> Result<(), VmError> {
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        flags: 0,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(VmError::SetClock)
}

/// Why the VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked.
    Guest(GuestExit),
    /// KVM could not continue the guest.
    Failed(String),
    /// Stopped through the control socket.
    Stopped,
    /// The guest did not power off within this many seconds of a
    /// `shutdown` (power button press): the forced stop.
    ShutdownTimedOut(u64),
}

/// Per-vCPU exit counters.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// All KVM_RUN exits.
    pub exits: AtomicU64,
    /// Port-I/O exits.
    pub io_exits: AtomicU64,
    /// MMIO exits.
    pub mmio_exits: AtomicU64,
}

#[derive(Debug, Default)]
struct RunState {
    paused: bool,
    stop: bool,
    parked: usize,
}

/// The vCPU threads and their shared run control.
pub struct VcpuSet {
    /// The vCPUs; locked by their thread while it runs them.
    pub vcpus: Vec<Arc<Mutex<Vcpu>>>,
    /// Exit counters, one per vCPU.
    pub stats: Vec<Arc<VcpuStats>>,
    state: Arc<(Mutex<RunState>, Condvar)>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

impl VcpuSet {
    /// Wraps created vCPUs; threads start with [`VcpuSet::start`].
    pub fn new(vcpus: Vec<Vcpu>) -> Self {
        let n = vcpus.len();
        VcpuSet {
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            stats: (0..n).map(|_| Arc::new(VcpuStats::default())).collect(),
            state: Arc::new((Mutex::new(RunState::default()), Condvar::new())),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// Starts one thread per vCPU, running unless `paused`. A guest exit or
    /// failure is sent on `exits`.
    pub fn start(
        &self,
        devices: Arc<Devices>,
        exits: Sender<VmExit>,
        paused: bool,
    ) -> Result<(), VmError> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| VmError::SpawnVcpu(std::io::Error::from_raw_os_error(e.errno())))?;
        self.state.0.lock().unwrap().paused = paused;
        let mut threads = self.threads.lock().unwrap();
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            let vcpu = vcpu.clone();
            let stats = self.stats[i].clone();
            let state = self.state.clone();
            let devices = devices.clone();
            let exits = exits.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_loop(vcpu, stats, state, devices, exits))
                .map_err(VmError::SpawnVcpu)?;
            threads.push(t);
        }
        Ok(())
    }

    fn kick_until(&self, done: impl Fn(&RunState) -> bool) {
        use std::os::unix::thread::JoinHandleExt;
        let (lock, cv) = &*self.state;
        loop {
            for t in self.threads.lock().unwrap().iter() {
                // SAFETY: the thread handle is alive (joined only in stop);
                // the signal has a no-op handler installed in `start`.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
            let s = lock.lock().unwrap();
            let (s, _) = cv.wait_timeout(s, Duration::from_millis(1)).unwrap();
            if done(&s) {
                return;
            }
        }
    }

    /// Parks every vCPU outside KVM_RUN; returns once all are parked.
    pub fn pause(&self) {
        let n = self.vcpus.len();
        {
            let mut s = self.state.0.lock().unwrap();
            if s.stop {
                return;
            }
            s.paused = true;
        }
        self.kick_until(|s| s.parked == n || s.stop);
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let mut s = self.state.0.lock().unwrap();
        s.paused = false;
        self.state.1.notify_all();
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.state.0.lock().unwrap().paused
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&self) {
        {
            let mut s = self.state.0.lock().unwrap();
            s.stop = true;
            self.state.1.notify_all();
        }
        let me = std::thread::current().id();
        if self
            .threads
            .lock()
            .unwrap()
            .iter()
            .any(|t| t.thread().id() == me)
        {
            return;
        }
        use std::os::unix::thread::JoinHandleExt;
        loop {
            let threads = self.threads.lock().unwrap();
            if threads.iter().all(|t| t.is_finished()) {
                break;
            }
            for t in threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the thread has not been joined, so its pthread_t
                // is valid; the signal's handler is a no-op.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
            drop(threads);
            std::thread::sleep(Duration::from_millis(1));
        }
        let threads: Vec<_> = self.threads.lock().unwrap().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn vcpu_loop(
    vcpu: Arc<Mutex<Vcpu>>,
    stats: Arc<VcpuStats>,
    state: Arc<(Mutex<RunState>, Condvar)>,
    devices: Arc<Devices>,
    exits: Sender<VmExit>,
) {
    super::sandbox::enter_vcpu();
    let (lock, cv) = &*state;
    loop {
        {
            let mut s = lock.lock().unwrap();
            if s.paused && !s.stop {
                s.parked += 1;
                cv.notify_all();
                while s.paused && !s.stop {
                    s = cv.wait(s).unwrap();
                }
                s.parked -= 1;
                cv.notify_all();
            }
            if s.stop {
                return;
            }
        }
        let mut v = vcpu.lock().unwrap();
        let id = v.id;
        let exit = v.fd.run();
        stats.exits.fetch_add(1, Ordering::Relaxed);
        let result = match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                stats.io_exits.fetch_add(1, Ordering::Relaxed);
                devices.pio_read(port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                stats.io_exits.fetch_add(1, Ordering::Relaxed);
                devices.pio_write(port, data).map(VmExit::Guest)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                devices.mmio_read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                devices.mmio_write(addr, data).map(VmExit::Guest)
            }
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Shutdown) => Some(VmExit::Guest(GuestExit::Reset)),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    Some(VmExit::Guest(GuestExit::Poweroff(0)))
                }
                _ => Some(VmExit::Guest(GuestExit::Reset)),
            },
            Ok(VcpuExit::InternalError) => {
                // SAFETY-free read of the kvm_run union for the details.
                let run = v.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the union is the one KVM filled.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let rip = v.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                let what = if internal.suberror == 1 {
                    " (instruction emulation failure)"
                } else {
                    ""
                };
                Some(VmExit::Failed(format!(
                    "KVM_EXIT_INTERNAL_ERROR on vCPU {}: suberror {}{what} at RIP {rip:#x}; this KVM cannot run the guest's code there",
                    v.id, internal.suberror
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Failed(format!(
                "KVM_EXIT_FAIL_ENTRY on vCPU {}: hardware reason {reason:#x} (cpu {cpu})",
                v.id
            ))),
            Ok(other) => Some(VmExit::Failed(format!(
                "Unexpected KVM exit on vCPU {id}: {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::Failed(format!(
                "KVM_RUN failed on vCPU {}: {e}",
                v.id
            ))),
        };
        drop(v);
        if let Some(exit) = result {
            let _ = exits.send(exit);
            // Park until the main thread stops us.
            let mut s = lock.lock().unwrap();
            s.paused = true;
            drop(s);
        }
    }
}
