//! Consumer groups as records on the brokers. Group `G` is stored as the queue configuration
//! `%GROUP%G` (no messages are ever appended to it) on the shard that name hashes to, with its
//! settings as attributes (`max_delivery_attempts`, `fifo`, `max_receive_tps`, `throttle`).
//! That shard also keeps the group's receive quota (`quota.rs`). With `auto_create_groups` off, a
//! group must be created first and an unknown one gets CONSUMER_GROUP_NOT_FOUND; with it on (the
//! default, like RocketMQ's autoCreateSubscriptionGroup) a group is recorded on first use, as a
//! non-FIFO group.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sluice_transport::messages::{CreateQueueRequest, DeleteQueueRequest};
use sluice_transport::model::message_type;

use crate::error::{ProxyError, Result};
use sluice_transport::cluster::{BrokerPool, QueueRecord};

/// Prefix of the queue name that records a group.
pub const GROUP_RECORD_PREFIX: &str = "%GROUP%";
/// Most deliveries a group may allow before dead-lettering.
pub const MAX_DELIVERY_ATTEMPTS_MAX: u32 = 1000;
/// How long a group lookup is trusted before asking the broker again.
const CACHE_TTL: Duration = Duration::from_secs(2);
/// Group lookups kept in the cache at most.
const CACHE_ENTRIES_MAX: usize = 100_000;

/// Highest rate quota a group or topic may state, in messages per second.
pub const QUOTA_TPS_MAX: u32 = 10_000_000;

/// What a receive over the group's quota gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Throttle {
    /// It waits inside its long poll until the quota has room (or the poll ends empty).
    #[default]
    Wait,
    /// It fails at once with TOO_MANY_REQUESTS.
    Reject,
}

