//! Address management for a pod: in-process Tessera IPAM (ipam.type `tessera-ipam`, no extra
//! exec) or a delegated IPAM plugin found on CNI_PATH, as the spec describes.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Instant;

use tokio::sync::oneshot;

use serde_json::Value;
use tessera_datastore::block::Attributes;
use tessera_datastore::handoff::{store_id, Handoff};
use tessera_datastore::kv::Kv;
use tessera_datastore::model::WorkloadId;
use tessera_datastore::resources::{get_pod_intent, list_workload_endpoints};
use tessera_datastore::snapshot::Snapshot;
use tessera_datastore::{AssignRequest, BatchedOp, BatchedOutcome, EtcdKv, Ipam, Owner};

use crate::delegate;
use crate::error::{code, CniError};
use crate::ipam_queue::{self, Ticket};
use crate::spec::{CniEnv, CniResult, NetConf};

pub const TESSERA_IPAM: &str = "tessera-ipam";

/// Who the pod is, from CNI_ARGS (Kubernetes passes namespace and name; podman only a name).
#[derive(Debug, Clone)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub ifname: String,
    /// True when the runtime told us the pod's name (a stable identity across restarts).
    pub named: bool,
}

impl PodId {
    pub fn from_env(env: &CniEnv) -> Self {
        let name = env.arg("K8S_POD_NAME");
        PodId {
            namespace: env
                .arg("K8S_POD_NAMESPACE")
                .unwrap_or("default")
                .to_string(),
            name: name.unwrap_or(env.container_id()).to_string(),
            container_id: env.container_id().to_string(),
            ifname: env.ifname().to_string(),
            named: name.is_some(),
        }
    }

    /// The identity the host interface name is hashed from.
    pub fn identity(&self) -> String {
        let base = if self.named {
            format!("{}.{}", self.namespace, self.name)
        } else {
            self.container_id.clone()
        };
        if self.ifname == "eth0" {
            base
        } else {
            format!("{base}.{}", self.ifname)
        }
    }

    /// The IPAM handle: one per network, container and interface.
    pub fn handle(&self, network: &str) -> String {
        format!("{network}.{}.{}", self.container_id, self.ifname)
    }

    fn attributes(&self, network: &str) -> Attributes {
        let mut a = Attributes::from([
            ("network".to_string(), network.to_string()),
            ("containerID".to_string(), self.container_id.clone()),
            ("ifname".to_string(), self.ifname.clone()),
        ]);
        // Where its endpoint record will be: a leak release requires it absent.
        a.insert("namespace".into(), self.namespace.clone());
        a.insert("pod".into(), self.name.clone());
        a
    }
}

/// A node-wide lock around IPAM writes, as Calico's IPAM plugin takes one: the pods of one
/// node allocate from the same block, and serialising them on the host is cheaper than
/// letting ten concurrent ADDs retry their compare-and-swap against each other. Correctness
/// never depends on it (every write is still a guarded transaction); it is dropped on exit.
///
/// Beside the lock file each holder leaves its [`Handoff`] for the next: the next holder's
/// only round trip under the lock is then its own transaction (see
/// [`tessera_datastore::handoff`]).
pub struct IpamLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
    handoff_path: PathBuf,
    acquired: Instant,
}

