//! Weighted fairness across tenants, through the RocketMQ v2 API of a real `sluice local`
//! (2 shards): a NORMAL topic created with `--fair-key tenant` shares a backlogged group's
//! deliveries among tenants by weight, weights change at run time, and a tenant's flood does
//! not hold back another tenant's message.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

const OK: i32 = v2::Code::Ok as i32;
const MESSAGE_NOT_FOUND: i32 = v2::Code::MessageNotFound as i32;
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn tenant_message(topic: &str, tenant: &str, seq: usize) -> v2::Message {
    let mut m = message(topic, format!("{tenant}-{seq}").into_bytes());
    m.user_properties.insert("tenant".into(), tenant.into());
    m
}

fn tenant_of(m: &v2::Message) -> String {
    m.user_properties.get("tenant").cloned().unwrap_or_default()
}

async fn cli_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = cli(args).await;
    assert!(ok, "sluice {args:?} failed\nstdout: {stdout}\nstderr: {stderr}");
    stdout
}

/// Sends `per_tenant` messages for each tenant, interleaved, 90 per request.
async fn send_backlog(client: &mut Messaging, topic: &str, tenants: &[&str], per_tenant: usize) {
    let all: Vec<(usize, &str)> = (0..per_tenant).flat_map(|i| tenants.iter().map(move |t| (i, *t))).collect();
    for chunk in all.chunks(90) {
        send_ok(client, chunk.iter().map(|(i, t)| tenant_message(topic, t, *i)).collect()).await;
    }
}

/// Receives and acks until `count` deliveries; returns the tenant of each, in order.
async fn consume(client: &mut Messaging, topic: &str, group: &str, count: usize) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + SECS(120);
    while got.len() < count {
        assert!(Instant::now() < deadline, "only {} of {count} deliveries in 120 s", got.len());
        let want = (count - got.len()).min(32) as i32;
        let r = receive(client, topic, group, want, SECS(60), SECS(1)).await;
        assert!([OK, MESSAGE_NOT_FOUND].contains(&r.code()), "{:?}", r.statuses);
        ack_all(client, topic, group, &r.messages).await;
        got.extend(r.messages.iter().map(tenant_of));
    }
    got
}

fn shares(got: &[String]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for t in got {
        *counts.entry(t.clone()).or_default() += 1;
    }
    counts
}

