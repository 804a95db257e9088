//! The kernel adapter: learned routes into the namespace's routing table through rtnetlink,
//! marked with Tessera's route protocol so that a restarted speaker recognises (and only
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

    pub async fn replace(
        &self,
        prefix: IpNetwork,
        next_hop: IpAddr,
        target: &Target,
    ) -> Result<(), rtnetlink::Error> {
        if *target == Target::Skip {
            return self.delete(prefix).await;
        }
        let msg = self.message(prefix, Some(next_hop), target);
        self.handle.route().add(msg).replace().execute().await
    }

    pub async fn delete(&self, prefix: IpNetwork) -> Result<(), rtnetlink::Error> {
        let msg = self.message(prefix, None, &Target::Native);
        match self.handle.route().del(msg).execute().await {
            // ESRCH: already gone.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -3 => Ok(()),
            other => other,
        }
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
    Delete(IpNetwork),
}

impl Kernel {
    /// Applies batches of changes as they come, 32 netlink requests in flight (256 measured no
    /// faster: the kernel serialises route changes anyway), so that
    /// the RIB never waits for the kernel. Changes to one prefix within a batch collapse to
    /// the last; batches apply in order.
    pub async fn run_worker(self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<KernelOp>>) {
        use futures::StreamExt;
        while let Some(mut batch) = rx.recv().await {
            let mut seen = std::collections::HashSet::with_capacity(batch.len());
            batch.reverse();
            batch.retain(|op| {
                seen.insert(match op {
                    KernelOp::Replace(p, ..) | KernelOp::Delete(p) => *p,
                })
            });
            drop(seen);
            let this = &self;
            futures::stream::iter(batch)
                .for_each_concurrent(32, |op| async move {
                    let r = match &op {
                        KernelOp::Replace(p, nh, t) => this.replace(*p, *nh, t).await,
                        KernelOp::Delete(p) => this.delete(*p).await,
                    };
                    if let Err(e) = r {
                        tracing::warn!(?op, error = %e, "kernel route update failed");
                    }
                })
                .await;
            if rx.is_empty() {
                release_freed_memory();
            }
        }
    }
}

/// After a burst (a full table arriving), the queues and per-UPDATE buffers are freed but
/// glibc keeps the pages; give them back so the resident size reflects what is live.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
