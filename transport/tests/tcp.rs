//! The TCP path end to end: a glommio server thread, tokio clients, real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_transport::frame::{Frame, OutFrame, FRAME_VERSION};
use sluice_transport::messages::*;
use sluice_transport::{Client, FrameError, Handler, ServerInfo, ServerThread, TransportConfig, TransportError};

/// Answers AppendRequest once `gate` allows it. The reply's position is the request's
/// message id, so callers can check that replies match requests.
#[derive(Clone, Default)]
struct Gate {
    arrived: Arc<AtomicU64>,
    /// Requests wait until this many have arrived...
    release_at: Arc<AtomicU64>,
    /// ...or until this is set.
    open: Arc<AtomicBool>,
    bodies_in_place: Arc<AtomicU64>,
}

impl Handler for Gate {
    async fn handle(&self, request: Frame) -> Result<OutFrame, ErrorReply> {
        let append = request.access::<AppendRequest>()?;
        let arrived = self.arrived.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = arrived;
        while !self.open.load(Ordering::SeqCst)
            && self.arrived.load(Ordering::SeqCst) < self.release_at.load(Ordering::SeqCst)
        {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        let entry = &append.entries[0];
        if request.as_bytes().as_ptr_range().contains(&request.share(&entry.body).as_ptr()) {
            self.bodies_in_place.fetch_add(1, Ordering::SeqCst);
        }
        let id: u64 = entry.message_id.parse().map_err(|_| ErrorReply { code: 1, message: "bad id".into() })?;
        let offsets = if id == 7777 { vec![0; 20_000] } else { vec![entry.body.len() as u64] };
        let reply = AppendResponse { acks: vec![AppendAck { position: id, offsets }] };
        OutFrame::encode(request.request_id(), &reply, 64 << 20).map_err(ErrorReply::from)
    }
}

fn server(config: TransportConfig, gate: Gate) -> ServerThread {
    let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
    ServerThread::spawn_tcp(bind, config, ServerInfo { name: "test".into(), ..Default::default() }, move || gate, None)
        .unwrap()
}

fn endpoint(server: &ServerThread) -> String {
    format!("tcp://{}", server.addr)
}

async fn append(client: &Client, id: u64, body: &[u8]) -> Result<(u64, u64), TransportError> {
    let request = AppendRequest {
        entries: vec![AppendEntry {
            queues: vec!["q".into()],
            message_id: id.to_string(),
            tag: String::new(),
            keys: vec![],
            attributes: EntryAttributes::default(),
            properties: b"",
            body,
        }],
    };
    let frame = client.call(&request).await?;
    let reply = frame.access::<AppendResponse>()?;
    Ok((reply.acks[0].position.to_native(), reply.acks[0].offsets[0].to_native()))
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_requests_are_in_flight_at_once() {
    let gate = Gate::default();
    gate.release_at.store(1000, Ordering::SeqCst);
    let server = server(TransportConfig::default(), gate.clone());
    let client = Client::connect(&endpoint(&server), TransportConfig::default(), "t").await.unwrap();
    let calls: Vec<_> = (0..1000u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { append(&client, i, &vec![i as u8; (i % 300 + 1) as usize]).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        // No reply is sent before all 1,000 requests have reached the handler.
        assert_eq!(call.await.unwrap().unwrap(), (i as u64, (i % 300 + 1) as u64));
    }
    assert_eq!(gate.arrived.load(Ordering::SeqCst), 1000);
    assert_eq!(gate.bodies_in_place.load(Ordering::SeqCst), 1000, "bodies are read in the receive buffer");
    assert_eq!(client.available_credits(), 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_wait_once_credits_run_out() {
    let config = TransportConfig { credits: 8, ..TransportConfig::default() };
    let gate = Gate::default();
    gate.release_at.store(u64::MAX, Ordering::SeqCst);
    // The server would take 64: only the client's own credits can stop the ninth request.
    let server = server(TransportConfig { credits: 64, ..TransportConfig::default() }, gate.clone());
    let client = Client::connect(&endpoint(&server), config, "t").await.unwrap();
    let calls: Vec<_> = (0..20u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { append(&client, i, b"x").await })
        })
        .collect();
    wait_for("8 requests at the handler", || gate.arrived.load(Ordering::SeqCst) == 8).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gate.arrived.load(Ordering::SeqCst), 8, "no request beyond the credit window is sent");
    assert_eq!(server.stats.frames_received.load(Ordering::SeqCst), 1 + 8, "hello + 8");
    assert_eq!(client.available_credits(), 0);
    gate.open.store(true, Ordering::SeqCst);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(gate.arrived.load(Ordering::SeqCst), 20);
    assert_eq!(client.available_credits(), 8);
}

#[test]
fn a_reader_that_never_reads_replies_does_not_grow_server_memory() {
    let config = TransportConfig {
        max_frame_bytes: 1 << 20,
        max_inflight_bytes: 4 << 20,
        read_buffer_bytes: 64 << 10,
        ..TransportConfig::default()
    };
    let server = server(config.clone(), Gate::default());
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Echo requests with 512 KiB payloads: each reply is as big as its request.
    let payload = vec![7u8; 512 << 10];
    let request = OutFrame::encode(1, &Echo { payload: &payload }, 1 << 20).unwrap();
    let (mut sent, target) = (0u64, 400u64);
    while sent < target {
        match stream.write_all(request.as_bytes()) {
            Ok(()) => sent += 1,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let received = server.stats.frames_received.load(Ordering::SeqCst);
    let held = server.stats.held_bytes_peak.load(Ordering::SeqCst);
    eprintln!(
        "sent {sent} requests of 512 KiB before the socket blocked; server read {received}, held peak {held} bytes"
    );
    assert!(sent < target, "the server must stop reading, so the client's writes block");
    assert!(held <= config.max_inflight_bytes, "held {held} bytes > max_inflight_bytes");
    // Requests the kernel buffers can hold plus those within the byte budget, not all 400.
    assert!(received < 40, "server read {received} requests although nobody reads the replies");
    // Now read: everything the server accepted is answered.
    drop(stream.try_clone().unwrap().shutdown(std::net::Shutdown::Write));
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut replies = Vec::new();
    stream.read_to_end(&mut replies).unwrap();
    let reply_len = OutFrame::encode(1, &EchoReply { payload: &payload }, 1 << 20).unwrap().len();
    assert_eq!(replies.len() % reply_len, 0);
    assert_eq!(replies.len() / reply_len, server.stats.frames_received.load(Ordering::SeqCst) as usize);
}

fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut reply = vec![0u8; 4096];
    let mut got = 0;
    let closed = loop {
        match stream.read(&mut reply[got..]) {
            Ok(0) => break true,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
        if got >= 32 {
            let len = 32 + u32::from_le_bytes(reply[12..16].try_into().unwrap()) as usize;
            if got >= len {
                // Check whether the server also closes.
                stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            }
        }
    };
    reply.truncate(got);
    (reply, closed)
}

fn error_code(reply: &[u8]) -> u32 {
    let len = 32 + u32::from_le_bytes(reply[12..16].try_into().unwrap()) as usize;
    let frame = Frame::parse(bytes::Bytes::copy_from_slice(&reply[..len]), 1 << 20).unwrap();
    frame.access::<ErrorReply>().unwrap().code.to_native()
}

#[test]
fn garbage_and_wrong_versions_get_an_error_frame_then_a_disconnect() {
    let server = server(TransportConfig::default(), Gate::default());
    let (reply, closed) = raw_exchange(server.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n______");
    assert_eq!(error_code(&reply), FrameError::BadMagic { found: 0 }.code());
    assert!(closed);

    let mut wrong_version = OutFrame::encode(3, &Heartbeat { sent_at_us: 1 }, 4096).unwrap().as_bytes().to_vec();
    // A peer of the previous protocol version.
    wrong_version[4] = (FRAME_VERSION - 1) as u8;
    let (reply, closed) = raw_exchange(server.addr, &wrong_version);
    assert_eq!(error_code(&reply), 2002);
    assert!(closed);

    let mut bad_crc = OutFrame::encode(3, &Heartbeat { sent_at_us: 1 }, 4096).unwrap().as_bytes().to_vec();
    *bad_crc.last_mut().unwrap() ^= 0x40;
    let (reply, closed) = raw_exchange(server.addr, &bad_crc);
    assert_eq!(error_code(&reply), 2006);
    assert!(closed);

    let mut oversize = OutFrame::encode(3, &Heartbeat { sent_at_us: 1 }, 4096).unwrap().as_bytes().to_vec();
    oversize[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let (reply, closed) = raw_exchange(server.addr, &oversize);
    assert_eq!(error_code(&reply), 2004);
    assert!(closed);
    assert_eq!(server.stats.protocol_errors.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kinds_and_unserved_kinds_get_typed_errors_and_the_connection_lives_on() {
    let server = server(TransportConfig::default(), Gate::default());
    let client = Client::connect(&endpoint(&server), TransportConfig::default(), "t").await.unwrap();
    let mut unknown = OutFrame::encode(0, &Heartbeat { sent_at_us: 1 }, 4096).unwrap().as_bytes().to_vec();
    unknown[6..8].copy_from_slice(&500u16.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&unknown[0..24]), &unknown[28..]);
    unknown[24..28].copy_from_slice(&crc.to_le_bytes());
    let reply = client.call_raw(OutFrame::from_raw(unknown.clone().into())).await.unwrap();
    assert_eq!(reply.access::<ErrorReply>().unwrap().code, 2003);
    // A kind this handler does not serve, and a malformed body of a kind it does.
    let err = client.call(&StatsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), 2008, "{err}");
    let mut malformed = unknown.clone();
    malformed[6..8].copy_from_slice(&(FrameKind::AppendRequest as u16).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&malformed[0..24]), &malformed[28..]);
    malformed[24..28].copy_from_slice(&crc.to_le_bytes());
    let reply = client.call_raw(OutFrame::from_raw(malformed.into())).await.unwrap();
    assert_eq!(reply.access::<ErrorReply>().unwrap().code, 2007);
    // Still usable.
    let reply = client.call(&Echo { payload: b"still here" }).await.unwrap();
    assert_eq!(&reply.access::<EchoReply>().unwrap().payload[..], b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_reply_times_out_and_a_dead_server_fails_calls_fast() {
    let config = TransportConfig { request_timeout_ms: 300, drain_timeout_ms: 300, ..TransportConfig::default() };
    let gate = Gate::default();
    gate.release_at.store(u64::MAX, Ordering::SeqCst);
    let server = server(config.clone(), gate.clone());
    let client = Client::connect(&endpoint(&server), config.clone(), "t").await.unwrap();
    let err = append(&client, 1, b"x").await.unwrap_err();
    assert!(matches!(err, TransportError::Timeout { timeout_ms: 300 }), "{err}");
    // The server still holds the request, so its credit stays taken until the reply comes.
    assert_eq!(client.available_credits(), config.credits as usize - 1);

    // Calls waiting on a server that goes away fail promptly with Closed, not a hang.
    let slow = TransportConfig { request_timeout_ms: 60_000, ..config };
    let client = Client::connect(&endpoint(&server), slow, "t").await.unwrap();
    let pending = tokio::spawn(async move { append(&client, 2, b"y").await });
    wait_for("request at the handler", || gate.arrived.load(Ordering::SeqCst) == 2).await;
    let started = Instant::now();
    drop(server);
    let err = pending.await.unwrap().unwrap_err();
    assert!(matches!(err, TransportError::Closed { .. } | TransportError::Io { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_keeps_its_credit_until_the_late_reply() {
    let gate = Gate::default();
    gate.release_at.store(u64::MAX, Ordering::SeqCst);
    let server = server(TransportConfig::default(), gate.clone());
    let client = Client::connect(&endpoint(&server), TransportConfig::default(), "t").await.unwrap();
    let call = tokio::spawn({
        let client = client.clone();
        async move { append(&client, 1, b"x").await }
    });
    wait_for("request at the handler", || gate.arrived.load(Ordering::SeqCst) == 1).await;
    call.abort();
    let _ = call.await;
    assert_eq!(client.available_credits(), 1023, "the server still holds the request");
    gate.open.store(true, Ordering::SeqCst);
    wait_for("late reply returns the credit", || client.available_credits() == 1024).await;
    client.call(&Echo { payload: b"next" }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_client_closes_its_connection() {
    let server = server(TransportConfig::default(), Gate::default());
    let client = Client::connect(&endpoint(&server), TransportConfig::default(), "t").await.unwrap();
    client.call(&Echo { payload: b"x" }).await.unwrap();
    assert_eq!(server.stats.connections_open.load(Ordering::SeqCst), 1);
    drop(client);
    wait_for("the server to see the connection close", || server.stats.connections_open.load(Ordering::SeqCst) == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_larger_than_the_client_accepts_fails_that_call_alone() {
    let server = server(TransportConfig::default(), Gate::default());
    let small = TransportConfig {
        max_frame_bytes: 64 << 10,
        max_inflight_bytes: 64 << 10,
        rdma: small_rdma(),
        ..TransportConfig::default()
    };
    let client = Client::connect(&endpoint(&server), small, "t").await.unwrap();
    assert_eq!(client.server().unwrap().max_frame_bytes, 64 << 10);
    // The Gate answers message id 7777 with an ack of 20,000 offsets (~160 KB): over the
    // client's limit although within the server's own.
    let err = append(&client, 7777, b"x").await.unwrap_err();
    assert!(matches!(err, TransportError::Remote { code: 2004, .. }), "{err}");
    assert_eq!(append(&client, 1, b"x").await.unwrap(), (1, 1), "the connection lives on");
}

fn small_rdma() -> sluice_transport::RdmaConfig {
    sluice_transport::RdmaConfig { ring_bytes: 1 << 20, ..sluice_transport::RdmaConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtins_only_server_answers_not_supported() {
    let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = ServerThread::spawn_tcp(
        bind,
        TransportConfig::default(),
        ServerInfo::default(),
        || sluice_transport::BuiltinsOnly,
        None,
    )
    .unwrap();
    let client = Client::connect(&format!("tcp://{}", server.addr), TransportConfig::default(), "t").await.unwrap();
    let err = client.call(&StatsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), sluice_transport::error::remote_code::NOT_SUPPORTED, "{err}");
    // A reply kind sent as a request is a protocol violation, answered, not fatal.
    let reply = client.call_raw(OutFrame::encode(0, &CommitOffsetResponse {}, 4096).unwrap()).await.unwrap();
    assert_eq!(reply.access::<ErrorReply>().unwrap().code, sluice_transport::error::remote_code::PROTOCOL_VIOLATION);
    client.call(&Echo { payload: b"still connected" }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_our_version_gives_a_typed_error_at_connect() {
    // A stand-in for a newer server: it answers any first frame with a connection-level
    // error frame (request id 0), as a Sluice server does for a version it does not speak.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut header = [0u8; 32];
        stream.read_exact(&mut header).unwrap();
        let refusal =
            ErrorReply { code: 2002, message: "unsupported frame version 1; this side speaks version 2".into() };
        stream.write_all(OutFrame::encode(0, &refusal, 4096).unwrap().as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let err = Client::connect(&format!("tcp://{addr}"), TransportConfig::default(), "t").await.err().unwrap();
    assert_eq!(err.code(), 2002, "{err}");
}

/// Reads until the server closes; returns how long that took, or None if it stayed open.
fn time_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut sink = Vec::new();
    match stream.read_to_end(&mut sink) {
        Ok(_) => Some(started.elapsed()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
        Err(_) => Some(started.elapsed()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_cut_off_and_heartbeats_keep_clients_alive() {
    let config = TransportConfig {
        idle_timeout_ms: 400,
        heartbeat_interval_ms: 100,
        frame_timeout_ms: 500,
        ..TransportConfig::default()
    };
    let server = server(config.clone(), Gate::default());
    // A socket that never says anything.
    let mut silent = TcpStream::connect(server.addr).unwrap();
    let closed = time_until_closed(&mut silent, Duration::from_secs(10)).expect("a silent peer is closed");
    assert!(closed >= Duration::from_millis(300) && closed < Duration::from_secs(5), "{closed:?}");
    // A socket that sends one request, reads the reply, then goes silent.
    let mut quiet = TcpStream::connect(server.addr).unwrap();
    quiet.write_all(OutFrame::encode(1, &Heartbeat { sent_at_us: 1 }, 4096).unwrap().as_bytes()).unwrap();
    let mut reply = [0u8; 32];
    quiet.read_exact(&mut reply).unwrap();
    let closed =
        time_until_closed(&mut quiet, Duration::from_secs(10)).expect("a peer silent after a request is closed");
    assert!(closed < Duration::from_secs(5), "{closed:?}");
    // A half-sent frame is cut off after frame_timeout_ms.
    let mut half = TcpStream::connect(server.addr).unwrap();
    half.write_all(&OutFrame::encode(1, &Heartbeat { sent_at_us: 1 }, 4096).unwrap().as_bytes()[..10]).unwrap();
    let closed = time_until_closed(&mut half, Duration::from_secs(10)).expect("a half-sent frame is cut off");
    assert!(closed < Duration::from_secs(5), "{closed:?}");
    // A client that sends nothing itself for 3× the idle timeout stays connected: heartbeats.
    let client = Client::connect(&endpoint(&server), config, "t").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(client.closed_error().is_none());
    assert_eq!(server.stats.connections_open.load(Ordering::SeqCst), 1);
    client.call(&Echo { payload: b"ok" }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_and_limits_negotiated_in_hello() {
    let server_config = TransportConfig {
        credits: 4,
        max_frame_bytes: 8 << 20,
        max_inflight_bytes: 16 << 20,
        ..TransportConfig::default()
    };
    let server = server(server_config, Gate::default());
    let client = Client::connect(&endpoint(&server), TransportConfig::default(), "t").await.unwrap();
    let hello = client.server().unwrap();
    assert_eq!((hello.credits, hello.max_frame_bytes), (4, 8 << 20));
    assert_eq!(client.available_credits(), 4);
    let body: Vec<u8> = (0..(6 << 20)).map(|i: u32| (i % 251) as u8).collect();
    assert_eq!(append(&client, 9, &body).await.unwrap(), (9, body.len() as u64));
    let err = append(&client, 10, &vec![0u8; 9 << 20]).await.unwrap_err();
    assert_eq!(err.code(), 2004, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_checked_and_auto_falls_back_to_tcp_without_a_device() {
    let server = server(TransportConfig::default(), Gate::default());
    let err = Client::connect(&format!("udp://{}", server.addr), TransportConfig::default(), "t").await.err().unwrap();
    assert_eq!(err.code(), 2105);
    let client = Client::connect(&format!("auto://{}", server.addr), TransportConfig::default(), "t").await.unwrap();
    if !sluice_transport::rdma::device_present() {
        assert_eq!(client.transport(), sluice_transport::TransportKind::Tcp);
    }
    client.call(&Echo { payload: b"auto" }).await.unwrap();
    let err = Client::connect("tcp://127.0.0.1:1", TransportConfig::default(), "t").await.err().unwrap();
    assert_eq!(err.code(), 2101, "{err}");
}

/// A client whose link is cut (the relay holds every byte, closes nothing) while a call waits:
/// the call fails as a dead link once a heartbeat goes unanswered, long before its request
/// timeout, and the connection is closed from this side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_fails_its_calls_as_dead_and_closes() {
    let server = server(TransportConfig::default(), Gate { open: Arc::new(AtomicBool::new(true)), ..Gate::default() });
    let relay = sluice_transport::relay::Relay::start(server.addr).await.unwrap();
    let config = TransportConfig {
        request_timeout_ms: 600_000,
        silence_probe_ms: 100,
        dead_link_timeout_ms: 300,
        ..TransportConfig::default()
    };
    let client = Client::connect(&format!("tcp://{}", relay.addr()), config, "t").await.unwrap();
    assert_eq!(append(&client, 1, b"before").await.unwrap(), (1, 6));
    relay.cut();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(120), append(&client, 2, b"during"))
        .await
        .expect("the call ends long before its 600 s request timeout")
        .unwrap_err();
    eprintln!("dead link noticed after {:?}: {err}", started.elapsed());
    assert_eq!(err.code(), 2111, "{err}");
    assert!(err.to_string().contains("dead_link_timeout_ms"), "{err}");
    tokio::time::timeout(Duration::from_secs(20), client.closed()).await.expect("closed() completes");
    // Later calls fail at once with the same reason instead of waiting on the dead link.
    assert_eq!(append(&client, 3, b"after").await.unwrap_err().code(), 2111);
    relay.heal();
    let fresh = Client::connect(&format!("tcp://{}", relay.addr()), TransportConfig::default(), "t").await.unwrap();
    assert_eq!(append(&fresh, 4, b"healed").await.unwrap(), (4, 6));
}

/// The other side of the same rule: a server that takes long to answer a request, but answers
/// heartbeats, keeps its link; the call waits for its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_on_a_live_link_is_not_taken_for_dead() {
    let gate = Gate::default();
    gate.release_at.store(u64::MAX, Ordering::SeqCst);
    let server = server(TransportConfig::default(), gate.clone());
    let config = TransportConfig {
        request_timeout_ms: 600_000,
        silence_probe_ms: 20,
        dead_link_timeout_ms: 60,
        ..TransportConfig::default()
    };
    let client = Client::connect(&endpoint(&server), config, "t").await.unwrap();
    let call = {
        let client = client.clone();
        tokio::spawn(async move { append(&client, 5, b"slow").await })
    };
    wait_for("the request at the handler", || gate.arrived.load(Ordering::SeqCst) == 1).await;
    // Many probe rounds pass while the handler holds the request.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(client.closed_error().is_none(), "{:?}", client.closed_error());
    assert!(!call.is_finished());
    assert!(server.stats.frames_received.load(Ordering::SeqCst) > 2, "heartbeat probes were sent");
    gate.open.store(true, Ordering::SeqCst);
    assert_eq!(call.await.unwrap().unwrap(), (5, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_names_connect_timeout_ms() {
    // A listener that never accepts: once its accept queue is full, the kernel drops further
    // SYNs, so a connect hangs as it does towards a cut-off host.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => queued.push(stream),
            _ => break,
        }
    }
    let config = TransportConfig { connect_timeout_ms: 200, ..TransportConfig::default() };
    let err = Client::connect(&format!("tcp://{addr}"), config, "t").await.err().expect("nothing accepts");
    assert_eq!(err.code(), 2110, "{err}");
    assert!(err.to_string().contains("200 ms (connect_timeout_ms)"), "{err}");
    drop(listener);
}
