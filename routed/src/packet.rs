//! BGP-4 messages (RFC 4271 §4) and their codec, with multiprotocol (RFC 4760), 4-octet AS
//! (RFC 6793), route refresh (RFC 2918) and graceful restart (RFC 4724) capabilities.
//!
//! Decoding never panics: every malformed input becomes a [`DecodeError`] naming the
//! NOTIFICATION (code, subcode, data) RFC 4271 §6 asks for, or, for the attribute errors that
//! RFC 7606 says so, an UPDATE marked `treat_as_withdraw`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

pub const HEADER_LEN: usize = 19;
pub const MAX_LEN: usize = 4096;
/// The largest message once both sides advertised Extended Message (RFC 8654).
pub const MAX_EXTENDED_LEN: usize = 65535;
pub const AS_TRANS: u16 = 23456;

pub const AFI_IPV4: u16 = 1;
pub const AFI_IPV6: u16 = 2;
pub const SAFI_UNICAST: u8 = 1;

/// NOTIFICATION error codes and subcodes (RFC 4271 §4.5, RFC 6608, RFC 4486).
pub mod err {
    pub const HEADER: u8 = 1;
    pub const NOT_SYNCHRONIZED: u8 = 1;
    pub const BAD_LENGTH: u8 = 2;
    pub const BAD_TYPE: u8 = 3;

    pub const OPEN: u8 = 2;
    pub const UNSUPPORTED_VERSION: u8 = 1;
    pub const BAD_PEER_AS: u8 = 2;
    pub const BAD_BGP_ID: u8 = 3;
    pub const UNSUPPORTED_OPT_PARAM: u8 = 4;
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;

    pub const UPDATE: u8 = 3;
    pub const MALFORMED_ATTR_LIST: u8 = 1;
    pub const UNRECOGNIZED_WELL_KNOWN: u8 = 2;
    pub const MISSING_WELL_KNOWN: u8 = 3;
    pub const ATTR_FLAGS: u8 = 4;
    pub const ATTR_LENGTH: u8 = 5;
    pub const INVALID_ORIGIN: u8 = 6;
    pub const INVALID_NEXT_HOP: u8 = 8;
    pub const OPTIONAL_ATTR: u8 = 9;
    pub const INVALID_NETWORK: u8 = 10;
    pub const MALFORMED_AS_PATH: u8 = 11;

    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ADMIN_SHUTDOWN: u8 = 2;
    pub const CONNECTION_REJECTED: u8 = 5;
    pub const COLLISION_RESOLUTION: u8 = 7;

    pub const ROUTE_REFRESH: u8 = 7;
    pub const INVALID_MESSAGE_LENGTH: u8 = 1;
}

/// A decode failure: the NOTIFICATION to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed BGP message: {reason} (NOTIFICATION {code}/{subcode})")]
pub struct DecodeError {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
    pub reason: &'static str,
}

fn fail<T>(code: u8, subcode: u8, data: &[u8], reason: &'static str) -> Result<T, DecodeError> {
    Err(DecodeError {
        code,
        subcode,
        data: data.to_vec(),
        reason,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    MultiProtocol {
        afi: u16,
        safi: u8,
    },
    RouteRefresh,
    /// RFC 4724: restart flags (R bit), restart time (s), per-family forwarding-preserved.
    GracefulRestart {
        restarting: bool,
        time: u16,
        families: Vec<(u16, u8, bool)>,
    },
    FourOctetAs(u32),
    /// RFC 8654: messages other than OPEN and KEEPALIVE may be up to 65535 octets.
    ExtendedMessage,
    Unknown {
        code: u8,
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The 2-octet field: AS_TRANS for a 4-octet AS.
    pub my_as: u16,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// The sender's AS: the 4-octet capability if present, else the 2-octet field.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(u32::from(self.my_as))
    }
    pub fn has(&self, pred: impl Fn(&Capability) -> bool) -> bool {
        self.capabilities.iter().any(pred)
    }

    /// The unicast families this OPEN advertises: its Multiprotocol capabilities, or IPv4
    /// unicast alone when it has none (RFC 4760 §8).
    pub fn families(&self) -> Families {
        let mp: Vec<(u16, u8)> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::MultiProtocol { afi, safi } => Some((*afi, *safi)),
                _ => None,
            })
            .collect();
        if mp.is_empty() {
            return Families::IPV4;
        }
        Families {
            ipv4: mp.contains(&(AFI_IPV4, SAFI_UNICAST)),
            ipv6: mp.contains(&(AFI_IPV6, SAFI_UNICAST)),
        }
    }

    /// The families whose routes the sender asks its peers to keep across its restart
    /// (RFC 4724 §3: those listed in its Graceful Restart capability with forwarding state
    /// preserved or not; none when it sends the capability without families).
    pub fn preserved_families(&self) -> Families {
        let mut f = Families::default();
        for c in &self.capabilities {
            if let Capability::GracefulRestart { families, .. } = c {
                for (afi, safi, _) in families {
                    f.ipv4 |= (*afi, *safi) == (AFI_IPV4, SAFI_UNICAST);
                    f.ipv6 |= (*afi, *safi) == (AFI_IPV6, SAFI_UNICAST);
                }
            }
        }
        f
    }
}

