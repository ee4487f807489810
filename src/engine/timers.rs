//! When each connection and each stream next needs the engine: one wheel
//! entry per connection and one per stream, for its earliest deadline,
//! re-armed lazily (an entry armed too early fires, finds nothing due and
//! is re-armed for the real deadline). Touching a connection marks it
//! dirty for the server and re-arms it; its stream is re-armed only when
//! the connection could have made the stream's deadline earlier (room to
//! write came back), so a paced token costs one deadline computation.

use std::time::{Duration, Instant};

use super::{Engine, STREAM_TIMER};
use crate::stream::{duration_ns, StreamRef};
use crate::timer::TimerId;

/// A stream's wheel entry, and how its deadline was last computed.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct StreamTimer {
    pub armed: Option<(TimerId, u64)>,
    /// The deadline was computed while its subscriber had no room (so it
    /// left out the next simulated token): room coming back must re-arm.
    /// Otherwise nothing a connection does can make the deadline earlier,
    /// and touching the connection need not touch the stream.
    pub roomless: bool,
    /// The tick of the stream's time limit (`--max-stream-ms`), which
    /// never moves.
    pub limit: u64,
}

impl<S> Engine<S> {
    /// The connection has news for the server, and maybe a new deadline
    /// (and so may its stream: room to write makes the next simulated
    /// token due again).
    pub(super) fn touch(&mut self, key: usize) {
        self.touch_conn(key);
        self.touch_sub(key);
    }

    /// Re-arms `key`'s stream if the connection may have made its
    /// deadline earlier.
    pub(super) fn touch_sub(&mut self, key: usize) {
        let Some(r) = self.conns.get(key).and_then(|l| l.sub) else {
            return;
        };
        if self
            .stream_timers
            .get(r.key)
            .is_some_and(|t| t.armed.is_none() || t.roomless)
        {
            self.touch_stream(r);
        }
    }

    /// The connection has bytes to write; nothing else changed (its
    /// charge, idleness and deadline do not depend on its output).
    pub(super) fn mark_dirty(&mut self, key: usize) {
        if let Some(link) = self.conns.get_mut(key) {
            if !link.dirty {
                link.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// [`Engine::touch`] without the stream (its caller touches it).
    pub(super) fn touch_conn(&mut self, key: usize) {
        self.mark_dirty(key);
        self.retime_conn(key);
    }

    /// [`Engine::touch_conn`] without marking it dirty (the server is
    /// servicing it already): its charge and its deadline.
    pub(super) fn retime_conn(&mut self, key: usize) {
        self.account(key);
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        let want = link
            .conn
            .next_deadline(&self.cfg)
            .map(|d| tick_of(self.epoch, d));
        let wheel_key = (u64::from(link.serial) << 32) | key as u64;
        match (want, link.timer) {
            (None, Some((id, _))) => {
                self.wheel.cancel(id);
                link.timer = None;
            }
            (Some(at), Some((id, armed))) if at < armed => {
                self.wheel.cancel(id);
                link.timer = Some((self.wheel.insert(at, wheel_key), at));
            }
            (Some(at), None) => link.timer = Some((self.wheel.insert(at, wheel_key), at)),
            // Armed at or before the deadline: it fires, finds the real
            // deadline later, and re-arms then (lazy re-arming).
            _ => {}
        }
    }

    /// The stream's next deadline, and whether its subscriber had room.
    pub(super) fn stream_deadline(&self, r: StreamRef) -> Option<(Instant, bool)> {
        let s = self.streams.get(r)?;
        let room = self.has_room(s.subscriber());
        let d = s.next_deadline(&self.cfg, room)?;
        Some((self.epoch.checked_add(Duration::from_nanos(d))?, room))
    }

    /// Whether a stream's subscriber can take more bytes (a detached
    /// stream always can).
    fn has_room(&self, sub: Option<(usize, u32)>) -> bool {
        match sub {
            Some((key, _)) => self
                .conns
                .get(key)
                .is_some_and(|l| l.conn.pending_len() < self.cfg.high_water()),
            None => true,
        }
    }

    pub(super) fn touch_stream(&mut self, r: StreamRef) {
        // `stream_deadline`, with the time limit kept.
        match self.streams.get(r) {
            None => self.arm_stream(r, None, true, false),
            Some(s) => {
                let room = self.has_room(s.subscriber());
                if s.is_ended() {
                    self.arm_stream(r, s.keep_until(), room, false);
                } else {
                    let want = s.next_wake(&self.cfg, room);
                    self.arm_stream(r, Some(want), room, true);
                }
            }
        }
    }

    /// Arms `r`'s wheel entry for `want` (nanoseconds since the epoch;
    /// `limited`: no later than its time limit), computed while its
    /// subscriber had `room` or not.
    #[inline]
    pub(super) fn arm_stream(
        &mut self,
        r: StreamRef,
        want: Option<u64>,
        room: bool,
        limited: bool,
    ) {
        let Some(slot) = self.stream_timers.get_mut(r.key) else {
            return;
        };
        let want = want.map(|w| {
            let t = tick_of_ns(w);
            if limited {
                t.min(slot.limit)
            } else {
                t
            }
        });
        slot.roomless = !room;
        let wheel_key = STREAM_TIMER | ((r.id & 0x7fff_ffff) << 32) | r.key as u64;
        match (want, slot.armed) {
            (None, Some((id, _))) => {
                self.wheel.cancel(id);
                slot.armed = None;
            }
            (Some(at), Some((id, armed))) if at < armed => {
                self.wheel.cancel(id);
                slot.armed = Some((self.wheel.insert(at, wheel_key), at));
            }
            (Some(at), None) => slot.armed = Some((self.wheel.insert(at, wheel_key), at)),
            _ => {}
        }
    }
}

/// Rounds a deadline up to the wheel's millisecond tick: firing early would
/// only re-arm, firing late never happens.
pub(super) fn tick_of(epoch: Instant, d: Instant) -> u64 {
    tick_of_ns(ns_since(epoch, d))
}

/// [`tick_of`] of a time in nanoseconds since the epoch.
#[inline]
pub(super) fn tick_of_ns(ns: u64) -> u64 {
    ns.div_ceil(1_000_000)
}

/// `t` in nanoseconds since `epoch` (0 before it): the clock of streams.
#[inline]
pub(crate) fn ns_since(epoch: Instant, t: Instant) -> u64 {
    duration_ns(t.saturating_duration_since(epoch))
}
