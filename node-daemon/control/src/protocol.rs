//! Requests and the response envelope.
//!
//! A request is `{"v":1,"cmd":"<command>",...arguments}`; a response is
//! `{"v":1,"ok":true,"result":...}` or `{"v":1,"ok":false,"error":"..."}`.
//! A VMM answers a request of another version with an error that names the
//! version it speaks, and an unknown command with the list of commands.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tls::TlsPem;

/// The protocol version this crate speaks.
pub const API_VERSION: u32 = 1;

/// A request: `{"v":1,"cmd":"...", ...arguments}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version of the request.
    pub v: u32,
    /// The command and its arguments.
    #[serde(flatten)]
    pub cmd: Command,
}

impl Request {
    /// `cmd` at this crate's version.
    pub fn new(cmd: Command) -> Request {
        Request {
            v: API_VERSION,
            cmd,
        }
    }
}

/// The commands a VMM answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// VM state, config and process id ([`crate::VmmStatus`]).
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Stop the VM at once and exit the process (after the answer is sent):
    /// the forced stop.
    Stop,
    /// Press the ACPI power button: the guest shuts itself down (the VMM
    /// exits 0 when it writes S5). After `grace_secs` (default: the VMM's
    /// `--shutdown-grace-secs`) the VMM forces the stop. Refused by a VMM
    /// started with `--acpi off`.
    Shutdown {
        /// Seconds the guest gets before the forced stop.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_secs: Option<u64>,
    },
    /// Pause and save a snapshot to `dir` (the VM stays paused).
    SaveState {
        /// Snapshot directory (created).
        dir: std::path::PathBuf,
    },
    /// Counters ([`crate::Stats`]).
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
    /// Start a live migration; answers at once, see `migrate-status`.
    MigrateSend(MigrateSend),
    /// Progress of the current (or last) outgoing migration
    /// ([`crate::Progress`]).
    MigrateStatus,
    /// Cancel the outgoing migration (before commit the guest stays here).
    MigrateCancel,
}

impl Command {
    /// The command's name on the wire (`"migrate-send"`).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Stop => "stop",
            Command::Shutdown { .. } => "shutdown",
            Command::SaveState { .. } => "save-state",
            Command::Stats => "stats",
            Command::TakeDirty => "take-dirty",
            Command::DirtyLogStart => "dirty-log-start",
            Command::DirtyLogStop => "dirty-log-stop",
            Command::DiskDirtyStart { .. } => "disk-dirty-start",
            Command::DiskDirtyStop { .. } => "disk-dirty-stop",
            Command::DiskTakeDirty { .. } => "disk-take-dirty",
            Command::MigrateSend(_) => "migrate-send",
            Command::MigrateStatus => "migrate-status",
            Command::MigrateCancel => "migrate-cancel",
        }
    }
}

/// `migrate-send`: a live migration to a target started with
/// `godwit-vmm --incoming ADDR`. Every field but `addr` is optional; an
/// absent one takes the VMM's default.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MigrateSend {
    /// Target `host:port`.
    pub addr: String,
    /// The VM's name, checked by the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// Longest acceptable pause in ms (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap in Mbit/s (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mbps: Option<u64>,
    /// Allow throttling the vCPUs (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_auto_converge: Option<bool>,
    /// Allow post-copy (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_post_copy: Option<bool>,
    /// Give up after this many seconds (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Fail when the target neither reads nor answers for this many seconds
    /// (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_timeout_s: Option<u64>,
    /// In post-copy, how long to keep dialling the target after the link was
    /// lost (default 60; 0: a lost link loses the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recover_timeout_s: Option<u64>,
    /// With TLS: the name the target's certificate must carry (default: the
    /// host part of `addr`, an IP address as an IP SAN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// The migration identity as PEM, from the node agent: it replaces the
    /// one the VMM was started with (a renewed certificate reaches a VMM that
    /// runs as its own user and cannot read the key file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Box<TlsPem>>,
    /// Disks on node-local storage to copy in the stream (indices in
    /// `--disk` order; default none: every disk is on shared storage). The
    /// target's `--disk` for each must exist with the same size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy_disks: Vec<usize>,
}

impl MigrateSend {
    /// A migration to `addr` with every default.
    pub fn to(addr: impl Into<String>) -> MigrateSend {
        MigrateSend {
            addr: addr.into(),
            ..MigrateSend::default()
        }
    }
}

/// A response: `{"v":1,"ok":true,"result":...}` or
/// `{"v":1,"ok":false,"error":"..."}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
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

impl Response {
    /// A success carrying `result`.
    pub fn ok(result: impl Serialize) -> Response {
        Response {
            v: API_VERSION,
            ok: true,
            result: Some(serde_json::to_value(result).expect("results serialise")),
            error: None,
        }
    }

    /// A failure with a one-line message.
    pub fn err(message: impl Into<String>) -> Response {
        Response {
            v: API_VERSION,
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
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
    serde_json::from_value(raw).map_err(|e| format!("Bad request ({e}); commands: status, pause, resume, stop, shutdown, save-state, stats, take-dirty, dirty-log-start, dirty-log-stop, disk-dirty-start, disk-dirty-stop, disk-take-dirty, migrate-send, migrate-status, migrate-cancel"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn commands_round_trip_with_their_wire_names() {
        let all = [
            Command::Status,
            Command::Pause,
            Command::Resume,
            Command::Stop,
            Command::Shutdown { grace_secs: None },
            Command::Shutdown {
                grace_secs: Some(5),
            },
            Command::SaveState { dir: "/s".into() },
            Command::Stats,
            Command::TakeDirty,
            Command::DirtyLogStart,
            Command::DirtyLogStop,
            Command::DiskDirtyStart { disk: 1 },
            Command::DiskDirtyStop { disk: 1 },
            Command::DiskTakeDirty { disk: 1 },
            Command::MigrateSend(MigrateSend::to("10.0.0.2:9411")),
            Command::MigrateStatus,
            Command::MigrateCancel,
        ];
        for cmd in all {
            let line = serde_json::to_string(&Request::new(cmd.clone())).unwrap();
            let value: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(value["v"], 1, "{line}");
            assert_eq!(value["cmd"], cmd.name(), "{line}");
            let back = parse_request(&line).unwrap();
            assert_eq!(back.cmd.name(), cmd.name());
        }
    }

    #[test]
    fn migrate_send_leaves_out_what_is_not_set() {
        let req = Request::new(Command::MigrateSend(MigrateSend {
            max_downtime_ms: Some(30),
            ..MigrateSend::to("h:1")
        }));
        assert_eq!(
            serde_json::to_value(req).unwrap(),
            json!({"v": 1, "cmd": "migrate-send", "addr": "h:1", "max_downtime_ms": 30})
        );
    }

    #[test]
    fn other_versions_and_unknown_commands_are_refused_with_what_to_send() {
        let e = parse_request(r#"{"v":9,"cmd":"status"}"#).unwrap_err();
        assert!(
            e.contains("Unsupported API version 9") && e.contains("\"v\":1"),
            "{e}"
        );
        let e = parse_request(r#"{"v":1,"cmd":"fly"}"#).unwrap_err();
        assert!(
            e.contains("Bad request") && e.contains("migrate-send"),
            "{e}"
        );
        let e = parse_request("status").unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        let e = parse_request(r#"{"v":1,"cmd":"migrate-send"}"#).unwrap_err();
        assert!(e.contains("addr"), "{e}");
    }
}
