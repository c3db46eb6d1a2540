//! Queue names and their placement on shards.
//!
//! A queue is any append-only sequence (a topic queue, a lite topic, a retry or dead-letter
//! queue). A queue named `parent/child` is placed on its parent's shard, so one stored record
//! can be dispatched into a queue and its children (multi-dispatch) without crossing shards.

use crate::error::{EngineError, Result};

/// Longest queue name, in bytes. Record framing stores the length in one byte.
pub const QUEUE_NAME_MAX_BYTES: usize = 255;

/// Checks a queue name supplied from outside.
pub fn validate_queue_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > QUEUE_NAME_MAX_BYTES {
        Some("longer than 255 bytes")
    } else if name.starts_with('/') || name.ends_with('/') {
        Some("starts or ends with '/'")
    } else if name.bytes().any(|b| b.is_ascii_control()) {
        Some("contains a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EngineError::InvalidQueueName { name: name.to_string(), reason }),
        None => Ok(()),
    }
}

/// The part of a name that decides its shard: everything before the first '/'.
pub fn placement_key(name: &str) -> &str {
    name.split('/').next().unwrap_or(name)
}

/// Stable shard for a queue. FNV-1a is fixed forever: changing it would move queues.
pub fn shard_for_queue(name: &str, shard_count: usize) -> usize {
    assert!(shard_count > 0);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in placement_key(name).bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shard_count as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_live_with_their_parent() {
        for shards in 1..8 {
            for i in 0..100 {
                let parent = format!("topic#{i}");
                let child = format!("{parent}/session-{}", i * 7);
                assert_eq!(shard_for_queue(&parent, shards), shard_for_queue(&child, shards));
            }
        }
    }

    #[test]
    fn placement_is_stable() {
        // Pinned values: a change here moves every existing queue to another shard.
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (published test vector).
        assert_eq!(shard_for_queue("a", 1000), (0xaf63_dc4c_8601_ec8c_u64 % 1000) as usize);
        assert_eq!(shard_for_queue("a/child", 7), (0xaf63_dc4c_8601_ec8c_u64 % 7) as usize);
        let spread: std::collections::HashSet<usize> = (0..64).map(|i| shard_for_queue(&format!("q{i}"), 4)).collect();
        assert_eq!(spread.len(), 4, "64 queues should reach all 4 shards");
    }

    #[test]
    fn bad_names_are_rejected() {
        assert!(validate_queue_name("").is_err());
        assert!(validate_queue_name("/x").is_err());
        assert!(validate_queue_name("x/").is_err());
        assert!(validate_queue_name("a\nb").is_err());
        assert!(validate_queue_name(&"x".repeat(256)).is_err());
        assert!(validate_queue_name("chatbot/session-1").is_ok());
    }
}
