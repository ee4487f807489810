//! Baseline peer: sluice's native endpoint, `POST /v1/chat/stream`, written
//! the ordinary way with axum + tokio (multi-threaded runtime,
//! `axum::response::sse::Sse` + `KeepAlive`, one lazy stream per request).
//!
//! Same events as sluice (`token` `{"t":…}`, `heartbeat`, `done` with
//! finish_reason/usage/ttft_ms/tokens_per_s, `error`) and the same simulated
//! model (fixed word list, FNV-1a start, `--sim-ttft-ms`, `--sim-itl-ms`,
//! `--sim-tokens`), so `sluice-load` can drive both with the same command.
//! A client that leaves drops the response body, which drops the stream:
//! no further token is generated.

use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "axum-sse-peer",
    about = "sluice's native SSE endpoint in axum + tokio (benchmark peer)"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Delay before the first simulated token, in ms.
    #[arg(long, default_value_t = 50)]
    sim_ttft_ms: u64,
    /// Delay between simulated tokens, in ms.
    #[arg(long, default_value_t = 20)]
    sim_itl_ms: u64,
    /// Length of a simulated answer, in tokens.
    #[arg(long, default_value_t = 64)]
    sim_tokens: u32,
    /// A heartbeat is sent after this long without any other event, in ms.
    #[arg(long, default_value_t = 15000)]
    heartbeat_ms: u64,
    /// The largest max_tokens a request may ask for (also the default).
    #[arg(long, default_value_t = 4096)]
    max_tokens_limit: u32,
    /// A stream running longer ends with `error` `deadline_exceeded`, in ms.
    #[arg(long, default_value_t = 600_000)]
    max_stream_ms: u64,
    /// Runtime worker threads (0: one per CPU, tokio's default).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
}

// ---------------------------------------------------------------- the model

/// The same list as sluice's `src/backend/sim.rs`; every word after the
/// first of an answer keeps its leading space.
const WORDS: [&str; 64] = [
    " Once",
    " upon",
    " a",
    " time",
    " the",
    " river",
    " carried",
    " small",
    " boats",
    " past",
    " quiet",
    " towns",
    " where",
    " people",
    " listened",
    " for",
    " news",
    " from",
    " distant",
    " cities",
    " and",
    " every",
    " evening",
    " lanterns",
    " glowed",
    " along",
    " stone",
    " bridges",
    " while",
    " children",
    " counted",
    " stars",
    " above",
    " sleepy",
    " rooftops",
    " as",
    " bakers",
    " prepared",
    " bread",
    " before",
    " dawn",
    " brought",
    " markets",
    " full",
    " of",
    " colour",
    " music",
    " laughter",
    " stories",
    " travelled",
    " quickly",
    " between",
    " friends",
    " who",
    " gathered",
    " near",
    " warm",
    " fires",
    " sharing",
    " dreams",
    " about",
    " tomorrow",
    " with",
    " hope",
];

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[derive(Debug, Clone, Copy)]
struct SimText {
    start: usize,
    total: u32,
    cut: bool,
}

impl SimText {
    fn new(messages: &[String], max_tokens: u32, sim_tokens: u32) -> SimText {
        let mut h = 0xcbf2_9ce4_8422_2325;
        for m in messages {
            h = fnv1a(m.as_bytes(), h);
            h = fnv1a(&[0], h);
        }
        SimText {
            start: (h % WORDS.len() as u64) as usize,
            total: max_tokens.min(sim_tokens),
            cut: max_tokens < sim_tokens,
        }
    }

    fn token(&self, i: u32) -> &'static str {
        let w = WORDS[(self.start + i as usize) % WORDS.len()];
        if i == 0 {
            &w[1..]
        } else {
            w
        }
    }

    fn finish_reason(&self) -> &'static str {
        if self.cut {
            "length"
        } else {
            "stop"
        }
    }
}

// ---------------------------------------------------------------- requests

struct GenRequest {
    /// The messages' contents (roles do not change the simulated text).
    messages: Vec<String>,
    max_tokens: u32,
    stream: bool,
}

