//! The Godwit test guest seen from the host: building and locating its ELF
//! (`e2e/testguest/build.sh`, run once per process), reading its serial console
//! line by line with each line stamped by the host's monotonic clock as it
//! arrives, waiting for lines, the guest's line formats and patterns
//! (documented in `e2e/testguest/README.md`), and a TCP client of its
//! heartbeat server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Errors of the guest harness.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("Failed to run e2e/testguest/build.sh")]
    BuildSpawn(#[source] std::io::Error),
    #[error("e2e/testguest/build.sh failed: {0}")]
    Build(String),
    #[error("Timed out after {timeout:?} waiting for {what}; last lines:\n{tail}")]
    Timeout {
        what: String,
        timeout: Duration,
        tail: String,
    },
    #[error("Console closed while waiting for {what}; last lines:\n{tail}")]
    Closed { what: String, tail: String },
    #[error("Failed to write to the guest console")]
    Write(#[source] std::io::Error),
}

/// The test guest's crate directory (`e2e/testguest`, beside this crate).
pub fn testguest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test kit lives in e2e/")
        .join("testguest")
}

/// Builds the guest (once per process; cargo caches across processes) and
/// returns the ELF's path, the last line build.sh prints.
pub fn guest_elf() -> Result<PathBuf, GuestError> {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = ELF.get_or_init(|| {
        let script = testguest_dir().join("build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .map_err(|e| format!("spawn {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or("").trim().to_string();
        if last.is_empty() || !Path::new(&last).is_file() {
            return Err(format!("no ELF path on build.sh's last line: {last:?}"));
        }
        Ok(PathBuf::from(last))
    });
    r.clone().map_err(GuestError::Build)
}

/// A console line and when the host read it.
#[derive(Clone, Debug)]
pub struct Line {
    /// The line without its `\n` (and without a trailing `\r`).
    pub text: String,
    /// Host monotonic time at which the line's last byte arrived.
    pub at: Instant,
}

/// A `HB <counter> <guest_ns> <written>` heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub counter: u64,
    pub guest_ns: u64,
    /// Pages the memory workload has written since boot (0 without a
    /// workload, and for guests that print the older `HB <counter> <guest_ns>`).
    pub written: u64,
}

/// Parses a heartbeat line, in the current 4-word form or the older 3-word
/// one; `None` for any other line (or a fragment).
pub fn parse_heartbeat(text: &str) -> Option<Heartbeat> {
    let mut w = text.split(' ');
    if w.next()? != "HB" {
        return None;
    }
    let counter = w.next()?.parse().ok()?;
    let guest_ns = w.next()?.parse().ok()?;
    let written = match w.next() {
        None => 0,
        Some(n) => n.parse().ok()?,
    };
    if w.next().is_some() {
        return None;
    }
    Some(Heartbeat {
        counter,
        guest_ns,
        written,
    })
}

/// Value of `key=value` in a line of space-separated fields.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The guest's mixing function (SplitMix64's finalizer of `x + golden`).
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Little-endian u64 number `word` (0..64) of disk sector `sector` written by
/// `blk_write=SECTOR:COUNT:SEED`.
pub fn blk_word(seed: u64, sector: u64, word: u64) -> u64 {
    mix64(seed.wrapping_mul(0x0000_0100_0000_01b3) ^ (sector << 6 | word))
}

/// The 512 bytes the guest writes to `sector` for `seed`.
pub fn blk_sector(seed: u64, sector: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    for w in 0..64u64 {
        let i = w as usize * 8;
        s[i..i + 8].copy_from_slice(&blk_word(seed, sector, w).to_le_bytes());
    }
    s
}

/// First word of working-set page `page` in generation `gen`.
pub fn mem_word(page: u64, gen: u64) -> u64 {
    mix64(gen << 40 ^ page)
}

/// The guest's serial console: a reader thread turns bytes into timestamped
/// lines; commands are written back on the same stream.
pub struct Console {
    rx: Receiver<Line>,
    writer: Box<dyn Write + Send>,
    seen: Vec<Line>,
}

impl Console {
    /// Starts reading `reader`; commands go to `writer`.
    pub fn new(reader: impl Read + Send + 'static, writer: impl Write + Send + 'static) -> Console {
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("guest-console".into())
            .spawn(move || {
                let mut r = BufReader::new(reader);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let at = Instant::now();
                    while matches!(buf.last(), Some(b'\n' | b'\r')) {
                        buf.pop();
                    }
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if tx.send(Line { text, at }).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn console reader thread");
        Console {
            rx,
            writer: Box::new(writer),
            seen: Vec::new(),
        }
    }

    /// Every line received so far (through the waits).
    pub fn lines(&self) -> &[Line] {
        &self.seen
    }

    fn tail(&self) -> String {
        let n = self.seen.len().saturating_sub(15);
        self.seen[n..]
            .iter()
            .map(|l| format!("  {}", l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits up to `timeout` for the next line; `Ok(None)` on timeout.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<Line>, GuestError> {
        match self.rx.recv_timeout(timeout) {
            Ok(l) => {
                self.seen.push(l.clone());
                Ok(Some(l))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(GuestError::Closed {
                what: "the next line".into(),
                tail: self.tail(),
            }),
        }
    }

    /// Waits for the first line (from now on) that satisfies `pred`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<Line, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GuestError::Timeout {
                    what: what.into(),
                    timeout,
                    tail: self.tail(),
                });
            }
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l.text) {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(GuestError::Closed {
                        what: what.into(),
                        tail: self.tail(),
                    })
                }
            }
        }
    }

    /// Waits for a line starting with `prefix`.
    pub fn wait_prefix(&mut self, prefix: &str, timeout: Duration) -> Result<Line, GuestError> {
        self.wait_for(&format!("a line starting with {prefix:?}"), timeout, |t| {
            t.starts_with(prefix)
        })
    }

    /// Collects the next `n` heartbeats.
    pub fn heartbeats(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<(Heartbeat, Instant)>, GuestError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.wait_for(&format!("heartbeat {} of {n}", out.len() + 1), left, |t| {
                parse_heartbeat(t).is_some()
            })?;
            out.push((parse_heartbeat(&l.text).expect("matched"), l.at));
        }
        Ok(out)
    }

    /// Sends one command line.
    pub fn send(&mut self, command: &str) -> Result<(), GuestError> {
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .and_then(|_| self.writer.flush())
            .map_err(GuestError::Write)
    }
}

