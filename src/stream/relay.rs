//! A stream's side of the shared resume store: which of its events were
//! handed to the store, clients attached on other instances, and relays —
//! streams of other instances, read back from the store for a client that
//! resumed here.

use std::sync::Arc;
use std::time::Duration;

use super::{Admission, Prod, Producer, Stored, Stream, StreamCx};
use crate::backend::GenRequest;
use crate::pool::TokenSink;

/// What a stream hands to the shared store.
#[derive(Debug, PartialEq, Eq)]
pub enum Shipped<'a> {
    /// An encoded event; `terminal`: the stream's last.
    Event {
        seq: u64,
        bytes: &'a [u8],
        terminal: bool,
    },
    /// The stream ended without a terminal event: nothing to resume.
    Gone,
}

impl Stream {
    /// A relay of another instance's stream `a.sid` for a client that
    /// resumed here after event `after`; the store feeds `sink` (see
    /// [`Stream::relay_verdict`]). Its head waits for the verdict.
    pub fn relay(cx: &StreamCx, a: Admission, after: u64, sink: Arc<TokenSink>) -> Stream {
        let mut s = Stream::new(cx, a, &GenRequest::default(), Producer::Relay(sink));
        s.tokens = u32::try_from(after).unwrap_or(u32::MAX);
        s.awaiting = true;
        s
    }

    pub fn is_relay(&self) -> bool {
        matches!(self.prod, Prod::Relay(_))
    }

    /// A relay still waiting: `Some(true)` once the store found the stream
    /// (the head can go out), `Some(false)` when there is nothing to
    /// resume, `None` while it looks.
    pub fn relay_verdict(&self) -> Option<bool> {
        let Prod::Relay(sink) = &self.prod else {
            return Some(true);
        };
        if !self.awaiting {
            return Some(true);
        }
        if sink.started_at().is_some() {
            Some(true)
        } else if sink.has_pieces() {
            Some(false)
        } else {
            None
        }
    }

    /// Stops whatever feeds a relay (its client will not get its events).
    pub fn abandon(&mut self) {
        if let Prod::Relay(sink) = &self.prod {
            sink.cancel();
        }
        self.awaiting = false;
    }

    /// The verdict was acted on.
    pub fn stop_awaiting(&mut self) {
        self.awaiting = false;
    }

    pub fn is_awaiting(&self) -> bool {
        self.awaiting
    }

    /// From now on its events go to the shared store too.
    pub fn store_events(&mut self) {
        self.stored = Stored::Upto(0);
    }

    /// Whether its events go to the shared store.
    pub fn is_stored(&self) -> bool {
        matches!(self.stored, Stored::Upto(_))
    }

    /// Events were lost on the way to the store: no more are sent.
    pub fn store_broken(&mut self) {
        if matches!(self.stored, Stored::Upto(_)) {
            self.stored = Stored::Broken;
        }
    }

    /// Hands the events the store has not had yet to `out` (and `Gone`
    /// once, when the stream ended without a terminal event).
    pub fn ship(&mut self, out: &mut dyn FnMut(&str, Shipped<'_>)) {
        if self.stored == Stored::Broken && self.ended {
            // The store forgets it (and whatever it kept of it).
            out(&self.sid, Shipped::Gone);
            self.stored = Stored::Done;
            return;
        }
        let Stored::Upto(upto) = self.stored else {
            return;
        };
        let Some(log) = self.log.as_ref() else {
            if self.ended {
                out(&self.sid, Shipped::Gone);
                self.stored = Stored::Done;
            }
            return;
        };
        let last = self.ended.then(|| u64::from(self.tokens) + 1);
        let mut shipped = u64::from(upto);
        log.for_each_after(shipped, |seq, bytes| {
            let terminal = Some(seq) == last;
            out(
                &self.sid,
                Shipped::Event {
                    seq,
                    bytes,
                    terminal,
                },
            );
            shipped = seq;
        });
        self.stored = if self.ended && Some(shipped) == last {
            Stored::Done
        } else {
            Stored::Upto(u32::try_from(shipped).unwrap_or(u32::MAX))
        };
    }

    /// Whether a client receives its events, here or on another instance.
    pub fn is_attached(&self) -> bool {
        self.sub.is_some() || self.remote_sub
    }

    /// A client resumed it on another instance: it keeps going for them
    /// (the local subscriber, if any, was let go).
    pub fn remote_attach(&mut self) {
        self.remote_sub = true;
        self.sub = None;
        if !self.ended {
            self.keep_until = super::NEVER;
        }
    }

    /// That client left: with nobody here either, the resume window
    /// starts. Whether the stream is now detached.
    pub fn remote_detach(&mut self, now_ns: u64, window: Duration) -> bool {
        if !self.remote_sub {
            return false;
        }
        self.remote_sub = false;
        if self.sub.is_some() || self.ended {
            return false;
        }
        self.keep_until = now_ns.saturating_add(super::duration_ns(window));
        true
    }
}
