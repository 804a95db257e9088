//! `ipam-blocks-bench`: IPAM against one real etcd holding thousands of blocks, the size of
//! a cluster of thousands of nodes (Kubernetes' documented limit is 5,000 nodes).
//!
//! The pool is `fd10:244::/48` cut into /122 blocks (64 addresses, the size of an IPv4 /26),
//! so that the block values are the size a real cluster writes. Blocks are made through the
//! real IPAM: one synthetic node per block, each holding `--per-block` addresses. At each
//! block count, in interleaved rounds:
//! - ms per assign+release pair on a node that has its block, beside ms per raw get+txn
//!   compare-and-swap on one key (the same etcd, the same client library): the ratio says
//!   whether a pod start costs more as the cluster grows;
//! - ms for a new node's first address (it claims a block: the claim lists the block keys);
//! - etcd's database size, key count and the mean block value.
//!
//! Prints a Markdown table; records `ipam_blocks` for the benchmark report.

use std::time::{Duration, Instant};

use clap::Parser;
use futures::stream::{self, StreamExt, TryStreamExt};
use tessera_datastore::kv::{Op, Txn};
use tessera_datastore::resources::apply_config;
use tessera_datastore::yaml::parse_resources;
use tessera_datastore::{keys, AssignRequest, EtcdKv, Ipam, Kv, Owner};
use tessera_testbed::bench_results::{median, BenchRun};
use tessera_testbed::Etcd;

#[derive(Parser)]
#[command(name = "ipam-blocks-bench", version = tessera_datastore::VERSION)]
struct Args {
    /// Block counts to measure at (ascending; blocks are added between them).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,2500,5000")]
    blocks: Vec<usize>,
    /// Addresses held in every block (pods per node).
    #[arg(long, default_value_t = 30)]
    per_block: usize,
    /// Interleaved rounds per block count (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per pair or CAS measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
}

const POOL: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: wide }
spec: { cidr: \"fd10:244::/48\", blockSize: 122 }
";

fn request(handle: &str, n: usize) -> AssignRequest {
    AssignRequest {
        owner: Owner {
            handle: handle.into(),
            ..Default::default()
        },
        num_v6: n,
        pools: vec!["wide".into()],
        ..Default::default()
    }
}

#[derive(serde::Serialize)]
struct Row {
    blocks: usize,
    pair_ms: f64,
    cas_ms: f64,
    pair_per_cas: f64,
    first_address_ms: f64,
    db_mib: f64,
    keys: usize,
    block_value_bytes: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dur = Duration::from_secs_f64(args.seconds);
    let etcd = Etcd::start_loopback()?;
    let endpoint = etcd.endpoint().to_string();
    let kv = EtcdKv::connect(std::slice::from_ref(&endpoint), Duration::from_secs(5)).await?;
    let r = parse_resources(POOL)?;
    apply_config(&kv, &r.pools, &r.reservations).await?;

    let probe = Ipam::new(kv.clone(), "probe");
    let probe_req = request("probe-pair", 1);
    let mut made = 0usize;
    let mut fresh = 0usize;
    let mut rows = Vec::new();
    for &target in &args.blocks {
        // Synthetic nodes, 8 at a time, each claiming its block with its pods.
        let from = made;
        let per_block = args.per_block;
        stream::iter(from..target.max(from))
            .map(|i| {
                let kv = kv.clone();
                async move {
                    let node = Ipam::new(kv, format!("node-{i}"));
                    node.auto_assign(&request(&format!("pods-{i}"), per_block))
                        .await
                        .map(|_| ())
                }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        made = made.max(target);

        let (mut pair, mut cas, mut first) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            cas.push(cas_ms(&kv, dur).await?);
            pair.push(pair_ms(&probe, &probe_req, dur).await?);
            // A new node's first address claims a block: time five of them.
            let mut t = Vec::new();
            for _ in 0..5 {
                fresh += 1;
                let node = Ipam::new(kv.clone(), format!("fresh-{fresh}"));
                let start = Instant::now();
                node.auto_assign(&request(&format!("fresh-{fresh}"), 1))
                    .await?;
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
            first.push(median(t));
        }
        let (blocks, _) = kv.get_prefix(keys::BLOCKS).await?;
        let value_bytes =
            blocks.iter().map(|b| b.value.len()).sum::<usize>() as f64 / blocks.len().max(1) as f64;
        let all = kv.list_keys(keys::PREFIX).await?.len();
        let status = tessera_testbed::run(
            "etcdctl",
            &["--endpoints", &endpoint, "endpoint", "status", "-w", "json"],
        )?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        let db = status[0]["Status"]["dbSize"].as_f64().unwrap_or(0.0) / 1048576.0;
        let (p, c) = (median(pair), median(cas));
        rows.push(Row {
            blocks: blocks.len(),
            pair_ms: p,
            cas_ms: c,
            pair_per_cas: p / c,
            first_address_ms: median(first),
            db_mib: db,
            keys: all,
            block_value_bytes: value_bytes,
        });
        eprintln!("{} blocks measured", blocks.len());
    }
    drop(etcd);

    println!("| blocks in etcd | ms per assign+release pair | ms per get+txn CAS | pair / CAS | a new node's first address (claims a block) | etcd keys | etcd db | mean block value |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} ms | {} | {:.1} MiB | {:.0} B |",
            r.blocks,
            r.pair_ms,
            r.cas_ms,
            r.pair_per_cas,
            r.first_address_ms,
            r.keys,
            r.db_mib,
            r.block_value_bytes
        );
    }
    let mut run = BenchRun::new(
        "ipam_blocks",
        "cargo build --release -p tessera-testbed && ./target/release/ipam-blocks-bench",
    );
    let pts = |f: fn(&Row) -> f64| rows.iter().map(|r| (r.blocks as f64, f(r))).collect();
    run.series(
        "ipam_blocks",
        "assign+release pair",
        ("blocks in etcd", "ms"),
        pts(|r| r.pair_ms),
    )
    .series(
        "ipam_blocks",
        "raw get+txn CAS",
        ("blocks in etcd", "ms"),
        pts(|r| r.cas_ms),
    )
    .series(
        "ipam_blocks",
        "new node's first address",
        ("blocks in etcd", "ms"),
        pts(|r| r.first_address_ms),
    );
    if let (Some(small), Some(big)) = (rows.first(), rows.last()) {
        run.ratio(
            &format!(
                "IPAM pair cost at {} blocks / at {} blocks",
                big.blocks, small.blocks
            ),
            big.pair_ms / small.pair_ms,
            None,
        );
    }
    run.extra = serde_json::to_value(&rows)?;
    run.save();
    Ok(())
}

/// ms per raw get+txn compare-and-swap on one key.
async fn cas_ms(kv: &EtcdKv, dur: Duration) -> anyhow::Result<f64> {
    let key = "/bench/cas";
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < dur {
        let rev = kv.get(key).await?.map(|k| k.mod_revision).unwrap_or(0);
        kv.txn(
            Txn::new()
                .expect(key, rev)
                .then(Op::put(key, b"x".to_vec())),
        )
        .await?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / f64::from(n))
}

/// ms per assign+release pair of one address on a node that has its block.
async fn pair_ms(ipam: &Ipam<EtcdKv>, req: &AssignRequest, dur: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < dur {
        ipam.auto_assign(req).await?;
        ipam.release_by_handle(&req.owner.handle).await?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / f64::from(n))
}
