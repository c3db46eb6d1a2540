//! The results file (JSON), its completeness check, and the summary table with ratios.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::cpu::CpuUse;
use crate::error::BenchError;
use crate::saturation::Saturation;
use crate::stats::{LatencySummary, Throughput};
use crate::targets::{DurabilityInfo, TargetKind};
use crate::workload::{DurabilityLevel, Suite, Workload};

/// Bumped whenever a field changes meaning or goes away.
pub const SCHEMA: &str = "sluice-bench/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultsFile {
    pub schema: String,
    /// Free text naming the run (e.g. a commit or a host).
    pub label: String,
    pub suite: String,
    pub durability: DurabilityLevel,
    pub short: bool,
    pub started_unix_ms: u64,
    pub host: Host,
    pub results: Vec<RunResult>,
    /// Saturation workloads, one entry per workload and target (absent in older files).
    #[serde(default)]
    pub saturation: Vec<Saturation>,
    pub failures: Vec<Failure>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Host {
    pub hostname: String,
    pub kernel: String,
    pub cpus: usize,
}

impl Host {
    pub fn this() -> Host {
        let read = |path: &str| std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default();
        Host {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A workload that could not run on a target, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub workload: String,
    pub target: String,
    pub code: u32,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    /// Messages the schedule called for (warm-up included).
    pub scheduled: u64,
    pub started: u64,
    pub acked: u64,
    pub send_errors: u64,
    /// Never started: the system fell so far behind that the run's deadline came first.
    pub unstarted: u64,
    /// Started but not acked by the deadline.
    pub unfinished: u64,
    /// Distinct messages received.
    pub received: u64,
    pub duplicates: u64,
    /// Bodies that were too short, the wrong size, or from outside the run.
    pub corrupt: u64,
    /// Acked but never received before the drain deadline.
    pub lost: u64,
    pub receive_errors: u64,
    pub ack_errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    pub workload: Workload,
    /// The target's label (`kind` or `kind@label`).
    pub target: String,
    pub kind: TargetKind,
    pub endpoint: String,
    /// How the client reached the system.
    pub path: String,
    pub durability: DurabilityInfo,
    pub counts: Counts,
    /// Send → acknowledged (for ping-pong targets: the round trip), from each message's due time.
    pub send_ack: LatencySummary,
    /// Send → received by a consumer, from the due time. None for ping-pong targets.
    pub send_receive: Option<LatencySummary>,
    /// How late the load generator woke for each message (its own timing error, included in
    /// the latencies above; small next to them or the run is not to be trusted).
    pub generator_lag: LatencySummary,
    pub send_throughput: Throughput,
    pub receive_throughput: Option<Throughput>,
    /// Server processes and this client, CPU time over the run per message acked.
    pub cpu: Vec<CpuUse>,
    pub elapsed_secs: f64,
    /// The first error seen, if any (counts above say how many).
    pub first_error: Option<String>,
}

impl ResultsFile {
    pub fn load(path: &std::path::Path) -> Result<ResultsFile, BenchError> {
        let bad = |why: String| BenchError::Results { path: path.display().to_string(), why };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if value.get("schema").and_then(|s| s.as_str()) != Some(SCHEMA) {
            return Err(bad(format!("not a {SCHEMA} results file")));
        }
        serde_json::from_value(value).map_err(|e| bad(format!("incomplete: {e}")))
    }

    pub fn save(&self, path: &std::path::Path) -> Result<(), BenchError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| BenchError::Results { path: path.display().to_string(), why: e.to_string() })?;
        std::fs::write(path, text + "\n")?;
        Ok(())
    }
}

fn summary_problems(name: &str, s: &LatencySummary, problems: &mut Vec<String>) {
    if s.count == 0 {
        problems.push(format!("{name}: no samples"));
    }
    let ordered = [s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.p9999_us, s.max_us];
    if ordered.iter().any(|v| !v.is_finite() || *v < 0.0) || s.count > 0 && ordered.windows(2).any(|w| w[0] > w[1]) {
        problems.push(format!("{name}: percentiles are not finite and ascending: {ordered:?}"));
    }
    if s.spectrum_us.len() != crate::stats::SPECTRUM_QUANTILES.len() {
        problems.push(format!("{name}: the percentile spectrum has {} points", s.spectrum_us.len()));
    }
}

