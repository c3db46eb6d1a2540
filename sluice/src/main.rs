//! `sluice`: run a broker, a proxy, or both in one process, and talk to them.
#![forbid(unsafe_code)]

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cli::client::{Connection, ConsumeOptions, SendOptions};
use cli::config::{read_toml, BrokerFile, BrokerSection, LocalFile, ProxyFile, ProxySection};

/// mimalloc instead of glibc's malloc: memory freed by the broker (idle lite topics leaving the
/// queue table) goes back to the system instead of staying in glibc's per-thread arenas, and
/// small allocations across the shard threads are cheaper (measured with scripts/lite-bench.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Sluice: an AI-native message engine speaking the RocketMQ 5 API")]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Endpoint {
    /// The proxy's gRPC address.
    #[arg(long, default_value = "127.0.0.1:8081", env = "SLUICE_ENDPOINT")]
    endpoint: String,
    #[arg(long, env = "SLUICE_ACCESS_KEY")]
    access_key: Option<String>,
    #[arg(long, env = "SLUICE_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Connect with TLS, trusting the system's root certificates (or --tls-ca).
    #[arg(long, env = "SLUICE_TLS")]
    tls: bool,
    /// Connect with TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long, env = "SLUICE_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

/// The proxy's certificate and key: TLS on its gRPC and HTTP ports.
#[derive(clap::Args, Clone)]
struct ServerTls {
    /// PEM certificate chain (overrides proxy.tls_cert_file); needs --tls-key.
    #[arg(long, env = "SLUICE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key (overrides proxy.tls_key_file); needs --tls-cert.
    #[arg(long, env = "SLUICE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ServerTls {
    fn apply(self, proxy: &mut ProxySection) {
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            proxy.tls_cert_file = Some(cert);
            proxy.tls_key_file = Some(key);
        }
    }
}

