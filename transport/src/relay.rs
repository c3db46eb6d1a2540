//! A TCP relay that can cut or impair the network between a client and a server, for fault
//! tests. Cut: it holds everything (nothing is forwarded, no connection is closed, new
//! connections are accepted and left waiting) until `heal`. That is what a blackhole route or a
//! pulled cable looks like to both ends: silence, not resets. Impaired: every chunk arrives a
//! fixed delay later, and a share of them one retransmission later still, holding back what
//! follows, as a lost TCP segment does.
//!
//! This kernel has no `netem`, and a relay needs no root, so tests can run it anywhere.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Bytes each pump reads at once.
const RELAY_CHUNK_BYTES: usize = 64 << 10;
/// Chunks in flight per direction while delayed (bounds the relay's memory to 4 MiB each).
const RELAY_CHUNKS_IN_FLIGHT: usize = 64;

/// What happens to forwarded traffic, in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Added to every chunk (one-way delay).
    pub delay: Duration,
    /// Share of chunks, 0.0..=1.0, that are "lost" and arrive `retransmit` later, holding back
    /// everything behind them.
    pub loss: f64,
    pub retransmit: Duration,
}

pub struct Relay {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    impairment: watch::Sender<Impairment>,
    connections: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on an ephemeral port of 127.0.0.1 and relays every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let (impairment, _) = watch::channel(Impairment::default());
        let connections = Arc::new(AtomicU64::new(0));
        let (link, counter) = (Link { cut: cut.subscribe(), impairment: impairment.subscribe() }, connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((downstream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(relay_one(downstream, upstream, link.clone()));
            }
        });
        Ok(Relay { addr, cut, impairment, connections, accept })
    }

    /// Delays (and "loses") traffic from now on, on every connection.
    pub fn impair(&self, impairment: Impairment) {
        assert!((0.0..=1.0).contains(&impairment.loss), "loss is a share: {}", impairment.loss);
        self.impairment.send_replace(impairment);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding; connections stay open and silent.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards again, starting with what was held.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What every pump watches.
#[derive(Clone)]
struct Link {
    cut: watch::Receiver<bool>,
    impairment: watch::Receiver<Impairment>,
}

async fn relay_one(downstream: TcpStream, upstream: SocketAddr, mut link: Link) {
    // A connection made during a cut reaches the server only after the heal.
    if link.cut.wait_for(|c| !*c).await.is_err() {
        return;
    }
    let Ok(upstream) = TcpStream::connect(upstream).await else { return };
    let _ = downstream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (down_read, down_write) = downstream.into_split();
    let (up_read, up_write) = upstream.into_split();
    let forward = tokio::spawn(pump(down_read, up_write, link.clone()));
    pump(up_read, down_write, link).await;
    forward.abort();
}

/// Copies one direction: a reader stamps each chunk with when it may arrive, a writer waits
/// for that time. During a cut, nothing is read or written.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, link: Link) {
    let (chunks, mut due_chunks) = mpsc::channel::<(Instant, Vec<u8>)>(RELAY_CHUNKS_IN_FLIGHT);
    let mut reader_link = link.clone();
    let reader = tokio::spawn(async move {
        let mut last_due = Instant::now();
        loop {
            if reader_link.cut.wait_for(|c| !*c).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; RELAY_CHUNK_BYTES];
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.truncate(n);
            let impairment = *reader_link.impairment.borrow();
            let mut due = Instant::now() + impairment.delay;
            if impairment.loss > 0.0 && rand::random::<f64>() < impairment.loss {
                due += impairment.retransmit;
            }
            // In order, as TCP delivers: a late chunk holds back the ones behind it.
            last_due = last_due.max(due);
            if chunks.send((last_due, buf)).await.is_err() {
                return;
            }
        }
    });
    let mut cut = link.cut;
    while let Some((due, buf)) = due_chunks.recv().await {
        tokio::time::sleep_until(due).await;
        if cut.wait_for(|c| !*c).await.is_err() || to.write_all(&buf).await.is_err() {
            break;
        }
    }
    reader.abort();
}
