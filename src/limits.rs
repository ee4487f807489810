//! The counts behind the process-wide limits, shared by every event loop
//! of the process: open connections (`--max-connections`), running
//! streams (`--max-streams`), buffered request bytes
//! (`--max-buffered-bytes`), replay-log bytes (`--resume-total-bytes`)
//! and connections per client address (`--max-connections-per-ip`).
//!
//! Counts are atomics, taken with compare-and-swap where a limit must
//! never be passed; the per-address map sits behind a mutex held only for
//! one map update (never across I/O). With one loop nothing contends, and
//! each operation is one uncontended atomic.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Mutex, PoisonError};

/// What the loops of one process count together.
#[derive(Debug, Default)]
pub struct Limits {
    connections: AtomicUsize,
    streams: AtomicUsize,
    buffered: AtomicUsize,
    replay: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// A loop stopped accepting at `--max-connections`.
    accept_paused: AtomicBool,
}

/// Adds one to `c` unless it is at `max`; whether it did.
fn try_take(c: &AtomicUsize, max: usize) -> bool {
    c.fetch_update(AcqRel, Acquire, |n| (n < max).then_some(n + 1))
        .is_ok()
}

fn give_back(c: &AtomicUsize, n: usize) {
    // Never below zero, whatever the order of concurrent releases.
    let _ = c.fetch_update(AcqRel, Acquire, |v| Some(v.saturating_sub(n)));
}

impl Limits {
    // ---------------------------------------------------- connections

    /// Counts a new connection unless `max` are open; whether it did.
    pub fn try_open_connection(&self, max: usize) -> bool {
        try_take(&self.connections, max)
    }

    pub fn connection_closed(&self) {
        give_back(&self.connections, 1);
    }

    /// Open connections, every loop's.
    pub fn connections(&self) -> usize {
        self.connections.load(Acquire)
    }

    /// A loop stopped accepting at the limit; whether one had already.
    pub fn pause_accepting(&self) -> bool {
        self.accept_paused.swap(true, AcqRel)
    }

    /// Whether accepting was paused (the caller, with room now, accepts
    /// for every loop: they share one listening socket).
    pub fn resume_accepting(&self) -> bool {
        self.accept_paused.load(Acquire) && self.accept_paused.swap(false, AcqRel)
    }

    // -------------------------------------------------------- streams

    /// Counts a new stream unless `max` are running; whether it did.
    pub fn try_start_stream(&self, max: usize) -> bool {
        try_take(&self.streams, max)
    }

    pub fn stream_ended(&self) {
        give_back(&self.streams, 1);
    }

    /// Running streams, every loop's.
    pub fn streams(&self) -> usize {
        self.streams.load(Acquire)
    }

    // ----------------------------------------------- buffered requests

    /// Request bytes buffered (or reserved) by every loop.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Acquire)
    }

    /// One connection's charge went from `old` to `new` bytes.
    pub fn recharge(&self, old: usize, new: usize) {
        if new > old {
            self.buffered.fetch_add(new - old, AcqRel);
        } else if old > new {
            give_back(&self.buffered, old - new);
        }
    }

    /// Reserves up to `want` bytes of what is left of `budget`, for one
    /// read in flight (so that loops reading at the same time cannot
    /// together pass the budget); how many it reserved.
    pub fn reserve_buffered(&self, want: usize, budget: usize) -> usize {
        let mut got = 0;
        let _ = self.buffered.fetch_update(AcqRel, Acquire, |n| {
            got = want.min(budget.saturating_sub(n));
            (got > 0).then_some(n + got)
        });
        got
    }

    /// Gives back a reservation of [`Limits::reserve_buffered`].
    pub fn release_buffered(&self, n: usize) {
        give_back(&self.buffered, n);
    }

    // ---------------------------------------------------- replay logs

    /// Bytes in every loop's replay logs.
    pub fn replay(&self) -> usize {
        self.replay.load(Relaxed)
    }

    /// One loop's replay bytes went from `old` to `new`; the process total.
    pub fn replay_changed(&self, old: usize, new: usize) -> usize {
        if new >= old {
            self.replay.fetch_add(new - old, AcqRel) + (new - old)
        } else {
            give_back(&self.replay, old - new);
            self.replay.load(Acquire)
        }
    }

    // ---------------------------------------------------- per address

    /// Counts one more connection from `ip`; how many there are now.
    pub fn count_ip(&self, ip: IpAddr) -> u32 {
        let mut m = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(ip).or_insert(0);
        *n += 1;
        *n
    }

    pub fn uncount_ip(&self, ip: IpAddr) {
        let mut m = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    /// Connections from `ip` now.
    pub fn ip_count(&self, ip: IpAddr) -> u32 {
        let m = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        m.get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_limit_is_never_passed_by_threads_racing_for_it() {
        let l = Arc::new(Limits::default());
        let won: usize = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..1000).filter(|_| l.try_open_connection(100)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(won, 100);
        assert_eq!(l.connections(), 100);
        l.connection_closed();
        assert!(l.try_open_connection(100));
        assert!(!l.try_open_connection(100));
    }

    #[test]
    fn reservations_take_only_what_is_left() {
        let l = Limits::default();
        l.recharge(0, 70);
        assert_eq!(l.reserve_buffered(64, 100), 30);
        assert_eq!(l.reserve_buffered(64, 100), 0);
        l.release_buffered(30);
        l.recharge(70, 10);
        assert_eq!(l.buffered(), 10);
        assert_eq!(l.replay_changed(0, 5), 5);
        assert_eq!(l.replay_changed(5, 2), 2);
        let ip: IpAddr = [127, 0, 0, 1].into();
        assert_eq!(l.count_ip(ip), 1);
        assert_eq!(l.count_ip(ip), 2);
        l.uncount_ip(ip);
        assert_eq!(l.ip_count(ip), 1);
    }
}
