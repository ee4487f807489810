//! Server-Sent Events framing: the four events of the contract, written
//! straight into a caller's buffer.
//!
//! Nothing here allocates: token text is escaped and numbers are written
//! straight into the output buffer ([`crate::wire`]). Every event ends
//! with a blank line, and JSON never contains a raw newline, so no token can
//! break a frame.

use crate::wire::{escape_slow, is_json_plain, push3, push_fixed, push_json_str, push_u64};

/// Why a stream failed; the `code` of an `error` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    UpstreamUnavailable,
    UpstreamError,
    UpstreamTimeout,
    Overloaded,
    DeadlineExceeded,
    SlowConsumer,
    ShuttingDown,
    Internal,
    /// Stopped by id (`POST /v1/chat/stream/<id>/cancel`).
    Cancelled,
    /// Another client resumed this stream.
    Superseded,
    /// A resumed stream's producing instance died.
    ProducerLost,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::UpstreamUnavailable,
        ErrorCode::UpstreamError,
        ErrorCode::UpstreamTimeout,
        ErrorCode::Overloaded,
        ErrorCode::DeadlineExceeded,
        ErrorCode::SlowConsumer,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::Cancelled,
        ErrorCode::Superseded,
        ErrorCode::ProducerLost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UpstreamUnavailable => "upstream_unavailable",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Superseded => "superseded",
            ErrorCode::ProducerLost => "producer_lost",
        }
    }

    /// The contract's default for `retryable` (an upstream 4xx overrides it).
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            ErrorCode::DeadlineExceeded
                | ErrorCode::SlowConsumer
                | ErrorCode::Internal
                | ErrorCode::Cancelled
                | ErrorCode::Superseded
        )
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A failed stream's final word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
    pub upstream_status: Option<u16>,
}

impl StreamError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> StreamError {
        StreamError {
            code,
            message: message.into(),
            retryable: code.retryable(),
            upstream_status: None,
        }
    }
}

/// What a `done` event reports.
#[derive(Debug, Clone, PartialEq)]
pub struct DoneInfo<'a> {
    pub finish_reason: &'a str,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: u32,
    pub ttft_ms: Option<f64>,
    pub tokens_per_s: f64,
}

/// `event: token` with `{"t": text}`.
pub fn token(buf: &mut Vec<u8>, text: &str) {
    const HEAD: &[u8] = b"event: token\ndata: {\"t\":\"";
    const TAIL: &[u8] = b"\"}\n\n";
    let bytes = text.as_bytes();
    if is_json_plain(bytes) {
        // The usual token: nothing to escape, one copy.
        return push3(buf, HEAD, bytes, TAIL);
    }
    buf.reserve(text.len() + 48);
    buf.extend_from_slice(HEAD);
    escape_slow(buf, bytes);
    buf.extend_from_slice(TAIL);
}

/// `event: heartbeat` with `{"phase": phase}`.
pub fn heartbeat(buf: &mut Vec<u8>, phase: &str) {
    buf.extend_from_slice(b"event: heartbeat\ndata: {\"phase\":\"");
    buf.extend_from_slice(phase.as_bytes());
    buf.extend_from_slice(b"\"}\n\n");
}

/// `id: <stream-id>:<seq>`, the line a resumable event starts with.
pub fn id_line(buf: &mut Vec<u8>, stream_id: &str, seq: u64) {
    buf.extend_from_slice(b"id: ");
    buf.extend_from_slice(stream_id.as_bytes());
    buf.push(b':');
    push_u64(buf, seq);
    buf.push(b'\n');
}

/// The terminal `done` event, with its `id:` line.
pub fn done(buf: &mut Vec<u8>, stream_id: &str, seq: u64, info: &DoneInfo) {
    id_line(buf, stream_id, seq);
    buf.extend_from_slice(b"event: done\ndata: ");
    done_json(buf, info);
    buf.extend_from_slice(b"\n\n");
}

/// The JSON object of a `done` event (also used by the non-streaming answer).
pub fn done_json(buf: &mut Vec<u8>, info: &DoneInfo) {
    buf.extend_from_slice(b"{\"finish_reason\":");
    push_json_str(buf, info.finish_reason);
    buf.extend_from_slice(b",\"usage\":{");
    if let Some(p) = info.prompt_tokens {
        buf.extend_from_slice(b"\"prompt_tokens\":");
        push_u64(buf, p.into());
        buf.push(b',');
    }
    buf.extend_from_slice(b"\"completion_tokens\":");
    push_u64(buf, info.completion_tokens.into());
    buf.push(b'}');
    if let Some(t) = info.ttft_ms {
        buf.extend_from_slice(b",\"ttft_ms\":");
        push_fixed(buf, t, 3);
    }
    buf.extend_from_slice(b",\"tokens_per_s\":");
    push_fixed(buf, info.tokens_per_s, 1);
    buf.push(b'}');
}

