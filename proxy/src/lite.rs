//! Lite topics through the proxy: SyncLiteSubscription, and forgetting a lite consumer's
//! subscriptions when it terminates. The brokers keep every subscription set (per group and
//! client id, on the shard of each lite topic); the proxy only splits a change by shard.
//!
//! Compatibility with the Python client (5.1.2): its `subscribe_lite(name)` sends PARTIAL_ADD
//! with the name split into one-character entries (it extends the repeated field with a
//! string), and the real name arrives only with the COMPLETE_ADD it sends every 30 s. A
//! PARTIAL_ADD from a client whose `x-mq-language` is PYTHON, carrying two or more entries
//! that are all one character long, is therefore read as the one name those characters spell,
//! in order. Any other client, and any other shape, is taken as sent.

use std::collections::{BTreeMap, BTreeSet};

use sluice_transport::cluster::Owner;
use sluice_transport::messages::{
    LiteSubscriptionRequest, LiteSubscriptionResponse, LITE_ADD, LITE_REMOVE, LITE_REMOVE_ALL, LITE_REPLACE,
    LITE_START_LAST, LITE_START_MAX, LITE_START_MIN, LITE_START_OFFSET, LITE_START_TAIL,
};
use sluice_transport::model::message_type;
use sluice_transport::model::placement::{check_lite_topic_name, lite_queue};

use crate::consume::group_name;
use crate::error::{ProxyError, Result};
use crate::pb::apache::rocketmq::v2::*;
use crate::service::Messaging;
use crate::topics::TopicMeta;

/// Longest client id accepted, in bytes (the brokers' limit).
pub const CLIENT_ID_MAX_BYTES: usize = 255;

/// Who is asking: the client id and language from the request's `x-mq-*` headers.
pub struct Caller {
    pub client_id: String,
    pub python: bool,
}

impl Caller {
    pub fn of(metadata: &tonic::metadata::MetadataMap) -> Caller {
        let text = |key: &str| metadata.get(key).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        Caller { client_id: text("x-mq-client-id"), python: text("x-mq-language").eq_ignore_ascii_case("PYTHON") }
    }

    /// The client id, which lite consumers must send.
    pub fn require_id(&self) -> Result<&str> {
        let id = self.client_id.as_str();
        if id.is_empty() || id.len() > CLIENT_ID_MAX_BYTES || id.chars().any(char::is_control) {
            return Err(ProxyError::BadRequest(format!(
                "a lite consumer must send an x-mq-client-id header of 1..={CLIENT_ID_MAX_BYTES} bytes"
            )));
        }
        Ok(id)
    }
}

/// The lite topic names a request means (see the module comment for the Python client).
pub fn requested_names(action: LiteSubscriptionAction, names: &[String], caller: &Caller) -> Vec<String> {
    let split_name = names.len() >= 2 && names.iter().all(|n| n.chars().count() == 1);
    if caller.python && action == LiteSubscriptionAction::PartialAdd && split_name {
        return vec![names.concat()];
    }
    names.to_vec()
}

/// (start, value) of an offset option, as the brokers take it.
fn start_of(option: Option<&OffsetOption>) -> Result<(u8, u64)> {
    use offset_option::{OffsetType, Policy};
    let Some(kind) = option.and_then(|o| o.offset_type.as_ref()) else { return Ok((LITE_START_LAST, 0)) };
    let non_negative = |v: i64, what: &str| {
        u64::try_from(v).map_err(|_| ProxyError::BadRequest(format!("offset option {what} must not be negative")))
    };
    Ok(match kind {
        OffsetType::Policy(p) => match Policy::try_from(*p) {
            Ok(Policy::Last) => (LITE_START_LAST, 0),
            Ok(Policy::Min) => (LITE_START_MIN, 0),
            Ok(Policy::Max) => (LITE_START_MAX, 0),
            Err(_) => return Err(ProxyError::BadRequest(format!("unknown offset option policy {p}"))),
        },
        OffsetType::Offset(v) => (LITE_START_OFFSET, non_negative(*v, "offset")?),
        OffsetType::TailN(v) => (LITE_START_TAIL, non_negative(*v, "tail_n")?),
        OffsetType::Timestamp(_) => {
            return Err(ProxyError::NotImplemented { what: "a lite subscription starting at a timestamp".into() })
        }
    })
}

/// The LITE topic a lite request names.
async fn lite_topic_meta(this: &Messaging, topic: Option<&Resource>) -> Result<TopicMeta> {
    let topic = topic.ok_or_else(|| ProxyError::BadRequest("topic is required".into()))?;
    let meta = this.topic(&topic.name).await?;
    if meta.message_type != message_type::LITE {
        return Err(ProxyError::BadRequest(format!(
            "{} is a {} topic; lite consumers bind to a LITE topic (`sluice topic create {} --type lite`)",
            meta.name,
            message_type::name(meta.message_type),
            meta.name
        )));
    }
    Ok(meta)
}

/// Every shard holding queues of the topic.
pub fn topic_owners(this: &Messaging, meta: &TopicMeta) -> BTreeSet<Owner> {
    (0..meta.queue_count).map(|i| this.state.brokers.owner(&meta.queue(i))).collect()
}

