//! A stream's events on their way to its subscriber: admission (the
//! stream is created, its connection attached and its head sent), the pump
//! that moves what the producer has ready through the stream into the
//! connection's output, and the stream's own timer (time limit, resume
//! window, heartbeats). The paced path — a simulated token due, encoded
//! into one chunk, the stream re-armed — runs through here once per token.

use std::time::Instant;

use super::timers::{stream_slot, tick_of_ns};
use super::{Engine, Services};
use crate::backend::GenRequest;
use crate::encode::Encoder;
use crate::router::{self, Meta};
use crate::stream::{Admission, End, Stream, StreamCx, StreamRef};

impl<S> Engine<S> {
    /// Admits a stream, attaches `key` to it and sends its head (when
    /// streaming), or refuses it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_stream(
        &mut self,
        svc: &mut dyn Services,
        key: usize,
        id: u64,
        sid: Box<str>,
        meta: Meta,
        gen: &GenRequest,
        encoder: Box<dyn Encoder>,
        resumable: bool,
        now: Instant,
    ) {
        let r = StreamRef {
            key: self.streams.vacant_key(),
            id,
        };
        let producer = match svc.admit(r, gen) {
            Ok(p) => p,
            Err(refusal) => {
                let reply = router::refused(&meta, &refusal);
                return self.reply(svc, key, &meta, &reply, now);
            }
        };
        let now_ns = self.ns(now);
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        let line = link.conn.take_current().map(|c| c.0).unwrap_or_default();
        let streaming = encoder.streaming();
        let scx = StreamCx {
            now_ns,
            cfg: &self.cfg,
            metrics: &self.metrics,
        };
        let replay = (resumable && self.cfg.resume_window_ms > 0)
            .then_some(self.cfg.resume_buffer_bytes as usize);
        let admission = Admission {
            id,
            sid: sid.clone(),
            request_id: meta.request_id.clone(),
            line,
            encoder,
            conn: (key, link.serial),
            replay,
        };
        let mut stream = Stream::new(&scx, admission, gen, producer);
        if let Some(r) = &self.redactor {
            // First in the chain: no later stage (the replay log) sees a secret.
            stream.push_stage(Box::new(r.stage()));
        }
        stream.set_peer(link.peer);
        stream.set_principal(meta.principal.clone());
        let headers: Vec<(&str, &str)> = std::iter::once(("X-Stream-Id", &*sid))
            .chain(meta.cors.iter().map(|(k, v)| (*k, v.as_str())))
            .collect();
        let head = streaming.then_some((meta.request_id.as_str(), headers.as_slice()));
        link.conn
            .begin_body(&mut self.bufs, head, meta.version, meta.keep_alive);
        if streaming {
            link.conn.append_body(&mut self.bufs, |b| stream.open(b));
        }
        let inserted = self.streams.insert(stream);
        debug_assert_eq!(inserted, r);
        let h = self.sid_hasher.hash(sid.as_bytes());
        self.by_sid.insert(h, r);
        link.sub = Some(r);
        // Only a whole answer needs the request's meta at the end (its
        // head is written then); a stream's head went out already.
        if !streaming {
            link.meta = Some(Box::new(meta));
        }
        self.store_new_stream(svc, r);
        self.pump(svc, r, now);
        self.touch_stream(r);
    }

    /// Moves what stream `r` has ready to its subscriber, up to the
    /// high-water mark, and ends it when its producer is done. A detached
    /// resumable stream goes on into its replay log.
    ///
    /// Whether an event just went out to the subscriber on the paced path
    /// (then no heartbeat can be due).
    pub(super) fn pump(&mut self, svc: &mut dyn Services, r: StreamRef, now: Instant) -> bool {
        let now_ns = self.ns(now);
        let Some(stream) = self.streams.get_mut(r) else {
            return false;
        };
        if stream.is_awaiting() {
            if !self.relay_ready(svc, r, now) {
                // Still waiting for the store: the timer stays armed (its
                // time limit), or nothing would end a relay whose store
                // never answers.
                self.touch_stream(r);
                return false;
            }
            return self.pump(svc, r, now);
        }
        let hwm = self.cfg.high_water();
        let scx = StreamCx {
            now_ns,
            cfg: &self.cfg,
            metrics: &self.metrics,
        };
        let logged = stream.log_bytes();
        let logging = logged != 0 || stream.is_resumable();
        let mut progress = Default::default();
        let mut hold_end = false;
        let sub = stream.subscriber();
        match sub.and_then(|(key, serial)| {
            self.conns
                .get_mut(key)
                .filter(|l| l.serial == serial)
                .map(|l| (key, l))
        }) {
            Some((key, link)) => {
                let pending = link.conn.pending_len();
                if pending >= hwm {
                    link.held = true;
                    self.touch_stream(r);
                    return false;
                }
                link.conn.append_body(&mut self.bufs, |b| {
                    progress = stream.pump(&scx, b, hwm - pending);
                });
                // A worker's pieces left in its queue are taken on the
                // next write; a simulated token waits only for its timer
                // or for room.
                let before = pending;
                let pending = link.conn.pending_len();
                link.held = !stream.is_simulated() || pending >= hwm / 2;
                if progress.first_token {
                    if let Some((_, t0, _)) = link.ttft_mark {
                        // A pipelined stream's first token is still
                        // unwritten: count it now (a slight underestimate)
                        // rather than lose it.
                        self.metrics.ttft.observe_ns(now_ns.saturating_sub(t0));
                    }
                    link.ttft_mark = Some((link.conn.appended_total(), stream.parsed_at(), r));
                    // The first token goes out before the stream's end is
                    // done with (its terminal event, summary, removal).
                    hold_end = stream.is_streaming();
                }
                if !link.dirty {
                    link.dirty = true;
                    self.dirty.push(key);
                }
                // The usual paced token: re-armed here, with the stream
                // and its room at hand (no look-ups again).
                if !logging && progress.end.is_none() && !progress.log_full {
                    let room = pending < hwm;
                    stream.set_timer_roomless(!room);
                    let want = stream.next_wake(&self.cfg, room);
                    let tick = tick_of_ns(want.min(stream.time_limit(&self.cfg)));
                    self.wheel.arm_by(stream_slot(r.key), tick);
                    if !self.over_budget.is_empty() {
                        self.shed_over_budget(svc, now);
                    }
                    return pending > before;
                }
            }
            None if sub.is_none() => {
                let mut scratch = std::mem::take(&mut self.scratch);
                progress = stream.pump(&scx, &mut scratch, usize::MAX);
                scratch.clear();
                self.scratch = scratch;
            }
            None => {
                self.touch_stream(r);
                return false;
            }
        }
        if logging {
            self.ship(svc, r);
            self.account_log(r, logged);
        }
        if let Some(end) = progress.end {
            if hold_end {
                self.ends_due.push((r, end));
            } else {
                self.end_stream(svc, r, *end, true, now);
            }
        } else if progress.log_full {
            log::debug!("stream {:x}: detached and its replay log is full", r.id);
            self.end_stream(svc, r, End::Disconnected, false, now);
        } else {
            self.touch_stream(r);
        }
        if !self.over_budget.is_empty() {
            self.shed_over_budget(svc, now);
        }
        false
    }

    /// `now_ms`: `now` as the wheel's tick (rounded down).
    pub(super) fn stream_timeout(
        &mut self,
        svc: &mut dyn Services,
        r: StreamRef,
        now: Instant,
        now_ms: u64,
    ) {
        let now_ns = self.ns(now);
        let scx = StreamCx {
            now_ns,
            cfg: &self.cfg,
            metrics: &self.metrics,
        };
        let Some(stream) = self.streams.get(r) else {
            return;
        };
        if stream.retention_over(now_ns) {
            return self.remove_stream(r);
        }
        // Nothing can have expired before the time limit's tick for a
        // stream with a subscriber (`now_ms` is rounded down, the tick up).
        let limit = tick_of_ns(stream.time_limit(&self.cfg));
        let may_expire = stream.subscriber().is_none() || now_ms + 1 >= limit;
        if let Some(end) = may_expire.then(|| stream.expired(&scx)).flatten() {
            if end == End::Disconnected {
                log::debug!("stream {:x}: its resume window ran out", r.id);
            }
            return self.end_stream(svc, r, end, false, now);
        }
        // The pump re-arms the stream's timer (or ends it). A token that
        // just went out is an event: no heartbeat is due.
        if self.pump(svc, r, now) {
            return;
        }
        let scx = StreamCx {
            now_ns,
            cfg: &self.cfg,
            metrics: &self.metrics,
        };
        let Some(stream) = self.streams.get_mut(r) else {
            return;
        };
        if !stream.heartbeat_due(&scx) {
            return;
        }
        if let Some((key, serial)) = stream.subscriber() {
            if let Some(link) = self.conns.get_mut(key).filter(|l| l.serial == serial) {
                link.conn
                    .append_body(&mut self.bufs, |b| stream.heartbeat_if_due(&scx, b));
                self.mark_dirty(key);
            }
        }
        self.touch_stream(r);
    }
}
