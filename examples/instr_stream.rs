//! A fixed amount of work for callgrind: N whole 64-token simulated streams
//! through the engine, request bytes to `done`, no sockets (the same loop as
//! the `session/sim_stream_64_tokens` bench). Instruction counts are
//! repeatable where wall time on a shared VM is not:
//!
//!     cargo build --release --example instr_stream
//!     valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.N target/release/examples/instr_stream N
//!
//! (run with N and with 0, and divide the difference by N).

use std::sync::Arc;
use std::time::Instant;

use sluice::engine::{Engine, SimServices};
use sluice::metrics::Metrics;
use sluice::Config;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let cfg = Config::for_tests(&["--sim-ttft-ms", "0", "--sim-itl-ms", "0"]);
    let req = b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\n{\"prompt\":\"hi\",\"max_tokens\":64}";
    let now = Instant::now();
    let mut e: Engine<()> = Engine::new(Arc::new(cfg), Arc::new(Metrics::default()), now);
    let key = e.open((), None, now);
    let mut svc = SimServices::default();
    let mut dirty = Vec::new();
    let mut bytes = 0;
    for _ in 0..n {
        e.handle_read(&mut svc, key, req, now);
        let k = e.pending(key).len();
        bytes += k;
        e.handle_written(&mut svc, key, k, now);
        // The stream's end, held behind its first token's write.
        e.finish_written(&mut svc, now);
        let k = e.pending(key).len();
        bytes += k;
        e.handle_written(&mut svc, key, k, now);
        e.take_dirty(&mut dirty);
    }
    println!("{n} streams, {bytes} bytes");
}
