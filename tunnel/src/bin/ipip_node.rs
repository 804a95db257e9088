//! `tessera-ipip-node`: converges `tunl0` on a node from its arguments; used inside the
//! QEMU test VMs (whose Debian kernel has the ipip module) to run Tessera's IPIP code.
//!
//! `tessera-ipip-node <underlay-mtu> <tunnel-addr> [<block>=<node-ip> ...]`

use tessera_tunnel::ipip::{ensure_ipip, ensure_ipip_routes, IpipDevice};
use tessera_tunnel::mtu::{pod_mtu, Encap, IPIP_OVERHEAD};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--version") {
        println!("tessera-ipip-node {}", tessera_datastore::VERSION);
        return Ok(());
    }
    let [mtu, addr, routes @ ..] = args.as_slice() else {
        return Err(
            "usage: tessera-ipip-node <underlay-mtu> <tunnel-addr> [<block>=<node-ip> ...]".into(),
        );
    };
    let underlay_mtu: u32 = mtu.parse()?;
    let (conn, h, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    let dev = IpipDevice {
        mtu: pod_mtu(underlay_mtu, &[Encap::Ipip]),
        tunnel_addr: addr.parse()?,
    };
    debug_assert_eq!(dev.mtu, underlay_mtu - IPIP_OVERHEAD);
    let idx = ensure_ipip(&h, &dev).await?;
    let mut rs = Vec::new();
    for r in routes {
        let (b, via) = r.split_once('=').ok_or("routes are <block>=<node-ip>")?;
        rs.push((b.parse()?, via.parse()?));
    }
    ensure_ipip_routes(&h, idx, &rs).await?;
    println!("TB: tunl0 converged (mtu {}, {} routes)", dev.mtu, rs.len());
    Ok(())
}