fn bad(msg: impl Into<String>) -> Response {
    error_response(StatusCode::BAD_REQUEST, "bad_request", &msg.into())
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn parse_object(obj: Map<String, Value>, limit: u32) -> Result<GenRequest, String> {
    let mut req = GenRequest {
        messages: Vec::new(),
        max_tokens: limit,
        stream: true,
    };
    let (mut prompt, mut messages) = (None, None);
    for (k, v) in obj {
        match k.as_str() {
            "messages" => {
                #[derive(Deserialize)]
                struct Msg {
                    #[allow(dead_code)]
                    role: String,
                    content: String,
                }
                let m: Vec<Msg> = serde_json::from_value(v)
                    .map_err(|e| format!("messages must be a list of {{role, content}}: {e}"))?;
                messages = Some(m.into_iter().map(|m| m.content).collect::<Vec<_>>());
            }
            "prompt" => match v {
                Value::String(s) => prompt = Some(s),
                _ => return Err("prompt must be a string".into()),
            },
            "max_tokens" => {
                req.max_tokens = v
                    .as_i64()
                    .filter(|n| *n >= 1 && *n <= i64::from(limit))
                    .ok_or_else(|| format!("max_tokens must be a whole number from 1 to {limit}"))?
                    as u32
            }
            "temperature" => {
                v.as_f64()
                    .filter(|t| (0.0..=2.0).contains(t))
                    .ok_or("temperature must be a number from 0 to 2")?;
            }
            "stop" => match &v {
                Value::String(_) | Value::Null => {}
                Value::Array(a) if a.len() <= 4 && a.iter().all(Value::is_string) => {}
                _ => return Err("stop must be a string or a list of up to 4 strings".into()),
            },
            "model" => {
                v.as_str().ok_or("model must be a string")?;
            }
            "stream" => req.stream = v.as_bool().ok_or("stream must be true or false")?,
            other => return Err(format!("unknown field {other:?}")),
        }
    }
    req.messages = match (messages, prompt) {
        (Some(_), Some(_)) => return Err("give either messages or prompt, not both".into()),
        (Some(m), None) => m,
        (None, Some(p)) => vec![p],
        (None, None) => return Err("the request needs messages or a prompt".into()),
    };
    Ok(req)
}

// ---------------------------------------------------------------- state

#[derive(Default)]
struct Metrics {
    streams_open: AtomicI64,
    started: AtomicU64,
    completed: AtomicU64,
    errored: AtomicU64,
    disconnected: AtomicU64,
    tokens: AtomicU64,
    ids: AtomicU64,
}

struct App {
    args: Args,
    metrics: Metrics,
    id_key: std::collections::hash_map::RandomState,
}

type Shared = Arc<App>;

impl App {
    /// An opaque stream id: a keyed hash of a counter (keys are random per process).
    fn stream_id(&self) -> String {
        let n = self.metrics.ids.fetch_add(1, Relaxed);
        let mut a = self.id_key.build_hasher();
        a.write_u64(n);
        let mut b = self.id_key.build_hasher();
        b.write_u64(!n);
        format!("{:016x}{:016x}", a.finish(), b.finish())
    }
}

/// Counts a stream in `sluice_streams_open` while it lives; a stream dropped
/// before its terminal event is a disconnect.
struct OpenGuard {
    app: Shared,
    ended: bool,
}

impl OpenGuard {
    fn new(app: Shared) -> OpenGuard {
        app.metrics.streams_open.fetch_add(1, Relaxed);
        app.metrics.started.fetch_add(1, Relaxed);
        OpenGuard { app, ended: false }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let m = &self.app.metrics;
        m.streams_open.fetch_sub(1, Relaxed);
        if !self.ended {
            m.disconnected.fetch_add(1, Relaxed);
        }
    }
}

// ---------------------------------------------------------------- the stream

struct Gen {
    text: SimText,
    i: u32,
    prompt_tokens: u32,
    start: Instant,
    deadline: tokio::time::Instant,
    /// When the next token is due.
    next_due: tokio::time::Instant,
    ttft_ms: Option<f64>,
    sid: String,
    itl: Duration,
    guard: OpenGuard,
}

fn token_event(text: &str) -> Event {
    let mut data = String::with_capacity(text.len() + 8);
    data.push_str("{\"t\":");
    data.push_str(&serde_json::to_string(text).expect("a str serialises"));
    data.push('}');
    Event::default().event("token").data(data)
}

fn done_json(g: &Gen) -> String {
    let secs = g.start.elapsed().as_secs_f64();
    let tps = if secs > 0.0 { g.i as f64 / secs } else { 0.0 };
    let mut s = format!(
        "{{\"finish_reason\":\"{}\",\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{}}}",
        g.text.finish_reason(),
        g.prompt_tokens,
        g.i
    );
    if let Some(t) = g.ttft_ms {
        s.push_str(&format!(",\"ttft_ms\":{t:.3}"));
    }
    s.push_str(&format!(",\"tokens_per_s\":{tps:.1}}}"));
    s
}

/// One step: sleep until the next token is due, then the token; after the
/// last token `done`; `None` after the terminal event.
async fn step(mut g: Gen) -> Option<(Result<Event, Infallible>, Gen)> {
    if g.guard.ended {
        return None;
    }
    let m = &g.guard.app.metrics;
    if g.i < g.text.total {
        // Absolute deadlines, as sluice's simulated model: token i is due at
        // ttft + i * itl after the request; one that is late goes at once.
        let due = g.next_due;
        if due >= g.deadline {
            tokio::time::sleep_until(g.deadline).await;
            let data = serde_json::json!({
                "code": "deadline_exceeded",
                "message": "the stream ran longer than --max-stream-ms",
                "retryable": false,
            })
            .to_string();
            let ev = Event::default()
                .id(format!("{}:{}", g.sid, g.i + 1))
                .event("error")
                .data(data);
            m.errored.fetch_add(1, Relaxed);
            g.guard.ended = true;
            return Some((Ok(ev), g));
        }
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        g.next_due += g.itl;
        let ev = token_event(g.text.token(g.i));
        if g.i == 0 {
            g.ttft_ms = Some(g.start.elapsed().as_secs_f64() * 1e3);
        }
        g.i += 1;
        m.tokens.fetch_add(1, Relaxed);
        return Some((Ok(ev), g));
    }
    let ev = Event::default()
        .id(format!("{}:{}", g.sid, g.i + 1))
        .event("done")
        .data(done_json(&g));
    m.completed.fetch_add(1, Relaxed);
    g.guard.ended = true;
    Some((Ok(ev), g))
}

fn events(g: Gen) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(g, step)
}

