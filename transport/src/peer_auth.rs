//! Proving a peer at the handshake with a shared secret (`[transport] secret_file`).
//!
//! The first frame a client sends (Hello on TCP, RdmaConnect on the RDMA bootstrap socket)
//! carries a `PeerProof`: HMAC-SHA256 over the purpose, the client's name, a millisecond
//! timestamp and a random nonce. A server with a secret reads nothing else until that proof
//! checks out, refuses a timestamp more than `CLOCK_SKEW_MAX_MS` away and a nonce it has seen,
//! and answers with its own HMAC over the client's proof, so the client knows it reached a
//! holder of the secret too. The secret itself never crosses the wire.
//!
//! What it does not do: frames after the handshake are not signed or encrypted. It keeps
//! strangers off the broker's port; it is no defence against someone who can rewrite traffic
//! on the proxy–broker network.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use rkyv::{Archive, Serialize};
use sha2::Sha256;

use crate::error::TransportError;

/// Shortest secret accepted: 128 bits.
pub const SECRET_MIN_BYTES: usize = 16;
/// Longest secret file read.
pub const SECRET_MAX_BYTES: usize = 4096;
/// How far a proof's timestamp may be from the server's clock (either way).
pub const CLOCK_SKEW_MAX_MS: u64 = 5 * 60 * 1000;
/// Nonces remembered to refuse replays; they are dropped once older than the skew window. A
/// server that sees more proofs than this within the window refuses the rest until old ones
/// age out (only holders of the secret can make them).
pub const SEEN_NONCES_MAX: usize = 65_536;
pub const NONCE_BYTES: usize = 16;
pub const MAC_BYTES: usize = 32;

/// What a proof is for, so one made for the RDMA bootstrap cannot be replayed as a Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Hello,
    RdmaConnect,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Hello => b"sluice-peer-proof-v1 hello",
            Purpose::RdmaConnect => b"sluice-peer-proof-v1 rdma-connect",
        }
    }
}

const ANSWER_LABEL: &[u8] = b"sluice-peer-answer-v1";

/// The client's proof. All zeros when the client has no secret.
#[derive(Archive, Serialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(compare(PartialEq), derive(Debug))]
pub struct PeerProof {
    pub unix_ms: u64,
    pub nonce: [u8; NONCE_BYTES],
    pub mac: [u8; MAC_BYTES],
}

/// Why a server refused a proof, or a client refused the server's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerAuthError {
    #[error(
        "this broker requires the transport secret and the peer sent no proof: give the proxy the broker's \
         secret ([transport] secret_file or SLUICE_TRANSPORT_SECRET_FILE)"
    )]
    Missing,
    #[error("the peer's proof does not match this broker's transport secret: the two secret files differ")]
    Wrong,
    #[error(
        "the peer's proof is stamped {skew_ms} ms away from this broker's clock (at most {CLOCK_SKEW_MAX_MS}): \
         synchronise the clocks (NTP)"
    )]
    Stale { skew_ms: u64 },
    #[error("the peer's proof was used before (a replayed handshake)")]
    Replayed,
    #[error("the broker has seen {SEEN_NONCES_MAX} handshakes within {CLOCK_SKEW_MAX_MS} ms; try again shortly")]
    TooMany,
    #[error("the broker did not prove that it holds the transport secret: it is not the broker configured, or its secret differs")]
    ServerUnproven,
    #[error("the first frame on a connection to this broker must be Hello (with the transport secret's proof), not kind {kind}")]
    NotHelloFirst { kind: u16 },
}

/// A transport secret, shared by every proxy and broker of a cluster. Cloning shares the
/// record of seen nonces.
#[derive(Clone)]
pub struct PeerSecret {
    key: Arc<[u8]>,
    seen: Arc<Mutex<SeenNonces>>,
}

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerSecret(<{} bytes, redacted>)", self.key.len())
    }
}

impl PartialEq for PeerSecret {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

fn config_error(reason: String) -> TransportError {
    TransportError::Config { reason }
}

impl PeerSecret {
    pub fn new(key: &[u8]) -> Result<PeerSecret, TransportError> {
        if !(SECRET_MIN_BYTES..=SECRET_MAX_BYTES).contains(&key.len()) {
            return Err(config_error(format!(
                "the transport secret has {} bytes; it must have {SECRET_MIN_BYTES}..={SECRET_MAX_BYTES} \
                 (e.g. `head -c 32 /dev/urandom | base64 > transport.secret`)",
                key.len()
            )));
        }
        Ok(PeerSecret { key: key.into(), seen: Arc::new(Mutex::new(SeenNonces::default())) })
    }

