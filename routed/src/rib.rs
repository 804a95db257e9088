//! The RIBs (RFC 4271 §3.2, §9.1), pure: Adj-RIB-In per peer, the Loc-RIB with the decision
//! process, and the export rules that make the Adj-RIB-Out (iBGP split horizon, route
//! reflection per RFC 4456, eBGP AS prepend and next-hop self).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnetwork::IpNetwork;

use crate::packet::{AsSegment, Origin, PathAttr, Update};
use table::PrefixTable;

mod table;

/// A peer, by its address.
pub type PeerId = IpAddr;

/// The attributes a route carries, shared between the prefixes of one UPDATE.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attrs {
    pub origin: Origin,
    pub as_path: Vec<AsSegment>,
    pub next_hop: IpAddr,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub communities: Vec<u32>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    /// Unknown optional transitive attributes, passed on.
    pub other: Vec<PathAttr>,
}

impl Attrs {
    /// The attributes of a route we originate (our blocks): IGP, empty AS path.
    pub fn originated(next_hop: IpAddr) -> Attrs {
        Attrs {
            origin: Origin::Igp,
            as_path: vec![],
            next_hop,
            med: None,
            local_pref: None,
            communities: vec![],
            originator_id: None,
            cluster_list: vec![],
            other: vec![],
        }
    }

    pub fn as_path_len(&self) -> usize {
        self.as_path
            .iter()
            .map(|s| match s {
                AsSegment::Sequence(v) => v.len(),
                AsSegment::Set(_) => 1,
            })
            .sum()
    }

    pub fn contains_as(&self, asn: u32) -> bool {
        self.as_path.iter().any(|s| match s {
            AsSegment::Sequence(v) | AsSegment::Set(v) => v.contains(&asn),
        })
    }

    /// Builds the attributes of a received UPDATE for one address family.
    pub fn from_update(u: &Update, ipv6: bool) -> Option<Attrs> {
        let mut a = Attrs {
            origin: Origin::Incomplete,
            as_path: Vec::new(),
            next_hop: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            med: None,
            local_pref: None,
            communities: Vec::new(),
            originator_id: None,
            cluster_list: Vec::new(),
            other: Vec::new(),
        };
        let mut next_hop = None;
        for attr in &u.attrs {
            match attr {
                PathAttr::Origin(o) => a.origin = *o,
                PathAttr::AsPath(p) => a.as_path = p.clone(),
                PathAttr::NextHop(n) if !ipv6 => next_hop = Some(IpAddr::V4(*n)),
                PathAttr::MpReach { next_hops, .. } if ipv6 => {
                    next_hop = ipv6_next_hop(next_hops);
                }
                PathAttr::MpReach { next_hops, afi, .. }
                    if !ipv6 && *afi == crate::packet::AFI_IPV4 =>
                {
                    next_hop = next_hops.first().copied();
                }
                PathAttr::Med(m) => a.med = Some(*m),
                PathAttr::LocalPref(l) => a.local_pref = Some(*l),
                PathAttr::Communities(c) => a.communities = c.clone(),
                PathAttr::OriginatorId(o) => a.originator_id = Some(*o),
                PathAttr::ClusterList(c) => a.cluster_list = c.clone(),
                PathAttr::Unknown { flags, .. } if flags & crate::packet::attr::TRANSITIVE != 0 => {
                    a.other.push(attr.clone())
                }
                _ => {}
            }
        }
        a.next_hop = next_hop?;
        Some(a)
    }
}

/// The IPv6 next hop to route by (RFC 2545 §3): the global address; when there is none
/// (BIRD sends `::` and the link-local address from an interface without a global one, FRR
/// the link-local address in both places), the link-local one, reached on the session's
/// interface.
fn ipv6_next_hop(next_hops: &[IpAddr]) -> Option<IpAddr> {
    let global = next_hops
        .iter()
        .find(|a| !a.is_unspecified() && !is_link_local(a));
    global
        .or_else(|| next_hops.iter().find(|a| is_link_local(a)))
        .copied()
}

/// An IPv6 link-local address (fe80::/10): meaningful only with an interface.
pub fn is_link_local(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// One route to a prefix: who told us and what they said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub attrs: Arc<Attrs>,
    /// `None` for routes we originate. Shared by every route of the peer.
    pub peer: Option<Arc<PeerInfo>>,
    /// Kept from before the peer's restart (RFC 4724): replaced or swept after End-of-RIB.
    pub stale: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub addr: PeerId,
    pub router_id: Ipv4Addr,
    pub ibgp: bool,
    /// The peer is our route-reflector client.
    pub rr_client: bool,
}

