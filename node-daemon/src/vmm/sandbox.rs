//! The VMM's seccomp sandbox, in the manner of Firecracker's: once the VMM
//! has parsed its arguments, every thread of the process may make only the
//! system calls on [`VMM_SYSCALLS`]; vCPU threads further drop the ones a
//! vCPU never needs ([`VCPU_FORBIDDEN`]: no new files, sockets, processes or
//! threads). Anything else kills the whole process with `SIGSYS` — the node
//! agent reports the VM failed with reason `SandboxViolation` — because a VMM
//! making a call it never makes is a VMM a guest has taken over.
//!
//! Filters are classic BPF built with `seccompiler` from plain syscall
//! lists; one call is allowed only with given arguments ([`CONFINED`]:
//! `setpriority` on the calling thread), the rest whatever their arguments
//! (`ioctl` whatever its request).
//! Modes (`godwit-vmm --seccomp`): `on` (the default, kill), `log` (allow
//! but log each violation through the kernel's audit log, where audit is
//! enabled, for finding what a new code path needs) and `off`. `--seccomp-deny NAME,...`
//! removes calls from the allow list: a hardening knob for sites that know
//! they never need a feature (e.g. `userfaultfd` without post-copy), and how
//! the test proves that a forbidden call kills the VMM.
//!
//! The lists were taken from `strace -f` of every VMM the node-daemon test
//! suites start (boot, disks, network, snapshots, storage, plain, TLS and
//! post-copy migrations), by thread name; the calls the loader makes before
//! `main` are not on them. The suites then run with the filter on.
//!
//! The node agent confines a VMM further before it even starts: its own
//! mount namespace, where it sees only its own VM's files and writes only
//! to them ([`super::jail`]), and a capability bounding set of
//! `CAP_NET_ADMIN` alone ([`bound_capabilities_for_exec`]), in that order in
//! the child between `fork` and `exec` (mounting needs `CAP_SYS_ADMIN`).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What the filter does with a call that is not allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Kill the process (`SIGSYS`).
    On,
    /// Allow it and log it to the kernel log.
    Log,
    /// No filter.
    Off,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A name in `--seccomp-deny` is not on the allow list.
    #[error(
        "{0:?} is not a system call the VMM allows (see `godwit-vmm --help` and vmm/sandbox.rs)"
    )]
    UnknownSyscall(String),
    /// seccompiler refused the filter, or the kernel refused to install it.
    #[error("Cannot build or install the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
}

