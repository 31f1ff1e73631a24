//! What the operator reads from any error's cause chain: the causes as one
//! line for logs ([`error_chain`]) and whether the API server refused a write
//! because the object changed ([`is_conflict`]).

/// The causes of `e` (not `e` itself), joined by `": "`, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push(c.to_string());
        cause = c.source();
    }
    out.join(": ")
}

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
