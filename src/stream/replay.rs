//! The replay log of a resumable stream: its encoded token and terminal
//! events, by `seq`, in one buffer, so a client that reconnects with the
//! last id it saw gets every later event once, in order.
//!
//! The log starts at the first event and holds at most `limit` bytes; an
//! attached stream that outgrows it drops its oldest events (a resume from
//! before them is refused), a detached one is cancelled (the engine's
//! decision). Heartbeats are never logged.

use std::collections::VecDeque;

/// Encoded events by `seq`.
#[derive(Debug)]
pub struct ReplayLog {
    /// Event bytes; the first `head` are already dropped.
    bytes: Vec<u8>,
    head: usize,
    /// `(seq, length)` of each event kept, oldest first.
    events: VecDeque<(u64, u32)>,
    limit: usize,
}

impl ReplayLog {
    pub fn new(limit: usize) -> ReplayLog {
        ReplayLog {
            bytes: Vec::new(),
            head: 0,
            events: VecDeque::new(),
            limit,
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Whether `n` more bytes fit under the limit.
    pub fn has_room(&self, n: usize) -> bool {
        self.len() + n <= self.limit
    }

    /// Appends event `seq` (its encoded bytes).
    pub fn push(&mut self, seq: u64, event: &[u8]) {
        self.bytes.extend_from_slice(event);
        self.events.push_back((seq, event.len() as u32));
    }

    /// Drops the oldest events until at most `target` bytes are held.
    pub fn trim_to(&mut self, target: usize) {
        while self.len() > target {
            let Some((_, n)) = self.events.pop_front() else {
                break;
            };
            self.head += n as usize;
        }
        if self.head > 0 && self.head * 2 >= self.bytes.len() {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
    }

    /// Whether every event after `after` is still here (and `after` is
    /// not past the last one).
    pub fn covers(&self, after: u64) -> bool {
        let Some(&(first, _)) = self.events.front() else {
            return after == 0;
        };
        let last = self.events.back().map_or(first, |e| e.0);
        after + 1 >= first && after <= last
    }

    /// Hands every event after `after` to `f` with its seq, oldest first.
    pub fn for_each_after(&self, after: u64, mut f: impl FnMut(u64, &[u8])) {
        let mut at = self.head;
        for &(seq, len) in &self.events {
            let len = len as usize;
            if seq > after {
                f(seq, &self.bytes[at..at + len]);
            }
            at += len;
        }
    }

    /// Appends every event after `after` to `out`; how many.
    pub fn replay_after(&self, after: u64, out: &mut Vec<u8>) -> u64 {
        let mut at = self.head;
        let mut n = 0;
        for &(seq, len) in &self.events {
            let len = len as usize;
            if seq > after {
                out.extend_from_slice(&self.bytes[at..at + len]);
                n += 1;
            }
            at += len;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(n: u64) -> ReplayLog {
        let mut l = ReplayLog::new(1 << 20);
        for seq in 1..=n {
            l.push(seq, format!("e{seq};").as_bytes());
        }
        l
    }

    #[test]
    fn replays_every_event_after_a_seq_once() {
        let l = log_of(5);
        let cases = [(0, "e1;e2;e3;e4;e5;", 5), (3, "e4;e5;", 2), (5, "", 0)];
        for (after, want, n) in cases {
            let mut out = Vec::new();
            assert_eq!(l.replay_after(after, &mut out), n);
            assert_eq!(String::from_utf8(out).unwrap(), want, "after {after}");
            assert!(l.covers(after));
        }
        assert!(!l.covers(6), "past the last event");
        assert!(ReplayLog::new(10).covers(0), "nothing yet, nothing missed");
    }

    #[test]
    fn trimming_drops_the_oldest_and_refuses_resumes_from_before() {
        let mut l = log_of(9);
        l.trim_to(9);
        let mut out = Vec::new();
        l.replay_after(0, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "e7;e8;e9;");
        assert!(!l.covers(5), "e6 was dropped");
        assert!(l.covers(6) && l.covers(8));
        assert_eq!(l.len(), 9);
        assert!(l.has_room(0));
    }
}
