//! The migration engine on our VMM: [`SourceVm`] for a running [`Vmm`], and
//! [`IncomingVm`], a VM built on the target from the source's configuration
//! with its memory left for the stream to fill.

use std::sync::mpsc::Receiver;

use crate::vmm::state::VmmSnapshot;
use crate::vmm::vm::VmExit;
use crate::vmm::{BuildMode, RuntimeConfig, VmConfig, Vmm};

use super::tls::{self, TlsIdentity};
use super::transport::Conn;
use super::vm::{DirtyPages, GuestRegion, SourceVm, TargetVm, VmError};

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

    fn set_dirty_log(&self, on: bool) -> Result<(), VmError> {
        Vmm::set_dirty_log(self, on).map_err(Into::into)
    }

    fn take_dirty(&self) -> Result<Vec<DirtyPages>, VmError> {
        Ok(Vmm::take_dirty(self)?
            .into_iter()
            .map(|d| DirtyPages {
                gpa: d.gpa,
                bitmap: d.bitmap,
            })
            .collect())
    }

    fn pause(&self) {
        Vmm::pause(self)
    }

    fn resume(&self) {
        Vmm::resume(self)
    }

    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        let snap = Vmm::save_state(self)?;
        Ok(serde_json::to_vec(&snap)?)
    }

    fn disk_describe(&self, disk: usize) -> Result<(u64, Option<String>), VmError> {
        describe(self, disk)
    }

    fn disk_track(&self, disk: usize, on: bool) -> Result<(), VmError> {
        if on {
            self.disk_dirty_start(disk)?;
        } else {
            self.disk_dirty_stop(disk)?;
        }
        Ok(())
    }

    fn disk_extents(&self, disk: usize, own_only: bool) -> Result<Vec<(u64, u64)>, VmError> {
        Ok(self.with_disk(disk, |b| {
            crate::storage::migrate::copy_extents(b.disk(), own_only)
        })??)
    }

    fn disk_read(&self, disk: usize, buf: &mut [u8], offset: u64) -> Result<(), VmError> {
        Ok(self.with_disk(disk, |b| b.disk().read_at(buf, offset))??)
    }

    fn disk_take_dirty(&self, disk: usize) -> Result<crate::storage::ChangedBlocks, VmError> {
        Ok(Vmm::disk_take_dirty(self, disk)?)
    }

    fn release_disks(&self) -> Result<(), VmError> {
        Ok(Vmm::release_disks(self)?)
    }

    fn relock_disks(&self) {
        for i in 0..self.disk_count() {
            if let Ok(Err(e)) = self.with_disk(i, |b| b.lock()) {
                tracing::warn!(
                    disk = i,
                    "Cannot take the image lock back: {}",
                    crate::error_chain(&e)
                );
            }
        }
    }
}