/// The terminal `error` event, with its `id:` line.
pub fn error(buf: &mut Vec<u8>, stream_id: &str, seq: u64, err: &StreamError) {
    id_line(buf, stream_id, seq);
    buf.extend_from_slice(b"event: error\ndata: ");
    error_json(buf, err);
    buf.extend_from_slice(b"\n\n");
}

/// `{"code":…,"message":…,"retryable":…[,"upstream_status":…]}`.
pub fn error_json(buf: &mut Vec<u8>, err: &StreamError) {
    buf.extend_from_slice(b"{\"code\":\"");
    buf.extend_from_slice(err.code.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"message\":");
    push_json_str(buf, &err.message);
    buf.extend_from_slice(if err.retryable {
        b",\"retryable\":true"
    } else {
        b",\"retryable\":false"
    });
    if let Some(s) = err.upstream_status {
        buf.extend_from_slice(b",\"upstream_status\":");
        push_u64(buf, s.into());
    }
    buf.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut b = Vec::new();
        f(&mut b);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn token_frames() {
        let cases = [
            ("Hello", "event: token\ndata: {\"t\":\"Hello\"}\n\n"),
            (" a\nb", "event: token\ndata: {\"t\":\" a\\nb\"}\n\n"),
            (
                "\r\n\r\n",
                "event: token\ndata: {\"t\":\"\\r\\n\\r\\n\"}\n\n",
            ),
            (
                "say \"hi\"",
                "event: token\ndata: {\"t\":\"say \\\"hi\\\"\"}\n\n",
            ),
            (
                "héllo ✓ 🎉",
                "event: token\ndata: {\"t\":\"héllo ✓ 🎉\"}\n\n",
            ),
            (
                "\u{0}\u{1f}",
                "event: token\ndata: {\"t\":\"\\u0000\\u001f\"}\n\n",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(s(|b| token(b, text)), want, "text {text:?}");
        }
    }

    #[test]
    fn every_frame_is_one_event_whatever_the_text() {
        for text in ["a\n\nb", "\n", "\r", "data: x\n\nevent: done"] {
            let f = s(|b| token(b, text));
            assert_eq!(f.matches("\n\n").count(), 1, "{f:?}");
            assert!(f.ends_with("\n\n"));
            let data = f.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["t"], text);
        }
    }

    #[test]
    fn heartbeat_frame() {
        assert_eq!(
            s(|b| heartbeat(b, "queued")),
            "event: heartbeat\ndata: {\"phase\":\"queued\"}\n\n"
        );
    }

    #[test]
    fn done_frame() {
        let info = DoneInfo {
            finish_reason: "stop",
            prompt_tokens: Some(4),
            completion_tokens: 64,
            ttft_ms: Some(0.1534),
            tokens_per_s: 49.83,
        };
        assert_eq!(
            s(|b| done(b, "7f3a9c", 65, &info)),
            "id: 7f3a9c:65\nevent: done\ndata: {\"finish_reason\":\"stop\",\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":64},\"ttft_ms\":0.153,\"tokens_per_s\":49.8}\n\n"
        );
        let info = DoneInfo {
            prompt_tokens: None,
            ttft_ms: None,
            ..info
        };
        assert_eq!(
            s(|b| done_json(b, &info)),
            "{\"finish_reason\":\"stop\",\"usage\":{\"completion_tokens\":64},\"tokens_per_s\":49.8}"
        );
    }

    #[test]
    fn error_frame() {
        let mut e = StreamError::new(ErrorCode::UpstreamUnavailable, "connection refused");
        assert_eq!(
            s(|b| error(b, "7f3a9c", 12, &e)),
            "id: 7f3a9c:12\nevent: error\ndata: {\"code\":\"upstream_unavailable\",\"message\":\"connection refused\",\"retryable\":true}\n\n"
        );
        e.code = ErrorCode::UpstreamError;
        e.retryable = false;
        e.upstream_status = Some(400);
        e.message = "bad \"model\"".into();
        assert_eq!(
            s(|b| error_json(b, &e)),
            "{\"code\":\"upstream_error\",\"message\":\"bad \\\"model\\\"\",\"retryable\":false,\"upstream_status\":400}"
        );
    }

    #[test]
    fn retryable_defaults() {
        let want = [
            true, true, true, true, false, false, true, false, false, false, true,
        ];
        for (c, w) in ErrorCode::ALL.iter().zip(want) {
            assert_eq!(c.retryable(), w, "{c:?}");
        }
    }
}
