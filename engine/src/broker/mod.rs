//! The broker server: the engine plus the transport served on every shard's own executor.
//!
//! Shard `i` listens on `listen.port + i` (or an ephemeral port each when the port is 0), and
//! says in its `HelloAck` which shard it is and how many there are, so a proxy connects to
//! every shard and sends each queue's requests straight to its owner: no hop inside the
//! broker. Shutdown stops reading, lets in-flight requests finish, writes consumer offsets,
//! syncs the log and closes.

mod backlog;
mod delivery;
pub mod error;
mod fair;
pub mod handler;
mod held;
mod lite;
mod lookup;
pub mod pop;
pub mod queues;
pub mod quota;
pub mod receipt;
pub mod scheduler;

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use sluice_transport::{ListenOn, Server, ServerInfo, TransportConfig};

pub use error::BrokerError;
pub use handler::ShardHandler;
pub use receipt::ReceiptKey;

use crate::config::EngineConfig;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::metrics::ShardGauges;
use crate::shard::Shard;

/// Bounds on what one request may ask of a shard, and the shard's delivery policies; every
/// count from outside is clamped to these.
#[derive(Debug, Clone)]
pub struct BrokerLimits {
    pub max_frame_bytes: u64,
    pub append_entries_max: usize,
    pub pop_records_max: u32,
    pub read_records_max: u32,
    pub read_bytes_max: u32,
    pub invisible_min_ms: u64,
    pub invisible_max_ms: u64,
    pub long_poll_max_ms: u64,
    /// Unacked deliveries one group may hold on one queue; beyond it pops return nothing.
    pub leases_per_group_queue_max: usize,
    /// FIFO messages one group may have waiting on one queue behind an earlier message of
    /// their message group; beyond it the queue is not scanned further until an ack.
    pub fifo_waiting_per_group_queue_max: usize,
    /// Messages of a PRIORITY queue one group reads ahead and orders by priority; a message
    /// further back than this waits until delivery reaches it (see `backlog.rs`).
    pub priority_backlog_per_group_queue_max: usize,
    /// (group, queue) pairs with pop state on one shard.
    pub group_queues_max: usize,
    /// Queue entries one pop reads ahead per queue to find deliverable messages.
    pub scan_entries_max: usize,
    /// Retry delays a pop's group policy may list.
    pub retry_delays_max: usize,
    pub queue_configs_max: usize,
    pub list_queues_max: u32,
    /// How often moved consumer offsets are written (also at shutdown). A crash redelivers
    /// what was acked in the last interval: at least once, never lost.
    pub offset_persist_interval_ms: u64,
    /// How far ahead a delay message may be due (RocketMQ's 40 days).
    pub delay_max_ms: u64,
    /// Delay timers moved into their queues per step.
    pub timer_dispatch_batch: usize,
    /// Half messages of open transactions one shard holds; more are refused.
    pub half_messages_max: usize,
    /// A half message is first checked with its producer this long after it was stored.
    pub transaction_check_first_ms: u64,
    /// Checks then repeat with doubling intervals up to this one.
    pub transaction_check_interval_max_ms: u64,
    /// After this many checks without an answer the half message is discarded (and counted).
    pub transaction_checks_max: u32,
    /// Lite topics one client may subscribe to on one shard.
    pub lite_subscriptions_per_client_max: usize,
    /// A lite consumer that neither polled nor synced its subscriptions for this long is
    /// forgotten (its group's positions stay). Clients sync every 30 s and poll all the time.
    pub lite_client_idle_ms: u64,
    /// Clients or lite queues the periodic sweep handles per round.
    pub lite_sweep_batch: usize,
    /// Lite consumers (client ids) one group may have on one shard.
    pub lite_clients_per_group_max: usize,
}

/// Metric scrapes queued at one shard at most; more wait to be queued.
const GAUGE_REQUESTS_QUEUED_MAX: usize = 4;

