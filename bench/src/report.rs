//! The results as markdown: the tables printed after a run, and BENCHMARKS.md.

use std::fmt::Write as _;

use crate::coldstart::ColdStartSummary;
use crate::ha::HaRow;
use crate::stats::Dist;
use crate::{ColdStartRow, Results, Summary, SystemRuns};

pub(crate) fn f(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "–".into()
    }
}

/// The storm's median time when every run converged, else NaN (shown as a dash).
pub(crate) fn converged_storm_s(m: &Summary) -> f64 {
    if m.converged_runs == m.runs {
        m.storm_s
    } else {
        f64::NAN
    }
}

/// The cold start's median time until all saw all when every run finished, else NaN.
pub(crate) fn converged_cold_s(c: &ColdStartSummary) -> f64 {
    if c.converged_runs == c.runs {
        c.converge_s
    } else {
        f64::NAN
    }
}

pub(crate) fn ratio(twill: f64, etcd: f64) -> String {
    if twill.is_finite() && etcd.is_finite() && etcd > 0.0 {
        format!("{:.2}", twill / etcd)
    } else {
        "–".into()
    }
}

pub(crate) fn storm_cell(s: &Summary, n: usize) -> String {
    if s.converged_runs == s.runs && s.runs > 0 {
        format!("{} s", f(s.storm_s, 2))
    } else if s.converged_runs > 0 {
        format!(
            "{} s ({}/{} runs converged)",
            f(s.storm_s, 2),
            s.converged_runs,
            s.runs
        )
    } else {
        format!(
            "not converged after {:.0} s: {:.0}/{n} granted, {:.0}/{n} saw all, {:.1}% of deliveries",
            s.deadline_s,
            s.nodes_granted,
            s.nodes_converged,
            s.deliveries_fraction * 100.0
        )
    }
}

fn dist3(d: &Dist) -> String {
    format!("{} / {} / {}", f(d.p50, 2), f(d.p99, 2), f(d.max, 2))
}

/// Target verdicts.
struct Target {
    what: String,
    goal: String,
    got: String,
    met: Option<bool>,
}

/// What one more connected agent (with its lease) adds to the controller's RSS at the
/// end of a run, in KB: the slope between the smallest and the largest N of Twill's
/// rows on one network, and those two N.
pub(crate) fn memory_per_agent(res: &Results) -> Option<(f64, usize, usize)> {
    let mut rows = res
        .rows
        .iter()
        .filter(|r| r.networks <= 1)
        .filter_map(|r| Some((r.nodes, r.twill.as_ref()?.median.end_rss_mb)))
        .filter(|(_, rss)| rss.is_finite());
    let first = rows.next()?;
    let (lo, hi) = rows.fold((first, first), |(lo, hi), r| {
        (
            if r.0 < lo.0 { r } else { lo },
            if r.0 > hi.0 { r } else { hi },
        )
    });
    (hi.0 > lo.0).then(|| ((hi.1 - lo.1) * 1024.0 / (hi.0 - lo.0) as f64, lo.0, hi.0))
}

fn targets(res: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let row = res.rows.iter().find(|r| r.nodes == 5000);
    // With several networks per node the N=5,000 figures are of N × networks leases.
    let on = match row {
        Some(r) if r.networks > 1 => format!(
            " on {} networks ({} leases)",
            r.networks,
            thousands(5000 * r.networks)
        ),
        _ => String::new(),
    };
    let tw = row.and_then(|r| r.twill.as_ref()).map(|t| &t.median);
    let et = row.and_then(|r| r.etcd.as_ref()).map(|e| &e.median);
    let check = |v: Option<f64>, ok: &dyn Fn(f64) -> bool| v.filter(|x| x.is_finite()).map(ok);
    let fan = tw.map(|t| t.fanout_from_send_ms.p99);
    out.push(Target {
        what: format!("N=5,000{on} fan-out p99 (from request send)"),
        goal: "< 100 ms".into(),
        got: fan.map_or("not run".into(), |v| format!("{} ms", f(v, 2))),
        met: check(fan, &|v| v < 100.0),
    });
    let storm = tw.map(|t| {
        if t.converged_runs == t.runs {
            t.storm_s
        } else {
            f64::NAN
        }
    });
    out.push(Target {
        what: format!("N=5,000{on} join storm converged"),
        goal: "< 10 s".into(),
        got: tw.map_or("not run".into(), |t| storm_cell(t, 5000)),
        met: tw.map(|_| storm.is_some_and(|s| s.is_finite() && s < 10.0)),
    });
    let fan_ratio = match (tw, et) {
        (Some(t), Some(e)) => Some(e.fanout_from_send_ms.p99 / t.fanout_from_send_ms.p99),
        _ => None,
    };
    let etcd_fan_failed = et.is_some_and(|e| e.fanout_from_send_ms.count == 0);
    out.push(Target {
        what: "N=5,000 fan-out p99 (from request send), etcd / Twill".into(),
        goal: "≥ 2×".into(),
        got: if etcd_fan_failed {
            "etcd delivered no join at all (its writes were refused after the storm)".into()
        } else {
            fan_ratio.map_or("not run".into(), |v| format!("{}×", f(v, 1)))
        },
        met: check(fan_ratio, &|v| v >= 2.0),
    });
    let mem_ratio = match (tw, et) {
        (Some(t), Some(e)) => Some(e.peak_rss_mb / t.peak_rss_mb),
        _ => None,
    };
    out.push(Target {
        what: "N=5,000 server peak memory, etcd / Twill".into(),
        goal: "≥ 2×".into(),
        got: mem_ratio.map_or("not run".into(), |v| format!("{}×", f(v, 1))),
        met: check(mem_ratio, &|v| v >= 2.0),
    });
    let dp = res
        .dataplane
        .iter()
        .find(|d| d.peers == 5000 && !d.dual_stack);
    let dp_ratio = dp.map(|d| d.twill_full_ms / d.batch_full_ms);
    out.push(Target {
        what: "5,000 peers programmed, Twill / ip+bridge -batch".into(),
        goal: "< 1.5×".into(),
        got: dp.map_or("not run".into(), |d| {
            format!(
                "{}× ({} ms vs {} ms)",
                f(d.twill_full_ms / d.batch_full_ms, 2),
                f(d.twill_full_ms, 0),
                f(d.batch_full_ms, 0)
            )
        }),
        met: check(dp_ratio, &|v| v < 1.5),
    });
    let change = dp.map(|d| d.twill_change_ms);
    out.push(Target {
        what: "one change applied with 5,000 peers".into(),
        goal: "< 5 ms".into(),
        got: change.map_or("not run".into(), |v| format!("{} ms", f(v, 2))),
        met: check(change, &|v| v < 5.0),
    });
    out
}

