//! The resume store shared by instances (`--resume-store`): where the
//! events of resumable streams go besides their in-process replay log, so
//! that a client who reconnects to another instance can resume there and a
//! stop by id can reach the instance that runs the stream.
//!
//! `memory` (the default) is no shared store: the in-process log is the
//! only one. With `redis://…`, this module owns everything between the
//! event loops and Redis:
//! - a loop collects one turn's events in a [`Batch`] (no allocation per
//!   event: one byte arena and a list of ranges) and hands the whole batch
//!   to the writer thread through a bounded queue; it never waits for
//!   Redis. A batch that does not fit marks its streams broken (not
//!   resumable elsewhere) instead of storing them with a gap;
//! - the writer appends events with `XADD` (entry id `0-<seq>`, bounded
//!   length), keeps each stream's owner record, and refreshes this
//!   instance's heartbeat key (TTL 5 s) every second;
//! - a query thread answers resumes and stops of streams this instance
//!   does not hold (the answer comes back to the asking loop), a tail
//!   thread follows resumed streams live with `XREAD BLOCK`, and a
//!   listener thread receives the commands other instances send to this
//!   one (stop, attach, detach) over pub/sub.
//!
//! Every thread reconnects with backoff; while Redis is unreachable
//! streaming goes on, in-process resume keeps working, and resumes of
//! foreign streams answer at once as for an unknown id (404 / 204; with
//! Redis up, an id it has no record of waits up to 500 ms for one). Keys and threads are in
//! [`redis_conn`], [`redis_io`] and [`redis_read`].

mod redis_conn;
mod redis_io;
mod redis_read;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;
use crate::pool::TokenSink;

pub use crate::config::StoreSpec;

/// Batches that may wait for the writer before a loop's next batch is
/// refused (its streams are then marked broken).
const WRITE_QUEUE: usize = 1024;
/// Resumes and stops of foreign streams that may wait for the query
/// thread; beyond it they answer "not found".
const QUERY_QUEUE: usize = 4096;

/// One loop turn's events for the store, back to back in one arena.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    ops: Vec<Op>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A resumable stream started here: its owner record.
    Begin,
    /// An event (`seq`); `terminal` is the stream's last.
    Event { terminal: bool },
    /// The stream ended without a terminal event (its client left and
    /// its window ran out): nothing to resume any more.
    Gone,
    /// A client resumed it on its own instance: a client following it
    /// from another instance is superseded.
    Attach,
    /// The answer to a stop asked by another instance: `seq` is 1 when
    /// the stream was running (here `sid` is the question's id).
    Reply,
}

#[derive(Clone, Copy, Debug)]
struct Op {
    kind: Kind,
    seq: u64,
    sid: (u32, u32),
    /// The event's bytes, or the principal for `Begin`.
    data: (u32, u32),
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn put(&mut self, s: &[u8]) -> (u32, u32) {
        let at = self.bytes.len() as u32;
        self.bytes.extend_from_slice(s);
        (at, s.len() as u32)
    }

    fn push(&mut self, kind: Kind, sid: &str, seq: u64, data: &[u8]) {
        let sid = self.put(sid.as_bytes());
        let data = self.put(data);
        self.ops.push(Op {
            kind,
            seq,
            sid,
            data,
        });
    }

    /// Stream `sid` started here, for `principal` (none with auth off).
    pub fn begin(&mut self, sid: &str, principal: Option<&str>) {
        self.push(Kind::Begin, sid, 0, principal.unwrap_or("").as_bytes());
    }

    /// Event `seq` of stream `sid`, encoded.
    pub fn event(&mut self, sid: &str, seq: u64, bytes: &[u8], terminal: bool) {
        self.push(Kind::Event { terminal }, sid, seq, bytes);
    }

    /// Stream `sid` is gone without a terminal event.
    pub fn gone(&mut self, sid: &str) {
        self.push(Kind::Gone, sid, 0, b"");
    }

    /// A client resumed stream `sid` here.
    pub fn attach(&mut self, sid: &str) {
        self.push(Kind::Attach, sid, 0, b"");
    }

