//! CertificateSigningRequests on the in-memory API test server: kube-rs
//! create, watch, get, `/approval` and `/status` round trips; the requester
//! is the token's user whatever the body says; `kubectl get csr` prints
//! them.

use std::time::Duration;

use futures::StreamExt;
use godwit_apiserver::{kubeconfig_yaml, ServerConfig, ServerThread};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, watcher, Event};
use kube::Client;

/// A client acting as `user` (the token, as everywhere on this server).
async fn client_as(url: &str, user: &str) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&kubeconfig_yaml(url, user)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn csr(name: &str) -> CertificateSigningRequest {
    CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(b"-----BEGIN CERTIFICATE REQUEST-----\n".to_vec()),
            signer_name: "godwit.dev/migration".into(),
            usages: Some(vec!["client auth".into(), "server auth".into()]),
            // Claims the requester cannot make: the server replaces them.
            username: Some("system:admin".into()),
            groups: Some(vec!["system:masters".into()]),
            ..Default::default()
        },
        status: None,
    }
}

fn condition(type_: &str) -> CertificateSigningRequestCondition {
    CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some("Test".into()),
        message: Some(format!("{type_} by the test")),
        ..Default::default()
    }
}

#[test]
fn csr_round_trips_through_approval_and_status_and_kubectl_prints_it() {
    let server =
        ServerThread::start("127.0.0.1:0".parse().unwrap(), ServerConfig::default()).unwrap();
    let url = server.url().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let node = Api::<CertificateSigningRequest>::all(
            client_as(
                &url,
                "system:serviceaccount:godwit-system:godwit-node@node-0",
            )
            .await,
        );
        let signer = Api::<CertificateSigningRequest>::all(
            client_as(&url, "system:serviceaccount:godwit-system:godwit-operator").await,
        );
        let mut events = watcher(signer.clone(), watcher::Config::default()).boxed();

        let created = node
            .create(&PostParams::default(), &csr("a"))
            .await
            .unwrap();
        assert_eq!(
            created.spec.username.as_deref(),
            Some("system:serviceaccount:godwit-system:godwit-node")
        );
        let groups = created.spec.groups.clone().unwrap();
        assert!(groups.contains(&"system:serviceaccounts:godwit-system".to_string()));
        assert!(
            !groups.contains(&"system:masters".to_string()),
            "{groups:?}"
        );
        let extra = created.spec.extra.clone().unwrap();
        assert_eq!(
            extra["authentication.kubernetes.io/node-name"],
            vec!["node-0".to_string()]
        );

        // The signer's watch sees it.
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(event) = events.next().await {
                if let Ok(Event::Apply(o) | Event::InitApply(o)) = event {
                    if o.metadata.name.as_deref() == Some("a") {
                        return o;
                    }
                }
            }
            panic!("the watch ended");
        })
        .await
        .expect("the watch shows the CSR");
        assert_eq!(seen.spec.signer_name, "godwit.dev/migration");

        // A main-resource write cannot change who asked.
        let mut tampered = seen.clone();
        tampered.spec.username = Some("system:admin".into());
        let kept = node
            .replace("a", &PostParams::default(), &tampered)
            .await
            .unwrap();
        assert_eq!(
            kept.spec.username.as_deref(),
            Some("system:serviceaccount:godwit-system:godwit-node")
        );

        // /approval writes the decision only.
        let approval = serde_json::json!({"status": {
            "conditions": [condition("Approved")],
            "certificate": ByteString(b"not through approval".to_vec()),
        }});
        let approved = signer
            .patch_approval("a", &PatchParams::default(), &Patch::Merge(&approval))
            .await
            .unwrap();
        let status = approved.status.clone().unwrap();
        assert_eq!(status.conditions.unwrap()[0].type_, "Approved");
        assert!(status.certificate.is_none());

        // /status writes the certificate and keeps the decision.
        let mut issued = approved.clone();
        issued.status = Some(CertificateSigningRequestStatus {
            certificate: Some(ByteString(b"CERT".to_vec())),
            conditions: None,
        });
        signer
            .replace_status("a", &PostParams::default(), &issued)
            .await
            .unwrap();
        let got = node.get("a").await.unwrap();
        let status = got.status.unwrap();
        assert_eq!(status.certificate, Some(ByteString(b"CERT".to_vec())));
        assert_eq!(status.conditions.unwrap()[0].type_, "Approved");
        // A status patch cannot take the decision back.
        let reissue = serde_json::json!({"status": {
            "certificate": ByteString(b"CERT2".to_vec()),
            "conditions": [],
        }});
        let patched = signer
            .patch_status("a", &PatchParams::default(), &Patch::Merge(&reissue))
            .await
            .unwrap()
            .status
            .unwrap();
        assert_eq!(patched.certificate, Some(ByteString(b"CERT2".to_vec())));
        assert_eq!(patched.conditions.unwrap()[0].type_, "Approved");

        // A second one, denied.
        node.create(&PostParams::default(), &csr("b"))
            .await
            .unwrap();
        let denial = serde_json::json!({"status": {"conditions": [condition("Denied")]}});
        signer
            .patch_approval("b", &PatchParams::default(), &Patch::Merge(&denial))
            .await
            .unwrap();
    });

    // The signer's writes are logged with the signer permission they imply.
    let records = server.requests();
    let check = |verb: &str| {
        records.iter().any(|r| {
            r.verb == verb
                && r.resource == "signers"
                && r.api_group == "certificates.k8s.io"
                && r.name == "godwit.dev/migration"
        })
    };
    assert!(check("approve") && check("sign"), "no signer checks logged");

    let dir = std::env::temp_dir().join(format!("godwit-apiserver-csr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig, "admin").unwrap();
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(["get", "csr"])
        .env("HOME", &dir)
        .output()
        .expect("kubectl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row {name} in:\n{stdout}"))
            .to_string()
    };
    assert!(stdout.contains("SIGNERNAME"), "{stdout}");
    let a = line("a");
    assert!(a.contains("godwit.dev/migration"), "{a}");
    assert!(
        a.contains("system:serviceaccount:godwit-system:godwit-node"),
        "{a}"
    );
    assert!(a.contains("Approved,Issued"), "{a}");
    assert!(line("b").contains("Denied"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
