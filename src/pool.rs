//! The blocking worker pool and the worker → loop hand-off.
//!
//! Backends that block (an upstream HTTP call) run on `--workers` threads fed
//! by a bounded job queue (`--queue-depth`). Each stream owns a
//! [`TokenSink`] (the backends' [`TokenOut`]): a small bounded queue of [`Piece`]s behind a mutex, a
//! `cancelled` flag and a condition variable. A worker pushes pieces; only
//! when the queue was empty does it put the stream on the loop's
//! [`ReadyList`], and only when nobody has woken the loop since it last took
//! that list does it call `Waker::wake` — a burst of tokens from many workers
//! costs one wake-up. A full queue blocks the worker (backpressure reaches
//! the model); a cancel wakes it at once.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Cancelled, Finish, GenRequest, TokenOut};
use crate::metrics::Metrics;
use crate::sse::{ErrorCode, StreamError};

/// What a worker hands to the loop.
#[derive(Debug)]
pub enum Piece {
    Token(String),
    Done(Finish),
    Error(StreamError),
}

/// Streams with new pieces, and the one waker of the loop.
pub struct ReadyList {
    list: Mutex<Vec<(usize, u64)>>,
    woken: AtomicBool,
    waker: Box<dyn Fn() + Send + Sync>,
}

impl ReadyList {
    /// `wake` is called at most once between two [`ReadyList::take`]s.
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> ReadyList {
        ReadyList {
            list: Mutex::new(Vec::new()),
            woken: AtomicBool::new(false),
            waker: Box::new(wake),
        }
    }

    fn push(&self, slot: usize, id: u64) {
        lock(&self.list).push((slot, id));
        if !self.woken.swap(true, Ordering::AcqRel) {
            (self.waker)();
        }
    }

