//! The tokio driver: one task per peer (socket, timers, FSM) and one speaker task that owns
//! the RIB, the Adj-RIB-Out and the kernel adapter. This is the only module that spawns.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ipnetwork::IpNetwork;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::adj_in;
use crate::adj_out::{self, SessionView};
use crate::config::{Config, PeerConfig};
use crate::fsm::{keep_our_connection, Action, Damping, Event, Session, SessionConfig, State};
use crate::kernel::{Kernel, KernelOp, RouteTarget};
use crate::packet::{self, Capability, Ctx, Families, Message, Open, Update};
use crate::rib::{Attrs, BestChange, Local, Path, PeerInfo, Rib};

enum ToPeer {
    Send(Vec<Message>),
    Incoming(TcpStream),
    /// Unpeer: Cease, close, end the task.
    Stop,
    /// BFD saw the peer die: drop the session now, not at the hold time.
    BfdDown,
}

/// Changes to a running speaker.
#[derive(Debug)]
pub enum Command {
    /// The dynamic peers (e.g. the full mesh from the datastore's Node records); the
    /// configuration file's peers stay. Peers not in the list are unpeered.
    SetDynamicPeers(Vec<PeerConfig>),
    /// The prefixes this node originates (its blocks), replacing the configuration's.
    SetNetworks(Vec<IpNetwork>),
    /// Puts every learned best route into the kernel again, asking the [`RouteTarget`] anew:
    /// after a pool's mode changed or someone deleted one of our routes by hand.
    Resync,
    /// [`Command::Resync`] for these prefixes only (the route decision changed for them).
    ResyncPrefixes(Vec<IpNetwork>),
    /// A snapshot of the sessions, for health and metrics.
    Status(tokio::sync::oneshot::Sender<Status>),
}

enum FromPeer {
    Up {
        addr: IpAddr,
        open: Open,
        ctx: Ctx,
        local: IpAddr,
    },
    Down {
        addr: IpAddr,
        reason: String,
    },
    Update {
        addr: IpAddr,
        update: Update,
    },
    Refresh {
        addr: IpAddr,
    },
    State {
        addr: IpAddr,
        state: State,
        damping: Option<Damping>,
    },
}

/// What `tessera-routed status` prints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub router_id: String,
    pub asn: u32,
    pub loc_rib: usize,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub address: IpAddr,
    pub asn: u32,
    pub state: State,
    pub uptime_seconds: Option<u64>,
    pub prefixes_received: usize,
    pub prefixes_sent: usize,
    pub bfd: Option<crate::bfd::BfdState>,
    /// Why the session last went down, resets in a row, and the wait before the next try.
    pub last_reset: Option<Damping>,
}

struct Up {
    ctx: Ctx,
    local: IpAddr,
    since: Instant,
    /// The peer's restart time, when it asks us to keep routes of some family.
    peer_gr: Option<u16>,
    /// What both OPENs advertised: routes, withdrawals and End-of-RIB go out only for these.
    families: Families,
    /// The negotiated families whose routes are kept (stale) while the peer restarts.
    preserved: Families,
    /// An UPDATE for a family the session does not carry was logged (once per session).
    warned_foreign: bool,
}

struct Peer {
    cfg: PeerConfig,
    tx: mpsc::UnboundedSender<ToPeer>,
    info: Arc<PeerInfo>,
    state: State,
    up: Option<Up>,
    /// Adj-RIB-Out: what we last announced.
    adj_out: HashMap<IpNetwork, Arc<Attrs>>,
    /// Restart deadline while the peer restarts gracefully (its routes are stale).
    stale_until: Option<Instant>,
    /// End-of-RIB received since the session came up (all families it negotiated).
    eor: HashSet<u16>,
    bfd: crate::bfd::BfdState,
    last_reset: Option<Damping>,
}

/// Runs the speaker until `shutdown` resolves. `kernel` is a netlink handle of the namespace
/// to install routes in (None: no kernel routes).
pub async fn run(
    cfg: Config,
    kernel: Option<rtnetlink::Handle>,
    target: Arc<dyn RouteTarget>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (_keep, control) = mpsc::channel(1);
    run_with_control(cfg, kernel, target, control, shutdown).await
}

