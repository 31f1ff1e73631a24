//! Request routing and the REST verbs: get, list, watch, create, update,
//! patch, delete and deletecollection, on main resources and the `status`
//! subresource, plus discovery, OpenAPI and the debug endpoints.
//!
//! Simplifications versus a real API server:
//! - no authentication, authorization or admission webhooks;
//! - `limit`/`continue` are ignored: lists are returned whole;
//! - garbage collection runs right after the owner is removed (Background)
//!   and deletes every dependent that names the owner's uid, whatever its
//!   other owners; Foreground deletion marks the owner with the
//!   `foregroundDeletion` finalizer, deletes the dependents (in the
//!   background) and removes the owner when none is left;
//!   `blockOwnerDeletion` is not consulted;
//! - deleting a namespace deletes its objects right away (no Terminating
//!   phase); deleting a CRD deletes its custom resources;
//! - `dryRun=All` is honored for create, update, patch and delete;
//! - status in a create body is dropped for custom resources with a status
//!   subresource, kept for built-ins (so test Nodes can be created whole);
//! - an update that changes nothing keeps the resource version and sends no
//!   watch event (as the real server does); `metadata.generation` moves when
//!   anything but metadata and status changes, for every kind;
//! - responses are JSON only (Tables and `PartialObjectMetadata` on request);
//!   protobuf request bodies are decoded for the kinds in [`super::protobuf`];
//! - no `managedFields`; `resourceVersionMatch` and `fieldManager` are
//!   accepted and ignored.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use super::audit::{identity, AuditLog, AuditRecord};
use super::convert;
use super::crd::{builtin_resources, established_status, resources_of_crd, ResourceDef};
use super::discovery;
use super::patch::{self, PatchKind};
use super::protobuf;
use super::schema;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{EventType, Mutation, ObjectKey, ResourceId, Store, StoreError, StoredEvent};
use super::table::{self, IncludeObject};

/// Response body: whole JSON documents or a watch stream.
pub type Body = BoxBody<Bytes, Infallible>;

/// An error answered as a `v1 Status`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Value,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            details: Value::Null,
        }
    }

    fn with_details(mut self, def: &ResourceDef, name: &str) -> Self {
        self.details = json!({"name": name, "group": def.group, "kind": def.plural});
        self
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into())
    }

    fn not_found(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", def.group_resource()),
        )
        .with_details(def, name)
    }

    fn already_exists(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", def.group_resource()),
        )
        .with_details(def, name)
    }

    fn conflict(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                def.group_resource()
            ),
        )
        .with_details(def, name)
    }

    fn invalid(def: &ResourceDef, name: &str, errors: &[schema::FieldError]) -> Self {
        let detail = if errors.len() == 1 {
            errors[0].message.clone()
        } else {
            let all: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
            format!("[{}]", all.join(", "))
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| {
                let detail = e
                    .message
                    .strip_prefix(&format!("{}: ", e.field))
                    .unwrap_or(&e.message);
                json!({"reason": e.reason, "message": detail, "field": e.field})
            })
            .collect();
        let mut error = Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {detail}", def.group_kind()),
        );
        error.details =
            json!({"name": name, "group": def.group, "kind": def.kind, "causes": causes});
        error
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        });
        if !self.details.is_null() {
            status["details"] = self.details.clone();
        }
        status
    }

    fn response(&self) -> Response<Body> {
        json_response(self.code, &self.status())
    }
}

fn expired(rv: u64) -> ApiError {
    ApiError::new(410, "Expired", format!("too old resource version: {rv}"))
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Everything the handlers share.
pub struct ServerState {
    pub(crate) store: Store,
    builtins: Vec<ResourceDef>,
    custom: RwLock<Vec<ResourceDef>>,
    pub(crate) audit: AuditLog,
    pub(crate) address: RwLock<String>,
    uid_counter: AtomicU64,
    uid_seed: u64,
    bookmark_interval: Duration,
}

impl ServerState {
    /// State with the built-in kinds and the standard namespaces.
    pub fn new(audit: AuditLog, bookmark_interval: Duration) -> Self {
        let seed = Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64;
        let state = Self {
            store: Store::new(),
            builtins: builtin_resources(),
            custom: RwLock::new(Vec::new()),
            audit,
            address: RwLock::new(String::new()),
            uid_counter: AtomicU64::new(1),
            uid_seed: seed,
            bookmark_interval,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            let def = state
                .def("", "v1", "namespaces")
                .expect("namespaces are built in");
            let _ = create_object(&state, &def, None, object, false);
        }
        state
    }

    fn defs(&self) -> Vec<ResourceDef> {
        let mut defs = self.builtins.clone();
        defs.extend(self.custom.read().map(|c| c.clone()).unwrap_or_default());
        defs
    }

    fn def(&self, group: &str, version: &str, plural: &str) -> Option<ResourceDef> {
        self.defs()
            .into_iter()
            .find(|d| d.group == group && d.version == version && d.plural == plural)
    }

    fn defs_of(&self, res: &ResourceId) -> Option<ResourceDef> {
        self.defs()
            .into_iter()
            .find(|d| d.group == res.group && d.plural == res.resource)
    }

    fn new_uid(&self) -> String {
        let n = self.uid_counter.fetch_add(1, Ordering::Relaxed);
        let mixed = self
            .uid_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(n);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (mixed >> 32) as u32,
            (mixed >> 16) as u16,
            (n >> 12) & 0xfff,
            n & 0xfff,
            (mixed ^ n.rotate_left(17)) & 0xffff_ffff_ffff
        )
    }

    fn random_suffix(&self) -> String {
        const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let n = self.uid_counter.fetch_add(1, Ordering::Relaxed);
        let mut x = self.uid_seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..5)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                CHARS[(x % CHARS.len() as u64) as usize] as char
            })
            .collect()
    }

    /// Rebuilds the custom resources from the stored CRDs.
    fn refresh_crds(&self) {
        let (crds, _) = self.store.list(
            &ResourceId::new("apiextensions.k8s.io", "customresourcedefinitions"),
            None,
        );
        let defs: Vec<ResourceDef> = crds.iter().flat_map(resources_of_crd).collect();
        if let Ok(mut custom) = self.custom.write() {
            *custom = defs;
        }
    }
}

