//! The migration benchmark's errors, and how a failed run reports one.

use godwit_testkit::guest::GuestError;
use godwit_testkit::netns::NetnsError;
use godwit_testkit::qemu::QemuError;
use godwit_testkit::vmmproc::VmmProcError;
use godwit_vmm_control::ControlError;

/// Errors of the migration benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("Network namespace setup failed")]
    Netns(#[from] NetnsError),
    #[error("QEMU failed")]
    Qemu(#[from] QemuError),
    #[error("Test guest failed")]
    Guest(#[from] GuestError),
    #[error("godwit-vmm process failed")]
    VmmProc(#[from] VmmProcError),
    #[error("godwit-vmm control call failed")]
    Control(#[from] ControlError),
    #[error("I/O failed: {0}")]
    Io(String, #[source] std::io::Error),
    #[error("godwit-vmm: {0}")]
    Vmm(String),
    #[error("Building godwit-vmm failed: {0}")]
    Build(String),
}
