//! How a parked RDMA poller waits on a glommio executor without a thread of its own.
//!
//! glommio waits only on its own I/O (socket readiness, file reads, timers), not on an
//! arbitrary fd such as the completion channel. So each link keeps a small io_uring of its own
//! holding one POLL_ADD per park fd, with an eventfd registered to it: the kernel bumps the
//! eventfd whenever that ring posts a completion, and the executor waits by reading the
//! eventfd through glommio's ring. A completion event thus wakes the shard's executor directly,
//! with no thread in between. Readiness itself is read from the private ring's completion queue
//! in user space; a poll that fired is armed again at the next park (one `io_uring_enter`).
//!
//! The POLL_ADDs are one-shot, so they see an fd that is already readable when armed, and need
//! nothing newer than the kernels glommio needs. Stale eventfd counts (from completions reaped
//! before the wait) cost at most one spurious wake-up, which the driver treats as nothing ready.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use futures::future::Either;
use io_uring::{opcode, types, IoUring};

/// Submission entries of the private ring: one POLL_ADD per park fd, and their cancellations.
const PARK_RING_ENTRIES: u32 = 8;

/// Longest wait for the polls' cancellations when a link's ring is dropped.
const CANCEL_WAIT_MAX_S: u64 = 1;

/// Bytes of an eventfd read: its 64-bit counter.
const EVENTFD_READ_BYTES: usize = 8;

/// One link's park ring. Not `Send`: it lives on the executor that runs the link's poller.
pub(crate) struct ParkRing<const N: usize> {
    ring: IoUring,
    /// The eventfd registered with `ring`, owned by glommio (it closes it).
    bell: glommio::io::BufferedFile,
    /// The fds polled, fixed at the first wait (a driver's park fds never change).
    fds: Option<[RawFd; N]>,
    /// Whether a POLL_ADD for fd `i` is in the ring (submitted and not yet reaped).
    armed: [bool; N],
}

impl<const N: usize> ParkRing<N> {
    pub(crate) fn new() -> io::Result<ParkRing<N>> {
        assert!(N as u32 * 2 <= PARK_RING_ENTRIES, "a poll and a cancellation per fd must fit in the ring");
        let ring = IoUring::new(PARK_RING_ENTRIES)?;
        // Blocking, so io_uring waits for a count rather than answering EAGAIN.
        // SAFETY: eventfd(2) has no memory arguments; its result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it: the file takes ownership
        // (glommio closes it on drop).
        let bell = unsafe { glommio::io::BufferedFile::from_raw_fd(fd) };
        ring.submitter().register_eventfd(fd)?;
        Ok(ParkRing { ring, bell, fds: None, armed: [false; N] })
    }

    /// Resolves when one of `fds` is readable (or hung up) or `timeout` has passed; says which.
    pub(crate) async fn wait(&mut self, fds: [RawFd; N], timeout: Duration) -> io::Result<[bool; N]> {
        match self.fds {
            None => self.fds = Some(fds),
            Some(known) if known == fds => {}
            Some(_) => return Err(io::Error::other("the park fds of an RDMA link changed")),
        }
        let ready = self.reap()?;
        if ready.contains(&true) {
            return Ok(ready);
        }
        self.arm(fds)?;
        let read = self.bell.read_at(0, EVENTFD_READ_BYTES);
        let sleep = glommio::timer::sleep(timeout);
        if let Either::Left((result, _)) = futures::future::select(std::pin::pin!(read), std::pin::pin!(sleep)).await {
            result.map_err(|e| io::Error::other(format!("reading the RDMA park eventfd: {e}")))?;
        }
        self.reap()
    }

