//! What produces tokens: the [`Backend`] trait that pool workers call, the
//! request it is given, and the built-in simulated model.
//!
//! A backend runs on a blocking pool thread (see [`crate::pool`]) and hands
//! each piece of text to a [`crate::pool::TokenSink`]; the simulated model
//! also has a thread-free form that the event loop paces itself.

pub mod openai;
pub mod sim;

use serde::Serialize;

use crate::pool::TokenSink;
use crate::sse::StreamError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What a generation is asked for, after validation.
#[derive(Debug, Clone, Default, PartialEq)]
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
    /// Other OpenAI fields, forwarded to an upstream unchanged.
    pub extra: serde_json::Map<String, serde_json::Value>,
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

/// A model that generates on a blocking worker thread.
pub trait Backend: Send + Sync + 'static {
    /// Generates `req`, pushing each non-empty piece of text into `sink`.
    /// Returns when the answer is complete, when it fails, or soon after
    /// `sink` reports the stream cancelled (then the result is ignored).
    fn generate(&self, req: &GenRequest, sink: &TokenSink) -> Result<Finish, StreamError>;

    /// Whether the backend looks reachable (for `/readyz`); must not block.
    fn ready(&self) -> bool {
        true
    }
}
