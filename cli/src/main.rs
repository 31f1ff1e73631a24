//! `kubectl-godwit`: drive Godwit VMs the way `virtctl` drives KubeVirt's.
//!
//! On `PATH` it is a kubectl plugin (`kubectl godwit migrate demo --follow`);
//! it also runs on its own. It talks only to the Kubernetes API (the
//! console too: through the aggregated API the operator serves, see
//! [`console`]).
//!
//! | command | what it changes |
//! | --- | --- |
//! | `start VM` | `spec.runStrategy` to `Always` (when it would keep the VM off) |
//! | `stop VM [--force]` (also `shutdown`) | `spec.runStrategy` to `Halted`: the node agent presses the guest's power button and stops it by force after `spec.terminationGracePeriodSeconds` (default 30); `--force` also sets annotation `godwit.dev/force-stop-requested` (see `godwit_crds::contract::FORCE_STOP_ANNOTATION`), which skips the button |
//! | `restart VM` | annotation `godwit.dev/restart-requested` (see `godwit_crds::contract::RESTART_ANNOTATION`) |
//! | `pause VM` / `unpause VM` | sets / removes annotation `godwit.dev/paused: "true"` (see `godwit_crds::contract::PAUSE_ANNOTATION`); the node agent pauses or resumes the VMM and reports the `Paused` condition |
//! | `migrate VM [--to NODE] [--follow]` | creates a `VMMigration`; `--follow` shows its progress and result |
//! | `migrate-cancel VM` | annotation `godwit.dev/cancel: "true"` on the VM's active `VMMigration` |
//! | `console VM` | nothing: attaches to the serial console, `Ctrl-]` detaches |
//! | `port-forward VM [LOCAL:]REMOTE... [--stdio]` | nothing: forwards local TCP ports to the guest's (see [`forward`]) |
//! | `ssh [USER@]VM`, `scp SRC... DST` | nothing: runs OpenSSH's client through `port-forward --stdio` |
//! | `status VM` | nothing: the VM, its conditions and its migration |
//! | `version` | nothing: the plugin's, the API server's and the operator's versions |
//! | `create vm NAME --from-template T` | nothing: prints a VirtualMachine manifest for `kubectl apply -f -` |
//! | `completion bash\|zsh\|fish` | nothing: prints a completion script (needs no cluster) |

