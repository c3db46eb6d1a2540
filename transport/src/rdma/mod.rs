//! The RDMA verbs transport: RC queue pairs over libibverbs (rdma-sys), set up over a TCP
//! bootstrap socket, with credit-based flow control and zero-copy receive.
//!
//! - Small frames (up to `slot_bytes`, both sides' minimum) are copied into a registered send
//!   slot and SENT WITH IMMEDIATE into a pre-posted receive slot.
//! - Larger frames are copied chunk by chunk into registered staging memory and RDMA WRITTEN into
//!   the peer's registered ring, the last chunk WITH IMMEDIATE (the ring offset / 64).
//! - Every received frame reaches the sink as a `Frame` whose bytes are the registered receive
//!   slot or ring range itself; dropping the frame (and every clone of its bytes) gives the slot
//!   back for reposting and the ring range back for reuse.
//! - Flow control: `credits` data frames in flight; credits come back in the immediate data of
//!   frames going the other way or in control messages the sink never sees (`credit`). Out of
//!   credits, the driver stops taking from the outbound channel, which pushes back on callers.
//! - One poller per link: bounded busy-poll, then park on the completion channel, a doorbell and
//!   the bootstrap socket. By default (`RdmaPollMode::Runtime`) it is a task on the runtime the
//!   link serves (`spawn_on_glommio` for a broker shard, `spawn_on_tokio` for the proxy), so
//!   completions are polled where the work runs; `RdmaPollMode::Thread` (`start`) gives it a
//!   thread of its own, pinned to `pin_core`.
//!
//! Module map: `verbs` (unsafe: libibverbs objects, registered memory, leases), `driver` (the
//! poller), `runtimes` (where an async poller parks), `park_ring` (unsafe: the io_uring a
//! glommio poller parks in), `setup` (handshake), and the
//! pure, unit-tested logic: `wire`
//! (immediate data, control messages), `credit`, `ring`, `pool`, `peer` (handshake checks, GID
//! choice).

mod credit;
mod doorbell;
mod driver;
#[allow(unsafe_code)]
mod park_ring;
mod peer;
mod pool;
mod ring;
mod runtimes;
mod setup;
mod spin;
#[allow(unsafe_code)]
mod verbs;
mod wire;

pub mod test_support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::TransportConfig;
use crate::error::TransportError;
use crate::link::{FrameSink, Outbound};

/// One RDMA device and its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaDevice {
    pub name: String,
    pub node_guid: u64,
    pub ports: Vec<RdmaPort>,
    /// Why the device could not be opened and queried, if it could not.
    pub open_error: Option<String>,
}

