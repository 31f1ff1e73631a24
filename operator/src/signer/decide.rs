//! Whether a node's certificate request is approved: a pure function over
//! what the request says, who sent it, and the Node it names.

use std::net::IpAddr;

use godwit_crds::contract::{MIGRATION_SIGNER, NODE_CN_PREFIX};

/// The key usages a node certificate may ask for (Kubernetes' names).
pub const ALLOWED_USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// What a CertificateSigningRequest asks for and who asked, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requested {
    /// `spec.signerName`.
    pub signer: String,
    /// `spec.username`: the requester, set by the API server.
    pub username: String,
    /// The node names in the requester's extra
    /// (`authentication.kubernetes.io/node-name`), set by the API server
    /// for a pod-bound service-account token.
    pub bound_nodes: Vec<String>,
    /// The subject's common name.
    pub common_name: Option<String>,
    /// DNS names among the subject alternative names.
    pub dns_names: Vec<String>,
    /// IP addresses among the subject alternative names.
    pub ips: Vec<IpAddr>,
    /// Alternative names of other kinds (e-mail, URI, other names).
    pub other_names: usize,
    /// `spec.usages`.
    pub usages: Vec<String>,
    /// Whether the request asks for a CA certificate.
    pub is_ca: bool,
}

/// The Node a request names, as the cluster has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// Its name.
    pub name: String,
    /// Its `status.addresses` (IPs and host names).
    pub addresses: Vec<String>,
}

/// What to do with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Another signer's request: leave it alone.
    NotOurs,
    /// Approve and sign it: a certificate for this node.
    Approve {
        /// The node the certificate names.
        node: String,
    },
    /// Deny it, saying why (the `Denied` condition's message).
    Deny(String),
}

/// The node a request's common name names (`system:godwit-node:<node>`).
pub fn node_of(common_name: Option<&str>) -> Option<&str> {
    common_name?
        .strip_prefix(NODE_CN_PREFIX)
        .filter(|n| !n.is_empty())
}

