//! End to end, over loopback: the findings of issue 10 (a client behaving
//! as an attacker would), one regression test each. Chunk framing is
//! counted and bounded; a server-wide budget holds buffered request bytes;
//! idle keep-alive connections make room at the connection limit, and
//! connections per address are limited; routing is bounded per loop turn;
//! HEAD has no body; chunked framing wants CRLF and trailers are checked;
//! the log cannot be forged; absolute-form targets, `Host`, `Expect` and
//! `100 Continue`; the "accepting paused" warning is rate-limited.
//!
//! Memory is read from the real binary's VmHWM (its peak), with budgets
//! small enough for CI; the figures of the full-size floods are in the
//! README ("Limits and hostile clients").

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use support::*;

const MIB: u64 = 1024;
const FAST: &[&str] = &["--sim-ttft-ms", "0", "--sim-itl-ms", "1"];
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// The binary, logging errors only.
fn spawn(args: &[&str]) -> Binary {
    let mut all = vec!["--log-level", "error"];
    all.extend_from_slice(args);
    Binary::spawn(&all, &[])
}

/// The peak resident memory of the binary so far, in KiB.
fn hwm(bin: &Binary) -> u64 {
    proc_kib(bin.pid(), "VmHWM")
}

/// `/healthz` answers within `limit`; how long it took.
fn healthz_within(addr: SocketAddr, limit: Duration) -> Duration {
    let t = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(limit)).unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    assert!(
        s.starts_with("HTTP/1.1 200"),
        "no /healthz answer within {limit:?}: {s:?}"
    );
    t.elapsed()
}

/// The binary's metrics (a fresh connection, closed after).
fn scrape(addr: SocketAddr) -> String {
    let r = Client::connect(addr).roundtrip(&get("/metrics", "Connection: close\r\n"));
    assert_eq!(r.status(), 200);
    r.text()
}

/// Sends `head`, then `piece` again and again until `total` bytes or a
/// failed write, then `tail`; half-closes when `shut`, and reads what the
/// server answered until it closes.
fn upload(
    addr: SocketAddr,
    head: &[u8],
    piece: &[u8],
    total: usize,
    tail: &[u8],
    shut: bool,
) -> Vec<u8> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(head).unwrap();
    let mut sent = 0;
    while sent < total {
        if c.write_all(piece).is_err() {
            break;
        }
        sent += piece.len();
    }
    let _ = c.write_all(tail);
    if shut {
        let _ = c.shutdown(std::net::Shutdown::Write);
    }
    let mut all = Vec::new();
    let _ = c.read_to_end(&mut all);
    all
}

// ------------------------------------------------------ 1. chunk framing

#[test]
fn chunk_framing_is_counted_and_bounded() {
    let bin = spawn(&["--max-body-bytes", "4194304"]);
    healthz_within(bin.addr, Duration::from_secs(5));
    let before = hwm(&bin);
    let head = b"POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    // 1-byte chunks with 1 KiB extensions: before, all of it was kept
    // until the body ended. Now it is refused after 16 KiB of extensions,
    // and the rest is read and dropped.
    let abusive = format!("1;{}\r\nx\r\n", "e".repeat(1000)).repeat(64);
    let answer = upload(bin.addr, head, abusive.as_bytes(), 32 << 20, b"", true);
    let rs = parse_responses(&answer);
    assert_eq!(rs.len(), 1, "{:?}", String::from_utf8_lossy(&answer));
    assert_eq!(rs[0].status(), 400);
    assert_eq!(rs[0].error_code(), "bad_request");
    assert!(rs[0].text().contains("chunk extensions too large"));
    assert!(rs[0].head.closes());
    let grew = hwm(&bin) - before;
    eprintln!("32 MiB of 1-byte chunks with 1 KiB extensions: peak +{grew} KiB");
    assert!(
        grew < 12 * MIB,
        "32 MiB of framing grew the peak by {grew} KiB"
    );

    // Fair framing, 6 bytes for each byte of body: 18 MiB of it for a
    // 3 MiB body (JSON whitespace), decoded as it arrives.
    let open = r#"{"prompt":"hi","max_tokens":2"#;
    let mut body = format!("{:x}\r\n{open}\r\n", open.len());
    body.push_str(&"1\r\n \r\n".repeat(3 << 20));
    body.push_str("1\r\n}\r\n0\r\n\r\n");
    let mut c = Client::connect(bin.addr);
    c.send(head);
    c.send(body.as_bytes());
    let h = c.read_head();
    assert_eq!(h.status, 200, "{h:?}");
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 2);
    let grew = hwm(&bin) - before;
    eprintln!("18 MiB of fair 1-byte chunks: peak +{grew} KiB");
    assert!(
        grew < 12 * MIB,
        "18 MiB of chunked upload for a 3 MiB body grew the peak by {grew} KiB"
    );
}

