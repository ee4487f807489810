//! The one place that maps an error a client can see to its HTTP status,
//! its OpenAI error `type`, and the two body shapes that carry it.
//!
//! Refusals before a stream (the router's), failures of a whole-answer
//! stream (an HTTP error response) and failures mid-stream (an OpenAI
//! `data: {"error": …}` event) all take their status and type from here, so
//! an upstream 429 reads the same whether the client streamed or not.

use crate::sse::{ErrorCode, StreamError};

/// Which error body a path answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `{"error":{"code","message"}}` (the native endpoint, ops, the page).
    Native,
    /// `{"error":{"message","type","code","param"}}` (`/v1/…` but the native stream).
    OpenAi,
}

impl Shape {
    /// The shape refusals on `path` take.
    pub fn for_path(path: &str) -> Shape {
        if path.starts_with("/v1/") && path != "/v1/chat/stream" {
            Shape::OpenAi
        } else {
            Shape::Native
        }
    }

    /// The error body of this shape.
    pub fn body(self, status: u16, code: &str, message: &str) -> Vec<u8> {
        match self {
            Shape::Native => native_body(code, message),
            Shape::OpenAi => openai_body(status, code, message),
        }
    }
}

/// The HTTP status that answers a stream that failed before its answer
/// was sent (a whole-answer stream), and that an OpenAI error event names.
pub fn stream_error_status(e: &StreamError) -> u16 {
    match e.code {
        // The upstream's own client errors (a bad field, a rate limit) are
        // the client's to see; its failures are a bad gateway.
        ErrorCode::UpstreamError => e
            .upstream_status
            .filter(|s| (400..=499).contains(s))
            .unwrap_or(502),
        ErrorCode::UpstreamUnavailable => 502,
        ErrorCode::UpstreamTimeout | ErrorCode::DeadlineExceeded => 504,
        ErrorCode::Overloaded | ErrorCode::ShuttingDown => 503,
        ErrorCode::SlowConsumer | ErrorCode::Internal => 500,
        // Ends of a stream some other request decided; a whole-answer
        // client sees them as a conflict or a lost producer.
        ErrorCode::Cancelled | ErrorCode::Superseded => 409,
        ErrorCode::ProducerLost => 502,
    }
}

/// OpenAI's error `type` for a status.
pub fn openai_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 429 | 503 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    }
}

/// `{"error":{"code":…,"message":…}}`.
pub fn native_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"error": {"code": code, "message": message}}))
        .unwrap_or_default()
}

/// `{"error":{"message","type","code","param"}}`.
pub fn openai_body(status: u16, code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "error": {"message": message, "type": openai_type(status), "code": code, "param": null}
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_of_stream_errors() {
        let up = |s: Option<u16>| StreamError {
            upstream_status: s,
            ..StreamError::new(ErrorCode::UpstreamError, "x")
        };
        let cases = [
            (up(Some(429)), 429, "rate_limit_error"),
            (up(Some(400)), 400, "invalid_request_error"),
            (up(Some(500)), 502, "server_error"),
            (up(None), 502, "server_error"),
            (
                StreamError::new(ErrorCode::UpstreamUnavailable, ""),
                502,
                "server_error",
            ),
            (
                StreamError::new(ErrorCode::UpstreamTimeout, ""),
                504,
                "server_error",
            ),
            (
                StreamError::new(ErrorCode::DeadlineExceeded, ""),
                504,
                "server_error",
            ),
            (
                StreamError::new(ErrorCode::Overloaded, ""),
                503,
                "rate_limit_error",
            ),
            (
                StreamError::new(ErrorCode::ShuttingDown, ""),
                503,
                "rate_limit_error",
            ),
            (
                StreamError::new(ErrorCode::SlowConsumer, ""),
                500,
                "server_error",
            ),
            (
                StreamError::new(ErrorCode::Internal, ""),
                500,
                "server_error",
            ),
        ];
        for (e, status, kind) in cases {
            assert_eq!(stream_error_status(&e), status, "{e:?}");
            assert_eq!(openai_type(status), kind, "{e:?}");
        }
    }

    #[test]
    fn shapes_by_path() {
        assert_eq!(Shape::for_path("/v1/chat/stream"), Shape::Native);
        assert_eq!(Shape::for_path("/v1/chat/completions"), Shape::OpenAi);
        assert_eq!(Shape::for_path("/v1/models"), Shape::OpenAi);
        assert_eq!(Shape::for_path("/healthz"), Shape::Native);
        assert_eq!(
            String::from_utf8(Shape::Native.body(503, "overloaded", "busy")).unwrap(),
            "{\"error\":{\"code\":\"overloaded\",\"message\":\"busy\"}}"
        );
        let v: serde_json::Value =
            serde_json::from_slice(&Shape::OpenAi.body(401, "unauthorized", "no")).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
    }
}
