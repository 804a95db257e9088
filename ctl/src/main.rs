//! `tesseractl`: Tessera's resources, IPAM state and nodes in the datastore.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tessera_datastore::admin::{self, WriteMode};
use tessera_datastore::connection::{DatastoreConfig, DatastoreFlags};
use tessera_datastore::kv::EtcdKv;
use tessera_datastore::snapshot::Snapshot;
use tessera_datastore::yaml::Kind;
use tesseractl::render::{self, Output, Style};

#[derive(Parser)]
#[command(
    about = "Tessera's command-line tool: IP pools, reservations, BGP peers and nodes; IPAM state",
    version = tessera_datastore::VERSION
)]
struct Cli {
    /// A YAML file with a `datastore:` section (the settings every Tessera binary shares);
    /// ETCD_* variables and the flags below override it.
    #[arg(long, env = "TESSERACTL_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    datastore: DatastoreFlags,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or replace the resources in FILE (`-` for stdin), all or nothing.
    Apply(FileArgs),
    /// Create the resources in FILE; fails if any exists.
    Create(FileArgs),
    /// Replace the resources in FILE; fails if any does not exist.
    Replace(FileArgs),
    /// Delete KIND NAME..., or the resources in a file (-f).
    Delete {
        kind: Option<String>,
        names: Vec<String>,
        #[arg(short = 'f', long = "filename")]
        file: Option<String>,
        /// Delete a pool even with addresses in use.
        #[arg(long)]
        force: bool,
    },
    /// Print resources of KIND (ippool, ipreservation, ipamconfiguration, bgpconfiguration,
    /// bgppeer, node), or one by NAME.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// IPAM state.
    #[command(subcommand)]
    Ipam(IpamCmd),
    /// Nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Shell completions (bash, zsh, fish, ...).
    Completion { shell: clap_complete::Shell },
}

#[derive(clap::Args)]
struct FileArgs {
    #[arg(short = 'f', long = "filename")]
    file: String,
    /// Shrink a pool even when addresses in use would be left outside it.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum IpamCmd {
    /// Usage per pool; per block and borrowed addresses on request; one address's holder.
    Show {
        #[arg(long)]
        show_blocks: bool,
        #[arg(long)]
        show_borrowed: bool,
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
    },
    /// Every inconsistency and leaked address, read at one revision; exits 1 if any.
    Check {
        /// Also write the report as JSON here.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Free leaked addresses: ADDR's handle, or every leak a report recorded. No lock:
    /// each release is guarded by what was read; entries changed since are skipped.
    Release {
        #[arg(
            long,
            conflicts_with = "from_report",
            required_unless_present = "from_report"
        )]
        ip: Option<std::net::IpAddr>,
        #[arg(long)]
        from_report: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// This node's agent: readiness, BGP sessions, tunnel devices, blocks.
    Status {
        /// Where the agent's health endpoint listens: HOST:PORT or unix:PATH.
        #[arg(long, env = "TESSERA_HEALTH_LISTEN", default_value = "127.0.0.1:9099")]
        agent: String,
        /// The node expected to answer (a check that this is the node you think).
        node: Option<String>,
        /// The agent's JSON as it is.
        #[arg(long)]
        json: bool,
    },
    /// A tarball for a bug report: the agent's status and metrics, links, addresses,
    /// routes, neighbours, FDB, Tessera's nft table, and the end of the logs given.
    Diags {
        #[arg(long, env = "TESSERA_HEALTH_LISTEN", default_value = "127.0.0.1:9099")]
        agent: String,
        /// Log files to include (the last 2000 lines of each), e.g. the agent pod's log.
        #[arg(long = "log")]
        logs: Vec<PathBuf>,
        #[arg(short = 'o', long, default_value = "tessera-diags.tar.gz")]
        output: PathBuf,
    },
    /// Declare NODE gone for good: its addresses and blocks are reclaimed at once.
    Decommission {
        node: String,
        #[arg(long, default_value = "decommissioned with tesseractl")]
        reason: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tesseractl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn datastore(cli: &Cli) -> anyhow::Result<DatastoreConfig> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        datastore: DatastoreConfig,
    }
    let mut ds = match &cli.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_saphyr::from_str::<File>(&text)
                .with_context(|| format!("in {}", p.display()))?
                .datastore
        }
        None => DatastoreConfig::default(),
    };
    ds.apply_process_env()?;
    cli.datastore.apply(&mut ds);
    Ok(ds)
}

