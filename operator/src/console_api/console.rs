//! The requests of the console API: discovery, `virtualmachines/console`
//! and `virtualmachines/portforward/<port>`.
//!
//! Both are WebSockets in Kubernetes' channel protocol: channel 0 carries
//! what the client sends, channel 1 what the VM answers. The console is
//! the VM's serial port; a port-forward is a TCP connection that the VM's
//! node agent opens to that port of the guest (see
//! `godwit_crds::contract::FORWARD_HELLO`), as `virtctl port-forward`
//! reaches a KubeVirt VM. Each needs its own RBAC right: `get` on
//! `virtualmachines/console` or `virtualmachines/portforward`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use godwit_crds::contract::{
    CONSOLE_HELLO, CONSOLE_PORT, FORWARD_HELLO, SUBRESOURCES_GROUP, SUBRESOURCES_VERSION,
};
use godwit_crds::VirtualMachine;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use kube::Client;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::info;

use super::front_proxy::{FrontProxy, RemoteUser};

/// The WebSocket subprotocol spoken: Kubernetes' channel protocol.
const CHANNEL_PROTOCOL: &str = "v4.channel.k8s.io";
/// Channel of what the user types.
const STDIN: u8 = 0;
/// Channel of what the guest writes.
const STDOUT: u8 = 1;

/// What every request needs.
pub struct Shared {
    /// The operator's client (reads VMs and Nodes, asks reviews).
    pub client: Client,
    /// How to read the user the front proxy names.
    pub front: FrontProxy,
    /// TLS to the nodes' console ports, as the console proxy.
    pub to_nodes: Arc<ClientConfig>,
}

type Body = Full<Bytes>;

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("a valid response")
}

/// A Kubernetes `Status` failure, which kubectl and kube-rs show as it is.
fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": reason, "message": message,
            "code": code.as_u16(),
        }),
    )
}

/// What a request asks of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subresource {
    /// Its serial console.
    Console,
    /// A TCP connection to this port of the guest.
    PortForward(u16),
}

impl Subresource {
    /// The RBAC subresource that allows it.
    pub fn rbac_name(self) -> &'static str {
        match self {
            Subresource::Console => "console",
            Subresource::PortForward(_) => "portforward",
        }
    }

    /// The request line sent to the node agent for VM `ns/name`.
    fn hello(self, ns: &str, name: &str) -> String {
        match self {
            Subresource::Console => format!("{CONSOLE_HELLO} {ns}/{name}\n"),
            Subresource::PortForward(port) => format!("{FORWARD_HELLO} {ns}/{name} {port}\n"),
        }
    }

    /// What it is, for messages.
    fn what(self) -> String {
        match self {
            Subresource::Console => "the console".into(),
            Subresource::PortForward(port) => format!("port {port}"),
        }
    }
}

/// The `(namespace, name, subresource)` a path names.
pub fn subresource_path(path: &str) -> Option<(&str, &str, Subresource)> {
    let prefix = format!("/apis/{SUBRESOURCES_GROUP}/{SUBRESOURCES_VERSION}/namespaces/");
    let rest = path.strip_prefix(prefix.as_str())?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (ns, name, sub) = match parts.as_slice() {
        [ns, "virtualmachines", name, "console"] => (*ns, *name, Subresource::Console),
        [ns, "virtualmachines", name, "portforward", port] => {
            let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
            (*ns, *name, Subresource::PortForward(port))
        }
        _ => return None,
    };
    (!ns.is_empty() && !name.is_empty()).then_some((ns, name, sub))
}

fn discovery(path: &str) -> Option<Value> {
    let gv = format!("{SUBRESOURCES_GROUP}/{SUBRESOURCES_VERSION}");
    let version = json!({"groupVersion": gv, "version": SUBRESOURCES_VERSION});
    let group = json!({
        "name": SUBRESOURCES_GROUP, "versions": [version], "preferredVersion": version,
    });
    if path == "/apis" {
        return Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}));
    }
    if path == format!("/apis/{SUBRESOURCES_GROUP}") {
        let mut group = group;
        group["kind"] = json!("APIGroup");
        group["apiVersion"] = json!("v1");
        return Some(group);
    }
    (path == format!("/apis/{gv}")).then(|| {
        json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
            "resources": [
                {
                    "name": "virtualmachines/console", "singularName": "", "namespaced": true,
                    "kind": "VirtualMachine", "verbs": ["get"],
                },
                {
                    "name": "virtualmachines/portforward", "singularName": "", "namespaced": true,
                    "kind": "VirtualMachine", "verbs": ["get"],
                },
            ],
        })
    })
}

/// Serves one request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/healthz" || path == "/readyz" || path == "/livez" {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok"))));
    }
    if let Some(doc) = discovery(&path) {
        return Ok(json_response(StatusCode::OK, &doc));
    }
    let Some((ns, name, sub)) = subresource_path(&path) else {
        return Ok(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!(
                "{path} is not served here; {SUBRESOURCES_GROUP} serves \
                 virtualmachines/<name>/console and virtualmachines/<name>/portforward/<port>"
            ),
        ));
    };
    let (ns, name) = (ns.to_string(), name.to_string());
    Ok(relay(shared, req, &ns, &name, sub)
        .await
        .unwrap_or_else(|refusal| refusal))
}

