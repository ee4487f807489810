//! The per-connection state machine, free of socket I/O.
//!
//! Bytes, pieces from a worker and time go in (`handle_*`); bytes to write
//! ([`Session::pending`]), a deadline ([`Session::next_deadline`]) and "close
//! me" ([`Session::is_closed`]) come out. The event loop in
//! [`crate::server`] is a thin shell that moves bytes between sockets and
//! sessions; the tests below drive a session with a simulated clock and
//! assert on exact bytes.
//!
//! ```text
//! Reading ──request──▶ Streaming ──done/error──▶ Reading (keep-alive)
//!    │                     │                  └─▶ Closing ─▶ Lingering ─▶ Closed
//!    └─bad request─▶ Closing            client left ─▶ Closed
//! ```
//!
//! Services the session needs from the rest of the server (admission, ids,
//! buffers, metrics) come through [`Cx`], so tests can fake them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{self, NativeRequest};
use crate::backend::sim::{self, SimText};
use crate::backend::GenRequest;
use crate::config::Config;
use crate::http::response::{self, Body, Head};
use crate::http::{Method, ReadStatus, Request, RequestReader, Version};
use crate::metrics::Metrics;
use crate::openai_api::{self, ChunkFormat};
use crate::outbuf::{BufPool, OutBuf};
use crate::pool::{Piece, TokenSink};
use crate::sse::{self, DoneInfo, ErrorCode, StreamError};

/// What produces an admitted stream's tokens.
pub enum Producer {
    /// The simulated model, paced by this session's timer.
    Sim,
    /// A generation queued on the worker pool.
    Pool(Arc<TokenSink>),
}

/// A stream the server accepted.
pub struct Admitted {
    pub id: u64,
    pub producer: Producer,
}

/// A request the server will not start now.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

/// The operational endpoints, answered by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    Healthz,
    Readyz,
    Metrics,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Errored(ErrorCode),
    Disconnected,
}

/// The request a response answers, for the access log. Holds no query
/// string (it may carry a prompt) and no header values.
#[derive(Debug, Clone, Default)]
pub struct ReqLine {
    pub method: String,
    pub path: String,
}

/// One answered request that started no stream, for metrics and the access log.
#[derive(Debug, Clone)]
pub struct Access<'a> {
    pub line: Option<&'a ReqLine>,
    pub status: u16,
    pub request_id: &'a str,
    pub duration: Duration,
}

/// One finished stream, for metrics and the access log.
#[derive(Debug, Clone)]
pub struct StreamSummary {
    pub id: u64,
    pub request_id: String,
    pub line: ReqLine,
    pub outcome: Outcome,
    pub tokens: u32,
    pub ttft: Option<Duration>,
    pub duration: Duration,
}

/// What the session needs from the server around it.
pub trait Services {
    /// A fresh id, never reused (request ids of refused requests use one too).
    fn next_id(&mut self) -> u64;
    /// Admits a stream with id `id`, or refuses it.
    fn admit(&mut self, id: u64, gen: &GenRequest) -> Result<Producer, Refusal>;
    /// Status, content type and body of an operational endpoint.
    fn ops(&mut self, which: Ops, req: &Request) -> (u16, &'static str, Vec<u8>);
    /// A stream ended; `streams_open` goes down here.
    fn stream_ended(&mut self, summary: &StreamSummary);
    /// A request was answered without a stream.
    fn responded(&mut self, _access: &Access) {}
}

/// Everything a `handle_*` call gets besides its input.
pub struct Cx<'a> {
    pub now: Instant,
    pub cfg: &'a Config,
    pub bufs: &'a mut BufPool,
    pub metrics: &'a Metrics,
    pub svc: &'a mut dyn Services,
}

/// How long a closed-for-writing connection waits for the client's FIN, so
/// that unread request bytes do not turn our close into a reset that
/// destroys the response in flight.
const LINGER: Duration = Duration::from_secs(2);
/// How long an error event for a client that is not reading gets to leave.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(1);

enum State {
    Reading,
    Streaming(Box<Stream>),
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

enum Mode {
    /// Events as they happen.
    Sse,
    /// `"stream": false`: one JSON answer at the end.
    Json(String),
}

enum Prod {
    Sim { text: SimText, next_due: Instant },
    Pool(Arc<TokenSink>),
}

/// Which API the stream speaks.
enum Flavor {
    /// `/v1/chat/stream`: `token`, `heartbeat`, `done`, `error` events.
    Native,
    /// `/v1/chat/completions`: `chat.completion.chunk` data events.
    OpenAi {
        format: Box<ChunkFormat>,
        /// `stream: true` under `--no-streaming`: one chunk and `[DONE]` at the end.
        at_once: bool,
    },
}

struct Stream {
    id: u64,
    request_id: String,
    line: ReqLine,
    flavor: Flavor,
    version: Version,
    keep_alive: bool,
    mode: Mode,
    /// The most tokens relayed: a backend that goes on is cut off here.
    max_tokens: u32,
    prod: Prod,
    prompt_tokens: Option<u32>,
    parsed_at: Instant,
    last_event_at: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    ttft: Option<Duration>,
    tokens: u32,
}

impl Stream {
    fn chunked(&self) -> bool {
        self.version == Version::Http11
    }

