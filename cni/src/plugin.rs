//! The commands of the two plugins. `tessera` wires the pod and records its endpoint;
//! `tessera-ipam` only assigns and releases addresses (for other main plugins).

use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde_json::{json, Value};
use tessera_datastore::model::WorkloadEndpoint;
use tessera_datastore::resources::{
    delete_workload_endpoint, get_workload_endpoint, load_config, put_workload_endpoint,
    put_workload_endpoint_bound,
};

use crate::error::{code, CniError};
use crate::ipam::{self, PodId};
use crate::netns::connect;
use crate::spec::{
    CniEnv, CniResult, Command, Interface, IpConfig, NetConf, Route, Version, SUPPORTED_VERSIONS,
};
use crate::wiring::{self, PodWiring, HOST_MAC};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    /// `tessera`: veth, routes, endpoint record, addresses.
    Main,
    /// `tessera-ipam`: addresses only.
    Ipam,
}

/// What a plugin process prints and how it exits.
pub struct Outcome {
    pub stdout: Option<Value>,
    pub exit_code: i32,
}

/// Runs one plugin invocation: parses the environment and stdin, runs the command, and turns
/// any error into the spec's error JSON with a non-zero exit.
pub async fn run(plugin: Plugin, env: Result<CniEnv, CniError>, stdin: &[u8]) -> Outcome {
    // Errors are printed in the version the config asked for, when it can be read at all.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_string());
    match dispatch(plugin, env, stdin).await {
        Ok(stdout) => Outcome {
            stdout,
            exit_code: 0,
        },
        Err(e) => {
            tracing::error!(code = e.code, msg = %e.msg, details = %e.details, "CNI command failed");
            Outcome {
                stdout: Some(e.to_json(&version)),
                exit_code: 1,
            }
        }
    }
}

async fn dispatch(
    plugin: Plugin,
    env: Result<CniEnv, CniError>,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    let env = env?;
    if env.command == Command::Version {
        // VERSION's stdin carries only cniVersion.
        return Ok(Some(version_answer(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    let version = conf.version();
    match env.command {
        Command::Check if version < Version(0, 4, 0) => {
            return Err(CniError::incompatible(
                "CHECK needs cniVersion 0.4.0 or later",
            ))
        }
        Command::Status | Command::Gc if version < Version(1, 1, 0) => {
            return Err(CniError::incompatible(
                "STATUS and GC need cniVersion 1.1.0",
            ))
        }
        _ => {}
    }
    let node = ipam::node_name(&conf)?;
    let span = tracing::info_span!("cni", command = ?env.command, container = env.container_id(), ifname = env.ifname(), %node);
    let _enter = span.enter();
    let outcome = command(plugin, &env, &conf, &node, stdin).await;
    match outcome {
        Err(e) => Err(ipam::explain(&conf, e).await),
        done => done,
    }
}

async fn command(
    plugin: Plugin,
    env: &CniEnv,
    conf: &NetConf,
    node: &str,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    match (plugin, env.command) {
        (_, Command::Version) => Ok(Some(version_answer(stdin))),
        (Plugin::Main, Command::Add) => add(conf, env, node, stdin).await.map(Some),
        (Plugin::Main, Command::Del) => del(conf, env, node, stdin).await.map(|()| None),
        (Plugin::Main, Command::Check) => check(conf, env, node).await.map(|()| None),
        (Plugin::Ipam, Command::Add) => ipam_add(conf, env, node, stdin).await.map(Some),
        (Plugin::Ipam, Command::Del) => {
            let kv = ipam::connect(conf).await?;
            let pod = PodId::from_env(env);
            ipam::release(
                ipam::Call {
                    kv: &kv,
                    conf,
                    env,
                    node,
                    pod: &pod,
                    stdin,
                },
                Vec::new(),
            )
            .await
            .map(|_| None)
        }
        (Plugin::Ipam, Command::Check) => {
            let kv = ipam::connect(conf).await?;
            let pod = PodId::from_env(env);
            let prev = prev_result(conf)?;
            let addrs: Vec<IpAddr> = prev.ips.iter().map(|i| i.address.ip()).collect();
            ipam::check(&kv, conf, node, &pod, &addrs)
                .await
                .map(|()| None)
        }
        (_, Command::Status) => status(conf).await.map(|()| None),
        (_, Command::Gc) => {
            let kv = ipam::connect(conf).await?;
            let released = ipam::gc(&kv, conf, node).await?;
            tracing::info!(?released, "GC released stale attachments");
            Ok(None)
        }
    }
}

fn version_answer(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "1.1.0".into());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS })
}

fn prev_result(conf: &NetConf) -> Result<CniResult, CniError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::invalid_config("CHECK needs prevResult"))?;
    CniResult::from_json(prev)
}

