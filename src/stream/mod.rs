//! One generation, owned by the loop's stream table, not by a connection.
//!
//! A [`Stream`] holds its producer (the simulated model, paced by the
//! stream's own deadline, or a job on the worker pool), numbers its events
//! (`seq`: 1 for the first token, tokens + 1 for the terminal event),
//! decides its terminal event exactly once, keeps its own accounting, and
//! passes every piece of text through an ordered chain of [`Stage`]s before
//! its subscriber's encoder. A connection *attaches* to a stream as its
//! [`Subscriber`]; when the subscriber leaves, [`Stream::handle_detach`]
//! says what happens (today: the generation is cancelled).
//!
//! The stream does no I/O and keeps no clock: the engine passes `now` and
//! the buffer the encoded bytes go to (the subscriber connection's output).
//! States and who moves them: `LIFECYCLE.md` beside this file.

mod stage;

pub use stage::Stage;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::backend::sim::{self, SimText};
use crate::backend::{Finish, GenRequest};
use crate::config::Config;
use crate::conn::ReqLine;
use crate::encode::{Encoder, Summary};
use crate::metrics::Metrics;
use crate::pool::{Piece, TokenSink};
use crate::sse::{ErrorCode, StreamError};

/// What produces an admitted stream's tokens.
pub enum Producer {
    /// The simulated model, paced by the stream's deadline.
    Sim,
    /// A generation queued on the worker pool.
    Pool(Arc<TokenSink>),
}

enum Prod {
    Sim { text: SimText, next_due: Instant },
    Pool(Arc<TokenSink>),
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
    /// The subscriber left and the policy cancelled the generation.
    Disconnected,
}

/// The connection a stream's events go to, and the encoder it asked for.
pub struct Subscriber {
    /// The connection's slab key and serial.
    pub conn: (usize, u32),
    pub encoder: Box<dyn Encoder>,
}

/// What [`Stream::handle_detach`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// The generation is cancelled: end the stream as disconnected.
    Cancel,
}

/// What a stream did in one call, for the engine.
#[derive(Debug, Default)]
pub struct Progress {
    /// The first token event was just encoded.
    pub first_token: bool,
    /// The stream has ended this way; call [`Stream::finish`].
    pub end: Option<End>,
}

/// What a stream is given besides its input.
pub struct StreamCx<'a> {
    pub now: Instant,
    pub cfg: &'a Config,
    pub metrics: &'a Metrics,
}

/// One generation.
pub struct Stream {
    id: u64,
    /// The id as clients see it (`X-Stream-Id`, `id:` lines).
    sid: Box<str>,
    request_id: String,
    line: ReqLine,
    /// The most tokens relayed: a backend that goes on is cut off here.
    max_tokens: u32,
    prod: Prod,
    prompt_tokens: Option<u32>,
    parsed_at: Instant,
    last_event_at: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    ttft: Option<Duration>,
    /// Pieces of text taken from the producer (what `max_tokens` limits).
    produced: u32,
    /// Token events encoded (what `seq` counts).
    tokens: u32,
    stages: Vec<Box<dyn Stage>>,
    sub: Option<Subscriber>,
    peer: Option<SocketAddr>,
    /// Who started the stream: only they may resume or stop it.
    principal: Option<Box<str>>,
    ended: bool,
}