/// Which unicast address families a session carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Families {
    pub const IPV4: Families = Families {
        ipv4: true,
        ipv6: false,
    };
    pub const BOTH: Families = Families {
        ipv4: true,
        ipv6: true,
    };

    /// What both sides advertised: the only families a session may carry (RFC 4760 §6).
    pub fn both(self, other: Families) -> Families {
        Families {
            ipv4: self.ipv4 && other.ipv4,
            ipv6: self.ipv6 && other.ipv6,
        }
    }

    pub fn carries(self, prefix: &IpNetwork) -> bool {
        if prefix.is_ipv4() {
            self.ipv4
        } else {
            self.ipv6
        }
    }

    pub fn is_empty(self) -> bool {
        !self.ipv4 && !self.ipv6
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AsSegment {
    Set(Vec<u32>),
    Sequence(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathAttr {
    Origin(Origin),
    AsPath(Vec<AsSegment>),
    NextHop(Ipv4Addr),
    Med(u32),
    LocalPref(u32),
    AtomicAggregate,
    Aggregator {
        asn: u32,
        addr: Ipv4Addr,
    },
    Communities(Vec<u32>),
    OriginatorId(Ipv4Addr),
    ClusterList(Vec<Ipv4Addr>),
    MpReach {
        afi: u16,
        safi: u8,
        next_hops: Vec<IpAddr>,
        nlri: Vec<IpNetwork>,
    },
    MpUnreach {
        afi: u16,
        safi: u8,
        withdrawn: Vec<IpNetwork>,
    },
    As4Path(Vec<AsSegment>),
    As4Aggregator {
        asn: u32,
        addr: Ipv4Addr,
    },
    /// Kept as received (optional transitive ones are passed on with the Partial bit).
    Unknown {
        flags: u8,
        code: u8,
        data: Vec<u8>,
    },
}

pub mod attr {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MED: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH: u8 = 14;
    pub const MP_UNREACH: u8 = 15;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = 18;

    pub const OPTIONAL: u8 = 0x80;
    pub const TRANSITIVE: u8 = 0x40;
    pub const PARTIAL: u8 = 0x20;
    pub const EXTENDED: u8 = 0x10;
}

impl PathAttr {
    pub fn code(&self) -> u8 {
        use attr::*;
        match self {
            PathAttr::Origin(_) => ORIGIN,
            PathAttr::AsPath(_) => AS_PATH,
            PathAttr::NextHop(_) => NEXT_HOP,
            PathAttr::Med(_) => MED,
            PathAttr::LocalPref(_) => LOCAL_PREF,
            PathAttr::AtomicAggregate => ATOMIC_AGGREGATE,
            PathAttr::Aggregator { .. } => AGGREGATOR,
            PathAttr::Communities(_) => COMMUNITIES,
            PathAttr::OriginatorId(_) => ORIGINATOR_ID,
            PathAttr::ClusterList(_) => CLUSTER_LIST,
            PathAttr::MpReach { .. } => MP_REACH,
            PathAttr::MpUnreach { .. } => MP_UNREACH,
            PathAttr::As4Path(_) => AS4_PATH,
            PathAttr::As4Aggregator { .. } => AS4_AGGREGATOR,
            PathAttr::Unknown { code, .. } => *code,
        }
    }

    /// The flags RFC 4271 §5 (and the defining RFCs) prescribe, without Extended Length.
    fn flags(&self) -> u8 {
        use attr::*;
        match self {
            PathAttr::Origin(_)
            | PathAttr::AsPath(_)
            | PathAttr::NextHop(_)
            | PathAttr::LocalPref(_)
            | PathAttr::AtomicAggregate => TRANSITIVE,
            PathAttr::Med(_)
            | PathAttr::OriginatorId(_)
            | PathAttr::ClusterList(_)
            | PathAttr::MpReach { .. }
            | PathAttr::MpUnreach { .. } => OPTIONAL,
            PathAttr::Aggregator { .. }
            | PathAttr::Communities(_)
            | PathAttr::As4Path(_)
            | PathAttr::As4Aggregator { .. } => OPTIONAL | TRANSITIVE,
            PathAttr::Unknown { flags, .. } => *flags & !EXTENDED,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<Ipv4Network>,
    pub attrs: Vec<PathAttr>,
    pub nlri: Vec<Ipv4Network>,
    /// RFC 7606: an attribute was malformed in a way that withdraws this UPDATE's NLRI
    /// instead of resetting the session.
    pub treat_as_withdraw: bool,
    /// Codes of attributes that came with the Extended Length flag although short (BIRD sends
    /// MP_REACH_NLRI that way); kept so that re-encoding gives the same bytes.
    pub extended_length: Vec<u8>,
}

/// Every AFI a batch of messages says anything of (see [`Update::afis`]), sorted.
pub fn afis_of(messages: &[Message]) -> Vec<u16> {
    let mut out: Vec<u16> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => Some(u.afis()),
            _ => None,
        })
        .flatten()
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

impl Update {
    pub fn attr(&self, code: u8) -> Option<&PathAttr> {
        self.attrs.iter().find(|a| a.code() == code)
    }

    /// The AFIs this UPDATE says anything of: its MP attributes' AFIs, and IPv4 for the
    /// IPv4 fields (NLRI, withdrawn routes, NEXT_HOP) or an empty UPDATE (the IPv4
    /// End-of-RIB), sorted.
    pub fn afis(&self) -> Vec<u16> {
        let mut out: Vec<u16> = self
            .attrs
            .iter()
            .filter_map(|a| match a {
                PathAttr::MpReach { afi, .. } | PathAttr::MpUnreach { afi, .. } => Some(*afi),
                _ => None,
            })
            .collect();
        let v4_fields = !self.nlri.is_empty()
            || !self.withdrawn.is_empty()
            || self.attrs.iter().any(|a| matches!(a, PathAttr::NextHop(_)))
            || self.attrs.is_empty();
        if v4_fields {
            out.push(AFI_IPV4);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Every prefix this UPDATE announces, IPv4 and multiprotocol.
    pub fn announced(&self) -> Vec<IpNetwork> {
        let mut out: Vec<IpNetwork> = self.nlri.iter().map(|n| IpNetwork::V4(*n)).collect();
        for a in &self.attrs {
            if let PathAttr::MpReach { nlri, .. } = a {
                out.extend(nlri.iter().copied());
            }
        }
        out
    }

    /// Every prefix this UPDATE withdraws (including, under treat-as-withdraw, those it
    /// announced).
    pub fn withdrawn_all(&self) -> Vec<IpNetwork> {
        let mut out: Vec<IpNetwork> = self.withdrawn.iter().map(|n| IpNetwork::V4(*n)).collect();
        for a in &self.attrs {
            if let PathAttr::MpUnreach { withdrawn, .. } = a {
                out.extend(withdrawn.iter().copied());
            }
        }
        if self.treat_as_withdraw {
            out.extend(self.announced());
        }
        out
    }

    /// End-of-RIB marker (RFC 4724 §2): an empty UPDATE (IPv4) or an MP_UNREACH with no
    /// prefixes (other families).
    pub fn end_of_rib(&self) -> Option<(u16, u8)> {
        if self.withdrawn.is_empty() && self.nlri.is_empty() && self.attrs.is_empty() {
            return Some((AFI_IPV4, SAFI_UNICAST));
        }
        match self.attrs.as_slice() {
            [PathAttr::MpUnreach {
                afi,
                safi,
                withdrawn,
            }] if withdrawn.is_empty() && self.nlri.is_empty() => Some((*afi, *safi)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh { afi: u16, safi: u8 },
}

impl From<&DecodeError> for Notification {
    fn from(e: &DecodeError) -> Self {
        Notification {
            code: e.code,
            subcode: e.subcode,
            data: e.data.clone(),
        }
    }
}

/// What the codec must know of the session: 4-octet AS numbers in AS_PATH, and messages up
/// to 65535 octets, once both sides announced the capability.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ctx {
    pub four_octet_as: bool,
    pub extended_message: bool,
}

impl Ctx {
    /// The largest message either side may send on this session.
    pub fn max_len(self) -> usize {
        if self.extended_message {
            MAX_EXTENDED_LEN
        } else {
            MAX_LEN
        }
    }
}

// ---- decoding -----------------------------------------------------------------------------

/// Splits one message off the front of `buf`: `Ok(None)` if incomplete.
pub fn frame(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    frame_within(buf, MAX_LEN)
}

/// [`frame`] for a session whose messages may be up to `max_len` octets.
pub fn frame_within(buf: &[u8], max_len: usize) -> Result<Option<usize>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return fail(err::HEADER, err::NOT_SYNCHRONIZED, &[], "bad marker");
    }
    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
    if !(HEADER_LEN..=max_len).contains(&len) {
        return fail(
            err::HEADER,
            err::BAD_LENGTH,
            &buf[16..18],
            "message length out of range",
        );
    }
    Ok((buf.len() >= len).then_some(len))
}

/// Decodes one whole message (header included).
pub fn decode(msg: &[u8], ctx: Ctx) -> Result<Message, DecodeError> {
    if frame_within(msg, ctx.max_len())? != Some(msg.len()) {
        return fail(
            err::HEADER,
            err::BAD_LENGTH,
            msg.get(16..18).unwrap_or(&[]),
            "length field disagrees with the message",
        );
    }
    let ty = msg[18];
    let body = &msg[HEADER_LEN..];
    let len_field = &msg[16..18];
    match ty {
        1 => {
            if body.len() < 10 {
                return fail(err::HEADER, err::BAD_LENGTH, len_field, "OPEN too short");
            }
            decode_open(body).map(Message::Open)
        }
        2 => {
            if body.len() < 4 {
                return fail(err::HEADER, err::BAD_LENGTH, len_field, "UPDATE too short");
            }
            decode_update(body, ctx).map(Message::Update)
        }
        3 => {
            if body.len() < 2 {
                return fail(
                    err::HEADER,
                    err::BAD_LENGTH,
                    len_field,
                    "NOTIFICATION too short",
                );
            }
            Ok(Message::Notification(Notification {
                code: body[0],
                subcode: body[1],
                data: body[2..].to_vec(),
            }))
        }
        4 => {
            if !body.is_empty() {
                return fail(
                    err::HEADER,
                    err::BAD_LENGTH,
                    len_field,
                    "KEEPALIVE with a body",
                );
            }
            Ok(Message::Keepalive)
        }
        5 => {
            if body.len() != 4 {
                return fail(
                    err::ROUTE_REFRESH,
                    err::INVALID_MESSAGE_LENGTH,
                    msg,
                    "ROUTE-REFRESH length",
                );
            }
            Ok(Message::RouteRefresh {
                afi: u16::from_be_bytes([body[0], body[1]]),
                safi: body[3],
            })
        }
        _ => fail(err::HEADER, err::BAD_TYPE, &[ty], "unknown message type"),
    }
}

fn decode_open(mut b: &[u8]) -> Result<Open, DecodeError> {
    let version = b.get_u8();
    if version != 4 {
        return fail(
            err::OPEN,
            err::UNSUPPORTED_VERSION,
            &[0, 4],
            "unsupported BGP version",
        );
    }
    let my_as = b.get_u16();
    let hold_time = b.get_u16();
    if hold_time == 1 || hold_time == 2 {
        return fail(
            err::OPEN,
            err::UNACCEPTABLE_HOLD_TIME,
            &[],
            "hold time 1 or 2",
        );
    }
    let bgp_id = Ipv4Addr::from(b.get_u32());
    if bgp_id.is_unspecified() || bgp_id.is_multicast() || bgp_id.is_broadcast() {
        return fail(err::OPEN, err::BAD_BGP_ID, &[], "invalid BGP identifier");
    }
    let opt_len = usize::from(b.get_u8());
    if opt_len != b.len() {
        return fail(
            err::HEADER,
            err::BAD_LENGTH,
            &[],
            "optional parameters length disagrees with the message",
        );
    }
    let mut capabilities = Vec::new();
    while b.has_remaining() {
        if b.len() < 2 {
            return fail(err::OPEN, 0, &[], "truncated optional parameter");
        }
        let ptype = b.get_u8();
        let plen = usize::from(b.get_u8());
        if plen > b.len() {
            return fail(err::OPEN, 0, &[], "optional parameter overruns the message");
        }
        let mut p = &b[..plen];
        b.advance(plen);
        if ptype != 2 {
            return fail(
                err::OPEN,
                err::UNSUPPORTED_OPT_PARAM,
                &[],
                "unsupported optional parameter",
            );
        }
        while p.has_remaining() {
            if p.len() < 2 {
                return fail(err::OPEN, 0, &[], "truncated capability");
            }
            let code = p.get_u8();
            let clen = usize::from(p.get_u8());
            if clen > p.len() {
                return fail(err::OPEN, 0, &[], "capability overruns its parameter");
            }
            let mut c = &p[..clen];
            p.advance(clen);
            capabilities.push(match (code, clen) {
                (1, 4) => {
                    let afi = c.get_u16();
                    c.get_u8();
                    Capability::MultiProtocol {
                        afi,
                        safi: c.get_u8(),
                    }
                }
                (2, 0) => Capability::RouteRefresh,
                (64, n) if n >= 2 && (n - 2) % 4 == 0 => {
                    let flags_time = c.get_u16();
                    let mut families = Vec::new();
                    while c.has_remaining() {
                        let afi = c.get_u16();
                        let safi = c.get_u8();
                        let f = c.get_u8();
                        families.push((afi, safi, f & 0x80 != 0));
                    }
                    Capability::GracefulRestart {
                        restarting: flags_time & 0x8000 != 0,
                        time: flags_time & 0x0fff,
                        families,
                    }
                }
                (65, 4) => Capability::FourOctetAs(c.get_u32()),
                (6, 0) => Capability::ExtendedMessage,
                (code, _) => Capability::Unknown {
                    code,
                    data: c.to_vec(),
                },
            });
        }
    }
    Ok(Open {
        version,
        my_as,
        hold_time,
        bgp_id,
        capabilities,
    })
}

fn decode_prefixes(mut b: &[u8], ipv4: bool) -> Result<Vec<IpNetwork>, DecodeError> {
    let max = if ipv4 { 32 } else { 128 };
    let mut out = Vec::new();
    while b.has_remaining() {
        let plen = b.get_u8();
        if plen > max {
            return fail(
                err::UPDATE,
                err::INVALID_NETWORK,
                &[],
                "prefix length too long",
            );
        }
        let n = usize::from(plen).div_ceil(8);
        if n > b.len() {
            return fail(
                err::UPDATE,
                err::INVALID_NETWORK,
                &[],
                "prefix overruns the field",
            );
        }
        let mut bytes = [0u8; 16];
        bytes[..n].copy_from_slice(&b[..n]);
        b.advance(n);
        let net = if ipv4 {
            let a = Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]);
            Ipv4Network::new(a, plen)
                .map(|n| IpNetwork::V4(Ipv4Network::new(n.network(), plen).unwrap_or(n)))
        } else {
            Ipv6Network::new(Ipv6Addr::from(bytes), plen)
                .map(|n| IpNetwork::V6(Ipv6Network::new(n.network(), plen).unwrap_or(n)))
        };
        out.push(net.map_err(|_| DecodeError {
            code: err::UPDATE,
            subcode: err::INVALID_NETWORK,
            data: vec![],
            reason: "bad prefix",
        })?);
    }
    Ok(out)
}

fn v4_only(nets: Vec<IpNetwork>) -> Vec<Ipv4Network> {
    nets.into_iter()
        .filter_map(|n| match n {
            IpNetwork::V4(v) => Some(v),
            IpNetwork::V6(_) => None,
        })
        .collect()
}

/// An attribute error, and what RFC 7606 says to do with it.
enum AttrError {
    /// Session reset with this NOTIFICATION.
    Reset(DecodeError),
    /// Treat the UPDATE's NLRI as withdrawn.
    Withdraw,
    /// Drop the attribute and carry on.
    Discard,
}

fn decode_update(mut b: &[u8], ctx: Ctx) -> Result<Update, DecodeError> {
    let wlen = usize::from(b.get_u16());
    if wlen + 2 > b.len() {
        return fail(
            err::UPDATE,
            err::MALFORMED_ATTR_LIST,
            &[],
            "withdrawn routes overrun the message",
        );
    }
    let withdrawn = v4_only(decode_prefixes(&b[..wlen], true)?);
    b.advance(wlen);
    let alen = usize::from(b.get_u16());
    if alen > b.len() {
        return fail(
            err::UPDATE,
            err::MALFORMED_ATTR_LIST,
            &[],
            "path attributes overrun the message",
        );
    }
    let mut attrs_buf = &b[..alen];
    let nlri = v4_only(decode_prefixes(&b[alen..], true)?);
    let mut u = Update {
        withdrawn,
        nlri,
        ..Default::default()
    };
    let mut seen = [false; 256];
    while attrs_buf.has_remaining() {
        if attrs_buf.len() < 3 {
            return fail(
                err::UPDATE,
                err::MALFORMED_ATTR_LIST,
                &[],
                "truncated attribute header",
            );
        }
        let flags = attrs_buf.get_u8();
        let code = attrs_buf.get_u8();
        let len = if flags & attr::EXTENDED != 0 {
            if attrs_buf.len() < 2 {
                return fail(
                    err::UPDATE,
                    err::MALFORMED_ATTR_LIST,
                    &[],
                    "truncated attribute length",
                );
            }
            usize::from(attrs_buf.get_u16())
        } else {
            usize::from(attrs_buf.get_u8())
        };
        if len > attrs_buf.len() {
            // RFC 7606 §4: the attribute list cannot be parsed further.
            return fail(
                err::UPDATE,
                err::MALFORMED_ATTR_LIST,
                &[],
                "attribute overruns the list",
            );
        }
        let data = &attrs_buf[..len];
        attrs_buf.advance(len);
        if flags & attr::EXTENDED != 0 && len <= 255 {
            u.extended_length.push(code);
        }
        if seen[usize::from(code)] {
            if code == attr::MP_REACH || code == attr::MP_UNREACH {
                return fail(
                    err::UPDATE,
                    err::MALFORMED_ATTR_LIST,
                    &[],
                    "repeated MP attribute",
                );
            }
            u.treat_as_withdraw = true;
            continue;
        }
        seen[usize::from(code)] = true;
        match decode_attr(flags, code, data, ctx) {
            Ok(a) => u.attrs.push(a),
            Err(AttrError::Reset(e)) => return Err(e),
            Err(AttrError::Withdraw) => u.treat_as_withdraw = true,
            Err(AttrError::Discard) => {}
        }
    }
    // Mandatory well-known attributes, when something is announced (RFC 7606 §3.d: treat-as-withdraw).
    let announces = !u.nlri.is_empty() || u.attr(attr::MP_REACH).is_some();
    if announces && !u.treat_as_withdraw {
        let has = |c| u.attr(c).is_some();
        if !has(attr::ORIGIN) || !has(attr::AS_PATH) || (!u.nlri.is_empty() && !has(attr::NEXT_HOP))
        {
            u.treat_as_withdraw = true;
        }
    }
    if !ctx.four_octet_as {
        merge_as4_path(&mut u);
    }
    Ok(u)
}

fn decode_as_path(mut d: &[u8], four: bool) -> Option<Vec<AsSegment>> {
    let w = if four { 4 } else { 2 };
    let mut segs = Vec::new();
    while d.has_remaining() {
        if d.len() < 2 {
            return None;
        }
        let ty = d.get_u8();
        let n = usize::from(d.get_u8());
        if n == 0 || d.len() < n * w {
            return None;
        }
        let asns: Vec<u32> = (0..n)
            .map(|_| {
                if four {
                    d.get_u32()
                } else {
                    u32::from(d.get_u16())
                }
            })
            .collect();
        segs.push(match ty {
            1 => AsSegment::Set(asns),
            2 => AsSegment::Sequence(asns),
            _ => return None,
        });
    }
    Some(segs)
}

fn decode_attr(flags: u8, code: u8, d: &[u8], ctx: Ctx) -> Result<PathAttr, AttrError> {
    use attr::*;
    let well_known = matches!(
        code,
        ORIGIN | AS_PATH | NEXT_HOP | LOCAL_PREF | ATOMIC_AGGREGATE
    );
    let optional = flags & OPTIONAL != 0;
    // RFC 7606 §3.c: flag errors on recognised attributes are treated as length errors.
    let expected = |f: u8| (flags & (OPTIONAL | TRANSITIVE)) == f;
    let ipv4 = |d: &[u8]| Ipv4Addr::new(d[0], d[1], d[2], d[3]);
    Ok(match code {
        ORIGIN => {
            if d.len() != 1 || !expected(TRANSITIVE) {
                return Err(AttrError::Withdraw);
            }
            PathAttr::Origin(match d[0] {
                0 => Origin::Igp,
                1 => Origin::Egp,
                2 => Origin::Incomplete,
                _ => return Err(AttrError::Withdraw),
            })
        }
        AS_PATH => {
            if !expected(TRANSITIVE) {
                return Err(AttrError::Withdraw);
            }
            PathAttr::AsPath(decode_as_path(d, ctx.four_octet_as).ok_or(AttrError::Withdraw)?)
        }
        NEXT_HOP => {
            if d.len() != 4 || !expected(TRANSITIVE) {
                return Err(AttrError::Withdraw);
            }
            let nh = ipv4(d);
            if nh.is_unspecified() || nh.is_multicast() || nh.is_broadcast() {
                return Err(AttrError::Withdraw);
            }
            PathAttr::NextHop(nh)
        }
        MED | LOCAL_PREF => {
            if d.len() != 4 {
                return Err(AttrError::Withdraw);
            }
            let v = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
            if code == MED {
                PathAttr::Med(v)
            } else {
                PathAttr::LocalPref(v)
            }
        }
        ATOMIC_AGGREGATE => {
            if !d.is_empty() {
                return Err(AttrError::Discard);
            }
            PathAttr::AtomicAggregate
        }
        AGGREGATOR => {
            let w = if ctx.four_octet_as { 8 } else { 6 };
            if d.len() != w {
                return Err(AttrError::Discard);
            }
            let (asn, rest) = if ctx.four_octet_as {
                (u32::from_be_bytes([d[0], d[1], d[2], d[3]]), &d[4..])
            } else {
                (u32::from(u16::from_be_bytes([d[0], d[1]])), &d[2..])
            };
            PathAttr::Aggregator {
                asn,
                addr: ipv4(rest),
            }
        }
        COMMUNITIES => {
            if d.len() % 4 != 0 {
                return Err(AttrError::Withdraw);
            }
            PathAttr::Communities(
                d.chunks(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
        ORIGINATOR_ID => {
            if d.len() != 4 {
                return Err(AttrError::Withdraw);
            }
            PathAttr::OriginatorId(ipv4(d))
        }
        CLUSTER_LIST => {
            if d.len() % 4 != 0 {
                return Err(AttrError::Withdraw);
            }
            PathAttr::ClusterList(d.chunks(4).map(ipv4).collect())
        }
        MP_REACH => decode_mp_reach(d).ok_or_else(|| {
            AttrError::Reset(DecodeError {
                code: err::UPDATE,
                subcode: err::OPTIONAL_ATTR,
                data: vec![],
                reason: "malformed MP_REACH_NLRI",
            })
        })?,
        MP_UNREACH => {
            if d.len() < 3 {
                return Err(AttrError::Reset(DecodeError {
                    code: err::UPDATE,
                    subcode: err::OPTIONAL_ATTR,
                    data: vec![],
                    reason: "malformed MP_UNREACH_NLRI",
                }));
            }
            let afi = u16::from_be_bytes([d[0], d[1]]);
            let safi = d[2];
            let withdrawn = decode_prefixes(&d[3..], afi == AFI_IPV4).map_err(AttrError::Reset)?;
            PathAttr::MpUnreach {
                afi,
                safi,
                withdrawn,
            }
        }
        AS4_PATH => match decode_as_path(d, true) {
            Some(p) => PathAttr::As4Path(p),
            None => return Err(AttrError::Discard),
        },
        AS4_AGGREGATOR => {
            if d.len() != 8 {
                return Err(AttrError::Discard);
            }
            PathAttr::As4Aggregator {
                asn: u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                addr: ipv4(&d[4..]),
            }
        }
        _ if !optional => {
            return Err(AttrError::Reset(DecodeError {
                code: err::UPDATE,
                subcode: err::UNRECOGNIZED_WELL_KNOWN,
                data: vec![flags, code, d.len() as u8],
                reason: "unrecognised well-known attribute",
            }))
        }
        _ => {
            let _ = well_known;
            PathAttr::Unknown {
                flags: if flags & TRANSITIVE != 0 {
                    flags | PARTIAL
                } else {
                    flags
                },
                code,
                data: d.to_vec(),
            }
        }
    })
}

fn decode_mp_reach(mut d: &[u8]) -> Option<PathAttr> {
    if d.len() < 5 {
        return None;
    }
    let afi = d.get_u16();
    let safi = d.get_u8();
    let nh_len = usize::from(d.get_u8());
    if nh_len > d.len() {
        return None;
    }
    let nh = &d[..nh_len];
    let next_hops = match (afi, nh_len) {
        (AFI_IPV4, 4) => vec![IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3]))],
        (AFI_IPV6, 16) | (AFI_IPV6, 32) => nh
            .chunks(16)
            .map(|c| {
                let mut a = [0u8; 16];
                a.copy_from_slice(c);
                IpAddr::V6(Ipv6Addr::from(a))
            })
            .collect(),
        _ => return None,
    };
    d.advance(nh_len);
    if !d.has_remaining() {
        return None;
    }
    d.get_u8(); // reserved
    let nlri = decode_prefixes(d, afi == AFI_IPV4).ok()?;
    Some(PathAttr::MpReach {
        afi,
        safi,
        next_hops,
        nlri,
    })
}

/// RFC 6793 §4.2.3: a 2-octet speaker's AS_PATH (with AS_TRANS) and AS4_PATH combine into
/// the real path; the AS4 attributes are then dropped.
fn merge_as4_path(u: &mut Update) {
    let as4 = u.attrs.iter().find_map(|a| match a {
        PathAttr::As4Path(p) => Some(p.clone()),
        _ => None,
    });
    u.attrs.retain(|a| !matches!(a, PathAttr::As4Path(_)));
    let Some(as4) = as4 else { return };
    let count = |p: &[AsSegment]| -> usize {
        p.iter()
            .map(|s| match s {
                AsSegment::Sequence(v) => v.len(),
                AsSegment::Set(_) => 1,
            })
            .sum()
    };
    for a in &mut u.attrs {
        if let PathAttr::AsPath(path) = a {
            let (n, n4) = (count(path), count(&as4));
            if n4 > n {
                return; // ignore AS4_PATH (RFC 6793 §4.2.3)
            }
            // Keep the leading (n - n4) ASes of AS_PATH, then AS4_PATH.
            let mut keep = n - n4;
            let mut merged = Vec::new();
            for seg in path.iter() {
                if keep == 0 {
                    break;
                }
                match seg {
                    AsSegment::Sequence(v) => {
                        let take = keep.min(v.len());
                        merged.push(AsSegment::Sequence(v[..take].to_vec()));
                        keep -= take;
                    }
                    AsSegment::Set(v) => {
                        merged.push(AsSegment::Set(v.clone()));
                        keep -= 1;
                    }
                }
            }
            merged.extend(as4.iter().cloned());
            *path = merged;
        }
    }
}

// ---- encoding -----------------------------------------------------------------------------

fn put_header(buf: &mut BytesMut, ty: u8) -> usize {
    let start = buf.len();
    buf.put_slice(&[0xff; 16]);
    buf.put_u16(0);
    buf.put_u8(ty);
    start
}

fn finish(buf: &mut BytesMut, start: usize) {
    let len = (buf.len() - start) as u16;
    buf[start + 16..start + 18].copy_from_slice(&len.to_be_bytes());
}

/// A message longer than the session allows (4096 octets, or 65535 with Extended Message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {len}-octet message exceeds the session's {max}-octet limit")]
pub struct Oversize {
    pub len: usize,
    pub max: usize,
}

/// Encodes `msg`, refusing one longer than the session allows: nothing oversize reaches the
/// wire (OPEN and KEEPALIVE stay within 4096 octets whatever was negotiated).
pub fn encode_checked(msg: &Message, ctx: Ctx) -> Result<Bytes, Oversize> {
    let max = match msg {
        Message::Open(_) | Message::Keepalive => MAX_LEN,
        _ => ctx.max_len(),
    };
    let mut buf = BytesMut::with_capacity(64);
    encode_into(msg, ctx, &mut buf);
    if buf.len() > max {
        return Err(Oversize {
            len: buf.len(),
            max,
        });
    }
    Ok(buf.freeze())
}

pub fn encode(msg: &Message, ctx: Ctx) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    encode_into(msg, ctx, &mut buf);
    buf.freeze()
}

pub fn encode_into(msg: &Message, ctx: Ctx, buf: &mut BytesMut) {
    match msg {
        Message::Open(o) => {
            let s = put_header(buf, 1);
            buf.put_u8(o.version);
            buf.put_u16(o.my_as);
            buf.put_u16(o.hold_time);
            buf.put_slice(&o.bgp_id.octets());
            let mut caps = BytesMut::new();
            for c in &o.capabilities {
                encode_capability(c, &mut caps);
            }
            if caps.is_empty() {
                buf.put_u8(0);
            } else {
                buf.put_u8((caps.len() + 2) as u8);
                buf.put_u8(2);
                buf.put_u8(caps.len() as u8);
                buf.put_slice(&caps);
            }
            finish(buf, s);
        }
        Message::Update(u) => {
            let s = put_header(buf, 2);
            let mut w = BytesMut::new();
            for n in &u.withdrawn {
                put_prefix(&mut w, IpNetwork::V4(*n));
            }
            buf.put_u16(w.len() as u16);
            buf.put_slice(&w);
            let mut a = BytesMut::new();
            for attr in &u.attrs {
                encode_attr(attr, ctx, u.extended_length.contains(&attr.code()), &mut a);
            }
            buf.put_u16(a.len() as u16);
            buf.put_slice(&a);
            for n in &u.nlri {
                put_prefix(buf, IpNetwork::V4(*n));
            }
            finish(buf, s);
        }
        Message::Notification(n) => {
            let s = put_header(buf, 3);
            buf.put_u8(n.code);
            buf.put_u8(n.subcode);
            buf.put_slice(&n.data);
            finish(buf, s);
        }
        Message::Keepalive => {
            let s = put_header(buf, 4);
            finish(buf, s);
        }
        Message::RouteRefresh { afi, safi } => {
            let s = put_header(buf, 5);
            buf.put_u16(*afi);
            buf.put_u8(0);
            buf.put_u8(*safi);
            finish(buf, s);
        }
    }
}

fn encode_capability(c: &Capability, b: &mut BytesMut) {
    match c {
        Capability::MultiProtocol { afi, safi } => {
            b.put_slice(&[1, 4]);
            b.put_u16(*afi);
            b.put_u8(0);
            b.put_u8(*safi);
        }
        Capability::RouteRefresh => b.put_slice(&[2, 0]),
        Capability::GracefulRestart {
            restarting,
            time,
            families,
        } => {
            b.put_u8(64);
            b.put_u8((2 + 4 * families.len()) as u8);
            b.put_u16(if *restarting { 0x8000 } else { 0 } | (time & 0x0fff));
            for (afi, safi, fwd) in families {
                b.put_u16(*afi);
                b.put_u8(*safi);
                b.put_u8(if *fwd { 0x80 } else { 0 });
            }
        }
        Capability::FourOctetAs(a) => {
            b.put_slice(&[65, 4]);
            b.put_u32(*a);
        }
        Capability::ExtendedMessage => b.put_slice(&[6, 0]),
        Capability::Unknown { code, data } => {
            b.put_u8(*code);
            b.put_u8(data.len() as u8);
            b.put_slice(data);
        }
    }
}

fn put_prefix(b: &mut BytesMut, n: IpNetwork) {
    let plen = n.prefix();
    b.put_u8(plen);
    let bytes = usize::from(plen).div_ceil(8);
    match n.network() {
        IpAddr::V4(a) => b.put_slice(&a.octets()[..bytes]),
        IpAddr::V6(a) => b.put_slice(&a.octets()[..bytes]),
    }
}

fn put_as_path(segs: &[AsSegment], four: bool, b: &mut BytesMut) {
    for s in segs {
        let (ty, v) = match s {
            AsSegment::Set(v) => (1, v),
            AsSegment::Sequence(v) => (2, v),
        };
        // A segment holds at most 255 ASes.
        for chunk in v.chunks(255) {
            b.put_u8(ty);
            b.put_u8(chunk.len() as u8);
            for a in chunk {
                if four {
                    b.put_u32(*a);
                } else {
                    b.put_u16(u16::try_from(*a).unwrap_or(AS_TRANS));
                }
            }
        }
    }
}

fn encode_attr(a: &PathAttr, ctx: Ctx, extended: bool, out: &mut BytesMut) {
    let mut d = BytesMut::new();
    match a {
        PathAttr::Origin(o) => d.put_u8(*o as u8),
        PathAttr::AsPath(p) => put_as_path(p, ctx.four_octet_as, &mut d),
        PathAttr::NextHop(n) => d.put_slice(&n.octets()),
        PathAttr::Med(v) | PathAttr::LocalPref(v) => d.put_u32(*v),
        PathAttr::AtomicAggregate => {}
        PathAttr::Aggregator { asn, addr } => {
            if ctx.four_octet_as {
                d.put_u32(*asn);
            } else {
                d.put_u16(u16::try_from(*asn).unwrap_or(AS_TRANS));
            }
            d.put_slice(&addr.octets());
        }
        PathAttr::Communities(c) => c.iter().for_each(|v| d.put_u32(*v)),
        PathAttr::OriginatorId(a) => d.put_slice(&a.octets()),
        PathAttr::ClusterList(l) => l.iter().for_each(|a| d.put_slice(&a.octets())),
        PathAttr::MpReach {
            afi,
            safi,
            next_hops,
            nlri,
        } => {
            d.put_u16(*afi);
            d.put_u8(*safi);
            let nh: Vec<u8> = next_hops
                .iter()
                .flat_map(|n| match n {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                })
                .collect();
            d.put_u8(nh.len() as u8);
            d.put_slice(&nh);
            d.put_u8(0);
            nlri.iter().for_each(|n| put_prefix(&mut d, *n));
        }
        PathAttr::MpUnreach {
            afi,
            safi,
            withdrawn,
        } => {
            d.put_u16(*afi);
            d.put_u8(*safi);
            withdrawn.iter().for_each(|n| put_prefix(&mut d, *n));
        }
        PathAttr::As4Path(p) => put_as_path(p, true, &mut d),
        PathAttr::As4Aggregator { asn, addr } => {
            d.put_u32(*asn);
            d.put_slice(&addr.octets());
        }
        PathAttr::Unknown { data, .. } => d.put_slice(data),
    }
    let extended = extended || d.len() > 255;
    let mut flags = a.flags();
    if extended {
        flags |= attr::EXTENDED;
    }
    out.put_u8(flags);
    out.put_u8(a.code());
    if extended {
        out.put_u16(d.len() as u16);
    } else {
        out.put_u8(d.len() as u8);
    }
    out.put_slice(&d);
}

/// For a peer without 4-octet AS support: AS_TRANS in AS_PATH for large ASes, and the real
/// path in AS4_PATH (RFC 6793 §4.2.2).
pub fn add_as4_path(attrs: &mut Vec<PathAttr>) {
    let path = attrs.iter().find_map(|a| match a {
        PathAttr::AsPath(p) => Some(p.clone()),
        _ => None,
    });
    if let Some(p) = path {
        let big = p.iter().any(|s| match s {
            AsSegment::Set(v) | AsSegment::Sequence(v) => {
                v.iter().any(|a| *a > u32::from(u16::MAX))
            }
        });
        if big {
            attrs.push(PathAttr::As4Path(p));
        }
    }
}

#[cfg(test)]
mod tests;