// ---------------------------------------------- 2. buffered-bytes budget

#[test]
fn a_flood_of_uploads_stays_within_the_buffered_bytes_budget() {
    const CONNS: usize = 200;
    const BUDGET: u64 = 8 << 20;
    let bin = spawn(&[
        "--max-buffered-bytes",
        "8388608",
        // Bodies never funded are refused (503) after it, and give back
        // what they held.
        "--header-timeout-ms",
        "5000",
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "1",
    ]);
    healthz_within(bin.addr, Duration::from_secs(5));
    let before = hwm(&bin);
    // Each declares 1 MiB and sends 1 MiB - 1: no body ever completes.
    let mut req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        1 << 20
    )
    .into_bytes();
    req.resize(req.len() + (1 << 20) - 1, b' ');
    let mut socks: Vec<(TcpStream, usize)> = (0..CONNS)
        .map(|_| {
            let s = TcpStream::connect(bin.addr).unwrap();
            s.set_nonblocking(true).unwrap();
            (s, 0)
        })
        .collect();
    // Round-robin, as much as the server takes, for two seconds.
    let flood_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < flood_until {
        let mut progress = false;
        for (s, sent) in socks.iter_mut().filter(|(_, n)| *n < req.len()) {
            match s.write(&req[*sent..]) {
                Ok(n) => {
                    *sent += n;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e}"),
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // The server answers others within a second, and serves a small
    // request that came whole.
    healthz_within(bin.addr, Duration::from_secs(1));
    let (h, events) = stream_events(bin.addr, &post_stream(r#"{"prompt":"hi","max_tokens":3}"#));
    assert_eq!(h.status, 200);
    assert_eq!(tokens_until_done(&events).len(), 3);
    let text = scrape(bin.addr);
    let held = prom_value(&text, "sluice_request_bytes_buffered").unwrap() as u64;
    let waits = prom_value(&text, "sluice_request_budget_waits_total").unwrap();
    assert!(held <= BUDGET, "{held} bytes held, budget {BUDGET}");
    assert!(waits >= (CONNS - 8) as f64, "{waits} waits");
    let grew = hwm(&bin) - before;
    let sent: usize = socks.iter().map(|(_, n)| n).sum();
    eprintln!(
        "{CONNS} uploads, {sent} bytes sent: {held} bytes held, {waits} waits, peak +{grew} KiB"
    );
    assert!(
        grew < BUDGET / 1024 + 16 * MIB,
        "{sent} bytes of uploads on {CONNS} connections grew the peak by {grew} KiB"
    );
    // The clients leave: everything held is given back (an unfunded body
    // is not read, so its client's leaving is seen at the header timeout).
    drop(socks);
    assert!(wait_until(Duration::from_secs(8), || {
        prom_value(&scrape(bin.addr), "sluice_request_bytes_buffered") == Some(0.0)
    }));
}

// ------------------------------------------------- 3. connection limits

#[test]
fn idle_keep_alive_connections_make_room_at_the_limit() {
    let srv = start(&["--max-connections", "200"]);
    let m = &srv.metrics;
    let mut idle: Vec<Client> = (0..200).map(|_| srv.connect()).collect();
    for c in &mut idle {
        assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
    }
    eventually(m, CLOSE_WAIT, "200 open", || {
        m.connections_open.load(SeqCst) == 200
    });
    // A new client is served at once: the longest-idle one made room.
    let t = Instant::now();
    let mut c = srv.connect();
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(load(&m.connections_evicted), 1);
    assert!(
        idle[0].closed_within(CLOSE_WAIT),
        "the first idle one was closed"
    );
    assert_eq!(m.connections_open.load(SeqCst), 200);
}

#[test]
fn connections_beyond_the_per_address_limit_get_429_and_close() {
    let srv = start(&["--max-connections-per-ip", "3"]);
    let mut mine: Vec<Client> = (0..3).map(|_| srv.connect()).collect();
    for c in &mut mine {
        assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
    }
    let mut over = srv.connect();
    let r = over.read_response();
    assert_eq!(r.status(), 429, "{:?}", r.head);
    assert_eq!(r.error_code(), "too_many_connections");
    assert!(r.head.closes());
    assert!(over.closed_within(CLOSE_WAIT));
    // Another address is not affected.
    let mut other = Client::connect_from(srv.addr, "127.0.0.2");
    assert_eq!(other.roundtrip(&get("/healthz", "")).status(), 200);
    // One of mine leaves: its place is free again.
    drop(mine.pop());
    let m = &srv.metrics;
    eventually(m, CLOSE_WAIT, "3 open", || {
        m.connections_open.load(SeqCst) == 3
    });
    let mut again = srv.connect();
    assert_eq!(again.roundtrip(&get("/healthz", "")).status(), 200);
    for c in &mut mine {
        assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
    }
}

// ---------------------------------------------- 5. routing per loop turn

#[test]
fn pipelined_large_bodies_do_not_stall_another_clients_stream() {
    const FLOODERS: usize = 32;
    const BODIES: usize = 4;
    let srv = start(&["--sim-ttft-ms", "0", "--sim-itl-ms", "20"]);
    // Valid JSON to the end (1 MiB of it), refused only after: every
    // byte is parsed on the loop.
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":0}}"#,
        "a".repeat((1 << 20) - 40)
    );
    let req = post_stream(&body).repeat(BODIES);
    let answered = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|_| {
            let (addr, req, answered) = (srv.addr, req.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut w = c.sock.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    let _ = w.write_all(&req);
                });
                for _ in 0..BODIES {
                    assert_eq!(c.read_response().status(), 400);
                    answered.fetch_add(1, SeqCst);
                }
                writer.join().unwrap();
            })
        })
        .collect();
    let mut c = srv.connect();
    c.send(&post_stream(r#"{"prompt":"steady","max_tokens":40}"#));
    assert_eq!(c.read_head().status, 200);
    let mut last = Instant::now();
    let mut gaps = Vec::new();
    let mut tokens = Vec::new();
    while let Some(e) = c.next_event() {
        gaps.push(last.elapsed());
        last = Instant::now();
        if e.event == "token" {
            tokens.push(e.token());
        }
    }
    for f in flooders {
        f.join().unwrap();
    }
    assert_eq!(tokens.len(), 40);
    let deferred = load(&srv.metrics.requests_deferred);
    assert!(deferred > 0, "no request waited for a later turn");
    assert_eq!(answered.load(SeqCst), (FLOODERS * BODIES) as u64);
    // Before, every body that completed in a turn was parsed in it: the
    // gap grew with the number of pipelining clients (170-270 ms here
    // with 32, in a debug build); now about 30 ms. The bound leaves room
    // for two shared cores.
    let worst = gaps.iter().skip(1).max().copied().unwrap_or_default();
    let text = srv.metrics.render(false);
    let within = prom_value(&text, "sluice_inter_token_seconds_bucket{le=\"0.05\"}").unwrap();
    let all = prom_value(&text, "sluice_inter_token_seconds_count").unwrap();
    eprintln!(
        "beside {FLOODERS} pipelining clients: worst inter-token gap {worst:?}; \
         the server saw {} of {all} gaps over 50 ms",
        all - within
    );
    assert!(worst < Duration::from_millis(100), "worst gap {worst:?}");
}

// ------------------------------------------------------------- 6. HEAD

#[test]
fn head_is_get_without_a_body_and_never_starts_a_stream() {
    let srv = start(FAST);
    let mut c = srv.connect();
    for path in ["/healthz", "/readyz", "/metrics", "/v1/models", "/"] {
        let got = c.roundtrip(&get(path, ""));
        c.send(format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let head = c.read_head();
        assert_eq!(head.status, got.status(), "{path}");
        assert_eq!(head.header("content-type"), got.head.header("content-type"));
        if path != "/metrics" {
            // (The metrics change between the two requests.)
            assert_eq!(head.content_length(), Some(got.body.len()), "{path}");
        }
        // No body: the next answer starts right after the head.
        assert_eq!(c.roundtrip(&get("/healthz", "")).body, b"ok\n", "{path}");
    }
    for (path, allow) in [
        ("/v1/chat/stream?prompt=hi", "GET, POST"),
        ("/v1/chat/completions", "POST"),
        ("/v1/chat/stream/abcdefgh", "GET"),
    ] {
        c.send(format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let head = c.read_head();
        assert_eq!(head.status, 405, "{path}");
        assert_eq!(head.header("allow"), Some(allow), "{path}");
        assert_eq!(c.roundtrip(&get("/healthz", "")).body, b"ok\n", "{path}");
    }
    c.send(b"HEAD /nope HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_head().status, 404);
    assert_eq!(c.roundtrip(&get("/healthz", "")).body, b"ok\n");
    assert_eq!(load(&srv.metrics.streams_started), 0);
}

// ----------------------------------------------- 7. chunked line endings

#[test]
fn chunked_framing_wants_crlf_and_trailers_must_be_fields() {
    let srv = start(FAST);
    let head = "POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    let json = r#"{"prompt":"hi","max_tokens":1}"#;
    let n = json.len();
    for body in [
        format!("{n:x}\n{json}\r\n0\r\n\r\n"),
        format!("{n:x}\r\n{json}\n0\r\n\r\n"),
        format!("{n:x}\r\n{json}\r\n0\n\r\n"),
        format!("{n:x}\r\n{json}\r\n0\r\n\n"),
        format!("{n:x}\r\n{json}\r\n0\r\nX-T: 1\n\r\n"),
        format!("{n:x}\r\n{json}\r\n0\r\nX-T : 1\r\n\r\n"),
        format!("{n:x}\r\n{json}\r\n0\r\n folded: 1\r\n\r\n"),
        format!("{n:x}\r\n{json}\r\n0\r\nX-T: a\rb\r\n\r\n"),
        format!("{n:x}\r\n{json}\r\n0\r\nX(T): 1\r\n\r\n"),
    ] {
        let mut c = srv.connect();
        let r = c.roundtrip(format!("{head}{body}").as_bytes());
        assert_eq!(r.status(), 400, "{body:?}: {}", r.text());
        assert!(c.closed_within(CLOSE_WAIT), "{body:?}");
    }
    // CRLF everywhere and a proper trailer: served.
    let mut c = srv.connect();
    c.send(format!("{head}{n:x}\r\n{json}\r\n0\r\nX-Sum: 1\r\n\r\n").as_bytes());
    assert_eq!(c.read_head().status, 200);
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 1);
}

// ---------------------------------------------------------- 8. the log

#[test]
fn a_path_with_line_separators_reaches_the_log_escaped() {
    let bin = Binary::spawn(&["--log-level", "info"], &[]);
    let mut c = Client::connect(bin.addr);
    // U+2028 LINE SEPARATOR, U+0085 NEXT LINE (a C1 control), U+2029.
    let line = "GET /x\u{2028}INFO-forged\u{85}y\u{2029}z HTTP/1.1\r\nHost: t\r\n\r\n";
    let r = c.roundtrip(line.as_bytes());
    assert_eq!(r.status(), 404);
    let want = "/x\\u{2028}INFO-forged\\u{0085}y\\u{2029}z";
    assert!(
        wait_until(Duration::from_secs(5), || bin
            .log()
            .iter()
            .any(|l| l.contains(want))),
        "no escaped access line: {:?}",
        bin.log()
    );
    for l in bin.log() {
        assert!(
            !l.contains(['\u{2028}', '\u{2029}', '\u{85}']),
            "a raw separator reached the log: {l:?}"
        );
    }
}

// ------------------------------------------------- 9. request-line rules

#[test]
fn targets_host_and_expectations() {
    let srv = start(FAST);
    // Absolute form: served like origin form.
    let mut c = srv.connect();
    let r = c.roundtrip(b"GET http://example.test/healthz HTTP/1.1\r\nHost: example.test\r\n\r\n");
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"ok\n"[..]));
    let body = r#"{"prompt":"hi","max_tokens":2}"#;
    c.send(
        format!(
            "POST HTTP://example.test:8080/v1/chat/stream HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(c.read_head().status, 200);
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 2);
    // Host: missing or repeated on HTTP/1.1 is a 400 that closes; HTTP/1.0
    // needs none.
    for req in [
        &b"GET /healthz HTTP/1.1\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ] {
        let mut c = srv.connect();
        let r = c.roundtrip(req);
        assert_eq!(r.status(), 400, "{}", r.text());
        assert!(r.text().contains("Host"), "{}", r.text());
        assert!(c.closed_within(CLOSE_WAIT));
    }
    let r = srv.connect().roundtrip(b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(r.status(), 200);
    // An expectation other than 100-continue: 417, closed.
    let mut c = srv.connect();
    let r = c.roundtrip(b"GET /healthz HTTP/1.1\r\nHost: t\r\nExpect: 200-ok\r\n\r\n");
    assert_eq!(r.status(), 417);
    assert_eq!(r.error_code(), "expectation_failed");
    assert!(c.closed_within(CLOSE_WAIT));
    // 100 Continue only for a request that will be served.
    let expect = |path: &str, len: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let mut c = srv.connect();
    let r = c.roundtrip(expect("/nope", 10).as_bytes());
    assert_eq!(r.status(), 404, "a 404 instead of 100 Continue");
    assert!(c.closed_within(CLOSE_WAIT));
    let mut c = srv.connect();
    let r = c.roundtrip(expect("/v1/chat/stream", 2 << 20).as_bytes());
    assert_eq!(r.status(), 413, "a 413 instead of 100 Continue");
    let mut c = srv.connect();
    c.send(expect("/v1/chat/stream", body.len()).as_bytes());
    assert_eq!(c.read_head().status, 100);
    c.send(body.as_bytes());
    assert_eq!(c.read_head().status, 200);
    assert_eq!(tokens_until_done(&c.events_to_end()).len(), 2);
}

// --------------------------------------------- 9. the paused warning

/// Warnings logged by in-process servers, with the name of the thread
/// (`sluice-test-PORT`) that logged them.
static WARNINGS: OnceLock<Mutex<Vec<(String, String)>>> = OnceLock::new();

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let thread = std::thread::current().name().unwrap_or("").to_string();
            let lines = WARNINGS.get_or_init(Default::default);
            lines.lock().unwrap().push((thread, r.args().to_string()));
        }
    }
    fn flush(&self) {}
}

