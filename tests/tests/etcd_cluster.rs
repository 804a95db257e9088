//! etcd as production runs it: three members, each in its own namespace on the underlay,
//! and every client (agents, the CNI plugin, tesseractl) given all three endpoints.
//! - The leader is killed (SIGKILL) during pod churn on four nodes: IPAM keeps serving
//!   after the re-election, no ADD fails except with CNI code 11 ("try again later"), and
//!   `tesseractl ipam check` finds nothing afterwards.
//! - Quorum is lost (two members down) for 30 s: ADD fails with code 11 and says why, the
//!   agents report not ready but keep the kernel forwarding, and when quorum returns
//!   everything converges without restarting anything.
//! - A member cut off from the other two, and a member whose disk fills up: every client
//!   moves to the healthy members.

use std::time::{Duration, Instant};

use tessera_testbed::cluster::{Cluster, ClusterSpec};
use tessera_testbed::LabSpec;

const POOL: &str = "
apiVersion: tessera.dev/v1
kind: IPPool
metadata: { name: bgp }
spec: { cidr: 10.244.0.0/20, blockSize: 26 }
";

/// The CNI error code in a failed ADD's or DEL's message (the plugin's JSON on stdout).
fn cni_code(e: &anyhow::Error) -> Option<u64> {
    let text = e.to_string();
    let at = text.find("\"code\":")? + "\"code\":".len();
    text[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Retries the DELs of failed ADDs (as a runtime does) until all went through.
fn clean_up_failed_adds(c: &mut Cluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.retry_failed_adds_del() > 0 {
        assert!(
            Instant::now() < deadline,
            "DEL of failed ADDs keeps failing"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One three-member cluster at a time: three of them at once (nine members, agents and
/// churn on two cores) starve etcd's heartbeats and depose leaders for reasons of their own.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn three_members(test: &str, nodes: usize) -> Cluster {
    three_members_with(test, nodes, None)
}

fn three_members_with(test: &str, nodes: usize, small_disk: Option<usize>) -> Cluster {
    let mut c = Cluster::new(
        test,
        ClusterSpec {
            lab: LabSpec {
                nodes,
                subnets: 2,
                etcd: true,
            },
            pools: POOL.into(),
            etcd_members: 3,
            etcd_small_disk: small_disk,
            ..Default::default()
        },
    )
    .expect("cluster");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("ready");
    c
}

#[test]
fn ipam_keeps_serving_when_the_etcd_leader_is_killed_during_pod_churn() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = three_members("etcd_leader", 4);
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
    let (mut failures, mut adds_after_kill, mut killed) = (Vec::new(), 0, None);
    let mut serving_again_after = None;
    // Ten ADDs before the kill, then until twenty went through after it. The survivors
    // elect a new leader within etcd's election timeout (2.5 s here); until then an ADD
    // fails fast with "no leader", and the runtime backs off and tries again, as kubelet does.
    let mut round = 0;
    while adds_after_kill < 20 {
        if round == 10 {
            let leader = c.lab.etcd_leader().expect("leader");
            c.lab.etcd_members[leader].kill();
            killed = Some((leader, Instant::now()));
        }
        if let Some((_, at)) = killed {
            assert!(
                at.elapsed() < Duration::from_secs(90),
                "IPAM did not serve again after the re-election: {adds_after_kill} ADDs of 20 \
                 in 90 s ({} failures, the last: {:#})",
                failures.len(),
                failures.last().unwrap_or(&anyhow::anyhow!("none"))
            );
        }
        // No intent of its own (the test harness would write it through etcd): the pod
        // gets the node's default pool.
        match c.add_pod_as_kubelet(&nodes[round % nodes.len()], "") {
            Ok(_) => {
                if let Some((_, at)) = killed {
                    adds_after_kill += 1;
                    serving_again_after.get_or_insert(at.elapsed());
                }
            }
            Err(e) => {
                failures.push(e);
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        if c.pods.len() > 8 {
            if let Err(e) = c.delete_pod(0) {
                failures.push(e);
            }
        }
        round += 1;
    }
    for e in &failures {
        assert_eq!(cni_code(e), Some(11), "only \"try again later\": {e:#}");
    }
    // Every pod has its own address.
    let mut ips: Vec<_> = c.pods.iter().map(|p| p.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), c.pods.len(), "an address on two pods");

    // The member comes back; the failed ADDs' DELs go through; nothing is left over.
    let (killed, _) = killed.expect("a leader was killed");
    c.lab.etcd_members[killed]
        .restart_member()
        .expect("restart");
    clean_up_failed_adds(&mut c);
    while !c.pods.is_empty() {
        c.delete_pod(0).expect("DEL");
    }
    let (findings, report) = c.ipam_check();
    assert_eq!(findings, 0, "{report}");
    eprintln!(
        "{} failures (all code 11) in {round} rounds; ADDs served again {:?} after the \
         leader died; {adds_after_kill} ADDs after it",
        failures.len(),
        serving_again_after.unwrap_or_default()
    );
    let (prefix, pids) = (c.lab.prefix().to_string(), c.lab.pids());
    drop(c);
    tessera_testbed::assert_nothing_left(&prefix, &pids);
}

#[test]
fn without_quorum_adds_fail_with_try_again_and_the_data_plane_keeps_forwarding() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = three_members("etcd_quorum", 2);
    let (n1, n2) = (c.lab.nodes[0].name.clone(), c.lab.nodes[1].name.clone());
    let a = c.add_pod(&n1, "bgp").expect("pod on node1");
    let b = c.add_pod(&n2, "bgp").expect("pod on node2");
    let (ip_a, ip_b) = (c.pods[a].ip, c.pods[b].ip);
    assert!(c.wait_ping(a, ip_b, Duration::from_secs(30)), "before");

    // Two of three members down: no quorum.
    c.lab.etcd_members[0].kill();
    c.lab.etcd_members[1].kill();
    let t = Instant::now();
    let e = c
        .add_pod_as_kubelet(&n1, "")
        .expect_err("no quorum, no address");
    let took = t.elapsed();
    assert_eq!(cni_code(&e), Some(11), "try again later: {e:#}");
    assert!(
        e.to_string().contains("etcd"),
        "the message says why: {e:#}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    for node in [&n1, &n2] {
        loop {
            match c.http(node, "/readyz") {
                Ok((503, _)) => break,
                other => {
                    assert!(Instant::now() < deadline, "{node} still ready: {other:?}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    // The outage lasts 30 s; the kernel keeps forwarding through it.
    let outage_end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < outage_end {
        assert!(c.ping(a, ip_b).is_some(), "forwarding during the outage");
        assert!(c.ping(b, ip_a).is_some(), "forwarding during the outage");
        std::thread::sleep(Duration::from_secs(1));
    }
    for node in [&n1, &n2] {
        assert!(
            c.agent_exited(node).is_none(),
            "{node}'s agent kept running"
        );
    }

    // Quorum returns: the same agents become ready, ADD works, nothing is left over.
    c.lab.etcd_members[0].restart_member().expect("restart");
    c.lab.etcd_members[1].restart_member().expect("restart");
    c.wait_ready(Duration::from_secs(60))
        .expect("ready again without a restart");
    let d = c.add_pod(&n2, "bgp").expect("ADD after quorum returned");
    let ip_d = c.pods[d].ip;
    assert!(
        c.wait_ping(a, ip_d, Duration::from_secs(30)),
        "new pod reached"
    );
    clean_up_failed_adds(&mut c);
    let (findings, report) = c.ipam_check();
    assert_eq!(findings, 0, "{report}");
    eprintln!("ADD without quorum failed after {took:?}: {e:#}");
    let (prefix, pids) = (c.lab.prefix().to_string(), c.lab.pids());
    drop(c);
    tessera_testbed::assert_nothing_left(&prefix, &pids);
}

#[test]
fn a_member_cut_off_from_the_others_is_left_by_every_client() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = three_members("etcd_partition", 2);
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
    // etcd1 loses the other two (its packets to them are dropped); clients still reach it.
    let cut = &c.lab.etcd_member_ns[0];
    for other in ["198.18.0.4/32", "198.18.0.5/32"] {
        cut.ip(&["route", "add", "prohibit", other])
            .expect("partition");
    }
    // Within an election timeout it knows it has no leader (before that, a write sent there
    // times out with its outcome unknown: code 11, as it should be). From then on a client
    // that starts there (one CNI invocation in three, by process id) is told "no leader"
    // at once and moves to a member that has one.
    let status = |member: usize| {
        let ep = c.lab.etcd_members[member].endpoint().to_string();
        c.lab
            .ctl
            .exec(
                "etcdctl",
                &["--endpoints", &ep, "endpoint", "status", "-w", "json"],
            )
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // etcd1 knows it is alone; etcd2 (with etcd3, a majority) has a leader.
        let (cut, majority) = (status(0), status(1));
        if cut.contains("etcdserver: no leader")
            && majority.contains("\"leader\":")
            && !majority.contains("no leader")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the partition never settled: {cut} / {majority}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let failures = add_pods_as_the_kubelet_would(&mut c, &nodes, 12);
    assert!(
        failures.is_empty(),
        "every ADD served by the healthy members: {failures:#?}"
    );
    c.wait_ready(Duration::from_secs(30))
        .expect("the agents stay ready");
    let mut ips: Vec<_> = c.pods.iter().map(|p| p.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 12, "twelve pods, twelve addresses");
    let (findings, report) = c.ipam_check();
    assert_eq!(findings, 0, "{report}");
    let (prefix, pids) = (c.lab.prefix().to_string(), c.lab.pids());
    drop(c);
    tessera_testbed::assert_nothing_left(&prefix, &pids);
}

#[test]
fn a_member_whose_disk_fills_up_is_left_by_every_client() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut c = three_members_with("etcd_disk_full", 2, Some(0));
    let nodes: Vec<String> = c.lab.nodes.iter().map(|n| n.name.clone()).collect();
    let written = c.lab.etcd_members[0].fill_disk().expect("fill the disk");
    // Writes go on until etcd1 needs a page its disk cannot give (it then stops: etcd treats
    // a failed WAL or database write as fatal). Until that moment an ADD it takes part in
    // may time out with code 11; a runtime retries those.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut round = 0;
    while c.lab.etcd_members[0].healthy() {
        assert!(
            Instant::now() < deadline,
            "etcd1 kept serving on a full disk ({written} bytes of filler): {}",
            c.lab.etcd_members[0].log()
        );
        if let Err(e) = c.add_pod_as_kubelet(&nodes[round % nodes.len()], "") {
            assert_eq!(cni_code(&e), Some(11), "only \"try again later\": {e:#}");
        }
        round += 1;
        if c.pods.len() > 6 {
            c.delete_pod(0).expect("DEL");
        }
    }
    eprintln!(
        "etcd1 stopped serving after {round} pod starts: {}",
        c.lab.etcd_members[0].log()
    );
    // From now on every client, whichever member it tries first, is served by the others.
    let before = c.pods.len();
    let failures = add_pods_as_the_kubelet_would(&mut c, &nodes, 12);
    assert!(
        failures.is_empty(),
        "every ADD served by the healthy members: {failures:#?}"
    );
    assert_eq!(c.pods.len(), before + 12);
    c.wait_ready(Duration::from_secs(30))
        .expect("the agents stay ready");
    let mut ips: Vec<_> = c.pods.iter().map(|p| p.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), c.pods.len(), "an address on two pods");
    clean_up_failed_adds(&mut c);
    let (findings, report) = c.ipam_check();
    assert_eq!(findings, 0, "{report}");
    let (prefix, pids) = (c.lab.prefix().to_string(), c.lab.pids());
    drop(c);
    tessera_testbed::assert_nothing_left(&prefix, &pids);
}

/// `count` pod starts spread over `nodes`; the errors of those that failed. On a busy host
/// the majority may re-elect while an ADD's write is in flight: etcd answers "leader
/// changed" (outcome unknown) and the plugin says try again (code 11), as it must. The
/// kubelet then deletes the sandbox and adds a new one; so does this, up to three times.
/// Any other failure is returned.
fn add_pods_as_the_kubelet_would(
    c: &mut Cluster,
    nodes: &[String],
    count: usize,
) -> Vec<anyhow::Error> {
    let mut failures = Vec::new();
    for round in 0..count {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match c.add_pod_as_kubelet(&nodes[round % nodes.len()], "") {
                Ok(_) => break,
                Err(e) if attempts < 4 && e.to_string().contains("leader changed") => {
                    assert!(e.to_string().contains("\"code\":11"), "{e}");
                    assert_eq!(c.retry_failed_adds_del(), 0, "the failed sandbox's DEL");
                }
                Err(e) => {
                    failures.push(e);
                    break;
                }
            }
        }
    }
    failures
}
