//! Split deployments as real processes: `sluice broker` and `sluice proxy` children on free
//! ports and temporary data directories. Covers request signing (access keys), per-topic and
//! per-group access control (`proxy.acl`, `sluice acl`), broker crash
//! durability (SIGKILL, restart on the same data directory), graceful broker shutdown keeping
//! consumer progress (SIGTERM), and a proxy that keeps answering with typed statuses while its
//! broker is gone and works again once it is back.
//!
//! Every wait is bounded; a child that dies early fails the test with its stderr; children are
//! killed when their handle drops.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_proxy::pb::apache::rocketmq::v2 as pb;
use sluice_proxy::pb::apache::rocketmq::v2::messaging_service_client::MessagingServiceClient;
use sluice_proxy::pb::sluice::admin::v1 as admin;
use sluice_proxy::pb::sluice::admin::v1::admin_client::AdminClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// How long a child gets to start accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(40);
/// Upper bound on any single gRPC call or CLI run.
const CALL_TIMEOUT: Duration = Duration::from_secs(40);
/// How long a SIGTERMed broker gets to exit.
const GRACEFUL_EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Shards per broker in every test.
const SHARDS: u16 = 2;
const SEGMENT_SIZE_BYTES: u64 = 64 << 20;

const OK: i32 = pb::Code::Ok as i32;
const UNAUTHORIZED: i32 = pb::Code::Unauthorized as i32;
const FORBIDDEN: i32 = pb::Code::Forbidden as i32;
const TOPIC_NOT_FOUND: i32 = pb::Code::TopicNotFound as i32;
const MESSAGE_NOT_FOUND: i32 = pb::Code::MessageNotFound as i32;
const INTERNAL_SERVER_ERROR: i32 = pb::Code::InternalServerError as i32;
const PROXY_TIMEOUT: i32 = pb::Code::ProxyTimeout as i32;

// ---------------------------------------------------------------------------------------------
// Ports and child processes
// ---------------------------------------------------------------------------------------------

