use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::kv::KvError;

/// Address family, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("{family} pool(s) {pools:?} exhausted: no free address for node {node}")]
    Exhausted {
        family: Family,
        pools: Vec<String>,
        node: String,
    },
    #[error("no enabled {family} pool may serve node {node}{}", workload.as_ref().map(|w| format!(" and workload {w}")).unwrap_or_default())]
    NoPool {
        family: Family,
        node: String,
        workload: Option<String>,
    },
    #[error("{addr} is outside every IP pool")]
    AddressNotInPool { addr: IpAddr },
    #[error("{addr} is already allocated to handle {handle}")]
    AddressInUse { addr: IpAddr, handle: String },
    #[error("{addr} is reserved and cannot be allocated")]
    AddressReserved { addr: IpAddr },
    #[error("invalid handle id {0:?}: must be non-empty printable ASCII without '/'")]
    InvalidHandle(String),
    #[error("node {node} is alive (its liveness lease is held); refusing to reclaim it")]
    NodeAlive { node: String },
    /// A guarded write (a reclaim) found a guard key changed: the node came back, the GC
    /// leader lost its leadership, or the verdict was withdrawn. Nothing more is written.
    #[error("stopped: {key} changed (a reclaim's guard), nothing more written")]
    GuardChanged { key: String },
    #[error("gave up on {what} after {attempts} conflicting concurrent updates")]
    TooMuchContention { what: String, attempts: u32 },
    #[error("corrupt value at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("block {block} disappeared during {what}")]
    BlockGone {
        block: IpNetwork,
        what: &'static str,
    },
    #[error(transparent)]
    Datastore(#[from] KvError),
}

impl IpamError {
    /// Worth retrying later (the CNI "try again later" code).
    pub fn is_transient(&self) -> bool {
        match self {
            // A client that never reached the store does not retry on its own (a setting
            // may be wrong), but its caller may well try again later.
            IpamError::Datastore(e) => e.is_transient() || matches!(e, KvError::NeverReached(_)),
            IpamError::TooMuchContention { .. } => true,
            _ => false,
        }
    }
}
