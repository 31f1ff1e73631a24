//! The node's serial-console endpoint: `kubectl godwit console` connects here
//! and is bridged to a VM's `console.sock` (COM1 of its VMM).
//!
//! Protocol (`godwit_crds::contract::CONSOLE_HELLO`): one request line
//! `GODWIT-CONSOLE/1 <namespace>/<name>\n`, one answer line `OK\n` or
//! `ERR <what to do>\n`, then raw bytes both ways until either side closes.
//! Only VMs whose directory is on this node are served; names are checked
//! so a request cannot name a path outside the VM directories.
//!
//! Authentication: none yet, which is why the listener is bound to the node
//! IP only (`godwit-node --console-addr`, default `<node-ip>:9412`) and not to
//! every interface. On a real cluster (issue #12) the endpoint must not be
//! reachable without credentials: the listener serves TLS with the node's
//! certificate, the client sends the user's bearer token (from its
//! kubeconfig) in the request line, and the daemon admits it only after a
//! `TokenReview` and a `SubjectAccessReview` for verb `get` on
//! `virtualmachines/console` in the VM's namespace — the same RBAC check
//! KubeVirt's virt-handler relies on, with the API server as the authority.
//! A NetworkPolicy can further limit who reaches the port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use godwit_crds::contract::CONSOLE_HELLO;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// The longest request line accepted.
const MAX_REQUEST: usize = 600;

/// Serves consoles of the VMs under `state_dir` on `listener` until dropped.
pub async fn serve(listener: TcpListener, state_dir: PathBuf) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let state_dir = state_dir.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(stream, &state_dir).await {
                        tracing::debug!(%peer, "console session: {e}");
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

/// A Kubernetes object name or namespace (DNS subdomain characters only).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The VM `(namespace, name)` a request line names, or what is wrong with it.
pub fn parse_request(line: &str) -> Result<(String, String), String> {
    let rest = line
        .trim_end()
        .strip_prefix(CONSOLE_HELLO)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| format!("expected `{CONSOLE_HELLO} <namespace>/<name>`"))?;
    let (ns, name) = rest
        .split_once('/')
        .ok_or_else(|| format!("expected <namespace>/<name>, got {rest:?}"))?;
    if !valid_name(ns) || !valid_name(name) {
        return Err(format!("{rest:?} is not a valid <namespace>/<name>"));
    }
    Ok((ns.into(), name.into()))
}

/// The console socket of VM `ns/name` under `state_dir`.
pub fn console_sock(state_dir: &Path, ns: &str, name: &str) -> PathBuf {
    state_dir
        .join("vms")
        .join(ns)
        .join(name)
        .join("console.sock")
}

async fn session(stream: TcpStream, state_dir: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let read = async {
        let mut limited = (&mut reader).take(MAX_REQUEST as u64);
        limited.read_until(b'\n', &mut line).await
    };
    let answer = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(_)) => parse_request(&String::from_utf8_lossy(&line)),
        Ok(Err(e)) => return Err(e),
        Err(_) => Err("no request within 10 s".into()),
    };
    let (ns, name) = match answer {
        Ok(vm) => vm,
        Err(why) => {
            reader
                .get_mut()
                .write_all(format!("ERR {why}\n").as_bytes())
                .await?;
            return Ok(());
        }
    };
    let sock = console_sock(state_dir, &ns, &name);
    let mut console = match UnixStream::connect(&sock).await {
        Ok(c) => c,
        Err(e) => {
            let why = format!(
                "VM {ns}/{name} has no running console on this node ({e}): check its node and phase with `kubectl get gvm {name} -n {ns}`"
            );
            reader
                .get_mut()
                .write_all(format!("ERR {why}\n").as_bytes())
                .await?;
            return Ok(());
        }
    };
    tracing::info!(namespace = %ns, vm = %name, "console attached");
    reader.get_mut().write_all(b"OK\n").await?;
    // Bytes the client sent right after its request line are in the buffer.
    let pending = reader.buffer().to_vec();
    console.write_all(&pending).await?;
    let mut stream = reader.into_inner();
    let _ = tokio::io::copy_bidirectional(&mut stream, &mut console).await;
    tracing::info!(namespace = %ns, vm = %name, "console detached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_a_vm_and_nothing_else() {
        assert_eq!(
            parse_request("GODWIT-CONSOLE/1 default/demo\n"),
            Ok(("default".into(), "demo".into()))
        );
        for bad in [
            "GODWIT-CONSOLE/1 default/../../etc",
            "GODWIT-CONSOLE/1 ../x",
            "GODWIT-CONSOLE/1 default/",
            "GODWIT-CONSOLE/1 default",
            "GET / HTTP/1.1",
            "GODWIT-CONSOLE/1 Default/demo",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }
}