/// Everything wrong with a results file as the result of running `suite` on targets of
/// `kinds`: missing or duplicate results, failures, empty histograms, lost or corrupt
/// messages. Latency values themselves are never judged.
pub fn check(file: &ResultsFile, suite: &Suite, kinds: &[TargetKind]) -> Vec<String> {
    let mut problems = Vec::new();
    for f in &file.failures {
        problems.push(format!("{} on {}: failed with {}: {}", f.workload, f.target, f.code, f.error));
    }
    for workload in &suite.workloads {
        for kind in kinds.iter().filter(|k| workload.runs_on(k.name())) {
            if workload.is_saturation() {
                saturation_problems(file, workload, *kind, &mut problems);
                continue;
            }
            let found: Vec<&RunResult> =
                file.results.iter().filter(|r| r.workload.name == workload.name && r.kind == *kind).collect();
            if found.is_empty() {
                problems.push(format!("{} on {}: no result", workload.name, kind.name()));
            }
            for r in found {
                // A peer's losses are its result, reported by `peer_losses`, not a defect here.
                let judge_lost = !is_peer(r.kind);
                result_problems(&format!("{} on {}", workload.name, r.target), r, judge_lost, &mut problems);
            }
        }
    }
    problems
}

/// Messages a peer (NATS, Redis) acked and did not deliver within the drain, per result. They
/// are a measurement of the peer, marked in the summary table, so `check` does not count them
/// as problems: CI judges Sluice's results, and a peer that falls behind on a loaded machine
/// must not fail it. A Sluice target that loses a message always fails the check.
pub fn peer_losses(file: &ResultsFile) -> Vec<String> {
    file.results
        .iter()
        .filter(|r| is_peer(r.kind) && r.counts.lost > 0)
        .map(|r| {
            format!(
                "{} on {}: {} of {} acked messages not received within {} s of the end",
                r.workload.name,
                r.target,
                r.counts.lost,
                r.counts.acked,
                crate::driver::DRAIN_SECS
            )
        })
        .collect()
}

/// A saturation workload must have run at least one step without a harness error, and each
/// step that kept up must be sound. A step that fell short (lost messages, failed sends, no
/// samples at all) is a result, and the table says why; only corruption is judged there too.
fn saturation_problems(file: &ResultsFile, workload: &Workload, kind: TargetKind, problems: &mut Vec<String>) {
    let found: Vec<&Saturation> =
        file.saturation.iter().filter(|s| s.workload.name == workload.name && s.kind == kind).collect();
    if found.is_empty() {
        problems.push(format!("{} on {}: no saturation result", workload.name, kind.name()));
    }
    for s in found {
        if s.steps.is_empty() {
            problems.push(format!("{} on {}: no step ran", workload.name, s.target));
        }
        if let Some(error) = &s.error {
            problems.push(format!("{} on {}: stepping ended on an error {error}", workload.name, s.target));
        }
        for step in &s.steps {
            let at = format!("{} on {} at {} msg/s", workload.name, s.target, step.workload.rate_per_sec);
            if crate::saturation::shortfall(step).is_none() {
                result_problems(&at, step, true, problems);
            } else if step.counts.corrupt > 0 {
                problems.push(format!("{at}: {} corrupt messages", step.counts.corrupt));
            }
        }
    }
}

fn result_problems(at: &str, r: &RunResult, judge_lost: bool, problems: &mut Vec<String>) {
    let c = &r.counts;
    if c.acked == 0 || c.acked > c.started || c.started > c.scheduled {
        problems.push(format!("{at}: counts do not add up: {c:?}"));
    }
    if judge_lost && c.lost > 0 || c.corrupt > 0 {
        problems.push(format!("{at}: {} lost and {} corrupt messages", c.lost, c.corrupt));
    }
    summary_problems(&format!("{at} send→ack"), &r.send_ack, problems);
    summary_problems(&format!("{at} generator lag"), &r.generator_lag, problems);
    let consumes = !r.kind.is_pingpong() && r.workload.consumers > 0;
    match (&r.send_receive, consumes) {
        (Some(s), true) => summary_problems(&format!("{at} send→receive"), s, problems),
        (None, true) => problems.push(format!("{at}: no send→receive latency")),
        _ => {}
    }
    if r.durability.detail.is_empty() {
        problems.push(format!("{at}: durability not recorded"));
    }
}

