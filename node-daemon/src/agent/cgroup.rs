//! Per-VM cgroups: every VMM runs in a cgroup of its own,
//! `<root>/<parent>/<namespace>_<name>`, outside the agent's container, with
//! limits from its VM's spec.
//!
//! - **Where.** `--cgroup-root` (default `/sys/fs/cgroup`, which the chart
//!   mounts from the host) and `--cgroup-parent` (default `godwit.slice`, a
//!   path below the root). The VM's cgroup is named `<namespace>_<name>`: a
//!   namespace is a DNS label and a name a DNS subdomain, neither holds `_`,
//!   so the name is unique on the node and never collides with a cgroup
//!   interface file. A name longer than 255 bytes is cut and ends with a hash
//!   of the whole ([`cgroup_name`]).
//! - **Versions.** cgroup v2 when the root is a v2 hierarchy whose
//!   `cgroup.controllers` lists `memory`, `cpu` and `pids` (the agent
//!   enables them in `cgroup.subtree_control` from the root down to the
//!   parent). Otherwise cgroup v1, with the `memory`, `cpu` and `pids`
//!   hierarchies mounted at `<root>/memory`, `<root>/cpu`, `<root>/pids`
//!   (a hybrid host with an empty v2 at `<root>/unified` is such a host):
//!   the VM gets one cgroup per controller, same name, and one in every
//!   other hierarchy mounted under the root too (`devices`, `freezer`,
//!   `cpuacct`, `cpuset`, `blkio`, `systemd`, `unified`, ...), with no
//!   limits there. A container runtime stopping the agent's container kills
//!   whatever is left in the container's cgroups, and on v1 runc finds those
//!   processes through the `devices` and `freezer` hierarchies: a VMM that
//!   moved only into memory, cpu and pids dies with the container (checked
//!   with Podman and runc here, `e2e/tests/agent_container.rs`).
//! - **Joining.** The `cgroup.procs` files are opened before the fork; the
//!   child writes `0` ("me") into each between fork and exec
//!   ([`Joiner::join_for_exec`], a plain `write` on an open descriptor,
//!   async-signal-safe), before it drops its privileges. So the VMM never
//!   runs a single instruction outside its cgroup, and its unprivileged user
//!   cannot move itself out: the files are root's, mode 0644.
//! - **Limits** ([`Limits::of`]): memory = guest memory + the VMM's overhead
//!   (`--vmm-memory-overhead-mib`, [`DEFAULT_OVERHEAD_MIB`], measured as
//!   its doc says) with no swap; CPU capped at the vCPUs plus one CPU for the
//!   VMM's own threads, weighted by vCPUs; [`PIDS_BASE`] + vCPUs tasks.
//! - **OOM.** The kernel counts the OOM kills of each cgroup (v2
//!   `memory.events`, v1 `memory.oom_control`: `oom_kill N`); the agent
//!   reads it when the VMM is gone, before it removes the cgroup.
//! - **Adoption.** A restarted agent finds a VMM by its pid file or, when
//!   that is gone, by its cgroup's `cgroup.procs`.
//! - **Removal.** A cgroup whose VMM is gone is removed (`rmdir` once it has
//!   no process).

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use godwit_crds::contract::Machine;

/// Where the host's cgroup hierarchy is mounted, by default.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup under the root that holds the VMs' cgroups, by default.
pub const DEFAULT_PARENT: &str = "godwit.slice";

/// The memory a VMM uses beyond its guest's memory, allowed on top of the
/// guest memory in its cgroup's limit, by default (MiB).
///
/// Measured here (`e2e/tests/cgroups.rs` prints it) as the peak memory
/// charged to the VMM's cgroup (v1 `memory.max_usage_in_bytes`: the VMM's
/// RSS, the kernel memory KVM charges to it, and its page cache) beyond
/// guest memory, with the test guest (one vCPU, 256 MiB, all of it
/// touched), a virtio disk and a virtio NIC, on the source and on the
/// target of a live migration: see the README's "Per-VM cgroups" for the
/// figures. The default leaves several times that as margin, so a busy VMM
/// is not killed for its own buffers. The operator's reservation pods request
/// the same margin ([`godwit_crds::contract::VMM_MEMORY_OVERHEAD`]).
pub const DEFAULT_OVERHEAD_MIB: i64 = (godwit_crds::contract::VMM_MEMORY_OVERHEAD >> 20) as i64;

