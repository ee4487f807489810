//! End to end with `--backend openai` against the scripted fake upstream of
//! `tests/support/fake_upstream.rs`: relaying deltas (every framing, line
//! ending and split), prompt assembly, the error events, cancellation and
//! backpressure reaching the upstream, connection reuse, `/readyz`, and the
//! non-streaming answer.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice::sse::ErrorCode;
use support::fake_upstream::{error_body, token_text, FakeUpstream, Framing, Script, StreamSpec};
use support::*;

const WAIT: Duration = Duration::from_secs(5);
/// The cancel → upstream-close bound asserted (typically a few ms).
const CANCEL_BOUND: Duration = Duration::from_secs(1);

fn sluice(fake: &FakeUpstream, flags: &[&str]) -> TestServer {
    sluice_at(&fake.url(), flags)
}

fn sluice_at(url: &str, flags: &[&str]) -> TestServer {
    let mut all = vec!["--backend", "openai", "--upstream-url", url];
    all.extend_from_slice(flags);
    start(&all)
}

/// `POST /v1/chat/stream` with one user message.
fn ask(prompt: &str) -> Vec<u8> {
    post_stream(&json!({ "prompt": prompt }).to_string())
}

fn expected(n: usize, size: usize) -> Vec<String> {
    (0..n).map(|i| token_text(i, size)).collect()
}

/// The stream id: `X-Request-Id` is the stream's id when the client sent none.
fn sid(head: &Head) -> String {
    head.header("x-request-id")
        .expect("X-Request-Id")
        .to_owned()
}

/// Asserts exactly `tokens` as token events, then `done` with the terminal
/// id; returns the `done` data.
fn assert_done(head: &Head, events: &[Event], tokens: &[String]) -> Value {
    assert!(
        events
            .iter()
            .all(|e| e.event == "token" || e.event == "done"),
        "{events:?}"
    );
    assert_eq!(tokens_until_done(events), tokens);
    let last = events.last().unwrap();
    assert_eq!(
        last.id,
        Some(format!("{}:{}", sid(head), tokens.len() + 1)),
        "{last:?}"
    );
    last.json()
}

/// Asserts `n` tokens (`tok0é `…) then an `error` event with the terminal id
/// `<sid>:<n+1>`, `code`, `retryable` and `upstream_status`; returns its data.
fn assert_error(
    head: &Head,
    events: &[Event],
    n: usize,
    code: ErrorCode,
    retryable: bool,
    status: Option<u16>,
) -> Value {
    let (last, rest) = events.split_last().expect("at least one event");
    assert_eq!(last.event, "error", "{events:?}");
    assert!(rest.iter().all(|e| e.event == "token"), "{events:?}");
    let tokens: Vec<String> = rest.iter().map(Event::token).collect();
    assert_eq!(tokens, expected(n, 0));
    assert_eq!(
        last.id,
        Some(format!("{}:{}", sid(head), n + 1)),
        "{last:?}"
    );
    let v = last.json();
    assert_eq!(v["code"], code.as_str(), "{v}");
    assert_eq!(v["retryable"], retryable, "{v}");
    match status {
        Some(s) => assert_eq!(v["upstream_status"], s, "{v}"),
        None => assert!(v.get("upstream_status").is_none(), "{v}"),
    }
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v
}

/// A good answer: its tokens take ~100 ms.
const GOOD: usize = 10;
fn good() -> Script {
    Script::Stream(StreamSpec {
        chunks: GOOD,
        delay_ms: 10,
        ..StreamSpec::default()
    })
}

/// Runs `prompt` (routed to a failing script) with a good stream running
/// alongside on the same server, then checks that the same client
/// connection carries a good request afterwards. Returns the failing
/// stream's head, events and duration.
fn run_failing(srv: &TestServer, prompt: &str) -> (Head, Vec<Event>, Duration) {
    let addr = srv.addr;
    let alongside = std::thread::spawn(move || stream_events(addr, &ask("good")));
    let mut c = srv.connect();
    let t0 = Instant::now();
    c.send(&ask(prompt));
    let head = c.read_head();
    assert_eq!(head.status, 200, "{head:?}");
    let events = c.events_to_end();
    let took = t0.elapsed();

    c.send(&ask("good"));
    let h2 = c.read_head();
    assert_eq!(h2.status, 200, "{h2:?}");
    assert_done(&h2, &c.events_to_end(), &expected(GOOD, 0));

    let (h3, e3) = alongside.join().expect("the stream alongside");
    assert_done(&h3, &e3, &expected(GOOD, 0));
    (head, events, took)
}

