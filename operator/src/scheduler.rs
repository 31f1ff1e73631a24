//! Placement: which node runs a VM. A pure function over plain data (nodes,
//! the VMs already placed, the request), so every rule is unit-tested without
//! an API server; the controllers only gather the data and write the answer.
//!
//! Filters, each with the reason a node was refused: the node is ready and
//! schedulable (lease fresh, not cordoned, not in maintenance, not excluded);
//! the VM fits in what is free after the failover reserve; `nodeSelector`
//! matches; every `NoSchedule`/`NoExecute` taint is tolerated; no VM on the node
//! matches the VM's anti-affinity (or has anti-affinity matching the VM); for
//! each affinity term some VM on the node matches it (a term nothing in the
//! cluster matches yet is ignored, so the first VM of a group can start).
//! Scores: `Spread` prefers the node with the largest free share, `Pack` the
//! smallest; ties go to the node name, so the answer is deterministic.
//!
//! CPU is counted in millicores: a VM takes its vCPUs divided by the
//! cluster's `cpuAllocationRatio` (see [`crate::reservations::footprint`]),
//! memory its guest memory plus the VMM overhead. What is in use on a node is
//! its placed VMs plus [`NodeInfo::pods`], the requests of the node's other
//! pods (built by [`crate::view`]).

use std::collections::BTreeMap;
use std::fmt;

use godwit_crds::vm::VmAffinity;
use k8s_openapi::api::core::v1::{Taint, Toleration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

/// CPU and memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// Millicores (a VM's are its vCPUs divided by the allocation ratio).
    pub cpu: u64,
    /// Bytes.
    pub memory: u64,
}

impl std::ops::Add for Resources {
    type Output = Resources;

    fn add(self, o: Resources) -> Resources {
        Resources {
            cpu: self.cpu + o.cpu,
            memory: self.memory + o.memory,
        }
    }
}

/// A node as the scheduler sees it.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Node taints.
    pub taints: Vec<Taint>,
    /// Lease fresh and agent reporting.
    pub ready: bool,
    /// Not cordoned and not in maintenance.
    pub schedulable: bool,
    /// What the node offers VMs.
    pub capacity: Resources,
    /// What pods bound to the node request, beyond the VMs placed there
    /// and [`NodeInfo::held`].
    pub pods: Resources,
    /// Reservation pods on the node whose VM is not placed there.
    pub held: Vec<Held>,
}

/// A reservation pod on a node whose VM is not placed there: one a placement
/// made before its VM write failed, or one its VM outlived. It holds room
/// for every VM but its own, so a placement that failed half-way never
/// blocks its own retry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// The VM's namespace.
    pub namespace: String,
    /// The VM's name.
    pub vm: String,
    /// What the pod requests.
    pub resources: Resources,
}

/// A VM already placed on a node (running, starting or migrating there).
#[derive(Clone, Debug, Default)]
pub struct PlacedVm {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The node it occupies.
    pub node: String,
    /// What it uses.
    pub resources: Resources,
    /// Its own anti-affinity, which binds VMs placed after it too.
    pub affinity: Option<VmAffinity>,
}

/// What to place.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// What it needs.
    pub resources: Resources,
    /// Required node labels.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerated taints.
    pub tolerations: Vec<Toleration>,
    /// VM affinity rules.
    pub affinity: Option<VmAffinity>,
    /// Nodes that must not be chosen (a migration's source).
    pub exclude: Vec<String>,
}

/// Whether to spread VMs over nodes or pack them onto few.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Prefer the emptiest node.
    #[default]
    Spread,
    /// Prefer the fullest node that fits.
    Pack,
}

impl Strategy {
    /// The flag and log spelling: `spread` or `pack`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Spread => "spread",
            Strategy::Pack => "pack",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A placement strategy other than `spread` or `pack`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement strategy {0:?}: use spread or pack")]
pub struct UnknownStrategy(pub String);

impl std::str::FromStr for Strategy {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spread" => Ok(Strategy::Spread),
            "pack" => Ok(Strategy::Pack),
            other => Err(UnknownStrategy(other.to_string())),
        }
    }
}