    /// Takes every (slot, stream id) listed since the last call. `into` is
    /// swapped with the list so its allocation is reused.
    pub fn take(&self, into: &mut Vec<(usize, u64)>) {
        into.clear();
        // Clear the flag first: a push after this wakes the loop again.
        self.woken.store(false, Ordering::Release);
        std::mem::swap(&mut *lock(&self.list), into);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking backend must not take the loop down with a poisoned lock.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct SinkState {
    queue: VecDeque<Piece>,
    producer_waiting: bool,
    started_at: Option<Instant>,
    upstream: Option<TcpStream>,
}

/// One stream's hand-off queue, shared by its worker and the loop.
pub struct TokenSink {
    slot: usize,
    id: u64,
    capacity: usize,
    state: Mutex<SinkState>,
    changed: Condvar,
    cancelled: AtomicBool,
    ready: Arc<ReadyList>,
}

impl TokenSink {
    /// `slot` and `id` identify the stream to the loop; `capacity` bounds the queue.
    pub fn new(slot: usize, id: u64, capacity: usize, ready: Arc<ReadyList>) -> TokenSink {
        TokenSink {
            slot,
            id,
            capacity: capacity.max(1),
            state: Mutex::new(SinkState {
                queue: VecDeque::new(),
                producer_waiting: false,
                started_at: None,
                upstream: None,
            }),
            changed: Condvar::new(),
            cancelled: AtomicBool::new(false),
            ready,
        }
    }

    // ---- worker side ----

    /// Hands one piece of text to the stream; blocks while the queue is full.
    pub fn push_token(&self, text: &str) -> Result<(), Cancelled> {
        if text.is_empty() {
            return self.check();
        }
        self.push(Piece::Token(text.to_owned()))
    }

    fn push(&self, piece: Piece) -> Result<(), Cancelled> {
        let mut st = lock(&self.state);
        loop {
            self.check()?;
            if st.queue.len() < self.capacity || !matches!(piece, Piece::Token(_)) {
                break;
            }
            st.producer_waiting = true;
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        let was_empty = st.queue.is_empty();
        st.queue.push_back(piece);
        drop(st);
        if was_empty {
            self.ready.push(self.slot, self.id);
        }
        Ok(())
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    fn check(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }

    /// Sleeps like a model thinking; returns early with `Err` on cancel.
    pub fn sleep(&self, d: Duration) -> Result<(), Cancelled> {
        let until = Instant::now() + d;
        let mut st = lock(&self.state);
        loop {
            self.check()?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            st = self
                .changed
                .wait_timeout(st, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Registers the upstream socket so a cancel can shut it down and so
    /// unblock a worker stuck in `read`.
    pub fn set_upstream(&self, sock: Option<TcpStream>) {
        let mut st = lock(&self.state);
        if self.is_cancelled() {
            if let Some(s) = &sock {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        st.upstream = sock;
    }

    // ---- loop side ----

    /// When a worker took the job, or `None` while it waits in the queue.
    pub fn started_at(&self) -> Option<Instant> {
        lock(&self.state).started_at
    }

    /// Hands queued pieces to `f` while it returns `true`. Wakes a worker
    /// blocked on a full queue.
    pub fn take(&self, mut f: impl FnMut(Piece) -> bool) {
        let mut st = lock(&self.state);
        while let Some(p) = st.queue.pop_front() {
            if !f(p) {
                break;
            }
        }
        if st.producer_waiting && st.queue.len() < self.capacity {
            st.producer_waiting = false;
            self.changed.notify_all();
        }
    }

    /// Whether pieces are waiting (the loop stopped taking at its high-water mark).
    pub fn has_pieces(&self) -> bool {
        !lock(&self.state).queue.is_empty()
    }

    /// Stops the generation: wakes a blocked worker and shuts its upstream
    /// socket down so a blocking read returns at once.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        let mut st = lock(&self.state);
        st.queue.clear();
        if let Some(s) = st.upstream.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
    }
}

/// The worker side, as the backends see it.
impl TokenOut for TokenSink {
    fn push_token(&self, text: &str) -> Result<(), Cancelled> {
        TokenSink::push_token(self, text)
    }

    fn sleep(&self, d: Duration) -> Result<(), Cancelled> {
        TokenSink::sleep(self, d)
    }

    fn is_cancelled(&self) -> bool {
        TokenSink::is_cancelled(self)
    }

    fn set_upstream(&self, sock: Option<TcpStream>) {
        TokenSink::set_upstream(self, sock)
    }
}

struct Job {
    req: GenRequest,
    sink: Arc<TokenSink>,
    enqueued: Instant,
}

struct Queue {
    jobs: VecDeque<Job>,
    /// Workers running a job. A job that a free worker is about to take
    /// is not "waiting", so admission counts busy + queued against
    /// workers + depth.
    busy: usize,
}

struct PoolShared {
    queue: Mutex<Queue>,
    available: Condvar,
    depth: usize,
    workers: usize,
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
}

/// The queue is full: answer 503 `overloaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// `--workers` threads running a [`Backend`].
pub struct Pool {
    shared: Arc<PoolShared>,
}

impl Pool {
    pub fn new(
        workers: usize,
        depth: usize,
        backend: Arc<dyn Backend>,
        metrics: Arc<Metrics>,
    ) -> Pool {
        let shared = Arc::new(PoolShared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                busy: 0,
            }),
            workers: workers.max(1),
            available: Condvar::new(),
            depth,
            backend,
            metrics,
        });
        for i in 0..workers.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || worker(shared))
                .expect("spawning a worker thread");
        }
        Pool { shared }
    }

    /// Queues a generation; `Err` when `--queue-depth` jobs already wait.
    pub fn submit(&self, req: GenRequest, sink: Arc<TokenSink>) -> Result<(), QueueFull> {
        let mut q = lock(&self.shared.queue);
        let room = self.shared.depth + self.shared.workers;
        if q.jobs.len() + q.busy >= room {
            // Jobs whose client already left do not hold a place.
            let before = q.jobs.len();
            q.jobs.retain(|j| !j.sink.is_cancelled());
            let dropped = (before - q.jobs.len()) as u64;
            self.shared
                .metrics
                .jobs_dropped_queued
                .fetch_add(dropped, Ordering::Relaxed);
            if q.jobs.len() + q.busy >= room {
                return Err(QueueFull);
            }
        }
        q.jobs.push_back(Job {
            req,
            sink,
            enqueued: Instant::now(),
        });
        drop(q);
        self.shared.available.notify_one();
        Ok(())
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.shared.backend
    }
}

fn worker(shared: Arc<PoolShared>) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    q.busy += 1;
                    break j;
                }
                q = shared.available.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        run_job(&shared, &job);
        lock(&shared.queue).busy -= 1;
    }
}

