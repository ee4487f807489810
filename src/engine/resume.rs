//! Resume and stop by id: the engine's side of streams that outlive their
//! connection. A client that resumes is attached to the stream its id names
//! (after the replay of what it missed); the previous subscriber is let go
//! with `superseded`; a stop by id ends a stream wherever its client is;
//! replay logs are held to `--resume-total-bytes` (counted across every
//! loop of the process), shedding this loop's oldest detached streams
//! first.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::{Engine, Resumed, Services};
use crate::router::{self, Meta};
use crate::sse::{ErrorCode, StreamError};
use crate::stream::{End, Stream, StreamRef};

impl<S> Engine<S> {
    /// Stops the running stream `sid` if `principal` started it (or auth is
    /// off); whether there was one. Its client gets `error` `cancelled`.
    pub(super) fn cancel_by_sid(
        &mut self,
        svc: &mut dyn Services,
        sid: &str,
        principal: Option<&str>,
        now: Instant,
    ) -> bool {
        let Some(r) = self.stream_by_sid(sid) else {
            self.metrics.cancels_not_found.fetch_add(1, Relaxed);
            return false;
        };
        match self.streams.get(r) {
            Some(s) if s.principal() == principal && !s.is_ended() => {}
            _ => {
                self.metrics.cancels_not_found.fetch_add(1, Relaxed);
                return false;
            }
        }
        self.metrics.cancels.fetch_add(1, Relaxed);
        log::debug!("stream {sid}: cancelled by id");
        let e = StreamError::new(ErrorCode::Cancelled, "the stream was stopped by its id");
        self.end_stream(svc, r, End::Error(e), false, now);
        true
    }

    /// Keeps the process's replay bytes under `--resume-total-bytes`: the
    /// oldest detached streams are cancelled first; an attached stream
    /// over it loses its own oldest events.
    pub(super) fn account_log(&mut self, r: StreamRef, before: usize) {
        let Some(stream) = self.streams.get_mut(r) else {
            self.set_log_bytes(self.log_bytes.saturating_sub(before));
            return;
        };
        let after = stream.log_bytes();
        let mine = self.log_bytes.saturating_sub(before) + after;
        let total = self.limits.replay_changed(self.log_bytes, mine);
        self.log_bytes = mine;
        // One stream's log over its own limit while attached: its oldest
        // events go (a detached one stopped taking before it got there).
        let own = self.cfg.resume_buffer_bytes as usize;
        if after > own {
            stream.trim_log(own);
        }
        if total > (self.cfg.resume_total_bytes as usize) {
            if stream.is_attached() {
                let over = total - (self.cfg.resume_total_bytes as usize);
                stream.trim_log(stream.log_bytes().saturating_sub(over));
            } else {
                self.over_budget.push(r);
            }
        }
        let mine = self.log_bytes.saturating_sub(after) + stream.log_bytes();
        let total = self.limits.replay_changed(self.log_bytes, mine);
        self.log_bytes = mine;
        self.metrics.replay_bytes.store(total as i64, Relaxed);
    }

    /// A client resumes stream `sid` after event `after`: the events it
    /// missed, then the rest live. `quiet_miss`: nothing to resume answers
    /// 204 (a browser's EventSource then stops), else 404.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn resume(
        &mut self,
        svc: &mut dyn Services,
        key: usize,
        meta: Meta,
        sid: &str,
        after: u64,
        quiet_miss: bool,
        now: Instant,
    ) {
        let found = self.stream_by_sid(sid).filter(|&r| {
            self.streams.get(r).is_some_and(|s| {
                s.is_resumable()
                    && s.principal() == meta.principal.as_deref()
                    && s.can_resume_after(after)
            })
        });
        let Some(r) = found else {
            // Not here: maybe on another instance (with a store).
            let meta = if self.stream_by_sid(sid).is_none() {
                match self.resume_remote(svc, key, meta, sid, after, quiet_miss, now) {
                    Ok(()) => return,
                    Err(meta) => meta,
                }
            } else {
                meta
            };
            self.metrics.resumes_not_found.fetch_add(1, Relaxed);
            log::debug!("resume of {sid} after {after}: nothing to resume");
            let reply = router::nothing_to_resume(&meta, quiet_miss);
            return self.reply(svc, key, &meta, &reply, now);
        };
        // The previous subscriber, if any, is told and let go.
        let old = self.streams.get(r).and_then(|s| s.subscriber());
        if old.is_none() && self.streams.get(r).is_some_and(|s| !s.is_ended()) {
            self.metrics.streams_detached.fetch_sub(1, Relaxed);
        }
        if let Some((okey, oserial)) = old {
            self.supersede(svc, okey, oserial, r, now);
        }
        let Some(link) = self.conns.get_mut(key) else {
            return;
        };
        let Some(stream) = self.streams.get_mut(r) else {
            return;
        };
        let line = link.conn.take_current().map(|c| c.0).unwrap_or_default();
        svc.resumed(Resumed {
            line,
            request_id: &meta.request_id,
            sid,
            after: Some(after),
        });
        let headers: Vec<(&str, &str)> = std::iter::once(("X-Stream-Id", sid))
            .chain(meta.cors.iter().map(|(k, v)| (*k, v.as_str())))
            .collect();
        link.conn.begin_body(
            &mut self.bufs,
            Some((meta.request_id.as_str(), headers.as_slice())),
            meta.version,
            meta.keep_alive,
        );
        let mut replayed = 0;
        link.conn.append_body(&mut self.bufs, |b| {
            replayed = stream.attach((key, link.serial), after, b);
        });
        self.metrics.resumes.fetch_add(1, Relaxed);
        self.metrics.replayed_events.fetch_add(replayed, Relaxed);
        if stream.is_stored() && !stream.is_ended() {
            // A client following it from another instance is let go.
            if let Some(link) = svc.store() {
                link.batch().attach(sid);
            }
        }
        if stream.is_ended() {
            // Everything, the terminal event too, was in the log.
            link.conn.end_body(&mut self.bufs, now, &self.cfg, false);
        } else {
            link.sub = Some(r);
        }
        self.pump(svc, r, now);
        self.touch_stream(r);
        self.touch(key);
    }

    /// Lets subscriber `(key, serial)` of `r` go with `error` `superseded`:
    /// another client resumed the stream.
    pub(super) fn supersede(
        &mut self,
        svc: &mut dyn Services,
        key: usize,
        serial: u32,
        r: StreamRef,
        now: Instant,
    ) {
        if let Some(link) = self.conns.get_mut(key).filter(|l| l.serial == serial) {
            link.conn.append_body(&mut self.bufs, Stream::supersede);
            link.conn.end_body(&mut self.bufs, now, &self.cfg, false);
            link.ttft_mark = None;
        }
        self.release_subscriber(svc, key, serial, r, now);
    }

    /// Cancels detached streams the process's replay budget cannot hold,
    /// oldest first (they were listed by [`Engine::account_log`]).
    pub(super) fn shed_over_budget(&mut self, svc: &mut dyn Services, now: Instant) {
        let mut list = std::mem::take(&mut self.over_budget);
        list.sort_by_key(|r| r.id);
        for r in list.drain(..) {
            if self.limits.replay() <= (self.cfg.resume_total_bytes as usize) {
                break;
            }
            if self.streams.get(r).is_some_and(|s| !s.is_attached()) {
                log::debug!("stream {:x}: detached, over --resume-total-bytes", r.id);
                self.end_stream(svc, r, End::Disconnected, false, now);
            }
        }
        self.over_budget = list;
    }
}
