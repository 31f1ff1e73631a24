//! The control socket: a unix socket speaking versioned JSON, one request
//! object per line, one response object per line.
//!
//! ```text
//! -> {"v":1,"cmd":"status"}
//! <- {"v":1,"ok":true,"result":{"state":"running",...}}
//! -> {"v":1,"cmd":"save-state","dir":"/tmp/snap"}
//! <- {"v":1,"ok":true,"result":{"dir":"/tmp/snap"}}
//! -> {"v":9,"cmd":"status"}
//! <- {"v":1,"ok":false,"error":"Unsupported API version 9 (this VMM speaks 1); ..."}
//! ```
//! Commands: `status`, `pause`, `resume`, `stop`, `save-state {dir}`,
//! `stats`, `dirty-log-start`, `dirty-log-stop`, `take-dirty` (returns and
//! clears the dirty set; counts only).
//! Disks (numbered from 0 in `--disk` order): `disk-dirty-start {disk}` and
//! `disk-dirty-stop {disk}` turn changed-block tracking on and off;
//! `disk-take-dirty {disk}` returns and clears the changed blocks as byte
//! ranges (`{"granularity":65536,"blocks":N,"bytes":B,"ranges":[[off,len],...]}`).
//! Migration: `migrate-send {addr, ...policy}` starts an outgoing live
//! migration to a target started with `godwit-vmm --incoming ADDR` and returns
//! at once; `migrate-status` returns its progress (and, at the end, its result
//! or error); `migrate-cancel` cancels it (before commit the guest stays here).
//! `copy_disks: [i, ...]` copies those disks in the stream (live storage
//! migration, see [`crate::migration::storage`]).
//! A VMM started with `--tls-cert/--tls-key/--tls-ca` migrates over mutual
//! TLS only (see [`crate::migration::tls`]); `tls_server_name` then names what
//! the target's certificate must carry (default: the host part of `addr`).
//! `tls {cert, key, ca}` (PEM text) gives the identity in the request
//! instead: the node agent's way to reach a VMM that cannot read the key.
//! Unknown commands get an error, not a hang up.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Vmm, VmmError};
use crate::error_chain;
use crate::migration::connect::OutgoingTls;
use crate::migration::tls::{TlsError, TlsFiles, TlsIdentity, TlsPem};

/// API version this VMM speaks.
pub const API_VERSION: u32 = 1;

/// A request: `{"v":1,"cmd":"...", ...arguments}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// API version of the request.
    pub v: u32,
    /// The command.
    #[serde(flatten)]
    pub cmd: Command,
}

/// Control commands.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// VM state, config and counters.
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Stop the VM and exit the process.
    Stop,
    /// Pause and save a snapshot to `dir` (the VM stays paused).
    SaveState {
        /// Snapshot directory (created).
        dir: PathBuf,
    },
    /// Counters.
    Stats,
    /// Take (and clear) the dirty set; returns page counts per region.
    TakeDirty,
    /// Turn dirty logging on (clears the dirty set).
    DirtyLogStart,
    /// Turn dirty logging off.
    DirtyLogStop,
    /// Turn changed-block tracking on for a disk (clears its set).
    DiskDirtyStart {
        /// Disk index, from 0 in `--disk` order.
        disk: usize,
    },
    /// Turn changed-block tracking off for a disk.
    DiskDirtyStop {
        /// Disk index.
        disk: usize,
    },
    /// Take (and clear) a disk's changed blocks.
    DiskTakeDirty {
        /// Disk index.
        disk: usize,
    },
    /// Start a live migration to the target VMM listening at `addr`.
    MigrateSend {
        /// Target `host:port`.
        addr: String,
        /// The VM's name, checked by the target (optional).
        #[serde(default)]
        vm_name: Option<String>,
        /// Longest acceptable pause in ms (default 50).
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        /// Bandwidth cap in Mbit/s (default none).
        #[serde(default)]
        bandwidth_mbps: Option<u64>,
        /// Allow throttling the vCPUs (default true).
        #[serde(default)]
        allow_auto_converge: Option<bool>,
        /// Allow post-copy (default true).
        #[serde(default)]
        allow_post_copy: Option<bool>,
        /// Give up after this many seconds (default 600).
        #[serde(default)]
        timeout_s: Option<u64>,
        /// Fail when the target neither reads nor answers for this many
        /// seconds (default 10).
        #[serde(default)]
        stall_timeout_s: Option<u64>,
        /// In post-copy, how long to keep dialling the target after the
        /// link was lost (default 60; 0: a lost link loses the guest).
        #[serde(default)]
        recover_timeout_s: Option<u64>,
        /// With TLS: the name the target's certificate must carry (default:
        /// the host part of `addr`, an IP address as an IP SAN).
        #[serde(default)]
        tls_server_name: Option<String>,
        /// The migration identity as PEM, from the node agent: it replaces
        /// the one this VMM was started with (a renewed certificate reaches
        /// a VMM that runs as its own user and cannot read the key file).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<Box<TlsPem>>,
        /// Disks on node-local storage to copy in the stream (indices in
        /// `--disk` order; default none: every disk is on shared storage).
        /// The target's `--disk` for each must exist with the same size.
        #[serde(default)]
        copy_disks: Vec<usize>,
    },
    /// Progress of the current (or last) outgoing migration.
    MigrateStatus,
    /// Cancel the outgoing migration.
    MigrateCancel,
}

