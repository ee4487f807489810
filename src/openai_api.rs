//! The OpenAI-compatible face: `POST /v1/chat/completions` requests in,
//! `chat.completion.chunk` events, `chat.completion` objects and OpenAI-shaped
//! errors out, so existing SDKs and tools work unchanged.
//!
//! Every OpenAI field is accepted; the ones the server does not use itself
//! are kept in [`GenRequest::extra`] and forwarded to an upstream unchanged.

use std::io::Write;

use serde_json::Value;

use crate::api;
use crate::backend::{GenRequest, Message};
use crate::sse::{ErrorCode, StreamError};

/// A validated chat completions request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub gen: GenRequest,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses a chat completions body; `Err` is a 400 message.
pub fn parse(body: &[u8], max_tokens_limit: u32) -> Result<ChatRequest, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    let Value::Object(obj) = v else {
        return Err("the body must be a JSON object".into());
    };
    let mut gen = GenRequest {
        max_tokens: max_tokens_limit,
        ..GenRequest::default()
    };
    let mut stream = false;
    let mut include_usage = false;
    let mut messages = None;
    for (k, v) in obj {
        match k.as_str() {
            "messages" => messages = Some(parse_messages(v)?),
            "model" => match v {
                Value::String(s) => gen.model = Some(s),
                _ => return Err("model must be a string".into()),
            },
            "max_tokens" | "max_completion_tokens" if !v.is_null() => {
                gen.max_tokens = api::max_tokens(&k, &v, max_tokens_limit)?;
                gen.max_tokens_field = Some(if k == "max_tokens" {
                    "max_tokens"
                } else {
                    "max_completion_tokens"
                });
            }
            "temperature" if !v.is_null() => gen.temperature = Some(api::temperature(&v)?),
            "stop" => gen.stop = api::stop(v)?,
            "max_tokens" | "max_completion_tokens" | "temperature" => {}
            "stream" => match v {
                Value::Bool(b) => stream = b,
                Value::Null => {}
                _ => return Err("stream must be true or false".into()),
            },
            "stream_options" => match &v {
                Value::Null => {}
                Value::Object(o) => {
                    include_usage = o
                        .get("include_usage")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                }
                _ => return Err("stream_options must be an object".into()),
            },
            "n" => {
                if !(v.is_null() || v.as_u64() == Some(1)) {
                    return Err("only n = 1 is supported".into());
                }
            }
            _ => {
                gen.extra.insert(k, v);
            }
        }
    }
    gen.messages = messages.ok_or("messages is required")?;
    Ok(ChatRequest {
        gen,
        stream,
        include_usage,
    })
}

