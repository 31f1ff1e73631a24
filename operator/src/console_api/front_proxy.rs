//! Who a proxied request is from: kube-apiserver's front proxy (the
//! aggregator) authenticates the user, presents its own client certificate
//! to us and names the user in request headers. The CA of that certificate,
//! the names it may carry and the header names are published by the API
//! server in the ConfigMap `kube-system/extension-apiserver-authentication`,
//! which every aggregated API server reads.

use std::collections::BTreeMap;

use http::HeaderMap;

/// The ConfigMap kube-apiserver publishes for aggregated API servers.
pub const CONFIG_MAP: &str = "extension-apiserver-authentication";
/// Its namespace.
pub const CONFIG_MAP_NAMESPACE: &str = "kube-system";

/// How to trust the front proxy and read the user it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontProxy {
    /// The CA bundle (PEM) that signs the front proxy's client certificate.
    pub client_ca: String,
    /// Common names the proxy's certificate may carry (empty: any).
    pub allowed_names: Vec<String>,
    /// Headers naming the user (the first present wins).
    pub user_headers: Vec<String>,
    /// Headers naming the user's groups (every value of each).
    pub group_headers: Vec<String>,
    /// Prefixes of headers naming extra attributes.
    pub extra_prefixes: Vec<String>,
}

/// The user a request is made for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteUser {
    /// User name.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes (keys lower-case, as Kubernetes passes them).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// A JSON array of strings kept as a ConfigMap value (`'["X-Remote-User"]'`).
fn string_list(data: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>, String> {
    match data.get(key) {
        None => Ok(Vec::new()),
        Some(text) if text.trim().is_empty() => Ok(Vec::new()),
        Some(text) => serde_json::from_str(text)
            .map_err(|e| format!("{key} is not a JSON list of strings: {e}")),
    }
}

impl FrontProxy {
    /// Reads the settings from the ConfigMap's data.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<FrontProxy, String> {
        let client_ca = data
            .get("requestheader-client-ca-file")
            .filter(|ca| ca.contains("BEGIN CERTIFICATE"))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "{CONFIG_MAP_NAMESPACE}/{CONFIG_MAP} has no requestheader-client-ca-file: \
                     start kube-apiserver with --requestheader-client-ca-file and \
                     --proxy-client-cert-file (the aggregation layer)"
                )
            })?;
        let proxy = FrontProxy {
            client_ca,
            allowed_names: string_list(data, "requestheader-allowed-names")?,
            user_headers: string_list(data, "requestheader-username-headers")?,
            group_headers: string_list(data, "requestheader-group-headers")?,
            extra_prefixes: string_list(data, "requestheader-extra-headers-prefix")?,
        };
        if proxy.user_headers.is_empty() {
            return Err(format!(
                "{CONFIG_MAP_NAMESPACE}/{CONFIG_MAP} names no requestheader-username-headers"
            ));
        }
        Ok(proxy)
    }

    /// Whether a client certificate with common name `cn` is the proxy's.
    pub fn allows(&self, cn: &str) -> bool {
        self.allowed_names.is_empty() || self.allowed_names.iter().any(|n| n == cn)
    }

    /// The user the headers name; `None` without a user header.
    pub fn user(&self, headers: &HeaderMap) -> Option<RemoteUser> {
        let name = self
            .user_headers
            .iter()
            .find_map(|h| headers.get(h.as_str())?.to_str().ok())
            .filter(|n| !n.is_empty())?
            .to_string();
        let groups = self
            .group_headers
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()).iter())
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (header, value) in headers {
            let lower = header.as_str();
            let key = self
                .extra_prefixes
                .iter()
                .find_map(|p| lower.strip_prefix(p.to_ascii_lowercase().as_str()));
            if let (Some(key), Ok(value)) = (key, value.to_str()) {
                extra
                    .entry(percent_decode(key))
                    .or_default()
                    .push(value.to_string());
            }
        }
        Some(RemoteUser {
            name,
            groups,
            extra,
        })
    }
}

/// Decodes `%XX` escapes (extra keys are escaped in header names).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "requestheader-client-ca-file".to_string(),
                "-----BEGIN CERTIFICATE-----\n...".to_string(),
            ),
            (
                "requestheader-allowed-names".to_string(),
                r#"["front-proxy-client"]"#.to_string(),
            ),
            (
                "requestheader-username-headers".to_string(),
                r#"["X-Remote-User"]"#.to_string(),
            ),
            (
                "requestheader-group-headers".to_string(),
                r#"["X-Remote-Group"]"#.to_string(),
            ),
            (
                "requestheader-extra-headers-prefix".to_string(),
                r#"["X-Remote-Extra-"]"#.to_string(),
            ),
        ])
    }

    #[test]
    fn the_user_groups_and_extras_come_from_the_named_headers() {
        let proxy = FrontProxy::from_data(&data()).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-remote-user", "alice".parse().unwrap());
        h.append("x-remote-group", "team".parse().unwrap());
        h.append("x-remote-group", "system:authenticated".parse().unwrap());
        h.insert(
            "x-remote-extra-authentication.kubernetes.io%2fnode-name",
            "node-0".parse().unwrap(),
        );
        h.insert("x-other", "ignored".parse().unwrap());
        let user = proxy.user(&h).unwrap();
        assert_eq!(user.name, "alice");
        assert_eq!(user.groups, ["team", "system:authenticated"]);
        assert_eq!(
            user.extra,
            BTreeMap::from([(
                "authentication.kubernetes.io/node-name".to_string(),
                vec!["node-0".to_string()]
            )])
        );
        assert!(proxy.user(&HeaderMap::new()).is_none());
    }

    #[test]
    fn only_the_allowed_names_are_the_proxy() {
        let proxy = FrontProxy::from_data(&data()).unwrap();
        assert!(proxy.allows("front-proxy-client"));
        assert!(!proxy.allows("system:godwit-node:node-0"));
        let mut any = data();
        any.remove("requestheader-allowed-names");
        assert!(FrontProxy::from_data(&any).unwrap().allows("anyone"));
    }

    #[test]
    fn a_config_map_without_the_ca_or_user_headers_is_refused() {
        let mut no_ca = data();
        no_ca.remove("requestheader-client-ca-file");
        let err = FrontProxy::from_data(&no_ca).unwrap_err();
        assert!(err.contains("--requestheader-client-ca-file"), "{err}");
        let mut no_user = data();
        no_user.remove("requestheader-username-headers");
        assert!(FrontProxy::from_data(&no_user).is_err());
        let mut bad = data();
        bad.insert(
            "requestheader-group-headers".into(),
            "X-Remote-Group".into(),
        );
        assert!(FrontProxy::from_data(&bad).unwrap_err().contains("JSON"));
    }
}
