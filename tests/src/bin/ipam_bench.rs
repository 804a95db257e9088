//! `ipam-bench`: IPAM assign+release pairs per second against the raw etcd compare-and-swap
//! rate, measured side by side in one run on one etcd (Debian's etcd-server on loopback).
//!
//! - Reference: a single-key CAS loop per client with the same etcd client library:
//!   read the key, then a transaction "if mod_revision unchanged, put". Also reported: the
//!   blind variant that reuses the revision its last write returned (one round trip).
//! - Tessera: `auto_assign` of one IPv4 address then `release_by_handle`, each client on its
//!   own node (so each works in its own block, as pods on different nodes do).
//! - Fill levels: the same pairs with the pool 1 %, 50 % and 90 % allocated, one pool per
//!   level, measured in interleaved rounds.
//!
//! Prints a Markdown table; BENCHMARKS.md records the numbers.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use clap::ValueEnum as _;
use tessera_datastore::kv::{Op, Txn};
use tessera_datastore::model::WorkloadId;
use tessera_datastore::yaml::parse_resources;
use tessera_datastore::{AssignRequest, EtcdKv, Ipam, Kv, MemKv, Owner};
use tessera_testbed::bench_results::median;
use tessera_testbed::Etcd;

/// How full a pool is at each measured level, in percent.
const FILL_LEVELS: [usize; 3] = [1, 50, 90];

#[derive(Parser)]
#[command(name = "ipam-bench", version = tessera_datastore::VERSION)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Client counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    clients: Vec<usize>,
    /// Interleaved rounds per client count (medians are reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// The block format IPAM writes (the cluster's IPAMConfiguration): by default the newest,
    /// whose cost the targets are for (a cluster's default is still V1).
    #[arg(long, default_value = "V6")]
    block_format: String,
    /// What fills a client's block to each level.
    #[arg(long, value_enum, default_value_t = Filler::Pods)]
    filler: Filler,
    /// Measure only the client's own work per pair (in-memory store, no etcd): what a
    /// profiler should look at when the fill levels differ.
    #[arg(long)]
    client_work_only: bool,
}

