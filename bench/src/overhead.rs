//! The cost of metrics: each Sluice target with metrics (`sluice-grpc`) against its twin with
//! metrics off (`sluice-grpc@nometrics`) in the same run, as ratios, and the median ratio over
//! repeated runs (`scripts/bench.sh --metrics-overhead --rounds N`), because one run's noise on
//! a small machine is larger than the cost being measured.

use std::fmt::Write as _;

use crate::cpu::CLIENT_PROCESS;
use crate::results::{ResultsFile, RunResult};
use crate::workload::DurabilityLevel;

/// The label of the targets with metrics off.
pub const NO_METRICS_LABEL: &str = "nometrics";

/// One target in one workload, over every round that ran both twins.
#[derive(Debug, Clone, PartialEq)]
pub struct OverheadRow {
    pub durability: DurabilityLevel,
    pub workload: String,
    pub target: String,
    pub rounds: usize,
    /// Medians over the rounds, metrics on then off.
    pub p50_us: (f64, f64),
    pub msgs_per_sec: (f64, f64),
    pub cpu_us_per_msg: (f64, f64),
    /// Medians of each round's on ÷ off ratio.
    pub p50_ratio: f64,
    pub throughput_ratio: f64,
    pub cpu_ratio: f64,
}

/// The figures compared, of one target in one run.
struct Figures {
    /// Send→receive p50 (send→ack where nothing is received).
    p50_us: f64,
    /// Messages per second received (else acked).
    msgs_per_sec: f64,
    /// Server CPU per message, every process charged.
    cpu_us_per_msg: f64,
}