/// A fake whose default is [`good`] and whose "bad" requests get `script`.
fn failing_fake(script: Script) -> FakeUpstream {
    let fake = FakeUpstream::start(good());
    fake.route("bad", script);
    fake
}

/// A port nothing listens on.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ------------------------------------------------------------------ relaying

#[test]
fn content_deltas_become_tokens_in_order_then_done_with_usage() {
    let fake = FakeUpstream::start(Script::Stream(StreamSpec {
        chunks: 5,
        role_first: true,
        empty_deltas: true,
        usage: Some((11, 5)),
        ..StreamSpec::default()
    }));
    let srv = sluice(&fake, &[]);
    let (head, events) = stream_events(srv.addr, &ask("hi"));
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    // Role-only and empty deltas are not tokens: 5 tokens and done, nothing else.
    assert_eq!(events.len(), 6, "{events:?}");
    let done = assert_done(&head, &events, &expected(5, 0));
    assert_eq!(done["finish_reason"], "stop", "{done}");
    assert_eq!(
        done["usage"],
        json!({"prompt_tokens": 11, "completion_tokens": 5}),
        "{done}"
    );
    assert!(done["ttft_ms"].is_number(), "{done}");
    let m = &srv.metrics;
    eventually(m, WAIT, "one completed stream", || {
        load(&m.streams_completed) == 1 && m.streams_open.load(SeqCst) == 0
    });
    assert_eq!(load(&m.tokens_sent), 5);
}

#[test]
fn usage_figures_are_the_upstreams_own() {
    // Upstream token counts differ from the pieces relayed (a chunk may
    // hold several model tokens): the prompt count is the upstream's.
    let fake = FakeUpstream::start(Script::Stream(StreamSpec {
        chunks: 3,
        usage: Some((20, 9)),
        ..StreamSpec::default()
    }));
    let srv = sluice(&fake, &[]);
    let (head, events) = stream_events(srv.addr, &ask("hi"));
    let done = assert_done(&head, &events, &expected(3, 0));
    assert_eq!(done["usage"]["prompt_tokens"], 20, "{done}");
    // The contract: the native `done` counts the token events sent; the
    // upstream's own completion count shows on the OpenAI endpoint.
    assert_eq!(done["usage"]["completion_tokens"], 3, "{done}");
}

#[test]
fn without_a_usage_chunk_completion_counts_the_tokens_and_prompt_is_absent() {
    let fake = FakeUpstream::start(Script::Stream(StreamSpec {
        chunks: 4,
        usage: None,
        finish_reason: Some("content_filter".into()),
        ..StreamSpec::default()
    }));
    let srv = sluice(&fake, &[]);
    let (head, events) = stream_events(srv.addr, &ask("hi"));
    let done = assert_done(&head, &events, &expected(4, 0));
    // The upstream's own finish reason passes through.
    assert_eq!(done["finish_reason"], "content_filter", "{done}");
    assert_eq!(done["usage"], json!({"completion_tokens": 4}), "{done}");
}

#[test]
fn every_framing_line_ending_and_split_relays_the_same_tokens() {
    let fake = FakeUpstream::start(Script::chunks(1));
    let srv = sluice(&fake, &[]);
    let mut runs = 0;
    for framing in [Framing::Chunked, Framing::Length, Framing::Close] {
        for crlf in [false, true] {
            for split in [false, true] {
                let spec = StreamSpec {
                    chunks: 4,
                    framing,
                    crlf,
                    split_events: split,
                    comments: crlf != split,
                    role_first: true,
                    empty_deltas: true,
                    usage: Some((3, 4)),
                    ..StreamSpec::default()
                };
                let case = format!("{spec:?}");
                eprintln!("case {case}");
                fake.set_default(Script::Stream(spec));
                let (head, events) = stream_events(srv.addr, &ask("hi"));
                assert_eq!(events.len(), 5, "{case}: {events:?}");
                let done = assert_done(&head, &events, &expected(4, 0));
                assert_eq!(done["finish_reason"], "stop", "{case}: {done}");
                assert_eq!(
                    done["usage"],
                    json!({"prompt_tokens": 3, "completion_tokens": 4}),
                    "{case}: {done}"
                );
                runs += 1;
            }
        }
    }
    assert_eq!(fake.served(), runs);
    assert_eq!(load(&srv.metrics.streams_completed), runs as u64);
}

// ------------------------------------------------------------------ the request

