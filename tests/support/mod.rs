//! Helpers shared by the end-to-end tests (`tests/e2e_*.rs`): an in-process
//! server on port 0, the real binary on port 0, a raw TCP client with
//! bounded reads, the one chunked/SSE parser every test uses, a polling
//! `wait_until`, and a scriptable blocking [`TestBackend`].
//!
//! Every wait here is bounded: reads time out after [`READ_TIMEOUT`] and
//! `wait_until` after the duration it is given. Tests are hermetic: the
//! in-process server's config comes from `Config::for_tests` (explicit
//! flags, never `SLUICE_*`), and the binary runs without any `SLUICE_*`
//! variable of the shell that runs the tests.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice::backend::{Backend, Finish, GenRequest};
use sluice::metrics::Metrics;
use sluice::sse::{ErrorCode, StreamError};

pub mod fake_upstream;

/// Longest a single blocking read waits before the test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

// ------------------------------------------------------------------ server

/// A server running on its own thread (it lives until the test process
/// exits, or until [`TestServer::shut_down`]).
pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: sluice::server::ShutdownHandle,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl TestServer {
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Starts a graceful shutdown (what SIGTERM does).
    pub fn shut_down(&self) {
        self.shutdown.shut_down();
    }

    /// Whether the loop has returned.
    pub fn has_exited(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits (bounded) for the loop to return and gives its result.
    pub fn join(&mut self, timeout: Duration) -> io::Result<()> {
        assert!(
            wait_until(timeout, || self.has_exited()),
            "the server did not stop within {timeout:?}; metrics: {}",
            metrics_summary(&self.metrics)
        );
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("server thread")
    }
}

/// `flags` after those of `defaults` (flag, value) it does not set itself.
fn with_defaults<'a>(flags: &[&'a str], defaults: &[(&'a str, &'a str)]) -> Vec<&'a str> {
    let mut args = Vec::new();
    for (flag, value) in defaults {
        if !flags.contains(flag) {
            args.extend([*flag, *value]);
        }
    }
    args.extend_from_slice(flags);
    args
}

/// The config of an in-process server: `flags`, on a free loopback port,
/// logging errors only unless they say otherwise; no `SLUICE_*` is read.
fn config(flags: &[&str]) -> sluice::Config {
    sluice::Config::for_tests(&with_defaults(
        flags,
        &[("--listen", "127.0.0.1:0"), ("--log-level", "error")],
    ))
}

/// Starts a server with the simulated model and `flags`.
pub fn start(flags: &[&str]) -> TestServer {
    start_inner(flags, None)
}

/// Starts a server whose generations run `backend` on the worker pool.
pub fn start_with_backend(flags: &[&str], backend: Arc<dyn Backend>) -> TestServer {
    start_inner(flags, Some(backend))
}

fn start_inner(flags: &[&str], backend: Option<Arc<dyn Backend>>) -> TestServer {
    let server = sluice::Server::bind(config(flags), backend).expect("bind");
    let addr = server.local_addr();
    let metrics = server.metrics();
    let shutdown = server.shutdown_handle();
    let thread = std::thread::Builder::new()
        .name(format!("sluice-test-{}", addr.port()))
        .spawn(move || server.run())
        .expect("spawn server thread");
    TestServer {
        addr,
        metrics,
        shutdown,
        thread: Some(thread),
    }
}

pub fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::SeqCst)
}

/// One line with the counters tests assert on, for failure messages.
pub fn metrics_summary(m: &Metrics) -> String {
    let g = |a: &std::sync::atomic::AtomicI64| a.load(Ordering::SeqCst);
    format!(
        "conns_open={} streams_open={} started={} completed={} disconnected={} \
         errored(slow_consumer)={} errored(upstream_error)={} cancelled={} dropped_queued={} \
         tokens_sent={} heartbeats={}",
        g(&m.connections_open),
        g(&m.streams_open),
        load(&m.streams_started),
        load(&m.streams_completed),
        load(&m.streams_disconnected),
        m.errored(ErrorCode::SlowConsumer),
        m.errored(ErrorCode::UpstreamError),
        load(&m.generations_cancelled),
        load(&m.jobs_dropped_queued),
        load(&m.tokens_sent),
        load(&m.heartbeats_sent),
    )
}

