//! What an SSE event means, per wire format: sluice's native events
//! (`token`, `heartbeat`, `done`, `error`) or OpenAI chat/completions
//! chunks (`data: {chunk}` … `data: [DONE]`). A token is text that is not
//! empty; role-only and empty deltas are events but not tokens.

use crate::sse::Event;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// sluice's native events.
    Native,
    /// OpenAI chat.completion.chunk / text_completion chunks.
    Openai,
}

/// What one event is.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Non-empty generated text (`chars` = its length in chars).
    Token {
        chars: usize,
    },
    /// An event that carries no token (role-only delta, usage chunk, an
    /// unknown event name, a chunk with only `finish_reason`).
    Other {
        finish: bool,
    },
    Heartbeat,
    /// The successful end. `server_ttft_ms`: sluice's own `done.ttft_ms`.
    Done {
        server_ttft_ms: Option<f64>,
    },
    /// A failure reported in the stream.
    Error {
        code: String,
    },
}

pub fn classify(format: Format, ev: &Event) -> Kind {
    match format {
        Format::Native => native(ev),
        Format::Openai => openai(ev),
    }
}

fn native(ev: &Event) -> Kind {
    match ev.name.as_str() {
        "token" => {
            // `{"t": …}` into a borrowed field (no tree, no allocation
            // unless the text has escapes): the harness reads millions.
            #[derive(serde::Deserialize)]
            struct Token<'a> {
                #[serde(borrow)]
                t: Option<std::borrow::Cow<'a, str>>,
            }
            // The usual frame, `{"t":"text"}` with nothing escaped, is
            // counted without a parser.
            let plain = ev
                .data
                .strip_prefix("{\"t\":\"")
                .and_then(|d| d.strip_suffix("\"}"))
                .filter(|t| !t.contains(['"', '\\']));
            let chars = match plain {
                Some(t) => t.chars().count(),
                None => serde_json::from_str::<Token>(&ev.data)
                    .ok()
                    .and_then(|v| v.t.map(|t| t.chars().count()))
                    .unwrap_or(0),
            };
            if chars > 0 {
                Kind::Token { chars }
            } else {
                Kind::Other { finish: false }
            }
        }
        "heartbeat" => Kind::Heartbeat,
        "done" => Kind::Done {
            server_ttft_ms: serde_json::from_str::<Value>(&ev.data)
                .ok()
                .and_then(|v| v.get("ttft_ms").and_then(Value::as_f64)),
        },
        "error" => Kind::Error {
            code: serde_json::from_str::<Value>(&ev.data)
                .ok()
                .and_then(|v| v.get("code").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| "unknown".into()),
        },
        _ => Kind::Other { finish: false },
    }
}

fn openai(ev: &Event) -> Kind {
    let data = ev.data.trim();
    if data == "[DONE]" {
        return Kind::Done {
            server_ttft_ms: None,
        };
    }
    if ev.name == "error" {
        return Kind::Error {
            code: error_code(&serde_json::from_str(data).unwrap_or(Value::Null)),
        };
    }
    let v: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(_) => return Kind::Other { finish: false },
    };
    if let Some(e) = v.get("error") {
        return Kind::Error {
            code: error_code(e),
        };
    }
    let mut chars = 0;
    let mut finish = false;
    if let Some(choices) = v.get("choices").and_then(Value::as_array) {
        for c in choices {
            let text = c
                .get("delta")
                .and_then(|d| d.get("content"))
                .or_else(|| c.get("text"))
                .and_then(Value::as_str);
            chars += text.map_or(0, |t| t.chars().count());
            finish |= c.get("finish_reason").is_some_and(|f| !f.is_null());
        }
    }
    if chars > 0 {
        Kind::Token { chars }
    } else {
        Kind::Other { finish }
    }
}

fn error_code(e: &Value) -> String {
    let e = e.get("error").unwrap_or(e);
    for key in ["code", "type"] {
        match e.get(key) {
            Some(Value::String(s)) => return s.clone(),
            Some(Value::Number(n)) => return n.to_string(),
            _ => {}
        }
    }
    "unknown".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str, data: &str) -> Event {
        Event {
            name: name.into(),
            data: data.into(),
            id: None,
        }
    }

    #[test]
    fn native_events() {
        let n = Format::Native;
        assert_eq!(
            classify(n, &ev("token", r#"{"t":"Hé"}"#)),
            Kind::Token { chars: 2 }
        );
        assert_eq!(
            classify(n, &ev("token", r#"{"t":""}"#)),
            Kind::Other { finish: false }
        );
        // Escapes, other fields and other layouts go through the parser.
        for (data, chars) in [
            (r#"{"t":"a\"b"}"#, 3),
            (r#"{"t":"\u00e9"}"#, 1),
            (r#"{ "t": "ab" }"#, 2),
            (r#"{"x":1,"t":"abc"}"#, 3),
            (r#"{"t":"a","x":"b"}"#, 1),
            (r#"{"t":1}"#, 0),
            ("not json", 0),
        ] {
            let want = if chars > 0 {
                Kind::Token { chars }
            } else {
                Kind::Other { finish: false }
            };
            assert_eq!(classify(n, &ev("token", data)), want, "{data}");
        }
        assert_eq!(
            classify(n, &ev("heartbeat", r#"{"phase":"queued"}"#)),
            Kind::Heartbeat
        );
        assert_eq!(
            classify(
                n,
                &ev("done", r#"{"finish_reason":"stop","ttft_ms":0.153}"#)
            ),
            Kind::Done {
                server_ttft_ms: Some(0.153)
            }
        );
        assert_eq!(
            classify(n, &ev("error", r#"{"code":"overloaded","retryable":true}"#)),
            Kind::Error {
                code: "overloaded".into()
            }
        );
    }

    #[test]
    fn openai_chunks() {
        let o = Format::Openai;
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}"#;
        assert_eq!(classify(o, &ev("", role)), Kind::Other { finish: false });
        let tok = r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        assert_eq!(classify(o, &ev("", tok)), Kind::Token { chars: 2 });
        let empty = r#"{"choices":[{"index":0,"delta":{"content":""}}]}"#;
        assert_eq!(classify(o, &ev("", empty)), Kind::Other { finish: false });
        let fin = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        assert_eq!(classify(o, &ev("", fin)), Kind::Other { finish: true });
        let legacy = r#"{"choices":[{"text":"abc","index":0}]}"#;
        assert_eq!(classify(o, &ev("", legacy)), Kind::Token { chars: 3 });
        assert_eq!(
            classify(o, &ev("", "[DONE]")),
            Kind::Done {
                server_ttft_ms: None
            }
        );
        let err = r#"{"error":{"code":"upstream_error","message":"x"}}"#;
        assert_eq!(
            classify(o, &ev("", err)),
            Kind::Error {
                code: "upstream_error".into()
            }
        );
        let usage = r#"{"choices":[],"usage":{"completion_tokens":3}}"#;
        assert_eq!(classify(o, &ev("", usage)), Kind::Other { finish: false });
    }
}
