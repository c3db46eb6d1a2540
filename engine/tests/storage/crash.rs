//! A child process appends under policy `sync` and prints each ack; the test SIGKILLs it at a
//! random moment, reopens the engine, and checks every acked record is there, intact, and in
//! order per producer. The same data directory carries on across rounds, so every round also
//! recovers from the previous rounds' kills.

use crate::common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sluice_engine::load::{parse_body, producer_child_queue, producer_queue};

const PRODUCERS: u32 = 4;
const SHARDS: usize = 2;
const ROUNDS_DEFAULT: usize = 20;
/// Upper bound on the whole test, so a hang fails instead of stalling CI.
const TEST_BUDGET: Duration = Duration::from_secs(300);
/// How long a round may wait for the child's first ack.
const FIRST_ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// `(seq, offset)` per producer, in ack order.
type Acks = BTreeMap<u32, Vec<(u64, u64)>>;

fn spawn_child(dir: &std::path::Path, first_seq: u64) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_sluice-engine-load"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--shards", &SHARDS.to_string(), "--producers", &PRODUCERS.to_string()])
        .args(["--segment-size-bytes", &common::SEGMENT_SIZE_BYTES.to_string(), "--durability", "sync"])
        .args(["--first-seq", &first_seq.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sluice-engine-load")
}

/// Parses one complete `ack <producer> <seq> <offset>` line.
fn parse_ack(line: &str) -> (u32, u64, u64) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(fields.len() == 4 && fields[0] == "ack", "unexpected child output {line:?}");
    (fields[1].parse().unwrap(), fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

/// Runs one child, kills it with SIGKILL at a random moment, and returns what it acked.
fn run_round(dir: &std::path::Path, first_seq: u64, rng: &mut impl Rng) -> Vec<(u32, u64, u64)> {
    let mut child = spawn_child(dir, first_seq);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        // Only newline-terminated lines count: the kill may cut the last one short.
        while reader.read_line(&mut line).unwrap_or(0) > 0 && line.ends_with('\n') {
            let _ = tx.send(parse_ack(&line));
            line.clear();
        }
    });
    // Mostly kill while acks flow; sometimes during start-up and recovery.
    let mut acks = Vec::new();
    if rng.random_bool(0.8) {
        acks.push(rx.recv_timeout(FIRST_ACK_TIMEOUT).expect("child acked nothing: it failed to start or recover"));
    }
    std::thread::sleep(Duration::from_millis(rng.random_range(1..400)));
    child.kill().expect("SIGKILL child");
    child.wait().unwrap();
    reader.join().unwrap();
    acks.extend(rx.try_iter());
    acks
}

/// Reopens the engine and checks every acked record against what is stored.
fn verify(dir: &std::path::Path, acked: &Acks) -> usize {
    let engine = common::open(&common::small_config(dir, SHARDS));
    let mut found: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    let mut stored = 0;
    for queue_producer in 0..2 {
        let queue = producer_queue(queue_producer);
        // A kill before the first append leaves no queue at all.
        let records = common::read_all_if_exists(&engine, &queue);
        let children = common::read_all_if_exists(&engine, &producer_child_queue(queue_producer));
        assert_eq!(
            records.iter().map(|r| r.position).collect::<Vec<_>>(),
            children.iter().map(|r| r.position).collect::<Vec<_>>(),
            "multi-dispatched child queue holds the same stored records"
        );
        for record in &records {
            let (producer, seq) = parse_body(record.view().body).expect("record body intact");
            found.entry(producer).or_default().push((seq, record.offset));
        }
        stored += records.len();
    }
    for (producer, acks) in acked {
        let stored = found.get(producer).map(Vec::as_slice).unwrap_or_default();
        assert!(stored.windows(2).all(|w| w[0].0 < w[1].0), "producer {producer}: records out of order");
        let lookup: BTreeMap<u64, u64> = stored.iter().copied().collect();
        for (seq, offset) in acks {
            assert_eq!(lookup.get(seq), Some(offset), "producer {producer}: acked seq {seq} at offset {offset} lost");
        }
        // A producer waits for each ack, so what is stored is a gap-free run per round.
        for w in stored.windows(2) {
            let same_round = w[0].0 / 1_000_000 == w[1].0 / 1_000_000;
            assert!(
                !same_round || w[1].0 == w[0].0 + 1,
                "producer {producer}: gap between seq {} and {}",
                w[0].0,
                w[1].0
            );
        }
    }
    engine.close().unwrap();
    stored
}

#[test]
fn acked_records_survive_sigkill() {
    let rounds: usize =
        std::env::var("SLUICE_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(ROUNDS_DEFAULT);
    let seed: u64 = std::env::var("SLUICE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("crash test: {rounds} rounds, seed {seed} (rerun with SLUICE_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut acked: Acks = BTreeMap::new();
    let mut total_acks = 0;
    for round in 0..rounds {
        assert!(started.elapsed() < TEST_BUDGET, "crash test exceeded its time budget at round {round}");
        let acks = run_round(dir.path(), round as u64 * 1_000_000, &mut rng);
        total_acks += acks.len();
        for (producer, seq, offset) in &acks {
            acked.entry(*producer).or_default().push((*seq, *offset));
        }
        let stored = verify(dir.path(), &acked);
        println!("round {round}: {} acks this round, {total_acks} in all, {stored} records stored", acks.len());
        assert!(stored >= total_acks);
    }
    assert!(total_acks > 0, "no round produced an ack");
}
