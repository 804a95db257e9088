//! The speaker's policy without I/O: the RIB, every peer's Adj-RIB-Out and session facts,
//! the graceful-restart helper's deadlines, the sweep of routes a previous run left, and the
//! peer set. [`SpeakerCore::handle`] takes one [`Input`] with the current time and returns the
//! [`Output`]s the shell (speaker.rs) carries out: start or stop a session task, send
//! messages, program the kernel, tell BFD what to watch. Time is a `Duration` since any
//! fixed origin, as in the FSM.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;

use crate::adj_in;
use crate::adj_out::{self, SessionView};
use crate::bfd::BfdState;
use crate::config::{Config, PeerConfig};
use crate::fsm::{Damping, SessionConfig, State};
use crate::kernel::{KernelOp, RouteTarget, Target};
use crate::packet::{Capability, Ctx, Families, Message, Open, Update};
use crate::rib::{is_link_local, Attrs, BestChange, Local, Path, PeerInfo, Rib};
use crate::speaker::{PeerStatus, Status};

/// What happened, for the core to decide on.
#[derive(Debug)]
pub enum Input {
    /// A session reached Established: the peer's OPEN, the negotiated context, our address
    /// on the connection and, for a link-local session, the interface's index.
    SessionUp {
        peer: IpAddr,
        open: Open,
        ctx: Ctx,
        local: IpAddr,
        interface: Option<u32>,
    },
    SessionDown {
        peer: IpAddr,
        reason: String,
    },
    /// A session's FSM changed state (and why it last reset).
    SessionState {
        peer: IpAddr,
        state: State,
        damping: Option<Damping>,
    },
    Update {
        peer: IpAddr,
        update: Update,
    },
    /// The peer asked for our routes again (ROUTE-REFRESH).
    RefreshRequested {
        peer: IpAddr,
    },
    Bfd {
        peer: IpAddr,
        state: BfdState,
    },
    /// The dynamic peers (the mesh from the datastore); the configuration's peers stay.
    SetDynamicPeers(Vec<PeerConfig>),
    /// The prefixes this node originates, replacing the previous set.
    SetNetworks(Vec<IpNetwork>),
    /// Every learned best route to the kernel again.
    Resync,
    /// [`Input::Resync`] for these prefixes only.
    ResyncPrefixes(Vec<IpNetwork>),
    /// Time passed: graceful-restart deadlines and the leftover sweep are due.
    Tick,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Run a session with this peer (its MD5 key goes on the listener too).
    StartSession {
        peer: PeerConfig,
        session: SessionConfig,
    },
    /// Cease the session and end its task: the peer is no longer configured.
    StopSession(IpAddr),
    /// The forwarding path to the peer is gone (BFD): drop the session now.
    DropSession(IpAddr),
    Send {
        peer: IpAddr,
        messages: Vec<Message>,
    },
    Kernel(Vec<KernelOp>),
    /// The peers BFD watches (sorted).
    WatchBfd(Vec<IpAddr>),
}

/// An Established session's facts.
struct Up {
    ctx: Ctx,
    local: IpAddr,
    since: Duration,
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
    info: Arc<PeerInfo>,
    state: State,
    up: Option<Up>,
    /// Adj-RIB-Out: what we last announced.
    adj_out: HashMap<IpNetwork, Arc<Attrs>>,
    /// Restart deadline while the peer restarts gracefully (its routes are stale).
    stale_until: Option<Duration>,
    /// End-of-RIB received since the session came up.
    eor: HashSet<u16>,
    bfd: BfdState,
    last_reset: Option<Damping>,
    /// The interface of its link-local session: where its link-local next hops are.
    interface: Option<u32>,
}

/// Routes a previous run left in the kernel, swept once every peer has sent End-of-RIB or
/// at the deadline, whichever comes first.
struct Leftovers {
    routes: HashSet<IpNetwork>,
    deadline: Duration,
}

