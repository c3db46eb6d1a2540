//! Frame round trips for every kind, each typed rejection, and random bytes never panic.

use bytes::Bytes;
use proptest::prelude::*;
use sluice_transport::frame::{Frame, Message, OutFrame, FRAME_HEADER_BYTES, FRAME_VERSION};
use sluice_transport::fuzzing::{decode_untrusted, validate_as_every_kind, validate_declared_kind};
use sluice_transport::messages::*;
use sluice_transport::FrameError;

const MAX: u64 = 1 << 20;

fn round_trip<M: Message>(message: &M) -> Frame {
    let out = OutFrame::encode(42, message, MAX).unwrap();
    assert_eq!(out.kind(), M::KIND as u16);
    let frame = Frame::parse(out.as_bytes().clone(), MAX).unwrap();
    assert_eq!(frame.request_id(), 42);
    assert_eq!(frame.kind().unwrap(), M::KIND);
    frame
}

/// Encodes, parses, validates and compares the archived value field by field (rkyv's
/// generated comparison) for every kind without borrowed bodies.
macro_rules! check_owned {
    ($($value:expr),* $(,)?) => {{
        let mut kinds = Vec::new();
        $(
            let value = $value;
            let frame = round_trip(&value);
            assert!(*frame.access_as(&value) == value, "{:?}", value);
            kinds.push(frame.kind().unwrap());
        )*
        kinds
    }};
}

trait AccessAs {
    fn access_as<M: Message>(&self, _witness: &M) -> &M::ArchivedBody;
}

impl AccessAs for Frame {
    fn access_as<M: Message>(&self, _witness: &M) -> &M::ArchivedBody {
        self.access::<M>().unwrap()
    }
}

