//! TCP drivers: the tokio client side and the glommio (io_uring) server side share the frame
//! reader and the batching rules.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::TransportConfig;
use crate::error::TransportError;
use crate::frame::OutFrame;
use crate::link::{FrameSink, Outbound};
use crate::reader::FrameReader;

/// Frames below this size are gathered into one buffer on the glommio side, whose sockets
/// have no vectored write; larger ones are written from their own buffer.
pub const SMALL_FRAME_BYTES: usize = 16 << 10;
/// Most frames gathered into one vectored write (below the kernel's IOV_MAX of 1024).
pub const WRITE_BATCH_FRAMES_MAX: usize = 256;

/// Calls `FrameSink::closed` once, however many tasks notice the failure.
pub(crate) struct CloseOnce {
    pub sink: Arc<dyn FrameSink>,
    done: AtomicBool,
    /// Turns true on close, so a task waiting for work (the tokio writer) lets go of its
    /// half of the socket at once instead of leaving it in CLOSE-WAIT until the next call.
    signal: tokio::sync::watch::Sender<bool>,
}

impl CloseOnce {
    pub fn new(sink: Arc<dyn FrameSink>) -> Arc<CloseOnce> {
        Arc::new(CloseOnce { sink, done: AtomicBool::new(false), signal: tokio::sync::watch::Sender::new(false) })
    }

    pub fn close(&self, error: TransportError) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.sink.closed(error);
            self.signal.send_replace(true);
        }
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.signal.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// Runs a client connection on the current tokio runtime: one task writes (gathering queued
/// frames into vectored writes), one reads and delivers frames to `sink`. Closing the returned
/// handle ends both tasks and drops the socket.
pub(crate) fn spawn_tokio_driver(
    stream: tokio::net::TcpStream,
    outbound: Outbound,
    sink: Arc<dyn FrameSink>,
    config: &TransportConfig,
) -> Result<Arc<CloseOnce>, TransportError> {
    stream.set_nodelay(true).map_err(|e| TransportError::io("setting TCP_NODELAY", e))?;
    let (mut read_half, mut write_half) = stream.into_split();
    let close = CloseOnce::new(sink);
    let batch_bytes = config.write_batch_bytes;
    let write_timeout = std::time::Duration::from_millis(config.write_timeout_ms);
    let writer_close = close.clone();
    let mut closed = writer_close.subscribe();
    tokio::spawn(async move {
        let mut batch: Vec<OutFrame> = Vec::new();
        loop {
            let first = tokio::select! {
                next = outbound.recv_async() => match next {
                    Ok(first) => first,
                    Err(_) => break,
                },
                // The reader saw the connection end: drop the socket now.
                _ = closed.wait_for(|c| *c) => return,
            };
            let mut bytes = first.len();
            batch.push(first);
            while bytes < batch_bytes && batch.len() < WRITE_BATCH_FRAMES_MAX {
                let Ok(next) = outbound.try_recv() else { break };
                bytes += next.len();
                batch.push(next);
            }
            match tokio::time::timeout(write_timeout, write_all_vectored(&mut write_half, &batch, &*writer_close.sink))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return writer_close.close(TransportError::io("writing frames", e)),
                Err(_) => {
                    return writer_close.close(TransportError::Closed {
                        reason: "the server stopped reading (write_timeout_ms passed without progress)".into(),
                    })
                }
            }
            batch.clear();
        }
        // Every sender is gone: the client was dropped. Half-close so the server finishes.
        let _ = write_half.shutdown().await;
    });
    let (max_frame_bytes, read_buffer_bytes) = (config.max_frame_bytes, config.read_buffer_bytes);
    let handle = close.clone();
    let mut reader_closed = close.subscribe();
    tokio::spawn(async move {
        let mut reader = FrameReader::new(max_frame_bytes, read_buffer_bytes);
        loop {
            loop {
                match reader.next_frame() {
                    Ok(Some(frame)) => close.sink.deliver(frame),
                    Ok(None) => break,
                    Err(e) => return close.close(e.into()),
                }
            }
            if close.is_closed() {
                return;
            }
            let spare = match reader.spare() {
                Ok(spare) => spare,
                Err(e) => return close.close(e.into()),
            };
            let read = tokio::select! {
                read = read_half.read(spare) => read,
                // Closed from this side (a dead link): let go of the socket now.
                _ = reader_closed.wait_for(|c| *c) => return,
            };
            match read {
                Ok(0) => {
                    return close.close(TransportError::Closed { reason: "the server closed the connection".into() })
                }
                Ok(n) => {
                    close.sink.progress();
                    reader.advance(n)
                }
                Err(e) => return close.close(TransportError::io("reading frames", e)),
            }
        }
    });
    Ok(handle)
}

async fn write_all_vectored(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    frames: &[OutFrame],
    sink: &dyn FrameSink,
) -> std::io::Result<()> {
    let (mut index, mut offset) = (0usize, 0usize);
    while index < frames.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(&frames[index].as_bytes()[offset..])
            .chain(frames[index + 1..].iter().map(|f| &f.as_bytes()[..]))
            .map(IoSlice::new)
            .collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        sink.progress();
        while index < frames.len() && written >= frames[index].len() - offset {
            written -= frames[index].len() - offset;
            index += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}

/// Writes queued items to a glommio socket until the queue closes. Small frames are copied
/// into one batch buffer (one syscall for many frames); large frames are written directly.
pub(crate) async fn glommio_write_loop<T: AsRef<OutFrame>>(
    mut writer: futures::io::WriteHalf<glommio::net::TcpStream>,
    queue: flume::Receiver<T>,
    batch_bytes: usize,
    mut on_written: impl FnMut(usize),
) -> std::io::Result<()> {
    let mut batch: Vec<u8> = Vec::with_capacity(batch_bytes);
    let mut held: Vec<T> = Vec::new();
    while let Ok(first) = queue.recv_async().await {
        held.push(first);
        let mut bytes = held[0].as_ref().len();
        while bytes < batch_bytes && held.len() < WRITE_BATCH_FRAMES_MAX {
            let Ok(next) = queue.try_recv() else { break };
            bytes += next.as_ref().len();
            held.push(next);
        }
        for item in &held {
            let frame = item.as_ref().as_bytes();
            if frame.len() >= SMALL_FRAME_BYTES {
                flush(&mut writer, &mut batch).await?;
                writer.write_all(frame).await?;
            } else {
                if batch.len() + frame.len() > batch_bytes {
                    flush(&mut writer, &mut batch).await?;
                }
                // Copy a small frame into the batch: cheaper than a syscall of its own.
                batch.extend_from_slice(frame);
            }
        }
        flush(&mut writer, &mut batch).await?;
        on_written(held.len());
        // Dropping the items releases the credits and byte budget they hold.
        held.clear();
    }
    writer.close().await
}

async fn flush(
    writer: &mut futures::io::WriteHalf<glommio::net::TcpStream>,
    batch: &mut Vec<u8>,
) -> std::io::Result<()> {
    if !batch.is_empty() {
        writer.write_all(batch).await?;
        batch.clear();
    }
    Ok(())
}

/// Reads from a glommio socket into the frame reader; `Ok(0)` is end of stream.
pub(crate) async fn glommio_read(
    reader_half: &mut futures::io::ReadHalf<glommio::net::TcpStream>,
    spare: &mut [u8],
) -> std::io::Result<usize> {
    reader_half.read(spare).await
}
