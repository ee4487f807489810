//! One generation, owned by the loop's stream table, not by a connection.
//!
//! A [`Stream`] holds its producer (the simulated model, paced by the
//! stream's own deadline, or a job on the worker pool), numbers its events
//! (`seq`: 1 for the first token, tokens + 1 for the terminal event),
//! decides its terminal event exactly once, keeps its own accounting, and
//! passes every piece of text through an ordered chain of [`Stage`]s before
//! its encoder (chosen once, at admission, for the request's wire shape).
//! A connection *attaches* to a stream as its subscriber; when it leaves,
//! [`Stream::handle_detach`] decides what follows: the generation is
//! cancelled, or — for a resumable stream (`--resume-window-ms`) — it keeps
//! running into its [`ReplayLog`] for the window, so a client that
//! reconnects with the last id it saw gets every later event once.
//!
//! The stream does no I/O and keeps no clock: the engine passes `now` and
//! the buffer the encoded bytes go to (the subscriber connection's output,
//! or a scratch buffer while detached). Its times are nanoseconds since the
//! loop's epoch ([`StreamCx::now_ns`]): the paced path compares and adds
//! integers instead of doing `Instant` arithmetic. States and who moves them:
//! `LIFECYCLE.md` beside this file.

mod relay;
mod replay;
mod sid;
mod stage;

pub use relay::Shipped;
pub use replay::ReplayLog;
pub use sid::{loop_of_sid, random_sid, sid_for_loop, MAX_LOOPS};
pub use stage::Stage;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use slab::Slab;

use crate::backend::sim::SimText;
use crate::backend::{Finish, GenRequest};
use crate::config::Config;
use crate::conn::ReqLine;
use crate::encode::{Encoder, Summary};
use crate::metrics::Metrics;
use crate::pool::{Piece, TokenSink};
use crate::sse::{self, ErrorCode, StreamError};

/// What produces an admitted stream's tokens.
pub enum Producer {
    /// The simulated model, paced by the stream's deadline.
    Sim,
    /// A generation queued on the worker pool.
    Pool(Arc<TokenSink>),
    /// Another instance's stream, read back from the shared resume store:
    /// its encoded events arrive as tokens, its terminal event as a delta
    /// (see [`Stream::relay`]).
    Relay(Arc<TokenSink>),
}

enum Prod {
    /// `next_due`: nanoseconds since the loop's epoch.
    Sim {
        text: SimText,
        next_due: u64,
    },
    Pool(Arc<TokenSink>),
    Relay(Arc<TokenSink>),
}

/// A stream's place in the table: its slab key and its never-reused id.
/// Work that comes back for a stream (a timer, a worker's pieces) names
/// both, so a reused slot is never taken for the stream that left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamRef {
    pub key: usize,
    pub id: u64,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Errored(ErrorCode),
    Disconnected,
}

/// One finished stream, for metrics and the access log.
#[derive(Debug, Clone)]
pub struct StreamSummary {
    pub id: u64,
    /// The id clients see.
    pub sid: Box<str>,
    pub request_id: String,
    pub line: ReqLine,
    pub outcome: Outcome,
    pub tokens: u32,
    pub ttft: Option<Duration>,
    pub duration: Duration,
    /// Who started the stream (with API keys on).
    pub principal: Option<Box<str>>,
}

/// Why a stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Done(Finish),
    Error(StreamError),
    /// The subscriber left (or its resume window ran out) and the
    /// generation was cancelled.
    Disconnected,
}

/// What [`Stream::handle_detach`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// The generation is cancelled: end the stream as disconnected.
    Cancel,
    /// The stream goes on into its replay log until this moment
    /// (nanoseconds since the loop's epoch).
    Keep(u64),
}

/// What a stream did in one call, for the engine.
#[derive(Debug, Default)]
pub struct Progress {
    /// The first token event was just encoded.
    pub first_token: bool,
    /// The stream has ended this way; call [`Stream::finish`]. (Boxed: a
    /// paced token's `Progress` stays two words, returned in registers.)
    pub end: Option<Box<End>>,
    /// Detached, its replay log is full: the engine cancels it.
    pub log_full: bool,
}

/// What a stream is given besides its input.
pub struct StreamCx<'a> {
    /// Now, in nanoseconds since the loop's epoch (the clock every time
    /// a stream keeps is counted on).
    pub now_ns: u64,
    pub cfg: &'a Config,
    pub metrics: &'a Metrics,
}

