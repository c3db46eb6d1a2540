//! Logs written before records carried attributes (batch format 2) still open, and their
//! records read as they were written, with default attributes.
//!
//! `fixtures/batch-v2-segment.log` is the written part of a segment that the engine at commit
//! 45f8a27 (batch format 2) wrote with `small_config(dir, 1)`: twenty records alternating
//! between `orders#0` and `orders#1` (message id `MSG0000`…, body `body-i`, tag `paid` when
//! i % 3 == 0 else `new`, key `ki`, properties `[i; 5]`), one record dispatched into `chat#0`
//! and `chat#0/s1` (id `MULTI`), the consumer offset 3 of group `g1` on `orders#0`, and a
//! queue-config state entry for `orders#0`. The rest of the segment is zeros.

use crate::common;

use common::*;
use sluice_engine::record::{message_type, Attributes};
use sluice_engine::{NewRecord, StateTable};

const FIXTURE: &[u8] = include_bytes!("../fixtures/batch-v2-segment.log");

fn install_fixture(config: &sluice_engine::EngineConfig) {
    let log_dir = config.data_dir.join("shard-000").join("log");
    std::fs::create_dir_all(&log_dir).unwrap();
    let mut segment = FIXTURE.to_vec();
    segment.resize(config.segment_size_bytes as usize, 0);
    std::fs::write(log_dir.join(format!("{:020}.log", 0)), segment).unwrap();
}

#[test]
fn a_log_in_batch_format_two_opens_and_reads_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path(), 1);
    install_fixture(&config);
    let engine = open(&config);
    for (queue, first) in [("orders#0", 0u64), ("orders#1", 1)] {
        let records = read_all(&engine, queue);
        assert_eq!(records.len(), 10, "{queue}");
        for (offset, record) in records.iter().enumerate() {
            let i = first + 2 * offset as u64;
            let view = record.view();
            assert_eq!(record.offset, offset as u64);
            assert_eq!(view.body, format!("body-{i}").as_bytes());
            assert_eq!(view.message_id, format!("MSG{i:04}"));
            assert_eq!(view.tag, if i.is_multiple_of(3) { "paid" } else { "new" });
            assert_eq!(view.keys().collect::<Vec<_>>(), vec![format!("k{i}")]);
            assert_eq!(view.properties, &[i as u8; 5]);
            assert_eq!(view.attributes.message_type, message_type::NORMAL);
            assert_eq!(view.attributes.user_property_count(), 0);
        }
    }
    for queue in ["chat#0", "chat#0/s1"] {
        let records = read_all(&engine, queue);
        assert_eq!(records.iter().map(|r| r.view().message_id.to_string()).collect::<Vec<_>>(), vec!["MULTI"]);
    }
    assert_eq!(block_on(engine.consumer_offset("g1", "orders#0")).unwrap(), Some(3));
    assert_eq!(
        block_on(engine.state("orders#0", StateTable::QueueConfig, b"orders#0".to_vec())).unwrap(),
        Some(vec![1, 0])
    );

    // New records (format 3, with attributes) follow the old ones in the same log.
    let mut record = NewRecord::new("orders#0", b"new".to_vec());
    record.attributes =
        Attributes { message_type: message_type::FIFO, message_group: "g-1".into(), ..Default::default() };
    let acks = block_on(engine.append(vec![record])).unwrap();
    assert_eq!(acks[0].offsets, vec![10]);
    engine.close().unwrap();

    let engine = open(&config);
    let records = read_all(&engine, "orders#0");
    assert_eq!(records.len(), 11);
    assert_eq!(records[0].view().body, b"body-0");
    assert_eq!(records[10].view().attributes.message_group, "g-1");
    assert_eq!(records[10].view().attributes.message_type, message_type::FIFO);
}
