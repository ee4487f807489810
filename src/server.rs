//! The mio event loops: accept, readiness, the workers' waker, signals.
//! They own every socket and are the only code that touches one; everything
//! a connection or a stream decides lives in each loop's sans-IO
//! [`Engine`], which this shell feeds bytes, time and wake-ups, and whose
//! output it writes.
//!
//! `--threads N` runs N loops, each on its own thread with its own engine
//! (slab, stream table, timer wheel, buffer pool); `loops.rs` builds them
//! around one listening socket that every loop accepts from, and the
//! messages they send each other (a connection handed to the loop that
//! owns its stream, drain, reloaded keys). The limits are counted
//! process-wide in [`Limits`]; metrics are one set for the process.
//!
//! Rules it keeps (edge-triggered epoll): accept, read and write are drained
//! until `WouldBlock`, except that reading also stops after a read that
//! returned less than it had room for while no event has said the peer
//! closed (the socket held no more then, and anything arriving later
//! raises a new edge; nginx reads so with `EPOLLRDHUP` too); a write is tried as soon as there is something to
//! write, and WRITABLE is only awaited after a `WouldBlock`; spurious events
//! are harmless; the poll timeout comes from the engine's timer wheel, so an
//! idle server sleeps. Log lines are handed to the log thread once per turn,
//! after the writes (see [`crate::logging`]).
//!
//! A turn of the loop: readiness events (accept, reads, writes), timers
//! (at most a slice of them: a tick due for thousands of streams is spread
//! over several turns, each of which polls the sockets first, so a new
//! request waits for one slice, not for the whole tick), then the work left
//! for later — bodies admitted to the request budget,
//! requests deferred by the routing bound, connections with unread input
//! (each read is bounded, see `READ_BUDGET`) — so that no client, however
//! fast it sends, keeps the timers (the next token of every stream) waiting
//! for long.

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::access::AccessLog;
use crate::auth::Auth;
use crate::backend::GenRequest;
use crate::config::Config;
use crate::engine::{Access, Ended, Engine, Handoff, Resumed, Services};
use crate::http::Request;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::pool::{Pool, ReadyList, TokenSink};
use crate::router::{Ops, Refusal};
use crate::stream::{Outcome, Producer, StreamRef};

mod loops;
mod sock;

use loops::{Msg, Peers};
pub use loops::{Server, ShutdownHandle};
use sock::set_notsent_lowat;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// After the drain time, how long the final `shutting_down` events get to leave.
const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// One read buffer for the whole loop; requests are parsed from it.
const SCRATCH: usize = 64 * 1024;
/// Pieces a worker may queue ahead of a stream before it blocks.
const SINK_CAPACITY: usize = 256;
/// How long accepting pauses after `EMFILE`/`ENFILE`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Reads of [`SCRATCH`] bytes one connection gets per turn.
const READ_BUDGET: usize = 4;
/// Bytes read from all connections together in one phase of a turn; the
/// rest waits for the next (a flood of uploads on many connections must
/// not keep the timers waiting any more than one connection may).
const PHASE_READ_BUDGET: usize = 1 << 20;
/// The "accepting paused" warning is logged at most this often.
const PAUSE_WARN_EVERY: Duration = Duration::from_secs(10);

/// A connection's socket and its readiness.
struct Sock {
    sock: TcpStream,
    /// The last write would block: wait for WRITABLE.
    blocked: bool,
    /// Reading stopped because the connection would not take more input.
    read_paused: bool,
    /// An event said the peer closed its side (`EPOLLRDHUP`): reads go on
    /// until they see the end, whichever later turn does them.
    peer_closed: bool,
}

/// What the engine needs from the server (see [`Services`]).
struct Shared {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    pool: Option<Arc<Pool>>,
    ready: Arc<ReadyList>,
    next_id: u64,
    /// Ids of loop `i` of `n` are `i` modulo `n`: unique in the process.
    id_step: u64,
    /// This loop's index: stream ids name it.
    index: usize,
    /// This loop's streams (the process's are counted in `limits`).
    streams_open: usize,
    limits: Arc<Limits>,
    max_streams: usize,
    /// SIGTERM/SIGINT arrived: refuse new streams, readiness 503.
    draining: bool,
    /// This loop's link to the shared resume store (`--resume-store redis://…`).
    store: Option<crate::store::Link>,
    /// Access lines of this turn, written once its bytes are.
    access: AccessLog,
}

