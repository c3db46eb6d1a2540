//! Placeholder until the RDMA verbs driver lands (branch rdma-verbs).
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::TransportConfig;
use crate::error::TransportError;
use crate::link::{FrameSink, Outbound};

pub fn device_present() -> bool {
    false
}

pub struct PendingRdma;
pub struct RdmaDriver;

pub fn connect(_addr: SocketAddr, _config: &TransportConfig) -> Result<PendingRdma, TransportError> {
    Err(TransportError::NoRdmaDevice { detail: "RDMA driver not built yet".into() })
}

impl PendingRdma {
    pub fn start(
        self,
        _outbound: Outbound,
        _sink: Arc<dyn FrameSink>,
        _pin_core: Option<usize>,
    ) -> Result<RdmaDriver, TransportError> {
        Err(TransportError::NoRdmaDevice { detail: "RDMA driver not built yet".into() })
    }
}

pub struct RdmaListener;

impl RdmaListener {
    pub fn bind(_addr: SocketAddr, _config: &TransportConfig) -> Result<RdmaListener, TransportError> {
        Err(TransportError::NoRdmaDevice { detail: "RDMA driver not built yet".into() })
    }

    pub fn local_addr(&self) -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }

    pub fn accept(&self) -> Result<PendingRdma, TransportError> {
        Err(TransportError::NoRdmaDevice { detail: "RDMA driver not built yet".into() })
    }
}

impl Drop for RdmaDriver {
    fn drop(&mut self) {}
}
