//! The chunked transfer coding (RFC 9112 §7.1), decoded incrementally: one
//! decoder for both directions, the server's request bodies
//! ([`crate::http::request`]) and the upstream client's response bodies
//! (`upstream`).
//!
//! The decoder owns the framing decisions and their bounds: the length of a
//! chunk-size line (size plus extensions), the sum of declared chunk sizes,
//! the size of the trailer section, and whether a line must end with CRLF.
//! It keeps no buffer of its own: the caller keeps the bytes it has not
//! consumed and passes them again with whatever arrived since, so a line
//! that arrives one byte at a time is scanned once (not quadratically) and
//! decoded data is appended to the caller's `Vec` exactly once.
//!
//! Incomplete is not invalid: a prefix that can still become a valid body
//! consumes what it can and asks for more; an error is final.
//!
//! A decoder for an untrusted sender ([`ChunkedDecoder::for_requests`])
//! also bounds the framing itself, not only the data it carries: chunk
//! extensions add up to at most [`MAX_EXTENSION_BYTES`] per body, and the
//! framing may outweigh its data only by [`MAX_EXCESS_FRAMING`] (each chunk
//! is allowed 16 bytes of framing plus twice its data, as Go's `net/http`
//! does). Without it, 1-byte chunks with 1 KiB extensions make a client's
//! upload a thousand times larger than the body it is held to.

/// Longest accepted chunk-size line (size plus extensions), without its LF.
pub const MAX_CHUNK_LINE: usize = 1024;
/// Largest accepted trailer section, including its final empty line.
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;
/// Most chunk-extension bytes one body may carry (with a framing budget).
pub const MAX_EXTENSION_BYTES: usize = 16 * 1024;
/// Most framing bytes beyond each chunk's allowance (with a framing budget).
pub const MAX_EXCESS_FRAMING: u64 = 16 * 1024;
/// Framing bytes each chunk may take for free, besides twice its data.
const FRAMING_ALLOWANCE: u64 = 16;

/// Which line endings the framing lines (size lines, the end of chunk data,
/// trailers) may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineEnds {
    /// CRLF or a bare LF: what the server has always accepted from clients.
    CrLfOrLf,
    /// CRLF only, as the grammar says: the upstream client refuses anything
    /// else, so a response that two parsers could read differently is never
    /// relayed.
    CrLf,
}

/// Why a chunked body is refused. Small and `Copy`; the caller maps it to
/// its own error (a 400/413/431 for the server, a bad response upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// A chunk-size line longer than [`MAX_CHUNK_LINE`].
    LineTooLong,
    /// Not `1*HEXDIG [BWS ";" ext]`.
    InvalidSize,
    /// The size does not fit 64 bits.
    SizeOverflows,
    /// A control character in a chunk extension.
    InvalidExtension,
    /// Chunk data not followed by a line ending.
    DataNotTerminated,
    /// A bare LF where [`LineEnds::CrLf`] asks for CRLF.
    BareLf,
    /// A trailer line that is not a header field (no colon, a name that
    /// is not a token, whitespace before the colon, folding, a control
    /// character in the value).
    MalformedTrailer,
    /// The trailer section is longer than [`MAX_TRAILER_BYTES`].
    TrailersTooLarge,
    /// The declared chunk sizes add up past the decoder's limit.
    BodyTooLarge,
    /// Chunk extensions add up past [`MAX_EXTENSION_BYTES`].
    ExtensionsTooLarge,
    /// The framing outweighs its data by more than [`MAX_EXCESS_FRAMING`].
    FramingTooLarge,
}

impl ChunkError {
    /// A short lowercase phrase (the server sends it in its 400 message).
    pub fn reason(self) -> &'static str {
        match self {
            ChunkError::LineTooLong => "chunk-size line too long",
            ChunkError::InvalidSize => "invalid chunk size",
            ChunkError::SizeOverflows => "chunk size overflows",
            ChunkError::InvalidExtension => "invalid chunk extension",
            ChunkError::DataNotTerminated => "chunk data not followed by CRLF",
            ChunkError::BareLf => "chunked framing line not ended by CRLF",
            ChunkError::MalformedTrailer => "malformed trailer field",
            ChunkError::TrailersTooLarge => "chunked trailer section too large",
            ChunkError::BodyTooLarge => "chunked body too large",
            ChunkError::ExtensionsTooLarge => "chunk extensions too large",
            ChunkError::FramingTooLarge => "chunked framing outweighs its data",
        }
    }
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for ChunkError {}

