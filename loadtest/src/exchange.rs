//! One measured request/response, free of sockets: the engine tells it
//! when the request's last byte was written and hands it each read with
//! the `Instant` of that read; it parses the head, the body framing and the
//! events, and fills a [`Record`] with every timing the report needs.
//! Every TTFT is measured from the moment the last request byte was
//! written (`sent`); the intended send time is kept for open-loop runs.

use crate::events::{classify, Format, Kind};
use crate::http::{parse_head, BodyDecoder, Framing};
use crate::sse::{Event, Parser};
use std::time::Instant;

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    /// `done` (native), `[DONE]` or a clean end after `finish_reason` (OpenAI).
    Done,
    /// An error event in the stream, with its code.
    Error(String),
    /// A response that was not 200, with the `error.code` of its body if any.
    Http(u16, Option<String>),
    /// The body ended (cleanly) without a terminal event.
    Incomplete,
    /// The connection closed or reset before the stream ended.
    Reset,
    /// No end within `--timeout`.
    Timeout,
    /// We left on purpose (a `--disconnect-after` fault).
    Disconnected,
    /// The TCP (or TLS) connection could not be made.
    ConnectError,
}

/// Everything measured about one stream.
#[derive(Debug, Clone)]
pub struct Record {
    /// Counted in the report (false for warm-up and held streams).
    pub counted: bool,
    /// Open loop: when the arrival process wanted it sent. Closed loop: when issued.
    pub intended: Instant,
    /// When the request's last byte was written.
    pub sent: Option<Instant>,
    pub head: Option<Instant>,
    pub first_byte: Option<Instant>,
    pub first_event: Option<Instant>,
    pub first_token: Option<Instant>,
    pub end: Option<Instant>,
    pub status: Option<u16>,
    pub outcome: Outcome,
    pub tokens: u64,
    /// Body bytes after de-chunking.
    pub bytes: u64,
    /// Gaps between consecutive tokens, µs.
    pub gaps_us: Vec<u32>,
    /// The server's own TTFT (sluice's `done.ttft_ms`).
    pub server_ttft_ms: Option<f64>,
    /// We sent an `X-Request-Id` and the response echoed it.
    pub request_id_echoed: bool,
    /// Sequence numbers from event ids `<stream>:<seq>` (resume checks).
    pub seqs: Vec<u64>,
    /// The last event id seen (for Last-Event-ID).
    pub last_event_id: Option<String>,
    /// A client fault was applied: counted in `streams.*` and `faults.*`,
    /// kept out of the latency figures (they would measure the fault).
    pub faulted: bool,
}

impl Record {
    pub fn new(counted: bool, intended: Instant) -> Self {
        Record {
            counted,
            intended,
            sent: None,
            head: None,
            first_byte: None,
            first_event: None,
            first_token: None,
            end: None,
            status: None,
            outcome: Outcome::Pending,
            tokens: 0,
            bytes: 0,
            gaps_us: Vec::new(),
            server_ttft_ms: None,
            request_id_echoed: false,
            seqs: Vec::new(),
            last_event_id: None,
            faulted: false,
        }
    }

    /// `t - sent` in µs.
    pub fn since_sent(&self, t: Option<Instant>) -> Option<u64> {
        Some(t?.saturating_duration_since(self.sent?).as_micros() as u64)
    }
}

/// What the engine does next with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Keep reading.
    More,
    /// The response is over; the connection can carry another request
    /// when `keep_alive`.
    Finished { keep_alive: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Body,
    End,
}

pub struct Exchange {
    format: Format,
    phase: Phase,
    head_buf: Vec<u8>,
    decoder: BodyDecoder,
    framing: Framing,
    keep_alive: bool,
    payload: Vec<u8>,
    error_body: Vec<u8>,
    sse: Parser,
    finish_seen: bool,
    terminal: bool,
    last_token: Option<Instant>,
    expect_request_id: Option<String>,
    /// Events after this many tokens are not looked at (the client is about to leave).
    pub token_limit: Option<u64>,
    pub rec: Record,
}

impl Exchange {
    pub fn new(format: Format, rec: Record, expect_request_id: Option<String>) -> Self {
        Exchange {
            format,
            phase: Phase::Head,
            head_buf: Vec::new(),
            decoder: BodyDecoder::new(Framing::Close),
            framing: Framing::Close,
            keep_alive: false,
            payload: Vec::new(),
            error_body: Vec::new(),
            sse: Parser::new(),
            finish_seen: false,
            terminal: false,
            last_token: None,
            expect_request_id,
            token_limit: None,
            rec,
        }
    }

    /// The request's last byte was written at `now`.
    pub fn request_written(&mut self, now: Instant) {
        self.rec.sent = Some(now);
    }

    /// A terminal event arrived (the stream's outcome is known).
    pub fn has_terminal(&self) -> bool {
        self.terminal
    }

