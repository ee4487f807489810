//! The OpenAI-compatible upstream (llama.cpp, vLLM, Ollama, TGI, OpenAI):
//! `POST {base}/chat/completions` with `stream: true`, its SSE answer read
//! incrementally on a pool worker and relayed piece by piece.
//!
//! The client is written here over `std::net` + `httparse` (+ `rustls` for
//! https) rather than taken from an HTTP client crate, because two things
//! the server needs are not offered by them together: a timeout on the
//! *silence between two bytes* (`set_read_timeout` on the socket, not a
//! total budget), and cancelling a worker blocked in `read` within
//! milliseconds (the loop shuts down a clone of the socket, registered in
//! the stream's [`TokenOut`]). Connections are kept alive and reused
//! across generations.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::{Backend, Finish, GenRequest, TokenOut};
use crate::sse::{ErrorCode, StreamError};

/// Where and how to reach the upstream.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL, e.g. `http://127.0.0.1:8081/v1`.
    pub url: String,
    pub key: Option<String>,
    /// Replaces the request's `model` when set.
    pub model: Option<String>,
    pub system_prompt: Option<String>,
    pub connect_timeout: Duration,
    /// Longest silence between two bytes.
    pub read_timeout: Duration,
    /// Keep-alive connections kept for reuse.
    pub max_idle: usize,
    /// PEM file of CA certificates trusted for https (instead of the
    /// bundled web roots), for an upstream behind a private CA.
    pub ca_file: Option<std::path::PathBuf>,
}

struct Target {
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    /// Path of the chat completions endpoint.
    path: String,
}

/// The `--backend openai` backend.
pub struct OpenAiBackend {
    cfg: UpstreamConfig,
    target: Target,
    idle: Mutex<Vec<Conn>>,
    reachable: Arc<AtomicBool>,
}