mod checks;
mod console;
mod create;
mod follow;
mod forward;
#[cfg(test)]
mod krew;
mod version;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use godwit_crds::contract::{
    CANCEL_ANNOTATION, FORCE_STOP_ANNOTATION, PAUSE_ANNOTATION, RESTART_ANNOTATION,
};
use godwit_crds::{
    error_chain, MigrationMode, MigrationPhase, MigrationPolicy, RunStrategy, VMMigration,
    VMMigrationSpec, VirtualMachine,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::ResourceExt;
use serde_json::json;

use checks::{Refusal, VmView};

/// Start, stop, restart, pause, migrate and attach to Godwit VMs.
#[derive(Parser, Debug)]
#[command(name = "kubectl-godwit", bin_name = "kubectl godwit", version)]
struct Args {
    /// Namespace of the VM (default: the kubeconfig context's, else "default").
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a stopped VM (sets runStrategy Always).
    Start {
        /// The VM.
        vm: String,
    },
    /// Stop a VM and keep it stopped (sets runStrategy Halted). The guest's
    /// ACPI power button is pressed and the guest gets the VM's
    /// spec.terminationGracePeriodSeconds (default 30) to power off before
    /// it is stopped by force. `shutdown` is the same command.
    #[command(visible_alias = "shutdown")]
    Stop {
        /// The VM.
        vm: String,
        /// Stop it by force at once, without the power button (also cuts
        /// short a graceful stop under way).
        #[arg(long)]
        force: bool,
    },
    /// Stop a running VM and start it again (needs runStrategy Always).
    Restart {
        /// The VM.
        vm: String,
    },
    /// Pause a running VM's vCPUs (sets annotation godwit.dev/paused). It
    /// stays paused across live migrations and restarts until `unpause`.
    Pause {
        /// The VM.
        vm: String,
    },
    /// Let a paused VM's vCPUs run again (removes annotation godwit.dev/paused).
    Unpause {
        /// The VM.
        vm: String,
    },
    /// Live-migrate a running VM to another node.
    Migrate {
        /// The VM.
        vm: String,
        /// The node to move to (default: the operator picks one).
        #[arg(long)]
        to: Option<String>,
        /// Show the migration's progress until it ends, then its result.
        #[arg(short, long)]
        follow: bool,
        /// Migrate even a VM whose evictionStrategy is Shutdown.
        #[arg(long)]
        force: bool,
        /// Cap the migration stream (Mbit/s; default: the VM's policy).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        bandwidth_mbps: Option<u32>,
    },
    /// Cancel the VM's live migration under way; the VM stays on its source node.
    MigrateCancel {
        /// The VM.
        vm: String,
    },
    /// Attach to a VM's serial console (Ctrl-] detaches).
    Console {
        /// The VM.
        vm: String,
    },
    /// Forward local TCP ports to ports of the guest, through the API
    /// server (`kubectl godwit port-forward web 8080:80`; `:80` picks a free
    /// local port). `--stdio` relays one connection over standard input and
    /// output instead, as an ssh ProxyCommand.
    PortForward {
        /// The VM.
        vm: String,
        /// `[LOCAL:]REMOTE`, one or more (`--stdio`: exactly one REMOTE).
        #[arg(required = true)]
        ports: Vec<String>,
        /// The local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        address: std::net::IpAddr,
        /// Relay one connection over standard input and output.
        #[arg(long)]
        stdio: bool,
    },
    /// Open an SSH session to the guest through the API server: runs the
    /// local `ssh` with `port-forward --stdio` as its ProxyCommand, so the
    /// VM needs no address reachable from here.
    Ssh {
        /// `[USER@]VM`.
        target: String,
        /// The guest's SSH port.
        #[arg(short = 'p', long, default_value_t = 22)]
        port: u16,
        /// The login user (`ssh -l`), unless given as USER@VM.
        #[arg(short = 'l', long)]
        username: Option<String>,
        /// The identity file (`ssh -i`).
        #[arg(short = 'i', long)]
        identity_file: Option<PathBuf>,
        /// An ssh option (`-o NAME=VALUE`), repeatable.
        #[arg(short = 'o', long = "option")]
        options: Vec<String>,
        /// The command to run in the guest (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Copy files to or from the guest with the local `scp`, through the
    /// API server: name the VM's side as `[USER@]VM:PATH`
    /// (`kubectl godwit scp ./app.conf root@web:/etc/app.conf`).
    Scp {
        /// Sources, then the destination; exactly one VM may be named.
        #[arg(required = true, num_args = 2..)]
        paths: Vec<String>,
        /// The guest's SSH port.
        #[arg(short = 'P', long, default_value_t = 22)]
        port: u16,
        /// Copy directories recursively.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// The identity file (`scp -i`).
        #[arg(short = 'i', long)]
        identity_file: Option<PathBuf>,
        /// An ssh option (`-o NAME=VALUE`), repeatable.
        #[arg(short = 'o', long = "option")]
        options: Vec<String>,
    },
    /// Show a VM's phase, node, conditions and migration.
    Status {
        /// The VM.
        vm: String,
    },
    /// Show the plugin's version, the API server's and the operator's image.
    Version,
    /// Print a manifest (nothing is created): `kubectl godwit create vm web
    /// --from-template testguest | kubectl apply -f -`.
    Create {
        #[command(subcommand)]
        what: CreateCommand,
    },
    /// Print a shell completion script for `kubectl-godwit`
    /// (`source <(kubectl-godwit completion bash)`).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// What `create` prints.
#[derive(Subcommand, Debug)]
enum CreateCommand {
    /// A VirtualMachine from a VMTemplate: the template's machine with a
    /// root disk copied from its image.
    Vm {
        /// The new VM's name.
        name: String,
        /// The VMTemplate (in the same namespace).
        #[arg(long)]
        from_template: String,
    },
}

/// What can go wrong; every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No usable kubeconfig.
    #[error("Cannot load the Kubernetes configuration (pass --kubeconfig or set KUBECONFIG)")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The VM does not exist.
    #[error("VirtualMachine {name:?} not found in namespace {namespace:?}: list them with `kubectl get gvm -n {namespace}`, or pass -n NAMESPACE")]
    VmNotFound {
        /// The VM's name.
        name: String,
        /// Where it was looked for.
        namespace: String,
    },
    /// The command does not apply to the VM as it is.
    #[error("{0}")]
    Refused(Refusal),
    /// The template named on the command line does not exist.
    #[error("VMTemplate {name:?} not found in namespace {namespace:?}: list them with `kubectl get vmtemplates -n {namespace}`, or pass -n NAMESPACE")]
    TemplateNotFound {
        /// The template's name.
        name: String,
        /// Where it was looked for.
        namespace: String,
    },
    /// A node named on the command line does not exist.
    #[error("Node {0:?} not found: list the nodes with `kubectl get nodes -l godwit.dev/node`")]
    NodeNotFound(String),
    /// An API request failed.
    #[error("Cannot {0}")]
    Api(String, #[source] kube::Error),
    /// The console could not be reached or failed.
    #[error("Console: {0}")]
    Console(String),
    /// Attaching to the console failed.
    #[error(transparent)]
    Attach(#[from] console::ConsoleError),
    /// A watch failed.
    #[error("{0}")]
    Watch(String),
    /// A port-forward, `ssh` or `scp` could not start or failed.
    #[error(transparent)]
    Forward(#[from] forward::ForwardError),
    /// A followed migration did not succeed.
    #[error("Migration {name} ended {phase:?}: {reason}")]
    MigrationEnded {
        /// The VMMigration.
        name: String,
        /// Its final phase.
        phase: MigrationPhase,
        /// Its failureReason.
        reason: String,
    },
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> CliError {
    let what = what.into();
    move |e| CliError::Api(what, e)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// A client and the namespace commands act in.
struct Ctx {
    client: kube::Client,
    namespace: String,
}

impl Ctx {
    async fn new(args: &Args) -> Result<Ctx, CliError> {
        let options = KubeConfigOptions {
            context: args.context.clone(),
            ..Default::default()
        };
        let config = match &args.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path).map_err(|e| CliError::Config(e.into()))?;
                kube::Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .map_err(|e| CliError::Config(e.into()))?
            }
            None if args.context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| CliError::Config(e.into()))?,
            None => kube::Config::infer()
                .await
                .map_err(|e| CliError::Config(e.into()))?,
        };
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).map_err(|e| CliError::Config(e.into()))?;
        Ok(Ctx { client, namespace })
    }

    fn vms(&self) -> Api<VirtualMachine> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn migrations(&self) -> Api<VMMigration> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn vm(&self, name: &str) -> Result<VirtualMachine, CliError> {
        self.vms()
            .get_opt(name)
            .await
            .map_err(api_err(format!("read VirtualMachine {name:?}")))?
            .ok_or_else(|| CliError::VmNotFound {
                name: name.into(),
                namespace: self.namespace.clone(),
            })
    }

    async fn patch_vm(&self, name: &str, patch: serde_json::Value) -> Result<(), CliError> {
        self.vms()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_err(format!("update VirtualMachine {name:?}")))?;
        Ok(())
    }
}

async fn run(args: Args) -> Result<(), CliError> {
    if let Command::Completion { shell } = &args.command {
        // Needs no cluster.
        clap_complete::generate(
            *shell,
            &mut completion_command(),
            "kubectl-godwit",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    if let Command::Version = &args.command {
        // Printed before connecting, so it shows even without a cluster.
        println!("{}", version::client_line());
    }
    let ctx = Ctx::new(&args).await?;
    match &args.command {
        Command::Start { vm } => start(&ctx, vm).await,
        Command::Stop { vm, force } => stop(&ctx, vm, *force).await,
        Command::Restart { vm } => restart(&ctx, vm).await,
        Command::Migrate {
            vm,
            to,
            follow,
            force,
            bandwidth_mbps,
        } => {
            let policy = bandwidth_mbps.map(|b| MigrationPolicy {
                bandwidth_mbps: Some(b),
                ..Default::default()
            });
            migrate(&ctx, vm, to.as_deref(), *follow, *force, policy).await
        }
        Command::Console { vm } => console_cmd(&ctx, vm).await,
        Command::PortForward {
            vm,
            ports,
            address,
            stdio,
        } => port_forward(&ctx, vm, ports, *address, *stdio).await,
        Command::Ssh {
            target,
            port,
            username,
            identity_file,
            options,
            command,
        } => {
            let (user, vm) = forward::split_user(target);
            checks::forward(&VmView::of(&ctx.vm(vm).await?)).map_err(CliError::Refused)?;
            let ssh = forward::SshArgs {
                proxy: forward::proxy_command(&args_for_proxy(&args, &ctx), vm, *port)?,
                identity_file: identity_file.clone(),
                options: options.clone(),
            };
            let user = user.map(str::to_string).or_else(|| username.clone());
            Err(forward::exec_ssh(&ssh, user.as_deref(), vm, &ctx.namespace, command).into())
        }
        Command::Scp {
            paths,
            port,
            recursive,
            identity_file,
            options,
        } => {
            let vm = forward::scp_vm(paths)?;
            checks::forward(&VmView::of(&ctx.vm(&vm).await?)).map_err(CliError::Refused)?;
            let ssh = forward::SshArgs {
                proxy: forward::proxy_command(&args_for_proxy(&args, &ctx), &vm, *port)?,
                identity_file: identity_file.clone(),
                options: options.clone(),
            };
            Err(forward::exec_scp(&ssh, *recursive, paths, &ctx.namespace).into())
        }
        Command::Status { vm } => status(&ctx, vm).await,
        Command::Pause { vm } => pause(&ctx, vm).await,
        Command::Unpause { vm } => unpause(&ctx, vm).await,
        Command::MigrateCancel { vm } => migrate_cancel(&ctx, vm).await,
        Command::Version => version::run(&ctx.client).await,
        Command::Create {
            what:
                CreateCommand::Vm {
                    name,
                    from_template,
                },
        } => create::run(&ctx.client, &ctx.namespace, name, from_template).await,
        Command::Completion { .. } => unreachable!("handled before connecting"),
    }
}

/// The global flags a ProxyCommand repeats, so that it reaches the same
/// cluster and namespace.
fn args_for_proxy(args: &Args, ctx: &Ctx) -> forward::Globals {
    forward::Globals {
        kubeconfig: args.kubeconfig.clone(),
        context: args.context.clone(),
        namespace: ctx.namespace.clone(),
    }
}

async fn port_forward(
    ctx: &Ctx,
    name: &str,
    ports: &[String],
    address: std::net::IpAddr,
    stdio: bool,
) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    checks::forward(&VmView::of(&vm)).map_err(CliError::Refused)?;
    let target = forward::Vm {
        client: ctx.client.clone(),
        namespace: ctx.namespace.clone(),
        name: name.to_string(),
    };
    if stdio {
        let [remote] = ports else {
            return Err(forward::ForwardError::Usage(
                "--stdio relays exactly one port: give only REMOTE".into(),
            )
            .into());
        };
        if remote.contains(':') {
            return Err(forward::ForwardError::Usage(
                "--stdio listens on no local port: give only REMOTE".into(),
            )
            .into());
        }
        let (_, remote) = forward::parse_ports(remote)?;
        return Ok(forward::stdio(&target, remote).await?);
    }
    let ports = ports
        .iter()
        .map(|p| forward::parse_ports(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(forward::listen(&target, address, &ports).await?)
}

async fn start(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    let view = VmView::of(&vm);
    match checks::start(&view) {
        Ok(Some(strategy)) => {
            ctx.patch_vm(name, json!({"spec": {"runStrategy": strategy}}))
                .await?;
            println!(
                "virtualmachine/{name} starting (runStrategy {strategy:?}); watch it with `kubectl get gvm {name} -n {} -w`",
                ctx.namespace
            );
        }
        Ok(None) => println!("virtualmachine/{name} is already {:?}", view.phase),
        Err(r) => return Err(CliError::Refused(r)),
    }
    Ok(())
}

async fn stop(ctx: &Ctx, name: &str, force: bool) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    let view = VmView::of(&vm);
    checks::stop(&view).map_err(CliError::Refused)?;
    let now = Timestamp::now().to_string();
    ctx.patch_vm(name, stop_patch(force, &now)).await?;
    let how = if force {
        "by force, at once".to_string()
    } else {
        format!(
            "the guest's power button is pressed; it is stopped by force if it has not powered off within {}s (spec.terminationGracePeriodSeconds; `--force` skips the wait)",
            vm.spec.termination_grace().as_secs()
        )
    };
    println!(
        "virtualmachine/{name} stopping (runStrategy Halted) {how}; start it again with `kubectl godwit start {name}`"
    );
    Ok(())
}

/// The patch `stop` sends: runStrategy Halted, and with `force` the time
/// `now` of the forced stop request.
fn stop_patch(force: bool, now: &str) -> serde_json::Value {
    let mut patch = json!({"spec": {"runStrategy": RunStrategy::Halted}});
    if force {
        patch["metadata"] = json!({"annotations": {FORCE_STOP_ANNOTATION: now}});
    }
    patch
}

async fn restart(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    checks::restart(&VmView::of(&vm)).map_err(CliError::Refused)?;
    let now = Timestamp::now().to_string();
    ctx.patch_vm(
        name,
        json!({"metadata": {"annotations": {RESTART_ANNOTATION: now}}}),
    )
    .await?;
    println!("virtualmachine/{name} restart requested at {now}");
    Ok(())
}

async fn pause(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    let notes = checks::pause(&VmView::of(&vm)).map_err(CliError::Refused)?;
    for note in notes {
        eprintln!("note: {note}");
    }
    ctx.patch_vm(name, pause_patch(true)).await?;
    println!(
        "virtualmachine/{name} pause requested: its node agent pauses the vCPUs (condition Paused); resume it with `kubectl godwit unpause {name}`"
    );
    Ok(())
}

async fn unpause(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    if !vm.annotations().contains_key(PAUSE_ANNOTATION) {
        println!("virtualmachine/{name} is not paused");
        return Ok(());
    }
    ctx.patch_vm(name, pause_patch(false)).await?;
    println!("virtualmachine/{name} unpause requested: its node agent resumes the vCPUs");
    Ok(())
}

/// The command line as the completion scripts see it: the plugin binary's
/// own name, which the shell completes (`kubectl godwit` is kubectl's).
fn completion_command() -> clap::Command {
    Args::command().bin_name("kubectl-godwit")
}

/// The patch `pause` (`true`) and `unpause` send.
fn pause_patch(paused: bool) -> serde_json::Value {
    let value = if paused { json!("true") } else { json!(null) };
    json!({"metadata": {"annotations": {PAUSE_ANNOTATION: value}}})
}

async fn migrate_cancel(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    let mig = checks::migrate_cancel(&VmView::of(&vm)).map_err(CliError::Refused)?;
    let migration = ctx
        .migrations()
        .get_opt(&mig)
        .await
        .map_err(api_err(format!("read VMMigration {mig:?}")))?
        .ok_or_else(|| CliError::Refused(checks::Refusal::NoMigration(name.into())))?;
    let phase = migration.status.unwrap_or_default().phase;
    if phase.is_final() {
        return Err(CliError::Refused(checks::Refusal::MigrationEnded {
            name: name.into(),
            migration: mig,
            phase: format!("{phase:?}"),
        }));
    }
    ctx.migrations()
        .patch(
            &mig,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {CANCEL_ANNOTATION: "true"}}})),
        )
        .await
        .map_err(api_err(format!("update VMMigration {mig:?}")))?;
    println!(
        "vmmigration/{mig} cancel requested: {name} stays on {}; watch it end Cancelled with `kubectl get gvmm {mig} -n {} -w`",
        vm.status.and_then(|s| s.node_name).as_deref().unwrap_or("its source node"),
        ctx.namespace
    );
    Ok(())
}

