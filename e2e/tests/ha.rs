//! HA on a local cluster with the operator and node agents: the node a VM
//! runs on is cut off the network; the node fences itself (stops the VM), the
//! operator restarts the VM on the other node, and at no moment do two VMMs
//! of the VM run; reconnected, the node does not start the VM again. The
//! failover time is printed (the figure is `bench failover`'s job). Each
//! node's agent runs in a Podman container of Godwit's image, as the
//! DaemonSet runs it.
//!
//! Needs the release binaries (`cargo build --release -p godwit-node -p
//! godwit-operator --bins`, as e2e/test.sh does) and /dev/kvm.

use godwit_e2e::driver::{ClusterDriver, EXAMPLE_TEMPLATE, EXAMPLE_VM};

#[test]
fn a_lost_nodes_vm_runs_again_elsewhere_and_never_twice() {
    let dir = std::env::temp_dir().join(format!("godwit-ha-{}", std::process::id()));
    let g = ClusterDriver::up_in_containers(2, &dir)
        .expect("local cluster with Godwit, agents in Podman");
    g.apply(&g.example(EXAMPLE_TEMPLATE)).unwrap();
    g.apply(&g.example(EXAMPLE_VM)).unwrap();
    let f = godwit_e2e::failover::fail_over(&g, "demo").expect("failover");
    println!(
        "failover {} -> {}: fenced after {} ms, Running elsewhere after {} ms",
        f.from, f.to, f.fenced_ms, f.ms
    );
    assert!(!f.overlap, "two VMMs of the VM ran at once: {f:?}");
    assert_ne!(f.from, f.to);
    let vm = g.get("gvm", "demo").unwrap().unwrap();
    assert_eq!(vm["metadata"]["labels"]["godwit.dev/node"], f.to.as_str());
    let events = g
        .kubectl(
            &[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=demo",
            ],
            None,
        )
        .unwrap_or_default();
    let described = g.kubectl(&["describe", "gvm", "demo"], None).unwrap();
    assert!(
        described.contains("NodeLost") || events.contains("NodeLost"),
        "no NodeLost event: {described}"
    );
}
