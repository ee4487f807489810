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

use sluice::backend::GenRequest;
use sluice::engine::{Ended, Engine, Services};
use sluice::http::Request;
use sluice::metrics::Metrics;
use sluice::router::{Ops, Refusal};
use sluice::stream::{Producer, StreamRef};
use sluice::Config;

struct Svc(u64);

impl Services for Svc {
    fn next_id(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
    fn stream_sid(&mut self, id: u64) -> Box<str> {
        format!("{id:x}").into()
    }
    fn admit(&mut self, _: StreamRef, _: &GenRequest) -> Result<Producer, Refusal> {
        Ok(Producer::Sim)
    }
    fn ops(&mut self, _: Ops, _: &Request) -> (u16, &'static str, Vec<u8>) {
        (200, "text/plain", Vec::new())
    }
    fn stream_ended(&mut self, _: &Ended) {}
}

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
    let mut svc = Svc(0);
    let mut dirty = Vec::new();
    let mut bytes = 0;
    for _ in 0..n {
        e.handle_read(&mut svc, key, req, now);
        let k = e.pending(key).len();
        bytes += k;
        e.handle_written(&mut svc, key, k, now);
        e.take_dirty(&mut dirty);
    }
    println!("{n} streams, {bytes} bytes");
}
