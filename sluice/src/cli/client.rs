//! The client commands: topic create/list/delete, send, consume, stats. They speak gRPC to a
//! proxy like any RocketMQ client (and the admin API for topics and stats).

use std::collections::HashMap;
use std::io::BufRead;
use std::time::Duration;

use base64::Engine as _;
use sluice_proto::apache::rocketmq::v2;
use sluice_proto::apache::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::sluice::admin::v1 as admin;
use sluice_proto::sluice::admin::v1::admin_client::AdminClient;
use sluice_transport::model::message_type::name as message_type_name;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Largest gRPC message the CLI sends or accepts.
const GRPC_MESSAGE_MAX_BYTES: usize = 64 << 20;
/// Messages per SendMessage when reading stdin.
const SEND_BATCH: usize = 64;
/// Messages asked for per receive.
const RECEIVE_BATCH: i32 = 32;

#[derive(Debug, Clone)]
pub struct Connection {
    pub endpoint: String,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// Connect with TLS (implied by `tls_ca` and by an `https://` endpoint).
    pub tls: bool,
    /// Trust the CA certificates in this PEM file instead of only the system's roots.
    pub tls_ca: Option<std::path::PathBuf>,
    pub json: bool,
}

#[derive(Clone)]
pub struct Signer {
    keys: Option<(String, String)>,
}

impl tonic::service::Interceptor for Signer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let date = sluice_proxy::auth::date_time_now();
        if let Ok(value) = MetadataValue::try_from(date.as_str()) {
            request.metadata_mut().insert("x-mq-date-time", value);
        }
        if let Some((ak, sk)) = &self.keys {
            if let Ok(value) = MetadataValue::try_from(sluice_proxy::auth::sign(ak, sk, &date).as_str()) {
                request.metadata_mut().insert("authorization", value);
            }
        }
        Ok(request)
    }
}

pub(super) type Messaging = MessagingServiceClient<InterceptedService<Channel, Signer>>;
pub(super) type Admin = AdminClient<InterceptedService<Channel, Signer>>;

async fn channel(c: &Connection) -> Result<(Channel, Signer), String> {
    let tls = c.tls || c.tls_ca.is_some() || c.endpoint.starts_with("https://");
    let url = match (c.endpoint.contains("://"), tls) {
        (true, _) => c.endpoint.clone(),
        (false, false) => format!("http://{}", c.endpoint),
        (false, true) => format!("https://{}", c.endpoint),
    };
    let mut endpoint = Channel::from_shared(url.clone())
        .map_err(|e| format!("bad endpoint {:?}: {e}", c.endpoint))?
        .connect_timeout(Duration::from_secs(5));
    if tls {
        endpoint = endpoint.tls_config(client_tls(c.tls_ca.as_deref())?).map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        let hint = if tls {
            "Does the proxy have TLS on, and does --tls-ca name the CA that signed its certificate?"
        } else {
            "Is `sluice local` running? Point at it with --endpoint HOST:PORT (and --tls if the proxy has TLS on)"
        };
        format!("cannot reach Sluice at {}: {}. {hint}", c.endpoint, error_chain(&e))
    })?;
    let keys = match (&c.access_key, &c.secret_key) {
        (Some(a), Some(s)) => Some((a.clone(), s.clone())),
        _ => None,
    };
    Ok((channel, Signer { keys }))
}

/// The system's roots, plus the CA file if one is given.
fn client_tls(ca_file: Option<&std::path::Path>) -> Result<tonic::transport::ClientTlsConfig, String> {
    let config = tonic::transport::ClientTlsConfig::new().with_native_roots();
    let Some(path) = ca_file else { return Ok(config) };
    let pem = std::fs::read(path).map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
    Ok(config.ca_certificate(tonic::transport::Certificate::from_pem(pem)))
}

/// An error with its causes: tonic's top-level "transport error" alone says nothing.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

pub(super) async fn messaging(c: &Connection) -> Result<Messaging, String> {
    let (channel, signer) = channel(c).await?;
    Ok(MessagingServiceClient::with_interceptor(channel, signer)
        .max_decoding_message_size(GRPC_MESSAGE_MAX_BYTES)
        .max_encoding_message_size(GRPC_MESSAGE_MAX_BYTES))
}

