//! What comes in, and how much of it at once: the process-wide budget of
//! buffered request bytes (`--max-buffered-bytes`, counted in
//! [`crate::limits::Limits`] with every other loop's) and the bodies waiting
//! for it, the routing work one loop turn may do, the idle keep-alive
//! connections closed to admit new ones at `--max-connections`, and the
//! connections per client address (`--max-connections-per-ip`).
//!
//! The budget counts what every connection holds of its requests
//! ([`crate::conn::Conn::charge`]): unread input, and for a body being read,
//! a reservation of its whole size (its `Content-Length`, or
//! `--max-body-bytes` when chunked). A body is funded when its head is read
//! if its reservation fits, else when it does, first come first served;
//! until then no more of it is read from the socket (it waits in TCP),
//! though what already arrived is read (a small request that came whole is
//! served at once). So every funded body can finish (no two uploads wait
//! for each other's memory).
//!
//! No read takes more than the budget has room for, so the total never
//! grows past it: the server's read reserves its room first
//! ([`Engine::reserve_read`]), so loops reading at once cannot overshoot
//! together. Reservations may fill [`FUND_SHARE`] of it; the rest is
//! kept for request heads (and what arrives with them), which are read
//! [`HEAD_READ`] bytes at a time once the budget is half full: so that
//! `/healthz` is still answered while uploads flood the server. A
//! connection that finds no room is read again when room comes back.
//!
//! Routing (JSON parsing included) is bounded per phase of a loop turn:
//! after [`ROUTE_BUDGET`] bytes of bodies, further complete requests wait
//! for the next phase, so that timers (the next token of every stream) run
//! between them.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::{Access, Engine, Services};
use crate::conn::Response;
use crate::http::{BodySize, Version};
use crate::router;

/// Bytes of request bodies routed in one phase of a loop turn before the
/// rest waits for the next (the first request of a phase always goes).
pub const ROUTE_BUDGET: usize = 256 * 1024;
/// Reservations of bodies may take up to 7/8 of the budget; the rest is
/// for request heads.
pub const FUND_SHARE: (usize, usize) = (7, 8);
/// Once the budget is half full, a connection between bodies is read this
/// much at a time (a request head fits; an upload's first bytes stay few).
pub const HEAD_READ: usize = 4096;

/// The engine's bookkeeping of what comes in.
pub(super) struct Intake {
    /// Bytes of the budget reserved for the read in flight
    /// ([`Engine::reserve_read`]).
    in_flight: usize,
    /// Connections whose body waits for funding, first come first served.
    waiting: VecDeque<(usize, u32)>,
    /// Kept-alive connections by when they went idle (entries are checked
    /// when used: a connection that got busy since is skipped).
    idle: VecDeque<(usize, u32, Instant)>,
    /// Body bytes that may still be routed in this phase.
    route_left: usize,
    /// Something was routed in this phase.
    routed: bool,
    /// Connections with complete requests left for the next phase.
    deferred: VecDeque<(usize, u32)>,
    /// Connections not read for want of room in the budget.
    starved: Vec<(usize, u32)>,
}

impl Default for Intake {
    fn default() -> Intake {
        Intake {
            in_flight: 0,
            waiting: VecDeque::new(),
            idle: VecDeque::new(),
            // Unbounded until the driver starts phases (the server does;
            // tests and benches that feed requests directly need not).
            route_left: usize::MAX,
            routed: false,
            deferred: VecDeque::new(),
            starved: Vec::new(),
        }
    }
}

/// What the engine keeps per connection for the intake.
#[derive(Default)]
pub(super) struct Mark {
    /// This connection's part of the buffered bytes.
    pub charged: usize,
    /// The idle start already queued in [`Intake::idle`].
    pub idle: Option<Instant>,
    /// The address counted in [`crate::limits::Limits::count_ip`].
    pub ip: Option<IpAddr>,
    /// In [`Intake::deferred`]: not read until its kept requests are routed.
    pub deferred: bool,
    /// In [`Intake::starved`].
    pub starved: bool,
}