/// Decoded query parameters.
struct Query(HashMap<String, String>);

impl Query {
    fn parse(raw: Option<&str>) -> Self {
        let mut map = HashMap::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            map.insert(percent_decode(key), percent_decode(value));
        }
        Self(map)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request for a resource path.
struct Target {
    def: ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// Serves one HTTP request.
pub async fn handle(
    state: Arc<ServerState>,
    request: http::Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
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
        state.audit.push(record);
    }
    response
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
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
        if sub != "status" || !def.status_subresource {
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
    let decoded;
    let body = if content_type.contains("protobuf") {
        decoded = match verb {
            "create" | "update" => {
                let object = protobuf::decode(body).map_err(|e| {
                    ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml ({e})"),
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

/// The object as served through `def`'s group and version.
fn present(def: &ResourceDef, object: &Value) -> Value {
    convert::from_storage(def, object)
}

fn key_of(target: &Target, name: &str) -> ObjectKey {
    ObjectKey::new(target.namespace.as_deref().unwrap_or(""), name)
}

fn selectors(query: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("unable to parse labelSelector: {e}")))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("unable to parse fieldSelector: {e}")))?;
    Ok((labels, fields))
}

fn get(
    state: &ServerState,
    target: &Target,
    query: &Query,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let name = target.name.as_deref().unwrap_or("");
    let object = state
        .store
        .get(&target.def.id(), &key_of(target, name))
        .ok_or_else(|| ApiError::not_found(&target.def, name))?;
    let object = present(&target.def, &object);
    if table::wants_table(accept) {
        let rv = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let include = IncludeObject::parse(query.get("includeObject"));
        return Ok(json_response(
            200,
            &table::table(&target.def, &[object], rv, include),
        ));
    }
    if wants_metadata(accept) {
        return Ok(json_response(200, &partial_metadata(&object)));
    }
    Ok(json_response(200, &object))
}

/// Whether an Accept header asks for `PartialObjectMetadata` (kube-rs'
/// `get_metadata`, `list_metadata` and `metadata_watcher`).
fn wants_metadata(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
}

fn partial_metadata(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

fn list(
    state: &ServerState,
    target: &Target,
    query: &Query,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let (labels, fields) = selectors(query)?;
    let (items, rv) = state
        .store
        .list(&target.def.id(), target.namespace.as_deref());
    let items: Vec<Value> = items
        .iter()
        .map(|o| present(&target.def, o))
        .filter(|o| labels.matches(o) && fields.matches(o))
        .collect();
    if table::wants_table(accept) {
        let include = IncludeObject::parse(query.get("includeObject"));
        return Ok(json_response(
            200,
            &table::table(&target.def, &items, rv, include),
        ));
    }
    if wants_metadata(accept) {
        let items: Vec<Value> = items.iter().map(partial_metadata).collect();
        return Ok(json_response(
            200,
            &json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadataList",
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items,
            }),
        ));
    }
    Ok(json_response(
        200,
        &json!({
            "apiVersion": target.def.api_version(),
            "kind": format!("{}List", target.def.kind),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }),
    ))
}

fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let value = patch::parse_body(body)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {}", source_text(&e))))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body is not an object"));
    }
    check_metadata(&value)?;
    Ok(value)
}

/// An object's `metadata`, when present, is an object (as the API server's
/// decoding into ObjectMeta demands); everything after relies on it.
fn check_metadata(object: &Value) -> Result<(), ApiError> {
    match object.get("metadata") {
        None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
        Some(_) => Err(ApiError::bad_request(
            "metadata: Invalid value: must be an object (ObjectMeta)",
        )),
    }
}