fn describe(vmm: &Vmm, disk: usize) -> Result<(u64, Option<String>), VmError> {
    Ok(vmm.with_disk(disk, |b| {
        let d = b.disk();
        (
            d.size(),
            crate::storage::migrate::base_digest(d.path(), d.format()),
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
    ) -> Result<IncomingVm, VmError> {
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

    fn restore_state(&self, state: &[u8]) -> Result<(), VmError> {
        let mut snap: VmmSnapshot = serde_json::from_slice(state)?;
        // Taps and disk paths are this node's, not the source's.
        snap.config = self.vmm.config.clone();
        self.vmm.restore_state(&snap)?;
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        self.vmm.start(&self.runtime, self.start_paused)?;
        Ok(())
    }

    fn announce(&self) {
        self.vmm.announce();
    }

    fn disk_describe(&self, disk: usize) -> Result<(u64, Option<String>), VmError> {
        describe(&self.vmm, disk)
    }

    fn disk_write(&self, disk: usize, data: &[u8], offset: u64) -> Result<(), VmError> {
        Ok(self
            .vmm
            .with_disk(disk, |b| b.disk().write_at(data, offset))??)
    }

    fn disk_flush(&self, disk: usize) -> Result<(), VmError> {
        Ok(self.vmm.with_disk(disk, |b| b.disk().flush())??)
    }

    fn activate_disks(&self) -> Result<(), VmError> {
        Ok(self.vmm.activate_disks()?)
    }

    fn activate_disks_unlocked(&self) -> Result<(), VmError> {
        Ok(self.vmm.activate_disks_unlocked()?)
    }

    fn lock_disks(&self) -> Result<(), VmError> {
        Ok(self.vmm.lock_disks()?)
    }
}

/// Waits on `listener` for one migration and receives it into a VM built
/// with `overrides` and `runtime`. With `tls`, the source must complete a
/// mutually authenticated handshake first; a source that does not is refused
/// before anything is built. On success the guest runs here.
pub fn receive_incoming(
    listener: &std::net::TcpListener,
    overrides: &TargetOverrides,
    runtime: RuntimeConfig,
    opts: &super::receiver::ReceiveOptions,
    tls: Option<&TlsIdentity>,
    progress: &super::ProgressHandle,
) -> Result<IncomingVm, super::MigrationError> {
    let (stream, peer) = listener.accept().map_err(super::MigrationError::Socket)?;
    tracing::info!(%peer, tls = tls.is_some(), "incoming migration");
    let conn = secure(stream, tls, opts.stall_timeout)?;
    // A post-copy whose link is lost resumes on the next connection here.
    let rejoin = |deadline: std::time::Instant| rejoin(listener, tls, opts.stall_timeout, deadline);
    super::receiver::receive_recoverable(
        conn,
        |hello| IncomingVm::build(&hello.config, overrides, runtime),
        opts,
        progress,
        Some(&rejoin),
    )
}

/// The connection `stream`, after the TLS handshake when `tls` is set.
fn secure(
    stream: std::net::TcpStream,
    tls: Option<&TlsIdentity>,
    stall_timeout: std::time::Duration,
) -> Result<Conn, super::MigrationError> {
    Ok(match tls {
        None => Conn::plain(stream),
        Some(identity) => {
            // A silent peer must not hold the handshake forever.
            stream
                .set_read_timeout(Some(stall_timeout))
                .map_err(super::MigrationError::Socket)?;
            let session = tls::accept(&stream, identity)?;
            Conn::tls(stream, session)
        }
    })
}

/// Waits on `listener` until `deadline` for the source to connect again
/// (post-copy recovery). Of the connections waiting, the newest is taken
/// (the source gives up on one whose answer is slow and dials again); one
/// that fails the TLS handshake is refused and the wait goes on.
pub(crate) fn rejoin(
    listener: &std::net::TcpListener,
    tls: Option<&TlsIdentity>,
    stall_timeout: std::time::Duration,
    deadline: std::time::Instant,
) -> Result<Option<Conn>, super::MigrationError> {
    listener
        .set_nonblocking(true)
        .map_err(super::MigrationError::Socket)?;
    while std::time::Instant::now() < deadline {
        let mut newest = None;
        loop {
            match listener.accept() {
                Ok(accepted) => newest = Some(accepted),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(super::MigrationError::Socket(e)),
            }
        }
        let Some((stream, peer)) = newest else {
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        };
        stream
            .set_nonblocking(false)
            .map_err(super::MigrationError::Socket)?;
        match secure(stream, tls, stall_timeout) {
            Ok(conn) => {
                tracing::info!(%peer, "connection to resume post-copy");
                return Ok(Some(conn));
            }
            Err(e) => tracing::warn!(
                %peer,
                "refused a connection to resume post-copy: {}",
                crate::error_chain(&e)
            ),
        }
    }
    Ok(None)
}

/// An outgoing migration running in its own thread.
pub struct Outgoing {
    /// Pollable figures.
    pub progress: std::sync::Arc<super::ProgressHandle>,
    /// Set to cancel (before commit the guest stays here).
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The migration thread; its result once it ends.
    pub handle: std::thread::JoinHandle<Result<super::MigrationResult, super::MigrationError>>,
}

/// How the source secures an outgoing migration.
#[derive(Clone, Debug)]
pub struct OutgoingTls {
    /// This node's identity.
    pub identity: TlsIdentity,
    /// The name the target's certificate must carry (`None`: the host part
    /// of the target address, see [`tls::default_server_name`]).
    pub server_name: Option<String>,
}

/// Connects to the target at `addr` and migrates `vmm` there in a new
/// thread; with `tls`, after a mutually authenticated handshake.
pub fn start_outgoing(
    vmm: std::sync::Arc<Vmm>,
    addr: &str,
    opts: super::precopy::SendOptions,
    tls: Option<&OutgoingTls>,
) -> Result<Outgoing, super::MigrationError> {
    let stream = dial(addr, opts.stall_timeout, tls)?;
    let mut opts = opts;
    let (target, tls_again) = (addr.to_string(), tls.cloned());
    opts.reconnect = Some(super::precopy::Reconnect(std::sync::Arc::new(
        move |timeout| dial(&target, timeout, tls_again.as_ref()),
    )));
    let progress = std::sync::Arc::new(super::ProgressHandle::default());
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p, c) = (progress.clone(), cancel.clone());
    let handle = std::thread::Builder::new()
        .name("migrate-send".into())
        .spawn(move || super::precopy::send(&*vmm, stream, &opts, &p, &c))
        .map_err(super::MigrationError::Socket)?;
    Ok(Outgoing {
        progress,
        cancel,
        handle,
    })
}

/// Connects to `addr` and, with `tls`, runs the handshake (both bounded by
/// `timeout`).
pub fn dial(
    addr: &str,
    timeout: std::time::Duration,
    tls: Option<&OutgoingTls>,
) -> Result<Conn, super::MigrationError> {
    let tcp = connect(addr, timeout)?;
    Ok(match tls {
        None => Conn::plain(tcp),
        Some(t) => {
            let name = t
                .server_name
                .as_deref()
                .unwrap_or_else(|| tls::default_server_name(addr));
            let session = tls::connect(&tcp, &t.identity, name, timeout)?;
            Conn::tls(tcp, session)
        }
    })
}

/// Connects to `addr` (host:port), giving up after `timeout`.
pub fn connect(
    addr: &str,
    timeout: std::time::Duration,
) -> Result<std::net::TcpStream, super::MigrationError> {
    use std::net::ToSocketAddrs;
    let connect_err = |e| super::MigrationError::Connect(addr.to_string(), e);
    let sockaddr = addr
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| {
            connect_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no address",
            ))
        })?;
    std::net::TcpStream::connect_timeout(&sockaddr, timeout).map_err(connect_err)
}
