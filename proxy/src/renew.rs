//! Server-side auto-renew for PushConsumers: while a listener runs, the proxy keeps the
//! delivery invisible by extending it before its deadline. A renewal keeps the broker's lease
//! id, so the handle the client holds stays valid and can be acked through any proxy. This is
//! soft state: if the proxy goes away the deliveries become visible again when their time runs
//! out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_transport::messages::{ChangeInvisibleRequest, ChangeInvisibleResponse};

use crate::state::{Counters, ProxyState};

/// How often due renewals are looked for.
const RENEW_TICK: Duration = Duration::from_millis(500);
/// Renewals sent per tick at most, so one tick stays short.
const RENEW_PER_TICK_MAX: usize = 10_000;

#[derive(Debug)]
pub struct Renewal {
    pub queue: String,
    pub group: String,
    /// The broker receipt (renewals keep it valid).
    pub receipt: String,
    pub invisible_ms: u64,
    pub renew_at: Instant,
    /// Renewal stops after this; the delivery then becomes visible again.
    pub until: Instant,
}

pub type Tracked = Arc<tokio::sync::Mutex<Renewal>>;

pub struct Renewals {
    by_handle: Mutex<HashMap<String, Tracked>>,
    max: usize,
}

impl Renewals {
    pub fn new(max: usize) -> Renewals {
        Renewals { by_handle: Mutex::new(HashMap::new()), max }
    }

    /// Starts renewing; false when the table is full (the delivery is then not renewed).
    pub fn track(&self, handle: String, renewal: Renewal) -> bool {
        let mut map = self.by_handle.lock().expect("renewals lock");
        if map.len() >= self.max {
            return false;
        }
        map.insert(handle, Arc::new(tokio::sync::Mutex::new(renewal)));
        true
    }

    /// Stops renewing a delivery (it was acked, changed or dead-lettered).
    pub fn stop(&self, handle: &str) {
        self.by_handle.lock().expect("renewals lock").remove(handle);
    }

    pub fn len(&self) -> usize {
        self.by_handle.lock().expect("renewals lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn snapshot(&self) -> Vec<(String, Tracked)> {
        self.by_handle.lock().expect("renewals lock").iter().map(|(h, t)| (h.clone(), t.clone())).collect()
    }

    fn forget(&self, handle: &str) {
        self.by_handle.lock().expect("renewals lock").remove(handle);
    }
}

/// Renews due deliveries until shutdown.
pub async fn run(state: Arc<ProxyState>) {
    let mut tick = tokio::time::interval(RENEW_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.shutdown_started() => return,
        }
        let now = Instant::now();
        let mut sent = 0;
        for (handle, tracked) in state.renewals.snapshot() {
            if sent >= RENEW_PER_TICK_MAX {
                break;
            }
            let Ok(mut renewal) = tracked.try_lock() else { continue };
            if renewal.renew_at > now {
                continue;
            }
            if renewal.until <= now {
                state.renewals.forget(&handle);
                continue;
            }
            sent += 1;
            let request = ChangeInvisibleRequest {
                queue: renewal.queue.clone(),
                group: renewal.group.clone(),
                receipt: renewal.receipt.clone(),
                invisible_ms: renewal.invisible_ms,
                renew: true,
                suspend: false,
            };
            let reply = state.brokers.call_for(&renewal.queue, &request).await;
            match reply.as_ref().map(|f| f.access::<ChangeInvisibleResponse>()) {
                Ok(Ok(_)) => {
                    renewal.renew_at = Instant::now() + Duration::from_millis(renewal.invisible_ms / 2);
                    Counters::add(&state.counters.renewed, 1);
                }
                _ => {
                    // Acked, expired or the broker is gone: nothing left to renew.
                    tracing::debug!(handle, "auto-renew stopped");
                    state.renewals.forget(&handle);
                }
            }
        }
    }
}