/// Tasks a VMM's cgroup may hold beyond one per vCPU: its shell, main
/// thread, device and I/O threads, migration threads, with room to spare.
pub const PIDS_BASE: u64 = 128;

/// The smallest memory limit a VM's cgroup gets.
pub const MIN_MEMORY_BYTES: u64 = 32 << 20;

/// The CPU period of the cgroup's quota (µs).
pub const CPU_PERIOD_US: u64 = 100_000;

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Errors of per-VM cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a usable v2 nor a v1 hierarchy was found.
    #[error("No usable cgroup hierarchy under {0}: need cgroup v2 with the memory, cpu and pids controllers, or cgroup v1 with memory, cpu and pids mounted at {0}/<controller> (mount the host's /sys/fs/cgroup there, or pass --cgroup-root)")]
    NoHierarchy(PathBuf),
    /// The parent is not a relative path below the root.
    #[error(
        "--cgroup-parent {0:?}: give a relative path below the cgroup root, e.g. godwit.slice"
    )]
    BadParent(String),
    /// A cgroup file operation failed.
    #[error("{0} {1}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
}

/// Which cgroup hierarchy the node has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy, at this root.
    V2(PathBuf),
    /// One hierarchy per controller: memory, cpu, pids, and the others.
    V1 {
        /// The memory controller's mount.
        memory: PathBuf,
        /// The cpu controller's mount.
        cpu: PathBuf,
        /// The pids controller's mount.
        pids: PathBuf,
        /// Every other hierarchy mounted under the root (each once, however
        /// many names point at it), which the VMM joins without limits so
        /// that it leaves the agent container's cgroups entirely.
        others: Vec<PathBuf>,
    },
}

impl Hierarchy {
    /// The hierarchy under `root`: v2 if it has the controllers, else v1.
    pub fn detect(root: &Path) -> Result<Hierarchy, CgroupError> {
        if let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) {
            let have: Vec<&str> = controllers.split_whitespace().collect();
            if CONTROLLERS.iter().all(|c| have.contains(c)) {
                return Ok(Hierarchy::V2(root.to_path_buf()));
            }
        }
        let v1 = |c: &str| {
            let p = root.join(c);
            p.join("cgroup.procs").exists().then_some(p)
        };
        match (v1("memory"), v1("cpu"), v1("pids")) {
            (Some(memory), Some(cpu), Some(pids)) => {
                let others = other_v1_mounts(root, &[&memory, &cpu, &pids]);
                Ok(Hierarchy::V1 {
                    memory,
                    cpu,
                    pids,
                    others,
                })
            }
            _ => Err(CgroupError::NoHierarchy(root.to_path_buf())),
        }
    }

    /// 1 or 2.
    pub fn version(&self) -> u8 {
        match self {
            Hierarchy::V2(_) => 2,
            Hierarchy::V1 { .. } => 1,
        }
    }

    /// The mount point of each controller in use (one for v2).
    fn mounts(&self) -> Vec<&Path> {
        match self {
            Hierarchy::V2(root) => vec![root],
            Hierarchy::V1 {
                memory,
                cpu,
                pids,
                others,
            } => [memory, cpu, pids]
                .into_iter()
                .chain(others)
                .map(PathBuf::as_path)
                .collect(),
        }
    }
}

/// The v1 hierarchies under `root` other than `taken`: each directory with
/// a `cgroup.procs`, once per mount (`cpu,cpuacct` and its `cpuacct` link
/// are one), in name order.
fn other_v1_mounts(root: &Path, taken: &[&PathBuf]) -> Vec<PathBuf> {
    let canonical = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mut seen: Vec<PathBuf> = taken.iter().map(|p| canonical(p)).collect();
    let mut names: Vec<PathBuf> = fs::read_dir(root)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    let mut others = Vec::new();
    for path in names {
        if !path.join("cgroup.procs").exists() {
            continue;
        }
        let real = canonical(&path);
        if seen.contains(&real) {
            continue;
        }
        seen.push(real);
        others.push(path);
    }
    others
}

