//! DRS: keeps the nodes' measured load balanced with live migrations.
//!
//! The node agents publish what their VMMs measurably use in their
//! GodwitNode (`status.usage`, see [`NodeUsage`]). Every `--drs-interval` (default
//! 5 minutes) the balancer lists the cluster and asks [`balance`], a pure
//! function over plain data, for a plan:
//!
//! - a node's load is the larger of its CPU share (measured VMM CPU time per
//!   second over its VM CPUs) and its memory share (VMM resident memory over
//!   its VM memory); the imbalance is the standard deviation of the loads of
//!   the ready, schedulable nodes;
//! - while the imbalance is above `--drs-threshold`, it picks the move (a
//!   running VM with `evictionStrategy: LiveMigrate` to another node) that
//!   lowers the imbalance most per byte of guest memory moved, among the
//!   moves the scheduler allows (capacity, selectors, taints, affinity and
//!   anti-affinity, through [`scheduler::evaluate`] with the moves chosen so
//!   far applied) and the free migration slots (per node and per cluster);
//! - it stops when within the threshold, when no move helps, or when the
//!   slots are used up. While a migration is unfinished or ended less than
//!   [`SETTLE`] ago, it waits: the usage figures are not settled.
//!
//! `--drs-mode manual` only recommends; `automatic` creates a VMMigration
//! (label [`DRS_LABEL`]`=true`, with `targetNode`) per recommendation. Either
//! way each recommendation gets an Event on its VM, and the last plan is kept
//! as JSON ([`DrsStatus`]) under the key `status` of the ConfigMap
//! [`STATUS_CONFIGMAP`] in the operator's namespace (`--lease-namespace`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use godwit_crds::contract::{NodeUsage, DRS_LABEL, USAGE_PERIOD_SECONDS};
use godwit_crds::{
    EvictionStrategy, MigrationMode, StorageMode, VMMigration, VMMigrationSpec, VirtualMachine,
    VmPhase,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use crate::config::{DrsMode, MigrationLimits};
use crate::context::{Context, Note};
use crate::scheduler::{self, PlacedVm, Reserve, Strategy};
use crate::view::{self, local_writable_disk, migration_phase, ClusterView, Snapshot};

/// The ConfigMap (in the operator's namespace) holding the last plan.
pub const STATUS_CONFIGMAP: &str = "godwit-drs";
/// How long after a migration the balancer waits for usage to settle.
pub const SETTLE: Duration = Duration::from_secs(2 * USAGE_PERIOD_SECONDS + 2);

/// One recommended move.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    /// The VM's namespace.
    pub namespace: String,
    /// The VM.
    pub vm: String,
    /// Where it runs.
    pub from: String,
    /// Where it should go.
    pub to: String,
    /// Guest memory moved.
    pub memory_bytes: u64,
    /// Why, in words.
    pub reason: String,
}

/// The balancer's plan and what it saw, as kept in [`STATUS_CONFIGMAP`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrsStatus {
    /// When the plan was made.
    pub time: String,
    /// `off`, `manual` or `automatic`.
    pub mode: String,
    /// The tolerated imbalance.
    pub threshold: f64,
    /// Imbalance before the recommended moves.
    pub imbalance: f64,
    /// Imbalance expected after them.
    pub expected_imbalance: f64,
    /// Each balanced node's load (0..1 and above when overcommitted).
    pub loads: BTreeMap<String, f64>,
    /// What to move.
    pub recommendations: Vec<Recommendation>,
    /// Why nothing (more) is recommended.
    pub note: String,
}

/// A VM as the balancer sees it.
#[derive(Clone, Debug)]
struct Guest {
    index: usize,
    node: String,
    cpu: f64,
    rss: f64,
    size: u64,
    movable: bool,
}

