//! A scriptable fake OpenAI-compatible upstream for the `--backend openai`
//! end-to-end tests (std only, on `127.0.0.1:0`, a thread per connection).
//!
//! It speaks enough HTTP/1.1 to take `POST /v1/chat/completions` requests
//! (Content-Length bodies, several per keep-alive connection), records each
//! request's head and JSON body, and answers by a [`Script`]: the default
//! one, or a route chosen by the last message's content. It counts what the
//! tests assert on: connections accepted, requests served, content chunks
//! fully written (backpressure), and when it noticed that sluice closed the
//! connection while it was streaming or stalled (cancellation).
//!
//! Every thread is bounded: it polls a stop flag every few ms and gives up
//! after [`LIFETIME`]; dropping the [`FakeUpstream`] stops them all.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest any thread of the fake lives.
pub const LIFETIME: Duration = Duration::from_secs(60);
/// How often blocked reads and writes look at the stop flag.
const TICK: Duration = Duration::from_millis(5);

/// How a 200 response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    /// `Content-Length` (the whole body is built first, then written piece by piece).
    Length,
    /// `Connection: close`, no length: the body ends when the fake closes.
    Close,
}

/// A streamed (200) answer.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Content chunks, each with the text [`token_text`]`(i, text_size)`.
    pub chunks: usize,
    /// Pause before each content chunk (the fake watches for a close meanwhile).
    pub delay_ms: u64,
    pub framing: Framing,
    /// CRLF line endings in the SSE body instead of LF.
    pub crlf: bool,
    /// A first chunk with `delta: {"role": "assistant", "content": ""}`.
    pub role_first: bool,
    /// Empty deltas (`{"content": ""}`, `{}`) between the content chunks.
    pub empty_deltas: bool,
    /// Sent in a chunk of its own after the content.
    pub finish_reason: Option<String>,
    /// `(prompt_tokens, completion_tokens)` in a `choices: []` usage chunk.
    pub usage: Option<(u32, u32)>,
    /// `: ping` comment lines inside events and comment-only blocks between them.
    pub comments: bool,
    /// Each event written in several pieces (split mid-line, mid-UTF-8 and,
    /// when chunked, mid chunk framing), with pauses between them.
    pub split_events: bool,
    /// Bytes of text per content chunk (0: just `tok{i}é `).
    pub text_size: usize,
    /// Ends with `data: [DONE]` (false: the body just ends).
    pub done: bool,
    /// Pause after the last event before the body ends (the last chunk,
    /// or the close).
    pub tail_delay_ms: u64,
}

impl Default for StreamSpec {
    fn default() -> StreamSpec {
        StreamSpec {
            chunks: 3,
            delay_ms: 0,
            framing: Framing::Chunked,
            crlf: false,
            role_first: true,
            empty_deltas: false,
            finish_reason: Some("stop".into()),
            usage: None,
            comments: false,
            split_events: false,
            text_size: 0,
            done: true,
            tail_delay_ms: 0,
        }
    }
}

/// What the fake does with a request.
#[derive(Debug, Clone)]
pub enum Script {
    Stream(StreamSpec),
    /// An error status with this JSON body (`Content-Length`, kept alive).
    Status(u16, String),
    /// Head and `after` content chunks, a pause, then a reset (SO_LINGER 0).
    ResetMidStream {
        after: usize,
    },
    /// Head and `after` content chunks, then an event whose data is not JSON.
    MalformedJson {
        after: usize,
    },
    /// Head and `after` content chunks, then silence until sluice closes the
    /// connection, or until [`FakeUpstream::release`] (then a normal end).
    Stall {
        after: usize,
    },
    /// Head and `after` content chunks, then the body ends without `[DONE]`
    /// (chunked: a proper last chunk; close-delimited: a close).
    NoDone {
        after: usize,
        framing: Framing,
    },
    /// Reads the request and closes without answering.
    CloseBeforeHead,
    /// Reads the request and says nothing until sluice closes the connection.
    Silent,
    /// Head and `after` content chunks, then `data: {"error": {"message": …}}`.
    ErrorEvent {
        after: usize,
        message: String,
    },
    /// These bytes verbatim (head and body, framed or misframed by hand),
    /// then a close.
    Raw(Vec<u8>),
}

impl Script {
    /// A plain stream of `chunks` content chunks.
    pub fn chunks(chunks: usize) -> Script {
        Script::Stream(StreamSpec {
            chunks,
            ..StreamSpec::default()
        })
    }
}

