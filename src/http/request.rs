//! Incremental, bounded reading of HTTP/1.1 requests.
//!
//! This module owns everything between "some bytes arrived on a connection"
//! and "here is one complete [`Request`]": the request line and header fields
//! (tokenised by `httparse`), body framing (`Content-Length` or
//! `Transfer-Encoding: chunked`, decoded by [`super::chunked`] including
//! extensions and trailers), `Expect: 100-continue`, and the keep-alive
//! decision. Responses are someone else's business.
//!
//! Incomplete is not invalid: [`RequestReader::poll`] answers
//! [`ReadStatus::Partial`] for every prefix that can still become a valid
//! request, and an [`HttpError`] only for bytes that can never become one or
//! that break a limit. The reader remembers its progress, so a head is parsed
//! once it is complete and a body is decoded exactly once, however finely the
//! bytes are split. Once the head is parsed the reader takes body bytes as
//! they arrive (the caller drops them), so what a connection keeps of a body
//! in progress is the decoded body and at most one unfinished framing line,
//! never the raw upload. Between head and body the reader stops
//! ([`ReadStatus::Head`]) so the caller can decide whether to read it now,
//! unless a `Content-Length` body came whole with its head (the usual small
//! POST): that request is complete at once.
//!
//! Every limit a client controls is enforced here, as early as it is known:
//! the head size and header count ([`HttpError::HeadTooLarge`], checked on
//! partial heads too), the declared `Content-Length` and every declared chunk
//! size ([`HttpError::BodyTooLarge`], before the bytes arrive), the length of a
//! chunk-size line and the size of the trailer section. Nothing is allocated
//! from a client-declared size beyond [`Limits::max_body_bytes`].
//!
//! Request-smuggling stances: a request carrying both `Content-Length` and
//! `Transfer-Encoding` is rejected; `Content-Length` must be plain decimal
//! digits and repeated fields must agree; `Transfer-Encoding` must be exactly
//! one `chunked` (and only on HTTP/1.1); chunk data must be followed by a line
//! ending, and every framing line (size lines, the end of chunk data,
//! trailers) must end with CRLF; trailer fields must be header fields;
//! whitespace before a header colon and obsolete line folding are
//! rejected by `httparse`. An HTTP/1.1 request must carry exactly one
//! `Host`; an `Expect` other than `100-continue` is refused (417). An
//! absolute-form target (`http://host/path`) is read as its path. Every
//! error is meant to close the connection (the
//! caller does that), so the bytes after a rejected request are never read as
//! another request.

use std::fmt;

use super::chunked::{hex_value, ChunkError, ChunkedDecoder, MAX_TRAILER_BYTES};

/// Header fields `httparse` is given room for; one more is "too large".
const MAX_HEADERS: usize = 64;

/// Per-request limits for what a client may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus header fields plus the empty line ending them.
    pub max_head_bytes: usize,
    /// Decoded body size (the `Content-Length`, or the sum of chunk sizes).
    pub max_body_bytes: usize,
}

/// The request method; anything unlisted is [`Method::Other`] (see
/// [`Request::method_str`] for the original text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Other,
}

impl Method {
    /// Methods are case-sensitive tokens: `get` is not `GET`.
    fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }
}

/// The protocol versions this server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// The most text a [`Request`] holds (its offsets are `u32`).
const MAX_HEAD_TEXT: usize = u32::MAX as usize;

/// One complete request, owned, with its body de-framed.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub version: Version,
    /// HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// The head's text in one allocation: the method as sent, the target,
    /// then each header's lowercased name and its value (lossy UTF-8).
    text: String,
    /// Where the method ends and the path, the query (after `?`, if any)
    /// and the target end in `text`.
    method_end: u32,
    path_end: u32,
    target_end: u32,
    /// Per header, in order: where its name starts, where its value
    /// starts (the name's end) and where the value ends, in `text`.
    fields: Vec<[u32; 3]>,
    /// The body, de-chunked if it was chunked; empty without body framing.
    pub body: Vec<u8>,
}

impl Request {
    /// A request from its parts (`headers`: names as given, lowercased
    /// here), as the reader builds it.
    pub fn new<'a>(
        method_str: &str,
        target: &str,
        version: Version,
        keep_alive: bool,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8]), IntoIter: Clone>,
        body: Vec<u8>,
    ) -> Request {
        let offset = |n: usize| {
            assert!(n <= MAX_HEAD_TEXT, "a request head of {n} bytes");
            n as u32
        };
        // Sized once (a head's text grown piece by piece reallocated
        // several times; invalid UTF-8 may still grow it).
        let headers = headers.into_iter();
        let (count, bytes) = headers
            .clone()
            .fold((0, 0), |(c, b), (n, v)| (c + 1, b + n.len() + v.len()));
        let mut text = String::with_capacity(method_str.len() + target.len() + bytes);
        let mut fields = Vec::with_capacity(count);
        text.push_str(method_str);
        let method_end = text.len() as u32;
        text.push_str(target);
        let target_end = text.len() as u32;
        let path_end = target
            .find('?')
            .map_or(target_end, |q| method_end + q as u32);
        for (name, value) in headers {
            let start = offset(text.len());
            text.push_str(name);
            text[start as usize..].make_ascii_lowercase();
            let at = offset(text.len());
            match std::str::from_utf8(value) {
                Ok(v) => text.push_str(v),
                Err(_) => text.push_str(&String::from_utf8_lossy(value)),
            }
            fields.push([start, at, offset(text.len())]);
        }
        Request {
            method: Method::from_token(method_str),
            version,
            keep_alive,
            text,
            method_end,
            path_end,
            target_end,
            fields,
            body,
        }
    }

    /// The method as sent, for logs and 405 messages.
    pub fn method_str(&self) -> &str {
        &self.text[..self.method_end as usize]
    }

    /// The request target up to the first `?`, not percent-decoded.
    pub fn path(&self) -> &str {
        &self.text[self.method_end as usize..self.path_end as usize]
    }

    /// The raw request target after the first `?`, not percent-decoded.
    pub fn query(&self) -> Option<&str> {
        (self.path_end < self.target_end)
            .then(|| &self.text[self.path_end as usize + 1..self.target_end as usize])
    }

    /// Every header (lowercased name, value), in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.fields.iter().map(|&[n, v, e]| {
            (
                &self.text[n as usize..v as usize],
                &self.text[v as usize..e as usize],
            )
        })
    }

    /// First header with that name (case-insensitive). Out of line: a
    /// request looks up several, and one copy of the loop is fewer cache
    /// lines for a cold CPU to fetch than one inlined at every call.
    #[inline(never)]
    pub fn header(&self, name: &str) -> Option<&str> {
        // Names compared as bytes, and only when the lengths match.
        let text = self.text.as_bytes();
        self.fields
            .iter()
            .find(|&&[n, v, _]| {
                (v - n) as usize == name.len()
                    && text[n as usize..v as usize].eq_ignore_ascii_case(name.as_bytes())
            })
            .map(|&[_, v, e]| &self.text[v as usize..e as usize])
    }

    /// The X-Request-Id value if sane: 1..=64 visible ASCII chars (0x21..=0x7E); else None.
    pub fn client_request_id(&self) -> Option<&str> {
        let id = self.header("x-request-id")?;
        let sane = (1..=64).contains(&id.len()) && id.bytes().all(|b| (0x21..=0x7e).contains(&b));
        sane.then_some(id)
    }
}