pub struct SpeakerCore {
    cfg: Config,
    local: Local,
    rib: Rib,
    peers: HashMap<IpAddr, Peer>,
    /// Peers that came from [`Input::SetDynamicPeers`].
    dynamic: HashSet<IpAddr>,
    /// Whether routes go to a kernel at all.
    kernel: bool,
    target: Arc<dyn RouteTarget>,
    leftovers: Option<Leftovers>,
    watched_bfd: Vec<IpAddr>,
}

impl SpeakerCore {
    /// A speaker for `cfg`; `kernel` says whether learned routes are installed (through
    /// `target`'s decision per route).
    pub fn new(cfg: Config, kernel: bool, target: Arc<dyn RouteTarget>) -> Self {
        let local = Local {
            asn: cfg.asn,
            router_id: cfg.router_id,
            cluster_id: cfg.cluster_id,
        };
        SpeakerCore {
            rib: Rib::new(cfg.ecmp),
            cfg,
            local,
            peers: HashMap::new(),
            dynamic: HashSet::new(),
            kernel,
            target,
            leftovers: None,
            watched_bfd: Vec::new(),
        }
    }

    /// The configuration's peers and networks. `leftovers`: the routes of our protocol a
    /// previous run left in the kernel (kept until the peers have told us theirs).
    pub fn start(&mut self, now: Duration, leftovers: Vec<IpNetwork>) -> Vec<Output> {
        let mut out = Vec::new();
        if self.kernel && !leftovers.is_empty() {
            let wait = u64::from(self.cfg.graceful_restart_seconds.max(30));
            self.leftovers = Some(Leftovers {
                routes: leftovers.into_iter().collect(),
                deadline: now + Duration::from_secs(wait),
            });
        }
        for pc in self.cfg.peers.clone() {
            out.push(self.add_peer(pc));
        }
        self.watch_bfd(&mut out);
        let networks = self.cfg.networks.clone();
        self.set_networks(networks, &mut out);
        out
    }