impl IpamLock {
    /// Asks for the lock at `path`. It is waited for on a thread of its own, not the
    /// runtime's blocking pool: an invocation whose operation another holder did exits
    /// without waiting for its turn (the runtime would wait for a pool thread).
    pub fn ask(path: PathBuf) -> oneshot::Receiver<Result<Self, CniError>> {
        let (tx, rx) = oneshot::channel();
        let asked = Instant::now();
        let spawned = std::thread::Builder::new()
            .name("ipam-lock".into())
            .spawn(move || {
                // Nobody listening any more: the lock is dropped, released, at once.
                let _ = tx.send(Self::acquire(path, asked));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for the IPAM lock");
        }
        rx
    }

    fn acquire(path: PathBuf, asked: Instant) -> Result<Self, CniError> {
        let handoff_path = path.with_extension("handoff");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CniError::io(format!("{}: {e}", dir.display())))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CniError::io(format!("{}: {e}", path.display())))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| CniError::io(format!("locking {}: {e}", path.display())))?;
        tracing::debug!(
            waited_ms = asked.elapsed().as_secs_f64() * 1e3,
            "IPAM lock acquired"
        );
        Ok(IpamLock {
            _lock: lock,
            handoff_path,
            acquired: Instant::now(),
        })
    }

    /// Holds the lock for `ipam`: takes what the previous holder left, and leaves what
    /// `ipam` knows when dropped (whatever the outcome: a failed operation's reads are as
    /// good a guess as a successful one's).
    pub fn hold<'a>(self, ipam: &'a Ipam<EtcdKv>) -> HeldIpam<'a> {
        if let Some(handed) = read_handoff(&self.handoff_path) {
            ipam.adopt(handed);
        }
        HeldIpam { lock: self, ipam }
    }

    /// What the last holder of the lock at `path` left, read without the lock (it is
    /// replaced by a rename, so it is whole), if its view of the node's affinities was read
    /// from etcd recently: then this invocation need not read the node's affinities, blocks
    /// and pools again before it waits for the lock.
    pub fn recent_handoff(path: &std::path::Path) -> Option<Handoff> {
        let handed = read_handoff(&path.with_extension("handoff"))?;
        let read_ms = handed.affinities.as_ref()?.read_ms;
        (tessera_datastore::now_ms().saturating_sub(read_ms) < HANDOFF_TRUSTED_MS).then_some(handed)
    }

    fn leave(&self, handoff: &Handoff) {
        let tmp = self.handoff_path.with_extension("handoff.tmp");
        let written = serde_json::to_vec(handoff)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.handoff_path));
        if let Err(e) = written {
            // The next holder reads from etcd what it cannot take from a handoff.
            tracing::warn!(error = %e, path = %self.handoff_path.display(), "IPAM handoff not written");
        }
    }
}

/// How long the node's affinities in a handoff spare the next invocations from reading
/// them: an affinity another client adds (the node agent's tunnel address, `tesseractl`) is
/// seen within this. The blocks and pools in it need no bound (every write compares them).
const HANDOFF_TRUSTED_MS: u64 = 10_000;

fn read_handoff(path: &std::path::Path) -> Option<Handoff> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<Handoff>(&bytes)
            // A hint only: an unreadable one (a crash mid-write cannot make one, the rename
            // is atomic; another version's format can) is simply not used.
            .inspect_err(|e| tracing::debug!(error = %e, "IPAM handoff ignored"))
            .ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::debug!(error = %e, "IPAM handoff not read");
            None
        }
    }
}

/// The node's IPAM lock (the handoff and the queue beside it): `ipamLockFile`, or one per
/// node name, datastore and network namespace under `/var/run/tessera`. A host has one of
/// each, but not always: the test bed runs several clusters, each with a `node1` in a
/// namespace of its own, on one machine, and two networks may use two datastores; what one
/// of them hands over means nothing to another.
fn lock_path(conf: &NetConf, node: &str) -> PathBuf {
    if let Some(path) = &conf.ipam_lock_file {
        return PathBuf::from(path);
    }
    PathBuf::from(format!(
        "/var/run/tessera/ipam-{node}-{:016x}.lock",
        lock_scope(conf, node)
    ))
}

/// What tells two IPAM scopes of one node name apart: the datastore's endpoints and this
/// process's network namespace.
fn lock_scope(conf: &NetConf, node: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut ds = conf.datastore.clone();
    // As `connect` will see them; a bad environment fails there, with its own error.
    let _ = ds.apply_process_env();
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or_default();
    tessera_datastore::fnv1a(&format!("{node}\0{:?}\0{netns}", ds.etcd_endpoints))
}