/// [`run`], taking [`Command`]s while it runs.
pub async fn run_with_control(
    cfg: Config,
    kernel: Option<rtnetlink::Handle>,
    target: Arc<dyn RouteTarget>,
    mut control: mpsc::Receiver<Command>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(cfg.listen, cfg.listen_port)).await?;
    for p in &cfg.peers {
        if let Some(pw) = &p.password {
            crate::md5::set_password(&listener, p.address, pw)
                .map_err(|e| anyhow::anyhow!("TCP MD5 key for peer {}: {e}", p.address))?;
        }
    }
    let status = Arc::new(Mutex::new(Status::default()));
    if let Some(path) = cfg.status_socket.clone() {
        tokio::spawn(serve_status(path, status.clone()));
    }
    // Small: a peer sending faster than the RIB absorbs waits on its socket instead of
    // queueing decoded UPDATEs here.
    let (from_tx, mut from_rx) = mpsc::channel::<FromPeer>(32);
    let kernel = kernel
        .map(|h| Kernel::new(h, cfg.kernel.protocol, cfg.kernel.table))
        .filter(|_| cfg.kernel.install);
    // Routes a previous run left: swept once every peer sent End-of-RIB (or after a while).
    let mut leftovers: Option<HashSet<IpNetwork>> = match &kernel {
        Some(k) => Some(k.ours().await.unwrap_or_default().into_iter().collect()),
        None => None,
    };
    let kernel = kernel.map(|k| {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(k.run_worker(rx));
        tx
    });
    let sweep_deadline =
        Instant::now() + Duration::from_secs(u64::from(cfg.graceful_restart_seconds.max(30)));
    let local = Local {
        asn: cfg.asn,
        router_id: cfg.router_id,
        cluster_id: cfg.cluster_id,
    };
    // BFD for the peers that ask for it, static or from the datastore (RFC 5882: BFD Down
    // ends the session). Its task starts with the first such peer.
    let (bfd_events, mut bfd_rx) = mpsc::channel::<crate::bfd::BfdEvent>(64);
    let mut sp = SpeakerState {
        cfg: cfg.clone(),
        rib: Rib::new(cfg.ecmp),
        peers: HashMap::new(),
        from_tx,
        dynamic: HashSet::new(),
        kernel,
        target,
        local,
        bfd_events,
        bfd_peers: None,
    };
    for pc in &cfg.peers {
        sp.add_peer(pc.clone());
    }
    sp.update_bfd();
    sp.set_networks(cfg.networks.clone()).await;
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Ok((stream, remote)) = listener.accept() => {
                match sp.peers.get(&remote.ip()) {
                    Some(p) => { let _ = p.tx.send(ToPeer::Incoming(stream)); }
                    None => tracing::warn!(%remote, "connection from an unknown peer refused"),
                }
            }
            Some(ev) = from_rx.recv() => sp.on_peer_event(ev).await,
            Some(ev) = bfd_rx.recv() => {
                if let Some(p) = sp.peers.get_mut(&ev.peer) {
                    tracing::info!(peer = %ev.peer, state = ?ev.state, "BFD");
                    p.bfd = ev.state;
                    if ev.state == crate::bfd::BfdState::Down {
                        if let Some(up) = p.up.as_mut() {
                            // The forwarding path is gone: no graceful-restart grace either
                            // (RFC 5882 §4.3.1; the peer's BFD is not control-plane independent).
                            up.peer_gr = None;
                            let _ = p.tx.send(ToPeer::BfdDown);
                        }
                    }
                }
            }
            Some(cmd) = control.recv() => match cmd {
                Command::SetDynamicPeers(list) => sp.set_dynamic_peers(list, &listener).await,
                Command::SetNetworks(nets) => sp.set_networks(nets).await,
                Command::Resync => sp.resync_kernel(),
                Command::ResyncPrefixes(prefixes) => sp.resync_prefixes(&prefixes),
                Command::Status(reply) => { let _ = reply.send(sp.status()); }
            },
            _ = tick.tick() => {
                sp.expire_stale().await;
                if let Some(left) = &leftovers {
                    let all_eor = sp.peers.values().all(|p| p.up.is_some() && !p.eor.is_empty());
                    if all_eor || Instant::now() > sweep_deadline {
                        sp.sweep_leftovers(left).await;
                        leftovers = None;
                    }
                }
            }
        }
        *status.lock().unwrap_or_else(|p| p.into_inner()) = sp.status();
    }
    Ok(())
}

struct SpeakerState {
    cfg: Config,
    rib: Rib,
    peers: HashMap<IpAddr, Peer>,
    /// The kernel worker's queue.
    kernel: Option<mpsc::UnboundedSender<Vec<KernelOp>>>,
    target: Arc<dyn RouteTarget>,
    local: Local,
    from_tx: mpsc::Sender<FromPeer>,
    /// Peers that came from [`Command::SetDynamicPeers`].
    dynamic: HashSet<IpAddr>,
    bfd_events: mpsc::Sender<crate::bfd::BfdEvent>,
    /// The BFD task's peer list, once it runs.
    bfd_peers: Option<tokio::sync::watch::Sender<Vec<IpAddr>>>,
}

