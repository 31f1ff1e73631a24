//! The node's firewall, as Kubernetes nodes have it: the agent's own rules
//! that let VM traffic through a FORWARD chain whose policy is DROP.
//!
//! Kubernetes nodes run with `br_netfilter` and
//! `net.bridge.bridge-nf-call-iptables=1` (kubeadm's preflight requires it),
//! so every IP frame the kernel bridges, between a VM's tap and the node's
//! uplink on `godwit0` too, passes the iptables FORWARD chain. Docker and
//! several CNIs set that chain's policy to DROP, and then the VMs are cut off.
//!
//! For each address family whose `bridge-nf-call-*` sysctl is 1 (IPv4:
//! `iptables`, IPv6: `ip6tables`) the agent adds, to the `filter` table:
//!
//! ```text
//! -N GODWIT-FORWARD
//! -A GODWIT-FORWARD -m physdev --physdev-in gwt+ -j ACCEPT
//! -A GODWIT-FORWARD -m physdev --physdev-out gwt+ -j ACCEPT
//! -I FORWARD 1 -m physdev --physdev-is-bridged -j GODWIT-FORWARD
//! ```
//!
//! Only frames that a bridge forwards ([`JUMP`]) enter the chain, and it
//! accepts only those entering or leaving a Godwit tap (`gwt…`, see
//! [`super::vm_dir::tap_name`]); everything else returns to FORWARD untouched.
//! Each rule is added only when `iptables -C` does not find it, so a restarted
//! agent adds nothing twice and never opens a gap for running VMs.
//!
//! On a clean shutdown the agent removes the jump and the chain, unless a
//! VMM still runs on the node (VMs outlive the agent and still need them).
//! After a crash they stay: they accept only frames to or from Godwit taps,
//! and the next agent finds and keeps them.
//!
//! With the sysctl 0 or absent (no `br_netfilter`), bridged frames skip
//! iptables and the agent adds nothing; a missing `iptables` is then only a
//! warning. With the sysctl 1 and no `iptables`, the agent refuses to start
//! and says how to fix it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The agent's chain in the `filter` table.
pub const CHAIN: &str = "GODWIT-FORWARD";
/// The match of the FORWARD rule that jumps to [`CHAIN`].
pub const JUMP: &[&str] = &["-m", "physdev", "--physdev-is-bridged", "-j", CHAIN];
/// The interfaces whose frames [`CHAIN`] accepts: Godwit's taps.
pub const TAPS: &str = "gwt+";
/// Where the `bridge-nf-call-*` sysctls are (per network namespace).
pub const SYSCTL_DIR: &str = "/proc/sys/net/bridge";

/// Errors of setting up the node's firewall.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// Bridged frames pass the FORWARD chain but there is no tool to add rules.
    #[error("net.bridge.bridge-nf-call-{sysctl}=1 sends the VMs' bridged frames through the {tool} FORWARD chain, but `{tool}` is not installed; install it (Debian: apt-get install iptables) or set net.bridge.bridge-nf-call-{sysctl}=0")]
    Missing {
        /// `iptables` or `ip6tables`.
        tool: String,
        /// `iptables` or `ip6tables` (the sysctl's suffix).
        sysctl: &'static str,
    },
    /// A tool could not be run.
    #[error("Cannot run {0}")]
    Spawn(String, #[source] std::io::Error),
    /// A rule could not be added.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
}

/// Which iptables the agent uses: the node's default (`iptables`, whichever
/// backend its alternatives pick) or a backend by name. Use the backend the
/// node's other rules are in: a DROP in one backend is not undone by an
/// ACCEPT in the other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// `iptables` / `ip6tables`.
    #[default]
    Default,
    /// `iptables-nft` / `ip6tables-nft`.
    Nft,
    /// `iptables-legacy` / `ip6tables-legacy`.
    Legacy,
}

impl Backend {
    fn suffix(self) -> &'static str {
        match self {
            Backend::Default => "",
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
        }
    }
}

/// One address family: its tool and its sysctl.
#[derive(Clone, Copy, Debug)]
struct Family {
    tool: &'static str,
    sysctl: &'static str,
}

const FAMILIES: [Family; 2] = [
    Family {
        tool: "iptables",
        sysctl: "iptables",
    },
    Family {
        tool: "ip6tables",
        sysctl: "ip6tables",
    },
];

/// What the agent does for one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Bridged frames skip this family's FORWARD chain: nothing to add.
    Nothing,
    /// As [`Plan::Nothing`], and the tool is missing: a warning, in case
    /// `br_netfilter` is turned on later.
    WarnMissing,
    /// Add the rules.
    Install,
    /// Bridged frames pass FORWARD and the tool is missing: refuse to start.
    Refuse,
}

/// The plan for a family whose sysctl reads `sysctl` (`None`: absent, no
/// `br_netfilter`) and whose tool is or is not installed.
pub fn plan(sysctl: Option<bool>, tool_present: bool) -> Plan {
    match (sysctl == Some(true), tool_present) {
        (true, true) => Plan::Install,
        (true, false) => Plan::Refuse,
        (false, true) => Plan::Nothing,
        (false, false) => Plan::WarnMissing,
    }
}

/// The rules the agent installed, to remove on a clean shutdown.
#[derive(Debug, Default)]
pub struct Firewall {
    tools: Vec<PathBuf>,
}

impl Firewall {
    /// Adds the agent's rules for every family that needs them (see the module docs).
    pub fn install(backend: Backend) -> Result<Firewall, FirewallError> {
        Firewall::install_in(Path::new(SYSCTL_DIR), backend)
    }