/// Why a node was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Lease expired or agent absent.
    NotReady,
    /// Cordoned or in maintenance.
    Unschedulable,
    /// Excluded by the request.
    Excluded,
    /// Not enough free CPU.
    Cpu { need: u64, free: u64 },
    /// Not enough free memory.
    Memory { need: u64, free: u64 },
    /// `nodeSelector` does not match.
    Selector,
    /// A taint is not tolerated.
    Taint(String),
    /// An anti-affinity rule forbids it.
    AntiAffinity(String),
    /// An affinity rule is not met.
    Affinity,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotReady => write!(f, "node not ready"),
            Refusal::Unschedulable => write!(f, "node cordoned or in maintenance"),
            Refusal::Excluded => write!(f, "node excluded"),
            Refusal::Cpu { need, free } => {
                write!(f, "insufficient cpu (need {need}m, free {free}m)")
            }
            Refusal::Memory { need, free } => {
                write!(
                    f,
                    "insufficient memory (need {}Mi, free {}Mi)",
                    need >> 20,
                    free >> 20
                )
            }
            Refusal::Selector => write!(f, "nodeSelector does not match"),
            Refusal::Taint(t) => write!(f, "untolerated taint {t}"),
            Refusal::AntiAffinity(vm) => write!(f, "anti-affinity with VM {vm}"),
            Refusal::Affinity => write!(f, "affinity rule not met"),
        }
    }
}

/// No node can take the VM; says why for each node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no node can run the VM: {}", .0.iter().map(|(n, r)| format!("{n}: {r}")).collect::<Vec<_>>().join("; "))]
pub struct Unschedulable(pub Vec<(String, Refusal)>);

/// Capacity held back on every node so the cluster can absorb a node failure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reserve {
    /// Percent of each node's CPU and memory kept free for HA restarts.
    pub percent: u8,
}

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = match t.operator.as_deref().unwrap_or("Equal") {
            "Exists" => t
                .key
                .as_deref()
                .is_none_or(|k| k.is_empty() || k == taint.key),
            _ => {
                t.key.as_deref() == Some(taint.key.as_str())
                    && t.value.as_deref() == taint.value.as_deref()
            }
        };
        effect_ok && key_ok
    })
}

/// Resources in use on `node`.
/// Whether `selector` selects a VM with `labels`, as Kubernetes evaluates
/// it (kube's [`Selector`]). A selector kube cannot read (an operator the
/// CRD's enum refuses at admission) selects nothing.
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

pub fn used(node: &str, placed: &[PlacedVm]) -> Resources {
    placed
        .iter()
        .filter(|v| v.node == node)
        .fold(Resources::default(), |acc, v| acc + v.resources)
}

fn same_vm(v: &PlacedVm, req: &Request) -> bool {
    v.namespace == req.namespace && v.name == req.name
}

/// Checks one node; `Ok` with its score (higher is better) or the refusal.
fn check(
    node: &NodeInfo,
    req: &Request,
    placed: &[PlacedVm],
    reserve: Reserve,
    strategy: Strategy,
) -> Result<i64, Refusal> {
    if req.exclude.contains(&node.name) {
        return Err(Refusal::Excluded);
    }
    if !node.ready {
        return Err(Refusal::NotReady);
    }
    if !node.schedulable {
        return Err(Refusal::Unschedulable);
    }
    if !req
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v))
    {
        return Err(Refusal::Selector);
    }
    for taint in &node.taints {
        if matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
            && !tolerates(&req.tolerations, taint)
        {
            return Err(Refusal::Taint(format!(
                "{}={}:{}",
                taint.key,
                taint.value.as_deref().unwrap_or(""),
                taint.effect
            )));
        }
    }
    // The VM itself may already count on this node (re-placement): do not
    // count it twice.
    let others: Vec<&PlacedVm> = placed.iter().filter(|v| !same_vm(v, req)).collect();
    let on_node: Vec<&&PlacedVm> = others.iter().filter(|v| v.node == node.name).collect();
    let held = node
        .held
        .iter()
        .filter(|h| !(h.namespace == req.namespace && h.vm == req.name))
        .fold(node.pods, |a, h| a + h.resources);
    let in_use = on_node.iter().fold(held, |a, v| a + v.resources);
    let keep = |total: u64| total * u64::from(reserve.percent) / 100;
    let free_cpu = node
        .capacity
        .cpu
        .saturating_sub(keep(node.capacity.cpu))
        .saturating_sub(in_use.cpu);
    let free_mem = node
        .capacity
        .memory
        .saturating_sub(keep(node.capacity.memory))
        .saturating_sub(in_use.memory);
    if req.resources.cpu > free_cpu {
        return Err(Refusal::Cpu {
            need: req.resources.cpu,
            free: free_cpu,
        });
    }
    if req.resources.memory > free_mem {
        return Err(Refusal::Memory {
            need: req.resources.memory,
            free: free_mem,
        });
    }
    if let Some(aff) = &req.affinity {
        for term in &aff.vm_anti_affinity {
            if let Some(v) = on_node
                .iter()
                .find(|v| v.namespace == req.namespace && selects(&term.label_selector, &v.labels))
            {
                return Err(Refusal::AntiAffinity(v.name.clone()));
            }
        }
        for term in &aff.vm_affinity {
            let matching = |v: &&&PlacedVm| {
                v.namespace == req.namespace && selects(&term.label_selector, &v.labels)
            };
            let anywhere = others.iter().any(|v| matching(&v));
            if anywhere && !on_node.iter().any(matching) {
                return Err(Refusal::Affinity);
            }
        }
    }
    // Anti-affinity is symmetric: a VM already there may refuse us.
    for v in &on_node {
        let refuses = v.affinity.as_ref().is_some_and(|a| {
            v.namespace == req.namespace
                && a.vm_anti_affinity
                    .iter()
                    .any(|t| selects(&t.label_selector, &req.labels))
        });
        if refuses {
            return Err(Refusal::AntiAffinity(v.name.clone()));
        }
    }
    let free_after = free_mem - req.resources.memory;
    let share = (free_after as u128 * 1_000_000 / node.capacity.memory.max(1) as u128) as i64;
    Ok(match strategy {
        Strategy::Spread => share,
        Strategy::Pack => -share,
    })
}

