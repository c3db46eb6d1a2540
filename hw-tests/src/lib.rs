//! sluice-hw-tests: tests that need an RDMA device. They are `#[ignore]`d, run with
//! `cargo test -p sluice-hw-tests -- --ignored` (or `scripts/hw-tests.sh`), and where no device
//! exists they print `skipped: no RDMA device` and pass, unless `SLUICE_IN_RDMA_VM=1`.
//!
//! This library holds what the tests share: a link between two drivers in one process, an echo
//! peer, and percentiles.
#![forbid(unsafe_code)]

use std::thread::JoinHandle;
use std::time::Duration;

use sluice_transport::messages::{Echo, EchoReply};
use sluice_transport::rdma::test_support::server_addr;
use sluice_transport::rdma::{self, RdmaDriver, RdmaListener, RdmaStats};
use sluice_transport::{ChannelSink, ChannelSource, OutFrame, TransportConfig, TransportError};

pub use sluice_transport::rdma::test_support::device_or_skip;

/// One end of a link: its driver, what to send, what arrived.
pub struct Peer {
    pub driver: RdmaDriver,
    pub tx: flume::Sender<OutFrame>,
    pub rx: ChannelSource,
}

/// Where to pin the two pollers: their own cores when the host has four or more (the test
/// threads need the others), unpinned otherwise.
pub fn poller_cores() -> [Option<usize>; 2] {
    match std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) {
        n if n >= 4 => [Some(n - 1), Some(n - 2)],
        _ => [None, None],
    }
}

/// (client, server) over one RDMA link on this host's device.
pub fn link(config: &TransportConfig) -> (Peer, Peer) {
    let listener = RdmaListener::bind(server_addr(), config).expect("bind the RDMA listener");
    let addr = listener.local_addr();
    let accepted = std::thread::spawn(move || listener.accept());
    let client = rdma::connect(addr, config).expect("connect");
    let server = accepted.join().expect("accept thread").expect("accept");
    println!("link: {}  <->  {}", client.describe(), server.describe());
    let [client_core, server_core] = poller_cores();
    let start = |pending: rdma::PendingRdma, core| {
        let (tx, outbound) = flume::bounded(config.credits as usize);
        let (sink, rx) = ChannelSink::new(config.credits as usize);
        let driver = pending.start(outbound, sink, core).expect("start driver");
        Peer { driver, tx, rx }
    };
    (start(client, client_core), start(server, server_core))
}

/// Answers every `Echo` with an `EchoReply` of the same request id and payload until the link
/// closes; returns the server driver's counters.
pub fn spawn_echo(peer: Peer, config: &TransportConfig) -> JoinHandle<RdmaStats> {
    let max_frame_bytes = config.max_frame_bytes;
    std::thread::Builder::new()
        .name("hw-echo".into())
        .spawn(move || {
            while let Some(Ok(frame)) = peer.rx.recv_blocking(Duration::from_secs(3600)) {
                let echo = frame.access::<Echo>().expect("an Echo frame");
                let reply =
                    OutFrame::encode(frame.request_id(), &EchoReply { payload: &echo.payload }, max_frame_bytes)
                        .expect("encode reply");
                drop(frame);
                if peer.tx.send(reply).is_err() {
                    break;
                }
            }
            peer.driver.stats()
        })
        .expect("spawn echo thread")
}

pub fn echo_frame(id: u64, payload: &[u8], config: &TransportConfig) -> OutFrame {
    OutFrame::encode(id, &Echo { payload }, config.max_frame_bytes).expect("encode")
}

/// Waits for the next frame; panics with what it was waiting for on a timeout or a closed link.
pub fn recv(peer: &Peer, timeout: Duration, what: &str) -> sluice_transport::Frame {
    match peer.rx.recv_blocking(timeout) {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => panic!("{what}: link closed: {e}"),
        None => panic!("{what}: nothing within {timeout:?}"),
    }
}

/// Closes the client side and waits for its closing error (the echo side follows).
pub fn close(client: Peer) -> Result<(), TransportError> {
    let Peer { driver, tx, rx } = client;
    drop(tx);
    let outcome = match rx.recv_blocking(Duration::from_secs(60)) {
        Some(Err(TransportError::Closed { .. })) => Ok(()),
        Some(Err(e)) => Err(e),
        Some(Ok(frame)) => Err(TransportError::Closed { reason: format!("unexpected frame {}", frame.request_id()) }),
        None => Err(TransportError::Closed { reason: "no close within 60 s".into() }),
    };
    driver.shutdown();
    outcome
}

/// Latency percentiles of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    pub fn of(samples: &mut [Duration]) -> Percentiles {
        assert!(!samples.is_empty(), "no samples");
        samples.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let at = |q: f64| us(samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]);
        let total: Duration = samples.iter().sum();
        Percentiles {
            count: samples.len(),
            mean_us: us(total) / samples.len() as f64,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: us(samples[samples.len() - 1]),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} mean={:.1}us p50={:.1}us p90={:.1}us p99={:.1}us p99.9={:.1}us max={:.1}us",
            self.count, self.mean_us, self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        samples.reverse();
        let p = Percentiles::of(&mut samples);
        let near = |got: f64, want: f64| (got - want).abs() < 1e-6;
        assert!(
            near(p.p50_us, 500.0) && near(p.p99_us, 990.0) && near(p.p999_us, 999.0) && near(p.max_us, 1000.0),
            "{p}"
        );
        assert!(near(p.mean_us, 500.5), "{p}");
    }
}
