//! sluice-bench's errors. Codes are stable and never reused (6001–6099).

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("workload {workload:?}: {why}")]
    Workload { workload: String, why: String },
    #[error("suite {path}: {why}")]
    Suite { path: String, why: String },
    #[error("target {target}: {why}")]
    Target { target: String, why: String },
    #[error("cannot reach {target} at {endpoint}: {why} (is it running? scripts/bench.sh starts every system)")]
    Connect { target: String, endpoint: String, why: String },
    #[error("{target} runs with {actual}, but this run asks for {requested} durability; restart it to match or pass --durability {actual_level}")]
    DurabilityMismatch { target: String, requested: String, actual: String, actual_level: String },
    #[error("results {path}: {why}")]
    Results { path: String, why: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl BenchError {
    pub fn code(&self) -> u32 {
        match self {
            BenchError::Workload { .. } => 6001,
            BenchError::Suite { .. } => 6002,
            BenchError::Target { .. } => 6003,
            BenchError::Connect { .. } => 6004,
            BenchError::DurabilityMismatch { .. } => 6005,
            BenchError::Results { .. } => 6006,
            BenchError::Io(_) => 6007,
        }
    }

    pub fn target(target: &str, why: impl std::fmt::Display) -> BenchError {
        BenchError::Target { target: target.to_string(), why: why.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique() {
        let s = String::new;
        let all = [
            BenchError::Workload { workload: s(), why: s() },
            BenchError::Suite { path: s(), why: s() },
            BenchError::Target { target: s(), why: s() },
            BenchError::Connect { target: s(), endpoint: s(), why: s() },
            BenchError::DurabilityMismatch { target: s(), requested: s(), actual: s(), actual_level: s() },
            BenchError::Results { path: s(), why: s() },
            BenchError::Io(std::io::Error::other("x")),
        ];
        let mut codes: Vec<u32> = all.iter().map(BenchError::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }
}
