//! How a stream ends: its terminal event into the attached connection (a
//! body's last chunk, or one whole answer with its status), the accounting
//! handed to the server once, the connection moved on to its next request,
//! and the stream taken out of the table — or, resumable, kept with its
//! log for `--resume-window-ms`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::{Ended, Engine, Services};
use crate::conn::Response;
use crate::errors;
use crate::sse::ErrorCode;
use crate::stream::{End, Stream, StreamCx, StreamRef};

impl<S> Engine<S> {
    /// Ends stream `r` with its terminal event, moves its connection on
    /// (back to reading, or closing), and takes it out of the table — or,
    /// resumable, keeps its log `--resume-window-ms` longer.
    pub(super) fn end_stream(
        &mut self,
        svc: &mut dyn Services,
        r: StreamRef,
        end: End,
        from_producer: bool,
        now: Instant,
    ) {
        if self.streams.get(r).is_some_and(Stream::is_awaiting) {
            return self.end_awaiting(svc, r, end, now);
        }
        let scx = StreamCx {
            now_ns: self.ns(now),
            cfg: &self.cfg,
            metrics: &self.metrics,
        };
        let Some(stream) = self.streams.get_mut(r) else {
            return;
        };
        let logged = stream.log_bytes();
        let retain = Duration::from_millis(self.cfg.resume_window_ms);
        let sub = stream.subscriber();
        if sub.is_none() && stream.is_resumable() && !stream.is_ended() && !stream.is_attached() {
            self.metrics.streams_detached.fetch_sub(1, Relaxed);
        }
        let streaming = stream.is_streaming();
        let link = sub.and_then(|(key, serial)| {
            self.conns
                .get_mut(key)
                .filter(|l| l.serial == serial && l.sub == Some(r))
        });
        let mut summary = None;
        let mut status = 200;
        match link {
            Some(link) if streaming => {
                let conn = &mut link.conn;
                conn.append_body(&mut self.bufs, |b| {
                    summary = stream.finish(&scx, end.clone(), from_producer, retain, b);
                });
                match &end {
                    End::Error(e) if e.code == ErrorCode::SlowConsumer => {
                        // Best effort: the client is not reading.
                        conn.end_body_slow(&mut self.bufs, now)
                    }
                    End::Error(e) if e.code == ErrorCode::ShuttingDown => {
                        conn.end_body(&mut self.bufs, now, &self.cfg, true)
                    }
                    End::Disconnected => conn.abort_body(&mut self.bufs),
                    _ => conn.end_body(&mut self.bufs, now, &self.cfg, false),
                }
            }
            Some(link) => {
                let mut body = Vec::new();
                summary = stream.finish(&scx, end.clone(), from_producer, retain, &mut body);
                let meta = link.meta.take();
                let (ct, close) = match &end {
                    End::Done(_) => (stream.content_type(), false),
                    End::Error(e) => {
                        status = errors::stream_error_status(e);
                        ("application/json", e.code == ErrorCode::SlowConsumer)
                    }
                    End::Disconnected => ("", true),
                };
                if matches!(end, End::Disconnected) {
                    link.conn.abort_body(&mut self.bufs);
                } else if let Some(meta) = meta {
                    if status >= 400 {
                        self.metrics.refused(status);
                    }
                    let headers: Vec<(&str, &str)> = std::iter::once(("X-Stream-Id", stream.sid()))
                        .chain(meta.cors.iter().map(|(k, v)| (*k, v.as_str())))
                        .collect();
                    link.conn.respond(
                        &mut self.bufs,
                        now,
                        &self.cfg,
                        &Response {
                            status,
                            content_type: ct,
                            body: &body,
                            request_id: &meta.request_id,
                            headers: &headers,
                            version: meta.version,
                            keep_alive: meta.keep_alive && !close,
                        },
                    );
                }
            }
            None => {
                let mut scratch = std::mem::take(&mut self.scratch);
                summary = stream.finish(&scx, end, from_producer, retain, &mut scratch);
                scratch.clear();
                self.scratch = scratch;
            }
        }
        let peer = stream.peer();
        let retained = !stream.retention_over(scx.now_ns);
        if let Some(summary) = summary {
            svc.stream_ended(Ended {
                summary,
                status,
                peer,
            });
        }
        // The terminal event (or the end of a stream that has none) for
        // the shared store.
        self.ship(svc, r);
        if retained {
            // Kept for a client that lost the connection at the very end.
            self.account_log(r, logged);
            self.touch_stream(r);
        } else {
            self.set_log_bytes(self.log_bytes.saturating_sub(logged));
            self.remove_stream(r);
        }
        if let Some((key, serial)) = sub {
            self.release_subscriber(svc, key, serial, r, now);
        }
    }

    /// `key` no longer receives stream `r`'s events: it reads its next
    /// request (pipelined requests waited for this answer).
    pub(super) fn release_subscriber(
        &mut self,
        svc: &mut dyn Services,
        key: usize,
        serial: u32,
        r: StreamRef,
        now: Instant,
    ) {
        if let Some(link) = self.conns.get_mut(key).filter(|l| l.serial == serial) {
            if link.sub == Some(r) {
                link.sub = None;
                link.meta = None;
            }
            if link.conn.has_waiting_input() {
                self.process(svc, key, &[], now);
            }
        }
        self.touch(key);
    }

    /// Takes an ended stream out of the table, with its id and timer.
    pub(super) fn remove_stream(&mut self, r: StreamRef) {
        let Some(stream) = self.streams.remove(r) else {
            return;
        };
        if !self.relays.is_empty() {
            self.relays.remove(&r);
        }
        self.set_log_bytes(self.log_bytes.saturating_sub(stream.log_bytes()));
        let h = self.sid_hash(stream.sid());
        if self.by_sid.get(&h) == Some(&r) {
            self.by_sid.remove(&h);
        }
        self.wheel.disarm(super::timers::stream_slot(r.key));
    }
}
