//! `sluice message get` / `find` and `sluice group reset` against a real `sluice local`,
//! through the CLI's JSON output.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use sluice_proto::apache::rocketmq::v2;

const OK: i32 = v2::Code::Ok as i32;
const MESSAGE_NOT_FOUND: i32 = v2::Code::MessageNotFound as i32;
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn body_text(m: &v2::Message) -> String {
    String::from_utf8_lossy(&m.body).into_owned()
}

fn keyed(topic: &str, body: &str, keys: &[&str]) -> v2::Message {
    let mut m = message(topic, body.as_bytes().to_vec());
    m.system_properties.as_mut().expect("system").keys = keys.iter().map(|k| k.to_string()).collect();
    m.user_properties.insert("origin".into(), "inspect-test".into());
    m
}

/// `sluice --json ARGS --endpoint E`, parsed; panics unless it succeeds.
async fn cli_json(local: &Local, args: &[&str]) -> serde_json::Value {
    let endpoint = local.endpoint();
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--endpoint", &endpoint]);
    let (ok, out, err) = cli(&all).await;
    assert!(ok, "sluice {all:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("sluice {all:?} printed no JSON ({e}): {out}"))
}

/// Receives until `want` messages came (acking them when `ack`), with `invisible` leases.
async fn take(
    client: &mut Messaging,
    topic: &str,
    group: &str,
    want: usize,
    invisible: Duration,
    ack: bool,
) -> Vec<v2::Message> {
    let deadline = Instant::now() + SECS(30);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let r = receive(client, topic, group, 32, invisible, SECS(2)).await;
        assert!([OK, MESSAGE_NOT_FOUND].contains(&r.code()), "{:?}", r.statuses);
        if ack {
            ack_all(client, topic, group, &r.messages).await;
        }
        got.extend(r.messages);
    }
    got
}

fn group_state<'a>(message: &'a serde_json::Value, group: &str) -> Option<&'a serde_json::Value> {
    message["groups"].as_array()?.iter().find(|g| g["group"] == group)
}

