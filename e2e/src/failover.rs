//! HA failover on the local cluster: cut the node a VM runs on off the
//! network and time how long until the guest runs on another node (its
//! first heartbeat there, on the new VMM's console), watching
//! both nodes all along so that two VMMs of the same VM are never alive at
//! once. Used by `tests/ha.rs` and by `bench failover`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use godwit_testkit::process::alive;

use crate::driver::ClusterDriver;
use crate::vmm_watch::vmm_pid;

/// One failover.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failover {
    /// The node that was cut off.
    pub from: String,
    /// Where the VM runs again.
    pub to: String,
    /// From the cut to the guest's first heartbeat on `to` (its console):
    /// the failover time.
    pub ms: u64,
    /// From the cut to the VM reported Running on `to` (its VMM started).
    pub running_ms: u64,
    /// From the cut to the VM's VMM gone on `from` (self-fencing).
    pub fenced_ms: u64,
    /// Two VMMs of the VM were alive at the same moment.
    pub overlap: bool,
}

/// Cuts off the node VM `default/name` runs on, waits until it runs on
/// another node, then reconnects the node and checks it did not start the VM
/// again.
pub fn fail_over(g: &ClusterDriver, name: &str) -> anyhow::Result<Failover> {
    let vm = g.wait_running(name, Duration::from_secs(90))?;
    let from = vm["status"]["nodeName"]
        .as_str()
        .context("a Running VM has a node")?
        .to_string();
    let i = g.node_index(&from)?;
    let nodes = g.cluster.fabric.nodes.len();
    let dirs: Vec<_> = (0..nodes).map(|j| g.vm_dir(j, "default", name)).collect();
    let node = &g.cluster.fabric.nodes[i];
    node.cut()?;
    let t0 = Instant::now();
    let mut overlap = false;
    let mut fenced_ms = None;
    let mut last_check = Instant::now() - Duration::from_secs(1);
    // Where and when the VM was reported Running elsewhere.
    let mut running: Option<(usize, String, u64)> = None;
    let result = loop {
        let live: Vec<usize> = (0..nodes)
            .filter(|&j| vmm_pid(&dirs[j]).is_some_and(alive))
            .collect();
        overlap |= live.len() > 1;
        if fenced_ms.is_none() && !live.contains(&i) {
            fenced_ms = Some(t0.elapsed().as_millis() as u64);
        }
        if let Some((j, to, running_ms)) = &running {
            // The new VMM's console is a fresh file in the new node's VM
            // directory: any heartbeat there is the guest's first since the cut.
            let console = std::fs::read_to_string(dirs[*j].join("console.log")).unwrap_or_default();
            if console.contains("HB ") {
                break Ok(Failover {
                    from: from.clone(),
                    to: to.clone(),
                    ms: t0.elapsed().as_millis() as u64,
                    running_ms: *running_ms,
                    fenced_ms: fenced_ms.unwrap_or(0),
                    overlap,
                });
            }
        } else if last_check.elapsed() >= Duration::from_millis(200) {
            last_check = Instant::now();
            if let Some(v) = g.get("gvm", name)? {
                let on = v["status"]["nodeName"].as_str().unwrap_or("");
                if v["status"]["phase"] == "Running" && on != from && !on.is_empty() {
                    let j = g.node_index(on)?;
                    running = Some((j, on.to_string(), t0.elapsed().as_millis() as u64));
                }
            }
        }
        if t0.elapsed() > Duration::from_secs(90) {
            break Err(anyhow::anyhow!(
                "VM {name} did not run elsewhere (first heartbeat) within 90 s of cutting {from} off (reported Running: {running:?}); logs in {}",
                g.cluster.log_dir().display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    node.ns.restore(&node.uplink)?;
    let report = result?;
    // The node is back: its agent must clean up, not start the VM again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while dirs[i].exists() {
        if vmm_pid(&dirs[i]).is_some_and(alive) {
            bail!("{from} started {name} again after coming back");
        }
        if Instant::now() > deadline {
            bail!("{from} kept {} after coming back", dirs[i].display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(report)
}
