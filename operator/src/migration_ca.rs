//! The migration CA's Secret: the operator makes it when it is missing, so
//! the rendered chart carries no key material (`helm template` renders the
//! same bytes every time, and a GitOps sync never rotates the CA). A Secret
//! that exists, made earlier or brought by the user, is kept as it is.
//!
//! The Secret (`ca.crt`, `ca.key`, PEM) is in the operator's namespace, and
//! only the operator reads it: its signer ([`crate::signer`]) signs the node
//! daemons' certificate requests with it and publishes `ca.crt` (never the
//! key) in a ConfigMap for the nodes.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tracing::{info, warn};

/// The default name of the Secret (the chart's `migrationCA.secretName`).
pub const DEFAULT_SECRET: &str = godwit_crds::contract::MIGRATION_CA_SECRET;
/// The default validity of a CA the operator makes, in days.
pub const DEFAULT_VALIDITY_DAYS: u32 = 3650;

/// Which Secret holds the migration CA, and how long a new CA lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaSecret {
    /// Its namespace (the operator's).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Days a CA made here is valid.
    pub validity_days: u32,
}

/// Why the CA Secret could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    /// The API refused a read or the create.
    #[error("Cannot read or create Secret {0}")]
    Api(String, #[source] kube::Error),
    /// The CA could not be generated.
    #[error("Cannot generate the migration CA")]
    Generate(#[source] rcgen::Error),
}

/// What [`ensure`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The Secret was there and is kept.
    Kept,
    /// It was missing and is made now.
    Created,
}

/// A new self-signed CA valid for `days` from an hour ago: its certificate
/// and key, PEM.
pub fn generate(days: u32) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "godwit-migration-ca");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Makes the Secret `ca` names when it does not exist; keeps it when it
/// does (another replica that made it first wins).
pub async fn ensure(client: &Client, ca: &CaSecret) -> Result<Outcome, CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &ca.namespace);
    let what = || format!("{}/{}", ca.namespace, ca.name);
    if api
        .get_opt(&ca.name)
        .await
        .map_err(|e| CaSecretError::Api(what(), e))?
        .is_some()
    {
        return Ok(Outcome::Kept);
    }
    let (crt, key) = generate(ca.validity_days).map_err(CaSecretError::Generate)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(ca.name.clone()),
            namespace: Some(ca.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "godwit".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            ("ca.crt".to_string(), ByteString(crt.into_bytes())),
            ("ca.key".to_string(), ByteString(key.into_bytes())),
        ])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(Outcome::Created),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Outcome::Kept),
        Err(e) => Err(CaSecretError::Api(what(), e)),
    }
}

/// The CA's certificate bundle and key (PEM) from its Secret; `None` when
/// the Secret is missing or lacks either.
pub async fn read(client: &Client, ca: &CaSecret) -> Result<Option<(String, String)>, kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ca.namespace);
    let Some(secret) = secrets.get_opt(&ca.name).await? else {
        return Ok(None);
    };
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|s| !s.is_empty())
    };
    Ok(text("ca.crt").zip(text("ca.key")))
}

/// [`ensure`], retried every 5 s until it succeeds (the signer retries its
/// requests meanwhile).
pub async fn keep_ensured(client: Client, ca: CaSecret) {
    loop {
        match ensure(&client, &ca).await {
            Ok(Outcome::Created) => {
                info!(secret = %format!("{}/{}", ca.namespace, ca.name), days = ca.validity_days, "made the migration CA");
                return;
            }
            Ok(Outcome::Kept) => return,
            Err(e) => warn!("{}; retrying in 5 s", godwit_crds::error_chain(&e)),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_ca_is_a_ca_for_the_days_asked() {
        let (crt, key) = generate(30).unwrap();
        assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"), "{crt}");
        assert!(key.contains("PRIVATE KEY"), "{key}");
        let (_, pem) = x509_parser::pem::parse_x509_pem(crt.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert!(cert.is_ca());
        let validity = cert.validity();
        let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
        assert_eq!(days, 30, "one hour before now to 30 days after");
        // The key is the certificate's: it signs a node certificate.
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&crt, rcgen::KeyPair::from_pem(&key).unwrap()).unwrap();
        let leaf = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec!["node-a".into()])
            .unwrap()
            .signed_by(&leaf, &issuer)
            .unwrap();
        // Two CAs are two keys.
        assert_ne!(generate(30).unwrap().1, key);
    }
}
