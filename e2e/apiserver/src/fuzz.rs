//! The entry point of the `apiserver_request` fuzz target (`fuzz/`): a few
//! HTTP requests against a fresh server state that knows Godwit's CRDs, as
//! kubectl, the operator or a broken client could send them. Every answer
//! must be a response (a `Status` error for nonsense), never a panic.
//!
//! Input: requests separated by a NUL byte, each `METHOD PATH[?QUERY]`, a
//! newline, a content type, a newline, then the body. Watches are skipped:
//! they stream on the runtime and are exercised by the kubectl tests.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::audit::AuditLog;
use crate::handlers::new_state;
use crate::handlers::router::handle_parts;
use crate::handlers::state::ServerState;

const CRDS: [&str; 3] = [
    include_str!("../../../crds/virtualmachines.yaml"),
    include_str!("../../../crds/vmtemplates.yaml"),
    include_str!("../../../crds/vmmigrations.yaml"),
];

fn serve(state: &Arc<ServerState>, method: &str, target: &str, content_type: &str, body: &[u8]) {
    let built = http::Request::builder()
        .method(method)
        .uri(target)
        .header("content-type", content_type)
        .body(());
    if let Ok(request) = built {
        let (parts, ()) = request.into_parts();
        let _ = handle_parts(state, &parts, &Bytes::copy_from_slice(body));
    }
}

/// A server state with the Godwit CRDs installed, as `kubectl apply -f crds/`
/// leaves it.
pub fn state_with_crds() -> Arc<ServerState> {
    let state = Arc::new(new_state(
        AuditLog::new(None).expect("an in-memory audit log"),
        Duration::from_secs(5),
    ));
    for crd in CRDS {
        let value: serde_json::Value = serde_saphyr::from_str(crd).expect("the CRDs are YAML");
        let body = serde_json::to_vec(&value).expect("JSON");
        serve(
            &state,
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            "application/json",
            &body,
        );
    }
    state
}

/// Serves the requests in `data` (see the module docs).
pub fn request_sequence(state: &Arc<ServerState>, data: &[u8]) {
    for one in data.split(|b| *b == 0).take(8) {
        let mut lines = one.splitn(3, |b| *b == b'\n');
        let (Some(first), content_type, body) = (lines.next(), lines.next(), lines.next()) else {
            continue;
        };
        let Ok(first) = std::str::from_utf8(first) else {
            continue;
        };
        let Some((method, target)) = first.split_once(' ') else {
            continue;
        };
        if target.contains("watch") {
            continue;
        }
        let content_type = content_type
            .and_then(|c| std::str::from_utf8(c).ok())
            .unwrap_or("application/json");
        serve(
            state,
            method,
            target,
            content_type,
            body.unwrap_or_default(),
        );
    }
}

/// The fuzz target: a fresh state, then the requests.
pub fn request(data: &[u8]) {
    request_sequence(&state_with_crds(), data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_the_custom_resources() {
        let state = state_with_crds();
        let vm = br#"{"apiVersion":"godwit.dev/v1alpha1","kind":"VirtualMachine","metadata":{"name":"a"},"spec":{"templateRef":{"name":"t"},"cpu":1,"memory":"64Mi"}}"#;
        let mut seed = b"POST /apis/godwit.dev/v1alpha1/namespaces/default/virtualmachines\napplication/json\n".to_vec();
        seed.extend_from_slice(vm);
        seed.extend_from_slice(b"\0PATCH /apis/godwit.dev/v1alpha1/namespaces/default/virtualmachines/a\napplication/merge-patch+json\n{\"spec\":{\"cpu\":null}}");
        seed.extend_from_slice(b"\0GET /api/v1/namespaces?labelSelector=a%20in%20(b\n\n");
        seed.extend_from_slice(b"\0\xff\xfe /x\n\n");
        request_sequence(&state, &seed);
        let parts =
            http::Request::get("/apis/godwit.dev/v1alpha1/namespaces/default/virtualmachines/a")
                .body(())
                .unwrap()
                .into_parts()
                .0;
        let response = handle_parts(&state, &parts, &Bytes::new());
        assert_eq!(response.status(), 200);
    }

    fn answer(state: &Arc<ServerState>, method: &str, target: &str, ct: &str, body: &[u8]) -> u16 {
        let (parts, ()) = http::Request::builder()
            .method(method)
            .uri(target)
            .header("content-type", ct)
            .body(())
            .unwrap()
            .into_parts();
        handle_parts(state, &parts, &Bytes::copy_from_slice(body))
            .status()
            .as_u16()
    }

    /// Found by `fuzz/run.sh` (apiserver_request): a server-side apply whose
    /// `metadata` is a string (`name:a` without the space) panicked.
    #[test]
    fn metadata_that_is_not_an_object_is_a_bad_request() {
        let state = state_with_crds();
        let cm = "/api/v1/namespaces/default/configmaps/c";
        let apply = "application/apply-patch+yaml";
        let bad = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name:a \ndata:\n  a: b\n";
        let query = "?fieldManager=k&force=true";
        assert_eq!(
            answer(&state, "PATCH", &format!("{cm}{query}"), apply, bad),
            400
        );
        let good = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  a: b\n";
        assert_eq!(
            answer(&state, "PATCH", &format!("{cm}{query}"), apply, good),
            201
        );
        // A patch of an existing object that turns metadata into a string.
        let merge = "application/merge-patch+json";
        assert_eq!(
            answer(&state, "PATCH", cm, merge, br#"{"metadata":"x"}"#),
            400
        );
        assert_eq!(answer(&state, "GET", cm, "", b""), 200);
        // A create with it.
        let body = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":7}"#;
        let post = "/api/v1/namespaces/default/configmaps";
        assert_eq!(answer(&state, "POST", post, "application/json", body), 400);
    }
}
