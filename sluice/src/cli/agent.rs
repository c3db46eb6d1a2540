//! Request–reply between agents over lite topics: `sluice request` sends a request whose
//! `reply_to` names a lite topic of its own (`a2a/{taskId}` under the reply topic) and waits
//! for the reply there; `sluice reply` serves requests and answers each into its `reply_to`.
//! The requester subscribes before it sends, and unsubscribes when it leaves, so the reply
//! topic has no subscriber afterwards and is reclaimed after the reply topic's TTL.

use std::time::{Duration, Instant};

use sluice_proto::apache::rocketmq::v2;

use super::client::{check, grpc, messaging, new_message_id, print_message, Connection, Messaging};

/// User property naming the LITE topic a reply goes to.
pub const REPLY_TOPIC_PROPERTY: &str = "reply_topic";
/// User property naming the lite topic a reply goes to (`a2a/{taskId}`).
pub const REPLY_TO_PROPERTY: &str = "reply_to";
/// User property of a reply: the request's message id.
pub const IN_REPLY_TO_PROPERTY: &str = "in_reply_to";
/// Longest single long poll while waiting.
const POLL_MAX: Duration = Duration::from_secs(20);
const INVISIBLE: Duration = Duration::from_secs(30);

fn resource(name: &str) -> Option<v2::Resource> {
    Some(v2::Resource { resource_namespace: String::new(), name: name.to_string() })
}

fn as_client<T>(client_id: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = client_id.parse() {
        request.metadata_mut().insert("x-mq-client-id", value);
    }
    request
}

fn receive_request(topic: &str, group: &str, batch: i32, wait: Duration) -> v2::ReceiveMessageRequest {
    v2::ReceiveMessageRequest {
        group: resource(group),
        message_queue: Some(v2::MessageQueue { topic: resource(topic), id: 0, ..Default::default() }),
        filter_expression: Some(v2::FilterExpression { r#type: v2::FilterType::Tag as i32, expression: "*".into() }),
        batch_size: batch,
        invisible_duration: Some(prost_types::Duration { seconds: INVISIBLE.as_secs() as i64, nanos: 0 }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration {
            seconds: wait.as_secs() as i64,
            nanos: wait.subsec_nanos() as i32,
        }),
        attempt_id: None,
    }
}

/// The messages of one ReceiveMessage (empty when none came).
async fn receive(
    client: &mut Messaging,
    request: tonic::Request<v2::ReceiveMessageRequest>,
) -> Result<Vec<v2::Message>, String> {
    let mut stream = client.receive_message(request).await.map_err(grpc)?.into_inner();
    let mut out = Vec::new();
    while let Some(item) = stream.message().await.map_err(grpc)? {
        match item.content {
            Some(v2::receive_message_response::Content::Status(s)) if s.code != v2::Code::MessageNotFound as i32 => {
                check(Some(&s))?
            }
            Some(v2::receive_message_response::Content::Message(m)) => out.push(m),
            _ => {}
        }
    }
    Ok(out)
}

async fn ack(client: &mut Messaging, topic: &str, group: &str, m: &v2::Message) -> Result<(), String> {
    let system = m.system_properties.clone().unwrap_or_default();
    let entry = v2::AckMessageEntry {
        message_id: system.message_id,
        receipt_handle: system.receipt_handle.unwrap_or_default(),
        lite_topic: system.lite_topic,
    };
    let request = v2::AckMessageRequest { group: resource(group), topic: resource(topic), entries: vec![entry] };
    let reply = client.ack_message(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())
}

async fn sync_lite(
    client: &mut Messaging,
    client_id: &str,
    action: v2::LiteSubscriptionAction,
    topic: &str,
    group: &str,
    names: Vec<String>,
) -> Result<(), String> {
    let request = v2::SyncLiteSubscriptionRequest {
        action: action as i32,
        topic: resource(topic),
        group: resource(group),
        lite_topic_set: names,
        version: None,
        offset_option: None,
    };
    let reply = client.sync_lite_subscription(as_client(client_id, request)).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())
}

pub struct RequestOptions {
    /// Where requests go (any topic type the repliers consume).
    pub topic: String,
    /// The LITE topic replies come back on.
    pub reply_topic: String,
    pub group: String,
    pub timeout: Duration,
    pub body: Vec<u8>,
}

/// Sends one request and prints its reply; an error if none comes within the timeout.
pub async fn request(c: &Connection, o: RequestOptions) -> Result<(), String> {
    let mut client = messaging(c).await?;
    let task_id = new_message_id();
    let reply_to = format!("a2a/{task_id}");
    let client_id = format!("sluice-request-{}-{task_id}", std::process::id());
    // Subscribed first: the reply cannot come before the requester listens.
    let subscribe = v2::LiteSubscriptionAction::PartialAdd;
    sync_lite(&mut client, &client_id, subscribe, &o.reply_topic, &o.group, vec![reply_to.clone()]).await?;
    let outcome = exchange(&mut client, &client_id, &task_id, &reply_to, &o).await;
    // The requester is gone: nothing subscribes to the reply topic any more.
    let leave = v2::LiteSubscriptionAction::CompleteRemove;
    let left = sync_lite(&mut client, &client_id, leave, &o.reply_topic, &o.group, Vec::new()).await;
    let message = outcome?;
    left?;
    print_message(c, &message);
    Ok(())
}

async fn exchange(
    client: &mut Messaging,
    client_id: &str,
    task_id: &str,
    reply_to: &str,
    o: &RequestOptions,
) -> Result<v2::Message, String> {
    let mut request = v2::Message {
        topic: resource(&o.topic),
        user_properties: [
            (REPLY_TOPIC_PROPERTY.to_string(), o.reply_topic.clone()),
            (REPLY_TO_PROPERTY.to_string(), reply_to.to_string()),
        ]
        .into_iter()
        .collect(),
        system_properties: Some(v2::SystemProperties {
            message_id: task_id.to_string(),
            body_encoding: v2::Encoding::Identity as i32,
            born_timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            born_host: "sluice-cli".into(),
            ..Default::default()
        }),
        body: Vec::new(),
    };
    request.body.clone_from(&o.body);
    let sent =
        client.send_message(v2::SendMessageRequest { messages: vec![request] }).await.map_err(grpc)?.into_inner();
    for entry in &sent.entries {
        check(entry.status.as_ref())?;
    }
    let deadline = Instant::now() + o.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no reply on {} / {reply_to} within {:?}", o.reply_topic, o.timeout));
        }
        let poll = receive_request(&o.reply_topic, &o.group, 1, left.min(POLL_MAX));
        if let Some(reply) = receive(client, as_client(client_id, poll)).await?.into_iter().next() {
            ack(client, &o.reply_topic, &o.group, &reply).await?;
            return Ok(reply);
        }
    }
}

