//! sluice-proxy: stateless RocketMQ 5 gRPC and HTTP/SSE front end for the brokers.
//! Empty until the proxy issue; see README.md.
#![forbid(unsafe_code)]
