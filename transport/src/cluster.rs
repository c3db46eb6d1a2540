//! The client side of a set of brokers: which broker and shard owns a queue, and one
//! connection per shard, opened lazily and reopened after it breaks.
//!
//! Queues are placed with `model::placement` (CRC32C picks the broker, FNV-1a the shard), so
//! any number of clients with the same broker list route identically. The pool learns each
//! broker's shard count from shard 0's `HelloAck`. It holds no durable state.

use std::sync::Arc;

use tokio::sync::Mutex;
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

/// One shard connection, opened on first use and again after it breaks.
struct ShardLink {
    endpoint: String,
    client: Mutex<Option<Client>>,
}

struct BrokerLinks {
    name: String,
    address: BrokerAddress,
    shards: Vec<ShardLink>,
}

pub struct BrokerPool {
    scheme: String,
    transport: TransportConfig,
    brokers: Vec<BrokerLinks>,
    client_name: String,
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
        let mut pool =
            BrokerPool { scheme: scheme.to_string(), transport, brokers: Vec::new(), client_name: client_name.into() };
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
        let client = self.open(&first).await?;
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
        let shards = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, endpoint)| ShardLink { endpoint, client: Mutex::new((i == 0).then(|| client.clone())) })
            .collect();
        Ok(BrokerLinks { name: hello.server_name.clone(), address, shards })
    }

    async fn open(&self, endpoint: &str) -> Result<Client, ClusterError> {
        let url = format!("{}://{endpoint}", self.scheme);
        Client::connect(&url, self.transport.clone(), &self.client_name)
            .await
            .map_err(|e| ClusterError::Unavailable { endpoint: endpoint.to_string(), source: e })
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

    /// The live connection to a shard, reconnecting if the last one closed.
    async fn client(&self, owner: Owner) -> Result<Client, ClusterError> {
        let link = &self.brokers[owner.broker].shards[owner.shard];
        let mut slot = link.client.lock().await;
        if let Some(client) = slot.as_ref() {
            if client.closed_error().is_none() {
                return Ok(client.clone());
            }
        }
        let client = self.open(&link.endpoint).await?;
        *slot = Some(client.clone());
        Ok(client)
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
            let mut after = String::new();
            loop {
                let request =
                    ListQueuesRequest { prefix: prefix.to_string(), after: after.clone(), max_count: LIST_PAGE };
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
        }
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