/// `10,000`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn p50_p99(d: &Dist) -> String {
    format!("{} / {}", f(d.p50, 1), f(d.p99, 1))
}

/// Whether a system's fan-out runs delivered every join to every watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Every run ran its fan-out and delivered (nearly: 99.9%) everything.
    All,
    /// Some run did not: what each run delivered.
    Part(String),
    /// No fan-out was run.
    NotRun,
}

/// What `r`'s fan-out runs delivered, for a note beside figures that come from only
/// part of the deliveries.
pub fn fanout_completeness(r: &SystemRuns) -> Delivered {
    let fractions: Vec<Option<f64>> = r
        .runs
        .iter()
        .map(|run| {
            run.fanout.as_ref().map(|f| {
                // Results from before the send origin counted the same deliveries there.
                let count = f.from_send_ms.count.max(f.from_reply_ms.count);
                if f.expected == 0 {
                    0.0
                } else {
                    count as f64 / f.expected as f64
                }
            })
        })
        .collect();
    if fractions.iter().all(Option::is_none) {
        return Delivered::NotRun;
    }
    if fractions.iter().all(|x| x.is_some_and(|x| x >= 0.999)) {
        return Delivered::All;
    }
    if fractions.iter().all(|x| x.is_none_or(|x| x == 0.0)) {
        return Delivered::Part("no join delivered".into());
    }
    let each: Vec<String> = fractions
        .iter()
        .map(|x| x.map_or("not run".into(), |x| format!("{:.1}%", x * 100.0)))
        .collect();
    Delivered::Part(if each.len() == 1 {
        format!("{} delivered", each[0])
    } else {
        format!("delivered {} in its {} runs", each.join(", "), each.len())
    })
}

/// Which distribution of a summary a table row shows.
type Pick = fn(&Summary) -> &Dist;

/// A figure of the cold start, or its progress when some run did not finish.
fn cold_cell(c: &ColdStartSummary, n: usize, s: f64) -> String {
    if c.converged_runs == c.runs && c.runs > 0 {
        format!("{} s", f(s, 2))
    } else if c.converged_runs > 0 {
        format!(
            "{} s ({}/{} runs finished)",
            f(s, 2),
            c.converged_runs,
            c.runs
        )
    } else {
        format!(
            "not done after {:.0} s: {:.0}/{n} bootstrapped, {:.0}/{n} granted, {:.0}/{n} saw all",
            c.deadline_s, c.nodes_bootstrapped, c.nodes_granted, c.nodes_converged
        )
    }
}

/// The machine's floors at N, and Twill's fan-out of the same run against its floor.
fn floors_table(s: &mut String, fl: &crate::floors::Floors, res: &Results) {
    let n = fl.nodes;
    let _ = writeln!(s, "### Floors of this machine (N = {n}, same run)\n");
    let _ = writeln!(s, "| floor | figure |");
    let _ = writeln!(s, "|---|---:|");
    let _ = writeln!(
        s,
        "| storage: a 128-byte write + fsync, p50 / p99 / max ms | {} |",
        dist3(&fl.fsync_ms)
    );
    let _ = writeln!(
        s,
        "| broadcast: a minimal tokio + rustls server writes a one-lease watch message ({} bytes) to {n} mutual-TLS connections, send → received, p50 / p99 / max ms ({} rounds) | {} |",
        fl.record_bytes,
        fl.rounds,
        dist3(&fl.broadcast_ms)
    );
    let _ = writeln!(
        s,
        "| {n} mutual-TLS handshakes ({} at once), s | {} |",
        crate::twill::CONNECT_PARALLEL,
        f(fl.handshakes_s, 2)
    );
    let _ = writeln!(
        s,
        "| {n} ECDSA P-256 signatures, s | {} |",
        f(fl.signatures_s, 3)
    );
    if fl.storm_transfer_s > 0.0 {
        let _ = writeln!(
            s,
            "| a minimal mutual-TLS server process holding {n} connections: RSS per connection, KB | {} |",
            f(fl.conn_kb, 1)
        );
        let _ = writeln!(
            s,
            "| the same process sends every connection {n} leases ({} bytes each, {} MB in all) once the {n} handshakes ({} s) are done: until all received, s (its CPU, s) | {} ({}) |",
            fl.lease_bytes,
            f((fl.lease_bytes * n * n) as f64 / 1e6, 0),
            f(fl.storm_handshakes_s, 2),
            f(fl.storm_transfer_s, 2),
            f(fl.storm_server_cpu_s, 2)
        );
    }
    let twill = res
        .rows
        .iter()
        .find(|r| r.nodes == n)
        .and_then(|r| r.twill.as_ref());
    // The transfer floor is of one lease a node: set against a storm on one network.
    let one_network = res
        .rows
        .iter()
        .find(|r| r.nodes == n && r.networks <= 1)
        .and_then(|r| r.twill.as_ref());
    if let Some(t) =
        one_network.filter(|t| t.median.converged_runs > 0 && fl.storm_transfer_s > 0.0)
    {
        let _ = writeln!(
            s,
            "| Twill's join storm of {n}, s (controller CPU, s), and their ratios to the transfer floor's | {} ({}), {}× ({}×) |",
            f(t.median.storm_s, 2),
            f(t.median.storm_cpu_s, 2),
            f(t.median.storm_s / fl.storm_transfer_s, 2),
            f(t.median.storm_cpu_s / fl.storm_server_cpu_s, 2)
        );
    }
    let fanout = twill
        .map(|t| t.median.fanout_from_send_ms)
        .filter(|d| d.count > 0);
    if let Some(d) = fanout {
        let _ = writeln!(
            s,
            "| Twill's fan-out of one change from the request send, p50 / p99 ms, and its p99 / the broadcast floor's p99 | {} / {} ({}×) |",
            f(d.p50, 2),
            f(d.p99, 2),
            f(d.p99 / fl.broadcast_ms.p99, 2)
        );
    }
    s.push('\n');
}

