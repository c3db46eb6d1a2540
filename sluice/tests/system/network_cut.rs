//! The link between a proxy and its broker lost for 10 s, with `sluice` processes: cut and
//! healed by a relay in between that holds every byte (what a blackhole route does), or by
//! freezing the broker (SIGSTOP, SIGCONT). The proxy must notice the dead link, answer sends
//! with errors instead of making clients wait out their deadlines, never report a send as
//! stored that was not, use the link again soon after, and lose no acknowledged message. A slow,
//! lossy link must only be slower.

use crate::common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use sluice_transport::relay::{Impairment, Relay};

const OK: i32 = v2::Code::Ok as i32;
const MESSAGE_NOT_FOUND: i32 = v2::Code::MessageNotFound as i32;
/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(10);
/// A client deadline far beyond anything the proxy should need to answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

/// One send with a long client deadline: the RocketMQ status the proxy answered.
async fn send_one(client: &mut Messaging, message: v2::Message) -> v2::Status {
    let request = v2::SendMessageRequest { messages: vec![message] };
    let reply = tokio::time::timeout(CLIENT_DEADLINE, client.send_message(request))
        .await
        .expect("the proxy answers within the client's deadline")
        .unwrap_or_else(|e| panic!("SendMessage transport error: {e}"))
        .into_inner();
    reply.status.unwrap_or_default()
}

/// Sends one message; remembers its id when the proxy says it was stored.
async fn send_acked(producer: &mut Messaging, acked: &mut HashSet<String>, body: String) -> v2::Status {
    let m = message("cut", body.into_bytes());
    let id = message_id(&m);
    let status = send_one(producer, m).await;
    if status.code == OK {
        acked.insert(id);
    }
    status
}

/// Receives and acks (group "readers") until every id of `wanted` has come; returns every id
/// that came.
async fn receive_until_seen(proxy: &Proxy, topic: &str, wanted: &HashSet<String>) -> HashSet<String> {
    let mut consumer = messaging(proxy.grpc).await;
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !wanted.is_subset(&seen) {
        assert!(Instant::now() < deadline, "{} stored sends never delivered", wanted.difference(&seen).count());
        let got = receive(&mut consumer, topic, "readers", 32, Duration::from_secs(60), Duration::from_secs(1)).await;
        match got.code() {
            OK => {}
            MESSAGE_NOT_FOUND => continue,
            other => panic!("ReceiveMessage answered {other}: {:?}", got.statuses),
        }
        seen.extend(got.messages.iter().map(message_id));
        ack_all(&mut consumer, topic, "readers", &got.messages).await;
    }
    seen
}

/// What the proxy answered during an outage, with how long each answer took.
struct Outage {
    answers: Vec<(Duration, v2::Status)>,
}

