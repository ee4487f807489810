//! Baseline peer: the least a server can do for `POST /v1/chat/stream`.
//!
//! One mio (epoll) loop on one thread. It reads a request (head and
//! `Content-Length` body), then writes, in one `write`, a prewritten answer:
//! the SSE response head, `--tokens N` [1] prewritten `token` events, a
//! `done` event and the chunked terminator. No model, no timers, no JSON
//! parsing, no per-stream state: it is the floor for TTFT and for the cost
//! of a delivered event. Keep-alive and pipelining work; `GET /metrics`
//! answers `sluice_streams_open 0` (nothing is ever held open) and
//! `GET /healthz` `ok`, so `sluice-load --metrics-url` works against it.
//!
//! `floor-peer [--listen 127.0.0.1:8080] [--tokens N]`; it prints
//! `floor: listening on http://ADDR` to stderr once bound.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

const LISTENER: Token = Token(usize::MAX);
/// A request head or body larger than this closes the connection.
const MAX_REQUEST: usize = 1 << 20;

struct Conn {
    sock: TcpStream,
    /// Bytes of a request not complete yet (usually empty).
    input: Vec<u8>,
    /// Answer bytes the socket did not take yet (usually empty).
    output: Vec<u8>,
    writable: bool,
}

struct Answers {
    stream: Vec<u8>,
    metrics: Vec<u8>,
    healthz: Vec<u8>,
    not_found: Vec<u8>,
}

fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn plain(status: &str, ctype: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Answers {
    fn new(tokens: u32) -> Answers {
        let mut stream =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
X-Accel-Buffering: no\r\nX-Stream-Id: floor\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        let mut events = Vec::new();
        for i in 0..tokens {
            if i == 0 {
                events.extend_from_slice(b"event: token\ndata: {\"t\":\"Once\"}\n\n");
            } else {
                events.extend_from_slice(b"event: token\ndata: {\"t\":\" upon\"}\n\n");
            }
        }
        events.extend_from_slice(
            format!(
                "id: floor:{}\nevent: done\ndata: {{\"finish_reason\":\"length\",\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":{tokens}}},\"ttft_ms\":0.000,\"tokens_per_s\":0.0}}\n\n",
                tokens + 1
            )
            .as_bytes(),
        );
        chunk(&mut stream, &events);
        stream.extend_from_slice(b"0\r\n\r\n");
        Answers {
            stream,
            metrics: plain(
                "200 OK",
                "text/plain; version=0.0.4",
                "# TYPE sluice_streams_open gauge\nsluice_streams_open 0\n",
            ),
            healthz: plain("200 OK", "text/plain", "ok"),
            not_found: plain(
                "404 Not Found",
                "application/json",
                "{\"error\":{\"code\":\"not_found\",\"message\":\"no such endpoint\"}}",
            ),
        }
    }
}

enum Parsed {
    /// The answer to send, and how many input bytes the request used.
    Answer(usize, bool),
    Partial,
    Bad,
}

/// Looks at the start of `buf`: one whole request (head and body)?
fn parse(buf: &[u8], answers: &Answers, out: &mut Vec<u8>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_REQUEST {
                Parsed::Bad
            } else {
                Parsed::Partial
            }
        }
        Err(_) => return Parsed::Bad,
    };
    let mut body_len = 0usize;
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) if n <= MAX_REQUEST => body_len = n,
                _ => return Parsed::Bad,
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Bad;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    if buf.len() < head_len + body_len {
        return Parsed::Partial;
    }
    let path = req.path.unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let answer = match path {
        "/v1/chat/stream" => &answers.stream,
        "/metrics" => &answers.metrics,
        "/healthz" => &answers.healthz,
        _ => &answers.not_found,
    };
    out.extend_from_slice(answer);
    Parsed::Answer(head_len + body_len, close)
}

