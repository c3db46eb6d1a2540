//! Topics as queues on the brokers. Topic `T` with `n` queues is stored as queues `T#0` …
//! `T#n-1`, each created on its owning broker shard with the topic's message type and queue
//! count as attributes. `T#0` is created last and deleted first, so a topic exists exactly
//! when `T#0` does. The proxy caches what it learnt for a short time; the brokers are the truth.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_transport::messages::{CreateQueueRequest, DeleteQueueRequest};
use sluice_transport::model::{fairness, message_type};

use crate::error::{ProxyError, Result};
use crate::groups::Throttle;
use sluice_transport::cluster::BrokerPool;

/// Queues a topic gets when none is asked for.
pub const DEFAULT_QUEUE_COUNT: u32 = 8;
/// Most queues one topic may have.
pub const QUEUE_COUNT_MAX: u32 = 256;
/// How long a lite topic lives without writes and subscribers unless the topic says otherwise.
pub const DEFAULT_LITE_TTL_MINUTES: u32 = 1440;
/// Longest lite-topic TTL: 365 days.
pub const LITE_TTL_MINUTES_MAX: u32 = 365 * 24 * 60;
pub use sluice_transport::model::placement::LITE_TTL_ATTRIBUTE;
/// Longest topic name (RocketMQ's limit), leaving room for `#index` in the queue name.
pub const TOPIC_NAME_MAX_BYTES: usize = 127;
/// How long a topic lookup is trusted before asking the broker again.
const CACHE_TTL: Duration = Duration::from_secs(2);
/// Topic lookups kept in the cache at most.
const CACHE_ENTRIES_MAX: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMeta {
    pub name: String,
    pub message_type: u8,
    pub queue_count: u32,
    /// LITE topics: minutes without writes (and subscribers) before a lite topic is reclaimed.
    pub lite_ttl_minutes: u32,
    /// Send quota across all proxies in messages per second (kept by `T#0`'s shard); 0: none.
    pub max_send_tps: u32,
    /// What a send over the quota gets.
    pub send_throttle: Throttle,
    /// A fair topic shares deliveries among the values of this user property (tenants) by
    /// weight; empty for a topic without fairness.
    pub fairness: Fairness,
}

/// A fair topic's settings (`sluice_transport::model::fairness`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fairness {
    /// The user property naming a message's tenant; empty: not a fair topic.
    pub key: String,
    /// `tenant=weight,…`.
    pub weights: String,
    /// The weight of tenants not listed (1 when unset).
    pub default_weight: u32,
}

impl Fairness {
    fn of(record: &sluice_transport::cluster::QueueRecord) -> Fairness {
        Fairness::of_attributes(&record.attributes)
    }

    fn of_attributes(attributes: &[(String, String)]) -> Fairness {
        let attribute = |key: &str| attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let key = attribute(fairness::KEY_ATTRIBUTE).unwrap_or_default().to_string();
        let default_weight = attribute(fairness::DEFAULT_WEIGHT_ATTRIBUTE).and_then(|v| v.parse().ok());
        Fairness {
            weights: attribute(fairness::WEIGHTS_ATTRIBUTE).unwrap_or_default().to_string(),
            default_weight: default_weight.unwrap_or(if key.is_empty() { 0 } else { 1 }),
            key,
        }
    }

    /// Checks the settings and writes them as queue attributes (none without a key).
    fn attributes(&self) -> Result<Vec<(String, String)>> {
        if self.key.is_empty() {
            if !self.weights.is_empty() || self.default_weight != 0 {
                return Err(ProxyError::BadRequest("weights need a fairness key (--fair-key PROPERTY)".into()));
            }
            return Ok(Vec::new());
        }
        fairness::check_name("the fairness key property", &self.key).map_err(ProxyError::BadRequest)?;
        let default_weight = if self.default_weight == 0 { 1 } else { self.default_weight };
        let weights = fairness::parse_list(&self.weights).map_err(ProxyError::BadRequest)?;
        fairness::Weights::parse(&self.weights, Some(&default_weight.to_string())).map_err(ProxyError::BadRequest)?;
        Ok(vec![
            (fairness::KEY_ATTRIBUTE.to_string(), self.key.clone()),
            (fairness::WEIGHTS_ATTRIBUTE.to_string(), fairness::format_list(&weights)),
            (fairness::DEFAULT_WEIGHT_ATTRIBUTE.to_string(), default_weight.to_string()),
        ])
    }
}

