//! `port-forward`, `ssh` and `scp`: TCP to a port of the guest through the
//! Kubernetes API server, as `virtctl port-forward` and `virtctl ssh` reach
//! KubeVirt VMs.
//!
//! Each forwarded connection is a WebSocket to
//! `/apis/subresources.godwit.dev/v1/namespaces/<ns>/virtualmachines/<name>/portforward/<port>`
//! in Kubernetes' channel protocol (channel 0 carries what is sent, 1 what
//! the guest answers). The API server authorizes it (RBAC `get` on
//! `virtualmachines/portforward`) and proxies it to the operator's
//! aggregated API, which asks the VM's node agent over mutual TLS to
//! connect to that port at the VM's own address. So neither the VM nor its
//! node needs an address reachable from the user's machine.
//!
//! `ssh` and `scp` run the local OpenSSH client with `port-forward --stdio`
//! as its `ProxyCommand`; the SSH session itself (keys, host keys, agent
//! forwarding) is OpenSSH's, end to end with the guest's sshd.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use futures::{SinkExt, StreamExt};
use godwit_crds::contract::{SUBRESOURCES_GROUP, SUBRESOURCES_VERSION};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::Receiver;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Why a forward could not start or ended.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The command line cannot work as given.
    #[error("{0}")]
    Usage(String),
    /// RBAC does not allow it.
    #[error("{0}")]
    Forbidden(String),
    /// The forwarded connection could not be opened or failed.
    #[error("Port-forward: {0}")]
    Connection(String),
    /// The local port cannot be listened on.
    #[error("cannot listen on {addr}: {source}; pick another local port (LOCAL:REMOTE, or :REMOTE for any free one)")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why not.
        source: std::io::Error,
    },
    /// `ssh` or `scp` could not be run.
    #[error(
        "cannot run {program}: {source}; install OpenSSH's client so that {program} is on PATH"
    )]
    Exec {
        /// The program.
        program: &'static str,
        /// Why not.
        source: std::io::Error,
    },
}

/// The VM a forward reaches.
pub struct Vm {
    /// A client of the cluster.
    pub client: Client,
    /// The VM's namespace.
    pub namespace: String,
    /// The VM's name.
    pub name: String,
}

/// The path of a port-forward in the aggregated API.
pub fn forward_path(namespace: &str, name: &str, port: u16) -> String {
    format!(
        "/apis/{SUBRESOURCES_GROUP}/{SUBRESOURCES_VERSION}/namespaces/{namespace}/virtualmachines/{name}/portforward/{port}"
    )
}

fn port(s: &str, what: &str) -> Result<u16, ForwardError> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0 || what == "local")
        .ok_or_else(|| ForwardError::Usage(format!("{s:?} is not a {what} TCP port (1-65535)")))
}

/// `REMOTE`, `LOCAL:REMOTE` or `:REMOTE` (any free local port, shown as 0)
/// as `(local, remote)`; `REMOTE` alone listens on the same port.
pub fn parse_ports(spec: &str) -> Result<(u16, u16), ForwardError> {
    match spec.split_once(':') {
        None => {
            let p = port(spec, "remote")?;
            Ok((p, p))
        }
        Some(("", remote)) => Ok((0, port(remote, "remote")?)),
        Some((local, remote)) => Ok((port(local, "local")?, port(remote, "remote")?)),
    }
}

/// Asks the API server whether the current user may forward to `vm`, so
/// that a refusal is said once, before anything listens.
async fn may_forward(vm: &Vm) -> Result<(), ForwardError> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(SUBRESOURCES_GROUP.into()),
                resource: Some("virtualmachines".into()),
                subresource: Some("portforward".into()),
                verb: Some("get".into()),
                namespace: Some(vm.namespace.clone()),
                name: Some(vm.name.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(vm.client.clone())
        .create(&PostParams::default(), &review)
        .await;
    match answer {
        Ok(r) if !r.status.as_ref().is_some_and(|s| s.allowed) => Err(ForwardError::Forbidden(format!(
            "you may not forward to ports of VirtualMachine {}/{}: RBAC must allow `get` on \
             virtualmachines/portforward in API group {SUBRESOURCES_GROUP} (the edit and admin roles do)",
            vm.namespace, vm.name
        ))),
        // Without an answer, the forward itself says what is wrong.
        _ => Ok(()),
    }
}

