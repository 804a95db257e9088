//! The speaker's shell: sockets, timers and tasks around the sans-IO [`SpeakerCore`] (RIB,
//! Adj-RIB-Out, policy) and one [`Session`] FSM per peer. One task per peer (its socket,
//! timers and FSM), the speaker task feeding the core, the kernel worker, BFD and the status
//! socket. This is the only module that spawns.

use std::collections::HashMap;
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

use crate::config::{Config, PeerConfig};
use crate::fsm::{Action, Damping, Event, Incoming, Session, SessionConfig, State};
use crate::kernel::{Kernel, KernelOp, RouteTarget};
use crate::packet::{self, Message};
use crate::speaker_core::{Input, Output, SpeakerCore};

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
    let (from_peers, mut from_rx) = mpsc::channel::<Input>(32);
    let kernel = kernel
        .map(|h| Kernel::new(h, cfg.kernel.protocol, cfg.kernel.table))
        .filter(|_| cfg.kernel.install);
    // Routes a previous run left: the core sweeps them once the peers have told us theirs.
    let leftovers = match &kernel {
        Some(k) => k.ours().await.unwrap_or_default(),
        None => Vec::new(),
    };
    let mut core = SpeakerCore::new(cfg.clone(), kernel.is_some(), target);
    let kernel = kernel.map(|k| {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::task::spawn_blocking(move || k.blocking_worker(rx));
        tx
    });
    let (bfd_events, mut bfd_rx) = mpsc::channel::<crate::bfd::BfdEvent>(64);
    let mut shell = Shell {
        cfg: cfg.clone(),
        sessions: HashMap::new(),
        from_peers,
        kernel,
        bfd_events,
        bfd_peers: None,
    };
    let origin = Instant::now();
    let now = || origin.elapsed();
    shell.carry_out(core.start(now(), leftovers), &listener);
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let input = tokio::select! {
            _ = &mut shutdown => break,
            Ok((stream, remote)) = listener.accept() => {
                match shell.sessions.get(&remote.ip()) {
                    Some(tx) => { let _ = tx.send(ToPeer::Incoming(stream)); }
                    None => tracing::warn!(%remote, "connection from an unknown peer refused"),
                }
                continue;
            }
            Some(input) = from_rx.recv() => input,
            Some(ev) = bfd_rx.recv() => Input::Bfd { peer: ev.peer, state: ev.state },
            Some(cmd) = control.recv() => match cmd {
                Command::SetDynamicPeers(list) => Input::SetDynamicPeers(list),
                Command::SetNetworks(nets) => Input::SetNetworks(nets),
                Command::Resync => Input::Resync,
                Command::ResyncPrefixes(prefixes) => Input::ResyncPrefixes(prefixes),
                Command::Status(reply) => {
                    let _ = reply.send(core.status(now()));
                    continue;
                }
            },
            _ = tick.tick() => Input::Tick,
        };
        let outputs = core.handle(now(), input);
        shell.carry_out(outputs, &listener);
        *status.lock().unwrap_or_else(|p| p.into_inner()) = core.status(now());
    }
    // Dropping the sessions' queues ends their tasks and closes the connections without a
    // NOTIFICATION: peers that help graceful restart keep our routes while we are away.
    Ok(())
}

/// What carries out the core's decisions: the session tasks, the kernel worker, BFD.
struct Shell {
    cfg: Config,
    /// Each peer's session task.
    sessions: HashMap<IpAddr, mpsc::UnboundedSender<ToPeer>>,
    from_peers: mpsc::Sender<Input>,
    /// The kernel worker's queue.
    kernel: Option<mpsc::UnboundedSender<Vec<KernelOp>>>,
    bfd_events: mpsc::Sender<crate::bfd::BfdEvent>,
    /// The BFD task's peer list, once it runs.
    bfd_peers: Option<tokio::sync::watch::Sender<Vec<IpAddr>>>,
}

impl Shell {
    /// Never waits: sessions and the kernel worker take work through unbounded queues (a
    /// session bounds its own backlog), so no peer can hold the speaker up.
    fn carry_out(&mut self, outputs: Vec<Output>, listener: &TcpListener) {
        for o in outputs {
            match o {
                Output::StartSession { peer, session } => {
                    if let Some(pw) = &peer.password {
                        if let Err(e) = crate::md5::set_password(listener, peer.address, pw) {
                            tracing::warn!(peer = %peer.address, error = %e, "cannot set the TCP MD5 key");
                        }
                    }
                    let (tx, rx) = mpsc::unbounded_channel();
                    self.sessions.insert(peer.address, tx);
                    tokio::spawn(peer_task(peer, session, rx, self.from_peers.clone()));
                }
                Output::StopSession(addr) => {
                    if let Some(tx) = self.sessions.remove(&addr) {
                        let _ = tx.send(ToPeer::Stop);
                    }
                }
                Output::DropSession(addr) => self.to_session(addr, ToPeer::BfdDown),
                Output::Send { peer, messages } => self.to_session(peer, ToPeer::Send(messages)),
                Output::Kernel(ops) => {
                    if let Some(k) = &self.kernel {
                        let _ = k.send(ops);
                    }
                }
                Output::WatchBfd(peers) => self.watch_bfd(peers),
            }
        }
    }

