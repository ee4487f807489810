//! Criterion benches of the hot paths: framing a token, each encoder (one
//! token, and a whole 64-token answer for each of the five shapes),
//! batching frames into one chunk, parsing a request, the timer wheel (one
//! entry, and a tick that fires 40), the worker hand-off (a burst, and one
//! token at a time), a whole simulated stream through the engine, and one
//! paced token event through the engine (no sockets). Redaction has its
//! own file (`benches/redact.rs`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::encode::{
    ChunkFormat, Encoder, NativeJson, NativeSse, OpenAiAtOnce, OpenAiJson, OpenAiSse, Summary,
};
use sluice::engine::{Engine, SimServices};
use sluice::http::{Limits, RequestReader};
use sluice::metrics::Metrics;
use sluice::outbuf::{BufPool, OutBuf};
use sluice::timer::TimerWheel;
use sluice::{sse, Config};
use std::sync::Arc;

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
            w.arm(7, black_box(now + 15_000));
            black_box(w.disarm(7));
        })
    });
    c.bench_function("timer/insert_fire", |b| {
        b.iter(|| {
            w.arm(7, now + 20);
            now += 20;
            expired.clear();
            w.poll(now, &mut expired);
            black_box(&expired);
        })
    });
    // A busy tick: 200 streams paced 5 ms apart fire 40 at a time.
    let mut g = c.benchmark_group("timer");
    g.throughput(Throughput::Elements(40));
    g.bench_function("fire_40_in_one_tick", |b| {
        b.iter(|| {
            for k in 0..40 {
                w.arm(k, now + 5);
            }
            now += 5;
            expired.clear();
            w.poll(now, &mut expired);
            black_box(&expired);
        })
    });
    g.finish();
}

/// A whole 64-token simulated stream through the engine: request parsed,
/// routed, admitted, produced, encoded, written, ended.
fn engine(c: &mut Criterion) {
    let cfg = Config::for_tests(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let mut svc = SimServices::default();
    let req = b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\n{\"prompt\":\"hi\",\"max_tokens\":64}";
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(64));
    g.bench_function("sim_stream_64_tokens", |b| {
        let now = Instant::now();
        let mut e: Engine<()> =
            Engine::new(Arc::new(cfg.clone()), Arc::new(Metrics::default()), now);
        let key = e.open((), None, now);
        let mut dirty = Vec::new();
        b.iter(|| {
            e.handle_read(&mut svc, key, req, now);
            let n = e.pending(key).len();
            e.handle_written(&mut svc, key, n, now);
            // The stream's end, held behind its first token's write.
            e.finish_written(&mut svc, now);
            let m = e.pending(key).len();
            e.handle_written(&mut svc, key, m, now);
            e.take_dirty(&mut dirty);
            black_box(n + m);
        })
    });
    // One token event at 5 ms pacing, as the loop sees it: the stream's
    // timer fires, its token is encoded into one chunk, the chunk is
    // written, the timer is re-armed (a new stream when one ends).
    let cfg = Config::for_tests(&[
        "--sim-ttft-ms",
        "5",
        "--sim-itl-ms",
        "5",
        "--sim-tokens",
        "4096",
    ]);
    let long = b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 33\r\n\r\n{\"prompt\":\"hi\",\"max_tokens\":4096}";
    g.throughput(Throughput::Elements(1));
    g.bench_function("paced_token_event", |b| {
        let t0 = Instant::now();
        let mut e: Engine<()> =
            Engine::new(Arc::new(cfg.clone()), Arc::new(Metrics::default()), t0);
        let key = e.open((), None, t0);
        let mut dirty = Vec::new();
        let mut ms = 0u64;
        b.iter(|| {
            let now = t0 + Duration::from_millis(ms);
            if e.streams() == 0 {
                e.handle_read(&mut svc, key, long, now);
            }
            ms += 5;
            let now = t0 + Duration::from_millis(ms);
            e.handle_timeouts(&mut svc, now);
            let n = e.pending(key).len();
            e.handle_written(&mut svc, key, n, now);
            e.take_dirty(&mut dirty);
            black_box(n);
        })
    });
    g.finish();
}

/// Each encoder's token event, into a reused buffer.
fn encoders(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(4096);
    let mut shapes: Vec<(&str, Box<dyn Encoder>)> = vec![
        ("native_sse", Box::new(NativeSse)),
        (
            "openai_sse",
            Box::new(OpenAiSse(ChunkFormat::new(
                "1000",
                "sluice-sim",
                1_700_000_000,
                false,
            ))),
        ),
    ];
    for (name, enc) in shapes.iter_mut() {
        g.bench_function(format!("{name}_token"), |b| {
            b.iter(|| {
                buf.clear();
                enc.token(&mut buf, None, black_box(" hello"));
                black_box(&buf);
            })
        });
    }
    // Every shape, a whole 64-token answer: open, tokens, done.
    g.throughput(Throughput::Elements(64));
    let format = || ChunkFormat::new("1000", "sluice-sim", 1_700_000_000, true);
    type Make = fn(ChunkFormat) -> Box<dyn Encoder>;
    let shapes: [(&str, Make); 5] = [
        ("native_sse", |_| Box::new(NativeSse)),
        ("native_json", |_| Box::new(NativeJson::default())),
        ("openai_sse", |f| Box::new(OpenAiSse(f))),
        ("openai_json", |f| Box::new(OpenAiJson::new(f))),
        ("openai_all_at_once", |f| {
            Box::new(OpenAiAtOnce(OpenAiJson::new(f)))
        }),
    ];
    let summary = Summary {
        finish_reason: "stop",
        prompt_tokens: Some(3),
        tokens: 64,
        backend_completion_tokens: None,
        ttft_ms: Some(1.25),
        tokens_per_s: 50.0,
    };
    for (name, make) in shapes {
        g.bench_function(format!("{name}_answer_64_tokens"), |b| {
            b.iter(|| {
                let mut enc = make(format());
                buf.clear();
                enc.open(&mut buf);
                for _ in 0..64 {
                    enc.token(&mut buf, None, black_box(" word"));
                }
                enc.done(&mut buf, ("1000", 65), &summary);
                black_box(&buf);
            })
        });
    }
    g.finish();
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
    // A paced upstream: each token on its own, one ready entry and one
    // wake-up flag swap each.
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_take_1_token", |b| {
        b.iter(|| {
            sink.push_token(black_box(" word")).unwrap();
            ready.take(&mut list);
            let mut n = 0;
            sink.take(|_| {
                n += 1;
                true
            });
            black_box(n);
        })
    });
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

criterion_group!(benches, framing, parsing, wheel, engine, encoders, handoff);
criterion_main!(benches);