fn source_text(error: &dyn std::error::Error) -> String {
    match error.source() {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Checks the body against the resource's schema (custom resources):
/// prunes unknown fields (or refuses them under `fieldValidation=Strict`),
/// applies defaults and validates.
fn admit(
    def: &ResourceDef,
    object: &mut Value,
    old: Option<&Value>,
    query: &Query,
    name: &str,
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    let meta_name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !is_dns_subdomain(meta_name) {
        errors.push(schema::FieldError {
            field: "metadata.name".into(),
            reason: "FieldValueInvalid",
            message: format!("metadata.name: Invalid value: {meta_name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
        });
    }
    if let Some(schema_doc) = &def.schema {
        let unknown = schema::prune_and_default(schema_doc, object);
        if !unknown.is_empty() && query.get("fieldValidation") == Some("Strict") {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                list.join(", ")
            )));
        }
        errors.extend(schema::validate(schema_doc, object, old));
        if errors.is_empty() {
            errors.extend(schema::validate_cel(schema_doc, object, old));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(def, name, &errors))
    }
}

/// Normalizes a Secret: `stringData` is folded into base64 `data`.
fn fold_string_data(def: &ResourceDef, object: &mut Value) {
    if def.group.is_empty() && def.plural == "secrets" {
        if let Some(Value::Object(string_data)) =
            object.as_object_mut().and_then(|o| o.remove("stringData"))
        {
            let data = object
                .as_object_mut()
                .map(|o| o.entry("data").or_insert_with(|| json!({})));
            if let Some(Value::Object(data)) = data {
                for (key, value) in string_data {
                    data.insert(
                        key,
                        Value::String(base64(value.as_str().unwrap_or("").as_bytes())),
                    );
                }
            }
        }
    }
}

/// Standard base64 with padding (Secret data is base64 on the wire).
pub(super) fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Creates an object (shared by POST, apply-patch to a missing object and
/// the startup namespaces). Returns the stored (or dry-run) object.
fn create_object(
    state: &ServerState,
    def: &ResourceDef,
    namespace: Option<&str>,
    mut object: Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    create_object_with(
        state,
        def,
        namespace,
        &mut object,
        dry_run,
        &Query(HashMap::new()),
    )
}

fn create_object_with(
    state: &ServerState,
    def: &ResourceDef,
    namespace: Option<&str>,
    object: &mut Value,
    dry_run: bool,
    query: &Query,
) -> Result<Value, ApiError> {
    if let Some(kind) = object.get("kind").and_then(Value::as_str) {
        if kind != def.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                def.kind
            )));
        }
    }
    let object_map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the body is not an object"))?;
    object_map.insert("apiVersion".into(), Value::String(def.api_version()));
    object_map.insert("kind".into(), Value::String(def.kind.clone()));
    let meta = object_map
        .entry("metadata")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata is not an object"))?;
    let namespace = if def.namespaced {
        let body_ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .map(str::to_string);
        let ns = match (namespace, body_ns.as_deref()) {
            (Some(path), Some(body)) if path != body => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            (Some(path), _) => path.to_string(),
            (None, Some(body)) => body.to_string(),
            (None, None) => "default".to_string(),
        };
        meta.insert("namespace".into(), Value::String(ns.clone()));
        ns
    } else {
        meta.remove("namespace");
        String::new()
    };
    let name = match meta.get("name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) if !prefix.is_empty() => format!("{prefix}{}", state.random_suffix()),
            _ => {
                let error = schema::FieldError {
                    field: "metadata.name".into(),
                    reason: "FieldValueRequired",
                    message: "metadata.name: Required value: name or generateName is required"
                        .into(),
                };
                return Err(ApiError::invalid(def, "", &[error]));
            }
        },
    };
    meta.insert("name".into(), Value::String(name.clone()));
    meta.insert("uid".into(), Value::String(state.new_uid()));
    meta.insert("creationTimestamp".into(), Value::String(now()));
    meta.insert("generation".into(), json!(1));
    for field in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    ] {
        meta.remove(field);
    }
    if def.custom && def.status_subresource {
        object_map.remove("status");
    }
    if !namespace.is_empty() {
        let ns_res = ResourceId::new("", "namespaces");
        match state.store.get(&ns_res, &ObjectKey::new("", &namespace)) {
            None => {
                return Err(ApiError::new(404, "NotFound", format!("namespaces \"{namespace}\" not found"))
                    .with_details(&state.def("", "v1", "namespaces").unwrap_or_else(|| def.clone()), &namespace))
            }
            Some(ns) if ns.pointer("/metadata/deletionTimestamp").is_some() => {
                return Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!("{} \"{name}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated", def.group_resource()),
                ))
            }
            Some(_) => {}
        }
    }
    match (def.group.as_str(), def.plural.as_str()) {
        ("", "namespaces") => {
            object["status"] = json!({"phase": "Active"});
            object["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            let plural = object
                .pointer("/spec/names/plural")
                .and_then(Value::as_str)
                .unwrap_or("");
            let group = object
                .pointer("/spec/group")
                .and_then(Value::as_str)
                .unwrap_or("");
            if name != format!("{plural}.{group}") {
                let error = schema::FieldError {
                    field: "metadata.name".into(),
                    reason: "FieldValueInvalid",
                    message: format!(
                        "metadata.name: Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"
                    ),
                };
                return Err(ApiError::invalid(def, &name, &[error]));
            }
            let status = established_status(object, &now());
            object["status"] = status;
        }
        _ => {}
    }
    fold_string_data(def, object);
    admit(def, object, None, query, &name)?;
    if dry_run {
        return Ok(object.clone());
    }
    let key = ObjectKey::new(&namespace, &name);
    let stored_form = convert::to_storage(def, object);
    let stored = state
        .store
        .mutate(&def.id(), &key, |current, _| match current {
            Some(_) => Err(ApiError::already_exists(def, &name)),
            None => Ok(Mutation::Put(stored_form)),
        })?;
    if def.group == "apiextensions.k8s.io" {
        state.refresh_crds();
    }
    Ok(stored)
}

