//! `sluice message get` and `find`, and `sluice group reset`, on the proxy. Message ids and
//! keys are indexed on the shard that stored each record, so every shard is asked and the
//! answers are merged, newest first.

use std::collections::BTreeSet;
use std::time::Duration;

use sluice_transport::messages::delivery_state::{self, NO_POSITION};
use sluice_transport::messages::{
    FindMessagesRequest as ShardFind, FindMessagesResponse as ShardFound, SeekRequest, SeekResponse,
};
use sluice_transport::model::message_type;
use sluice_transport::model::placement::{split_lite_queue, split_topic_queue};
use sluice_transport::model::record::{RecordView, OFFSET_HELD};

use crate::consume::DLQ_PREFIX;
use crate::convert::{incoming, timestamp_ms, Delivery};
use crate::error::{ProxyError, Result};
use crate::pb::sluice::admin::v1::{GroupDelivery, MessageInfo, QueueReset};
use crate::state::ProxyState;
use crate::topics::TopicMeta;

/// Messages a find returns when it does not say, and at most.
pub const FIND_LIMIT_DEFAULT: u32 = 32;
pub const FIND_LIMIT_MAX: u32 = 256;
/// Records with one message id asked of each shard (an original, its DLQ copies, resends).
const SAME_ID_MAX: u32 = 64;
/// Groups whose state a lookup reports.
const GROUPS_REPORTED_MAX: usize = 256;
const BODY_PREVIEW_BYTES: usize = 256;

/// Where a group's position goes in a reset.
#[derive(Debug, Clone, Copy)]
pub enum ResetTo {
    TimeMs(u64),
    Offset(u64),
}

/// The messages of `topic` with this id (usually one), with each group's state; a group
/// that moved it to its dead-letter topic says so.
pub async fn get_message(state: &ProxyState, topic: &str, message_id: &str) -> Result<(Vec<MessageInfo>, bool)> {
    if message_id.is_empty() {
        return Err(ProxyError::BadRequest("a message id is required".into()));
    }
    state.topics.get(&state.brokers, topic).await?;
    let groups = group_names(state).await?;
    let ask = ShardFind {
        message_id: message_id.into(),
        key: String::new(),
        topic: String::new(),
        groups,
        max_count: SAME_ID_MAX,
    };
    let (found, truncated) = ask_every_shard(state, &ask).await?;
    let mut dead_lettered = BTreeSet::new();
    let mut messages = Vec::new();
    for message in found {
        if let Some(group) = message.topic.strip_prefix(DLQ_PREFIX) {
            dead_lettered.insert(group.to_string());
        } else if message.topic == topic {
            messages.push(message);
        }
    }
    for message in &mut messages {
        for group in &dead_lettered {
            match message.groups.iter_mut().find(|g| &g.group == group) {
                Some(g) => g.state = "dead_lettered".into(),
                None => message.groups.push(GroupDelivery {
                    group: group.clone(),
                    state: "dead_lettered".into(),
                    attempt: 0,
                }),
            }
        }
    }
    Ok((messages, truncated))
}

/// Up to `limit` messages of `topic` carrying `key`, newest first.
pub async fn find_messages(state: &ProxyState, topic: &str, key: &str, limit: u32) -> Result<(Vec<MessageInfo>, bool)> {
    if key.is_empty() {
        return Err(ProxyError::BadRequest("a key is required".into()));
    }
    let limit = if limit == 0 { FIND_LIMIT_DEFAULT } else { limit.min(FIND_LIMIT_MAX) };
    state.topics.get(&state.brokers, topic).await?;
    let groups = group_names(state).await?;
    let ask = ShardFind { message_id: String::new(), key: key.into(), topic: topic.into(), groups, max_count: limit };
    let (mut found, mut truncated) = ask_every_shard(state, &ask).await?;
    truncated |= found.len() > limit as usize;
    found.truncate(limit as usize);
    Ok((found, truncated))
}

async fn group_names(state: &ProxyState) -> Result<Vec<String>> {
    let groups = state.groups.list(&state.brokers, state.settings.max_delivery_attempts).await?;
    Ok(groups.into_iter().take(GROUPS_REPORTED_MAX).map(|g| g.name).collect())
}

/// Every shard's matches, newest first, and whether any shard left some out.
async fn ask_every_shard(state: &ProxyState, ask: &ShardFind) -> Result<(Vec<MessageInfo>, bool)> {
    let (mut found, mut truncated) = (Vec::new(), false);
    for owner in state.brokers.all_shards() {
        let frame = state.brokers.call(owner, ask).await?;
        let reply = frame.access::<ShardFound>()?;
        truncated |= reply.truncated;
        let stored_at = state.brokers.shard_endpoint(owner);
        for m in reply.messages.iter() {
            let groups = m.groups.iter().map(|g| (g.0.as_str(), g.1, g.2.to_native()));
            if let Some(info) = message_info(&m.record, m.position.to_native(), stored_at, &ask.topic, groups) {
                found.push(info);
            }
        }
    }
    found.sort_by_key(|m| std::cmp::Reverse((m.store_time_ms, m.position)));
    Ok((found, truncated))
}

