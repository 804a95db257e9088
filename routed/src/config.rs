//! The speaker's configuration (YAML), validated with errors that name the field.

use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Address to listen on (port `listenPort`).
    pub listen: IpAddr,
    #[serde(default = "default_port")]
    pub listen_port: u16,
    #[serde(default = "default_hold")]
    pub hold_time: u16,
    #[serde(default = "default_retry")]
    pub connect_retry_seconds: u64,
    /// Peer oscillation damping: after each reset the wait before the next attempt doubles
    /// from `connectRetrySeconds` up to this.
    #[serde(default = "default_idle_hold_max")]
    pub idle_hold_max_seconds: u64,
    /// A session up this long before it went down was stable: the wait starts over.
    #[serde(default = "default_stable_after")]
    pub stable_after_seconds: u64,
    /// Advertise Extended Message (RFC 8654): UPDATEs up to 65535 octets with peers that do
    /// too. Off by default, as in BIRD and FRR (larger messages cost memory while decoded).
    #[serde(default)]
    pub extended_message: bool,
    /// Announce graceful restart with this restart time (0: off).
    #[serde(default = "default_gr")]
    pub graceful_restart_seconds: u16,
    /// Makes this speaker a route reflector with this cluster id.
    #[serde(default)]
    pub cluster_id: Option<Ipv4Addr>,
    #[serde(default)]
    pub ecmp: bool,
    #[serde(default)]
    pub kernel: KernelConfig,
    /// Prefixes this node originates (its blocks).
    #[serde(default)]
    pub networks: Vec<IpNetwork>,
    /// Our IPv6 address for IPv6 next hops (next hop self).
    #[serde(default)]
    pub next_hop_v6: Option<IpAddr>,
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Where `tessera-routed status` finds us.
    #[serde(default)]
    pub status_socket: Option<String>,
    /// BFD timers for peers with `bfd: true`.
    #[serde(default = "default_bfd_interval")]
    pub bfd_interval_ms: u64,
    #[serde(default = "default_bfd_mult")]
    pub bfd_detect_mult: u8,
    /// Follow the cluster's nodes and BGP peers in etcd (the settings every Tessera binary
    /// shares; ETCD_* variables and `--etcd-*` flags override them).
    #[serde(default)]
    pub datastore: Option<tessera_datastore::connection::DatastoreConfig>,
}

fn default_idle_hold_max() -> u64 {
    120
}
fn default_stable_after() -> u64 {
    60
}
fn default_bfd_interval() -> u64 {
    300
}
fn default_bfd_mult() -> u8 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KernelConfig {
    #[serde(default = "yes")]
    pub install: bool,
    /// The route protocol number Tessera's routes carry (recognisable, and swept by it).
    #[serde(default = "default_proto")]
    pub protocol: u8,
    #[serde(default = "default_table")]
    pub table: u32,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            install: true,
            protocol: default_proto(),
            table: default_table(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerConfig {
    pub address: IpAddr,
    pub asn: u32,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub passive: bool,
    #[serde(default)]
    pub rr_client: bool,
    /// Source address of our connection and our next hop towards this peer.
    #[serde(default)]
    pub local_address: Option<IpAddr>,
    /// TCP MD5 signature password (RFC 2385).
    #[serde(default)]
    pub password: Option<String>,
    /// Watch the peer with BFD (single hop) and drop the session when BFD says Down.
    #[serde(default)]
    pub bfd: bool,
    /// The interface a link-local peer (fe80::/10) is on; its routes' link-local next hops
    /// are reached there.
    #[serde(default)]
    pub interface: Option<String>,
}

fn default_port() -> u16 {
    179
}
fn default_hold() -> u16 {
    90
}
fn default_retry() -> u64 {
    5
}
fn default_gr() -> u16 {
    120
}
fn yes() -> bool {
    true
}
/// 80: unassigned in iproute2's rt_protos (188 is "ospf" there); `ip route` shows `proto 80`.
pub const TESSERA_PROTO: u8 = 80;
fn default_proto() -> u8 {
    TESSERA_PROTO
}
fn default_table() -> u32 {
    254
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Parse(String),
    #[error("field {field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config =
            serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: String, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if self.asn == 0 {
            return bad("asn".into(), "must not be 0");
        }
        if self.router_id.is_unspecified() {
            return bad("routerId".into(), "must not be 0.0.0.0");
        }
        if self.hold_time == 1 || self.hold_time == 2 {
            return bad(
                "holdTime".into(),
                "must be 0 or at least 3 seconds (RFC 4271 §4.2)",
            );
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.asn == 0 {
                return bad(format!("peers[{i}].asn"), "must not be 0");
            }
            if crate::rib::is_link_local(&p.address) && p.interface.is_none() {
                return bad(
                    format!("peers[{i}].interface"),
                    "a link-local peer needs the interface it is on",
                );
            }
            if p.rr_client && p.asn != self.asn {
                return bad(
                    format!("peers[{i}].rrClient"),
                    "route-reflector clients are iBGP peers",
                );
            }
            if p.rr_client && self.cluster_id.is_none() {
                return bad(
                    format!("peers[{i}].rrClient"),
                    "set clusterId to reflect routes",
                );
            }
            if self.peers[..i].iter().any(|q| q.address == p.address) {
                return bad(format!("peers[{i}].address"), "duplicate peer");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_fields() {
        let ok = "asn: 64512\nrouterId: 198.18.0.10\nlisten: 198.18.0.10\nnetworks: [10.244.1.0/26]\npeers:\n  - { address: 198.18.0.11, asn: 64512 }\n";
        let c = Config::parse(ok).expect("parses");
        assert_eq!(c.peers[0].port, 179);
        assert_eq!(c.kernel.protocol, TESSERA_PROTO);
        let e =
            Config::parse(&ok.replace("asn: 64512 }", "asn: 64512, rrClient: true }")).unwrap_err();
        assert!(e.to_string().contains("peers[0].rrClient"), "{e}");
        let e = Config::parse(&format!("{ok}holdTime: 2\n")).unwrap_err();
        assert!(e.to_string().contains("holdTime"), "{e}");
        assert!(Config::parse(&format!("{ok}bogus: 1\n")).is_err());
        let e = Config::parse(&ok.replace("198.18.0.11", "\"fe80::2\"")).unwrap_err();
        assert!(e.to_string().contains("peers[0].interface"), "{e}");
        let ll = ok.replace("198.18.0.11,", "\"fe80::2\", interface: eth0,");
        assert_eq!(
            Config::parse(&ll).expect("link-local peer").peers[0]
                .interface
                .as_deref(),
            Some("eth0")
        );
    }
}
