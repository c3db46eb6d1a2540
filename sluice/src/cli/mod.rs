pub mod agent;
pub mod client;
pub mod config;
pub mod inspect;
pub mod metrics;
pub mod run;
pub mod stats;
pub mod telemetry;
