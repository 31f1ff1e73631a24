//! The request log: who asked for what, for RBAC checks in later tests.
//!
//! Identity is taken, in order, from the `Impersonate-User` header, the
//! bearer token (the token itself is the user name, e.g.
//! `system:serviceaccount:godwit:operator`), the basic-auth user name, and
//! otherwise `system:anonymous`. No authentication or authorization is
//! enforced.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

/// Errors of the request log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The audit log file could not be opened.
    #[error("Cannot open audit log")]
    Open(#[source] std::io::Error),
}

/// One served request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// When the request was served (RFC 3339).
    pub time: String,
    /// Client identity (see module docs).
    pub user: String,
    /// The client's `User-Agent`.
    pub user_agent: String,
    /// Kubernetes verb (`get`, `list`, `watch`, `create`, `update`, `patch`,
    /// `delete`, `deletecollection`), or the HTTP method for non-resource
    /// paths.
    pub verb: String,
    /// API group (empty for core).
    pub api_group: String,
    /// API version.
    pub api_version: String,
    /// Plural resource name; empty for non-resource paths.
    pub resource: String,
    /// Subresource, e.g. `status`.
    pub subresource: String,
    /// Namespace, if any.
    pub namespace: String,
    /// Object name, if any.
    pub name: String,
    /// Request path.
    pub path: String,
    /// HTTP status code of the response.
    pub code: u16,
}

/// Identity of the client that sent these headers.
pub fn identity(headers: &HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(user) = header("impersonate-user") {
        return user.to_string();
    }
    if let Some(auth) = header("authorization") {
        if let Some(token) = auth.strip_prefix("Bearer ") {
            return token.trim().to_string();
        }
        if let Some(basic) = auth.strip_prefix("Basic ") {
            if let Some(user) = decode_basic_user(basic.trim()) {
                return user;
            }
        }
    }
    "system:anonymous".to_string()
}

fn decode_basic_user(encoded: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for byte in encoded.bytes().filter(|b| *b != b'=') {
        let value = ALPHABET.iter().position(|c| *c == byte)? as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    let text = String::from_utf8(out).ok()?;
    text.split_once(':').map(|(user, _)| user.to_string())
}

/// How many records the in-memory log keeps (the file keeps all).
const MEMORY_LIMIT: usize = 100_000;

/// The in-memory log (the latest [`MEMORY_LIMIT`] records), optionally
/// mirrored in full to a JSON-lines file.
pub struct AuditLog {
    records: Mutex<VecDeque<AuditRecord>>,
    file: Option<Mutex<File>>,
}

impl AuditLog {
    /// A log kept in memory, and appended to `path` when given.
    pub fn new(path: Option<&Path>) -> Result<Self, AuditError> {
        let file = match path {
            Some(path) => Some(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(AuditError::Open)?,
            )),
            None => None,
        };
        Ok(Self {
            records: Mutex::new(VecDeque::new()),
            file,
        })
    }

    /// Adds one record.
    pub fn push(&self, record: AuditRecord) {
        if let Some(file) = &self.file {
            if let (Ok(mut file), Ok(line)) = (file.lock(), serde_json::to_string(&record)) {
                let _ = writeln!(file, "{line}");
            }
        }
        if let Ok(mut records) = self.records.lock() {
            if records.len() == MEMORY_LIMIT {
                records.pop_front();
            }
            records.push_back(record);
        }
    }

    /// The records kept in memory, oldest first.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn identity_prefers_impersonation_then_token() {
        let mut headers = HeaderMap::new();
        assert_eq!(identity(&headers), "system:anonymous");
        headers.insert(
            "authorization",
            HeaderValue::from_static("Basic YWxpY2U6c2VjcmV0"),
        );
        assert_eq!(identity(&headers), "alice");
        headers.insert("authorization", HeaderValue::from_static("Bearer operator"));
        assert_eq!(identity(&headers), "operator");
        headers.insert("impersonate-user", HeaderValue::from_static("bob"));
        assert_eq!(identity(&headers), "bob");
    }
}
