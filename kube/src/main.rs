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
    /// This replica's name in the leader key.
    #[arg(long, env = "POD_NAME", default_value = "tessera-kube-controllers")]
    identity: String,
    /// A pod's allocation whose pod is gone (or bound elsewhere) is released after this.
    #[arg(long, default_value_t = 120)]
    leak_grace_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tessera_datastore::log_to_stderr();
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
    let settings = tessera_kube_controllers::controller::Settings {
        identity: args.identity,
        leak_grace: std::time::Duration::from_secs(args.leak_grace_seconds),
        ..Default::default()
    };
    tessera_kube_controllers::controller::run(client, kv, settings, shutdown).await?;
    Ok(())
}
