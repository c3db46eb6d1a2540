//! Weighted fairness across tenants on a fair topic (see `sluice_transport::model::fairness`).
//!
//! `FairBacklog` is one (group, queue)'s read-ahead, held per tenant: each tenant keeps at
//! most `per_tenant_max` scanned messages. When a tenant's share is full the scan does not
//! stop: it passes over that tenant's messages and remembers where the tenant fell behind
//! (`behind`), so a heavy tenant's flood never keeps a light tenant's messages unread. A
//! tenant that falls behind takes its later messages only by catching up from that offset,
//! which keeps each tenant's messages in offset order.
//!
//! `FairClock` picks which tenant goes next across the group's queues on a shard: start-time
//! fair queueing with every message costing one. A tenant's next message starts at
//! `max(now, its last finish)` and finishes `1/weight` later; the message with the earliest
//! start goes first. Backlogged tenants get deliveries in proportion to their weights, and a
//! message that is the n-th of its tenant `t` waits for at most
//! `Σ_{j≠t} (1 + (n−1)·w_j/w_t)` deliveries of other tenants, however large their backlogs
//! are (README, "Fairness").
//!
//! Pure state; `GroupQueue` owns a `FairBacklog`, `GroupTopic` a `FairClock`.

use std::collections::{BTreeSet, HashMap, VecDeque};

use sluice_transport::model::fairness::Weights;

use crate::index::QueueEntry;

/// Scanned messages one tenant holds per (group, queue) before its later ones are passed over.
pub const FAIR_BACKLOG_PER_TENANT_MAX: usize = 128;
/// Virtual time one message of weight 1 takes. A weight w takes `VIRTUAL_UNIT / w`; with
/// weights up to 1,000 the rounding is under 0.1%.
const VIRTUAL_UNIT: u64 = 1 << 20;
/// Tenants whose last finish the clock remembers; past this it forgets the oldest (they
/// start afresh, as if idle).
pub const FAIR_CLOCK_TENANTS_MAX: usize = 100_000;

#[derive(Debug, Clone, Default)]
pub struct FairBacklog {
    by_tenant: HashMap<u64, VecDeque<QueueEntry>>,
    offsets: BTreeSet<u64>,
    /// Tenant → the first offset of its messages passed over (below the scan's `next`).
    behind: HashMap<u64, u64>,
    behind_from: BTreeSet<(u64, u64)>,
    /// Messages passed over and not yet caught up, per tenant behind (for stats: they are
    /// still to be delivered). Retention deleting some leaves this an overcount until the
    /// tenant catches up.
    passed_over: HashMap<u64, u64>,
    passed_over_total: u64,
}

/// How a forward scan treats one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scanned {
    Held,
    PassedOver,
    /// No room: the scan stops before this entry.
    Full,
}

impl FairBacklog {
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    pub fn behind_count(&self) -> usize {
        self.behind.len()
    }

    /// Messages passed over and still to be taken (see `passed_over`).
    pub fn passed_over(&self) -> u64 {
        self.passed_over_total
    }

    fn count_passed_over(&mut self, tenant: u64, delta: i64) {
        let n = self.passed_over.entry(tenant).or_default();
        let new = n.saturating_add_signed(delta);
        self.passed_over_total = self.passed_over_total - *n + new;
        *n = new;
        if new == 0 {
            self.passed_over.remove(&tenant);
        }
    }

    fn held_of(&self, tenant: u64) -> usize {
        self.by_tenant.get(&tenant).map_or(0, VecDeque::len)
    }

    /// Whether the message at `offset`, of tenant `tenant` (its key hash), waits here: held,
    /// or passed over and not caught up yet.
    pub fn holds(&self, offset: u64, tenant: u64) -> bool {
        self.offsets.contains(&offset) || self.behind.get(&tenant).is_some_and(|from| *from <= offset)
    }

    /// The lowest offset not yet leased or consumed that this backlog accounts for: held, or
    /// passed over.
    pub fn min_offset(&self) -> Option<u64> {
        let held = self.offsets.first().copied();
        let behind = self.behind_from.first().map(|(o, _)| *o);
        match (held, behind) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A forward scan's decision for `entry` (at the scan's `next`), applied.
    pub fn scan(&mut self, entry: &QueueEntry, backlog_max: usize) -> Scanned {
        let tenant = entry.key_hash;
        if self.behind.contains_key(&tenant) {
            self.count_passed_over(tenant, 1);
            return Scanned::PassedOver;
        }
        if self.offsets.len() >= backlog_max {
            return Scanned::Full;
        }
        if self.held_of(tenant) >= FAIR_BACKLOG_PER_TENANT_MAX {
            if self.behind.len() >= backlog_max {
                return Scanned::Full;
            }
            self.fall_behind(tenant, entry.offset);
            self.count_passed_over(tenant, 1);
            return Scanned::PassedOver;
        }
        self.push(*entry);
        Scanned::Held
    }