/// Everything a new stream is given at admission.
pub struct Admission {
    pub id: u64,
    /// The id clients see.
    pub sid: Box<str>,
    pub request_id: String,
    pub line: ReqLine,
    pub encoder: Box<dyn Encoder>,
    /// The connection that asked: its slab key and serial.
    pub conn: (usize, u32),
    /// Resumable, with a replay log of at most this many bytes.
    pub replay: Option<usize>,
}

/// One generation.
pub struct Stream {
    id: u64,
    /// The id as clients see it (`X-Stream-Id`, `id:` lines).
    sid: Box<str>,
    /// The request's id when the client chose one (else it is `sid`).
    request_id: Option<Box<str>>,
    line: ReqLine,
    /// The most tokens relayed: a backend that goes on is cut off here.
    max_tokens: u32,
    prod: Prod,
    prompt_tokens: Option<u32>,
    // Times in nanoseconds since the loop's epoch; `NEVER` for none.
    parsed_at: u64,
    last_event_at: u64,
    first_token_at: u64,
    last_token_at: u64,
    /// Request parsed → first token's bytes accepted by the socket.
    ttft_ns: u64,
    /// Pieces of text taken from the producer (what `max_tokens` limits).
    produced: u32,
    /// Token events encoded (what `seq` counts).
    tokens: u32,
    stages: Vec<Box<dyn Stage>>,
    encoder: Box<dyn Encoder>,
    /// The attached connection (slab key, serial).
    sub: Option<(usize, u32)>,
    /// The events so far, for a client that resumes (resumable streams only).
    log: Option<Box<ReplayLog>>,
    /// Detached: kept until then; ended and resumable: kept until then
    /// (`NEVER`: not kept).
    keep_until: u64,
    peer: Option<SocketAddr>,
    /// Who started the stream: only they may resume or stop it.
    principal: Option<Box<str>>,
    ended: bool,
    /// `encoder.streaming()`, asked once.
    streaming: bool,
    /// What the shared resume store has of this stream.
    stored: Stored,
    /// A client resumed it on another instance (it is not detached).
    remote_sub: bool,
    /// A relay waiting for the store to say whether the stream exists.
    awaiting: bool,
    /// The engine's note: its timer was armed while its subscriber had no
    /// room (so without the next simulated token).
    timer_roomless: bool,
}

/// A stream's place in the shared resume store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// Not stored there (no store, or not resumable).
    No,
    /// Every event up to this seq was handed to the store.
    Upto(u32),
    /// Events were lost on the way: not resumable elsewhere.
    Broken,
    /// The store was told the stream is over.
    Done,
}

impl Stream {
    /// A stream for `gen`, produced by `producer`, attached to the
    /// connection that asked.
    pub fn new(cx: &StreamCx, a: Admission, gen: &GenRequest, producer: Producer) -> Stream {
        let (prod, prompt_tokens) = match producer {
            Producer::Sim => {
                let (text, prompt_tokens) =
                    SimText::answer(&gen.messages, gen.max_tokens, cx.cfg.sim_tokens);
                let next_due = cx.now_ns.saturating_add(ms_ns(cx.cfg.sim_ttft_ms));
                (Prod::Sim { text, next_due }, Some(prompt_tokens))
            }
            Producer::Pool(sink) => (Prod::Pool(sink), None),
            Producer::Relay(sink) => (Prod::Relay(sink), None),
        };
        let streaming = a.encoder.streaming();
        Stream {
            id: a.id,
            request_id: (a.request_id != *a.sid).then(|| a.request_id.into()),
            sid: a.sid,
            line: a.line,
            max_tokens: gen.max_tokens,
            prod,
            prompt_tokens,
            parsed_at: cx.now_ns,
            last_event_at: cx.now_ns,
            first_token_at: NEVER,
            last_token_at: NEVER,
            ttft_ns: NEVER,
            produced: 0,
            tokens: 0,
            stages: Vec::new(),
            encoder: a.encoder,
            sub: Some(a.conn),
            log: a.replay.map(|limit| Box::new(ReplayLog::new(limit))),
            keep_until: NEVER,
            peer: None,
            principal: None,
            ended: false,
            streaming,
            stored: Stored::No,
            remote_sub: false,
            awaiting: false,
            timer_roomless: false,
        }
    }

