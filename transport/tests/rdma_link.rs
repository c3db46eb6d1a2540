//! Driver-to-driver over a real RDMA device: listener and connector in one process, sinks from
//! `ChannelSink`. Without a device each test prints `skipped: no RDMA device` and passes, except
//! under `SLUICE_IN_RDMA_VM=1` (the soft-RoCE CI guest), where a missing device fails it.
//!
//! The peer-death tests re-run this binary as a child process (`child_process_entry`, selected
//! by `SLUICE_RDMA_LINK_CHILD`) and SIGKILL it in the middle of a 32 MiB transfer.

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_transport::messages::Echo;
use sluice_transport::rdma::test_support::{device_or_skip, server_addr};
use sluice_transport::rdma::{self, PendingRdma, RdmaDriver, RdmaListener};
use sluice_transport::{
    ChannelSink, ChannelSource, Frame, FrameError, FrameSink, OutFrame, TransportConfig, TransportError,
};

/// Generous bound for anything to arrive (software RDMA under emulation is slow).
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on noticing a dead peer; the requirement is "bounded", not fast.
const PEER_DEATH_BOUND: Duration = Duration::from_secs(30);
const CHILD_ENV: &str = "SLUICE_RDMA_LINK_CHILD";

struct Side {
    driver: RdmaDriver,
    tx: flume::Sender<OutFrame>,
    rx: ChannelSource,
}

fn start(pending: PendingRdma, config: &TransportConfig, outbound_capacity: usize) -> Side {
    let (tx, outbound) = flume::bounded(outbound_capacity);
    let (sink, rx) = ChannelSink::new(config.credits as usize);
    let driver = pending.start(outbound, sink, None).expect("start driver");
    Side { driver, tx, rx }
}

/// (client, server) over one RDMA link.
fn pair(config: &TransportConfig, outbound_capacity: usize) -> (Side, Side) {
    pair_with(config, config, outbound_capacity)
}

