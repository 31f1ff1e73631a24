//! The node's migration identity: a key made on the node and a certificate
//! for this node from the cluster's migration CA, which every VMM on the
//! node presents and checks (mutual TLS, see [`crate::migration::tls`]).
//!
//! Two ways to get the certificate (`godwit-node` flags):
//! - `--migration-csr` (what the chart does): the agent asks the Kubernetes
//!   CertificateSigningRequest API ([`request`]). The key never leaves the
//!   node; the CA key stays with the operator, which approves and signs a
//!   request only for the requesting node's own name and addresses
//!   (`godwit_operator::signer`). The CA certificates the node trusts come
//!   from the ConfigMap `godwit-migration-ca` (key `ca.crt`) the operator
//!   publishes in its namespace (the agent's `--lease-namespace`).
//! - `--migration-ca-dir` (bring your own CA, without the operator): the
//!   agent signs its own certificate with `ca.crt`/`ca.key` from that
//!   directory ([`issue`]). Every node then holds the CA key; prefer putting
//!   your CA into the operator's Secret `godwit-migration-ca` instead.
//!
//! Either way, at every start the agent makes a fresh key and certificate
//! (CN `system:godwit-node:<node>`, SANs: the node's name and migration
//! address) into `<state-dir>/tls/` (mode 0600, root only). A VMM that runs
//! as its VM's own user gets the identity as PEM text on a pipe when it
//! starts (it needs it to accept an incoming migration); a VMM run as root
//! (`--vmm-users root`) is given the files (`--tls-cert/--tls-key/--tls-ca`).
//! Either way the agent sends the identity as it is now with every
//! `migrate-send`, so a source always uses the node's current certificate.
//!
//! Rotation of the node certificate: with `--migration-csr` the agent asks
//! again two thirds of the way from receiving the certificate to its expiry
//! (a new key, a new request) and replaces the files, each one atomically
//! (not both at once: a migration that loads them in the instant between
//! the two renames gets a mismatched pair and fails its handshake); VMMs
//! pick the new identity up with their next migration as above.
//!
//! Rotation of the CA: put the new CA certificate next to the old one in
//! the Secret's `ca.crt` (a PEM bundle: both are trusted; the first is the
//! one whose key is in `ca.key`); the operator publishes the bundle with the
//! next certificate it signs. Restart the node daemons so every node holds
//! a certificate from the new CA (a running VMM sends its next migration
//! with it; as a target it presents what it was started with, still
//! trusted), then remove the old CA from the bundle and restart again once
//! no VMM that waits for a migration from before the first restart is left.

pub mod request;

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use godwit_crds::contract::NODE_CN_PREFIX;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};

use crate::migration::tls::TlsFiles;

/// How long a node certificate issued with `--migration-ca-dir` is valid.
pub const VALIDITY_DAYS: i64 = 365;

