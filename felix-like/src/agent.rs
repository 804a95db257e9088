//! The node agent's adapters and loop: registers the node, follows the datastore, runs the
//! BGP speaker in-process, and applies [`desired`](crate::state::desired) to the kernel
//! (netlink, nftables), again whenever the datastore or the kernel changes.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, MulticastGroup};
use tessera_datastore::liveness::NodeLease;
use tessera_datastore::model::{EncapMode, Node};
use tessera_datastore::reassert::{reassert, LocalWorkload};
use tessera_datastore::resources::{get_node, mark_workload_conflicted, put_node};
use tessera_datastore::{now_ms, AssignRequest, EtcdKv, Ipam, Kv, Owner};
use tessera_routed::kernel::{RouteTarget, Target};
use tessera_routed::speaker::Command;
use tessera_tunnel::desired::vtep_mac;
use tessera_tunnel::ipip::{ensure_ipip, IpipDevice};
use tessera_tunnel::routes::{ensure_routes, KernelRoute, RouteKind};
use tessera_tunnel::vxlan::{
    ensure_device, ensure_neighbours, kernel_route, remove_device, TunnelError, VxlanDevice,
};
use tokio::sync::{mpsc, watch, Notify};

use crate::autodetect::{self, Underlay};
use crate::config::AgentConfig;
use crate::health::{KindLabel, PeerLabel, PoolNode, Shared};
use crate::state::{desired, fenced, ClusterView, Desired, Fenced, Me, TargetTable};
use crate::sync::Synced;

/// How long the loop waits for one etcd step of its own (a new lease; a quarter of a
/// re-assertion) before it turns again and retries later.
const ETCD_STEP: Duration = Duration::from_secs(3);

/// The speaker asks this for every learned route; the agent swaps the table as pools change.
struct AgentTarget(RwLock<TargetTable>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Datastore,
    Kernel,
    Full,
}

