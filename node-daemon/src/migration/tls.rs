//! Mutual TLS on the migration stream.
//!
//! A node has one migration identity: a certificate (with its chain) and key,
//! and a CA bundle that the other nodes' certificates must chain to. A VMM
//! gets it as three files (`--tls-cert`, `--tls-key`, `--tls-ca`) or, from a
//! node agent that runs it as an unprivileged user, as PEM text ([`TlsPem`]:
//! `--tls-fd` at start, and the `tls` of each `migrate-send`); a VMM given
//! one takes part in migrations only over TLS 1.2/1.3, in both roles:
//!
//! - as the target (`--incoming`), it requires a client certificate that
//!   chains to the CA, and refuses a peer without one, with one from another
//!   CA, or speaking plain TCP; the connection is dropped before anything is
//!   built, so a refused peer leaves nothing behind;
//! - as the source (`migrate-send`), it presents its certificate and checks
//!   the target's against the CA and a server name: by default the host part
//!   of the target address (an IP address must be an IP SAN of the target's
//!   certificate, a host name a DNS SAN), or the `tls_server_name` given in
//!   `migrate-send` (for certificates that name the node, not its address).
//!
//! The client certificate's names are not checked: any certificate from the
//! CA is a Godwit node. A VMM started without the flags migrates over plain
//! TCP, as before; the two kinds do not talk to each other, and say so.
//!
//! The source reads (page requests, acknowledgements) while it writes pages,
//! and the post-copy target writes page requests while it reads pages, so
//! the stream must be read and written at once from two threads. A rustls
//! session is one state machine, so [`Session`] puts it behind a mutex held
//! only to seal or open records, never across a socket call: a writer seals
//! its plaintext into an outbox under the lock and writes the ciphertext to
//! the socket after releasing it (the outbox's own lock keeps records in
//! sealing order); the reader reads ciphertext from the socket unlocked and
//! then opens it under the lock. The socket stays a plain blocking
//! `TcpStream` underneath, so its timeouts, `SIOCOUTQ` and `shutdown` mean
//! what they meant without TLS: a write returns once its records are in the
//! socket, so "drained" still means the target has everything. The
//! bandwidth cap counts frame bytes; the TLS record overhead (22 bytes per
//! 16 KiB record, about 0.13%) comes on top.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConfig, ClientConnection, RootCertStore, ServerConfig};
use rustls::{Connection, ServerConnection};
use serde::{Deserialize, Serialize};

use super::protocol;

/// Errors of setting TLS up and of the TLS session.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("Cannot read the {what} from {path}")]
    ReadPem {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("No certificate in {0}; give the node's certificate (and its chain) in PEM")]
    NoCertificate(PathBuf),
    /// The CA file holds no usable certificate.
    #[error(
        "No usable CA certificate in {0}; give the CA that signs the nodes' certificates in PEM"
    )]
    NoCa(PathBuf),
    /// The client verifier could not be built from the CA.
    #[error("Cannot verify client certificates with the CA in {0}")]
    Verifier(PathBuf, #[source] rustls::server::VerifierBuilderError),
    /// Certificate and key do not make an identity.
    #[error("The certificate in {cert} and the key in {key} do not make a usable TLS identity")]
    Identity {
        /// Certificate path.
        cert: PathBuf,
        /// Key path.
        key: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The name to check the target's certificate against is not one.
    #[error("{0:?} is not a TLS server name; give an IP address or a DNS name")]
    ServerName(String),
    /// A plain-TCP source connected to a target that requires TLS.
    #[error("The source sent a plain migration stream, but this target requires TLS: start the source VMM with --tls-cert, --tls-key and --tls-ca too")]
    PlainPeer,
    /// The TLS handshake did not complete.
    #[error("TLS handshake with the migration {peer} failed")]
    Handshake {
        /// `source` or `target`.
        peer: &'static str,
        /// Why (an I/O error, or a [`SessionError`] inside one).
        #[source]
        source: io::Error,
    },
}

/// A TLS failure on an established or handshaking session, said in the
/// terms of the migration: who refused whom.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(.0))]
pub struct SessionError(#[source] pub rustls::Error);

fn describe(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match e {
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied,
        ) => "The migration peer refused this node's certificate: both nodes need certificates from the CA the other trusts (--tls-ca)",
        E::AlertReceived(AlertDescription::DecodeError) => {
            "The migration peer could not decode our TLS handshake: is it running without TLS? Give both VMMs --tls-cert, --tls-key and --tls-ca, or neither"
        }
        E::AlertReceived(_) => "The migration peer ended the TLS session",
        E::InvalidCertificate(_) => {
            "The migration peer's certificate is not trusted: it must chain to this node's --tls-ca, and a target's must also carry the name dialled (its address, or tls_server_name)"
        }
        E::NoCertificatesPresented => {
            "The migration peer presented no certificate; this node requires one from its --tls-ca"
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            "The migration peer is not speaking TLS: give both VMMs --tls-cert, --tls-key and --tls-ca, or neither"
        }
        _ => "The migration stream's TLS session failed",
    }
}

fn session_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, SessionError(e))
}