/// Where the node's plain IPAM operations wait for its lock (see [`crate::ipam_queue`]):
/// beside `ipamLockFile`, else a short name, as the waiters' sockets in it must fit in 107
/// bytes.
fn queue_dir(conf: &NetConf, node: &str) -> PathBuf {
    let lock = lock_path(conf, node);
    if conf.ipam_lock_file.is_some() {
        return lock.with_extension("queue");
    }
    let hash = tessera_datastore::fnv1a(&lock.to_string_lossy());
    PathBuf::from(format!("/var/run/tessera/q-{hash:016x}"))
}

/// Waits for the node's IPAM lock (asked for in `lock` while the caller read ahead) and
/// gets a plain operation done in the node's batch: by another holder (then without the
/// lock), or now with everything queued. The outcome `None` or [`BatchedOutcome::Alone`]:
/// do it the ordinary way, with the lock held.
async fn take_turn<'a>(
    ipam: &'a Ipam<EtcdKv>,
    mut lock: oneshot::Receiver<Result<IpamLock, CniError>>,
    queue: PathBuf,
    op: Option<BatchedOp>,
) -> Result<(Option<HeldIpam<'a>>, Option<BatchedOutcome>), CniError> {
    let lock_lost = |_| CniError::io("the IPAM lock's thread ended without an answer");
    // Queued only while the lock is still to come: a holder may then do it for us.
    let ticket = match (&op, ipam.store()) {
        (Some(op), Some(store)) if lock.is_empty() => Ticket::submit(&queue, store, op)
            .inspect_err(|e| tracing::warn!(error = %e, "not queued: waiting for the IPAM lock"))
            .ok(),
        _ => None,
    };
    let held = match &ticket {
        Some(ticket) => tokio::select! {
            outcome = ticket.delivered() => return Ok((None, Some(outcome))),
            held = &mut lock => held.map_err(lock_lost)??.hold(ipam),
        },
        None => lock.await.map_err(lock_lost)??.hold(ipam),
    };
    let outcome = match (ticket, op) {
        (Some(ticket), _) => ticket.serve(ipam).await?,
        (None, Some(op)) => Some(ipam_queue::serve_with(&queue, op, ipam).await?),
        (None, None) => None,
    };
    Ok((Some(held), outcome))
}

/// The node's IPAM lock, held for one [`Ipam`] client.
pub struct HeldIpam<'a> {
    lock: IpamLock,
    ipam: &'a Ipam<EtcdKv>,
}

impl Drop for HeldIpam<'_> {
    fn drop(&mut self) {
        self.lock.leave(&self.ipam.handoff());
        tracing::debug!(
            held_ms = self.lock.acquired.elapsed().as_secs_f64() * 1e3,
            "IPAM lock released"
        );
    }
}

