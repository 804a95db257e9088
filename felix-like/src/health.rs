//! /livez, /readyz, /status (JSON: sessions, devices, blocks) and /metrics over HTTP (TCP, or a Unix socket for tests and sidecars).
//!
//! Live means the loops answer: the reconcile loop finished a pass and the BGP speaker
//! answered a status query recently (not merely that the process exists). Ready means the
//! datastore view is current, the devices the pools need exist, and the BGP sessions the
//! routed pools need are established.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::config::HealthListen;

/// How long a loop may stay silent before the agent is not live.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct HealthState {
    pub last_reconcile: Option<Instant>,
    /// When the main loop began, and its last turn (it turns at least every second).
    pub loop_started: Option<Instant>,
    pub last_loop: Option<Instant>,
    pub speaker_started: Option<Instant>,
    pub last_speaker_answer: Option<Instant>,
    pub bgp_enabled: bool,
    pub in_sync: bool,
    /// The speaker reported its sessions since the peers last changed.
    pub bgp_checked: bool,
    /// Why we are not ready, if we are not (empty: ready, given the above).
    pub not_ready: Vec<String>,
    /// Set while the liveness lease is not being renewed (the cluster sees us as suspect).
    pub lease_trouble: Option<String>,
    /// The speaker's last answer (sessions), for `/status`.
    pub bgp: Option<tessera_routed::speaker::Status>,
    /// The tunnel devices the node's pools need, and the blocks it announces.
    pub devices: Vec<String>,
    pub blocks: Vec<String>,
}

pub use tessera_datastore::model::{BgpPeerStatus, NodeStatus};

impl HealthState {
    pub fn new(bgp_enabled: bool) -> Self {
        HealthState {
            last_reconcile: None,
            loop_started: None,
            last_loop: None,
            speaker_started: None,
            last_speaker_answer: None,
            bgp_enabled,
            in_sync: false,
            bgp_checked: false,
            not_ready: vec!["starting".into()],
            lease_trouble: None,
            bgp: None,
            devices: Vec::new(),
            blocks: Vec::new(),
        }
    }

    pub fn status(&self, node: &str) -> NodeStatus {
        let live = self.live();
        let ready = self.ready();
        let reason = ready.as_ref().err().cloned();
        let bgp_peers = self
            .bgp
            .iter()
            .flat_map(|s| {
                s.peers.iter().map(move |p| BgpPeerStatus {
                    address: p.address.to_string(),
                    asn: p.asn,
                    kind: if p.asn == s.asn {
                        "internal"
                    } else {
                        "external"
                    }
                    .into(),
                    state: format!("{:?}", p.state),
                    uptime_seconds: p.uptime_seconds,
                    prefixes_received: p.prefixes_received,
                    prefixes_sent: p.prefixes_sent,
                })
            })
            .collect();
        NodeStatus {
            node: node.to_string(),
            live: live.is_ok(),
            ready: ready.is_ok(),
            reason,
            bgp_peers,
            devices: self.devices.clone(),
            blocks: self.blocks.clone(),
        }
    }

    pub fn live(&self) -> Result<(), String> {
        let fresh = |t: Option<Instant>| t.is_some_and(|t| t.elapsed() < LIVENESS_WINDOW);
        let overdue =
            |since: Option<Instant>| since.is_some_and(|t| t.elapsed() >= LIVENESS_WINDOW);
        // Each loop is judged once it has had time to answer (etcd may be down for long
        // before the speaker starts: not ready says so, it is not a reason to restart).
        if overdue(self.loop_started) && !fresh(self.last_loop) {
            return Err("the reconcile loop does not answer".into());
        }
        if overdue(self.speaker_started) && !fresh(self.last_speaker_answer) {
            return Err("the BGP speaker does not answer".into());
        }
        Ok(())
    }