fn create(
    state: &ServerState,
    target: &Target,
    query: &Query,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let mut object = parse_object(body)?;
    let stored = create_object_with(
        state,
        &target.def,
        target.namespace.as_deref(),
        &mut object,
        query.dry_run(),
        query,
    )?;
    Ok(json_response(201, &present(&target.def, &stored)))
}

fn without_volatile(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    if let Some(map) = object.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    object
}

fn spec_part(object: &Value) -> Value {
    let mut object = without_volatile(object);
    if let Some(map) = object.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    object
}

/// What happened to an object written through update or patch.
enum Outcome {
    Stored(Value),
    Deleted(Value),
}

/// Builds the next version of an existing object from a desired one and
/// decides what to store.
fn next_version(
    def: &ResourceDef,
    old: &Value,
    desired: Value,
    status_only: bool,
    query: &Query,
    name: &str,
) -> Result<(Mutation, Value), ApiError> {
    let desired = convert::to_storage(def, &desired);
    let mut next = if status_only {
        let mut next = old.clone();
        match desired.get("status") {
            Some(status) => next["status"] = status.clone(),
            None => {
                if let Some(map) = next.as_object_mut() {
                    map.remove("status");
                }
            }
        }
        next
    } else {
        let mut next = desired;
        if def.status_subresource {
            match old.get("status") {
                Some(status) => next["status"] = status.clone(),
                None => {
                    if let Some(map) = next.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
        }
        next
    };
    if !next.get("metadata").is_some_and(Value::is_object) {
        next["metadata"] = json!({});
    }
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(field) {
            Some(value) => next["metadata"][field] = value.clone(),
            None => {
                if let Some(meta) = next["metadata"].as_object_mut() {
                    meta.remove(field);
                }
            }
        }
    }
    if let Some(map) = next.as_object_mut() {
        map.insert("apiVersion".into(), Value::String(def.api_version()));
        map.insert("kind".into(), Value::String(def.kind.clone()));
    }
    fold_string_data(def, &mut next);
    if def.group == "apiextensions.k8s.io" && !status_only {
        // The names a CRD is served under follow its spec at once.
        next["status"]["acceptedNames"] = next["spec"]["names"].clone();
    }
    admit(def, &mut next, Some(old), query, name)?;
    // After admission, so that defaults and pruning do not count as changes.
    if spec_part(&next) != spec_part(old) {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        next["metadata"]["generation"] = json!(generation + 1);
    }
    let finalizers_empty = next["metadata"]["finalizers"]
        .as_array()
        .is_none_or(Vec::is_empty);
    if next["metadata"].get("deletionTimestamp").is_some() && finalizers_empty {
        return Ok((Mutation::Delete, next));
    }
    if without_volatile(&next) == without_volatile(old) {
        return Ok((Mutation::Keep(old.clone()), old.clone()));
    }
    Ok((Mutation::Put(next.clone()), next))
}

/// Writes an existing object: `build` makes the desired object from the
/// current one (and may refuse).
fn write_existing<F>(
    state: &ServerState,
    target: &Target,
    query: &Query,
    build: F,
) -> Result<Outcome, ApiError>
where
    F: FnOnce(&Value) -> Result<Value, ApiError>,
{
    let def = &target.def;
    let name = target.name.clone().unwrap_or_default();
    let status_only = target.subresource.is_some();
    let dry_run = query.dry_run();
    let mut deleted = false;
    let stored = state
        .store
        .mutate(&def.id(), &key_of(target, &name), |current, _| {
            let old = current.ok_or_else(|| ApiError::not_found(def, &name))?;
            let desired = build(old)?;
            let (mutation, next) = next_version(def, old, desired, status_only, query, &name)?;
            if dry_run {
                return Ok(Mutation::Keep(next));
            }
            deleted = matches!(mutation, Mutation::Delete);
            Ok(mutation)
        })?;
    if deleted {
        after_delete(state, &def.id(), &stored);
        return Ok(Outcome::Deleted(stored));
    }
    if def.group == "apiextensions.k8s.io" && !dry_run {
        state.refresh_crds();
    }
    Ok(Outcome::Stored(stored))
}

fn outcome_response(def: &ResourceDef, outcome: Outcome) -> Response<Body> {
    match outcome {
        Outcome::Stored(object) | Outcome::Deleted(object) => {
            json_response(200, &present(def, &object))
        }
    }
}

fn check_rv_precondition(
    def: &ResourceDef,
    old: &Value,
    desired: &Value,
    name: &str,
) -> Result<(), ApiError> {
    let wanted = desired
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let current = old
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !wanted.is_empty() && wanted != current {
        return Err(ApiError::conflict(def, name));
    }
    Ok(())
}

fn update(
    state: &ServerState,
    target: &Target,
    query: &Query,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let desired = parse_object(body)?;
    let def = &target.def;
    let name = target.name.clone().unwrap_or_default();
    if let Some(body_name) = desired.pointer("/metadata/name").and_then(Value::as_str) {
        if body_name != name {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
    }
    let has_rv = desired
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|rv| !rv.is_empty());
    if !has_rv && !def.unconditional_update {
        let error = schema::FieldError {
            field: "metadata.resourceVersion".into(),
            reason: "FieldValueInvalid",
            message:
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
                    .into(),
        };
        return Err(ApiError::invalid(def, &name, &[error]));
    }
    let outcome = write_existing(state, target, query, |old| {
        check_rv_precondition(def, old, &desired, &name)?;
        Ok(desired.clone())
    })?;
    Ok(outcome_response(def, outcome))
}

fn patch_object(
    state: &ServerState,
    target: &Target,
    query: &Query,
    content_type: &str,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let kind = PatchKind::from_content_type(content_type)
        .map_err(|e| ApiError::new(415, "UnsupportedMediaType", e.to_string()))?;
    let def = &target.def;
    let name = target.name.clone().unwrap_or_default();
    if kind == PatchKind::Apply {
        if query.get("fieldManager").is_none_or(str::is_empty) {
            return Err(ApiError::bad_request("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"));
        }
        let exists = state.store.get(&def.id(), &key_of(target, &name)).is_some();
        if !exists && target.subresource.is_none() {
            let mut object = parse_object(body)?;
            if object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .is_some_and(|n| n != name)
            {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
            object["metadata"]["name"] = Value::String(name.clone());
            let stored = create_object_with(
                state,
                def,
                target.namespace.as_deref(),
                &mut object,
                query.dry_run(),
                query,
            )?;
            return Ok(json_response(201, &present(def, &stored)));
        }
    }
    let outcome = write_existing(state, target, query, |old| {
        let mut patched = present(def, old);
        patch::apply(kind, &mut patched, body).map_err(|e| match e {
            patch::PatchError::JsonPatch(_) => ApiError::new(422, "Invalid", source_text(&e)),
            other => ApiError::bad_request(source_text(&other)),
        })?;
        if !patched.is_object() {
            return Err(ApiError::bad_request("the patch did not produce an object"));
        }
        check_metadata(&patched)?;
        check_rv_precondition(def, old, &patched, &name)?;
        Ok(patched)
    })?;
    Ok(outcome_response(def, outcome))
}

/// Deletes or marks for deletion one object; returns what was stored last
/// and whether it is gone.
fn delete_object(
    state: &ServerState,
    res: &ResourceId,
    key: &ObjectKey,
    preconditions: &Value,
    dry_run: bool,
    def: Option<&ResourceDef>,
) -> Result<(Value, bool), ApiError> {
    let mut gone = false;
    let display = def.cloned().or_else(|| state.defs_of(res));
    let stored = state.store.mutate(res, key, |current, _| {
        let Some(old) = current else {
            return Err(match &display {
                Some(def) => ApiError::not_found(def, &key.name),
                None => ApiError::new(
                    404,
                    "NotFound",
                    format!("{} \"{}\" not found", res.resource, key.name),
                ),
            });
        };
        for (field, pointer) in [
            ("uid", "/metadata/uid"),
            ("resourceVersion", "/metadata/resourceVersion"),
        ] {
            if let Some(want) = preconditions.get(field).and_then(Value::as_str) {
                if old.pointer(pointer).and_then(Value::as_str) != Some(want) {
                    return Err(match &display {
                        Some(def) => ApiError::conflict(def, &key.name),
                        None => ApiError::new(409, "Conflict", "precondition failed".into()),
                    });
                }
            }
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if old.pointer("/metadata/deletionTimestamp").is_some() || dry_run {
                return Ok(Mutation::Keep(old.clone()));
            }
            let mut marked = old.clone();
            marked["metadata"]["deletionTimestamp"] = Value::String(now());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            return Ok(Mutation::Put(marked));
        }
        if dry_run {
            return Ok(Mutation::Keep(old.clone()));
        }
        gone = true;
        Ok(Mutation::Delete)
    })?;
    if gone {
        after_delete(state, res, &stored);
    }
    Ok((stored, gone))
}

/// Cleans up after an object is gone: dependents (owner references), the
/// contents of a namespace, the custom resources of a CRD.
fn after_delete(state: &ServerState, res: &ResourceId, object: &Value) {
    release_foreground_owners(state, object);
    let uid = object
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if res.group == "apiextensions.k8s.io" && res.resource == "customresourcedefinitions" {
        let group = object
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("");
        let plural = object
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or("");
        let crs = ResourceId::new(group, plural);
        let (items, _) = state.store.list(&crs, None);
        for item in items {
            let key = object_key(&item);
            let _ = state
                .store
                .mutate::<ApiError, _>(&crs, &key, |_, _| Ok(Mutation::Delete));
        }
        state.refresh_crds();
    }
    let namespace_deleted = res.group.is_empty() && res.resource == "namespaces";
    for resource in state.store.resources() {
        let (items, _) = state
            .store
            .list(&resource, namespace_deleted.then_some(name.as_str()));
        for item in items {
            let owned = item
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid.as_str())));
            if owned || namespace_deleted {
                let _ = delete_object(
                    state,
                    &resource,
                    &object_key(&item),
                    &Value::Null,
                    false,
                    None,
                );
            }
        }
    }
}

