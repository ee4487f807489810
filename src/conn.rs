//! The HTTP/1.1 connection machine, free of socket I/O.
//!
//! It owns one client connection's HTTP: reading requests (limits,
//! pipelining, keep-alive, half-close, header and idle timeouts) and writing
//! responses (whole ones, or a body that some stream feeds a chunk at a
//! time). It names no endpoint, no event format and no model: what answers
//! a request is the router's business, and which stream feeds a body is
//! the engine's ([`crate::engine`]).
//!
//! ```text
//! Reading ──request──▶ Responding ──end of body──▶ Reading (keep-alive)
//!    │                     │                   └─▶ Closing ─▶ Lingering ─▶ Closed
//!    └─bad request─▶ Closing          client left ─▶ Closed
//! ```
//!
//! Inputs are `handle_*` calls with `now`; outputs are [`Conn::pending`]
//! bytes, [`Conn::next_deadline`], and the state queries. Requests come out
//! of [`Conn::parse`], which the engine calls while [`Conn::is_reading`].
//! Between a head and its body the machine reports the head
//! ([`Parsed::Head`]) so the engine can refuse the request at once or fund
//! its body from the server-wide budget of buffered request bytes
//! ([`Conn::fund`]). An unfunded body is still read from the bytes already
//! received (a small request that came whole is served), but no more is
//! read from the socket, and `100 Continue` is sent, only once it is funded.
//! What the connection holds of a request ([`Conn::charge`]) is what the
//! engine counts against that budget.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::http::response::{self, Body, Head};
use crate::http::{BodySize, HttpError, Method, ReadStatus, Request, RequestReader, Version};
use crate::outbuf::{BufPool, OutBuf};

/// How long a closed-for-writing connection waits for the client's FIN, so
/// that unread request bytes do not turn our close into a reset that
/// destroys the response in flight.
const LINGER: Duration = Duration::from_secs(2);
/// How long the last words to a client that is not reading get to leave.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(1);

/// The request a response answers, for the access log. Holds no query
/// string (it may carry a prompt) and no header values.
#[derive(Debug, Clone, Default)]
pub struct ReqLine {
    /// The method then the path, in one allocation.
    text: Box<str>,
    method_len: u32,
}

impl ReqLine {
    pub fn new(method: &str, path: &str) -> ReqLine {
        let mut text = String::with_capacity(method.len() + path.len());
        text.push_str(method);
        text.push_str(path);
        ReqLine {
            text: text.into(),
            method_len: method.len() as u32,
        }
    }

    pub fn method(&self) -> &str {
        &self.text[..self.method_len as usize]
    }

    pub fn path(&self) -> &str {
        &self.text[self.method_len as usize..]
    }
}

/// What [`Conn::parse`] found at the start of the unread input.
#[derive(Debug)]
pub enum Parsed {
    /// A whole request, already consumed.
    Request(Request),
    /// The head of a request with a body, already consumed ([`Conn::head`]
    /// shows it). The engine funds the body ([`Conn::fund`]) now or later,
    /// or refuses the request ([`Conn::drop_request`]) before parsing on.
    /// `expect_continue`: the client waits for `100 Continue`.
    Head { expect_continue: bool },
    /// A request the server cannot read; the rest of the input is dropped
    /// and the connection must close after the answer. `line` and `origin`
    /// come from the head when it parses that far, so the answer can take
    /// its endpoint's shape.
    Bad {
        err: HttpError,
        line: Option<ReqLine>,
        origin: Option<String>,
    },
}

/// A whole response.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub status: u16,
    /// Empty: no `Content-Type`.
    pub content_type: &'a str,
    pub body: &'a [u8],
    pub request_id: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub version: Version,
    pub keep_alive: bool,
}

/// What a timeout meant, for the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    Nothing,
    /// The request head or body did not arrive in time: answer 408 and close.
    RequestTimeout,
    /// The client accepted no byte for `--write-timeout-ms`: while
    /// reading the connection is closed; while responding the engine ends
    /// the body.
    WriteStalled,
    /// An idle keep-alive connection was closed.
    Idle,
}

