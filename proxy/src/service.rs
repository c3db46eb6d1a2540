//! `apache.rocketmq.v2.MessagingService`: the RPCs official clients call. Each answers with a
//! `Status` in its response; RPCs not built yet answer NOT_IMPLEMENTED (50100).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status as GrpcStatus, Streaming};
use tracing::Instrument as _;

use crate::acl::Need;
use crate::consume;
use crate::error::{ok_status, status, ProxyError};
use crate::lite::Caller;
use crate::pb::apache::rocketmq::v2::messaging_service_server::MessagingService;
use crate::pb::apache::rocketmq::v2::*;
use crate::produce;
use crate::spans;
use crate::state::ProxyState;
use crate::topics::TopicMeta;
use crate::transactions;

type GrpcResult<T> = Result<Response<T>, GrpcStatus>;
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, GrpcStatus>> + Send>>;

/// Telemetry replies buffered per client stream.
const TELEMETRY_CHANNEL: usize = 16;

#[derive(Clone)]
pub struct Messaging {
    pub state: Arc<ProxyState>,
}

pub fn duration_of(d: &prost_types::Duration) -> Duration {
    Duration::from_secs(d.seconds.max(0) as u64) + Duration::from_nanos(d.nanos.max(0) as u64)
}

pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

pub fn timestamp_now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

/// The endpoint clients should use to reach this proxy: the configured one, else the one the
/// client says it used, else the socket's local address.
pub fn access_point<T>(state: &ProxyState, request: &Request<T>, claimed: Option<&Endpoints>) -> Endpoints {
    if !state.settings.advertise.is_empty() {
        if let Some((host, port)) = state.settings.advertise.rsplit_once(':') {
            return endpoints(host, port.parse().unwrap_or(0));
        }
    }
    if let Some(claimed) = claimed.filter(|e| !e.addresses.is_empty()) {
        return claimed.clone();
    }
    match request.local_addr() {
        Some(addr) => endpoints(&addr.ip().to_string(), addr.port()),
        None => endpoints("127.0.0.1", 8081),
    }
}

fn endpoints(host: &str, port: u16) -> Endpoints {
    let scheme = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => AddressScheme::IPv4,
        Ok(std::net::IpAddr::V6(_)) => AddressScheme::IPv6,
        Err(_) => AddressScheme::DomainName,
    };
    Endpoints { scheme: scheme as i32, addresses: vec![Address { host: host.to_string(), port: i32::from(port) }] }
}

/// The route entries of a topic: one per queue, all served by this proxy.
pub fn message_queues(state: &ProxyState, meta: &TopicMeta, topic: &Resource, access: &Endpoints) -> Vec<MessageQueue> {
    (0..meta.queue_count)
        .map(|index| {
            let owner = state.brokers.owner(&meta.queue(index));
            MessageQueue {
                topic: Some(topic.clone()),
                id: index as i32,
                permission: Permission::ReadWrite as i32,
                broker: Some(Broker {
                    name: state.brokers.broker_name(owner.broker).to_string(),
                    id: 0,
                    endpoints: Some(access.clone()),
                }),
                accept_message_types: accepted_types(meta.message_type),
            }
        })
        .collect()
}

/// What a topic's queues take, as the route tells clients (they check before sending): a
/// PRIORITY topic also takes NORMAL messages, at priority 0 (clients send priority 0 as NORMAL).
fn accepted_types(topic_type: u8) -> Vec<i32> {
    let mut types = vec![i32::from(topic_type)];
    if topic_type == sluice_transport::model::message_type::PRIORITY {
        types.push(i32::from(sluice_transport::model::message_type::NORMAL));
    }
    types
}

impl Messaging {
    /// Topic metadata, creating the topic when the deployment allows it.
    pub async fn topic(&self, name: &str) -> Result<TopicMeta, ProxyError> {
        match self.state.topics.get(&self.state.brokers, name).await {
            Err(ProxyError::TopicNotFound(_)) if self.state.settings.auto_create_topics => {
                let normal = sluice_transport::model::message_type::NORMAL;
                let (_, meta) = self.state.topics.create(&self.state.brokers, name, normal, 0, 0).await?;
                tracing::info!(topic = name, "created topic on first use (auto_create_topics)");
                Ok(meta)
            }
            other => other,
        }
    }

