//! The native endpoint's two shapes: `token`/`heartbeat`/`done`/`error`
//! SSE events, and one JSON document (`{"text", "finish_reason", "usage"}`).

use super::{Encoder, Summary};
use crate::sse::{self, DoneInfo, StreamError};

fn done_info<'a>(s: &Summary<'a>) -> DoneInfo<'a> {
    DoneInfo {
        finish_reason: s.finish_reason,
        prompt_tokens: s.prompt_tokens,
        // The contract: `done` counts the token events sent.
        completion_tokens: s.tokens,
        ttft_ms: s.ttft_ms,
        tokens_per_s: s.tokens_per_s,
    }
}

/// `/v1/chat/stream` as Server-Sent Events.
#[derive(Debug, Default)]
pub struct NativeSse;

impl Encoder for NativeSse {
    fn streaming(&self) -> bool {
        true
    }

    fn content_type(&self) -> &'static str {
        "text/event-stream"
    }

    fn token(&mut self, buf: &mut Vec<u8>, id: Option<(&str, u64)>, text: &str) {
        if let Some((sid, seq)) = id {
            sse::id_line(buf, sid, seq);
        }
        sse::token(buf, text)
    }

    fn heartbeat(&mut self, buf: &mut Vec<u8>, phase: &str) {
        sse::heartbeat(buf, phase)
    }

    fn done(&mut self, buf: &mut Vec<u8>, (sid, seq): (&str, u64), s: &Summary) {
        sse::done(buf, sid, seq, &done_info(s))
    }

    fn error(&mut self, buf: &mut Vec<u8>, (sid, seq): (&str, u64), e: &StreamError) {
        sse::error(buf, sid, seq, e)
    }
}

/// `/v1/chat/stream` with `"stream": false`: one JSON document at the end.
#[derive(Debug, Default)]
pub struct NativeJson {
    text: String,
}

impl Encoder for NativeJson {
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
        buf.extend_from_slice(b"{\"text\":");
        let _ = serde_json::to_writer(&mut *buf, &self.text);
        buf.push(b',');
        // The rest of the `done` object, without its opening brace.
        let start = buf.len();
        sse::done_json(buf, &done_info(s));
        buf.remove(start);
    }

    fn error(&mut self, buf: &mut Vec<u8>, _id: (&str, u64), e: &StreamError) {
        buf.extend_from_slice(&crate::errors::native_body(e.code.as_str(), &e.message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::ErrorCode;

    fn summary() -> Summary<'static> {
        Summary {
            finish_reason: "stop",
            prompt_tokens: Some(2),
            tokens: 2,
            backend_completion_tokens: Some(9),
            ttft_ms: Some(1.5),
            tokens_per_s: 10.0,
        }
    }

    #[test]
    fn sse_events() {
        let mut e = NativeSse;
        let mut b = Vec::new();
        e.open(&mut b);
        e.token(&mut b, None, "a\"b");
        e.heartbeat(&mut b, "generating");
        e.done(&mut b, ("s1", 2), &summary());
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "event: token\ndata: {\"t\":\"a\\\"b\"}\n\n\
             event: heartbeat\ndata: {\"phase\":\"generating\"}\n\n\
             id: s1:2\nevent: done\ndata: {\"finish_reason\":\"stop\",\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":2},\"ttft_ms\":1.500,\"tokens_per_s\":10.0}\n\n"
        );
    }

    #[test]
    fn a_resumable_token_names_its_id() {
        let mut b = Vec::new();
        NativeSse.token(&mut b, Some(("s1", 7)), "x");
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "id: s1:7\nevent: token\ndata: {\"t\":\"x\"}\n\n"
        );
    }

    #[test]
    fn json_document_holds_the_text_until_the_end() {
        let mut e = NativeJson::default();
        let mut b = Vec::new();
        e.token(&mut b, None, "Hello ");
        e.heartbeat(&mut b, "queued");
        e.token(&mut b, None, "world");
        assert!(b.is_empty());
        e.done(&mut b, ("s1", 3), &summary());
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["text"], "Hello world");
        assert_eq!(v["usage"]["completion_tokens"], 2);
        let mut b = Vec::new();
        e.error(
            &mut b,
            ("s1", 1),
            &StreamError::new(ErrorCode::Internal, "x"),
        );
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["code"], "internal");
    }
}