/// How long a source whose guest moved keeps answering before it exits.
pub const MIGRATED_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a source whose guest was lost in post-copy keeps answering
/// `migrate-status` before it exits as failed.
pub const LOST_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The outgoing migration of this process, if one was started.
static OUTGOING: std::sync::Mutex<Option<super::migrate::OutgoingMigration>> =
    std::sync::Mutex::new(None);

/// Where this VMM's migration identity comes from.
#[derive(Clone, Debug)]
enum Identity {
    /// PEM files, read again at each migration (renewed certificates are
    /// used).
    Files(TlsFiles),
    /// PEM text the node agent handed over (`--tls-fd`, or the last
    /// `migrate-send` that carried `tls`).
    Pem(TlsPem),
}

impl Identity {
    fn load(&self) -> Result<TlsIdentity, TlsError> {
        match self {
            Identity::Files(files) => TlsIdentity::load(files),
            Identity::Pem(pem) => TlsIdentity::from_pem(pem),
        }
    }
}

/// This VMM's migration identity, when it was given one.
static MIGRATION_TLS: std::sync::Mutex<Option<Identity>> = std::sync::Mutex::new(None);

fn set_identity(identity: Identity) -> Result<(), TlsError> {
    identity.load()?;
    *MIGRATION_TLS.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity);
    Ok(())
}

/// Makes every outgoing migration of this process use mutual TLS with the
/// identity in `files` (checked now; read again at each migration, so that
/// renewed certificates are used). Call before serving the socket.
pub fn use_migration_tls(files: TlsFiles) -> Result<(), TlsError> {
    set_identity(Identity::Files(files))
}

/// As [`use_migration_tls`], with the identity as PEM text (checked now).
pub fn use_migration_identity(pem: TlsPem) -> Result<(), TlsError> {
    set_identity(Identity::Pem(pem))
}

