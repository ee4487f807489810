//! State-machine tests of the [`Engine`], driven by a simulated clock and
//! scripted producers: no sockets, no threads, no real time. A pool
//! producer is a [`TokenSink`] the test itself pushes pieces into.

use super::*;

use std::sync::atomic::Ordering::Relaxed;

use crate::backend::sim::SimText;
use crate::backend::{Finish, GenRequest, Message};
use crate::pool::{ReadyList, TokenSink};
use crate::router::{Ops, Refusal};
use crate::sse::StreamError;
use crate::stream::{Outcome, Producer, StreamSummary};

// ------------------------------------------------------------------ fakes

/// What the fake server hands out on admission.
enum Mode2 {
    Sim,
    /// A fresh sink per stream, fed by the test thread itself.
    Sink {
        capacity: usize,
    },
}

struct Fake {
    next: u64,
    refuse: Option<Refusal>,
    mode: Mode2,
    sinks: Vec<Arc<TokenSink>>,
    admitted: Vec<(u64, GenRequest)>,
    ended: Vec<StreamSummary>,
    /// Each ops call, with how many streams had ended by then.
    ops_calls: Vec<(Ops, usize)>,
    /// Access-log entries: (status, path).
    access: Vec<(u16, String)>,
    /// Their durations, for answers without a stream.
    durations: Vec<Duration>,
    /// Resumes answered with a stream: (path, stream id, after).
    resumed: Vec<(String, String, Option<u64>)>,
    /// A shared resume store played by the test (see `remote` tests).
    store: Option<crate::store::Link>,
    relays: Vec<Arc<TokenSink>>,
    relays_dropped: usize,
}

impl Fake {
    fn new(mode: Mode2) -> Fake {
        Fake {
            next: 0x1000,
            refuse: None,
            mode,
            sinks: Vec::new(),
            admitted: Vec::new(),
            ended: Vec::new(),
            ops_calls: Vec::new(),
            access: Vec::new(),
            durations: Vec::new(),
            resumed: Vec::new(),
            store: None,
            relays: Vec::new(),
            relays_dropped: 0,
        }
    }
}

impl Services for Fake {
    fn next_id(&mut self) -> u64 {
        let id = self.next;
        self.next += 1;
        id
    }

    fn stream_sid(&mut self, id: u64) -> Box<str> {
        format!("{id:x}").into()
    }

    fn admit(&mut self, r: StreamRef, gen: &GenRequest) -> Result<Producer, Refusal> {
        if let Some(rf) = &self.refuse {
            return Err(rf.clone());
        }
        self.admitted.push((r.id, gen.clone()));
        let ready = || Arc::new(ReadyList::new(|| {}));
        match &self.mode {
            Mode2::Sim => Ok(Producer::Sim),
            Mode2::Sink { capacity } => {
                let sink = Arc::new(TokenSink::new(r.key, r.id, *capacity, ready()));
                self.sinks.push(sink.clone());
                Ok(Producer::Pool(sink))
            }
        }
    }

    fn ops(&mut self, which: Ops, _req: &Request) -> (u16, &'static str, Vec<u8>) {
        self.ops_calls.push((which, self.ended.len()));
        (200, "text/plain", b"ok".to_vec())
    }

    fn stream_ended(&mut self, e: Ended) {
        self.access
            .push((e.status, e.summary.line.path().to_string()));
        self.ended.push(e.summary);
    }

    fn store(&mut self) -> Option<&mut crate::store::Link> {
        self.store.as_mut()
    }

    fn admit_relay(&mut self, r: StreamRef) -> Option<Result<Arc<TokenSink>, Refusal>> {
        self.store.as_ref()?;
        let sink = Arc::new(TokenSink::new(
            r.key,
            r.id,
            1024,
            Arc::new(ReadyList::new(|| {})),
        ));
        self.relays.push(sink.clone());
        Some(Ok(sink))
    }

    fn relay_dropped(&mut self) {
        self.relays_dropped += 1;
    }

    fn resumed(&mut self, r: Resumed) {
        self.resumed
            .push((r.line.path().to_string(), r.sid.to_string(), r.after));
    }

    fn responded(&mut self, a: &Access) {
        self.durations.push(a.duration);
        self.access.push((
            a.status,
            a.line.map(|l| l.path().to_string()).unwrap_or_default(),
        ));
    }
}

// ---------------------------------------------------------------- harness

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An engine with one connection (key `K`), a simulated clock and a
/// transcript of what the "socket" accepted.
struct H {
    cfg: Config,
    metrics: Arc<Metrics>,
    svc: Fake,
    e: Engine<()>,
    t0: Instant,
    now: Instant,
    out: Vec<u8>,
}

const K: usize = 0;

impl H {
    fn new(flags: &[&str]) -> H {
        H::with(flags, Mode2::Sim)
    }

    fn with(flags: &[&str], mode: Mode2) -> H {
        let cfg = Config::for_tests(flags);
        let t0 = Instant::now();
        let metrics = Arc::new(Metrics::default());
        let mut e = Engine::new(Arc::new(cfg.clone()), metrics.clone(), t0);
        assert_eq!(e.open((), None, t0), K);
        H {
            cfg,
            metrics,
            svc: Fake::new(mode),
            e,
            t0,
            now: t0,
            out: Vec::new(),
        }
    }

    /// Sets the clock to `t0 + n` ms.
    fn at(&mut self, n: u64) -> &mut H {
        self.now = self.t0 + ms(n);
        self
    }

    fn read(&mut self, data: &[u8]) {
        self.e.handle_read(&mut self.svc, K, data, self.now);
        self.settle();
    }

    /// Runs every timer due by now.
    fn timeout(&mut self) {
        self.e.handle_timeouts(&mut self.svc, self.now);
        self.settle();
    }

    fn eof(&mut self) {
        self.e.handle_eof(&mut self.svc, K, self.now);
        self.settle();
    }

    fn ready(&mut self, id: u64) {
        let key = self.e.attached(K).map_or(0, |r| r.key);
        self.e
            .handle_ready(&mut self.svc, StreamRef { key, id }, self.now);
        self.settle();
    }

    /// What the server does once it has written a turn's first tokens:
    /// the streams that ended with them end (the bytes stay pending here;
    /// `zero_delay_sim_writes_its_tokens_then_its_end` shows the order).
    fn settle(&mut self) {
        while self.e.finish_written(&mut self.svc, self.now) {}
    }

    fn write_blocked(&mut self) {
        self.e.handle_write_blocked(K, self.now);
    }

    fn half_closed(&mut self) {
        self.e.half_closed(K, self.now);
    }

    fn conn(&self) -> &Conn {
        self.e.conn(K).expect("the connection")
    }

    fn is_streaming(&self) -> bool {
        self.e.is_attached(K)
    }

    /// The attached stream's id.
    fn stream_id(&self) -> Option<u64> {
        self.e.attached(K).map(|r| r.id)
    }

    fn is_closed(&self) -> bool {
        self.conn().is_closed()
    }

    fn wants_read(&self) -> bool {
        self.e.wants_read(K)
    }

    fn wants_half_close(&self) -> bool {
        self.conn().wants_half_close()
    }

    fn holds_output_buffer(&self) -> bool {
        self.conn().holds_output_buffer()
    }

    fn pending_bytes(&self) -> &[u8] {
        self.e.pending(K)
    }

    /// The socket takes the first `n` pending bytes.
    fn write(&mut self, n: usize) {
        self.out.extend_from_slice(&self.e.pending(K)[..n]);
        self.e.handle_written(&mut self.svc, K, n, self.now);
    }

    /// The socket takes everything (and whatever that makes pending); returns it.
    fn flush(&mut self) -> String {
        let start = self.out.len();
        loop {
            let n = self.e.pending(K).len();
            if n == 0 {
                break;
            }
            self.write(n);
        }
        String::from_utf8(self.out[start..].to_vec()).unwrap()
    }

    fn pending(&self) -> String {
        String::from_utf8(self.e.pending(K).to_vec()).unwrap()
    }

    /// The next deadline, as an offset from `t0`.
    fn deadline(&self) -> Option<Duration> {
        self.e.deadline(K).map(|d| d - self.t0)
    }

    /// Moves the clock from deadline to deadline up to `t0 + limit` ms,
    /// flushing after each.
    fn run_until(&mut self, limit: u64) {
        for _ in 0..100_000 {
            match self.deadline() {
                Some(d) if d <= ms(limit) => {
                    self.now = self.t0 + d;
                    self.timeout();
                    self.flush();
                }
                _ => return,
            }
        }
        panic!("deadlines never passed t0+{limit}ms");
    }

    fn transcript(&self) -> String {
        String::from_utf8(self.out.clone()).unwrap()
    }

    fn summary(&self) -> &StreamSummary {
        assert_eq!(self.svc.ended.len(), 1, "exactly one stream ended");
        &self.svc.ended[0]
    }
}

// ---------------------------------------------------------- wire helpers

fn post(body: &str) -> String {
    format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The head of a stream whose request id is its stream id.
fn sse_head(sid: &str) -> String {
    sse_head_ids(sid, sid)
}

fn sse_head_ids(rid: &str, sid: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\
         X-Request-Id: {rid}\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n\
         X-Stream-Id: {sid}\r\n\r\n"
    )
}

fn chunk(body: &str) -> String {
    format!("{:x}\r\n{body}\r\n", body.len())
}

const LAST: &str = "0\r\n\r\n";

/// A token frame for plain ASCII text (no escaping needed).
fn tok(t: &str) -> String {
    format!("event: token\ndata: {{\"t\":\"{t}\"}}\n\n")
}

fn heartbeat(phase: &str) -> String {
    format!("event: heartbeat\ndata: {{\"phase\":\"{phase}\"}}\n\n")
}

fn error_frame(sid: &str, seq: u64, json: &str) -> String {
    format!("id: {sid}:{seq}\nevent: error\ndata: {json}\n\n")
}

fn full_response(status: &str, extra_head: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_head}\r\n{body}",
        body.len()
    )
}

fn error_body(code: &str, message: &str) -> String {
    format!("{{\"error\":{{\"code\":\"{code}\",\"message\":\"{message}\"}}}}")
}

/// The simulated model's tokens for a one-message prompt.
fn sim_words(prompt: &str, max_tokens: u32, sim_tokens: u32) -> Vec<&'static str> {
    let m = [Message {
        role: "user".into(),
        content: prompt.into(),
    }];
    let t = SimText::new(&m, max_tokens, sim_tokens);
    (0..t.total).map(|i| t.token(i)).collect()
}

/// Splits a chunked body into its chunks' contents; returns them and what
/// follows the last chunk. Panics on bad framing or a missing last chunk.
fn dechunk(mut s: &str) -> (Vec<String>, String) {
    let mut chunks = Vec::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk-size line");
        let n = usize::from_str_radix(size, 16).expect("hex chunk size");
        if n == 0 {
            let rest = rest
                .strip_prefix("\r\n")
                .expect("CRLF after the last chunk");
            return (chunks, rest.to_string());
        }
        chunks.push(rest[..n].to_string());
        s = rest[n..]
            .strip_prefix("\r\n")
            .expect("CRLF after chunk data");
    }
}

/// The events (without their blank-line terminator) of an SSE body.
fn events(body: &str) -> Vec<String> {
    assert!(body.is_empty() || body.ends_with("\n\n"), "{body:?}");
    body.split_terminator("\n\n").map(str::to_string).collect()
}

/// The `t` of every token event of an SSE body, in order.
fn token_texts(body: &str) -> Vec<String> {
    events(body)
        .iter()
        .filter_map(|e| e.strip_prefix("event: token\ndata: "))
        .map(|d| {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            v["t"].as_str().unwrap().to_string()
        })
        .collect()
}

// ------------------------------------------------------------------ tests

