//! `ipam-worker`: drives Tessera's IPAM from inside a node namespace, as a node's CNI plugin
//! or agent would, so that end-to-end tests run allocators as separate processes on
//! separate nodes against the lab's etcd. Prints results as JSON lines on stdout.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng};
use serde_json::json;
use tessera_datastore::gc::{gc, mark_suspect, reclaim_node, GcOptions, ReclaimGuard, Verdict};
use tessera_datastore::model::Node;
use tessera_datastore::resources::put_node;
use tessera_datastore::snapshot::Snapshot;
use tessera_datastore::yaml::parse_resources;
use tessera_datastore::{AssignRequest, EtcdKv, Ipam, Kv, Owner};
use tessera_testbed::crash::CrashKv;

#[derive(Parser)]
#[command(name = "ipam-worker", version = tessera_datastore::VERSION)]
struct Cli {
    /// etcd endpoint, e.g. http://198.18.0.2:2379
    #[arg(long)]
    etcd: String,
    /// This node's name.
    #[arg(long, default_value = "node1")]
    node: String,
    /// Kill this process with SIGKILL right after the N-th datastore call returns.
    #[arg(long)]
    crash_after_calls: Option<u64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or replace the resources in a YAML file (pools, reservations, IPAMConfiguration).
    Apply { file: String },
    /// Write this node's Node record (labels as key=value).
    RegisterNode {
        #[arg(long)]
        label: Vec<String>,
    },
    /// Assign `count` IPv4 addresses, one per handle `<prefix>-<i>`; prints one line each.
    Allocate {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        handle_prefix: String,
    },
    /// A random mix of assignments and releases on handles `<prefix>-<0..handles>`.
    Churn {
        #[arg(long)]
        ops: usize,
        #[arg(long, default_value_t = 8)]
        handles: usize,
        #[arg(long)]
        handle_prefix: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Release every handle whose id starts with the prefix.
    ReleasePrefix { prefix: String },
    /// One GC pass (grace in ms for pending affinities).
    Gc {
        #[arg(long, default_value_t = 0)]
        grace_ms: u64,
    },
    /// Check the invariants; prints the allocations; exits 1 on a violation.
    Check {
        #[arg(long)]
        settled: bool,
    },
    /// Reclaim a dead node's allocations and affinities.
    Reclaim { dead_node: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let etcd = EtcdKv::connect(std::slice::from_ref(&cli.etcd), Duration::from_secs(3))
        .await
        .with_context(|| format!("connecting to {}", cli.etcd))?;
    let kv = CrashKv::new(etcd, cli.crash_after_calls);
    run(kv, &cli.node, cli.cmd).await
}

async fn run<K: Kv>(kv: K, node: &str, cmd: Cmd) -> anyhow::Result<()> {
    let ipam = Ipam::new(kv.clone(), node);
    match cmd {
        Cmd::Apply { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
            let r = parse_resources(&text).with_context(|| format!("in {file}"))?;
            // As `tesseractl apply`: pools, reservations and the IPAMConfiguration.
            tessera_datastore::admin::write(
                &kv,
                &r,
                tessera_datastore::admin::WriteMode::Apply,
                false,
            )
            .await?;
        }
        Cmd::RegisterNode { label } => {
            let labels: BTreeMap<String, String> = label
                .iter()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            put_node(
                &kv,
                &Node {
                    name: node.to_string(),
                    labels,
                    ..Default::default()
                },
            )
            .await?;
        }
        Cmd::Allocate {
            count,
            handle_prefix,
        } => {
            for i in 0..count {
                let handle = format!("{handle_prefix}-{i}");
                let got = ipam.auto_assign(&v4_request(&handle)).await?;
                for a in got {
                    println!(
                        "{}",
                        json!({"handle": handle, "addr": a.addr, "seq": a.seq})
                    );
                }
            }
        }
        Cmd::Churn {
            ops,
            handles,
            handle_prefix,
            seed,
        } => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for _ in 0..ops {
                let handle = format!("{handle_prefix}-{}", rng.random_range(0..handles));
                if rng.random_bool(0.6) {
                    match ipam.auto_assign(&v4_request(&handle)).await {
                        Ok(_) | Err(tessera_datastore::IpamError::Exhausted { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    ipam.release_by_handle(&handle).await?;
                }
            }
        }
        Cmd::ReleasePrefix { prefix } => {
            let snap = Snapshot::read(&kv).await?;
            let mut n = 0;
            for id in snap.handles.keys().filter(|h| h.starts_with(&prefix)) {
                n += ipam.release_by_handle(id).await?.len();
            }
            println!("{}", json!({ "released": n }));
        }
        Cmd::Gc { grace_ms } => {
            let opts = GcOptions {
                pending_grace: Duration::from_millis(grace_ms),
                remove_deleted_nodes: true,
            };
            let r = gc(&kv, &opts).await?;
            println!(
                "{}",
                json!({ "repairs": r.repairs(), "report": format!("{r:?}") })
            );
        }
        Cmd::Check { settled } => {
            let snap = Snapshot::read(&kv).await?;
            let violations = snap.check(settled).err().unwrap_or_default();
            let handles: BTreeMap<&String, Vec<String>> = snap
                .handles
                .iter()
                .map(|(id, h)| {
                    (
                        id,
                        h.value
                            .addresses
                            .iter()
                            .map(|a| a.addr.to_string())
                            .collect(),
                    )
                })
                .collect();
            let pending = snap
                .affinities
                .values()
                .filter(|a| a.value.state != tessera_datastore::model::AffinityState::Confirmed)
                .count();
            println!(
                "{}",
                json!({
                    "allocations": snap.allocations(),
                    "handles": handles,
                    "blocks": snap.blocks.len(),
                    "block_formats": block_formats(&kv).await?,
                    "pending_affinities": pending,
                    "violations": violations,
                })
            );
            if !violations.is_empty() {
                std::process::exit(1);
            }
        }
        Cmd::Reclaim { dead_node } => {
            // By hand, as an operator would: the node's lease must have lapsed.
            let Some((_, suspect_rev)) =
                mark_suspect(&kv, &dead_node, tessera_datastore::now_ms(), None).await?
            else {
                anyhow::bail!("{dead_node} holds its liveness lease");
            };
            let guard = ReclaimGuard {
                leader: None,
                verdict: Verdict::Dead { suspect_rev },
            };
            let r = reclaim_node(&kv, &dead_node, &guard).await?;
            println!("{}", json!({ "addresses_released": r.addresses_released }));
        }
    }
    Ok(())
}

/// How many blocks etcd holds in each format, how many of them compressed, and how many
/// allocation records (format V6) beside them.
async fn block_formats<K: Kv>(kv: &K) -> anyhow::Result<BTreeMap<String, usize>> {
    let (values, _) = kv.get_prefix(tessera_datastore::keys::BLOCKS).await?;
    let mut counts = BTreeMap::new();
    let records = values
        .iter()
        .filter(|v| {
            matches!(
                tessera_datastore::block_store::BlockKey::parse(&v.key),
                Some(tessera_datastore::block_store::BlockKey::Record(..))
            )
        })
        .count();
    if records > 0 {
        counts.insert("records".to_string(), records);
    }
    for (block, _) in tessera_datastore::block_store::blocks_from(&values)? {
        *counts.entry(format!("{:?}", block.format)).or_default() += 1;
        let key = tessera_datastore::keys::block(block.cidr);
        let own = values
            .iter()
            .find(|v| v.key == key)
            .context("a block's own key")?;
        if own.value.starts_with(&tessera_datastore::ZSTD_MAGIC) {
            *counts.entry("compressed".to_string()).or_default() += 1;
        }
    }
    Ok(counts)
}

fn v4_request(handle: &str) -> AssignRequest {
    AssignRequest {
        owner: Owner {
            handle: handle.to_string(),
            ..Default::default()
        },
        num_v4: 1,
        ..Default::default()
    }
}