    /// The group's record, creating it when the deployment allows it.
    pub async fn group(&self, name: &str) -> Result<crate::groups::GroupMeta, ProxyError> {
        let default_attempts = self.state.settings.max_delivery_attempts;
        match self.state.groups.get(&self.state.brokers, name, default_attempts).await {
            Err(ProxyError::GroupNotFound(_)) if self.state.settings.auto_create_groups => {
                let meta = crate::groups::GroupMeta {
                    name: name.to_string(),
                    max_delivery_attempts: default_attempts,
                    fifo: false,
                    max_receive_tps: 0,
                    throttle: crate::groups::Throttle::Wait,
                };
                let (_, meta) = self.state.groups.create(&self.state.brokers, meta).await?;
                Ok(meta)
            }
            other => other,
        }
    }

    /// Authenticates the call, then checks that its key may do what `needs` names (the ACL).
    async fn authorize<T>(&self, request: &Request<T>, needs: &[Need<'_>]) -> Result<(), ProxyError> {
        let key = self.state.auth.check(request.metadata())?;
        self.state.acl.permit(&self.state.brokers, key.as_deref(), needs).await
    }

    /// The client's settings merged with the server's: what a consumer group's delivery
    /// follows (FIFO, retry delays, attempts) comes from the group's record.
    async fn settings_reply(&self, client: &Settings) -> Settings {
        let s = &self.state.settings;
        let mut reply = client.clone();
        let group = match &client.pub_sub {
            Some(settings::PubSub::Subscription(sub)) => match sub.group.as_ref() {
                Some(g) => match self.group(&g.name).await {
                    Ok(meta) => Some(meta),
                    Err(e) => {
                        tracing::debug!(error = %e, group = g.name, "settings for an unknown group");
                        None
                    }
                },
                None => None,
            },
            _ => None,
        };
        let consumer = matches!(client.pub_sub, Some(settings::PubSub::Subscription(_)));
        reply.backoff_policy = Some(if consumer {
            // Explicit steps (the official clients read these), the same ones the brokers
            // apply when a delivery expires.
            let attempts = group.as_ref().map_or(s.max_delivery_attempts, |g| g.max_delivery_attempts);
            let next = consume::retry_delays_ms(&self.state, attempts)
                .into_iter()
                .map(|ms| proto_duration(Duration::from_millis(u64::from(ms))))
                .collect();
            RetryPolicy {
                max_attempts: attempts as i32,
                strategy: Some(retry_policy::Strategy::CustomizedBackoff(CustomizedBackoff { next })),
            }
        } else {
            client.backoff_policy.clone().unwrap_or(RetryPolicy {
                max_attempts: 3,
                strategy: Some(retry_policy::Strategy::ExponentialBackoff(ExponentialBackoff {
                    initial: Some(proto_duration(Duration::from_millis(10))),
                    max: Some(proto_duration(Duration::from_secs(1))),
                    multiplier: 2.0,
                })),
            })
        });
        // Sluice exports no client metrics; `on` would make clients start an exporter.
        reply.metric = Some(Metric { on: false, endpoints: None });
        match &mut reply.pub_sub {
            Some(settings::PubSub::Publishing(publishing)) => {
                publishing.max_body_size = s.max_body_bytes as i32;
                publishing.validate_message_type = true;
            }
            Some(settings::PubSub::Subscription(subscription)) => {
                subscription.fifo = Some(group.as_ref().is_some_and(|g| g.fifo));
                subscription.receive_batch_size = Some(s.receive_batch_max as i32);
                subscription.long_polling_timeout = Some(proto_duration(Duration::from_millis(s.long_poll_default_ms)));
                // Lite consumers refuse to subscribe without both (they read a missing one as 0).
                subscription.lite_subscription_quota = Some(s.lite_subscription_quota as i32);
                subscription.max_lite_topic_size =
                    Some(sluice_transport::model::placement::LITE_TOPIC_MAX_BYTES as i32);
            }
            None => {}
        }
        reply
    }
}

/// Time left before the caller's deadline, from the `grpc-timeout` header (`<digits><unit>`,
/// units H M S m u n, at most 8 digits, as gRPC over HTTP/2 defines it).
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.checked_mul(3600)?),
        "M" => Duration::from_secs(value.checked_mul(60)?),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[tonic::async_trait]
