//! BFD, single hop (RFC 5880 asynchronous mode, RFC 5881 encapsulation): a dead peer is
//! detected in `detect_mult x interval` (300 ms x 3 by default) instead of a BGP hold time.
//! [`Session`] is the sans-IO state machine; [`run`] is its UDP driver (port 3784, TTL 255).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub const PORT: u16 = 3784;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum BfdState {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl BfdState {
    fn from_bits(b: u8) -> BfdState {
        match b {
            0 => BfdState::AdminDown,
            1 => BfdState::Down,
            2 => BfdState::Init,
            _ => BfdState::Up,
        }
    }
}

/// Diagnostic codes (RFC 5880 §4.1).
pub mod diag {
    pub const NONE: u8 = 0;
    pub const DETECTION_TIME_EXPIRED: u8 = 1;
    pub const NEIGHBOR_DOWN: u8 = 3;
}

/// A BFD Control packet (RFC 5880 §4.1), without authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    pub diag: u8,
    pub state: BfdState,
    pub poll: bool,
    pub final_: bool,
    pub detect_mult: u8,
    pub my_disc: u32,
    pub your_disc: u32,
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
}

impl Control {
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0] = (1 << 5) | (self.diag & 0x1f);
        b[1] = ((self.state as u8) << 6)
            | if self.poll { 0x20 } else { 0 }
            | if self.final_ { 0x10 } else { 0 };
        b[2] = self.detect_mult;
        b[3] = 24;
        b[4..8].copy_from_slice(&self.my_disc.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_disc.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx_us.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx_us.to_be_bytes());
        b
    }

    /// Decodes and applies the §6.8.6 reception checks that do not need a session.
    pub fn decode(b: &[u8]) -> Option<Control> {
        if b.len() < 24 || b[0] >> 5 != 1 {
            return None;
        }
        let len = usize::from(b[3]);
        let flags = b[1];
        let demand = flags & 0x02 != 0;
        let multipoint = flags & 0x01 != 0;
        let auth = flags & 0x04 != 0;
        if len < 24 || len > b.len() || b[2] == 0 || multipoint || demand || auth {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let c = Control {
            diag: b[0] & 0x1f,
            state: BfdState::from_bits(flags >> 6),
            poll: flags & 0x20 != 0,
            final_: flags & 0x10 != 0,
            detect_mult: b[2],
            my_disc: u32_at(4),
            your_disc: u32_at(8),
            desired_min_tx_us: u32_at(12),
            required_min_rx_us: u32_at(16),
        };
        if c.my_disc == 0
            || (c.your_disc == 0 && !matches!(c.state, BfdState::Down | BfdState::AdminDown))
        {
            return None;
        }
        Some(c)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BfdConfig {
    pub interval: Duration,
    pub detect_mult: u8,
}

impl Default for BfdConfig {
    fn default() -> Self {
        BfdConfig {
            interval: Duration::from_millis(300),
            detect_mult: 3,
        }
    }
}

/// While not Up, packets go at most once a second (RFC 5880 §6.8.3).
const SLOW: Duration = Duration::from_secs(1);

/// One BFD session's state machine. Time is a `Duration` since any fixed origin.
#[derive(Debug)]
pub struct Session {
    cfg: BfdConfig,
    pub state: BfdState,
    diag: u8,
    my_disc: u32,
    your_disc: u32,
    remote_min_rx: Duration,
    remote_tx: Duration,
    remote_mult: u8,
    /// A Poll sequence is running (our timers changed on reaching Up).
    polling: bool,
    send_final: bool,
    next_tx: Duration,
    detect_at: Option<Duration>,
}

impl Session {
    pub fn new(cfg: BfdConfig, my_disc: u32) -> Self {
        Session {
            cfg,
            state: BfdState::Down,
            diag: diag::NONE,
            my_disc,
            your_disc: 0,
            remote_min_rx: Duration::from_micros(1),
            remote_tx: SLOW,
            remote_mult: 1,
            polling: false,
            send_final: false,
            next_tx: Duration::ZERO,
            detect_at: None,
        }
    }

    fn desired_tx(&self) -> Duration {
        if self.state == BfdState::Up {
            self.cfg.interval
        } else {
            SLOW.max(self.cfg.interval)
        }
    }

    fn tx_interval(&self) -> Duration {
        self.desired_tx().max(self.remote_min_rx)
    }

    fn detection_time(&self) -> Duration {
        self.cfg.interval.max(self.remote_tx) * u32::from(self.remote_mult)
    }

    /// The packet to send now.
    pub fn packet(&mut self) -> Control {
        Control {
            diag: self.diag,
            state: self.state,
            poll: self.polling,
            final_: std::mem::take(&mut self.send_final),
            detect_mult: self.cfg.detect_mult,
            my_disc: self.my_disc,
            your_disc: self.your_disc,
            desired_min_tx_us: self.desired_tx().as_micros() as u32,
            required_min_rx_us: self.cfg.interval.as_micros() as u32,
        }
    }

    /// When to send next, and whether detection expires first.
    pub fn next_deadline(&self) -> Duration {
        match self.detect_at {
            Some(d) => d.min(self.next_tx),
            None => self.next_tx,
        }
    }

    /// Timers: returns a packet to send (periodic), and the new state if the session
    /// went Down because the detection time passed.
    pub fn poll(&mut self, now: Duration, jitter: f64) -> (Option<Control>, Option<BfdState>) {
        let mut change = None;
        if self.detect_at.is_some_and(|d| d <= now)
            && matches!(self.state, BfdState::Init | BfdState::Up)
        {
            self.state = BfdState::Down;
            self.diag = diag::DETECTION_TIME_EXPIRED;
            self.your_disc = 0;
            self.detect_at = None;
            change = Some(BfdState::Down);
        }
        let mut pkt = None;
        if now >= self.next_tx {
            pkt = Some(self.packet());
            // RFC 5880 §6.8.7: 75-100 % of the interval (90 % at most with detect mult 1).
            let j = jitter.clamp(0.0, 1.0);
            let factor = if self.cfg.detect_mult == 1 {
                0.75 + 0.15 * j
            } else {
                0.75 + 0.25 * j
            };
            self.next_tx = now + self.tx_interval().mul_f64(factor);
        }
        (pkt, change)
    }

    /// A received packet (RFC 5880 §6.8.6). Returns the new state if it changed, and a Final
    /// to send at once when the peer polled.
    pub fn receive(&mut self, now: Duration, c: &Control) -> (Option<BfdState>, Option<Control>) {
        if c.your_disc != 0 && c.your_disc != self.my_disc {
            return (None, None);
        }
        self.your_disc = c.my_disc;
        self.remote_min_rx = Duration::from_micros(u64::from(c.required_min_rx_us));
        self.remote_tx = Duration::from_micros(u64::from(c.desired_min_tx_us));
        self.remote_mult = c.detect_mult;
        if c.final_ {
            self.polling = false;
        }
        let before = self.state;
        use BfdState::*;
        match (self.state, c.state) {
            (AdminDown, _) => return (None, None),
            (Down, AdminDown) => {}
            (_, AdminDown) => {
                self.diag = diag::NEIGHBOR_DOWN;
                self.state = Down;
            }
            (Down, Down) => self.state = Init,
            (Down, Init) => self.state = Up,
            (Init, Init | Up) => self.state = Up,
            (Up, Down) => {
                self.diag = diag::NEIGHBOR_DOWN;
                self.state = Down;
            }
            _ => {}
        }
        if self.state != Down {
            self.detect_at = Some(now + self.detection_time());
        } else {
            self.detect_at = None;
        }
        if self.state == Up && before != Up {
            self.diag = diag::NONE;
            // Our transmit interval drops from 1 s to the configured one: a Poll sequence.
            self.polling = true;
            self.next_tx = now;
        }
        let final_ = c.poll.then(|| {
            self.send_final = true;
            self.packet()
        });
        ((self.state != before).then_some(self.state), final_)
    }
}

/// A change of a peer's BFD state, for the speaker.
#[derive(Debug, Clone)]
pub struct BfdEvent {
    pub peer: IpAddr,
    pub state: BfdState,
}

/// Runs BFD with `peers` from `local`, reporting state changes.
pub async fn run(
    local: IpAddr,
    mut peers: tokio::sync::watch::Receiver<Vec<IpAddr>>,
    cfg: BfdConfig,
    events: mpsc::Sender<BfdEvent>,
) -> std::io::Result<()> {
    let rx = UdpSocket::bind(SocketAddr::new(local, PORT)).await?;
    let tx = bind_source(local).await?;
    tx.set_ttl(255)?;
    let origin = Instant::now();
    // Our discriminators: unique for the life of the task.
    let mut next_disc: u32 = 0x7e55_0000;
    let mut sessions: HashMap<IpAddr, Session> = HashMap::new();
    let mut sync = |sessions: &mut HashMap<IpAddr, Session>, wanted: &[IpAddr]| {
        sessions.retain(|p, _| wanted.contains(p));
        for p in wanted {
            sessions.entry(*p).or_insert_with(|| {
                next_disc = next_disc.wrapping_add(1);
                Session::new(cfg, next_disc)
            });
        }
    };
    sync(&mut sessions, &peers.borrow_and_update());
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut jitter = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % 1000) as f64 / 1000.0
    };
    let mut buf = [0u8; 128];
    loop {
        let next = sessions
            .values()
            .map(Session::next_deadline)
            .min()
            .unwrap_or(Duration::from_secs(1));
        tokio::select! {
            changed = peers.changed() => {
                if changed.is_err() {
                    // The speaker is gone.
                    return Ok(());
                }
                let wanted = peers.borrow_and_update().clone();
                sync(&mut sessions, &wanted);
            }
            _ = tokio::time::sleep_until(origin + next) => {
                let now = origin.elapsed();
                for (peer, s) in sessions.iter_mut() {
                    let (pkt, change) = s.poll(now, jitter());
                    if let Some(p) = pkt {
                        let _ = tx.send_to(&p.encode(), SocketAddr::new(*peer, PORT)).await;
                    }
                    if let Some(state) = change {
                        let _ = events.send(BfdEvent { peer: *peer, state }).await;
                    }
                }
            }
            r = rx.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let (Some(c), Some(s)) = (Control::decode(&buf[..n]), sessions.get_mut(&from.ip())) else { continue };
                let (change, final_) = s.receive(origin.elapsed(), &c);
                if let Some(f) = final_ {
                    let _ = tx.send_to(&f.encode(), SocketAddr::new(from.ip(), PORT)).await;
                }
                if let Some(state) = change {
                    let _ = events.send(BfdEvent { peer: from.ip(), state }).await;
                }
            }
        }
    }
}

