//! Not end to end: the e2e helpers' own parsers (SSE, chunked bodies,
//! pipelined responses) checked on hand-written bytes, so that an e2e
//! failure is the server's and never the parser's.

mod support;

use support::*;

fn ev(event: &str, data: &str, id: Option<&str>, retry: Option<u64>) -> Event {
    Event {
        event: event.into(),
        data: data.into(),
        id: id.map(Into::into),
        retry,
    }
}

fn msg(data: &str) -> Event {
    ev("message", data, None, None)
}

/// Every body in the table, fed whole and then byte by byte (so a CRLF is
/// split between two feeds), gives the same events.
#[test]
fn sse_events_table() {
    let table: Vec<(&str, Vec<Event>)> = vec![
        ("", vec![]),
        ("data: a\n\n", vec![msg("a")]),
        ("data: a\r\n\r\n", vec![msg("a")]),
        ("data: a\r\r", vec![msg("a")]),
        ("data: a\r\n\ndata: b\n\r\n", vec![msg("a"), msg("b")]),
        // Multi-line data joins with \n; an empty data line adds an empty line.
        ("data: a\ndata: b\ndata\n\n", vec![msg("a\nb\n")]),
        ("data:a\n\n", vec![msg("a")]),
        ("data:  a\n\n", vec![msg(" a")]),
        ("data: a: b\n\n", vec![msg("a: b")]),
        (
            "event: token\ndata: {\"t\":\"x\"}\n\n",
            vec![ev("token", "{\"t\":\"x\"}", None, None)],
        ),
        (
            "id: s1:3\nevent: done\ndata: {}\n\n",
            vec![ev("done", "{}", Some("s1:3"), None)],
        ),
        // id is per event here, not inherited.
        (
            "id: 1\ndata: a\n\ndata: b\n\n",
            vec![ev("message", "a", Some("1"), None), msg("b")],
        ),
        ("id: a\0b\ndata: x\n\n", vec![msg("x")]),
        (
            "retry: 3000\ndata: x\n\n",
            vec![ev("message", "x", None, Some(3000))],
        ),
        ("retry: 3s\ndata: x\n\n", vec![msg("x")]),
        // Comments: skipped, alone or among fields; a comment-only block is no event.
        (": keep-alive\n\n", vec![]),
        (
            ": ping\ndata: a\n: after\n\n: keep-alive\n\n",
            vec![msg("a")],
        ),
        // Unknown fields are ignored; a block with fields but no data is
        // still an event (a browser would drop it; tests want to see it).
        ("foo: bar\ndata: x\n\n", vec![msg("x")]),
        ("event: done\n\n", vec![ev("done", "", None, None)]),
        // Blank lines between blocks dispatch nothing.
        ("\n\n\ndata: a\n\n\n\n", vec![msg("a")]),
        ("data: é ✓ 🎉\n\n", vec![msg("é ✓ 🎉")]),
    ];
    for (body, want) in &table {
        assert_eq!(&parse_sse(body.as_bytes()), want, "whole: {body:?}");
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for b in body.as_bytes() {
            p.push(std::slice::from_ref(b));
            while let Some(e) = p.next_event() {
                got.push(e);
            }
        }
        p.end();
        while let Some(e) = p.next_event() {
            got.push(e);
        }
        assert_eq!(&got, want, "byte by byte: {body:?}");
    }
}

#[test]
fn sse_blocks_keep_comments() {
    let blocks = parse_sse_blocks(b": keep-alive\r\n\r\n: a\r\n:b\r\ndata: x\r\n\r\n");
    assert_eq!(
        blocks,
        [
            SseBlock {
                comments: vec!["keep-alive".into()],
                event: None,
            },
            SseBlock {
                comments: vec!["a".into(), "b".into()],
                event: Some(msg("x")),
            },
        ]
    );
}

#[test]
fn sse_a_body_that_ends_inside_an_event_panics() {
    for body in ["data: a", "data: a\n", "data: a\r\n", ": c\n"] {
        let r = std::panic::catch_unwind(|| parse_sse(body.as_bytes()));
        assert!(r.is_err(), "{body:?} ends inside an event");
    }
}

#[test]
fn chunked_bodies_table() {
    let table: &[(&str, &str)] = &[
        ("0\r\n\r\n", ""),
        ("3\r\nabc\r\n0\r\n\r\n", "abc"),
        (
            "3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n",
            "abc0123456789",
        ),
        ("2\r\n\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n", "\r\n"),
    ];
    for (raw, want) in table {
        assert_eq!(decode_chunked(raw.as_bytes()), want.as_bytes(), "{raw:?}");
    }
    for cut in ["3\r\nab", "3\r\nabc\r\n", "3\r\nabc\r\n0\r\n", "zz\r\n"] {
        let r = std::panic::catch_unwind(|| decode_chunked(cut.as_bytes()));
        assert!(r.is_err(), "{cut:?} is not a whole chunked body");
    }
}

#[test]
fn pipelined_responses_split_by_their_framing() {
    let raw = b"HTTP/1.1 100 Continue\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n\
        HTTP/1.1 204 No Content\r\nVary: Origin\r\n\r\n\
        HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n6\r\n a\n\n\r\n\r\n0\r\n\r\n\
        HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: b\n\n";
    let rs = parse_responses(raw);
    let statuses: Vec<u16> = rs.iter().map(Response::status).collect();
    assert_eq!(statuses, [100, 200, 204, 200, 200]);
    assert_eq!(rs[1].body, b"ok\n");
    assert_eq!(rs[2].head.header("vary"), Some("Origin"));
    assert_eq!(rs[3].events(), [msg("a")]);
    assert_eq!(rs[4].head.version, "HTTP/1.0");
    assert_eq!(rs[4].events(), [msg("b")]);
}