/// Why a request was refused. Every variant closes the connection afterwards
/// (the caller does that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Malformed request line, headers or chunked framing; an invalid or
    /// conflicting `Content-Length`; a `Transfer-Encoding` other than exactly
    /// `chunked`; both `Content-Length` and `Transfer-Encoding`. The reason is
    /// a short lowercase phrase.
    BadRequest(&'static str),
    /// The head (or the chunked trailer section) is too long, or has too many fields.
    HeadTooLarge,
    /// The declared or decoded body exceeds [`Limits::max_body_bytes`].
    BodyTooLarge,
    /// Not HTTP/1.0 or HTTP/1.1 (e.g. `HTTP/2.0`, `HTTP/0.9`, the HTTP/2 preface).
    VersionNotSupported,
    /// An `Expect` other than `100-continue`.
    ExpectationFailed,
}

impl HttpError {
    /// The response status: 400, 413, 417, 431 or 505.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::VersionNotSupported => 505,
            HttpError::ExpectationFailed => 417,
        }
    }

    /// The machine-readable error code for the response body.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::BadRequest(_) => "bad_request",
            HttpError::HeadTooLarge => "headers_too_large",
            HttpError::BodyTooLarge => "payload_too_large",
            HttpError::VersionNotSupported => "http_version_not_supported",
            HttpError::ExpectationFailed => "expectation_failed",
        }
    }

    /// A sentence a user can act on; `limits` are the ones the request was read with.
    pub fn message(&self, limits: &Limits) -> String {
        match self {
            HttpError::BadRequest(reason) => format!("malformed request: {reason}"),
            HttpError::HeadTooLarge => format!(
                "request head exceeds {} bytes or {MAX_HEADERS} header fields \
                 (chunked trailers: {MAX_TRAILER_BYTES} bytes); send fewer or smaller headers",
                limits.max_head_bytes
            ),
            HttpError::BodyTooLarge => format!(
                "request body exceeds {} bytes; send a smaller body",
                limits.max_body_bytes
            ),
            HttpError::VersionNotSupported => {
                "only HTTP/1.0 and HTTP/1.1 are supported".to_string()
            }
            HttpError::ExpectationFailed => {
                "the only expectation supported is Expect: 100-continue".to_string()
            }
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadRequest(reason) => write!(f, "{} ({reason})", self.code()),
            _ => f.write_str(self.code()),
        }
    }
}

impl std::error::Error for HttpError {}

/// What [`RequestReader::poll`] made of the bytes so far. Every variant
/// says how many leading bytes of `input` the reader took: the caller drops
/// them, and the next call's `input` starts right after them.
#[derive(Debug)]
pub enum ReadStatus {
    /// Need more bytes. Once the head is parsed, body bytes (and chunked
    /// framing) are taken as they arrive, so a caller keeps no more than
    /// an unfinished framing line of a body.
    Partial { consumed: usize },
    /// The head (its `consumed` bytes) is complete and a body follows. Given
    /// once per request, before any body byte is taken: the caller may
    /// decide whether to read the body now (a memory budget), or at all (a
    /// request refused on its head alone), then polls again for the body.
    /// `expect_continue`: the request asked for `100 Continue` (HTTP/1.1)
    /// and no body byte has arrived yet.
    Head {
        consumed: usize,
        expect_continue: bool,
    },
    /// A whole request; it ends `consumed` bytes into `input` (the rest is
    /// the next pipelined request).
    Complete { request: Request, consumed: usize },
}

/// How a body being read is framed, for a caller that budgets memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySize {
    /// `Content-Length`: exactly this many bytes.
    Length(usize),
    /// Chunked: at most [`Limits::max_body_bytes`].
    Chunked,
}

/// Per-connection incremental reader. The caller keeps the bytes the reader
/// has not taken and passes them again, followed by whatever arrived since;
/// the reader remembers how far it got, so a head is parsed once (re-parsed
/// only while it is still incomplete) and a body is taken as it arrives and
/// decoded exactly once — never O(n^2) on bytes that arrive one at a time,
/// and never more than a framing line kept beside the decoded body.
/// After `Complete` the reader is ready for the next request.
///
/// While a head is incomplete, its bytes are not taken: the input may only
/// grow between calls. If it is ever shorter than on the previous call, the
/// reader assumes it was replaced and starts over.
#[derive(Debug, Default)]
pub struct RequestReader {
    state: State,
    /// Length of `input` at the previous poll, while reading a head.
    seen: usize,
    /// Length of the head window at the last `httparse` attempt.
    parsed_len: usize,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Head,
    Body(Box<BodyState>),
}

/// A parsed head and the body read so far.
#[derive(Debug)]
struct BodyState {
    request: Request,
    framing: Framing,
}

#[derive(Debug)]
enum Framing {
    /// `left` of the `total` bytes of a `Content-Length` body are to come.
    Length {
        total: usize,
        left: usize,
    },
    Chunked(ChunkedDecoder),
}

