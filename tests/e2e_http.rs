//! End to end: HTTP framing: refusals (status, JSON body, whether the
//! connection survives), keep-alive, pipelining, HTTP/1.0, chunked request
//! bodies, `Expect: 100-continue`, `Last-Event-ID`, and the operational
//! endpoints.

mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use support::*;

const FAST: &[&str] = &["--sim-ttft-ms", "0", "--sim-itl-ms", "1"];
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// The connection still serves requests.
fn assert_kept(c: &mut Client) {
    let r = c.roundtrip(&get("/healthz", ""));
    assert_eq!(r.status(), 200, "the connection should have been kept");
    assert_eq!(r.body, b"ok\n");
}

/// Sends `req` on a fresh connection and expects a refusal with `status` and `code`.
fn refusal(c: &mut Client, req: &[u8], status: u16, code: &str) -> Response {
    let r = c.roundtrip(req);
    assert_eq!(r.status(), status, "{}", r.text());
    assert_eq!(r.error_code(), code, "{}", r.text());
    assert!(r.head.header("x-request-id").is_some(), "{:?}", r.head);
    r
}

fn refused_and_closed(srv: &TestServer, req: &[u8], status: u16, code: &str) {
    let mut c = srv.connect();
    let r = refusal(&mut c, req, status, code);
    assert!(r.head.closes(), "expected Connection: close: {:?}", r.head);
    assert!(
        c.closed_within(CLOSE_WAIT),
        "{status} {code}: the server should close the connection"
    );
}

fn refused_and_kept(srv: &TestServer, req: &[u8], status: u16, code: &str) -> Response {
    let mut c = srv.connect();
    let r = refusal(&mut c, req, status, code);
    assert!(!r.head.closes(), "{:?}", r.head);
    assert_kept(&mut c);
    r
}

#[test]
fn malformed_http_is_400_and_closes() {
    let srv = start(FAST);
    refused_and_closed(&srv, b"GARBAGE\r\n\r\n", 400, "bad_request");
    refused_and_closed(
        &srv,
        b"POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        400,
        "bad_request",
    );
    refused_and_closed(
        &srv,
        b"POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        "bad_request",
    );
    refused_and_closed(
        &srv,
        b"POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        400,
        "bad_request",
    );
}

#[test]
fn bad_json_and_bad_fields_are_400_and_keep_the_connection() {
    let srv = start(FAST);
    for body in [
        "{not json",
        "",
        "[1,2]",
        r#"{"prompt":"hi","foo":1}"#,
        r#"{"prompt":"hi","max_tokens":0}"#,
        r#"{"prompt":"hi","max_tokens":4097}"#,
        r#"{"prompt":"hi","max_tokens":"5"}"#,
        r#"{"prompt":"hi","temperature":3}"#,
        r#"{"prompt":"hi","stream":"yes"}"#,
        r#"{"messages":"hi"}"#,
    ] {
        let mut c = srv.connect();
        let r = refusal(&mut c, &post_stream(body), 400, "bad_request");
        assert!(!r.head.closes(), "{body}: {:?}", r.head);
        // A valid stream on the same connection.
        c.send(&post_stream(r#"{"prompt":"hi","max_tokens":2}"#));
        assert_eq!(c.read_head().status, 200, "after {body}");
        assert_eq!(tokens_until_done(&c.events_to_end()).len(), 2);
    }
    refused_and_kept(
        &srv,
        &get("/v1/chat/stream?prompt=hi&max_tokens=0", ""),
        400,
        "bad_request",
    );
    refused_and_kept(
        &srv,
        &get("/v1/chat/stream?prompt=hi&max_tokens=x", ""),
        400,
        "bad_request",
    );
    refused_and_kept(&srv, &get("/v1/chat/stream", ""), 400, "bad_request");
    assert_eq!(load(&srv.metrics.streams_started), 10);
}

#[test]
fn oversized_head_is_431_and_closes() {
    let srv = start(&["--max-head-bytes", "1024"]);
    let big = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        "a".repeat(2048)
    );
    refused_and_closed(&srv, big.as_bytes(), 431, "headers_too_large");
    // Just under the limit is fine.
    let ok = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(900)
    );
    let mut c = srv.connect();
    assert_eq!(c.roundtrip(ok.as_bytes()).status(), 200);
}