#[test]
fn the_forwarded_request_carries_the_assembled_prompt() {
    let fake = FakeUpstream::start(Script::chunks(1));
    let srv = sluice(
        &fake,
        &[
            "--system-prompt",
            "Be brief.",
            "--upstream-model",
            "served-model",
            "--upstream-key",
            "sk-test-123",
        ],
    );
    let messages = json!([
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "tell me more"}
    ]);
    let body = json!({
        "messages": messages, "max_tokens": 7, "temperature": 0.5,
        "stop": ["\n\n", "END"], "model": "client-model"
    });
    let (head, events) = stream_events(srv.addr, &post_stream(&body.to_string()));
    assert_done(&head, &events, &expected(1, 0));

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("host"), Some(fake.addr.to_string().as_str()));
    assert_eq!(r.header("authorization"), Some("Bearer sk-test-123"));
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{r:?}"
    );
    let b = &r.body;
    let mut want_messages = vec![json!({"role": "system", "content": "Be brief."})];
    want_messages.extend(messages.as_array().unwrap().iter().cloned());
    assert_eq!(b["messages"], Value::Array(want_messages), "{b}");
    assert_eq!(b["model"], "served-model", "{b}");
    assert_eq!(b["max_tokens"], 7, "{b}");
    assert_eq!(b["temperature"], 0.5, "{b}");
    assert_eq!(b["stop"], json!(["\n\n", "END"]), "{b}");
    assert_eq!(b["stream"], true, "{b}");
    assert_eq!(b["stream_options"]["include_usage"], true, "{b}");
}

#[test]
fn without_upstream_flags_the_requests_own_fields_are_forwarded() {
    let fake = FakeUpstream::start(Script::chunks(2));
    let srv = sluice(&fake, &[]);
    let body = json!({
        "messages": [{"role": "user", "content": "q"}],
        "model": "client-model", "max_tokens": 3
    });
    let (head, events) = stream_events(srv.addr, &post_stream(&body.to_string()));
    assert_done(&head, &events, &expected(2, 0));
    // The prompt shorthand is one user message.
    let (head, events) = stream_events(srv.addr, &ask("just a prompt"));
    assert_done(&head, &events, &expected(2, 0));

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let b = &reqs[0].body;
    assert_eq!(b["model"], "client-model", "{b}");
    assert_eq!(
        b["messages"],
        json!([{"role": "user", "content": "q"}]),
        "{b}"
    );
    assert_eq!(b["max_tokens"], 3, "{b}");
    assert!(b.get("temperature").is_none(), "{b}");
    assert_eq!(b["stream"], true, "{b}");
    assert_eq!(reqs[0].header("authorization"), None);
    assert_eq!(
        reqs[1].body["messages"],
        json!([{"role": "user", "content": "just a prompt"}]),
        "{}",
        reqs[1].body
    );
}

// ------------------------------------------------------------------ errors

