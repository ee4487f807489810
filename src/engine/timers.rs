//! When each connection and each stream next needs the engine: one wheel
//! entry per connection and one per stream, for its earliest deadline,
//! re-armed lazily (an entry armed too early fires, finds nothing due and
//! is re-armed for the real deadline). Touching a connection marks it
//! dirty for the server and re-arms it; its stream is re-armed only when
//! the connection could have made the stream's deadline earlier (room to
//! write came back), so a paced token costs one deadline computation.

use std::time::{Duration, Instant};

use super::Engine;
use crate::stream::{duration_ns, StreamRef};

/// The wheel slot of connection `key` (connections and streams share the
/// wheel: even slots are connections, odd ones streams).
#[inline]
pub(super) fn conn_slot(key: usize) -> usize {
    key * 2
}

/// The wheel slot of the stream in table slot `key`.
#[inline]
pub(super) fn stream_slot(key: usize) -> usize {
    key * 2 + 1
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
    /// deadline earlier: its entry is not armed, or its deadline was
    /// computed while its subscriber had no room (so it left out the next
    /// simulated token). Otherwise nothing a connection does can make the
    /// deadline earlier.
    pub(super) fn touch_sub(&mut self, key: usize) {
        let Some(r) = self.conns.get(key).and_then(|l| l.sub) else {
            return;
        };
        let armed = self.wheel.deadline(stream_slot(r.key)).is_some();
        if self
            .streams
            .get(r)
            .is_some_and(|s| !armed || s.timer_roomless())
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
        self.rearm(conn_slot(key), want);
    }

    /// Arms `slot` for tick `want` unless it is armed at or before it (it
    /// fires, finds the real deadline later, and re-arms then: lazy
    /// re-arming); `None` disarms it.
    #[inline]
    pub(super) fn rearm(&mut self, slot: usize, want: Option<u64>) {
        match want {
            Some(at) => self.wheel.arm_by(slot, at),
            None => {
                self.wheel.disarm(slot);
            }
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
        let Some(stream) = self.streams.get_mut(r) else {
            return;
        };
        stream.set_timer_roomless(!room);
        let want = want.map(|w| {
            if limited {
                tick_of_ns(w.min(stream.time_limit(&self.cfg)))
            } else {
                tick_of_ns(w)
            }
        });
        self.rearm(stream_slot(r.key), want);
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