    /// Whether its timer was armed while its subscriber had no room.
    pub fn timer_roomless(&self) -> bool {
        self.timer_roomless
    }

    pub fn set_timer_roomless(&mut self, roomless: bool) {
        self.timer_roomless = roomless;
    }

    /// Adds a stage at the end of the chain (closest to the encoder).
    pub fn push_stage(&mut self, stage: Box<dyn Stage>) {
        self.stages.push(stage);
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The id clients see.
    pub fn sid(&self) -> &str {
        &self.sid
    }

    pub fn request_id(&self) -> &str {
        self.request_id.as_deref().unwrap_or(&self.sid)
    }

    /// The attached connection (slab key, serial).
    pub fn subscriber(&self) -> Option<(usize, u32)> {
        self.sub
    }

    /// Produced by the simulated model (its tokens come due by its timer).
    pub fn is_simulated(&self) -> bool {
        matches!(self.prod, Prod::Sim { .. })
    }

    /// Sends events as they happen (rather than one answer at the end).
    pub fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// The `Content-Type` of the answer.
    pub fn content_type(&self) -> &'static str {
        self.encoder.content_type()
    }

    /// A client may resume it (`--resume-window-ms`, native SSE).
    pub fn is_resumable(&self) -> bool {
        self.log.is_some()
    }

    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Bytes its replay log holds.
    pub fn log_bytes(&self) -> usize {
        self.log.as_ref().map_or(0, |l| l.len())
    }

    /// When a detached stream's window, or an ended one's retention, ends
    /// (nanoseconds since the loop's epoch).
    pub fn keep_until(&self) -> Option<u64> {
        (self.keep_until != NEVER).then_some(self.keep_until)
    }

    /// The bytes that open a streaming body: OpenAI's role chunk, and for a
    /// resumable stream the reconnection delay its `EventSource` should use.
    pub fn open(&mut self, buf: &mut Vec<u8>) {
        if self.log.is_some() {
            buf.extend_from_slice(b"retry: 1000\n\n");
        }
        self.encoder.open(buf);
    }

    /// When the request was parsed (TTFT counts from here), in
    /// nanoseconds since the loop's epoch.
    pub fn parsed_at(&self) -> u64 {
        self.parsed_at
    }

    /// The client that started the stream, for the access log.
    pub fn set_peer(&mut self, peer: Option<SocketAddr>) {
        self.peer = peer;
    }

    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Who started the stream (with API keys on).
    pub fn set_principal(&mut self, principal: Option<Box<str>>) {
        self.principal = principal;
    }

    pub fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    /// The first token's bytes were accepted by the client's socket
    /// (`ns` after the request was parsed).
    pub fn set_ttft(&mut self, ns: u64) {
        self.ttft_ns = ns;
    }

    fn ttft_estimate(&self) -> Option<Duration> {
        if self.ttft_ns != NEVER {
            Some(Duration::from_nanos(self.ttft_ns))
        } else if self.first_token_at != NEVER {
            Some(Duration::from_nanos(
                self.first_token_at.saturating_sub(self.parsed_at),
            ))
        } else {
            None
        }
    }

    /// When the stream's timer has something to do (tokens due, a
    /// heartbeat, its time limit, the end of its resume window or of its
    /// retention). `room`: the subscriber can take more bytes (a simulated
    /// token due while it cannot waits for [`Stream::pump`], not for a
    /// deadline).
    pub fn next_deadline(&self, cfg: &Config, room: bool) -> Option<u64> {
        if self.ended {
            return self.keep_until();
        }
        let limit = self.time_limit(cfg);
        Some(self.next_wake(cfg, room).min(limit))
    }

    /// When the stream's time limit (`--max-stream-ms`) runs out.
    pub fn time_limit(&self, cfg: &Config) -> u64 {
        self.parsed_at.saturating_add(ms_ns(cfg.max_stream_ms))
    }

    /// [`Stream::next_deadline`] of a stream not ended, without its time
    /// limit (which never moves: the engine keeps it). `NEVER`: only the
    /// time limit.
    #[inline(always)]
    pub fn next_wake(&self, cfg: &Config, room: bool) -> u64 {
        let mut d = self.keep_until;
        // No heartbeat while a relay waits for the store (its head is not
        // out): only its time limit can wake it.
        if self.streaming && self.sub.is_some() && !self.awaiting {
            d = d.min(self.last_event_at.saturating_add(ms_ns(cfg.heartbeat_ms)));
        }
        if let Prod::Sim { text, next_due } = &self.prod {
            if self.produced <= text.total && room {
                d = d.min(*next_due);
            }
        }
        d
    }

