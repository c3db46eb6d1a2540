//! Where an async poller parks: the runtime its link's tasks run on.
//!
//! - tokio (the proxy's client side): the park fds are registered with the runtime's reactor
//!   (`AsyncFd`), so a parked link costs no thread and wakes on the runtime's own epoll.
//! - glommio (the broker's shard executor): glommio cannot wait on an arbitrary fd, so the
//!   link polls its fds in an io_uring of its own whose completions bump an eventfd that the
//!   executor reads (`park_ring`): a parked link wakes the shard directly, with no thread.
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

use super::driver::{ParkRuntime, PARK_FDS};
use super::park_ring::ParkRing;
use super::verbs::register_with_tokio;

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

/// Parks a task on a glommio executor: the executor itself waits, through the link's
/// `ParkRing` (no thread of its own).
pub(crate) struct GlommioPark {
    ring: ParkRing<PARK_FDS>,
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

impl GlommioPark {
    /// Must be called on the glommio executor that will run the link's poller.
    pub(crate) fn new() -> io::Result<GlommioPark> {
        Ok(GlommioPark { ring: ParkRing::new()? })
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
        self.ring.wait(fds, timeout).await
    }
}