    /// The answer to stop question `id` from another instance.
    pub fn reply(&mut self, id: &str, found: bool) {
        self.push(Kind::Reply, id, u64::from(found), b"");
    }

    fn text(&self, r: (u32, u32)) -> &[u8] {
        &self.bytes[r.0 as usize..(r.0 + r.1) as usize]
    }

    fn sid(&self, op: &Op) -> &str {
        std::str::from_utf8(self.text(op.sid)).unwrap_or("")
    }

    /// The distinct stream ids in the batch.
    fn sids(&self) -> Vec<Box<str>> {
        let mut v: Vec<Box<str>> = self.ops.iter().map(|o| self.sid(o).into()).collect();
        v.sort();
        v.dedup();
        v
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ops.clear();
    }
}

/// What the store tells a loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Another instance asks to stop stream `sid` (its principal was
    /// checked there); whether it was running goes back under `reply`.
    Cancel { sid: Box<str>, reply: Box<str> },
    /// A client resumed stream `sid` on another instance: a local
    /// subscriber is superseded and the stream keeps going for it.
    Attach { sid: Box<str> },
    /// That client left: the resume window starts.
    Detach { sid: Box<str> },
    /// The answer to a stop of a foreign stream asked by connection
    /// `(key, serial)`.
    CancelAnswer {
        key: usize,
        serial: u32,
        found: bool,
    },
}

/// A loop's mailbox: what the store threads hand it, and how they wake it.
pub struct Inbox {
    items: Mutex<Vec<Inbound>>,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl Inbox {
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> Inbox {
        Inbox {
            items: Mutex::new(Vec::new()),
            wake: Box::new(wake),
        }
    }

    fn push(&self, item: Inbound) {
        let was_empty = {
            let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
            items.push(item);
            items.len() == 1
        };
        if was_empty {
            (self.wake)();
        }
    }

    /// Moves everything waiting into `into`.
    pub fn take(&self, into: &mut Vec<Inbound>) {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        into.append(&mut items);
    }
}

/// A request for the query thread.
pub(crate) enum Query {
    Resume {
        sid: Box<str>,
        after: u64,
        principal: Option<Box<str>>,
        sink: Arc<TokenSink>,
    },
    Cancel {
        sid: Box<str>,
        principal: Option<Box<str>>,
        key: usize,
        serial: u32,
        inbox: Arc<Inbox>,
    },
}

/// The process's handle on the shared store (cheap to clone).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    writes: SyncSender<Batch>,
    queries: SyncSender<Query>,
    /// Batches back from the writer, for reuse.
    spare: Mutex<Vec<Batch>>,
    /// Streams whose events were not stored (a full queue): the writer
    /// marks them not resumable elsewhere.
    broken: Mutex<Vec<Box<str>>>,
    inboxes: Mutex<Vec<Arc<Inbox>>>,
    up: AtomicBool,
    stop: AtomicBool,
    /// Batches handed to the writer and not written yet.
    pending: std::sync::atomic::AtomicUsize,
}

impl Store {
    /// Starts the store's threads for `spec`; `None` for `memory`.
    /// `window_ms`: the resume window (keys expire that long after the
    /// terminal event); `max_events`: how many events a stream keeps.
    pub fn start(
        spec: &StoreSpec,
        window_ms: u64,
        max_events: usize,
        metrics: Arc<Metrics>,
    ) -> Option<Store> {
        let StoreSpec::Redis { url, shown } = spec else {
            return None;
        };
        let (writes, write_rx) = mpsc::sync_channel(WRITE_QUEUE);
        let (queries, query_rx) = mpsc::sync_channel(QUERY_QUEUE);
        let store = Store::with_queues(writes, queries, false);
        let io = redis_conn::Io {
            url: url.clone(),
            shown: shown.clone(),
            instance: redis_conn::instance_id(),
            window_ms,
            max_events,
            metrics,
        };
        log::info!(
            "resume store: {shown} (instance {}); resumable streams can be resumed and stopped on any instance",
            io.instance
        );
        redis_io::spawn(io, store.clone(), write_rx, query_rx);
        Some(store)
    }

