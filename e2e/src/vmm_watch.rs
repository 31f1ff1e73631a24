//! Watching a VM's VMM processes from outside, as the fault matrix, the
//! failover benchmark and the failed-migration test do: the pid a VM
//! directory names, the processes whose command line names a VM directory,
//! and a sampler that checks two VMMs of a VM never run at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;

use godwit_testkit::process::alive;

/// The pid in VM directory `dir`'s `pid` file.
pub fn vmm_pid(dir: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Processes whose command line names `dir` (a VM directory).
pub fn processes_naming(dir: &std::path::Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .map(|r| {
            r.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        String::from_utf8_lossy(&c)
                            .replace('\0', " ")
                            .contains(&needle)
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Samples the VM's VMM processes on both nodes every 10 ms in a thread.
pub struct Sampler {
    state: Arc<Mutex<Samples>>,
    max_gap: Duration,
    stop: Arc<AtomicBool>,
    over: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Samples {
    live: Vec<usize>,
    violation: Option<String>,
    gap_start: Option<Instant>,
    longest_gap: Duration,
}

impl Sampler {
    /// `before`: the migration's own VMMs (source and target), which may
    /// coexist until it is over.
    pub fn start(dirs: [std::path::PathBuf; 2], before: Vec<i32>, max_gap: Duration) -> Sampler {
        let state = Arc::new(Mutex::new(Samples::default()));
        let (stop, over) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (st, sp, ov) = (state.clone(), stop.clone(), over.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                let pids: Vec<Option<i32>> = (0..2)
                    .map(|k| vmm_pid(&dirs[k]).filter(|&p| alive(p)))
                    .collect();
                let live: Vec<usize> = (0..2).filter(|&k| pids[k].is_some()).collect();
                let restarted = pids.iter().flatten().any(|p| !before.contains(p));
                let mut s = st.lock().unwrap();
                // During the migration its two VMMs coexist (only one runs
                // the guest: the protocol and the disk lock see to that). A
                // restarted VMM must never run next to either of them, and
                // once the migration is over one VMM is left.
                if live.len() > 1
                    && (restarted || ov.load(Ordering::Relaxed))
                    && s.violation.is_none()
                {
                    s.violation = Some(format!(
                        "two VMMs of the VM run at once: {pids:?} (the migration's were {before:?})"
                    ));
                }
                match (live.is_empty(), s.gap_start) {
                    (true, None) => s.gap_start = Some(Instant::now()),
                    (false, Some(g)) => {
                        s.longest_gap = s.longest_gap.max(g.elapsed());
                        s.gap_start = None;
                    }
                    _ => {}
                }
                s.live = live;
                drop(s);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Sampler {
            state,
            max_gap,
            stop,
            over,
            thread: Some(thread),
        }
    }

    /// Fails on two VMMs at once or on no VMM for longer than its `max_gap`.
    pub fn check(&self) -> anyhow::Result<()> {
        let s = self.state.lock().unwrap();
        if let Some(v) = &s.violation {
            bail!("{v}");
        }
        if s.gap_start.is_some_and(|g| g.elapsed() > self.max_gap) {
            bail!("no VMM of the VM ran for {:?}", self.max_gap);
        }
        Ok(())
    }

    /// The nodes (0, 1) where a VMM of the VM runs.
    pub fn live(&self) -> Vec<usize> {
        self.state.lock().unwrap().live.clone()
    }

    /// From now on, two VMMs at once are a violation.
    pub fn migration_over(&self) {
        self.over.store(true, Ordering::Relaxed);
    }

    /// Stops sampling; the longest time without a VMM, or the violation seen.
    /// (Dropping it stops it too.)
    pub fn stop(mut self) -> anyhow::Result<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.check()?;
        Ok(self.state.lock().unwrap().longest_gap)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
