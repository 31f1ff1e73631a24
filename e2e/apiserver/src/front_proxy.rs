//! The front proxy's identity: a CA made when the server starts and the
//! client certificate [`FRONT_PROXY_CN`] it signs, which the aggregation
//! layer ([`crate::aggregator`]) presents to aggregated API servers, as
//! kube-apiserver's `--proxy-client-cert-file` and
//! `--requestheader-client-ca-file`.

use std::sync::Arc;

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{json, Value};

/// The ConfigMap published for aggregated API servers, and its namespace.
pub const AUTHENTICATION_CONFIG_MAP: (&str, &str) =
    ("kube-system", "extension-apiserver-authentication");
/// The common name of the front proxy's client certificate.
pub const FRONT_PROXY_CN: &str = "front-proxy-client";

/// The front proxy's CA and client certificate (made when the server starts).
pub struct FrontProxy {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl FrontProxy {
    /// A new CA and a client certificate [`FRONT_PROXY_CN`] signed by it.
    pub fn generate() -> Result<FrontProxy, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "front-proxy-ca");
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let mut client = CertificateParams::default();
        client
            .distinguished_name
            .push(DnType::CommonName, FRONT_PROXY_CN);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = client.signed_by(&key, &issuer)?;
        Ok(FrontProxy {
            ca_pem: ca_cert.pem(),
            cert: cert.der().clone(),
            key: key.serialize_der(),
        })
    }

    /// The ConfigMap [`AUTHENTICATION_CONFIG_MAP`].
    pub fn config_map(&self) -> Value {
        let (namespace, name) = AUTHENTICATION_CONFIG_MAP;
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace},
            "data": {
                "requestheader-client-ca-file": self.ca_pem,
                "requestheader-allowed-names": format!("[\"{FRONT_PROXY_CN}\"]"),
                "requestheader-username-headers": "[\"X-Remote-User\"]",
                "requestheader-group-headers": "[\"X-Remote-Group\"]",
                "requestheader-extra-headers-prefix": "[\"X-Remote-Extra-\"]",
            },
        })
    }

    /// TLS to a backend whose certificate chains to `ca_bundle` (PEM),
    /// presenting the front proxy's certificate.
    pub fn client_config(&self, ca_bundle: &[u8]) -> Result<ClientConfig, String> {
        let mut roots = RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca_bundle)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("caBundle is not PEM: {e}"))?;
        if roots.add_parsable_certificates(certs).0 == 0 {
            return Err("caBundle holds no CA certificate".into());
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_root_certificates(roots)
                    .with_client_auth_cert(vec![self.cert.clone()], key)
            })
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_map_names_the_ca_and_headers() {
        let proxy = FrontProxy::generate().unwrap();
        let cm = proxy.config_map();
        assert!(cm["data"]["requestheader-client-ca-file"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        assert_eq!(
            cm["data"]["requestheader-allowed-names"],
            "[\"front-proxy-client\"]"
        );
        assert!(proxy.client_config(b"not pem").is_err());
        assert!(proxy.client_config(proxy.ca_pem.as_bytes()).is_ok());
    }
}
