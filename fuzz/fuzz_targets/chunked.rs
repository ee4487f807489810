//! The chunked decoder, both kinds (the upstream's plain one and the
//! request decoder with its framing budget), fed the input whole and in
//! two pieces: never a panic, never more consumed than given, decoded data
//! never more than the raw bytes or the body limit, and the same outcome
//! however the bytes are split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::http::chunked::{ChunkError, ChunkedDecoder, LineEnds};

const MAX_BODY: u64 = 4096;

fn decode(
    make: fn() -> ChunkedDecoder,
    input: &[u8],
    cut: usize,
) -> Result<(Vec<u8>, Option<usize>), ChunkError> {
    let mut d = make();
    let mut out = Vec::new();
    let mut start = 0;
    for end in [cut, input.len()] {
        let end = end.max(start);
        let r = d.decode(&input[start..end], &mut out)?;
        assert!(r.consumed <= end - start);
        start += r.consumed;
        assert!(out.len() <= start && out.len() as u64 <= MAX_BODY);
        if r.done {
            return Ok((out, Some(start)));
        }
    }
    Ok((out, None))
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let cut = (data[0] as usize % data.len()).min(input.len());
    let makers: [fn() -> ChunkedDecoder; 2] = [
        || ChunkedDecoder::new(LineEnds::CrLf, MAX_BODY),
        || ChunkedDecoder::for_requests(MAX_BODY),
    ];
    for make in makers {
        let whole = decode(make, input, input.len());
        let pieces = decode(make, input, cut);
        if let Ok((body, Some(end))) = &whole {
            assert_eq!(pieces.as_ref().ok(), Some(&(body.clone(), Some(*end))));
        }
    }
});
