//! The datastore seam: a small key-value trait with multi-key compare-and-swap transactions,
//! implemented for etcd ([`EtcdKv`]) and in memory ([`MemKv`], for fast unit tests).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A stored value with the revisions that compare-and-swap needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A guard in a transaction. `ModRevision(key, 0)` means "key absent".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    ModRevision(String, i64),
    /// The key exists (at any revision).
    Exists(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<i64>,
    },
    Delete {
        key: String,
    },
    /// Every key that begins with `prefix`.
    DeletePrefix {
        prefix: String,
    },
    Get {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: Vec<u8>) -> Op {
        Op::Put {
            key: key.into(),
            value,
            lease: None,
        }
    }
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }
    pub fn delete_prefix(prefix: impl Into<String>) -> Op {
        Op::DeletePrefix {
            prefix: prefix.into(),
        }
    }
    pub fn get(key: impl Into<String>) -> Op {
        Op::Get { key: key.into() }
    }
}

/// If every compare holds, `success` runs, else `failure` (typically gets that refresh the
/// caller's view in the same round trip).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    /// Guard: `key` is at `mod_revision` (0: absent).
    pub fn expect(mut self, key: impl Into<String>, mod_revision: i64) -> Self {
        self.compares
            .push(Compare::ModRevision(key.into(), mod_revision));
        self
    }
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }
    pub fn then_all(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success.extend(ops);
        self
    }
    pub fn or_get(mut self, key: impl Into<String>) -> Self {
        self.failure.push(Op::get(key));
        self
    }
}

/// The most compares, and the most operations in either branch, etcd takes in one
/// transaction (its `--max-txn-ops` default); [`MemKv`] refuses more as etcd does.
pub const MAX_TXN_OPS: usize = 128;

/// The most writes that vary with the work (records of block format V6, handles of a batch)
/// Tessera puts in one transaction, leaving room under [`MAX_TXN_OPS`] for the few every
/// transaction has (its block, handle, last addresses, guards).
pub const MAX_TXN_WRITES: usize = MAX_TXN_OPS - 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    pub succeeded: bool,
    /// The store's revision after the transaction: the new mod_revision of every key it put.
    pub revision: i64,
    /// Results of the `Get` ops of the branch that ran, in order.
    pub gets: Vec<Option<KeyValue>>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    /// The store could not be reached or did not answer in time; worth retrying.
    #[error("datastore unavailable: {0}")]
    Unavailable(String),
    #[error("datastore error: {0}")]
    Other(String),
    /// The store could not be reached by a client that has never had an answer from it:
    /// not worth retrying, as likely a wrong setting (endpoint, certificate, login) as an
    /// outage. Clients that prove themselves on connecting never see it.
    #[error("datastore not reached: {0}")]
    NeverReached(String),
}

impl KvError {
    pub fn is_transient(&self) -> bool {
        matches!(self, KvError::Unavailable(_))
    }
}

/// The operations Tessera needs from its datastore.
pub trait Kv: Clone + Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, KvError>> + Send;
    /// Every key under `prefix`, sorted, and the store revision the read was made at.
    fn get_prefix(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<KeyValue>, i64), KvError>> + Send;
    /// Keys and mod revisions under `prefix`, without values (cheap on large prefixes).
    fn list_keys(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<(String, i64)>, KvError>> + Send;
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnOutcome, KvError>> + Send;
    fn lease_grant(&self, ttl_secs: i64) -> impl Future<Output = Result<i64, KvError>> + Send;
    /// Refreshes a lease; returns its remaining TTL (0 or less: the lease is gone).
    fn lease_keep_alive(&self, id: i64) -> impl Future<Output = Result<i64, KvError>> + Send;
    fn lease_revoke(&self, id: i64) -> impl Future<Output = Result<(), KvError>> + Send;
}

/// etcd v3 through `etcd-client`, over one member at a time. Cheap to clone (the members
/// and the gRPC channel are shared).
///
/// A request goes to the member in use; when that member cannot be reached, or has no
/// leader (requests carry etcd's require-leader flag, so a member cut off from the others
/// says so at once instead of waiting out the timeout), the client moves to the next
/// member and sends the request again there. Reads move on any transient error; writes
/// (transactions, leases) only when the request cannot have been applied (no connection,
/// no leader): a write whose outcome is unknown is the caller's to retry after re-reading,
/// as every guarded transaction in Tessera is. etcd-client's own balancing over several
/// endpoints does not do this: it sends requests to a dead member until they time out.
#[derive(Clone)]
pub struct EtcdKv {
    members: Arc<Members>,
}

