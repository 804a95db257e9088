//! `tessera-benchreport`: the generated part of BENCHMARKS.md from what the benchmarks
//! recorded (`tessera_testbed::bench_results`): every ratio side by side with its target,
//! and an SVG plot per curve (scale, IPAM, soak). The hand-written analysis around the
//! markers stays as it is. `scripts/benchmarks.sh` runs the benchmarks and then this.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Parser;
use plotters::prelude::*;
use tessera_testbed::bench_results::{load_all, results_dir, BenchRun, Series, Target};

const BEGIN: &str =
    "<!-- tessera-benchreport: begin (generated; edit the benchmarks, not this) -->";
const END: &str = "<!-- tessera-benchreport: end -->";

#[derive(Parser)]
#[command(name = "tessera-benchreport", version = tessera_datastore::VERSION)]
struct Args {
    /// Where the benchmarks recorded their runs.
    #[arg(long)]
    results: Option<PathBuf>,
    /// The Markdown file whose generated section is replaced (added after the title if it has
    /// none).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where the SVG plots go, relative to the Markdown file's directory.
    #[arg(long, default_value = "docs/benchmarks")]
    plots: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.results.unwrap_or_else(results_dir);
    let runs = load_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot read the recorded runs in {}: {e}", dir.display()))?;
    anyhow::ensure!(
        !runs.is_empty(),
        "no recorded runs in {} (run scripts/benchmarks.sh)",
        dir.display()
    );
    let base = args.out.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(base.join(&args.plots))?;
    let mut plots = Vec::new();
    for (name, series) in plots_of(&runs) {
        let rel = args.plots.join(format!("{name}.svg"));
        draw(&base.join(&rel), &name, &series)?;
        plots.push((name, rel));
    }
    let old = std::fs::read_to_string(&args.out).unwrap_or_default();
    let section = render(&runs, &plots, &carried(&old, &runs, &plots));
    std::fs::write(&args.out, splice(&old, &section))?;
    eprintln!(
        "{}: {} runs, {} ratios, {} plots",
        args.out.display(),
        runs.len(),
        runs.iter().map(|r| r.ratios.len()).sum::<usize>(),
        plots.len()
    );
    Ok(())
}

/// Series by plot name, over every run.
fn plots_of(runs: &[BenchRun]) -> BTreeMap<String, Vec<Series>> {
    let mut by_plot: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    for s in runs.iter().flat_map(|r| &r.series) {
        by_plot.entry(s.plot.clone()).or_default().push(s.clone());
    }
    by_plot
}

/// The rows of the previous report for benchmarks with no recorded run here (this machine
/// has not run them; `target/` does not travel with the repository): kept as they were,
/// dates and all, rather than dropped.
#[derive(Debug, Default, PartialEq)]
struct Carried {
    ratios: Vec<String>,
    commands: Vec<String>,
    plots: Vec<String>,
}

fn carried(old: &str, runs: &[BenchRun], drawn: &[(String, PathBuf)]) -> Carried {
    let (Some(b), Some(e)) = (old.find(BEGIN), old.find(END)) else {
        return Carried::default();
    };
    let ran = |bench: &str| runs.iter().any(|r| r.bench == bench);
    let mut c = Carried::default();
    for line in old.get(b..e).unwrap_or_default().lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let bench = cells.get(1).copied().unwrap_or_default();
        let a_run = !bench.is_empty() && bench != "benchmark" && !bench.starts_with('-');
        if let Some(rest) = line.strip_prefix("![") {
            let name = rest.split(']').next().unwrap_or_default();
            if !drawn.iter().any(|(n, _)| n == name) {
                c.plots.push(line.to_string());
            }
        } else if a_run && !ran(bench) && cells.len() == 8 {
            c.ratios.push(line.to_string());
        } else if a_run && !ran(bench) && cells.len() == 6 {
            c.commands.push(line.to_string());
        }
    }
    c
}

fn render(runs: &[BenchRun], plots: &[(String, PathBuf)], carried: &Carried) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{BEGIN}");
    let _ = writeln!(md, "## Every ratio, side by side\n");
    let _ = writeln!(
        md,
        "Regenerate with `scripts/benchmarks.sh` (all) or `scripts/benchmarks.sh <bench>...`; each row comes from its benchmark's last recorded run.\n"
    );
    let _ = writeln!(md, "| benchmark | ratio | measured | target | met | run |");
    let _ = writeln!(md, "|---|---|---:|---:|:---:|---|");
    for r in runs {
        for x in &r.ratios {
            let (target, met) = match x.target {
                Some(t @ Target::AtMost(v)) => (format!("≤ {v:.2}"), mark(t.met(x.value))),
                Some(t @ Target::AtLeast(v)) => (format!("≥ {v:.2}"), mark(t.met(x.value))),
                None => ("-".to_string(), ""),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {target} | {met} | {} |",
                r.bench, x.name, x.value, r.date
            );
        }
    }
    for line in &carried.ratios {
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(md, "\n| benchmark | command | date | machine |");
    let _ = writeln!(md, "|---|---|---|---|");
    for r in runs {
        let _ = writeln!(
            md,
            "| {} | `{}` | {} | {} |",
            r.bench, r.command, r.date, r.machine
        );
    }
    for line in &carried.commands {
        let _ = writeln!(md, "{line}");
    }
    if !plots.is_empty() || !carried.plots.is_empty() {
        let _ = writeln!(md, "\n## Curves\n");
        for (name, path) in plots {
            let _ = writeln!(md, "![{name}]({})\n", path.display());
        }
        for line in &carried.plots {
            let _ = writeln!(md, "{line}\n");
        }
    }
    let _ = write!(md, "{END}");
    md
}

