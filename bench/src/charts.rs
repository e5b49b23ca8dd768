//! The join storm / fan-out rows as SVG charts against N, Twill beside flannel's etcd
//! mode: join storm time (with Twill's cold start where it ran), fan-out p99 (from the
//! joiner's request send) and server peak RSS; and the replicas' failover against N. Drawn with plotters' SVG backend alone: text is written as SVG `<text>` and
//! laid out by whatever shows the file, so no font library is needed to draw it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{Results, Row, SystemRuns};

/// One chart written.
#[derive(Debug, Clone)]
pub struct Chart {
    /// What it shows (its title, used as the image's alt text).
    pub title: String,
    /// The SVG file.
    pub path: PathBuf,
}

/// A system's figure at one N, or why there is none.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    /// Measured (with a note when only some runs gave it).
    At(f64, Option<String>),
    /// Not reached within the limit (drawn at the limit, marked).
    Beyond(f64, String),
    /// Nothing measured (the reason is written at the foot of the chart).
    Missing(String),
}

struct Series {
    name: &'static str,
    color: RGBColor,
    /// Values written under their points (Twill's line is the lower one), else over.
    below: bool,
    points: Vec<(usize, Value)>,
}

struct Spec {
    file: &'static str,
    title: String,
    y_label: &'static str,
    log_y: bool,
    /// Where the legend goes: clear of the points.
    legend: SeriesLabelPosition,
    series: Vec<Series>,
}

const TWILL: RGBColor = RGBColor(31, 119, 180);
const ETCD: RGBColor = RGBColor(214, 39, 40);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const FONT: &str = "sans-serif";

fn storm_value(r: &SystemRuns) -> Value {
    let m = &r.median;
    if m.converged_runs > 0 && m.storm_s.is_finite() {
        // When only some runs converged: their median, as the table shows it.
        let note = (m.converged_runs < m.runs)
            .then(|| format!("{} of {} runs converged", m.converged_runs, m.runs));
        Value::At(m.storm_s, note)
    } else {
        Value::Beyond(
            m.deadline_s,
            format!("not converged in {:.0} s", m.deadline_s),
        )
    }
}

fn fanout_value(r: &SystemRuns) -> Value {
    let m = &r.median;
    match crate::report::fanout_completeness(r) {
        crate::report::Delivered::All if m.fanout_from_send_ms.p99.is_finite() => {
            Value::At(m.fanout_from_send_ms.p99, None)
        }
        crate::report::Delivered::All => {
            Value::Missing("older results: no from-send figure".into())
        }
        crate::report::Delivered::Part(why) => Value::Missing(why),
        crate::report::Delivered::NotRun => Value::Missing("not run".into()),
    }
}

fn rss_value(r: &SystemRuns) -> Value {
    if r.median.peak_rss_mb.is_finite() {
        Value::At(r.median.peak_rss_mb, None)
    } else {
        Value::Missing("not measured".into())
    }
}

fn series(rows: &[Row], value: fn(&SystemRuns) -> Value) -> Vec<Series> {
    let twill: Vec<_> = rows
        .iter()
        .filter_map(|r| r.twill.as_ref().map(|t| (r.nodes, value(t))))
        .collect();
    let etcd: Vec<_> = rows
        .iter()
        .filter_map(|r| r.etcd.as_ref().map(|e| (r.nodes, value(e))))
        .collect();
    let mut out = Vec::new();
    if !twill.is_empty() {
        out.push(Series {
            name: "Twill",
            color: TWILL,
            below: true,
            points: twill,
        });
    }
    if !etcd.is_empty() {
        out.push(Series {
            name: "etcd (flannel)",
            color: ETCD,
            below: false,
            points: etcd,
        });
    }
    out
}

/// Twill's cold starts (bootstrap, then join), as the join storm chart's third line.
fn cold_start_series(res: &Results) -> Option<Series> {
    let points: Vec<_> = res
        .cold_start
        .iter()
        .map(|row| {
            let m = &row.median;
            let v = if m.converged_runs > 0 && m.converge_s.is_finite() {
                Value::At(m.converge_s, None)
            } else {
                Value::Beyond(
                    m.deadline_s,
                    format!("not converged in {:.0} s", m.deadline_s),
                )
            };
            (row.nodes, v)
        })
        .collect();
    (!points.is_empty()).then_some(Series {
        name: "Twill cold start (bootstrap, then join)",
        color: GREEN,
        below: false,
        points,
    })
}

