//! `tessera-node`, the node agent: turns the datastore (pools and their modes, nodes, blocks,
//! BGP peers) into this node's kernel state and keeps it converged.
//!
//! - [`state`]: the pure calculation (cluster view -> desired routes, tunnel entries, NAT, BGP
//!   peers and the per-pool route decision);
//! - [`sync`]: the datastore follower (etcd watch, resumed or resynced);
//! - [`agent`]: registration, the in-process BGP speaker and the reconcile loop (netlink);
//! - [`nat`]: natOutgoing in nftables; [`gc`]: leader-elected IPAM garbage collection;
//! - [`health`]: /livez, /readyz, /metrics; [`config`] and [`autodetect`]: startup;
//! - [`witness`]: proof that a node whose lease lapsed still runs (asked before reclaim).

pub mod agent;
pub mod autodetect;
pub mod config;
pub mod gc;
pub mod health;
pub mod nat;
pub mod state;
pub mod sync;
pub mod witness;
