//! A response head, parsed with `httparse`, and the framing decisions taken
//! from it (RFC 9112 §6.3), as strict as the server's own request reader:
//! header values are parsed, never searched for substrings.
//!
//! - `Transfer-Encoding` is a comma list of codings over all its fields; the
//!   only one accepted is a single, final `chunked` (there is no decoder for
//!   any other), never on HTTP/1.0, never with `Content-Length`.
//! - `Content-Length` is digits only; repeated fields must agree.
//! - `Connection` is a comma list of tokens (`close`, `keep-alive`).
//! - 1xx (but 101), 204 and 304 have no body whatever the fields say; a
//!   response with neither field is delimited by the close.
//!
//! Pure functions of the bytes: table-tested below without sockets.

/// Header fields `httparse` is given room for; one more is refused.
const MAX_HEADERS: usize = 64;

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    Chunked,
    /// Everything until the upstream closes the connection.
    Close,
}

/// The parts of a final response head the client needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

/// What the first bytes of the buffer hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// An interim (1xx) response of this many bytes: skip it.
    Interim(usize),
    /// The final head, and its length in bytes.
    Final(Head, usize),
}

/// Why a response head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// `httparse` refused the bytes; the reason is its.
    Malformed(&'static str),
    TooManyFields,
    BadContentLength,
    ConflictingContentLength,
    LengthAndTransferEncoding,
    /// A coding other than one final `chunked` (gzip, `chunked, chunked`, …).
    UnsupportedTransferCoding,
    TransferEncodingOnHttp10,
    /// 101: we never ask to switch protocols.
    SwitchingProtocols,
}

impl HeadError {
    pub fn reason(self) -> &'static str {
        match self {
            HeadError::Malformed(reason) => reason,
            HeadError::TooManyFields => "more than 64 header fields",
            HeadError::BadContentLength => "Content-Length is not a decimal number",
            HeadError::ConflictingContentLength => "conflicting Content-Length values",
            HeadError::LengthAndTransferEncoding => {
                "both Content-Length and Transfer-Encoding are present"
            }
            HeadError::UnsupportedTransferCoding => {
                "a Transfer-Encoding other than one final chunked"
            }
            HeadError::TransferEncodingOnHttp10 => "Transfer-Encoding on an HTTP/1.0 response",
            HeadError::SwitchingProtocols => "an unasked-for 101 Switching Protocols",
        }
    }
}

/// Parses the head at the start of `buf`; `Ok(None)` while incomplete (the
/// caller bounds how long it may grow).
pub fn parse(buf: &[u8]) -> Result<Option<Parsed>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyFields),
        Err(e) => return Err(HeadError::Malformed(parse_error(e))),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(HeadError::Malformed("malformed status line"));
    };
    let http10 = version == 0;
    match status {
        101 => return Err(HeadError::SwitchingProtocols),
        100..=199 => return Ok(Some(Parsed::Interim(len))),
        _ => {}
    }

    let mut content_length: Option<u64> = None;
    let mut codings = 0usize;
    let mut chunked_last = false;
    let mut close = false;
    let mut keep_alive_token = false;
    for field in resp.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            let len = parse_content_length(field.value)?;
            if content_length.is_some_and(|prev| prev != len) {
                return Err(HeadError::ConflictingContentLength);
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Several fields make one list; empty elements do not count.
            let before = codings;
            for coding in list(field.value) {
                codings += 1;
                chunked_last = coding.eq_ignore_ascii_case(b"chunked");
            }
            if codings == before {
                return Err(HeadError::UnsupportedTransferCoding);
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in list(field.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }

    let framing = if codings > 0 {
        if http10 {
            return Err(HeadError::TransferEncodingOnHttp10);
        }
        if content_length.is_some() {
            return Err(HeadError::LengthAndTransferEncoding);
        }
        if codings > 1 || !chunked_last {
            return Err(HeadError::UnsupportedTransferCoding);
        }
        Framing::Chunked
    } else if let Some(len) = content_length {
        Framing::Length(len)
    } else {
        Framing::Close
    };
    // These never have a body, whatever their fields say.
    let framing = if matches!(status, 204 | 304) {
        Framing::Length(0)
    } else {
        framing
    };
    let keep_alive = framing != Framing::Close && !close && (!http10 || keep_alive_token);
    Ok(Some(Parsed::Final(
        Head {
            status,
            framing,
            keep_alive,
        },
        len,
    )))
}

/// The non-empty elements of a comma list, without optional whitespace.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty())
}