/// Decides on `req`: approved only when `node_user` sent it, it names one
/// node (`node`, looked up by the name in its common name) in its common
/// name and as its only DNS name, its IP addresses are that Node's, the
/// requester's token (when bound to a node) belongs to that node, and it
/// asks for a leaf certificate with node usages only.
pub fn decide(req: &Requested, node_user: &str, node: Option<&NodeFacts>) -> Decision {
    if req.signer != MIGRATION_SIGNER {
        return Decision::NotOurs;
    }
    if req.username != node_user {
        return Decision::Deny(format!(
            "requested by {:?}: only {node_user:?} (the node daemons' service account) may ask {MIGRATION_SIGNER} for certificates",
            req.username
        ));
    }
    let Some(name) = node_of(req.common_name.as_deref()) else {
        return Decision::Deny(format!(
            "the subject's common name must be {NODE_CN_PREFIX}<node>, not {:?}",
            req.common_name.as_deref().unwrap_or("")
        ));
    };
    if let Some(bound) = req.bound_nodes.iter().find(|b| *b != name) {
        return Decision::Deny(format!(
            "the requester's token belongs to node {bound}, which may not ask for a certificate of node {name}"
        ));
    }
    let Some(node) = node.filter(|n| n.name == name) else {
        return Decision::Deny(format!("there is no Node {name}"));
    };
    if req.dns_names.iter().any(|d| d != name) || req.dns_names.is_empty() {
        return Decision::Deny(format!(
            "the DNS names must be exactly the node's name {name}, not {:?}",
            req.dns_names
        ));
    }
    if let Some(ip) = req
        .ips
        .iter()
        .find(|ip| !node.addresses.iter().any(|a| a.parse() == Ok(**ip)))
    {
        return Decision::Deny(format!(
            "the address {ip} is not one of Node {name}'s addresses {:?}",
            node.addresses
        ));
    }
    if req.other_names > 0 {
        return Decision::Deny("only DNS and IP alternative names may be asked for".into());
    }
    if req.is_ca {
        return Decision::Deny("a node certificate cannot be a CA".into());
    }
    if let Some(u) = req
        .usages
        .iter()
        .find(|u| !ALLOWED_USAGES.contains(&u.as_str()))
    {
        return Decision::Deny(format!("usage {u:?} is not one of {ALLOWED_USAGES:?}"));
    }
    Decision::Approve {
        node: name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_USER: &str = "system:serviceaccount:godwit-system:godwit-node";

    fn node(name: &str, ip: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            addresses: vec![ip.into(), name.into()],
        }
    }

    /// What node-0's agent asks for, from node-0's token.
    fn from_node_0() -> Requested {
        Requested {
            signer: MIGRATION_SIGNER.into(),
            username: NODE_USER.into(),
            bound_nodes: vec!["node-0".into()],
            common_name: Some("system:godwit-node:node-0".into()),
            dns_names: vec!["node-0".into()],
            ips: vec!["10.88.0.1".parse().unwrap()],
            other_names: 0,
            usages: ALLOWED_USAGES.iter().map(|u| u.to_string()).collect(),
            is_ca: false,
        }
    }

    fn denied(req: &Requested, facts: Option<&NodeFacts>) -> String {
        match decide(req, NODE_USER, facts) {
            Decision::Deny(why) => why,
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[test]
    fn a_node_gets_its_own_certificate() {
        let n0 = node("node-0", "10.88.0.1");
        assert_eq!(
            decide(&from_node_0(), NODE_USER, Some(&n0)),
            Decision::Approve {
                node: "node-0".into()
            }
        );
        // A token not bound to a node may ask for any one node.
        let unbound = Requested {
            bound_nodes: vec![],
            ..from_node_0()
        };
        assert!(matches!(
            decide(&unbound, NODE_USER, Some(&n0)),
            Decision::Approve { .. }
        ));
    }

    #[test]
    fn other_signers_are_left_alone() {
        let req = Requested {
            signer: "kubernetes.io/kube-apiserver-client".into(),
            username: "alice".into(),
            ..from_node_0()
        };
        assert_eq!(decide(&req, NODE_USER, None), Decision::NotOurs);
    }

    #[test]
    fn node_a_cannot_ask_for_node_b() {
        let n1 = node("node-1", "10.88.0.2");
        let req = Requested {
            common_name: Some("system:godwit-node:node-1".into()),
            dns_names: vec!["node-1".into()],
            ips: vec!["10.88.0.2".parse().unwrap()],
            ..from_node_0()
        };
        let why = denied(&req, Some(&n1));
        assert!(
            why.contains("belongs to node node-0") && why.contains("node-1"),
            "{why}"
        );
    }

    #[test]
    fn only_the_node_user_names_and_addresses_of_one_node_pass() {
        let n0 = node("node-0", "10.88.0.1");
        let by_alice = Requested {
            username: "alice".into(),
            ..from_node_0()
        };
        assert!(denied(&by_alice, Some(&n0)).contains("\"alice\""));
        let no_cn = Requested {
            common_name: Some("node-0".into()),
            ..from_node_0()
        };
        assert!(denied(&no_cn, Some(&n0)).contains("common name"));
        assert!(denied(&from_node_0(), None).contains("no Node node-0"));
        let two_nodes = Requested {
            dns_names: vec!["node-0".into(), "node-1".into()],
            ..from_node_0()
        };
        assert!(denied(&two_nodes, Some(&n0)).contains("DNS names"));
        let no_dns = Requested {
            dns_names: vec![],
            ..from_node_0()
        };
        assert!(denied(&no_dns, Some(&n0)).contains("DNS names"));
        let foreign_ip = Requested {
            ips: vec!["10.88.0.2".parse().unwrap()],
            ..from_node_0()
        };
        assert!(denied(&foreign_ip, Some(&n0)).contains("10.88.0.2"));
        let email = Requested {
            other_names: 1,
            ..from_node_0()
        };
        assert!(denied(&email, Some(&n0)).contains("alternative names"));
        let ca = Requested {
            is_ca: true,
            ..from_node_0()
        };
        assert!(denied(&ca, Some(&n0)).contains("CA"));
        let signing = Requested {
            usages: vec!["cert sign".into()],
            ..from_node_0()
        };
        assert!(denied(&signing, Some(&n0)).contains("cert sign"));
    }
}