impl RouteTarget for AgentTarget {
    fn target(&self, prefix: IpNetwork, next_hop: IpAddr) -> Target {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .target(prefix, next_hop)
    }
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let shared = Shared::new(&cfg.node_name, cfg.bgp.enabled);
    let health = tokio::spawn(crate::health::serve(cfg.health()?, shared.clone()));
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    let ifaces = autodetect::interfaces(&handle).await?;
    let underlay = autodetect::choose(
        &cfg.ip_autodetection_method,
        &ifaces,
        autodetect::kernel_source_for,
    )?;
    tracing::info!(?underlay, "underlay address");
    let underlay_mtu = tessera_tunnel::mtu::interface_mtu(&handle, &underlay.interface).await?;
    let identity = crate::witness::load_or_create_identity(&cfg.identity_file)
        .map_err(|e| anyhow::anyhow!("identity file {}: {e}", cfg.identity_file.display()))?;
    // The witness answers from the start, etcd or not: a node cut off from etcd is exactly
    // the one it must speak for.
    let witness = (cfg.witness_port != 0).then(|| {
        let listen = std::net::SocketAddr::new(underlay.v4.ip(), cfg.witness_port);
        let (node, identity) = (cfg.node_name.clone(), identity.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::witness::serve(listen, node, identity).await {
                tracing::error!(%listen, error = %e, "the witness cannot listen: GC will not see this node alive if its lease lapses");
            }
        })
    });
    tokio::pin!(shutdown);

    // The datastore: keep trying (not ready meanwhile) until etcd answers.
    let kv = tokio::select! {
        kv = connect(&cfg, &shared) => kv,
        _ = &mut shutdown => return Ok(()),
    };
    register(&kv, &cfg, &underlay, &identity).await?;
    // The node's AS: its own (configured, or an operator's on its Node record), else the
    // cluster's BGPConfiguration's, else the default. Read once: a change needs a restart.
    let bgp_config = tessera_routed::mesh::bgp_configuration(&kv).await;
    let asn = get_node(&kv, &cfg.node_name)
        .await?
        .and_then(|n| n.as_number)
        .or(bgp_config.as_number)
        .unwrap_or(crate::config::DEFAULT_ASN);
    let mut lease = NodeLease::acquire(
        kv.clone(),
        &cfg.node_name,
        Duration::from_secs(cfg.lease_ttl_seconds),
    )
    .await?;
    let (view_tx, mut view_rx) = watch::channel(Synced::default());
    tokio::spawn(crate::sync::follow(
        kv.clone(),
        cfg.node_name.clone(),
        view_tx,
    ));
    if cfg.gc.enabled {
        tokio::spawn(crate::gc::run(
            kv.clone(),
            cfg.node_name.clone(),
            cfg.gc.clone(),
            shared.clone(),
        ));
    }

    // The BGP speaker, in-process, with our per-pool route decision.
    let target = Arc::new(AgentTarget(RwLock::new(TargetTable::default())));
    let (speaker_tx, speaker_rx) = mpsc::channel(16);
    let (stop_speaker, speaker_stopped) = tokio::sync::oneshot::channel::<()>();
    let speaker = if cfg.bgp.enabled {
        let IpAddr::V4(router_id) = underlay.v4.ip() else {
            anyhow::bail!("the underlay address must be IPv4 (router id)");
        };
        let rcfg = tessera_routed::config::Config {
            asn,
            router_id,
            listen: underlay.v4.ip(),
            listen_port: cfg.bgp.port,
            hold_time: cfg.bgp.hold_time,
            connect_retry_seconds: 1,
            idle_hold_max_seconds: 60,
            stable_after_seconds: 60,
            extended_message: false,
            graceful_restart_seconds: cfg.bgp.graceful_restart_seconds,
            // A node labelled as a route reflector reflects (cluster id: the configured one,
            // else its router id).
            cluster_id: tessera_routed::mesh::cluster_id(&cfg.labels, router_id, &bgp_config),
            ecmp: false,
            kernel: Default::default(),
            networks: vec![],
            next_hop_v6: underlay.v6.map(|a| a.ip()),
            peers: vec![],
            status_socket: None,
            bfd_interval_ms: 300,
            bfd_detect_mult: 3,
            // The agent follows the datastore itself and hands the speaker its peers.
            datastore: None,
        };
        let t: Arc<dyn RouteTarget> = target.clone();
        let h = handle.clone();
        Some(tokio::spawn(async move {
            let stop = async {
                let _ = speaker_stopped.await;
            };
            tessera_routed::speaker::run_with_control(rcfg, Some(h), t, speaker_rx, stop).await
        }))
    } else {
        None
    };

    // Kernel changes made by someone else wake the loop at once.
    let drift = Arc::new(Notify::new());
    let bgp_route_gone = Arc::new(Notify::new());
    tokio::spawn(watch_kernel(drift.clone(), bgp_route_gone.clone()));
    let nft_changed = Arc::new(Notify::new());
    watch_nftables(nft_changed.clone());

    let me = Me {
        name: cfg.node_name.clone(),
        asn,
        v4: underlay.v4,
        v6: underlay.v6,
    };
    let mut node = Reconciler {
        cfg: cfg.clone(),
        me,
        underlay,
        underlay_mtu,
        handle,
        kv: kv.clone(),
        shared: shared.clone(),
        target,
        speaker: cfg.bgp.enabled.then_some(speaker_tx),
        last: None,
        last_me: None,
        nat_listing: None,
        mtu_written: None,
        vxlan_up: [false; 2],
        // Whatever happened before we started, our running pods' addresses are checked once.
        reassert_pending: true,
        fenced: Vec::new(),
        sandbox_gone_since: HashMap::new(),
    };
    {
        let mut h = shared.health();
        h.loop_started = Some(Instant::now());
        if speaker.is_some() {
            h.speaker_started = Some(Instant::now());
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_regain: Option<Instant> = None;
    let regain_every = Duration::from_secs((cfg.lease_ttl_seconds / 3).max(1));
    let mut last_full = Instant::now();
    loop {
        // What woke us: a datastore change (apply only if the wanted state changed), kernel
        // drift (check the kernel), or the periodic full pass (check everything).
        let pass = tokio::select! {
            _ = &mut shutdown => break,
            r = view_rx.changed() => { if r.is_err() { break; } Pass::Datastore }
            _ = drift.notified() => {
                // Let a burst of notifications settle into one pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Pass::Kernel
            }
            _ = nft_changed.notified() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Pass::Full
            }
            _ = bgp_route_gone.notified() => {
                node.send(Command::Resync).await;
                continue;
            }
            _ = tick.tick() => {
                shared.health().last_loop = Some(Instant::now());
                node.speaker_status().await;
                let stale_ms = now_ms().saturating_sub(lease.renewed_ms());
                shared.health().lease_trouble = (stale_ms > cfg.lease_ttl_seconds * 1000).then(|| {
                    format!("liveness lease not renewed for {} s (etcd unreachable?): the cluster sees this node as suspect", stale_ms / 1000)
                });
                if last_full.elapsed() < cfg.reconcile_interval() { continue; }
                Pass::Full
            }
        };
        if pass == Pass::Full {
            last_full = Instant::now();
        }
        let synced = view_rx.borrow_and_update().clone();
        // Our liveness key must exist while we run: if it went (a partition longer than the
        // TTL, a decommission, a hand), take a new lease at once (which stops any reclaim
        // still running), then re-assert what our pods hold before anything else.
        // Each etcd call here is bounded: the loop must keep turning (health, drift) while
        // etcd is out of reach; a failed attempt is retried on a later pass.
        let lost = synced.in_sync
            && synced.view.revision > 0
            && !synced.view.live.contains(&cfg.node_name);
        let may_try = last_regain.is_none_or(|t| t.elapsed() >= regain_every);
        if lost && may_try {
            last_regain = Some(Instant::now());
            tracing::error!("our liveness lease is gone while we run; taking a new one, then re-asserting our pods' addresses");
            let ttl = Duration::from_secs(cfg.lease_ttl_seconds);
            match tokio::time::timeout(
                ETCD_STEP,
                NodeLease::acquire(kv.clone(), &cfg.node_name, ttl),
            )
            .await
            {
                Ok(Ok(l)) => {
                    lease = l;
                    node.reassert_pending = true;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot take a new liveness lease"),
                Err(_) => tracing::warn!("etcd did not answer; taking a new liveness lease later"),
            }
        }
        if synced.in_sync && !lost && node.reassert_pending {
            match tokio::time::timeout(4 * ETCD_STEP, node.reassert(&synced.view)).await {
                Ok(Ok(())) => node.reassert_pending = false,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "re-asserting our pods' addresses failed; retrying")
                }
                Err(_) => {
                    tracing::warn!("etcd did not answer; re-asserting our pods' addresses later")
                }
            }
        }
        node.reconcile(&synced, pass).await;
    }
    tracing::info!("shutting down; routes stay in the kernel and (graceful restart) on peers");
    let _ = stop_speaker.send(());
    if let Some(s) = speaker {
        let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
    }
    health.abort();
    if let Some(w) = witness {
        w.abort();
    }
    // The lease is left to lapse on its own: a restarting agent takes it over in time, a
    // node that never comes back is reclaimed after the TTL.
    drop(lease);
    Ok(())
}

