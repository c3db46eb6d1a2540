//! sluice-proxy: the stateless front end. It speaks the Apache RocketMQ 5 gRPC API
//! (`apache.rocketmq.v2.MessagingService`) so official SDKs work unchanged, plus Sluice's admin
//! API, and reaches the brokers over the transport. It holds no durable state.
#![forbid(unsafe_code)]

pub mod pb {
    pub mod apache {
        pub mod rocketmq {
            pub mod v2 {
                #![allow(clippy::all, missing_docs)]
                tonic::include_proto!("apache.rocketmq.v2");
            }
        }
    }
    pub mod sluice {
        pub mod admin {
            pub mod v1 {
                #![allow(clippy::all, missing_docs)]
                tonic::include_proto!("sluice.admin.v1");
            }
        }
        pub mod store {
            pub mod v1 {
                #![allow(clippy::all, missing_docs)]
                tonic::include_proto!("sluice.store.v1");
            }
        }
    }
}

pub mod admin;
pub mod auth;
pub mod consume;
pub mod convert;
pub mod error;
pub mod groups;
pub mod produce;
pub mod renew;
pub mod routing;
pub mod server;
pub mod service;
pub mod state;
pub mod topics;