struct Members {
    endpoints: Vec<String>,
    opts: etcd_client::ConnectOptions,
    current: std::sync::Mutex<Member>,
    /// Requests sent (each resend counted), for the CNI plugin's per-invocation log.
    sent: std::sync::atomic::AtomicU64,
    /// Whether any request has been answered (see [`KvError::NeverReached`]).
    answered: std::sync::atomic::AtomicBool,
    /// Single-key reads waiting to go out together (see [`EtcdKv::get`]).
    gets: std::sync::Mutex<Option<GetBatch>>,
}

/// Single-key reads made while one of them waited a scheduler turn: sent as one read-only
/// transaction, which etcd answers at one revision without a raft round, like a range.
#[derive(Default)]
struct GetBatch {
    keys: Vec<String>,
    waiters: Vec<tokio::sync::oneshot::Sender<Result<Option<KeyValue>, KvError>>>,
}

/// A batch's leader until it has taken its batch.
struct LeaderGuard<'a> {
    kv: &'a EtcdKv,
}

impl LeaderGuard<'_> {
    fn take(self) -> GetBatch {
        let batch = self.kv.lock_gets().take().unwrap_or_default();
        std::mem::forget(self);
        batch
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        // Dropping the batch drops its senders: its readers see it and read alone.
        drop(self.kv.lock_gets().take());
    }
}

/// Reads per batch, well under etcd's default `--max-txn-ops` (128).
const MAX_GETS_PER_BATCH: usize = 64;

/// The member in use: its index in `endpoints` and a client of it alone.
#[derive(Clone)]
struct Member {
    index: usize,
    client: etcd_client::Client,
}

/// Whether a failed request may be sent again to another member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// A read: any transient error.
    Read,
    /// A write: only when it cannot have been applied.
    WriteNotApplied,
}

