//! The aggregation layer: requests for an API group registered by an
//! `APIService` with a `service` are proxied to that service, as
//! kube-apiserver's aggregator does (with `--enable-aggregator-routing`:
//! to an endpoint of the Service, not its cluster IP, since nothing here
//! implements Service IPs).
//!
//! For each such request this server:
//! 1. authenticates the user as for every request (the bearer token or
//!    `Impersonate-User`, see [`crate::audit`]) and, unlike its other
//!    requests, **authorizes** it with the stored RBAC (`403` otherwise),
//!    as the aggregator's handler chain does before proxying;
//! 2. finds the backend: the Service's port whose `port` is the
//!    `APIService`'s, and a ready address of its `EndpointSlice`s
//!    (`kubernetes.io/service-name` label) on the port of the same name;
//! 3. connects over TLS, checks the backend's certificate against the
//!    `APIService`'s `caBundle` for the name `<service>.<namespace>.svc`,
//!    and presents the front-proxy client certificate ([`FrontProxy`]);
//! 4. forwards the request without the client's credentials, naming the
//!    user in `X-Remote-User`, `X-Remote-Group` and `X-Remote-Extra-*`;
//! 5. relays the answer; a `101 Switching Protocols` (a WebSocket) joins
//!    both upgraded connections until either closes.
//!
//! The front proxy's CA, allowed name and header names are published in the
//! ConfigMap `kube-system/extension-apiserver-authentication`, which
//! aggregated API servers read, as kube-apiserver publishes them.
//! ([`FrontProxy`]). Not done: `insecureSkipTLSVerify` (refused with a message), discovery
//! of aggregated groups in `/apis`, and `APIService` status conditions.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::audit::{identity, AuditRecord};
pub use crate::front_proxy::{FrontProxy, AUTHENTICATION_CONFIG_MAP, FRONT_PROXY_CN};
use crate::handlers::response::Body;
use crate::handlers::state::{now, ServerState};
use crate::rbac::{Attributes, Rbac, UserInfo};
use crate::store::{ObjectKey, ResourceId};

/// The stored `APIService` that serves `path` through a Service, if any.
pub fn served_by(state: &ServerState, path: &str) -> Option<Value> {
    let mut parts = path.trim_start_matches('/').split('/');
    let (Some("apis"), Some(group), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if group.is_empty() || version.is_empty() {
        return None;
    }
    let api_service = state.store.get(
        &ResourceId::new("apiregistration.k8s.io", "apiservices"),
        &ObjectKey::new("", &format!("{version}.{group}")),
    )?;
    api_service["spec"]["service"]
        .is_object()
        .then_some(api_service)
}

/// What a request path and method ask, for RBAC (`None`: not a resource
/// path, authorized as a non-resource URL).
fn attributes(method: &http::Method, path: &str) -> Attributes {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => {
            return Attributes::NonResource {
                path: path.into(),
                verb: method.as_str().to_lowercase(),
            }
        }
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let (resource, name, subresource) = match rest {
        [] => {
            return Attributes::NonResource {
                path: path.into(),
                verb: method.as_str().to_lowercase(),
            }
        }
        [resource] => (*resource, "", ""),
        [resource, name] => (*resource, *name, ""),
        [resource, name, sub, ..] => (*resource, *name, *sub),
    };
    let verb = match (method.as_str(), name.is_empty()) {
        ("GET" | "HEAD", true) => "list",
        ("GET" | "HEAD", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        (other, _) => {
            return Attributes::NonResource {
                path: path.into(),
                verb: other.to_lowercase(),
            }
        }
    };
    Attributes::Resource {
        namespace,
        verb: verb.into(),
        group,
        resource: resource.into(),
        subresource: subresource.into(),
        name: name.into(),
    }
}

fn status(code: u16, reason: &str, message: String) -> Response<Body> {
    crate::handlers::response::json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": reason, "message": message, "code": code,
        }),
    )
}