#[test]
fn every_kind_round_trips_and_reads_in_place() {
    let mut kinds = check_owned![
        ErrorReply { code: 2003, message: "unknown kind".into() },
        Hello { client_name: "proxy-1".into(), max_frame_bytes: 1 << 20, credits_wanted: 64, proof: proof() },
        HelloAck {
            server_name: "broker".into(),
            shard: 1,
            shard_count: 2,
            max_frame_bytes: 4096,
            credits: 8,
            rdma_port: 7001,
            server_proof: [9; 32]
        },
        Heartbeat { sent_at_us: 7 },
        HeartbeatAck { sent_at_us: 7 },
        RdmaConnect { info: peer_info(), proof: proof() },
        RdmaAccept { info: peer_info(), server_proof: [3; 32] },
        AppendResponse { acks: vec![AppendAck { position: 4096, offsets: vec![3, 9] }] },
        ReadRequest { queue: "t/0".into(), from_offset: 5, max_count: 32, max_bytes: 1 << 16, wait_ms: 250 },
        PopRequest {
            group: "g".into(),
            topic: "t".into(),
            queue: String::new(),
            max_count: 16,
            max_bytes: 1 << 20,
            invisible_ms: 30_000,
            long_poll_ms: 20_000,
            poll_id: 77,
            filter: FilterSpec { kind: FILTER_SQL, expression: "a > 1".into() },
            policy: GroupPolicy { fifo: true, retry_delays_ms: vec![1000, 5000] },
            client_id: "client-1".into(),
        },
        PopCancelRequest { poll_id: 77 },
        PopCancelResponse { cancelled: true },
        ReleaseRequest { queue: "t#0".into(), group: "g".into(), receipts: vec!["r".into()] },
        ReleaseResponse { statuses: vec![0] },
        EndTransactionRequest { queue: "t#0".into(), position: 4096, message_id: "m".into(), commit: true },
        EndTransactionResponse { offset: Some(3) },
        RecallRequest { queue: "t#0".into(), position: 4096, due_ms: 9, message_id: "m".into() },
        RecallResponse { message_id: "m".into() },
        TransactionCheckRequest { topics: vec!["t".into()], max_count: 8, long_poll_ms: 1000 },
        AckRequest { queue: "t/0".into(), group: "g".into(), receipts: vec!["r1".into(), "r2".into()] },
        AckResponse { statuses: vec![0, 2401] },
        ChangeInvisibleRequest {
            queue: "t/0".into(),
            group: "g".into(),
            receipt: "r1".into(),
            invisible_ms: 5,
            renew: true,
            suspend: false,
        },
        ChangeInvisibleResponse { receipt: "r1b".into(), offset: 7 },
        CommitOffsetRequest { queue: "t/0".into(), group: "g".into(), offset: 77 },
        CommitOffsetResponse {},
        QueryOffsetRequest { queue: "t/0".into(), group: "g".into() },
        QueryOffsetResponse { committed: Some(77), min_offset: 0, max_offset: 100 },
        LiteSubscriptionRequest {
            group: "g".into(),
            client_id: "c".into(),
            topic: "chat".into(),
            action: LITE_REPLACE,
            queues: vec!["chat#3/session-1".into()],
            start: LITE_START_TAIL,
            start_value: 3,
        },
        LiteSubscriptionResponse { subscribed: 1 },
        CreateQueueRequest {
            queue: "t".into(),
            message_type: 4,
            attributes: vec![("ttl_s".into(), "60".into())],
            update: false,
        },
        QuotaRequest { record: "%GROUP%g".into(), kind: 1, want: 32, refund: 3 },
        QuotaResponse { granted: 5, wait_ms: 20, rate_per_s: 100 },
        GroupStatsRequest { max_count: 10 },
        FindMessagesRequest {
            message_id: String::new(),
            key: "order-7".into(),
            topic: "orders".into(),
            groups: vec!["billing".into()],
            max_count: 16,
        },
        SeekRequest {
            queue: "t#0".into(),
            group: "g".into(),
            by_time: true,
            time_ms: 1_700_000_000_000,
            offset: 0,
            apply: false,
            force: false,
        },
        SeekResponse { from: Some(3), to: 9, in_flight_skipped: 2, moved: false },
        GroupStatsResponse {
            shard: 1,
            groups: vec![GroupStat {
                group: "g".into(),
                topic: "t".into(),
                ready: 5,
                inflight: 2,
                delivered: 9,
                rate_milli_per_s: 1500,
                oldest_unacked_ms: 1_700_000_000_000,
            }],
            throttled: vec![("%GROUP%g".into(), 3)],
            truncated: false,
        },
        CreateQueueResponse { created: true },
        DeleteQueueRequest { queue: "t".into() },
        DeleteQueueResponse { deleted: true },
        StatsRequest {},
        StatsResponse { shard: 0, counters: vec![("appended".into(), 10)] },
        ListQueuesRequest { prefix: "t#".into(), after: String::new(), max_count: 100 },
        ListQueuesResponse {
            queues: vec![QueueSummary {
                name: "t#0".into(),
                message_type: 1,
                attributes: vec![("queue_count".into(), "8".into())],
                min_offset: 0,
                max_offset: 5,
            }],
            truncated: false,
        },
    ];

    // Kinds whose bodies are borrowed: compare fields and check the body is read in place.
    let body = vec![0xabu8; 3000];
    let frame = round_trip(&Echo { payload: &body });
    let echo = frame.access::<Echo>().unwrap();
    assert_eq!(&echo.payload[..], &body[..]);
    assert_in_place(&frame, &echo.payload);
    kinds.push(FrameKind::Echo);
    let frame = round_trip(&EchoReply { payload: &body });
    assert_eq!(&frame.access::<EchoReply>().unwrap().payload[..], &body[..]);
    kinds.push(FrameKind::EchoReply);

    let request = AppendRequest {
        entries: vec![AppendEntry {
            queues: vec!["t/0".into(), "t/0/child".into()],
            message_id: "id-1".into(),
            tag: "tagA".into(),
            keys: vec!["k1".into()],
            attributes: EntryAttributes {
                message_type: 2,
                priority: 3,
                delivery_ms: 0,
                message_group: "order-1".into(),
                lite_topic: String::new(),
                user_properties: vec![("region".into(), "eu".into())],
            },
            properties: b"a=b",
            body: &body,
        }],
    };
    let frame = round_trip(&request);
    let archived = frame.access::<AppendRequest>().unwrap();
    let entry = &archived.entries[0];
    assert_eq!((entry.queues.len(), entry.message_id.as_str(), entry.tag.as_str()), (2, "id-1", "tagA"));
    assert_eq!((&entry.keys[0][..], &entry.properties[..], &entry.body[..]), ("k1", &b"a=b"[..], &body[..]));
    assert_eq!((entry.attributes.message_group.as_str(), entry.attributes.priority.to_native()), ("order-1", 3));
    // The handle a broker passes to the engine shares the receive buffer: no copy.
    let shared = frame.share(&entry.body);
    assert_in_place(&frame, &shared);
    kinds.push(FrameKind::AppendRequest);

    let frame = round_trip(&ReadResponse {
        records: vec![ReadRecord { offset: 1, position: 2, record: &body }],
        next_offset: 2,
        min_offset: 0,
        max_offset: 2,
    });
    let archived = frame.access::<ReadResponse>().unwrap();
    assert_eq!((archived.records[0].offset.to_native(), &archived.records[0].record[..]), (1, &body[..]));
    assert_eq!((archived.next_offset.to_native(), archived.max_offset.to_native()), (2, 2));
    kinds.push(FrameKind::ReadResponse);

    let frame = round_trip(&PopResponse {
        messages: vec![PoppedMessage {
            queue: "t#1".into(),
            offset: 9,
            delivery_attempt: 2,
            receipt: "r".into(),
            record: &body,
        }],
    });
    let archived = frame.access::<PopResponse>().unwrap();
    assert_eq!((archived.messages[0].delivery_attempt.to_native(), &archived.messages[0].record[..]), (2, &body[..]));
    assert_eq!(archived.messages[0].queue.as_str(), "t#1");
    kinds.push(FrameKind::PopResponse);

    let frame = round_trip(&TransactionCheckResponse {
        messages: vec![HalfMessage { queue: "t#0".into(), position: 4096, checks: 1, record: &body }],
    });
    let archived = frame.access::<TransactionCheckResponse>().unwrap();
    assert_eq!((archived.messages[0].position.to_native(), &archived.messages[0].record[..]), (4096, &body[..]));
    kinds.push(FrameKind::TransactionCheckResponse);

    let frame = round_trip(&FindMessagesResponse {
        messages: vec![FoundMessage {
            position: 8192,
            groups: vec![("billing".into(), delivery_state::IN_FLIGHT, 2)],
            record: &body,
        }],
        truncated: true,
    });
    let archived = frame.access::<FindMessagesResponse>().unwrap();
    assert_eq!((archived.messages[0].position.to_native(), &archived.messages[0].record[..]), (8192, &body[..]));
    assert_eq!(archived.messages[0].groups[0].0.as_str(), "billing");
    assert!(archived.truncated);
    assert_in_place(&frame, &archived.messages[0].record);
    kinds.push(FrameKind::FindMessagesResponse);

    kinds.sort_by_key(|k| *k as u16);
    let mut all = FrameKind::ALL.to_vec();
    all.sort_by_key(|k| *k as u16);
    assert_eq!(kinds, all, "every frame kind is covered");
    for retired in RETIRED_KINDS {
        assert!(FrameKind::try_from(*retired).is_err(), "kind {retired} is retired and must stay unused");
    }
}

