//! The node's serial-console endpoint: the operator's console proxy
//! connects here and is bridged to a VM's `console.sock` (COM1 of its VMM).
//!
//! Users never connect here: `kubectl godwit console` goes through the
//! Kubernetes API server to the aggregated API
//! (`godwit_crds::contract::SUBRESOURCES_GROUP`) that the operator serves,
//! which checks the user's RBAC (`get` on `virtualmachines/console`) and
//! only then dials this port.
//!
//! Authentication: mutual TLS. The agent presents its node certificate (the
//! one its VMMs migrate with, `<state-dir>/tls/`, read again for every
//! connection so a renewed one is used at once) and requires a client
//! certificate from the same CA whose common name is
//! `godwit_crds::contract::CONSOLE_PROXY_CN`. A plain TCP client, a TLS
//! client without a certificate and every other certificate (another
//! node's included) are refused. Without a node certificate (the agent runs
//! with neither `--migration-csr` nor `--migration-ca-dir`) every
//! connection is refused.
//!
//! Protocol inside TLS (`godwit_crds::contract::CONSOLE_HELLO`): one
//! request line `GODWIT-CONSOLE/1 <namespace>/<name>\n`, one answer line
//! `OK\n` or `ERR <what to do>\n`, then raw bytes both ways until either
//! side closes. Only VMs whose directory is on this node are served; names
//! are checked so a request cannot name a path outside the VM directories.
//!
//! Port forwarding (`kubectl godwit port-forward`, `ssh`, `scp`) uses the
//! same port and proxy: the line `GODWIT-FORWARD/1 <namespace>/<name>
//! <port>\n` asks the agent to open a TCP connection from the node to that
//! port at the VM's first address, as recorded in the machine its VMM was
//! started with (`machine.json`), and only for a VM running here. So a
//! user reaches exactly the VM that RBAC let them name, at its own
//! address, and nothing else on the node's network.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use godwit_crds::contract::{Machine, CONSOLE_HELLO, CONSOLE_PROXY_CN, FORWARD_HELLO};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_rustls::TlsAcceptor;

use crate::migration::tls::{TlsFiles, TlsIdentity};

/// The longest request line accepted.
const MAX_REQUEST: usize = 600;
/// How long a client has for its TLS handshake and its request line.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves consoles of the VMs under `state_dir` on `listener` until
/// dropped, to clients that authenticate as the console proxy with a
/// certificate the node identity in `tls` trusts.
pub async fn serve(listener: TcpListener, state_dir: PathBuf, tls: TlsFiles) {
    let tls = Arc::new(tls);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let state_dir = state_dir.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Err(e) = accept(stream, &state_dir, &tls).await {
                        tracing::info!(%peer, "console connection refused: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("console accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a console connection was not served.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleRefused {
    /// The node has no usable identity (yet).
    #[error("no node certificate to serve the console with ({0}); the agent gets one with --migration-csr")]
    NoIdentity(String),
    /// The handshake failed: plain TCP, no certificate, or an untrusted one.
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The handshake did not finish in time.
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    /// A trusted certificate that is not the console proxy's.
    #[error("client certificate {0:?} is not the console proxy's ({CONSOLE_PROXY_CN})")]
    NotTheProxy(String),
    /// The session failed after it was admitted.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The subject common name of a DER certificate (empty when it has none).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    Some(cn)
}

async fn accept(stream: TcpStream, state_dir: &Path, tls: &TlsFiles) -> Result<(), ConsoleRefused> {
    let identity = TlsIdentity::load(tls)
        .map_err(|e| ConsoleRefused::NoIdentity(godwit_crds::error_chain(&e)))?;
    let acceptor = TlsAcceptor::from(identity.server_config());
    let stream = tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| ConsoleRefused::Timeout(HELLO_TIMEOUT))?
        .map_err(ConsoleRefused::Handshake)?;
    let name = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|der| common_name(der))
        .unwrap_or_default();
    let mut stream = stream;
    if name != CONSOLE_PROXY_CN {
        let refusal =
            b"ERR this port serves only Godwit's console proxy; use `kubectl godwit console`\n";
        let _ = stream.write_all(refusal).await;
        let _ = stream.shutdown().await;
        return Err(ConsoleRefused::NotTheProxy(name));
    }
    session(stream, state_dir).await?;
    Ok(())
}

/// A Kubernetes object name or namespace (DNS subdomain characters only).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// What a request line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// The serial console of VM `(namespace, name)`.
    Console(String, String),
    /// A TCP connection to `port` of VM `(namespace, name)`.
    Forward(String, String, u16),
}

/// The VM `<namespace>/<name>` in `rest`, or what is wrong with it.
fn parse_vm(rest: &str) -> Result<(String, String), String> {
    let (ns, name) = rest
        .split_once('/')
        .ok_or_else(|| format!("expected <namespace>/<name>, got {rest:?}"))?;
    if !valid_name(ns) || !valid_name(name) {
        return Err(format!("{rest:?} is not a valid <namespace>/<name>"));
    }
    Ok((ns.into(), name.into()))
}

/// What a request line asks for, or what is wrong with it.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let line = line.trim_end();
    if let Some(rest) = line
        .strip_prefix(FORWARD_HELLO)
        .and_then(|r| r.strip_prefix(' '))
    {
        let (vm, port) = rest
            .split_once(' ')
            .ok_or_else(|| format!("expected `{FORWARD_HELLO} <namespace>/<name> <port>`"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port:?} is not a TCP port (1-65535)"))?;
        let (ns, name) = parse_vm(vm)?;
        return Ok(Request::Forward(ns, name, port));
    }
    let rest = line
        .strip_prefix(CONSOLE_HELLO)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| format!("expected `{CONSOLE_HELLO} <namespace>/<name>`"))?;
    let (ns, name) = parse_vm(rest)?;
    Ok(Request::Console(ns, name))
}