/// The WebSocket accept key and the subprotocol, or why this is no
/// WebSocket request we can serve.
fn websocket_handshake(headers: &HeaderMap) -> Result<String, String> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !header("upgrade").eq_ignore_ascii_case("websocket") {
        return Err(
            "this is a WebSocket: connect with `kubectl godwit console` or `kubectl godwit port-forward`"
                .into(),
        );
    }
    let protocols = header("sec-websocket-protocol");
    if !protocols.split(',').any(|p| p.trim() == CHANNEL_PROTOCOL) {
        return Err(format!(
            "{SUBRESOURCES_GROUP} speaks the WebSocket subprotocol {CHANNEL_PROTOCOL}; asked for {protocols:?}"
        ));
    }
    let key = header("sec-websocket-key");
    if key.is_empty() {
        return Err("no Sec-WebSocket-Key".into());
    }
    Ok(derive_accept_key(key.as_bytes()))
}

async fn relay(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    ns: &str,
    name: &str,
    sub: Subresource,
) -> Result<Response<Body>, Response<Body>> {
    let user = shared.front.user(req.headers()).ok_or_else(|| {
        status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "no user named by the API server's front proxy".into(),
        )
    })?;
    authorize(&shared.client, &user, ns, name, sub).await?;
    let accept = websocket_handshake(req.headers())
        .map_err(|why| status(StatusCode::BAD_REQUEST, "BadRequest", why))?;
    let node_conn = dial_node(&shared, ns, name, sub).await?;
    info!(user = %user.name, namespace = %ns, vm = %name, ?sub, "attached");
    let (ns, name) = (ns.to_string(), name.to_string());
    tokio::spawn(async move {
        match hyper::upgrade::on(&mut req).await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                bridge(ws, node_conn).await;
                info!(user = %user.name, namespace = %ns, vm = %name, ?sub, "detached");
            }
            Err(e) => info!("upgrade failed: {e}"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .header("sec-websocket-protocol", CHANNEL_PROTOCOL)
        .body(Full::new(Bytes::new()))
        .expect("a valid response"))
}

/// `get` on `virtualmachines/<sub>` in `ns`, asked of the API server for
/// the user the front proxy named.
async fn authorize(
    client: &Client,
    user: &RemoteUser,
    ns: &str,
    name: &str,
    sub: Subresource,
) -> Result<(), Response<Body>> {
    let subresource = sub.rbac_name();
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            groups: Some(user.groups.clone()),
            extra: Some(user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(SUBRESOURCES_GROUP.into()),
                version: Some(SUBRESOURCES_VERSION.into()),
                resource: Some("virtualmachines".into()),
                subresource: Some(subresource.into()),
                verb: Some("get".into()),
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| {
            status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!(
                    "cannot ask the API server whether {:?} may attach: {e}",
                    user.name
                ),
            )
        })?;
    match answer.status {
        Some(s) if s.allowed => Ok(()),
        _ => Err(status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "user {:?} may not get virtualmachines/{subresource} in namespace {ns:?} \
                 (group {SUBRESOURCES_GROUP}): ask for the edit or admin role there, \
                 or a role with that rule",
                user.name
            ),
        )),
    }
}