impl Stream {
    /// A stream for `gen`, produced by `producer`, attached to `sub`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cx: &StreamCx,
        id: u64,
        sid: Box<str>,
        request_id: String,
        line: ReqLine,
        gen: &GenRequest,
        producer: Producer,
        sub: Subscriber,
    ) -> Stream {
        let (prod, prompt_tokens) = match producer {
            Producer::Sim => (
                Prod::Sim {
                    text: SimText::new(&gen.messages, gen.max_tokens, cx.cfg.sim_tokens),
                    next_due: cx.now + cx.cfg.sim_ttft(),
                },
                Some(sim::prompt_tokens(&gen.messages)),
            ),
            Producer::Pool(sink) => (Prod::Pool(sink), None),
        };
        Stream {
            id,
            sid,
            request_id,
            line,
            max_tokens: gen.max_tokens,
            prod,
            prompt_tokens,
            parsed_at: cx.now,
            last_event_at: cx.now,
            first_token_at: None,
            last_token_at: None,
            ttft: None,
            produced: 0,
            tokens: 0,
            stages: Vec::new(),
            sub: Some(sub),
            peer: None,
            principal: None,
            ended: false,
        }
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
        &self.request_id
    }

    pub fn subscriber(&self) -> Option<&Subscriber> {
        self.sub.as_ref()
    }

    /// Sends events as they happen (rather than one answer at the end).
    pub fn is_streaming(&self) -> bool {
        self.sub.as_ref().is_some_and(|s| s.encoder.streaming())
    }

    /// The bytes that open a streaming body (OpenAI's role chunk).
    pub fn open(&mut self, buf: &mut Vec<u8>) {
        if let Some(sub) = self.sub.as_mut() {
            sub.encoder.open(buf);
        }
    }

    /// When the request was parsed (TTFT counts from here).
    pub fn parsed_at(&self) -> Instant {
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

    /// The first token's bytes were accepted by the client's socket.
    pub fn set_ttft(&mut self, ttft: Duration) {
        self.ttft = Some(ttft);
    }

    fn ttft_estimate(&self) -> Option<Duration> {
        self.ttft
            .or_else(|| self.first_token_at.map(|t| t - self.parsed_at))
    }

    /// When the stream's timer has something to do (tokens due, a
    /// heartbeat, its time limit). `room`: the
    /// subscriber can take more bytes (a simulated token due while it
    /// cannot waits for [`Stream::pump`], not for a deadline).
    pub fn next_deadline(&self, cfg: &Config, room: bool) -> Option<Instant> {
        if self.ended {
            return None;
        }
        let mut d = self.parsed_at + cfg.max_stream();
        if self.is_streaming() {
            d = d.min(self.last_event_at + cfg.heartbeat());
        }
        if let Prod::Sim { text, next_due } = &self.prod {
            if self.produced <= text.total && room {
                d = d.min(*next_due);
            }
        }
        Some(d)
    }

    /// Moves every piece of text that is ready through the stages and the
    /// encoder into `buf`, up to `budget` bytes; notices the producer's end.
    pub fn pump(&mut self, cx: &StreamCx, buf: &mut Vec<u8>, budget: usize) -> Progress {
        let mut progress = Progress::default();
        if self.ended {
            return progress;
        }
        let start = buf.len();
        let first_before = self.tokens == 0;
        let now = cx.now;
        let itl = cx.cfg.sim_itl();
        let Stream {
            prod,
            stages,
            sub,
            tokens,
            produced,
            max_tokens,
            last_token_at,
            first_token_at,
            last_event_at,
            prompt_tokens,
            ..
        } = self;
        let Some(sub) = sub.as_mut() else {
            return progress;
        };
        let mut emit = |b: &mut Vec<u8>, text: &str| {
            stage::run(stages, text, &mut |t: &str| {
                if t.is_empty() {
                    return;
                }
                sub.encoder.token(b, t);
                *tokens += 1;
                if let Some(prev) = *last_token_at {
                    cx.metrics.inter_token.observe(now - prev);
                } else {
                    *first_token_at = Some(now);
                }
                *last_token_at = Some(now);
                *last_event_at = now;
            });
        };
        let mut end = None;
        let mut cut = false;
        match prod {
            Prod::Sim { text, next_due } => {
                while *produced < text.total && *next_due <= now && buf.len() - start < budget {
                    emit(buf, text.token(*produced));
                    *produced += 1;
                    *next_due += itl;
                }
                if *produced == text.total && (*produced > 0 || *next_due <= now) {
                    end = Some(End::Done(Finish {
                        finish_reason: text.finish_reason().into(),
                        prompt_tokens: *prompt_tokens,
                        completion_tokens: None,
                    }));
                }
            }
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
                    emit(buf, &t);
                    *produced += 1;
                    buf.len() - start < budget
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
        progress.first_token = first_before && self.tokens > 0 && self.is_streaming();
        progress.end = end;
        progress
    }

    /// The stream's time limit has passed: it ends with `deadline_exceeded`.
    pub fn expired(&self, cx: &StreamCx) -> Option<End> {
        if self.ended || cx.now < self.parsed_at + cx.cfg.max_stream() {
            return None;
        }
        let msg = format!("the stream ran longer than {} ms", cx.cfg.max_stream_ms);
        Some(End::Error(StreamError::new(
            ErrorCode::DeadlineExceeded,
            msg,
        )))
    }

    /// A heartbeat, when nothing else was sent for `--heartbeat-ms`.
    pub fn heartbeat_if_due(&mut self, cx: &StreamCx, buf: &mut Vec<u8>) {
        if self.ended || !self.is_streaming() || cx.now < self.last_event_at + cx.cfg.heartbeat() {
            return;
        }
        let phase = match &self.prod {
            Prod::Pool(s) if s.started_at().is_none() => "queued",
            _ => "generating",
        };
        self.last_event_at = cx.now;
        if let Some(sub) = self.sub.as_mut() {
            sub.encoder.heartbeat(buf, phase);
        }
        cx.metrics.heartbeats_sent.fetch_add(1, Relaxed);
    }

    /// The subscriber left. The policy lives here: today the generation is
    /// cancelled at once (resume will keep it running for a window).
    pub fn handle_detach(&mut self, _now: Instant) -> Detach {
        self.sub = None;
        Detach::Cancel
    }

    /// Ends the stream: flushes the stages, writes the terminal event into
    /// `buf` (none for [`End::Disconnected`]), cancels the producer unless
    /// the end came from it (`from_producer`: its last piece, its own
    /// error), and accounts for it. Called once; later calls return `None`.
    pub fn finish(
        &mut self,
        cx: &StreamCx,
        end: End,
        from_producer: bool,
        buf: &mut Vec<u8>,
    ) -> Option<StreamSummary> {
        if self.ended {
            return None;
        }
        self.ended = true;
        let now = cx.now;
        if !from_producer {
            if let Prod::Pool(sink) = &self.prod {
                sink.cancel();
            }
            cx.metrics.generations_cancelled.fetch_add(1, Relaxed);
        }
        // Text a stage still holds is the answer's too.
        if !matches!(end, End::Disconnected) {
            let Stream {
                stages,
                sub,
                tokens,
                ..
            } = self;
            if let Some(sub) = sub.as_mut() {
                stage::flush(stages, &mut |t: &str| {
                    if !t.is_empty() {
                        sub.encoder.token(buf, t);
                        *tokens += 1;
                    }
                });
            }
        }
        let duration = now - self.parsed_at;
        let ttft = self.ttft_estimate();
        let seq = self.tokens as u64 + 1;
        let outcome = match &end {
            End::Done(_) => Outcome::Completed,
            End::Error(e) => Outcome::Errored(e.code),
            End::Disconnected => Outcome::Disconnected,
        };
        if let Some(sub) = self.sub.as_mut() {
            let id = (&*self.sid, seq);
            match &end {
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
                    sub.encoder.done(buf, id, &summary);
                }
                End::Error(e) => sub.encoder.error(buf, id, e),
                End::Disconnected => {}
            }
        }
        cx.metrics.stream_duration.observe(duration);
        cx.metrics
            .tokens_sent
            .fetch_add(self.tokens as u64, Relaxed);
        Some(StreamSummary {
            id: self.id,
            request_id: self.request_id.clone(),
            line: std::mem::take(&mut self.line),
            outcome,
            tokens: self.tokens,
            ttft,
            duration,
            principal: self.principal.clone(),
        })
    }
}

