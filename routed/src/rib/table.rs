//! The RIB's prefix table: a B-tree per address family keyed by the prefix's bits and length
//! only, so that an IPv4 key is 8 octets (an `IpNetwork` is 18: the IPv6 variant sizes the
//! enum). With the paths inline, a full table costs the key, the paths and the tree's nodes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

/// IPv4 prefix: address bits, length. Ordered as the address, then the length.
type Key4 = (u32, u8);
/// IPv6 prefix: address octets (big-endian, so ordered as the address), length.
type Key6 = ([u8; 16], u8);

#[derive(Debug)]
pub struct PrefixTable<V> {
    v4: BTreeMap<Key4, V>,
    v6: BTreeMap<Key6, V>,
    /// Entries when the table was last rebuilt (see `compact`).
    len_at_compaction: usize,
}

impl<V> Default for PrefixTable<V> {
    fn default() -> Self {
        PrefixTable {
            v4: BTreeMap::new(),
            v6: BTreeMap::new(),
            len_at_compaction: 0,
        }
    }
}

fn key4(n: &Ipv4Network) -> Key4 {
    (u32::from(n.network()), n.prefix())
}

fn key6(n: &Ipv6Network) -> Key6 {
    (n.network().octets(), n.prefix())
}

fn net4(&(bits, len): &Key4) -> IpNetwork {
    // The key came from a valid network: its length is at most 32.
    IpNetwork::V4(Ipv4Network::new(Ipv4Addr::from(bits), len).expect("stored prefix length"))
}

fn net6(&(octets, len): &Key6) -> IpNetwork {
    IpNetwork::V6(Ipv6Network::new(Ipv6Addr::from(octets), len).expect("stored prefix length"))
}

impl<V> PrefixTable<V> {
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn get(&self, n: &IpNetwork) -> Option<&V> {
        match n {
            IpNetwork::V4(n) => self.v4.get(&key4(n)),
            IpNetwork::V6(n) => self.v6.get(&key6(n)),
        }
    }

    pub fn get_mut(&mut self, n: &IpNetwork) -> Option<&mut V> {
        match n {
            IpNetwork::V4(n) => self.v4.get_mut(&key4(n)),
            IpNetwork::V6(n) => self.v6.get_mut(&key6(n)),
        }
    }

    pub fn insert(&mut self, n: IpNetwork, v: V) -> Option<V> {
        match n {
            IpNetwork::V4(n) => self.v4.insert(key4(&n), v),
            IpNetwork::V6(n) => self.v6.insert(key6(&n), v),
        }
    }

    pub fn remove(&mut self, n: &IpNetwork) -> Option<V> {
        match n {
            IpNetwork::V4(n) => self.v4.remove(&key4(n)),
            IpNetwork::V6(n) => self.v6.remove(&key6(n)),
        }
    }

    /// Every entry, IPv4 first, each family in address order. The key is the prefix with
    /// the host bits cleared (as the table stores it).
    pub fn iter(&self) -> impl Iterator<Item = (IpNetwork, &V)> {
        let v4 = self.v4.iter().map(|(k, v)| (net4(k), v));
        let v6 = self.v6.iter().map(|(k, v)| (net6(k), v));
        v4.chain(v6)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.v4.values_mut().chain(self.v6.values_mut())
    }

    /// Rebuilds the trees with full nodes. A B-tree filled in address order (a peer's full
    /// table arriving) splits each node when it overflows and leaves it half full for good;
    /// rebuilt from the sorted entries it is packed, which halves the table's memory.
    pub fn compact(&mut self) {
        // From sorted, unique keys `collect` builds the tree bottom-up with full nodes.
        self.v4 = std::mem::take(&mut self.v4).into_iter().collect();
        self.v6 = std::mem::take(&mut self.v6).into_iter().collect();
        self.len_at_compaction = self.len();
    }

    /// Entries at the last `compact`.
    pub fn len_at_compaction(&self) -> usize {
        self.len_at_compaction
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn keys_are_the_prefix_so_host_bits_do_not_make_another_entry() {
        let mut t = PrefixTable::default();
        t.insert(n("10.1.2.0/24"), 1);
        assert_eq!(t.insert(n("10.1.2.7/24"), 2), Some(1));
        t.insert(n("10.1.2.0/25"), 3);
        t.insert(n("fd00:1::/48"), 4);
        t.insert(n("fd00:1::/64"), 5);
        assert_eq!(t.len(), 4);
        assert_eq!(t.get(&n("10.1.2.0/24")), Some(&2));
        assert_eq!(t.get(&n("fd00:1::/64")), Some(&5));
        assert_eq!(t.get(&n("fd00:1::/56")), None);
        let order: Vec<String> = t.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(
            order,
            ["10.1.2.0/24", "10.1.2.0/25", "fd00:1::/48", "fd00:1::/64"]
        );
        assert_eq!(t.remove(&n("10.1.2.0/25")), Some(3));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn compaction_keeps_every_entry_in_order() {
        let mut t = PrefixTable::default();
        for i in 0..5000u32 {
            let net = Ipv4Network::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap();
            t.insert(IpNetwork::V4(net), i);
        }
        t.insert(n("fd00::/48"), 9);
        t.compact();
        assert_eq!(t.len_at_compaction(), 5001);
        assert_eq!(t.len(), 5001);
        assert_eq!(t.get(&n("10.0.19.0/24")), Some(&19));
        assert_eq!(t.get(&n("fd00::/48")), Some(&9));
        let keys: Vec<IpNetwork> = t.iter().map(|(k, _)| k).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "still in order");
    }
}
