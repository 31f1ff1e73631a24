//! The node's firewall, as real Kubernetes nodes have it: every node
//! namespace of the local cluster runs with `br_netfilter` on and the
//! iptables FORWARD policy DROP (so the demo, migration and TCP-survival
//! tests all run that way). This test shows the agent's rules are what lets
//! the VM's traffic through: with the jump to GODWIT-FORWARD deleted, a
//! client cannot reach the guest's TCP port; the next agent puts the jump
//! back (once: nothing doubles) and the guest is reachable again. A clean
//! shutdown keeps the rules while a VMM runs and removes them when none does.
//!
//! Real KVM, real iptables, the Godwit binaries (build them first:
//! `cargo build --release -p godwit-node -p godwit-operator --bins`).

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use godwit_e2e::driver::{ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM, EXAMPLE_VM_ADDR};
use godwit_node::agent::firewall::{CHAIN, JUMP};

/// Whether a client outside every node opens a TCP connection to the guest
/// within 2 s.
fn reachable(godwit: &ClusterDriver) -> bool {
    let addr: SocketAddr = EXAMPLE_VM_ADDR.parse().expect("address");
    godwit
        .cluster
        .fabric
        .client
        .run_in(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
        .expect("thread in the client namespace")
}

/// `iptables -S [chain]` in node `i`'s namespace.
fn rules(godwit: &ClusterDriver, i: usize, chain: &str) -> Vec<String> {
    let mut args = vec!["-w", "-S"];
    if !chain.is_empty() {
        args.push(chain);
    }
    match godwit.cluster.fabric.nodes[i].ns.exec("iptables", &args) {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn jumps(godwit: &ClusterDriver, i: usize) -> usize {
    rules(godwit, i, "FORWARD")
        .iter()
        .filter(|r| r.contains(&format!("-j {CHAIN}")))
        .count()
}

#[test]
fn the_agents_rules_let_vm_traffic_through_a_forward_drop() {
    let dir = std::env::temp_dir().join(format!("godwit-e2e-firewall-{}", std::process::id()));
    let mut godwit = ClusterDriver::up(1, &dir).expect("cluster up");
    // The node runs as a Kubernetes node does.
    let forward = rules(&godwit, 0, "FORWARD");
    assert!(
        forward.contains(&"-P FORWARD DROP".to_string()),
        "{forward:?}"
    );
    let sysctl = godwit.cluster.fabric.nodes[0]
        .ns
        .exec("sysctl", &["-n", "net.bridge.bridge-nf-call-iptables"])
        .expect("sysctl");
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "1");

    for m in [EXAMPLE_TEMPLATE, EXAMPLE_VM] {
        godwit.apply(&godwit.example(m)).expect("apply");
    }
    godwit
        .wait_running("demo", Duration::from_secs(90))
        .expect("VM runs");
    godwit
        .wait("the guest's TCP port", Duration::from_secs(30), || {
            Ok(reachable(&godwit).then_some(()))
        })
        .expect("reachable through the agent's rules");
    assert_eq!(jumps(&godwit, 0), 1);

    // Without the jump, FORWARD's DROP applies to the VM's frames.
    let mut delete = vec!["-w", "-D", "FORWARD"];
    delete.extend(JUMP);
    godwit.cluster.fabric.nodes[0]
        .ns
        .exec("iptables", &delete)
        .expect("delete the jump");
    assert_eq!(jumps(&godwit, 0), 0);
    for _ in 0..3 {
        assert!(
            !reachable(&godwit),
            "the guest is reachable without the agent's rules: the node's FORWARD DROP is not in force"
        );
    }

    // A new agent (after a crash) puts the jump back, once, and adds no rule twice.
    godwit.cluster.kill_agent(0);
    godwit.cluster.start_agent(0).expect("agent restarts");
    godwit
        .wait(
            "the guest's TCP port again",
            Duration::from_secs(30),
            || Ok(reachable(&godwit).then_some(())),
        )
        .expect("reachable once the agent is back");
    godwit.cluster.kill_agent(0);
    godwit.cluster.start_agent(0).expect("agent restarts");
    godwit
        .wait("the agent to start", Duration::from_secs(30), || {
            Ok((jumps(&godwit, 0) == 1).then_some(()))
        })
        .expect("jump present");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(jumps(&godwit, 0), 1, "{:?}", rules(&godwit, 0, "FORWARD"));
    assert_eq!(
        rules(&godwit, 0, CHAIN).len(),
        3,
        "{:?}",
        rules(&godwit, 0, CHAIN)
    );

    // A clean shutdown with the VM still running keeps its rules ...
    godwit.cluster.terminate_agent(0);
    assert_eq!(jumps(&godwit, 0), 1, "rules removed under a running VM");
    assert!(reachable(&godwit));
    // ... and with no VM left removes them.
    godwit.cluster.start_agent(0).expect("agent restarts");
    godwit
        .kubectl(&["delete", "gvm", "demo", "--wait=false"], None)
        .expect("delete the VM");
    let vm_dir = godwit.vm_dir(0, "default", "demo");
    godwit
        .wait("the VM to go", Duration::from_secs(60), || {
            Ok((godwit.get("gvm", "demo")?.is_none() && !vm_dir.exists()).then_some(()))
        })
        .expect("VM deleted");
    godwit.cluster.terminate_agent(0);
    let all = rules(&godwit, 0, "");
    assert!(
        !all.iter().any(|r| r.contains(CHAIN)),
        "the agent's rules stayed after a clean shutdown with no VM: {all:?}"
    );
    assert!(all.contains(&"-P FORWARD DROP".to_string()), "{all:?}");
}