pub async fn sync(this: &Messaging, request: SyncLiteSubscriptionRequest, caller: &Caller) -> Result<()> {
    let group = group_name(request.group.as_ref())?;
    this.group(&group).await?;
    let client = caller.require_id()?.to_string();
    let meta = lite_topic_meta(this, request.topic.as_ref()).await?;
    let action = LiteSubscriptionAction::try_from(request.action)
        .map_err(|_| ProxyError::BadRequest(format!("unknown lite subscription action {}", request.action)))?;
    let quota = this.state.settings.lite_subscription_quota as usize;
    if request.lite_topic_set.len() > quota {
        return Err(quota_exceeded(quota));
    }
    let names = requested_names(action, &request.lite_topic_set, caller);
    for name in &names {
        check_lite_topic_name(name).map_err(|why| ProxyError::IllegalLiteTopic(format!("{name:?} is {why}")))?;
    }
    let (start, start_value) = start_of(request.offset_option.as_ref())?;
    let owners = topic_owners(this, &meta);
    let mut by_owner: BTreeMap<Owner, Vec<String>> = owners.iter().map(|o| (*o, Vec::new())).collect();
    for name in &names {
        let queue = lite_queue(&meta.name, meta.queue_count, name);
        by_owner.entry(this.state.brokers.owner(&queue)).or_default().push(queue);
    }
    let base = LiteSubscriptionRequest {
        group,
        client_id: client,
        topic: meta.name.clone(),
        action: LITE_ADD,
        queues: Vec::new(),
        start,
        start_value,
    };
    match action {
        LiteSubscriptionAction::PartialAdd => {
            // Counted before adding, across every shard of the topic (the brokers keep the sets).
            let counted = call_each(this, &base, owners.iter().map(|o| (*o, Vec::new()))).await?;
            if counted as usize + names.len() > quota {
                return Err(quota_exceeded(quota));
            }
            call_each(this, &base, by_owner.into_iter().filter(|(_, q)| !q.is_empty())).await?;
        }
        LiteSubscriptionAction::PartialRemove => {
            let remove = LiteSubscriptionRequest { action: LITE_REMOVE, ..base };
            call_each(this, &remove, by_owner.into_iter().filter(|(_, q)| !q.is_empty())).await?;
        }
        LiteSubscriptionAction::CompleteAdd => {
            // Every shard of the topic gets the client's set there, empty ones included.
            let replace = LiteSubscriptionRequest { action: LITE_REPLACE, ..base };
            call_each(this, &replace, by_owner.into_iter()).await?;
        }
        LiteSubscriptionAction::CompleteRemove => {
            let remove_all = LiteSubscriptionRequest { action: LITE_REMOVE_ALL, ..base };
            call_each(this, &remove_all, owners.iter().map(|o| (*o, Vec::new()))).await?;
        }
    }
    Ok(())
}

fn quota_exceeded(quota: usize) -> ProxyError {
    ProxyError::LiteSubscriptionQuota(format!(
        "a client subscribes to at most {quota} lite topics (proxy.lite_subscription_quota)"
    ))
}

/// Sends `base` with each shard's queues to that shard, all at once; the total of the
/// clients' subscriptions the shards report.
async fn call_each(
    this: &Messaging,
    base: &LiteSubscriptionRequest,
    parts: impl Iterator<Item = (Owner, Vec<String>)>,
) -> Result<u64> {
    let calls = parts.map(|(owner, queues)| {
        let request = LiteSubscriptionRequest { queues, ..base.clone() };
        async move { this.state.brokers.call(owner, &request).await }
    });
    let mut total = 0u64;
    for reply in futures::future::join_all(calls).await {
        let frame = reply?;
        total += u64::from(frame.access::<LiteSubscriptionResponse>()?.subscribed.to_native());
    }
    Ok(total)
}

/// A lite consumer said it is going away: its subscriptions on every shard go with it (its
/// group's positions stay). Best effort; brokers also forget clients they stop hearing from.
pub async fn forget_client(this: &Messaging, group: &str, client: &str) {
    let request = LiteSubscriptionRequest {
        group: group.to_string(),
        client_id: client.to_string(),
        topic: String::new(),
        action: LITE_REMOVE_ALL,
        queues: Vec::new(),
        start: LITE_START_LAST,
        start_value: 0,
    };
    let calls = this.state.brokers.all_shards().into_iter().map(|owner| {
        let request = &request;
        async move { this.state.brokers.call(owner, request).await }
    });
    for reply in futures::future::join_all(calls).await {
        if let Err(e) = reply {
            tracing::debug!(error = %e, group, client, "forgetting a lite consumer failed; the broker forgets it when it stays silent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(python: bool) -> Caller {
        Caller { client_id: "c".into(), python }
    }

    fn split(name: &str) -> Vec<String> {
        name.chars().map(String::from).collect()
    }

    #[test]
    fn a_python_partial_add_of_single_characters_is_one_name() {
        let name = "0b6f5d0e-9f3c-4a53-8c1e-2f2d7c0b9a11";
        let add = LiteSubscriptionAction::PartialAdd;
        assert_eq!(requested_names(add, &split(name), &caller(true)), vec![name.to_string()]);
        assert_eq!(requested_names(add, &split(name), &caller(false)), split(name), "other clients are taken as sent");
        let complete = LiteSubscriptionAction::CompleteAdd;
        assert_eq!(requested_names(complete, &split("ab"), &caller(true)), split("ab"), "only PARTIAL_ADD is read so");
        let names = vec!["ab".to_string(), "c".to_string()];
        assert_eq!(requested_names(add, &names, &caller(true)), names, "not every entry is one character");
        assert_eq!(requested_names(add, &split("x"), &caller(true)), vec!["x".to_string()]);
    }
}