/// Opens one forwarded connection to `port` of the VM.
async fn open(
    vm: &Vm,
    port: u16,
) -> Result<WebSocketStream<impl AsyncRead + AsyncWrite + Unpin>, ForwardError> {
    let request = http::Request::get(forward_path(&vm.namespace, &vm.name, port))
        .body(Vec::new())
        .map_err(|e| ForwardError::Connection(e.to_string()))?;
    let ws = vm
        .client
        .connect(request)
        .await
        .map_err(|e| ForwardError::Connection(crate::console::refused(e).0))?;
    Ok(ws.into_stream())
}

/// Relays `input` (chunks; an empty one is its end) to the guest and the
/// guest's answers to `output`, until the guest's side closes or `output`
/// fails. After the end of input the answers still flow, as after a
/// half-close.
async fn relay<S, W>(
    ws: WebSocketStream<S>,
    mut input: Receiver<Vec<u8>>,
    mut output: W,
) -> Result<(), ForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut to_vm, mut from_vm) = ws.split();
    let up = async {
        while let Some(chunk) = input.recv().await {
            if chunk.is_empty() {
                break;
            }
            let mut framed = Vec::with_capacity(chunk.len() + 1);
            framed.push(0);
            framed.extend_from_slice(&chunk);
            if to_vm.send(Message::Binary(framed.into())).await.is_err() {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    let down = async {
        while let Some(message) = from_vm.next().await {
            match message {
                Ok(Message::Binary(data)) => {
                    if let Some((1, answer)) = data.split_first() {
                        if output.write_all(answer).await.is_err() || output.flush().await.is_err()
                        {
                            return Ok(());
                        }
                    }
                }
                Ok(Message::Close(_)) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    return Err(ForwardError::Connection(format!(
                        "the connection failed: {e}"
                    )))
                }
            }
        }
        Ok(())
    };
    tokio::select! {
        ended = down => ended,
        () = up => Ok(()),
    }
}

/// The chunks read from `reader` on a task of its own; an empty chunk is
/// its end.
fn chunks_of(mut reader: tokio::net::tcp::OwnedReadHalf) -> Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let chunk = match reader.read(&mut buf).await {
                Ok(n) if n > 0 => buf[..n].to_vec(),
                _ => Vec::new(),
            };
            let end = chunk.is_empty();
            if tx.send(chunk).await.is_err() || end {
                return;
            }
        }
    });
    rx
}

/// Relays standard input and output to `port` of the VM (an ssh
/// ProxyCommand) until the guest closes the connection.
pub async fn stdio(vm: &Vm, port: u16) -> Result<(), ForwardError> {
    let ws = open(vm, port).await?;
    relay(ws, crate::console::stdin_chunks(), tokio::io::stdout()).await
}

/// Listens on `address` for each `(local, remote)` pair and forwards every
/// connection to the VM's `remote` port, until interrupted.
pub async fn listen(vm: &Vm, address: IpAddr, ports: &[(u16, u16)]) -> Result<(), ForwardError> {
    may_forward(vm).await?;
    let mut loops = Vec::new();
    for &(local, remote) in ports {
        let addr = SocketAddr::new(address, local);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ForwardError::Listen { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ForwardError::Listen { addr, source })?;
        println!("Forwarding from {bound} -> {remote}");
        loops.push(accept_loop(vm, listener, remote));
    }
    futures::future::join_all(loops).await;
    Ok(())
}

async fn accept_loop(vm: &Vm, listener: TcpListener, remote: u16) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: accepting on {:?}: {e}", listener.local_addr());
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let target = Vm {
            client: vm.client.clone(),
            namespace: vm.namespace.clone(),
            name: vm.name.clone(),
        };
        tokio::spawn(async move {
            eprintln!("Handling connection from {peer} for {remote}");
            if let Err(e) = serve(&target, conn, remote).await {
                eprintln!(
                    "error: {}/{} port {remote}: {e}",
                    target.namespace, target.name
                );
            }
        });
    }
}