fn stddev(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt()
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Decides which migrations balance the cluster. `usage` is each node's
/// published [`NodeUsage`]; `vms` all VMs (the same list `cluster` was built
/// from); `now` the time of the decision.
#[allow(clippy::too_many_arguments)]
pub fn balance(
    cluster: &ClusterView,
    usage: &BTreeMap<String, NodeUsage>,
    vms: &[VirtualMachine],
    threshold: f64,
    limits: MigrationLimits,
    reserve: Reserve,
    strategy: Strategy,
    now: Timestamp,
) -> DrsStatus {
    let mut status = DrsStatus {
        time: now.to_string(),
        threshold,
        ..Default::default()
    };
    let nodes: Vec<&scheduler::NodeInfo> = cluster
        .nodes
        .iter()
        .filter(|n| n.ready && n.schedulable)
        .collect();
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let measured = |vm: &VirtualMachine| {
        let key = format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any());
        let node = view::vm_node(vm)?;
        usage.get(node).and_then(|u| u.vms.get(&key)).copied()
    };
    let mut guests: Vec<Guest> = vms
        .iter()
        .enumerate()
        .filter_map(|(index, vm)| {
            let node = view::vm_node(vm)?;
            if !names.contains(&node)
                || matches!(view::vm_phase(vm), VmPhase::Stopped | VmPhase::Failed)
            {
                return None;
            }
            let u = measured(vm).unwrap_or_default();
            Some(Guest {
                index,
                node: node.to_string(),
                cpu: u.cpu_millis as f64 / 1000.0,
                rss: u.rss_bytes as f64,
                size: cluster.vm_resources(vm).memory,
                movable: view::vm_phase(vm) == VmPhase::Running
                    && vm.spec.eviction_strategy == EvictionStrategy::LiveMigrate
                    && vm.meta().deletion_timestamp.is_none(),
            })
        })
        .collect();
    let load_of = |node: &scheduler::NodeInfo, guests: &[Guest]| {
        let (cpu, rss) = guests
            .iter()
            .filter(|g| g.node == node.name)
            .fold((0.0, 0.0), |(c, r), g| (c + g.cpu, r + g.rss));
        let cpu_share = cpu * 1000.0 / (node.capacity.cpu.max(1) as f64);
        let mem_share = rss / (node.capacity.memory.max(1) as f64);
        cpu_share.max(mem_share)
    };
    let loads =
        |guests: &[Guest]| -> Vec<f64> { nodes.iter().map(|n| load_of(n, guests)).collect() };
    let mut current = loads(&guests);
    status.loads = names
        .iter()
        .zip(&current)
        .map(|(n, l)| (n.to_string(), round(*l)))
        .collect();
    status.imbalance = round(stddev(&current));
    status.expected_imbalance = status.imbalance;

    // Usage is not settled while migrations run or just ended.
    let settling = cluster.migrations.iter().find(|m| {
        let phase = migration_phase(m);
        !phase.is_final()
            || m.status
                .as_ref()
                .and_then(|s| s.end_time.as_ref())
                .is_some_and(|t| now.duration_since(t.0).as_secs() < SETTLE.as_secs() as i64)
    });
    if let Some(m) = settling {
        status.note = format!(
            "waiting for usage to settle after VMMigration {}/{}",
            m.namespace().unwrap_or_default(),
            m.name_any()
        );
        return status;
    }
    if nodes.len() < 2 {
        status.note = "fewer than two nodes to balance".into();
        return status;
    }
    let mut slots_cluster = limits.per_cluster;
    let mut slots: BTreeMap<&str, usize> = names.iter().map(|n| (*n, limits.per_node)).collect();
    let mut placed: Vec<PlacedVm> = cluster.placed.clone();

    loop {
        let before = stddev(&current);
        if before <= threshold {
            status.note = format!("within the threshold ({:.3} <= {threshold})", before);
            break;
        }
        if slots_cluster == 0 {
            status.note = "no migration slot left in the cluster".into();
            break;
        }
        // (score, gain, guest, target)
        let mut best: Option<(f64, f64, usize, usize)> = None;
        for (gi, g) in guests.iter().enumerate() {
            if !g.movable || slots.get(g.node.as_str()).copied().unwrap_or(0) == 0 {
                continue;
            }
            let vm = &vms[g.index];
            let request = view::request_for(vm, cluster.vm_resources(vm));
            for (ti, target) in nodes.iter().enumerate() {
                if target.name == g.node || slots[target.name.as_str()] == 0 {
                    continue;
                }
                let verdict =
                    scheduler::evaluate(&request, &[(*target).clone()], &placed, reserve, strategy);
                if !verdict.first().is_some_and(|(_, r)| r.is_ok()) {
                    continue;
                }
                let mut moved = guests.clone();
                moved[gi].node = target.name.clone();
                let gain = before - stddev(&loads(&moved));
                if gain <= 1e-6 {
                    continue;
                }
                let score = gain / (g.size.max(1) as f64);
                if best.is_none_or(|(s, ..)| score > s) {
                    best = Some((score, gain, gi, ti));
                }
            }
        }
        let Some((_, gain, gi, ti)) = best else {
            status.note = "no allowed move lowers the imbalance".into();
            break;
        };
        let vm = &vms[guests[gi].index];
        let from = guests[gi].node.clone();
        let to = nodes[ti].name.clone();
        guests[gi].node = to.clone();
        guests[gi].movable = false;
        let after = loads(&guests);
        let fi = names.iter().position(|n| *n == from).unwrap_or(0);
        let reason = format!(
            "load {from} {:.2} -> {:.2}, {to} {:.2} -> {:.2}; imbalance {:.3} -> {:.3} (threshold {threshold}), {} MiB moved",
            current[fi],
            after[fi],
            current[ti],
            after[ti],
            before,
            before - gain,
            guests[gi].size >> 20
        );
        current = after;
        slots_cluster -= 1;
        *slots.get_mut(from.as_str()).expect("balanced node") -= 1;
        *slots.get_mut(to.as_str()).expect("balanced node") -= 1;
        let (ns, name) = (vm.namespace().unwrap_or_default(), vm.name_any());
        for p in placed
            .iter_mut()
            .filter(|p| p.namespace == ns && p.name == name)
        {
            p.node = to.clone();
        }
        status.recommendations.push(Recommendation {
            namespace: ns,
            vm: name,
            from,
            to,
            memory_bytes: guests[gi].size,
            reason,
        });
    }
    status.expected_imbalance = round(stddev(&current));
    status
}