fn read_input(file: &str) -> anyhow::Result<String> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
    }
}

fn kind(s: &str) -> anyhow::Result<Kind> {
    Kind::parse(s).with_context(|| {
        format!(
            "unknown kind {s:?} (one of {})",
            Kind::ALL.map(Kind::name).join(", ")
        )
    })
}

async fn connect(cli: &Cli) -> anyhow::Result<EtcdKv> {
    Ok(datastore(cli)?.connect().await?)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let style = Style::detect();
    match &cli.cmd {
        Cmd::Completion { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "tesseractl",
                &mut std::io::stdout(),
            );
        }
        Cmd::Apply(a) | Cmd::Create(a) | Cmd::Replace(a) => {
            let mode = match &cli.cmd {
                Cmd::Create(_) => WriteMode::Create,
                Cmd::Replace(_) => WriteMode::Replace,
                _ => WriteMode::Apply,
            };
            let text = read_input(&a.file)?;
            let resources = tesseractl::documents::read(&text)
                .with_context(|| format!("{}: nothing applied", a.file))?;
            let kv = connect(&cli).await?;
            let report = admin::write(&kv, &resources, mode, a.force)
                .await
                .context("nothing applied")?;
            for (kind, name, what) in report {
                println!("{kind} {name} {what}");
            }
        }
        Cmd::Delete {
            kind: k,
            names,
            file,
            force,
        } => {
            let targets: Vec<(Kind, String)> = match (file, k) {
                (Some(f), _) => tesseractl::documents::read(&read_input(f)?)
                    .with_context(|| format!("{f}: nothing deleted"))?
                    .names(),
                (None, Some(k)) if !names.is_empty() => {
                    let k = kind(k)?;
                    names.iter().map(|n| (k, n.clone())).collect()
                }
                _ => anyhow::bail!("delete KIND NAME... or delete -f FILE"),
            };
            let kv = connect(&cli).await?;
            admin::delete(&kv, &targets, *force)
                .await
                .context("nothing deleted")?;
            for (kind, name) in targets {
                println!("{kind} {name} deleted");
            }
        }
        Cmd::Get {
            kind: k,
            name,
            output,
        } => {
            let k = kind(k)?;
            let kv = connect(&cli).await?;
            let mut r = admin::read(&kv, &[k]).await?.resources;
            if let Some(n) = name {
                r.ipam_configs.retain(|x| &x.name == n);
                r.pools.retain(|x| &x.name == n);
                r.reservations.retain(|x| &x.name == n);
                r.bgp_peers.retain(|x| &x.name == n);
                r.bgp_configs.retain(|x| &x.name == n);
                r.nodes.retain(|x| &x.name == n);
                anyhow::ensure!(!r.is_empty(), "{k} {n:?} not found");
            }
            let text = match output {
                Output::Table => render::resources_table(style, k, &r, false),
                Output::Wide => render::resources_table(style, k, &r, true),
                Output::Yaml => render::yaml_documents(&r),
                Output::Json => render::json_documents(&r, name.is_some()),
            };
            print!("{text}");
        }
        Cmd::Ipam(IpamCmd::Show {
            show_blocks,
            show_borrowed,
            ip,
        }) => {
            let kv = connect(&cli).await?;
            let snap = Snapshot::read(&kv).await?;
            match ip {
                Some(addr) => print!(
                    "{}",
                    tesseractl::ipam::show_ip(&snap, &snap.workloads, *addr)
                ),
                None => print!(
                    "{}",
                    tesseractl::ipam::show(style, &snap, *show_blocks, *show_borrowed)
                ),
            }
        }
        Cmd::Ipam(IpamCmd::Check { output }) => {
            let kv = connect(&cli).await?;
            // Everything at one revision: blocks, handles, affinities and endpoints. An ADD
            // still running then shows as a leak; a release of it is refused once its
            // endpoint exists, and its endpoint write fails once the release came first.
            let snap = Snapshot::read(&kv).await?;
            let report = tesseractl::ipam::check(&snap, &snap.workloads);
            for f in &report.findings {
                println!("{f}");
            }
            println!(
                "{} finding(s) at revision {}",
                report.findings.len(),
                report.revision
            );
            if let Some(path) = output {
                std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if !report.findings.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Ipam(IpamCmd::Release { ip, from_report }) => {
            let kv = connect(&cli).await?;
            let targets = match (ip, from_report) {
                (_, Some(path)) => {
                    let text = std::fs::read(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let report: tesseractl::ipam::Report = serde_json::from_slice(&text)
                        .with_context(|| {
                            format!("{} is not an ipam check report", path.display())
                        })?;
                    tesseractl::ipam::leak_targets(&report)
                }
                (Some(addr), None) => {
                    let snap = Snapshot::read(&kv).await?;
                    let weps = &snap.workloads;
                    let report = tesseractl::ipam::check(&snap, weps);
                    let targets: Vec<_> = tesseractl::ipam::leak_targets(&report)
                        .into_iter()
                        .filter(|t| t.addresses.contains(addr))
                        .collect();
                    if targets.is_empty() {
                        let holder = weps
                            .iter()
                            .find(|w| w.addresses.iter().any(|a| a.ip() == *addr));
                        anyhow::bail!(
                            "{addr} is not leaked: {}",
                            match holder {
                                Some(w) =>
                                    format!("pod {}/{} on {} holds it", w.namespace, w.pod, w.node),
                                None => "it is not allocated".into(),
                            }
                        );
                    }
                    targets
                }
                (None, None) => anyhow::bail!("--ip ADDR or --from-report FILE"),
            };
            let (mut released, mut stale) = (0usize, 0usize);
            // A bar on a terminal (stderr); nothing when piped.
            let bar = indicatif::ProgressBar::new(targets.len() as u64);
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} handles")
            {
                bar.set_style(style);
            }
            for t in &targets {
                bar.inc(1);
                match admin::release_leaked_handle(
                    &kv,
                    &t.handle,
                    t.handle_revision,
                    t.workload.as_deref(),
                )
                .await?
                {
                    admin::LeakRelease::Released(addrs) => {
                        released += addrs.len();
                        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                        bar.suspend(|| {
                            println!("released {} (handle {})", list.join(", "), t.handle)
                        });
                    }
                    admin::LeakRelease::Stale(why) => {
                        stale += t.addresses.len();
                        bar.suspend(|| println!("skipped handle {}: {why}", t.handle));
                    }
                }
            }
            bar.finish_and_clear();
            println!("{released} address(es) released, {stale} stale entr(y/ies) skipped");
        }
        Cmd::Node(NodeCmd::Status { agent, node, json }) => {
            let body = tesseractl::agent::get(agent, "/status")?;
            let status: tesseractl::agent::NodeStatus =
                serde_json::from_str(&body).context("the agent's /status")?;
            if let Some(n) = node {
                anyhow::ensure!(
                    &status.node == n,
                    "the agent at {agent} is node {}, not {n}",
                    status.node
                );
            }
            if *json {
                println!("{body}");
            } else {
                print!("{}", tesseractl::agent::render(style, &status));
            }
            if !status.ready {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Node(NodeCmd::Diags {
            agent,
            logs,
            output,
        }) => {
            let names = tesseractl::diags::collect(agent, logs, output)
                .with_context(|| format!("writing {}", output.display()))?;
            let failed: Vec<&String> = names.iter().filter(|n| n.ends_with(".error")).collect();
            println!(
                "{}: {} files{}",
                output.display(),
                names.len(),
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} could not be collected: see {})",
                        failed.len(),
                        failed
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
        }
        Cmd::Node(NodeCmd::Decommission { node, reason }) => {
            let kv = connect(&cli).await?;
            let rev = tessera_datastore::gc::decommission(&kv, node, reason).await?;
            println!("node {node} decommissioned (revision {rev}): GC reclaims its addresses and blocks now");
        }
    }
    Ok(ExitCode::SUCCESS)
}
