//! The measuring process's event loop: one thread, mio (epoll, edge
//! triggered), a slab of client connections, a timer heap. It decides when
//! each request is sent (closed or open loop, ramp-up, bounds), keeps
//! keep-alive connections for reuse, applies client faults, and hands each
//! finished [`Record`] to [`Stats`]. Timing: `Instant::now()` is taken right
//! after the write that sent a request's last byte and right after each
//! read, so every figure has µs resolution and includes no parsing time of
//! ours before the read.

use crate::arrival::{Arrivals, Rng};
use crate::events::Format;
use crate::exchange::{Exchange, Outcome, Record, Step};
use crate::http::build_request;
use crate::progress::{self, CpuMeter};
use crate::request::{Bodies, Target};
use crate::stats::{Slo, Stats};
use crate::transport::{self, Transport};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How requests are paced.
pub enum Load {
    /// `users` virtual users, each sending its next request when its stream ends.
    Closed { users: usize },
    /// Requests on the arrival process's schedule; at most `max_inflight` at once.
    Open {
        arrivals: Arrivals,
        max_inflight: usize,
    },
}

/// Client faults: a share of the measured requests gets one of these.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub fraction: f64,
    pub disconnect_after: Option<u64>,
    pub slow_reader: Option<u64>,
    pub stall: Option<Duration>,
    pub resume_after: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    Disconnect(u64),
    Slow(u64),
    Stall(Duration),
    Resume(u64),
}

/// A UUID-shaped (version 4 layout) request id: 64 bits of the run, 48 of the request number.
pub fn request_id(run: u64, id: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        run >> 32,
        (run >> 16) & 0xffff,
        (run >> 4) & 0xfff,
        ((run & 0xf) << 8) | ((id >> 48) & 0xff),
        id & 0xffff_ffff_ffff
    )
}

/// Everything the loop needs to know.
pub struct Plan {
    pub target: Target,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub format: Format,
    pub headers: Vec<(String, String)>,
    pub request_ids: bool,
    pub bodies: Bodies,
    pub load: Load,
    pub requests: Option<u64>,
    pub warmup: u64,
    pub duration: Option<Duration>,
    pub ramp_up: Duration,
    pub timeout: Duration,
    pub faults: Faults,
    pub seed: u64,
    pub source_ip: Option<IpAddr>,
    pub slos: Vec<Slo>,
    pub progress: bool,
    /// Random part of our X-Request-Id values (which are UUID-shaped:
    /// some servers, llama-cpp-python's among them, refuse anything else).
    pub run_id: u64,
}

struct Job {
    id: u64,
    ex: Exchange,
    user: Option<usize>,
    fault: Fault,
    request: Vec<u8>,
    body: Vec<u8>,
    deadline: Instant,
    stall_done: bool,
    bucket: Option<(f64, Instant)>,
    /// Sent on a connection that had carried an earlier request.
    reused: bool,
    retried: bool,
    resumed: bool,
}

struct Conn {
    t: Transport,
    gen: u64,
    connecting: bool,
    written: usize,
    job: Option<Job>,
    paused: bool,
    used: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Timeout,
    Unpause,
}

/// Samples shown live and kept per second.
pub struct Sampler<'a> {
    /// Held streams open right now (from the holder processes).
    pub held_open: &'a dyn Fn() -> u64,
}

pub struct Engine<'a> {
    plan: Plan,
    poll: Poll,
    conns: Slab<Conn>,
    idle: Vec<(usize, u64)>,
    timers: BinaryHeap<Reverse<(Instant, u64, usize, TimerKind)>>,
    backlog: VecDeque<(u64, Instant)>,
    ready_users: Vec<usize>,
    rng: Rng,
    start: Instant,
    issued: u64,
    users_started: usize,
    next_arrival: Option<Instant>,
    inflight: u64,
    next_gen: u64,
    stats: Stats,
    buf: Vec<u8>,
    cpu: CpuMeter,
    next_tick: Instant,
    last_done: u64,
    sampler: Sampler<'a>,
    /// Peak CPU in one second (% of one core).
    pub cpu_peak: f64,
    pub cpu_busy_seconds: u64,
    ticks: u64,
}

const READ_BUF: usize = 64 * 1024;

