//! The migration CA as the chart generates one at install (`ca.crt`,
//! `ca.key`): node agents issue their migration identities from it.

use std::path::Path;

/// Errors of writing a migration CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("Cannot generate the CA's key")]
    Key(#[source] rcgen::Error),
    #[error("Cannot self-sign the CA's certificate")]
    SelfSign(#[source] rcgen::Error),
    #[error("Cannot write {0}")]
    Write(String, #[source] std::io::Error),
}

/// Writes a fresh migration CA (`ca.crt`, `ca.key`) into `dir`, creating it.
pub fn write_migration_ca(dir: &Path) -> Result<(), CaError> {
    let key = rcgen::KeyPair::generate().map_err(CaError::Key)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "godwit-migration-ca");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).map_err(CaError::SelfSign)?;
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| CaError::Write(p.display().to_string(), e))
    };
    std::fs::create_dir_all(dir).map_err(|e| CaError::Write(dir.display().to_string(), e))?;
    write("ca.crt", cert.pem())?;
    write("ca.key", key.serialize_pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_ca_certificate_and_its_key() {
        let dir = std::env::temp_dir().join(format!("godwit-testkit-ca-{}", std::process::id()));
        write_migration_ca(&dir.join("ca")).unwrap();
        let crt = std::fs::read_to_string(dir.join("ca/ca.crt")).unwrap();
        let key = std::fs::read_to_string(dir.join("ca/ca.key")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"), "{crt}");
        assert!(key.contains("PRIVATE KEY"), "{key}");
    }
}