fn pod_mtu(conf: &NetConf) -> u32 {
    if let Some(m) = conf.mtu {
        return m;
    }
    let file = conf.mtu_file.as_deref().unwrap_or("/var/lib/tessera/mtu");
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1500)
}

fn wiring_for(
    conf: &NetConf,
    env: &CniEnv,
    pod: &PodId,
    addresses: Vec<IpAddr>,
) -> Result<PodWiring, CniError> {
    let prefix = conf.veth_prefix.as_deref().unwrap_or("cali");
    let mac = match conf.runtime_config.mac.as_deref().or(env.arg("MAC")) {
        Some(_) if conf.pod_interface == wiring::PodInterface::Netkit => {
            return Err(CniError::invalid_config(
                "a MAC address was asked for, but podInterface netkit (L3 mode) has none",
            ))
        }
        Some(m) => Some(wiring::parse_mac(m)?),
        None => None,
    };
    Ok(PodWiring {
        device: conf.pod_interface,
        netns: env.netns.clone().unwrap_or_default(),
        host_ifname: wiring::host_ifname(prefix, &pod.identity()),
        ifname: env.ifname().to_string(),
        mtu: pod_mtu(conf),
        mac,
        addresses,
    })
}

fn host_prefix(addr: IpAddr) -> IpNetwork {
    let plen = if addr.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(addr, plen).unwrap_or_else(|_| IpNetwork::from(addr))
}

async fn add(conf: &NetConf, env: &CniEnv, node: &str, stdin: &[u8]) -> Result<Value, CniError> {
    // Fail before allocating anything when the pod's namespace is not there.
    crate::netns::open_netns(env.netns.as_deref().unwrap_or_default())?;
    let pod = PodId::from_env(env);
    tracing::debug!("ADD: connecting to the datastore");
    let kv = ipam::connect(conf).await?;
    tracing::debug!("ADD: assigning addresses");
    let call = ipam::Call {
        kv: &kv,
        conf,
        env,
        node,
        pod: &pod,
        stdin,
    };
    let assigned = ipam::assign(call).await?;
    tracing::debug!(addresses = ?assigned.addresses, "ADD: wiring");
    // From here on, a failure gives newly assigned addresses back and removes new links; a
    // repeated ADD leaves what the running pod already has.
    let already_held = assigned.already_held;
    let result = wire_and_record(conf, env, node, &pod, &kv, assigned).await;
    match result {
        Ok(v) => {
            tracing::debug!(etcd_requests = kv.requests_sent(), "ADD done");
            Ok(v)
        }
        Err(e) if already_held => Err(e),
        Err(e) => {
            if let Err(r) = ipam::release(call, Vec::new()).await {
                tracing::warn!(error = %r, "rolling back the address assignment failed");
            }
            Err(e)
        }
    }
}

