//! Helpers for tests that need an RDMA device (transport/tests, hw-tests).
//!
//! Without a device such a test prints `skipped: no RDMA device` and passes, except where
//! `SLUICE_IN_RDMA_VM=1` says a device must exist (the soft-RoCE CI guest): there it fails, so
//! CI cannot skip silently.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Whether the test should run. Panics when a device is required and missing.
pub fn device_or_skip(test: &str) -> bool {
    if super::device_present() {
        return true;
    }
    if std::env::var("SLUICE_IN_RDMA_VM").is_ok_and(|v| v == "1") {
        panic!("{test}: SLUICE_IN_RDMA_VM=1 but no RDMA device has an ACTIVE port (devices: {:?})", super::devices());
    }
    println!("skipped: no RDMA device ({test})");
    false
}

/// The address to bind or connect to: `SLUICE_RDMA_SERVER_ADDR` (an IP; the soft-RoCE guest
/// sets the rxe interface's address) with port 0, else 127.0.0.1:0.
pub fn server_addr() -> SocketAddr {
    let ip = std::env::var("SLUICE_RDMA_SERVER_ADDR")
        .ok()
        .and_then(|a| a.parse::<IpAddr>().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, 0)
}
