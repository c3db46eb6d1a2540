//! Runs one workload on one target: open-loop producers, consumers, counting, histograms.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cpu::{CpuMeter, NamedPid};
use crate::error::BenchError;
use crate::results::{Counts, RunResult};
use crate::schedule::{open_loop, Clock, Completion, Pacing, Schedule};
use crate::stats::{throughput, Latency};
use crate::targets::{self, message_body, Consumer, Delivered, RunNames, TargetSpec};
use crate::workload::{DurabilityLevel, Workload};

/// After the last message is due, how long acks and deliveries may still arrive.
pub const DRAIN_SECS: u64 = 10;
/// How long a consumer may take to notice the run ended (one receive wait, and then some).
const CONSUMER_STOP_MS: u64 = targets::RECEIVE_WAIT_MS + 2000;
/// Pause after a failed receive, so a broken target is not hammered.
const RECEIVE_RETRY_MS: u64 = 50;

/// One bit per message of the run.
struct Bits {
    words: Vec<u64>,
}

impl Bits {
    fn new(count: u64) -> Bits {
        Bits { words: vec![0; count.div_ceil(64) as usize] }
    }

    /// Sets bit `i`; true if it was clear.
    fn set(&mut self, i: u64) -> bool {
        let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
        let was_clear = self.words[word] & bit == 0;
        self.words[word] |= bit;
        was_clear
    }

    /// Bits set here and clear in `other`.
    fn count_missing_from(&self, other: &Bits) -> u64 {
        self.words.iter().zip(&other.words).map(|(a, b)| u64::from((a & !b).count_ones())).sum()
    }
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    acked: AtomicU64,
    send_errors: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    corrupt: AtomicU64,
    receive_errors: AtomicU64,
    ack_errors: AtomicU64,
    measured_acked: AtomicU64,
    measured_received: AtomicU64,
    last_ack_ns: AtomicU64,
    last_receive_ns: AtomicU64,
}

struct RunState {
    workload: Workload,
    total: u64,
    warmup_ns: u64,
    counters: Counters,
    acked: Mutex<Bits>,
    seen: Mutex<Bits>,
    send_ack: Mutex<Latency>,
    send_receive: Mutex<Latency>,
    wake_late: Mutex<Latency>,
    first_error: Mutex<Option<String>>,
    stop: AtomicBool,
    progress: ProgressBar,
}

impl RunState {
    fn error(&self, error: &BenchError) {
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert_with(|| error.to_string());
        }
    }

    fn sent(&self, c: Completion) {
        self.progress.inc(1);
        if let Ok(mut h) = self.wake_late.lock() {
            h.record_ns(c.wake_late_ns);
        }
        if !c.ok {
            self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counters.acked.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut acked) = self.acked.lock() {
            acked.set(c.sequence);
        }
        if c.due_ns >= self.warmup_ns {
            if let Ok(mut h) = self.send_ack.lock() {
                h.record_since_due(c.due_ns, c.done_ns);
            }
            self.counters.measured_acked.fetch_add(1, Ordering::Relaxed);
            self.counters.last_ack_ns.fetch_max(c.done_ns, Ordering::Relaxed);
        }
    }

    fn delivered(&self, delivered: Option<Delivered>, now_ns: u64) {
        let Some(d) = delivered.filter(|d| d.sequence < self.total && d.body_len == self.workload.size_bytes) else {
            self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let first = self.seen.lock().map(|mut seen| seen.set(d.sequence)).unwrap_or(false);
        if !first {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        if d.due_ns >= self.warmup_ns {
            if let Ok(mut h) = self.send_receive.lock() {
                h.record_since_due(d.due_ns, now_ns);
            }
            self.counters.measured_received.fetch_add(1, Ordering::Relaxed);
            self.counters.last_receive_ns.fetch_max(now_ns, Ordering::Relaxed);
        }
    }
}

async fn consume(mut consumer: Box<dyn Consumer>, clock: Clock, state: Arc<RunState>) {
    while !state.stop.load(Ordering::Relaxed) {
        match consumer.receive().await {
            Ok(batch) => {
                let now_ns = clock.now_ns();
                for d in batch {
                    state.delivered(d, now_ns);
                }
                if let Err(e) = consumer.ack().await {
                    state.counters.ack_errors.fetch_add(1, Ordering::Relaxed);
                    state.error(&e);
                }
            }
            Err(e) => {
                state.counters.receive_errors.fetch_add(1, Ordering::Relaxed);
                state.error(&e);
                tokio::time::sleep(Duration::from_millis(RECEIVE_RETRY_MS)).await;
            }
        }
    }
}

fn progress_bar(spec: &TargetSpec, workload: &Workload, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{prefix:>32} [{bar:30}] {pos}/{len} sent · {elapsed} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("{} on {}", workload.name, spec.label));
    bar
}

