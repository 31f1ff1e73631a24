//! The `godwit-operator` binary: flags, a kubeconfig file, `/healthz` and
//! `/metrics` (only to a token whose user RBAC allows it), and a clean stop on SIGTERM that hands the leader Lease back.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use godwit_crds::VmPhase;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_godwit-operator");

/// The user that scrapes `/metrics` (bound to a metrics-reader role below).
const SCRAPER: &str = "system:serviceaccount:monitoring:prometheus";

/// `GET path` on `addr` with `token`; the whole response, or `None` if
/// nobody answers.
async fn get(addr: &str, path: &str, token: Option<&str>) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// A ClusterRole allowing `get` on `/metrics`, bound to [`SCRAPER`].
async fn allow_scraper(client: &Client) {
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "metrics-reader"},
        "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}],
    }))
    .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "prometheus-metrics"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "metrics-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": "monitoring"}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn bad_flags_are_refused() {
    let out = Command::new(BIN)
        .args(["--placement", "balanced"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown placement strategy \"balanced\""),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["--max-migrations-per-node", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_metrics_and_stops_on_sigterm() {
    let (server, client) = start().await;
    cluster(&client, &["node-1"]).await;
    let _agents = agents_renew(&client, &["node-1"]);
    let dir = std::env::temp_dir().join(format!("godwit-operator-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, "admin").unwrap();
    let addr = format!("127.0.0.1:{}", free_port());

    let mut child = Command::new(BIN)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--lease-namespace", LEASE_NS, "--metrics-addr", &addr])
        .args(["--placement", "pack", "--id", "bin-test"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let health = eventually("/healthz", || async { get(&addr, "/healthz", None).await }).await;
    assert!(
        health.starts_with("HTTP/1.1 200 OK") && health.ends_with("ok\n"),
        "{health}"
    );
    let refused = get(&addr, "/metrics", None).await.unwrap();
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let refused = get(&addr, "/metrics", Some(SCRAPER)).await.unwrap();
    assert!(
        refused.starts_with("HTTP/1.1 403"),
        "not bound yet: {refused}"
    );
    allow_scraper(&client).await;
    eventually("leading", || async {
        get(&addr, "/metrics", Some(SCRAPER))
            .await
            .filter(|m| m.contains("godwit_operator_leader 1"))
    })
    .await;

    template(&client).await;
    create_vm(&client, "a", "base").await;
    settled(&client, "a", VmPhase::Scheduled).await;
    let metrics = eventually("the VM counted", || async {
        get(&addr, "/metrics", Some(SCRAPER))
            .await
            .filter(|m| m.contains("godwit_vms{phase=\"Scheduled\"} 1"))
    })
    .await;
    assert!(
        metrics.contains("godwit_operator_reconciles_total{controller=\"vm\",result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("godwit_vmmigrations{phase=\"Pending\"} 0"),
        "{metrics}"
    );

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}");
    let lease = Api::<Lease>::namespaced(client.clone(), LEASE_NS)
        .get("godwit-operator")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity,
        None,
        "the Lease is handed back on SIGTERM"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