fn parse_messages(v: Value) -> Result<Vec<Message>, String> {
    let Value::Array(items) = v else {
        return Err("messages must be a list".into());
    };
    if items.is_empty() {
        return Err("messages must not be empty".into());
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(format!("messages[{i}] must be an object"));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) if !r.is_empty() => r.clone(),
                _ => return Err(format!("messages[{i}].role must be a non-empty string")),
            };
            // Content is a string, a list of parts (text parts are kept), or
            // null (an assistant message with tool calls).
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(""),
                Some(_) => {
                    return Err(format!(
                        "messages[{i}].content must be a string or a list of parts"
                    ))
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// `{"error":{"message","type","code"}}`.
pub fn error_body(status: u16, code: &str, message: &str) -> Vec<u8> {
    let kind = match status {
        401 => "authentication_error",
        404 => "not_found_error",
        408 | 429 | 503 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    serde_json::to_vec(&serde_json::json!({
        "error": {"message": message, "type": kind, "code": code, "param": null}
    }))
    .unwrap_or_default()
}

/// Per-stream constants of the chunk events.
#[derive(Debug, Clone)]
pub struct ChunkFormat {
    /// `{"id":…,"object":"chat.completion.chunk","created":…,"model":…,"choices":`
    prefix: String,
    pub include_usage: bool,
    pub model: String,
    pub id: String,
    pub created: u64,
}

impl ChunkFormat {
    pub fn new(stream_id: u64, model: &str, created: u64, include_usage: bool) -> ChunkFormat {
        let id = format!("chatcmpl-{stream_id:x}");
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

    /// The first chunk: the assistant's role.
    pub fn role(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(
            b"[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        );
    }

    /// A content delta.
    pub fn content(&self, buf: &mut Vec<u8>, text: &str) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(b"[{\"index\":0,\"delta\":{\"content\":");
        let _ = serde_json::to_writer(&mut *buf, text);
        buf.extend_from_slice(b"},\"finish_reason\":null}]}\n\n");
    }

    /// The whole answer in one chunk (`--no-streaming` with `stream: true`).
    pub fn whole(&self, buf: &mut Vec<u8>, text: &str, finish_reason: &str) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(b"[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":");
        let _ = serde_json::to_writer(&mut *buf, text);
        buf.extend_from_slice(b"},\"finish_reason\":");
        let _ = serde_json::to_writer(&mut *buf, finish_reason);
        buf.extend_from_slice(b"}]}\n\n");
    }

    /// The chunk with `finish_reason`, the usage chunk when asked for, and `[DONE]`.
    pub fn finish(
        &self,
        buf: &mut Vec<u8>,
        finish_reason: &str,
        prompt: Option<u32>,
        completion: u32,
    ) {
        buf.extend_from_slice(b"data: ");
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(b"[{\"index\":0,\"delta\":{},\"finish_reason\":");
        let _ = serde_json::to_writer(&mut *buf, finish_reason);
        buf.extend_from_slice(b"}]}\n\n");
        self.usage_and_done(buf, prompt, completion);
    }

    /// The usage chunk when asked for, then `[DONE]`.
    pub fn usage_and_done(&self, buf: &mut Vec<u8>, prompt: Option<u32>, completion: u32) {
        if self.include_usage {
            buf.extend_from_slice(b"data: ");
            buf.extend_from_slice(self.prefix.as_bytes());
            buf.extend_from_slice(b"[],\"usage\":");
            usage(buf, prompt, completion);
            buf.extend_from_slice(b"}\n\n");
        }
        buf.extend_from_slice(b"data: [DONE]\n\n");
    }

    /// A failure mid-stream: a final data event with an `error` object, no `[DONE]`.
    pub fn error(&self, buf: &mut Vec<u8>, err: &StreamError) {
        buf.extend_from_slice(b"data: ");
        let status = match err.code {
            ErrorCode::Overloaded | ErrorCode::ShuttingDown => 503,
            ErrorCode::UpstreamError => err.upstream_status.unwrap_or(502),
            _ => 500,
        };
        buf.extend_from_slice(&error_body(status, err.code.as_str(), &err.message));
        buf.extend_from_slice(b"\n\n");
    }

    /// A whole `chat.completion` object.
    pub fn completion(
        &self,
        buf: &mut Vec<u8>,
        text: &str,
        finish_reason: &str,
        prompt: Option<u32>,
        completion: u32,
    ) {
        let _ = write!(
            buf,
            "{{\"id\":\"{}\",\"object\":\"chat.completion\",\"created\":{},\"model\":",
            self.id, self.created
        );
        let _ = serde_json::to_writer(&mut *buf, &self.model);
        buf.extend_from_slice(
            b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":",
        );
        let _ = serde_json::to_writer(&mut *buf, text);
        buf.extend_from_slice(b"},\"finish_reason\":");
        let _ = serde_json::to_writer(&mut *buf, finish_reason);
        buf.extend_from_slice(b"}],\"usage\":");
        usage(buf, prompt, completion);
        buf.push(b'}');
    }
}

fn usage(buf: &mut Vec<u8>, prompt: Option<u32>, completion: u32) {
    let p = prompt.unwrap_or(0);
    let _ = write!(
        buf,
        "{{\"prompt_tokens\":{p},\"completion_tokens\":{completion},\"total_tokens\":{}}}",
        p + completion
    );
}

/// `GET /v1/models`.
pub fn models_body(model: &str, created: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "sluice"}]
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_keeps_unknown_fields() {
        let r = parse(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":7,"top_p":0.5,"seed":3}"#,
            4096,
        )
        .unwrap();
        assert!(r.stream && r.include_usage);
        assert_eq!(r.gen.max_tokens, 7);
        assert_eq!(r.gen.messages[0].content, "hi");
        assert_eq!(r.gen.extra.get("top_p"), Some(&serde_json::json!(0.5)));
        assert_eq!(r.gen.extra.get("seed"), Some(&serde_json::json!(3)));
        assert!(parse(br#"{"messages":[]}"#, 10).is_err());
        assert!(parse(br#"{"model":"m"}"#, 10).is_err());
        assert!(parse(
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":11}"#,
            10
        )
        .is_err());
        assert!(parse(br#"{"messages":[{"role":"user","content":"x"}],"n":2}"#, 10).is_err());
    }

    #[test]
    fn chunks_are_valid_json() {
        let f = ChunkFormat::new(0xabc, "sim", 1700000000, true);
        let mut b = Vec::new();
        f.role(&mut b);
        f.content(&mut b, "he said \"hi\"\n");
        f.finish(&mut b, "stop", Some(3), 1);
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
        let f = ChunkFormat::new(1, "sim", 5, false);
        let mut b = Vec::new();
        f.completion(&mut b, "hello", "length", None, 1);
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "hello");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 1);
    }
}
