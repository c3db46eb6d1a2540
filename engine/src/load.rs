//! Deterministic load shared by `sluice-engine-load` and the crash test that verifies it:
//! every body is derived from (producer, seq), so a reader can check it byte for byte.

/// Queue producer `producer` appends to; two producers share each queue.
pub fn producer_queue(producer: u32) -> String {
    format!("load#{}", producer % 2)
}

/// Child queue every record is also dispatched into (one stored copy).
pub fn producer_child_queue(producer: u32) -> String {
    format!("{}/all", producer_queue(producer))
}

/// Body for (producer, seq): 16 B to 4 KiB, starting with producer and seq.
pub fn body_for(producer: u32, seq: u64) -> Vec<u8> {
    let len = 16 + ((seq * 7919 + u64::from(producer) * 104_729) % 4080) as usize;
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(&producer.to_le_bytes());
    body.extend_from_slice(&seq.to_le_bytes());
    while body.len() < len {
        body.push((body.len() as u64 ^ seq ^ u64::from(producer)) as u8);
    }
    body
}

/// `(producer, seq)` from a body made by `body_for`, if it is one.
pub fn parse_body(body: &[u8]) -> Option<(u32, u64)> {
    let producer = u32::from_le_bytes(body.get(0..4)?.try_into().ok()?);
    let seq = u64::from_le_bytes(body.get(4..12)?.try_into().ok()?);
    (body_for(producer, seq) == body).then_some((producer, seq))
}
