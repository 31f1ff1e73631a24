//! Cold migration, both sides on a node (VMMigration `mode: Cold`): a stopped VM's
//! disks and config move to the target node ([`crate::migration::cold`]
//! has the stream and its verification).
//!
//! The target agent, on `PreparingTarget`, marks the VM's directory as
//! incoming, listens on a migration port and publishes it as
//! `targetAddress`; when the source connects (mutual TLS with the node
//! certificates when the cluster has a migration CA) it writes the source's
//! `machine.json`, creates each travelling disk as a fresh VM on this node
//! would have it, receives the blocks and verifies them. A target that
//! fails removes its VM directory. The source agent, once `targetAddress`
//! is there, opens the VM's node-local writable disks read-only and locked
//! (no VMM can start on them meanwhile), reports `StopAndCopy`, sends, and
//! writes the result like a live migration's (`Committing`, `Succeeded`
//! with `modeUsed: Cold`). Its files are removed only after that, when the
//! operator has placed the VM on the target (the agent removes the files of
//! VMs no longer placed on its node).

use crate::agent::image_dirs::ImageDirs;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use godwit_crds::contract::Machine;
use godwit_crds::{MigrationPhase, VMMigration, VirtualMachine};
use kube::api::Api;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use serde_json::json;

use super::policy::{free_port, policy};
use crate::agent::context::{key, Agent, ColdTask};
use crate::agent::decide::MigrationFacts;
use crate::agent::vm_dir::{self, VmDir};
use crate::agent::{disks, report};
use crate::migration::cold::{self, ColdDisk, ColdOptions};
use crate::migration::connect::{dial, OutgoingTls};
use crate::migration::progress::{Progress, ProgressHandle, Stage};
use crate::migration::tls::{self, TlsIdentity};
use crate::migration::transport::Conn;
use crate::migration::MigrationError;
use crate::storage::DiskImage;

/// How long the target waits for the source to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long either side waits for the other's next word.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

fn task_key(role: &str, m: &VMMigration) -> String {
    format!(
        "{role}/{}",
        key(&m.namespace().unwrap_or_default(), &m.name_any())
    )
}

/// The node's migration identity, as it is now.
fn identity(agent: &Agent) -> Result<Option<TlsIdentity>, tls::TlsError> {
    agent.runner.tls.as_ref().map(TlsIdentity::load).transpose()
}

/// Drops this agent's record of its `role` in cold migration `m`.
pub fn forget(agent: &Agent, role: &str, m: &VMMigration) {
    agent.cold.lock().unwrap().remove(&task_key(role, m));
}

/// Target: listen for the source and publish the address.
pub async fn prepare_target(
    agent: &Agent,
    api: &Api<VMMigration>,
    m: &VMMigration,
    dir: &VmDir,
) -> anyhow::Result<()> {
    let tk = task_key("target", m);
    if agent.cold.lock().unwrap().contains_key(&tk) {
        return Ok(()); // listening; the address is on its way
    }
    let port = free_port(&agent.cfg.node_ip, agent.cfg.migration_ports).ok_or_else(|| {
        anyhow::anyhow!("no free migration port in {:?}", agent.cfg.migration_ports)
    })?;
    let addr = format!("{}:{port}", agent.cfg.node_ip);
    let listener = TcpListener::bind(&addr)?;
    let identity = identity(agent)?;
    dir.create()?;
    std::fs::write(dir.file("incoming"), m.name_any())?;
    let task = Arc::new(ColdTask {
        progress: Arc::default(),
        cancel: Arc::default(),
    });
    agent.cold.lock().unwrap().insert(tk, task.clone());
    let (d, vm_name) = (dir.clone(), m.spec.vm_name.clone());
    let image_dirs = agent.runner.image_dirs.clone();
    std::thread::Builder::new()
        .name("cold-receive".into())
        .spawn(move || {
            let result = receive(
                &listener,
                identity.as_ref(),
                &d,
                &vm_name,
                &image_dirs,
                &task.progress,
            );
            match result {
                Ok(()) => tracing::info!(vm = %vm_name, "cold migration received and verified"),
                Err(e) => {
                    tracing::warn!(vm = %vm_name, error = %godwit_crds::error_chain(&e), "cold migration failed on the target; removing what it wrote");
                    let _ = vm_dir::remove(&d, false);
                }
            }
        })?;
    report::patch(api, m, json!({"targetAddress": addr})).await?;
    agent
        .event(
            m,
            EventType::Normal,
            "TargetReady",
            "Prepare",
            format!(
                "{} waits for the stopped VM's disks on {addr}",
                agent.cfg.node
            ),
        )
        .await;
    Ok(())
}