/// rustls reports its errors through I/O calls as `InvalidData` around a
/// `rustls::Error`; say those in our words and keep socket errors (timeouts,
/// resets) as they are.
fn in_our_words(e: io::Error) -> io::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => session_error(tls.clone()),
        None => e,
    }
}

/// The three PEM files of a node's migration identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    /// This node's certificate, then its chain.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates a peer's certificate must chain to.
    pub ca: PathBuf,
}

/// A loaded identity: the configurations for both roles.
#[derive(Clone)]
pub struct TlsIdentity {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsIdentity")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |source| TlsError::ReadPem {
        what,
        path: path.to_path_buf(),
        source,
    };
    CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)
}

/// The identity as PEM text, as the node agent hands it over: the control
/// protocol's type.
pub use godwit_vmm_control::TlsPem;

impl TlsFiles {
    /// Reads the three files as they are now.
    pub fn read_pem(&self) -> io::Result<TlsPem> {
        TlsPem::read(&self.cert, &self.key, &self.ca)
    }
}

impl TlsIdentity {
    /// The server side: this identity, and client certificates required
    /// from the CA (the node's console port checks the name itself).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// Reads the files and builds the server (client auth required) and
    /// client configurations.
    pub fn load(files: &TlsFiles) -> Result<TlsIdentity, TlsError> {
        let certs = read_certs("certificate", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::ReadPem {
            what: "private key",
            path: files.key.clone(),
            source,
        })?;
        let ca = read_certs("CA", &files.ca)?;
        TlsIdentity::build(certs, key, ca, files)
    }

