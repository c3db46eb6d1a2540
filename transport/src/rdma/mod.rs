//! The RDMA verbs transport (driver to follow): the pure, unit-tested logic first.
//!
//! `wire` (immediate data, control messages), `credit`, `ring`, `pool`, `peer` (handshake
//! checks, GID choice) and `doorbell` (wakes the poller).

mod credit;
mod doorbell;
mod peer;
mod pool;
mod ring;
mod wire;
