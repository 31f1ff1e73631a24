//! `console`: the VM's serial console through the Kubernetes API server.
//!
//! The CLI opens a WebSocket to
//! `/apis/subresources.godwit.dev/v1/namespaces/<ns>/virtualmachines/<name>/console`
//! with the kubeconfig's credentials; the API server authorizes it (RBAC
//! `get` on `virtualmachines/console`) and proxies it to the operator's
//! console API, which reaches the node (see `godwit_operator::console_api`).
//! No node address is needed. Bytes travel in Kubernetes' channel protocol
//! (`v4.channel.k8s.io`): channel 0 carries what is typed, 1 what the
//! guest writes.
//!
//! The local terminal is put in raw mode so that every key (Ctrl-C
//! included) goes to the guest; `Ctrl-]` ([`ESCAPE`]) detaches, as in
//! telnet, and the terminal is restored however the session ends.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use godwit_crds::contract::{SUBRESOURCES_API_SERVICE, SUBRESOURCES_GROUP, SUBRESOURCES_VERSION};
use kube::Client;
use tokio_tungstenite::tungstenite::Message;

/// The detach key: Ctrl-] (0x1d).
pub const ESCAPE: u8 = 0x1d;

/// How long output is still shown after the end of standard input.
const LINGER: Duration = Duration::from_secs(1);

/// Why the console could not be reached or relayed.
#[derive(Debug, thiserror::Error)]
#[error("Console: {0}")]
pub struct ConsoleError(pub String);

/// Where a console is.
pub struct Target {
    /// The VM's namespace.
    pub namespace: String,
    /// The VM's name.
    pub name: String,
    /// The VM's node (for messages).
    pub node: String,
}

/// Puts a terminal in raw mode until dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on `fd` when it is a terminal; `None` otherwise.
    fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: a zeroed termios is a valid value to pass for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open for the whole call and `saved` is a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: as above; `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from the same fd in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The console's path in the aggregated API.
pub fn console_path(namespace: &str, name: &str) -> String {
    format!(
        "/apis/{SUBRESOURCES_GROUP}/{SUBRESOURCES_VERSION}/namespaces/{namespace}/virtualmachines/{name}/console"
    )
}

/// What a refused connection means, with what to do.
pub(crate) fn refused(e: kube::Error) -> ConsoleError {
    match e {
        kube::Error::Api(s) if s.code == 404 && s.message.contains("could not find the requested resource") => {
            ConsoleError(format!(
                "the API server does not serve {SUBRESOURCES_GROUP}: install the chart's APIService \
                 {SUBRESOURCES_API_SERVICE} and check `kubectl get apiservice {SUBRESOURCES_API_SERVICE}`"
            ))
        }
        kube::Error::Api(s) => ConsoleError(format!("{} ({})", s.message, s.code)),
        e => ConsoleError(format!("cannot connect through the API server: {e}")),
    }
}

/// Reads standard input on a thread of its own (a terminal read blocks);
/// an empty chunk is the end of input.
pub(crate) fn stdin_chunks() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let fd = std::io::stdin().as_raw_fd();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into `buf`, which is valid for `buf.len()` bytes.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            let chunk = if n <= 0 {
                Vec::new()
            } else {
                buf[..n as usize].to_vec()
            };
            let end = chunk.is_empty();
            if tx.blocking_send(chunk).is_err() || end {
                return;
            }
        }
    });
    rx
}

/// Attaches the terminal to the console until Ctrl-] or the end of the stream.
pub async fn attach(client: &Client, t: &Target) -> Result<(), ConsoleError> {
    let request = http::Request::get(console_path(&t.namespace, &t.name))
        .body(Vec::new())
        .map_err(|e| ConsoleError(e.to_string()))?;
    let ws = client
        .connect(request)
        .await
        .map_err(refused)?
        .into_stream();
    let (mut to_vm, mut from_vm) = ws.split();
    let in_fd = std::io::stdin().as_raw_fd();
    // Raw before the banner, so that keys typed once it shows reach the
    // guest unchanged; messages go to stderr, with \r\n as the terminal is raw.
    let raw = RawMode::enter(in_fd);
    eprint!(
        "Connected to VM {}/{} on {}. Escape character is '^]'.\r\n",
        t.namespace, t.name, t.node
    );
    let mut input = stdin_chunks();
    let mut out = std::io::stdout();
    // After the end of input, output is still shown for a moment (the
    // guest's answer to the last line), then the session ends.
    let linger = tokio::time::sleep(Duration::MAX);
    tokio::pin!(linger);
    let mut input_open = true;
    let ended: Result<&str, ConsoleError> = loop {
        tokio::select! {
            message = from_vm.next() => match message {
                Some(Ok(Message::Binary(data))) => {
                    if let Some((1 | 2, shown)) = data.split_first() {
                        let _ = out.write_all(shown);
                        let _ = out.flush();
                    }
                }
                Some(Ok(Message::Close(_))) | None => break Ok("the console closed"),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(ConsoleError(format!("the connection failed: {e}"))),
            },
            chunk = input.recv(), if input_open => {
                let chunk = chunk.unwrap_or_default();
                if chunk.is_empty() {
                    input_open = false;
                    linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
                    continue;
                }
                let (send, detach) = match chunk.iter().position(|b| *b == ESCAPE) {
                    Some(i) => (&chunk[..i], true),
                    None => (&chunk[..], false),
                };
                if !send.is_empty() {
                    let mut framed = Vec::with_capacity(send.len() + 1);
                    framed.push(0);
                    framed.extend_from_slice(send);
                    if to_vm.send(Message::Binary(framed.into())).await.is_err() {
                        break Ok("the console closed");
                    }
                }
                if detach {
                    break Ok("detached");
                }
            }
            () = &mut linger => break Ok("end of input"),
        }
    };
    drop(raw);
    let _ = to_vm.close().await;
    match ended {
        Ok(why) => {
            eprintln!("\r\nConsole of {}/{}: {why}.", t.namespace, t.name);
            Ok(())
        }
        Err(e) => Err(e),
    }
}