async fn connect(cfg: &AgentConfig, shared: &Shared) -> EtcdKv {
    loop {
        match cfg.datastore.connect().await {
            Ok(kv) => return kv,
            Err(e) => {
                // A wrong certificate is retried too (a Secret may be fixed under a running
                // pod), with the reason in the readiness report.
                tracing::warn!(error = %e, transient = e.is_transient(), "cannot use etcd; retrying");
                shared.health().not_ready = vec![format!("etcd: {e}")];
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Creates or updates our Node record (keeping the tunnel addresses it already has).
async fn register(
    kv: &EtcdKv,
    cfg: &AgentConfig,
    u: &Underlay,
    identity: &str,
) -> anyhow::Result<()> {
    let mut node = get_node(kv, &cfg.node_name).await?.unwrap_or(Node {
        name: cfg.node_name.clone(),
        ..Default::default()
    });
    node.ipv4_address = Some(u.v4);
    node.ipv6_address = u.v6;
    node.labels = cfg.labels.clone();
    if cfg.as_number.is_some() {
        node.as_number = cfg.as_number;
    }
    node.vxlan_tunnel_mac = Some(mac_text(vtep_mac(&cfg.node_name)));
    node.agent_identity = Some(identity.to_string());
    node.witness_port = (cfg.witness_port != 0).then_some(cfg.witness_port);
    put_node(kv, &node).await?;
    Ok(())
}

/// Netlink notifications: any change to links, neighbours or routes may be drift.
async fn watch_kernel(drift: Arc<Notify>, bgp_route_gone: Arc<Notify>) {
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ];
    let (conn, _h, mut messages) = match rtnetlink::new_multicast_connection(&groups) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no netlink notifications; drift is found by the periodic reconcile only");
            return;
        }
    };
    tokio::spawn(conn);
    while let Some((msg, _)) = messages.next().await {
        if let NetlinkPayload::InnerMessage(m) = msg.payload {
            match classify(&m) {
                Notice::BgpRouteGone => bgp_route_gone.notify_one(),
                Notice::Ours => drift.notify_one(),
                Notice::NotOurs => {}
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Notice {
    /// One of the speaker's routes went away.
    BgpRouteGone,
    /// Something the agent owns changed.
    Ours,
    NotOurs,
}

/// Which notifications concern what the agent owns: routes of protocol 81, our devices,
/// permanent neighbour and FDB entries. Pods coming and going (cali* links, their routes and
/// ARP entries) do not wake the loop.
fn classify(m: &RouteNetlinkMessage) -> Notice {
    use rtnetlink::packet_route::link::LinkAttribute;
    use rtnetlink::packet_route::neighbour::NeighbourState;
    let bgp = RouteProtocol::Other(tessera_routed::config::TESSERA_PROTO);
    let ours = RouteProtocol::Other(tessera_tunnel::vxlan::PROTO);
    match m {
        RouteNetlinkMessage::DelRoute(r) if r.header.protocol == bgp => Notice::BgpRouteGone,
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r)
            if r.header.protocol == ours =>
        {
            Notice::Ours
        }
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l)
            if l.attributes.iter().any(
                |a| matches!(a, LinkAttribute::IfName(n) if ["vxlan.calico", "vxlan-v6.calico", "tunl0"].contains(&n.as_str())),
            ) =>
        {
            Notice::Ours
        }
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n)
            if n.header.state == NeighbourState::Permanent
                || n.header.family == rtnetlink::packet_route::AddressFamily::Bridge =>
        {
            Notice::Ours
        }
        _ => Notice::NotOurs,
    }
}

/// nftables changes (any table) arrive on the netfilter netlink group; the reconcile then
/// compares our table with what it applied. A blocking socket on its own thread.
fn watch_nftables(changed: Arc<Notify>) {
    const NFNLGRP_NFTABLES: u32 = 7;
    std::thread::spawn(move || {
        let socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER).and_then(
            |mut s| {
                s.bind_auto()?;
                s.add_membership(NFNLGRP_NFTABLES)?;
                Ok(s)
            },
        );
        let s = match socket {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no nftables notifications; the periodic reconcile checks the NAT table");
                return;
            }
        };
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        while s.recv(&mut buf, 0).is_ok() {
            buf.clear();
            changed.notify_one();
        }
    });
}

