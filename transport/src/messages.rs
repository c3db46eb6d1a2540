//! Every frame kind and its rkyv body. Bodies that carry message bytes borrow them
//! (`InlineAsBox`), so encoding copies a body once, into the frame, and the receiver reads
//! the archived slice in place.
//!
//! Kind numbers are part of the wire format: never reuse or renumber one (`RETIRED_KINDS` lists
//! the retired ones). Broker operations come in pairs from 10 up: an even request kind, then its
//! odd reply kind.

use rkyv::with::InlineAsBox;
use rkyv::{Archive, Serialize};

use crate::error::FrameError;
use crate::frame::{Message, Request};
use crate::peer_auth::{PeerProof, MAC_BYTES};

macro_rules! frame_kinds {
    ($($name:ident = $value:literal),* $(,)?) => {
        /// The kind field of a frame header.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum FrameKind { $($name = $value),* }

        impl FrameKind {
            pub const ALL: &'static [FrameKind] = &[$(FrameKind::$name),*];

            /// The kind's name, as metrics label it.
            pub fn name(self) -> &'static str {
                match self { $(FrameKind::$name => stringify!($name)),* }
            }
        }

        impl TryFrom<u16> for FrameKind {
            type Error = FrameError;
            fn try_from(kind: u16) -> Result<Self, FrameError> {
                match kind {
                    $($value => Ok(FrameKind::$name),)*
                    _ => Err(FrameError::UnknownKind { kind }),
                }
            }
        }
    };
}

frame_kinds! {
    Error = 1,
    Hello = 2,
    HelloAck = 3,
    Heartbeat = 4,
    HeartbeatAck = 5,
    Echo = 6,
    EchoReply = 7,
    RdmaConnect = 8,
    RdmaAccept = 9,
    AppendRequest = 10,
    AppendResponse = 11,
    ReadRequest = 12,
    ReadResponse = 13,
    AckRequest = 16,
    AckResponse = 17,
    ChangeInvisibleRequest = 18,
    ChangeInvisibleResponse = 19,
    CommitOffsetRequest = 20,
    CommitOffsetResponse = 21,
    QueryOffsetRequest = 22,
    QueryOffsetResponse = 23,
    LiteSubscriptionRequest = 24,
    LiteSubscriptionResponse = 25,
    CreateQueueRequest = 26,
    CreateQueueResponse = 27,
    DeleteQueueRequest = 28,
    DeleteQueueResponse = 29,
    StatsRequest = 30,
    StatsResponse = 31,
    ListQueuesRequest = 32,
    ListQueuesResponse = 33,
    PopRequest = 34,
    PopResponse = 35,
    PopCancelRequest = 36,
    PopCancelResponse = 37,
    ReleaseRequest = 38,
    ReleaseResponse = 39,
    EndTransactionRequest = 40,
    EndTransactionResponse = 41,
    RecallRequest = 42,
    RecallResponse = 43,
    TransactionCheckRequest = 44,
    TransactionCheckResponse = 45,
    QuotaRequest = 46,
    QuotaResponse = 47,
    GroupStatsRequest = 48,
    GroupStatsResponse = 49,
    FindMessagesRequest = 50,
    FindMessagesResponse = 51,
    SeekRequest = 52,
    SeekResponse = 53,
}

/// Kind numbers that are retired and must never be used again: 14 and 15 (the single-queue
/// pop of frame version 1, replaced by the topic-wide pop at 34 and 35).
pub const RETIRED_KINDS: &[u16] = &[14, 15];

macro_rules! message {
    ($ty:ident $(<$lt:lifetime>)?, $kind:ident $(, hint = |$s:ident| $hint:expr)?) => {
        impl$(<$lt>)? Message for $ty$(<$lt>)? {
            const KIND: FrameKind = FrameKind::$kind;
            type ArchivedBody = rkyv::Archived<$ty$(<$lt>)?>;
            $(fn size_hint(&self) -> usize { let $s = self; $hint })?
        }
    };
}

