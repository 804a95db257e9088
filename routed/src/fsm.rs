//! The BGP finite-state machine of one session (RFC 4271 §8), sans-IO: events go in with the
//! current time, actions come out. Time is a `Duration` since any fixed origin; the driver
//! asks [`Session::next_deadline`] when to call [`Session::poll_timers`].

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::packet::{
    err, Capability, Ctx, DecodeError, Message, Notification, Open, Update, AFI_IPV4, AFI_IPV6,
    AS_TRANS, SAFI_UNICAST,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

/// RFC 4271 §8.1 events (the names in comments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Event 1 ManualStart (or 3 AutomaticStart).
    Start,
    /// Event 2 ManualStop.
    Stop,
    /// Events 16/17: Tcp_CR_Acked / TcpConnectionConfirmed.
    TcpConnected,
    /// Event 18 TcpConnectionFails.
    TcpFailed,
    /// Events 19, 24, 25, 26, 27 and ROUTE-REFRESH.
    Received(Message),
    /// Events 21, 22, 28: a message that did not decode.
    Malformed(DecodeError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the peer.
    Connect,
    /// Close the TCP connection.
    Disconnect,
    Send(Message),
    /// The session reached Established with this OPEN from the peer.
    Up {
        peer: Open,
        ctx: Ctx,
    },
    /// The session left Established (routes from the peer go, or go stale for GR).
    Down {
        reason: String,
    },
    /// An UPDATE for the RIB.
    Deliver(Update),
    /// The peer asked us to send our routes again.
    Refresh {
        afi: u16,
        safi: u8,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub local_as: u32,
    /// The AS the peer must have (`None`: any, e.g. a dynamic neighbor).
    pub peer_as: Option<u32>,
    pub router_id: Ipv4Addr,
    /// Our proposed hold time; 0 disables keepalives (RFC 4271 §4.2).
    pub hold_time: u16,
    pub connect_retry: Duration,
    /// Wait for the peer to connect instead of connecting.
    pub passive: bool,
    pub ipv4: bool,
    pub ipv6: bool,
    /// Graceful restart (RFC 4724) restart time to announce; `None` disables.
    pub graceful_restart: Option<u16>,
    /// We are restarting (R bit): the peer keeps our routes until our End-of-RIB.
    pub restarting: bool,
    /// Advertise Extended Message (RFC 8654): messages up to 65535 octets when both do.
    pub extended_message: bool,
    /// Peer oscillation damping (RFC 4271 §8.1.1): the wait before starting again doubles
    /// with each reset, from `connect_retry` up to this.
    pub idle_hold_max: Duration,
    /// A session Established this long before it went down counts as stable: the wait
    /// starts from `connect_retry` again.
    pub stable_after: Duration,
}

/// Why the session last went down, and how long the FSM waits before starting again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Damping {
    /// Resets in a row without a stable session in between.
    pub resets: u32,
    pub idle_hold_ms: u64,
    pub reason: String,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            local_as: 64512,
            peer_as: None,
            router_id: Ipv4Addr::new(1, 1, 1, 1),
            hold_time: 90,
            connect_retry: Duration::from_secs(5),
            passive: false,
            ipv4: true,
            ipv6: true,
            graceful_restart: Some(120),
            restarting: false,
            extended_message: false,
            idle_hold_max: Duration::from_secs(120),
            stable_after: Duration::from_secs(60),
        }
    }
}

/// Hold time used while waiting for the peer's OPEN (RFC 4271 §8.2.2 suggests 4 minutes).
const LARGE_HOLD: Duration = Duration::from_secs(240);

#[derive(Debug)]
pub struct Session {
    pub cfg: SessionConfig,
    state: State,
    connect_retry_at: Option<Duration>,
    hold_at: Option<Duration>,
    keepalive_at: Option<Duration>,
    /// After an error, when to start again by itself (AutomaticStart).
    restart_at: Option<Duration>,
    hold: Duration,
    peer_open: Option<Open>,
    ctx: Ctx,
    pub established_since: Option<Duration>,
    damping: Option<Damping>,
}

