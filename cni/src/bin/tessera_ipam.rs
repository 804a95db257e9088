//! `tessera-ipam`: the IPAM plugin, for other main plugins.
fn main() {
    tessera_cni::main_for(tessera_cni::Plugin::Ipam)
}