/// Errors issuing the node identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A CA file could not be read.
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The CA certificate or key is not usable PEM.
    #[error("The migration CA in {0} is not a usable certificate and key (PEM)")]
    Ca(PathBuf, #[source] rcgen::Error),
    /// The node certificate could not be made.
    #[error("Cannot issue the node certificate")]
    Issue(#[source] rcgen::Error),
    /// The node identity could not be written.
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// The CertificateSigningRequest could not be created or read.
    #[error("Cannot create or read CertificateSigningRequest {0}")]
    Request(String, #[source] kube::Error),
    /// The operator (or an administrator) refused the request.
    #[error("CertificateSigningRequest {0} was refused: {1}")]
    Denied(String, String),
    /// No certificate came in time.
    #[error("No certificate for CertificateSigningRequest {0} after {1} s: is the Godwit operator running (it approves and signs godwit.dev/migration requests; see `kubectl get csr {0}`)?")]
    Timeout(String, u64),
    /// The published CA certificates could not be read.
    #[error(
        "Cannot read the migration CA ConfigMap {0} (the operator publishes it when it signs)"
    )]
    CaConfigMap(String, #[source] kube::Error),
    /// The ConfigMap has no `ca.crt`.
    #[error("The migration CA ConfigMap {0} has no ca.crt")]
    CaMissing(String),
    /// The issued certificate is not what was asked for.
    #[error("The certificate issued for CertificateSigningRequest {0} is not usable: {1}")]
    Issued(String, String),
}

/// The certificate a node asks for: CN [`NODE_CN_PREFIX`]`<node>`, SANs its
/// name and `address` (its migration IP or host name), server and client
/// use (both ends of a migration authenticate).
pub fn node_params(node: &str, address: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{NODE_CN_PREFIX}{node}"));
    let mut sans = vec![SanType::DnsName(node.try_into()?)];
    match address.parse::<std::net::IpAddr>() {
        Ok(ip) => sans.push(SanType::IpAddress(ip)),
        Err(_) if address != node => sans.push(SanType::DnsName(address.try_into()?)),
        Err(_) => {}
    }
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// Issues this node's identity from the CA in `ca_dir` into `out_dir`
/// (bring your own CA; the chart asks the operator instead, [`request`]).
/// `address` is the node's migration IP or host name.
pub fn issue(
    ca_dir: &Path,
    out_dir: &Path,
    node: &str,
    address: &str,
) -> Result<TlsFiles, IdentityError> {
    let read = |name: &str| {
        let p = ca_dir.join(name);
        fs::read_to_string(&p).map_err(|e| IdentityError::Read(p, e))
    };
    let ca_pem = read("ca.crt")?;
    let ca_key = KeyPair::from_pem(&read("ca.key")?)
        .map_err(|e| IdentityError::Ca(ca_dir.to_path_buf(), e))?;
    // The first certificate of the bundle is the one whose key we hold.
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| IdentityError::Ca(ca_dir.to_path_buf(), e))?;
    let mut params = node_params(node, address).map_err(IdentityError::Issue)?;
    // An hour of slack for clocks that disagree between nodes.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
    let key = KeyPair::generate().map_err(IdentityError::Issue)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(IdentityError::Issue)?;
    write_identity(out_dir, &key.serialize_pem(), &cert.pem(), &ca_pem)
}

/// The node identity's files in `out_dir` (`<state-dir>/tls`).
pub fn files_in(out_dir: &Path) -> TlsFiles {
    TlsFiles {
        cert: out_dir.join("node.crt"),
        key: out_dir.join("node.key"),
        ca: out_dir.join("ca.crt"),
    }
}

/// Writes the node's key, certificate and trusted CAs (PEM) into `out_dir`.
pub fn write_identity(
    out_dir: &Path,
    key: &str,
    cert: &str,
    ca: &str,
) -> Result<TlsFiles, IdentityError> {
    fs::create_dir_all(out_dir).map_err(|e| IdentityError::Write(out_dir.to_path_buf(), e))?;
    let files = files_in(out_dir);
    write_private(&files.ca, ca.as_bytes())?;
    write_private(&files.key, key.as_bytes())?;
    write_private(&files.cert, cert.as_bytes())?;
    Ok(files)
}

/// Writes `bytes` to `path` readable by root only, replacing it atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let err = |e| IdentityError::Write(path.to_path_buf(), e);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::tls::{accept, connect, TlsIdentity};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// A CA directory as the chart's Secret mounts it.
    fn ca_dir(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        fs::write(dir.join("ca.crt"), cert.pem()).unwrap();
        fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        dir
    }

    fn handshake(server: &TlsFiles, client: &TlsFiles) -> Result<(), String> {
        let server = TlsIdentity::load(server).unwrap();
        let client = TlsIdentity::load(client).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            accept(&tcp, &server).map(|_| ()).map_err(|e| e.to_string())
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let c = connect(&tcp, &client, "127.0.0.1", Duration::from_secs(5));
        drop(tcp);
        let s = t.join().unwrap();
        c.map(|_| ())
            .map_err(|e| godwit_crds::error_chain(&e))
            .and(s)
    }

    #[test]
    fn nodes_of_one_ca_authenticate_each_other_and_others_are_refused() {
        let root = std::env::temp_dir().join(format!("godwit-agent-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let ca = ca_dir(&root, "ca");
        let a = issue(&ca, &root.join("a"), "node-a", "127.0.0.1").unwrap();
        let b = issue(&ca, &root.join("b"), "node-b", "127.0.0.1").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&a.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the node key is private: {mode:o}");
        handshake(&a, &b).expect("two nodes of one CA");

        let other = ca_dir(&root, "other");
        let c = issue(&other, &root.join("c"), "node-c", "127.0.0.1").unwrap();
        assert!(handshake(&a, &c).is_err(), "a node of another CA connected");

        // A CA directory without the key is refused with the path named.
        fs::remove_file(ca.join("ca.key")).unwrap();
        let err = issue(&ca, &root.join("d"), "node-d", "127.0.0.1").unwrap_err();
        assert!(godwit_crds::error_chain(&err).contains("ca.key"), "{err}");
        let _ = fs::remove_dir_all(&root);
    }
}
