pub mod agent;
pub mod client;
pub mod config;
pub mod metrics;
pub mod run;