/// Runs one generation and hands its last piece to the loop.
fn run_job(shared: &PoolShared, job: &Job) {
    let sink = &job.sink;
    if sink.is_cancelled() {
        // The client left while queued: the backend is never called.
        shared
            .metrics
            .jobs_dropped_queued
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    let now = Instant::now();
    shared.metrics.queue_wait.observe(now - job.enqueued);
    lock(&sink.state).started_at = Some(now);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shared.backend.generate(&job.req, &**sink)
    }));
    sink.set_upstream(None);
    if sink.is_cancelled() {
        return;
    }
    let piece = match result {
        Ok(Ok(finish)) => Piece::Done(finish),
        Ok(Err(e)) => Piece::Error(e),
        Err(_) => {
            log::error!("backend panicked during stream {:x}", sink.id);
            Piece::Error(StreamError::new(ErrorCode::Internal, "the backend failed"))
        }
    };
    let _ = sink.push(piece);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn ready() -> (Arc<ReadyList>, Arc<AtomicUsize>) {
        let wakes = Arc::new(AtomicUsize::new(0));
        let w = wakes.clone();
        (
            Arc::new(ReadyList::new(move || {
                w.fetch_add(1, Ordering::SeqCst);
            })),
            wakes,
        )
    }

    #[test]
    fn a_burst_costs_one_wake_and_one_ready_entry() {
        let (ready, wakes) = ready();
        let a = TokenSink::new(3, 30, 8, ready.clone());
        let b = TokenSink::new(4, 40, 8, ready.clone());
        for t in ["x", "y", "z"] {
            a.push_token(t).unwrap();
            b.push_token(t).unwrap();
        }
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        let mut list = Vec::new();
        ready.take(&mut list);
        assert_eq!(list, vec![(3, 30), (4, 40)]);
        let mut got = Vec::new();
        a.take(|p| {
            if let Piece::Token(t) = p {
                got.push(t);
            }
            true
        });
        assert_eq!(got, ["x", "y", "z"]);
        // Drained: the next push lists the stream and wakes again.
        a.push_token("w").unwrap();
        assert_eq!(wakes.load(Ordering::SeqCst), 2);
        // b was not drained: pushing more neither lists nor wakes.
        ready.take(&mut list);
        b.push_token("v").unwrap();
        ready.take(&mut list);
        assert!(list.is_empty());
    }

    #[test]
    fn empty_text_is_not_a_token() {
        let (ready, wakes) = ready();
        let a = TokenSink::new(0, 1, 8, ready);
        a.push_token("").unwrap();
        assert!(!a.has_pieces());
        assert_eq!(wakes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn full_queue_blocks_the_worker_until_taken_or_cancelled() {
        let (ready, _) = ready();
        let sink = Arc::new(TokenSink::new(0, 1, 2, ready));
        let s = sink.clone();
        let t = std::thread::spawn(move || {
            let mut pushed = 0;
            while s.push_token("t").is_ok() {
                pushed += 1;
            }
            pushed
        });
        while !lock(&sink.state).producer_waiting {
            std::thread::yield_now();
        }
        let mut n = 0;
        sink.take(|_| {
            n += 1;
            true
        });
        assert_eq!(n, 2);
        while !lock(&sink.state).producer_waiting {
            std::thread::yield_now();
        }
        sink.cancel();
        assert_eq!(t.join().unwrap(), 4);
    }

    #[test]
    fn cancel_interrupts_a_sleep() {
        let (ready, _) = ready();
        let sink = Arc::new(TokenSink::new(0, 1, 2, ready));
        let s = sink.clone();
        let t = std::thread::spawn(move || s.sleep(Duration::from_secs(600)));
        std::thread::sleep(Duration::from_millis(10));
        sink.cancel();
        assert_eq!(t.join().unwrap(), Err(Cancelled));
    }
}
