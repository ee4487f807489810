//! The HTTP request reader, fed the input in two pieces split where the
//! data says, as the connection feeds it (each call from the first byte
//! not taken): it must never panic, never take more than it was given,
//! never keep more than a framing line of a body it is reading, and give
//! the same answer whether the bytes came at once or in pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::http::{HttpError, Limits, ReadStatus, Request, RequestReader};

const LIMITS: Limits = Limits {
    max_head_bytes: 4096,
    max_body_bytes: 8192,
};

/// Feeds `input` up to each cut in turn; the outcome and where it ended.
fn feed(input: &[u8], cuts: &[usize]) -> Option<Result<(Request, usize), HttpError>> {
    let mut r = RequestReader::new();
    let mut at = 0;
    for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        loop {
            match r.poll(&input[at..end.max(at)], &LIMITS) {
                Ok(ReadStatus::Head { consumed, .. }) => {
                    assert!(at + consumed <= end.max(at));
                    at += consumed;
                }
                Ok(ReadStatus::Partial { consumed }) => {
                    assert!(at + consumed <= end.max(at));
                    at += consumed;
                    // A body in progress leaves at most a framing line
                    // (or a trailer section) unread.
                    if r.body_size().is_some() {
                        assert!(end.max(at) - at <= 9 * 1024, "kept {}", end - at);
                    }
                    break;
                }
                Ok(ReadStatus::Complete { request, consumed }) => {
                    assert!(request.body.len() <= LIMITS.max_body_bytes);
                    return Some(Ok((request, at + consumed)));
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let split = (data[0] as usize % data.len()).min(input.len());
    let whole = feed(input, &[]);
    let pieces = feed(input, &[split]);
    if let Some(Ok((_, consumed))) = &whole {
        assert!(*consumed <= input.len());
        // A request complete in the whole input is complete in pieces
        // too, with the same length.
        match &pieces {
            Some(Ok((_, b))) => assert_eq!(b, consumed),
            other => panic!("whole completed, pieces gave {other:?}"),
        }
    }
});
