//! The OpenAI Chat Completions shapes: `chat.completion.chunk` data events,
//! one `chat.completion` object, and the whole answer in one chunk (for a
//! streaming client under `--no-streaming`).

use std::io::Write;

use super::{Encoder, Summary};
use crate::errors;
use crate::sse::StreamError;

/// Per-stream constants of the chunk events.
#[derive(Debug, Clone)]
pub struct ChunkFormat {
    /// `{"id":…,"object":"chat.completion.chunk","created":…,"model":…,"choices":`
    prefix: String,
    include_usage: bool,
    model: String,
    id: String,
    created: u64,
}

impl ChunkFormat {
    pub fn new(stream_id: &str, model: &str, created: u64, include_usage: bool) -> ChunkFormat {
        let id = format!("chatcmpl-{stream_id}");
        let mut prefix = format!("{{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":");
        prefix.push_str(&serde_json::to_string(model).unwrap_or_else(|_| "\"\"".into()));
        prefix.push_str(",\"choices\":");
        ChunkFormat {
            prefix,
            include_usage,
            model: model.to_string(),
            id,
            created,
        }
    }

    fn role(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(
            b"[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        );
    }

    fn content(&self, buf: &mut Vec<u8>, text: &str) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(b"[{\"index\":0,\"delta\":{\"content\":");
        let _ = serde_json::to_writer(&mut *buf, text);
        buf.extend_from_slice(b"},\"finish_reason\":null}]}\n\n");
    }

    fn whole(&self, buf: &mut Vec<u8>, text: &str, finish_reason: &str) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(b"[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":");
        let _ = serde_json::to_writer(&mut *buf, text);
        buf.extend_from_slice(b"},\"finish_reason\":");
        let _ = serde_json::to_writer(&mut *buf, finish_reason);
        buf.extend_from_slice(b"}]}\n\n");
    }

    fn finish(&self, buf: &mut Vec<u8>, finish_reason: &str) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(b"[{\"index\":0,\"delta\":{},\"finish_reason\":");
        let _ = serde_json::to_writer(&mut *buf, finish_reason);
        buf.extend_from_slice(b"}]}\n\n");
    }

    fn usage_and_done(&self, buf: &mut Vec<u8>, s: &Summary) {
        if self.include_usage {
            buf.extend_from_slice(b"data: ");
            buf.extend_from_slice(self.prefix.as_bytes());
            buf.extend_from_slice(b"[],\"usage\":");
            usage(buf, s);
            buf.extend_from_slice(b"}\n\n");
        }
        buf.extend_from_slice(b"data: [DONE]\n\n");
    }

    fn error_event(&self, buf: &mut Vec<u8>, err: &StreamError) {
        buf.extend_from_slice(b"data: ");
        let status = errors::stream_error_status(err);
        buf.extend_from_slice(&errors::openai_body(
            status,
            err.code.as_str(),
            &err.message,
        ));
        buf.extend_from_slice(b"\n\n");
    }
}

/// OpenAI usage is the backend's own completion count when it has one.
fn usage(buf: &mut Vec<u8>, s: &Summary) {
    let p = s.prompt_tokens.unwrap_or(0);
    let completion = s.backend_completion_tokens.unwrap_or(s.tokens);
    let _ = write!(
        buf,
        "{{\"prompt_tokens\":{p},\"completion_tokens\":{completion},\"total_tokens\":{}}}",
        p + completion
    );
}

/// `stream: true`: chunk events, a finish chunk, usage when asked, `[DONE]`.
#[derive(Debug)]
pub struct OpenAiSse(pub ChunkFormat);

impl Encoder for OpenAiSse {
    fn streaming(&self) -> bool {
        true
    }

    fn content_type(&self) -> &'static str {
        "text/event-stream"
    }

    fn open(&mut self, buf: &mut Vec<u8>) {
        self.0.role(buf)
    }

    fn token(&mut self, buf: &mut Vec<u8>, _id: Option<(&str, u64)>, text: &str) {
        self.0.content(buf, text)
    }

    fn heartbeat(&mut self, buf: &mut Vec<u8>, _phase: &str) {
        // OpenAI clients skip SSE comments.
        buf.extend_from_slice(b": keep-alive\n\n")
    }

    fn done(&mut self, buf: &mut Vec<u8>, _id: (&str, u64), s: &Summary) {
        self.0.finish(buf, s.finish_reason);
        self.0.usage_and_done(buf, s);
    }

    fn error(&mut self, buf: &mut Vec<u8>, _id: (&str, u64), e: &StreamError) {
        // A final error event, with no `[DONE]` after it.
        self.0.error_event(buf, e)
    }
}

/// `stream: false`: one `chat.completion` object.
#[derive(Debug)]
pub struct OpenAiJson {
    format: ChunkFormat,
    text: String,
}

impl OpenAiJson {
    pub fn new(format: ChunkFormat) -> OpenAiJson {
        OpenAiJson {
            format,
            text: String::new(),
        }
    }
}