impl RdmaDevice {
    pub fn has_active_port(&self) -> bool {
        self.ports.iter().any(|p| p.state == PortState::Active)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaPort {
    /// 1-based, as verbs numbers ports.
    pub port_num: u8,
    pub state: PortState,
    pub link_layer: LinkLayer,
    /// 0 on RoCE (Ethernet has no LIDs).
    pub lid: u16,
    pub active_mtu_bytes: u32,
    pub gid_table_len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    Down,
    Init,
    Armed,
    Active,
    ActiveDefer,
    Other(u32),
}

impl PortState {
    pub(crate) fn from_raw(state: u32) -> PortState {
        match state {
            1 => PortState::Down,
            2 => PortState::Init,
            3 => PortState::Armed,
            4 => PortState::Active,
            5 => PortState::ActiveDefer,
            other => PortState::Other(other),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    InfiniBand,
    /// RoCE (including soft-RoCE, rxe).
    Ethernet,
    Unspecified(u8),
}

/// Every RDMA device on this host (`ibv_get_device_list`), with its ports. Empty where the
/// kernel has no RDMA support.
pub fn devices() -> Result<Vec<RdmaDevice>, TransportError> {
    verbs::list_devices()
}

/// True iff at least one device has an ACTIVE port.
pub fn device_present() -> bool {
    devices().is_ok_and(|devices| devices.iter().any(RdmaDevice::has_active_port))
}

/// The device a link with this configuration would use, or why there is none.
fn usable_device(config: &TransportConfig) -> Result<RdmaDevice, TransportError> {
    let wanted =
        config.rdma.device.clone().or_else(|| std::env::var("SLUICE_RDMA_DEVICE").ok().filter(|d| !d.is_empty()));
    let all = devices()?;
    let names: Vec<&str> = all.iter().map(|d| d.name.as_str()).collect();
    let found = match &wanted {
        Some(name) => all.iter().find(|d| &d.name == name && d.has_active_port()),
        None => all.iter().find(|d| d.has_active_port()),
    };
    found.cloned().ok_or_else(|| TransportError::NoRdmaDevice {
        detail: match wanted {
            Some(name) => format!("device {name:?} not present with an ACTIVE port (present: {names:?})"),
            None => format!("no device with an ACTIVE port (present: {names:?})"),
        },
    })
}

/// Accepts RDMA links: a TCP listener for the bootstrap exchange.
pub struct RdmaListener {
    listener: TcpListener,
    config: TransportConfig,
}

impl std::fmt::Debug for RdmaListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaListener").field("addr", &self.listener.local_addr().ok()).finish()
    }
}

impl RdmaListener {
    /// Validates the configuration, checks that a usable device exists, and binds.
    pub fn bind(addr: SocketAddr, config: &TransportConfig) -> Result<Self, TransportError> {
        config.validate()?;
        let device = usable_device(config)?;
        let listener = TcpListener::bind(addr)
            .map_err(|e| TransportError::io(format!("binding the RDMA listener on {addr}"), e))?;
        tracing::info!(device = %device.name, addr = ?listener.local_addr().ok(), "RDMA listener bound");
        Ok(RdmaListener { listener, config: config.clone() })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Blocks for the next connection and does the whole queue-pair exchange (bounded by
    /// `connect_timeout_ms` once the TCP connection is accepted).
    pub fn accept(&self) -> Result<PendingRdma, TransportError> {
        let (stream, _) =
            self.listener.accept().map_err(|e| TransportError::io("accepting an RDMA bootstrap connection", e))?;
        setup::accept(stream, &self.config)
    }
}

/// Connects to an `RdmaListener`; blocking, bounded by `connect_timeout_ms`.
pub fn connect(addr: SocketAddr, config: &TransportConfig) -> Result<PendingRdma, TransportError> {
    setup::connect(addr, config)
}

/// A connected link whose queue pair is ready (RTS, receives posted) and whose driver has not
/// started. Dropping it tears the link down.
pub struct PendingRdma {
    endpoint: verbs::Endpoint,
    tcp: TcpStream,
    limits: peer::LinkLimits,
    own_credits: u32,
    spin: spin::SpinBudget,
    liveness_probe: std::time::Duration,
    releases: flume::Receiver<verbs::Release>,
    doorbell: Arc<doorbell::Doorbell>,
    peer_addr: SocketAddr,
}

impl std::fmt::Debug for PendingRdma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRdma").field("device", &self.endpoint.describe()).field("peer", &self.peer_addr).finish()
    }
}

impl PendingRdma {
    /// "rxe0 port 1 (RoCE, GID index 1, MTU 1024, QP 17)".
    pub fn describe(&self) -> String {
        self.endpoint.describe()
    }

    pub fn device_name(&self) -> &str {
        self.endpoint.device_name()
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Fault injection for tests: a clone of the bootstrap socket. A process that hands it to a
    /// longer-lived helper and then dies leaves its peer with an open socket and a dead queue
    /// pair, as a host that vanished without closing its connections would; the peer must then
    /// notice through the RC transport's retries.
    #[doc(hidden)]
    pub fn clone_bootstrap_socket_for_tests(&self) -> Result<TcpStream, TransportError> {
        self.tcp.try_clone().map_err(|e| TransportError::io("cloning the bootstrap socket", e))
    }

    /// Starts the poller as a task on the current tokio runtime (`RdmaPollMode::Runtime` on
    /// the client side). Otherwise as `start`. Fails outside a tokio runtime.
    pub fn spawn_on_tokio(self, outbound: Outbound, sink: Arc<dyn FrameSink>) -> Result<RdmaDriver, TransportError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| TransportError::Config {
            reason: format!("RdmaPollMode::Runtime on the client needs a tokio runtime: {e}"),
        })?;
        let (driver, handle_parts) = self.into_driver(outbound, sink)?;
        let done = handle_parts.done.clone();
        handle.spawn(async move {
            driver.run_async(runtimes::TokioPark::default()).await;
            done.store(true, Ordering::Release);
        });
        Ok(handle_parts.into_task())
    }

    /// Starts the poller as a task on the current glommio executor (`RdmaPollMode::Runtime` on
    /// a broker shard), parking in an io_uring of its own (`park_ring`). Otherwise as `start`.
    /// Must be called on a glommio executor.
    pub fn spawn_on_glommio(self, outbound: Outbound, sink: Arc<dyn FrameSink>) -> Result<RdmaDriver, TransportError> {
        let park =
            runtimes::GlommioPark::new().map_err(|e| TransportError::io("setting up the RDMA link's park ring", e))?;
        let (driver, handle_parts) = self.into_driver(outbound, sink)?;
        let done = handle_parts.done.clone();
        glommio::spawn_local(async move {
            driver.run_async(park).await;
            done.store(true, Ordering::Release);
        })
        .detach();
        Ok(handle_parts.into_task())
    }

    fn into_driver(
        self,
        outbound: Outbound,
        sink: Arc<dyn FrameSink>,
    ) -> Result<(driver::Driver, DriverHandleParts), TransportError> {
        self.tcp.set_nonblocking(true).map_err(|e| TransportError::io("bootstrap socket", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(driver::StatsCounters::default());
        let doorbell = self.doorbell.clone();
        let parts = driver::DriverParts {
            endpoint: self.endpoint,
            tcp: self.tcp,
            limits: self.limits,
            own_credits: self.own_credits,
            spin: self.spin,
            liveness_probe: self.liveness_probe,
            releases: self.releases,
            doorbell: self.doorbell,
        };
        let driver = driver::Driver::new(parts, outbound, sink, stop.clone(), stats.clone());
        Ok((driver, DriverHandleParts { stop, doorbell, stats, done: Arc::new(AtomicBool::new(false)) }))
    }

    /// Starts the poller thread (pinned to `pin_core` if given): it sends what arrives on
    /// `outbound` and delivers what arrives to `sink`, until `outbound` is disconnected, the link
    /// fails, or the driver is shut down; then it calls `sink.closed` once.
    pub fn start(
        self,
        outbound: Outbound,
        sink: Arc<dyn FrameSink>,
        pin_core: Option<usize>,
    ) -> Result<RdmaDriver, TransportError> {
        if let Some(core) = pin_core {
            let cores = core_affinity::get_core_ids().unwrap_or_default();
            if !cores.iter().any(|c| c.id == core) {
                return Err(TransportError::Config {
                    reason: format!("pin_core = {core} is not one of this host's cores ({} cores)", cores.len()),
                });
            }
        }
        let name = format!("sluice-rdma-{}", self.peer_addr);
        let (driver, parts) = self.into_driver(outbound, sink)?;
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Some(core) = pin_core {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                        tracing::warn!(core, "could not pin the RDMA poller thread");
                    }
                }
                driver.run_thread();
            })
            .map_err(|e| TransportError::io("spawning the RDMA poller thread", e))?;
        Ok(RdmaDriver {
            thread: Some(thread),
            stop: parts.stop,
            doorbell: parts.doorbell,
            stats: parts.stats,
            task_done: None,
        })
    }
}

