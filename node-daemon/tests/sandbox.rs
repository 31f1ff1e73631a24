//! The VMM's seccomp sandbox: a VMM runs with its filter installed, a guest
//! runs normally under it, and a system call outside the allow list kills
//! the VMM with SIGSYS (exit status 128 + 31 under the agent's shell, which
//! the agent reports as `SandboxViolation`). And its mount namespace: a VMM
//! the agent starts sees its own VM's files only, and writes only to them.
//! And its user: a VMM the agent starts as its VM's own user runs with no
//! capability, on the descriptors the agent handed it.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{guest, require_kvm, start_vm, Scratch, BOOT, VMM};
use godwit_crds::contract::Machine;
use godwit_node::agent::image_dirs::ImageDirs;
use godwit_node::agent::vm_dir::{self, VmDir};
use godwit_node::agent::vmm_process::{self, node_jail, Runner};
use godwit_node::agent::vmm_user::VmmUsers;
use godwit_testkit::guest::Console;
use godwit_vmm_control::Command as Cmd;

fn args(extra: &[&str]) -> Vec<String> {
    let g = guest().display().to_string();
    let mut a: Vec<String> = [
        "--kernel",
        &g,
        "--memory-mib",
        "64",
        "--cmdline",
        "hb_ms=50",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn a_forbidden_system_call_kills_the_vmm() {
    let dir = Scratch::new("sandbox-kill");
    // `mkdir` is allowed only for save-state; take it away.
    let mut vm = start_vm(&dir, "vm", &[], &args(&["--seccomp-deny", "mkdir"]));
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id())).unwrap();
    assert!(
        status.contains("Seccomp:\t2"),
        "no seccomp filter:\n{status}"
    );
    // The guest runs normally inside the sandbox.
    vm.console.heartbeats(3, BOOT).unwrap();
    let r = vm.api(Cmd::Stats);
    assert_eq!(r["ok"], true, "{r}");
    // save-state into a new directory makes the VMM call mkdir.
    let snap = dir.path("snap/new");
    let mut s = UnixStream::connect(&vm.api).unwrap();
    let req = format!(
        "{{\"v\":1,\"cmd\":\"pause\"}}\n{{\"v\":1,\"cmd\":\"save-state\",\"dir\":\"{}\"}}\n",
        snap.display()
    );
    let _ = s.write_all(req.as_bytes());
    let st = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(st.signal(), Some(libc::SIGSYS), "exit: {st}");
    assert!(!snap.exists(), "the forbidden call went through");
}

#[test]
fn the_deny_list_only_names_allowed_calls() {
    let out = Command::new(VMM)
        .args(args(&["--seccomp-deny", "execve"]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"execve\" is not a system call the VMM allows"),
        "{err}"
    );
}