#[test]
fn accepting_paused_is_not_logged_at_every_pause() {
    WARNINGS.get_or_init(Default::default);
    if log::set_logger(&Capture).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let srv = start(&["--max-connections", "1", "--log-level", "warn"]);
    let m = &srv.metrics;
    let partial = b"GET /healthz HTTP/1.1\r\n";
    let mut busy = srv.connect();
    busy.send(partial);
    eventually(m, CLOSE_WAIT, "the first partial head", || {
        m.request_bytes_buffered.load(SeqCst) == partial.len() as i64
    });
    // Ten times: the one connection leaves, the next (waiting in the
    // backlog) takes its place, and the server is at its limit again.
    for i in 0..10 {
        let mut next = srv.connect();
        next.send(partial);
        drop(busy);
        eventually(m, CLOSE_WAIT, "the next one accepted and read", || {
            load(&m.connections_accepted) == i + 2
                && m.request_bytes_buffered.load(SeqCst) == partial.len() as i64
        });
        busy = next;
    }
    let me = format!("sluice-test-{}", srv.addr.port());
    let paused: Vec<String> = WARNINGS
        .get()
        .unwrap()
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, l)| *t == me && l.contains("accepting paused"))
        .map(|(_, l)| l.clone())
        .collect();
    assert_eq!(paused.len(), 1, "{paused:?}");
    assert_eq!(load(&m.connections_evicted), 0, "no connection was idle");
}

