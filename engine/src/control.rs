//! Control records: engine state changes that are not messages (consumer offsets, queue
//! deletion, state-table writes, dispatching or discarding a held message). They travel through the CommitLog like messages, so the log
//! stays the only log and the index can always be rebuilt from it.

use crate::index::{HeldKind, QueueEntry, StateTable, ENTRY_BYTES};

/// Largest state-table value, in bytes.
pub const STATE_VALUE_MAX_BYTES: usize = 64 << 10;
/// Largest state-table key, in bytes.
pub const STATE_KEY_MAX_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlOp {
    SetConsumerOffset {
        group: String,
        queue: String,
        offset: u64,
    },
    DeleteQueue {
        queue: String,
    },
    PutState {
        table: StateTable,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    DeleteState {
        table: StateTable,
        key: Vec<u8>,
    },
    /// A held message enters its queues: the control record's own queue references carry the
    /// queues and the offsets it gets there; `entry` is the stored record's entry.
    Dispatch {
        kind: HeldKind,
        due_ms: u64,
        entry: QueueEntry,
    },
    /// A held message is dropped without being delivered (recalled, rolled back, given up).
    DiscardHeld {
        kind: HeldKind,
        due_ms: u64,
        position: u64,
    },
}

const OP_SET_CONSUMER_OFFSET: u8 = 1;
const OP_DELETE_QUEUE: u8 = 2;
const OP_PUT_STATE: u8 = 3;
const OP_DELETE_STATE: u8 = 4;
const OP_DISPATCH: u8 = 5;
const OP_DISCARD_HELD: u8 = 6;

impl ControlOp {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let short = |out: &mut Vec<u8>, s: &[u8]| {
            out.push(s.len() as u8);
            out.extend_from_slice(s);
        };
        let long = |out: &mut Vec<u8>, s: &[u8]| {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s);
        };
        match self {
            ControlOp::SetConsumerOffset { group, queue, offset } => {
                out.push(OP_SET_CONSUMER_OFFSET);
                short(&mut out, group.as_bytes());
                short(&mut out, queue.as_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
            }
            ControlOp::DeleteQueue { queue } => {
                out.push(OP_DELETE_QUEUE);
                short(&mut out, queue.as_bytes());
            }
            ControlOp::PutState { table, key, value } => {
                out.extend_from_slice(&[OP_PUT_STATE, *table as u8]);
                long(&mut out, key);
                long(&mut out, value);
            }
            ControlOp::DeleteState { table, key } => {
                out.extend_from_slice(&[OP_DELETE_STATE, *table as u8]);
                long(&mut out, key);
            }
            ControlOp::Dispatch { kind, due_ms, entry } => {
                out.extend_from_slice(&[OP_DISPATCH, *kind as u8]);
                out.extend_from_slice(&due_ms.to_le_bytes());
                out.extend_from_slice(&entry.encode());
            }
            ControlOp::DiscardHeld { kind, due_ms, position } => {
                out.extend_from_slice(&[OP_DISCARD_HELD, *kind as u8]);
                out.extend_from_slice(&due_ms.to_le_bytes());
                out.extend_from_slice(&position.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a control body read from the log; `None` if it is malformed.
    pub fn decode(src: &[u8]) -> Option<ControlOp> {
        let mut r = Cursor { src, at: 0 };
        let op = match r.u8()? {
            OP_SET_CONSUMER_OFFSET => ControlOp::SetConsumerOffset {
                group: r.short_str()?,
                queue: r.short_str()?,
                offset: u64::from_le_bytes(r.take(8)?.try_into().ok()?),
            },
            OP_DELETE_QUEUE => ControlOp::DeleteQueue { queue: r.short_str()? },
            OP_PUT_STATE => ControlOp::PutState {
                table: StateTable::from_u8(r.u8()?)?,
                key: r.long(STATE_KEY_MAX_BYTES)?.to_vec(),
                value: r.long(STATE_VALUE_MAX_BYTES)?.to_vec(),
            },
            OP_DELETE_STATE => ControlOp::DeleteState {
                table: StateTable::from_u8(r.u8()?)?,
                key: r.long(STATE_KEY_MAX_BYTES)?.to_vec(),
            },
            OP_DISPATCH => ControlOp::Dispatch {
                kind: HeldKind::from_u8(r.u8()?)?,
                due_ms: r.u64()?,
                entry: QueueEntry::decode(0, r.take(ENTRY_BYTES)?)?,
            },
            OP_DISCARD_HELD => {
                ControlOp::DiscardHeld { kind: HeldKind::from_u8(r.u8()?)?, due_ms: r.u64()?, position: r.u64()? }
            }
            _ => return None,
        };
        (r.at == src.len()).then_some(op)
    }
}

struct Cursor<'a> {
    src: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.src.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn short_str(&mut self) -> Option<String> {
        let len = self.u8()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    fn long(&mut self, max: usize) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        if len > max {
            return None;
        }
        self.take(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_op_round_trips() {
        let ops = [
            ControlOp::SetConsumerOffset { group: "g".into(), queue: "q/1".into(), offset: 42 },
            ControlOp::DeleteQueue { queue: "chat/abc".into() },
            ControlOp::PutState { table: StateTable::PopState, key: b"k".to_vec(), value: vec![1, 2, 3] },
            ControlOp::DeleteState { table: StateTable::Timer, key: b"t".to_vec() },
            ControlOp::Dispatch {
                kind: HeldKind::Timer,
                due_ms: 77,
                entry: QueueEntry {
                    position: 4096,
                    size_bytes: 9,
                    message_type: 3,
                    group_hash: 5,
                    ..Default::default()
                },
            },
            ControlOp::DiscardHeld { kind: HeldKind::Half, due_ms: 0, position: 8192 },
        ];
        for op in ops {
            assert_eq!(ControlOp::decode(&op.encode()), Some(op));
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = ControlOp::decode(&bytes);
        }
    }
}
