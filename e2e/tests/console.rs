//! The VM console behind Kubernetes authorization, on a local cluster with
//! the operator and a node agent:
//! - a user whom RBAC allows `get` on `virtualmachines/console`
//!   (`subresources.godwit.dev`, through Kubernetes' `edit` role and the
//!   chart's `godwit-edit`) opens the console through the API server's
//!   aggregation layer and types to the guest, which answers;
//! - a user with `view` only, and one with no role, are refused with 403;
//! - the same editor forwards a TCP connection to the guest's heartbeat
//!   server (`virtualmachines/portforward/7777`, what `kubectl godwit
//!   port-forward`, `ssh` and `scp` use) and reads heartbeats; a port with
//!   no server is a clear error; the viewer and the stranger get 403;
//! - the node's console port refuses a plain TCP client, a TLS client
//!   without a certificate, and a client with a node's own certificate (only
//!   the operator's console proxy may attach).
//!
//! `kubectl godwit console` through the API server is driven in
//! `e2e/tests/cli.rs`. Needs /dev/kvm and the release binaries (as
//! e2e/test.sh builds them).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use godwit_crds::contract::{CONSOLE_HELLO, CONSOLE_PORT};
use godwit_e2e::driver::{ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM};
use kube::config::{KubeConfigOptions, Kubeconfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_tungstenite::tungstenite::Message;

const EDITOR: &str = "alice";
const VIEWER: &str = "bob";
const STRANGER: &str = "mallory";

fn forward_request(port: u16) -> http::Request<Vec<u8>> {
    http::Request::get(format!(
        "/apis/subresources.godwit.dev/v1/namespaces/default/virtualmachines/demo/portforward/{port}"
    ))
    .body(Vec::new())
    .unwrap()
}

fn console_request() -> http::Request<Vec<u8>> {
    http::Request::get(
        "/apis/subresources.godwit.dev/v1/namespaces/default/virtualmachines/demo/console",
    )
    .body(Vec::new())
    .unwrap()
}

async fn client_as(g: &ClusterDriver, user: &str) -> kube::Client {
    let path = g.cluster.dir().join(format!("kubeconfig-{user}"));
    g.cluster.api.write_kubeconfig(&path, user).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// A blocking TLS session to `addr` with `roots`, as `identity` when given.
fn tls_probe(addr: String, tls_dir: &Path, with_node_identity: bool) -> Result<String, String> {
    let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(tls_dir.join("ca.crt"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(ca);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if with_node_identity {
        let cert: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(tls_dir.join("node.crt"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(tls_dir.join("node.key")).unwrap();
        builder.with_client_auth_cert(cert, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let tcp = TcpStream::connect(&addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = ServerName::try_from("node-0").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(format!("{CONSOLE_HELLO} default/demo\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = vec![0u8; 200];
    let n = tls.read(&mut answer).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&answer[..n]).into_owned())
}

#[test]
fn only_users_rbac_allows_reach_the_console_and_guest_ports_and_only_through_the_api_server() {
    let dir = std::env::temp_dir().join(format!("godwit-console-{}", std::process::id()));
    let g = ClusterDriver::up(1, &dir).expect("local cluster with Godwit");
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(EXAMPLE_VM)).unwrap();
    g.wait_running("demo", Duration::from_secs(90)).unwrap();
    for (user, role) in [(EDITOR, "edit"), (VIEWER, "view")] {
        g.apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {user}-{role}, namespace: default}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}
subjects: [{{kind: User, name: {user}}}]
"
        ))
        .unwrap();
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // alice (edit) attaches and types; the guest answers.
        let alice = client_as(&g, EDITOR).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let ws = loop {
            // The operator's console API starts with its CA; retry until then.
            match alice.connect(console_request()).await {
                Ok(c) => break c.into_stream(),
                Err(e) if Instant::now() < deadline => {
                    println!("console not yet: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => panic!("alice could not attach: {e}"),
            }
        };
        let (mut tx, mut rx) = ws.split();
        let mut typed = vec![0u8];
        typed.extend_from_slice(b"status\r");
        tx.send(Message::Binary(typed.into())).await.unwrap();
        let mut seen = String::new();
        let until = Instant::now() + Duration::from_secs(20);
        while !seen.contains("STATUS hb=") {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => {
                    assert_eq!(data.first(), Some(&1), "guest output comes on channel 1");
                    seen.push_str(&String::from_utf8_lossy(&data[1..]));
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no answer from the guest ({other:?}); seen: {seen}"),
            }
        }
        println!("alice typed `status`; the guest answered: {}", seen.trim());

        // alice forwards to the guest's heartbeat server and reads beats.
        let ws = alice
            .connect(forward_request(7777))
            .await
            .expect("alice forwards to port 7777")
            .into_stream();
        let (_to_guest, mut from_guest) = ws.split();
        let mut beats = String::new();
        let until = Instant::now() + Duration::from_secs(20);
        while beats.matches("HB ").count() < 3 {
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, from_guest.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => {
                    assert_eq!(data.first(), Some(&1), "guest bytes come on channel 1");
                    beats.push_str(&String::from_utf8_lossy(&data[1..]));
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no heartbeats over the forward ({other:?}); seen: {beats}"),
            }
        }
        println!(
            "alice read over port-forward: {}",
            beats.lines().next().unwrap_or("")
        );
        match alice.connect(forward_request(7778)).await {
            Err(kube::Error::Api(status)) => assert!(
                status.code == 502 && status.message.contains("cannot connect to port 7778"),
                "{status:?}"
            ),
            Ok(_) => panic!("a forward to a port with no server was opened"),
            Err(e) => panic!("a forward to a closed port: not a 502 but {e}"),
        }

        // bob (view) and mallory (no role) are refused by the API server.
        for user in [VIEWER, STRANGER] {
            let client = client_as(&g, user).await;
            for (request, sub) in [
                (console_request(), "virtualmachines/console"),
                (forward_request(7777), "virtualmachines/portforward"),
            ] {
                match client.connect(request).await {
                    Err(kube::Error::Api(status)) => {
                        assert_eq!(status.code, 403, "{user}: {status:?}");
                        assert!(status.message.contains(sub), "{user}: {}", status.message);
                        println!("{user}: {}", status.message);
                    }
                    Ok(_) => panic!("{user} reached {sub}"),
                    Err(e) => panic!("{user}: not a 403 but {e}"),
                }
            }
        }
    });

    // The node's console port, from the client namespace (as a pod would).
    let addr = format!("{}:{CONSOLE_PORT}", g.cluster.fabric.nodes[0].ip);
    let tls_dir = g.cluster.node_state_dir(0).join("tls");
    let plain = {
        let addr = addr.clone();
        g.cluster
            .fabric
            .client
            .run_in(move || {
                let mut tcp = TcpStream::connect(&addr).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                tcp.write_all(format!("{CONSOLE_HELLO} default/demo\n").as_bytes())
                    .unwrap();
                let mut answer = Vec::new();
                let _ = tcp.read_to_end(&mut answer);
                answer
            })
            .unwrap()
    };
    assert!(
        !plain.starts_with(b"OK") && !String::from_utf8_lossy(&plain).contains("READY"),
        "a plain TCP client got: {:?}",
        String::from_utf8_lossy(&plain)
    );
    let (a, d) = (addr.clone(), tls_dir.clone());
    let anonymous = g
        .cluster
        .fabric
        .client
        .run_in(move || tls_probe(a, &d, false))
        .unwrap();
    assert!(
        anonymous
            .as_ref()
            .map_or(true, |answer| !answer.starts_with("OK")),
        "a TLS client without a certificate got: {anonymous:?}"
    );
    let (a, d) = (addr, tls_dir);
    let as_node = g
        .cluster
        .fabric
        .client
        .run_in(move || tls_probe(a, &d, true))
        .unwrap();
    let as_node = as_node.expect("a node certificate completes the handshake");
    assert!(
        as_node.starts_with("ERR") && as_node.contains("console proxy"),
        "a client with a node certificate got: {as_node:?}"
    );
    println!(
        "node port: plain TCP {} bytes; no certificate: {anonymous:?}; node certificate: {}",
        plain.len(),
        as_node.trim()
    );
}