/// A stream id clients cannot guess: 128 random bits from the kernel,
/// base64url without padding (22 characters of `[A-Za-z0-9_-]`).
pub fn random_sid() -> Box<str> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 16];
    let mut got = 0;
    while got < bytes.len() {
        // SAFETY: writes at most the remaining length into our buffer.
        let n = unsafe { libc::getrandom(bytes[got..].as_mut_ptr().cast(), bytes.len() - got, 0) };
        if n > 0 {
            got += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // No kernel randomness is a broken machine: better no server
            // than guessable ids.
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    let v = u128::from_le_bytes(bytes);
    (0..22)
        .map(|i| ALPHABET[((v >> (6 * i)) & 63) as usize] as char)
        .collect::<String>()
        .into()
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
        let sub = Subscriber {
            conn: (0, 1),
            encoder: Box::new(NativeSse),
        };
        Stream::new(
            cx,
            0xab,
            "ab".into(),
            "r".into(),
            ReqLine::default(),
            &gen("a b", max_tokens),
            Producer::Sim,
            sub,
        )
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
            now: Instant::now(),
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
            .finish(&cx, end, true, &mut b)
            .expect("the first end counts");
        assert_eq!(texts(&b), vec![plain.to_uppercase()]);
        // seq counts token events sent: one (the flushed text), so done is 2.
        assert!(String::from_utf8_lossy(&b).contains("id: ab:2\nevent: done"));
        assert_eq!(summary.tokens, 1);
        assert_eq!(summary.outcome, Outcome::Completed);
        // Exactly one terminal event: a second end is ignored.
        let mut again = Vec::new();
        assert!(s
            .finish(&cx, End::Disconnected, false, &mut again)
            .is_none());
        assert!(again.is_empty());
    }

    #[test]
    fn stream_ids_are_22_url_safe_characters_and_differ() {
        let a = random_sid();
        let b = random_sid();
        assert_eq!(a.len(), 22);
        assert!(crate::router::is_sid(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn a_detached_stream_is_cancelled_and_ends_without_a_word() {
        let cfg = Config::for_tests(&[]);
        let metrics = Metrics::default();
        let cx = StreamCx {
            now: Instant::now(),
            cfg: &cfg,
            metrics: &metrics,
        };
        let mut s = sim_stream(&cx, 5);
        assert_eq!(s.handle_detach(cx.now), Detach::Cancel);
        assert!(s.subscriber().is_none());
        let mut b = Vec::new();
        let summary = s.finish(&cx, End::Disconnected, false, &mut b).unwrap();
        assert!(b.is_empty());
        assert_eq!(summary.outcome, Outcome::Disconnected);
        assert_eq!(metrics.generations_cancelled.load(Relaxed), 1);
    }
}
