//! The migration signer: approves and signs the node daemons' requests for
//! their migration certificates (CertificateSigningRequests with signer
//! [`MIGRATION_SIGNER`]), so that the CA key stays with the operator.
//!
//! For each request of our signer that has no certificate yet:
//! 1. parse its PKCS#10 request (its signature proves the requester holds
//!    the key) and decide ([`decide::decide`]): only the node daemons' user,
//!    for exactly one existing Node (its name, its addresses), and when the
//!    requester's token is bound to a node, for that node only;
//! 2. write the decision through `/approval` (`Approved` or `Denied` with
//!    the reason);
//! 3. for an approved one: publish the CA certificates in the ConfigMap
//!    [`MIGRATION_CA_CONFIGMAP`] (the nodes' trust), sign a certificate
//!    with the CA from the Secret (subject and names as decided, not as
//!    asked: `CN=system:godwit-node:<node>`, server and client auth) and
//!    write it to `status.certificate`.
//!
//! A request someone else approved is signed only when the decision would
//! approve it too; otherwise it gets a `Failed` condition. Writes are
//! updates (PUT), as Kubernetes authorizes signers: `update` on
//! `certificatesigningrequests/approval` and `/status`, `approve` and
//! `sign` on `signers` named [`MIGRATION_SIGNER`].

pub mod decide;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use godwit_crds::contract::{
    MIGRATION_CA_CONFIGMAP, MIGRATION_SIGNER, NODE_CN_PREFIX, NODE_NAME_EXTRA,
};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, DnValue, ExtendedKeyUsagePurpose,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::json;
use tracing::{info, warn};

use self::decide::{decide, node_of, Decision, NodeFacts, Requested};
use crate::context::log_outcome;
use crate::migration_ca::CaSecret;

/// Default validity of a node certificate, in days.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;

/// What the signer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignerConfig {
    /// The CA's Secret (its namespace also holds the published ConfigMap).
    pub ca: CaSecret,
    /// The user whose requests may be approved (the node daemons' service
    /// account, `system:serviceaccount:<namespace>:godwit-node`).
    pub node_user: String,
    /// Days a node certificate is valid (less when the request's
    /// `expirationSeconds` asks for less).
    pub validity_days: u32,
}

/// Why a request could not be handled (it is tried again).
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// A read or write of the request or its Node failed.
    #[error("Cannot read or write CertificateSigningRequest {0}")]
    Api(String, #[source] kube::Error),
    /// The CA Secret could not be read.
    #[error("Cannot read the migration CA Secret {0}")]
    CaSecret(String, #[source] kube::Error),
    /// The CA Secret lacks `ca.crt` or `ca.key`.
    #[error("The migration CA Secret {0} has no ca.crt and ca.key (the operator makes it when it is missing)")]
    CaMissing(String),
    /// The CA in the Secret is not usable.
    #[error("The migration CA in Secret {0} is not a usable certificate and key (PEM)")]
    Ca(String, #[source] rcgen::Error),
    /// The certificate could not be made.
    #[error("Cannot sign the node certificate")]
    Sign(#[source] rcgen::Error),
    /// The CA certificates could not be published.
    #[error("Cannot publish ConfigMap {0}")]
    Publish(String, #[source] kube::Error),
}

struct Ctx {
    client: Client,
    cfg: SignerConfig,
}

/// Runs the signer until its watch ends.
pub async fn run(client: Client, cfg: SignerConfig) {
    info!(signer = MIGRATION_SIGNER, node_user = %cfg.node_user, "signing node migration certificates");
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cfg,
    });
    Controller::new(
        Api::<CertificateSigningRequest>::all(client),
        watcher::Config::default(),
    )
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        log_outcome("signer", result.err());
    })
    .await;
}

fn error_policy(csr: Arc<CertificateSigningRequest>, error: &SignerError, _: Arc<Ctx>) -> Action {
    warn!(csr = %csr.name_any(), "{}; retrying in 5 s", godwit_crds::error_chain(error));
    Action::requeue(Duration::from_secs(5))
}

