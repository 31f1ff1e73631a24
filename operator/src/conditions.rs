//! Standard `metav1.Condition`s: the operator sets one condition type at a
//! time and leaves the others (the agent's `Ready`, ...) as they are; see
//! `godwit_crds::conditions` for who owns which.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition the operator wants to show, without bookkeeping fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// Condition type (`Scheduled`, `Admitted`).
    pub type_: &'static str,
    /// `True` or `False`.
    pub status: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// For humans.
    pub message: String,
}

impl Wanted {
    /// A `True` condition.
    pub fn yes(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Wanted {
        Wanted {
            type_,
            status: true,
            reason,
            message: message.into(),
        }
    }

    /// A `False` condition.
    pub fn no(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Wanted {
        Wanted {
            type_,
            status: false,
            reason,
            message: message.into(),
        }
    }

    fn status_text(&self) -> &'static str {
        if self.status {
            "True"
        } else {
            "False"
        }
    }

    /// Whether `conditions` already say this (same status, reason, message).
    pub fn is_shown_in(&self, conditions: &[Condition]) -> bool {
        conditions.iter().any(|c| {
            c.type_ == self.type_
                && c.status == self.status_text()
                && c.reason == self.reason
                && c.message == self.message
        })
    }
}

impl Wanted {
    /// The condition to write: its transition time moves only when the
    /// status changes from what `current` shows.
    pub fn condition(
        &self,
        current: &[Condition],
        generation: Option<i64>,
        now: Timestamp,
    ) -> Condition {
        godwit_crds::conditions::keep_transition_time(
            Condition {
                type_: self.type_.to_string(),
                status: self.status_text().to_string(),
                reason: self.reason.to_string(),
                message: self.message.clone(),
                last_transition_time: Time(now),
                observed_generation: generation,
            },
            current,
        )
    }
}

/// `conditions` with `wanted` set (for kinds whose conditions only the
/// operator writes: a whole-list write guarded by the resourceVersion);
/// other types are kept in their order. VM conditions, which the node
/// agent writes too, are applied one by one instead
/// ([`crate::context::Context::apply_condition`]).
pub fn merge(
    conditions: &[Condition],
    wanted: &Wanted,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = conditions.to_vec();
    let condition = wanted.condition(conditions, generation, now);
    match out.iter().position(|c| c.type_ == wanted.type_) {
        Some(i) => out[i] = condition,
        None => out.push(condition),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_700_000_100).unwrap();
        let ready = Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Running".into(),
            message: String::new(),
            last_transition_time: Time(t0),
            observed_generation: None,
        };
        let no = Wanted::no("Scheduled", "Unschedulable", "full");
        let once = merge(&[ready], &no, Some(1), t0);
        assert_eq!(once.len(), 2, "the agent's Ready stays");
        assert!(no.is_shown_in(&once));
        let again = merge(
            &once,
            &Wanted::no("Scheduled", "Unschedulable", "still full"),
            Some(1),
            t1,
        );
        assert_eq!(again[1].last_transition_time, Time(t0));
        let yes = merge(
            &again,
            &Wanted::yes("Scheduled", "Scheduled", "a"),
            Some(1),
            t1,
        );
        assert_eq!(yes[1].last_transition_time, Time(t1));
        assert_eq!(yes[1].status, "True");
    }
}