pub(super) async fn admin(c: &Connection) -> Result<Admin, String> {
    let (channel, signer) = channel(c).await?;
    Ok(AdminClient::with_interceptor(channel, signer))
}

/// Turns a non-OK status into an error message that names the code.
pub(super) fn check(status: Option<&v2::Status>) -> Result<(), String> {
    let status = status.ok_or("the server sent no status")?;
    if status.code == v2::Code::Ok as i32 {
        return Ok(());
    }
    let name = v2::Code::try_from(status.code).map_or("UNKNOWN".to_string(), |c| c.as_str_name().to_string());
    Err(format!("{} (code {} {name})", status.message, status.code))
}

pub(super) fn grpc(e: tonic::Status) -> String {
    format!("gRPC call failed: {} ({:?})", e.message(), e.code())
}

pub fn parse_type(name: &str) -> Result<v2::MessageType, String> {
    Ok(match name {
        "normal" => v2::MessageType::Normal,
        "fifo" => v2::MessageType::Fifo,
        "delay" => v2::MessageType::Delay,
        "transaction" => v2::MessageType::Transaction,
        "lite" => v2::MessageType::Lite,
        "priority" => v2::MessageType::Priority,
        other => {
            return Err(format!("--type {other:?} is not one of normal, fifo, delay, transaction, lite, priority"))
        }
    })
}

fn topic_json(t: &admin::TopicInfo) -> serde_json::Value {
    serde_json::json!({
        "name": t.name,
        "type": message_type_name(t.message_type as u8),
        "queues": t.queue_count,
        "messages": t.messages,
        "max_send_tps": t.max_send_tps,
        "send_throttle": t.send_throttle,
        "fair_key": t.fair_key,
        "fair_weights": t.fair_weights,
        "fair_default_weight": t.fair_default_weight,
    })
}

/// "; tenants by KEY, weights ..." for a fair topic, "" otherwise.
fn fairness_text(t: &admin::TopicInfo) -> String {
    if t.fair_key.is_empty() {
        return String::new();
    }
    let weights = if t.fair_weights.is_empty() { "none listed".to_string() } else { t.fair_weights.clone() };
    format!("; fair by {:?}, weights {weights}, others {}", t.fair_key, t.fair_default_weight)
}

