//! `sluice stats`: per consumer group and topic, what is ready, in flight and how far the group
//! lags (messages and seconds), in and out rates, dead-lettered and throttled counts; then
//! every counter. `--watch` redraws it in place, like `nats top` or
//! `kafka-consumer-groups --describe`; with `--json` each refresh is one JSON line.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use sluice_proto::sluice::admin::v1 as admin;

use super::client::{admin, check, grpc, Admin, Connection};

/// Between the two samples a one-off `sluice stats` takes to measure the in and out rates.
const RATE_SAMPLE_GAP: Duration = Duration::from_secs(1);
/// Shortest `--interval-secs` (each refresh asks every broker shard).
const WATCH_INTERVAL_MIN: Duration = Duration::from_millis(500);
/// The dead-letter topic of group G is `%DLQ%G`.
const DLQ_PREFIX: &str = "%DLQ%";

pub struct StatsOptions {
    pub group: Option<String>,
    pub topic: Option<String>,
    pub watch: bool,
    pub interval: Duration,
}

/// One reading of the admin API.
struct Sample {
    at: Instant,
    stats: admin::GetStatsResponse,
    /// Messages stored per topic.
    stored: HashMap<String, u64>,
}

async fn sample(client: &mut Admin) -> Result<Sample, String> {
    let stats = client.get_stats(admin::GetStatsRequest {}).await.map_err(grpc)?.into_inner();
    check(stats.status.as_ref())?;
    let topics = client.list_topics(admin::ListTopicsRequest {}).await.map_err(grpc)?.into_inner();
    check(topics.status.as_ref())?;
    let stored = topics.topics.into_iter().map(|t| (t.name, t.messages)).collect();
    Ok(Sample { at: Instant::now(), stats, stored })
}

/// One (group, topic) line.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    group: String,
    topic: String,
    ready: u64,
    inflight: u64,
    /// Not acked yet: ready + in flight (the backlog).
    lag: u64,
    /// Age of the oldest message not acked yet; none when the brokers could not tell (a
    /// group lagging on very many queues).
    lag_s: Option<f64>,
    in_per_s: f64,
    out_per_s: f64,
    /// Deliveries per second over the brokers' last four whole seconds.
    rate_per_s: f64,
    dead_lettered: u64,
    throttled: u64,
    delivered: u64,
}

fn rows(now: &Sample, before: &Sample, o: &StatsOptions) -> Vec<Row> {
    let seconds = now.at.duration_since(before.at).as_secs_f64().max(0.001);
    let wall_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let earlier: HashMap<(&str, &str), u64> =
        before.stats.groups.iter().map(|g| ((g.group.as_str(), g.topic.as_str()), g.delivered)).collect();
    let stored = |s: &Sample, topic: &str| s.stored.get(topic).copied().unwrap_or(0);
    now.stats
        .groups
        .iter()
        .filter(|g| o.group.as_ref().is_none_or(|want| *want == g.group))
        .filter(|g| o.topic.as_ref().is_none_or(|want| *want == g.topic))
        .map(|g| {
            let lag = g.ready + g.inflight;
            let lag_s = match (g.oldest_unacked_ms, lag) {
                (0, 0) => Some(0.0),
                (0, _) => None,
                (oldest, _) => Some((wall_ms - oldest).max(0) as f64 / 1000.0),
            };
            let appended = stored(now, &g.topic).saturating_sub(stored(before, &g.topic));
            let delivered = earlier.get(&(g.group.as_str(), g.topic.as_str())).map(|d| g.delivered.saturating_sub(*d));
            Row {
                group: g.group.clone(),
                topic: g.topic.clone(),
                ready: g.ready,
                inflight: g.inflight,
                lag,
                lag_s,
                in_per_s: appended as f64 / seconds,
                out_per_s: delivered.map_or(g.rate_per_s, |d| d as f64 / seconds),
                rate_per_s: g.rate_per_s,
                dead_lettered: stored(now, &format!("{DLQ_PREFIX}{}", g.group)),
                throttled: g.throttled,
                delivered: g.delivered,
            }
        })
        .collect()
}

fn print_rows(rows: &[Row], truncated: bool) {
    if rows.is_empty() {
        println!("no consumer group has received yet");
    } else {
        println!(
            "{:<24} {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10}",
            "GROUP", "TOPIC", "READY", "INFLIGHT", "BACKLOG", "LAG(s)", "IN/s", "OUT/s", "DLQ", "THROTTLED"
        );
        for r in rows {
            let lag_s = r.lag_s.map_or("-".to_string(), |s| format!("{s:.1}"));
            println!(
                "{:<24} {:<24} {:>9} {:>9} {:>9} {:>9} {:>9.1} {:>9.1} {:>8} {:>10}",
                r.group,
                r.topic,
                r.ready,
                r.inflight,
                r.lag,
                lag_s,
                r.in_per_s,
                r.out_per_s,
                r.dead_lettered,
                r.throttled
            );
        }
    }
    if truncated {
        println!("(more groups than shown)");
    }
}

fn counters_json(list: &[admin::Counter]) -> serde_json::Map<String, serde_json::Value> {
    list.iter().map(|c| (c.name.clone(), c.value.into())).collect()
}

fn print_counters(s: &admin::GetStatsResponse) {
    println!("proxy");
    for counter in &s.proxy {
        println!("  {:<28} {:>14}", counter.name, counter.value);
    }
    for b in &s.brokers {
        println!("broker {} (shard {})", b.endpoint, b.shard);
        for counter in &b.counters {
            println!("  {:<28} {:>14}", counter.name, counter.value);
        }
    }
}

pub async fn stats(c: &Connection, o: StatsOptions) -> Result<(), String> {
    let mut client = admin(c).await?;
    let mut before = sample(&mut client).await?;
    if !o.watch {
        tokio::time::sleep(RATE_SAMPLE_GAP).await;
        let now = sample(&mut client).await?;
        let rows = rows(&now, &before, &o);
        if c.json {
            let brokers: Vec<serde_json::Value> = now
                .stats
                .brokers
                .iter()
                .map(|b| serde_json::json!({ "endpoint": b.endpoint, "shard": b.shard, "counters": counters_json(&b.counters) }))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "proxy": counters_json(&now.stats.proxy),
                    "brokers": brokers,
                    "groups": rows,
                    "groups_truncated": now.stats.groups_truncated,
                })
            );
        } else {
            print_rows(&rows, now.stats.groups_truncated);
            if o.group.is_none() && o.topic.is_none() {
                print_counters(&now.stats);
            }
        }
        return Ok(());
    }
    let interval = o.interval.max(WATCH_INTERVAL_MIN);
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let now = sample(&mut client).await?;
        let rows = rows(&now, &before, &o);
        if c.json {
            println!("{}", serde_json::json!({ "groups": rows, "groups_truncated": now.stats.groups_truncated }));
        } else {
            // Home and clear, then the table: a redraw in place.
            print!("\x1b[H\x1b[2J");
            println!("sluice stats · {} · every {:.1}s · Ctrl-C stops", c.endpoint, interval.as_secs_f64());
            print_rows(&rows, now.stats.groups_truncated);
        }
        let _ = stdout.flush();
        before = now;
    }
}