fn assert_shares(got: &[String], weights: &[(&str, u32)], tolerance: f64) {
    let counts = shares(got);
    let total_weight: u32 = weights.iter().map(|(_, w)| w).sum();
    for (tenant, weight) in weights {
        let want = got.len() as f64 * f64::from(*weight) / f64::from(total_weight);
        let have = counts.get(*tenant).copied().unwrap_or(0) as f64;
        assert!(
            (have - want).abs() <= want * tolerance,
            "tenant {tenant} (weight {weight}) got {have} of {} deliveries, want {want:.0} ±{:.0}%; all: {counts:?}",
            got.len(),
            tolerance * 100.0
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn backlogged_tenants_share_deliveries_by_weight_and_weights_change_at_run_time() {
    let local = Local::start().await;
    let endpoint = local.grpc.to_string();
    let created = cli_ok(&[
        "topic",
        "create",
        "inference",
        "--queues",
        "4",
        "--fair-key",
        "tenant",
        "--fair-weights",
        "a=1,b=2,c=4",
        "--endpoint",
        &endpoint,
    ])
    .await;
    assert!(created.contains("fair by \"tenant\", weights a=1,b=2,c=4"), "{created}");
    let mut client = messaging(local.grpc).await;
    // 7,000 each: every tenant stays backlogged through 10,000 deliveries. c, the heaviest, takes
    // 4/7 of them (5,714), and the ±10% check lets it take up to 6,286.
    send_backlog(&mut client, "inference", &["a", "b", "c"], 7_000).await;

    let got = consume(&mut client, "inference", "gpus", 10_000).await;
    assert_shares(&got, &[("a", 1), ("b", 2), ("c", 4)], 0.10);

    // Turned around at run time: the next 1,400 deliveries follow the new weights (c has at
    // least 714 left, more than its new share of 200).
    let updated =
        cli_ok(&["topic", "update", "inference", "--fair-weights", "a=4,b=2,c=1", "--endpoint", &endpoint]).await;
    assert!(updated.contains("weights a=4,b=2,c=1"), "{updated}");
    let got = consume(&mut client, "inference", "gpus", 1_400).await;
    assert_shares(&got, &[("a", 4), ("b", 2), ("c", 1)], 0.15);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_flood_does_not_hold_back_another_tenants_message() {
    const FLOOD: usize = 20_000;
    const BATCH: i32 = 8;
    let local = Local::start().await;
    let endpoint = local.grpc.to_string();
    cli_ok(&["topic", "create", "inference", "--queues", "2", "--fair-key", "tenant", "--endpoint", &endpoint]).await;
    let mut client = messaging(local.grpc).await;
    send_backlog(&mut client, "inference", &["heavy"], FLOOD).await;
    // The group is busy with the flood when the light tenant's one message arrives.
    let first = consume(&mut client, "inference", "gpus", 100).await;
    assert!(first.iter().all(|t| t == "heavy"));
    send_ok(&mut client, vec![tenant_message("inference", "light", 0)]).await;

    // Per shard, at most one heavy message goes first (the bound is one delivery per other
    // backlogged tenant). The proxy answers with the first shard's batch, so the light message
    // is in the first receive or, if its shard answered second, the next.
    let mut before = 0;
    for receive_no in 1..=2 {
        let r = receive(&mut client, "inference", "gpus", BATCH, SECS(60), SECS(5)).await;
        assert_eq!(r.code(), OK, "{:?}", r.statuses);
        ack_all(&mut client, "inference", "gpus", &r.messages).await;
        if let Some(at) = r.messages.iter().position(|m| tenant_of(m) == "light") {
            eprintln!("the light message came in receive {receive_no}, after {} heavy ones", before + at);
            return;
        }
        before += r.messages.len();
    }
    panic!("the light tenant's message was not among the next {before} deliveries, behind a flood of {FLOOD}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fairness_settings_are_checked() {
    let local = Local::start().await;
    let endpoint = local.grpc.to_string();
    for (args, needle) in [
        (vec!["--type", "fifo", "--fair-key", "tenant"], "only NORMAL topics"),
        (vec!["--fair-weights", "a=1"], "need a fairness key"),
        (vec!["--fair-key", "tenant", "--fair-weights", "a=0"], "1..=1000"),
        (vec!["--fair-key", "tenant", "--fair-weights", "a"], "tenant=weight"),
        (vec!["--fair-key", "ten=ant"], "without control characters"),
    ] {
        let mut all = vec!["topic", "create", "t", "--endpoint", &endpoint];
        all.extend(args.iter().copied());
        let (ok, stdout, stderr) = cli(&all).await;
        assert!(!ok, "{all:?} succeeded: {stdout}");
        assert!(stderr.contains(needle), "{all:?}: {stderr}");
    }
    cli_ok(&["topic", "create", "t", "--fair-key", "tenant", "--endpoint", &endpoint]).await;
    let (ok, _, stderr) = cli(&["topic", "update", "t", "--fair-weights", "x=5000", "--endpoint", &endpoint]).await;
    assert!(!ok && stderr.contains("1..=1000"), "{stderr}");
    let listed = cli_ok(&["topic", "list", "--json", "--endpoint", &endpoint]).await;
    let topics: serde_json::Value = serde_json::from_str(listed.trim()).expect("JSON");
    let t = topics.as_array().and_then(|a| a.iter().find(|t| t["name"] == "t")).expect("topic t listed");
    assert_eq!((t["fair_key"].as_str(), t["fair_default_weight"].as_u64()), (Some("tenant"), Some(1)), "{t}");
}
