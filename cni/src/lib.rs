//! Tessera's CNI plugins: `tessera` (pod wiring, Calico-style) and `tessera-ipam`.
//!
//! Module map:
//! - [`spec`]: the CNI protocol: environment, network config, results, versions.
//! - [`error`]: CNI error codes (the spec's and Tessera's), mapped in one place.
//! - [`plugin`]: the commands ADD, DEL, CHECK, STATUS, GC, VERSION of both plugins.
//! - [`ipam`]: in-process Tessera IPAM or a delegated IPAM plugin; GC of stale attachments.
//! - [`wiring`]: veth, addresses, routes and sysctls through rtnetlink.
//! - [`netns`]: namespace work on a dedicated OS thread.
//! - [`delegate`]: running another plugin from CNI_PATH.
//! - [`driver`]: the runtime side of the protocol (spec 1.1): loads a conflist and runs a
//!   chain; used by the tests, the lab and the benchmarks.

pub mod delegate;
pub mod driver;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod ipam;
pub mod ipam_queue;
pub mod netns;
pub mod plugin;
pub mod reaper;
pub mod spec;
pub mod wiring;

use std::io::{Read, Write};

pub use error::CniError;
pub use plugin::Plugin;

/// The whole of a plugin binary: stdin and environment in, result or error JSON out.
/// Logs go to stderr and to the config's `logFile` (default /var/log/tessera/cni.log).
pub fn main_for(plugin: Plugin) -> ! {
    // Runtimes pass everything through the environment and stdin; `--version` is a human.
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a == "--version" || a == "-v")
    {
        let name = match plugin {
            Plugin::Main => "tessera",
            Plugin::Ipam => "tessera-ipam",
        };
        let specs = spec::SUPPORTED_VERSIONS.join(", ");
        println!("{name} {} (CNI spec {specs})", tessera_datastore::VERSION);
        std::process::exit(0);
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    init_logging(&stdin);
    let env = match read {
        Ok(_) => spec::CniEnv::from_env(),
        Err(e) => Err(CniError::io(format!("reading stdin: {e}"))),
    };
    let outcome = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(plugin::run(plugin, env, &stdin)),
        Err(e) => plugin::Outcome {
            stdout: Some(CniError::io(format!("cannot start runtime: {e}")).to_json("1.1.0")),
            exit_code: 1,
        },
    };
    if let Some(v) = outcome.stdout {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }
    tracing::debug!("plugin exiting");
    std::process::exit(outcome.exit_code)
}

/// The log file, created 0640 (it names pods, addresses and nodes); one someone left
/// writable by others is tightened, so that no one else can forge its lines.
fn open_log(path: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let mode = f.metadata()?.permissions().mode();
    if mode & 0o022 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(mode & 0o755 & !0o022))?;
    }
    Ok(f)
}

fn init_logging(stdin: &[u8]) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let path = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("logFile")
                .and_then(|f| f.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "/var/log/tessera/cni.log".into());
    let filter = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let file = std::path::Path::new(&path)
        .parent()
        .map(std::fs::create_dir_all)
        .and_then(Result::ok)
        .and_then(|_| open_log(&path).ok());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match file {
        Some(f) => {
            let f = std::sync::Arc::new(f);
            builder.with_writer(std::io::stderr.and(f)).init()
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
}