fn pair_with(
    client_config: &TransportConfig,
    server_config: &TransportConfig,
    outbound_capacity: usize,
) -> (Side, Side) {
    let listener = RdmaListener::bind(server_addr(), server_config).expect("bind");
    let addr = listener.local_addr();
    let server = std::thread::spawn(move || listener.accept());
    let client = rdma::connect(addr, client_config).expect("connect");
    let server = server.join().expect("accept thread").expect("accept");
    println!("link: client {} / server {}", client.describe(), server.describe());
    (start(client, client_config, outbound_capacity), start(server, server_config, outbound_capacity))
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn echo_frame(id: u64, payload: &[u8], config: &TransportConfig) -> OutFrame {
    OutFrame::encode(id, &Echo { payload }, config.max_frame_bytes).expect("encode")
}

fn recv(side: &Side, what: &str) -> Frame {
    match side.rx.recv_blocking(ARRIVAL_TIMEOUT) {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => panic!("{what}: link closed: {e}"),
        None => panic!("{what}: nothing within {ARRIVAL_TIMEOUT:?}"),
    }
}

fn check_echo(frame: &Frame, id: u64, len: usize) {
    assert_eq!(frame.request_id(), id, "frames arrive in order");
    let echo = frame.access::<Echo>().expect("valid Echo archive");
    let payload: &[u8] = &echo.payload;
    assert_eq!(payload.len(), len, "frame {id}: body length");
    assert!(payload == pattern(id, len).as_slice(), "frame {id}: body intact");
}

#[test]
fn pipelined_small_frames_arrive_in_order_with_intact_bodies() {
    if !device_or_skip("pipelined_small_frames_arrive_in_order_with_intact_bodies") {
        return;
    }
    const FRAMES: u64 = 10_000;
    let config = TransportConfig::default();
    let (client, server) = pair(&config, config.credits as usize);
    let len_of = |i: u64| (i as usize * 37) % 4000;
    let started = Instant::now();
    let tx = client.tx.clone();
    let sender = std::thread::spawn(move || {
        let config = TransportConfig::default();
        for i in 0..FRAMES {
            tx.send(echo_frame(i, &pattern(i, len_of(i)), &config)).expect("driver alive");
        }
    });
    for i in 0..FRAMES {
        let frame = recv(&server, "small frame");
        check_echo(&frame, i, len_of(i));
    }
    sender.join().unwrap();
    let elapsed = started.elapsed();
    // The sender counts a SEND when its completion is polled, which can trail the delivery.
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.driver.stats().frames_sent_send < FRAMES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (sent, received) = (client.driver.stats(), server.driver.stats());
    println!("{FRAMES} small frames in {elapsed:?}; client {sent:?}; server {received:?}");
    assert_eq!(sent.frames_sent_send, FRAMES);
    assert_eq!(sent.frames_sent_write, 0);
    assert_eq!(received.frames_received_send, FRAMES);
}

#[test]
fn large_frames_go_through_the_remote_ring_in_order_with_small_ones() {
    if !device_or_skip("large_frames_go_through_the_remote_ring_in_order_with_small_ones") {
        return;
    }
    let config = TransportConfig::default();
    let (client, server) = pair(&config, 4);
    // 1 MiB and 32 MiB bodies by RDMA WRITE WITH IMMEDIATE, small frames by SEND between them.
    let lens: Vec<usize> = vec![1 << 20, 100, 32 << 20, 1 << 20, 200, 32 << 20, 1 << 20, 32 << 20, 50, 1 << 20];
    let large = lens.iter().filter(|&&l| l > config.rdma.slot_bytes as usize).count() as u64;
    let started = Instant::now();
    let tx = client.tx.clone();
    let to_send = lens.clone();
    let sender = std::thread::spawn(move || {
        let config = TransportConfig::default();
        for (i, len) in to_send.into_iter().enumerate() {
            tx.send(echo_frame(i as u64, &pattern(i as u64, len), &config)).expect("driver alive");
        }
    });
    for (i, &len) in lens.iter().enumerate() {
        let frame = recv(&server, "large frame");
        check_echo(&frame, i as u64, len);
    }
    sender.join().unwrap();
    let elapsed = started.elapsed();
    let bytes: usize = lens.iter().sum();
    let (sent, received) = (client.driver.stats(), server.driver.stats());
    println!(
        "{} frames, {:.1} MiB in {elapsed:?} ({:.1} MiB/s); client {sent:?}; server {received:?}",
        lens.len(),
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(sent.frames_sent_write, large, "every large frame took the WRITE path");
    assert_eq!(received.frames_received_ring, large);
    assert_eq!(sent.frames_sent_send, lens.len() as u64 - large);
}

#[test]
fn a_receiver_that_holds_frames_stops_the_sender_at_exactly_the_credit_window() {
    if !device_or_skip("a_receiver_that_holds_frames_stops_the_sender_at_exactly_the_credit_window") {
        return;
    }
    const EXTRA: u64 = 36;
    let config = TransportConfig { credits: 64, ..TransportConfig::default() };
    let window = u64::from(config.credits);
    let (client, server) = pair(&config, 1024);
    // Small and large frames alike count against the window.
    let len_of = |i: u64| if i % 16 == 5 { 100_000 } else { 300 };
    for i in 0..window + EXTRA {
        client.tx.send(echo_frame(i, &pattern(i, len_of(i)), &config)).unwrap();
    }
    let mut held = Vec::new();
    for i in 0..window {
        let frame = recv(&server, "frame within the window");
        check_echo(&frame, i, len_of(i));
        held.push(frame);
    }
    // The window is used up and nothing is released: nothing more may arrive, and the rest
    // must still be queued in the outbound channel (the driver stopped taking from it).
    match server.rx.recv_blocking(Duration::from_millis(1500)) {
        None => {}
        Some(Ok(frame)) => panic!("frame {} arrived beyond the credit window", frame.request_id()),
        Some(Err(e)) => panic!("link closed: {e}"),
    }
    assert_eq!(client.tx.len() as u64, EXTRA, "frames beyond the window stay in the outbound channel");
    assert!(client.driver.stats().credit_stalls >= 1);
    // Releasing the held frames returns the credits; the rest flows.
    drop(held);
    for i in window..window + EXTRA {
        let frame = recv(&server, "frame after release");
        check_echo(&frame, i, len_of(i));
    }
    assert!(client.tx.is_empty());
    println!("client {:?}; server {:?}", client.driver.stats(), server.driver.stats());
}

#[test]
fn closing_the_outbound_channel_closes_both_sides() {
    if !device_or_skip("closing_the_outbound_channel_closes_both_sides") {
        return;
    }
    let config = TransportConfig::default();
    let (client, server) = pair(&config, 16);
    client.tx.send(echo_frame(7, &pattern(7, 10), &config)).unwrap();
    check_echo(&recv(&server, "last frame"), 7, 10);
    let Side { driver, tx, rx } = client;
    drop(tx);
    match rx.recv_blocking(ARRIVAL_TIMEOUT) {
        Some(Err(TransportError::Closed { reason })) => println!("client closed: {reason}"),
        other => panic!("client: expected Closed, got {other:?}"),
    }
    match server.rx.recv_blocking(PEER_DEATH_BOUND) {
        Some(Err(e)) => println!("server closed: {e}"),
        other => panic!("server: expected an error, got {other:?}"),
    }
    driver.shutdown();
}

#[test]
fn a_corrupt_frame_closes_the_link_with_a_typed_error_on_both_paths() {
    if !device_or_skip("a_corrupt_frame_closes_the_link_with_a_typed_error_on_both_paths") {
        return;
    }
    let config = TransportConfig::default();
    // 100 bytes go by SEND, 100 000 through the ring.
    for len in [100usize, 100_000] {
        let (client, server) = pair(&config, 4);
        let mut bytes = echo_frame(1, &pattern(1, len), &config).as_bytes().to_vec();
        *bytes.last_mut().expect("non-empty") ^= 0xff;
        client.tx.send(OutFrame::from_raw(bytes.into())).unwrap();
        match server.rx.recv_blocking(ARRIVAL_TIMEOUT) {
            Some(Err(TransportError::Frame(FrameError::BadCrc { .. }))) => println!("{len} B: receiver refused it"),
            other => panic!("{len} B: expected a CRC error, got {other:?}"),
        }
        // The receiver tore its end down; the sender hears of it.
        match client.rx.recv_blocking(PEER_DEATH_BOUND) {
            Some(Err(e)) => println!("{len} B: sender closed: {e}"),
            other => panic!("{len} B: sender: expected an error, got {other:?}"),
        }
    }
}

#[test]
fn an_outbound_frame_over_the_peers_limit_fails_the_link_locally() {
    if !device_or_skip("an_outbound_frame_over_the_peers_limit_fails_the_link_locally") {
        return;
    }
    let client_config = TransportConfig::default();
    let server_config = TransportConfig { max_frame_bytes: 1 << 20, ..TransportConfig::default() };
    let (client, server) = pair_with(&client_config, &server_config, 4);
    client.tx.send(echo_frame(1, &pattern(1, 1000), &client_config)).unwrap();
    check_echo(&recv(&server, "frame within the limit"), 1, 1000);
    client.tx.send(echo_frame(2, &pattern(2, 2 << 20), &client_config)).unwrap();
    match client.rx.recv_blocking(ARRIVAL_TIMEOUT) {
        Some(Err(TransportError::Frame(FrameError::Oversize { max_frame_bytes, .. }))) => {
            assert_eq!(max_frame_bytes, 1 << 20);
        }
        other => panic!("expected Oversize naming the peer's limit, got {other:?}"),
    }
}

/// A sink that owns its own driver (as the client does) and drops it from inside `deliver`,
/// that is, on the poller thread.
struct SinkOwningItsDriver {
    driver: std::sync::Mutex<Option<RdmaDriver>>,
    closed: flume::Sender<TransportError>,
}

impl FrameSink for SinkOwningItsDriver {
    fn deliver(&self, _frame: Frame) {
        drop(self.driver.lock().unwrap().take());
    }

    fn closed(&self, error: TransportError) {
        let _ = self.closed.send(error);
    }
}

#[test]
fn a_driver_dropped_by_its_own_sink_on_the_poller_thread_stops_cleanly() {
    if !device_or_skip("a_driver_dropped_by_its_own_sink_on_the_poller_thread_stops_cleanly") {
        return;
    }
    let config = TransportConfig::default();
    let listener = RdmaListener::bind(server_addr(), &config).expect("bind");
    let addr = listener.local_addr();
    let server = std::thread::spawn(move || listener.accept());
    let client = start(rdma::connect(addr, &config).expect("connect"), &config, 4);
    let pending = server.join().unwrap().expect("accept");
    let (closed_tx, closed_rx) = flume::unbounded();
    let sink = Arc::new(SinkOwningItsDriver { driver: std::sync::Mutex::new(None), closed: closed_tx });
    let (_tx, outbound) = flume::bounded(4);
    let driver = pending.start(outbound, sink.clone(), None).expect("start");
    *sink.driver.lock().unwrap() = Some(driver);
    client.tx.send(echo_frame(1, b"drop me", &config)).unwrap();
    match closed_rx.recv_timeout(ARRIVAL_TIMEOUT) {
        Ok(TransportError::Closed { reason }) => println!("closed: {reason}"),
        other => panic!("expected a local shutdown, got {other:?} (did the poller panic joining itself?)"),
    }
}

// ---- peer death -----------------------------------------------------------------------------

/// Spawns this test binary as the child peer, in `role`, connecting to `addr`.
fn spawn_child(role: &str, addr: std::net::SocketAddr) -> Child {
    child_command(role, addr).spawn().expect("spawn child peer")
}

fn child_command(role: &str, addr: std::net::SocketAddr) -> Command {
    let exe = std::env::current_exe().expect("test binary path");
    let mut command = Command::new(exe);
    command
        .args(["--exact", "child_process_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{role}:{addr}"));
    command
}

/// Accepts the child's connection, killing the child if it never comes.
fn accept_child(listener: RdmaListener, child: &mut Child) -> PendingRdma {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(listener.accept().map_err(Box::new));
    });
    match done_rx.recv_timeout(ARRIVAL_TIMEOUT) {
        Ok(Ok(pending)) => pending,
        other => {
            let _ = child.kill();
            panic!("child peer did not connect: {other:?}");
        }
    }
}

