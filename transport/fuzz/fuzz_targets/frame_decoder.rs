//! Untrusted bytes through the stream reader, the parser and every kind's validator.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else { return };
    if first & 0x80 != 0 {
        // Wrap the bytes in a valid header and CRC, so the archive validators get fuzzed.
        sluice_transport::fuzzing::validate_as_every_kind(rest);
    } else {
        // The first byte picks the read chunking, so split headers and bodies are explored.
        sluice_transport::fuzzing::decode_untrusted(rest, usize::from(*first), 1 << 20);
    }
});