impl SpeakerState {
    fn add_peer(&mut self, pc: PeerConfig) {
        let cfg = &self.cfg;
        // Unbounded: the speaker never waits for a peer (the peer bounds its backlog).
        let (tx, rx) = mpsc::unbounded_channel();
        let scfg = SessionConfig {
            local_as: cfg.asn,
            peer_as: Some(pc.asn),
            router_id: cfg.router_id,
            hold_time: cfg.hold_time,
            connect_retry: Duration::from_secs(cfg.connect_retry_seconds.max(1)),
            passive: pc.passive,
            ipv4: true,
            ipv6: true,
            graceful_restart: (cfg.graceful_restart_seconds > 0)
                .then_some(cfg.graceful_restart_seconds),
            restarting: false,
            extended_message: cfg.extended_message,
            idle_hold_max: Duration::from_secs(cfg.idle_hold_max_seconds.max(1)),
            stable_after: Duration::from_secs(cfg.stable_after_seconds),
        };
        tokio::spawn(peer_task(pc.clone(), scfg, rx, self.from_tx.clone()));
        let info = Arc::new(PeerInfo {
            addr: pc.address,
            router_id: match pc.address {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
            },
            ibgp: pc.asn == cfg.asn,
            rr_client: pc.rr_client,
        });
        self.peers.insert(
            pc.address,
            Peer {
                cfg: pc,
                tx,
                info,
                state: State::Idle,
                up: None,
                adj_out: HashMap::new(),
                stale_until: None,
                eor: HashSet::new(),
                bfd: crate::bfd::BfdState::Down,
                last_reset: None,
            },
        );
    }

    async fn remove_peer(&mut self, addr: IpAddr) {
        if let Some(p) = self.peers.remove(&addr) {
            tracing::info!(peer = %addr, "unpeering");
            let _ = p.tx.send(ToPeer::Stop);
            let ch = self.rib.peer_down(&addr);
            self.changes(ch).await;
        }
    }

    /// Tells the BFD task which peers to watch (starting it for the first).
    fn update_bfd(&mut self) {
        let mut wanted: Vec<IpAddr> = self
            .peers
            .values()
            .filter(|p| p.cfg.bfd)
            .map(|p| p.cfg.address)
            .collect();
        wanted.sort();
        match &self.bfd_peers {
            Some(tx) => {
                tx.send_if_modified(|cur| {
                    let changed = *cur != wanted;
                    *cur = wanted;
                    changed
                });
            }
            None if !wanted.is_empty() => {
                let (tx, rx) = tokio::sync::watch::channel(wanted);
                let bcfg = crate::bfd::BfdConfig {
                    interval: Duration::from_millis(self.cfg.bfd_interval_ms.max(10)),
                    detect_mult: self.cfg.bfd_detect_mult.max(1),
                };
                let (local, events) = (self.cfg.listen, self.bfd_events.clone());
                tokio::spawn(async move {
                    if let Err(e) = crate::bfd::run(local, rx, bcfg, events).await {
                        tracing::error!(error = %e, "BFD stopped");
                    }
                });
                self.bfd_peers = Some(tx);
            }
            None => {}
        }
    }