#[test]
fn connection_refused_is_upstream_unavailable() {
    let url = format!("http://{}/v1", closed_port());
    let srv = sluice_at(&url, &[]);
    let t0 = Instant::now();
    let (head, events) = stream_events(srv.addr, &ask("hi"));
    assert_error(
        &head,
        &events,
        0,
        ErrorCode::UpstreamUnavailable,
        true,
        None,
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let m = &srv.metrics;
    eventually(m, WAIT, "the stream counted as errored", || {
        m.errored(ErrorCode::UpstreamUnavailable) == 1
    });
}

#[test]
fn upstream_statuses_are_upstream_errors_with_the_upstreams_message() {
    let fake = FakeUpstream::start(good());
    fake.route(
        "e500",
        Script::Status(500, error_body("the model crashed", "server_error")),
    );
    fake.route(
        "e429",
        Script::Status(429, error_body("slow down", "rate_limit_exceeded")),
    );
    fake.route(
        "e400",
        Script::Status(400, error_body("context too long", "invalid_request_error")),
    );
    let srv = sluice(&fake, &[]);
    for (prompt, status, retryable, message) in [
        ("e500", 500, true, "the model crashed"),
        ("e429", 429, true, "slow down"),
        ("e400", 400, false, "context too long"),
    ] {
        let (head, events, _) = run_failing(&srv, prompt);
        let v = assert_error(
            &head,
            &events,
            0,
            ErrorCode::UpstreamError,
            retryable,
            Some(status),
        );
        assert_eq!(v["message"], message, "{v}");
    }
    assert_eq!(srv.metrics.errored(ErrorCode::UpstreamError), 3);
}

#[test]
fn a_reset_mid_stream_is_an_upstream_error_after_the_tokens_sent() {
    let fake = failing_fake(Script::ResetMidStream { after: 3 });
    let srv = sluice(&fake, &[]);
    let (head, events, _) = run_failing(&srv, "bad");
    assert_error(&head, &events, 3, ErrorCode::UpstreamError, true, None);
}

#[test]
fn malformed_json_mid_stream_is_an_upstream_error() {
    let fake = failing_fake(Script::MalformedJson { after: 2 });
    let srv = sluice(&fake, &[]);
    let (head, events, took) = run_failing(&srv, "bad");
    assert_error(&head, &events, 2, ErrorCode::UpstreamError, true, None);
    // sluice gave up by itself (the fake keeps the connection open 5 s).
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn a_stall_beyond_the_read_timeout_is_upstream_timeout() {
    let fake = failing_fake(Script::Stall { after: 2 });
    let srv = sluice(&fake, &["--upstream-read-timeout-ms", "300"]);
    let (head, events, took) = run_failing(&srv, "bad");
    assert_error(&head, &events, 2, ErrorCode::UpstreamTimeout, true, None);
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The timed-out upstream connection is closed, not reused.
    let fake_ref = &fake;
    eventually(&srv.metrics, WAIT, "the stalled connection closed", || {
        fake_ref.gone().len() == 1
    });
}

#[test]
fn a_stream_that_ends_without_done_is_an_upstream_error() {
    for framing in [Framing::Chunked, Framing::Close] {
        let fake = failing_fake(Script::NoDone { after: 2, framing });
        let srv = sluice(&fake, &[]);
        let (head, events, _) = run_failing(&srv, "bad");
        assert_error(&head, &events, 2, ErrorCode::UpstreamError, true, None);
    }
}

#[test]
fn an_upstream_closing_before_answering_is_an_upstream_error() {
    let fake = failing_fake(Script::CloseBeforeHead);
    let srv = sluice(&fake, &[]);
    let (head, events, _) = run_failing(&srv, "bad");
    assert_error(&head, &events, 0, ErrorCode::UpstreamError, true, None);
}

/// One SSE event carrying content chunk `i`.
fn content_event(i: usize) -> String {
    let chunk = json!({"choices": [{"delta": {"content": token_text(i, 0)}}]});
    format!("data: {chunk}\n\n")
}

/// `text` as one HTTP chunk.
fn http_chunk(text: &str) -> String {
    format!("{:x}\r\n{text}\r\n", text.len())
}

#[test]
fn a_response_framed_ambiguously_is_refused_not_guessed() {
    let ok = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n";
    let body = http_chunk(&content_event(0));
    // (head fields, body, tokens relayed before the refusal)
    let cases = [
        ("Transfer-Encoding: gzip, chunked\r\n", body.clone(), 0),
        ("Transfer-Encoding: chunked, gzip\r\n", body.clone(), 0),
        ("Transfer-Encoding: xchunked\r\n", body.clone(), 0),
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 40\r\n",
            body.clone(),
            0,
        ),
        (
            "Content-Length: 40\r\nContent-Length: 41\r\n",
            content_event(0),
            0,
        ),
        ("Content-Length: 4O\r\n", content_event(0), 0),
        // A bare LF in the chunked framing, after one good chunk.
        (
            "Transfer-Encoding: chunked\r\n",
            format!(
                "{body}{:x}\n{}\r\n",
                content_event(1).len(),
                content_event(1)
            ),
            1,
        ),
        // Chunk data longer than its size line says.
        (
            "Transfer-Encoding: chunked\r\n",
            format!("{body}3\r\n{}\r\n", content_event(1)),
            1,
        ),
    ];
    for (fields, body, tokens) in cases {
        let raw = format!("{ok}{fields}\r\n{body}");
        let fake = failing_fake(Script::Raw(raw.clone().into_bytes()));
        let srv = sluice(&fake, &[]);
        let (head, events, _) = run_failing(&srv, "bad");
        let v = assert_error(&head, &events, tokens, ErrorCode::UpstreamError, true, None);
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("bad response from the upstream")),
            "{raw:?}: {v}"
        );
    }
}

#[test]
fn chunk_extensions_trailers_and_interim_responses_are_read_through() {
    let mut raw = String::from(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
         Transfer-Encoding: chunked\r\nConnection: keep-alive, Upgrade-Insecure\r\n\r\n",
    );
    for i in 0..3 {
        let ev = content_event(i);
        raw.push_str(&format!("{:x};name=\"v{i}\"\r\n{ev}\r\n", ev.len()));
    }
    raw.push_str(&http_chunk("data: [DONE]\n\n"));
    raw.push_str("0\r\nX-Trailer: done\r\n\r\n");
    let fake = failing_fake(Script::Raw(raw.into_bytes()));
    let srv = sluice(&fake, &[]);
    let (head, events) = stream_events(srv.addr, &ask("bad"));
    assert_done(&head, &events, &expected(3, 0));
}