async fn migrate(
    ctx: &Ctx,
    name: &str,
    to: Option<&str>,
    follow: bool,
    force: bool,
    policy: Option<MigrationPolicy>,
) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    let view = VmView::of(&vm);
    if let Some(node) = to {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        if nodes
            .get_opt(node)
            .await
            .map_err(api_err(format!("read Node {node:?}")))?
            .is_none()
        {
            return Err(CliError::NodeNotFound(node.into()));
        }
    }
    let notes = checks::migrate(&view, to, force).map_err(CliError::Refused)?;
    for note in notes {
        eprintln!("note: {note}");
    }
    let mut migration = VMMigration::new(
        &format!("{name}-{}", Timestamp::now().as_second()),
        VMMigrationSpec {
            vm_name: name.into(),
            target_node: to.map(str::to_string),
            mode: MigrationMode::Live,
            policy,
            // A node-local writable disk moves with the VM (the operator
            // refuses the migration otherwise).
            storage: (!view.local_disks.is_empty()).then_some(godwit_crds::StorageMode::Copy),
        },
    );
    migration.metadata.namespace = Some(ctx.namespace.clone());
    let created = ctx
        .migrations()
        .create(&PostParams::default(), &migration)
        .await
        .map_err(api_err(format!("create a VMMigration for {name:?}")))?;
    let mig = created.name_any();
    println!(
        "vmmigration/{mig} created: {name} leaves {}{}",
        view.node.as_deref().unwrap_or("?"),
        to.map(|t| format!(" for {t}")).unwrap_or_default()
    );
    if !follow {
        println!(
            "follow it with `kubectl godwit migrate --follow` next time, or `kubectl get gvmm {mig} -n {} -w`",
            ctx.namespace
        );
        return Ok(());
    }
    follow::follow(&ctx.migrations(), &mig).await
}

