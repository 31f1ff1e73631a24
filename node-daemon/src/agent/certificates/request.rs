//! The node's certificate through the Kubernetes CertificateSigningRequest
//! API (`--migration-csr`): the key is made here and never leaves the node.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant A as agent (node-0)
//!     participant K as API server
//!     participant O as operator (signer)
//!     A->>K: create CSR godwit-node-node-0-<hash> (signer godwit.dev/migration)
//!     Note over K: spec.username/groups/extra := the requester's token
//!     K-->>O: watch: a new request of our signer
//!     O->>K: update /approval: Approved (or Denied, with why)
//!     O->>K: apply ConfigMap godwit-migration-ca (ca.crt)
//!     O->>K: update /status: certificate
//!     A->>K: get CSR (every 500 ms until issued, denied or timed out)
//!     A->>K: get ConfigMap godwit-migration-ca
//!     Note over A: write node.key, node.crt, ca.crt; ask again at 2/3 of the validity
//! ```
//!
//! The CSR's name is the node's name and a hash of the request, so every
//! request (one per start, one per renewal) is a new object.

use std::time::{Duration, SystemTime};

use godwit_crds::contract::{MIGRATION_CA_CONFIGMAP, MIGRATION_SIGNER};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use rcgen::{KeyPair, PublicKeyData};
use tracing::{info, warn};

use super::{node_params, write_identity, IdentityError};
use crate::migration::tls::TlsFiles;

/// How long the agent waits for its certificate by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// The key usages a node asks for (Kubernetes' names).
pub const USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// Who asks, for what, and where the identity goes.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    /// The node's name.
    pub node: String,
    /// Its migration address (IP or host name).
    pub address: String,
    /// The namespace of the ConfigMap with the CA certificates (the
    /// operator's).
    pub ca_namespace: String,
    /// Where the key, certificate and CA bundle are written.
    pub out_dir: std::path::PathBuf,
    /// How long to wait for the certificate.
    pub wait: Duration,
    /// The lifetime to ask for (`spec.expirationSeconds`; Kubernetes wants
    /// at least 600); `None` takes the signer's (the operator's
    /// `--node-certificate-days`).
    pub lifetime: Option<Duration>,
}

/// A certificate received and written.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The files written.
    pub files: TlsFiles,
    /// When to ask again: two thirds of the way from receipt to expiry.
    pub renew_at: SystemTime,
}

/// The CSR object's name for a `request` of `node`.
pub fn csr_name(node: &str, request: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, request.as_bytes());
    let hash: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("godwit-node-{node}-{hash}")
}

/// Makes a key, asks for its certificate and waits for it, then writes the
/// identity.
pub async fn request(client: &Client, id: &NodeIdentity) -> Result<Issued, IdentityError> {
    let key = KeyPair::generate().map_err(IdentityError::Issue)?;
    let pem = node_params(&id.node, &id.address)
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(IdentityError::Issue)?;
    let name = csr_name(&id.node, &pem);
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: MIGRATION_SIGNER.into(),
            usages: Some(USAGES.iter().map(|u| u.to_string()).collect()),
            expiration_seconds: id
                .lifetime
                .map(|l| i32::try_from(l.as_secs()).unwrap_or(i32::MAX)),
            ..Default::default()
        },
        status: None,
    };
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    api.create(&PostParams::default(), &csr)
        .await
        .map_err(|e| IdentityError::Request(name.clone(), e))?;
    info!(csr = %name, signer = MIGRATION_SIGNER, "asked for the node's migration certificate; waiting for the operator to sign it");
    let cert = wait_for_certificate(&api, &name, id.wait).await?;
    let cert = String::from_utf8(cert)
        .map_err(|_| IdentityError::Issued(name.clone(), "not PEM text".into()))?;
    let renew_at = check_issued(&name, &cert, &key)?;

    let what = format!("{}/{MIGRATION_CA_CONFIGMAP}", id.ca_namespace);
    let ca = Api::<ConfigMap>::namespaced(client.clone(), &id.ca_namespace)
        .get(MIGRATION_CA_CONFIGMAP)
        .await
        .map_err(|e| IdentityError::CaConfigMap(what.clone(), e))?
        .data
        .and_then(|d| d.get("ca.crt").cloned())
        .filter(|c| !c.is_empty())
        .ok_or(IdentityError::CaMissing(what))?;
    let files = write_identity(&id.out_dir, &key.serialize_pem(), &cert, &ca)?;
    info!(csr = %name, "the node's migration certificate is in place");
    Ok(Issued { files, renew_at })
}

