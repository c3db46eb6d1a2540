//! What one proxy process holds: broker connections, caches and settings. Nothing durable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Auth;
use crate::renew::Renewals;
use crate::topics::Topics;
use sluice_transport::cluster::BrokerPool;

/// Tunables a deployment sets in the `[proxy]` section; every one is a named limit.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySettings {
    /// Largest message body accepted (RocketMQ's default is 4 MiB).
    pub max_body_bytes: usize,
    /// Most messages in one SendMessage.
    pub send_batch_max: usize,
    /// Most messages one ReceiveMessage returns.
    pub receive_batch_max: u32,
    /// Bytes of message bodies one ReceiveMessage gathers before answering (at least one message).
    pub receive_bytes_max: u32,
    /// Used when a receive does not say how long to wait.
    pub long_poll_default_ms: u64,
    pub long_poll_max_ms: u64,
    /// Used when a receive does not say (auto-renewing PushConsumers).
    pub invisible_default_ms: u64,
    pub invisible_min_ms: u64,
    pub invisible_max_ms: u64,
    /// Deliveries before a PushConsumer sends a message to the dead-letter queue.
    pub max_delivery_attempts: u32,
    /// First retry delay of the consumer backoff policy sent to clients; later attempts wait
    /// 5, 10, 30, 60, 120 … times it, capped at `retry_max_ms` (see `consume::retry_delays_ms`).
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Create a topic (normal, default queue count) the first time it is used.
    pub auto_create_topics: bool,
    /// Record a consumer group the first time it is used (else CONSUMER_GROUP_NOT_FOUND).
    pub auto_create_groups: bool,
    /// Auto-renewed deliveries tracked at most; beyond it new ones are not renewed.
    pub renewals_max: usize,
    /// How long a delivery is renewed at most before the proxy lets it become visible.
    pub renew_max_ms: u64,
    /// Time in-flight calls get to finish after SIGTERM.
    pub drain_timeout_ms: u64,
    /// Address put in routes; empty means the address the client connected to.
    pub advertise: String,
    /// Largest gRPC request decoded.
    pub grpc_max_request_bytes: usize,
    /// Client connections open at once; more wait in the kernel's accept queue.
    pub connections_max: usize,
    /// A new connection must send the HTTP/2 preface within this, or it is closed.
    pub handshake_timeout_ms: u64,
    /// Lite topics one lite consumer (client id) may subscribe to; sent to clients in the
    /// Telemetry settings. Brokers also cap it per shard (`lite_subscriptions_per_client_max`).
    pub lite_subscription_quota: u32,
    /// Server-Sent Event streams (`/v1/lite/.../events`) open at once; more get 503.
    pub sse_streams_max: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            max_body_bytes: 4 << 20,
            send_batch_max: 1024,
            receive_batch_max: 32,
            receive_bytes_max: 16 << 20,
            long_poll_default_ms: 20_000,
            long_poll_max_ms: 30_000,
            invisible_default_ms: 60_000,
            invisible_min_ms: 1_000,
            invisible_max_ms: 12 * 3600 * 1000,
            max_delivery_attempts: 16,
            retry_initial_ms: 1_000,
            retry_max_ms: 60_000,
            auto_create_topics: false,
            auto_create_groups: true,
            renewals_max: 100_000,
            renew_max_ms: 3600 * 1000,
            drain_timeout_ms: 10_000,
            advertise: String::new(),
            grpc_max_request_bytes: 64 << 20,
            connections_max: 10_000,
            handshake_timeout_ms: 10_000,
            lite_subscription_quota: 100_000,
            sse_streams_max: 10_000,
        }
    }
}