impl EtcdKv {
    /// Connects to `endpoints` (e.g. `http://198.18.1.1:2379`). Requests time out after
    /// `timeout`, so a dead etcd gives an error instead of a hang.
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Self, KvError> {
        let opts = etcd_client::ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(5), timeout);
        Self::connect_with(endpoints, opts).await
    }

    /// With options built elsewhere (TLS, a user): see
    /// [`crate::connection::DatastoreConfig::connect`], what the binaries use. Clients
    /// start at a member picked by process id, so that a node's agent and its CNI
    /// invocations spread over the cluster.
    pub async fn connect_with(
        endpoints: &[String],
        opts: etcd_client::ConnectOptions,
    ) -> Result<Self, KvError> {
        if endpoints.is_empty() {
            return Err(KvError::Other("no etcd endpoint".into()));
        }
        let opts = opts.with_require_leader(true);
        let n = endpoints.len();
        let first = std::process::id() as usize % n;
        let mut last = None;
        for k in 0..n {
            let index = (first + k) % n;
            match etcd_client::Client::connect([&endpoints[index]], Some(opts.clone())).await {
                Ok(client) => {
                    return Ok(EtcdKv {
                        members: Arc::new(Members {
                            endpoints: endpoints.to_vec(),
                            opts,
                            current: std::sync::Mutex::new(Member { index, client }),
                            sent: Default::default(),
                            answered: Default::default(),
                            gets: Default::default(),
                        }),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .as_ref()
            .map(etcd_error)
            .unwrap_or_else(|| KvError::Other("no member".into())))
    }

    fn member(&self) -> Member {
        self.members
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Moves to the member after `failed`, unless another request already moved on.
    async fn move_on_from(&self, failed: usize) {
        let n = self.members.endpoints.len();
        if self.member().index != failed {
            return;
        }
        for k in 1..n {
            let index = (failed + k) % n;
            let endpoint = &self.members.endpoints[index];
            // Connecting is lazy unless a login is needed; a dead member shows on the
            // resent request, which moves on again.
            if let Ok(client) =
                etcd_client::Client::connect([endpoint], Some(self.members.opts.clone())).await
            {
                let mut current = self
                    .members
                    .current
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if current.index == failed {
                    tracing::info!(from = %self.members.endpoints[failed], to = %endpoint, "moving to another etcd member");
                    *current = Member { index, client };
                }
                return;
            }
        }
    }

    /// Sends a request, moving to the next member as `resend` allows, at most once round
    /// the cluster.
    async fn request<T, F, Fut>(&self, resend: Resend, f: F) -> Result<T, KvError>
    where
        F: Fn(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.members.endpoints.len();
        let mut tries = 0;
        loop {
            let member = self.member();
            self.members
                .sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match f(member.client).await {
                Ok(v) => {
                    self.members
                        .answered
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => {
                    tries += 1;
                    let again = match resend {
                        Resend::Read => etcd_error(&e).is_transient(),
                        Resend::WriteNotApplied => not_applied(&e),
                    };
                    if !again || tries >= n {
                        return Err(match etcd_error(&e) {
                            KvError::Unavailable(text)
                                if !self
                                    .members
                                    .answered
                                    .load(std::sync::atomic::Ordering::Relaxed) =>
                            {
                                KvError::NeverReached(text)
                            }
                            other => other,
                        });
                    }
                    tracing::debug!(member = %self.members.endpoints[member.index], error = %with_causes(&e), "etcd member failed; trying the next");
                    self.move_on_from(member.index).await;
                }
            }
        }
    }

    fn lock_gets(&self) -> std::sync::MutexGuard<'_, Option<GetBatch>> {
        self.members.gets.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn get_one(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        let resp = self
            .request(Resend::Read, |mut c| async move { c.get(key, None).await })
            .await?;
        Ok(resp.kvs().first().map(from_etcd))
    }

    /// Answers every reader in `batch`: one plain read for one key, else one read-only
    /// transaction.
    async fn send_gets(&self, batch: GetBatch) {
        let read = if let [key] = batch.keys.as_slice() {
            self.get_one(key).await.map(|v| vec![v])
        } else {
            let t = etcd_client::Txn::new().and_then(
                batch
                    .keys
                    .iter()
                    .map(|k| etcd_client::TxnOp::get(k.as_str(), None))
                    .collect::<Vec<_>>(),
            );
            self.request(Resend::Read, |mut c| {
                let t = t.clone();
                async move { c.txn(t).await }
            })
            .await
            .map(|resp| {
                resp.op_responses()
                    .into_iter()
                    .map(|r| match r {
                        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(from_etcd),
                        _ => None,
                    })
                    .collect()
            })
        };
        match read {
            Ok(values) => {
                for (waiter, value) in batch.waiters.into_iter().zip(values) {
                    let _ = waiter.send(Ok(value));
                }
            }
            Err(e) => {
                for waiter in batch.waiters {
                    let _ = waiter.send(Err(e.clone()));
                }
            }
        }
    }

    /// One key-only read of at most one key under `prefix`: proves the connection, the TLS
    /// handshake, the login and read permission.
    pub async fn probe(&self, prefix: &str) -> Result<(), KvError> {
        let opts = etcd_client::GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_limit(1);
        self.request(Resend::Read, |mut c| {
            let opts = opts.clone();
            async move { c.get(prefix, Some(opts)).await }
        })
        .await?;
        Ok(())
    }

    /// The client of the member in use, for what the [`Kv`] trait does not cover
    /// (watches). A watch that breaks reports it with [`EtcdKv::watch_broke`].
    pub fn client(&self) -> etcd_client::Client {
        self.member().client
    }

    /// A watch on the member in use broke (the member died, lost its leader, or the stream
    /// ended): the next watch goes to the next member.
    pub async fn watch_broke(&self) {
        let index = self.member().index;
        if self.members.endpoints.len() > 1 {
            self.move_on_from(index).await;
        }
    }

    /// Requests this client (and its clones) has sent so far, resends included.
    pub fn requests_sent(&self) -> u64 {
        self.members.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The endpoint of the member in use.
    pub fn endpoint(&self) -> String {
        self.members.endpoints[self.member().index].clone()
    }
}

/// Whether a failed write certainly was not applied: no connection to the member, or the
/// member has no leader (etcd refuses a require-leader request before proposing it).
fn not_applied(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    let text = with_causes(e).to_lowercase();
    match e {
        E::TransportError(_) => true,
        E::GRpcStatus(s) if s.code() == tonic_code::Code::Unavailable => [
            "connect error",
            "connection refused",
            "no leader",
            "no route to host",
        ]
        .iter()
        .any(|w| text.contains(w)),
        _ => false,
    }
}

fn etcd_error(e: &etcd_client::Error) -> KvError {
    use etcd_client::Error as E;
    use tonic_code::*;
    let text = with_causes(e);
    match e {
        E::TransportError(_) | E::IoError(_) => KvError::Unavailable(text),
        E::GRpcStatus(s) if TRANSIENT.contains(&s.code()) => KvError::Unavailable(text),
        _ => KvError::Other(text),
    }
}

/// The error and what caused it (a transport error alone says nothing of a certificate).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// gRPC codes that mean "try again" rather than "you asked for something wrong".
mod tonic_code {
    pub use tonic::Code;
    pub const TRANSIENT: [Code; 6] = [
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::Unknown,
        Code::Aborted,
        Code::ResourceExhausted,
        Code::Cancelled,
    ];
}

/// Keys per page of a prefix read. A response must fit gRPC's 4 MiB message limit (what
/// etcd-client accepts): 2,500 blocks of 2.6 KB in one response did not. A full /26 in the
/// first block format is ~19 KB, so 128 of them stay under 2.5 MiB.
const PAGE_KEYS: i64 = 128;
/// Keys without values: handles and endpoints of a 150,000-pod cluster are ~100 bytes each.
const PAGE_KEYS_ONLY: i64 = 10_000;

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

impl EtcdKv {
    /// Everything under `prefix`, read in pages of `page` keys, every page at the revision
    /// of the first: one consistent snapshot however large the prefix.
    async fn range_in_pages(
        &self,
        prefix: &str,
        page: i64,
        keys_only: bool,
    ) -> Result<(Vec<KeyValue>, i64), KvError> {
        tracing::trace!(prefix, keys_only, "etcd range");
        let end = prefix_end(prefix);
        let mut from = prefix.as_bytes().to_vec();
        let mut rev = 0;
        let mut out = Vec::new();
        loop {
            let resp = self
                .request(Resend::Read, |mut c| {
                    let (from, end) = (from.clone(), end.clone());
                    async move {
                        let mut opts = etcd_client::GetOptions::new()
                            .with_range(end)
                            .with_limit(page);
                        if rev > 0 {
                            opts = opts.with_revision(rev);
                        }
                        if keys_only {
                            opts = opts.with_keys_only();
                        }
                        c.get(from, Some(opts)).await
                    }
                })
                .await?;
            if rev == 0 {
                rev = resp.header().map(|h| h.revision()).unwrap_or_default();
            }
            out.extend(resp.kvs().iter().map(from_etcd));
            match out.last() {
                Some(last) if resp.more() => {
                    from = last.key.as_bytes().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, rev)),
            }
        }
    }
}

fn from_etcd(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn to_etcd_op(op: &Op) -> etcd_client::TxnOp {
    match op {
        Op::Put { key, value, lease } => etcd_client::TxnOp::put(
            key.as_str(),
            value.clone(),
            lease.map(|l| etcd_client::PutOptions::new().with_lease(l)),
        ),
        Op::Delete { key } => etcd_client::TxnOp::delete(key.as_str(), None),
        Op::DeletePrefix { prefix } => etcd_client::TxnOp::delete(
            prefix.as_str(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ),
        Op::Get { key } => etcd_client::TxnOp::get(key.as_str(), None),
    }
}

impl Kv for EtcdKv {
    /// Reads made together (the branches of a `join!`, concurrent tasks) go out as one
    /// request: the first to arrive waits one scheduler turn for the others, then sends
    /// them all. A plugin's read-ahead is one request instead of five.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        tracing::trace!(key, "etcd get");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let leads = {
            let mut pending = self.lock_gets();
            match pending.as_mut() {
                Some(b) if b.keys.len() >= MAX_GETS_PER_BATCH => None,
                Some(b) => {
                    b.keys.push(key.to_string());
                    b.waiters.push(tx);
                    Some(false)
                }
                None => {
                    *pending = Some(GetBatch {
                        keys: vec![key.to_string()],
                        waiters: vec![tx],
                    });
                    Some(true)
                }
            }
        };
        let Some(leads) = leads else {
            return self.get_one(key).await;
        };
        if leads {
            // Only the batch's leader takes it, so the pending batch is this one; if this
            // future is dropped first, the guard takes it and its readers go alone.
            let guard = LeaderGuard { kv: self };
            tokio::task::yield_now().await;
            let batch = guard.take();
            self.send_gets(batch).await;
        }
        match rx.await {
            Ok(read) => read,
            // The batch's leader was dropped before it sent (its caller gave up): alone.
            Err(_) => self.get_one(key).await,
        }
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), KvError> {
        self.range_in_pages(prefix, PAGE_KEYS, false).await
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, i64)>, KvError> {
        let (kvs, _) = self.range_in_pages(prefix, PAGE_KEYS_ONLY, true).await?;
        Ok(kvs
            .into_iter()
            .map(|kv| (kv.key, kv.mod_revision))
            .collect())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, KvError> {
        let compares: Vec<etcd_client::Compare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision(k, rev) => etcd_client::Compare::mod_revision(
                    k.as_str(),
                    etcd_client::CompareOp::Equal,
                    *rev,
                ),
                Compare::Exists(k) => {
                    etcd_client::Compare::version(k.as_str(), etcd_client::CompareOp::Greater, 0)
                }
            })
            .collect();
        tracing::trace!(
            compares = ?txn.compares,
            success = txn.success.len(),
            failure = txn.failure.len(),
            "etcd txn"
        );
        let t = etcd_client::Txn::new()
            .when(compares)
            .and_then(txn.success.iter().map(to_etcd_op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(to_etcd_op).collect::<Vec<_>>());
        let resp = self
            .request(Resend::WriteNotApplied, |mut c| {
                let t = t.clone();
                async move { c.txn(t).await }
            })
            .await?;
        let gets = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => Some(g.kvs().first().map(from_etcd)),
                _ => None,
            })
            .collect();
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map(|h| h.revision()).unwrap_or_default(),
            gets,
        })
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, KvError> {
        let resp = self
            .request(Resend::WriteNotApplied, |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, KvError> {
        // Refreshing twice is harmless: a read for the purpose of moving on.
        let resp = self
            .request(Resend::Read, |mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await?;
        match resp {
            Some(resp) => Ok(resp.ttl()),
            None => Err(KvError::Unavailable(
                "lease keep-alive stream closed".into(),
            )),
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), KvError> {
        self.request(Resend::WriteNotApplied, |mut c| async move {
            match c.lease_revoke(id).await {
                Ok(_) => Ok(()),
                // Already expired: the outcome the caller wanted.
                Err(etcd_client::Error::GRpcStatus(s))
                    if s.code() == tonic_code::Code::NotFound =>
                {
                    Ok(())
                }
                Err(e) => Err(e),
            }
        })
        .await
    }
}

/// An in-memory store with etcd's revision semantics (no lease expiry: leases live until
/// revoked). For unit tests of the IPAM algorithms; the integration tests use real etcd.
#[derive(Clone, Default)]
pub struct MemKv {
    inner: Arc<Mutex<MemState>>,
}

#[derive(Default)]
struct MemState {
    revision: i64,
    data: BTreeMap<String, KeyValue>,
    next_lease: i64,
}

impl MemKv {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        // A panic in another test thread must not cascade: the data is still consistent
        // because every mutation below completes before the guard drops.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MemState {
    fn apply(&mut self, op: &Op, rev: i64, gets: &mut Vec<Option<KeyValue>>) {
        match op {
            Op::Put { key, value, lease } => {
                self.data.insert(
                    key.clone(),
                    KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        mod_revision: rev,
                        lease: lease.unwrap_or(0),
                    },
                );
            }
            Op::Delete { key } => {
                self.data.remove(key);
            }
            Op::DeletePrefix { prefix } => self.data.retain(|k, _| !k.starts_with(prefix)),
            Op::Get { key } => gets.push(self.data.get(key).cloned()),
        }
    }
}

impl Kv for MemKv {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        Ok(self.lock().data.get(key).cloned())
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), KvError> {
        let s = self.lock();
        let kvs = s
            .data
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok((kvs, s.revision))
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, i64)>, KvError> {
        let (kvs, _) = self.get_prefix(prefix).await?;
        Ok(kvs
            .into_iter()
            .map(|kv| (kv.key, kv.mod_revision))
            .collect())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, KvError> {
        let most = [txn.compares.len(), txn.success.len(), txn.failure.len()];
        if most.into_iter().max().unwrap_or(0) > MAX_TXN_OPS {
            // etcd's words for it.
            return Err(KvError::Other(
                "etcdserver: too many operations in txn request".into(),
            ));
        }
        let mut s = self.lock();
        let ok = txn.compares.iter().all(|c| match c {
            Compare::ModRevision(k, rev) => {
                s.data.get(k).map(|kv| kv.mod_revision).unwrap_or(0) == *rev
            }
            Compare::Exists(k) => s.data.contains_key(k),
        });
        let ops = if ok { &txn.success } else { &txn.failure };
        let writes = ops.iter().any(|o| !matches!(o, Op::Get { .. }));
        if writes {
            s.revision += 1;
        }
        let rev = s.revision;
        let mut gets = Vec::new();
        for op in ops {
            s.apply(op, rev, &mut gets);
        }
        Ok(TxnOutcome {
            succeeded: ok,
            revision: rev,
            gets,
        })
    }

    async fn lease_grant(&self, _ttl_secs: i64) -> Result<i64, KvError> {
        let mut s = self.lock();
        s.next_lease += 1;
        Ok(s.next_lease)
    }

    async fn lease_keep_alive(&self, _id: i64) -> Result<i64, KvError> {
        Ok(60)
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), KvError> {
        let mut s = self.lock();
        s.data.retain(|_, kv| kv.lease != id);
        s.revision += 1;
        Ok(())
    }
}