/// This node's name: config, TESSERA_NODENAME, the node name file, the hostname.
pub fn node_name(conf: &NetConf) -> Result<String, CniError> {
    if let Some(n) = conf.nodename.clone().filter(|n| !n.is_empty()) {
        return Ok(n);
    }
    if let Ok(n) = std::env::var("TESSERA_NODENAME") {
        if !n.is_empty() {
            return Ok(n);
        }
    }
    let file = conf
        .nodename_file
        .as_deref()
        .unwrap_or("/var/lib/tessera/nodename");
    if let Ok(n) = std::fs::read_to_string(file) {
        if !n.trim().is_empty() {
            return Ok(n.trim().to_string());
        }
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .ok_or_else(|| CniError::invalid_config("cannot tell this node's name: set `nodename`"))
}

/// A client of the datastore, without a request of its own: the invocation's first read is
/// the first request. When the invocation fails for the datastore's sake, [`explain`] says
/// why (a certificate, a login, etcd down).
pub async fn connect(conf: &NetConf) -> Result<EtcdKv, CniError> {
    let ds = datastore_config(conf)?;
    ds.connect_unprobed().await.map_err(datastore_error)
}

/// A client of the datastore that has made one request: a wrong certificate, a refused
/// login or etcd down is an error here, naming the cause (STATUS's answer).
pub async fn connect_proven(conf: &NetConf) -> Result<EtcdKv, CniError> {
    let ds = datastore_config(conf)?;
    ds.connect().await.map_err(datastore_error)
}

/// `failure` unless it came from the datastore and a connection that proves itself fails,
/// naming the cause; only failures pay for that request.
pub async fn explain(conf: &NetConf, failure: CniError) -> CniError {
    if ![code::TRY_AGAIN_LATER, code::DATASTORE].contains(&failure.code) {
        return failure;
    }
    match connect_proven(conf).await {
        Ok(_) => failure,
        Err(e) => e,
    }
}

/// The network configuration's `datastore` section, overridden by the ETCD_* environment
/// (the same names as every Tessera binary).
fn datastore_config(
    conf: &NetConf,
) -> Result<tessera_datastore::connection::DatastoreConfig, CniError> {
    let mut ds = conf.datastore.clone();
    ds.apply_process_env()
        .map_err(|e| CniError::invalid_config(e.to_string()))?;
    Ok(ds)
}

/// A configuration to fix is "invalid network config"; etcd down or unreachable is "try
/// again later".
fn datastore_error(e: tessera_datastore::connection::DatastoreError) -> CniError {
    if e.is_transient() {
        CniError::new(code::TRY_AGAIN_LATER, e.to_string())
    } else {
        CniError::invalid_config(format!("datastore: {e}"))
    }
}

fn parse_addr(s: &str) -> Result<IpAddr, CniError> {
    let bare = s.split('/').next().unwrap_or(s);
    bare.parse().map_err(|_| {
        CniError::invalid_config(format!("requested address {s:?} is not an IP address"))
    })
}

/// What ADD got from IPAM.
#[derive(Debug, Clone, Default)]
pub struct Assigned {
    pub addresses: Vec<IpAddr>,
    /// The handle held these addresses before this ADD (a repeated ADD): a failure now must
    /// not release them, the pod may be using them.
    pub already_held: bool,
    /// From the pod intent, for the endpoint record.
    pub floating_ips: Vec<IpAddr>,
    /// The addresses are the pod's own, outside IPAM (`ipAddrsNoIpam`): no handle holds
    /// them.
    pub without_ipam: bool,
    /// The IPAM handle's revision after the assignment: the endpoint write is guarded by it.
    pub handle_revision: i64,
}

/// One CNI invocation, as IPAM sees it.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    pub kv: &'a EtcdKv,
    pub conf: &'a NetConf,
    pub env: &'a CniEnv,
    pub node: &'a str,
    pub pod: &'a PodId,
    /// The network configuration as received, for a delegated IPAM plugin.
    pub stdin: &'a [u8],
}