/// Runs the balancer every `interval` until the task is dropped (at once
/// when the mode is off).
pub async fn run(ctx: Arc<Context>) {
    let drs = ctx.config.drs;
    if drs.mode == DrsMode::Off {
        return;
    }
    info!(mode = %drs.mode, interval = ?drs.interval, threshold = drs.threshold, "DRS balancer on");
    loop {
        tokio::time::sleep(drs.interval).await;
        if let Err(e) = pass(&ctx).await {
            warn!(error = %e, "DRS pass failed; retrying at the next interval");
        }
    }
}

async fn pass(ctx: &Context) -> Result<(), kube::Error> {
    let drs = ctx.config.drs;
    let snapshot = Snapshot::fetch(&ctx.client, &ctx.config.lease_namespace).await?;
    let now = Timestamp::now();
    let cluster = ClusterView::build(&snapshot, now, ctx.config.cpu_allocation_ratio);
    let usage: BTreeMap<String, NodeUsage> = snapshot
        .godwit_nodes
        .iter()
        .filter_map(|g| Some((g.name_any(), g.status.as_ref()?.usage.clone()?)))
        .collect();
    let mut status = balance(
        &cluster,
        &usage,
        &snapshot.vms,
        drs.threshold,
        ctx.config.migrations,
        ctx.config.reserve,
        ctx.config.placement,
        now,
    );
    status.mode = drs.mode.to_string();
    for r in &status.recommendations {
        let vm = snapshot.vms.iter().find(|v| {
            v.namespace().as_deref() == Some(r.namespace.as_str()) && v.name_any() == r.vm
        });
        let Some(vm) = vm else { continue };
        let note = if drs.mode == DrsMode::Automatic {
            let name = format!(
                "{}-drs-{}",
                r.vm.chars().take(220).collect::<String>(),
                now.as_second()
            );
            let m = VMMigration {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(r.namespace.clone()),
                    owner_references: vm.owner_ref(&()).map(|o| vec![o]),
                    labels: Some(BTreeMap::from([(
                        DRS_LABEL.to_string(),
                        "true".to_string(),
                    )])),
                    ..Default::default()
                },
                spec: VMMigrationSpec {
                    vm_name: r.vm.clone(),
                    target_node: Some(r.to.clone()),
                    mode: MigrationMode::Live,
                    storage: local_writable_disk(vm).map(|_| StorageMode::Copy),
                    ..Default::default()
                },
                status: None,
            };
            Api::<VMMigration>::namespaced(ctx.client.clone(), &r.namespace)
                .create(&PostParams::default(), &m)
                .await?;
            Note::normal(
                "DRSMigration",
                format!(
                    "DRS moves the VM from {} to {} (VMMigration {name}): {}",
                    r.from, r.to, r.reason
                ),
            )
        } else {
            Note::normal(
                "DRSRecommendation",
                format!(
                    "DRS recommends moving the VM from {} to {}: {}",
                    r.from, r.to, r.reason
                ),
            )
        };
        info!(vm = %format!("{}/{}", r.namespace, r.vm), from = %r.from, to = %r.to, "{}", note.message);
        ctx.publish(&vm.object_ref(&()), "Balance", &note).await;
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(STATUS_CONFIGMAP.into()),
            namespace: Some(ctx.config.lease_namespace.clone()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "status".to_string(),
            serde_json::to_string_pretty(&status).unwrap_or_default(),
        )])),
        ..Default::default()
    };
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.lease_namespace);
    let patch = json!({"data": cm.data});
    match api
        .patch(
            STATUS_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {
            api.create(&PostParams::default(), &cm).await?;
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use godwit_crds::{MigrationPhase, VMMigrationStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::fixtures::{
        apart_from, migration, node, t0, view_of, vm, MigrationFixture, VmFixture,
    };

    /// Three 4-CPU, 8 GiB nodes; `vms` with measured (cpu millis, rss MiB).
    fn plan(
        vms: &[(VirtualMachine, u64, u64)],
        migrations: Vec<VMMigration>,
        threshold: f64,
        limits: MigrationLimits,
    ) -> DrsStatus {
        let list: Vec<VirtualMachine> = vms.iter().map(|(v, ..)| v.clone()).collect();
        let cluster = view_of(
            vec![node("a", 4, 8), node("b", 4, 8), node("c", 4, 8)],
            list.clone(),
            migrations,
        );
        let mut usage: BTreeMap<String, NodeUsage> = BTreeMap::new();
        for (vm, cpu, rss) in vms {
            let u = usage
                .entry(view::vm_node(vm).unwrap().to_string())
                .or_default();
            u.vms.insert(
                format!("default/{}", vm.name_any()),
                godwit_crds::contract::VmUsage {
                    cpu_millis: *cpu,
                    rss_bytes: rss << 20,
                },
            );
        }
        balance(
            &cluster,
            &usage,
            &list,
            threshold,
            limits,
            Reserve::default(),
            Strategy::Spread,
            t0(),
        )
    }

    fn moves(s: &DrsStatus) -> Vec<(&str, &str, &str)> {
        s.recommendations
            .iter()
            .map(|r| (r.vm.as_str(), r.from.as_str(), r.to.as_str()))
            .collect()
    }

    fn busy(name: &str, node: &str, mem_gi: u64) -> VirtualMachine {
        vm(name).on(node).running().sized(1, mem_gi)
    }

    #[test]
    fn three_busy_vms_on_one_node_are_spread() {
        let vms = vec![
            (busy("v1", "a", 1), 1000, 100),
            (busy("v2", "a", 1), 1000, 100),
            (busy("v3", "a", 1), 1000, 100),
        ];
        let s = plan(
            &vms,
            vec![],
            0.05,
            MigrationLimits {
                per_node: 4,
                per_cluster: 5,
            },
        );
        assert_eq!(s.loads["a"], 0.75);
        assert_eq!(moves(&s), [("v1", "a", "b"), ("v2", "a", "c")]);
        assert!(s.expected_imbalance < s.imbalance);
        assert!(s.expected_imbalance <= 0.05, "{s:?}");
        assert!(s.recommendations[0].reason.contains("imbalance"), "{s:?}");
    }

    #[test]
    fn the_smallest_guest_that_helps_as_much_moves_first() {
        // Same CPU, different memory: moving the small one costs less.
        let vms = vec![
            (busy("big", "a", 4), 1000, 100),
            (busy("small", "a", 1), 1000, 100),
        ];
        let s = plan(&vms, vec![], 0.2, MigrationLimits::default());
        assert_eq!(moves(&s)[0].0, "small");
    }

    #[test]
    fn a_balanced_cluster_and_idle_vms_stay_put() {
        let vms = vec![
            (busy("v1", "a", 1), 1000, 100),
            (busy("v2", "b", 1), 1000, 100),
            (busy("v3", "c", 1), 1000, 100),
        ];
        let s = plan(&vms, vec![], 0.05, MigrationLimits::default());
        assert!(s.recommendations.is_empty());
        assert!(s.note.contains("within the threshold"), "{}", s.note);
        // A high threshold tolerates an unbalanced cluster.
        let lopsided = vec![
            (busy("v1", "a", 1), 1000, 100),
            (busy("v2", "a", 1), 1000, 100),
        ];
        assert!(plan(&lopsided, vec![], 0.5, MigrationLimits::default())
            .recommendations
            .is_empty());
    }

    #[test]
    fn migration_slots_bound_the_plan() {
        let vms = vec![
            (busy("v1", "a", 1), 1000, 100),
            (busy("v2", "a", 1), 1000, 100),
            (busy("v3", "a", 1), 1000, 100),
        ];
        let one = MigrationLimits {
            per_node: 1,
            per_cluster: 5,
        };
        assert_eq!(plan(&vms, vec![], 0.01, one).recommendations.len(), 1);
        let cluster_one = MigrationLimits {
            per_node: 4,
            per_cluster: 1,
        };
        assert_eq!(
            plan(&vms, vec![], 0.01, cluster_one).recommendations.len(),
            1
        );
    }

    #[test]
    fn it_waits_while_migrations_run_or_just_ended() {
        let vms = vec![
            (busy("v1", "a", 1), 1000, 100),
            (busy("v2", "a", 1), 1000, 100),
        ];
        let running = migration("m", "v1").phase(MigrationPhase::PreCopy);
        let s = plan(&vms, vec![running], 0.01, MigrationLimits::default());
        assert!(
            s.recommendations.is_empty() && s.note.contains("settle"),
            "{s:?}"
        );
        let ended = |ago: i64| {
            migration("m", "v1").with_status(VMMigrationStatus {
                phase: MigrationPhase::Succeeded,
                end_time: Some(Time(
                    t0().checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(ago))
                        .unwrap(),
                )),
                ..Default::default()
            })
        };
        assert!(plan(&vms, vec![ended(3)], 0.01, MigrationLimits::default())
            .recommendations
            .is_empty());
        assert_eq!(
            plan(&vms, vec![ended(600)], 0.01, MigrationLimits::default())
                .recommendations
                .len(),
            1
        );
    }

    #[test]
    fn balancing_never_breaks_anti_affinity_or_affinity() {
        // guard on b keeps every "db" VM away from b; db-1 and db-2 keep apart.
        let mut guard = busy("guard", "b", 1).label("app", "guard");
        guard.spec.affinity = Some(apart_from("db"));
        let mut db1 = busy("db-1", "a", 1).label("app", "db");
        db1.spec.affinity = Some(apart_from("db"));
        let db2 = busy("db-2", "c", 1).label("app", "db");
        let web = busy("web", "a", 1);
        let vms = vec![
            (guard, 0, 10),
            (db1, 2000, 100),
            (web, 2000, 100),
            (db2, 0, 10),
        ];
        let s = plan(&vms, vec![], 0.01, MigrationLimits::default());
        for (vm, _, to) in moves(&s) {
            assert!(
                !(vm.starts_with("db") && (to == "b" || to == "c")),
                "{vm} to {to}: {s:?}"
            );
        }
        assert!(
            moves(&s).contains(&("web", "a", "b")) || moves(&s).contains(&("web", "a", "c")),
            "{s:?}"
        );
    }

    #[test]
    fn shutdown_vms_and_nodes_in_maintenance_are_left_out() {
        let mut pinned = busy("pinned", "a", 1);
        pinned.spec.eviction_strategy = EvictionStrategy::Shutdown;
        let vms = vec![(pinned, 2000, 100), (busy("v", "a", 1), 10, 100)];
        let s = plan(&vms, vec![], 0.01, MigrationLimits::default());
        assert!(moves(&s).iter().all(|(vm, ..)| *vm != "pinned"), "{s:?}");
    }
}