// ------------------------------------------------------------------ cancellation

/// Waits for the fake to see connection number `n` (1-based) closed and
/// returns how long after `left` that was.
fn upstream_closed_after(
    fake: &FakeUpstream,
    srv: &TestServer,
    n: usize,
    left: Instant,
) -> Duration {
    eventually(&srv.metrics, WAIT, "the upstream connection closed", || {
        fake.gone().len() >= n
    });
    let at = fake.gone()[n - 1];
    at.saturating_duration_since(left)
}

#[test]
fn a_client_leaving_mid_stream_closes_the_upstream_connection_at_once() {
    // 400 chunks 20 ms apart: 8 s if nobody cancelled it.
    let fake = FakeUpstream::start(Script::Stream(StreamSpec {
        chunks: 400,
        delay_ms: 20,
        ..StreamSpec::default()
    }));
    let srv = sluice(&fake, &[]);
    let m = &srv.metrics;
    let mut times = Vec::new();
    for round in 1..=3 {
        let mut c = srv.connect();
        c.send(&ask("long"));
        assert_eq!(c.read_head().status, 200);
        for i in 0..3 {
            assert_eq!(c.next_event().expect("a token").token(), token_text(i, 0));
        }
        let left = Instant::now();
        if round == 2 {
            c.reset();
        } else {
            drop(c);
        }
        let took = upstream_closed_after(&fake, &srv, round, left);
        times.push(took);
        assert!(took < CANCEL_BOUND, "round {round}: {took:?}");
        eventually(m, WAIT, "the stream counted as disconnected", || {
            load(&m.streams_disconnected) == round as u64
        });
    }
    // Each connection stopped writing when the fake saw it closed (every
    // round waited for that): what was written is final.
    let written = fake.written();
    assert!(written < 3 * 20, "written {written}");
    assert_eq!(load(&m.generations_cancelled), 3);
    eprintln!("mid-stream cancel → upstream close: {times:?}");
}

#[test]
fn a_client_leaving_while_the_worker_waits_for_upstream_bytes_closes_it() {
    let fake = FakeUpstream::start(Script::Stall { after: 1 });
    let srv = sluice(&fake, &[]);
    let mut times = Vec::new();
    for round in 1..=2 {
        let mut c = srv.connect();
        c.send(&ask("stall"));
        assert_eq!(c.read_head().status, 200);
        assert_eq!(c.next_event().expect("a token").token(), token_text(0, 0));
        // Let the worker block in its read of the silent upstream.
        std::thread::sleep(Duration::from_millis(100));
        let left = Instant::now();
        if round == 2 {
            c.reset();
        } else {
            drop(c);
        }
        let took = upstream_closed_after(&fake, &srv, round, left);
        times.push(took);
        assert!(took < CANCEL_BOUND, "round {round}: {took:?}");
    }
    let m = &srv.metrics;
    eventually(m, WAIT, "both streams disconnected, none errored", || {
        load(&m.streams_disconnected) == 2 && m.streams_open.load(SeqCst) == 0
    });
    assert!(
        ErrorCode::ALL.iter().all(|c| m.errored(*c) == 0),
        "{}",
        metrics_summary(m)
    );
    eprintln!("stalled-read cancel → upstream close: {times:?}");
}

#[test]
fn a_queued_request_whose_client_leaves_is_never_sent_upstream() {
    let fake = FakeUpstream::start(Script::chunks(2));
    fake.route("hold", Script::Stall { after: 1 });
    let srv = sluice(&fake, &["--workers", "1"]);
    let m = &srv.metrics;

    let mut a = srv.connect();
    a.send(&ask("hold"));
    assert_eq!(a.read_head().status, 200);
    assert_eq!(a.next_event().expect("a token").token(), token_text(0, 0));
    assert_eq!(fake.served(), 1);

    let mut b = srv.connect();
    b.send(&ask("queued"));
    assert_eq!(b.read_head().status, 200);
    drop(b);
    eventually(m, WAIT, "the queued stream disconnected", || {
        load(&m.streams_disconnected) == 1 && m.streams_open.load(SeqCst) == 1
    });

    fake.release();
    let events = a.events_to_end();
    assert_eq!(tokens_until_done(&events), Vec::<String>::new());
    // The cancel took the job out of the queue at once.
    assert_eq!(load(&m.jobs_dropped_queued), 1);
    assert_eq!(fake.served(), 1, "the queued request reached the upstream");

    // The worker is free again, and the next request it sends is the new
    // one (the dropped one was never sent).
    let (head, events) = stream_events(srv.addr, &ask("after"));
    assert_done(&head, &events, &expected(2, 0));
    assert_eq!(fake.served(), 2);
    assert_eq!(fake.requests()[1].last_message(), "after");
}

