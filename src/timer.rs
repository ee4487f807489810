//! Hashed timer wheel holding one deadline per stream.
//!
//! The event loop arms an entry for every open stream (idle, write and
//! token deadlines) and re-arms or cancels it on almost every event, so
//! insert and cancel must be O(1) and must not allocate per entry: entries
//! live in a single [`Slab`] and are threaded into their wheel slot through
//! intrusive doubly-linked lists of slab indices.
//!
//! The wheel never reads a clock. Time is passed in as plain milliseconds
//! ("ticks") since an epoch the caller picks, which keeps the structure
//! deterministic and lets tests drive it without sleeping.
//!
//! A single level of [`SLOTS`] slots is used; an entry whose deadline lies
//! more than one rotation ahead simply waits in its slot, its absolute
//! deadline telling `poll` to leave it alone until its turn comes. A bitmap
//! of non-empty slots lets `next_timeout_ms` and `poll` skip empty slots a
//! word at a time.

use slab::Slab;

/// Number of wheel slots; a power of two so the slot is `deadline & MASK`.
const SLOTS: usize = 4096;
const MASK: u64 = SLOTS as u64 - 1;
const WORDS: usize = SLOTS / 64;
/// List head index for entries whose deadline had already passed when they
/// were inserted. They cannot go into a wheel slot: `poll` only visits
/// slots for ticks it has not processed yet, and the caller is promised
/// such entries fire on the very next `poll`, even one with the same time.
const OVERDUE: usize = SLOTS;
const NIL: usize = usize::MAX;

/// Handle of an armed entry; returned by `insert`, given back to `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerId(usize, u64);

#[derive(Debug)]
struct Entry {
    deadline: u64,
    key: u64,
    /// Distinguishes this entry from earlier occupants of the same slab
    /// slot, so a stale `TimerId` can never cancel a newer entry.
    generation: u64,
    /// List this entry is linked into: a slot index or `OVERDUE`. Stored
    /// rather than recomputed because overdue entries aren't in the slot
    /// their deadline hashes to.
    list: usize,
    prev: usize,
    next: usize,
}

/// Single-level hashed timer wheel; see the module docs.
#[derive(Debug)]
pub struct TimerWheel {
    entries: Slab<Entry>,
    /// `SLOTS` wheel slot heads followed by the `OVERDUE` head.
    heads: Vec<usize>,
    /// Bit `s` set iff wheel slot `s` is non-empty (the overdue list is not
    /// tracked here; its head is checked directly).
    occupied: [u64; WORDS],
    /// Every tick <= `current` has been processed, so every entry in a wheel
    /// slot has a deadline > `current`.
    current: u64,
    next_generation: u64,
}

impl TimerWheel {
    /// `now_ms`: the current time; entries are due relative to it.
    pub fn new(now_ms: u64) -> Self {
        TimerWheel {
            entries: Slab::new(),
            heads: vec![NIL; SLOTS + 1],
            occupied: [0; WORDS],
            current: now_ms,
            next_generation: 0,
        }
    }

    /// Arms an entry firing at `deadline_ms` carrying `key` (the caller's connection key, any u64).
    /// A deadline at or before the wheel's current time fires at the next `poll`.
    pub fn insert(&mut self, deadline_ms: u64, key: u64) -> TimerId {
        let list = if deadline_ms <= self.current {
            OVERDUE
        } else {
            (deadline_ms & MASK) as usize
        };
        let generation = self.next_generation;
        // Wrapping is harmless: a collision needs 2^64 inserts while one id
        // is kept stale and its slab slot happens to be reused at that moment.
        self.next_generation = self.next_generation.wrapping_add(1);
        // Linked at the head of its list as it is created (no second
        // look-up of the new entry).
        let old = self.heads[list];
        let idx = self.entries.insert(Entry {
            deadline: deadline_ms,
            key,
            generation,
            list,
            prev: NIL,
            next: old,
        });
        if old != NIL {
            self.entries[old].prev = idx;
        }
        self.heads[list] = idx;
        if list < SLOTS {
            self.occupied[list / 64] |= 1 << (list % 64);
        }
        TimerId(idx, generation)
    }

    /// Disarms; returns the key if the entry was still armed. A stale or already-fired id returns None and changes nothing.
    pub fn cancel(&mut self, id: TimerId) -> Option<u64> {
        match self.entries.get(id.0) {
            Some(e) if e.generation == id.1 => {}
            _ => return None,
        }
        self.unlink(id.0);
        Some(self.entries.remove(id.0).key)
    }

