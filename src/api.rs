//! The native endpoint's request: JSON body or query string in, a validated
//! [`GenRequest`] out, or a 400 message a user can act on.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::backend::{GenRequest, Message};
use crate::http::parse_query;

/// A validated native request.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeRequest {
    pub gen: GenRequest,
    /// `"stream": false` asks for one JSON answer.
    pub stream: bool,
}

const FIELDS: &str = "messages, prompt, max_tokens, temperature, stop, model, stream";

/// Parses a `POST` body. Bodies are JSON whatever their `Content-Type`.
pub fn parse_body(body: &[u8], max_tokens_limit: u32) -> Result<NativeRequest, String> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(
            "the request body is empty: send a JSON object such as {\"prompt\":\"hi\"}".into(),
        );
    }
    // The object's fields as they come, keys borrowed from the body (no
    // map, no key allocations); checked once the whole body parsed.
    let mut de = serde_json::Deserializer::from_slice(body);
    match Fields::deserialize(&mut de).and_then(|f| de.end().map(|()| f)) {
        Ok(Fields(mut fields)) => {
            // As a JSON map has them: by name, the last of a repeated name.
            fields.sort_by(|a, b| a.0 .0.cmp(&b.0 .0));
            fields.reverse();
            fields.dedup_by(|a, b| a.0 .0 == b.0 .0);
            fields.reverse();
            from_object(fields, max_tokens_limit)
        }
        // Not an object: valid JSON of another kind, or not JSON at all.
        Err(e) if e.is_data() => match serde_json::from_slice::<Value>(body) {
            Ok(_) => Err("the body must be a JSON object".into()),
            Err(e) => Err(format!("the body is not valid JSON: {e}")),
        },
        Err(e) => Err(format!("the body is not valid JSON: {e}")),
    }
}

/// A JSON object's fields in order, each key borrowed when it has no escape.
struct Fields<'a>(Vec<(Key<'a>, Value)>);

struct Key<'a>(Cow<'a, str>);

impl AsRef<str> for Key<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(4);
                while let Some(k) = m.next_key::<Key<'de>>()? {
                    fields.push((k, m.next_value::<Value>()?));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses a `GET` query string (`prompt`, `max_tokens`, `temperature`, `model`, `stop`, `stream`).
pub fn parse_query_request(
    query: Option<&str>,
    max_tokens_limit: u32,
) -> Result<NativeRequest, String> {
    let mut obj = Map::new();
    for (k, v) in parse_query(query.unwrap_or("")) {
        if k == "access_token" {
            // A credential (see `auth`), not a field of the request.
            continue;
        }
        let value = match k.as_str() {
            "max_tokens" => match v.parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => return Err(format!("max_tokens must be a whole number, not {v:?}")),
            },
            "temperature" => match v.parse::<f64>() {
                Ok(n) if n.is_finite() => Value::from(n),
                _ => return Err(format!("temperature must be a number, not {v:?}")),
            },
            "stream" => match v.as_str() {
                "true" | "1" => Value::Bool(true),
                "false" | "0" => Value::Bool(false),
                _ => return Err(format!("stream must be true or false, not {v:?}")),
            },
            _ => Value::String(v),
        };
        if obj.insert(k.clone(), value).is_some() {
            return Err(format!("query parameter {k:?} is given twice"));
        }
    }
    from_object(obj, max_tokens_limit)
}

/// The request from an object's fields. A field given twice counts once,
/// its last value.
fn from_object<K: AsRef<str>>(
    obj: impl IntoIterator<Item = (K, Value)>,
    max_tokens_limit: u32,
) -> Result<NativeRequest, String> {
    let mut gen = GenRequest {
        max_tokens: max_tokens_limit,
        ..GenRequest::default()
    };
    let mut stream = true;
    let mut prompt = None;
    let mut messages = None;
    for (k, v) in obj {
        let k = k.as_ref();
        match k {
            "messages" => messages = Some(parse_messages(v)?),
            "prompt" => match v {
                Value::String(s) => prompt = Some(s),
                _ => return Err("prompt must be a string".into()),
            },
            "max_tokens" => {
                gen.max_tokens = max_tokens(k, &v, max_tokens_limit)?;
                gen.max_tokens_field = Some("max_tokens");
            }
            "temperature" => gen.temperature = Some(temperature(&v)?),
            "stop" => gen.stop = stop(v)?,
            "model" => match v {
                Value::String(s) => gen.model = Some(s),
                _ => return Err("model must be a string".into()),
            },
            "stream" => match v {
                Value::Bool(b) => stream = b,
                _ => return Err("stream must be true or false".into()),
            },
            other => return Err(format!("unknown field {other:?}; the fields are: {FIELDS}")),
        }
    }
    gen.messages = match (messages, prompt) {
        (Some(_), Some(_)) => return Err("give either messages or prompt, not both".into()),
        (Some(m), None) => m,
        (None, Some(p)) => vec![Message {
            role: "user".into(),
            content: p,
        }],
        (None, None) => return Err("the request needs messages or a prompt".into()),
    };
    Ok(NativeRequest { gen, stream })
}

/// `max_tokens` (or OpenAI's `max_completion_tokens`): 1 ..= the limit.
pub(crate) fn max_tokens(name: &str, v: &Value, limit: u32) -> Result<u32, String> {
    v.as_i64()
        .filter(|n| *n >= 1 && *n <= i64::from(limit))
        .map(|n| n as u32)
        .ok_or_else(|| format!("{name} must be a whole number from 1 to {limit}, not {v}"))
}

