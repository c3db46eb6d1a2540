//! Every metric the broker publishes, described in one place. Names and labels follow
//! RocketMQ 5.1's broker metrics where one exists (`rocketmq_*`); Sluice's own carry `sluice_`.
//! Every series also has the process's `cluster` and `node_id` labels (set by the exporter).
//!
//! Deliveries (`rocketmq_messages_out_total`) are counted by the proxy, where messages are
//! handed to consumers. Counters are counted where the event happens, through handles each shard keeps per label
//! set (`ShardMetrics`). Consumer and storage gauges are computed when `/metrics` is scraped:
//! each shard reports a `ShardGauges` and the broker sums them (`Broker::gauges`).

use std::cell::RefCell;
use std::collections::HashMap;

use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Histogram, Unit};
use sluice_transport::metrics::{group_label, labels, topic_label};
use sluice_transport::model::message_type;

pub const MESSAGES_IN: &str = "rocketmq_messages_in_total";
pub const THROUGHPUT_IN: &str = "rocketmq_throughput_in_total";
pub const MESSAGE_SIZE: &str = "rocketmq_message_size";
pub const CONSUMER_READY: &str = "rocketmq_consumer_ready_messages";
pub const CONSUMER_INFLIGHT: &str = "rocketmq_consumer_inflight_messages";
pub const CONSUMER_LAG: &str = "rocketmq_consumer_lag_messages";
pub const CONSUMER_LAG_LATENCY: &str = "rocketmq_consumer_lag_latency";
pub const CONSUMER_QUEUEING_LATENCY: &str = "rocketmq_consumer_queueing_latency";
pub const STORAGE_SIZE: &str = "rocketmq_storage_size";
pub const STORAGE_FLUSH_BEHIND: &str = "rocketmq_storage_flush_behind_bytes";
pub const GROUP_COMMIT_RECORDS: &str = "sluice_group_commit_records";
pub const FDATASYNC: &str = "sluice_fdatasync_seconds";
pub const INDEX_WRITE: &str = "sluice_index_write_seconds";
pub const SCHEDULER_WAKEUPS: &str = "sluice_scheduler_wakeups_total";
pub const DISK_FREE: &str = "sluice_disk_free_bytes";
pub const SHARD_QUEUES: &str = "sluice_shard_queues";
pub const SHARD_GROUP_QUEUES: &str = "sluice_shard_group_queues";
pub const APPENDS_REFUSED: &str = "sluice_appends_refused_total";

/// Every metric name this crate publishes (the dashboard test checks against it).
pub const NAMES: &[&str] = &[
    MESSAGES_IN,
    THROUGHPUT_IN,
    MESSAGE_SIZE,
    CONSUMER_READY,
    CONSUMER_INFLIGHT,
    CONSUMER_LAG,
    CONSUMER_LAG_LATENCY,
    CONSUMER_QUEUEING_LATENCY,
    STORAGE_SIZE,
    STORAGE_FLUSH_BEHIND,
    GROUP_COMMIT_RECORDS,
    FDATASYNC,
    INDEX_WRITE,
    SCHEDULER_WAKEUPS,
    DISK_FREE,
    SHARD_QUEUES,
    SHARD_GROUP_QUEUES,
    APPENDS_REFUSED,
];

/// The `node_type` label of every broker metric.
pub const NODE_TYPE: (&str, &str) = ("node_type", "broker");

/// RocketMQ's message size buckets: 1 KiB, 4 KiB, 512 KiB, 1, 2 and 4 MiB.
const MESSAGE_SIZE_BUCKETS: &[f64] = &[1024.0, 4096.0, 524_288.0, 1_048_576.0, 2_097_152.0, 4_194_304.0];
const SECONDS_BUCKETS: &[f64] =
    &[0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0];
const RECORDS_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

/// Histogram buckets, by metric name.
pub const BUCKETS: &[(&str, &[f64])] = &[
    (MESSAGE_SIZE, MESSAGE_SIZE_BUCKETS),
    (GROUP_COMMIT_RECORDS, RECORDS_BUCKETS),
    (FDATASYNC, SECONDS_BUCKETS),
    (INDEX_WRITE, SECONDS_BUCKETS),
];

