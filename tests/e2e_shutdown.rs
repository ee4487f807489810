//! End to end: graceful shutdown (in process through the shutdown handle,
//! and the binary on SIGTERM): readyz 503, new streams 503 `shutting_down`,
//! running streams finish within `--drain-ms`, the rest end with
//! `shutting_down`, then the loop returns / the process exits 0.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc;
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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SLUICE_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args([
            "--listen",
            "127.0.0.1:0",
            "--sim-ttft-ms",
            "0",
            "--sim-itl-ms",
            "20",
            "--drain-ms",
            "5000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr: SocketAddr = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(a) => a.parse().expect("ADDR:PORT"),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no listening line: {e}");
        }
    };
    let outcome = std::panic::catch_unwind(|| {
        let mut running = Client::connect(addr);
        running.send(&post_stream(r#"{"prompt":"hi","max_tokens":10}"#));
        assert_eq!(running.read_head().status, 200);
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let events = running.events_to_end();
        assert_eq!(tokens_until_done(&events).len(), 10, "{events:?}");
    });
    let status = wait_until(Duration::from_secs(4), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !status {
        let _ = child.kill();
    }
    let code = child.wait().expect("wait");
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
    assert!(status, "sluice did not exit within 4 s of the last stream");
    assert!(code.success(), "exit status {code:?}");
}