fn assert_in_place(frame: &Frame, inner: &[u8]) {
    let range = frame.as_bytes().as_ptr_range();
    assert!(range.contains(&inner.as_ptr()), "archived slice must point into the received buffer");
}

fn proof() -> sluice_transport::peer_auth::PeerProof {
    sluice_transport::peer_auth::PeerProof { unix_ms: 1_700_000_000_000, nonce: [5; 16], mac: [6; 32] }
}

fn peer_info() -> RdmaPeerInfo {
    RdmaPeerInfo {
        lid: 1,
        qp_num: 17,
        psn: 99,
        gid: [7; 16],
        mtu: 3,
        ring_addr: 0x1000,
        ring_rkey: 5,
        ring_bytes: 1 << 20,
        recv_slots: 64,
        credits: 62,
        slot_bytes: 8192,
        max_frame_bytes: 1 << 20,
    }
}

fn sample() -> Vec<u8> {
    OutFrame::encode(5, &Heartbeat { sent_at_us: 1 }, MAX).unwrap().as_bytes().to_vec()
}

#[test]
fn each_broken_frame_gets_its_typed_error() {
    let good = sample();

    let mut bad_crc = good.clone();
    *bad_crc.last_mut().unwrap() ^= 1;
    assert!(matches!(Frame::parse(bad_crc.into(), MAX), Err(FrameError::BadCrc { .. })));

    let truncated = Bytes::copy_from_slice(&good[..good.len() - 1]);
    assert!(matches!(Frame::parse(truncated, MAX), Err(FrameError::Truncated { .. })));
    let header_only = Bytes::copy_from_slice(&good[..FRAME_HEADER_BYTES - 1]);
    assert!(matches!(Frame::parse(header_only, MAX), Err(FrameError::Truncated { .. })));

    let big = OutFrame::encode(1, &Echo { payload: &[1; 5000] }, MAX).unwrap();
    let err = Frame::parse(big.as_bytes().clone(), 4096).unwrap_err();
    assert!(matches!(err, FrameError::Oversize { body_len, max_frame_bytes: 4096 } if body_len > 4096), "{err}");
    let err = OutFrame::encode(1, &Echo { payload: &[1; 5000] }, 4096).unwrap_err();
    assert_eq!(err.code(), 2004);

    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(matches!(Frame::parse(magic.into(), MAX), Err(FrameError::BadMagic { .. })));

    let mut version = good.clone();
    version[4] = 9;
    assert!(matches!(
        Frame::parse(version.into(), MAX),
        Err(FrameError::UnsupportedVersion { found: 9, supported: FRAME_VERSION })
    ));

    // An unknown kind still frames (so it can be answered), then fails with UnknownKind.
    let mut unknown = good.clone();
    unknown[6..8].copy_from_slice(&999u16.to_le_bytes());
    assert!(matches!(Frame::parse(unknown.into(), MAX), Err(FrameError::BadCrc { .. })), "the CRC covers the kind");
    let frame = Frame::parse(reframe(999, &good), MAX).unwrap();
    assert_eq!(frame.kind().unwrap_err(), FrameError::UnknownKind { kind: 999 });

    // A valid frame read as the wrong type, and an archive that does not validate.
    let frame = Frame::parse(good.clone().into(), MAX).unwrap();
    assert!(matches!(frame.access::<Hello>(), Err(FrameError::UnexpectedKind { .. })));
    let garbage_body = reframe_body(FrameKind::Hello as u16, &[0xff; 3]);
    let frame = Frame::parse(garbage_body, MAX).unwrap();
    assert!(matches!(frame.access::<Hello>(), Err(FrameError::Malformed { .. })));

    let codes: Vec<u32> = [
        FrameError::BadMagic { found: 0 },
        FrameError::UnsupportedVersion { found: 0, supported: FRAME_VERSION },
        FrameError::UnknownKind { kind: 0 },
        FrameError::Oversize { body_len: 0, max_frame_bytes: 0 },
        FrameError::Truncated { have: 0, need: 0 },
        FrameError::BadCrc { stored: 0, computed: 0 },
    ]
    .iter()
    .map(FrameError::code)
    .collect();
    assert_eq!(codes, [2001, 2002, 2003, 2004, 2005, 2006]);
}