    /// Bytes read from the connection at `now`.
    pub fn on_bytes(&mut self, data: &[u8], now: Instant) -> Step {
        if self.phase == Phase::End {
            return Step::Finished {
                keep_alive: self.keep_alive,
            };
        }
        let mut body_part: &[u8] = data;
        let owned;
        if self.phase == Phase::Head {
            self.head_buf.extend_from_slice(data);
            match parse_head(&self.head_buf, false) {
                Ok(None) => return Step::More,
                Err(_) => return self.fail(Outcome::Reset, now),
                Ok(Some((head, n))) => {
                    // get_or_insert: a resumed stream keeps its first figures
                    self.rec.head.get_or_insert(now);
                    self.rec.status = Some(head.status);
                    self.rec.request_id_echoed = self.expect_request_id.is_some()
                        && head.request_id == self.expect_request_id;
                    self.framing = head.framing;
                    self.keep_alive = head.keep_alive;
                    self.decoder = BodyDecoder::new(head.framing);
                    self.phase = Phase::Body;
                    owned = self.head_buf.split_off(n);
                    body_part = &owned;
                }
            }
        }
        self.payload.clear();
        let consumed = match self.decoder.decode(body_part, &mut self.payload) {
            Ok(n) => n,
            Err(_) => return self.fail(Outcome::Reset, now),
        };
        if !self.payload.is_empty() {
            self.rec.bytes += self.payload.len() as u64;
            self.rec.first_byte.get_or_insert(now);
            if self.rec.status == Some(200) {
                let payload = std::mem::take(&mut self.payload);
                let mut sse = std::mem::take(&mut self.sse);
                sse.feed_with(&payload, &mut |ev| self.on_event(ev, now));
                self.sse = sse;
                self.payload = payload;
            } else if self.error_body.len() < 4096 {
                self.error_body.extend_from_slice(&self.payload);
            }
        }
        if self.decoder.is_done() {
            // Bytes after the body (a pipelined answer) would be a server bug here.
            let clean = consumed == body_part.len();
            return self.finish_body(now, clean);
        }
        Step::More
    }

    /// The peer closed the connection (a read of 0 bytes) at `now`.
    pub fn on_eof(&mut self, now: Instant) -> Step {
        if self.phase == Phase::Body && self.framing == Framing::Close {
            return self.finish_body(now, false);
        }
        if self.phase != Phase::End {
            self.keep_alive = false;
            if !self.terminal {
                return self.fail(Outcome::Reset, now);
            }
            self.phase = Phase::End;
        }
        Step::Finished { keep_alive: false }
    }

    /// Ends the stream from outside (timeout, connect error, reset, our own disconnect).
    pub fn abort(&mut self, outcome: Outcome, now: Instant) {
        if self.phase != Phase::End {
            self.keep_alive = false;
            if !self.terminal {
                self.fail(outcome, now);
            }
            self.phase = Phase::End;
        }
    }

    fn fail(&mut self, outcome: Outcome, now: Instant) -> Step {
        self.rec.outcome = outcome;
        self.rec.end.get_or_insert(now);
        self.terminal = true;
        self.phase = Phase::End;
        self.keep_alive = false;
        Step::Finished { keep_alive: false }
    }

    fn finish_body(&mut self, now: Instant, clean: bool) -> Step {
        self.phase = Phase::End;
        if !self.terminal {
            self.rec.outcome = match self.rec.status {
                Some(200) if self.finish_seen && self.format == Format::Openai => Outcome::Done,
                Some(200) => Outcome::Incomplete,
                Some(s) => Outcome::Http(s, body_error_code(&self.error_body)),
                None => Outcome::Reset,
            };
            self.terminal = true;
            self.rec.end = Some(now);
        }
        let keep_alive = self.keep_alive && clean;
        self.keep_alive = keep_alive;
        Step::Finished { keep_alive }
    }

    fn on_event(&mut self, ev: &Event, now: Instant) {
        if self.terminal {
            return;
        }
        let kind = classify(self.format, ev);
        if self.token_limit.is_some_and(|k| self.rec.tokens >= k)
            && !matches!(kind, Kind::Done { .. } | Kind::Error { .. })
        {
            // The client is leaving; only an end that already arrived
            // in the same read still counts (the server saw it finish).
            return;
        }
        if self.rec.first_event.is_none() {
            self.rec.first_event = Some(now);
        }
        if let Some(id) = &ev.id {
            if let Some((stream, seq)) = id.rsplit_once(':') {
                if let Ok(seq) = seq.parse() {
                    self.rec.seqs.push(seq);
                }
                let _ = stream;
            }
            self.rec.last_event_id = Some(id.clone());
        }
        match kind {
            Kind::Token { .. } => {
                self.rec.tokens += 1;
                self.rec.first_token.get_or_insert(now);
                match self.last_token {
                    None => {}
                    Some(prev) => {
                        let gap = now.saturating_duration_since(prev).as_micros();
                        self.rec.gaps_us.push(gap.min(u32::MAX as u128) as u32);
                    }
                }
                self.last_token = Some(now);
            }
            Kind::Other { finish } => self.finish_seen |= finish,
            Kind::Heartbeat => {}
            Kind::Done { server_ttft_ms } => {
                self.rec.server_ttft_ms = server_ttft_ms;
                self.rec.outcome = Outcome::Done;
                self.rec.end = Some(now);
                self.terminal = true;
            }
            Kind::Error { code } => {
                self.rec.outcome = Outcome::Error(code);
                self.rec.end = Some(now);
                self.terminal = true;
            }
        }
    }
}