/// Every system call a VMM thread may make, by name and x86-64 number.
pub const VMM_SYSCALLS: &[(&str, i64)] = &[
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("pread64", libc::SYS_pread64),
    ("pwrite64", libc::SYS_pwrite64),
    ("preadv", libc::SYS_preadv),
    ("pwritev", libc::SYS_pwritev),
    ("preadv2", libc::SYS_preadv2),
    ("pwritev2", libc::SYS_pwritev2),
    ("lseek", libc::SYS_lseek),
    ("close", libc::SYS_close),
    ("openat", libc::SYS_openat),
    ("newfstatat", libc::SYS_newfstatat),
    ("fstat", libc::SYS_fstat),
    ("statx", libc::SYS_statx),
    ("fstatfs", libc::SYS_fstatfs),
    ("statfs", libc::SYS_statfs),
    ("getdents64", libc::SYS_getdents64),
    ("faccessat2", libc::SYS_faccessat2),
    ("readlink", libc::SYS_readlink),
    ("readlinkat", libc::SYS_readlinkat),
    ("getcwd", libc::SYS_getcwd),
    ("fcntl", libc::SYS_fcntl),
    ("ioctl", libc::SYS_ioctl),
    ("dup", libc::SYS_dup),
    ("dup3", libc::SYS_dup3),
    ("pipe2", libc::SYS_pipe2),
    ("fsync", libc::SYS_fsync),
    ("fdatasync", libc::SYS_fdatasync),
    ("fallocate", libc::SYS_fallocate),
    ("ftruncate", libc::SYS_ftruncate),
    ("copy_file_range", libc::SYS_copy_file_range),
    ("mkdirat", libc::SYS_mkdirat),
    ("mkdir", libc::SYS_mkdir),
    ("unlinkat", libc::SYS_unlinkat),
    ("unlink", libc::SYS_unlink),
    ("renameat2", libc::SYS_renameat2),
    ("rename", libc::SYS_rename),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mprotect", libc::SYS_mprotect),
    ("madvise", libc::SYS_madvise),
    ("mremap", libc::SYS_mremap),
    ("brk", libc::SYS_brk),
    ("membarrier", libc::SYS_membarrier),
    ("futex", libc::SYS_futex),
    ("sched_yield", libc::SYS_sched_yield),
    ("setpriority", libc::SYS_setpriority),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("clone", libc::SYS_clone),
    ("clone3", libc::SYS_clone3),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("rseq", libc::SYS_rseq),
    ("prctl", libc::SYS_prctl),
    // Only to stack the stricter vCPU filter (filters can only narrow).
    ("seccomp", libc::SYS_seccomp),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("tgkill", libc::SYS_tgkill),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    ("getpid", libc::SYS_getpid),
    ("gettid", libc::SYS_gettid),
    ("getuid", libc::SYS_getuid),
    ("geteuid", libc::SYS_geteuid),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("nanosleep", libc::SYS_nanosleep),
    ("gettimeofday", libc::SYS_gettimeofday),
    ("getrandom", libc::SYS_getrandom),
    ("eventfd2", libc::SYS_eventfd2),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("epoll_wait", libc::SYS_epoll_wait),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    ("poll", libc::SYS_poll),
    ("ppoll", libc::SYS_ppoll),
    ("socket", libc::SYS_socket),
    ("socketpair", libc::SYS_socketpair),
    ("bind", libc::SYS_bind),
    ("listen", libc::SYS_listen),
    // Owner-only control and console sockets (vmm/private_socket.rs): on an
    // open descriptor only, never a path.
    ("fchmod", libc::SYS_fchmod),
    ("accept4", libc::SYS_accept4),
    ("connect", libc::SYS_connect),
    ("getsockname", libc::SYS_getsockname),
    ("getpeername", libc::SYS_getpeername),
    ("setsockopt", libc::SYS_setsockopt),
    ("getsockopt", libc::SYS_getsockopt),
    ("sendto", libc::SYS_sendto),
    ("recvfrom", libc::SYS_recvfrom),
    ("sendmsg", libc::SYS_sendmsg),
    ("recvmsg", libc::SYS_recvmsg),
    ("shutdown", libc::SYS_shutdown),
    ("userfaultfd", libc::SYS_userfaultfd),
];

/// Calls of [`VMM_SYSCALLS`] allowed only when each (argument index, value)
/// holds: `setpriority(PRIO_PROCESS, 0, _)` changes the calling thread's
/// nice value and no other process's (the migration's pre-copy thread
/// yields to the vCPUs; without `CAP_SYS_NICE` the value can only go up).
pub const CONFINED: &[(i64, &[(u8, u64)])] = &[(
    libc::SYS_setpriority,
    &[(0, libc::PRIO_PROCESS as u64), (1, 0)],
)];

/// Calls a vCPU thread never makes, on top of what [`VMM_SYSCALLS`] leaves out.
pub const VCPU_FORBIDDEN: &[&str] = &[
    "openat",
    "mkdirat",
    "mkdir",
    "unlinkat",
    "unlink",
    "renameat2",
    "rename",
    "socket",
    "socketpair",
    "bind",
    "listen",
    "accept4",
    "connect",
    "clone",
    "clone3",
    "userfaultfd",
    "prctl",
    "seccomp",
    "setpriority",
];