/// What holds the addresses that fill a block to a level.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Filler {
    /// One pod per address, as the CNI plugin assigns them: a `k8s-pod-network.<container
    /// id>` handle, the pod's namespace and name (a 90 % full /26 is then ~9 KB in V3).
    Pods,
    /// One handle holding every filler address, no attributes (the runs before
    /// 2026-12-02 14:00 UTC).
    OneHandle,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dur = Duration::from_secs_f64(args.seconds);
    if args.client_work_only {
        client_work_by_fill(&FILL_LEVELS, args.rounds, args.filler, &args.block_format).await?;
        return Ok(());
    }
    let etcd = Etcd::start_loopback()?;
    let endpoint = etcd.endpoint().to_string();
    let connect =
        || async { EtcdKv::connect(std::slice::from_ref(&endpoint), Duration::from_secs(5)).await };
    let admin = connect().await?;
    apply_pools(
        &admin,
        &[
            ("bench", "10.244.0.0/16"),
            ("fill-1", "10.245.0.0/20"),
            ("fill-50", "10.245.16.0/20"),
            ("fill-90", "10.245.32.0/20"),
        ],
        &args.block_format,
    )
    .await?;
    println!(
        "Blocks written in format {}; filled with {}.\n",
        args.block_format,
        match args.filler {
            Filler::Pods => "one pod per address (container-ID handles, namespace and pod name)",
            Filler::OneHandle => "one handle holding every filler address",
        }
    );

    println!(
        "Medians of {} interleaved rounds of {} s each.\n",
        args.rounds, args.seconds
    );
    println!("| clients | raw CAS (get+txn) ops/s | raw CAS (blind txn) ops/s | IPAM pairs/s | pairs / CAS | pairs / blind CAS | etcd requests per pair | client CPU µs per pair / per CAS op |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    use tessera_testbed::bench_results::{BenchRun, Target};
    let mut run = BenchRun::new(
        "ipam",
        &format!(
            "cargo build --release -p tessera-testbed && ./target/release/ipam-bench --block-format {} --filler {}",
            args.block_format,
            args.filler.to_possible_value().expect("a named value").get_name()
        ),
    );
    for &n in &args.clients {
        let mut kvs = Vec::new();
        for _ in 0..n {
            kvs.push(connect().await?);
        }
        let ipams: Vec<Arc<Ipam<EtcdKv>>> = kvs
            .iter()
            .enumerate()
            .map(|(i, kv)| Arc::new(Ipam::new(kv.clone(), format!("bench-{n}-{i}"))))
            .collect();
        // Interleaved rounds: drift on the machine (etcd's fsyncs share the disk with
        // everything else) hits both sides of each ratio alike.
        let (mut cas, mut blind, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
        let (mut pair_requests, mut pairs_done) = (0u64, 0f64);
        // This process's CPU (the clients; etcd is another process) per op on each side.
        let (mut cas_cpu, mut cas_done, mut pair_cpu) = (Duration::ZERO, 0f64, Duration::ZERO);
        for _ in 0..args.rounds {
            let (cpu, started) = (own_cpu(), Instant::now());
            let rate = cas_rate(&kvs, dur, false).await?;
            cas_cpu += own_cpu() - cpu;
            cas_done += rate * started.elapsed().as_secs_f64();
            cas.push(rate);
            blind.push(cas_rate(&kvs, dur, true).await?);
            let before: u64 = kvs.iter().map(EtcdKv::requests_sent).sum();
            let (cpu, started) = (own_cpu(), Instant::now());
            let rate = pair_rate(&ipams, "bench", dur).await?;
            pair_cpu += own_cpu() - cpu;
            pair_requests += kvs.iter().map(EtcdKv::requests_sent).sum::<u64>() - before;
            pairs_done += rate * started.elapsed().as_secs_f64();
            pairs.push(rate);
        }
        let requests_per_pair = pair_requests as f64 / pairs_done;
        let us_per = |cpu: Duration, ops: f64| cpu.as_secs_f64() * 1e6 / ops;
        let (pair_us, cas_us) = (us_per(pair_cpu, pairs_done), us_per(cas_cpu, cas_done));
        let ratio = median(pairs.iter().zip(&cas).map(|(p, c)| p / c).collect());
        let ratio_blind = median(pairs.iter().zip(&blind).map(|(p, c)| p / c).collect());
        let (cas, blind, pairs) = (median(cas), median(blind), median(pairs));
        println!("| {n} | {cas:.0} | {blind:.0} | {pairs:.0} | {ratio:.2} | {ratio_blind:.2} | {requests_per_pair:.2} | {pair_us:.0} / {cas_us:.0} |");
        run.ratio(
            &format!("IPAM pairs/s at {n} clients / raw get+txn CAS"),
            ratio,
            (n == 8).then_some(Target::AtLeast(0.75)),
        );
    }

    // Per-operation cost as the pool fills: one pool per level (64 blocks each), 8 clients
    // per level, each on its own node whose block is filled to the level, and the rest of
    // the pool filled by another node. The levels are measured in interleaved rounds, like
    // the rates above: etcd's history grows through the run, and measuring 1 % first and
    // 90 % last would charge that growth to the fill.
    println!();
    println!(
        "| pool filled | IPAM pairs/s (8 clients, median) | ms per pair per client (median) | block value, bytes | raw CAS ms per op, values that size | the same, keys beside the blocks | client CPU µs per pair |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut kvs = Vec::new();
    for _ in 0..8 {
        kvs.push(connect().await?);
    }
    let levels = FILL_LEVELS;
    let mut clients = Vec::new();
    for pct in levels {
        let pool = format!("fill-{pct}");
        let ipams: Vec<Arc<Ipam<EtcdKv>>> = kvs
            .iter()
            .enumerate()
            .map(|(i, kv)| Arc::new(Ipam::new(kv.clone(), format!("fill{pct}-{i}"))))
            .collect();
        // Each client's block, filled to the level (the pair's own address comes on top).
        let per_block = (64 * pct / 100).max(1);
        for (i, ipam) in ipams.iter().enumerate() {
            fill(
                ipam,
                &pool,
                &format!("filler-{pct}-{i}"),
                per_block - 1,
                args.filler,
            )
            .await?;
        }
        // Other blocks: whole blocks for a filler node up to the level over the 64 blocks.
        let filler = Ipam::new(admin.clone(), format!("filler-{pct}"));
        for b in 0..(64 * pct / 100).saturating_sub(8) {
            assign_many(&filler, &pool, &format!("filler-{pct}-b{b}"), 64).await?;
        }
        clients.push((pct, pool, ipams));
    }
    let mut ms_per_pair: Vec<Vec<f64>> = vec![Vec::new(); levels.len()];
    // The reference for what the values alone cost: the raw get+txn CAS loop writing values
    // the size of the level's blocks, in the same rounds.
    let mut ms_per_cas: Vec<Vec<f64>> = vec![Vec::new(); levels.len()];
    // And the same loop on keys beside each client's block (the block's key with `/cas`
    // appended sorts right after it): what etcd's storage charges for where the level's
    // blocks are, among neighbours as full as they are.
    let mut ms_per_cas_beside: Vec<Vec<f64>> = vec![Vec::new(); levels.len()];
    let mut value_len = vec![0usize; levels.len()];
    // The client's own CPU per pair (this process; etcd is another): on two cores it is
    // taken from etcd.
    let mut client_us_per_pair: Vec<Vec<f64>> = vec![Vec::new(); levels.len()];
    for _ in 0..args.rounds {
        for (i, (pct, pool, ipams)) in clients.iter().enumerate() {
            let (cpu_before, started) = (own_cpu(), Instant::now());
            let pairs = pair_rate(ipams, pool, dur).await?;
            let done = pairs * started.elapsed().as_secs_f64();
            client_us_per_pair[i].push((own_cpu() - cpu_before).as_secs_f64() * 1e6 / done);
            ms_per_pair[i].push(8.0 * 1000.0 / pairs);
            value_len[i] = mean_block_len(&admin, &format!("\"fill{pct}-")).await?;
            let cas = cas_rate_of(&kvs, dur, false, value_len[i]).await?;
            ms_per_cas[i].push(8.0 * 1000.0 / cas);
            let beside = client_block_keys(&admin, ipams)
                .await?
                .into_iter()
                .map(|k| format!("{k}/cas"))
                .collect();
            let cas = cas_rate_at(&kvs, dur, value_len[i], beside).await?;
            ms_per_cas_beside[i].push(8.0 * 1000.0 / cas);
        }
    }
    let full_over_empty = full_over_empty_of(&ms_per_pair);
    let cas_full_over_empty = full_over_empty_of(&ms_per_cas);
    let cas_beside_full_over_empty = full_over_empty_of(&ms_per_cas_beside);
    let mut per_pair = Vec::new();
    for (i, pct) in levels.iter().enumerate() {
        let ms = median(ms_per_pair[i].clone());
        println!(
            "| {pct} % | {:.0} | {ms:.2} | {} | {:.2} | {:.2} | {:.0} |",
            8.0 * 1000.0 / ms,
            value_len[i],
            median(ms_per_cas[i].clone()),
            median(ms_per_cas_beside[i].clone()),
            median(client_us_per_pair[i].clone())
        );
        per_pair.push((*pct as f64, ms));
    }
    println!("\n90 % full / 1 % full, median of the rounds' ratios: IPAM pairs {full_over_empty:.2}, raw CAS of values that size {cas_full_over_empty:.2}, the same beside the level's blocks {cas_beside_full_over_empty:.2}");
    run.ratio(
        "raw get+txn CAS ms per op, values of a 90 % / a 1 % full block's size",
        cas_full_over_empty,
        None,
    );
    run.ratio(
        "raw get+txn CAS ms per op beside a 90 % / a 1 % full block, values of its size",
        cas_beside_full_over_empty,
        None,
    );
    run.ratio(
        "IPAM ms per pair, pool 90 % full / 1 % full",
        full_over_empty,
        Some(Target::AtMost(1.1)),
    );
    run.series(
        "ipam_fill",
        "ms per pair per client (8 clients)",
        ("pool filled, %", "ms"),
        per_pair,
    );
    let own = client_work_by_fill(&levels, args.rounds, args.filler, &args.block_format).await?;
    run.ratio(
        "IPAM client's own work per pair (in-memory store), pool 90 % full / 1 % full",
        full_over_empty_of(&own),
        None,
    );
    run.save();
    drop(etcd);
    Ok(())
}

/// The IPAM client's own work per pair at each fill level, without etcd: the same pairs
/// against the in-memory store on one thread, in interleaved rounds. What is left is the
/// client's planning, copying and encoding of the block, which the pool's fill must not
/// make dearer. Returns µs per pair, per level, per round.
async fn client_work_by_fill(
    levels: &[usize],
    rounds: usize,
    filler: Filler,
    block_format: &str,
) -> anyhow::Result<Vec<Vec<f64>>> {
    const PAIRS: u32 = 5_000;
    let mut clients = Vec::new();
    for &pct in levels {
        let kv = MemKv::new();
        // The format the etcd measurements above write, so that the two compare.
        apply_pools(&kv, &[("p", "10.245.0.0/20")], block_format).await?;
        let ipam = Ipam::new(kv, "n1");
        fill(&ipam, "p", "filler", (64 * pct / 100).max(1) - 1, filler).await?;
        clients.push(ipam);
    }
    let req = AssignRequest {
        owner: Owner {
            handle: "pair".into(),
            ..Default::default()
        },
        num_v4: 1,
        pools: vec!["p".into()],
        ..Default::default()
    };
    let mut us = vec![Vec::new(); levels.len()];
    for _ in 0..rounds {
        for (i, ipam) in clients.iter().enumerate() {
            let started = Instant::now();
            for _ in 0..PAIRS {
                ipam.auto_assign(&req).await?;
                ipam.release_by_handle("pair").await?;
            }
            us[i].push(started.elapsed().as_secs_f64() * 1e6 / f64::from(PAIRS));
        }
    }
    println!("\n| pool filled | the client's own work per pair, in-memory store, µs (median) |");
    println!("|---:|---:|");
    for (pct, us) in levels.iter().zip(&us) {
        println!("| {pct} % | {:.1} |", median(us.clone()));
    }
    println!(
        "\n90 % full / 1 % full, the client's own work: {:.2}",
        full_over_empty_of(&us)
    );
    Ok(us)
}

/// CPU time this process has used (user and system).
fn own_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(u.user_time()) + tv(u.system_time())
}

/// The mean size as stored of the blocks' own values (without a `V6` block's records)
/// whose block names `marker` (the level's nodes).
async fn mean_block_len(kv: &EtcdKv, marker: &str) -> anyhow::Result<usize> {
    let (kvs, _) = kv.get_prefix(tessera_datastore::keys::BLOCKS).await?;
    let own_len = |cidr| {
        let key = tessera_datastore::keys::block(cidr);
        kvs.iter()
            .find(|k| k.key == key)
            .map_or(0, |k| k.value.len())
    };
    let lens: Vec<usize> = tessera_datastore::block_store::blocks_from(&kvs)?
        .into_iter()
        .filter(|(b, _)| serde_json::to_string(b).is_ok_and(|v| v.contains(marker)))
        .map(|(b, _)| own_len(b.cidr))
        .collect();
    Ok(lens.iter().sum::<usize>() / lens.len().max(1))
}

async fn assign_many<K: Kv>(
    ipam: &Ipam<K>,
    pool: &str,
    handle: &str,
    n: usize,
) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let req = AssignRequest {
        owner: Owner {
            handle: handle.into(),
            ..Default::default()
        },
        num_v4: n,
        pools: vec![pool.into()],
        ..Default::default()
    };
    ipam.auto_assign(&req).await?;
    Ok(())
}

