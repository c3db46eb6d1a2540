//! The client side of a set of brokers: which broker and shard owns a queue, and one
//! connection per shard, opened lazily and reopened after it breaks.
//!
//! A broken connection is reopened by a background loop (an attempt at least every
//! `RECONNECT_ATTEMPT_MAX_MS`), so a healed network is used again within about a second.
//! Meanwhile calls to that shard wait at most `LINK_DOWN_WAIT_MS` for it and then fail with
//! `Unavailable`: a client hears about an unreachable broker quickly instead of at its deadline.
//! The loss and the recovery are logged once each.
//!
//! Queues are placed with `model::placement` (CRC32C picks the broker, FNV-1a the shard), so
//! any number of clients with the same broker list route identically. The pool learns each
//! broker's shard count from shard 0's `HelloAck`. It holds no durable state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tracing::Instrument as _;

use crate::messages::{ListQueuesRequest, ListQueuesResponse};
use crate::model::placement::{broker_for_queue, shard_for_queue};
use crate::{Client, Frame, FrameError, Request, TransportConfig, TransportError};

/// Why a cluster call failed. Codes 2301+ (never reused); a broker's own error keeps its code.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("broker {endpoint} is unavailable: {source}")]
    Unavailable { endpoint: String, source: TransportError },
    #[error("broker {endpoint} timed out: {source}")]
    Timeout { endpoint: String, source: TransportError },
    #[error("broker error {code}: {message}")]
    Remote { code: u32, message: String },
    #[error("broker reply: {0}")]
    Frame(#[from] FrameError),
}

impl ClusterError {
    pub fn code(&self) -> u32 {
        match self {
            ClusterError::Config(_) => 2301,
            ClusterError::Unavailable { .. } => 2302,
            ClusterError::Timeout { .. } => 2303,
            ClusterError::Remote { code, .. } => *code,
            ClusterError::Frame(e) => e.code(),
        }
    }

    fn from_transport(endpoint: &str, e: TransportError) -> ClusterError {
        match e {
            TransportError::Remote { code, message } => ClusterError::Remote { code, message },
            e @ TransportError::Timeout { .. } => ClusterError::Timeout { endpoint: endpoint.into(), source: e },
            e => ClusterError::Unavailable { endpoint: endpoint.into(), source: e },
        }
    }
}

/// How a client reaches one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAddress {
    /// `host:port` of shard 0; shard i is at port + i.
    Base(String),
    /// Every shard's `host:port`, in shard order (in-process brokers on ephemeral ports).
    Shards(Vec<String>),
}

/// Longest a reconnect attempt (connect and Hello) may take before the next one starts, so one
/// lost SYN during a cut does not hold the link down long after the network heals.
pub const RECONNECT_ATTEMPT_MAX_MS: u64 = 1_000;
/// Pause between failed reconnect attempts (a refused connection fails at once).
pub const RECONNECT_PAUSE_MS: u64 = 100;
/// Longest a call waits for a down link to come back before it fails with `Unavailable`; covers
/// a broker restart without making clients wait out their deadlines during an outage.
pub const LINK_DOWN_WAIT_MS: u64 = 1_000;

/// How the pool opens connections; shared with the reconnect loops.
struct Connector {
    scheme: String,
    transport: TransportConfig,
    client_name: String,
}

impl Connector {
    async fn open(&self, endpoint: &str) -> Result<Client, ClusterError> {
        let url = format!("{}://{endpoint}", self.scheme);
        Client::connect(&url, self.transport.clone(), &self.client_name)
            .await
            .map_err(|e| ClusterError::Unavailable { endpoint: endpoint.to_string(), source: e })
    }
}

enum LinkState {
    /// Not opened yet: shards other than 0 open on first use.
    Unopened,
    Up {
        client: Client,
        generation: u64,
    },
    /// Broken; a reconnect loop runs. `error` is the latest reason.
    Down {
        since: Instant,
        error: String,
    },
}

/// One shard connection, opened on first use and reopened in the background after it breaks.
struct ShardLink {
    endpoint: String,
    state: std::sync::Mutex<LinkState>,
    /// Serialises the first open, so a burst of first calls opens one connection.
    opening: tokio::sync::Mutex<()>,
    /// Bumped on every state change; calls waiting for a down link watch it.
    changed: tokio::sync::watch::Sender<u64>,
    generations: AtomicU64,
}

/// What a call finds on a link.
enum LinkNow {
    Unopened,
    Up(Client),
    Down(ClusterError),
}

impl ShardLink {
    fn new(endpoint: String) -> Arc<ShardLink> {
        Arc::new(ShardLink {
            endpoint,
            state: std::sync::Mutex::new(LinkState::Unopened),
            opening: tokio::sync::Mutex::new(()),
            changed: tokio::sync::watch::Sender::new(0),
            generations: AtomicU64::new(0),
        })
    }