/// Registers the help text of every broker metric.
pub fn describe() {
    describe_counter!(MESSAGES_IN, "Messages stored, by topic and message type");
    describe_counter!(THROUGHPUT_IN, Unit::Bytes, "Bytes of message bodies stored, by topic and message type");
    describe_histogram!(MESSAGE_SIZE, Unit::Bytes, "Body size of each stored message");
    describe_gauge!(CONSUMER_READY, "Messages stored after the group's position and not out with a consumer");
    describe_gauge!(CONSUMER_INFLIGHT, "Messages delivered to the group and not yet acked");
    describe_gauge!(CONSUMER_LAG, "Messages the group has not acked yet: ready plus in flight");
    describe_gauge!(
        CONSUMER_LAG_LATENCY,
        Unit::Milliseconds,
        "Age of the oldest message the group has not acked, in milliseconds"
    );
    describe_gauge!(
        CONSUMER_QUEUEING_LATENCY,
        Unit::Milliseconds,
        "Age of the oldest message waiting to be delivered to the group, in milliseconds"
    );
    describe_gauge!(STORAGE_SIZE, Unit::Bytes, "Bytes of CommitLog the broker keeps");
    describe_gauge!(STORAGE_FLUSH_BEHIND, Unit::Bytes, "Bytes written to the CommitLog and not yet fdatasync'd");
    describe_histogram!(GROUP_COMMIT_RECORDS, "Records made durable by one group commit");
    describe_histogram!(
        FDATASYNC,
        Unit::Seconds,
        "Duration of each CommitLog segment fdatasync (async durability; under sync, O_DSYNC writes carry their own)"
    );
    describe_histogram!(INDEX_WRITE, Unit::Seconds, "Duration of each RocksDB index write batch (one per commit)");
    describe_counter!(SCHEDULER_WAKEUPS, "Times an append woke a waiting consumer group or lite consumer");
    describe_gauge!(DISK_FREE, Unit::Bytes, "Free bytes on the file system of a shard's data, by shard");
    describe_gauge!(SHARD_QUEUES, "Queues (topic queues and lite topics) a shard holds, by shard");
    describe_gauge!(SHARD_GROUP_QUEUES, "(consumer group, queue) pairs with delivery state, by shard");
    describe_counter!(APPENDS_REFUSED, "Appends refused for back-pressure, by reason (disk_full, busy)");
}

/// One shard's metric handles, made once per label set: a label set's first event registers
/// it with the recorder, later ones only add to an atomic.
pub struct ShardMetrics {
    /// By queue name, so a lookup needs no allocation; a queue's type rarely changes, and a
    /// change replaces its handles.
    appended: RefCell<HashMap<String, AppendHandles>>,
    pub wakeups: Counter,
}

struct AppendHandles {
    kind: u8,
    messages: Counter,
    bytes: Counter,
    size: Histogram,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics::new()
    }
}

impl ShardMetrics {
    /// Handles register with the recorder installed now (the exporter installs it first).
    pub fn new() -> ShardMetrics {
        ShardMetrics { appended: RefCell::default(), wakeups: metrics::counter!(SCHEDULER_WAKEUPS, &[NODE_TYPE]) }
    }

    /// A message with a body of `size_bytes` stored in `queue` (its first queue), of type `kind`.
    pub fn message_in(&self, queue: &str, kind: u8, size_bytes: u64) {
        let mut appended = self.appended.borrow_mut();
        if appended.get(queue).is_none_or(|h| h.kind != kind) {
            // Only the first sight of a queue pays for the label lookup.
            let labels =
                labels([NODE_TYPE, ("topic", &topic_label(queue)), ("message_type", message_type::name(kind))]);
            let handles = AppendHandles {
                kind,
                messages: metrics::counter!(MESSAGES_IN, labels.iter()),
                bytes: metrics::counter!(THROUGHPUT_IN, labels.iter()),
                size: metrics::histogram!(MESSAGE_SIZE, labels.iter()),
            };
            // Queue names are unbounded (lite topics): a full cache starts over; the label
            // sets live on in the recorder.
            if appended.len() >= HANDLES_PER_SHARD_MAX {
                appended.clear();
            }
            appended.insert(queue.to_string(), handles);
        }
        let handles = &appended[queue];
        handles.messages.increment(1);
        handles.bytes.increment(size_bytes);
        handles.size.record(size_bytes as f64);
    }
}

/// Queues whose handles one shard caches.
const HANDLES_PER_SHARD_MAX: usize = 10_000;

