//! `godwit-local`: Godwit on this machine, without a real cluster.
//!
//! `godwit-local demo [--json]` boots the test guest on one simulated node,
//! live-migrates it to another with a TCP client connected, and prints what
//! happened; with `--json` it ends with one JSON line.
//!
//! `godwit-local up [--nodes N]` brings up a local cluster (API test server,
//! Godwit's CRDs, N namespace nodes registered as Nodes, the operator and a
//! node agent per node, the test guest installed), writes the example
//! manifests rewritten for it, prints the kubeconfig to use, and tears
//! everything down on Ctrl-C or SIGTERM.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "godwit-local",
    version,
    about = "Godwit on this machine: the local demo"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM on node-0 and live-migrate it to node-1 while a client is connected.
    Demo {
        /// Print only a final JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Bring up a local cluster running Godwit and keep it until Ctrl-C.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Directory for the kubeconfigs (removed on exit).
        #[arg(long, default_value = "/tmp/godwit-local")]
        dir: std::path::PathBuf,
    },
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn up(nodes: usize, dir: &std::path::Path) -> anyhow::Result<()> {
    use godwit_e2e::driver::{ClusterDriver, EXAMPLE_MIGRATION, EXAMPLE_TEMPLATE, EXAMPLE_VM};
    let godwit = ClusterDriver::up(nodes, dir)?;
    let examples = dir.join("examples");
    std::fs::create_dir_all(&examples)?;
    for (file, text) in [
        ("1-template.yaml", EXAMPLE_TEMPLATE),
        ("2-vm.yaml", EXAMPLE_VM),
        ("3-migration.yaml", EXAMPLE_MIGRATION),
    ] {
        std::fs::write(examples.join(file), godwit.example(text))?;
    }
    let cluster = &godwit.cluster;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "Local cluster up: {} nodes, API {}",
        nodes,
        cluster.api.url()
    );
    for n in &cluster.fabric.nodes {
        println!(
            "  {}  namespace {}  address {}  bridge {}",
            n.name,
            n.ns.name(),
            n.ip,
            n.bridge
        );
    }
    println!(
        "  kubectl --kubeconfig {} get nodes",
        cluster.kubeconfig.display()
    );
    println!(
        "  kubectl --kubeconfig {} apply -f {}/",
        cluster.kubeconfig.display(),
        examples.display()
    );
    println!(
        "  client namespace {} (address {}): ip netns exec {} ssh ...",
        cluster.fabric.client.name(),
        godwit_testkit::nodes::CLIENT_IP,
        cluster.fabric.client.name()
    );
    // For scripts (e2e/linux/run.sh): where a client of the VMs runs.
    std::fs::write(dir.join("client-netns"), cluster.fabric.client.name())?;
    println!("  logs: {}", cluster.log_dir().display());
    println!(
        "  inside a node: ip netns exec <namespace> kubectl --kubeconfig {} ...",
        cluster.node_kubeconfig.display()
    );
    println!("Ctrl-C tears it down.");
    while !STOP.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    drop(godwit);
    println!("Local cluster down.");
    Ok(())
}

fn main() {
    let args = Args::parse();
    match args.command {
        Cmd::Up { nodes, dir } => {
            if let Err(e) = up(nodes, &dir) {
                eprintln!("godwit-local: error: {e:#}");
                std::process::exit(1);
            }
        }
        Cmd::Demo { json } => match godwit_e2e::demo::run(json) {
            Ok(report) => {
                let ok = report.migration_phase == "Succeeded"
                    && report.vm_phase == "Running"
                    && report.tcp_connection_survived
                    && report.heartbeat_continued;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(&report).expect("report serializes")
                    );
                } else {
                    println!(
                        "{}",
                        if ok {
                            "Demo succeeded."
                        } else {
                            "Demo FAILED."
                        }
                    );
                }
                std::process::exit(if ok { 0 } else { 1 });
            }
            Err(e) => {
                eprintln!("godwit-local: error: {e:#}");
                std::process::exit(1);
            }
        },
    }
}