/// The cold start beside the join storm of the same sitting.
fn cold_start_table(s: &mut String, row: &ColdStartRow) {
    let n = row.nodes;
    let c = &row.median;
    let w = &row.join_storm.median;
    let cold_done = c.converged_runs == c.runs;
    let warm_done = w.converged_runs == w.runs;
    let _ = writeln!(
        s,
        "### Cold start: N new nodes bootstrap their certificates, then join (Twill)\n"
    );
    let _ = writeln!(
        s,
        "| N | metric | cold start | join storm (certificates held) | cold start / join storm |"
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|");
    let mut line = |metric: &str, cold: String, warm: String, r: String| {
        let _ = writeln!(s, "| {n} | {metric} | {cold} | {warm} | {r} |");
    };
    let warm_granted = if warm_done {
        w.grant_ms.max / 1e3
    } else {
        f64::NAN
    };
    line(
        &format!("time zero → all N hold a lease (median of {})", c.runs),
        cold_cell(c, n, c.all_granted_s),
        if warm_done {
            format!("{} s", f(warm_granted, 2))
        } else {
            storm_cell(w, n)
        },
        ratio(
            if cold_done { c.all_granted_s } else { f64::NAN },
            warm_granted,
        ),
    );
    line(
        "time zero → all N saw all N leases",
        cold_cell(c, n, c.converge_s),
        storm_cell(w, n),
        ratio(
            converged_cold_s(c),
            if warm_done { w.storm_s } else { f64::NAN },
        ),
    );
    line(
        "bootstrap: time zero → certificate in hand p50 / p99, ms",
        p50_p99(&c.bootstrap_ms),
        "–".into(),
        "–".into(),
    );
    line(
        "join: certificate → lease granted p50 / p99, ms",
        p50_p99(&c.join_ms),
        "–".into(),
        "–".into(),
    );
    line(
        "of which the mutual-TLS connection p50 / p99, ms",
        p50_p99(&c.connect_ms),
        format!("all N before time zero, in {} s", f(w.connect_s, 2)),
        "–".into(),
    );
    line(
        "time zero → lease granted p50 / p99, ms",
        p50_p99(&c.grant_ms),
        p50_p99(&w.grant_ms),
        ratio(c.grant_ms.p99, w.grant_ms.p99) + " (p99)",
    );
    line(
        "controller CPU, s (join storm: connecting + storm)",
        f(c.server_cpu_s, 2),
        format!("{} + {}", f(w.connect_cpu_s, 2), f(w.storm_cpu_s, 2)),
        ratio(c.server_cpu_s, w.connect_cpu_s + w.storm_cpu_s),
    );
    for (metric, cold, warm) in [
        ("controller peak RSS, MB", c.peak_rss_mb, w.peak_rss_mb),
        ("controller RSS at the end, MB", c.end_rss_mb, w.end_rss_mb),
    ] {
        line(metric, f(cold, 0), f(warm, 0), ratio(cold, warm));
    }
    line(
        "watch messages the controller sent, millions",
        f(c.watch_messages / 1e6, 2),
        f(w.storm_watch_messages / 1e6, 2),
        ratio(c.watch_messages, w.storm_watch_messages),
    );
    line(
        "load generator CPU, s (join storm: the storm only)",
        f(c.client_cpu_s, 2),
        f(w.client_cpu_s, 2),
        "–".into(),
    );
    line(
        "failed calls, all runs (retried after 1 s)",
        format!(
            "{} Bootstrap, {} Acquire{}",
            c.bootstrap_errors,
            c.grant_errors,
            if c.failed_nodes > 0 {
                format!(", {} nodes gave up", c.failed_nodes)
            } else {
                String::new()
            }
        ),
        "–".into(),
        "–".into(),
    );
    s.push('\n');
}

/// The result tables.
pub fn markdown(res: &Results) -> String {
    tables(res, &[])
}

/// A chart to show in the document: its title and its link from the document.
pub struct ChartLink {
    /// Alt text.
    pub title: String,
    /// Path relative to the document.
    pub link: String,
}

/// Replicas on etcd beside one controller on sled at one N, and the leader crashes.
fn ha_tables(s: &mut String, row: &HaRow) {
    let (one, reps) = (&row.sled.median, &row.etcd.median);
    let n = row.nodes;
    let _ = writeln!(
        s,
        "### High availability: {r} controller replicas on a {r}-member etcd beside 1 controller on sled\n\n\
         Same sitting, runs alternated; the nodes spread over the replicas (node i on replica i mod {r}), \
         so two writes in three reach a follower and are forwarded to the leader. CPU and RSS of the \
         replicas are their sums (a sum of peaks); the etcd members' cost is its own row.\n",
        r = row.replicas
    );
    let _ = writeln!(
        s,
        "| N | metric | 1 on sled | {} on etcd | etcd / sled |",
        row.replicas
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|");
    let mut line = |metric: &str, a: String, b: String, r: String| {
        let _ = writeln!(s, "| {n} | {metric} | {a} | {b} | {r} |");
    };
    line(
        &format!(
            "join storm: all N saw all N leases (median of {})",
            one.runs
        ),
        storm_cell(one, n),
        storm_cell(reps, n),
        ratio(converged_storm_s(reps), converged_storm_s(one)),
    );
    line(
        "grant latency in the storm p50 / p99, ms",
        format!("{} / {}", f(one.grant_ms.p50, 1), f(one.grant_ms.p99, 1)),
        format!("{} / {}", f(reps.grant_ms.p50, 1), f(reps.grant_ms.p99, 1)),
        ratio(reps.grant_ms.p99, one.grant_ms.p99),
    );
    let fan = |r: &SystemRuns| {
        let mut c = dist3(&r.median.fanout_from_send_ms);
        if let Delivered::Part(why) = fanout_completeness(r) {
            let _ = write!(c, " ({why})");
        }
        c
    };
    line(
        "fan-out from request send → delivery p50 / p99 / max, ms",
        fan(&row.sled),
        fan(&row.etcd),
        ratio(reps.fanout_from_send_ms.p99, one.fanout_from_send_ms.p99) + " (p99)",
    );
    // (metric, 1 on sled, N on etcd, decimals)
    for (metric, sled, etcd, digits) in [
        (
            "controllers' peak RSS, MB",
            one.peak_rss_mb,
            reps.peak_rss_mb,
            0,
        ),
        (
            "controllers' CPU in the storm, s",
            one.storm_cpu_s,
            reps.storm_cpu_s,
            2,
        ),
    ] {
        line(metric, f(sled, digits), f(etcd, digits), ratio(etcd, sled));
    }
    let etcd_cpu = crate::stats::median(row.etcd_storm_usage.iter().map(|u| u.cpu_s));
    let etcd_rss = crate::stats::median(row.etcd_storm_usage.iter().map(|u| u.peak_rss_mb));
    line(
        "etcd members' CPU in the storm, s / peak RSS, MB",
        "–".into(),
        format!("{} / {}", f(etcd_cpu, 2), f(etcd_rss, 0)),
        "–".into(),
    );
    s.push('\n');
    let fo = &row.failover;
    if fo.kills == 0 {
        return;
    }
    let _ = writeln!(
        s,
        "#### Leader crash under {n} connected nodes ({} × SIGKILL to the leader's pid)\n\n\
         New leader: SIGKILL → another replica's `twill_is_leader` is 1 (the dead leader's etcd lease, \
         1 s here, must lapse first). First grant: a new node asking a surviving replica from the \
         kill on holds its lease. Watches moved: every watch of the dead replica runs on another one again, \
         resumed from its revision. Back to its share: from the restart of the killed replica until \
         no replica holds more than a third of the watches and a twentieth (the replicas ask agents beyond \
         their share to move, `--rebalance-interval`).\n",
        fo.kills
    );
    let _ = writeln!(s, "| kill | watches on the dead replica | SIGKILL → new leader, s | → first grant, s | → all its watches moved, s | moved | full resets | restart → back to its share, s (watches) |");
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, x) in row.failovers.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} of {} | {} | {} ({}) |",
            i + 1,
            x.moved,
            f(x.new_leader_s, 2),
            f(x.first_grant_s, 2),
            f(x.all_moved_s, 2),
            x.resumed,
            x.moved,
            x.resets,
            f(x.rebalanced_s, 2),
            x.back
        );
    }
    let _ = writeln!(
        s,
        "| median (worst) | {:.0} | {} ({}) | {} ({}) | {} ({}) | | {} | {} |\n",
        fo.moved,
        f(fo.new_leader_s, 2),
        f(fo.new_leader_worst_s, 2),
        f(fo.first_grant_s, 2),
        f(fo.first_grant_worst_s, 2),
        f(fo.all_moved_s, 2),
        f(fo.all_moved_worst_s, 2),
        fo.resets,
        f(fo.rebalanced_s, 2)
    );
}

