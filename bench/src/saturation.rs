//! Saturation: a workload stepped through rising offered rates, one run per step, until a
//! system no longer keeps up. What it reports is the highest rate each system sustained, and
//! the CPU per message of every server process at that rate.

use std::fmt::Write as _;
use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::cpu::CLIENT_PROCESS;
use crate::driver::DRAIN_SECS;
use crate::error::BenchError;
use crate::results::{ResultsFile, RunResult};
use crate::targets::{TargetKind, TargetSpec};
use crate::workload::Workload;

/// A step whose send→receive p99 (send→ack without consumers) is above this did not keep up.
pub const P99_LIMIT_US: f64 = 10_000.0;
/// Runs of one step before it counts as fallen short: a step that falls short is run once
/// more, so one stall (a noisy neighbour, a new topic's first writes) does not end the
/// stepping; two in a row do.
pub const ATTEMPTS_PER_STEP: usize = 2;

/// One saturation workload on one target: the steps it ran, lowest rate first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Saturation {
    /// The workload as the suite gave it (with its step rates).
    pub workload: Workload,
    pub target: String,
    pub kind: TargetKind,
    /// Every run, in order: a step that fell short once and kept up on its second attempt
    /// appears twice, and the last one or two runs may have fallen short.
    pub steps: Vec<RunResult>,
    /// The highest offered rate kept up; None when not even the first was.
    pub sustained_per_sec: Option<u64>,
    /// Why stepping stopped short of the last rate; None when every step kept up (the
    /// ceiling is higher than the steps reach).
    pub stopped: Option<String>,
    /// A run that could not be made at all (the harness or the target broke, not a
    /// shortfall): it ended the stepping, and `check` reports it.
    #[serde(default)]
    pub error: Option<String>,
}

impl Saturation {
    /// The run at the highest rate kept up.
    pub fn sustained(&self) -> Option<&RunResult> {
        self.kept_up_at(self.sustained_per_sec?)
    }

    /// The run that kept up at `rate` (a step's second attempt, if it took two).
    pub fn kept_up_at(&self, rate: u64) -> Option<&RunResult> {
        self.steps.iter().rfind(|s| s.workload.rate_per_sec == rate && shortfall(s).is_none())
    }

    /// The sustained rate took a second attempt.
    fn sustained_on_second_attempt(&self) -> bool {
        let rate = self.sustained_per_sec;
        self.steps.iter().filter(|s| Some(s.workload.rate_per_sec) == rate).count() > 1
    }
}

/// Why a step did not keep up, or None if it did: no failed send, receive or ack, every
/// send started and finished on schedule, every acked message received once and intact, and
/// the p99 within `P99_LIMIT_US`.
pub fn shortfall(step: &RunResult) -> Option<String> {
    let c = &step.counts;
    if c.send_errors > 0 {
        return Some(format!("{} of {} sends failed", c.send_errors, c.started));
    }
    if c.receive_errors + c.ack_errors > 0 {
        return Some(format!("{} receives and {} acks failed", c.receive_errors, c.ack_errors));
    }
    if c.duplicates + c.corrupt > 0 {
        return Some(format!("{} messages delivered again and {} corrupt", c.duplicates, c.corrupt));
    }
    if c.unstarted + c.unfinished > 0 {
        return Some(format!(
            "fell behind the schedule: {} sends never started and {} were unfinished at the deadline",
            c.unstarted, c.unfinished
        ));
    }
    if c.lost > 0 {
        return Some(format!("{} acked messages were not received within {DRAIN_SECS} s of the end", c.lost));
    }
    let (what, latency) = match &step.send_receive {
        Some(e2e) => ("send→receive", e2e),
        None => ("send→ack", &step.send_ack),
    };
    if latency.count == 0 {
        return Some(format!("no {what} latency was measured"));
    }
    (latency.p99_us > P99_LIMIT_US)
        .then(|| format!("{what} p99 {:.1} ms is over {:.0} ms", latency.p99_us / 1000.0, P99_LIMIT_US / 1000.0))
}

