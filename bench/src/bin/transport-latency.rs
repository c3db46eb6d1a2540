//! Round-trip latency of the transport against a raw TCP ping-pong, in the same run.
//!
//! Both sides run on the same runtimes as in production (a glommio server thread, a tokio
//! client), each pinned to its own core, and the raw baseline uses the same runtimes, so the
//! ratio is the cost of the transport itself: framing, CRC, rkyv validation, request
//! matching and credits. Rounds alternate raw and transport so drift hits both alike.
//!
//!   cargo run --release -p sluice-bench --bin transport-latency -- --sizes 64,4096
//!   ... -- --transport rdma --server 10.77.0.1:0   (in an RDMA host or the soft-RoCE guest)
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Instant;

use clap::Parser;
use hdrhistogram::Histogram;
use sluice_bench::targets::pingpong::RawEchoServer;
use sluice_transport::messages::{Echo, EchoReply};
use sluice_transport::server::ListenOn;
use sluice_transport::{BuiltinsOnly, Client, ServerInfo, ServerThread, TransportConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Parser, Debug)]
struct Args {
    /// Request payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "64,4096")]
    sizes: Vec<usize>,
    /// Timed round trips per size, per transport, per round.
    #[arg(long, default_value_t = 20_000)]
    iterations: u64,
    #[arg(long, default_value_t = 2_000)]
    warmup: u64,
    /// Rounds; each round measures raw then transport.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// tcp, or rdma (needs a device; no raw baseline, compare with ibv_rc_pingpong).
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Where each RDMA link's poller runs: runtime (a task on the server's glommio executor and
    /// on the client's tokio runtime) or thread (a thread per link and side).
    #[arg(long, default_value = "runtime")]
    rdma_poll: sluice_transport::RdmaPollMode,
    /// An idle RDMA poller's busy-poll budget, least and most, in µs (`rdma.busy_poll_us`,
    /// `rdma.busy_poll_max_us`); default: the transport's defaults.
    #[arg(long)]
    rdma_busy_poll_us: Option<u32>,
    #[arg(long)]
    rdma_busy_poll_max_us: Option<u32>,
    /// Address the server binds (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    server: SocketAddr,
    /// Core for the server; the client takes the next one.
    #[arg(long, default_value_t = 1)]
    server_core: usize,
    /// Pin nothing (server executor, client thread, RDMA pollers float).
    #[arg(long)]
    no_pin: bool,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
struct Row {
    path: &'static str,
    size: usize,
    histogram: Histogram<u64>,
}

fn main() {
    let args = Args::parse();
    let cores = if args.no_pin { Vec::new() } else { core_affinity::get_core_ids().unwrap_or_default() };
    let server_core = cores.get(args.server_core % cores.len().max(1)).map(|c| c.id);
    let client_core = cores.get((args.server_core + 1) % cores.len().max(1)).copied();
    if let Some(core) = client_core {
        core_affinity::set_for_current(core);
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let mut rows: Vec<Row> = Vec::new();
    let mut config = TransportConfig::default();
    config.rdma.poll_mode = args.rdma_poll;
    config.rdma.busy_poll_us = args.rdma_busy_poll_us.unwrap_or(config.rdma.busy_poll_us);
    config.rdma.busy_poll_max_us = args.rdma_busy_poll_max_us.unwrap_or(config.rdma.busy_poll_max_us);
    if let Err(e) = config.validate() {
        eprintln!("transport-latency: {e}");
        std::process::exit(2);
    }
    match args.transport.as_str() {
        "tcp" => {
            let raw = RawEchoServer::spawn(args.server, server_core).expect("raw echo server");
            let server = ServerThread::spawn_tcp(
                args.server,
                config.clone(),
                ServerInfo::default(),
                || BuiltinsOnly,
                server_core,
            )
            .expect("transport server");
            for round in 0..args.rounds {
                for &size in &args.sizes {
                    let raw_h = runtime.block_on(raw_pingpong(raw.addr, size, args.warmup, args.iterations));
                    let endpoint = format!("tcp://{}", server.addr);
                    let tr_h =
                        runtime.block_on(transport_pingpong(&endpoint, &config, size, args.warmup, args.iterations));
                    eprintln!(
                        "round {round} size {size}: raw p50 {} ns, transport p50 {} ns",
                        raw_h.value_at_quantile(0.5),
                        tr_h.value_at_quantile(0.5)
                    );
                    merge(&mut rows, "raw tcp", size, raw_h);
                    merge(&mut rows, "transport tcp", size, tr_h);
                }
            }
            drop(server);
            drop(raw);
        }
        "rdma" => {
            let listen = ListenOn { tcp: None, rdma: Some(args.server) };
            let server =
                ServerThread::spawn(listen, config.clone(), ServerInfo::default(), || BuiltinsOnly, server_core)
                    .expect("RDMA server (is there an RDMA device? see scripts/soft-roce.sh)");
            for _ in 0..args.rounds {
                for &size in &args.sizes {
                    let endpoint = format!("rdma://{}", server.addr);
                    let h =
                        runtime.block_on(transport_pingpong(&endpoint, &config, size, args.warmup, args.iterations));
                    merge(&mut rows, "transport rdma", size, h);
                }
            }
        }
        other => panic!("--transport must be tcp or rdma, not {other}"),
    }
    report(&rows, &args);
}

fn merge(rows: &mut Vec<Row>, path: &'static str, size: usize, histogram: Histogram<u64>) {
    match rows.iter_mut().find(|r| r.path == path && r.size == size) {
        Some(row) => row.histogram.add(&histogram).expect("same histogram bounds"),
        None => rows.push(Row { path, size, histogram }),
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn report(rows: &[Row], args: &Args) {
    println!(
        "\n{:<15} {:>7} {:>9} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "path", "size", "samples", "mean µs", "p50 µs", "p99 µs", "p50 ×raw", "p99 ×raw"
    );
    let mut json = Vec::new();
    for row in rows {
        let h = &row.histogram;
        let raw = rows.iter().find(|r| r.path == "raw tcp" && r.size == row.size);
        let (r50, r99) = match raw {
            Some(raw) if raw.path != row.path => (
                format!("{:.2}", h.value_at_quantile(0.5) as f64 / raw.histogram.value_at_quantile(0.5) as f64),
                format!("{:.2}", h.value_at_quantile(0.99) as f64 / raw.histogram.value_at_quantile(0.99) as f64),
            ),
            _ => ("-".to_string(), "-".to_string()),
        };
        println!(
            "{:<15} {:>7} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>9} {:>9}",
            row.path,
            row.size,
            h.len(),
            h.mean() / 1000.0,
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.99)),
            r50,
            r99
        );
        json.push(format!(
            "{{\"path\":\"{}\",\"size\":{},\"samples\":{},\"mean_ns\":{:.0},\"p50_ns\":{},\"p99_ns\":{},\"p999_ns\":{},\"max_ns\":{}}}",
            row.path,
            row.size,
            h.len(),
            h.mean(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        ));
    }
    if let Some(path) = &args.json {
        std::fs::write(path, format!("[{}]\n", json.join(",\n"))).expect("writing --json");
    }
}

async fn transport_pingpong(
    endpoint: &str,
    config: &TransportConfig,
    size: usize,
    warmup: u64,
    iterations: u64,
) -> Histogram<u64> {
    let client = Client::connect(endpoint, config.clone(), "transport-latency").await.expect("connect");
    let payload = vec![0x5au8; size];
    let mut histogram = new_histogram();
    for i in 0..warmup + iterations {
        let started = Instant::now();
        let reply = client.call(&Echo { payload: &payload }).await.expect("echo");
        let echoed = reply.access::<EchoReply>().expect("echo reply").payload.len();
        let elapsed = started.elapsed();
        assert_eq!(echoed, size);
        if i >= warmup {
            histogram.record(elapsed.as_nanos().max(1) as u64).expect("in bounds");
        }
    }
    histogram
}

async fn raw_pingpong(addr: SocketAddr, size: usize, warmup: u64, iterations: u64) -> Histogram<u64> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("raw connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.write_all(&(size as u32).to_le_bytes()).await.expect("size");
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut histogram = new_histogram();
    for i in 0..warmup + iterations {
        let started = Instant::now();
        stream.write_all(&out).await.expect("raw write");
        stream.read_exact(&mut back).await.expect("raw read");
        let elapsed = started.elapsed();
        if i >= warmup {
            histogram.record(elapsed.as_nanos().max(1) as u64).expect("in bounds");
        }
    }
    histogram
}
