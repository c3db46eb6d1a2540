//! sluice-transport: rkyv frames between proxy and broker over RDMA verbs and TCP.
//!
//! - `frame`: the fixed header, CRC, encode and in-place validated access.
//! - `messages`: every frame kind and its body.
//! - `model`: the vocabulary broker and proxy share (message types, records, placement, codes).
//! - `error`: typed errors with stable codes.
//! - `config`: every limit, named and validated.
//! - `cluster`: the client side of many brokers: queue placement and one connection per shard.
//! - `link`: the seam between the request–response layer and an I/O driver.
//! - `spans`: trace spans of the broker hop, and the target every exported span uses.
//! - `rdma`: the RDMA verbs driver (rdma-sys): RC queue pairs, credits, zero-copy receive.
//! - `peer_auth`: proxies and brokers prove a shared secret at the handshake.
//! - `relay`: a TCP relay that cuts and heals the network, for fault tests.
//!
//! `unsafe` is denied everywhere except the RDMA verbs module and an RDMA link's park io_uring.
#![deny(unsafe_code)]

pub mod blocking;
pub mod client;
pub mod cluster;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod link;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod peer_auth;
pub mod rdma;
pub mod reader;
pub mod relay;
pub mod server;
pub mod spans;
mod tcp;

pub use client::{Client, TransportKind};
pub use config::{RdmaConfig, RdmaPollMode, TransportConfig};
pub use error::{FrameError, TransportError};
pub use frame::{Frame, FrameHeader, Message, OutFrame, Request, FRAME_HEADER_BYTES, FRAME_VERSION};
pub use link::{ChannelSink, ChannelSource, FrameSink, Outbound};
pub use messages::FrameKind;
pub use server::{BuiltinsOnly, Handler, ListenOn, LocalServer, Server, ServerInfo, ServerStats, ServerThread};