// ------------------------------------------------------------------ backpressure

#[test]
fn a_client_that_does_not_read_holds_the_upstream_back() {
    const N: usize = 4000;
    const SIZE: usize = 4096;
    let fake = FakeUpstream::start(Script::Stream(StreamSpec {
        chunks: N,
        text_size: SIZE,
        role_first: true,
        usage: Some((1, N as u32)),
        ..StreamSpec::default()
    }));
    fake.set_send_buffer(16 * 1024);
    let srv = sluice(&fake, &["--max-tokens-limit", "100000"]);
    let mut c = Client::connect_small_rcvbuf(srv.addr, 16 * 1024);
    c.send(&ask("flood"));

    // Read nothing: the fake's writes must stall well before its total.
    let deadline = Instant::now() + Duration::from_secs(8);
    let (w1, w2) = loop {
        std::thread::sleep(Duration::from_millis(200));
        let w1 = fake.written();
        std::thread::sleep(Duration::from_millis(300));
        let w2 = fake.written();
        if (w1 == w2 && w1 > 0) || Instant::now() > deadline {
            break (w1, w2);
        }
    };
    assert!(w1 > 0, "the upstream never started writing");
    assert_eq!(
        w1, w2,
        "the upstream kept writing to a client that reads nothing"
    );
    assert!(w2 < N / 2, "written {w2} of {N}: no backpressure");
    eprintln!("upstream stalled after {w2} of {N} chunks of {SIZE} bytes");

    // Now read everything: every token, in order, then done.
    let head = c.read_head();
    assert_eq!(head.status, 200);
    let mut n = 0;
    let done = loop {
        let e = c.next_event().expect("an event");
        if e.event != "token" {
            break e;
        }
        assert_eq!(e.token(), token_text(n, SIZE), "token {n}");
        n += 1;
    };
    assert_eq!(n, N);
    assert_eq!(done.event, "done", "{done:?}");
    assert_eq!(done.json()["usage"]["completion_tokens"], N);
    assert!(c.next_event().is_none());
    assert_eq!(fake.written(), N);
}

// ------------------------------------------------------------------ connections

#[test]
fn sequential_generations_reuse_one_upstream_connection() {
    let fake = FakeUpstream::start(Script::chunks(3));
    let srv = sluice(&fake, &[]);
    for framing in [Framing::Chunked, Framing::Length, Framing::Chunked] {
        fake.set_default(Script::Stream(StreamSpec {
            chunks: 3,
            framing,
            ..StreamSpec::default()
        }));
        let (head, events) = stream_events(srv.addr, &ask("hi"));
        assert_done(&head, &events, &expected(3, 0));
    }
    assert_eq!(fake.served(), 3);
    // (accepted() also counts the reachability probe's connections.)
    assert_eq!(fake.request_connections(), 1, "{:?}", fake.requests());
}

#[test]
fn an_upstream_closing_idle_connections_is_retried_transparently() {
    let fake = FakeUpstream::start(Script::chunks(3));
    fake.set_close_after_response(true);
    let srv = sluice(&fake, &[]);
    for round in 0..3 {
        let (head, events) = stream_events(srv.addr, &ask("hi"));
        assert_done(&head, &events, &expected(3, 0));
        // Round 1 reuses a connection the fake has closed already; round 2
        // one it may be closing.
        if round == 0 {
            eventually(&srv.metrics, WAIT, "the fake's close", || {
                fake.closed_after_response() == 1
            });
        }
    }
    assert_eq!(fake.served(), 3);
    assert_eq!(fake.request_connections(), 3);
    assert!(
        ErrorCode::ALL.iter().all(|c| srv.metrics.errored(*c) == 0),
        "{}",
        metrics_summary(&srv.metrics)
    );
}

// ------------------------------------------------------------------ readiness

fn readyz(addr: SocketAddr) -> u16 {
    Client::connect(addr)
        .roundtrip(&get("/readyz", ""))
        .status()
}