    fn set(&self, state: LinkState) {
        *self.state.lock().expect("link state lock") = state;
        self.changed.send_modify(|n| *n += 1);
    }

    fn now(self: &Arc<Self>, connector: &Arc<Connector>) -> LinkNow {
        let state = self.state.lock().expect("link state lock");
        match &*state {
            LinkState::Unopened => LinkNow::Unopened,
            LinkState::Up { client, generation } => match client.closed_error() {
                None => LinkNow::Up(client.clone()),
                Some(_) => {
                    // Closed before its watcher ran: take the link down here.
                    let generation = *generation;
                    drop(state);
                    self.lost(connector, generation);
                    self.now(connector)
                }
            },
            LinkState::Down { since, error } => LinkNow::Down(self.down_error(*since, error)),
        }
    }

    fn down_error(&self, since: Instant, error: &str) -> ClusterError {
        ClusterError::Unavailable {
            endpoint: self.endpoint.clone(),
            source: TransportError::Closed {
                reason: format!(
                    "the link has been down for {} ms ({error}); reconnecting in the background",
                    since.elapsed().as_millis()
                ),
            },
        }
    }

    /// Puts an open connection in place and watches it: when it closes, the link goes down.
    fn install(self: &Arc<Self>, connector: &Arc<Connector>, client: Client) {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let closed = client.closed();
        self.set(LinkState::Up { client, generation });
        let (link, connector) = (Arc::downgrade(self), connector.clone());
        tokio::spawn(async move {
            closed.await;
            if let Some(link) = link.upgrade() {
                link.lost(&connector, generation);
            }
        });
    }

    /// The connection of `generation` closed: mark the link down once and start reconnecting.
    fn lost(self: &Arc<Self>, connector: &Arc<Connector>, generation: u64) {
        let mut state = self.state.lock().expect("link state lock");
        let LinkState::Up { client, generation: current } = &*state else { return };
        if *current != generation {
            return;
        }
        let error = client.closed_error().map_or_else(|| "closed".to_string(), |e| e.to_string());
        tracing::warn!(
            broker = %self.endpoint, %error,
            "broker link lost; calls to this shard fail with UNAVAILABLE until it is back; reconnecting"
        );
        *state = LinkState::Down { since: Instant::now(), error };
        drop(state);
        self.changed.send_modify(|n| *n += 1);
        tokio::spawn(reconnect(Arc::downgrade(self), connector.clone()));
    }
}

/// Reopens a down link until it is back or the pool is gone.
async fn reconnect(link: Weak<ShardLink>, connector: Arc<Connector>) {
    let started = Instant::now();
    let attempt_ms = connector.transport.connect_timeout_ms.min(RECONNECT_ATTEMPT_MAX_MS);
    for attempt in 1u64.. {
        let Some(strong) = link.upgrade() else { return };
        let opened = tokio::time::timeout(Duration::from_millis(attempt_ms), connector.open(&strong.endpoint)).await;
        let error = match opened {
            Ok(Ok(client)) => {
                tracing::info!(
                    broker = %strong.endpoint, down_ms = started.elapsed().as_millis() as u64, attempts = attempt,
                    "broker link is back"
                );
                strong.install(&connector, client);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no connection and Hello within {attempt_ms} ms"),
        };
        tracing::debug!(broker = %strong.endpoint, attempt, %error, "reconnect failed");
        if let LinkState::Down { error: last, .. } = &mut *strong.state.lock().expect("link state lock") {
            *last = error;
        }
        drop(strong);
        tokio::time::sleep(Duration::from_millis(RECONNECT_PAUSE_MS)).await;
    }
}

struct BrokerLinks {
    name: String,
    address: BrokerAddress,
    shards: Vec<Arc<ShardLink>>,
}

pub struct BrokerPool {
    connector: Arc<Connector>,
    brokers: Vec<BrokerLinks>,
}

/// A queue's owner: broker index and shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub broker: usize,
    pub shard: usize,
}

fn split_host_port(address: &str) -> Result<(String, u16), ClusterError> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| ClusterError::Config(format!("broker address {address:?} is not host:port")))?;
    let port = port.parse().map_err(|_| ClusterError::Config(format!("broker address {address:?} has a bad port")))?;
    Ok((host.to_string(), port))
}

