//! The access log: one line per answered request and per ended stream.
//! The loop records what a line needs as the engine reports it
//! ([`AccessLog::responded`], [`AccessLog::stream_ended`]) and renders the
//! lines once the turn's bytes are written ([`AccessLog::write`]):
//! formatting a line costs more than answering a small request, and the
//! client's bytes go first. Nothing is recorded when the log level hides
//! access lines. (A resume's `… 200 … resume` line is still logged by the
//! engine when the resume starts, so it can come out before lines of the
//! same turn recorded here.)

use std::net::SocketAddr;
use std::time::Duration;

use crate::conn::ReqLine;
use crate::engine::{Access, Ended};
use crate::logging::{Ms, Peer, ACCESS};
use crate::stream::{Outcome, StreamSummary};

/// Lines recorded in a turn, kept for the next turns up to this many.
const KEEP: usize = 1024;

/// One line to write.
enum Line {
    Reply {
        line: Option<ReqLine>,
        status: u16,
        request_id: String,
        principal: Option<Box<str>>,
        duration: Duration,
        peer: Option<SocketAddr>,
    },
    Stream {
        summary: StreamSummary,
        status: u16,
        peer: Option<SocketAddr>,
    },
}

/// A loop's access lines not yet written.
#[derive(Default)]
pub struct AccessLog {
    pending: Vec<Line>,
}

fn enabled() -> bool {
    log::log_enabled!(target: ACCESS, log::Level::Info)
}

/// The `outcome=` word of a stream's line.
pub fn outcome(o: &Outcome) -> &'static str {
    match o {
        Outcome::Completed => "done",
        Outcome::Errored(code) => code.as_str(),
        Outcome::Disconnected => "disconnected",
    }
}

impl AccessLog {
    /// A request answered without a stream.
    pub fn responded(&mut self, a: &Access) {
        if !enabled() {
            return;
        }
        self.pending.push(Line::Reply {
            line: a.line.cloned(),
            status: a.status,
            request_id: a.request_id.to_string(),
            principal: a.principal.map(Box::from),
            duration: a.duration,
            peer: a.peer,
        });
    }

    /// A stream ended.
    pub fn stream_ended(&mut self, e: Ended) {
        if !enabled() {
            return;
        }
        self.pending.push(Line::Stream {
            summary: e.summary,
            status: e.status,
            peer: e.peer,
        });
    }

    /// Whether lines wait.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Logs the recorded lines, in the order they were recorded.
    pub fn write(&mut self) {
        for l in self.pending.drain(..) {
            match l {
                Line::Reply {
                    line,
                    status,
                    request_id,
                    principal,
                    duration,
                    peer,
                } => {
                    let (method, path) =
                        line.as_ref().map_or(("-", "-"), |l| (l.method(), l.path()));
                    log::info!(
                        target: ACCESS,
                        "{method} {path} {status} request_id={request_id} peer={} principal={} duration_ms={}",
                        Peer(peer),
                        principal.as_deref().unwrap_or("-"),
                        Ms(Some(duration), 3)
                    );
                }
                Line::Stream {
                    summary: s,
                    status,
                    peer,
                } => {
                    log::info!(
                        target: ACCESS,
                        "{} {} {status} request_id={} peer={} principal={} stream={} outcome={} tokens={} ttft_ms={} duration_ms={}",
                        s.line.method(),
                        s.line.path(),
                        s.request_id,
                        Peer(peer),
                        s.principal.as_deref().unwrap_or("-"),
                        s.sid,
                        outcome(&s.outcome),
                        s.tokens,
                        Ms(s.ttft, 3),
                        Ms(Some(s.duration), 1)
                    );
                }
            }
        }
        if self.pending.capacity() > KEEP {
            self.pending.shrink_to(KEEP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::ErrorCode;

    #[test]
    fn names_each_outcome() {
        let cases = [
            (Outcome::Completed, "done"),
            (Outcome::Disconnected, "disconnected"),
            (Outcome::Errored(ErrorCode::SlowConsumer), "slow_consumer"),
            (Outcome::Errored(ErrorCode::Cancelled), "cancelled"),
        ];
        for (o, want) in cases {
            assert_eq!(outcome(&o), want);
        }
    }
}
