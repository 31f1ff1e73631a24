//! The migration identity as PEM text.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A migration identity as PEM text: what the node agent hands a VMM that
/// runs as its own user and cannot read the key file (`--tls-fd`, and the
/// `tls` of each `migrate-send`, so a rotated certificate reaches VMMs that
/// are already running). Its `Debug` hides the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsPem {
    /// The node's certificate, then its chain.
    pub cert: String,
    /// Its private key.
    pub key: String,
    /// The CA certificates.
    pub ca: String,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPem")
            .field("cert", &format_args!("{} bytes", self.cert.len()))
            .field("key", &format_args!("(hidden)"))
            .field("ca", &format_args!("{} bytes", self.ca.len()))
            .finish()
    }
}

impl TlsPem {
    /// Reads the three PEM files as they are now.
    pub fn read(cert: &Path, key: &Path, ca: &Path) -> io::Result<TlsPem> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", p.display())))
        };
        Ok(TlsPem {
            cert: read(cert)?,
            key: read(key)?,
            ca: read(ca)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_key() {
        let pem = TlsPem {
            cert: "C".into(),
            key: "SECRET".into(),
            ca: "A".into(),
        };
        let shown = format!("{pem:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("(hidden)"), "{shown}");
    }
}