// ------------------------------------------------------------------ waiting

/// Polls `cond` every few ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `wait_until` that panics with `what` and the server's counters.
pub fn eventually(m: &Metrics, timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        wait_until(timeout, cond),
        "timed out after {timeout:?} waiting for {what}; metrics: {}",
        metrics_summary(m)
    );
}

// ------------------------------------------------------------------ binary

/// The `sluice` binary, with every `SLUICE_*` variable of this process
/// removed from its environment: it sees only what the test gives it.
pub fn sluice_command() -> Command {
    program_command(Path::new(env!("CARGO_BIN_EXE_sluice")))
}

/// [`sluice_command`] for another build of it (say the release one).
pub fn program_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SLUICE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Stderr lines of a [`Binary`] kept for assertions and failure messages
/// (the last ones only: an access log can be long).
const KEPT_STDERR_LINES: usize = 1000;

#[derive(Default)]
struct StderrLog {
    lines: VecDeque<String>,
    ended: bool,
}

/// The real binary on a free loopback port, killed and reaped when dropped
/// (also by a panic). A thread keeps reading its stderr, so the server
/// never blocks on it.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<StderrLog>>,
}

impl Binary {
    /// Starts `sluice ARGS` (on `--listen 127.0.0.1:0` unless ARGS say
    /// otherwise) with only `env` added to a clean environment, and waits
    /// (bounded) for its `listening on` line.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Binary {
        Binary::spawn_program(Path::new(env!("CARGO_BIN_EXE_sluice")), args, env)
    }

    /// [`Binary::spawn`] of another build (measurements use the release one).
    pub fn spawn_program(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut child = program_command(program)
            .args(with_defaults(args, &[("--listen", "127.0.0.1:0")]))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(StderrLog::default()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
                let mut log = lines.lock().unwrap();
                if log.lines.len() == KEPT_STDERR_LINES {
                    log.lines.pop_front();
                }
                log.lines.push_back(line);
            }
            lines.lock().unwrap().ended = true;
        });
        let mut b = Binary {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        // An early exit ends stderr and drops `tx`: no need to wait it out.
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no listening line ({e}); stderr: {:?}", b.log()));
        b.addr = addr.parse().expect("ADDR:PORT");
        assert_ne!(b.addr.port(), 0);
        b
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stderr lines read so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().lines.iter().cloned().collect()
    }

    /// Whether stderr reached its end (every line the process wrote is in [`Binary::log`]).
    pub fn stderr_ended(&self) -> bool {
        self.log.lock().unwrap().ended
    }

    pub fn sigterm(&self) {
        // SAFETY: kill(2) on our own child's pid, which it has not reaped.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM)");
    }

    /// The exit status, if the process exits within `timeout`.
    pub fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `VmHWM`, …).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

// ------------------------------------------------------------------ requests

