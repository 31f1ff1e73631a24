//! `godwit-apiserver`: the in-memory Kubernetes API server used by Godwit's
//! tests and local cluster. Test infrastructure only: no authentication, no
//! persistence, plain HTTP. See the `godwit_apiserver` library for what it serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use godwit_apiserver::{serve_with, ServerConfig};
use tokio::net::TcpListener;

/// In-memory Kubernetes API server for tests (plain HTTP, no auth).
#[derive(Debug, Parser)]
#[command(name = "godwit-apiserver", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Append every request as a JSON line to this file.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 5)]
    bookmark_interval: u64,
    /// Write a kubeconfig for this server to this file once listening.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Bearer token to put in the written kubeconfig.
    #[arg(long, default_value = "admin")]
    token: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    let config = ServerConfig {
        audit_log: args.audit_log,
        bookmark_interval: Duration::from_secs(args.bookmark_interval.max(1)),
    };
    let handle = serve_with(listener, config).await?;
    if let Some(path) = &args.kubeconfig {
        handle.write_kubeconfig(path, &args.token)?;
    }
    println!("listening on {}", handle.url());
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await;
    Ok(())
}
