//! Generated protobuf and gRPC code for Sluice's public protocols: `apache.rocketmq.v2` (the
//! RocketMQ 5 API, written in our own .proto files from the published field numbers),
//! `sluice.admin.v1` (the admin API) and `sluice.store.v1` (message metadata the proxy stores
//! and the broker does not read). Clients (the CLI, the benchmark) depend on this crate, not on
//! the proxy.
#![forbid(unsafe_code)]

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