    /// Moves every piece of text that is ready through the stages and the
    /// encoder into `buf`, up to `budget` bytes; notices the producer's end.
    /// Detached, `buf` is scratch: what counts is the replay log.
    #[inline]
    pub fn pump(&mut self, cx: &StreamCx, buf: &mut Vec<u8>, budget: usize) -> Progress {
        if !self.ended
            && self.sub.is_some()
            && self.log.is_none()
            && self.stages.is_empty()
            && matches!(self.prod, Prod::Sim { .. })
        {
            return self.pump_sim(cx, buf, budget);
        }
        self.pump_any(cx, buf, budget)
    }

    /// [`Stream::pump`] of every other case: stages, a replay log, detached,
    /// a pool job or a relay.
    #[inline(never)]
    fn pump_any(&mut self, cx: &StreamCx, buf: &mut Vec<u8>, budget: usize) -> Progress {
        let mut progress = Progress::default();
        if self.ended || (self.sub.is_none() && self.log.is_none()) {
            return progress;
        }
        let start = buf.len();
        let first_before = self.tokens == 0;
        let now = cx.now_ns;
        let itl = ms_ns(cx.cfg.sim_itl_ms);
        let detached = self.sub.is_none() && !self.remote_sub;
        let Stream {
            prod,
            stages,
            encoder,
            log,
            sid,
            tokens,
            produced,
            max_tokens,
            last_token_at,
            first_token_at,
            last_event_at,
            prompt_tokens,
            ..
        } = self;
        // One token event: encoded, logged when resumable, timed. `delta`:
        // a choice's other fields (tool calls and the like) instead: no
        // token, no seq; only the OpenAI shapes carry them.
        let mut token_out =
            |b: &mut Vec<u8>, log: &mut Option<Box<ReplayLog>>, t: &str, delta: bool| {
                if delta {
                    encoder.delta(b, t);
                    *last_event_at = now;
                    return;
                }
                if t.is_empty() {
                    return;
                }
                *tokens += 1;
                let seq = u64::from(*tokens);
                let at = b.len();
                encoder.token(b, log.is_some().then_some((&**sid, seq)), t);
                if let Some(log) = log.as_mut() {
                    log.push(seq, &b[at..]);
                }
                if *last_token_at != NEVER {
                    cx.metrics
                        .inter_token
                        .observe_ns(now.saturating_sub(*last_token_at));
                } else {
                    *first_token_at = now;
                }
                *last_token_at = now;
                *last_event_at = now;
            };
        // Without stages, text goes straight to the encoder (no dynamic
        // call per token).
        let mut emit =
            |b: &mut Vec<u8>, log: &mut Option<Box<ReplayLog>>, text: &str, delta: bool| {
                if delta || stages.is_empty() {
                    token_out(b, log, text, delta);
                } else {
                    stage::run(stages, text, &mut |t: &str| token_out(b, log, t, false));
                }
            };
        // Detached, the replay log's room is the budget.
        let full = |b: &Vec<u8>, log: &Option<Box<ReplayLog>>| {
            if detached {
                log.as_ref().is_none_or(|l| !l.has_room(256))
            } else {
                b.len() - start >= budget
            }
        };
        let mut end = None;
        let mut cut = false;
        match prod {
            Prod::Sim { text, next_due } => {
                while *produced < text.total && *next_due <= now && !full(buf, log) {
                    emit(buf, log, text.token(*produced), false);
                    *produced += 1;
                    *next_due = next_due.saturating_add(itl);
                }
                if *produced == text.total && (*produced > 0 || *next_due <= now) {
                    end = Some(End::Done(Finish {
                        finish_reason: text.finish_reason().into(),
                        prompt_tokens: *prompt_tokens,
                        completion_tokens: None,
                    }));
                }
            }
            Prod::Relay(sink) => sink.take(|piece| match piece {
                // Events already encoded by their owner: as they are.
                Piece::Token(raw) => {
                    buf.extend_from_slice(raw.as_bytes());
                    *tokens += 1;
                    *last_event_at = now;
                    !full(buf, log)
                }
                Piece::Delta(raw) => {
                    buf.extend_from_slice(raw.as_bytes());
                    true
                }
                Piece::Done(f) => {
                    end = Some(End::Done(f));
                    false
                }
                Piece::Error(e) => {
                    end = Some(End::Error(e));
                    false
                }
            }),
            Prod::Pool(sink) => sink.take(|piece| match piece {
                Piece::Token(t) => {
                    if *produced >= *max_tokens {
                        // The backend goes on past max_tokens: the answer
                        // ends here (this piece is not sent).
                        cut = true;
                        end = Some(End::Done(Finish {
                            finish_reason: "length".into(),
                            prompt_tokens: None,
                            completion_tokens: None,
                        }));
                        return false;
                    }
                    emit(buf, log, t, false);
                    *produced += 1;
                    !full(buf, log)
                }
                Piece::Delta(raw) => {
                    emit(buf, log, raw, true);
                    !full(buf, log)
                }
                Piece::Done(f) => {
                    end = Some(End::Done(f));
                    false
                }
                Piece::Error(e) => {
                    end = Some(End::Error(e));
                    false
                }
            }),
        }
        if cut {
            if let Prod::Pool(sink) = &self.prod {
                sink.cancel();
                cx.metrics.generations_cancelled.fetch_add(1, Relaxed);
            }
        }
        progress.log_full = detached && end.is_none() && full(buf, &self.log);
        progress.first_token =
            first_before && self.tokens > 0 && self.is_streaming() && !detached && !self.is_relay();
        progress.end = end.map(Box::new);
        progress
    }