fn migrate_send(vmm: &Arc<Vmm>, cmd: Command) -> Result<Value, String> {
    let Command::MigrateSend {
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
    } = cmd
    else {
        unreachable!("called with migrate-send only")
    };
    if let Some(pem) = tls {
        use_migration_identity(*pem).map_err(|e| error_chain(&e))?;
    }
    let identity = MIGRATION_TLS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
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
    let mut slot = OUTGOING.lock().unwrap();
    if slot.as_ref().is_some_and(|o| !o.handle.is_finished()) {
        return Err("A migration is already running; see migrate-status".into());
    }
    let defaults = crate::migration::convergence::Policy::default();
    let opts = crate::migration::SendOptions {
        vm_name: vm_name.unwrap_or_default(),
        policy: crate::migration::convergence::Policy {
            max_downtime: max_downtime_ms
                .map(std::time::Duration::from_millis)
                .unwrap_or(defaults.max_downtime),
            allow_auto_converge: allow_auto_converge.unwrap_or(true),
            allow_post_copy: allow_post_copy.unwrap_or(true),
            ..defaults
        },
        bandwidth_limit: bandwidth_mbps.map(|m| m * 1_000_000 / 8),
        completion_timeout: std::time::Duration::from_secs(timeout_s.unwrap_or(600)),
        stall_timeout: std::time::Duration::from_secs(stall_timeout_s.unwrap_or(10)),
        disks: copy_disks,
        recover_timeout: recover_timeout_s
            .map(std::time::Duration::from_secs)
            .unwrap_or(crate::migration::RECOVER_TIMEOUT),
        // start_outgoing sets how to dial the target again.
        reconnect: None,
    };
    let out = super::migrate::start_outgoing(vmm.clone(), &addr, opts, tls.as_ref())
        .map_err(|e| error_chain(&e))?;
    *slot = Some(out);
    // When it ends well the guest runs on the target: stop the vCPUs for
    // good, keep answering migrate-status so the caller can read the result,
    // and exit on `stop` or after a grace period.
    let vmm = vmm.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let slot = OUTGOING.lock().unwrap();
        let Some(out) = slot.as_ref() else { return };
        if out.handle.is_finished() {
            let progress = out.progress.get();
            if progress.guest_lost {
                // The guest may have run on the target, which is gone:
                // what is here may be stale and must never run. Leave the
                // result readable for a moment, then fail so that the VM
                // is restarted.
                eprintln!("godwit-vmm: the migration broke after the guest may have moved; this copy will not resume; exiting");
                vmm.stop();
                drop(slot);
                std::thread::sleep(LOST_GRACE);
                vmm.fail(
                    "the migration broke after the guest may have moved to the target; the guest is lost".into(),
                );
                return;
            }
            if progress.stage == crate::migration::Stage::Completed {
                eprintln!("godwit-vmm: migrated to {addr}; exiting within {MIGRATED_GRACE:?}");
                vmm.stop();
                drop(slot);
                std::thread::sleep(MIGRATED_GRACE);
                vmm.request_stop();
            }
            return;
        }
    });
    Ok(json!({"started": true}))
}

fn migrate_status() -> Result<Value, String> {
    let slot = OUTGOING.lock().unwrap();
    let out = slot
        .as_ref()
        .ok_or("No migration has been started; send migrate-send first")?;
    Ok(serde_json::to_value(out.progress.get()).expect("progress serialises"))
}

/// A response: `{"v":1,"ok":true,"result":...}` or `{"v":1,"ok":false,"error":"..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    /// API version.
    pub v: u32,
    /// Success.
    pub ok: bool,
    /// Result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// One-line error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Parses one request line: a JSON object with `"v"` equal to
/// [`API_VERSION`] and a known `"cmd"`. The error is the one-line message the
/// client gets back.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let raw: Value = serde_json::from_str(line)
        .map_err(|e| format!("Request is not JSON ({e}); send one JSON object per line"))?;
    let v = raw.get("v").and_then(Value::as_u64).unwrap_or(0);
    if v != u64::from(API_VERSION) {
        return Err(format!(
            "Unsupported API version {v} (this VMM speaks {API_VERSION}); send \"v\":{API_VERSION}"
        ));
    }
    serde_json::from_value(raw).map_err(|e| format!("Bad request ({e}); commands: status, pause, resume, stop, save-state, stats, take-dirty, dirty-log-start, dirty-log-stop, disk-dirty-start, disk-dirty-stop, disk-take-dirty, migrate-send, migrate-status, migrate-cancel"))
}

