//! The engine's integration tests against a real RocksDB and real files: round trips, recovery,
//! torn writes and corruption, group commit, back-pressure, eviction, the on-disk format, and a
//! child process SIGKILLed mid-append. One test binary for all of them (one compile and link
//! instead of one per file); run one file's tests with a filter, e.g. `--test storage crash::`.

mod common;

mod backpressure;
mod crash;
mod eviction;
mod format_compat;
mod group_commit;
mod recovery;
mod roundtrip;
mod zero_ahead;
