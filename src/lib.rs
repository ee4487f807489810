//! sluice: a small, fast HTTP/1.1 server that streams LLM tokens to clients
//! over Server-Sent Events.
//!
//! Each `mio` event loop (one, or `--threads N`) owns its sockets; a
//! sans-IO engine beside it owns its connection machines, its streams and a
//! hashed timer wheel. The
//! simulated model is paced inside the loop; blocking backends run on a
//! small worker pool that hands tokens back through a per-stream queue and
//! one waker. A stream is not its connection: the connection attaches to it
//! as its subscriber, so a stream can outlive the socket that asked for it.
//!
//! # Layout
//!
//! The data's path: bytes in → [`conn`] (a request) → [`router`] (which
//! answer) → admission ([`server`]'s services) → [`stream`] (producer,
//! stages, `seq`, the terminal event) → [`encode`] (the wire shape) →
//! [`conn`] (the body's chunks) → socket.
//!
//! - [`config`]: every flag, default and limit.
//! - [`server`]: the mio loops: accept, readiness, waker, signals, drain;
//!   the only code that touches a socket (`server/loops.rs`: `--threads`
//!   loops on one listening socket, and the connections and messages they
//!   hand each other; `server/sock.rs`: the listening socket and the
//!   options of each connection).
//! - [`limits`]: the counts behind the process-wide limits, shared by
//!   every loop.
//! - [`engine`]: the sans-IO core of a loop: the connection slab, the
//!   stream table and the timer wheel, and the routing of bytes and events
//!   between them (`engine/flow.rs`: admission, the pump that moves a
//!   stream's events to its subscriber, the stream's timer — the paced
//!   path; `engine/intake.rs`: the buffered-bytes budget, routing
//!   per phase, idle eviction and per-address counts; `engine/ending.rs`:
//!   how a stream ends; `engine/resume.rs`: resume and stop by id;
//!   `engine/remote.rs`: the same for streams of other instances, through
//!   the shared store;
//!   `engine/loops.rs`: which loop owns a stream, connections handed to it;
//!   `engine/timers.rs`: one wheel entry per connection and per stream,
//!   re-armed lazily).
//! - [`conn`]: the HTTP/1.1 connection machine (requests in, responses and
//!   body chunks out; keep-alive, pipelining, half-close, timeouts). It
//!   names no endpoint and no event format.
//! - [`router`]: request → answer; API keys checked before any backend
//!   work; refusals in each endpoint's shape; CORS.
//! - [`auth`]: API keys and the principals they identify.
//! - [`errors`]: the one map from an error to its HTTP status, OpenAI type
//!   and body.
//! - [`stream`]: one generation and the loop's stream table; its stages,
//!   its replay log and its ids (`stream/sid.rs`); `stream/LIFECYCLE.md`
//!   draws its states.
//! - [`encode`]: one encoder per wire shape (native SSE, native JSON, OpenAI
//!   chunks, OpenAI JSON, OpenAI all-at-once).
//! - [`http`]: request parsing and limits (httparse), response heads.
//! - [`api`]: the native endpoint's JSON body and query string.
//! - [`openai_api`]: `/v1/chat/completions` request bodies, `/v1/models`.
//! - [`sse`]: native event framing; the stream error codes.
//! - [`outbuf`]: the output buffer and the per-loop pool of allocations.
//! - [`timer`]: the hashed timer wheel.
//! - [`backend`]: the `Backend` trait and the simulated model.
//! - [`upstream`]: the HTTP/1.1 client the OpenAI backend calls (framing,
//!   keep-alive, TLS, cancel and idle timeouts), and its `/readyz` probe.
//! - [`pool`]: the blocking workers and the worker → loop hand-off.
//! - [`store`]: `--resume-store redis://…`: resumable streams shared by
//!   instances (batched writes from a store thread, relays of other
//!   instances' streams, stops over pub/sub, heartbeats).
//! - [`redact`]: `--redact`/`--redact-builtin`: the rule set compiled once
//!   into a lazy DFA, and the stream stage that replaces matches, holding
//!   back only text that could still become part of one.
//! - [`metrics`]: counters, histograms, Prometheus exposition.
//! - [`logging`]: stderr logging that never blocks the loop.
//! - [`wire`]: numbers and JSON strings written into an output buffer
//!   without `core::fmt` (heads, frames, terminal events).

pub mod access;
pub mod api;
pub mod auth;
pub mod backend;
pub mod config;
pub mod conn;
pub mod encode;
pub mod engine;
pub mod errors;
pub mod http;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod openai_api;
pub mod outbuf;
pub mod pool;
pub mod redact;
pub mod router;
pub mod server;
pub mod sse;
pub mod store;
pub mod stream;
pub mod timer;
pub mod upstream;
pub mod wire;

pub use config::Config;
pub use server::Server;
