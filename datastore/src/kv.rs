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
    pub fn or_get(mut self, key: impl Into<String>) -> Self {
        self.failure.push(Op::get(key));
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    pub succeeded: bool,
    /// The store's revision after the transaction: the new mod_revision of every key it put.
    pub revision: i64,
    /// Results of the `Get` ops of the branch that ran, in order.
    pub gets: Vec<Option<KeyValue>>,
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The store could not be reached or did not answer in time; worth retrying.
    #[error("datastore unavailable: {0}")]
    Unavailable(String),
    #[error("datastore error: {0}")]
    Other(String),
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

/// etcd v3 through `etcd-client`. Cheap to clone (the gRPC channel is shared).
#[derive(Clone)]
pub struct EtcdKv {
    client: etcd_client::Client,
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
    /// [`crate::connection::DatastoreConfig::connect`], what the binaries use.
    pub async fn connect_with(
        endpoints: &[String],
        opts: etcd_client::ConnectOptions,
    ) -> Result<Self, KvError> {
        let client = etcd_client::Client::connect(endpoints, Some(opts))
            .await
            .map_err(etcd_error)?;
        Ok(EtcdKv { client })
    }

    /// One key-only read of at most one key under `prefix`: proves the connection, the TLS
    /// handshake, the login and read permission.
    pub async fn probe(&self, prefix: &str) -> Result<(), KvError> {
        let opts = etcd_client::GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_limit(1);
        self.client
            .clone()
            .get(prefix, Some(opts))
            .await
            .map_err(etcd_error)?;
        Ok(())
    }

    /// The underlying client, for what the [`Kv`] trait does not cover (watches).
    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }
}

fn etcd_error(e: etcd_client::Error) -> KvError {
    use etcd_client::Error as E;
    use tonic_code::*;
    let text = with_causes(&e);
    match &e {
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
        Op::Get { key } => etcd_client::TxnOp::get(key.as_str(), None),
    }
}

impl Kv for EtcdKv {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        let mut c = self.client.kv_client();
        let resp = c.get(key, None).await.map_err(etcd_error)?;
        Ok(resp.kvs().first().map(from_etcd))
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), KvError> {
        let mut c = self.client.kv_client();
        let resp = c
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_error)?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        Ok((resp.kvs().iter().map(from_etcd).collect(), rev))
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<(String, i64)>, KvError> {
        let mut c = self.client.kv_client();
        let resp = c
            .get(
                prefix,
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .map_err(etcd_error)?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.mod_revision(),
                )
            })
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
        let t = etcd_client::Txn::new()
            .when(compares)
            .and_then(txn.success.iter().map(to_etcd_op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(to_etcd_op).collect::<Vec<_>>());
        let mut c = self.client.kv_client();
        let resp = c.txn(t).await.map_err(etcd_error)?;
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
        let mut c = self.client.lease_client();
        let resp = c.grant(ttl_secs, None).await.map_err(etcd_error)?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64, KvError> {
        let mut c = self.client.lease_client();
        let (mut keeper, mut stream) = c.keep_alive(id).await.map_err(etcd_error)?;
        keeper.keep_alive().await.map_err(etcd_error)?;
        match stream.message().await.map_err(etcd_error)? {
            Some(resp) => Ok(resp.ttl()),
            None => Err(KvError::Unavailable(
                "lease keep-alive stream closed".into(),
            )),
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), KvError> {
        let mut c = self.client.lease_client();
        match c.revoke(id).await {
            Ok(_) => Ok(()),
            // Already expired: the outcome the caller wanted.
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic_code::Code::NotFound => {
                Ok(())
            }
            Err(e) => Err(etcd_error(e)),
        }
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
