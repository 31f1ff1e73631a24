//! The HTTP side of the server: [`router`] takes each request to
//! discovery, the debug endpoints or a resource verb; the verbs are
//! [`read`] (get, list), [`write`] (create, update, patch), [`delete`]
//! (delete, deletecollection) and [`watch`]; [`gc`] removes objects and
//! collects what they owned. They share [`state`] (store, kinds, request
//! log), [`request`] (query, target, body), [`response`] and [`error`]
//! (answers as `v1 Status`).
//!
//! Simplifications versus a real API server that span the verbs (each verb
//! module lists its own):
//! - no authentication, authorization or admission webhooks (the
//!   ValidatingAdmissionPolicies are applied, see [`admission`]; not on
//!   deletecollection);
//! - `dryRun=All` is honored for create, update, patch and delete;
//! - `resourceVersionMatch` is accepted and ignored.

pub mod admission;
pub mod delete;
pub mod error;
pub mod gc;
pub mod quota;
pub mod read;
pub mod request;
pub mod response;
pub mod router;
pub mod state;
pub mod watch;
pub mod write;

use std::time::Duration;

use serde_json::json;

use self::state::ServerState;
use crate::audit::AuditLog;

/// Server state with the built-in kinds and the standard namespaces
/// (`default`, `kube-system`, `kube-public`, `kube-node-lease`).
pub fn new_state(audit: AuditLog, bookmark_interval: Duration) -> ServerState {
    let state = ServerState::empty(audit, bookmark_interval);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let object = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        let def = state
            .def("", "v1", "namespaces")
            .expect("namespaces are built in");
        let _ = write::create_object(&state, &def, None, object, false);
    }
    // What aggregated API servers read to trust the front proxy.
    let def = state
        .def("", "v1", "configmaps")
        .expect("configmaps are built in");
    let cm = state.front_proxy.config_map();
    let _ = write::create_object(&state, &def, Some("kube-system"), cm, false);
    state
}
