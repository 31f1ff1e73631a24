//! The VMM side of the control socket: [`ControlServer`] answers the
//! requests of [`godwit_vmm_control`] (the protocol and its client live
//! there) for one VM.
//!
//! Commands: `status`, `pause`, `resume`, `stop` (the forced stop),
//! `shutdown {grace_secs}` (presses the ACPI power button, then forces the
//! stop after the grace period unless the guest powered off; refused
//! without ACPI), `save-state {dir}`,
//! `stats`, `dirty-log-start`, `dirty-log-stop`, `take-dirty` (returns and
//! clears the dirty set; counts only). Disks (numbered from 0 in `--disk`
//! order): `disk-dirty-start {disk}` and `disk-dirty-stop {disk}` turn
//! changed-block tracking on and off; `disk-take-dirty {disk}` returns and
//! clears the changed blocks as byte ranges.
//! Migration: `migrate-send {addr, ...policy}` starts an outgoing live
//! migration to a target started with `godwit-vmm --incoming ADDR` and
//! answers at once; `migrate-status` returns its progress (and, at the end,
//! its result or error); `migrate-cancel` cancels it (before commit the
//! guest stays here). `copy_disks: [i, ...]` copies those disks in the
//! stream (live storage migration).
//! A VMM given a migration identity ([`MigrationIdentity`]) migrates over
//! mutual TLS only; `tls_server_name` then names what the target's
//! certificate must carry (default: the host part of `addr`). `tls {cert,
//! key, ca}` (PEM text) in a `migrate-send` replaces the identity: the node
//! agent's way to reach a VMM that cannot read the key.
//! Unknown commands get an error, not a hang up.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use godwit_vmm_control::{
    parse_request, Cancelling, ChangedBlocks, Command, DirtyLog, DirtyRegion, DirtySet,
    DiskTracking, MigrateSend, Progress, Response, RunState, Runs, Saved, ShuttingDown, Stage,
    Started, VmmStatus,
};

use super::migrate::OutgoingMigration;
use super::{Vmm, VmmError};
use crate::migration::connect::OutgoingTls;
use crate::migration::tls::{TlsError, TlsFiles, TlsIdentity, TlsPem};
use godwit_crds::error_chain;

/// How long a source whose guest moved keeps answering before it exits.
pub const MIGRATED_GRACE: Duration = Duration::from_secs(30);

/// How long a source whose guest was lost in post-copy keeps answering
/// `migrate-status` before it exits as failed.
pub const LOST_GRACE: Duration = Duration::from_secs(3);

/// Where a VMM's migration identity comes from.
#[derive(Clone, Debug)]
pub enum MigrationIdentity {
    /// PEM files, read again at each migration (renewed certificates are
    /// used).
    Files(TlsFiles),
    /// PEM text the node agent handed over (`--tls-fd`, or the last
    /// `migrate-send` that carried `tls`).
    Pem(TlsPem),
}

impl MigrationIdentity {
    /// An identity from files, checked now.
    pub fn from_files(files: TlsFiles) -> Result<MigrationIdentity, TlsError> {
        let identity = MigrationIdentity::Files(files);
        identity.load()?;
        Ok(identity)
    }

    /// An identity from PEM text, checked now.
    pub fn from_pem(pem: TlsPem) -> Result<MigrationIdentity, TlsError> {
        let identity = MigrationIdentity::Pem(pem);
        identity.load()?;
        Ok(identity)
    }

    fn load(&self) -> Result<TlsIdentity, TlsError> {
        match self {
            MigrationIdentity::Files(files) => TlsIdentity::load(files),
            MigrationIdentity::Pem(pem) => TlsIdentity::from_pem(pem),
        }
    }
}

/// Answers the control requests of one VM.
pub struct ControlServer {
    vmm: Arc<Vmm>,
    /// The identity outgoing migrations use; none: plain TCP.
    identity: Mutex<Option<MigrationIdentity>>,
    /// The outgoing migration of this process, once one was started.
    outgoing: Mutex<Option<OutgoingMigration>>,
    /// How long a `shutdown` without `grace_secs` waits for the guest.
    shutdown_grace: Duration,
}