    fn with_queues(writes: SyncSender<Batch>, queries: SyncSender<Query>, up: bool) -> Store {
        Store {
            inner: Arc::new(Inner {
                writes,
                queries,
                spare: Mutex::new(Vec::new()),
                broken: Mutex::new(Vec::new()),
                inboxes: Mutex::new(Vec::new()),
                up: AtomicBool::new(up),
                stop: AtomicBool::new(false),
                pending: Default::default(),
            }),
        }
    }

    /// A loop's link to the store; `wake` wakes that loop.
    pub fn link(&self, wake: impl Fn() + Send + Sync + 'static) -> Link {
        let inbox = Arc::new(Inbox::new(wake));
        lock(&self.inner.inboxes).push(inbox.clone());
        Link {
            store: self.clone(),
            inbox,
            batch: Batch::default(),
        }
    }

    /// Whether the writer reaches Redis (readiness says `degraded` when not).
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        self.inner.up.store(up, Ordering::Relaxed);
    }

    fn stopped(&self) -> bool {
        self.inner.stop.load(Ordering::Relaxed)
    }

    fn broadcast(&self, make: impl Fn() -> Inbound) {
        for inbox in lock(&self.inner.inboxes).iter() {
            inbox.push(make());
        }
    }

    fn take_broken(&self) -> Vec<Box<str>> {
        std::mem::take(&mut *lock(&self.inner.broken))
    }

    fn recycle(&self, mut batch: Batch) {
        batch.clear();
        let mut spare = lock(&self.inner.spare);
        if spare.len() < 8 && batch.bytes.capacity() <= 1 << 20 {
            spare.push(batch);
        }
    }

    /// Stops the threads (they notice within about a second).
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
    }

    /// Waits up to `limit` for the writer to write what it was handed
    /// (at shutdown: the streams' last events).
    pub fn wait_written(&self, limit: std::time::Duration) {
        let until = std::time::Instant::now() + limit;
        while self.inner.pending.load(Ordering::Acquire) > 0 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn written(&self) {
        self.inner.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One loop's side of the store: its batch for the current turn and its
/// mailbox.
pub struct Link {
    store: Store,
    inbox: Arc<Inbox>,
    batch: Batch,
}

impl Link {
    /// The batch this turn's events go into.
    pub fn batch(&mut self) -> &mut Batch {
        &mut self.batch
    }

    /// Hands this turn's batch to the writer (end of a loop turn). When
    /// the queue is full its streams are marked broken; their ids are
    /// returned so the loop stops storing them.
    pub fn flush(&mut self) -> Vec<Box<str>> {
        if self.batch.is_empty() {
            return Vec::new();
        }
        let next = lock(&self.store.inner.spare).pop().unwrap_or_default();
        let batch = std::mem::replace(&mut self.batch, next);
        self.store.inner.pending.fetch_add(1, Ordering::AcqRel);
        match self.store.inner.writes.try_send(batch) {
            Ok(()) => Vec::new(),
            Err(TrySendError::Full(b)) | Err(TrySendError::Disconnected(b)) => {
                self.store.written();
                let sids = b.sids();
                lock(&self.store.inner.broken).extend(sids.iter().cloned());
                self.store.recycle(b);
                sids
            }
        }
    }

    /// Whatever the store threads left for this loop.
    pub fn take_inbound(&self, into: &mut Vec<Inbound>) {
        self.inbox.take(into);
    }

    /// Resumes foreign stream `sid` after `after` into `sink`: the query
    /// thread either marks the sink started and feeds it (events as
    /// tokens, the terminal event as a delta, then `done`), or finishes it
    /// with an error without starting it (nothing to resume).
    pub fn resume(&self, sid: &str, after: u64, principal: Option<&str>, sink: Arc<TokenSink>) {
        let q = Query::Resume {
            sid: sid.into(),
            after,
            principal: principal.map(Into::into),
            sink,
        };
        if let Err(e) = self.store.inner.queries.try_send(q) {
            let (TrySendError::Full(q) | TrySendError::Disconnected(q)) = e;
            if let Query::Resume { sink, .. } = q {
                sink.finish(Err(redis_conn::not_found()));
            }
        }
    }

    /// Asks the owner of foreign stream `sid` to stop it; the answer comes
    /// back as [`Inbound::CancelAnswer`]. `false`: not asked (answer 404).
    pub fn cancel(&self, sid: &str, principal: Option<&str>, key: usize, serial: u32) -> bool {
        let q = Query::Cancel {
            sid: sid.into(),
            principal: principal.map(Into::into),
            key,
            serial,
            inbox: self.inbox.clone(),
        };
        self.store.inner.queries.try_send(q).is_ok()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_its_ops_in_one_arena() {
        let mut b = Batch::default();
        b.begin("s1", Some("alice"));
        b.event("s1", 1, b"id: s1:1\nevent: token\n\n", false);
        b.event("s2", 7, b"x", true);
        b.gone("s3");
        let seen: Vec<(Kind, &str, u64, &[u8])> = b
            .ops
            .iter()
            .map(|o| (o.kind, b.sid(o), o.seq, b.text(o.data)))
            .collect();
        assert_eq!(
            seen,
            vec![
                (Kind::Begin, "s1", 0, &b"alice"[..]),
                (
                    Kind::Event { terminal: false },
                    "s1",
                    1,
                    &b"id: s1:1\nevent: token\n\n"[..]
                ),
                (Kind::Event { terminal: true }, "s2", 7, &b"x"[..]),
                (Kind::Gone, "s3", 0, &b""[..]),
            ]
        );
        let sids = b.sids();
        let sids: Vec<&str> = sids.iter().map(|s| &**s).collect();
        assert_eq!(sids, ["s1", "s2", "s3"]);
        b.clear();
        assert!(b.is_empty());
    }
}

/// A store without threads or Redis: a test plays the threads' part.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::mpsc::Receiver;

    pub struct TestStore {
        pub store: Store,
        writes: Receiver<Batch>,
        queries: Receiver<Query>,
    }

    impl TestStore {
        /// `queue`: how many batches fit before a flush is refused.
        pub fn new(queue: usize) -> TestStore {
            let (writes, write_rx) = mpsc::sync_channel(queue);
            let (queries, query_rx) = mpsc::sync_channel(16);
            let store = Store::with_queues(writes, queries, true);
            TestStore {
                store,
                writes: write_rx,
                queries: query_rx,
            }
        }

        /// Every op of every batch handed over so far, as text:
        /// `begin SID PRINCIPAL`, `event SID SEQ` (`+end` on the terminal
        /// one), `gone SID`.
        pub fn ops(&self) -> Vec<String> {
            let mut out = Vec::new();
            while let Ok(b) = self.writes.try_recv() {
                for op in &b.ops {
                    let sid = b.sid(op);
                    out.push(match op.kind {
                        Kind::Begin => {
                            format!("begin {sid} {}", String::from_utf8_lossy(b.text(op.data)))
                        }
                        Kind::Event { terminal } => {
                            format!(
                                "event {sid} {}{}",
                                op.seq,
                                if terminal { " +end" } else { "" }
                            )
                        }
                        Kind::Gone => format!("gone {sid}"),
                        Kind::Attach => format!("attach {sid}"),
                        Kind::Reply => format!("reply {sid} {}", op.seq),
                    });
                }
            }
            out
        }

        /// The bytes of event `seq` of `sid` in what was handed over
        /// (consumes the batches, like [`TestStore::ops`]).
        pub fn events(&self) -> Vec<(u64, String)> {
            let mut out = Vec::new();
            while let Ok(b) = self.writes.try_recv() {
                for op in &b.ops {
                    if let Kind::Event { .. } = op.kind {
                        out.push((op.seq, String::from_utf8_lossy(b.text(op.data)).into()));
                    }
                }
            }
            out
        }

        pub fn broken(&self) -> Vec<Box<str>> {
            self.store.take_broken()
        }

        /// The next question a loop asked.
        pub fn asked(&self) -> Option<Query> {
            self.queries.try_recv().ok()
        }
    }
}
