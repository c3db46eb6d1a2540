//! Shared helpers of the proxy's integration tests: real `sluice` child processes (local mode,
//! or brokers and proxies from generated TOML files), readiness checks, topic creation, and
//! RocketMQ v2 / admin gRPC clients. Every wait here is bounded.
#![allow(dead_code)]

pub mod history;

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use sluice_proto::sluice::admin::v1 as admin;
use sluice_proto::sluice::admin::v1::admin_client::AdminClient;
use tonic::transport::Channel;

pub use sluice_proto::apache::rocketmq::v2;
pub use v2::messaging_service_client::MessagingServiceClient;

pub type Messaging = MessagingServiceClient<Channel>;

/// Small log segments keep the data directories small.
pub const SEGMENT_SIZE_BYTES: u64 = 64 << 20;
/// Largest gRPC message the test clients send or accept.
pub const GRPC_MESSAGE_MAX_BYTES: usize = 64 << 20;
/// How long a child gets to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child gets to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on one CLI invocation.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// The base of `n` consecutive free TCP ports on 127.0.0.1, below the ephemeral range so
/// outgoing connections do not take them meanwhile. Free when checked; a child that then fails
/// to bind is retried by the callers that can.
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..1000 {
        let base = rand::random_range(20_000..32_000 - n);
        let held: Vec<_> = (0..n).map(|i| TcpListener::bind(("127.0.0.1", base + i))).collect();
        if held.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("found no {n} consecutive free ports");
}

pub fn free_port() -> u16 {
    free_ports(1)
}

/// A `sluice` child process, stopped (SIGTERM, then SIGKILL) when dropped. Its stdout and
/// stderr go to files in `log_dir`, so a chatty child never blocks on a full pipe.
pub struct SluiceProcess {
    pub name: String,
    child: Child,
    exited: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl SluiceProcess {
    pub fn spawn(name: &str, args: &[String], log_dir: &Path) -> SluiceProcess {
        SluiceProcess::spawn_with_env(name, args, log_dir, &[])
    }

    /// With more environment variables (e.g. libfaketime's, for a clock step).
    pub fn spawn_with_env(name: &str, args: &[String], log_dir: &Path, env: &[(String, String)]) -> SluiceProcess {
        let stdout_path = log_dir.join(format!("{name}.stdout"));
        let stderr_path = log_dir.join(format!("{name}.stderr"));
        let stdout = File::create(&stdout_path).expect("create stdout log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let mut command = Command::new(sluice_bin());
        command.args(args).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        for var in [
            "SLUICE_ENDPOINT",
            "SLUICE_GRPC",
            "SLUICE_HTTP",
            "SLUICE_DATA_DIR",
            "SLUICE_BROKERS",
            "SLUICE_BROKER_LISTEN",
            "SLUICE_ACCESS_KEY",
            "SLUICE_SECRET_KEY",
            "SLUICE_TLS_CERT",
            "SLUICE_TLS_KEY",
            "SLUICE_TRANSPORT_SECRET_FILE",
        ] {
            command.env_remove(var);
        }
        remove_otel_env(&mut command);
        command.env("SLUICE_LOG", std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "info".into()));
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {} {args:?}: {e}", sluice_bin()));
        SluiceProcess { name: name.to_string(), child, exited: None, stdout_path, stderr_path }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Its stdout and stderr, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr (last 8 KiB) ---\n{}",
            self.name,
            self.stdout(),
            self.name,
            tail(&self.stderr(), 8192)
        )
    }

    /// The exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    pub fn is_alive(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// SIGKILL: no shutdown of any kind, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }

    /// Sends SIGTERM (the graceful stop).
    pub fn terminate(&mut self) {
        if self.is_alive() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first JSON line of stdout `pick` accepts, waiting (bounded) for it.
    pub async fn wait_json_line<T>(&mut self, timeout: Duration, pick: impl Fn(&serde_json::Value) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            for line in self.stdout().lines() {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(line) {
                    if let Some(found) = pick(&value) {
                        return found;
                    }
                }
            }
            if let Some(status) = self.try_exit() {
                panic!("{} exited ({status}) before it was ready\n{}", self.name, self.logs());
            }
            if Instant::now() >= deadline {
                panic!("{} did not say where it listens within {timeout:?}\n{}", self.name, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until `addr` accepts TCP connections; fails with the child's stderr.
    pub async fn wait_tcp(&mut self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
            {
                return;
            }
            if let Some(status) = self.try_exit() {
                panic!("{} exited ({status}) before {addr} accepted connections\n{}", self.name, self.logs());
            }
            if Instant::now() >= deadline {
                panic!("{addr} did not accept connections within {timeout:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Open sockets of the process (`/proc/<pid>/fd` links to `socket:[inode]`).
    pub fn socket_count(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:["))
            .count()
    }

    /// TCP sockets of this process's network namespace whose local port is `port`, by state
    /// name (LISTEN excluded), from `/proc/<pid>/net/tcp` and `tcp6`. For diagnostics.
    pub fn tcp_states_on_port(&self, port: u16) -> HashMap<&'static str, usize> {
        let mut states = HashMap::new();
        for file in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{}/net/{file}", self.pid())).unwrap_or_default();
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 4 {
                    continue;
                }
                let local_port = fields[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
                if local_port != Some(port) {
                    continue;
                }
                let state = match fields[3] {
                    "01" => "ESTABLISHED",
                    "06" => "TIME_WAIT",
                    "07" => "CLOSE",
                    "08" => "CLOSE_WAIT",
                    "09" => "LAST_ACK",
                    "0A" => continue,
                    "04" => "FIN_WAIT1",
                    "05" => "FIN_WAIT2",
                    "0B" => "CLOSING",
                    _ => "OTHER",
                };
                *states.entry(state).or_insert(0) += 1;
            }
        }
        states
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        self.terminate();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.try_exit().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn proxy_grpc_line(value: &serde_json::Value) -> Option<SocketAddr> {
    if value.get("role")?.as_str()? != "proxy" {
        return None;
    }
    value.get("grpc")?.as_str()?.parse().ok()
}

/// The gRPC and HTTP addresses from the start line of a proxy that serves HTTP.
fn proxy_line(value: &serde_json::Value) -> Option<(SocketAddr, SocketAddr)> {
    Some((proxy_grpc_line(value)?, value.get("http")?.as_str()?.parse().ok()?))
}

/// `sluice local`: a broker (2 shards) and a proxy in one process, on ports the OS picks.
pub struct Local {
    pub process: SluiceProcess,
    pub grpc: SocketAddr,
    /// Health, stats, metrics and SSE.
    pub http: SocketAddr,
    /// Data and logs; removed after the process is stopped (fields drop in order).
    pub dir: tempfile::TempDir,
    /// The extra flags it was started with.
    args: Vec<String>,
}

impl Local {
    pub async fn start() -> Local {
        Self::start_with(&[]).await
    }

    /// With extra `local` flags.
    pub async fn start_with(extra: &[&str]) -> Local {
        Self::start_in(tempfile::tempdir().expect("tempdir"), extra).await
    }

    /// With a `--config` file holding `toml` (and extra flags).
    pub async fn start_with_config(toml: &str, extra: &[&str]) -> Local {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("local.toml");
        std::fs::write(&path, toml).expect("write config");
        let mut args = vec!["--config".to_string(), path.to_str().expect("utf-8 path").to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_in(dir, &args).await
    }

    /// SIGKILLs the process and starts `sluice local` again on the same data directory, with
    /// the same flags; the gRPC port may change.
    pub async fn crash_and_restart(mut self) -> Local {
        self.process.kill();
        let Local { dir, args, .. } = self;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_in(dir, &args).await
    }

    /// Stops the process gracefully (SIGTERM), runs `between` on the data directory, then
    /// starts `sluice local` on it again with the same flags.
    pub async fn stop_and_restart(mut self, between: impl FnOnce(&Path)) -> Local {
        self.process.terminate();
        let status = self.process.wait_exit(START_TIMEOUT).await;
        assert!(status.is_some_and(|s| s.success()), "graceful stop: {status:?}\n{}", self.process.logs());
        let Local { dir, args, .. } = self;
        between(&dir.path().join("data"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_in(dir, &args).await
    }

    async fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Local {
        let data = dir.path().join("data");
        let mut args: Vec<String> = [
            "--json",
            "local",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--shards",
            "2",
            "--segment-size-bytes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(SEGMENT_SIZE_BYTES.to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut process = SluiceProcess::spawn("local", &args, dir.path());
        let (grpc, http) = process.wait_json_line(START_TIMEOUT, proxy_line).await;
        process.wait_tcp(grpc, START_TIMEOUT).await;
        Local { process, grpc, http, dir, args: extra.iter().map(|s| s.to_string()).collect() }
    }

    pub fn endpoint(&self) -> String {
        self.grpc.to_string()
    }
}

/// `GET path` over HTTP/1.1 (no keep-alive): the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to the HTTP port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read the response");
    let text = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a header and a body");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    (status, body.to_string())
}

/// `sluice broker --config FILE` with `shards` shards listening on `port .. port + shards`.
pub struct Broker {
    pub process: SluiceProcess,
    pub port: u16,
    pub shards: u16,
    pub dir: tempfile::TempDir,
    /// How many processes have been started for it (each keeps its own log files).
    starts: u32,
    /// More environment for each of its processes.
    env: Vec<(String, String)>,
}

/// Where a test broker keeps its data, and how big its segments are.
pub struct BrokerSetup<'a> {
    /// None: `data` in the broker's temporary directory.
    pub data_dir: Option<&'a Path>,
    pub segment_size_bytes: u64,
    /// More lines for the `[broker]` section.
    pub extra_config: &'a str,
    /// More environment for the broker's processes.
    pub env: Vec<(String, String)>,
}

impl Default for BrokerSetup<'_> {
    fn default() -> Self {
        BrokerSetup { data_dir: None, segment_size_bytes: SEGMENT_SIZE_BYTES, extra_config: "", env: Vec::new() }
    }
}

impl Broker {
    pub async fn start(name: &str, shards: u16) -> Broker {
        Broker::start_with(name, shards, BrokerSetup::default()).await
    }

    pub async fn start_with(name: &str, shards: u16, setup: BrokerSetup<'_>) -> Broker {
        let mut last_logs = String::new();
        // The ports were free when picked; another process may take them before the broker
        // binds, so try a few times.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_ports(shards);
            let data_dir = setup.data_dir.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
            let config = format!(
                "[broker]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshards = {shards}\n\
                 pin_shards = false\ndurability = \"sync\"\nsegment_size_bytes = {}\n\
                 metrics_listen = \"127.0.0.1:0\"\n{}",
                data_dir.display(),
                setup.segment_size_bytes,
                setup.extra_config
            );
            std::fs::write(dir.path().join(format!("{name}.toml")), config).expect("write broker config");
            match Broker::launch(name, name, port, shards, dir.path(), &setup.env).await {
                Ok(process) => return Broker { process, port, shards, dir, starts: 1, env: setup.env },
                Err(logs) => last_logs = logs,
            }
        }
        panic!("broker {name} failed to start three times\n{last_logs}");
    }

    /// Starts `sluice broker` from `<dir>/<name>.toml` (logs named `log_name`) and waits until
    /// every shard listens. Err(logs) if it exited first, as when another process took a port.
    async fn launch(
        name: &str,
        log_name: &str,
        port: u16,
        shards: u16,
        dir: &Path,
        env: &[(String, String)],
    ) -> Result<SluiceProcess, String> {
        let config_path = dir.join(format!("{name}.toml"));
        let args =
            vec!["--json".to_string(), "broker".to_string(), "--config".to_string(), config_path.display().to_string()];
        let mut process = SluiceProcess::spawn_with_env(log_name, &args, dir, env);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let listed = process.stdout().lines().any(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .is_some_and(|v| v.get("role").and_then(|r| r.as_str()) == Some("broker"))
            });
            if listed {
                break;
            }
            if !process.is_alive() {
                return Err(process.logs());
            }
            if Instant::now() >= deadline {
                panic!("broker {name} did not start within {START_TIMEOUT:?}\n{}", process.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for shard in 0..shards {
            process.wait_tcp(SocketAddr::from(([127, 0, 0, 1], port + shard)), START_TIMEOUT).await;
        }
        Ok(process)
    }

    /// SIGKILLs the broker (a crash: no shutdown of any kind) and starts it again on the same
    /// ports and data directory. Returns how long the new process took to listen on every shard.
    pub async fn crash_and_restart(&mut self) -> Duration {
        self.process.kill();
        self.restart().await
    }

    /// Starts the (stopped) broker again on the same ports and data directory; returns how long
    /// the new process took to listen on every shard. Each start keeps its own log files.
    pub async fn restart(&mut self) -> Duration {
        let name = self.process.name.split('#').next().unwrap_or_default().to_string();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.starts += 1;
            let log_name = format!("{name}#{}", self.starts);
            let started = Instant::now();
            // A SIGKILLed broker's ports can stay taken for a moment; try again until they are free.
            match Broker::launch(&name, &log_name, self.port, self.shards, self.dir.path(), &self.env).await {
                Ok(process) => {
                    self.process = process;
                    return started.elapsed();
                }
                Err(logs) if Instant::now() >= deadline => panic!("broker {name} did not restart\n{logs}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether `endpoint` (host:port) is one of this broker's shards.
    pub fn owns_endpoint(&self, endpoint: &str) -> bool {
        (0..self.shards).any(|i| endpoint == format!("127.0.0.1:{}", self.port + i))
    }
}

/// `sluice proxy --config FILE` in front of `brokers` (shard-0 `host:port` each).
pub struct Proxy {
    pub process: SluiceProcess,
    pub grpc: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    pub async fn start(name: &str, brokers: &[String]) -> Proxy {
        Proxy::start_with(name, brokers, "").await
    }

    /// With more TOML after the `[proxy]` section (e.g. a `[transport]` section).
    pub async fn start_with(name: &str, brokers: &[String], extra_config: &str) -> Proxy {
        Proxy::start_with_env(name, brokers, extra_config, &[]).await
    }

    /// With more environment for the process, too.
    pub async fn start_with_env(name: &str, brokers: &[String], extra_config: &str, env: &[(String, String)]) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = proxy_config(name, brokers, extra_config);
        let config_path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config_path, config).expect("write proxy config");
        let args =
            vec!["--json".to_string(), "proxy".to_string(), "--config".to_string(), config_path.display().to_string()];
        let mut process = SluiceProcess::spawn_with_env(name, &args, dir.path(), env);
        let grpc = process.wait_json_line(START_TIMEOUT, proxy_grpc_line).await;
        process.wait_tcp(grpc, START_TIMEOUT).await;
        Proxy { process, grpc, dir }
    }

    pub fn endpoint(&self) -> String {
        self.grpc.to_string()
    }
}

/// A `sluice proxy` config file's text: gRPC on a port the OS picks, TCP to `brokers`.
pub fn proxy_config(name: &str, brokers: &[String], extra_config: &str) -> String {
    let list = brokers.iter().map(|b| format!("\"{b}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "[proxy]\nname = \"{name}\"\ngrpc = \"127.0.0.1:0\"\nbrokers = [{list}]\ntransport = \"tcp\"\n{extra_config}"
    )
}

/// Leaves out the OpenTelemetry SDK's variables, so a test's process exports spans only
/// where the test asks (`--otlp-endpoint`), whatever the environment running the tests says.
fn remove_otel_env(command: &mut Command) {
    for (var, _) in std::env::vars_os() {
        if var.to_str().is_some_and(|v| v.starts_with("OTEL_")) {
            command.env_remove(var);
        }
    }
}

/// Runs a command of the CLI (bounded); returns (success, stdout, stderr).
pub async fn cli(args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(sluice_bin());
    command.args(args).stdin(Stdio::null());
    for var in [
        "SLUICE_ENDPOINT",
        "SLUICE_ACCESS_KEY",
        "SLUICE_SECRET_KEY",
        "SLUICE_TLS",
        "SLUICE_TLS_CA",
        "SLUICE_TLS_CERT",
        "SLUICE_TLS_KEY",
    ] {
        command.env_remove(var);
    }
    remove_otel_env(&mut command);
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let output = tokio::time::timeout(CLI_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("sluice {args:?} did not finish within {CLI_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run sluice {args:?}: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `sluice topic create NAME --type normal --queues N --endpoint E`.
pub async fn create_topic_cli(endpoint: &str, name: &str, queues: u32) {
    let queues = queues.to_string();
    let (ok, stdout, stderr) =
        cli(&["topic", "create", name, "--type", "normal", "--queues", &queues, "--endpoint", endpoint]).await;
    assert!(ok, "sluice topic create {name} failed\nstdout: {stdout}\nstderr: {stderr}");
}

/// `sluice stats --json --endpoint E`, parsed.
pub async fn stats_cli(endpoint: &str) -> serde_json::Value {
    let (ok, stdout, stderr) = cli(&["stats", "--json", "--endpoint", endpoint]).await;
    assert!(ok, "sluice stats failed\nstdout: {stdout}\nstderr: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stats output is not JSON ({e}): {stdout}"))
}

/// A channel of its own (one HTTP/2 connection) to `addr`.
pub async fn channel(addr: SocketAddr) -> Channel {
    let endpoint =
        Channel::from_shared(format!("http://{addr}")).expect("endpoint url").connect_timeout(Duration::from_secs(5));
    tokio::time::timeout(Duration::from_secs(10), endpoint.connect())
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

pub fn messaging_client(channel: Channel) -> Messaging {
    MessagingServiceClient::new(channel)
        .max_decoding_message_size(GRPC_MESSAGE_MAX_BYTES)
        .max_encoding_message_size(GRPC_MESSAGE_MAX_BYTES)
}

/// A RocketMQ v2 client on a connection of its own, with 64 MiB message limits.
pub async fn messaging(addr: SocketAddr) -> Messaging {
    messaging_client(channel(addr).await)
}

pub async fn admin_client(addr: SocketAddr) -> AdminClient<Channel> {
    AdminClient::new(channel(addr).await)
        .max_decoding_message_size(GRPC_MESSAGE_MAX_BYTES)
        .max_encoding_message_size(GRPC_MESSAGE_MAX_BYTES)
}

/// Creates a normal topic through the admin API.
pub async fn create_topic(addr: SocketAddr, name: &str, queues: u32) {
    create_typed_topic(addr, name, v2::MessageType::Normal, queues).await
}

/// Creates a topic of a given message type through the admin API.
pub async fn create_typed_topic(addr: SocketAddr, name: &str, kind: v2::MessageType, queues: u32) {
    create_topic_with(
        addr,
        admin::CreateTopicRequest {
            name: name.into(),
            message_type: kind as i32,
            queue_count: queues,
            lite_ttl_minutes: 0,
            ..Default::default()
        },
    )
    .await
}

/// Creates a topic as `request` says, through the admin API.
pub async fn create_topic_with(addr: SocketAddr, request: admin::CreateTopicRequest) {
    let mut client = admin_client(addr).await;
    let name = request.name.clone();
    let reply = bounded("CreateTopic", client.create_topic(request)).await.expect("CreateTopic transport").into_inner();
    assert_eq!(code(reply.status.as_ref()), v2::Code::Ok as i32, "CreateTopic {name}: {:?}", reply.status);
}

/// Bound on one unary RPC in these tests.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn bounded<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(RPC_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| panic!("{what} did not answer within {RPC_TIMEOUT:?}"))
}

pub fn code(status: Option<&v2::Status>) -> i32 {
    status.map_or(-1, |s| s.code)
}

pub fn resource(name: &str) -> v2::Resource {
    v2::Resource { resource_namespace: String::new(), name: name.into() }
}

pub fn new_message_id() -> String {
    hex::encode_upper(rand::random::<[u8; 16]>())
}

pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// A normal message with a fresh id.
pub fn message(topic: &str, body: Vec<u8>) -> v2::Message {
    v2::Message {
        topic: Some(resource(topic)),
        user_properties: HashMap::new(),
        system_properties: Some(v2::SystemProperties {
            message_id: new_message_id(),
            body_encoding: v2::Encoding::Identity as i32,
            message_type: v2::MessageType::Normal as i32,
            born_timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            born_host: "sluice-tests".into(),
            ..Default::default()
        }),
        body,
    }
}

/// Creates a consumer group through the admin API.
pub async fn create_group(addr: SocketAddr, name: &str, max_delivery_attempts: u32, fifo: bool) {
    let mut client = admin_client(addr).await;
    let reply = bounded(
        "CreateGroup",
        client.create_group(admin::CreateGroupRequest {
            name: name.into(),
            max_delivery_attempts,
            fifo,
            ..Default::default()
        }),
    )
    .await
    .expect("CreateGroup transport")
    .into_inner();
    assert_eq!(code(reply.status.as_ref()), v2::Code::Ok as i32, "CreateGroup {name}: {:?}", reply.status);
}

/// The counters of every broker shard, summed by name.
pub async fn broker_counters(addr: SocketAddr) -> HashMap<String, u64> {
    let mut client = admin_client(addr).await;
    let reply = bounded("GetStats", client.get_stats(admin::GetStatsRequest {})).await.expect("GetStats").into_inner();
    let mut sums = HashMap::new();
    for broker in reply.brokers {
        for c in broker.counters {
            *sums.entry(c.name).or_insert(0) += c.value;
        }
    }
    sums
}

pub fn message_id(m: &v2::Message) -> String {
    m.system_properties.as_ref().map(|s| s.message_id.clone()).unwrap_or_default()
}

pub fn receipt_handle(m: &v2::Message) -> String {
    m.system_properties.as_ref().and_then(|s| s.receipt_handle.clone()).unwrap_or_default()
}

pub async fn send(client: &mut Messaging, messages: Vec<v2::Message>) -> v2::SendMessageResponse {
    bounded("SendMessage", client.send_message(v2::SendMessageRequest { messages }))
        .await
        .unwrap_or_else(|e| panic!("SendMessage transport error: {e}"))
        .into_inner()
}

/// Sends and requires every entry to be OK.
pub async fn send_ok(client: &mut Messaging, messages: Vec<v2::Message>) {
    let count = messages.len();
    let reply = send(client, messages).await;
    assert_eq!(code(reply.status.as_ref()), v2::Code::Ok as i32, "SendMessage: {:?}", reply.status);
    assert_eq!(reply.entries.len(), count);
    for entry in &reply.entries {
        assert_eq!(code(entry.status.as_ref()), v2::Code::Ok as i32, "SendMessage entry: {:?}", entry.status);
    }
}

/// What one ReceiveMessage stream carried.
#[derive(Debug, Default)]
pub struct Received {
    pub statuses: Vec<v2::Status>,
    pub messages: Vec<v2::Message>,
    pub delivery_timestamps: usize,
}

impl Received {
    /// The first status's code (every receive stream starts with one).
    pub fn code(&self) -> i32 {
        code(self.statuses.first())
    }
}

pub fn receive_request(
    topic: &str,
    group: &str,
    queue_id: i32,
    batch: i32,
    invisible: Duration,
    wait: Duration,
) -> v2::ReceiveMessageRequest {
    v2::ReceiveMessageRequest {
        group: Some(resource(group)),
        message_queue: Some(v2::MessageQueue { topic: Some(resource(topic)), id: queue_id, ..Default::default() }),
        filter_expression: Some(v2::FilterExpression { r#type: v2::FilterType::Tag as i32, expression: "*".into() }),
        batch_size: batch,
        invisible_duration: Some(proto_duration(invisible)),
        auto_renew: false,
        long_polling_timeout: Some(proto_duration(wait)),
        attempt_id: None,
    }
}

/// Runs one ReceiveMessage to the end of its stream (bounded by the wait plus a margin).
/// `request` may be a `tonic::Request` carrying headers (a lite consumer's client id).
pub async fn receive_with(
    client: &mut Messaging,
    request: impl tonic::IntoRequest<v2::ReceiveMessageRequest>,
) -> Result<Received, tonic::Status> {
    let request = request.into_request();
    let wait = request.get_ref().long_polling_timeout.as_ref().map_or(Duration::from_secs(20), |d| {
        Duration::from_secs(d.seconds.max(0) as u64) + Duration::from_nanos(d.nanos.max(0) as u64)
    });
    let bound = wait + Duration::from_secs(30);
    tokio::time::timeout(bound, receive_stream(client, request))
        .await
        .unwrap_or_else(|_| panic!("ReceiveMessage did not end within {bound:?}"))
}

/// Runs one ReceiveMessage to the end of its stream, unbounded: the caller bounds it.
pub async fn receive_stream(
    client: &mut Messaging,
    request: tonic::Request<v2::ReceiveMessageRequest>,
) -> Result<Received, tonic::Status> {
    let mut stream = client.receive_message(request).await?.into_inner();
    let mut received = Received::default();
    while let Some(item) = stream.message().await? {
        match item.content {
            Some(v2::receive_message_response::Content::Status(s)) => received.statuses.push(s),
            Some(v2::receive_message_response::Content::Message(m)) => received.messages.push(m),
            Some(v2::receive_message_response::Content::DeliveryTimestamp(_)) => received.delivery_timestamps += 1,
            _ => {}
        }
    }
    Ok(received)
}

pub async fn receive(
    client: &mut Messaging,
    topic: &str,
    group: &str,
    batch: i32,
    invisible: Duration,
    wait: Duration,
) -> Received {
    receive_with(client, receive_request(topic, group, 0, batch, invisible, wait))
        .await
        .unwrap_or_else(|e| panic!("ReceiveMessage transport error: {e}"))
}

/// Acks one message; returns the response's overall status.
pub async fn ack(client: &mut Messaging, topic: &str, group: &str, message_id: &str, handle: &str) -> v2::Status {
    let reply = bounded(
        "AckMessage",
        client.ack_message(v2::AckMessageRequest {
            group: Some(resource(group)),
            topic: Some(resource(topic)),
            entries: vec![v2::AckMessageEntry {
                message_id: message_id.into(),
                receipt_handle: handle.into(),
                lite_topic: None,
            }],
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("AckMessage transport error: {e}"))
    .into_inner();
    reply.status.unwrap_or(v2::Status { code: -1, message: "no status".into() })
}

/// Acks a batch of received messages and requires every entry to be OK.
pub async fn ack_all(client: &mut Messaging, topic: &str, group: &str, messages: &[v2::Message]) {
    if messages.is_empty() {
        return;
    }
    let entries = messages
        .iter()
        .map(|m| v2::AckMessageEntry { message_id: message_id(m), receipt_handle: receipt_handle(m), lite_topic: None })
        .collect();
    let reply = bounded(
        "AckMessage",
        client.ack_message(v2::AckMessageRequest {
            group: Some(resource(group)),
            topic: Some(resource(topic)),
            entries,
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("AckMessage transport error: {e}"))
    .into_inner();
    assert_eq!(code(reply.status.as_ref()), v2::Code::Ok as i32, "AckMessage: {:?} {:?}", reply.status, reply.entries);
}

pub async fn change_invisible(
    client: &mut Messaging,
    topic: &str,
    group: &str,
    message_id: &str,
    handle: &str,
    invisible: Duration,
) -> v2::ChangeInvisibleDurationResponse {
    bounded(
        "ChangeInvisibleDuration",
        client.change_invisible_duration(v2::ChangeInvisibleDurationRequest {
            group: Some(resource(group)),
            topic: Some(resource(topic)),
            receipt_handle: handle.into(),
            invisible_duration: Some(proto_duration(invisible)),
            message_id: message_id.into(),
            lite_topic: None,
            suspend: None,
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("ChangeInvisibleDuration transport error: {e}"))
    .into_inner()
}

pub async fn query_route(client: &mut Messaging, topic: &str) -> v2::QueryRouteResponse {
    bounded("QueryRoute", client.query_route(v2::QueryRouteRequest { topic: Some(resource(topic)), endpoints: None }))
        .await
        .unwrap_or_else(|e| panic!("QueryRoute transport error: {e}"))
        .into_inner()
}
