//! Slot bookkeeping for the registered buffers: which send slots and staging chunks are free,
//! and what each receive slot is doing. The memory itself lives in the verbs module; this is
//! only the accounting, so it can be tested without a device.
#![forbid(unsafe_code)]

/// A fixed set of slots handed out and given back (send slots, write staging chunks).
#[derive(Debug)]
pub struct SlotPool {
    free: Vec<u32>,
    in_use: Vec<bool>,
}

impl SlotPool {
    pub fn new(slots: u32) -> SlotPool {
        // Pop from the end: hand out low indices first, which keeps the hot slots in cache.
        SlotPool { free: (0..slots).rev().collect(), in_use: vec![false; slots as usize] }
    }

    pub fn capacity(&self) -> u32 {
        self.in_use.len() as u32
    }

    pub fn available(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn in_use(&self) -> u32 {
        self.capacity() - self.available()
    }

    pub fn take(&mut self) -> Option<u32> {
        let slot = self.free.pop()?;
        self.in_use[slot as usize] = true;
        Some(slot)
    }

    /// Returns a slot. A slot given back twice, or one never handed out, is a bug.
    pub fn give(&mut self, slot: u32) {
        let used = self.in_use.get_mut(slot as usize).unwrap_or_else(|| panic!("slot {slot} out of range"));
        assert!(*used, "slot {slot} given back twice");
        *used = false;
        self.free.push(slot);
    }
}

/// What a receive slot is doing. The verbs module refuses to post a receive into a slot whose
/// bytes are still lent out to a frame: that would let the device write under a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvState {
    /// Posted to the queue pair; the device may write into it.
    Posted,
    /// Its completion arrived; the driver is looking at it.
    Completed,
    /// Lent to a received frame (or held for a ring frame) until that is dropped.
    Lent,
}

#[derive(Debug)]
pub struct RecvSlots {
    states: Vec<RecvState>,
}

impl RecvSlots {
    /// All slots start posted: they are posted before the link is up.
    pub fn new(slots: u32) -> RecvSlots {
        RecvSlots { states: vec![RecvState::Posted; slots as usize] }
    }

    pub fn state(&self, slot: u32) -> RecvState {
        self.states[slot as usize]
    }

    /// Applies a transition, asserting it is one the protocol allows.
    pub fn transition(&mut self, slot: u32, to: RecvState) {
        let state = self.states.get_mut(slot as usize).unwrap_or_else(|| panic!("receive slot {slot} out of range"));
        let allowed = matches!(
            (*state, to),
            (RecvState::Posted, RecvState::Completed)
                | (RecvState::Completed, RecvState::Lent)
                | (RecvState::Completed, RecvState::Posted)
                | (RecvState::Lent, RecvState::Posted)
        );
        assert!(allowed, "receive slot {slot}: {state:?} -> {to:?} is not allowed");
        *state = to;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_each_slot_once() {
        let mut pool = SlotPool::new(3);
        let taken: Vec<u32> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(taken, vec![0, 1, 2]);
        assert_eq!(pool.available(), 0);
        pool.give(1);
        assert_eq!(pool.take(), Some(1));
        assert_eq!(pool.in_use(), 3);
    }

    #[test]
    #[should_panic(expected = "given back twice")]
    fn double_give_is_a_bug() {
        let mut pool = SlotPool::new(2);
        let slot = pool.take().unwrap();
        pool.give(slot);
        pool.give(slot);
    }

    #[test]
    fn receive_slot_lifecycle() {
        let mut slots = RecvSlots::new(2);
        slots.transition(0, RecvState::Completed);
        slots.transition(0, RecvState::Lent);
        slots.transition(0, RecvState::Posted);
        slots.transition(1, RecvState::Completed);
        slots.transition(1, RecvState::Posted);
        assert_eq!(slots.state(1), RecvState::Posted);
    }

    #[test]
    #[should_panic(expected = "not allowed")]
    fn a_lent_slot_cannot_be_completed_again() {
        let mut slots = RecvSlots::new(1);
        slots.transition(0, RecvState::Completed);
        slots.transition(0, RecvState::Lent);
        slots.transition(0, RecvState::Completed);
    }
}