/// What a TCP client of the guest's heartbeat server saw.
#[derive(Debug, Default)]
pub struct StreamSeen {
    /// Heartbeats read.
    pub count: usize,
    /// First and last counter.
    pub first: u64,
    /// See `first`.
    pub last: u64,
    /// Every counter was the previous one plus one.
    pub in_order: bool,
    /// Why the connection ended, if not because we stopped.
    pub error: Option<String>,
}

/// Connects to the guest's heartbeat server at `addr` and reads heartbeat
/// lines until `stop`, publishing the latest counter in `last_seen`.
pub fn watch_heartbeats(addr: &str, stop: &AtomicBool, last_seen: &AtomicU64) -> StreamSeen {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return StreamSeen {
                    error: Some(e.to_string()),
                    ..Default::default()
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut seen = StreamSeen {
        in_order: true,
        ..Default::default()
    };
    for line in BufReader::new(stream).lines() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match line {
            Ok(l) => {
                if let Some(hb) = parse_heartbeat(l.trim_end()) {
                    if seen.count > 0 && hb.counter != seen.last + 1 {
                        seen.in_order = false;
                    }
                    if seen.count == 0 {
                        seen.first = hb.counter;
                    }
                    seen.last = hb.counter;
                    seen.count += 1;
                    last_seen.store(hb.counter, Ordering::Relaxed);
                }
            }
            Err(e) => {
                seen.error = Some(e.to_string());
                break;
            }
        }
    }
    if seen.error.is_none() && !stop.load(Ordering::Relaxed) {
        seen.error = Some("connection closed".into());
    }
    seen
}

/// The guest's own pattern and command-line code, compiled for the host so the
/// tests below check the host's formulas and parsing against the guest's.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../../testguest/src/pattern.rs"]
mod guest_pattern;