    fn push(&mut self, entry: QueueEntry) {
        let fresh = self.offsets.insert(entry.offset);
        assert!(fresh, "offset {} entered the fair backlog twice", entry.offset);
        let held = self.by_tenant.entry(entry.key_hash).or_default();
        assert!(held.back().is_none_or(|last| last.offset < entry.offset), "a tenant's messages are held in order");
        held.push_back(entry);
    }

    fn fall_behind(&mut self, tenant: u64, offset: u64) {
        let old = self.behind.insert(tenant, offset);
        assert!(old.is_none(), "a tenant falls behind once until it catches up");
        self.behind_from.insert((offset, tenant));
    }

    fn catch_up_to(&mut self, tenant: u64, offset: Option<u64>) {
        if let Some(old) = self.behind.remove(&tenant) {
            self.behind_from.remove(&(old, tenant));
        }
        match offset {
            Some(offset) => self.fall_behind(tenant, offset),
            None => self.count_passed_over(tenant, i64::MIN),
        }
    }

    /// Tenants behind with room to take more now, with where each resumes.
    pub fn catch_ups(&self, backlog_max: usize) -> Vec<(u64, u64)> {
        if self.offsets.len() >= backlog_max {
            return Vec::new();
        }
        self.behind_from
            .iter()
            .filter(|(_, t)| self.held_of(*t) < FAIR_BACKLOG_PER_TENANT_MAX)
            .map(|(o, t)| (*t, *o))
            .collect()
    }

    /// True when some tenant behind could take more now (`catch_ups` is not empty).
    pub fn can_catch_up(&self, backlog_max: usize) -> bool {
        self.offsets.len() < backlog_max && self.behind.keys().any(|t| self.held_of(*t) < FAIR_BACKLOG_PER_TENANT_MAX)
    }

    /// The tenant's oldest held message.
    pub fn head_of(&self, tenant: u64) -> Option<&QueueEntry> {
        self.by_tenant.get(&tenant).and_then(VecDeque::front)
    }

    /// Catches `tenant` up over entries read from its resume offset to `read_end` (exclusive;
    /// `next` is the scan's position): takes its messages `keep` accepts until its share or
    /// the backlog is full. Returns whether anything changed.
    pub fn catch_up(
        &mut self,
        tenant: u64,
        entries: &[QueueEntry],
        read_end: u64,
        next: u64,
        keep: impl Fn(&QueueEntry) -> bool,
        backlog_max: usize,
    ) -> bool {
        let Some(&from) = self.behind.get(&tenant) else { return false };
        let mut pushed = false;
        for entry in entries.iter().filter(|e| e.offset >= from && e.offset < next && e.key_hash == tenant) {
            if !keep(entry) {
                self.count_passed_over(tenant, -1);
                continue;
            }
            if self.held_of(tenant) >= FAIR_BACKLOG_PER_TENANT_MAX || self.offsets.len() >= backlog_max {
                self.catch_up_to(tenant, Some(entry.offset));
                return pushed || entry.offset != from;
            }
            self.count_passed_over(tenant, -1);
            self.push(*entry);
            pushed = true;
        }
        let resume = (read_end < next).then_some(read_end.max(from));
        self.catch_up_to(tenant, resume);
        pushed || resume != Some(from)
    }

    /// Every tenant's oldest held message.
    pub fn heads(&self) -> impl Iterator<Item = &QueueEntry> + '_ {
        self.by_tenant.values().filter_map(VecDeque::front)
    }

    /// The tenant's oldest held message, taken.
    pub fn take(&mut self, tenant: u64) -> Option<QueueEntry> {
        let held = self.by_tenant.get_mut(&tenant)?;
        let entry = held.pop_front()?;
        if held.is_empty() {
            self.by_tenant.remove(&tenant);
        }
        let was = self.offsets.remove(&entry.offset);
        assert!(was, "a held entry is indexed by offset");
        Some(entry)
    }

    /// Forgets what lies below `offset` (retention removed it): held entries are dropped and
    /// tenants behind resume at `offset` at the earliest (caught up, if that is `next`).
    pub fn forget_below(&mut self, offset: u64, next: u64) {
        self.offsets = self.offsets.split_off(&offset);
        self.by_tenant.retain(|_, held| {
            held.retain(|e| e.offset >= offset);
            !held.is_empty()
        });
        let moved: Vec<(u64, u64)> = self.behind_from.range(..(offset, 0)).copied().collect();
        for (_, tenant) in moved {
            self.catch_up_to(tenant, (offset < next).then_some(offset));
        }
    }
}

