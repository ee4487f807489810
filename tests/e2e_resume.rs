//! Resume and stop by id over real loopback sockets: a client that drops at
//! a random point and reconnects with the last id it saw gets the whole
//! answer exactly once (the simulated model and a scripted pool backend);
//! without the flag a disconnect still cancels at once; a stream stops by
//! id from another connection; a guessed id gets nothing.

mod support;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use support::*;

/// A small deterministic generator for cut points (no `rand` needed).
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Reads `cut` token events (or up to the end), then resets the socket.
/// Returns the stream id, the last seq seen and the tokens.
fn read_then_drop(c: &mut Client, cut: usize) -> (String, u64, Vec<String>) {
    let (sid, last, tokens, _) = read_then_drop_ends(c, cut);
    (sid, last, tokens)
}

/// [`read_then_drop`], and the terminal events it saw.
fn read_then_drop_ends(c: &mut Client, cut: usize) -> (String, u64, Vec<String>, Vec<Event>) {
    let head = c.read_head();
    assert_eq!(head.status, 200);
    let sid = head.header("x-stream-id").expect("X-Stream-Id").to_string();
    let mut last = 0;
    let mut tokens = Vec::new();
    let mut ends = Vec::new();
    while tokens.len() < cut {
        let Some(ev) = c.next_event() else { break };
        if let Some(id) = &ev.id {
            last = id.rsplit_once(':').unwrap().1.parse().unwrap();
        }
        match ev.event.as_str() {
            "token" => tokens.push(ev.token()),
            "done" | "error" => {
                ends.push(ev);
                break;
            }
            _ => {}
        }
    }
    (sid, last, tokens, ends)
}

/// Resumes `sid` after `last` on a new connection and reads to the end.
fn resume_to_end(addr: std::net::SocketAddr, sid: &str, last: u64) -> (Vec<String>, Vec<Event>) {
    let mut c = Client::connect(addr);
    c.send(&get(
        "/v1/chat/stream",
        &format!("Last-Event-ID: {sid}:{last}\r\n"),
    ));
    let head = c.read_head();
    assert_eq!(head.status, 200, "resume of {sid} after {last}");
    let evs = c.events_to_end();
    let tokens = evs
        .iter()
        .filter(|e| e.event == "token")
        .map(|e| e.token())
        .collect();
    (tokens, evs)
}

fn whole_answer(addr: std::net::SocketAddr, body: &str) -> Vec<String> {
    let (_, evs) = stream_events(addr, &post_stream(body));
    tokens_until_done(&evs)
}

#[test]
fn dropping_at_random_points_and_resuming_gives_every_token_once() {
    let srv = start(&[
        "--sim-ttft-ms",
        "5",
        "--sim-itl-ms",
        "2",
        "--resume-window-ms",
        "5000",
    ]);
    let body = r#"{"prompt":"a story to resume","max_tokens":40}"#;
    let want = whole_answer(srv.addr, body);
    assert_eq!(want.len(), 40);
    let mut rng = XorShift(0x5eed);
    // Every cut point from "before the first token" to "after done" can
    // come up; the last round always reads everything first.
    for round in 0..12 {
        let cut = if round == 11 {
            41
        } else {
            rng.below(42) as usize
        };
        let mut c = srv.connect();
        c.send(&post_stream(body));
        let (sid, last, mut got, mut ends) = read_then_drop_ends(&mut c, cut);
        c.reset();
        let (rest, evs) = resume_to_end(srv.addr, &sid, last);
        got.extend(rest);
        assert_eq!(got, want, "round {round}, cut {cut}, last {last}");
        ends.extend(
            evs.into_iter()
                .filter(|e| e.event == "done" || e.event == "error"),
        );
        assert_eq!(ends.len(), 1, "one terminal event");
        assert_eq!(ends[0].event, "done");
        assert_eq!(ends[0].id.as_deref(), Some(&*format!("{sid}:41")));
    }
    eventually(&srv.metrics, Duration::from_secs(5), "streams end", || {
        load(&srv.metrics.streams_completed) == 13
    });
    assert_eq!(srv.metrics.streams_disconnected.load(Relaxed), 0);
}

#[test]
fn a_pool_stream_resumes_after_a_drop_too() {
    let (backend, _stats) = TestBackend::create();
    let srv = start_with_backend(&["--resume-window-ms", "5000"], backend);
    // Six tokens, 15 ms apart, from a worker thread.
    let body = r#"{"prompt":"tokens 6 15"}"#;
    let want = whole_answer(srv.addr, body);
    assert_eq!(want.len(), 6, "the script's tokens: {want:?}");
    for cut in [0, 2, 4, 6] {
        let mut c = srv.connect();
        c.send(&post_stream(body));
        let (sid, last, mut got) = read_then_drop(&mut c, cut);
        c.reset();
        let (rest, _) = resume_to_end(srv.addr, &sid, last);
        got.extend(rest);
        assert_eq!(got, want, "cut {cut}");
    }
}

#[test]
fn without_the_flag_a_drop_cancels_at_once_and_resume_finds_nothing() {
    let srv = start(&["--sim-ttft-ms", "5", "--sim-itl-ms", "20"]);
    let mut c = srv.connect();
    c.send(&post_stream(r#"{"prompt":"x","max_tokens":50}"#));
    let (sid, last, _) = read_then_drop(&mut c, 2);
    c.reset();
    eventually(&srv.metrics, Duration::from_secs(5), "cancelled", || {
        load(&srv.metrics.streams_disconnected) == 1
    });
    let mut c = srv.connect();
    let r = c.roundtrip(&get(
        "/v1/chat/stream",
        &format!("Last-Event-ID: {sid}:{last}\r\n"),
    ));
    assert_eq!(r.status(), 204);
    let r = c.roundtrip(&get(&format!("/v1/chat/stream/{sid}?after=0"), ""));
    assert_eq!(r.status(), 404);
    assert_eq!(r.error_code(), "stream_not_found");
}

#[test]
fn a_stream_stops_by_id_from_another_connection_and_guesses_find_nothing() {
    let srv = start(&["--sim-ttft-ms", "5", "--sim-itl-ms", "20"]);
    let mut c = srv.connect();
    c.send(&post_stream(r#"{"prompt":"x","max_tokens":200}"#));
    let head = c.read_head();
    let sid = head.header("x-stream-id").unwrap().to_string();
    assert_eq!(sid.len(), 22, "{sid}");
    c.next_event().expect("a first token");
    let mut other = srv.connect();
    for guess in ["AAAAAAAAAAAAAAAAAAAAAA", &sid[..21], "1000"] {
        let r = other.roundtrip(&post(&format!("/v1/chat/stream/{guess}/cancel"), "", ""));
        assert_eq!(r.status(), 404, "{guess}");
        let r = other.roundtrip(&get(&format!("/v1/chat/stream/{guess}"), ""));
        assert_eq!(r.status(), 404, "{guess}");
    }
    let r = other.roundtrip(&post(&format!("/v1/chat/stream/{sid}/cancel"), "", ""));
    assert_eq!(r.status(), 200, "{}", r.text());
    let evs = c.events_to_end();
    let last = evs.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.json()["code"], "cancelled");
    assert_eq!(last.json()["retryable"], false);
    eventually(&srv.metrics, Duration::from_secs(5), "counted", || {
        srv.metrics.errored(sluice::sse::ErrorCode::Cancelled) == 1
    });
}