impl Services for Shared {
    fn next_id(&mut self) -> u64 {
        self.next_id += self.id_step;
        self.next_id
    }

    fn stream_sid(&mut self, _id: u64) -> Box<str> {
        crate::stream::sid_for_loop(self.index)
    }

    fn store(&mut self) -> Option<&mut crate::store::Link> {
        self.store.as_mut()
    }

    fn admit_relay(&mut self, r: StreamRef) -> Option<Result<Arc<TokenSink>, Refusal>> {
        self.store.as_ref()?;
        if self.draining {
            return Some(Err(Refusal {
                status: 503,
                code: "shutting_down",
                message: "the server is shutting down; retry on another instance".into(),
            }));
        }
        if !self.limits.try_start_stream(self.max_streams) {
            return Some(Err(Refusal {
                status: 503,
                code: "overloaded",
                message: format!(
                    "{} streams are running (--max-streams); retry later",
                    self.limits.streams()
                ),
            }));
        }
        self.streams_open += 1;
        self.metrics.streams_open.fetch_add(1, Relaxed);
        self.metrics.streams_started.fetch_add(1, Relaxed);
        // Room for a whole replay: the store thread never waits on it.
        Some(Ok(Arc::new(TokenSink::new(
            r.key,
            r.id,
            relay_capacity(&self.cfg),
            self.ready.clone(),
        ))))
    }

    fn relay_dropped(&mut self) {
        self.streams_open = self.streams_open.saturating_sub(1);
        self.limits.stream_ended();
        self.metrics.streams_open.fetch_sub(1, Relaxed);
        self.metrics.streams_started.fetch_sub(1, Relaxed);
    }

    fn admit(&mut self, r: StreamRef, gen: &GenRequest) -> Result<Producer, Refusal> {
        if self.draining {
            return Err(Refusal {
                status: 503,
                code: "shutting_down",
                message: "the server is shutting down; retry on another instance".into(),
            });
        }
        if !self.limits.try_start_stream(self.max_streams) {
            return Err(Refusal {
                status: 503,
                code: "overloaded",
                message: format!(
                    "{} streams are running (--max-streams); retry later",
                    self.limits.streams()
                ),
            });
        }
        let producer = match &self.pool {
            None => Producer::Sim,
            Some(pool) => {
                let sink = Arc::new(TokenSink::new(
                    r.key,
                    r.id,
                    SINK_CAPACITY,
                    self.ready.clone(),
                ));
                if pool.submit(gen.clone(), sink.clone()).is_err() {
                    self.limits.stream_ended();
                    return Err(Refusal {
                        status: 503,
                        code: "overloaded",
                        message: format!(
                            "{} requests already wait for a worker (--queue-depth); retry later",
                            self.cfg.queue_depth
                        ),
                    });
                }
                Producer::Pool(sink)
            }
        };
        self.streams_open += 1;
        self.metrics.streams_open.fetch_add(1, Relaxed);
        self.metrics.streams_started.fetch_add(1, Relaxed);
        Ok(producer)
    }

    fn ops(&mut self, which: Ops, req: &Request) -> (u16, &'static str, Vec<u8>) {
        const TEXT: &str = "text/plain; charset=utf-8";
        match which {
            Ops::Healthz => (200, TEXT, b"ok\n".to_vec()),
            Ops::Readyz if self.draining => (503, TEXT, b"draining\n".to_vec()),
            Ops::Readyz if !self.pool.as_ref().is_none_or(|p| p.backend().ready()) => {
                (503, TEXT, b"backend unreachable\n".to_vec())
            }
            Ops::Readyz if self.store.as_ref().is_some_and(|l| !l.store().is_up()) => (
                200,
                TEXT,
                b"ready (degraded: the resume store is unreachable)\n".to_vec(),
            ),
            Ops::Readyz => (200, TEXT, b"ready\n".to_vec()),
            Ops::Metrics => {
                self.metrics
                    .log_lines_dropped
                    .store(crate::logging::dropped(), Relaxed);
                // OpenMetrics only for a scraper that asks for it.
                let om = req
                    .header("accept")
                    .is_some_and(|a| a.contains("application/openmetrics-text"));
                let ct = if om {
                    "application/openmetrics-text; version=1.0.0; charset=utf-8"
                } else {
                    "text/plain; version=0.0.4; charset=utf-8"
                };
                (200, ct, self.metrics.render(om).into_bytes())
            }
        }
    }

