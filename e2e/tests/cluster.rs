//! The local cluster harness: a 3-node cluster comes up with the API server,
//! the CRDs and Ready nodes, is reachable from the host and from inside a node
//! namespace, and goes down without leaving namespaces, links or files behind
//! — repeatedly.

use std::path::Path;

use godwit_e2e::cluster::LocalCluster;

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn three_node_cluster_comes_up_and_goes_down_cleanly_three_times() {
    for round in 0..3 {
        let dir =
            std::env::temp_dir().join(format!("godwit-cluster-{}-{round}", std::process::id()));
        let cluster = LocalCluster::up(3, 4, 4096, &dir).expect("cluster up");
        let names: Vec<String> = cluster
            .fabric
            .nodes
            .iter()
            .map(|n| n.ns.name().to_string())
            .chain([
                cluster.fabric.ns.name().to_string(),
                cluster.fabric.client.name().to_string(),
            ])
            .collect();
        let listed = netns_list();
        for n in &names {
            assert!(
                listed.contains(n.as_str()),
                "namespace {n} missing: {listed}"
            );
        }

        // kubectl on the host sees three Ready nodes and Godwit's kinds.
        let out = cluster.kubectl(&["get", "nodes", "--no-headers"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            text.lines().filter(|l| l.contains(" Ready")).count(),
            3,
            "{text}"
        );
        let out = cluster.kubectl(&["get", "gvm", "-A"]).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // An agent inside a node namespace reaches the API through the fabric.
        let node = &cluster.fabric.nodes[1];
        let cache = dir.join("node-cache");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", node.ns.name(), "kubectl", "--kubeconfig"])
            .arg(&cluster.node_kubeconfig)
            .arg("--cache-dir")
            .arg(&cache)
            .args([
                "get",
                "node",
                &node.name,
                "-o",
                "jsonpath={.status.addresses[0].address}",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), node.ip);

        cluster.down();
        let listed = netns_list();
        for n in &names {
            assert!(
                !listed.contains(n.as_str()),
                "namespace {n} left behind: {listed}"
            );
        }
        assert!(!Path::new(&dir).exists(), "{} left behind", dir.display());
    }
}
