//! Open-loop load: when each message is due, and the loop that starts it then.
//!
//! Message `g` of a run is due at `g / rate` seconds after the run's origin, whatever happened
//! to earlier messages. Producer `p` of `P` sends messages `p, p + P, p + 2P, …`, so together
//! they keep the fixed rate. Latency is measured from the due time (see
//! `Latency::record_since_due`): when the system stalls, or the in-flight limit makes the
//! producer wait, that wait is part of every delayed message's latency. This is the
//! coordinated-omission correction; a closed loop that timed only the service would hide it.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The run's time origin; every due and done time is nanoseconds since it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock { origin: Instant::now() }
    }

    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    pub fn at(&self, ns: u64) -> Instant {
        self.origin + std::time::Duration::from_nanos(ns)
    }
}

/// One producer's share of a run's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub rate_per_sec: u64,
    pub producers: u64,
    pub producer: u64,
    /// Messages in the whole run, all producers together.
    pub total: u64,
}

impl Schedule {
    pub fn new(rate_per_sec: u64, producers: u64, producer: u64, total: u64) -> Schedule {
        assert!(rate_per_sec > 0 && producers > 0 && producer < producers);
        Schedule { rate_per_sec, producers, producer, total }
    }

    /// How many messages this producer sends.
    pub fn count(&self) -> u64 {
        if self.producer >= self.total {
            return 0;
        }
        (self.total - self.producer).div_ceil(self.producers)
    }

    /// The run-wide sequence number of this producer's `k`-th message.
    pub fn sequence(&self, k: u64) -> u64 {
        k * self.producers + self.producer
    }

    /// When the message with run-wide `sequence` is due, in ns since the origin.
    pub fn due_ns(&self, sequence: u64) -> u64 {
        (u128::from(sequence) * 1_000_000_000 / u128::from(self.rate_per_sec)) as u64
    }
}

/// How one operation ended, in the run's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub sequence: u64,
    pub due_ns: u64,
    pub done_ns: u64,
    /// How late the generator itself woke for this operation (its own error, reported apart).
    pub wake_late_ns: u64,
    pub ok: bool,
}

/// How the loop waits for a due time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// tokio's timer: millisecond granularity, but follows a paused test clock.
    Tokio,
    /// The microsecond timer in `timer`, for real runs.
    Precise,
}

