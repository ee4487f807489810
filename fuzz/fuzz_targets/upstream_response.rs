//! The upstream response parser: the head (framing decisions), the chunked
//! body as the upstream client decodes it (CRLF only), and the SSE events
//! in it — any bytes, in two pieces: never a panic, never more decoded than
//! given, and an SSE event stream that splits the same wherever it is cut.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::backend::openai::{Flow, SseParser};
use sluice::http::chunked::{ChunkedDecoder, LineEnds};
use sluice::sse::StreamError;

fn events(pieces: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut p = SseParser::default();
    let mut out = Vec::new();
    for piece in pieces {
        let _ = p.feed(piece, |d| {
            out.push(d.to_vec());
            Ok::<_, StreamError>(Flow::Continue)
        });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let input = &data[1..];
    let cut = cut.min(input.len());
    let _ = sluice::upstream::head::parse(input);
    let mut d = ChunkedDecoder::new(LineEnds::CrLf, 1 << 20);
    let mut body = Vec::new();
    if let Ok(got) = d.decode(&input[..cut], &mut body) {
        assert!(got.consumed <= cut);
        if let Ok(more) = d.decode(&input[got.consumed..], &mut body) {
            assert!(more.consumed <= input.len() - got.consumed);
        }
    }
    assert!(body.len() <= input.len());
    assert_eq!(events(&[input]), events(&[&input[..cut], &input[cut..]]));
});