/// `POST path` with a JSON body, `Host`, and `extra` header lines (each ending in CRLF).
pub fn post(path: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `POST /v1/chat/stream` with `body`.
pub fn post_stream(body: &str) -> Vec<u8> {
    post("/v1/chat/stream", body, "")
}

/// `GET target` with `Host` and `extra` header lines.
pub fn get(target: &str, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: t\r\n{extra}\r\n").into_bytes()
}

/// A JSON string literal.
pub fn js(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

// ------------------------------------------------------------------ client

/// A response head.
#[derive(Debug, Clone)]
pub struct Head {
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// Names lowercased, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }

    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")
            .map(|v| v.trim().parse().expect("numeric Content-Length"))
    }

    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A whole response, body de-chunked.
#[derive(Debug, Clone)]
pub struct Response {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Response {
    pub fn status(&self) -> u16 {
        self.head.status
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
    pub fn events(&self) -> Vec<Event> {
        parse_sse(&self.body)
    }
    /// Asserts the contract's refusal shape and returns the error code.
    pub fn error_code(&self) -> String {
        assert_eq!(
            self.head.header("content-type"),
            Some("application/json"),
            "refusal content type: {:?}",
            self.head
        );
        let v = self.json();
        let err = v
            .get("error")
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("no error object in {v}"));
        let msg = err.get("message").and_then(Value::as_str);
        assert!(msg.is_some_and(|m| !m.is_empty()), "no message in {v}");
        err.get("code")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no code in {v}"))
            .to_owned()
    }
}

/// One SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `message` unless an `event:` line names it.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// This block's `id:` (not inherited from earlier events, unlike a
    /// browser's `lastEventId`: tests check which events carry one).
    pub id: Option<String>,
    /// This block's `retry:`, when all digits.
    pub retry: Option<u64>,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {self:?}"))
    }
    /// A token event's text.
    pub fn token(&self) -> String {
        assert_eq!(self.event, "token", "{self:?}");
        self.json()["t"]
            .as_str()
            .unwrap_or_else(|| panic!("no t in {self:?}"))
            .to_owned()
    }
}

/// A raw client connection with a read buffer; every read is bounded.
pub struct Client {
    pub sock: TcpStream,
    buf: Vec<u8>,
    /// The current body's events, fed with its de-chunked bytes.
    sse: SseParser,
    /// The SSE body is chunked (set by `read_head` for the stream's head).
    chunked: bool,
    body_done: bool,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        sock.set_nodelay(true).unwrap();
        Client::from_stream(sock)
    }

    /// Connects with a small receive buffer (set before the handshake, so the
    /// window stays small): the kernel then holds little of what the server
    /// sends to a client that does not read.
    pub fn connect_small_rcvbuf(addr: SocketAddr, bytes: usize) -> Client {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        s.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        s.connect(&addr.into()).expect("connect");
        let sock: TcpStream = s.into();
        sock.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        sock.set_nodelay(true).unwrap();
        Client::from_stream(sock)
    }

    /// Connects from the loopback address `from` (e.g. `127.0.0.2`), so a
    /// test can be two clients at once for per-address limits.
    pub fn connect_from(addr: SocketAddr, from: &str) -> Client {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        let local: SocketAddr = format!("{from}:0").parse().expect("an IP address");
        s.bind(&local.into()).expect("bind the client's address");
        s.connect(&addr.into()).expect("connect");
        let sock: TcpStream = s.into();
        sock.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        sock.set_nodelay(true).unwrap();
        Client::from_stream(sock)
    }

    /// Closes with a reset (SO_LINGER 0) instead of a FIN.
    pub fn reset(self) {
        let s = socket2::SockRef::from(&self.sock);
        s.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
        drop(self);
    }

    pub fn from_stream(sock: TcpStream) -> Client {
        Client {
            sock,
            buf: Vec::new(),
            sse: SseParser::default(),
            chunked: true,
            body_done: false,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).expect("send");
    }

    /// Reads more bytes into the buffer; 0 at end of stream. Panics on timeout.
    fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 64 * 1024];
        loop {
            match self.sock.read(&mut tmp) {
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return 0,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!(
                        "no bytes from the server for {READ_TIMEOUT:?}; unread so far: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    )
                }
                Err(e) => panic!(
                    "read failed ({e}); unread so far: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    fn fill_or_panic(&mut self, what: &str) {
        if self.fill() == 0 {
            panic!(
                "connection closed while reading {what}; unread: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    fn take_line(&mut self, what: &str) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            self.fill_or_panic(what);
        }
    }

    fn take_exact(&mut self, n: usize, what: &str) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill_or_panic(what);
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one response head (a `100 Continue` is a head too).
    pub fn read_head(&mut self) -> Head {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            self.fill_or_panic("a response head");
        };
        let head = parse_head(&self.buf[..end]);
        self.buf.drain(..end + 4);
        self.chunked = head.is_chunked();
        self.body_done = false;
        self.sse = SseParser::default();
        head
    }

    /// One chunk of a chunked body; `None` after the last chunk (trailers consumed).
    pub fn read_chunk(&mut self) -> Option<Vec<u8>> {
        let size = chunk_size(&self.take_line("a chunk size"));
        if size == 0 {
            while !self.take_line("chunked trailers").is_empty() {}
            return None;
        }
        let data = self.take_exact(size, "chunk data");
        let crlf = self.take_exact(2, "chunk end");
        assert_eq!(crlf, b"\r\n", "chunk data not followed by CRLF");
        Some(data)
    }

    /// The body that follows `head`, by its framing (close-delimited: to EOF).
    pub fn read_body(&mut self, head: &Head) -> Vec<u8> {
        if head.status / 100 == 1 || head.status == 204 || head.status == 304 {
            return Vec::new();
        }
        if head.is_chunked() {
            let mut body = Vec::new();
            while let Some(c) = self.read_chunk() {
                body.extend_from_slice(&c);
            }
            self.body_done = true;
            body
        } else if let Some(n) = head.content_length() {
            self.take_exact(n, "the body")
        } else {
            self.read_to_eof()
        }
    }

    /// Everything until the peer closes (a reset counts as a close).
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        while self.fill() > 0 {}
        self.body_done = true;
        std::mem::take(&mut self.buf)
    }

    /// Head and whole body of the next response.
    pub fn read_response(&mut self) -> Response {
        let head = self.read_head();
        let body = self.read_body(&head);
        Response { head, body }
    }

    /// Sends `req` and reads the whole response.
    pub fn roundtrip(&mut self, req: &[u8]) -> Response {
        self.send(req);
        self.read_response()
    }

    /// The next SSE event of the body after the last `read_head` (blocks
    /// of comments only, like OpenAI heartbeats, are skipped); `None` once
    /// the body ended. Panics if it ends inside an event.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.sse.next_event() {
                return Some(e);
            }
            if self.body_done {
                return None;
            }
            if self.chunked {
                match self.read_chunk() {
                    Some(c) => self.sse.push(&c),
                    None => self.end_sse(),
                }
            } else if !self.buf.is_empty() {
                // Body bytes that came with the head, or with the last read.
                let b = std::mem::take(&mut self.buf);
                self.sse.push(&b);
            } else if self.fill() == 0 {
                self.end_sse();
            }
        }
    }

    fn end_sse(&mut self) {
        self.body_done = true;
        self.sse.end();
    }

    /// Every remaining event of the current SSE body.
    pub fn events_to_end(&mut self) -> Vec<Event> {
        let mut v = Vec::new();
        while let Some(e) = self.next_event() {
            v.push(e);
        }
        v
    }

    /// Whether the peer closes the connection (EOF or reset) within `timeout`,
    /// with no response bytes before it.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut tmp = [0u8; 4096];
        let r = self.sock.read(&mut tmp);
        self.sock.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        match r {
            Ok(0) => true,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                false
            }
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
            ),
        }
    }

    /// Half-closes our side (the server reads EOF).
    pub fn shutdown_write(&self) {
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ------------------------------------------------------------------ parsing

/// A response head's text (without the blank line ending it).
pub fn parse_head(raw: &[u8]) -> Head {
    let raw = std::str::from_utf8(raw).expect("ASCII head");
    let mut lines = raw.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default().to_owned();
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let reason = parts.next().unwrap_or_default().to_owned();
    let headers = lines
        .map(|l| {
            let (n, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header {l:?}"));
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    Head {
        version,
        status,
        reason,
        headers,
    }
}

/// The size on a chunk-size line (extensions ignored).
fn chunk_size(line: &str) -> usize {
    let hex = line.split(';').next().unwrap_or_default().trim();
    usize::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("bad chunk size line {line:?}"))
}

/// The bytes that end a chunked body without trailers (the last chunk).
pub const LAST_CHUNK: &[u8] = b"\r\n0\r\n\r\n";

/// Removes chunked transfer encoding from a whole body (panics on bad or
/// cut framing).
pub fn decode_chunked(raw: &[u8]) -> Vec<u8> {
    let (body, used) = decode_chunked_prefix(raw);
    assert_eq!(used, raw.len(), "bytes after the chunked body");
    body
}

/// The chunked body at the start of `raw`, and how many bytes it took
/// (its trailers included).
fn decode_chunked_prefix(raw: &[u8]) -> (Vec<u8>, usize) {
    let line_at = |at: usize| {
        let i = find(&raw[at..], b"\r\n").expect("a complete line in the chunked body");
        (
            std::str::from_utf8(&raw[at..at + i]).expect("ASCII line"),
            at + i + 2,
        )
    };
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let (line, next) = line_at(at);
        let size = chunk_size(line);
        at = next;
        if size == 0 {
            loop {
                let (trailer, next) = line_at(at);
                at = next;
                if trailer.is_empty() {
                    return (out, at);
                }
            }
        }
        assert!(raw.len() >= at + size + 2, "the chunked body is cut");
        out.extend_from_slice(&raw[at..at + size]);
        assert_eq!(
            &raw[at + size..at + size + 2],
            b"\r\n",
            "chunk data not followed by CRLF"
        );
        at += size + 2;
    }
}

/// The responses in `raw`, one after another as a pipelining client reads
/// them, bodies de-chunked; a body without length runs to the end.
pub fn parse_responses(mut raw: &[u8]) -> Vec<Response> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let end = find(raw, b"\r\n\r\n").expect("a complete response head");
        let head = parse_head(&raw[..end]);
        raw = &raw[end + 4..];
        let body = if head.status / 100 == 1 || head.status == 204 || head.status == 304 {
            Vec::new()
        } else if head.is_chunked() {
            let (body, used) = decode_chunked_prefix(raw);
            raw = &raw[used..];
            body
        } else if let Some(n) = head.content_length() {
            assert!(
                raw.len() >= n,
                "the body is cut: {} of {n} bytes",
                raw.len()
            );
            let (body, rest) = raw.split_at(n);
            raw = rest;
            body.to_vec()
        } else {
            std::mem::take(&mut raw).to_vec()
        };
        out.push(Response { head, body });
    }
    out
}

