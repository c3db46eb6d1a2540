//! Queue names and their placement on shards. The rules are shared with the proxy (it routes by
//! them), so they live in `sluice_transport::model::placement`; this adds the engine's error.

use crate::error::{EngineError, Result};

pub use sluice_transport::model::placement::{placement_key, shard_for_queue, QUEUE_NAME_MAX_BYTES};

/// Checks a queue name supplied from outside.
pub fn validate_queue_name(name: &str) -> Result<()> {
    sluice_transport::model::placement::check_queue_name(name)
        .map_err(|reason| EngineError::InvalidQueueName { name: name.to_string(), reason })
}
