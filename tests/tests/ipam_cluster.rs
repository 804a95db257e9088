//! IPAM with separate allocator processes on separate nodes (namespaces) against the lab's
//! etcd: concurrency and crash injection.

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};

use rand::{Rng, SeedableRng};
use serde_json::Value;
use tessera_testbed::{Child, Lab, LabNode, LabSpec};

const WORKER: &str = env!("CARGO_BIN_EXE_ipam-worker");

/// A /20 of /26 blocks, stored in `format`.
fn pool_yaml(format: &str) -> String {
    format!(
        "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: {{ name: pods }}
spec: {{ cidr: 10.244.0.0/20, blockSize: 26 }}
---
apiVersion: tessera.dev/v1
kind: IPAMConfiguration
metadata: {{ name: default }}
spec: {{ blockFormat: {format} }}
"
    )
}

fn worker(lab: &Lab, node: &LabNode, args: &[&str]) -> Command {
    let mut c = node.netns.command(WORKER);
    c.args(["--etcd", &lab.etcd_endpoint(), "--node", &node.name]);
    c.args(args);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Runs a worker to completion; panics with its stderr on failure.
fn worker_ok(lab: &Lab, node: &LabNode, args: &[&str]) -> String {
    let out = worker(lab, node, args).output().expect("run ipam-worker");
    assert!(
        out.status.success(),
        "ipam-worker {args:?} on {} failed: {}",
        node.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Blocks of 4 addresses: nodes claim and give back blocks all the time, so crashes land
/// inside block claims and releases too.
/// Blocks of 4 addresses, in format V6 (each allocation under its own key): a crash lands
/// between any two of a block's writes and reads, records included.
const SMALL_BLOCKS_YAML: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: pods }
spec: { cidr: 10.244.16.0/24, blockSize: 30 }
---
apiVersion: tessera.dev/v1
kind: IPAMConfiguration
metadata: { name: default }
spec: { blockFormat: V6 }
";

fn setup(lab: &Lab, pools_yaml: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pools.yaml");
    std::fs::write(&file, pools_yaml).expect("write yaml");
    worker_ok(lab, &lab.nodes[0], &["apply", &file.to_string_lossy()]);
    for n in &lab.nodes {
        worker_ok(lab, n, &["register-node"]);
    }
}

fn check(lab: &Lab, settled: bool) -> Value {
    let mut args = vec!["check"];
    if settled {
        args.push("--settled");
    }
    let out = worker(lab, &lab.nodes[0], &args)
        .output()
        .expect("run check");
    let v: Value = serde_json::from_slice(&out.stdout).expect("check prints JSON");
    assert!(
        out.status.success(),
        "invariants violated: {:#}",
        v["violations"]
    );
    v
}

/// V5: binary blocks, compressed when full (full /26s of 64 allocations are over the
/// size from which V5 compresses).
#[test]
fn eight_allocators_on_four_nodes_never_double_allocate() {
    let state = eight_allocators("eight_allocators", "V5");
    let formats = &state["block_formats"];
    // The full ones (at least 2,000 / 64 - 8 partly filled) compressed.
    assert!(
        formats["compressed"].as_u64().unwrap_or(0) >= 23,
        "{formats}"
    );
}

/// V6: every allocation a key of its own beside its block.
#[test]
fn eight_allocators_with_records_beside_their_blocks_never_double_allocate() {
    let state = eight_allocators("eight_allocators_v6", "V6");
    assert_eq!(state["block_formats"]["records"].as_u64(), Some(2000));
}

/// 8 allocator processes on 4 nodes, 250 addresses each, with blocks in `format`: every
/// address handed out once, and etcd agrees. Returns the final state.
fn eight_allocators(name: &str, format: &str) -> Value {
    let lab = Lab::new(
        name,
        LabSpec {
            nodes: 4,
            subnets: 2,
            etcd: true,
        },
    )
    .expect("lab");
    setup(&lab, &pool_yaml(format));
    // 8 processes, 2 per node, 250 addresses each: 2,000 of the /20's 4,096.
    let mut children = Vec::new();
    for (i, node) in lab.nodes.iter().enumerate() {
        for w in 0..2 {
            let prefix = format!("{}-w{w}", node.name);
            let cmd = worker(
                &lab,
                node,
                &["allocate", "--count", "250", "--handle-prefix", &prefix],
            );
            children.push((i, Child::spawn(cmd, "ipam-worker").expect("spawn")));
        }
    }
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    for (_, child) in children {
        let out = child.wait_output().expect("worker output");
        assert!(
            out.status.success(),
            "allocator failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line).expect("json line");
            let handle = v["handle"].as_str().expect("handle").to_string();
            let addr = v["addr"].as_str().expect("addr").to_string();
            assert!(
                reported.insert(handle, addr).is_none(),
                "a handle got two addresses"
            );
        }
    }
    assert_eq!(reported.len(), 2000);
    let distinct: HashSet<&String> = reported.values().collect();
    assert_eq!(distinct.len(), 2000, "an address was handed out twice");

    // etcd agrees: exactly these 2,000 allocations, each handle owning exactly its address.
    let state = check(&lab, true);
    let allocations = state["allocations"].as_array().expect("allocations");
    assert_eq!(allocations.len(), 2000);
    for a in allocations {
        let (addr, handle) = (a[0].as_str().expect("addr"), a[1].as_str().expect("handle"));
        assert_eq!(
            reported.get(handle).map(String::as_str),
            Some(addr),
            "{handle}"
        );
        assert_eq!(state["handles"][handle], serde_json::json!([addr]));
    }
    // Each node filled its own blocks: 2,000 addresses need at least 32 blocks of 64.
    let blocks = state["blocks"].as_u64().expect("blocks");
    assert!(blocks >= 32);
    // All in the format asked for.
    assert_eq!(
        state["block_formats"][format].as_u64(),
        Some(blocks),
        "{state:#}"
    );
    lab.finish();
    state
}

#[test]
fn kill_9_at_random_points_then_gc_leaves_nothing_leaked_or_doubled() {
    let lab = Lab::new(
        "crash_injection",
        LabSpec {
            nodes: 4,
            subnets: 1,
            etcd: true,
        },
    )
    .expect("lab");
    setup(&lab, SMALL_BLOCKS_YAML);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e55e7a);
    let mut kills = 0;
    let mut round = 0;
    // 4 nodes crash in parallel, 50 rounds each: 200 kill -9s. Half the kills land right
    // after a chosen datastore call (every gap between two calls is reachable), half at a
    // random moment.
    while kills < 200 {
        round += 1;
        let mut running = Vec::new();
        for node in &lab.nodes {
            let prefix = format!("{}-h", node.name);
            let seed = rng.random::<u64>().to_string();
            let by_call = rng.random_bool(0.5);
            let crash_after = rng.random_range(1..60u64).to_string();
            // The crash flag is global: it goes before the subcommand.
            let crash_flag: &[&str] = if by_call {
                &["--crash-after-calls", &crash_after]
            } else {
                &[]
            };
            let mut cmd = worker(&lab, node, crash_flag);
            cmd.args([
                "churn",
                "--ops",
                "40",
                "--handles",
                "6",
                "--handle-prefix",
                &prefix,
            ]);
            cmd.args(["--seed", &seed]);
            let delay = rng.random_range(5..120u64);
            running.push((
                Child::spawn(cmd, "ipam-worker").expect("spawn"),
                by_call,
                delay,
            ));
        }
        for (mut child, by_call, delay) in running {
            if by_call {
                // It kills itself; wait for that (or for a normal end if it finished first).
                let out = child.wait_output().expect("wait");
                if out.status.code().is_some() && !out.status.success() {
                    panic!("worker failed: {}", String::from_utf8_lossy(&out.stderr));
                }
            } else {
                std::thread::sleep(std::time::Duration::from_millis(delay));
                child.kill();
            }
            kills += 1;
        }
        // Between rounds the state must already be consistent (no double allocation,
        // handles and blocks agree), crash leftovers aside.
        if round % 10 == 0 {
            check(&lab, false);
        }
    }
    // GC repairs what the crashes left: pending affinities, unconfirmed blocks.
    let gc_out = worker_ok(&lab, &lab.nodes[0], &["gc", "--grace-ms", "0"]);
    eprintln!("gc after {kills} kills: {gc_out}");
    let state = check(&lab, true);
    assert_eq!(state["pending_affinities"], 0);
    // Nothing leaked: releasing every handle the workers may have created frees every address.
    for node in &lab.nodes {
        worker_ok(&lab, node, &["release-prefix", &format!("{}-h", node.name)]);
    }
    let state = check(&lab, true);
    assert_eq!(
        state["allocations"].as_array().map(Vec::len),
        Some(0),
        "leaked: {state:#}"
    );

    lab.finish();
}
