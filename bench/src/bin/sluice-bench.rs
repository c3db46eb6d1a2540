//! sluice-bench: runs workloads on Sluice and its peers at a fixed rate and reports latency.
//!
//!   sluice-bench run --rate 1000 --size-bytes 1024 --target sluice-grpc=127.0.0.1:8081 --target redis=127.0.0.1:6379
//!   sluice-bench suite bench/suites/standard.toml --target ... --out results/sync.json
//!   sluice-bench summary results/sync.json results/async.json
//!   sluice-bench report results/*.json --out results/report.html
//!   sluice-bench check results/sync.json --suite bench/suites/standard.toml --kinds raw-tcp,redis
//!   sluice-bench overhead results/sync.json results/sync-round2.json
//!
//! scripts/bench.sh starts every system and runs the standard suite.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sluice_bench::cpu::NamedPid;
use sluice_bench::driver;
use sluice_bench::error::BenchError;
use sluice_bench::results::{check, peer_losses, summary_table, Failure, Host, ResultsFile, RunResult, SCHEMA};
use sluice_bench::saturation;
use sluice_bench::targets::{TargetKind, TargetSpec, TARGET_KINDS};
use sluice_bench::workload::{DurabilityLevel, Suite, TopicKind, Workload};

#[derive(Parser, Debug)]
#[command(name = "sluice-bench", about = "Latency of Sluice and its peers under a fixed-rate open-loop load")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One workload, from flags, on every target given.
    Run {
        #[command(flatten)]
        workload: WorkloadFlags,
        #[command(flatten)]
        common: RunFlags,
    },
    /// Every workload of a suite file on the targets each names.
    Suite {
        file: PathBuf,
        #[command(flatten)]
        common: RunFlags,
    },
    /// Prints the summary table (with Sluice ÷ peer ratios) of results files.
    Summary { files: Vec<PathBuf> },
    /// Writes an HTML report plotting the percentiles of one or more results files.
    Report {
        files: Vec<PathBuf>,
        #[arg(long, default_value = "results/report.html")]
        out: PathBuf,
    },
    /// Metrics on against off: each `X@nometrics` target beside `X`, as median ratios over the
    /// files given (rounds of one suite).
    Overhead {
        files: Vec<PathBuf>,
        /// The largest p50 and throughput difference called within bounds, in percent.
        #[arg(long, default_value_t = 3.0)]
        limit_pct: f64,
    },
    /// Checks that a results file is valid and complete for a suite and set of target kinds.
    Check {
        file: PathBuf,
        #[arg(long)]
        suite: PathBuf,
        /// Target kinds that must have run, comma separated.
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct WorkloadFlags {
    #[arg(long, default_value = "custom")]
    name: String,
    #[arg(long, default_value_t = 1024)]
    size_bytes: usize,
    /// Messages per second, all producers together.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// A multiple of --topics (0: measure send→ack only).
    #[arg(long, default_value_t = 1)]
    consumers: u32,
    #[arg(long, default_value_t = 1)]
    topics: u32,
    /// Queues per topic on Sluice (0: one per consumer of the topic).
    #[arg(long, default_value_t = 0)]
    queues_per_topic: u32,
    /// normal, or lite: every topic is a LITE parent whose messages stream to sessions.
    #[arg(long, value_enum, default_value_t = TopicKind::Normal)]
    topic_kind: TopicKind,
    /// Lite: sessions streaming at once per topic.
    #[arg(long, default_value_t = 0)]
    sessions: u32,
    /// Lite: messages in each session's answer.
    #[arg(long, default_value_t = 16)]
    answer_messages: u32,
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// Sends in flight per producer at most.
    #[arg(long, default_value_t = 1024)]
    inflight_max: usize,
    /// Saturation: step through these rates (comma separated, rising); --rate is then ignored.
    /// Stepping stops at the first rate the system falls short of twice in a row.
    #[arg(long, value_delimiter = ',')]
    step_rates: Vec<u64>,
}

#[derive(Args, Debug)]
struct RunFlags {
    /// KIND[@LABEL][=ENDPOINT]; kinds: raw-tcp, transport, sluice-broker, sluice-grpc, nats, redis.
    #[arg(long = "target", required = true)]
    targets: Vec<TargetSpec>,
    /// The durability every system must be running with (checked where the system reports it).
    #[arg(long, value_enum, default_value_t = DurabilityLevel::Sync)]
    durability: DurabilityLevel,
    /// Server processes to charge CPU time to: broker=PID, proxy=PID, nats=PID, redis=PID.
    #[arg(long = "pid")]
    pids: Vec<NamedPid>,
    /// Cut every workload to a few seconds (CI).
    #[arg(long)]
    short: bool,
    /// Names the run in tables and reports.
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long, default_value = "results/sluice-bench.json")]
    out: PathBuf,
    /// The RDMA busy-poll budget of sluice-bench's own transport clients (transport and
    /// sluice-broker targets), least and most, in µs; default: the transport's defaults.
    #[arg(long)]
    rdma_busy_poll_us: Option<u32>,
    #[arg(long)]
    rdma_busy_poll_max_us: Option<u32>,
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

