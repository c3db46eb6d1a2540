//! Typed transport errors. Codes are stable and never reused (engine errors own 1001–1099).

use std::io;

/// Why a frame was rejected. Each variant has a stable numeric code (`code()`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {found:#010x}: the peer does not speak the Sluice transport (is it pointed at the right port?)")]
    BadMagic { found: u32 },
    #[error("unsupported frame version {found}; this side speaks version {supported}: upgrade the older side")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("unknown frame kind {kind}: the peer is newer than this build, or the frame is corrupt")]
    UnknownKind { kind: u16 },
    #[error("frame body of {body_len} bytes exceeds the limit of {max_frame_bytes} bytes (max_frame_bytes)")]
    Oversize { body_len: u64, max_frame_bytes: u64 },
    #[error("truncated frame: have {have} bytes, need {need}")]
    Truncated { have: u64, need: u64 },
    #[error("frame CRC mismatch: header says {stored:#010x}, computed {computed:#010x} (corrupted in transit)")]
    BadCrc { stored: u32, computed: u32 },
    #[error("frame of kind {kind} has an invalid body: {reason}")]
    Malformed { kind: u16, reason: String },
    #[error("expected a frame of kind {expected}, got kind {found}")]
    UnexpectedKind { expected: u16, found: u16 },
    #[error("could not encode a frame of kind {kind}: {reason}")]
    Encode { kind: u16, reason: String },
}

impl FrameError {
    /// Stable numeric code, sent in error frames and logged.
    pub fn code(&self) -> u32 {
        match self {
            FrameError::BadMagic { .. } => 2001,
            FrameError::UnsupportedVersion { .. } => 2002,
            FrameError::UnknownKind { .. } => 2003,
            FrameError::Oversize { .. } => 2004,
            FrameError::Truncated { .. } => 2005,
            FrameError::BadCrc { .. } => 2006,
            FrameError::Malformed { .. } => 2007,
            FrameError::UnexpectedKind { .. } => 2008,
            FrameError::Encode { .. } => 2009,
        }
    }
}

/// Connection-level errors. Codes 2101+.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("I/O error on {context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("connection closed: {reason}")]
    Closed { reason: String },
    #[error("request timed out after {timeout_ms} ms (request_timeout_ms); the broker may be overloaded or gone")]
    Timeout { timeout_ms: u64 },
    #[error("the peer answered with error {code}: {message}")]
    Remote { code: u32, message: String },
    #[error("bad endpoint {endpoint:?}: {reason}; use tcp://host:port, rdma://host:port or auto://host:port")]
    BadEndpoint { endpoint: String, reason: String },
    #[error(
        "no RDMA device on this host ({detail}); use tcp:// or auto://, or set up soft-RoCE with scripts/soft-roce.sh"
    )]
    NoRdmaDevice { detail: String },
    #[error("RDMA {op} failed: {detail}")]
    Rdma { op: &'static str, detail: String },
    #[error("handshake failed: {reason}")]
    Handshake { reason: String },
    #[error("invalid transport configuration: {reason}")]
    Config { reason: String },
    #[error(
        "connecting to {addr} timed out after {timeout_ms} ms (connect_timeout_ms); is the broker up and reachable?"
    )]
    ConnectTimeout { addr: String, timeout_ms: u64 },
    #[error("the link to {peer} is dead: no byte moved for {silent_ms} ms with requests outstanding, and a heartbeat went unanswered for {dead_link_timeout_ms} ms (dead_link_timeout_ms)")]
    LinkDead { peer: String, silent_ms: u64, dead_link_timeout_ms: u64 },
}

impl TransportError {
    /// Stable numeric code.
    pub fn code(&self) -> u32 {
        match self {
            TransportError::Frame(e) => e.code(),
            TransportError::Io { .. } => 2101,
            TransportError::Closed { .. } => 2102,
            TransportError::Timeout { .. } => 2103,
            TransportError::Remote { code, .. } => *code,
            TransportError::BadEndpoint { .. } => 2105,
            TransportError::NoRdmaDevice { .. } => 2106,
            TransportError::Rdma { .. } => 2107,
            TransportError::Handshake { .. } => 2108,
            TransportError::Config { .. } => 2109,
            TransportError::ConnectTimeout { .. } => 2110,
            TransportError::LinkDead { .. } => 2111,
        }
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        TransportError::Io { context: context.into(), source }
    }

    /// A copy for fanning one failure out to every waiter (io::Error is not Clone).
    pub fn duplicate(&self) -> Self {
        match self {
            TransportError::Frame(e) => TransportError::Frame(e.clone()),
            TransportError::Io { context, source } => TransportError::Io {
                context: context.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            TransportError::Closed { reason } => TransportError::Closed { reason: reason.clone() },
            TransportError::Timeout { timeout_ms } => TransportError::Timeout { timeout_ms: *timeout_ms },
            TransportError::Remote { code, message } => {
                TransportError::Remote { code: *code, message: message.clone() }
            }
            TransportError::BadEndpoint { endpoint, reason } => {
                TransportError::BadEndpoint { endpoint: endpoint.clone(), reason: reason.clone() }
            }
            TransportError::NoRdmaDevice { detail } => TransportError::NoRdmaDevice { detail: detail.clone() },
            TransportError::Rdma { op, detail } => TransportError::Rdma { op, detail: detail.clone() },
            TransportError::Handshake { reason } => TransportError::Handshake { reason: reason.clone() },
            TransportError::Config { reason } => TransportError::Config { reason: reason.clone() },
            TransportError::ConnectTimeout { addr, timeout_ms } => {
                TransportError::ConnectTimeout { addr: addr.clone(), timeout_ms: *timeout_ms }
            }
            TransportError::LinkDead { peer, silent_ms, dead_link_timeout_ms } => TransportError::LinkDead {
                peer: peer.clone(),
                silent_ms: *silent_ms,
                dead_link_timeout_ms: *dead_link_timeout_ms,
            },
        }
    }
}

/// Codes for errors the server reports in error frames that are not frame errors.
pub mod remote_code {
    /// The request kind is known but this server has no handler for it.
    pub const NOT_SUPPORTED: u32 = 2201;
    /// The handler failed; the message says why.
    pub const HANDLER_FAILED: u32 = 2202;
    /// The peer broke the protocol (e.g. more requests in flight than its credits).
    pub const PROTOCOL_VIOLATION: u32 = 2203;
    /// The peer did not prove it holds the transport secret (`peer_auth`); the server closes
    /// the connection after this reply.
    pub const UNAUTHENTICATED: u32 = 2204;
}
