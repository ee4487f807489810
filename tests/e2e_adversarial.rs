//! End to end, over loopback: a table of hostile requests — smuggling
//! attempts (CL+TE, TE variants, conflicting lengths, obs-fold, space
//! before a colon), malformed heads, giant heads, truncated and odd chunked
//! bodies, pipelining abuse, half-closed sockets, slow heads — each with
//! the exact answers it gets and whether its connection survives, while a
//! well-behaved client streams beside them: its tokens arrive complete, in
//! order, and paced as usual. Then a few hundred idle connections (partial
//! heads and silent ones) against the same streaming client.

mod support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use support::*;

/// Small limits, so the giant cases stay small: 4 KiB heads, 16 KiB
/// bodies, a 1 s header timeout (the slow heads).
const FLAGS: &[&str] = &[
    "--sim-ttft-ms",
    "0",
    "--sim-itl-ms",
    "10",
    "--sim-tokens",
    "400",
    "--max-head-bytes",
    "4096",
    "--max-body-bytes",
    "16384",
    "--header-timeout-ms",
    "1000",
];
const CLOSE_WAIT: Duration = Duration::from_secs(4);
/// The well-behaved client's request (its tokens are known in advance).
const STEADY: &str = r#"{"prompt":"a steady client","max_tokens":250}"#;

/// What a connection does after its answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Then {
    /// It serves another request.
    Kept,
    /// The server closes it.
    Closed,
}