#[test]
fn oversized_body_is_413_and_closes() {
    let srv = start(&["--max-body-bytes", "100"]);
    let body = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(200));
    refused_and_closed(&srv, &post_stream(&body), 413, "payload_too_large");
    // Chunked bodies are limited too.
    let chunk = "a".repeat(150);
    let req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    refused_and_closed(&srv, req.as_bytes(), 413, "payload_too_large");
}

#[test]
fn slow_head_is_408_and_closes() {
    let srv = start(&["--header-timeout-ms", "200"]);
    let mut c = srv.connect();
    c.send(b"POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\n");
    let r = c.read_response();
    assert_eq!(r.status(), 408, "{}", r.text());
    assert_eq!(r.error_code(), "request_timeout");
    assert!(c.closed_within(CLOSE_WAIT));
    // A connection that sends nothing at all times out the same way.
    let mut c = srv.connect();
    let r = c.read_response();
    assert_eq!(r.status(), 408, "{}", r.text());
    assert!(c.closed_within(CLOSE_WAIT));
    // A whole head and half a body.
    let mut c = srv.connect();
    let req = post_stream(r#"{"prompt":"hi"}"#);
    c.send(&req[..req.len() - 5]);
    let r = c.read_response();
    assert_eq!(r.status(), 408, "{}", r.text());
    assert!(c.closed_within(CLOSE_WAIT));
    let m = &srv.metrics;
    eventually(m, CLOSE_WAIT, "all closed", || {
        m.connections_open.load(SeqCst) == 0 && load(&m.connections_timed_out) == 3
    });
}

#[test]
fn http2_is_505_and_closes() {
    let srv = start(FAST);
    refused_and_closed(
        &srv,
        b"GET /healthz HTTP/2.0\r\nHost: t\r\n\r\n",
        505,
        "http_version_not_supported",
    );
}

#[test]
fn unknown_path_404_and_wrong_method_405_keep_the_connection() {
    let srv = start(FAST);
    refused_and_kept(&srv, &get("/nope", ""), 404, "not_found");
    refused_and_kept(&srv, &post("/v1/other", "{}", ""), 404, "not_found");
    let r = refused_and_kept(
        &srv,
        b"DELETE /v1/chat/stream HTTP/1.1\r\nHost: t\r\n\r\n",
        405,
        "method_not_allowed",
    );
    let allow = r.head.header("allow").expect("Allow");
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let r = refused_and_kept(&srv, &post("/healthz", "{}", ""), 405, "method_not_allowed");
    assert!(r.head.header("allow").is_some_and(|a| a.contains("GET")));
}

#[test]
fn max_streams_gives_503_overloaded_with_retry_after() {
    let srv = start(&["--max-streams", "1", "--sim-ttft-ms", "5000"]);
    let mut first = srv.connect();
    first.send(&post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(first.read_head().status, 200);
    let r = refused_and_kept(&srv, &post_stream(r#"{"prompt":"hi"}"#), 503, "overloaded");
    assert!(r.head.header("retry-after").is_some(), "{:?}", r.head);
    drop(first);
    let m = &srv.metrics;
    eventually(m, CLOSE_WAIT, "the first stream gone", || {
        m.streams_open.load(SeqCst) == 0
    });
    // A slot is free again (the stream is admitted: its head arrives).
    let mut c = srv.connect();
    c.send(&post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(c.read_head().status, 200);
}

#[test]
fn full_worker_queue_gives_503_overloaded() {
    let (backend, stats) = TestBackend::create();
    let srv = start_with_backend(&["--workers", "1", "--queue-depth", "1"], backend);
    let mut a = srv.connect();
    a.send(&post_stream(r#"{"prompt":"gate 1"}"#));
    assert_eq!(a.read_head().status, 200);
    eventually(&srv.metrics, CLOSE_WAIT, "the worker busy", || {
        stats.started() == 1
    });
    let mut b = srv.connect();
    b.send(&post_stream(r#"{"prompt":"tokens 1 0"}"#));
    assert_eq!(b.read_head().status, 200);
    let r = refused_and_kept(&srv, &post_stream(r#"{"prompt":"hi"}"#), 503, "overloaded");
    assert!(r.head.header("retry-after").is_some(), "{:?}", r.head);
    assert_eq!(load(&srv.metrics.streams_started), 2);

    stats.open_gate();
    assert_eq!(tokens_until_done(&a.events_to_end()).len(), 1);
    assert_eq!(tokens_until_done(&b.events_to_end()).len(), 1);
}

#[test]
fn pipelined_stream_then_healthz_answer_in_order() {
    let srv = start(FAST);
    let mut c = srv.connect();
    let mut req = post_stream(r#"{"prompt":"hi","max_tokens":3}"#);
    req.extend_from_slice(&get("/healthz", ""));
    c.send(&req);
    let head = c.read_head();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 3);
    let r = c.read_response();
    assert_eq!(r.status(), 200);
    assert_eq!(r.body, b"ok\n");
}

#[test]
fn two_pipelined_streams_then_a_third_after_done() {
    let srv = start(FAST);
    let mut c = srv.connect();
    let mut req = post_stream(r#"{"prompt":"one","max_tokens":2}"#);
    req.extend_from_slice(&get("/v1/chat/stream?prompt=two&max_tokens=4", ""));
    c.send(&req);
    for want in [2, 4] {
        let head = c.read_head();
        assert_eq!(head.status, 200);
        let events = c.events_to_end();
        assert_eq!(tokens_until_done(&events).len(), want, "{events:?}");
    }
    // The same connection after both are done.
    c.send(&post_stream(r#"{"prompt":"three","max_tokens":1}"#));
    assert_eq!(c.read_head().status, 200);
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 1);
    assert_eq!(load(&srv.metrics.connections_accepted), 1);
    eventually(&srv.metrics, CLOSE_WAIT, "3 completed", || {
        load(&srv.metrics.streams_completed) == 3
    });
}

#[test]
fn http10_stream_is_close_delimited() {
    let srv = start(FAST);
    let body = r#"{"prompt":"hi","max_tokens":3}"#;
    let req = format!(
        "POST /v1/chat/stream HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut c = srv.connect();
    c.send(req.as_bytes());
    let head = c.read_head();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert!(!head.is_chunked(), "{head:?}");
    assert!(head.content_length().is_none(), "{head:?}");
    let raw = c.read_to_eof();
    let events = parse_sse(&raw);
    assert_eq!(tokens_until_done(&events).len(), 3, "{events:?}");
    let m = &srv.metrics;
    eventually(m, CLOSE_WAIT, "closed", || {
        m.connections_open.load(SeqCst) == 0 && load(&m.streams_completed) == 1
    });
    // Same text as HTTP/1.1.
    let (_, e11) = stream_events(srv.addr, &post_stream(body));
    assert_eq!(tokens_until_done(&events), tokens_until_done(&e11));
}

#[test]
fn chunked_request_body_works() {
    let srv = start(FAST);
    let body = r#"{"prompt":"hi","max_tokens":3}"#;
    let (a, b) = body.split_at(10);
    let req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let mut c = srv.connect();
    c.send(req.as_bytes());
    assert_eq!(c.read_head().status, 200);
    let chunked = tokens_until_done(&c.events_to_end());
    let (_, plain) = stream_events(srv.addr, &post_stream(body));
    assert_eq!(chunked, tokens_until_done(&plain));
    assert_kept(&mut c);
}

#[test]
fn a_request_in_small_pieces_works() {
    let srv = start(FAST);
    let req = post_stream(r#"{"prompt":"hi","max_tokens":2}"#);
    let mut c = srv.connect();
    for piece in req.chunks(7) {
        c.send(piece);
        // Pacing, not waiting: the pieces should reach the server in
        // separate reads (TCP_NODELAY is on).
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.read_head().status, 200);
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 2);
}

#[test]
fn expect_100_continue_gets_continue_first() {
    let srv = start(FAST);
    let body = r#"{"prompt":"hi","max_tokens":2}"#;
    let mut c = srv.connect();
    c.send(
        format!(
            "POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let cont = c.read_head();
    assert_eq!((cont.version.as_str(), cont.status), ("HTTP/1.1", 100));
    assert_eq!(cont.reason, "Continue");
    assert!(cont.headers.is_empty(), "{cont:?}");
    c.send(body.as_bytes());
    assert_eq!(c.read_head().status, 200);
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 2);
}

#[test]
fn get_with_last_event_id_is_204() {
    let srv = start(FAST);
    let mut c = srv.connect();
    let r = c.roundtrip(&get(
        "/v1/chat/stream?prompt=hi&max_tokens=2",
        "Last-Event-ID: abc:3\r\n",
    ));
    assert_eq!(r.status(), 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(load(&srv.metrics.streams_started), 0);
    assert_kept(&mut c);
}

#[test]
fn health_ready_and_metrics_endpoints() {
    let srv = start(FAST);
    let mut c = srv.connect();
    let r = c.roundtrip(&get("/healthz", ""));
    assert_eq!((r.status(), r.text().as_str()), (200, "ok\n"));
    let r = c.roundtrip(&get("/readyz", ""));
    assert_eq!(r.status(), 200);
    let r = c.roundtrip(&get("/metrics", ""));
    assert_eq!(r.status(), 200);
    let ct = r.head.header("content-type").unwrap();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text();
    for family in [
        "# TYPE sluice_streams_open gauge",
        "# TYPE sluice_connections_open gauge",
        "# TYPE sluice_streams_started_total counter",
        "# TYPE sluice_streams_completed_total counter",
        "# TYPE sluice_streams_errored_total counter",
        "# TYPE sluice_streams_disconnected_total counter",
        "# TYPE sluice_tokens_sent_total counter",
        "# TYPE sluice_heartbeats_sent_total counter",
        "# TYPE sluice_time_to_first_token_seconds histogram",
        "# TYPE sluice_inter_token_seconds histogram",
        "# TYPE sluice_stream_duration_seconds histogram",
        "# TYPE sluice_queue_wait_seconds histogram",
    ] {
        assert!(text.contains(family), "missing {family:?} in:\n{text}");
    }
    // This very connection is open.
    assert_eq!(prom_value(&text, "sluice_connections_open"), Some(1.0));
}

#[test]
fn every_started_stream_ends_exactly_once_in_the_metrics() {
    let (backend, stats) = TestBackend::create();
    let srv = start_with_backend(&[], backend);
    // Completed.
    let (_, e) = stream_events(srv.addr, &post_stream(r#"{"prompt":"tokens 2 0"}"#));
    assert_eq!(tokens_until_done(&e).len(), 2);
    // Errored.
    let (_, e) = stream_events(srv.addr, &post_stream(r#"{"prompt":"error 1"}"#));
    assert_eq!(e.last().unwrap().event, "error");
    // Disconnected.
    let mut c = srv.connect();
    c.send(&post_stream(r#"{"prompt":"block"}"#));
    assert_eq!(c.read_head().status, 200);
    eventually(&srv.metrics, CLOSE_WAIT, "started", || stats.started() == 3);
    drop(c);
    // Refused (not a stream).
    let mut c = srv.connect();
    refusal(&mut c, &post_stream("{"), 400, "bad_request");

    let m = &srv.metrics;
    eventually(m, CLOSE_WAIT, "all ended", || {
        m.streams_open.load(SeqCst) == 0 && stats.cancelled() == 1
    });
    let text = c.roundtrip(&get("/metrics", "")).text();
    let v = |name: &str| {
        prom_value(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}")) as u64
    };
    let errored: u64 = sluice::sse::ErrorCode::ALL
        .iter()
        .map(|c| {
            v(&format!(
                "sluice_streams_errored_total{{code=\"{}\"}}",
                c.as_str()
            ))
        })
        .sum();
    let started = v("sluice_streams_started_total");
    let completed = v("sluice_streams_completed_total");
    let disconnected = v("sluice_streams_disconnected_total");
    assert_eq!((started, completed, errored, disconnected), (3, 1, 1, 1));
    assert_eq!(started, completed + errored + disconnected);
    assert_eq!(
        v("sluice_streams_errored_total{code=\"upstream_error\"}"),
        1
    );
    assert_eq!(v("sluice_streams_open"), 0);
    assert_eq!(v("sluice_tokens_sent_total"), 3);
    assert_eq!(v("sluice_stream_duration_seconds_count"), 3);
    assert_eq!(v("sluice_time_to_first_token_seconds_count"), 2);
    // Not in the contract's list, so only when present.
    if let Some(refused) = prom_sum(&text, "sluice_requests_refused_total") {
        assert!(refused >= 1.0, "refused {refused}");
    }
}

#[test]
fn idle_keep_alive_connection_is_closed() {
    let srv = start(&["--idle-timeout-ms", "200"]);
    let mut c = srv.connect();
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
    assert!(c.closed_within(CLOSE_WAIT), "idle connection not closed");
    let m = &srv.metrics;
    eventually(m, CLOSE_WAIT, "closed", || {
        m.connections_open.load(SeqCst) == 0
    });
}

#[test]
fn expect_100_continue_with_too_large_a_body_gets_413_not_continue() {
    let srv = start(&["--max-body-bytes", "100"]);
    let mut c = srv.connect();
    c.send(
        b"POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
    );
    let r = c.read_response();
    assert_eq!(r.status(), 413, "{:?}", r.head);
    assert_eq!(r.error_code(), "payload_too_large");
    assert!(c.closed_within(CLOSE_WAIT));
}

#[test]
fn max_connections_holds_new_connections_in_the_backlog() {
    let srv = start(&[
        "--max-connections",
        "2",
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "1",
    ]);
    let m = &srv.metrics;
    let mut a = srv.connect();
    let mut b = srv.connect();
    assert_eq!(a.roundtrip(&get("/healthz", "")).status(), 200);
    assert_eq!(b.roundtrip(&get("/healthz", "")).status(), 200);
    // Both are in the middle of a request: neither is idle, so neither
    // may be closed to make room.
    let req = get("/healthz", "");
    let (first, rest) = req.split_at(8);
    a.send(first);
    b.send(first);
    eventually(m, CLOSE_WAIT, "both partial heads held", || {
        m.request_bytes_buffered.load(SeqCst) == 16
    });
    // The third connects (kernel backlog) but is not served yet.
    let mut c = srv.connect();
    c.send(&get("/healthz", ""));
    c.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    let early = std::io::Read::read(&mut c.sock, &mut buf);
    assert!(
        early.is_err(),
        "the third connection was served beyond --max-connections: {early:?}"
    );
    c.sock.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    assert_eq!(m.connections_open.load(SeqCst), 2);
    // One closes: the third is accepted and answered.
    drop(a);
    let r = c.read_response();
    assert_eq!(r.status(), 200);
    assert_eq!(b.roundtrip(rest).status(), 200);
    assert_kept(&mut b);
}

#[test]
fn http10_keep_alive_rules_for_plain_responses() {
    let srv = start(FAST);
    // Without keep-alive: answered with a length, then closed.
    let mut c = srv.connect();
    let r = c.roundtrip(b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(r.status(), 200);
    assert_eq!(r.body, b"ok\n");
    assert!(c.closed_within(CLOSE_WAIT));
    // With keep-alive: kept.
    let mut c = srv.connect();
    let r = c.roundtrip(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.head.header("connection"),
        Some("keep-alive"),
        "{:?}",
        r.head
    );
    let r = c.roundtrip(b"GET /readyz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(r.status(), 200);
    // A stream on HTTP/1.0 is close-delimited even with keep-alive.
    c.send(
        b"GET /v1/chat/stream?prompt=hi&max_tokens=2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    let head = c.read_head();
    assert_eq!(head.status, 200);
    assert!(!head.is_chunked());
    let events = parse_sse(&c.read_to_eof());
    assert_eq!(tokens_until_done(&events).len(), 2);
}

#[test]
fn connection_close_on_a_stream_closes_after_done() {
    let srv = start(FAST);
    let mut c = srv.connect();
    c.send(&post(
        "/v1/chat/stream",
        r#"{"prompt":"hi","max_tokens":2}"#,
        "Connection: close\r\n",
    ));
    let head = c.read_head();
    assert_eq!(head.status, 200);
    assert!(head.is_chunked());
    assert!(head.closes(), "{head:?}");
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 2);
    assert!(c.closed_within(CLOSE_WAIT));
}

#[test]
fn body_is_json_whatever_the_content_type() {
    let srv = start(FAST);
    let body = r#"{"prompt":"hi","max_tokens":2}"#;
    let req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (_, events) = stream_events(srv.addr, req.as_bytes());
    assert_eq!(tokens_until_done(&events).len(), 2);
}

#[test]
fn pipelined_requests_beyond_the_buffer_limit_are_not_lost() {
    // While a stream runs, requests pipelined behind it are held, up to
    // max-head-bytes + max-body-bytes (here 2048). Send more than that.
    let srv = start(&[
        "--max-head-bytes",
        "1024",
        "--max-body-bytes",
        "1024",
        "--sim-ttft-ms",
        "300",
        "--sim-itl-ms",
        "1",
    ]);
    let mut c = srv.connect();
    c.send(&post_stream(r#"{"prompt":"hi","max_tokens":2}"#));
    assert_eq!(c.read_head().status, 200);
    // Three requests of ~900 bytes each, in one write, during the stream's TTFT.
    let pad = "p".repeat(850);
    let mut more = Vec::new();
    for i in 0..3 {
        more.extend_from_slice(&get(
            "/healthz",
            &format!("X-Request-Id: r{i}\r\nX-Pad: {pad}\r\n"),
        ));
    }
    assert!(more.len() > 2048);
    c.send(&more);
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 2);
    // Each pipelined request is answered, in order (or at worst refused
    // visibly); never silently dropped.
    for i in 0..3 {
        let r = c.read_response();
        assert_eq!(r.status(), 200, "pipelined request {i}: {}", r.text());
        assert_eq!(
            r.head.header("x-request-id"),
            Some(format!("r{i}").as_str())
        );
    }
}

#[test]
fn queue_depth_zero_still_serves_with_an_idle_worker() {
    let (backend, stats) = TestBackend::create();
    let srv = start_with_backend(&["--workers", "1", "--queue-depth", "0"], backend);
    let mut c = srv.connect();
    let r = {
        c.send(&post_stream(r#"{"prompt":"tokens 1 0"}"#));
        c.read_head()
    };
    assert_eq!(
        r.status, 200,
        "an idle worker exists, yet --queue-depth 0 refused: {r:?}"
    );
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 1);
    assert_eq!(stats.started(), 1);
}
