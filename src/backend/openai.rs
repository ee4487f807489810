//! The OpenAI-compatible upstream (llama.cpp, vLLM, Ollama, TGI, OpenAI):
//! `POST {base}/chat/completions` with `stream: true`, its SSE answer read
//! incrementally on a pool worker and relayed piece by piece.
//!
//! This module owns the OpenAI side: the request body, the relay (SSE
//! events → `chat.completion.chunk` deltas → tokens) and the mapping of
//! failures to the contract's error codes. HTTP itself (connections,
//! keep-alive, framing, TLS, timeouts) is [`crate::upstream`]'s.
//!
//! Per token nothing is allocated: the body is read into reused buffers,
//! each event is parsed into a struct that borrows its text (only the first
//! choice is kept, the rest skipped), and the text is appended to the
//! stream's queue. A delta whose JSON has escapes (`\n`, `\"`, `\u…`) is the
//! exception: `serde_json` unescapes it into a fresh string.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::net::TcpStream;
use std::time::Duration;

use std::sync::Arc;

use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{Backend, Finish, GenRequest, TokenOut};
use crate::sse::{ErrorCode, StreamError};
use crate::upstream::probe::Probe;
use crate::upstream::{self, Client, Interrupt, Response, SetupError};

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

/// The probe's check: `GET {base}/models`; any HTTP answer counts as
/// reachable. The first answer is also read for what a new user gets wrong:
/// a 404 (the URL probably lacks its `/v1`), or an `--upstream-model` the
/// upstream does not list.
fn models_check(
    client: Arc<Client>,
    authorization: Option<String>,
    model: Option<String>,
    url: String,
) -> impl FnMut() -> bool + Send + 'static {
    let mut diagnosed = false;
    move || {
        let path = format!("{}/models", client.base_path());
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|a| ("Authorization", a.as_str()))
            .collect();
        let Ok(mut resp) = client.get(&path, &headers, &upstream::Never) else {
            return false;
        };
        let status = resp.status();
        let mut body = Vec::new();
        while body.len() < 1 << 20 {
            match resp.read_body(&mut body) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        resp.release();
        if !std::mem::replace(&mut diagnosed, true) {
            diagnose_models(&url, status, &body, model.as_deref());
        }
        true
    }
}

/// Start-up warnings from the upstream's first `GET …/models` answer.
fn diagnose_models(url: &str, status: u16, body: &[u8], model: Option<&str>) {
    match status {
        200..=299 => {
            let Some(model) = model else {
                return;
            };
            let listed: Vec<String> = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["data"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|m| m["id"].as_str().map(String::from))
                .collect();
            if !listed.is_empty() && !listed.iter().any(|m| m == model) {
                log::warn!(
                    "the upstream at {url} does not list the model {model:?} (--upstream-model); it lists: {}",
                    listed.join(", ")
                );
            }
        }
        404 => log::warn!(
            "GET {url}/models answered 404: --upstream-url is probably missing its API base \
             (for most servers it ends in /v1, e.g. http://127.0.0.1:8081/v1)"
        ),
        401 | 403 => log::warn!("GET {url}/models answered {status}: check --upstream-key"),
        _ => log::info!("GET {url}/models answered {status}"),
    }
}

/// How often `/readyz` reachability is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Largest error body read to find the upstream's message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The `--backend openai` backend.
pub struct OpenAiBackend {
    cfg: UpstreamConfig,
    client: Arc<Client>,
    /// Path of the chat completions endpoint.
    path: String,
    /// `Authorization` header value.
    authorization: Option<String>,
    /// Stops its thread when the backend is dropped.
    probe: Probe,
}