/// One block of an SSE body (its lines up to a blank one): the comments in
/// it, and the event it dispatches, if it has any field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseBlock {
    /// Each comment line without its `:` (and one space after it).
    pub comments: Vec<String>,
    pub event: Option<Event>,
}

/// Block under construction.
#[derive(Default)]
struct PartialBlock {
    comments: Vec<String>,
    fields: bool,
    event: Option<String>,
    data: Vec<String>,
    id: Option<String>,
    retry: Option<u64>,
}

impl PartialBlock {
    fn is_empty(&self) -> bool {
        self.comments.is_empty() && !self.fields
    }

    fn line(&mut self, line: &str) {
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field.is_empty() {
            self.comments.push(value.to_owned());
            return;
        }
        self.fields = true;
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok();
            }
            _ => {}
        }
    }

    fn finish(self) -> SseBlock {
        let event = self.fields.then(|| Event {
            event: self.event.unwrap_or_else(|| "message".to_owned()),
            data: self.data.join("\n"),
            id: self.id,
            retry: self.retry,
        });
        SseBlock {
            comments: self.comments,
            event,
        }
    }
}

/// An incremental SSE parser, fed body bytes as they arrive. It follows
/// the WHATWG rules: lines end in CRLF, LF or CR (a CRLF may be split
/// between two feeds); a line starting with `:` is a comment; a field
/// without `:` has an empty value; one space after the colon is dropped;
/// `data` lines join with `\n`; `retry` counts only when all digits;
/// unknown fields are ignored. Stricter than a browser where a test wants
/// to see a fault: a block with fields but no `data` is still an event, and
/// a body that ends inside a block panics in [`SseParser::end`].
#[derive(Default)]
pub struct SseParser {
    /// Bytes not yet split into lines.
    buf: Vec<u8>,
    block: PartialBlock,
    ready: VecDeque<SseBlock>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.split_lines(false);
    }

    /// The body ended: panics if it ended inside a block.
    pub fn end(&mut self) {
        self.split_lines(true);
        assert!(
            self.buf.is_empty() && self.block.is_empty(),
            "body ended inside an event: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }

    /// The next complete block.
    pub fn next_block(&mut self) -> Option<SseBlock> {
        self.ready.pop_front()
    }

    /// The next complete event (comment-only blocks skipped).
    pub fn next_event(&mut self) -> Option<Event> {
        while let Some(b) = self.ready.pop_front() {
            if b.event.is_some() {
                return b.event;
            }
        }
        None
    }

    fn split_lines(&mut self, at_end: bool) {
        let mut at = 0;
        while let Some(i) = self.buf[at..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            let end = at + i;
            let next = match self.buf[end] {
                b'\n' => end + 1,
                _ if end + 1 < self.buf.len() => end + 1 + usize::from(self.buf[end + 1] == b'\n'),
                // A CR last: the LF of its CRLF may be in the next feed.
                _ if !at_end => break,
                _ => end + 1,
            };
            let line = std::str::from_utf8(&self.buf[at..end]).expect("SSE is UTF-8");
            if line.is_empty() {
                let block = std::mem::take(&mut self.block);
                if !block.is_empty() {
                    self.ready.push_back(block.finish());
                }
            } else {
                self.block.line(line);
            }
            at = next;
        }
        // One drain per feed, not per line: bodies can be megabytes.
        self.buf.drain(..at);
    }
}

/// Splits a whole SSE body into blocks (panics if it ends inside one).
pub fn parse_sse_blocks(body: &[u8]) -> Vec<SseBlock> {
    let mut p = SseParser::default();
    p.push(body);
    p.end();
    p.ready.into()
}

/// A whole SSE body's events (comment-only blocks skipped).
pub fn parse_sse(body: &[u8]) -> Vec<Event> {
    parse_sse_blocks(body)
        .into_iter()
        .filter_map(|b| b.event)
        .collect()
}

/// Runs one whole streaming request on a fresh connection: head, then its events.
pub fn stream_events(addr: SocketAddr, req: &[u8]) -> (Head, Vec<Event>) {
    let mut c = Client::connect(addr);
    c.send(req);
    let head = c.read_head();
    assert_eq!(head.status, 200, "{head:?}");
    let events = c.events_to_end();
    (head, events)
}

/// The token texts of `events`, asserting the stream ended with `done`.
pub fn tokens_until_done(events: &[Event]) -> Vec<String> {
    let (last, rest) = events.split_last().expect("at least one event");
    assert_eq!(last.event, "done", "last event: {last:?}");
    rest.iter()
        .filter(|e| e.event == "token")
        .map(Event::token)
        .collect()
}

/// A metric's value in a Prometheus exposition (`name` may include labels).
pub fn prom_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

/// The sum of a metric family's samples over all label sets (`None` if absent).
pub fn prom_sum(text: &str, family: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((n, v)) = l.rsplit_once(' ') else {
            continue;
        };
        let base = n.split('{').next().unwrap_or(n);
        if base == family {
            if let Ok(v) = v.parse::<f64>() {
                *found.get_or_insert(0.0) += v;
            }
        }
    }
    found
}

