//! `godwit-vmm`: runs one KVM virtual machine. See `godwit-vmm --help`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use godwit_crds::error_chain;
use godwit_node::migration::tls::{TlsFiles, TlsIdentity, TlsPem};
use godwit_node::vmm::control::{ControlServer, MigrationIdentity};
use godwit_node::vmm::devices::GuestExit;
use godwit_node::vmm::vm::VmExit;
use godwit_node::vmm::{handover, sandbox};
use godwit_node::vmm::{
    BuildMode, DiskConfig, NetConfig, RuntimeConfig, VmConfig, Vmm, GUEST_RESET_EXIT,
};

const AFTER_HELP: &str = "\
Examples:
  godwit-vmm --kernel guest.elf --memory-mib 256 --vcpus 2 --cmdline 'hb_ms=100' \\
      --serial-log /tmp/vm.log --console-sock /tmp/vm.console --api-sock /tmp/vm.api \\
      --disk path=/tmp/disk.img --disk path=/tmp/seed.img,ro=on \\
      --net tap=tap0,bridge=br0,mac=52:54:00:12:34:56
  godwit-vmm --restore /tmp/snap --serial-log /tmp/vm2.log --api-sock /tmp/vm2.api

Kernels: a PVH ELF (Xen note type 18) or a Linux bzImage (with --initrd).
Devices appear to the guest as virtio-mmio windows (4 KiB at 0xd0000000 with
IRQ 5, then 0xd0001000 with IRQ 6, ...; disks first, then NICs; at most 18).
With ACPI (--acpi on, the default) the guest finds them in the ACPI tables
(RSDP at 0xE0000, also in the PVH start info and the bzImage boot params; DSDT
devices LNRO0005, like QEMU's microvm with acpi=on), next to COM1, a power
button (a Generic Event Device at 0xfeb00000, IRQ 23) and the S5 and reset
registers of the FADT. With --acpi off there are no tables and the devices are
appended to the command line instead (virtio_mmio.device=4K@0xd0000000:5 ...),
for Firecracker-style kernels; such a VM has no power button. A restored or
migrated VM keeps the setting it was started with.
COM1 (0x3F8, IRQ 4) goes to --serial-log and to every client of --console-sock;
what a client writes goes to the guest.

Control socket (--api-sock): one JSON object per line, e.g.
  {\"v\":1,\"cmd\":\"status\"}  pause  resume  stop  stats
  {\"v\":1,\"cmd\":\"shutdown\",\"grace_secs\":30}
stop is the forced stop. shutdown presses the ACPI power button and, unless
the guest powers off (S5) first, forces the stop after grace_secs (default
--shutdown-grace-secs); refused with --acpi off. A press the guest has not
seen yet travels with a snapshot or a migration; the grace timer does not
(send shutdown again to the new VMM).
  dirty-log-start  dirty-log-stop  take-dirty
  {\"v\":1,\"cmd\":\"disk-dirty-start\",\"disk\":0}  disk-dirty-stop  disk-take-dirty
  {\"v\":1,\"cmd\":\"save-state\",\"dir\":\"/tmp/snap\"}
A snapshot directory holds state.json and memory.bin; --restore continues it.

Live migration: start the target with --incoming HOST:PORT (plus this node's
--net tap/bridge and --disk paths), then tell the source
  {\"v\":1,\"cmd\":\"migrate-send\",\"addr\":\"HOST:PORT\"}
and poll migrate-status (migrate-cancel gives up; the guest stays).

Migration TLS: started with --tls-cert, --tls-key and --tls-ca (PEM files: the
node's certificate and chain, its key, the CA of all nodes), a VMM migrates
only over mutual TLS, in both roles. As the target it requires the source's
certificate to chain to the CA; a source without one, with one from another
CA, or speaking plain TCP is refused (exit 3, nothing built). As the source it
presents its certificate and checks the target's against the CA and, by
default, the host part of addr (an IP address must be an IP SAN of the
target's certificate); migrate-send's \"tls_server_name\" names another.
Start every VMM of a node with the node's identity; without the flags the
stream is plain TCP, as before.

Running as an unprivileged user: the node agent opens what only root may
open and hands the descriptors over: --kvm-fd, --userfaultfd-fd, --tap-fd
NAME=FD (a tap already up and on its bridge) and --tls-fd (the identity as
JSON PEM text on a pipe; migrate-send's \"tls\" renews it).

Exit: status 0 when the guest powers off (S5 in the ACPI sleep control
register, or 0 written to the debug-exit port 0xF4; a non-zero byte N there
exits with N), on `stop`, at the end of a shutdown's grace period, and on
SIGTERM (in any state: a forced stop like pulling the plug, vCPUs stopped and
every disk flushed; a graceful stop is the control socket's `shutdown`); 100
when the guest resets (ACPI reset register, i8042 0xFE to port
0x64, triple fault): restart it if its run strategy says so; 1 when KVM cannot
run the guest (e.g. KVM_EXIT_INTERNAL_ERROR); 2 on bad input; 3 when an
incoming migration fails (malformed stream, refused peer, source gone, no
source within --incoming-timeout-s, SIGTERM before the guest runs here: the
guest keeps running on the source); 124 when --timeout-s expired (forced
stop).";

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

/// Run one KVM virtual machine.
#[derive(Parser, Debug)]
#[command(name = "godwit-vmm", version, after_help = AFTER_HELP)]
struct Args {
    /// Kernel: PVH ELF or bzImage (not needed with --restore).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (bzImage boot).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// File that receives the serial console output (appended).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Unix socket for attaching to the serial console.
    #[arg(long)]
    console_sock: Option<PathBuf>,
    /// Unix socket for the control API.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// A disk: path=FILE[,format=raw|qcow2][,ro=on|off] (repeatable). The
    /// format is detected when not given (qcow2 magic, else raw); a qcow2
    /// overlay's backing images are opened read-only. Each image is locked
    /// (exclusive when read-write): a disk another VMM runs is refused.
    #[arg(long, value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A NIC: [tap=NAME][,bridge=BR][,mac=MAC] (repeatable).
    #[arg(long, value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// Restore the snapshot in this directory instead of booting.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// Receive a live migration on this address (host:port) instead of
    /// booting: the VM is built from the source's configuration, with this
    /// node's --net tap/bridge and --disk paths (in order) where given.
    #[arg(long, conflicts_with = "restore")]
    incoming: Option<String>,
    /// Start with the vCPUs paused (resume through the control socket);
    /// with --incoming, keep the guest paused once it has arrived.
    #[arg(long)]
    paused: bool,
    /// Turn KVM dirty logging on from the start (otherwise: dirty-log-start).
    #[arg(long)]
    dirty_log: bool,
    /// Force the VM to stop after this many seconds.
    #[arg(long)]
    timeout_s: Option<u64>,
    /// With --incoming: give up (exit 3) when no source has connected within
    /// this many seconds; 0 waits forever.
    #[arg(long, default_value_t = 60)]
    incoming_timeout_s: u64,
    /// ACPI platform (tables, power button, S5, reset); `off` puts the
    /// devices on the kernel command line instead. Ignored with --restore
    /// and --incoming (the VM keeps its setting).
    #[arg(long, value_enum, default_value = "on")]
    acpi: Switch,
    /// How long a `shutdown` without its own grace_secs waits for the guest
    /// to power off before the forced stop.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Migration TLS: this node's certificate (PEM, with its chain).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Migration TLS: this node's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// Migration TLS: the CA that signs every node's certificate (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Migration TLS from the node agent: a pipe carrying
    /// {"cert","key","ca"} (PEM text) as JSON, read to its end at start.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    tls_fd: Option<i32>,
    /// An open /dev/kvm inherited from the node agent (a VMM running as its
    /// own user cannot open the device).
    #[arg(long)]
    kvm_fd: Option<i32>,
    /// An open /dev/userfaultfd inherited from the node agent (post-copy).
    #[arg(long)]
    userfaultfd_fd: Option<i32>,
    /// A tap the node agent created, brought up and attached: NAME=FD
    /// (repeatable); the --net with tap=NAME uses it.
    #[arg(long, value_parser = parse_tap_fd)]
    tap_fd: Vec<(String, i32)>,
    /// The seccomp sandbox: `on` kills the VMM on a system call it never
    /// makes, `log` only logs such calls to the kernel log, `off` disables it.
    #[arg(long, value_enum, default_value = "on", env = "GODWIT_VMM_SECCOMP")]
    seccomp: sandbox::Mode,
    /// System calls to remove from the sandbox's allow list (comma-separated).
    #[arg(long, value_delimiter = ',')]
    seccomp_deny: Vec<String>,
}

impl Args {
    /// The migration identity, when the TLS flags were given.
    fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }
}

fn kv(s: &str) -> impl Iterator<Item = (&str, &str)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let mut d = DiskConfig {
        path: PathBuf::new(),
        read_only: false,
        format: None,
    };
    for (k, v) in kv(s) {
        match k {
            "path" => d.path = v.into(),
            "ro" | "readonly" => d.read_only = matches!(v, "on" | "true" | "1" | "yes" | ""),
            "format" => d.format = Some(v.parse()?),
            _ => {
                return Err(format!(
                    "unknown disk option {k}; use path=FILE[,format=raw|qcow2][,ro=on]"
                ))
            }
        }
    }
    if d.path.as_os_str().is_empty() {
        return Err("missing path=; use path=FILE[,ro=on]".into());
    }
    Ok(d)
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut n = NetConfig::default();
    for (k, v) in kv(s) {
        match k {
            "tap" => n.tap = v.into(),
            "bridge" => n.bridge = Some(v.into()),
            "mac" => n.mac = Some(v.into()),
            _ => {
                return Err(format!(
                    "unknown net option {k}; use tap=NAME,bridge=BR,mac=MAC"
                ))
            }
        }
    }
    Ok(n)
}

fn parse_tap_fd(s: &str) -> Result<(String, i32), String> {
    let (name, fd) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use NAME=FD"))?;
    let fd = fd
        .parse()
        .map_err(|_| format!("{fd:?} is not a descriptor number; use NAME=FD"))?;
    if name.is_empty() {
        return Err("empty tap name; use NAME=FD".into());
    }
    Ok((name.to_string(), fd))
}

/// Adopts what the node agent handed over (see `vmm::handover`) and returns
/// the migration identity it sent, if any.
fn adopt_handed(args: &Args) -> Option<TlsPem> {
    let fail_on = |e: &dyn std::error::Error| fail(error_chain(e));
    if let Some(fd) = args.kvm_fd {
        handover::set_kvm(fd).unwrap_or_else(|e| fail_on(&e));
    }
    if let Some(fd) = args.userfaultfd_fd {
        handover::set_userfaultfd_device(fd).unwrap_or_else(|e| fail_on(&e));
    }
    for (name, fd) in &args.tap_fd {
        handover::add_tap(name, *fd).unwrap_or_else(|e| fail_on(&e));
    }
    let fd = args.tls_fd?;
    let bytes = handover::read_pipe("TLS", fd).unwrap_or_else(|e| {
        fail(format!(
            "cannot read the migration identity from descriptor {fd}: {e}"
        ))
    });
    Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        fail(format!(
            "descriptor {fd} does not carry a migration identity ({{\"cert\",\"key\",\"ca\"}} PEM text): {e}"
        ))
    }))
}

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::Relaxed);
}

fn fail(msg: String) -> ! {
    eprintln!("godwit-vmm: error: {msg}");
    std::process::exit(2);
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GODWIT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Opened now: non-dumpable, `/proc/self` is root's. Without it a
    // migration reads every page of its first pass.
    if godwit_node::migration::pagemap::open().is_none() {
        tracing::warn!("cannot open /proc/self/pagemap: migrations read never-written pages too");
    }
    sandbox::Sandbox::new(args.seccomp, &args.seccomp_deny)
        .and_then(|s| s.install())
        .unwrap_or_else(|e| fail(error_chain(&e)));
    // Guest memory stays out of core dumps, and no other process of the
    // same user may ptrace this one or read its memory.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let handed_tls = adopt_handed(&args);
    let runtime = RuntimeConfig {
        serial_log: args.serial_log.clone(),
        console_sock: args.console_sock.clone(),
        api_sock: args.api_sock.clone(),
    };
    let identity = migration_identity(&args, handed_tls.clone());
    if let Some(addr) = &args.incoming {
        receive_and_run(&args, addr, handed_tls, identity, runtime);
    }
    let built = match &args.restore {
        Some(dir) => Vmm::restore_snapshot(dir, &runtime),
        None => {
            let Some(kernel) = args.kernel.clone() else {
                fail("--kernel is required (or --restore a snapshot directory)".into())
            };
            let config = VmConfig {
                kernel,
                initrd: args.initrd.clone(),
                cmdline: args.cmdline.clone(),
                memory_mib: args.memory_mib,
                vcpus: args.vcpus,
                disks: args.disk.clone(),
                nets: args.net.clone(),
                acpi: args.acpi == Switch::On,
            };
            Vmm::build(config, &runtime, BuildMode::Boot)
        }
    };
    let (vmm, exits) = built.unwrap_or_else(|e| fail(error_chain(&e)));
    if args.dirty_log {
        vmm.set_dirty_log(true)
            .unwrap_or_else(|e| fail(error_chain(&e)));
    }
    let vmm = Arc::new(vmm);
    install_signal_handlers();
    vmm.start(&runtime, args.paused)
        .unwrap_or_else(|e| fail(error_chain(&e)));
    run(vmm, exits, identity, &runtime, &args);
}

/// The identity outgoing migrations use (files or the agent's PEM text),
/// checked now: a bad one is exit 2 at once.
fn migration_identity(args: &Args, handed: Option<TlsPem>) -> Option<MigrationIdentity> {
    let identity = match (handed, args.tls_files()) {
        (Some(pem), _) => MigrationIdentity::from_pem(pem),
        (None, Some(files)) => MigrationIdentity::from_files(files),
        (None, None) => return None,
    };
    Some(identity.unwrap_or_else(|e| fail(error_chain(&e))))
}

fn install_signal_handlers() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_term as *const () as libc::sighandler_t);
    }
}

