//! `--threads 2` over real loopback sockets: resume and stop by id find a
//! stream owned by the other loop (the connection is handed over; a test
//! picks its connections by the loop that serves them, so every case
//! really crosses loops), `--max-connections` holds for the process, a
//! drain ends both loops' streams, and a second process on the same port
//! fails with "address in use".
//!
//! Which loop serves a connection is read from the answer: a request
//! without `X-Request-Id` is named by the id a stream would get, whose
//! first character names the loop (`A` for loop 0, `B` for loop 1).

mod support;

use std::io::Read;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(10);

/// The loop serving `c` (`'A'` or `'B'`), from a `/healthz` round trip.
fn loop_of(c: &mut Client) -> char {
    let r = c.roundtrip(&get("/healthz", ""));
    assert_eq!(r.status(), 200);
    let rid = r.head.header("x-request-id").expect("X-Request-Id");
    rid.chars().next().unwrap()
}

/// `n` kept-alive connections served by each loop: `[loop 0's, loop 1's]`.
/// The kernel gives each new connection to whichever loop accepts first,
/// so this connects until both have `n` (the other connections close).
fn clients_by_loop(srv: &TestServer, n: usize) -> [Vec<Client>; 2] {
    let mut by_loop: [Vec<Client>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..2000 {
        if by_loop.iter().all(|v| v.len() >= n) {
            return by_loop;
        }
        let mut c = srv.connect();
        let i = match loop_of(&mut c) {
            'A' => 0,
            'B' => 1,
            other => panic!("a third loop? {other}"),
        };
        if by_loop[i].len() < n {
            by_loop[i].push(c);
        }
    }
    panic!(
        "2,000 connections and still not {n} on each loop: {} and {}",
        by_loop[0].len(),
        by_loop[1].len()
    );
}

/// Reads a stream's head and `n` tokens; its id and the last seq seen.
fn head_and_tokens(c: &mut Client, n: usize) -> (String, u64, Vec<String>) {
    let head = c.read_head();
    assert_eq!(head.status, 200);
    let sid = head.header("x-stream-id").expect("X-Stream-Id").to_string();
    let mut tokens = Vec::new();
    let mut last = 0;
    while tokens.len() < n {
        let ev = c.next_event().expect("a token");
        if ev.event == "token" {
            tokens.push(ev.token());
            last = ev
                .id
                .as_deref()
                .map_or(last, |id| id.rsplit_once(':').unwrap().1.parse().unwrap());
        }
    }
    (sid, last, tokens)
}

#[test]
fn a_stream_of_the_other_loop_is_resumed_by_last_event_id_and_by_path() {
    let srv = start(&[
        "--threads",
        "2",
        "--resume-window-ms",
        "30000",
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "5",
        "--sim-tokens",
        "30",
    ]);
    let body = r#"{"prompt":"threads"}"#;
    let [mut on_a, mut on_b] = clients_by_loop(&srv, 2);
    // The whole answer, for comparison (the simulated model is deterministic).
    let mut whole = on_a.pop().unwrap();
    whole.send(&post_stream(body));
    let (_, _, mut want) = head_and_tokens(&mut whole, 1);
    want.extend(
        whole
            .events_to_end()
            .iter()
            .filter(|e| e.event == "token")
            .map(|e| e.token()),
    );
    assert_eq!(want.len(), 30);

    // Started on loop 0, dropped after 3 tokens.
    let mut first = on_a.pop().unwrap();
    first.send(&post_stream(body));
    let (sid, last, mut got) = head_and_tokens(&mut first, 3);
    assert!(sid.starts_with('A'), "loop 0's stream: {sid}");
    assert_eq!(last, 3);
    first.reset();

    // Resumed from loop 1 with Last-Event-ID: handed to loop 0, the rest
    // exactly once, in order. (A stream that finished in the meantime is
    // still replayed whole from its log: no timing matters here.)
    let mut again = on_b.pop().unwrap();
    again.send(&get(
        "/v1/chat/stream",
        &format!("Last-Event-ID: {sid}:{last}\r\n"),
    ));
    let head = again.read_head();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-stream-id"), Some(sid.as_str()));
    let evs = again.events_to_end();
    got.extend(evs.iter().filter(|e| e.event == "token").map(|e| e.token()));
    assert_eq!(got, want);
    let end = evs.last().expect("a terminal event");
    assert_eq!(end.event, "done");
    assert_eq!(end.id.as_deref(), Some(format!("{sid}:31").as_str()));
    // The connection now lives on loop 0.
    assert_eq!(loop_of(&mut again), 'A');

    // By path, from loop 1 again: the answer after token 10.
    let mut by_path = on_b.pop().unwrap();
    by_path.send(&get(&format!("/v1/chat/stream/{sid}?after=10"), ""));
    assert_eq!(by_path.read_head().status, 200);
    let tokens: Vec<String> = by_path
        .events_to_end()
        .iter()
        .filter(|e| e.event == "token")
        .map(|e| e.token())
        .collect();
    assert_eq!(tokens, want[10..]);
    assert_eq!(load(&srv.metrics.connections_handed_over), 2);
    assert_eq!(load(&srv.metrics.resumes), 2);
}

#[test]
fn a_stream_of_the_other_loop_is_stopped_by_id() {
    // One token, then a minute's wait: the stream runs until it is stopped.
    let srv = start(&[
        "--threads",
        "2",
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "60000",
        "--sim-tokens",
        "2",
    ]);
    let [mut on_a, mut on_b] = clients_by_loop(&srv, 1);
    let mut streaming = on_b.pop().unwrap();
    streaming.send(&post_stream(r#"{"prompt":"stop me"}"#));
    let (sid, _, _) = head_and_tokens(&mut streaming, 1);
    assert!(sid.starts_with('B'), "loop 1's stream: {sid}");

    // From loop 0, behind a pipelined request: both answered, in order.
    let mut stopper = on_a.pop().unwrap();
    let cancel = post(&format!("/v1/chat/stream/{sid}/cancel"), "", "");
    let mut both = get("/healthz", "X-Request-Id: first\r\n");
    both.extend_from_slice(&cancel);
    stopper.send(&both);
    let r = stopper.read_response();
    assert_eq!(
        (r.status(), r.head.header("x-request-id")),
        (200, Some("first"))
    );
    let r = stopper.read_response();
    assert_eq!(r.status(), 200, "{}", r.text());
    let evs = streaming.events_to_end();
    let end = evs.last().expect("a terminal event");
    assert_eq!(end.event, "error");
    assert_eq!(end.json()["code"], "cancelled");
    // Handed over to loop 1, and kept alive there.
    assert_eq!(loop_of(&mut stopper), 'B');
    assert_eq!(load(&srv.metrics.connections_handed_over), 1);

    // Nothing left to stop, whichever loop is asked.
    let [mut on_a, mut on_b] = clients_by_loop(&srv, 1);
    for c in [&mut on_a[0], &mut on_b[0]] {
        let r = c.roundtrip(&cancel);
        assert_eq!(r.status(), 404);
        assert_eq!(r.error_code(), "stream_not_found");
    }
    assert_eq!(load(&srv.metrics.cancels), 1);
}

#[test]
fn max_connections_counts_both_loops() {
    let srv = start(&[
        "--threads",
        "2",
        "--max-connections",
        "4",
        "--header-timeout-ms",
        "600000",
    ]);
    let m = &srv.metrics;
    // Four connections that sent nothing (so none is idle to evict).
    let mut held: Vec<Client> = (0..4).map(|_| srv.connect()).collect();
    eventually(m, WAIT, "four connections accepted", || {
        m.connections_open.load(SeqCst) == 4
    });
    // A fifth waits in the backlog, unserved, whichever loop has fewer.
    let mut fifth = srv.connect();
    fifth.send(&get("/healthz", ""));
    fifth
        .sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        fifth.sock.read(&mut byte).is_err(),
        "the fifth connection was served at the limit"
    );
    assert_eq!(load(&m.connections_accepted), 4);
    assert_eq!(m.connections_open.load(SeqCst), 4);
    // One leaves: the fifth is accepted and answered.
    fifth.sock.set_read_timeout(Some(WAIT)).unwrap();
    drop(held.pop());
    assert_eq!(fifth.read_response().status(), 200);
    assert_eq!(load(&m.connections_accepted), 5);
    assert_eq!(load(&m.connections_evicted), 0);
}

#[test]
fn a_drain_ends_the_streams_of_both_loops() {
    let mut srv = start(&[
        "--threads",
        "2",
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "60000",
        "--sim-tokens",
        "2",
        "--drain-ms",
        "600000",
    ]);
    let [mut on_a, mut on_b] = clients_by_loop(&srv, 2);
    let mut streams = Vec::new();
    for (clients, name) in [(&mut on_a, 'A'), (&mut on_b, 'B')] {
        let mut c = clients.pop().unwrap();
        c.send(&post_stream(r#"{"prompt":"drain"}"#));
        let (sid, _, _) = head_and_tokens(&mut c, 1);
        assert!(sid.starts_with(name), "{sid}");
        streams.push(c);
    }
    srv.shut_down();
    for c in [&mut on_a[0], &mut on_b[0]] {
        let mut status = 0;
        assert!(wait_until(WAIT, || {
            status = c.roundtrip(&get("/readyz", "")).status();
            status == 503
        }));
    }
    // The second shutdown ends the drain at once.
    srv.shut_down();
    for c in &mut streams {
        let evs = c.events_to_end();
        let end = evs.last().expect("a terminal event");
        assert_eq!(end.json()["code"], "shutting_down");
    }
    srv.join(WAIT).expect("both loops ended");
    assert_eq!(srv.metrics.errored(sluice::sse::ErrorCode::ShuttingDown), 2);
}

#[test]
fn a_second_process_on_the_port_fails_with_address_in_use() {
    let srv = start(&["--threads", "2"]);
    let listen = srv.addr.to_string();
    let mut child = sluice_command()
        .args(["--listen", &listen, "--threads", "2"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let mut status = None;
    let exited = wait_until(WAIT, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("a second process bound {listen}");
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.unwrap().code(), Some(1), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("address already in use"),
        "{stderr}"
    );
    // The first one serves on.
    let mut c = srv.connect();
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
}