fn object_key(object: &Value) -> ObjectKey {
    ObjectKey::new(
        object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(""),
        object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or(""),
    )
}

const FOREGROUND: &str = "foregroundDeletion";

fn owned_by(item: &Value, uid: &str) -> bool {
    item.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)))
}

/// Every object (with its resource) whose owner references name `uid`.
fn dependents_of(state: &ServerState, uid: &str) -> Vec<(ResourceId, Value)> {
    let mut found = Vec::new();
    for resource in state.store.resources() {
        let (items, _) = state.store.list(&resource, None);
        found.extend(
            items
                .into_iter()
                .filter(|item| owned_by(item, uid))
                .map(|item| (resource.clone(), item)),
        );
    }
    found
}

/// Foreground deletion: marks the owner with the `foregroundDeletion`
/// finalizer, deletes its dependents, and lets the owner go once none is
/// left (see [`release_foreground_owners`]).
fn delete_foreground(state: &ServerState, res: &ResourceId, key: &ObjectKey, uid: &str) {
    let _ = state.store.mutate::<ApiError, _>(res, key, |current, _| {
        let Some(current) = current else {
            return Ok(Mutation::Keep(Value::Null));
        };
        let mut marked = current.clone();
        let meta = &mut marked["metadata"];
        if !meta["finalizers"].is_array() {
            meta["finalizers"] = json!([]);
        }
        if let Some(finalizers) = meta["finalizers"].as_array_mut() {
            if !finalizers.iter().any(|f| f == FOREGROUND) {
                finalizers.push(json!(FOREGROUND));
            }
        }
        if meta.get("deletionTimestamp").is_none() {
            meta["deletionTimestamp"] = Value::String(now());
            meta["deletionGracePeriodSeconds"] = json!(0);
        }
        Ok(Mutation::Put(marked))
    });
    for (resource, item) in dependents_of(state, uid) {
        let _ = delete_object(
            state,
            &resource,
            &object_key(&item),
            &Value::Null,
            false,
            None,
        );
    }
    release_foreground_owner(state, res, key, uid);
}