/// Where a proxy's spans go.
#[derive(clap::Args, Clone)]
struct Traces {
    /// Export spans of send, receive and ack to this OpenTelemetry collector (OTLP over
    /// HTTP/protobuf, e.g. http://localhost:4318). The standard OTEL_EXPORTER_OTLP_ENDPOINT
    /// and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT work too; with none of them, nothing is exported.
    #[arg(long)]
    otlp_endpoint: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// A broker and a proxy in one process over loopback TCP: the place to start.
    Local {
        #[arg(long, default_value = "./data", env = "SLUICE_DATA_DIR")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8081", env = "SLUICE_GRPC")]
        grpc: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8082", env = "SLUICE_HTTP")]
        http: SocketAddr,
        /// Broker shards (0: one per core).
        #[arg(long, default_value_t = 0)]
        shards: usize,
        /// sync (fdatasync before ack) or async.
        #[arg(long, default_value = "sync")]
        durability: String,
        /// Create topics on first use instead of answering TOPIC_NOT_FOUND.
        #[arg(long)]
        auto_create_topics: bool,
        /// Answer CONSUMER_GROUP_NOT_FOUND for groups not created with `sluice group create`
        /// (by default a group is recorded on first use).
        #[arg(long)]
        require_groups: bool,
        /// Log segment size (smaller for tests).
        #[arg(long)]
        segment_size_bytes: Option<u64>,
        /// A TOML file with [broker], [proxy] and [transport] sections (as `sluice broker` and
        /// `sluice proxy` take) for everything the flags above do not set; the flags win.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        tls: ServerTls,
        #[command(flatten)]
        traces: Traces,
    },
    /// A broker of a split deployment.
    Broker {
        #[arg(long)]
        config: PathBuf,
        /// Overrides broker.listen.
        #[arg(long, env = "SLUICE_BROKER_LISTEN")]
        listen: Option<SocketAddr>,
        /// Overrides broker.data_dir.
        #[arg(long, env = "SLUICE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Overrides transport.secret_file: the cluster's shared secret.
        #[arg(long, env = "SLUICE_TRANSPORT_SECRET_FILE")]
        transport_secret_file: Option<PathBuf>,
    },
    /// A stateless proxy of a split deployment.
    Proxy {
        #[arg(long)]
        config: PathBuf,
        /// Overrides proxy.grpc.
        #[arg(long, env = "SLUICE_GRPC")]
        grpc: Option<SocketAddr>,
        /// Overrides proxy.brokers (comma-separated host:port of each broker's shard 0).
        #[arg(long, env = "SLUICE_BROKERS", value_delimiter = ',')]
        brokers: Option<Vec<String>>,
        /// Overrides transport.secret_file: the cluster's shared secret.
        #[arg(long, env = "SLUICE_TRANSPORT_SECRET_FILE")]
        transport_secret_file: Option<PathBuf>,
        #[command(flatten)]
        tls: ServerTls,
        #[command(flatten)]
        traces: Traces,
    },
    /// Create, list and delete topics.
    Topic {
        #[command(subcommand)]
        action: TopicAction,
    },
    /// Create, list and delete consumer groups.
    Group {
        #[command(subcommand)]
        action: GroupAction,
    },
    /// Access control (with `proxy.acl = true`): which access key may publish or subscribe to
    /// which topics and consumer groups. Needs an admin key while the ACL is on.
    Acl {
        #[command(subcommand)]
        action: AclAction,
    },
    /// Send messages: the arguments, or one per line of stdin.
    Send {
        #[command(flatten)]
        endpoint: Endpoint,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        tag: Option<String>,
        /// A message key (repeatable).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// A user property NAME=VALUE (repeatable).
        #[arg(long = "property", value_parser = parse_property)]
        properties: Vec<(String, String)>,
        /// Send FIFO messages of this message group (to a fifo topic).
        #[arg(long)]
        message_group: Option<String>,
        /// Send delay messages, delivered this many milliseconds from now (to a delay topic).
        #[arg(long, conflicts_with = "message_group")]
        delay_ms: Option<u64>,
        bodies: Vec<String>,
    },
    /// Send a request and wait for its reply on a lite topic of its own (`a2a/{taskId}` under
    /// --reply-topic, a LITE topic); prints the reply.
    Request {
        #[command(flatten)]
        endpoint: Endpoint,
        /// Where the request goes.
        #[arg(long)]
        topic: String,
        /// The LITE topic the reply comes back on.
        #[arg(long)]
        reply_topic: String,
        /// The consumer group the requester reads replies as.
        #[arg(long, default_value = "sluice-requesters")]
        group: String,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        body: String,
    },
    /// Answer requests of a topic: each reply goes to the request's `reply_to` lite topic.
    Reply {
        #[command(flatten)]
        endpoint: Endpoint,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        group: String,
        /// Requests to answer, then exit (default: until Ctrl-C).
        #[arg(long)]
        count: Option<usize>,
        /// The reply body (default: the request's body, echoed).
        #[arg(long)]
        body: Option<String>,
        #[arg(long, default_value_t = 20)]
        wait_secs: u64,
    },
    /// Receive and ack messages of a topic as a consumer group.
    Consume {
        #[command(flatten)]
        endpoint: Endpoint,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        group: String,
        /// Tag filter: * or a || b.
        #[arg(long, default_value = "*")]
        tag: String,
        /// SQL92 filter over user properties, e.g. "region = 'eu' AND amount > 10" (instead of --tag).
        #[arg(long)]
        sql: Option<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        /// Keep waiting for new messages until Ctrl-C.
        #[arg(long)]
        follow: bool,
        /// Long-poll time per receive.
        #[arg(long, default_value_t = 2)]
        wait_secs: u64,
        #[arg(long, default_value_t = 30)]
        invisible_secs: u64,
        /// Leave messages un-acked (they come back after the invisible time).
        #[arg(long)]
        no_ack: bool,
    },
    /// Per consumer group and topic: backlog, in flight, delivered, rate and throttled
    /// receives; then the counters of the proxy and every broker shard.
    Stats {
        /// Only this consumer group's rows.
        #[arg(long)]
        group: Option<String>,
        /// Only this topic's rows.
        #[arg(long)]
        topic: Option<String>,
        /// Redraw in place every --interval-secs until Ctrl-C (with --json: a JSON line each time).
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value_t = 2.0)]
        interval_secs: f64,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Look up stored messages: by id (`get`) or by key (`find`), with each group's state.
    Message {
        #[command(subcommand)]
        action: MessageAction,
    },
}

