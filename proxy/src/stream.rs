//! Lite topics over plain HTTP, for browsers and simple clients:
//!
//! - `GET /v1/lite/{topic}/{lite}/events` streams the lite topic as Server-Sent Events, one
//!   `message` event per message with `id:` set to its offset, from the first retained message,
//!   or exactly after `Last-Event-ID` (what `EventSource` sends when it reconnects), or from
//!   `?from=OFFSET`. A message carrying the user property `sluice_stream_done=true` is followed by
//!   a `done` event, and the stream closes; a client that resumes right after it gets the `done`
//!   event again at once.
//! - `POST /v1/lite/{topic}/{lite}/messages` appends the request body as one message
//!   (`?done=true` marks the stream done; `?tag=` and `?keys=a,b` as in RocketMQ).
//! - `POST /v1/request/{topic}?reply_topic=R&timeout_ms=N` is request–reply for agents: the
//!   body goes to `topic` with `reply_topic=R` and `reply_to=a2a/{taskId}` (a lite topic of R),
//!   and the answer is the first message there, or 504 after the timeout. It reads the reply
//!   by offset and subscribes nothing, so the reply topic is reclaimed after R's TTL.
//!
//! Reading is by offset, with no consumer group: a stream holds no state on the brokers, and the
//! proxy keeps only the open connection. The brokers hold each read open until the lite topic
//! grows (`ReadRequest::wait_ms`), so an event goes out one broker round trip after its append.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use sluice_transport::messages::{ReadRequest, ReadResponse};
use sluice_transport::model::message_type;
use sluice_transport::model::placement::{check_lite_topic_name, lite_queue};

use crate::convert::{self, Delivery};
use crate::error::ProxyError;
use crate::pb::apache::rocketmq::v2::{self as v2, Code};
use crate::service::Messaging;
use crate::state::ProxyState;
use crate::topics::TopicMeta;

/// The user property that marks the last message of a stream.
pub const STREAM_DONE_PROPERTY: &str = "sluice_stream_done";
/// How long one broker read waits for the lite topic to grow.
const READ_WAIT_MS: u64 = 15_000;
const READ_BATCH_MAX: u32 = 64;
const READ_BYTES_MAX: u32 = 4 << 20;
/// Events buffered per stream before the reader waits for the client.
const EVENTS_BUFFERED: usize = 64;
/// Comment lines keep idle streams open through proxies and load balancers.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How soon an `EventSource` reconnects after losing its stream (its default is ~3 s).
const RECONNECT_AFTER: Duration = Duration::from_millis(500);

#[derive(serde::Deserialize)]
pub struct EventsQuery {
    from: Option<u64>,
}

#[derive(serde::Deserialize)]
pub struct RequestQuery {
    reply_topic: String,
    timeout_ms: Option<u64>,
}

/// Longest wait for a reply over HTTP.
const REPLY_TIMEOUT_MAX_MS: u64 = 300_000;
const REPLY_TIMEOUT_DEFAULT_MS: u64 = 30_000;
/// User properties of a request: where its reply goes (the same as `sluice request`).
pub const REPLY_TOPIC_PROPERTY: &str = "reply_topic";
pub const REPLY_TO_PROPERTY: &str = "reply_to";

#[derive(serde::Deserialize)]
pub struct AppendQuery {
    #[serde(default)]
    done: bool,
    tag: Option<String>,
    keys: Option<String>,
}

/// An HTTP error: a status and a JSON body with the RocketMQ code and what to do.
struct HttpError(StatusCode, Code, String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.1 as i32, "message": self.2 });
        (self.0, axum::Json(body)).into_response()
    }
}