    /// Submits a POLL_ADD for every fd that has none in the ring.
    fn arm(&mut self, fds: [RawFd; N]) -> io::Result<()> {
        let mut pushed = 0;
        for (i, fd) in fds.into_iter().enumerate() {
            if self.armed[i] {
                continue;
            }
            let poll = opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
                .build()
                .user_data(i as u64);
            // SAFETY: a POLL_ADD borrows no memory; `fd` stays open while the poll is in the
            // ring, because the driver owns its park fds for as long as this ring is used and
            // `Drop` cancels every poll before the driver closes them.
            unsafe { self.ring.submission().push(&poll) }
                .map_err(|_| io::Error::other("the RDMA park ring is full"))?;
            self.armed[i] = true;
            pushed += 1;
        }
        if pushed > 0 {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Takes the private ring's completions: which fds were ready. A poll that failed fails the
    /// wait (the driver then closes the link with the error).
    fn reap(&mut self) -> io::Result<[bool; N]> {
        let mut ready = [false; N];
        let mut failed = None;
        for cqe in self.ring.completion() {
            let Some(i) = usize::try_from(cqe.user_data()).ok().filter(|&i| i < N) else { continue };
            self.armed[i] = false;
            match cqe.result() {
                result if result >= 0 => ready[i] = true,
                result => failed = Some(io::Error::from_raw_os_error(-result)),
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(ready),
        }
    }
}

impl<const N: usize> Drop for ParkRing<N> {
    /// Cancels the polls still in the ring and waits for them, so no request holds a park fd
    /// once the driver closes it.
    fn drop(&mut self) {
        let mut cancelling = 0;
        for (i, armed) in self.armed.iter().enumerate() {
            if !armed {
                continue;
            }
            let cancel = opcode::AsyncCancel::new(i as u64).build().user_data(u64::MAX);
            // SAFETY: a cancellation borrows no memory.
            if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
                cancelling += 1;
            }
        }
        if cancelling == 0 {
            return;
        }
        // Each cancelled poll completes, and so does each cancellation; bounded, so a kernel
        // that answers differently cannot hang the teardown.
        let timeout = types::Timespec::new().sec(CANCEL_WAIT_MAX_S);
        let _ = self.ring.submitter().submit_with_args(cancelling * 2, &types::SubmitArgs::new().timespec(&timeout));
        for _ in self.ring.completion() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn block_on_glommio<F, T>(make: impl FnOnce() -> F + Send + 'static) -> T
    where
        F: std::future::Future<Output = T> + 'static,
        T: Send + 'static,
    {
        glommio::LocalExecutorBuilder::default().spawn(move || async move { make().await }).unwrap().join().unwrap()
    }

    #[test]
    fn a_ring_can_be_made_on_an_executor() {
        block_on_glommio(|| async { ParkRing::<3>::new().map(drop) }).unwrap();
    }

    #[test]
    fn wakes_for_the_fd_that_became_readable_from_another_thread() {
        let ready = block_on_glommio(|| async {
            let pairs: Vec<(UnixStream, UnixStream)> = (0..3).map(|_| UnixStream::pair().unwrap()).collect();
            let fds = [pairs[0].1.as_raw_fd(), pairs[1].1.as_raw_fd(), pairs[2].1.as_raw_fd()];
            let mut writer = pairs[1].0.try_clone().unwrap();
            let mut ring = ParkRing::<3>::new().unwrap();
            let poke = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                writer.write_all(&[1]).unwrap();
            });
            let ready = ring.wait(fds, Duration::from_secs(30)).await.unwrap();
            poke.join().unwrap();
            drop(ring);
            drop(pairs);
            ready
        });
        assert_eq!(ready, [false, true, false]);
    }

    #[test]
    fn an_fd_readable_before_the_wait_is_seen_at_once() {
        let ready = block_on_glommio(|| async {
            let (mut a, b) = UnixStream::pair().unwrap();
            let (_c, d) = UnixStream::pair().unwrap();
            a.write_all(&[1]).unwrap();
            let mut ring = ParkRing::<2>::new().unwrap();
            let ready = ring.wait([b.as_raw_fd(), d.as_raw_fd()], Duration::from_secs(30)).await.unwrap();
            drop(ring);
            ready
        });
        assert_eq!(ready, [true, false]);
    }

    #[test]
    fn times_out_with_nothing_ready_and_wakes_again_later() {
        let (first, second) = block_on_glommio(|| async {
            let (mut a, b) = UnixStream::pair().unwrap();
            let mut ring = ParkRing::<1>::new().unwrap();
            let first = ring.wait([b.as_raw_fd()], Duration::from_millis(20)).await.unwrap();
            // The poll armed by the first wait is still in the ring and must still fire.
            a.write_all(&[1]).unwrap();
            let second = ring.wait([b.as_raw_fd()], Duration::from_secs(30)).await.unwrap();
            drop(ring);
            (first, second)
        });
        assert_eq!(first, [false]);
        assert_eq!(second, [true]);
    }

    #[test]
    fn a_hung_up_peer_counts_as_ready() {
        let ready = block_on_glommio(|| async {
            let (a, b) = UnixStream::pair().unwrap();
            drop(a);
            let mut ring = ParkRing::<1>::new().unwrap();
            let ready = ring.wait([b.as_raw_fd()], Duration::from_secs(30)).await.unwrap();
            drop(ring);
            ready
        });
        assert_eq!(ready, [true]);
    }

    #[test]
    fn a_closed_fd_fails_the_wait() {
        let outcome = block_on_glommio(|| async {
            let mut ring = ParkRing::<1>::new().unwrap();
            // An fd number that is not open in this process.
            ring.wait([1_000_000], Duration::from_secs(30)).await.map_err(|e| e.raw_os_error())
        });
        assert_eq!(outcome, Err(Some(libc::EBADF)));
    }

    #[test]
    fn changed_fds_are_refused() {
        let outcome = block_on_glommio(|| async {
            let (_a, b) = UnixStream::pair().unwrap();
            let (_c, d) = UnixStream::pair().unwrap();
            let mut ring = ParkRing::<1>::new().unwrap();
            ring.wait([b.as_raw_fd()], Duration::from_millis(1)).await.unwrap();
            ring.wait([d.as_raw_fd()], Duration::from_millis(1)).await.is_err()
        });
        assert!(outcome);
    }
}
