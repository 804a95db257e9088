//! What the agent benchmarks share: reading a namespace's routes and a process's cost.

use std::collections::BTreeMap;

/// The device of each route in a namespace's main table (its type for blackholes and the
/// like), by destination.
pub fn routes(ns: &str) -> BTreeMap<String, String> {
    let out = std::process::Command::new("ip")
        .args(["-j", "-n", ns, "route", "show"])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r["dst"].as_str()?.to_string(),
                r["dev"]
                    .as_str()
                    .unwrap_or(r["type"].as_str().unwrap_or(""))
                    .to_string(),
            ))
        })
        .collect()
}

/// The /26 an IPv4 address is in.
pub fn block_of(ip: std::net::Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.{}/26", o[0], o[1], o[2], o[3] & 0xc0)
}

/// utime+stime (clock ticks) and VmRSS (KiB) of a process.
pub fn cpu_and_rss(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (ticks, tessera_testbed::process::rss_kib(pid))
}