impl Encoder for OpenAiJson {
    fn streaming(&self) -> bool {
        false
    }

    fn content_type(&self) -> &'static str {
        "application/json"
    }

    fn token(&mut self, _buf: &mut Vec<u8>, _id: Option<(&str, u64)>, text: &str) {
        self.text.push_str(text)
    }

    fn heartbeat(&mut self, _buf: &mut Vec<u8>, _phase: &str) {}

    fn done(&mut self, buf: &mut Vec<u8>, _id: (&str, u64), s: &Summary) {
        let f = &self.format;
        let _ = write!(
            buf,
            "{{\"id\":\"{}\",\"object\":\"chat.completion\",\"created\":{},\"model\":",
            f.id, f.created
        );
        let _ = serde_json::to_writer(&mut *buf, &f.model);
        buf.extend_from_slice(
            b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":",
        );
        let _ = serde_json::to_writer(&mut *buf, &self.text);
        buf.extend_from_slice(b"},\"finish_reason\":");
        let _ = serde_json::to_writer(&mut *buf, s.finish_reason);
        buf.extend_from_slice(b"}],\"usage\":");
        usage(buf, s);
        buf.push(b'}');
    }

    fn error(&mut self, buf: &mut Vec<u8>, _id: (&str, u64), e: &StreamError) {
        let status = errors::stream_error_status(e);
        buf.extend_from_slice(&errors::openai_body(status, e.code.as_str(), &e.message));
    }
}

/// `stream: true` under `--no-streaming`: the whole answer in one chunk,
/// then usage and `[DONE]`, so streaming clients keep working.
#[derive(Debug)]
pub struct OpenAiAtOnce(pub OpenAiJson);

impl Encoder for OpenAiAtOnce {
    fn streaming(&self) -> bool {
        false
    }

    fn content_type(&self) -> &'static str {
        "text/event-stream"
    }

    fn token(&mut self, buf: &mut Vec<u8>, id: Option<(&str, u64)>, text: &str) {
        self.0.token(buf, id, text)
    }

    fn heartbeat(&mut self, _buf: &mut Vec<u8>, _phase: &str) {}

    fn done(&mut self, buf: &mut Vec<u8>, _id: (&str, u64), s: &Summary) {
        let f = &self.0.format;
        f.whole(buf, &self.0.text, s.finish_reason);
        f.usage_and_done(buf, s);
    }

    fn error(&mut self, buf: &mut Vec<u8>, id: (&str, u64), e: &StreamError) {
        self.0.error(buf, id, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn summary() -> Summary<'static> {
        Summary {
            finish_reason: "stop",
            prompt_tokens: Some(3),
            tokens: 1,
            backend_completion_tokens: None,
            ttft_ms: None,
            tokens_per_s: 0.0,
        }
    }

    #[test]
    fn chunks_are_valid_json() {
        let mut e = OpenAiSse(ChunkFormat::new("abc", "sim", 1700000000, true));
        let mut b = Vec::new();
        e.open(&mut b);
        e.token(&mut b, None, "he said \"hi\"\n");
        e.done(&mut b, ("abc", 2), &summary());
        let text = String::from_utf8(b).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5, "{text}");
        assert_eq!(events[4], "data: [DONE]");
        for e in &events[..4] {
            let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(v["id"], "chatcmpl-abc");
            assert_eq!(v["object"], "chat.completion.chunk");
        }
        let v: Value = serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["choices"][0]["delta"]["content"], "he said \"hi\"\n");
        let v: Value = serde_json::from_str(events[3].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["usage"]["total_tokens"], 4);
        assert_eq!(v["choices"], serde_json::json!([]));
    }

    #[test]
    fn completion_object() {
        let mut e = OpenAiJson::new(ChunkFormat::new("1", "sim", 5, false));
        let mut b = Vec::new();
        e.token(&mut b, None, "hel");
        e.token(&mut b, None, "lo");
        assert!(b.is_empty());
        let s = Summary {
            finish_reason: "length",
            prompt_tokens: None,
            ..summary()
        };
        e.done(&mut b, ("1", 3), &s);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "hello");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 1);
    }

    #[test]
    fn an_upstream_429_is_a_rate_limit_error_in_every_shape() {
        let e = StreamError {
            upstream_status: Some(429),
            ..StreamError::new(crate::sse::ErrorCode::UpstreamError, "slow down")
        };
        let mut sse = OpenAiSse(ChunkFormat::new("1", "m", 0, false));
        let mut b = Vec::new();
        sse.error(&mut b, ("1", 1), &e);
        let data = std::str::from_utf8(&b).unwrap();
        let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap().trim()).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        let mut json = OpenAiJson::new(ChunkFormat::new("1", "m", 0, false));
        let mut b = Vec::new();
        json.error(&mut b, ("1", 1), &e);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(errors::stream_error_status(&e), 429);
    }
}