pub struct ReplyOptions {
    pub topic: String,
    pub group: String,
    /// Requests to answer before exiting; `None` runs until Ctrl-C.
    pub count: Option<usize>,
    /// The reply body; `None` echoes each request's body.
    pub body: Option<String>,
    pub wait: Duration,
}

/// Serves requests: each is answered into its `reply_to` lite topic, then acked.
pub async fn reply(c: &Connection, o: ReplyOptions) -> Result<(), String> {
    let mut client = messaging(c).await?;
    let mut answered = 0usize;
    while o.count.is_none_or(|n| answered < n) {
        let poll = receive_request(&o.topic, &o.group, 16, o.wait);
        let requests = tokio::select! {
            got = receive(&mut client, tonic::Request::new(poll)) => got?,
            _ = super::run::stop_signal() => return Ok(()),
        };
        for request in requests {
            answer(&mut client, &request, &o).await?;
            ack(&mut client, &o.topic, &o.group, &request).await?;
            answered += 1;
            if !c.json {
                eprintln!("answered {}", request.system_properties.as_ref().map_or("", |s| s.message_id.as_str()));
            }
        }
    }
    Ok(())
}

async fn answer(client: &mut Messaging, request: &v2::Message, o: &ReplyOptions) -> Result<(), String> {
    let property = |key: &str| request.user_properties.get(key).cloned().filter(|v| !v.is_empty());
    let request_id = request.system_properties.as_ref().map(|s| s.message_id.clone()).unwrap_or_default();
    let (Some(reply_topic), Some(reply_to)) = (property(REPLY_TOPIC_PROPERTY), property(REPLY_TO_PROPERTY)) else {
        eprintln!("request {request_id} names no {REPLY_TOPIC_PROPERTY}/{REPLY_TO_PROPERTY}: acked without a reply");
        return Ok(());
    };
    let body = match &o.body {
        Some(text) => text.clone().into_bytes(),
        None => request.body.clone(),
    };
    let reply = v2::Message {
        topic: resource(&reply_topic),
        user_properties: [(IN_REPLY_TO_PROPERTY.to_string(), request_id)].into_iter().collect(),
        system_properties: Some(v2::SystemProperties {
            message_id: new_message_id(),
            message_type: v2::MessageType::Lite as i32,
            lite_topic: Some(reply_to),
            body_encoding: v2::Encoding::Identity as i32,
            born_timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            born_host: "sluice-cli".into(),
            ..Default::default()
        }),
        body,
    };
    let sent = client.send_message(v2::SendMessageRequest { messages: vec![reply] }).await.map_err(grpc)?.into_inner();
    for entry in &sent.entries {
        check(entry.status.as_ref())?;
    }
    check(sent.status.as_ref())
}
