//! Cold migration through the cluster (VMMigration `mode: Cold`): a stopped
//! VM whose root disk is on node-local storage moves to another node with
//! its disk. Afterwards `qemu-img compare` finds the target's disk equal to
//! the source's as it was when the VM stopped, `qemu-img check` finds it
//! sound, the source's copy is gone, the VM is still Stopped (now on the
//! target), and started there its guest reads back what it wrote before the
//! move. A cold migration of a running VM is refused with a hint, and one to
//! a node whose cached template base is corrupt fails verification and
//! leaves the VM and its disk on the source.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node -p
//! godwit-operator --bins`, as e2e/test.sh does), /dev/kvm and qemu-img.

use std::process::Command;
use std::time::Duration;

use godwit_e2e::driver::{console_has, type_at, ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM};

fn cold_migration(name: &str) -> String {
    format!(
        "apiVersion: godwit.dev/v1alpha1\nkind: VMMigration\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  vmName: demo\n  mode: Cold\n"
    )
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs (apt install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn run_strategy(g: &ClusterDriver, strategy: &str) {
    let patch = format!("{{\"spec\":{{\"runStrategy\":\"{strategy}\"}}}}");
    g.kubectl(
        &["patch", "gvm", "demo", "--type", "merge", "-p", &patch],
        None,
    )
    .unwrap();
}

fn wait_final(g: &ClusterDriver, name: &str) -> serde_json::Value {
    g.wait("the migration to end", Duration::from_secs(120), || {
        let m = g.get("vmmigration", name)?;
        Ok(m.filter(|m| {
            matches!(
                m["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed" | "Cancelled")
            )
        }))
    })
    .unwrap()
}

#[test]
fn a_stopped_vm_moves_with_its_disk_verified_and_the_source_copy_goes() {
    let dir = std::env::temp_dir().join(format!("godwit-cold-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("local cluster with Godwit");
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    let local_vm = g
        .example(EXAMPLE_VM)
        .replace("storage: Shared", "storage: Local");
    assert!(local_vm.contains("storage: Local"));
    g.apply(&local_vm).unwrap();
    let vm = g.wait_running("demo", Duration::from_secs(90)).unwrap();
    let from = vm["status"]["nodeName"].as_str().unwrap().to_string();
    let src = g.vm_dir(g.node_index(&from).unwrap(), "default", "demo");
    let src_disk = src.join("disks/root.qcow2");
    g.wait("the guest's console", Duration::from_secs(30), || {
        Ok(console_has(&src, "HB ").then_some(()))
    })
    .unwrap();
    type_at(&src, "blkwrite 4096 256 7").unwrap();
    g.wait("the pattern written", Duration::from_secs(30), || {
        Ok(console_has(&src, "BLK write ok sector=4096").then_some(()))
    })
    .unwrap();

    // A running VM is refused, with what to do instead.
    g.apply(&cold_migration("too-early")).unwrap();
    let refused = wait_final(&g, "too-early");
    assert_eq!(refused["status"]["phase"], "Failed", "{refused}");
    let why = refused["status"]["failureReason"].as_str().unwrap_or("");
    assert!(why.contains("a cold migration moves a stopped VM"), "{why}");
    g.kubectl(&["delete", "vmmigration", "too-early"], None)
        .unwrap();

    // Stop it, and keep what its disk holds now as the oracle.
    run_strategy(&g, "Halted");
    g.wait("the VM to stop", Duration::from_secs(60), || {
        let vm = g.get("gvm", "demo")?;
        Ok(vm.filter(|v| v["status"]["phase"] == "Stopped"))
    })
    .unwrap();
    let oracle = dir.join("oracle.raw");
    let (ok, text) = qemu_img(&[
        "convert",
        "-O",
        "raw",
        src_disk.to_str().unwrap(),
        oracle.to_str().unwrap(),
    ]);
    assert!(ok, "qemu-img convert of the source disk: {text}");

    // A target whose cached template base is corrupt (same digest in its
    // name, other bytes: bit rot after it was cached) gets only the
    // overlay, and verification catches the difference: the migration
    // fails, the VM stays stopped on the source with its disk, and the
    // target keeps nothing.
    let (i, j) = (
        g.node_index(&from).unwrap(),
        1 - g.node_index(&from).unwrap(),
    );
    let (src_cache, dst_cache) = (
        g.cluster.node_state_dir(i).join("cache"),
        g.cluster.node_state_dir(j).join("cache"),
    );
    std::fs::create_dir_all(dst_cache.join("sources")).unwrap();
    let mut corrupted = Vec::new();
    for sub in ["", "sources"] {
        for e in std::fs::read_dir(src_cache.join(sub)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("sha256-") || sub == "sources" {
                let to = dst_cache.join(sub).join(&name);
                std::fs::copy(e.path(), &to).unwrap();
                if sub.is_empty() {
                    corrupted.push(to);
                }
            }
        }
    }
    assert_eq!(corrupted.len(), 1, "one cached template on {from}");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&corrupted[0])
            .unwrap();
        f.write_all_at(&[0xff; 512], 1 << 20).unwrap();
    }
    g.apply(&cold_migration("bad-cache")).unwrap();
    let failed = wait_final(&g, "bad-cache");
    assert_eq!(failed["status"]["phase"], "Failed", "{failed}");
    let why = failed["status"]["failureReason"].as_str().unwrap_or("");
    assert!(
        why.contains("reads differently on the target") && why.contains("stays stopped on"),
        "{why}"
    );
    let vm = g
        .wait("the VM released", Duration::from_secs(30), || {
            let vm = g.get("gvm", "demo")?;
            Ok(vm.filter(|v| v["status"]["migration"].is_null()))
        })
        .unwrap();
    assert_eq!(vm["status"]["nodeName"], from.as_str(), "{vm}");
    assert_eq!(vm["status"]["phase"], "Stopped", "{vm}");
    let dst = g.vm_dir(j, "default", "demo");
    g.wait(
        "the target's files removed",
        Duration::from_secs(30),
        || Ok((!dst.exists()).then_some(())),
    )
    .unwrap();
    let (same, text) = qemu_img(&[
        "compare",
        oracle.to_str().unwrap(),
        src_disk.to_str().unwrap(),
    ]);
    assert!(same, "the source disk changed: {text}");
    std::fs::remove_file(&corrupted[0]).unwrap();
    std::fs::remove_dir_all(dst_cache.join("sources")).unwrap();

    g.apply(&cold_migration("move-cold")).unwrap();
    let done = wait_final(&g, "move-cold");
    assert_eq!(done["status"]["phase"], "Succeeded", "{done}");
    assert_eq!(done["status"]["result"]["modeUsed"], "Cold", "{done}");
    let to = done["status"]["targetNode"].as_str().unwrap().to_string();
    assert_ne!(to, from);
    let vm = g
        .wait(
            "the VM placed on the target",
            Duration::from_secs(30),
            || {
                let vm = g.get("gvm", "demo")?;
                Ok(vm.filter(|v| v["status"]["nodeName"] == to.as_str()))
            },
        )
        .unwrap();
    assert_eq!(vm["status"]["phase"], "Stopped", "{vm}");
    assert!(vm["status"]["migration"].is_null(), "{vm}");

    assert_eq!(g.node_index(&to).unwrap(), j);
    let dst_disk = dst.join("disks/root.qcow2");
    let (ok, text) = qemu_img(&["check", dst_disk.to_str().unwrap()]);
    assert!(ok, "qemu-img check of the target disk: {text}");
    let (same, text) = qemu_img(&[
        "compare",
        oracle.to_str().unwrap(),
        dst_disk.to_str().unwrap(),
    ]);
    assert!(same, "the target disk differs from the source's: {text}");
    g.wait("the source disk removed", Duration::from_secs(30), || {
        Ok((!src_disk.exists()).then_some(()))
    })
    .unwrap();

    // Started on the target, the guest reads back what it wrote.
    run_strategy(&g, "Always");
    let vm = g.wait_running("demo", Duration::from_secs(90)).unwrap();
    assert_eq!(vm["status"]["nodeName"], to.as_str());
    g.wait("the guest's console", Duration::from_secs(30), || {
        Ok(console_has(&dst, "HB ").then_some(()))
    })
    .unwrap();
    type_at(&dst, "blkverify 4096 256 7").unwrap();
    g.wait("the pattern verified", Duration::from_secs(30), || {
        assert!(
            !console_has(&dst, "BLK verify bad"),
            "{}",
            std::fs::read_to_string(dst.join("console.log")).unwrap_or_default()
        );
        Ok(console_has(&dst, "BLK verify ok sector=4096").then_some(()))
    })
    .unwrap();
    println!(
        "cold migration: total {} ms, {} bytes sent",
        done["status"]["result"]["totalTimeMs"], done["status"]["result"]["transferredBytes"]
    );
}