#[test]
fn readyz_turns_503_once_the_upstream_stops_listening() {
    let mut fake = FakeUpstream::start(Script::chunks(1));
    let srv = sluice(&fake, &[]);
    assert_eq!(readyz(srv.addr), 200);
    fake.stop_listening();
    let t0 = Instant::now();
    eventually(&srv.metrics, Duration::from_secs(5), "/readyz 503", || {
        readyz(srv.addr) == 503
    });
    eprintln!("/readyz turned 503 after {:?}", t0.elapsed());
    // A stream now fails to connect.
    let (head, events) = stream_events(srv.addr, &ask("hi"));
    assert_error(
        &head,
        &events,
        0,
        ErrorCode::UpstreamUnavailable,
        true,
        None,
    );
}

// ------------------------------------------------------------------ non-streaming

#[test]
fn stream_false_gives_one_json_answer() {
    let fake = FakeUpstream::start(Script::Stream(StreamSpec {
        chunks: 4,
        usage: Some((6, 4)),
        ..StreamSpec::default()
    }));
    let srv = sluice(&fake, &[]);
    let r = srv
        .connect()
        .roundtrip(&post_stream(r#"{"prompt":"hi","stream":false}"#));
    assert_eq!(r.status(), 200, "{}", r.text());
    assert!(
        r.head
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{:?}",
        r.head
    );
    let v = r.json();
    assert_eq!(v["text"], expected(4, 0).concat(), "{v}");
    assert_eq!(v["finish_reason"], "stop", "{v}");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 4}),
        "{v}"
    );
    assert_eq!(fake.requests()[0].body["stream"], true);
}