    /// [`Stream::pump`] of the paced path: the simulated model, attached,
    /// with no stage and no replay log. Each due token goes straight to the
    /// encoder (the general loop's closures for stages and logs cost more
    /// than the token itself).
    #[inline]
    fn pump_sim(&mut self, cx: &StreamCx, buf: &mut Vec<u8>, budget: usize) -> Progress {
        let Prod::Sim { text, next_due } = &mut self.prod else {
            return Progress::default();
        };
        let now = cx.now_ns;
        let first_before = self.tokens == 0;
        let start = buf.len();
        if *next_due <= now {
            let itl = ms_ns(cx.cfg.sim_itl_ms);
            while self.produced < text.total && *next_due <= now && buf.len() - start < budget {
                let t = text.token(self.produced);
                self.produced += 1;
                *next_due = next_due.saturating_add(itl);
                if t.is_empty() {
                    continue;
                }
                self.tokens += 1;
                self.encoder.token(buf, None, t);
                if self.last_token_at != NEVER {
                    cx.metrics
                        .inter_token
                        .observe_ns(now.saturating_sub(self.last_token_at));
                } else {
                    self.first_token_at = now;
                }
                self.last_token_at = now;
                self.last_event_at = now;
            }
        }
        let mut progress = Progress {
            first_token: first_before && self.tokens > 0 && self.streaming,
            ..Progress::default()
        };
        if self.produced == text.total && (self.produced > 0 || *next_due <= now) {
            progress.end = Some(Box::new(End::Done(Finish {
                finish_reason: text.finish_reason().into(),
                prompt_tokens: self.prompt_tokens,
                completion_tokens: None,
            })));
        }
        progress
    }

    /// The stream's time limit has passed (`deadline_exceeded`), or its
    /// resume window ran out while detached (cancelled, as a disconnect).
    pub fn expired(&self, cx: &StreamCx) -> Option<End> {
        if self.ended {
            return None;
        }
        if self.sub.is_none() && cx.now_ns >= self.keep_until {
            return Some(End::Disconnected);
        }
        if cx.now_ns < self.time_limit(cx.cfg) {
            return None;
        }
        let msg = format!("the stream ran longer than {} ms", cx.cfg.max_stream_ms);
        Some(End::Error(StreamError::new(
            ErrorCode::DeadlineExceeded,
            msg,
        )))
    }

    /// An ended stream's retention is over: take it out of the table.
    pub fn retention_over(&self, now_ns: u64) -> bool {
        self.ended && (self.keep_until == NEVER || now_ns >= self.keep_until)
    }

    /// Whether nothing else was sent for `--heartbeat-ms`.
    pub fn heartbeat_due(&self, cx: &StreamCx) -> bool {
        // An event just went out (the usual case after a pump): not due,
        // without the time arithmetic.
        if self.last_event_at == cx.now_ns && cx.cfg.heartbeat_ms > 0 {
            return false;
        }
        !self.ended
            && self.sub.is_some()
            && !self.awaiting
            && self.is_streaming()
            && cx.now_ns
                >= self
                    .last_event_at
                    .saturating_add(ms_ns(cx.cfg.heartbeat_ms))
    }

