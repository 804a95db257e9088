//! `tessera`: the main CNI plugin.
fn main() {
    tessera_cni::main_for(tessera_cni::Plugin::Main)
}
