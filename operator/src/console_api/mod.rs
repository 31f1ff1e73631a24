//! The aggregated API `subresources.godwit.dev/v1`: the VM serial console
//! behind Kubernetes authentication and RBAC, as KubeVirt's virt-api serves
//! `subresources.kubevirt.io`.
//!
//! The path of a request:
//! 1. `kubectl godwit console` opens a WebSocket to the Kubernetes API
//!    server: `GET /apis/subresources.godwit.dev/v1/namespaces/<ns>/virtualmachines/<name>/console`,
//!    authenticated as the user of its kubeconfig.
//! 2. The API server authorizes `get` on `virtualmachines/console` in that
//!    group, finds the `APIService` `v1.subresources.godwit.dev` and proxies
//!    the request to the `godwit-api` Service (every operator replica serves
//!    it, leader or not), presenting its front-proxy client certificate and
//!    naming the user in `X-Remote-User`/`-Group`/`-Extra-*` headers.
//! 3. Here: the client certificate must chain to the front-proxy CA and
//!    carry an allowed name (both from the ConfigMap
//!    `kube-system/extension-apiserver-authentication`, see
//!    [`front_proxy`]); the user is checked again with a
//!    `SubjectAccessReview` (the delegated authorization every aggregated
//!    API server does); the VM's node is read from its status.
//! 4. The operator dials the node daemon's console port with mutual TLS:
//!    it presents the console proxy's certificate ([`certs`]) and checks
//!    the node's certificate (same CA, the node's name). The node serves
//!    the VM's COM1.
//! 5. Bytes flow as WebSocket binary messages in Kubernetes' channel
//!    protocol (`v4.channel.k8s.io`, as `kubectl exec` and `attach` use):
//!    the first byte of a message is its channel, 0 for what the user
//!    types and 1 for what the guest writes.
//!
//! The serving certificate is signed by the migration CA; the operator
//! writes that CA into the `APIService`'s `caBundle` (so the rendered
//! chart needs no key material; a GitOps tool should ignore the field).

pub mod certs;
mod console;
pub mod front_proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use godwit_crds::contract::SUBRESOURCES_API_SERVICE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::Client;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use self::front_proxy::{FrontProxy, CONFIG_MAP, CONFIG_MAP_NAMESPACE};
use crate::migration_ca::CaSecret;

/// Where and as what the console API is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// The address to listen on (HTTPS).
    pub addr: SocketAddr,
    /// The Service the `APIService` points at (its DNS names are in the
    /// serving certificate), in the CA Secret's namespace.
    pub service: String,
    /// The CA that signs the serving and proxy certificates (the migration
    /// CA, which the nodes trust).
    pub ca: CaSecret,
}

/// Why the console API could not start (it is tried again).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The listening address could not be bound.
    #[error("Cannot listen on {0} for the console API")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// The front proxy's settings are missing or wrong.
    #[error("The API server's front-proxy settings are not usable: {0}")]
    FrontProxy(String),
    /// A read from the API server failed.
    #[error("Cannot read {0}")]
    Read(String, #[source] kube::Error),
    /// The CA Secret is not there yet.
    #[error(
        "The migration CA Secret {0} has no ca.crt and ca.key yet (the leading operator makes it)"
    )]
    NoCa(String),
    /// The certificates could not be made.
    #[error("Cannot make the console API's certificates")]
    Mint(#[source] rcgen::Error),
    /// rustls refused a certificate or CA.
    #[error("TLS setup of the console API: {0}")]
    Tls(String),
}