/// RocketMQ's longest delay: 40 days.
pub const DELAY_MAX_MS_DEFAULT: u64 = 40 * 24 * 3600 * 1000;

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            max_frame_bytes: TransportConfig::default().max_frame_bytes,
            append_entries_max: 1024,
            pop_records_max: 64,
            read_records_max: 1024,
            read_bytes_max: 32 << 20,
            invisible_min_ms: 1_000,
            invisible_max_ms: 12 * 3600 * 1000,
            long_poll_max_ms: 60_000,
            leases_per_group_queue_max: 20_000,
            fifo_waiting_per_group_queue_max: 10_000,
            priority_backlog_per_group_queue_max: 2_000,
            group_queues_max: 100_000,
            scan_entries_max: 1024,
            retry_delays_max: 64,
            queue_configs_max: 1_000_000,
            list_queues_max: 10_000,
            offset_persist_interval_ms: 1_000,
            delay_max_ms: DELAY_MAX_MS_DEFAULT,
            timer_dispatch_batch: 256,
            half_messages_max: 100_000,
            transaction_check_first_ms: 6_000,
            transaction_check_interval_max_ms: 60_000,
            transaction_checks_max: 15,
            lite_subscriptions_per_client_max: 100_000,
            lite_client_idle_ms: 120_000,
            lite_sweep_batch: 1024,
            lite_clients_per_group_max: 100_000,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub name: String,
    pub engine: EngineConfig,
    pub transport: TransportConfig,
    /// Shard i listens on port + i; port 0 gives every shard an ephemeral port.
    pub listen: SocketAddr,
    /// RDMA bootstrap address, the same way (port + i); `None` serves TCP only.
    pub rdma_listen: Option<SocketAddr>,
    pub limits: BrokerLimits,
}

/// Where one shard serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardEndpoint {
    pub tcp: SocketAddr,
    pub rdma: Option<SocketAddr>,
}

pub struct Broker {
    engine: Option<Engine>,
    endpoints: Vec<ShardEndpoint>,
    stops: Vec<flume::Sender<()>>,
    stopped: Vec<flume::Receiver<()>>,
    probe: GaugeProbe,
}

/// A scrape's request to one shard: the channel its `ShardGauges` go back on.
type GaugeRequest = flume::Sender<ShardGauges>;

/// Asks every shard for its metric gauges (see `crate::metrics`). Cheap to clone; usable from
/// any thread; a stopped shard is left out.
#[derive(Clone, Default)]
pub struct GaugeProbe {
    shards: Vec<flume::Sender<GaugeRequest>>,
}

impl GaugeProbe {
    /// Every running shard's report, in shard order.
    pub async fn collect(&self) -> Vec<ShardGauges> {
        let mut asked = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let (tx, rx) = flume::bounded(1);
            if shard.send_async(tx).await.is_ok() {
                asked.push(rx);
            }
        }
        let mut reports = Vec::with_capacity(asked.len());
        for rx in asked {
            if let Ok(report) = rx.recv_async().await {
                reports.push(report);
            }
        }
        reports
    }
}

fn port_for(base: SocketAddr, shard: usize) -> Result<SocketAddr, BrokerError> {
    if base.port() == 0 {
        return Ok(base);
    }
    let port = u16::try_from(usize::from(base.port()) + shard).map_err(|_| {
        BrokerError::InvalidRequest(format!("listen port {} + shard {shard} exceeds 65535", base.port()))
    })?;
    Ok(SocketAddr::new(base.ip(), port))
}