/// The VMM under the agent's `sh` wrapper `sh_pid`, once it runs.
fn vmm_under(sh_pid: u32) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{sh_pid}/task/{sh_pid}/children"))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            let pid: u32 = pid.parse().unwrap();
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            if exe.ends_with("godwit-vmm") {
                return pid;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no VMM under the wrapper {sh_pid}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots `machine` in `dir` as the agent does, and waits for its console:
/// the guard that stops it, and the VMM's pid.
fn boot(runner: &Runner, dir: &VmDir, machine: &Machine) -> (Stop, u32) {
    let sh = runner.boot(dir, machine).unwrap();
    let sh_pid = sh.id();
    let stop = Stop(dir.clone(), sh);
    let vmm = vmm_under(sh_pid);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !dir.file("console.sock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no console socket: {}",
            vm_dir::tail(&dir.file("vmm.log"), 5)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (stop, vmm)
}

/// Stops the VM (its whole process group) when the test ends, passed or not.
struct Stop(VmDir, std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        vmm_process::stop(&self.0, Duration::from_secs(2));
        let _ = self.1.wait();
    }
}

#[test]
fn a_vmm_the_agent_starts_sees_only_its_own_vm() {
    require_kvm();
    let scratch = Scratch::new("jail");
    let root = scratch.0.canonicalize().unwrap();
    let state = root.join("state");
    let shared = root.join("shared");
    let a = VmDir::new(&state, &shared, "ns", "a");
    let b = VmDir::new(&state, &shared, "ns", "b");
    // Another VM on the node, with a file and a shared disk.
    b.create().unwrap();
    std::fs::write(b.file("secret"), "B's").unwrap();
    std::fs::create_dir_all(&b.shared).unwrap();
    std::fs::write(b.shared.join("data.raw"), "B's disk").unwrap();
    std::fs::create_dir_all(&a.shared).unwrap();
    // A secret the agent holds (as the migration CA is).
    let ca = root.join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::write(ca.join("ca.key"), "key").unwrap();
    let machine = Machine {
        cpu: 1,
        memory_bytes: 64 << 20,
        kernel: guest().display().to_string(),
        cmdline: "hb_ms=50".into(),
        ..Default::default()
    };
    let runner = Runner {
        vmm_binary: VMM.into(),
        tls: None,
        jail: Some(node_jail(&state, &shared, std::slice::from_ref(&ca))),
        users: None,
        cgroups: None,
        image_dirs: ImageDirs::new([guest().parent().unwrap().to_path_buf()]).unwrap(),
    };
    let (_stop, vmm) = boot(&runner, &a, &machine);

    // What the VMM sees, through its own root (its mount namespace).
    let seen = |p: &std::path::Path| {
        std::path::PathBuf::from(format!("/proc/{vmm}/root")).join(p.strip_prefix("/").unwrap())
    };
    assert!(seen(&a.file("machine.json")).exists(), "A's own files");
    for hidden in [
        b.path.clone(),
        b.file("secret"),
        b.shared.clone(),
        b.shared.join("data.raw"),
        ca.join("ca.key"),
    ] {
        assert!(!seen(&hidden).exists(), "{} is visible", hidden.display());
        assert!(hidden.exists(), "{} is gone on the host", hidden.display());
    }
    let listing: Vec<_> = std::fs::read_dir(seen(&state.join("vms/ns")))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listing, ["a"], "VM directories the VMM sees");
    // A's directories are writable, and are A's real ones.
    std::fs::write(seen(&a.file("probe")), "from inside").unwrap();
    assert_eq!(
        std::fs::read_to_string(a.file("probe")).unwrap(),
        "from inside"
    );
    std::fs::write(seen(&a.shared.join("probe")), "x").unwrap();
    assert!(a.shared.join("probe").exists());
    // Everything else is read-only, even for root.
    for elsewhere in [
        root.join("probe"),
        state.join("probe"),
        PathBuf::from("/probe"),
    ] {
        let e = std::fs::write(seen(&elsewhere), "x").unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "{}: {e}",
            elsewhere.display()
        );
    }
    // Nothing of this reached the host's mounts.
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host.contains("godwit-hidden"), "{host}");
    // The capability bound still holds (set after the mounts).
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    assert!(
        status.contains("CapBnd:\t0000000000001000"),
        "bounding set:\n{status}"
    );

    // The guest runs.
    let stream = UnixStream::connect(a.file("console.sock")).unwrap();
    let mut console = Console::new(stream.try_clone().unwrap(), stream);
    console.heartbeats(3, BOOT).unwrap();
}