/// Makes cgroup directory `dir` unless it exists; in a v1 `cpuset`
/// hierarchy it makes sure the directory has CPUs and memory nodes (without
/// them no task may join: `ENOSPC`).
fn create_cgroup(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("Cannot create", dir)(e)),
    }
    fill_cpuset(dir)
}

/// Copies the parent's `cpuset.cpus` and `cpuset.mems` into `dir` where
/// `dir` has them empty, filling the parent first when it is empty too: a
/// parent another agent has just made (its `mkdir` done, its copy not yet)
/// must not hand its children nothing.
fn fill_cpuset(dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        if !own.exists()
            || !fs::read_to_string(&own)
                .unwrap_or_default()
                .trim()
                .is_empty()
        {
            continue;
        }
        let Some(parent) = dir.parent() else { continue };
        let from = parent.join(file);
        let mut value = fs::read_to_string(&from).map_err(io("Cannot read", &from))?;
        if value.trim().is_empty() {
            fill_cpuset(parent)?;
            value = fs::read_to_string(&from).map_err(io("Cannot read", &from))?;
        }
        write(&own, value.trim())?;
    }
    Ok(())
}

/// The limits of a VM's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max` (v1 `memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes`
    /// the same, so no swap).
    pub memory_bytes: u64,
    /// `cpu.max`'s quota per [`CPU_PERIOD_US`] (v1 `cpu.cfs_quota_us`).
    pub cpu_quota_us: u64,
    /// `cpu.weight` (v1 `cpu.shares` is 1024/100 of it).
    pub cpu_weight: u64,
    /// `pids.max`.
    pub pids: u64,
}

impl Limits {
    /// The limits of a VMM running `machine`: its memory plus `overhead_bytes`;
    /// its vCPUs plus one CPU for the VMM's own threads (device I/O, and a
    /// live migration's sender or receiver, which can keep one CPU busy),
    /// as a hard cap so a VM never takes more than it was given, and a
    /// weight of 100 per vCPU so VMs share a contended node in proportion
    /// to their vCPUs; [`PIDS_BASE`] + vCPUs tasks.
    ///
    /// A negative overhead makes the memory limit smaller than the guest's
    /// memory, so a guest that touches its memory is OOM-killed: only tests
    /// do that (`--vmm-memory-overhead-mib=-N`); the limit is never below
    /// [`MIN_MEMORY_BYTES`].
    pub fn of(machine: &Machine, overhead_bytes: i64) -> Limits {
        let vcpus = u64::from(machine.cpu.max(1));
        let memory = i128::from(machine.memory_bytes) + i128::from(overhead_bytes);
        Limits {
            memory_bytes: u64::try_from(memory.max(i128::from(MIN_MEMORY_BYTES)))
                .unwrap_or(u64::MAX),
            cpu_quota_us: (vcpus + 1) * CPU_PERIOD_US,
            cpu_weight: (vcpus * 100).min(10_000),
            pids: PIDS_BASE + vcpus,
        }
    }
}

/// The cgroup name of VM `namespace/name`: `<namespace>_<name>`, cut to 255
/// bytes with a hash of the whole at the end when longer.
pub fn cgroup_name(namespace: &str, name: &str) -> String {
    let full = format!("{namespace}_{name}");
    if full.len() <= 255 {
        return full;
    }
    let hash = format!("-{:08x}", super::vm_dir::vm_hash(namespace, name));
    // Both parts are ASCII (DNS names), so any byte is a char boundary.
    format!("{}{hash}", &full[..255 - hash.len()])
}

/// This node's per-VM cgroups.
#[derive(Clone, Debug)]
pub struct Cgroups {
    hierarchy: Hierarchy,
    parent: PathBuf,
    /// What a VMM may use beyond its guest's memory (negative only in
    /// tests that want an OOM kill: [`Limits::of`]).
    pub overhead_bytes: i64,
    /// Held while a VMM's cgroup is made and the VMM forked into it, and
    /// while cgroups are swept, so a sweep never removes a cgroup a VMM is
    /// about to join.
    lock: Arc<Mutex<()>>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |e| CgroupError::Io(what, path.to_path_buf(), e)
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    // One write(2) per value: a cgroup file takes each write whole.
    // O_TRUNC as a shell's `>` does: the kernel ignores it on cgroup files.
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(io("Cannot write", path))
}