/// What one [`ChunkedDecoder::decode`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of `input` used up; the next call starts after them.
    pub consumed: usize,
    /// The last chunk and the trailer section are complete: the body ends
    /// after `consumed` bytes (what follows belongs to the next message).
    pub done: bool,
}

/// Where the decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data, with this many bytes left.
    Data(u64),
    /// Expecting the line ending after chunk data.
    DataEnd,
    /// After the last chunk: skipping trailer fields up to an empty line.
    Trailers,
    /// The body is complete.
    Done,
}

/// Incremental chunked decoder.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    phase: Phase,
    line_ends: LineEnds,
    /// Bytes at the start of the next input known to hold no LF (the line
    /// in progress was scanned that far).
    scanned: usize,
    /// Trailer bytes consumed so far.
    trailer_bytes: usize,
    /// Sum of the chunk sizes declared so far.
    declared: u64,
    max_body: u64,
    /// Whether extensions and framing overhead are bounded.
    budget: bool,
    /// Extension bytes seen so far.
    ext_bytes: usize,
    /// Framing bytes beyond the chunks' allowances so far.
    excess: u64,
}

impl ChunkedDecoder {
    /// `max_body` bounds the sum of chunk sizes (checked when a size line
    /// declares it, before the data arrives).
    pub fn new(line_ends: LineEnds, max_body: u64) -> ChunkedDecoder {
        ChunkedDecoder {
            phase: Phase::Size,
            line_ends,
            scanned: 0,
            trailer_bytes: 0,
            declared: 0,
            max_body,
            budget: false,
            ext_bytes: 0,
            excess: 0,
        }
    }

    /// A decoder for a client's request body: CRLF only, and the framing
    /// bounded besides the data (see the module docs).
    pub fn for_requests(max_body: u64) -> ChunkedDecoder {
        ChunkedDecoder {
            budget: true,
            ..ChunkedDecoder::new(LineEnds::CrLf, max_body)
        }
    }

