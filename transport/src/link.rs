//! The seam between the request–response layer and an I/O driver (TCP or RDMA).
//!
//! A driver owns one connection. It takes frames to send from a bounded `flume` channel and
//! hands every received frame to a `FrameSink`, in order, on its own thread or task. It stops
//! when the outbound channel is disconnected (all senders dropped) or the connection fails,
//! and then calls `FrameSink::closed` exactly once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::TransportError;
use crate::frame::{Frame, OutFrame};

/// Where a driver delivers received frames. Implementations must not block.
pub trait FrameSink: Send + Sync + 'static {
    fn deliver(&self, frame: Frame);
    /// The link is gone; no frame follows. Called exactly once.
    fn closed(&self, error: TransportError);
    /// Bytes moved on the link (read or written), whether or not a frame is complete yet: a
    /// large frame on a slow link is progress, not silence.
    fn progress(&self) {}
}

/// Frames to send, taken by the driver.
pub type Outbound = flume::Receiver<OutFrame>;

/// A sink that forwards into a channel, for consumers that are async tasks (the glommio server
/// loop). A peer that respects its credits never has more than `capacity` frames queued; one
/// that does not is cut off with a protocol-violation error instead of growing the queue.
pub struct ChannelSink {
    tx: flume::Sender<Result<Frame, TransportError>>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

/// The consuming end of a `ChannelSink`.
pub struct ChannelSource {
    rx: flume::Receiver<Result<Frame, TransportError>>,
    queued: Arc<AtomicUsize>,
}

impl ChannelSink {
    pub fn new(capacity: usize) -> (Arc<ChannelSink>, ChannelSource) {
        let (tx, rx) = flume::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        (Arc::new(ChannelSink { tx, queued: queued.clone(), capacity }), ChannelSource { rx, queued })
    }
}

impl FrameSink for ChannelSink {
    fn deliver(&self, frame: Frame) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            let _ = self.tx.send(Err(TransportError::Closed {
                reason: format!("peer exceeded its credits ({} frames queued): protocol violation", self.capacity),
            }));
            return;
        }
        let _ = self.tx.send(Ok(frame));
    }

    fn closed(&self, error: TransportError) {
        let _ = self.tx.send(Err(error));
    }
}

impl ChannelSource {
    /// The next frame, or the error that closed the link. `None` once the driver is gone.
    pub async fn recv(&self) -> Option<Result<Frame, TransportError>> {
        let item = self.rx.recv_async().await.ok()?;
        if item.is_ok() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        Some(item)
    }

    /// Blocking variant for threads outside any async runtime (tests, hw-tests).
    pub fn recv_blocking(&self, timeout: std::time::Duration) -> Option<Result<Frame, TransportError>> {
        let item = self.rx.recv_timeout(timeout).ok()?;
        if item.is_ok() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        Some(item)
    }
}
