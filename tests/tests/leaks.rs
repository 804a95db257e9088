//! What a crash leaves: CNI ADDs killed with SIGKILL after IPAM gave them addresses and
//! before their endpoint was written. `tesseractl ipam check` finds exactly those addresses;
//! `tesseractl ipam release --from-report` frees exactly those while pods keep being added,
//! without locking the datastore; every running pod keeps its address.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use tessera_testbed::cluster::{bin, Cluster, ClusterSpec, MODE_POOLS};
use tessera_testbed::LabSpec;

fn tesseractl(c: &Cluster, args: &[&str]) -> std::process::Command {
    let mut cmd = c.lab.ctl.command(&bin("tesseractl").to_string_lossy());
    cmd.args(["--etcd-endpoints", &c.lab.etcd_endpoint()])
        .args(args)
        .env("NO_COLOR", "1");
    cmd
}

fn leaked_in(report: &serde_json::Value) -> BTreeSet<IpAddr> {
    report["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == "leakedAddress")
        .filter_map(|f| f["address"].as_str()?.parse().ok())
        .collect()
}

#[test]
fn leaks_of_killed_adds_are_found_and_released_while_pods_keep_coming() {
    let mut c = Cluster::new(
        "leaks",
        ClusterSpec {
            lab: LabSpec {
                nodes: 2,
                subnets: 1,
                etcd: true,
            },
            pools: MODE_POOLS.into(),
            router_bgp: false,
            // Only tesseractl releases here: the agents' own leak GC is off.
            agent_yaml: "leaseTtlSeconds: 10\ngc:\n  enabled: false\n".into(),
            ..Default::default()
        },
    )
    .expect("cluster");
    c.start_agents().expect("agents");
    c.wait_ready(Duration::from_secs(60)).expect("ready");
    for n in ["node1", "node2"] {
        c.add_pod(n, "bgp").expect("pod");
    }

    // Plant leaks: ADDs killed between the address assignment and the endpoint write. A
    // kill that came too late (the endpoint written) is no leak and is not counted.
    let mut planted: BTreeSet<IpAddr> = BTreeSet::new();
    let mut attempts = 0;
    while planted.len() < 3 && attempts < 12 {
        attempts += 1;
        let node = if attempts % 2 == 0 { "node1" } else { "node2" };
        let (addrs, recorded) = c.add_pod_killed_mid_add(node, "bgp").expect("killed ADD");
        assert!(
            !addrs.is_empty(),
            "the plugin was killed after it got addresses"
        );
        if !recorded {
            planted.extend(addrs);
        }
    }
    assert!(
        planted.len() >= 3,
        "planted {planted:?} in {attempts} attempts"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("report.json");
    let out = tesseractl(&c, &["ipam", "check", "-o", &report_path.to_string_lossy()])
        .output()
        .expect("ipam check");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report")).expect("json");
    assert_eq!(
        leaked_in(&report),
        planted,
        "exactly the killed ADDs' addresses"
    );

    // Release while pods keep being added on both nodes.
    let release = tesseractl(
        &c,
        &[
            "ipam",
            "release",
            "--from-report",
            &report_path.to_string_lossy(),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("ipam release");
    for n in ["node1", "node2", "node1", "node2"] {
        c.add_pod(n, "bgp").expect("a pod added during the release");
    }
    let out = release.wait_with_output().expect("release ran");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("{} address(es) released, 0 stale", planted.len())),
        "{text}"
    );

    // Nothing left to find, and every running pod still holds its address.
    let out = tesseractl(&c, &["ipam", "check"]).output().expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for p in &c.pods {
        let out = tesseractl(&c, &["ipam", "show", "--ip", &p.ip.to_string()])
            .output()
            .expect("show --ip");
        let who = String::from_utf8_lossy(&out.stdout);
        assert!(
            who.contains("in use") && who.contains(&format!("workload: default/{}", p.name)),
            "{who}"
        );
    }
    drop(c);
}
