//! The plugins are started once per pod operation, so their start-up is on every ADD and DEL.
//! Linked as position-dependent executables, the loader has no relocations to apply (a PIE
//! build has ~32,000, about a third of a start-up, each a page written and copied). This is
//! how Go links the reference plugins; the libraries stay position-independent.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