fn request_id(headers: &HeaderMap, sid: &str) -> HeaderValue {
    headers
        .get("x-request-id")
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 64 && b.iter().all(|c| c.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_str(sid).expect("hex is a header value"))
}

async fn serve(app: Shared, headers: HeaderMap, req: GenRequest) -> Response {
    let start = Instant::now();
    let sid = app.stream_id();
    let text = SimText::new(&req.messages, req.max_tokens, app.args.sim_tokens);
    let prompt_tokens = req
        .messages
        .iter()
        .map(|m| m.split_whitespace().count() as u32)
        .sum();
    let hdrs = [
        (
            HeaderName::from_static("x-stream-id"),
            HeaderValue::from_str(&sid).expect("hex is a header value"),
        ),
        (
            HeaderName::from_static("x-request-id"),
            request_id(&headers, &sid),
        ),
        (
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        ),
    ];
    let g = Gen {
        text,
        i: 0,
        prompt_tokens,
        start,
        deadline: tokio::time::Instant::now() + Duration::from_millis(app.args.max_stream_ms),
        next_due: tokio::time::Instant::now() + Duration::from_millis(app.args.sim_ttft_ms),
        ttft_ms: None,
        sid,
        itl: Duration::from_millis(app.args.sim_itl_ms),
        guard: OpenGuard::new(app.clone()),
    };
    if !req.stream {
        // One JSON document at the end.
        let mut g = g;
        let mut all = String::new();
        for i in 0..g.text.total {
            if g.next_due > tokio::time::Instant::now() {
                tokio::time::sleep_until(g.next_due).await;
            }
            g.next_due += g.itl;
            all.push_str(g.text.token(i));
            if i == 0 {
                g.ttft_ms = Some(start.elapsed().as_secs_f64() * 1e3);
            }
            g.i += 1;
        }
        app.metrics.tokens.fetch_add(g.i as u64, Relaxed);
        app.metrics.completed.fetch_add(1, Relaxed);
        g.guard.ended = true;
        let done = done_json(&g);
        let body = format!(
            "{{\"text\":{},{}",
            serde_json::to_string(&all).expect("a str serialises"),
            &done[1..]
        );
        return (hdrs, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let keep_alive = KeepAlive::new()
        .interval(Duration::from_millis(app.args.heartbeat_ms))
        .event(
            Event::default()
                .event("heartbeat")
                .data("{\"phase\":\"generating\"}"),
        );
    (hdrs, Sse::new(events(g)).keep_alive(keep_alive)).into_response()
}

async fn stream_post(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("the body is not valid JSON: {e}")),
    };
    let Value::Object(obj) = v else {
        return bad("the body must be a JSON object");
    };
    match parse_object(obj, app.args.max_tokens_limit) {
        Ok(req) => serve(app, headers, req).await,
        Err(e) => bad(e),
    }
}

