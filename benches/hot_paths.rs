//! Criterion benches of the hot paths: framing a token, batching frames into
//! one chunk, parsing a request, the timer wheel, and a whole simulated
//! stream through the session state machine (no sockets).

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::backend::GenRequest;
use sluice::http::{Limits, Request, RequestReader};
use sluice::metrics::Metrics;
use sluice::outbuf::{BufPool, OutBuf};
use sluice::session::{Cx, Ops, Producer, Refusal, Services, Session, StreamSummary};
use sluice::timer::TimerWheel;
use sluice::{sse, Config};

fn framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(4096);
    g.bench_function("token_frame", |b| {
        b.iter(|| {
            buf.clear();
            sse::token(&mut buf, black_box(" hello"));
            black_box(&buf);
        })
    });
    g.bench_function("token_frame_escaped", |b| {
        b.iter(|| {
            buf.clear();
            sse::token(&mut buf, black_box(" \"quoted\"\nline ✓"));
            black_box(&buf);
        })
    });
    g.throughput(Throughput::Elements(8));
    let mut pool = BufPool::default();
    let mut out = OutBuf::default();
    g.bench_function("eight_tokens_one_chunk", |b| {
        b.iter(|| {
            out.append_chunk(&mut pool, true, |b| {
                for _ in 0..8 {
                    sse::token(b, black_box(" word"));
                }
            });
            let n = out.pending().len();
            out.consume(n, &mut pool);
        })
    });
    g.finish();
}

fn parsing(c: &mut Criterion) {
    let body = br#"{"messages":[{"role":"user","content":"Tell me a story"}]}"#;
    let mut req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let req = &req[..];
    let limits = Limits {
        max_head_bytes: 16384,
        max_body_bytes: 1 << 20,
    };
    c.bench_function("http/parse_post", |b| {
        b.iter(|| {
            let mut r = RequestReader::new();
            black_box(r.poll(black_box(req), &limits).unwrap());
        })
    });
    c.bench_function("api/parse_body", |b| {
        b.iter(|| black_box(sluice::api::parse_body(black_box(body), 4096).unwrap()))
    });
}

fn wheel(c: &mut Criterion) {
    let mut w = TimerWheel::new(0);
    let mut now = 0u64;
    let mut expired = Vec::new();
    c.bench_function("timer/insert_cancel", |b| {
        b.iter(|| {
            let id = w.insert(black_box(now + 15_000), 7);
            black_box(w.cancel(id));
        })
    });
    c.bench_function("timer/insert_fire", |b| {
        b.iter(|| {
            w.insert(now + 20, 7);
            now += 20;
            expired.clear();
            w.poll(now, &mut expired);
            black_box(&expired);
        })
    });
}

struct Svc(u64);

impl Services for Svc {
    fn next_id(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
    fn admit(&mut self, _: u64, _: &GenRequest) -> Result<Producer, Refusal> {
        Ok(Producer::Sim)
    }
    fn ops(&mut self, _: Ops, _: &Request) -> (u16, &'static str, Vec<u8>) {
        (200, "text/plain", Vec::new())
    }
    fn stream_ended(&mut self, _: &StreamSummary) {}
}

fn session(c: &mut Criterion) {
    let cfg = Config::parse_from(["sluice", "--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let metrics = Metrics::default();
    let mut bufs = BufPool::default();
    let mut svc = Svc(0);
    let req = b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\n{\"prompt\":\"hi\",\"max_tokens\":64}";
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(64));
    g.bench_function("sim_stream_64_tokens", |b| {
        let now = Instant::now();
        let mut s = Session::new(now);
        b.iter(|| {
            let mut cx = Cx {
                now,
                cfg: &cfg,
                bufs: &mut bufs,
                metrics: &metrics,
                svc: &mut svc,
            };
            s.handle_read(&mut cx, req);
            let n = s.pending().len();
            s.handle_written(&mut cx, n);
            black_box(n);
        })
    });
    g.finish();
    let _ = Duration::ZERO;
}

/// The worker → loop hand-off: a worker pushes 64 tokens into a stream's
/// sink (one ready-list entry, one wake-up), the loop takes them all.
fn handoff(c: &mut Criterion) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let wakes = Arc::new(AtomicUsize::new(0));
    let w = wakes.clone();
    let ready = Arc::new(sluice::pool::ReadyList::new(move || {
        w.fetch_add(1, Ordering::Relaxed);
    }));
    let sink = sluice::pool::TokenSink::new(0, 1, 256, ready.clone());
    let mut list = Vec::new();
    let mut g = c.benchmark_group("pool");
    g.throughput(Throughput::Elements(64));
    g.bench_function("push_take_64_tokens", |b| {
        b.iter(|| {
            for _ in 0..64 {
                sink.push_token(black_box(" word")).unwrap();
            }
            ready.take(&mut list);
            let mut n = 0;
            sink.take(|_| {
                n += 1;
                true
            });
            black_box(n);
        })
    });
    g.finish();
}

criterion_group!(benches, framing, parsing, wheel, session, handoff);
criterion_main!(benches);