async fn wire_and_record(
    conf: &NetConf,
    env: &CniEnv,
    node: &str,
    pod: &PodId,
    kv: &tessera_datastore::EtcdKv,
    assigned: ipam::Assigned,
) -> Result<Value, CniError> {
    let addresses = assigned.addresses;
    let w = wiring_for(conf, env, pod, addresses.clone())?;
    let host = connect()?;
    let wired = wiring::wire_pod(&host, &w).await?;
    tracing::debug!("ADD: recording the endpoint");
    let wep = WorkloadEndpoint {
        node: node.to_string(),
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        container_id: pod.container_id.clone(),
        interface: pod.ifname.clone(),
        host_interface: Some(w.host_ifname.clone()),
        mac: (!wired.container_mac.is_empty()).then(|| wired.container_mac.clone()),
        addresses: addresses.iter().map(|a| host_prefix(*a)).collect(),
        handle: pod.handle(&conf.name),
        floating_ips: assigned.floating_ips,
        conflict: None,
    };
    let recorded = if assigned.without_ipam {
        put_workload_endpoint(kv, &wep).await
    } else {
        put_workload_endpoint_bound(kv, &wep, assigned.handle_revision).await
    };
    if let Err(e) = recorded {
        if !wired.repaired {
            let _ = wiring::remove_host_end(&host, &w.host_ifname).await;
        }
        return Err(e.into());
    }
    let mut routes = Vec::new();
    if addresses.iter().any(IpAddr::is_ipv4) {
        routes.push(Route {
            dst: "0.0.0.0/0".parse().map_err(|_| CniError::io("route"))?,
            gw: None,
        });
    }
    if addresses.iter().any(IpAddr::is_ipv6) {
        routes.push(Route {
            dst: "::/0".parse().map_err(|_| CniError::io("route"))?,
            gw: None,
        });
    }
    let result = CniResult {
        interfaces: vec![
            Interface {
                name: w.host_ifname.clone(),
                // A netkit pair in L3 mode has no MAC addresses.
                mac: (w.device == wiring::PodInterface::Veth)
                    .then(|| wiring::format_mac(&HOST_MAC)),
                sandbox: None,
            },
            Interface {
                name: w.ifname.clone(),
                mac: (!wired.container_mac.is_empty()).then_some(wired.container_mac),
                sandbox: Some(w.netns.clone()),
            },
        ],
        ips: addresses
            .iter()
            .map(|a| IpConfig {
                address: host_prefix(*a),
                gateway: None,
                interface: Some(1),
            })
            .collect(),
        routes,
        dns: Value::Null,
    };
    tracing::info!(addresses = ?addresses, host = %w.host_ifname, "pod wired");
    Ok(result.to_json(&conf.cni_version))
}

async fn del(conf: &NetConf, env: &CniEnv, node: &str, stdin: &[u8]) -> Result<(), CniError> {
    let pod = PodId::from_env(env);
    let w = wiring_for(conf, env, &pod, Vec::new())?;
    // Deleting the host end deletes the pod end too, whether or not the netns still exists,
    // but costs the kernel an RCU grace period (~20 ms, most of DEL). DEL retires the link
    // and a reaper deletes it after DEL returns. Until then the old pod's host routes may
    // stay: the freed address goes to the back of its block's free queue, and a new pod
    // given it replaces the route (one route, one pod), which the reaper leaves alone.
    let host_ifname = w.host_ifname.clone();
    let unwire = crate::netns::on_own_thread(move |h| async move {
        wiring::retire_host_end(&h, &host_ifname).await
    });
    // The endpoint record goes with the release, in the same transaction when the node's
    // queue serves it; otherwise on its own after it. Either order, or a crash between
    // them, leaves what the GC repairs (an endpoint whose interface is gone, or addresses no
    // endpoint names).
    let forget = async {
        let kv = ipam::connect(conf).await?;
        let endpoint =
            tessera_datastore::keys::workload(node, &pod.namespace, &pod.name, &pod.ifname);
        let call = ipam::Call {
            kv: &kv,
            conf,
            env,
            node,
            pod: &pod,
            stdin,
        };
        let released = ipam::release(call, vec![endpoint]).await;
        if !matches!(released, Ok(true)) {
            delete_workload_endpoint(&kv, node, &pod.namespace, &pod.name, &pod.ifname).await?;
        }
        released?;
        Ok::<_, CniError>(kv.requests_sent())
    };
    let (unwired, forgotten) = tokio::join!(unwire, forget);
    // Forked last: the child shares the plugin's pages until it exits, and every page the
    // plugin writes meanwhile is copied.
    if let Some(index) = unwired? {
        if let Err(e) = crate::reaper::spawn(index) {
            tracing::warn!(error = %e, host = %w.host_ifname, "no reaper; deleting the link now");
            let host_ifname = w.host_ifname.clone();
            crate::netns::on_own_thread(move |h| async move {
                wiring::reap_retired(&h, index, &host_ifname).await
            })
            .await?;
        }
    }
    let etcd_requests = forgotten?;
    tracing::debug!(etcd_requests, "DEL done");
    tracing::info!(host = %w.host_ifname, "pod unwired");
    Ok(())
}

