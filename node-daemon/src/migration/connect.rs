//! Making a migration connection, from either end: the source dials the
//! target ([`dial`]: TCP connect, then the TLS handshake as client when it
//! has an identity), the target accepts it ([`accept`]: the TLS handshake as
//! server), and during post-copy recovery the target takes the source's
//! newest connection ([`accept_newest`]). Live and cold migrations, and the
//! node agent, connect through here; what each end checks in the other's
//! certificate is [`super::tls`]'s business.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::error::MigrationError;
use super::tls::{self, TlsIdentity};
use super::transport::Conn;

/// How the source secures an outgoing migration.
#[derive(Clone, Debug)]
pub struct OutgoingTls {
    /// This node's identity.
    pub identity: TlsIdentity,
    /// The name the target's certificate must carry (`None`: the host part
    /// of the target address, see [`tls::default_server_name`]).
    pub server_name: Option<String>,
}

/// Connects to `addr` and, with `tls`, runs the handshake (both bounded by
/// `timeout`).
pub fn dial(
    addr: &str,
    timeout: Duration,
    tls: Option<&OutgoingTls>,
) -> Result<Conn, MigrationError> {
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
pub fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, MigrationError> {
    let connect_err = |e| MigrationError::Connect(addr.to_string(), e);
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
    TcpStream::connect_timeout(&sockaddr, timeout).map_err(connect_err)
}

/// The accepted connection `stream`, after the TLS handshake when `tls` is
/// set (a silent peer fails it after `stall_timeout`).
pub fn accept(
    stream: TcpStream,
    tls: Option<&TlsIdentity>,
    stall_timeout: Duration,
) -> Result<Conn, MigrationError> {
    Ok(match tls {
        None => Conn::plain(stream),
        Some(identity) => {
            // A silent peer must not hold the handshake forever.
            stream
                .set_read_timeout(Some(stall_timeout))
                .map_err(MigrationError::Socket)?;
            let session = tls::accept(&stream, identity)?;
            Conn::tls(stream, session)
        }
    })
}

/// Waits on `listener` until `deadline` for the source to connect again
/// (post-copy recovery). Of the connections waiting, the newest is taken
/// (the source gives up on one whose answer is slow and dials again); one
/// that fails the TLS handshake is refused and the wait goes on. `None` if
/// none came.
pub fn accept_newest(
    listener: &TcpListener,
    tls: Option<&TlsIdentity>,
    stall_timeout: Duration,
    deadline: Instant,
) -> Result<Option<Conn>, MigrationError> {
    listener
        .set_nonblocking(true)
        .map_err(MigrationError::Socket)?;
    while Instant::now() < deadline {
        let mut newest = None;
        loop {
            match listener.accept() {
                Ok(accepted) => newest = Some(accepted),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(MigrationError::Socket(e)),
            }
        }
        let Some((stream, peer)) = newest else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        stream
            .set_nonblocking(false)
            .map_err(MigrationError::Socket)?;
        match accept(stream, tls, stall_timeout) {
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
