//! Hashed timer wheel holding one deadline per slot.
//!
//! The event loop arms one entry per connection and one per stream and
//! re-arms it on almost every event (a paced stream once per token), so
//! arming, disarming and firing must be O(1), allocation-free and cheap.
//! The entries are intrusive: the caller names each by a small integer
//! *slot* (the engine uses its slab keys), and the node of slot `s` lives
//! at index `s` of one `Vec`, threaded into its wheel list by `u32` links.
//! A slot holds at most one deadline: arming it again moves it. Nothing is
//! allocated per entry, no id or generation is kept: the caller disarms a
//! slot before giving its key to someone else.
//!
//! The wheel never reads a clock. Time is passed in as plain milliseconds
//! ("ticks") since an epoch the caller picks, which keeps the structure
//! deterministic and lets tests drive it without sleeping.
//!
//! A single level of [`SLOTS`] lists is used; an entry whose deadline lies
//! more than one rotation ahead simply waits in its list, its absolute
//! deadline telling `poll` to leave it alone until its turn comes. A bitmap
//! of non-empty lists lets `next_timeout_ms` and `poll` skip empty lists a
//! word at a time.

/// Number of wheel lists; a power of two so the list is `deadline & MASK`.
const SLOTS: usize = 4096;
const MASK: u64 = SLOTS as u64 - 1;
const WORDS: usize = SLOTS / 64;
/// List index for entries whose deadline had already passed when they were
/// armed. They cannot go into a wheel list: `poll` only visits lists for
/// ticks it has not processed yet, and the caller is promised such entries
/// fire on the very next `poll`, even one with the same time.
const OVERDUE: u32 = SLOTS as u32;
/// No node (end of a list), or, as a node's list, not armed.
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    deadline: u64,
    /// The list this node is linked into (a wheel list or `OVERDUE`), or
    /// `NIL` when its slot is not armed.
    list: u32,
    prev: u32,
    next: u32,
}

const UNARMED: Node = Node {
    deadline: 0,
    list: NIL,
    prev: NIL,
    next: NIL,
};

/// Single-level hashed timer wheel; see the module docs.
#[derive(Debug)]
pub struct TimerWheel {
    /// The node of each slot (grown to the highest slot armed).
    nodes: Vec<Node>,
    /// `SLOTS` wheel list heads followed by the `OVERDUE` head.
    heads: Vec<u32>,
    /// Bit `s` set iff wheel list `s` is non-empty (the overdue list is not
    /// tracked here; its head is checked directly).
    occupied: [u64; WORDS],
    /// Every tick <= `current` has been processed, so every entry in a wheel
    /// list has a deadline > `current`.
    current: u64,
    /// Slots armed.
    armed: usize,
}

impl TimerWheel {
    /// `now_ms`: the current time; entries are due relative to it.
    pub fn new(now_ms: u64) -> Self {
        TimerWheel {
            nodes: Vec::new(),
            heads: vec![NIL; SLOTS + 1],
            occupied: [0; WORDS],
            current: now_ms,
            armed: 0,
        }
    }

    /// Arms `slot` (below `u32::MAX`) to fire at `deadline_ms`, moving it
    /// if it was armed already. A deadline at or before the wheel's current
    /// time fires at the next `poll`.
    #[inline(always)]
    pub fn arm(&mut self, slot: usize, deadline_ms: u64) {
        assert!(slot < NIL as usize, "timer slot {slot} out of range");
        if slot >= self.nodes.len() {
            self.nodes.resize(slot + 1, UNARMED);
        }
        let list = if deadline_ms <= self.current {
            OVERDUE
        } else {
            (deadline_ms & MASK) as u32
        };
        let node = self.nodes[slot];
        if node.list != NIL {
            if node.list == list {
                // Same list (the same tick, or a later rotation of it).
                self.nodes[slot].deadline = deadline_ms;
                return;
            }
            self.unlink(slot as u32);
        } else {
            self.armed += 1;
        }
        let old = self.heads[list as usize];
        self.nodes[slot] = Node {
            deadline: deadline_ms,
            list,
            prev: NIL,
            next: old,
        };
        if old != NIL {
            self.nodes[old as usize].prev = slot as u32;
        }
        self.heads[list as usize] = slot as u32;
        if list != OVERDUE {
            self.occupied[list as usize / 64] |= 1 << (list % 64);
        }
    }

    /// Arms `slot` for `deadline_ms` unless it is armed already for that
    /// moment or earlier (lazy re-arming: an early entry fires, finds
    /// nothing due, and is armed again then).
    #[inline(always)]
    pub fn arm_by(&mut self, slot: usize, deadline_ms: u64) {
        match self.nodes.get(slot) {
            Some(n) if n.list != NIL && n.deadline <= deadline_ms => {}
            _ => self.arm(slot, deadline_ms),
        }
    }