impl BrokerPool {
    /// Connects to every broker's first shard to learn its shard count, then opens the
    /// rest lazily. `scheme` is tcp, rdma or auto.
    pub async fn connect(
        addresses: Vec<BrokerAddress>,
        scheme: &str,
        transport: TransportConfig,
        client_name: &str,
    ) -> Result<BrokerPool, ClusterError> {
        if addresses.is_empty() {
            return Err(ClusterError::Config("at least one broker address is needed".into()));
        }
        if !matches!(scheme, "tcp" | "rdma" | "auto") {
            return Err(ClusterError::Config(format!("transport {scheme:?} is not tcp, rdma or auto")));
        }
        let connector =
            Arc::new(Connector { scheme: scheme.to_string(), transport, client_name: client_name.to_string() });
        let mut pool = BrokerPool { connector, brokers: Vec::new() };
        for address in addresses {
            let links = pool.connect_broker(address).await?;
            pool.brokers.push(links);
        }
        Ok(pool)
    }

    async fn connect_broker(&self, address: BrokerAddress) -> Result<BrokerLinks, ClusterError> {
        let first = match &address {
            BrokerAddress::Base(base) => base.clone(),
            BrokerAddress::Shards(list) => {
                list.first().cloned().ok_or_else(|| ClusterError::Config("a broker with no shard addresses".into()))?
            }
        };
        let client = self.connector.open(&first).await?;
        let hello = client.server().ok_or_else(|| ClusterError::Config(format!("broker {first} sent no HelloAck")))?;
        let shard_count = hello.shard_count.max(1) as usize;
        let endpoints = match &address {
            BrokerAddress::Shards(list) if list.len() == shard_count => list.clone(),
            BrokerAddress::Shards(list) => {
                return Err(ClusterError::Config(format!(
                    "broker {first} has {shard_count} shards but {} addresses were given",
                    list.len()
                )))
            }
            BrokerAddress::Base(base) => {
                let (host, port) = split_host_port(base)?;
                (0..shard_count)
                    .map(|i| {
                        u16::try_from(usize::from(port) + i)
                            .map(|p| format!("{host}:{p}"))
                            .map_err(|_| ClusterError::Config(format!("broker {base}: shard ports run past 65535")))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        if hello.shard != 0 {
            return Err(ClusterError::Config(format!(
                "{first} is shard {} of broker {:?}; give the address of shard 0",
                hello.shard, hello.server_name
            )));
        }
        let shards: Vec<Arc<ShardLink>> = endpoints.into_iter().map(ShardLink::new).collect();
        shards[0].install(&self.connector, client);
        Ok(BrokerLinks { name: hello.server_name.clone(), address, shards })
    }

    pub fn broker_count(&self) -> usize {
        self.brokers.len()
    }

    pub fn broker_name(&self, broker: usize) -> &str {
        &self.brokers[broker].name
    }

    pub fn addresses(&self) -> Vec<BrokerAddress> {
        self.brokers.iter().map(|b| b.address.clone()).collect()
    }

    /// Every (broker, shard) pair, for fan-out requests (list, stats).
    pub fn all_shards(&self) -> Vec<Owner> {
        self.brokers
            .iter()
            .enumerate()
            .flat_map(|(broker, links)| (0..links.shards.len()).map(move |shard| Owner { broker, shard }))
            .collect()
    }

    pub fn shard_endpoint(&self, owner: Owner) -> &str {
        &self.brokers[owner.broker].shards[owner.shard].endpoint
    }

    pub fn owner(&self, queue: &str) -> Owner {
        let broker = broker_for_queue(queue, self.brokers.len());
        let shard = shard_for_queue(queue, self.brokers[broker].shards.len());
        Owner { broker, shard }
    }

    /// The live connection to a shard: opened on first use; a down link is waited for at most
    /// `LINK_DOWN_WAIT_MS` (its reconnect loop runs in the background).
    async fn client(&self, owner: Owner) -> Result<Client, ClusterError> {
        let link = &self.brokers[owner.broker].shards[owner.shard];
        let mut waited = false;
        loop {
            // Subscribed before looking, so a change in between is not missed.
            let mut changed = link.changed.subscribe();
            match link.now(&self.connector) {
                LinkNow::Up(client) => return Ok(client),
                LinkNow::Unopened => return self.open_first(link).await,
                LinkNow::Down(error) if waited => return Err(error),
                LinkNow::Down(_) => {
                    let _ = tokio::time::timeout(Duration::from_millis(LINK_DOWN_WAIT_MS), changed.changed()).await;
                    waited = true;
                }
            }
        }
    }

    async fn open_first(&self, link: &Arc<ShardLink>) -> Result<Client, ClusterError> {
        let _opening = link.opening.lock().await;
        match link.now(&self.connector) {
            LinkNow::Up(client) => return Ok(client),
            LinkNow::Down(error) => return Err(error),
            LinkNow::Unopened => {}
        }
        match self.connector.open(&link.endpoint).await {
            Ok(client) => {
                link.install(&self.connector, client.clone());
                Ok(client)
            }
            Err(e) => {
                tracing::warn!(broker = %link.endpoint, error = %e, "could not open a broker link; reconnecting in the background");
                link.set(LinkState::Down { since: Instant::now(), error: e.to_string() });
                tokio::spawn(reconnect(Arc::downgrade(link), self.connector.clone()));
                Err(e)
            }
        }
    }

    /// Sends a request to a shard and returns the reply frame (validated by `access`).
    pub async fn call<R: Request>(&self, owner: Owner, request: &R) -> Result<Frame, ClusterError> {
        let span = crate::spans::broker_hop(R::KIND, self.shard_endpoint(owner));
        let call = async {
            let client = self.client(owner).await?;
            crate::spans::record_transport(&span, crate::metrics::transport_label(client.transport()));
            client.call(request).await.map_err(|e| ClusterError::from_transport(self.shard_endpoint(owner), e))
        };
        let result = call.instrument(span.clone()).await;
        match &result {
            Err(e) if !span.is_disabled() => crate::spans::record_error(&span, e.code(), &e.to_string()),
            _ => {}
        }
        result
    }

    /// `call` to the queue's owner.
    pub async fn call_for<R: Request>(&self, queue: &str, request: &R) -> Result<Frame, ClusterError> {
        self.call(self.owner(queue), request).await
    }
}

/// A queue configuration as a broker reported it (topics and groups are stored as these).
#[derive(Debug, Clone)]
pub struct QueueRecord {
    pub name: String,
    pub message_type: u8,
    pub attributes: Vec<(String, String)>,
    pub messages: u64,
}

impl QueueRecord {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Queue records asked for per ListQueues page.
const LIST_PAGE: u32 = 1000;

fn records(reply: &<ListQueuesResponse as crate::Message>::ArchivedBody) -> Vec<QueueRecord> {
    reply
        .queues
        .iter()
        .map(|q| QueueRecord {
            name: q.name.as_str().to_string(),
            message_type: q.message_type,
            attributes: q.attributes.iter().map(|t| (t.0.as_str().to_string(), t.1.as_str().to_string())).collect(),
            messages: q.max_offset.to_native().saturating_sub(q.min_offset.to_native()),
        })
        .collect()
}

impl BrokerPool {
    /// The configuration of exactly `queue`, from its owner.
    pub async fn queue_record(&self, queue: &str) -> Result<Option<QueueRecord>, ClusterError> {
        let request = ListQueuesRequest { prefix: queue.to_string(), after: String::new(), max_count: 1 };
        let frame = self.call_for(queue, &request).await?;
        Ok(records(frame.access::<ListQueuesResponse>()?).into_iter().find(|r| r.name == queue))
    }

    /// Every queue configuration whose name starts with `prefix`, on every shard of every broker.
    pub async fn queue_records(&self, prefix: &str) -> Result<Vec<QueueRecord>, ClusterError> {
        let mut all = Vec::new();
        for owner in self.all_shards() {
            all.extend(self.records_on(owner, prefix, usize::MAX).await?);
        }
        Ok(all)
    }

    /// The configurations of the children of `parent` (names starting `parent/`): one shard
    /// holds them all, since children are placed with their parent. At most `max` of them.
    pub async fn child_records(&self, parent: &str, max: usize) -> Result<Vec<QueueRecord>, ClusterError> {
        self.records_on(self.owner(parent), &format!("{parent}/"), max).await
    }

    /// At most `max` configurations on one shard whose names start with `prefix`, in name order.
    async fn records_on(&self, owner: Owner, prefix: &str, max: usize) -> Result<Vec<QueueRecord>, ClusterError> {
        let mut all = Vec::new();
        let mut after = String::new();
        while all.len() < max {
            let request = ListQueuesRequest { prefix: prefix.to_string(), after: after.clone(), max_count: LIST_PAGE };
            let frame = self.call(owner, &request).await?;
            let reply = frame.access::<ListQueuesResponse>()?;
            let page = records(reply);
            let next = page.last().filter(|_| reply.truncated).map(|last| last.name.clone());
            all.extend(page);
            match next {
                Some(name) => after = name,
                None => break,
            }
        }
        all.truncate(max);
        Ok(all)
    }
}

/// Shared handle to the pool.
pub type Brokers = Arc<BrokerPool>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        assert_eq!(split_host_port("127.0.0.1:7400").unwrap(), ("127.0.0.1".into(), 7400));
        assert!(split_host_port("nohost").is_err());
        assert!(split_host_port("h:99999").is_err());
    }

    #[test]
    fn codes_are_stable_and_remote_codes_pass_through() {
        assert_eq!(ClusterError::Config(String::new()).code(), 2301);
        assert_eq!(ClusterError::Remote { code: 3001, message: String::new() }.code(), 3001);
    }
}