fn fmt_us(v: f64) -> String {
    if v >= 100.0 {
        format!("{:.0}", v)
    } else {
        format!("{:.1}", v)
    }
}

fn cell(s: Option<&LatencySummary>, quantile: &str) -> String {
    s.and_then(|s| s.named(quantile)).map_or("-".to_string(), fmt_us)
}

/// The peers a Sluice target is compared with.
fn is_peer(kind: TargetKind) -> bool {
    matches!(kind, TargetKind::Nats | TargetKind::Redis)
}

/// The summary table: one block per (results file, workload), every target's percentiles,
/// then Sluice ÷ peer and Sluice ÷ floor ratios from the same run.
pub fn summary_table(files: &[ResultsFile]) -> String {
    let mut out = String::new();
    for file in files {
        let mut workloads: Vec<&Workload> = Vec::new();
        for r in &file.results {
            if !workloads.iter().any(|w| w.name == r.workload.name) {
                workloads.push(&r.workload);
            }
        }
        for w in workloads {
            let _ = writeln!(
                out,
                "\n== {} · durability {} · {}: {} B at {} msg/s, {} producer(s), {} consumer(s), {} topic(s), {} s{} ==",
                if file.label.is_empty() { &file.suite } else { &file.label },
                file.durability,
                w.name,
                w.size_bytes,
                w.rate_per_sec,
                w.producers,
                w.consumers,
                w.topics,
                w.duration_secs,
                if file.short { " (short)" } else { "" },
            );
            let _ = writeln!(
                out,
                "{:<20} {:>8} │ {:>8} {:>8} {:>9} │ {:>8} {:>8} {:>9} {:>9} {:>9} │ {:>9} {:>8}",
                "target µs",
                "msgs/s",
                "ack p50",
                "ack p99",
                "ack p99.9",
                "e2e p50",
                "e2e p99",
                "e2e p99.9",
                "e2e p99.99",
                "e2e max",
                "cpu µs/msg",
                "lag p99"
            );
            let rows: Vec<&RunResult> = file.results.iter().filter(|r| r.workload.name == w.name).collect();
            for r in &rows {
                let cpu: f64 =
                    r.cpu.iter().filter(|c| c.process != crate::cpu::CLIENT_PROCESS).map(|c| c.cpu_us_per_msg).sum();
                let e2e = r.send_receive.as_ref();
                let _ = writeln!(
                    out,
                    "{:<20} {:>8.0} │ {:>8} {:>8} {:>9} │ {:>8} {:>8} {:>9} {:>9} {:>9} │ {:>9} {:>8}",
                    r.target,
                    r.send_throughput.msgs_per_sec,
                    cell(Some(&r.send_ack), "p50"),
                    cell(Some(&r.send_ack), "p99"),
                    cell(Some(&r.send_ack), "p99.9"),
                    cell(e2e, "p50"),
                    cell(e2e, "p99"),
                    cell(e2e, "p99.9"),
                    cell(e2e, "p99.99"),
                    cell(e2e, "max"),
                    if r.kind.server_processes().is_empty() || r.cpu.len() <= 1 {
                        "-".to_string()
                    } else {
                        format!("{cpu:.1}")
                    },
                    cell(Some(&r.generator_lag), "p99"),
                );
            }
            for r in &rows {
                let lossy = r.counts.lost + r.counts.corrupt + r.counts.send_errors + r.counts.unstarted;
                let _ = writeln!(
                    out,
                    "  {:<18} durability: {}{}",
                    r.target,
                    r.durability.detail,
                    if lossy > 0 { format!("  [!] {:?}", r.counts) } else { String::new() }
                );
            }
            let _ = write!(out, "{}", ratios(&rows));
        }
        out.push_str(&crate::saturation::table(file));
        for f in &file.failures {
            let _ = writeln!(out, "  FAILED {} on {}: [{}] {}", f.workload, f.target, f.code, f.error);
        }
    }
    out
}

fn ratio(a: f64, b: f64) -> String {
    if b <= 0.0 {
        "-".to_string()
    } else {
        format!("{:.2}", a / b)
    }
}

