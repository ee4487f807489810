//! What the engine needs from the server around it ([`Services`]), and
//! what it reports to it: answered requests ([`Access`]), resumed streams
//! ([`Resumed`]) and ended streams ([`Ended`]), for metrics and the access
//! log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::GenRequest;
use crate::conn::ReqLine;
use crate::http::Request;
use crate::pool::TokenSink;
use crate::router::{Ops, Refusal};
use crate::stream::{Producer, StreamRef, StreamSummary};

/// One answered request that started no stream, for metrics and the access log.
#[derive(Debug, Clone)]
pub struct Access<'a> {
    pub line: Option<&'a ReqLine>,
    /// Who presented a valid API key.
    pub principal: Option<&'a str>,
    pub status: u16,
    pub request_id: &'a str,
    pub duration: Duration,
    pub peer: Option<SocketAddr>,
}

/// One resume answered with a stream, for the access log.
#[derive(Debug, Clone)]
pub struct Resumed<'a> {
    pub line: ReqLine,
    pub request_id: &'a str,
    /// The stream's id.
    pub sid: &'a str,
    /// The last event the client had, for a stream of this instance;
    /// `None` for one relayed from the shared store.
    pub after: Option<u64>,
}

/// One ended stream, for metrics and the access log.
#[derive(Debug, Clone)]
pub struct Ended {
    pub summary: StreamSummary,
    /// The response's status (200 for a streamed answer).
    pub status: u16,
    pub peer: Option<SocketAddr>,
}

/// What the engine needs from the server around it.
pub trait Services {
    /// A fresh id, never reused (request ids of refused requests use one too).
    fn next_id(&mut self) -> u64;
    /// The id clients see for stream `id`: unguessable in the server
    /// ([`crate::stream::random_sid`]), predictable in tests.
    fn stream_sid(&mut self, id: u64) -> Box<str>;
    /// Admits stream `r`, or refuses it.
    fn admit(&mut self, r: StreamRef, gen: &GenRequest) -> Result<Producer, Refusal>;
    /// Status, content type and body of an operational endpoint.
    fn ops(&mut self, which: Ops, req: &Request) -> (u16, &'static str, Vec<u8>);
    /// A stream ended; `streams_open` goes down here.
    fn stream_ended(&mut self, ended: Ended);
    /// A request was answered without a stream.
    fn responded(&mut self, _access: &Access) {}
    /// A resume was answered with a stream.
    fn resumed(&mut self, _resumed: Resumed) {}
    /// This loop's link to the shared resume store (`--resume-store`),
    /// when there is one.
    fn store(&mut self) -> Option<&mut crate::store::Link> {
        None
    }
    /// Admits relay `r` (a stream of another instance resumed here from
    /// the store), counted like any stream; `None` without a store.
    fn admit_relay(&mut self, _r: StreamRef) -> Option<Result<Arc<TokenSink>, Refusal>> {
        None
    }
    /// An admitted relay found nothing to resume: it is not counted any more.
    fn relay_dropped(&mut self) {}
}