/// Ports handed out in this test process, so parallel tests never pick the same ones.
static TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A base port with `n` consecutive free ports, below the ephemeral range (so outgoing
/// connections of other tests cannot be sitting on them).
fn free_ports(n: u16) -> u16 {
    let mut taken = TAKEN.lock().unwrap();
    for _ in 0..10_000 {
        let base = 15_000 + (rand::random::<u16>() % 17_000);
        if (base..base + n).any(|p| taken.contains(&p)) {
            continue;
        }
        let probes: Vec<_> = (base..base + n).map(|p| TcpListener::bind(("127.0.0.1", p))).collect();
        if probes.iter().all(Result::is_ok) {
            taken.extend(base..base + n);
            return base;
        }
    }
    panic!("no {n} consecutive free ports found");
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child `sluice` process; SIGKILLed when dropped. Its stdout and stderr go to a log file
/// (appended across restarts) so a failure can show them.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

fn sluice() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    for var in [
        "SLUICE_ENDPOINT",
        "SLUICE_ACCESS_KEY",
        "SLUICE_SECRET_KEY",
        "SLUICE_DATA_DIR",
        "SLUICE_GRPC",
        "SLUICE_HTTP",
        "SLUICE_BROKERS",
        "SLUICE_BROKER_LISTEN",
    ] {
        command.env_remove(var);
    }
    command.env("SLUICE_LOG", "info");
    command
}

impl Proc {
    fn spawn(name: &str, args: &[&str], log: &Path) -> Proc {
        let mut file = OpenOptions::new().create(true).append(true).open(log).unwrap();
        use std::io::Write as _;
        writeln!(file, "===== {name}: sluice {} =====", args.join(" ")).unwrap();
        let child = sluice()
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"));
        Proc { name: name.to_string(), child, log: log.to_path_buf() }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the child's output if it has exited.
    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}) {what}; its output:\n{}", self.name, self.output());
        }
    }

    /// What this spawn wrote (the log is shared with earlier spawns of the same role).
    fn own_output(&self) -> String {
        let all = self.output();
        let header = format!("===== {}:", self.name);
        all.rfind(&header).map_or(all.clone(), |at| all[at..].to_string())
    }

    /// Waits until this process printed `marker` (its "listening" line) and every address
    /// accepts a TCP connection. Accepting alone is not enough: the sockets of a SIGKILLed
    /// predecessor on the same ports can still accept for a moment after it was reaped.
    fn wait_ready(&mut self, marker: &str, addrs: &[SocketAddr]) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.own_output().contains(marker) {
            self.assert_running(&format!("before printing {marker:?}"));
            if Instant::now() > deadline {
                panic!(
                    "{} did not print {marker:?} within {START_TIMEOUT:?}; its output:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for a in addrs {
            loop {
                self.assert_running(&format!("before accepting on {a}"));
                if TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    panic!(
                        "{} does not accept on {a} after {START_TIMEOUT:?}; its output:\n{}",
                        self.name,
                        self.output()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// After the process is gone: waits until nothing accepts on `addrs` any more (a killed
    /// glommio process's sockets are released a little after it is reaped).
    fn wait_released(&self, addrs: &[SocketAddr]) {
        let deadline = Instant::now() + START_TIMEOUT;
        for a in addrs {
            while TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok() {
                assert!(Instant::now() < deadline, "{a} still accepts {START_TIMEOUT:?} after {} died", self.name);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGTERM, then the exit status if it exits within `timeout` (else SIGKILL and `None`).
    fn sigterm(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let sent = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {} failed", self.pid());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                self.sigkill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A broker's files and ports; `start` may be called again after the process is gone.
struct BrokerSpec {
    config: PathBuf,
    log: PathBuf,
    base: u16,
}

impl BrokerSpec {
    fn new(work: &Path, name: &str) -> BrokerSpec {
        let base = free_ports(SHARDS);
        let data = work.join(format!("{name}-data"));
        let config = work.join(format!("{name}.toml"));
        let toml = format!(
            "[broker]\nname = \"{name}\"\nlisten = \"127.0.0.1:{base}\"\ndata_dir = {data:?}\nshards = {SHARDS}\n\
             pin_shards = false\ndurability = \"sync\"\nsegment_size_bytes = {SEGMENT_SIZE_BYTES}\n\
             metrics_listen = \"127.0.0.1:0\"\n",
            data = data.display().to_string(),
        );
        std::fs::write(&config, toml).unwrap();
        BrokerSpec { config, log: work.join(format!("{name}.log")), base }
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.base)
    }

    fn start(&self) -> Proc {
        let mut proc = Proc::spawn("broker", &["broker", "--config", self.config.to_str().unwrap()], &self.log);
        let last_shard = format!("broker shard {}: tcp://", SHARDS - 1);
        proc.wait_ready(&last_shard, &self.addrs());
        proc
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        (0..SHARDS).map(|i| addr(self.base + i)).collect()
    }

    /// SIGKILLs the broker and waits until its ports are free again.
    fn crash(&self, mut broker: Proc) {
        broker.sigkill();
        broker.wait_released(&self.addrs());
    }
}

struct ProxySpec {
    config: PathBuf,
    log: PathBuf,
    port: u16,
}

impl ProxySpec {
    /// `extra` is more TOML for the `[proxy]` section, `transport` for `[transport]`.
    fn new(work: &Path, name: &str, brokers: &[String], extra: &str) -> ProxySpec {
        let port = free_ports(1);
        let config = work.join(format!("{name}.toml"));
        let list = brokers.iter().map(|b| format!("\"{b}\"")).collect::<Vec<_>>().join(", ");
        let toml = format!(
            "[proxy]\nname = \"{name}\"\ngrpc = \"127.0.0.1:{port}\"\nbrokers = [{list}]\ntransport = \"tcp\"\n{extra}\n"
        );
        std::fs::write(&config, toml).unwrap();
        ProxySpec { config, log: work.join(format!("{name}.log")), port }
    }

    fn start(&self) -> Proc {
        let mut proc = Proc::spawn("proxy", &["proxy", "--config", self.config.to_str().unwrap()], &self.log);
        proc.wait_ready("gRPC (RocketMQ 5 clients", &[addr(self.port)]);
        proc
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC helpers
// ---------------------------------------------------------------------------------------------

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {CALL_TIMEOUT:?}"),
    }
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the proxy on port {port}: {e}"))
}

async fn messaging(port: u16) -> MessagingServiceClient<Channel> {
    MessagingServiceClient::new(channel(port).await)
}

/// How a request is signed.
#[derive(Clone, Copy)]
enum Sig<'a> {
    /// No authorization header (the date header is still sent).
    Unsigned,
    /// Signed with these keys.
    Keys(&'a str, &'a str),
    /// This literal authorization header.
    Raw(&'a str),
    /// Signed with these keys, but without the x-mq-date-time header.
    KeysNoDate(&'a str, &'a str),
    /// Signed with these keys at this `x-mq-date-time` (an old one is an expired signature).
    KeysAt(&'a str, &'a str, &'a str),
}

fn request<T>(message: T, sig: Sig<'_>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    let m = r.metadata_mut();
    let date = match sig {
        Sig::KeysAt(_, _, date) => date.to_string(),
        _ => sluice_proxy::auth::date_time_now(),
    };
    if !matches!(sig, Sig::KeysNoDate(..)) {
        m.insert("x-mq-date-time", MetadataValue::try_from(date.as_str()).unwrap());
    }
    let header = match sig {
        Sig::Unsigned => None,
        Sig::Keys(ak, sk) | Sig::KeysNoDate(ak, sk) | Sig::KeysAt(ak, sk, _) => {
            Some(sluice_proxy::auth::sign(ak, sk, &date))
        }
        Sig::Raw(text) => Some(text.to_string()),
    };
    if let Some(h) = header {
        m.insert("authorization", MetadataValue::try_from(h.as_str()).unwrap());
    }
    r
}

fn resource(name: &str) -> Option<pb::Resource> {
    Some(pb::Resource { resource_namespace: String::new(), name: name.into() })
}

fn code(status: &Option<pb::Status>) -> i32 {
    status.as_ref().map_or(-1, |s| s.code)
}

fn describe(status: &Option<pb::Status>) -> String {
    match status {
        Some(s) => format!("{} {:?}: {}", s.code, pb::Code::try_from(s.code).ok(), s.message),
        None => "no status".into(),
    }
}

async fn heartbeat(client: &mut MessagingServiceClient<Channel>, sig: Sig<'_>) -> Option<pb::Status> {
    let hb = pb::HeartbeatRequest { group: None, client_type: pb::ClientType::Producer as i32 };
    bounded("Heartbeat", client.heartbeat(request(hb, sig))).await.expect("Heartbeat gRPC").into_inner().status
}

async fn query_route(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    sig: Sig<'_>,
) -> pb::QueryRouteResponse {
    let q = pb::QueryRouteRequest { topic: resource(topic), endpoints: None };
    bounded("QueryRoute", client.query_route(request(q, sig))).await.expect("QueryRoute gRPC").into_inner()
}

async fn create_topic(port: u16, name: &str) {
    let mut client = AdminClient::new(channel(port).await);
    let create = admin::CreateTopicRequest {
        name: name.into(),
        message_type: pb::MessageType::Normal as i32,
        queue_count: 0,
        lite_ttl_minutes: 0,
        ..Default::default()
    };
    let reply = bounded("CreateTopic", client.create_topic(create)).await.expect("CreateTopic gRPC").into_inner();
    assert_eq!(code(&reply.status), OK, "create topic {name}: {}", describe(&reply.status));
}

fn message(topic: &str, id: &str, body: &str) -> pb::Message {
    pb::Message {
        topic: resource(topic),
        user_properties: HashMap::new(),
        system_properties: Some(pb::SystemProperties {
            message_id: id.into(),
            body_encoding: pb::Encoding::Identity as i32,
            message_type: pb::MessageType::Normal as i32,
            born_timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            born_host: "auth-and-restart-test".into(),
            ..Default::default()
        }),
        body: body.as_bytes().to_vec(),
    }
}

/// Sends one message; returns the response (the caller checks the status).
async fn send(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    id: &str,
    body: &str,
) -> pb::SendMessageResponse {
    let r = pb::SendMessageRequest { messages: vec![message(topic, id, body)] };
    bounded("SendMessage", client.send_message(request(r, Sig::Unsigned))).await.expect("SendMessage gRPC").into_inner()
}

/// Sends `n` messages one by one, each acked OK; returns id → body.
async fn send_acked(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    n: usize,
    tag: &str,
) -> HashMap<String, String> {
    let mut sent = HashMap::new();
    let run: u32 = rand::random();
    for i in 0..n {
        let id = format!("{tag}-{run:08X}-{i:05}");
        let body = format!("body of {tag} message {i} ({run:08X})");
        let reply = send(client, topic, &id, &body).await;
        assert_eq!(code(&reply.status), OK, "send {i}: {}", describe(&reply.status));
        assert_eq!(reply.entries.len(), 1);
        assert_eq!(code(&reply.entries[0].status), OK, "send {i} entry: {}", describe(&reply.entries[0].status));
        assert_eq!(reply.entries[0].message_id, id);
        sent.insert(id, body);
    }
    sent
}

/// One ReceiveMessage: its status and messages, or the gRPC error.
async fn receive(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    group: &str,
    batch: i32,
    wait: Duration,
) -> Result<(Option<pb::Status>, Vec<pb::Message>), tonic::Status> {
    let r = pb::ReceiveMessageRequest {
        group: resource(group),
        message_queue: Some(pb::MessageQueue { topic: resource(topic), id: 0, ..Default::default() }),
        filter_expression: Some(pb::FilterExpression { r#type: pb::FilterType::Tag as i32, expression: "*".into() }),
        batch_size: batch,
        invisible_duration: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration { seconds: wait.as_secs() as i64, nanos: 0 }),
        attempt_id: None,
    };
    let mut stream = client.receive_message(request(r, Sig::Unsigned)).await?.into_inner();
    let mut status = None;
    let mut messages = Vec::new();
    while let Some(item) = stream.message().await? {
        match item.content {
            Some(pb::receive_message_response::Content::Status(s)) => status = Some(s),
            Some(pb::receive_message_response::Content::Message(m)) => messages.push(m),
            _ => {}
        }
    }
    Ok((status, messages))
}

fn id_of(m: &pb::Message) -> String {
    m.system_properties.as_ref().map(|s| s.message_id.clone()).unwrap_or_default()
}

async fn ack(client: &mut MessagingServiceClient<Channel>, topic: &str, group: &str, messages: &[pb::Message]) {
    let entries = messages
        .iter()
        .map(|m| {
            let system = m.system_properties.clone().unwrap_or_default();
            pb::AckMessageEntry {
                message_id: system.message_id,
                receipt_handle: system.receipt_handle.unwrap_or_default(),
                lite_topic: None,
            }
        })
        .collect();
    let r = pb::AckMessageRequest { group: resource(group), topic: resource(topic), entries };
    let reply =
        bounded("AckMessage", client.ack_message(request(r, Sig::Unsigned))).await.expect("Ack gRPC").into_inner();
    assert_eq!(code(&reply.status), OK, "ack: {}", describe(&reply.status));
    for entry in &reply.entries {
        assert_eq!(code(&entry.status), OK, "ack {}: {}", entry.message_id, describe(&entry.status));
    }
}

/// Receives (and acks, when `ack_them`) until `limit` messages came or two polls in a row came
/// back empty; returns every delivery as (id, body) in arrival order.
async fn consume(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    group: &str,
    limit: usize,
    ack_them: bool,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut got = Vec::new();
    let mut empty_polls = 0;
    while got.len() < limit && empty_polls < 2 {
        assert!(Instant::now() < deadline, "consuming {topic} as {group} took too long ({} so far)", got.len());
        let want = ((limit - got.len()).min(32)) as i32;
        let (status, messages) = bounded("ReceiveMessage", receive(client, topic, group, want, Duration::from_secs(2)))
            .await
            .expect("Receive gRPC");
        match code(&status) {
            OK => {}
            MESSAGE_NOT_FOUND => {}
            _ => panic!("receive {topic} as {group}: {}", describe(&status)),
        }
        if messages.is_empty() {
            empty_polls += 1;
            continue;
        }
        empty_polls = 0;
        assert!(messages.len() <= want as usize, "asked for {want}, got {}", messages.len());
        for m in &messages {
            got.push((id_of(m), String::from_utf8(m.body.clone()).expect("utf-8 body")));
        }
        if ack_them {
            ack(client, topic, group, &messages).await;
        }
    }
    got
}

/// Checks `got` holds every message of `expected` exactly once and nothing else.
fn assert_exactly(got: &[(String, String)], expected: &HashMap<String, String>, what: &str) {
    let mut seen = HashSet::new();
    let mut duplicates = Vec::new();
    let mut unexpected = Vec::new();
    for (id, body) in got {
        if !seen.insert(id.clone()) {
            duplicates.push(id.clone());
        }
        match expected.get(id) {
            Some(b) => assert_eq!(b, body, "{what}: body of {id} changed"),
            None => unexpected.push(id.clone()),
        }
    }
    let missing: Vec<_> = expected.keys().filter(|id| !seen.contains(*id)).collect();
    assert!(
        duplicates.is_empty() && unexpected.is_empty() && missing.is_empty(),
        "{what}: {} delivered, {} expected; duplicates {duplicates:?}; unexpected {unexpected:?}; missing {} {:?}",
        got.len(),
        expected.len(),
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
}

/// Runs the CLI with a bounded wait; returns (success, stdout, stderr).
async fn cli(args: &[&str]) -> (bool, String, String) {
    let mut command = tokio::process::Command::from(sluice());
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let out = bounded("the sluice CLI", command.output()).await.expect("run the sluice CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn access_keys_guard_every_request() {
    let work = tempfile::tempdir().unwrap();
    let broker_spec = BrokerSpec::new(work.path(), "broker");
    let mut broker = broker_spec.start();
    let keys = "access_keys = [{ access_key = \"ak1\", secret_key = \"sk1\" }]";
    let secured = ProxySpec::new(work.path(), "secured", &[broker_spec.endpoint()], keys);
    let mut proxy = secured.start();
    let mut client = messaging(secured.port).await;

    // No authorization header, a wrong secret, an unknown key, a malformed header, no date.
    for (what, sig) in [
        ("no authorization header", Sig::Unsigned),
        ("wrong secret", Sig::Keys("ak1", "wrong")),
        ("unknown access key", Sig::Keys("nobody", "sk1")),
        ("malformed header", Sig::Raw("Bearer token")),
        ("no x-mq-date-time", Sig::KeysNoDate("ak1", "sk1")),
    ] {
        let hb = heartbeat(&mut client, sig).await;
        assert_eq!(code(&hb), UNAUTHORIZED, "Heartbeat with {what}: {}", describe(&hb));
        let route = query_route(&mut client, "t1", sig).await;
        assert_eq!(code(&route.status), UNAUTHORIZED, "QueryRoute with {what}: {}", describe(&route.status));
        assert!(route.message_queues.is_empty());
    }
    let reply = send(&mut client, "t1", "unsigned-send", "x").await;
    assert_eq!(code(&reply.status), UNAUTHORIZED, "unsigned SendMessage: {}", describe(&reply.status));

    // The right signature.
    let good = Sig::Keys("ak1", "sk1");
    let hb = heartbeat(&mut client, good).await;
    assert_eq!(code(&hb), OK, "signed Heartbeat: {}", describe(&hb));
    let route = query_route(&mut client, "t1", good).await;
    assert_eq!(code(&route.status), TOPIC_NOT_FOUND, "signed QueryRoute before create: {}", describe(&route.status));

    // The CLI: without keys it is refused, with wrong keys too, with the right keys it works.
    let endpoint = format!("127.0.0.1:{}", secured.port);
    let (ok, out, err) = cli(&["topic", "create", "t1", "--type", "normal", "--endpoint", &endpoint]).await;
    assert!(!ok, "topic create without keys succeeded: {out}");
    assert!(err.to_lowercase().contains("unauthorized"), "error does not say unauthorized: {err}");
    let (ok, out, err) = cli(&[
        "topic",
        "create",
        "t1",
        "--type",
        "normal",
        "--endpoint",
        &endpoint,
        "--access-key",
        "ak1",
        "--secret-key",
        "bad",
    ])
    .await;
    assert!(!ok, "topic create with a wrong secret succeeded: {out}");
    assert!(err.to_lowercase().contains("unauthorized"), "error does not say unauthorized: {err}");
    let (ok, out, err) = cli(&[
        "topic",
        "create",
        "t1",
        "--type",
        "normal",
        "--endpoint",
        &endpoint,
        "--access-key",
        "ak1",
        "--secret-key",
        "sk1",
    ])
    .await;
    assert!(ok, "topic create with keys failed: {out}\n{err}");

    let route = query_route(&mut client, "t1", good).await;
    assert_eq!(code(&route.status), OK, "signed QueryRoute after create: {}", describe(&route.status));
    assert!(!route.message_queues.is_empty());
    let route = query_route(&mut client, "t1", Sig::Unsigned).await;
    assert_eq!(code(&route.status), UNAUTHORIZED, "unsigned QueryRoute after create: {}", describe(&route.status));

    // The CLI's send and consume sign too.
    let (ok, out, err) =
        cli(&["send", "--topic", "t1", "--endpoint", &endpoint, "--access-key", "ak1", "--secret-key", "sk1", "hello"])
            .await;
    assert!(ok, "signed send failed: {out}\n{err}");
    let (ok, _, err) = cli(&["consume", "--topic", "t1", "--group", "g1", "--endpoint", &endpoint, "--json"]).await;
    assert!(!ok && err.to_lowercase().contains("unauthorized"), "unsigned consume: {err}");
    let (ok, out, err) = cli(&[
        "consume",
        "--topic",
        "t1",
        "--group",
        "g1",
        "--endpoint",
        &endpoint,
        "--json",
        "--count",
        "1",
        "--access-key",
        "ak1",
        "--secret-key",
        "sk1",
    ])
    .await;
    assert!(ok, "signed consume failed: {out}\n{err}");
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or("")).expect("consume --json line");
    assert_eq!(line["body"], "hello");

    // A proxy without keys accepts anything in the authorization header.
    let open = ProxySpec::new(work.path(), "open", &[broker_spec.endpoint()], "");
    let mut open_proxy = open.start();
    let mut open_client = messaging(open.port).await;
    for sig in [Sig::Unsigned, Sig::Raw("garbage"), Sig::Keys("ak1", "whatever"), Sig::KeysNoDate("x", "y")] {
        let hb = heartbeat(&mut open_client, sig).await;
        assert_eq!(code(&hb), OK, "open proxy Heartbeat: {}", describe(&hb));
        let route = query_route(&mut open_client, "t1", sig).await;
        assert_eq!(code(&route.status), OK, "open proxy QueryRoute: {}", describe(&route.status));
    }

    proxy.assert_running("after the auth checks");
    open_proxy.assert_running("after the auth checks");
    broker.assert_running("after the auth checks");
}

/// One signed SendMessage of a fresh message.
async fn send_as(client: &mut MessagingServiceClient<Channel>, topic: &str, sig: Sig<'_>) -> Option<pb::Status> {
    let id = format!("acl-{:016X}", rand::random::<u64>());
    let r = pb::SendMessageRequest { messages: vec![message(topic, &id, "acl test")] };
    let reply = bounded("SendMessage", client.send_message(request(r, sig))).await.expect("SendMessage gRPC");
    let reply = reply.into_inner();
    match code(&reply.status) {
        OK => reply.entries.first().and_then(|e| e.status.clone()),
        _ => reply.status,
    }
}

/// One signed ReceiveMessage of up to 16 messages, waiting 1 s; its status and how many came.
async fn receive_as(
    client: &mut MessagingServiceClient<Channel>,
    topic: &str,
    group: &str,
    sig: Sig<'_>,
) -> (Option<pb::Status>, usize) {
    let r = pb::ReceiveMessageRequest {
        group: resource(group),
        message_queue: Some(pb::MessageQueue { topic: resource(topic), id: 0, ..Default::default() }),
        filter_expression: Some(pb::FilterExpression { r#type: pb::FilterType::Tag as i32, expression: "*".into() }),
        batch_size: 16,
        invisible_duration: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
        attempt_id: None,
    };
    let mut stream =
        bounded("ReceiveMessage", client.receive_message(request(r, sig))).await.expect("Receive gRPC").into_inner();
    let (mut status, mut count) = (None, 0);
    while let Some(item) = bounded("ReceiveMessage stream", stream.message()).await.expect("Receive stream") {
        match item.content {
            Some(pb::receive_message_response::Content::Status(s)) => status = Some(s),
            Some(pb::receive_message_response::Content::Message(_)) => count += 1,
            _ => {}
        }
    }
    (status, count)
}

/// Asserts a FORBIDDEN status whose message names `resource` and holds no secret.
fn assert_forbidden(status: &Option<pb::Status>, resource: &str, what: &str) {
    assert_eq!(code(status), FORBIDDEN, "{what}: {}", describe(status));
    let message = &status.as_ref().unwrap().message;
    assert!(message.contains(resource), "{what}: the refusal does not name {resource}: {message}");
    assert!(!message.contains("secret-"), "{what}: the refusal shows a secret key: {message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn acl_allows_and_denies_per_topic_and_group() {
    let work = tempfile::tempdir().unwrap();
    let broker_spec = BrokerSpec::new(work.path(), "broker");
    let mut broker = broker_spec.start();
    let keys = "acl = true\naccess_keys = [\n  { access_key = \"root\", secret_key = \"secret-root\", admin = true },\n  \
                { access_key = \"app1\", secret_key = \"secret-1\" },\n  { access_key = \"app2\", secret_key = \"secret-2\" },\n]";
    let spec = ProxySpec::new(work.path(), "acl", &[broker_spec.endpoint()], keys);
    let mut proxy = spec.start();
    let endpoint = format!("127.0.0.1:{}", spec.port);
    let as_key = |key: &'static str, secret: &'static str| {
        let endpoint = endpoint.clone();
        move |args: &[&str]| -> Vec<String> {
            let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            all.extend(["--endpoint", &endpoint, "--access-key", key, "--secret-key", secret].map(String::from));
            all
        }
    };
    let (root, app1) = (as_key("root", "secret-root"), as_key("app1", "secret-1"));
    let run = |args: Vec<String>| async move { cli(&args.iter().map(String::as_str).collect::<Vec<_>>()).await };

    // Only the admin key may create topics and manage rules while the ACL is on.
    let (ok, out, err) = run(app1(&["topic", "create", "orders-eu", "--type", "normal"])).await;
    assert!(!ok && err.contains("40300") && err.contains("not an admin key"), "app1 created a topic: {out}{err}");
    for topic in ["orders-eu", "orders-us", "audit"] {
        let (ok, out, err) = run(root(&["topic", "create", topic, "--type", "normal"])).await;
        assert!(ok, "root could not create {topic}: {out}{err}");
    }
    let (ok, out, err) = run(app1(&["acl", "set", "app1", "*", "--allow", "pub,sub"])).await;
    assert!(!ok && err.contains("40300"), "app1 granted itself everything: {out}{err}");
    for rule in [
        &["acl", "set", "app1", "topic:orders-*", "--allow", "pub,sub"][..],
        &["acl", "set", "app1", "topic:orders-us", "--deny", "sub"],
        &["acl", "set", "app1", "group:billing", "--allow", "sub"],
        &["acl", "set", "app2", "topic:audit", "--allow", "pub"],
    ] {
        let (ok, out, err) = run(root(rule)).await;
        assert!(ok, "{rule:?}: {out}{err}");
    }
    let (ok, out, err) = run(root(&["acl", "set", "app1", "topic:a*b", "--allow", "pub"])).await;
    assert!(!ok && err.contains("'*' other than at its end"), "a bad pattern was taken: {out}{err}");
    let (ok, out, err) = run(root(&["--json", "acl", "list", "app1"])).await;
    assert!(ok, "acl list: {out}{err}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).expect("acl list --json");
    assert_eq!(listed["enabled"], true);
    let rules: Vec<(String, String, String)> = listed["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["resource"].as_str().unwrap().into(),
                r["pub"].as_str().unwrap().into(),
                r["sub"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expected =
        [("group:billing", "", "allow"), ("topic:orders-*", "allow", "allow"), ("topic:orders-us", "", "deny")];
    let expected: Vec<(String, String, String)> =
        expected.iter().map(|(r, p, s)| (r.to_string(), p.to_string(), s.to_string())).collect();
    assert_eq!(rules, expected, "app1's rules as listed");

    let mut client = messaging(spec.port).await;
    let app1_sig = Sig::Keys("app1", "secret-1");
    // Allowed: publish to a topic its prefix rule covers, subscribe as its group.
    assert_eq!(code(&send_as(&mut client, "orders-eu", app1_sig).await), OK);
    assert_eq!(code(&send_as(&mut client, "orders-us", app1_sig).await), OK, "pub on orders-us stays allowed");
    let (status, count) = receive_as(&mut client, "orders-eu", "billing", app1_sig).await;
    assert_eq!(code(&status), OK, "app1 receiving orders-eu as billing: {}", describe(&status));
    assert_eq!(count, 1);
    let route = query_route(&mut client, "orders-us", app1_sig).await;
    assert_eq!(code(&route.status), OK, "a route needs pub or sub: {}", describe(&route.status));

    // Denied, each naming the resource: another key's topic, an exact deny over the prefix
    // allow, a group with no rule, a heartbeat as that group.
    assert_forbidden(&send_as(&mut client, "audit", app1_sig).await, "topic \"audit\"", "app1 sending to app2's topic");
    let (status, _) = receive_as(&mut client, "orders-us", "billing", app1_sig).await;
    assert_forbidden(&status, "topic \"orders-us\"", "app1 receiving a denied topic");
    assert!(status.unwrap().message.contains("denied by its rule topic:orders-us"));
    let (status, _) = receive_as(&mut client, "orders-eu", "other", app1_sig).await;
    assert_forbidden(&status, "group \"other\"", "app1 receiving as a group it has no rule for");
    let hb = pb::HeartbeatRequest { group: resource("other"), client_type: pb::ClientType::SimpleConsumer as i32 };
    let hb = bounded("Heartbeat", client.heartbeat(request(hb, app1_sig))).await.unwrap().into_inner().status;
    assert_forbidden(&hb, "group \"other\"", "app1's heartbeat as another group");
    let app2_sig = Sig::Keys("app2", "secret-2");
    assert_eq!(code(&send_as(&mut client, "audit", app2_sig).await), OK);
    assert_forbidden(&send_as(&mut client, "orders-eu", app2_sig).await, "topic \"orders-eu\"", "app2 on app1's topic");
    let (status, _) = receive_as(&mut client, "audit", "billing", app2_sig).await;
    assert_forbidden(&status, "audit", "app2 subscribing with only pub");

    // Wrong, missing or expired credentials are UNAUTHORIZED before the ACL is asked.
    let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    let stale = sluice_proxy::auth::format_date_time(
        two_days_ago.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64,
    );
    for (what, sig) in [
        ("a wrong secret", Sig::Keys("app1", "secret-2")),
        ("no credentials", Sig::Unsigned),
        ("an unknown key", Sig::Keys("app3", "secret-1")),
        ("an expired signature", Sig::KeysAt("app1", "secret-1", &stale)),
    ] {
        let status = send_as(&mut client, "orders-eu", sig).await;
        assert_eq!(code(&status), UNAUTHORIZED, "send with {what}: {}", describe(&status));
        assert!(!status.unwrap().message.contains("secret-"), "the refusal of {what} shows a secret");
    }
    let status = send_as(&mut client, "orders-eu", Sig::KeysAt("app1", "secret-1", &stale)).await;
    assert!(status.unwrap().message.contains("more than a day"), "an expired signature is not named as one");

    // The admin key passes every check; a removed rule stops applying within the cache's 2 s.
    assert_eq!(code(&send_as(&mut client, "audit", Sig::Keys("root", "secret-root")).await), OK);
    let (ok, out, err) = run(root(&["acl", "remove", "app1", "topic:orders-*"])).await;
    assert!(ok && out.contains("removed 1 rule"), "acl remove: {out}{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = send_as(&mut client, "orders-eu", app1_sig).await;
        if code(&status) == FORBIDDEN {
            break;
        }
        assert_eq!(code(&status), OK, "send while the rule is being removed: {}", describe(&status));
        assert!(Instant::now() < deadline, "the removed rule still applies after 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, out, err) = run(root(&["acl", "remove", "app1"])).await;
    assert!(ok && out.contains("removed 2 rule"), "acl remove of all app1's rules: {out}{err}");

    // A proxy with the ACL on and no admin key, or no keys at all, refuses to start.
    for (name, extra, complaint) in [
        ("no-admin", "acl = true\naccess_keys = [{ access_key = \"a\", secret_key = \"s\" }]", "needs an admin key"),
        ("no-keys", "acl = true", "needs proxy.access_keys"),
    ] {
        let bad = ProxySpec::new(work.path(), name, &[broker_spec.endpoint()], extra);
        let mut command = tokio::process::Command::from(sluice());
        command.args(["proxy", "--config", bad.config.to_str().unwrap()]).stdin(Stdio::null()).kill_on_drop(true);
        let out = bounded("a misconfigured proxy", command.output()).await.expect("run sluice proxy");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(complaint), "{name}: {stderr}");
    }

    proxy.assert_running("after the ACL checks");
    broker.assert_running("after the ACL checks");
}

#[tokio::test(flavor = "multi_thread")]
async fn acked_messages_survive_broker_sigkill() {
    let work = tempfile::tempdir().unwrap();
    let broker_spec = BrokerSpec::new(work.path(), "broker");
    let broker = broker_spec.start();
    let proxy_spec = ProxySpec::new(work.path(), "proxy", &[broker_spec.endpoint()], "");
    let mut proxy = proxy_spec.start();
    create_topic(proxy_spec.port, "durable").await;
    let mut client = messaging(proxy_spec.port).await;
    let sent = send_acked(&mut client, "durable", 200, "crash").await;

    broker_spec.crash(broker);
    let mut broker = broker_spec.start();

    // The same proxy must reconnect on demand: allow it a short while, but note if the first
    // request after the restart fails.
    let mut first_failure = None;
    let mut reconnected = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        proxy.assert_running("after the broker restart");
        match bounded("probe receive", receive(&mut client, "durable", "probe", 1, Duration::from_secs(1))).await {
            // The probe group's delivery stays invisible; the real check uses another group.
            Ok((status, _)) if code(&status) == OK || code(&status) == MESSAGE_NOT_FOUND => {
                reconnected = true;
                break;
            }
            Ok((status, _)) => first_failure.get_or_insert_with(|| describe(&status)),
            Err(e) => first_failure.get_or_insert_with(|| format!("gRPC error {e}")),
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(why) = &first_failure {
        eprintln!("note: the first request after the broker restart failed: {why}");
    }
    if !reconnected {
        eprintln!("BUG: the proxy did not reconnect to the restarted broker; restarting the proxy");
        drop(proxy);
        proxy = proxy_spec.start();
        client = messaging(proxy_spec.port).await;
    }

    let got = consume(&mut client, "durable", "after-crash", 400, true).await;
    assert_exactly(&got, &sent, "after SIGKILL and restart");
    proxy.assert_running("at the end");
    broker.assert_running("at the end");
    assert!(reconnected, "the proxy did not reconnect to the restarted broker within 10 s ({first_failure:?})");
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_broker_shutdown_keeps_consumer_progress() {
    let work = tempfile::tempdir().unwrap();
    let broker_spec = BrokerSpec::new(work.path(), "broker");
    let mut broker = broker_spec.start();
    let proxy_spec = ProxySpec::new(work.path(), "proxy", &[broker_spec.endpoint()], "");
    let mut proxy = proxy_spec.start();
    create_topic(proxy_spec.port, "progress").await;
    let mut client = messaging(proxy_spec.port).await;
    let sent = send_acked(&mut client, "progress", 200, "term").await;

    let first = consume(&mut client, "progress", "G", 100, true).await;
    assert_eq!(first.len(), 100, "first half");
    let first_ids: HashSet<_> = first.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(first_ids.len(), 100, "duplicates in the first half");

    let started = Instant::now();
    let status = broker.sigterm(GRACEFUL_EXIT_TIMEOUT);
    let output = broker.output();
    let status = status.unwrap_or_else(|| {
        panic!("the broker did not exit within {GRACEFUL_EXIT_TIMEOUT:?} of SIGTERM; its output:\n{output}")
    });
    assert!(status.success(), "the broker exited with {status} after SIGTERM; its output:\n{output}");
    eprintln!("broker exited {status} {:?} after SIGTERM", started.elapsed());
    broker.wait_released(&broker_spec.addrs());
    drop(broker);
    let mut broker = broker_spec.start();

    // Give the proxy its reconnect (checked in its own test); then the rest, exactly once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probe =
            bounded("probe receive", receive(&mut client, "progress", "warmup", 1, Duration::from_secs(1))).await;
        let ok = matches!(&probe, Ok((status, _)) if code(status) == OK || code(status) == MESSAGE_NOT_FOUND);
        if ok || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rest = consume(&mut client, "progress", "G", 200, true).await;
    let expected: HashMap<_, _> =
        sent.iter().filter(|(id, _)| !first_ids.contains(*id)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let redelivered: Vec<_> = rest.iter().filter(|(id, _)| first_ids.contains(id)).map(|(id, _)| id).collect();
    assert!(
        redelivered.is_empty(),
        "{} acked messages came back after a graceful restart: {redelivered:?}",
        redelivered.len()
    );
    assert_exactly(&rest, &expected, "after SIGTERM and restart");
    proxy.assert_running("at the end");
    broker.assert_running("at the end");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_answers_typed_errors_while_broker_is_down() {
    let work = tempfile::tempdir().unwrap();
    let broker_spec = BrokerSpec::new(work.path(), "broker");
    let broker = broker_spec.start();
    // Long polls of at most 5 s bound the proxy's broker request timeout at 20 s.
    let proxy_spec = ProxySpec::new(work.path(), "proxy", &[broker_spec.endpoint()], "long_poll_max_ms = 5000");
    let mut proxy = proxy_spec.start();
    create_topic(proxy_spec.port, "waiting").await;
    create_topic(proxy_spec.port, "flowing").await;
    let mut client = messaging(proxy_spec.port).await;
    send_acked(&mut client, "flowing", 5, "warm").await;

    // A long poll parked on the empty topic, and a sender in a loop, when the broker dies.
    let poll_client = client.clone();
    let poll = tokio::spawn(async move {
        let mut c = poll_client;
        let started = Instant::now();
        let out =
            tokio::time::timeout(CALL_TIMEOUT, receive(&mut c, "waiting", "parked", 8, Duration::from_secs(5))).await;
        (out, started.elapsed())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sender_stop = stop.clone();
    let sender_client = client.clone();
    let sender = tokio::spawn(async move {
        let mut c = sender_client;
        let mut outcomes = Vec::new();
        let mut i = 0;
        while !sender_stop.load(Ordering::SeqCst) {
            let id = format!("loop-{i:05}");
            let started = Instant::now();
            let reply =
                tokio::time::timeout(CALL_TIMEOUT, send(&mut c, "flowing", &id, &format!("loop body {i}"))).await;
            let reply = reply.unwrap_or_else(|_| panic!("SendMessage {i} hung for {CALL_TIMEOUT:?}"));
            outcomes.push((id, code(&reply.status), describe(&reply.status), started.elapsed()));
            i += 1;
        }
        outcomes
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    broker_spec.crash(broker);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);

    let (polled, poll_took) = bounded("the parked receive task", poll).await.unwrap();
    let polled = polled.unwrap_or_else(|_| panic!("the parked receive hung past {CALL_TIMEOUT:?}"));
    let (status, messages) = polled.expect("the parked receive failed at the gRPC level instead of with a Status");
    eprintln!("parked receive answered after {poll_took:?}: {}", describe(&status));
    assert!(messages.is_empty());
    assert!(
        [INTERNAL_SERVER_ERROR, PROXY_TIMEOUT].contains(&code(&status)),
        "the parked receive answered {} instead of a typed broker error",
        describe(&status)
    );

    let outcomes = bounded("the sender task", sender).await.unwrap();
    let after_kill = outcomes.iter().filter(|o| o.1 != OK).count();
    for (id, c, text, took) in &outcomes {
        assert!([OK, INTERNAL_SERVER_ERROR, PROXY_TIMEOUT].contains(c), "send {id} answered {text} after {took:?}");
    }
    assert!(after_kill > 0, "no send failed although the broker was down: {outcomes:?}");
    let slowest = outcomes.iter().map(|o| o.3).max().unwrap_or_default();
    eprintln!("{} sends, {after_kill} failed with a typed status; slowest {slowest:?}", outcomes.len());

    // A fresh request while the broker is down: a typed status, promptly.
    let started = Instant::now();
    let reply = send(&mut client, "flowing", "while-down", "x").await;
    let took = started.elapsed();
    assert!(
        [INTERNAL_SERVER_ERROR, PROXY_TIMEOUT].contains(&code(&reply.status)),
        "send while the broker is down answered {}",
        describe(&reply.status)
    );
    assert!(took < Duration::from_secs(25), "send while the broker is down took {took:?}");
    let (status, _) =
        bounded("receive while down", receive(&mut client, "waiting", "parked", 1, Duration::from_secs(1)))
            .await
            .expect("receive while down");
    assert!(
        [INTERNAL_SERVER_ERROR, PROXY_TIMEOUT].contains(&code(&status)),
        "receive while the broker is down answered {}",
        describe(&status)
    );
    proxy.assert_running("while the broker is down");
    assert!(!proxy.output().contains("panicked"), "the proxy panicked:\n{}", proxy.output());
    eprintln!("broker down for {:?} so far", killed_at.elapsed());

    // Back up: requests work again.
    let mut broker = broker_spec.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempts = Vec::new();
    loop {
        let reply = send(&mut client, "flowing", "after-restart", "back").await;
        attempts.push(describe(&reply.status));
        if code(&reply.status) == OK {
            break;
        }
        assert!(Instant::now() < deadline, "sends still fail 10 s after the broker restart: {attempts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if attempts.len() > 1 {
        eprintln!("note: {} send(s) failed after the broker was back: {attempts:?}", attempts.len() - 1);
    }
    // Everything acked before the crash, and the message sent after it, is there.
    let mut expected: HashSet<String> = outcomes.iter().filter(|o| o.1 == OK).map(|o| o.0.clone()).collect();
    expected.insert("after-restart".into());
    let got = consume(&mut client, "flowing", "check", 100_000, true).await;
    let got_ids: HashSet<_> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(got_ids.len(), got.len(), "duplicate deliveries to a fresh group");
    let missing: Vec<_> = expected.difference(&got_ids).collect();
    assert!(missing.is_empty(), "acked sends lost: {missing:?}");
    let (status, _) =
        bounded("receive after restart", receive(&mut client, "waiting", "parked", 1, Duration::from_secs(1)))
            .await
            .expect("receive after restart");
    assert_eq!(code(&status), MESSAGE_NOT_FOUND, "receive on the empty topic after restart: {}", describe(&status));
    proxy.assert_running("at the end");
    broker.assert_running("at the end");
    assert!(attempts.len() == 1, "the first send after the broker restart failed: {attempts:?}");
}

/// A second broker configured on ports a running broker serves must refuse to start. Today it
/// starts: glommio's `TcpListener::bind` sets SO_REUSEPORT (transport/src/server.rs, the
/// listener bind in `start_local`), so the kernel splits new proxy connections between the two
/// brokers and topics silently go to whichever one a connection landed on.
#[tokio::test(flavor = "multi_thread")]
async fn second_broker_on_a_used_port_fails_to_start() {
    let work = tempfile::tempdir().unwrap();
    let first = BrokerSpec::new(work.path(), "first");
    let mut running = first.start();
    let second = BrokerSpec::new(work.path(), "second");
    // Same ports as the first, its own data directory.
    let toml = std::fs::read_to_string(&second.config)
        .unwrap()
        .replace(&format!("127.0.0.1:{}", second.base), &format!("127.0.0.1:{}", first.base));
    std::fs::write(&second.config, toml).unwrap();
    let mut clash = Proc::spawn("second", &["broker", "--config", second.config.to_str().unwrap()], &second.log);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = clash.child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    running.assert_running("while a second broker started on its ports");
    match status {
        Some(status) => assert!(!status.success(), "the second broker exited 0:\n{}", clash.output()),
        None => panic!(
            "a second broker started on ports {}..{} that a running broker serves; its output:\n{}",
            first.base,
            first.base + SHARDS,
            clash.output()
        ),
    }
}