impl MessagingService for Messaging {
    async fn query_route(&self, request: Request<QueryRouteRequest>) -> GrpcResult<QueryRouteResponse> {
        let answer = async {
            let r = request.get_ref();
            self.authorize(&request, &needs([r.topic.as_ref().map(|t| Need::route(&t.name))])).await?;
            let topic =
                request.get_ref().topic.clone().ok_or_else(|| ProxyError::BadRequest("topic is required".into()))?;
            let meta = self.topic(&topic.name).await?;
            let access = access_point(&self.state, &request, request.get_ref().endpoints.as_ref());
            Ok::<_, ProxyError>(message_queues(&self.state, &meta, &topic, &access))
        }
        .await;
        Ok(Response::new(match answer {
            Ok(message_queues) => QueryRouteResponse { status: Some(ok_status()), message_queues },
            Err(e) => QueryRouteResponse { status: Some(e.status()), message_queues: Vec::new() },
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> GrpcResult<HeartbeatResponse> {
        let group = request.get_ref().group.as_ref().map(|g| Need::subscribe_group(&g.name));
        let status = match self.authorize(&request, &needs([group])).await {
            Ok(()) => ok_status(),
            Err(e) => e.status(),
        };
        Ok(Response::new(HeartbeatResponse { status: Some(status) }))
    }

    async fn send_message(&self, request: Request<SendMessageRequest>) -> GrpcResult<SendMessageResponse> {
        let topics = request.get_ref().messages.iter().map(|m| m.topic.as_ref().map(|t| Need::publish(&t.name)));
        if let Err(e) = self.authorize(&request, &needs(topics)).await {
            return Ok(Response::new(SendMessageResponse { status: Some(e.status()), entries: Vec::new() }));
        }
        let span = spans::send(request.metadata(), request.get_ref());
        let response = produce::send(self, request.into_inner()).instrument(span.clone()).await;
        spans::record_send(&span, &response);
        Ok(Response::new(response))
    }

    async fn query_assignment(&self, request: Request<QueryAssignmentRequest>) -> GrpcResult<QueryAssignmentResponse> {
        let answer = async {
            let r = request.get_ref();
            self.authorize(&request, &subscribe(r.topic.as_ref(), r.group.as_ref())).await?;
            let topic =
                request.get_ref().topic.clone().ok_or_else(|| ProxyError::BadRequest("topic is required".into()))?;
            let meta = self.topic(&topic.name).await?;
            let access = access_point(&self.state, &request, request.get_ref().endpoints.as_ref());
            // One assignment serves the whole topic: a receive takes from every queue, so one
            // long-poll loop per topic is all a push consumer needs.
            let mut queues = message_queues(&self.state, &meta, &topic, &access);
            queues.truncate(1);
            Ok::<_, ProxyError>(queues)
        }
        .await;
        Ok(Response::new(match answer {
            Ok(queues) => QueryAssignmentResponse {
                status: Some(ok_status()),
                assignments: queues.into_iter().map(|q| Assignment { message_queue: Some(q) }).collect(),
            },
            Err(e) => QueryAssignmentResponse { status: Some(e.status()), assignments: Vec::new() },
        }))
    }

    type ReceiveMessageStream = ResponseStream<ReceiveMessageResponse>;

    async fn receive_message(&self, request: Request<ReceiveMessageRequest>) -> GrpcResult<Self::ReceiveMessageStream> {
        let r = request.get_ref();
        let topic = r.message_queue.as_ref().and_then(|q| q.topic.as_ref());
        let responses = match self.authorize(&request, &subscribe(topic, r.group.as_ref())).await {
            Ok(()) => {
                let remaining = grpc_timeout(request.metadata());
                let caller = Caller::of(request.metadata());
                let span = spans::receive(request.metadata(), request.get_ref());
                let responses =
                    consume::receive(self, request.into_inner(), remaining, &caller).instrument(span.clone()).await;
                spans::record_receive(&span, &responses);
                responses
            }
            Err(e) => {
                vec![ReceiveMessageResponse { content: Some(receive_message_response::Content::Status(e.status())) }]
            }
        };
        Ok(Response::new(Box::pin(futures::stream::iter(responses.into_iter().map(Ok)))))
    }

    async fn ack_message(&self, request: Request<AckMessageRequest>) -> GrpcResult<AckMessageResponse> {
        let r = request.get_ref();
        if let Err(e) = self.authorize(&request, &subscribe(r.topic.as_ref(), r.group.as_ref())).await {
            return Ok(Response::new(AckMessageResponse { status: Some(e.status()), entries: Vec::new() }));
        }
        let span = spans::ack(request.metadata(), request.get_ref());
        let response = consume::ack(self, request.into_inner()).instrument(span.clone()).await;
        spans::record_ack(&span, &response);
        Ok(Response::new(response))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        request: Request<ForwardMessageToDeadLetterQueueRequest>,
    ) -> GrpcResult<ForwardMessageToDeadLetterQueueResponse> {
        let r = request.get_ref();
        let result = match self.authorize(&request, &subscribe(r.topic.as_ref(), r.group.as_ref())).await {
            Ok(()) => consume::dead_letter(self, request.into_inner()).await,
            Err(e) => Err(e),
        };
        let status = result.map_or_else(|e| e.status(), |()| ok_status());
        Ok(Response::new(ForwardMessageToDeadLetterQueueResponse { status: Some(status) }))
    }

    type PullMessageStream = ResponseStream<PullMessageResponse>;

    async fn pull_message(&self, _request: Request<PullMessageRequest>) -> GrpcResult<Self::PullMessageStream> {
        let reply = PullMessageResponse {
            content: Some(pull_message_response::Content::Status(not_implemented("PullMessage (pull consumers)"))),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(reply)]))))
    }