    /// Advances to `now_ms` and appends the key of every entry whose deadline is <= now_ms to `expired`
    /// (those entries are removed; their ids become stale). Time never goes backwards: a smaller now_ms than before is treated as the previous time.
    pub fn poll(&mut self, now_ms: u64, expired: &mut Vec<u64>) {
        // Everything on the overdue list was due at or before `current`.
        let mut idx = self.heads[OVERDUE];
        while idx != NIL {
            let e = self.entries.remove(idx);
            expired.push(e.key);
            idx = e.next;
        }
        self.heads[OVERDUE] = NIL;

        if now_ms <= self.current {
            return;
        }
        // Ticks current+1 ..= now_ms are unprocessed. Past one rotation every
        // slot is in range, so visiting each slot once covers the whole gap;
        // the `deadline <= now_ms` test sorts out which rotation is due.
        let span = (now_ms - self.current).min(SLOTS as u64) as usize;
        let start = ((self.current + 1) & MASK) as usize;
        let mut offset = 0;
        while offset < span {
            let Some(dist) = self.next_occupied((start + offset) & MASK as usize) else {
                break;
            };
            // The search wraps around, so it can land on a slot already
            // visited in this call; the span check stops that.
            offset += dist;
            if offset >= span {
                break;
            }
            self.expire_slot((start + offset) & MASK as usize, now_ms, expired);
            offset += 1;
        }
        self.current = now_ms;
    }

    /// How long from `now_ms` until the next poll could have something to do: `None` when the wheel is empty,
    /// `Some(0)` when something is already due. May be early (a slot holding only entries for a later rotation) but NEVER late.
    pub fn next_timeout_ms(&self, now_ms: u64) -> Option<u64> {
        if self.entries.is_empty() {
            return None;
        }
        if self.heads[OVERDUE] != NIL {
            return Some(0);
        }
        // All wheel entries are due after `current`, and an entry within the
        // next rotation sits exactly `deadline - current - 1` slots past the
        // start, so the first occupied slot never comes after the earliest
        // deadline. Entries further out are bounded by a full rotation.
        let start = ((self.current.wrapping_add(1)) & MASK) as usize;
        let dist = self.next_occupied(start)? as u64;
        let tick = self.current.saturating_add(1).saturating_add(dist);
        Some(tick.saturating_sub(now_ms))
    }

    /// Number of armed entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Fires the due entries of one slot, leaving later rotations in place.
    fn expire_slot(&mut self, slot: usize, now_ms: u64, expired: &mut Vec<u64>) {
        let mut idx = self.heads[slot];
        while idx != NIL {
            let e = &self.entries[idx];
            let next = e.next;
            if e.deadline <= now_ms {
                self.unlink(idx);
                expired.push(self.entries.remove(idx).key);
            }
            idx = next;
        }
    }

    /// Distance (0..SLOTS) from slot `from` to the first non-empty wheel
    /// slot at or after it, wrapping around; `None` if every slot is empty.
    fn next_occupied(&self, from: usize) -> Option<usize> {
        let word = from / 64;
        let bit = from % 64;
        let first = self.occupied[word] & (u64::MAX << bit);
        if first != 0 {
            return Some(word * 64 + first.trailing_zeros() as usize - from);
        }
        for i in 1..=WORDS {
            let w = (word + i) % WORDS;
            let mut bits = self.occupied[w];
            if i == WORDS {
                // Back at the starting word: only the bits below `from`
                // haven't been looked at yet.
                bits &= (1u64 << bit) - 1;
            }
            if bits != 0 {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                return Some((slot + SLOTS - from) & MASK as usize);
            }
        }
        None
    }

