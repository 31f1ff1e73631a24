//! What the operator reads from an error's cause chain: whether the API
//! server refused a write because the object changed ([`is_conflict`]).
//! Errors are worded for logs by [`godwit_crds::error_chain`].

/// Whether `error` (or a cause of it) is the API server's `409 Conflict`:
/// the object changed since it was read, so the decision is made again on
/// the new version. Expected when an agent writes at the same moment.
pub fn is_conflict(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(kube::Error::Api(status)) = e.downcast_ref::<kube::Error>() {
            if status.code == 409 {
                return true;
            }
        }
        cause = e.source();
    }
    false
}