impl OpenAiBackend {
    /// Checks the URL; starts a small thread that probes reachability for
    /// `/readyz` every two seconds.
    pub fn new(cfg: UpstreamConfig) -> Result<OpenAiBackend, String> {
        let url =
            url::Url::parse(&cfg.url).map_err(|e| format!("--upstream-url {:?}: {e}", cfg.url))?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("--upstream-url {:?} has no host", cfg.url))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = match url.scheme() {
            "http" => None,
            "https" => {
                let mut roots = rustls::RootCertStore::empty();
                match &cfg.ca_file {
                    None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                    Some(path) => {
                        use rustls::pki_types::pem::PemObject;
                        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                            .map_err(|e| format!("--upstream-ca-file {}: {e}", path.display()))?;
                        for cert in certs {
                            let cert = cert.map_err(|e| {
                                format!("--upstream-ca-file {}: {e}", path.display())
                            })?;
                            roots.add(cert).map_err(|e| {
                                format!("--upstream-ca-file {}: {e}", path.display())
                            })?;
                        }
                        if roots.is_empty() {
                            return Err(format!(
                                "--upstream-ca-file {}: no certificate in it",
                                path.display()
                            ));
                        }
                    }
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("TLS setup: {e}"))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("--upstream-url host {host:?}: {e}"))?;
                Some((Arc::new(config), name))
            }
            s => return Err(format!("--upstream-url scheme {s:?}: use http or https")),
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let base = url.path().trim_end_matches('/');
        let target = Target {
            tls,
            host,
            port,
            authority,
            path: format!("{base}/chat/completions"),
        };
        let reachable = Arc::new(AtomicBool::new(true));
        spawn_probe(
            target.host.clone(),
            target.port,
            cfg.connect_timeout.min(Duration::from_secs(1)),
            reachable.clone(),
        );
        Ok(OpenAiBackend {
            cfg,
            target,
            idle: Mutex::new(Vec::new()),
            reachable,
        })
    }

    /// The JSON body sent upstream.
    pub fn request_body(&self, req: &GenRequest) -> Value {
        let mut messages = Vec::with_capacity(req.messages.len() + 1);
        if let Some(sp) = &self.cfg.system_prompt {
            messages.push(json!({"role": "system", "content": sp}));
        }
        for m in &req.messages {
            messages.push(json!({"role": m.role, "content": m.content}));
        }
        let mut body = req.extra.clone();
        if let Some(model) = self.cfg.model.as_ref().or(req.model.as_ref()) {
            body.insert("model".into(), json!(model));
        }
        body.insert("messages".into(), Value::Array(messages));
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
        if let Some(field) = req.max_tokens_field {
            body.insert(field.into(), json!(req.max_tokens));
        }
        if let Some(t) = req.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if !req.stop.is_empty() {
            body.insert("stop".into(), json!(req.stop));
        }
        Value::Object(body)
    }

    fn connect(&self, sink: &dyn TokenOut) -> Result<Conn, StreamError> {
        let addrs: Vec<SocketAddr> = (self.target.host.as_str(), self.target.port)
            .to_socket_addrs()
            .map_err(|e| unavailable(format!("cannot resolve {}: {e}", self.target.host)))?
            .collect();
        let mut last = None;
        for addr in addrs {
            if sink.is_cancelled() {
                return Err(cancelled());
            }
            match connect_cancellable(addr, self.cfg.connect_timeout, sink) {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    let transport = match &self.target.tls {
                        None => Transport::Plain(tcp.try_clone().map_err(internal_io)?),
                        Some((config, name)) => {
                            let conn = rustls::ClientConnection::new(config.clone(), name.clone())
                                .map_err(|e| unavailable(format!("TLS: {e}")))?;
                            let sock = tcp.try_clone().map_err(internal_io)?;
                            Transport::Tls(Box::new(rustls::StreamOwned::new(conn, sock)))
                        }
                    };
                    return Ok(Conn {
                        tcp,
                        io: BufIo::new(transport),
                    });
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        Err(match last {
            Some((addr, e)) => unavailable(format!("cannot connect to {addr}: {e}")),
            None => unavailable(format!("{} resolves to no address", self.target.host)),
        })
    }

    fn checkout(&self) -> Option<Conn> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.cfg.max_idle {
            idle.push(conn);
        }
    }

    fn request_head(&self, body_len: usize) -> String {
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nUser-Agent: sluice/{}\r\nContent-Length: {body_len}\r\n",
            self.target.path,
            self.target.authority,
            env!("CARGO_PKG_VERSION"),
        );
        if let Some(k) = &self.cfg.key {
            head.push_str("Authorization: Bearer ");
            head.push_str(k);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head
    }

    /// Sends the request and reads the response head, on a reused
    /// connection if one is idle (retried once on a fresh one if the reused
    /// one turns out to be closed).
    fn open(&self, body: &[u8], sink: &dyn TokenOut) -> Result<(Conn, ResponseHead), StreamError> {
        let head = self.request_head(body.len());
        let mut reused = self.checkout();
        loop {
            let fresh = reused.is_none();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => self.connect(sink)?,
            };
            sink.set_upstream(conn.tcp.try_clone().ok());
            if sink.is_cancelled() {
                return Err(cancelled());
            }
            let _ = conn.tcp.set_read_timeout(Some(self.cfg.read_timeout));
            conn.io.received = 0;
            let sent = conn
                .io
                .write_all(head.as_bytes())
                .and_then(|_| conn.io.write_all(body))
                .and_then(|_| conn.io.flush());
            let result = sent.and_then(|_| conn.io.read_head());
            match result {
                Ok(h) => return Ok((conn, h)),
                // Only a dead keep-alive connection is retried: a timeout
                // means the upstream has the request and is silent.
                Err(e)
                    if !fresh && conn.io.received == 0 && !sink.is_cancelled() && is_dead(&e) =>
                {
                    log::debug!("reused upstream connection failed ({e}); reconnecting");
                }
                Err(e) => return Err(self.io_error(e, sink)),
            }
        }
    }

    fn io_error(&self, e: io::Error, sink: &dyn TokenOut) -> StreamError {
        if sink.is_cancelled() {
            return cancelled();
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => StreamError::new(
                ErrorCode::UpstreamTimeout,
                format!(
                    "the upstream sent nothing for {} ms",
                    self.cfg.read_timeout.as_millis()
                ),
            ),
            io::ErrorKind::InvalidData => {
                upstream_error(format!("bad response from the upstream: {e}"))
            }
            _ => upstream_error(format!("the upstream connection failed: {e}")),
        }
    }
}

