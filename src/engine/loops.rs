//! The engine's side of several event loops serving one port
//! (`--threads`): which loop owns a stream, and connections handed to it.
//!
//! Each loop has its own engine, so a stream lives in one loop's table. Its
//! id names that loop in its first character
//! ([`crate::stream::sid_for_loop`]). A resume or a stop by id that arrives
//! on another loop is not answered there: the engine marks the connection
//! as moving, with the request it read written out again (method, target,
//! version and headers; resume and cancel ignore a body) and whatever the
//! client sent after it, unread. The server takes it out
//! ([`Engine::take_moving`]) with the bytes it had not written yet, and
//! gives socket and bytes to the owner, whose engine adopts it
//! ([`Engine::adopt`]) and answers as if it had read those bytes itself.
//! The process-wide limits are counted in the shared
//! [`crate::limits::Limits`] ([`Engine::share_limits`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::{Engine, Services};
use crate::http::{Request, Version};
use crate::limits::Limits;

/// A connection on its way to the loop that owns the stream it asked for.
#[derive(Debug)]
pub struct Handoff {
    /// The loop to adopt it.
    pub owner: usize,
    pub peer: Option<SocketAddr>,
    /// Bytes the client sent that are not answered yet: the request that
    /// named the other loop's stream, then whatever followed it.
    pub input: Vec<u8>,
    /// Answers to earlier requests not written yet: they go first.
    pub output: Vec<u8>,
}

/// A connection marked for hand-off, until the server takes it out.
pub(super) struct Moving {
    key: usize,
    serial: u32,
    owner: usize,
    input: Vec<u8>,
}

impl<S> Engine<S> {
    /// This engine is loop `index` of `count` (stream ids name it, and
    /// requests for another loop's streams are handed over).
    pub fn set_loop(&mut self, index: usize, count: usize) {
        self.loops = (index, count.max(1));
    }

    /// Counts connections, streams, buffered and replay bytes together with
    /// every engine given the same `limits` (call before any connection).
    pub fn share_limits(&mut self, limits: Arc<Limits>) {
        self.limits = limits;
    }

    /// The counts this engine shares.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// This loop's replay bytes are now `mine`; the process's total (and
    /// its gauge) follows.
    pub(super) fn set_log_bytes(&mut self, mine: usize) {
        let total = self.limits.replay_changed(self.log_bytes, mine);
        self.log_bytes = mine;
        self.metrics.replay_bytes.store(total as i64, Relaxed);
    }

    /// Whether `key` waits to be handed to another loop.
    pub fn is_moving(&self, key: usize) -> bool {
        !self.moving.is_empty()
            && self
                .moving
                .iter()
                .any(|m| m.key == key && self.conns.get(key).is_some_and(|l| l.serial == m.serial))
    }

    /// Takes out connection `key` if it is to be handed to another loop:
    /// its io (the caller's to move) and what goes with it.
    pub fn take_moving(&mut self, key: usize) -> Option<(S, Handoff)> {
        let i = self.moving.iter().position(|m| m.key == key)?;
        let m = self.moving.swap_remove(i);
        let link = self.conns.get_mut(key).filter(|l| l.serial == m.serial)?;
        let mut input = m.input;
        input.extend_from_slice(&link.conn.take_input(&[]));
        let output = link.conn.pending().to_vec();
        let peer = link.peer;
        let io = self.remove(key)?;
        self.metrics.connections_handed_over.fetch_add(1, Relaxed);
        Some((
            io,
            Handoff {
                owner: m.owner,
                peer,
                input,
                output,
            },
        ))
    }

    /// A connection another loop handed over: its earlier answers are
    /// written first, then its input is read as if from its socket.
    pub fn adopt(&mut self, svc: &mut dyn Services, io: S, h: Handoff, now: Instant) -> usize {
        let key = self.insert_conn(io, h.peer, now);
        if let Some(link) = self.conns.get_mut(key) {
            if !h.output.is_empty() {
                link.conn.queue_output(&mut self.bufs, &h.output);
            }
        }
        self.handle_read(svc, key, &h.input, now);
        key
    }

    /// The loop that owns stream `sid` if it is not this one.
    pub(super) fn owner_elsewhere(&self, sid: &str) -> Option<usize> {
        let (me, n) = self.loops;
        if n < 2 {
            return None;
        }
        crate::stream::loop_of_sid(sid).filter(|&o| o < n && o != me)
    }

    /// Marks `key` for hand-off to loop `owner`, which will answer `req`.
    pub(super) fn hand_off(&mut self, key: usize, owner: usize, req: &Request) {
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        // The owner counts and logs the request.
        self.metrics.requests.fetch_sub(1, Relaxed);
        link.conn.take_current();
        self.moving.push(Moving {
            key,
            serial: link.serial,
            owner,
            input: request_bytes(req),
        });
        self.touch(key);
    }

