//! tesseractl's library: reading documents, rendering, IPAM reports. The binary (main.rs)
//! parses the command line and talks to etcd through `tessera_datastore::admin`.

pub mod agent;
pub mod diags;
pub mod documents;
pub mod ipam;
pub mod render;