#[derive(Subcommand)]
enum MessageAction {
    /// One message of a topic by its id: properties, body preview, where it is stored, and per
    /// consumer group whether it is pending, in flight, acked or dead-lettered.
    Get {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        id: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// The messages of a topic carrying a key (RocketMQ's `keys`), newest first.
    Find {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        key: String,
        /// At most this many (up to 256).
        #[arg(long, default_value_t = 32)]
        limit: u32,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Subcommand)]
enum TopicAction {
    Create {
        name: String,
        #[arg(long = "type", default_value = "normal")]
        kind: String,
        /// Queues of the topic (spread over brokers and shards).
        #[arg(long, default_value_t = sluice_proxy::topics::DEFAULT_QUEUE_COUNT)]
        queues: u32,
        /// LITE topics: reclaim a lite topic after this many minutes without writes, once no
        /// consumer subscribes to it (0: a day).
        #[arg(long, default_value_t = 0)]
        lite_ttl_minutes: u32,
        /// NORMAL topics: share deliveries among tenants, named by this user property, by weight.
        #[arg(long)]
        fair_key: Option<String>,
        /// Weights of named tenants, "tenant=weight,..." (1..=1000; see README "Fairness").
        #[arg(long)]
        fair_weights: Option<String>,
        /// The weight of tenants not listed (default 1).
        #[arg(long)]
        fair_default_weight: Option<u32>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Changes a topic's send quota or fairness weights at run time; options left out keep
    /// their value.
    Update {
        name: String,
        /// Send quota in messages/s across all proxies (0 removes it).
        #[arg(long)]
        max_send_tps: Option<u32>,
        /// A send over the quota: "wait" (up to 2 s) or "reject" (TOO_MANY_REQUESTS).
        #[arg(long)]
        send_throttle: Option<String>,
        /// Fair topics: the new weight list, replacing the old one ("" clears it).
        #[arg(long)]
        fair_weights: Option<String>,
        /// Fair topics: the new weight of tenants not listed.
        #[arg(long)]
        fair_default_weight: Option<u32>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    List {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    Delete {
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Subcommand)]
enum AclAction {
    /// Sets an access key's decisions on a resource: topic:NAME, topic:PREFIX*, topic:*,
    /// group:NAME, group:PREFIX*, group:* or * (every topic and group). The most specific
    /// matching rule decides; at a tie deny wins; with no rule a call is denied.
    Set {
        #[arg(value_name = "ACCESS_KEY")]
        key: String,
        resource: String,
        /// Actions to allow: pub, sub, or pub,sub.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
        /// Actions to deny: pub, sub, or pub,sub.
        #[arg(long, value_delimiter = ',')]
        deny: Vec<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Lists the rules of one access key, or of all.
    List {
        #[arg(value_name = "ACCESS_KEY")]
        key: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Removes an access key's rule on a resource, or all its rules.
    Remove {
        #[arg(value_name = "ACCESS_KEY")]
        key: String,
        resource: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

#[derive(Subcommand)]
enum GroupAction {
    Create {
        name: String,
        /// Deliveries before a message moves to the group's %DLQ% topic (0: the proxy's default, 16).
        #[arg(long, default_value_t = 0)]
        max_delivery_attempts: u32,
        /// A FIFO group: each message group is consumed in send order, one message at a time.
        #[arg(long)]
        fifo: bool,
        /// Receive quota in messages/s across all proxies (0: none).
        #[arg(long, default_value_t = 0)]
        max_receive_tps: u32,
        /// A receive over the quota: "wait" (inside its long poll) or "reject" (TOO_MANY_REQUESTS).
        #[arg(long, default_value = "wait")]
        throttle: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Changes a group's settings at run time; options left out keep their value.
    Update {
        name: String,
        #[arg(long)]
        max_delivery_attempts: Option<u32>,
        #[arg(long)]
        fifo: Option<bool>,
        /// Receive quota in messages/s across all proxies (0 removes it).
        #[arg(long)]
        max_receive_tps: Option<u32>,
        /// "wait" or "reject".
        #[arg(long)]
        throttle: Option<String>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    List {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    Delete {
        name: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Moves the group's position on every queue of a topic; deliveries then follow it.
    /// Refused while it would skip messages still in flight, unless --force.
    Reset {
        name: String,
        #[arg(long)]
        topic: String,
        /// To the first message stored at or after this time (RFC 3339, e.g. 2026-01-01T00:00:00Z).
        #[arg(long, conflicts_with = "to_offset", required_unless_present = "to_offset")]
        to_time: Option<String>,
        /// To this offset on every queue (clamped to what each queue holds).
        #[arg(long)]
        to_offset: Option<u64>,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("property {text:?} is not NAME=VALUE"))
}

fn connection(e: &Endpoint, json: bool) -> Connection {
    Connection {
        endpoint: e.endpoint.clone(),
        access_key: e.access_key.clone(),
        secret_key: e.secret_key.clone(),
        tls: e.tls || e.tls_ca.is_some(),
        tls_ca: e.tls_ca.clone(),
        json,
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let json = cli.json;
    match cli.command {
        Command::Local {
            data_dir,
            grpc,
            http,
            shards,
            durability,
            auto_create_topics,
            require_groups,
            segment_size_bytes,
            config,
            tls,
            traces: _,
        } => {
            let file: LocalFile = match &config {
                Some(path) => read_toml(path)?,
                None => LocalFile::default(),
            };
            let broker = BrokerSection {
                name: "local".into(),
                listen: "127.0.0.1:0".parse().expect("literal address"),
                data_dir,
                shards,
                durability,
                segment_size_bytes: segment_size_bytes.or(file.broker.segment_size_bytes),
                ..file.broker
            };
            let mut proxy = ProxySection { name: "local-proxy".into(), grpc, http: Some(http), ..file.proxy };
            tls.apply(&mut proxy);
            proxy.settings.auto_create_topics |= auto_create_topics;
            proxy.settings.auto_create_groups &= !require_groups;
            let transport = file.transport;
            let metrics = broker.metrics.then(|| cli::metrics::install(&broker.cluster, &broker.name)).transpose()?;
            let (mut broker, mut proxy) = (broker.to_config(&transport)?, proxy.to_config(&transport)?);
            // In one process the two share a secret of their own, so the broker's loopback port
            // serves nobody else either.
            if broker.transport.secret.is_none() {
                let secret = sluice_transport::peer_auth::PeerSecret::random();
                broker.transport.secret = Some(secret.clone());
                proxy.transport.secret = Some(secret);
            }
            cli::run::local(broker, proxy, metrics, json).await
        }
        Command::Broker { config, listen, data_dir, transport_secret_file } => {
            let mut file: BrokerFile = read_toml(&config)?;
            if transport_secret_file.is_some() {
                file.transport.secret_file = transport_secret_file;
            }
            if let Some(listen) = listen {
                file.broker.listen = listen;
            }
            if let Some(dir) = data_dir {
                file.broker.data_dir = dir;
            }
            let metrics_addr = file.broker.metrics_addr()?;
            let metrics = file
                .broker
                .metrics
                .then(|| cli::metrics::install(&file.broker.cluster, &file.broker.name))
                .transpose()?;
            cli::run::broker(file.broker.to_config(&file.transport)?, metrics_addr, metrics, json).await
        }
        Command::Proxy { config, grpc, brokers, transport_secret_file, tls, traces: _ } => {
            let mut file: ProxyFile = read_toml(&config)?;
            if transport_secret_file.is_some() {
                file.transport.secret_file = transport_secret_file;
            }
            if let Some(grpc) = grpc {
                file.proxy.grpc = grpc;
            }
            if let Some(brokers) = brokers {
                file.proxy.brokers = brokers;
            }
            tls.apply(&mut file.proxy);
            let mut proxy = file.proxy.to_config(&file.transport)?;
            if file.proxy.metrics {
                let metrics = cli::metrics::install(&file.proxy.cluster, &file.proxy.name)?;
                proxy.metrics = Some(cli::metrics::page(metrics, None));
            }
            cli::run::proxy(proxy, json).await
        }
        Command::Topic { action } => match action {
            TopicAction::Create {
                name,
                kind,
                queues,
                lite_ttl_minutes,
                fair_key,
                fair_weights,
                fair_default_weight,
                endpoint,
            } => {
                let request = sluice_proxy::pb::sluice::admin::v1::CreateTopicRequest {
                    name,
                    message_type: 0,
                    queue_count: queues,
                    lite_ttl_minutes,
                    fair_key: fair_key.unwrap_or_default(),
                    fair_weights: fair_weights.unwrap_or_default(),
                    fair_default_weight: fair_default_weight.unwrap_or(0),
                };
                cli::client::topic_create(&connection(&endpoint, json), &kind, request).await
            }
            TopicAction::Update { name, max_send_tps, send_throttle, fair_weights, fair_default_weight, endpoint } => {
                let request = sluice_proxy::pb::sluice::admin::v1::UpdateTopicRequest {
                    name,
                    max_send_tps,
                    send_throttle,
                    fair_weights,
                    fair_default_weight,
                };
                cli::client::topic_update(&connection(&endpoint, json), request).await
            }
            TopicAction::List { endpoint } => cli::client::topic_list(&connection(&endpoint, json)).await,
            TopicAction::Delete { name, endpoint } => {
                cli::client::topic_delete(&connection(&endpoint, json), &name).await
            }
        },
        Command::Group { action } => match action {
            GroupAction::Create { name, max_delivery_attempts, fifo, max_receive_tps, throttle, endpoint } => {
                let request = sluice_proxy::pb::sluice::admin::v1::CreateGroupRequest {
                    name,
                    max_delivery_attempts,
                    fifo,
                    max_receive_tps,
                    throttle,
                };
                cli::client::group_create(&connection(&endpoint, json), request).await
            }
            GroupAction::Update { name, max_delivery_attempts, fifo, max_receive_tps, throttle, endpoint } => {
                let request = sluice_proxy::pb::sluice::admin::v1::UpdateGroupRequest {
                    name,
                    max_delivery_attempts,
                    fifo,
                    max_receive_tps,
                    throttle,
                };
                cli::client::group_update(&connection(&endpoint, json), request).await
            }
            GroupAction::List { endpoint } => cli::client::group_list(&connection(&endpoint, json)).await,
            GroupAction::Delete { name, endpoint } => {
                cli::client::group_delete(&connection(&endpoint, json), &name).await
            }
            GroupAction::Reset { name, topic, to_time, to_offset, force, endpoint } => {
                use cli::inspect::ResetTarget;
                let to = match (to_time, to_offset) {
                    (Some(time), _) => ResetTarget::Time(time),
                    (None, Some(offset)) => ResetTarget::Offset(offset),
                    (None, None) => return Err("give --to-time or --to-offset".into()),
                };
                cli::inspect::group_reset(&connection(&endpoint, json), &name, &topic, to, force).await
            }
        },
        Command::Acl { action } => match action {
            AclAction::Set { key, resource, allow, deny, endpoint } => {
                let request =
                    sluice_proxy::pb::sluice::admin::v1::SetAclRuleRequest { access_key: key, resource, allow, deny };
                cli::acl::set(&connection(&endpoint, json), request).await
            }
            AclAction::List { key, endpoint } => cli::acl::list(&connection(&endpoint, json), key).await,
            AclAction::Remove { key, resource, endpoint } => {
                cli::acl::remove(&connection(&endpoint, json), key, resource).await
            }
        },
        Command::Message { action } => match action {
            MessageAction::Get { topic, id, endpoint } => {
                cli::inspect::message_get(&connection(&endpoint, json), &topic, &id).await
            }
            MessageAction::Find { topic, key, limit, endpoint } => {
                cli::inspect::message_find(&connection(&endpoint, json), &topic, &key, limit).await
            }
        },
        Command::Send { endpoint, topic, tag, keys, properties, message_group, delay_ms, bodies } => {
            let delay = delay_ms.map(Duration::from_millis);
            let options = SendOptions { topic, tag, keys, properties, message_group, delay };
            cli::client::send(&connection(&endpoint, json), options, bodies).await
        }
        Command::Consume { endpoint, topic, group, tag, sql, count, follow, wait_secs, invisible_secs, no_ack } => {
            let options = ConsumeOptions {
                topic,
                group,
                tag,
                sql,
                count,
                follow,
                wait: Duration::from_secs(wait_secs),
                invisible: Duration::from_secs(invisible_secs),
                ack: !no_ack,
            };
            cli::client::consume(&connection(&endpoint, json), options).await
        }
        Command::Stats { group, topic, watch, interval_secs, endpoint } => {
            if !interval_secs.is_finite() || interval_secs <= 0.0 {
                return Err(format!("--interval-secs {interval_secs} is not a positive number of seconds"));
            }
            let interval = Duration::from_secs_f64(interval_secs.min(3600.0));
            let options = cli::stats::StatsOptions { group, topic, watch, interval };
            cli::stats::stats(&connection(&endpoint, json), options).await
        }
        Command::Request { endpoint, topic, reply_topic, group, timeout_secs, body } => {
            let options = cli::agent::RequestOptions {
                topic,
                reply_topic,
                group,
                timeout: Duration::from_secs(timeout_secs),
                body: body.into_bytes(),
            };
            cli::agent::request(&connection(&endpoint, json), options).await
        }
        Command::Reply { endpoint, topic, group, count, body, wait_secs } => {
            let options = cli::agent::ReplyOptions { topic, group, count, body, wait: Duration::from_secs(wait_secs) };
            cli::agent::reply(&connection(&endpoint, json), options).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only a proxy makes spans (`sluice local` runs one).
    let otlp = match &cli.command {
        Command::Local { traces, .. } => cli::telemetry::Otlp::configured(traces.otlp_endpoint.clone(), "sluice-local"),
        Command::Proxy { traces, .. } => cli::telemetry::Otlp::configured(traces.otlp_endpoint.clone(), "sluice-proxy"),
        _ => None,
    };
    // Declared before the runtime, so dropped after it: queued spans are flushed last.
    let _telemetry = match cli::telemetry::init(otlp) {
        Ok(telemetry) => telemetry,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap checks a command's definition (unique argument names, valid defaults) only when it
    /// parses that subcommand; this checks every one.
    #[test]
    fn every_subcommand_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
