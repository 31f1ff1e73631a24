//! A VM's directories on this node, and what they say about its VMM.
//!
//! A VM's directory (`<state-dir>/vms/<namespace>/<name>/`) holds everything
//! the node knows about it, so a restarted agent finds its VMs again without
//! asking anyone:
//!
//! | file | what |
//! | --- | --- |
//! | `machine.json` | the [`Machine`] the VMM was started with |
//! | `pid` | the process group of the VMM (a small `sh` that records the exit status, and the VMM itself); a restarted agent that finds it missing writes it again from the VM's cgroup ([`super::cgroup`]) |
//! | `exit` | the VMM's exit status, written when it ends |
//! | `stop-requested` | the agent asked it to stop (an exit then means Stopped, not Failed); holding the grace in seconds when the power button was pressed, at its modification time ([`super::vmm_process::StopMarker`]) |
//! | `exit` of 100 ([`crate::vmm::GUEST_RESET_EXIT`]) | the guest reset itself: reported Stopped, reason `GuestReset` |
//! | `oom-killed` | the OOM killer killed in the VMM's cgroup ([`super::cgroup`]): its exit is reported `OOMKilled` |
//! | `incoming` | the VMM waits for or received a migration (the migration's name) |
//! | `outgoing`, `outgoing-result` | the migration the VMM sends, and what it said last |
//! | `vmm.log` | the VMM's stdout and stderr |
//! | `console.log`, `console.sock` | the serial console (file, and a socket to attach to) |
//! | `api.sock` | the VMM's control socket |
//! | `disks/` | node-local disks |
//! | `cidata.img` | the cloud-init NoCloud seed, written before each start ([`super::seed`]) |
//!
//! Shared disks live under the shared directory (`<shared-dir>/<namespace>/<name>/`),
//! which every node sees; only deleting the VM removes them.
//!
//! The node's names derived from a VM's name (its tap devices, its VMM's
//! user, [`super::vmm_user`]) come from one hash of `namespace/name`, so they
//! are the same on every node and across restarts.

use std::fs;
use std::path::{Path, PathBuf};

use godwit_crds::contract::Machine;
use godwit_crds::vm::{ImageFormat, StorageKind};
use godwit_vmm_control::ControlClient;

/// Errors of a VM's directory.
#[derive(Debug, thiserror::Error)]
pub enum VmDirError {
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmDirError {
    let what = what.into();
    move |e| VmDirError::Io(what, e)
}

/// Where a VM's files live on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDir {
    /// `<state-dir>/vms/<namespace>/<name>`.
    pub path: PathBuf,
    /// `<shared-dir>/<namespace>/<name>`.
    pub shared: PathBuf,
    /// Namespace of the VM.
    pub namespace: String,
    /// Name of the VM.
    pub name: String,
    /// The node's template cache, `<state-dir>/cache` (not `images`: that
    /// is the default image directory VMs name files in, and a VM must not
    /// name a cache entry other VMs' disks are overlays on).
    pub cache: PathBuf,
}

impl VmDir {
    /// The directories of VM `namespace/name`.
    pub fn new(state_dir: &Path, shared_dir: &Path, namespace: &str, name: &str) -> VmDir {
        VmDir {
            path: state_dir.join("vms").join(namespace).join(name),
            shared: shared_dir.join(namespace).join(name),
            namespace: namespace.into(),
            name: name.into(),
            cache: state_dir.join("cache"),
        }
    }

    /// Every VM directory under `state_dir`.
    pub fn scan(state_dir: &Path, shared_dir: &Path) -> Vec<VmDir> {
        let mut out = Vec::new();
        let Ok(namespaces) = fs::read_dir(state_dir.join("vms")) else {
            return out;
        };
        for ns in namespaces.flatten() {
            let Ok(vms) = fs::read_dir(ns.path()) else {
                continue;
            };
            for vm in vms.flatten() {
                if vm.path().is_dir() {
                    out.push(VmDir::new(
                        state_dir,
                        shared_dir,
                        &ns.file_name().to_string_lossy(),
                        &vm.file_name().to_string_lossy(),
                    ));
                }
            }
        }
        out
    }

