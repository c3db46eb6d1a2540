//! Rate quotas kept by the shard that owns a group's `%GROUP%` record (`max_receive_tps`) or
//! a topic's queue 0 (`max_send_tps`): that one shard is the authority, so the quota holds
//! across every proxy. A proxy takes permits before it pops (at most what the receive asks
//! for) and gives back the ones its pop did not use; a send takes one per message.
//!
//! The bucket holds at most a tenth of a second of permits (at least one), so a group that
//! was idle gets no more than that in a burst, and over any window of `t` seconds no more
//! than `rate × (t + 0.1)` permits are taken.

use std::collections::HashMap;

use sluice_transport::messages::{quota_kind, QuotaRequest, QuotaResponse};
use sluice_transport::Frame;

use crate::broker::error::BrokerError;
use crate::broker::handler::{now_ms, Counters, Result, ShardHandler};

/// The record attribute holding a group's receive quota in messages per second.
pub const MAX_RECEIVE_TPS: &str = "max_receive_tps";
/// The attribute of a topic's queue 0 holding the topic's send quota in messages per second.
pub const MAX_SEND_TPS: &str = "max_send_tps";
/// Highest quota a record may state.
pub const TPS_MAX: u32 = 10_000_000;
/// The bucket holds this fraction of a second of permits.
const BURST_DIVISOR: u64 = 10;

/// A token bucket in millipermits, with the clock passed in.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    rate_per_s: u32,
    millis: u64,
    at_ms: u64,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate_per_s: u32, now_ms: u64) -> Bucket {
        assert!(rate_per_s > 0, "a bucket has a rate");
        let mut b = Bucket { rate_per_s, millis: 0, at_ms: now_ms };
        b.millis = b.capacity_millis();
        b
    }

    fn capacity_millis(&self) -> u64 {
        (u64::from(self.rate_per_s) * 1000 / BURST_DIVISOR).max(1000)
    }

    /// Takes the rate the record states now (a run-time change keeps what was saved up, up
    /// to the new capacity).
    pub fn set_rate(&mut self, rate_per_s: u32, now_ms: u64) {
        assert!(rate_per_s > 0, "a bucket has a rate");
        self.refill(now_ms);
        self.rate_per_s = rate_per_s;
        self.millis = self.millis.min(self.capacity_millis());
    }

    fn refill(&mut self, now_ms: u64) {
        // A clock stepped back refills nothing and restarts from now.
        let elapsed_ms = now_ms.saturating_sub(self.at_ms);
        self.at_ms = now_ms;
        let added = elapsed_ms.saturating_mul(u64::from(self.rate_per_s));
        self.millis = self.millis.saturating_add(added).min(self.capacity_millis());
    }

    /// Takes up to `want` whole permits.
    pub fn take(&mut self, want: u32, now_ms: u64) -> u32 {
        self.refill(now_ms);
        let granted = (self.millis / 1000).min(u64::from(want));
        self.millis -= granted * 1000;
        granted as u32
    }

    /// Gives back permits taken and not used, up to the capacity.
    pub fn refund(&mut self, permits: u32, now_ms: u64) {
        self.refill(now_ms);
        self.millis = self.millis.saturating_add(u64::from(permits) * 1000).min(self.capacity_millis());
    }

    /// How long until one permit is free.
    pub fn wait_ms(&self) -> u64 {
        let missing = 1000u64.saturating_sub(self.millis);
        missing.div_ceil(u64::from(self.rate_per_s)).max(1)
    }
}

/// The buckets of the records this shard owns that state a quota.
#[derive(Debug, Default)]
pub struct Quotas {
    buckets: HashMap<(String, u8), Bucket>,
    /// Requests that got fewer permits than they asked for, per quota record (kept while the
    /// record exists, for `sluice stats`).
    throttled: HashMap<String, u64>,
}

impl Quotas {
    /// Takes permits from the bucket of a record that states a quota of `rate_per_s`, after
    /// giving back `refund`; returns (granted, wait_ms until one is free when none was).
    fn take(&mut self, key: (String, u8), rate_per_s: u32, want: u32, refund: u32, now_ms: u64) -> (u32, u64) {
        let bucket = self.buckets.entry(key).or_insert_with(|| Bucket::new(rate_per_s, now_ms));
        bucket.set_rate(rate_per_s, now_ms);
        bucket.refund(refund, now_ms);
        let granted = bucket.take(want, now_ms);
        let wait_ms = if granted == 0 { bucket.wait_ms() } else { 0 };
        (granted, wait_ms)
    }