impl Path {
    fn local_pref(&self) -> u32 {
        self.attrs.local_pref.unwrap_or(100)
    }
}

/// The decision process (RFC 4271 §9.1.2.2, and RFC 4456 §9 for reflected routes): true when
/// `a` is preferred over `b`.
pub fn better(a: &Path, b: &Path) -> bool {
    use std::cmp::Ordering::*;
    let key_cmp = [
        // Higher LOCAL_PREF.
        b.local_pref().cmp(&a.local_pref()),
        // Routes we originate first.
        b.peer.is_none().cmp(&a.peer.is_none()),
        // Shorter AS_PATH.
        a.attrs.as_path_len().cmp(&b.attrs.as_path_len()),
        // Lower ORIGIN.
        a.attrs.origin.cmp(&b.attrs.origin),
        // Lower MED (compared across neighbours: Tessera's peers share one policy domain).
        a.attrs.med.unwrap_or(0).cmp(&b.attrs.med.unwrap_or(0)),
        // eBGP over iBGP.
        a.peer
            .as_ref()
            .map(|p| p.ibgp)
            .cmp(&b.peer.as_ref().map(|p| p.ibgp)),
        // Lower router id (ORIGINATOR_ID for reflected routes), shorter CLUSTER_LIST.
        ident(a).cmp(&ident(b)),
        a.attrs.cluster_list.len().cmp(&b.attrs.cluster_list.len()),
        // Lower peer address.
        a.peer
            .as_ref()
            .map(|p| p.addr)
            .cmp(&b.peer.as_ref().map(|p| p.addr)),
    ];
    key_cmp.into_iter().find(|o| *o != Equal) == Some(Less)
}

fn ident(p: &Path) -> u32 {
    p.attrs
        .originator_id
        .or(p.peer.as_ref().map(|x| x.router_id))
        .map(u32::from)
        .unwrap_or(0)
}

/// Equal for ECMP: same up to (not including) the router-id tie-breakers.
fn ecmp_equal(a: &Path, b: &Path) -> bool {
    a.local_pref() == b.local_pref()
        && a.peer.is_none() == b.peer.is_none()
        && a.attrs.as_path_len() == b.attrs.as_path_len()
        && a.attrs.origin == b.attrs.origin
        && a.attrs.med.unwrap_or(0) == b.attrs.med.unwrap_or(0)
        && a.peer.as_ref().map(|p| p.ibgp) == b.peer.as_ref().map(|p| p.ibgp)
}

/// A change of the best route(s) to a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BestChange {
    /// New best path, and the equal-cost set (best first) when ECMP is on.
    Best {
        prefix: IpNetwork,
        best: Path,
        multipath: Vec<Path>,
    },
    Gone {
        prefix: IpNetwork,
    },
}

/// The paths to one prefix, best first. Most prefixes have exactly one, kept inline.
#[derive(Debug, Clone)]
enum Paths {
    One(Path),
    /// Two or more, sorted by the decision process.
    Many(Vec<Path>),
}

impl Paths {
    fn as_slice(&self) -> &[Path] {
        match self {
            Paths::One(p) => std::slice::from_ref(p),
            Paths::Many(v) => v,
        }
    }

    fn best(&self) -> &Path {
        &self.as_slice()[0]
    }

    fn source(p: &Path) -> Option<PeerId> {
        p.peer.as_ref().map(|i| i.addr)
    }

    /// Puts `path` in place of the one from the same source (peer, or us); true if new.
    fn upsert(&mut self, path: Path) -> bool {
        let src = Self::source(&path);
        if let Paths::One(p) = self {
            if Self::source(p) == src {
                *p = path;
                return false;
            }
        }
        let mut v = match std::mem::replace(self, Paths::Many(Vec::new())) {
            Paths::One(p) => vec![p],
            Paths::Many(v) => v,
        };
        let new = match v.iter_mut().find(|p| Self::source(p) == src) {
            Some(slot) => {
                *slot = path;
                false
            }
            None => {
                v.push(path);
                true
            }
        };
        *self = Self::from_vec(v);
        new
    }

