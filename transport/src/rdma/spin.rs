//! How long an idle RDMA poller busy-polls before it parks.
//!
//! Parking costs a wake-up (arming the CQ, reading the event, on glommio a thread hand-off), so a
//! poller spins through short gaps between a link's events. But a spinning poller holds a CPU, on
//! shared cores taken from the broker, the proxy and the application. The budget is time, not
//! rounds: one round costs ~100× more on an emulated guest than on an RDMA host.
//!
//! It adapts to the gaps the link has seen (a gap: from the first idle round to the next round
//! that moved something, parked or not). A gap that ended within `max` raises the budget to twice
//! that gap (gaps vary: a ping-pong's p90 gap is 1.5–2× its median, and each park costs a
//! wake-up); every gap also lets it decay by a sixteenth toward `base`. So a link with steady short
//! gaps (a ping-pong, a request stream) spins through them, and one whose gaps are long spends only
//! `base` on each. A gap that ended after a park includes the wake-up, so a park is not, by itself,
//! a reason to spin longer next time.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

pub(crate) struct SpinBudget {
    base: Duration,
    max: Duration,
    current: Duration,
    /// Start of the current gap: the first idle round since the last progress.
    idle_since: Option<Instant>,
}

impl SpinBudget {
    pub(crate) fn new(base: Duration, max: Duration) -> SpinBudget {
        assert!(base <= max, "validated: busy_poll_us <= busy_poll_max_us");
        SpinBudget { base, max, current: base, idle_since: None }
    }

    /// A round moved something: the gap, if there was one, ends now.
    pub(crate) fn on_progress(&mut self) {
        if let Some(since) = self.idle_since.take() {
            self.observe_gap(since.elapsed());
        }
    }

    /// A round found nothing: whether to spin another round rather than park.
    pub(crate) fn keep_spinning(&mut self) -> bool {
        let now = Instant::now();
        let since = *self.idle_since.get_or_insert(now);
        now.saturating_duration_since(since) < self.current
    }

    fn observe_gap(&mut self, gap: Duration) {
        let decayed = self.current - self.current / 16;
        let covering = if gap <= self.max { gap * 2 } else { Duration::ZERO };
        self.current = decayed.max(covering).clamp(self.base, self.max);
        debug_assert!(self.base <= self.current && self.current <= self.max);
    }

    #[cfg(test)]
    fn current(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_gap_within_the_ceiling_is_covered_and_long_gaps_decay_back_to_the_base() {
        let mut spin = SpinBudget::new(50 * US, 1000 * US);
        assert_eq!(spin.current(), 50 * US);
        spin.observe_gap(240 * US);
        assert_eq!(spin.current(), 480 * US, "twice the gap");
        spin.observe_gap(2 * US);
        assert_eq!(spin.current(), 450 * US, "a short gap only decays it");
        spin.observe_gap(240 * US);
        assert_eq!(spin.current(), 480 * US, "alternating short and long gaps keep the longer covered");
        spin.observe_gap(900 * US);
        assert_eq!(spin.current(), 1000 * US, "capped at the ceiling");
        for _ in 0..128 {
            spin.observe_gap(5_000 * US);
        }
        assert_eq!(spin.current(), 50 * US, "gaps beyond the ceiling are not worth spinning for");
    }

    #[test]
    fn no_spinning_when_the_budget_is_zero_and_spinning_when_it_is_not() {
        let mut never = SpinBudget::new(Duration::ZERO, Duration::ZERO);
        never.observe_gap(US);
        assert!(!never.keep_spinning());
        let mut always = SpinBudget::new(Duration::from_secs(3600), Duration::from_secs(3600));
        assert!(always.keep_spinning());
        always.on_progress();
        assert!(always.keep_spinning(), "a new gap starts after progress");
    }

    #[test]
    fn a_gap_spans_the_park_until_progress() {
        let mut spin = SpinBudget::new(Duration::ZERO, Duration::from_secs(3600));
        assert!(!spin.keep_spinning(), "the first idle round starts a gap the budget does not cover");
        let started = spin.idle_since.expect("the gap started");
        assert!(!spin.keep_spinning());
        assert_eq!(spin.idle_since, Some(started), "idle rounds after a park continue the same gap");
        spin.on_progress();
        assert_eq!(spin.idle_since, None, "progress ends the gap");
    }
}