/// Connects to the console port of the VM's node and asks for `sub`.
async fn dial_node(
    shared: &Shared,
    ns: &str,
    name: &str,
    sub: Subresource,
) -> Result<TlsStream<TcpStream>, Response<Body>> {
    let unavailable =
        |why: String| status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", why);
    let vms: Api<VirtualMachine> = Api::namespaced(shared.client.clone(), ns);
    let vm = vms
        .get_opt(name)
        .await
        .map_err(|e| unavailable(format!("cannot read VirtualMachine {ns}/{name}: {e}")))?
        .ok_or_else(|| {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("VirtualMachine {name:?} not found in namespace {ns:?}"),
            )
        })?;
    let node = vm
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| {
            status(
                StatusCode::CONFLICT,
                "Conflict",
                format!("VirtualMachine {ns}/{name} runs on no node; start it first"),
            )
        })?;
    let node_obj = Api::<Node>::all(shared.client.clone())
        .get_opt(&node)
        .await
        .map_err(|e| unavailable(format!("cannot read Node {node}: {e}")))?
        .ok_or_else(|| unavailable(format!("Node {node} of VM {ns}/{name} does not exist")))?;
    let ip = node_obj
        .status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address)
        .ok_or_else(|| unavailable(format!("Node {node} has no InternalIP address")))?;
    let fail = |why: String| {
        status(
            StatusCode::BAD_GATEWAY,
            "ServiceUnavailable",
            format!(
                "{} of {ns}/{name} on node {node} ({ip}:{CONSOLE_PORT}): {why}",
                sub.what()
            ),
        )
    };
    let server_name = ServerName::try_from(node.clone())
        .map_err(|e| fail(format!("node name is no TLS name: {e}")))?;
    let connect = async {
        let tcp = TcpStream::connect((ip.as_str(), CONSOLE_PORT)).await?;
        TlsConnector::from(shared.to_nodes.clone())
            .connect(server_name, tcp)
            .await
    };
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| fail("no answer within 10 s".into()))?
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    tls.write_all(sub.hello(ns, name).as_bytes())
        .await
        .map_err(|e| fail(e.to_string()))?;
    tls.flush().await.map_err(|e| fail(e.to_string()))?;
    // The answer line, read byte by byte so nothing after it is consumed.
    let mut answer = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        while answer.len() < 600 {
            if tls.read(&mut byte).await? == 0 {
                break;
            }
            if byte[0] == b'\n' {
                break;
            }
            answer.push(byte[0]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| fail("no answer within 10 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let answer = String::from_utf8_lossy(&answer).to_string();
    if answer != "OK" {
        let why = answer.strip_prefix("ERR ").unwrap_or(&answer).to_string();
        return Err(fail(why));
    }
    Ok(tls)
}

/// Copies between the WebSocket (channel protocol) and the node's
/// connection until either side ends.
async fn bridge<S>(ws: WebSocketStream<S>, node: TlsStream<TcpStream>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (node_rx, mut node_tx) = tokio::io::split(node);
    let to_node = async {
        while let Some(Ok(message)) = ws_rx.next().await {
            let typed = match &message {
                Message::Binary(data) => match data.split_first() {
                    Some((&STDIN, typed)) => typed,
                    _ => continue,
                },
                Message::Close(_) => break,
                _ => continue,
            };
            if node_tx.write_all(typed).await.is_err() || node_tx.flush().await.is_err() {
                break;
            }
        }
    };
    let to_user = async {
        let mut reader = BufReader::new(node_rx);
        loop {
            let chunk = match reader.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(chunk) => chunk.to_vec(),
            };
            reader.consume(chunk.len());
            let mut framed = Vec::with_capacity(chunk.len() + 1);
            framed.push(STDOUT);
            framed.extend_from_slice(&chunk);
            if ws_tx.send(Message::Binary(framed.into())).await.is_err() {
                break;
            }
        }
        let _ = ws_tx.close().await;
    };
    tokio::select! {
        () = to_node => {}
        () = to_user => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_subresource_paths_name_a_vm() {
        assert_eq!(
            subresource_path(
                "/apis/subresources.godwit.dev/v1/namespaces/team/virtualmachines/web/console"
            ),
            Some(("team", "web", Subresource::Console))
        );
        assert_eq!(
            subresource_path(
                "/apis/subresources.godwit.dev/v1/namespaces/team/virtualmachines/web/portforward/22"
            ),
            Some(("team", "web", Subresource::PortForward(22)))
        );
        for bad in [
            "/apis/subresources.godwit.dev/v1/namespaces/team/virtualmachines/web",
            "/apis/subresources.godwit.dev/v1/namespaces/team/virtualmachines/web/console/x",
            "/apis/subresources.godwit.dev/v1/namespaces//virtualmachines/web/console",
            "/apis/godwit.dev/v1/namespaces/team/virtualmachines/web/console",
            "/apis/subresources.godwit.dev/v1/namespaces/team/virtualmachines/web/portforward",
            "/apis/subresources.godwit.dev/v1/namespaces/team/virtualmachines/web/portforward/0",
            "/apis/subresources.godwit.dev/v1/namespaces/team/virtualmachines/web/portforward/x",
            "/apis/subresources.godwit.dev/v1/namespaces/team/virtualmachines/web/portforward/22/tcp",
        ] {
            assert_eq!(subresource_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_console_request_must_be_a_websocket_in_the_channel_protocol() {
        let mut h = HeaderMap::new();
        assert!(websocket_handshake(&h)
            .unwrap_err()
            .contains("kubectl godwit console"));
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        h.insert(
            "sec-websocket-protocol",
            "plain.kubevirt.io".parse().unwrap(),
        );
        assert!(websocket_handshake(&h)
            .unwrap_err()
            .contains(CHANNEL_PROTOCOL));
        h.insert(
            "sec-websocket-protocol",
            "v5.channel.k8s.io, v4.channel.k8s.io".parse().unwrap(),
        );
        // RFC 6455's example key and answer.
        assert_eq!(
            websocket_handshake(&h).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn discovery_lists_the_console_subresource() {
        let list = discovery("/apis/subresources.godwit.dev/v1").unwrap();
        assert_eq!(list["resources"][0]["name"], "virtualmachines/console");
        assert_eq!(list["resources"][1]["name"], "virtualmachines/portforward");
        assert_eq!(
            discovery("/apis/subresources.godwit.dev").unwrap()["kind"],
            "APIGroup"
        );
        assert!(discovery("/apis/other").is_none());
    }
}
