//! Appends records to an engine and prints one line per ack: `ack <producer> <seq> <offset>`.
//! The crash test runs it, SIGKILLs it at a random moment and checks every printed ack survived.
//! Record bodies come from `sluice_engine::load`, so a reader can verify them byte for byte.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use sluice_engine::load::{body_for, producer_child_queue, producer_queue};
use sluice_engine::{Durability, Engine, EngineConfig, NewRecord};

#[derive(Parser, Debug)]
#[command(about = "Append load against a Sluice engine, printing each durable ack")]
struct Args {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 2)]
    shards: usize,
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Stop after this many records per producer (0 = run until killed).
    #[arg(long, default_value_t = 0)]
    records: u64,
    #[arg(long, default_value_t = 256 << 10)]
    segment_size_bytes: u64,
    /// First sequence number of every producer (so restarts append new, distinct records).
    #[arg(long, default_value_t = 0)]
    first_seq: u64,
    /// `sync` (fdatasync before ack) or `async:<ms>`.
    #[arg(long, default_value = "sync")]
    durability: String,
}

fn parse_durability(text: &str) -> Result<Durability, String> {
    match text.split_once(':') {
        None if text == "sync" => Ok(Durability::Sync),
        Some(("async", ms)) => {
            ms.parse().map(|flush_interval_ms| Durability::Async { flush_interval_ms }).map_err(|e| e.to_string())
        }
        _ => Err(format!("durability must be `sync` or `async:<ms>`, got {text:?}")),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut config = EngineConfig::new(&args.data_dir);
    config.shard_count = args.shards;
    config.pin_shards = false;
    config.segment_size_bytes = args.segment_size_bytes;
    config.record_size_max_bytes = 128 << 10;
    config.group_commit_max_bytes = 128 << 10;
    config.durability = parse_durability(&args.durability)?;
    let engine = Engine::open(config)?;
    let stdout = std::sync::Mutex::new(std::io::stdout());
    let producers = (0..args.producers).map(|producer| {
        let engine = &engine;
        let stdout = &stdout;
        async move {
            let mut seq = args.first_seq;
            while args.records == 0 || seq < args.first_seq + args.records {
                let mut record = NewRecord::new(producer_queue(producer), body_for(producer, seq));
                record.queues.push(producer_child_queue(producer));
                record.message_id = format!("p{producer}-{seq}");
                record.keys = vec![format!("producer-{producer}")];
                let ack = engine.append(vec![record]).await?;
                let line = format!("ack {producer} {seq} {}\n", ack[0].offsets[0]);
                let mut out = stdout.lock().expect("stdout lock");
                out.write_all(line.as_bytes())?;
                out.flush()?;
                seq += 1;
            }
            Ok::<_, Box<dyn std::error::Error>>(())
        }
    });
    for result in futures::executor::block_on(futures::future::join_all(producers)) {
        result?;
    }
    engine.close()?;
    Ok(())
}
