//! The target's side of a live migration: starting a VMM that waits for
//! the VM on a free migration port, and publishing where it listens
//! (`status.targetAddress`). A target that cannot prepare ends the VMM it
//! started, removes what it made and fails the migration. Once the
//! migration has failed (or is gone), the agent's pass ends the incoming VMM
//! and removes its directory (`DiscardIncoming`, or the pass's sweep of VM
//! directories nobody accounts for); a VMM whose directory went anyway is
//! killed by its cgroup ([`vmm_process::kill_orphans`]).

use std::time::Duration;

use godwit_crds::contract::{self, Machine};
use godwit_crds::{MigrationPhase, StorageMode, VMMigration, VirtualMachine};
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use serde_json::json;

use super::policy::free_port;
use crate::agent::context::Agent;
use crate::agent::vm_dir::{self, VmDir};
use crate::agent::{disks, report, seed, vmm_process};

/// Starts the incoming VMM for migration `m` and publishes its address.
pub async fn prepare(
    agent: &Agent,
    api: &Api<VMMigration>,
    m: &VMMigration,
    dir: &VmDir,
) -> anyhow::Result<()> {
    let vms: Api<VirtualMachine> =
        Api::namespaced(agent.client.clone(), &m.namespace().unwrap_or_default());
    let vm = vms.get(&m.spec.vm_name).await?;
    let machine: Machine = match contract::resolved_machine(&vm) {
        Some(machine) => machine,
        None => {
            return report::end(
                agent,
                api,
                m,
                MigrationPhase::Failed,
                "the VM has no resolved machine to receive",
                None,
            )
            .await;
        }
    };
    let copy_disks = m.spec.storage == Some(StorageMode::Copy);
    if let Some(disk) = machine
        .disks
        .iter()
        .find(|d| !copy_disks && disks::moves_with_vm(d))
    {
        let msg = format!(
            "disk {:?} is on node-local storage and writable; set spec.storage: Copy to copy it with the migration",
            disk.name
        );
        return report::end(agent, api, m, MigrationPhase::Failed, &msg, None).await;
    }
    let cfg = &agent.cfg;
    let port = free_port(&cfg.node_ip, cfg.migration_ports)
        .ok_or_else(|| anyhow::anyhow!("no free migration port in {:?}", cfg.migration_ports))?;
    let addr = format!("{}:{port}", cfg.node_ip);
    let runner = agent.runner.clone();
    let (d, name) = (dir.clone(), m.name_any());
    // The seed is rebuilt here, identically, before the VMM opens it.
    let started = match seed::write(&agent.client, dir, &machine).await {
        Ok(()) => tokio::task::spawn_blocking(move || {
            let mut child = runner.incoming(&d, &machine, &name, &addr, copy_disks)?;
            match vmm_process::wait_listening(&d, Duration::from_secs(10)) {
                Ok(a) => Ok((child, a)),
                Err(e) => {
                    // Not left behind with the VM's taps once its
                    // directory is gone (below).
                    vmm_process::stop(&d, Duration::from_secs(1));
                    let _ = child.kill();
                    let _ = child.wait();
                    Err(e)
                }
            }
        })
        .await?
        .map_err(anyhow::Error::from),
        Err(e) => Err(anyhow::Error::from(e)),
    };
    match started {
        Ok((child, listening)) => {
            agent.children.lock().unwrap().insert(dir, child);
            report::patch(api, m, json!({"targetAddress": listening})).await?;
            agent
                .event(
                    m,
                    EventType::Normal,
                    "TargetReady",
                    "Prepare",
                    format!("{} waits for the VM on {listening}", cfg.node),
                )
                .await;
        }
        Err(e) => {
            let msg = format!(
                "target {} could not prepare: {}",
                cfg.node,
                godwit_crds::error_chain(e.as_ref())
            );
            let d = dir.clone();
            let _ = tokio::task::spawn_blocking(move || vm_dir::remove(&d, false)).await;
            report::end(agent, api, m, MigrationPhase::Failed, &msg, None).await?;
        }
    }
    Ok(())
}