/// Sends through `proxy` before, during (`OUTAGE` long, between `begin` and `end`) and after an
/// outage of the proxy's broker link; checks that no send is reported stored during it and
/// that every acknowledged send is delivered afterwards.
async fn through_an_outage(proxy: &mut Proxy, begin: impl FnOnce(), end: impl FnOnce()) -> Outage {
    create_topic_cli(&proxy.endpoint(), "cut", 1).await;
    let mut producer = messaging(proxy.grpc).await;
    let mut acked = HashSet::new();
    for i in 0..50 {
        let status = send_acked(&mut producer, &mut acked, format!("before {i}")).await;
        assert_eq!(status.code, OK, "{status:?}");
    }

    begin();
    let began = Instant::now();
    let mut answers = Vec::new();
    while began.elapsed() < OUTAGE {
        let started = Instant::now();
        let status = send_one(&mut producer, message("cut", b"during".to_vec())).await;
        answers.push((started.elapsed(), status));
    }
    for (took, status) in &answers {
        eprintln!("during the outage: answered after {took:?}: {} {}", status.code, status.message);
        assert_ne!(status.code, OK, "a send reported stored while the broker was unreachable: {status:?}");
    }

    end();
    let ended = Instant::now();
    loop {
        assert!(ended.elapsed() < Duration::from_secs(60), "no send succeeded within 60 s of the outage's end");
        if send_acked(&mut producer, &mut acked, "after".into()).await.code == OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("first stored send {:?} after the outage ended", ended.elapsed());
    for i in 0..50 {
        let status = send_acked(&mut producer, &mut acked, format!("after {i}")).await;
        assert_eq!(status.code, OK, "{status:?}");
    }

    // Every acknowledged send is delivered; sends that failed may or may not have been stored.
    receive_until_seen(proxy, "cut", &acked).await;
    assert_eq!(acked.len(), 101);
    Outage { answers }
}

/// The first send waits on the link until it is found dead; the later ones hear that the link
/// is down instead of waiting for the broker's request timeout. The loss and the recovery are
/// each logged once.
async fn assert_failed_fast_and_logged_once(proxy: &mut Proxy, outage: &Outage) {
    let answers = &outage.answers;
    assert!(answers.len() >= 3, "{} answers in {OUTAGE:?}", answers.len());
    assert!(answers[0].1.message.contains("dead_link_timeout_ms"), "{:?}", answers[0].1);
    assert!(answers[1..].iter().all(|(_, s)| s.message.contains("link has been down")), "{:?}", &answers[1..]);
    proxy.process.terminate();
    proxy.process.wait_exit(STOP_TIMEOUT).await;
    let logs = proxy.process.logs();
    assert_eq!(logs.matches("broker link lost").count(), 1, "{logs}");
    assert_eq!(logs.matches("broker link is back").count(), 1, "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_network_cut_between_proxy_and_broker_fails_sends_fast_and_loses_nothing_acked() {
    let broker = Broker::start("cut-broker", 1).await;
    let relay = Relay::start(broker.address().parse().unwrap()).await.unwrap();
    let mut proxy = Proxy::start("cut-proxy", &[relay.addr().to_string()]).await;
    let outage = through_an_outage(&mut proxy, || relay.cut(), || relay.heal()).await;
    assert_failed_fast_and_logged_once(&mut proxy, &outage).await;
}

/// A frozen broker (SIGSTOP, then SIGCONT) looks like a cut to the proxy, except that the
/// kernel still accepts its connections and buffers what is sent to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_broker_fails_sends_fast_and_loses_nothing_acked() {
    let broker = Broker::start("frozen-broker", 1).await;
    let mut proxy = Proxy::start("frozen-proxy", &[broker.address()]).await;
    let pid = broker.process.pid().to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill").args([name, &pid]).status().expect("kill runs");
        assert!(status.success(), "kill {name} {pid}");
    };
    let outage = through_an_outage(&mut proxy, || signal("-STOP"), || signal("-CONT")).await;
    assert_failed_fast_and_logged_once(&mut proxy, &outage).await;
}

/// `producers` clients each sending `each` messages one after another; every send must be
/// stored. Returns the ids and how long it took.
async fn send_from_many(proxy: &Proxy, topic: &str, producers: usize, each: usize) -> (Vec<String>, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let (grpc, topic) = (proxy.grpc, topic.to_string());
            tokio::spawn(async move {
                let mut client = messaging(grpc).await;
                let mut ids = Vec::with_capacity(each);
                for i in 0..each {
                    let m = message(&topic, format!("producer {p} message {i}").into_bytes());
                    ids.push(message_id(&m));
                    let status = send_one(&mut client, m).await;
                    assert_eq!(status.code, OK, "{status:?}");
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.expect("producer task"));
    }
    (ids, started.elapsed())
}

/// 200 ms each way, and 5% of chunks a further 200 ms late (a retransmission, holding back what
/// follows): sends are slower but none fails, the link is never taken for dead, and every
/// message is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_lossy_link_is_slower_but_not_taken_for_dead_and_loses_nothing() {
    const PRODUCERS: usize = 8;
    const EACH: usize = 25;
    let broker = Broker::start("lossy-broker", 1).await;
    let relay = Relay::start(broker.address().parse().unwrap()).await.unwrap();
    let mut proxy = Proxy::start("lossy-proxy", &[relay.addr().to_string()]).await;
    create_topic_cli(&proxy.endpoint(), "lossy", 1).await;
    let (mut sent, clean) = send_from_many(&proxy, "lossy", PRODUCERS, EACH).await;
    let delay = Duration::from_millis(200);
    relay.impair(Impairment { delay, loss: 0.05, retransmit: delay });
    let (impaired_ids, impaired) = send_from_many(&proxy, "lossy", PRODUCERS, EACH).await;
    sent.extend(impaired_ids);
    let rate = |d: Duration| (PRODUCERS * EACH) as f64 / d.as_secs_f64();
    eprintln!("sends: {:.0} msg/s clean, {:.0} msg/s with 200 ms delay and 5% loss", rate(clean), rate(impaired));

    let wanted: HashSet<String> = sent.into_iter().collect();
    let seen = receive_until_seen(&proxy, "lossy", &wanted).await;
    assert_eq!(seen, wanted, "delivered only what was sent");

    proxy.process.terminate();
    proxy.process.wait_exit(STOP_TIMEOUT).await;
    let logs = proxy.process.logs();
    assert!(!logs.contains("broker link lost"), "a slow link was taken for dead:\n{logs}");
}
