//! A TCP relay that can cut the network between a client and a server, for fault tests: it
//! forwards bytes both ways until `cut`, then holds everything (nothing is forwarded, no
//! connection is closed, new connections are accepted and left waiting) until `heal`. That is
//! what a blackhole route or a pulled cable looks like to both ends: silence, not resets.
//!
//! This kernel has no `netem`, and a relay needs no root, so tests can run it anywhere.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bytes each pump reads at once.
const RELAY_CHUNK_BYTES: usize = 64 << 10;

pub struct Relay {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    connections: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on an ephemeral port of 127.0.0.1 and relays every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let connections = Arc::new(AtomicU64::new(0));
        let (cut_rx, counter) = (cut.subscribe(), connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((downstream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(relay_one(downstream, upstream, cut_rx.clone()));
            }
        });
        Ok(Relay { addr, cut, connections, accept })
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

async fn relay_one(downstream: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    // A connection made during a cut reaches the server only after the heal.
    if cut.wait_for(|c| !*c).await.is_err() {
        return;
    }
    let Ok(upstream) = TcpStream::connect(upstream).await else { return };
    let _ = downstream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (down_read, down_write) = downstream.into_split();
    let (up_read, up_write) = upstream.into_split();
    let forward = tokio::spawn(pump(down_read, up_write, cut.clone()));
    pump(up_read, down_write, cut).await;
    forward.abort();
}

/// Copies one direction; during a cut, what was read waits until the heal.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; RELAY_CHUNK_BYTES];
    loop {
        if cut.wait_for(|c| !*c).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.wait_for(|c| !*c).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
