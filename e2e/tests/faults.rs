//! The quick subset of the fault-injection matrix (`godwit_e2e::faults`;
//! the whole matrix is `cargo run --release -p godwit-e2e --bin bench --
//! faults`): one cell per kind of outcome, each with every check (never two
//! VMMs, VM running again within HA's budget, memory check and disk pattern
//! in the guest, the VMMigration's final status).
//!
//! Needs the release binaries (`cargo build --release -p godwit-node -p
//! godwit-operator --bins`, as e2e/test.sh does) and /dev/kvm.

use godwit_e2e::faults::{self, Fault, Phase};

#[test]
fn quick_fault_cells_hold() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm does not exist: the fault matrix boots real VMs under KVM"
    );
    let dir = std::env::temp_dir().join(format!("godwit-faults-{}", std::process::id()));
    let cells = [
        // The guest stays where it was: the target dies before commit.
        (Fault::TargetVmmKilled, Phase::PreCopy),
        // The migration completes: the source's agent dies and comes back.
        (Fault::SourceAgentKilled, Phase::PreCopy),
        // The link goes down for 4 s while the guest already runs on the target.
        (Fault::LinkCut, Phase::PostCopy),
        // The only complete copy of memory is lost: HA's restart.
        (Fault::SourceVmmKilled, Phase::PostCopy),
        // The target has no room for the disk: the guest stays, and the
        // VMMigration says why.
        (Fault::TargetDiskFull, Phase::PreCopy),
    ];
    let reports = faults::run(&dir, &cells).expect("the local cluster runs");
    faults::print(&reports);
    for r in &reports {
        assert!(r.passed(), "{r:?}");
    }
}
