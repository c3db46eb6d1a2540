//! Queue names and where a queue lives: on which broker (by CRC32C of the placement key) and on
//! which of its shards (by FNV-1a of the same key). Both hashes are fixed forever: changing one
//! would move existing queues.
//!
//! A queue is any append-only sequence (a topic queue, a lite topic, a retry or dead-letter
//! queue). A queue named `parent/child` is placed with its parent, so one stored record can be
//! dispatched into a queue and its children (multi-dispatch) without crossing shards.

pub use super::record::QUEUE_NAME_MAX_BYTES;

/// Why a queue name is refused, or `Ok`.
pub fn check_queue_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty")
    } else if name.len() > QUEUE_NAME_MAX_BYTES {
        Err("longer than 255 bytes")
    } else if name.starts_with('/') || name.ends_with('/') {
        Err("starts or ends with '/'")
    } else if name.bytes().any(|b| b.is_ascii_control()) {
        Err("contains a control character")
    } else {
        Ok(())
    }
}

/// The part of a name that decides its placement: everything before the first '/'.
pub fn placement_key(name: &str) -> &str {
    name.split('/').next().unwrap_or(name)
}

/// Stable shard for a queue (FNV-1a 64 of the placement key).
pub fn shard_for_queue(name: &str, shard_count: usize) -> usize {
    assert!(shard_count > 0);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in placement_key(name).bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shard_count as u64) as usize
}

/// Stable broker for a queue. Not the shard hash, so brokers and shards are chosen
/// independently (the same hash for both would leave shards idle).
pub fn broker_for_queue(name: &str, broker_count: usize) -> usize {
    assert!(broker_count > 0);
    (crc32c::crc32c(placement_key(name).as_bytes()) as usize) % broker_count
}

/// Queue `index` of `topic`: `topic#index`.
pub fn topic_queue(topic: &str, index: u32) -> String {
    format!("{topic}#{index}")
}

/// The topic and index of a topic queue name (`topic#index`); `None` for other queues,
/// lite queues included.
pub fn split_topic_queue(queue: &str) -> Option<(&str, u32)> {
    if queue.contains('/') {
        return None;
    }
    let (topic, index) = queue.rsplit_once('#')?;
    Some((topic, index.parse().ok()?))
}

/// The queue attribute of a LITE topic's queues holding its lite TTL in minutes: a lite topic
/// with no writes for that long and no subscriber is reclaimed by its broker.
pub const LITE_TTL_ATTRIBUTE: &str = "lite_ttl_minutes";

/// Longest lite topic name, in bytes: room for a 36-character UUID with a prefix, and the
/// lite queue name (`topic#index/lite`) stays within `QUEUE_NAME_MAX_BYTES`.
pub const LITE_TOPIC_MAX_BYTES: usize = 96;

/// Why a lite topic name is refused, or `Ok`: 1..=96 bytes of visible ASCII, not starting or
/// ending with '/'.
pub fn check_lite_topic_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty")
    } else if name.len() > LITE_TOPIC_MAX_BYTES {
        Err("longer than 96 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        Err("only visible ASCII characters are allowed (no spaces or control characters)")
    } else if name.starts_with('/') || name.ends_with('/') {
        Err("starts or ends with '/'")
    } else {
        Ok(())
    }
}

/// The queue of lite topic `lite` of `topic`: a child of the topic queue its name hashes to
/// (`topic#index/lite`), so it lives on that queue's shard and keeps the parent's placement.
pub fn lite_queue(topic: &str, queue_count: u32, lite: &str) -> String {
    format!("{}/{lite}", topic_queue(topic, lite_queue_index(lite, queue_count)))
}

/// Which of the parent's queues a lite topic is placed under (FNV-1a 64 of its name; fixed
/// forever, like the other placement hashes).
pub fn lite_queue_index(lite: &str, queue_count: u32) -> u32 {
    assert!(queue_count > 0);
    (super::record::name_hash(lite) % u64::from(queue_count)) as u32
}

/// (topic, index, lite topic) of a lite queue name (`topic#index/lite`).
pub fn split_lite_queue(queue: &str) -> Option<(&str, u32, &str)> {
    let (parent, lite) = queue.split_once('/')?;
    let (topic, index) = split_topic_queue(parent)?;
    (!lite.is_empty()).then_some((topic, index, lite))
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
                assert_eq!(broker_for_queue(&parent, shards), broker_for_queue(&child, shards));
            }
        }
    }

    #[test]
    fn lite_queues_are_children_of_a_topic_queue() {
        let queue = lite_queue("chat", 8, "a2a/task-7#3");
        let (topic, index, lite) = split_lite_queue(&queue).unwrap();
        assert_eq!((topic, lite), ("chat", "a2a/task-7#3"));
        assert_eq!(index, lite_queue_index("a2a/task-7#3", 8));
        assert!(queue.starts_with(&format!("chat#{index}/")));
        assert_eq!(split_topic_queue(&queue), None, "a lite queue is not a topic queue, whatever its name holds");
        assert_eq!(split_lite_queue("chat#1"), None);
        assert_eq!(split_lite_queue("chat/x"), None);
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
    fn brokers_and_shards_are_chosen_independently() {
        // With 2 brokers and 2 shards each, every (broker, shard) pair must get queues.
        let mut seen = std::collections::HashSet::new();
        for i in 0..64 {
            let queue = format!("orders#{i}");
            seen.insert((broker_for_queue(&queue, 2), shard_for_queue(&queue, 2)));
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
    }

    #[test]
    fn bad_names_are_rejected() {
        assert!(check_queue_name("").is_err());
        assert!(check_queue_name("/x").is_err());
        assert!(check_queue_name("x/").is_err());
        assert!(check_queue_name("a\nb").is_err());
        assert!(check_queue_name(&"x".repeat(256)).is_err());
        assert!(check_queue_name("chatbot/session-1").is_ok());
    }

    #[test]
    fn topic_queue_names_round_trip() {
        assert_eq!(split_topic_queue(&topic_queue("a#b", 7)), Some(("a#b", 7)));
        assert_eq!(split_topic_queue("plain"), None);
    }
}
