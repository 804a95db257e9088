//! The reaper: deletes the pod interface a DEL retired, after that DEL has returned.
//!
//! Deleting a veth makes the kernel wait for an RCU grace period (~20 ms here, two thirds of
//! DEL), which the runtime need not wait for: the pod is gone once DEL has released its
//! addresses and retired its interface. DEL forks a child that sends the kernel one
//! `RTM_DELLINK` for the retired link's index and exits; DEL does not wait for it. If the
//! child never runs, the link stays retired: an ADD for the same container replaces it, and
//! the node agent deletes retired links on its next full pass.
//!
//! The child is a fork without an exec (a new image costs a millisecond of loading and
//! page faults per DEL). Forked from a threaded process it may only make async-signal-safe
//! calls, so the request is built before the fork and the child makes nothing but system
//! calls on it: no allocation, no locks, no Rust runtime.
//!
//! Deleting by index alone is exact: the kernel does not reuse an interface index until its
//! 31-bit counter wraps, and a retired link is never made live again (an ADD over it deletes
//! it and makes a new pair), so the index names the retired link or nothing (ENODEV).

use nix::libc;
use nix::unistd::ForkResult;

/// `RTM_DELLINK` for one interface index, as the kernel reads it: a netlink header and an
/// `ifinfomsg`, no attributes, no acknowledgement asked for.
fn del_link_request(index: u32) -> [u8; 32] {
    const NLMSG_LEN: u32 = 16 + 16;
    let mut m = [0u8; 32];
    m[0..4].copy_from_slice(&NLMSG_LEN.to_ne_bytes());
    m[4..6].copy_from_slice(&libc::RTM_DELLINK.to_ne_bytes());
    m[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence
                                                   // 12..16: port id 0 (the kernel assigns ours); ifinfomsg: family AF_UNSPEC, pad, type 0.
    m[20..24].copy_from_slice(&index.to_ne_bytes()); // ifi_index (i32, positive)
    m
}

/// Starts a reaper for link `index` in the calling thread's network namespace (the child
/// inherits it).
pub fn spawn(index: u32) -> nix::Result<()> {
    let request = del_link_request(index);
    // SAFETY: the child runs only `reap`, which makes system calls on the stack copy of
    // `request` and exits; it touches no lock, allocator or runtime another thread could
    // have held at the fork.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { .. } => Ok(()),
        ForkResult::Child => reap(&request),
    }
}

/// The child: lets go of everything the plugin had open (the runtime's stdout pipe, which
/// the runtime reads to its end; the node's IPAM lock; etcd), leaves the plugin's session,
/// and sends the request. The kernel deletes the link inside the `send`.
fn reap(request: &[u8; 32]) -> ! {
    // SAFETY: async-signal-safe system calls only (see `spawn`).
    unsafe {
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            // Kernels before 5.9 lack close_range.
            for fd in 0..65_536 {
                libc::close(fd);
            }
        }
        libc::setsid();
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        let status = if fd >= 0
            && libc::send(fd, request.as_ptr().cast(), request.len(), 0) == request.len() as isize
        {
            0
        } else {
            1
        };
        libc::_exit(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_bare_rtm_dellink_for_the_index() {
        let m = del_link_request(0x0102_0304);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            libc::RTM_DELLINK
        );
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 1);
        assert_eq!(m[16], 0, "AF_UNSPEC");
        assert_eq!(
            i32::from_ne_bytes(m[20..24].try_into().unwrap()),
            0x0102_0304
        );
        assert_eq!(&m[24..32], &[0; 8], "no flags, no change mask");
    }
}