impl<'a> Engine<'a> {
    pub fn new(plan: Plan, sampler: Sampler<'a>) -> io::Result<Self> {
        let now = Instant::now();
        let open = matches!(plan.load, Load::Open { .. });
        let slos = plan.slos.clone();
        let seed = plan.seed;
        Ok(Engine {
            plan,
            poll: Poll::new()?,
            conns: Slab::new(),
            idle: Vec::new(),
            timers: BinaryHeap::new(),
            backlog: VecDeque::new(),
            ready_users: Vec::new(),
            rng: Rng::new(seed.wrapping_mul(31).wrapping_add(5)),
            start: now,
            issued: 0,
            users_started: 0,
            next_arrival: None,
            inflight: 0,
            next_gen: 0,
            stats: Stats::new(now, slos, open),
            buf: vec![0; READ_BUF],
            cpu: CpuMeter::new(now),
            next_tick: now + Duration::from_secs(1),
            last_done: 0,
            sampler,
            cpu_peak: 0.0,
            cpu_busy_seconds: 0,
            ticks: 0,
        })
    }

    fn total_wanted(&self) -> Option<u64> {
        self.plan.requests.map(|n| n + self.plan.warmup)
    }

    /// May a request intended at `t` still be sent?
    fn may_issue(&self, t: Instant) -> bool {
        if self.total_wanted().is_some_and(|n| self.issued >= n) {
            return false;
        }
        self.plan.duration.is_none_or(|d| t < self.start + d)
    }

