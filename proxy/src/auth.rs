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

/// How far a signed `x-mq-date-time` may be from the proxy's clock. Wide because the official
/// Python client stamps local time with a `Z` suffix, so time-zone offsets (up to 14 h) must
/// pass; it still stops a captured header from being replayed after a day.
pub const CLOCK_SKEW_MAX_SECS: i64 = 24 * 3600;

#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// access key → secret key
    keys: HashMap<String, String>,
}

/// Seconds since the Unix epoch of `yyyyMMddTHHmmssZ`, or `None` if it is not that.
pub fn parse_date_time(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { std::str::from_utf8(&b[r]).ok()?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, s) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from civil (H. Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `yyyyMMddTHHmmssZ` (UTC) of a Unix time, as RocketMQ clients send `x-mq-date-time`.
pub fn format_date_time(unix_secs: i64) -> String {
    let (days, rem) = (unix_secs.div_euclid(86_400), unix_secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `x-mq-date-time` for now.
pub fn date_time_now() -> String {
    format_date_time(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64),
    )
}

impl Auth {
    pub fn new(keys: HashMap<String, String>) -> Auth {
        Auth { keys }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The access key the call is signed with (checked), or `None` with authentication off.
    pub fn check(&self, metadata: &MetadataMap) -> Result<Option<String>, ProxyError> {
        if !self.enabled() {
            return Ok(None);
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
        let signed_at = parse_date_time(date)
            .ok_or_else(|| ProxyError::Unauthorized("x-mq-date-time is not yyyyMMddTHHmmssZ".into()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if (now - signed_at).abs() > CLOCK_SKEW_MAX_SECS {
            return Err(ProxyError::Unauthorized(
                "x-mq-date-time is more than a day from the proxy's clock; check the client's clock".into(),
            ));
        }
        let (access_key, signature) = parse(header)?;
        let secret = self
            .keys
            .get(access_key)
            .ok_or_else(|| ProxyError::Unauthorized(format!("unknown access key {access_key:?}")))?;
        let signature = hex::decode(signature).map_err(|_| ProxyError::Unauthorized("signature is not hex".into()))?;
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(date.as_bytes());
        mac.verify_slice(&signature).map_err(|_| ProxyError::Unauthorized("signature does not match".into()))?;
        Ok(Some(access_key.to_string()))
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

    fn now_stamp(offset_secs: i64) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        format_date_time(now + offset_secs)
    }

    #[test]
    fn date_times_round_trip() {
        for t in [0, 951_825_600, 1_700_000_000, 4_102_444_800] {
            assert_eq!(parse_date_time(&format_date_time(t)), Some(t));
        }
    }

    #[test]
    fn date_times_parse() {
        assert_eq!(parse_date_time("19700101T000000Z"), Some(0));
        assert_eq!(parse_date_time("20000229T120000Z"), Some(951_825_600));
        for bad in ["", "20001301T000000Z", "2000-01-01T00:00:00Z", "20000101T000000", "20000132T000000Z"] {
            assert_eq!(parse_date_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn stale_signatures_are_refused() {
        let auth = Auth::new(HashMap::from([("ak".to_string(), "sk".to_string())]));
        let old = now_stamp(-2 * 24 * 3600);
        assert!(auth.check(&metadata(Some(&sign("ak", "sk", &old)), &old)).is_err());
        let local_time = now_stamp(9 * 3600);
        assert!(
            auth.check(&metadata(Some(&sign("ak", "sk", &local_time)), &local_time)).is_ok(),
            "time-zone offsets pass"
        );
    }

    #[test]
    fn accepts_everything_without_keys() {
        assert!(Auth::default().check(&metadata(Some("garbage"), "x")).is_ok());
    }

    #[test]
    fn verifies_signatures() {
        let auth = Auth::new(HashMap::from([("ak".to_string(), "sk".to_string())]));
        let date = &now_stamp(0);
        assert_eq!(auth.check(&metadata(Some(&sign("ak", "sk", date)), date)).unwrap().as_deref(), Some("ak"));
        let lower_hex = sign("ak", "sk", date);
        let (head, signature) = lower_hex.split_at(lower_hex.find("Signature=").unwrap() + "Signature=".len());
        let lower = format!("{head}{}", signature.to_lowercase());
        assert!(auth.check(&metadata(Some(&lower), date)).is_ok(), "hex case does not matter");
        assert!(auth.check(&metadata(Some(&sign("ak", "wrong", date)), date)).is_err(), "wrong secret");
        assert!(auth.check(&metadata(Some(&sign("other", "sk", date)), date)).is_err(), "unknown key");
        assert!(auth.check(&metadata(Some(&sign("ak", "sk", date)), &now_stamp(1))).is_err(), "other date");
        assert!(auth.check(&metadata(None, date)).is_err(), "missing header");
        assert!(auth.check(&metadata(Some("Bearer x"), date)).is_err(), "other scheme");
    }
}