    async fn set_dynamic_peers(&mut self, list: Vec<PeerConfig>, listener: &TcpListener) {
        let wanted: HashMap<IpAddr, PeerConfig> = list
            .into_iter()
            .filter(|p| !self.cfg.peers.iter().any(|s| s.address == p.address))
            .map(|p| (p.address, p))
            .collect();
        let gone: Vec<IpAddr> = self
            .dynamic
            .iter()
            .filter(|a| {
                wanted
                    .get(*a)
                    .is_none_or(|w| self.peers.get(*a).is_none_or(|p| p.cfg != *w))
            })
            .copied()
            .collect();
        for a in gone {
            self.dynamic.remove(&a);
            self.remove_peer(a).await;
        }
        for (a, pc) in wanted {
            if self.dynamic.insert(a) {
                if let Some(pw) = &pc.password {
                    if let Err(e) = crate::md5::set_password(listener, a, pw) {
                        tracing::warn!(peer = %a, error = %e, "cannot set the TCP MD5 key");
                    }
                }
                tracing::info!(peer = %a, asn = pc.asn, "peering");
                self.add_peer(pc);
            }
        }
        self.update_bfd();
    }
    fn status(&self) -> Status {
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| PeerStatus {
                address: p.cfg.address,
                asn: p.cfg.asn,
                state: p.state,
                uptime_seconds: p.up.as_ref().map(|u| u.since.elapsed().as_secs()),
                prefixes_received: self.rib.received(&p.cfg.address),
                prefixes_sent: p.adj_out.len(),
                bfd: p.cfg.bfd.then_some(p.bfd),
                last_reset: p.last_reset.clone(),
            })
            .collect();
        peers.sort_by_key(|p| p.address);
        Status {
            router_id: self.cfg.router_id.to_string(),
            asn: self.cfg.asn,
            loc_rib: self.rib.loc_len(),
            peers,
        }
    }

    async fn on_peer_event(&mut self, ev: FromPeer) {
        match ev {
            FromPeer::State {
                addr,
                state,
                damping,
            } => {
                if let Some(p) = self.peers.get_mut(&addr) {
                    if state == State::Idle && damping != p.last_reset {
                        if let Some(d) = &damping {
                            tracing::info!(peer = %addr, reason = %d.reason, resets = d.resets, next_try_ms = d.idle_hold_ms, "session reset; damping the next attempt");
                        }
                    }
                    p.state = state;
                    p.last_reset = damping;
                }
            }
            FromPeer::Up {
                addr,
                open,
                ctx,
                local,
            } => {
                let Some(p) = self.peers.get_mut(&addr) else {
                    return;
                };
                p.info = Arc::new(PeerInfo {
                    router_id: open.bgp_id,
                    ..(*p.info).clone()
                });
                p.state = State::Established;
                p.eor.clear();
                // RFC 4760 §6: only what both sides advertised (we advertise IPv4 and IPv6).
                let families = open.families().both(Families::BOTH);
                // RFC 4724 §4.2: routes are retained only for the families the peer lists as
                // preserved across its restart; a capability without any (BIRD's default
                // "aware" mode) asks for none.
                let preserved = open.preserved_families().both(families);
                let peer_gr = open
                    .capabilities
                    .iter()
                    .find_map(|c| match c {
                        Capability::GracefulRestart { time, .. } => Some(*time),
                        _ => None,
                    })
                    .filter(|_| !preserved.is_empty());
                p.up = Some(Up {
                    ctx,
                    local,
                    since: Instant::now(),
                    peer_gr,
                    families,
                    preserved,
                    warned_foreign: false,
                });
                p.adj_out.clear();
                tracing::info!(peer = %addr, asn = open.asn(), "session established");
                self.send_full_table(addr).await;
            }
            FromPeer::Down { addr, reason } => {
                let Some(p) = self.peers.get_mut(&addr) else {
                    return;
                };
                tracing::info!(peer = %addr, %reason, "session down");
                let graceful =
                    p.up.as_ref()
                        .and_then(|u| Some((u.peer_gr.filter(|t| *t > 0)?, u.preserved)));
                p.up = None;
                p.adj_out.clear();
                p.state = State::Idle;
                match graceful {
                    Some((t, preserved)) => {
                        // Helper mode: keep its routes of the preserved families (stale) for
                        // its restart time; the others go now.
                        p.stale_until = Some(Instant::now() + Duration::from_secs(u64::from(t)));
                        let ch = self.rib.peer_down_where(&addr, |n| !preserved.carries(n));
                        self.rib.mark_stale(&addr);
                        self.changes(ch).await;
                    }
                    None => {
                        let ch = self.rib.peer_down(&addr);
                        self.changes(ch).await;
                    }
                }
            }
            FromPeer::Refresh { addr } => self.send_full_table(addr).await,
            FromPeer::Update { addr, update } => self.on_update(addr, update).await,
        }
    }

    async fn on_update(&mut self, addr: IpAddr, u: Update) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        if let Some((afi, _)) = u.end_of_rib() {
            p.eor.insert(afi);
            if p.stale_until.take().is_some() {
                let ch = self.rib.sweep_stale(&addr);
                self.changes(ch).await;
            }
            return;
        }
        let carried = p.up.as_ref().map_or(Families::BOTH, |u| u.families);
        let r = adj_in::received(&self.local, &p.info, carried, &u);
        if r.foreign > 0 {
            if let Some(up) = p.up.as_mut().filter(|up| !up.warned_foreign) {
                up.warned_foreign = true;
                tracing::warn!(peer = %addr, prefixes = r.foreign, ?carried, "UPDATE for an address family this session did not negotiate: ignored (logged once per session)");
            }
        }
        let info = p.info.clone();
        let ch = self.rib.apply(&info, r.announced, r.withdrawn);
        self.changes(ch).await;
    }

    async fn expire_stale(&mut self) {
        let now = Instant::now();
        let expired: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.stale_until.is_some_and(|t| t <= now))
            .map(|(a, _)| *a)
            .collect();
        for addr in expired {
            if let Some(p) = self.peers.get_mut(&addr) {
                p.stale_until = None;
            }
            let ch = self.rib.sweep_stale(&addr);
            self.changes(ch).await;
        }
    }

    async fn sweep_leftovers(&mut self, left: &HashSet<IpNetwork>) {
        let Some(k) = &self.kernel else { return };
        // Installed now: every learned best path.
        let installed: HashSet<&IpNetwork> = self
            .rib
            .loc_rib()
            .filter(|(_, p)| p.peer.is_some())
            .map(|(n, _)| n)
            .collect();
        let stale: Vec<KernelOp> = left
            .iter()
            .filter(|n| !installed.contains(n))
            .map(|n| KernelOp::Delete(*n))
            .collect();
        if !stale.is_empty() {
            tracing::info!(routes = stale.len(), "sweeping routes a previous run left");
            let _ = k.send(stale);
        }
    }

    /// Applies Loc-RIB changes to the kernel and every established peer.
    /// Originates exactly `nets` (our blocks): new ones announced, released ones withdrawn.
    async fn set_networks(&mut self, nets: Vec<IpNetwork>) {
        let wanted: HashSet<IpNetwork> = nets.into_iter().collect();
        let gone: Vec<IpNetwork> = self
            .rib
            .originated()
            .filter(|n| !wanted.contains(n))
            .copied()
            .collect();
        let mut ch = Vec::new();
        for n in gone {
            ch.extend(self.rib.withdraw_local(n));
        }
        let have: HashSet<IpNetwork> = self.rib.originated().copied().collect();
        for n in wanted.into_iter().filter(|n| !have.contains(n)) {
            let attrs = Arc::new(Attrs::originated(self.cfg.listen));
            ch.extend(self.rib.originate(n, attrs));
        }
        self.changes(ch).await;
    }

    /// The kernel route for a learned selection: one next hop, or (ECMP) one per equal
    /// path whose target is in the kernel.
    fn kernel_op(&self, prefix: IpNetwork, best: &Path, multipath: &[Path]) -> KernelOp {
        let hops: Vec<(IpAddr, crate::kernel::Target)> = multipath
            .iter()
            .filter(|p| p.peer.is_some())
            .map(|p| {
                (
                    p.attrs.next_hop,
                    self.target.target(prefix, p.attrs.next_hop),
                )
            })
            .filter(|(_, t)| *t != crate::kernel::Target::Skip)
            .collect();
        if hops.len() > 1 {
            return KernelOp::ReplaceMulti(prefix, hops);
        }
        let t = self.target.target(prefix, best.attrs.next_hop);
        KernelOp::Replace(prefix, best.attrs.next_hop, t)
    }

    /// Every learned best route to the kernel again (idempotent replaces).
    fn resync_kernel(&self) {
        let Some(k) = &self.kernel else { return };
        let ops: Vec<KernelOp> = self
            .rib
            .loc_rib()
            .filter(|(_, best)| best.peer.is_some())
            .map(|(prefix, best)| self.kernel_op(*prefix, best, self.rib.multipath(prefix)))
            .collect();
        if !ops.is_empty() {
            let _ = k.send(ops);
        }
    }

    fn resync_prefixes(&self, prefixes: &[IpNetwork]) {
        let Some(k) = &self.kernel else { return };
        let ops: Vec<KernelOp> = prefixes
            .iter()
            .filter_map(|p| Some((p, self.rib.best(p)?)))
            .filter(|(_, best)| best.peer.is_some())
            .map(|(prefix, best)| self.kernel_op(*prefix, best, self.rib.multipath(prefix)))
            .collect();
        if !ops.is_empty() {
            let _ = k.send(ops);
        }
    }

    async fn changes(&mut self, changes: Vec<BestChange>) {
        if changes.is_empty() {
            return;
        }
        if let Some(k) = &self.kernel {
            let mut ops = Vec::with_capacity(changes.len());
            for c in &changes {
                match c {
                    BestChange::Best {
                        prefix,
                        best,
                        multipath,
                    } if best.peer.is_some() => {
                        ops.push(self.kernel_op(*prefix, best, multipath));
                    }
                    // Our own prefix became best, or nothing is left: remove a learned
                    // route if there was one (deleting one that is not there is a no-op:
                    // the kernel matches Tessera's protocol).
                    BestChange::Best { prefix, .. } | BestChange::Gone { prefix } => {
                        ops.push(KernelOp::Delete(*prefix));
                    }
                }
            }
            if !ops.is_empty() {
                let _ = k.send(ops);
            }
        }
        let addrs: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.up.is_some())
            .map(|(a, _)| *a)
            .collect();
        let prefixes: Vec<IpNetwork> = changes
            .iter()
            .map(|c| match c {
                BestChange::Best { prefix, .. } | BestChange::Gone { prefix } => *prefix,
            })
            .collect();
        for addr in addrs {
            self.send_prefixes(addr, &prefixes, false).await;
        }
    }

    async fn send_full_table(&mut self, addr: IpAddr) {
        let all: Vec<IpNetwork> = self.rib.loc_rib().map(|(k, _)| *k).collect();
        self.send_prefixes(addr, &all, true).await;
    }

    /// Brings the peer's Adj-RIB-Out up to date for `prefixes`, in batched UPDATEs.
    async fn send_prefixes(&mut self, addr: IpAddr, prefixes: &[IpNetwork], end_of_rib: bool) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let Some(up) = &p.up else { return };
        let view = SessionView {
            info: &p.info,
            asn: p.cfg.asn,
            families: up.families,
            ctx: up.ctx,
            local: up.local,
            next_hop_v6: self.cfg.next_hop_v6,
        };
        let out = adj_out::updates(
            &self.local,
            &self.rib,
            &p.adj_out,
            &view,
            prefixes,
            end_of_rib,
        );
        if let Some((_, e)) = out.refused.first() {
            tracing::error!(peer = %addr, prefixes = out.refused.len(), error = %e, "cannot announce these prefixes to this peer");
        }
        for (prefix, a) in out.adj_out {
            match a {
                Some(a) => p.adj_out.insert(prefix, a),
                None => p.adj_out.remove(&prefix),
            };
        }
        if !out.messages.is_empty() {
            let _ = p.tx.send(ToPeer::Send(out.messages));
        }
    }
}