/// What an update changes; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct TopicChange {
    pub max_send_tps: Option<u32>,
    pub send_throttle: Option<Throttle>,
    pub fair_weights: Option<String>,
    pub fair_default_weight: Option<u32>,
}

impl TopicMeta {
    pub fn queue(&self, index: u32) -> String {
        queue_name(&self.name, index)
    }
}

pub fn queue_name(topic: &str, index: u32) -> String {
    format!("{topic}#{index}")
}

/// RocketMQ's topic name rule: `^[%|a-zA-Z0-9_-]+$`, bounded.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= TOPIC_NAME_MAX_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'%' | b'|' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ProxyError::BadRequest(format!(
            "topic name {name:?} must be 1..={TOPIC_NAME_MAX_BYTES} characters of a-z A-Z 0-9 % | _ -"
        )))
    }
}

fn lite_ttl_of(record: &sluice_transport::cluster::QueueRecord) -> u32 {
    record.attribute(LITE_TTL_ATTRIBUTE).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The queue attributes holding a topic's send quota and throttle mode.
const MAX_SEND_TPS_ATTRIBUTE: &str = "max_send_tps";
const SEND_THROTTLE_ATTRIBUTE: &str = "send_throttle";

fn meta_of(topic: &str, record: &sluice_transport::cluster::QueueRecord) -> TopicMeta {
    let queue_count =
        record.attribute("queue_count").and_then(|v| v.parse().ok()).unwrap_or(1).clamp(1, QUEUE_COUNT_MAX);
    TopicMeta {
        name: topic.to_string(),
        message_type: record.message_type,
        queue_count,
        lite_ttl_minutes: lite_ttl_of(record),
        max_send_tps: record.attribute(MAX_SEND_TPS_ATTRIBUTE).and_then(|v| v.parse().ok()).unwrap_or(0),
        send_throttle: record
            .attribute(SEND_THROTTLE_ATTRIBUTE)
            .and_then(|v| Throttle::parse(v).ok())
            .unwrap_or_default(),
        fairness: Fairness::of(record),
    }
}

pub fn message_type_name(t: u8) -> &'static str {
    match t {
        message_type::NORMAL => "normal",
        message_type::FIFO => "fifo",
        message_type::DELAY => "delay",
        message_type::TRANSACTION => "transaction",
        message_type::LITE => "lite",
        message_type::PRIORITY => "priority",
        _ => "unspecified",
    }
}

pub struct Topics {
    cache: Mutex<HashMap<String, (Instant, TopicMeta)>>,
}

impl Default for Topics {
    fn default() -> Self {
        Topics { cache: Mutex::new(HashMap::new()) }
    }
}

impl Topics {
    /// The topic's metadata, or `TopicNotFound`.
    pub async fn get(&self, brokers: &BrokerPool, topic: &str) -> Result<TopicMeta> {
        validate_topic_name(topic)?;
        if let Some((at, meta)) = self.cache.lock().expect("cache lock").get(topic) {
            if at.elapsed() < CACHE_TTL {
                return Ok(meta.clone());
            }
        }
        let Some(record) = brokers.queue_record(&queue_name(topic, 0)).await? else {
            self.cache.lock().expect("cache lock").remove(topic);
            return Err(ProxyError::TopicNotFound(topic.to_string()));
        };
        let meta = meta_of(topic, &record);
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_ENTRIES_MAX {
            cache.clear();
        }
        cache.insert(topic.to_string(), (Instant::now(), meta.clone()));
        Ok(meta)
    }