fn expect_error_within(side: &Side, bound: Duration, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let left = bound.saturating_sub(started.elapsed());
        match side.rx.recv_blocking(left) {
            Some(Ok(_)) => continue, // frames that were complete before the kill
            Some(Err(e)) => {
                let took = started.elapsed();
                println!("{what}: error after {took:?}: {e}");
                return took;
            }
            None => panic!("{what}: no error within {bound:?}: the surviving side hangs"),
        }
    }
}

#[test]
fn receiver_sees_an_error_when_the_sending_peer_is_killed_mid_transfer() {
    if !device_or_skip("receiver_sees_an_error_when_the_sending_peer_is_killed_mid_transfer") {
        return;
    }
    let config = TransportConfig::default();
    let listener = RdmaListener::bind(server_addr(), &config).expect("bind");
    let mut child = spawn_child("send", listener.local_addr());
    let pending = accept_child(listener, &mut child);
    let side = start(pending, &config, 4);
    // The child writes 32 MiB frames back to back: once one has arrived, the next is in flight.
    let first = recv(&side, "first 32 MiB frame from the child");
    assert!(first.body().len() >= 32 << 20);
    drop(first);
    std::thread::sleep(Duration::from_millis(50));
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    expect_error_within(&side, PEER_DEATH_BOUND, "receiver");
    assert!(side.driver.stats().frames_received_ring >= 1);
}