/// A driver's shared state, before it is known where the driver runs.
struct DriverHandleParts {
    stop: Arc<AtomicBool>,
    doorbell: Arc<doorbell::Doorbell>,
    stats: Arc<driver::StatsCounters>,
    done: Arc<AtomicBool>,
}

impl DriverHandleParts {
    fn into_task(self) -> RdmaDriver {
        RdmaDriver {
            thread: None,
            stop: self.stop,
            doorbell: self.doorbell,
            stats: self.stats,
            task_done: Some(self.done),
        }
    }
}

/// Counters of one running link (monotonic; read with `RdmaDriver::stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RdmaStats {
    /// Frames sent by SEND (small) and by RDMA WRITE WITH IMMEDIATE into the peer's ring.
    pub frames_sent_send: u64,
    pub frames_sent_write: u64,
    pub bytes_sent: u64,
    pub frames_received_send: u64,
    pub frames_received_ring: u64,
    pub bytes_received: u64,
    /// Flow-control messages (credit requests and replies).
    pub control_sent: u64,
    pub control_received: u64,
    /// Times the sender ran out of credits / ring space and waited.
    pub credit_stalls: u64,
    pub ring_stalls: u64,
    /// Zero-length RDMA WRITEs posted to check a quiet peer is still there.
    pub liveness_probes: u64,
}

/// A running link. `shutdown` (or drop) stops the poller and tears the link down. A poller
/// thread is joined (except when dropped by the poller thread itself, from inside a sink
/// callback: then it only stops); a poller task is told to stop and finishes on its runtime.
pub struct RdmaDriver {
    thread: Option<JoinHandle<()>>,
    /// Set when a poller task (not thread) has finished.
    task_done: Option<Arc<AtomicBool>>,
    stop: Arc<AtomicBool>,
    doorbell: Arc<doorbell::Doorbell>,
    stats: Arc<driver::StatsCounters>,
}

impl std::fmt::Debug for RdmaDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaDriver").field("stats", &self.stats()).finish()
    }
}

impl RdmaDriver {
    pub fn stats(&self) -> RdmaStats {
        self.stats.snapshot()
    }

    /// Whether the poller has stopped (the link ended).
    pub fn is_finished(&self) -> bool {
        match &self.task_done {
            Some(done) => done.load(Ordering::Acquire),
            None => self.thread.as_ref().is_none_or(JoinHandle::is_finished),
        }
    }

    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.doorbell.ring();
        let Some(thread) = self.thread.take() else { return };
        // The last owner of the driver may be the sink's owner, dropped by the poller itself
        // inside `deliver` or `closed`: it cannot wait for itself. It stops as soon as that
        // callback returns (the flag is set) and tears the link down on its way out.
        if thread.thread().id() == std::thread::current().id() {
            return;
        }
        if thread.join().is_err() {
            tracing::error!("the RDMA poller thread panicked");
        }
    }
}

impl Drop for RdmaDriver {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
