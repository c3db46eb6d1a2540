//! The TOML files of `sluice broker --config` and `sluice proxy --config`. Flags and
//! environment variables override what the file says (see `main.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_engine::broker::{BrokerConfig, BrokerLimits};
use sluice_engine::{Durability, EngineConfig};
use sluice_proxy::server::ProxyConfig;
use sluice_proxy::state::ProxySettings;
use sluice_proxy::tls::TlsFiles;
use sluice_transport::cluster::BrokerAddress;
use sluice_transport::peer_auth::PeerSecret;
use sluice_transport::TransportConfig;

/// The metrics' `cluster` label unless a config names one (RocketMQ's default cluster name).
pub const DEFAULT_CLUSTER: &str = "DefaultCluster";

/// Largest priority backlog a group may keep per queue (each message is about 100 bytes).
const PRIORITY_BACKLOG_MAX: usize = 1_000_000;

/// Transport limits a deployment may change; everything else keeps the transport's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSection {
    pub max_frame_bytes: Option<u64>,
    pub credits: Option<u32>,
    pub connect_timeout_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub silence_probe_ms: Option<u64>,
    pub dead_link_timeout_ms: Option<u64>,
    /// Where each RDMA link's poller runs: "runtime" (default: a task on the broker shard's
    /// executor and on the proxy's runtime) or "thread" (a thread per link).
    pub rdma_poll: Option<String>,
    /// How long an idle RDMA poller busy-polls before it parks, at least (µs, default 50).
    pub rdma_busy_poll_us: Option<u32>,
    /// The most it busy-polls (µs, default 1000): the budget adapts up to this to spin through
    /// a link's short gaps. Where cores are shared, lower both: every spinning poller holds a CPU.
    pub rdma_busy_poll_max_us: Option<u32>,
    /// The cluster's shared secret (16 bytes or more): brokers refuse peers that cannot prove
    /// it, proxies prove it. The same file on every broker and proxy.
    pub secret_file: Option<PathBuf>,
}

