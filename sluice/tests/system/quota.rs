//! Consumer-group receive quotas (`max_receive_tps`) held by the broker shard that owns the
//! group's record: one quota across two separate `sluice proxy` processes, the
//! TOO_MANY_REQUESTS answer of a `reject` group, and a run-time change with the CLI. Also the
//! back-pressure of a shard at its disk floor: sends get TOO_MANY_REQUESTS, receives and acks
//! go on.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const OK: i32 = v2::Code::Ok as i32;
const MESSAGE_NOT_FOUND: i32 = v2::Code::MessageNotFound as i32;
const TOO_MANY_REQUESTS: i32 = v2::Code::TooManyRequests as i32;
const SECS: fn(u64) -> Duration = Duration::from_secs;

async fn create_quota_group(addr: std::net::SocketAddr, name: &str, max_receive_tps: u32, throttle: &str) {
    let mut client = admin_client(addr).await;
    let request = admin::CreateGroupRequest {
        name: name.into(),
        max_receive_tps,
        throttle: throttle.into(),
        ..Default::default()
    };
    let reply = client.create_group(request).await.expect("CreateGroup").into_inner();
    assert_eq!(code(reply.status.as_ref()), OK, "{reply:?}");
    let group = reply.group.expect("group");
    assert_eq!((group.max_receive_tps, group.throttle.as_str()), (max_receive_tps, throttle));
}

async fn proxy_counter(addr: std::net::SocketAddr, name: &str) -> u64 {
    let mut client = admin_client(addr).await;
    let stats = client.get_stats(admin::GetStatsRequest {}).await.expect("GetStats").into_inner();
    stats.proxy.iter().find(|c| c.name == name).map_or(0, |c| c.value)
}

