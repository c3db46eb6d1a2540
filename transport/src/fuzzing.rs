//! The decoder entry point shared by the cargo-fuzz target (`transport/fuzz/`) and the
//! property tests: untrusted bytes through the stream reader, the parser and every kind's
//! validator. It must never panic, whatever the input.

use bytes::Bytes;

use crate::frame::{Frame, FrameHeader, FRAME_HEADER_BYTES, FRAME_VERSION};
use crate::messages::*;
use crate::reader::FrameReader;

/// Feeds `data` to a stream reader in chunks of `chunk` bytes (0 means one chunk), then to
/// `Frame::parse` whole. Returns how many frames validated as their declared kind.
pub fn decode_untrusted(data: &[u8], chunk: usize, max_frame_bytes: u64) -> usize {
    let mut valid = 0;
    let mut reader = FrameReader::new(max_frame_bytes, 4096);
    let mut rest = data;
    'stream: while !rest.is_empty() {
        let Ok(spare) = reader.spare() else { break };
        let n = spare.len().min(rest.len()).min(if chunk == 0 { usize::MAX } else { chunk });
        spare[..n].copy_from_slice(&rest[..n]);
        reader.advance(n);
        rest = &rest[n..];
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => valid += usize::from(validate_declared_kind(&frame)),
                Ok(None) => break,
                Err(_) => break 'stream,
            }
        }
    }
    if let Ok(frame) = Frame::parse(Bytes::copy_from_slice(data), max_frame_bytes) {
        validate_declared_kind(&frame);
    }
    valid
}

