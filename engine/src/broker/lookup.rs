//! Finding stored messages by id or key, with where each consumer group stands with every
//! match (`sluice message get` and `find`), and moving a group's position on a queue to a
//! time or an offset (`sluice group reset`).

use sluice_transport::messages::delivery_state::{ACKED, NO_POSITION, PENDING, UNTRACKED};
use sluice_transport::messages::{FindMessagesRequest, FindMessagesResponse, FoundMessage, SeekRequest, SeekResponse};
use sluice_transport::model::placement::{split_lite_queue, split_topic_queue};
use sluice_transport::model::record::{txn_state, OFFSET_HELD};
use sluice_transport::{Frame, OutFrame};

use crate::broker::error::BrokerError;
use crate::broker::handler::{bounded, now_ms, Result, ShardHandler};
use crate::index::{HeldKind, QueueEntry};

/// Matches one find returns per shard at most (the proxy's own limit).
const FIND_MATCHES_MAX: u32 = 256;
/// Room a find reply keeps for everything but the records.
const FIND_REPLY_OVERHEAD_BYTES: usize = 64 << 10;
/// Index entries a topic-filtered search reads per shard at most.
const FIND_SCAN_MAX: usize = 1024;
/// Record bytes one find reply carries at most; later matches are left out (`truncated`).
const FIND_BYTES_MAX: usize = 8 << 20;
/// Groups whose state one find reports at most.
const FIND_GROUPS_MAX: usize = 256;
/// Longest message id or key searched for.
const LOOKUP_NAME_MAX_BYTES: usize = 255;

/// When a queue entry's message entered its queue: its store time, or for a delay message
/// dispatched when due, its due time (the entry keeps the record's original store time).
pub(super) fn entered_ms(entry: &QueueEntry) -> u64 {
    entry.store_ms.max(entry.delivery_ms)
}

/// The topic a queue belongs to (a lite topic's is its parent's).
fn topic_of(queue: &str) -> &str {
    match split_lite_queue(queue) {
        Some((topic, _, _)) => topic,
        None => split_topic_queue(queue).map_or(queue, |(topic, _)| topic),
    }
}

impl ShardHandler {
    pub(super) async fn find_messages(&self, request: &Frame) -> Result<OutFrame> {
        let ask = request.access::<FindMessagesRequest>()?;
        let (id, key, topic) = (ask.message_id.as_str(), ask.key.as_str(), ask.topic.as_str());
        if id.is_empty() == key.is_empty() {
            return Err(BrokerError::InvalidRequest("a find names exactly one of a message id and a key".into()));
        }
        if id.len().max(key.len()) > LOOKUP_NAME_MAX_BYTES || ask.groups.len() > FIND_GROUPS_MAX {
            return Err(BrokerError::InvalidRequest(format!(
                "a find takes an id or key of at most {LOOKUP_NAME_MAX_BYTES} bytes and at most {FIND_GROUPS_MAX} groups"
            )));
        }
        let max = bounded(ask.max_count.to_native(), FIND_MATCHES_MAX) as usize;
        // One more than asked tells whether there were more.
        let scan = if topic.is_empty() { max + 1 } else { FIND_SCAN_MAX };
        let records = if id.is_empty() {
            self.shard.by_key(key, scan).await?
        } else {
            self.shard.all_by_message_id(id, scan).await?
        };
        let now = now_ms();
        let bytes_max =
            FIND_BYTES_MAX.min((self.limits.max_frame_bytes as usize).saturating_sub(FIND_REPLY_OVERHEAD_BYTES));
        let (mut found, mut bytes, mut truncated) = (Vec::new(), 0, !topic.is_empty() && records.len() >= scan);
        for record in &records {
            let view = record.view();
            let Some((queue, offset)) = view.queue_refs().find(|(q, _)| topic.is_empty() || topic_of(q) == topic)
            else {
                continue;
            };
            // At least one match, even past the byte budget (a frame holds any one record).
            if found.len() == max || (!found.is_empty() && bytes + record.bytes().len() > bytes_max) {
                truncated = true;
                break;
            }
            bytes += record.bytes().len();
            let key_hash = QueueEntry::of_record(&view, 0, 0).key_hash;
            let held = offset == OFFSET_HELD && self.still_held(&view, record.position).await;
            let mut groups = Vec::with_capacity(ask.groups.len());
            for group in ask.groups.iter() {
                let (state, attempt) = if offset != OFFSET_HELD {
                    self.state_of(group.as_str(), queue, offset, key_hash, now).await
                } else if held {
                    // A delay message not due yet, or a transaction not committed yet.
                    (PENDING, 0)
                } else {
                    // Dispatched into its queue since (or discarded): the record does not
                    // say at which offset, so where each group stands is not known here.
                    (UNTRACKED, 0)
                };
                groups.push((group.as_str().to_string(), state, attempt));
            }
            found.push(FoundMessage { position: record.position, groups, record: record.bytes() });
        }
        let reply = FindMessagesResponse { messages: found, truncated };
        OutFrame::encode(request.request_id(), &reply, self.limits.max_frame_bytes).map_err(Self::unencodable)
    }