/// `temperature`: 0 ..= 2.
pub(crate) fn temperature(v: &Value) -> Result<f64, String> {
    match v.as_f64() {
        Some(t) if (0.0..=2.0).contains(&t) => Ok(t),
        _ => Err(format!("temperature must be a number from 0 to 2, not {v}")),
    }
}

/// `stop`: a string or up to 4 strings; null is none.
pub(crate) fn stop(v: Value) -> Result<Vec<String>, String> {
    const MSG: &str = "stop must be a string or a list of up to 4 strings";
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s]),
        Value::Array(a) if a.len() <= 4 => a
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                _ => Err(MSG.to_string()),
            })
            .collect(),
        _ => Err(MSG.into()),
    }
}

fn parse_messages(v: Value) -> Result<Vec<Message>, String> {
    let Value::Array(items) = v else {
        return Err("messages must be a list of {\"role\", \"content\"} objects".into());
    };
    if items.is_empty() {
        return Err("messages must not be empty".into());
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(mut m) = m else {
                return Err(format!(
                    "messages[{i}] must be an object with role and content"
                ));
            };
            let role = match m.remove("role") {
                Some(Value::String(r)) if !r.is_empty() => r,
                _ => return Err(format!("messages[{i}].role must be a non-empty string")),
            };
            let content = match m.remove("content") {
                Some(Value::String(c)) => c,
                _ => return Err(format!("messages[{i}].content must be a string")),
            };
            if let Some(k) = m.keys().next() {
                return Err(format!("messages[{i}] has an unknown field {k:?}"));
            }
            Ok(Message { role, content })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_prompt_and_messages() {
        let r = parse_body(br#"{"prompt":"hi","max_tokens":5,"temperature":0.5,"stop":"x","model":"m","stream":false}"#, 4096).unwrap();
        assert_eq!(
            r.gen.messages,
            vec![Message {
                role: "user".into(),
                content: "hi".into()
            }]
        );
        assert_eq!(r.gen.max_tokens, 5);
        assert_eq!(r.gen.temperature, Some(0.5));
        assert_eq!(r.gen.stop, vec!["x".to_string()]);
        assert_eq!(r.gen.model.as_deref(), Some("m"));
        assert!(!r.stream);
        let r = parse_body(br#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#, 100).unwrap();
        assert_eq!(r.gen.messages.len(), 2);
        assert_eq!(r.gen.max_tokens, 100);
        assert!(r.stream);
    }

    #[test]
    fn a_repeated_field_counts_once_with_its_last_value() {
        let r = parse_body(
            br#"{"prompt":1,"max_tokens":3,"prompt":"b","max_tokens":2}"#,
            10,
        )
        .unwrap();
        assert_eq!(r.gen.messages[0].content, "b");
        assert_eq!(r.gen.max_tokens, 2);
        let e = parse_body(br#"{"prompt":"a","prompt":1}"#, 10).unwrap_err();
        assert!(e.contains("prompt must be a string"), "{e}");
        // Escaped names are names all the same.
        let r = parse_body(br#"{"pr\u006fmpt":"c"}"#, 10).unwrap();
        assert_eq!(r.gen.messages[0].content, "c");
        // Which error is reported when several fields are bad: the first by name.
        let e = parse_body(br#"{"zzz":1,"prompt":2}"#, 10).unwrap_err();
        assert!(e.contains("prompt must be a string"), "{e}");
        for (body, want) in [
            (&b"[1]"[..], "must be a JSON object"),
            (b"[1", "not valid JSON"),
            (b"\"x\"", "must be a JSON object"),
            (b"{\"prompt\":\"a\"} x", "not valid JSON"),
            (b"{\"prompt\":\"a\",}", "not valid JSON"),
        ] {
            let e = parse_body(body, 10).unwrap_err();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn rejects_bad_bodies_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"{", "not valid JSON"),
            (b"[1]", "JSON object"),
            (br#"{"prompt":"a","foo":1}"#, "unknown field \"foo\""),
            (br#"{"prompt":"a","max_tokens":0}"#, "max_tokens"),
            (br#"{"prompt":"a","max_tokens":4097}"#, "max_tokens"),
            (br#"{"prompt":"a","max_tokens":1.5}"#, "max_tokens"),
            (br#"{"prompt":"a","temperature":3}"#, "temperature"),
            (br#"{"prompt":1}"#, "prompt must be a string"),
            (br#"{}"#, "needs messages or a prompt"),
            (
                br#"{"prompt":"a","messages":[{"role":"user","content":"b"}]}"#,
                "either",
            ),
            (br#"{"messages":[]}"#, "must not be empty"),
            (br#"{"messages":[{"role":"user"}]}"#, "content"),
            (
                br#"{"messages":[{"role":"user","content":"x","name":"y"}]}"#,
                "unknown field",
            ),
            (br#"{"prompt":"a","stream":"yes"}"#, "stream"),
            (br#"{"prompt":"a","stop":[1]}"#, "stop"),
        ];
        for (body, want) in cases {
            let e = parse_body(body, 4096).unwrap_err();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn query_strings() {
        let r = parse_query_request(Some("prompt=hello+world&max_tokens=3"), 4096).unwrap();
        assert_eq!(r.gen.messages[0].content, "hello world");
        assert_eq!(r.gen.max_tokens, 3);
        assert!(parse_query_request(Some("prompt=a&max_tokens=x"), 4096).is_err());
        assert!(parse_query_request(Some("prompt=a&bogus=1"), 4096).is_err());
        assert!(parse_query_request(None, 4096).is_err());
    }
}