/// The sandbox the VMM installs.
#[derive(Clone, Debug)]
pub struct Sandbox {
    mode: Mode,
    process: Vec<(&'static str, i64)>,
}

impl Sandbox {
    /// The sandbox for `mode`, without the calls named in `deny`.
    pub fn new(mode: Mode, deny: &[String]) -> Result<Sandbox, SandboxError> {
        for name in deny {
            if !VMM_SYSCALLS.iter().any(|(n, _)| n == name) {
                return Err(SandboxError::UnknownSyscall(name.clone()));
            }
        }
        let process = VMM_SYSCALLS
            .iter()
            .filter(|(n, _)| !deny.iter().any(|d| d == n))
            .copied()
            .collect();
        Ok(Sandbox { mode, process })
    }

    /// Whether a filter will be installed.
    pub fn enabled(&self) -> bool {
        self.mode != Mode::Off
    }

    fn program(&self, allowed: impl Iterator<Item = i64>) -> Result<BpfProgram, SandboxError> {
        let rules = allowed
            .map(|nr| Ok((nr, confined_rules(nr)?)))
            .collect::<Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError>>()
            .map_err(|e| SandboxError::Seccomp(e.into()))?;
        let mismatch = match self.mode {
            Mode::Log => SeccompAction::Log,
            _ => SeccompAction::KillProcess,
        };
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(|e| SandboxError::Seccomp(e.into()))?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.into()))
    }

    /// Installs the process filter on every thread (present and future).
    pub fn install_process(&self) -> Result<(), SandboxError> {
        if !self.enabled() {
            return Ok(());
        }
        let program = self.program(self.process.iter().map(|(_, nr)| *nr))?;
        seccompiler::apply_filter_all_threads(&program).map_err(SandboxError::Seccomp)
    }

    /// The extra filter of a vCPU thread, built before the thread starts (a
    /// vCPU thread must not allocate a filter after it is sandboxed).
    pub fn vcpu_program(&self) -> Result<Option<BpfProgram>, SandboxError> {
        if !self.enabled() {
            return Ok(None);
        }
        let allowed = self
            .process
            .iter()
            .filter(|(n, _)| !VCPU_FORBIDDEN.contains(n))
            .map(|(_, nr)| *nr);
        self.program(allowed).map(Some)
    }
}

/// The rules allowing call `nr`: none (any arguments) unless it is
/// [`CONFINED`].
fn confined_rules(nr: i64) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let Some((_, args)) = CONFINED.iter().find(|(n, _)| *n == nr) else {
        return Ok(Vec::new());
    };
    let conditions = args
        .iter()
        .map(|&(arg, value)| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(vec![SeccompRule::new(conditions)?])
}

/// The vCPU filter of this process, set once by [`Sandbox::install`].
static VCPU_PROGRAM: std::sync::OnceLock<BpfProgram> = std::sync::OnceLock::new();

impl Sandbox {
    /// Installs the process filter now and keeps the vCPU filter for
    /// [`enter_vcpu`].
    pub fn install(&self) -> Result<(), SandboxError> {
        if let Some(program) = self.vcpu_program()? {
            let _ = VCPU_PROGRAM.set(program);
        }
        self.install_process()
    }
}

/// Called first thing on a vCPU thread: installs the vCPU filter if the
/// process is sandboxed. A vCPU that cannot be sandboxed must not run.
pub fn enter_vcpu() {
    if let Some(program) = VCPU_PROGRAM.get() {
        if let Err(e) = seccompiler::apply_filter(program) {
            eprintln!(
                "godwit-vmm: cannot sandbox a vCPU thread: {}",
                godwit_crds::error_chain(&e)
            );
            std::process::exit(1);
        }
    }
}

/// The exit status a shell reports for a process killed by `SIGSYS`.
pub const SIGSYS_SHELL_STATUS: i32 = 128 + libc::SIGSYS;

/// The one capability a VMM that runs as root keeps: creating its taps and
/// putting them on their bridge (`TUNSETIFF`, `SIOCSIFFLAGS`,
/// `SIOCBRADDIF`). A VMM that runs as its own user keeps none: the agent
/// made its taps ([`super::handed`]).
pub const VMM_CAPABILITIES: &[u32] = &[12 /* CAP_NET_ADMIN */];