impl ProxySettings {
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            (self.max_body_bytes >= 1 && self.max_body_bytes <= 64 << 20, "max_body_bytes must be 1..=64 MiB"),
            (self.grpc_max_request_bytes > self.max_body_bytes, "grpc_max_request_bytes must exceed max_body_bytes"),
            (self.send_batch_max >= 1 && self.send_batch_max <= 1024, "send_batch_max must be 1..=1024"),
            (self.receive_batch_max >= 1 && self.receive_batch_max <= 64, "receive_batch_max must be 1..=64"),
            (self.long_poll_max_ms <= 60_000, "long_poll_max_ms must be at most 60000"),
            (
                self.invisible_min_ms >= 1_000 && self.invisible_min_ms <= self.invisible_max_ms,
                "invisible_min_ms must be >= 1000 and <= invisible_max_ms",
            ),
            (self.max_delivery_attempts >= 1, "max_delivery_attempts must be at least 1"),
            (self.renewals_max <= 10_000_000, "renewals_max must be at most 10,000,000"),
            (self.connections_max >= 1, "connections_max must be at least 1"),
            (self.handshake_timeout_ms >= 100, "handshake_timeout_ms must be at least 100"),
            (
                self.lite_subscription_quota >= 1 && self.lite_subscription_quota <= 1_000_000,
                "lite_subscription_quota must be 1..=1,000,000",
            ),
            (self.sse_streams_max >= 1 && self.sse_streams_max <= 1_000_000, "sse_streams_max must be 1..=1,000,000"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(why.to_string()),
            None => Ok(()),
        }
    }
}

#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub acked: AtomicU64,
    /// Popped but given back unconsumed (a concurrent poll answered first, or the client left).
    pub released: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub renewed: AtomicU64,
    pub transactions_ended: AtomicU64,
    pub transaction_checks_sent: AtomicU64,
    /// Receives that found their group's quota empty (and waited, or were refused).
    pub receives_throttled: AtomicU64,
    /// Sends that found their topic's quota empty (and waited, or were refused).
    pub sends_throttled: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<(String, u64)> {
        [
            ("messages_sent", &self.sent),
            ("messages_received", &self.received),
            ("messages_acked", &self.acked),
            ("messages_released", &self.released),
            ("messages_dead_lettered", &self.dead_lettered),
            ("deliveries_renewed", &self.renewed),
            ("transactions_ended", &self.transactions_ended),
            ("transaction_checks_sent", &self.transaction_checks_sent),
            ("receives_throttled", &self.receives_throttled),
            ("sends_throttled", &self.sends_throttled),
            ("errors", &self.errors),
        ]
        .into_iter()
        .map(|(name, c)| (name.to_string(), c.load(Ordering::Relaxed)))
        .collect()
    }
}

pub struct ProxyState {
    pub brokers: Arc<BrokerPool>,
    pub topics: Topics,
    pub groups: crate::groups::Groups,
    pub auth: Auth,
    /// Who may publish and subscribe where (off unless `[proxy] acl = true`).
    pub acl: crate::acl::Acl,
    pub settings: ProxySettings,
    pub renewals: Renewals,
    /// Producer Telemetry streams, for transaction check-backs.
    pub producers: crate::transactions::Producers,
    pub counters: Counters,
    /// One permit per open Server-Sent Event stream.
    pub sse_streams: Arc<tokio::sync::Semaphore>,
    shutting_down: AtomicBool,
    shutdown_signal: tokio::sync::Notify,
}

impl ProxyState {
    pub fn new(brokers: Arc<BrokerPool>, auth: Auth, acl: crate::acl::Acl, settings: ProxySettings) -> Arc<ProxyState> {
        Arc::new(ProxyState {
            brokers,
            topics: Topics::default(),
            groups: crate::groups::Groups::default(),
            auth,
            acl,
            renewals: Renewals::new(settings.renewals_max),
            producers: crate::transactions::Producers::default(),
            sse_streams: Arc::new(tokio::sync::Semaphore::new(settings.sse_streams_max)),
            settings,
            counters: Counters::default(),
            shutting_down: AtomicBool::new(false),
            shutdown_signal: tokio::sync::Notify::new(),
        })
    }

    /// Long polls answer at once and streams end, so the drain finishes quickly.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shutdown_signal.notify_waiters();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Completes when shutdown begins (at once if it has).
    pub async fn shutdown_started(&self) {
        let notified = self.shutdown_signal.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_shutting_down() {
            return;
        }
        notified.await;
    }

    pub fn long_poll(&self, asked: Option<Duration>) -> Duration {
        let ms = asked.map_or(self.settings.long_poll_default_ms, |d| d.as_millis() as u64);
        Duration::from_millis(ms.min(self.settings.long_poll_max_ms))
    }
}
