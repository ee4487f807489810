//! The engine's side of the shared resume store (`--resume-store`): each
//! resumable stream's new events go into this loop turn's batch; a resume
//! or stop of a stream this instance does not hold is asked of the store
//! (the connection waits for the answer: a relay stream for a resume, a
//! parked request for a stop); and what other instances ask of this one —
//! stop a stream, a client attached to it there, that client left — is
//! carried out here.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::{Engine, Resumed, Services};
use crate::conn::ReqLine;
use crate::encode::NativeSse;
use crate::errors;
use crate::router::{self, Meta, Refusal, Reply};
use crate::store::Inbound;
use crate::stream::{Admission, End, Shipped, Stream, StreamCx, StreamRef};

impl<S> Engine<S> {
    /// Hands stream `r`'s events the store has not had to this turn's batch.
    pub(super) fn ship(&mut self, svc: &mut dyn Services, r: StreamRef) {
        let Some(stream) = self.streams.get_mut(r) else {
            return;
        };
        let Some(link) = svc.store() else {
            return;
        };
        let batch = link.batch();
        stream.ship(&mut |sid, what| match what {
            Shipped::Event {
                seq,
                bytes,
                terminal,
            } => batch.event(sid, seq, bytes, terminal),
            Shipped::Gone => batch.gone(sid),
        });
    }

    /// A new resumable stream: the store gets its owner record, then its
    /// events.
    pub(super) fn store_new_stream(&mut self, svc: &mut dyn Services, r: StreamRef) {
        let Some(stream) = self.streams.get_mut(r) else {
            return;
        };
        if !stream.is_resumable() {
            return;
        }
        if let Some(link) = svc.store() {
            link.batch().begin(stream.sid(), stream.principal());
            stream.store_events();
        }
    }

    /// The store could not take these streams' events: they are no longer
    /// resumable elsewhere, and no more of their events are sent.
    pub fn store_broken(&mut self, sids: &[Box<str>]) {
        for sid in sids {
            if let Some(r) = self.stream_by_sid(sid) {
                if let Some(s) = self.streams.get_mut(r) {
                    s.store_broken();
                }
            }
        }
        self.metrics.store_batches_lost.fetch_add(1, Relaxed);
    }

