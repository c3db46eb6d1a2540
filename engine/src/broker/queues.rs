//! Queue configurations a shard keeps: the message type a topic's queue was created with and
//! its attributes. Durable in the `QueueConfig` state table, cached in memory.

use std::collections::BTreeMap;

use crate::broker::error::BrokerError;
use crate::index::StateTable;
use crate::shard::Shard;

/// Most attributes one queue carries.
pub const QUEUE_ATTRIBUTES_MAX: usize = 16;
/// Longest attribute key or value, in bytes.
pub const QUEUE_ATTRIBUTE_MAX_BYTES: usize = 255;
/// Entries read from the index per scan step at start-up.
const LOAD_CHUNK: usize = 4096;

pub use sluice_transport::model::message_type;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub message_type: u8,
    pub attributes: Vec<(String, String)>,
}

impl QueueConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !message_type::is_known(self.message_type) {
            return Err(format!("message type {} is not one of 1..=6", self.message_type));
        }
        if self.attributes.len() > QUEUE_ATTRIBUTES_MAX {
            return Err(format!("at most {QUEUE_ATTRIBUTES_MAX} attributes per queue"));
        }
        if self
            .attributes
            .iter()
            .any(|(k, v)| k.len() > QUEUE_ATTRIBUTE_MAX_BYTES || v.len() > QUEUE_ATTRIBUTE_MAX_BYTES)
        {
            return Err(format!("attribute keys and values are at most {QUEUE_ATTRIBUTE_MAX_BYTES} bytes"));
        }
        Ok(())
    }

    /// type u8, count u8, then per attribute: key len u8, key, value len u8, value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.message_type, self.attributes.len() as u8];
        for (k, v) in &self.attributes {
            for part in [k, v] {
                out.push(part.len() as u8);
                out.extend_from_slice(part.as_bytes());
            }
        }
        out
    }

    /// `None` for bytes `encode` did not produce.
    pub fn decode(bytes: &[u8]) -> Option<QueueConfig> {
        let (&message_type, rest) = bytes.split_first()?;
        let (&count, mut rest) = rest.split_first()?;
        let mut attributes = Vec::with_capacity(usize::from(count).min(QUEUE_ATTRIBUTES_MAX));
        for _ in 0..count {
            let mut part = || {
                let (&len, tail) = rest.split_first()?;
                let text = std::str::from_utf8(tail.get(..usize::from(len))?).ok()?.to_string();
                rest = &tail[usize::from(len)..];
                Some(text)
            };
            let key = part()?;
            let value = part()?;
            attributes.push((key, value));
        }
        let config = QueueConfig { message_type, attributes };
        (rest.is_empty() && config.validate().is_ok()).then_some(config)
    }
}

#[derive(Debug, Default)]
pub struct QueueConfigs {
    by_name: BTreeMap<String, QueueConfig>,
}

impl QueueConfigs {
    /// Reads every stored configuration of the shard (at most `max`).
    pub async fn load(shard: &Shard, max: usize) -> Result<QueueConfigs, BrokerError> {
        let mut by_name = BTreeMap::new();
        let mut from = Vec::new();
        loop {
            let chunk = shard.state_scan(StateTable::QueueConfig, from.clone(), LOAD_CHUNK).await?;
            let done = chunk.len() < LOAD_CHUNK;
            for (key, value) in chunk {
                let name = String::from_utf8(key.clone()).ok();
                match (name, QueueConfig::decode(&value)) {
                    (Some(name), Some(config)) => {
                        by_name.insert(name, config);
                    }
                    _ => {
                        tracing::warn!(key = ?String::from_utf8_lossy(&key), "skipping an unreadable queue configuration")
                    }
                }
                from = key;
                from.push(0); // the next key after this one
            }
            if done || by_name.len() >= max {
                break;
            }
        }
        Ok(QueueConfigs { by_name })
    }

    pub fn contains(&self, queue: &str) -> bool {
        self.by_name.contains_key(queue)
    }

    pub fn get(&self, queue: &str) -> Option<&QueueConfig> {
        self.by_name.get(queue)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// True when the queue was not configured before.
    pub fn insert(&mut self, queue: String, config: QueueConfig) -> bool {
        self.by_name.insert(queue, config).is_none()
    }

    pub fn remove(&mut self, queue: &str) -> Option<QueueConfig> {
        self.by_name.remove(queue)
    }

    /// Configurations in name order from the first name >= `prefix`, strictly after `after`
    /// (when not empty), so a prefix lookup does not walk the names before it.
    pub fn range_from<'a>(
        &'a self,
        prefix: &str,
        after: &str,
    ) -> impl Iterator<Item = (&'a String, &'a QueueConfig)> + 'a {
        use std::ops::Bound;
        let lower = if !after.is_empty() && after >= prefix {
            Bound::Excluded(after.to_string())
        } else {
            Bound::Included(prefix.to_string())
        };
        self.by_name.range::<String, _>((lower, Bound::Unbounded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_rejects_garbage() {
        let config = QueueConfig {
            message_type: message_type::FIFO,
            attributes: vec![("queue_count".into(), "8".into()), ("topic".into(), "orders".into())],
        };
        assert_eq!(QueueConfig::decode(&config.encode()), Some(config.clone()));
        let bytes = config.encode();
        for cut in 0..bytes.len() {
            assert_eq!(QueueConfig::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        assert_eq!(QueueConfig::decode(&[9, 0]), None, "unknown type");
    }
}