async fn wait_until(pacing: Pacing, at: Instant) {
    match pacing {
        Pacing::Tokio => tokio::time::sleep_until(at).await,
        Pacing::Precise => crate::timer::sleep_until(at.into_std()).await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenLoopOutcome {
    /// Operations started.
    pub started: u64,
    /// Operations never started because the deadline came first (the system fell behind).
    pub unstarted: u64,
    /// Operations started but not finished by the deadline.
    pub unfinished: u64,
}

/// Starts `operation(sequence)` for each of the schedule's messages at its due time, at most
/// `inflight_max` at once (beyond that the loop waits, and the wait is measured), and calls
/// `on_done` as each one finishes. Nothing starts after `deadline_ns`; then the loop waits for
/// those in flight until the deadline and gives up on the rest.
pub async fn open_loop<F, Fut, D>(
    schedule: Schedule,
    clock: Clock,
    pacing: Pacing,
    inflight_max: usize,
    deadline_ns: u64,
    mut operation: F,
    on_done: D,
) -> OpenLoopOutcome
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
    D: Fn(Completion) + Send + Sync + 'static,
{
    assert!(inflight_max > 0);
    let permits = Arc::new(Semaphore::new(inflight_max));
    let on_done = Arc::new(on_done);
    let count = schedule.count();
    let mut started = 0;
    for k in 0..count {
        let sequence = schedule.sequence(k);
        let due_ns = schedule.due_ns(sequence);
        if due_ns > deadline_ns {
            break;
        }
        wait_until(pacing, clock.at(due_ns)).await;
        let wake_late_ns = clock.now_ns().saturating_sub(due_ns);
        let acquire = tokio::time::timeout_at(clock.at(deadline_ns), permits.clone().acquire_owned());
        let Ok(Ok(permit)) = acquire.await else { break };
        let future: BoxFuture<'static, bool> = Box::pin(operation(sequence));
        let on_done = on_done.clone();
        tokio::spawn(async move {
            let ok = future.await;
            on_done(Completion { sequence, due_ns, done_ns: clock.now_ns(), wake_late_ns, ok });
            drop(permit);
        });
        started += 1;
    }
    let all = u32::try_from(inflight_max).unwrap_or(u32::MAX);
    let unfinished = match tokio::time::timeout_at(clock.at(deadline_ns), permits.acquire_many(all)).await {
        Ok(_) => 0,
        Err(_) => (inflight_max - permits.available_permits()) as u64,
    };
    OpenLoopOutcome { started, unstarted: count - started, unfinished }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Latency;
    use std::sync::Mutex;
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    #[test]
    fn producers_share_the_sequence_and_keep_the_rate() {
        let total = 10;
        let mut seen = Vec::new();
        for producer in 0..4 {
            let s = Schedule::new(1000, 4, producer, total);
            for k in 0..s.count() {
                seen.push(s.sequence(k));
                assert_eq!(s.due_ns(s.sequence(k)), s.sequence(k) * MS);
            }
        }
        assert_eq!([3, 3, 2, 2], [0, 1, 2, 3].map(|p| Schedule::new(1000, 4, p, total).count()));
        seen.sort_unstable();
        assert_eq!(seen, (0..total).collect::<Vec<_>>());
        // Producer 1 of 4 at 1000/s: due at 1, 5, 9 ms.
        let s = Schedule::new(1000, 4, 1, total);
        assert_eq!((0..3).map(|k| s.due_ns(s.sequence(k)) / MS).collect::<Vec<_>>(), [1, 5, 9]);
        // Rates that do not divide a second stay exact over long runs.
        assert_eq!(Schedule::new(3, 1, 0, 10).due_ns(3_000_000), 1_000_000 * 1_000_000_000);
        assert_eq!(Schedule::new(5, 8, 7, 3).count(), 0);
    }

    /// Runs 20 messages at 100/s (due every 10 ms) where message 0 takes 100 ms and every
    /// other one 1 ms, and returns each message's latency in ms, by sequence.
    async fn stalled_run(inflight_max: usize) -> (Vec<u64>, OpenLoopOutcome) {
        let clock = Clock::start();
        let done = Arc::new(Mutex::new(Vec::new()));
        let sink = done.clone();
        let outcome = open_loop(
            Schedule::new(100, 1, 0, 20),
            clock,
            Pacing::Tokio,
            inflight_max,
            10_000 * MS,
            |sequence| async move {
                let service_ms = if sequence == 0 { 100 } else { 1 };
                tokio::time::sleep(Duration::from_millis(service_ms)).await;
                true
            },
            move |c: Completion| sink.lock().unwrap().push(c),
        )
        .await;
        let mut done = done.lock().unwrap().clone();
        done.sort_by_key(|c| c.sequence);
        (done.iter().map(|c| (c.done_ns - c.due_ns) / MS).collect(), outcome)
    }

    #[tokio::test(start_paused = true)]
    async fn one_in_flight_charges_the_stall_to_every_message_behind_it() {
        let (latency_ms, outcome) = stalled_run(1).await;
        assert_eq!(outcome, OpenLoopOutcome { started: 20, unstarted: 0, unfinished: 0 });
        // Hand-computed: message k (1..=10) is due at 10k ms but starts when k-1 finishes, at
        // 100 + (k-1) ms, and ends 1 ms later: latency 100 - 9k ms. From k = 11 the producer
        // has caught up (due 110 ms, previous done at 110 ms): 1 ms each.
        let mut expected = vec![100];
        expected.extend((1..=10).map(|k| 100 - 9 * k));
        expected.extend([1; 9]);
        assert_eq!(latency_ms, expected);
        // The percentiles follow: p50 is rank 10 of 20 sorted values = 10 ms, max 100 ms;
        // timing the service alone would have said p50 = 1 ms.
        let mut latency = Latency::new();
        for ms in &latency_ms {
            latency.record_ns(ms * MS);
        }
        let s = latency.summary();
        assert!((s.p50_us - 10_000.0).abs() <= 10.0, "p50 {}", s.p50_us);
        assert!((s.p90_us - 82_000.0).abs() <= 82.0, "p90 {}", s.p90_us);
        assert!((s.max_us - 100_000.0).abs() <= 100.0, "max {}", s.max_us);
    }

    #[tokio::test(start_paused = true)]
    async fn with_room_in_flight_a_stall_delays_only_itself() {
        let (latency_ms, _) = stalled_run(64).await;
        let mut expected = vec![100];
        expected.extend([1; 19]);
        assert_eq!(latency_ms, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn precise_pacing_keeps_the_schedule_on_a_real_clock() {
        let clock = Clock::start();
        let done = Arc::new(Mutex::new(Vec::new()));
        let sink = done.clone();
        open_loop(
            Schedule::new(2000, 1, 0, 200),
            clock,
            Pacing::Precise,
            64,
            10_000 * MS,
            |_| async { true },
            move |c: Completion| sink.lock().unwrap().push(c),
        )
        .await;
        let done = done.lock().unwrap();
        assert_eq!(done.len(), 200);
        // Nothing starts before it is due (lateness is reported, never asserted: machines are noisy).
        assert!(done.iter().all(|c| c.done_ns >= c.due_ns && c.wake_late_ns <= c.done_ns - c.due_ns));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_bounds_a_system_that_never_answers() {
        let clock = Clock::start();
        let outcome = open_loop(
            Schedule::new(1000, 1, 0, 100),
            clock,
            Pacing::Tokio,
            4,
            50 * MS,
            |_| futures::future::pending::<bool>(),
            |_| {},
        )
        .await;
        // Four start (the in-flight limit), none finishes, the other 96 never start.
        assert_eq!(outcome, OpenLoopOutcome { started: 4, unstarted: 96, unfinished: 4 });
        assert!(clock.now_ns() <= 51 * MS);
    }
}
