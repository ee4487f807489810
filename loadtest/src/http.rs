//! The client side of HTTP/1.1 framing, free of sockets and clocks: the
//! request bytes we send, the response head (`httparse`), and an
//! incremental body decoder for the three framings a streaming server uses
//! (chunked, `Content-Length`, close-delimited). Bytes go in, payload bytes
//! come out; a split anywhere (even inside `\r\n`) is fine.

use std::fmt;

/// Largest response head we accept; a real server's is well under 4 KiB.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (with extensions) we accept.
const MAX_SIZE_LINE: usize = 1024;

/// Why a response could not be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// The head is not valid HTTP/1.x.
    BadHead,
    /// The head is larger than 64 KiB.
    HeadTooLarge,
    /// A chunk-size line is malformed or too long.
    BadChunk,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpError::BadHead => "malformed response head",
            HttpError::HeadTooLarge => "response head larger than 64 KiB",
            HttpError::BadChunk => "malformed chunked body",
        })
    }
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    /// The body ends when the server closes the connection.
    Close,
}

/// What we keep of a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
    /// `X-Request-Id`, when the server sent one.
    pub request_id: Option<String>,
}

/// Parses a response head from the start of `buf`. `Ok(None)`: not complete
/// yet. `Ok(Some((head, n)))`: the head took `n` bytes. 1xx answers are
/// skipped (their length is included in `n`).
pub fn parse_head(buf: &[u8], head_request: bool) -> Result<Option<(Head, usize)>, HttpError> {
    let mut offset = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(&buf[offset..]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() - offset > MAX_HEAD {
                    Err(HttpError::HeadTooLarge)
                } else {
                    Ok(None)
                }
            }
            Err(_) => return Err(HttpError::BadHead),
        };
        let status = resp.code.ok_or(HttpError::BadHead)?;
        if (100..200).contains(&status) && status != 101 {
            offset += n;
            continue;
        }
        let http10 = resp.version == Some(0);
        let mut chunked = false;
        let mut length = None;
        let mut conn_close = http10;
        let mut request_id = None;
        for h in resp.headers.iter() {
            let v = std::str::from_utf8(h.value).unwrap_or("").trim();
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            } else if h.name.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse::<u64>().map_err(|_| HttpError::BadHead)?);
            } else if h.name.eq_ignore_ascii_case("connection") {
                for tok in v.split(',') {
                    let tok = tok.trim();
                    if tok.eq_ignore_ascii_case("close") {
                        conn_close = true;
                    } else if tok.eq_ignore_ascii_case("keep-alive") && http10 {
                        conn_close = false;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("x-request-id") {
                request_id = Some(v.to_string());
            }
        }
        let no_body = head_request || status == 204 || status == 304;
        let framing = if no_body {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked
        } else if let Some(len) = length {
            Framing::Length(len)
        } else {
            Framing::Close
        };
        let keep_alive = !conn_close && framing != Framing::Close;
        return Ok(Some((
            Head {
                status,
                framing,
                keep_alive,
                request_id,
            },
            offset + n,
        )));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits of a chunk size.
    Size,
    /// Skipping a chunk extension up to the line end.
    Ext,
    /// Saw `\r` after the size line, want `\n`.
    SizeLf,
    Data,
    /// After chunk data: want `\r\n`.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    Done,
}

/// Incremental body decoder for one response.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    framing: Framing,
    state: Chunk,
    /// Bytes left in the current chunk, or of a `Content-Length` body.
    remaining: u64,
    size_line: usize,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        BodyDecoder {
            framing,
            state: Chunk::Size,
            remaining,
            size_line: 0,
        }
    }

    /// The body has ended by its own framing (never for close-delimited).
    pub fn is_done(&self) -> bool {
        match self.framing {
            Framing::Chunked => self.state == Chunk::Done,
            Framing::Length(_) => self.remaining == 0,
            Framing::Close => false,
        }
    }

    /// Decodes as much of `input` as belongs to this body, appending the
    /// payload to `out`. Returns how many bytes of `input` were consumed
    /// (less than `input.len()` only when the body ended).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        match self.framing {
            Framing::Close => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
            Framing::Length(_) => {
                let n = (self.remaining.min(input.len() as u64)) as usize;
                out.extend_from_slice(&input[..n]);
                self.remaining -= n as u64;
                Ok(n)
            }
            Framing::Chunked => self.decode_chunked(input, out),
        }
    }

    fn decode_chunked(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                Chunk::Done => return Ok(i),
                Chunk::Data => {
                    let n = (self.remaining.min((input.len() - i) as u64)) as usize;
                    out.extend_from_slice(&input[i..i + n]);
                    self.remaining -= n as u64;
                    i += n;
                    if self.remaining == 0 {
                        self.state = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::Size => {
                    self.size_line += 1;
                    if self.size_line > MAX_SIZE_LINE {
                        return Err(HttpError::BadChunk);
                    }
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let d = (b as char).to_digit(16).unwrap() as u64;
                            self.remaining = self
                                .remaining
                                .checked_mul(16)
                                .and_then(|r| r.checked_add(d))
                                .ok_or(HttpError::BadChunk)?;
                        }
                        b';' | b' ' | b'\t' if self.size_line > 1 => self.state = Chunk::Ext,
                        b'\r' if self.size_line > 1 => self.state = Chunk::SizeLf,
                        b'\n' if self.size_line > 1 => self.end_size_line(),
                        _ => return Err(HttpError::BadChunk),
                    }
                }
                Chunk::Ext => {
                    self.size_line += 1;
                    if self.size_line > MAX_SIZE_LINE {
                        return Err(HttpError::BadChunk);
                    }
                    if b == b'\n' {
                        self.end_size_line();
                    }
                }
                Chunk::SizeLf => {
                    if b != b'\n' {
                        return Err(HttpError::BadChunk);
                    }
                    self.end_size_line();
                }
                Chunk::DataCr => match b {
                    b'\r' => self.state = Chunk::DataLf,
                    b'\n' => self.start_size(),
                    _ => return Err(HttpError::BadChunk),
                },
                Chunk::DataLf => {
                    if b != b'\n' {
                        return Err(HttpError::BadChunk);
                    }
                    self.start_size();
                }
                Chunk::TrailerStart => match b {
                    b'\r' => self.state = Chunk::TrailerLf,
                    b'\n' => self.state = Chunk::Done,
                    _ => self.state = Chunk::TrailerLine,
                },
                Chunk::TrailerLine => {
                    if b == b'\n' {
                        self.state = Chunk::TrailerStart;
                    }
                }
                Chunk::TrailerLf => {
                    if b != b'\n' {
                        return Err(HttpError::BadChunk);
                    }
                    self.state = Chunk::Done;
                }
            }
            i += 1;
        }
        Ok(i)
    }

    fn start_size(&mut self) {
        self.state = Chunk::Size;
        self.remaining = 0;
        self.size_line = 0;
    }

    fn end_size_line(&mut self) {
        self.state = if self.remaining == 0 {
            Chunk::TrailerStart
        } else {
            Chunk::Data
        };
    }
}

