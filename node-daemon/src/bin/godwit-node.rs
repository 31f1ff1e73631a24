//! `godwit-node`: the node agent (one per node, privileged). See `godwit-node --help`.

use std::path::PathBuf;

use clap::Parser;
use godwit_crds::error_chain;
use godwit_node::agent::vmm_user::VmmUsers;
use godwit_node::agent::{self, AgentConfig};
use kube::config::{KubeConfigOptions, Kubeconfig};

const AFTER_HELP: &str = "\
Example (what the DaemonSet runs):
  godwit-node --node \"$NODE_NAME\" --node-ip \"$NODE_IP\" \\
      --state-dir /var/lib/godwit --shared-dir /var/lib/godwit-shared

The agent renews the Lease godwit-node-<node> in --lease-namespace, publishes
the node's VM capacity as annotations on its Node, runs one godwit-vmm process
per VM labelled godwit.dev/node=<node>, each in its own cgroup
<cgroup-root>/<cgroup-parent>/<namespace>_<name> with the VM's limits (they
keep running when the agent restarts, and it finds them again), drives migrations labelled
godwit.dev/source-node or godwit.dev/target-node, and reports status and
Events. On nodes with br_netfilter (net.bridge.bridge-nf-call-iptables=1)
it adds the chain GODWIT-FORWARD, jumped to from FORWARD for bridged frames,
accepting frames to or from its taps (gwt+), and removes it on a clean
shutdown when no VMM runs. When it cannot renew its Lease for the lease duration it stops every
VM on the node (self-fencing).";