    fn unlink(&mut self, idx: usize) {
        let (list, prev, next) = {
            let e = &self.entries[idx];
            (e.list, e.prev, e.next)
        };
        if prev == NIL {
            self.heads[list] = next;
        } else {
            self.entries[prev].next = next;
        }
        if next != NIL {
            self.entries[next].prev = prev;
        }
        if list < SLOTS && self.heads[list] == NIL {
            self.occupied[list / 64] &= !(1 << (list % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(w: &mut TimerWheel, now: u64) -> Vec<u64> {
        let mut out = Vec::new();
        w.poll(now, &mut out);
        out.sort_unstable();
        out
    }

    /// Tiny xorshift64 so the randomized test needs no external crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn fires_exactly_at_deadline_not_before() {
        // (wheel start, deadline)
        let cases: &[(u64, u64)] = &[
            (0, 1),
            (0, 10),
            (0, 4095),
            (0, 4096),
            (0, 4097),
            (1_000, 5_000),
            (4_000, 4_200), // wraps around the end of the wheel
            (123_456, 123_456 + 8_191),
            (u64::MAX - 10, u64::MAX),
        ];
        for &(start, deadline) in cases {
            let mut w = TimerWheel::new(start);
            w.insert(deadline, 7);
            assert!(
                poll(&mut w, deadline - 1).is_empty(),
                "start {start} deadline {deadline}: fired early"
            );
            assert_eq!(w.len(), 1);
            assert_eq!(
                poll(&mut w, deadline),
                vec![7],
                "start {start} deadline {deadline}"
            );
            assert!(w.is_empty());
            assert!(poll(&mut w, deadline.saturating_add(10_000)).is_empty());
        }
    }

    #[test]
    fn fires_when_polled_in_small_steps() {
        let mut w = TimerWheel::new(0);
        w.insert(777, 1);
        for t in 0..777 {
            assert!(poll(&mut w, t).is_empty(), "fired early at {t}");
        }
        assert_eq!(poll(&mut w, 777), vec![1]);
    }

    #[test]
    fn past_deadlines_fire_at_next_poll() {
        // (wheel start, deadline, now passed to the next poll)
        let cases: &[(u64, u64, u64)] = &[
            (1_000, 1_000, 1_000),
            (1_000, 999, 1_000),
            (1_000, 0, 1_000),
            (1_000, 500, 10), // time going backwards still fires it
            (1_000, 1_000, 1_001),
            (u64::MAX, 5, u64::MAX),
            (u64::MAX, u64::MAX, 0),
        ];
        for &(start, deadline, now) in cases {
            let mut w = TimerWheel::new(start);
            w.insert(deadline, 3);
            assert_eq!(w.next_timeout_ms(now), Some(0), "{start} {deadline} {now}");
            assert_eq!(poll(&mut w, now), vec![3], "{start} {deadline} {now}");
            assert!(w.is_empty());
            assert_eq!(w.next_timeout_ms(now), None);
        }
    }

    #[test]
    fn deadline_at_current_time_after_poll_fires_next_poll() {
        let mut w = TimerWheel::new(0);
        assert!(poll(&mut w, 500).is_empty());
        w.insert(500, 1);
        w.insert(400, 2);
        w.insert(501, 3);
        assert_eq!(poll(&mut w, 500), vec![1, 2]);
        assert_eq!(poll(&mut w, 501), vec![3]);
    }

    #[test]
    fn time_going_backwards_is_clamped() {
        let mut w = TimerWheel::new(0);
        assert!(poll(&mut w, 1_000).is_empty());
        w.insert(1_050, 1);
        assert!(poll(&mut w, 10).is_empty());
        assert_eq!(w.next_timeout_ms(10), Some(1_040));
        assert!(poll(&mut w, 1_049).is_empty());
        assert_eq!(poll(&mut w, 1_050), vec![1]);
    }

    #[test]
    fn cancel_before_fire() {
        let mut w = TimerWheel::new(0);
        let a = w.insert(100, 1);
        let b = w.insert(100, 2);
        let c = w.insert(0, 3); // overdue list
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.cancel(c), Some(3));
        assert_eq!(w.cancel(a), None, "second cancel");
        assert_eq!(w.len(), 1);
        assert_eq!(poll(&mut w, 100), vec![2]);
        assert_eq!(w.cancel(b), None);
    }

    #[test]
    fn cancel_after_fire_returns_none() {
        let mut w = TimerWheel::new(0);
        let a = w.insert(10, 1);
        assert_eq!(poll(&mut w, 10), vec![1]);
        assert_eq!(w.cancel(a), None);
        assert_eq!(w.cancel(a), None);
        assert!(w.is_empty());
    }

    #[test]
    fn stale_id_after_slot_reuse_does_not_cancel_new_entry() {
        let mut w = TimerWheel::new(0);
        let old = w.insert(10, 1);
        assert_eq!(poll(&mut w, 10), vec![1]);
        let new = w.insert(20, 2);
        assert_eq!(old.0, new.0, "slab slot should have been reused");
        assert_eq!(w.cancel(old), None);
        assert_eq!(w.len(), 1);
        assert_eq!(poll(&mut w, 20), vec![2]);

        // Same thing when the old entry was cancelled rather than fired.
        let old = w.insert(30, 3);
        assert_eq!(w.cancel(old), Some(3));
        let new = w.insert(30, 4);
        assert_eq!(old.0, new.0);
        assert_eq!(w.cancel(old), None);
        assert_eq!(w.cancel(new), Some(4));
    }

    #[test]
    fn entries_many_rotations_ahead_wait_their_turn() {
        let deadline = 600_000;
        let mut w = TimerWheel::new(0);
        w.insert(deadline, 9);
        w.insert(100, 1);
        // Poll exactly at every earlier tick that hashes to the same slot,
        // plus the tick just before and after, one step at a time.
        let mut t = deadline % SLOTS as u64;
        while t < deadline {
            for now in [t.saturating_sub(1), t, t + 1] {
                let fired = poll(&mut w, now);
                assert!(!fired.contains(&9), "fired early at {now}");
            }
            assert!(w.next_timeout_ms(t + 1).unwrap() <= deadline - (t + 1));
            t += SLOTS as u64;
        }
        assert!(poll(&mut w, deadline - 1).is_empty());
        assert_eq!(w.len(), 1);
        assert_eq!(poll(&mut w, deadline), vec![9]);
    }

    #[test]
    fn far_entry_survives_long_gaps_that_skip_its_rotations() {
        let mut w = TimerWheel::new(0);
        w.insert(600_000, 1);
        assert!(poll(&mut w, 599_999).is_empty());
        assert_eq!(poll(&mut w, 600_000), vec![1]);
    }

    #[test]
    fn long_gap_fires_everything_due_exactly_once() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut w = TimerWheel::new(0);
        let mut deadlines = Vec::new();
        for key in 0..5_000u64 {
            let d = 1 + rng.below(2_000_000);
            deadlines.push((d, key));
            w.insert(d, key);
        }
        // Exact edges and same-slot-different-rotation neighbours.
        for (i, d) in [1_000_000u64, 1_000_001, 1_000_000 - 4096, 1_000_000 + 4096]
            .into_iter()
            .enumerate()
        {
            let key = 10_000 + i as u64;
            deadlines.push((d, key));
            w.insert(d, key);
        }
        let mut due: Vec<u64> = deadlines
            .iter()
            .filter(|&&(d, _)| d <= 1_000_000)
            .map(|&(_, k)| k)
            .collect();
        due.sort_unstable();
        assert_eq!(poll(&mut w, 1_000_000), due);
        assert_eq!(w.len(), deadlines.len() - due.len());

        let mut rest: Vec<u64> = deadlines
            .iter()
            .filter(|&&(d, _)| d > 1_000_000)
            .map(|&(_, k)| k)
            .collect();
        rest.sort_unstable();
        assert_eq!(poll(&mut w, 3_000_000), rest);
        assert!(w.is_empty());
        assert!(poll(&mut w, 10_000_000).is_empty());
    }

    #[test]
    fn next_timeout_table() {
        // (wheel start, deadlines, now, expected)
        let cases: &[(u64, &[u64], u64, Option<u64>)] = &[
            (0, &[], 0, None),
            (0, &[10], 0, Some(10)),
            (0, &[10, 5, 300], 0, Some(5)),
            (0, &[10], 4, Some(6)),
            (0, &[10], 10, Some(0)),
            (0, &[10], 50, Some(0)),
            (100, &[50], 100, Some(0)),
            (4_090, &[4_100], 4_090, Some(10)),
            (0, &[u64::MAX], 0, Some(u64::MAX % SLOTS as u64)),
            (u64::MAX - 1, &[u64::MAX], u64::MAX - 1, Some(1)),
        ];
        for &(start, deadlines, now, expected) in cases {
            let mut w = TimerWheel::new(start);
            for (k, &d) in deadlines.iter().enumerate() {
                w.insert(d, k as u64);
            }
            assert_eq!(
                w.next_timeout_ms(now),
                expected,
                "start {start} deadlines {deadlines:?} now {now}"
            );
        }
    }

    #[test]
    fn next_timeout_for_later_rotation_is_early_not_late() {
        let mut w = TimerWheel::new(0);
        w.insert(600_000, 1);
        let mut now = 0;
        // Following the hints must reach the deadline without overshooting.
        for _ in 0..1_000 {
            let Some(dt) = w.next_timeout_ms(now) else {
                break;
            };
            assert!(now + dt <= 600_000);
            now += dt.max(1);
            let fired = poll(&mut w, now);
            if now < 600_000 {
                assert!(fired.is_empty());
            } else {
                assert_eq!(fired, vec![1]);
            }
        }
        assert_eq!(now, 600_000);
        assert!(w.is_empty());
    }

    #[test]
    fn randomized_against_brute_force_model() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let start = 1_000_000;
        let mut w = TimerWheel::new(start);
        let mut now = start;
        // (id, deadline, key) of armed entries.
        let mut model: Vec<(TimerId, u64, u64)> = Vec::new();
        let mut dead: Vec<TimerId> = Vec::new();
        let mut next_key = 0u64;
        for _ in 0..5_000 {
            match rng.below(10) {
                0..=3 => {
                    let d = match rng.below(4) {
                        0 => now.saturating_sub(rng.below(100)),
                        1 => now + rng.below(64),
                        2 => now + rng.below(5_000),
                        _ => now + rng.below(50_000),
                    };
                    let id = w.insert(d, next_key);
                    model.push((id, d, next_key));
                    next_key += 1;
                }
                4 | 5 => {
                    if !model.is_empty() {
                        let i = rng.below(model.len() as u64) as usize;
                        let (id, _, key) = model.swap_remove(i);
                        assert_eq!(w.cancel(id), Some(key));
                        dead.push(id);
                    }
                    if !dead.is_empty() {
                        let id = dead[rng.below(dead.len() as u64) as usize];
                        assert_eq!(w.cancel(id), None);
                    }
                }
                _ => {
                    let target = match rng.below(6) {
                        0 => now.saturating_sub(rng.below(50)),
                        1 => now + rng.below(5),
                        2 => now + rng.below(300),
                        3 => now + rng.below(10_000),
                        _ => match w.next_timeout_ms(now) {
                            Some(dt) => now + dt,
                            None => now + 1,
                        },
                    };
                    // The wheel treats a backwards step as "no time passed".
                    now = now.max(target);
                    let got = poll(&mut w, target);
                    let mut want = Vec::new();
                    model.retain(|&(id, d, k)| {
                        if d <= now {
                            want.push(k);
                            dead.push(id);
                            false
                        } else {
                            true
                        }
                    });
                    want.sort_unstable();
                    assert_eq!(got, want, "poll({target}) at now {now}");
                }
            }
            assert_eq!(w.len(), model.len());
            let hint = w.next_timeout_ms(now);
            match model.iter().map(|&(_, d, _)| d).min() {
                None => assert_eq!(hint, None),
                Some(earliest) => {
                    let hint = hint.expect("non-empty wheel must give a timeout");
                    assert!(
                        hint <= earliest.saturating_sub(now),
                        "hint {hint} later than earliest {earliest} at now {now}"
                    );
                }
            }
        }
    }

