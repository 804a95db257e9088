//! The kernel adapter: learned routes into the namespace's routing table (batched netlink
//! datagrams; rtnetlink to list what is there), marked with Tessera's route protocol so that a restarted speaker recognises (and only
//! then sweeps) its own routes. The protocol code never calls this; the speaker task does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::{Handle, RouteMessageBuilder};

/// Where a learned route should point: decided per pool by the node agent (native via the
/// underlay, onlink through tunl0, or not at all for VXLAN pools). Kept out of the protocol.
pub trait RouteTarget: Send + Sync {
    fn target(&self, prefix: IpNetwork, next_hop: IpAddr) -> Target;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Via the next hop, on whatever interface reaches it.
    Native,
    /// Via the next hop on this device, `onlink`.
    Onlink(u32),
    /// Not in the kernel.
    Skip,
}

/// Every route natively (the default without a node agent).
pub struct NativeRoutes;

impl RouteTarget for NativeRoutes {
    fn target(&self, _: IpNetwork, _: IpAddr) -> Target {
        Target::Native
    }
}

pub struct Kernel {
    handle: Handle,
    proto: u8,
    table: u32,
}

impl Kernel {
    pub fn new(handle: Handle, proto: u8, table: u32) -> Self {
        Kernel {
            handle,
            proto,
            table,
        }
    }

    fn message(
        &self,
        prefix: IpNetwork,
        next_hop: Option<IpAddr>,
        target: &Target,
    ) -> RouteMessage {
        let proto = RouteProtocol::Other(self.proto);
        let mut msg = match (prefix, next_hop) {
            (IpNetwork::V4(p), nh) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(p.network(), p.prefix())
                    .protocol(proto)
                    .table_id(self.table);
                if let Some(IpAddr::V4(g)) = nh {
                    b = b.gateway(g);
                }
                if let Target::Onlink(dev) = target {
                    b = b.output_interface(*dev).onlink();
                }
                b.build()
            }
            (IpNetwork::V6(p), nh) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(p.network(), p.prefix())
                    .protocol(proto)
                    .table_id(self.table);
                if let Some(IpAddr::V6(g)) = nh {
                    b = b.gateway(g);
                }
                if let Target::Onlink(dev) = target {
                    b = b.output_interface(*dev).onlink();
                }
                b.build()
            }
        };
        msg.header.protocol = proto;
        msg
    }

    /// `prefix` with one next hop per (gateway, target): `nexthop via A nexthop via B`.
    fn multipath_message(&self, prefix: IpNetwork, hops: &[(IpAddr, Target)]) -> RouteMessage {
        use rtnetlink::packet_route::route::{RouteNextHop, RouteNextHopFlags};
        let mut msg = self.message(prefix, None, &Target::Native);
        let hops = hops
            .iter()
            .map(|(gw, t)| {
                let (flags, dev) = match t {
                    Target::Onlink(dev) => (RouteNextHopFlags::Onlink, *dev),
                    _ => (RouteNextHopFlags::empty(), 0),
                };
                let mut hop = RouteNextHop::default();
                hop.flags = flags;
                hop.interface_index = dev;
                hop.attributes = vec![RouteAttribute::Gateway(match gw {
                    IpAddr::V4(a) => RouteAddress::Inet(*a),
                    IpAddr::V6(a) => RouteAddress::Inet6(*a),
                })];
                hop
            })
            .collect();
        msg.attributes.push(RouteAttribute::MultiPath(hops));
        msg
    }

    /// The prefixes of every route with our protocol in our table (both families).
    pub async fn ours(&self) -> Result<Vec<IpNetwork>, rtnetlink::Error> {
        let mut out = Vec::new();
        for msg in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let routes: Vec<RouteMessage> =
                self.handle.route().get(msg).execute().try_collect().await?;
            for r in routes {
                if r.header.protocol != RouteProtocol::Other(self.proto) {
                    continue;
                }
                let table = r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(r.header.table));
                if table != self.table {
                    continue;
                }
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                    _ => None,
                });
                if let Some(Ok(n)) =
                    dst.map(|d| IpNetwork::new(d, r.header.destination_prefix_length))
                {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }
}

/// One change for the kernel table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelOp {
    Replace(IpNetwork, IpAddr, Target),
    /// An equal-cost multipath route (ECMP on): one next hop per path.
    ReplaceMulti(IpNetwork, Vec<(IpAddr, Target)>),
    Delete(IpNetwork),
}