/// Re-encodes `frame` with another kind and a correct CRC.
fn reframe(kind: u16, frame: &[u8]) -> Bytes {
    reframe_body(kind, &frame[FRAME_HEADER_BYTES..])
}

fn reframe_body(kind: u16, body: &[u8]) -> Bytes {
    let mut bytes = sample()[..FRAME_HEADER_BYTES].to_vec();
    bytes[6..8].copy_from_slice(&kind.to_le_bytes());
    bytes[12..16].copy_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(body);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[0..24]), &bytes[28..32]);
    let crc = crc32c::crc32c_append(crc, &bytes[FRAME_HEADER_BYTES..]);
    bytes[24..28].copy_from_slice(&crc.to_le_bytes());
    bytes.into()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Random bytes through the stream reader, the parser and every validator never panic.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), chunk in 0usize..64) {
        decode_untrusted(&bytes, chunk, MAX);
    }

    /// A valid header with random bytes after it (bad CRC, wrong lengths, torn bodies) goes
    /// past the magic and version checks into the length, CRC and validator paths.
    #[test]
    fn random_tails_after_a_valid_header_never_panic(kind in 0u16..40, len in 0u32..2000, tail in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = sample()[..FRAME_HEADER_BYTES].to_vec();
        bytes[6..8].copy_from_slice(&kind.to_le_bytes());
        bytes[12..16].copy_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&tail);
        decode_untrusted(&bytes, 13, MAX);
        decode_untrusted(&bytes, 0, 64);
    }

    /// A valid header and CRC around a random body: the validator of every kind rejects or
    /// accepts it without panicking (this is what a malicious peer can send).
    #[test]
    fn random_bodies_with_valid_framing_never_panic(kind in 1u16..40, body in proptest::collection::vec(any::<u8>(), 0..400)) {
        let frame = Frame::parse(reframe_body(kind, &body), MAX).unwrap();
        validate_declared_kind(&frame);
        validate_as_every_kind(&body);
    }

    /// Valid frames cut at a random point or with one byte flipped are rejected, never
    /// misread: a flipped byte anywhere fails the CRC (or the magic/version/length checks).
    #[test]
    fn cut_or_flipped_frames_are_rejected(cut in 0usize..200, flip in 0usize..200, bit in 0u8..8) {
        let frame = OutFrame::encode(9, &AckRequest { queue: "q".into(), group: "g".into(), receipts: vec!["r".repeat(50)] }, MAX).unwrap();
        let bytes = frame.as_bytes();
        let cut = cut % bytes.len();
        prop_assert!(Frame::parse(bytes.slice(..cut), MAX).is_err());
        let mut flipped = bytes.to_vec();
        let at = flip % flipped.len();
        flipped[at] ^= 1 << bit;
        prop_assert!(Frame::parse(flipped.into(), MAX).is_err());
        prop_assert_eq!(decode_untrusted(bytes, 7, MAX), 1);
    }
}
