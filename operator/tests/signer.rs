//! The migration signer against the in-process API test server: a node's
//! request for its own certificate is approved and signed with the CA from
//! the Secret (whose certificate is published in the ConfigMap); node-0's
//! token asking for node-1, a request naming two nodes, and one from
//! another user are denied with the reason and get no certificate.

mod common;

use std::time::Duration;

use godwit_crds::contract::{MIGRATION_CA_CONFIGMAP, MIGRATION_SIGNER};
use godwit_operator::migration_ca::{ensure, CaSecret};
use godwit_operator::signer::{self, SignerConfig};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

use common::*;

const NODE_USER: &str = "system:serviceaccount:godwit-system:godwit-node";

async fn client_as(url: &str, user: &str) -> Client {
    let yaml = godwit_apiserver::kubeconfig_yaml(url, user);
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(&yaml).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    Client::try_from(config).unwrap()
}

/// A request named `name` with CN `system:godwit-node:<cn>` and DNS `names`.
fn request(
    name: &str,
    cn: &str,
    names: &[&str],
    seconds: Option<i32>,
) -> CertificateSigningRequest {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("system:godwit-node:{cn}"),
    );
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: MIGRATION_SIGNER.into(),
            usages: Some(vec!["server auth".into(), "client auth".into()]),
            expiration_seconds: seconds,
            ..Default::default()
        },
        status: None,
    }
}

/// Waits for a decision on `name`: the condition type and message, and the
/// certificate once there is one (up to a few seconds after approval).
async fn decision(
    api: &Api<CertificateSigningRequest>,
    name: &str,
) -> (String, String, Option<Vec<u8>>) {
    for _ in 0..200 {
        let status = api.get(name).await.unwrap().status.unwrap_or_default();
        if let Some(c) = status.conditions.clone().unwrap_or_default().first() {
            if c.type_ == "Denied" || status.certificate.is_some() {
                let cert = status.certificate.map(|c| c.0);
                return (c.type_.clone(), c.message.clone().unwrap_or_default(), cert);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no decision on {name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_node_requests_are_signed_and_others_denied() {
    let (server, admin) = start().await;
    cluster(&admin, &["node-0", "node-1"]).await;
    let ca = CaSecret {
        namespace: LEASE_NS.into(),
        name: "godwit-migration-ca".into(),
        validity_days: 365,
    };
    ensure(&admin, &ca).await.unwrap();
    let signer_task = tokio::spawn(signer::run(
        admin.clone(),
        SignerConfig {
            ca: ca.clone(),
            node_user: NODE_USER.into(),
            validity_days: 30,
        },
    ));
    let url = server.url();
    let node0: Api<CertificateSigningRequest> =
        Api::all(client_as(&url, &format!("{NODE_USER}@node-0")).await);

    // Its own: approved, signed for node-0 only, valid for what it asked.
    node0
        .create(
            &PostParams::default(),
            &request("own", "node-0", &["node-0"], Some(7200)),
        )
        .await
        .unwrap();
    let (kind, _, cert) = decision(&node0, "own").await;
    assert_eq!(kind, "Approved");
    let cert = cert.expect("a certificate");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&cert).unwrap();
    let x509 = pem.parse_x509().unwrap();
    let cn = x509.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "system:godwit-node:node-0");
    let sans = x509.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", sans.value.general_names),
        "[DNSName(\"node-0\")]"
    );
    assert!(!x509.is_ca());
    let validity = x509.validity();
    let seconds = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert_eq!(seconds, 3600 + 7200, "an hour of skew plus what it asked");
    // Signed by the Secret's CA, whose certificate (only) is published.
    let secret = Api::<Secret>::namespaced(admin.clone(), LEASE_NS)
        .get("godwit-migration-ca")
        .await
        .unwrap();
    let ca_crt = String::from_utf8(secret.data.unwrap()["ca.crt"].0.clone()).unwrap();
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca_crt.as_bytes()).unwrap();
    assert_eq!(
        x509.issuer().to_string(),
        ca_pem.parse_x509().unwrap().subject().to_string()
    );
    let published = Api::<ConfigMap>::namespaced(admin.clone(), LEASE_NS)
        .get(MIGRATION_CA_CONFIGMAP)
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(published["ca.crt"], ca_crt);
    assert_eq!(published.len(), 1, "only the certificate is published");

    // Node-0's token asking for node-1: denied, no certificate.
    node0
        .create(
            &PostParams::default(),
            &request("steal", "node-1", &["node-1"], None),
        )
        .await
        .unwrap();
    let (kind, message, cert) = decision(&node0, "steal").await;
    assert_eq!(kind, "Denied");
    assert!(
        message.contains("node node-0") && message.contains("node-1"),
        "{message}"
    );
    assert!(cert.is_none());

    // Its own name plus another's: denied.
    node0
        .create(
            &PostParams::default(),
            &request("two", "node-0", &["node-0", "node-1"], None),
        )
        .await
        .unwrap();
    let (kind, message, _) = decision(&node0, "two").await;
    assert_eq!(kind, "Denied");
    assert!(message.contains("DNS names"), "{message}");

    // Another user: denied.
    let alice: Api<CertificateSigningRequest> = Api::all(client_as(&url, "alice").await);
    alice
        .create(
            &PostParams::default(),
            &request("alice", "node-0", &["node-0"], None),
        )
        .await
        .unwrap();
    let (kind, message, cert) = decision(&alice, "alice").await;
    assert_eq!(kind, "Denied");
    assert!(message.contains("alice"), "{message}");
    assert!(cert.is_none());
    signer_task.abort();
}