#[test]
fn sim_stream_is_paced_by_the_clock() {
    let mut h = H::new(&["--sim-ttft-ms", "50", "--sim-itl-ms", "20"]);
    let words = sim_words("hello world", 5, 64);
    h.read(post(r#"{"prompt":"hello world","max_tokens":5}"#).as_bytes());
    assert!(h.is_streaming());
    assert_eq!(h.stream_id(), Some(0x1000));
    // The head at once, before any token.
    assert_eq!(h.pending(), sse_head("1000"));
    assert_eq!(h.flush(), sse_head("1000"));
    assert_eq!(h.deadline(), Some(ms(50)));

    h.at(49).timeout();
    assert_eq!(h.pending(), "");
    assert_eq!(h.deadline(), Some(ms(50)));

    h.at(50).timeout();
    assert_eq!(h.flush(), chunk(&tok(words[0])));
    assert_eq!(h.deadline(), Some(ms(70)));
    assert_eq!(h.metrics.ttft.count(), 1, "ttft observed once written");

    for (i, w) in words.iter().enumerate().take(4).skip(1) {
        h.at(50 + 20 * i as u64).timeout();
        assert_eq!(h.flush(), chunk(&tok(w)));
    }
    assert_eq!(h.deadline(), Some(ms(130)));
    h.at(130).timeout();
    let done = "id: 1000:6\nevent: done\ndata: {\"finish_reason\":\"length\",\"usage\":\
                {\"prompt_tokens\":2,\"completion_tokens\":5},\"ttft_ms\":50.000,\"tokens_per_s\":38.5}\n\n";
    assert_eq!(
        h.flush(),
        format!("{}{}{LAST}", chunk(&tok(words[4])), chunk(done))
    );

    // Back to reading the next request on the same connection.
    assert!(!h.is_streaming());
    assert!(!h.is_closed());
    assert!(h.wants_read());
    assert!(!h.wants_half_close());
    assert!(!h.holds_output_buffer());
    assert_eq!(h.deadline(), Some(ms(130) + h.cfg.idle_timeout()));
    let s = h.summary();
    assert_eq!(s.id, 0x1000);
    assert_eq!(s.request_id, "1000");
    assert_eq!(s.outcome, Outcome::Completed);
    assert_eq!(s.tokens, 5);
    assert_eq!(s.ttft, Some(ms(50)));
    assert_eq!(s.duration, ms(130));
    assert_eq!(h.metrics.tokens_sent.load(Relaxed), 5);
    assert_eq!(h.metrics.inter_token.count(), 4);
}

#[test]
fn zero_delay_sim_writes_its_tokens_then_its_end() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let words = sim_words("hi", 8, 64);
    // The server's read, without the harness's `settle`.
    let req = post(r#"{"prompt":"hi","max_tokens":8}"#);
    h.e.handle_read(&mut h.svc, K, req.as_bytes(), h.now);
    // The first write: the head and every token, in one chunk. The end
    // waits behind it (nothing is summed up or logged yet).
    let first = h.pending();
    let want: String = words.iter().map(|w| tok(w)).collect();
    assert_eq!(
        first,
        format!("{}{:x}\r\n{want}\r\n", sse_head("1000"), want.len())
    );
    assert!(h.e.has_ends_due());
    assert!(h.svc.ended.is_empty() && h.svc.access.is_empty());
    h.write(first.len());
    // Once written, the stream ends: its done event and the last chunk.
    assert!(h.e.finish_written(&mut h.svc, h.now));
    assert!(!h.e.has_ends_due() && !h.is_streaming());
    let rest = h.pending();
    let (chunks, after) = dechunk(&rest);
    assert_eq!(after, "");
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert!(
        chunks[0].starts_with(
            "id: 1000:9\nevent: done\ndata: {\"finish_reason\":\"length\",\"usage\":\
             {\"prompt_tokens\":1,\"completion_tokens\":8}"
        ),
        "{:?}",
        chunks[0]
    );
    h.write(rest.len());
    assert!(!h.e.finish_written(&mut h.svc, h.now));
    assert_eq!(h.summary().outcome, Outcome::Completed);
    assert_eq!(h.summary().tokens, 8);
    assert_eq!(h.svc.access.len(), 1);
}

#[test]
fn a_stream_whose_client_resets_before_its_end_ends_once() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let req = post(r#"{"prompt":"hi","max_tokens":3}"#);
    h.e.handle_read(&mut h.svc, K, req.as_bytes(), h.now);
    assert!(h.e.has_ends_due());
    // The first write fails: the client is gone.
    h.e.handle_reset(&mut h.svc, K, h.now);
    h.settle();
    assert!(!h.e.has_ends_due());
    assert_eq!(h.svc.ended.len(), 1, "one summary");
    assert_eq!(h.e.streams(), 0);
}

#[test]
fn heartbeat_only_after_silence_while_generating() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "1500",
        "--sim-itl-ms",
        "5000",
        "--heartbeat-ms",
        "1000",
    ]);
    let words = sim_words("hello", 2, 64);
    h.read(post(r#"{"prompt":"hello","max_tokens":2}"#).as_bytes());
    h.flush();
    assert_eq!(h.deadline(), Some(ms(1000)));
    h.at(999).timeout();
    assert_eq!(h.pending(), "");
    h.at(1000).timeout();
    assert_eq!(h.flush(), chunk(&heartbeat("generating")));
    assert_eq!(h.metrics.heartbeats_sent.load(Relaxed), 1);
    // The first token is due before the next heartbeat.
    assert_eq!(h.deadline(), Some(ms(1500)));
    h.at(1500).timeout();
    assert_eq!(h.flush(), chunk(&tok(words[0])));
    // A token is an event: the silence restarts.
    assert_eq!(h.deadline(), Some(ms(2500)));
    h.at(2499).timeout();
    assert_eq!(h.pending(), "");
    h.at(2500).timeout();
    assert_eq!(h.flush(), chunk(&heartbeat("generating")));
    assert_eq!(h.deadline(), Some(ms(3500)));
    h.run_until(10_000);
    assert_eq!(h.metrics.heartbeats_sent.load(Relaxed), 5);
    assert_eq!(h.summary().outcome, Outcome::Completed);
}

#[test]
fn heartbeat_says_queued_while_the_job_waits_for_a_worker() {
    let mut h = H::with(&["--heartbeat-ms", "1000"], Mode2::Sink { capacity: 8 });
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    assert_eq!(h.flush(), sse_head("1000"));
    assert_eq!(h.deadline(), Some(ms(1000)));
    h.at(999).timeout();
    assert_eq!(h.pending(), "");
    h.at(1000).timeout();
    assert_eq!(h.flush(), chunk(&heartbeat("queued")));
    assert_eq!(h.deadline(), Some(ms(2000)));
}

#[test]
fn heartbeat_says_generating_once_a_worker_took_the_job() {
    let mut h = H::with(&["--heartbeat-ms", "1000"], Mode2::Sink { capacity: 16 });
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.flush();
    let sink = h.svc.sinks[0].clone();
    sink.mark_started(h.t0 + ms(10));
    h.at(1000).timeout();
    assert_eq!(h.flush(), chunk(&heartbeat("generating")));
    h.eof();
    assert!(sink.is_cancelled());
    assert_eq!(h.summary().outcome, Outcome::Disconnected);
}

#[test]
fn pool_backpressure_stops_at_high_water_and_loses_nothing() {
    let mut h = H::with(
        &["--output-high-water", "256"],
        Mode2::Sink { capacity: 128 },
    );
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    assert_eq!(h.flush(), sse_head("1000"));
    let sink = h.svc.sinks[0].clone();
    let want: Vec<String> = (0..100).map(|i| format!("w{i:03}")).collect();
    for t in &want {
        sink.push_token(t).unwrap();
    }
    let frame = tok("w000").len();
    h.ready(0x1000);
    let first = h.pending_bytes().len();
    assert!(
        (256..256 + frame + 8).contains(&first),
        "pending {first} near the high-water mark"
    );
    assert!(sink.has_pieces(), "the rest waits in the sink");
    // Over the mark: another notification takes nothing.
    h.ready(0x1000);
    assert_eq!(h.pending_bytes().len(), first);
    // Above half the mark after a write: still nothing taken.
    h.write(first - 200);
    assert_eq!(h.pending_bytes().len(), 200);
    // Below half: more is taken, again up to about the mark.
    h.write(100);
    let second = h.pending_bytes().len();
    assert!(
        (256..256 + frame + 8).contains(&second),
        "pending {second} after refill"
    );
    // Drain in small writes; the buffer never grows past the mark (+ one frame).
    let mut rounds = 0;
    while !h.pending_bytes().is_empty() {
        assert!(h.pending_bytes().len() < 256 + frame + 8);
        let n = h.pending_bytes().len().min(97);
        h.write(n);
        rounds += 1;
        assert!(rounds < 10_000);
    }
    assert!(!sink.has_pieces());
    assert!(h.is_streaming());
    let t = h.transcript();
    let (chunks, after) = dechunk(&format!(
        "{}{LAST}",
        t.strip_prefix(&sse_head("1000")).unwrap()
    ));
    assert_eq!(after, "");
    let body: String = chunks.concat();
    assert_eq!(token_texts(&body), want, "every token once, in order");
    h.eof();
    assert_eq!(h.summary().tokens, 100);
}

#[test]
fn sim_backpressure_holds_tokens_without_busy_deadlines() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "0",
        "--output-high-water",
        "256",
    ]);
    let words = sim_words("a b c", 64, 64);
    h.read(post(r#"{"prompt":"a b c","max_tokens":64}"#).as_bytes());
    assert!(h.is_streaming(), "64 tokens do not fit under 256 bytes");
    let first = h.pending_bytes().len();
    assert!((256..256 + 64).contains(&first), "pending {first}");
    // Over the mark the sim's (past) due time is not a deadline: no spinning.
    assert!(h.deadline().unwrap() >= h.cfg.heartbeat().min(h.cfg.max_stream()));
    let mut rounds = 0;
    while h.is_streaming() || !h.pending_bytes().is_empty() {
        if h.deadline().is_some_and(|d| d <= ms(0)) {
            h.timeout();
        }
        let n = h.pending_bytes().len().min(100);
        if n > 0 {
            h.write(n);
        }
        // Tokens stop at the mark (plus the frame that crossed it); the
        // terminal event and the last chunk follow the last token whatever
        // the room, once.
        let terminal = 160;
        assert!(
            h.pending_bytes().len() < 256 + 64 + terminal,
            "{} {:?}",
            h.pending_bytes().len(),
            h.pending()
        );
        rounds += 1;
        assert!(rounds < 10_000);
    }
    let t = h.transcript();
    let (chunks, after) = dechunk(t.strip_prefix(&sse_head("1000")).unwrap());
    assert_eq!(after, "");
    let body = chunks.concat();
    assert_eq!(token_texts(&body), words);
    assert!(body.contains("id: 1000:65\nevent: done\n"));
    assert_eq!(h.summary().outcome, Outcome::Completed);
    assert_eq!(h.summary().tokens, 64);
}

#[test]
fn client_leaving_mid_stream_cancels_and_frees_everything() {
    let mut h = H::with(&[], Mode2::Sink { capacity: 8 });
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.flush();
    let sink = h.svc.sinks[0].clone();
    sink.push_token("a").unwrap();
    sink.push_token("b").unwrap();
    h.at(10);
    h.ready(0x1000);
    assert!(h.holds_output_buffer(), "two tokens not yet written");
    h.at(20).eof();
    assert!(h.is_closed());
    assert!(!h.wants_read());
    assert!(sink.is_cancelled());
    assert!(!h.holds_output_buffer());
    assert_eq!(h.pending(), "");
    assert_eq!(h.deadline(), None);
    let s = h.summary();
    assert_eq!(s.outcome, Outcome::Disconnected);
    assert_eq!(s.tokens, 2);
    assert_eq!(s.duration, ms(20));
    assert_eq!(h.metrics.generations_cancelled.load(Relaxed), 1);
    // Pieces for the dead stream are ignored.
    h.ready(0x1000);
    assert_eq!(h.pending(), "");
    assert_eq!(h.svc.ended.len(), 1);
}

#[test]
fn client_leaving_a_sim_stream() {
    let mut h = H::new(&["--sim-ttft-ms", "10", "--sim-itl-ms", "10"]);
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.run_until(30);
    h.eof();
    assert!(h.is_closed());
    assert_eq!(h.summary().outcome, Outcome::Disconnected);
    assert_eq!(h.summary().tokens, 3);
    assert_eq!(h.deadline(), None);
    // Nothing more happens, whatever comes in.
    h.at(1000).timeout();
    h.read(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(h.pending(), "");
}

#[test]
fn write_timeout_ends_the_stream_with_slow_consumer() {
    let mut h = H::new(&["--sim-ttft-ms", "100000", "--write-timeout-ms", "500"]);
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    // The socket takes nothing.
    h.write_blocked();
    assert_eq!(h.deadline(), Some(ms(500)));
    h.at(499).timeout();
    assert_eq!(h.pending(), sse_head("1000"));
    h.at(500).timeout();
    let err = error_frame(
        "1000",
        1,
        r#"{"code":"slow_consumer","message":"the client accepted no bytes for 500 ms","retryable":false}"#,
    );
    assert_eq!(
        h.pending(),
        format!("{}{}{LAST}", sse_head("1000"), chunk(&err))
    );
    assert!(!h.is_streaming());
    assert!(!h.is_closed());
    assert!(!h.wants_half_close(), "bytes still pending");
    assert_eq!(
        h.summary().outcome,
        Outcome::Errored(ErrorCode::SlowConsumer)
    );
    assert_eq!(h.metrics.connections_timed_out.load(Relaxed), 1);
    // A grace period for the error to leave, then closed.
    assert_eq!(h.deadline(), Some(ms(1500)));
    h.at(1499).timeout();
    assert!(!h.is_closed());
    h.at(1500).timeout();
    assert!(h.is_closed());
    assert!(!h.holds_output_buffer());
}

#[test]
fn a_write_resets_the_write_timeout() {
    let mut h = H::new(&["--sim-ttft-ms", "100000", "--write-timeout-ms", "500"]);
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.write_blocked();
    h.at(300).write(10);
    assert_eq!(h.deadline(), Some(h.cfg.heartbeat()));
    h.at(400);
    h.write_blocked();
    // Repeated "would block" does not move the start.
    h.at(450);
    h.write_blocked();
    assert_eq!(h.deadline(), Some(ms(900)));
    h.at(899).timeout();
    assert!(h.is_streaming());
    h.at(900).timeout();
    assert!(!h.is_streaming());
    assert_eq!(
        h.summary().outcome,
        Outcome::Errored(ErrorCode::SlowConsumer)
    );
}

#[test]
fn max_stream_duration_ends_with_deadline_exceeded() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "30",
        "--sim-itl-ms",
        "40",
        "--max-stream-ms",
        "100",
    ]);
    let words = sim_words("x", 64, 64);
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.run_until(99);
    assert!(h.is_streaming());
    assert_eq!(h.deadline(), Some(ms(100)));
    h.at(100).timeout();
    let err = error_frame(
        "1000",
        3,
        r#"{"code":"deadline_exceeded","message":"the stream ran longer than 100 ms","retryable":false}"#,
    );
    assert_eq!(
        h.transcript(),
        format!(
            "{}{}{}",
            sse_head("1000"),
            chunk(&tok(words[0])),
            chunk(&tok(words[1]))
        )
    );
    assert_eq!(h.flush(), format!("{}{LAST}", chunk(&err)));
    assert_eq!(
        h.summary().outcome,
        Outcome::Errored(ErrorCode::DeadlineExceeded)
    );
    assert_eq!(h.summary().tokens, 2);
    // Not a transport failure: the connection stays.
    assert!(!h.is_closed());
    assert!(!h.is_streaming());
    assert!(h.wants_read());
}

