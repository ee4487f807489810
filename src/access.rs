//! The access log: one line per answered request and per ended stream.
//! The loop records what a line needs as the engine reports it
//! ([`AccessLog::responded`], [`AccessLog::stream_ended`]) and renders the
//! lines once the turn's bytes are written ([`AccessLog::write`]):
//! formatting a line costs more than answering a small request, and the
//! client's bytes go first. Nothing is recorded when the log level hides
//! access lines. A resume answered with a stream has a line of its own
//! ([`AccessLog::resumed`]: `… 200 … resume stream=… after=…`, or
//! `from=store` for a stream of another instance), recorded like the
//! others; the stream's end has its usual line later.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::conn::ReqLine;
use crate::engine::{Access, Ended, Resumed};
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
    Resume {
        line: ReqLine,
        request_id: String,
        sid: Box<str>,
        after: Option<u64>,
    },
}

/// A resume's line: `… 200 request_id=… resume stream=… after=N`, or
/// `from=store` for a stream of another instance.
struct ResumeText<'a> {
    line: &'a ReqLine,
    request_id: &'a str,
    sid: &'a str,
    after: Option<u64>,
}

impl fmt::Display for ResumeText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} 200 request_id={} resume stream={}",
            self.line.method(),
            self.line.path(),
            self.request_id,
            self.sid
        )?;
        match self.after {
            Some(after) => write!(f, " after={after}"),
            None => f.write_str(" from=store"),
        }
    }
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

    /// A resume was answered with a stream.
    pub fn resumed(&mut self, r: Resumed) {
        if !enabled() {
            return;
        }
        self.pending.push(Line::Resume {
            line: r.line,
            request_id: r.request_id.to_string(),
            sid: r.sid.into(),
            after: r.after,
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
                Line::Resume {
                    line,
                    request_id,
                    sid,
                    after,
                } => {
                    let text = ResumeText {
                        line: &line,
                        request_id: &request_id,
                        sid: &sid,
                        after,
                    };
                    log::info!(target: ACCESS, "{text}");
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
    fn a_resume_line_says_after_which_event_or_from_the_store() {
        let line = ReqLine::new("GET", "/v1/chat/stream/abc");
        for (after, want) in [
            (
                Some(7),
                "GET /v1/chat/stream/abc 200 request_id=r1 resume stream=abc after=7",
            ),
            (
                None,
                "GET /v1/chat/stream/abc 200 request_id=r1 resume stream=abc from=store",
            ),
        ] {
            let text = ResumeText {
                line: &line,
                request_id: "r1",
                sid: "abc",
                after,
            };
            assert_eq!(text.to_string(), want);
        }
    }

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