/// The leader crashes under N nodes: one line per figure, medians over the kills.
fn failover_spec(res: &Results) -> Option<Spec> {
    let rows: Vec<_> = res.ha.iter().filter(|r| r.failover.kills > 0).collect();
    if rows.is_empty() {
        return None;
    }
    let line = |name, color, below, value: fn(&crate::ha::FailoverSummary) -> f64| Series {
        name,
        color,
        below,
        points: rows
            .iter()
            .map(|r| {
                let v = value(&r.failover);
                let v = if v.is_finite() {
                    Value::At(v, None)
                } else {
                    Value::Missing("not measured".into())
                };
                (r.nodes, v)
            })
            .collect(),
    };
    Some(Spec {
        file: "failover.svg",
        title: format!(
            "Leader SIGKILLed under N nodes ({} replicas on etcd), median of the kills",
            rows[0].replicas
        ),
        y_label: "seconds after the kill (log scale)",
        log_y: true,
        // The lines are points at one or two N, in the middle: the legend goes right.
        legend: SeriesLabelPosition::MiddleRight,
        series: vec![
            line("new leader", TWILL, true, |f| f.new_leader_s),
            line("first lease granted", ORANGE, false, |f| f.first_grant_s),
            line("every watch of the dead replica moved", GREEN, true, |f| {
                f.all_moved_s
            }),
            line(
                "restarted replica back to its share (after its restart)",
                PURPLE,
                false,
                |f| f.rebalanced_s,
            ),
        ],
    })
}

fn specs(res: &Results) -> Vec<Spec> {
    let rows = &res.rows;
    let fan_ran = rows.iter().any(|r| {
        [&r.twill, &r.etcd]
            .into_iter()
            .flatten()
            .any(|s| s.runs.iter().any(|run| run.fanout.is_some()))
    });
    // With --networks K > 1 every node held K leases: said in every title.
    let k = rows.iter().map(|r| r.networks).max().unwrap_or(1);
    let on = if k > 1 {
        format!(" (every node on {k} networks)")
    } else {
        String::new()
    };
    let mut out = vec![Spec {
        file: "join-storm.svg",
        title: if k > 1 {
            format!("Join storm: time until all N nodes saw all N × {k} leases{on}")
        } else {
            "Join storm: time until all N nodes saw all N leases".into()
        },
        y_label: "seconds (log scale)",
        log_y: true,
        legend: SeriesLabelPosition::UpperLeft,
        series: series(rows, storm_value)
            .into_iter()
            .chain(cold_start_series(res))
            .collect(),
    }];
    if fan_ran {
        out.push(Spec {
            file: "fanout-p99.svg",
            title: format!(
                "Fan-out p99: one node joins, from its request send to each watcher{on}"
            ),
            y_label: "ms (log scale)",
            log_y: true,
            legend: SeriesLabelPosition::UpperLeft,
            series: series(rows, fanout_value),
        });
    }
    out.push(Spec {
        file: "memory.svg",
        title: format!("Server peak RSS (join storm and fan-out){on}"),
        y_label: "MB",
        log_y: false,
        legend: SeriesLabelPosition::UpperLeft,
        series: series(rows, rss_value),
    });
    out.extend(failover_spec(res));
    out
}

/// 1, 2, 5 × 10^k from `lo` to `hi`.
fn ticks_125(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

/// Two significant digits, whole numbers from 10 up, no trailing zeros.
fn label(v: f64) -> String {
    if !v.is_finite() || v == 0.0 {
        return format!("{v}");
    }
    let digits = (1.0 - v.abs().log10().floor()).max(0.0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').into()
    } else {
        s
    }
}

fn anchored(color: RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    (FONT, 17).into_font().color(&color).pos(Pos::new(h, v))
}

/// Axes, then each series: a marker per point, a line through the measured ones, the
/// value beside each; a figure past its limit as a cross at the limit, a missing one
/// as a small cross at the foot (`y_floor`).
fn plot<'a, 'b: 'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>,
    spec: &Spec,
    y_floor: f64,
) -> Result<()>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc("N (nodes, log scale)")
        .y_desc(spec.y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| label(*v))
        .light_line_style(TRANSPARENT)
        .label_style((FONT, 18))
        .axis_desc_style((FONT, 19))
        .draw()?;
    for s in &spec.series {
        let color = s.color;
        let style = ShapeStyle::from(color).stroke_width(3);
        let measured: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter_map(|(n, v)| match v {
                Value::At(y, _) => Some((*n as f64, *y)),
                _ => None,
            })
            .collect();
        chart
            .draw_series(LineSeries::new(measured.clone(), style))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        chart.draw_series(
            measured
                .iter()
                .map(|&p| Circle::new(p, 5, ShapeStyle::from(color).filled())),
        )?;
        for (n, v) in &s.points {
            let x = *n as f64;
            match v {
                Value::At(y, note) => {
                    let text = match note {
                        Some(note) => format!("{} ({note})", label(*y)),
                        None => label(*y),
                    };
                    let (dy, v) = if s.below {
                        (6, VPos::Top)
                    } else {
                        (-6, VPos::Bottom)
                    };
                    chart.draw_series(std::iter::once(
                        EmptyElement::at((x, *y))
                            + Text::new(text, (6, dy), anchored(color, HPos::Left, v)),
                    ))?;
                }
                Value::Beyond(y, why) => {
                    chart.draw_series(std::iter::once(Cross::new((x, *y), 7, style)))?;
                    chart.draw_series(std::iter::once(
                        EmptyElement::at((x, *y))
                            + Text::new(
                                format!("{}: {why}", s.name),
                                (-12, -4),
                                anchored(color, HPos::Right, VPos::Bottom),
                            ),
                    ))?;
                }
                Value::Missing(_) => {
                    chart.draw_series(std::iter::once(Cross::new(
                        (x, y_floor),
                        5,
                        ShapeStyle::from(color).stroke_width(2),
                    )))?;
                }
            }
        }
    }
    chart
        .configure_series_labels()
        .position(spec.legend.clone())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 19))
        .draw()?;
    Ok(())
}

