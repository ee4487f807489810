//! Which answer a request gets.
//!
//! The router maps a parsed request to an [`Answer`]: a whole response (the
//! demo page, `/v1/models`, CORS preflights, refusals), an operational
//! endpoint for the server to fill in, or a new stream with the encoder of
//! its wire shape. It also shapes every refusal: bad HTTP from the reader,
//! a request timeout, an admission refused — each in its endpoint's error
//! shape (statuses and OpenAI types come from [`crate::errors`]) and with
//! the CORS headers its origin is allowed. It does no I/O and holds no
//! state.
//!
//! `HEAD` is answered like `GET` on the endpoints that answer a `GET` with
//! a document (`/healthz`, `/readyz`, `/metrics`, `/v1/models`, `/`); the
//! connection leaves the body out. On a stream endpoint it is 405: a `HEAD`
//! never starts a generation.

use crate::api::{self, NativeRequest};
use crate::auth::{self, Auth, Presented};
use crate::backend::GenRequest;
use crate::config::{BackendKind, Config};
use crate::encode::{Encoder, NativeJson, NativeSse, OpenAiAtOnce, OpenAiJson, OpenAiSse};
use crate::errors::Shape;
use crate::http::{HttpError, Limits, Method, Request, Version};
use crate::openai_api;

/// The demo page served at `GET /`.
const DEMO_PAGE: &str = include_str!("demo.html");

/// The operational endpoints, answered by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    Healthz,
    Readyz,
    Metrics,
}