/// Drops every capability but `keep` (for a VMM run as root,
/// [`VMM_CAPABILITIES`]) from the calling thread's bounding set, so that a
/// program it `exec`s next — even as root — gets no other capability, in
/// any of its threads. Meant for the child between `fork` and `exec` (only
/// `prctl`: async-signal-safe). A VMM still running as root owns /dev/kvm,
/// the state directory and /dev/userfaultfd, but can no longer override
/// file permissions, mount, trace other processes, load modules and so on.
pub fn bound_capabilities_for_exec(keep: &[u32]) -> std::io::Result<()> {
    // Up to the highest capability any kernel defines; a number this kernel
    // does not know answers EINVAL, which ends the loop.
    for cap in 0..64u32 {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with plain integer arguments.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// Becomes user and group `uid` with no supplementary groups, for good:
/// real, effective and saved ids, so every capability is gone and cannot
/// come back (`no_new_privs` too: no set-user-id program gives them back).
/// Meant for the child between `fork` and `exec`, last (only system calls:
/// async-signal-safe).
pub fn become_user_for_exec(uid: u32) -> std::io::Result<()> {
    let check = |r: libc::c_long| {
        if r != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls with integer arguments (setgroups with an
    // empty list); glibc's set*id wrappers would synchronise other threads,
    // which a forked child does not have, so the raw calls are used.
    unsafe {
        check(libc::syscall(
            libc::SYS_setgroups,
            0,
            std::ptr::null::<libc::gid_t>(),
        ))?;
        check(libc::syscall(libc::SYS_setresgid, uid, uid, uid))?;
        check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_list_names_must_be_allowed_calls() {
        assert!(Sandbox::new(Mode::On, &["execve".into()]).is_err());
        let s = Sandbox::new(Mode::On, &["accept4".into()]).unwrap();
        assert!(!s.process.iter().any(|(n, _)| *n == "accept4"));
        assert!(s.process.iter().any(|(n, _)| *n == "connect"));
    }

    #[test]
    fn vcpu_list_only_names_allowed_calls() {
        for name in VCPU_FORBIDDEN {
            assert!(VMM_SYSCALLS.iter().any(|(n, _)| n == name), "{name}");
        }
        // Nothing that starts programs or changes the process's powers.
        for name in [
            "execve",
            "execveat",
            "ptrace",
            "mount",
            "setuid",
            "kexec_load",
            "bpf",
        ] {
            assert!(!VMM_SYSCALLS.iter().any(|(n, _)| *n == name), "{name}");
        }
    }

    /// Runs `call` in a child under the process filter; its wait status.
    fn in_sandboxed_child(call: fn()) -> i32 {
        // In a child, so the test process keeps running.
        let sandbox = Sandbox::new(Mode::On, &[]).unwrap();
        let program = sandbox
            .program(sandbox.process.iter().map(|(_, nr)| *nr))
            .unwrap();
        // SAFETY: the child only installs the filter and makes raw syscalls.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                unsafe { libc::_exit(10) };
            }
            call();
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn a_forbidden_call_kills_the_process() {
        // getppid is not on the list.
        let status = in_sandboxed_child(|| unsafe {
            libc::syscall(libc::SYS_getppid);
        });
        assert!(killed_by_sigsys(status), "status {status:#x}");
    }

    #[test]
    fn a_thread_may_lower_its_own_priority_and_no_one_elses() {
        let own = in_sandboxed_child(|| unsafe {
            libc::syscall(libc::SYS_setpriority, libc::PRIO_PROCESS, 0, 5);
        });
        assert!(
            libc::WIFEXITED(own) && libc::WEXITSTATUS(own) == 0,
            "status {own:#x}"
        );
        // A process by its pid (even its own, as any other), or a whole
        // user: killed.
        let other = in_sandboxed_child(|| unsafe {
            libc::syscall(libc::SYS_setpriority, libc::PRIO_PROCESS, libc::getpid(), 5);
        });
        assert!(killed_by_sigsys(other), "status {other:#x}");
        let user = in_sandboxed_child(|| unsafe {
            libc::syscall(libc::SYS_setpriority, libc::PRIO_USER, 0, 5);
        });
        assert!(killed_by_sigsys(user), "status {user:#x}");
    }
}
