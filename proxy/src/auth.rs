//! RocketMQ's request signature: `authorization: MQv2-HMAC-SHA1 Credential=AK,
//! SignedHeaders=x-mq-date-time, Signature=HEX` where HEX is HMAC-SHA1(secret key, the
//! `x-mq-date-time` header). With no keys configured every request is accepted, because
//! clients send the header even without credentials.

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use tonic::metadata::MetadataMap;

use crate::error::ProxyError;

const ALGORITHM: &str = "MQv2-HMAC-SHA1";
/// Longest authorization header looked at.
const HEADER_MAX_BYTES: usize = 1024;

#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// access key → secret key
    keys: HashMap<String, String>,
}

impl Auth {
    pub fn new(keys: HashMap<String, String>) -> Auth {
        Auth { keys }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn check(&self, metadata: &MetadataMap) -> Result<(), ProxyError> {
        if !self.enabled() {
            return Ok(());
        }
        let header = metadata
            .get("authorization")
            .ok_or_else(|| {
                ProxyError::Unauthorized("missing authorization header; configure the client's credentials".into())
            })?
            .to_str()
            .map_err(|_| ProxyError::Unauthorized("authorization header is not text".into()))?;
        let date = metadata
            .get("x-mq-date-time")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ProxyError::Unauthorized("missing x-mq-date-time header".into()))?;
        let (access_key, signature) = parse(header)?;
        let secret = self
            .keys
            .get(access_key)
            .ok_or_else(|| ProxyError::Unauthorized(format!("unknown access key {access_key:?}")))?;
        let signature = hex::decode(signature).map_err(|_| ProxyError::Unauthorized("signature is not hex".into()))?;
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(date.as_bytes());
        mac.verify_slice(&signature).map_err(|_| ProxyError::Unauthorized("signature does not match".into()))
    }
}

/// Splits the header into (access key, hex signature).
fn parse(header: &str) -> Result<(&str, &str), ProxyError> {
    let bad = |why: &str| ProxyError::Unauthorized(format!("malformed authorization header: {why}"));
    if header.len() > HEADER_MAX_BYTES {
        return Err(bad("too long"));
    }
    let rest = header.strip_prefix(ALGORITHM).ok_or_else(|| bad("expected the MQv2-HMAC-SHA1 scheme"))?;
    let mut credential = None;
    let mut signature = None;
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=').ok_or_else(|| bad("expected name=value pairs"))?;
        match name.trim() {
            "Credential" => credential = Some(value.trim()),
            "Signature" => signature = Some(value.trim()),
            _ => {}
        }
    }
    // The credential may carry a scope after '/': the access key is its first part.
    let access_key = credential.ok_or_else(|| bad("no Credential"))?.split('/').next().unwrap_or_default();
    Ok((access_key, signature.ok_or_else(|| bad("no Signature"))?))
}

/// The header a client with `access_key`/`secret` sends for `date` (used by the CLI and tests).
pub fn sign(access_key: &str, secret: &str, date: &str) -> String {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(date.as_bytes());
    let signature = hex::encode_upper(mac.finalize().into_bytes());
    format!("{ALGORITHM} Credential={access_key}, SignedHeaders=x-mq-date-time, Signature={signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(authorization: Option<&str>, date: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(a) = authorization {
            m.insert("authorization", a.parse().unwrap());
        }
        m.insert("x-mq-date-time", date.parse().unwrap());
        m
    }

    #[test]
    fn accepts_everything_without_keys() {
        assert!(Auth::default().check(&metadata(Some("garbage"), "x")).is_ok());
    }

    #[test]
    fn verifies_signatures() {
        let auth = Auth::new(HashMap::from([("ak".to_string(), "sk".to_string())]));
        let date = "20261122T060000Z";
        assert!(auth.check(&metadata(Some(&sign("ak", "sk", date)), date)).is_ok());
        let lower_hex = sign("ak", "sk", date).replace("Signature=", "Signature=").to_string();
        let (head, signature) = lower_hex.split_at(lower_hex.find("Signature=").unwrap() + "Signature=".len());
        let lower = format!("{head}{}", signature.to_lowercase());
        assert!(auth.check(&metadata(Some(&lower), date)).is_ok(), "hex case does not matter");
        assert!(auth.check(&metadata(Some(&sign("ak", "wrong", date)), date)).is_err(), "wrong secret");
        assert!(auth.check(&metadata(Some(&sign("other", "sk", date)), date)).is_err(), "unknown key");
        assert!(auth.check(&metadata(Some(&sign("ak", "sk", date)), "20261122T060001Z")).is_err(), "other date");
        assert!(auth.check(&metadata(None, date)).is_err(), "missing header");
        assert!(auth.check(&metadata(Some("Bearer x"), date)).is_err(), "other scheme");
    }
}