fn parse_content_length(value: &[u8]) -> Result<u64, HeadError> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::BadContentLength);
    }
    // Digits only: the one possible failure is overflow.
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or(HeadError::BadContentLength)
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "malformed status line",
        httparse::Error::Token => "invalid token",
        httparse::Error::Version => "not HTTP/1.0 or HTTP/1.1",
        httparse::Error::TooManyHeaders => "more than 64 header fields",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, framing: Framing, keep_alive: bool) -> Result<Head, HeadError> {
        Ok(Head {
            status,
            framing,
            keep_alive,
        })
    }

    fn final_head(text: &str) -> Result<Head, HeadError> {
        match parse(text.as_bytes())? {
            Some(Parsed::Final(h, len)) => {
                assert_eq!(len, text.len(), "{text:?}");
                Ok(h)
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn framing_decisions() {
        use Framing::*;
        use HeadError::*;
        let cases: &[(&str, Result<Head, HeadError>)] = &[
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", head(200, Chunked, true)),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked \r\n\r\n", head(200, Chunked, true)),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: ,chunked,\r\n\r\n", head(200, Chunked, true)),
            ("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", head(200, Length(12), true)),
            ("HTTP/1.1 200 OK\r\nContent-Length: 007\r\n\r\n", head(200, Length(7), true)),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
                head(200, Length(5), true),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", head(200, Close, false)),
            ("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n", head(200, Close, false)),
            (
                "HTTP/1.1 200 OK\r\nConnection: Upgrade, CLOSE\r\nContent-Length: 1\r\n\r\n",
                head(200, Length(1), false),
            ),
            (
                // A token that merely contains "close" is not `close`.
                "HTTP/1.1 200 OK\r\nConnection: closed-ish\r\nContent-Length: 1\r\n\r\n",
                head(200, Length(1), true),
            ),
            ("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", head(200, Length(1), false)),
            (
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                head(200, Length(1), true),
            ),
            ("HTTP/1.1 204 No Content\r\n\r\n", head(204, Length(0), true)),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
                head(304, Length(0), true),
            ),
            ("HTTP/1.1 503 Busy\r\nContent-Length: 2\r\n\r\n", head(503, Length(2), true)),
            // Refused.
            ("HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", Err(BadContentLength)),
            ("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", Err(BadContentLength)),
            ("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", Err(BadContentLength)),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", Err(BadContentLength)),
            ("HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n", Err(BadContentLength)),
            ("HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n", Err(BadContentLength)),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                Err(BadContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Err(ConflictingContentLength),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(LengthAndTransferEncoding),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Err(LengthAndTransferEncoding),
            ),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", Err(UnsupportedTransferCoding)),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Err(UnsupportedTransferCoding),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Err(UnsupportedTransferCoding),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                Err(UnsupportedTransferCoding),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(UnsupportedTransferCoding),
            ),
            (
                // Not a substring match: "xchunked" is not chunked.
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n",
                Err(UnsupportedTransferCoding),
            ),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\n", Err(UnsupportedTransferCoding)),
            (
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(TransferEncodingOnHttp10),
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                Err(SwitchingProtocols),
            ),
            ("HTTP/2.0 200 OK\r\n\r\n", Err(Malformed("not HTTP/1.0 or HTTP/1.1"))),
            ("HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", Err(Malformed("invalid header name"))),
            ("HTTP/1.1 2000 OK\r\n\r\n", Err(Malformed("malformed status line"))),
        ];
        for (text, expected) in cases {
            assert_eq!(&final_head(text), expected, "{text:?}");
        }
    }

    #[test]
    fn interim_responses_are_skipped_whole() {
        let text = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert_eq!(parse(text.as_bytes()), Ok(Some(Parsed::Interim(25))));
        let early = "HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n";
        assert_eq!(
            parse(early.as_bytes()),
            Ok(Some(Parsed::Interim(early.len())))
        );
    }

    #[test]
    fn every_prefix_is_incomplete_not_invalid() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        for end in 0..text.len() {
            assert_eq!(parse(&text[..end]), Ok(None), "{end}");
        }
    }

    #[test]
    fn too_many_fields() {
        let mut text = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            text.push_str(&format!("X-{i}: v\r\n"));
        }
        text.push_str("\r\n");
        assert_eq!(parse(text.as_bytes()), Err(HeadError::TooManyFields));
    }
}
