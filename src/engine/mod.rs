//! The sans-IO core of one event loop: its connections, its stream table
//! and its timer wheel, and the routing of bytes and events between them.
//!
//! The server ([`crate::server`]) is a thin shell: it reads sockets into
//! [`Engine::handle_read`], writes [`Engine::pending`] bytes and reports
//! how many left ([`Engine::handle_written`]), hands the workers' ready list
//! to [`Engine::handle_ready`] and the clock to [`Engine::handle_timeouts`],
//! and after each call services the connections [`Engine::take_dirty`]
//! names. The engine decides everything else: a request goes to the
//! [`crate::router`]; a stream is created in the [`StreamTable`] and its
//! connection attached as its subscriber; a stream's encoded events go to
//! whichever connection is attached now; a connection that leaves detaches.
//! What comes in is bounded in `intake.rs`: the server-wide budget of
//! buffered request bytes ([`Engine::read_allowance`], bodies funded first
//! come first served), routing per phase of a loop turn, idle keep-alive
//! connections evicted at the connection limit, connections per address.
//! With several loops (`--threads`), the limits are counted process-wide
//! ([`crate::limits::Limits`]) and a resume or stop by id that names
//! another loop's stream hands its connection to that loop (`loops.rs`).
//! Tests drive an `Engine<()>` with a simulated clock and scripted
//! producers, and assert on exact bytes.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::auth::Auth;
use crate::config::Config;
use crate::conn::{Conn, Expired, Parsed, Response};
use crate::http::Request;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::outbuf::BufPool;
use crate::redact::Redactor;
use crate::router::{self, Answer, Meta, Reply};
use crate::sse::{ErrorCode, StreamError};
use crate::stream::{Detach, End, Stream, StreamRef, StreamTable};
use crate::timer::TimerWheel;

pub use loops::Handoff;
pub use services::{Access, Ended, Resumed, Services};
pub use sim_services::SimServices;

/// A connection and what the engine knows about it.
struct Link<S> {
    io: S,
    conn: Conn,
    serial: u32,
    peer: Option<SocketAddr>,
    /// The stream whose events this connection receives.
    sub: Option<StreamRef>,
    /// How the response being sent goes out (set while a stream is attached).
    meta: Option<Box<Meta>>,
    /// `(appended mark, parse time, stream)` of a first token not yet
    /// written (the time in nanoseconds since the loop's epoch).
    ttft_mark: Option<(u64, u64, StreamRef)>,
    dirty: bool,
    /// A write that makes room pumps the stream again: its producer is a
    /// worker (pieces may wait in its queue), or the last pump left the
    /// output at or past half the high-water mark (or did not run for want
    /// of room). A simulated stream with room holds nothing back.
    held: bool,
    /// Its place in the intake (budget, idle order, address).
    mark: intake::Mark,
}

/// A connection's state after the server wrote to it ([`Engine::after_write`]).
#[derive(Debug, Clone, Copy)]
pub struct AfterWrite {
    /// Everything is written and the server should half-close the socket.
    pub half_close: bool,
    pub closed: bool,
    pub serial: u32,
}

/// Timer entries handled per call of [`Engine::handle_timeouts`]; the rest
/// wait for the next call, after the server has polled its sockets again,
/// so a tick due for thousands of streams does not hold back new requests.
const TIMER_SLICE: usize = 256;

/// `t` on the streams' clock (nanoseconds since `epoch`), which never goes
/// back: a time older than the last one converted counts as that one (the
/// shell may stamp a write with its turn's time after an engine call took
/// a later one; a token must not seem to leave before it was made).
#[inline]
fn clock_ns(clock: &std::cell::Cell<(Instant, u64)>, epoch: Instant, t: Instant) -> u64 {
    let (at, ns) = clock.get();
    if t <= at {
        return ns;
    }
    let ns = ns_since(epoch, t);
    clock.set((t, ns));
    ns
}

/// A keyed hash of stream ids for [`Engine::by_sid`]: ids are random
/// already, so a few multiplications mix them enough (SipHash cost more
/// than the rest of a stream's admission); the key, random per loop,
/// keeps ids a client makes up (a resume of a foreign stream) from being
/// chosen to collide.
struct SidHasher([u64; 4]);