/// Godwit's node agent.
#[derive(Parser, Debug)]
#[command(name = "godwit-node", version, after_help = AFTER_HELP)]
struct Args {
    /// This node's name (as the Node object is called).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// The address migration streams to this node use.
    #[arg(long, env = "NODE_IP")]
    node_ip: String,
    /// Kubeconfig file (default: in-cluster config or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Node-local state: VM directories, consoles, local disks.
    #[arg(long, default_value = "/var/lib/godwit")]
    state_dir: PathBuf,
    /// A directory every node mounts at the same path, for shared disks.
    #[arg(long, default_value = "/var/lib/godwit-shared")]
    shared_dir: PathBuf,
    /// The godwit-vmm binary (default: next to this one).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Namespace of the node Leases.
    #[arg(long, default_value = godwit_crds::contract::DEFAULT_LEASE_NAMESPACE)]
    lease_namespace: String,
    /// Lease duration in seconds (renewed every eighth of it; the node fences
    /// itself one second before it runs out unrenewed).
    #[arg(long, default_value_t = godwit_crds::contract::NODE_LEASE_SECONDS)]
    lease_seconds: i32,
    /// vCPUs offered to VMs (default: the host's CPUs).
    #[arg(long)]
    cpu: Option<u64>,
    /// Memory offered to VMs in MiB (default: the host's memory minus 1 GiB).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Ports incoming migrations listen on.
    #[arg(long, default_value = "47000-47999", value_parser = parse_range)]
    migration_ports: (u16, u16),
    /// Where the operator's console proxy connects (default: <node-ip>:9412;
    /// mutual TLS with the node's migration certificate, and only the
    /// proxy's certificate is accepted; "off" disables it).
    #[arg(long)]
    console_addr: Option<String>,
    /// Where /metrics and /healthz are served ("off" disables them).
    #[arg(long, default_value = "0.0.0.0:9411")]
    metrics_addr: String,
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Every VMM migrates over mutual TLS with a node certificate the agent
    /// asks for through a CertificateSigningRequest (signer
    /// godwit.dev/migration; the operator approves and signs it, and
    /// publishes the CA in the ConfigMap godwit-migration-ca in
    /// --lease-namespace). The node's key never leaves it.
    #[arg(long, conflicts_with = "migration_ca_dir")]
    migration_csr: bool,
    /// How long the agent waits for its certificate before it gives up (and
    /// exits, to be restarted).
    #[arg(long, default_value_t = 300)]
    migration_csr_timeout_seconds: u64,
    /// The lifetime of the certificate to ask for, in seconds (the CSR's
    /// expirationSeconds; Kubernetes wants at least 600). Default: the
    /// operator's (--node-certificate-days). The agent asks again at two
    /// thirds of it.
    #[arg(long)]
    migration_certificate_seconds: Option<u64>,
    /// Bring your own migration CA (`ca.crt`, `ca.key`): the agent signs
    /// this node's certificate with it, so every node holds the CA key
    /// (prefer --migration-csr with your CA in the operator's Secret).
    /// Without this or --migration-csr migrations are plain TCP.
    #[arg(long, env = "GODWIT_MIGRATION_CA_DIR")]
    migration_ca_dir: Option<PathBuf>,
    /// The users VMMs run as: each VM gets uid (and gid) BASE + a hash of
    /// its namespace/name modulo 65536, and the agent hands it /dev/kvm,
    /// /dev/userfaultfd, its taps and its migration identity as open
    /// descriptors; `root` runs VMMs as root with CAP_NET_ADMIN alone.
    #[arg(long, default_value = "2000000000", value_parser = parse_vmm_users)]
    vmm_users: VmmUsersArg,
    /// Where the host's cgroup hierarchy is mounted (in the DaemonSet: the
    /// host's /sys/fs/cgroup). cgroup v2 is used when it has the memory, cpu
    /// and pids controllers, else v1 (<root>/memory, <root>/cpu, <root>/pids).
    #[arg(long, default_value = agent::cgroup::DEFAULT_ROOT)]
    cgroup_root: PathBuf,
    /// The cgroup, below the root, that holds each VMM's own cgroup
    /// <namespace>_<name> (made when missing).
    #[arg(long, default_value = agent::cgroup::DEFAULT_PARENT)]
    cgroup_parent: String,
    /// Memory a VMM may use beyond its guest's memory, in MiB: its cgroup's
    /// memory limit is the guest's memory plus this (the OOM killer kills a
    /// VMM that goes over; the VM reports OOMKilled). Tests that want an OOM
    /// kill give a negative value (=-N): the limit is then below the guest's
    /// memory. Never do that on a real node.
    #[arg(long, default_value_t = agent::cgroup::DEFAULT_OVERHEAD_MIB, allow_negative_numbers = true)]
    vmm_memory_overhead_mib: i64,
    /// Which iptables adds the agent's FORWARD rules for VM taps on nodes
    /// with br_netfilter (net.bridge.bridge-nf-call-iptables=1): `default`
    /// (iptables/ip6tables as installed), `nft` or `legacy`. Use the backend
    /// the node's other rules are in.
    #[arg(long, value_enum, default_value_t = IptablesArg::Default)]
    iptables: IptablesArg,
    /// A directory VMs may name files in (kernels, initrds, disk and
    /// template images); repeat it for more. A path a VM names anywhere else,
    /// through `..` or through a symbolic link below the directory, is
    /// refused, and the VM's Ready condition says why
    /// (default: /var/lib/godwit/images and /var/lib/godwit/kernels).
    #[arg(long = "image-dir")]
    image_dirs: Vec<PathBuf>,
}

/// `--iptables`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum IptablesArg {
    /// `iptables` and `ip6tables`.
    Default,
    /// `iptables-nft` and `ip6tables-nft`.
    Nft,
    /// `iptables-legacy` and `ip6tables-legacy`.
    Legacy,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: use FIRST-LAST, e.g. 47000-47999"))?;
    let a: u16 = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || b < a {
        return Err(format!("{s:?}: need 0 < FIRST <= LAST"));
    }
    Ok((a, b))
}

fn host_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (kib / 1024).saturating_sub(1024)
}

/// `--vmm-users`: a base uid, or `root`.
#[derive(Clone, Copy, Debug)]
struct VmmUsersArg(Option<VmmUsers>);

fn parse_vmm_users(s: &str) -> Result<VmmUsersArg, String> {
    if s == "root" {
        return Ok(VmmUsersArg(None));
    }
    let base = s
        .parse()
        .map_err(|_| format!("{s:?}: give a base uid (e.g. 2000000000) or root"))?;
    VmmUsers::new(base).map(|u| VmmUsersArg(Some(u)))
}