/// Drops the `foregroundDeletion` finalizer of an owner without dependents
/// left, deleting it when no other finalizer remains.
fn release_foreground_owner(state: &ServerState, res: &ResourceId, key: &ObjectKey, uid: &str) {
    if !dependents_of(state, uid).is_empty() {
        return;
    }
    let mut gone = false;
    let result = state.store.mutate::<ApiError, _>(res, key, |current, _| {
        let Some(current) = current else {
            return Ok(Mutation::Keep(Value::Null));
        };
        let mut next = current.clone();
        let Some(finalizers) = next["metadata"]["finalizers"].as_array_mut() else {
            return Ok(Mutation::Keep(current.clone()));
        };
        if !finalizers.iter().any(|f| f == FOREGROUND) {
            return Ok(Mutation::Keep(current.clone()));
        }
        finalizers.retain(|f| f != FOREGROUND);
        if finalizers.is_empty() {
            gone = true;
            return Ok(Mutation::Delete);
        }
        Ok(Mutation::Put(next))
    });
    if let (Ok(object), true) = (result, gone) {
        after_delete(state, res, &object);
    }
}

/// After a dependent is gone, owners waiting in foreground deletion may go.
fn release_foreground_owners(state: &ServerState, dependent: &Value) {
    let Some(refs) = dependent
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
    else {
        return;
    };
    let namespace = dependent
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    for owner_ref in refs {
        let Some(uid) = owner_ref["uid"].as_str() else {
            continue;
        };
        for resource in state.store.resources() {
            let (items, _) = state.store.list(&resource, None);
            let owner = items.into_iter().find(|o| {
                o.pointer("/metadata/uid").and_then(Value::as_str) == Some(uid)
                    && o.pointer("/metadata/finalizers")
                        .and_then(Value::as_array)
                        .is_some_and(|f| f.iter().any(|f| f == FOREGROUND))
            });
            if let Some(owner) = owner {
                let key = object_key(&owner);
                if key.namespace.is_empty() || key.namespace == namespace {
                    release_foreground_owner(state, &resource, &key, uid);
                }
            }
        }
    }
}