impl<S> Engine<S> {
    /// How many bytes the server may read from `key` now (0: none). A body
    /// waiting for the budget, or requests left for the next phase, are not
    /// read; otherwise no more than the budget (and the connection's own
    /// reservation) has room for. A connection refused for want of room is
    /// read again when there is some ([`Engine::fund_waiting`]).
    pub fn read_allowance(&mut self, key: usize) -> usize {
        let n = self.allowance(key);
        if n == 0 && self.allowance_ignoring_budget(key) {
            if let Some(link) = self.conns.get_mut(key).filter(|l| !l.mark.starved) {
                link.mark.starved = true;
                self.intake.starved.push((key, link.serial));
            }
        }
        n
    }

    /// What the server reads from `key` now: [`Engine::read_allowance`]
    /// capped at `max`, the part beyond the connection's own reservation
    /// reserved in the process-wide budget until [`Engine::end_read`] (the
    /// next call ends the previous reservation too).
    pub fn reserve_read(&mut self, key: usize, max: usize) -> usize {
        self.end_read();
        let n = self.read_allowance(key).min(max);
        let Some(link) = self.conns.get_mut(key) else {
            return 0;
        };
        let c = &link.conn;
        if n == 0 || (!c.is_reading() && !c.is_responding()) {
            // Nothing, or bytes that are dropped: nothing to reserve.
            return n;
        }
        let own = if c.is_reading() && c.body_size().is_some() {
            c.reserve_slack().min(n)
        } else {
            0
        };
        let got = self
            .limits
            .reserve_buffered(n - own, self.cfg.max_buffered_bytes);
        self.intake.in_flight = got;
        if own + got == 0 && !link.mark.starved {
            // Another loop took the room first: read again when some is back.
            link.mark.starved = true;
            self.intake.starved.push((key, link.serial));
        }
        own + got
    }

    /// The read of [`Engine::reserve_read`] is counted (or failed): its
    /// reservation goes back.
    pub fn end_read(&mut self) {
        let n = std::mem::take(&mut self.intake.in_flight);
        if n > 0 {
            self.limits.release_buffered(n);
            store_gauge(&self.limits, self.intake.in_flight, &self.metrics);
        }
    }

    /// [`Engine::read_allowance`] without noting anything.
    pub fn allowance(&self, key: usize) -> usize {
        let Some(link) = self.conns.get(key) else {
            return 0;
        };
        let c = &link.conn;
        if link.mark.deferred || !c.wants_read(&self.cfg) || self.is_moving(key) {
            return 0;
        }
        if !c.is_reading() && !c.is_responding() {
            // Closing: what it reads is dropped.
            return usize::MAX;
        }
        let budget = self.cfg.max_buffered_bytes;
        let charged = self.limits.buffered();
        let room = budget.saturating_sub(charged);
        if c.is_reading() && c.body_size().is_some() {
            // A funded body: its own reservation's slack, and the room.
            return c.reserve_slack().saturating_add(room);
        }
        if charged >= budget / 2 {
            room.min(HEAD_READ)
        } else {
            room
        }
    }

    /// Whether `key` would be read but for the budget.
    fn allowance_ignoring_budget(&self, key: usize) -> bool {
        self.conns
            .get(key)
            .is_some_and(|l| !l.mark.deferred && l.conn.wants_read(&self.cfg))
    }

    /// Request bytes held (or reserved) by every connection of the process.
    pub fn buffered_bytes(&self) -> usize {
        self.limits.buffered()
    }

    /// Funds the bodies waiting for the budget that fit now, first come
    /// first served, and marks the connections starved of room for reading
    /// again if there is room (the server reads them again). The server
    /// calls it once per loop turn.
    pub fn fund_waiting(&mut self) {
        if !self.intake.starved.is_empty() && self.limits.buffered() < self.cfg.max_buffered_bytes {
            for (key, serial) in std::mem::take(&mut self.intake.starved) {
                if let Some(link) = self.conns.get_mut(key).filter(|l| l.serial == serial) {
                    link.mark.starved = false;
                    self.touch(key);
                }
            }
        }
        while let Some(&(key, serial)) = self.intake.waiting.front() {
            let valid = self
                .conns
                .get(key)
                .is_some_and(|l| l.serial == serial && l.conn.is_unfunded());
            if valid && !self.fund_body(key) {
                return;
            }
            self.intake.waiting.pop_front();
            if valid {
                self.touch(key);
            }
        }
    }

