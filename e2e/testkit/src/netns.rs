//! Network namespaces as test hosts: uniquely named namespaces, veth pairs
//! between them, bridges, taps for VMs, `tc tbf` shaping and link cuts. Every
//! object is removed when its owner is dropped, also when a test panics, and
//! names are unique per process and test so tests can run in parallel.
//!
//! Interfaces live inside namespaces this module creates, so deleting a
//! namespace removes everything in it; veth pairs are created directly inside
//! their namespaces and never appear in the host's.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};

/// Errors of namespace management.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("Failed to run `{0}`")]
    Spawn(String, #[source] std::io::Error),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("Failed to open network namespace {0}")]
    Open(String, #[source] std::io::Error),
    #[error("setns into {0} failed")]
    Setns(String, #[source] std::io::Error),
    #[error("Thread in namespace {0} panicked")]
    ThreadPanicked(String),
}

/// A short name unique within this process and among processes: `<tag><pid
/// base36><counter>`, at most 15 characters (the kernel's interface name limit).
pub fn unique_name(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let pid = base36(std::process::id() as u64);
    let mut name = format!("{}{}{}", &tag[..tag.len().min(4)], pid, base36(n));
    name.truncate(15);
    name
}

fn base36(mut v: u64) -> String {
    const D: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = Vec::new();
    loop {
        s.push(D[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    s.reverse();
    String::from_utf8(s).expect("ascii")
}

/// Runs a command; fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<Output, NetnsError> {
    let text = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| NetnsError::Spawn(text.clone(), e))?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command: text,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// A network namespace, deleted on Drop (with every interface in it).
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `<tag>…` with its loopback up.
    pub fn new(tag: &str) -> Result<Netns, NetnsError> {
        let name = unique_name(tag);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, NetnsError> {
        let mut a = vec!["netns", "exec", self.name.as_str(), program];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs `f` on a thread that has joined this namespace (sockets it opens
    /// live there) and waits for it.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        self.spawn_in(f)?
            .join()
            .map_err(|_| NetnsError::ThreadPanicked(self.name.clone()))?
    }

    /// Starts `f` on a thread that has joined this namespace.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<Result<T, NetnsError>>, NetnsError> {
        let path = Path::new("/var/run/netns").join(&self.name);
        let file = File::open(&path).map_err(|e| NetnsError::Open(self.name.clone(), e))?;
        let name = self.name.clone();
        Ok(thread::spawn(move || {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Setns(name, std::io::Error::last_os_error()));
            }
            Ok(f())
        }))
    }

    /// Adds a bridge (up).
    pub fn add_bridge(&self, name: &str) -> Result<(), NetnsError> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        self.set_up(name)
    }

    /// Adds a tap device for a VM, attached to `bridge` if given (up).
    pub fn add_tap(&self, name: &str, bridge: Option<&str>) -> Result<(), NetnsError> {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        if let Some(b) = bridge {
            self.ip(&["link", "set", name, "master", b])?;
        }
        self.set_up(name)
    }

    /// Attaches `dev` to `bridge`.
    pub fn attach(&self, dev: &str, bridge: &str) -> Result<(), NetnsError> {
        self.ip(&["link", "set", dev, "master", bridge])?;
        Ok(())
    }

    /// Sets `dev` up.
    pub fn set_up(&self, dev: &str) -> Result<(), NetnsError> {
        self.ip(&["link", "set", dev, "up"])?;
        Ok(())
    }

    /// Adds an address like `10.0.0.1/24` to `dev`.
    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<(), NetnsError> {
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        Ok(())
    }

    /// Shapes `dev`'s egress with a token bucket (`tc qdisc replace ... tbf`),
    /// e.g. `rate = "100mbit"`, `burst = "64kb"`, `latency = "50ms"`.
    pub fn shape(
        &self,
        dev: &str,
        rate: &str,
        burst: &str,
        latency: &str,
    ) -> Result<(), NetnsError> {
        let ns = self.name.as_str();
        run(
            "tc",
            &[
                "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst",
                burst, "latency", latency,
            ],
        )?;
        Ok(())
    }

    /// Removes shaping from `dev`.
    pub fn unshape(&self, dev: &str) -> Result<(), NetnsError> {
        run(
            "tc",
            &["-n", &self.name, "qdisc", "del", "dev", dev, "root"],
        )?;
        Ok(())
    }

    /// Cuts the link: `dev` goes down (no carrier on its peer either).
    pub fn cut(&self, dev: &str) -> Result<(), NetnsError> {
        self.ip(&["link", "set", dev, "down"])?;
        Ok(())
    }

    /// Restores a cut link.
    pub fn restore(&self, dev: &str) -> Result<(), NetnsError> {
        self.set_up(dev)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A veth pair between two namespaces: `a_dev` in `a`, `b_dev` in `b`, both up.
/// Deleting either namespace removes the pair; Drop removes it explicitly too.
pub struct Veth {
    ns: String,
    dev: String,
}

impl Veth {
    /// Creates the pair directly inside the two namespaces.
    pub fn new(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<Veth, NetnsError> {
        a.ip(&[
            "link",
            "add",
            a_dev,
            "type",
            "veth",
            "peer",
            "name",
            b_dev,
            "netns",
            b.name(),
        ])?;
        let v = Veth {
            ns: a.name().to_string(),
            dev: a_dev.to_string(),
        };
        a.set_up(a_dev)?;
        b.set_up(b_dev)?;
        Ok(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = run("ip", &["-n", &self.ns, "link", "del", &self.dev]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(ns: &Netns, addr: &str) -> bool {
        ns.exec("ping", &["-c", "1", "-W", "1", addr]).is_ok()
    }

    #[test]
    fn veth_links_can_be_shaped_cut_and_restored_and_vanish_on_drop() {
        let a = Netns::new("tna").unwrap();
        let b = Netns::new("tnb").unwrap();
        let (a_name, b_name) = (a.name().to_string(), b.name().to_string());
        let veth = Veth::new(&a, "va", &b, "vb").unwrap();
        a.add_addr("va", "10.78.0.1/24").unwrap();
        b.add_addr("vb", "10.78.0.2/24").unwrap();
        assert!(ping(&a, "10.78.0.2"), "no ping over a fresh veth");

        a.shape("va", "10mbit", "32kb", "50ms").unwrap();
        let qd = run("tc", &["-n", a.name(), "qdisc", "show", "dev", "va"]).unwrap();
        let qd = String::from_utf8_lossy(&qd.stdout);
        assert!(qd.contains("tbf") && qd.contains("10Mbit"), "{qd}");
        assert!(ping(&a, "10.78.0.2"), "no ping over a shaped link");
        a.unshape("va").unwrap();

        a.cut("va").unwrap();
        assert!(!ping(&a, "10.78.0.2"), "ping crossed a cut link");
        a.restore("va").unwrap();
        let back = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            ping(&a, "10.78.0.2")
        });
        assert!(back, "no ping after restoring the link");

        drop(veth);
        assert!(b.ip(&["link", "show", "vb"]).is_err(), "peer survived");
        drop(a);
        drop(b);
        let list = run("ip", &["netns", "list"]).unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        let names: Vec<&str> = list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(
            !names.contains(&a_name.as_str()) && !names.contains(&b_name.as_str()),
            "{list}"
        );
    }

    #[test]
    fn unique_names_fit_interface_names_and_differ() {
        let a = unique_name("vmnet");
        let b = unique_name("vmnet");
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
        assert!(a.starts_with("vmne"));
    }
}
