//! [`ControlClient`]: the one client of a VMM's control socket.
//!
//! Each call opens a connection, sends one request line, reads one response
//! line and closes, so a client holds nothing between calls and a VMM that
//! restarted is simply reached again. Calls block; async callers run them on
//! a blocking thread.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::progress::Progress;
use crate::protocol::{Command, MigrateSend, Request, Response};
use crate::results::{
    Cancelling, ChangedBlocks, DirtyLog, DirtySet, DiskTracking, Runs, Saved, ShuttingDown,
    Started, Stats, VmmStatus,
};

/// How long a call waits for its answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached (no VMM there, or it exited).
    #[error("Cannot connect to the VMM's control socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// Sending the request failed.
    #[error("Cannot send {0} to the VMM")]
    Send(&'static str, #[source] std::io::Error),
    /// Reading the answer failed or timed out.
    #[error("No answer from the VMM to {0}")]
    Receive(&'static str, #[source] std::io::Error),
    /// The VMM closed the connection without answering.
    #[error("The VMM closed the connection without answering {0}")]
    Closed(&'static str),
    /// The answer is not a response line.
    #[error("The VMM's answer to {command} is not a control response: {line}")]
    BadResponse {
        /// The command asked.
        command: &'static str,
        /// What came back.
        line: String,
    },
    /// The answer's result is not what the command returns.
    #[error("The VMM's result for {command} is not what this client expects")]
    BadResult {
        /// The command asked.
        command: &'static str,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The VMM refused or failed the command; its one-line reason.
    #[error("The VMM refused {command}: {reason}")]
    Refused {
        /// The command asked.
        command: &'static str,
        /// The VMM's error text.
        reason: String,
    },
}

impl ControlError {
    /// The VMM's own reason when it refused the command.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            ControlError::Refused { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// A client of one VMM's control socket.
#[derive(Clone, Debug)]
pub struct ControlClient {
    path: PathBuf,
    timeout: Duration,
}

impl ControlClient {
    /// A client of the socket at `path` (nothing is opened yet).
    pub fn new(path: impl Into<PathBuf>) -> ControlClient {
        ControlClient {
            path: path.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another answer timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> ControlClient {
        self.timeout = timeout;
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one line as it is and returns the response envelope, whether
    /// the VMM accepted it or not. For tests of what a VMM does with a
    /// malformed or unknown request; everything else uses the typed calls.
    pub fn send_line(&self, line: &str) -> Result<Response, ControlError> {
        self.exchange("a raw request", line)
    }

    /// Sends `cmd` and returns the result of a success as JSON.
    pub fn call(&self, cmd: Command) -> Result<serde_json::Value, ControlError> {
        let name = cmd.name();
        let line = serde_json::to_string(&Request::new(cmd)).expect("requests serialise");
        let response = self.exchange(name, &line)?;
        if response.ok {
            Ok(response.result.unwrap_or_default())
        } else {
            Err(ControlError::Refused {
                command: name,
                reason: response
                    .error
                    .unwrap_or_else(|| "no reason given".to_string()),
            })
        }
    }

    /// Sends `cmd` and reads the result of a success as `T`.
    pub fn call_as<T: DeserializeOwned>(&self, cmd: Command) -> Result<T, ControlError> {
        let command = cmd.name();
        let value = self.call(cmd)?;
        serde_json::from_value(value).map_err(|source| ControlError::BadResult { command, source })
    }

    fn exchange(&self, command: &'static str, line: &str) -> Result<Response, ControlError> {
        let stream = UnixStream::connect(&self.path)
            .map_err(|e| ControlError::Connect(self.path.clone(), e))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(|e| ControlError::Receive(command, e))?;
        let mut text = line.trim_end().to_string();
        text.push('\n');
        (&stream)
            .write_all(text.as_bytes())
            .map_err(|e| ControlError::Send(command, e))?;
        let mut answer = String::new();
        let n = BufReader::new(&stream)
            .read_line(&mut answer)
            .map_err(|e| ControlError::Receive(command, e))?;
        if n == 0 {
            return Err(ControlError::Closed(command));
        }
        serde_json::from_str(&answer).map_err(|_| ControlError::BadResponse {
            command,
            line: answer.trim_end().to_string(),
        })
    }

    /// `status`: the VM's state, config and process id.
    pub fn status(&self) -> Result<VmmStatus, ControlError> {
        self.call_as(Command::Status)
    }

    /// `pause`: stops the vCPUs.
    pub fn pause(&self) -> Result<Runs, ControlError> {
        self.call_as(Command::Pause)
    }

    /// `resume`: runs the vCPUs again.
    pub fn resume(&self) -> Result<Runs, ControlError> {
        self.call_as(Command::Resume)
    }

    /// `stop`: stops the VM; the process exits after answering.
    pub fn stop(&self) -> Result<Runs, ControlError> {
        self.call_as(Command::Stop)
    }

    /// `shutdown`: presses the power button; the VMM forces the stop after
    /// `grace` (default: its `--shutdown-grace-secs`).
    pub fn shutdown(&self, grace: Option<Duration>) -> Result<ShuttingDown, ControlError> {
        self.call_as(Command::Shutdown {
            grace_secs: grace.map(|g| g.as_secs()),
        })
    }

    /// `save-state`: pauses and writes a snapshot to `dir`.
    pub fn save_state(&self, dir: impl Into<PathBuf>) -> Result<Saved, ControlError> {
        self.call_as(Command::SaveState { dir: dir.into() })
    }

    /// `stats`: the VMM's counters.
    pub fn stats(&self) -> Result<Stats, ControlError> {
        self.call_as(Command::Stats)
    }

    /// `dirty-log-start` (`on`) or `dirty-log-stop`.
    pub fn dirty_log(&self, on: bool) -> Result<DirtyLog, ControlError> {
        self.call_as(if on {
            Command::DirtyLogStart
        } else {
            Command::DirtyLogStop
        })
    }

    /// `take-dirty`: takes and clears the dirty set.
    pub fn take_dirty(&self) -> Result<DirtySet, ControlError> {
        self.call_as(Command::TakeDirty)
    }

    /// `disk-dirty-start` (`on`) or `disk-dirty-stop` for `disk`.
    pub fn disk_tracking(&self, disk: usize, on: bool) -> Result<DiskTracking, ControlError> {
        self.call_as(if on {
            Command::DiskDirtyStart { disk }
        } else {
            Command::DiskDirtyStop { disk }
        })
    }

    /// `disk-take-dirty`: takes and clears `disk`'s changed blocks.
    pub fn disk_take_dirty(&self, disk: usize) -> Result<ChangedBlocks, ControlError> {
        self.call_as(Command::DiskTakeDirty { disk })
    }

    /// `migrate-send`: starts an outgoing live migration.
    pub fn migrate_send(&self, send: MigrateSend) -> Result<Started, ControlError> {
        self.call_as(Command::MigrateSend(send))
    }

    /// `migrate-status`: the outgoing migration's progress (and at its end
    /// its result or error).
    pub fn migrate_status(&self) -> Result<Progress, ControlError> {
        self.call_as(Command::MigrateStatus)
    }

    /// `migrate-cancel`: asks the outgoing migration to stop.
    pub fn migrate_cancel(&self) -> Result<Cancelling, ControlError> {
        self.call_as(Command::MigrateCancel)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A one-connection server that answers with `answer` and hands back the
    /// line it got.
    fn serve_once(answer: &'static str) -> (ControlClient, std::thread::JoinHandle<String>) {
        let dir = std::env::temp_dir().join(format!(
            "godwit-control-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            (&stream).write_all(answer.as_bytes()).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            line
        });
        (
            ControlClient::new(path).with_timeout(Duration::from_secs(5)),
            server,
        )
    }

    #[test]
    fn a_refusal_carries_the_vmms_reason() {
        let (client, server) =
            serve_once("{\"v\":1,\"ok\":false,\"error\":\"No migration has been started\"}\n");
        let e = client.migrate_status().unwrap_err();
        assert_eq!(e.refusal(), Some("No migration has been started"));
        assert!(e.to_string().contains("migrate-status"), "{e}");
        assert_eq!(
            server.join().unwrap(),
            "{\"v\":1,\"cmd\":\"migrate-status\"}\n"
        );
    }

    #[test]
    fn a_result_of_the_wrong_shape_is_an_error_not_a_default() {
        let (client, server) =
            serve_once("{\"v\":1,\"ok\":true,\"result\":{\"state\":\"lost\"}}\n");
        let e = client.pause().unwrap_err();
        assert!(
            matches!(
                e,
                ControlError::BadResult {
                    command: "pause",
                    ..
                }
            ),
            "{e:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_line_that_is_not_a_response_is_named_in_the_error() {
        let (client, server) = serve_once("hello\n");
        let e = client.status().unwrap_err();
        assert!(e.to_string().contains("hello"), "{e}");
        server.join().unwrap();
    }

    #[test]
    fn no_vmm_is_a_connect_error_naming_the_socket() {
        let client = ControlClient::new("/nonexistent/godwit/api.sock");
        let e = client.status().unwrap_err();
        assert!(matches!(e, ControlError::Connect(..)), "{e:?}");
        assert!(
            e.to_string().contains("/nonexistent/godwit/api.sock"),
            "{e}"
        );
    }
}