async fn check(conf: &NetConf, env: &CniEnv, node: &str) -> Result<(), CniError> {
    let prev = prev_result(conf)?;
    let addresses: Vec<IpAddr> = prev.ips.iter().map(|i| i.address.ip()).collect();
    let pod = PodId::from_env(env);
    let w = wiring_for(conf, env, &pod, addresses.clone())?;
    let host = connect()?;
    let kv = ipam::connect(conf).await?;
    // A fenced pod first: its wiring is incomplete on purpose, and this is the reason.
    let wep = get_workload_endpoint(&kv, node, &pod.namespace, &pod.name, &pod.ifname).await?;
    if let Some(c) = wep.and_then(|w| w.conflict) {
        let addrs: Vec<String> = c.addresses.iter().map(ToString::to_string).collect();
        return Err(CniError::check_failed(format!(
            "address {} of this pod was reclaimed while node {node} was cut off from the datastore and now belongs to another workload; the pod is fenced (no route to it): recreate it",
            addrs.join(", ")
        )));
    }
    wiring::check_pod(&host, &w).await?;
    if conf
        .ipam
        .as_ref()
        .is_some_and(|i| i.ipam_type == ipam::TESSERA_IPAM)
    {
        ipam::check(&kv, conf, node, &pod, &addresses).await?;
    }
    Ok(())
}

/// STATUS: ready when the datastore answers and has an enabled pool.
async fn status(conf: &NetConf) -> Result<(), CniError> {
    let not_ready = |why: String| CniError::new(code::NOT_AVAILABLE, why);
    let probe = async {
        let kv = ipam::connect_proven(conf).await?;
        load_config(&kv).await.map_err(CniError::from)
    };
    let cfg = tokio::time::timeout(Duration::from_secs(3), probe)
        .await
        .map_err(|_| not_ready("the datastore did not answer within 3 s".into()))?
        .map_err(|e| not_ready(format!("the datastore is not usable: {}", e.msg)))?;
    if !cfg.pools.iter().any(|p| !p.spec.disabled) {
        return Err(not_ready("no enabled IP pool".into()));
    }
    Ok(())
}

async fn ipam_add(
    conf: &NetConf,
    env: &CniEnv,
    node: &str,
    stdin: &[u8],
) -> Result<Value, CniError> {
    let kv = ipam::connect(conf).await?;
    let pod = PodId::from_env(env);
    let addresses = ipam::assign(ipam::Call {
        kv: &kv,
        conf,
        env,
        node,
        pod: &pod,
        stdin,
    })
    .await?
    .addresses;
    let result = CniResult {
        ips: addresses
            .iter()
            .map(|a| IpConfig {
                address: host_prefix(*a),
                gateway: None,
                interface: None,
            })
            .collect(),
        ..Default::default()
    };
    Ok(result.to_json(&conf.cni_version))
}
