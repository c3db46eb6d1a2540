//! The system tests: real `sluice` processes (local mode, or brokers and proxies from generated
//! TOML files) driven over gRPC, HTTP and the admin API. One test binary for all of them, so the
//! build compiles and links the shared helpers and the generic code they pull in once, not once
//! per file. Run one file's tests with a filter: `cargo test --profile ci --test system lite::`.

mod common;

mod auth_and_restart;
mod dashboard;
mod delivery;
mod fairness;
mod faults;
mod fuzz_endpoints;
mod grpc;
mod inspect;
mod lite;
mod network_cut;
mod peer_auth;
mod priority;
mod quota;
mod split;
mod tls;
mod traces;
mod watch;