/// Assigns the pod's addresses and returns them. ADD twice for the same container returns
/// what the first ADD got.
pub async fn assign(call: Call<'_>) -> Result<Assigned, CniError> {
    let Call {
        kv,
        conf,
        env,
        node,
        pod,
        stdin,
    } = call;
    let ipam_conf = conf
        .ipam
        .as_ref()
        .ok_or_else(|| CniError::invalid_config("the `ipam` section is missing"))?;
    if ipam_conf.ipam_type != TESSERA_IPAM {
        let result = delegate::run(env, &ipam_conf.ipam_type, "ADD", stdin).await?;
        let r = CniResult::from_json(&result.unwrap_or(Value::Null))?;
        return Ok(Assigned {
            addresses: r.ips.iter().map(|i| i.address.ip()).collect(),
            already_held: false,
            floating_ips: Vec::new(),
            // A delegated IPAM plugin's addresses: no Tessera handle holds them.
            without_ipam: true,
            handle_revision: 0,
        });
    }
    let ipam = Ipam::new(kv.clone(), node);
    let handle = pod.handle(&conf.name);
    // Before this invocation waits for the node's IPAM lock it reads the pod's intent and
    // everything its assignment needs: the pod's handle, pools, the node's affinities and
    // blocks. Under the lock the previous holder's handoff brings those reads up to date
    // (the block it just claimed or wrote, the handle of a repeated ADD for the same
    // container it just assigned), so the assignment is one transaction; a plain one
    // waits in the node's queue and usually shares that transaction with others.
    let intent = async {
        if pod.named {
            intent_or_apiserver(kv, conf, pod).await
        } else {
            Ok(None)
        }
    };
    let workload = pod
        .named
        .then_some((pod.namespace.as_str(), pod.name.as_str()));
    let lock_path = lock_path(conf, node);
    let read_ahead = read_ahead(&ipam, &handle, &lock_path, workload);
    let lock = IpamLock::ask(lock_path.clone());
    let (read_ahead, intent) = tokio::join!(read_ahead, intent);
    read_ahead?;
    let intent = intent?.unwrap_or_default();
    if let Some(why) = &intent.invalid {
        return Err(CniError::invalid_config(format!(
            "the pod's annotations cannot be followed: {why}"
        )));
    }
    let requested = requested_addresses(conf, env, &intent);
    let owner = Owner {
        handle: handle.clone(),
        workload: pod.named.then(|| WorkloadId {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            labels: intent.labels.clone(),
        }),
        attrs: pod.attributes(&conf.name),
    };
    let mut pools = ipam_conf.ipv4_pools.clone();
    pools.extend(ipam_conf.ipv6_pools.iter().cloned());
    pools.extend(intent.ipv4_pools.iter().cloned());
    pools.extend(intent.ipv6_pools.iter().cloned());
    let req = AssignRequest {
        owner: owner.clone(),
        num_v4: usize::from(ipam_conf.assign_ipv4),
        num_v6: usize::from(ipam_conf.assign_ipv6),
        pools,
    };
    let floating_ips = intent.floating_ips.clone();
    let done = |addresses: Vec<IpAddr>| Assigned {
        addresses,
        already_held: false,
        floating_ips: floating_ips.clone(),
        without_ipam: false,
        handle_revision: 0,
    };

    let plain = ipam.held(&handle).await?.0.is_empty()
        && intent.sticky_hold.is_none()
        && intent.ip_addrs_no_ipam.is_empty()
        && requested.as_ref().is_ok_and(Vec::is_empty);
    let batched = plain.then(|| BatchedOp::Assign {
        request: req.clone(),
        previous: owner
            .workload
            .as_ref()
            .and_then(|w| ipam.previous_addresses(w)),
    });
    let (_held, outcome) = take_turn(&ipam, lock, queue_dir(conf, node), batched).await?;
    if let Some(BatchedOutcome::Assigned {
        assignments,
        handle_revision,
    }) = outcome
    {
        return Ok(Assigned {
            handle_revision,
            ..done(assignments.into_iter().map(|a| a.addr).collect())
        });
    }

    let (existing, _) = ipam.held(&handle).await?;
    // A sticky pod back (on any node): the addresses its hold kept.
    if let (true, Some(hold)) = (existing.is_empty(), &intent.sticky_hold) {
        let moved = tessera_datastore::sticky::transfer(kv, hold, &handle, &owner.attrs).await?;
        if !moved.is_empty() {
            tracing::info!(%handle, %hold, ?moved, "ADD of a sticky pod: its kept addresses");
            let handle_revision = kv
                .get(&tessera_datastore::keys::handle(&handle))
                .await
                .map_err(tessera_datastore::IpamError::from)?
                .map_or(0, |h| h.mod_revision);
            return Ok(Assigned {
                handle_revision,
                ..done(moved)
            });
        }
    }
    if !existing.is_empty() {
        tracing::info!(%handle, ?existing, "ADD again for the same container: same addresses");
        return Ok(Assigned {
            already_held: true,
            handle_revision: ipam.handle_revision(&handle).await?,
            ..done(existing)
        });
    }
    if !intent.ip_addrs.is_empty() && !intent.ip_addrs_no_ipam.is_empty() {
        return Err(CniError::invalid_config(
            "the pod asks for both ipAddrs and ipAddrsNoIpam",
        ));
    }
    if !intent.ip_addrs_no_ipam.is_empty() {
        if !conf.feature_flags.ip_addrs_no_ipam {
            return Err(CniError::invalid_config(
                "ipAddrsNoIpam is disabled (featureFlags.ipAddrsNoIpam in the CNI config)",
            ));
        }
        return Ok(Assigned {
            without_ipam: true,
            ..done(intent.ip_addrs_no_ipam.clone())
        });
    }
    let requested = requested?;
    if !requested.is_empty() {
        let mut got = Vec::new();
        for addr in requested {
            match ipam.assign_exact(&owner, addr).await {
                Ok(a) => got.push(a.addr),
                Err(e) => {
                    // All or nothing.
                    if let Err(r) = ipam.release_by_handle(&handle).await {
                        tracing::warn!(error = %r, "rollback of exact assignment failed");
                    }
                    return Err(e.into());
                }
            }
        }
        return Ok(Assigned {
            handle_revision: ipam.handle_revision(&handle).await?,
            ..done(got)
        });
    }
    let got = ipam.auto_assign(&req).await?;
    Ok(Assigned {
        handle_revision: ipam.handle_revision(&handle).await?,
        ..done(got.into_iter().map(|a| a.addr).collect())
    })
}

