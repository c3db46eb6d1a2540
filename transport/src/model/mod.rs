//! The vocabulary broker and proxy share: message types, the stored record (the same bytes on
//! disk and in pop replies), message filters, where a queue lives, and the broker's error codes.
//! Pure: no I/O.

pub mod codes;
pub mod fairness;
pub mod filter;
pub mod message_type;
pub mod placement;
pub mod record;

pub use record::{Attributes, AttributesView, NewRecord, RecordError, RecordView};