impl TransportSection {
    pub fn apply(&self) -> Result<TransportConfig, String> {
        let mut t = TransportConfig::default();
        let fields = [
            (self.max_frame_bytes, &mut t.max_frame_bytes),
            (self.connect_timeout_ms, &mut t.connect_timeout_ms),
            (self.request_timeout_ms, &mut t.request_timeout_ms),
            (self.idle_timeout_ms, &mut t.idle_timeout_ms),
            (self.drain_timeout_ms, &mut t.drain_timeout_ms),
            (self.silence_probe_ms, &mut t.silence_probe_ms),
            (self.dead_link_timeout_ms, &mut t.dead_link_timeout_ms),
        ];
        for (value, slot) in fields {
            if let Some(v) = value {
                *slot = v;
            }
        }
        if let Some(c) = self.credits {
            t.credits = c;
        }
        if let Some(us) = self.rdma_busy_poll_us {
            t.rdma.busy_poll_us = us;
        }
        if let Some(us) = self.rdma_busy_poll_max_us {
            t.rdma.busy_poll_max_us = us;
        }
        if let Some(mode) = &self.rdma_poll {
            t.rdma.poll_mode = mode.parse().map_err(|e| format!("[transport] rdma_poll: {e}"))?;
        }
        if let Some(path) = &self.secret_file {
            t.secret = Some(PeerSecret::from_file(path).map_err(|e| e.to_string())?);
        }
        Ok(t)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    pub name: String,
    /// Record metrics at all (`false` is for measuring their cost; `sluice local` follows this).
    pub metrics: bool,
    /// The `cluster` label of this broker's metrics.
    pub cluster: String,
    /// Where `GET /metrics` is served (Prometheus text); empty turns it off.
    pub metrics_listen: String,
    /// Shard 0's address; shard i listens on port + i.
    pub listen: SocketAddr,
    pub rdma_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// 0 means one per core.
    pub shards: usize,
    pub pin_shards: bool,
    /// "sync" or "async".
    pub durability: String,
    pub flush_interval_ms: u64,
    pub segment_size_bytes: Option<u64>,
    /// A half message is first checked with its producer this long after it was stored.
    pub transaction_check_first_ms: Option<u64>,
    /// Transaction checks then repeat at doubling intervals up to this one.
    pub transaction_check_interval_max_ms: Option<u64>,
    /// Unanswered checks after which a half message is discarded.
    pub transaction_checks_max: Option<u32>,
    /// Unacked deliveries one group may hold on one queue.
    pub leases_per_group_queue_max: Option<usize>,
    /// FIFO messages one group may have waiting behind their message group on one queue.
    pub fifo_waiting_per_group_queue_max: Option<usize>,
    pub priority_backlog_per_group_queue_max: Option<usize>,
    /// Lite topics one lite consumer may subscribe to on one shard.
    pub lite_subscriptions_per_client_max: Option<usize>,
    /// A lite consumer silent (no poll, no subscription sync) this long is forgotten.
    pub lite_client_idle_ms: Option<u64>,
    /// Lite consumers (client ids) one consumer group may have on one shard.
    pub lite_clients_per_group_max: Option<usize>,
    /// Memory per shard for just-written log batches, so fresh records are read without I/O.
    pub log_tail_cache_bytes: Option<usize>,
    /// Log kept written with zeros ahead of its end while a shard is idle (0: off).
    pub log_zero_ahead_bytes: Option<u64>,
    /// A queue (a lite topic, say) not appended to for this long leaves memory; 0 keeps all.
    pub queue_idle_evict_ms: Option<u64>,
    /// Free space each shard keeps on its file system; below it, sends get a retryable error.
    pub disk_free_min_bytes: Option<u64>,
    /// Queues (topic queues and lite topics) one shard holds; a send that needs one more fails.
    pub queues_per_shard_max: Option<usize>,
    /// Bytes of appends a shard holds before they are durable; later sends wait for room.
    pub append_inflight_max_bytes: Option<u64>,
    /// Longest such wait; then the send gets a retryable TOO_MANY_REQUESTS.
    pub append_wait_max_ms: Option<u64>,
    /// Serve peers that prove no transport secret on an address other hosts can reach. Off:
    /// such a broker refuses to start without `[transport] secret_file`.
    pub allow_unauthenticated_peers: bool,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection {
            name: "broker".into(),
            metrics: true,
            cluster: DEFAULT_CLUSTER.into(),
            metrics_listen: "127.0.0.1:5557".into(),
            listen: "127.0.0.1:7400".parse().expect("literal address"),
            rdma_listen: None,
            data_dir: PathBuf::from("./data"),
            shards: 0,
            pin_shards: true,
            durability: "sync".into(),
            flush_interval_ms: 10,
            segment_size_bytes: None,
            transaction_check_first_ms: None,
            transaction_check_interval_max_ms: None,
            transaction_checks_max: None,
            leases_per_group_queue_max: None,
            fifo_waiting_per_group_queue_max: None,
            priority_backlog_per_group_queue_max: None,
            lite_subscriptions_per_client_max: None,
            lite_client_idle_ms: None,
            lite_clients_per_group_max: None,
            log_tail_cache_bytes: None,
            log_zero_ahead_bytes: None,
            queue_idle_evict_ms: None,
            disk_free_min_bytes: None,
            queues_per_shard_max: None,
            append_inflight_max_bytes: None,
            append_wait_max_ms: None,
            allow_unauthenticated_peers: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerFile {
    pub broker: BrokerSection,
    pub transport: TransportSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessKey {
    pub access_key: String,
    pub secret_key: String,
    /// Skips the ACL, and alone may use the admin API (`sluice topic`, `group`, `acl`) while it is on.
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySection {
    pub name: String,
    /// Record metrics and serve `/metrics` on the HTTP port.
    pub metrics: bool,
    /// The `cluster` label of this proxy's metrics.
    pub cluster: String,
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
    /// Shard-0 addresses of the brokers, `host:port`.
    pub brokers: Vec<String>,
    /// tcp, rdma or auto.
    pub transport: String,
    pub access_keys: Vec<AccessKey>,
    /// Per-topic and per-group access control for the access keys, with rules kept on the
    /// brokers and managed by `sluice acl`; needs access keys and an admin key.
    pub acl: bool,
    /// PEM certificate chain for TLS on the gRPC and HTTP ports; with `tls_key_file`, TLS is on.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub tls_key_file: Option<PathBuf>,
    #[serde(flatten)]
    pub settings: ProxySettings,
}

impl Default for ProxySection {
    fn default() -> Self {
        ProxySection {
            name: "proxy".into(),
            metrics: true,
            cluster: DEFAULT_CLUSTER.into(),
            grpc: "127.0.0.1:8081".parse().expect("literal address"),
            http: None,
            brokers: vec!["127.0.0.1:7400".into()],
            transport: "tcp".into(),
            access_keys: Vec::new(),
            acl: false,
            tls_cert_file: None,
            tls_key_file: None,
            settings: ProxySettings::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyFile {
    pub proxy: ProxySection,
    pub transport: TransportSection,
}

pub fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{} is not a valid config: {e}", path.display()))
}

pub fn durability(name: &str, flush_interval_ms: u64) -> Result<Durability, String> {
    match name {
        "sync" => Ok(Durability::Sync),
        "async" => Ok(Durability::Async { flush_interval_ms }),
        other => Err(format!("durability {other:?} is not sync or async")),
    }
}

impl BrokerSection {
    /// The metrics address, or none when metrics are off or `metrics_listen` is empty.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, String> {
        if !self.metrics || self.metrics_listen.is_empty() {
            return Ok(None);
        }
        self.metrics_listen
            .parse()
            .map(Some)
            .map_err(|e| format!("metrics_listen {:?} is not host:port: {e}", self.metrics_listen))
    }

    pub fn to_config(&self, transport: &TransportSection) -> Result<BrokerConfig, String> {
        let mut engine = EngineConfig::new(&self.data_dir);
        if self.shards > 0 {
            engine.shard_count = self.shards;
        }
        engine.pin_shards = self.pin_shards;
        engine.durability = durability(&self.durability, self.flush_interval_ms)?;
        if let Some(bytes) = self.segment_size_bytes {
            engine.segment_size_bytes = bytes;
            // A record must fit in a segment with its framing.
            engine.record_size_max_bytes = engine.record_size_max_bytes.min(bytes / 2);
        }
        if let Some(bytes) = self.log_tail_cache_bytes {
            engine.log_tail_cache_bytes = bytes;
        }
        if let Some(bytes) = self.log_zero_ahead_bytes {
            engine.log_zero_ahead_bytes = bytes;
        }
        if let Some(ms) = self.queue_idle_evict_ms {
            engine.queue_idle_evict_ms = ms;
        }
        if let Some(bytes) = self.disk_free_min_bytes {
            engine.disk_free_min_bytes = bytes;
        }
        if let Some(max) = self.queues_per_shard_max {
            engine.queues_per_shard_max = max;
        }
        if let Some(bytes) = self.append_inflight_max_bytes {
            engine.append_inflight_max_bytes = bytes;
        }
        if let Some(ms) = self.append_wait_max_ms {
            engine.append_wait_max_ms = ms;
        }
        engine.validate().map_err(|e| format!("engine settings: {e}"))?;
        let transport = transport.apply()?;
        transport.validate().map_err(|e| format!("transport settings: {e}"))?;
        self.check_exposure(&transport)?;
        let limits = self.limits(transport.max_frame_bytes)?;
        Ok(BrokerConfig {
            name: self.name.clone(),
            engine,
            transport,
            listen: self.listen,
            rdma_listen: self.rdma_listen,
            limits,
        })
    }
}

impl BrokerSection {
    /// Anyone who reaches a broker's transport port can read and write every message, so a
    /// port other hosts can reach needs the transport secret (or an explicit opt-out).
    fn check_exposure(&self, transport: &TransportConfig) -> Result<(), String> {
        if transport.secret.is_some() || self.allow_unauthenticated_peers {
            return Ok(());
        }
        let exposed = std::iter::once(("listen", self.listen))
            .chain(self.rdma_listen.map(|a| ("rdma_listen", a)))
            .find(|(_, addr)| !addr.ip().is_loopback());
        match exposed {
            None => Ok(()),
            Some((key, addr)) => Err(format!(
                "broker.{key} = {addr} can be reached from other hosts, and without a transport secret anyone \
                 who reaches it can read and write every message. Give every broker and proxy the same \
                 secret file ([transport] secret_file, or --transport-secret-file; make one with \
                 `head -c 32 /dev/urandom | base64 > transport.secret`), or set \
                 broker.allow_unauthenticated_peers = true on a network only proxies reach"
            )),
        }
    }

    fn limits(&self, max_frame_bytes: u64) -> Result<BrokerLimits, String> {
        let d = BrokerLimits::default();
        let limits = BrokerLimits {
            max_frame_bytes,
            transaction_check_first_ms: self.transaction_check_first_ms.unwrap_or(d.transaction_check_first_ms),
            transaction_check_interval_max_ms: self
                .transaction_check_interval_max_ms
                .unwrap_or(d.transaction_check_interval_max_ms),
            transaction_checks_max: self.transaction_checks_max.unwrap_or(d.transaction_checks_max),
            leases_per_group_queue_max: self.leases_per_group_queue_max.unwrap_or(d.leases_per_group_queue_max),
            fifo_waiting_per_group_queue_max: self
                .fifo_waiting_per_group_queue_max
                .unwrap_or(d.fifo_waiting_per_group_queue_max),
            priority_backlog_per_group_queue_max: self
                .priority_backlog_per_group_queue_max
                .unwrap_or(d.priority_backlog_per_group_queue_max),
            lite_subscriptions_per_client_max: self
                .lite_subscriptions_per_client_max
                .unwrap_or(d.lite_subscriptions_per_client_max),
            lite_client_idle_ms: self.lite_client_idle_ms.unwrap_or(d.lite_client_idle_ms),
            lite_clients_per_group_max: self.lite_clients_per_group_max.unwrap_or(d.lite_clients_per_group_max),
            ..d
        };
        let checks = [
            (limits.transaction_check_first_ms >= 100, "transaction_check_first_ms must be at least 100"),
            (
                limits.transaction_check_interval_max_ms >= limits.transaction_check_first_ms,
                "transaction_check_interval_max_ms must be at least transaction_check_first_ms",
            ),
            (limits.transaction_checks_max >= 1, "transaction_checks_max must be at least 1"),
            (limits.leases_per_group_queue_max >= 1, "leases_per_group_queue_max must be at least 1"),
            (limits.fifo_waiting_per_group_queue_max >= 1, "fifo_waiting_per_group_queue_max must be at least 1"),
            (
                (1..=PRIORITY_BACKLOG_MAX).contains(&limits.priority_backlog_per_group_queue_max),
                "priority_backlog_per_group_queue_max must be 1..=1000000",
            ),
            (limits.lite_subscriptions_per_client_max >= 1, "lite_subscriptions_per_client_max must be at least 1"),
            (limits.lite_client_idle_ms >= 1_000, "lite_client_idle_ms must be at least 1000"),
            (limits.lite_clients_per_group_max >= 1, "lite_clients_per_group_max must be at least 1"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(format!("broker settings: {why}")),
            None => Ok(limits),
        }
    }
}

/// `sluice local --config FILE`: both roles' sections in one file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalFile {
    pub broker: BrokerSection,
    pub proxy: ProxySection,
    pub transport: TransportSection,
}

impl ProxySection {
    pub fn to_config(&self, transport: &TransportSection) -> Result<ProxyConfig, String> {
        self.settings.validate()?;
        if self.brokers.is_empty() {
            return Err("proxy.brokers lists no broker; add \"host:port\" of each broker's shard 0".into());
        }
        let mut access_keys = std::collections::HashMap::new();
        for key in &self.access_keys {
            if key.access_key.is_empty() || key.secret_key.is_empty() {
                return Err("access keys need both access_key and secret_key".into());
            }
            access_keys.insert(key.access_key.clone(), key.secret_key.clone());
        }
        let admin_keys = self.access_keys.iter().filter(|k| k.admin).map(|k| k.access_key.clone()).collect();
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert_file), Some(key_file)) => {
                Some(TlsFiles { cert_file: cert_file.clone(), key_file: key_file.clone() })
            }
            (None, None) => None,
            _ => {
                return Err(
                    "TLS needs both proxy.tls_cert_file and proxy.tls_key_file (--tls-cert and --tls-key)".into()
                )
            }
        };
        Ok(ProxyConfig {
            name: self.name.clone(),
            grpc: self.grpc,
            http: self.http,
            brokers: self.brokers.iter().cloned().map(BrokerAddress::Base).collect(),
            transport_scheme: self.transport.clone(),
            transport: transport.apply()?,
            settings: self.settings.clone(),
            access_keys,
            acl: self.acl,
            admin_keys,
            metrics: None,
            tls,
        })
    }
}