/// Steps `workload` up on `spec`, running each step with `run_step` (the driver), and stops
/// at the first step that falls short `ATTEMPTS_PER_STEP` times in a row. An error on the
/// first run is returned (the target could not run at all); a later one ends the stepping and
/// is kept in `error`.
pub async fn step_up<F, Fut>(spec: &TargetSpec, workload: &Workload, mut run_step: F) -> Result<Saturation, BenchError>
where
    F: FnMut(Workload) -> Fut,
    Fut: Future<Output = Result<RunResult, BenchError>>,
{
    let mut saturation = Saturation {
        workload: workload.clone(),
        target: spec.label.clone(),
        kind: spec.kind,
        steps: Vec::new(),
        sustained_per_sec: None,
        stopped: None,
        error: None,
    };
    for &rate in &workload.step_rates_per_sec {
        let mut reasons = Vec::new();
        while reasons.len() < ATTEMPTS_PER_STEP {
            let step = match run_step(workload.at_rate(rate)).await {
                Ok(step) => step,
                Err(e) if saturation.steps.is_empty() => return Err(e),
                Err(e) => {
                    let error = format!("at {rate} msg/s: error {}: {e}", e.code());
                    saturation.stopped = Some(error.clone());
                    saturation.error = Some(error);
                    return Ok(saturation);
                }
            };
            let why = shortfall(&step);
            saturation.steps.push(step);
            match why {
                None => break,
                Some(why) => reasons.push(why),
            }
        }
        if reasons.len() == ATTEMPTS_PER_STEP {
            saturation.stopped = Some(format!("at {rate} msg/s: {}", reasons.join("; then ")));
            break;
        }
        saturation.sustained_per_sec = Some(rate);
    }
    Ok(saturation)
}