    /// The file's bytes without trailing whitespace (an editor's newline is not part of it).
    pub fn from_file(path: &Path) -> Result<PeerSecret, TransportError> {
        let unreadable =
            |e: std::io::Error| config_error(format!("cannot read the transport secret {}: {e}", path.display()));
        let size = std::fs::metadata(path).map_err(unreadable)?.len();
        if size > SECRET_MAX_BYTES as u64 {
            return Err(config_error(format!(
                "the transport secret {} has {size} bytes; at most {SECRET_MAX_BYTES}",
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(unreadable)?;
        let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
        PeerSecret::new(&bytes[..end])
            .map_err(|e| config_error(format!("the transport secret {}: {e}", path.display())))
    }

    /// A fresh random secret, for a broker and proxy in one process (`sluice local`).
    pub fn random() -> PeerSecret {
        let key: [u8; 32] = rand::random();
        PeerSecret::new(&key).expect("32 bytes is a valid secret length")
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes a key of any length")
    }

    fn proof_mac(&self, purpose: Purpose, client_name: &str, unix_ms: u64, nonce: &[u8; NONCE_BYTES]) -> Hmac<Sha256> {
        let mut mac = self.mac();
        mac.update(purpose.label());
        mac.update(&(client_name.len() as u64).to_le_bytes());
        mac.update(client_name.as_bytes());
        mac.update(&unix_ms.to_le_bytes());
        mac.update(nonce);
        mac
    }

    /// The proof a client sends.
    pub fn prove(&self, purpose: Purpose, client_name: &str) -> PeerProof {
        let unix_ms = unix_now_ms();
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let mac = self.proof_mac(purpose, client_name, unix_ms, &nonce).finalize().into_bytes().into();
        PeerProof { unix_ms, nonce, mac }
    }

    /// The server's answer to a proof it accepted.
    pub fn answer(&self, proof_mac: &[u8; MAC_BYTES]) -> [u8; MAC_BYTES] {
        let mut mac = self.mac();
        mac.update(ANSWER_LABEL);
        mac.update(proof_mac);
        mac.finalize().into_bytes().into()
    }

    /// Checks a client's proof (in constant time) and remembers its nonce; returns the answer.
    pub fn check(
        &self,
        purpose: Purpose,
        client_name: &str,
        proof: &PeerProof,
    ) -> Result<[u8; MAC_BYTES], PeerAuthError> {
        if *proof == PeerProof::default() {
            return Err(PeerAuthError::Missing);
        }
        self.proof_mac(purpose, client_name, proof.unix_ms, &proof.nonce)
            .verify_slice(&proof.mac)
            .map_err(|_| PeerAuthError::Wrong)?;
        let now = unix_now_ms();
        let skew_ms = now.abs_diff(proof.unix_ms);
        if skew_ms > CLOCK_SKEW_MAX_MS {
            return Err(PeerAuthError::Stale { skew_ms });
        }
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(proof.nonce, now)?;
        Ok(self.answer(&proof.mac))
    }

    /// A client's check of the server's answer to its proof.
    pub fn check_answer(&self, proof: &PeerProof, answer: &[u8; MAC_BYTES]) -> Result<(), PeerAuthError> {
        let mut mac = self.mac();
        mac.update(ANSWER_LABEL);
        mac.update(&proof.mac);
        mac.verify_slice(answer).map_err(|_| PeerAuthError::ServerUnproven)
    }
}

impl ArchivedPeerProof {
    pub fn to_native(&self) -> PeerProof {
        PeerProof { unix_ms: self.unix_ms.to_native(), nonce: self.nonce, mac: self.mac }
    }
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Nonces seen within the skew window, oldest first.
#[derive(Default)]
struct SeenNonces {
    by_nonce: HashMap<[u8; NONCE_BYTES], u64>,
    order: VecDeque<([u8; NONCE_BYTES], u64)>,
}

impl SeenNonces {
    fn insert(&mut self, nonce: [u8; NONCE_BYTES], now_ms: u64) -> Result<(), PeerAuthError> {
        // A proof older than the window is refused as stale, so its nonce can be forgotten.
        while let Some(&(old, at)) = self.order.front() {
            if now_ms.saturating_sub(at) <= 2 * CLOCK_SKEW_MAX_MS {
                break;
            }
            self.order.pop_front();
            self.by_nonce.remove(&old);
        }
        if self.by_nonce.contains_key(&nonce) {
            return Err(PeerAuthError::Replayed);
        }
        if self.order.len() >= SEEN_NONCES_MAX {
            return Err(PeerAuthError::TooMany);
        }
        self.by_nonce.insert(nonce, now_ms);
        self.order.push_back((nonce, now_ms));
        debug_assert_eq!(self.by_nonce.len(), self.order.len());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(key: &str) -> PeerSecret {
        PeerSecret::new(key.as_bytes()).unwrap()
    }

    #[test]
    fn a_proof_checks_once_and_the_answer_proves_the_server() {
        let s = secret("0123456789abcdef0123");
        let proof = s.prove(Purpose::Hello, "proxy-1");
        let answer = s.check(Purpose::Hello, "proxy-1", &proof).unwrap();
        s.check_answer(&proof, &answer).unwrap();
        assert_eq!(s.check(Purpose::Hello, "proxy-1", &proof), Err(PeerAuthError::Replayed));
    }

    #[test]
    fn wrong_secret_name_purpose_or_missing_proof_is_refused() {
        let (s, other) = (secret("0123456789abcdef0123"), secret("another secret of 16+"));
        let proof = other.prove(Purpose::Hello, "p");
        assert_eq!(s.check(Purpose::Hello, "p", &proof), Err(PeerAuthError::Wrong));
        let proof = s.prove(Purpose::Hello, "p");
        assert_eq!(s.check(Purpose::Hello, "q", &proof), Err(PeerAuthError::Wrong));
        assert_eq!(s.check(Purpose::RdmaConnect, "p", &proof), Err(PeerAuthError::Wrong));
        assert_eq!(s.check(Purpose::Hello, "p", &PeerProof::default()), Err(PeerAuthError::Missing));
        // An answer made with another secret does not prove the server.
        let answer = other.answer(&proof.mac);
        assert_eq!(s.check_answer(&proof, &answer), Err(PeerAuthError::ServerUnproven));
    }

    #[test]
    fn a_stale_timestamp_is_refused_even_with_the_right_mac() {
        let s = secret("0123456789abcdef0123");
        let unix_ms = unix_now_ms() - CLOCK_SKEW_MAX_MS - 60_000;
        let nonce = [7u8; NONCE_BYTES];
        let mac = s.proof_mac(Purpose::Hello, "p", unix_ms, &nonce).finalize().into_bytes().into();
        let proof = PeerProof { unix_ms, nonce, mac };
        assert!(matches!(s.check(Purpose::Hello, "p", &proof), Err(PeerAuthError::Stale { .. })));
    }

    #[test]
    fn secrets_are_bounded_and_read_without_the_trailing_newline() {
        assert!(PeerSecret::new(b"short").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        assert_eq!(PeerSecret::from_file(&path).unwrap(), secret("0123456789abcdef0123"));
        std::fs::write(&path, vec![b'x'; SECRET_MAX_BYTES + 1]).unwrap();
        assert!(PeerSecret::from_file(&path).is_err());
        assert!(format!("{:?}", secret("0123456789abcdef0123")).contains("redacted"));
    }

    #[test]
    fn seen_nonces_are_bounded_and_age_out() {
        let mut seen = SeenNonces::default();
        for i in 0..SEEN_NONCES_MAX {
            let mut nonce = [0u8; NONCE_BYTES];
            nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
            seen.insert(nonce, 1_000).unwrap();
        }
        assert_eq!(seen.insert([0xff; NONCE_BYTES], 1_000), Err(PeerAuthError::TooMany));
        // Past the window, the old ones go and there is room again.
        seen.insert([0xff; NONCE_BYTES], 1_000 + 2 * CLOCK_SKEW_MAX_MS + 1).unwrap();
        assert_eq!(seen.order.len(), 1);
    }
}
