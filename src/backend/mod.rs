//! What produces tokens: the [`Backend`] trait that pool workers call, the
//! request it is given, the output it writes to ([`TokenOut`]), and the
//! backends themselves (the simulated model, the OpenAI-compatible relay).
//!
//! A backend runs on a blocking worker thread and knows nothing of the pool
//! or the event loop: it writes each piece of text to a [`TokenOut`], which
//! the pool implements with its per-stream hand-off queue and tests
//! implement with a recorder. The arrows point one way: `pool` → `backend`.

pub mod openai;
#[cfg(test)]
pub(crate) mod record;
pub mod sim;

use std::net::TcpStream;
use std::time::Duration;

use serde::Serialize;

use serde_json::value::RawValue;

use crate::sse::StreamError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What a generation is asked for, after validation.
#[derive(Debug, Clone, Default)]
pub struct GenRequest {
    pub messages: Vec<Message>,
    /// The most tokens the stream relays (the request's, or the limit).
    pub max_tokens: u32,
    /// The field the client gave it in (`max_tokens`, or OpenAI's
    /// `max_completion_tokens`), forwarded upstream under that name; none
    /// when the client left it out (a default as large as the limit could
    /// exceed a small model's context and be refused).
    pub max_tokens_field: Option<&'static str>,
    pub temperature: Option<f64>,
    pub stop: Vec<String>,
    pub model: Option<String>,
    /// The client's `messages` exactly as sent (tool calls, tool results,
    /// content parts and all), forwarded upstream as they are; none for the
    /// native endpoint, whose messages are text.
    pub raw_messages: Option<Box<RawValue>>,
    /// Other OpenAI fields, forwarded to an upstream unchanged, as the
    /// client's own bytes (no parsed tree is kept).
    pub extra: Vec<(String, Box<RawValue>)>,
}

impl PartialEq for GenRequest {
    fn eq(&self, o: &Self) -> bool {
        let raw = |a: &Option<Box<RawValue>>| a.as_ref().map(|r| r.get().to_string());
        let extra = |e: &[(String, Box<RawValue>)]| {
            e.iter()
                .map(|(k, v)| (k.clone(), v.get().to_string()))
                .collect::<Vec<_>>()
        };
        self.messages == o.messages
            && self.max_tokens == o.max_tokens
            && self.max_tokens_field == o.max_tokens_field
            && self.temperature == o.temperature
            && self.stop == o.stop
            && self.model == o.model
            && raw(&self.raw_messages) == raw(&o.raw_messages)
            && extra(&self.extra) == extra(&o.extra)
    }
}

impl GenRequest {
    /// The forwarded field `name`, if the client sent it.
    pub fn extra_field(&self, name: &str) -> Option<&RawValue> {
        self.extra
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| &**v)
    }

    /// Removes the forwarded field `name`.
    pub fn drop_extra(&mut self, name: &str) {
        self.extra.retain(|(k, _)| k != name);
    }
}

/// How a successful generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    /// `stop`, `length`, or the upstream's own reason.
    pub finish_reason: String,
    /// The backend's own count, when it has one.
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
}

/// The stream was cancelled (its client left, or a deadline passed): stop
/// generating; whatever the backend returns now is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the stream was cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// Where a backend writes one generation: a stream's queue of pieces.
///
/// Every method may be called from the backend's (worker) thread only; an
/// implementation shares its state with whoever reads it.
pub trait TokenOut {
    /// Hands one piece of text to the stream, in order. Blocks while the
    /// stream's queue is full, so backpressure from a slow client reaches
    /// the model. Empty text is not a token: nothing is queued. `Err` once
    /// the stream is cancelled.
    fn push_token(&self, text: &str) -> Result<(), Cancelled>;

    /// Hands the other fields of a streamed choice (tool calls, refusal,
    /// reasoning, logprobs) to the stream as one raw JSON object
    /// `{"delta":{…},"logprobs":…}`, in order with the tokens. Only the
    /// OpenAI endpoint relays them; by default they are dropped.
    fn push_delta(&self, _raw: &str) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }

    /// Waits like a model thinking; returns early with `Err` on cancel.
    fn sleep(&self, d: Duration) -> Result<(), Cancelled>;

    /// Whether the stream was cancelled; cheap, for polling loops.
    fn is_cancelled(&self) -> bool;

    /// Registers the socket of the upstream call in flight (`None` once it
    /// is over). A cancel shuts it down, so a read blocked on it returns at
    /// once; a socket registered after the cancel is shut down at once.
    fn set_upstream(&self, sock: Option<TcpStream>);
}

/// A model that generates on a blocking worker thread.
pub trait Backend: Send + Sync + 'static {
    /// Generates `req`, pushing each non-empty piece of text into `out`.
    /// Returns when the answer is complete, when it fails, or soon after
    /// `out` reports the stream cancelled (then the result is ignored).
    fn generate(&self, req: &GenRequest, out: &dyn TokenOut) -> Result<Finish, StreamError>;

    /// Whether the backend looks reachable (for `/readyz`); must not block.
    fn ready(&self) -> bool {
        true
    }
}