    pub fn handle(&mut self, now: Duration, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::SessionState {
                peer,
                state,
                damping,
            } => self.on_state(peer, state, damping),
            Input::SessionUp {
                peer,
                open,
                ctx,
                local,
                interface,
            } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.interface = interface;
                }
                self.on_up(now, peer, open, ctx, local, &mut out)
            }
            Input::SessionDown { peer, reason } => self.on_down(now, peer, &reason, &mut out),
            Input::Update { peer, update } => self.on_update(peer, update, &mut out),
            Input::RefreshRequested { peer } => self.send_full_table(peer, &mut out),
            Input::Bfd { peer, state } => self.on_bfd(peer, state, &mut out),
            Input::SetDynamicPeers(list) => self.set_dynamic_peers(list, &mut out),
            Input::SetNetworks(nets) => self.set_networks(nets, &mut out),
            Input::Resync => {
                let all: Vec<IpNetwork> = self.rib.loc_rib().map(|(n, _)| n).collect();
                self.resync(&all, &mut out);
            }
            Input::ResyncPrefixes(prefixes) => self.resync(&prefixes, &mut out),
            Input::Tick => {
                self.expire_stale(now, &mut out);
                self.sweep_leftovers(now, &mut out);
            }
        }
        out
    }

    /// A snapshot of the sessions, for `tessera-routed status`, health and metrics.
    pub fn status(&self, now: Duration) -> Status {
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| PeerStatus {
                address: p.cfg.address,
                asn: p.cfg.asn,
                state: p.state,
                uptime_seconds: p.up.as_ref().map(|u| now.saturating_sub(u.since).as_secs()),
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

    /// The session settings for a peer: ours, with the peer's AS and passivity.
    fn session_config(&self, pc: &PeerConfig) -> SessionConfig {
        let cfg = &self.cfg;
        SessionConfig {
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
        }
    }

    fn add_peer(&mut self, pc: PeerConfig) -> Output {
        let info = Arc::new(PeerInfo {
            addr: pc.address,
            // Until the OPEN tells us (an IPv6 peer's identifier is not its address).
            router_id: match pc.address {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
            },
            ibgp: pc.asn == self.cfg.asn,
            rr_client: pc.rr_client,
        });
        let start = Output::StartSession {
            session: self.session_config(&pc),
            peer: pc.clone(),
        };
        self.peers.insert(
            pc.address,
            Peer {
                cfg: pc,
                info,
                state: State::Idle,
                up: None,
                adj_out: HashMap::new(),
                stale_until: None,
                eor: HashSet::new(),
                bfd: BfdState::Down,
                last_reset: None,
                interface: None,
            },
        );
        start
    }

    fn remove_peer(&mut self, addr: IpAddr, out: &mut Vec<Output>) {
        if self.peers.remove(&addr).is_some() {
            tracing::info!(peer = %addr, "unpeering");
            out.push(Output::StopSession(addr));
            let ch = self.rib.peer_down(&addr);
            self.changes(ch, out);
        }
    }

    fn watch_bfd(&mut self, out: &mut Vec<Output>) {
        let mut wanted: Vec<IpAddr> = self
            .peers
            .values()
            .filter(|p| p.cfg.bfd)
            .map(|p| p.cfg.address)
            .collect();
        wanted.sort();
        if wanted != self.watched_bfd {
            self.watched_bfd = wanted.clone();
            out.push(Output::WatchBfd(wanted));
        }
    }

    fn set_dynamic_peers(&mut self, list: Vec<PeerConfig>, out: &mut Vec<Output>) {
        let wanted: HashMap<IpAddr, PeerConfig> = list
            .into_iter()
            .filter(|p| !self.cfg.peers.iter().any(|s| s.address == p.address))
            .map(|p| (p.address, p))
            .collect();
        // Gone, or changed (a changed peer starts over with its new settings).
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
            self.remove_peer(a, out);
        }
        let mut added: Vec<PeerConfig> = wanted
            .into_values()
            .filter(|pc| !self.dynamic.contains(&pc.address))
            .collect();
        added.sort_by_key(|pc| pc.address);
        for pc in added {
            tracing::info!(peer = %pc.address, asn = pc.asn, "peering");
            self.dynamic.insert(pc.address);
            let start = self.add_peer(pc);
            out.push(start);
        }
        self.watch_bfd(out);
    }

    fn on_state(&mut self, addr: IpAddr, state: State, damping: Option<Damping>) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        if state == State::Idle && damping != p.last_reset {
            if let Some(d) = &damping {
                tracing::info!(peer = %addr, reason = %d.reason, resets = d.resets, next_try_ms = d.idle_hold_ms, "session reset; damping the next attempt");
            }
        }
        p.state = state;
        p.last_reset = damping;
    }

    fn on_up(
        &mut self,
        now: Duration,
        addr: IpAddr,
        open: Open,
        ctx: Ctx,
        local: IpAddr,
        out: &mut Vec<Output>,
    ) {
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
        // preserved across its restart; a capability without any (BIRD's default "aware"
        // mode) asks for none.
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
            since: now,
            peer_gr,
            families,
            preserved,
            warned_foreign: false,
        });
        p.adj_out.clear();
        tracing::info!(peer = %addr, asn = open.asn(), "session established");
        self.send_full_table(addr, out);
    }

    fn on_down(&mut self, now: Duration, addr: IpAddr, reason: &str, out: &mut Vec<Output>) {
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
        let ch = match graceful {
            Some((time, preserved)) => {
                // Helper mode: keep its routes of the preserved families (stale) for its
                // restart time; the others go now.
                p.stale_until = Some(now + Duration::from_secs(u64::from(time)));
                let ch = self.rib.peer_down_where(&addr, |n| !preserved.carries(n));
                self.rib.mark_stale(&addr);
                ch
            }
            None => self.rib.peer_down(&addr),
        };
        self.changes(ch, out);
    }

    fn on_bfd(&mut self, addr: IpAddr, state: BfdState, out: &mut Vec<Output>) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        tracing::info!(peer = %addr, ?state, "BFD");
        p.bfd = state;
        if state == BfdState::Down {
            if let Some(up) = p.up.as_mut() {
                // The forwarding path is gone: no graceful-restart grace either (RFC 5882
                // §4.3.1; the peer's BFD is not control-plane independent).
                up.peer_gr = None;
                out.push(Output::DropSession(addr));
            }
        }
    }

    fn on_update(&mut self, addr: IpAddr, u: Update, out: &mut Vec<Output>) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        if let Some((afi, _)) = u.end_of_rib() {
            p.eor.insert(afi);
            self.rib.end_of_rib();
            if p.stale_until.take().is_some() {
                let ch = self.rib.sweep_stale(&addr);
                self.changes(ch, out);
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
        self.changes(ch, out);
    }

    /// The graceful-restart helper's deadline passed: the peer's stale routes go.
    fn expire_stale(&mut self, now: Duration, out: &mut Vec<Output>) {
        let mut expired: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.stale_until.is_some_and(|t| t <= now))
            .map(|(a, _)| *a)
            .collect();
        expired.sort();
        for addr in expired {
            if let Some(p) = self.peers.get_mut(&addr) {
                tracing::info!(peer = %addr, "the peer did not come back within its restart time: its stale routes go");
                p.stale_until = None;
            }
            let ch = self.rib.sweep_stale(&addr);
            self.changes(ch, out);
        }
    }

    fn sweep_leftovers(&mut self, now: Duration, out: &mut Vec<Output>) {
        let Some(left) = &self.leftovers else { return };
        let all_eor = self
            .peers
            .values()
            .all(|p| p.up.is_some() && !p.eor.is_empty());
        if !all_eor && now < left.deadline {
            return;
        }
        let installed: HashSet<IpNetwork> = self
            .rib
            .loc_rib()
            .filter(|(_, p)| p.peer.is_some())
            .map(|(n, _)| n)
            .collect();
        let mut stale: Vec<IpNetwork> = left
            .routes
            .iter()
            .filter(|n| !installed.contains(n))
            .copied()
            .collect();
        self.leftovers = None;
        if !stale.is_empty() {
            stale.sort();
            tracing::info!(routes = stale.len(), "sweeping routes a previous run left");
            out.push(Output::Kernel(
                stale.into_iter().map(KernelOp::Delete).collect(),
            ));
        }
    }

    /// Originates exactly `nets` (our blocks): new ones announced, released ones withdrawn.
    fn set_networks(&mut self, nets: Vec<IpNetwork>, out: &mut Vec<Output>) {
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
        let mut new: Vec<IpNetwork> = wanted.into_iter().filter(|n| !have.contains(n)).collect();
        new.sort();
        for n in new {
            let attrs = Arc::new(Attrs::originated(self.cfg.listen));
            ch.extend(self.rib.originate(n, attrs));
        }
        self.changes(ch, out);
    }

    /// The kernel route for a learned selection: one next hop, or (ECMP) one per equal
    /// path whose target is in the kernel.
    fn kernel_op(&self, prefix: IpNetwork, best: &Path, multipath: &[Path]) -> KernelOp {
        let hops: Vec<(IpAddr, Target)> = multipath
            .iter()
            .filter(|p| p.peer.is_some())
            .map(|p| (p.attrs.next_hop, self.hop_target(prefix, p)))
            .filter(|(_, t)| *t != Target::Skip)
            .collect();
        if hops.len() > 1 {
            return KernelOp::ReplaceMulti(prefix, hops);
        }
        KernelOp::Replace(prefix, best.attrs.next_hop, self.hop_target(prefix, best))
    }

    /// Where a path's next hop is: the route target's decision, except that a link-local
    /// next hop is on the interface of the session it came from.
    fn hop_target(&self, prefix: IpNetwork, path: &Path) -> Target {
        let target = self.target.target(prefix, path.attrs.next_hop);
        if target != Target::Native || !is_link_local(&path.attrs.next_hop) {
            return target;
        }
        let interface = path
            .peer
            .as_ref()
            .and_then(|a| self.peers.get(&a.addr))
            .and_then(|p| p.interface);
        match interface {
            Some(ifindex) => Target::Onlink(ifindex),
            None => {
                tracing::warn!(%prefix, next_hop = %path.attrs.next_hop, "a link-local next hop from a session that is not link-local: not installed");
                Target::Skip
            }
        }
    }

    /// These prefixes' learned best routes to the kernel again (idempotent replaces),
    /// asking the route target anew.
    fn resync(&self, prefixes: &[IpNetwork], out: &mut Vec<Output>) {
        if !self.kernel {
            return;
        }
        let ops: Vec<KernelOp> = prefixes
            .iter()
            .filter_map(|p| Some((p, self.rib.best(p)?)))
            .filter(|(_, best)| best.peer.is_some())
            .map(|(prefix, best)| self.kernel_op(*prefix, best, self.rib.multipath(prefix)))
            .collect();
        if !ops.is_empty() {
            out.push(Output::Kernel(ops));
        }
    }

    /// Loc-RIB changes to the kernel and to every established peer.
    fn changes(&mut self, changes: Vec<BestChange>, out: &mut Vec<Output>) {
        if changes.is_empty() {
            return;
        }
        if self.kernel {
            let ops: Vec<KernelOp> = changes
                .iter()
                .map(|c| match c {
                    BestChange::Best {
                        prefix,
                        best,
                        multipath,
                    } if best.peer.is_some() => self.kernel_op(*prefix, best, multipath),
                    // Our own prefix became best, or nothing is left: remove a learned route
                    // if there was one (deleting one that is not there is a no-op: the
                    // kernel matches Tessera's protocol).
                    BestChange::Best { prefix, .. } | BestChange::Gone { prefix } => {
                        KernelOp::Delete(*prefix)
                    }
                })
                .collect();
            out.push(Output::Kernel(ops));
        }
        let prefixes: Vec<IpNetwork> = changes
            .iter()
            .map(|c| match c {
                BestChange::Best { prefix, .. } | BestChange::Gone { prefix } => *prefix,
            })
            .collect();
        let mut established: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.up.is_some())
            .map(|(a, _)| *a)
            .collect();
        established.sort();
        for addr in established {
            self.send_prefixes(addr, &prefixes, false, out);
        }
    }

    fn send_full_table(&mut self, addr: IpAddr, out: &mut Vec<Output>) {
        let all: Vec<IpNetwork> = self.rib.loc_rib().map(|(k, _)| k).collect();
        self.send_prefixes(addr, &all, true, out);
    }

    /// Brings the peer's Adj-RIB-Out up to date for `prefixes`.
    fn send_prefixes(
        &mut self,
        addr: IpAddr,
        prefixes: &[IpNetwork],
        end_of_rib: bool,
        out: &mut Vec<Output>,
    ) {
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
        let sent = adj_out::updates(
            &self.local,
            &self.rib,
            &p.adj_out,
            &view,
            prefixes,
            end_of_rib,
        );
        if let Some((_, e)) = sent.refused.first() {
            tracing::error!(peer = %addr, prefixes = sent.refused.len(), error = %e, "cannot announce these prefixes to this peer");
        }
        for (prefix, a) in sent.adj_out {
            match a {
                Some(a) => p.adj_out.insert(prefix, a),
                None => p.adj_out.remove(&prefix),
            };
        }
        if !sent.messages.is_empty() {
            out.push(Output::Send {
                peer: addr,
                messages: sent.messages,
            });
        }
    }
}

#[cfg(test)]
mod tests;
