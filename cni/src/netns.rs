//! Running code inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, and every socket a thread opens
//! belongs to the namespace it was in at that moment. So namespace work happens on a fresh
//! OS thread that enters the namespace, opens its own netlink socket and its own
//! single-threaded runtime, and then exits: never on a tokio worker, whose later tasks (etcd,
//! logging) would find themselves in the pod's namespace.

use std::fs::File;
use std::future::Future;
use std::path::Path;

use crate::error::CniError;

/// Opens a namespace file (`/run/netns/X`, `/proc/PID/ns/net`); a missing one is the spec's
/// "unknown container".
pub fn open_netns(path: &str) -> Result<File, CniError> {
    if !Path::new(path).exists() {
        return Err(CniError::new(
            crate::error::code::UNKNOWN_CONTAINER,
            format!("network namespace {path} does not exist"),
        ));
    }
    File::open(path).map_err(|e| CniError::io(format!("cannot open network namespace {path}: {e}")))
}

/// Runs `f` with a netlink handle (and /proc/sys) of the namespace at `path`, on a dedicated
/// thread, and returns its result.
pub async fn in_netns<T, F, Fut>(path: &str, f: F) -> Result<T, CniError>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, CniError>>,
{
    on_thread(Some(open_netns(path)?), f).await
}

/// Runs `f` on a dedicated thread in this process's own namespace. The kernel handles a
/// netlink request inside the sending syscall, so a slow one (deleting a veth waits for an
/// RCU grace period) would otherwise stall every other task of a single-threaded runtime.
pub async fn on_own_thread<T, F, Fut>(f: F) -> Result<T, CniError>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, CniError>>,
{
    on_thread(None, f).await
}

async fn on_thread<T, F, Fut>(ns: Option<File>, f: F) -> Result<T, CniError>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, CniError>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let result = (|| {
                if let Some(ns) = &ns {
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| CniError::io(format!("setns: {e}")))?;
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| CniError::io(format!("runtime: {e}")))?;
                rt.block_on(async move {
                    let handle = connect()?;
                    f(handle).await
                })
            })();
            let _ = tx.send(result);
        })
        .map_err(|e| CniError::io(format!("cannot start namespace thread: {e}")))?;
    rx.await
        .map_err(|_| CniError::io("namespace thread died"))?
}

/// A netlink handle for the calling thread's namespace; its connection task runs on the
/// current runtime.
pub fn connect() -> Result<rtnetlink::Handle, CniError> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::netlink(format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}