    fn ttft_estimate(&self) -> Option<Duration> {
        self.ttft
            .or_else(|| self.first_token_at.map(|t| t - self.parsed_at))
    }
}

/// One client connection.
pub struct Session {
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
    /// `(appended mark, parse time, stream id)` of the first token not yet written.
    ttft_mark: Option<(u64, Instant, u64)>,
    /// Stopped keeping pipelined input (over the limit) while streaming.
    input_full: bool,
    /// The client closed its side after sending what it wanted answered.
    peer_closed: bool,
    /// Complete requests wait in `inbuf` until answers already queued leave.
    input_blocked: bool,
    /// The request being answered (not a stream), for the access log.
    current: Option<Box<(ReqLine, Instant)>>,
    /// `Access-Control-Allow-Origin` for the current request, when allowed.
    cors: Option<Box<str>>,
    /// The current request is on the OpenAI endpoint: errors in its shape.
    openai: bool,
    /// `--cors-origin` names origins (not `*`): answers vary by `Origin`.
    vary_origin: bool,
}

impl Session {
    pub fn new(now: Instant) -> Session {
        Session {
            state: State::Reading,
            inbuf: Vec::new(),
            reader: RequestReader::new(),
            out: OutBuf::default(),
            read_since: now,
            head_started: None,
            served: 0,
            blocked_since: None,
            ttft_mark: None,
            input_full: false,
            peer_closed: false,
            input_blocked: false,
            current: None,
            cors: None,
            openai: false,
            vary_origin: false,
        }
    }

    // ------------------------------------------------------------ outputs

    /// Bytes waiting for the socket.
    pub fn pending(&self) -> &[u8] {
        self.out.pending()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    pub fn is_streaming(&self) -> bool {
        matches!(self.state, State::Streaming(_))
    }

    /// The running stream's id.
    pub fn stream_id(&self) -> Option<u64> {
        match &self.state {
            State::Streaming(s) => Some(s.id),
            _ => None,
        }
    }

    /// Whether the server should keep reading the socket.
    pub fn wants_read(&self, cfg: &Config) -> bool {
        // Pipelined requests are not parsed faster than their answers leave:
        // past the high-water mark the client's bytes wait in TCP.
        !self.input_full
            && !self.peer_closed
            && !self.is_closed()
            && self.out.len() < cfg.high_water()
    }

    /// Everything is written and the connection should be half-closed now
    /// (the server calls `shutdown(Write)` then [`Session::half_closed`]).
    pub fn wants_half_close(&self) -> bool {
        matches!(self.state, State::Closing { .. }) && self.out.is_empty()
    }

    /// Whether this connection holds an output allocation (for tests of memory per stream).
    pub fn holds_output_buffer(&self) -> bool {
        self.out.holds_allocation()
    }

    /// The earliest moment [`Session::handle_timeout`] has something to do.
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
            State::Streaming(st) => {
                let mut d = st.parsed_at + cfg.max_stream();
                if matches!(st.mode, Mode::Sse) {
                    d = d.min(st.last_event_at + cfg.heartbeat());
                }
                if let Prod::Sim { text, next_due } = &st.prod {
                    if st.tokens <= text.total && self.out.len() < cfg.high_water() {
                        d = d.min(*next_due);
                    }
                }
                Some(write_deadline.map_or(d, |w| w.min(d)))
            }
            State::Closing { until } | State::Lingering { until } => Some(*until),
            State::Closed => None,
        }
    }

    // ------------------------------------------------------------- inputs

    /// Bytes from the client.
    pub fn handle_read(&mut self, cx: &mut Cx, data: &[u8]) {
        match self.state {
            State::Reading => {
                if self.head_started.is_none() && !data.is_empty() {
                    self.head_started = Some(cx.now);
                }
                self.process_input(cx, data);
            }
            State::Streaming(_) => {
                // A pipelined request waits for the stream to end. Bytes
                // already read are kept; past one head's worth the server
                // stops reading and TCP holds the rest (a client that
                // leaves is still noticed from the read-closed event).
                self.inbuf.extend_from_slice(data);
                if self.inbuf.len() >= cx.cfg.max_head_bytes.min(16 * 1024) {
                    self.input_full = true;
                }
            }
            State::Closing { .. } | State::Lingering { .. } | State::Closed => {}
        }
    }

    /// The client closed its side (a read of 0 bytes). During a stream
    /// that means it left: the generation is cancelled. Otherwise answers
    /// already queued are still written before the connection closes.
    pub fn handle_eof(&mut self, cx: &mut Cx) {
        self.peer_closed = true;
        match self.state {
            State::Streaming(_) => self.handle_reset(cx),
            // Requests that came before the FIN are still answered.
            State::Reading => self.settle_if_peer_closed(cx),
            // Keep the deadline already set (a slow consumer's short grace).
            State::Closing { .. } if !self.out.is_empty() => {}
            _ => self.close(cx),
        }
    }

    /// After the client's FIN, once every complete request it sent is
    /// answered (or queued to be), the connection closes when the answers
    /// are written.
    fn settle_if_peer_closed(&mut self, cx: &mut Cx) {
        if !self.peer_closed || !matches!(self.state, State::Reading) || self.input_blocked {
            return;
        }
        // What is left can only be an incomplete request: it never will be.
        self.inbuf = Vec::new();
        if self.out.is_empty() {
            self.close(cx);
        } else {
            self.state = State::Closing {
                until: cx.now + cx.cfg.write_timeout(),
            };
        }
    }