async fn backlog(addr: std::net::SocketAddr, topic: &str, count: usize) {
    let mut client = messaging(addr).await;
    for start in (0..count).step_by(100) {
        let batch = (start..(start + 100).min(count)).map(|i| message(topic, format!("m{i}").into_bytes())).collect();
        send_ok(&mut client, batch).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_quota_holds_across_two_proxies() {
    const TPS: u32 = 50;
    const WINDOW_S: u64 = 10;
    let broker = Broker::start("broker", 2).await;
    let a = Proxy::start("proxy-a", &[broker.address()]).await;
    let b = Proxy::start("proxy-b", &[broker.address()]).await;
    create_topic(a.grpc, "jobs", 4).await;
    create_quota_group(a.grpc, "gpu", TPS, "wait").await;
    // Far more than the quota lets through in the window.
    backlog(a.grpc, "jobs", 2_000).await;

    let received = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let until = start + SECS(WINDOW_S);
    let mut consumers = Vec::new();
    for proxy in [a.grpc, b.grpc, a.grpc, b.grpc] {
        let received = received.clone();
        consumers.push(tokio::spawn(async move {
            let mut client = messaging(proxy).await;
            while Instant::now() < until {
                let r = receive(&mut client, "jobs", "gpu", 16, SECS(30), SECS(1)).await;
                assert!([OK, MESSAGE_NOT_FOUND].contains(&r.code()), "{:?}", r.statuses);
                if Instant::now() <= until {
                    received.fetch_add(r.messages.len(), Ordering::Relaxed);
                }
                ack_all(&mut client, "jobs", "gpu", &r.messages).await;
            }
        }));
    }
    for c in consumers {
        c.await.expect("consumer");
    }
    let got = received.load(Ordering::Relaxed) as f64;
    let want = f64::from(TPS) * WINDOW_S as f64;
    assert!((want * 0.9..=want * 1.1).contains(&got), "{got} received in {WINDOW_S} s at a quota of {TPS}/s");
    let stats = broker_counters(a.grpc).await;
    assert!(stats["quota_throttled"] > 0, "the broker throttled: {stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reject_group_over_its_quota_gets_too_many_requests_until_the_quota_is_lifted() {
    let local = Local::start().await;
    create_topic(local.grpc, "jobs", 2).await;
    create_quota_group(local.grpc, "strict", 1, "reject").await;
    backlog(local.grpc, "jobs", 20).await;
    let mut client = messaging(local.grpc).await;
    let first = receive(&mut client, "jobs", "strict", 8, SECS(30), SECS(1)).await;
    assert_eq!((first.code(), first.messages.len()), (OK, 1), "one permit: {:?}", first.statuses);
    let second = receive(&mut client, "jobs", "strict", 8, SECS(30), SECS(1)).await;
    assert_eq!(second.code(), TOO_MANY_REQUESTS, "{:?}", second.statuses);
    assert!(second.messages.is_empty());

    let endpoint = local.grpc.to_string();
    let (ok, out, err) = cli(&["group", "update", "strict", "--max-receive-tps", "0", "--endpoint", &endpoint]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("updated consumer group strict"), "{out}");
    let lifted = receive(&mut client, "jobs", "strict", 8, SECS(30), SECS(1)).await;
    assert_eq!((lifted.code(), lifted.messages.len()), (OK, 8), "no quota: {:?}", lifted.statuses);
    let (ok, out, _) = cli(&["group", "list", "--json", "--endpoint", &endpoint]).await;
    assert!(ok);
    let groups: serde_json::Value = serde_json::from_str(&out).expect("json");
    let strict = groups.as_array().unwrap().iter().find(|g| g["name"] == "strict").expect("listed");
    assert_eq!(strict["max_receive_tps"], 0);

    // `sluice stats` per group: after acking the 9 received, 11 are left (ready, or still
    // leased by a pop whose surplus the proxy is giving back), the rejected receive was
    // counted, and the delivery rate shows once a whole second has passed.
    ack_all(&mut client, "jobs", "strict", &first.messages).await;
    ack_all(&mut client, "jobs", "strict", &lifted.messages).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stats = stats_cli(&endpoint).await;
    let row = stats["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|r| r["group"] == "strict" && r["topic"] == "jobs"))
        .unwrap_or_else(|| panic!("no row for strict/jobs: {stats}"))
        .clone();
    let n = |k: &str| row[k].as_u64().unwrap_or_else(|| panic!("{k} in {row}"));
    assert_eq!(n("ready") + n("inflight"), 11, "{row}");
    assert!(n("throttled") >= 1, "the rejected receive: {row}");
    assert!(n("delivered") >= 9, "{row}");
    assert!(row["rate_per_s"].as_f64().is_some_and(|r| r > 0.0), "{row}");
    let (ok, text, _) = cli(&["stats", "--endpoint", &endpoint]).await;
    assert!(ok && text.contains("BACKLOG") && text.lines().any(|l| l.starts_with("strict ")), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_topic_send_quota_refuses_or_delays_sends_beyond_it() {
    let local = Local::start().await;
    create_topic(local.grpc, "ingest", 2).await;
    let endpoint = local.grpc.to_string();
    let update = |tps: &'static str, mode: &'static str| {
        let endpoint = endpoint.clone();
        async move {
            let args =
                ["topic", "update", "ingest", "--max-send-tps", tps, "--send-throttle", mode, "--endpoint", &endpoint];
            let (ok, out, err) = cli(&args).await;
            assert!(ok, "{out}{err}");
            out
        }
    };
    assert!(update("2", "reject").await.contains("at most 2 messages/s sent (reject when over)"));
    let mut client = messaging(local.grpc).await;
    // The bucket holds one permit (0.1 s of 2/s, at least one): one of three goes through.
    let batch = (0..3).map(|i| message("ingest", format!("m{i}").into_bytes())).collect();
    let reply = send(&mut client, batch).await;
    let codes: Vec<i32> = reply.entries.iter().map(|e| code(e.status.as_ref())).collect();
    assert_eq!(codes, [OK, TOO_MANY_REQUESTS, TOO_MANY_REQUESTS], "{reply:?}");

    // Waiting instead: three messages at 2/s all go through (in about a second), none refused.
    update("2", "wait").await;
    let throttled_before = proxy_counter(local.grpc, "sends_throttled").await;
    let batch = (0..3).map(|i| message("ingest", format!("w{i}").into_bytes())).collect();
    send_ok(&mut client, batch).await;
    assert!(proxy_counter(local.grpc, "sends_throttled").await > throttled_before, "the send waited for permits");

    update("0", "wait").await;
    let batch = (0..50).map(|i| message("ingest", format!("f{i}").into_bytes())).collect();
    send_ok(&mut client, batch).await;
}

/// Sets `[broker] disk_free_min_bytes` in the config file `Local::start_with_config` wrote.
fn set_disk_floor(data_dir: &std::path::Path, bytes: u64) {
    let path = data_dir.parent().expect("data dir has a parent").join("local.toml");
    std::fs::write(path, format!("[broker]\ndisk_free_min_bytes = {bytes}\n")).expect("write config");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_at_its_disk_floor_refuses_sends_with_too_many_requests_while_receives_and_acks_go_on() {
    let local = Local::start_with_config("[broker]\ndisk_free_min_bytes = 0\n", &[]).await;
    create_topic(local.grpc, "jobs", 4).await;
    backlog(local.grpc, "jobs", 20).await;
    // A floor above any disk's free space: the broker is "full" from its first append on.
    let local = local.stop_and_restart(|data| set_disk_floor(data, 1 << 62)).await;

    let mut client = messaging(local.grpc).await;
    let reply = send(&mut client, vec![message("jobs", b"late".to_vec())]).await;
    let status = reply.status.clone().expect("status");
    assert_eq!(status.code, TOO_MANY_REQUESTS, "{reply:?}");
    assert!(status.message.contains("Retry later") && status.message.contains("disk_free_min_bytes"), "{status:?}");

    let mut received = 0;
    for _ in 0..20 {
        let r = receive(&mut client, "jobs", "workers", 16, SECS(30), SECS(1)).await;
        assert!([OK, MESSAGE_NOT_FOUND].contains(&r.code()), "{:?}", r.statuses);
        ack_all(&mut client, "jobs", "workers", &r.messages).await;
        received += r.messages.len();
        if received >= 20 {
            break;
        }
    }
    assert_eq!(received, 20, "everything accepted before the floor is delivered and acked");
    let counters = broker_counters(local.grpc).await;
    assert!(counters.get("appends_refused_disk_full").is_some_and(|n| *n >= 1), "{counters:?}");
    assert!(counters.get("disk_free_bytes").is_some_and(|n| *n > 0), "{counters:?}");

    // Space again (a floor of 1 MiB): sends go in, and the acks made at the floor held.
    let local = local.stop_and_restart(|data| set_disk_floor(data, 1 << 20)).await;
    let mut client = messaging(local.grpc).await;
    send_ok(&mut client, vec![message("jobs", b"later".to_vec())]).await;
    let r = receive(&mut client, "jobs", "workers", 16, SECS(30), SECS(3)).await;
    let bodies: Vec<&[u8]> = r.messages.iter().map(|m| m.body.as_slice()).collect();
    assert_eq!(bodies, vec![b"later".as_slice()], "only the new message: the 20 acks survived the restart");
}
