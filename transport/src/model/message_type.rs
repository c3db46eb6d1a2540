//! Message types, numbered as RocketMQ's `MessageType` enum (v2 API). A topic has one type;
//! its queues accept only messages of that type.

pub const NORMAL: u8 = 1;
pub const FIFO: u8 = 2;
pub const DELAY: u8 = 3;
pub const TRANSACTION: u8 = 4;
pub const LITE: u8 = 5;
pub const PRIORITY: u8 = 6;

/// True for 1..=6.
pub fn is_known(t: u8) -> bool {
    (NORMAL..=PRIORITY).contains(&t)
}

pub fn name(t: u8) -> &'static str {
    match t {
        NORMAL => "normal",
        FIFO => "fifo",
        DELAY => "delay",
        TRANSACTION => "transaction",
        LITE => "lite",
        PRIORITY => "priority",
        _ => "unspecified",
    }
}

/// The type named `text` (as `sluice topic create --type` takes it).
pub fn parse(text: &str) -> Option<u8> {
    (NORMAL..=PRIORITY).find(|t| name(*t).eq_ignore_ascii_case(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in NORMAL..=PRIORITY {
            assert_eq!(parse(name(t)), Some(t));
        }
        assert_eq!(parse("bogus"), None);
        assert!(!is_known(0) && !is_known(7));
    }
}
