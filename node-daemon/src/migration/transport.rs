//! The byte stream under the protocol: a TCP connection, plain or with TLS
//! ([`Conn`]), set up for bulk transfer, a bandwidth cap, and a reader thread
//! so the sender hears the target (an abort, a post-copy page request) while
//! it writes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::protocol::{read_frame, write_frame_version, Command, ProtocolError, MIN_VERSION};
use super::tls::Session;

/// A migration connection: TCP, with or without TLS. Clones share the socket
/// and the TLS session, so one thread may read while another writes (see
/// [`super::tls`] for how a TLS session allows that).
pub struct Conn {
    tcp: TcpStream,
    tls: Option<Arc<Session>>,
}

impl Conn {
    /// Plain TCP.
    pub fn plain(tcp: TcpStream) -> Conn {
        Conn { tcp, tls: None }
    }

    /// TLS over `tcp`, once `session`'s handshake is done.
    pub fn tls(tcp: TcpStream, session: Session) -> Conn {
        Conn {
            tcp,
            tls: Some(Arc::new(session)),
        }
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(Conn {
            tcp: self.tcp.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    /// The socket underneath (options, timeouts, queue sizes).
    pub fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Ends the connection in both directions (after close_notify with TLS),
    /// which also ends a reader blocked on it.
    pub fn shutdown(&self) {
        if let Some(tls) = &self.tls {
            tls.close(&self.tcp);
        }
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &self.tls {
            Some(tls) => tls.read(&self.tcp, buf),
            None => self.tcp.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.tls {
            Some(tls) => tls.write(&self.tcp, buf),
            None => self.tcp.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match &self.tls {
            Some(tls) => tls.write_vectored(&self.tcp, bufs),
            None => self.tcp.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // A TLS write puts its records on the socket before it returns.
        self.tcp.flush()
    }
}

/// A frame that arrived, or why the stream ended.
pub type Incoming = Result<(Command, Vec<u8>), ProtocolError>;

/// Sets the socket options the migration stream wants: no Nagle delay for the
/// small control frames, large buffers for the page stream, and a write timeout
/// so a cut link fails the migration instead of hanging it.
pub fn tune(stream: &TcpStream, stall_timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(stall_timeout))?;
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a pointer to a live c_int of the size given;
        // failure only leaves the kernel default in place.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(stream),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok(())
}

/// Reads frames from `stream` into `tx` until the stream ends or fails; the
/// error that ended it is the last item.
pub fn reader_loop(mut stream: Conn, tx: Sender<Incoming>) {
    let mut payload = Vec::new();
    loop {
        match read_frame(&mut stream, &mut payload) {
            Ok(header) => {
                if tx
                    .send(Ok((header.command, std::mem::take(&mut payload))))
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Waits up to `timeout` for the next frame from the reader thread.
pub fn recv_timeout(rx: &Receiver<Incoming>, timeout: Duration) -> Incoming {
    match rx.recv_timeout(timeout) {
        Ok(item) => item,
        Err(_) => Err(ProtocolError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer from the migration peer",
        ))),
    }
}

/// The sending half: frames out, with bytes counted and the bandwidth capped.
pub struct FrameWriter {
    stream: Conn,
    limit: Option<u64>,
    window_start: Instant,
    window_bytes: u64,
    /// Bytes written so far (headers and payloads).
    pub bytes_sent: u64,
    /// The lowest version the frames carry (each carries at least its
    /// command's [`Command::since`]; see [`super::protocol`]).
    pub version: u16,
}

impl FrameWriter {
    /// Writes to `stream`, at most `limit` bytes per second when set.
    pub fn new(stream: Conn, limit: Option<u64>) -> FrameWriter {
        FrameWriter {
            stream,
            limit,
            window_start: Instant::now(),
            window_bytes: 0,
            bytes_sent: 0,
            version: MIN_VERSION,
        }
    }

    /// Sends one frame, sleeping first as long as the cap requires.
    pub fn send(&mut self, command: Command, payload: &[u8]) -> Result<(), ProtocolError> {
        let len = (payload.len() + super::protocol::HEADER_LEN) as u64;
        if let Some(limit) = self.limit {
            // Pace against the start of the window: frame n may leave once the
            // bytes before it fit the cap. Credit unused for over 100 ms (the
            // stream was idle) is dropped, so an idle spell buys no burst.
            let due = Duration::from_secs_f64(self.window_bytes as f64 / limit as f64);
            let elapsed = self.window_start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            } else if elapsed - due > Duration::from_millis(100) {
                self.window_start = Instant::now();
                self.window_bytes = 0;
            }
            self.window_bytes += len;
        }
        let version = self.version.max(command.since());
        write_frame_version(&mut self.stream, version, command, payload)?;
        self.bytes_sent += len;
        Ok(())
    }

    /// Bytes written but not yet acknowledged by the peer (queued in this
    /// host's socket and qdisc, or in flight). With TLS these are sealed
    /// records: a TLS write has handed all its records to the socket before
    /// it returns, so nothing waits in the session and the count is as
    /// complete as without TLS.
    pub fn unacked(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) on a TCP socket writes one int.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(self.stream.socket()),
                libc::TIOCOUTQ,
                &mut n as *mut libc::c_int,
            )
        };
        if r < 0 {
            0
        } else {
            n.max(0) as usize
        }
    }

    /// Waits until the peer has acknowledged everything written (or `max`
    /// passed), so that the time a round takes and the bandwidth derived from
    /// it count delivery, not just filling buffers, and so that a pause starts
    /// with an empty pipe.
    pub fn wait_drained(&self, max: Duration) {
        let deadline = Instant::now() + max;
        while self.unacked() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Shuts a stream whose link is lost down at once, without a TLS
    /// close_notify (which could wait for the stall timeout behind a full
    /// send buffer), ending the reader thread.
    pub fn abandon(&self) {
        let _ = self.stream.socket().shutdown(std::net::Shutdown::Both);
    }

    /// Flushes and shuts the stream down in both directions, ending the
    /// reader thread.
    pub fn close(&mut self) {
        let _ = self.stream.flush();
        self.stream.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn bandwidth_cap_holds() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            std::io::copy(&mut s, &mut std::io::sink()).unwrap()
        });
        let stream = TcpStream::connect(addr).unwrap();
        // 4 MiB/s cap, 6 MiB sent: the last frame may leave about 1.44 s after
        // the first.
        let mut w = FrameWriter::new(Conn::plain(stream), Some(4 << 20));
        let chunk = vec![0u8; 256 << 10];
        let start = Instant::now();
        for _ in 0..24 {
            w.send(Command::Pages, &chunk).unwrap();
        }
        let took = start.elapsed();
        w.close();
        let received = sink.join().unwrap();
        assert_eq!(received, w.bytes_sent);
        assert!(
            took >= Duration::from_millis(1200),
            "cap not applied: {took:?}"
        );
    }
}