/// The console socket of VM `ns/name` under `state_dir`.
pub fn console_sock(state_dir: &Path, ns: &str, name: &str) -> PathBuf {
    vm_dir(state_dir, ns, name).join("console.sock")
}

fn vm_dir(state_dir: &Path, ns: &str, name: &str) -> PathBuf {
    state_dir.join("vms").join(ns).join(name)
}

/// The first IPv4 address of VM `ns/name` here, from the machine its VMM
/// was started with (so only a VM this node runs can be reached, at the
/// address it was given).
fn vm_address(state_dir: &Path, ns: &str, name: &str) -> Result<IpAddr, String> {
    let running = console_sock(state_dir, ns, name).exists();
    let machine: Option<Machine> =
        std::fs::read_to_string(vm_dir(state_dir, ns, name).join("machine.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok());
    let (Some(machine), true) = (machine, running) else {
        return Err(format!(
            "VM {ns}/{name} does not run on this node: check its node and phase with `kubectl get gvm {name} -n {ns}`"
        ));
    };
    machine
        .networks
        .iter()
        .filter_map(|n| n.ip.as_deref())
        .find_map(|ip| ip.split('/').next()?.parse().ok())
        .ok_or_else(|| {
            format!(
                "VM {ns}/{name} has no IP address to forward to: give it one in spec.customization.network.address"
            )
        })
}

/// Opens what `request` asks for: the VM's console socket, or a TCP
/// connection to the guest.
async fn open(request: &Request, state_dir: &Path) -> Result<Endpoint, String> {
    match request {
        Request::Console(ns, name) => UnixStream::connect(console_sock(state_dir, ns, name))
            .await
            .map(Endpoint::Console)
            .map_err(|e| format!(
                "VM {ns}/{name} has no running console on this node ({e}): check its node and phase with `kubectl get gvm {name} -n {ns}`"
            )),
        Request::Forward(ns, name, port) => {
            let ip = vm_address(state_dir, ns, name)?;
            let addr = SocketAddr::new(ip, *port);
            match tokio::time::timeout(HELLO_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => Ok(Endpoint::Guest(tcp)),
                Ok(Err(e)) => Err(format!(
                    "cannot connect to port {port} of VM {ns}/{name} at {addr}: {e}; is a server listening there in the guest?"
                )),
                Err(_) => Err(format!(
                    "port {port} of VM {ns}/{name} at {addr} did not answer within {HELLO_TIMEOUT:?}"
                )),
            }
        }
    }
}

/// Where a session's bytes go.
enum Endpoint {
    Console(UnixStream),
    Guest(TcpStream),
}

async fn session<S>(stream: S, state_dir: &Path) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let read = async {
        let mut limited = (&mut reader).take(MAX_REQUEST as u64);
        limited.read_until(b'\n', &mut line).await
    };
    let request = match tokio::time::timeout(HELLO_TIMEOUT, read).await {
        Ok(Ok(_)) => parse_request(&String::from_utf8_lossy(&line)),
        Ok(Err(e)) => return Err(e),
        Err(_) => Err("no request within 10 s".into()),
    };
    let opened = match request {
        Ok(request) => open(&request, state_dir).await.map(|e| (request, e)),
        Err(why) => Err(why),
    };
    let (request, mut endpoint) = match opened {
        Ok(opened) => opened,
        Err(why) => {
            let out = reader.get_mut();
            out.write_all(format!("ERR {why}\n").as_bytes()).await?;
            out.flush().await?;
            return Ok(());
        }
    };
    tracing::info!(?request, "session opened");
    reader.get_mut().write_all(b"OK\n").await?;
    reader.get_mut().flush().await?;
    // Bytes the client sent right after its request line are in the buffer.
    let pending = reader.buffer().to_vec();
    let mut stream = reader.into_inner();
    let _ = match &mut endpoint {
        Endpoint::Console(c) => {
            c.write_all(&pending).await?;
            tokio::io::copy_bidirectional(&mut stream, c).await
        }
        Endpoint::Guest(t) => {
            t.write_all(&pending).await?;
            tokio::io::copy_bidirectional(&mut stream, t).await
        }
    };
    tracing::info!(?request, "session closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_a_vm_and_nothing_else() {
        assert_eq!(
            parse_request("GODWIT-CONSOLE/1 default/demo\n"),
            Ok(Request::Console("default".into(), "demo".into()))
        );
        assert_eq!(
            parse_request("GODWIT-FORWARD/1 default/demo 22\n"),
            Ok(Request::Forward("default".into(), "demo".into(), 22))
        );
        for bad in [
            "GODWIT-CONSOLE/1 default/../../etc",
            "GODWIT-CONSOLE/1 ../x",
            "GODWIT-CONSOLE/1 default/",
            "GODWIT-CONSOLE/1 default",
            "GET / HTTP/1.1",
            "GODWIT-CONSOLE/1 Default/demo",
            "GODWIT-FORWARD/1 default/demo",
            "GODWIT-FORWARD/1 default/demo 0",
            "GODWIT-FORWARD/1 default/demo 70000",
            "GODWIT-FORWARD/1 default/../x 22",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }
}