/// The result tables, with `charts` after the join storm / fan-out table.
fn tables(res: &Results, charts: &[ChartLink]) -> String {
    let mut s = String::new();
    let both = res.rows.iter().any(|r| r.etcd.is_some());
    // With --networks > 1 the rows say how many networks and leases they are of (the
    // columns 1-network rows lack, so that the two can be set side by side).
    let multi = res.rows.iter().map(|r| r.networks).max().unwrap_or(1);
    if !res.rows.is_empty() {
        let _ = writeln!(
            s,
            "### Join storm and fan-out{}\n",
            if both {
                ": Twill vs flannel's etcd mode"
            } else {
                ""
            }
        );
        if multi > 1 {
            let fanout_ran = res.rows.iter().any(|r| {
                [&r.twill, &r.etcd]
                    .into_iter()
                    .flatten()
                    .any(|x| x.runs.iter().any(|run| run.fanout.is_some()))
            });
            let _ = writeln!(
                s,
                "Every node joined {multi} networks: a lease in each (N × {multi} leases), all \
                 watched on one stream; a storm converges when every node has seen every lease.{}\n",
                if fanout_ran {
                    format!(
                        " A fan-out joiner asks for its {multi} leases at once; each delivery is \
                         timed from its own lease's request (N × {multi} deliveries a join)."
                    )
                } else {
                    String::new()
                }
            );
        }
        let (cols, rule) = if multi > 1 {
            ("| N | networks | leases ", "|---:|---:|---:")
        } else {
            ("| N ", "|---:")
        };
        if both {
            let _ = writeln!(
                s,
                "{cols}| metric | Twill | etcd (flannel) | Twill / etcd |"
            );
            let _ = writeln!(s, "{rule}|---|---:|---:|---:|");
        } else {
            let _ = writeln!(s, "{cols}| metric | Twill |");
            let _ = writeln!(s, "{rule}|---|---:|");
        }
        for row in &res.rows {
            let t = row.twill.as_ref().map(|t| &t.median);
            let e = row.etcd.as_ref().map(|e| &e.median);
            let runs = t.or(e).map_or(0, |m| m.runs);
            let n_cells = if multi > 1 {
                format!(
                    "{} | {} | {}",
                    row.nodes,
                    row.networks,
                    row.nodes * row.networks
                )
            } else {
                row.nodes.to_string()
            };
            let (all_leases, leases) = if row.networks > 1 {
                (
                    format!("N × {}", row.networks),
                    format!("N × {} leases", row.networks),
                )
            } else {
                ("N".to_string(), "N leases".to_string())
            };
            let mut line =
                |metric: &str, tv: Option<String>, ev: Option<String>, r: Option<String>| {
                    let tv = tv.unwrap_or_else(|| "–".into());
                    if both {
                        let _ = writeln!(
                            s,
                            "| {n_cells} | {metric} | {tv} | {} | {} |",
                            ev.unwrap_or_else(|| "–".into()),
                            r.unwrap_or_else(|| "–".into())
                        );
                    } else {
                        let _ = writeln!(s, "| {n_cells} | {metric} | {tv} |");
                    }
                };
            line(
                &format!("join storm: all N saw all {all_leases} leases (median of {runs})"),
                t.map(|m| storm_cell(m, row.nodes)),
                e.map(|m| storm_cell(m, row.nodes)),
                t.zip(e)
                    .map(|(a, b)| ratio(converged_storm_s(a), converged_storm_s(b))),
            );
            line(
                "grant latency in the storm p50 / p99, ms",
                t.map(|m| format!("{} / {}", f(m.grant_ms.p50, 1), f(m.grant_ms.p99, 1))),
                e.map(|m| format!("{} / {}", f(m.grant_ms.p50, 1), f(m.grant_ms.p99, 1))),
                t.zip(e).map(|(a, b)| ratio(a.grant_ms.p99, b.grant_ms.p99)),
            );
            let has =
                |d: Pick| t.is_some_and(|m| d(m).count > 0) || e.is_some_and(|m| d(m).count > 0);
            // Results from before the send origin have only the reply → delivery figure:
            // shown as what it is.
            let fan: Option<(&str, Pick)> = if has(|m| &m.fanout_from_send_ms) {
                Some((
                    "fan-out from request send → delivery p50 / p99 / max, ms",
                    |m| &m.fanout_from_send_ms,
                ))
            } else if has(|m| &m.fanout_from_reply_ms) {
                Some((
                    "fan-out from the joiner's reply → delivery (older results: may be negative) p50 / p99 / max, ms",
                    |m| &m.fanout_from_reply_ms,
                ))
            } else {
                None
            };
            if let Some((label, d)) = fan {
                // A figure from runs that delivered only part of the joins says so, and
                // is not set against the other system.
                let cell = |r: &SystemRuns| {
                    let mut c = dist3(d(&r.median));
                    if let Delivered::Part(why) = fanout_completeness(r) {
                        let _ = write!(c, " ({why})");
                    }
                    c
                };
                let whole = |r: &SystemRuns| fanout_completeness(r) == Delivered::All;
                line(
                    label,
                    row.twill.as_ref().map(cell),
                    row.etcd.as_ref().map(cell),
                    row.twill.as_ref().zip(row.etcd.as_ref()).map(|(a, b)| {
                        if whole(a) && whole(b) {
                            ratio(d(&a.median).p99, d(&b.median).p99) + " (p99)"
                        } else {
                            "–".into()
                        }
                    }),
                );
            }
            line(
                "server peak RSS, MB",
                t.map(|m| f(m.peak_rss_mb, 0)),
                e.map(|m| f(m.peak_rss_mb, 0)),
                t.zip(e).map(|(a, b)| ratio(a.peak_rss_mb, b.peak_rss_mb)),
            );
            line(
                &format!("server RSS at the end ({leases}, N watchers), MB"),
                t.map(|m| f(m.end_rss_mb, 0)),
                e.map(|m| f(m.end_rss_mb, 0)),
                t.zip(e).map(|(a, b)| ratio(a.end_rss_mb, b.end_rss_mb)),
            );
            line(
                "server CPU in the storm, s",
                t.map(|m| f(m.storm_cpu_s, 2)),
                e.map(|m| f(m.storm_cpu_s, 2)),
                t.zip(e).map(|(a, b)| ratio(a.storm_cpu_s, b.storm_cpu_s)),
            );
            line(
                "load generator CPU in the storm, s",
                t.map(|m| f(m.client_cpu_s, 2)),
                e.map(|m| f(m.client_cpu_s, 2)),
                None,
            );
        }
        s.push('\n');
    }
    if !charts.is_empty() {
        let ns: Vec<String> = res.rows.iter().map(|r| r.nodes.to_string()).collect();
        let _ = writeln!(
            s,
            "### Charts: the same rows against N ({})\n",
            ns.join(", ")
        );
        let _ = writeln!(
            s,
            "Medians as in the table above; a cross at the deadline is a storm that did not \
             converge, a small cross at the foot a figure that could not be measured.\n"
        );
        for c in charts {
            let _ = writeln!(s, "![{}]({})\n", c.title, c.link);
        }
    }
    for fl in &res.floors {
        floors_table(&mut s, fl, res);
    }
    crate::verdicts::goals_table(&mut s, res);
    crate::verdicts::previous_table(&mut s, res);
    for row in &res.cold_start {
        cold_start_table(&mut s, row);
    }
    for row in &res.ha {
        ha_tables(&mut s, row);
    }
    if let Some(c) = &res.churn {
        let _ = writeln!(s, "### Churn (Twill)\n");
        let _ = writeln!(s, "| N | nodes leaving + rejoining per s | duration | delivery p50 / p99 / max, ms | deliveries | Release/Acquire p50 / p99, ms | controller CPU | controller RSS |");
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} s | {} | {} of {} | {} / {} | {:.1} s ({:.0}% of a core) | {:.0} MB |\n",
            c.nodes,
            c.per_second,
            c.duration_s,
            dist3(&c.delivery_ms),
            c.delivery_ms.count,
            c.expected_deliveries,
            f(c.op_ms.p50, 2),
            f(c.op_ms.p99, 2),
            c.server.cpu_s,
            100.0 * c.server.cpu_s / c.duration_s.max(1e-9),
            c.server.peak_rss_mb
        );
    }
    if let Some(r) = &res.reconnect {
        let _ = writeln!(s, "### Reconnect (Twill)\n");
        let _ = writeln!(s, "| N | stop | stop → controller ready | stop → all watches resumed | resume p50 / p99, ms after stop | resumed | full resets |");
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            s,
            "| {} | {} | {} s | {} s | {} / {} | {} of {} | {} |\n",
            r.nodes,
            if r.stop_escalated {
                format!(
                    "{} (did not exit within {} s: SIGKILLed)",
                    r.signal,
                    crate::servers::STOP_GRACE.as_secs()
                )
            } else {
                r.signal.clone()
            },
            f(r.restart_s, 2),
            f(r.all_resumed_s, 2),
            f(r.resume_s.p50, 0),
            f(r.resume_s.p99, 0),
            r.resumed,
            r.nodes,
            r.resets
        );
    }
    if !res.dataplane.is_empty() {
        let _ = writeln!(
            s,
            "### Data plane: the agent's reconcile over netlink vs `ip -batch` + `bridge -batch`\n"
        );
        let _ = writeln!(s, "| peers | Twill from empty, ms | ip+bridge -batch from empty, ms | Twill / batch | Twill one change, ms | batch one change, ms | Twill full kernel read (periodic resync), ms |");
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|");
        for d in &res.dataplane {
            let peers = if d.dual_stack {
                format!("{} dual-stack", d.peers)
            } else {
                d.peers.to_string()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                peers,
                f(d.twill_full_ms, 1),
                f(d.batch_full_ms, 1),
                ratio(d.twill_full_ms, d.batch_full_ms),
                f(d.twill_change_ms, 2),
                f(d.batch_change_ms, 2),
                f(d.twill_read_state_ms, 2)
            );
        }
        s.push('\n');
    }
    if !res.pods.is_empty() {
        let _ = writeln!(
            s,
            "### The pod view: 110 pods per node reported at once, then 100 pod changes a second\n"
        );
        let _ = writeln!(s, "| nodes | pods | all reported in, s | report p50 / p99, ms | controller CPU, s | controller RSS before → after, MB | ListPods one node p50, ms | ListPods all p50, ms | changes: report p50 / p99, ms | changes: controller CPU per s |");
        let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for p in &res.pods {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} / {} | {} | {} → {} | {} | {} | {} / {} | {} |",
                p.nodes,
                p.pods,
                f(p.report_all_s, 2),
                f(p.report_ms.p50, 1),
                f(p.report_ms.p99, 1),
                f(p.report_usage.cpu_s, 1),
                f(p.rss_before_mb, 0),
                f(p.rss_after_mb, 0),
                f(p.list_one_ms.p50, 2),
                f(p.list_all_ms.p50, 0),
                f(p.churn_ms.p50, 2),
                f(p.churn_ms.p99, 2),
                f(p.churn_usage.cpu_s / p.churn_s.max(f64::MIN_POSITIVE), 2)
            );
        }
        s.push('\n');
    }
    if let Some(c) = &res.cni {
        let _ = writeln!(
            s,
            "### twill-cni ADD: what the report to the agent costs ({} ADDs of each, alternated)\n",
            c.adds
        );
        let _ = writeln!(s, "| report | ADD p50, ms | ADD p99, ms | p50 added, ms |");
        let _ = writeln!(s, "|---|---:|---:|---:|");
        for (what, d) in [
            ("none (`agentSocket: \"\"`)", &c.no_report),
            ("agent up (its socket)", &c.agent_up),
            ("agent down (queued on disk)", &c.agent_down),
        ] {
            let _ = writeln!(
                s,
                "| {what} | {} | {} | {} |",
                f(d.p50, 2),
                f(d.p99, 2),
                f(d.p50 - c.no_report.p50, 2)
            );
        }
        let _ = writeln!(
            s,
            "\nThe report alone (110 pods' ADD reports then their DELs, in process): p50 {} ms, p99 {} ms with the agent up; p50 {} ms, p99 {} ms queued with the agent down.\n",
            f(c.report_up.p50, 3),
            f(c.report_up.p99, 3),
            f(c.report_down.p50, 3),
            f(c.report_down.p99, 3)
        );
    }
    let ts = targets(res);
    if ts.iter().any(|t| t.met.is_some()) {
        let _ = writeln!(s, "### Targets (stated, not enforced)\n");
        let _ = writeln!(s, "| target | goal | measured | |");
        let _ = writeln!(s, "|---|---|---|---|");
        for t in ts {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "–",
            };
            let _ = writeln!(s, "| {} | {} | {} | {verdict} |", t.what, t.goal, t.got);
        }
        s.push('\n');
    }
    for n in &res.notes {
        let _ = writeln!(s, "- note: {n}");
    }
    s
}

