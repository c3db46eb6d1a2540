//! Wakes a sleeping poller thread: a socket pair whose read end sits in the poller's poll(2)
//! set beside the completion channel and the bootstrap socket. Rung by frame releases, by
//! `RdmaDriver::shutdown`, and (as a `Waker`) by the outbound channel when a frame arrives.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Wake;

#[derive(Debug)]
pub struct Doorbell {
    /// Set once a byte is (about to be) in the socket: later rings skip the syscall.
    rung: AtomicBool,
    writer: UnixStream,
    reader: UnixStream,
}

impl Doorbell {
    pub fn new() -> io::Result<Arc<Doorbell>> {
        let (writer, reader) = UnixStream::pair()?;
        writer.set_nonblocking(true)?;
        reader.set_nonblocking(true)?;
        Ok(Arc::new(Doorbell { rung: AtomicBool::new(false), writer, reader }))
    }

    pub fn ring(&self) {
        if !self.rung.swap(true, Ordering::AcqRel) {
            // A full socket buffer already means "wake up"; nothing else can fail usefully.
            let _ = (&self.writer).write(&[1]);
        }
    }

    /// Re-arms the bell. The poller calls this and *then* looks at its queues, so a ring that
    /// races with it either lands in the socket or is seen in the queues.
    pub fn clear(&self) {
        self.rung.store(false, Ordering::Release);
        let mut buf = [0u8; 64];
        while let Ok(n) = (&self.reader).read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    pub fn fd(&self) -> RawFd {
        self.reader.as_raw_fd()
    }
}

impl Wake for Doorbell {
    fn wake(self: Arc<Self>) {
        self.ring();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ring();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes waiting in the bell (consumes them).
    fn pending_bytes(bell: &Doorbell) -> usize {
        let mut buf = [0u8; 16];
        match (&bell.reader).read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn ring_writes_once_until_cleared() {
        let bell = Doorbell::new().unwrap();
        assert_eq!(pending_bytes(&bell), 0);
        bell.ring();
        bell.ring();
        assert_eq!(pending_bytes(&bell), 1, "a second ring before clear costs no syscall");
        bell.ring();
        assert_eq!(pending_bytes(&bell), 0);
        bell.clear();
        std::task::Waker::from(bell.clone()).wake_by_ref();
        assert_eq!(pending_bytes(&bell), 1);
    }
}