fn mark(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "**no**"
    }
}

/// `old` with its generated section replaced by `section`, or with `section` added after
/// the first paragraph when there is none.
fn splice(old: &str, section: &str) -> String {
    if let (Some(b), Some(e)) = (old.find(BEGIN), old.find(END)) {
        if b < e {
            return format!("{}{section}{}", &old[..b], &old[e + END.len()..]);
        }
    }
    match old.find("\n\n") {
        Some(i) => format!("{}\n\n{section}\n{}", &old[..i], &old[i + 1..]),
        None => format!("{old}\n\n{section}\n"),
    }
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn draw(path: &Path, title: &str, series: &[Series]) -> anyhow::Result<()> {
    let pts = series.iter().flat_map(|s| &s.points);
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if x0 == x1 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc(series.first().map_or("", |s| s.x_label.as_str()))
        .y_desc(series.first().map_or("", |s| s.y_label.as_str()))
        .draw()
        .map_err(plot_error)?;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                colour.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_section_is_replaced_and_nothing_else() {
        let doc = format!("# T\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## Hand-written\nkept\n");
        let out = splice(&doc, &format!("{BEGIN}\nnew\n{END}"));
        assert_eq!(
            out,
            format!("# T\n\nintro\n\n{BEGIN}\nnew\n{END}\n\n## Hand-written\nkept\n")
        );
        let fresh = splice("# T\n\nintro\n", &format!("{BEGIN}\nx\n{END}"));
        assert!(fresh.starts_with("# T\n\n<!--"), "{fresh}");
        assert!(fresh.ends_with("intro\n"), "{fresh}");
    }

    /// A machine that ran only some benchmarks keeps the others' rows and plots as the
    /// last report had them.
    #[test]
    fn rows_of_benchmarks_not_run_here_are_carried_from_the_last_report() {
        let mut old_ipam = BenchRun::new("ipam", "ipam-bench");
        old_ipam.ratio("pairs", 0.69, Some(Target::AtLeast(0.75)));
        let mut old_cni = BenchRun::new("cni", "cni-bench");
        old_cni.ratio("p50", 1.12, Some(Target::AtMost(0.8)));
        let plots = [
            ("ipam_fill".to_string(), PathBuf::from("p/ipam_fill.svg")),
            ("soak_rss".to_string(), PathBuf::from("p/soak_rss.svg")),
        ];
        let last = render(&[old_cni, old_ipam], &plots, &Carried::default());

        let mut cni = BenchRun::new("cni", "cni-bench");
        cni.ratio("p50", 0.65, Some(Target::AtMost(0.8)));
        let redrawn = [plots[0].clone()];
        let c = carried(&last, std::slice::from_ref(&cni), &redrawn);
        assert_eq!(c.ratios.len(), 1, "{c:?}");
        assert!(c.ratios[0].starts_with("| ipam | pairs | 0.69 |"), "{c:?}");
        assert_eq!(c.commands.len(), 1, "{c:?}");
        assert!(
            c.commands[0].starts_with("| ipam | `ipam-bench` |"),
            "{c:?}"
        );
        assert_eq!(c.plots, vec!["![soak_rss](p/soak_rss.svg)".to_string()]);

        let now = render(&[cni], &redrawn, &c);
        assert!(now.contains("| cni | p50 | 0.65 | ≤ 0.80 | yes |"), "{now}");
        assert!(!now.contains("| cni | p50 | 1.12"), "{now}");
        assert!(
            now.contains("| ipam | pairs | 0.69 | ≥ 0.75 | **no** |"),
            "{now}"
        );
        assert!(
            now.contains("![ipam_fill]") && now.contains("![soak_rss]"),
            "{now}"
        );
        // Carried again by the next report, unchanged.
        assert_eq!(carried(&now, &[], &[]).ratios.len(), 2);
    }

    #[test]
    fn ratios_show_their_target_and_whether_it_was_met() {
        let mut run = BenchRun::new("cni", "cmd");
        run.ratio("p50", 0.9, Some(Target::AtMost(0.8)))
            .ratio("pairs", 0.8, Some(Target::AtLeast(0.75)))
            .ratio("plain", 1.5, None);
        let md = render(&[run], &[], &Carried::default());
        assert!(
            md.contains("| cni | p50 | 0.90 | ≤ 0.80 | **no** |"),
            "{md}"
        );
        assert!(md.contains("| cni | pairs | 0.80 | ≥ 0.75 | yes |"), "{md}");
        assert!(md.contains("| cni | plain | 1.50 | - |  |"), "{md}");
    }

    #[test]
    fn a_plot_is_an_svg_with_every_series_label() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("p.svg");
        let s = |label: &str, k: f64| Series {
            plot: "p".into(),
            label: label.into(),
            x_label: "nodes".into(),
            y_label: "ms".into(),
            points: vec![(16.0, k), (32.0, 2.0 * k), (64.0, 4.0 * k)],
        };
        draw(
            &path,
            "p",
            &[s("full mesh", 1.0), s("route reflectors", 0.5)],
        )
        .expect("draw");
        let svg = std::fs::read_to_string(&path).expect("svg");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for label in ["full mesh", "route reflectors", "nodes"] {
            assert!(svg.contains(label), "{label} missing");
        }
        assert!(svg.contains("<polyline"), "no line drawn");
    }
}
