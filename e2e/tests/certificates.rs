//! Node migration certificates through the CertificateSigningRequest API,
//! in the local cluster (the agents run with `--migration-csr` and no CA;
//! each agent's token is bound to its node, `<NODE_USER>@<node>`):
//! - each node's certificate was issued through a CSR the operator approved,
//!   and names only that node (CN, DNS name, its IP), for the node's own key;
//! - a CSR from node-0's identity asking for node-1's name is denied, and
//!   so is one from a user who is not the node daemons' service account;
//!   neither gets a certificate;
//! - a VM migrates live between the nodes over mutual TLS with these
//!   certificates;
//! - a node asks again before its certificate expires.
//!
//! Needs /dev/kvm and the release binaries (as e2e/test.sh builds them).

use std::time::Duration;

use godwit_crds::contract::{MIGRATION_SIGNER, NODE_CN_PREFIX};
use godwit_e2e::cluster::NODE_USER;
use godwit_e2e::driver::{node_of, ClusterDriver, EXAMPLE_MIGRATION, EXAMPLE_TEMPLATE, EXAMPLE_VM};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;
use x509_parser::extensions::GeneralName;

/// The CN, DNS names and IPs of a PEM certificate.
fn names_of(pem: &[u8]) -> (String, Vec<String>, Vec<String>) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).expect("PEM");
    let cert = pem.parse_x509().expect("X.509");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) if b.len() == 4 => {
                    ips.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string())
                }
                other => panic!("unexpected alternative name {other:?}"),
            }
        }
    }
    (cn, dns, ips)
}

/// Every file below `dir`.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files.extend(files_under(&path)),
            Ok(t) if t.is_file() => files.push(path),
            _ => {}
        }
    }
    files
}

/// A request for `node`'s certificate (a fresh key), as an agent makes it.
fn request_for(name: &str, node: &str, ip: &str) -> CertificateSigningRequest {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![node.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{NODE_CN_PREFIX}{node}"));
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(ip.parse().unwrap()));
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
            ..Default::default()
        },
        status: None,
    }
}

/// Creates `csr` as `user` and waits for the operator's decision: the
/// condition type and message, and whether a certificate came.
fn decided(url: &str, user: &str, csr: &CertificateSigningRequest) -> (String, String, bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let yaml = godwit_apiserver::kubeconfig_yaml(url, user);
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::from_yaml(&yaml).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let api: Api<CertificateSigningRequest> = Api::all(kube::Client::try_from(config).unwrap());
        let name = csr.metadata.name.clone().unwrap();
        api.create(&PostParams::default(), csr).await.unwrap();
        for _ in 0..120 {
            let got = api.get(&name).await.unwrap();
            let status = got.status.unwrap_or_default();
            if let Some(c) = status.conditions.unwrap_or_default().into_iter().next() {
                // Give a signer that approved the time to sign.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let issued = api
                    .get(&name)
                    .await
                    .unwrap()
                    .status
                    .and_then(|s| s.certificate);
                return (c.type_, c.message.unwrap_or_default(), issued.is_some());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("no decision on {name} in 30 s");
    })
}

