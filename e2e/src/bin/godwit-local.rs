//! `godwit-local`: Godwit on this machine, without a real cluster.
//!
//! `godwit-local demo [--json]` boots the test guest on one simulated node,
//! live-migrates it to another with a TCP client connected, and prints what
//! happened; with `--json` it ends with one JSON line.

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
}

fn main() {
    let args = Args::parse();
    match args.command {
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