fn ratios(rows: &[&RunResult]) -> String {
    let mut out = String::new();
    let sluice: Vec<&&RunResult> = rows.iter().filter(|r| r.kind.is_sluice()).collect();
    let peers: Vec<&&RunResult> = rows.iter().filter(|r| is_peer(r.kind)).collect();
    let floors: Vec<&&RunResult> = rows.iter().filter(|r| r.kind.is_pingpong()).collect();
    if sluice.is_empty() || peers.is_empty() && floors.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "  ratios, same run (below 1: Sluice is faster)      ack p50  ack p99  e2e p50  e2e p99  e2e p99.9"
    );
    for s in &sluice {
        for p in &peers {
            let e2e = |r: &RunResult, q: &str| r.send_receive.as_ref().and_then(|l| l.named(q)).unwrap_or(0.0);
            let _ = writeln!(
                out,
                "  {:<47} {:>7} {:>8} {:>8} {:>8} {:>10}",
                format!("{} ÷ {}", s.target, p.target),
                ratio(s.send_ack.p50_us, p.send_ack.p50_us),
                ratio(s.send_ack.p99_us, p.send_ack.p99_us),
                ratio(e2e(s, "p50"), e2e(p, "p50")),
                ratio(e2e(s, "p99"), e2e(p, "p99")),
                ratio(e2e(s, "p99.9"), e2e(p, "p99.9")),
            );
        }
        for f in &floors {
            let _ = writeln!(
                out,
                "  {:<47} {:>7} {:>8}",
                format!("{} ÷ {} (floor)", s.target, f.target),
                ratio(s.send_ack.p50_us, f.send_ack.p50_us),
                ratio(s.send_ack.p99_us, f.send_ack.p99_us),
            );
        }
    }
    out
}