impl Backend for OpenAiBackend {
    fn generate(&self, req: &GenRequest, sink: &dyn TokenOut) -> Result<Finish, StreamError> {
        let body = serde_json::to_vec(&self.request_body(req)).map_err(|e| {
            StreamError::new(
                ErrorCode::Internal,
                format!("cannot encode the request: {e}"),
            )
        })?;
        let (mut conn, head) = self.open(&body, sink)?;
        if head.status != 200 {
            return Err(status_error(&head, &mut conn.io));
        }
        let mut sse = SseParser::default();
        let mut state = Relay::default();
        let mut chunk = Vec::with_capacity(16 * 1024);
        let outcome = loop {
            chunk.clear();
            match conn.io.read_body(&head, &mut chunk) {
                Ok(0) => break Err(upstream_error("the upstream stream ended without [DONE]")),
                Ok(_) => {}
                Err(e) => break Err(self.io_error(e, sink)),
            }
            match sse.feed(&chunk, |data| state.on_data(data, sink)) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Done) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        outcome?;
        // The answer is complete. Reuse the connection if the rest of the
        // body is already here; never wait for it (that would delay `done`).
        sink.set_upstream(None);
        if head.keep_alive && !sink.is_cancelled() && conn.tcp.set_nonblocking(true).is_ok() {
            let drained = conn.io.drain_body(&head).is_ok();
            if drained && conn.tcp.set_nonblocking(false).is_ok() {
                self.checkin(conn);
            }
        }
        Ok(Finish {
            finish_reason: state.finish_reason.unwrap_or_else(|| "stop".into()),
            prompt_tokens: state.prompt_tokens,
            completion_tokens: state.completion_tokens.or(Some(state.relayed)),
        })
    }

    fn ready(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
}

fn spawn_probe(host: String, port: u16, timeout: Duration, reachable: Arc<AtomicBool>) {
    let _ = std::thread::Builder::new()
        .name("sluice-upstream-probe".into())
        .stack_size(128 * 1024)
        .spawn(move || loop {
            let ok = (host.as_str(), port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| TcpStream::connect_timeout(&a, timeout).is_ok());
            if reachable.swap(ok, Ordering::Relaxed) != ok {
                log::warn!(
                    "upstream {host}:{port} is {}",
                    if ok { "reachable again" } else { "unreachable" }
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        });
}

/// Connects like `TcpStream::connect_timeout`, but gives up within ~20 ms
/// of the stream being cancelled: a client that leaves while the upstream
/// is slow to accept does not hold a worker for the whole connect timeout.
fn connect_cancellable(
    addr: SocketAddr,
    timeout: Duration,
    sink: &dyn TokenOut,
) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::AsRawFd;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                if sink.is_cancelled() {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
                }
                let mut pfd = libc::pollfd {
                    fd: socket.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let wait = left.min(Duration::from_millis(20)).as_millis() as libc::c_int;
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut pfd, 1, wait.max(1)) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n > 0 {
                    if let Some(e) = socket.take_error()? {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        Err(e) => return Err(e),
    }
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}

/// Whether an error on a reused connection means it was already closed.
fn is_dead(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

fn unavailable(msg: String) -> StreamError {
    StreamError::new(ErrorCode::UpstreamUnavailable, msg)
}

fn upstream_error(msg: impl Into<String>) -> StreamError {
    StreamError::new(ErrorCode::UpstreamError, msg)
}

fn internal_io(e: io::Error) -> StreamError {
    StreamError::new(ErrorCode::Internal, format!("socket: {e}"))
}

/// Returned once the stream is cancelled; the loop ignores it.
fn cancelled() -> StreamError {
    StreamError::new(ErrorCode::Internal, "cancelled")
}

/// An upstream answer other than 200: its status and message.
fn status_error(head: &ResponseHead, io: &mut BufIo) -> StreamError {
    let mut body = Vec::new();
    // Best effort, bounded: the message is in the first few KiB.
    while body.len() < 64 * 1024 {
        match io.read_body(head, &mut body) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            e.get("message")
                .and_then(Value::as_str)
                .or_else(|| e.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            if text.is_empty() {
                format!("the upstream answered {}", head.status)
            } else {
                text.chars().take(500).collect()
            }
        });
    StreamError {
        code: ErrorCode::UpstreamError,
        message,
        retryable: head.status >= 500 || head.status == 429,
        upstream_status: Some(head.status),
    }
}

/// What the relay has learned from the chunks so far.
#[derive(Debug, Default)]
struct Relay {
    finish_reason: Option<String>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    relayed: u32,
}

/// Whether the upstream stream goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Done,
}

/// The parts of a `chat.completion.chunk` the relay reads; the content
/// borrows from the event's bytes unless it has escapes.
#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(serde::Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Usage {
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
}

impl Relay {
    fn on_data(&mut self, data: &[u8], sink: &dyn TokenOut) -> Result<Flow, StreamError> {
        if data == b"[DONE]" {
            return Ok(Flow::Done);
        }
        let chunk: Chunk = serde_json::from_slice(data)
            .map_err(|e| upstream_error(format!("malformed JSON in the upstream stream: {e}")))?;
        if let Some(e) = chunk.error.filter(|e| !e.is_null()) {
            let msg = e
                .get("message")
                .and_then(Value::as_str)
                .or_else(|| e.as_str())
                .unwrap_or("the upstream reported an error");
            return Err(upstream_error(msg.to_string()));
        }
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(text) = choice.delta.and_then(|d| d.content) {
                if !text.is_empty() {
                    if sink.push_token(&text).is_err() {
                        return Err(cancelled());
                    }
                    self.relayed += 1;
                }
            }
            if let Some(r) = choice.finish_reason {
                self.finish_reason = Some(r.into_owned());
            }
        }
        if let Some(u) = chunk.usage {
            self.prompt_tokens = u.prompt_tokens.or(self.prompt_tokens);
            self.completion_tokens = u.completion_tokens.or(self.completion_tokens);
        }
        Ok(Flow::Continue)
    }
}

/// Longest SSE line accepted from an upstream.
const MAX_LINE: usize = 1 << 20;

/// An incremental SSE parser: `data:` lines joined per event, comments and
/// other fields ignored, LF or CRLF, events split anywhere across reads.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
}