/// Locks `m`, taking over a lock whose holder panicked (the data are plain
/// figures and handles, valid at any point).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ControlServer {
    /// A server for `vmm`; with `identity`, outgoing migrations use mutual
    /// TLS; a `shutdown` without its own grace waits `shutdown_grace`.
    pub fn new(
        vmm: Arc<Vmm>,
        identity: Option<MigrationIdentity>,
        shutdown_grace: Duration,
    ) -> Arc<ControlServer> {
        Arc::new(ControlServer {
            vmm,
            identity: Mutex::new(identity),
            outgoing: Mutex::new(None),
            shutdown_grace,
        })
    }

    /// Binds the control socket at `path` and serves it on a background
    /// thread, one thread per connection.
    pub fn serve(self: &Arc<Self>, path: &Path) -> Result<(), VmmError> {
        let listener = super::private_socket::bind(path)
            .map_err(|e| VmmError::BindApi(path.display().to_string(), e))?;
        let server = self.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let server = server.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || server.serve_conn(stream));
                }
            })
            .map_err(|e| VmmError::BindApi(path.display().to_string(), e))?;
        Ok(())
    }

    fn serve_conn(self: &Arc<Self>, stream: UnixStream) {
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if line.trim().is_empty() {
                continue;
            }
            let (resp, stop) = self.answer(&line);
            let mut text = serde_json::to_string(&resp).expect("response serialises");
            text.push('\n');
            let sent = out.write_all(text.as_bytes()).is_ok();
            // The stop itself happens after the reply is sent.
            if stop {
                self.vmm.request_stop();
            }
            if !sent {
                return;
            }
        }
    }

    /// Answers one request line; true when the answer is an accepted
    /// `stop`.
    pub fn answer(self: &Arc<Self>, line: &str) -> (Response, bool) {
        let cmd = match parse_request(line) {
            Ok(r) => r.cmd,
            Err(e) => return (Response::err(e), false),
        };
        let stop = matches!(cmd, Command::Stop);
        let resp = match cmd {
            Command::MigrateSend(send) => self.migrate_send(send).map(Response::ok),
            Command::MigrateStatus => self.migrate_status().map(Response::ok),
            Command::MigrateCancel => self.migrate_cancel().map(Response::ok),
            cmd => {
                let _guard = lock(&self.vmm.control_lock);
                self.vm_command(cmd).map_err(|e| error_chain(&e))
            }
        };
        match resp {
            Ok(r) => (r, stop),
            Err(e) => (Response::err(e), false),
        }
    }

    /// The commands that act on the VM itself (under its control lock).
    fn vm_command(&self, cmd: Command) -> Result<Response, VmmError> {
        let vmm = &self.vmm;
        let runs = |state| Response::ok(Runs { state });
        Ok(match cmd {
            Command::Status => Response::ok(VmmStatus {
                state: if vmm.vcpus.is_paused() {
                    RunState::Paused
                } else {
                    RunState::Running
                },
                config: serde_json::to_value(&vmm.config).expect("config serialises"),
                pid: std::process::id(),
            }),
            Command::Pause => {
                vmm.pause();
                runs(RunState::Paused)
            }
            Command::Resume => {
                vmm.resume();
                runs(RunState::Running)
            }
            Command::Stop => runs(RunState::Stopping),
            Command::Shutdown { grace_secs } => {
                let grace = grace_secs
                    .map(Duration::from_secs)
                    .unwrap_or(self.shutdown_grace);
                vmm.press_power_button()?;
                vmm.force_stop_after(grace)?;
                Response::ok(ShuttingDown {
                    power_button: true,
                    grace_secs: grace.as_secs(),
                })
            }
            Command::SaveState { dir } => {
                vmm.save_snapshot(&dir)?;
                Response::ok(Saved { dir })
            }
            Command::Stats => Response::ok(vmm.stats()),
            Command::DirtyLogStart | Command::DirtyLogStop => {
                let on = matches!(cmd, Command::DirtyLogStart);
                vmm.set_dirty_log(on)?;
                Response::ok(DirtyLog { dirty_log: on })
            }
            Command::DiskDirtyStart { disk } => {
                vmm.disk_dirty_start(disk)?;
                Response::ok(DiskTracking {
                    disk,
                    dirty_tracking: true,
                })
            }
            Command::DiskDirtyStop { disk } => {
                vmm.disk_dirty_stop(disk)?;
                Response::ok(DiskTracking {
                    disk,
                    dirty_tracking: false,
                })
            }
            Command::DiskTakeDirty { disk } => {
                let c = vmm.disk_take_dirty(disk)?;
                Response::ok(ChangedBlocks {
                    disk,
                    granularity: c.granularity,
                    blocks: c.count(),
                    bytes: c.bytes(),
                    ranges: c.ranges(),
                })
            }
            Command::TakeDirty => {
                let d = vmm.take_dirty()?;
                Response::ok(DirtySet {
                    regions: d
                        .iter()
                        .map(|b| DirtyRegion {
                            gpa: b.gpa,
                            size: b.size,
                            dirty_pages: b.count(),
                        })
                        .collect(),
                    dirty_pages: d.iter().map(|b| b.count()).sum(),
                })
            }
            Command::MigrateSend(_) | Command::MigrateStatus | Command::MigrateCancel => {
                unreachable!("migration commands are answered by their own methods")
            }
        })
    }

    fn migrate_send(self: &Arc<Self>, send: MigrateSend) -> Result<Started, String> {
        let MigrateSend {
            addr,
            vm_name,
            max_downtime_ms,
            bandwidth_mbps,
            allow_auto_converge,
            allow_post_copy,
            timeout_s,
            stall_timeout_s,
            recover_timeout_s,
            tls_server_name,
            tls,
            copy_disks,
        } = send;
        if let Some(pem) = tls {
            let identity = MigrationIdentity::from_pem(*pem).map_err(|e| error_chain(&e))?;
            *lock(&self.identity) = Some(identity);
        }
        let identity = lock(&self.identity).clone();
        let tls = match (identity, tls_server_name) {
            (Some(identity), server_name) => Some(OutgoingTls {
                identity: identity.load().map_err(|e| error_chain(&e))?,
                server_name,
            }),
            (None, Some(_)) => {
                return Err("tls_server_name given, but this VMM was started without TLS (--tls-cert, --tls-key, --tls-ca)".into())
            }
            (None, None) => None,
        };
        let mut slot = lock(&self.outgoing);
        if slot.as_ref().is_some_and(|o| !o.handle.is_finished()) {
            return Err("A migration is already running; see migrate-status".into());
        }
        let defaults = crate::migration::convergence::Policy::default();
        let opts = crate::migration::SendOptions {
            vm_name: vm_name.unwrap_or_default(),
            policy: crate::migration::convergence::Policy {
                max_downtime: max_downtime_ms
                    .map(Duration::from_millis)
                    .unwrap_or(defaults.max_downtime),
                allow_auto_converge: allow_auto_converge.unwrap_or(true),
                allow_post_copy: allow_post_copy.unwrap_or(true),
                ..defaults
            },
            bandwidth_limit: bandwidth_mbps.map(|m| m * 1_000_000 / 8),
            completion_timeout: Duration::from_secs(timeout_s.unwrap_or(600)),
            stall_timeout: Duration::from_secs(stall_timeout_s.unwrap_or(10)),
            disks: copy_disks,
            recover_timeout: recover_timeout_s
                .map(Duration::from_secs)
                .unwrap_or(crate::migration::RECOVER_TIMEOUT),
            // start_outgoing sets how to dial the target again.
            reconnect: None,
        };
        let out = super::migrate::start_outgoing(self.vmm.clone(), &addr, opts, tls.as_ref())
            .map_err(|e| error_chain(&e))?;
        *slot = Some(out);
        drop(slot);
        let server = self.clone();
        std::thread::spawn(move || server.after_migration(&addr));
        Ok(Started { started: true })
    }

    /// Waits for the outgoing migration to end. When it ended well the guest
    /// runs on the target: stop the vCPUs for good, keep answering
    /// `migrate-status` so the caller can read the result, and exit on
    /// `stop` or after a grace period.
    fn after_migration(&self, addr: &str) {
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let slot = lock(&self.outgoing);
            let Some(out) = slot.as_ref() else { return };
            if !out.handle.is_finished() {
                continue;
            }
            let progress = out.progress.get();
            drop(slot);
            if progress.guest_lost {
                // The guest may have run on the target, which is gone: what
                // is here may be stale and must never run. Leave the result
                // readable for a moment, then fail so that the VM is
                // restarted.
                eprintln!("godwit-vmm: the migration broke after the guest may have moved; this copy will not resume; exiting");
                self.vmm.stop();
                std::thread::sleep(LOST_GRACE);
                self.vmm.fail(
                    "the migration broke after the guest may have moved to the target; the guest is lost".into(),
                );
            } else if progress.stage == Stage::Completed {
                eprintln!("godwit-vmm: migrated to {addr}; exiting within {MIGRATED_GRACE:?}");
                self.vmm.stop();
                std::thread::sleep(MIGRATED_GRACE);
                self.vmm.request_stop();
            }
            return;
        }
    }

    fn migrate_status(&self) -> Result<Progress, String> {
        lock(&self.outgoing)
            .as_ref()
            .map(|out| out.progress.get())
            .ok_or_else(|| "No migration has been started; send migrate-send first".into())
    }

    fn migrate_cancel(&self) -> Result<Cancelling, String> {
        let slot = lock(&self.outgoing);
        let out = slot
            .as_ref()
            .ok_or("No migration has been started; send migrate-send first")?;
        out.cancel.store(true, Ordering::Relaxed);
        Ok(Cancelling { cancelling: true })
    }
}