/// Source: start sending once the target listens, then report.
pub async fn source(
    agent: &Agent,
    api: &Api<VMMigration>,
    m: &VMMigration,
    dir: &VmDir,
    facts: &MigrationFacts,
) -> anyhow::Result<()> {
    let tk = task_key("source", m);
    if facts.phase.is_final() {
        forget(agent, "source", m);
        return Ok(());
    }
    let task = agent.cold.lock().unwrap().get(&tk).cloned();
    if let Some(task) = task {
        if facts.cancel_requested {
            task.cancel
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        return report::outgoing(agent, api, m, &task.progress.get(), true).await;
    }
    let node = &agent.cfg.node;
    if facts.phase != MigrationPhase::PreparingTarget {
        // What a finished send left on file, else this agent restarted
        // while it ran.
        if std::fs::read_to_string(dir.file("outgoing"))
            .unwrap_or_default()
            .trim()
            == facts.name
        {
            if let Some(p) = std::fs::read_to_string(dir.file("outgoing-result"))
                .ok()
                .and_then(|t| serde_json::from_str::<Progress>(&t).ok())
            {
                return report::outgoing(agent, api, m, &p, true).await;
            }
        }
        let msg = format!("the source node agent restarted during the cold migration; nothing was removed, the VM stays stopped on {node}; start a new migration");
        return report::end(agent, api, m, MigrationPhase::Failed, &msg, None).await;
    }
    if facts.cancel_requested {
        let msg = format!("cancelled before anything was copied; the VM stays stopped on {node}");
        return report::end(agent, api, m, MigrationPhase::Cancelled, &msg, None).await;
    }
    let Some(addr) = facts.target_address.clone() else {
        return Ok(()); // waiting for the target
    };
    if dir.state().alive {
        let msg = format!("the VM's VMM runs on {node}: a cold migration moves a stopped VM");
        return report::end(agent, api, m, MigrationPhase::Failed, &msg, None).await;
    }
    let vm = agent.vm_of(m);
    let (machine, disks) = match open_source(dir, vm.as_deref()) {
        Ok(found) => found,
        Err(e) => {
            let msg = format!("{e:#}; the VM stays stopped on {node} with its disks");
            return report::end(agent, api, m, MigrationPhase::Failed, &msg, None).await;
        }
    };
    let policy = policy(m, vm.as_deref());
    let opts = ColdOptions {
        bandwidth: policy
            .bandwidth_mbps
            .map(|mbps| u64::from(mbps) * 1_000_000 / 8),
        stall_timeout: STALL_TIMEOUT,
    };
    let identity = identity(agent)?;
    let task = Arc::new(ColdTask {
        progress: Arc::default(),
        cancel: Arc::default(),
    });
    std::fs::write(dir.file("outgoing"), &facts.name)?;
    let _ = std::fs::remove_file(dir.file("outgoing-result"));
    agent.cold.lock().unwrap().insert(tk, task.clone());
    let (d, vm_name) = (dir.clone(), m.spec.vm_name.clone());
    std::thread::Builder::new()
        .name("cold-send".into())
        .spawn(move || {
            let tls = identity.map(|identity| OutgoingTls {
                identity,
                server_name: None,
            });
            let sent = dial(&addr, STALL_TIMEOUT, tls.as_ref()).and_then(|conn| {
                cold::send(
                    conn,
                    &vm_name,
                    &machine,
                    &disks,
                    &opts,
                    &task.progress,
                    &task.cancel,
                )
            });
            if let Err(e) = &sent {
                // A dial failure never reached `send`, which records its own.
                task.progress.update(|p| {
                    p.stage = Stage::Failed;
                    p.error.get_or_insert_with(|| godwit_crds::error_chain(e));
                });
            }
            drop(disks); // unlock before the result is seen
            if let Ok(text) = serde_json::to_string(&task.progress.get()) {
                let _ = std::fs::write(d.file("outgoing-result"), text);
            }
        })?;
    report::patch(api, m, json!({"phase": MigrationPhase::StopAndCopy})).await?;
    agent
        .event(
            m,
            EventType::Normal,
            "StopAndCopy",
            "Migrate",
            format!(
                "Copying the stopped VM's disks from {node} to {}",
                facts.target_address.as_deref().unwrap_or("?")
            ),
        )
        .await;
    Ok(())
}

/// The source's machine config (as its VM directory has it, else as the
/// operator resolved it) and its travelling disks that exist here, open
/// read-only and locked.
fn open_source(
    dir: &VmDir,
    vm: Option<&VirtualMachine>,
) -> anyhow::Result<(String, Vec<ColdDisk>)> {
    let text = match std::fs::read_to_string(dir.file("machine.json")) {
        Ok(text) => text,
        Err(_) => vm
            .and_then(|v| v.status.as_ref()?.machine.as_ref())
            .map(|m| m.to_string())
            .ok_or_else(|| anyhow::anyhow!("the VM has no resolved machine to move"))?,
    };
    let machine: Machine = serde_json::from_str(&text)?;
    let mut open = Vec::new();
    for i in disks::copied(&machine) {
        let path = disks::disk_file(dir, &machine.disks[i]);
        if !path.exists() {
            continue; // never made: the target makes it on first start
        }
        let image = DiskImage::open(&path, None, true, true).map_err(|e| {
            anyhow::anyhow!(
                "cannot open disk {:?} ({}) to copy it: {}",
                machine.disks[i].name,
                path.display(),
                godwit_crds::error_chain(&e)
            )
        })?;
        open.push(ColdDisk {
            index: i as u32,
            image,
        });
    }
    Ok((text, open))
}

/// The target's thread: one connection from the source, received into `dir`.
fn receive(
    listener: &TcpListener,
    identity: Option<&TlsIdentity>,
    dir: &VmDir,
    vm_name: &str,
    image_dirs: &ImageDirs,
    progress: &ProgressHandle,
) -> Result<(), MigrationError> {
    listener
        .set_nonblocking(true)
        .map_err(MigrationError::Socket)?;
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(MigrationError::Socket(e)),
        }
    };
    stream
        .set_nonblocking(false)
        .map_err(MigrationError::Socket)?;
    let conn = match identity {
        None => Conn::plain(stream),
        Some(identity) => {
            stream
                .set_read_timeout(Some(STALL_TIMEOUT))
                .map_err(MigrationError::Socket)?;
            let session = tls::accept(&stream, identity)?;
            Conn::tls(stream, session)
        }
    };
    let prepare = |hello: &cold::ColdHello| -> Result<Vec<ColdDisk>, MigrationError> {
        let bad = |e: Box<dyn std::error::Error + Send + Sync>| MigrationError::ColdPrepare(e);
        let machine: Machine = serde_json::from_str(&hello.machine).map_err(|e| bad(e.into()))?;
        // The disks are made from the template image the machine names:
        // only from where this node serves images.
        image_dirs
            .check_machine(&machine)
            .map_err(|e| bad(e.into()))?;
        std::fs::write(dir.file("machine.json"), &hello.machine).map_err(|e| bad(e.into()))?;
        let paths = disks::prepare_target(dir, &machine, true).map_err(|e| bad(e.into()))?;
        hello
            .disks
            .iter()
            .map(|o| {
                let path = paths
                    .get(o.index as usize)
                    .ok_or_else(|| bad(format!("disk {} is not in the machine", o.index).into()))?;
                let image = DiskImage::open(path, None, false, true).map_err(|e| {
                    MigrationError::ColdDisk(o.index as usize, "open on the target", e.into())
                })?;
                Ok(ColdDisk {
                    index: o.index,
                    image,
                })
            })
            .collect()
    };
    cold::receive(conn, vm_name, prepare, STALL_TIMEOUT, progress).map(drop)
}
