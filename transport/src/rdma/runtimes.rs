//! Where an async poller parks: the runtime its link's tasks run on.
//!
//! - tokio (the proxy's client side): the park fds are registered with the runtime's reactor
//!   (`AsyncFd`), so a parked link costs no thread and wakes on the runtime's own epoll.
//! - glommio (the broker's shard executor): glommio cannot wait on an arbitrary fd (its
//!   readiness waits are socket reads), so a parked link hands its fds to a waiter thread that
//!   sleeps in poll(2) and wakes the task. The waiter only runs while the link is parked; a busy
//!   link is polled by the executor alone.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use super::driver::{ParkRuntime, PARK_FDS};
use super::verbs::{register_with_tokio, wait_fds};

/// Parks on the current tokio runtime. Registers duplicates of the park fds on first use (a
/// driver's fds never change), so the registrations stay valid whatever closes first.
#[derive(Default)]
pub(crate) struct TokioPark {
    registered: Option<[tokio::io::unix::AsyncFd<OwnedFd>; PARK_FDS]>,
}

impl TokioPark {
    fn registered(&mut self, fds: [RawFd; PARK_FDS]) -> io::Result<&[tokio::io::unix::AsyncFd<OwnedFd>; PARK_FDS]> {
        if self.registered.is_none() {
            let [event, bell, bootstrap] = fds;
            self.registered =
                Some([register_with_tokio(event)?, register_with_tokio(bell)?, register_with_tokio(bootstrap)?]);
        }
        Ok(self.registered.as_ref().expect("registered above"))
    }
}

impl ParkRuntime for TokioPark {
    async fn pause(&mut self, _progress: bool) {
        // Not `tokio::task::yield_now`, which defers the task until the reactor was polled: a
        // syscall per round. A task that wakes itself is queued behind the ready tasks (the
        // link's callers), and tokio still polls its reactor every `event_interval` ticks.
        YieldOnce(false).await;
    }

    async fn wait(&mut self, fds: [RawFd; PARK_FDS], timeout: Duration) -> io::Result<[bool; PARK_FDS]> {
        let [event, bell, bootstrap] = self.registered(fds)?;
        // Readiness is cleared as soon as it is seen: the driver then drains the fd, and a later
        // edge sets it again.
        let ready = |which: usize| {
            let mut ready = [false; PARK_FDS];
            ready[which] = true;
            ready
        };
        tokio::select! {
            guard = event.readable() => { guard?.clear_ready(); Ok(ready(0)) }
            guard = bell.readable() => { guard?.clear_ready(); Ok(ready(1)) }
            guard = bootstrap.readable() => { guard?.clear_ready(); Ok(ready(2)) }
            () = tokio::time::sleep(timeout) => Ok([false; PARK_FDS]),
        }
    }
}

/// Parks a task on a glommio executor through a waiter thread (one per link, idle unless the
/// link is parked). Every wait is numbered; an answer to an earlier wait (one the task stopped
/// waiting for because a frame arrived on the outbound channel) is skipped.
pub(crate) struct GlommioPark {
    requests: std::sync::mpsc::Sender<WaitRequest>,
    answers: flume::Receiver<WaitAnswer>,
    next_wait: u64,
}

/// A self-woken task keeps glommio's task queue busy, and the executor polls its io_uring (the
/// shard's disk I/O, its timers) only when the queues run dry or the preemption timer fires.
/// So the pollers of one executor, together, yield that way at most this many times in a row;
/// then one waits on a timer, which empties the queue of pollers and lets the executor poll.
const GLOMMIO_YIELDS_BETWEEN_POLLS: u32 = 8;

thread_local! {
    /// Self-wakes by this executor's pollers since one of them last came back from a timer.
    static GLOMMIO_YIELDS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Wakes itself and yields once: the task goes to the back of its runtime's ready queue.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

struct WaitRequest {
    wait: u64,
    fds: [RawFd; PARK_FDS],
    timeout_ms: i32,
}

struct WaitAnswer {
    wait: u64,
    ready: io::Result<[bool; PARK_FDS]>,
}

/// The longest single poll(2) of the waiter: the driver's own bounds are shorter.
const WAITER_TIMEOUT_MAX_MS: i32 = 60_000;

impl GlommioPark {
    /// Starts the waiter thread. It ends when this is dropped (after its current poll(2), which
    /// the driver bounds by its idle wake-up).
    pub(crate) fn new(name: String) -> io::Result<GlommioPark> {
        let (requests, incoming) = std::sync::mpsc::channel::<WaitRequest>();
        let (answer, answers) = flume::unbounded();
        std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(request) = incoming.recv() {
                let ready = wait_fds(request.fds, request.timeout_ms);
                if answer.send(WaitAnswer { wait: request.wait, ready }).is_err() {
                    return;
                }
            }
        })?;
        Ok(GlommioPark { requests, answers, next_wait: 0 })
    }
}

impl ParkRuntime for GlommioPark {
    async fn pause(&mut self, progress: bool) {
        // After progress the link's handlers have work: let them run and come straight back for
        // their replies. An idle round goes through the reactor, so idle pollers never keep the
        // executor from its I/O.
        let yields = GLOMMIO_YIELDS.with(std::cell::Cell::get);
        if progress && yields < GLOMMIO_YIELDS_BETWEEN_POLLS {
            GLOMMIO_YIELDS.with(|n| n.set(yields + 1));
            YieldOnce(false).await;
        } else {
            glommio::timer::sleep(Duration::from_micros(1)).await;
            GLOMMIO_YIELDS.with(|n| n.set(0));
        }
    }

    async fn wait(&mut self, fds: [RawFd; PARK_FDS], timeout: Duration) -> io::Result<[bool; PARK_FDS]> {
        self.next_wait += 1;
        let wait = self.next_wait;
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX).clamp(0, WAITER_TIMEOUT_MAX_MS);
        let gone = || io::Error::other("the RDMA park waiter thread is gone");
        self.requests.send(WaitRequest { wait, fds, timeout_ms }).map_err(|_| gone())?;
        loop {
            let answer = self.answers.recv_async().await.map_err(|_| gone())?;
            if answer.wait == wait {
                return answer.ready;
            }
        }
    }
}
