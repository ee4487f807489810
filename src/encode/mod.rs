//! Encoders: stream events → the bytes of one wire shape.
//!
//! An encoder is chosen once, when a request is admitted, from the endpoint
//! and whether the client asked for streaming; nothing else in the server
//! makes a format decision. It writes into a buffer it is given (the
//! connection's output buffer, inside one HTTP chunk) and holds no stream
//! state beyond what its wire shape needs: the whole-answer shapes keep the
//! text until the terminal event, the streaming shapes keep nothing.
//!
//! | shape | endpoint | `streaming()` |
//! |---|---|---|
//! | [`NativeSse`] | `/v1/chat/stream` | yes |
//! | [`NativeJson`] | `/v1/chat/stream`, `"stream": false` | no |
//! | [`OpenAiSse`] | `/v1/chat/completions`, `stream: true` | yes |
//! | [`OpenAiJson`] | `/v1/chat/completions`, `stream: false` | no |
//! | [`OpenAiAtOnce`] | `stream: true` under `--no-streaming` | no |

mod native;
mod openai;

pub use native::{NativeJson, NativeSse};
pub use openai::{ChunkFormat, OpenAiAtOnce, OpenAiJson, OpenAiSse};

use crate::sse::StreamError;

/// What a successful stream reports at its end.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary<'a> {
    /// `stop`, `length`, or the upstream's own reason.
    pub finish_reason: &'a str,
    /// The backend's count of prompt tokens, when known.
    pub prompt_tokens: Option<u32>,
    /// The token events this stream sent.
    pub tokens: u32,
    /// The backend's own count of completion tokens, when it has one.
    pub backend_completion_tokens: Option<u32>,
    pub ttft_ms: Option<f64>,
    pub tokens_per_s: f64,
}

/// Turns one stream's events into the bytes of one wire shape.
///
/// Call order: [`Encoder::open`] once, then any number of
/// [`Encoder::token`] and [`Encoder::heartbeat`], then exactly one of
/// [`Encoder::done`] or [`Encoder::error`].
pub trait Encoder: Send {
    /// Events are sent as they happen (an SSE body that starts at
    /// admission); otherwise one whole answer is sent at the end.
    fn streaming(&self) -> bool;

    /// The `Content-Type` of the response.
    fn content_type(&self) -> &'static str;

    /// Bytes that open a streaming body (OpenAI's role chunk).
    fn open(&mut self, _buf: &mut Vec<u8>) {}

    /// One token's text. `id` (`<stream-id>:<seq>`) is given when the
    /// stream is resumable: a shape that can carry it writes it.
    fn token(&mut self, buf: &mut Vec<u8>, id: Option<(&str, u64)>, text: &str);

    /// A streamed choice's fields besides its text (tool calls, refusal,
    /// reasoning, logprobs), as a raw JSON object
    /// `{"delta":{…},"logprobs":…}`. Shapes that cannot carry them drop
    /// them (the native endpoint: its events are text).
    fn delta(&mut self, _buf: &mut Vec<u8>, _raw: &str) {}

    /// Nothing happened for `--heartbeat-ms`; `phase` is `queued` or `generating`.
    fn heartbeat(&mut self, buf: &mut Vec<u8>, phase: &str);

    /// The successful end. `id` names the terminal event (`<stream-id>:<seq>`).
    fn done(&mut self, buf: &mut Vec<u8>, id: (&str, u64), s: &Summary);

    /// The failed end. For a whole-answer shape this writes the error
    /// body; its HTTP status comes from [`crate::errors::stream_error_status`].
    fn error(&mut self, buf: &mut Vec<u8>, id: (&str, u64), e: &StreamError);
}