impl OpenAiBackend {
    /// Checks the settings; starts a small thread that probes reachability
    /// for `/readyz` every two seconds, as long as the backend lives.
    pub fn new(cfg: UpstreamConfig) -> Result<OpenAiBackend, String> {
        let client = Client::new(
            &cfg.url,
            upstream::Options {
                connect_timeout: cfg.connect_timeout,
                read_timeout: cfg.read_timeout,
                max_idle: cfg.max_idle,
                ca_file: cfg.ca_file.clone(),
            },
        )
        .map_err(|e| match e {
            SetupError::Url(m) => format!("--upstream-url {m}"),
            SetupError::CaFile(m) => format!("--upstream-ca-file {m}"),
            SetupError::Tls(m) => format!("TLS setup: {m}"),
        })?;
        let authorization = match &cfg.key {
            // A line break would end the header and start another.
            Some(k) if k.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) => {
                return Err("--upstream-key must not contain line breaks".into())
            }
            Some(k) => Some(format!("Bearer {k}")),
            None => None,
        };
        let client = Arc::new(client);
        let probe = Probe::start(
            cfg.url.clone(),
            models_check(
                client.clone(),
                authorization.clone(),
                cfg.model.clone(),
                cfg.url.clone(),
            ),
            PROBE_INTERVAL,
        );
        Ok(OpenAiBackend {
            path: format!("{}/chat/completions", client.base_path()),
            client,
            cfg,
            authorization,
            probe,
        })
    }

    /// The JSON body sent upstream: the client's messages and other
    /// fields as it sent them (raw bytes), `--system-prompt` first, and the
    /// fields sluice sets itself.
    pub fn request_body(&self, req: &GenRequest) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(256 + req.raw_messages.as_ref().map_or(0, |m| m.get().len()));
        let field = |b: &mut Vec<u8>, name: &str| {
            if b.len() > 1 {
                b.push(b',');
            }
            let _ = serde_json::to_writer(&mut *b, name);
            b.push(b':');
        };
        b.push(b'{');
        if let Some(model) = self.cfg.model.as_ref().or(req.model.as_ref()) {
            field(&mut b, "model");
            let _ = serde_json::to_writer(&mut b, model);
        }
        field(&mut b, "messages");
        b.push(b'[');
        let mut first = true;
        if let Some(sp) = &self.cfg.system_prompt {
            let _ = serde_json::to_writer(&mut b, &json!({"role": "system", "content": sp}));
            first = false;
        }
        match &req.raw_messages {
            Some(raw) => {
                // A validated, non-empty JSON array: its items follow ours.
                let inner = raw.get().trim();
                let inner = &inner[1..inner.len() - 1];
                if !first && !inner.trim().is_empty() {
                    b.push(b',');
                }
                b.extend_from_slice(inner.as_bytes());
            }
            None => {
                for m in &req.messages {
                    if !first {
                        b.push(b',');
                    }
                    first = false;
                    let _ = serde_json::to_writer(&mut b, m);
                }
            }
        }
        b.push(b']');
        field(&mut b, "stream");
        b.extend_from_slice(b"true");
        field(&mut b, "stream_options");
        b.extend_from_slice(b"{\"include_usage\":true}");
        if let Some(name) = req.max_tokens_field {
            field(&mut b, name);
            let _ = serde_json::to_writer(&mut b, &req.max_tokens);
        }
        if let Some(t) = req.temperature {
            field(&mut b, "temperature");
            let _ = serde_json::to_writer(&mut b, &t);
        }
        if !req.stop.is_empty() {
            field(&mut b, "stop");
            let _ = serde_json::to_writer(&mut b, &req.stop);
        }
        for (k, v) in &req.extra {
            field(&mut b, k);
            b.extend_from_slice(v.get().as_bytes());
        }
        b.push(b'}');
        b
    }

    /// Sends the request; the response head has arrived when this returns.
    fn send<'a>(&'a self, body: &[u8], watch: &'a Watch<'a>) -> Result<Response<'a>, StreamError> {
        let agent = concat!("sluice/", env!("CARGO_PKG_VERSION"));
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("User-Agent", agent),
        ];
        if let Some(auth) = &self.authorization {
            headers.push(("Authorization", auth));
        }
        self.client
            .post(&self.path, &headers, body, watch)
            .map_err(|e| self.error(e))
    }

    /// The contract's error for a failed exchange.
    fn error(&self, e: upstream::Error) -> StreamError {
        match e {
            upstream::Error::Cancelled => cancelled(),
            upstream::Error::Connect(m) => StreamError::new(ErrorCode::UpstreamUnavailable, m),
            upstream::Error::Timeout => StreamError::new(
                ErrorCode::UpstreamTimeout,
                format!(
                    "the upstream sent nothing for {} ms",
                    self.client.read_timeout().as_millis()
                ),
            ),
            upstream::Error::Protocol(reason) => {
                upstream_error(format!("bad response from the upstream: {reason}"))
            }
            // rustls reports a bad record or alert this way.
            upstream::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                upstream_error(format!("bad response from the upstream: {e}"))
            }
            upstream::Error::Io(e) => {
                upstream_error(format!("the upstream connection failed: {e}"))
            }
        }
    }
}