macro_rules! request {
    ($req:ident $(<$lt:lifetime>)? => $reply:ident $(<$rlt:lifetime>)?) => {
        impl$(<$lt>)? Request for $req$(<$lt>)? {
            type Reply = $reply$(<$rlt>)?;
        }
    };
}

/// The answer to any request that failed. `code` is a stable error code.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct ErrorReply {
    pub code: u32,
    pub message: String,
}
message!(ErrorReply, Error);

/// First frame on every connection: the client's limits.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Hello {
    pub client_name: String,
    pub max_frame_bytes: u64,
    pub credits_wanted: u32,
    /// Proof of the transport secret (`peer_auth`); all zeros without one.
    pub proof: PeerProof,
}
message!(Hello, Hello);
request!(Hello => HelloAck);

/// The server's answer to `Hello`: the limits both sides now use.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct HelloAck {
    pub server_name: String,
    pub shard: u32,
    pub shard_count: u32,
    pub max_frame_bytes: u64,
    pub credits: u32,
    /// The port of this server's RDMA bootstrap listener, 0 if it has none. `auto://`
    /// clients with an RDMA device switch to it.
    pub rdma_port: u16,
    /// The server's answer to the client's proof; all zeros when the server has no secret.
    pub server_proof: [u8; MAC_BYTES],
}
message!(HelloAck, HelloAck);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct Heartbeat {
    pub sent_at_us: u64,
}
message!(Heartbeat, Heartbeat);
request!(Heartbeat => HeartbeatAck);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct HeartbeatAck {
    pub sent_at_us: u64,
}
message!(HeartbeatAck, HeartbeatAck);

/// Diagnostics and benchmarks: the server returns the payload unchanged.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct Echo<'a> {
    #[rkyv(with = InlineAsBox)]
    pub payload: &'a [u8],
}
message!(Echo<'a>, Echo, hint = |m| m.payload.len() + 16);
request!(Echo<'a> => EchoReply<'static>);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct EchoReply<'a> {
    #[rkyv(with = InlineAsBox)]
    pub payload: &'a [u8],
}
message!(EchoReply<'a>, EchoReply, hint = |m| m.payload.len() + 16);

/// What each side of an RDMA connection tells the other over the TCP bootstrap socket.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct RdmaPeerInfo {
    pub lid: u16,
    pub qp_num: u32,
    pub psn: u32,
    pub gid: [u8; 16],
    pub mtu: u8,
    /// The remote ring for RDMA WRITE WITH IMMEDIATE of large frames.
    pub ring_addr: u64,
    pub ring_rkey: u32,
    pub ring_bytes: u64,
    /// Receives posted in advance: `credits` for data frames plus the flow-control slack.
    pub recv_slots: u32,
    /// Data frames (SEND or WRITE WITH IMMEDIATE) the other side may have outstanding at
    /// this side before it must wait for credits to come back.
    pub credits: u32,
    pub slot_bytes: u32,
    pub max_frame_bytes: u64,
}

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct RdmaConnect {
    pub info: RdmaPeerInfo,
    /// Checked before the server creates anything for the link.
    pub proof: PeerProof,
}
message!(RdmaConnect, RdmaConnect);
request!(RdmaConnect => RdmaAccept);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct RdmaAccept {
    pub info: RdmaPeerInfo,
    pub server_proof: [u8; MAC_BYTES],
}
message!(RdmaAccept, RdmaAccept);

/// What the broker reads about a message to schedule and filter it (see
/// `model::record::Attributes`).
#[derive(Archive, Serialize, Debug, Clone, PartialEq, Default)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct EntryAttributes {
    /// `model::message_type::*`.
    pub message_type: u8,
    pub priority: i32,
    /// Not delivered before this wall-clock time (ms since the epoch); 0 means at once.
    pub delivery_ms: u64,
    pub message_group: String,
    pub lite_topic: String,
    pub user_properties: Vec<(String, String)>,
}

