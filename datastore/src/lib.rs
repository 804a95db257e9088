//! Tessera's cluster model in etcd and the IPAM algorithms on top of it.
//!
//! Module map:
//! - [`model`], [`selector`], [`yaml`]: the typed resources, label selectors, user YAML.
//! - [`admin`]: what tesseractl does: resources written and deleted in one guarded transaction.
//! - [`block`]: the IPAM block and its pure allocator (no I/O).
//! - [`block_format`], [`block_store`]: how a block is encoded, and the keys it is stored in.
//! - [`connection`]: the one etcd configuration every binary reads (file, env, flags; TLS).
//! - [`kv`]: the datastore seam: a small transactional key-value trait, for etcd and in memory.
//! - [`keys`]: where everything lives in etcd.
//! - [`resources`]: pools, reservations, nodes, workload endpoints.
//! - [`ipam`]: assignment, release and block claims, each write one guarded transaction.
//! - [`gc`]: repair after crashes and dead or deleted nodes.
//! - [`liveness`]: node leases.
//! - [`leader`]: one holder at a time for a job (a key on an etcd lease).
//! - [`reassert`]: a returning node takes back what is still free and learns what it lost.
//! - [`sticky`]: a StatefulSet pod's addresses held while it is away.
//! - [`snapshot`]: a consistent read of all IPAM state and the invariant checker.
//!
//! DESIGN.md beside this crate lists the invariants and why they hold.

pub mod admin;
pub mod block;
pub mod block_format;
pub mod block_store;
mod codec;
pub mod connection;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gc;
pub mod handoff;
pub mod ipam;
pub mod keys;
pub mod kv;
pub mod leader;
pub mod liveness;
pub mod model;
pub mod reassert;
pub mod resources;
pub mod selector;
pub mod snapshot;
pub mod sticky;
pub mod yaml;

pub use codec::{
    encode_block, fnv1a, from_stored, now_ms, COMPRESS_FROM_BYTES, TRANSIENT_RETRY_BUDGET,
    ZSTD_MAGIC,
};

/// The daemons' logging: to stderr, at the level `TESSERA_LOG` says (default `info`).
#[cfg(feature = "cli")]
pub fn log_to_stderr() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// What every Tessera binary prints for `--version`: the workspace version and the git
/// commit it was built from (`unknown` outside a git checkout, e.g. from a source tarball;
/// `TESSERA_GIT_COMMIT` at build time overrides it).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TESSERA_GIT_COMMIT"),
    ")"
);
pub use error::{Family, IpamError};
pub use ipam::{AssignRequest, Assignment, BatchedOp, BatchedOutcome, Ipam, Owner, ReleaseOutcome};
pub use kv::{EtcdKv, Kv, MemKv};