impl SseParser {
    /// Feeds bytes; calls `on_data` with each complete event's data.
    pub fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        mut on_data: impl FnMut(&[u8]) -> Result<Flow, E>,
    ) -> Result<Flow, E>
    where
        E: From<StreamError>,
    {
        while !bytes.is_empty() {
            let Some(nl) = bytes.iter().position(|b| *b == b'\n') else {
                if self.line.len() + bytes.len() > MAX_LINE {
                    return Err(upstream_error("an upstream SSE line is longer than 1 MiB").into());
                }
                self.line.extend_from_slice(bytes);
                break;
            };
            let line: &[u8] = if self.line.is_empty() {
                &bytes[..nl]
            } else {
                self.line.extend_from_slice(&bytes[..nl]);
                &self.line
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let flow = if line.is_empty() {
                if self.has_data {
                    self.has_data = false;
                    let r = on_data(&self.data);
                    self.data.clear();
                    r?
                } else {
                    Flow::Continue
                }
            } else {
                if let Some(v) = line.strip_prefix(b"data:") {
                    let v = v.strip_prefix(b" ").unwrap_or(v);
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(v);
                    self.has_data = true;
                }
                Flow::Continue
            };
            self.line.clear();
            bytes = &bytes[nl + 1..];
            if flow == Flow::Done {
                return Ok(Flow::Done);
            }
        }
        Ok(Flow::Continue)
    }
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

struct Conn {
    /// The raw socket, for timeouts and for the loop to shut it down.
    tcp: TcpStream,
    io: BufIo,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.tcp.shutdown(Shutdown::Both);
    }
}

/// The parts of a response head the relay needs.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    pub keep_alive: bool,
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line (after the first chunk, preceded by CRLF).
    Size {
        first: bool,
    },
    Data(u64),
    Done,
}