impl Backend for OpenAiBackend {
    fn generate(&self, req: &GenRequest, out: &dyn TokenOut) -> Result<Finish, StreamError> {
        let body = self.request_body(req);
        let watch = Watch(out);
        let mut resp = self.send(&body, &watch)?;
        if resp.status() != 200 {
            return Err(status_error(&mut resp));
        }
        let mut sse = SseParser::default();
        let mut relay = Relay::default();
        let mut chunk = Vec::with_capacity(16 * 1024);
        loop {
            chunk.clear();
            match resp.read_body(&mut chunk) {
                Ok(0) => return Err(upstream_error("the upstream stream ended without [DONE]")),
                Ok(_) => {}
                Err(e) => return Err(self.error(e)),
            }
            if sse.feed(&chunk, |data| relay.on_data(data, out))? == Flow::Done {
                break;
            }
        }
        // The answer is complete: keep the connection if the rest of the
        // body is already here.
        resp.release();
        Ok(relay.finish())
    }

    fn ready(&self) -> bool {
        self.probe.reachable()
    }
}

/// The stream's output, as the HTTP client's interrupt.
struct Watch<'a>(&'a dyn TokenOut);

impl Interrupt for Watch<'_> {
    fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }

    fn set_socket(&self, sock: Option<TcpStream>) {
        self.0.set_upstream(sock);
    }
}

fn upstream_error(msg: impl Into<String>) -> StreamError {
    StreamError::new(ErrorCode::UpstreamError, msg)
}

/// Returned once the stream is cancelled; the loop ignores it.
fn cancelled() -> StreamError {
    StreamError::new(ErrorCode::Internal, "cancelled")
}

/// An upstream answer other than 200: its status and message. Retryable
/// for 5xx and 429 only: another 4xx would be refused again.
fn status_error(resp: &mut Response<'_>) -> StreamError {
    let mut body = Vec::new();
    // Best effort, bounded: the message is in the first few KiB.
    while body.len() < MAX_ERROR_BODY {
        match resp.read_body(&mut body) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    status_error_from(resp.status(), &body)
}

/// The error for an answer with `status` and `body`: OpenAI's
/// `{"error": {"message": …}}`, `{"error": "…"}`, or the text itself.
fn status_error_from(status: u16, body: &[u8]) -> StreamError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            e.get("message")
                .and_then(Value::as_str)
                .or_else(|| e.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                format!("the upstream answered {status}")
            } else {
                text.chars().take(500).collect()
            }
        });
    StreamError {
        code: ErrorCode::UpstreamError,
        message,
        retryable: status >= 500 || status == 429,
        upstream_status: Some(status),
    }
}

/// What the relay has learned from the chunks so far.
#[derive(Debug, Default)]
struct Relay {
    finish_reason: Option<String>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
    relayed: u32,
    /// Where a choice's other fields are assembled (reused).
    other: String,
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
    choices: FirstChoice<'a>,
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
    finish_reason: Option<Text<'a>>,
    #[serde(default, borrow)]
    logprobs: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Text<'a>>,
    /// The fields relayed as they are, besides the text.
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
    #[serde(default, borrow)]
    refusal: Option<&'a RawValue>,
    #[serde(default, borrow)]
    reasoning_content: Option<&'a RawValue>,
}

impl Delta<'_> {
    /// The non-null fields relayed besides the text, by name.
    fn others(&self) -> impl Iterator<Item = (&'static str, &RawValue)> {
        [
            ("tool_calls", self.tool_calls),
            ("refusal", self.refusal),
            ("reasoning_content", self.reasoning_content),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.filter(|v| v.get() != "null").map(|v| (k, v)))
    }
}

/// A JSON string, borrowed from the event's bytes unless it has escapes.
/// (serde's own `Cow<str>` borrows only as a plain field: inside an
/// `Option` it copies every time.)
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Str<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Str<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(Str(PhantomData))
    }
}

/// The first element of `choices` (the one a streamed answer has), the
/// others skipped: parsing a chunk allocates no `Vec`.
#[derive(Default)]
struct FirstChoice<'a>(Option<Choice<'a>>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct First<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for First<'a> {
            type Value = FirstChoice<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<Choice<'a>>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(FirstChoice(first))
            }
        }
        d.deserialize_seq(First(PhantomData))
    }
}

