//! sluice-transport: rkyv frames between proxy and broker over RDMA verbs and TCP.
//! Empty until the transport issue; see README.md.
#![forbid(unsafe_code)]