fn orphan_dependents(state: &ServerState, uid: &str) {
    for resource in state.store.resources() {
        let (items, _) = state.store.list(&resource, None);
        for item in items {
            let owned = item
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)));
            if owned {
                let _ = state.store.mutate::<ApiError, _>(
                    &resource,
                    &object_key(&item),
                    |current, _| {
                        let Some(current) = current else {
                            return Ok(Mutation::Keep(Value::Null));
                        };
                        let mut next = current.clone();
                        if let Some(refs) = next["metadata"]["ownerReferences"].as_array_mut() {
                            refs.retain(|r| r["uid"].as_str() != Some(uid));
                        }
                        Ok(Mutation::Put(next))
                    },
                );
            }
        }
    }
}

fn delete(
    state: &ServerState,
    target: &Target,
    query: &Query,
    body: &Bytes,
) -> Result<Response<Body>, ApiError> {
    let options = if body.is_empty() {
        json!({})
    } else {
        parse_object(body)?
    };
    let name = target.name.clone().unwrap_or_default();
    let dry_run = query.dry_run()
        || options["dryRun"]
            .as_array()
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    let policy = query
        .get("propagationPolicy")
        .map(str::to_string)
        .or_else(|| options["propagationPolicy"].as_str().map(str::to_string))
        .unwrap_or_default();
    if policy == "Orphan" && !dry_run {
        if let Some(current) = state.store.get(&target.def.id(), &key_of(target, &name)) {
            orphan_dependents(
                state,
                current
                    .pointer("/metadata/uid")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            );
        }
    }
    if policy == "Foreground" && !dry_run {
        if let Some(current) = state.store.get(&target.def.id(), &key_of(target, &name)) {
            let uid = current
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if !dependents_of(state, &uid).is_empty() {
                delete_foreground(state, &target.def.id(), &key_of(target, &name), &uid);
                let code = match state.store.get(&target.def.id(), &key_of(target, &name)) {
                    Some(object) => return Ok(json_response(202, &present(&target.def, &object))),
                    None => 200,
                };
                return Ok(json_response(code, &present(&target.def, &current)));
            }
        }
    }
    let (object, gone) = delete_object(
        state,
        &target.def.id(),
        &key_of(target, &name),
        &options["preconditions"],
        dry_run,
        Some(&target.def),
    )?;
    let code = if gone || dry_run { 200 } else { 202 };
    Ok(json_response(code, &present(&target.def, &object)))
}

fn delete_collection(
    state: &ServerState,
    target: &Target,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let (labels, fields) = selectors(query)?;
    let (items, rv) = state
        .store
        .list(&target.def.id(), target.namespace.as_deref());
    let mut deleted = Vec::new();
    for item in items.iter().filter(|o| {
        let shown = present(&target.def, o);
        labels.matches(&shown) && fields.matches(&shown)
    }) {
        if let Ok((object, _)) = delete_object(
            state,
            &target.def.id(),
            &object_key(item),
            &Value::Null,
            query.dry_run(),
            Some(&target.def),
        ) {
            deleted.push(present(&target.def, &object));
        }
    }
    Ok(json_response(
        200,
        &json!({
            "apiVersion": target.def.api_version(),
            "kind": format!("{}List", target.def.kind),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": deleted,
        }),
    ))
}

/// Filters and shapes watch events for one watcher.
struct WatchFilter {
    def: ResourceDef,
    res: ResourceId,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    table: Option<IncludeObject>,
    metadata_only: bool,
}

