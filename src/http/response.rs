//! Response heads and whole small responses, written into a caller's buffer.

use super::Version;
use crate::wire::push_u64;

/// The reason phrase of the statuses we send.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// How the body that follows a head is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `Content-Length: n`.
    Length(usize),
    /// `Transfer-Encoding: chunked` (HTTP/1.1).
    Chunked,
    /// Ends when the connection closes (HTTP/1.0 streams).
    CloseDelimited,
    /// No body and no length (204).
    Empty,
}

/// A response head.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub status: u16,
    pub content_type: Option<&'a str>,
    pub body: Body,
    pub version: Version,
    pub keep_alive: bool,
    pub request_id: &'a str,
    pub extra: &'a [(&'a str, &'a str)],
}

/// Writes `head` ending with the blank line.
pub fn write_head(buf: &mut Vec<u8>, head: &Head) {
    buf.extend_from_slice(b"HTTP/1.1 ");
    push_u64(buf, head.status.into());
    buf.push(b' ');
    buf.extend_from_slice(reason(head.status).as_bytes());
    buf.extend_from_slice(b"\r\n");
    if let Some(ct) = head.content_type {
        header(buf, "Content-Type", ct);
    }
    match head.body {
        Body::Length(n) => {
            buf.extend_from_slice(b"Content-Length: ");
            push_u64(buf, n as u64);
            buf.extend_from_slice(b"\r\n");
        }
        Body::Chunked => buf.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Body::CloseDelimited | Body::Empty => {}
    }
    let keep_alive = head.keep_alive && head.body != Body::CloseDelimited;
    if !keep_alive {
        buf.extend_from_slice(b"Connection: close\r\n");
    } else if head.version == Version::Http10 {
        buf.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    if !head.request_id.is_empty() {
        header(buf, "X-Request-Id", head.request_id);
    }
    for (k, v) in head.extra {
        header(buf, k, v);
    }
    buf.extend_from_slice(b"\r\n");
}

/// `name: value` and its CRLF (out of line: one copy for every header of
/// a head).
#[inline(never)]
fn header(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.reserve(name.len() + value.len() + 4);
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value.as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// The head of an SSE stream.
pub fn write_sse_head(
    buf: &mut Vec<u8>,
    version: Version,
    keep_alive: bool,
    request_id: &str,
    extra: &[(&str, &str)],
) {
    let body = match version {
        Version::Http11 => Body::Chunked,
        Version::Http10 => Body::CloseDelimited,
    };
    write_head(
        buf,
        &Head {
            status: 200,
            content_type: Some("text/event-stream"),
            body,
            version,
            keep_alive,
            request_id,
            extra: &[("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")],
        },
    );
    if !extra.is_empty() {
        // Insert before the blank line that ends the head.
        buf.truncate(buf.len() - 2);
        for (k, v) in extra {
            header(buf, k, v);
        }
        buf.extend_from_slice(b"\r\n");
    }
}

/// A whole response with a body of known length.
pub fn write_full(buf: &mut Vec<u8>, head: Head, body: &[u8]) {
    write_head(
        buf,
        &Head {
            body: Body::Length(body.len()),
            ..head
        },
    );
    buf.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_heads() {
        let mut b = Vec::new();
        write_sse_head(&mut b, Version::Http11, true, "abc", &[]);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nX-Request-Id: abc\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n\r\n"
        );
        let mut b = Vec::new();
        write_sse_head(&mut b, Version::Http10, false, "abc", &[]);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\nX-Request-Id: abc\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n\r\n"
        );
    }

    #[test]
    fn full_response() {
        let mut b = Vec::new();
        let head = Head {
            status: 503,
            content_type: Some("application/json"),
            body: Body::Length(0),
            version: Version::Http10,
            keep_alive: true,
            request_id: "r1",
            extra: &[("Retry-After", "1")],
        };
        write_full(
            &mut b,
            head,
            &crate::errors::native_body("overloaded", "busy"),
        );
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 48\r\nConnection: keep-alive\r\nX-Request-Id: r1\r\nRetry-After: 1\r\n\r\n{\"error\":{\"code\":\"overloaded\",\"message\":\"busy\"}}"
        );
    }
}