/// A request to send, as bytes.
pub fn build_request(
    method: &str,
    path: &str,
    host: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Vec<u8> {
    let mut r = Vec::with_capacity(256 + body.len());
    r.extend_from_slice(format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n").as_bytes());
    for (k, v) in headers {
        r.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if method != "GET" || !body.is_empty() {
        r.extend_from_slice(b"Content-Type: application/json\r\n");
        r.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_split(framing: Framing, wire: &[u8], split: usize) -> (Vec<u8>, bool, usize) {
        let mut d = BodyDecoder::new(framing);
        let mut out = Vec::new();
        let a = d.decode(&wire[..split], &mut out).unwrap();
        let mut consumed = a;
        if a == split {
            consumed += d.decode(&wire[split..], &mut out).unwrap();
        }
        (out, d.is_done(), consumed)
    }

    #[test]
    fn chunked_decodes_at_every_split() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
            (
                b"A;ext=1\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n",
                b"0123456789",
            ),
            (b"3\nabc\n0\n\n", b"abc"),
            (b"0\r\n\r\n", b""),
        ];
        for (wire, want) in cases {
            // trailing bytes belong to the next response and are not consumed
            let mut with_next = wire.to_vec();
            with_next.extend_from_slice(b"HTTP/1.1 200 OK");
            for split in 0..=with_next.len() {
                let (out, done, consumed) = decode_split(Framing::Chunked, &with_next, split);
                assert_eq!(
                    &out,
                    want,
                    "split {split} of {:?}",
                    String::from_utf8_lossy(wire)
                );
                assert!(done);
                assert_eq!(consumed, wire.len(), "split {split}");
            }
        }
    }

    #[test]
    fn chunked_rejects_garbage() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5\r\nhelloX",
            b"fffffffffffffffffffff\r\n",
        ] {
            let mut d = BodyDecoder::new(Framing::Chunked);
            assert_eq!(
                d.decode(wire, &mut Vec::new()),
                Err(HttpError::BadChunk),
                "{wire:?}"
            );
        }
    }

    #[test]
    fn length_and_close_framing() {
        let mut d = BodyDecoder::new(Framing::Length(3));
        let mut out = Vec::new();
        assert_eq!(d.decode(b"ab", &mut out), Ok(2));
        assert!(!d.is_done());
        assert_eq!(d.decode(b"cdef", &mut out), Ok(1));
        assert!(d.is_done());
        assert_eq!(out, b"abc");
        let mut d = BodyDecoder::new(Framing::Close);
        assert_eq!(d.decode(b"xyz", &mut out), Ok(3));
        assert!(!d.is_done());
    }

    #[test]
    fn heads() {
        let h = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-Id: r-1\r\n\r\nrest";
        for cut in 0..h.len() - 4 {
            assert_eq!(parse_head(&h[..cut], false), Ok(None));
        }
        let (head, n) = parse_head(h, false).unwrap().unwrap();
        assert_eq!(n, h.len() - 4);
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.keep_alive);
        assert_eq!(head.request_id.as_deref(), Some("r-1"));

        let h = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n";
        let (head, _) = parse_head(h, false).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Close);
        assert!(!head.keep_alive);

        let h = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
        let (head, n) = parse_head(h, false).unwrap().unwrap();
        assert_eq!(
            (head.status, head.framing, head.keep_alive),
            (503, Framing::Length(2), false)
        );
        assert_eq!(&h[n..], b"{}");

        assert_eq!(
            parse_head(b"HTTP/1.1 abc\r\n\r\n", false),
            Err(HttpError::BadHead)
        );
        let (head, _) = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Length(0));
    }

    #[test]
    fn request_bytes() {
        let r = build_request("POST", "/x", "h:1", &[("A".into(), "b".into())], b"{}");
        assert_eq!(
            r,
            b"POST /x HTTP/1.1\r\nHost: h:1\r\nA: b\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
    }
}