/// The exact addresses asked for: the `ips` capability, `IP=` in CNI_ARGS, the pod's
/// `ipAddrs` annotation; each once.
fn requested_addresses(
    conf: &NetConf,
    env: &CniEnv,
    intent: &tessera_datastore::model::PodIntent,
) -> Result<Vec<IpAddr>, CniError> {
    let mut requested: Vec<IpAddr> = Vec::new();
    for s in &conf.runtime_config.ips {
        requested.push(parse_addr(s)?);
    }
    if let Some(ips) = env.arg("IP") {
        for s in ips.split(',').filter(|s| !s.is_empty()) {
            requested.push(parse_addr(s)?);
        }
    }
    requested.extend(intent.ip_addrs.iter().copied());
    let mut seen = HashSet::new();
    requested.retain(|a| seen.insert(*a));
    Ok(requested)
}

/// What an ADD or DEL reads while it waits for the node's IPAM lock: the pod's handle and
/// which store this is, then, unless a recent handoff of this store has them, the pools,
/// the node's affinities and blocks; with `workload` (namespace, name), its last addresses.
async fn read_ahead(
    ipam: &Ipam<EtcdKv>,
    handle: &str,
    lock_path: &std::path::Path,
    workload: Option<(&str, &str)>,
) -> Result<(), tessera_datastore::IpamError> {
    // One round of reads (the datastore client sends them as one request): what is needed
    // in any case; then, after a recent handoff of this store is taken, whatever it lacks.
    let (held, store, node_and_workload) = tokio::join!(
        ipam.held(handle),
        store_id(ipam.kv()),
        ipam.prefetch_node_and_workload(workload)
    );
    held?;
    node_and_workload?;
    ipam.set_store(store?);
    if let Some(handed) = IpamLock::recent_handoff(lock_path) {
        ipam.adopt(handed);
    }
    ipam.prefetch_for(workload).await
}

