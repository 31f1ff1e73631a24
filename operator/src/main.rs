//! `godwit-operator`: the Godwit control plane (see the library docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use godwit_crds::contract::DEFAULT_LEASE_NAMESPACE;
use godwit_crds::error_chain;
use godwit_operator::config::{self, DrsConfig, DrsMode};
use godwit_operator::reservations::{self, CpuAllocationRatio};
use godwit_operator::scheduler::{Reserve, Strategy};
use godwit_operator::{MigrationLimits, OperatorConfig};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tracing::error;

/// Places VMs on nodes and moves them between nodes.
#[derive(Parser, Debug)]
#[command(name = "godwit-operator", version)]
struct Args {
    /// kubeconfig to use; in-cluster or $KUBECONFIG when absent.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the node Leases and the leader Lease.
    #[arg(long, default_value = DEFAULT_LEASE_NAMESPACE)]
    lease_namespace: String,
    /// Where /metrics and /healthz are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Where the aggregated console API (subresources.godwit.dev, behind the
    /// APIService and the godwit-api Service) is served over HTTPS; "off"
    /// serves none. Needs the migration CA (--migration-ca-secret).
    #[arg(long, default_value = "0.0.0.0:8443")]
    api_addr: String,
    /// The Service the APIService points at (its names are in the serving
    /// certificate).
    #[arg(long, default_value = godwit_crds::contract::SUBRESOURCES_SERVICE)]
    api_service: String,
    /// spread: prefer the emptiest node; pack: the fullest that fits.
    #[arg(long, default_value = "spread")]
    placement: Strategy,
    /// Percent of every node's CPU and memory kept free for HA restarts.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=90))]
    reserve_percent: u8,
    /// Migrations in flight on one node (as source or target).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    max_migrations_per_node: u64,
    /// Migrations in flight in the cluster.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    max_migrations_per_cluster: u64,
    /// Finished (Succeeded, Failed, Cancelled) VMMigrations kept per VM; the
    /// operator deletes older ones when another one finishes.
    #[arg(long, default_value_t = godwit_operator::config::DEFAULT_FINISHED_MIGRATIONS_KEPT as u64, value_parser = clap::value_parser!(u64).range(1..))]
    finished_migrations_kept: u64,
    /// The Secret (in --lease-namespace) holding the migration CA (`ca.crt`,
    /// `ca.key`): made with a new CA when it does not exist, kept when it
    /// does (bring your own by creating it first). The operator signs the
    /// nodes' migration certificates with it (CSR signer
    /// godwit.dev/migration); "off" leaves it alone and signs nothing.
    #[arg(long, default_value = godwit_operator::migration_ca::DEFAULT_SECRET)]
    migration_ca_secret: String,
    /// Days a CA made by the operator is valid.
    #[arg(long, default_value_t = godwit_operator::migration_ca::DEFAULT_VALIDITY_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    migration_ca_validity_days: u32,
    /// Who may get a node migration certificate through a
    /// CertificateSigningRequest (default: the node daemons' service account,
    /// system:serviceaccount:<lease-namespace>:godwit-node).
    #[arg(long)]
    node_user: Option<String>,
    /// Days a node's migration certificate is valid (nodes ask again after
    /// two thirds of it).
    #[arg(long, default_value_t = godwit_operator::signer::DEFAULT_VALIDITY_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    node_certificate_days: u32,
    /// DRS balancer: off, manual (recommend only) or automatic (migrate).
    #[arg(long, default_value = "off")]
    drs_mode: DrsMode,
    /// How often the DRS balancer looks, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    drs_interval: u64,
    /// The imbalance DRS tolerates: standard deviation of the nodes' loads
    /// (each 0..1), e.g. 0.1.
    #[arg(long, default_value_t = 0.1, value_parser = parse_threshold)]
    drs_threshold: f64,
    /// vCPUs per physical CPU for placement and reservation pods (KubeVirt's
    /// cpuAllocationRatio); memory is not overcommitted.
    #[arg(long, env = "GODWIT_CPU_ALLOCATION_RATIO", default_value = "10")]
    cpu_allocation_ratio: CpuAllocationRatio,
    /// The image of the reservation pods that show VMs to Kubernetes.
    #[arg(long, env = "GODWIT_RESERVATION_IMAGE", default_value = reservations::DEFAULT_IMAGE)]
    reservation_image: String,
    /// Identity in the leader Lease (default: hostname-pid).
    #[arg(long)]
    id: Option<String>,
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Text => logs.init(),
        // Every line carries its spans (vm, namespace, migration), so one
        // migration can be followed across the operator and both nodes.
        LogFormat::Json => logs.json().with_span_list(true).init(),
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let kube_config = match &args.kubeconfig {
        Some(path) => {
            kube::Config::from_custom_kubeconfig(
                Kubeconfig::read_from(path)?,
                &KubeConfigOptions::default(),
            )
            .await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(kube_config)?;
    let migration_ca =
        (args.migration_ca_secret != "off").then(|| godwit_operator::migration_ca::CaSecret {
            namespace: args.lease_namespace.clone(),
            name: args.migration_ca_secret.clone(),
            validity_days: args.migration_ca_validity_days,
        });
    let console_api = match (args.api_addr.as_str(), &migration_ca) {
        ("off", _) => None,
        (addr, Some(ca)) => Some(godwit_operator::console_api::ApiConfig {
            addr: addr
                .parse()
                .map_err(|e| format!("--api-addr {addr:?}: {e}"))?,
            service: args.api_service.clone(),
            ca: ca.clone(),
        }),
        (_, None) => {
            return Err(
                "--api-addr needs the migration CA (--migration-ca-secret is off); \
                        pass --api-addr off to serve no console API"
                    .into(),
            )
        }
    };
    let node_user = args
        .node_user
        .clone()
        .unwrap_or_else(|| config::default_node_user(&args.lease_namespace));
    let config = OperatorConfig {
        migration_ca,
        node_user,
        node_certificate_days: args.node_certificate_days,
        console_api,
        lease_namespace: args.lease_namespace,
        metrics_addr: Some(args.metrics_addr),
        placement: args.placement,
        reserve: Reserve {
            percent: args.reserve_percent,
        },
        migrations: MigrationLimits {
            per_node: args.max_migrations_per_node as usize,
            per_cluster: args.max_migrations_per_cluster as usize,
        },
        id: args.id.unwrap_or_else(config::default_id),
        drs: DrsConfig {
            mode: args.drs_mode,
            interval: std::time::Duration::from_secs(args.drs_interval),
            threshold: args.drs_threshold,
        },
        cpu_allocation_ratio: args.cpu_allocation_ratio,
        reservation_image: args.reservation_image,
        finished_migrations_kept: args.finished_migrations_kept as usize,
        ..OperatorConfig::default()
    };
    godwit_operator::run_until(client, config, shutdown_signal()).await?;
    Ok(())
}

fn parse_threshold(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(t) if (0.0..=1.0).contains(&t) => Ok(t),
        _ => Err(format!("{text:?} is not a number between 0 and 1")),
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
