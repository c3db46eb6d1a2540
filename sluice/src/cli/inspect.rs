//! `sluice message get` and `find` (like mqadmin queryMsgById / queryMsgByKey) and
//! `sluice group reset` (resetOffsetByTime), over the admin API.

use std::time::{Duration, SystemTime};

use sluice_proto::sluice::admin::v1 as admin;

use super::client::{admin, check, grpc, Connection};

/// How a reset says where the group goes.
pub enum ResetTarget {
    /// RFC 3339, e.g. 2026-01-01T00:00:00Z.
    Time(String),
    Offset(u64),
}

pub async fn message_get(c: &Connection, topic: &str, message_id: &str) -> Result<(), String> {
    let request = admin::GetMessageRequest { topic: topic.into(), message_id: message_id.into() };
    let reply = admin(c).await?.get_message(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    if reply.messages.is_empty() && !c.json {
        return Err(format!("no message {message_id} in topic {topic} (or retention removed it)"));
    }
    print_found(c, &reply)
}

pub async fn message_find(c: &Connection, topic: &str, key: &str, limit: u32) -> Result<(), String> {
    let request = admin::FindMessagesRequest { topic: topic.into(), key: key.into(), limit };
    let reply = admin(c).await?.find_messages(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    if reply.messages.is_empty() && !c.json {
        println!("no message in {topic} has key {key:?}");
        return Ok(());
    }
    print_found(c, &reply)
}

fn print_found(c: &Connection, reply: &admin::FindMessagesResponse) -> Result<(), String> {
    if c.json {
        let messages: Vec<serde_json::Value> = reply.messages.iter().map(message_json).collect();
        println!("{}", serde_json::json!({ "messages": messages, "truncated": reply.truncated }));
        return Ok(());
    }
    for m in &reply.messages {
        print_message(m);
    }
    if reply.truncated {
        println!("(more messages matched; raise --limit to see them)");
    }
    Ok(())
}

fn time_text(ms: i64) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

fn type_name(t: i32) -> String {
    sluice_proto::apache::rocketmq::v2::MessageType::try_from(t).map_or("UNKNOWN".into(), |t| t.as_str_name().into())
}

fn print_message(m: &admin::MessageInfo) {
    let at = m.offset.map_or_else(
        || "a delay or transaction message, stored before it went into its queue".to_string(),
        |o| format!("offset {o}"),
    );
    println!("message {} in {} (queue {}, {at})", m.message_id, m.topic, m.queue);
    println!("  stored      {} on {}, log position {}", time_text(m.store_time_ms), m.stored_at, m.position);
    println!("  type        {}", type_name(m.message_type));
    let optional = [
        ("tag", m.tag.clone()),
        ("keys", m.keys.join(", ")),
        ("group", m.message_group.clone()),
        ("lite topic", m.lite_topic.clone()),
    ];
    for (name, value) in optional.iter().filter(|(_, v)| !v.is_empty()) {
        println!("  {name:<11} {value}");
    }
    if m.delivery_time_ms > 0 {
        println!("  due         {}", time_text(m.delivery_time_ms));
    }
    let mut properties: Vec<_> = m.properties.iter().map(|(k, v)| format!("{k}={v}")).collect();
    properties.sort();
    if !properties.is_empty() {
        println!("  properties  {}", properties.join(", "));
    }
    let preview = String::from_utf8_lossy(&m.body_preview);
    let more = if (m.body_preview.len() as u32) < m.body_bytes { " …" } else { "" };
    println!("  body        {} bytes: {:?}{more}", m.body_bytes, preview);
    if m.groups.is_empty() {
        println!("  groups      none has consumed this topic");
    }
    for g in &m.groups {
        let attempt = if g.state == "in_flight" { format!(" (attempt {})", g.attempt) } else { String::new() };
        println!("  group       {}: {}{attempt}", g.group, g.state);
    }
}

fn message_json(m: &admin::MessageInfo) -> serde_json::Value {
    let groups: Vec<serde_json::Value> = m
        .groups
        .iter()
        .map(|g| serde_json::json!({ "group": g.group, "state": g.state, "attempt": g.attempt }))
        .collect();
    serde_json::json!({
        "message_id": m.message_id,
        "topic": m.topic,
        "queue": m.queue,
        "offset": m.offset,
        "stored_at": m.stored_at,
        "position": m.position,
        "store_time_ms": m.store_time_ms,
        "tag": m.tag,
        "keys": m.keys,
        "message_type": type_name(m.message_type),
        "message_group": m.message_group,
        "lite_topic": m.lite_topic,
        "delivery_time_ms": m.delivery_time_ms,
        "properties": m.properties,
        "body_bytes": m.body_bytes,
        "body_preview": String::from_utf8_lossy(&m.body_preview),
        "groups": groups,
    })
}

pub async fn group_reset(c: &Connection, group: &str, topic: &str, to: ResetTarget, force: bool) -> Result<(), String> {
    let to = match to {
        ResetTarget::Time(text) => {
            let at = humantime::parse_rfc3339_weak(&text)
                .map_err(|e| format!("--to-time {text:?} is not an RFC 3339 time like 2026-01-01T00:00:00Z: {e}"))?;
            let ms = at.duration_since(SystemTime::UNIX_EPOCH).map_err(|_| "--to-time is before 1970")?.as_millis();
            admin::reset_group_request::To::TimeMs(ms as i64)
        }
        ResetTarget::Offset(offset) => admin::reset_group_request::To::Offset(offset),
    };
    let request = admin::ResetGroupRequest { group: group.into(), topic: topic.into(), to: Some(to), force };
    let reply = admin(c).await?.reset_group(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    if c.json {
        let queues: Vec<serde_json::Value> = reply
            .queues
            .iter()
            .map(|q| {
                serde_json::json!({
                    "queue": q.queue, "from": q.from, "to": q.to,
                    "in_flight_skipped": q.in_flight_skipped, "moved": q.moved,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "group": group, "topic": topic, "reset": reply.reset, "queues": queues }));
        return Ok(());
    }
    println!("{:>6} {:>12} {:>12} {:>18} {:>6}", "QUEUE", "FROM", "TO", "IN FLIGHT BELOW", "MOVED");
    for q in &reply.queues {
        let from = q.from.map_or("-".to_string(), |f| f.to_string());
        let moved = if q.moved { "yes" } else { "no" };
        println!("{:>6} {:>12} {:>12} {:>18} {:>6}", q.queue, from, q.to, q.in_flight_skipped, moved);
    }
    let moved = reply.queues.iter().filter(|q| q.moved).count();
    if reply.reset {
        println!("group {group} on {topic}: reset; deliveries continue from the positions above");
        Ok(())
    } else if moved > 0 {
        Err(format!(
            "partly reset: {moved} of {} queues moved; the others got messages in flight while the reset ran. \
             Run it again (or with --force)",
            reply.queues.len()
        ))
    } else {
        let skipped: u64 = reply.queues.iter().map(|q| q.in_flight_skipped).sum();
        Err(format!(
            "not reset: {skipped} message(s) of group {group} are in flight below the new position; \
             ack them, wait for their invisible time to end, or pass --force (their acks will then fail)"
        ))
    }
}
