//! When each connection and each stream next needs the engine: one wheel
//! entry per connection and one per stream, for its earliest deadline,
//! re-armed lazily (an entry armed too early fires, finds nothing due and
//! is re-armed for the real deadline). Touching a connection marks it
//! dirty for the server and re-arms it; its stream is re-armed only when
//! the connection could have made the stream's deadline earlier (room to
//! write came back), so a paced token costs one deadline computation.

use std::time::Instant;

use super::{Engine, STREAM_TIMER};
use crate::stream::StreamRef;
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
        s.next_deadline(&self.cfg, room).map(|d| (d, room))
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
        let Some(limit) = self.stream_timers.get(r.key).map(|t| t.limit) else {
            return;
        };
        // `stream_deadline` in ticks, with the time limit's tick kept.
        let (want, room) = match self.streams.get(r) {
            None => (None, true),
            Some(s) => {
                let room = self.has_room(s.subscriber());
                let want = if s.is_ended() {
                    s.keep_until().map(|k| tick_of(self.epoch, k))
                } else {
                    Some(
                        s.next_wake(&self.cfg, room)
                            .map_or(limit, |w| tick_of(self.epoch, w).min(limit)),
                    )
                };
                (want, room)
            }
        };
        let Some(slot) = self.stream_timers.get_mut(r.key) else {
            return;
        };
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
    let d = d.saturating_duration_since(epoch);
    d.as_secs() * 1000 + u64::from(d.subsec_nanos()).div_ceil(1_000_000)
}
