//! A high-resolution timer for the load generator.
//!
//! Tokio's timer wheel has 1 ms granularity, so a task sleeping until a message's due time
//! wakes up to a millisecond late, and because latency counts from the due time that slack
//! would be charged to the system under test. Here one thread, with its timer slack set to
//! 1 ns, sleeps on a condition variable until the earliest deadline and wakes that task.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

struct Slot {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

struct Entry {
    deadline: Instant,
    order: u64,
    slot: Arc<Slot>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.order) == (other.deadline, other.order)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.order).cmp(&(other.deadline, other.order))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Entry>>,
    next_order: u64,
}

struct Timer {
    queue: Mutex<Queue>,
    changed: Condvar,
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::new(Timer { queue: Mutex::default(), changed: Condvar::new() }));
        let spawned = std::thread::Builder::new().name("bench-timer".into()).spawn(move || run(timer));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the precise timer thread; sleeps will never end");
        }
        timer
    })
}

fn run(timer: &'static Timer) {
    // Without this the kernel may defer each wake-up by the default 50 µs slack.
    let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
    let Ok(mut queue) = timer.queue.lock() else { return };
    loop {
        let now = Instant::now();
        let next = queue.heap.peek().map(|Reverse(e)| e.deadline);
        match next {
            None => {
                queue = match timer.changed.wait(queue) {
                    Ok(q) => q,
                    Err(_) => return,
                }
            }
            Some(deadline) if deadline <= now => {
                if let Some(Reverse(entry)) = queue.heap.pop() {
                    entry.slot.fired.store(true, Ordering::Release);
                    if let Some(waker) = entry.slot.waker.lock().ok().and_then(|mut w| w.take()) {
                        waker.wake();
                    }
                }
            }
            Some(deadline) => {
                queue = match timer.changed.wait_timeout(queue, deadline - now) {
                    Ok((q, _)) => q,
                    Err(_) => return,
                }
            }
        }
    }
}

/// Completes at `deadline` (within microseconds, not tokio's millisecond).
pub fn sleep_until(deadline: Instant) -> SleepUntil {
    SleepUntil { deadline, slot: None }
}

pub struct SleepUntil {
    deadline: Instant,
    slot: Option<Arc<Slot>>,
}

impl Future for SleepUntil {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline || self.slot.as_ref().is_some_and(|s| s.fired.load(Ordering::Acquire)) {
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        let slot = self
            .slot
            .get_or_insert_with(|| {
                let slot = Arc::new(Slot { fired: AtomicBool::new(false), waker: Mutex::new(None) });
                let timer = timer();
                if let Ok(mut queue) = timer.queue.lock() {
                    let order = queue.next_order;
                    queue.next_order += 1;
                    queue.heap.push(Reverse(Entry { deadline, order, slot: slot.clone() }));
                    timer.changed.notify_one();
                }
                slot
            })
            .clone();
        if let Ok(mut waker) = slot.waker.lock() {
            *waker = Some(cx.waker().clone());
        }
        // The timer may have fired between the check above and storing the waker.
        if slot.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // One thread: woken tasks run in the order the timer thread woke them, so the order seen
    // is the timer's and not a race between worker threads on a busy machine.
    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_end_in_deadline_order_and_never_early() {
        let start = Instant::now();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, us) in [3000u64, 1000, 2000, 500].into_iter().enumerate() {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let deadline = start + Duration::from_micros(us);
                sleep_until(deadline).await;
                assert!(Instant::now() >= deadline, "woke early");
                order.lock().unwrap().push(i);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [3, 1, 2, 0]);
        // A deadline in the past is ready at once.
        sleep_until(start).await;
    }
}