#[test]
fn node_certificates_come_through_csrs_for_the_own_node_only_and_migrations_use_them() {
    let dir = std::env::temp_dir().join(format!("godwit-certificates-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("local cluster with Godwit");
    let nodes: Vec<(String, String)> = g
        .cluster
        .fabric
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.ip.clone()))
        .collect();

    // Each node's certificate: its own name and address only, for its key.
    for (i, (node, ip)) in nodes.iter().enumerate() {
        let tls = g.cluster.node_state_dir(i).join("tls");
        let cert = g
            .wait("the node certificate", Duration::from_secs(60), || {
                Ok(std::fs::read(tls.join("node.crt")).ok())
            })
            .unwrap();
        let (cn, dns, ips) = names_of(&cert);
        assert_eq!(cn, format!("{NODE_CN_PREFIX}{node}"));
        assert_eq!(dns, vec![node.clone()], "DNS names of {node}'s certificate");
        assert_eq!(ips, vec![ip.clone()], "IPs of {node}'s certificate");
        // The key on the node is the certificate's.
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(tls.join("node.key")).unwrap())
            .unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&cert).unwrap();
        assert_eq!(
            pem.parse_x509().unwrap().public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        // The trusted CA is the published one, without its key.
        let ca = std::fs::read_to_string(tls.join("ca.crt")).unwrap();
        assert!(ca.contains("BEGIN CERTIFICATE") && !ca.contains("PRIVATE KEY"));
    }
    // They came through CSRs, approved and issued, requested by the nodes.
    let csrs = g.kubectl(&["get", "csr", "-o", "json"], None).unwrap();
    let csrs: Value = serde_json::from_str(&csrs).unwrap();
    for (node, _) in &nodes {
        let found = csrs["items"].as_array().unwrap().iter().any(|c| {
            c["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&format!("godwit-node-{node}-")))
                && c["spec"]["username"] == NODE_USER
                && c["spec"]["signerName"] == MIGRATION_SIGNER
                && c["status"]["conditions"][0]["type"] == "Approved"
                && c["status"]["certificate"].is_string()
        });
        assert!(found, "no issued CSR of {node}:\n{csrs:#}");
    }
    // No file of any node holds the CA key (only the operator reads it).
    let ca_key = g
        .kubectl(
            &[
                "-n",
                "godwit-system",
                "get",
                "secret",
                "godwit-migration-ca",
                "-o",
                "go-template={{index .data \"ca.key\" | base64decode}}",
            ],
            None,
        )
        .unwrap();
    assert!(ca_key.contains("PRIVATE KEY"), "{ca_key}");
    let body = ca_key
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() > 40)
        .unwrap()
        .to_string();
    for i in 0..nodes.len() {
        let held = files_under(&g.cluster.node_state_dir(i))
            .into_iter()
            .filter(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains(&body)))
            .collect::<Vec<_>>();
        assert!(held.is_empty(), "node {i} holds the CA key in {held:?}");
    }

    // Node-0's identity asking for node-1's certificate: denied.
    let url = g.cluster.api.url().to_string();
    let (node0, node1) = (&nodes[0].0, &nodes[1]);
    let (kind, message, issued) = decided(
        &url,
        &format!("{NODE_USER}@{node0}"),
        &request_for("steal-node-1", &node1.0, &node1.1),
    );
    assert_eq!(kind, "Denied", "{message}");
    assert!(
        message.contains(node0) && message.contains(&node1.0),
        "{message}"
    );
    assert!(!issued, "a denied request got a certificate");
    // Someone who is not the node daemons' user: denied.
    let (kind, message, issued) = decided(
        &url,
        "alice",
        &request_for("alice-node-0", node0, &nodes[0].1),
    );
    assert_eq!(kind, "Denied", "{message}");
    assert!(message.contains("alice"), "{message}");
    assert!(!issued);
    // Node-0 for itself, a second time: approved and signed.
    let (kind, message, issued) = decided(
        &url,
        &format!("{NODE_USER}@{node0}"),
        &request_for("node-0-again", node0, &nodes[0].1),
    );
    assert_eq!(kind, "Approved", "{message}");
    assert!(issued, "an approved request got no certificate");

    // A live migration over mutual TLS with these certificates.
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(EXAMPLE_VM)).unwrap();
    g.wait_running("demo", Duration::from_secs(90)).unwrap();
    g.apply(&g.example(EXAMPLE_MIGRATION)).unwrap();
    let phase = g
        .wait("the migration to end", Duration::from_secs(300), || {
            let m = g.get("gvmm", "demo-move")?;
            let phase = m.as_ref().and_then(|m| m["status"]["phase"].as_str());
            Ok(phase
                .filter(|p| matches!(*p, "Succeeded" | "Failed" | "Cancelled"))
                .map(String::from))
        })
        .unwrap();
    assert_eq!(phase, "Succeeded");
    let vm = g.wait_running("demo", Duration::from_secs(30)).unwrap();
    // The target's VMM took the VM over mutual TLS only.
    let target = g.node_index(&node_of(&vm)).unwrap();
    let log = std::fs::read_to_string(g.vm_dir(target, "default", "demo").join("vmm.log"))
        .unwrap_or_default();
    assert!(
        log.contains("the incoming migration must use mutual TLS"),
        "the target VMM did not require TLS:\n{log}"
    );
}

/// A node whose certificate is short-lived (it asks for 30 s) asks again at
/// two thirds of it: a new request, a new key, the same names.
#[test]
fn a_node_asks_again_before_its_certificate_expires() {
    let dir = std::env::temp_dir().join(format!(
        "godwit-certificates-renewal-{}",
        std::process::id()
    ));
    let g = ClusterDriver::up_with_agents(1, &dir, &[], &["--migration-certificate-seconds", "30"])
        .expect("local cluster with Godwit");
    let node = g.cluster.fabric.nodes[0].name.clone();
    let tls = g.cluster.node_state_dir(0).join("tls");
    let first = g
        .wait("the first certificate", Duration::from_secs(60), || {
            Ok(std::fs::read(tls.join("node.crt")).ok())
        })
        .unwrap();
    let first_key = std::fs::read(tls.join("node.key")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&first).unwrap();
    let validity = pem.parse_x509().unwrap().validity().clone();
    assert_eq!(
        validity.not_after.timestamp() - validity.not_before.timestamp(),
        3600 + 30,
        "what it asked for, from the signer's hour of clock skew"
    );
    let second = g
        .wait("a renewed certificate", Duration::from_secs(60), || {
            Ok(std::fs::read(tls.join("node.crt"))
                .ok()
                .filter(|c| *c != first))
        })
        .unwrap();
    assert_eq!(names_of(&second), names_of(&first));
    assert_ne!(std::fs::read(tls.join("node.key")).unwrap(), first_key);
    let csrs: Value =
        serde_json::from_str(&g.kubectl(&["get", "csr", "-o", "json"], None).unwrap()).unwrap();
    let issued = csrs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&format!("godwit-node-{node}-")))
                && c["status"]["certificate"].is_string()
        })
        .count();
    assert!(issued >= 2, "{issued} issued request(s) of {node}");
}