fn figures(r: &RunResult) -> Figures {
    Figures {
        p50_us: r.send_receive.as_ref().map_or(r.send_ack.p50_us, |s| s.p50_us),
        msgs_per_sec: r.receive_throughput.as_ref().map_or(r.send_throughput.msgs_per_sec, |t| t.msgs_per_sec),
        cpu_us_per_msg: r.cpu.iter().filter(|c| c.process != CLIENT_PROCESS).map(|c| c.cpu_us_per_msg).sum(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn ratio(on: f64, off: f64) -> f64 {
    if off > 0.0 {
        on / off
    } else {
        f64::NAN
    }
}

/// Pairs every `X@nometrics` result with `X` of the same workload and file, and takes medians
/// across the files (rounds) of one durability level. Order follows first appearance.
pub fn overhead_rows(files: &[ResultsFile]) -> Vec<OverheadRow> {
    let suffix = format!("@{NO_METRICS_LABEL}");
    let mut keys: Vec<(DurabilityLevel, String, String)> = Vec::new();
    for f in files {
        for r in &f.results {
            if let Some(target) = r.target.strip_suffix(&suffix) {
                let key = (f.durability, r.workload.name.clone(), target.to_string());
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
    }
    keys.into_iter()
        .filter_map(|(durability, workload, target)| {
            let pairs: Vec<(Figures, Figures)> = files
                .iter()
                .filter(|f| f.durability == durability)
                .filter_map(|f| {
                    let find = |name: &str| f.results.iter().find(|r| r.workload.name == workload && r.target == name);
                    Some((figures(find(&target)?), figures(find(&format!("{target}{suffix}"))?)))
                })
                .collect();
            if pairs.is_empty() {
                return None;
            }
            let column = |pick: fn(&Figures) -> f64| {
                (
                    median(pairs.iter().map(|(on, _)| pick(on)).collect()),
                    median(pairs.iter().map(|(_, off)| pick(off)).collect()),
                    median(pairs.iter().map(|(on, off)| ratio(pick(on), pick(off))).collect()),
                )
            };
            let (p50_on, p50_off, p50_ratio) = column(|f| f.p50_us);
            let (rate_on, rate_off, throughput_ratio) = column(|f| f.msgs_per_sec);
            let (cpu_on, cpu_off, cpu_ratio) = column(|f| f.cpu_us_per_msg);
            Some(OverheadRow {
                durability,
                workload,
                target,
                rounds: pairs.len(),
                p50_us: (p50_on, p50_off),
                msgs_per_sec: (rate_on, rate_off),
                cpu_us_per_msg: (cpu_on, cpu_off),
                p50_ratio,
                throughput_ratio,
                cpu_ratio,
            })
        })
        .collect()
}

fn percent(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{:+.1}%", (ratio - 1.0) * 100.0)
    } else {
        "n/a".into()
    }
}

/// The table `sluice-bench overhead` prints; `within` says whether p50 and throughput stayed
/// within `limit_pct` of metrics off.
pub fn overhead_table(rows: &[OverheadRow], limit_pct: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<14} {:<14} {:>6} {:>22} {:>8} {:>22} {:>8} {:>20} {:>8}  within {limit_pct}%",
        "level",
        "workload",
        "target",
        "rounds",
        "p50 µs on / off",
        "Δp50",
        "msgs/s on / off",
        "Δrate",
        "cpu µs/msg on / off",
        "Δcpu"
    );
    for r in rows {
        let within =
            (r.p50_ratio - 1.0).abs() * 100.0 <= limit_pct && (r.throughput_ratio - 1.0).abs() * 100.0 <= limit_pct;
        let _ = writeln!(
            out,
            "{:<6} {:<14} {:<14} {:>6} {:>22} {:>8} {:>22} {:>8} {:>20} {:>8}  {}",
            r.durability.to_string(),
            r.workload,
            r.target,
            r.rounds,
            format!("{:.0} / {:.0}", r.p50_us.0, r.p50_us.1),
            percent(r.p50_ratio),
            format!("{:.0} / {:.0}", r.msgs_per_sec.0, r.msgs_per_sec.1),
            percent(r.throughput_ratio),
            format!("{:.1} / {:.1}", r.cpu_us_per_msg.0, r.cpu_us_per_msg.1),
            percent(r.cpu_ratio),
            if within { "yes" } else { "NO" }
        );
    }
    out.push_str("Δ: median over rounds of (metrics on ÷ metrics off) − 1; on / off: medians of each.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuUse;
    use crate::results::testing::{file, result, summary};
    use crate::targets::TargetKind;
    use crate::workload::Suite;

    #[test]
    fn each_target_is_paired_with_its_twin_without_metrics_and_rounds_give_medians() {
        let suite = Suite::parse("name = \"s\"\n[[workload]]\nname = \"w\"\n", "s").unwrap();
        let w = &suite.workloads[0];
        // Round p50s, on / off: 110 / 100, 100 / 100, 300 / 100 → ratios 1.1, 1.0, 3.0.
        let cpu = |process: &str, us: f64| CpuUse { process: process.into(), pid: 1, cpu_ms: 1.0, cpu_us_per_msg: us };
        let round = |on_us: u64, off_us: u64| {
            let mut on = result(w, TargetKind::SluiceGrpc, Some(summary(&[on_us])));
            // The load generator's own CPU is not the server's.
            on.cpu = vec![cpu("proxy", 30.0), cpu("broker", 10.0), cpu(CLIENT_PROCESS, 500.0)];
            let mut off = result(w, TargetKind::SluiceGrpc, Some(summary(&[off_us])));
            off.target = "sluice-grpc@nometrics".into();
            off.cpu = vec![cpu("proxy@nometrics", 30.0), cpu("broker@nometrics", 10.0)];
            let mut other = result(w, TargetKind::Redis, Some(summary(&[1])));
            other.target = "redis@tcp".into();
            file(vec![off, other, on])
        };
        // A run at another durability level is not a round of this one.
        let mut other_level = round(500, 100);
        other_level.durability = DurabilityLevel::Async;
        let rows = overhead_rows(&[round(110, 100), other_level, round(100, 100), round(300, 100)]);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let row = &rows[0];
        assert_eq!(row.durability, DurabilityLevel::Sync);
        assert_eq!((row.workload.as_str(), row.target.as_str(), row.rounds), ("w", "sluice-grpc", 3));
        assert!((row.p50_ratio - 1.1).abs() < 0.01, "median ratio {}", row.p50_ratio);
        assert!((row.p50_us.0 - 110.0).abs() < 1.0 && (row.p50_us.1 - 100.0).abs() < 1.0, "{:?}", row.p50_us);
        assert_eq!(row.throughput_ratio, 1.0);
        assert_eq!((row.cpu_us_per_msg, row.cpu_ratio), ((40.0, 40.0), 1.0));
        assert_eq!((rows[1].durability, rows[1].rounds), (DurabilityLevel::Async, 1));
        let table = overhead_table(&rows, 3.0);
        assert!(table.lines().nth(1).is_some_and(|l| l.contains("+10.0%") && l.ends_with("NO")), "{table}");
        // A file with no twin adds no round.
        assert_eq!(overhead_rows(&[file(vec![result(w, TargetKind::SluiceGrpc, None)])]), vec![]);
    }

    #[test]
    fn medians_of_odd_even_and_empty_sets() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![f64::NAN]).is_nan());
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn a_ratio_to_nothing_is_not_a_number() {
        assert_eq!(ratio(110.0, 100.0), 1.1);
        assert!(ratio(1.0, 0.0).is_nan());
        assert_eq!(percent(1.034), "+3.4%");
        assert_eq!(percent(f64::NAN), "n/a");
    }
}