/// How long an ADD waits for the Kubernetes controllers to write a pod's intent before it
/// asks the apiserver itself.
const INTENT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The pod's intent: the datastore's; with a kubeconfig and none there yet (the controllers
/// have not seen the pod), after a short wait, the pod and its namespace read from the
/// apiserver and mapped the way the controllers map them. An annotation is never ignored.
async fn intent_or_apiserver(
    kv: &EtcdKv,
    conf: &NetConf,
    pod: &PodId,
) -> Result<Option<tessera_datastore::model::PodIntent>, CniError> {
    let found = get_pod_intent(kv, &pod.namespace, &pod.name).await?;
    let Some(k) = conf.kubernetes.as_ref().filter(|_| found.is_none()) else {
        return Ok(found);
    };
    let deadline = tokio::time::Instant::now() + INTENT_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if let Some(i) = get_pod_intent(kv, &pod.namespace, &pod.name).await? {
            return Ok(Some(i));
        }
    }
    tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), "no intent yet: reading the pod from the apiserver");
    let unreachable = |e: &dyn std::fmt::Display| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the pod's intent is not in the datastore and the apiserver did not answer: {e}"
            ),
        )
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&k.kubeconfig).map_err(|e| {
        CniError::invalid_config(format!("kubernetes.kubeconfig {}: {e}", k.kubeconfig))
    })?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| {
            CniError::invalid_config(format!("kubernetes.kubeconfig {}: {e}", k.kubeconfig))
        })?;
    let client = kube::Client::try_from(config).map_err(|e| unreachable(&e))?;
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    let p: Pod = kube::Api::namespaced(client.clone(), &pod.namespace)
        .get(&pod.name)
        .await
        .map_err(|e| unreachable(&e))?;
    let ns: Option<Namespace> = kube::Api::all(client)
        .get_opt(&pod.namespace)
        .await
        .map_err(|e| unreachable(&e))?;
    use tessera_kube_controllers::controller::{namespace_view, pod_view};
    let ns_view = ns.as_ref().map(namespace_view);
    tessera_kube_controllers::intent::pod_intent(&pod_view(&p), ns_view.as_ref())
        .map(Some)
        .map_err(|e| {
            CniError::invalid_config(format!("the pod's annotations cannot be followed: {e}"))
        })
}

/// Releases the pod's addresses (idempotent). `also_delete` are keys to delete with them
/// (DEL's endpoint record) when the node's queue serves the release, in the same
/// transaction; true when it did, else they are the caller's to delete.
pub async fn release(call: Call<'_>, also_delete: Vec<String>) -> Result<bool, CniError> {
    let Call {
        kv,
        conf,
        env,
        node,
        pod,
        stdin,
    } = call;
    match conf.ipam.as_ref() {
        Some(i) if i.ipam_type == TESSERA_IPAM => {
            let handle = pod.handle(&conf.name);
            let ipam = Ipam::new(kv.clone(), node);
            // As in ADD, the reads happen before the lock and the previous holder's
            // handoff brings them up to date; a plain release waits in the node's queue.
            let lock_path = lock_path(conf, node);
            let read_ahead = read_ahead(&ipam, &handle, &lock_path, None);
            let lock = IpamLock::ask(lock_path.clone());
            let (intent, read_ahead) =
                tokio::join!(get_pod_intent(kv, &pod.namespace, &pod.name), read_ahead);
            let intent = intent?;
            read_ahead?;
            let sticky = intent.as_ref().is_some_and(|i| i.sticky_hold.is_some());
            let batched = (!sticky).then(|| BatchedOp::Release {
                handle: handle.clone(),
                as_read: ipam.known_handle(&handle),
                also_delete,
            });
            let (_held, outcome) = take_turn(&ipam, lock, queue_dir(conf, node), batched).await?;
            if let Some(BatchedOutcome::Released { .. }) = outcome {
                return Ok(true);
            }
            // A sticky pod leaves: its hold keeps the addresses for its return.
            if let Some(hold) = intent.and_then(|i| i.sticky_hold) {
                let attrs = Attributes::from([
                    ("namespace".to_string(), pod.namespace.clone()),
                    ("pod".to_string(), pod.name.clone()),
                ]);
                let kept = tessera_datastore::sticky::transfer(kv, &handle, &hold, &attrs).await?;
                tracing::info!(%handle, %hold, ?kept, "DEL of a sticky pod: addresses kept");
                return Ok(false);
            }
            ipam.release_by_handle(&handle).await?;
            Ok(false)
        }
        Some(i) => delegate::run(env, &i.ipam_type, "DEL", stdin)
            .await
            .map(|_| false),
        None => Ok(false),
    }
}