fn parse_args() -> Result<(SocketAddr, u32), String> {
    let mut listen: SocketAddr = "127.0.0.1:8080".parse().expect("an address");
    let mut tokens = 1u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{name} needs a value"))
        };
        match name.as_str() {
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--tokens" => {
                tokens = value()?.parse().map_err(|e| format!("--tokens: {e}"))?;
                if tokens == 0 {
                    return Err("--tokens must be at least 1".into());
                }
            }
            "-h" | "--help" => {
                println!("floor-peer [--listen 127.0.0.1:8080] [--tokens N (1)]");
                std::process::exit(0)
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((listen, tokens))
}

/// Writes `out` (a slice of prewritten answers); keeps what the socket did not take.
fn flush(c: &mut Conn) -> io::Result<()> {
    let mut done = 0;
    while done < c.output.len() {
        match c.sock.write(&c.output[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.output.drain(..done);
    Ok(())
}

/// Reads and answers what there is; `Err` or `Ok(true)`: close.
fn serve(c: &mut Conn, answers: &Answers, scratch: &mut [u8]) -> io::Result<bool> {
    let mut close = false;
    loop {
        match c.sock.read(scratch) {
            Ok(0) => {
                close = true;
                break;
            }
            Ok(n) => {
                c.input.extend_from_slice(&scratch[..n]);
                if n < scratch.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut used = 0;
    let mut hangup = false;
    while used < c.input.len() && !hangup {
        match parse(&c.input[used..], answers, &mut c.output) {
            Parsed::Answer(n, close_after) => {
                used += n;
                hangup = close_after;
            }
            Parsed::Partial => break,
            Parsed::Bad => {
                c.output.extend_from_slice(&plain(
                    "400 Bad Request",
                    "application/json",
                    "{\"error\":{\"code\":\"bad_request\",\"message\":\"bad request\"}}",
                ));
                hangup = true;
            }
        }
    }
    c.input.drain(..used);
    flush(c)?;
    // A half-close after the request still gets its answer (written above).
    Ok((close || hangup) && c.output.is_empty())
}

/// Listen backlog, as sluice's (the kernel caps it at `somaxconn`).
const BACKLOG: i32 = 8192;

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

fn main() {
    let (addr, tokens) = parse_args().unwrap_or_else(|e| {
        eprintln!("floor: {e}");
        std::process::exit(2)
    });
    let answers = Answers::new(tokens);
    let mut listener = listen(addr).unwrap_or_else(|e| {
        eprintln!("floor: cannot listen on {addr}: {e}");
        std::process::exit(1)
    });
    eprintln!(
        "floor: listening on http://{}",
        listener.local_addr().expect("bound")
    );
    let mut poll = Poll::new().expect("epoll");
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .expect("register");
    let mut events = Events::with_capacity(1024);
    let mut conns: Slab<Conn> = Slab::new();
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            panic!("epoll: {e}");
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut sock, _)) => {
                            let _ = sock.set_nodelay(true);
                            let entry = conns.vacant_entry();
                            let key = entry.key();
                            if poll
                                .registry()
                                .register(&mut sock, Token(key), Interest::READABLE)
                                .is_ok()
                            {
                                entry.insert(Conn {
                                    sock,
                                    input: Vec::new(),
                                    output: Vec::new(),
                                    writable: false,
                                });
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // EMFILE and friends: try again on the next event.
                        Err(_) => break,
                    }
                }
                continue;
            }
            let key = ev.token().0;
            let Some(c) = conns.get_mut(key) else {
                continue;
            };
            let close = serve(c, &answers, &mut scratch).unwrap_or(true);
            if close {
                let mut c = conns.remove(key);
                let _ = poll.registry().deregister(&mut c.sock);
                continue;
            }
            // Rare: an answer the socket did not take at once waits for room.
            let want_write = !c.output.is_empty();
            if want_write != c.writable {
                let interest = if want_write {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                let _ = poll
                    .registry()
                    .reregister(&mut c.sock, Token(key), interest);
                c.writable = want_write;
            }
        }
    }
}
