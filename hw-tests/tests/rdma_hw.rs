//! RDMA hardware tests: ping-pong, bulk transfer and a latency probe over a real device.
//! Run with `cargo test --release -p sluice-hw-tests -- --ignored --nocapture --test-threads=1`
//! or `scripts/hw-tests.sh`. Sizes and counts can be raised on real hardware:
//! `SLUICE_HW_BULK_MIB` (default 256), `SLUICE_HW_LATENCY_ROUND_TRIPS` (default 20000);
//! `SLUICE_HW_BUSY_POLL_US` and `SLUICE_HW_BUSY_POLL_MAX_US` override `rdma.busy_poll_us` and
//! `rdma.busy_poll_max_us` for the latency probe.

use std::time::{Duration, Instant};

use sluice_hw_tests::{close, device_or_skip, echo_frame, link, recv, spawn_echo, Percentiles};
use sluice_transport::messages::{Echo, EchoReply};
use sluice_transport::TransportConfig;

const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn payload(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
}

#[test]
#[ignore = "needs an RDMA device; run with --ignored (scripts/hw-tests.sh)"]
fn rdma_ping_pong_echoes_every_size_intact() {
    if !device_or_skip("rdma_ping_pong_echoes_every_size_intact") {
        return;
    }
    let config = TransportConfig::default();
    let (client, server) = link(&config);
    let echo = spawn_echo(server, &config);
    // Both sides of the SEND/ring boundary (8192-byte slots), up to 16 MiB through the ring.
    let sizes: [(usize, u64); 8] =
        [(0, 500), (64, 500), (4000, 500), (8100, 200), (8300, 200), (65_536, 100), (1 << 20, 20), (16 << 20, 4)];
    let mut id = 0;
    for (len, round_trips) in sizes {
        let body = payload(len, len as u8);
        let started = Instant::now();
        for _ in 0..round_trips {
            client.tx.send(echo_frame(id, &body, &config)).expect("client driver alive");
            let reply = recv(&client, REPLY_TIMEOUT, "echo reply");
            assert_eq!(reply.request_id(), id);
            let reply = reply.access::<EchoReply>().expect("an EchoReply");
            assert!(reply.payload[..] == body[..], "payload of {len} bytes came back intact");
            id += 1;
        }
        let per = started.elapsed() / round_trips as u32;
        println!("ping-pong {len:>9} B: {round_trips:>4} round trips, {:.1} us each", per.as_secs_f64() * 1e6);
    }
    let client_stats = client.driver.stats();
    close(client).expect("clean close");
    let server_stats = echo.join().expect("echo thread");
    println!("client {client_stats:?}\nserver {server_stats:?}");
    assert!(client_stats.frames_sent_write > 0 && client_stats.frames_sent_send > 0, "both paths used");
    assert_eq!(server_stats.frames_received_send + server_stats.frames_received_ring, id);
}

#[test]
#[ignore = "needs an RDMA device; run with --ignored (scripts/hw-tests.sh)"]
fn rdma_bulk_transfer_streams_large_and_small_frames() {
    if !device_or_skip("rdma_bulk_transfer_streams_large_and_small_frames") {
        return;
    }
    let bulk_mib = env_or("SLUICE_HW_BULK_MIB", 256);
    let config = TransportConfig::default();
    let (client, server) = link(&config);

    for (label, frame_bytes, count) in [
        ("4 MiB frames (RDMA WRITE)", 4usize << 20, bulk_mib / 4),
        ("64 B frames (SEND)", 64usize, 50_000),
        ("4 KiB frames (SEND)", 4096usize, 20_000),
    ] {
        let body = payload(frame_bytes, 7);
        let sender_body = body.clone();
        let tx = client.tx.clone();
        let started = Instant::now();
        let sender = std::thread::spawn(move || {
            let config = TransportConfig::default();
            for id in 0..count {
                tx.send(echo_frame(id, &sender_body, &config)).expect("client driver alive");
            }
        });
        for id in 0..count {
            let frame = recv(&server, REPLY_TIMEOUT, "bulk frame");
            assert_eq!(frame.request_id(), id, "in order");
            let echo = frame.access::<Echo>().expect("an Echo");
            assert!(echo.payload[..] == body[..], "frame {id} intact");
        }
        sender.join().unwrap();
        let secs = started.elapsed().as_secs_f64();
        let mib = (count as f64) * frame_bytes as f64 / (1 << 20) as f64;
        println!(
            "bulk {label}: {count} frames, {mib:.1} MiB in {secs:.2} s = {:.1} MiB/s, {:.0} frames/s",
            mib / secs,
            count as f64 / secs
        );
    }
    let (sent, received) = (client.driver.stats(), server.driver.stats());
    println!("client {sent:?}\nserver {received:?}");
    assert_eq!(sent.frames_sent_write, bulk_mib / 4);
    assert_eq!(received.frames_received_ring, bulk_mib / 4);
    drop(server);
    let _ = close(client);
}

#[test]
#[ignore = "needs an RDMA device; run with --ignored (scripts/hw-tests.sh)"]
fn rdma_latency_probe_reports_percentiles() {
    if !device_or_skip("rdma_latency_probe_reports_percentiles") {
        return;
    }
    let round_trips = env_or("SLUICE_HW_LATENCY_ROUND_TRIPS", 20_000) as usize;
    let warmup = 1_000;
    let mut config = TransportConfig::default();
    // Out of range stays out of range, for the transport's own check to refuse.
    let micros = |name, default: u32| u32::try_from(env_or(name, default.into())).unwrap_or(u32::MAX);
    config.rdma.busy_poll_us = micros("SLUICE_HW_BUSY_POLL_US", config.rdma.busy_poll_us);
    config.rdma.busy_poll_max_us = micros("SLUICE_HW_BUSY_POLL_MAX_US", config.rdma.busy_poll_max_us);
    println!("poller busy-polls {}..{} µs before sleeping", config.rdma.busy_poll_us, config.rdma.busy_poll_max_us);
    let (client, server) = link(&config);
    let echo = spawn_echo(server, &config);
    let mut id = 0;
    for len in [64usize, 4096] {
        let body = payload(len, 3);
        let mut samples = Vec::with_capacity(round_trips);
        for i in 0..warmup + round_trips {
            let frame = echo_frame(id, &body, &config);
            let started = Instant::now();
            client.tx.send(frame).expect("client driver alive");
            let reply = recv(&client, REPLY_TIMEOUT, "echo reply");
            let rtt = started.elapsed();
            assert_eq!(reply.request_id(), id);
            if i >= warmup {
                samples.push(rtt);
            }
            id += 1;
        }
        println!("latency probe {len:>5} B echo round trip: {}", Percentiles::of(&mut samples));
    }
    close(client).expect("clean close");
    echo.join().expect("echo thread");
}
