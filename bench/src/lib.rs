//! sluice-bench: the latency benchmark users run, Sluice side by side with its peers.
//!
//! Open-loop load at a fixed rate (`schedule`), latency from each message's due time into
//! HdrHistogram (`stats`), one interface over every system measured (`targets`), a run
//! (`driver`), rising rates until a system falls short (`saturation`), results as JSON with a
//! summary table (`results`) and an HTML report (`report`).
#![forbid(unsafe_code)]

pub mod cpu;
pub mod driver;
pub mod error;
pub mod overhead;
pub mod report;
pub mod results;
pub mod saturation;
pub mod schedule;
pub mod stats;
pub mod targets;
pub mod timer;
pub mod workload;