#[cfg(test)]
#[allow(dead_code)]
#[path = "../../testguest/src/cmdline.rs"]
mod guest_cmdline;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_the_guests() {
        for (seed, sector, word) in [(0, 0, 0), (7, 100, 63), (u64::MAX, 1 << 30, 5)] {
            assert_eq!(
                blk_word(seed, sector, word),
                guest_pattern::blk_word(seed, sector, word)
            );
        }
        for (page, gen) in [(0, 1), (16383, 2), (1 << 20, 12345)] {
            assert_eq!(mem_word(page, gen), guest_pattern::mem_word(page, gen));
        }
    }

    #[test]
    fn guest_parses_the_documented_command_line() {
        let c = guest_cmdline::Config::parse(
            "hb_ms=2 dirty_mib=64 dirty_rate=0x100 memcheck_s=1 junk hb_ms=x \
             virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=4K@feb00c00:11 \
             ip=10.0.0.2/24 gw=10.0.0.1 tcp_port=9000 blk_write=8:16:0x2a blk_verify=1:2:3",
        );
        assert_eq!(c.hb_ms, 2);
        assert_eq!(c.tick_us, 1000);
        assert_eq!(c.dirty_mib, 64);
        assert_eq!(c.dirty_rate, 256);
        assert_eq!(c.memcheck_s, 1);
        assert_eq!(c.nvirtio, 2);
        assert_eq!(
            (c.virtio[0].size, c.virtio[0].addr, c.virtio[0].irq),
            (512, 0xfeb0_0e00, 12)
        );
        assert_eq!((c.virtio[1].size, c.virtio[1].addr), (4096, 0xfeb0_0c00));
        assert_eq!(c.ip, Some(([10, 0, 0, 2], 24)));
        assert_eq!(c.gw, Some([10, 0, 0, 1]));
        assert_eq!(c.tcp_port, 9000);
        let w = c.blk_write.unwrap();
        assert_eq!((w.sector, w.count, w.seed), (8, 16, 42));
        let v = c.blk_verify.unwrap();
        assert_eq!((v.sector, v.count, v.seed), (1, 2, 3));
        let d = guest_cmdline::Config::parse("");
        assert_eq!(
            (d.hb_ms, d.tcp_port, d.tick_us, d.nvirtio),
            (100, 7777, 10_000, 0)
        );
        assert!(d.ip.is_none() && d.blk_write.is_none());
    }

    /// Assembles `body` and runs `build.sh --scan` on the object.
    fn scan(name: &str, body: &str) -> std::process::Output {
        let dir = std::env::temp_dir().join(format!("godwit-scan-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, obj) = (dir.join("t.s"), dir.join("t.o"));
        std::fs::write(&src, format!(".text\nf:\n{body}\n")).unwrap();
        let st = Command::new("as")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap();
        assert!(st.success(), "as failed on {body}");
        let out = Command::new("bash")
            .arg(testguest_dir().join("build.sh"))
            .arg("--scan")
            .arg(&obj)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    #[test]
    fn build_scan_rejects_what_this_kvm_cannot_run() {
        for insn in [
            "xorps %xmm0, %xmm0",
            "movq %rax, %mm1",
            "fld1",
            "fnstcw (%rax)",
            "int3",
            "xsave (%rax)",
            "xrstor (%rax)",
            "fxsave (%rax)",
            "ldmxcsr (%rax)",
        ] {
            let out = scan("bad", insn);
            assert!(!out.status.success(), "build.sh --scan accepted {insn}");
            let mnemonic = insn.split(' ').next().unwrap();
            assert!(String::from_utf8_lossy(&out.stderr).contains(mnemonic));
        }
        let ok = scan(
            "good",
            "mov %fs:0x28, %rax\n lock incq (%rax)\n rep outsb\n ud2\n hlt\n ret",
        );
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }

    #[test]
    fn heartbeat_lines_parse_and_fragments_do_not() {
        assert_eq!(
            parse_heartbeat("HB 12 3456 789"),
            Some(Heartbeat {
                counter: 12,
                guest_ns: 3456,
                written: 789
            })
        );
        // The older form, from guests built before `written` was added.
        assert_eq!(
            parse_heartbeat("HB 12 3456"),
            Some(Heartbeat {
                counter: 12,
                guest_ns: 3456,
                written: 0
            })
        );
        assert_eq!(parse_heartbeat("HB 12"), None);
        assert_eq!(parse_heartbeat("B 12 3456 7"), None);
        assert_eq!(parse_heartbeat("HB 12 3456 7 8"), None);
        assert_eq!(parse_heartbeat("HB 12 3456 7x"), None);
        assert_eq!(parse_heartbeat("HB 12 3456 "), None);
        assert_eq!(parse_heartbeat("HB 12 34x56"), None);
        // The tail of a line cut by a switch-over is not a heartbeat.
        assert_eq!(parse_heartbeat("12 3456 7"), None);
        assert_eq!(parse_heartbeat("MEMCHECK ok gen=1 pages=2"), None);
        assert_eq!(parse_heartbeat("MEMCHECK ok gen=1 pages=2"), None);
    }

    #[test]
    fn fields_are_found_by_key() {
        let l = "MEMCHECK ok gen=3 pages=16384";
        assert_eq!(field(l, "gen"), Some("3"));
        assert_eq!(field(l, "pages"), Some("16384"));
        assert_eq!(field(l, "page"), None);
    }

    #[test]
    fn patterns_differ_by_seed_sector_and_word() {
        assert_ne!(blk_word(1, 0, 0), blk_word(2, 0, 0));
        assert_ne!(blk_word(1, 0, 0), blk_word(1, 1, 0));
        assert_ne!(blk_word(1, 0, 0), blk_word(1, 0, 1));
        assert_ne!(mem_word(5, 1), mem_word(5, 2));
        // SplitMix64 of 0 (first output of the reference generator seeded 0).
        assert_eq!(mix64(0), 0xe220_a839_7b1d_cdaf);
    }
}
