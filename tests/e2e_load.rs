//! End to end: many concurrent streams on one event loop.

mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use support::*;

#[test]
fn five_hundred_concurrent_streams_all_end_with_done() {
    const STREAMS: usize = 500;
    const THREADS: usize = 10;
    const PER_THREAD: usize = STREAMS / THREADS;
    const TOKENS: usize = 20;

    let srv = start(&["--sim-ttft-ms", "10", "--sim-itl-ms", "10"]);
    let addr = srv.addr;
    let m = srv.metrics.clone();
    // Every thread connects and sends all its requests before any reads, so
    // all 500 streams run at once (each lasts ~200 ms).
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut clients: Vec<Client> =
                    (0..PER_THREAD).map(|_| Client::connect(addr)).collect();
                barrier.wait();
                for (i, c) in clients.iter_mut().enumerate() {
                    let body = format!(r#"{{"prompt":"stream {t} {i}","max_tokens":{TOKENS}}}"#);
                    c.send(&post_stream(&body));
                }
                let mut texts = Vec::new();
                for c in &mut clients {
                    let head = c.read_head();
                    assert_eq!(head.status, 200, "{head:?}");
                    let events = c.events_to_end();
                    let tokens = tokens_until_done(&events);
                    assert_eq!(tokens.len(), TOKENS, "{events:?}");
                    let d = events.last().unwrap().json();
                    assert_eq!(d["usage"]["completion_tokens"], TOKENS as u64);
                    texts.push(tokens.concat());
                }
                texts
            })
        })
        .collect();
    barrier.wait();
    // Sample the peak while they run (informative; the sum below is the assertion).
    let mut peak = 0;
    wait_until(Duration::from_secs(5), || {
        peak = peak.max(m.streams_open.load(SeqCst));
        load(&m.streams_started) == STREAMS as u64
    });
    let mut done = 0;
    for h in handles {
        done += h.join().expect("client thread").len();
    }
    assert_eq!(done, STREAMS);
    eventually(&m, Duration::from_secs(5), "every stream closed", || {
        m.streams_open.load(SeqCst) == 0 && load(&m.streams_completed) == STREAMS as u64
    });
    assert_eq!(load(&m.streams_started), STREAMS as u64);
    assert_eq!(load(&m.streams_disconnected), 0);
    assert_eq!(load(&m.tokens_sent), (STREAMS * TOKENS) as u64);
    assert!(peak >= 100, "streams barely overlapped (peak {peak})");
}
