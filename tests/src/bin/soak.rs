//! `tessera-soak`: the long soak (see `tessera_testbed::soak`), 30 minutes by default:
//! pod churn across nodes with agents, an agent killed and brought back every few minutes,
//! `ipam check` and a responder check every minute. Prints each checkpoint and exits
//! non-zero on any failure, finding, wrong responder or leftover.

use std::time::Duration;

use clap::Parser;
use tessera_testbed::soak::{run, SoakSpec};

#[derive(Parser)]
#[command(name = "tessera-soak", version = tessera_datastore::VERSION)]
struct Args {
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Seconds between checkpoints.
    #[arg(long, default_value_t = 60)]
    check_every: u64,
    /// Seconds between agent kills.
    #[arg(long, default_value_t = 180)]
    restart_every: u64,
    #[arg(long, default_value_t = 40)]
    pods: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let r = match run(
        &SoakSpec {
            nodes: a.nodes,
            duration: Duration::from_secs(a.minutes * 60),
            check_every: Duration::from_secs(a.check_every),
            restart_every: Duration::from_secs(a.restart_every),
            target_pods: a.pods,
            seed: a.seed,
        },
        |line| println!("{line}"),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tessera-soak: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    record(&a, &r);
    let bad_checks = r
        .checkpoints
        .iter()
        .filter(|c| c.findings != 0 || !c.wrong_responders.is_empty())
        .count();
    for f in &r.failures {
        println!("failure: {f}");
    }
    for l in &r.left_at_end {
        println!("left over: {l}");
    }
    if r.failures.is_empty() && bad_checks == 0 && r.left_at_end.is_empty() {
        println!(
            "soak passed: {} checkpoints, {} agent restarts",
            r.checkpoints.len(),
            r.restarts
        );
        std::process::ExitCode::SUCCESS
    } else {
        println!("soak FAILED: {bad_checks} bad checkpoints");
        std::process::ExitCode::from(1)
    }
}

/// The agents' RSS and the churn by checkpoint, for the benchmark report's soak plots.
fn record(a: &Args, r: &tessera_testbed::soak::SoakReport) {
    let minutes = |c: &tessera_testbed::soak::Checkpoint| c.at.as_secs_f64() / 60.0;
    let rss: Vec<Vec<f64>> = r
        .checkpoints
        .iter()
        .map(|c| {
            c.agent_rss
                .values()
                .map(|(_, k)| *k as f64 / 1024.0)
                .collect()
        })
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let points = |f: &dyn Fn(usize) -> f64| -> Vec<(f64, f64)> {
        r.checkpoints
            .iter()
            .enumerate()
            .map(|(i, c)| (minutes(c), f(i)))
            .collect()
    };
    let mut run = tessera_testbed::bench_results::BenchRun::new(
        "soak",
        &format!(
            "cargo build --workspace --bins && ./target/debug/tessera-soak --minutes {} --nodes {}",
            a.minutes, a.nodes
        ),
    );
    run.series(
        "soak_rss",
        "agent RSS, mean",
        ("minutes", "MiB"),
        points(&|i| mean(&rss[i])),
    )
    .series(
        "soak_rss",
        "agent RSS, max",
        ("minutes", "MiB"),
        points(&|i| max(&rss[i])),
    )
    .series(
        "soak_churn",
        "pod ADDs so far",
        ("minutes", "ADDs"),
        points(&|i| r.checkpoints[i].adds as f64),
    );
    run.extra = serde_json::json!({
        "minutes": a.minutes,
        "nodes": a.nodes,
        "restarts": r.restarts,
        "failures": r.failures.len(),
        "findings": r.checkpoints.iter().map(|c| c.findings).sum::<usize>(),
        "wrong_responders": r.checkpoints.iter().map(|c| c.wrong_responders.len()).sum::<usize>(),
        "left_at_end": r.left_at_end.len(),
        "adds": r.checkpoints.last().map_or(0, |c| c.adds),
        "dels": r.checkpoints.last().map_or(0, |c| c.dels),
    });
    run.save();
}