#[derive(serde::Deserialize)]
struct Usage {
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
}

impl Relay {
    /// Takes one event's data: a chunk, an error, or `[DONE]`.
    fn on_data(&mut self, data: &[u8], out: &dyn TokenOut) -> Result<Flow, StreamError> {
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
        if let Some(choice) = chunk.choices.0 {
            if let Some(delta) = &choice.delta {
                if let Some(Text(text)) = &delta.content {
                    if !text.is_empty() {
                        if out.push_token(text).is_err() {
                            return Err(cancelled());
                        }
                        self.relayed += 1;
                    }
                }
            }
            // Tool calls, refusal, reasoning, logprobs: relayed as they
            // came, as one raw object `{"delta":{…},"logprobs":…}`.
            let logprobs = choice.logprobs.filter(|l| l.get() != "null");
            let has_others = choice
                .delta
                .as_ref()
                .is_some_and(|d| d.others().next().is_some());
            if has_others || logprobs.is_some() {
                let o = &mut self.other;
                o.clear();
                o.push_str("{\"delta\":{");
                for (i, (k, v)) in choice.delta.iter().flat_map(Delta::others).enumerate() {
                    if i > 0 {
                        o.push(',');
                    }
                    o.push('"');
                    o.push_str(k);
                    o.push_str("\":");
                    o.push_str(v.get());
                }
                o.push('}');
                if let Some(l) = logprobs {
                    o.push_str(",\"logprobs\":");
                    o.push_str(l.get());
                }
                o.push('}');
                if out.push_delta(o).is_err() {
                    return Err(cancelled());
                }
            }
            if let Some(Text(r)) = choice.finish_reason {
                self.finish_reason = Some(r.into_owned());
            }
        }
        if let Some(u) = chunk.usage {
            self.prompt_tokens = u.prompt_tokens.or(self.prompt_tokens);
            self.completion_tokens = u.completion_tokens.or(self.completion_tokens);
        }
        Ok(Flow::Continue)
    }