/// A buffered reader/writer over one upstream connection, decoding the
/// response body as it arrives.
struct BufIo {
    t: Transport,
    buf: Vec<u8>,
    pos: usize,
    /// Response bytes received on this request (0: nothing came back).
    received: usize,
    chunk: ChunkState,
    left: u64,
}

const MAX_HEAD: usize = 64 * 1024;

impl BufIo {
    fn new(t: Transport) -> BufIo {
        BufIo {
            t,
            buf: Vec::with_capacity(16 * 1024),
            pos: 0,
            received: 0,
            chunk: ChunkState::Size { first: true },
            left: 0,
        }
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.t.write_all(b)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.t.flush()
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more bytes; 0 at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let start = self.buf.len();
        self.buf.resize(start + 16 * 1024, 0);
        let r = loop {
            match self.t.read(&mut self.buf[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        let n = *r.as_ref().unwrap_or(&0);
        self.buf.truncate(start + n);
        self.received += n;
        r
    }

    fn read_head(&mut self) -> io::Result<ResponseHead> {
        self.received = 0;
        self.chunk = ChunkState::Size { first: true };
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(self.available()) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = resp.code.unwrap_or(0);
                    let mut framing = Framing::Close;
                    let mut keep_alive = resp.version == Some(1);
                    for h in resp.headers.iter() {
                        let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                        if h.name.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")
                        {
                            framing = Framing::Chunked;
                        } else if h.name.eq_ignore_ascii_case("content-length")
                            && framing != Framing::Chunked
                        {
                            let len = v.trim().parse().map_err(|_| {
                                io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length")
                            })?;
                            framing = Framing::Length(len);
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            if v.contains("close") {
                                keep_alive = false;
                            } else if v.contains("keep-alive") {
                                keep_alive = true;
                            }
                        }
                    }
                    if framing == Framing::Close {
                        keep_alive = false;
                    }
                    if status == 100 {
                        self.pos += n;
                        continue;
                    }
                    self.pos += n;
                    if let Framing::Length(l) = framing {
                        self.left = l;
                    }
                    return Ok(ResponseHead {
                        status,
                        framing,
                        keep_alive,
                    });
                }
                Ok(httparse::Status::Partial) => {
                    if self.available().len() > MAX_HEAD {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "response head too large",
                        ));
                    }
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("response head: {e}"),
                    ))
                }
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before answering",
                ));
            }
        }
    }

    /// Appends the next decoded body bytes to `out`; 0 at the body's end.
    fn read_body(&mut self, head: &ResponseHead, out: &mut Vec<u8>) -> io::Result<usize> {
        match head.framing {
            Framing::Close => {
                if self.available().is_empty() && self.fill()? == 0 {
                    return Ok(0);
                }
                let n = self.available().len();
                out.extend_from_slice(self.available());
                self.pos += n;
                Ok(n)
            }
            Framing::Length(_) => {
                if self.left == 0 {
                    return Ok(0);
                }
                if self.available().is_empty() && self.fill()? == 0 {
                    return Err(eof());
                }
                let n = (self.available().len() as u64).min(self.left) as usize;
                out.extend_from_slice(&self.available()[..n]);
                self.pos += n;
                self.left -= n as u64;
                Ok(n)
            }
            Framing::Chunked => loop {
                match self.chunk {
                    ChunkState::Done => return Ok(0),
                    ChunkState::Size { first } => {
                        let line = self.read_line()?;
                        let line = if first {
                            line
                        } else {
                            if !line.is_empty() {
                                return Err(bad("missing CRLF after a chunk"));
                            }
                            self.read_line()?
                        };
                        let hex = line.split(|b| *b == b';').next().unwrap_or_default();
                        let hex = std::str::from_utf8(hex).map_err(|_| bad("bad chunk size"))?;
                        let size = u64::from_str_radix(hex.trim(), 16)
                            .map_err(|_| bad("bad chunk size"))?;
                        if size == 0 {
                            // Trailers, up to the blank line.
                            while !self.read_line()?.is_empty() {}
                            self.chunk = ChunkState::Done;
                            return Ok(0);
                        }
                        self.chunk = ChunkState::Data(size);
                    }
                    ChunkState::Data(left) => {
                        if self.available().is_empty() && self.fill()? == 0 {
                            return Err(eof());
                        }
                        let n = (self.available().len() as u64).min(left) as usize;
                        out.extend_from_slice(&self.available()[..n]);
                        self.pos += n;
                        self.chunk = if left == n as u64 {
                            ChunkState::Size { first: false }
                        } else {
                            ChunkState::Data(left - n as u64)
                        };
                        return Ok(n);
                    }
                }
            },
        }
    }

    /// One line without its line ending (bounded).
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.available().iter().position(|b| *b == b'\n') {
                let line = self.available()[..i].to_vec();
                self.pos += i + 1;
                let mut line = line;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.available().len() > 4096 {
                return Err(bad("chunk-size line too long"));
            }
            if self.fill()? == 0 {
                return Err(eof());
            }
        }
    }

    /// Reads the rest of the body (bounded), so the connection can carry
    /// the next request.
    fn drain_body(&mut self, head: &ResponseHead) -> io::Result<()> {
        if head.framing == Framing::Close {
            return Err(eof());
        }
        let mut sink = Vec::new();
        let mut total = 0;
        loop {
            sink.clear();
            match self.read_body(head, &mut sink)? {
                0 => return Ok(()),
                n => total += n,
            }
            if total > 64 * 1024 {
                return Err(bad("unexpected data after [DONE]"));
            }
        }
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the upstream closed the connection mid-stream",
    )
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn collect(chunks: &[&[u8]]) -> (Vec<String>, Flow) {
        let mut p = SseParser::default();
        let mut got = Vec::new();
        let mut last = Flow::Continue;
        for c in chunks {
            last = p
                .feed::<StreamError>(c, |d| {
                    got.push(String::from_utf8_lossy(d).into_owned());
                    Ok(if d == b"[DONE]" {
                        Flow::Done
                    } else {
                        Flow::Continue
                    })
                })
                .unwrap();
            if last == Flow::Done {
                break;
            }
        }
        (got, last)
    }

    #[test]
    fn sse_events_split_anywhere() {
        let stream =
            b": ping\n\ndata: {\"a\":1}\n\ndata:{\"b\":2}\r\n\r\nevent: x\ndata: [DONE]\n\n";
        let whole = collect(&[stream]);
        assert_eq!(whole.0, ["{\"a\":1}", "{\"b\":2}", "[DONE]"]);
        assert_eq!(whole.1, Flow::Done);
        for cut in 1..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(collect(&[a, b]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(collect(&bytes), whole);
    }

    #[test]
    fn multi_line_data_is_joined() {
        let (got, _) = collect(&[b"data: a\ndata: b\n\n"]);
        assert_eq!(got, ["a\nb"]);
    }

    #[test]
    fn request_body_assembles_the_prompt() {
        let b = OpenAiBackend::new(UpstreamConfig {
            url: "http://127.0.0.1:9/v1".into(),
            key: None,
            model: Some("m1".into()),
            system_prompt: Some("be brief".into()),
            connect_timeout: Duration::from_millis(10),
            read_timeout: Duration::from_secs(1),
            max_idle: 4,
            ca_file: None,
        })
        .unwrap();
        assert_eq!(b.target.path, "/v1/chat/completions");
        assert_eq!(b.target.authority, "127.0.0.1:9");
        let req = GenRequest {
            messages: vec![super::super::Message {
                role: "user".into(),
                content: "hi".into(),
            }],
            max_tokens: 5,
            max_tokens_field: Some("max_tokens"),
            temperature: Some(0.0),
            stop: vec!["x".into()],
            model: Some("ignored".into()),
            extra: Map::new(),
        };
        let v = b.request_body(&req);
        assert_eq!(
            v,
            json!({"model":"m1","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],
                   "stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"temperature":0.0,"stop":["x"]})
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["ftp://x/v1", "not a url", "mailto:a@b"] {
            let r = OpenAiBackend::new(UpstreamConfig {
                url: url.into(),
                key: None,
                model: None,
                system_prompt: None,
                connect_timeout: Duration::from_millis(10),
                read_timeout: Duration::from_secs(1),
                max_idle: 1,
                ca_file: None,
            });
            assert!(r.is_err(), "{url}");
        }
    }
}