    /// A heartbeat, when nothing else was sent for `--heartbeat-ms`.
    pub fn heartbeat_if_due(&mut self, cx: &StreamCx, buf: &mut Vec<u8>) {
        if !self.heartbeat_due(cx) {
            return;
        }
        let phase = match &self.prod {
            Prod::Pool(s) if s.started_at().is_none() => "queued",
            _ => "generating",
        };
        self.last_event_at = cx.now_ns;
        self.encoder.heartbeat(buf, phase);
        cx.metrics.heartbeats_sent.fetch_add(1, Relaxed);
    }

    /// The subscriber left. The policy lives here: a resumable stream
    /// keeps going into its log for `window` (an ended one stays until its
    /// retention ends); any other is cancelled at once.
    pub fn handle_detach(&mut self, now_ns: u64, window: Duration) -> Detach {
        self.sub = None;
        if self.log.is_none() || window.is_zero() {
            return Detach::Cancel;
        }
        if !self.ended && !self.remote_sub {
            self.keep_until = now_ns.saturating_add(duration_ns(window));
        }
        Detach::Keep(self.keep_until().unwrap_or(now_ns))
    }

    /// Whether a client may resume after event `after`: every later event
    /// is still in the log.
    pub fn can_resume_after(&self, after: u64) -> bool {
        self.log.as_ref().is_some_and(|l| l.covers(after))
    }

    /// Attaches a resuming client: the stream's events after `after` go
    /// into `buf`; the previous subscriber, if any, is returned (it gets
    /// [`Stream::supersede`]). How many events were replayed.
    pub fn attach(&mut self, conn: (usize, u32), after: u64, buf: &mut Vec<u8>) -> u64 {
        if !self.ended {
            self.sub = Some(conn);
            self.keep_until = NEVER;
            // A client following it from another instance is superseded.
            self.remote_sub = false;
        }
        buf.extend_from_slice(b"retry: 1000\n\n");
        self.log.as_ref().map_or(0, |l| l.replay_after(after, buf))
    }

    /// The last words to a subscriber another client replaced: an `error`
    /// `superseded` event (no `id:`: it is not the stream's end).
    pub fn supersede(buf: &mut Vec<u8>) {
        let e = StreamError::new(ErrorCode::Superseded, "another client resumed this stream");
        buf.extend_from_slice(b"event: error\ndata: ");
        sse::error_json(buf, &e);
        buf.extend_from_slice(b"\n\n");
    }

    /// Drops the replay log's oldest events down to `target` bytes (an
    /// attached stream over its, or the process's, limit).
    pub fn trim_log(&mut self, target: usize) {
        if let Some(l) = self.log.as_mut() {
            l.trim_to(target);
        }
    }

