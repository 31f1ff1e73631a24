//! The live view of a migration that the engine updates and a caller polls.
//! The figures themselves are the control protocol's
//! ([`godwit_vmm_control::progress`]): the VMM returns them as they are.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use godwit_vmm_control::progress::{
    DowntimeBreakdown, MigrationSummary, ModeUsed, Progress, Stage, StorageResult,
};

/// Shared, pollable progress.
#[derive(Debug, Default)]
pub struct ProgressHandle {
    inner: Mutex<Progress>,
    started: Mutex<Option<Instant>>,
}

impl ProgressHandle {
    /// A copy of the current figures.
    pub fn get(&self) -> Progress {
        self.inner.lock().unwrap().clone()
    }

    /// Changes the figures.
    pub fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.inner.lock().unwrap());
    }

    /// Marks the start (for the elapsed time).
    pub fn start(&self) {
        *self.started.lock().unwrap() = Some(Instant::now());
        self.update(|p| *p = Progress::default());
    }

    /// Time since [`ProgressHandle::start`].
    pub fn elapsed(&self) -> Duration {
        self.started
            .lock()
            .unwrap()
            .map(|s| s.elapsed())
            .unwrap_or_default()
    }
}
