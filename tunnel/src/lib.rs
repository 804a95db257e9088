//! Tessera's encapsulation devices for underlays that cannot route pod addresses.
//!
//! - [`desired`]: which neighbour, FDB and route entries a node needs, per pool mode (pure).
//! - [`vxlan`]: `VxlanDevice` and its entries through rtnetlink, idempotent `ensure_*`.
//! - [`mtu`]: the pod MTU from the underlay's, written for the CNI plugin.
//! - [`ipip`]: `tunl0` and its onlink routes (end to end in QEMU VMs: this development
//!   kernel has no ipip module).

pub mod desired;
pub mod ipip;
pub mod mtu;
pub mod routes;
pub mod vxlan;

pub use desired::{
    ipip_routes, vtep_mac, vxlan_entries, Mode, NodeError, RemoteNode, Route, VxlanEntries,
};
pub use vxlan::{ensure_device, ensure_entries, remove_device, TunnelError, VxlanDevice};
