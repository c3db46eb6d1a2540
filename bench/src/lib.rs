//! sluice-bench: the end-to-end latency benchmark against peers on the same machine.
//! Empty until the benchmark issue; the engine's own benches live in engine/benches.
#![forbid(unsafe_code)]