    /// The connection failed (a reset, a failed write): nothing more can
    /// be sent; a running stream's generation is cancelled.
    pub fn handle_reset(&mut self, cx: &mut Cx) {
        if let State::Streaming(st) = &self.state {
            log::debug!("stream {:x}: client left", st.id);
        }
        self.end_stream(cx, End::Disconnected, false);
        self.close(cx);
    }

    /// The socket took `n` bytes.
    pub fn handle_written(&mut self, cx: &mut Cx, n: usize) {
        self.out.consume(n, cx.bufs);
        cx.metrics
            .bytes_sent
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.blocked_since = None;
        if let Some((mark, t0, id)) = self.ttft_mark {
            if self.out.written_total() >= mark {
                self.ttft_mark = None;
                let ttft = cx.now - t0;
                cx.metrics.ttft.observe(ttft);
                if let State::Streaming(st) = &mut self.state {
                    if st.id == id {
                        st.ttft = Some(ttft);
                    }
                }
            }
        }
        // Room again: take what the producer has been holding back, or
        // answer pipelined requests that waited for the answers before.
        if self.out.len() < cx.cfg.high_water() / 2 {
            match self.state {
                State::Streaming(_) => self.pump(cx),
                State::Reading if !self.inbuf.is_empty() => self.process_input(cx, &[]),
                _ => {}
            }
        }
    }

    /// The socket would block with bytes pending.
    pub fn handle_write_blocked(&mut self, now: Instant) {
        if self.blocked_since.is_none() {
            self.blocked_since = Some(now);
        }
    }

    /// The server half-closed the socket after [`Session::wants_half_close`].
    pub fn half_closed(&mut self, now: Instant) {
        self.state = if self.peer_closed {
            State::Closed
        } else {
            State::Lingering {
                until: now + LINGER,
            }
        };
    }

    /// A worker pushed pieces for this connection's stream `id`.
    pub fn handle_ready(&mut self, cx: &mut Cx, id: u64) {
        if self.stream_id() == Some(id) {
            self.pump(cx);
        }
    }

    /// The drain time is over: a running stream ends with `shutting_down`.
    pub fn shut_down(&mut self, cx: &mut Cx) {
        if self.is_streaming() {
            let e = StreamError::new(ErrorCode::ShuttingDown, "the server is shutting down");
            self.end_stream(cx, End::Error(e), false);
        }
    }

    /// Whether bytes are waiting for the socket.
    pub fn has_pending(&self) -> bool {
        !self.out.is_empty()
    }