    async fn update_offset(&self, request: Request<UpdateOffsetRequest>) -> GrpcResult<UpdateOffsetResponse> {
        let r = request.get_ref();
        let topic = r.message_queue.as_ref().and_then(|q| q.topic.as_ref());
        let result = match self.authorize(&request, &subscribe(topic, r.group.as_ref())).await {
            Ok(()) => consume::update_offset(self, request.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(UpdateOffsetResponse { status: Some(result.map_or_else(|e| e.status(), |()| ok_status())) }))
    }

    async fn get_offset(&self, request: Request<GetOffsetRequest>) -> GrpcResult<GetOffsetResponse> {
        let r = request.get_ref();
        let topic = r.message_queue.as_ref().and_then(|q| q.topic.as_ref());
        let result = match self.authorize(&request, &subscribe(topic, r.group.as_ref())).await {
            Ok(()) => consume::get_offset(self, request.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(match result {
            Ok(offset) => GetOffsetResponse { status: Some(ok_status()), offset },
            Err(e) => GetOffsetResponse { status: Some(e.status()), offset: 0 },
        }))
    }

    async fn query_offset(&self, request: Request<QueryOffsetRequest>) -> GrpcResult<QueryOffsetResponse> {
        let topic = request.get_ref().message_queue.as_ref().and_then(|q| q.topic.as_ref());
        let result = match self.authorize(&request, &subscribe(topic, None)).await {
            Ok(()) => consume::query_offset(self, request.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(match result {
            Ok(offset) => QueryOffsetResponse { status: Some(ok_status()), offset },
            Err(e) => QueryOffsetResponse { status: Some(e.status()), offset: 0 },
        }))
    }

    async fn end_transaction(&self, request: Request<EndTransactionRequest>) -> GrpcResult<EndTransactionResponse> {
        let topic = request.get_ref().topic.as_ref().map(|t| Need::publish(&t.name));
        let result = match self.authorize(&request, &needs([topic])).await {
            Ok(()) => transactions::end_transaction(self, request.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(EndTransactionResponse { status: Some(result.map_or_else(|e| e.status(), |()| ok_status())) }))
    }

    type TelemetryStream = ResponseStream<TelemetryCommand>;

    async fn telemetry(&self, request: Request<Streaming<TelemetryCommand>>) -> GrpcResult<Self::TelemetryStream> {
        // The key is checked against each Settings the client sends (what it publishes or
        // subscribes to), so a client refused by the ACL fails at start-up, not at its first call.
        let key = self.state.auth.check(request.metadata());
        let (tx, rx) = tokio::sync::mpsc::channel(TELEMETRY_CHANNEL);
        let mut inbound = request.into_inner();
        let this = self.clone();
        tokio::spawn(async move {
            let key = match key {
                Ok(key) => key,
                Err(e) => {
                    let _ = tx.send(Ok(TelemetryCommand { status: Some(e.status()), command: None })).await;
                    return;
                }
            };
            // A producer's stream is where its transaction checks go; forgotten when it ends.
            let mut producer = ProducerStream { state: this.state.clone(), id: None };
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = this.state.shutdown_started() => return,
                };
                let command = match next {
                    Ok(Some(command)) => command,
                    // The client closed its side or vanished: end this stream, nothing leaks.
                    Ok(None) | Err(_) => return,
                };
                let reply = match command.command {
                    Some(telemetry_command::Command::Settings(settings)) => {
                        let needs = settings_needs(&settings);
                        if let Err(e) = this.state.acl.permit(&this.state.brokers, key.as_deref(), &needs).await {
                            let _ = tx.send(Ok(TelemetryCommand { status: Some(e.status()), command: None })).await;
                            return;
                        }
                        if let Some(settings::PubSub::Publishing(publishing)) = &settings.pub_sub {
                            let topics = crate::transactions::transaction_topics(&this, &publishing.topics).await;
                            producer.id = this.state.producers.register(producer.id, topics, &tx);
                        }
                        TelemetryCommand {
                            status: Some(ok_status()),
                            command: Some(telemetry_command::Command::Settings(this.settings_reply(&settings).await)),
                        }
                    }
                    // Results of commands this proxy never sends: nothing to answer.
                    _ => continue,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn notify_client_termination(
        &self,
        request: Request<NotifyClientTerminationRequest>,
    ) -> GrpcResult<NotifyClientTerminationResponse> {
        let group = request.get_ref().group.as_ref().map(|g| Need::subscribe_group(&g.name));
        let status = self.authorize(&request, &needs([group])).await.map_or_else(|e| e.status(), |()| ok_status());
        let caller = Caller::of(request.metadata());
        let group = request.get_ref().group.as_ref().map(|g| g.name.clone()).unwrap_or_default();
        if status.code == Code::Ok as i32 && !group.is_empty() && caller.require_id().is_ok() {
            // A lite consumer's subscriptions go with it; for other clients this finds nothing.
            crate::lite::forget_client(self, &group, &caller.client_id).await;
        }
        Ok(Response::new(NotifyClientTerminationResponse { status: Some(status) }))
    }

    async fn change_invisible_duration(
        &self,
        request: Request<ChangeInvisibleDurationRequest>,
    ) -> GrpcResult<ChangeInvisibleDurationResponse> {
        let handle = request.get_ref().receipt_handle.clone();
        let r = request.get_ref();
        let result = match self.authorize(&request, &subscribe(r.topic.as_ref(), r.group.as_ref())).await {
            Ok(()) => consume::change_invisible(self, request.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(match result {
            Ok(receipt_handle) => ChangeInvisibleDurationResponse { status: Some(ok_status()), receipt_handle },
            // Clients adopt the returned handle even on failure: give theirs back unchanged.
            Err(e) => ChangeInvisibleDurationResponse { status: Some(e.status()), receipt_handle: handle },
        }))
    }

    async fn recall_message(&self, request: Request<RecallMessageRequest>) -> GrpcResult<RecallMessageResponse> {
        let topic = request.get_ref().topic.as_ref().map(|t| Need::publish(&t.name));
        let result = match self.authorize(&request, &needs([topic])).await {
            Ok(()) => transactions::recall(self, request.into_inner()).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(match result {
            Ok(message_id) => RecallMessageResponse { status: Some(ok_status()), message_id },
            Err(e) => RecallMessageResponse { status: Some(e.status()), message_id: String::new() },
        }))
    }

    async fn sync_lite_subscription(
        &self,
        request: Request<SyncLiteSubscriptionRequest>,
    ) -> GrpcResult<SyncLiteSubscriptionResponse> {
        let caller = Caller::of(request.metadata());
        let r = request.get_ref();
        let result = match self.authorize(&request, &subscribe(r.topic.as_ref(), r.group.as_ref())).await {
            Ok(()) => crate::lite::sync(self, request.into_inner(), &caller).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(SyncLiteSubscriptionResponse {
            status: Some(result.map_or_else(|e| e.status(), |()| ok_status())),
        }))
    }
}

/// Forgets a producer's stream when its Telemetry task ends.
struct ProducerStream {
    state: Arc<ProxyState>,
    id: Option<u64>,
}

impl Drop for ProducerStream {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.state.producers.unregister(id);
        }
    }
}

/// The needs that name something (an empty name is left to the call's own checks).
fn needs<'a>(needs: impl IntoIterator<Item = Option<Need<'a>>>) -> Vec<Need<'a>> {
    needs.into_iter().flatten().filter(|n| !n.name.is_empty()).collect()
}

/// A consumer's call: `sub` on its topic and on its group.
fn subscribe<'a>(topic: Option<&'a Resource>, group: Option<&'a Resource>) -> Vec<Need<'a>> {
    needs([topic.map(|t| Need::subscribe_topic(&t.name)), group.map(|g| Need::subscribe_group(&g.name))])
}

/// What a client's Settings say it will do: publish to its topics, or subscribe as its group.
fn settings_needs(settings: &Settings) -> Vec<Need<'_>> {
    match &settings.pub_sub {
        Some(settings::PubSub::Publishing(p)) => needs(p.topics.iter().map(|t| Some(Need::publish(&t.name)))),
        Some(settings::PubSub::Subscription(s)) => needs(
            s.subscriptions
                .iter()
                .map(|e| e.topic.as_ref().map(|t| Need::subscribe_topic(&t.name)))
                .chain([s.group.as_ref().map(|g| Need::subscribe_group(&g.name))]),
        ),
        None => Vec::new(),
    }
}

fn not_implemented(what: &str) -> crate::pb::apache::rocketmq::v2::Status {
    status(Code::NotImplemented, format!("{what} is not implemented by Sluice yet"))
}
