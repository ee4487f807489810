//! End to end: graceful shutdown (in process through the shutdown handle,
//! and the binary on SIGTERM): readyz 503, new streams 503 `shutting_down`,
//! running streams finish within `--drain-ms`, the rest end with
//! `shutting_down`, then the loop returns / the process exits 0.

mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn running_streams_finish_during_the_drain_and_new_ones_are_refused() {
    let mut srv = start(&[
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "30",
        "--drain-ms",
        "5000",
    ]);
    let mut running = srv.connect();
    running.send(&post_stream(r#"{"prompt":"hi","max_tokens":20}"#));
    assert_eq!(running.read_head().status, 200);
    assert_eq!(running.next_event().unwrap().event, "token");
    // An idle keep-alive connection opened before the shutdown.
    let mut idle = srv.connect();
    assert_eq!(idle.roundtrip(&get("/healthz", "")).status(), 200);

    srv.shut_down();
    // Fresh connections: while draining the server closes connections after
    // each response (see the ignored tests below).
    let ready = || srv.connect().roundtrip(&get("/readyz", "")).status();
    eventually(&srv.metrics, Duration::from_secs(3), "readyz 503", || {
        ready() == 503
    });
    assert_eq!(srv.connect().roundtrip(&get("/healthz", "")).status(), 200);
    let r = srv.connect().roundtrip(&post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(r.status(), 503, "{}", r.text());
    assert_eq!(r.error_code(), "shutting_down");
    assert!(r.head.header("retry-after").is_some(), "{:?}", r.head);
    let c = srv.connect();

    // The running stream completes normally.
    let events = running.events_to_end();
    assert_eq!(tokens_until_done(&events).len(), 19, "{events:?}");
    // Then the loop returns, well before the 5 s drain time.
    let t = Instant::now();
    drop(c);
    drop(idle);
    drop(running);
    srv.join(Duration::from_secs(4)).expect("clean exit");
    assert!(t.elapsed() < Duration::from_secs(4));
    assert_eq!(load(&srv.metrics.streams_completed), 1);
}

/// A server draining, with one stream holding it open.
fn draining_server() -> (TestServer, Client) {
    let srv = start(&["--sim-ttft-ms", "10000", "--drain-ms", "10000"]);
    let mut running = srv.connect();
    running.send(&post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(running.read_head().status, 200);
    srv.shut_down();
    eventually(&srv.metrics, Duration::from_secs(3), "readyz 503", || {
        srv.connect().roundtrip(&get("/readyz", "")).status() == 503
    });
    (srv, running)
}

#[test]
fn responses_while_draining_announce_the_close() {
    let (srv, _running) = draining_server();
    for req in [
        get("/healthz", ""),
        get("/readyz", ""),
        post_stream(r#"{"prompt":"hi"}"#),
    ] {
        let mut c = srv.connect();
        let r = c.roundtrip(&req);
        let closed = c.closed_within(Duration::from_secs(2));
        assert!(
            !closed || r.head.closes(),
            "{} {}: closed without Connection: close; head {:?}",
            r.status(),
            r.text(),
            r.head
        );
    }
}

#[test]
fn shutting_down_refusal_keeps_the_connection() {
    let (srv, _running) = draining_server();
    let mut c = srv.connect();
    let r = c.roundtrip(&post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(r.status(), 503);
    assert_eq!(r.error_code(), "shutting_down");
    assert!(!r.head.closes(), "{:?}", r.head);
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
}

#[test]
fn streams_still_running_after_the_drain_end_with_shutting_down() {
    let (backend, stats) = TestBackend::create();
    let mut srv = start_with_backend(&["--drain-ms", "200"], backend);
    let mut pool = srv.connect();
    pool.send(&post_stream(r#"{"prompt":"block"}"#));
    assert_eq!(pool.read_head().status, 200);
    eventually(&srv.metrics, Duration::from_secs(3), "started", || {
        stats.started() == 1
    });

    let t = Instant::now();
    srv.shut_down();
    let events = pool.events_to_end();
    let last = events.last().expect("an event");
    assert_eq!(last.event, "error", "{events:?}");
    assert!(
        last.id.as_deref().is_some_and(|i| i.ends_with(":1")),
        "{last:?}"
    );
    let d = last.json();
    assert_eq!(d["code"], "shutting_down", "{d}");
    assert_eq!(d["retryable"], true, "{d}");
    assert!(
        pool.closed_within(Duration::from_secs(3)),
        "closes after shutting_down"
    );
    eventually(
        &srv.metrics,
        Duration::from_secs(2),
        "backend cancelled",
        || stats.cancelled() == 1,
    );
    srv.join(Duration::from_secs(3)).expect("clean exit");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let m = &srv.metrics;
    assert_eq!(m.errored(sluice::sse::ErrorCode::ShuttingDown), 1);
    assert_eq!(m.streams_open.load(SeqCst), 0);
}

#[test]
fn an_idle_server_stops_at_once() {
    let mut srv = start(&["--drain-ms", "10000"]);
    let mut c = srv.connect();
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
    drop(c);
    srv.shut_down();
    srv.join(Duration::from_secs(3)).expect("clean exit");
}

#[test]
fn the_binary_drains_and_exits_zero_on_sigterm() {
    let mut bin = Binary::spawn(
        &[
            "--sim-ttft-ms",
            "0",
            "--sim-itl-ms",
            "20",
            "--drain-ms",
            "5000",
            "--log-level",
            "info",
        ],
        &[],
    );
    let mut running = Client::connect(bin.addr);
    running.send(&post_stream(r#"{"prompt":"hi","max_tokens":10}"#));
    assert_eq!(running.read_head().status, 200);
    bin.sigterm();
    let events = running.events_to_end();
    assert_eq!(tokens_until_done(&events).len(), 10, "{events:?}");
    let status = bin.exit_within(Duration::from_secs(4));
    let status = status.unwrap_or_else(|| {
        panic!(
            "sluice did not exit within 4 s of the last stream; stderr: {:?}",
            bin.log()
        )
    });
    assert!(status.success(), "exit status {status:?}");
    // The loop's last line, logged just before the process exits, reaches
    // stderr: main flushes the log before exiting.
    assert!(
        wait_until(Duration::from_secs(3), || bin.stderr_ended()),
        "stderr still open after the exit"
    );
    let log = bin.log();
    assert!(
        log.iter().any(|l| l.ends_with("shutdown complete")),
        "no `shutdown complete` line on stderr: {log:?}"
    );
}

/// SIGTERM while 100 streams run: half of them (20 tokens, ~0.4 s) finish
/// within the 1.5 s drain with `done`, the other half (200 tokens, ~4 s)
/// end with `error` `shutting_down`; every body ends with its last chunk;
/// `/readyz` answers 503 meanwhile; the process exits 0 soon after.
#[test]
fn sigterm_during_100_streams_ends_every_one_with_done_or_shutting_down() {
    const N: usize = 100;
    const DRAIN: Duration = Duration::from_millis(1500);
    const SHORT: usize = 20;
    const LONG: usize = 200;
    let drain_ms = DRAIN.as_millis().to_string();
    let mut bin = Binary::spawn(
        &[
            "--sim-ttft-ms",
            "0",
            "--sim-itl-ms",
            "20",
            "--sim-tokens",
            "200",
            "--drain-ms",
            &drain_ms,
            "--log-level",
            "warn",
        ],
        &[],
    );
    let addr = bin.addr;
    let wanted = |i: usize| if i.is_multiple_of(2) { SHORT } else { LONG };

    // All 100 streams running: each has sent its head and first token.
    let mut clients: Vec<Client> = (0..N)
        .map(|i| {
            let mut c = Client::connect(addr);
            let body = format!(r#"{{"prompt":"story {i}","max_tokens":{}}}"#, wanted(i));
            c.send(&post_stream(&body));
            c
        })
        .collect();
    let mut first = Vec::with_capacity(N);
    for (i, c) in clients.iter_mut().enumerate() {
        let head = c.read_head();
        assert_eq!(head.status, 200, "stream {i}: {head:?}");
        assert!(head.is_chunked(), "stream {i}: {head:?}");
        let ev = c.next_event().expect("a first event");
        assert_eq!(ev.event, "token", "stream {i}: {ev:?}");
        first.push(ev);
    }

    let t0 = Instant::now();
    bin.sigterm();

    // While draining: /readyz 503 and new streams 503 on fresh connections.
    let ready = || {
        Client::connect(addr)
            .roundtrip(&get("/readyz", ""))
            .status()
    };
    assert!(
        wait_until(Duration::from_secs(3), || ready() == 503),
        "/readyz never answered 503 after SIGTERM; stderr: {:?}",
        bin.log()
    );
    let r = Client::connect(addr).roundtrip(&post_stream(r#"{"prompt":"late"}"#));
    assert_eq!(r.status(), 503, "{}", r.text());
    assert_eq!(r.error_code(), "shutting_down");

    // Every client reads to the end of a properly ended chunked body (the
    // reader panics on a close before the last chunk) and sees exactly one
    // terminal event, last.
    let (mut done, mut shut) = (0, 0);
    for (i, (c, first)) in clients.iter_mut().zip(first).enumerate() {
        let mut events = vec![first];
        events.extend(c.events_to_end());
        let terminal: Vec<&Event> = events
            .iter()
            .filter(|e| e.event == "done" || e.event == "error")
            .collect();
        assert_eq!(terminal.len(), 1, "stream {i}: {events:?}");
        let last = events.last().unwrap();
        assert_eq!(last, terminal[0], "stream {i}: terminal not last");
        assert!(
            last.id.as_deref().is_some_and(|id| id.contains(':')),
            "stream {i}: terminal id {last:?}"
        );
        let tokens = events.iter().filter(|e| e.event == "token").count();
        let d = last.json();
        if wanted(i) == SHORT {
            // ~0.4 s of tokens: finishes within the drain.
            assert_eq!(last.event, "done", "stream {i}: {d}");
            assert_eq!(tokens, SHORT, "stream {i}");
            assert_eq!(d["finish_reason"], "length", "stream {i}: {d}");
            assert_eq!(d["usage"]["completion_tokens"], SHORT, "stream {i}: {d}");
            done += 1;
        } else {
            // ~4 s of tokens: cut by the end of the drain.
            assert_eq!(last.event, "error", "stream {i}: {d}");
            assert_eq!(d["code"], "shutting_down", "stream {i}: {d}");
            assert_eq!(d["retryable"], true, "stream {i}: {d}");
            assert!(tokens < LONG, "stream {i}: {tokens} tokens");
            assert!(
                c.closed_within(Duration::from_secs(3)),
                "stream {i}: connection kept after shutting_down"
            );
            shut += 1;
        }
    }
    assert_eq!((done, shut), (N / 2, N / 2));

    // The process exits 0: not before the drain time (streams were still
    // running), and at most about a second after it (2.5 s allowed here).
    let deadline = t0 + DRAIN + Duration::from_millis(2500);
    let status = bin.exit_within(deadline.saturating_duration_since(Instant::now()));
    let elapsed = t0.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!(
            "sluice still running {elapsed:?} after SIGTERM; stderr: {:?}",
            bin.log()
        )
    });
    assert!(
        status.success(),
        "exit status {status:?}; stderr: {:?}",
        bin.log()
    );
    assert!(elapsed >= DRAIN, "exited {elapsed:?} after SIGTERM");
}