/// One message to append; `queues` lists every queue that indexes it (multi-dispatch).
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct AppendEntry<'a> {
    pub queues: Vec<String>,
    pub message_id: String,
    pub tag: String,
    pub keys: Vec<String>,
    pub attributes: EntryAttributes,
    /// Message metadata the broker does not read, stored as given.
    #[rkyv(with = InlineAsBox)]
    pub properties: &'a [u8],
    #[rkyv(with = InlineAsBox)]
    pub body: &'a [u8],
}

/// Append a batch; the reply comes once the batch is durable under the broker's policy.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct AppendRequest<'a> {
    pub entries: Vec<AppendEntry<'a>>,
}
message!(
    AppendRequest<'a>,
    AppendRequest,
    hint = |m| m.entries.iter().map(|e| e.body.len() + e.properties.len() + 128).sum::<usize>() + 16
);
request!(AppendRequest<'a> => AppendResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct AppendAck {
    /// Where the record sits in its shard's CommitLog.
    pub position: u64,
    /// The record's offset in each of its queues, in request order; `OFFSET_HELD` while a
    /// delay message waits for its time or a half message for its transaction's end.
    pub offsets: Vec<u64>,
}

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct AppendResponse {
    pub acks: Vec<AppendAck>,
}
message!(AppendResponse, AppendResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct ReadRequest {
    pub queue: String,
    pub from_offset: u64,
    pub max_count: u32,
    pub max_bytes: u32,
    /// When nothing is readable from `from_offset`, the broker may hold the request this long
    /// for the queue to grow (0: answer at once).
    pub wait_ms: u64,
}
message!(ReadRequest, ReadRequest);
request!(ReadRequest => ReadResponse<'static>);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct ReadRecord<'a> {
    pub offset: u64,
    pub position: u64,
    /// The stored record, as the engine framed it.
    #[rkyv(with = InlineAsBox)]
    pub record: &'a [u8],
}

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct ReadResponse<'a> {
    pub records: Vec<ReadRecord<'a>>,
    pub next_offset: u64,
    pub min_offset: u64,
    pub max_offset: u64,
}
message!(ReadResponse<'a>, ReadResponse, hint = |m| m.records.iter().map(|r| r.record.len() + 32).sum::<usize>() + 32);

/// How a consumer group narrows what it receives (RocketMQ's `FilterExpression`).
#[derive(Archive, Serialize, Debug, Clone, PartialEq, Default)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct FilterSpec {
    /// `FILTER_ALL`, `FILTER_TAG` or `FILTER_SQL`.
    pub kind: u8,
    pub expression: String,
}

pub const FILTER_ALL: u8 = 0;
pub const FILTER_TAG: u8 = 1;
pub const FILTER_SQL: u8 = 2;

/// The consumer group's delivery policy, from its record (the proxy reads it, the broker
/// applies it).
#[derive(Archive, Serialize, Debug, Clone, PartialEq, Default)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct GroupPolicy {
    /// A FIFO group: a message group's next message waits until the previous one is acked.
    pub fifo: bool,
    /// Delay before an expired delivery comes back, per attempt (the last one repeats);
    /// empty means at once.
    pub retry_delays_ms: Vec<u32>,
}