/// Serves the console API until dropped, retrying its set-up every 5 s
/// until the front-proxy settings and the CA exist.
pub async fn run(client: Client, cfg: ApiConfig) {
    let listener = loop {
        match TcpListener::bind(cfg.addr).await {
            Ok(l) => break l,
            Err(e) => warn!(
                "{}; retrying in 5 s",
                godwit_crds::error_chain(&ApiError::Bind(cfg.addr, e))
            ),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let (acceptor, shared) = loop {
        match set_up(&client, &cfg).await {
            Ok(ready) => break ready,
            Err(e) => warn!(
                "console API: {}; retrying in 5 s",
                godwit_crds::error_chain(&e)
            ),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    info!(addr = %cfg.addr, "serving {SUBRESOURCES_API_SERVICE} (VM consoles)");
    serve(listener, acceptor, shared).await;
}

/// Reads the front-proxy settings and the CA, makes the certificates and
/// writes the `APIService`'s `caBundle`.
async fn set_up(
    client: &Client,
    cfg: &ApiConfig,
) -> Result<(TlsAcceptor, Arc<console::Shared>), ApiError> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), CONFIG_MAP_NAMESPACE);
    let cm_name = format!("{CONFIG_MAP_NAMESPACE}/{CONFIG_MAP}");
    let data = cms
        .get_opt(CONFIG_MAP)
        .await
        .map_err(|e| ApiError::Read(format!("ConfigMap {cm_name}"), e))?
        .and_then(|cm| cm.data)
        .ok_or_else(|| {
            ApiError::FrontProxy(format!(
                "ConfigMap {cm_name} is missing: the API server has no aggregation layer"
            ))
        })?;
    let front = FrontProxy::from_data(&data).map_err(ApiError::FrontProxy)?;
    let ca_name = format!("{}/{}", cfg.ca.namespace, cfg.ca.name);
    let (ca_crt, ca_key) = crate::migration_ca::read(client, &cfg.ca)
        .await
        .map_err(|e| ApiError::Read(format!("Secret {ca_name}"), e))?
        .ok_or(ApiError::NoCa(ca_name))?;
    let names = certs::service_names(&cfg.service, &cfg.ca.namespace);
    let (serving, proxy) = certs::mint(&ca_crt, &ca_key, &names).map_err(ApiError::Mint)?;

    let tls = |e: String| ApiError::Tls(e);
    let roots = |pem: &str, what: &str| -> Result<Arc<RootCertStore>, ApiError> {
        let mut roots = RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| tls(format!("{what}: {e}")))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(tls(format!("{what} holds no usable CA certificate")));
        }
        Ok(Arc::new(roots))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&front.client_ca, "requestheader-client-ca-file")?,
        provider.clone(),
    )
    .build()
    .map_err(|e| tls(e.to_string()))?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![serving.cert], serving.key)
        .map_err(|e| tls(e.to_string()))?;
    let to_nodes = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_root_certificates(roots(&ca_crt, "the migration CA")?)
        .with_client_auth_cert(vec![proxy.cert], proxy.key)
        .map_err(|e| tls(e.to_string()))?;
    tokio::spawn(publish_ca_bundle(client.clone(), ca_crt));
    let shared = Arc::new(console::Shared {
        client: client.clone(),
        front,
        to_nodes: Arc::new(to_nodes),
    });
    Ok((TlsAcceptor::from(Arc::new(server)), shared))
}

/// Writes the CA into the `APIService`'s `caBundle` (retried until it
/// succeeds: the chart may apply the `APIService` after the operator starts).
async fn publish_ca_bundle(client: Client, ca_crt: String) {
    let resource = ApiResource {
        group: "apiregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "apiregistration.k8s.io/v1".into(),
        kind: "APIService".into(),
        plural: "apiservices".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let bundle = k8s_openapi::ByteString(ca_crt.into_bytes());
    let patch = json!({"spec": {"caBundle": bundle}});
    let params = PatchParams::default();
    let mut warned = false;
    loop {
        match api
            .patch(SUBRESOURCES_API_SERVICE, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(apiservice = SUBRESOURCES_API_SERVICE, "wrote the caBundle");
                return;
            }
            Err(e) if !warned => {
                warn!(
                    "cannot write the caBundle of APIService {SUBRESOURCES_API_SERVICE} \
                     (apply the chart's APIService; the operator needs `patch` on it): {e}; \
                     retrying every 5 s"
                );
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Accepts connections: TLS with the front proxy's certificate, then HTTP/1
/// with upgrades.
async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<console::Shared>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("console API accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        info!(%peer, "console API: TLS handshake refused: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let cn = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| common_name(der))
                .unwrap_or_default();
            if !shared.front.allows(&cn) {
                info!(%peer, cn, "console API: the client certificate is not the front proxy's");
                return;
            }
            let service = service_fn(move |req| console::handle(shared.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
