//! The OpenAI-compatible face's requests: `POST /v1/chat/completions`
//! bodies in, a validated [`GenRequest`] out (its answers are written by
//! [`crate::encode`]), and the `/v1/models` list.
//!
//! Every OpenAI field is accepted; the ones the server does not use itself
//! are kept in [`GenRequest::extra`] and forwarded to an upstream unchanged.

use serde_json::value::RawValue;
use serde_json::Value;

use crate::api;
use crate::backend::{GenRequest, Message};

/// A validated chat completions request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub gen: GenRequest,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses a chat completions body; `Err` is a 400 message.
pub fn parse(body: &[u8], max_tokens_limit: u32) -> Result<ChatRequest, String> {
    // Fields stay the client's own bytes: only the ones sluice reads are
    // parsed into values, the rest are forwarded as they came.
    let obj: Vec<(String, Box<RawValue>)> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(_)) => raw_fields(body)?,
        Ok(_) => return Err("the body must be a JSON object".into()),
        Err(e) => return Err(format!("the body is not valid JSON: {e}")),
    };
    let mut gen = GenRequest {
        max_tokens: max_tokens_limit,
        ..GenRequest::default()
    };
    let mut stream = false;
    let mut include_usage = false;
    let mut messages = None;
    for (k, raw) in obj {
        let value = || serde_json::from_str::<Value>(raw.get()).map_err(|e| e.to_string());
        let known = matches!(
            k.as_str(),
            "messages"
                | "model"
                | "max_tokens"
                | "max_completion_tokens"
                | "temperature"
                | "stop"
                | "stream"
                | "stream_options"
                | "n"
        );
        if !known {
            gen.extra.push((k, raw));
            continue;
        }
        let v = value()?;
        match k.as_str() {
            "messages" => {
                messages = Some(parse_messages(v)?);
                gen.raw_messages = Some(raw);
            }
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
            _ => unreachable!("only known fields are parsed"),
        }
    }
    gen.messages = messages.ok_or("messages is required")?;
    Ok(ChatRequest {
        gen,
        stream,
        include_usage,
    })
}

/// The top-level fields of a JSON object, each as its raw text, in order.
fn raw_fields(body: &[u8]) -> Result<Vec<(String, Box<RawValue>)>, String> {
    struct Fields;
    impl<'de> serde::de::Visitor<'de> for Fields {
        type Value = Vec<(String, Box<RawValue>)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, Box<RawValue>)> = Vec::new();
            while let Some((k, v)) = m.next_entry::<String, Box<RawValue>>()? {
                // A repeated field: the last one counts, as in JSON parsers.
                out.retain(|(o, _)| *o != k);
                out.push((k, v));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    serde::Deserializer::deserialize_map(&mut de, Fields)
        .map_err(|e| format!("the body is not valid JSON: {e}"))
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

fn model_object(model: &str, created: u64) -> Value {
    serde_json::json!({"id": model, "object": "model", "created": created, "owned_by": "sluice"})
}

/// `GET /v1/models`.
pub fn models_body(models: &[String], created: u64) -> Vec<u8> {
    let data: Vec<Value> = models.iter().map(|m| model_object(m, created)).collect();
    serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).unwrap_or_default()
}

/// `GET /v1/models/{id}` for a served model.
pub fn model_body(model: &str, created: u64) -> Vec<u8> {
    serde_json::to_vec(&model_object(model, created)).unwrap_or_default()
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
        assert_eq!(r.gen.extra_field("top_p").map(RawValue::get), Some("0.5"));
        assert_eq!(r.gen.extra_field("seed").map(RawValue::get), Some("3"));
        assert!(r.gen.raw_messages.is_some());
        assert!(parse(br#"{"messages":[]}"#, 10).is_err());
        assert!(parse(br#"{"model":"m"}"#, 10).is_err());
        assert!(parse(
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":11}"#,
            10
        )
        .is_err());
        assert!(parse(br#"{"messages":[{"role":"user","content":"x"}],"n":2}"#, 10).is_err());
    }
}
