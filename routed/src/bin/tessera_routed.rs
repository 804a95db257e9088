//! `tessera-routed`: Tessera's BGP speaker as a standalone process (a node, or a dedicated
//! route reflector). `run --config FILE` speaks BGP; `status --socket PATH` prints sessions.

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tessera_datastore::connection::DatastoreFlags;
use tessera_routed::config::Config;
use tessera_routed::kernel::NativeRoutes;

#[derive(Parser)]
#[command(about = "Tessera's BGP-4 speaker", version = tessera_datastore::VERSION)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the speaker.
    Run {
        #[arg(long)]
        config: String,
        /// Peer with the nodes in this etcd (full mesh or route reflectors), following
        /// changes: the datastore settings of the configuration's `datastore:` section,
        /// overridden by ETCD_* variables and these flags.
        #[command(flatten)]
        datastore: DatastoreFlags,
        /// This node's name in the datastore (when one is configured; else NODENAME).
        #[arg(long, env = "NODENAME")]
        node: Option<String>,
    },
    /// Print the status of a running speaker as JSON.
    Status {
        #[arg(long)]
        socket: String,
    },
}

fn main() -> anyhow::Result<()> {
    tessera_routed::kernel::use_one_allocator_arena();
    tokio::runtime::Runtime::new()
        .context("starting the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tessera_datastore::log_to_stderr();
    match Cli::parse().cmd {
        Cmd::Run {
            config,
            datastore,
            node,
        } => {
            let text =
                std::fs::read_to_string(&config).with_context(|| format!("reading {config}"))?;
            let mut cfg = Config::parse(&text).with_context(|| format!("in {config}"))?;
            let (conn, handle, _) = rtnetlink::new_connection().context("netlink")?;
            tokio::spawn(conn);
            let shutdown = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            };
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let mut ds = cfg.datastore.clone().unwrap_or_default();
            ds.apply_process_env()?;
            datastore.apply(&mut ds);
            if !ds.etcd_endpoints.is_empty() {
                let node = node.context("--node (or NODENAME) is required with a datastore")?;
                let kv = ds.connect().await?;
                // A node labelled as a route reflector reflects (cluster id: its router id),
                // as the node agent's speaker does; a configured clusterId wins.
                if cfg.cluster_id.is_none() {
                    let me = tessera_datastore::resources::get_node(&kv, &node)
                        .await
                        .with_context(|| format!("reading node {node}"))?;
                    let bgp = tessera_routed::mesh::bgp_configuration(&kv).await;
                    cfg.cluster_id = me.and_then(|n| {
                        tessera_routed::mesh::cluster_id(&n.labels, cfg.router_id, &bgp)
                    });
                }
                let period = std::time::Duration::from_secs(1);
                tokio::spawn(tessera_routed::mesh::follow_datastore(
                    kv, node, cfg.asn, period, tx,
                ));
            }
            tessera_routed::speaker::run_with_control(
                cfg,
                Some(handle),
                Arc::new(NativeRoutes),
                rx,
                shutdown,
            )
            .await
        }
        Cmd::Status { socket } => {
            println!(
                "{}",
                tessera_routed::speaker::query_status(&socket)
                    .await
                    .context("status socket")?
            );
            Ok(())
        }
    }
}
