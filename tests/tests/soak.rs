//! The soak's short version (two minutes, in CI): pod churn on eight nodes with agents, an
//! agent killed and brought back every 40 s, a checkpoint every 20 s. See
//! `tessera_testbed::soak`; `tessera-soak --minutes 30` runs the long one.

use std::time::Duration;

use tessera_testbed::soak::{run, SoakSpec};

#[test]
fn two_minutes_of_churn_leave_no_leak_no_duplicate_and_nothing_behind() {
    tessera_testbed::require_root();
    let seed = std::env::var("TESSERA_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let r = run(
        &SoakSpec {
            nodes: 8,
            duration: Duration::from_secs(120),
            check_every: Duration::from_secs(20),
            restart_every: Duration::from_secs(40),
            target_pods: 24,
            seed,
        },
        |line| eprintln!("{line}"),
    )
    .expect("soak");
    assert!(r.failures.is_empty(), "ADD/DEL failures: {:#?}", r.failures);
    assert!(
        r.restarts >= 2,
        "agents killed and brought back: {}",
        r.restarts
    );
    for cp in &r.checkpoints {
        assert_eq!(cp.findings, 0, "ipam check at {:?}", cp.at);
        assert!(
            cp.wrong_responders.is_empty(),
            "not exactly one right responder per address at {:?}: {:#?}",
            cp.at,
            cp.wrong_responders
        );
    }
    assert!(
        r.left_at_end.is_empty(),
        "left behind: {:#?}",
        r.left_at_end
    );
    // Resident memory of the agents that ran throughout: flat, not a leak's climb.
    let (first, last) = (&r.checkpoints[0], &r.checkpoints[r.checkpoints.len() - 1]);
    for (node, (pid, start)) in &first.agent_rss {
        if let Some((_, end)) = last.agent_rss.get(node).filter(|(p, _)| p == pid) {
            assert!(
                *end <= start + start / 2,
                "{node}'s agent grew from {start} to {end} KiB"
            );
        }
    }
}