async fn run_suite(suite: Suite, flags: RunFlags) -> Result<ResultsFile, BenchError> {
    let mut transport = sluice_transport::TransportConfig::default();
    transport.rdma.busy_poll_us = flags.rdma_busy_poll_us.unwrap_or(transport.rdma.busy_poll_us);
    transport.rdma.busy_poll_max_us = flags.rdma_busy_poll_max_us.unwrap_or(transport.rdma.busy_poll_max_us);
    transport.validate().map_err(|e| BenchError::Target { target: "transport clients".into(), why: e.to_string() })?;
    sluice_bench::targets::set_client_transport(transport);
    let mut file = ResultsFile {
        schema: SCHEMA.into(),
        label: flags.label.clone(),
        suite: suite.name.clone(),
        durability: flags.durability,
        short: flags.short,
        started_unix_ms: now_unix_ms(),
        host: Host::this(),
        results: Vec::new(),
        saturation: Vec::new(),
        failures: Vec::new(),
    };
    for workload in &suite.workloads {
        let workload = if flags.short { workload.shortened() } else { workload.clone() };
        for spec in flags.targets.iter().filter(|t| workload.runs_on(t.kind.name())) {
            let outcome = if workload.is_saturation() {
                let step = |w: Workload| run_one(spec, w, &flags);
                saturation::step_up(spec, &workload, step).await.map(|s| file.saturation.push(s))
            } else {
                run_one(spec, workload.clone(), &flags).await.map(|r| file.results.push(r))
            };
            match outcome {
                Ok(()) => {}
                Err(e) => {
                    eprintln!("sluice-bench: {} on {} failed: [{}] {e}", workload.name, spec.label, e.code());
                    file.failures.push(Failure {
                        workload: workload.name.clone(),
                        target: spec.label.clone(),
                        code: e.code(),
                        error: e.to_string(),
                    });
                }
            }
        }
    }
    file.save(&flags.out)?;
    print!("{}", summary_table(std::slice::from_ref(&file)));
    eprintln!("sluice-bench: results in {}", flags.out.display());
    Ok(file)
}

async fn run_one(spec: &TargetSpec, workload: Workload, flags: &RunFlags) -> Result<RunResult, BenchError> {
    eprintln!(
        "sluice-bench: {} on {} at {} msg/s ({} durability)",
        workload.name, spec.label, workload.rate_per_sec, flags.durability
    );
    driver::run(spec, &workload, flags.durability, &flags.pids, now_unix_ms()).await
}

fn load_all(files: &[PathBuf]) -> Result<Vec<ResultsFile>, BenchError> {
    if files.is_empty() {
        return Err(BenchError::Results { path: String::new(), why: "name at least one results file".into() });
    }
    files.iter().map(|f| ResultsFile::load(f)).collect()
}

async fn main_async(cli: Cli) -> Result<bool, BenchError> {
    match cli.command {
        Command::Run { workload: w, common } => {
            let workload = Workload {
                name: w.name,
                topic_kind: w.topic_kind,
                size_bytes: w.size_bytes,
                rate_per_sec: w.rate,
                producers: w.producers,
                consumers: w.consumers,
                topics: w.topics,
                queues_per_topic: w.queues_per_topic,
                duration_secs: w.duration_secs,
                warmup_secs: w.warmup_secs,
                inflight_max: w.inflight_max,
                sessions: w.sessions,
                answer_messages: w.answer_messages,
                targets: Vec::new(),
                step_rates_per_sec: w.step_rates,
            };
            workload.validate()?;
            let file = run_suite(Suite { name: "run".into(), workloads: vec![workload] }, common).await?;
            Ok(file.failures.is_empty())
        }
        Command::Suite { file, common } => {
            let suite = Suite::load(&file)?;
            let results = run_suite(suite, common).await?;
            Ok(results.failures.is_empty())
        }
        Command::Summary { files } => {
            print!("{}", summary_table(&load_all(&files)?));
            Ok(true)
        }
        Command::Overhead { files, limit_pct } => {
            let rows = sluice_bench::overhead::overhead_rows(&load_all(&files)?);
            if rows.is_empty() {
                eprintln!("no target ran beside a twin labelled @nometrics (scripts/bench.sh --metrics-overhead)");
                return Ok(false);
            }
            print!("{}", sluice_bench::overhead::overhead_table(&rows, limit_pct));
            Ok(true)
        }
        Command::Report { files, out } => {
            let html = sluice_bench::report::html(&load_all(&files)?)
                .map_err(|why| BenchError::Results { path: out.display().to_string(), why })?;
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&out, html)?;
            eprintln!("sluice-bench: report in {}", out.display());
            Ok(true)
        }
        Command::Check { file, suite, kinds } => {
            let suite = Suite::load(&suite)?;
            let kinds: Vec<TargetKind> = kinds
                .iter()
                .map(|k| {
                    TARGET_KINDS.into_iter().find(|t| t.name() == k).ok_or_else(|| BenchError::Results {
                        path: file.display().to_string(),
                        why: format!("unknown target kind {k:?}"),
                    })
                })
                .collect::<Result<_, _>>()?;
            let results = ResultsFile::load(&file)?;
            let problems = check(&results, &suite, &kinds);
            for p in &problems {
                eprintln!("check {}: {p}", file.display());
            }
            for loss in peer_losses(&results) {
                eprintln!("check {}: note, a peer's result (not a failure): {loss}", file.display());
            }
            if problems.is_empty() {
                println!(
                    "check {}: valid and complete ({} results, {} saturation steps, suite {}, {} durability)",
                    file.display(),
                    results.results.len(),
                    results.saturation.iter().map(|s| s.steps.len()).sum::<usize>(),
                    suite.name,
                    results.durability
                );
            }
            Ok(problems.is_empty())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sluice-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sluice-bench: error {}: {e}", e.code());
            ExitCode::FAILURE
        }
    }
}