// ------------------------------------------------------------------ backend

use sluice::backend::TokenOut;

/// What a [`TestBackend`] saw, shared with the test.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// `generate` calls.
    pub started: AtomicU64,
    /// Tokens handed to the sink successfully.
    pub pushed: AtomicU64,
    /// Generations that saw the sink report `Cancelled`.
    pub cancelled: AtomicU64,
    /// Generations that returned (any result) without seeing a cancel.
    pub finished: AtomicU64,
    /// Opens every `gate` generation.
    pub gate_open: AtomicBool,
}

impl BackendStats {
    pub fn started(&self) -> u64 {
        load(&self.started)
    }
    pub fn pushed(&self) -> u64 {
        load(&self.pushed)
    }
    pub fn cancelled(&self) -> u64 {
        load(&self.cancelled)
    }
    pub fn finished(&self) -> u64 {
        load(&self.finished)
    }
    pub fn open_gate(&self) {
        self.gate_open.store(true, Ordering::SeqCst);
    }
}

/// Pieces that could break SSE framing if not escaped; the empty one is not a token.
pub const TRICKY_TEXTS: [&str; 8] = [
    "a\nb",
    "\r\n\r\n",
    "",
    "data: x\n\nevent: done",
    "héllo ✓ 🎉",
    "say \"hi\"",
    "\u{0}\u{1f}",
    "id: 9\r",
];

