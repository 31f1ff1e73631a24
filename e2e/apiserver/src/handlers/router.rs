//! The entry point of every request: routing by path to discovery,
//! OpenAPI, the debug endpoints or a resource verb, decoding of protobuf
//! bodies, and the request log record.
//!
//! Request bodies in protobuf are decoded for the kinds in
//! [`crate::protobuf`] and refused with 415 for the rest; responses are
//! always JSON, and a request whose `Accept` does not admit JSON (only
//! protobuf, say, or YAML, which this server does not write) is answered
//! 406 Not Acceptable, as kube-apiserver answers a media type it cannot
//! produce.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;

use super::delete::{delete, delete_collection};
use super::error::{source_text, ApiError};
use super::read::{get, list};
use super::request::{Query, Target};
use super::response::{json_response, Body};
use super::state::{now, ServerState};
use super::watch::watch;
use super::write::{create, patch_object, update};
use crate::audit::{identity, AuditRecord};
use crate::csr;
use crate::discovery;
use crate::protobuf;
use crate::rbac;

/// Serves one HTTP request.
pub async fn handle(
    state: Arc<ServerState>,
    request: http::Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if let Some(api_service) = crate::aggregator::served_by(&state, request.uri().path()) {
        return Ok(crate::aggregator::proxy(state, request, api_service).await);
    }
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok(handle_parts(&state, &parts, &body))
}

/// Serves one request whose body has been read: routing, admission, the
/// store, and the audit record. Any bytes are an acceptable request; the
/// answer to a malformed one is a Kubernetes `Status` error, never a panic.
pub fn handle_parts(
    state: &Arc<ServerState>,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Response<Body> {
    let query = Query::parse(parts.uri.query());
    let path = parts.uri.path().to_string();
    let mut record = AuditRecord {
        time: now(),
        user: identity(&parts.headers),
        user_agent: header(&parts.headers, "user-agent").to_string(),
        verb: parts.method.as_str().to_lowercase(),
        path: path.clone(),
        ..Default::default()
    };
    let response = route(
        state,
        &parts.method,
        &path,
        &parts.headers,
        &query,
        body,
        &mut record,
    )
    .unwrap_or_else(|error| error.response());
    record.code = response.status().as_u16();
    tracing::debug!(verb = %record.verb, path = %record.path, code = record.code, "request");
    if !path.starts_with("/debug/") {
        let signer = signer_check(state, &record);
        state.audit.push(record);
        if let Some(check) = signer {
            state.audit.push(check);
        }
    }
    response
}

/// The signer permission a successful write to a CertificateSigningRequest's
/// `/approval` or `/status` implies, as a request log record ([`csr`]).
fn signer_check(state: &ServerState, record: &AuditRecord) -> Option<AuditRecord> {
    let write = matches!(record.verb.as_str(), "update" | "patch");
    if !write || record.code >= 300 || !csr::is_csr(&record.api_group, &record.resource) {
        return None;
    }
    let stored = state.store.get(
        &crate::store::ResourceId::new(csr::GROUP, csr::PLURAL),
        &crate::store::ObjectKey::new("", &record.name),
    )?;
    csr::signer_check(record, csr::signer_name(&stored))
}

/// Whether an `Accept` header admits a JSON answer (the only one this
/// server gives): absent, or one of its media ranges is JSON or a wildcard.
fn accepts_json(accept: &str) -> bool {
    accept.trim().is_empty()
        || accept.split(',').any(|range| {
            let media = range.split(';').next().unwrap_or("").trim();
            matches!(media, "application/json" | "application/*" | "*/*")
                || media.ends_with("+json")
        })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A review's JSON body (TokenReview, SubjectAccessReview).
fn review(body: &Bytes) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("the review is not JSON: {e}")))
}