/// Handles one request line.
pub fn handle(vmm: &Arc<Vmm>, line: &str) -> Response {
    let fail = |msg: String| Response {
        v: API_VERSION,
        ok: false,
        result: None,
        error: Some(msg),
    };
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let migration = match &req.cmd {
        Command::MigrateSend { .. } => Some(migrate_send(vmm, req.cmd.clone())),
        Command::MigrateStatus => Some(migrate_status()),
        Command::MigrateCancel => Some(migrate_status().map(|_| {
            if let Some(out) = OUTGOING.lock().unwrap().as_ref() {
                out.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            json!({"cancelling": true})
        })),
        _ => None,
    };
    if let Some(result) = migration {
        return match result {
            Ok(r) => Response {
                v: API_VERSION,
                ok: true,
                result: Some(r),
                error: None,
            },
            Err(e) => fail(e),
        };
    }
    let _guard = vmm.control_lock.lock().unwrap();
    let result: Result<Value, VmmError> = match req.cmd {
        Command::Status => Ok(json!({
            "state": if vmm.vcpus.is_paused() { "paused" } else { "running" },
            "config": vmm.config,
            "pid": std::process::id(),
        })),
        Command::Pause => {
            vmm.pause();
            Ok(json!({"state": "paused"}))
        }
        Command::Resume => {
            vmm.resume();
            Ok(json!({"state": "running"}))
        }
        // The stop itself happens in serve_conn, after the reply is sent.
        Command::Stop => Ok(json!({"state": "stopping"})),
        Command::SaveState { dir } => vmm.save_snapshot(&dir).map(|_| json!({"dir": dir})),
        Command::Stats => Ok(serde_json::to_value(vmm.stats()).expect("stats serialise")),
        Command::DirtyLogStart => vmm.set_dirty_log(true).map(|_| json!({"dirty_log": true})),
        Command::DirtyLogStop => vmm.set_dirty_log(false).map(|_| json!({"dirty_log": false})),
        Command::DiskDirtyStart { disk } => vmm
            .disk_dirty_start(disk)
            .map(|_| json!({"disk": disk, "dirty_tracking": true})),
        Command::DiskDirtyStop { disk } => vmm
            .disk_dirty_stop(disk)
            .map(|_| json!({"disk": disk, "dirty_tracking": false})),
        Command::DiskTakeDirty { disk } => vmm.disk_take_dirty(disk).map(|c| {
            json!({
                "disk": disk,
                "granularity": c.granularity,
                "blocks": c.count(),
                "bytes": c.bytes(),
                "ranges": c.ranges(),
            })
        }),
        Command::MigrateSend { .. } | Command::MigrateStatus | Command::MigrateCancel => {
            unreachable!("handled above")
        }
        Command::TakeDirty => vmm.take_dirty().map(|d| {
            json!({
                "regions": d.iter().map(|b| json!({"gpa": b.gpa, "size": b.size, "dirty_pages": b.count()})).collect::<Vec<_>>(),
                "dirty_pages": d.iter().map(|b| b.count()).sum::<u64>(),
            })
        }),
    };
    match result {
        Ok(r) => Response {
            v: API_VERSION,
            ok: true,
            result: Some(r),
            error: None,
        },
        Err(e) => fail(error_chain(&e)),
    }
}

/// Binds the control socket at `path` and serves it on a background thread.
pub fn serve(vmm: Arc<Vmm>, path: &Path) -> Result<(), VmmError> {
    let listener = super::private_socket::bind(path)
        .map_err(|e| VmmError::BindApi(path.display().to_string(), e))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let vmm = vmm.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_conn(&vmm, stream));
            }
        })
        .map_err(|e| VmmError::BindApi(path.display().to_string(), e))?;
    Ok(())
}

fn serve_conn(vmm: &Arc<Vmm>, stream: UnixStream) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let resp = handle(vmm, &line);
        let mut text = serde_json::to_string(&resp).expect("response serialises");
        text.push('\n');
        let ok = out.write_all(text.as_bytes()).is_ok();
        let is_stop = resp.ok
            && serde_json::from_str::<Request>(&line).is_ok_and(|r| matches!(r.cmd, Command::Stop));
        if is_stop {
            vmm.request_stop();
        }
        if !ok {
            return;
        }
    }
}
