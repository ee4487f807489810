//! The HTTP request reader, fed the input in two pieces split where the
//! data says: it must never panic, never consume more than it was given,
//! and give the same answer whether the bytes came at once or in pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::http::{Limits, ReadStatus, RequestReader};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let limits = Limits {
        max_head_bytes: 4096,
        max_body_bytes: 8192,
    };
    let split = data[0] as usize % data.len();
    let input = &data[1..];
    let whole = RequestReader::new().poll(input, &limits);
    let mut r = RequestReader::new();
    let split = split.min(input.len());
    let first = r.poll(&input[..split], &limits);
    if matches!(whole, Ok(ReadStatus::Complete { .. })) {
        assert!(first.is_ok(), "a prefix of a good request is not an error");
    }
    let pieces = match first {
        Ok(ReadStatus::Partial { .. }) => r.poll(input, &limits),
        other => other,
    };
    if let Ok(ReadStatus::Complete { consumed, .. }) = &whole {
        assert!(*consumed <= input.len());
    }
    // A request complete in the whole input is complete in pieces too
    // (possibly earlier, when the first piece already held it).
    if let (
        Ok(ReadStatus::Complete { consumed: a, .. }),
        Ok(ReadStatus::Complete { consumed: b, .. }),
    ) = (&whole, &pieces)
    {
        assert!(b <= a);
    }
});