/// Polls the request until it has a certificate, is refused, or `wait`
/// has passed.
async fn wait_for_certificate(
    api: &Api<CertificateSigningRequest>,
    name: &str,
    wait: Duration,
) -> Result<Vec<u8>, IdentityError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let csr = api
            .get(name)
            .await
            .map_err(|e| IdentityError::Request(name.to_string(), e))?;
        let status = csr.status.unwrap_or_default();
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            return Ok(cert.0);
        }
        let refused = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| matches!(c.type_.as_str(), "Denied" | "Failed") && c.status == "True");
        if let Some(c) = refused {
            let why = c.message.or(c.reason).unwrap_or_default();
            return Err(IdentityError::Denied(
                name.to_string(),
                format!("{}: {why}", c.type_),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(IdentityError::Timeout(name.to_string(), wait.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Checks that `cert` is a certificate for `key` and says when to renew it.
fn check_issued(name: &str, cert: &str, key: &KeyPair) -> Result<SystemTime, IdentityError> {
    let bad = |why: String| IdentityError::Issued(name.to_string(), why);
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let x509 = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    if x509.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad("it is not for this node's key".into()));
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Ok(renew_time(now, x509.validity().not_after.timestamp()))
}

/// Two thirds of the way from `received` to `not_after` (Unix seconds).
/// From receipt, not from `notBefore`: signers date certificates back for
/// clock skew (the operator by an hour), which would make a short-lived
/// certificate due at once.
pub fn renew_time(received: i64, not_after: i64) -> SystemTime {
    let at = received + (not_after - received).max(0) * 2 / 3;
    SystemTime::UNIX_EPOCH + Duration::from_secs(at.max(0) as u64)
}

/// The least time between two requests, whatever a certificate says.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(10);

/// Asks for a new certificate whenever the current one reaches two thirds
/// of its validity; a failed request is tried again a minute later (the
/// current certificate is still valid meanwhile).
pub async fn keep_renewed(client: Client, id: NodeIdentity, mut renew_at: SystemTime) {
    loop {
        let left = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .max(MIN_RENEWAL_INTERVAL);
        tokio::time::sleep(left).await;
        match request(&client, &id).await {
            Ok(issued) => renew_at = issued.renew_at,
            Err(e) => {
                warn!(
                    "cannot renew the node's migration certificate (retrying in 60 s): {}",
                    godwit_crds::error_chain(&e)
                );
                renew_at = SystemTime::now() + Duration::from_secs(60);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_renewal_times() {
        let a = csr_name("node-0", "request a");
        assert!(a.starts_with("godwit-node-node-0-") && a.len() == "godwit-node-node-0-".len() + 8);
        assert_ne!(a, csr_name("node-0", "request b"));
        // A year from receipt at t=0: renew after 243⅓ days.
        let year = 365 * 86_400;
        assert_eq!(
            renew_time(0, year),
            SystemTime::UNIX_EPOCH + Duration::from_secs(year as u64 * 2 / 3)
        );
    }

    #[test]
    fn the_request_names_the_node_and_its_address() {
        let key = KeyPair::generate().unwrap();
        let pem = node_params("node-0", "10.88.0.1")
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert_eq!(parsed.params.subject_alt_names.len(), 2);
        let cn = parsed
            .params
            .distinguished_name
            .get(&rcgen::DnType::CommonName)
            .unwrap();
        assert_eq!(
            cn,
            &rcgen::DnValue::Utf8String("system:godwit-node:node-0".into())
        );
    }
}
