//! A fixed, paced amount of work for callgrind: S connections each run one
//! simulated stream of T tokens, I ms apart, through the engine on a
//! simulated clock, advanced one millisecond per loop turn. Each turn makes
//! the same engine calls the server's loop makes (timers, then every
//! connection the engine touched: its bytes "written" in one go, the
//! half-close/close/read checks), only without sockets, so the count is
//! the engine's own and repeatable:
//!
//!     cargo build --release --example instr_paced
//!     valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.paced \
//!         target/release/examples/instr_paced 200 100 5
//!     valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.zero \
//!         target/release/examples/instr_paced 0 100 5
//!
//! Per delivered token event: (first − second) / (S × T). With I = 5 the
//! streams start a millisecond apart in turn, so each tick of the wheel
//! fires about S / 5 of them, and every token is an event of its own (a
//! timer firing, one frame, one write). With I = 0 every stream's tokens
//! coalesce into one write (`instr_stream` measures that case too).
//!
//! Why not the real server under valgrind: callgrind runs ~50× slower, so
//! a server pacing 200 streams at 5 ms would fall behind and coalesce its
//! tokens, measuring the other case.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::engine::{Engine, SimServices};
use sluice::metrics::Metrics;
use sluice::Config;

fn main() {
    let arg = |i: usize, d: u64| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (streams, tokens, itl) = (arg(1, 200) as usize, arg(2, 100), arg(3, 5));
    let itl_s = itl.to_string();
    let tokens_s = tokens.to_string();
    let cfg = Config::for_tests(&[
        "--sim-ttft-ms",
        &itl_s,
        "--sim-itl-ms",
        &itl_s,
        "--sim-tokens",
        &tokens_s,
    ]);
    let body = format!("{{\"prompt\":\"hi\",\"max_tokens\":{tokens}}}");
    let req = format!(
        "POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let t0 = Instant::now();
    let mut e: Engine<()> = Engine::new(Arc::new(cfg), Arc::new(Metrics::default()), t0);
    let mut svc = SimServices::default();
    let keys: Vec<usize> = (0..streams).map(|_| e.open((), None, t0)).collect();
    let mut dirty = Vec::new();
    let (mut bytes, mut writes) = (0usize, 0usize);
    let spread = itl.max(1) as usize;
    // Enough turns for the last stream to end.
    let turns = spread as u64 + (tokens + 2) * itl + 2;
    for ms in 0..turns {
        let now = t0 + Duration::from_millis(ms);
        // Streams start spread over one pacing interval.
        if (ms as usize) < spread {
            for &key in keys.iter().skip(ms as usize).step_by(spread) {
                e.handle_read(&mut svc, key, req.as_bytes(), now);
            }
        }
        e.handle_timeouts(&mut svc, now);
        // What `Server::service_dirty` does, minus the syscalls.
        loop {
            e.take_dirty(&mut dirty);
            if dirty.is_empty() {
                if e.finish_written(&mut svc, now) {
                    continue;
                }
                break;
            }
            for &key in &dirty {
                loop {
                    let n = e.io_and_pending(key).map_or(0, |(_, p, _)| p.len());
                    if n == 0 {
                        break;
                    }
                    bytes += n;
                    writes += 1;
                    e.handle_written(&mut svc, key, n, now);
                }
                std::hint::black_box(e.after_write(key));
            }
        }
    }
    assert_eq!(e.streams(), 0, "every stream ended");
    println!("{streams} streams × {tokens} tokens, {itl} ms apart: {writes} writes, {bytes} bytes");
}