/// One hostile client: what it sends (and whether it half-closes after),
/// the statuses (and error codes) it gets, in order, and what follows.
struct Case {
    name: &'static str,
    send: Vec<u8>,
    half_close: bool,
    want: Vec<(u16, &'static str)>,
    then: Then,
}

fn case(
    name: &'static str,
    send: impl AsRef<[u8]>,
    want: &[(u16, &'static str)],
    then: Then,
) -> Case {
    Case {
        name,
        send: send.as_ref().to_vec(),
        half_close: false,
        want: want.to_vec(),
        then,
    }
}

/// A client that half-closes its side after sending: it gets no answer
/// (an incomplete request never will be one), and the server closes.
fn shut(name: &'static str, send: impl AsRef<[u8]>) -> Case {
    Case {
        half_close: true,
        ..case(name, send, &[], Then::Closed)
    }
}

const BAD: (u16, &str) = (400, "bad_request");
const OK: (u16, &str) = (200, "");

/// `POST /v1/chat/stream` with these header lines and raw body bytes.
fn post_raw(headers: &str, body: &str) -> String {
    format!("POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\n{headers}\r\n{body}")
}

fn chunked(body: &str) -> String {
    post_raw("Transfer-Encoding: chunked\r\n", body)
}

/// A one-token stream request's JSON and its length in hex.
fn json1() -> (&'static str, String) {
    let j = r#"{"prompt":"x","max_tokens":1}"#;
    (j, format!("{:x}", j.len()))
}

fn table() -> Vec<Case> {
    use Then::*;
    let (j, n) = json1();
    let jl = j.len();
    let healthz = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    vec![
        // ---- smuggling: both lengths, and every way of naming chunked
        case("CL then TE", post_raw(&format!("Content-Length: {jl}\r\nTransfer-Encoding: chunked\r\n"), &format!("{n}\r\n{j}\r\n0\r\n\r\n")), &[BAD], Closed),
        case("TE then CL", post_raw(&format!("Transfer-Encoding: chunked\r\nContent-Length: {jl}\r\n"), &format!("{n}\r\n{j}\r\n0\r\n\r\n")), &[BAD], Closed),
        case("CL 0 with TE", post_raw("Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"), &[BAD], Closed),
        case("TE chunked, chunked", post_raw("Transfer-Encoding: chunked, chunked\r\n", "0\r\n\r\n"), &[BAD], Closed),
        case("TE twice", post_raw("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"), &[BAD], Closed),
        case("TE gzip, chunked", post_raw("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"), &[BAD], Closed),
        case("TE chunked, identity", post_raw("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"), &[BAD], Closed),
        case("TE identity", post_raw("Transfer-Encoding: identity\r\n", ""), &[BAD], Closed),
        case("TE xchunked", post_raw("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"), &[BAD], Closed),
        case("TE chunked on HTTP/1.0", format!("POST /v1/chat/stream HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n{n}\r\n{j}\r\n0\r\n\r\n"), &[BAD], Closed),
        case("TE with a space before the colon", post_raw("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"), &[BAD], Closed),
        case("CL with a space before the colon", post_raw("Content-Length : 5\r\n", "hello"), &[BAD], Closed),
        case("TE folded onto the next line", post_raw("Transfer-Encoding:\r\n chunked\r\n", "0\r\n\r\n"), &[BAD], Closed),
        case("a folded header", post_raw("X-A: 1\r\n\t2\r\n", ""), &[BAD], Closed),
        case("a tab before the colon", post_raw("Content-Length\t: 5\r\n", "hello"), &[BAD], Closed),
        // Not chunked in any reading: Transfer_Encoding is another field, so
        // the body is empty and what follows is read as the next request.
        case("Transfer_Encoding is not Transfer-Encoding", post_raw("Transfer_Encoding: chunked\r\n", &format!("{n}\r\n{j}\r\n0\r\n\r\n")), &[BAD, BAD], Closed),
        case("TE chunked in odd case and spacing", post_raw("transfer-encoding:\tCHUNKED \r\n", &format!("{n}\r\n{j}\r\n0\r\n\r\n")), &[OK], Kept),
        // ---- conflicting and odd lengths
        case("two different CLs", post_raw("Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"), &[BAD], Closed),
        case("a CL list", post_raw("Content-Length: 5, 5\r\n", "hello"), &[BAD], Closed),
        case("a signed CL", post_raw("Content-Length: +5\r\n", "hello"), &[BAD], Closed),
        case("a hex CL", post_raw("Content-Length: 0x5\r\n", "hello"), &[BAD], Closed),
        case("an empty CL", post_raw("Content-Length:\r\n", ""), &[BAD], Closed),
        case("a CL past 64 bits", post_raw("Content-Length: 99999999999999999999999\r\n", ""), &[(413, "payload_too_large")], Closed),
        case("a CL over the limit", post_raw("Content-Length: 16385\r\n", ""), &[(413, "payload_too_large")], Closed),
        case("equal CLs twice", post_raw(&format!("Content-Length: {jl}\r\ncontent-length: {jl}\r\n"), j), &[OK], Kept),
        // ---- malformed heads
        case("garbage", "GARBAGE\r\n\r\n", &[BAD], Closed),
        case("binary noise", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", &[BAD], Closed),
        case("no version", "GET /healthz\r\n\r\n", &[BAD], Closed),
        case("an extra word in the request line", "GET /healthz HTTP/1.1 x\r\nHost: t\r\n\r\n", &[BAD], Closed),
        case("a bad method token", "G@T /healthz HTTP/1.1\r\nHost: t\r\n\r\n", &[BAD], Closed),
        case("a NUL in a header", "GET /healthz HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n", &[BAD], Closed),
        case("a control in the path", "GET /heal\x1bthz HTTP/1.1\r\nHost: t\r\n\r\n", &[BAD], Closed),
        case("a bare CR", "GET /healthz HTTP/1.1\r\nHost: t\rX: 1\r\n\r\n", &[BAD], Closed),
        case("a header without a colon", "GET /healthz HTTP/1.1\r\nHost: t\r\nNoColon\r\n\r\n", &[BAD], Closed),
        case("a header name with a space", "GET /healthz HTTP/1.1\r\nHost: t\r\nBad Name: 1\r\n\r\n", &[BAD], Closed),
        case("no Host", "GET /healthz HTTP/1.1\r\n\r\n", &[BAD], Closed),
        case("two Hosts", "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", &[BAD], Closed),
        case("HTTP/1.0 without Host", "GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", &[OK], Kept),
        case("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &[(505, "http_version_not_supported")], Closed),
        case("HTTP/1.2", "GET /healthz HTTP/1.2\r\nHost: t\r\n\r\n", &[(505, "http_version_not_supported")], Closed),
        case("an unknown expectation", "GET /healthz HTTP/1.1\r\nHost: t\r\nExpect: 200-ok\r\n\r\n", &[(417, "expectation_failed")], Closed),
        case("absolute form", "GET http://t/healthz HTTP/1.1\r\nHost: t\r\n\r\n", &[OK], Kept),
        case("100-continue to nowhere", "POST /nope HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n", &[(404, "not_found")], Closed),
        // ---- giant heads
        case("a 5 KiB header", format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "b".repeat(5000)), &[(431, "headers_too_large")], Closed),
        case("a 5 KiB path", format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "p".repeat(5000)), &[(431, "headers_too_large")], Closed),
        case("65 headers", format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{}\r\n", "A: b\r\n".repeat(64)), &[(431, "headers_too_large")], Closed),
        case("a head that never ends", "X".repeat(6000), &[(431, "headers_too_large")], Closed),
        // ---- odd chunked bodies
        case("chunk size in hex with leading zeros", chunked(&format!("000{n}\r\n{j}\r\n0000\r\n\r\n")), &[OK], Kept),
        case("chunk extensions", chunked(&format!("{n};a=b;c=\"d\"\r\n{j}\r\n0;e\r\n\r\n")), &[OK], Kept),
        case("a trailer", chunked(&format!("{n}\r\n{j}\r\n0\r\nX-Sum: 1\r\n\r\n")), &[OK], Kept),
        case("a 0x chunk size", chunked("0x1\r\nx\r\n0\r\n\r\n"), &[BAD], Closed),
        case("a negative chunk size", chunked("-1\r\nx\r\n0\r\n\r\n"), &[BAD], Closed),
        case("an empty chunk size", chunked("\r\nx\r\n0\r\n\r\n"), &[BAD], Closed),
        case("a chunk size past 64 bits", chunked("10000000000000000\r\n"), &[BAD], Closed),
        case("chunks over the body limit", chunked("4001\r\n"), &[(413, "payload_too_large")], Closed),
        case("chunk data longer than its size", chunked("1\r\nxy\r\n0\r\n\r\n"), &[BAD], Closed),
        case("a bare LF after a chunk size", chunked(&format!("{n}\n{j}\r\n0\r\n\r\n")), &[BAD], Closed),
        case("a bare LF after chunk data", chunked(&format!("{n}\r\n{j}\n0\r\n\r\n")), &[BAD], Closed),
        case("a bare LF ending the trailers", chunked(&format!("{n}\r\n{j}\r\n0\r\n\n")), &[BAD], Closed),
        case("a control in an extension", chunked("1;a\x01\r\nx\r\n0\r\n\r\n"), &[BAD], Closed),
        case("a 2 KiB extension", chunked(&format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(2048))), &[BAD], Closed),
        case("a trailer with a space before the colon", chunked(&format!("{n}\r\n{j}\r\n0\r\nX-Sum : 1\r\n\r\n")), &[BAD], Closed),
        case("a folded trailer", chunked(&format!("{n}\r\n{j}\r\n0\r\nX-A: 1\r\n 2\r\n\r\n")), &[BAD], Closed),
        case("a 9 KiB trailer", chunked(&format!("{n}\r\n{j}\r\n0\r\nX-T: {}\r\n\r\n", "t".repeat(9000))), &[(431, "headers_too_large")], Closed),
        // ---- truncated bodies: the client half-closes, the server closes
        shut("a truncated chunk", chunked("a\r\nabcde")),
        shut("no last chunk", chunked(&format!("{n}\r\n{j}\r\n"))),
        shut("no end of trailers", chunked(&format!("{n}\r\n{j}\r\n0\r\n"))),
        shut("a body shorter than its CL", post_raw("Content-Length: 100\r\n", "{\"prompt\":")),
        shut("a partial head", "GET /healthz HTTP/1.1\r\nHo"),
        shut("nothing at all", ""),
        // ---- half-closed after whole requests: answered, then closed
        Case { want: vec![OK], ..shut("a request then a FIN", healthz) },
        Case { want: vec![OK, OK, OK], ..shut("three requests then a FIN", healthz.repeat(3)) },
        Case { want: vec![OK], ..shut("a request, a partial one, a FIN", format!("{healthz}GET /hea")) },
        // ---- pipelining abuse
        case("100 pipelined requests", healthz.repeat(100), &[OK; 100], Kept),
        case("a good request then garbage", format!("{healthz}GARBAGE\r\n\r\n{healthz}"), &[OK, BAD], Closed),
        case("a stream then requests behind it", format!("{}{healthz}{healthz}", String::from_utf8(post_stream(j)).unwrap()), &[OK, OK, OK], Kept),
        case("a smuggled request in a body", post_raw(&format!("Content-Length: {}\r\n", healthz.len()), healthz), &[BAD], Kept),
        case("bad JSON then a good stream", format!("{}{}", post_raw("Content-Length: 1\r\n", "{"), post_raw(&format!("Content-Length: {jl}\r\n"), j)), &[BAD, OK], Kept),
        case("a request after Connection: close", format!("GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n{healthz}"), &[OK], Closed),
    ]
}

/// Runs one case on a fresh connection; what went wrong, if anything.
fn run(addr: SocketAddr, c: &Case) -> Option<String> {
    let mut cl = Client::connect(addr);
    cl.send(&c.send);
    if c.half_close {
        cl.shutdown_write();
    }
    let mut got = Vec::new();
    for &(status, code) in &c.want {
        let r = cl.read_response();
        if r.status() != status || (!code.is_empty() && r.error_code() != code) {
            return Some(format!(
                "answer {}: want {status} {code}, got {} {}",
                got.len(),
                r.status(),
                r.text()
            ));
        }
        got.push(r.status());
    }
    match c.then {
        Then::Kept => {
            let r = cl.roundtrip(&get("/healthz", ""));
            (r.status() != 200).then(|| format!("not kept: {}", r.status()))
        }
        Then::Closed => (!cl.closed_within(CLOSE_WAIT)).then(|| "not closed".to_string()),
    }
}

/// The well-behaved client: its stream, event by event, with the time
/// since the previous one.
fn steady_stream(addr: SocketAddr) -> Vec<(Event, Duration)> {
    let mut c = Client::connect(addr);
    c.send(&post_stream(STEADY));
    let head = c.read_head();
    assert_eq!(head.status, 200, "{head:?}");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while let Some(e) = c.next_event() {
        out.push((e, last.elapsed()));
        last = Instant::now();
    }
    out
}

/// Its tokens, asserting it ended with `done`; and its worst gap.
fn tokens_and_worst_gap(events: &[(Event, Duration)]) -> (Vec<String>, Duration) {
    let evs: Vec<Event> = events.iter().map(|(e, _)| e.clone()).collect();
    let tokens = tokens_until_done(&evs);
    let worst = events
        .iter()
        .skip(1)
        .map(|(_, d)| *d)
        .max()
        .unwrap_or_default();
    (tokens, worst)
}

#[test]
fn hostile_requests_get_exact_answers_while_a_stream_runs_beside_them() {
    let srv = start(FLAGS);
    // The reference: the same stream with nobody else around.
    let (reference, calm_gap) = tokens_and_worst_gap(&steady_stream(srv.addr));
    assert_eq!(reference.len(), 250);
    let addr = srv.addr;
    let beside = std::thread::spawn(move || steady_stream(addr));
    let started = Instant::now();
    let mut failures = String::new();
    let cases = table();
    for c in &cases {
        // A read that fails (the helpers panic) is this case's failure.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(srv.addr, c)));
        match outcome {
            Ok(None) => {}
            Ok(Some(why)) => {
                let _ = writeln!(failures, "{}: {why}", c.name);
            }
            Err(p) => {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let _ = writeln!(failures, "{}: {why}", c.name);
            }
        }
    }
    // Slow heads: a byte now and then, never finished: 408 at the header
    // timeout, and closed.
    let mut slow = srv.connect();
    for b in b"GET /healthz HTTP/1.1\r\n" {
        slow.send(std::slice::from_ref(b));
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = slow.read_response();
    if r.status() != 408 || r.error_code() != "request_timeout" || !slow.closed_within(CLOSE_WAIT) {
        let _ = writeln!(failures, "a slow head: {} {}", r.status(), r.text());
    }
    let took = started.elapsed();
    let events = beside.join().expect("the steady client");
    assert!(failures.is_empty(), "{} cases:\n{failures}", cases.len());
    let (tokens, worst) = tokens_and_worst_gap(&events);
    assert_eq!(tokens, reference, "the steady client's tokens changed");
    eprintln!(
        "{} hostile cases in {took:?}; the steady stream's worst gap {worst:?} (alone: {calm_gap:?})",
        cases.len()
    );
    // Normal pacing (10 ms a token): loose, for a debug build on two
    // shared cores; a stalled loop shows as seconds.
    assert!(worst < Duration::from_millis(250), "worst gap {worst:?}");
    let m = &srv.metrics;
    eventually(m, CLOSE_WAIT, "every hostile connection closed", || {
        m.connections_open.load(SeqCst) == 0
    });
    assert_eq!(m.streams_open.load(SeqCst), 0);
}

#[test]
fn hundreds_of_idle_connections_do_not_disturb_a_stream() {
    const SILENT: usize = 200;
    const PARTIAL: usize = 200;
    let srv = start(FLAGS);
    let m = &srv.metrics;
    let addr = srv.addr;
    let (reference, _) = tokens_and_worst_gap(&steady_stream(addr));
    let beside = std::thread::spawn(move || steady_stream(addr));
    let mut silent: Vec<Client> = (0..SILENT).map(|_| srv.connect()).collect();
    let mut partial: Vec<Client> = (0..PARTIAL).map(|_| srv.connect()).collect();
    for c in &mut partial {
        c.send(b"POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nContent-Le");
    }
    eventually(m, CLOSE_WAIT, "all connected", || {
        m.connections_open.load(SeqCst) as usize > SILENT + PARTIAL
    });
    // Others are served meanwhile.
    assert_eq!(srv.connect().roundtrip(&get("/healthz", "")).status(), 200);
    // The header timeout (1 s) answers every one of them 408 and closes it.
    for c in silent.iter_mut().chain(partial.iter_mut()).take(5) {
        let r = c.read_response();
        assert_eq!(r.status(), 408);
    }
    eventually(m, Duration::from_secs(5), "the idle ones closed", || {
        m.connections_open.load(SeqCst) <= 1
    });
    let events = beside.join().expect("the steady client");
    let (tokens, worst) = tokens_and_worst_gap(&events);
    assert_eq!(tokens, reference);
    eprintln!(
        "{} idle connections beside a stream: worst gap {worst:?}",
        SILENT + PARTIAL
    );
    assert!(worst < Duration::from_millis(250), "worst gap {worst:?}");
    drop(silent);
    drop(partial);
}
