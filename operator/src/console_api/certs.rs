//! The console API's own certificates, signed in memory by the migration
//! CA the operator holds (no key is written anywhere):
//! - the serving certificate of the `godwit-api` Service, which the API
//!   server checks against the `APIService`'s `caBundle` (the CA
//!   certificate, which the operator writes there);
//! - the console proxy's client certificate (CN
//!   [`CONSOLE_PROXY_CN`]), the only one the nodes' console ports accept.
//!
//! Both are made again at every start of the operator and are valid for
//! [`VALIDITY_DAYS`].

use godwit_crds::contract::CONSOLE_PROXY_CN;
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Days the serving and client certificates are valid.
pub const VALIDITY_DAYS: i64 = 365;

/// A certificate and its key, ready for rustls.
pub struct Identity {
    /// The certificate (leaf only; the peer trusts the CA).
    pub cert: CertificateDer<'static>,
    /// Its key.
    pub key: PrivateKeyDer<'static>,
}

/// The DNS names of Service `name` in `namespace`, as the API server dials it.
pub fn service_names(name: &str, namespace: &str) -> Vec<String> {
    vec![
        name.to_string(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
    ]
}

fn params(cn: &str, sans: &[String], usage: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans
        .iter()
        .filter_map(|n| n.clone().try_into().ok().map(SanType::DnsName))
        .collect();
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
    params
}

fn sign(params: CertificateParams, issuer: &Issuer<'_, KeyPair>) -> Result<Identity, rcgen::Error> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(Identity {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

/// The serving certificate for `dns_names` and the console proxy's client
/// certificate, signed by the CA (`ca_crt`'s first certificate, `ca_key`).
pub fn mint(
    ca_crt: &str,
    ca_key: &str,
    dns_names: &[String],
) -> Result<(Identity, Identity), rcgen::Error> {
    let issuer = Issuer::from_ca_cert_pem(ca_crt, KeyPair::from_pem(ca_key)?)?;
    let cn = dns_names.first().map_or("godwit-api", String::as_str);
    let serving = sign(
        params(cn, dns_names, ExtendedKeyUsagePurpose::ServerAuth),
        &issuer,
    )?;
    let client = sign(
        params(CONSOLE_PROXY_CN, &[], ExtendedKeyUsagePurpose::ClientAuth),
        &issuer,
    )?;
    Ok((serving, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_certificate_names_the_proxy_and_serving_names_the_service() {
        let (ca_crt, ca_key) = crate::migration_ca::generate(30).unwrap();
        let names = service_names("godwit-api", "godwit-system");
        let (serving, client) = mint(&ca_crt, &ca_key, &names).unwrap();
        let (_, serving) = x509_parser::parse_x509_certificate(&serving.cert).unwrap();
        let sans: Vec<String> = serving
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            sans.iter()
                .any(|n| n.contains("godwit-api.godwit-system.svc")),
            "{sans:?}"
        );
        let (_, client) = x509_parser::parse_x509_certificate(&client.cert).unwrap();
        let cn = client.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), CONSOLE_PROXY_CN);
        assert_eq!(
            client.issuer().to_string(),
            serving.issuer().to_string(),
            "both from the same CA"
        );
    }
}