// ------------------------------------------- full size, run by hand
//
// The floods of the issue at full size, for the figures in the README:
//   cargo build --release
//   cargo test --test e2e_hardening -- --ignored --nocapture --test-threads 1
// They measure target/release/sluice when it exists (else the debug build)
// with default flags, and print what they measured.

/// The build the full-size floods measure.
fn measured(args: &[&str]) -> Binary {
    let release = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/release/sluice"
    ));
    let program = if release.exists() {
        release
    } else {
        std::path::Path::new(env!("CARGO_BIN_EXE_sluice"))
    };
    eprintln!("measuring {}", program.display());
    let mut all = vec!["--log-level", "error"];
    all.extend_from_slice(args);
    Binary::spawn_program(program, &all, &[])
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[test]
#[ignore = "full size: run by hand for the README's figures"]
fn full_size_100_mib_of_chunk_framing_on_one_connection() {
    let bin = measured(&[]);
    healthz_within(bin.addr, Duration::from_secs(5));
    let head = b"POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    // 1-byte chunks with 1 KiB extensions, 100 MiB of them.
    let piece = format!("1;{}\r\nx\r\n", "e".repeat(1017)).repeat(64);
    let t = Instant::now();
    let answer = upload(bin.addr, head, piece.as_bytes(), 100 << 20, b"", true);
    let status = parse_responses(&answer).first().map(|r| r.status());
    let peak = hwm(&bin);
    eprintln!(
        "100 MiB of 1-byte chunks with 1 KiB extensions: answer {status:?} after {:?}; VmHWM {:.1} MiB, VmRSS {:.1} MiB",
        t.elapsed(),
        mib(peak),
        mib(proc_kib(bin.pid(), "VmRSS"))
    );
    assert_eq!(status, Some(400));
    assert!(peak < 64 * MIB, "VmHWM {peak} KiB");
    // Fair framing up to the body limit: 1 MiB of 1-byte chunks (6 MiB).
    let mut body = "1\r\n \r\n".repeat((1 << 20) - 40);
    body.insert_str(0, "1e\r\n{\"prompt\":\"hi\",\"max_tokens\":2 \r\n");
    body.push_str("1\r\n}\r\n0\r\n\r\n");
    let mut c = Client::connect(bin.addr);
    let t = Instant::now();
    c.send(head);
    c.send(body.as_bytes());
    assert_eq!(c.read_head().status, 200);
    c.events_to_end();
    let peak = hwm(&bin);
    eprintln!(
        "6 MiB of 1-byte chunks for a 1 MiB body: streamed after {:?}; VmHWM {:.1} MiB",
        t.elapsed(),
        mib(peak)
    );
    assert!(peak < 64 * MIB, "VmHWM {peak} KiB");
}