/// A status line's fields (`Uid:\t1\t1\t1\t1` → `["1", "1", "1", "1"]`).
fn status_field(status: &str, name: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
fn a_vmm_the_agent_starts_as_its_own_user_runs_with_no_capability() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_kvm();
    let scratch = Scratch::new("user");
    let root = scratch.0.canonicalize().unwrap();
    let state = root.join("state");
    let shared = root.join("shared");
    let vm = VmDir::new(&state, &shared, "ns", "a");
    // The binary and the kernel in a directory closed to others, as a
    // build tree under /root is: the agent hands them over as descriptors.
    let private = root.join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let binary = private.join("godwit-vmm");
    std::fs::copy(VMM, &binary).unwrap();
    let kernel = private.join("guest.elf");
    std::fs::copy(guest(), &kernel).unwrap();
    // A migration identity whose key only root can read (as the agent
    // issues it): the VMM gets it on a pipe.
    let ca = root.join("ca");
    godwit_testkit::ca::write_migration_ca(&ca).unwrap();
    let tls = godwit_node::agent::certificates::issue(&ca, &root.join("tls"), "node-a", "10.0.0.1")
        .unwrap();
    assert_eq!(
        std::fs::metadata(&tls.key).unwrap().permissions().mode() & 0o077,
        0,
        "the key must be closed to others for this test"
    );
    let machine = Machine {
        cpu: 1,
        memory_bytes: 64 << 20,
        kernel: kernel.display().to_string(),
        cmdline: "hb_ms=50".into(),
        ..Default::default()
    };
    let users = VmmUsers::new(2_000_000_000).unwrap();
    let uid = users.of("ns", "a");
    assert!(uid >= 2_000_000_000, "uid {uid}");
    let runner = Runner {
        vmm_binary: binary.clone(),
        tls: Some(tls.clone()),
        jail: Some(node_jail(&state, &shared, std::slice::from_ref(&ca))),
        users: Some(users),
        cgroups: None,
        image_dirs: ImageDirs::new([private.clone()]).unwrap(),
    };
    let (_stop, vmm) = boot(&runner, &vm, &machine);

    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let id = uid.to_string();
    assert_eq!(status_field(&status, "Uid"), [id.as_str(); 4], "{status}");
    assert_eq!(status_field(&status, "Gid"), [id.as_str(); 4], "{status}");
    assert!(status_field(&status, "Groups").is_empty(), "{status}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(&status, set),
            ["0000000000000000"],
            "{set}:\n{status}"
        );
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), ["1"]);
    assert_eq!(status_field(&status, "Seccomp"), ["2"]);
    // It got /dev/kvm and /dev/userfaultfd from the agent, open.
    let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{vmm}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .collect();
    assert!(
        fds.iter().any(|p| p == std::path::Path::new("/dev/kvm")),
        "{fds:?}"
    );
    // The key went over a pipe: neither its path nor the key's text is on
    // the command line.
    let argv = String::from_utf8_lossy(&std::fs::read(format!("/proc/{vmm}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(
        argv.contains("--tls-fd") && argv.contains("--kvm-fd"),
        "{argv}"
    );
    assert!(!argv.contains(&tls.key.display().to_string()), "{argv}");
    assert!(
        argv.contains("/proc/self/fd/"),
        "the kernel in a closed directory: {argv}"
    );
    // Its directory is its own (0700), and the files it made there too.
    let meta = std::fs::metadata(&vm.path).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));
    assert_eq!(
        std::fs::metadata(vm.file("console.sock")).unwrap().uid(),
        uid
    );
    // The guest runs, and the control socket answers the agent.
    let stream = UnixStream::connect(vm.file("console.sock")).unwrap();
    let mut console = Console::new(stream.try_clone().unwrap(), stream);
    console.heartbeats(3, BOOT).unwrap();
    let stats = vm.control().stats().unwrap();
    assert!(stats.memory_mib > 0, "{stats:?}");
}