impl Kernel {
    /// Applies batches of changes as they come, in order; run on a blocking thread of its
    /// own so that the RIB never waits for the kernel. Changes to one prefix within what is queued
    /// collapse to the last.
    ///
    /// The changes go out as route messages packed into datagrams of up to 60 KiB on a
    /// netlink socket of the worker's: the kernel applies every message of a datagram in one
    /// `sendmsg`, and without `NLM_F_ACK` only failures come back. (rtnetlink's one request,
    /// one acknowledgement round trip, even 32 in flight, left the table a second behind
    /// BIRD's at 120k routes.)
    pub fn blocking_worker(self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<KernelOp>>) {
        use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};
        let sock = Socket::new(NETLINK_ROUTE).and_then(|mut s| {
            s.bind_auto()?;
            Ok(s)
        });
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "no netlink socket: learned routes stay out of the kernel");
                return;
            }
        };
        let mut seq: u32 = 0;
        let mut out: Vec<u8> = Vec::with_capacity(DATAGRAM);
        while let Some(mut batch) = rx.blocking_recv() {
            // Whatever else is queued goes in the same pass (order kept).
            while let Ok(more) = rx.try_recv() {
                batch.extend(more);
            }
            let mut seen = std::collections::HashSet::with_capacity(batch.len());
            batch.reverse();
            batch.retain(|op| {
                seen.insert(match op {
                    KernelOp::Replace(p, ..)
                    | KernelOp::ReplaceMulti(p, _)
                    | KernelOp::Delete(p) => *p,
                })
            });
            drop(seen);
            batch.reverse();
            for op in batch {
                let msg = self.netlink_message(&op, &mut seq);
                let len = msg.buffer_len();
                if out.len() + len > DATAGRAM {
                    send_datagram(&sock, &mut out);
                }
                let off = out.len();
                out.resize(off + len, 0);
                msg.serialize(&mut out[off..]);
            }
            send_datagram(&sock, &mut out);
            if rx.is_empty() {
                release_freed_memory();
            }
        }
    }

    fn netlink_message(
        &self,
        op: &KernelOp,
        seq: &mut u32,
    ) -> rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage> {
        use rtnetlink::packet_core::{NetlinkMessage, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};
        use rtnetlink::packet_route::RouteNetlinkMessage;
        let (inner, flags) = match op {
            KernelOp::Replace(p, nh, t) if *t != Target::Skip => (
                RouteNetlinkMessage::NewRoute(self.message(*p, Some(*nh), t)),
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE,
            ),
            KernelOp::ReplaceMulti(p, hops) => (
                RouteNetlinkMessage::NewRoute(self.multipath_message(*p, hops)),
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE,
            ),
            // Skip, or gone: delete ours (the kernel matches protocol and table).
            KernelOp::Replace(p, ..) | KernelOp::Delete(p) => (
                RouteNetlinkMessage::DelRoute(self.message(*p, None, &Target::Native)),
                NLM_F_REQUEST,
            ),
        };
        let mut msg = NetlinkMessage::from(inner);
        msg.header.flags = flags;
        *seq = seq.wrapping_add(1);
        msg.header.sequence_number = *seq;
        msg.finalize();
        msg
    }
}

/// The largest datagram the worker sends (the socket's send buffer is larger).
const DATAGRAM: usize = 60 * 1024;

/// Sends the packed messages, then reads what failed (nothing comes back for successes).
fn send_datagram(sock: &rtnetlink::sys::Socket, out: &mut Vec<u8>) {
    if out.is_empty() {
        return;
    }
    if let Err(e) = sock.send(out, 0) {
        tracing::warn!(error = %e, "kernel route batch not sent");
    }
    out.clear();
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    loop {
        buf.clear();
        match sock.recv(&mut buf, libc::MSG_DONTWAIT) {
            Ok(0) | Err(_) => break,
            Ok(_) => report_failures(&buf),
        }
    }
}

fn report_failures(mut buf: &[u8]) {
    use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
    use rtnetlink::packet_route::RouteNetlinkMessage;
    while !buf.is_empty() {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf) else {
            return;
        };
        let len = (msg.header.length as usize).max(16);
        if let NetlinkPayload::Error(e) = &msg.payload {
            // ESRCH: deleting a route that is not there (a Skip target's prefix).
            if let Some(code) = e.code.filter(|c| c.get() != -libc::ESRCH) {
                tracing::warn!(
                    code = code.get(),
                    seq = msg.header.sequence_number,
                    "kernel refused a route change"
                );
            }
        }
        buf = &buf[len.min(buf.len())..];
    }
}

/// One allocator arena for the whole process, to be called before any thread starts. glibc
/// gives each thread that allocates its own arena (up to eight per core), and memory freed
/// into one arena is not reused by another: the speaker's UPDATEs are decoded on a runtime
/// worker, applied on another and written to the kernel on a third, which left ~2.6 MiB of
/// free pages resident with a full table. The threads take turns rather than contend.
pub fn use_one_allocator_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt sets an allocator parameter; it takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// After a burst (a full table arriving, a GC pass over the whole datastore), the buffers
/// are freed but glibc keeps the pages (it returns only the top of the heap, and a
/// long-lived allocation above them pins the rest); give them back so that the resident
/// size reflects what is live.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
