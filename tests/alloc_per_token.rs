//! No allocation per token: a counting global allocator (per thread, so
//! other tests' threads do not count) checks the worker → loop hand-off
//! and the OpenAI relay end to end (a loopback fake upstream on port 0).
//! Allocations that do not depend on the number of tokens (a request, a
//! connection, buffers growing to their working size) are allowed; the
//! tests compare a short stream with a long one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use sluice::backend::openai::{OpenAiBackend, UpstreamConfig};
use sluice::backend::{Backend, Cancelled, GenRequest, Message, TokenOut};
use sluice::pool::{Piece, ReadyList, TokenSink};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: a thread being torn down has no counter left.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: forwards to the system allocator; counting touches no memory of it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations made by this thread while `f` runs.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn the_hand_off_allocates_nothing_per_token() {
    let ready = Arc::new(ReadyList::new(|| {}));
    let sink = TokenSink::new(0, 1, 256, ready.clone());
    let mut list = Vec::with_capacity(4);
    let mut round = |tokens: usize| {
        for i in 0..tokens {
            let text = if i % 2 == 0 { " word" } else { " another" };
            sink.push_token(text).unwrap();
        }
        ready.take(&mut list);
        let mut bytes = 0;
        sink.take(|p| {
            if let Piece::Token(t) = p {
                bytes += t.len();
            }
            true
        });
        assert!(bytes > 0);
    };
    // Warm up: the buffers grow to the burst's size once.
    round(256);
    let n = allocations(|| {
        for _ in 0..100 {
            round(256);
        }
    });
    assert_eq!(n, 0, "allocations for 25,600 tokens handed over");
}

/// Counts tokens without storing them.
#[derive(Default)]
struct CountingOut {
    tokens: Cell<usize>,
}

impl TokenOut for CountingOut {
    fn push_token(&self, text: &str) -> Result<(), Cancelled> {
        if !text.is_empty() {
            self.tokens.set(self.tokens.get() + 1);
        }
        Ok(())
    }
    fn sleep(&self, _d: Duration) -> Result<(), Cancelled> {
        Ok(())
    }
    fn is_cancelled(&self) -> bool {
        false
    }
    fn set_upstream(&self, _sock: Option<TcpStream>) {}
}

/// A one-shot upstream answering one request with `tokens` content
/// chunks, one chunked event each, written as they would be streamed.
fn upstream(tokens: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        // The readiness probe connects too (and asks `GET /v1/models`):
        // answer the connection that posts the chat request.
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { continue };
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            if req.is_empty() {
                continue;
            }
            if req.starts_with(b"GET ") {
                // The readiness probe's `GET /v1/models`: not the request
                // this test measures.
                let _ = sock.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            let mut out = String::from(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            for i in 0..tokens {
                let event =
                    format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i}\"}}}}]}}\n\n");
                out.push_str(&format!("{:x}\r\n{event}\r\n", event.len()));
                if out.len() > 1400 {
                    let _ = sock.write_all(out.as_bytes());
                    out.clear();
                }
            }
            let tail = "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
            out.push_str(&format!("{:x}\r\n{tail}\r\n0\r\n\r\n", tail.len()));
            let _ = sock.write_all(out.as_bytes());
            // Keep the connection until sluice is done with it.
            let _ = sock.read(&mut buf);
            return;
        }
    });
    url
}

/// Allocations on this thread for one generation of `tokens` tokens.
fn relay_allocations(tokens: usize) -> u64 {
    let backend = OpenAiBackend::new(UpstreamConfig {
        url: upstream(tokens),
        key: None,
        model: Some("m".into()),
        system_prompt: None,
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        max_idle: 1,
        ca_file: None,
    })
    .unwrap();
    let req = GenRequest {
        messages: vec![Message {
            role: "user".into(),
            content: "hi".into(),
        }],
        max_tokens: 1_000_000,
        ..GenRequest::default()
    };
    let out = CountingOut::default();
    let n = allocations(|| {
        backend.generate(&req, &out).unwrap();
    });
    assert_eq!(out.tokens.get(), tokens);
    n
}

#[test]
fn the_openai_relay_allocates_nothing_per_token() {
    let short = relay_allocations(10);
    let long = relay_allocations(5000);
    eprintln!("allocations: {short} for 10 tokens, {long} for 5000");
    // Growth of reused buffers may differ by a few; a cost per token would
    // show as thousands.
    assert!(
        long <= short + 8,
        "{short} allocations for 10 tokens, {long} for 5000"
    );
}