    /// Removes the path from `src`; returns whether there was one, and what is left.
    fn remove(self, src: Option<PeerId>) -> (bool, Option<Paths>) {
        if let Paths::One(p) = &self {
            return if Self::source(p) == src {
                (true, None)
            } else {
                (false, Some(self))
            };
        }
        let mut v = match self {
            Paths::One(p) => vec![p],
            Paths::Many(v) => v,
        };
        let before = v.len();
        v.retain(|p| Self::source(p) != src);
        let removed = v.len() != before;
        (removed, (!v.is_empty()).then(|| Self::from_vec(v)))
    }

    fn from_vec(mut v: Vec<Path>) -> Paths {
        if v.len() == 1 {
            if let Some(p) = v.pop() {
                return Paths::One(p);
            }
        }
        v.sort_by(|a, b| {
            if better(a, b) {
                std::cmp::Ordering::Less
            } else if better(b, a) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        v.shrink_to_fit();
        Paths::Many(v)
    }
}

/// Adj-RIBs-In and the Loc-RIB in one table: every path to every prefix (each peer's and
/// ours), best first, so the selected route is the first path and a prefix that one peer
/// sent costs one entry. B-trees, not a hash map: a hash table of 120k routes rounds up to
/// 262k buckets.
#[derive(Debug, Default)]
pub struct Rib {
    table: PrefixTable<Paths>,
    /// Prefixes per peer (Adj-RIB-In sizes).
    received: HashMap<PeerId, usize>,
    /// Prefixes we originate.
    local: std::collections::BTreeSet<IpNetwork>,
    /// The equal-cost set per prefix, kept only with ECMP on (most tables have none).
    multipaths: HashMap<IpNetwork, Vec<Path>>,
    pub ecmp: bool,
}

impl Rib {
    pub fn new(ecmp: bool) -> Self {
        Rib {
            ecmp,
            ..Default::default()
        }
    }

    pub fn best(&self, prefix: &IpNetwork) -> Option<&Path> {
        self.table.get(prefix).map(Paths::best)
    }

    pub fn loc_rib(&self) -> impl Iterator<Item = (IpNetwork, &Path)> {
        self.table.iter().map(|(k, p)| (k, p.best()))
    }

    /// The equal-cost set of `prefix` (empty unless ECMP is on and it has one).
    pub fn multipath(&self, prefix: &IpNetwork) -> &[Path] {
        self.multipaths
            .get(prefix)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Prefixes in the Loc-RIB (constant time: the speaker reports it after every event).
    pub fn loc_len(&self) -> usize {
        self.table.len()
    }

    pub fn received(&self, peer: &PeerId) -> usize {
        self.received.get(peer).copied().unwrap_or(0)
    }

    /// The selection for `prefix` now (best and equal-cost set).
    fn selection(&self, prefix: &IpNetwork) -> Option<(Path, Vec<Path>)> {
        let paths = self.table.get(prefix)?.as_slice();
        let best = paths[0].clone();
        let multipath = if self.ecmp {
            paths
                .iter()
                .filter(|p| ecmp_equal(p, &best))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        Some((best, multipath))
    }

    /// Reports the change of selection for `prefix` (if any) since `before`.
    fn changed(
        &mut self,
        prefix: IpNetwork,
        before: Option<(Path, Vec<Path>)>,
        out: &mut Vec<BestChange>,
    ) {
        let after = self.selection(&prefix);
        match after {
            None => {
                self.multipaths.remove(&prefix);
                if before.is_some() {
                    out.push(BestChange::Gone { prefix });
                }
            }
            Some((best, multipath)) => {
                let same = before
                    .as_ref()
                    .is_some_and(|(b, m)| *b == best && *m == multipath);
                if !same {
                    if multipath.is_empty() {
                        self.multipaths.remove(&prefix);
                    } else {
                        self.multipaths.insert(prefix, multipath.clone());
                    }
                    out.push(BestChange::Best {
                        prefix,
                        best,
                        multipath,
                    });
                }
            }
        }
    }

    /// Sets the path from `path`'s source for `prefix`; returns whether it is new.
    fn set_path(&mut self, prefix: IpNetwork, path: Path, out: &mut Vec<BestChange>) -> bool {
        let before = self.selection(&prefix);
        let new = match self.table.get_mut(&prefix) {
            Some(paths) => paths.upsert(path),
            None => {
                self.table.insert(prefix, Paths::One(path));
                true
            }
        };
        self.changed(prefix, before, out);
        new
    }

    /// Removes the path from `src` for `prefix`; returns whether there was one.
    fn remove_path(
        &mut self,
        prefix: IpNetwork,
        src: Option<PeerId>,
        out: &mut Vec<BestChange>,
    ) -> bool {
        let before = self.selection(&prefix);
        let Some(paths) = self.table.remove(&prefix) else {
            return false;
        };
        let (removed, left) = paths.remove(src);
        if let Some(left) = left {
            self.table.insert(prefix, left);
        }
        if removed {
            self.changed(prefix, before, out);
        }
        removed
    }

    fn count(&mut self, peer: PeerId, delta: isize) {
        let c = self.received.entry(peer).or_default();
        *c = c.saturating_add_signed(delta);
    }

    /// Applies what a peer sent; returns the Loc-RIB changes.
    pub fn apply(
        &mut self,
        peer: &Arc<PeerInfo>,
        announced: Vec<(IpNetwork, Arc<Attrs>)>,
        withdrawn: Vec<IpNetwork>,
    ) -> Vec<BestChange> {
        let mut out = Vec::new();
        for prefix in withdrawn {
            if self.remove_path(prefix, Some(peer.addr), &mut out) {
                self.count(peer.addr, -1);
            }
        }
        for (prefix, attrs) in announced {
            let path = Path {
                attrs,
                peer: Some(peer.clone()),
                stale: false,
            };
            if self.set_path(prefix, path, &mut out) {
                self.count(peer.addr, 1);
            }
        }
        // Amortised: a table that keeps growing is repacked each time it doubles.
        let len = self.table.len();
        if len >= COMPACT_FROM && len >= 2 * self.table.len_at_compaction() {
            self.table.compact();
        }
        out
    }

    /// A peer finished sending its table (End-of-RIB): the table is repacked if it grew by
    /// an eighth since it last was, so that a full table costs packed nodes once loaded.
    pub fn end_of_rib(&mut self) {
        let (len, then) = (self.table.len(), self.table.len_at_compaction());
        if len >= COMPACT_FROM && len >= then + then / 8 {
            self.table.compact();
        }
    }

    /// The prefixes for which `peer` has a path (optionally: only stale ones).
    fn prefixes_of(&self, peer: &PeerId, stale_only: bool) -> Vec<IpNetwork> {
        self.table
            .iter()
            .filter(|(_, paths)| {
                paths
                    .as_slice()
                    .iter()
                    .any(|p| Paths::source(p) == Some(*peer) && (!stale_only || p.stale))
            })
            .map(|(k, _)| k)
            .collect()
    }

    /// The peer's session went down: its routes go.
    pub fn peer_down(&mut self, peer: &PeerId) -> Vec<BestChange> {
        let mut out = Vec::new();
        for p in self.prefixes_of(peer, false) {
            self.remove_path(p, Some(*peer), &mut out);
        }
        self.received.remove(peer);
        out
    }

    /// The peer's routes for which `gone` holds go (a restarting peer's families it did not
    /// ask us to preserve).
    pub fn peer_down_where(
        &mut self,
        peer: &PeerId,
        gone: impl Fn(&IpNetwork) -> bool,
    ) -> Vec<BestChange> {
        let mut out = Vec::new();
        for p in self
            .prefixes_of(peer, false)
            .into_iter()
            .filter(|p| gone(p))
        {
            if self.remove_path(p, Some(*peer), &mut out) {
                self.count(*peer, -1);
            }
        }
        out
    }

    /// Graceful restart helper (RFC 4724 §4.2): the peer restarts; keep its routes, marked stale.
    pub fn mark_stale(&mut self, peer: &PeerId) {
        for paths in self.table.values_mut() {
            let slice: &mut [Path] = match paths {
                Paths::One(p) => std::slice::from_mut(p),
                Paths::Many(v) => v,
            };
            for p in slice.iter_mut().filter(|p| Paths::source(p) == Some(*peer)) {
                p.stale = true;
            }
        }
    }

    /// End-of-RIB from a restarted peer: routes it did not send again go.
    pub fn sweep_stale(&mut self, peer: &PeerId) -> Vec<BestChange> {
        let mut out = Vec::new();
        for p in self.prefixes_of(peer, true) {
            if self.remove_path(p, Some(*peer), &mut out) {
                self.count(*peer, -1);
            }
        }
        out
    }

    pub fn originate(&mut self, prefix: IpNetwork, attrs: Arc<Attrs>) -> Vec<BestChange> {
        let mut out = Vec::new();
        self.local.insert(prefix);
        self.set_path(
            prefix,
            Path {
                attrs,
                peer: None,
                stale: false,
            },
            &mut out,
        );
        out
    }

    pub fn withdraw_local(&mut self, prefix: IpNetwork) -> Vec<BestChange> {
        let mut out = Vec::new();
        if self.local.remove(&prefix) {
            self.remove_path(prefix, None, &mut out);
        }
        out
    }

    pub fn originated(&self) -> impl Iterator<Item = &IpNetwork> {
        self.local.iter()
    }
}

/// Smaller tables are not worth repacking.
const COMPACT_FROM: usize = 1024;

/// Who we are, for export.
#[derive(Debug, Clone)]
pub struct Local {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Set when we reflect routes (RFC 4456).
    pub cluster_id: Option<Ipv4Addr>,
}

/// What we announce to `to` for a best path (Adj-RIB-Out), or `None` if it must not go
/// there. `self_next_hop` is our address on the session to `to`.
pub fn export(
    local: &Local,
    best: &Path,
    to: &PeerInfo,
    to_asn: u32,
    self_next_hop: IpAddr,
) -> Option<Attrs> {
    // Never back to whoever sent it.
    if best.peer.as_ref().is_some_and(|p| p.addr == to.addr) {
        return None;
    }
    let mut a = (*best.attrs).clone();
    let from_ibgp = best.peer.as_ref().is_some_and(|p| p.ibgp);
    if to.ibgp {
        if from_ibgp {
            // iBGP split horizon, unless we reflect: client routes go to everyone, routes
            // from non-clients go to clients only (RFC 4456 §6).
            let from_client = best.peer.as_ref().is_some_and(|p| p.rr_client);
            let cluster = local.cluster_id?;
            if !from_client && !to.rr_client {
                return None;
            }
            if a.cluster_list.contains(&cluster) {
                return None;
            }
            a.cluster_list.insert(0, cluster);
            if a.originator_id.is_none() {
                a.originator_id = best.peer.as_ref().map(|p| p.router_id);
            }
            // Reflected routes keep their next hop.
        } else {
            if best.peer.is_none() {
                a.next_hop = self_next_hop;
            }
            a.local_pref = Some(a.local_pref.unwrap_or(100));
        }
        if best.peer.is_some() && !from_ibgp {
            // eBGP-learned to iBGP: next hop self, so the mesh need not reach the eBGP peer.
            a.next_hop = self_next_hop;
        }
    } else {
        if a.contains_as(to_asn) {
            return None; // the peer would drop it as a loop
        }
        a.next_hop = self_next_hop;
        a.local_pref = None;
        a.originator_id = None;
        a.cluster_list.clear();
        if !from_ibgp {
            a.med = a.med.filter(|_| best.peer.is_none());
        }
        match a.as_path.first_mut() {
            Some(AsSegment::Sequence(v)) if v.len() < 255 => v.insert(0, local.asn),
            _ => a.as_path.insert(0, AsSegment::Sequence(vec![local.asn])),
        }
    }
    Some(a)
}

/// Path attributes for an UPDATE from exported attributes (IPv4 NEXT_HOP or MP_REACH for
/// the family is added by the caller).
pub fn to_path_attrs(a: &Attrs, ibgp: bool) -> Vec<PathAttr> {
    let mut v = vec![
        PathAttr::Origin(a.origin),
        PathAttr::AsPath(a.as_path.clone()),
    ];
    if let Some(m) = a.med {
        v.push(PathAttr::Med(m));
    }
    if ibgp {
        v.push(PathAttr::LocalPref(a.local_pref.unwrap_or(100)));
    }
    if !a.communities.is_empty() {
        v.push(PathAttr::Communities(a.communities.clone()));
    }
    if let Some(o) = a.originator_id {
        v.push(PathAttr::OriginatorId(o));
    }
    if !a.cluster_list.is_empty() {
        v.push(PathAttr::ClusterList(a.cluster_list.clone()));
    }
    v.extend(a.other.iter().cloned());
    v
}

#[cfg(test)]
mod tests;