/// What the request says and who sent it, with the parsed request (`None`:
/// not a valid PKCS#10 request, and why).
fn requested_of(
    csr: &CertificateSigningRequest,
) -> (Requested, Result<CertificateSigningRequestParams, String>) {
    let spec = &csr.spec;
    let mut req = Requested {
        signer: spec.signer_name.clone(),
        username: spec.username.clone().unwrap_or_default(),
        bound_nodes: spec
            .extra
            .as_ref()
            .and_then(|e| e.get(NODE_NAME_EXTRA))
            .cloned()
            .unwrap_or_default(),
        usages: spec.usages.clone().unwrap_or_default(),
        ..Requested::default()
    };
    let parsed = std::str::from_utf8(&spec.request.0)
        .map_err(|_| "spec.request is not PEM text".to_string())
        .and_then(|pem| {
            CertificateSigningRequestParams::from_pem(pem)
                .map_err(|e| format!("spec.request is not a valid PKCS#10 request: {e}"))
        });
    if let Ok(p) = &parsed {
        req.common_name = p
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(|v| match v {
                DnValue::Utf8String(s) => Some(s.clone()),
                DnValue::PrintableString(s) => Some(s.as_str().to_string()),
                DnValue::Ia5String(s) => Some(s.as_str().to_string()),
                _ => None,
            });
        for san in &p.params.subject_alt_names {
            match san {
                SanType::DnsName(d) => req.dns_names.push(d.as_str().to_string()),
                SanType::IpAddress(ip) => req.ips.push(*ip),
                _ => req.other_names += 1,
            }
        }
        req.is_ca = !matches!(
            p.params.is_ca,
            rcgen::IsCa::NoCa | rcgen::IsCa::ExplicitNoCa
        );
    }
    (req, parsed)
}

fn condition(type_: &str, reason: &str, message: String) -> CertificateSigningRequestCondition {
    let now = Time(Timestamp::now());
    CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    ctx: Arc<Ctx>,
) -> Result<Action, SignerError> {
    if csr.spec.signer_name != MIGRATION_SIGNER {
        return Ok(Action::await_change());
    }
    let name = csr.name_any();
    let status = csr.status.clone().unwrap_or_default();
    if status.certificate.as_ref().is_some_and(|c| !c.0.is_empty()) {
        return Ok(Action::await_change());
    }
    let conditions = status.conditions.clone().unwrap_or_default();
    let has = |t: &str| {
        conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    };
    if has("Denied") || has("Failed") {
        return Ok(Action::await_change());
    }
    let approved = has("Approved");

    let (requested, parsed) = requested_of(&csr);
    let nodes = Api::<Node>::all(ctx.client.clone());
    let node = match node_of(requested.common_name.as_deref()) {
        Some(n) => nodes
            .get_opt(n)
            .await
            .map_err(|e| SignerError::Api(name.clone(), e))?
            .map(|node| NodeFacts {
                name: node.name_any(),
                addresses: node
                    .status
                    .and_then(|s| s.addresses)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| a.address)
                    .collect(),
            }),
        None => None,
    };
    let decision = match &parsed {
        Err(why) => Decision::Deny(why.clone()),
        Ok(_) => decide(&requested, &ctx.cfg.node_user, node.as_ref()),
    };
    let api = Api::<CertificateSigningRequest>::all(ctx.client.clone());
    let write_condition = |c: CertificateSigningRequestCondition, sub: &'static str| {
        let mut next = (*csr).clone();
        let mut st = next.status.clone().unwrap_or_default();
        let mut cs = st.conditions.clone().unwrap_or_default();
        cs.push(c);
        st.conditions = Some(cs);
        next.status = Some(st);
        let api = api.clone();
        let name = name.clone();
        async move {
            api.replace_subresource(sub, &name, &PostParams::default(), &next)
                .await
                .map_err(|e| SignerError::Api(name, e))
        }
    };
    match decision {
        Decision::NotOurs => Ok(Action::await_change()),
        Decision::Deny(why) if !approved => {
            warn!(csr = %name, user = %requested.username, "denied: {why}");
            write_condition(
                condition("Denied", "GodwitNodeCertificatePolicy", why),
                "approval",
            )
            .await?;
            Ok(Action::await_change())
        }
        Decision::Deny(why) => {
            warn!(csr = %name, "approved by someone else, but not signed: {why}");
            let why = format!("{MIGRATION_SIGNER} does not sign this request: {why}");
            write_condition(
                condition("Failed", "GodwitNodeCertificatePolicy", why),
                "status",
            )
            .await?;
            Ok(Action::await_change())
        }
        Decision::Approve { node } => {
            let csr = if approved {
                (*csr).clone()
            } else {
                let message =
                    format!("node {node}'s daemon asks for its own migration certificate");
                write_condition(
                    condition("Approved", "GodwitNodeCertificate", message),
                    "approval",
                )
                .await?
            };
            let (ca_crt, ca_key) = read_ca(&ctx).await?;
            publish_ca(&ctx, &ca_crt).await?;
            let Ok(mut params) = parsed else {
                return Ok(Action::await_change());
            };
            params.params = node_params(
                &node,
                &requested,
                ctx.cfg.validity_days,
                csr.spec.expiration_seconds,
            );
            let key = KeyPair::from_pem(&ca_key).map_err(|e| SignerError::Ca(ca_name(&ctx), e))?;
            let issuer = Issuer::from_ca_cert_pem(&ca_crt, key)
                .map_err(|e| SignerError::Ca(ca_name(&ctx), e))?;
            let cert = params.signed_by(&issuer).map_err(SignerError::Sign)?;
            let mut next = csr;
            let mut st = next.status.clone().unwrap_or_default();
            st.certificate = Some(ByteString(cert.pem().into_bytes()));
            next.status = Some(st);
            api.replace_status(&name, &PostParams::default(), &next)
                .await
                .map_err(|e| SignerError::Api(name.clone(), e))?;
            info!(csr = %name, %node, "signed the node's migration certificate");
            Ok(Action::await_change())
        }
    }
}