    #[test]
    fn len_tracks_inserts_cancels_and_fires() {
        let mut w = TimerWheel::new(0);
        assert_eq!((w.len(), w.is_empty()), (0, true));
        let a = w.insert(10, 1);
        let _b = w.insert(20, 2);
        let _c = w.insert(0, 3);
        assert_eq!(w.len(), 3);
        w.cancel(a);
        assert_eq!(w.len(), 2);
        w.cancel(a);
        assert_eq!(w.len(), 2);
        assert_eq!(poll(&mut w, 15), vec![3]);
        assert_eq!(w.len(), 1);
        assert_eq!(poll(&mut w, 20), vec![2]);
        assert_eq!((w.len(), w.is_empty()), (0, true));
    }

    #[test]
    fn many_inserts_then_cancels_leave_wheel_empty() {
        let mut w = TimerWheel::new(0);
        let ids: Vec<TimerId> = (0..10_000u64)
            .map(|k| w.insert(k * 37 % 100_000, k))
            .collect();
        assert_eq!(w.len(), 10_000);
        for (k, id) in ids.into_iter().enumerate() {
            assert_eq!(w.cancel(id), Some(k as u64));
        }
        assert_eq!(w.len(), 0);
        assert!(w.is_empty());
        assert_eq!(w.next_timeout_ms(0), None);
        assert!(w.occupied.iter().all(|&b| b == 0));
        assert!(poll(&mut w, 1_000_000).is_empty());
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let mut w = TimerWheel::new(u64::MAX);
        let id = w.insert(u64::MAX, 1);
        assert_eq!(w.next_timeout_ms(0), Some(0));
        assert_eq!(poll(&mut w, 0), vec![1]);
        assert_eq!(w.cancel(id), None);
        assert_eq!(w.cancel(TimerId(usize::MAX, u64::MAX)), None);

        let mut w = TimerWheel::new(0);
        w.insert(u64::MAX, 2);
        assert!(w.next_timeout_ms(u64::MAX).is_some());
        assert!(poll(&mut w, u64::MAX - 1).is_empty());
        assert_eq!(poll(&mut w, u64::MAX), vec![2]);
        assert!(poll(&mut w, u64::MAX).is_empty());
        assert!(poll(&mut w, 0).is_empty());
    }
}