/// Server CPU µs per message of one run: each process, and their sum (None without any).
fn server_cpu(step: &RunResult) -> (String, Option<f64>) {
    let servers: Vec<_> = step.cpu.iter().filter(|c| c.process != CLIENT_PROCESS).collect();
    if servers.is_empty() {
        return ("-".into(), None);
    }
    let each: Vec<String> = servers.iter().map(|c| format!("{} {:.1}", c.process, c.cpu_us_per_msg)).collect();
    let total: f64 = servers.iter().map(|c| c.cpu_us_per_msg).sum();
    let text = if servers.len() > 1 { format!("{} = {total:.1}", each.join(" + ")) } else { each.join("") };
    (text, Some(total))
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// The saturation tables of one results file: per workload, each target's highest sustained
/// rate, its latency and server CPU per message there, and why the next step fell short;
/// then Sluice ÷ peer ratios from the same run.
pub fn table(file: &ResultsFile) -> String {
    let mut out = String::new();
    let mut names: Vec<&str> = Vec::new();
    for s in &file.saturation {
        if !names.contains(&s.workload.name.as_str()) {
            names.push(&s.workload.name);
        }
    }
    for name in names {
        let rows: Vec<&Saturation> = file.saturation.iter().filter(|s| s.workload.name == name).collect();
        let w = &rows[0].workload;
        let (first, last) = (w.step_rates_per_sec.first().unwrap_or(&0), w.step_rates_per_sec.last().unwrap_or(&0));
        let _ = writeln!(
            out,
            "\n== {} · durability {} · {name} (saturation): {} B, {} producer(s), {} consumer(s), {} topic(s), \
             {first}…{last} msg/s in {} steps of {} s{} ==",
            if file.label.is_empty() { &file.suite } else { &file.label },
            file.durability,
            w.size_bytes,
            w.producers,
            w.consumers,
            w.topics,
            w.step_rates_per_sec.len(),
            w.duration_secs,
            if file.short { " (short)" } else { "" },
        );
        let what = if w.consumers > 0 { "send→receive" } else { "send→ack" };
        let cpu_width = rows.iter().filter_map(|s| s.sustained()).map(|st| server_cpu(st).0.chars().count()).max();
        let cpu_width = cpu_width.unwrap_or(0).max(CPU_COLUMN_MIN_CHARS);
        let _ = writeln!(
            out,
            "{:<20} {:>10} {:>9} │ {:>8} {:>8} │ {:<cpu_width$} │ stepping stopped",
            "target", "sustained", "measured", "p50 µs", "p99 µs", "server cpu µs/msg at that rate"
        );
        for s in &rows {
            let _ = writeln!(out, "{}", row(s, *last, cpu_width));
        }
        let _ = writeln!(out, "  latency: {what}, from each message's due time; * kept up only on its second attempt");
        let _ = write!(out, "{}", ratios(&rows));
    }
    out
}

/// The CPU column is at least this wide (the widest row widens it).
const CPU_COLUMN_MIN_CHARS: usize = 30;

fn row(s: &Saturation, last_rate: u64, cpu_width: usize) -> String {
    let stopped = s.stopped.clone().unwrap_or_else(|| format!("never: every step kept up (ceiling above {last_rate})"));
    let Some(step) = s.sustained() else {
        return format!(
            "{:<20} {:>10} {:>9} │ {:>8} {:>8} │ {:<cpu_width$} │ {stopped}",
            s.target, "none", "-", "-", "-", "-"
        );
    };
    let latency = step.send_receive.as_ref().unwrap_or(&step.send_ack);
    let second = if s.sustained_on_second_attempt() { "*" } else { "" };
    format!(
        "{:<20} {:>10} {:>9.0} │ {:>8.0} {:>8.0} │ {:<cpu_width$} │ {stopped}",
        s.target,
        format!("{}{second}", step.workload.rate_per_sec),
        step.send_throughput.msgs_per_sec,
        latency.p50_us,
        latency.p99_us,
        server_cpu(step).0,
    )
}

/// `a ÷ b` of two sustained rates, marked as a bound where a system's ceiling lies above
/// the last step (it never fell short); None when it says nothing.
fn rate_ratio(a: &Saturation, b: &Saturation) -> String {
    let (Some(ra), Some(rb)) = (a.sustained_per_sec, b.sustained_per_sec) else {
        return "-".into();
    };
    let bound = match (a.stopped.is_none(), b.stopped.is_none()) {
        (true, true) => return "-".into(),
        (true, false) => "≥",
        (false, true) => "≤",
        (false, false) => "",
    };
    format!("{bound}{}", ratio(ra as f64, rb as f64))
}

/// Sluice ÷ each peer: the sustained rates, and the server CPU per message at the highest
/// rate both kept up with (CPU per message changes with the rate, so the same one).
fn ratios(rows: &[&Saturation]) -> String {
    let mut out = String::new();
    let is_peer = |k: TargetKind| matches!(k, TargetKind::Nats | TargetKind::Redis);
    for s in rows.iter().filter(|s| s.kind.is_sluice()) {
        for p in rows.iter().filter(|p| is_peer(p.kind)) {
            let common = s.sustained_per_sec.min(p.sustained_per_sec);
            let cpu = |x: &Saturation| {
                common.and_then(|rate| x.kept_up_at(rate)).and_then(|step| server_cpu(step).1).unwrap_or(0.0)
            };
            let at = common.map_or("-".to_string(), |rate| format!("{rate} msg/s"));
            let _ = writeln!(
                out,
                "  {:<40} sustained rate {:>6} · server cpu/msg at {at} (both kept up) {:>5}",
                format!("{} ÷ {}, same run:", s.target, p.target),
                rate_ratio(s, p),
                ratio(cpu(s), cpu(p)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuUse;
    use crate::results::testing::{file, result, summary};
    use crate::workload::Suite;

    fn workload() -> Workload {
        let text = "name = \"s\"\n[[workload]]\nname = \"sat\"\nstep_rates_per_sec = [1000, 2000, 4000, 8000]\n";
        Suite::parse(text, "s").unwrap().workloads.remove(0)
    }

    fn spec(kind: TargetKind) -> TargetSpec {
        format!("{}=127.0.0.1:1", kind.name()).parse().unwrap()
    }

    /// A step at `rate` whose p99 is `p99_us`, charging `cpu_us` per message to one process.
    fn step(w: &Workload, kind: TargetKind, p99_us: u64, cpu_us: f64) -> RunResult {
        let mut r = result(w, kind, Some(summary(&[p99_us / 2, p99_us])));
        r.cpu = vec![
            CpuUse { process: "broker".into(), pid: 1, cpu_ms: 1.0, cpu_us_per_msg: cpu_us },
            CpuUse { process: CLIENT_PROCESS.into(), pid: 2, cpu_ms: 1.0, cpu_us_per_msg: 99.0 },
        ];
        r
    }

    #[test]
    fn a_step_falls_short_on_latency_errors_lag_or_loss() {
        let w = workload().at_rate(1000);
        let good = step(&w, TargetKind::Redis, 9_000, 1.0);
        assert_eq!(shortfall(&good), None);
        let slow = step(&w, TargetKind::Redis, 12_000, 1.0);
        assert!(shortfall(&slow).unwrap().contains("p99 12.0 ms is over 10 ms"));
        let mut failing = good.clone();
        failing.counts.send_errors = 3;
        assert!(shortfall(&failing).unwrap().contains("3 of 10 sends failed"));
        let mut acks_fail = good.clone();
        acks_fail.counts.ack_errors = 4;
        assert!(shortfall(&acks_fail).unwrap().contains("0 receives and 4 acks failed"));
        let mut redelivered = good.clone();
        redelivered.counts.duplicates = 6;
        assert!(shortfall(&redelivered).unwrap().contains("6 messages delivered again"));
        let mut behind = good.clone();
        behind.counts.unstarted = 5;
        assert!(shortfall(&behind).unwrap().contains("fell behind the schedule: 5"));
        let mut lossy = good.clone();
        lossy.counts.lost = 2;
        assert!(shortfall(&lossy).unwrap().contains("2 acked messages were not received"));
        let mut ack_only = good.clone();
        ack_only.send_receive = None;
        ack_only.send_ack = summary(&[20_000]);
        assert!(shortfall(&ack_only).unwrap().starts_with("send→ack p99 20.0 ms"));
    }

    #[tokio::test]
    async fn stepping_stops_at_the_first_step_that_falls_short() {
        let w = workload();
        let mut asked = Vec::new();
        let s = step_up(&spec(TargetKind::Redis), &w, |at: Workload| {
            asked.push(at.rate_per_sec);
            let p99_us = if at.rate_per_sec >= 4000 { 30_000 } else { 2_000 };
            let r = step(&at, TargetKind::Redis, p99_us, 10.0);
            async move { Ok(r) }
        })
        .await
        .unwrap();
        assert_eq!(asked, [1000, 2000, 4000, 4000], "4000 twice, then 8000 is never tried");
        assert_eq!(s.sustained_per_sec, Some(2000));
        assert_eq!(s.sustained().unwrap().workload.rate_per_sec, 2000);
        let stopped = s.stopped.as_deref().unwrap();
        assert!(stopped.starts_with("at 4000 msg/s: send→receive p99 30.0 ms"), "{stopped}");
        assert!(stopped.contains("; then send→receive p99 30.0 ms"), "both attempts' reasons: {stopped}");
    }

    #[tokio::test]
    async fn one_stall_is_run_again_and_does_not_end_the_stepping() {
        let w = workload();
        let mut runs = 0;
        let s = step_up(&spec(TargetKind::Redis), &w, |at: Workload| {
            runs += 1;
            // The first attempts at 2000 and at 8000 stall; their second attempts keep up.
            let p99_us = if runs == 2 || runs == 5 { 40_000 } else { 2_000 };
            let r = step(&at, TargetKind::Redis, p99_us, 10.0);
            async move { Ok(r) }
        })
        .await
        .unwrap();
        let rates: Vec<u64> = s.steps.iter().map(|r| r.workload.rate_per_sec).collect();
        assert_eq!(rates, [1000, 2000, 2000, 4000, 8000, 8000]);
        assert_eq!((s.sustained_per_sec, s.stopped.clone()), (Some(8000), None));
        assert!(s.sustained_on_second_attempt());
        let sustained = s.sustained().unwrap();
        assert!(sustained.send_receive.as_ref().unwrap().p99_us < 2_100.0, "the 8000 run that kept up, not the stall");
    }

    #[tokio::test]
    async fn every_step_kept_up_or_none_or_an_error() {
        let w = workload();
        let all = step_up(&spec(TargetKind::Nats), &w, |at: Workload| {
            let r = step(&at, TargetKind::Nats, 1_000, 1.0);
            async move { Ok(r) }
        })
        .await
        .unwrap();
        assert_eq!((all.sustained_per_sec, all.stopped.clone(), all.steps.len()), (Some(8000), None, 4));
        let none = step_up(&spec(TargetKind::Nats), &w, |at: Workload| {
            let r = step(&at, TargetKind::Nats, 50_000, 1.0);
            async move { Ok(r) }
        })
        .await
        .unwrap();
        assert_eq!((none.sustained_per_sec, none.steps.len()), (None, ATTEMPTS_PER_STEP));
        let first_fails =
            step_up(&spec(TargetKind::Nats), &w, |_| async { Err(BenchError::target("nats", "refused")) }).await;
        assert!(first_fails.is_err(), "a target that cannot run at all is a failure");
        let mut calls = 0;
        let later_fails = step_up(&spec(TargetKind::Nats), &w, |at: Workload| {
            calls += 1;
            let r = if calls == 1 {
                Ok(step(&at, TargetKind::Nats, 1_000, 1.0))
            } else {
                Err(BenchError::target("nats", "gone"))
            };
            async move { r }
        })
        .await
        .unwrap();
        assert_eq!(later_fails.sustained_per_sec, Some(1000));
        assert!(later_fails.stopped.unwrap().starts_with("at 2000 msg/s: error"));
        assert!(later_fails.error.unwrap().contains("gone"), "kept apart from a shortfall, for check");
    }

    #[test]
    fn the_table_names_the_ceiling_the_cpu_there_and_the_ratios() {
        let w = workload();
        // CPU per message falls as the rate rises (fixed costs spread thinner).
        let saturation = |kind: TargetKind, sustained: u64, cpu_us: fn(u64) -> f64| {
            let steps: Vec<RunResult> = w
                .step_rates_per_sec
                .iter()
                .filter(|r| **r <= sustained)
                .map(|r| step(&w.at_rate(*r), kind, 1_000, cpu_us(*r)))
                .collect();
            Saturation {
                workload: w.clone(),
                target: kind.name().into(),
                kind,
                steps,
                sustained_per_sec: Some(sustained),
                stopped: (sustained < 8000).then(|| "at the next: too slow".to_string()),
                error: None,
            }
        };
        let mut results = file(vec![]);
        let mut redis = saturation(TargetKind::Redis, 2000, |_| 10.0);
        // Its 2000 kept up on the second attempt, after a stall.
        redis.steps.insert(1, step(&w.at_rate(2000), TargetKind::Redis, 50_000, 10.0));
        results.saturation = vec![saturation(TargetKind::SluiceBroker, 8000, |r| 20.0 + r as f64 / 1000.0), redis];
        let text = table(&results);
        let broker = text.lines().find(|l| l.starts_with("sluice-broker")).unwrap();
        assert!(broker.contains(" 8000 ") && broker.contains("broker 28.0") && broker.contains("ceiling above 8000"));
        assert!(!broker.contains("99.0"), "the load generator's own CPU is left out: {broker}");
        let redis = text.lines().find(|l| l.starts_with("redis")).unwrap();
        assert!(redis.contains(" 2000* ") && redis.contains("at the next: too slow"), "{redis}");
        assert!(redis.contains(" 1000 "), "the p50 of the run that kept up, not of the stall: {redis}");
        let ratio = text.lines().find(|l| l.contains("sluice-broker ÷ redis")).unwrap();
        assert!(ratio.contains("sustained rate  ≥4.00"), "a lower bound: the broker never fell short: {ratio}");
        assert!(ratio.contains("at 2000 msg/s (both kept up)  2.20"), "CPU compared at the same rate: {ratio}");
        assert!(text.contains("latency: send→receive"));
    }
}