/// A found record as the admin API shows it; `None` if it is unreadable (logged).
fn message_info<'a>(
    record: &[u8],
    position: u64,
    stored_at: &str,
    topic: &str,
    groups: impl Iterator<Item = (&'a str, u8, u32)>,
) -> Option<MessageInfo> {
    let view = RecordView::parse(record).ok()?;
    let in_topic = |q: &str| {
        let t = split_lite_queue(q).map(|(t, _, _)| t).or_else(|| split_topic_queue(q).map(|(t, _)| t));
        topic.is_empty() || t == Some(topic)
    };
    let (queue, offset) = view.queue_refs().find(|(q, _)| in_topic(q))?;
    let (topic, index) =
        split_lite_queue(queue).map(|(t, i, _)| (t, i)).or_else(|| split_topic_queue(queue)).unwrap_or((queue, 0));
    let delivery = Delivery {
        queue_id: index as i32,
        offset,
        attempt: 0,
        receipt_handle: String::new(),
        invisible: Duration::ZERO,
        store_host: stored_at,
    };
    let message = match incoming(record, &delivery) {
        Ok(message) => message,
        Err(e) => {
            tracing::warn!(error = %e, position, "a found record could not be read");
            return None;
        }
    };
    let system = message.system_properties.unwrap_or_default();
    let groups = groups
        .filter(|(_, state, _)| *state != NO_POSITION)
        .map(|(group, state, attempt)| GroupDelivery {
            group: group.to_string(),
            state: delivery_state::name(state).into(),
            attempt,
        })
        .collect();
    Some(MessageInfo {
        message_id: system.message_id,
        topic: topic.to_string(),
        queue: index,
        offset: (offset != OFFSET_HELD).then_some(offset),
        stored_at: stored_at.to_string(),
        position,
        store_time_ms: view.store_ms as i64,
        tag: system.tag.unwrap_or_default(),
        keys: system.keys,
        message_type: system.message_type,
        message_group: system.message_group.unwrap_or_default(),
        lite_topic: system.lite_topic.unwrap_or_default(),
        properties: message.user_properties,
        body_bytes: message.body.len() as u32,
        body_preview: message.body[..message.body.len().min(BODY_PREVIEW_BYTES)].to_vec(),
        groups,
        delivery_time_ms: system.delivery_timestamp.as_ref().map_or(0, |t| timestamp_ms(t) as i64),
    })
}

/// Moves `group`'s position on every queue of `topic`. First every queue is asked where it
/// would go and what it would skip in flight; with something in flight and no `force`,
/// nothing moves. Returns each queue's move and whether the reset happened.
pub async fn reset_group(
    state: &ProxyState,
    group: &str,
    topic: &str,
    to: ResetTo,
    force: bool,
) -> Result<(Vec<QueueReset>, bool)> {
    let meta = state.topics.get(&state.brokers, topic).await?;
    if meta.message_type == message_type::LITE {
        return Err(ProxyError::BadRequest(format!(
            "{topic} is a LITE topic: a lite consumer's start is set by its subscription's offset option"
        )));
    }
    state.groups.get(&state.brokers, group, state.settings.max_delivery_attempts).await?;
    let planned = seek_all(state, &meta, group, to, false, force).await?;
    if !force && planned.iter().any(|q| q.in_flight_skipped > 0) {
        return Ok((planned, false));
    }
    let moved = seek_all(state, &meta, group, to, true, force).await?;
    let all = moved.iter().all(|q| q.moved);
    Ok((moved, all))
}

async fn seek_all(
    state: &ProxyState,
    meta: &TopicMeta,
    group: &str,
    to: ResetTo,
    apply: bool,
    force: bool,
) -> Result<Vec<QueueReset>> {
    let mut queues = Vec::with_capacity(meta.queue_count as usize);
    for index in 0..meta.queue_count {
        let queue = meta.queue(index);
        let (by_time, time_ms, offset) = match to {
            ResetTo::TimeMs(ms) => (true, ms, 0),
            ResetTo::Offset(offset) => (false, 0, offset),
        };
        let ask = SeekRequest { queue: queue.clone(), group: group.into(), by_time, time_ms, offset, apply, force };
        let frame = state.brokers.call_for(&queue, &ask).await?;
        let reply = frame.access::<SeekResponse>()?;
        queues.push(QueueReset {
            queue: index,
            from: reply.from.as_ref().map(|f| f.to_native()),
            to: reply.to.to_native(),
            in_flight_skipped: reply.in_flight_skipped.to_native(),
            moved: reply.moved,
        });
    }
    Ok(queues)
}