    /// Runs the whole load; returns the aggregated results.
    pub fn run(mut self) -> io::Result<(Stats, f64, u64)> {
        let mut events = Events::with_capacity(4096);
        self.start = Instant::now();
        self.stats.origin = Some(self.start);
        self.cpu = CpuMeter::new(self.start);
        self.next_tick = self.start + Duration::from_secs(1);
        if let Load::Open { arrivals, .. } = &mut self.plan.load {
            self.next_arrival = Some(self.start + arrivals.next_offset());
        }
        // A hard stop, whatever happens: the bound plus the timeout plus slack.
        let hard_stop = self
            .plan
            .duration
            .map(|d| self.start + d + self.plan.timeout + Duration::from_secs(10));
        loop {
            let now = Instant::now();
            self.issue_due(now);
            self.fire_timers(now);
            if now >= self.next_tick {
                self.tick(now);
            }
            if self.finished(now) {
                break;
            }
            if hard_stop.is_some_and(|h| now >= h) {
                self.abort_all(now);
                break;
            }
            let wake = self.next_wake(now);
            let wait = wake.saturating_duration_since(Instant::now());
            // epoll waits in whole ms: spin for the last fraction of one.
            let wait = if wait < Duration::from_micros(500) {
                Duration::ZERO
            } else {
                wait
            };
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                self.on_event(
                    ev.token().0,
                    ev.is_writable(),
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                );
            }
        }
        // the last, partial second gets its sample too
        let now = Instant::now();
        let cpu = self.cpu.sample(now);
        let (held, inflight) = ((self.sampler.held_open)(), self.inflight);
        let s = self.stats.second(now);
        if !s.sampled {
            (s.sampled, s.held_open, s.inflight, s.cpu_percent) = (true, held, inflight, cpu);
        }
        if self.plan.progress {
            progress::end_line();
        }
        for (_, c) in self.conns.iter_mut() {
            let _ = self.poll.registry().deregister(c.t.socket());
        }
        Ok((self.stats, self.cpu_peak, self.cpu_busy_seconds))
    }

    fn finished(&self, now: Instant) -> bool {
        if self.inflight > 0 || !self.backlog.is_empty() || !self.ready_users.is_empty() {
            return false;
        }
        match &self.plan.load {
            Load::Closed { .. } => !self.may_issue(now),
            Load::Open { .. } => self.next_arrival.is_none_or(|t| !self.may_issue(t)),
        }
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = self.next_tick;
        if let Some(Reverse((t, ..))) = self.timers.peek() {
            wake = wake.min(*t);
        }
        match &self.plan.load {
            Load::Closed { users } => {
                if self.users_started < *users && self.may_issue(now) {
                    wake = wake.min(self.user_start(self.users_started, *users));
                }
            }
            Load::Open { .. } => {
                if let Some(t) = self.next_arrival.filter(|&t| self.may_issue(t)) {
                    wake = wake.min(t);
                }
            }
        }
        wake
    }

    fn user_start(&self, i: usize, users: usize) -> Instant {
        self.start + self.plan.ramp_up.mul_f64(i as f64 / users as f64)
    }

    fn issue_due(&mut self, now: Instant) {
        match &mut self.plan.load {
            Load::Closed { users } => {
                let users = *users;
                while let Some(u) = self.ready_users.pop() {
                    if self.may_issue(now) {
                        self.start_job(Some(u), now, now);
                    }
                }
                while self.users_started < users
                    && self.user_start(self.users_started, users) <= now
                    && self.may_issue(now)
                {
                    let u = self.users_started;
                    self.users_started += 1;
                    self.start_job(Some(u), now, now);
                }
            }
            Load::Open { max_inflight, .. } => {
                let max = *max_inflight;
                while (self.inflight as usize) < max {
                    let Some((id, intended)) = self.backlog.pop_front() else {
                        break;
                    };
                    self.launch(id, None, intended, now);
                }
                while let Some(t) = self.next_arrival {
                    if t > now || !self.may_issue(t) {
                        break;
                    }
                    let Load::Open {
                        arrivals,
                        max_inflight,
                    } = &mut self.plan.load
                    else {
                        unreachable!()
                    };
                    let max = *max_inflight;
                    self.next_arrival = Some(self.start + arrivals.next_offset());
                    if (self.inflight as usize) < max && self.backlog.is_empty() {
                        self.start_job(None, t, now);
                    } else {
                        self.backlog.push_back((self.issued, t));
                        self.issued += 1;
                    }
                }
            }
        }
    }

    fn pick_fault(&mut self) -> Fault {
        let f = &self.plan.faults;
        let mut kinds = Vec::new();
        if let Some(k) = f.disconnect_after {
            kinds.push(Fault::Disconnect(k));
        }
        if let Some(b) = f.slow_reader {
            kinds.push(Fault::Slow(b.max(1)));
        }
        if let Some(d) = f.stall {
            kinds.push(Fault::Stall(d));
        }
        if let Some(k) = f.resume_after {
            kinds.push(Fault::Resume(k.max(1)));
        }
        if kinds.is_empty() || self.rng.unit() >= f.fraction {
            return Fault::None;
        }
        kinds[self.rng.below(kinds.len())]
    }

    fn build(&self, id: u64, body: &[u8], last_event_id: Option<&str>) -> Vec<u8> {
        let mut headers = self.plan.headers.clone();
        if self.plan.request_ids {
            headers.push(("X-Request-Id".into(), self.request_id(id)));
        }
        if let Some(l) = last_event_id {
            headers.push(("Last-Event-ID".into(), l.to_string()));
        }
        build_request(
            "POST",
            &self.plan.target.path,
            &self.plan.target.host_header,
            &headers,
            body,
        )
    }

    fn request_id(&self, id: u64) -> String {
        request_id(self.plan.run_id, id)
    }

    /// Issues request number `self.issued` (or a backlogged one) now.
    fn start_job(&mut self, user: Option<usize>, intended: Instant, now: Instant) {
        let id = self.issued;
        self.issued += 1;
        self.launch(id, user, intended, now);
    }

    fn launch(&mut self, id: u64, user: Option<usize>, intended: Instant, now: Instant) {
        let counted = id >= self.plan.warmup;
        let fault = if counted {
            self.pick_fault()
        } else {
            Fault::None
        };
        let body = self.plan.bodies.next_body().to_vec();
        let request = self.build(id, &body, None);
        let expect = self.plan.request_ids.then(|| self.request_id(id));
        let mut job = Job {
            id,
            ex: Exchange::new(
                self.plan.format,
                {
                    let mut r = Record::new(counted, intended);
                    r.faulted = fault != Fault::None;
                    r
                },
                expect,
            ),
            user,
            fault,
            request,
            body,
            deadline: now + self.plan.timeout,
            stall_done: false,
            bucket: None,
            reused: false,
            retried: false,
            resumed: false,
        };
        if let Fault::Disconnect(k) | Fault::Resume(k) = fault {
            job.ex.token_limit = Some(k);
        }
        self.inflight += 1;
        self.attach(job, now);
    }

    /// Puts a job on an idle keep-alive connection or a new one.
    fn attach(&mut self, mut job: Job, now: Instant) {
        let deadline = job.deadline;
        let id = job.id;
        while let Some((key, gen)) = self.idle.pop() {
            let Some(c) = self.conns.get_mut(key) else {
                continue;
            };
            if c.gen != gen || c.job.is_some() {
                continue;
            }
            job.reused = true;
            c.job = Some(job);
            c.written = 0;
            c.used = true;
            self.retarget_timeout(key, id, deadline);
            self.write(key);
            return;
        }
        let sock = match transport::connect(self.plan.target.addr, self.plan.source_ip) {
            Ok(s) => s,
            Err(_) => {
                job.ex.abort(Outcome::ConnectError, now);
                self.complete(job, now);
                return;
            }
        };
        let host = self.plan.target.host.clone();
        let t = match Transport::new(sock, self.plan.tls.as_ref().map(|c| (c, host.as_str()))) {
            Ok(t) => t,
            Err(_) => {
                job.ex.abort(Outcome::ConnectError, now);
                self.complete(job, now);
                return;
            }
        };
        self.next_gen += 1;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let c = entry.insert(Conn {
            t,
            gen: self.next_gen,
            connecting: true,
            written: 0,
            job: Some(job),
            paused: false,
            used: true,
        });
        if let Err(_e) = self.poll.registry().register(
            c.t.socket(),
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            let mut c = self.conns.remove(key);
            let mut job = c.job.take().expect("just attached");
            job.ex.abort(Outcome::ConnectError, now);
            self.complete(job, now);
            return;
        }
        self.retarget_timeout(key, id, deadline);
    }

    fn retarget_timeout(&mut self, key: usize, id: u64, deadline: Instant) {
        // The timeout entry names the connection now carrying the job.
        self.timers
            .push(Reverse((deadline, id, key, TimerKind::Timeout)));
    }

    fn on_event(&mut self, key: usize, writable: bool, readable: bool) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let mut just_connected = false;
        if c.connecting {
            match c.t.connected() {
                Ok(false) => return,
                Ok(true) => {
                    c.connecting = false;
                    just_connected = true;
                }
                Err(_) => {
                    self.fail_conn(key, Outcome::ConnectError);
                    return;
                }
            }
        }
        if writable || just_connected {
            self.write(key);
        }
        if readable || just_connected {
            self.read(key);
        }
    }

    fn write(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.connecting {
            return;
        }
        // The send time is taken just *before* the call that completes the
        // request: the server cannot have read it earlier, so our TTFT is
        // never below the server's own (a stamp after the call could be, when
        // this thread is descheduled as the call returns).
        let mut stamp = Instant::now();
        if c.t.flush_tls().is_err() {
            self.fail_conn(key, Outcome::Reset);
            return;
        }
        let Some(job) = c.job.as_mut() else { return };
        while c.written < job.request.len() {
            stamp = Instant::now();
            match c.t.write(&job.request[c.written..]) {
                Ok(0) => break,
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.fail_conn(key, Outcome::Reset);
                    return;
                }
            }
        }
        if c.written == job.request.len() && c.t.write_done() && job.ex.rec.sent.is_none() {
            job.ex.request_written(stamp);
        }
    }

    fn read(&mut self, key: usize) {
        loop {
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            if c.connecting {
                return;
            }
            let Some(job) = c.job.as_mut() else {
                // An idle keep-alive connection: data or EOF means it is gone.
                match c.t.read(&mut self.buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    _ => {
                        self.close(key);
                        return;
                    }
                }
            };
            if c.paused {
                return;
            }
            let mut limit = self.buf.len();
            if let Fault::Slow(bps) = job.fault {
                let now = Instant::now();
                let (allow, last) = job.bucket.get_or_insert((0.0, now));
                *allow =
                    (*allow + bps as f64 * now.duration_since(*last).as_secs_f64()).min(bps as f64);
                *last = now;
                // read in slices of 100 ms worth of bytes, not byte by byte
                let quantum = (bps as f64 / 10.0).clamp(1.0, 16384.0);
                if *allow < quantum {
                    let wait = Duration::from_secs_f64((quantum - *allow) / bps as f64);
                    c.paused = true;
                    let id = job.id;
                    self.timers
                        .push(Reverse((now + wait, id, key, TimerKind::Unpause)));
                    return;
                }
                limit = limit.min(*allow as usize);
            }
            // TLS: a read can finish the handshake and flush the request
            // queued behind it; that flush is the send, so stamp before.
            let before = matches!(c.t, Transport::Tls(..)).then(Instant::now);
            let res = c.t.read(&mut self.buf[..limit]);
            let now = Instant::now();
            let step = match res {
                Ok(0) => job.ex.on_eof(now),
                Ok(n) => {
                    if let Some((allow, _)) = job.bucket.as_mut() {
                        *allow -= n as f64;
                    }
                    job.ex.on_bytes(&self.buf[..n], now)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(before) = before {
                        if c.written == job.request.len()
                            && c.t.write_done()
                            && job.ex.rec.sent.is_none()
                        {
                            job.ex.request_written(before);
                        }
                        // what the read left queued (and its stamp)
                        self.write(key);
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.fail_conn(key, Outcome::Reset);
                    return;
                }
            };
            if let Step::Finished { keep_alive } = step {
                self.finish(key, keep_alive, now);
                return;
            }
            if self.apply_fault(key, now) {
                return;
            }
        }
    }

    /// Client faults that act on token counts. True when the connection is gone or paused.
    fn apply_fault(&mut self, key: usize, now: Instant) -> bool {
        let Some(c) = self.conns.get_mut(key) else {
            return true;
        };
        let Some(job) = c.job.as_mut() else {
            return true;
        };
        match job.fault {
            Fault::Disconnect(k) if job.ex.rec.tokens >= k && !job.ex.has_terminal() => {
                job.ex.abort(Outcome::Disconnected, now);
                self.finish(key, false, now);
                true
            }
            Fault::Stall(d) if job.ex.rec.first_token.is_some() && !job.stall_done => {
                job.stall_done = true;
                c.paused = true;
                let id = job.id;
                self.timers
                    .push(Reverse((now + d, id, key, TimerKind::Unpause)));
                true
            }
            Fault::Resume(k)
                if !job.resumed && job.ex.rec.tokens >= k && !job.ex.has_terminal() =>
            {
                self.resume(key, now);
                true
            }
            _ => false,
        }
    }

    /// Drops the connection mid-stream and asks for the rest with Last-Event-ID.
    fn resume(&mut self, key: usize, now: Instant) {
        let Some(mut c) = self.remove_conn(key) else {
            return;
        };
        let mut job = c.job.take().expect("resume needs a job");
        self.stats.resume_attempted += u64::from(job.ex.rec.counted);
        let Some(last) = job.ex.rec.last_event_id.clone() else {
            // The server sends no event ids: it cannot resume.
            self.stats.resume_unsupported += u64::from(job.ex.rec.counted);
            job.ex.abort(Outcome::Disconnected, now);
            self.complete(job, now);
            return;
        };
        let mut rec = job.ex.rec.clone();
        rec.outcome = Outcome::Pending;
        let expect = self.plan.request_ids.then(|| self.request_id(job.id));
        job.ex = Exchange::new(self.plan.format, rec, expect);
        job.request = self.build(job.id, &job.body, Some(&last));
        job.resumed = true;
        job.reused = false;
        self.attach_fresh(job, now);
    }

    /// Like `attach` but always on a new connection.
    fn attach_fresh(&mut self, job: Job, now: Instant) {
        let idle = std::mem::take(&mut self.idle);
        self.attach(job, now);
        self.idle = idle;
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, id, key, kind))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(c) = self.conns.get_mut(key) else {
                continue;
            };
            if c.job.as_ref().is_none_or(|j| j.id != id) {
                continue;
            }
            match kind {
                TimerKind::Timeout => {
                    let job = c.job.as_mut().expect("checked");
                    if job.deadline <= now {
                        job.ex.abort(Outcome::Timeout, now);
                        self.finish(key, false, now);
                    }
                }
                TimerKind::Unpause => {
                    c.paused = false;
                    self.read(key);
                }
            }
        }
    }

    fn fail_conn(&mut self, key: usize, outcome: Outcome) {
        let now = Instant::now();
        if let Some(c) = self.conns.get_mut(key) {
            if let Some(job) = c.job.as_mut() {
                // Failing before the request left (a refused TLS handshake) is a connect error.
                let outcome =
                    if outcome == Outcome::Reset && job.ex.rec.sent.is_none() && !job.reused {
                        Outcome::ConnectError
                    } else {
                        outcome
                    };
                job.ex.abort(outcome, now);
                self.finish(key, false, now);
                return;
            }
        }
        self.close(key);
    }

    fn remove_conn(&mut self, key: usize) -> Option<Conn> {
        let mut c = self.conns.try_remove(key)?;
        let _ = self.poll.registry().deregister(c.t.socket());
        Some(c)
    }

    fn close(&mut self, key: usize) {
        self.remove_conn(key);
    }

    /// The stream on `key` is over.
    fn finish(&mut self, key: usize, keep_alive: bool, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let Some(mut job) = c.job.take() else { return };
        c.paused = false;
        // A keep-alive connection the server had already closed: retry once on a new one.
        if job.ex.rec.outcome == Outcome::Reset
            && job.reused
            && !job.retried
            && job.ex.rec.head.is_none()
        {
            self.close(key);
            let mut rec = Record::new(job.ex.rec.counted, job.ex.rec.intended);
            rec.faulted = job.ex.rec.faulted;
            let expect = self.plan.request_ids.then(|| self.request_id(job.id));
            job.ex = Exchange::new(self.plan.format, rec, expect);
            if let Fault::Disconnect(k) | Fault::Resume(k) = job.fault {
                job.ex.token_limit = Some(k);
            }
            job.retried = true;
            job.reused = false;
            self.attach_fresh(job, now);
            return;
        }
        if keep_alive {
            let gen = c.gen;
            self.idle.push((key, gen));
        } else {
            self.close(key);
        }
        self.complete(job, now);
    }

    /// Counts the job and sends the next request its slot allows.
    fn complete(&mut self, job: Job, now: Instant) {
        self.inflight -= 1;
        let rec = &job.ex.rec;
        if job.resumed && rec.counted {
            self.check_resume(rec);
        }
        if rec.counted {
            self.stats.add(rec);
        }
        // The next request goes out from the loop (no recursion when
        // connects fail at once), on this turn.
        if let Some(u) = job.user {
            self.ready_users.push(u);
        }
        let _ = now;
    }

    fn check_resume(&mut self, rec: &Record) {
        match rec.outcome {
            Outcome::Http(204 | 404, _) => self.stats.resume_unsupported += 1,
            Outcome::Done => {
                let mut seqs = rec.seqs.clone();
                seqs.sort_unstable();
                let n = seqs.len();
                seqs.dedup();
                let dups = (n - seqs.len()) as u64;
                let want = rec.tokens + 1 - dups;
                let missing = want.saturating_sub(seqs.len() as u64)
                    + seqs.iter().filter(|&&s| s == 0 || s > want).count() as u64;
                self.stats.resume_duplicates += dups;
                self.stats.resume_missing += missing;
                if dups == 0 && missing == 0 {
                    self.stats.resume_exact += 1;
                }
            }
            _ => {}
        }
    }

    fn abort_all(&mut self, now: Instant) {
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.job.is_some())
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            if let Some(job) = self.conns.get_mut(key).and_then(|c| c.job.as_mut()) {
                job.ex.abort(Outcome::Timeout, now);
            }
            self.finish(key, false, now);
        }
    }

    /// Once a second: the series sample and the live line.
    fn tick(&mut self, now: Instant) {
        self.next_tick += Duration::from_secs(1);
        if self.next_tick <= now {
            self.next_tick = now + Duration::from_secs(1);
        }
        let cpu = self.cpu.sample(now);
        self.cpu_peak = self.cpu_peak.max(cpu);
        if cpu > 80.0 {
            self.cpu_busy_seconds += 1;
        }
        let held = (self.sampler.held_open)();
        let inflight = self.inflight;
        // the tick near k s samples second k-1 of the series
        self.ticks = now
            .duration_since(self.start)
            .as_secs_f64()
            .round()
            .max(1.0) as u64;
        let at = self.start + Duration::from_secs(self.ticks - 1);
        let s = self.stats.second(at);
        s.inflight = inflight;
        s.held_open = held;
        s.cpu_percent = cpu;
        s.sampled = true;
        if self.plan.progress {
            let done = self.stats.started;
            let rate = (done - self.last_done) as f64;
            self.last_done = done;
            let p99 = self.stats.ttft.quantile_ms(0.99);
            let warn = if cpu > 80.0 {
                "  (client CPU high: it may be measuring itself)"
            } else {
                ""
            };
            progress::print_line(&format!(
                "[{:>5.0}s] done {done}  in flight {inflight}  {rate:.0}/s  ttft p99 {p99:.2} ms  held {held}  cpu {cpu:.0}%{warn}",
                now.duration_since(self.start).as_secs_f64()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_uuid_shaped() {
        let a = super::request_id(0x0123_4567_89ab_cdef, 5);
        assert_eq!(a, "01234567-89ab-4cde-8f00-000000000005");
        assert_eq!(a.len(), 36);
        assert_ne!(a, super::request_id(0x0123_4567_89ab_cdef, 6));
    }
}