/// The message kube-apiserver gives a refused request.
fn forbidden(user: &str, attrs: &Attributes) -> String {
    match attrs {
        Attributes::Resource {
            namespace,
            verb,
            group,
            resource,
            subresource,
            name,
        } => {
            let full = Attributes::full_resource(resource, subresource);
            format!(
                "{resource}.{group} {name:?} is forbidden: User {user:?} cannot {verb} resource {full:?} in API group {group:?}{}",
                if namespace.is_empty() { String::new() } else { format!(" in the namespace {namespace:?}") }
            )
        }
        Attributes::NonResource { path, verb } => {
            format!("forbidden: User {user:?} cannot {verb} path {path:?}")
        }
    }
}

/// The backend `(address, port, TLS name)` of the `APIService`'s Service.
fn backend(state: &ServerState, api_service: &Value) -> Result<(String, u16, String), String> {
    let svc = &api_service["spec"]["service"];
    let namespace = svc["namespace"].as_str().unwrap_or("");
    let name = svc["name"].as_str().unwrap_or("");
    let port = svc["port"].as_u64().unwrap_or(443);
    let service = state
        .store
        .get(
            &ResourceId::new("", "services"),
            &ObjectKey::new(namespace, name),
        )
        .ok_or_else(|| format!("service \"{namespace}/{name}\" not found"))?;
    let port_name = service["spec"]["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["port"].as_u64() == Some(port)))
        .map(|p| p["name"].as_str().unwrap_or("").to_string())
        .ok_or_else(|| format!("service \"{namespace}/{name}\" has no port {port}"))?;
    let (slices, _) = state.store.list(
        &ResourceId::new("discovery.k8s.io", "endpointslices"),
        Some(namespace),
    );
    for slice in slices
        .iter()
        .filter(|s| s["metadata"]["labels"]["kubernetes.io/service-name"] == name)
    {
        let Some(target) = slice["ports"].as_array().and_then(|ports| {
            ports
                .iter()
                .find(|p| p["name"].as_str().unwrap_or("") == port_name)
                .and_then(|p| p["port"].as_u64())
        }) else {
            continue;
        };
        let ready = slice["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["conditions"]["ready"].as_bool() != Some(false));
        if let Some(address) = ready.and_then(|e| e["addresses"][0].as_str()) {
            return Ok((
                address.to_string(),
                target as u16,
                format!("{name}.{namespace}.svc"),
            ));
        }
    }
    Err(format!(
        "no endpoints available for service \"{namespace}/{name}\""
    ))
}

/// Authorizes and proxies one request to the `APIService`'s backend.
pub async fn proxy(
    state: Arc<ServerState>,
    request: Request<Incoming>,
    api_service: Value,
) -> Response<Body> {
    let path = request.uri().path().to_string();
    let user_name = identity(request.headers());
    let attrs = attributes(request.method(), &path);
    let mut record = AuditRecord {
        time: now(),
        user: user_name.clone(),
        path: path.clone(),
        verb: request.method().as_str().to_lowercase(),
        ..Default::default()
    };
    if let Attributes::Resource {
        namespace,
        verb,
        group,
        resource,
        subresource,
        name,
    } = &attrs
    {
        record.verb = verb.clone();
        record.api_group = group.clone();
        record.api_version = path.split('/').nth(3).unwrap_or("").to_string();
        record.resource = resource.clone();
        record.subresource = subresource.clone();
        record.namespace = namespace.clone();
        record.name = name.clone();
    }
    let response = match UserInfo::from_token(&user_name) {
        None => status(401, "Unauthorized", "Unauthorized".into()),
        Some(user) => match Rbac::from_store(&state.store).authorize(&user, &attrs) {
            Err(_) => status(403, "Forbidden", forbidden(&user.name, &attrs)),
            Ok(_) => forward(&state, request, &api_service, &user).await,
        },
    };
    record.code = response.status().as_u16();
    state.audit.push(record);
    response
}

async fn forward(
    state: &ServerState,
    mut request: Request<Incoming>,
    api_service: &Value,
    user: &UserInfo,
) -> Response<Body> {
    let unavailable = |why: String| status(503, "ServiceUnavailable", why);
    if api_service["spec"]["insecureSkipTLSVerify"] == true {
        return unavailable(
            "insecureSkipTLSVerify is not supported by this test server; give a caBundle".into(),
        );
    }
    let (address, port, tls_name) = match backend(state, api_service) {
        Ok(b) => b,
        Err(why) => return unavailable(why),
    };
    let bundle =
        serde_json::from_value::<k8s_openapi::ByteString>(api_service["spec"]["caBundle"].clone())
            .map(|b| b.0)
            .unwrap_or_default();
    let config = match state.front_proxy.client_config(&bundle) {
        Ok(c) => c,
        Err(why) => {
            return unavailable(format!(
                "APIService {}: {why}",
                api_service["metadata"]["name"]
            ))
        }
    };
    let server_name = match ServerName::try_from(tls_name.clone()) {
        Ok(n) => n,
        Err(e) => return unavailable(format!("{tls_name}: {e}")),
    };
    let connect = async {
        let tcp = TcpStream::connect((address.as_str(), port)).await?;
        TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
    };
    let tls = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return unavailable(format!("error trying to reach service: {e}")),
        Err(_) => return unavailable("error trying to reach service: timeout".into()),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tls)).await {
        Ok(pair) => pair,
        Err(e) => return unavailable(format!("error trying to reach service: {e}")),
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });

    let mut upstream = Request::builder()
        .method(request.method().clone())
        .uri(request.uri().path_and_query().map_or("/", |p| p.as_str()));
    for (name, value) in request.headers() {
        let n = name.as_str();
        let dropped = n == "authorization"
            || n.starts_with("impersonate-")
            || n.starts_with("x-remote-")
            || n == "host";
        if !dropped {
            upstream = upstream.header(name, value);
        }
    }
    upstream = upstream
        .header("host", tls_name)
        .header("x-remote-user", user.name.as_str());
    for g in &user.groups {
        upstream = upstream.header("x-remote-group", g.as_str());
    }
    for (key, values) in &user.extra {
        let escaped = key.replace('%', "%25").replace('/', "%2F");
        if let Ok(name) = HeaderName::try_from(format!("x-remote-extra-{escaped}")) {
            for v in values {
                if let Ok(v) = HeaderValue::try_from(v.as_str()) {
                    upstream = upstream.header(name.clone(), v);
                }
            }
        }
    }
    let upgrade = request.headers().contains_key("upgrade");
    let body = if upgrade {
        Bytes::new()
    } else {
        match request.body_mut().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return status(400, "BadRequest", format!("reading the body: {e}")),
        }
    };
    let upstream = match upstream.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return status(400, "BadRequest", e.to_string()),
    };
    let mut answer = match sender.send_request(upstream).await {
        Ok(a) => a,
        Err(e) => return unavailable(format!("error trying to reach service: {e}")),
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        response = response.header(name, value);
    }
    if answer.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let backend_side = hyper::upgrade::on(&mut answer);
        tokio::spawn(async move {
            if let (Ok(client), Ok(backend)) =
                tokio::join!(hyper::upgrade::on(&mut request), backend_side)
            {
                let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
                let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
            }
        });
        return response
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap_or_else(|e| status(502, "BadGateway", e.to_string()));
    }
    let bytes = answer
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    response
        .body(Full::new(bytes).boxed())
        .unwrap_or_else(|e| status(502, "BadGateway", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_path_is_get_on_the_console_subresource() {
        let attrs = attributes(
            &http::Method::GET,
            "/apis/subresources.godwit.dev/v1/namespaces/team/virtualmachines/web/console",
        );
        assert_eq!(
            attrs,
            Attributes::Resource {
                namespace: "team".into(),
                verb: "get".into(),
                group: "subresources.godwit.dev".into(),
                resource: "virtualmachines".into(),
                subresource: "console".into(),
                name: "web".into(),
            }
        );
        assert!(matches!(
            attributes(&http::Method::GET, "/apis/subresources.godwit.dev/v1"),
            Attributes::NonResource { .. }
        ));
        let message = forbidden("bob", &attrs);
        assert!(
            message.contains(r#"User "bob" cannot get resource "virtualmachines/console" in API group "subresources.godwit.dev" in the namespace "team""#),
            "{message}"
        );
    }
}