    /// Whether the body (and its trailers) ended.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Decodes what `input` allows, appending chunk data to `out`.
    ///
    /// `input` must start right after the bytes consumed by the previous
    /// call (the caller keeps unconsumed bytes and appends new ones). Once
    /// done, every further call consumes nothing and says done.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Decoded, ChunkError> {
        // How far the line in progress at `at` was already scanned: only the
        // first line of this call can have been seen by an earlier call.
        let mut skip = std::mem::take(&mut self.scanned);
        let mut at = 0;
        let partial = |at: usize| {
            Ok(Decoded {
                consumed: at,
                done: false,
            })
        };
        loop {
            match self.phase {
                Phase::Done => {
                    return Ok(Decoded {
                        consumed: at,
                        done: true,
                    })
                }
                Phase::Size => {
                    let Some(lf) = find_lf(input, at + skip) else {
                        if input.len() - at > MAX_CHUNK_LINE {
                            return Err(ChunkError::LineTooLong);
                        }
                        self.scanned = input.len() - at;
                        return partial(at);
                    };
                    let line = &input[at..lf];
                    if line.len() > MAX_CHUNK_LINE {
                        return Err(ChunkError::LineTooLong);
                    }
                    let (size, ext_len) = parse_chunk_size(self.strip_cr(line)?)?;
                    if self.budget {
                        self.charge_framing(line.len() + 1, size, ext_len)?;
                    }
                    at = lf + 1;
                    skip = 0;
                    if size == 0 {
                        self.phase = Phase::Trailers;
                    } else {
                        self.declared = self
                            .declared
                            .checked_add(size)
                            .filter(|&total| total <= self.max_body)
                            .ok_or(ChunkError::BodyTooLarge)?;
                        self.phase = Phase::Data(size);
                    }
                }
                Phase::Data(left) => {
                    let available = &input[at..];
                    let take = usize::try_from(left)
                        .map_or(available.len(), |left| left.min(available.len()));
                    out.extend_from_slice(&available[..take]);
                    at += take;
                    let left = left - take as u64;
                    if left > 0 {
                        self.phase = Phase::Data(left);
                        return partial(at);
                    }
                    self.phase = Phase::DataEnd;
                }
                Phase::DataEnd => match (input.get(at), input.get(at + 1)) {
                    (None, _) | (Some(b'\r'), None) => return partial(at),
                    (Some(b'\n'), _) if self.line_ends == LineEnds::CrLfOrLf => {
                        at += 1;
                        self.phase = Phase::Size;
                    }
                    (Some(b'\r'), Some(b'\n')) => {
                        at += 2;
                        self.phase = Phase::Size;
                    }
                    _ => return Err(ChunkError::DataNotTerminated),
                },
                Phase::Trailers => {
                    let Some(lf) = find_lf(input, at + skip) else {
                        if self.trailer_bytes + (input.len() - at) > MAX_TRAILER_BYTES {
                            return Err(ChunkError::TrailersTooLarge);
                        }
                        self.scanned = input.len() - at;
                        return partial(at);
                    };
                    let line_len = lf + 1 - at;
                    if self.trailer_bytes + line_len > MAX_TRAILER_BYTES {
                        return Err(ChunkError::TrailersTooLarge);
                    }
                    let line = self.strip_cr(&input[at..lf])?;
                    self.trailer_bytes += line_len;
                    at = lf + 1;
                    skip = 0;
                    if line.is_empty() {
                        self.phase = Phase::Done;
                        continue;
                    }
                    // Trailer fields are discarded, but must be fields: a
                    // line another parser would read differently is refused.
                    if !is_field_line(line) {
                        return Err(ChunkError::MalformedTrailer);
                    }
                }
            }
        }
    }

    /// Counts one chunk's framing: its size line (`line_len` bytes with
    /// the LF) and the line ending after its data, against what its data
    /// allows; and its extension bytes.
    fn charge_framing(
        &mut self,
        line_len: usize,
        size: u64,
        ext_len: usize,
    ) -> Result<(), ChunkError> {
        self.ext_bytes += ext_len;
        if self.ext_bytes > MAX_EXTENSION_BYTES {
            return Err(ChunkError::ExtensionsTooLarge);
        }
        let data_end = if size == 0 { 0 } else { 2 };
        self.excess += line_len as u64 + data_end;
        self.excess = self
            .excess
            .saturating_sub(FRAMING_ALLOWANCE.saturating_add(size.saturating_mul(2)));
        if self.excess > MAX_EXCESS_FRAMING {
            return Err(ChunkError::FramingTooLarge);
        }
        Ok(())
    }

    /// The line without its CR, if the line endings allow how it ends.
    fn strip_cr<'a>(&self, line: &'a [u8]) -> Result<&'a [u8], ChunkError> {
        match (line.strip_suffix(b"\r"), self.line_ends) {
            (Some(line), _) => Ok(line),
            (None, LineEnds::CrLfOrLf) => Ok(line),
            (None, LineEnds::CrLf) => Err(ChunkError::BareLf),
        }
    }
}

fn find_lf(input: &[u8], from: usize) -> Option<usize> {
    input
        .get(from..)?
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| from + i)
}

/// Whether `line` is a header field line: a token, a colon right after it,
/// and a value of visible characters, spaces, tabs and obs-text.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && name.iter().all(|&b| is_tchar(b))
        && value
            .iter()
            .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A `tchar` of RFC 9110: the characters of a token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses `1*HEXDIG [ BWS ";" chunk-ext ]` (line ending already removed):
/// the size, and the length of the extensions.
fn parse_chunk_size(line: &[u8]) -> Result<(u64, usize), ChunkError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ChunkError::InvalidSize);
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let digit = u64::from(hex_value(b).unwrap_or(0));
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(digit))
            .ok_or(ChunkError::SizeOverflows)?;
    }
    let rest = &line[digits..];
    let ext_start = rest.iter().position(|&b| b != b' ' && b != b'\t');
    match ext_start {
        None if rest.is_empty() => Ok((size, 0)),
        Some(i) if rest[i] == b';' => {
            let ext = &rest[i..];
            if ext.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                return Err(ChunkError::InvalidExtension);
            }
            Ok((size, ext.len()))
        }
        _ => Err(ChunkError::InvalidSize),
    }
}