enum State {
    Reading,
    /// A response whose body comes later (a stream's). `began`: its head
    /// is written and body bytes follow as they come; otherwise the whole
    /// response is written at the end.
    Responding {
        began: bool,
        chunked: bool,
        keep_alive: bool,
    },
    /// The last bytes are queued; close once they are written.
    Closing {
        until: Instant,
    },
    /// Written and half-closed; waiting briefly for the client's FIN.
    Lingering {
        until: Instant,
    },
    Closed,
}

/// One client connection.
pub struct Conn {
    state: State,
    /// Received bytes not yet consumed by a request. Empty (no allocation)
    /// unless a request arrived in pieces or was pipelined behind a stream.
    inbuf: Vec<u8>,
    reader: RequestReader,
    out: OutBuf,
    /// When the connection started waiting for its next request.
    read_since: Instant,
    /// When the first byte of the current request arrived.
    head_started: Option<Instant>,
    served: u32,
    /// Since when the socket has refused bytes we have for it.
    blocked_since: Option<Instant>,
    /// Stopped keeping pipelined input (over the limit) while responding.
    input_full: bool,
    /// The client closed its side after sending what it wanted answered.
    peer_closed: bool,
    /// Complete requests wait in `inbuf` until answers already queued leave.
    input_blocked: bool,
    /// The last [`Conn::parse`] found an incomplete request.
    waiting_for_bytes: bool,
    /// A body is being read without a reservation: only from bytes
    /// already received, until [`Conn::fund`].
    unfunded: bool,
    /// That head asked for `100 Continue`.
    continue_wanted: bool,
    /// Bytes of the budget the engine reserved for the body being read.
    reserved: usize,
    /// The request being answered is a `HEAD`: its answer has no body.
    answering_head: bool,
    /// The request line and `Origin` of the head whose body is being read,
    /// for the answer if the body turns out bad.
    body_of: Option<Box<(ReqLine, Option<String>)>>,
    /// The request being answered and when it was parsed, for the access log.
    current: Option<Box<(ReqLine, Instant)>>,
}

impl Conn {
    pub fn new(now: Instant) -> Conn {
        Conn {
            state: State::Reading,
            inbuf: Vec::new(),
            reader: RequestReader::new(),
            out: OutBuf::default(),
            read_since: now,
            head_started: None,
            served: 0,
            blocked_since: None,
            input_full: false,
            peer_closed: false,
            input_blocked: false,
            waiting_for_bytes: false,
            unfunded: false,
            continue_wanted: false,
            reserved: 0,
            answering_head: false,
            body_of: None,
            current: None,
        }
    }

    // ------------------------------------------------------------ outputs

    /// Bytes waiting for the socket.
    pub fn pending(&self) -> &[u8] {
        self.out.pending()
    }

    /// How many bytes wait for the socket.
    pub fn pending_len(&self) -> usize {
        self.out.len()
    }

    /// Total bytes ever queued; compare with [`Conn::written_total`].
    pub fn appended_total(&self) -> u64 {
        self.out.appended_total()
    }