    pub fn ready(&self) -> Result<(), String> {
        self.live()?;
        if !self.not_ready.is_empty() {
            return Err(self.not_ready.join("; "));
        }
        if let Some(why) = &self.lease_trouble {
            return Err(why.clone());
        }
        if !self.in_sync {
            return Err("datastore not in sync".into());
        }
        if self.bgp_enabled && !self.bgp_checked {
            return Err("BGP sessions not checked yet".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolNode {
    pub pool: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeStateLabel {
    pub node: String,
    /// A [`crate::gc::SuspectState`].
    pub state: String,
}

/// The agent's metrics.
#[derive(Default)]
pub struct Metrics {
    pub ipam_in_use: Family<PoolNode, Gauge>,
    pub ipam_capacity: Family<PoolNode, Gauge>,
    pub bgp_established: Family<PeerLabel, Gauge>,
    pub bgp_received: Family<PeerLabel, Gauge>,
    pub bgp_sent: Family<PeerLabel, Gauge>,
    pub reconcile_seconds: Option<Histogram>,
    pub corrections: Family<KindLabel, Counter>,
    pub gc_reclaims: Family<KindLabel, Counter>,
    pub in_sync: Gauge,
    /// Suspect nodes (lease lapsed), by standing: seconds since they became suspect.
    pub suspects: Family<NodeStateLabel, Gauge>,
    /// Local workloads fenced because their address now belongs to another workload.
    pub conflicted: Gauge,
}

pub struct Shared {
    /// This node's name (for `/status`).
    pub node: String,
    pub health: Mutex<HealthState>,
    pub metrics: Metrics,
    registry: Registry,
}

impl Shared {
    pub fn new(node: &str, bgp_enabled: bool) -> Arc<Self> {
        let node = node.to_string();
        let metrics = Metrics {
            reconcile_seconds: Some(Histogram::new(exponential_buckets(0.0005, 2.0, 14))),
            ..Default::default()
        };
        let mut registry = Registry::with_prefix("tessera");
        registry.register(
            "ipam_addresses_in_use",
            "Addresses allocated, per pool and node of the block",
            metrics.ipam_in_use.clone(),
        );
        registry.register(
            "ipam_block_addresses",
            "Addresses in claimed blocks, per pool and node",
            metrics.ipam_capacity.clone(),
        );
        registry.register(
            "bgp_session_established",
            "1 when the BGP session is Established",
            metrics.bgp_established.clone(),
        );
        registry.register(
            "bgp_prefixes_received",
            "Prefixes received from the peer",
            metrics.bgp_received.clone(),
        );
        registry.register(
            "bgp_prefixes_sent",
            "Prefixes sent to the peer",
            metrics.bgp_sent.clone(),
        );
        if let Some(h) = &metrics.reconcile_seconds {
            registry.register(
                "reconcile_duration_seconds",
                "Time of one pass of the kernel reconcile",
                h.clone(),
            );
        }
        registry.register(
            "reconcile_corrections",
            "Kernel objects added, fixed or removed by the reconcile",
            metrics.corrections.clone(),
        );
        registry.register(
            "gc_reclaims",
            "IPAM garbage collection repairs, by kind",
            metrics.gc_reclaims.clone(),
        );
        registry.register(
            "node_suspect_seconds",
            "Nodes whose liveness lease lapsed (seen by the GC leader), by state: waiting, witness_answered, no_witness, reclaimed, decommissioned; the value is how long they have been suspect",
            metrics.suspects.clone(),
        );
        registry.register(
            "conflicted_workloads",
            "Local pods fenced because their address was reclaimed and now belongs to another workload",
            metrics.conflicted.clone(),
        );
        registry.register(
            "datastore_in_sync",
            "1 when the datastore view is current",
            metrics.in_sync.clone(),
        );
        Arc::new(Shared {
            node,
            health: Mutex::new(HealthState::new(bgp_enabled)),
            metrics,
            registry,
        })
    }

    pub fn health(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn answer(r: Result<(), String>) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/status",
            get(|State(s): State<Arc<Shared>>| async move {
                let status = s.health().status(&s.node);
                axum::Json(status)
            }),
        )
        .route(
            "/livez",
            get(|State(s): State<Arc<Shared>>| async move { answer(s.health().live()) }),
        )
        .route(
            "/readyz",
            get(|State(s): State<Arc<Shared>>| async move { answer(s.health().ready()) }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<Shared>>| async move { s.encode() }),
        )
        .with_state(shared)
}

/// Serves until the task is dropped.
pub async fn serve(listen: HealthListen, shared: Arc<Shared>) -> std::io::Result<()> {
    let app = router(shared);
    match listen {
        HealthListen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await?;
            axum::serve(l, app).await
        }
        HealthListen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let l = tokio::net::UnixListener::bind(&path)?;
            tessera_routed::speaker::owner_only(&path)?;
            axum::serve(l, app).await
        }
    }
}