impl From<ProxyError> for HttpError {
    fn from(e: ProxyError) -> HttpError {
        let code = e.code();
        let status = match code {
            Code::TopicNotFound => StatusCode::NOT_FOUND,
            Code::BadRequest | Code::IllegalLiteTopic | Code::MessageBodyEmpty | Code::MessageBodyTooLarge => {
                StatusCode::BAD_REQUEST
            }
            Code::LiteTopicQuotaExceeded | Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError(status, code, e.to_string())
    }
}

pub fn routes(state: Arc<ProxyState>) -> axum::Router {
    use axum::routing::{get, post};
    let body_max = state.settings.max_body_bytes;
    axum::Router::new()
        .route("/v1/lite/{topic}/{lite}/events", get(events))
        .route("/v1/lite/{topic}/{lite}/messages", post(append).layer(axum::extract::DefaultBodyLimit::max(body_max)))
        .route("/v1/request/{topic}", post(request_reply).layer(axum::extract::DefaultBodyLimit::max(body_max)))
        .with_state(state)
}

/// HTTP carries no RocketMQ signature, so these routes are served only with authentication off.
fn check_open(state: &ProxyState) -> Result<(), HttpError> {
    if state.auth.enabled() {
        return Err(HttpError(
            StatusCode::FORBIDDEN,
            Code::Forbidden,
            "the HTTP lite-topic routes are off while access keys are configured; use the gRPC API".into(),
        ));
    }
    Ok(())
}

async fn lite_target(state: &Arc<ProxyState>, topic: &str, lite: &str) -> Result<(TopicMeta, String), HttpError> {
    check_open(state)?;
    check_lite_topic_name(lite)
        .map_err(|why| HttpError::from(ProxyError::IllegalLiteTopic(format!("{lite:?} is {why}"))))?;
    let meta = state.topics.get(&state.brokers, topic).await?;
    if meta.message_type != message_type::LITE {
        return Err(HttpError::from(ProxyError::BadRequest(format!(
            "{topic} is a {} topic, not a LITE topic",
            message_type::name(meta.message_type)
        ))));
    }
    let queue = lite_queue(&meta.name, meta.queue_count, lite);
    Ok((meta, queue))
}

/// Where a stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// At this offset (`?from=`, or the first retained message).
    At(u64),
    /// Just after this offset (`Last-Event-ID`): it is read again only to see whether it
    /// ended the stream.
    After(u64),
}

fn start_of(headers: &HeaderMap, query: &EventsQuery) -> Result<Start, HttpError> {
    match headers.get("last-event-id") {
        Some(value) => {
            value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).map(Start::After).ok_or_else(|| {
                HttpError(StatusCode::BAD_REQUEST, Code::BadRequest, "Last-Event-ID must be an offset".into())
            })
        }
        None => Ok(Start::At(query.from.unwrap_or(0))),
    }
}

/// Browsers may read these routes from pages served elsewhere (they hold no credentials).
fn cross_origin(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, axum::http::HeaderValue::from_static("*"));
    response
}