    /// Creates every queue of the topic (idempotent). Returns false when it already existed
    /// with the same type; a different type is an error.
    pub async fn create(
        &self,
        brokers: &BrokerPool,
        topic: &str,
        message_type: u8,
        queue_count: u32,
        lite_ttl_minutes: u32,
    ) -> Result<(bool, TopicMeta)> {
        self.create_fair(brokers, topic, message_type, queue_count, lite_ttl_minutes, &Fairness::default()).await
    }

    /// `create`, for a topic that may share deliveries fairly among tenants.
    pub async fn create_fair(
        &self,
        brokers: &BrokerPool,
        topic: &str,
        message_type: u8,
        queue_count: u32,
        lite_ttl_minutes: u32,
        fair: &Fairness,
    ) -> Result<(bool, TopicMeta)> {
        let fair_attributes = fair.attributes()?;
        if !fair_attributes.is_empty() && message_type != message_type::NORMAL {
            return Err(ProxyError::BadRequest("only NORMAL topics share deliveries fairly among tenants".into()));
        }
        validate_topic_name(topic)?;
        if lite_ttl_minutes != 0 && message_type != message_type::LITE {
            return Err(ProxyError::BadRequest("only LITE topics have a lite TTL".into()));
        }
        if lite_ttl_minutes > LITE_TTL_MINUTES_MAX {
            return Err(ProxyError::BadRequest(format!("the lite TTL is at most {LITE_TTL_MINUTES_MAX} minutes")));
        }
        if !(message_type::NORMAL..=message_type::PRIORITY).contains(&message_type) {
            return Err(ProxyError::BadRequest(
                "message type must be normal, fifo, delay, transaction, lite or priority".into(),
            ));
        }
        let queue_count = if queue_count == 0 { DEFAULT_QUEUE_COUNT } else { queue_count };
        if queue_count > QUEUE_COUNT_MAX {
            return Err(ProxyError::BadRequest(format!("a topic has at most {QUEUE_COUNT_MAX} queues")));
        }
        if let Ok(existing) = self.get(brokers, topic).await {
            if existing.message_type != message_type {
                return Err(ProxyError::BadRequest(format!(
                    "topic {topic:?} already exists as {}; delete it first to change its type",
                    message_type_name(existing.message_type)
                )));
            }
            if !fair.key.is_empty() && existing.fairness.key != fair.key {
                return Err(ProxyError::BadRequest(format!(
                    "topic {topic:?} already exists with fairness key {:?}; delete it first to change the key",
                    existing.fairness.key
                )));
            }
            return Ok((false, existing));
        }
        let mut attributes =
            vec![("topic".to_string(), topic.to_string()), ("queue_count".to_string(), queue_count.to_string())];
        if message_type == message_type::LITE {
            let ttl = if lite_ttl_minutes == 0 { DEFAULT_LITE_TTL_MINUTES } else { lite_ttl_minutes };
            attributes.push((LITE_TTL_ATTRIBUTE.to_string(), ttl.to_string()));
        }
        attributes.extend(fair_attributes);
        // Queue 0 last: the topic becomes visible only once every queue exists.
        for index in (0..queue_count).rev() {
            let queue = queue_name(topic, index);
            let request = CreateQueueRequest {
                queue: queue.clone(),
                message_type,
                attributes: attributes.clone(),
                update: false,
            };
            brokers.call_for(&queue, &request).await?;
        }
        self.cache.lock().expect("cache lock").remove(topic);
        let lite_ttl_minutes =
            attributes.iter().find(|(k, _)| k == LITE_TTL_ATTRIBUTE).map_or(0, |(_, v)| v.parse().unwrap_or(0));
        let meta = TopicMeta {
            name: topic.to_string(),
            message_type,
            queue_count,
            lite_ttl_minutes,
            max_send_tps: 0,
            send_throttle: Throttle::Wait,
            fairness: Fairness::of_attributes(&attributes),
        };
        Ok((true, meta))
    }