#[test]
fn sender_sees_an_error_when_the_receiving_peer_is_killed_mid_transfer() {
    if !device_or_skip("sender_sees_an_error_when_the_receiving_peer_is_killed_mid_transfer") {
        return;
    }
    let config = TransportConfig::default();
    let listener = RdmaListener::bind(server_addr(), &config).expect("bind");
    let mut child = spawn_child("receive", listener.local_addr());
    let pending = accept_child(listener, &mut child);
    let side = start(pending, &config, 2);
    let tx = side.tx.clone();
    let feeder = std::thread::spawn(move || {
        let config = TransportConfig::default();
        let payload = pattern(1, 32 << 20);
        let mut id = 0;
        // Ends when the driver drops its end of the channel (link closed).
        while tx.send(echo_frame(id, &payload, &config)).is_ok() {
            id += 1;
        }
    });
    let started = Instant::now();
    while side.driver.stats().frames_sent_write < 2 {
        assert!(started.elapsed() < ARRIVAL_TIMEOUT, "no 32 MiB frame went out");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    expect_error_within(&side, PEER_DEATH_BOUND, "sender");
    drop(side);
    feeder.join().unwrap();
}

/// The child hands a clone of its bootstrap socket to a `sleep` process, then is SIGKILLed: the
/// socket stays open, so only the RDMA layer (RC retries, liveness probes) can tell the peer is
/// gone. `child_role` is "vanish-receive" (this side sends) or "vanish-send" (this side receives).
fn peer_vanishing_without_closing_its_socket_is_an_rdma_error(child_role: &str) {
    let config = TransportConfig::default();
    let listener = RdmaListener::bind(server_addr(), &config).expect("bind");
    let mut child = child_command(child_role, listener.local_addr())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child peer");
    let stdout = child.stdout.take().expect("child stdout");
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("child| {line}");
            // The harness prints "test child_process_entry ... " before it on the same line.
            if let Some((_, pid)) = line.split_once(HOLDER_PID_PREFIX) {
                let _ = pid_tx.send(pid.trim().to_string());
            }
        }
    });
    let pending = accept_child(listener, &mut child);
    let holder_pid = pid_rx.recv_timeout(ARRIVAL_TIMEOUT).expect("socket holder pid from the child");
    let side = start(pending, &config, 2);
    let feeder = (child_role == "vanish-receive").then(|| {
        let tx = side.tx.clone();
        std::thread::spawn(move || {
            let config = TransportConfig::default();
            let payload = pattern(3, 32 << 20);
            let mut id = 0;
            while tx.send(echo_frame(id, &payload, &config)).is_ok() {
                id += 1;
            }
        })
    });
    if feeder.is_some() {
        let started = Instant::now();
        while side.driver.stats().frames_sent_write < 2 {
            assert!(started.elapsed() < ARRIVAL_TIMEOUT, "no 32 MiB frame went out");
            std::thread::sleep(Duration::from_millis(5));
        }
    } else {
        drop(recv(&side, "first 32 MiB frame from the child"));
    }
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    let killed = Instant::now();
    let outcome = loop {
        match side.rx.recv_blocking(PEER_DEATH_BOUND.saturating_sub(killed.elapsed())) {
            Some(Ok(_)) => continue, // frames complete before the kill
            other => break other,
        }
    };
    let took = killed.elapsed();
    if !matches!(outcome, Some(Err(_))) {
        println!("{child_role}: no error; stats {:?}", side.driver.stats());
        let _ =
            Command::new("sh").args(["-c", &format!("rdma resource show qp; ls -l /proc/{holder_pid}/fd")]).status();
    }
    let _ = Command::new("kill").args(["-KILL", &holder_pid]).status();
    match outcome {
        Some(Err(TransportError::Rdma { op, detail })) => {
            println!("{child_role}: RDMA error ({op}) {took:?} after the kill: {detail}");
        }
        Some(Err(other)) => panic!("expected an RDMA error, got: {other}"),
        _ => panic!("no error within {PEER_DEATH_BOUND:?}: this side hangs on a vanished peer"),
    }
    println!("{child_role}: {:?}", side.driver.stats());
    drop(side);
    if let Some(feeder) = feeder {
        feeder.join().unwrap();
    }
}