async fn console_cmd(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    let view = VmView::of(&vm);
    let node = checks::console(&view).map_err(CliError::Refused)?;
    let target = console::Target {
        namespace: ctx.namespace.clone(),
        name: name.into(),
        node,
    };
    console::attach(&ctx.client, &target).await?;
    Ok(())
}

async fn status(ctx: &Ctx, name: &str) -> Result<(), CliError> {
    let vm = ctx.vm(name).await?;
    let view = VmView::of(&vm);
    println!("VirtualMachine {}/{name}", ctx.namespace);
    println!("  Phase:            {:?}", view.phase);
    println!(
        "  Node:             {}",
        view.node.as_deref().unwrap_or("<none>")
    );
    println!("  Run strategy:     {:?}", vm.spec.run_strategy);
    println!("  Eviction:         {:?}", vm.spec.eviction_strategy);
    let status = vm.status.clone().unwrap_or_default();
    for a in &status.addresses {
        println!(
            "  Address:          {} {} {}",
            a.network,
            a.mac.as_deref().unwrap_or("-"),
            a.ip.as_deref().unwrap_or("-")
        );
    }
    for c in &status.conditions {
        println!(
            "  Condition:        {}={} {}: {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    if let Some(m) = &status.migration {
        println!("  Migration:        {m} (follow: kubectl get gvmm {m} -w)");
        if let Some(mig) = ctx
            .migrations()
            .get_opt(m)
            .await
            .map_err(api_err(format!("read VMMigration {m:?}")))?
        {
            let s = mig.status.unwrap_or_default();
            if let Some(p) = &s.progress {
                println!("  Progress:         {}", follow::progress_line(s.phase, p));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_halts_the_vm_and_force_also_asks_for_no_grace() {
        let now = "2027-01-15T08:00:00Z";
        assert_eq!(
            stop_patch(false, now),
            json!({"spec": {"runStrategy": "Halted"}})
        );
        assert_eq!(
            stop_patch(true, now),
            json!({
                "spec": {"runStrategy": "Halted"},
                "metadata": {"annotations": {"godwit.dev/force-stop-requested": now}},
            })
        );
    }

    #[test]
    fn pause_sets_the_annotation_and_unpause_removes_it() {
        assert_eq!(
            pause_patch(true),
            json!({"metadata": {"annotations": {"godwit.dev/paused": "true"}}})
        );
        assert_eq!(
            pause_patch(false),
            json!({"metadata": {"annotations": {"godwit.dev/paused": null}}})
        );
    }

    #[test]
    fn completion_scripts_name_the_plugin_and_its_commands() {
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut completion_command(),
            "kubectl-godwit",
            &mut out,
        );
        let script = String::from_utf8(out).unwrap();
        // Bash function names spell '-' as "__".
        assert!(
            script
                .contains("complete -F _kubectl__godwit -o bashdefault -o default kubectl-godwit"),
            "{script}"
        );
        for word in ["pause", "unpause", "migrate-cancel", "completion"] {
            assert!(script.contains(word), "{word} missing from the bash script");
        }
    }

    #[test]
    fn stop_is_documented_with_its_force_flag() {
        let mut cmd = Args::command();
        let stop = cmd.find_subcommand_mut("stop").unwrap();
        let help = stop.render_long_help().to_string();
        assert!(help.contains("power button"), "{help}");
        assert!(help.contains("--force"), "{help}");
    }
}
