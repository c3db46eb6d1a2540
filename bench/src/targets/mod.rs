//! The systems a workload runs against, behind one producer/consumer interface.
//!
//! A target spec on the command line is `KIND[@LABEL][=ENDPOINT]`, e.g.
//! `sluice-grpc=127.0.0.1:8081`, `sluice-broker@rdma=rdma://10.0.0.1:9000`, `raw-tcp`.

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::workload::{DurabilityLevel, TopicKind, Workload, MESSAGE_HEADER_BYTES};

pub mod nats;
pub mod pingpong;
pub mod redis;
mod redis_lite;
pub mod sessions;
pub mod sluice_broker;
pub mod sluice_grpc;
pub mod sluice_lite;

/// Longest a consumer's receive waits for a message before returning empty.
pub const RECEIVE_WAIT_MS: u64 = 1000;
/// Most messages one receive asks for, the same for every target: 32 is what the proxy hands
/// out per receive by default (`receive_batch_max`), as RocketMQ's clients ask for.
pub const RECEIVE_BATCH_MAX: u32 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// The floor: a raw TCP ping-pong with no framing, against an echo server in this process.
    RawTcp,
    /// Ping-pong over Sluice's transport (Echo frames) against a broker's shard.
    Transport,
    /// Straight to the broker over the transport (append, pop, ack): no proxy, no gRPC.
    SluiceBroker,
    /// Through the proxy with the RocketMQ v2 gRPC API, as the official SDKs do.
    SluiceGrpc,
    /// NATS JetStream (async-nats).
    Nats,
    /// Redis Streams (XADD, XREADGROUP, XACK).
    Redis,
}

pub const TARGET_KINDS: [TargetKind; 6] = [
    TargetKind::RawTcp,
    TargetKind::Transport,
    TargetKind::SluiceBroker,
    TargetKind::SluiceGrpc,
    TargetKind::Nats,
    TargetKind::Redis,
];

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::RawTcp => "raw-tcp",
            TargetKind::Transport => "transport",
            TargetKind::SluiceBroker => "sluice-broker",
            TargetKind::SluiceGrpc => "sluice-grpc",
            TargetKind::Nats => "nats",
            TargetKind::Redis => "redis",
        }
    }

    /// Ping-pong targets have no storage and no consumers: only the round trip is measured.
    pub fn is_pingpong(self) -> bool {
        matches!(self, TargetKind::RawTcp | TargetKind::Transport)
    }

    pub fn is_sluice(self) -> bool {
        matches!(self, TargetKind::SluiceBroker | TargetKind::SluiceGrpc)
    }

    /// Runs lite workloads: Sluice's lite topics, or Redis with a stream per session.
    pub fn has_lite_topics(self) -> bool {
        matches!(self, TargetKind::SluiceBroker | TargetKind::SluiceGrpc | TargetKind::Redis)
    }

    /// The server processes (by the names given with --pid) whose CPU time a run charges.
    pub fn server_processes(self) -> &'static [&'static str] {
        match self {
            TargetKind::RawTcp => &[],
            TargetKind::Transport | TargetKind::SluiceBroker => &["broker"],
            TargetKind::SluiceGrpc => &["broker", "proxy"],
            TargetKind::Nats => &["nats"],
            TargetKind::Redis => &["redis"],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    pub kind: TargetKind,
    /// Shown in tables: the kind, or `kind@label`.
    pub label: String,
    pub endpoint: String,
}

impl std::str::FromStr for TargetSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<TargetSpec, String> {
        let (name, endpoint) = text.split_once('=').unwrap_or((text, ""));
        let kind_name = name.split_once('@').map_or(name, |(kind, _)| kind);
        let kinds = TARGET_KINDS.map(TargetKind::name).join(", ");
        let kind = TARGET_KINDS
            .into_iter()
            .find(|k| k.name() == kind_name)
            .ok_or_else(|| format!("unknown target kind {kind_name:?}; one of {kinds}"))?;
        if endpoint.is_empty() && kind != TargetKind::RawTcp {
            return Err(format!("target {name} needs an endpoint: {name}=HOST:PORT (or a URL)"));
        }
        Ok(TargetSpec { kind, label: name.to_string(), endpoint: endpoint.to_string() })
    }
}

/// What a system promised about an acknowledged message, as read from the system itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DurabilityInfo {
    /// None when the system has no storage (ping-pong) or cannot be set to the requested level.
    pub level: Option<DurabilityLevel>,
    pub detail: String,
}

/// One client's sending side. Each producer has its own connection.
pub trait Producer: Send + Sync + 'static {
    /// Sends `body` to topic number `topic` and resolves when the system acknowledged it
    /// (for ping-pong targets: when the echo came back).
    fn send(&self, topic: usize, sequence: u64, body: Bytes) -> BoxFuture<'static, Result<(), BenchError>>;
}

/// A message as a consumer got it: the header the producer wrote, and the body's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub due_ns: u64,
    pub sequence: u64,
    pub body_len: usize,
}

impl Delivered {
    /// Reads the header from a received body; None when the body is too short to hold one.
    pub fn parse(body: &[u8]) -> Option<Delivered> {
        let due_ns = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
        let sequence = u64::from_le_bytes(body.get(8..MESSAGE_HEADER_BYTES)?.try_into().ok()?);
        Some(Delivered { due_ns, sequence, body_len: body.len() })
    }
}