impl Session {
    pub fn new(cfg: SessionConfig) -> Self {
        Session {
            cfg,
            state: State::Idle,
            connect_retry_at: None,
            hold_at: None,
            keepalive_at: None,
            restart_at: None,
            hold: Duration::ZERO,
            peer_open: None,
            ctx: Ctx::default(),
            established_since: None,
            damping: None,
        }
    }

    /// The last reset and the wait it caused (None before any).
    pub fn damping(&self) -> Option<Damping> {
        self.damping.clone()
    }

    pub fn state(&self) -> State {
        self.state
    }
    pub fn ctx(&self) -> Ctx {
        self.ctx
    }
    pub fn peer_open(&self) -> Option<&Open> {
        self.peer_open.as_ref()
    }
    /// The negotiated hold time.
    pub fn hold_time(&self) -> Duration {
        self.hold
    }

    pub fn open_message(&self) -> Open {
        let mut caps = Vec::new();
        if self.cfg.ipv4 {
            caps.push(Capability::MultiProtocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            });
        }
        if self.cfg.ipv6 {
            caps.push(Capability::MultiProtocol {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
            });
        }
        caps.push(Capability::RouteRefresh);
        if let Some(time) = self.cfg.graceful_restart {
            let mut families = Vec::new();
            if self.cfg.ipv4 {
                families.push((AFI_IPV4, SAFI_UNICAST, true));
            }
            if self.cfg.ipv6 {
                families.push((AFI_IPV6, SAFI_UNICAST, true));
            }
            caps.push(Capability::GracefulRestart {
                restarting: self.cfg.restarting,
                time,
                families,
            });
        }
        caps.push(Capability::FourOctetAs(self.cfg.local_as));
        if self.cfg.extended_message {
            caps.push(Capability::ExtendedMessage);
        }
        Open {
            version: 4,
            my_as: u16::try_from(self.cfg.local_as).unwrap_or(AS_TRANS),
            hold_time: self.cfg.hold_time,
            bgp_id: self.cfg.router_id,
            capabilities: caps,
        }
    }

    pub fn next_deadline(&self) -> Option<Duration> {
        [
            self.connect_retry_at,
            self.hold_at,
            self.keepalive_at,
            self.restart_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Fires every timer due at `now` (events 9, 10, 11, and automatic restart).
    pub fn poll_timers(&mut self, now: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        let due = |t: Option<Duration>| t.is_some_and(|t| t <= now);
        if due(self.restart_at) {
            self.restart_at = None;
            out.extend(self.handle(now, Event::Start));
        }
        if due(self.hold_at) {
            self.hold_at = None;
            // Event 10 HoldTimer_Expires.
            out.extend(self.fail(
                now,
                Some(Notification {
                    code: err::HOLD_TIMER_EXPIRED,
                    subcode: 0,
                    data: vec![],
                }),
                "hold timer expired",
            ));
        }
        if due(self.keepalive_at) {
            // Event 11 KeepaliveTimer_Expires.
            self.keepalive_at = Some(now + self.hold / 3);
            if matches!(self.state, State::OpenConfirm | State::Established) {
                out.push(Action::Send(Message::Keepalive));
            }
        }
        if due(self.connect_retry_at) {
            // Event 9 ConnectRetryTimer_Expires.
            self.connect_retry_at = Some(now + self.cfg.connect_retry);
            match self.state {
                State::Connect => out.extend([Action::Disconnect, Action::Connect]),
                State::Active => {
                    self.state = State::Connect;
                    out.push(Action::Connect);
                }
                _ => self.connect_retry_at = None,
            }
        }
        out
    }

    fn reset_timers(&mut self) {
        self.connect_retry_at = None;
        self.hold_at = None;
        self.keepalive_at = None;
    }

    /// Any error: optional NOTIFICATION, close, Idle, and start again after a while.
    fn fail(&mut self, now: Duration, notify: Option<Notification>, reason: &str) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(n) = notify {
            out.push(Action::Send(Message::Notification(n)));
        }
        out.push(Action::Disconnect);
        if self.state == State::Established {
            out.push(Action::Down {
                reason: reason.to_string(),
            });
        }
        // DampPeerOscillations: a session that flaps waits longer each time; one that was
        // stable for a while starts the count over.
        let stable = self.state == State::Established
            && self
                .established_since
                .is_some_and(|t| now.saturating_sub(t) >= self.cfg.stable_after);
        let resets = match &self.damping {
            Some(d) if !stable => d.resets + 1,
            _ => 1,
        };
        let idle_hold = self
            .cfg
            .connect_retry
            .saturating_mul(1u32 << (resets - 1).min(16))
            .min(self.cfg.idle_hold_max.max(self.cfg.connect_retry));
        self.damping = Some(Damping {
            resets,
            idle_hold_ms: idle_hold.as_millis() as u64,
            reason: reason.to_string(),
        });
        self.state = State::Idle;
        self.reset_timers();
        self.peer_open = None;
        self.established_since = None;
        self.restart_at = Some(now + idle_hold);
        out
    }

    fn fsm_error(&mut self, now: Duration) -> Vec<Action> {
        let subcode = match self.state {
            State::OpenSent => 1,
            State::OpenConfirm => 2,
            State::Established => 3,
            _ => 0,
        };
        self.fail(
            now,
            Some(Notification {
                code: err::FSM,
                subcode,
                data: vec![],
            }),
            "unexpected message for the state",
        )
    }

    pub fn handle(&mut self, now: Duration, ev: Event) -> Vec<Action> {
        use State::*;
        match (self.state, ev) {
            (Idle, Event::Start) => {
                self.restart_at = None;
                self.connect_retry_at = Some(now + self.cfg.connect_retry);
                if self.cfg.passive {
                    self.state = Active;
                    vec![]
                } else {
                    self.state = Connect;
                    vec![Action::Connect]
                }
            }
            (Idle, _) => vec![],
            (_, Event::Stop) => {
                let cease = Notification {
                    code: err::CEASE,
                    subcode: err::ADMIN_SHUTDOWN,
                    data: vec![],
                };
                let notify =
                    matches!(self.state, OpenSent | OpenConfirm | Established).then_some(cease);
                let out = self.fail(now, notify, "stopped");
                self.restart_at = None;
                out
            }
            (Connect | Active, Event::TcpConnected) => {
                self.connect_retry_at = None;
                self.hold_at = Some(now + LARGE_HOLD);
                self.state = OpenSent;
                vec![Action::Send(Message::Open(self.open_message()))]
            }
            (Connect, Event::TcpFailed) => {
                self.connect_retry_at = Some(now + self.cfg.connect_retry);
                self.state = Active;
                vec![]
            }
            (Active, Event::TcpFailed) => {
                self.connect_retry_at = Some(now + self.cfg.connect_retry);
                vec![]
            }
            (Connect | Active, _) => vec![],
            (_, Event::TcpConnected) => vec![],
            (_, Event::TcpFailed) => self.fail(now, None, "connection lost"),
            (_, Event::Malformed(e)) => {
                let n = Notification::from(&e);
                self.fail(now, Some(n), e.reason)
            }
            (_, Event::Received(Message::Notification(n))) => self.fail(
                now,
                None,
                &format!("NOTIFICATION {}/{} from the peer", n.code, n.subcode),
            ),
            (OpenSent, Event::Received(Message::Open(o))) => self.on_open(now, o),
            (OpenSent, Event::Received(_)) => self.fsm_error(now),
            (OpenConfirm, Event::Received(Message::Keepalive)) => {
                self.state = Established;
                self.established_since = Some(now);
                self.restart_hold(now);
                let peer = self
                    .peer_open
                    .clone()
                    .unwrap_or_else(|| self.open_message());
                vec![Action::Up {
                    peer,
                    ctx: self.ctx,
                }]
            }
            (OpenConfirm, Event::Received(_)) => self.fsm_error(now),
            (Established, Event::Received(Message::Keepalive)) => {
                self.restart_hold(now);
                vec![]
            }
            (Established, Event::Received(Message::Update(u))) => {
                self.restart_hold(now);
                vec![Action::Deliver(u)]
            }
            (Established, Event::Received(Message::RouteRefresh { afi, safi })) => {
                vec![Action::Refresh { afi, safi }]
            }
            (Established, Event::Received(Message::Open(_))) => self.fsm_error(now),
            (Established, Event::Start) | (OpenSent | OpenConfirm, Event::Start) => vec![],
        }
    }

    fn restart_hold(&mut self, now: Duration) {
        if !self.hold.is_zero() {
            self.hold_at = Some(now + self.hold);
        }
    }

    /// Event 19 BGPOpen in OpenSent: check it, negotiate, answer with KEEPALIVE.
    fn on_open(&mut self, now: Duration, o: Open) -> Vec<Action> {
        let peer_as = o.asn();
        if let Some(want) = self.cfg.peer_as {
            if peer_as != want {
                let data = o.my_as.to_be_bytes().to_vec();
                return self.fail(
                    now,
                    Some(Notification {
                        code: err::OPEN,
                        subcode: err::BAD_PEER_AS,
                        data,
                    }),
                    "peer AS mismatch",
                );
            }
        }
        if o.bgp_id == self.cfg.router_id && peer_as == self.cfg.local_as {
            return self.fail(
                now,
                Some(Notification {
                    code: err::OPEN,
                    subcode: err::BAD_BGP_ID,
                    data: vec![],
                }),
                "peer has our BGP identifier",
            );
        }
        let hold = self.cfg.hold_time.min(o.hold_time);
        self.hold = Duration::from_secs(u64::from(hold));
        self.ctx = Ctx {
            four_octet_as: o.has(|c| matches!(c, Capability::FourOctetAs(_))),
            extended_message: self.cfg.extended_message
                && o.has(|c| matches!(c, Capability::ExtendedMessage)),
        };
        self.peer_open = Some(o);
        self.state = State::OpenConfirm;
        if hold == 0 {
            self.hold_at = None;
            self.keepalive_at = None;
        } else {
            self.hold_at = Some(now + self.hold);
            self.keepalive_at = Some(now + self.hold / 3);
        }
        vec![Action::Send(Message::Keepalive)]
    }
}