impl WatchFilter {
    fn matches(&self, object: &Value) -> bool {
        let ns_ok = self.namespace.as_deref().is_none_or(|ns| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(ns)
        });
        ns_ok && self.labels.matches(object) && self.fields.matches(object)
    }

    /// The line to send for a store event, if this watcher should see it.
    fn line(&self, event: &StoredEvent) -> Option<Bytes> {
        if event.resource != self.res {
            return None;
        }
        let object = present(&self.def, &event.object);
        let now_matches = self.matches(&object);
        let kind = match (event.kind, &event.previous) {
            (EventType::Modified, Some(previous)) => {
                let before = self.matches(&present(&self.def, previous));
                match (before, now_matches) {
                    (true, true) => EventType::Modified,
                    (false, true) => EventType::Added,
                    (true, false) => EventType::Deleted,
                    (false, false) => return None,
                }
            }
            (kind, _) if now_matches => kind,
            _ => return None,
        };
        Some(self.encode(kind.as_str(), object))
    }

    fn encode(&self, kind: &str, object: Value) -> Bytes {
        let object = match self.table {
            Some(include) => {
                let rv = object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                table::table(&self.def, &[object], rv, include)
            }
            None if self.metadata_only => partial_metadata(&object),
            None => object,
        };
        watch_line(kind, &object)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        watch_line(
            "BOOKMARK",
            &json!({"kind": self.def.kind, "apiVersion": self.def.api_version(), "metadata": metadata}),
        )
    }
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn streaming_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn watch(
    state: &Arc<ServerState>,
    target: &Target,
    query: &Query,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let (labels, mut fields) = selectors(query)?;
    if let Some(name) = &target.name {
        fields = FieldSelector::parse(&format!("metadata.name={name}")).unwrap_or(fields);
    }
    let send_initial = query.flag("sendInitialEvents");
    let since = match query.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(_) if send_initial => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    let filter = WatchFilter {
        def: target.def.clone(),
        res: target.def.id(),
        namespace: target.namespace.clone(),
        labels,
        fields,
        table: table::wants_table(accept).then(|| IncludeObject::parse(query.get("includeObject"))),
        metadata_only: wants_metadata(accept),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let bookmarks = query.flag("allowWatchBookmarks");
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let start = state.store.watch(&filter.res, since);
    let interval = state.bookmark_interval;
    tokio::spawn(async move {
        let mut start = match start {
            Ok(start) => start,
            Err(StoreError::Expired(rv)) => {
                let _ = tx.send(watch_line("ERROR", &expired(rv).status())).await;
                return;
            }
            Err(_) => return,
        };
        // Everything up to the version at subscription is in the backlog (or
        // the current state); the live channel carries only newer events.
        let mut last_rv = since.unwrap_or(start.rv);
        for event in &start.backlog {
            last_rv = last_rv.max(event.rv);
            if let Some(line) = filter.line(event) {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
        }
        if send_initial && tx.send(filter.bookmark(last_rv, true)).await.is_err() {
            return;
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            let sleep_until = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = start.live.recv() => match received {
                    Ok(event) => {
                        if event.rv <= last_rv {
                            continue;
                        }
                        last_rv = event.rv;
                        if let Some(line) = filter.line(&event) {
                            if tx.send(line).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(watch_line("ERROR", &expired(last_rv).status())).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    // Deliver anything already queued first, so the bookmark
                    // never runs ahead of an event this watcher still owes.
                    while let Ok(event) = start.live.try_recv() {
                        if event.rv <= last_rv {
                            continue;
                        }
                        last_rv = event.rv;
                        if let Some(line) = filter.line(&event) {
                            if tx.send(line).await.is_err() {
                                return;
                            }
                        }
                    }
                    if tx.send(filter.bookmark(last_rv, false)).await.is_err() {
                        return;
                    }
                }
                _ = start.expiry.changed() => return,
                _ = sleep_until => return,
                _ = tx.closed() => return,
            }
        }
    });
    Ok(streaming_response(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_of_selectors() {
        assert_eq!(
            percent_decode("app%3Dvm%2Ctier+in+%28a%29"),
            "app=vm,tier in (a)"
        );
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn base64_of_string_data() {
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"hi!"), "aGkh");
    }

    #[test]
    fn invalid_status_names_the_field() {
        let def = resources_of_crd(
            &json!({"spec": {"group": "godwit.dev", "scope": "Namespaced",
            "names": {"kind": "VirtualMachine", "plural": "virtualmachines"},
            "versions": [{"name": "v1alpha1", "served": true, "storage": true}]}}),
        )
        .remove(0);
        let errors = schema::validate(
            &json!({"properties": {"spec": {"type": "object", "properties": {"cpu": {"type": "integer", "minimum": 1}}}}}),
            &json!({"spec": {"cpu": 0}}),
            None,
        );
        let status = ApiError::invalid(&def, "x", &errors).status();
        assert_eq!(status["code"], 422);
        assert_eq!(
            status["message"],
            "VirtualMachine.godwit.dev \"x\" is invalid: spec.cpu: Invalid value: 0: spec.cpu in body should be greater than or equal to 1"
        );
        assert_eq!(status["details"]["causes"][0]["field"], "spec.cpu");
    }
}