impl SidHasher {
    fn new() -> SidHasher {
        use std::hash::BuildHasher;
        let r = std::collections::hash_map::RandomState::new();
        SidHasher([0u64, 1, 2, 3].map(|i| r.hash_one(i) | 1))
    }

    /// wyhash's folded multiply over 8-byte words.
    fn hash(&self, bytes: &[u8]) -> u64 {
        let mum = |a: u64, b: u64| {
            let m = u128::from(a).wrapping_mul(u128::from(b));
            (m as u64) ^ ((m >> 64) as u64)
        };
        let k = &self.0;
        let mut h = k[0] ^ bytes.len() as u64;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap_or_default());
            h = mum(h ^ w, k[1]);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        mum(h ^ u64::from_le_bytes(tail) ^ k[2], k[3])
    }
}

/// The `Hasher` of a map whose keys are hashes already.
#[derive(Default)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One loop's connections, streams and timers.
pub struct Engine<S> {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    bufs: BufPool,
    conns: Slab<Link<S>>,
    streams: StreamTable,
    wheel: TimerWheel,
    epoch: Instant,
    /// The last `Instant` turned into the streams' clock, and what it
    /// gave: one loop turn asks for the same moment many times.
    clock: std::cell::Cell<(Instant, u64)>,
    /// Wheel slots that fired; those from `expired_next` on are still to
    /// be handled (the next slice).
    expired: Vec<usize>,
    expired_next: usize,
    next_serial: u32,
    dirty: Vec<usize>,
    auth: Auth,
    /// Streams by a hash of the id clients see, for cancel and resume (the
    /// stream's own id is compared on lookup; no second copy of it is kept).
    by_sid: HashMap<u64, StreamRef, BuildHasherDefault<PassThrough>>,
    sid_hasher: SidHasher,
    /// Bytes in this loop's replay logs (the process's are in `limits`).
    log_bytes: usize,
    /// Detached streams over the replay budget, to cancel.
    over_budget: Vec<StreamRef>,
    /// Where a detached stream's events are encoded before its log.
    scratch: Vec<u8>,
    /// Relays waiting for the store's answer: whether a miss answers 204.
    relays: HashMap<StreamRef, bool>,
    /// Stops of foreign streams waiting for the store's answer, by
    /// connection: the request's meta and the stream id.
    parked: HashMap<(usize, u32), (Meta, Box<str>)>,
    /// `--redact`/`--redact-builtin`: the first stage of every stream.
    redactor: Option<Arc<Redactor>>,
    /// The request-bytes budget, routing per phase, idle and per-address
    /// bookkeeping.
    intake: intake::Intake,
    /// The counts every loop of the process shares.
    limits: Arc<Limits>,
    /// This loop's index and the number of loops.
    loops: (usize, usize),
    /// Connections being handed to another loop (usually none).
    moving: Vec<loops::Moving>,
    /// Streams whose end came in the same pump as their first token: ended
    /// once the server has written that token ([`Engine::finish_written`]),
    /// so a stream's summary, metrics and removal wait behind its client's
    /// first bytes.
    ends_due: Vec<(StreamRef, Box<crate::stream::End>)>,
}

impl<S> Engine<S> {
    pub fn new(cfg: Arc<Config>, metrics: Arc<Metrics>, now: Instant) -> Engine<S> {
        Engine {
            cfg,
            metrics,
            bufs: BufPool::default(),
            conns: Slab::new(),
            streams: StreamTable::default(),
            wheel: TimerWheel::new(0),
            epoch: now,
            clock: std::cell::Cell::new((now, 0)),
            expired: Vec::new(),
            expired_next: 0,
            next_serial: 0,
            dirty: Vec::new(),
            auth: Auth::default(),
            by_sid: HashMap::default(),
            sid_hasher: SidHasher::new(),
            log_bytes: 0,
            over_budget: Vec::new(),
            scratch: Vec::new(),
            relays: HashMap::new(),
            parked: HashMap::new(),
            redactor: None,
            intake: intake::Intake::default(),
            limits: Arc::default(),
            loops: (0, 1),
            moving: Vec::new(),
            ends_due: Vec::new(),
        }
    }

    /// Redacts every stream's text from now on.
    pub fn set_redactor(&mut self, redactor: Arc<Redactor>) {
        self.redactor = Some(redactor);
    }