    /// Makes the VM's directory, `0700`: it holds the VMM's control and
    /// console sockets, which only the node daemon may use.
    pub fn create(&self) -> Result<(), VmDirError> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(&self.path).map_err(io(format!("create {}", self.path.display())))?;
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod 0700 {}", self.path.display())))
    }

    /// A file in the VM's directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The control socket.
    pub fn api_sock(&self) -> PathBuf {
        self.file("api.sock")
    }

    /// A client of the VMM's control socket.
    pub fn control(&self) -> ControlClient {
        ControlClient::new(self.api_sock())
    }

    /// Where disk `disk` of this VM lives.
    pub fn disk_path(&self, disk: &str, storage: StorageKind, format: ImageFormat) -> PathBuf {
        let ext = match format {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        };
        let dir = match storage {
            StorageKind::Local => self.path.join("disks"),
            StorageKind::Shared => self.shared.clone(),
        };
        dir.join(format!("{disk}.{ext}"))
    }

    /// What the directory says about the VMM.
    pub fn state(&self) -> LocalState {
        let read = |f: &str| fs::read_to_string(self.file(f)).ok();
        let exit = read("exit").and_then(|s| s.trim().parse::<i32>().ok());
        let pid = read("pid").and_then(|s| s.trim().parse::<i32>().ok());
        let alive = exit.is_none() && pid.is_some_and(process_alive);
        LocalState {
            exists: self.path.is_dir(),
            pid,
            alive,
            exit,
            stop_requested: self.file("stop-requested").exists(),
            oom_killed: self.file("oom-killed").exists(),
            incoming: read("incoming").map(|s| s.trim().to_string()),
        }
    }

    /// The machine this VM was started with.
    pub fn machine(&self) -> Option<Machine> {
        serde_json::from_str(&fs::read_to_string(self.file("machine.json")).ok()?).ok()
    }

    /// Records the machine the VMM is started with (`machine.json`).
    pub fn write_machine(&self, machine: &Machine) -> Result<(), VmDirError> {
        let json = serde_json::to_string_pretty(machine).expect("a Machine serialises");
        fs::write(self.file("machine.json"), json).map_err(io("write machine.json"))
    }
}

/// The state of a VM's VMM on this node, as its directory records it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalState {
    /// The VM has a directory here.
    pub exists: bool,
    /// The VMM's process group.
    pub pid: Option<i32>,
    /// The VMM process is running.
    pub alive: bool,
    /// Its exit status, once it ended.
    pub exit: Option<i32>,
    /// The agent asked it to stop.
    pub stop_requested: bool,
    /// The OOM killer killed a process of its cgroup (`oom-killed`).
    pub oom_killed: bool,
    /// It was started to receive this migration.
    pub incoming: Option<String>,
}

/// Whether process `pid` runs (a zombie does not).
pub fn process_alive(pid: i32) -> bool {
    // A zombie has exited; `/proc/<pid>/stat` shows state `Z`.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Removes the VM's node-local files; with `shared`, its shared disks too.
pub fn remove(dir: &VmDir, shared: bool) -> Result<(), VmDirError> {
    if dir.path.exists() {
        fs::remove_dir_all(&dir.path).map_err(io(format!("remove {}", dir.path.display())))?;
    }
    if shared && dir.shared.exists() {
        fs::remove_dir_all(&dir.shared).map_err(io(format!("remove {}", dir.shared.display())))?;
    }
    Ok(())
}

/// The last `n` lines of a file (for error messages and events).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// A tap name for NIC `index` of VM `namespace/name`: unique on the node,
/// stable across restarts, within the kernel's 15 characters.
pub fn tap_name(namespace: &str, name: &str, index: usize) -> String {
    format!("gwt{:08x}n{index}", vm_hash(namespace, name))
}

/// FNV-1a of `namespace/name`.
pub fn vm_hash(namespace: &str, name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("godwit-local-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn tap_names_are_short_stable_and_distinct() {
        let a = tap_name("default", "web-1", 0);
        assert!(a.len() <= 15, "{a}");
        assert_eq!(a, tap_name("default", "web-1", 0));
        assert_ne!(a, tap_name("default", "web-2", 0));
        assert_ne!(a, tap_name("default", "web-1", 1));
    }

    #[test]
    fn a_directory_tells_the_vmm_state() {
        let d = tmp("state");
        let dir = VmDir::new(&d, &d.join("shared"), "ns", "vm");
        assert!(!dir.state().exists);
        fs::create_dir_all(&dir.path).unwrap();
        fs::write(dir.file("pid"), std::process::id().to_string()).unwrap();
        let st = dir.state();
        assert!(st.exists && st.alive && st.exit.is_none(), "{st:?}");
        fs::write(dir.file("exit"), "3\n").unwrap();
        let st = dir.state();
        assert!(!st.alive && st.exit == Some(3), "{st:?}");
        assert_eq!(VmDir::scan(&d, &d.join("shared")), vec![dir.clone()]);
        remove(&dir, true).unwrap();
        assert!(!dir.path.exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