fn body_error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("error")?;
    match e.get("code").or_else(|| e.get("type"))? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn chunk(s: &str) -> Vec<u8> {
        format!("{:x}\r\n{s}\r\n", s.len()).into_bytes()
    }

    #[test]
    fn native_timings_each_definition() {
        let t0 = Instant::now();
        let mut x = Exchange::new(Format::Native, Record::new(true, t0), Some("q1".into()));
        x.request_written(at(t0, 1));
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Request-Id: q1\r\n\r\n";
        assert_eq!(x.on_bytes(head, at(t0, 11)), Step::More);
        let hb = chunk("event: heartbeat\ndata: {}\n\n");
        assert_eq!(x.on_bytes(&hb, at(t0, 21)), Step::More);
        x.on_bytes(&chunk("event: token\ndata: {\"t\":\"\"}\n\n"), at(t0, 31));
        x.on_bytes(&chunk("event: token\ndata: {\"t\":\"a\"}\n\n"), at(t0, 41));
        x.on_bytes(&chunk("event: token\ndata: {\"t\":\"b\"}\n\n"), at(t0, 46));
        let mut tail = chunk("event: done\ndata: {\"ttft_ms\":12.5}\n\n");
        tail.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(
            x.on_bytes(&tail, at(t0, 51)),
            Step::Finished { keep_alive: true }
        );
        let r = &x.rec;
        assert_eq!(r.since_sent(r.head), Some(10_000));
        assert_eq!(r.since_sent(r.first_byte), Some(20_000));
        assert_eq!(r.since_sent(r.first_event), Some(20_000));
        assert_eq!(r.since_sent(r.first_token), Some(40_000));
        assert_eq!(r.since_sent(r.end), Some(50_000));
        assert_eq!(r.gaps_us, vec![5_000]);
        assert_eq!(r.tokens, 2);
        assert_eq!(r.outcome, Outcome::Done);
        assert_eq!(r.server_ttft_ms, Some(12.5));
        assert!(r.request_id_echoed);
    }

    #[test]
    fn openai_close_delimited_and_finish() {
        let t0 = Instant::now();
        let mut x = Exchange::new(Format::Openai, Record::new(true, t0), None);
        x.request_written(t0);
        let wire = b"HTTP/1.0 200 OK\r\n\r\n: ping\n\n\
data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
        assert_eq!(x.on_bytes(wire, at(t0, 5)), Step::More);
        assert_eq!(x.on_eof(at(t0, 6)), Step::Finished { keep_alive: false });
        assert_eq!(x.rec.outcome, Outcome::Done);
        assert_eq!(x.rec.tokens, 1);
    }

    #[test]
    fn refusal_and_reset() {
        let t0 = Instant::now();
        let mut x = Exchange::new(Format::Native, Record::new(true, t0), None);
        x.request_written(t0);
        let wire = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 45\r\n\r\n{\"error\":{\"code\":\"overloaded\",\"message\":\"x\"}}";
        assert_eq!(x.on_bytes(wire, t0), Step::Finished { keep_alive: true });
        assert_eq!(x.rec.outcome, Outcome::Http(503, Some("overloaded".into())));

        let mut x = Exchange::new(Format::Native, Record::new(true, t0), None);
        x.on_bytes(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", t0);
        assert_eq!(x.on_eof(t0), Step::Finished { keep_alive: false });
        assert_eq!(x.rec.outcome, Outcome::Reset);
    }

    #[test]
    fn token_limit_still_sees_an_end_in_the_same_read() {
        let t0 = Instant::now();
        let mut x = Exchange::new(Format::Native, Record::new(true, t0), None);
        x.token_limit = Some(1);
        x.request_written(t0);
        let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        wire.extend(chunk(
            "event: token\ndata: {\"t\":\"a\"}\n\nevent: token\ndata: {\"t\":\"b\"}\n\n",
        ));
        wire.extend(chunk("event: done\ndata: {}\n\n"));
        wire.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(x.on_bytes(&wire, t0), Step::Finished { keep_alive: true });
        assert_eq!(x.rec.outcome, Outcome::Done);
        assert_eq!(x.rec.tokens, 1);
    }
}