struct Reconciler {
    cfg: AgentConfig,
    me: Me,
    underlay: Underlay,
    underlay_mtu: u32,
    handle: Handle,
    kv: EtcdKv,
    shared: Arc<Shared>,
    target: Arc<AgentTarget>,
    speaker: Option<mpsc::Sender<Command>>,
    /// What the last pass applied (to tell the speaker only about changes).
    last: Option<Desired>,
    /// Our own Node record as the last pass saw it (tunnel addresses).
    last_me: Option<Node>,
    nat_listing: Option<String>,
    mtu_written: Option<u32>,
    /// vxlan.calico, vxlan-v6.calico are up.
    vxlan_up: [bool; 2],
    /// Our pods' addresses must be checked against the datastore (at start, and after our
    /// lease was lost and taken again) before the loop trusts them.
    reassert_pending: bool,
    /// Addresses of local pods that now belong to other workloads, as the last pass fenced.
    fenced: Vec<Fenced>,
    /// Local endpoint records whose host interface is missing, since when (see
    /// [`Reconciler::release_gone_sandboxes`]).
    sandbox_gone_since: HashMap<String, Instant>,
}

impl Reconciler {
    async fn send(&self, c: Command) {
        if let Some(s) = &self.speaker {
            let _ = s.send(c).await;
        }
    }

