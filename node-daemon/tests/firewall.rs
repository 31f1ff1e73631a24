//! The agent's firewall rules, with the real `iptables` in a network
//! namespace of the test's own that runs as a Kubernetes node does
//! (`br_netfilter` on, FORWARD policy DROP): the rules are added once however
//! often the agent starts, and removed, chain and jump, on request. The host's
//! rules are never touched. That they are needed, and enough, for a VM's
//! traffic is shown end to end in e2e/tests/firewall.rs.

use godwit_node::agent::firewall::{Backend, Firewall, CHAIN, TAPS};
use godwit_testkit::netns::Netns;

fn require_iptables() {
    assert!(
        std::path::Path::new("/usr/sbin/iptables").exists(),
        "iptables is not installed: run e2e/install-deps.sh"
    );
}

/// `iptables -S [chain]` in `ns` (every chain for ""), one rule a line.
fn rules(ns: &Netns, tool: &str, chain: &str) -> Vec<String> {
    let mut args = vec!["-w", "-S"];
    if !chain.is_empty() {
        args.push(chain);
    }
    match ns.exec(tool, &args) {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A node namespace as Kubernetes runs it.
fn node_ns() -> Netns {
    let ns = Netns::new("gwfw").expect("netns");
    for tool in ["iptables", "ip6tables"] {
        ns.exec(
            "sysctl",
            &["-q", "-w", &format!("net.bridge.bridge-nf-call-{tool}=1")],
        )
        .expect("sysctl");
        ns.exec(tool, &["-w", "-P", "FORWARD", "DROP"])
            .expect("FORWARD DROP");
    }
    ns
}

fn install_in(ns: &Netns) -> Firewall {
    ns.run_in(|| Firewall::install(Backend::Default))
        .expect("thread in netns")
        .expect("rules added")
}

#[test]
fn rules_are_added_once_and_removed() {
    require_iptables();
    let ns = node_ns();
    let host_before = std::process::Command::new("iptables")
        .args(["-w", "-S"])
        .output()
        .expect("iptables on the host")
        .stdout;
    // Twice, as after an agent restart.
    let first = install_in(&ns);
    assert!(first.installed());
    let again = install_in(&ns);
    for tool in ["iptables", "ip6tables"] {
        let forward = rules(&ns, tool, "FORWARD");
        let jumps: Vec<_> = forward.iter().filter(|r| r.contains(CHAIN)).collect();
        assert_eq!(
            jumps,
            [&format!(
                "-A FORWARD -m physdev --physdev-is-bridged -j {CHAIN}"
            )],
            "{tool}: {forward:?}"
        );
        assert!(
            forward.contains(&"-P FORWARD DROP".to_string()),
            "{forward:?}"
        );
        let chain = rules(&ns, tool, CHAIN);
        assert_eq!(
            chain,
            [
                format!("-N {CHAIN}"),
                format!("-A {CHAIN} -m physdev --physdev-in {TAPS} -j ACCEPT"),
                format!("-A {CHAIN} -m physdev --physdev-out {TAPS} -j ACCEPT"),
            ],
            "{tool}"
        );
    }
    ns.run_in(move || again.remove()).expect("thread in netns");
    for tool in ["iptables", "ip6tables"] {
        let all = rules(&ns, tool, "");
        assert!(
            !all.iter().any(|r| r.contains(CHAIN)),
            "{tool} still has the chain or its jump: {all:?}"
        );
        assert!(all.contains(&"-P FORWARD DROP".to_string()), "{all:?}");
    }
    let host_after = std::process::Command::new("iptables")
        .args(["-w", "-S"])
        .output()
        .expect("iptables on the host")
        .stdout;
    assert_eq!(host_before, host_after, "the host's rules changed");
}

#[test]
fn nothing_is_added_where_bridged_frames_skip_iptables() {
    require_iptables();
    let ns = Netns::new("gwfw").expect("netns");
    for tool in ["iptables", "ip6tables"] {
        ns.exec(
            "sysctl",
            &["-q", "-w", &format!("net.bridge.bridge-nf-call-{tool}=0")],
        )
        .expect("sysctl");
    }
    let fw = install_in(&ns);
    assert!(!fw.installed());
    for tool in ["iptables", "ip6tables"] {
        let all = rules(&ns, tool, "");
        assert!(!all.iter().any(|r| r.contains(CHAIN)), "{tool}: {all:?}");
    }
}
