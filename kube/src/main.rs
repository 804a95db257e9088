//! `tessera-kube-controllers`: keeps Tessera's datastore in line with the cluster: pod
//! intents from pods and namespaces, and a deleted Node decommissioned at once.

use clap::Parser;
use tessera_datastore::connection::{DatastoreConfig, DatastoreFlags};

#[derive(Parser)]
#[command(
    about = "Tessera's Kubernetes controllers: pod intents, Node deletion",
    version = tessera_datastore::VERSION
)]
struct Args {
    #[command(flatten)]
    datastore: DatastoreFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut ds = DatastoreConfig::default();
    ds.apply_process_env()?;
    args.datastore.apply(&mut ds);
    let kv = ds.connect().await?;
    // In the cluster: the ServiceAccount; outside: KUBECONFIG.
    let client = kube::Client::try_default().await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tessera_kube_controllers::controller::run(client, kv, shutdown).await?;
    Ok(())
}