    fn to_session(&self, addr: IpAddr, m: ToPeer) {
        if let Some(tx) = self.sessions.get(&addr) {
            let _ = tx.send(m);
        }
    }

    /// BFD for the peers that ask for it (RFC 5882: BFD Down ends the session); its task
    /// starts with the first such peer.
    fn watch_bfd(&mut self, peers: Vec<IpAddr>) {
        match &self.bfd_peers {
            Some(tx) => {
                let _ = tx.send(peers);
            }
            None if !peers.is_empty() => {
                let (tx, rx) = tokio::sync::watch::channel(peers);
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
    tx: mpsc::Sender<Input>,
) {
    let addr = pc.address;
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
                        let pc = pc.clone();
                        connecting = Some(tokio::spawn(async move {
                            let peer = peer_socket_addr(&pc)?;
                            connect(peer, pc.local_address, pc.password.clone()).await
                        }));
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
                        let socket = link
                            .as_ref()
                            .map(|l| (l.write.local_addr(), l.write.peer_addr()));
                        let local = socket
                            .as_ref()
                            .and_then(|(l, _)| l.as_ref().ok())
                            .map(|a| a.ip());
                        let local = local.or(pc.local_address).unwrap_or(addr);
                        // A link-local session's interface: its address's scope.
                        let interface = match socket {
                            Some((_, Ok(SocketAddr::V6(a)))) if a.scope_id() != 0 => {
                                Some(a.scope_id())
                            }
                            _ => None,
                        };
                        let _ = tx
                            .send(Input::SessionUp {
                                peer: addr,
                                open: peer,
                                ctx,
                                local,
                                interface,
                            })
                            .await;
                    }
                    Action::Down { reason } => {
                        let _ = tx.send(Input::SessionDown { peer: addr, reason }).await;
                    }
                    Action::Deliver(update) => {
                        let _ = tx.send(Input::Update { peer: addr, update }).await;
                    }
                    Action::Refresh { .. } => {
                        let _ = tx.send(Input::RefreshRequested { peer: addr }).await;
                    }
                }
            }
            pending = next;
        }
        if fsm.state() != last_state {
            last_state = fsm.state();
            tracing::debug!(peer = %addr, state = ?last_state, "FSM state");
            let _ = tx
                .send(Input::SessionState {
                    peer: addr,
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
                    let remote_id = match addr { IpAddr::V4(a) => Some(a), IpAddr::V6(_) => None };
                    match fsm.incoming(now(), remote_id) {
                        Incoming::Refuse => drop(s),
                        Incoming::Accept { cease_current, actions } => {
                            if let (Some(n), Some(mut l)) = (cease_current, link.take()) {
                                l.queue(&packet::encode(&Message::Notification(n), fsm.ctx()));
                                l.flush_briefly().await;
                            }
                            if let Some(c) = connecting.take() {
                                c.abort();
                            }
                            let (r, w) = split(s);
                            (reader, link) = (Some(r), Some(w));
                            buf.clear();
                            pending.extend(actions);
                        }
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

/// The peer's socket address; a link-local one is scoped to its interface.
fn peer_socket_addr(pc: &PeerConfig) -> std::io::Result<SocketAddr> {
    let IpAddr::V6(v6) = pc.address else {
        return Ok(SocketAddr::new(pc.address, pc.port));
    };
    let scope = match &pc.interface {
        Some(name) if crate::rib::is_link_local(&pc.address) => {
            let c = std::ffi::CString::new(name.as_str())
                .map_err(|_| std::io::Error::other("interface name with a NUL byte"))?;
            // SAFETY: a valid NUL-terminated string; the call only reads it.
            match unsafe { libc::if_nametoindex(c.as_ptr()) } {
                0 => return Err(std::io::Error::last_os_error()),
                i => i,
            }
        }
        _ => 0,
    };
    Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
        v6, pc.port, 0, scope,
    )))
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
    // The status names peers and their state: root's business only.
    if let Err(e) = owner_only(&path) {
        tracing::warn!(%path, error = %e, "cannot restrict the status socket to its owner");
    }
    while let Ok((mut s, _)) = listener.accept().await {
        let body = serde_json::to_vec(&*status.lock().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_default();
        let _ = s.write_all(&body).await;
    }
}

/// Mode 0600 on a socket just bound (connecting to a Unix socket needs write permission).
pub fn owner_only(path: impl AsRef<std::path::Path>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// `tessera-routed status`: the JSON status of a running speaker.
pub async fn query_status(path: &str) -> std::io::Result<String> {
    let mut s = tokio::net::UnixStream::connect(path).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