async fn stream_get(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let mut obj = Map::new();
    for (k, v) in q {
        let value = match k.as_str() {
            "max_tokens" => match v.parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => return bad("max_tokens must be a whole number"),
            },
            "temperature" => match v.parse::<f64>() {
                Ok(n) => Value::from(n),
                Err(_) => return bad("temperature must be a number"),
            },
            "stream" => Value::Bool(v == "true" || v == "1"),
            _ => Value::String(v),
        };
        obj.insert(k, value);
    }
    match parse_object(obj, app.args.max_tokens_limit) {
        Ok(req) => serve(app, headers, req).await,
        Err(e) => bad(e),
    }
}

async fn metrics(State(app): State<Shared>) -> impl IntoResponse {
    let m = &app.metrics;
    let body = format!(
        "# TYPE sluice_streams_open gauge\nsluice_streams_open {}\n\
         # TYPE sluice_streams_started_total counter\nsluice_streams_started_total {}\n\
         # TYPE sluice_streams_completed_total counter\nsluice_streams_completed_total {}\n\
         # TYPE sluice_streams_errored_total counter\nsluice_streams_errored_total {}\n\
         # TYPE sluice_streams_disconnected_total counter\nsluice_streams_disconnected_total {}\n\
         # TYPE sluice_tokens_sent_total counter\nsluice_tokens_sent_total {}\n",
        m.streams_open.load(Relaxed),
        m.started.load(Relaxed),
        m.completed.load(Relaxed),
        m.errored.load(Relaxed),
        m.disconnected.load(Relaxed),
        m.tokens.load(Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn shutdown() {
    let term = async {
        #[cfg(unix)]
        {
            let mut s = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
            s.recv().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Listen backlog, as sluice's (the kernel caps it at `somaxconn`): a burst
/// of thousands of connects is not dropped (tokio's `bind` uses 1024).
const BACKLOG: u32 = 8192;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn main() {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if args.worker_threads > 0 {
        rt.worker_threads(args.worker_threads);
    }
    let rt = rt.build().expect("tokio runtime");
    rt.block_on(async move {
        let listener = listen(args.listen).unwrap_or_else(|e| {
            eprintln!("axum-sse: cannot listen on {}: {e}", args.listen);
            std::process::exit(1)
        });
        let addr = listener.local_addr().expect("bound");
        let app = Arc::new(App {
            args,
            metrics: Metrics::default(),
            id_key: Default::default(),
        });
        let router = Router::new()
            .route("/v1/chat/stream", get(stream_get).post(stream_post))
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(metrics))
            .with_state(app);
        eprintln!("axum-sse: listening on http://{addr}");
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown())
            .await
            .expect("server");
    });
}