    /// Whether a delay or transaction record is still held back from its queues.
    async fn still_held(&self, view: &sluice_transport::model::record::RecordView<'_>, position: u64) -> bool {
        let a = &view.attributes;
        let (kind, due_ms) =
            if a.txn_state == txn_state::HALF { (HeldKind::Half, 0) } else { (HeldKind::Timer, a.delivery_ms) };
        matches!(self.shard.held(kind, due_ms, position).await, Ok(Some(_)))
    }

    /// Where `group` stands with the message at `offset` of `queue`: from its delivery state
    /// when it has one here, else from its committed offset.
    async fn state_of(&self, group: &str, queue: &str, offset: u64, key_hash: u64, now_ms: u64) -> (u8, u32) {
        let live = {
            let scheduler = self.scheduler.borrow();
            scheduler.locate(queue).and_then(|(topic, index)| {
                let gq = scheduler.group(group, topic)?.queues.get(&index)?;
                Some(gq.state_of(offset, key_hash, now_ms))
            })
        };
        if let Some(state) = live {
            return state;
        }
        match self.shard.consumer_offset(group, queue).await {
            Ok(Some(committed)) if offset < committed => (ACKED, 0),
            Ok(Some(_)) => (PENDING, 0),
            Ok(None) | Err(_) => (NO_POSITION, 0),
        }
    }

    /// Where a group's position on a queue would go (by time or offset), what that would skip
    /// while in flight, and with `apply`, the move itself (refused over in-flight messages
    /// unless `force`).
    pub(super) async fn seek(&self, request: &Frame) -> Result<SeekResponse> {
        let ask = request.access::<SeekRequest>()?;
        let (queue, group) = (ask.queue.as_str(), ask.group.as_str());
        self.check_queue(queue)?;
        Self::check_group(group)?;
        let (topic, index) = self.index_for_commit(queue)?;
        let (min, max) = self.shard.queue_info(queue)?.map_or((0, 0), |q| (q.min_offset, q.max_offset));
        let to = if ask.by_time {
            self.first_stored_at_or_after(queue, min, max, ask.time_ms.to_native()).await?
        } else {
            ask.offset.to_native().clamp(min, max)
        };
        let (floor, in_flight_skipped) = self.in_flight_below(group, &topic, index, to);
        let from = match floor {
            Some(floor) => Some(floor),
            None => self.shard.consumer_offset(group, queue).await?,
        };
        if !ask.apply || (in_flight_skipped > 0 && !ask.force) {
            return Ok(SeekResponse { from, to, in_flight_skipped, moved: false });
        }
        // Checked again where the move happens: a lease taken meanwhile refuses the move.
        let moved = self.move_position(group, &topic, index, queue, to, !ask.force).await?;
        let in_flight_skipped =
            if moved { in_flight_skipped } else { self.in_flight_below(group, &topic, index, to).1 };
        Ok(SeekResponse { from, to, in_flight_skipped, moved })
    }

    /// The group's floor on a queue (if it has delivery state there) and how many live leases
    /// lie below `to`.
    fn in_flight_below(&self, group: &str, topic: &str, index: u32, to: u64) -> (Option<u64>, u64) {
        let now = now_ms();
        let scheduler = self.scheduler.borrow();
        match scheduler.group(group, topic).and_then(|gt| gt.queues.get(&index)) {
            Some(gq) => {
                let skipped = gq.live_leases_below(to, now).count();
                (Some(gq.floor()), skipped as u64)
            }
            None => (None, 0),
        }
    }

    /// The first offset in `[min, max)` that entered the queue at or after `time_ms` (`max`
    /// when none did): a binary search over the queue index. A message enters when it is
    /// stored, a delay or transaction message when it is dispatched (`entered_ms`), so these
    /// times follow offsets unless the broker's clock stepped back.
    async fn first_stored_at_or_after(&self, queue: &str, min: u64, max: u64, time_ms: u64) -> Result<u64> {
        let (mut lo, mut hi) = (min, max);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let entries = self.shard.entries(queue, mid, mid + 1).await?;
            match entries.first() {
                Some(entry) if entered_ms(entry) >= time_ms => hi = mid,
                // Earlier, or already removed by retention.
                _ => lo = mid + 1,
            }
        }
        Ok(lo)
    }
}