/// Waits for one incoming migration, then runs the received VM. Exits 3 when
/// the migration fails (the guest keeps running on the source).
fn receive_and_run(
    args: &Args,
    addr: &str,
    handed: Option<TlsPem>,
    identity: Option<MigrationIdentity>,
    runtime: RuntimeConfig,
) -> ! {
    use godwit_node::migration::{ProgressHandle, ReceiveOptions};
    use godwit_node::vmm::migrate;
    // Check the identity before listening, so a bad file is exit 2 at once.
    let tls = match (&handed, args.tls_files()) {
        (Some(pem), _) => Some(TlsIdentity::from_pem(pem)),
        (None, Some(files)) => Some(TlsIdentity::load(&files)),
        (None, None) => None,
    }
    .map(|identity| identity.unwrap_or_else(|e| fail(error_chain(&e))));
    let listener = std::net::TcpListener::bind(addr).unwrap_or_else(|e| {
        fail(format!(
            "cannot listen for the migration on {addr}: {e}; check --incoming"
        ))
    });
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    install_signal_handlers();
    if tls.is_some() {
        eprintln!("godwit-vmm: the incoming migration must use mutual TLS");
    }
    // Callers read the address from this line: keep its form.
    println!("godwit-vmm: waiting for a migration on {local}");
    let overrides = migrate::TargetOverrides {
        taps: args.net.iter().map(|n| n.tap.clone()).collect(),
        bridges: args.net.iter().map(|n| n.bridge.clone()).collect(),
        disks: args.disk.iter().map(|d| Some(d.path.clone())).collect(),
        start_paused: args.paused,
    };
    wait_for_source(&listener, args.incoming_timeout_s);
    // From the connection on, a SIGTERM ends the receive at once: nothing
    // runs here yet, the guest keeps running on the source.
    let receiving = Arc::new(AtomicBool::new(true));
    let watch = receiving.clone();
    let _ = std::thread::Builder::new()
        .name("term-watch".into())
        .spawn(move || {
            while watch.load(Ordering::Relaxed) {
                if TERM.load(Ordering::Relaxed) {
                    eprintln!("godwit-vmm: SIGTERM during the incoming migration; giving up");
                    std::process::exit(3);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    let progress = ProgressHandle::default();
    let incoming = migrate::receive_incoming(
        &listener,
        &overrides,
        runtime.clone(),
        &ReceiveOptions::default(),
        tls.as_ref(),
        &progress,
    )
    .unwrap_or_else(|e| {
        eprintln!(
            "godwit-vmm: error: incoming migration failed: {}",
            error_chain(&e)
        );
        std::process::exit(3);
    });
    receiving.store(false, Ordering::Relaxed);
    drop(listener);
    eprintln!("godwit-vmm: migration received; the guest runs here");
    let migrate::IncomingVm { vmm, exits, .. } = incoming;
    run(Arc::new(vmm), exits, identity, &runtime, args);
}

/// Waits until a source connects to `listener` (the connection stays queued
/// for the receive to accept). Exits 3 on SIGTERM or when `timeout_s` (0:
/// none) passes first: an incoming VMM whose source never comes must not stay
/// behind holding its tap.
fn wait_for_source(listener: &std::net::TcpListener, timeout_s: u64) {
    use std::os::fd::AsRawFd;
    let deadline = (timeout_s > 0).then(|| Instant::now() + Duration::from_secs(timeout_s));
    loop {
        if TERM.load(Ordering::Relaxed) {
            eprintln!("godwit-vmm: SIGTERM while waiting for the migration source; exiting");
            std::process::exit(3);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!(
                "godwit-vmm: error: incoming migration failed: no source connected within \
                 {timeout_s}s (--incoming-timeout-s)"
            );
            std::process::exit(3);
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a 50 ms timeout bounds the SIGTERM check.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if n > 0 && pfd.revents & libc::POLLIN != 0 {
            return;
        }
    }
}

/// Flushes every disk to stable storage (after a SIGTERM stop): the writes
/// the guest completed are on disk when the process ends.
fn flush_disks(vmm: &Vmm) {
    for i in 0..vmm.disk_count() {
        match vmm.with_disk(i, |b| b.disk().flush()) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("godwit-vmm: warning: cannot flush disk {i}: {e}"),
            Err(e) => eprintln!("godwit-vmm: warning: cannot flush disk {i}: {e}"),
        }
    }
}

/// Serves the control socket and waits for the VM to end; exits the process.
fn run(
    vmm: Arc<Vmm>,
    exits: std::sync::mpsc::Receiver<VmExit>,
    identity: Option<MigrationIdentity>,
    runtime: &RuntimeConfig,
    args: &Args,
) -> ! {
    // The control socket appears last: once it exists, so does the console.
    if let Some(p) = &runtime.api_sock {
        let grace = Duration::from_secs(args.shutdown_grace_secs);
        ControlServer::new(vmm.clone(), identity, grace)
            .serve(p)
            .unwrap_or_else(|e| fail(error_chain(&e)));
    }

    let deadline = args
        .timeout_s
        .map(|s| Instant::now() + Duration::from_secs(s));
    let mut term = false;
    let code = loop {
        match exits.recv_timeout(Duration::from_millis(50)) {
            Ok(VmExit::Guest(GuestExit::Poweroff(c))) => {
                eprintln!("godwit-vmm: guest powered off (status {c})");
                break i32::from(c);
            }
            Ok(VmExit::Guest(GuestExit::AcpiS5)) => {
                eprintln!("godwit-vmm: guest powered off (ACPI S5)");
                break 0;
            }
            Ok(VmExit::Guest(GuestExit::Reset)) => {
                eprintln!("godwit-vmm: guest reset; exiting with status {GUEST_RESET_EXIT}");
                break GUEST_RESET_EXIT;
            }
            Ok(VmExit::ShutdownTimedOut(n)) => {
                eprintln!("godwit-vmm: guest did not power off within {n}s; forcing the stop");
                break 0;
            }
            Ok(VmExit::Stopped) => {
                eprintln!("godwit-vmm: stopped by control request");
                break 0;
            }
            Ok(VmExit::Failed(msg)) => {
                eprintln!("godwit-vmm: error: {msg}");
                break 1;
            }
            Err(_) => {}
        }
        if TERM.load(Ordering::Relaxed) {
            eprintln!("godwit-vmm: SIGTERM; stopping the VM (forced, disks flushed)");
            term = true;
            break 0;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!("godwit-vmm: timeout expired; forced stop");
            break 124;
        }
    };
    vmm.stop();
    if term {
        flush_disks(&vmm);
    }
    for p in [&runtime.api_sock, &runtime.console_sock]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(code);
}