/// Builds message `sequence`'s body: due time and sequence, then filler up to `size` bytes.
pub fn message_body(size: usize, due_ns: u64, sequence: u64) -> Bytes {
    let mut body = vec![b'x'; size.max(MESSAGE_HEADER_BYTES)];
    body[..8].copy_from_slice(&due_ns.to_le_bytes());
    body[8..MESSAGE_HEADER_BYTES].copy_from_slice(&sequence.to_le_bytes());
    Bytes::from(body)
}

/// One client's receiving side, bound to one topic, in the run's consumer group.
pub trait Consumer: Send + 'static {
    /// Waits up to about `RECEIVE_WAIT_MS` for messages; returns what arrived (maybe nothing).
    /// Bodies malformed beyond parsing come back as None (counted as corrupt).
    fn receive(&mut self) -> BoxFuture<'_, Result<Vec<Option<Delivered>>, BenchError>>;
    /// Acknowledges everything the last `receive` returned.
    fn ack(&mut self) -> BoxFuture<'_, Result<(), BenchError>>;
}

/// A target set up for one workload: clients connected, topics created.
pub struct Session {
    pub producers: Vec<std::sync::Arc<dyn Producer>>,
    pub consumers: Vec<Box<dyn Consumer>>,
    pub durability: DurabilityInfo,
    /// How the client reaches the system (e.g. "gRPC over TCP", "transport over RDMA").
    pub path: String,
    teardown: Option<BoxFuture<'static, Result<(), BenchError>>>,
}

impl Session {
    /// Deletes what the run created (topics, streams), so runs do not fill the systems.
    pub async fn teardown(&mut self) -> Result<(), BenchError> {
        match self.teardown.take() {
            Some(teardown) => teardown.await,
            None => Ok(()),
        }
    }
}

/// Names unique to one run of one workload, so earlier runs' data never counts.
#[derive(Debug, Clone)]
pub struct RunNames {
    pub prefix: String,
}

impl RunNames {
    pub fn new(workload: &Workload, nonce: u64) -> RunNames {
        RunNames { prefix: format!("sb-{}-{:x}", workload.name, nonce) }
    }

    pub fn topic(&self, topic: usize) -> String {
        format!("{}-t{topic}", self.prefix)
    }

    pub fn group(&self) -> String {
        format!("{}-g", self.prefix)
    }
}

/// Connects to the target, checks its durability against `level`, and creates the run's
/// topics and consumer groups.
pub async fn open(
    spec: &TargetSpec,
    workload: &Workload,
    names: &RunNames,
    level: DurabilityLevel,
) -> Result<Session, BenchError> {
    if workload.topic_kind == TopicKind::Lite && !spec.kind.has_lite_topics() {
        return Err(BenchError::target(
            &spec.label,
            format!(
                "workload {:?} uses lite topics (a topic per session), which this target cannot run; \
                 lite workloads run on sluice-broker, sluice-grpc and redis (a stream per session)",
                workload.name
            ),
        ));
    }
    match spec.kind {
        TargetKind::RawTcp => pingpong::open_raw(spec, workload).await,
        TargetKind::Transport => pingpong::open_transport(spec, workload).await,
        TargetKind::SluiceBroker => sluice_broker::open(spec, workload, names, level).await,
        TargetKind::SluiceGrpc => sluice_grpc::open(spec, workload, names, level).await,
        TargetKind::Nats => nats::open(spec, workload, names).await,
        TargetKind::Redis => redis::open(spec, workload, names, level).await,
    }
}

fn connect_error(spec: &TargetSpec, why: impl std::fmt::Display) -> BenchError {
    BenchError::Connect { target: spec.label.clone(), endpoint: spec.endpoint.clone(), why: why.to_string() }
}

fn durability_mismatch(spec: &TargetSpec, requested: DurabilityLevel, actual: &str, actual_level: &str) -> BenchError {
    BenchError::DurabilityMismatch {
        target: spec.label.clone(),
        requested: requested.to_string(),
        actual: actual.to_string(),
        actual_level: actual_level.to_string(),
    }
}

/// The transport settings of sluice-bench's own transport clients, set once from the command line.
static CLIENT_TRANSPORT: std::sync::OnceLock<sluice_transport::TransportConfig> = std::sync::OnceLock::new();

/// Sets the transport clients' settings (before any target opens); later calls are ignored.
pub fn set_client_transport(config: sluice_transport::TransportConfig) {
    let _ = CLIENT_TRANSPORT.set(config);
}

fn client_transport() -> sluice_transport::TransportConfig {
    CLIENT_TRANSPORT.get().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_specs_parse_with_labels_and_endpoints() {
        let spec: TargetSpec = "sluice-broker@rdma=rdma://10.0.0.1:9000".parse().unwrap();
        assert_eq!(spec.kind, TargetKind::SluiceBroker);
        assert_eq!((spec.label.as_str(), spec.endpoint.as_str()), ("sluice-broker@rdma", "rdma://10.0.0.1:9000"));
        let raw: TargetSpec = "raw-tcp".parse().unwrap();
        assert_eq!((raw.kind, raw.endpoint.as_str()), (TargetKind::RawTcp, ""));
        assert!("redis".parse::<TargetSpec>().unwrap_err().contains("needs an endpoint"));
        assert!("kafka=x:1".parse::<TargetSpec>().unwrap_err().contains("unknown target kind"));
    }

    #[test]
    fn bodies_carry_their_header() {
        let body = message_body(1024, 123_456_789, 42);
        assert_eq!(body.len(), 1024);
        assert_eq!(Delivered::parse(&body), Some(Delivered { due_ns: 123_456_789, sequence: 42, body_len: 1024 }));
        assert_eq!(Delivered::parse(&body[..15]), None);
    }
}