    fn responded(&mut self, a: &Access) {
        self.access.responded(a);
    }

    fn resumed(&mut self, r: Resumed) {
        self.access.resumed(r);
    }

    fn stream_ended(&mut self, e: Ended) {
        self.streams_open = self.streams_open.saturating_sub(1);
        self.limits.stream_ended();
        let m = &self.metrics;
        m.streams_open.fetch_sub(1, Relaxed);
        match e.summary.outcome {
            Outcome::Completed => m.streams_completed.fetch_add(1, Relaxed),
            Outcome::Errored(code) => m.streams_errored[code.index()].fetch_add(1, Relaxed),
            Outcome::Disconnected => m.streams_disconnected.fetch_add(1, Relaxed),
        };
        self.access.stream_ended(e);
    }
}

struct Drain {
    /// Running streams may finish until then.
    deadline: Instant,
    /// Set once the rest were told `shutting_down`: exit by then.
    final_at: Option<Instant>,
}

/// What every loop of a process is built from.
struct Common {
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    pool: Option<Arc<Pool>>,
    limits: Arc<Limits>,
    auth: Auth,
    redactor: Option<Arc<crate::redact::Redactor>>,
    store: Option<crate::store::Store>,
}

/// One event loop: its poll, its engine, and its way to the other loops.
struct Loop {
    poll: Poll,
    listener: TcpListener,
    engine: Engine<Sock>,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    shared: Shared,
    limits: Arc<Limits>,
    /// Every loop's mailbox and waker (this one's too, at `shared.index`).
    peers: Peers,
    inbox: Receiver<Msg>,
    scratch: Vec<u8>,
    ready_list: Vec<(usize, u64)>,
    dirty: Vec<usize>,
    max_conns: usize,
    accept_retry_at: Option<Instant>,
    /// When "accepting paused" was last logged, and pauses since.
    pause_warned: Option<(Instant, u64)>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    drain: Option<Drain>,
    /// Connections (key, serial) left with unread input by their read budget.
    reread: Vec<(usize, u32)>,
    /// Bytes that may still be read in this phase ([`PHASE_READ_BUDGET`]).
    read_left: usize,
    /// The time of this turn's phase (after `epoll_wait`, and after the
    /// timers): what writes are stamped with.
    now: Instant,
}

