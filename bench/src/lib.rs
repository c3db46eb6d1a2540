//! Placeholder crate; see README.
#![forbid(unsafe_code)]
