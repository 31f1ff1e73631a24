//! The README's main job, `godwit-local demo`, run as a test: a VM boots on
//! one namespace node and live-migrates to another with a TCP client attached.
//! It drives the godwit-vmm binary, which must be built first (`cargo build -p
//! godwit-node --bin godwit-vmm`, as e2e/test.sh does) or named in
//! `$GODWIT_VMM`.

#[test]
fn demo_migrates_the_vm_and_keeps_its_connection() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: the demo boots a real VM under KVM"
    );
    let vmm = godwit_e2e::vmmproc::vmm_binary();
    assert!(
        vmm.exists(),
        "{} not found: build it first (cargo build -p godwit-node --bin godwit-vmm) or set GODWIT_VMM",
        vmm.display()
    );
    let report = godwit_e2e::demo::run(true).expect("demo runs");
    assert_eq!(report.migration_phase, "Succeeded", "{report:?}");
    assert_eq!(report.vm_phase, "Running", "{report:?}");
    assert!(report.tcp_connection_survived, "{report:?}");
    assert!(report.heartbeat_continued, "{report:?}");
    assert_ne!(report.source_node, report.target_node);
    assert!(
        report.downtime_ms > 0.0 && report.total_ms > 0,
        "{report:?}"
    );
}