    /// Ends the stream: flushes the stages, writes the terminal event into
    /// `buf` (none for [`End::Disconnected`]), cancels the producer unless
    /// the end came from it (`from_producer`: its last piece, its own
    /// error), and accounts for it. A resumable stream keeps its log
    /// `retain` longer (see [`Stream::retention_over`]). Called once; later
    /// calls return `None`.
    pub fn finish(
        &mut self,
        cx: &StreamCx,
        end: End,
        from_producer: bool,
        retain: Duration,
        buf: &mut Vec<u8>,
    ) -> Option<StreamSummary> {
        if self.ended {
            return None;
        }
        self.ended = true;
        let now = cx.now_ns;
        if !from_producer {
            if let Prod::Pool(sink) | Prod::Relay(sink) = &self.prod {
                sink.cancel();
            }
            cx.metrics.generations_cancelled.fetch_add(1, Relaxed);
        }
        let terminal = !matches!(end, End::Disconnected);
        // Text a stage still holds is the answer's too.
        if terminal {
            let Stream {
                stages,
                encoder,
                tokens,
                log,
                sid,
                ..
            } = self;
            stage::flush(stages, &mut |t: &str| {
                if !t.is_empty() {
                    *tokens += 1;
                    let seq = u64::from(*tokens);
                    let at = buf.len();
                    encoder.token(buf, log.is_some().then_some((&**sid, seq)), t);
                    if let Some(log) = log.as_mut() {
                        log.push(seq, &buf[at..]);
                    }
                }
            });
        }
        let duration = Duration::from_nanos(now.saturating_sub(self.parsed_at));
        let ttft = self.ttft_estimate();
        // A relay's own error (not its owner's end) names the last event
        // it delivered: a client reconnecting with that id misses nothing.
        let seq = self.tokens as u64 + u64::from(!self.is_relay());
        let outcome = match &end {
            End::Done(_) => Outcome::Completed,
            End::Error(e) => Outcome::Errored(e.code),
            End::Disconnected => Outcome::Disconnected,
        };
        let at = buf.len();
        let id = (&*self.sid, seq);
        match &end {
            // A relay's terminal event came from its owner, as it was.
            End::Done(_) if self.is_relay() => {}
            End::Done(f) => {
                let secs = duration.as_secs_f64();
                let summary = Summary {
                    finish_reason: &f.finish_reason,
                    prompt_tokens: f.prompt_tokens.or(self.prompt_tokens),
                    tokens: self.tokens,
                    backend_completion_tokens: f.completion_tokens,
                    ttft_ms: ttft.map(|d| d.as_secs_f64() * 1000.0),
                    tokens_per_s: if secs > 0.0 {
                        self.tokens as f64 / secs
                    } else {
                        0.0
                    },
                };
                self.encoder.done(buf, id, &summary);
            }
            // A relay replaced by a client elsewhere: as a local one is.
            End::Error(e) if self.is_relay() && e.code == ErrorCode::Superseded => {
                Stream::supersede(buf)
            }
            End::Error(e) => self.encoder.error(buf, id, e),
            End::Disconnected => {}
        }
        match self.log.as_mut() {
            Some(log) if terminal && !retain.is_zero() => {
                log.push(seq, &buf[at..]);
                self.keep_until = now.saturating_add(duration_ns(retain));
            }
            _ => {
                self.log = None;
                self.keep_until = NEVER;
            }
        }
        // The engine took the subscriber before; an ended stream has none
        // (a client resuming it gets the log and the end at once).
        self.sub = None;
        cx.metrics.stream_duration.observe(duration);
        cx.metrics
            .tokens_sent
            .fetch_add(self.tokens as u64, Relaxed);
        Some(StreamSummary {
            id: self.id,
            sid: self.sid.clone(),
            request_id: self.request_id().to_string(),
            line: std::mem::take(&mut self.line),
            outcome,
            tokens: self.tokens,
            ttft,
            duration,
            principal: self.principal.clone(),
        })
    }
}

/// A time that never comes (no such moment: no first token yet, not kept).
pub const NEVER: u64 = u64::MAX;

/// Milliseconds (a flag's value) in nanoseconds.
#[inline]
pub fn ms_ns(ms: u64) -> u64 {
    ms.saturating_mul(1_000_000)
}

/// A duration in nanoseconds (saturating).
pub fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The loop's streams: a slab, and ids that are never reused.
#[derive(Default)]
pub struct StreamTable {
    slab: Slab<Stream>,
}

impl StreamTable {
    /// The key the next [`StreamTable::insert`] will use.
    pub fn vacant_key(&self) -> usize {
        self.slab.vacant_key()
    }

    pub fn insert(&mut self, s: Stream) -> StreamRef {
        let id = s.id;
        StreamRef {
            key: self.slab.insert(s),
            id,
        }
    }

    /// The stream `r` names, if it is still there.
    pub fn get_mut(&mut self, r: StreamRef) -> Option<&mut Stream> {
        self.slab.get_mut(r.key).filter(|s| s.id == r.id)
    }

    pub fn get(&self, r: StreamRef) -> Option<&Stream> {
        self.slab.get(r.key).filter(|s| s.id == r.id)
    }

    /// The stream in slot `key`, whatever its id.
    pub fn by_key(&self, key: usize) -> Option<&Stream> {
        self.slab.get(key)
    }