/// The issued certificate: the subject and names the decision checked,
/// node usages, valid from an hour ago (clock skew between nodes) for
/// `days` or the request's `expirationSeconds`, whichever is shorter.
fn node_params(
    node: &str,
    requested: &Requested,
    days: u32,
    expiration_seconds: Option<i32>,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{NODE_CN_PREFIX}{node}"));
    let mut sans = Vec::new();
    if let Ok(dns) = node.try_into() {
        sans.push(SanType::DnsName(dns));
    }
    sans.extend(requested.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.subject_alt_names = sans;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let mut lifetime = time::Duration::days(i64::from(days));
    if let Some(s) = expiration_seconds.filter(|s| *s > 0) {
        lifetime = lifetime.min(time::Duration::seconds(i64::from(s)));
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + lifetime;
    params
}

fn ca_name(ctx: &Ctx) -> String {
    format!("{}/{}", ctx.cfg.ca.namespace, ctx.cfg.ca.name)
}

/// The CA's certificate bundle and key, PEM.
async fn read_ca(ctx: &Ctx) -> Result<(String, String), SignerError> {
    crate::migration_ca::read(&ctx.client, &ctx.cfg.ca)
        .await
        .map_err(|e| SignerError::CaSecret(ca_name(ctx), e))?
        .ok_or_else(|| SignerError::CaMissing(ca_name(ctx)))
}

/// Publishes the CA certificates (never the key) where the nodes read them.
async fn publish_ca(ctx: &Ctx, ca_crt: &str) -> Result<(), SignerError> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.cfg.ca.namespace);
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": MIGRATION_CA_CONFIGMAP,
            "labels": {"app.kubernetes.io/name": "godwit"},
        },
        "data": BTreeMap::from([("ca.crt", ca_crt)]),
    });
    api.patch(
        MIGRATION_CA_CONFIGMAP,
        &PatchParams::apply("godwit-operator").force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(|e| {
        SignerError::Publish(
            format!("{}/{MIGRATION_CA_CONFIGMAP}", ctx.cfg.ca.namespace),
            e,
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parsed_request_yields_its_names_and_the_certificate_only_what_was_decided() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["node-0".into()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "system:godwit-node:node-0");
        params
            .subject_alt_names
            .push(SanType::IpAddress("10.88.0.1".parse().unwrap()));
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let csr = CertificateSigningRequest {
            spec: k8s_openapi::api::certificates::v1::CertificateSigningRequestSpec {
                request: ByteString(pem.into_bytes()),
                signer_name: MIGRATION_SIGNER.into(),
                username: Some("u".into()),
                extra: Some(BTreeMap::from([(
                    NODE_NAME_EXTRA.to_string(),
                    vec!["node-0".to_string()],
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        let (req, parsed) = requested_of(&csr);
        assert!(parsed.is_ok());
        assert_eq!(
            req.common_name.as_deref(),
            Some("system:godwit-node:node-0")
        );
        assert_eq!(req.dns_names, vec!["node-0"]);
        assert_eq!(
            req.ips,
            vec!["10.88.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(req.bound_nodes, vec!["node-0"]);
        assert!(!req.is_ca);

        let issued = node_params("node-0", &req, 365, Some(3600));
        let lifetime = issued.not_after - issued.not_before;
        assert_eq!(
            lifetime,
            time::Duration::hours(2),
            "an hour of skew + 3600 s"
        );

        let garbage = CertificateSigningRequest {
            spec: k8s_openapi::api::certificates::v1::CertificateSigningRequestSpec {
                request: ByteString(b"not a request".to_vec()),
                ..csr.spec.clone()
            },
            ..Default::default()
        };
        assert!(requested_of(&garbage).1.is_err());
    }
}