fn route(
    state: &Arc<ServerState>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    query: &Query,
    body: &Bytes,
    record: &mut AuditRecord,
) -> Result<Response<Body>, ApiError> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let defs = state.defs();
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
        )
    };
    match segments.as_slice() {
        ["version"] => return Ok(json_response(200, &discovery::version())),
        ["healthz"] | ["readyz"] | ["livez"] => {
            return Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed()))
        }
        ["api"] => {
            let address = state.address.read().map(|a| a.clone()).unwrap_or_default();
            return Ok(json_response(200, &discovery::api_versions(&address)));
        }
        ["apis"] => return Ok(json_response(200, &discovery::api_group_list(&defs))),
        ["api", version] => {
            return discovery::resource_list(&defs, "", version)
                .map(|doc| json_response(200, &doc))
                .ok_or_else(not_found)
        }
        ["apis", group] => {
            return discovery::api_group(&defs, group)
                .map(|doc| json_response(200, &doc))
                .ok_or_else(not_found)
        }
        ["apis", group, version] => {
            return discovery::resource_list(&defs, group, version)
                .map(|doc| json_response(200, &doc))
                .ok_or_else(not_found)
        }
        ["openapi", "v3"] => return Ok(json_response(200, &discovery::openapi_v3_root(&defs))),
        ["openapi", "v3", "api", version] => {
            return discovery::openapi_v3_group_version(&defs, "", version)
                .map(|doc| json_response(200, &doc))
                .ok_or_else(not_found)
        }
        ["openapi", "v3", "apis", group, version] => {
            return discovery::openapi_v3_group_version(&defs, group, version)
                .map(|doc| json_response(200, &doc))
                .ok_or_else(not_found)
        }
        ["debug", "requests"] => {
            let records = serde_json::to_value(state.audit.records()).unwrap_or_default();
            return Ok(json_response(200, &records));
        }
        ["debug", "expire-watches"] if method == Method::POST => {
            let rv = state.store.expire_watches();
            return Ok(json_response(
                200,
                &json!({"resourceVersion": rv.to_string()}),
            ));
        }
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] if method == Method::POST => {
            record.verb = "create".into();
            record.api_group = "authentication.k8s.io".into();
            record.resource = "tokenreviews".into();
            return Ok(json_response(201, &rbac::token_review(&review(body)?)));
        }
        ["apis", "authorization.k8s.io", "v1", kind @ ("subjectaccessreviews" | "selfsubjectaccessreviews")]
            if method == Method::POST =>
        {
            record.verb = "create".into();
            record.api_group = "authorization.k8s.io".into();
            record.resource = kind.to_string();
            let requester = (*kind == "selfsubjectaccessreviews")
                .then(|| rbac::UserInfo::from_token(&record.user))
                .flatten();
            let rbac = rbac::Rbac::from_store(&state.store);
            let answer = rbac::access_review(&rbac, &review(body)?, requester.as_ref());
            return Ok(json_response(201, &answer));
        }
        _ => {}
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found()),
    };
    let (namespace, rest) = match rest {
        // `/namespaces/<ns>/status` is the namespace's own subresource.
        ["namespaces", _, "status" | "finalize"] => (None, rest),
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return Err(not_found()),
    };
    let def = state.def(group, version, plural).ok_or_else(not_found)?;
    record.api_group = group.to_string();
    record.api_version = version.to_string();
    record.resource = plural.to_string();
    record.subresource = subresource.clone().unwrap_or_default();
    record.namespace = namespace.clone().unwrap_or_default();
    record.name = name.clone().unwrap_or_default();
    if let Some(sub) = &subresource {
        let approval = sub == "approval" && csr::is_csr(group, plural);
        if !approval && (sub != "status" || !def.status_subresource) {
            return Err(not_found());
        }
    }
    if namespace.is_some() && !def.namespaced {
        return Err(not_found());
    }
    let target = Target {
        def,
        namespace,
        name,
        subresource,
        user: record.user.clone(),
    };
    let accept = header(headers, "accept");
    let content_type = header(headers, "content-type");
    let verb = match (method, &target.name) {
        (&Method::GET, None) if query.flag("watch") => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, None) => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        (&Method::DELETE, None) => "deletecollection",
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource".to_string(),
            ));
        }
    };
    record.verb = verb.to_string();
    if !accepts_json(accept) {
        return Err(ApiError::new(
            406,
            "NotAcceptable",
            format!("the server cannot answer in {accept:?}; it answers only application/json (also as Table or PartialObjectMetadata)"),
        ));
    }
    let decoded;
    let body = if content_type.contains("protobuf") {
        decoded = match verb {
            "create" | "update" => {
                let object = protobuf::decode(body).map_err(|e| {
                    ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, and application/vnd.kubernetes.protobuf for v1 Namespace, ConfigMap, Secret and ServiceAccount ({})", source_text(&e)),
                    )
                })?;
                Bytes::from(serde_json::to_vec(&object).unwrap_or_default())
            }
            // Delete options in protobuf are ignored (defaults apply).
            _ => Bytes::new(),
        };
        &decoded
    } else {
        body
    };
    match verb {
        "watch" => watch(state, &target, query, accept),
        "list" => list(state, &target, query, accept),
        "get" => get(state, &target, query, accept),
        "create" => create(state, &target, query, body),
        "update" => update(state, &target, query, body),
        "patch" => patch_object(state, &target, query, content_type, body),
        "delete" => delete(state, &target, query, body),
        _ => delete_collection(state, &target, query),
    }
}

#[cfg(test)]
mod tests {
    use super::accepts_json;

    #[test]
    fn accept_headers_of_real_clients_admit_json() {
        // kubectl's typed client, kubectl get (Table), kube-rs, curl.
        assert!(accepts_json(
            "application/vnd.kubernetes.protobuf,application/json"
        ));
        assert!(accepts_json(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(accepts_json(""));
        assert!(accepts_json("*/*"));
        assert!(accepts_json("application/merge-patch+json"));
        assert!(!accepts_json("application/vnd.kubernetes.protobuf"));
        assert!(!accepts_json("application/yaml"));
        assert!(!accepts_json(
            "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io"
        ));
    }
}