    /// Starts a new phase of routing (the server calls it before the
    /// readiness events of a turn, and before the rereads).
    pub fn new_phase(&mut self) {
        self.intake.route_left = ROUTE_BUDGET;
        self.intake.routed = false;
    }

    /// Whether requests wait for the next phase.
    pub fn has_deferred(&self) -> bool {
        !self.intake.deferred.is_empty()
    }

    /// Routes the requests left for this phase, oldest first.
    pub fn serve_deferred(&mut self, svc: &mut dyn Services, now: Instant) {
        let n = self.intake.deferred.len();
        for _ in 0..n {
            let Some((key, serial)) = self.intake.deferred.pop_front() else {
                return;
            };
            match self.conns.get_mut(key) {
                Some(l) if l.serial == serial => l.mark.deferred = false,
                _ => continue,
            }
            self.process(svc, key, &[], now);
            self.touch(key);
        }
    }

    /// Closes the connection that has been idle between requests longest,
    /// to admit a new one at the connection limit; its key, if there was one.
    pub fn evict_idle(&mut self) -> Option<usize> {
        while let Some((key, serial, since)) = self.intake.idle.pop_front() {
            let Some(link) = self.conns.get_mut(key) else {
                continue;
            };
            if link.serial != serial || !link.conn.is_idle() || link.conn.idle_since() != since {
                continue;
            }
            link.mark.idle = None;
            link.conn.evict(&mut self.bufs);
            self.metrics.connections_evicted.fetch_add(1, Relaxed);
            self.touch(key);
            return Some(key);
        }
        None
    }

    /// A connection just opened: beyond `--max-connections-per-ip` from its
    /// address it gets 429 `too_many_connections` and is closed.
    pub fn check_peer_limit(&mut self, svc: &mut dyn Services, key: usize, now: Instant) {
        let limit = self.cfg.max_connections_per_ip;
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        let Some(ip) = link.mark.ip else {
            return;
        };
        let n = self.limits.ip_count(ip);
        if limit == 0 || n as usize <= limit {
            return;
        }
        // Not counted: the refused connection must not hold its address's
        // place while it closes.
        self.uncount_ip(key);
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        let rid = format!("{:x}", svc.next_id());
        let (meta, reply) = router::too_many_connections(&self.cfg, rid, limit);
        self.metrics.refused(reply.status);
        svc.responded(&Access {
            line: None,
            principal: None,
            status: reply.status,
            request_id: &meta.request_id,
            duration: std::time::Duration::ZERO,
            peer: link.peer,
        });
        link.conn.respond(
            &mut self.bufs,
            now,
            &self.cfg,
            &Response {
                status: reply.status,
                content_type: reply.content_type,
                body: &reply.body,
                request_id: &meta.request_id,
                headers: &[],
                version: Version::Http11,
                keep_alive: false,
            },
        );
        self.touch(key);
    }

    // ------------------------------------------------------------ internals

    /// Counts a new connection's address (only with a per-address limit).
    pub(super) fn count_ip(&mut self, key: usize) {
        if self.cfg.max_connections_per_ip == 0 {
            return;
        }
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(ip) = link.peer.map(|p| p.ip().to_canonical()) {
            self.limits.count_ip(ip);
            link.mark.ip = Some(ip);
        }
    }

    pub(super) fn uncount_ip(&mut self, key: usize) {
        let Some(ip) = self.conns.get_mut(key).and_then(|l| l.mark.ip.take()) else {
            return;
        };
        self.limits.uncount_ip(ip);
    }