/// A blocking backend scripted by the request's last message:
///
/// - `tokens N MS`: N tokens `tok0 `, `tok1 `… with MS ms before each;
///   `length` when `max_tokens` cut it, else `stop`.
/// - `flood N SIZE`: N tokens as fast as the sink takes them, each the
///   zero-padded index, SIZE bytes wide.
/// - `block`: sleeps until cancelled (60 s at most).
/// - `gate N`: waits for [`BackendStats::open_gate`] (or a cancel), then N tokens.
/// - `error K`: K tokens, then `upstream_error` "boom".
/// - `reason R`: one token, then `done` with finish_reason R and no prompt count.
/// - `panic`: one token, then a panic.
/// - `texts`: the pieces of [`TRICKY_TEXTS`] (one of them empty), then `stop`.
///
/// Anything else is `tokens 3 0`.
pub struct TestBackend {
    pub stats: Arc<BackendStats>,
}

impl TestBackend {
    pub fn create() -> (Arc<dyn Backend>, Arc<BackendStats>) {
        let stats = Arc::new(BackendStats::default());
        (
            Arc::new(TestBackend {
                stats: stats.clone(),
            }),
            stats,
        )
    }

    fn push(&self, out: &dyn TokenOut, text: &str) -> Result<(), StreamError> {
        match out.push_token(text) {
            Ok(()) => {
                self.stats.pushed.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(_) => Err(self.saw_cancel()),
        }
    }

    fn pause(&self, out: &dyn TokenOut, d: Duration) -> Result<(), StreamError> {
        out.sleep(d).map_err(|_| self.saw_cancel())
    }

    fn saw_cancel(&self) -> StreamError {
        self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
        StreamError::new(ErrorCode::Internal, "cancelled")
    }

    fn run(
        &self,
        script: &str,
        req: &GenRequest,
        out: &dyn TokenOut,
    ) -> Result<Finish, StreamError> {
        let words: Vec<&str> = script.split_whitespace().collect();
        let num = |i: usize, default: u64| -> u64 {
            words.get(i).and_then(|w| w.parse().ok()).unwrap_or(default)
        };
        let max = u64::from(req.max_tokens);
        let finish = |sent: u64, wanted: u64| Finish {
            finish_reason: if sent < wanted { "length" } else { "stop" }.into(),
            prompt_tokens: Some(7),
            completion_tokens: Some(sent as u32),
        };
        match words.first().copied() {
            Some("flood") => {
                let (n, size) = (num(1, 1000), num(2, 20) as usize);
                let n_sent = n.min(max);
                for i in 0..n_sent {
                    self.push(out, &format!("{i:0size$}"))?;
                }
                Ok(finish(n_sent, n))
            }
            Some("block") => {
                self.pause(out, Duration::from_secs(60))?;
                Ok(finish(0, 0))
            }
            Some("gate") => {
                while !self.stats.gate_open.load(Ordering::SeqCst) {
                    self.pause(out, Duration::from_millis(5))?;
                }
                let n = num(1, 3);
                let n_sent = n.min(max);
                for i in 0..n_sent {
                    self.push(out, &format!("tok{i} "))?;
                }
                Ok(finish(n_sent, n))
            }
            Some("reason") => {
                self.push(out, "tok0 ")?;
                Ok(Finish {
                    finish_reason: words.get(1).copied().unwrap_or("stop").into(),
                    prompt_tokens: None,
                    completion_tokens: None,
                })
            }
            Some("panic") => {
                self.push(out, "tok0 ")?;
                panic!("the test backend panics on purpose");
            }
            Some("texts") => {
                for t in TRICKY_TEXTS {
                    if t.is_empty() {
                        out.push_token(t).map_err(|_| self.saw_cancel())?;
                    } else {
                        self.push(out, t)?;
                    }
                }
                // No count of its own: the server counts the tokens relayed.
                Ok(Finish {
                    completion_tokens: None,
                    ..finish(0, 0)
                })
            }
            Some("error") => {
                for i in 0..num(1, 2).min(max) {
                    self.push(out, &format!("tok{i} "))?;
                }
                Err(StreamError::new(ErrorCode::UpstreamError, "boom"))
            }
            _ => {
                let (n, ms) = if words.first() == Some(&"tokens") {
                    (num(1, 3), num(2, 0))
                } else {
                    (3, 0)
                };
                let n_sent = n.min(max);
                for i in 0..n_sent {
                    if ms > 0 {
                        self.pause(out, Duration::from_millis(ms))?;
                    }
                    self.push(out, &format!("tok{i} "))?;
                }
                Ok(finish(n_sent, n))
            }
        }
    }
}

impl Backend for TestBackend {
    fn generate(&self, req: &GenRequest, out: &dyn TokenOut) -> Result<Finish, StreamError> {
        self.stats.started.fetch_add(1, Ordering::SeqCst);
        let script = req
            .messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let r = self.run(&script, req, out);
        if !out.is_cancelled() {
            self.stats.finished.fetch_add(1, Ordering::SeqCst);
        }
        r
    }
}