fn fail(msg: String) -> ! {
    eprintln!("godwit-node: error: {msg}");
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        // Every line carries its spans (vm, namespace, migration), so one
        // migration can be followed across the operator and both nodes.
        LogFormat::Json => logs.json().with_span_list(true).init(),
    }
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .unwrap_or_else(|e| fail(format!("{}: {}", path.display(), error_chain(&e))));
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| error_chain(&e))
        }
        None => kube::Config::infer().await.map_err(|e| error_chain(&e)),
    }
    .unwrap_or_else(|e| fail(format!("no Kubernetes configuration: {e}")));
    let client = kube::Client::try_from(config)
        .unwrap_or_else(|e| fail(format!("Kubernetes client: {}", error_chain(&e))));
    let vmm_binary = args.vmm.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("godwit-vmm")))
            .unwrap_or_else(|| PathBuf::from("godwit-vmm"))
    });
    if !vmm_binary.exists() {
        fail(format!(
            "{} not found; build it (cargo build --release -p godwit-node) or pass --vmm",
            vmm_binary.display()
        ));
    }
    let console_addr = args
        .console_addr
        .clone()
        .unwrap_or_else(|| format!("{}:{}", args.node_ip, godwit_crds::contract::CONSOLE_PORT));
    if args.metrics_addr != "off" {
        let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
            .await
            .unwrap_or_else(|e| fail(format!("--metrics-addr {}: {e}", args.metrics_addr)));
        let metrics = agent::metrics::global();
        metrics.watch_vms(args.state_dir.clone());
        let auth = std::sync::Arc::new(godwit_auth::Delegated::new(client.clone()));
        let render: godwit_auth::Render = std::sync::Arc::new(|| metrics.render());
        tokio::spawn(godwit_auth::serve_metrics(listener, auth, render));
    }
    if console_addr != "off" {
        let listener = tokio::net::TcpListener::bind(&console_addr)
            .await
            .unwrap_or_else(|e| fail(format!("--console-addr {console_addr}: {e}")));
        let tls = agent::certificates::files_in(&args.state_dir.join("tls"));
        tokio::spawn(agent::console::serve(listener, args.state_dir.clone(), tls));
    }
    let image_dirs = if args.image_dirs.is_empty() {
        agent::image_dirs::DEFAULT_IMAGE_DIRS
            .iter()
            .map(PathBuf::from)
            .collect()
    } else {
        args.image_dirs.clone()
    };
    let image_dirs = agent::image_dirs::ImageDirs::new(image_dirs)
        .unwrap_or_else(|e| fail(format!("--image-dir: {e}")));
    let (vms_dir, cache_dir) = (args.state_dir.join("vms"), args.state_dir.join("cache"));
    let mut private = vec![
        vms_dir.as_path(),
        cache_dir.as_path(),
        args.shared_dir.as_path(),
    ];
    private.extend(args.migration_ca_dir.as_deref());
    image_dirs
        .keep_clear_of(&private)
        .unwrap_or_else(|e| fail(format!("--image-dir: {e}")));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let cfg = AgentConfig {
        node: args.node,
        node_ip: args.node_ip,
        state_dir: args.state_dir,
        shared_dir: args.shared_dir,
        vmm_binary,
        lease_namespace: args.lease_namespace,
        lease_seconds: args.lease_seconds,
        cpu: args.cpu.unwrap_or(cpus),
        memory_bytes: args.memory_mib.unwrap_or_else(host_memory_mib) << 20,
        migration_ports: args.migration_ports,
        migration_ca_dir: args.migration_ca_dir,
        migration_csr: args
            .migration_csr
            .then(|| std::time::Duration::from_secs(args.migration_csr_timeout_seconds)),
        migration_certificate_lifetime: args
            .migration_certificate_seconds
            .map(std::time::Duration::from_secs),
        vmm_users: args.vmm_users.0,
        cgroup_root: args.cgroup_root,
        cgroup_parent: args.cgroup_parent,
        vmm_memory_overhead_bytes: args.vmm_memory_overhead_mib.saturating_mul(1 << 20),
        image_dirs,
        iptables: match args.iptables {
            IptablesArg::Default => agent::firewall::Backend::Default,
            IptablesArg::Nft => agent::firewall::Backend::Nft,
            IptablesArg::Legacy => agent::firewall::Backend::Legacy,
        },
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down; VMs keep running");
    };
    if let Err(e) = agent::run(client, cfg, shutdown).await {
        fail(error_chain(&e));
    }
}