impl Broker {
    /// Opens the engine (recovering the log) and starts serving on every shard.
    pub fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        config.transport.validate().map_err(|e| BrokerError::InvalidRequest(format!("transport config: {e}")))?;
        let engine = Engine::open(config.engine.clone())?;
        let shard_count = engine.shard_count();
        let key = ReceiptKey::random();
        let mut broker = Broker {
            engine: None,
            endpoints: Vec::new(),
            stops: Vec::new(),
            stopped: Vec::new(),
            probe: GaugeProbe::default(),
        };
        for shard_id in 0..shard_count {
            let listen = ListenOn {
                tcp: Some(port_for(config.listen, shard_id)?),
                rdma: config.rdma_listen.map(|a| port_for(a, shard_id)).transpose()?,
            };
            let info = ServerInfo {
                name: config.name.clone(),
                shard: shard_id as u32,
                shard_count: shard_count as u32,
                rdma_port: 0,
            };
            let (stop_tx, stop_rx) = flume::bounded::<()>(1);
            let (stopped_tx, stopped_rx) = flume::bounded::<()>(1);
            let (gauges_tx, gauges_rx) = flume::bounded::<GaugeRequest>(GAUGE_REQUESTS_QUEUED_MAX);
            let (transport, limits, key) = (config.transport.clone(), config.limits.clone(), key.clone());
            let started = futures::executor::block_on(engine.on_shard(
                shard_id,
                move |shard: Rc<Shard>| -> LocalBoxFuture<'static, crate::Result<ShardEndpoint>> {
                    Box::pin(async move {
                        serve_shard(
                            shard,
                            shard_id,
                            shard_count,
                            key,
                            limits,
                            transport,
                            listen,
                            info,
                            stop_rx,
                            stopped_tx,
                            gauges_rx,
                        )
                        .await
                        .map_err(|e| EngineError::Config(e.to_string()))
                    })
                },
            ));
            match started {
                Ok(endpoint) => {
                    broker.endpoints.push(endpoint);
                    broker.stops.push(stop_tx);
                    broker.stopped.push(stopped_rx);
                    broker.probe.shards.push(gauges_tx);
                }
                Err(e) => {
                    broker.engine = Some(engine);
                    let _ = broker.shutdown_inner();
                    return Err(e.into());
                }
            }
        }
        broker.engine = Some(engine);
        Ok(broker)
    }

    /// Shard endpoints, in shard order.
    pub fn endpoints(&self) -> &[ShardEndpoint] {
        &self.endpoints
    }

    /// What a metrics endpoint uses to read the shards' gauges.
    pub fn gauge_probe(&self) -> GaugeProbe {
        self.probe.clone()
    }

    pub fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("engine is open until shutdown")
    }

    /// Graceful stop: no new requests, in-flight ones finish (bounded by the transport's
    /// drain timeout), consumer offsets are written, the log is synced and closed.
    pub fn shutdown(mut self) -> Result<(), BrokerError> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), BrokerError> {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for stopped in self.stopped.drain(..) {
            let _ = stopped.recv();
        }
        match self.engine.take() {
            Some(engine) => engine.close().map_err(BrokerError::from),
            None => Ok(()),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown_inner() {
            tracing::error!(error = %e, "broker shutdown failed");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_shard(
    shard: Rc<Shard>,
    shard_id: usize,
    shard_count: usize,
    key: ReceiptKey,
    limits: BrokerLimits,
    transport: TransportConfig,
    listen: ListenOn,
    info: ServerInfo,
    stop: flume::Receiver<()>,
    stopped: flume::Sender<()>,
    gauge_requests: flume::Receiver<GaugeRequest>,
) -> Result<ShardEndpoint, BrokerError> {
    let persist_every = Duration::from_millis(limits.offset_persist_interval_ms.max(10));
    let handler = ShardHandler::open(shard, shard_id, shard_count, key, limits).await?;
    let local = Server::start_local(listen, transport, info, handler, None)
        .map_err(|e| BrokerError::InvalidRequest(format!("shard {shard_id} cannot listen on {listen:?}: {e}")))?;
    let endpoint =
        ShardEndpoint { tcp: local.tcp_addr.expect("the broker always listens on TCP"), rdma: local.rdma_addr };
    let server = local.server.clone();
    let persister = server.clone();
    let persist_task = glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(persist_every).await;
            if let Err(e) = persister.handler().persist_offsets().await {
                tracing::warn!(error = %e, "writing consumer offsets failed; will retry");
            }
            if let Err(e) = persister.handler().sweep_lite().await {
                tracing::warn!(error = %e, "lite subscription upkeep failed; will retry");
            }
        }
    });
    let timer_server = server.clone();
    let timer_task = glommio::spawn_local(async move { timer_server.handler().run_timers().await });
    let gauge_server = server.clone();
    let gauge_task = glommio::spawn_local(async move {
        while let Ok(reply) = gauge_requests.recv_async().await {
            let _ = reply.send(gauge_server.handler().gauges().await);
        }
    });
    glommio::spawn_local(async move {
        let _ = stop.recv_async().await;
        server.handler().begin_close();
        server.shutdown();
        local.serving.await;
        let _ = persist_task.cancel().await;
        let _ = timer_task.cancel().await;
        let _ = gauge_task.cancel().await;
        if let Err(e) = server.handler().persist_offsets().await {
            tracing::error!(error = %e, shard = shard_id, "writing consumer offsets at shutdown failed");
        }
        let _ = stopped.send(());
    })
    .detach();
    Ok(endpoint)
}
