//! Lines recorded from the release before this crate existed (commit
//! 70709c6: the agent built its requests by hand, the VMM answered with
//! hand-built JSON), replayed against today's types. Each line of
//! `recorded-v1.jsonl` is one exchange, `{"request": LINE, "response": LINE}`,
//! captured from a real `godwit-vmm` running the test guest: every command,
//! the refusals, and a whole live migration polled until it completed.
//!
//! Both directions of a mixed upgrade are checked:
//! - a new agent and a VMM still running the old release: what the new
//!   client sends for a command is what the old agent sent (so the old VMM
//!   reads it), and the old VMM's answer parses as the typed result;
//! - an old agent and a new VMM: the old requests parse, and the typed
//!   result serialises back to exactly the recorded answer.

use godwit_vmm_control::results::{
    Cancelling, ChangedBlocks, DirtyLog, DirtySet, DiskTracking, Runs, Saved, ShuttingDown,
    Started, Stats, VmmStatus,
};
use godwit_vmm_control::{parse_request, Command, Progress, Request, Response, Stage};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

const RECORDED: &str = include_str!("recorded-v1.jsonl");

fn exchanges() -> Vec<(String, Response)> {
    RECORDED
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let e: Value = serde_json::from_str(l).expect("a recorded exchange is JSON");
            let request = e["request"].as_str().expect("request line").to_string();
            let response = serde_json::from_str(e["response"].as_str().expect("response line"))
                .expect("a recorded response is a response envelope");
            (request, response)
        })
        .collect()
}

/// `value` without its null fields and empty arrays (the old agent sent
/// unset options as null; the new client leaves them out, and both read the
/// same).
fn without_unset(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
                .map(|(k, v)| (k.clone(), without_unset(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The recorded result parses as `T` and serialises back to itself.
fn same_result<T: DeserializeOwned + Serialize>(cmd: &str, result: &Value) -> T {
    let typed: T = serde_json::from_value(result.clone())
        .unwrap_or_else(|e| panic!("{cmd}: recorded result {result} does not parse: {e}"));
    assert_eq!(
        &serde_json::to_value(&typed).unwrap(),
        result,
        "{cmd}: the typed result does not serialise to the recorded answer"
    );
    typed
}

#[test]
fn every_recorded_request_reads_the_same_both_ways() {
    let mut commands = std::collections::BTreeSet::new();
    for (line, response) in exchanges() {
        let Ok(request) = parse_request(&line) else {
            // A request the old VMM refused: the new one refuses it too.
            assert!(!response.ok, "{line} was accepted by the old VMM");
            continue;
        };
        commands.insert(request.cmd.name());
        let old: Value = serde_json::from_str(&line).unwrap();
        let new = serde_json::to_value(Request::new(request.cmd.clone())).unwrap();
        assert_eq!(
            without_unset(&old),
            new,
            "the new client sends {} differently from the old agent",
            request.cmd.name()
        );
    }
    for cmd in [
        "status",
        "stats",
        "pause",
        "resume",
        "stop",
        "take-dirty",
        "dirty-log-start",
        "dirty-log-stop",
        "disk-dirty-start",
        "disk-dirty-stop",
        "disk-take-dirty",
        "migrate-send",
        "migrate-status",
        "migrate-cancel",
    ] {
        assert!(commands.contains(cmd), "no recorded exchange for {cmd}");
    }
}

#[test]
fn every_recorded_answer_parses_as_its_typed_result() {
    let mut stages = Vec::new();
    for (line, response) in exchanges() {
        let Ok(request) = parse_request(&line) else {
            continue;
        };
        let name = request.cmd.name();
        if !response.ok {
            assert!(
                response.error.is_some(),
                "{name}: a refusal without a reason"
            );
            continue;
        }
        let result = response.result.as_ref().expect("a success has a result");
        match request.cmd {
            Command::Status => {
                let s: VmmStatus = same_result(name, result);
                assert!(s.pid > 0 && s.config.get("memory_mib").is_some(), "{s:?}");
            }
            Command::Stats => {
                let s: Stats = same_result(name, result);
                assert!(s.memory_mib > 0 && !s.vcpu_exits.is_empty(), "{s:?}");
            }
            Command::Pause | Command::Resume | Command::Stop => {
                same_result::<Runs>(name, result);
            }
            Command::Shutdown { .. } => {
                same_result::<ShuttingDown>(name, result);
            }
            Command::SaveState { .. } => {
                same_result::<Saved>(name, result);
            }
            Command::DirtyLogStart | Command::DirtyLogStop => {
                same_result::<DirtyLog>(name, result);
            }
            Command::TakeDirty => {
                let d: DirtySet = same_result(name, result);
                assert!(!d.regions.is_empty(), "{d:?}");
            }
            Command::DiskDirtyStart { .. } | Command::DiskDirtyStop { .. } => {
                same_result::<DiskTracking>(name, result);
            }
            Command::DiskTakeDirty { .. } => {
                same_result::<ChangedBlocks>(name, result);
            }
            Command::MigrateSend(_) => {
                same_result::<Started>(name, result);
            }
            Command::MigrateStatus => {
                let p: Progress = same_result(name, result);
                stages.push(p.stage);
                if p.stage == Stage::Completed {
                    let r = p.result.expect("a completed migration has its result");
                    assert!(r.bytes_sent > 0 && r.downtime_ms > 0.0, "{r:?}");
                }
            }
            Command::MigrateCancel => {
                same_result::<Cancelling>(name, result);
            }
        }
    }
    assert_eq!(
        stages.last(),
        Some(&Stage::Completed),
        "the recorded migration ends completed: {stages:?}"
    );
}