/// Assigns `n` addresses in `pool` as `filler` says.
async fn fill<K: Kv>(
    ipam: &Ipam<K>,
    pool: &str,
    tag: &str,
    n: usize,
    filler: Filler,
) -> anyhow::Result<()> {
    if filler == Filler::OneHandle {
        return assign_many(ipam, pool, tag, n).await;
    }
    for k in 0..n {
        // A container ID as a runtime makes them: 64 random hex digits (so that a
        // compressor finds no more in them than in real ones).
        let seed = tessera_datastore::fnv1a(&format!("{tag}-{k}"));
        let container: String = (1..=4)
            .map(|i| format!("{:016x}", splitmix64(seed.wrapping_add(i))))
            .collect();
        let req = AssignRequest {
            owner: Owner {
                handle: format!("k8s-pod-network.{container}"),
                workload: Some(WorkloadId {
                    namespace: "production".into(),
                    name: format!("checkout-7d9f8c6b5-{tag}-{k}"),
                    ..Default::default()
                }),
                attrs: [
                    ("network".to_string(), "k8s-pod-network".to_string()),
                    ("containerID".to_string(), container),
                ]
                .into(),
            },
            num_v4: 1,
            pools: vec![pool.into()],
            ..Default::default()
        };
        ipam.auto_assign(&req).await?;
    }
    Ok(())
}