/// Start-time fair queueing over tenants, for one (group, topic) on a shard.
#[derive(Debug, Clone, Default)]
pub struct FairClock {
    /// Start of the message served last.
    now: u64,
    /// Tenant → finish of its message served last (only while ahead of `now`).
    finish: HashMap<u64, u64>,
}

impl FairClock {
    /// When the tenant's next message would start.
    pub fn start_of(&self, tenant: u64) -> u64 {
        self.finish.get(&tenant).copied().unwrap_or(0).max(self.now)
    }

    /// Charges one delivery to the tenant.
    pub fn charge(&mut self, tenant: u64, weights: &Weights) {
        let start = self.start_of(tenant);
        let cost = VIRTUAL_UNIT / u64::from(weights.of(tenant).max(1));
        self.now = start;
        if self.finish.len() >= FAIR_CLOCK_TENANTS_MAX && !self.finish.contains_key(&tenant) {
            self.forget_idle();
        }
        self.finish.insert(tenant, start + cost);
    }

    /// Drops tenants whose finish is not ahead of now (they start at now anyway), and if that
    /// is not enough, every remembered tenant.
    fn forget_idle(&mut self) {
        let now = self.now;
        self.finish.retain(|_, f| *f > now);
        if self.finish.len() >= FAIR_CLOCK_TENANTS_MAX {
            self.finish.clear();
        }
    }

    pub fn tenants(&self) -> usize {
        self.finish.len()
    }