/// Pop consumption of a topic: take up to `max_count` deliverable messages of the topic's
/// queues on this shard (or of `queue` alone) and hide them for `invisible_ms`.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct PopRequest {
    pub group: String,
    pub topic: String,
    /// One queue of the topic, or empty for all of them.
    pub queue: String,
    pub max_count: u32,
    pub max_bytes: u32,
    pub invisible_ms: u64,
    /// How long the broker may hold the request open when nothing is deliverable.
    pub long_poll_ms: u64,
    /// Names this poll for `PopCancelRequest`; 0 when it is never cancelled.
    pub poll_id: u64,
    pub filter: FilterSpec,
    pub policy: GroupPolicy,
    /// A lite consumer: pops only the lite topics of `topic` this client subscribed to.
    /// Empty for ordinary consumers.
    pub client_id: String,
}
message!(PopRequest, PopRequest);
request!(PopRequest => PopResponse<'static>);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct PoppedMessage<'a> {
    pub queue: String,
    pub offset: u64,
    pub delivery_attempt: u32,
    /// Opaque, tamper-evident handle for ack and change-invisible.
    pub receipt: String,
    #[rkyv(with = InlineAsBox)]
    pub record: &'a [u8],
}

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct PopResponse<'a> {
    pub messages: Vec<PoppedMessage<'a>>,
}
message!(
    PopResponse<'a>,
    PopResponse,
    hint = |m| m.messages.iter().map(|r| r.record.len() + r.receipt.len() + r.queue.len() + 40).sum::<usize>() + 16
);

