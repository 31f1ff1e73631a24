//! A migration's figures ([`crate::progress`]) as the VMMigration status
//! types of `godwit_crds`: the stage as the phase, the figures as
//! `status.progress`, the end as `status.result`. The node agent reports
//! what a source VMM says through these (feature `crds`).

use godwit_crds::{MigrationModeUsed, MigrationPhase, MigrationProgress, MigrationResult};

use crate::progress::{self, ModeUsed, Progress, Stage};

/// The phase a source's stage stands for. Before the first round (`Idle`,
/// `Handshake`) the status says `PreCopy`, the phase the agent wrote when
/// it asked the VMM to send.
impl From<Stage> for MigrationPhase {
    fn from(stage: Stage) -> MigrationPhase {
        match stage {
            Stage::Idle | Stage::Handshake | Stage::PreCopy => MigrationPhase::PreCopy,
            Stage::StopAndCopy => MigrationPhase::StopAndCopy,
            Stage::PostCopy => MigrationPhase::PostCopy,
            Stage::Committing => MigrationPhase::Committing,
            Stage::Completed => MigrationPhase::Succeeded,
            Stage::Failed => MigrationPhase::Failed,
        }
    }
}

impl From<ModeUsed> for MigrationModeUsed {
    fn from(mode: ModeUsed) -> MigrationModeUsed {
        match mode {
            ModeUsed::PreCopy => MigrationModeUsed::PreCopy,
            ModeUsed::AutoConverge => MigrationModeUsed::AutoConverge,
            ModeUsed::PostCopy => MigrationModeUsed::PostCopy,
            ModeUsed::Cold => MigrationModeUsed::Cold,
        }
    }
}

/// The figures `status.progress` shows. The disk figures stay 0: the
/// status reports the memory side.
impl From<&Progress> for MigrationProgress {
    fn from(p: &Progress) -> MigrationProgress {
        MigrationProgress {
            round: p.round,
            memory_total_bytes: p.memory_total_bytes,
            memory_remaining_bytes: p.memory_remaining_bytes,
            disk_total_bytes: 0,
            disk_remaining_bytes: 0,
            transferred_bytes: p.transferred_bytes,
            dirty_rate_bytes_per_second: p.dirty_rate_bytes_per_second,
            bandwidth_bytes_per_second: p.bandwidth_bytes_per_second,
            expected_downtime_ms: p.expected_downtime_ms,
        }
    }
}

/// The figures `status.result` shows; the downtime rounded to whole
/// milliseconds.
impl From<&progress::MigrationSummary> for MigrationResult {
    fn from(r: &progress::MigrationSummary) -> MigrationResult {
        MigrationResult {
            total_time_ms: r.total_ms,
            downtime_ms: r.downtime_ms.round() as u64,
            transferred_bytes: r.bytes_sent,
            rounds: r.rounds,
            mode_used: r.mode.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stage_is_the_phase_it_stands_for() {
        let cases = [
            (Stage::Idle, MigrationPhase::PreCopy),
            (Stage::Handshake, MigrationPhase::PreCopy),
            (Stage::PreCopy, MigrationPhase::PreCopy),
            (Stage::StopAndCopy, MigrationPhase::StopAndCopy),
            (Stage::PostCopy, MigrationPhase::PostCopy),
            (Stage::Committing, MigrationPhase::Committing),
            (Stage::Completed, MigrationPhase::Succeeded),
            (Stage::Failed, MigrationPhase::Failed),
        ];
        for (stage, phase) in cases {
            assert_eq!(MigrationPhase::from(stage), phase, "{stage:?}");
        }
    }

    #[test]
    fn each_mode_is_the_same_mode() {
        let cases = [
            (ModeUsed::PreCopy, MigrationModeUsed::PreCopy),
            (ModeUsed::AutoConverge, MigrationModeUsed::AutoConverge),
            (ModeUsed::PostCopy, MigrationModeUsed::PostCopy),
            (ModeUsed::Cold, MigrationModeUsed::Cold),
        ];
        for (mode, used) in cases {
            assert_eq!(MigrationModeUsed::from(mode), used, "{mode:?}");
        }
    }

    #[test]
    fn progress_carries_the_memory_figures() {
        let p = Progress {
            stage: Stage::PreCopy,
            round: 3,
            memory_total_bytes: 1 << 30,
            memory_remaining_bytes: 4 << 20,
            transferred_bytes: 900 << 20,
            dirty_rate_bytes_per_second: 20 << 20,
            bandwidth_bytes_per_second: 1 << 30,
            expected_downtime_ms: 12,
            throttle_percent: 30,
            disk_remaining_bytes: 8 << 20,
            ..Progress::default()
        };
        assert_eq!(
            MigrationProgress::from(&p),
            MigrationProgress {
                round: 3,
                memory_total_bytes: 1 << 30,
                memory_remaining_bytes: 4 << 20,
                disk_total_bytes: 0,
                disk_remaining_bytes: 0,
                transferred_bytes: 900 << 20,
                dirty_rate_bytes_per_second: 20 << 20,
                bandwidth_bytes_per_second: 1 << 30,
                expected_downtime_ms: 12,
            }
        );
    }

    #[test]
    fn the_result_rounds_the_downtime_and_keeps_the_mode() {
        let r = progress::MigrationSummary {
            total_ms: 1234,
            downtime_ms: 41.5,
            bytes_sent: 5 << 20,
            rounds: 4,
            mode: ModeUsed::PostCopy,
            pages_sent: 1000,
            zero_pages: 2000,
            ..progress::MigrationSummary::default()
        };
        assert_eq!(
            MigrationResult::from(&r),
            MigrationResult {
                total_time_ms: 1234,
                downtime_ms: 42,
                transferred_bytes: 5 << 20,
                rounds: 4,
                mode_used: MigrationModeUsed::PostCopy,
            }
        );
        let r = progress::MigrationSummary {
            downtime_ms: 41.4,
            ..r
        };
        assert_eq!(MigrationResult::from(&r).downtime_ms, 41);
    }

    #[test]
    fn no_result_reads_as_an_empty_pre_copy_result() {
        // The agent reads a completed progress without a result as the
        // default result: zeros, pre-copy.
        assert_eq!(
            MigrationResult::from(&progress::MigrationSummary::default()),
            MigrationResult::default()
        );
    }
}