/// Validates the body as the kind its header declares; true if it is a valid archive.
pub fn validate_declared_kind(frame: &Frame) -> bool {
    let Ok(kind) = frame.kind() else { return false };
    match kind {
        FrameKind::Error => frame.access::<ErrorReply>().is_ok(),
        FrameKind::Hello => frame.access::<Hello>().is_ok(),
        FrameKind::HelloAck => frame.access::<HelloAck>().is_ok(),
        FrameKind::Heartbeat => frame.access::<Heartbeat>().is_ok(),
        FrameKind::HeartbeatAck => frame.access::<HeartbeatAck>().is_ok(),
        FrameKind::Echo => frame.access::<Echo>().is_ok(),
        FrameKind::EchoReply => frame.access::<EchoReply>().is_ok(),
        FrameKind::RdmaConnect => frame.access::<RdmaConnect>().is_ok(),
        FrameKind::RdmaAccept => frame.access::<RdmaAccept>().is_ok(),
        FrameKind::AppendRequest => frame.access::<AppendRequest>().is_ok(),
        FrameKind::AppendResponse => frame.access::<AppendResponse>().is_ok(),
        FrameKind::ReadRequest => frame.access::<ReadRequest>().is_ok(),
        FrameKind::ReadResponse => frame.access::<ReadResponse>().is_ok(),
        FrameKind::PopRequest => frame.access::<PopRequest>().is_ok(),
        FrameKind::PopResponse => frame.access::<PopResponse>().is_ok(),
        FrameKind::AckRequest => frame.access::<AckRequest>().is_ok(),
        FrameKind::AckResponse => frame.access::<AckResponse>().is_ok(),
        FrameKind::ChangeInvisibleRequest => frame.access::<ChangeInvisibleRequest>().is_ok(),
        FrameKind::ChangeInvisibleResponse => frame.access::<ChangeInvisibleResponse>().is_ok(),
        FrameKind::CommitOffsetRequest => frame.access::<CommitOffsetRequest>().is_ok(),
        FrameKind::CommitOffsetResponse => frame.access::<CommitOffsetResponse>().is_ok(),
        FrameKind::QueryOffsetRequest => frame.access::<QueryOffsetRequest>().is_ok(),
        FrameKind::QueryOffsetResponse => frame.access::<QueryOffsetResponse>().is_ok(),
        FrameKind::LiteSubscriptionRequest => frame.access::<LiteSubscriptionRequest>().is_ok(),
        FrameKind::LiteSubscriptionResponse => frame.access::<LiteSubscriptionResponse>().is_ok(),
        FrameKind::CreateQueueRequest => frame.access::<CreateQueueRequest>().is_ok(),
        FrameKind::CreateQueueResponse => frame.access::<CreateQueueResponse>().is_ok(),
        FrameKind::DeleteQueueRequest => frame.access::<DeleteQueueRequest>().is_ok(),
        FrameKind::DeleteQueueResponse => frame.access::<DeleteQueueResponse>().is_ok(),
        FrameKind::StatsRequest => frame.access::<StatsRequest>().is_ok(),
        FrameKind::StatsResponse => frame.access::<StatsResponse>().is_ok(),
        FrameKind::ListQueuesRequest => frame.access::<ListQueuesRequest>().is_ok(),
        FrameKind::ListQueuesResponse => frame.access::<ListQueuesResponse>().is_ok(),
        FrameKind::PopCancelRequest => frame.access::<PopCancelRequest>().is_ok(),
        FrameKind::PopCancelResponse => frame.access::<PopCancelResponse>().is_ok(),
        FrameKind::ReleaseRequest => frame.access::<ReleaseRequest>().is_ok(),
        FrameKind::ReleaseResponse => frame.access::<ReleaseResponse>().is_ok(),
        FrameKind::EndTransactionRequest => frame.access::<EndTransactionRequest>().is_ok(),
        FrameKind::EndTransactionResponse => frame.access::<EndTransactionResponse>().is_ok(),
        FrameKind::RecallRequest => frame.access::<RecallRequest>().is_ok(),
        FrameKind::RecallResponse => frame.access::<RecallResponse>().is_ok(),
        FrameKind::TransactionCheckRequest => frame.access::<TransactionCheckRequest>().is_ok(),
        FrameKind::TransactionCheckResponse => frame.access::<TransactionCheckResponse>().is_ok(),
        FrameKind::QuotaRequest => frame.access::<QuotaRequest>().is_ok(),
        FrameKind::QuotaResponse => frame.access::<QuotaResponse>().is_ok(),
        FrameKind::GroupStatsRequest => frame.access::<GroupStatsRequest>().is_ok(),
        FrameKind::GroupStatsResponse => frame.access::<GroupStatsResponse>().is_ok(),
        FrameKind::FindMessagesRequest => frame.access::<FindMessagesRequest>().is_ok(),
        FrameKind::FindMessagesResponse => frame.access::<FindMessagesResponse>().is_ok(),
        FrameKind::SeekRequest => frame.access::<SeekRequest>().is_ok(),
        FrameKind::SeekResponse => frame.access::<SeekResponse>().is_ok(),
    }
}

/// A frame with a valid header and CRC around an arbitrary body, so fuzzers reach the
/// archive validators instead of stopping at the CRC.
pub fn frame_around(kind: u16, body: &[u8]) -> Option<Frame> {
    let mut bytes = vec![0u8; FRAME_HEADER_BYTES];
    bytes[0..4].copy_from_slice(b"SLCF");
    bytes[4..6].copy_from_slice(&FRAME_VERSION.to_le_bytes());
    bytes[6..8].copy_from_slice(&kind.to_le_bytes());
    bytes[12..16].copy_from_slice(&u32::try_from(body.len()).ok()?.to_le_bytes());
    bytes.extend_from_slice(body);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[0..24]), &bytes[28..32]);
    let crc = crc32c::crc32c_append(crc, &bytes[FRAME_HEADER_BYTES..]);
    bytes[24..28].copy_from_slice(&crc.to_le_bytes());
    let frame = Frame::parse(bytes.into(), u64::MAX).ok()?;
    debug_assert_eq!(FrameHeader::decode(frame.as_bytes(), u64::MAX).map(|h| h.kind), Ok(kind));
    Some(frame)
}

/// Validates `body` as every kind; returns how many accepted it.
pub fn validate_as_every_kind(body: &[u8]) -> usize {
    FrameKind::ALL.iter().filter_map(|kind| frame_around(*kind as u16, body)).filter(validate_declared_kind).count()
}