    /// A resume of a stream not held here: with a store, a relay stream
    /// attached to `key` waits for the store's answer (`Ok`); without one,
    /// `meta` comes back.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn resume_remote(
        &mut self,
        svc: &mut dyn Services,
        key: usize,
        meta: Meta,
        sid: &str,
        after: u64,
        quiet_miss: bool,
        now: Instant,
    ) -> Result<(), Meta> {
        let r = StreamRef {
            key: self.streams.vacant_key(),
            id: svc.next_id(),
        };
        let sink = match svc.admit_relay(r) {
            None => return Err(meta),
            Some(Err(refusal)) => {
                let reply = router::refused(&meta, &refusal);
                self.reply(svc, key, &meta, &reply, now);
                return Ok(());
            }
            Some(Ok(sink)) => sink,
        };
        if let Some(link) = svc.store() {
            link.resume(sid, after, meta.principal.as_deref(), sink.clone());
        }
        let scx = StreamCx {
            now_ns: self.ns(now),
            cfg: &self.cfg,
            metrics: &self.metrics,
        };
        let Some(link) = self.conns.get_mut(key) else {
            sink.cancel();
            svc.relay_dropped();
            return Ok(());
        };
        let admission = Admission {
            id: r.id,
            sid: sid.into(),
            request_id: meta.request_id.clone(),
            line: ReqLine::default(),
            encoder: Box::new(NativeSse),
            conn: (key, link.serial),
            replay: None,
        };
        let mut stream = Stream::relay(&scx, admission, after, sink);
        stream.set_peer(link.peer);
        stream.set_principal(meta.principal.clone());
        // No further request is read until this one is answered.
        link.conn
            .begin_body(&mut self.bufs, None, meta.version, meta.keep_alive);
        link.sub = Some(r);
        link.meta = Some(Box::new(meta));
        let inserted = self.streams.insert(stream);
        debug_assert_eq!(inserted, r);
        self.relays.insert(r, quiet_miss);
        self.touch_stream(r);
        Ok(())
    }

    /// A relay waiting for the store: `true` once its head went out (pump
    /// on), `false` while it waits or when there was nothing to resume
    /// (then the client got 204/404 and the relay is gone).
    pub(super) fn relay_ready(
        &mut self,
        svc: &mut dyn Services,
        r: StreamRef,
        now: Instant,
    ) -> bool {
        let Some(stream) = self.streams.get_mut(r) else {
            return false;
        };
        let Some(found) = stream.relay_verdict() else {
            return false;
        };
        stream.stop_awaiting();
        let quiet = self.relays.remove(&r).unwrap_or(false);
        let Some((key, serial)) = stream.subscriber() else {
            return found;
        };
        let Some(link) = self.conns.get_mut(key).filter(|l| l.serial == serial) else {
            return found;
        };
        let Some(meta) = link.meta.take() else {
            return found;
        };
        if !found {
            link.sub = None;
            self.remove_stream(r);
            svc.relay_dropped();
            self.metrics.resumes_not_found.fetch_add(1, Relaxed);
            let reply = router::nothing_to_resume(&meta, quiet);
            self.answer_waiting(svc, key, &meta, &reply, now);
            return false;
        }
        let line = link.conn.take_current().map(|c| c.0).unwrap_or_default();
        svc.resumed(Resumed {
            line,
            request_id: &meta.request_id,
            sid: stream.sid(),
            after: None,
        });
        let headers: Vec<(&str, &str)> = std::iter::once(("X-Stream-Id", stream.sid()))
            .chain(meta.cors.iter().map(|(k, v)| (*k, v.as_str())))
            .collect();
        link.conn.begin_body(
            &mut self.bufs,
            Some((meta.request_id.as_str(), headers.as_slice())),
            meta.version,
            meta.keep_alive,
        );
        link.conn
            .append_body(&mut self.bufs, |b| b.extend_from_slice(b"retry: 1000\n\n"));
        self.metrics.resumes.fetch_add(1, Relaxed);
        self.metrics.remote_resumes.fetch_add(1, Relaxed);
        self.touch(key);
        true
    }

    /// A relay ends before the store answered (drain, its time limit, its
    /// client left): no stream was ever sent, so the client gets an
    /// ordinary error answer (or nothing, when it left).
    pub(super) fn end_awaiting(
        &mut self,
        svc: &mut dyn Services,
        r: StreamRef,
        end: End,
        now: Instant,
    ) {
        let Some(stream) = self.streams.get_mut(r) else {
            return;
        };
        stream.abandon();
        let sub = stream.subscriber();
        self.remove_stream(r);
        svc.relay_dropped();
        let Some((key, serial)) = sub else {
            return;
        };
        let Some(link) = self.conns.get_mut(key).filter(|l| l.serial == serial) else {
            return;
        };
        link.sub = None;
        match (end, link.meta.take()) {
            (End::Error(e), Some(meta)) => {
                let refusal = Refusal {
                    status: errors::stream_error_status(&e),
                    code: e.code.as_str(),
                    message: e.message,
                };
                let reply = router::refused(&meta, &refusal);
                self.answer_waiting(svc, key, &meta, &reply, now);
            }
            _ => {
                link.conn.abort_body(&mut self.bufs);
                self.touch(key);
            }
        }
    }

    /// Answers a request that waited for the store, then reads the
    /// requests pipelined behind it.
    fn answer_waiting(
        &mut self,
        svc: &mut dyn Services,
        key: usize,
        meta: &Meta,
        reply: &Reply,
        now: Instant,
    ) {
        self.reply(svc, key, meta, reply, now);
        if self
            .conns
            .get(key)
            .is_some_and(|l| l.conn.has_waiting_input())
        {
            self.process(svc, key, &[], now);
        }
        self.touch(key);
    }

    /// A stop of a stream not held here: asked of its owner through the
    /// store; `key` is answered when the store answers. `false`: no store
    /// (or it is overloaded): answer "not found" now.
    pub(super) fn cancel_remote(
        &mut self,
        svc: &mut dyn Services,
        key: usize,
        meta: Meta,
        sid: &str,
    ) -> Result<(), Meta> {
        let Some(serial) = self.conns.get(key).map(|l| l.serial) else {
            return Ok(());
        };
        let Some(link) = svc.store() else {
            return Err(meta);
        };
        if !link.cancel(sid, meta.principal.as_deref(), key, serial) {
            return Err(meta);
        }
        if let Some(link) = self.conns.get_mut(key) {
            // No further request is read until this one is answered.
            link.conn
                .begin_body(&mut self.bufs, None, meta.version, meta.keep_alive);
        }
        self.parked.insert((key, serial), (meta, sid.into()));
        Ok(())
    }

    /// Carries out what the store brought.
    pub fn handle_inbound(&mut self, svc: &mut dyn Services, item: Inbound, now: Instant) {
        match item {
            Inbound::CancelAnswer { key, serial, found } => {
                let Some((meta, sid)) = self.parked.remove(&(key, serial)) else {
                    return;
                };
                if self.conns.get(key).is_none_or(|l| l.serial != serial) {
                    return;
                }
                // A stop that reached its owner is counted there.
                if !found {
                    self.metrics.cancels_not_found.fetch_add(1, Relaxed);
                }
                let reply = router::cancelled(&meta, &sid, found);
                self.answer_waiting(svc, key, &meta, &reply, now);
            }
            Inbound::Cancel { sid, reply } => {
                // Every loop hears it; the one that owns the id answers.
                if self.owner_elsewhere(&sid).is_some() {
                    return;
                }
                let principal = self
                    .stream_by_sid(&sid)
                    .and_then(|r| self.streams.get(r))
                    .and_then(|s| s.principal().map(Box::<str>::from));
                let found = self.cancel_by_sid(svc, &sid, principal.as_deref(), now);
                if let Some(link) = svc.store() {
                    link.batch().reply(&reply, found);
                }
            }
            Inbound::Attach { sid } => {
                let Some(r) = self.stream_by_sid(&sid) else {
                    return;
                };
                let Some(stream) = self.streams.get_mut(r) else {
                    return;
                };
                let was_detached = !stream.is_attached() && !stream.is_ended();
                let old = stream.subscriber();
                stream.remote_attach();
                if was_detached {
                    self.metrics.streams_detached.fetch_sub(1, Relaxed);
                }
                if let Some((okey, oserial)) = old {
                    // A client here is replaced by the one there.
                    self.supersede(svc, okey, oserial, r, now);
                }
                log::debug!("stream {sid}: a client resumed it on another instance");
                self.touch_stream(r);
            }
            Inbound::Detach { sid } => {
                let Some(r) = self.stream_by_sid(&sid) else {
                    return;
                };
                let window = Duration::from_millis(self.cfg.resume_window_ms);
                let now_ns = self.ns(now);
                let Some(stream) = self.streams.get_mut(r) else {
                    return;
                };
                if stream.remote_detach(now_ns, window) {
                    self.metrics.streams_detached.fetch_add(1, Relaxed);
                    log::debug!("stream {sid}: its client on another instance left");
                }
                self.touch_stream(r);
            }
        }
    }

    /// A connection parked on the store went away: forget it.
    pub(super) fn unpark(&mut self, key: usize) {
        if !self.parked.is_empty() {
            self.parked.retain(|&(k, _), _| k != key);
        }
    }
}
