//! The README's main job, `godwit-local demo`, run as a test: on a local
//! cluster with the operator and node agents, the example VM is applied with
//! kubectl, runs, and live-migrates through a VMMigration with a TCP client
//! attached. It runs the Godwit binaries, which must be built first (`cargo
//! build --release -p godwit-node -p godwit-operator --bins`, as e2e/test.sh
//! does) or found in `$GODWIT_BIN_DIR`.

use godwit_e2e::cluster::godwit_binary;

#[test]
fn demo_migrates_the_vm_and_keeps_its_connection() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: the demo boots a real VM under KVM"
    );
    for bin in ["godwit-vmm", "godwit-node", "godwit-operator"] {
        let path = godwit_binary(bin);
        assert!(
            path.exists(),
            "{} not found: build it first (cargo build --release -p godwit-node -p godwit-operator --bins) or set GODWIT_BIN_DIR",
            path.display()
        );
    }
    let report = godwit_e2e::demo::run(true).expect("demo runs");
    assert_eq!(report.migration_phase, "Succeeded", "{report:?}");
    assert_eq!(report.vm_phase, "Running", "{report:?}");
    assert!(report.tcp_connection_survived, "{report:?}");
    assert!(report.heartbeat_continued, "{report:?}");
    assert_ne!(report.source_node, report.target_node);
    assert!(report.total_ms > 0, "{report:?}");
    assert!(
        report.progress_seen,
        "no progress in the VMMigration status while it ran: {report:?}"
    );
}