    /// As [`Firewall::install`], with the sysctls read from `sysctl_dir`.
    pub fn install_in(sysctl_dir: &Path, backend: Backend) -> Result<Firewall, FirewallError> {
        let mut fw = Firewall::default();
        for family in FAMILIES {
            let tool = format!("{}{}", family.tool, backend.suffix());
            let sysctl = read_sysctl(&sysctl_dir.join(format!("bridge-nf-call-{}", family.sysctl)));
            let found = find_in_path(&tool);
            match plan(sysctl, found.is_some()) {
                Plan::Nothing => {}
                Plan::WarnMissing => tracing::warn!(
                    "`{tool}` is not installed; fine while net.bridge.bridge-nf-call-{}=1 is not set (it is not now), but when it is, bridged VM traffic passes the FORWARD chain: then install iptables and restart the agent",
                    family.sysctl
                ),
                Plan::Refuse => {
                    return Err(FirewallError::Missing {
                        tool,
                        sysctl: family.sysctl,
                    })
                }
                Plan::Install => {
                    let path = found.expect("found");
                    add_rules(&path)?;
                    tracing::info!(tool = %path.display(), chain = CHAIN, "VM taps' bridged frames accepted in FORWARD");
                    fw.tools.push(path);
                }
            }
        }
        Ok(fw)
    }

    /// Whether any rule was installed.
    pub fn installed(&self) -> bool {
        !self.tools.is_empty()
    }

    /// Removes the jump and the chain (all of them, should there be several
    /// jumps). Errors are logged: the rules are harmless if they stay.
    pub fn remove(&self) {
        for tool in &self.tools {
            if let Err(e) = remove_rules(tool) {
                tracing::warn!(tool = %tool.display(), error = %e, "cannot remove the agent's firewall rules; they stay (they accept only frames of Godwit's taps)");
            }
        }
    }
}

fn read_sysctl(path: &Path) -> Option<bool> {
    std::fs::read_to_string(path).ok().map(|s| s.trim() != "0")
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The chain's accept rules.
fn accept_rules() -> [Vec<&'static str>; 2] {
    [
        vec!["-m", "physdev", "--physdev-in", TAPS, "-j", "ACCEPT"],
        vec!["-m", "physdev", "--physdev-out", TAPS, "-j", "ACCEPT"],
    ]
}

fn add_rules(tool: &Path) -> Result<(), FirewallError> {
    if !ok(tool, &["-w", "-S", CHAIN])? {
        run(tool, &["-w", "-N", CHAIN])?;
    }
    for rule in accept_rules() {
        let mut check = vec!["-w", "-C", CHAIN];
        check.extend(&rule);
        if !ok(tool, &check)? {
            let mut add = vec!["-w", "-A", CHAIN];
            add.extend(&rule);
            run(tool, &add)?;
        }
    }
    let mut check = vec!["-w", "-C", "FORWARD"];
    check.extend(JUMP);
    if !ok(tool, &check)? {
        let mut add = vec!["-w", "-I", "FORWARD", "1"];
        add.extend(JUMP);
        run(tool, &add)?;
    }
    Ok(())
}

fn remove_rules(tool: &Path) -> Result<(), FirewallError> {
    let mut delete = vec!["-w", "-D", "FORWARD"];
    delete.extend(JUMP);
    while ok(tool, &delete)? {}
    if ok(tool, &["-w", "-S", CHAIN])? {
        run(tool, &["-w", "-F", CHAIN])?;
        run(tool, &["-w", "-X", CHAIN])?;
    }
    Ok(())
}

/// Runs `tool args`; whether it succeeded.
fn ok(tool: &Path, args: &[&str]) -> Result<bool, FirewallError> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| FirewallError::Spawn(tool.display().to_string(), e))?;
    Ok(out.status.success())
}

/// Runs `tool args`; fails with its stderr.
fn run(tool: &Path, args: &[&str]) -> Result<(), FirewallError> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| FirewallError::Spawn(tool.display().to_string(), e))?;
    if !out.status.success() {
        return Err(FirewallError::Command {
            command: format!("{} {}", tool.display(), args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_follows_the_sysctl_and_the_tool() {
        assert_eq!(plan(Some(true), true), Plan::Install);
        assert_eq!(plan(Some(true), false), Plan::Refuse);
        assert_eq!(plan(Some(false), true), Plan::Nothing);
        assert_eq!(plan(None, true), Plan::Nothing);
        assert_eq!(plan(Some(false), false), Plan::WarnMissing);
        assert_eq!(plan(None, false), Plan::WarnMissing);
    }

    #[test]
    fn the_refusal_names_the_fix() {
        let e = FirewallError::Missing {
            tool: "iptables".into(),
            sysctl: "iptables",
        };
        let text = e.to_string();
        assert!(text.contains("apt-get install iptables"), "{text}");
        assert!(text.contains("bridge-nf-call-iptables=0"), "{text}");
    }

    #[test]
    fn with_the_sysctls_off_nothing_is_added() {
        let dir = std::env::temp_dir().join(format!("godwit-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bridge-nf-call-iptables"), "0\n").unwrap();
        // bridge-nf-call-ip6tables absent: as without br_netfilter.
        let r = Firewall::install_in(&dir, Backend::Legacy);
        std::fs::remove_dir_all(&dir).ok();
        assert!(!r.expect("nothing to do").installed());
    }

    #[test]
    fn the_taps_pattern_matches_tap_names() {
        let tap = super::super::vm_dir::tap_name("default", "web", 0);
        assert!(tap.starts_with(TAPS.trim_end_matches('+')), "{tap}");
    }
}