impl RequestReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads as far as `input` allows. `input` must start at the first byte
    /// the reader has not taken (see [`ReadStatus`]).
    pub fn poll(&mut self, input: &[u8], limits: &Limits) -> Result<ReadStatus, HttpError> {
        if matches!(self.state, State::Head) && input.len() < self.seen {
            self.reset();
        }
        let result = self.poll_inner(input, limits);
        match &result {
            Ok(ReadStatus::Partial { consumed }) if matches!(self.state, State::Head) => {
                debug_assert_eq!(*consumed, 0);
                self.seen = input.len();
            }
            Ok(ReadStatus::Partial { .. } | ReadStatus::Head { .. }) => self.seen = 0,
            _ => self.reset(),
        }
        result
    }

    /// True once any byte of the current request has been seen (for header timeout vs idle timeout).
    pub fn in_progress(&self) -> bool {
        self.seen > 0 || matches!(self.state, State::Body(_))
    }

    /// The head of the request whose body is being read.
    pub fn head(&self) -> Option<&Request> {
        match &self.state {
            State::Body(b) => Some(&b.request),
            State::Head => None,
        }
    }

    /// How the body being read is framed (`None` between bodies).
    pub fn body_size(&self) -> Option<BodySize> {
        match &self.state {
            State::Body(b) => Some(match b.framing {
                Framing::Length { total, .. } => BodySize::Length(total),
                Framing::Chunked(_) => BodySize::Chunked,
            }),
            State::Head => None,
        }
    }

    /// Bytes of the body decoded so far.
    pub fn body_len(&self) -> usize {
        match &self.state {
            State::Body(b) => b.request.body.len(),
            State::Head => 0,
        }
    }

    /// Discards progress (after an error, or a request refused on its head).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    fn poll_inner(&mut self, input: &[u8], limits: &Limits) -> Result<ReadStatus, HttpError> {
        let State::Body(body) = &mut self.state else {
            let Some((mut body, head_len, expect)) = self.parse_head(input, limits)? else {
                return Ok(ReadStatus::Partial { consumed: 0 });
            };
            if let Framing::Length { total, .. } = body.framing {
                // The whole body came with its head (a small POST, or no
                // body): complete at once, with no body state between.
                let end = head_len.saturating_add(total);
                if let Some(bytes) = input.get(head_len..end) {
                    body.request.body = bytes.to_vec();
                    return Ok(ReadStatus::Complete {
                        request: body.request,
                        consumed: end,
                    });
                }
            }
            self.state = State::Body(Box::new(body));
            return Ok(ReadStatus::Head {
                consumed: head_len,
                // A client already sending its body needs no invitation.
                expect_continue: expect && input.len() == head_len,
            });
        };
        let (consumed, done) = match &mut body.framing {
            Framing::Length { total, left } => {
                let take = (*left).min(input.len());
                if body.request.body.capacity() == 0 {
                    // The declared size is within the limit: no regrowth.
                    body.request.body.reserve_exact(*total);
                }
                body.request.body.extend_from_slice(&input[..take]);
                *left -= take;
                (take, *left == 0)
            }
            Framing::Chunked(decoder) => {
                let decoded = decoder
                    .decode(input, &mut body.request.body)
                    .map_err(chunk_error)?;
                (decoded.consumed, decoded.done)
            }
        };
        if !done {
            return Ok(ReadStatus::Partial { consumed });
        }
        match std::mem::take(&mut self.state) {
            State::Body(body) => Ok(ReadStatus::Complete {
                request: body.request,
                consumed,
            }),
            State::Head => unreachable!("the state was Body"),
        }
    }

    /// The head with its body framing, its length, and whether it asks for
    /// `100 Continue`; `Ok(None)` while the head is incomplete.
    fn parse_head(
        &mut self,
        input: &[u8],
        limits: &Limits,
    ) -> Result<Option<(BodyState, usize, bool)>, HttpError> {
        if input.starts_with(b"PRI * HTTP/2") {
            return Err(HttpError::VersionNotSupported);
        }
        // Never look further than one byte past the limit: a head that is not
        // complete by then is too large, whatever follows.
        let window = &input[..input.len().min(limits.max_head_bytes.saturating_add(1))];
        // A head becomes complete (and mostly becomes invalid) only when a line
        // ends, so an incomplete head is re-parsed only when a new line ending
        // arrived, or when the window doubled (so errors inside one very long
        // line are still found early, at amortised linear cost).
        let worth_parsing = self.parsed_len == 0
            || window.len() > limits.max_head_bytes
            || window.len() >= self.parsed_len.saturating_mul(2)
            || window
                .get(self.parsed_len..)
                .is_some_and(|fresh| fresh.contains(&b'\n'));
        if !worth_parsing {
            return Ok(None);
        }
        self.parsed_len = window.len();

        // Uninitialised room: only the slots a head uses are written (64
        // empty headers are 2 KiB to clear on every request).
        let mut fields =
            [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        let head_len = match parsed.parse_with_uninit_headers(window, &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if window.len() > limits.max_head_bytes => {
                return Err(HttpError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(err) => return Err(map_parse_error(err)),
        };
        // A head's text (invalid UTF-8 bytes turn into three each) must fit
        // the `u32` offsets of `Request`, whatever `--max-head-bytes` says.
        if head_len > limits.max_head_bytes || head_len > MAX_HEAD_TEXT / 3 {
            return Err(HttpError::HeadTooLarge);
        }
        let (Some(method_str), Some(target), Some(version)) =
            (parsed.method, parsed.path, parsed.version)
        else {
            return Err(HttpError::BadRequest("malformed request line"));
        };
        let version = match version {
            0 => Version::Http10,
            1 => Version::Http11,
            _ => return Err(HttpError::VersionNotSupported),
        };
        let target = origin_form(target);
        let request = Request::new(
            method_str,
            &target,
            version,
            true,
            parsed.headers.iter().map(|h| (h.name, h.value)),
            Vec::new(),
        );

        let mut content_length: Option<u64> = None;
        let mut transfer_encodings = 0usize;
        let mut chunked = false;
        let mut close = false;
        let mut keep_alive_token = false;
        let mut expect_continue = false;
        let mut hosts = 0usize;
        for (name, value) in request.headers() {
            let value = trim_ows(value);
            match name {
                "content-length" => {
                    let len = parse_content_length(value)?;
                    if content_length.is_some_and(|prev| prev != len) {
                        return Err(HttpError::BadRequest("conflicting Content-Length values"));
                    }
                    content_length = Some(len);
                }
                "transfer-encoding" => {
                    transfer_encodings += 1;
                    chunked = value.eq_ignore_ascii_case("chunked");
                }
                "connection" => {
                    for token in value.split(',').map(trim_ows) {
                        close |= token.eq_ignore_ascii_case("close");
                        keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
                    }
                }
                "expect" => {
                    // The only expectation there is; any other cannot be met.
                    for token in value.split(',').map(trim_ows) {
                        if !token.eq_ignore_ascii_case("100-continue") {
                            return Err(HttpError::ExpectationFailed);
                        }
                        expect_continue = true;
                    }
                }
                "host" => hosts += 1,
                _ => {}
            }
        }
        // RFC 9112 §3.2: an HTTP/1.1 request names its host exactly once.
        if version == Version::Http11 && hosts != 1 {
            return Err(HttpError::BadRequest(if hosts == 0 {
                "missing Host header"
            } else {
                "more than one Host header"
            }));
        }

        let framing = if transfer_encodings > 0 {
            if content_length.is_some() {
                return Err(HttpError::BadRequest(
                    "both Content-Length and Transfer-Encoding are present",
                ));
            }
            if version == Version::Http10 {
                return Err(HttpError::BadRequest(
                    "Transfer-Encoding is not allowed in HTTP/1.0",
                ));
            }
            if transfer_encodings > 1 || !chunked {
                return Err(HttpError::BadRequest(
                    "only Transfer-Encoding: chunked is supported",
                ));
            }
            let max = u64::try_from(limits.max_body_bytes).unwrap_or(u64::MAX);
            // CRLF only, and the framing bounded besides the data.
            Framing::Chunked(ChunkedDecoder::for_requests(max))
        } else {
            let len = content_length.unwrap_or(0);
            let max = u64::try_from(limits.max_body_bytes).unwrap_or(u64::MAX);
            if len > max {
                return Err(HttpError::BodyTooLarge);
            }
            let total = usize::try_from(len).map_err(|_| HttpError::BodyTooLarge)?;
            Framing::Length { total, left: total }
        };

        let keep_alive = match version {
            Version::Http11 => !close,
            Version::Http10 => keep_alive_token && !close,
        };
        let state = BodyState {
            request: Request {
                keep_alive,
                ..request
            },
            framing,
        };
        // HTTP/1.0 clients know no 100 Continue (RFC 9110 §10.1.1).
        let expect = expect_continue && version == Version::Http11;
        Ok(Some((state, head_len, expect)))
    }
}

fn map_parse_error(err: httparse::Error) -> HttpError {
    match err {
        httparse::Error::Version => HttpError::VersionNotSupported,
        httparse::Error::TooManyHeaders => HttpError::HeadTooLarge,
        httparse::Error::HeaderName => HttpError::BadRequest("invalid header name"),
        httparse::Error::HeaderValue => HttpError::BadRequest("invalid header value"),
        httparse::Error::NewLine => HttpError::BadRequest("invalid line ending"),
        httparse::Error::Token => HttpError::BadRequest("invalid method or request target"),
        httparse::Error::Status => HttpError::BadRequest("malformed request line"),
    }
}

/// A chunked body's error as the request's: trailers count as head bytes.
fn chunk_error(err: ChunkError) -> HttpError {
    match err {
        ChunkError::BodyTooLarge => HttpError::BodyTooLarge,
        ChunkError::TrailersTooLarge => HttpError::HeadTooLarge,
        other => HttpError::BadRequest(other.reason()),
    }
}

/// The origin form of a request target: `http://host/path?q` is served as
/// `/path?q` (RFC 9112 §3.2.2: servers accept the absolute form); anything
/// else is left as it is.
fn origin_form(target: &str) -> std::borrow::Cow<'_, str> {
    let has_scheme = |scheme: &str| {
        target
            .get(..scheme.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
    };
    let rest = if has_scheme("http://") {
        &target[7..]
    } else if has_scheme("https://") {
        &target[8..]
    } else {
        return target.into();
    };
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => rest[i..].into(),
        // `http://host?q`: the path is `/`.
        Some(i) => format!("/{}", &rest[i..]).into(),
        None => "/".into(),
    }
}

/// Strips optional whitespace (SP / HTAB) from both ends.
fn trim_ows(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

fn parse_content_length(value: &str) -> Result<u64, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::BadRequest(
            "Content-Length is not a decimal number",
        ));
    }
    // Only digits, so the one possible failure is overflow: far beyond any limit.
    value.parse().map_err(|_| HttpError::BodyTooLarge)
}

