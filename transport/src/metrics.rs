//! The transport's metrics, and the label rules every Sluice crate shares.
//!
//! Label cardinality is bounded here: a topic label is the topic (a lite topic counts under
//! its parent), and at most `LABEL_VALUES_MAX` topics and as many consumer groups get a label
//! of their own per process; the rest share `OTHER_LABEL`. A million lite topics or topics
//! therefore never become a million series.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use metrics::{describe_counter, describe_histogram, Unit};

use crate::client::TransportKind;
use crate::model::placement::{split_lite_queue, split_topic_queue};

/// Distinct topic (and, separately, consumer group) label values one process hands out.
pub const LABEL_VALUES_MAX: usize = 2_000;
/// The label value of every topic or group past `LABEL_VALUES_MAX`.
pub const OTHER_LABEL: &str = "_other";

pub const ROUND_TRIP: &str = "sluice_transport_round_trip_seconds";
pub const CREDIT_WAITS: &str = "sluice_transport_credit_waits_total";
pub const RDMA_COMPLETIONS: &str = "sluice_rdma_completions_total";

/// Every metric name this crate publishes (the dashboard test checks against it).
pub const NAMES: &[&str] = &[ROUND_TRIP, CREDIT_WAITS, RDMA_COMPLETIONS];

/// Histogram buckets, by metric name (the exporter needs them before the first sample).
pub const BUCKETS: &[(&str, &[f64])] = &[(
    ROUND_TRIP,
    &[0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0],
)];

/// Registers the help text of every transport metric.
pub fn describe() {
    describe_histogram!(
        ROUND_TRIP,
        Unit::Seconds,
        "Proxy-side time from sending a broker request to its reply, by transport and request kind (long polls included)"
    );
    describe_counter!(CREDIT_WAITS, "Requests that waited for a free credit on their broker connection");
    describe_counter!(RDMA_COMPLETIONS, "RDMA work completions polled, by the client and broker drivers");
}

pub fn transport_label(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Tcp => "tcp",
        TransportKind::Rdma => "rdma",
    }
}

/// Owned labels from (name, value) pairs, for handles cached beyond the values' lifetime.
pub fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> [metrics::Label; N] {
    pairs.map(|(name, value)| metrics::Label::new(name, value.to_string()))
}

/// A bounded set of label values: the first `max` distinct values keep their name.
pub struct LabelBudget {
    seen: Mutex<HashSet<String>>,
    max: usize,
}

impl LabelBudget {
    pub fn new(max: usize) -> LabelBudget {
        LabelBudget { seen: Mutex::new(HashSet::new()), max }
    }

    /// `value` if it has (or can still get) a label of its own, else `OTHER_LABEL`.
    pub fn label(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() < self.max {
            seen.insert(value.to_string());
            return value.to_string();
        }
        OTHER_LABEL.to_string()
    }
}

fn topics() -> &'static LabelBudget {
    static TOPICS: OnceLock<LabelBudget> = OnceLock::new();
    TOPICS.get_or_init(|| LabelBudget::new(LABEL_VALUES_MAX))
}

fn groups() -> &'static LabelBudget {
    static GROUPS: OnceLock<LabelBudget> = OnceLock::new();
    GROUPS.get_or_init(|| LabelBudget::new(LABEL_VALUES_MAX))
}

/// The topic a queue (`T#i`, `T#i/lite`) or topic name is labelled with.
pub fn topic_label(queue_or_topic: &str) -> String {
    let topic = match split_lite_queue(queue_or_topic) {
        Some((topic, _, _)) => topic,
        None => split_topic_queue(queue_or_topic).map_or(queue_or_topic, |(topic, _)| topic),
    };
    topics().label(topic)
}

/// The consumer group label.
pub fn group_label(group: &str) -> String {
    groups().label(group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_names_the_first_values_and_folds_the_rest() {
        let budget = LabelBudget::new(3);
        let labels: HashSet<String> = (0..100_000).map(|i| budget.label(&format!("t{i}"))).collect();
        assert_eq!(labels.len(), 4);
        assert!(labels.contains(OTHER_LABEL));
        assert_eq!(budget.label("t1"), "t1", "a value seen before keeps its label");
        assert_eq!(budget.label("t99"), OTHER_LABEL);
    }

    #[test]
    fn lite_topics_and_queues_are_labelled_with_their_topic() {
        assert_eq!(topic_label("orders#3"), "orders");
        assert_eq!(topic_label("chat#0/session-42"), "chat");
        assert_eq!(topic_label("plain"), "plain");
    }
}