/// SplitMix64's output function: consecutive inputs give unrelated outputs.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs `op(client)` in a loop on every client until `dur` has passed; returns ops/s.
async fn rate<C, F, Fut>(clients: Vec<C>, dur: Duration, op: F) -> anyhow::Result<f64>
where
    C: Send + 'static,
    F: Fn(C) -> Fut + Send + Sync + Copy + 'static,
    Fut: Future<Output = anyhow::Result<C>> + Send,
{
    let start = Instant::now();
    let deadline = start + dur;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    c = op(c).await?;
                    n += 1;
                }
                Ok::<u64, anyhow::Error>(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn cas_rate(kvs: &[EtcdKv], dur: Duration, blind: bool) -> anyhow::Result<f64> {
    cas_rate_of(kvs, dur, blind, 1).await
}

/// [`cas_rate`] writing values of `value_len` bytes.
/// The key of each client's block (the one block whose affinity is the client's node).
async fn client_block_keys(
    kv: &EtcdKv,
    ipams: &[Arc<Ipam<EtcdKv>>],
) -> anyhow::Result<Vec<String>> {
    let (kvs, _) = kv.get_prefix(tessera_datastore::keys::BLOCKS).await?;
    let blocks = tessera_datastore::block_store::blocks_from(&kvs)?;
    ipams
        .iter()
        .map(|ipam| {
            blocks
                .iter()
                .find(|(b, _)| b.affinity.as_deref() == Some(ipam.node()))
                .map(|(b, _)| tessera_datastore::keys::block(b.cidr))
                .ok_or_else(|| anyhow::anyhow!("no block of {}", ipam.node()))
        })
        .collect()
}

async fn cas_rate_of(
    kvs: &[EtcdKv],
    dur: Duration,
    blind: bool,
    value_len: usize,
) -> anyhow::Result<f64> {
    let keys = (0..kvs.len())
        .map(|i| format!("/bench/cas/{blind}/{value_len}/{i}"))
        .collect();
    cas_loop(kvs, dur, blind, value_len, keys).await
}

/// The get+txn loop on the given keys, one per client; the keys are deleted afterwards (they
/// may be among IPAM's, which IPAM would not read).
async fn cas_rate_at(
    kvs: &[EtcdKv],
    dur: Duration,
    value_len: usize,
    keys: Vec<String>,
) -> anyhow::Result<f64> {
    let rate = cas_loop(kvs, dur, false, value_len, keys.clone()).await?;
    for key in keys {
        kvs[0].txn(Txn::new().then(Op::delete(&key))).await?;
    }
    Ok(rate)
}

async fn cas_loop(
    kvs: &[EtcdKv],
    dur: Duration,
    blind: bool,
    value_len: usize,
    keys: Vec<String>,
) -> anyhow::Result<f64> {
    let clients: Vec<(EtcdKv, String, i64)> = kvs
        .iter()
        .zip(keys)
        .map(|(kv, key)| (kv.clone(), key, 0))
        .collect();
    rate(clients, dur, move |(kv, key, mut rev)| async move {
        if !blind {
            rev = kv.get(&key).await?.map(|k| k.mod_revision).unwrap_or(0);
        }
        let txn = Txn::new()
            .expect(&key, rev)
            .then(Op::put(&key, vec![b'x'; value_len]))
            .or_get(&key);
        let out = kv.txn(txn).await?;
        let rev = if out.succeeded {
            out.revision
        } else {
            out.gets
                .first()
                .cloned()
                .flatten()
                .map(|k| k.mod_revision)
                .unwrap_or(0)
        };
        Ok((kv, key, rev))
    })
    .await
}

async fn pair_rate(ipams: &[Arc<Ipam<EtcdKv>>], pool: &str, dur: Duration) -> anyhow::Result<f64> {
    let reqs: Vec<(Arc<Ipam<EtcdKv>>, AssignRequest)> = ipams
        .iter()
        .map(|ipam| {
            let req = AssignRequest {
                owner: Owner {
                    handle: format!("pair-{}", ipam.node()),
                    ..Default::default()
                },
                num_v4: 1,
                pools: vec![pool.to_string()],
                ..Default::default()
            };
            (ipam.clone(), req)
        })
        .collect();
    // Warm up: each node claims its block outside the measurement.
    for (ipam, req) in &reqs {
        ipam.auto_assign(req).await?;
        ipam.release_by_handle(&req.owner.handle).await?;
    }
    rate(reqs, dur, |(ipam, req)| async move {
        ipam.auto_assign(&req).await?;
        ipam.release_by_handle(&req.owner.handle).await?;
        Ok((ipam, req))
    })
    .await
}

/// Applies pools of /26 blocks (name, CIDR) and the cluster's block format, as an operator's
/// `tesseractl apply` of the same YAML would.
async fn apply_pools<K: Kv>(
    kv: &K,
    pools: &[(&str, &str)],
    block_format: &str,
) -> anyhow::Result<()> {
    let mut yaml = String::new();
    for (name, cidr) in pools {
        yaml += &format!(
            "---\napiVersion: tessera.dev/v1\nkind: IPPool\nmetadata: {{ name: {name} }}\nspec: {{ cidr: {cidr}, blockSize: 26 }}\n"
        );
    }
    yaml += &format!(
        "---\napiVersion: tessera.dev/v1\nkind: IPAMConfiguration\nmetadata: {{ name: default }}\nspec: {{ blockFormat: {block_format} }}\n"
    );
    let resources = parse_resources(&yaml)?;
    tessera_datastore::admin::write(
        kv,
        &resources,
        tessera_datastore::admin::WriteMode::Apply,
        false,
    )
    .await?;
    Ok(())
}

/// The median of the rounds' ratios of the last level (90 %) to the first (1 %).
fn full_over_empty_of(ms_per_level: &[Vec<f64>]) -> f64 {
    let (empty, full) = (&ms_per_level[0], &ms_per_level[ms_per_level.len() - 1]);
    median(full.iter().zip(empty).map(|(f, e)| f / e).collect())
}