#[test]
fn stream_false_with_a_failing_upstream_is_one_json_error() {
    let fake = FakeUpstream::start(Script::Status(500, error_body("down", "server_error")));
    let srv = sluice(&fake, &[]);
    let r = srv
        .connect()
        .roundtrip(&post_stream(r#"{"prompt":"hi","stream":false}"#));
    assert_eq!(r.status(), 502, "{}", r.text());
    assert_eq!(r.error_code(), "upstream_error");
}

// ------------------------------------------------------------------ more timing

#[test]
fn a_silent_upstream_on_a_reused_connection_times_out_without_resending() {
    let fake = FakeUpstream::start(Script::chunks(2));
    fake.route("silent", Script::Silent);
    let srv = sluice(&fake, &["--upstream-read-timeout-ms", "300"]);
    let (head, events) = stream_events(srv.addr, &ask("warm up"));
    assert_done(&head, &events, &expected(2, 0));
    // The next generation goes out on the pooled connection; the upstream
    // took the request and says nothing.
    let t0 = Instant::now();
    let (head, events) = stream_events(srv.addr, &ask("silent"));
    let took = t0.elapsed();
    assert_error(&head, &events, 0, ErrorCode::UpstreamTimeout, true, None);
    // A resend would have been read by the fake during its own 300 ms wait,
    // before this error was sent.
    assert_eq!(
        fake.served(),
        2,
        "the timed-out request was sent upstream again: {:?}",
        fake.requests()
            .iter()
            .map(|r| (r.conn, r.last_message()))
            .collect::<Vec<_>>()
    );
    // The resend is caught by the count above; the time is only bounded
    // (loosely: a loaded 2-core machine must not make this flake).
    assert!(
        took < Duration::from_secs(3),
        "a 300 ms read timeout took {took:?}"
    );
}

#[test]
fn heartbeats_while_queued_and_while_the_upstream_is_silent() {
    let fake = FakeUpstream::start(Script::chunks(2));
    fake.route("hold", Script::Stall { after: 0 });
    let srv = sluice(&fake, &["--workers", "1", "--heartbeat-ms", "100"]);

    let mut a = srv.connect();
    a.send(&ask("hold"));
    assert_eq!(a.read_head().status, 200);
    let e = a.next_event().expect("a heartbeat");
    assert_eq!(e.event, "heartbeat", "{e:?}");
    assert_eq!(e.json()["phase"], "generating", "{e:?}");

    let mut b = srv.connect();
    b.send(&ask("queued"));
    assert_eq!(b.read_head().status, 200);
    let e = b.next_event().expect("a heartbeat");
    assert_eq!(e.event, "heartbeat", "{e:?}");
    assert_eq!(e.json()["phase"], "queued", "{e:?}");

    fake.release();
    let events: Vec<Event> = a
        .events_to_end()
        .into_iter()
        .filter(|e| e.event != "heartbeat")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "done", "{events:?}");
    let toks: Vec<String> = b
        .events_to_end()
        .iter()
        .filter(|e| e.event == "token")
        .map(Event::token)
        .collect();
    assert_eq!(toks, expected(2, 0));
}

#[test]
fn slow_consumer_and_deadline_errors_close_the_upstream_connection() {
    // A stream longer than --max-stream-ms on a stalled upstream.
    let fake = FakeUpstream::start(Script::Stall { after: 1 });
    let srv = sluice(&fake, &["--max-stream-ms", "300"]);
    let (head, events) = stream_events(srv.addr, &ask("stall"));
    assert_error(&head, &events, 1, ErrorCode::DeadlineExceeded, false, None);
    let ended = Instant::now();
    let took = upstream_closed_after(&fake, &srv, 1, ended - Duration::from_millis(50));
    assert!(took < CANCEL_BOUND, "{took:?}");

    // A client that reads nothing, dropped as slow_consumer.
    let fake = FakeUpstream::start(Script::Stream(StreamSpec {
        chunks: 4000,
        text_size: 4096,
        ..StreamSpec::default()
    }));
    fake.set_send_buffer(16 * 1024);
    let srv = sluice(
        &fake,
        &["--write-timeout-ms", "300", "--max-tokens-limit", "100000"],
    );
    let mut c = Client::connect_small_rcvbuf(srv.addr, 16 * 1024);
    c.send(&ask("flood"));
    let m = &srv.metrics;
    eventually(m, WAIT, "slow_consumer", || {
        m.errored(ErrorCode::SlowConsumer) == 1
    });
    let dropped = Instant::now();
    let took = upstream_closed_after(&fake, &srv, 1, dropped - Duration::from_millis(50));
    assert!(took < CANCEL_BOUND, "{took:?}");
    assert!(fake.written() < 4000);
    drop(c);
}

#[test]
fn an_error_event_mid_stream_is_an_upstream_error_with_its_message() {
    let fake = failing_fake(Script::ErrorEvent {
        after: 2,
        message: "the model went away".into(),
    });
    let srv = sluice(&fake, &[]);
    let (head, events, _) = run_failing(&srv, "bad");
    let v = assert_error(&head, &events, 2, ErrorCode::UpstreamError, true, None);
    assert_eq!(v["message"], "the model went away", "{v}");
}

#[test]
fn done_is_sent_when_the_upstream_sends_done_not_when_its_body_ends() {
    // An upstream that sends `[DONE]` and finishes its HTTP body later.
    let fake = FakeUpstream::start(Script::Stream(StreamSpec {
        chunks: 2,
        tail_delay_ms: 2000,
        ..StreamSpec::default()
    }));
    let srv = sluice(&fake, &[]);
    let t0 = Instant::now();
    let (head, events) = stream_events(srv.addr, &ask("hi"));
    let took = t0.elapsed();
    assert_done(&head, &events, &expected(2, 0));
    // The upstream ends its body 2 s after [DONE]: done must not wait for it.
    assert!(
        took < Duration::from_millis(1800),
        "done came after {took:?}"
    );
}

/// A loopback listener whose accept queue is full, so a connect to it hangs
/// (the kernel drops the SYNs) until the connect timeout.
fn unanswering_listener() -> (socket2::Socket, Vec<socket2::Socket>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let fill = (0..3)
        .map(|_| {
            let c = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            c.set_nonblocking(true).unwrap();
            let _ = c.connect(&addr.into());
            c
        })
        .collect();
    (l, fill, addr)
}

#[test]
fn a_client_leaving_while_the_upstream_connect_hangs_frees_the_worker() {
    let (_listener, _fill, addr) = unanswering_listener();
    let url = format!("http://{addr}/v1");
    let srv = sluice_at(
        &url,
        &["--workers", "1", "--upstream-connect-timeout-ms", "30000"],
    );
    let mut first = srv.connect();
    first.send(&ask("one"));
    assert_eq!(first.read_head().status, 200);
    eventually(
        &srv.metrics,
        Duration::from_secs(3),
        "first started",
        || srv.metrics.queue_wait.count() == 1,
    );
    drop(first);
    // The only worker was blocked in connect: it must give up within
    // milliseconds, not after the 30 s connect timeout, and take the next job.
    let mut second = srv.connect();
    second.send(&ask("two"));
    assert_eq!(second.read_head().status, 200);
    eventually(
        &srv.metrics,
        Duration::from_secs(3),
        "second started",
        || srv.metrics.queue_wait.count() == 2,
    );
}