    /// Asks the speaker for its sessions: proof it answers, and the BGP metrics.
    async fn speaker_status(&self) {
        let Some(s) = &self.speaker else { return };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if s.send(Command::Status(tx)).await.is_err() {
            return;
        }
        let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), rx).await else {
            return;
        };
        let m = &self.shared.metrics;
        // A peer the speaker no longer has (the mesh changed, reflectors came) must not stay
        // in the metrics with its last value.
        m.bgp_established.clear();
        m.bgp_received.clear();
        m.bgp_sent.clear();
        for p in &status.peers {
            let l = PeerLabel {
                peer: p.address.to_string(),
            };
            let up = p.state == tessera_routed::fsm::State::Established;
            m.bgp_established.get_or_create(&l).set(i64::from(up));
            m.bgp_received
                .get_or_create(&l)
                .set(p.prefixes_received as i64);
            m.bgp_sent.get_or_create(&l).set(p.prefixes_sent as i64);
        }
        let mut h = self.shared.health();
        h.last_speaker_answer = Some(Instant::now());
        h.bgp_checked = true;
        h.bgp = Some(status.clone());
        // Routed pools need their sessions up.
        let routed_pools = self.last.as_ref().is_some_and(|d| {
            d.targets
                .pools
                .iter()
                .any(|p| p.vxlan == tessera_tunnel::desired::Mode::Never)
        });
        let down: Vec<String> = status
            .peers
            .iter()
            .filter(|p| p.state != tessera_routed::fsm::State::Established)
            .map(|p| p.address.to_string())
            .collect();
        h.not_ready.retain(|r| !r.starts_with("BGP"));
        if routed_pools && !down.is_empty() {
            h.not_ready
                .push(format!("BGP sessions not established: {}", down.join(", ")));
        }
    }

    /// The tunnel address for `kind` (vxlan/ipip): the one the handle holds, or a new one from
    /// one of `pools` (a block affine to us, like pod addresses).
    async fn tunnel_address(
        &self,
        kind: &str,
        pools: Vec<String>,
        v6: bool,
    ) -> anyhow::Result<IpAddr> {
        let ipam = Ipam::new(self.kv.clone(), self.me.name.clone());
        let handle = format!("{kind}-tunnel-addr-{}", self.me.name);
        if let Some(a) = ipam
            .handle_addresses(&handle)
            .await?
            .into_iter()
            .find(|a| a.is_ipv6() == v6)
        {
            return Ok(a);
        }
        let req = AssignRequest {
            owner: Owner {
                handle,
                workload: None,
                attrs: [
                    ("node".to_string(), self.me.name.clone()),
                    ("type".to_string(), format!("{kind}TunnelAddress")),
                ]
                .into(),
            },
            num_v4: usize::from(!v6),
            num_v6: usize::from(v6),
            pools,
        };
        let a = ipam.auto_assign(&req).await?;
        a.first()
            .map(|a| a.addr)
            .ok_or_else(|| anyhow::anyhow!("no {kind} tunnel address available"))
    }

    /// Makes sure our Node record carries the tunnel addresses the pools need.
    async fn ensure_tunnel_addresses(&self, view: &ClusterView) -> Result<(), String> {
        let Some(mut node) = view.node(&self.me.name).cloned() else {
            return Err("our Node record is missing".into());
        };
        let pools_with =
            |v6: bool, f: &dyn Fn(&tessera_datastore::model::IpPoolSpec) -> bool| -> Vec<String> {
                view.pools
                    .iter()
                    .filter(|p| !p.spec.disabled && p.spec.cidr.is_ipv6() == v6 && f(&p.spec))
                    .map(|p| p.name.clone())
                    .collect()
            };
        let vxlan = |s: &tessera_datastore::model::IpPoolSpec| s.vxlan_mode != EncapMode::Never;
        let ipip = |s: &tessera_datastore::model::IpPoolSpec| s.ipip_mode != EncapMode::Never;
        // (handle kind, the pools that need it, IPv6, the Node field that records it)
        let wanted: [(&str, Vec<String>, bool, &mut Option<IpAddr>); 3] = [
            (
                "vxlan",
                pools_with(false, &vxlan),
                false,
                &mut node.vxlan_tunnel_address,
            ),
            (
                "vxlan-v6",
                pools_with(true, &vxlan),
                true,
                &mut node.vxlan_tunnel_address_v6,
            ),
            (
                "ipip",
                pools_with(false, &ipip),
                false,
                &mut node.ipip_tunnel_address,
            ),
        ];
        let mut changed = false;
        for (kind, pools, v6, field) in wanted {
            if pools.is_empty() || field.is_some() {
                continue;
            }
            let a = self
                .tunnel_address(kind, pools, v6)
                .await
                .map_err(|e| format!("{kind} tunnel address: {e}"))?;
            *field = Some(a);
            changed = true;
        }
        if changed {
            put_node(&self.kv, &node).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// `vxlan.calico` (or `vxlan-v6.calico`) and its neighbour/FDB entries when `wanted`,
    /// removed when not: Ok((device index if up, entries changed)), or why not ready.
    async fn vxlan_device(
        &mut self,
        v6: bool,
        wanted: bool,
        vtep: Option<IpAddr>,
        entries: &tessera_tunnel::desired::VxlanEntries,
        full: bool,
    ) -> Result<(Option<u32>, usize), String> {
        let slot = usize::from(v6);
        let name = if v6 {
            "vxlan-v6.calico"
        } else {
            "vxlan.calico"
        };
        if !wanted {
            if self.vxlan_up[slot] || full {
                if let Err(e) = remove_device(&self.handle, name).await {
                    tracing::warn!(device = name, error = %e, "cannot remove the device");
                }
            }
            self.vxlan_up[slot] = false;
            return Ok((None, 0));
        }
        let local = if v6 {
            self.underlay.v6.map(|a| a.ip())
        } else {
            Some(self.underlay.v4.ip())
        };
        let (Some(vtep), Some(local)) = (vtep, local) else {
            self.vxlan_up[slot] = false;
            return Err(format!("waiting for our {name} tunnel address"));
        };
        let make = if v6 {
            VxlanDevice::calico_v6
        } else {
            VxlanDevice::calico
        };
        let dev = make(
            local,
            &self.underlay.interface,
            self.underlay_mtu,
            vtep_mac(&self.me.name),
            vtep,
        );
        let idx = ensure_device(&self.handle, &dev)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        self.vxlan_up[slot] = true;
        let changed = ensure_neighbours(&self.handle, idx, entries)
            .await
            .map_err(|e| format!("{name} entries: {e}"))?;
        Ok((Some(idx), changed))
    }

    /// Our own prefixes in the route decision; returns those that are new (a learned route
    /// for one of them must leave the kernel).
    fn set_local(&self, local: &std::collections::BTreeSet<IpNetwork>) -> Vec<IpNetwork> {
        let mut t = self.target.0.write().unwrap_or_else(|p| p.into_inner());
        let newly: Vec<IpNetwork> = local.difference(&t.local).copied().collect();
        t.local.clone_from(local);
        newly
    }

    /// Checks every running local pod's addresses (and our tunnel addresses) against the
    /// datastore: takes back what is free, marks what went to another workload conflicted
    /// (the reconcile fences it), forgets a tunnel address that went elsewhere (a new one is
    /// allocated). A pod counts as running when its host interface exists here.
    async fn reassert(&mut self, view: &ClusterView) -> anyhow::Result<()> {
        let links = tessera_tunnel::routes::link_names(&self.handle).await?;
        let running: Vec<&tessera_datastore::model::WorkloadEndpoint> = view
            .workloads
            .iter()
            .filter(|w| w.host_interface.as_ref().is_some_and(|h| links.contains(h)))
            .collect();
        let mut local: Vec<LocalWorkload> = running
            .iter()
            .map(|w| LocalWorkload {
                handle: w.handle.clone(),
                addresses: w.addresses.iter().map(|n| n.ip()).collect(),
                attrs: [
                    ("namespace".to_string(), w.namespace.clone()),
                    ("pod".to_string(), w.pod.clone()),
                    ("containerID".to_string(), w.container_id.clone()),
                    ("ifname".to_string(), w.interface.clone()),
                ]
                .into(),
            })
            .collect();
        let me = view.node(&self.me.name).cloned().unwrap_or_default();
        let tunnels = [
            ("vxlan", me.vxlan_tunnel_address),
            ("vxlan-v6", me.vxlan_tunnel_address_v6),
            ("ipip", me.ipip_tunnel_address),
        ];
        for (kind, addr) in tunnels {
            if let Some(a) = addr {
                local.push(LocalWorkload {
                    handle: format!("{kind}-tunnel-addr-{}", self.me.name),
                    addresses: vec![a],
                    attrs: [("type".to_string(), format!("{kind}TunnelAddress"))].into(),
                });
            }
        }
        let report = reassert(&self.kv, &self.me.name, &local).await?;
        let mut node_changed = false;
        let mut node = me;
        for (i, addr, why) in &report.lost {
            match running.get(*i) {
                Some(w) => {
                    tracing::error!(pod = %format!("{}/{}", w.namespace, w.pod), %addr, %why,
                        "our pod's address was reclaimed while we were cut off and is taken: fencing it (no host route, not announced); the pod must be recreated");
                    mark_workload_conflicted(&self.kv, w, &[*addr]).await?;
                }
                None => {
                    tracing::warn!(%addr, %why, "our tunnel address was reclaimed and is taken: allocating a new one");
                    for field in [
                        &mut node.vxlan_tunnel_address,
                        &mut node.vxlan_tunnel_address_v6,
                        &mut node.ipip_tunnel_address,
                    ] {
                        if *field == Some(*addr) {
                            *field = None;
                            node_changed = true;
                        }
                    }
                }
            }
        }
        if node_changed {
            put_node(&self.kv, &node).await?;
        }
        Ok(())
    }

    /// Removes the host routes of fenced addresses (the CNI plugin made them; nothing makes
    /// them again while the pod is conflicted). Returns how many it removed.
    /// Endpoint records of this node whose pod's host interface has been gone for the GC
    /// grace period: the sandbox died with no DEL to follow (a crash, a lost DEL). The
    /// interface goes only with the pod's network namespace (deleting either end of a veth
    /// deletes both), so a pod without it has no network left to route to; its endpoint
    /// record and addresses are released as the Kubernetes controllers release a pod the
    /// apiserver no longer has, guarded by the handle's and the record's revisions (an ADD
    /// of a new sandbox for the same pod in the meantime wins).
    async fn release_gone_sandboxes(&mut self, view: &ClusterView) -> anyhow::Result<()> {
        let links = tessera_tunnel::routes::link_names(&self.handle).await?;
        let gone: Vec<&tessera_datastore::model::WorkloadEndpoint> = view
            .workloads
            .iter()
            .filter(|w| w.node == self.me.name && w.conflict.is_none())
            .filter(|w| {
                w.host_interface
                    .as_ref()
                    .is_some_and(|h| !links.contains(h))
            })
            .collect();
        let key = |w: &tessera_datastore::model::WorkloadEndpoint| {
            tessera_datastore::keys::workload(&w.node, &w.namespace, &w.pod, &w.interface)
        };
        let now = Instant::now();
        let current: std::collections::HashSet<String> = gone.iter().map(|w| key(w)).collect();
        self.sandbox_gone_since.retain(|k, _| current.contains(k));
        let grace = Duration::from_secs(self.cfg.gc.workload_grace_seconds);
        for w in gone {
            let k = key(w);
            let since = *self.sandbox_gone_since.entry(k.clone()).or_insert(now);
            if now.duration_since(since) < grace {
                continue;
            }
            let Some(handle) = self
                .kv
                .get(&tessera_datastore::keys::handle(&w.handle))
                .await?
            else {
                // A DEL that died after releasing the addresses and before removing the
                // record: only the record is left, and it goes unless it changed.
                if let Some(rec) = self.kv.get(&k).await? {
                    let txn = tessera_datastore::kv::Txn::new()
                        .expect(k.clone(), rec.mod_revision)
                        .then(tessera_datastore::kv::Op::delete(k.clone()));
                    if self.kv.txn(txn).await?.succeeded {
                        tracing::info!(endpoint = %k, "removed the record of a pod whose sandbox and addresses are gone");
                    }
                }
                self.sandbox_gone_since.remove(&k);
                continue;
            };
            let outcome = tessera_datastore::admin::release_gone_pod(
                &self.kv,
                &w.handle,
                handle.mod_revision,
                Some(&k),
            )
            .await?;
            tracing::info!(pod = %format!("{}/{}", w.namespace, w.pod), endpoint = %k, ?outcome, "released a pod whose sandbox is gone (its interface vanished, no DEL came)");
            self.sandbox_gone_since.remove(&k);
        }
        Ok(())
    }

    async fn fence(&mut self, view: &ClusterView) -> Result<usize, String> {
        let now = fenced(view);
        let mut removed = 0;
        for f in &now {
            if tessera_tunnel::routes::remove_host_route(&self.handle, f.address, &f.host_interface)
                .await
                .map_err(|e| format!("fencing {}: {e}", f.address))?
            {
                tracing::warn!(address = %f.address, pod = %f.pod, "fenced: host route removed");
                removed += 1;
            }
        }
        self.shared.metrics.conflicted.set(
            now.iter()
                .map(|f| &f.pod)
                .collect::<std::collections::BTreeSet<_>>()
                .len() as i64,
        );
        self.fenced = now;
        Ok(removed)
    }

    async fn reconcile(&mut self, synced: &Synced, pass: Pass) {
        let full = pass == Pass::Full;
        let started = Instant::now();
        let view = &synced.view;
        let mut not_ready = Vec::new();
        if !synced.in_sync {
            // A stale or empty view: sweeping by it could remove what is still right. The
            // kernel keeps forwarding as it is until the datastore is back in sync.
            self.shared.health().in_sync = false;
            self.shared.metrics.in_sync.set(0);
            return;
        }
        if let Err(e) = self.ensure_tunnel_addresses(view).await {
            not_ready.push(e);
        }
        let d = desired(&self.me, view);
        // Most datastore events (a pod's address allocated in an existing block) change
        // nothing this node programs: then the kernel is not even looked at.
        let my = view.node(&self.me.name).cloned();
        // A pod starting or stopping here changes only our own host prefixes (the route
        // decision's `local`): that is told to the speaker, the kernel is not looked at.
        let same_but_local = self.last.as_mut().is_some_and(|l| {
            let mine = std::mem::replace(&mut l.targets.local, d.targets.local.clone());
            let same = *l == d;
            if !same {
                l.targets.local = mine;
            }
            same
        });
        if pass == Pass::Datastore
            && same_but_local
            && self.last_me == my
            && self.fenced == fenced(view)
        {
            let newly_local = self.set_local(&d.targets.local);
            if !newly_local.is_empty() {
                self.send(Command::ResyncPrefixes(newly_local)).await;
            }
            let mut h = self.shared.health();
            h.in_sync = true;
            h.last_reconcile = Some(Instant::now());
            drop(h);
            self.shared.metrics.in_sync.set(1);
            self.record_metrics(view, 0, started.elapsed());
            return;
        }
        self.last_me = my;
        // Each problem is logged once, when it appears.
        for p in &d.problems {
            if self.last.as_ref().is_none_or(|l| !l.problems.contains(p)) {
                tracing::warn!(problem = %p, "datastore record not usable");
            }
        }
        let mut corrections = 0usize;

        // Local pods whose address went to another workload: fenced first.
        match self.fence(view).await {
            Ok(n) => corrections += n,
            Err(e) => not_ready.push(e),
        }
        if !self.fenced.is_empty() {
            let pods: std::collections::BTreeSet<String> = self
                .fenced
                .iter()
                .map(|f| format!("{} ({})", f.pod, f.address))
                .collect();
            not_ready.push(format!(
                "fenced pods, their addresses now belong to other workloads (recreate them): {}",
                pods.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }

        // Pod interfaces a CNI DEL retired whose reaper never ran (killed, or the node
        // restarted): the pod is gone, its link goes too.
        if full {
            match tessera_tunnel::routes::delete_retired_links(&self.handle).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(links = n, "deleted pod interfaces a CNI DEL retired"),
                Err(e) => tracing::warn!(error = %e, "deleting retired pod interfaces"),
            }
        }
        if full && self.cfg.gc.enabled {
            if let Err(e) = self.release_gone_sandboxes(view).await {
                tracing::warn!(error = %e, "releasing the addresses of pods whose sandbox is gone");
            }
        }

        // VXLAN devices and entries, per family.
        let my = view.node(&self.me.name);
        let vxlan_dev = self
            .vxlan_device(
                false,
                d.vxlan,
                my.and_then(|n| n.vxlan_tunnel_address),
                &d.vxlan_entries,
                full,
            )
            .await;
        let vxlan6_dev = self
            .vxlan_device(
                true,
                d.vxlan_v6,
                my.and_then(|n| n.vxlan_tunnel_address_v6),
                &d.vxlan_v6_entries,
                full,
            )
            .await;
        let mut devices = [None, None];
        for (slot, r) in [vxlan_dev, vxlan6_dev].into_iter().enumerate() {
            match r {
                Ok((idx, n)) => {
                    devices[slot] = idx;
                    corrections += n;
                }
                Err(e) => not_ready.push(e),
            }
        }
        let [vxlan_dev, vxlan6_dev] = devices;

        // IPIP: tunl0 (the kernel must have the ipip module).
        let mut tunl0 = None;
        if d.ipip {
            match my.and_then(|n| n.ipip_tunnel_address) {
                Some(IpAddr::V4(a)) => {
                    let dev = IpipDevice {
                        mtu: self
                            .underlay_mtu
                            .saturating_sub(tessera_tunnel::mtu::IPIP_OVERHEAD),
                        tunnel_addr: a,
                    };
                    match ensure_ipip(&self.handle, &dev).await {
                        Ok(idx) => tunl0 = Some(idx),
                        Err(e @ TunnelError::IpipUnavailable) => {
                            not_ready.push(format!("IPIP pools cannot be served: {e}"))
                        }
                        Err(e) => not_ready.push(format!("tunl0: {e}")),
                    }
                }
                _ => not_ready.push("waiting for our IPIP tunnel address".into()),
            }
        }

        // Routes of ours: VXLAN pools' and blackholes for our blocks.
        let mut routes: Vec<KernelRoute> = d
            .my_blocks
            .iter()
            .map(|b| KernelRoute {
                dst: *b,
                kind: RouteKind::Blackhole,
            })
            .collect();
        if let Some(dev) = vxlan_dev {
            routes.extend(d.routes.iter().map(|r| kernel_route(r, dev)));
        }
        if let Some(dev) = vxlan6_dev {
            routes.extend(d.routes_v6.iter().map(|r| kernel_route(r, dev)));
        }
        match ensure_routes(&self.handle, &routes).await {
            Ok(c) => corrections += c.total(),
            Err(e) => not_ready.push(format!("routes: {e}")),
        }

        // natOutgoing.
        let nat_changed = self.last.as_ref().is_none_or(|l| l.nat != d.nat);
        let nat_drifted =
            full && self.nat_listing.is_some() && nat_current().await != self.nat_listing;
        if nat_changed || nat_drifted || self.nat_listing.is_none() {
            let rules = d.nat.clone();
            match tokio::task::spawn_blocking(move || crate::nat::apply(&rules)).await {
                Ok(Ok(listing)) => {
                    if !nat_changed {
                        corrections += 1;
                    }
                    self.nat_listing = Some(listing);
                }
                Ok(Err(e)) => not_ready.push(e.to_string()),
                Err(e) => not_ready.push(format!("nft: {e}")),
            }
        }

        // Pod MTU for the CNI plugin.
        use tessera_tunnel::mtu::Encap;
        let in_use: Vec<Encap> = [
            (d.vxlan, Encap::Vxlan),
            (d.vxlan_v6, Encap::VxlanV6),
            (d.ipip, Encap::Ipip),
        ]
        .into_iter()
        .filter_map(|(on, e)| on.then_some(e))
        .collect();
        let mtu = tessera_tunnel::mtu::pod_mtu(self.underlay_mtu, &in_use);
        if self.mtu_written != Some(mtu) {
            match tessera_tunnel::mtu::write_mtu_file(&self.cfg.mtu_file, mtu) {
                Ok(()) => self.mtu_written = Some(mtu),
                Err(e) => not_ready.push(format!("MTU file {}: {e}", self.cfg.mtu_file.display())),
            }
        }

        // The speaker: our blocks, peers, and the route decision.
        let mut targets = d.targets.clone();
        targets.tunl0 = tunl0;
        // A pool or subnet change asks the speaker to re-decide every route; our own
        // prefixes coming (a pod started here) only those prefixes.
        let newly_local = self.set_local(&targets.local);
        let retarget = {
            let mut t = self.target.0.write().unwrap_or_else(|p| p.into_inner());
            let others_changed = (&t.pools, &t.subnets, t.tunl0)
                != (&targets.pools, &targets.subnets, targets.tunl0);
            *t = targets;
            others_changed
        };
        let prev = self.last.take();
        if prev
            .as_ref()
            .is_none_or(|p| p.my_blocks != d.my_blocks || p.my_borrowed != d.my_borrowed)
        {
            let nets = d.my_blocks.iter().chain(&d.my_borrowed).copied().collect();
            self.send(Command::SetNetworks(nets)).await;
        }
        if prev.as_ref().is_none_or(|p| p.peers != d.peers) {
            self.send(Command::SetDynamicPeers(d.peers.clone())).await;
            self.shared.health().bgp_checked = false;
        }
        if retarget {
            self.send(Command::Resync).await;
        } else if !newly_local.is_empty() {
            self.send(Command::ResyncPrefixes(newly_local)).await;
        }

        if corrections > 0 && prev.is_some() {
            tracing::info!(corrections, "kernel state corrected");
        }
        self.record_metrics(view, corrections, started.elapsed());
        let mut h = self.shared.health();
        h.in_sync = synced.in_sync;
        h.last_reconcile = Some(Instant::now());
        let bgp: Vec<String> = h
            .not_ready
            .iter()
            .filter(|r| r.starts_with("BGP"))
            .cloned()
            .collect();
        h.not_ready = not_ready;
        h.not_ready.extend(bgp);
        h.devices = [
            (d.vxlan, "vxlan.calico"),
            (d.vxlan_v6, "vxlan-v6.calico"),
            (d.ipip, "tunl0"),
        ]
        .into_iter()
        .filter(|(wanted, _)| *wanted)
        .map(|(_, name)| name.to_string())
        .collect();
        h.blocks = d.my_blocks.iter().map(ToString::to_string).collect();
        drop(h);
        self.shared.metrics.in_sync.set(i64::from(synced.in_sync));
        self.last = Some(d);
    }

    fn record_metrics(&self, view: &ClusterView, corrections: usize, took: Duration) {
        let m = &self.shared.metrics;
        if let Some(h) = &m.reconcile_seconds {
            h.observe(took.as_secs_f64());
        }
        if corrections > 0 {
            m.corrections
                .get_or_create(&KindLabel {
                    kind: "kernel".into(),
                })
                .inc_by(corrections as u64);
        }
        m.ipam_in_use.clear();
        m.ipam_capacity.clear();
        for b in &view.blocks {
            let pool = view
                .pool_of(b.cidr)
                .map(|p| p.name.clone())
                .unwrap_or_default();
            let l = PoolNode {
                pool,
                node: b.affinity.clone().unwrap_or_default(),
            };
            m.ipam_in_use.get_or_create(&l).inc_by(b.in_use() as i64);
            m.ipam_capacity
                .get_or_create(&l)
                .inc_by(b.allocations.len() as i64);
        }
    }
}

async fn nat_current() -> Option<String> {
    tokio::task::spawn_blocking(crate::nat::current)
        .await
        .ok()
        .flatten()
}