/// The value of one hex digit.
pub(crate) fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` given in the pieces `cuts` splits it into, the way a
    /// caller does: unconsumed bytes are kept and passed again.
    fn decode_split(
        input: &[u8],
        cuts: &[usize],
        ends: LineEnds,
    ) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::new(ends, u64::MAX);
        let mut out = Vec::new();
        let mut start = 0; // first unconsumed byte
        for &end in cuts.iter().chain(std::iter::once(&input.len())) {
            let r = d.decode(&input[start..end], &mut out)?;
            start += r.consumed;
            if r.done {
                assert!(d.is_done());
                return Ok((out, start));
            }
        }
        Ok((out, usize::MAX))
    }

    fn whole(input: &[u8], ends: LineEnds) -> Result<(Vec<u8>, usize), ChunkError> {
        decode_split(input, &[], ends)
    }

    /// Every way of cutting `input` in two, and byte by byte, gives the
    /// same answer as the whole. (Inputs at the size limits are cut near
    /// both ends and every 61st byte: every cut would be quadratic.)
    fn assert_split_invariant(input: &[u8], ends: LineEnds) {
        let expected = whole(input, ends);
        let n = input.len();
        let cuts = (0..=n).filter(|&c| n <= 512 || c < 64 || c + 64 > n || c % 61 == 0);
        for cut in cuts {
            assert_eq!(
                decode_split(input, &[cut], ends),
                expected,
                "{:?} cut at {cut}",
                String::from_utf8_lossy(input)
            );
        }
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(decode_split(input, &every, ends), expected, "bytewise");
    }

    #[test]
    fn valid_bodies_in_both_modes() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"0\r\n\r\n", b""),
            (b"000\r\n\r\n", b""),
            (b"3;name=value\r\nabc\r\n0;last\r\n\r\n", b"abc"),
            (b"3 ; name=\"quoted\"\r\nabc\r\n0\r\n\r\n", b"abc"),
            (
                b"0003\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n",
                b"abc0123456789",
            ),
            (
                b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n",
                b"abc",
            ),
            (b"1\r\n\n\r\n0\r\n\r\n", b"\n"),
            (b"2\r\n\r\n\r\n0\r\n\r\n", b"\r\n"),
            (b"00000000000000000001\r\nz\r\n0\r\n\r\n", b"z"),
        ];
        for ends in [LineEnds::CrLf, LineEnds::CrLfOrLf] {
            for &(body, expected) in cases {
                let mut input = body.to_vec();
                input.extend_from_slice(b"NEXT");
                let (out, end) = whole(&input, ends).unwrap();
                assert_eq!((out.as_slice(), &input[end..]), (expected, &b"NEXT"[..]));
                assert_split_invariant(&input, ends);
            }
        }
    }

    #[test]
    fn bare_lf_only_where_allowed() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"3\nabc\n0\n\n", b"abc"),
            (b"3\r\nabc\n0\r\n\r\n", b"abc"),
            (b"3\r\nabc\r\n0\r\nX: 1\n\r\n", b"abc"),
            (b"3\r\nabc\r\n0\r\n\n", b"abc"),
        ];
        for &(input, expected) in cases {
            let (out, end) = whole(input, LineEnds::CrLfOrLf).unwrap();
            assert_eq!((out.as_slice(), end), (expected, input.len()));
            let strict = whole(input, LineEnds::CrLf).unwrap_err();
            assert!(
                matches!(strict, ChunkError::BareLf | ChunkError::DataNotTerminated),
                "{:?}: {strict:?}",
                String::from_utf8_lossy(input)
            );
            assert_split_invariant(input, LineEnds::CrLf);
            assert_split_invariant(input, LineEnds::CrLfOrLf);
        }
    }

    #[test]
    fn invalid_framing() {
        let long_ext = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE));
        let unfinished = "0".repeat(MAX_CHUNK_LINE + 1);
        let big_trailer = format!("0\r\nX-T: {}\r\n\r\n", "t".repeat(MAX_TRAILER_BYTES));
        let unfinished_trailer = format!("0\r\nX-T: {}", "t".repeat(MAX_TRAILER_BYTES));
        let cases: &[(&[u8], ChunkError)] = &[
            (b"xyz\r\n", ChunkError::InvalidSize),
            (b"\r\n", ChunkError::InvalidSize),
            (b"-1\r\n", ChunkError::InvalidSize),
            (b"0x5\r\n", ChunkError::InvalidSize),
            (b"5 \r\n", ChunkError::InvalidSize),
            (b"5;a\rb\r\n", ChunkError::InvalidExtension),
            (b"5;a\x7f\r\n", ChunkError::InvalidExtension),
            (b"10000000000000000\r\n", ChunkError::SizeOverflows),
            (b"3\r\nabcX\r\n0\r\n\r\n", ChunkError::DataNotTerminated),
            (b"3\r\nabc\rX0\r\n\r\n", ChunkError::DataNotTerminated),
            (b"3\r\nabcd\r\n0\r\n\r\n", ChunkError::DataNotTerminated),
            (b"0\r\nnot a trailer\r\n\r\n", ChunkError::MalformedTrailer),
            (b"0\r\n folded: x\r\n\r\n", ChunkError::MalformedTrailer),
            (long_ext.as_bytes(), ChunkError::LineTooLong),
            (unfinished.as_bytes(), ChunkError::LineTooLong),
            (big_trailer.as_bytes(), ChunkError::TrailersTooLarge),
            (unfinished_trailer.as_bytes(), ChunkError::TrailersTooLarge),
        ];
        for ends in [LineEnds::CrLf, LineEnds::CrLfOrLf] {
            for &(input, expected) in cases {
                assert_eq!(
                    whole(input, ends),
                    Err(expected),
                    "{:?}",
                    String::from_utf8_lossy(input)
                );
                assert_split_invariant(input, ends);
            }
        }
    }

    #[test]
    fn an_extension_up_to_the_line_limit_is_fine() {
        let ok = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE - 3));
        assert_eq!(
            whole(ok.as_bytes(), LineEnds::CrLf).unwrap(),
            (b"a".to_vec(), ok.len())
        );
    }

    #[test]
    fn declared_sizes_are_bounded_before_the_data_arrives() {
        for (input, max) in [(&b"9\r\n"[..], 8), (b"5\r\naaaaa\r\n4\r\n", 8)] {
            let mut d = ChunkedDecoder::new(LineEnds::CrLf, max);
            assert_eq!(
                d.decode(input, &mut Vec::new()),
                Err(ChunkError::BodyTooLarge)
            );
        }
        let mut d = ChunkedDecoder::new(LineEnds::CrLf, 8);
        let input = b"5\r\naaaaa\r\n3\r\nbbb\r\n0\r\n\r\n";
        let mut out = Vec::new();
        assert_eq!(
            d.decode(input, &mut out),
            Ok(Decoded {
                consumed: input.len(),
                done: true
            })
        );
        assert_eq!(out, b"aaaaabbb");
    }

    #[test]
    fn a_long_line_byte_by_byte_is_scanned_once() {
        // The decoder remembers how far the pending line was scanned.
        let mut d = ChunkedDecoder::new(LineEnds::CrLf, u64::MAX);
        let line = format!("1;{}\r\n", "x".repeat(MAX_CHUNK_LINE - 3));
        for end in 1..line.len() {
            let r = d.decode(&line.as_bytes()[..end], &mut Vec::new()).unwrap();
            assert_eq!(r.consumed, 0);
            assert_eq!(d.scanned, end);
        }
        let r = d.decode(line.as_bytes(), &mut Vec::new()).unwrap();
        assert_eq!((r.consumed, d.scanned), (line.len(), 0));
    }

    #[test]
    fn trailer_fields_are_checked_like_header_fields() {
        let good: &[&[u8]] = &[
            b"X-A: 1",
            b"x-a:",
            b"X-A:\tv w",
            b"!#$%&'*+-.^_`|~09az: v",
            b"X-A: caf\xc3\xa9",
        ];
        let bad: &[&[u8]] = &[
            b"not a trailer",
            b" folded: x",
            b"\tfolded: x",
            b"X-A : 1",
            b": no name",
            b"X(A): 1",
            b"X-A: a\x00b",
            b"X-A: a\rb",
            b"X-A: a\x7fb",
            b"X-A: a\x1bb",
        ];
        for (lines, ok) in [(good, true), (bad, false)] {
            for &line in lines {
                let mut input = b"0\r\n".to_vec();
                input.extend_from_slice(line);
                input.extend_from_slice(b"\r\n\r\n");
                for ends in [LineEnds::CrLf, LineEnds::CrLfOrLf] {
                    let r = whole(&input, ends);
                    let what = String::from_utf8_lossy(line);
                    match ok {
                        true => assert_eq!(r, Ok((Vec::new(), input.len())), "{what:?}"),
                        false => assert_eq!(r, Err(ChunkError::MalformedTrailer), "{what:?}"),
                    }
                }
            }
        }
    }

    /// Decodes `input` with a request decoder, in one piece and byte by byte.
    fn requests(input: &[u8], max_body: u64) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::for_requests(max_body);
        let mut out = Vec::new();
        let whole = d.decode(input, &mut out).map(|r| (out, r.consumed));
        let mut d = ChunkedDecoder::for_requests(max_body);
        let (mut out, mut start) = (Vec::new(), 0);
        let mut bytewise = Ok((Vec::new(), 0));
        for end in 1..=input.len() {
            match d.decode(&input[start..end], &mut out) {
                Ok(r) => {
                    start += r.consumed;
                    if r.done {
                        bytewise = Ok((std::mem::take(&mut out), start));
                        break;
                    }
                }
                Err(e) => {
                    bytewise = Err(e);
                    break;
                }
            }
        }
        if whole.as_ref().is_ok_and(|(_, n)| *n == input.len()) || whole.is_err() {
            assert_eq!(whole, bytewise, "{:?}", String::from_utf8_lossy(input));
        }
        whole
    }

    #[test]
    fn a_request_decoder_bounds_the_framing_not_only_the_data() {
        let ext = format!(";{}", "e".repeat(1000));
        // 1-byte chunks with 1 KiB extensions: refused within a few dozen.
        let mut abusive = String::new();
        for _ in 0..100 {
            abusive.push_str(&format!("1{ext}\r\nx\r\n"));
        }
        abusive.push_str("0\r\n\r\n");
        assert_eq!(
            requests(abusive.as_bytes(), 1 << 20),
            Err(ChunkError::ExtensionsTooLarge)
        );
        // 1-byte chunks with 1 KiB size lines (leading zeros, no extension).
        let zeros = "0".repeat(1000);
        let mut padded = format!("{zeros}1\r\nx\r\n").repeat(100);
        padded.push_str("0\r\n\r\n");
        assert_eq!(
            requests(padded.as_bytes(), 1 << 20),
            Err(ChunkError::FramingTooLarge)
        );
        // The same extensions on chunks that carry data: the extension
        // total is what stops them.
        let mut big = String::new();
        for _ in 0..20 {
            big.push_str(&format!("400{ext}\r\n{}\r\n", "d".repeat(1024)));
        }
        big.push_str("0\r\n\r\n");
        assert_eq!(
            requests(big.as_bytes(), 1 << 20),
            Err(ChunkError::ExtensionsTooLarge)
        );
        // A plain decoder (the upstream's) takes them all.
        for input in [&abusive, &padded, &big] {
            assert!(whole(input.as_bytes(), LineEnds::CrLf).is_ok());
        }
        // 1-byte chunks without extensions are framing-heavy but fair.
        let mut small = "1\r\nx\r\n".repeat(5000);
        small.push_str("0\r\nX-Sum: 1\r\n\r\n");
        let (body, used) = requests(small.as_bytes(), 1 << 20).unwrap();
        assert_eq!((body.len(), used), (5000, small.len()));
        // A request decoder wants CRLF everywhere.
        assert_eq!(requests(b"1\nx\r\n0\r\n\r\n", 8), Err(ChunkError::BareLf));
        assert_eq!(
            requests(b"1\r\nx\n0\r\n\r\n", 8),
            Err(ChunkError::DataNotTerminated)
        );
        assert_eq!(requests(b"0\r\n\n", 8), Err(ChunkError::BareLf));
    }

    #[test]
    fn after_the_end_nothing_more_is_consumed() {
        let mut d = ChunkedDecoder::new(LineEnds::CrLf, u64::MAX);
        let r = d.decode(b"0\r\n\r\nGET", &mut Vec::new()).unwrap();
        assert_eq!((r.consumed, r.done), (5, true));
        let r = d.decode(b"GET", &mut Vec::new()).unwrap();
        assert_eq!((r.consumed, r.done), (0, true));
    }
}
