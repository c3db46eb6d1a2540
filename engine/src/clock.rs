//! The broker's clock: the wall time at the first reading plus the monotonic time since. Leases,
//! long polls, quotas, timers, TTLs and store times are all read from it, so a step of the wall
//! clock (NTP, an operator, a VM resumed) changes no deadline: an hour back does not stretch a
//! 30 s lease to an hour and stall every consumer, and an hour forward does not expire every
//! lease at once. Rates still follow the wall clock's (NTP slews the monotonic clock too); a
//! step is picked up at the next start.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// (wall ms, monotonic instant) of the first reading.
static ANCHOR: OnceLock<(u64, Instant)> = OnceLock::new();

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds since the Unix epoch on the broker's step-free timeline.
pub fn now_ms() -> u64 {
    let (wall_at_anchor_ms, anchor) = ANCHOR.get_or_init(|| (wall_ms(), Instant::now()));
    wall_at_anchor_ms + anchor.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_wall_clock_and_never_goes_back() {
        let first = now_ms();
        assert!(first.abs_diff(wall_ms()) < 1_000, "the clock starts at the wall time");
        let mut last = first;
        for _ in 0..1000 {
            let now = now_ms();
            assert!(now >= last, "the clock went back from {last} to {now}");
            last = now;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(now_ms() >= first + 20);
    }
}