/// Results made up for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::stats::Latency;

    pub fn summary(values_us: &[u64]) -> LatencySummary {
        let mut l = Latency::new();
        for v in values_us {
            l.record_ns(v * 1000);
        }
        l.summary()
    }

    pub fn result(workload: &Workload, kind: TargetKind, e2e: Option<LatencySummary>) -> RunResult {
        RunResult {
            workload: workload.clone(),
            target: kind.name().into(),
            kind,
            endpoint: String::new(),
            path: String::new(),
            durability: DurabilityInfo { level: None, detail: "x".into() },
            counts: Counts { scheduled: 10, started: 10, acked: 10, received: 10, ..Default::default() },
            send_ack: summary(&[100, 200]),
            send_receive: e2e,
            generator_lag: summary(&[1]),
            send_throughput: crate::stats::throughput(10, 16, 1.0),
            receive_throughput: None,
            cpu: vec![],
            elapsed_secs: 1.0,
            first_error: None,
        }
    }

    pub fn file(results: Vec<RunResult>) -> ResultsFile {
        ResultsFile {
            schema: SCHEMA.into(),
            label: String::new(),
            suite: "s".into(),
            durability: DurabilityLevel::Sync,
            short: false,
            started_unix_ms: 0,
            host: Host::this(),
            results,
            saturation: vec![],
            failures: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{result, summary};
    use super::*;

    #[test]
    fn check_finds_missing_incomplete_and_lossy_results() {
        let suite = Suite::parse("name = \"s\"\n[[workload]]\nname = \"w\"\n", "s").unwrap();
        let w = &suite.workloads[0];
        let mut file = ResultsFile {
            schema: SCHEMA.into(),
            label: String::new(),
            suite: "s".into(),
            durability: DurabilityLevel::Sync,
            short: true,
            started_unix_ms: 0,
            host: Host::this(),
            results: vec![result(w, TargetKind::Redis, Some(summary(&[300]))), result(w, TargetKind::RawTcp, None)],
            saturation: vec![],
            failures: vec![],
        };
        assert!(check(&file, &suite, &[TargetKind::Redis, TargetKind::RawTcp]).is_empty());
        let missing = check(&file, &suite, &[TargetKind::Redis, TargetKind::Nats]);
        assert_eq!(missing, ["w on nats: no result"]);
        file.results[0].send_receive = None;
        file.results[1].counts.lost = 2;
        let problems = check(&file, &suite, &[TargetKind::Redis, TargetKind::RawTcp]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("no send→receive") && problems[1].contains("2 lost"));
        assert!(peer_losses(&file).is_empty(), "raw-tcp is not a peer");
        // A peer's losses are reported apart and do not fail the check; corruption does.
        file.results[0].send_receive = Some(summary(&[300]));
        file.results[1].counts.lost = 0;
        file.results[0].counts.lost = 3;
        assert!(check(&file, &suite, &[TargetKind::Redis, TargetKind::RawTcp]).is_empty());
        assert_eq!(peer_losses(&file), ["w on redis: 3 of 10 acked messages not received within 10 s of the end"]);
        file.results[0].counts.corrupt = 1;
        assert_eq!(check(&file, &suite, &[TargetKind::Redis, TargetKind::RawTcp]).len(), 1);
        // A round trip through JSON keeps everything.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        file.save(&path).unwrap();
        assert_eq!(ResultsFile::load(&path).unwrap(), file);
        std::fs::write(&path, "{\"schema\": \"sluice-bench/1\"}").unwrap();
        assert!(ResultsFile::load(&path).unwrap_err().to_string().contains("incomplete"));
    }

    #[test]
    fn check_wants_a_sound_saturation_result_per_kind() {
        let text = "name = \"s\"\n[[workload]]\nname = \"sat\"\nstep_rates_per_sec = [1000, 2000]\n";
        let suite = Suite::parse(text, "s").unwrap();
        let w = &suite.workloads[0];
        let mut file = super::testing::file(vec![]);
        assert_eq!(check(&file, &suite, &[TargetKind::Redis]), ["sat on redis: no saturation result"]);
        let step = |rate: u64, lost: u64| {
            let mut r = result(&w.at_rate(rate), TargetKind::Redis, Some(summary(&[300])));
            r.counts.lost = lost;
            r
        };
        file.saturation.push(Saturation {
            workload: w.clone(),
            target: "redis".into(),
            kind: TargetKind::Redis,
            steps: vec![step(1000, 0), step(2000, 7)],
            sustained_per_sec: Some(1000),
            stopped: Some("at 2000 msg/s: 7 acked messages were not received".into()),
            error: None,
        });
        assert!(check(&file, &suite, &[TargetKind::Redis]).is_empty(), "the step that fell short may lose messages");
        file.saturation[0].steps[1].counts.acked = 0;
        file.saturation[0].steps[1].send_receive = Some(summary(&[]));
        assert!(check(&file, &suite, &[TargetKind::Redis]).is_empty(), "or ack nothing and measure nothing");
        file.saturation[0].steps[1].counts.corrupt = 1;
        file.saturation[0].steps[0].send_ack = summary(&[]);
        let problems = check(&file, &suite, &[TargetKind::Redis]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("sat on redis at 1000 msg/s send→ack: no samples"), "{problems:?}");
        assert_eq!(problems[1], "sat on redis at 2000 msg/s: 1 corrupt messages");
        file.saturation[0].error = Some("at 4000 msg/s: error 6002: gone".into());
        assert!(check(&file, &suite, &[TargetKind::Redis]).iter().any(|p| p.contains("ended on an error")));
        file.saturation[0].steps.clear();
        file.saturation[0].error = None;
        assert_eq!(check(&file, &suite, &[TargetKind::Redis]), ["sat on redis: no step ran"]);
    }

    #[test]
    fn the_table_holds_ratios_against_peers_and_floors() {
        let suite = Suite::parse("name = \"s\"\n[[workload]]\nname = \"w\"\n", "s").unwrap();
        let w = &suite.workloads[0];
        let mut sluice = result(w, TargetKind::SluiceGrpc, Some(summary(&[400])));
        sluice.send_ack = summary(&[300]);
        let mut redis = result(w, TargetKind::Redis, Some(summary(&[200])));
        redis.send_ack = summary(&[100]);
        let mut raw = result(w, TargetKind::RawTcp, None);
        raw.send_ack = summary(&[30]);
        let file = ResultsFile {
            schema: SCHEMA.into(),
            label: "t".into(),
            suite: "s".into(),
            durability: DurabilityLevel::Sync,
            short: false,
            started_unix_ms: 0,
            host: Host::this(),
            results: vec![raw, sluice, redis],
            saturation: vec![],
            failures: vec![],
        };
        let table = summary_table(&[file]);
        let line = table.lines().find(|l| l.contains("sluice-grpc ÷ redis")).unwrap();
        let numbers: Vec<&str> = line.split_whitespace().skip(3).collect();
        assert_eq!(numbers, ["3.00", "3.00", "2.00", "2.00", "2.00"]);
        let floor = table.lines().find(|l| l.contains("sluice-grpc ÷ raw-tcp (floor)")).unwrap();
        assert_eq!(floor.split_whitespace().skip(4).collect::<Vec<_>>(), ["10.00", "10.00"]);
    }
}