    /// Of the candidate tenants, the one whose message starts first (ties: lowest hash, so the
    /// choice is deterministic).
    pub fn pick(&self, tenants: impl Iterator<Item = u64>) -> Option<u64> {
        tenants.map(|t| (self.start_of(t), t)).min().map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sluice_transport::model::record::name_hash;

    fn entry(offset: u64, tenant: u64) -> QueueEntry {
        QueueEntry { offset, key_hash: tenant, ..QueueEntry::default() }
    }

    /// Serves `deliveries` messages from always-backlogged tenants; returns each one's count.
    fn serve(weights: &Weights, tenants: &[u64], deliveries: usize) -> HashMap<u64, usize> {
        let mut clock = FairClock::default();
        let mut got = HashMap::new();
        for _ in 0..deliveries {
            let t = clock.pick(tenants.iter().copied()).unwrap();
            clock.charge(t, weights);
            *got.entry(t).or_default() += 1;
        }
        got
    }

    #[test]
    fn backlogged_tenants_share_by_weight() {
        let weights = Weights::parse("a=1,b=2,c=4", None).unwrap();
        let [a, b, c] = ["a", "b", "c"].map(name_hash);
        let got = serve(&weights, &[a, b, c], 7_000);
        assert_eq!((got[&a], got[&b], got[&c]), (1_000, 2_000, 4_000));
    }

    #[test]
    fn a_tenant_arriving_late_is_served_within_one_delivery_per_other_tenant() {
        let weights = Weights::parse("heavy=1000", None).unwrap();
        let heavy = name_hash("heavy");
        let others: Vec<u64> = (1..=5).collect();
        let mut clock = FairClock::default();
        for _ in 0..10_000 {
            let t = clock.pick(std::iter::once(heavy).chain(others.iter().copied())).unwrap();
            clock.charge(t, &weights);
        }
        let light = name_hash("light");
        let mut before = 0;
        loop {
            let t = clock.pick([heavy, light].into_iter().chain(others.iter().copied())).unwrap();
            clock.charge(t, &weights);
            if t == light {
                break;
            }
            before += 1;
        }
        assert!(before <= 6, "{before} deliveries went before the newcomer; the bound is one per other tenant");
    }

    proptest! {
        /// The documented bound: the n-th message of tenant t goes after at most
        /// Σ_{j≠t} (1 + (n−1)·w_j/w_t) deliveries of other backlogged tenants.
        #[test]
        fn starvation_bound_holds(
            weights in proptest::collection::vec(1u32..50, 2..6),
            warmup in 0usize..500,
            n in 1usize..20,
        ) {
            let list: Vec<String> = weights.iter().enumerate().map(|(i, w)| format!("t{i}={w}")).collect();
            let parsed = Weights::parse(&list.join(","), None).unwrap();
            let tenants: Vec<u64> = (0..weights.len()).map(|i| name_hash(&format!("t{i}"))).collect();
            let (newcomer, others) = (tenants[0], &tenants[1..]);
            let mut clock = FairClock::default();
            for _ in 0..warmup {
                let t = clock.pick(others.iter().copied()).unwrap();
                clock.charge(t, &parsed);
            }
            let mut served_newcomer = 0;
            let mut others_served = 0u64;
            while served_newcomer < n {
                let t = clock.pick(tenants.iter().copied()).unwrap();
                clock.charge(t, &parsed);
                if t == newcomer { served_newcomer += 1 } else { others_served += 1 }
            }
            let w_t = f64::from(weights[0]);
            let bound: f64 = weights[1..].iter().map(|w| 1.0 + (n as f64 - 1.0) * f64::from(*w) / w_t).sum();
            prop_assert!(others_served as f64 <= bound.ceil() + 1e-9, "{} > {}", others_served, bound);
        }

        /// Whatever the mix, a tenant's messages leave in offset order, nothing is taken twice,
        /// the backlog never holds more than it may, and the lowest offset it accounts for
        /// never passes a message still to be delivered.
        #[test]
        fn scan_and_catch_up_keep_order_and_bounds(
            tenants in proptest::collection::vec(0u64..4, 1..2_000),
            backlog_max in 130usize..600,
            takes in proptest::collection::vec(0u64..4, 0..3_000),
        ) {
            let entries: Vec<QueueEntry> = tenants.iter().enumerate().map(|(o, t)| entry(o as u64, *t)).collect();
            let mut b = FairBacklog::default();
            let mut next = 0u64;
            let mut taken: HashMap<u64, u64> = HashMap::new();
            let mut delivered = BTreeSet::new();
            let mut takes = takes.into_iter();
            loop {
                for e in &entries[next as usize..] {
                    match b.scan(e, backlog_max) {
                        Scanned::Full => break,
                        _ => next = e.offset + 1,
                    }
                }
                for (t, from) in b.catch_ups(backlog_max) {
                    let end = next.min(from + 50);
                    b.catch_up(t, &entries[from as usize..end as usize], end, next, |_| true, backlog_max);
                }
                prop_assert!(b.len() <= backlog_max);
                let undelivered = (0..next).filter(|o| !delivered.contains(o)).count() as u64;
                prop_assert_eq!(b.passed_over() + b.len() as u64, undelivered, "held + passed over = still to deliver");
                let Some(t) = takes.next() else { break };
                if let Some(e) = b.take(t) {
                    prop_assert!(taken.get(&t).is_none_or(|last| *last < e.offset), "in order per tenant");
                    taken.insert(t, e.offset);
                    delivered.insert(e.offset);
                }
                if let Some(lowest) = (0..next).find(|o| !delivered.contains(o)) {
                    prop_assert!(b.min_offset().is_some_and(|m| m <= lowest), "accounts for the lowest undelivered");
                }
            }
        }
    }

    #[test]
    fn a_flood_does_not_keep_a_light_tenant_unread() {
        let (heavy, light) = (1, 2);
        let mut entries: Vec<QueueEntry> = (0..10_000).map(|o| entry(o, heavy)).collect();
        entries.push(entry(10_000, light));
        let mut b = FairBacklog::default();
        let mut next = 0;
        for e in &entries {
            if b.scan(e, 2_000) == Scanned::Full {
                break;
            }
            next = e.offset + 1;
        }
        assert_eq!(next, 10_001, "the scan passed over the heavy tenant's flood");
        assert_eq!(b.len(), FAIR_BACKLOG_PER_TENANT_MAX + 1);
        assert_eq!(b.take(light).map(|e| e.offset), Some(10_000));
        assert_eq!(b.min_offset(), Some(0));
        // The heavy tenant drains its share and catches up from where it fell behind.
        while b.take(heavy).is_some() {}
        assert_eq!(b.catch_ups(2_000), [(heavy, FAIR_BACKLOG_PER_TENANT_MAX as u64)]);
        let from = FAIR_BACKLOG_PER_TENANT_MAX;
        assert!(b.catch_up(heavy, &entries[from..from + 500], (from + 500) as u64, next, |_| true, 2_000));
        assert_eq!(b.heads().map(|e| e.offset).collect::<Vec<_>>(), [from as u64]);
        assert_eq!(b.min_offset(), Some(from as u64));
        assert_eq!(b.len(), FAIR_BACKLOG_PER_TENANT_MAX);
    }

    #[test]
    fn retention_moves_tenants_behind_forward() {
        let mut b = FairBacklog::default();
        for o in 0..200 {
            b.scan(&entry(o, 1), 2_000);
        }
        assert_eq!(b.min_offset(), Some(0));
        b.forget_below(150, 200);
        assert_eq!(b.min_offset(), Some(150), "held entries below went, the tenant resumes at 150");
        assert_eq!(b.len(), 0);
        b.forget_below(200, 200);
        assert_eq!(b.min_offset(), None, "caught up: everything below next is gone");
        assert_eq!(b.behind_count(), 0);
    }
}