/// Ends the long poll named `poll_id` at once (its reply carries what it has, usually nothing).
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct PopCancelRequest {
    pub poll_id: u64,
}
message!(PopCancelRequest, PopCancelRequest);
request!(PopCancelRequest => PopCancelResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct PopCancelResponse {
    /// False when no such poll was waiting (it had answered already).
    pub cancelled: bool,
}
message!(PopCancelResponse, PopCancelResponse);

/// Gives deliveries back unconsumed: each becomes deliverable at once and the attempt it used
/// is not counted (a proxy that popped more than it could hand to its client).
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct ReleaseRequest {
    pub queue: String,
    pub group: String,
    pub receipts: Vec<String>,
}
message!(ReleaseRequest, ReleaseRequest);
request!(ReleaseRequest => ReleaseResponse);

/// One status per receipt, in request order (0 is success).
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct ReleaseResponse {
    pub statuses: Vec<u32>,
}
message!(ReleaseResponse, ReleaseResponse);

/// Commits or rolls back the half message stored at `position` (its transaction id says where).
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct EndTransactionRequest {
    pub queue: String,
    pub position: u64,
    /// Must match the half message's id.
    pub message_id: String,
    pub commit: bool,
}
message!(EndTransactionRequest, EndTransactionRequest);
request!(EndTransactionRequest => EndTransactionResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct EndTransactionResponse {
    /// The committed message's offset in its first queue; `None` after a rollback.
    pub offset: Option<u64>,
}
message!(EndTransactionResponse, EndTransactionResponse);

/// Cancels the delay message stored at `position` if it has not been delivered.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct RecallRequest {
    pub queue: String,
    pub position: u64,
    /// The delay message's delivery time (its timer is keyed by it).
    pub due_ms: u64,
    /// Must match the delay message's id.
    pub message_id: String,
}
message!(RecallRequest, RecallRequest);
request!(RecallRequest => RecallResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct RecallResponse {
    pub message_id: String,
}
message!(RecallResponse, RecallResponse);

/// Asks for half messages of `topics` whose transaction is due to be checked with its
/// producer. Each is handed to one asker at a time: its next check is scheduled as it is
/// handed out.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct TransactionCheckRequest {
    pub topics: Vec<String>,
    pub max_count: u32,
    pub long_poll_ms: u64,
}
message!(TransactionCheckRequest, TransactionCheckRequest);
request!(TransactionCheckRequest => TransactionCheckResponse<'static>);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct HalfMessage<'a> {
    pub queue: String,
    pub position: u64,
    /// How many checks came before this one.
    pub checks: u32,
    #[rkyv(with = InlineAsBox)]
    pub record: &'a [u8],
}

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct TransactionCheckResponse<'a> {
    pub messages: Vec<HalfMessage<'a>>,
}
message!(
    TransactionCheckResponse<'a>,
    TransactionCheckResponse,
    hint = |m| m.messages.iter().map(|r| r.record.len() + r.queue.len() + 32).sum::<usize>() + 16
);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct AckRequest {
    pub queue: String,
    pub group: String,
    pub receipts: Vec<String>,
}
message!(AckRequest, AckRequest);
request!(AckRequest => AckResponse);

/// One status per receipt, in request order: 0 is success, anything else an error code.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct AckResponse {
    pub statuses: Vec<u32>,
}
message!(AckResponse, AckResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct ChangeInvisibleRequest {
    pub queue: String,
    pub group: String,
    pub receipt: String,
    pub invisible_ms: u64,
    /// An auto-renew: the receipt stays valid (any proxy can ack with it). Otherwise the old
    /// receipt becomes stale and only the returned one works.
    pub renew: bool,
    /// The consumer suspends the message (RocketMQ's `suspend`): when it comes back, its
    /// delivery attempt is not counted.
    pub suspend: bool,
}
message!(ChangeInvisibleRequest, ChangeInvisibleRequest);
request!(ChangeInvisibleRequest => ChangeInvisibleResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct ChangeInvisibleResponse {
    /// The receipt to use from now on.
    pub receipt: String,
    /// The offset the receipt names, as the broker authenticated it.
    pub offset: u64,
}
message!(ChangeInvisibleResponse, ChangeInvisibleResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct CommitOffsetRequest {
    pub queue: String,
    pub group: String,
    pub offset: u64,
}
message!(CommitOffsetRequest, CommitOffsetRequest);
request!(CommitOffsetRequest => CommitOffsetResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct CommitOffsetResponse {}
message!(CommitOffsetResponse, CommitOffsetResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct QueryOffsetRequest {
    pub queue: String,
    pub group: String,
}
message!(QueryOffsetRequest, QueryOffsetRequest);
request!(QueryOffsetRequest => QueryOffsetResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct QueryOffsetResponse {
    /// The group's committed offset, if it has one.
    pub committed: Option<u64>,
    pub min_offset: u64,
    pub max_offset: u64,
}
message!(QueryOffsetResponse, QueryOffsetResponse);

/// Lite-topic subscription change for one consumer (`client_id`) of a group, on one shard.
/// `queues` are the lite queues (`topic#index/lite`, see `model::placement::lite_queue`) of
/// `topic` that this shard holds.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct LiteSubscriptionRequest {
    pub group: String,
    pub client_id: String,
    /// The LITE parent topic; empty with `LITE_REMOVE_ALL` means every topic.
    pub topic: String,
    /// `LITE_ADD`, `LITE_REMOVE`, `LITE_REPLACE` or `LITE_REMOVE_ALL`.
    pub action: u8,
    pub queues: Vec<String>,
    /// Where newly added lite topics start for the group: `LITE_START_*`.
    pub start: u8,
    /// The offset for `LITE_START_OFFSET`, or n for `LITE_START_TAIL`.
    pub start_value: u64,
}

pub const LITE_ADD: u8 = 0;
pub const LITE_REMOVE: u8 = 1;
/// The client's whole set of the topic on this shard becomes `queues`.
pub const LITE_REPLACE: u8 = 2;
pub const LITE_REMOVE_ALL: u8 = 3;

/// The group's committed position, else the lite topic's first retained message.
pub const LITE_START_LAST: u8 = 0;
pub const LITE_START_MIN: u8 = 1;
pub const LITE_START_MAX: u8 = 2;
pub const LITE_START_OFFSET: u8 = 3;
pub const LITE_START_TAIL: u8 = 4;

message!(LiteSubscriptionRequest, LiteSubscriptionRequest);
request!(LiteSubscriptionRequest => LiteSubscriptionResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct LiteSubscriptionResponse {
    /// Lite topics the client is subscribed to on this shard after the change.
    pub subscribed: u32,
}
message!(LiteSubscriptionResponse, LiteSubscriptionResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct CreateQueueRequest {
    pub queue: String,
    /// normal, fifo, delay, transaction, lite, priority (the proxy's topic types).
    pub message_type: u8,
    pub attributes: Vec<(String, String)>,
    /// When the queue exists with the same type, replace its attributes (a run-time change
    /// of a group's or topic's settings) instead of leaving it unchanged.
    pub update: bool,
}
message!(CreateQueueRequest, CreateQueueRequest);
request!(CreateQueueRequest => CreateQueueResponse);

/// Which rate quota a `QuotaRequest` draws on.
pub mod quota_kind {
    /// A consumer group's receive rate (`max_receive_tps` on its `%GROUP%` record).
    pub const RECEIVE: u8 = 1;
    /// A topic's send rate (`max_send_tps` on its queue 0, `T#0`).
    pub const SEND: u8 = 2;
}

/// Takes up to `want` permits from a rate quota kept by the shard that owns `record` (a
/// group's `%GROUP%` record, or a topic's queue 0), and first gives back `refund` unused ones.
/// That shard is the one authority for the quota, whichever proxies serve the group or topic.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct QuotaRequest {
    pub record: String,
    pub kind: u8,
    pub want: u32,
    pub refund: u32,
}
message!(QuotaRequest, QuotaRequest);
request!(QuotaRequest => QuotaResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct QuotaResponse {
    /// Permits taken (`want` when the record has no quota).
    pub granted: u32,
    /// When none were granted: how long until one is free.
    pub wait_ms: u64,
    /// The quota in permits per second; 0 for none.
    pub rate_per_s: u32,
}
message!(QuotaResponse, QuotaResponse);

/// Per consumer group and topic, what a shard holds for it; and the receive and send
/// quotas this shard keeps, with how often each throttled.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct GroupStatsRequest {
    /// At most this many (group, topic) entries (the shard bounds it too).
    pub max_count: u32,
}
message!(GroupStatsRequest, GroupStatsRequest);
request!(GroupStatsRequest => GroupStatsResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct GroupStat {
    pub group: String,
    pub topic: String,
    /// Stored after the group's position on this shard and not handed out yet.
    pub ready: u64,
    /// Handed out and not yet acked (leased).
    pub inflight: u64,
    /// Deliveries so far (first and repeated), since the broker started.
    pub delivered: u64,
    /// Deliveries per second over the last few seconds, in thousandths.
    pub rate_milli_per_s: u64,
    /// Store time (ms since the epoch) of the oldest message the group has not acked here;
    /// 0 when none (or when the shard's lookup budget ran out first).
    pub oldest_unacked_ms: u64,
}

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct GroupStatsResponse {
    pub shard: u32,
    pub groups: Vec<GroupStat>,
    /// (quota record, times a request for it was throttled): `%GROUP%name` for receive
    /// quotas, `topic#0` for send quotas.
    pub throttled: Vec<(String, u64)>,
    /// More (group, topic) entries were held than the reply carries.
    pub truncated: bool,
}
message!(GroupStatsResponse, GroupStatsResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct CreateQueueResponse {
    /// False when the queue already existed with the same type.
    pub created: bool,
}
message!(CreateQueueResponse, CreateQueueResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct DeleteQueueRequest {
    pub queue: String,
}
message!(DeleteQueueRequest, DeleteQueueRequest);
request!(DeleteQueueRequest => DeleteQueueResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct DeleteQueueResponse {
    pub deleted: bool,
}
message!(DeleteQueueResponse, DeleteQueueResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct StatsRequest {}
message!(StatsRequest, StatsRequest);
request!(StatsRequest => StatsResponse);

/// Named counters, so new ones do not change the wire format.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct StatsResponse {
    pub shard: u32,
    pub counters: Vec<(String, u64)>,
}
message!(StatsResponse, StatsResponse);

/// Lists the queues a shard holds whose names start with `prefix` (empty: all), at most
/// `max_count` of them, starting after `after` (empty: from the first) in name order.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct ListQueuesRequest {
    pub prefix: String,
    pub after: String,
    pub max_count: u32,
}
message!(ListQueuesRequest, ListQueuesRequest);
request!(ListQueuesRequest => ListQueuesResponse);

/// One queue as a shard sees it. `message_type` is 0 for a queue created implicitly.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct QueueSummary {
    pub name: String,
    pub message_type: u8,
    pub attributes: Vec<(String, String)>,
    pub min_offset: u64,
    pub max_offset: u64,
}

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct ListQueuesResponse {
    pub queues: Vec<QueueSummary>,
    /// True when more queues match than `max_count`; ask again with `after` = the last name.
    pub truncated: bool,
}
message!(ListQueuesResponse, ListQueuesResponse);

/// Stored messages of one shard by message id or by key (`sluice message get` and `find`),
/// newest first, with each named group's delivery state of every match.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct FindMessagesRequest {
    /// Exactly one of `message_id` and `key` is set.
    pub message_id: String,
    pub key: String,
    /// Only messages stored in this topic's queues; empty: any topic (dead-letter copies too).
    pub topic: String,
    /// The groups whose delivery state each match reports (the shard bounds their number).
    pub groups: Vec<String>,
    pub max_count: u32,
}
message!(FindMessagesRequest, FindMessagesRequest);
request!(FindMessagesRequest => FindMessagesResponse<'static>);

/// Where a group stands with one message (`FoundMessage::groups`).
pub mod delivery_state {
    /// Stored at or after the group's position: not handed out yet (or due again).
    pub const PENDING: u8 = 0;
    /// Handed out and not acked; the lease is live.
    pub const IN_FLIGHT: u8 = 1;
    /// Acked (or passed over by the group's filter).
    pub const ACKED: u8 = 2;
    /// The group has no position on this queue yet.
    pub const NO_POSITION: u8 = 3;
    /// A delay or transaction message no longer held (dispatched into its queue, or rolled
    /// back or recalled): the record does not say at which offset, so the group's state is
    /// not known.
    pub const UNTRACKED: u8 = 4;

    /// The name operators see (`sluice message get`, the admin API).
    pub fn name(state: u8) -> &'static str {
        match state {
            PENDING => "pending",
            IN_FLIGHT => "in_flight",
            ACKED => "acked",
            NO_POSITION => "no_position",
            UNTRACKED => "dispatched_or_discarded",
            _ => "unknown",
        }
    }
}

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct FoundMessage<'a> {
    pub position: u64,
    /// (group, `delivery_state`, delivery attempt when in flight) for the message's first
    /// queue in the asked topic.
    pub groups: Vec<(String, u8, u32)>,
    #[rkyv(with = InlineAsBox)]
    pub record: &'a [u8],
}

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
pub struct FindMessagesResponse<'a> {
    pub messages: Vec<FoundMessage<'a>>,
    /// More matched than the reply carries (its count or byte budget).
    pub truncated: bool,
}
message!(
    FindMessagesResponse<'a>,
    FindMessagesResponse,
    hint = |m| m.messages.iter().map(|f| f.record.len() + f.groups.len() * 48 + 32).sum::<usize>() + 16
);

/// Moves a group's position on one queue to the first message stored at or after `time_ms`
/// (`by_time`) or to `offset` (clamped to what the queue holds), as `sluice group reset` does.
/// Without `apply` it only answers where the position would go.
#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct SeekRequest {
    pub queue: String,
    pub group: String,
    pub by_time: bool,
    pub time_ms: u64,
    pub offset: u64,
    pub apply: bool,
    /// Move even past messages still in flight (their acks then fail, like any old receipt).
    pub force: bool,
}
message!(SeekRequest, SeekRequest);
request!(SeekRequest => SeekResponse);

#[derive(Archive, Serialize, Debug, Clone, PartialEq)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct SeekResponse {
    /// The group's position before (its first unacked offset), if it had one.
    pub from: Option<u64>,
    pub to: u64,
    /// Live leases below `to`: what moving would skip while still in flight.
    pub in_flight_skipped: u64,
    pub moved: bool,
}
message!(SeekResponse, SeekResponse);