    /// Forgets the bucket of a record that no longer states a quota.
    fn forget(&mut self, key: &(String, u8)) {
        self.buckets.remove(key);
    }

    /// Forgets every bucket of a deleted record: buckets exist only for records this shard
    /// holds, so they are bounded by its queue configurations.
    pub fn forget_record(&mut self, record: &str) {
        self.buckets.retain(|(r, _), _| r != record);
        self.throttled.remove(record);
    }

    fn count_throttled(&mut self, record: &str) {
        *self.throttled.entry(record.to_string()).or_default() += 1;
    }

    /// (record, throttled requests) for every quota that throttled since the broker started.
    pub fn throttled(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.throttled.iter().map(|(r, n)| (r.as_str(), *n))
    }
}

impl ShardHandler {
    pub(super) fn quota(&self, request: &Frame) -> Result<QuotaResponse> {
        let ask = request.access::<QuotaRequest>()?;
        let record = ask.record.as_str();
        self.check_queue(record)?;
        let attribute = match ask.kind {
            quota_kind::RECEIVE => MAX_RECEIVE_TPS,
            quota_kind::SEND => MAX_SEND_TPS,
            other => return Err(BrokerError::InvalidRequest(format!("quota kind {other} is not known"))),
        };
        let rate_per_s = self.configs.borrow().get(record).map_or(0, |c| rate_of(&c.attributes, attribute));
        let key = (record.to_string(), ask.kind);
        let want = ask.want.to_native();
        if rate_per_s == 0 {
            self.quotas.borrow_mut().forget(&key);
            return Ok(QuotaResponse { granted: want, wait_ms: 0, rate_per_s: 0 });
        }
        let (granted, wait_ms) = self.quotas.borrow_mut().take(key, rate_per_s, want, ask.refund.to_native(), now_ms());
        if granted < want {
            Counters::add(&self.counters.quota_throttled, 1);
            self.quotas.borrow_mut().count_throttled(record);
        }
        Ok(QuotaResponse { granted, wait_ms, rate_per_s })
    }
}

/// A rate attribute: permits per second, 0 when absent or not a number in range.
pub fn rate_of(attributes: &[(String, String)], name: &str) -> u32 {
    attributes
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .filter(|r| *r <= TPS_MAX)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_a_tenth_of_a_second_and_refills_at_its_rate() {
        let mut b = Bucket::new(100, 0);
        assert_eq!(b.take(64, 0), 10, "a full bucket: 100 ms of permits");
        assert_eq!(b.take(1, 0), 0);
        assert_eq!(b.wait_ms(), 10, "one permit every 10 ms");
        assert_eq!(b.take(64, 55), 5);
        b.refund(3, 55);
        assert_eq!(b.take(64, 55), 3, "refunded permits can be taken again");
        assert_eq!(b.take(64, 10_000), 10, "never more than the capacity, however long idle");
        assert_eq!(b.take(1, 5_000), 0, "a clock stepped back refills nothing");
    }

    #[test]
    fn over_a_window_no_more_than_the_rate_plus_the_burst_is_taken() {
        let mut b = Bucket::new(50, 0);
        let taken: u32 = (0..=10_000).step_by(7).map(|t| b.take(3, t)).sum();
        assert!((500..=505).contains(&taken), "{taken} in 10 s at 50/s");
    }

    #[test]
    fn a_slow_rate_still_grants_whole_permits() {
        let mut b = Bucket::new(1, 0);
        assert_eq!(b.take(5, 0), 1, "at least one permit fits");
        assert_eq!(b.wait_ms(), 1000);
        assert_eq!(b.take(5, 999), 0);
        assert_eq!(b.take(5, 1000), 1);
        b.set_rate(1000, 1000);
        assert_eq!(b.take(500, 1100), 100, "the new rate's capacity after a change");
    }

    #[test]
    fn rates_are_read_from_the_record_and_bounded() {
        let attrs = |v: &str| vec![(MAX_RECEIVE_TPS.to_string(), v.to_string())];
        assert_eq!(rate_of(&attrs("250"), MAX_RECEIVE_TPS), 250);
        assert_eq!(rate_of(&attrs("x"), MAX_RECEIVE_TPS), 0);
        assert_eq!(rate_of(&attrs("99999999999"), MAX_RECEIVE_TPS), 0);
        assert_eq!(rate_of(&[], MAX_RECEIVE_TPS), 0);
    }
}