    /// Bytes a moving connection's client sent after its hand-off began.
    pub(super) fn moving_input(&mut self, key: usize, data: &[u8]) {
        if let Some(m) = self.moving.iter_mut().find(|m| m.key == key) {
            m.input.extend_from_slice(data);
        }
    }

    /// Forgets a hand-off of `key` (the connection closed first).
    pub(super) fn forget_moving(&mut self, key: usize) {
        if !self.moving.is_empty() {
            self.moving.retain(|m| m.key != key);
        }
    }
}

/// `req` written out again: request line and headers, without its body
/// and body framing (resume and cancel do not read a body).
fn request_bytes(req: &Request) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(req.method_str().as_bytes());
    b.push(b' ');
    b.extend_from_slice(req.path().as_bytes());
    if let Some(q) = req.query() {
        b.push(b'?');
        b.extend_from_slice(q.as_bytes());
    }
    b.extend_from_slice(match req.version {
        Version::Http10 => b" HTTP/1.0\r\n",
        Version::Http11 => b" HTTP/1.1\r\n",
    });
    for (name, value) in req.headers() {
        if matches!(name, "content-length" | "transfer-encoding" | "expect") {
            continue;
        }
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(b": ");
        b.extend_from_slice(value.as_bytes());
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"\r\n");
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::SimServices;
    use crate::metrics::Metrics;

    fn engine(index: usize, limits: &Arc<Limits>, now: Instant) -> Engine<u8> {
        let cfg = Arc::new(Config::for_tests(&[]));
        let mut e = Engine::new(cfg, Arc::new(Metrics::default()), now);
        e.set_loop(index, 2);
        e.share_limits(limits.clone());
        e
    }

    /// A cancel for loop 1's stream read by loop 0 behind a pipelined
    /// request: loop 0 answers the first, hands the connection over with
    /// that answer unwritten and the bytes after the cancel unread; loop 1
    /// answers the cancel (404: it has no such stream) and the rest, in
    /// order, as if it had read them itself.
    #[test]
    fn a_request_for_another_loops_stream_moves_its_connection() {
        let now = Instant::now();
        let limits = Arc::new(Limits::default());
        let (mut a, mut b) = (engine(0, &limits, now), engine(1, &limits, now));
        let mut svc = SimServices::default();
        let peer = Some(SocketAddr::from(([127, 0, 0, 1], 9)));
        let k = a.open(7, peer, now);
        let sid = "BAAAAAAAAAAAAAAAAAAAAA";
        let input = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
             POST /v1/chat/stream/{sid}/cancel HTTP/1.1\r\nHost: x\r\nX-Request-Id: c1\r\nContent-Length: 2\r\n\r\n{{}}\
             GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: h2\r\n\r\n"
        );
        a.handle_read(&mut svc, k, input.as_bytes(), now);
        assert!(a.is_moving(k));
        assert_eq!(a.allowance(k), 0, "a moving connection is not read");
        let (io, h) = a.take_moving(k).expect("handed over");
        assert_eq!((io, h.owner, h.peer), (7, 1, peer));
        assert!(
            h.output.starts_with(b"HTTP/1.1 200 "),
            "the first answer goes along"
        );
        let text = String::from_utf8(h.input.clone()).unwrap();
        assert!(text.starts_with(&format!("POST /v1/chat/stream/{sid}/cancel HTTP/1.1\r\n")));
        assert!(!text.contains("content-length"), "{text}");
        assert!(
            text.ends_with("X-Request-Id: h2\r\n\r\n"),
            "the rest, unread: {text}"
        );
        assert_eq!(a.connections(), 0);
        assert_eq!(limits.ip_count([127, 0, 0, 1].into()), 0);
        let output = h.output.clone();
        let k = b.adopt(&mut svc, 7, h, now);
        assert_eq!(
            limits.ip_count([127, 0, 0, 1].into()),
            0,
            "no per-ip limit set"
        );
        let out = String::from_utf8(b.pending(k).to_vec()).unwrap();
        assert!(out.starts_with(std::str::from_utf8(&output).unwrap()));
        let statuses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
        assert_eq!(statuses, ["200", "404", "200"], "{out}");
        assert!(out.contains("x-request-id: c1") || out.contains("X-Request-Id: c1"));
        assert!(
            !b.is_moving(k),
            "loop 1 owns the stream: no second hand-off"
        );
    }

    #[test]
    fn one_loop_never_hands_over() {
        let now = Instant::now();
        let limits = Arc::new(Limits::default());
        let mut a = engine(0, &limits, now);
        a.set_loop(0, 1);
        let mut svc = SimServices::default();
        let k = a.open(1, None, now);
        let req = b"POST /v1/chat/stream/BAAAAAAAAAAAAAAAAAAAAA/cancel HTTP/1.1\r\nHost: x\r\n\r\n";
        a.handle_read(&mut svc, k, req, now);
        assert!(!a.is_moving(k));
        assert!(a.pending(k).starts_with(b"HTTP/1.1 404 "));
    }
}
