//! `tessera-node`: the agent the DaemonSet runs on every node.

use std::path::PathBuf;

use clap::Parser;
use tessera_node::config::AgentConfig;

#[derive(Parser)]
#[command(
    about = "Tessera's node agent: routes, tunnels, NAT and BGP from the datastore",
    version = tessera_datastore::VERSION
)]
struct Args {
    /// YAML configuration (the ConfigMap); environment variables override it.
    #[arg(long, env = "TESSERA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    datastore: tessera_datastore::connection::DatastoreFlags,
}

fn main() -> std::process::ExitCode {
    // Before the runtime's threads exist (the in-process speaker holds a full table).
    tessera_routed::kernel::use_one_allocator_arena();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("tessera-node: starting the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> std::process::ExitCode {
    tessera_datastore::log_to_stderr();
    let args = Args::parse();
    let cfg = match AgentConfig::load_with_flags(
        args.config.as_deref(),
        |k| std::env::var(k).ok(),
        &args.datastore,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tessera-node: configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    match tessera_node::agent::run(cfg, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