/// What to do with a connection the peer opened to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Close it: the session we have (Established, or ours winning the collision) stays.
    Refuse,
    /// Use it. `cease_current`: the connection in use lost the collision and gets this
    /// NOTIFICATION before it is closed; `actions` start the session on the new one.
    Accept {
        cease_current: Option<Notification>,
        actions: Vec<Action>,
    },
}

impl Session {
    /// The peer connected to us (RFC 4271 §6.8, collision detection). `remote_id`: the
    /// peer's BGP Identifier when known otherwise (its IPv4 address). While idle (waiting to
    /// restart) the session starts now, as AutomaticStart with passive TCP establishment.
    /// Without a connection of our own past OpenSent, theirs is taken; with one, the
    /// connection opened by the higher identifier wins; an Established session is kept.
    pub fn incoming(&mut self, now: Duration, remote_id: Option<Ipv4Addr>) -> Incoming {
        let mut actions = Vec::new();
        if self.state == State::Idle {
            actions.extend(
                self.handle(now, Event::Start)
                    .into_iter()
                    .filter(|a| *a != Action::Connect),
            );
        }
        let in_progress = matches!(
            self.state,
            State::OpenSent | State::OpenConfirm | State::Established
        );
        let remote_id = self.peer_open.as_ref().map(|o| o.bgp_id).or(remote_id);
        let ours_wins = remote_id.is_some_and(|r| keep_our_connection(self.cfg.router_id, r));
        if self.state == State::Established || (in_progress && ours_wins) {
            return Incoming::Refuse;
        }
        let cease_current = in_progress.then(|| {
            // Back to the start without counting a reset: nothing failed.
            self.reset_timers();
            self.peer_open = None;
            self.state = State::Idle;
            let restart = self.handle(now, Event::Start);
            actions.extend(restart.into_iter().filter(|a| *a != Action::Connect));
            Notification {
                code: err::CEASE,
                subcode: err::COLLISION_RESOLUTION,
                data: vec![],
            }
        });
        actions.extend(self.handle(now, Event::TcpConnected));
        Incoming::Accept {
            cease_current,
            actions,
        }
    }
}

/// Connection collision resolution (RFC 4271 §6.8): of two connections with one peer, the
/// one initiated by the speaker with the higher BGP Identifier survives. Returns true when
/// the connection *we* initiated should be kept.
pub fn keep_our_connection(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> bool {
    u32::from(local_id) > u32::from(remote_id)
}

#[cfg(test)]
mod tests;