#[tokio::test(flavor = "multi_thread")]
async fn message_get_shows_where_a_message_is_and_where_each_group_stands() {
    let local = Local::start().await;
    create_topic(local.grpc, "orders", 4).await;
    create_group(local.grpc, "billing", 16, false).await;
    create_group(local.grpc, "audit", 16, false).await;
    create_group(local.grpc, "picky", 1, false).await;
    let mut client = messaging(local.grpc).await;
    let target = keyed("orders", "order 7 paid", &["order-7"]);
    let id = message_id(&target);
    send_ok(&mut client, vec![target, keyed("orders", "order 8 paid", &["order-8"])]).await;

    take(&mut client, "orders", "billing", 2, SECS(30), true).await;
    take(&mut client, "orders", "audit", 2, SECS(60), false).await;
    // picky may deliver once: the next receive after the lease ends dead-letters both.
    take(&mut client, "orders", "picky", 2, SECS(1), false).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for _ in 0..3 {
        let again = receive(&mut client, "orders", "picky", 32, SECS(30), SECS(1)).await;
        assert!(again.messages.is_empty(), "past max attempts nothing is handed out: {:?}", again.messages);
    }

    let found = cli_json(&local, &["message", "get", "--topic", "orders", "--id", &id]).await;
    let messages = found["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 1, "{found}");
    let m = &messages[0];
    assert_eq!((m["message_id"].as_str(), m["topic"].as_str()), (Some(id.as_str()), Some("orders")));
    assert_eq!(m["keys"], serde_json::json!(["order-7"]));
    assert_eq!(m["properties"]["origin"], "inspect-test");
    assert_eq!((m["body_bytes"].as_u64(), m["body_preview"].as_str()), (Some(12), Some("order 7 paid")));
    assert!(m["queue"].as_u64().expect("queue") < 4 && m["offset"].is_u64() && m["stored_at"].is_string(), "{m}");
    assert!(m["store_time_ms"].as_i64().expect("store time") > 0);
    assert_eq!(group_state(m, "billing").expect("billing")["state"], "acked", "{m}");
    let audit = group_state(m, "audit").expect("audit");
    assert_eq!((audit["state"].as_str(), audit["attempt"].as_u64()), (Some("in_flight"), Some(1)), "{m}");
    assert_eq!(group_state(m, "picky").expect("picky")["state"], "dead_lettered", "{m}");

    let (ok, _, err) =
        cli(&["message", "get", "--topic", "orders", "--id", "no-such-id", "--endpoint", &local.endpoint()]).await;
    assert!(!ok && err.contains("no message no-such-id in topic orders"), "{err}");
    let none = cli_json(&local, &["message", "get", "--topic", "orders", "--id", "no-such-id"]).await;
    assert_eq!(none["messages"], serde_json::json!([]));
    let (ok, _, err) = cli(&["message", "get", "--topic", "nope", "--id", &id, "--endpoint", &local.endpoint()]).await;
    assert!(!ok && err.contains("TOPIC_NOT_FOUND"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn message_find_lists_a_shared_key_newest_first_and_bounded() {
    let local = Local::start().await;
    create_topic(local.grpc, "events", 4).await;
    create_topic(local.grpc, "other", 2).await;
    let mut client = messaging(local.grpc).await;
    for i in 0..40 {
        let keys: &[&str] = if i % 2 == 0 { &["shared", "even"] } else { &["shared"] };
        send_ok(&mut client, vec![keyed("events", &format!("e{i:02}"), keys)]).await;
        // Distinct store times, so newest-first is one order across shards.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    send_ok(&mut client, vec![keyed("other", "elsewhere", &["shared"])]).await;

    let bodies = |found: &serde_json::Value| -> Vec<String> {
        found["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["body_preview"].as_str().unwrap().to_string())
            .collect()
    };
    let ten = cli_json(&local, &["message", "find", "--topic", "events", "--key", "shared", "--limit", "10"]).await;
    let want: Vec<String> = (30..40).rev().map(|i| format!("e{i:02}")).collect();
    assert_eq!(bodies(&ten), want, "the newest ten, newest first");
    assert_eq!(ten["truncated"], true);
    let all = cli_json(&local, &["message", "find", "--topic", "events", "--key", "shared", "--limit", "100"]).await;
    assert_eq!(bodies(&all).len(), 40, "only this topic's messages");
    assert_eq!(all["truncated"], false);
    let even = cli_json(&local, &["message", "find", "--topic", "events", "--key", "even", "--limit", "100"]).await;
    assert_eq!(bodies(&even).len(), 20);
    let times: Vec<i64> =
        all["messages"].as_array().unwrap().iter().map(|m| m["store_time_ms"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
    let default = cli_json(&local, &["message", "find", "--topic", "events", "--key", "shared"]).await;
    assert_eq!((bodies(&default).len(), &default["truncated"]), (32, &serde_json::json!(true)), "bounded by default");
    let none = cli_json(&local, &["message", "find", "--topic", "events", "--key", "missing"]).await;
    assert_eq!(none["messages"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_reset_to_a_time_replays_exactly_the_messages_stored_after_it() {
    let local = Local::start().await;
    create_topic(local.grpc, "jobs", 4).await;
    create_group(local.grpc, "workers", 16, false).await;
    let mut client = messaging(local.grpc).await;
    let before: Vec<String> = (0..6).map(|i| format!("before {i}")).collect();
    let after: Vec<String> = (0..6).map(|i| format!("after {i}")).collect();
    send_ok(&mut client, before.iter().map(|b| message("jobs", b.clone().into_bytes())).collect()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_ok(&mut client, after.iter().map(|b| message("jobs", b.clone().into_bytes())).collect()).await;
    assert_eq!(take(&mut client, "jobs", "workers", 12, SECS(30), true).await.len(), 12);

    let reset = cli_json(&local, &["group", "reset", "workers", "--topic", "jobs", "--to-time", &cut]).await;
    assert_eq!(reset["reset"], true, "{reset}");
    let replayed: BTreeSet<String> =
        take(&mut client, "jobs", "workers", 6, SECS(30), true).await.iter().map(body_text).collect();
    assert_eq!(replayed, after.iter().cloned().collect::<BTreeSet<_>>(), "exactly what was stored after the cut");
    let more = receive(&mut client, "jobs", "workers", 32, SECS(30), SECS(2)).await;
    assert!(
        more.messages.is_empty(),
        "nothing else comes again: {:?}",
        more.messages.iter().map(body_text).collect::<Vec<_>>()
    );

    // Back to the start, one message taken and not acked: moving to the end would skip it.
    cli_json(&local, &["group", "reset", "workers", "--topic", "jobs", "--to-offset", "0"]).await;
    let held = receive(&mut client, "jobs", "workers", 1, SECS(60), SECS(2)).await;
    assert_eq!(held.messages.len(), 1);
    let (ok, _, err) =
        cli(&["group", "reset", "workers", "--topic", "jobs", "--to-offset", "1000", "--endpoint", &local.endpoint()])
            .await;
    assert!(!ok && err.contains("in flight"), "refused while in flight: {err}");
    let refused = cli_json(&local, &["group", "reset", "workers", "--topic", "jobs", "--to-offset", "1000"]).await;
    assert_eq!(refused["reset"], false);
    assert_eq!(
        refused["queues"].as_array().unwrap().iter().map(|q| q["in_flight_skipped"].as_u64().unwrap()).sum::<u64>(),
        1
    );
    assert!(refused["queues"].as_array().unwrap().iter().all(|q| q["moved"] == false), "nothing moved: {refused}");
    let forced =
        cli_json(&local, &["group", "reset", "workers", "--topic", "jobs", "--to-offset", "1000", "--force"]).await;
    assert_eq!(forced["reset"], true, "{forced}");
    let stale =
        ack(&mut client, "jobs", "workers", &message_id(&held.messages[0]), &receipt_handle(&held.messages[0])).await;
    assert_ne!(stale.code, OK, "a receipt from before the reset no longer acks");
    let rest = receive(&mut client, "jobs", "workers", 32, SECS(30), SECS(2)).await;
    assert!(rest.messages.is_empty(), "at the end: nothing to deliver");
}

#[tokio::test(flavor = "multi_thread")]
async fn message_get_tells_a_held_delay_message_from_one_already_dispatched() {
    let local = Local::start().await;
    create_typed_topic(local.grpc, "reminders", v2::MessageType::Delay, 2).await;
    create_group(local.grpc, "alarms", 16, false).await;
    let mut client = messaging(local.grpc).await;
    let delayed = |body: &str, due_in: Duration| {
        let mut m = message("reminders", body.as_bytes().to_vec());
        let system = m.system_properties.as_mut().expect("system");
        system.message_type = v2::MessageType::Delay as i32;
        system.delivery_timestamp = Some(prost_types::Timestamp::from(SystemTime::now() + due_in));
        m
    };
    let later = delayed("in an hour", SECS(3600));
    let soon = delayed("in a second", SECS(1));
    let (later_id, soon_id) = (message_id(&later), message_id(&soon));
    send_ok(&mut client, vec![later, soon]).await;
    let got = take(&mut client, "reminders", "alarms", 1, SECS(30), true).await;
    assert_eq!(got.iter().map(body_text).collect::<Vec<_>>(), vec!["in a second"]);

    let held = cli_json(&local, &["message", "get", "--topic", "reminders", "--id", &later_id]).await;
    let m = &held["messages"][0];
    assert!(m["offset"].is_null(), "not in its queue yet: {m}");
    assert!(m["delivery_time_ms"].as_i64().unwrap() > m["store_time_ms"].as_i64().unwrap() + 3_000_000, "{m}");
    assert_eq!(group_state(m, "alarms").expect("alarms")["state"], "pending", "{m}");
    let dispatched = cli_json(&local, &["message", "get", "--topic", "reminders", "--id", &soon_id]).await;
    let m = &dispatched["messages"][0];
    assert_eq!(group_state(m, "alarms").expect("alarms")["state"], "dispatched_or_discarded", "{m}");
}