impl Loop {
    /// Loop `index` of `count`, accepting from `listener` (registered in
    /// `poll` already), woken through `peers[index]`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        c: &Common,
        index: usize,
        count: usize,
        poll: Poll,
        listener: TcpListener,
        peers: Peers,
        inbox: Receiver<Msg>,
    ) -> Loop {
        let cfg = c.cfg.clone();
        let w = peers[index].waker.clone();
        let ready = Arc::new(ReadyList::new(move || {
            let _ = w.wake();
        }));
        let max_conns = cfg.effective_max_connections();
        let mut engine = Engine::new(cfg.clone(), c.metrics.clone(), Instant::now());
        engine.set_auth(c.auth.clone());
        engine.set_loop(index, count);
        engine.share_limits(c.limits.clone());
        if let Some(r) = &c.redactor {
            engine.set_redactor(r.clone());
        }
        Loop {
            poll,
            listener,
            engine,
            metrics: c.metrics.clone(),
            shared: Shared {
                cfg: cfg.clone(),
                metrics: c.metrics.clone(),
                pool: c.pool.clone(),
                ready,
                next_id: ((std::process::id() as u64 & 0xfff) << 32) + index as u64,
                id_step: count as u64,
                index,
                streams_open: 0,
                limits: c.limits.clone(),
                max_streams: cfg.effective_max_streams(),
                draining: false,
                access: AccessLog::default(),
                store: c.store.as_ref().map(|s| {
                    let w = peers[index].waker.clone();
                    s.link(move || {
                        let _ = w.wake();
                    })
                }),
            },
            limits: c.limits.clone(),
            peers,
            inbox,
            cfg,
            scratch: vec![0; SCRATCH],
            ready_list: Vec::new(),
            dirty: Vec::new(),
            max_conns,
            accept_retry_at: None,
            pause_warned: None,
            signals: None,
            drain: None,
            reread: Vec::new(),
            read_left: PHASE_READ_BUDGET,
            now: Instant::now(),
        }
    }

    /// SIGTERM and SIGINT start a graceful shutdown of every loop (a second
    /// one ends the drain at once); SIGHUP reloads the keys of every loop.
    fn handle_signals(&mut self) -> io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook_mio::v1_0::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
    }

    /// What the other loops sent: connections to adopt, drain, new keys.
    fn read_inbox(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                Msg::Adopt(sock, h) => self.adopt(sock, h),
                Msg::Drain => self.begin_drain(),
                Msg::Keys(auth) => self.engine.set_auth(auth),
            }
        }
    }

    /// A connection another loop handed over (it counts in the limits
    /// already).
    fn adopt(&mut self, mut sock: TcpStream, h: Handoff) {
        let key = self.engine.vacant_key();
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot register a connection handed over: {e}");
            self.limits.connection_closed();
            return;
        }
        let io = Sock {
            sock,
            blocked: false,
            read_paused: false,
            peer_closed: false,
        };
        let now = self.clock();
        let key = self.engine.adopt(&mut self.shared, io, h, now);
        self.service(key);
        self.service_dirty();
    }

    /// Hands connection `key` to the loop that owns the stream it asked for.
    fn move_out(&mut self, key: usize) {
        let Some((mut io, h)) = self.engine.take_moving(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut io.sock);
        let owner = h.owner;
        if !self.peers[owner].send(Msg::Adopt(io.sock, h)) {
            // That loop has exited (the process is shutting down): the
            // connection closes.
            self.limits.connection_closed();
        }
    }

    /// Runs the loop until a graceful shutdown completes (`Ok`) or polling
    /// fails.
    fn run(mut self) -> io::Result<()> {
        crate::logging::mark_loop_thread();
        let mut events = Events::with_capacity(1024);
        loop {
            if self.engine.has_ends_due() {
                // Every path services its connections; this is a backstop.
                self.service_dirty();
            }
            let timeout = if self.reread.is_empty() && !self.engine.has_deferred() {
                self.poll_timeout()
            } else {
                Some(Duration::ZERO)
            };
            self.new_phase();
            if let Err(e) = self.wait(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.shared.access.write();
                return Err(e);
            }
            self.now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {
                        self.read_inbox();
                        self.drain_ready();
                        self.drain_store();
                    }
                    SIGNALS => {
                        let got: Vec<i32> = self
                            .signals
                            .as_mut()
                            .map_or(Vec::new(), |s| s.pending().collect());
                        for sig in got {
                            if sig == signal_hook::consts::SIGHUP {
                                self.reload_keys();
                            } else {
                                self.peers.send_others(self.shared.index, || Msg::Drain);
                                self.begin_drain();
                            }
                        }
                    }
                    Token(key) => self.conn_event(key, ev),
                }
            }
            self.now = Instant::now();
            self.engine.handle_timeouts(&mut self.shared, self.now);
            self.service_dirty();
            // The work left for later, in a phase of its own.
            self.new_phase();
            self.engine.fund_waiting();
            if self.engine.has_deferred() {
                self.now = Instant::now();
            }
            self.engine.serve_deferred(&mut self.shared, self.now);
            self.service_dirty();
            self.serve_rereads();
            if let Some(at) = self.accept_retry_at {
                if Instant::now() >= at {
                    self.accept_retry_at = None;
                    self.accept();
                }
            }
            // The turn's events for the shared store, in one batch.
            if let Some(link) = self.shared.store.as_mut() {
                let broken = link.flush();
                if !broken.is_empty() {
                    log::warn!(
                        "resume store: its queue is full; {} streams will not be resumable on other instances",
                        broken.len()
                    );
                    self.engine.store_broken(&broken);
                }
            }
            // The turn's writes are done: now the log lines may go.
            self.shared.access.write();
            crate::logging::end_of_turn();
            if self.drain.is_some() && self.drained(Instant::now()) {
                if let Some(link) = self.shared.store.as_mut() {
                    // The streams' last events reach the store before exit.
                    link.flush();
                    link.store().wait_written(Duration::from_secs(1));
                }
                self.shared.access.write();
                log::info!("shutdown complete");
                crate::logging::end_of_turn();
                return Ok(());
            }
        }
    }

    /// SIGHUP: reads the API keys again, for every loop. Running streams
    /// are untouched; a file that does not load keeps the old keys. (A
    /// small local file, read on the loop thread: reloads are rare.)
    fn reload_keys(&mut self) {
        match Auth::from_config(&self.cfg) {
            Ok(auth) => {
                log::info!("SIGHUP: API keys reloaded: {} keys", auth.keys.len());
                self.peers
                    .send_others(self.shared.index, || Msg::Keys(auth.clone()));
                self.engine.set_auth(auth);
            }
            Err(e) => log::warn!("SIGHUP: keeping the old API keys: {e}"),
        }
    }

    /// The first call starts the drain; a second one ends it at once.
    fn begin_drain(&mut self) {
        let now = self.clock();
        match &mut self.drain {
            None => {
                log::info!(
                    "shutting down: {} streams may finish within {} ms; new streams get 503",
                    self.shared.streams_open,
                    self.cfg.drain_ms
                );
                self.shared.draining = true;
                self.drain = Some(Drain {
                    deadline: now + Duration::from_millis(self.cfg.drain_ms),
                    final_at: None,
                });
            }
            Some(d) => {
                log::info!("shutting down now");
                d.deadline = d.deadline.min(now);
            }
        }
    }

    /// Moves the drain on; true when the process may exit.
    fn drained(&mut self, now: Instant) -> bool {
        let Some(d) = &mut self.drain else {
            return false;
        };
        if now >= d.deadline && d.final_at.is_none() {
            d.final_at = Some(now + FINAL_FLUSH);
            let ended = self.engine.shut_down(&mut self.shared, now);
            if ended > 0 {
                log::info!("drain time over: ended {ended} streams with shutting_down");
            }
            self.service_dirty();
        }
        let Some(d) = &self.drain else {
            return false;
        };
        if d.final_at.is_some_and(|f| now >= f) {
            return true;
        }
        self.shared.streams_open == 0 && !self.engine.any_pending()
    }

    /// `epoll_wait` for up to `timeout`; with `--spin-us`, polls without
    /// sleeping for that long first, so an event arriving soon is taken
    /// without the kernel's wake-up.
    fn wait(&mut self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        let spin = Duration::from_micros(self.cfg.spin_us);
        if spin.is_zero() || timeout == Some(Duration::ZERO) {
            return self.poll.poll(events, timeout);
        }
        let start = Instant::now();
        loop {
            self.poll.poll(events, Some(Duration::ZERO))?;
            if !events.is_empty() {
                return Ok(());
            }
            let spent = start.elapsed();
            if spent >= spin || timeout.is_some_and(|t| spent >= t) {
                break;
            }
            std::hint::spin_loop();
        }
        let spent = start.elapsed();
        self.poll
            .poll(events, timeout.map(|t| t.saturating_sub(spent)))
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut t = self.engine.next_timeout(now);
        let drain_at = self
            .drain
            .as_ref()
            .map(|d| d.final_at.unwrap_or(d.deadline));
        for at in [self.accept_retry_at, drain_at].into_iter().flatten() {
            let d = at.saturating_duration_since(now);
            t = Some(t.map_or(d, |t| t.min(d)));
        }
        if self.drain.is_some() {
            // Re-check the exit condition at least every 50 ms.
            t = Some(t.map_or(Duration::from_millis(50), |t| {
                t.min(Duration::from_millis(50))
            }));
        }
        t
    }

    /// Accepts while the process is under `--max-connections` (every loop
    /// accepts from the one listening socket, so a connection never waits
    /// for a loop at its limit while another has room).
    fn accept(&mut self) {
        loop {
            if !self.limits.try_open_connection(self.max_conns) {
                // As nginx does: the longest-idle keep-alive connection
                // makes room (its client reconnects when it needs to) —
                // only for a connection that is waiting.
                if self.connection_waiting() {
                    if let Some(key) = self.engine.evict_idle() {
                        self.close_now(key);
                        continue;
                    }
                }
                if !self.limits.pause_accepting() {
                    self.warn_paused();
                }
                return;
            }
            // One connection's room is taken: it goes back unless one came.
            match self.listener.accept() {
                Ok((mut sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    set_notsent_lowat(&sock);
                    let key = self.engine.vacant_key();
                    if let Err(e) = self.poll.registry().register(
                        &mut sock,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register a connection from {peer}: {e}");
                        self.limits.connection_closed();
                        continue;
                    }
                    let io = Sock {
                        sock,
                        blocked: false,
                        read_paused: false,
                        peer_closed: false,
                    };
                    let now = self.clock();
                    let key = self.engine.open(io, Some(peer), now);
                    self.engine.check_peer_limit(&mut self.shared, key, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.limits.connection_closed();
                    return;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    self.limits.connection_closed();
                }
                Err(e) => {
                    self.limits.connection_closed();
                    // EMFILE/ENFILE and the like: retrying at once would spin.
                    self.metrics.accept_errors.fetch_add(1, Relaxed);
                    log::warn!("accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                    self.accept_retry_at = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// A phase of the turn begins: fresh budgets for reading and routing.
    /// The time now, which is also the turn's time from now on: a write
    /// is never stamped earlier than the engine call that queued it.
    fn clock(&mut self) -> Instant {
        let now = Instant::now();
        self.now = now;
        now
    }

    fn new_phase(&mut self) {
        self.read_left = PHASE_READ_BUDGET;
        self.engine.new_phase();
    }

    /// Logs that accepting paused, at most every [`PAUSE_WARN_EVERY`] (a
    /// server at its limit pauses often; the log must not flood).
    fn warn_paused(&mut self) {
        let now = Instant::now();
        match &mut self.pause_warned {
            Some((at, n)) if now < *at + PAUSE_WARN_EVERY => *n += 1,
            _ => {
                let more = self.pause_warned.map_or(0, |(_, n)| n);
                log::warn!(
                    "{} connections open (--max-connections), none idle: accepting paused \
                     ({more} more pauses since the last warning)",
                    self.limits.connections()
                );
                self.pause_warned = Some((now, 0));
            }
        }
    }

    /// Whether a connection waits in the listen backlog (a zero-timeout
    /// `poll` of the listener: at the limit, only then is one evicted).
    fn connection_waiting(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and its count.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & libc::POLLIN != 0
    }

    /// Closes and forgets connection `key` at once (it was evicted).
    fn close_now(&mut self, key: usize) {
        if let Some(mut io) = self.engine.remove(key) {
            let _ = self.poll.registry().deregister(&mut io.sock);
            self.limits.connection_closed();
        }
    }

    /// Gives each connection left with unread bytes another turn.
    fn serve_rereads(&mut self) {
        let list = std::mem::take(&mut self.reread);
        for (key, serial) in list {
            if self.engine.serial(key) == Some(serial) {
                self.read(key, false);
                self.service_dirty();
            }
        }
    }

    /// What the shared store brought: stops and attachments asked by
    /// other instances, answers to this loop's questions.
    fn drain_store(&mut self) {
        let Some(link) = self.shared.store.as_ref() else {
            return;
        };
        let mut items = Vec::new();
        link.take_inbound(&mut items);
        for item in items {
            let now = self.clock();
            self.engine.handle_inbound(&mut self.shared, item, now);
        }
        self.service_dirty();
    }

    fn drain_ready(&mut self) {
        let mut list = std::mem::take(&mut self.ready_list);
        self.shared.ready.take(&mut list);
        let now = self.clock();
        for &(key, id) in &list {
            self.engine
                .handle_ready(&mut self.shared, StreamRef { key, id }, now);
        }
        self.ready_list = list;
        self.service_dirty();
    }

    fn conn_event(&mut self, key: usize, ev: &mio::event::Event) {
        let Some(io) = self.engine.io_mut(key) else {
            return;
        };
        if ev.is_writable() {
            io.blocked = false;
        }
        if ev.is_error() {
            let now = self.clock();
            self.engine.handle_reset(&mut self.shared, key, now);
        } else if ev.is_readable() || ev.is_read_closed() {
            self.read(key, ev.is_read_closed());
        }
        // Writable alone: the flush below writes what waits.
        self.service(key);
        self.service_dirty();
    }

    /// Reads the socket into the engine until `WouldBlock`, at most
    /// [`READ_BUDGET`] reads at a time (and [`PHASE_READ_BUDGET`] bytes for
    /// all connections in a phase), each no larger than the engine allows:
    /// a client that sends faster than it is answered must not keep the
    /// loop from every other connection. A connection with more to read
    /// goes on [`Loop::reread`], served on the next pass of the loop.
    fn read(&mut self, key: usize, read_closed: bool) {
        self.read_reserved(key, read_closed);
        // Each read's room in the budget was reserved; it is counted now.
        self.engine.end_read();
    }

    fn read_reserved(&mut self, key: usize, read_closed: bool) {
        for _ in 0..READ_BUDGET {
            if self.read_left == 0 {
                break;
            }
            let now = self.clock();
            let allowance = self.engine.reserve_read(key, SCRATCH);
            let wants = allowance > 0;
            let Some(io) = self.engine.io_mut(key) else {
                return;
            };
            io.read_paused = false;
            io.peer_closed |= read_closed;
            let peer_closed = io.peer_closed;
            if self.engine.conn(key).is_none_or(|c| c.is_closed()) {
                return;
            }
            if !wants {
                if let Some(io) = self.engine.io_mut(key) {
                    io.read_paused = true;
                }
                // A client that leaves during a stream is noticed even with
                // reading paused. Otherwise its FIN is read in turn, after
                // the requests it sent before it.
                if read_closed && self.engine.is_attached(key) {
                    self.engine.handle_eof(&mut self.shared, key, now);
                }
                return;
            }
            let Some(io) = self.engine.io_mut(key) else {
                return;
            };
            match io.sock.read(&mut self.scratch[..allowance]) {
                Ok(0) => return self.engine.handle_eof(&mut self.shared, key, now),
                Ok(n) => {
                    self.read_left = self.read_left.saturating_sub(n);
                    self.engine
                        .handle_read(&mut self.shared, key, &self.scratch[..n], now);
                    // Short of its room: the socket is drained (no EAGAIN
                    // read needed), unless the peer's FIN is still to read.
                    if n < allowance && !peer_closed {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.engine.handle_reset(&mut self.shared, key, now),
            }
        }
        if let Some(serial) = self.engine.serial(key) {
            self.reread.push((key, serial));
        }
    }

    /// Services every connection the engine touched.
    fn service_dirty(&mut self) {
        loop {
            let mut dirty = std::mem::take(&mut self.dirty);
            self.engine.take_dirty(&mut dirty);
            if dirty.is_empty() {
                self.dirty = dirty;
                // Streams that ended with their first token: that token
                // is written now, their ends may follow.
                if self.engine.finish_written(&mut self.shared, self.now) {
                    continue;
                }
                return;
            }
            for &key in &dirty {
                self.service(key);
            }
            self.dirty = dirty;
        }
    }

    /// Writes what is pending for `key`, half-closes or closes as its
    /// connection says, and resumes reading held-back input.
    fn service(&mut self, key: usize) {
        if self.engine.is_moving(key) {
            return self.move_out(key);
        }
        let sh = &mut self.shared;
        let mut now = self.now;
        // Flush: one write carries every frame that is ready.
        loop {
            let Some((io, pending, first_token)) = self.engine.io_and_pending(key) else {
                return;
            };
            if io.blocked || pending.is_empty() {
                break;
            }
            // The turn's time does for a write (its write timeout, its
            // metrics), except where the write ends a time to first token
            // (a pump during the last write may have queued one).
            if first_token {
                now = Instant::now();
                self.now = now;
            }
            match sock::send(&io.sock, pending) {
                Ok(0) => self.engine.handle_reset(sh, key, now),
                Ok(n) => self.engine.handle_written(sh, key, n, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    io.blocked = true;
                    self.engine.handle_write_blocked(key, now);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.engine.handle_reset(sh, key, now),
            }
        }
        let Some((mut after, io)) = self.engine.after_write(key) else {
            return;
        };
        let paused = io.read_paused;
        if after.half_close {
            let _ = io.sock.shutdown(Shutdown::Write);
            self.engine.half_closed(key, now);
            after.closed = self.engine.conn(key).is_none_or(|c| c.is_closed());
        }
        let closed = after.closed;
        // Input held back (a stream ran, or answers piled up) may be read now.
        if paused && !closed && self.engine.wants_read(key) {
            if let Some(io) = self.engine.io_mut(key) {
                io.read_paused = false;
            }
            self.reread.push((key, after.serial));
        }
        if closed {
            if let Some(mut io) = self.engine.remove(key) {
                let _ = self.poll.registry().deregister(&mut io.sock);
                self.limits.connection_closed();
            }
            // Whichever loop accepting paused in, this one has room now.
            if self.limits.connections() < self.max_conns && self.limits.resume_accepting() {
                self.accept();
            }
        }
    }
}

/// How many events a relay's sink (and a stream in the shared store)
/// holds: about what `--resume-buffer-bytes` holds of small events.
fn relay_capacity(cfg: &Config) -> usize {
    (cfg.resume_buffer_bytes as usize / 32).max(1024)
}