/// A VM names its boot files and disks only inside the node's image
/// directories: a file elsewhere (the migration CA key, another VM's disk),
/// the same through a symlink planted in an image directory, or through
/// `..`, is refused before anything is made, and no VMM starts; the same
/// machine naming an allowed file boots.
#[test]
fn files_outside_the_image_directories_never_reach_a_guest() {
    require_kvm();
    let scratch = Scratch::new("imgdirs");
    let root = scratch.0.canonicalize().unwrap();
    let state = root.join("state");
    let shared = root.join("shared");
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(guest(), images.join("guest.elf")).unwrap();
    std::fs::File::create(images.join("data.raw"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let ca = root.join("ca");
    std::fs::create_dir_all(&ca).unwrap();
    std::fs::write(ca.join("ca.key"), "THE CA KEY").unwrap();
    let b = VmDir::new(&state, &shared, "ns", "b");
    b.create().unwrap();
    let other_disk = b.path.join("disks/root.raw");
    std::fs::create_dir_all(other_disk.parent().unwrap()).unwrap();
    std::fs::write(&other_disk, "B's DISK").unwrap();
    std::os::unix::fs::symlink(ca.join("ca.key"), images.join("key.img")).unwrap();
    std::os::unix::fs::symlink(&other_disk, images.join("b.raw")).unwrap();

    let runner = Runner {
        vmm_binary: VMM.into(),
        tls: None,
        jail: Some(node_jail(&state, &shared, std::slice::from_ref(&ca))),
        users: None,
        cgroups: None,
        image_dirs: ImageDirs::new([images.clone()]).unwrap(),
    };
    let kernel = images.join("guest.elf").display().to_string();
    let machine = |initrd: Option<String>, disk: Option<String>| Machine {
        cpu: 1,
        memory_bytes: 64 << 20,
        kernel: kernel.clone(),
        initrd,
        cmdline: "hb_ms=50".into(),
        disks: disk
            .into_iter()
            .map(|path| godwit_crds::contract::MachineDisk {
                name: "data".into(),
                source: godwit_crds::contract::MachineDiskSource::Image {
                    path,
                    format: godwit_crds::ImageFormat::Raw,
                },
                storage: godwit_crds::StorageKind::Local,
                read_only: false,
            })
            .collect(),
        ..Default::default()
    };
    let s = |p: std::path::PathBuf| p.display().to_string();
    let bad = [
        (
            "the CA key as initrd",
            machine(Some(s(ca.join("ca.key"))), None),
            "not under any",
        ),
        (
            "/etc/shadow as initrd",
            machine(Some("/etc/shadow".into()), None),
            "not under any",
        ),
        (
            "another VM's disk",
            machine(None, Some(s(other_disk.clone()))),
            "not under any",
        ),
        (
            "a symlink to the CA key",
            machine(Some(s(images.join("key.img"))), None),
            "symbolic link",
        ),
        (
            "a symlink to B's disk",
            machine(None, Some(s(images.join("b.raw")))),
            "symbolic link",
        ),
        (
            "`..` out of the image directory",
            machine(Some(format!("{}/../ca/ca.key", images.display())), None),
            "without `.` or `..`",
        ),
    ];
    let a = VmDir::new(&state, &shared, "ns", "a");
    for (what, m, says) in bad {
        let e = runner.boot(&a, &m).expect_err(what);
        assert!(
            matches!(e, vmm_process::VmmProcessError::PathRefused(_)),
            "{what}: {e}"
        );
        assert!(e.to_string().contains(says), "{what}: {e}");
        assert!(!a.path.exists(), "{what}: the VM's directory was made");
    }
    // Nothing was given to the VM's user or changed.
    assert_eq!(std::fs::read_to_string(&other_disk).unwrap(), "B's DISK");

    // The same machine with allowed files boots, its kernel handed over as
    // the descriptor opened beneath the image directory.
    let good = machine(Some(kernel.clone()), Some(s(images.join("data.raw"))));
    let (_stop, vmm) = boot(&runner, &a, &good);
    let argv = String::from_utf8_lossy(&std::fs::read(format!("/proc/{vmm}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(
        argv.contains("--kernel /proc/self/fd/") && argv.contains("--initrd /proc/self/fd/"),
        "{argv}"
    );
    let stream = UnixStream::connect(a.file("console.sock")).unwrap();
    let mut console = Console::new(stream.try_clone().unwrap(), stream);
    console.wait_prefix("HB ", BOOT).unwrap();
}