    /// After any change to `key`: its charge in the budget, and whether it
    /// just went idle.
    pub(super) fn account(&mut self, key: usize) {
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        let charge = link.conn.charge();
        if charge != link.mark.charged {
            self.limits.recharge(link.mark.charged, charge);
            link.mark.charged = charge;
            store_gauge(&self.limits, self.intake.in_flight, &self.metrics);
        }
        if link.conn.is_idle() && link.mark.idle != Some(link.conn.idle_since()) {
            let since = link.conn.idle_since();
            link.mark.idle = Some(since);
            self.intake.idle.push_back((key, link.serial, since));
            if self.intake.idle.len() > 2 * self.conns.len() + 64 {
                self.compact_idle();
            }
        }
    }

    /// A connection leaves: its charge and its address go with it.
    pub(super) fn forget(&mut self, key: usize) {
        self.uncount_ip(key);
        if let Some(link) = self.conns.get_mut(key) {
            self.limits
                .recharge(std::mem::take(&mut link.mark.charged), 0);
            store_gauge(&self.limits, self.intake.in_flight, &self.metrics);
        }
    }

    /// The head of `key`'s request is parsed and a body follows: funds it
    /// if its reservation fits (and no earlier body waits), else queues it.
    pub(super) fn fund_or_queue(&mut self, key: usize) {
        // Entries of connections gone or funded are dropped from the front.
        while let Some(&(k, s)) = self.intake.waiting.front() {
            if self
                .conns
                .get(k)
                .is_some_and(|l| l.serial == s && l.conn.is_unfunded())
            {
                break;
            }
            self.intake.waiting.pop_front();
        }
        if self.intake.waiting.is_empty() && self.fund_body(key) {
            return;
        }
        if let Some(link) = self.conns.get(key) {
            self.intake.waiting.push_back((key, link.serial));
            self.metrics.budget_waits.fetch_add(1, Relaxed);
        }
    }

    /// Funds `key`'s body if its reservation fits (always when nothing else
    /// is held: a body is never refused for want of room it could get).
    fn fund_body(&mut self, key: usize) -> bool {
        let budget = self.cfg.max_buffered_bytes;
        let max_body = self.cfg.max_body_bytes;
        let Some(link) = self.conns.get_mut(key) else {
            return false;
        };
        let need = match link.conn.body_size() {
            Some(BodySize::Length(n)) => n,
            Some(BodySize::Chunked) => max_body,
            None => 0,
        };
        // What it holds now becomes part of its body: only the others count
        // (and not this loop's read in flight, which is this connection's).
        let others = self
            .limits
            .buffered()
            .saturating_sub(link.mark.charged + self.intake.in_flight);
        let share = budget / FUND_SHARE.1 * FUND_SHARE.0;
        if others + need > share && others > 0 {
            return false;
        }
        link.conn.fund(&mut self.bufs, need);
        self.account(key);
        true
    }

    /// Whether `key` may route another request in this phase; if not, it
    /// is left for the next.
    pub(super) fn may_route(&mut self, key: usize) -> bool {
        if !self.intake.routed || self.intake.route_left > 0 {
            return true;
        }
        if let Some(link) = self.conns.get_mut(key) {
            if !link.mark.deferred {
                link.mark.deferred = true;
                self.intake.deferred.push_back((key, link.serial));
                self.metrics.requests_deferred.fetch_add(1, Relaxed);
            }
        }
        false
    }

    /// A request with a body of `len` bytes is being routed.
    pub(super) fn routed(&mut self, len: usize) {
        self.intake.routed = true;
        self.intake.route_left = self.intake.route_left.saturating_sub(len);
    }

    fn compact_idle(&mut self) {
        let conns = &self.conns;
        self.intake.idle.retain(|&(k, s, since)| {
            conns
                .get(k)
                .is_some_and(|l| l.serial == s && l.conn.is_idle() && l.conn.idle_since() == since)
        });
    }
}

/// `sluice_request_bytes_buffered`: the process's bytes, without this
/// loop's read in flight (a reservation, not bytes).
fn store_gauge(
    limits: &crate::limits::Limits,
    in_flight: usize,
    metrics: &crate::metrics::Metrics,
) {
    let n = limits.buffered().saturating_sub(in_flight);
    metrics.request_bytes_buffered.store(n as i64, Relaxed);
}