/// The largest backlog of encoded messages a peer may leave unread before it is dropped.
const MAX_BACKLOG: usize = 64 << 20;

/// The writing half of a peer's connection, and what waits to be written.
struct Writer {
    write: OwnedWriteHalf,
    /// Encoded messages not yet taken by the socket.
    backlog: BytesMut,
    /// When the socket last took bytes (or the backlog last became non-empty).
    progress: Instant,
}

/// A new connection's halves: reading and writing go on independently.
fn split(s: TcpStream) -> (OwnedReadHalf, Writer) {
    let _ = s.set_nodelay(true);
    let (read, write) = s.into_split();
    let w = Writer {
        write,
        backlog: BytesMut::new(),
        progress: Instant::now(),
    };
    (read, w)
}

impl Writer {
    fn queue(&mut self, bytes: &[u8]) {
        if self.backlog.is_empty() {
            self.progress = Instant::now();
        }
        self.backlog.extend_from_slice(bytes);
    }

    /// Best effort before closing: what is queued (a NOTIFICATION, say), for a short while.
    async fn flush_briefly(&mut self) {
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            self.write.write_all(&self.backlog),
        )
        .await;
        self.backlog.clear();
    }
}

/// One peer: its TCP connection, timers and FSM. Reading, writing and the timers never wait
/// for one another: a peer that stops reading our messages cannot stop us from hearing its
/// KEEPALIVEs or from noticing that it took nothing for a hold time (then it is dropped),
/// and the speaker hands messages over without waiting (an unbounded queue here, bounded in
/// bytes by [`MAX_BACKLOG`]).
async fn peer_task(
    pc: PeerConfig,
    scfg: SessionConfig,
    mut rx: mpsc::UnboundedReceiver<ToPeer>,
    tx: mpsc::Sender<FromPeer>,
) {
    let addr = pc.address;
    let local_id = scfg.router_id;
    let mut fsm = Session::new(scfg);
    let origin = Instant::now();
    let now = || origin.elapsed();
    let mut reader: Option<OwnedReadHalf> = None;
    let mut link: Option<Writer> = None;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut connecting: Option<tokio::task::JoinHandle<std::io::Result<TcpStream>>> = None;
    let mut pending = fsm.handle(now(), Event::Start);
    let mut last_state = fsm.state();
    loop {
        // Carry out what the FSM asked for; it may produce more events.
        while !pending.is_empty() {
            let next = Vec::new();
            for a in std::mem::take(&mut pending) {
                match a {
                    Action::Connect => {
                        let (peer, local) = (SocketAddr::new(addr, pc.port), pc.local_address);
                        connecting = Some(tokio::spawn(connect(peer, local, pc.password.clone())));
                    }
                    Action::Disconnect => {
                        reader = None;
                        if let Some(mut l) = link.take() {
                            l.flush_briefly().await;
                        }
                        buf.clear();
                        if let Some(c) = connecting.take() {
                            c.abort();
                        }
                    }
                    Action::Send(m) => {
                        if let Some(l) = link.as_mut() {
                            l.queue(&packet::encode(&m, fsm.ctx()));
                        }
                    }
                    Action::Up { peer, ctx } => {
                        let local = link
                            .as_ref()
                            .and_then(|l| l.write.local_addr().ok())
                            .map(|a| a.ip());
                        let local = local.or(pc.local_address).unwrap_or(addr);
                        let _ = tx
                            .send(FromPeer::Up {
                                addr,
                                open: peer,
                                ctx,
                                local,
                            })
                            .await;
                    }
                    Action::Down { reason } => {
                        let _ = tx.send(FromPeer::Down { addr, reason }).await;
                    }
                    Action::Deliver(update) => {
                        let _ = tx.send(FromPeer::Update { addr, update }).await;
                    }
                    Action::Refresh { .. } => {
                        let _ = tx.send(FromPeer::Refresh { addr }).await;
                    }
                }
            }
            pending = next;
        }
        if fsm.state() != last_state {
            last_state = fsm.state();
            tracing::debug!(peer = %addr, state = ?last_state, "FSM state");
            let _ = tx
                .send(FromPeer::State {
                    addr,
                    state: last_state,
                    damping: fsm.damping(),
                })
                .await;
        }
        let deadline = fsm.next_deadline().map(|d| origin + d);
        // A peer that takes nothing of what we send for a hold time is gone for us.
        let write_limit = match fsm.hold_time() {
            d if d.is_zero() => Duration::from_secs(90),
            d => d,
        };
        let stalled_at = link
            .as_ref()
            .filter(|l| !l.backlog.is_empty())
            .map(|l| l.progress + write_limit);
        tokio::select! {
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                pending = fsm.poll_timers(now());
            }
            _ = async { match stalled_at { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                let queued = link.as_ref().map_or(0, |l| l.backlog.len());
                tracing::warn!(peer = %addr, queued, limit = ?write_limit, "the peer took none of our messages for its hold time: dropping the session");
                if let Some(l) = link.as_mut() {
                    l.backlog.clear();
                }
                pending = fsm.handle(now(), Event::TcpFailed);
            }
            r = async {
                match link.as_mut().filter(|l| !l.backlog.is_empty()) {
                    Some(l) => l.write.write(&l.backlog).await,
                    None => std::future::pending().await,
                }
            } => {
                match (r, link.as_mut()) {
                    (Ok(n), Some(l)) if n > 0 => {
                        l.backlog.advance(n);
                        l.progress = Instant::now();
                    }
                    _ => pending = fsm.handle(now(), Event::TcpFailed),
                }
            }
            r = async { match connecting.as_mut() { Some(h) => h.await, None => std::future::pending().await } } => {
                connecting = None;
                match r {
                    // The peer's connection won meanwhile: ours is not needed.
                    Ok(Ok(_)) if link.is_some() => {}
                    Ok(Ok(s)) => {
                        let (r, w) = split(s);
                        (reader, link) = (Some(r), Some(w));
                        pending = fsm.handle(now(), Event::TcpConnected);
                    }
                    _ => pending = fsm.handle(now(), Event::TcpFailed),
                }
            }
            r = async { match reader.as_mut() { Some(r) => r.read_buf(&mut buf).await, None => std::future::pending().await } } => {
                match r {
                    Ok(0) | Err(_) => pending = fsm.handle(now(), Event::TcpFailed),
                    Ok(_) => pending = drain_messages(&mut fsm, &mut buf, now()),
                }
            }
            m = rx.recv() => match m {
                None => return,
                Some(ToPeer::BfdDown) => pending = fsm.handle(now(), Event::TcpFailed),
                Some(ToPeer::Stop) => {
                    for a in fsm.handle(now(), Event::Stop) {
                        if let (Action::Send(m), Some(l)) = (&a, link.as_mut()) {
                            l.queue(&packet::encode(m, fsm.ctx()));
                        }
                    }
                    if let Some(mut l) = link.take() {
                        l.flush_briefly().await;
                    }
                    drop(reader);
                    return;
                }
                Some(ToPeer::Send(msgs)) => {
                    if fsm.state() == State::Established {
                        if let Some(l) = link.as_mut() {
                            let mut oversize = None;
                            for m in &msgs {
                                match packet::encode_checked(m, fsm.ctx()) {
                                    Ok(b) => l.queue(&b),
                                    Err(e) => oversize = Some(e),
                                }
                            }
                            if let Some(e) = oversize {
                                // A packing bug, never a message on the wire: start the
                                // session over (the peer gets a consistent table again).
                                tracing::error!(peer = %addr, error = %e, "refused to send an oversize message; resetting the session");
                                pending = fsm.handle(now(), Event::TcpFailed);
                            } else if l.backlog.len() > MAX_BACKLOG {
                                tracing::warn!(peer = %addr, queued = l.backlog.len(), "the peer leaves too much unread: dropping the session");
                                l.backlog.clear();
                                pending = fsm.handle(now(), Event::TcpFailed);
                            }
                        }
                    }
                }
                Some(ToPeer::Incoming(s)) => {
                    // A peer connecting while we wait to restart: start now (RFC 4271's
                    // AutomaticStart with passive TCP establishment).
                    if fsm.state() == State::Idle {
                        let start = fsm.handle(now(), Event::Start);
                        pending.extend(start.into_iter().filter(|a| *a != Action::Connect));
                    }
                    // Collision handling (RFC 4271 §6.8), simplified: without a connection of
                    // our own in progress, take theirs; with one, the higher identifier's wins.
                    let ours_in_progress = matches!(fsm.state(), State::OpenSent | State::OpenConfirm | State::Established);
                    let remote_id = fsm.peer_open().map(|o| o.bgp_id).or(match addr { IpAddr::V4(a) => Some(a), _ => None });
                    let keep_ours = fsm.state() == State::Established
                        || (ours_in_progress && remote_id.is_some_and(|r| keep_our_connection(local_id, r)));
                    if keep_ours {
                        drop(s);
                    } else {
                        if ours_in_progress {
                            if let Some(mut l) = link.take() {
                                let cease = Message::Notification(packet::Notification { code: packet::err::CEASE, subcode: packet::err::COLLISION_RESOLUTION, data: vec![] });
                                l.queue(&packet::encode(&cease, fsm.ctx()));
                                l.flush_briefly().await;
                            }
                            fsm = Session::new(fsm.cfg.clone());
                            fsm.handle(now(), Event::Start);
                        }
                        if let Some(c) = connecting.take() {
                            c.abort();
                        }
                        let (r, w) = split(s);
                        (reader, link) = (Some(r), Some(w));
                        buf.clear();
                        pending.extend(fsm.handle(now(), Event::TcpConnected));
                    }
                }
            }
        }
    }
}

