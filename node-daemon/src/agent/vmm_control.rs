//! The agent's one way to ask a VMM something: a request on its control
//! socket ([`crate::vmm::control`] serves it; version 1 of the protocol, one
//! JSON line each way).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Errors of a control request.
#[derive(Debug, thiserror::Error)]
pub enum VmmControlError {
    /// The VMM's control socket answered with an error or not at all.
    #[error("VMM control: {0}")]
    Request(String),
}

/// One request to a VMM's control socket.
pub fn control(sock: &Path, cmd: &str, args: Value) -> Result<Value, VmmControlError> {
    let mut request = json!({"v": 1, "cmd": cmd});
    if let (Value::Object(r), Value::Object(a)) = (&mut request, args) {
        r.extend(a);
    }
    let stream = UnixStream::connect(sock)
        .map_err(|e| VmmControlError::Request(format!("connect {}: {e}", sock.display())))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| VmmControlError::Request(e.to_string()))?;
    let mut line = request.to_string();
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .map_err(|e| VmmControlError::Request(format!("send {cmd}: {e}")))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| VmmControlError::Request(format!("read the answer to {cmd}: {e}")))?;
    let answer: Value = serde_json::from_str(&answer)
        .map_err(|e| VmmControlError::Request(format!("answer to {cmd} is not JSON: {e}")))?;
    if answer["ok"].as_bool() == Some(true) {
        Ok(answer["result"].clone())
    } else {
        Err(VmmControlError::Request(
            answer["error"]
                .as_str()
                .unwrap_or("no error text")
                .to_string(),
        ))
    }
}