    /// A deadline from [`Session::next_deadline`] may have passed.
    pub fn handle_timeout(&mut self, cx: &mut Cx) {
        let now = cx.now;
        let cfg = cx.cfg;
        match &mut self.state {
            State::Reading => {
                if write_stalled(self.blocked_since, cx) {
                    // Answers the client does not read.
                    return self.close(cx);
                }
                if let Some(d) = self.next_deadline(cfg) {
                    if now >= d {
                        cx.metrics
                            .connections_timed_out
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if self.head_started.is_some() || self.served == 0 {
                            log::debug!("request head not received in time: 408");
                            let id = cx.svc.next_id();
                            self.respond_error(
                                cx,
                                &format!("{id:x}"),
                                Version::Http11,
                                false,
                                408,
                                "request_timeout",
                                &format!(
                                    "the request was not received within {} ms",
                                    cfg.header_timeout_ms
                                ),
                                &[],
                            );
                        } else {
                            self.close(cx);
                        }
                    }
                }
            }
            State::Streaming(st) => {
                if write_stalled(self.blocked_since, cx) {
                    let msg = format!(
                        "the client accepted no bytes for {} ms",
                        cfg.write_timeout_ms
                    );
                    return self.end_stream(
                        cx,
                        End::Error(StreamError::new(ErrorCode::SlowConsumer, msg)),
                        false,
                    );
                }
                if now >= st.parsed_at + cfg.max_stream() {
                    let msg = format!("the stream ran longer than {} ms", cfg.max_stream_ms);
                    return self.end_stream(
                        cx,
                        End::Error(StreamError::new(ErrorCode::DeadlineExceeded, msg)),
                        false,
                    );
                }
                self.pump(cx);
                if let State::Streaming(st) = &mut self.state {
                    if matches!(st.mode, Mode::Sse) && now >= st.last_event_at + cfg.heartbeat() {
                        let phase = match &st.prod {
                            Prod::Pool(s) if s.started_at().is_none() => "queued",
                            _ => "generating",
                        };
                        st.last_event_at = now;
                        let chunked = st.chunked();
                        let native = matches!(st.flavor, Flavor::Native);
                        self.out.append_chunk(cx.bufs, chunked, |b| {
                            if native {
                                sse::heartbeat(b, phase)
                            } else {
                                // OpenAI clients skip SSE comments.
                                b.extend_from_slice(b": keep-alive\n\n")
                            }
                        });
                        cx.metrics
                            .heartbeats_sent
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            State::Closing { until } | State::Lingering { until } => {
                if now >= *until {
                    self.close(cx);
                }
            }
            State::Closed => {}
        }
    }

    // ---------------------------------------------------------- internals

    fn close(&mut self, cx: &mut Cx) {
        self.end_stream(cx, End::Disconnected, false);
        self.state = State::Closed;
        self.out.clear(cx.bufs);
        self.inbuf = Vec::new();
        self.ttft_mark = None;
    }

    /// Parses and dispatches every complete request in the input, as long
    /// as the connection is reading.
    fn process_input(&mut self, cx: &mut Cx, data: &[u8]) {
        // Parse straight from the caller's (scratch) buffer when nothing is
        // kept; copy only what is left incomplete.
        let mut owned = std::mem::take(&mut self.inbuf);
        let from_data = owned.is_empty();
        if !from_data {
            owned.extend_from_slice(data);
        }
        let input: &[u8] = if from_data { data } else { &owned };
        let limits = cx.cfg.limits();
        let mut at = 0;
        let hwm = cx.cfg.high_water();
        let mut waiting_for_bytes = false;
        while matches!(self.state, State::Reading) && at < input.len() && self.out.len() < hwm {
            match self.reader.poll(&input[at..], &limits) {
                Ok(ReadStatus::Partial { send_continue }) => {
                    waiting_for_bytes = true;
                    if send_continue {
                        self.out.append(cx.bufs, |b| {
                            b.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n")
                        });
                    }
                    break;
                }
                Ok(ReadStatus::Complete { request, consumed }) => {
                    at += consumed;
                    self.head_started = None;
                    self.dispatch(cx, request);
                }
                Err(e) => {
                    // A refused head may still name its path and origin: the
                    // answer should be in that endpoint's shape, readable by
                    // an allowed browser.
                    if let Some((line, origin)) = peek_head(&input[at..]) {
                        self.openai = openai_shaped(&line.path);
                        self.cors = origin.and_then(|o| allowed_origin(cx.cfg, &o));
                        self.current = Some(Box::new((line, cx.now)));
                    }
                    at = input.len();
                    cx.metrics
                        .requests
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let msg = e.message(&limits);
                    log::debug!("bad request: {} {}", e.status(), msg);
                    let id = cx.svc.next_id();
                    self.respond_error(
                        cx,
                        &format!("{id:x}"),
                        Version::Http11,
                        false,
                        e.status(),
                        e.code(),
                        &msg,
                        &[],
                    );
                }
            }
        }
        let rest = &input[at.min(input.len())..];
        self.input_blocked = !rest.is_empty()
            && !waiting_for_bytes
            && matches!(self.state, State::Reading)
            && self.out.len() >= hwm;
        if waiting_for_bytes && self.head_started.is_none() && matches!(self.state, State::Reading)
        {
            // The start of the next request came with the previous one.
            self.head_started = Some(cx.now);
        }
        self.inbuf = if rest.is_empty() {
            Vec::new()
        } else if from_data {
            rest.to_vec()
        } else {
            owned.drain(..at);
            owned
        };
        self.settle_if_peer_closed(cx);
    }

    fn dispatch(&mut self, cx: &mut Cx, req: Request) {
        cx.metrics
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = cx.svc.next_id();
        let request_id = match req.client_request_id() {
            Some(r) => r.to_string(),
            None => format!("{id:x}"),
        };
        let (v, ka) = (req.version, req.keep_alive);
        self.current = Some(Box::new((
            ReqLine {
                method: req.method_str.clone(),
                path: req.path.clone(),
            },
            cx.now,
        )));
        self.cors = cors_origin(cx.cfg, &req);
        self.vary_origin =
            !cx.cfg.cors_origin.is_empty() && !cx.cfg.cors_origin.iter().any(|o| o == "*");
        let path = req.path.as_str();
        self.openai = openai_shaped(path);
        if req.method == Method::Options && !cx.cfg.cors_origin.is_empty() {
            return self.preflight(cx, &request_id, &req);
        }
        match path {
            "/v1/chat/stream" => match req.method {
                Method::Get | Method::Post => self.stream_request(cx, id, request_id, req),
                _ => self.method_not_allowed(cx, &request_id, &req, "GET, POST"),
            },
            "/v1/chat/completions" => match req.method {
                Method::Post => self.chat_request(cx, id, request_id, req),
                _ => self.method_not_allowed(cx, &request_id, &req, "POST"),
            },
            "/v1/models" => match req.method {
                Method::Get => {
                    let body = openai_api::models_body(&served_model(cx.cfg), unix_now());
                    self.respond(cx, &request_id, v, ka, 200, "application/json", &body, &[]);
                }
                _ => self.method_not_allowed(cx, &request_id, &req, "GET"),
            },
            "/" | "/index.html" => match req.method {
                Method::Get => {
                    let ct = "text/html; charset=utf-8";
                    let page = DEMO_PAGE.as_bytes();
                    self.respond(cx, &request_id, v, ka, 200, ct, page, &[]);
                }
                _ => self.method_not_allowed(cx, &request_id, &req, "GET"),
            },
            "/healthz" | "/readyz" | "/metrics" => match req.method {
                Method::Get => {
                    let which = match path {
                        "/healthz" => Ops::Healthz,
                        "/readyz" => Ops::Readyz,
                        _ => Ops::Metrics,
                    };
                    let (status, ct, body) = cx.svc.ops(which, &req);
                    self.respond(cx, &request_id, v, ka, status, ct, &body, &[]);
                }
                _ => self.method_not_allowed(cx, &request_id, &req, "GET"),
            },
            _ => {
                let msg = format!("no such endpoint: {path}");
                self.respond_error(cx, &request_id, v, ka, 404, "not_found", &msg, &[]);
            }
        }
    }

    /// A CORS preflight: 204, with the CORS headers only for an allowed origin.
    fn preflight(&mut self, cx: &mut Cx, request_id: &str, req: &Request) {
        let (v, ka) = (req.version, req.keep_alive);
        // Allow the headers the browser asks for (SDKs send their own, such
        // as x-stainless-*) when they are plain header names.
        let asked = req
            .header("access-control-request-headers")
            .filter(|h| {
                h.len() <= 1024
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(&b))
            })
            .filter(|h| !h.trim().is_empty())
            .unwrap_or("Content-Type, Authorization, X-Request-Id, Last-Event-ID, Cache-Control");
        let extra: &[(&str, &str)] = if self.cors.is_some() {
            &[
                ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                ("Access-Control-Allow-Headers", asked),
                ("Access-Control-Max-Age", "600"),
                ("Vary", "Access-Control-Request-Headers"),
            ]
        } else {
            &[]
        };
        self.respond(cx, request_id, v, ka, 204, "", &[], extra);
    }

    fn chat_request(&mut self, cx: &mut Cx, id: u64, request_id: String, req: Request) {
        let (v, ka) = (req.version, req.keep_alive);
        let chat = match openai_api::parse(&req.body, cx.cfg.max_tokens_limit) {
            Ok(c) => c,
            Err(msg) => {
                return self.respond_error(cx, &request_id, v, ka, 400, "bad_request", &msg, &[]);
            }
        };
        // --upstream-model replaces the request's model, so name that one.
        let model = cx
            .cfg
            .upstream_model
            .clone()
            .or_else(|| chat.gen.model.clone())
            .unwrap_or_else(|| served_model(cx.cfg));
        let format = Box::new(ChunkFormat::new(id, &model, unix_now(), chat.include_usage));
        let at_once = chat.stream && cx.cfg.no_streaming;
        let flavor = Flavor::OpenAi { format, at_once };
        self.start_stream(
            cx,
            id,
            request_id,
            v,
            ka,
            chat.gen,
            chat.stream && !at_once,
            flavor,
        );
    }

    fn method_not_allowed(&mut self, cx: &mut Cx, request_id: &str, req: &Request, allow: &str) {
        let msg = format!(
            "{} is not allowed on {}; use {allow}",
            req.method_str, req.path
        );
        let extra = [("Allow", allow)];
        let (v, ka) = (req.version, req.keep_alive);
        self.respond_error(
            cx,
            request_id,
            v,
            ka,
            405,
            "method_not_allowed",
            &msg,
            &extra,
        );
    }

    fn stream_request(&mut self, cx: &mut Cx, id: u64, request_id: String, req: Request) {
        let (v, ka) = (req.version, req.keep_alive);
        if req.method == Method::Get && req.header("last-event-id").is_some() {
            // Nothing to resume: stop an EventSource from running the same prompt again.
            return self.respond(cx, &request_id, v, ka, 204, "", &[], &[]);
        }
        let parsed = if req.method == Method::Post {
            api::parse_body(&req.body, cx.cfg.max_tokens_limit)
        } else {
            api::parse_query_request(req.query.as_deref(), cx.cfg.max_tokens_limit)
        };
        let NativeRequest { gen, stream } = match parsed {
            Ok(r) => r,
            Err(msg) => {
                log::debug!("request {request_id}: 400 {msg}");
                return self.respond_error(cx, &request_id, v, ka, 400, "bad_request", &msg, &[]);
            }
        };
        let streaming = stream && !cx.cfg.no_streaming;
        self.start_stream(cx, id, request_id, v, ka, gen, streaming, Flavor::Native);
    }

    /// Admits a stream and sends its head (when streaming), or refuses it.
    #[allow(clippy::too_many_arguments)]
    fn start_stream(
        &mut self,
        cx: &mut Cx,
        id: u64,
        request_id: String,
        v: Version,
        ka: bool,
        gen: GenRequest,
        streaming: bool,
        flavor: Flavor,
    ) {
        let producer = match cx.svc.admit(id, &gen) {
            Ok(p) => p,
            Err(r) => {
                log::debug!("request {request_id}: {} {}", r.status, r.message);
                let extra = [("Retry-After", "1")];
                let extra: &[(&str, &str)] = if r.status == 503 { &extra } else { &[] };
                return self.respond_error(
                    cx,
                    &request_id,
                    v,
                    ka,
                    r.status,
                    r.code,
                    &r.message,
                    extra,
                );
            }
        };
        let now = cx.now;
        let prod = match producer {
            Producer::Sim => Prod::Sim {
                text: SimText::new(&gen.messages, gen.max_tokens, cx.cfg.sim_tokens),
                next_due: now + cx.cfg.sim_ttft(),
            },
            Producer::Pool(sink) => Prod::Pool(sink),
        };
        let prompt_tokens = match prod {
            Prod::Sim { .. } => Some(sim::prompt_tokens(&gen.messages)),
            Prod::Pool(_) => None,
        };
        if streaming {
            let cors = self.cors_headers();
            let cors: Vec<(&str, &str)> = cors.iter().map(|(k, v)| (*k, v.as_str())).collect();
            self.out.append(cx.bufs, |b| {
                response::write_sse_head(b, v, ka, &request_id, &cors);
            });
            if let Flavor::OpenAi { format, .. } = &flavor {
                let chunked = v == Version::Http11;
                self.out.append_chunk(cx.bufs, chunked, |b| format.role(b));
            }
        }
        let line = self.current.take().map(|c| c.0).unwrap_or_default();
        self.state = State::Streaming(Box::new(Stream {
            id,
            request_id,
            line,
            flavor,
            max_tokens: gen.max_tokens,
            version: v,
            keep_alive: ka,
            mode: if streaming {
                Mode::Sse
            } else {
                Mode::Json(String::new())
            },
            prod,
            prompt_tokens,
            parsed_at: now,
            last_event_at: now,
            first_token_at: None,
            last_token_at: None,
            ttft: None,
            tokens: 0,
        }));
        self.pump(cx);
    }

    /// Moves every token that is ready into the output buffer as one chunk,
    /// up to the high-water mark, and ends the stream when its producer is
    /// done.
    fn pump(&mut self, cx: &mut Cx) {
        let State::Streaming(st) = &mut self.state else {
            return;
        };
        let hwm = cx.cfg.high_water();
        let pending = self.out.len();
        if pending >= hwm {
            return;
        }
        let budget = hwm - pending;
        let now = cx.now;
        let itl = cx.cfg.sim_itl();
        let metrics = cx.metrics;
        let mut end = None;
        let tokens_before = st.tokens;
        let max_tokens = st.max_tokens;
        let mut taken = tokens_before;
        let mut cut = false;
        let first_before = tokens_before == 0;
        let chunked = st.chunked();
        let Stream {
            mode,
            flavor,
            prod,
            tokens,
            last_token_at,
            first_token_at,
            last_event_at,
            prompt_tokens,
            ..
        } = &mut **st;
        let mut on_token = |b: &mut Vec<u8>, text: &str| {
            match (&mut *mode, &*flavor) {
                (Mode::Sse, Flavor::Native) => sse::token(b, text),
                (Mode::Sse, Flavor::OpenAi { format, .. }) => format.content(b, text),
                (Mode::Json(all), _) => all.push_str(text),
            }
            *tokens += 1;
            if let Some(prev) = *last_token_at {
                metrics.inter_token.observe(now - prev);
            } else {
                *first_token_at = Some(now);
            }
            *last_token_at = Some(now);
            *last_event_at = now;
        };
        self.out.append_chunk(cx.bufs, chunked, |b| {
            let start = b.len();
            match prod {
                Prod::Sim { text, next_due } => {
                    let mut done = tokens_before;
                    while done < text.total && *next_due <= now && b.len() - start < budget {
                        on_token(b, text.token(done));
                        done += 1;
                        *next_due += itl;
                    }
                    if done == text.total && (done > 0 || *next_due <= now) {
                        end = Some(End::Done {
                            reason: text.finish_reason().into(),
                            prompt_tokens: *prompt_tokens,
                            completion_tokens: None,
                        });
                    }
                }
                Prod::Pool(sink) => sink.take(|piece| match piece {
                    Piece::Token(t) => {
                        if taken >= max_tokens {
                            // The backend goes on past max_tokens: the
                            // answer ends here (this token is not sent).
                            cut = true;
                            end = Some(End::Done {
                                reason: "length".into(),
                                prompt_tokens: None,
                                completion_tokens: None,
                            });
                            return false;
                        }
                        on_token(b, &t);
                        taken += 1;
                        b.len() - start < budget
                    }
                    Piece::Done(f) => {
                        end = Some(End::Done {
                            reason: f.finish_reason,
                            prompt_tokens: f.prompt_tokens,
                            completion_tokens: f.completion_tokens,
                        });
                        false
                    }
                    Piece::Error(e) => {
                        end = Some(End::Error(e));
                        false
                    }
                }),
            }
        });
        let new_tokens = st.tokens as u64;
        if first_before && new_tokens > 0 && matches!(st.mode, Mode::Sse) {
            if let Some((_, t0, _)) = self.ttft_mark {
                // A pipelined stream's first token is still unwritten: count
                // it now (a slight underestimate) rather than lose it.
                cx.metrics.ttft.observe(now - t0);
            }
            self.ttft_mark = Some((self.out.appended_total(), st.parsed_at, st.id));
        }
        if cut {
            if let Prod::Pool(sink) = &st.prod {
                sink.cancel();
                cx.metrics
                    .generations_cancelled
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if let Some(end) = end {
            self.end_stream(cx, end, true);
        }
    }

    /// Ends the running stream (if any) with its terminal event, and moves
    /// the connection on: back to reading, or closing.
    /// `from_producer`: the end came from the generation itself (its last
    /// token, its own error); otherwise the generation is cancelled.
    fn end_stream(&mut self, cx: &mut Cx, end: End, from_producer: bool) {
        let State::Streaming(st) = &self.state else {
            return;
        };
        let now = cx.now;
        let outcome = match &end {
            End::Done { .. } => Outcome::Completed,
            End::Error(e) => Outcome::Errored(e.code),
            End::Disconnected => Outcome::Disconnected,
        };
        if !from_producer {
            if let Prod::Pool(sink) = &st.prod {
                sink.cancel();
            }
            cx.metrics
                .generations_cancelled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let duration = now - st.parsed_at;
        let summary = StreamSummary {
            id: st.id,
            request_id: st.request_id.clone(),
            line: st.line.clone(),
            outcome,
            tokens: st.tokens,
            ttft: st.ttft_estimate(),
            duration,
        };
        let tokens = st.tokens;
        let sid = format!("{:x}", st.id);
        let seq = tokens as u64 + 1;
        let chunked = st.chunked();
        let (version, mut keep_alive) = (st.version, st.keep_alive);
        let request_id = st.request_id.clone();
        let secs = duration.as_secs_f64();
        let tokens_per_s = if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        };
        let ttft_ms = summary.ttft.map(|d| d.as_secs_f64() * 1000.0);
        let State::Streaming(st) = std::mem::replace(&mut self.state, State::Reading) else {
            unreachable!()
        };
        cx.metrics.stream_duration.observe(duration);
        cx.metrics
            .tokens_sent
            .fetch_add(tokens as u64, std::sync::atomic::Ordering::Relaxed);
        cx.svc.stream_ended(&summary);
        let flavor = st.flavor;
        match (st.mode, end) {
            (_, End::Disconnected) => {
                self.state = State::Closed;
                return;
            }
            (
                Mode::Sse,
                End::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                },
            ) => {
                let completion = completion_tokens.unwrap_or(tokens);
                let info = DoneInfo {
                    finish_reason: &reason,
                    prompt_tokens,
                    // The contract: `done` counts the token events sent.
                    completion_tokens: tokens,
                    ttft_ms,
                    tokens_per_s,
                };
                self.out.append_chunk(cx.bufs, chunked, |b| match &flavor {
                    Flavor::Native => sse::done(b, &sid, seq, &info),
                    Flavor::OpenAi { format, .. } => {
                        format.finish(b, &reason, prompt_tokens, completion)
                    }
                });
            }
            (Mode::Sse, End::Error(e)) => {
                self.out.append_chunk(cx.bufs, chunked, |b| match &flavor {
                    Flavor::Native => sse::error(b, &sid, seq, &e),
                    Flavor::OpenAi { format, .. } => format.error(b, &e),
                });
                if matches!(e.code, ErrorCode::SlowConsumer | ErrorCode::ShuttingDown) {
                    keep_alive = false;
                }
                if e.code == ErrorCode::SlowConsumer {
                    // Best effort: the client is not reading.
                    if chunked {
                        self.out.append_last_chunk(cx.bufs);
                    }
                    self.state = State::Closing {
                        until: now + SLOW_CONSUMER_GRACE,
                    };
                    return;
                }
            }
            (
                Mode::Json(text),
                End::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                },
            ) => {
                let info = DoneInfo {
                    finish_reason: &reason,
                    prompt_tokens,
                    completion_tokens: tokens,
                    ttft_ms,
                    tokens_per_s,
                };
                let mut body = Vec::with_capacity(text.len() + 256);
                // OpenAI usage is the backend's own count when it has one.
                let completion = completion_tokens.unwrap_or(tokens);
                let content_type = match &flavor {
                    Flavor::Native => {
                        body.extend_from_slice(b"{\"text\":");
                        let _ = serde_json::to_writer(&mut body, &text);
                        body.push(b',');
                        let mut rest = Vec::new();
                        sse::done_json(&mut rest, &info);
                        body.extend_from_slice(&rest[1..]);
                        "application/json"
                    }
                    Flavor::OpenAi {
                        format,
                        at_once: false,
                    } => {
                        format.completion(&mut body, &text, &reason, prompt_tokens, completion);
                        "application/json"
                    }
                    Flavor::OpenAi {
                        format,
                        at_once: true,
                    } => {
                        format.whole(&mut body, &text, &reason);
                        format.usage_and_done(&mut body, prompt_tokens, completion);
                        "text/event-stream"
                    }
                };
                self.respond(
                    cx,
                    &request_id,
                    version,
                    keep_alive,
                    200,
                    content_type,
                    &body,
                    &[],
                );
                return;
            }
            (Mode::Json(_), End::Error(e)) => {
                let status = match e.code {
                    ErrorCode::UpstreamUnavailable | ErrorCode::UpstreamError => 502,
                    ErrorCode::UpstreamTimeout | ErrorCode::DeadlineExceeded => 504,
                    ErrorCode::Overloaded | ErrorCode::ShuttingDown => 503,
                    ErrorCode::SlowConsumer | ErrorCode::Internal => 500,
                };
                let ka = keep_alive && e.code != ErrorCode::SlowConsumer;
                self.respond_error(
                    cx,
                    &request_id,
                    version,
                    ka,
                    status,
                    e.code.as_str(),
                    &e.message,
                    &[],
                );
                return;
            }
        }
        if chunked {
            self.out.append_last_chunk(cx.bufs);
        }
        self.finish_response(cx, version, keep_alive && chunked);
    }

    /// The CORS headers of the current request's response (none when CORS
    /// is off or the origin is not allowed).
    fn cors_headers(&self) -> Vec<(&'static str, String)> {
        match &self.cors {
            Some(origin) => vec![
                ("Access-Control-Allow-Origin", origin.to_string()),
                ("Vary", "Origin".into()),
                ("Access-Control-Expose-Headers", "X-Request-Id".into()),
            ],
            None if self.vary_origin => vec![("Vary", "Origin".into())],
            None => Vec::new(),
        }
    }

    /// After a whole response: read the next request, or close.
    fn finish_response(&mut self, cx: &mut Cx, _version: Version, keep_alive: bool) {
        self.served += 1;
        self.read_since = cx.now;
        self.openai = false;
        self.cors = None;
        self.input_full = false;
        if keep_alive {
            self.state = State::Reading;
            if !self.inbuf.is_empty() {
                // process_input starts the header timeout only for a
                // request that is really incomplete.
                self.process_input(cx, &[]);
            }
        } else {
            self.state = State::Closing {
                until: cx.now + cx.cfg.write_timeout(),
            };
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        &mut self,
        cx: &mut Cx,
        request_id: &str,
        version: Version,
        keep_alive: bool,
        status: u16,
        content_type: &str,
        body: &[u8],
        extra: &[(&str, &str)],
    ) {
        if status >= 400 {
            cx.metrics.refused(status);
        }
        let current = self.current.take();
        cx.svc.responded(&Access {
            line: current.as_deref().map(|(l, _)| l),
            status,
            request_id,
            duration: current.as_ref().map_or(Duration::ZERO, |c| cx.now - c.1),
        });
        let cors = self.cors_headers();
        let mut headers: Vec<(&str, &str)> = cors.iter().map(|(k, v)| (*k, v.as_str())).collect();
        headers.extend_from_slice(extra);
        let head = Head {
            status,
            content_type: (!content_type.is_empty()).then_some(content_type),
            body: Body::Length(body.len()),
            version,
            keep_alive,
            request_id,
            extra: &headers,
        };
        self.out.append(cx.bufs, |b| {
            if status == 204 {
                response::write_head(
                    b,
                    &Head {
                        body: Body::Empty,
                        ..head
                    },
                );
            } else {
                response::write_full(b, head, body)
            }
        });
        self.finish_response(cx, version, keep_alive);
    }

    #[allow(clippy::too_many_arguments)]
    fn respond_error(
        &mut self,
        cx: &mut Cx,
        request_id: &str,
        version: Version,
        keep_alive: bool,
        status: u16,
        code: &str,
        message: &str,
        extra: &[(&str, &str)],
    ) {
        let body = if self.openai {
            openai_api::error_body(status, code, message)
        } else {
            response::error_body(code, message)
        };
        self.respond(
            cx,
            request_id,
            version,
            keep_alive,
            status,
            "application/json",
            &body,
            extra,
        );
    }
}

/// The client has accepted no byte for `--write-timeout-ms` since
/// `blocked_since` (counted as a timed-out connection).
fn write_stalled(blocked_since: Option<Instant>, cx: &Cx) -> bool {
    let stalled = blocked_since.is_some_and(|t| cx.now >= t + cx.cfg.write_timeout());
    if stalled {
        cx.metrics
            .connections_timed_out
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    stalled
}

/// The demo page served at `GET /`.
const DEMO_PAGE: &str = include_str!("demo.html");

/// Whether refusals on `path` take OpenAI's error shape.
fn openai_shaped(path: &str) -> bool {
    path.starts_with("/v1/") && path != "/v1/chat/stream"
}

/// The model name `/v1/models` lists and responses carry by default.
fn served_model(cfg: &Config) -> String {
    match (&cfg.upstream_model, cfg.backend) {
        (Some(m), _) => m.clone(),
        (None, crate::config::BackendKind::Openai) => "upstream".into(),
        (None, _) => "sluice-sim".into(),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `Access-Control-Allow-Origin` for this request, if `--cors-origin` allows its `Origin`.
fn cors_origin(cfg: &Config, req: &Request) -> Option<Box<str>> {
    allowed_origin(cfg, req.header("origin")?)
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
    let path = req.path?.split('?').next().unwrap_or_default().to_string();
    let origin = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("origin"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned());
    let method = req.method.unwrap_or("-").to_string();
    Some((ReqLine { method, path }, origin))
}

fn allowed_origin(cfg: &Config, origin: &str) -> Option<Box<str>> {
    if cfg.cors_origin.is_empty() {
        return None;
    }
    if cfg.cors_origin.iter().any(|o| o == "*") {
        return Some("*".into());
    }
    cfg.cors_origin
        .iter()
        .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin))
        .then(|| origin.into())
}

enum End {
    Done {
        reason: String,
        prompt_tokens: Option<u32>,
        /// The backend's own count, when it has one.
        completion_tokens: Option<u32>,
    },
    Error(StreamError),
    Disconnected,
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