fn drain_messages(fsm: &mut Session, buf: &mut BytesMut, now: Duration) -> Vec<Action> {
    let mut out = Vec::new();
    loop {
        match packet::frame_within(buf, fsm.ctx().max_len()) {
            Ok(Some(len)) => {
                let msg = buf.split_to(len);
                let ev = match packet::decode(&msg, fsm.ctx()) {
                    Ok(m) => Event::Received(m),
                    Err(e) => Event::Malformed(e),
                };
                let stop = matches!(ev, Event::Malformed(_));
                out.extend(fsm.handle(now, ev));
                if stop || fsm.state() == State::Idle {
                    buf.clear();
                    return out;
                }
            }
            Ok(None) => return out,
            Err(e) => {
                buf.clear();
                out.extend(fsm.handle(now, Event::Malformed(e)));
                return out;
            }
        }
    }
}

async fn connect(
    peer: SocketAddr,
    local: Option<IpAddr>,
    password: Option<String>,
) -> std::io::Result<TcpStream> {
    let socket = if peer.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(pw) = &password {
        crate::md5::set_password(&socket, peer.ip(), pw)?;
    }
    if let Some(l) = local {
        socket.bind(SocketAddr::new(l, 0))?;
    }
    tokio::time::timeout(Duration::from_secs(5), socket.connect(peer))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn serve_status(path: String, status: Arc<Mutex<Status>>) {
    let _ = std::fs::remove_file(&path);
    let Ok(listener) = tokio::net::UnixListener::bind(&path) else {
        tracing::warn!(%path, "cannot listen for status queries");
        return;
    };
    while let Ok((mut s, _)) = listener.accept().await {
        let body = serde_json::to_vec(&*status.lock().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_default();
        let _ = s.write_all(&body).await;
    }
}

/// `tessera-routed status`: the JSON status of a running speaker.
pub async fn query_status(path: &str) -> std::io::Result<String> {
    let mut s = tokio::net::UnixStream::connect(path).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