/// What one shard reports when metrics are scraped.
#[derive(Debug, Clone, Default)]
pub struct ShardGauges {
    pub shard: usize,
    pub groups: Vec<GroupGauges>,
    pub log_bytes: u64,
    pub flush_behind_bytes: u64,
    pub queues: u64,
    pub group_queues: u64,
    pub disk_free_bytes: u64,
    pub appends_refused_disk_full: u64,
    pub appends_refused_busy: u64,
}

/// One (group, topic)'s figures on one shard.
#[derive(Debug, Clone, Default)]
pub struct GroupGauges {
    pub group: String,
    pub topic: String,
    pub ready: u64,
    pub inflight: u64,
    /// False when the scrape's lookup budget ran out before this group: no latency gauges.
    pub latencies_known: bool,
    /// Store time of the oldest message the group has not acked, if any.
    pub oldest_unacked_ms: Option<u64>,
    /// Store time of the oldest message waiting for delivery, if any.
    pub oldest_ready_ms: Option<u64>,
}

/// Sums every shard's report into the gauges (a topic spans shards; latencies take the
/// oldest message). A group gone from every shard leaves the output after the exporter's
/// idle timeout for gauges.
pub fn publish_gauges(shards: &[ShardGauges], now_ms: u64) {
    #[derive(Default)]
    struct Sum {
        ready: u64,
        inflight: u64,
        oldest_unacked_ms: Option<u64>,
        oldest_ready_ms: Option<u64>,
        latencies_known: bool,
    }
    let mut sums: HashMap<(String, String), Sum> = HashMap::new();
    for g in shards.iter().flat_map(|s| &s.groups) {
        let sum = sums
            .entry((topic_label(&g.topic), group_label(&g.group)))
            .or_insert_with(|| Sum { latencies_known: true, ..Sum::default() });
        sum.latencies_known &= g.latencies_known;
        sum.ready += g.ready;
        sum.inflight += g.inflight;
        sum.oldest_unacked_ms = min_some(sum.oldest_unacked_ms, g.oldest_unacked_ms);
        sum.oldest_ready_ms = min_some(sum.oldest_ready_ms, g.oldest_ready_ms);
    }
    let age = |at: Option<u64>| at.map_or(0.0, |at| now_ms.saturating_sub(at) as f64);
    for ((topic, group), sum) in sums {
        let labels = labels([NODE_TYPE, ("topic", topic.as_str()), ("consumer_group", group.as_str())]);
        metrics::gauge!(CONSUMER_READY, labels.iter()).set(sum.ready as f64);
        metrics::gauge!(CONSUMER_INFLIGHT, labels.iter()).set(sum.inflight as f64);
        metrics::gauge!(CONSUMER_LAG, labels.iter()).set((sum.ready + sum.inflight) as f64);
        if sum.latencies_known {
            metrics::gauge!(CONSUMER_LAG_LATENCY, labels.iter()).set(age(sum.oldest_unacked_ms));
            metrics::gauge!(CONSUMER_QUEUEING_LATENCY, labels.iter()).set(age(sum.oldest_ready_ms));
        }
    }
    let (log_bytes, behind) = shards.iter().fold((0, 0), |(l, b), s| (l + s.log_bytes, b + s.flush_behind_bytes));
    metrics::gauge!(STORAGE_SIZE, &[NODE_TYPE]).set(log_bytes as f64);
    metrics::gauge!(STORAGE_FLUSH_BEHIND, &[NODE_TYPE]).set(behind as f64);
    for s in shards {
        let labels = labels([NODE_TYPE, ("shard", &s.shard.to_string())]);
        metrics::gauge!(SHARD_QUEUES, labels.iter()).set(s.queues as f64);
        metrics::gauge!(SHARD_GROUP_QUEUES, labels.iter()).set(s.group_queues as f64);
        metrics::gauge!(DISK_FREE, labels.iter()).set(s.disk_free_bytes as f64);
    }
    let refused = |f: fn(&ShardGauges) -> u64| shards.iter().map(f).sum::<u64>();
    metrics::counter!(APPENDS_REFUSED, &[NODE_TYPE, ("reason", "disk_full")])
        .absolute(refused(|s| s.appends_refused_disk_full));
    metrics::counter!(APPENDS_REFUSED, &[NODE_TYPE, ("reason", "busy")]).absolute(refused(|s| s.appends_refused_busy));
}

pub(crate) fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