    /// Builds the identity from PEM text handed over by the node agent.
    pub fn from_pem(pem: &TlsPem) -> Result<TlsIdentity, TlsError> {
        let names = TlsFiles {
            cert: PathBuf::from("the certificate the node agent handed over"),
            key: PathBuf::from("the key the node agent handed over"),
            ca: PathBuf::from("the CA the node agent handed over"),
        };
        let certs = |what, text: &str, path: &Path| {
            CertificateDer::pem_slice_iter(text.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| TlsError::ReadPem {
                    what,
                    path: path.to_path_buf(),
                    source,
                })
        };
        let cert = certs("certificate", &pem.cert, &names.cert)?;
        let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|source| {
            TlsError::ReadPem {
                what: "private key",
                path: names.key.clone(),
                source,
            }
        })?;
        let ca = certs("CA", &pem.ca, &names.ca)?;
        TlsIdentity::build(cert, key, ca, &names)
    }

    /// The server (client auth required) and client configurations; `names`
    /// say where each part came from, for errors.
    fn build(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: Vec<CertificateDer<'static>>,
        names: &TlsFiles,
    ) -> Result<TlsIdentity, TlsError> {
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(names.cert.clone()));
        }
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(ca);
        if added == 0 {
            return Err(TlsError::NoCa(names.ca.clone()));
        }
        let roots = Arc::new(roots);
        let identity = |source| TlsError::Identity {
            cert: names.cert.clone(),
            key: names.key.clone(),
            source,
        };
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Verifier(names.ca.clone(), e))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(identity)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(identity)?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(identity)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(identity)?;
        Ok(TlsIdentity {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The name the target's certificate must carry when the caller gave none:
/// the host part of `addr` (`10.0.0.2:4000` → IP `10.0.0.2`, `node-b:4000` →
/// DNS `node-b`, `[fd00::2]:4000` → IP `fd00::2`).
pub fn default_server_name(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A TLS session shared by the clones of one connection; see the module
/// docs for the locking.
pub struct Session {
    conn: Mutex<Connection>,
    /// Ciphertext read from the socket that rustls has not taken yet. Held
    /// for a whole read, which serialises readers.
    inbox: Mutex<Inbox>,
    /// Sealed records on their way to the socket. Held from sealing to the
    /// end of the socket write, which serialises writers and keeps records
    /// in sequence.
    outbox: Mutex<Vec<u8>>,
}

struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Socket reads are this large, so a 1 MiB frame costs a few dozen reads.
const INBOX_BYTES: usize = 256 << 10;

impl Session {
    fn new(conn: Connection) -> Session {
        Session {
            conn: Mutex::new(conn),
            inbox: Mutex::new(Inbox {
                buf: vec![0; INBOX_BYTES],
                start: 0,
                end: 0,
            }),
            outbox: Mutex::new(Vec::with_capacity(1 << 20)),
        }
    }

    /// Reads plaintext, reading ciphertext from `tcp` as needed.
    pub fn read(&self, mut tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        let mut inbox = self.inbox.lock().unwrap();
        loop {
            let wants_write = {
                let mut conn = self.conn.lock().unwrap();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if inbox.start == inbox.end {
                    None
                } else {
                    // No plaintext is buffered here (the read above would
                    // have returned it), so rustls has room for more.
                    let Inbox { buf, start, end } = &mut *inbox;
                    let mut pending = &buf[*start..*end];
                    let taken = conn.read_tls(&mut pending)?;
                    *start += taken;
                    conn.process_new_packets().map_err(session_error)?;
                    Some(conn.wants_write())
                }
            };
            match wants_write {
                // rustls answered something (a key update): send it.
                Some(true) => self.flush_records(tcp)?,
                Some(false) => {}
                None => {
                    let n = tcp.read(&mut inbox.buf)?;
                    (inbox.start, inbox.end) = (0, n);
                    if n == 0 {
                        // End of the TCP stream: rustls tells a clean close
                        // (Ok(0)) from a truncated one (UnexpectedEof).
                        let mut conn = self.conn.lock().unwrap();
                        conn.read_tls(&mut io::empty())?;
                        conn.process_new_packets().map_err(session_error)?;
                        return conn.reader().read(buf);
                    }
                }
            }
        }
    }

    /// Seals `buf` and writes the records to `tcp`.
    pub fn write(&self, tcp: &TcpStream, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(tcp, &[io::IoSlice::new(buf)])
    }

    /// Seals `bufs` (as one write: a frame's header and payload share their
    /// records) and writes the records to `tcp`.
    pub fn write_vectored(&self, tcp: &TcpStream, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut outbox = self.outbox.lock().unwrap();
        let n = {
            let mut conn = self.conn.lock().unwrap();
            // Fails once the session has failed (say, the reader got an
            // alert), with that error.
            let n = conn.writer().write_vectored(bufs).map_err(in_our_words)?;
            while conn.wants_write() {
                conn.write_tls(&mut *outbox)?;
            }
            n
        };
        let written = (&*tcp).write_all(&outbox);
        outbox.clear();
        written.map(|()| n)
    }

    /// Writes whatever rustls has queued (alerts, key updates).
    fn flush_records(&self, tcp: &TcpStream) -> io::Result<()> {
        self.write(tcp, &[]).map(drop)
    }

    /// Sends close_notify (best effort). Skipped while another thread is in
    /// a socket write: the shutdown that follows must not wait behind a
    /// write to a peer that stopped reading; it ends that write instead.
    pub fn close(&self, tcp: &TcpStream) {
        let Ok(mut outbox) = self.outbox.try_lock() else {
            return;
        };
        let mut conn = self.conn.lock().unwrap();
        conn.send_close_notify();
        while conn.wants_write() {
            if conn.write_tls(&mut *outbox).is_err() {
                break;
            }
        }
        drop(conn);
        let _ = (&*tcp).write_all(&outbox);
        outbox.clear();
    }
}

/// Drives the handshake on `tcp` (blocking, bounded by its timeouts).
fn handshake(
    mut conn: Connection,
    mut tcp: &TcpStream,
    peer: &'static str,
) -> Result<Session, TlsError> {
    conn.set_buffer_limit(None);
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            return Err(TlsError::Handshake {
                peer,
                source: in_our_words(e),
            });
        }
    }
    Ok(Session::new(conn))
}

/// The target's side: refuses a plain-TCP source with a clear error, then
/// runs the handshake, requiring a client certificate from the CA. `tcp`
/// has its read timeout set, which bounds the wait for a silent peer.
pub fn accept(tcp: &TcpStream, identity: &TlsIdentity) -> Result<Session, TlsError> {
    let mut first = [0u8; 4];
    let peeked = tcp.peek(&mut first).map_err(|source| TlsError::Handshake {
        peer: "source",
        source,
    })?;
    if peeked == 4 && u32::from_le_bytes(first) == protocol::MAGIC {
        // Tell the source why in its own protocol: take its Hello, answer
        // Abort, and close our side cleanly so the answer is not lost to a
        // reset.
        let mut tcp = tcp;
        if protocol::read_frame(&mut tcp, &mut Vec::new()).is_ok() {
            let reason = TlsError::PlainPeer.to_string();
            let _ = protocol::write_frame(&mut tcp, protocol::Command::Abort, reason.as_bytes());
            let _ = tcp.shutdown(std::net::Shutdown::Write);
        }
        return Err(TlsError::PlainPeer);
    }
    let conn = ServerConnection::new(identity.server.clone()).map_err(|e| TlsError::Handshake {
        peer: "source",
        source: session_error(e),
    })?;
    handshake(conn.into(), tcp, "source")
}

/// The source's side: presents this node's certificate and checks the
/// target's against the CA and `server_name`.
pub fn connect(
    tcp: &TcpStream,
    identity: &TlsIdentity,
    server_name: &str,
    timeout: Duration,
) -> Result<Session, TlsError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    let conn =
        ClientConnection::new(identity.client.clone(), name).map_err(|e| TlsError::Handshake {
            peer: "target",
            source: session_error(e),
        })?;
    // The handshake must not wait forever on a target that accepted the
    // connection but says nothing; the stream's own timeouts come after.
    let old = tcp.read_timeout().ok().flatten();
    let _ = tcp.set_read_timeout(Some(timeout));
    let session = handshake(conn.into(), tcp, "target");
    let _ = tcp.set_read_timeout(old);
    session
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_server_name_is_the_host_part() {
        assert_eq!(default_server_name("10.0.0.2:4000"), "10.0.0.2");
        assert_eq!(default_server_name("node-b:4000"), "node-b");
        assert_eq!(default_server_name("[fd00::2]:4000"), "fd00::2");
        assert_eq!(default_server_name("node-b"), "node-b");
    }
}
