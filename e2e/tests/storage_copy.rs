//! Storage vMotion through the cluster: a VM whose root disk is on node-local
//! storage is live-migrated with `spec.storage: Copy` while its guest writes
//! to that disk; on the target the guest reads back everything it wrote,
//! before and during the migration, and the source's copy of the disk is
//! gone. Without `storage: Copy` the migration is refused with a hint.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node -p
//! godwit-operator --bins`, as e2e/test.sh does) and /dev/kvm.

use std::time::{Duration, Instant};

use godwit_e2e::driver::{console_has, type_at, ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM};
use serde_json::Value;

fn migration(name: &str, storage: Option<&str>) -> String {
    let storage = storage
        .map(|s| format!("  storage: {s}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: godwit.dev/v1alpha1\nkind: VMMigration\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  vmName: demo\n{storage}  policy:\n    bandwidthMbps: 500\n    allowPostCopy: false\n"
    )
}

#[test]
fn a_vm_on_local_storage_moves_with_its_disk() {
    let dir = std::env::temp_dir().join(format!("godwit-storage-copy-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("local cluster with Godwit");
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    let local_vm = g
        .example(EXAMPLE_VM)
        .replace("storage: Shared", "storage: Local");
    assert!(local_vm.contains("storage: Local"));
    g.apply(&local_vm).unwrap();
    let vm = g.wait_running("demo", Duration::from_secs(90)).unwrap();
    let from = vm["status"]["nodeName"].as_str().unwrap().to_string();
    let i = g.node_index(&from).unwrap();
    let src = g.vm_dir(i, "default", "demo");
    let src_disk = src.join("disks/root.qcow2");
    assert!(
        src_disk.exists(),
        "{} was not provisioned",
        src_disk.display()
    );

    // Before: a pattern on the disk.
    g.wait("the guest's console", Duration::from_secs(30), || {
        Ok(console_has(&src, "HB ").then_some(()))
    })
    .unwrap();
    type_at(&src, "blkwrite 4096 256 7").unwrap();
    g.wait("the first pattern written", Duration::from_secs(30), || {
        Ok(console_has(&src, "BLK write ok sector=4096").then_some(()))
    })
    .unwrap();

    // Without storage: Copy the operator refuses, and says what to set.
    g.apply(&migration("no-copy", None)).unwrap();
    let refused = g
        .wait("the refusal", Duration::from_secs(30), || {
            let m = g.get("vmmigration", "no-copy")?;
            Ok(m.filter(|m| m["status"]["phase"] == "Failed"))
        })
        .unwrap();
    let why = refused["status"]["failureReason"].to_string();
    assert!(why.contains("storage: Copy"), "{refused}");
    g.kubectl(&["delete", "vmmigration", "no-copy"], None)
        .unwrap();
    g.wait_running("demo", Duration::from_secs(30)).unwrap();

    // The move, with a second pattern written while it copies.
    g.apply(&migration("move-disk", Some("Copy"))).unwrap();
    // A watch, not polling: a small disk may be copied, and the migration
    // past PreCopy, within one `kubectl get`.
    let watch = g.watch("vmmigration", "move-disk").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Value::Null;
    let copying = loop {
        assert!(
            Instant::now() < deadline,
            "the copy did not start within 60 s; the migration: {last}; logs in {}",
            dir.display()
        );
        let Some(m) = watch.next(Duration::from_secs(1)).unwrap() else {
            continue;
        };
        let phase = m["status"]["phase"]
            .as_str()
            .unwrap_or("Pending")
            .to_string();
        assert!(
            !matches!(phase.as_str(), "Failed" | "Cancelled"),
            "the move ended {phase}: {m}"
        );
        last = m;
        if !matches!(phase.as_str(), "Pending" | "Scheduling" | "PreparingTarget") {
            break last.clone();
        }
    };
    drop(watch);
    let to = copying["status"]["targetNode"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(to, from);
    let dst = g.vm_dir(g.node_index(&to).unwrap(), "default", "demo");
    // Written while it copies, or on the target if the move is already over.
    let writer = if copying["status"]["phase"] == "Succeeded" {
        &dst
    } else {
        &src
    };
    type_at(writer, "blkwrite 8192 256 9").unwrap();
    // It completes on the source before the switch-over (and is copied in
    // a round or in stop-and-copy), or on the target after it.
    g.wait(
        "the second pattern written",
        Duration::from_secs(30),
        || {
            Ok((console_has(&src, "BLK write ok sector=8192")
                || console_has(&dst, "BLK write ok sector=8192"))
            .then_some(()))
        },
    )
    .unwrap();
    let done = g
        .wait("the migration to end", Duration::from_secs(120), || {
            let m = g.get("vmmigration", "move-disk")?;
            Ok(m.filter(|m| {
                matches!(
                    m["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed" | "Cancelled")
                )
            }))
        })
        .unwrap();
    assert_eq!(done["status"]["phase"], "Succeeded", "{done}");
    let vm = g.wait_running("demo", Duration::from_secs(30)).unwrap();
    assert_eq!(vm["status"]["nodeName"], to.as_str());
    assert!(dst.join("disks/root.qcow2").exists());

    // After: the guest, now on the target's disk, reads back both patterns.
    type_at(&dst, "blkverify 4096 256 7").unwrap();
    type_at(&dst, "blkverify 8192 256 9").unwrap();
    g.wait("both patterns verified", Duration::from_secs(30), || {
        assert!(
            !console_has(&dst, "BLK verify bad"),
            "{}",
            std::fs::read_to_string(dst.join("console.log")).unwrap_or_default()
        );
        Ok((console_has(&dst, "BLK verify ok sector=4096")
            && console_has(&dst, "BLK verify ok sector=8192"))
        .then_some(()))
    })
    .unwrap();
    // The source's copy goes once the VM is no longer placed there.
    g.wait("the source disk removed", Duration::from_secs(30), || {
        Ok((!src_disk.exists()).then_some(()))
    })
    .unwrap();
    println!(
        "storage copy: downtime {} ms, total {} ms, {} bytes sent",
        done["status"]["result"]["downtimeMs"],
        done["status"]["result"]["totalTimeMs"],
        done["status"]["result"]["transferredBytes"]
    );
}