    /// Disarms `slot`; whether it was armed.
    pub fn disarm(&mut self, slot: usize) -> bool {
        match self.nodes.get(slot) {
            Some(n) if n.list != NIL => {}
            _ => return false,
        }
        self.unlink(slot as u32);
        self.nodes[slot].list = NIL;
        self.armed -= 1;
        true
    }

    /// The deadline `slot` is armed for.
    #[inline]
    pub fn deadline(&self, slot: usize) -> Option<u64> {
        self.nodes
            .get(slot)
            .filter(|n| n.list != NIL)
            .map(|n| n.deadline)
    }

    /// Advances to `now_ms` and appends every slot whose deadline is <=
    /// now_ms to `expired` (those slots are disarmed). Time never goes
    /// backwards: a smaller now_ms than before is treated as the previous
    /// time.
    pub fn poll(&mut self, now_ms: u64, expired: &mut Vec<usize>) {
        // Everything on the overdue list was due at or before `current`.
        let mut idx = self.heads[OVERDUE as usize];
        while idx != NIL {
            let n = &mut self.nodes[idx as usize];
            // Unarmed: only `list` says so (the rest is rewritten on arming).
            n.list = NIL;
            self.armed -= 1;
            expired.push(idx as usize);
            idx = n.next;
        }
        self.heads[OVERDUE as usize] = NIL;

        if now_ms <= self.current {
            return;
        }
        // Ticks current+1 ..= now_ms are unprocessed. Past one rotation every
        // list is in range, so visiting each list once covers the whole gap;
        // the `deadline <= now_ms` test sorts out which rotation is due.
        let span = (now_ms - self.current).min(SLOTS as u64) as usize;
        let start = ((self.current + 1) & MASK) as usize;
        let mut offset = 0;
        while offset < span {
            let Some(dist) = self.next_occupied((start + offset) & MASK as usize) else {
                break;
            };
            // The search wraps around, so it can land on a list already
            // visited in this call; the span check stops that.
            offset += dist;
            if offset >= span {
                break;
            }
            self.expire_list((start + offset) & MASK as usize, now_ms, expired);
            offset += 1;
        }
        self.current = now_ms;
    }

    /// How long from `now_ms` until the next poll could have something to do: `None` when the wheel is empty,
    /// `Some(0)` when something is already due. May be early (a list holding only entries for a later rotation) but never late.
    pub fn next_timeout_ms(&self, now_ms: u64) -> Option<u64> {
        if self.armed == 0 {
            return None;
        }
        if self.heads[OVERDUE as usize] != NIL {
            return Some(0);
        }
        // All wheel entries are due after `current`, and an entry within the
        // next rotation sits exactly `deadline - current - 1` lists past the
        // start, so the first occupied list never comes after the earliest
        // deadline. Entries further out are bounded by a full rotation.
        let start = ((self.current.wrapping_add(1)) & MASK) as usize;
        let dist = self.next_occupied(start)? as u64;
        let tick = self.current.saturating_add(1).saturating_add(dist);
        Some(tick.saturating_sub(now_ms))
    }

    /// Number of armed slots.
    pub fn len(&self) -> usize {
        self.armed
    }

    pub fn is_empty(&self) -> bool {
        self.armed == 0
    }

    /// Fires the due entries of one list, leaving later rotations in place.
    fn expire_list(&mut self, list: usize, now_ms: u64, expired: &mut Vec<usize>) {
        let mut idx = self.heads[list];
        let mut prev = NIL;
        while idx != NIL {
            let n = &mut self.nodes[idx as usize];
            let next = n.next;
            if n.deadline <= now_ms {
                // Unlinked here (the list and its predecessor are known).
                n.list = NIL;
                self.armed -= 1;
                expired.push(idx as usize);
                if prev == NIL {
                    self.heads[list] = next;
                } else {
                    self.nodes[prev as usize].next = next;
                }
                if next != NIL {
                    self.nodes[next as usize].prev = prev;
                }
            } else {
                prev = idx;
            }
            idx = next;
        }
        if self.heads[list] == NIL {
            self.occupied[list / 64] &= !(1 << (list % 64));
        }
    }