pub async fn topic_update(c: &Connection, request: admin::UpdateTopicRequest) -> Result<(), String> {
    let mut client = admin(c).await?;
    let reply = client.update_topic(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    let topic = reply.topic.unwrap_or_default();
    if c.json {
        println!("{}", topic_json(&topic));
    } else if topic.max_send_tps == 0 {
        println!("updated topic {}: no send quota{}", topic.name, fairness_text(&topic));
    } else {
        println!(
            "updated topic {}: at most {} messages/s sent ({} when over){}",
            topic.name,
            topic.max_send_tps,
            topic.send_throttle,
            fairness_text(&topic)
        );
    }
    Ok(())
}

/// Creates a topic; `request.message_type` is filled in from `kind`.
pub async fn topic_create(c: &Connection, kind: &str, mut request: admin::CreateTopicRequest) -> Result<(), String> {
    let message_type = parse_type(kind)?;
    request.message_type = message_type as i32;
    let mut client = admin(c).await?;
    let reply = client.create_topic(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    let topic = reply.topic.unwrap_or_default();
    if c.json {
        let mut value = topic_json(&topic);
        value["created"] = reply.created.into();
        println!("{value}");
    } else if reply.created {
        println!(
            "created topic {} ({}, {} queues{})",
            topic.name,
            message_type_name(topic.message_type as u8),
            topic.queue_count,
            fairness_text(&topic)
        );
    } else {
        println!(
            "topic {} already exists ({}, {} queues)",
            topic.name,
            message_type_name(topic.message_type as u8),
            topic.queue_count
        );
    }
    Ok(())
}

pub async fn topic_list(c: &Connection) -> Result<(), String> {
    let mut client = admin(c).await?;
    let reply = client.list_topics(admin::ListTopicsRequest {}).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    if c.json {
        println!("{}", serde_json::Value::Array(reply.topics.iter().map(topic_json).collect()));
        return Ok(());
    }
    if reply.topics.is_empty() {
        println!("no topics; create one with `sluice topic create NAME --type normal`");
        return Ok(());
    }
    println!("{:<40} {:<12} {:>7} {:>12}", "TOPIC", "TYPE", "QUEUES", "MESSAGES");
    for t in &reply.topics {
        println!(
            "{:<40} {:<12} {:>7} {:>12}{}",
            t.name,
            message_type_name(t.message_type as u8),
            t.queue_count,
            t.messages,
            fairness_text(t).replacen("; ", "  ", 1)
        );
    }
    Ok(())
}

pub async fn topic_delete(c: &Connection, name: &str) -> Result<(), String> {
    let mut client = admin(c).await?;
    let reply = client.delete_topic(admin::DeleteTopicRequest { name: name.into() }).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    if c.json {
        println!("{}", serde_json::json!({ "name": name, "deleted": reply.deleted }));
    } else if reply.deleted {
        println!("deleted topic {name}");
    } else {
        println!("topic {name} did not exist");
    }
    Ok(())
}

pub async fn group_create(c: &Connection, request: admin::CreateGroupRequest) -> Result<(), String> {
    let mut client = admin(c).await?;
    let reply = client.create_group(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    let group = reply.group.unwrap_or_default();
    if c.json {
        let mut json = group_json(&group);
        json["created"] = reply.created.into();
        println!("{json}");
    } else if reply.created {
        println!("created {}", describe_group(&group));
    } else {
        println!("{} already exists", describe_group(&group));
    }
    Ok(())
}

pub async fn group_update(c: &Connection, request: admin::UpdateGroupRequest) -> Result<(), String> {
    let mut client = admin(c).await?;
    let reply = client.update_group(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    let group = reply.group.unwrap_or_default();
    if c.json {
        println!("{}", group_json(&group));
    } else {
        println!("updated {}", describe_group(&group));
    }
    Ok(())
}

fn group_json(g: &admin::GroupInfo) -> serde_json::Value {
    serde_json::json!({
        "name": g.name,
        "max_delivery_attempts": g.max_delivery_attempts,
        "fifo": g.fifo,
        "max_receive_tps": g.max_receive_tps,
        "throttle": g.throttle,
    })
}

fn describe_group(g: &admin::GroupInfo) -> String {
    let kind = if g.fifo { "FIFO consumer group" } else { "consumer group" };
    let quota = match g.max_receive_tps {
        0 => String::new(),
        tps => format!(", at most {tps} messages/s ({} when over)", g.throttle),
    };
    format!("{kind} {} (max {} delivery attempts{quota})", g.name, g.max_delivery_attempts)
}

pub async fn group_list(c: &Connection) -> Result<(), String> {
    let mut client = admin(c).await?;
    let reply = client.list_groups(admin::ListGroupsRequest {}).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    if c.json {
        let groups: Vec<serde_json::Value> = reply.groups.iter().map(group_json).collect();
        println!("{}", serde_json::Value::Array(groups));
        return Ok(());
    }
    if reply.groups.is_empty() {
        println!("no consumer groups; create one with `sluice group create NAME`");
        return Ok(());
    }
    println!("{:<40} {:>14} {:>5} {:>12} {:>8}", "GROUP", "MAX ATTEMPTS", "FIFO", "MAX RECV/S", "THROTTLE");
    for g in &reply.groups {
        let (tps, throttle) = match g.max_receive_tps {
            0 => ("-".to_string(), "-"),
            tps => (tps.to_string(), g.throttle.as_str()),
        };
        let fifo = if g.fifo { "yes" } else { "no" };
        println!("{:<40} {:>14} {:>5} {:>12} {:>8}", g.name, g.max_delivery_attempts, fifo, tps, throttle);
    }
    Ok(())
}

pub async fn group_delete(c: &Connection, name: &str) -> Result<(), String> {
    let mut client = admin(c).await?;
    let reply = client.delete_group(admin::DeleteGroupRequest { name: name.into() }).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    if c.json {
        println!("{}", serde_json::json!({ "name": name, "deleted": reply.deleted }));
    } else if reply.deleted {
        println!("deleted consumer group {name}");
    } else {
        println!("consumer group {name} did not exist");
    }
    Ok(())
}

pub struct SendOptions {
    pub topic: String,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub properties: Vec<(String, String)>,
    /// A FIFO message of this message group.
    pub message_group: Option<String>,
    /// A delay message, due this long after it is sent.
    pub delay: Option<Duration>,
}

pub(super) fn new_message_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode_upper(bytes)
}

fn build_message(o: &SendOptions, body: Vec<u8>) -> v2::Message {
    // Unspecified: the topic's own type.
    let (message_type, delivery_timestamp) = match (&o.message_group, o.delay) {
        (Some(_), _) => (v2::MessageType::Fifo as i32, None),
        (None, Some(delay)) => {
            (v2::MessageType::Delay as i32, Some(prost_types::Timestamp::from(std::time::SystemTime::now() + delay)))
        }
        (None, None) => (v2::MessageType::Unspecified as i32, None),
    };
    v2::Message {
        topic: Some(v2::Resource { resource_namespace: String::new(), name: o.topic.clone() }),
        user_properties: o.properties.iter().cloned().collect::<HashMap<_, _>>(),
        system_properties: Some(v2::SystemProperties {
            tag: o.tag.clone(),
            keys: o.keys.clone(),
            message_id: new_message_id(),
            body_encoding: v2::Encoding::Identity as i32,
            message_type,
            message_group: o.message_group.clone(),
            delivery_timestamp,
            born_timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            born_host: "sluice-cli".into(),
            ..Default::default()
        }),
        body,
    }
}

async fn send_batch(client: &mut Messaging, c: &Connection, messages: Vec<v2::Message>) -> Result<usize, String> {
    let count = messages.len();
    let reply = client.send_message(v2::SendMessageRequest { messages }).await.map_err(grpc)?.into_inner();
    for entry in &reply.entries {
        check(entry.status.as_ref())?;
        if c.json {
            println!(
                "{}",
                serde_json::json!({
                    "message_id": entry.message_id,
                    "offset": entry.offset,
                    "recall_handle": (!entry.recall_handle.is_empty()).then_some(&entry.recall_handle),
                })
            );
        } else if !entry.recall_handle.is_empty() {
            println!("sent {} (delayed; recall handle {})", entry.message_id, entry.recall_handle);
        } else {
            println!("sent {} (offset {})", entry.message_id, entry.offset);
        }
    }
    check(reply.status.as_ref())?;
    Ok(count)
}

/// Sends each argument as a message, or each line of stdin when there are none.
pub async fn send(c: &Connection, o: SendOptions, bodies: Vec<String>) -> Result<(), String> {
    let mut client = messaging(c).await?;
    let mut sent = 0;
    if !bodies.is_empty() {
        let messages = bodies.into_iter().map(|b| build_message(&o, b.into_bytes())).collect();
        sent += send_batch(&mut client, c, messages).await?;
    } else {
        let mut batch = Vec::new();
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| format!("reading stdin: {e}"))?;
            batch.push(build_message(&o, line.into_bytes()));
            if batch.len() == SEND_BATCH {
                sent += send_batch(&mut client, c, std::mem::take(&mut batch)).await?;
            }
        }
        if !batch.is_empty() {
            sent += send_batch(&mut client, c, batch).await?;
        }
    }
    if !c.json {
        eprintln!("{sent} message(s) sent to {}", o.topic);
    }
    Ok(())
}

pub struct ConsumeOptions {
    pub topic: String,
    pub group: String,
    pub tag: String,
    /// An SQL92 filter over user properties, instead of the tag filter.
    pub sql: Option<String>,
    pub count: Option<usize>,
    pub follow: bool,
    pub wait: Duration,
    pub invisible: Duration,
    pub ack: bool,
}

pub(super) fn print_message(c: &Connection, m: &v2::Message) {
    let system = m.system_properties.clone().unwrap_or_default();
    if c.json {
        let mut value = serde_json::json!({
            "message_id": system.message_id,
            "topic": m.topic.as_ref().map(|t| t.name.clone()),
            "tag": system.tag,
            "keys": system.keys,
            "properties": m.user_properties,
            "delivery_attempt": system.delivery_attempt,
            "lite_topic": system.lite_topic,
            "queue_id": system.queue_id,
            "offset": system.queue_offset,
        });
        match std::str::from_utf8(&m.body) {
            Ok(text) => value["body"] = text.into(),
            Err(_) => value["body_base64"] = base64::engine::general_purpose::STANDARD.encode(&m.body).into(),
        }
        println!("{value}");
    } else {
        let body = String::from_utf8_lossy(&m.body);
        let tag = system.tag.unwrap_or_default();
        println!(
            "[{} q{} #{} attempt {}] {}{}",
            system.message_id,
            system.queue_id,
            system.queue_offset.unwrap_or(0),
            system.delivery_attempt.unwrap_or(1),
            if tag.is_empty() { String::new() } else { format!("<{tag}> ") },
            body
        );
    }
}

/// Receives and acks until `count` messages, or until a poll comes back empty (unless
/// following, which runs until Ctrl-C).
pub async fn consume(c: &Connection, o: ConsumeOptions) -> Result<(), String> {
    let mut client = messaging(c).await?;
    let group = v2::Resource { resource_namespace: String::new(), name: o.group.clone() };
    let topic = v2::Resource { resource_namespace: String::new(), name: o.topic.clone() };
    let mut received = 0usize;
    loop {
        if o.count.is_some_and(|n| received >= n) {
            break;
        }
        let want = o.count.map_or(RECEIVE_BATCH, |n| ((n - received) as i32).min(RECEIVE_BATCH));
        let request = v2::ReceiveMessageRequest {
            group: Some(group.clone()),
            message_queue: Some(v2::MessageQueue { topic: Some(topic.clone()), id: 0, ..Default::default() }),
            filter_expression: Some(match &o.sql {
                Some(sql) => v2::FilterExpression { r#type: v2::FilterType::Sql as i32, expression: sql.clone() },
                None => v2::FilterExpression { r#type: v2::FilterType::Tag as i32, expression: o.tag.clone() },
            }),
            batch_size: want,
            invisible_duration: Some(prost_types::Duration { seconds: o.invisible.as_secs() as i64, nanos: 0 }),
            auto_renew: false,
            long_polling_timeout: Some(prost_types::Duration {
                seconds: o.wait.as_secs() as i64,
                nanos: o.wait.subsec_nanos() as i32,
            }),
            attempt_id: None,
        };
        let receive = client.receive_message(request);
        let mut stream = tokio::select! {
            reply = receive => reply.map_err(grpc)?.into_inner(),
            _ = super::run::stop_signal() => return Ok(()),
        };
        let mut batch = Vec::new();
        while let Some(item) = stream.message().await.map_err(grpc)? {
            match item.content {
                Some(v2::receive_message_response::Content::Status(status))
                    if status.code != v2::Code::MessageNotFound as i32 =>
                {
                    check(Some(&status))?;
                }
                Some(v2::receive_message_response::Content::Message(m)) => batch.push(m),
                _ => {}
            }
        }
        if batch.is_empty() && !o.follow {
            break;
        }
        let mut entries = Vec::new();
        for m in &batch {
            print_message(c, m);
            let system = m.system_properties.clone().unwrap_or_default();
            entries.push(v2::AckMessageEntry {
                message_id: system.message_id,
                receipt_handle: system.receipt_handle.unwrap_or_default(),
                lite_topic: None,
            });
        }
        received += batch.len();
        if o.ack && !entries.is_empty() {
            let reply = client
                .ack_message(v2::AckMessageRequest { group: Some(group.clone()), topic: Some(topic.clone()), entries })
                .await
                .map_err(grpc)?
                .into_inner();
            for entry in &reply.entries {
                check(entry.status.as_ref()).map_err(|e| format!("acking {}: {e}", entry.message_id))?;
            }
            check(reply.status.as_ref())?;
        }
    }
    if !c.json {
        eprintln!("{received} message(s) received{}", if o.ack { " and acked" } else { " (not acked)" });
    }
    Ok(())
}