#[test]
#[ignore = "full size: run by hand for the README's figures"]
fn full_size_3000_uploads_of_1_mib_less_one_byte() {
    const CONNS: usize = 3000;
    let bin = measured(&[]);
    healthz_within(bin.addr, Duration::from_secs(5));
    let mut req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        1 << 20
    )
    .into_bytes();
    req.resize(req.len() + (1 << 20) - 1, b' ');
    let mut socks: Vec<(TcpStream, usize)> = (0..CONNS)
        .map(|_| {
            let s = TcpStream::connect(bin.addr).unwrap();
            s.set_nonblocking(true).unwrap();
            (s, 0)
        })
        .collect();
    let t = Instant::now();
    let mut worst_healthz = Duration::ZERO;
    let mut next_probe = Instant::now();
    while t.elapsed() < Duration::from_secs(7) {
        let mut progress = false;
        for (s, sent) in socks.iter_mut().filter(|(_, n)| *n < req.len()) {
            if let Ok(n) = s.write(&req[*sent..]) {
                *sent += n;
                progress = true;
            }
        }
        if Instant::now() >= next_probe {
            worst_healthz = worst_healthz.max(healthz_within(bin.addr, Duration::from_secs(1)));
            next_probe = Instant::now() + Duration::from_millis(250);
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let sent: usize = socks.iter().map(|(_, n)| n).sum();
    let text = scrape(bin.addr);
    let held = prom_value(&text, "sluice_request_bytes_buffered").unwrap_or(-1.0);
    let peak = hwm(&bin);
    eprintln!(
        "{CONNS} connections sent {:.0} MiB of bodies in 7 s: {:.0} MiB held, VmHWM {:.1} MiB, worst /healthz {worst_healthz:?}",
        sent as f64 / 1048576.0,
        held / 1048576.0,
        mib(peak)
    );
    assert!(peak < 600 * MIB, "VmHWM {peak} KiB");
    assert!(worst_healthz < Duration::from_secs(1));
}

#[test]
#[ignore = "full size: run by hand for the README's figures"]
fn full_size_200_idle_keep_alive_connections_at_the_limit() {
    let bin = measured(&["--max-connections", "200"]);
    let mut idle: Vec<Client> = (0..200).map(|_| Client::connect(bin.addr)).collect();
    for c in &mut idle {
        assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
    }
    let mut worst = Duration::ZERO;
    for _ in 0..100 {
        let t = Instant::now();
        let mut c = Client::connect(bin.addr);
        assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
        worst = worst.max(t.elapsed());
        idle.push(c);
    }
    eprintln!("100 new clients at --max-connections 200, all held idle: worst {worst:?}");
    assert!(worst < Duration::from_secs(2));
}

#[test]
#[ignore = "full size: run by hand for the README's figures"]
fn full_size_pipelined_1_mib_bodies_beside_a_stream() {
    const FLOODERS: usize = 8;
    const BODIES: usize = 16;
    let bin = measured(&[]);
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":0}}"#,
        "a".repeat((1 << 20) - 40)
    );
    let req = post_stream(&body).repeat(BODIES);
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|_| {
            let (addr, req) = (bin.addr, req.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut w = c.sock.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    let _ = w.write_all(&req);
                });
                for _ in 0..BODIES {
                    assert_eq!(c.read_response().status(), 400);
                }
                writer.join().unwrap();
            })
        })
        .collect();
    let mut c = Client::connect(bin.addr);
    c.send(&post_stream(r#"{"prompt":"steady","max_tokens":64}"#));
    assert_eq!(c.read_head().status, 200);
    let mut last = Instant::now();
    let mut gaps = Vec::new();
    while let Some(e) = c.next_event() {
        gaps.push(last.elapsed());
        last = Instant::now();
        let _ = e;
    }
    for f in flooders {
        f.join().unwrap();
    }
    gaps.remove(0);
    gaps.sort();
    let worst = *gaps.last().unwrap();
    eprintln!(
        "inter-token gap (--sim-itl-ms 20) beside {FLOODERS} clients pipelining {BODIES} bodies of 1 MiB: median {:?}, worst {worst:?}",
        gaps[gaps.len() / 2]
    );
    let text = scrape(bin.addr);
    eprintln!(
        "requests deferred to a later turn: {:?}",
        prom_value(&text, "sluice_requests_deferred_total")
    );
}
