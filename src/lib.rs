//! sluice: a small, fast HTTP/1.1 server that streams LLM tokens to clients
//! over Server-Sent Events.
//!
//! One `mio` event loop owns every socket, every stream's state and a hashed
//! timer wheel; the simulated model is paced inside the loop, and blocking
//! backends run on a small worker pool that hands tokens back through a
//! per-stream queue and one waker.
//!
//! # Layout
//!
//! The data's path: bytes in → request → admission → worker → token queue →
//! frame → socket.
//!
//! - [`config`]: every flag, default and limit.
//! - [`server`]: the mio loop: accept, readiness, timers, waker; the only
//!   code that touches a socket.
//! - [`session`]: the per-connection state machine, free of I/O: bytes,
//!   pieces and time in; bytes, deadlines and "close" out.
//! - [`http`]: request parsing and limits (httparse), response heads.
//! - [`api`]: the native endpoint's JSON body and query string.
//! - [`openai_api`]: `/v1/chat/completions` requests, chunks and errors.
//! - [`sse`]: event framing.
//! - [`outbuf`]: the output buffer and the per-loop pool of allocations.
//! - [`timer`]: the hashed timer wheel.
//! - [`backend`]: the `Backend` trait and the simulated model.
//! - [`upstream`]: the HTTP/1.1 client the OpenAI backend calls (framing,
//!   keep-alive, TLS, cancel and idle timeouts), and its `/readyz` probe.
//! - [`pool`]: the blocking workers and the worker → loop hand-off.
//! - [`metrics`]: counters, histograms, Prometheus exposition.
//! - [`logging`]: stderr logging that never blocks the loop.

pub mod api;
pub mod backend;
pub mod config;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod openai_api;
pub mod outbuf;
pub mod pool;
pub mod server;
pub mod session;
pub mod sse;
pub mod timer;
pub mod upstream;

pub use config::Config;
pub use server::Server;
