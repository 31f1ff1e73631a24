//! Finished migrations are garbage-collected: with the operator's
//! `--finished-migrations-kept 2`, a VM live-migrated three times keeps the
//! VMMigrations of its newest two moves, and the oldest is deleted.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node
//! -p godwit-operator --bins`, as e2e/test.sh does), the test guest
//! (e2e/testguest/build.sh) and /dev/kvm.

use std::time::Duration;

use godwit_e2e::driver::{ClusterDriver, EXAMPLE_MIGRATION, EXAMPLE_TEMPLATE, EXAMPLE_VM};
use serde_json::Value;

fn migrations_of_demo(g: &ClusterDriver) -> Vec<String> {
    let text = g.kubectl(&["get", "gvmm", "-o", "json"], None).unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    let mut names: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["spec"]["vmName"] == "demo")
        .filter_map(|m| m["metadata"]["name"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

#[test]
fn a_vm_keeps_only_its_newest_finished_migrations() {
    let dir = std::env::temp_dir().join(format!("godwit-history-{}", std::process::id()));
    let g = ClusterDriver::up_with(2, &dir, &["--finished-migrations-kept", "2"])
        .expect("local cluster with Godwit");
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(EXAMPLE_VM)).unwrap();
    g.wait_running("demo", Duration::from_secs(90)).unwrap();

    for n in 1..=3 {
        let name = format!("move-{n}");
        g.apply(&EXAMPLE_MIGRATION.replace("name: demo-move", &format!("name: {name}")))
            .unwrap();
        g.wait(
            &format!("{name} to succeed"),
            Duration::from_secs(90),
            || {
                let m = g.get("gvmm", &name)?;
                let phase = m.as_ref().map(|m| m["status"]["phase"].clone());
                match phase.as_ref().and_then(Value::as_str) {
                    Some("Succeeded") => Ok(Some(())),
                    Some(p @ ("Failed" | "Cancelled")) => {
                        anyhow::bail!("{name} ended {p}: {}", m.unwrap()["status"])
                    }
                    _ => Ok(None),
                }
            },
        )
        .unwrap();
        // The VM is Running again before the next move is asked for.
        g.wait_running("demo", Duration::from_secs(30)).unwrap();
        // Each one finished keeps at most the newest two.
        let kept = g
            .wait(
                &format!("at most two finished migrations after {name}"),
                Duration::from_secs(20),
                || {
                    let names = migrations_of_demo(&g);
                    Ok((names.len() <= 2).then_some(names))
                },
            )
            .unwrap();
        assert!(kept.contains(&name), "{name} itself was deleted: {kept:?}");
    }
    assert_eq!(migrations_of_demo(&g), ["move-2", "move-3"]);
}
