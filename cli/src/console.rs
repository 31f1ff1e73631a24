//! `console`: the VM's serial console through the node daemon.
//!
//! The CLI connects to the node daemon's console endpoint (the node's
//! InternalIP, port `godwit_crds::contract::CONSOLE_PORT` unless `--port`),
//! names the VM in a one-line request, and after the daemon's `OK` copies
//! bytes both ways. The local terminal is put in raw mode so that every key
//! (Ctrl-C included) goes to the guest; `Ctrl-]` ([`ESCAPE`]) detaches, as in
//! telnet, and the terminal is restored however the session ends.
//!
//! One `poll(2)` loop over standard input and the socket: no threads, so the
//! session ends as soon as either side is done.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use godwit_crds::contract::CONSOLE_HELLO;

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
    /// `ip:port` of the node daemon's console endpoint.
    pub addr: String,
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

/// Connects and asks for the console; the stream once the daemon said OK.
fn open(t: &Target) -> Result<TcpStream, ConsoleError> {
    let addr: std::net::SocketAddr = t
        .addr
        .parse()
        .map_err(|e| ConsoleError(format!("bad address {}: {e}", t.addr)))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| {
        ConsoleError(format!(
            "cannot reach the node daemon of {} at {}: {e}; is godwit-node running there with --console-addr?",
            t.node, t.addr
        ))
    })?;
    let mut w = stream
        .try_clone()
        .map_err(|e| ConsoleError(e.to_string()))?;
    writeln!(w, "{CONSOLE_HELLO} {}/{}", t.namespace, t.name)
        .map_err(|e| ConsoleError(format!("send the request: {e}")))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| ConsoleError(e.to_string()))?;
    // Read the answer byte by byte so no console output after it is consumed.
    let mut answer = Vec::new();
    let mut r = BufReader::with_capacity(1, &stream);
    r.read_until(b'\n', &mut answer)
        .map_err(|e| ConsoleError(format!("no answer from {}: {e}", t.addr)))?;
    let answer = String::from_utf8_lossy(&answer).trim().to_string();
    if answer != "OK" {
        let why = answer.strip_prefix("ERR ").unwrap_or(&answer);
        return Err(ConsoleError(format!(
            "the node daemon of {} refused: {why}",
            t.node
        )));
    }
    stream
        .set_read_timeout(None)
        .map_err(|e| ConsoleError(e.to_string()))?;
    Ok(stream)
}

/// Attaches the terminal to the console until Ctrl-] or the end of the stream.
pub fn attach(t: &Target) -> Result<(), ConsoleError> {
    let mut stream = open(t)?;
    let stdin = std::io::stdin();
    let in_fd = stdin.as_raw_fd();
    let mut out = std::io::stdout();
    // Raw before the banner, so that keys typed once it shows reach the
    // guest unchanged; messages go to stderr, with \r\n as the terminal is raw.
    let raw = RawMode::enter(in_fd);
    eprint!(
        "Connected to VM {}/{} on {}. Escape character is '^]'.\r\n",
        t.namespace, t.name, t.node
    );
    let mut buf = [0u8; 4096];
    let sock_fd = stream.as_raw_fd();
    let mut stdin_open = true;
    // After the end of input, output is still shown for a moment (the
    // guest's answer to the last line), then the session ends.
    let mut linger_until: Option<std::time::Instant> = None;
    let ended = loop {
        let timeout = match linger_until {
            Some(t) => {
                let left = t.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break Ok("end of input");
                }
                left.as_millis() as i32
            }
            None => -1,
        };
        let mut fds = [
            libc::pollfd {
                fd: sock_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if stdin_open { in_fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break Err(ConsoleError(format!("poll: {e}")));
        }
        if fds[0].revents != 0 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break Ok("the node daemon closed the console"),
                Ok(n) => {
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
            }
        }
        if fds[1].revents != 0 {
            // SAFETY: reads into `buf`, which is valid for `buf.len()` bytes.
            let n = unsafe { libc::read(in_fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                stdin_open = false;
                linger_until = Some(std::time::Instant::now() + LINGER);
                continue;
            }
            let input = &buf[..n as usize];
            let (send, detach) = match input.iter().position(|b| *b == ESCAPE) {
                Some(i) => (&input[..i], true),
                None => (input, false),
            };
            if stream.write_all(send).is_err() {
                break Ok("the node daemon closed the console");
            }
            if detach {
                break Ok("detached");
            }
        }
    };
    drop(raw);
    let _ = stream.shutdown(Shutdown::Both);
    match ended {
        Ok(why) => {
            eprintln!("\r\nConsole of {}/{}: {why}.", t.namespace, t.name);
            Ok(())
        }
        Err(e) => Err(e),
    }
}