    pub fn remove(&mut self, r: StreamRef) -> Option<Stream> {
        self.get(r)?;
        Some(self.slab.remove(r.key))
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Every stream, for shutdown.
    pub fn refs(&self) -> Vec<StreamRef> {
        self.slab
            .iter()
            .map(|(key, s)| StreamRef { key, id: s.id })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Message;
    use crate::encode::NativeSse;

    fn gen(prompt: &str, max_tokens: u32) -> GenRequest {
        GenRequest {
            messages: vec![Message {
                role: "user".into(),
                content: prompt.into(),
            }],
            max_tokens,
            ..GenRequest::default()
        }
    }

    fn sim_stream(cx: &StreamCx, max_tokens: u32) -> Stream {
        let a = Admission {
            id: 0xab,
            sid: "ab".into(),
            request_id: "r".into(),
            line: ReqLine::default(),
            encoder: Box::new(NativeSse),
            conn: (0, 1),
            replay: None,
        };
        Stream::new(cx, a, &gen("a b", max_tokens), Producer::Sim)
    }

    fn texts(bytes: &[u8]) -> Vec<String> {
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .split_terminator("\n\n")
            .filter_map(|e| e.strip_prefix("event: token\ndata: "))
            .map(|d| {
                serde_json::from_str::<serde_json::Value>(d).unwrap()["t"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn stages_see_the_text_before_the_encoder_and_flush_at_the_end() {
        let cfg = Config::for_tests(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
        let metrics = Metrics::default();
        let cx = StreamCx {
            now_ns: 1_000_000_000,
            cfg: &cfg,
            metrics: &metrics,
        };
        let plain = {
            let mut s = sim_stream(&cx, 5);
            let mut b = Vec::new();
            assert!(s.pump(&cx, &mut b, 1 << 20).end.is_some());
            texts(&b).concat()
        };
        let mut s = sim_stream(&cx, 5);
        s.push_stage(Box::new(stage::tests::Upper {
            held: String::new(),
            n: 1000,
        }));
        let mut b = Vec::new();
        let p = s.pump(&cx, &mut b, 1 << 20);
        assert!(b.is_empty(), "the stage holds everything back");
        assert!(!p.first_token);
        let end = p.end.expect("the sim answer is complete");
        let summary = s
            .finish(&cx, *end, true, Duration::ZERO, &mut b)
            .expect("the first end counts");
        assert_eq!(texts(&b), vec![plain.to_uppercase()]);
        // seq counts token events sent: one (the flushed text), so done is 2.
        assert!(String::from_utf8_lossy(&b).contains("id: ab:2\nevent: done"));
        assert_eq!(summary.tokens, 1);
        assert_eq!(summary.outcome, Outcome::Completed);
        // Exactly one terminal event: a second end is ignored.
        let mut again = Vec::new();
        assert!(s
            .finish(&cx, End::Disconnected, false, Duration::ZERO, &mut again)
            .is_none());
        assert!(again.is_empty());
    }

    #[test]
    fn stream_ids_are_22_url_safe_characters_and_differ() {
        // Across several refills of the per-thread pool.
        let ids: std::collections::HashSet<Box<str>> = (0..1000).map(|_| random_sid()).collect();
        assert_eq!(ids.len(), 1000);
        for a in &ids {
            assert_eq!(a.len(), 22);
            assert!(crate::router::is_sid(a), "{a}");
        }
    }

    #[test]
    fn a_stream_id_names_its_loop() {
        for i in [0, 1, 7, MAX_LOOPS - 1] {
            let sid = sid_for_loop(i);
            assert_eq!(sid.len(), 22);
            assert!(crate::router::is_sid(&sid), "{sid}");
            assert_eq!(loop_of_sid(&sid), Some(i));
        }
        assert_ne!(sid_for_loop(1), sid_for_loop(1));
        assert_eq!(loop_of_sid(""), None);
        assert_eq!(loop_of_sid("%x"), None);
    }

    #[test]
    fn a_detached_stream_is_cancelled_and_ends_without_a_word() {
        let cfg = Config::for_tests(&[]);
        let metrics = Metrics::default();
        let cx = StreamCx {
            now_ns: 1_000_000_000,
            cfg: &cfg,
            metrics: &metrics,
        };
        let mut s = sim_stream(&cx, 5);
        assert_eq!(
            s.handle_detach(cx.now_ns, Duration::from_secs(5)),
            Detach::Cancel,
            "not resumable"
        );
        assert!(s.subscriber().is_none());
        let mut b = Vec::new();
        let summary = s
            .finish(&cx, End::Disconnected, false, Duration::ZERO, &mut b)
            .unwrap();
        assert!(b.is_empty());
        assert_eq!(summary.outcome, Outcome::Disconnected);
        assert_eq!(metrics.generations_cancelled.load(Relaxed), 1);
    }
}
