//! Receipt handles: opaque to clients, tamper-evident, checked by the broker that issued them.
//!
//! A receipt names one delivery (offset, lease id, deadline, attempt) and carries an
//! HMAC-SHA256 (truncated to 128 bits) over those fields plus the queue and group it was
//! issued for, keyed with a secret the broker draws at start. A receipt from before a restart
//! fails the MAC; that is right, because a restart makes every unacked message visible again.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::broker::pop::Lease;

const RECEIPT_VERSION: u8 = 1;
const MAC_BYTES: usize = 16;
/// version + offset + lease id + deadline + attempt + MAC.
const RECEIPT_BYTES: usize = 1 + 8 + 8 + 8 + 4 + MAC_BYTES;
/// Longest receipt text accepted from outside, checked before decoding.
pub const RECEIPT_TEXT_MAX_BYTES: usize = 128;

/// The key receipts are signed with.
#[derive(Clone)]
pub struct ReceiptKey([u8; 32]);

impl std::fmt::Debug for ReceiptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReceiptKey(..)")
    }
}

impl ReceiptKey {
    pub fn random() -> ReceiptKey {
        ReceiptKey(rand::random())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> ReceiptKey {
        ReceiptKey(bytes)
    }

    fn mac(&self, queue: &str, group: &str, fields: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in [queue.as_bytes(), group.as_bytes()] {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        mac.update(fields);
        mac
    }

    /// The receipt text for `lease` of `group` on `queue`.
    pub fn issue(&self, queue: &str, group: &str, lease: &Lease) -> String {
        let mut bytes = Vec::with_capacity(RECEIPT_BYTES);
        bytes.push(RECEIPT_VERSION);
        bytes.extend_from_slice(&lease.offset.to_le_bytes());
        bytes.extend_from_slice(&lease.lease_id.to_le_bytes());
        bytes.extend_from_slice(&lease.deadline_ms.to_le_bytes());
        bytes.extend_from_slice(&lease.attempt.to_le_bytes());
        let tag = self.mac(queue, group, &bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..MAC_BYTES]);
        debug_assert_eq!(bytes.len(), RECEIPT_BYTES);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Decodes and authenticates a receipt; `None` for anything forged, truncated or issued
    /// for another queue or group. Anything from a `.` on is ignored: a proxy older than the
    /// handles' trace part passes that part on as if it were the receipt's.
    pub fn open(&self, queue: &str, group: &str, text: &str) -> Option<Lease> {
        if text.len() > RECEIPT_TEXT_MAX_BYTES {
            return None;
        }
        let text = text.split_once('.').map_or(text, |(receipt, _)| receipt);
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        if bytes.len() != RECEIPT_BYTES || bytes[0] != RECEIPT_VERSION {
            return None;
        }
        let (fields, tag) = bytes.split_at(RECEIPT_BYTES - MAC_BYTES);
        // Constant-time comparison, so a MAC cannot be found byte by byte.
        self.mac(queue, group, fields).verify_truncated_left(tag).ok()?;
        let u64_at = |i: usize| u64::from_le_bytes(fields[i..i + 8].try_into().expect("8 bytes"));
        Some(Lease {
            offset: u64_at(1),
            lease_id: u64_at(9),
            deadline_ms: u64_at(17),
            attempt: u32::from_le_bytes(fields[25..29].try_into().expect("4 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease { offset: 42, attempt: 2, deadline_ms: 1_700_000_000_000, lease_id: 9 }
    }

    #[test]
    fn issued_receipt_opens_to_the_same_lease() {
        let key = ReceiptKey::random();
        let text = key.issue("t#0", "g", &lease());
        assert_eq!(key.open("t#0", "g", &text), Some(lease()));
        // As an older proxy passes on a handle's trace part.
        let traced = format!("{text}.00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(key.open("t#0", "g", &traced), Some(lease()));
    }

    #[test]
    fn receipt_is_bound_to_key_queue_and_group() {
        let key = ReceiptKey::random();
        let text = key.issue("t#0", "g", &lease());
        assert_eq!(key.open("t#1", "g", &text), None);
        assert_eq!(key.open("t#0", "other", &text), None);
        assert_eq!(ReceiptKey::random().open("t#0", "g", &text), None);
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let key = ReceiptKey::random();
        let bytes = URL_SAFE_NO_PAD.decode(key.issue("q", "g", &lease())).unwrap();
        for i in 0..bytes.len() * 8 {
            let mut forged = bytes.clone();
            forged[i / 8] ^= 1 << (i % 8);
            assert_eq!(key.open("q", "g", &URL_SAFE_NO_PAD.encode(&forged)), None, "bit {i}");
        }
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let key = ReceiptKey::random();
        for text in ["", "x", "!!!!", &"A".repeat(60), &"A".repeat(10_000)] {
            assert_eq!(key.open("q", "g", text), None);
        }
    }
}
