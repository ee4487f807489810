//! The whole request path without sockets: any bytes a client sends, in
//! pieces, through the connection machine, the router and (for streams)
//! the simulated model and the encoders. It must never panic, and the
//! connection must end up reading, responding, closing or closed.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sluice::engine::{Engine, SimServices};
use sluice::metrics::Metrics;
use sluice::Config;

/// Parsed once: clap is far slower than one run of the target.
fn config() -> Arc<Config> {
    static CFG: std::sync::OnceLock<Arc<Config>> = std::sync::OnceLock::new();
    CFG.get_or_init(|| {
        Arc::new(Config::for_tests(&[
            "--sim-ttft-ms",
            "1",
            "--sim-itl-ms",
            "1",
            "--sim-tokens",
            "4",
            "--max-head-bytes",
            "2048",
            "--max-body-bytes",
            "4096",
        ]))
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut e: Engine<()> = Engine::new(config(), Arc::new(Metrics::default()), t0);
    let key = e.open((), None, t0);
    let mut svc = SimServices::default();
    let mut now = t0;
    let mut dirty = Vec::new();
    // Pieces of at most 64 bytes; the socket takes half of what is pending
    // after each, and the clock moves 1 ms.
    for piece in data.chunks(64) {
        e.handle_read(&mut svc, key, piece, now);
        let n = e.pending(key).len() / 2;
        if n > 0 {
            e.handle_written(&mut svc, key, n, now);
        }
        // As the server does once a turn's writes are done: streams that
        // ended with their first token end now.
        e.finish_written(&mut svc, now);
        now += Duration::from_millis(1);
        e.handle_timeouts(&mut svc, now);
        e.finish_written(&mut svc, now);
        e.take_dirty(&mut dirty);
        if e.conn(key).is_none_or(|c| c.is_closed()) {
            break;
        }
    }
    // Let everything finish: streams end, timers fire.
    for _ in 0..100 {
        let n = e.pending(key).len();
        if n > 0 {
            e.handle_written(&mut svc, key, n, now);
        }
        e.finish_written(&mut svc, now);
        now += Duration::from_millis(5);
        e.handle_timeouts(&mut svc, now);
    }
    e.finish_written(&mut svc, now);
    e.handle_eof(&mut svc, key, now);
    assert_eq!(e.streams(), 0, "every stream ends once its client left");
});