impl Cgroups {
    /// The node's cgroups under `root` (its hierarchy detected) and
    /// `parent`; the parent is made (and, on v2, its controllers enabled)
    /// when missing.
    pub fn new(root: &Path, parent: &str, overhead_bytes: i64) -> Result<Cgroups, CgroupError> {
        let parent_path = Path::new(parent);
        if parent.is_empty()
            || parent_path.is_absolute()
            || parent_path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(CgroupError::BadParent(parent.into()));
        }
        let cgroups = Cgroups {
            hierarchy: Hierarchy::detect(root)?,
            parent: parent_path.to_path_buf(),
            overhead_bytes,
            lock: Arc::default(),
        };
        cgroups.make_parent()?;
        Ok(cgroups)
    }

    /// The hierarchy in use.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// Makes the parent; on v2 enables the controllers on the way down.
    fn make_parent(&self) -> Result<(), CgroupError> {
        for mount in self.hierarchy.mounts() {
            let mut at = mount.to_path_buf();
            for part in self.parent.components() {
                if self.hierarchy.version() == 2 {
                    enable_controllers(&at)?;
                }
                at.push(part);
                // Also when it exists: another agent may be making it now.
                create_cgroup(&at)?;
            }
            if self.hierarchy.version() == 2 {
                enable_controllers(&at)?;
            }
        }
        Ok(())
    }

    /// The parent's directory in each controller's hierarchy.
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.hierarchy
            .mounts()
            .into_iter()
            .map(|m| m.join(&self.parent))
            .collect()
    }

    /// VM `namespace/name`'s cgroup directories (one per controller on v1).
    pub fn dirs(&self, namespace: &str, name: &str) -> Vec<PathBuf> {
        let leaf = cgroup_name(namespace, name);
        self.parent_dirs()
            .into_iter()
            .map(|p| p.join(&leaf))
            .collect()
    }

    /// The memory controller's directory of VM `namespace/name`.
    pub fn memory_dir(&self, namespace: &str, name: &str) -> PathBuf {
        self.dirs(namespace, name).remove(0)
    }

    /// Held while VMMs are started and while cgroups are swept.
    pub fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes VM `namespace/name`'s cgroup (or takes the one there, with no
    /// process in it) with `limits`, and opens what the VMM joins it
    /// through. Call with [`Cgroups::lock`] held until the VMM is forked.
    pub fn prepare(
        &self,
        namespace: &str,
        name: &str,
        limits: &Limits,
    ) -> Result<Joiner, CgroupError> {
        let dirs = self.dirs(namespace, name);
        for dir in &dirs {
            create_cgroup(dir)?;
        }
        match &self.hierarchy {
            Hierarchy::V2(_) => {
                let dir = &dirs[0];
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
                write(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
            }
            Hierarchy::V1 { .. } => {
                let (memory, cpu, pids) = (&dirs[0], &dirs[1], &dirs[2]);
                // The swap limit is at least the memory limit: lift it first,
                // set the memory limit, then the same as memory + swap (no swap).
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, "-1")?;
                }
                let bytes = limits.memory_bytes.to_string();
                write(&memory.join("memory.limit_in_bytes"), &bytes)?;
                if memsw.exists() {
                    write(&memsw, &bytes)?;
                }
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(
                    &cpu.join("cpu.cfs_quota_us"),
                    &limits.cpu_quota_us.to_string(),
                )?;
                write(
                    &cpu.join("cpu.shares"),
                    &(limits.cpu_weight * 1024 / 100).to_string(),
                )?;
                write(&pids.join("pids.max"), &limits.pids.to_string())?;
            }
        }
        let mut files = Vec::new();
        for dir in &dirs {
            let procs = dir.join("cgroup.procs");
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(io("Cannot open", &procs))?;
            files.push(OwnedFd::from(f));
        }
        Ok(Joiner { files })
    }

    /// The processes in VM `namespace/name`'s cgroup (its memory one).
    pub fn procs(&self, namespace: &str, name: &str) -> Vec<i32> {
        read_procs(&self.memory_dir(namespace, name))
    }

    /// Whether VM `namespace/name` has a cgroup here.
    pub fn exists(&self, namespace: &str, name: &str) -> bool {
        self.dirs(namespace, name).iter().any(|d| d.is_dir())
    }

    /// How many processes the OOM killer killed in VM `namespace/name`'s
    /// cgroup (0 when it has none).
    pub fn oom_kills(&self, namespace: &str, name: &str) -> u64 {
        let dir = self.memory_dir(namespace, name);
        let file = match self.hierarchy {
            Hierarchy::V2(_) => "memory.events",
            Hierarchy::V1 { .. } => "memory.oom_control",
        };
        fs::read_to_string(dir.join(file))
            .map(|text| oom_kill_count(&text))
            .unwrap_or(0)
    }

    /// Removes VM `namespace/name`'s cgroup if no process is left in it.
    /// Returns whether it is gone.
    pub fn remove(&self, namespace: &str, name: &str) -> bool {
        let mut gone = true;
        for dir in self.dirs(namespace, name) {
            if dir.is_dir() && fs::remove_dir(&dir).is_err() {
                gone = false;
            }
        }
        gone
    }

    /// The names of the VM cgroups under the parent.
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.parent_dirs()[0])
            .map(|r| {
                r.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Removes the empty cgroup `leaf` under the parent (e.g. one whose VM
    /// directory is gone). Returns whether it is gone.
    pub fn remove_leaf(&self, leaf: &str) -> bool {
        let mut gone = true;
        for parent in self.parent_dirs() {
            let dir = parent.join(leaf);
            if dir.is_dir() && fs::remove_dir(&dir).is_err() {
                gone = false;
            }
        }
        gone
    }
}

/// Enables the controllers in `dir`'s `cgroup.subtree_control` (v2), those
/// not on yet.
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let on = fs::read_to_string(&file).map_err(io("Cannot read", &file))?;
    let on: Vec<&str> = on.split_whitespace().collect();
    let missing: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| !on.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&file, &missing.join(" "))
}

