//! Where benchmarks leave their numbers for `tessera-benchreport`: one JSON file per
//! benchmark in `target/bench-results/` (or `$TESSERA_BENCH_RESULTS`), each with the date,
//! the machine and what the benchmark measured. The report turns them into the generated
//! part of BENCHMARKS.md and its plots; the benchmarks' own tables stay on stdout.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One benchmark's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRun {
    pub bench: String,
    /// The command that produced it (for the report's "how to re-run").
    pub command: String,
    /// UTC, RFC 3339.
    pub date: String,
    pub machine: String,
    /// Ratios against the run's own reference, as the issues set targets on them.
    #[serde(default)]
    pub ratios: Vec<Ratio>,
    /// Curves worth plotting (x, y series).
    #[serde(default)]
    pub series: Vec<Series>,
    /// Anything else the benchmark measured, for its own section.
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// "Tessera's X is `value` of the reference's", with the target when an issue sets one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
    /// What "good" means for this ratio.
    pub target: Option<Target>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
}

impl Target {
    pub fn met(self, value: f64) -> bool {
        match self {
            Target::AtMost(t) => value <= t,
            Target::AtLeast(t) => value >= t,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    /// The plot it belongs to (one SVG per plot).
    pub plot: String,
    pub label: String,
    pub x_label: String,
    pub y_label: String,
    pub points: Vec<(f64, f64)>,
}

impl BenchRun {
    pub fn new(bench: &str, command: &str) -> Self {
        BenchRun {
            bench: bench.to_string(),
            command: command.to_string(),
            date: now_utc(),
            machine: machine(),
            ratios: Vec::new(),
            series: Vec::new(),
            extra: serde_json::Value::Null,
        }
    }

    pub fn ratio(&mut self, name: &str, value: f64, target: Option<Target>) -> &mut Self {
        self.ratios.push(Ratio {
            name: name.to_string(),
            value,
            target,
        });
        self
    }

    pub fn series(
        &mut self,
        plot: &str,
        label: &str,
        axes: (&str, &str),
        points: Vec<(f64, f64)>,
    ) -> &mut Self {
        self.series.push(Series {
            plot: plot.to_string(),
            label: label.to_string(),
            x_label: axes.0.to_string(),
            y_label: axes.1.to_string(),
            points,
        });
        self
    }

    /// Writes `<dir>/<bench>.json`; a benchmark that cannot record still printed its table,
    /// so this only warns.
    pub fn save(&self) {
        let dir = results_dir();
        let path = dir.join(format!("{}.json", self.bench));
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::write(
                &path,
                serde_json::to_vec_pretty(self).expect("a BenchRun serializes"),
            )
        });
        match written {
            Ok(()) => eprintln!("results: {}", path.display()),
            Err(e) => eprintln!("cannot record results in {}: {e}", path.display()),
        }
    }
}

/// `$TESSERA_BENCH_RESULTS`, else the workspace's `target/bench-results`.
pub fn results_dir() -> PathBuf {
    std::env::var_os("TESSERA_BENCH_RESULTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/bench-results"
            ))
        })
}

/// Every run recorded in `dir`, sorted by benchmark name; unreadable files are reported.
pub fn load_all(dir: &std::path::Path) -> anyhow::Result<Vec<BenchRun>> {
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read(&path)?;
            runs.push(
                serde_json::from_slice::<BenchRun>(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            );
        }
    }
    runs.sort_by(|a, b| a.bench.cmp(&b.bench));
    Ok(runs)
}

fn now_utc() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// "N vCPU <model>, <kernel>": what BENCHMARKS.md says about the machine.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} vCPU {model}, Linux {}", kernel.trim())
}

/// The median of `v` (the upper one of an even count); NaN when empty. Benchmarks report
/// medians of interleaved rounds so that one noisy round cannot decide.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