    /// The API keys requests are checked against (at start, and on reload).
    pub fn set_auth(&mut self, auth: Auth) {
        self.auth = auth;
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    // -------------------------------------------------------- connections

    /// The key the next [`Engine::open`] will use.
    pub fn vacant_key(&self) -> usize {
        self.conns.vacant_key()
    }

    /// A new connection carrying `io`.
    pub fn open(&mut self, io: S, peer: Option<SocketAddr>, now: Instant) -> usize {
        self.metrics.connections_accepted.fetch_add(1, Relaxed);
        self.insert_conn(io, peer, now)
    }

    fn insert_conn(&mut self, io: S, peer: Option<SocketAddr>, now: Instant) -> usize {
        self.next_serial = self.next_serial.wrapping_add(1);
        let key = self.conns.insert(Link {
            io,
            conn: Conn::new(now),
            serial: self.next_serial,
            peer,
            sub: None,
            meta: None,
            ttft_mark: None,
            dirty: false,
            held: false,
            mark: intake::Mark::default(),
        });
        self.metrics.connections_open.fetch_add(1, Relaxed);
        self.count_ip(key);
        self.touch(key);
        key
    }

    /// Takes a closed connection out; its `io` is the caller's to drop.
    pub fn remove(&mut self, key: usize) -> Option<S> {
        self.forget(key);
        self.unpark(key);
        self.forget_moving(key);
        let link = self.conns.try_remove(key)?;
        self.wheel.disarm(conn_slot(key));
        self.metrics.connections_open.fetch_sub(1, Relaxed);
        Some(link.io)
    }

    pub fn io_mut(&mut self, key: usize) -> Option<&mut S> {
        self.conns.get_mut(key).map(|l| &mut l.io)
    }

    /// `key`'s io and the bytes waiting for it, to write them, and whether
    /// writing them may complete a first token (whose time to first token
    /// is measured at that write: the server reads the clock for it rather
    /// than use its turn's time).
    pub fn io_and_pending(&mut self, key: usize) -> Option<(&mut S, &[u8], bool)> {
        self.conns
            .get_mut(key)
            .map(|l| (&mut l.io, l.conn.pending(), l.ttft_mark.is_some()))
    }

    /// What the server does with `key` after writing — half-close it,
    /// close it; its serial — and its io (`None`: gone).
    pub fn after_write(&mut self, key: usize) -> Option<(AfterWrite, &mut S)> {
        let l = self.conns.get_mut(key)?;
        let after = AfterWrite {
            half_close: l.conn.wants_half_close(),
            closed: l.conn.is_closed(),
            serial: l.serial,
        };
        Some((after, &mut l.io))
    }

    pub fn conn(&self, key: usize) -> Option<&Conn> {
        self.conns.get(key).map(|l| &l.conn)
    }

    /// The connection's serial: keys are reused, serials tell them apart.
    pub fn serial(&self, key: usize) -> Option<u32> {
        self.conns.get(key).map(|l| l.serial)
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Bytes waiting for `key`'s socket.
    pub fn pending(&self, key: usize) -> &[u8] {
        self.conns.get(key).map_or(&[], |l| l.conn.pending())
    }

    /// Whether any connection has bytes waiting.
    pub fn any_pending(&self) -> bool {
        self.conns.iter().any(|(_, l)| l.conn.pending_len() > 0)
    }

    /// Whether the server should read `key`'s socket now (see
    /// [`Engine::read_allowance`] for how much).
    pub fn wants_read(&self, key: usize) -> bool {
        self.allowance(key) > 0
    }

    /// Whether `key` has a stream attached (its FIN means it left).
    pub fn is_attached(&self, key: usize) -> bool {
        self.conns.get(key).is_some_and(|l| l.sub.is_some())
    }

    fn sid_hash(&self, sid: &str) -> u64 {
        self.sid_hasher.hash(sid.as_bytes())
    }

    /// The stream clients know as `sid`, if it is in the table.
    fn stream_by_sid(&self, sid: &str) -> Option<StreamRef> {
        let r = *self.by_sid.get(&self.sid_hash(sid))?;
        self.streams.get(r).filter(|s| s.sid() == sid).map(|_| r)
    }

    /// Output allocations kept for reuse.
    pub fn pooled_buffers(&self) -> usize {
        self.bufs.pooled()
    }

    /// The stream attached to `key`.
    pub fn attached(&self, key: usize) -> Option<StreamRef> {
        self.conns.get(key).and_then(|l| l.sub)
    }

    /// Ends the streams whose end was held behind their first token
    /// (call once the connections [`Engine::take_dirty`] named have been
    /// written). Whether there were any: their connections are dirty now.
    pub fn finish_written(&mut self, svc: &mut dyn Services, now: Instant) -> bool {
        if self.ends_due.is_empty() {
            return false;
        }
        for (r, end) in std::mem::take(&mut self.ends_due) {
            // Ended meanwhile (its client reset, the server drains): done.
            if self.streams.get(r).is_some_and(|s| !s.is_ended()) {
                self.end_stream(svc, r, *end, true, now);
            }
        }
        true
    }

    /// Whether a stream's end waits for [`Engine::finish_written`].
    pub fn has_ends_due(&self) -> bool {
        !self.ends_due.is_empty()
    }

    /// Connections with new output or a new state since the last call.
    pub fn take_dirty(&mut self, into: &mut Vec<usize>) {
        into.clear();
        std::mem::swap(&mut self.dirty, into);
        for &k in into.iter() {
            if let Some(l) = self.conns.get_mut(k) {
                l.dirty = false;
            }
        }
    }

    // ------------------------------------------------------------- inputs

    /// Bytes from `key`'s client.
    pub fn handle_read(&mut self, svc: &mut dyn Services, key: usize, data: &[u8], now: Instant) {
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        link.conn.note_bytes(now, data);
        if link.conn.is_responding() {
            link.conn.keep_input(&self.cfg, data);
        } else if link.conn.is_reading() {
            self.process(svc, key, data, now);
        }
        self.touch(key);
    }

    /// `key`'s client closed its side.
    pub fn handle_eof(&mut self, svc: &mut dyn Services, key: usize, now: Instant) {
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        link.conn.handle_eof(&mut self.bufs, now, &self.cfg);
        self.after_conn_change(svc, key, now);
    }

    /// `key`'s connection failed: nothing more can be sent.
    pub fn handle_reset(&mut self, svc: &mut dyn Services, key: usize, now: Instant) {
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(s) = link.sub {
            log::debug!("stream {:x}: client left", s.id);
        }
        link.conn.handle_reset(&mut self.bufs);
        self.after_conn_change(svc, key, now);
    }

    /// `key`'s socket took `n` bytes.
    pub fn handle_written(&mut self, svc: &mut dyn Services, key: usize, n: usize, now: Instant) {
        let clock = &self.clock;
        let epoch = self.epoch;
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        // A stream's body going out as it should changes nothing but the
        // bytes waiting: no charge, idleness or deadline to recompute.
        let quiet = link.conn.is_responding() && !link.conn.is_write_blocked();
        link.conn.handle_written(&mut self.bufs, n);
        self.metrics.bytes_sent.fetch_add(n as u64, Relaxed);
        if let Some((mark, t0, r)) = link.ttft_mark {
            if link.conn.written_total() >= mark {
                link.ttft_mark = None;
                let ttft = clock_ns(clock, epoch, now).saturating_sub(t0);
                self.metrics.ttft.observe_ns(ttft);
                if let Some(s) = self.streams.get_mut(r) {
                    s.set_ttft(ttft);
                }
            }
        }
        // The usual paced write: a stream's body leaving as it should, its
        // producer holding nothing back. Only the stream may want its timer
        // again (room came back after it was armed without).
        if quiet && !link.held {
            if let Some(r) = link.sub {
                let armed = self.wheel.deadline(timers::stream_slot(r.key)).is_some();
                if !armed || self.streams.get(r).is_some_and(Stream::timer_roomless) {
                    self.touch_stream(r);
                }
                return;
            }
        }
        // Room again: take what the producer has been holding back, or
        // answer pipelined requests that waited for the answers before.
        if link.conn.pending_len() < self.cfg.high_water() / 2 {
            if let Some(r) = link.sub {
                if link.held {
                    self.pump(svc, r, now);
                }
            } else if link.conn.has_waiting_input() {
                self.process(svc, key, &[], now);
            }
        }
        let quiet = quiet
            && self
                .conns
                .get(key)
                .is_some_and(|l| l.sub.is_some() && l.conn.is_responding());
        // `key` itself is not marked dirty: the server is servicing it (it
        // looks at its state again after its writes).
        if !quiet {
            self.retime_conn(key);
        }
        self.touch_sub(key);
    }

    /// `key`'s socket would block with bytes pending.
    pub fn handle_write_blocked(&mut self, key: usize, now: Instant) {
        if let Some(link) = self.conns.get_mut(key) {
            link.conn.handle_write_blocked(now);
            self.touch(key);
        }
    }

    /// The server half-closed `key`'s socket after `wants_half_close`.
    pub fn half_closed(&mut self, key: usize, now: Instant) {
        if let Some(link) = self.conns.get_mut(key) {
            link.conn.half_closed(now);
            self.touch(key);
        }
    }

    /// A worker pushed pieces for stream `r`.
    pub fn handle_ready(&mut self, svc: &mut dyn Services, r: StreamRef, now: Instant) {
        self.pump(svc, r, now);
    }

    /// Runs the timers that are due, at most [`TIMER_SLICE`] entries a
    /// call: while some are left, [`Engine::next_timeout`] is zero and the
    /// next call goes on with them before it looks at the wheel again.
    pub fn handle_timeouts(&mut self, svc: &mut dyn Services, now: Instant) {
        let mut expired = std::mem::take(&mut self.expired);
        let now_ms = self.now_ms(now);
        if self.expired_next >= expired.len() {
            expired.clear();
            self.expired_next = 0;
            self.wheel.poll(now_ms, &mut expired);
            // Connections first (in the order they came), so a client that
            // stopped reading ends its stream as a slow consumer before the
            // stream's own timers run. (Streams alone, the usual tick, need
            // no order.)
            if expired.iter().any(|&s| s & 1 == 0) {
                let conns = &self.conns;
                expired.sort_unstable_by_key(|&s| {
                    let serial = conns.get(s / 2).map_or(u32::MAX, |l| l.serial);
                    (s & 1, if s & 1 == 0 { serial } else { 0 }, s)
                });
            }
        }
        // One slice. A slot armed again meanwhile, or whose connection or
        // stream is gone, is skipped (its new deadline stands).
        let end = expired.len().min(self.expired_next + TIMER_SLICE);
        let slice = self.expired_next..end;
        self.expired_next = end;
        for &slot in &expired[slice] {
            if self.wheel.deadline(slot).is_some() {
                continue;
            }
            let key = slot / 2;
            if slot & 1 == 0 {
                if self.conns.contains(key) {
                    self.conn_timeout(svc, key, now);
                }
            } else if let Some(s) = self.streams.by_key(key) {
                let r = StreamRef { key, id: s.id() };
                self.stream_timeout(svc, r, now, now_ms);
            }
        }
        self.expired = expired;
    }

    /// Milliseconds until the next timer, for the poll timeout.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.expired_next < self.expired.len() {
            return Some(Duration::ZERO);
        }
        self.wheel
            .next_timeout_ms(self.now_ms(now))
            .map(Duration::from_millis)
    }