    /// How the answer ended: the upstream's own figures when it sent them,
    /// else the tokens relayed.
    fn finish(self) -> Finish {
        Finish {
            finish_reason: self.finish_reason.unwrap_or_else(|| "stop".into()),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens.or(Some(self.relayed)),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::record::{Call, Recorder};
    use crate::backend::Message;

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

    /// Relays `stream` (SSE bytes, split at `cut`) into `out`.
    fn relay(stream: &str, cut: usize, out: &dyn TokenOut) -> Result<Finish, StreamError> {
        let mut sse = SseParser::default();
        let mut relay = Relay::default();
        let (a, b) = stream.as_bytes().split_at(cut);
        for part in [a, b] {
            if sse.feed(part, |data| relay.on_data(data, out))? == Flow::Done {
                return Ok(relay.finish());
            }
        }
        Err(upstream_error("the upstream stream ended without [DONE]"))
    }

    fn data(v: Value) -> String {
        format!("data: {v}\n\n")
    }

    fn delta(content: &str) -> String {
        data(json!({"choices": [{"index": 0, "delta": {"content": content}}]}))
    }

    #[test]
    fn the_relay_turns_deltas_into_tokens_whatever_the_split() {
        let stream = [
            data(json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]})),
            delta("Hel"),
            ": ping\n\n".into(),
            data(json!({"choices": [{"delta": {}}]})),
            delta("lo \"world\"\n"),
            // Only the first choice is relayed.
            data(json!({"choices": [{"delta": {"content": "é✓"}}, {"delta": {"content": "no"}}]})),
            data(json!({"choices": [{"delta": {}, "finish_reason": "length"}]})),
            data(json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}})),
            "data: [DONE]\n\n".into(),
        ]
        .concat();
        for cut in 0..=stream.len() {
            if !stream.is_char_boundary(cut) {
                continue;
            }
            let out = Recorder::new();
            let finish = relay(&stream, cut, &out).unwrap();
            assert_eq!(
                out.tokens(),
                ["Hel", "lo \"world\"\n", "é✓"],
                "cut at {cut}"
            );
            assert_eq!(
                finish,
                Finish {
                    finish_reason: "length".into(),
                    prompt_tokens: Some(5),
                    completion_tokens: Some(9),
                }
            );
        }
    }

    #[test]
    fn tool_calls_refusals_and_logprobs_are_relayed_raw() {
        let events = [
            data(json!({"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]})),
            data(json!({"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"{\"a\""}}]}}]})),
            data(json!({"choices":[{"index":0,"delta":{"content":"x","refusal":null},"logprobs":{"content":[{"token":"x","logprob":-0.5}]}}]})),
            data(json!({"choices":[{"index":0,"delta":{"refusal":"no","reasoning_content":"hmm"}}]})),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        let out = Recorder::new();
        relay(&events, 7, &out).unwrap();
        // Deltas compared as JSON (the relay keeps the upstream's bytes;
        // the test's `json!` orders keys its own way).
        let calls: Vec<Value> = out
            .calls()
            .into_iter()
            .map(|c| match c {
                Call::Token(t) => json!({ "token": t }),
                Call::Delta(d) => serde_json::from_str(&d).unwrap(),
                other => json!(format!("{other:?}")),
            })
            .collect();
        assert_eq!(
            calls,
            [
                json!({"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"{\"a\""}}]}}),
                json!({"token": "x"}),
                json!({"delta":{},"logprobs":{"content":[{"token":"x","logprob":-0.5}]}}),
                json!({"delta":{"refusal":"no","reasoning_content":"hmm"}}),
            ]
        );
    }

    #[test]
    fn without_figures_the_relay_counts_what_it_relayed() {
        let stream = [delta("a"), delta("b"), "data: [DONE]\n\n".into()].concat();
        let out = Recorder::new();
        assert_eq!(
            relay(&stream, 0, &out).unwrap(),
            Finish {
                finish_reason: "stop".into(),
                prompt_tokens: None,
                completion_tokens: Some(2),
            }
        );
    }

    #[test]
    fn the_relay_stops_at_a_cancel() {
        let stream = [
            delta("a"),
            delta("b"),
            delta("c"),
            "data: [DONE]\n\n".into(),
        ]
        .concat();
        let out = Recorder::cancel_after(2);
        let e = relay(&stream, 0, &out).unwrap_err();
        assert_eq!(e.message, "cancelled");
        assert_eq!(out.tokens(), ["a", "b"]);
    }

    #[test]
    fn bad_streams_are_upstream_errors() {
        let cases = [
            (
                [
                    delta("a"),
                    data(json!({"error": {"message": "the model went away"}})),
                ]
                .concat(),
                "the model went away",
            ),
            (
                [delta("a"), data(json!({"error": "overloaded"}))].concat(),
                "overloaded",
            ),
            (
                [delta("a"), "data: {not json\n\n".into()].concat(),
                "malformed JSON in the upstream stream",
            ),
            (
                [delta("a"), data(json!({"choices": {"not": "a list"}}))].concat(),
                "malformed JSON in the upstream stream",
            ),
            (delta("a"), "the upstream stream ended without [DONE]"),
        ];
        for (stream, message) in cases {
            let out = Recorder::new();
            let e = relay(&stream, 0, &out).unwrap_err();
            assert_eq!(e.code, ErrorCode::UpstreamError, "{stream}");
            assert!(e.message.starts_with(message), "{stream}: {}", e.message);
            assert_eq!(out.tokens(), ["a"]);
        }
    }

    #[test]
    fn an_error_status_keeps_the_upstreams_message_and_says_if_retrying_helps() {
        let openai = br#"{"error": {"message": "no such model", "type": "invalid_request_error"}}"#;
        let cases: &[(u16, &[u8], &str, bool)] = &[
            (400, openai, "no such model", false),
            (401, br#"{"error": "bad key"}"#, "bad key", false),
            (404, b"", "the upstream answered 404", false),
            (422, b"  plain text  ", "plain text", false),
            (429, openai, "no such model", true),
            (500, b"oops", "oops", true),
            (503, b"", "the upstream answered 503", true),
        ];
        for &(status, body, message, retryable) in cases {
            let e = status_error_from(status, body);
            assert_eq!(e.code, ErrorCode::UpstreamError);
            assert_eq!(e.upstream_status, Some(status));
            assert_eq!(
                (e.message.as_str(), e.retryable),
                (message, retryable),
                "{status}"
            );
        }
    }

    fn config(url: &str) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            key: None,
            model: None,
            system_prompt: None,
            connect_timeout: Duration::from_millis(10),
            read_timeout: Duration::from_secs(1),
            max_idle: 1,
            ca_file: None,
        }
    }

    #[test]
    fn failures_map_to_the_contracts_codes() {
        let b = OpenAiBackend::new(config("http://127.0.0.1:9/v1")).unwrap();
        let io = |kind| upstream::Error::Io(std::io::Error::new(kind, "x"));
        let cases = [
            (
                upstream::Error::Connect("refused".into()),
                ErrorCode::UpstreamUnavailable,
            ),
            (upstream::Error::Timeout, ErrorCode::UpstreamTimeout),
            (upstream::Error::Protocol("bad"), ErrorCode::UpstreamError),
            (
                io(std::io::ErrorKind::InvalidData),
                ErrorCode::UpstreamError,
            ),
            (
                io(std::io::ErrorKind::ConnectionReset),
                ErrorCode::UpstreamError,
            ),
            (upstream::Error::Cancelled, ErrorCode::Internal),
        ];
        for (e, code) in cases {
            let shown = e.to_string();
            let mapped = b.error(e);
            assert_eq!(mapped.code, code, "{shown}");
            assert_eq!(mapped.retryable, code.retryable(), "{shown}");
            assert_eq!(mapped.upstream_status, None, "{shown}");
        }
        assert_eq!(
            b.error(upstream::Error::Timeout).message,
            "the upstream sent nothing for 1000 ms"
        );
    }

    #[test]
    fn request_body_assembles_the_prompt() {
        let b = OpenAiBackend::new(UpstreamConfig {
            model: Some("m1".into()),
            system_prompt: Some("be brief".into()),
            max_idle: 4,
            ..config("http://127.0.0.1:9/v1")
        })
        .unwrap();
        assert_eq!(b.path, "/v1/chat/completions");
        assert_eq!(b.client.authority(), "127.0.0.1:9");
        let req = GenRequest {
            messages: vec![Message {
                role: "user".into(),
                content: "hi".into(),
            }],
            max_tokens: 5,
            max_tokens_field: Some("max_tokens"),
            temperature: Some(0.0),
            stop: vec!["x".into()],
            model: Some("ignored".into()),
            ..GenRequest::default()
        };
        let v: Value = serde_json::from_slice(&b.request_body(&req)).unwrap();
        assert_eq!(
            v,
            json!({"model":"m1","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],
                   "stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"temperature":0.0,"stop":["x"]})
        );
        // The OpenAI endpoint's messages and unknown fields go as they came.
        let chat = crate::openai_api::parse(
            br#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":[{"type":"text","text":"42"}]}],"tools":[{"type":"function","function":{"name":"f"}}],"seed":7}"#,
            4096,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&b.request_body(&chat.gen)).unwrap();
        assert_eq!(
            v["messages"][0],
            json!({"role":"system","content":"be brief"})
        );
        assert_eq!(v["messages"][1]["tool_calls"][0]["id"], "c1");
        assert_eq!(v["messages"][2]["tool_call_id"], "c1");
        assert_eq!(v["messages"][2]["content"][0]["text"], "42");
        assert_eq!(v["tools"][0]["function"]["name"], "f");
        assert_eq!(v["seed"], 7);
        let root = OpenAiBackend::new(config("http://example.test/")).unwrap();
        assert_eq!(root.path, "/chat/completions");
        assert_eq!(root.client.authority(), "example.test");
    }

    #[test]
    fn bad_settings_are_refused() {
        for url in ["ftp://x/v1", "not a url", "mailto:a@b"] {
            let r = OpenAiBackend::new(config(url));
            assert!(
                r.err().is_some_and(|e| e.starts_with("--upstream-url")),
                "{url}"
            );
        }
        let r = OpenAiBackend::new(UpstreamConfig {
            key: Some("k\r\nX-Injected: 1".into()),
            ..config("http://127.0.0.1:9/v1")
        });
        assert!(r.is_err());
        let r = OpenAiBackend::new(UpstreamConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..config("https://127.0.0.1:9/v1")
        });
        assert!(r.err().is_some_and(|e| e.starts_with("--upstream-ca-file")));
    }

    #[test]
    fn the_probe_thread_stops_with_its_backend() {
        let mut b = OpenAiBackend::new(config("http://127.0.0.1:9/v1")).unwrap();
        let thread = b.probe.take_thread().expect("a probe thread");
        drop(b);
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() {
            assert!(
                std::time::Instant::now() < until,
                "the probe outlived its backend"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        thread.join().unwrap();
    }
}