#[test]
fn header_timeout_gives_408_then_closes() {
    let mut h = H::new(&["--header-timeout-ms", "1000"]);
    h.at(10)
        .read(b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nHost");
    assert_eq!(h.pending(), "");
    assert!(!h.holds_output_buffer());
    assert_eq!(h.deadline(), Some(ms(1010)));
    h.at(1009).timeout();
    assert_eq!(h.pending(), "");
    h.at(1010).timeout();
    let body = error_body(
        "request_timeout",
        "the request was not received within 1000 ms",
    );
    assert_eq!(
        h.pending(),
        full_response(
            "408 Request Timeout",
            "Connection: close\r\nX-Request-Id: 1000\r\n",
            &body
        )
    );
    assert!(!h.wants_half_close(), "not written yet");
    assert!(!h.is_closed());
    h.flush();
    assert!(h.wants_half_close());
    h.half_closed();
    assert!(!h.wants_half_close());
    assert!(!h.is_closed());
    h.eof();
    assert!(h.is_closed());
    assert_eq!(h.svc.ended.len(), 0, "no stream was started");
}

#[test]
fn idle_keep_alive_connection_closes_without_a_response() {
    let mut h = H::new(&["--idle-timeout-ms", "5000"]);
    h.at(100).read(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        h.flush(),
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nX-Request-Id: 1000\r\n\r\nok"
    );
    assert!(!h.holds_output_buffer());
    assert_eq!(h.deadline(), Some(ms(5100)));
    h.at(5099).timeout();
    assert!(!h.is_closed());
    h.at(5100).timeout();
    assert!(h.is_closed());
    assert_eq!(h.pending(), "");
    assert_eq!(h.metrics.connections_timed_out.load(Relaxed), 1);
}

#[test]
fn pipelined_request_is_answered_after_the_stream() {
    let mut h = H::new(&["--sim-ttft-ms", "50", "--sim-itl-ms", "20"]);
    let words = sim_words("x", 3, 64);
    let mut input = post(r#"{"prompt":"x","max_tokens":3}"#);
    input.push_str("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    h.read(input.as_bytes());
    assert!(h.is_streaming());
    assert_eq!(h.pending(), sse_head("1000"));
    assert!(h.svc.ops_calls.is_empty(), "healthz waits for the stream");
    h.run_until(1000);
    assert_eq!(h.svc.ops_calls, vec![(Ops::Healthz, 1)]);
    let t = h.transcript();
    let body = t.strip_prefix(&sse_head("1000")).unwrap();
    let (chunks, after) = dechunk(body);
    assert_eq!(
        token_texts(&chunks.concat()),
        words.iter().map(|w| w.to_string()).collect::<Vec<_>>()
    );
    assert!(chunks.last().unwrap().contains("event: done"));
    assert_eq!(
        after,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nX-Request-Id: 1001\r\n\r\nok"
    );
    assert!(!h.is_closed());
}

#[test]
fn pipelined_request_arriving_during_the_stream_waits_too() {
    let mut h = H::new(&["--sim-ttft-ms", "50", "--sim-itl-ms", "20"]);
    h.read(post(r#"{"prompt":"x","max_tokens":2}"#).as_bytes());
    h.flush();
    // Arrives in two reads while the stream runs.
    h.at(10).read(b"GET /readyz HTT");
    h.at(20).read(b"P/1.1\r\nHost: x\r\n\r\n");
    assert!(h.wants_read());
    assert!(h.svc.ops_calls.is_empty());
    h.run_until(1000);
    assert_eq!(h.svc.ops_calls, vec![(Ops::Readyz, 1)]);
    assert!(h.transcript().ends_with(&format!(
        "{LAST}HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nX-Request-Id: 1001\r\n\r\nok"
    )));
}

#[test]
fn refused_admission_gets_503_with_retry_after_and_keeps_the_connection() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    h.svc.refuse = Some(Refusal {
        status: 503,
        code: "overloaded",
        message: "too many streams".into(),
    });
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    assert_eq!(
        h.flush(),
        full_response(
            "503 Service Unavailable",
            "X-Request-Id: 1000\r\nRetry-After: 1\r\n",
            &error_body("overloaded", "too many streams")
        )
    );
    assert!(!h.is_streaming());
    assert!(!h.is_closed());
    assert!(!h.wants_half_close());
    assert!(h.svc.ended.is_empty());
    assert_eq!(h.metrics.refused_count(503), 1);
    // The same connection carries the next request.
    h.svc.refuse = None;
    h.read(post(r#"{"prompt":"x","max_tokens":1}"#).as_bytes());
    assert!(h.flush().starts_with(&sse_head("1001")));
    assert_eq!(h.summary().outcome, Outcome::Completed);
}

#[test]
fn bad_json_gets_400_and_keeps_the_connection() {
    let mut h = H::new(&[]);
    h.read(post(r#"{"prompt":"#).as_bytes());
    let out = h.flush();
    assert!(
        out.starts_with(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: "
        ),
        "{out}"
    );
    assert!(!out.contains("Connection: close"), "{out}");
    let body = out.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["code"], "bad_request");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    assert!(!h.is_closed());
    assert!(!h.wants_half_close());
    assert!(h.svc.admitted.is_empty());
    // An unknown field is a 400 too, still on the same connection.
    h.read(post(r#"{"prompt":"x","foo":1}"#).as_bytes());
    assert!(h.flush().starts_with("HTTP/1.1 400 Bad Request\r\n"));
    assert!(!h.is_closed());
}

#[test]
fn malformed_head_gets_400_and_closes() {
    let mut h = H::new(&[]);
    h.read(
        b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(
        h.pending(),
        full_response(
            "400 Bad Request",
            "Connection: close\r\nX-Request-Id: 1000\r\n",
            &error_body("bad_request", "malformed request: invalid header name")
        )
    );
    assert!(h.svc.ops_calls.is_empty(), "nothing after it is served");
    assert!(!h.wants_half_close());
    h.flush();
    assert!(h.wants_half_close());
    // More input is ignored.
    h.read(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(h.pending(), "");
    h.half_closed();
    assert_eq!(h.deadline(), Some(Duration::from_secs(2)));
    h.at(1999).timeout();
    assert!(!h.is_closed());
    h.at(2000).timeout();
    assert!(h.is_closed());
}

#[test]
fn unknown_path_gets_404_and_wrong_method_405_with_allow() {
    let mut h = H::new(&[]);
    h.read(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        h.flush(),
        full_response(
            "404 Not Found",
            "X-Request-Id: 1000\r\n",
            &error_body("not_found", "no such endpoint: /nope")
        )
    );
    h.read(b"DELETE /v1/chat/stream HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        h.flush(),
        full_response(
            "405 Method Not Allowed",
            "X-Request-Id: 1001\r\nAllow: GET, POST\r\n",
            &error_body(
                "method_not_allowed",
                "DELETE is not allowed on /v1/chat/stream; use GET, POST"
            )
        )
    );
    h.read(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(
        h.flush(),
        full_response(
            "405 Method Not Allowed",
            "X-Request-Id: 1002\r\nAllow: GET\r\n",
            &error_body(
                "method_not_allowed",
                "POST is not allowed on /healthz; use GET"
            )
        )
    );
    assert!(!h.is_closed());
    assert!(h.svc.ops_calls.is_empty());
}

#[test]
fn get_with_last_event_id_gets_204_without_a_length() {
    let mut h = H::new(&[]);
    h.read(b"GET /v1/chat/stream?prompt=hi HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1000:65\r\n\r\n");
    assert_eq!(
        h.flush(),
        "HTTP/1.1 204 No Content\r\nX-Request-Id: 1000\r\n\r\n"
    );
    assert!(h.svc.admitted.is_empty(), "the prompt is not run again");
    assert!(!h.is_closed());
    assert!(!h.is_streaming());
}

#[test]
fn get_stream_from_the_query_string() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    h.read(b"GET /v1/chat/stream?prompt=hello+world&max_tokens=2 HTTP/1.1\r\nHost: x\r\n\r\n");
    let words = sim_words("hello world", 2, 64);
    let t = h.flush();
    let (chunks, _) = dechunk(t.strip_prefix(&sse_head("1000")).unwrap());
    assert_eq!(
        token_texts(&chunks.concat()),
        words.iter().map(|w| w.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(h.svc.admitted[0].1.messages[0].content, "hello world");
    assert_eq!(h.svc.admitted[0].1.max_tokens, 2);
}

#[test]
fn client_request_id_is_echoed_and_the_stream_id_names_events() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let body = r#"{"prompt":"x","max_tokens":1}"#;
    let req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nX-Request-Id: my-req-1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    h.read(req.as_bytes());
    let t = h.flush();
    assert!(t.starts_with(&sse_head_ids("my-req-1", "1000")), "{t}");
    assert!(t.contains("id: 1000:2\nevent: done\n"));
    assert_eq!(h.summary().request_id, "my-req-1");
}

#[test]
fn http10_stream_is_close_delimited_then_lingers() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let words = sim_words("x", 3, 64);
    let body = r#"{"prompt":"x","max_tokens":3}"#;
    let req = format!(
        "POST /v1/chat/stream HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    h.at(5).read(req.as_bytes());
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\
                X-Request-Id: 1000\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n\
                X-Stream-Id: 1000\r\n\r\n";
    let all = h.pending();
    assert!(!all.contains("Transfer-Encoding"));
    let rest = all.strip_prefix(head).expect("HTTP/1.0 SSE head");
    let evs = events(rest);
    assert_eq!(evs.len(), 4, "raw events, no chunk lines: {rest:?}");
    for (e, w) in evs.iter().zip(&words) {
        assert_eq!(format!("{e}\n\n"), tok(w));
    }
    assert!(evs[3].starts_with("id: 1000:4\nevent: done\n"));
    assert!(!rest.ends_with(LAST));
    assert!(!h.is_streaming());
    assert!(!h.is_closed());
    assert!(!h.wants_half_close(), "bytes still pending");
    h.flush();
    assert!(h.wants_half_close());
    h.at(10);
    h.half_closed();
    assert!(!h.wants_half_close());
    assert_eq!(h.deadline(), Some(ms(2010)));
    h.at(2009).timeout();
    assert!(!h.is_closed());
    h.at(2010).timeout();
    assert!(h.is_closed());
    assert_eq!(h.summary().outcome, Outcome::Completed);
}

#[test]
fn http10_lingering_ends_on_the_clients_fin() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    h.read(b"GET /v1/chat/stream?prompt=x&max_tokens=1 HTTP/1.0\r\n\r\n");
    h.flush();
    assert!(h.wants_half_close());
    h.half_closed();
    h.at(1).eof();
    assert!(h.is_closed());
    assert_eq!(h.summary().outcome, Outcome::Completed, "not a disconnect");
}

#[test]
fn stream_false_answers_one_json_document_at_the_end() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "50",
        "--sim-itl-ms",
        "20",
        "--heartbeat-ms",
        "10",
    ]);
    let words = sim_words("hello world", 3, 64);
    h.read(post(r#"{"prompt":"hello world","max_tokens":3,"stream":false}"#).as_bytes());
    assert!(h.is_streaming());
    assert_eq!(h.pending(), "", "no head before the answer");
    // No heartbeats without SSE: the first deadline is the first token.
    assert_eq!(h.deadline(), Some(ms(50)));
    h.at(50).timeout();
    h.at(70).timeout();
    assert_eq!(h.pending(), "");
    assert_eq!(h.deadline(), Some(ms(90)));
    h.at(90).timeout();
    let text: String = words.concat();
    let body = format!(
        "{{\"text\":\"{text}\",\"finish_reason\":\"length\",\"usage\":{{\"prompt_tokens\":2,\
         \"completion_tokens\":3}},\"ttft_ms\":50.000,\"tokens_per_s\":33.3}}"
    );
    assert_eq!(
        h.flush(),
        full_response(
            "200 OK",
            "X-Request-Id: 1000\r\nX-Stream-Id: 1000\r\n",
            &body
        )
    );
    assert!(!h.is_closed());
    assert_eq!(h.summary().outcome, Outcome::Completed);
    assert_eq!(h.summary().tokens, 3);
    assert_eq!(h.metrics.heartbeats_sent.load(Relaxed), 0);
    // One access-log entry for the one request, with its status.
    assert_eq!(h.svc.access, vec![(200, "/v1/chat/stream".to_string())]);
}

#[test]
fn every_request_logs_exactly_one_access_entry() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    h.read(post(r#"{"prompt":"x","max_tokens":2}"#).as_bytes());
    h.read(post(r#"{"prompt":"x","max_tokens":2,"stream":false}"#).as_bytes());
    h.read(post(r#"{"prompt":"#).as_bytes());
    h.flush();
    h.read(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    h.flush();
    h.read(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    h.flush();
    let paths: Vec<(u16, &str)> = h.svc.access.iter().map(|(s, p)| (*s, p.as_str())).collect();
    assert_eq!(
        paths,
        vec![
            (200, "/v1/chat/stream"),
            (200, "/v1/chat/stream"),
            (400, "/v1/chat/stream"),
            (200, "/healthz"),
            (404, "/nope"),
        ]
    );
}

#[test]
fn no_streaming_flag_answers_json_too() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0", "--no-streaming"]);
    h.read(post(r#"{"prompt":"x","max_tokens":2}"#).as_bytes());
    let out = h.flush();
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "),
        "{out}"
    );
    let body = out.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["text"], sim_words("x", 2, 64).concat());
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[test]
fn stream_false_error_becomes_an_http_error() {
    let mut h = H::new(&["--sim-ttft-ms", "1000", "--max-stream-ms", "100"]);
    h.read(post(r#"{"prompt":"x","stream":false}"#).as_bytes());
    h.at(100).timeout();
    assert_eq!(
        h.flush(),
        full_response(
            "504 Gateway Timeout",
            "X-Request-Id: 1000\r\nX-Stream-Id: 1000\r\n",
            &error_body("deadline_exceeded", "the stream ran longer than 100 ms")
        )
    );
    assert!(!h.is_closed());
}

#[test]
fn error_piece_mid_stream_ends_with_an_error_event() {
    let mut h = H::with(&[], Mode2::Sink { capacity: 16 });
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.flush();
    let sink = h.svc.sinks[0].clone();
    for t in ["a", "b", "c"] {
        sink.push_token(t).unwrap();
    }
    h.ready(0x1000);
    h.flush();
    sink.finish(Err(StreamError {
        code: ErrorCode::UpstreamError,
        message: "upstream said 502".into(),
        retryable: true,
        upstream_status: Some(502),
    }));
    h.ready(0x1000);
    h.flush();
    let t = h.transcript();
    let (chunks, after) = dechunk(t.strip_prefix(&sse_head("1000")).unwrap());
    assert_eq!(after, "");
    let err = error_frame(
        "1000",
        4,
        r#"{"code":"upstream_error","message":"upstream said 502","retryable":true,"upstream_status":502}"#,
    );
    assert_eq!(
        chunks.concat(),
        format!("{}{}{}{err}", tok("a"), tok("b"), tok("c"))
    );
    assert_eq!(chunks.last().unwrap(), &err, "the error is its own chunk");
    assert_eq!(
        h.summary().outcome,
        Outcome::Errored(ErrorCode::UpstreamError)
    );
    assert_eq!(h.summary().tokens, 3);
    assert!(!h.is_closed(), "keep-alive after an upstream error");
}

#[test]
fn done_piece_passes_the_backends_finish_through() {
    let mut h = H::with(&[], Mode2::Sink { capacity: 16 });
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    let sink = h.svc.sinks[0].clone();
    sink.push_token("x").unwrap();
    sink.push_token("y").unwrap();
    sink.finish(Ok(Finish {
        finish_reason: "content_filter".into(),
        prompt_tokens: Some(7),
        completion_tokens: None,
    }));
    h.ready(0x1000);
    h.flush();
    let t = h.transcript();
    let (chunks, _) = dechunk(t.strip_prefix(&sse_head("1000")).unwrap());
    let body = chunks.concat();
    assert_eq!(token_texts(&body), ["x", "y"]);
    let last = events(&body).pop().unwrap();
    assert!(
        last.starts_with(
            "id: 1000:3\nevent: done\ndata: {\"finish_reason\":\"content_filter\",\
             \"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}"
        ),
        "{last}"
    );
    assert_eq!(h.summary().outcome, Outcome::Completed);
    assert!(!h.svc.sinks[0].is_cancelled());
}

#[test]
fn expect_100_continue_before_the_body() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let body = r#"{"prompt":"x","max_tokens":1}"#;
    let head = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    h.read(head.as_bytes());
    assert_eq!(h.pending(), "HTTP/1.1 100 Continue\r\n\r\n");
    h.flush();
    assert!(!h.holds_output_buffer());
    // Part of the body: no second 100.
    h.at(5).read(&body.as_bytes()[..5]);
    assert_eq!(h.pending(), "");
    h.at(6).read(&body.as_bytes()[5..]);
    let out = h.flush();
    assert!(out.starts_with(&sse_head("1000")), "{out}");
    assert!(out.ends_with(LAST));
    assert_eq!(h.summary().outcome, Outcome::Completed);
}

#[test]
fn idle_session_holds_no_output_buffer() {
    let mut h = H::new(&["--sim-ttft-ms", "50", "--sim-itl-ms", "20"]);
    assert!(!h.holds_output_buffer());
    h.read(b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Le");
    assert!(!h.holds_output_buffer(), "a partial request writes nothing");
    h.read(b"ngth: 29\r\n\r\n{\"prompt\":\"x\",\"max_tokens\":2}");
    assert!(h.is_streaming());
    assert!(h.holds_output_buffer());
    h.flush();
    assert!(
        !h.holds_output_buffer(),
        "a stream waiting for its first token"
    );
    h.run_until(1000);
    assert!(!h.holds_output_buffer(), "between requests");
    h.read(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    h.flush();
    assert!(!h.holds_output_buffer());
    assert_eq!(h.e.pooled_buffers(), 1, "one allocation, reused");
}

#[test]
fn a_request_in_many_small_reads() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let req = post(r#"{"prompt":"x","max_tokens":2}"#);
    for (i, b) in req.as_bytes().iter().enumerate() {
        assert!(!h.is_streaming());
        h.at(i as u64).read(std::slice::from_ref(b));
    }
    let out = h.flush();
    assert!(out.starts_with(&sse_head("1000")));
    assert_eq!(h.summary().tokens, 2);
}

#[test]
fn connection_close_on_http11_stream_closes_after_done() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let body = r#"{"prompt":"x","max_tokens":1}"#;
    let req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    h.read(req.as_bytes());
    let out = h.flush();
    assert!(
        out.starts_with(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\nX-Request-Id: 1000\r\n"
        ),
        "{out}"
    );
    assert!(out.ends_with(LAST), "the chunked body still ends properly");
    assert!(h.wants_half_close());
}

#[test]
fn http10_plain_responses_follow_the_keep_alive_header() {
    let mut h = H::new(&[]);
    h.read(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(
        h.flush(),
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\
         Connection: keep-alive\r\nX-Request-Id: 1000\r\n\r\nok"
    );
    assert!(!h.wants_half_close());
    h.read(b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(
        h.flush(),
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\
         Connection: close\r\nX-Request-Id: 1001\r\n\r\nok"
    );
    assert!(h.wants_half_close());
}

#[test]
fn an_empty_sim_answer_is_just_done() {
    let mut h = H::new(&["--sim-ttft-ms", "50", "--sim-tokens", "0"]);
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.flush();
    assert_eq!(h.deadline(), Some(ms(50)));
    h.at(49).timeout();
    assert_eq!(h.pending(), "");
    h.at(50).timeout();
    let out = h.flush();
    let (chunks, after) = dechunk(&out);
    assert_eq!(after, "");
    assert_eq!(chunks.len(), 1);
    assert!(
        chunks[0].starts_with(
            "id: 1000:1\nevent: done\ndata: {\"finish_reason\":\"stop\",\"usage\":\
             {\"prompt_tokens\":1,\"completion_tokens\":0}"
        ),
        "{:?}",
        chunks[0]
    );
    assert!(!chunks[0].contains("ttft_ms"), "no token, no ttft");
    assert_eq!(h.summary().ttft, None);
}

#[test]
fn a_token_due_with_the_heartbeat_replaces_it() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "1000",
        "--sim-itl-ms",
        "1000",
        "--heartbeat-ms",
        "1000",
    ]);
    let words = sim_words("x", 3, 64);
    h.read(post(r#"{"prompt":"x","max_tokens":3}"#).as_bytes());
    h.flush();
    h.run_until(10_000);
    let t = h.transcript();
    let (chunks, _) = dechunk(t.strip_prefix(&sse_head("1000")).unwrap());
    assert_eq!(h.metrics.heartbeats_sent.load(Relaxed), 0, "{chunks:?}");
    assert_eq!(chunks[0], tok(words[0]));
}

#[test]
fn expect_100_continue_is_not_sent_when_the_body_is_here() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let body = r#"{"prompt":"x","max_tokens":1}"#;
    let req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    h.read(req.as_bytes());
    assert!(h.flush().starts_with(&sse_head("1000")));
}

#[test]
fn timeouts_cancel_the_worker_job() {
    let mut h = H::with(&["--max-stream-ms", "100"], Mode2::Sink { capacity: 8 });
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.flush();
    let sink = h.svc.sinks[0].clone();
    sink.push_token("a").unwrap();
    h.ready(0x1000);
    // Pieces for some other stream are not this one's.
    sink.push_token("b").unwrap();
    h.ready(0x9999);
    assert_eq!(h.pending(), chunk(&tok("a")));
    // (Once written, the session takes what waits anyway.)
    assert_eq!(h.flush(), chunk(&tok("a")) + &chunk(&tok("b")));
    assert_eq!(h.deadline(), Some(ms(100)));
    h.at(100).timeout();
    assert!(sink.is_cancelled());
    assert!(h.flush().starts_with(&chunk(&error_frame(
        "1000",
        3,
        r#"{"code":"deadline_exceeded","message":"the stream ran longer than 100 ms","retryable":false}"#
    ))));
    assert_eq!(h.summary().tokens, 2);
    assert_eq!(h.metrics.generations_cancelled.load(Relaxed), 1);

    let mut h = H::with(&["--write-timeout-ms", "50"], Mode2::Sink { capacity: 8 });
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.write_blocked();
    h.at(50).timeout();
    assert!(h.svc.sinks[0].is_cancelled());
    assert_eq!(
        h.summary().outcome,
        Outcome::Errored(ErrorCode::SlowConsumer)
    );
}

// ------------------------------------------------------- suspected bugs

#[test]
fn partial_pipelined_head_gets_the_header_timeout() {
    let mut h = H::new(&["--header-timeout-ms", "1000", "--idle-timeout-ms", "60000"]);
    h.read(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /hea");
    h.flush();
    assert_eq!(h.deadline(), Some(ms(1000)));
    h.at(1000).timeout();
    assert!(
        h.pending().starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{}",
        h.pending()
    );
}

#[test]
fn pipelined_input_over_the_limit_is_not_lost() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "50",
        "--sim-itl-ms",
        "20",
        "--max-head-bytes",
        "256",
        "--max-body-bytes",
        "256",
    ]);
    h.read(post(r#"{"prompt":"x","max_tokens":2}"#).as_bytes());
    h.flush();
    let one = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    // Past one head's worth (256 bytes here) reading pauses while the
    // stream runs, but what was already read is kept.
    h.at(1).read(one.repeat(16).as_bytes());
    assert!(!h.wants_read());
    h.at(2).read(one.repeat(5).as_bytes());
    // Reading may pause, but what was read must not be thrown away.
    h.run_until(1000);
    for _ in 0..10 {
        h.read(b"");
        h.flush();
    }
    assert_eq!(
        h.svc.ops_calls.len(),
        21,
        "every pipelined request answered"
    );
}

#[test]
fn ttft_of_one_stream_is_not_given_to_the_next() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "50",
        "--sim-itl-ms",
        "20",
        "--write-timeout-ms",
        "100000",
    ]);
    let mut input = post(r#"{"prompt":"x","max_tokens":2}"#);
    input.push_str(&post(r#"{"prompt":"y","max_tokens":2}"#));
    h.read(input.as_bytes());
    // The socket is slow: stream 1 runs to its end unwritten, and stream 2 starts.
    for t in [50, 70] {
        h.at(t).timeout();
    }
    assert_eq!(h.stream_id(), Some(0x1001));
    // Stream 1's bytes leave now; stream 2 has not produced anything.
    h.at(80).flush();
    // The client of stream 2 leaves before its first token.
    h.at(90).eof();
    let s2 = &h.svc.ended[1];
    assert_eq!(s2.id, 0x1001);
    assert_eq!(s2.tokens, 0);
    assert_eq!(s2.ttft, None, "stream 2 sent no token: {:?}", s2.ttft);
}

// ---------------------------------------------------------------- API keys

fn with_keys(flags: &[&str]) -> H {
    let mut h = H::new(flags);
    let cfg = Config::for_tests(flags);
    h.e.set_auth(crate::auth::Auth::from_config(&cfg).expect("test keys"));
    h
}

#[test]
fn api_keys_are_checked_before_any_work() {
    let mut h = with_keys(&["--api-key", "first-key-123", "--api-key", "second-key-456"]);
    let cases: [(&[u8], &str); 4] = [
        (
            b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            "an API key is required",
        ),
        (
            b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope-nope-nope\r\nContent-Length: 2\r\n\r\n{}",
            "the API key is not valid",
        ),
        (
            // The query's token is for GET only.
            b"POST /v1/chat/stream?access_token=first-key-123 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            "an API key is required",
        ),
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Zmlyc3Qta2V5LTEyMw==\r\n\r\n",
            "an API key is required",
        ),
    ];
    for (req, msg) in cases {
        h.read(req);
        let got = h.flush();
        assert!(got.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{got}");
        assert!(got.contains("WWW-Authenticate: Bearer\r\n"), "{got}");
        assert!(got.contains(msg), "{got}");
        assert!(
            !got.contains("first-key-123") && !got.contains("nope-nope"),
            "{got}"
        );
        assert!(!h.is_closed(), "401 keeps the connection");
    }
    assert!(
        h.svc.admitted.is_empty(),
        "no backend work for a refused key"
    );
    // The OpenAI endpoints answer in OpenAI's shape.
    let body = r#"{"messages":[{"role":"user","content":"x"}]}"#;
    h.read(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let got = h.flush();
    assert!(got.contains("\"type\":\"authentication_error\""), "{got}");
    assert!(got.contains("\"code\":\"unauthorized\""), "{got}");
}

#[test]
fn a_valid_key_names_its_principal() {
    let mut h = with_keys(&[
        "--api-key",
        "first-key-123",
        "--api-key",
        "second-key-456",
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "0",
    ]);
    let reqs: [&[u8]; 3] = [
        b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer second-key-456\r\nContent-Length: 29\r\n\r\n{\"prompt\":\"a\",\"max_tokens\":1}",
        b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nX-Api-Key: first-key-123\r\nContent-Length: 29\r\n\r\n{\"prompt\":\"a\",\"max_tokens\":1}",
        b"GET /v1/chat/stream?prompt=a&max_tokens=1&access_token=first-key-123 HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for req in reqs {
        h.read(req);
        let got = h.flush();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("event: done"), "{got}");
    }
    let principals: Vec<Option<&str>> =
        h.svc.ended.iter().map(|s| s.principal.as_deref()).collect();
    assert_eq!(
        principals,
        vec![Some("key-2"), Some("key-1"), Some("key-1")]
    );
}

#[test]
fn ops_preflights_and_the_page_need_no_key_unless_metrics_key_is_set() {
    let mut h = with_keys(&[
        "--api-key",
        "first-key-123",
        "--metrics-key",
        "scrape-key-789",
        "--cors-origin",
        "https://app.example",
    ]);
    for path in ["/healthz", "/readyz", "/"] {
        h.read(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        assert!(h.flush().starts_with("HTTP/1.1 200 OK"), "{path}");
    }
    h.read(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\n\r\n");
    assert!(h.flush().starts_with("HTTP/1.1 204 No Content"));
    h.read(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(h.flush().starts_with("HTTP/1.1 401 Unauthorized"));
    // An API key is not the metrics key.
    h.read(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer first-key-123\r\n\r\n");
    assert!(h.flush().starts_with("HTTP/1.1 401 Unauthorized"));
    h.read(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer scrape-key-789\r\n\r\n");
    assert!(h.flush().starts_with("HTTP/1.1 200 OK"));
    assert_eq!(h.svc.ops_calls.len(), 3, "healthz, readyz, metrics once");
}

// ------------------------------------------------------------ cost control

fn chat(body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn allow_model_refuses_other_models_and_lists_the_allowed() {
    let mut h = H::new(&["--allow-model", "small", "--allow-model", "org/tiny"]);
    h.read(chat(r#"{"model":"huge","messages":[{"role":"user","content":"x"}]}"#).as_bytes());
    let got = h.flush();
    assert!(got.starts_with("HTTP/1.1 400 Bad Request"), "{got}");
    assert!(got.contains("\"code\":\"model_not_allowed\""), "{got}");
    assert!(got.contains("\"type\":\"invalid_request_error\""), "{got}");
    h.read(post(r#"{"prompt":"x","model":"huge"}"#).as_bytes());
    let got = h.flush();
    assert!(
        got.contains("{\"error\":{\"code\":\"model_not_allowed\""),
        "{got}"
    );
    assert!(h.svc.admitted.is_empty());
    assert!(!h.is_closed(), "the connection is kept");
    h.read(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n");
    let got = h.flush();
    assert!(
        got.contains("\"id\":\"small\"") && got.contains("\"id\":\"org/tiny\""),
        "{got}"
    );
    h.read(b"GET /v1/models/org/tiny HTTP/1.1\r\nHost: x\r\n\r\n");
    let got = h.flush();
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    assert!(got.contains("\"object\":\"model\""), "{got}");
    h.read(b"GET /v1/models/huge HTTP/1.1\r\nHost: x\r\n\r\n");
    let got = h.flush();
    assert!(got.starts_with("HTTP/1.1 404 Not Found"), "{got}");
    assert!(got.contains("\"type\":\"not_found_error\""), "{got}");
    h.read(chat(r#"{"model":"small","messages":[{"role":"user","content":"x"}]}"#).as_bytes());
    assert_eq!(h.svc.admitted.len(), 1);
}

#[test]
fn drop_field_removes_fields_before_forwarding() {
    let mut h = H::new(&[
        "--drop-field",
        "service_tier",
        "--drop-field",
        "temperature",
        "--drop-field",
        "max_tokens",
    ]);
    h.read(
        chat(r#"{"messages":[{"role":"user","content":"x"}],"service_tier":"priority","store":true,"temperature":0.2,"max_tokens":5}"#)
            .as_bytes(),
    );
    let gen = &h.svc.admitted[0].1;
    assert!(gen.extra_field("service_tier").is_none());
    assert!(
        gen.extra_field("store").is_some(),
        "only the named fields go"
    );
    assert_eq!(gen.temperature, None);
    assert_eq!(gen.max_tokens_field, None, "not forwarded");
    assert_eq!(gen.max_tokens, 5, "but still the local cut");
}

// ------------------------------------------------------------ stop by id

impl H {
    /// Opens another connection; returns its key.
    fn open_other(&mut self) -> usize {
        self.e.open((), None, self.now)
    }

    /// Sends `req` on connection `key` and takes everything it gets back.
    fn roundtrip_on(&mut self, key: usize, req: &[u8]) -> String {
        self.e.handle_read(&mut self.svc, key, req, self.now);
        let out = String::from_utf8(self.e.pending(key).to_vec()).unwrap();
        let n = out.len();
        self.e.handle_written(&mut self.svc, key, n, self.now);
        out
    }
}

/// A tick due for more streams than a slice is handled over several calls,
/// each stream once and in order; between calls the server polls its
/// sockets (the engine asks for a zero poll timeout while some are left).
#[test]
fn a_tick_due_for_many_streams_is_handled_in_slices() {
    let mut h = H::new(&["--sim-ttft-ms", "50", "--sim-itl-ms", "1000"]);
    let n = 2 * TIMER_SLICE + 10;
    let mut keys = vec![K];
    keys.extend((1..n).map(|_| h.open_other()));
    for &k in &keys {
        h.e.new_phase();
        let got = h.roundtrip_on(k, post(r#"{"prompt":"x","max_tokens":2}"#).as_bytes());
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    }
    assert_eq!(h.e.next_timeout(h.now), Some(ms(50)));
    h.at(50);
    let mut tokens = vec![0; n];
    let mut slices = Vec::new();
    let mut left = None;
    loop {
        h.timeout();
        let mut got = 0;
        for (i, &k) in keys.iter().enumerate() {
            let out = String::from_utf8(h.e.pending(k).to_vec()).unwrap();
            if !out.is_empty() {
                h.e.handle_written(&mut h.svc, k, out.len(), h.now);
                tokens[i] += out.matches("event: token").count();
                got += 1;
            }
        }
        slices.push(got);
        if h.e.next_timeout(h.now) != Some(Duration::ZERO) {
            break;
        }
        if slices.len() == 1 {
            // Between slices: a client whose entry is still to come leaves.
            let i = tokens
                .iter()
                .position(|&t| t == 0)
                .expect("one still to come");
            left = Some(i);
            h.e.handle_eof(&mut h.svc, keys[i], h.now);
        }
    }
    let left = left.expect("a client left between slices");
    assert_eq!(slices, [TIMER_SLICE, TIMER_SLICE, 9]);
    for (i, &t) in tokens.iter().enumerate() {
        let want = usize::from(i != left);
        assert_eq!(
            t, want,
            "stream {i}: its token once (none for the one that left)"
        );
    }
    assert_eq!(h.e.next_timeout(h.now), Some(ms(1000)), "the next tick");
}

#[test]
fn a_stream_stops_by_its_id_from_another_connection() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "100"]);
    h.read(post(r#"{"prompt":"a long one","max_tokens":50}"#).as_bytes());
    h.flush();
    assert!(h.is_streaming());
    let other = h.open_other();
    let cancel = |sid: &str| {
        format!(
            "POST /v1/chat/stream/{sid}/cancel HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let got = h.roundtrip_on(other, cancel("nope").as_bytes());
    assert!(got.starts_with("HTTP/1.1 404 Not Found"), "{got}");
    assert!(got.contains("stream_not_found"), "{got}");
    let got = h.roundtrip_on(other, cancel("1000").as_bytes());
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    assert!(got.contains("\"cancelled\":true"), "{got}");
    let (chunks, _) = dechunk(h.flush().as_str());
    let last = events(&chunks.concat()).pop().unwrap();
    assert!(
        last.starts_with("id: 1000:2\nevent: error\ndata: {\"code\":\"cancelled\""),
        "{last}"
    );
    assert!(last.contains("\"retryable\":false"), "{last}");
    assert!(
        !h.is_streaming() && !h.is_closed(),
        "the connection is kept"
    );
    assert_eq!(h.summary().outcome, Outcome::Errored(ErrorCode::Cancelled));
    // Ended: a second cancel finds nothing.
    let got = h.roundtrip_on(other, cancel("1000").as_bytes());
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
    // A GET is not a cancel.
    let got = h.roundtrip_on(
        other,
        b"GET /v1/chat/stream/1000/cancel HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 405"), "{got}");
}

#[test]
fn only_the_principal_that_started_a_stream_may_stop_it() {
    let mut h = with_keys(&[
        "--api-key",
        "alice-key-123",
        "--api-key",
        "bobby-key-456",
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "100",
    ]);
    h.read(b"GET /v1/chat/stream?prompt=x&max_tokens=50 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key-123\r\n\r\n");
    h.flush();
    assert!(h.is_streaming());
    let other = h.open_other();
    let cancel = |key: &str| {
        format!("POST /v1/chat/stream/1000/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 0\r\n\r\n")
    };
    let got = h.roundtrip_on(other, cancel("bobby-key-456").as_bytes());
    assert!(got.starts_with("HTTP/1.1 404"), "another principal: {got}");
    assert!(h.is_streaming());
    let got = h.roundtrip_on(other, cancel("alice-key-123").as_bytes());
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(!h.is_streaming());
}

// ------------------------------------------------------------------ resume

impl H {
    fn read_on(&mut self, key: usize, data: &[u8]) {
        self.e.handle_read(&mut self.svc, key, data, self.now);
    }

    /// Everything pending on `key`, as if its socket took it all.
    fn flush_on(&mut self, key: usize) -> String {
        let mut out = Vec::new();
        loop {
            let p = self.e.pending(key).to_vec();
            if p.is_empty() {
                break;
            }
            out.extend_from_slice(&p);
            self.e.handle_written(&mut self.svc, key, p.len(), self.now);
        }
        String::from_utf8(out).unwrap()
    }

    /// Moves the clock to the next deadline of anything (at most `limit`
    /// ms from t0) and runs the timers; false when there was none.
    fn step(&mut self, limit: u64) -> bool {
        let next = self.e.next_timeout(self.now).map(|d| self.now + d);
        match next {
            Some(t) if t <= self.t0 + ms(limit) => {
                self.now = t.max(self.now);
                self.timeout();
                true
            }
            _ => false,
        }
    }
}

/// `(seq, kind, data)` of each event with an `id:` line in an SSE body
/// (chunk framing removed by the caller).
fn ided(body: &str) -> Vec<(u64, String, String)> {
    events(body)
        .iter()
        .filter_map(|e| {
            let mut lines = e.lines();
            let id = lines.next()?.strip_prefix("id: ")?;
            let seq = id.rsplit_once(':')?.1.parse().ok()?;
            let kind = lines.next()?.strip_prefix("event: ")?.to_string();
            let data = lines.next()?.strip_prefix("data: ")?.to_string();
            Some((seq, kind, data))
        })
        .collect()
}

/// The SSE body of a chunked response that may still be going on.
fn body_of(resp: &str) -> String {
    let Some((_, rest)) = resp.split_once("\r\n\r\n") else {
        return String::new();
    };
    let mut out = String::new();
    let mut s = rest;
    while let Some((size, after)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size, 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        s = after[n..].strip_prefix("\r\n").unwrap_or("");
    }
    out
}

const RESUME: [&str; 6] = [
    "--sim-ttft-ms",
    "10",
    "--sim-itl-ms",
    "10",
    "--resume-window-ms",
    "1000",
];

#[test]
fn a_client_that_drops_anywhere_and_resumes_gets_every_event_once() {
    let n = 8;
    let words = sim_words("resume me", n, 64);
    for cut in 0..=n {
        let mut h = H::new(&RESUME);
        h.read(post(r#"{"prompt":"resume me","max_tokens":8}"#).as_bytes());
        let mut first = h.flush();
        assert!(first.contains("retry: 1000\n\n"), "{first}");
        while ided(&body_of(&first)).len() < cut as usize {
            assert!(h.step(10_000));
            first.push_str(&h.flush());
        }
        // The connection drops; the stream goes on into its log.
        h.eof();
        assert!(
            h.svc
                .ended
                .iter()
                .all(|s| s.outcome != Outcome::Disconnected),
            "cut {cut}: not cancelled"
        );
        // 25 ms pass: two or three more tokens, maybe the end, go into
        // the log (not so long that a finished stream's window ends).
        let until = (h.now - h.t0).as_millis() as u64 + 25;
        while h.step(until) {}
        let seen = ided(&body_of(&first));
        let last = seen.last().map_or(0, |e| e.0);
        let other = h.open_other();
        h.read_on(
            other,
            format!(
                "GET /v1/chat/stream HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1000:{last}\r\n\r\n"
            )
            .as_bytes(),
        );
        let mut second = h.flush_on(other);
        assert!(second.starts_with("HTTP/1.1 200 OK"), "cut {cut}: {second}");
        while !second.contains("event: done") && h.step(10_000) {
            second.push_str(&h.flush_on(other));
        }
        let all: Vec<(u64, String, String)> =
            seen.into_iter().chain(ided(&body_of(&second))).collect();
        let seqs: Vec<u64> = all.iter().map(|e| e.0).collect();
        assert_eq!(
            seqs,
            (1..=u64::from(n) + 1).collect::<Vec<_>>(),
            "cut {cut}"
        );
        let texts: Vec<String> = all
            .iter()
            .filter(|e| e.1 == "token")
            .map(|e| {
                serde_json::from_str::<serde_json::Value>(&e.2).unwrap()["t"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(texts, words, "cut {cut}");
        assert_eq!(all.last().unwrap().1, "done", "cut {cut}");
        assert_eq!(h.svc.ended.len(), 1);
        assert_eq!(
            h.summary().outcome,
            Outcome::Completed,
            "counted once, completed"
        );
        assert_eq!(h.metrics.resumes.load(Relaxed), 1);
    }
}

#[test]
fn a_detached_stream_is_cancelled_when_its_window_runs_out() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "10",
        "--sim-itl-ms",
        "1000",
        "--resume-window-ms",
        "200",
    ]);
    h.read(post(r#"{"prompt":"x","max_tokens":50}"#).as_bytes());
    h.flush();
    h.eof();
    assert_eq!(h.metrics.streams_detached.load(Relaxed), 1);
    h.at(199).timeout();
    assert!(h.svc.ended.is_empty());
    h.at(200).timeout();
    assert_eq!(h.summary().outcome, Outcome::Disconnected);
    assert_eq!(h.metrics.streams_detached.load(Relaxed), 0);
    assert_eq!(h.e.streams(), 0, "nothing kept after the window");
    let other = h.open_other();
    let got = h.roundtrip_on(
        other,
        b"GET /v1/chat/stream HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1000:0\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 204 No Content"), "{got}");
    let got = h.roundtrip_on(
        other,
        b"GET /v1/chat/stream/1000?after=0 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
    assert!(got.contains("stream_not_found"), "{got}");
}

#[test]
fn a_new_subscriber_supersedes_the_old_one() {
    let mut h = H::new(&RESUME);
    h.read(post(r#"{"prompt":"x","max_tokens":8}"#).as_bytes());
    h.flush();
    h.step(10_000);
    h.flush();
    let other = h.open_other();
    let got = h.roundtrip_on(
        other,
        b"GET /v1/chat/stream/1000?after=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    let old = h.flush();
    assert!(
        old.contains("event: error\ndata: {\"code\":\"superseded\""),
        "{old}"
    );
    assert!(old.contains("\"retryable\":false"), "{old}");
    assert!(old.ends_with("0\r\n\r\n"), "the old body ends: {old:?}");
    assert!(
        !h.is_streaming() && !h.is_closed(),
        "the old connection is kept"
    );
    assert!(h.svc.ended.is_empty(), "the stream goes on");
    assert_eq!(
        h.svc.resumed,
        [(
            "/v1/chat/stream/1000".to_string(),
            "1000".to_string(),
            Some(1)
        )]
    );
}

#[test]
fn a_finished_stream_can_be_fetched_again_within_the_window() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "0",
        "--resume-window-ms",
        "500",
    ]);
    h.read(post(r#"{"prompt":"x","max_tokens":3}"#).as_bytes());
    let full = h.flush();
    assert!(full.contains("event: done"));
    let other = h.open_other();
    let got = h.roundtrip_on(
        other,
        b"GET /v1/chat/stream/1000 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let evs = ided(&body_of(&got));
    assert_eq!(
        evs.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(got.ends_with("0\r\n\r\n"), "ends after the replayed done");
    h.at(500).timeout();
    assert_eq!(h.e.streams(), 0, "dropped after the window");
}

#[test]
fn without_resume_a_disconnect_cancels_at_once_and_nothing_is_kept() {
    let mut h = H::new(&["--sim-ttft-ms", "10", "--sim-itl-ms", "10"]);
    h.read(post(r#"{"prompt":"x","max_tokens":8}"#).as_bytes());
    let got = h.flush();
    assert!(!got.contains("retry:"), "{got}");
    h.step(10_000);
    assert!(!h.flush().contains("id: 1000:1\n"), "no ids on tokens");
    h.eof();
    assert_eq!(h.summary().outcome, Outcome::Disconnected);
    assert_eq!(h.e.streams(), 0);
}

#[test]
fn a_detached_stream_whose_log_fills_is_cancelled() {
    let mut h = H::new(&[
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "1",
        "--sim-tokens",
        "4000",
        "--resume-window-ms",
        "60000",
        "--resume-buffer-bytes",
        "2048",
    ]);
    h.read(post(r#"{"prompt":"x","max_tokens":4000}"#).as_bytes());
    h.flush();
    h.eof();
    for _ in 0..200 {
        if !h.step(100_000) {
            break;
        }
    }
    assert_eq!(h.summary().outcome, Outcome::Disconnected);
    assert!(h.summary().tokens < 100, "stopped when 2 KiB were logged");
    assert_eq!(h.metrics.replay_bytes.load(Relaxed), 0);
}

#[test]
fn resume_belongs_to_the_principal_that_started_the_stream() {
    let mut h = with_keys(&[
        "--api-key",
        "alice-key-123",
        "--api-key",
        "bobby-key-456",
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "100",
        "--resume-window-ms",
        "1000",
    ]);
    h.read(b"GET /v1/chat/stream?prompt=x&max_tokens=50 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-key-123\r\n\r\n");
    h.flush();
    h.eof();
    let other = h.open_other();
    let got = h.roundtrip_on(
        other,
        b"GET /v1/chat/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bobby-key-456\r\nLast-Event-ID: 1000:0\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 204"), "{got}");
    let got = h.roundtrip_on(
        other,
        b"GET /v1/chat/stream/1000?access_token=alice-key-123 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    assert_eq!(
        h.svc.resumed,
        [(
            "/v1/chat/stream/1000".to_string(),
            "1000".to_string(),
            Some(0)
        )],
        "one access line, for the resume that was answered with the stream"
    );
}

// --------------------------------------------------------------- redaction

fn with_redaction(flags: &[&str], mode: Mode2) -> H {
    let mut h = H::with(flags, mode);
    let r = crate::redact::from_config(&h.cfg, &h.metrics)
        .unwrap()
        .unwrap();
    h.e.set_redactor(r);
    h
}

#[test]
fn a_secret_split_over_tokens_is_redacted_on_every_endpoint() {
    let flags = ["--redact", "secret-[0-9]{4}"];
    let tokens = ["my secr", "et-12", "34 is here", "!", "(cut)"];
    let requests = [
        post(r#"{"prompt":"x","max_tokens":4}"#),
        post(r#"{"prompt":"x","max_tokens":4,"stream":false}"#),
        chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":4,"stream":true}"#),
        chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":4}"#),
    ];
    for (i, req) in requests.iter().enumerate() {
        let mut h = with_redaction(&flags, Mode2::Sink { capacity: 16 });
        h.read(req.as_bytes());
        let sink = h.svc.sinks[0].clone();
        for t in tokens {
            sink.push_token(t).unwrap();
            h.ready(0x1000);
        }
        let out = h.flush();
        assert!(
            !out.contains("secr") && !out.contains("1234"),
            "request {i}: {out}"
        );
        let joined: String = match i {
            0 | 2 => {
                let body = dechunk(out.split_once("\r\n\r\n").unwrap().1).0.concat();
                if i == 0 {
                    token_texts(&body).concat()
                } else {
                    events(&body)
                        .iter()
                        .filter_map(|e| e.strip_prefix("data: "))
                        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                        .filter_map(|v| {
                            v["choices"][0]["delta"]["content"]
                                .as_str()
                                .map(String::from)
                        })
                        .collect()
                }
            }
            _ => out.clone(),
        };
        assert!(
            joined.contains("my [REDACTED] is here!"),
            "request {i}: {joined}"
        );
        assert_eq!(h.summary().outcome, Outcome::Completed, "request {i}");
    }
}

#[test]
fn redactions_are_counted_by_rule() {
    let mut h = with_redaction(
        &["--redact", "secret-[0-9]{4}", "--sim-ttft-ms", "0"],
        Mode2::Sink { capacity: 16 },
    );
    h.read(post(r#"{"prompt":"x","max_tokens":2}"#).as_bytes());
    let sink = h.svc.sinks[0].clone();
    for t in ["secret-1111 and secret-2222", " ok", "(cut)"] {
        sink.push_token(t).unwrap();
        h.ready(0x1000);
    }
    let text = h.metrics.render(false);
    assert!(
        text.contains("sluice_redactions_total{rule=\"custom_1\"} 2"),
        "{text}"
    );
}

// ------------------------------------------------ hostile clients (issue 10)

/// A second connection on `h`'s engine, from `peer`.
fn open_from(h: &mut H, peer: &str) -> usize {
    let key = h.e.open((), Some(peer.parse().unwrap()), h.now);
    h.e.check_peer_limit(&mut h.svc, key, h.now);
    key
}

fn post_len(len: usize) -> String {
    format!("POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n")
}

#[test]
fn head_is_answered_like_get_without_a_body() {
    let mut h = H::new(&[]);
    h.read(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        h.flush(),
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nX-Request-Id: 1000\r\n\r\n"
    );
    // A HEAD never starts a stream: 405, head only.
    h.read(b"HEAD /v1/chat/stream?prompt=hi HTTP/1.1\r\nHost: x\r\n\r\n");
    let out = h.flush();
    assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
    assert!(out.ends_with("Allow: GET, POST\r\n\r\n"), "{out}");
    h.read(b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let out = h.flush();
    let (first, second) = out.split_once("\r\n\r\n").unwrap();
    assert!(first.starts_with("HTTP/1.1 404 "), "{out}");
    assert!(second.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(second.ends_with("\r\n\r\nok"), "{out}");
    assert!(h.svc.admitted.is_empty());
    // A HEAD the reader refuses gets no body either.
    h.read(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nExpect: nothing\r\n\r\n");
    let out = h.flush();
    assert!(out.starts_with("HTTP/1.1 417 "), "{out}");
    assert!(out.ends_with("\r\n\r\n"), "{out}");
}

#[test]
fn a_chunked_body_is_decoded_as_it_arrives() {
    let mut h = H::new(&["--max-body-bytes", "1048576"]);
    h.read(b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    // 1-byte chunks: six bytes of framing each, none of it kept.
    let chunks = "1\r\n \r\n".repeat(10_000);
    for piece in chunks.as_bytes().chunks(4093) {
        h.read(piece);
        // The reservation, and at most a framing line beside it.
        assert!(h.conn().charge() <= (1 << 20) + 8, "{}", h.conn().charge());
    }
    // The connection holds its reservation, not the raw upload.
    assert_eq!(h.e.buffered_bytes(), 1 << 20);
    h.read(b"3\r\n{}\n\r\n0\r\n\r\n");
    let out = h.flush();
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert_eq!(h.e.buffered_bytes(), 0);
    // 1-byte chunks with 1 KiB extensions: refused within a few dozen.
    let mut h = H::new(&[]);
    h.read(b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    let ext = format!("1;{}\r\nx\r\n", "e".repeat(1000));
    for i in 0..40 {
        h.read(ext.as_bytes());
        if h.conn().is_reading() {
            assert!(i < 20, "still reading after {i} chunks");
        }
    }
    let out = h.flush();
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert!(out.contains("chunk extensions too large"), "{out}");
    // The access log names the request whose body was bad.
    assert_eq!(
        h.svc.access.last(),
        Some(&(400, "/v1/chat/stream".to_string()))
    );
    assert!(out.contains("Connection: close"), "{out}");
    assert_eq!(h.e.buffered_bytes(), 0);
}

#[test]
fn bodies_wait_for_room_in_the_budget_first_come_first_served() {
    let mut h = H::new(&["--max-buffered-bytes", "1000", "--max-body-bytes", "1000"]);
    let b = open_from(&mut h, "127.0.0.1:2");
    let c = open_from(&mut h, "127.0.0.1:3");
    // K reserves 700 of the 1000.
    h.read(post_len(700).as_bytes());
    assert!(h.wants_read());
    assert_eq!(h.e.buffered_bytes(), 700);
    // b's 400 do not fit: it is not read any further, but what came with
    // its head is kept (and counted).
    h.e.handle_read(&mut h.svc, b, post_len(400).as_bytes(), h.now);
    h.e.handle_read(&mut h.svc, b, &[b'{'; 10], h.now);
    assert!(!h.e.wants_read(b));
    assert_eq!(h.e.buffered_bytes(), 710);
    // c's small request came whole with its head: it needs no room (its
    // bytes are read already) and is served without waiting.
    let small = post(r#"{"prompt":"x","max_tokens":1}"#);
    h.e.handle_read(&mut h.svc, c, small.as_bytes(), h.now);
    assert!(h.e.is_attached(c));
    // Room comes back when K's request is whole (a 400: not JSON).
    h.read(&[b'x'; 700]);
    assert_eq!(h.e.buffered_bytes(), 10);
    assert!(!h.e.wants_read(b));
    h.e.fund_waiting();
    assert!(h.e.wants_read(b));
    assert_eq!(h.e.buffered_bytes(), 400);
    // b waited; c did not.
    assert_eq!(h.metrics.budget_waits.load(Relaxed), 1);
}

#[test]
fn a_body_that_never_gets_room_is_503_at_the_header_timeout() {
    let mut h = H::new(&[
        "--max-buffered-bytes",
        "1000",
        "--max-body-bytes",
        "1000",
        "--header-timeout-ms",
        "100",
    ]);
    let b = open_from(&mut h, "127.0.0.1:2");
    h.e.handle_read(&mut h.svc, b, post_len(900).as_bytes(), h.now);
    h.read(post_len(900).as_bytes());
    assert!(!h.wants_read());
    h.at(100).timeout();
    let out = h.flush();
    assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
    assert!(out.contains("\"overloaded\""), "{out}");
    assert!(h.is_closed() || h.wants_half_close());
}

#[test]
fn continue_only_for_a_request_that_will_be_served() {
    let expect = |path: &str, extra: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{extra}Expect: 100-continue\r\nContent-Length: 10\r\n\r\n"
        )
    };
    for (path, status) in [("/nope", "404"), ("/healthz", "405")] {
        let mut h = H::new(&[]);
        h.read(expect(path, "").as_bytes());
        let out = h.flush();
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
        assert!(!out.contains("100 Continue"), "{out}");
        assert!(out.contains("Connection: close"), "{out}");
    }
    let mut h = with_keys(&["--api-key", "key-12345"]);
    h.read(expect("/v1/chat/stream", "").as_bytes());
    assert!(h.flush().starts_with("HTTP/1.1 401 "));
    let mut h = with_keys(&["--api-key", "key-12345"]);
    h.read(expect("/v1/chat/stream", "Authorization: Bearer key-12345\r\n").as_bytes());
    assert_eq!(h.flush(), "HTTP/1.1 100 Continue\r\n\r\n");
    // Over the body limit: 413 and no 100.
    let mut h = H::new(&["--max-body-bytes", "5"]);
    h.read(expect("/v1/chat/stream", "").as_bytes());
    assert!(h.flush().starts_with("HTTP/1.1 413 "));
}

#[test]
fn routing_is_bounded_per_phase() {
    let mut h = H::new(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let b = open_from(&mut h, "127.0.0.1:2");
    let big = format!(r#"{{"prompt":"{}","max_tokens":0}}"#, "a".repeat(200_000));
    let two = post(&big).repeat(2);
    h.e.new_phase();
    h.read(two.as_bytes());
    h.flush();
    // The first went (a 400); 200 KB of 256 KiB are spent, so the second
    // went too; then the phase is over.
    assert_eq!(h.metrics.refused_count(400), 2);
    h.e.handle_read(&mut h.svc, b, two.as_bytes(), h.now);
    assert_eq!(h.metrics.refused_count(400), 2, "left for the next phase");
    assert!(h.e.has_deferred());
    assert!(!h.e.wants_read(b));
    h.e.new_phase();
    h.e.serve_deferred(&mut h.svc, h.now);
    assert_eq!(h.metrics.refused_count(400), 4);
    assert!(!h.e.has_deferred());
    assert!(h.e.wants_read(b));
}

#[test]
fn the_longest_idle_keep_alive_connection_is_evicted() {
    let mut h = H::new(&[]);
    let b = open_from(&mut h, "127.0.0.1:2");
    let c = open_from(&mut h, "127.0.0.1:3");
    let get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    h.at(10).read(get);
    h.flush();
    for (key, t) in [(b, 20), (c, 30)] {
        h.at(t);
        h.e.handle_read(&mut h.svc, key, get, h.now);
        let n = h.e.pending(key).len();
        h.e.handle_written(&mut h.svc, key, n, h.now);
    }
    // K went idle first, but is now in the middle of a request.
    h.at(40).read(b"GET /hea");
    assert_eq!(h.e.evict_idle(), Some(b));
    assert!(h.e.conn(b).unwrap().is_closed());
    assert_eq!(h.e.evict_idle(), Some(c));
    assert_eq!(h.e.evict_idle(), None);
    assert_eq!(h.metrics.connections_evicted.load(Relaxed), 2);
    // A fresh connection that sent nothing yet is not idle either.
    open_from(&mut h, "127.0.0.1:4");
    assert_eq!(h.e.evict_idle(), None);
}

#[test]
fn connections_beyond_the_per_address_limit_get_429() {
    let mut h = H::new(&["--max-connections-per-ip", "2"]);
    let a = open_from(&mut h, "127.0.0.1:2");
    let a2 = open_from(&mut h, "127.0.0.1:9");
    let b = open_from(&mut h, "127.0.0.1:3");
    assert!(h.e.pending(a).is_empty() && h.e.pending(a2).is_empty());
    let out = String::from_utf8(h.e.pending(b).to_vec()).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
        "{out}"
    );
    assert!(out.contains("\"too_many_connections\""), "{out}");
    assert!(out.contains("Connection: close"), "{out}");
    // Another address is not affected; a closed one frees its place.
    let c = open_from(&mut h, "127.0.0.2:2");
    assert!(h.e.pending(c).is_empty());
    h.e.handle_reset(&mut h.svc, a, h.now);
    h.e.remove(a);
    let d = open_from(&mut h, "[::ffff:127.0.0.1]:5");
    assert!(h.e.pending(d).is_empty());
    assert_eq!(h.metrics.refused_count(429), 1);
}

#[test]
fn no_read_takes_more_than_the_budget_has_room_for() {
    const BUDGET: usize = 64 << 10;
    let mut h = H::new(&["--max-buffered-bytes", "65536", "--max-body-bytes", "16384"]);
    let keys: Vec<usize> = (0..20)
        .map(|i| open_from(&mut h, &format!("127.0.0.{}:1", i + 2)))
        .collect();
    // Each declares 16 KiB and sends all but one byte of it, as fast as it
    // is allowed (reads of at most 64 KiB).
    let mut upload = post_len(16384).into_bytes();
    upload.resize(upload.len() + 16383, b' ');
    let mut sent = vec![0; keys.len()];
    for _ in 0..20 {
        for (i, &k) in keys.iter().enumerate() {
            let n =
                h.e.read_allowance(k)
                    .min(upload.len() - sent[i])
                    .min(64 << 10);
            if n > 0 {
                h.e.handle_read(&mut h.svc, k, &upload[sent[i]..sent[i] + n], h.now);
                sent[i] += n;
            }
            assert!(h.e.buffered_bytes() <= BUDGET, "{}", h.e.buffered_bytes());
        }
        h.e.fund_waiting();
    }
    // Three bodies are funded (7/8 of 64 KiB); the rest wait, unread, and
    // the last eighth is left for heads.
    let funded = keys.iter().filter(|&&k| h.e.wants_read(k)).count();
    assert_eq!(sent.iter().filter(|&&n| n == upload.len()).count(), 3);
    assert_eq!(funded, 3, "the funded ones wait for their last byte");
    assert!(h.e.allowance(K) > 0, "a head can still be read");
    h.read(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(h.flush().starts_with("HTTP/1.1 200 OK"));
    // The funded ones leave: the next in line are funded and read.
    for &k in &keys[..3] {
        h.e.handle_reset(&mut h.svc, k, h.now);
        h.e.remove(k);
    }
    h.e.fund_waiting();
    assert_eq!(keys.iter().filter(|&&k| h.e.wants_read(k)).count(), 3);
}

#[test]
fn refusals_log_their_real_duration() {
    let mut h = H::new(&["--header-timeout-ms", "1000"]);
    // A body that trickles in for 300 ms and is not JSON: 400 after 300 ms.
    let req = post("{not json");
    let (a, b) = req.split_at(req.len() - 3);
    h.at(0).read(a.as_bytes());
    h.at(300).read(b.as_bytes());
    assert!(h.flush().starts_with("HTTP/1.1 400"));
    assert_eq!(h.svc.durations, vec![ms(300)]);
    // A head that never completes: 408, after the header timeout.
    h.at(400).read(b"GET /healthz HTTP/1.1\r\n");
    h.at(1400).timeout();
    assert!(h.flush().contains("408 Request Timeout"));
    assert_eq!(h.svc.durations[1], ms(1000));
}

// ------------------------------------------------- the shared resume store

mod remote {
    use super::*;
    use crate::store::testing::TestStore;
    use crate::store::Inbound;
    use crate::store::Query;

    fn with_store(flags: &[&str], queue: usize) -> (H, TestStore) {
        let mut h = H::new(flags);
        let ts = TestStore::new(queue);
        h.svc.store = Some(ts.store.link(|| {}));
        (h, ts)
    }

    /// What the server does at the end of a loop turn.
    fn end_turn(h: &mut H) {
        let broken = h.svc.store.as_mut().unwrap().flush();
        if !broken.is_empty() {
            h.e.store_broken(&broken);
        }
    }

    #[test]
    fn a_resumable_streams_events_go_to_the_store_once_in_order() {
        let (mut h, ts) = with_store(&RESUME, 64);
        h.read(post(r#"{"prompt":"store me","max_tokens":4}"#).as_bytes());
        let mut out = h.flush();
        end_turn(&mut h);
        while h.step(10_000) {
            out.push_str(&h.flush());
            end_turn(&mut h);
        }
        let ops = ts.ops();
        assert_eq!(
            ops,
            [
                "begin 1000 ",
                "event 1000 1",
                "event 1000 2",
                "event 1000 3",
                "event 1000 4",
                "event 1000 5 +end"
            ],
            "{out}"
        );
        // The bytes stored are the bytes sent.
        let mut h2 = with_store(&RESUME, 64);
        h2.0.read(post(r#"{"prompt":"store me","max_tokens":4}"#).as_bytes());
        let mut sent = h2.0.flush();
        end_turn(&mut h2.0);
        while h2.0.step(10_000) {
            sent.push_str(&h2.0.flush());
            end_turn(&mut h2.0);
        }
        let stored: String = h2.1.events().into_iter().map(|e| e.1).collect();
        assert_eq!(body_of(&sent).replace("retry: 1000\n\n", ""), stored);
    }

    #[test]
    fn a_resume_on_the_owner_tells_the_store_so_a_client_elsewhere_is_superseded() {
        let long = [&RESUME[..], &["--sim-tokens", "1000"]].concat();
        let (mut h, ts) = with_store(&long, 4096);
        h.read(post(r#"{"prompt":"again","max_tokens":500}"#).as_bytes());
        h.flush();
        h.eof();
        let other = h.open_other();
        h.read_on(
            other,
            b"GET /v1/chat/stream/1000?after=0 HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(h.flush_on(other).starts_with("HTTP/1.1 200"));
        end_turn(&mut h);
        assert!(ts.ops().contains(&"attach 1000".to_string()));
    }

    #[test]
    fn a_stream_that_is_not_resumable_is_not_stored_and_one_cancelled_is_gone() {
        let (mut h, ts) = with_store(&["--sim-ttft-ms", "10", "--sim-itl-ms", "10"], 64);
        h.read(post(r#"{"prompt":"no resume","max_tokens":2}"#).as_bytes());
        h.flush();
        while h.step(10_000) {
            h.flush();
        }
        end_turn(&mut h);
        assert!(ts.ops().is_empty(), "no --resume-window-ms: nothing stored");

        let long = [&RESUME[..], &["--sim-tokens", "1000"]].concat();
        let (mut h, ts) = with_store(&long, 64);
        h.read(post(r#"{"prompt":"leave","max_tokens":500}"#).as_bytes());
        h.flush();
        h.eof();
        // The window (1 s) runs out while detached: cancelled, gone.
        while h.step(5_000) {}
        end_turn(&mut h);
        let ops = ts.ops();
        assert_eq!(ops.first().map(String::as_str), Some("begin 1000 "));
        assert_eq!(ops.last().map(String::as_str), Some("gone 1000"), "{ops:?}");
    }

    #[test]
    fn a_full_store_queue_marks_the_stream_broken_and_stores_no_more() {
        let (mut h, ts) = with_store(&RESUME, 1);
        h.read(post(r#"{"prompt":"overflow","max_tokens":6}"#).as_bytes());
        h.flush();
        end_turn(&mut h); // the begin and first events fill the queue
        assert!(h.step(10_000));
        h.flush();
        end_turn(&mut h); // refused: broken
        assert_eq!(ts.broken(), vec![Box::<str>::from("1000")]);
        assert_eq!(h.metrics.store_batches_lost.load(Relaxed), 1);
        let first = ts.ops();
        while h.step(10_000) {
            h.flush();
            end_turn(&mut h);
        }
        assert_eq!(
            ts.ops(),
            ["gone 1000"],
            "no event after the gap, only that it is over (had {first:?})"
        );
    }

    /// A resume of a stream this instance does not hold, on connection `K`.
    fn resume_foreign(h: &mut H, ts: &TestStore, req: &str) -> (Arc<TokenSink>, u64) {
        h.read(req.as_bytes());
        assert_eq!(h.pending(), "", "nothing before the store answers");
        match ts.asked() {
            Some(Query::Resume {
                sid,
                after,
                sink,
                principal,
            }) => {
                assert_eq!(&*sid, "elsewhere");
                assert_eq!(principal, None, "auth is off");
                (sink, after)
            }
            _ => panic!("the store was not asked"),
        }
    }

    #[test]
    fn a_relay_whose_store_never_answers_still_ends_at_its_time_limit() {
        let flags = [
            &RESUME[..],
            &["--heartbeat-ms", "1000", "--max-stream-ms", "3000"],
        ]
        .concat();
        let (mut h, ts) = with_store(&flags, 64);
        resume_foreign(
            &mut h,
            &ts,
            "GET /v1/chat/stream/elsewhere?after=2 HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        let mut out = String::new();
        while h.e.streams() > 0 && h.step(60_000) {
            out += &h.flush();
        }
        assert_eq!(h.e.streams(), 0, "the relay ended");
        let at = h.now - h.t0;
        assert!(
            at >= ms(3_000) && at <= ms(3_010),
            "at its time limit, not {at:?}"
        );
        // The client waiting for the relay's head gets the stream's error.
        assert!(out.starts_with("HTTP/1.1 5"), "{out}");
        assert!(out.contains("deadline_exceeded"), "{out}");
        assert!(h.svc.resumed.is_empty(), "never answered with the stream");
    }

    #[test]
    fn a_foreign_stream_is_relayed_from_the_store_as_it_was_encoded() {
        let (mut h, ts) = with_store(&RESUME, 64);
        let (sink, after) = resume_foreign(
            &mut h,
            &ts,
            "GET /v1/chat/stream/elsewhere?after=2 HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert_eq!(after, 2);
        let id = h.stream_id().expect("a relay is attached");
        // Found: the head goes out, then the stored events as they are.
        sink.mark_started(h.now);
        let e3 = "id: elsewhere:3\nevent: token\ndata: {\"t\":\"c\"}\n\n";
        let e4 = "id: elsewhere:4\nevent: token\ndata: {\"t\":\"d\"}\n\n";
        let end = "id: elsewhere:5\nevent: done\ndata: {\"finish_reason\":\"stop\"}\n\n";
        sink.push_token(e3).unwrap();
        h.ready(id);
        let first = h.flush();
        assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
        assert!(first.contains("X-Stream-Id: elsewhere\r\n"), "{first}");
        assert_eq!(body_of(&first), format!("retry: 1000\n\n{e3}"));
        sink.push_token(e4).unwrap();
        sink.push_delta(end).unwrap();
        sink.finish(Ok(Finish {
            finish_reason: "stop".into(),
            prompt_tokens: None,
            completion_tokens: None,
        }));
        h.ready(id);
        let rest = h.flush();
        let (chunks, after_last) = dechunk(&rest);
        assert_eq!(
            chunks.concat(),
            format!("{e4}{end}"),
            "no second terminal event"
        );
        assert_eq!(after_last, "");
        assert!(
            !h.is_streaming() && !h.is_closed(),
            "kept for the next request"
        );
        assert_eq!(h.summary().outcome, Outcome::Completed);
        assert_eq!(h.metrics.remote_resumes.load(Relaxed), 1);
        assert_eq!(
            h.svc.resumed,
            [(
                "/v1/chat/stream/elsewhere".to_string(),
                "elsewhere".to_string(),
                None
            )],
            "logged once, as from the store"
        );
    }

    #[test]
    fn a_relay_whose_owner_died_ends_with_producer_lost_naming_the_last_event_it_got() {
        let (mut h, ts) = with_store(&RESUME, 64);
        let (sink, _) = resume_foreign(
            &mut h,
            &ts,
            "GET /v1/chat/stream/elsewhere?after=7 HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        let id = h.stream_id().unwrap();
        sink.mark_started(h.now);
        sink.push_token("id: elsewhere:8\nevent: token\ndata: {\"t\":\"h\"}\n\n")
            .unwrap();
        sink.finish(Err(StreamError::new(
            ErrorCode::ProducerLost,
            "the instance producing this stream is gone",
        )));
        h.ready(id);
        let out = h.flush();
        let last = events(&body_of(&out)).pop().unwrap();
        assert!(
            last.starts_with("id: elsewhere:8\nevent: error\ndata: {\"code\":\"producer_lost\""),
            "{last}"
        );
        assert!(last.contains("\"retryable\":true"), "{last}");
    }

    #[test]
    fn nothing_to_resume_in_the_store_answers_404_or_204_and_reads_on() {
        for (req, status) in [
            (
                "GET /v1/chat/stream/elsewhere?after=0 HTTP/1.1\r\nHost: x\r\n\r\n",
                "HTTP/1.1 404",
            ),
            (
                "GET /v1/chat/stream HTTP/1.1\r\nHost: x\r\nLast-Event-ID: elsewhere:3\r\n\r\n",
                "HTTP/1.1 204",
            ),
        ] {
            let (mut h, ts) = with_store(&RESUME, 64);
            // A pipelined request waits behind the resume.
            let pipelined = format!("{req}GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
            let (sink, _) = resume_foreign(&mut h, &ts, &pipelined);
            let id = h.stream_id().unwrap();
            sink.finish(Err(StreamError::new(ErrorCode::Internal, "nothing")));
            h.ready(id);
            let out = h.flush();
            assert!(out.starts_with(status), "{out}");
            assert!(out.ends_with("ok"), "then the pipelined request: {out}");
            assert!(!h.is_streaming());
            assert_eq!(h.svc.relays_dropped, 1);
            assert!(h.svc.ended.is_empty(), "no stream was counted");
            assert!(h.svc.resumed.is_empty(), "no resume line for a miss");
        }
    }

    #[test]
    fn without_a_store_a_foreign_id_is_simply_unknown() {
        let mut h = H::new(&RESUME);
        h.read(b"GET /v1/chat/stream/elsewhere?after=0 HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(h.flush().starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn a_stop_of_a_foreign_stream_is_answered_when_the_store_answers() {
        for (found, status) in [(true, "HTTP/1.1 200"), (false, "HTTP/1.1 404")] {
            let (mut h, ts) = with_store(&RESUME, 64);
            h.read(b"POST /v1/chat/stream/elsewhere/cancel HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(h.pending(), "", "waits for the owner");
            let Some(Query::Cancel {
                sid,
                key,
                serial,
                principal,
                ..
            }) = ts.asked()
            else {
                panic!("the store was not asked");
            };
            assert_eq!((&*sid, principal), ("elsewhere", None));
            let now = h.now;
            h.e.handle_inbound(
                &mut h.svc,
                Inbound::CancelAnswer { key, serial, found },
                now,
            );
            let out = h.flush();
            assert!(out.starts_with(status), "{out}");
            assert!(out.ends_with("ok"), "then the pipelined request: {out}");
        }
    }

    #[test]
    fn another_instance_stops_attaches_and_detaches_a_local_stream() {
        // Stop.
        let (mut h, ts) = with_store(&RESUME, 64);
        h.read(post(r#"{"prompt":"a long one","max_tokens":50}"#).as_bytes());
        h.flush();
        let now = h.now;
        let cancel = |sid: &str, q: &str| Inbound::Cancel {
            sid: sid.into(),
            reply: q.into(),
        };
        h.e.handle_inbound(&mut h.svc, cancel("1000", "q1"), now);
        let (chunks, _) = dechunk(h.flush().as_str());
        let last = events(&chunks.concat()).pop().unwrap();
        assert!(last.contains("\"code\":\"cancelled\""), "{last}");
        // The asking instance hears whether it was running: yes, then no.
        h.e.handle_inbound(&mut h.svc, cancel("1000", "q2"), now);
        h.e.handle_inbound(&mut h.svc, cancel("nope", "q3"), now);
        end_turn(&mut h);
        let replies: Vec<String> = ts
            .ops()
            .into_iter()
            .filter(|o| o.starts_with("reply"))
            .collect();
        assert_eq!(replies, ["reply q1 1", "reply q2 0", "reply q3 0"]);

        // Attach: the local client is superseded; the stream goes on for
        // the remote one past the resume window, then detach starts it.
        let long = [&RESUME[..], &["--sim-tokens", "1000"]].concat();
        let (mut h, ts) = with_store(&long, 4096);
        h.read(post(r#"{"prompt":"a long one","max_tokens":500}"#).as_bytes());
        h.flush();
        let now = h.now;
        h.e.handle_inbound(&mut h.svc, Inbound::Attach { sid: "1000".into() }, now);
        let out = h.flush();
        assert!(out.contains("\"code\":\"superseded\""), "{out}");
        assert!(!h.is_streaming(), "the local client is let go");
        while h.step(3_000) {
            end_turn(&mut h);
        }
        assert!(h.svc.ended.is_empty(), "kept going for the remote client");
        assert_eq!(h.metrics.streams_detached.load(Relaxed), 0);
        let stored = ts.ops().len();
        assert!(
            stored > 200,
            "{stored} ops: its events kept going to the store"
        );
        let now = h.now;
        h.e.handle_inbound(&mut h.svc, Inbound::Detach { sid: "1000".into() }, now);
        assert_eq!(h.metrics.streams_detached.load(Relaxed), 1);
        while h.step(5_000) {}
        let ended: Vec<_> = h.svc.ended.iter().map(|s| (s.outcome, s.tokens)).collect();
        assert_eq!(ended, [(Outcome::Disconnected, 399)], "window ran out");
    }
}

/// The shell may stamp a write with its turn's time, older than the engine
/// call that queued the bytes: the streams' clock never goes back, so a
/// token cannot seem to leave before it was made and the next gap is not
/// stretched by the difference.
#[test]
fn the_streams_clock_never_goes_back() {
    let mut h = H::with(&[], Mode2::Sink { capacity: 8 });
    h.read(post(r#"{"prompt":"x"}"#).as_bytes());
    h.flush();
    let sink = h.svc.sinks[0].clone();
    sink.push_token("a").unwrap();
    h.at(100);
    h.ready(0x1000);
    // Arrives before the write, which carries an older time.
    sink.push_token("b").unwrap();
    h.at(95);
    assert!(h.flush().contains("\"t\":\"b\""));
    sink.push_token("c").unwrap();
    h.at(200);
    h.ready(0x1000);
    h.flush();
    // Gaps a→b 0 ms (the same moment, not minus 5 ms) and b→c 100 ms.
    assert_eq!(h.metrics.inter_token.count(), 2);
    assert!(
        h.metrics
            .render(false)
            .lines()
            .any(|l| l.contains("inter_token") && l.contains("_sum") && l.ends_with(" 0.1")),
        "{}",
        h.metrics.render(false)
    );
}