/// Percent-decodes an `application/x-www-form-urlencoded` query string into pairs: `+` is a space, `%XX` decoded,
/// invalid escapes kept literally, invalid UTF-8 replaced lossily; empty segments skipped; a key without '=' has value "".
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|segment| !segment.is_empty())
        .map(|segment| {
            let (key, value) = segment.split_once('=').unwrap_or((segment, ""));
            (form_decode(key), form_decode(value))
        })
        .collect()
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => s,
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::chunked::MAX_CHUNK_LINE;

    const LIMITS: Limits = Limits {
        max_head_bytes: 16384,
        max_body_bytes: 1 << 20,
    };

    /// One reader given the whole input at once, its body admitted at
    /// once: polled until it completes, fails or needs more. `consumed`
    /// counts from the start of `input`.
    fn poll_once(input: &[u8], limits: &Limits) -> Result<ReadStatus, HttpError> {
        poll_from(&mut RequestReader::new(), input, limits)
    }

    fn poll_from(
        r: &mut RequestReader,
        input: &[u8],
        limits: &Limits,
    ) -> Result<ReadStatus, HttpError> {
        let mut at = 0;
        loop {
            match r.poll(&input[at..], limits)? {
                ReadStatus::Head { consumed, .. } => at += consumed,
                ReadStatus::Partial { consumed } => {
                    return Ok(ReadStatus::Partial {
                        consumed: at + consumed,
                    })
                }
                ReadStatus::Complete { request, consumed } => {
                    return Ok(ReadStatus::Complete {
                        request,
                        consumed: at + consumed,
                    })
                }
            }
        }
    }

    /// The input in the pieces `cuts` makes of it, each passed as a caller
    /// does: from the first byte not taken, up to the end of the piece.
    /// The outcome and how many `100 Continue` the reader asked for.
    fn feed_split(
        input: &[u8],
        cuts: impl IntoIterator<Item = usize>,
        limits: &Limits,
    ) -> (Result<(Request, usize), HttpError>, usize) {
        let mut reader = RequestReader::new();
        let (mut at, mut continues) = (0, 0);
        for end in cuts.into_iter().chain(std::iter::once(input.len())) {
            loop {
                match reader.poll(&input[at..end.max(at)], limits) {
                    Ok(ReadStatus::Head {
                        consumed,
                        expect_continue,
                    }) => {
                        at += consumed;
                        continues += usize::from(expect_continue);
                    }
                    Ok(ReadStatus::Partial { consumed }) => {
                        at += consumed;
                        break;
                    }
                    Ok(ReadStatus::Complete { request, consumed }) => {
                        return (Ok((request, at + consumed)), continues)
                    }
                    Err(err) => return (Err(err), continues),
                }
            }
        }
        (
            Err(HttpError::BadRequest("test: input ended while partial")),
            continues,
        )
    }

    #[track_caller]
    fn complete(input: &[u8]) -> (Request, usize) {
        match poll_once(input, &LIMITS) {
            Ok(ReadStatus::Complete { request, consumed }) => (request, consumed),
            other => panic!(
                "expected Complete for {:?}, got {other:?}",
                String::from_utf8_lossy(input)
            ),
        }
    }

    #[track_caller]
    fn error(input: &[u8], limits: &Limits) -> HttpError {
        match poll_once(input, limits) {
            Err(err) => err,
            other => panic!(
                "expected an error for {:?}, got {other:?}",
                String::from_utf8_lossy(input)
            ),
        }
    }

    /// Feeds the input one byte more each time to one reader until it
    /// completes or fails; returns the outcome and how many 100-continues it asked for.
    fn feed_bytewise(
        input: &[u8],
        limits: &Limits,
    ) -> (Result<(Request, usize), HttpError>, usize) {
        feed_split(input, 0..input.len(), limits)
    }

    fn same(a: &Request, b: &Request) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn simple_get_with_query() {
        let input =
            b"GET /v1/stream?model=tiny&n=3 HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc-123\r\n\r\n";
        let (req, consumed) = complete(input);
        assert_eq!(consumed, input.len());
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.method_str(), "GET");
        assert_eq!(req.path(), "/v1/stream");
        assert_eq!(req.query(), Some("model=tiny&n=3"));
        assert_eq!(req.version, Version::Http11);
        assert!(req.keep_alive);
        assert_eq!(req.header("HOST"), Some("x"));
        assert_eq!(req.header("x-request-id"), Some("abc-123"));
        assert_eq!(req.headers().next(), Some(("host", "x")));
        assert_eq!(req.client_request_id(), Some("abc-123"));
        assert!(req.body.is_empty());
    }

    #[test]
    fn methods_and_targets() {
        let cases: &[(&str, Method, &str, Option<&str>)] = &[
            ("GET / HTTP/1.1", Method::Get, "/", None),
            ("HEAD /a HTTP/1.1", Method::Head, "/a", None),
            ("POST /a? HTTP/1.1", Method::Post, "/a", Some("")),
            ("PUT /a?b?c HTTP/1.1", Method::Put, "/a", Some("b?c")),
            ("DELETE /%20 HTTP/1.1", Method::Delete, "/%20", None),
            ("OPTIONS * HTTP/1.1", Method::Options, "*", None),
            ("PATCH /p HTTP/1.1", Method::Patch, "/p", None),
            ("BREW /pot HTTP/1.1", Method::Other, "/pot", None),
            ("get / HTTP/1.1", Method::Other, "/", None),
        ];
        for &(line, method, path, query) in cases {
            let input = format!("{line}\r\nHost: x\r\n\r\n");
            let (req, _) = complete(input.as_bytes());
            assert_eq!(req.method, method, "{line}");
            assert_eq!(req.method_str(), line.split(' ').next().unwrap(), "{line}");
            assert_eq!(req.path(), path, "{line}");
            assert_eq!(req.query(), query, "{line}");
        }
    }

    #[test]
    fn no_framing_means_empty_body() {
        let cases: &[(&[u8], usize)] = &[
            (b"POST /x HTTP/1.1\r\nHost: x\r\n\r\nextra", 29),
            (b"GET /x HTTP/1.0\r\n\r\n", 19),
        ];
        for &(input, head_len) in cases {
            let (req, consumed) = complete(input);
            assert!(req.body.is_empty());
            assert_eq!(consumed, head_len);
        }
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let input = b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let (req, consumed) = complete(input);
        assert_eq!(req.path(), "/");
        assert_eq!(consumed, input.len());
    }

    #[test]
    fn post_with_content_length_split_at_every_byte() {
        let input =
            b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world";
        let (whole, consumed) = complete(input);
        assert_eq!(consumed, input.len());
        assert_eq!(whole.body, b"hello world");
        let head_len = input.len() - 11;
        for split in 0..input.len() {
            let mut reader = RequestReader::new();
            let taken = match poll_from(&mut reader, &input[..split], &LIMITS) {
                Ok(ReadStatus::Partial { consumed }) => consumed,
                other => panic!("split {split}: expected Partial, got {other:?}"),
            };
            // Nothing of an incomplete head is taken; all of a body is.
            let expected = if split < head_len { 0 } else { split };
            assert_eq!(taken, expected, "split {split}");
            assert_eq!(reader.in_progress(), split > 0, "split {split}");
            match reader.poll(&input[taken..], &LIMITS) {
                Ok(ReadStatus::Complete { request, consumed }) => {
                    assert!(same(&request, &whole), "split {split}");
                    assert_eq!(taken + consumed, input.len(), "split {split}");
                }
                Ok(ReadStatus::Head { consumed, .. }) if split < head_len => {
                    assert_eq!(consumed, head_len);
                    let (request, _) = match reader.poll(&input[head_len..], &LIMITS) {
                        Ok(ReadStatus::Complete { request, consumed }) => (request, consumed),
                        other => panic!("split {split}: expected Complete, got {other:?}"),
                    };
                    assert!(same(&request, &whole), "split {split}");
                }
                other => panic!("split {split}: expected Complete, got {other:?}"),
            }
            assert!(!reader.in_progress());
        }
        let (result, continues) = feed_bytewise(input, &LIMITS);
        let (request, consumed) = result.unwrap();
        assert!(same(&request, &whole));
        assert_eq!((consumed, continues), (input.len(), 0));
    }

    #[test]
    fn chunked_body_one_byte_at_a_time() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let mut input =
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        input.extend_from_slice(body);
        let request_len = input.len();
        input.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
        let (result, continues) = feed_bytewise(&input, &LIMITS);
        let (request, consumed) = result.unwrap();
        assert_eq!(request.body, b"hello world");
        assert_eq!(consumed, request_len);
        assert_eq!(continues, 0);
        let (whole, whole_consumed) = complete(&input);
        assert!(same(&whole, &request));
        assert_eq!(whole_consumed, request_len);
    }

    /// Every framing line ends with CRLF: a bare LF is where two parsers
    /// start to disagree.
    #[test]
    fn bare_lf_in_chunked_framing_is_refused() {
        let head = "POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let cases: &[&str] = &[
            "3\nabc\r\n0\r\n\r\n",
            "3\r\nabc\n0\r\n\r\n",
            "3;e=1\nabc\r\n0\r\n\r\n",
            "3\r\nabc\r\n0\n\r\n",
            "3\r\nabc\r\n0\r\nX-Checksum: 1\n\r\n",
            "3\r\nabc\r\n0\r\n\n",
            "3\nabc\n0\n\n",
        ];
        for body in cases {
            let input = format!("{head}{body}");
            let err = error(input.as_bytes(), &LIMITS);
            assert!(matches!(err, HttpError::BadRequest(_)), "{body:?}: {err:?}");
            let (bytewise, _) = feed_bytewise(input.as_bytes(), &LIMITS);
            assert_eq!(bytewise.err(), Some(err), "{body:?}");
        }
    }

    #[test]
    fn chunked_variants() {
        let head = "POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked \r\n\r\n";
        let cases: &[(&str, &[u8])] = &[
            ("0\r\n\r\n", b""),
            ("000\r\n\r\n", b""),
            ("3;name=value\r\nabc\r\n0;last\r\n\r\n", b"abc"),
            ("3 ; name=\"quoted\"\r\nabc\r\n0\r\n\r\n", b"abc"),
            (
                "0003\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n",
                b"abc0123456789",
            ),
            (
                "3\r\nabc\r\n0\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n",
                b"abc",
            ),
            ("1\r\n\n\r\n0\r\n\r\n", b"\n"),
            ("00000000000000000001\r\nz\r\n0\r\n\r\n", b"z"),
        ];
        for &(body, expected) in cases {
            let input = format!("{head}{body}NEXT");
            let (result, _) = feed_bytewise(input.as_bytes(), &LIMITS);
            let (req, consumed) = result.unwrap_or_else(|e| panic!("{body:?}: {e:?}"));
            assert_eq!(req.body, expected, "{body:?}");
            assert_eq!(&input.as_bytes()[consumed..], b"NEXT", "{body:?}");
            let (req, consumed) = complete(input.as_bytes());
            assert_eq!(req.body, expected, "{body:?}");
            assert_eq!(&input.as_bytes()[consumed..], b"NEXT", "{body:?}");
        }
    }

    /// Byte-at-a-time delivery stays linear: quadratic work on these sizes
    /// would take minutes, not milliseconds.
    #[test]
    fn byte_at_a_time_is_linear() {
        let limits = Limits {
            max_head_bytes: 64 * 1024,
            max_body_bytes: 1 << 20,
        };
        let mut input = format!(
            "POST /big HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
            "v".repeat(60 * 1024)
        )
        .into_bytes();
        let mut expected = Vec::new();
        for i in 0..64u8 {
            let chunk = vec![b'a' + i % 26; 4096];
            input.extend_from_slice(format!("{:x};i={i}\r\n", chunk.len()).as_bytes());
            input.extend_from_slice(&chunk);
            input.extend_from_slice(b"\r\n");
            expected.extend_from_slice(&chunk);
        }
        input.extend_from_slice(b"0\r\n\r\n");
        let started = std::time::Instant::now();
        let (result, _) = feed_bytewise(&input, &limits);
        let (request, consumed) = result.unwrap();
        assert_eq!(request.body, expected);
        assert_eq!(consumed, input.len());
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn pipelined_requests() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /b?x=1 HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut reader = RequestReader::new();
        let (first, consumed) = match poll_from(&mut reader, input, &LIMITS) {
            Ok(ReadStatus::Complete { request, consumed }) => (request, consumed),
            other => panic!("{other:?}"),
        };
        assert_eq!((first.path(), first.body.as_slice()), ("/a", &b"abc"[..]));
        assert!(input[consumed..].starts_with(b"GET /b"));
        match reader.poll(&input[consumed..], &LIMITS) {
            Ok(ReadStatus::Complete {
                request,
                consumed: second,
            }) => {
                assert_eq!(request.path(), "/b");
                assert_eq!(request.query(), Some("x=1"));
                assert_eq!(consumed + second, input.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keep_alive_rules() {
        let cases: &[(&str, bool)] = &[
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", true),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                false,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: CLOSE\r\n\r\n",
                false,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade, Close\r\n\r\n",
                false,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
                false,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
                true,
            ),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: closed\r\n\r\n",
                true,
            ),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
            (
                "GET / HTTP/1.0\r\nConnection: foo ,Keep-Alive\r\n\r\n",
                true,
            ),
            (
                "GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n",
                false,
            ),
        ];
        for &(input, keep_alive) in cases {
            let (req, _) = complete(input.as_bytes());
            assert_eq!(req.keep_alive, keep_alive, "{input:?}");
        }
    }

    #[test]
    fn expect_continue_is_signalled_once() {
        let head =
            b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\nContent-Length: 4\r\n\r\n";
        let mut reader = RequestReader::new();
        // Head incomplete: no 100 yet.
        assert!(matches!(
            reader.poll(&head[..head.len() - 1], &LIMITS),
            Ok(ReadStatus::Partial { consumed: 0 })
        ));
        // The head, and no body byte yet: the client waits for the 100.
        match reader.poll(head, &LIMITS) {
            Ok(ReadStatus::Head {
                consumed,
                expect_continue: true,
            }) => assert_eq!(consumed, head.len()),
            other => panic!("{other:?}"),
        }
        assert_eq!(reader.head().map(|h| h.path()), Some("/x"));
        assert_eq!(reader.body_size(), Some(BodySize::Length(4)));
        assert!(matches!(
            reader.poll(b"", &LIMITS),
            Ok(ReadStatus::Partial { consumed: 0 })
        ));
        assert!(matches!(
            reader.poll(b"ab", &LIMITS),
            Ok(ReadStatus::Partial { consumed: 2 })
        ));
        match reader.poll(b"cdGET", &LIMITS) {
            Ok(ReadStatus::Complete { request, consumed }) => {
                assert_eq!(request.body, b"abcd");
                assert_eq!(consumed, 2);
            }
            other => panic!("{other:?}"),
        }
        // The next request asks again.
        assert!(matches!(
            reader.poll(head, &LIMITS),
            Ok(ReadStatus::Head {
                expect_continue: true,
                ..
            })
        ));

        let cases: &[(&[u8], usize)] = &[
            (b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nabcd", 1),
            (b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", 1),
            (b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n", 0),
            (b"GET /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n", 0),
            (b"POST /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nabcd", 0),
            (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd", 0),
            (b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue, 100-CONTINUE\r\nContent-Length: 1\r\n\r\na", 1),
        ];
        for &(input, expected) in cases {
            let (result, continues) = feed_bytewise(input, &LIMITS);
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(continues, expected, "{:?}", String::from_utf8_lossy(input));
        }
        // Body bytes already there: no 100 needed.
        let mut r = RequestReader::new();
        let whole =
            b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nab";
        assert!(matches!(
            r.poll(whole, &LIMITS),
            Ok(ReadStatus::Head {
                expect_continue: false,
                ..
            })
        ));
    }

    #[test]
    fn a_body_that_came_with_its_head_completes_at_once() {
        let head = "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n";
        let chunked = "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n";
        // (input, Some(body) when complete at once, bytes taken)
        let cases: &[(String, Option<&[u8]>, usize)] = &[
            (format!("{head}abcd"), Some(b"abcd"), head.len() + 4),
            (
                format!("{head}abcdGET / HTTP/1.1\r\n"),
                Some(b"abcd"),
                head.len() + 4,
            ),
            (format!("{head}abc"), None, head.len()),
            (head.to_string(), None, head.len()),
            (head.replace(": 4", ": 0"), Some(b""), head.len()),
            (chunked.to_string(), None, chunked.len() - 14),
        ];
        for (input, body, taken) in cases {
            let mut r = RequestReader::new();
            match (r.poll(input.as_bytes(), &LIMITS), body) {
                (Ok(ReadStatus::Complete { request, consumed }), Some(body)) => {
                    assert_eq!(&request.body, body, "{input:?}");
                    assert_eq!(consumed, *taken, "{input:?}");
                    assert!(!r.in_progress(), "{input:?}");
                }
                (Ok(ReadStatus::Head { consumed, .. }), None) => {
                    assert_eq!(consumed, *taken, "{input:?}")
                }
                (other, _) => panic!("{input:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_expectations_fail() {
        let cases: &[&[u8]] = &[
            b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\na",
            b"GET /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue, foo\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: x\r\nExpect:\r\n\r\n",
            b"GET /x HTTP/1.0\r\nExpect: 100-continuex\r\n\r\n",
        ];
        for &input in cases {
            assert_eq!(error(input, &LIMITS), HttpError::ExpectationFailed);
            assert_eq!(
                feed_bytewise(input, &LIMITS).0.err(),
                Some(HttpError::ExpectationFailed)
            );
        }
        assert_eq!(HttpError::ExpectationFailed.status(), 417);
        assert_eq!(HttpError::ExpectationFailed.code(), "expectation_failed");
    }

    #[test]
    fn host_is_required_once_on_http11() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", Some("missing Host header")),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
                Some("more than one Host header"),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\nHOST: b\r\n\r\n",
                Some("more than one Host header"),
            ),
            (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", None),
            (b"GET / HTTP/1.0\r\n\r\n", None),
            (b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", None),
        ];
        for &(input, refused) in cases {
            match refused {
                Some(reason) => assert_eq!(error(input, &LIMITS), HttpError::BadRequest(reason)),
                None => {
                    complete(input);
                }
            }
        }
    }

    #[test]
    fn absolute_form_targets_are_read_as_their_path() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("http://h/v1/chat/stream", "/v1/chat/stream", None),
            ("HTTP://h:8080/a/b?x=1", "/a/b", Some("x=1")),
            ("https://h/", "/", None),
            ("http://h", "/", None),
            ("http://h?q", "/", Some("q")),
            ("http://user@h/p", "/p", None),
            ("/plain", "/plain", None),
            ("*", "*", None),
            ("ftp://h/x", "ftp://h/x", None),
        ];
        for &(target, path, query) in cases {
            let input = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
            let (req, _) = complete(input.as_bytes());
            assert_eq!((req.path(), req.query()), (path, query), "{target}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let small = Limits {
            max_head_bytes: 64,
            max_body_bytes: 8,
        };
        let long_header = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(64)
        );
        let many_headers = format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", "A: b\r\n".repeat(65));
        let many_ok = format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", "A: b\r\n".repeat(63));
        let cases: &[(&[u8], &Limits, HttpError)] = &[
            // Partial head already over the limit.
            (
                &long_header.as_bytes()[..70],
                &small,
                HttpError::HeadTooLarge,
            ),
            (&[b'A'; 65], &small, HttpError::HeadTooLarge),
            // Complete head over the limit.
            (long_header.as_bytes(), &small, HttpError::HeadTooLarge),
            (many_headers.as_bytes(), &LIMITS, HttpError::HeadTooLarge),
            // Declared body too large, before any body byte.
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n",
                &small,
                HttpError::BodyTooLarge,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                &LIMITS,
                HttpError::BodyTooLarge,
            ),
            // Chunk sizes add up past the limit, known when the size line is read.
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n",
                &small,
                HttpError::BodyTooLarge,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\naaaaa\r\n4\r\n",
                &small,
                HttpError::BodyTooLarge,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
                &LIMITS,
                HttpError::BodyTooLarge,
            ),
        ];
        for (i, &(input, limits, expected)) in cases.iter().enumerate() {
            assert_eq!(error(input, limits), expected, "case {i}");
            let (result, _) = feed_bytewise(input, limits);
            assert_eq!(result.err(), Some(expected), "case {i} bytewise");
        }
        complete(many_ok.as_bytes());
        // At the limits exactly: fine.
        let exact = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n12345678";
        let head_len = exact.len() - 8;
        let at_limit = Limits {
            max_head_bytes: head_len,
            max_body_bytes: 8,
        };
        assert!(matches!(
            poll_once(exact, &at_limit),
            Ok(ReadStatus::Complete { .. })
        ));
        let (result, _) = feed_bytewise(exact, &at_limit);
        assert!(result.is_ok());
        let over = Limits {
            max_head_bytes: head_len - 1,
            ..at_limit
        };
        assert_eq!(error(exact, &over), HttpError::HeadTooLarge);

        let chunked_at_limit = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\naaaaa\r\n3\r\nbbb\r\n0\r\n\r\n";
        let (req, _) = match poll_once(
            chunked_at_limit,
            &Limits {
                max_body_bytes: 8,
                ..LIMITS
            },
        ) {
            Ok(ReadStatus::Complete { request, consumed }) => (request, consumed),
            other => panic!("{other:?}"),
        };
        assert_eq!(req.body, b"aaaaabbb");
    }

    #[test]
    fn chunked_framing_limits() {
        let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let long_ext = format!("{head}1;{}\r\na\r\n0\r\n\r\n", "x".repeat(MAX_CHUNK_LINE));
        let ok_ext = format!(
            "{head}1;{}\r\na\r\n0\r\n\r\n",
            "x".repeat(MAX_CHUNK_LINE - 3)
        );
        let unfinished_line = format!("{head}{}", "0".repeat(MAX_CHUNK_LINE + 1));
        let big_trailer = format!("{head}0\r\nX-T: {}\r\n\r\n", "t".repeat(MAX_TRAILER_BYTES));
        let unfinished_trailer = format!("{head}0\r\nX-T: {}", "t".repeat(MAX_TRAILER_BYTES));
        let cases: &[(&str, HttpError)] = &[
            (&long_ext, HttpError::BadRequest("chunk-size line too long")),
            (
                &unfinished_line,
                HttpError::BadRequest("chunk-size line too long"),
            ),
            (&big_trailer, HttpError::HeadTooLarge),
            (&unfinished_trailer, HttpError::HeadTooLarge),
        ];
        for &(input, expected) in cases {
            assert_eq!(error(input.as_bytes(), &LIMITS), expected);
            assert_eq!(
                feed_bytewise(input.as_bytes(), &LIMITS).0.err(),
                Some(expected)
            );
        }
        let (req, _) = complete(ok_ext.as_bytes());
        assert_eq!(req.body, b"a");
    }

    #[test]
    fn bad_requests() {
        let cases: &[&[u8]] = &[
            b"\x00\x01\x02garbage\r\n\r\n",
            b"GARBAGE\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nName : x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\rX0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nnot a trailer\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n folded: x\r\n\r\n",
        ];
        for &input in cases {
            let err = error(input, &LIMITS);
            assert!(
                matches!(err, HttpError::BadRequest(_)),
                "{:?}: {err:?}",
                String::from_utf8_lossy(input)
            );
            let (result, _) = feed_bytewise(input, &LIMITS);
            assert!(
                matches!(result, Err(HttpError::BadRequest(_))),
                "bytewise {:?}: {result:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            error(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                &LIMITS
            ),
            HttpError::BadRequest("both Content-Length and Transfer-Encoding are present")
        );
        // Duplicates that agree are fine.
        let (req, _) = complete(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\ncontent-length: 003\r\n\r\nabc",
        );
        assert_eq!(req.body, b"abc");
    }

    #[test]
    fn unsupported_versions() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/0.9\r\n\r\n",
            b"GET / HTTP/1.2\r\n\r\n",
            b"GET / HTTP/3\r\n\r\n",
            b"GET / HTTPS/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"PRI * HTTP/2",
        ];
        for &input in cases {
            assert_eq!(
                error(input, &LIMITS),
                HttpError::VersionNotSupported,
                "{:?}",
                String::from_utf8_lossy(input)
            );
            let (result, _) = feed_bytewise(input, &LIMITS);
            assert_eq!(result.err(), Some(HttpError::VersionNotSupported));
        }
    }

    #[test]
    fn error_status_code_and_message() {
        let cases: &[(HttpError, u16, &str, &str)] = &[
            (
                HttpError::BadRequest("invalid chunk size"),
                400,
                "bad_request",
                "invalid chunk size",
            ),
            (
                HttpError::HeadTooLarge,
                431,
                "headers_too_large",
                "16384 bytes",
            ),
            (
                HttpError::BodyTooLarge,
                413,
                "payload_too_large",
                "1048576 bytes",
            ),
            (
                HttpError::VersionNotSupported,
                505,
                "http_version_not_supported",
                "HTTP/1.1",
            ),
        ];
        for &(err, status, code, needle) in cases {
            assert_eq!(err.status(), status);
            assert_eq!(err.code(), code);
            let message = err.message(&LIMITS);
            assert!(message.contains(needle), "{message}");
            assert!(err.to_string().starts_with(code));
        }
    }

    #[test]
    fn reader_state_and_reset() {
        let mut reader = RequestReader::new();
        assert!(!reader.in_progress());
        assert!(matches!(
            reader.poll(b"", &LIMITS),
            Ok(ReadStatus::Partial { consumed: 0 })
        ));
        assert!(!reader.in_progress());
        let input = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab";
        assert!(matches!(
            reader.poll(input, &LIMITS),
            Ok(ReadStatus::Head { .. })
        ));
        assert!(reader.in_progress());
        reader.reset();
        assert!(!reader.in_progress());
        assert_eq!(reader.head().map(|h| h.path()), None);
        // A shorter head than last time: the reader starts over instead of misreading.
        let mut reader = RequestReader::new();
        assert!(matches!(
            reader.poll(&input[..30], &LIMITS),
            Ok(ReadStatus::Partial { consumed: 0 })
        ));
        let next = b"GET /o HTTP/1.1\r\n\r\n";
        assert!(matches!(
            reader.poll(next, &LIMITS),
            Err(HttpError::BadRequest("missing Host header"))
        ));
        // After an error the reader is usable again.
        let mut reader = RequestReader::new();
        assert!(reader.poll(b"GARBAGE\r\n\r\n", &LIMITS).is_err());
        assert!(!reader.in_progress());
        assert!(matches!(
            reader.poll(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &LIMITS),
            Ok(ReadStatus::Complete { .. })
        ));
    }

    #[test]
    fn query_parsing() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|&(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                "a=1&b=hello+world&c=%E2%9C%93&d=%zz&e",
                &[
                    ("a", "1"),
                    ("b", "hello world"),
                    ("c", "✓"),
                    ("d", "%zz"),
                    ("e", ""),
                ],
            ),
            ("", &[]),
            ("&&", &[]),
            ("=", &[("", "")]),
            ("a=b=c", &[("a", "b=c")]),
            ("k%3D=v%26w", &[("k=", "v&w")]),
            ("x=%", &[("x", "%")]),
            ("x=%4", &[("x", "%4")]),
            ("x=%41%4a%4A", &[("x", "AJJ")]),
            ("x=%FF", &[("x", "\u{FFFD}")]),
            ("x=%2B+%20", &[("x", "+  ")]),
            ("a=1&a=2", &[("a", "1"), ("a", "2")]),
        ];
        for &(query, expected) in cases {
            assert_eq!(parse_query(query), pairs(expected), "{query:?}");
        }
    }

    #[test]
    fn client_request_ids() {
        let long_ok = "a".repeat(64);
        let too_long = "a".repeat(65);
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"abc-123", Some("abc-123")),
            (b"~!#$%&'*+-.^_`|", Some("~!#$%&'*+-.^_`|")),
            (long_ok.as_bytes(), Some(&long_ok)),
            (too_long.as_bytes(), None),
            (b"has space", None),
            (b"tab\there", None),
            (b"bell\x07", None),
            (b"caf\xc3\xa9", None),
            (b"", None),
        ];
        for &(value, expected) in cases {
            let mut input = b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-ID: ".to_vec();
            input.extend_from_slice(value);
            input.extend_from_slice(b"\r\n\r\n");
            match poll_once(&input, &LIMITS) {
                Ok(ReadStatus::Complete { request, .. }) => {
                    assert_eq!(request.client_request_id(), expected, "{value:?}")
                }
                // httparse itself may refuse control bytes in a value; also fine.
                Err(HttpError::BadRequest(_)) => assert_eq!(expected, None, "{value:?}"),
                other => panic!("{value:?}: {other:?}"),
            }
        }
        let (req, _) = complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(req.client_request_id(), None);
    }

    /// Deterministic mutation fuzzing: never panic, never return nonsense,
    /// and agree with itself whether the bytes come at once or one by one.
    #[test]
    fn mutated_requests_never_panic() {
        struct XorShift(u64);
        impl XorShift {
            fn next(&mut self) -> u64 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0
            }
            fn below(&mut self, n: usize) -> usize {
                (self.next() % n.max(1) as u64) as usize
            }
        }
        let seeds: &[&[u8]] = &[
            b"GET /v1/stream?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
            // A body still to come.
            b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nabc",
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n",
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            // At the limits below: 128-byte head, 16-byte body.
            b"PUT /limits HTTP/1.1\r\nHost: x\r\nX-Pad: 0123456789012345678901234567890123456789\r\n\
              X-Pad: 01234567890123456789abcdef\r\nContent-Length: 16\r\n\r\n0123456789abcdef",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nf\r\n0123456789abcde\r\n1\r\nf\r\n0\r\n\r\n",
        ];
        let interesting = b"\r\n:;0123456789abcdefABCDEF \t,?%-\x00\xff";
        let limits = Limits {
            max_head_bytes: 128,
            max_body_bytes: 16,
        };
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let (mut completes, mut partials) = (0usize, 0usize);
        let mut errors = std::collections::HashMap::new();
        for round in 0..20_000 {
            let mut input = seeds[rng.below(seeds.len())].to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(input.len() + 1);
                match rng.below(3) {
                    0 if at < input.len() => input[at] ^= 1 << rng.below(8),
                    1 => {
                        let byte = if rng.below(2) == 0 {
                            interesting[rng.below(interesting.len())]
                        } else {
                            rng.next() as u8
                        };
                        input.insert(at, byte);
                    }
                    _ if at < input.len() => {
                        input.remove(at);
                    }
                    _ => {}
                }
            }
            let whole = poll_once(&input, &limits);
            if let Ok(ReadStatus::Complete { request, consumed }) = &whole {
                assert!(*consumed <= input.len(), "round {round}");
                assert!(request.body.len() <= limits.max_body_bytes, "round {round}");
            }
            let (bytewise, continues) = feed_bytewise(&input, &limits);
            assert!(continues <= 1, "round {round}");
            match (&whole, &bytewise) {
                (
                    Ok(ReadStatus::Complete {
                        request: a,
                        consumed: x,
                    }),
                    Ok((b, y)),
                ) => {
                    assert!(
                        same(a, b) && x == y,
                        "round {round}: {:?}",
                        String::from_utf8_lossy(&input)
                    );
                }
                (Ok(ReadStatus::Complete { .. }), Err(e)) => {
                    panic!(
                        "round {round}: whole completed, bytewise {e:?}: {:?}",
                        String::from_utf8_lossy(&input)
                    )
                }
                _ => {}
            }
            match whole {
                Ok(ReadStatus::Complete { .. }) => completes += 1,
                Ok(ReadStatus::Partial { .. }) => partials += 1,
                Ok(ReadStatus::Head { .. }) => unreachable!("poll_once goes past heads"),
                Err(err) => {
                    assert!(!err.message(&limits).is_empty());
                    *errors.entry(err.code()).or_insert(0usize) += 1;
                }
            }
        }
        // The mutations must exercise every outcome, or this test proves little.
        assert!(completes > 1000 && partials > 100, "{completes} {partials}");
        for code in [
            "bad_request",
            "headers_too_large",
            "payload_too_large",
            "http_version_not_supported",
        ] {
            assert!(errors.get(code).is_some_and(|&n| n > 20), "{errors:?}");
        }
    }
}