/// The `oom_kill` counter of a `memory.events` (v2) or `memory.oom_control`
/// (v1) file.
pub fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn read_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The process group of `pid` (`/proc/<pid>/stat`'s fifth field).
pub fn process_group(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    // state ppid pgrp ...
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// A VM's cgroup files, open for the VMM to join between fork and exec.
#[derive(Debug)]
pub struct Joiner {
    files: Vec<OwnedFd>,
}

impl Joiner {
    /// Moves the calling process into the cgroup: writes `0` into each
    /// `cgroup.procs`. Only `write(2)` on descriptors opened before the
    /// fork: async-signal-safe, for `pre_exec`.
    pub fn join_for_exec(&self) -> std::io::Result<()> {
        for f in &self.files {
            // SAFETY: writing one byte from a static buffer to a descriptor
            // this process owns.
            let n = unsafe { libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Kills every process in the cgroups under `parent` (each controller's
/// hierarchy under `root`), then removes them, deepest first; for tests
/// and the local cluster's teardown. Errors are ignored: what is left is
/// left.
pub fn remove_tree(root: &Path, parent: &str) {
    let Ok(hierarchy) = Hierarchy::detect(root) else {
        return;
    };
    for mount in hierarchy.mounts() {
        let top = mount.join(parent);
        for _ in 0..50 {
            let mut left = false;
            kill_and_remove(&top, &mut left);
            if !left {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // The parent's own ancestors that the parent path added stay: they
        // may be shared (e.g. `godwit-e2e.slice/<node>` removes `<node>`
        // and then its parent when empty).
        let mut up = top.parent().map(Path::to_path_buf);
        while let Some(dir) = up {
            if dir == mount || fs::remove_dir(&dir).is_err() {
                break;
            }
            up = dir.parent().map(Path::to_path_buf);
        }
    }
}

fn kill_and_remove(dir: &Path, left: &mut bool) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                kill_and_remove(&e.path(), left);
            }
        }
    }
    for pid in read_procs(dir) {
        // SAFETY: kill(2) with a pid read from a cgroup this test owns.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if fs::remove_dir(dir).is_err() {
        *left = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(cpu: u32, mib: u64) -> Machine {
        Machine {
            cpu,
            memory_bytes: mib << 20,
            ..Default::default()
        }
    }

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("godwit-cgroup-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// A fake v2 root: the interface files a kernel would show, as plain files.
    fn fake_v2(root: &Path) {
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "cpu memory\n").unwrap();
        fs::write(root.join("cgroup.procs"), "1\n").unwrap();
    }

    /// Makes the files the kernel would create in a new v2 cgroup.
    fn fake_v2_files(dir: &Path) {
        for f in [
            "cgroup.subtree_control",
            "cgroup.procs",
            "memory.max",
            "memory.swap.max",
            "memory.events",
            "cpu.max",
            "cpu.weight",
            "pids.max",
        ] {
            fs::write(dir.join(f), "").unwrap();
        }
    }

    #[test]
    fn limits_follow_the_spec() {
        let l = Limits::of(&machine(2, 1024), 128 << 20);
        assert_eq!(l.memory_bytes, (1024 + 128) << 20);
        assert_eq!(l.cpu_quota_us, 300_000);
        assert_eq!(l.cpu_weight, 200);
        assert_eq!(l.pids, PIDS_BASE + 2);
        assert_eq!(Limits::of(&machine(400, 64), 0).cpu_weight, 10_000);
        // What tests use to get an OOM kill; never below the floor.
        assert_eq!(
            Limits::of(&machine(1, 256), -(128 << 20)).memory_bytes,
            128 << 20
        );
        assert_eq!(
            Limits::of(&machine(1, 64), -(128 << 20)).memory_bytes,
            MIN_MEMORY_BYTES
        );
    }

    #[test]
    fn names_are_unique_valid_and_short_enough() {
        assert_eq!(cgroup_name("default", "demo"), "default_demo");
        assert_ne!(cgroup_name("a-b", "c"), cgroup_name("a", "b-c"));
        let long = "x".repeat(253);
        let n = cgroup_name("ns", &long);
        assert_eq!(n.len(), 255);
        assert_ne!(n, cgroup_name("ns", &format!("{}y", &long[..252])));
        assert!(!n.contains('/'));
    }

    #[test]
    fn the_oom_counter_is_read_from_either_version() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kill_count(v2), 1);
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(oom_kill_count(v1), 3);
        assert_eq!(oom_kill_count("oom_kill_disable 0\nunder_oom 0\n"), 0);
    }

    #[test]
    fn v2_is_chosen_when_it_has_the_controllers_and_v1_otherwise() {
        let root = tmp("detect");
        assert!(matches!(
            Hierarchy::detect(&root),
            Err(CgroupError::NoHierarchy(_))
        ));
        // A hybrid host: v1 controllers, an empty v2 beside them.
        for c in ["memory", "cpu", "pids"] {
            fs::create_dir_all(root.join(c)).unwrap();
            fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
        }
        fs::write(root.join("cgroup.controllers"), "hugetlb\n").unwrap();
        assert_eq!(Hierarchy::detect(&root).unwrap().version(), 1);
        fs::write(root.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        assert_eq!(
            Hierarchy::detect(&root).unwrap(),
            Hierarchy::V2(root.clone())
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_parent_must_be_below_the_root() {
        let root = tmp("parent");
        fake_v2(&root);
        for bad in ["", "/godwit.slice", "../x", "a/../b"] {
            assert!(
                matches!(Cgroups::new(&root, bad, 0), Err(CgroupError::BadParent(_))),
                "{bad:?}"
            );
        }
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_enables_the_controllers_down_to_the_parent_and_writes_the_limits() {
        let root = tmp("v2");
        fake_v2(&root);
        // The fake kernel: a made directory gets its files before the agent
        // looks, so make them ahead.
        let parent = root.join("godwit-test.slice");
        let node = parent.join("node-0");
        fs::create_dir_all(&node).unwrap();
        fake_v2_files(&parent);
        fake_v2_files(&node);
        let cg = Cgroups::new(&root, "godwit-test.slice/node-0", 64 << 20).unwrap();
        assert_eq!(cg.hierarchy().version(), 2);
        // Only what was not on yet is written, at every level.
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+pids"
        );
        for dir in [&parent, &node] {
            assert_eq!(
                fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap(),
                "+memory +cpu +pids"
            );
        }
        let vm = node.join("default_demo");
        fs::create_dir(&vm).unwrap();
        fake_v2_files(&vm);
        let limits = Limits::of(&machine(1, 256), cg.overhead_bytes);
        let joiner = cg.prepare("default", "demo", &limits).unwrap();
        assert_eq!(joiner.files.len(), 1);
        let read = |f: &str| fs::read_to_string(vm.join(f)).unwrap();
        assert_eq!(read("memory.max"), ((256 + 64) << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("cpu.max"), "200000 100000");
        assert_eq!(read("cpu.weight"), "100");
        assert_eq!(read("pids.max"), (PIDS_BASE + 1).to_string());
        fs::write(vm.join("memory.events"), "oom 1\noom_kill 1\n").unwrap();
        assert_eq!(cg.oom_kills("default", "demo"), 1);
        fs::write(vm.join("cgroup.procs"), "42\n43\n").unwrap();
        assert_eq!(cg.procs("default", "demo"), vec![42, 43]);
        assert_eq!(cg.list(), vec!["default_demo".to_string()]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_writes_one_cgroup_per_controller() {
        let root = tmp("v1");
        for c in ["memory", "cpu", "pids", "devices"] {
            fs::create_dir_all(root.join(c).join("godwit.slice/default_demo")).unwrap();
            fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
        }
        fs::write(
            root.join("devices/godwit.slice/default_demo/cgroup.procs"),
            "",
        )
        .unwrap();
        // A second name for the cpu hierarchy is not a hierarchy of its own;
        // a directory without cgroup.procs is none at all.
        std::os::unix::fs::symlink(root.join("cpu"), root.join("cpuacct")).unwrap();
        fs::create_dir_all(root.join("not-a-hierarchy")).unwrap();
        let vm = |c: &str| root.join(c).join("godwit.slice/default_demo");
        for (c, files) in [
            (
                "memory",
                &[
                    "memory.limit_in_bytes",
                    "memory.memsw.limit_in_bytes",
                    "memory.oom_control",
                ][..],
            ),
            (
                "cpu",
                &["cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.shares"][..],
            ),
            ("pids", &["pids.max"][..]),
        ] {
            fs::write(vm(c).join("cgroup.procs"), "").unwrap();
            for f in files {
                fs::write(vm(c).join(f), "").unwrap();
            }
        }
        let cg = Cgroups::new(&root, DEFAULT_PARENT, 128 << 20).unwrap();
        assert_eq!(cg.hierarchy().version(), 1);
        assert!(matches!(
            cg.hierarchy(),
            Hierarchy::V1 { others, .. } if *others == vec![root.join("devices")]
        ));
        let limits = Limits::of(&machine(2, 512), cg.overhead_bytes);
        let joiner = cg.prepare("default", "demo", &limits).unwrap();
        // memory, cpu, pids, and devices (joined without limits).
        assert_eq!(joiner.files.len(), 4);
        let read = |c: &str, f: &str| fs::read_to_string(vm(c).join(f)).unwrap();
        let bytes = ((512 + 128) << 20).to_string();
        assert_eq!(read("memory", "memory.limit_in_bytes"), bytes);
        assert_eq!(read("memory", "memory.memsw.limit_in_bytes"), bytes);
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "300000");
        assert_eq!(read("cpu", "cpu.shares"), "2048");
        assert_eq!(read("pids", "pids.max"), (PIDS_BASE + 2).to_string());
        fs::write(
            vm("memory").join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(cg.oom_kills("default", "demo"), 2);
        assert_eq!(cg.oom_kills("default", "other"), 0);
        fs::remove_dir_all(&root).unwrap();
    }
}