    /// The drain time is over: every stream ends with `shutting_down`.
    pub fn shut_down(&mut self, svc: &mut dyn Services, now: Instant) -> usize {
        let refs = self.streams.refs();
        for &r in &refs {
            let e = StreamError::new(ErrorCode::ShuttingDown, "the server is shutting down");
            self.end_stream(svc, r, End::Error(e), false, now);
        }
        refs.len()
    }

    /// Streams in the table.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }

    /// The earliest deadline of `key` and its stream (for tests).
    pub fn deadline(&self, key: usize) -> Option<Instant> {
        let link = self.conns.get(key)?;
        let c = link.conn.next_deadline(&self.cfg);
        let s = link
            .sub
            .and_then(|r| self.stream_deadline(r))
            .map(|(d, _)| d);
        match (c, s) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---------------------------------------------------------- internals

    /// `t` on the streams' clock: nanoseconds since the loop's epoch.
    #[inline]
    fn ns(&self, t: Instant) -> u64 {
        clock_ns(&self.clock, self.epoch, t)
    }

    fn now_ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// After a connection's state changed: a closed one's stream is detached.
    fn after_conn_change(&mut self, svc: &mut dyn Services, key: usize, now: Instant) {
        if let Some(link) = self.conns.get_mut(key) {
            if link.conn.is_closed() {
                link.ttft_mark = None;
                if let Some(r) = link.sub.take() {
                    link.meta = None;
                    self.detach(svc, r, now);
                }
            }
        }
        self.touch(key);
    }

    /// Parses and dispatches every complete request in the kept input and
    /// `data`, as long as the connection is reading.
    fn process(&mut self, svc: &mut dyn Services, key: usize, data: &[u8], now: Instant) {
        if self.is_moving(key) {
            return self.moving_input(key, data);
        }
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        // Parse straight from the caller's (scratch) buffer when nothing is
        // kept; copy only what is left incomplete.
        let owned = link.conn.take_input(data);
        let input: &[u8] = if owned.is_empty() { data } else { &owned };
        let mut at = 0;
        loop {
            if at < input.len() && !self.may_route(key) {
                break;
            }
            let Some(link) = self.conns.get_mut(key) else {
                return;
            };
            let parsed = link.conn.parse(now, &self.cfg, input, &mut at);
            match parsed {
                None => break,
                Some(Parsed::Head { expect_continue }) => {
                    if expect_continue && self.refuse_on_head(svc, key, now) {
                        // The body is never read: the rest goes with it.
                        at = input.len();
                        break;
                    }
                    self.fund_or_queue(key);
                }
                Some(Parsed::Request(req)) => {
                    self.routed(req.body.len());
                    self.dispatch(svc, key, req, now);
                    if self.is_moving(key) {
                        // The rest goes with the connection, unread.
                        break;
                    }
                }
                Some(Parsed::Bad { err, line, origin }) => {
                    self.metrics.requests.fetch_add(1, Relaxed);
                    let rid = format!("{:x}", svc.next_id());
                    let path = line.as_ref().map(|l| l.path());
                    let limits = self.cfg.limits();
                    let (meta, reply) =
                        router::bad_request(&self.cfg, rid, &err, path, origin.as_deref(), &limits);
                    self.reply(svc, key, &meta, &reply, now);
                }
            }
        }
        let moving = self.is_moving(key);
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        link.conn.keep_rest(&self.cfg, owned, data, at);
        if moving {
            return;
        }
        link.conn
            .settle_if_peer_closed(&mut self.bufs, now, &self.cfg);
    }

    /// A head that waits for `100 Continue`: answered now (and the
    /// connection closed) if it would be refused anyway — unknown path,
    /// wrong method, no key — so the client never sends a body for nothing.
    fn refuse_on_head(&mut self, svc: &mut dyn Services, key: usize, now: Instant) -> bool {
        let Some(head) = self.conns.get(key).and_then(|l| l.conn.head()) else {
            return false;
        };
        let Some((meta, reply)) = router::refuse_on_head(&self.cfg, &self.auth, head) else {
            return false;
        };
        self.metrics.requests.fetch_add(1, Relaxed);
        let meta = Meta {
            request_id: match head.client_request_id() {
                Some(r) => r.to_string(),
                None => format!("{:x}", svc.next_id()),
            },
            ..meta
        };
        if let Some(link) = self.conns.get_mut(key) {
            link.conn.drop_request();
        }
        self.reply(svc, key, &meta, &reply, now);
        true
    }

    fn dispatch(&mut self, svc: &mut dyn Services, key: usize, req: Request, now: Instant) {
        self.metrics.requests.fetch_add(1, Relaxed);
        let id = svc.next_id();
        let sid = svc.stream_sid(id);
        let (meta, answer) = router::route(&self.cfg, &self.auth, &sid, &req);
        if let Answer::Resume { sid, .. } | Answer::Cancel { sid } = &answer {
            if let Some(owner) = self.owner_elsewhere(sid) {
                return self.hand_off(key, owner, &req);
            }
        }
        match answer {
            Answer::Reply(reply) => self.reply(svc, key, &meta, &reply, now),
            Answer::Ops(which) => {
                let (status, content_type, body) = svc.ops(which, &req);
                let reply = Reply {
                    status,
                    content_type,
                    body,
                    headers: Vec::new(),
                    close: false,
                };
                self.reply(svc, key, &meta, &reply, now);
            }
            Answer::Stream {
                gen,
                encoder,
                resumable,
            } => self.start_stream(svc, key, id, sid, meta, &gen, encoder, resumable, now),
            Answer::Resume {
                sid,
                after,
                quiet_miss,
            } => self.resume(svc, key, meta, &sid, after, quiet_miss, now),
            Answer::Cancel { sid } => {
                // Not here: maybe on another instance (with a store).
                let meta = if self.stream_by_sid(&sid).is_none() {
                    match self.cancel_remote(svc, key, meta, &sid) {
                        Ok(()) => return,
                        Err(meta) => meta,
                    }
                } else {
                    meta
                };
                let found = self.cancel_by_sid(svc, &sid, meta.principal.as_deref(), now);
                let reply = router::cancelled(&meta, &sid, found);
                self.reply(svc, key, &meta, &reply, now);
            }
        }
    }

    /// Writes a whole response to `key` and logs it.
    fn reply(&mut self, svc: &mut dyn Services, key: usize, meta: &Meta, r: &Reply, now: Instant) {
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        if r.status >= 400 {
            self.metrics.refused(r.status);
        }
        let current = link.conn.take_current();
        svc.responded(&Access {
            line: current.as_ref().map(|c| &c.0),
            status: r.status,
            request_id: &meta.request_id,
            principal: meta.principal.as_deref(),
            duration: current.as_ref().map_or(Duration::ZERO, |c| now - c.1),
            peer: link.peer,
        });
        let headers: Vec<(&str, &str)> = meta
            .cors
            .iter()
            .chain(r.headers.iter())
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        link.conn.respond(
            &mut self.bufs,
            now,
            &self.cfg,
            &Response {
                status: r.status,
                content_type: r.content_type,
                body: &r.body,
                request_id: &meta.request_id,
                headers: &headers,
                version: meta.version,
                keep_alive: meta.keep_alive && !r.close,
            },
        );
    }

    fn conn_timeout(&mut self, svc: &mut dyn Services, key: usize, now: Instant) {
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        match link.conn.handle_timeout(&mut self.bufs, now, &self.cfg) {
            Expired::Nothing => {}
            Expired::Idle => {
                self.metrics.connections_timed_out.fetch_add(1, Relaxed);
            }
            Expired::RequestTimeout => {
                self.metrics.connections_timed_out.fetch_add(1, Relaxed);
                let rid = format!("{:x}", svc.next_id());
                // A body that waited for the budget all along was the
                // server's delay, not the client's.
                let (meta, reply) = if link.conn.is_unfunded() {
                    log::debug!("request body never admitted to the budget: 503");
                    router::overloaded_close(&self.cfg, rid)
                } else {
                    log::debug!("request head not received in time: 408");
                    router::request_timeout(&self.cfg, rid)
                };
                if let Some(link) = self.conns.get_mut(key) {
                    link.conn.drop_request();
                }
                self.reply(svc, key, &meta, &reply, now);
            }
            Expired::WriteStalled => {
                self.metrics.connections_timed_out.fetch_add(1, Relaxed);
                if let Some(r) = link.sub {
                    let msg = format!(
                        "the client accepted no bytes for {} ms",
                        self.cfg.write_timeout_ms
                    );
                    let e = StreamError::new(ErrorCode::SlowConsumer, msg);
                    self.end_stream(svc, r, End::Error(e), false, now);
                }
            }
        }
        self.after_conn_change(svc, key, now);
    }

    /// The subscriber of `r` left; the stream's policy decides what follows.
    fn detach(&mut self, svc: &mut dyn Services, r: StreamRef, now: Instant) {
        let now_ns = self.ns(now);
        let Some(stream) = self.streams.get_mut(r) else {
            return;
        };
        let window = Duration::from_millis(self.cfg.resume_window_ms);
        match stream.handle_detach(now_ns, window) {
            Detach::Cancel => self.end_stream(svc, r, End::Disconnected, false, now),
            Detach::Keep(_) => {
                log::debug!("stream {:x}: detached; resumable for {window:?}", r.id);
                if !stream.is_ended() {
                    self.metrics.streams_detached.fetch_add(1, Relaxed);
                }
                self.touch_stream(r);
            }
        }
    }
}

mod ending;
mod flow;
mod intake;
mod loops;
mod remote;
mod resume;
mod services;
mod sim_services;
mod timers;

use timers::{conn_slot, ns_since};

pub use intake::ROUTE_BUDGET;

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
