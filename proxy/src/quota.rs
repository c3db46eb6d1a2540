//! Rate quotas kept on the brokers, so each holds across every proxy: a consumer group's
//! receive quota (`max_receive_tps`, on the shard of its `%GROUP%` record) and a topic's send
//! quota (`max_send_tps`, on the shard of its queue 0). A receive takes at most its batch size
//! in permits before it pops and gives back what the pop did not use; a send takes one permit
//! per message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_transport::messages::{quota_kind, QuotaRequest, QuotaResponse};

use crate::error::{ProxyError, Result};
use crate::groups::{record_name, GroupMeta, Throttle};
use crate::state::{Counters, ProxyState};
use crate::topics::TopicMeta;

/// Longest a send waits for its topic's quota before the messages still without a permit
/// get TOO_MANY_REQUESTS (clients' send timeouts are 3 s and up).
pub const SEND_WAIT_MAX: Duration = Duration::from_secs(2);
/// Shortest pause between asks while waiting, so waiters at a high rate do not flood the
/// quota's shard with requests.
const POLL_PAUSE_MIN: Duration = Duration::from_millis(5);

/// One rate quota as a proxy sees it.
pub struct Quota {
    record: String,
    kind: u8,
    /// The rate this proxy last read (0: none, no broker call); the broker uses its own.
    rate_per_s: u32,
    throttle: Throttle,
    /// What the error names, e.g. "consumer group G".
    owner: String,
    /// The group (receive quota) or topic (send quota), for metric labels.
    name: String,
    setting: &'static str,
}

impl Quota {
    pub fn receive(group: &GroupMeta) -> Quota {
        Quota {
            record: record_name(&group.name),
            kind: quota_kind::RECEIVE,
            rate_per_s: group.max_receive_tps,
            throttle: group.throttle,
            owner: format!("consumer group {}", group.name),
            name: group.name.clone(),
            setting: "max_receive_tps",
        }
    }

    pub fn send(topic: &TopicMeta) -> Quota {
        Quota {
            record: topic.queue(0),
            kind: quota_kind::SEND,
            rate_per_s: topic.max_send_tps,
            throttle: topic.send_throttle,
            owner: format!("topic {}", topic.name),
            name: topic.name.clone(),
            setting: "max_send_tps",
        }
    }

    fn count_throttled(&self) {
        if self.kind == quota_kind::SEND {
            crate::metrics::send_throttled(&self.name);
        } else {
            crate::metrics::receive_throttled(&self.name);
        }
    }

    fn throttled_counter<'a>(&self, state: &'a ProxyState) -> &'a std::sync::atomic::AtomicU64 {
        if self.kind == quota_kind::SEND {
            &state.counters.sends_throttled
        } else {
            &state.counters.receives_throttled
        }
    }
}

/// Permits to go on with: `want` when there is no quota; at least one as soon as one is free;
/// 0 when `wait` ran out first. Over a `reject` quota: TOO_MANY_REQUESTS instead of waiting.
pub async fn acquire(state: &ProxyState, quota: &Quota, want: u32, wait: Duration) -> Result<u32> {
    if quota.rate_per_s == 0 || want == 0 {
        return Ok(want);
    }
    let until = Instant::now() + wait;
    let mut throttled = false;
    loop {
        let request = QuotaRequest { record: quota.record.clone(), kind: quota.kind, want, refund: 0 };
        let frame = state.brokers.call_for(&quota.record, &request).await?;
        let reply = frame.access::<QuotaResponse>()?;
        if reply.granted.to_native() > 0 || reply.rate_per_s.to_native() == 0 {
            return Ok(reply.granted.to_native());
        }
        if !throttled {
            throttled = true;
            Counters::add(quota.throttled_counter(state), 1);
            quota.count_throttled();
        }
        if quota.throttle == Throttle::Reject {
            return Err(over_quota(quota, reply.rate_per_s.to_native(), reply.wait_ms.to_native()));
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(0);
        }
        let pause = Duration::from_millis(reply.wait_ms.to_native()).max(POLL_PAUSE_MIN);
        tokio::time::sleep(pause.min(left)).await;
    }
}

/// Takes `want` permits, waiting up to `wait` for all of them (`reject`: no waiting). Returns
/// how many it got.
pub async fn acquire_all(state: &ProxyState, quota: &Quota, want: u32, wait: Duration) -> Result<u32> {
    let until = Instant::now() + wait;
    let mut got = 0;
    while got < want {
        let left = until.saturating_duration_since(Instant::now());
        match acquire(state, quota, want - got, left).await {
            Ok(0) => break,
            Ok(n) => got += n,
            // What was granted already is used rather than lost.
            Err(_) if got > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

pub fn over_quota(quota: &Quota, rate_per_s: u32, wait_ms: u64) -> ProxyError {
    ProxyError::Throttled(format!(
        "{} is over its quota of {rate_per_s} messages/s ({}); retry in {wait_ms} ms",
        quota.owner, quota.setting
    ))
}

/// Gives back permits taken and not used, in the background.
pub fn refund(state: &Arc<ProxyState>, quota: &Quota, unused: u32) {
    if quota.rate_per_s == 0 || unused == 0 {
        return;
    }
    let state = state.clone();
    let (record, kind) = (quota.record.clone(), quota.kind);
    tokio::spawn(async move {
        let request = QuotaRequest { record: record.clone(), kind, want: 0, refund: unused };
        if let Err(e) = state.brokers.call_for(&record, &request).await {
            tracing::debug!(error = %e, record, "giving back unused permits failed; the quota refills anyway");
        }
    });
}
