//! The chart's node restriction (a ValidatingAdmissionPolicy) is enforced in
//! the local cluster, whose agents act as the chart's node-daemon
//! ServiceAccount with tokens bound to their node: a VM runs (its agent's
//! own writes pass), and with node A's identity a change to node B's Node,
//! to a VM on node B or to a migration of neither is refused, while the
//! same changes to its own pass.
//!
//! Needs /dev/kvm, the release binaries (as e2e/test.sh builds them) and
//! helm-python-sdk (e2e/install-deps.sh).

use std::time::Duration;

use godwit_e2e::cluster::NODE_USER;
use godwit_e2e::driver::{node_of, ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM};

#[test]
fn a_node_daemon_changes_only_its_own_node_and_vms() {
    let dir = std::env::temp_dir().join(format!("godwit-node-restriction-{}", std::process::id()));
    let g = ClusterDriver::up(2, &dir).expect("local cluster with Godwit");
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(EXAMPLE_VM)).unwrap();
    let vm = g.wait_running("demo", Duration::from_secs(90)).unwrap();
    let here = node_of(&vm);
    let names: Vec<String> = g
        .cluster
        .fabric
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let other = names.iter().find(|n| **n != here).unwrap().clone();
    let as_node = |node: &str, args: &[&str]| {
        let user = format!("--as={NODE_USER}@{node}");
        g.kubectl(&[&[user.as_str()][..], args].concat(), None)
    };
    let annotate_node = |who: &str, node: &str| {
        as_node(
            who,
            &["annotate", "node", node, "test/touched=yes", "--overwrite"],
        )
    };
    let annotate_vm = |who: &str| {
        as_node(
            who,
            &["annotate", "gvm", "demo", "test/touched=yes", "--overwrite"],
        )
    };

    annotate_node(&here, &here).expect("a node daemon changes its own Node");
    let refused = annotate_node(&here, &other).expect_err("another node's Node");
    let text = format!("{refused:#}");
    println!("{text}");
    assert!(
        text.contains("godwit-node-restriction") && text.contains("may change only its own Node"),
        "{text}"
    );

    annotate_vm(&here).expect("the VM's node daemon changes it");
    let refused = annotate_vm(&other).expect_err("a VM on another node");
    let text = format!("{refused:#}");
    assert!(
        text.contains("only the VMs labelled for its node"),
        "{text}"
    );

    // A token bound to no node is refused everything; other users are not
    // the policy's concern.
    let refused = g
        .kubectl(
            &[
                &format!("--as={NODE_USER}"),
                "annotate",
                "node",
                &here,
                "test/x=y",
            ],
            None,
        )
        .expect_err("a node daemon token without a node");
    assert!(
        format!("{refused:#}").contains("names no node"),
        "{refused:#}"
    );
    g.kubectl(&["annotate", "node", &other, "test/admin=yes"], None)
        .expect("the administrator is not restricted");

    // The VM still runs: the agents' own writes were never refused.
    let vm = g.wait_running("demo", Duration::from_secs(10)).unwrap();
    assert_eq!(node_of(&vm), here);
    let log = std::fs::read_to_string(g.cluster.log_dir().join(format!("agent-{here}.log")))
        .unwrap_or_default();
    assert!(
        !log.contains("godwit-node-restriction"),
        "the agent on {here} was refused a write of its own"
    );
}