    /// Changes the topic's send quota and fairness weights at run time, on every queue (queue
    /// 0's shard enforces the quota, every shard reads the weights at its next pop, and
    /// listings read any queue). Other proxies see a new throttle mode within 2 s.
    pub async fn update(&self, brokers: &BrokerPool, topic: &str, change: TopicChange) -> Result<TopicMeta> {
        let TopicChange { max_send_tps, send_throttle: throttle, fair_weights, fair_default_weight } = change;
        self.cache.lock().expect("cache lock").remove(topic);
        let Some(record) = brokers.queue_record(&queue_name(topic, 0)).await? else {
            return Err(ProxyError::TopicNotFound(topic.to_string()));
        };
        let old = meta_of(topic, &record);
        let max_send_tps = max_send_tps.unwrap_or(old.max_send_tps);
        if max_send_tps > crate::groups::QUOTA_TPS_MAX {
            return Err(ProxyError::BadRequest(format!("max_send_tps must be 0..={}", crate::groups::QUOTA_TPS_MAX)));
        }
        let throttle = throttle.unwrap_or(old.send_throttle);
        let fair = Fairness {
            weights: fair_weights.unwrap_or(old.fairness.weights.clone()),
            default_weight: fair_default_weight.unwrap_or(old.fairness.default_weight),
            ..old.fairness.clone()
        };
        let replaced = [
            MAX_SEND_TPS_ATTRIBUTE,
            SEND_THROTTLE_ATTRIBUTE,
            fairness::KEY_ATTRIBUTE,
            fairness::WEIGHTS_ATTRIBUTE,
            fairness::DEFAULT_WEIGHT_ATTRIBUTE,
        ];
        let mut attributes: Vec<(String, String)> =
            record.attributes.iter().filter(|(k, _)| !replaced.contains(&k.as_str())).cloned().collect();
        attributes.push((MAX_SEND_TPS_ATTRIBUTE.to_string(), max_send_tps.to_string()));
        attributes.push((SEND_THROTTLE_ATTRIBUTE.to_string(), throttle.name().to_string()));
        attributes.extend(fair.attributes()?);
        for index in 0..old.queue_count {
            let queue = queue_name(topic, index);
            let request = CreateQueueRequest {
                queue: queue.clone(),
                message_type: old.message_type,
                attributes: attributes.clone(),
                update: true,
            };
            brokers.call_for(&queue, &request).await?;
        }
        self.cache.lock().expect("cache lock").remove(topic);
        Ok(TopicMeta { max_send_tps, send_throttle: throttle, fairness: Fairness::of_attributes(&attributes), ..old })
    }

    /// Deletes the topic's queues, queue 0 first. Returns false when it did not exist.
    pub async fn delete(&self, brokers: &BrokerPool, topic: &str) -> Result<bool> {
        let meta = match self.get(brokers, topic).await {
            Ok(meta) => meta,
            Err(ProxyError::TopicNotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        self.cache.lock().expect("cache lock").remove(topic);
        for index in 0..meta.queue_count {
            let queue = meta.queue(index);
            match brokers.call_for(&queue, &DeleteQueueRequest { queue: queue.clone() }).await {
                Ok(_) => {}
                Err(e) if e.code() == sluice_transport::model::codes::QUEUE_NOT_FOUND => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Every topic on every broker, with the number of messages retained.
    pub async fn list(&self, brokers: &BrokerPool) -> Result<Vec<(TopicMeta, u64)>> {
        let mut topics: BTreeMap<String, (TopicMeta, u64)> = BTreeMap::new();
        for record in brokers.queue_records("").await? {
            let Some(topic) = record.attribute("topic") else { continue };
            let entry = topics.entry(topic.to_string()).or_insert_with(|| (meta_of(topic, &record), 0));
            entry.1 += record.messages;
        }
        Ok(topics.into_values().collect())
    }
}