    /// Distance (0..SLOTS) from list `from` to the first non-empty wheel
    /// list at or after it, wrapping around; `None` if every list is empty.
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
                let list = w * 64 + bits.trailing_zeros() as usize;
                return Some((list + SLOTS - from) & MASK as usize);
            }
        }
        None
    }

    /// Takes `idx` out of its list (its own node is left for the caller).
    #[inline]
    fn unlink(&mut self, idx: u32) {
        let Node {
            list, prev, next, ..
        } = self.nodes[idx as usize];
        if prev == NIL {
            self.heads[list as usize] = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
        if list != OVERDUE && self.heads[list as usize] == NIL {
            self.occupied[list as usize / 64] &= !(1 << (list % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(w: &mut TimerWheel, now: u64) -> Vec<usize> {
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
            w.arm(7, deadline);
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
        w.arm(1, 777);
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
            w.arm(3, deadline);
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
        w.arm(1, 500);
        w.arm(2, 400);
        w.arm(3, 501);
        assert_eq!(poll(&mut w, 500), vec![1, 2]);
        assert_eq!(poll(&mut w, 501), vec![3]);
    }

    #[test]
    fn time_going_backwards_is_clamped() {
        let mut w = TimerWheel::new(0);
        assert!(poll(&mut w, 1_000).is_empty());
        w.arm(1, 1_050);
        assert!(poll(&mut w, 10).is_empty());
        assert_eq!(w.next_timeout_ms(10), Some(1_040));
        assert!(poll(&mut w, 1_049).is_empty());
        assert_eq!(poll(&mut w, 1_050), vec![1]);
    }

    #[test]
    fn disarm_before_fire() {
        let mut w = TimerWheel::new(0);
        w.arm(1, 100);
        w.arm(2, 100);
        w.arm(3, 0); // overdue list
        assert!(w.disarm(1));
        assert!(w.disarm(3));
        assert!(!w.disarm(1), "second disarm");
        assert!(!w.disarm(99), "never armed");
        assert_eq!(w.len(), 1);
        assert_eq!(poll(&mut w, 100), vec![2]);
        assert!(!w.disarm(2));
    }

    #[test]
    fn a_fired_slot_is_disarmed() {
        let mut w = TimerWheel::new(0);
        w.arm(1, 10);
        assert_eq!(w.deadline(1), Some(10));
        assert_eq!(poll(&mut w, 10), vec![1]);
        assert_eq!(w.deadline(1), None);
        assert!(!w.disarm(1));
        assert!(w.is_empty());
    }

    #[test]
    fn arming_again_moves_the_deadline() {
        // (first deadline, second deadline) from a wheel at 0: later,
        // earlier, the same list a rotation on, into and out of overdue.
        let cases: &[(u64, u64)] = &[
            (10, 20),
            (20, 10),
            (10, 10 + 4096),
            (10 + 4096, 10),
            (10, 0),
            (0, 10),
            (0, 0),
        ];
        for &(first, second) in cases {
            let mut w = TimerWheel::new(0);
            w.arm(5, first);
            w.arm(6, 15);
            w.arm(5, second);
            assert_eq!(w.len(), 2);
            assert_eq!(w.deadline(5), Some(second));
            let mut fired = Vec::new();
            for now in 0..=second.max(15) {
                for k in poll(&mut w, now) {
                    fired.push((k, now));
                }
            }
            let mut want = vec![(5, second), (6, 15)];
            want.sort_by_key(|&(k, t)| (t, k));
            fired.sort_by_key(|&(k, t)| (t, k));
            assert_eq!(fired, want, "{first} then {second}");
            assert!(w.is_empty());
        }
    }

    #[test]
    fn entries_many_rotations_ahead_wait_their_turn() {
        let deadline = 600_000;
        let mut w = TimerWheel::new(0);
        w.arm(9, deadline);
        w.arm(1, 100);
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
        w.arm(1, 600_000);
        assert!(poll(&mut w, 599_999).is_empty());
        assert_eq!(poll(&mut w, 600_000), vec![1]);
    }

    #[test]
    fn long_gap_fires_everything_due_exactly_once() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut w = TimerWheel::new(0);
        let mut deadlines = Vec::new();
        for key in 0..5_000usize {
            let d = 1 + rng.below(2_000_000);
            deadlines.push((d, key));
            w.arm(key, d);
        }
        // Exact edges and same-slot-different-rotation neighbours.
        for (i, d) in [1_000_000u64, 1_000_001, 1_000_000 - 4096, 1_000_000 + 4096]
            .into_iter()
            .enumerate()
        {
            let key = 10_000 + i;
            deadlines.push((d, key));
            w.arm(key, d);
        }
        let mut due: Vec<usize> = deadlines
            .iter()
            .filter(|&&(d, _)| d <= 1_000_000)
            .map(|&(_, k)| k)
            .collect();
        due.sort_unstable();
        assert_eq!(poll(&mut w, 1_000_000), due);
        assert_eq!(w.len(), deadlines.len() - due.len());

        let mut rest: Vec<usize> = deadlines
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
                w.arm(k, d);
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
        w.arm(1, 600_000);
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
    fn arm_by_only_moves_a_deadline_earlier() {
        // (armed, asked, result)
        let cases: &[(Option<u64>, u64, u64)] = &[
            (None, 50, 50),
            (Some(10), 50, 10),
            (Some(50), 50, 50),
            (Some(90), 50, 50),
        ];
        for &(armed, asked, want) in cases {
            let mut w = TimerWheel::new(0);
            if let Some(a) = armed {
                w.arm(3, a);
            }
            w.arm_by(3, asked);
            assert_eq!(w.deadline(3), Some(want), "{armed:?} {asked}");
            assert_eq!(w.len(), 1);
        }
    }

    #[test]
    fn randomized_against_brute_force_model() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let start = 1_000_000;
        let mut w = TimerWheel::new(start);
        let mut now = start;
        // The deadline each of 300 slots is armed for.
        let mut model: Vec<Option<u64>> = vec![None; 300];
        for _ in 0..20_000 {
            let slot = rng.below(300) as usize;
            match rng.below(10) {
                0..=3 => {
                    let d = match rng.below(4) {
                        0 => now.saturating_sub(rng.below(100)),
                        1 => now + rng.below(64),
                        2 => now + rng.below(5_000),
                        _ => now + rng.below(50_000),
                    };
                    w.arm(slot, d);
                    model[slot] = Some(d);
                }
                4 | 5 => {
                    assert_eq!(w.disarm(slot), model[slot].is_some());
                    model[slot] = None;
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
                    for (k, d) in model.iter_mut().enumerate() {
                        if d.is_some_and(|d| d <= now) {
                            want.push(k);
                            *d = None;
                        }
                    }
                    assert_eq!(got, want, "poll({target}) at now {now}");
                }
            }
            assert_eq!(w.len(), model.iter().flatten().count());
            for (k, d) in model.iter().enumerate() {
                assert_eq!(w.deadline(k), *d);
            }
            let hint = w.next_timeout_ms(now);
            match model.iter().flatten().min() {
                None => assert_eq!(hint, None),
                Some(&earliest) => {
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
    fn len_tracks_arms_disarms_and_fires() {
        let mut w = TimerWheel::new(0);
        assert_eq!((w.len(), w.is_empty()), (0, true));
        w.arm(1, 10);
        w.arm(2, 20);
        w.arm(3, 0);
        w.arm(2, 25);
        assert_eq!(w.len(), 3);
        w.disarm(1);
        assert_eq!(w.len(), 2);
        w.disarm(1);
        assert_eq!(w.len(), 2);
        assert_eq!(poll(&mut w, 15), vec![3]);
        assert_eq!(w.len(), 1);
        assert_eq!(poll(&mut w, 25), vec![2]);
        assert_eq!((w.len(), w.is_empty()), (0, true));
    }

    #[test]
    fn many_arms_then_disarms_leave_wheel_empty() {
        let mut w = TimerWheel::new(0);
        for k in 0..10_000 {
            w.arm(k, (k as u64) * 37 % 100_000);
        }
        assert_eq!(w.len(), 10_000);
        for k in 0..10_000 {
            assert!(w.disarm(k));
        }
        assert_eq!(w.len(), 0);
        assert!(w.is_empty());
        assert_eq!(w.next_timeout_ms(0), None);
        assert!(w.occupied.iter().all(|&b| b == 0));
        assert!(w.heads.iter().all(|&h| h == NIL));
        assert!(poll(&mut w, 1_000_000).is_empty());
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let mut w = TimerWheel::new(u64::MAX);
        w.arm(1, u64::MAX);
        assert_eq!(w.next_timeout_ms(0), Some(0));
        assert_eq!(poll(&mut w, 0), vec![1]);
        assert!(!w.disarm(1));
        assert!(!w.disarm(usize::MAX));
        assert_eq!(w.deadline(usize::MAX), None);

        let mut w = TimerWheel::new(0);
        w.arm(2, u64::MAX);
        assert!(w.next_timeout_ms(u64::MAX).is_some());
        assert!(poll(&mut w, u64::MAX - 1).is_empty());
        assert_eq!(poll(&mut w, u64::MAX), vec![2]);
        assert!(poll(&mut w, u64::MAX).is_empty());
        assert!(poll(&mut w, 0).is_empty());
    }
}