/// Every node's verdict for `req`: its score (higher is better) or why it
/// was refused, in the order of `nodes`.
pub fn evaluate(
    req: &Request,
    nodes: &[NodeInfo],
    placed: &[PlacedVm],
    reserve: Reserve,
    strategy: Strategy,
) -> Vec<(String, Result<i64, Refusal>)> {
    nodes
        .iter()
        .map(|n| (n.name.clone(), check(n, req, placed, reserve, strategy)))
        .collect()
}

/// The best node for `req`, or why none fits.
pub fn place(
    req: &Request,
    nodes: &[NodeInfo],
    placed: &[PlacedVm],
    reserve: Reserve,
    strategy: Strategy,
) -> Result<String, Unschedulable> {
    best(evaluate(req, nodes, placed, reserve, strategy))
}

/// The best-scoring node of an [`evaluate`] result (ties to the first name),
/// or every refusal.
pub fn best(verdicts: Vec<(String, Result<i64, Refusal>)>) -> Result<String, Unschedulable> {
    let mut best: Option<(i64, String)> = None;
    let mut refusals = Vec::new();
    for (name, verdict) in verdicts {
        match verdict {
            Ok(score) => {
                let better = match &best {
                    None => true,
                    Some((s, n)) => score > *s || (score == *s && name < *n),
                };
                if better {
                    best = Some((score, name));
                }
            }
            Err(r) => refusals.push((name, r)),
        }
    }
    best.map(|(_, n)| n).ok_or(Unschedulable(refusals))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::app_term;

    const GI: u64 = 1 << 30;

    #[test]
    fn selectors_select_like_kubernetes() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let expr = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        };
        let l = map(&[("app", "db"), ("tier", "gold")]);
        let mut s = LabelSelector {
            match_labels: Some(map(&[("app", "db")])),
            ..Default::default()
        };
        assert!(selects(&s, &l));
        s.match_expressions = Some(vec![expr("tier", "In", &["gold", "silver"])]);
        assert!(selects(&s, &l));
        s.match_expressions = Some(vec![expr("tier", "NotIn", &["gold"])]);
        assert!(!selects(&s, &l));
        s.match_expressions = Some(vec![expr("zone", "DoesNotExist", &[])]);
        assert!(selects(&s, &l));
        s.match_expressions = Some(vec![expr("zone", "Exists", &[])]);
        assert!(!selects(&s, &l));
        // An operator kube cannot read selects nothing.
        s.match_expressions = Some(vec![expr("app", "Equals", &["db"])]);
        assert!(!selects(&s, &l));
        assert!(selects(&LabelSelector::default(), &l));
    }

    fn node(name: &str, cpu: u64, mem_gi: u64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ready: true,
            schedulable: true,
            capacity: Resources {
                cpu,
                memory: mem_gi * GI,
            },
            ..Default::default()
        }
    }

    fn vm(name: &str, node: &str, app: &str, mem_gi: u64) -> PlacedVm {
        PlacedVm {
            namespace: "default".into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            node: node.into(),
            resources: Resources {
                cpu: 1,
                memory: mem_gi * GI,
            },
            affinity: None,
        }
    }

    fn req(mem_gi: u64) -> Request {
        Request {
            namespace: "default".into(),
            name: "new".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            resources: Resources {
                cpu: 1,
                memory: mem_gi * GI,
            },
            ..Default::default()
        }
    }

    #[test]
    fn spread_prefers_the_emptiest_node_and_pack_the_fullest() {
        let nodes = [node("a", 8, 8), node("b", 8, 8)];
        let placed = [vm("x", "a", "db", 4)];
        assert_eq!(
            place(
                &req(1),
                &nodes,
                &placed,
                Reserve::default(),
                Strategy::Spread
            ),
            Ok("b".into())
        );
        assert_eq!(
            place(&req(1), &nodes, &placed, Reserve::default(), Strategy::Pack),
            Ok("a".into())
        );
    }

    /// Places `count` one-vCPU 64 MiB VMs one after the other on three
    /// 4-CPU 8 GiB nodes at `ratio`; returns how many were placed and the
    /// first refusal.
    fn fill(count: usize, ratio: f64) -> (usize, Option<Unschedulable>) {
        let ratio = crate::reservations::CpuAllocationRatio::new(ratio).unwrap();
        let nodes: Vec<NodeInfo> = ["a", "b", "c"].iter().map(|n| node(n, 4000, 8)).collect();
        let mut placed: Vec<PlacedVm> = Vec::new();
        for i in 0..count {
            let mut r = req(0);
            r.name = format!("vm-{i}");
            r.resources = crate::reservations::footprint(1, 64 << 20, ratio);
            match place(&r, &nodes, &placed, Reserve::default(), Strategy::Spread) {
                Ok(n) => placed.push(PlacedVm {
                    name: r.name.clone(),
                    node: n,
                    resources: r.resources,
                    ..Default::default()
                }),
                Err(why) => return (i, Some(why)),
            }
        }
        (count, None)
    }

    #[test]
    fn vcpus_are_overcommitted_by_the_allocation_ratio() {
        // Ratio 10: a one-vCPU VM takes 100m, so 3 x 4 CPUs take 120.
        assert_eq!(fill(30, 10.0).0, 30);
        assert_eq!(fill(121, 10.0).0, 120);
        // Ratio 1: one vCPU is one CPU; the 13th finds no room.
        let (placed, why) = fill(13, 1.0);
        assert_eq!(placed, 12);
        let why = why.unwrap().to_string();
        assert!(
            why.contains("a: insufficient cpu (need 1000m, free 0m)"),
            "{why}"
        );
    }

    #[test]
    fn a_reservation_holds_room_for_every_vm_but_its_own() {
        // A placement made the pod, then its VM write failed: the retry
        // must not find its own reservation in the way.
        let mut a = node("a", 1000, 8);
        a.held = vec![Held {
            namespace: "default".into(),
            vm: "new".into(),
            resources: Resources {
                cpu: 1000,
                memory: GI,
            },
        }];
        let mut own = req(1);
        own.resources.cpu = 1000;
        assert_eq!(
            place(
                &own,
                &[a.clone()],
                &[],
                Reserve::default(),
                Strategy::Spread
            ),
            Ok("a".to_string())
        );
        let mut other = own.clone();
        other.name = "vm-2".into();
        let verdicts = evaluate(&other, &[a], &[], Reserve::default(), Strategy::Spread);
        assert_eq!(
            verdicts[0].1,
            Err(Refusal::Cpu {
                need: 1000,
                free: 0
            })
        );
    }

    #[test]
    fn pods_on_a_node_count_besides_its_vms() {
        let mut busy = node("a", 4000, 8);
        busy.pods = Resources {
            cpu: 3500,
            memory: 2 * GI,
        };
        let nodes = [busy, node("b", 4000, 8)];
        let mut r = req(1);
        r.resources.cpu = 1000;
        let verdicts = evaluate(&r, &nodes, &[], Reserve::default(), Strategy::Spread);
        assert_eq!(
            verdicts[0].1,
            Err(Refusal::Cpu {
                need: 1000,
                free: 500
            })
        );
        assert!(verdicts[1].1.is_ok());
        r.resources.cpu = 400;
        let placed = [vm("x", "a", "db", 6)];
        let verdicts = evaluate(&r, &nodes, &placed, Reserve::default(), Strategy::Spread);
        assert_eq!(
            verdicts[0].1,
            Err(Refusal::Memory { need: GI, free: 0 }),
            "2 GiB of pods and a 6 GiB VM fill 8 GiB"
        );
    }

    #[test]
    fn ties_go_to_the_first_name() {
        let nodes = [node("b", 8, 8), node("a", 8, 8)];
        assert_eq!(
            place(&req(1), &nodes, &[], Reserve::default(), Strategy::Spread),
            Ok("a".into())
        );
    }

    #[test]
    fn capacity_and_reserve_are_honoured_with_reasons() {
        let nodes = [node("a", 8, 4)];
        let placed = [vm("x", "a", "db", 3)];
        let err = place(
            &req(2),
            &nodes,
            &placed,
            Reserve::default(),
            Strategy::Spread,
        )
        .unwrap_err();
        assert_eq!(
            err.0[0].1,
            Refusal::Memory {
                need: 2 * GI,
                free: GI
            }
        );
        assert!(err
            .to_string()
            .contains("insufficient memory (need 2048Mi, free 1024Mi)"));
        // 50% held back for failover: 2 GiB usable, 1 GiB asked with nothing placed.
        assert!(place(
            &req(2),
            &nodes,
            &[],
            Reserve { percent: 50 },
            Strategy::Spread
        )
        .is_ok());
        assert!(place(
            &req(3),
            &nodes,
            &[],
            Reserve { percent: 50 },
            Strategy::Spread
        )
        .is_err());
    }

    #[test]
    fn a_vm_already_on_a_node_is_not_counted_twice() {
        let nodes = [node("a", 8, 4)];
        let placed = [vm("new", "a", "web", 3)];
        assert_eq!(
            place(
                &req(3),
                &nodes,
                &placed,
                Reserve::default(),
                Strategy::Spread
            ),
            Ok("a".into())
        );
    }

    #[test]
    fn not_ready_cordoned_and_excluded_nodes_are_skipped() {
        let mut down = node("a", 8, 8);
        down.ready = false;
        let mut cordoned = node("b", 8, 8);
        cordoned.schedulable = false;
        let nodes = [down, cordoned, node("c", 8, 8), node("d", 8, 8)];
        let mut r = req(1);
        r.exclude = vec!["c".into()];
        assert_eq!(
            place(&r, &nodes, &[], Reserve::default(), Strategy::Spread),
            Ok("d".into())
        );
    }

    #[test]
    fn selectors_and_taints() {
        let mut gpu = node("gpu", 8, 8);
        gpu.labels.insert("hw".into(), "gpu".into());
        gpu.taints.push(Taint {
            key: "dedicated".into(),
            value: Some("gpu".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        });
        let nodes = [gpu, node("plain", 8, 8)];
        let mut r = req(1);
        r.node_selector.insert("hw".into(), "gpu".into());
        let err = place(&r, &nodes, &[], Reserve::default(), Strategy::Spread).unwrap_err();
        assert!(err
            .0
            .iter()
            .any(|(n, why)| n == "gpu" && matches!(why, Refusal::Taint(_))));
        r.tolerations.push(Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("gpu".into()),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        });
        assert_eq!(
            place(&r, &nodes, &[], Reserve::default(), Strategy::Spread),
            Ok("gpu".into())
        );
    }

    #[test]
    fn anti_affinity_both_ways_and_affinity() {
        let nodes = [node("a", 8, 8), node("b", 8, 8)];
        let placed = [vm("web-1", "a", "web", 1)];
        let mut r = req(1);
        r.affinity = Some(VmAffinity {
            vm_anti_affinity: vec![app_term("web")],
            ..Default::default()
        });
        // Pack would choose "a"; anti-affinity forbids it.
        assert_eq!(
            place(&r, &nodes, &placed, Reserve::default(), Strategy::Pack),
            Ok("b".into())
        );

        // The placed VM's own anti-affinity refuses a newcomer that matches it.
        let mut guarded = vm("db-1", "a", "db", 1);
        guarded.affinity = Some(VmAffinity {
            vm_anti_affinity: vec![app_term("web")],
            ..Default::default()
        });
        assert_eq!(
            place(
                &req(1),
                &nodes,
                &[guarded],
                Reserve::default(),
                Strategy::Pack
            ),
            Ok("b".into())
        );

        // Affinity to "db": only the node with a db VM, even when spreading.
        let mut r = req(1);
        r.affinity = Some(VmAffinity {
            vm_affinity: vec![app_term("db")],
            ..Default::default()
        });
        let placed = [vm("db-1", "a", "db", 4)];
        assert_eq!(
            place(&r, &nodes, &placed, Reserve::default(), Strategy::Spread),
            Ok("a".into())
        );
        // Nothing matches the term yet: any node will do.
        assert!(place(&r, &nodes, &[], Reserve::default(), Strategy::Spread).is_ok());
    }
}