impl Throttle {
    pub fn parse(text: &str) -> Result<Throttle> {
        match text {
            "" | "wait" => Ok(Throttle::Wait),
            "reject" => Ok(Throttle::Reject),
            other => Err(ProxyError::BadRequest(format!("throttle {other:?} is not \"wait\" or \"reject\""))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Throttle::Wait => "wait",
            Throttle::Reject => "reject",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMeta {
    pub name: String,
    pub max_delivery_attempts: u32,
    /// A FIFO group: each message group is consumed in order, one message at a time.
    pub fifo: bool,
    /// Receive quota across all proxies, in messages per second; 0 for none.
    pub max_receive_tps: u32,
    pub throttle: Throttle,
}

impl GroupMeta {
    fn check(&self) -> Result<()> {
        if !(1..=MAX_DELIVERY_ATTEMPTS_MAX).contains(&self.max_delivery_attempts) {
            return Err(ProxyError::BadRequest(format!(
                "max_delivery_attempts must be 1..={MAX_DELIVERY_ATTEMPTS_MAX}"
            )));
        }
        if self.max_receive_tps > QUOTA_TPS_MAX {
            return Err(ProxyError::BadRequest(format!("max_receive_tps must be 0..={QUOTA_TPS_MAX}")));
        }
        Ok(())
    }

    fn attributes(&self) -> Vec<(String, String)> {
        vec![
            ("max_delivery_attempts".to_string(), self.max_delivery_attempts.to_string()),
            ("fifo".to_string(), self.fifo.to_string()),
            ("max_receive_tps".to_string(), self.max_receive_tps.to_string()),
            ("throttle".to_string(), self.throttle.name().to_string()),
        ]
    }
}

/// A run-time change of a group's settings; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct GroupChange {
    pub max_delivery_attempts: Option<u32>,
    pub fifo: Option<bool>,
    pub max_receive_tps: Option<u32>,
    pub throttle: Option<Throttle>,
}

pub fn record_name(group: &str) -> String {
    format!("{GROUP_RECORD_PREFIX}{group}")
}

fn meta_of(name: &str, record: &QueueRecord, default_attempts: u32) -> GroupMeta {
    let attempts = record.attribute("max_delivery_attempts").and_then(|v| v.parse().ok()).unwrap_or(default_attempts);
    let fifo = record.attribute("fifo") == Some("true");
    let max_receive_tps = record.attribute("max_receive_tps").and_then(|v| v.parse().ok()).unwrap_or(0);
    let throttle = record.attribute("throttle").and_then(|v| Throttle::parse(v).ok()).unwrap_or_default();
    GroupMeta { name: name.to_string(), max_delivery_attempts: attempts, fifo, max_receive_tps, throttle }
}

#[derive(Default)]
pub struct Groups {
    cache: Mutex<HashMap<String, (Instant, GroupMeta)>>,
}

impl Groups {
    /// The group's record, or `GroupNotFound`.
    pub async fn get(&self, brokers: &BrokerPool, group: &str, default_attempts: u32) -> Result<GroupMeta> {
        if let Some((at, meta)) = self.cache.lock().expect("cache lock").get(group) {
            if at.elapsed() < CACHE_TTL {
                return Ok(meta.clone());
            }
        }
        let Some(record) = brokers.queue_record(&record_name(group)).await? else {
            self.cache.lock().expect("cache lock").remove(group);
            return Err(ProxyError::GroupNotFound(group.to_string()));
        };
        let meta = meta_of(group, &record, default_attempts);
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_ENTRIES_MAX {
            cache.clear();
        }
        cache.insert(group.to_string(), (Instant::now(), meta.clone()));
        Ok(meta)
    }

    /// Records a group (idempotent: an existing one is returned unchanged).
    pub async fn create(&self, brokers: &BrokerPool, meta: GroupMeta) -> Result<(bool, GroupMeta)> {
        meta.check()?;
        if let Ok(existing) = self.get(brokers, &meta.name, meta.max_delivery_attempts).await {
            return Ok((false, existing));
        }
        self.write(brokers, &meta, false).await?;
        Ok((true, meta))
    }

    /// Changes a recorded group's settings. Other proxies see the change within the cache's
    /// 2 s; the quota itself is enforced by the record's shard, from the record, at once.
    pub async fn update(
        &self,
        brokers: &BrokerPool,
        group: &str,
        change: GroupChange,
        default_attempts: u32,
    ) -> Result<GroupMeta> {
        self.cache.lock().expect("cache lock").remove(group);
        let old = self.get(brokers, group, default_attempts).await?;
        let meta = GroupMeta {
            name: old.name,
            max_delivery_attempts: change.max_delivery_attempts.unwrap_or(old.max_delivery_attempts),
            fifo: change.fifo.unwrap_or(old.fifo),
            max_receive_tps: change.max_receive_tps.unwrap_or(old.max_receive_tps),
            throttle: change.throttle.unwrap_or(old.throttle),
        };
        meta.check()?;
        self.write(brokers, &meta, true).await?;
        Ok(meta)
    }

    async fn write(&self, brokers: &BrokerPool, meta: &GroupMeta, update: bool) -> Result<()> {
        let record = record_name(&meta.name);
        let request = CreateQueueRequest {
            queue: record.clone(),
            message_type: message_type::NORMAL,
            attributes: meta.attributes(),
            update,
        };
        brokers.call_for(&record, &request).await?;
        self.cache.lock().expect("cache lock").remove(&meta.name);
        Ok(())
    }

    /// Removes the group's record. Returns false when there was none.
    pub async fn delete(&self, brokers: &BrokerPool, group: &str) -> Result<bool> {
        self.cache.lock().expect("cache lock").remove(group);
        let record = record_name(group);
        match brokers.call_for(&record, &DeleteQueueRequest { queue: record.clone() }).await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == sluice_transport::model::codes::QUEUE_NOT_FOUND => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Every recorded group on every broker.
    pub async fn list(&self, brokers: &BrokerPool, default_attempts: u32) -> Result<Vec<GroupMeta>> {
        let mut groups: Vec<GroupMeta> = brokers
            .queue_records(GROUP_RECORD_PREFIX)
            .await?
            .iter()
            .map(|record| meta_of(record.name.trim_start_matches(GROUP_RECORD_PREFIX), record, default_attempts))
            .collect();
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(groups)
    }
}
