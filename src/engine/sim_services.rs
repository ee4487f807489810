//! [`SimServices`]: the smallest [`Services`] an engine can run with — every
//! stream admitted on the simulated model, ids from a counter — for the
//! benches, the engine fuzz target and `examples/instr_stream.rs`, which
//! drive an engine without a server around it.

use super::{Ended, Services};
use crate::backend::GenRequest;
use crate::http::Request;
use crate::router::{Ops, Refusal};
use crate::stream::{Producer, StreamRef};

/// Admits every stream on the simulated model; names stream `n` `"{n:x}"`;
/// answers every ops endpoint `200 ok`; forgets ended streams.
#[derive(Debug, Default)]
pub struct SimServices(pub u64);

impl Services for SimServices {
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
        (200, "text/plain", b"ok".to_vec())
    }

    fn stream_ended(&mut self, _: Ended) {}
}