/// BENCHMARKS.md: method, machine, command, tables (and `charts`), meaning.
pub fn document(res: &Results, charts: &[ChartLink]) -> String {
    let m = &res.machine;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Twill benchmarks\n\n\
         This file is written by the benchmark harness (`bench/`, binary `twill-bench`); do not edit it by hand.\n\
         Regenerate it with the command below, or from saved figures with\n\
         `cargo run --release -p twill-bench -- report --from target/bench-results/<file>.json --write-markdown BENCHMARKS.md`.\n\n\
         ## Command\n\n\
         ```sh\n\
         bash scripts/bench-setup.sh        # scripts/setup.sh (etcd-server, the anchor), then iproute2, perf\n\
         cargo build --release -p twill-server -p twill-bench\n\
         {}\n\
         ```\n\n\
         Raw figures (every run, not only medians) are written to target/bench-results/ as \
         JSON; those of the run shown here are kept in \
         [bench/results/compare.json](bench/results/compare.json) (`report --from` it to \
         render this file again).{}\n\
         This run took {:.0} min.\n",
        res.command
            .split_whitespace()
            .enumerate()
            .map(|(i, w)| if i == 0 { "target/release/twill-bench".to_string() } else { w.to_string() })
            .collect::<Vec<_>>()
            .join(" "),
        match &res.previous {
            Some(_) => " The previous controller is a release build of the commit named \
                        under \"Before and after\" (`git worktree add /tmp/prev <commit>`, \
                        then `cargo build --release -p twill-server` there)."
                .to_string(),
            None => String::new(),
        },
        res.wall_s / 60.0
    );
    let _ = writeln!(
        s,
        "## Machine\n\n\
         - CPU: {} × {} cores, {} GiB memory, Linux {}\n\
         - Controller: `{}`\n\
         - etcd: {}\n\
         - Everything on this one machine: servers and load generator share the {} cores, so \
           the load generator's own CPU is listed too. The machine is noisy: quote medians and ratios.\n",
        m.cpu,
        m.cores,
        m.memory_gib,
        m.kernel,
        res.controller,
        if res.etcd_version.is_empty() { "not run".into() } else { res.etcd_version.clone() },
        m.cores
    );
    s.push_str(
        "## Method\n\n\
         - **Simulated nodes** are real gRPC clients on 127.0.0.1, one mutual-TLS connection per node \
           (each with its own client certificate, `CN=<node>, O=twill:nodes`, from one CA made with \
           twillctl's certificate library), in one multi-threaded process; no netlink. Connections \
           are opened before time zero; the time to open them is not part of any figure. A \
           Twill node reads each watch message with a small decoder of the same wire format that \
           keeps only what is tracked (node name, event type, revision), and the process uses \
           mimalloc without transparent huge pages: N nodes decoding N² leases on the server's own 2 cores would otherwise \
           measure the load generator (with generated decoders it used twice the controller's \
           CPU). The etcd nodes use the etcd client's generated decoders.\n\
         - **Twill**: the real `twill-controller` binary with a fresh data dir. A node watches \
           (`AgentService.Watch` from revision 0: the current table, then changes) and calls \
           `Acquire`, exactly what twill-agent does at start.\n\
         - **flannel's etcd mode** (the anchor): Debian's etcd, a single member on 127.0.0.1 with \
           its own temp data dir and client-certificate TLS from the same CA (`--client-cert-auth`). \
           Each node does what flanneld's etcd subnet manager does on its data path: lists \
           `/coreos.com/network/subnets/`, watches the prefix from the listed revision, grants an \
           etcd lease (TTL 24 h) and puts its key `/coreos.com/network/subnets/10.A.B.0-24` with a \
           flannel lease JSON value under it; a failed call is retried every second, as flanneld \
           does. (flanneld also lists every lease before choosing a subnet and creates the key \
           with a create-only transaction, retrying on collisions: the figures here are a lower \
           bound on flannel's cost.)\n\
         - **join storm**: at time zero all N nodes start watching and ask for their lease at \
           once. Converged = every node has seen all N leases. Grant latency = time zero → the \
           node's Acquire reply (Twill) or its put's reply (etcd). A storm has a deadline; past it \
           the progress is reported instead.\n\
         - **fan-out**: with the N nodes watching and the cluster settled (1.5 s after the \
           storm: for a second after a burst the controller spaces its publications, and a \
           join then waits up to a second more), one more node joins, 50 times, 100 ms apart. \
           Delay, for both systems, = the moment the joiner sends its request (Twill: its \
           `Acquire`; etcd: the `LeaseGrant` that flannel's join starts with, its `Put` \
           following the reply) → the lease's arrival at each of the N watchers; p50/p99/max \
           over all N × 50 deliveries. It includes the joiner's own request: the durable write \
           (Twill's batched fsync; etcd's raft and boltdb commit, twice). Earlier tables \
           started at the joiner's reply instead, and since a watcher can hear of a lease \
           before its holder has the reply, their smallest delays were negative; the raw JSON \
           keeps that figure too (`from_reply_ms`).\n\
         - **cold start**: N new nodes that hold only the CA certificate and a bootstrap token \
           (made with `AdminService.CreateToken`, as `twillctl token create` does), against a \
           controller that signs node certificates with the client CA (`--signing-cert`, \
           `--signing-key`, `--node-cert-ttl 24h`). Before time zero each node makes its ECDSA \
           P-256 key and its CSR (`CN=<node>, O=twill:nodes`) with the agent's own code \
           (`twill_agent::identity`); in a cluster each node does this on its own machine. At time \
           zero every node opens a TLS connection without a client certificate, calls \
           `IdentityService.Bootstrap`, checks the certificate as the agent does, leaves that \
           connection, opens its mutual-TLS channel with the new certificate, then watches and \
           acquires as in the join storm. At most 64 connections are being opened at once, as \
           before the join storm's time zero. Bootstrap latency = time zero → certificate in \
           hand; join latency = certificate in hand → lease granted (it includes the mutual-TLS \
           handshake). Each cold start follows a join storm of N nodes that hold certificates \
           already, alternately in the same sitting; the join storm's connections are opened \
           before its time zero, so its figures leave out the time and CPU the cold start \
           spends on them (both are listed).\n\
         - **server memory and CPU** come from /proc: peak RSS is VmHWM (reset with clear_refs at \
           time zero, so it covers storm and fan-out), CPU is utime + stime.\n\
         - **churn**: 1% of the nodes release and re-acquire their lease every second; delay = \
           the request being sent → its event's arrival at each watcher (so it includes the \
           durable write).\n\
         - **reconnect**: the controller is stopped under N watching nodes and started again on \
           the same data dir and port; each node resumes its watch from its last revision with \
           the agent's own backoff (0.5 s doubling, jittered). Counted: time until every watch is \
           resumed, and how many needed a full reset instead of the missed events.\n\
         - **data plane**: in a fresh network namespace per measurement, the agent's own code \
           (`twill_agent::reconcile::{desired, reconcile}` over `Netlink`) programs P peers from \
           empty (neighbour + FDB entry + route each), then applies one change (a peer joins or \
           leaves, 20 times, median) the way the agent does after a watch batch: \
           `reconcile::apply_diff` against what it last applied, without dumping the kernel \
           (the full read is the periodic resync, timed on its own). The floor is iproute2 doing the same with `ip -batch` \
           (neighbours + routes) and `bridge -batch` (FDB) — one process each, the kernel's own \
           speed.\n\
         - **replicas**: 3 controllers (`--store etcd`, `--leader-ttl 1s`) on a 3-member etcd \
           on loopback (`--election-timeout 500 --heartbeat-interval 50`, so that it grants a \
           1 s lease; deploy/README.md, failover), the \
           nodes spread over them (node i on replica i mod 3, so two writes in three are \
           forwarded to the leader, with the node's 10 s deadline), join storm and fan-out alternated with one controller on \
           sled; then the leader is SIGKILLed under the N nodes (by its own pid), timed to a new \
           leader, to its first grant and to every watch moved, and started again.\n\
         - **floors**: what this machine allows, measured in the same run at each N: a 128-byte \
           write + fsync; a minimal tokio + rustls server (its own runtime, 2 threads) writing a \
           one-lease watch message to N mutual-TLS connections held by the same simulated nodes \
           (the broadcast floor); N mutual-TLS handshakes (64 at once) and N P-256 signatures; \
           the same kind of server as a process of its own holding N connections (its RSS per \
           connection), then sending every connection N leases' bytes (the transfer floor of a \
           join storm). HTTP/2 adds fixed buffers to every connection that a TLS server without \
           it does not have (28 KiB, see the goals table).\n\
         - **before and after** (`--previous-controller`): at the largest N the previous \
           controller's join storms and cold starts alternate run by run with this one's; its \
           churn and its replicas run right before this one's.\n\
         - Medians over the repeated runs (3 per N below 5,000, 1 at 5,000 by default).\n\n",
    );
    s.push_str("## Results\n\n");
    s.push_str(&tables(res, charts));
    s.push_str(
        "\n## What the figures mean\n\n\
         - In both designs every node must learn every other node's lease, so a join storm moves \
           N² lease records whatever the design; the difference is what each record costs. In \
           flannel's etcd mode each of the N watches is a separate watcher inside etcd, each write \
           goes through raft and the boltdb backend, and every node also lists the prefix: etcd's \
           work per node grows with N. Twill's controller commits a batch of grants with one \
           fsync (one etcd transaction per part of at most 120 operations with replicas), \
           encodes each publication once and hands the same bytes to every watcher's stream; \
           a watcher starting from scratch gets the snapshot encoded once per revision. A quiet \
           cluster's change goes out at once; once 150 or more changes went out within a \
           second, the next publication waits until three times the last fan-out has passed, \
           so that fan-outs take at most a third of the machine and a burst goes out in fewer, \
           larger messages.\n\
         - Twill's memory is mostly its connections. Each has fixed buffers whatever it \
           carries (heaptrack of the controller, 2,000 connections): HTTP/2's write buffer \
           (16 KiB), read buffer (8 KiB) and header decoder buffer (4 KiB), rustls' receive \
           buffer (4 KiB) and the connection's task (5 KB). With what a TLS server without \
           HTTP/2 holds per connection (the floors), 5,000 agents cost about 200 MB before any \
           lease is sent: one HTTP/2 + TLS connection per agent cannot be held in less on this \
           machine.\n\
         - Fan-out is the steady state of a running cluster: how long after a node asks to join \
           every other node can route to it. Twill/etcd ratios below 1 mean Twill is faster or smaller.\n\
         - The load generator (all N simulated nodes) runs on the same cores as the server, so \
           absolute figures are pessimistic for both systems; the ratios compare like with like.\n\
         - A cold start does what the join storm does and, before it, two TLS handshakes per \
           node (the Bootstrap connection, then the mutual-TLS one; the storm's are opened \
           before its time zero) and a signature, on the same 2 cores as the simulated nodes' \
           side of every handshake. The goals table counts one mutual-TLS handshake and one \
           signature per node as its floor, a lower bound: the Bootstrap handshake, without a \
           client certificate, comes on top. Its leases come in at \
           the rate certificates are issued, so its publications are many and small until the \
           burst rule above spaces them.\n\
         - The data-plane floor runs each tool once for all peers (a process start each, which \
           is most of its cost for one change); the agent sends one netlink request per entry and \
           waits for each answer. A single change is applied as a diff against what the agent \
           last applied; the full kernel read (last column) is paid only by the periodic resync \
           that repairs hand-made changes.\n\n\
         Figures of earlier sittings, and the experiments that did not pay, are in \
         [bench/HISTORY.md](bench/HISTORY.md).\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::FanoutOutcome;
    use crate::stats::Dist;
    use crate::Run;

    fn runs(delivered: &[Option<u64>]) -> SystemRuns {
        SystemRuns {
            runs: delivered
                .iter()
                .map(|d| Run {
                    fanout: d.map(|count| FanoutOutcome {
                        expected: 100,
                        from_send_ms: Dist {
                            count,
                            ..Default::default()
                        },
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            median: Default::default(),
        }
    }

    fn storm_row(nodes: usize, networks: usize) -> crate::Row {
        crate::Row {
            nodes,
            networks,
            twill: Some(SystemRuns {
                runs: vec![Run::default()],
                median: Summary {
                    runs: 1,
                    converged_runs: 1,
                    storm_s: 1.5,
                    ..Default::default()
                },
            }),
            etcd: None,
        }
    }

    #[test]
    fn rows_of_several_networks_name_their_networks_and_leases() {
        let one = markdown(&Results {
            rows: vec![storm_row(5000, 1)],
            ..Default::default()
        });
        assert!(one.contains("| N | metric | Twill |\n"), "{one}");
        assert!(
            one.contains("| 5000 | join storm: all N saw all N leases (median of 1) | 1.50 s |")
        );
        assert!(one.contains("| N=5,000 join storm converged |"), "{one}");
        let two = markdown(&Results {
            rows: vec![storm_row(5000, 2)],
            ..Default::default()
        });
        assert!(
            two.contains("| N | networks | leases | metric | Twill |\n"),
            "{two}"
        );
        assert!(two.contains(
            "| 5000 | 2 | 10000 | join storm: all N saw all N × 2 leases (median of 1) | 1.50 s |"
        ));
        assert!(two.contains("(N × 2 leases, N watchers)"), "{two}");
        assert!(
            two.contains("| N=5,000 on 2 networks (10,000 leases) join storm converged |"),
            "{two}"
        );
    }

    #[test]
    fn memory_per_agent_is_the_slope_of_the_end_rss_on_one_network() {
        let row = |nodes, networks, rss| {
            let mut r = storm_row(nodes, networks);
            r.twill.as_mut().unwrap().median.end_rss_mb = rss;
            r
        };
        let res = Results {
            rows: vec![
                row(5000, 1, 210.0),
                row(1000, 1, 60.0),
                row(2000, 1, 95.0),
                row(5000, 2, 320.0),
            ],
            ..Default::default()
        };
        let (kb, lo, hi) = memory_per_agent(&res).unwrap();
        assert_eq!((lo, hi), (1000, 5000), "the outer N of one network");
        assert!((kb - 38.4).abs() < 1e-9, "{kb}");
        let md = markdown(&res);
        let goal = md
            .lines()
            .find(|l| l.starts_with("| idle memory per connected agent ≤ 20 KB |"))
            .expect("the memory goal is reported");
        assert!(
            goal.contains("| 38.4 KB (slope of the end RSS, N = 1000 → 5000) |")
                && goal.ends_with("| **missed** |"),
            "{goal}"
        );
        let one = Results {
            rows: vec![row(5000, 1, 210.0)],
            ..Default::default()
        };
        assert!(memory_per_agent(&one).is_none(), "one N: no slope");
    }

    #[test]
    fn partial_fanouts_are_named() {
        assert_eq!(
            fanout_completeness(&runs(&[Some(100), Some(100)])),
            Delivered::All
        );
        assert_eq!(fanout_completeness(&runs(&[None])), Delivered::NotRun);
        assert_eq!(
            fanout_completeness(&runs(&[Some(0), None])),
            Delivered::Part("no join delivered".into())
        );
        assert_eq!(
            fanout_completeness(&runs(&[Some(4), Some(0), None])),
            Delivered::Part("delivered 4.0%, 0.0%, not run in its 3 runs".into())
        );
    }
}
