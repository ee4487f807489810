//! End to end: what a successful (or failing) stream looks like on the wire:
//! head, event order and payloads, heartbeats, errors mid-stream, and the
//! non-streaming fallback.

mod support;

use std::time::Duration;

use support::*;

const FAST: &[&str] = &["--sim-ttft-ms", "0", "--sim-itl-ms", "1"];

fn fast_with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = FAST.to_vec();
    v.extend_from_slice(extra);
    v
}

#[test]
fn post_stream_head_events_and_done() {
    let srv = start(FAST);
    let (head, events) = stream_events(srv.addr, &post_stream(r#"{"prompt":"hi","max_tokens":5}"#));

    assert_eq!(head.version, "HTTP/1.1");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(head.header("cache-control"), Some("no-cache"));
    assert_eq!(head.header("x-accel-buffering"), Some("no"));
    assert!(head.is_chunked(), "{head:?}");
    assert!(head.content_length().is_none(), "{head:?}");
    let rid = head
        .header("x-request-id")
        .expect("X-Request-Id")
        .to_owned();
    assert!(!rid.is_empty() && rid.len() <= 64);

    assert_eq!(events.len(), 6, "{events:?}");
    for e in &events[..5] {
        assert_eq!(e.event, "token", "{e:?}");
        assert_eq!(e.id, None, "tokens carry no id: {e:?}");
        assert!(!e.token().is_empty());
    }
    let done = &events[5];
    assert_eq!(done.event, "done");
    // Without a client X-Request-Id the stream id is the request id.
    assert_eq!(done.id.as_deref(), Some(format!("{rid}:6").as_str()));
    let d = done.json();
    assert_eq!(d["finish_reason"], "length", "{d}");
    assert_eq!(d["usage"]["completion_tokens"], 5, "{d}");
    assert_eq!(d["usage"]["prompt_tokens"], 1, "{d}");
    assert!(d["ttft_ms"].as_f64().is_some_and(|t| t >= 0.0), "{d}");
    assert!(d["tokens_per_s"].as_f64().is_some_and(|t| t >= 0.0), "{d}");

    eventually(&srv.metrics, Duration::from_secs(3), "completed=1", || {
        load(&srv.metrics.streams_completed) == 1 && load(&srv.metrics.tokens_sent) == 5
    });
}

#[test]
fn sim_answer_ends_with_stop_when_not_cut() {
    let srv = start(&fast_with(&["--sim-tokens", "4"]));
    let (_, events) = stream_events(srv.addr, &post_stream(r#"{"prompt":"hi","max_tokens":10}"#));
    assert_eq!(tokens_until_done(&events).len(), 4);
    let d = events.last().unwrap().json();
    assert_eq!(d["finish_reason"], "stop", "{d}");
    assert_eq!(d["usage"]["completion_tokens"], 4, "{d}");
}

#[test]
fn get_gives_the_same_text_and_text_is_deterministic_across_servers() {
    let a = start(FAST);
    let b = start(FAST);
    let body = r#"{"messages":[{"role":"user","content":"tell me a story"}],"max_tokens":5}"#;
    let (_, ea) = stream_events(a.addr, &post_stream(body));
    let (_, eb) = stream_events(b.addr, &post_stream(body));
    let ta = tokens_until_done(&ea);
    assert_eq!(ta.len(), 5);
    assert_eq!(ta, tokens_until_done(&eb), "same prompt, two servers");

    let (_, eg) = stream_events(
        a.addr,
        &get("/v1/chat/stream?prompt=tell+me%20a+story&max_tokens=5", ""),
    );
    assert_eq!(ta, tokens_until_done(&eg), "GET with the same prompt");
    let d = eg.last().unwrap().json();
    assert_eq!(d["usage"]["prompt_tokens"], 4, "{d}");

    // `prompt` is shorthand for one user message.
    let (_, ep) = stream_events(
        b.addr,
        &post_stream(r#"{"prompt":"tell me a story","max_tokens":5}"#),
    );
    assert_eq!(ta, tokens_until_done(&ep));

    // Other prompts start elsewhere in the word list (an equal start is a
    // 1-in-64 chance per prompt, so ask for one of several to differ).
    let differs = ["hi", "hello", "why is the sky blue", "x"].iter().any(|p| {
        let body = format!(r#"{{"prompt":{},"max_tokens":5}}"#, js(p));
        let (_, e) = stream_events(a.addr, &post_stream(&body));
        tokens_until_done(&e) != ta
    });
    assert!(differs, "every prompt gave the same text");
}

#[test]
fn client_request_id_is_echoed_and_insane_ones_replaced() {
    let srv = start(FAST);
    let mut c = srv.connect();
    c.send(&post(
        "/v1/chat/stream",
        r#"{"prompt":"hi","max_tokens":2}"#,
        "X-Request-Id: my-trace-123\r\n",
    ));
    let head = c.read_head();
    assert_eq!(head.header("x-request-id"), Some("my-trace-123"));
    let events = c.events_to_end();
    assert_eq!(tokens_until_done(&events).len(), 2);
    // The terminal id is the stream id, not the client's request id.
    let id = events.last().unwrap().id.clone().expect("done id");
    assert!(id.ends_with(":3"), "{id}");

    // Too long (65 chars): replaced by the stream id.
    let long = "a".repeat(65);
    let r = c.roundtrip(&get("/healthz", &format!("X-Request-Id: {long}\r\n")));
    assert_eq!(r.status(), 200);
    let rid = r.head.header("x-request-id").expect("X-Request-Id");
    assert_ne!(rid, long);
    assert!(!rid.is_empty() && rid.len() <= 64);

    // Exactly 64 visible characters are echoed.
    let max = "b".repeat(64);
    let r = c.roundtrip(&get("/healthz", &format!("X-Request-Id: {max}\r\n")));
    assert_eq!(r.head.header("x-request-id"), Some(max.as_str()));

    // Refusals carry it too.
    let r = c.roundtrip(&get("/nope", "X-Request-Id: abc\r\n"));
    assert_eq!(r.status(), 404);
    assert_eq!(r.head.header("x-request-id"), Some("abc"));
}

#[test]
fn heartbeats_arrive_before_the_first_token() {
    let srv = start(&[
        "--sim-ttft-ms",
        "300",
        "--sim-itl-ms",
        "1",
        "--heartbeat-ms",
        "50",
    ]);
    let (_, events) = stream_events(srv.addr, &post_stream(r#"{"prompt":"hi","max_tokens":3}"#));
    let first_token = events
        .iter()
        .position(|e| e.event == "token")
        .expect("a token");
    assert!(
        first_token >= 2,
        "expected heartbeats during 300 ms of TTFT at 50 ms: {events:?}"
    );
    for e in &events[..first_token] {
        assert_eq!(e.event, "heartbeat", "{e:?}");
        let d = e.json();
        assert!(d.is_object(), "{d}");
        assert!(d["phase"].is_string(), "{d}");
    }
    assert_eq!(tokens_until_done(&events).len(), 3);
    assert!(load(&srv.metrics.heartbeats_sent) >= 2);
}

#[test]
fn heartbeat_while_queued_for_a_worker() {
    let (backend, stats) = TestBackend::create();
    let srv = start_with_backend(&["--workers", "1", "--heartbeat-ms", "50"], backend);

    let mut a = srv.connect();
    a.send(&post_stream(r#"{"prompt":"gate 2"}"#));
    assert_eq!(a.read_head().status, 200);
    eventually(
        &srv.metrics,
        Duration::from_secs(3),
        "the worker busy",
        || stats.started() == 1,
    );

    let mut b = srv.connect();
    b.send(&post_stream(r#"{"prompt":"tokens 2 0"}"#));
    assert_eq!(
        b.read_head().status,
        200,
        "the head is sent at once, even queued"
    );
    let hb = b.next_event().expect("an event while queued");
    assert_eq!(hb.event, "heartbeat", "{hb:?}");
    assert_eq!(hb.json()["phase"], "queued", "{hb:?}");
    assert_eq!(stats.started(), 1, "b must still be queued");

    // The first stream's own heartbeats say it is generating.
    let ha = a.next_event().expect("an event");
    assert_eq!(ha.event, "heartbeat", "{ha:?}");
    assert_eq!(ha.json()["phase"], "generating", "{ha:?}");

    stats.open_gate();
    assert_eq!(tokens_until_done(&a.events_to_end()).len(), 2);
    let rest = b.events_to_end();
    let toks = tokens_until_done(&rest);
    assert_eq!(toks, ["tok0 ", "tok1 "], "{rest:?}");
    assert_eq!(stats.started(), 2);
}

#[test]
fn error_mid_stream_and_a_neighbour_completes() {
    let (backend, stats) = TestBackend::create();
    let srv = start_with_backend(&[], backend);

    let mut ok = srv.connect();
    ok.send(&post_stream(r#"{"prompt":"tokens 5 20"}"#));
    assert_eq!(ok.read_head().status, 200);

    let mut bad = srv.connect();
    bad.send(&post_stream(r#"{"prompt":"error 2"}"#));
    let head = bad.read_head();
    assert_eq!(head.status, 200);
    let rid = head.header("x-request-id").unwrap().to_owned();
    let events = bad.events_to_end();
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].token(), "tok0 ");
    assert_eq!(events[1].token(), "tok1 ");
    let err = &events[2];
    assert_eq!(err.event, "error", "{err:?}");
    assert_eq!(err.id.as_deref(), Some(format!("{rid}:3").as_str()));
    let d = err.json();
    assert_eq!(d["code"], "upstream_error", "{d}");
    assert_eq!(d["message"], "boom", "{d}");
    assert_eq!(d["retryable"], true, "{d}");

    // After an upstream_error the connection is reusable.
    let r = bad.roundtrip(&get("/healthz", ""));
    assert_eq!(r.status(), 200);

    let events = ok.events_to_end();
    assert_eq!(tokens_until_done(&events).len(), 5, "{events:?}");
    let d = events.last().unwrap().json();
    assert_eq!(d["finish_reason"], "stop", "{d}");
    assert_eq!(d["usage"]["completion_tokens"], 5, "{d}");
    assert_eq!(
        d["usage"]["prompt_tokens"], 7,
        "the backend's own figure: {d}"
    );

    let m = &srv.metrics;
    eventually(m, Duration::from_secs(3), "1 completed + 1 errored", || {
        load(&m.streams_completed) == 1
            && m.errored(sluice::sse::ErrorCode::UpstreamError) == 1
            && m.streams_open.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
    assert_eq!(stats.started(), 2);
}

fn check_json_answer(srv: &TestServer, req: &[u8], want_text: &str) {
    let mut c = srv.connect();
    let r = c.roundtrip(req);
    assert_eq!(r.status(), 200, "{}", r.text());
    assert_eq!(r.head.header("content-type"), Some("application/json"));
    assert_eq!(r.head.content_length(), Some(r.body.len()));
    assert!(!r.head.is_chunked());
    let v = r.json();
    assert_eq!(v["text"], want_text, "{v}");
    assert_eq!(v["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 1, "{v}");
    // Keep-alive after a JSON answer.
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
}

#[test]
fn non_streaming_answers_one_json_document() {
    let srv = start(FAST);
    let (_, events) = stream_events(srv.addr, &post_stream(r#"{"prompt":"hi","max_tokens":5}"#));
    let text: String = tokens_until_done(&events).concat();
    check_json_answer(
        &srv,
        &post_stream(r#"{"prompt":"hi","max_tokens":5,"stream":false}"#),
        &text,
    );
    check_json_answer(
        &srv,
        &get("/v1/chat/stream?prompt=hi&max_tokens=5&stream=false", ""),
        &text,
    );

    let off = start(&fast_with(&["--no-streaming"]));
    check_json_answer(
        &off,
        &post_stream(r#"{"prompt":"hi","max_tokens":5}"#),
        &text,
    );
    eventually(&off.metrics, Duration::from_secs(3), "completed", || {
        load(&off.metrics.streams_completed) == 1
    });
}

#[test]
fn tricky_token_texts_survive_framing() {
    let (backend, _stats) = TestBackend::create();
    let srv = start_with_backend(&[], backend);
    let (_, events) = stream_events(srv.addr, &post_stream(r#"{"prompt":"texts"}"#));
    let want: Vec<&str> = TRICKY_TEXTS
        .iter()
        .copied()
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(tokens_until_done(&events), want, "{events:?}");
    let d = events.last().unwrap().json();
    assert_eq!(d["usage"]["completion_tokens"], want.len(), "{d}");
}

#[test]
fn max_stream_ms_ends_with_deadline_exceeded_and_cancels() {
    let (backend, stats) = TestBackend::create();
    let srv = start_with_backend(&["--max-stream-ms", "300"], backend);
    let mut c = srv.connect();
    c.send(&post_stream(r#"{"prompt":"block"}"#));
    let head = c.read_head();
    let rid = head.header("x-request-id").unwrap().to_owned();
    let events = c.events_to_end();
    let last = events.last().expect("an event");
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(last.id.as_deref(), Some(format!("{rid}:1").as_str()));
    let d = last.json();
    assert_eq!(d["code"], "deadline_exceeded", "{d}");
    assert_eq!(d["retryable"], false, "{d}");
    eventually(
        &srv.metrics,
        Duration::from_secs(2),
        "backend cancelled",
        || stats.cancelled() == 1,
    );
    // The connection carries the next request.
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);

    // The same for the in-loop simulated model.
    let sim = start(&["--sim-ttft-ms", "5000", "--max-stream-ms", "200"]);
    let (_, events) = stream_events(sim.addr, &post_stream(r#"{"prompt":"hi"}"#));
    let last = events.last().expect("an event");
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(last.json()["code"], "deadline_exceeded");
    let m = &sim.metrics;
    eventually(m, Duration::from_secs(2), "errored", || {
        m.errored(sluice::sse::ErrorCode::DeadlineExceeded) == 1
            && m.streams_open.load(std::sync::atomic::Ordering::SeqCst) == 0
    });
}

#[test]
fn upstream_finish_reason_passes_through_and_unknown_prompt_count_is_omitted() {
    let (backend, _stats) = TestBackend::create();
    let srv = start_with_backend(&[], backend);
    let (_, events) = stream_events(
        srv.addr,
        &post_stream(r#"{"prompt":"reason content_filter"}"#),
    );
    assert_eq!(tokens_until_done(&events).len(), 1);
    let d = events.last().unwrap().json();
    assert_eq!(d["finish_reason"], "content_filter", "{d}");
    assert_eq!(d["usage"]["completion_tokens"], 1, "{d}");
    assert!(d["usage"].get("prompt_tokens").is_none(), "{d}");
}

#[test]
fn a_panicking_backend_ends_the_stream_with_internal() {
    let (backend, _stats) = TestBackend::create();
    let srv = start_with_backend(&["--workers", "1"], backend);
    let (_, events) = stream_events(srv.addr, &post_stream(r#"{"prompt":"panic"}"#));
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].token(), "tok0 ");
    let last = &events[1];
    assert_eq!(last.event, "error", "{last:?}");
    assert!(
        last.id.as_deref().is_some_and(|i| i.ends_with(":2")),
        "{last:?}"
    );
    let d = last.json();
    assert_eq!(d["code"], "internal", "{d}");
    assert_eq!(d["retryable"], false, "{d}");
    // The only worker survived the panic.
    let (_, events) = stream_events(srv.addr, &post_stream(r#"{"prompt":"tokens 2 0"}"#));
    assert_eq!(tokens_until_done(&events).len(), 2);
}

#[test]
fn tokens_are_sent_as_they_are_produced() {
    // Generous bound: 3 tokens 200 ms apart; the first must arrive well
    // before the end (not held back and flushed together with `done`).
    let (backend, _stats) = TestBackend::create();
    let srv = start_with_backend(&[], backend);
    let mut c = srv.connect();
    c.send(&post_stream(r#"{"prompt":"tokens 3 200"}"#));
    assert_eq!(c.read_head().status, 200);
    let first = c.next_event().expect("first token");
    let t0 = std::time::Instant::now();
    assert_eq!(first.token(), "tok0 ");
    let rest = c.events_to_end();
    assert_eq!(rest.len(), 3, "{rest:?}");
    assert_eq!(rest[2].event, "done");
    let gap = t0.elapsed();
    assert!(
        gap >= Duration::from_millis(150),
        "first token and done {gap:?} apart"
    );
}

#[test]
fn spinning_before_epoll_changes_nothing_on_the_wire() {
    // --spin-us polls without sleeping first: same events, same end, and
    // idle timers (heartbeats) still fire.
    let srv = start(&fast_with(&["--spin-us", "300", "--threads", "2"]));
    for _ in 0..3 {
        let (head, events) = stream_events(
            srv.addr,
            &post_stream(r#"{"prompt":"spin","max_tokens":4}"#),
        );
        assert_eq!(head.status, 200);
        assert_eq!(events.len(), 5, "{events:?}");
        assert_eq!(events[4].event, "done");
    }
}