/// RFC 5881 §4: the source port is in 49152-65535.
async fn bind_source(local: IpAddr) -> std::io::Result<UdpSocket> {
    let start = 49152 + (std::process::id() % 10000) as u16;
    for port in (start..=65535).chain(49152..start) {
        if let Ok(s) = UdpSocket::bind(SocketAddr::new(local, port)).await {
            return Ok(s);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no BFD source port free",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn control_packets_round_trip_and_bad_ones_are_dropped() {
        let c = Control {
            diag: 1,
            state: BfdState::Up,
            poll: true,
            final_: false,
            detect_mult: 3,
            my_disc: 7,
            your_disc: 9,
            desired_min_tx_us: 300_000,
            required_min_rx_us: 300_000,
        };
        let b = c.encode();
        assert_eq!(b[0], 0x21);
        assert_eq!(b[1], 0xe0);
        assert_eq!(Control::decode(&b), Some(c));
        let mut v2 = b;
        v2[0] = 0x41;
        assert_eq!(Control::decode(&v2), None, "version 2");
        let mut mult0 = b;
        mult0[2] = 0;
        assert_eq!(Control::decode(&mult0), None, "detect mult 0");
        let mut nodisc = b;
        nodisc[8..12].fill(0);
        assert_eq!(
            Control::decode(&nodisc),
            None,
            "your discriminator 0 while Up"
        );
        assert_eq!(Control::decode(&b[..20]), None, "short");
    }

    /// Two sessions talking to each other come Up via Init (three-way handshake), and one
    /// goes Down when the other falls silent for the detection time.
    #[test]
    fn three_way_handshake_and_detection() {
        let cfg = BfdConfig::default();
        let (mut a, mut b) = (Session::new(cfg, 1), Session::new(cfg, 2));
        let mut t = Duration::ZERO;
        for _ in 0..4 {
            let pa = a.packet();
            b.receive(t, &pa);
            let pb = b.packet();
            a.receive(t, &pb);
            t += ms(10);
        }
        assert_eq!((a.state, b.state), (BfdState::Up, BfdState::Up));
        // b stops sending; a keeps polling its timers.
        let mut down_at = None;
        for step in 0..300 {
            let now = t + ms(step * 10);
            if let (_, Some(BfdState::Down)) = a.poll(now, 0.5) {
                down_at = Some(now - t);
                break;
            }
        }
        let d = down_at.expect("a detects the silence");
        assert!(d <= ms(1000), "detection time is 3 x 300 ms, got {d:?}");
        assert_eq!(a.diag, diag::DETECTION_TIME_EXPIRED);
    }

    #[test]
    fn admin_down_from_the_peer_takes_the_session_down() {
        let mut a = Session::new(BfdConfig::default(), 1);
        let mut c = Control {
            diag: 0,
            state: BfdState::Init,
            poll: false,
            final_: false,
            detect_mult: 3,
            my_disc: 5,
            your_disc: 1,
            desired_min_tx_us: 300_000,
            required_min_rx_us: 300_000,
        };
        assert_eq!(a.receive(Duration::ZERO, &c).0, Some(BfdState::Up));
        c.state = BfdState::AdminDown;
        assert_eq!(a.receive(ms(10), &c).0, Some(BfdState::Down));
        assert_eq!(a.diag, diag::NEIGHBOR_DOWN);
    }

    #[test]
    fn a_poll_gets_a_final() {
        let mut a = Session::new(BfdConfig::default(), 1);
        let c = Control {
            diag: 0,
            state: BfdState::Down,
            poll: true,
            final_: false,
            detect_mult: 3,
            my_disc: 5,
            your_disc: 0,
            desired_min_tx_us: 1_000_000,
            required_min_rx_us: 300_000,
        };
        let (_, f) = a.receive(Duration::ZERO, &c);
        assert!(f.is_some_and(|f| f.final_));
    }
}