/// The text of content chunk `i`; `size` pads it with `x` to that many bytes.
pub fn token_text(i: usize, size: usize) -> String {
    let mut t = format!("tok{i}é ");
    while t.len() < size {
        t.push('x');
    }
    t
}

/// An OpenAI-style error body.
pub fn error_body(message: &str, kind: &str) -> String {
    json!({"error": {"message": message, "type": kind, "code": null}}).to_string()
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Which accepted connection (0, 1, …) carried it.
    pub conn: usize,
    pub method: String,
    pub path: String,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    /// The JSON body (`Null` if it was not JSON; see `raw_body`).
    pub body: Value,
    pub raw_body: Vec<u8>,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The content of the last message.
    pub fn last_message(&self) -> String {
        last_message(&self.body)
    }
}

fn last_message(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

struct Inner {
    started: Instant,
    stop: AtomicBool,
    listening: AtomicBool,
    accepted: AtomicUsize,
    served: AtomicUsize,
    /// Content chunks whose bytes were all accepted by the socket.
    written: AtomicUsize,
    /// When a connection was seen closed by sluice while streaming or stalled.
    gone: Mutex<Vec<Instant>>,
    requests: Mutex<Vec<Recorded>>,
    default: Mutex<Script>,
    routes: Mutex<Vec<(String, Script)>>,
    released: AtomicBool,
    close_after_response: AtomicBool,
    /// Connections the fake closed itself after a response.
    closed_after_response: AtomicUsize,
    send_buffer: Mutex<Option<usize>>,
}

impl Inner {
    fn stopping(&self) -> bool {
        self.stop.load(SeqCst) || self.started.elapsed() > LIFETIME
    }

    fn script_for(&self, body: &Value) -> Script {
        let last = last_message(body);
        lock(&self.routes)
            .iter()
            .find(|(key, _)| last.contains(key.as_str()))
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| lock(&self.default).clone())
    }

    fn saw_gone(&self) {
        lock(&self.gone).push(Instant::now());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fake upstream; stops its threads when dropped.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl FakeUpstream {
    /// Listens on `127.0.0.1:0`; answers every request with `default`
    /// unless a route matches.
    pub fn start(default: Script) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake upstream");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            started: Instant::now(),
            stop: AtomicBool::new(false),
            listening: AtomicBool::new(true),
            accepted: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
            written: AtomicUsize::new(0),
            gone: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            default: Mutex::new(default),
            routes: Mutex::new(Vec::new()),
            released: AtomicBool::new(false),
            close_after_response: AtomicBool::new(false),
            closed_after_response: AtomicUsize::new(0),
            send_buffer: Mutex::new(None),
        });
        let i = inner.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("fake-upstream-{}", addr.port()))
            .spawn(move || accept_loop(i, listener))
            .expect("spawn the fake upstream");
        FakeUpstream {
            addr,
            inner,
            acceptor: Some(acceptor),
        }
    }

    /// The `--upstream-url` for it.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests whose last message contains `key` get `script`.
    pub fn route(&self, key: &str, script: Script) {
        lock(&self.inner.routes).push((key.to_owned(), script));
    }

    pub fn set_default(&self, script: Script) {
        *lock(&self.inner.default) = script;
    }

    /// Close each connection after its response (without saying so in the
    /// head), as an upstream closing idle keep-alive connections does.
    pub fn set_close_after_response(&self, on: bool) {
        self.inner.close_after_response.store(on, SeqCst);
    }

    /// SO_SNDBUF of connections accepted from now on (small: its writes block sooner).
    pub fn set_send_buffer(&self, bytes: usize) {
        *lock(&self.inner.send_buffer) = Some(bytes);
    }

    /// Ends every [`Script::Stall`] (now and later) with a normal finish.
    pub fn release(&self) {
        self.inner.released.store(true, SeqCst);
    }

    /// Stops listening (new connections are refused); open ones go on.
    pub fn stop_listening(&mut self) {
        self.inner.listening.store(false, SeqCst);
        if let Some(t) = self.acceptor.take() {
            t.join().expect("the fake's accept thread");
        }
    }

    /// Connections accepted, including sluice's reachability probes.
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(SeqCst)
    }

    /// Requests read in full.
    pub fn served(&self) -> usize {
        self.inner.served.load(SeqCst)
    }

    /// Content chunks fully written, over all requests.
    pub fn written(&self) -> usize {
        self.inner.written.load(SeqCst)
    }

    /// When the fake saw sluice close a connection it was streaming on or
    /// stalled on (one entry per such connection).
    pub fn gone(&self) -> Vec<Instant> {
        lock(&self.inner.gone).clone()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.inner.requests).clone()
    }

    /// Connections closed by the fake after a response
    /// ([`FakeUpstream::set_close_after_response`]).
    pub fn closed_after_response(&self) -> usize {
        self.inner.closed_after_response.load(SeqCst)
    }

    /// Distinct connections that carried at least one request (probes carry none).
    pub fn request_connections(&self) -> usize {
        let mut ids: Vec<usize> = self.requests().iter().map(|r| r.conn).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.inner.stop.store(true, SeqCst);
    }
}

fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    while !inner.stopping() && inner.listening.load(SeqCst) {
        match listener.accept() {
            Ok((sock, _)) => {
                let id = inner.accepted.fetch_add(1, SeqCst);
                let i = inner.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("fake-upstream-conn-{id}"))
                    .spawn(move || serve(i, sock, id));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(TICK / 2),
            Err(_) => std::thread::sleep(TICK),
        }
    }
    // Dropping the listener: connecting is refused from now on.
}

/// Why the fake stopped answering on a connection.
enum Stop {
    /// sluice closed it (or reset it) while the fake streamed or stalled.
    Gone,
    /// The fake ends the connection (its script, its stop flag, an idle close).
    Close,
}

struct Conn {
    sock: TcpStream,
    inner: Arc<Inner>,
    crlf: bool,
    /// Bytes read but not yet parsed (the next request may arrive while
    /// the fake still pauses after its last write).
    buf: Vec<u8>,
}

fn serve(inner: Arc<Inner>, sock: TcpStream, id: usize) {
    let _ = sock.set_nodelay(true);
    let _ = sock.set_nonblocking(false);
    if let Some(n) = *lock(&inner.send_buffer) {
        let _ = socket2::SockRef::from(&sock).set_send_buffer_size(n);
    }
    let mut conn = Conn {
        sock,
        inner: inner.clone(),
        crlf: false,
        buf: Vec::new(),
    };
    loop {
        let Some(req) = conn.read_request(id) else {
            return;
        };
        if req.method == "GET" && req.path == "/v1/models" {
            // sluice's readiness probe: answered, not counted, then closed
            // so it holds no connection the tests count.
            let body = br#"{"object":"list","data":[{"id":"fake","object":"model"}]}"#;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.sock.write_all(head.as_bytes());
            let _ = conn.sock.write_all(body);
            return;
        }
        inner.served.fetch_add(1, SeqCst);
        let script = inner.script_for(&req.body);
        lock(&inner.requests).push(req);
        match conn.answer(script) {
            Ok(()) if !inner.close_after_response.load(SeqCst) => {}
            Ok(()) => {
                drop(conn);
                inner.closed_after_response.fetch_add(1, SeqCst);
                return;
            }
            Err(Stop::Close) => return,
            Err(Stop::Gone) => {
                inner.saw_gone();
                return;
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    /// Reads one request (head and Content-Length body); `None` when the
    /// connection closes or the fake stops.
    fn read_request(&mut self, conn: usize) -> Option<Recorded> {
        let _ = self.sock.set_read_timeout(Some(TICK * 4));
        let (head_len, method, path, headers, len) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Request::new(&mut hs);
            if let Ok(httparse::Status::Complete(n)) = r.parse(&self.buf) {
                let headers: Vec<(String, String)> = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).trim().to_owned(),
                        )
                    })
                    .collect();
                let len = headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .and_then(|(_, v)| v.parse::<usize>().ok())
                    .unwrap_or(0);
                break (
                    n,
                    r.method.unwrap_or_default().to_owned(),
                    r.path.unwrap_or_default().to_owned(),
                    headers,
                    len,
                );
            }
            self.fill()?;
        };
        while self.buf.len() < head_len + len {
            self.fill()?;
        }
        let raw_body = self.buf[head_len..head_len + len].to_vec();
        self.buf.drain(..head_len + len);
        Some(Recorded {
            conn,
            method,
            path,
            headers,
            body: serde_json::from_slice(&raw_body).unwrap_or(Value::Null),
            raw_body,
            at: Instant::now(),
        })
    }

    fn fill(&mut self) -> Option<()> {
        let mut tmp = [0u8; 16 * 1024];
        loop {
            if self.inner.stopping() {
                return None;
            }
            match self.sock.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Some(());
                }
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    /// Writes all of `bytes`, watching the stop flag while a write blocks.
    fn write(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        let _ = self.sock.set_write_timeout(Some(TICK * 10));
        let mut off = 0;
        while off < bytes.len() {
            if self.inner.stopping() {
                return Err(Stop::Close);
            }
            match self.sock.write(&bytes[off..]) {
                Ok(0) => return Err(Stop::Gone),
                Ok(n) => off += n,
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Stop::Gone),
            }
        }
        Ok(())
    }

    /// Waits `d`, returning early with `Gone` if sluice closes the connection.
    fn pause(&mut self, d: Duration) -> Result<(), Stop> {
        let until = Instant::now() + d;
        let mut tmp = [0u8; 1024];
        loop {
            if self.inner.stopping() {
                return Err(Stop::Close);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            let _ = self.sock.set_read_timeout(Some(
                (until - now).clamp(Duration::from_millis(1), TICK * 10),
            ));
            match self.sock.read(&mut tmp) {
                Ok(0) => return Err(Stop::Gone),
                // The next request, when the response is complete for sluice.
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Stop::Gone),
            }
        }
    }

    fn nl(&self) -> &'static str {
        if self.crlf {
            "\r\n"
        } else {
            "\n"
        }
    }

    fn event(&self, data: &str) -> String {
        let nl = self.nl();
        format!("data: {data}{nl}{nl}")
    }

    fn answer(&mut self, script: Script) -> Result<(), Stop> {
        self.crlf = false;
        match script {
            Script::Stream(spec) => self.stream(&spec),
            Script::Status(code, body) => {
                let head = format!(
                    "HTTP/1.1 {code} Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                self.write(head.as_bytes())
            }
            Script::ResetMidStream { after } => {
                self.chunked_prefix(after)?;
                self.pause(Duration::from_millis(100))?;
                let _ = socket2::SockRef::from(&self.sock).set_linger(Some(Duration::ZERO));
                Err(Stop::Close)
            }
            Script::MalformedJson { after } => {
                self.chunked_prefix(after)?;
                self.pause(Duration::from_millis(20))?;
                let bad = self.event("{\"choices\":[{\"delta\":{\"content\":\"x\"");
                self.write(&chunk(bad.as_bytes()))?;
                // Stay open: sluice must give up by itself.
                self.pause(Duration::from_secs(5))?;
                Err(Stop::Close)
            }
            Script::Stall { after } => {
                self.chunked_prefix(after)?;
                while !self.inner.released.load(SeqCst) {
                    self.pause(TICK * 2)?;
                }
                let end = format!(
                    "{}{}",
                    self.event(&finish_json("stop")),
                    self.event("[DONE]")
                );
                self.write(&chunk(end.as_bytes()))?;
                self.write(b"0\r\n\r\n")
            }
            Script::NoDone { after, framing } => {
                let head = match framing {
                    Framing::Close => {
                        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                    }
                    _ => "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
                };
                self.write(head.as_bytes())?;
                for i in 0..after {
                    let ev = self.event(&content_json(&token_text(i, 0)));
                    let bytes = if framing == Framing::Close {
                        ev.into_bytes()
                    } else {
                        chunk(ev.as_bytes())
                    };
                    self.write(&bytes)?;
                    self.inner.written.fetch_add(1, SeqCst);
                }
                let end = self.event(&finish_json("stop"));
                if framing == Framing::Close {
                    self.write(end.as_bytes())?;
                } else {
                    self.write(&chunk(end.as_bytes()))?;
                    self.write(b"0\r\n\r\n")?;
                }
                Err(Stop::Close)
            }
            Script::CloseBeforeHead => Err(Stop::Close),
            Script::ErrorEvent { after, message } => {
                self.chunked_prefix(after)?;
                let ev = self.event(&error_body(&message, "server_error"));
                self.write(&chunk(ev.as_bytes()))?;
                self.write(b"0\r\n\r\n")
            }
            Script::Raw(bytes) => {
                self.write(&bytes)?;
                Err(Stop::Close)
            }
            Script::Silent => loop {
                self.pause(TICK * 2)?;
            },
        }
    }

    /// A chunked 200 head, the role chunk and `after` content chunks.
    fn chunked_prefix(&mut self, after: usize) -> Result<(), Stop> {
        self.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        )?;
        self.write(&chunk(self.event(&role_json()).as_bytes()))?;
        for i in 0..after {
            let ev = self.event(&content_json(&token_text(i, 0)));
            self.write(&chunk(ev.as_bytes()))?;
            self.inner.written.fetch_add(1, SeqCst);
        }
        Ok(())
    }

    fn stream(&mut self, spec: &StreamSpec) -> Result<(), Stop> {
        self.crlf = spec.crlf;
        let nl = self.nl();
        // (SSE text of one event, whether it is a content chunk)
        let mut events: Vec<(String, bool)> = Vec::new();
        let ev = |data: &str| {
            if spec.comments {
                format!(": ping{nl}data: {data}{nl}: after data{nl}{nl}: keep-alive{nl}{nl}")
            } else {
                format!("data: {data}{nl}{nl}")
            }
        };
        if spec.role_first {
            events.push((ev(&role_json()), false));
        }
        for i in 0..spec.chunks {
            if spec.empty_deltas {
                let empty = if i % 2 == 0 {
                    r#"{"choices":[{"index":0,"delta":{"content":""},"finish_reason":null}],"usage":null}"#
                } else {
                    r#"{"choices":[{"index":0,"delta":{},"finish_reason":null}]}"#
                };
                events.push((ev(empty), false));
            }
            events.push((ev(&content_json(&token_text(i, spec.text_size))), true));
        }
        if let Some(r) = &spec.finish_reason {
            events.push((ev(&finish_json(r)), false));
        }
        if let Some((p, c)) = spec.usage {
            let u = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}});
            events.push((ev(&u.to_string()), false));
        }
        if spec.done {
            events.push((ev("[DONE]"), false));
        }

        let head = match spec.framing {
            Framing::Chunked => "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
            Framing::Length => {
                let total: usize = events.iter().map(|(e, _)| e.len()).sum();
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {total}\r\n\r\n")
            }
            Framing::Close => {
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                    .to_owned()
            }
        };
        self.write(head.as_bytes())?;
        // Unless told to wait, the last event and the chunked terminator go
        // in one write, as a real server's last flush does: a test of
        // connection reuse then does not depend on when the terminator
        // would have arrived.
        let terminator_with_last = spec.tail_delay_ms == 0 && !spec.split_events;
        let mut terminated = false;
        let last = events.len().saturating_sub(1);
        for (i, (text, is_content)) in events.iter().enumerate() {
            if *is_content && spec.delay_ms > 0 {
                self.pause(Duration::from_millis(spec.delay_ms))?;
            }
            let bytes = text.as_bytes();
            let pieces: Vec<&[u8]> = if spec.split_events {
                // Cut at thirds (and one byte in), which lands inside lines,
                // inside `data:` and often inside the two bytes of `é`.
                let n = bytes.len();
                let mut cuts = vec![0, 1.min(n), n / 3, 2 * n / 3, n];
                cuts.dedup();
                cuts.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
            } else {
                vec![bytes]
            };
            for piece in pieces {
                match spec.framing {
                    Framing::Chunked if spec.split_events => {
                        // Split the chunk framing itself across writes too.
                        let framed = chunk(piece);
                        let (a, b) = framed.split_at(framed.len() / 2);
                        self.write(a)?;
                        self.pause(Duration::from_millis(2))?;
                        self.write(b)?;
                    }
                    Framing::Chunked if terminator_with_last && i == last => {
                        let mut framed = chunk(piece);
                        framed.extend_from_slice(b"0\r\n\r\n");
                        self.write(&framed)?;
                        terminated = true;
                    }
                    Framing::Chunked => self.write(&chunk(piece))?,
                    Framing::Length | Framing::Close => self.write(piece)?,
                }
                if spec.split_events {
                    self.pause(Duration::from_millis(2))?;
                }
            }
            if *is_content {
                self.inner.written.fetch_add(1, SeqCst);
            }
        }
        if spec.tail_delay_ms > 0 {
            self.pause(Duration::from_millis(spec.tail_delay_ms))?;
        }
        match spec.framing {
            Framing::Chunked if terminated => Ok(()),
            Framing::Chunked => self.write(b"0\r\n\r\n"),
            Framing::Length => Ok(()),
            Framing::Close => Err(Stop::Close),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One HTTP chunk.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

fn role_json() -> String {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
    .to_string()
}

fn content_json(text: &str) -> String {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}], "usage": null})
    .to_string()
}

fn finish_json(reason: &str) -> String {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake",
        "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
    .to_string()
}