#[test]
fn sender_sees_an_rdma_error_when_the_peer_vanishes_without_closing_its_socket() {
    if device_or_skip("sender_sees_an_rdma_error_when_the_peer_vanishes_without_closing_its_socket") {
        peer_vanishing_without_closing_its_socket_is_an_rdma_error("vanish-receive");
    }
}

#[test]
fn idle_receiver_sees_an_rdma_error_when_the_peer_vanishes_without_closing_its_socket() {
    if device_or_skip("idle_receiver_sees_an_rdma_error_when_the_peer_vanishes_without_closing_its_socket") {
        peer_vanishing_without_closing_its_socket_is_an_rdma_error("vanish-send");
    }
}

const HOLDER_PID_PREFIX: &str = "SOCKET_HOLDER_PID=";

/// The child peer for the tests above; does nothing unless `SLUICE_RDMA_LINK_CHILD` is set.
#[test]
fn child_process_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (role, addr) = spec.split_once(':').expect("role:addr");
    let addr: std::net::SocketAddr = addr.parse().expect("addr");
    let config = TransportConfig::default();
    let pending = rdma::connect(addr, &config).expect("child connect");
    let holder = role.starts_with("vanish").then(|| {
        let socket = pending.clone_bootstrap_socket_for_tests().expect("clone bootstrap socket");
        let holder = Command::new("sleep")
            .arg("300")
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(socket)))
            .spawn()
            .expect("spawn the socket holder");
        println!("{HOLDER_PID_PREFIX}{}", holder.id());
        holder
    });
    let side = start(pending, &config, 2);
    match role {
        "send" | "vanish-send" => {
            let payload = pattern(2, 32 << 20);
            for id in 0.. {
                if side.tx.send(echo_frame(id, &payload, &config)).is_err() {
                    break;
                }
            }
        }
        "receive" | "vanish-receive" => {
            while let Some(Ok(frame)) = side.rx.recv_blocking(Duration::from_secs(3600)) {
                drop(frame);
            }
        }
        other => panic!("unknown child role {other}"),
    }
    // Killed before it gets here in the tests; park in case the link ended first.
    if let Some(mut holder) = holder {
        let _ = holder.wait();
    }
    std::thread::sleep(Duration::from_secs(3600));
}