async fn serve(vm: &Vm, conn: TcpStream, remote: u16) -> Result<(), ForwardError> {
    let ws = open(vm, remote).await?;
    let (reader, writer) = conn.into_split();
    relay(ws, chunks_of(reader), writer).await
}

/// The global flags that a ProxyCommand repeats, so that it reaches the
/// same cluster, as the same user, in the same namespace.
pub struct Globals {
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`.
    pub context: Option<String>,
    /// The namespace commands act in.
    pub namespace: String,
}

/// `s` quoted for the shell that ssh runs a ProxyCommand with, and with
/// ssh's `%` tokens escaped.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''").replace('%', "%%"))
}

/// The ProxyCommand that relays an ssh connection to `port` of `vm`: this
/// program's `port-forward --stdio`.
pub fn proxy_command(g: &Globals, vm: &str, port: u16) -> Result<String, ForwardError> {
    let exe = std::env::current_exe().map_err(|source| ForwardError::Exec {
        program: "kubectl-godwit",
        source,
    })?;
    Ok(proxy_line(&exe.to_string_lossy(), g, vm, port))
}

fn proxy_line(exe: &str, g: &Globals, vm: &str, port: u16) -> String {
    let mut words = vec![quote(exe)];
    if let Some(k) = &g.kubeconfig {
        words.push(format!("--kubeconfig={}", quote(&k.to_string_lossy())));
    }
    if let Some(c) = &g.context {
        words.push(format!("--context={}", quote(c)));
    }
    words.push(format!("--namespace={}", quote(&g.namespace)));
    words.push("port-forward".into());
    words.push("--stdio".into());
    words.push(quote(vm));
    words.push(port.to_string());
    words.join(" ")
}

/// What `ssh` and `scp` share.
pub struct SshArgs {
    /// The ProxyCommand (see [`proxy_command`]).
    pub proxy: String,
    /// `-i`.
    pub identity_file: Option<PathBuf>,
    /// `-o`, each.
    pub options: Vec<String>,
}

impl SshArgs {
    fn common(&self) -> Vec<String> {
        let mut argv = vec!["-o".to_string(), format!("ProxyCommand={}", self.proxy)];
        for o in &self.options {
            argv.push("-o".into());
            argv.push(o.clone());
        }
        if let Some(i) = &self.identity_file {
            argv.push("-i".into());
            argv.push(i.to_string_lossy().into_owned());
        }
        argv
    }
}

/// `[USER@]VM` as `(user, vm)`.
pub fn split_user(target: &str) -> (Option<&str>, &str) {
    match target.rsplit_once('@') {
        Some((user, vm)) => (Some(user), vm),
        None => (None, target),
    }
}

/// The host name ssh is given for `vm` (only the ProxyCommand reaches it;
/// the name keeps known_hosts entries apart per VM and namespace).
fn host(vm: &str, namespace: &str) -> String {
    format!("{vm}.{namespace}")
}

/// The arguments of `ssh` for a session with `vm`.
pub fn ssh_argv(
    ssh: &SshArgs,
    user: Option<&str>,
    vm: &str,
    namespace: &str,
    command: &[String],
) -> Vec<String> {
    let mut argv = ssh.common();
    let host = host(vm, namespace);
    argv.push(match user {
        Some(u) => format!("{u}@{host}"),
        None => host,
    });
    if !command.is_empty() {
        argv.push("--".into());
        argv.extend(command.iter().cloned());
    }
    argv
}

/// Replaces this process with `ssh`; returns only if it cannot run.
pub fn exec_ssh(
    ssh: &SshArgs,
    user: Option<&str>,
    vm: &str,
    namespace: &str,
    command: &[String],
) -> ForwardError {
    let source = Command::new("ssh")
        .args(ssh_argv(ssh, user, vm, namespace, command))
        .exec();
    ForwardError::Exec {
        program: "ssh",
        source,
    }
}

/// `[USER@]VM:PATH` as `(user, vm, path)`; `None` for a local path (one
/// with a `/` before its first `:`, or none), as scp itself tells them apart.
fn remote(arg: &str) -> Option<(Option<&str>, &str, &str)> {
    let (host, path) = arg.split_once(':')?;
    if host.is_empty() || host.contains('/') {
        return None;
    }
    let (user, vm) = split_user(host);
    Some((user, vm, path))
}

/// The one VM that `scp`'s paths name.
pub fn scp_vm(paths: &[String]) -> Result<String, ForwardError> {
    let mut vms: Vec<&str> = paths
        .iter()
        .filter_map(|p| remote(p))
        .map(|r| r.1)
        .collect();
    vms.dedup();
    match vms.as_slice() {
        [vm] => Ok(vm.to_string()),
        [] => Err(ForwardError::Usage(
            "no VM named: write the VM's side as [USER@]VM:PATH".into(),
        )),
        _ => Err(ForwardError::Usage(format!(
            "scp through Godwit reaches one VM at a time; these paths name {vms:?}"
        ))),
    }
}

/// The arguments of `scp` for `paths`, the VM's written as its ssh host.
pub fn scp_argv(ssh: &SshArgs, recursive: bool, paths: &[String], namespace: &str) -> Vec<String> {
    let mut argv = ssh.common();
    if recursive {
        argv.push("-r".into());
    }
    for p in paths {
        argv.push(match remote(p) {
            Some((user, vm, path)) => {
                let host = host(vm, namespace);
                match user {
                    Some(u) => format!("{u}@{host}:{path}"),
                    None => format!("{host}:{path}"),
                }
            }
            None => p.clone(),
        });
    }
    argv
}

/// Replaces this process with `scp`; returns only if it cannot run.
pub fn exec_scp(ssh: &SshArgs, recursive: bool, paths: &[String], namespace: &str) -> ForwardError {
    let source = Command::new("scp")
        .args(scp_argv(ssh, recursive, paths, namespace))
        .exec();
    ForwardError::Exec {
        program: "scp",
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_pairs_read_as_kubectl_port_forward_reads_them() {
        assert_eq!(parse_ports("22").unwrap(), (22, 22));
        assert_eq!(parse_ports("2222:22").unwrap(), (2222, 22));
        assert_eq!(parse_ports(":22").unwrap(), (0, 22));
        for bad in ["0", "x", "22:", "70000", "1:2:3", ":0"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_proxy_command_survives_the_shell_and_ssh_tokens() {
        let g = Globals {
            kubeconfig: Some("/home/o'brien/100%.conf".into()),
            context: None,
            namespace: "team".into(),
        };
        let line = proxy_line("/usr/bin/kubectl-godwit", &g, "web", 22);
        assert_eq!(
            line,
            r"'/usr/bin/kubectl-godwit' --kubeconfig='/home/o'\''brien/100%%.conf' --namespace='team' port-forward --stdio 'web' 22"
        );
    }

    #[test]
    fn ssh_and_scp_name_the_vm_as_a_host_of_its_namespace() {
        let ssh = SshArgs {
            proxy: "P".into(),
            identity_file: Some("/k".into()),
            options: vec!["StrictHostKeyChecking=no".into()],
        };
        assert_eq!(
            ssh_argv(&ssh, Some("root"), "web", "team", &["uname".into()]),
            [
                "-o",
                "ProxyCommand=P",
                "-o",
                "StrictHostKeyChecking=no",
                "-i",
                "/k",
                "root@web.team",
                "--",
                "uname"
            ]
        );
        let paths: Vec<String> = ["./a:b/c", "root@web:/etc/x", "local"]
            .map(String::from)
            .to_vec();
        assert_eq!(scp_vm(&paths).unwrap(), "web");
        assert_eq!(
            &scp_argv(&ssh, true, &paths, "team")[6..],
            ["-r", "./a:b/c", "root@web.team:/etc/x", "local"]
        );
        let two: Vec<String> = ["a:/x", "b:/y"].map(String::from).to_vec();
        assert!(scp_vm(&two).unwrap_err().to_string().contains("one VM"));
        let none: Vec<String> = ["x", "/y"].map(String::from).to_vec();
        assert!(scp_vm(&none)
            .unwrap_err()
            .to_string()
            .contains("[USER@]VM:PATH"));
    }
}