/// Draws one chart into `path`.
fn draw(spec: &Spec, path: &Path) -> Result<()> {
    let mut ns: Vec<usize> = spec
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    ns.sort_unstable();
    ns.dedup();
    let ys: Vec<f64> = spec
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter_map(|(_, v)| match v {
            Value::At(y, _) | Value::Beyond(y, _) => Some(*y),
            Value::Missing(_) => None,
        })
        .filter(|y| y.is_finite() && *y > 0.0)
        .collect();
    let (y_min, y_max) = if ys.is_empty() {
        (1.0, 10.0)
    } else {
        ys.iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
                (a.min(y), b.max(y))
            })
    };
    let n_lo = ns.first().copied().unwrap_or(1) as f64;
    let n_hi = ns.last().copied().unwrap_or(10) as f64;
    let x_range = || (n_lo / 1.3)..(n_hi * 1.3).max(n_lo * 1.69);
    let x_keys: Vec<f64> = ns.iter().map(|&n| n as f64).collect();

    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let (area, foot) = root.split_vertically(500);
    let mut builder = ChartBuilder::on(&area);
    builder
        .caption(&spec.title, (FONT, 27))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72);
    if spec.log_y {
        let (lo, hi) = (y_min / 2.0, y_max * 2.0);
        let mut chart = builder.build_cartesian_2d(
            x_range().log_scale().with_key_points(x_keys),
            (lo..hi).log_scale().with_key_points(ticks_125(lo, hi)),
        )?;
        plot(&mut chart, spec, lo * 1.15)?;
    } else {
        let hi = y_max * 1.15;
        let mut chart =
            builder.build_cartesian_2d(x_range().log_scale().with_key_points(x_keys), 0.0..hi)?;
        plot(&mut chart, spec, hi * 0.02)?;
    }
    // The foot: what the marks without a value mean.
    let notes: Vec<String> = spec
        .series
        .iter()
        .flat_map(|s| {
            s.points.iter().filter_map(move |(n, v)| match v {
                Value::Missing(why) => Some(format!("× {} at N = {n}: {why}", s.name)),
                _ => None,
            })
        })
        .collect();
    if !notes.is_empty() {
        foot.draw(&Text::new(
            notes.join("; "),
            (16, 8),
            (FONT, 17).into_font().color(&BLACK),
        ))?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes the charts of `res`'s join storm / fan-out rows, cold starts and failovers
/// into `dir` (made if needed); nothing when it has none of them.
pub fn write(res: &Results, dir: &Path) -> Result<Vec<Chart>> {
    if res.rows.is_empty() && res.cold_start.is_empty() && res.ha.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    let mut out = Vec::new();
    for spec in specs(res) {
        if spec.series.is_empty() {
            continue;
        }
        let path = dir.join(spec.file);
        draw(&spec, &path)?;
        out.push(Chart {
            title: spec.title,
            path,
        });
    }
    Ok(out)
}

/// `to` relative to the directory `from` (both made absolute first), with `/`.
pub fn relative(from: &Path, to: &Path) -> String {
    let abs = |p: &Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        })
    };
    let (from, to) = (abs(from), abs(to));
    let (f, t): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = (common..f.len()).map(|_| "..".to_string()).collect();
    parts.extend(
        t[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Run, Summary, SystemRuns};

    fn summary(storm_s: f64, converged: bool, p99: f64, rss: f64) -> Summary {
        let mut s = Summary {
            runs: 1,
            converged_runs: usize::from(converged),
            storm_s: if converged { storm_s } else { f64::NAN },
            deadline_s: 120.0,
            peak_rss_mb: rss,
            fanout_from_send_ms: crate::stats::nan_dist(),
            fanout_from_reply_ms: crate::stats::nan_dist(),
            ..Default::default()
        };
        if p99.is_finite() {
            s.fanout_from_send_ms = crate::stats::Dist {
                count: 100,
                p50: p99 / 2.0,
                p99,
                max: p99 * 2.0,
            };
        }
        s
    }

    fn runs(median: Summary) -> Option<SystemRuns> {
        let fanout = crate::sim::FanoutOutcome {
            expected: 100,
            from_send_ms: median.fanout_from_send_ms,
            ..Default::default()
        };
        Some(SystemRuns {
            runs: vec![Run {
                fanout: Some(fanout),
                ..Default::default()
            }],
            median,
        })
    }

    /// The charts of `res` in a temporary directory, and their file names.
    fn drawn(res: &Results) -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let names = write(res, dir.path())
            .expect("charts drawn")
            .iter()
            .map(|c| c.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        (dir, names)
    }

    #[test]
    fn charts_carry_their_text_without_a_font_backend() {
        let res = Results {
            rows: vec![
                Row {
                    nodes: 500,
                    networks: 1,
                    twill: runs(summary(0.12, true, 3.5, 30.0)),
                    etcd: runs(summary(1.1, true, 9.0, 160.0)),
                },
                Row {
                    nodes: 5000,
                    networks: 1,
                    twill: runs(summary(7.9, true, 20.0, 272.0)),
                    etcd: runs(summary(f64::NAN, false, f64::NAN, 991.0)),
                },
            ],
            ..Default::default()
        };
        let (dir, names) = drawn(&res);
        assert_eq!(names, ["join-storm.svg", "fanout-p99.svg", "memory.svg"]);
        let svg = |name: &str| std::fs::read_to_string(dir.path().join(name)).expect("svg");
        let storm = svg("join-storm.svg");
        assert!(storm.starts_with("<svg"), "{storm}");
        for text in [
            "Join storm",
            "Twill",
            "etcd (flannel)",
            "\n500\n",
            "\n5000\n",
            "not converged in 120 s",
        ] {
            assert!(storm.contains(text), "{text} missing from\n{storm}");
        }
        assert!(storm.contains("<text"), "labels are SVG text");
        let fan = svg("fanout-p99.svg");
        assert!(fan.contains("from its request send"), "{fan}");
        assert!(fan.contains("no join delivered"), "{fan}");
        assert!(svg("memory.svg").contains("991"));
    }

    #[test]
    fn cold_starts_join_the_storm_chart_and_failovers_have_their_own() {
        let res = Results {
            cold_start: vec![crate::ColdStartRow {
                nodes: 5000,
                median: crate::coldstart::ColdStartSummary {
                    runs: 1,
                    converged_runs: 1,
                    converge_s: 85.3,
                    ..Default::default()
                },
                ..Default::default()
            }],
            ha: vec![crate::ha::HaRow {
                nodes: 5000,
                replicas: 3,
                failover: crate::ha::FailoverSummary {
                    kills: 5,
                    new_leader_s: 2.23,
                    first_grant_s: 2.31,
                    all_moved_s: 1.35,
                    rebalanced_s: f64::NAN,
                    ..Default::default()
                },
                ..Default::default()
            }],
            ..Default::default()
        };
        let (dir, names) = drawn(&res);
        assert_eq!(names, ["join-storm.svg", "failover.svg"]);
        let svg = |name: &str| std::fs::read_to_string(dir.path().join(name)).expect("svg");
        let storm = svg("join-storm.svg");
        assert!(
            storm.contains("cold start") && storm.contains("85"),
            "{storm}"
        );
        let failover = svg("failover.svg");
        for text in [
            "3 replicas",
            "new leader",
            "2.2",
            "first lease granted",
            "1.4",
        ] {
            assert!(failover.contains(text), "{text} missing from\n{failover}");
        }
        assert!(failover.contains("not measured"), "{failover}");
    }

    #[test]
    fn relative_links() {
        let dir = tempfile::tempdir().expect("temp dir");
        let charts = dir.path().join("bench/charts");
        std::fs::create_dir_all(&charts).unwrap();
        std::fs::write(charts.join("a.svg"), "").unwrap();
        assert_eq!(
            relative(dir.path(), &charts.join("a.svg")),
            "bench/charts/a.svg"
        );
        assert_eq!(
            relative(&dir.path().join("bench"), &charts.join("a.svg")),
            "charts/a.svg"
        );
        assert_eq!(ticks_125(0.3, 12.0), [0.5, 1.0, 2.0, 5.0, 10.0]);
        let labels: Vec<_> = [0.0461, 0.18, 0.05, 1.77, 2.0, 13.4, 272.0]
            .map(label)
            .to_vec();
        assert_eq!(labels, ["0.046", "0.18", "0.05", "1.8", "2", "13", "272"]);
    }
}