async fn events(
    State(state): State<Arc<ProxyState>>,
    Path((topic, lite)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, HttpError> {
    let (_meta, queue) = lite_target(&state, &topic, &lite).await?;
    let start = start_of(&headers, &query)?;
    let slot = state.sse_streams.clone().try_acquire_owned().map_err(|_| {
        HttpError(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::TooManyRequests,
            format!(
                "this proxy serves {} event streams at most (proxy.sse_streams_max)",
                state.settings.sse_streams_max
            ),
        )
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(EVENTS_BUFFERED);
    tokio::spawn(async move {
        let _slot = slot;
        tokio::select! {
            () = stream_lite(&state, &queue, start, &tx) => {}
            () = state.shutdown_started() => {}
            () = tx.closed() => {}
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(cross_origin(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()))
}

/// Reads the lite queue from `start` on and sends each message as an event, until a done
/// message, an error, or the client leaving.
async fn stream_lite(
    state: &Arc<ProxyState>,
    queue: &str,
    start: Start,
    tx: &tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
) {
    let (mut from, seen) = match start {
        Start::At(offset) => (offset, None),
        Start::After(offset) => (offset, Some(offset)),
    };
    if tx.send(Ok(Event::default().retry(RECONNECT_AFTER).comment("stream open"))).await.is_err() {
        return;
    }
    loop {
        let read = ReadRequest {
            queue: queue.to_string(),
            from_offset: from,
            max_count: READ_BATCH_MAX,
            max_bytes: READ_BYTES_MAX,
            wait_ms: READ_WAIT_MS,
        };
        let frame = match state.brokers.call_for(queue, &read).await {
            Ok(frame) => frame,
            Err(e) => {
                let _ = tx.send(Ok(Event::default().event("error").data(e.to_string()))).await;
                return;
            }
        };
        let Ok(reply) = frame.access::<ReadResponse>() else {
            let _ = tx.send(Ok(Event::default().event("error").data("the broker's reply did not validate"))).await;
            return;
        };
        if reply.records.is_empty() {
            // Retention may have moved the start past `from`: go on from what is left.
            from = from.max(reply.min_offset.to_native());
            continue;
        }
        let endpoint = state.brokers.shard_endpoint(state.brokers.owner(queue)).to_string();
        for r in reply.records.iter() {
            let offset = r.offset.to_native();
            from = offset + 1;
            let (event, done) = message_event(&r.record, offset, &endpoint);
            // The client has this one already (its Last-Event-ID).
            let resent = seen == Some(offset);
            if !resent && tx.send(Ok(event)).await.is_err() {
                return;
            }
            if done {
                let _ = tx.send(Ok(Event::default().event("done").id(offset.to_string()).data("done"))).await;
                return;
            }
        }
    }
}

/// One message as an SSE event (`data` is JSON), and whether it ends the stream.
fn message_event(record: &[u8], offset: u64, store_host: &str) -> (Event, bool) {
    let (done, data) = message_json(record, offset, store_host);
    let kind = if data.get("error").is_some() { "undecodable" } else { "message" };
    (Event::default().event(kind).id(offset.to_string()).data(data.to_string()), done)
}

/// One stored message as JSON (body as text, or base64 when it is not UTF-8), and whether it
/// ends its stream.
fn message_json(record: &[u8], offset: u64, store_host: &str) -> (bool, serde_json::Value) {
    let delivery = Delivery {
        queue_id: 0,
        offset,
        attempt: 1,
        receipt_handle: String::new(),
        invisible: Duration::ZERO,
        store_host,
    };
    let message = match convert::incoming(record, &delivery) {
        Ok(message) => message,
        Err(e) => return (false, serde_json::json!({ "offset": offset, "error": e.to_string() })),
    };
    let done = message.user_properties.get(STREAM_DONE_PROPERTY).is_some_and(|v| v == "true");
    let system = message.system_properties.clone().unwrap_or_default();
    let mut data = serde_json::json!({
        "offset": offset,
        "message_id": system.message_id,
        "lite_topic": system.lite_topic,
        "tag": system.tag,
        "keys": system.keys,
        "properties": message.user_properties,
    });
    match String::from_utf8(message.body) {
        Ok(text) => data["body"] = text.into(),
        Err(e) => {
            use base64::Engine;
            data["body_base64"] = base64::engine::general_purpose::STANDARD.encode(e.into_bytes()).into();
        }
    }
    (done, data)
}

async fn append(
    State(state): State<Arc<ProxyState>>,
    Path((topic, lite)): Path<(String, String)>,
    Query(query): Query<AppendQuery>,
    body: axum::body::Bytes,
) -> Result<Response, HttpError> {
    let (meta, _queue) = lite_target(&state, &topic, &lite).await?;
    let message_id = hex::encode_upper(rand::random::<[u8; 16]>());
    let mut user_properties = std::collections::HashMap::new();
    if query.done {
        user_properties.insert(STREAM_DONE_PROPERTY.to_string(), "true".to_string());
    }
    let system = v2::SystemProperties {
        message_id: message_id.clone(),
        message_type: v2::MessageType::Lite as i32,
        lite_topic: Some(lite.clone()),
        tag: query.tag.filter(|t| !t.is_empty()),
        keys: query
            .keys
            .map(|k| k.split(',').filter(|k| !k.is_empty()).map(str::to_string).collect())
            .unwrap_or_default(),
        born_timestamp: Some(crate::service::timestamp_now()),
        ..Default::default()
    };
    let message = v2::Message {
        topic: Some(v2::Resource { resource_namespace: String::new(), name: meta.name.clone() }),
        user_properties,
        system_properties: Some(system),
        body: body.to_vec(),
    };
    let offset = send_one(&state, message).await?;
    Ok(cross_origin(axum::Json(serde_json::json!({ "message_id": message_id, "offset": offset })).into_response()))
}

/// Sends one message through the proxy's own send path; its offset, or the error as HTTP.
async fn send_one(state: &Arc<ProxyState>, message: v2::Message) -> Result<i64, HttpError> {
    let this = Messaging { state: state.clone() };
    let reply = crate::produce::send(&this, v2::SendMessageRequest { messages: vec![message] }).await;
    let entry = reply.entries.into_iter().next();
    let status = entry.as_ref().and_then(|e| e.status.clone()).or(reply.status).unwrap_or_default();
    if status.code != Code::Ok as i32 {
        let code = Code::try_from(status.code).unwrap_or(Code::InternalServerError);
        let http = match code {
            Code::TooManyRequests | Code::LiteTopicQuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            Code::InternalServerError | Code::ProxyTimeout => StatusCode::SERVICE_UNAVAILABLE,
            Code::TopicNotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        return Err(HttpError(http, code, status.message));
    }
    Ok(entry.map_or(0, |e| e.offset))
}

async fn request_reply(
    State(state): State<Arc<ProxyState>>,
    Path(topic): Path<String>,
    Query(query): Query<RequestQuery>,
    body: axum::body::Bytes,
) -> Result<Response, HttpError> {
    let timeout_ms = query.timeout_ms.unwrap_or(REPLY_TIMEOUT_DEFAULT_MS).min(REPLY_TIMEOUT_MAX_MS);
    let task_id = hex::encode_upper(rand::random::<[u8; 16]>());
    let reply_to = format!("a2a/{task_id}");
    let (_meta, reply_queue) = lite_target(&state, &query.reply_topic, &reply_to).await?;
    let user_properties = [
        (REPLY_TOPIC_PROPERTY.to_string(), query.reply_topic.clone()),
        (REPLY_TO_PROPERTY.to_string(), reply_to.clone()),
    ]
    .into_iter()
    .collect();
    let request = v2::Message {
        topic: Some(v2::Resource { resource_namespace: String::new(), name: topic }),
        user_properties,
        system_properties: Some(v2::SystemProperties {
            message_id: task_id.clone(),
            born_timestamp: Some(crate::service::timestamp_now()),
            ..Default::default()
        }),
        body: body.to_vec(),
    };
    send_one(&state, request).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() || state.is_shutting_down() {
            return Err(HttpError(
                StatusCode::GATEWAY_TIMEOUT,
                Code::ProxyTimeout,
                format!("no reply on {} / {reply_to} within {timeout_ms} ms", query.reply_topic),
            ));
        }
        let read = ReadRequest {
            queue: reply_queue.clone(),
            from_offset: 0,
            max_count: 1,
            max_bytes: READ_BYTES_MAX,
            wait_ms: (left.as_millis() as u64).min(READ_WAIT_MS),
        };
        let frame = state.brokers.call_for(&reply_queue, &read).await.map_err(ProxyError::from)?;
        let reply = frame.access::<ReadResponse>().map_err(ProxyError::from)?;
        if let Some(r) = reply.records.iter().next() {
            let endpoint = state.brokers.shard_endpoint(state.brokers.owner(&reply_queue)).to_string();
            let (_, data) = message_json(&r.record, r.offset.to_native(), &endpoint);
            let answer = serde_json::json!({ "task_id": task_id, "reply_to": reply_to, "reply": data });
            return Ok(cross_origin(axum::Json(answer).into_response()));
        }
    }
}