/// How a response to one request is sent, whatever its body.
#[derive(Debug, Clone)]
pub struct Meta {
    pub request_id: String,
    pub version: Version,
    pub keep_alive: bool,
    /// Error bodies of this request take this shape.
    pub shape: Shape,
    /// CORS headers for this request's responses.
    pub cors: Vec<(&'static str, String)>,
    /// Who presented a valid API key (none when auth is off).
    pub principal: Option<Box<str>>,
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Besides the CORS headers of [`Meta`].
    pub headers: Vec<(&'static str, String)>,
    /// The connection must close after it (the request could not be read).
    pub close: bool,
}

/// What answers a request.
pub enum Answer {
    Reply(Reply),
    Ops(Ops),
    /// Admit a stream for `gen`, encoded by `encoder`.
    Stream {
        gen: GenRequest,
        encoder: Box<dyn Encoder>,
        /// A client may resume it (native SSE, when resume is on).
        resumable: bool,
    },
    /// Replay stream `sid`'s events after `after`, then go on live.
    /// `quiet_miss`: when there is nothing to resume, 204 (a GET with
    /// `Last-Event-ID`, which stops a browser's EventSource), else 404.
    Resume {
        sid: String,
        after: u64,
        quiet_miss: bool,
    },
    /// Stop the stream with this id (`POST /v1/chat/stream/<id>/cancel`).
    Cancel {
        sid: String,
    },
}

/// A request the server will not start now (admission).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

/// Routes `req`; `sid` is the id a stream would get (it also names the
/// request when the client sent no `X-Request-Id`).
pub fn route(cfg: &Config, auth: &Auth, sid: &str, req: &Request) -> (Meta, Answer) {
    let mut meta = Meta {
        request_id: match req.client_request_id() {
            Some(r) => r.to_string(),
            None => sid.to_string(),
        },
        version: req.version,
        keep_alive: req.keep_alive,
        shape: Shape::for_path(req.path()),
        cors: cors_headers(cfg, req.header("origin")),
        principal: None,
    };
    // Preflights never need a key; everything else is checked before any
    // backend work.
    if req.method != Method::Options || cfg.cors_origin.is_empty() {
        match authorize(auth, req) {
            Ok(principal) => meta.principal = principal,
            Err(msg) => {
                let mut reply = error_reply(meta.shape, 401, "unauthorized", msg);
                reply.headers.push(("WWW-Authenticate", "Bearer".into()));
                return (meta, Answer::Reply(reply));
            }
        }
    }
    let answer = answer(cfg, sid, req, &meta);
    (meta, answer)
}

/// The principal of a request to a protected path, or why it is refused.
/// `/v1/…` needs an API key when keys are set; `/metrics` needs
/// `--metrics-key` when it is set; the rest is open.
fn authorize(auth: &Auth, req: &Request) -> Result<Option<Box<str>>, &'static str> {
    let path = req.path();
    let keys = if path.starts_with("/v1/") && !auth.keys.is_empty() {
        &*auth.keys
    } else if path == "/metrics" {
        match &auth.metrics_key {
            Some(k) => k,
            None => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    // Only the GET stream endpoints take the key in the query: a browser's
    // EventSource cannot set headers.
    let query_token = (req.method == Method::Get && is_stream_get(path))
        .then(|| {
            crate::http::parse_query(req.query().unwrap_or(""))
                .into_iter()
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v)
        })
        .flatten();
    match auth::presented(
        req.header("authorization"),
        req.header("x-api-key"),
        query_token.as_deref(),
    ) {
        Presented::None => Err("an API key is required: send Authorization: Bearer KEY"),
        Presented::Key(k) => match keys.check(k) {
            Some(p) => Ok(Some(p.into())),
            None => Err("the API key is not valid"),
        },
    }
}

/// The endpoints a browser's EventSource may open with `?access_token=`.
fn is_stream_get(path: &str) -> bool {
    path == "/v1/chat/stream"
        || path
            .strip_prefix("/v1/chat/stream/")
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

fn answer(cfg: &Config, sid: &str, req: &Request, meta: &Meta) -> Answer {
    let path = req.path();
    if req.method == Method::Options && !cfg.cors_origin.is_empty() {
        return preflight(req, meta);
    }
    let get = |body: Answer| match req.method {
        // HEAD goes wherever GET does (RFC 9110 §9.3.2), so `Allow` names
        // GET alone, as it always has.
        Method::Get | Method::Head => body,
        _ => method_not_allowed(req, meta, "GET"),
    };
    match path {
        "/v1/chat/stream" => match req.method {
            Method::Get | Method::Post => stream_request(cfg, req, meta),
            _ => method_not_allowed(req, meta, "GET, POST"),
        },
        p if p.starts_with("/v1/chat/stream/") => {
            let rest = &p["/v1/chat/stream/".len()..];
            match rest.strip_suffix("/cancel") {
                Some(sid) if is_sid(sid) => match req.method {
                    Method::Post => Answer::Cancel {
                        sid: sid.to_string(),
                    },
                    _ => method_not_allowed(req, meta, "POST"),
                },
                None if is_sid(rest) => match req.method {
                    Method::Get => resume_by_path(req, meta, rest),
                    _ => method_not_allowed(req, meta, "GET"),
                },
                _ => error(meta, 404, "not_found", &format!("no such endpoint: {p}")),
            }
        }
        "/v1/chat/completions" => match req.method {
            Method::Post => chat_request(cfg, sid, req, meta),
            _ => method_not_allowed(req, meta, "POST"),
        },
        "/v1/models" => get(ok(
            "application/json",
            openai_api::models_body(&served_models(cfg), unix_now()),
        )),
        p if p.starts_with("/v1/models/") => {
            let id = decode_path_segment(&p["/v1/models/".len()..]);
            if !served_models(cfg).contains(&id) {
                let msg = format!("the model {id:?} is not served here; GET /v1/models lists them");
                return match req.method {
                    Method::Get | Method::Head => error(meta, 404, "model_not_found", &msg),
                    _ => method_not_allowed(req, meta, "GET"),
                };
            }
            get(ok(
                "application/json",
                openai_api::model_body(&id, unix_now()),
            ))
        }
        "/" | "/index.html" => get(ok(
            "text/html; charset=utf-8",
            DEMO_PAGE.as_bytes().to_vec(),
        )),
        "/healthz" => get(Answer::Ops(Ops::Healthz)),
        "/readyz" => get(Answer::Ops(Ops::Readyz)),
        "/metrics" => get(Answer::Ops(Ops::Metrics)),
        _ => error(meta, 404, "not_found", &format!("no such endpoint: {path}")),
    }
}

/// `204 No Content`, with `headers`.
fn no_content(headers: Vec<(&'static str, String)>) -> Reply {
    Reply {
        status: 204,
        content_type: "",
        body: Vec::new(),
        headers,
        close: false,
    }
}

fn ok(content_type: &'static str, body: Vec<u8>) -> Answer {
    Answer::Reply(Reply {
        status: 200,
        content_type,
        body,
        headers: Vec::new(),
        close: false,
    })
}

/// An error reply in the request's shape.
fn error(meta: &Meta, status: u16, code: &str, message: &str) -> Answer {
    Answer::Reply(error_reply(meta.shape, status, code, message))
}

fn error_reply(shape: Shape, status: u16, code: &str, message: &str) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        body: shape.body(status, code, message),
        headers: Vec::new(),
        close: false,
    }
}

/// A CORS preflight: 204, with the CORS headers only for an allowed origin.
fn preflight(req: &Request, meta: &Meta) -> Answer {
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
    let allowed = meta
        .cors
        .iter()
        .any(|(k, _)| *k == "Access-Control-Allow-Origin");
    let headers = if allowed {
        vec![
            ("Access-Control-Allow-Methods", "GET, POST, OPTIONS".into()),
            ("Access-Control-Allow-Headers", asked.to_string()),
            ("Access-Control-Max-Age", "600".into()),
            ("Vary", "Access-Control-Request-Headers".into()),
        ]
    } else {
        Vec::new()
    };
    Answer::Reply(no_content(headers))
}

fn method_not_allowed(req: &Request, meta: &Meta, allow: &'static str) -> Answer {
    let msg = format!(
        "{} is not allowed on {}; use {allow}",
        req.method_str(),
        req.path()
    );
    let mut reply = error_reply(meta.shape, 405, "method_not_allowed", &msg);
    reply.headers.push(("Allow", allow.into()));
    Answer::Reply(reply)
}

/// `Last-Event-ID: <stream-id>:<seq>`; a malformed one names no stream.
fn parse_last_event_id(v: &str) -> (String, u64) {
    match v.trim().rsplit_once(':') {
        Some((sid, seq)) if is_sid(sid) => match seq.parse() {
            Ok(seq) => (sid.to_string(), seq),
            Err(_) => (String::new(), 0),
        },
        _ => (String::new(), 0),
    }
}

/// `GET /v1/chat/stream/<id>?after=<seq>` (`after` defaults to 0).
fn resume_by_path(req: &Request, meta: &Meta, sid: &str) -> Answer {
    let mut after = 0;
    for (k, v) in crate::http::parse_query(req.query().unwrap_or("")) {
        match (k.as_str(), v.parse()) {
            ("after", Ok(n)) => after = n,
            ("after", Err(_)) => {
                let msg = format!("after must be a whole number, not {v:?}");
                return error(meta, 400, "bad_request", &msg);
            }
            _ => {}
        }
    }
    Answer::Resume {
        sid: sid.to_string(),
        after,
        quiet_miss: false,
    }
}

fn stream_request(cfg: &Config, req: &Request, meta: &Meta) -> Answer {
    if let Some(v) = req.header("last-event-id") {
        // A reconnect: the body or query is not run again.
        let (sid, after) = parse_last_event_id(v);
        return Answer::Resume {
            sid,
            after,
            quiet_miss: req.method == Method::Get,
        };
    }
    let parsed = if req.method == Method::Post {
        api::parse_body(&req.body, cfg.max_tokens_limit)
    } else {
        api::parse_query_request(req.query(), cfg.max_tokens_limit)
    };
    match parsed {
        Ok(NativeRequest { mut gen, stream }) => {
            if let Err(msg) = cost_control(cfg, &mut gen) {
                return error(meta, 400, "model_not_allowed", &msg);
            }
            let streaming = stream && !cfg.no_streaming;
            let encoder: Box<dyn Encoder> = if streaming {
                Box::new(NativeSse)
            } else {
                Box::<NativeJson>::default()
            };
            Answer::Stream {
                gen,
                encoder,
                resumable: streaming,
            }
        }
        Err(msg) => {
            log::debug!("request {}: 400 {msg}", meta.request_id);
            error(meta, 400, "bad_request", &msg)
        }
    }
}

fn chat_request(cfg: &Config, sid: &str, req: &Request, meta: &Meta) -> Answer {
    let mut chat = match openai_api::parse(&req.body, cfg.max_tokens_limit) {
        Ok(c) => c,
        Err(msg) => return error(meta, 400, "bad_request", &msg),
    };
    if let Err(msg) = cost_control(cfg, &mut chat.gen) {
        return error(meta, 400, "model_not_allowed", &msg);
    }
    // --upstream-model replaces the request's model, so name that one.
    let model = cfg
        .upstream_model
        .clone()
        .or_else(|| chat.gen.model.clone())
        .unwrap_or_else(|| served_model(cfg));
    let format = crate::encode::ChunkFormat::new(sid, &model, unix_now(), chat.include_usage);
    let encoder: Box<dyn Encoder> = match (chat.stream, cfg.no_streaming) {
        (true, false) => Box::new(OpenAiSse(format)),
        (true, true) => Box::new(OpenAiAtOnce(OpenAiJson::new(format))),
        (false, _) => Box::new(OpenAiJson::new(format)),
    };
    // OpenAI clients do not resume: their streams are not logged.
    Answer::Stream {
        gen: chat.gen,
        encoder,
        resumable: false,
    }
}

/// The answer to a request the reader refused (always closes). `path`
/// and `origin` come from the head when it parsed that far.
pub fn bad_request(
    cfg: &Config,
    request_id: String,
    err: &HttpError,
    path: Option<&str>,
    origin: Option<&str>,
    limits: &Limits,
) -> (Meta, Reply) {
    let meta = Meta {
        request_id,
        version: Version::Http11,
        keep_alive: false,
        shape: path.map_or(Shape::Native, Shape::for_path),
        cors: cors_headers(cfg, origin),
        principal: None,
    };
    let msg = err.message(limits);
    log::debug!("bad request: {} {}", err.status(), msg);
    let mut reply = error_reply(meta.shape, err.status(), err.code(), &msg);
    reply.close = true;
    (meta, reply)
}

/// The answer to a head that waits for `100 Continue` when the request
/// would be refused whatever its body (no key, unknown path, wrong method):
/// given at once, instead of inviting a body only to refuse it. The
/// connection closes (the body is never read). The request id is the
/// caller's to set.
pub fn refuse_on_head(cfg: &Config, auth: &Auth, head: &Request) -> Option<(Meta, Reply)> {
    // Routing the head with its (empty) body: whatever a body could change
    // is a 400 about the body, never one of these.
    let (mut meta, answer) = route(cfg, auth, "", head);
    match answer {
        Answer::Reply(mut reply) if matches!(reply.status, 401 | 404 | 405) => {
            reply.close = true;
            meta.keep_alive = false;
            Some((meta, reply))
        }
        _ => None,
    }
}

/// The answer to a connection beyond `--max-connections-per-ip` (then it
/// closes).
pub fn too_many_connections(_cfg: &Config, request_id: String, limit: usize) -> (Meta, Reply) {
    let meta = closing_meta(request_id);
    let msg = format!(
        "more than {limit} connections from this address (--max-connections-per-ip); \
         close some or reuse them"
    );
    let mut reply = error_reply(meta.shape, 429, "too_many_connections", &msg);
    reply.close = true;
    reply.headers.push(("Retry-After", "1".into()));
    (meta, reply)
}

/// The answer to a request whose body waited for the server's budget of
/// buffered request bytes until the request timeout (then it closes: the
/// body was never read).
pub fn overloaded_close(cfg: &Config, request_id: String) -> (Meta, Reply) {
    let meta = closing_meta(request_id);
    let msg = format!(
        "the server holds {} bytes of request bodies (--max-buffered-bytes); retry later",
        cfg.max_buffered_bytes
    );
    let mut reply = error_reply(meta.shape, 503, "overloaded", &msg);
    reply.close = true;
    reply.headers.push(("Retry-After", "1".into()));
    (meta, reply)
}

/// How an answer before any request (or to one that could not be read) goes out.
fn closing_meta(request_id: String) -> Meta {
    Meta {
        request_id,
        version: Version::Http11,
        keep_alive: false,
        shape: Shape::Native,
        cors: Vec::new(),
        principal: None,
    }
}

/// The answer when a request head or body did not arrive in time.
pub fn request_timeout(cfg: &Config, request_id: String) -> (Meta, Reply) {
    let meta = Meta {
        request_id,
        version: Version::Http11,
        keep_alive: false,
        shape: Shape::Native,
        cors: Vec::new(),
        principal: None,
    };
    let msg = format!(
        "the request was not received within {} ms",
        cfg.header_timeout_ms
    );
    let mut reply = error_reply(meta.shape, 408, "request_timeout", &msg);
    reply.close = true;
    (meta, reply)
}

/// Whether `s` looks like a stream id: `[A-Za-z0-9_-]`, 1 to 64 characters.
pub fn is_sid(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The answer to a cancel: it stopped a stream, or there was none to stop
/// (unknown, ended, or another principal's: the same 404 for each).
pub fn cancelled(meta: &Meta, sid: &str, found: bool) -> Reply {
    if found {
        Reply {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_vec(&serde_json::json!({"id": sid, "cancelled": true}))
                .unwrap_or_default(),
            headers: Vec::new(),
            close: false,
        }
    } else {
        error_reply(
            meta.shape,
            404,
            "stream_not_found",
            "no running stream has this id",
        )
    }
}

/// Nothing to resume (unknown, expired, foreign, or older than the log):
/// 204 for a browser's reconnect, else 404 `stream_not_found`.
pub fn nothing_to_resume(meta: &Meta, quiet: bool) -> Reply {
    if quiet {
        no_content(Vec::new())
    } else {
        error_reply(
            meta.shape,
            404,
            "stream_not_found",
            "no stream with this id can be resumed from there",
        )
    }
}

/// The answer to a stream the server would not admit.
pub fn refused(meta: &Meta, r: &Refusal) -> Reply {
    log::debug!("request {}: {} {}", meta.request_id, r.status, r.message);
    let mut reply = error_reply(meta.shape, r.status, r.code, &r.message);
    if r.status == 503 {
        reply.headers.push(("Retry-After", "1".into()));
    }
    reply
}

/// `--allow-model` and `--drop-field`: a model the operator does not allow
/// is refused; fields the operator drops never reach the upstream.
fn cost_control(cfg: &Config, gen: &mut GenRequest) -> Result<(), String> {
    if let Some(m) = &gen.model {
        if !cfg.allow_model.is_empty() && !cfg.allow_model.contains(m) {
            return Err(format!(
                "the model {m:?} is not allowed here; allowed: {}",
                cfg.allow_model.join(", ")
            ));
        }
    }
    for f in &cfg.drop_field {
        gen.drop_extra(f);
        match f.as_str() {
            "temperature" => gen.temperature = None,
            "stop" => gen.stop.clear(),
            "model" => gen.model = None,
            // The local cut at max_tokens stays; only the field goes.
            name if gen.max_tokens_field == Some(name) => gen.max_tokens_field = None,
            _ => {}
        }
    }
    Ok(())
}

/// The models `/v1/models` lists: `--allow-model`, else the one served.
pub fn served_models(cfg: &Config) -> Vec<String> {
    if cfg.allow_model.is_empty() {
        vec![served_model(cfg)]
    } else {
        cfg.allow_model.clone()
    }
}

/// A path segment, percent-decoded (model ids may hold `/` as `%2F`).
fn decode_path_segment(s: &str) -> String {
    crate::http::parse_query(&format!("x={}", s.replace('+', "%2B")))
        .pop()
        .map_or_else(|| s.to_string(), |(_, v)| v)
}

/// The model name responses carry by default.
pub fn served_model(cfg: &Config) -> String {
    match (&cfg.upstream_model, cfg.backend) {
        (Some(m), _) => m.clone(),
        (None, BackendKind::Openai) => "upstream".into(),
        (None, _) => "sluice-sim".into(),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The CORS headers for a request from `origin`: the allowed origin, or
/// only `Vary: Origin` when answers depend on it; none when CORS is off.
fn cors_headers(cfg: &Config, origin: Option<&str>) -> Vec<(&'static str, String)> {
    if cfg.cors_origin.is_empty() {
        return Vec::new();
    }
    let any = cfg.cors_origin.iter().any(|o| o == "*");
    let allowed = origin.and_then(|origin| {
        if any {
            Some("*".to_string())
        } else {
            cfg.cors_origin
                .iter()
                .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(origin))
                .then(|| origin.to_string())
        }
    });
    match allowed {
        Some(o) => vec![
            ("Access-Control-Allow-Origin", o),
            ("Vary", "Origin".into()),
            ("Access-Control-Expose-Headers", "X-Request-Id".into()),
        ],
        // `--cors-origin` names origins (not `*`): answers vary by `Origin`.
        None if !any => vec![("Vary", "Origin".into())],
        None => Vec::new(),
    }
}