    pub fn written_total(&self) -> u64 {
        self.out.written_total()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Waiting for (or parsing) a request.
    pub fn is_reading(&self) -> bool {
        matches!(self.state, State::Reading)
    }

    /// A response whose body is still to come.
    pub fn is_responding(&self) -> bool {
        matches!(self.state, State::Responding { .. })
    }

    /// Whether the server should keep reading the socket.
    pub fn wants_read(&self, cfg: &Config) -> bool {
        // Pipelined requests are not parsed faster than their answers leave:
        // past the high-water mark the client's bytes wait in TCP. A body
        // not admitted yet waits there too.
        !self.input_full
            && !self.unfunded
            && !self.peer_closed
            && !self.is_closed()
            && self.out.len() < cfg.high_water()
    }

    /// Everything is written and the connection should be half-closed now
    /// (the server calls `shutdown(Write)` then [`Conn::half_closed`]).
    pub fn wants_half_close(&self) -> bool {
        matches!(self.state, State::Closing { .. }) && self.out.is_empty()
    }

    /// Whether this connection holds an output allocation (for tests of memory per stream).
    pub fn holds_output_buffer(&self) -> bool {
        self.out.holds_allocation()
    }

    /// Complete requests wait unparsed behind answers not yet written.
    pub fn has_waiting_input(&self) -> bool {
        self.is_reading() && !self.inbuf.is_empty()
    }

    /// Request bytes this connection holds or has been promised: its unread
    /// input and the body decoded so far, or the reservation made for its
    /// body if that is more. The engine sums this over connections.
    pub fn charge(&self) -> usize {
        self.reserved.max(self.inbuf.len() + self.reader.body_len())
    }

    /// How much more of its reservation the request being read may fill.
    pub fn reserve_slack(&self) -> usize {
        self.reserved
            .saturating_sub(self.inbuf.len() + self.reader.body_len())
    }

    /// Whether a body is being read without a reservation (it waits for
    /// [`Conn::fund`] before more of it is read from the socket).
    pub fn is_unfunded(&self) -> bool {
        self.unfunded && self.is_reading()
    }

    /// The head of the request whose body is being (or waits to be) read.
    pub fn head(&self) -> Option<&Request> {
        self.reader.head()
    }

    /// How that body is framed.
    pub fn body_size(&self) -> Option<BodySize> {
        self.reader.body_size()
    }

    /// Between requests on a kept-alive connection: nothing of a next
    /// request has arrived and every answer has left. Such a connection may
    /// be closed to admit a new one at the connection limit.
    pub fn is_idle(&self) -> bool {
        self.is_reading()
            && self.served > 0
            && self.head_started.is_none()
            && !self.unfunded
            && self.inbuf.is_empty()
            && self.out.is_empty()
    }

    /// Since when the connection has waited for its next request.
    pub fn idle_since(&self) -> Instant {
        self.read_since
    }

    /// The request being answered and when it was parsed (taken once).
    pub fn take_current(&mut self) -> Option<(ReqLine, Instant)> {
        self.current.take().map(|b| *b)
    }

    /// The earliest moment [`Conn::handle_timeout`] has something to do.
    pub fn next_deadline(&self, cfg: &Config) -> Option<Instant> {
        let write_deadline = self.blocked_since.map(|t| t + cfg.write_timeout());
        match &self.state {
            State::Reading => {
                let d = match self.head_started {
                    Some(t) => t + cfg.header_timeout(),
                    None if self.served == 0 => self.read_since + cfg.header_timeout(),
                    None => self.read_since + cfg.idle_timeout(),
                };
                Some(write_deadline.map_or(d, |w| w.min(d)))
            }
            State::Responding { .. } => write_deadline,
            State::Closing { until } | State::Lingering { until } => Some(*until),
            State::Closed => None,
        }
    }

    // ------------------------------------------------------------- inputs

    /// Bytes from the client arrived: a request has begun, and its header
    /// timeout runs from now.
    pub fn note_bytes(&mut self, now: Instant, data: &[u8]) {
        if self.is_reading() && self.head_started.is_none() && !data.is_empty() {
            self.head_started = Some(now);
        }
    }

    /// Bytes from the client that arrive while a body is being sent: a
    /// pipelined request waits for it to end. Bytes already read are kept;
    /// past one head's worth the server stops reading and TCP holds the
    /// rest (a client that leaves is still noticed from the read-closed
    /// event). While reading, use [`Conn::parse`] instead.
    pub fn keep_input(&mut self, cfg: &Config, data: &[u8]) {
        if self.is_responding() {
            self.inbuf.extend_from_slice(data);
            if self.inbuf.len() >= cfg.max_head_bytes.min(16 * 1024) {
                self.input_full = true;
            }
        }
    }

    /// Parses the next request from the kept input followed by `data`
    /// (call with the same `data` until it returns `None`, then
    /// [`Conn::keep_rest`]). `at` is how far into the combined input
    /// earlier calls got.
    pub fn parse(
        &mut self,
        now: Instant,
        cfg: &Config,
        input: &[u8],
        at: &mut usize,
    ) -> Option<Parsed> {
        if !self.is_reading() || *at >= input.len() || self.out.len() >= cfg.high_water() {
            return None;
        }
        match self.reader.poll(&input[*at..], &cfg.limits()) {
            Ok(ReadStatus::Partial { consumed }) => {
                *at += consumed;
                // The start of the next request came with the previous
                // one: its header timeout runs from now.
                if self.head_started.is_none() {
                    self.head_started = Some(now);
                }
                self.waiting_for_bytes = true;
                None
            }
            Ok(ReadStatus::Head {
                consumed,
                expect_continue,
            }) => {
                *at += consumed;
                if self.head_started.is_none() {
                    self.head_started = Some(now);
                }
                if let Some(h) = self.reader.head() {
                    self.answering_head = h.method == Method::Head;
                    let line = ReqLine::new(h.method_str(), h.path());
                    let origin = h.header("origin").map(str::to_string);
                    self.body_of = Some(Box::new((line, origin)));
                }
                self.unfunded = true;
                self.continue_wanted = expect_continue;
                Some(Parsed::Head { expect_continue })
            }
            Ok(ReadStatus::Complete { request, consumed }) => {
                *at += consumed;
                // The access log's duration runs from the request's first byte.
                let since = self.head_started.take().unwrap_or(now);
                self.reserved = 0;
                self.unfunded = false;
                self.continue_wanted = false;
                self.body_of = None;
                self.answering_head = request.method == Method::Head;
                self.current = Some(Box::new((
                    ReqLine::new(request.method_str(), request.path()),
                    since,
                )));
                Some(Parsed::Request(request))
            }
            Err(err) => {
                let (line, origin) = match self.body_of.take() {
                    // The error is in the body: its head is known.
                    Some(b) => (Some(b.0), b.1),
                    None => match peek_head(&input[*at..]) {
                        Some((l, o)) => (Some(l), o),
                        None => (None, None),
                    },
                };
                // The access log's duration runs from the first byte.
                let since = self.head_started.unwrap_or(now);
                self.drop_request();
                self.answering_head = line.as_ref().is_some_and(|l| l.method() == "HEAD");
                if let Some(l) = &line {
                    self.current = Some(Box::new((l.clone(), since)));
                }
                *at = input.len();
                Some(Parsed::Bad { err, line, origin })
            }
        }
    }

    /// Funds the body being read with `reserve` bytes of the server's
    /// budget, held until the request is whole: the rest of it may now be
    /// read from the socket, and `100 Continue` goes out if the client
    /// waits for it.
    pub fn fund(&mut self, bufs: &mut BufPool, reserve: usize) {
        if !self.unfunded {
            return;
        }
        self.unfunded = false;
        self.reserved = reserve;
        if std::mem::take(&mut self.continue_wanted) {
            self.out.append(bufs, |b| {
                b.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n")
            });
        }
    }

    /// Bytes another event loop queued for this connection before it
    /// handed the connection over: they are written first.
    pub fn queue_output(&mut self, bufs: &mut BufPool, bytes: &[u8]) {
        self.out.append(bufs, |b| b.extend_from_slice(bytes));
    }

    /// Forgets the request being read (refused on its head, or timed out;
    /// the caller answers and closes, and drops the input).
    pub fn drop_request(&mut self) {
        self.reader.reset();
        self.body_of = None;
        self.unfunded = false;
        self.continue_wanted = false;
        self.reserved = 0;
        self.head_started = None;
    }

    /// After [`Conn::parse`] returned `None`: keeps what is left of the
    /// input (copying from `data` only what a request left incomplete).
    /// `owned` is the kept input taken with [`Conn::take_input`].
    pub fn keep_rest(&mut self, cfg: &Config, mut owned: Vec<u8>, data: &[u8], at: usize) {
        let input: &[u8] = if owned.is_empty() { data } else { &owned };
        let at = at.min(input.len());
        let rest = &input[at..];
        self.input_blocked = !rest.is_empty()
            && !std::mem::take(&mut self.waiting_for_bytes)
            && self.is_reading()
            && self.out.len() >= cfg.high_water();
        self.inbuf = if rest.is_empty() {
            Vec::new()
        } else if owned.is_empty() {
            rest.to_vec()
        } else {
            owned.drain(..at);
            owned
        };
    }

    /// Takes the kept input; `data` is appended to it. Give both to
    /// [`Conn::parse`] as `input` (the kept bytes when there are any, else
    /// `data` alone) and the result back to [`Conn::keep_rest`].
    pub fn take_input(&mut self, data: &[u8]) -> Vec<u8> {
        let mut owned = std::mem::take(&mut self.inbuf);
        if !owned.is_empty() {
            owned.extend_from_slice(data);
        }
        owned
    }

    /// After the client's FIN, once every complete request it sent is
    /// answered (or queued to be), the connection closes when the answers
    /// are written.
    pub fn settle_if_peer_closed(&mut self, cx: &mut BufPool, now: Instant, cfg: &Config) {
        if !self.peer_closed || !self.is_reading() || self.input_blocked {
            return;
        }
        // What is left can only be an incomplete request: it never will be.
        self.inbuf = Vec::new();
        self.drop_request();
        if self.out.is_empty() {
            self.close(cx);
        } else {
            self.state = State::Closing {
                until: now + cfg.write_timeout(),
            };
        }
    }

    /// The client closed its side (a read of 0 bytes). While a body is
    /// being sent that means it left (the engine detaches its stream);
    /// otherwise answers already queued are still written before the
    /// connection closes.
    pub fn handle_eof(&mut self, bufs: &mut BufPool, now: Instant, cfg: &Config) {
        self.peer_closed = true;
        match self.state {
            State::Responding { .. } => self.close(bufs),
            // Requests that came before the FIN are still answered.
            State::Reading => self.settle_if_peer_closed(bufs, now, cfg),
            // Keep the deadline already set (a slow consumer's short grace).
            State::Closing { .. } if !self.out.is_empty() => {}
            _ => self.close(bufs),
        }
    }

    /// The connection failed (a reset, a failed write): nothing more can be sent.
    pub fn handle_reset(&mut self, bufs: &mut BufPool) {
        self.close(bufs);
    }

    /// The socket took `n` bytes.
    /// The last write would block (and the write timeout runs).
    pub fn is_write_blocked(&self) -> bool {
        self.blocked_since.is_some()
    }

    pub fn handle_written(&mut self, bufs: &mut BufPool, n: usize) {
        self.out.consume(n, bufs);
        self.blocked_since = None;
    }

    /// The socket would block with bytes pending.
    pub fn handle_write_blocked(&mut self, now: Instant) {
        if self.blocked_since.is_none() {
            self.blocked_since = Some(now);
        }
    }

    /// The server half-closed the socket after [`Conn::wants_half_close`].
    pub fn half_closed(&mut self, now: Instant) {
        self.state = if self.peer_closed {
            State::Closed
        } else {
            State::Lingering {
                until: now + LINGER,
            }
        };
    }

    /// A deadline from [`Conn::next_deadline`] may have passed. A
    /// [`Expired::RequestTimeout`] must be answered (408, then close) by
    /// the caller; [`Expired::WriteStalled`] while responding ends the body.
    pub fn handle_timeout(&mut self, bufs: &mut BufPool, now: Instant, cfg: &Config) -> Expired {
        let stalled = self
            .blocked_since
            .is_some_and(|t| now >= t + cfg.write_timeout());
        match &self.state {
            State::Reading => {
                if stalled {
                    // Answers the client does not read.
                    self.close(bufs);
                    return Expired::WriteStalled;
                }
                match self.next_deadline(cfg) {
                    Some(d) if now >= d => {
                        if self.head_started.is_some() || self.served == 0 {
                            // A real duration, and the request line when
                            // the head came (its body did not).
                            let since = self.head_started.unwrap_or(self.read_since);
                            let line = match &self.body_of {
                                Some(b) => b.0.clone(),
                                None => ReqLine::new("-", "-"),
                            };
                            self.current = Some(Box::new((line, since)));
                            Expired::RequestTimeout
                        } else {
                            self.close(bufs);
                            Expired::Idle
                        }
                    }
                    _ => Expired::Nothing,
                }
            }
            State::Responding { .. } if stalled => Expired::WriteStalled,
            State::Responding { .. } => Expired::Nothing,
            State::Closing { until } | State::Lingering { until } => {
                if now >= *until {
                    self.close(bufs);
                }
                Expired::Nothing
            }
            State::Closed => Expired::Nothing,
        }
    }

    // ------------------------------------------------------------ answers

    /// Writes a whole response, then reads the next request or closes.
    pub fn respond(&mut self, bufs: &mut BufPool, now: Instant, cfg: &Config, r: &Response) {
        let head = Head {
            status: r.status,
            content_type: (!r.content_type.is_empty()).then_some(r.content_type),
            body: if r.status == 204 {
                Body::Empty
            } else {
                Body::Length(r.body.len())
            },
            version: r.version,
            keep_alive: r.keep_alive,
            request_id: r.request_id,
            extra: r.headers,
        };
        self.out.append(bufs, |b| {
            response::write_head(b, &head);
            // A HEAD answer is the GET answer's head alone.
            if r.status != 204 && !self.answering_head {
                b.extend_from_slice(r.body);
            }
        });
        self.finish_response(now, cfg, r.keep_alive);
    }

    /// Starts a response whose body a stream feeds. `head`: write the SSE
    /// head now and send body bytes as they come; otherwise the whole
    /// response is written at the end with [`Conn::respond`].
    pub fn begin_body(
        &mut self,
        bufs: &mut BufPool,
        head: Option<(&str, &[(&str, &str)])>,
        version: Version,
        keep_alive: bool,
    ) {
        let chunked = version == Version::Http11;
        if let Some((request_id, headers)) = head {
            self.out.append(bufs, |b| {
                response::write_sse_head(b, version, keep_alive, request_id, headers);
            });
        }
        self.state = State::Responding {
            began: head.is_some(),
            chunked,
            keep_alive,
        };
    }

    /// Appends what `f` writes to the body being sent, as one HTTP chunk.
    /// Before the head of a whole response, `f` runs all the same (it may
    /// have text to keep) but must write nothing.
    pub fn append_body(&mut self, bufs: &mut BufPool, f: impl FnOnce(&mut Vec<u8>)) {
        match self.state {
            State::Responding {
                began: true,
                chunked,
                ..
            } => self.out.append_chunk(bufs, chunked, f),
            _ => {
                let mut none = Vec::new();
                f(&mut none);
                debug_assert!(none.is_empty(), "bytes before a response head");
            }
        }
    }

    /// Ends the body being sent: its last chunk, then the next request, or
    /// closing. `close`: the connection must not carry another request.
    pub fn end_body(&mut self, bufs: &mut BufPool, now: Instant, cfg: &Config, close: bool) {
        let State::Responding {
            chunked,
            keep_alive,
            ..
        } = self.state
        else {
            return;
        };
        if chunked {
            self.out.append_last_chunk(bufs);
        }
        self.finish_response(now, cfg, keep_alive && chunked && !close);
    }

    /// Ends the body of a client that is not reading: its last bytes get a
    /// short grace, then the connection closes.
    pub fn end_body_slow(&mut self, bufs: &mut BufPool, now: Instant) {
        let State::Responding { chunked, .. } = self.state else {
            return;
        };
        if chunked {
            self.out.append_last_chunk(bufs);
        }
        self.state = State::Closing {
            until: now + SLOW_CONSUMER_GRACE,
        };
    }

    /// The body's stream is gone without a word (its client left): close.
    pub fn abort_body(&mut self, bufs: &mut BufPool) {
        if self.is_responding() {
            self.close(bufs);
        }
    }

    /// The version and keep-alive of the response being sent.
    pub fn responding_keep_alive(&self) -> bool {
        matches!(
            self.state,
            State::Responding {
                keep_alive: true,
                ..
            }
        )
    }

    // ---------------------------------------------------------- internals

    /// After a whole response: read the next request, or close.
    fn finish_response(&mut self, now: Instant, cfg: &Config, keep_alive: bool) {
        self.served += 1;
        self.read_since = now;
        self.input_full = false;
        self.answering_head = false;
        self.state = if keep_alive {
            State::Reading
        } else {
            State::Closing {
                until: now + cfg.write_timeout(),
            }
        };
    }

    fn close(&mut self, bufs: &mut BufPool) {
        self.state = State::Closed;
        self.out.clear(bufs);
        self.inbuf = Vec::new();
        self.drop_request();
    }

    /// Closes a connection that is between requests (to admit another at
    /// the connection limit): nothing is lost, the client opens a new one.
    pub fn evict(&mut self, bufs: &mut BufPool) {
        self.close(bufs);
    }
}

/// The request line and `Origin` of a head that was refused, when they parse.
fn peek_head(input: &[u8]) -> Option<(ReqLine, Option<String>)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(input) {
        Ok(httparse::Status::Complete(_)) => {}
        // A head cut off by the size limit still has its request line.
        _ if req.path.is_some() => {}
        _ => return None,
    }
    let path = req.path?.split('?').next().unwrap_or_default();
    let origin = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("origin"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned());
    let method = req.method.unwrap_or("-");
    Some((ReqLine::new(method, path), origin))
}
