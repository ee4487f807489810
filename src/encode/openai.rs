//! The OpenAI Chat Completions shapes: `chat.completion.chunk` data events,
//! one `chat.completion` object, and the whole answer in one chunk (for a
//! streaming client under `--no-streaming`).

use std::io::Write;

use serde_json::{json, Value};

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
        crate::wire::push_json_str(buf, text);
        buf.extend_from_slice(b"},\"finish_reason\":null}]}\n\n");
    }

    fn whole(&self, buf: &mut Vec<u8>, message: &Value, logprobs: &Value, finish_reason: &str) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(b"[{\"index\":0,\"delta\":");
        let _ = serde_json::to_writer(&mut *buf, message);
        buf.extend_from_slice(b",\"logprobs\":");
        let _ = serde_json::to_writer(&mut *buf, logprobs);
        buf.extend_from_slice(b",\"finish_reason\":");
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

/// OpenAI usage: the backend's own completion count when it has one, else
/// the tokens relayed. A prompt count nobody gave is left out (with the
/// total, which needs it) rather than reported as 0; sums never wrap.
fn usage(buf: &mut Vec<u8>, s: &Summary) {
    let completion = s.backend_completion_tokens.unwrap_or(s.tokens);
    match s.prompt_tokens {
        Some(p) => {
            let _ = write!(
                buf,
                "{{\"prompt_tokens\":{p},\"completion_tokens\":{completion},\"total_tokens\":{}}}",
                u64::from(p) + u64::from(completion)
            );
        }
        None => {
            let _ = write!(buf, "{{\"completion_tokens\":{completion}}}");
        }
    }
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

    fn delta(&mut self, buf: &mut Vec<u8>, raw: &str) {
        // `raw` is `{"delta":{…},…}`: its members go into the choice.
        let inner = raw.trim();
        let Some(inner) = inner
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .filter(|r| !r.trim().is_empty())
        else {
            return;
        };
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.0.prefix.as_bytes());
        buf.extend_from_slice(b"[{\"index\":0,");
        buf.extend_from_slice(inner.as_bytes());
        buf.extend_from_slice(b",\"finish_reason\":null}]}\n\n");
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
    /// What the streamed deltas said besides text, merged.
    other: Option<Box<Merged>>,
}

/// A streamed answer's other fields, merged as OpenAI merges them: tool
/// calls by `index` (their `arguments` concatenated), text fields appended,
/// logprob lists extended.
#[derive(Debug, Default)]
struct Merged {
    tool_calls: Vec<Value>,
    refusal: Option<String>,
    reasoning_content: Option<String>,
    logprobs: Option<Value>,
}

impl Merged {
    fn add(&mut self, raw: &str) {
        let Ok(v) = serde_json::from_str::<Value>(raw) else {
            return;
        };
        let delta = &v["delta"];
        for tc in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap_or(self.tool_calls.len() as u64) as usize;
            if i > 1024 {
                continue;
            }
            while self.tool_calls.len() <= i {
                self.tool_calls.push(json!({"id": null, "type": "function", "function": {"name": null, "arguments": ""}}));
            }
            let acc = &mut self.tool_calls[i];
            for k in ["id", "type"] {
                if let Some(x) = tc.get(k).filter(|x| !x.is_null()) {
                    acc[k] = x.clone();
                }
            }
            if let Some(n) = tc["function"].get("name").filter(|x| !x.is_null()) {
                acc["function"]["name"] = n.clone();
            }
            if let Some(a) = tc["function"]["arguments"].as_str() {
                let mut args = acc["function"]["arguments"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                args.push_str(a);
                acc["function"]["arguments"] = Value::String(args);
            }
        }
        for (k, slot) in [
            ("refusal", &mut self.refusal),
            ("reasoning_content", &mut self.reasoning_content),
        ] {
            if let Some(t) = delta[k].as_str() {
                slot.get_or_insert_with(String::new).push_str(t);
            }
        }
        if let Some(lp) = v.get("logprobs").filter(|x| !x.is_null()) {
            let acc = self.logprobs.get_or_insert_with(|| json!({"content": []}));
            for k in ["content", "refusal"] {
                if let Some(items) = lp[k].as_array() {
                    if !acc[k].is_array() {
                        acc[k] = json!([]);
                    }
                    if let Some(list) = acc[k].as_array_mut() {
                        list.extend(items.iter().cloned());
                    }
                }
            }
        }
    }

    /// The message's members besides role and content.
    fn message_fields(&self, m: &mut serde_json::Map<String, Value>) {
        if !self.tool_calls.is_empty() {
            m.insert("tool_calls".into(), Value::Array(self.tool_calls.clone()));
        }
        if let Some(r) = &self.refusal {
            m.insert("refusal".into(), json!(r));
        }
        if let Some(r) = &self.reasoning_content {
            m.insert("reasoning_content".into(), json!(r));
        }
    }
}

impl OpenAiJson {
    pub fn new(format: ChunkFormat) -> OpenAiJson {
        OpenAiJson {
            format,
            text: String::new(),
            other: None,
        }
    }

    /// The message (or the all-at-once chunk's delta): role, content (null
    /// when the answer is tool calls alone), and the merged other fields.
    fn message(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("role".into(), json!("assistant"));
        let calls_only = self.text.is_empty()
            && self
                .other
                .as_ref()
                .is_some_and(|o| !o.tool_calls.is_empty());
        m.insert(
            "content".into(),
            if calls_only {
                Value::Null
            } else {
                json!(self.text)
            },
        );
        if let Some(o) = &self.other {
            o.message_fields(&mut m);
        }
        Value::Object(m)
    }

    fn logprobs(&self) -> Value {
        self.other
            .as_ref()
            .and_then(|o| o.logprobs.clone())
            .unwrap_or(Value::Null)
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

    fn delta(&mut self, _buf: &mut Vec<u8>, raw: &str) {
        self.other.get_or_insert_with(Default::default).add(raw);
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
        buf.extend_from_slice(b",\"choices\":[{\"index\":0,\"message\":");
        let _ = serde_json::to_writer(&mut *buf, &self.message());
        buf.extend_from_slice(b",\"logprobs\":");
        let _ = serde_json::to_writer(&mut *buf, &self.logprobs());
        buf.extend_from_slice(b",\"finish_reason\":");
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

    fn delta(&mut self, buf: &mut Vec<u8>, raw: &str) {
        self.0.delta(buf, raw)
    }

    fn heartbeat(&mut self, _buf: &mut Vec<u8>, _phase: &str) {}

    fn done(&mut self, buf: &mut Vec<u8>, _id: (&str, u64), s: &Summary) {
        let f = &self.0.format;
        f.whole(buf, &self.0.message(), &self.0.logprobs(), s.finish_reason);
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