/// Runs `workload` on `spec` at durability `level` and returns its result. `processes` are the
/// server processes to charge CPU time to (by the names the target kind uses).
pub async fn run(
    spec: &TargetSpec,
    workload: &Workload,
    level: DurabilityLevel,
    processes: &[NamedPid],
    nonce: u64,
) -> Result<RunResult, BenchError> {
    workload.validate()?;
    let names = RunNames::new(workload, nonce);
    let mut session = targets::open(spec, workload, &names, level).await?;
    let total = workload.total_messages();
    let state = Arc::new(RunState {
        workload: workload.clone(),
        total,
        warmup_ns: workload.warmup_secs * 1_000_000_000,
        counters: Counters::default(),
        acked: Mutex::new(Bits::new(total)),
        seen: Mutex::new(Bits::new(total)),
        send_ack: Mutex::new(Latency::new()),
        send_receive: Mutex::new(Latency::new()),
        wake_late: Mutex::new(Latency::new()),
        first_error: Mutex::new(None),
        stop: AtomicBool::new(false),
        progress: progress_bar(spec, workload, total),
    });
    let mut charged = charged_processes(spec, processes);
    charged.push(NamedPid { name: crate::cpu::CLIENT_PROCESS.into(), pid: std::process::id() });
    let cpu = CpuMeter::start(&charged);
    let clock = Clock::start();
    let consumers: Vec<_> =
        session.consumers.drain(..).map(|c| tokio::spawn(consume(c, clock, state.clone()))).collect();
    let end_ns = (workload.warmup_secs + workload.duration_secs) * 1_000_000_000;
    let deadline_ns = end_ns + DRAIN_SECS * 1_000_000_000;
    let producers: Vec<_> = session
        .producers
        .iter()
        .enumerate()
        .map(|(p, producer)| {
            let schedule = Schedule::new(workload.rate_per_sec, workload.producers.into(), p as u64, total);
            let (producer, state, sink) = (producer.clone(), state.clone(), state.clone());
            let (size, topics) = (workload.size_bytes, workload.topics as u64);
            tokio::spawn(open_loop(
                schedule,
                clock,
                Pacing::Precise,
                workload.inflight_max,
                deadline_ns,
                move |sequence| {
                    state.counters.started.fetch_add(1, Ordering::Relaxed);
                    let send = producer.send(
                        (sequence % topics) as usize,
                        sequence,
                        message_body(size, schedule.due_ns(sequence), sequence),
                    );
                    let state = state.clone();
                    async move {
                        match send.await {
                            Ok(()) => true,
                            Err(e) => {
                                state.error(&e);
                                false
                            }
                        }
                    }
                },
                move |c| sink.sent(c),
            ))
        })
        .collect();
    let (mut unstarted, mut unfinished) = (0, 0);
    for producer in producers {
        let outcome = producer.await.map_err(|e| BenchError::target(&spec.label, format!("producer task: {e}")))?;
        unstarted += outcome.unstarted;
        unfinished += outcome.unfinished;
    }
    if !consumers.is_empty() {
        while state.counters.received.load(Ordering::Relaxed) < state.counters.acked.load(Ordering::Relaxed)
            && clock.now_ns() < deadline_ns
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    state.stop.store(true, Ordering::Relaxed);
    for consumer in consumers {
        let abort = consumer.abort_handle();
        if tokio::time::timeout(Duration::from_millis(CONSUMER_STOP_MS), consumer).await.is_err() {
            abort.abort();
        }
    }
    let elapsed_secs = clock.now_ns() as f64 / 1e9;
    state.progress.finish_and_clear();
    let c = &state.counters;
    let acked = c.acked.load(Ordering::Relaxed);
    let cpu = cpu.finish(acked);
    if let Err(e) = session.teardown().await {
        tracing::warn!(target = %spec.label, error = %e, "cleaning up after the run failed");
    }
    let consumes = workload.consumers > 0 && !spec.kind.is_pingpong();
    let lost = if consumes {
        let acked_bits = state.acked.lock().map_err(|_| BenchError::target(&spec.label, "poisoned"))?;
        let seen_bits = state.seen.lock().map_err(|_| BenchError::target(&spec.label, "poisoned"))?;
        acked_bits.count_missing_from(&seen_bits)
    } else {
        0
    };
    let window_secs =
        |last_ns: u64| ((last_ns.saturating_sub(state.warmup_ns)) as f64 / 1e9).max(workload.duration_secs as f64);
    let lock_summary = |h: &Mutex<Latency>| h.lock().map(|h| h.summary()).unwrap_or_else(|_| Latency::new().summary());
    Ok(RunResult {
        workload: workload.clone(),
        target: spec.label.clone(),
        kind: spec.kind,
        endpoint: spec.endpoint.clone(),
        path: session.path.clone(),
        durability: session.durability.clone(),
        counts: Counts {
            scheduled: total,
            started: c.started.load(Ordering::Relaxed),
            acked,
            send_errors: c.send_errors.load(Ordering::Relaxed),
            unstarted,
            unfinished,
            received: c.received.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            lost,
            receive_errors: c.receive_errors.load(Ordering::Relaxed),
            ack_errors: c.ack_errors.load(Ordering::Relaxed),
        },
        send_ack: lock_summary(&state.send_ack),
        send_receive: consumes.then(|| lock_summary(&state.send_receive)),
        generator_lag: lock_summary(&state.wake_late),
        send_throughput: throughput(
            c.measured_acked.load(Ordering::Relaxed),
            workload.size_bytes,
            window_secs(c.last_ack_ns.load(Ordering::Relaxed)),
        ),
        receive_throughput: consumes.then(|| {
            throughput(
                c.measured_received.load(Ordering::Relaxed),
                workload.size_bytes,
                window_secs(c.last_receive_ns.load(Ordering::Relaxed)),
            )
        }),
        cpu,
        elapsed_secs,
        first_error: state.first_error.lock().ok().and_then(|e| e.clone()),
    })
}

/// The server processes a target's run is charged for: for a target labelled `kind@L`, the
/// process given as `NAME@L` when there is one (a second broker, say), else `NAME`.
fn charged_processes(spec: &TargetSpec, processes: &[NamedPid]) -> Vec<NamedPid> {
    let label = spec.label.split_once('@').map(|(_, label)| label);
    let named = |name: &str| processes.iter().find(|p| p.name == name);
    spec.kind
        .server_processes()
        .iter()
        .filter_map(|name| label.and_then(|l| named(&format!("{name}@{l}"))).or_else(|| named(name)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_find_acked_messages_never_seen() {
        let (mut acked, mut seen) = (Bits::new(130), Bits::new(130));
        for i in [0, 63, 64, 129] {
            assert!(acked.set(i));
        }
        assert!(!acked.set(63));
        seen.set(0);
        seen.set(129);
        seen.set(5);
        assert_eq!(acked.count_missing_from(&seen), 2);
    }

    #[test]
    fn a_labelled_target_is_charged_for_its_own_processes() {
        let pids: Vec<NamedPid> =
            ["broker=1", "proxy=2", "broker@nometrics=3", "redis=4"].iter().map(|p| p.parse().unwrap()).collect();
        let charged = |target: &str| -> Vec<u32> {
            charged_processes(&target.parse().unwrap(), &pids).iter().map(|p| p.pid).collect()
        };
        assert_eq!(charged("sluice-grpc=127.0.0.1:1"), vec![1, 2]);
        assert_eq!(charged("sluice-grpc@nometrics=127.0.0.1:1"), vec![3, 2], "no proxy@nometrics: the proxy");
        assert_eq!(charged("sluice-broker@tcp=tcp://127.0.0.1:1"), vec![1]);
    }
}
