//! sluice-proxy: the stateless front end. It speaks the Apache RocketMQ 5 gRPC API
//! (`apache.rocketmq.v2.MessagingService`) so official SDKs work unchanged, plus Sluice's admin
//! API, and reaches the brokers over the transport. It holds no durable state.
#![forbid(unsafe_code)]

pub use sluice_proto as pb;

pub mod acl;
pub mod admin;
pub mod auth;
pub mod consume;
pub mod convert;
pub mod error;
pub mod groups;
pub mod lite;
pub mod lookup;
pub mod metrics;
pub mod produce;
pub mod quota;
pub mod renew;
pub mod server;
pub mod service;
pub mod spans;
pub mod state;
pub mod stream;
pub mod tls;
pub mod topics;
pub mod transactions;