/// CHECK for in-process IPAM: the handle holds exactly the addresses the pod has.
pub async fn check(
    kv: &EtcdKv,
    conf: &NetConf,
    node: &str,
    pod: &PodId,
    addrs: &[IpAddr],
) -> Result<(), CniError> {
    let ipam = Ipam::new(kv.clone(), node);
    let mut held = ipam.handle_addresses(&pod.handle(&conf.name)).await?;
    let mut want = addrs.to_vec();
    held.sort();
    want.sort();
    if held != want {
        return Err(CniError::check_failed(format!(
            "IPAM holds {held:?} for this container, the pod has {want:?}"
        )));
    }
    Ok(())
}

/// GC (spec 1.1): releases every allocation of this network on this node whose
/// (container, interface) is not in `cni.dev/valid-attachments`, and its endpoint record.
pub async fn gc(kv: &EtcdKv, conf: &NetConf, node: &str) -> Result<Vec<String>, CniError> {
    let valid: HashSet<(String, String)> = conf
        .extra
        .get("cni.dev/valid-attachments")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| {
                    Some((
                        v.get("containerID")?.as_str()?.to_string(),
                        v.get("ifname")?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let snap = Snapshot::read(kv).await?;
    let mut stale: Vec<String> = snap
        .blocks
        .values()
        .flat_map(|b| {
            b.value
                .allocated()
                .map(|(_, a)| a.clone())
                .collect::<Vec<_>>()
        })
        .filter(|a| {
            let attr = |k: &str| a.attrs.get(k).cloned().unwrap_or_default();
            attr("node") == node
                && attr("network") == conf.name
                && !valid.contains(&(attr("containerID"), attr("ifname")))
        })
        .map(|a| a.handle)
        .collect();
    stale.sort();
    stale.dedup();
    let ipam = Ipam::new(kv.clone(), node);
    for h in &stale {
        ipam.release_by_handle(h).await?;
    }
    for wep in list_workload_endpoints(kv, node).await? {
        if stale.contains(&wep.handle) {
            tessera_datastore::resources::delete_workload_endpoint(
                kv,
                node,
                &wep.namespace,
                &wep.pod,
                &wep.interface,
            )
            .await?;
        }
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_datastore::handoff::Affinities;

    #[test]
    fn a_handoff_is_trusted_before_the_lock_only_while_its_affinities_are_recent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = dir.path().join("ipam-node1.lock");
        assert_eq!(IpamLock::recent_handoff(&lock), None, "none yet");
        let leave = |read_ms: u64| {
            let handoff = Handoff {
                node: "node1".into(),
                affinities: Some(Affinities {
                    as_of: 7,
                    read_ms,
                    blocks: Default::default(),
                }),
                ..Default::default()
            };
            let bytes = serde_json::to_vec(&handoff).expect("json");
            std::fs::write(lock.with_extension("handoff"), bytes).expect("write");
            handoff
        };
        let now = tessera_datastore::now_ms();
        let recent = leave(now - 1_000);
        assert_eq!(IpamLock::recent_handoff(&lock), Some(recent));
        leave(now - HANDOFF_TRUSTED_MS - 1_000);
        assert_eq!(IpamLock::recent_handoff(&lock), None, "read too long ago");
        std::fs::write(lock.with_extension("handoff"), b"{garbage").expect("write");
        assert_eq!(IpamLock::recent_handoff(&lock), None, "unreadable");
    }
}
