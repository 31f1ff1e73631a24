//! How every Godwit binary words an error for a person: the error and each
//! of its causes, outermost first, on one line. Statuses, Events, logs and
//! the CLI all use it, so a reason reads the same wherever it shows up.

/// `e` and its chain of sources, joined by `": "`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("Cannot start the VM")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_cause_follows_once() {
        let e = Outer(std::io::Error::other("no space left"));
        assert_eq!(error_chain(&e), "Cannot start the VM: no space left");
        assert_eq!(error_chain(&e.0), "no space left");
    }
}
