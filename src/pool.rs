//! The blocking worker pool and the worker → loop hand-off.
//!
//! Backends that block (an upstream HTTP call) run on `--workers` threads fed
//! by a bounded job queue (`--queue-depth`). Each stream owns a
//! [`TokenSink`], the pool's implementation of the backend's
//! [`TokenOut`]: queued token text back to back in one reused `String` plus
//! the tokens' lengths, the final piece, a `cancelled` flag and a condition
//! variable, behind one mutex. A token costs no allocation once the sink's
//! buffers have grown to the stream's usual backlog: the worker appends the
//! text under the lock, the loop reads it in place ([`Piece::Token`] borrows
//! it) and the buffers are reused once drained.
//!
//! Only when a stream's queue was empty does a push put it on the loop's
//! [`ReadyList`], and only when nobody has woken the loop since it last took
//! that list does it call the waker — a burst of tokens from many workers
//! costs one wake-up. A full queue blocks the worker (backpressure reaches
//! the model); a cancel wakes it at once, shuts its upstream socket down,
//! and drops a job still waiting in the queue.
//!
//! Dropping the [`Pool`] stops its threads: idle workers exit at once, busy
//! ones after their current job, which is cancelled.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::{Backend, Cancelled, Finish, GenRequest, TokenOut};
use crate::metrics::Metrics;
use crate::sse::{ErrorCode, StreamError};

/// What a worker hands to the loop; a token borrows the sink's buffer for
/// the duration of [`TokenSink::take`]'s callback.
#[derive(Debug)]
pub enum Piece<'a> {
    Token(&'a str),
    /// Fields of a streamed choice besides its text, as raw JSON: an
    /// object like `{"delta":{"tool_calls":[…]},"logprobs":…}`.
    Delta(&'a str),
    Done(Finish),
    Error(StreamError),
}

/// Marks a queued length as a [`Piece::Delta`] (lengths never get near it).
const DELTA: usize = 1 << (usize::BITS - 1);

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

/// Text kept for reuse when a drained queue's buffer is larger than this:
/// a burst of huge tokens does not pin its memory for the stream's life.
const MAX_KEPT_TEXT: usize = 16 * 1024;

struct SinkState {
    /// Queued token text, back to back; the first queued token starts at
    /// `head`. Cleared (not freed) when the loop drains the queue.
    text: String,
    head: usize,
    /// Byte length of each queued token, in order.
    lens: VecDeque<usize>,
    /// The last piece; handed over after every queued token.
    end: Option<Result<Finish, StreamError>>,
    /// The last piece was pushed: nothing more is queued.
    finished: bool,
    producer_waiting: bool,
    started_at: Option<Instant>,
    upstream: Option<TcpStream>,
    /// The pool whose queue holds this stream's job, until a worker takes
    /// it: a cancel drops the job from there at once.
    queued_in: Option<Weak<PoolShared>>,
}

impl SinkState {
    fn is_empty(&self) -> bool {
        self.lens.is_empty() && self.end.is_none()
    }
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
    /// `slot` and `id` identify the stream to the loop; `capacity` is how
    /// many tokens may wait before the worker blocks.
    pub fn new(slot: usize, id: u64, capacity: usize, ready: Arc<ReadyList>) -> TokenSink {
        TokenSink {
            slot,
            id,
            capacity: capacity.max(1),
            state: Mutex::new(SinkState {
                text: String::new(),
                head: 0,
                lens: VecDeque::new(),
                end: None,
                finished: false,
                producer_waiting: false,
                started_at: None,
                upstream: None,
                queued_in: None,
            }),
            changed: Condvar::new(),
            cancelled: AtomicBool::new(false),
            ready,
        }
    }

    // ---- producer side (a worker, or a test scripting a stream) ----

    /// Hands one piece of text to the stream; blocks while `capacity`
    /// tokens wait. Empty text is not a token. Tokens pushed after
    /// [`TokenSink::finish`] are dropped.
    pub fn push_token(&self, text: &str) -> Result<(), Cancelled> {
        self.push_item(text, 0)
    }

    /// Hands a choice's other fields (see [`Piece::Delta`]) to the stream,
    /// in order with the tokens; blocks like [`TokenSink::push_token`].
    pub fn push_delta(&self, raw: &str) -> Result<(), Cancelled> {
        self.push_item(raw, DELTA)
    }

    fn push_item(&self, text: &str, kind: usize) -> Result<(), Cancelled> {
        if text.is_empty() {
            return self.check();
        }
        let mut st = lock(&self.state);
        loop {
            self.check()?;
            if st.lens.len() < self.capacity {
                break;
            }
            st.producer_waiting = true;
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.finished {
            return Ok(());
        }
        let was_empty = st.is_empty();
        st.text.push_str(text);
        st.lens.push_back(text.len() | kind);
        drop(st);
        if was_empty {
            self.ready.push(self.slot, self.id);
        }
        Ok(())
    }

    /// Hands the last piece to the stream: `done` or `error`, after every
    /// queued token. Never blocks; ignored once cancelled or finished.
    pub fn finish(&self, end: Result<Finish, StreamError>) {
        let mut st = lock(&self.state);
        if self.is_cancelled() || st.finished {
            return;
        }
        let was_empty = st.is_empty();
        st.end = Some(end);
        st.finished = true;
        drop(st);
        if was_empty {
            self.ready.push(self.slot, self.id);
        }
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

    // ---- loop side ----

    /// When a worker took the job, or `None` while it waits in the queue.
    /// Records that a producer took the job at `now` (what a worker does;
    /// a scripted producer in a test calls it itself).
    pub fn mark_started(&self, now: Instant) {
        lock(&self.state).started_at = Some(now);
    }

    pub fn started_at(&self) -> Option<Instant> {
        lock(&self.state).started_at
    }

    /// Hands queued pieces to `f`, in order, while it returns `true` (the
    /// piece for which it returns `false` is consumed too). Wakes a worker
    /// blocked on a full queue.
    pub fn take(&self, mut f: impl FnMut(Piece<'_>) -> bool) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let mut more = true;
        while more {
            let Some(entry) = st.lens.pop_front() else {
                break;
            };
            let start = st.head;
            st.head += entry & !DELTA;
            let text = &st.text[start..st.head];
            more = f(if entry & DELTA != 0 {
                Piece::Delta(text)
            } else {
                Piece::Token(text)
            });
        }
        if st.lens.is_empty() {
            st.head = 0;
            if st.text.capacity() > MAX_KEPT_TEXT {
                st.text = String::new();
            } else {
                st.text.clear();
            }
            if more {
                match st.end.take() {
                    Some(Ok(finish)) => _ = f(Piece::Done(finish)),
                    Some(Err(e)) => _ = f(Piece::Error(e)),
                    None => {}
                }
            }
        } else if st.head >= st.text.len() - st.head {
            // The loop stopped at its high-water mark and the worker keeps
            // the queue from ever draining: move the rest to the front (at
            // most as many bytes as were taken, so amortised O(1) a byte).
            st.text.drain(..st.head);
            st.head = 0;
        }
        if st.producer_waiting && st.lens.len() < self.capacity {
            st.producer_waiting = false;
            self.changed.notify_all();
        }
    }

    /// How many more pieces fit before a push blocks.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(lock(&self.state).lens.len())
    }

    /// Whether pieces are waiting (the loop stopped taking at its high-water mark).
    pub fn has_pieces(&self) -> bool {
        !lock(&self.state).is_empty()
    }

    /// Stops the generation: wakes a blocked worker, shuts its upstream
    /// socket down so a blocking read returns at once, and drops the job
    /// (with its request) if it still waits in the pool's queue.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        let (upstream, queued_in) = {
            let mut st = lock(&self.state);
            st.lens.clear();
            st.text.clear();
            st.head = 0;
            st.end = None;
            self.changed.notify_all();
            (st.upstream.take(), st.queued_in.take())
        };
        if let Some(s) = upstream {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Not under the sink's lock: a worker takes the queue's lock, then
        // the sink's.
        if let Some(pool) = queued_in.and_then(|w| w.upgrade()) {
            pool.drop_queued(self);
        }
    }
}

/// The worker side, as the backends see it.
impl TokenOut for TokenSink {
    fn push_token(&self, text: &str) -> Result<(), Cancelled> {
        TokenSink::push_token(self, text)
    }

    fn push_delta(&self, raw: &str) -> Result<(), Cancelled> {
        TokenSink::push_delta(self, raw)
    }

    fn sleep(&self, d: Duration) -> Result<(), Cancelled> {
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

    fn is_cancelled(&self) -> bool {
        TokenSink::is_cancelled(self)
    }

    fn set_upstream(&self, sock: Option<TcpStream>) {
        let mut st = lock(&self.state);
        // `cancel` sets the flag before it takes the lock: either it finds
        // this socket, or this sees the flag.
        if self.is_cancelled() {
            if let Some(s) = &sock {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        st.upstream = sock;
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
    /// Each worker's current stream, so that dropping the pool can cancel it.
    running: Vec<Option<Arc<TokenSink>>>,
    /// The pool was dropped: workers exit.
    shutdown: bool,
}

struct PoolShared {
    queue: Mutex<Queue>,
    available: Condvar,
    depth: usize,
    workers: usize,
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
}

impl PoolShared {
    /// Removes `sink`'s job from the queue, if it is still there.
    fn drop_queued(&self, sink: &TokenSink) {
        let job = {
            let mut q = lock(&self.queue);
            let at = q
                .jobs
                .iter()
                .position(|j| std::ptr::eq(Arc::as_ptr(&j.sink), sink));
            at.and_then(|i| q.jobs.remove(i))
        };
        if job.is_some() {
            self.metrics
                .jobs_dropped_queued
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The queue is full: answer 503 `overloaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// `--workers` threads running a [`Backend`]; they stop when it is dropped.
pub struct Pool {
    shared: Arc<PoolShared>,
    /// Not joined on drop (a backend that ignores its cancel must not hang
    /// the loop's exit); kept for tests that watch the threads end.
    #[cfg_attr(not(test), allow(dead_code))]
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn new(
        workers: usize,
        depth: usize,
        backend: Arc<dyn Backend>,
        metrics: Arc<Metrics>,
    ) -> Pool {
        let workers = workers.max(1);
        let shared = Arc::new(PoolShared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                busy: 0,
                running: vec![None; workers],
                shutdown: false,
            }),
            workers,
            available: Condvar::new(),
            depth,
            backend,
            metrics,
        });
        let threads = (0..workers)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("sluice-worker-{i}"))
                    .stack_size(256 * 1024)
                    .spawn(move || worker(&shared, i))
                    .expect("spawning a worker thread")
            })
            .collect();
        Pool { shared, threads }
    }

    /// Queues a generation; `Err` when `--queue-depth` jobs already wait.
    pub fn submit(&self, req: GenRequest, sink: Arc<TokenSink>) -> Result<(), QueueFull> {
        let mut q = lock(&self.shared.queue);
        if q.jobs.len() + q.busy >= self.shared.depth + self.shared.workers {
            return Err(QueueFull);
        }
        {
            let mut st = lock(&sink.state);
            if sink.is_cancelled() {
                drop(st);
                drop(q);
                self.shared
                    .metrics
                    .jobs_dropped_queued
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            st.queued_in = Some(Arc::downgrade(&self.shared));
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

impl Drop for Pool {
    fn drop(&mut self) {
        let (jobs, running) = {
            let mut q = lock(&self.shared.queue);
            q.shutdown = true;
            let running: Vec<_> = q.running.iter().flatten().cloned().collect();
            (std::mem::take(&mut q.jobs), running)
        };
        self.shared.available.notify_all();
        self.shared
            .metrics
            .jobs_dropped_queued
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        for job in jobs.iter().map(|j| &j.sink).chain(&running) {
            job.cancel();
        }
    }
}

fn worker(shared: &PoolShared, me: usize) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(j) = q.jobs.pop_front() {
                    q.busy += 1;
                    q.running[me] = Some(j.sink.clone());
                    break j;
                }
                q = shared.available.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        run_job(shared, job);
        let mut q = lock(&shared.queue);
        q.busy -= 1;
        q.running[me] = None;
    }
}

/// Runs one generation and hands its last piece to the loop.
fn run_job(shared: &PoolShared, job: Job) {
    let Job {
        req,
        sink,
        enqueued,
    } = job;
    let now = Instant::now();
    {
        let mut st = lock(&sink.state);
        st.queued_in = None;
        if sink.is_cancelled() {
            // The client left between the pop and now: the backend is
            // never called.
            drop(st);
            shared
                .metrics
                .jobs_dropped_queued
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.started_at = Some(now);
    }
    shared.metrics.queue_wait.observe(now - enqueued);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shared.backend.generate(&req, &*sink)
    }));
    TokenOut::set_upstream(&*sink, None);
    if sink.is_cancelled() {
        return;
    }
    sink.finish(match result {
        Ok(end) => end,
        Err(_) => {
            log::error!("backend panicked during stream {:x}", sink.id);
            Err(StreamError::new(ErrorCode::Internal, "the backend failed"))
        }
    });
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

    /// Every piece `take` hands over, as text (`done:R` / `error:M`).
    fn drain(sink: &TokenSink) -> Vec<String> {
        let mut got = Vec::new();
        sink.take(|p| {
            got.push(show(p));
            true
        });
        got
    }

    fn show(p: Piece<'_>) -> String {
        match p {
            Piece::Token(t) => t.to_owned(),
            Piece::Delta(d) => format!("delta:{d}"),
            Piece::Done(f) => format!("done:{}", f.finish_reason),
            Piece::Error(e) => format!("error:{}", e.message),
        }
    }

    fn finish(reason: &str) -> Result<Finish, StreamError> {
        Ok(Finish {
            finish_reason: reason.into(),
            prompt_tokens: None,
            completion_tokens: None,
        })
    }

    /// Polls `cond` every millisecond for at most five seconds.
    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
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
        assert_eq!(drain(&a), ["x", "y", "z"]);
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
    fn take_stops_where_told_and_the_end_comes_after_every_token() {
        let (ready, wakes) = ready();
        let sink = TokenSink::new(0, 1, 8, ready.clone());
        for t in ["a", "bb", "ccc"] {
            sink.push_token(t).unwrap();
        }
        sink.finish(finish("stop"));
        // The piece refused is consumed; the rest waits.
        let mut got = Vec::new();
        sink.take(|p| {
            got.push(show(p));
            got.len() < 2
        });
        assert_eq!(got, ["a", "bb"]);
        assert!(sink.has_pieces());
        // Stopping at the last token keeps the end for the next take.
        let mut got = Vec::new();
        sink.take(|p| {
            got.push(show(p));
            false
        });
        assert_eq!(got, ["ccc"]);
        assert!(sink.has_pieces());
        assert_eq!(drain(&sink), ["done:stop"]);
        assert!(!sink.has_pieces());
        // One wake for the whole stream: it was never seen empty.
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        // Nothing comes after the end.
        sink.push_token("late").unwrap();
        sink.finish(finish("again"));
        assert!(!sink.has_pieces());
    }

    #[test]
    fn an_end_alone_lists_the_stream() {
        let (ready, wakes) = ready();
        let sink = TokenSink::new(2, 9, 8, ready.clone());
        sink.finish(Err(StreamError::new(ErrorCode::UpstreamError, "boom")));
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        let mut list = Vec::new();
        ready.take(&mut list);
        assert_eq!(list, [(2, 9)]);
        assert_eq!(drain(&sink), ["error:boom"]);
    }

    /// Pushes and partial takes in a pseudo-random order give the tokens
    /// back exactly, whatever the buffer did (grow, drain, compact).
    #[test]
    fn the_text_buffer_matches_a_plain_queue() {
        let (ready, _) = ready();
        let sink = TokenSink::new(0, 1, 16, ready);
        let mut model: VecDeque<String> = VecDeque::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut pushed = 0;
        for _ in 0..5000 {
            if next(3) > 0 && model.len() < 16 {
                let text = format!("t{pushed}{}é", "x".repeat(next(40) as usize));
                sink.push_token(&text).unwrap();
                model.push_back(text);
                pushed += 1;
            } else {
                let want = next(5) as usize + 1;
                let mut got = Vec::new();
                sink.take(|p| {
                    got.push(show(p));
                    got.len() < want
                });
                let expected: Vec<String> = (0..want.min(model.len()))
                    .map(|_| model.pop_front().unwrap())
                    .collect();
                assert_eq!(got, expected);
            }
            assert_eq!(sink.has_pieces(), !model.is_empty());
            let st = lock(&sink.state);
            let queued: usize = st.lens.iter().map(|l| l & !DELTA).sum();
            assert_eq!(st.head + queued, st.text.len());
        }
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
        wait_for("a full queue", || lock(&sink.state).producer_waiting);
        assert_eq!(drain(&sink).len(), 2);
        wait_for("a full queue again", || lock(&sink.state).producer_waiting);
        sink.cancel();
        assert_eq!(t.join().unwrap(), 4);
    }

    #[test]
    fn cancel_interrupts_a_sleep() {
        let (ready, _) = ready();
        let sink = Arc::new(TokenSink::new(0, 1, 2, ready));
        let s = sink.clone();
        let t = std::thread::spawn(move || TokenOut::sleep(&*s, Duration::from_secs(600)));
        sink.cancel();
        assert_eq!(t.join().unwrap(), Err(Cancelled));
    }

    #[test]
    fn cancel_shuts_the_registered_upstream_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = listener.accept().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (ready, _) = ready();
        let sink = TokenSink::new(0, 1, 2, ready);
        sink.set_upstream(Some(ours.try_clone().unwrap()));
        sink.cancel();
        // The upstream sees the close at once (EOF, not a timeout).
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut theirs, &mut buf).unwrap(), 0);
        // A socket registered after the cancel is shut down at once.
        let late = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = listener.accept().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        sink.set_upstream(Some(late));
        assert_eq!(std::io::Read::read(&mut theirs, &mut buf).unwrap(), 0);
    }

    /// A backend that counts its calls and waits for a cancel.
    #[derive(Default)]
    struct Blocker {
        started: AtomicUsize,
        saw_cancel: AtomicUsize,
    }

    impl Backend for Blocker {
        fn generate(&self, _req: &GenRequest, out: &dyn TokenOut) -> Result<Finish, StreamError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            out.push_token("first").ok();
            if out.sleep(Duration::from_secs(600)).is_err() {
                self.saw_cancel.fetch_add(1, Ordering::SeqCst);
            }
            finish("stop")
        }
    }

    fn blocker_pool(workers: usize, depth: usize) -> (Pool, Arc<Blocker>, Arc<Metrics>) {
        let backend = Arc::new(Blocker::default());
        let metrics = Arc::new(Metrics::default());
        let pool = Pool::new(workers, depth, backend.clone(), metrics.clone());
        (pool, backend, metrics)
    }

    fn sink(id: u64) -> Arc<TokenSink> {
        Arc::new(TokenSink::new(0, id, 8, ready().0))
    }

    #[test]
    fn a_cancelled_queued_job_leaves_the_queue_at_once() {
        let (pool, backend, metrics) = blocker_pool(1, 1);
        let running = sink(1);
        pool.submit(GenRequest::default(), running.clone()).unwrap();
        wait_for("the worker busy", || running.started_at().is_some());
        let queued = sink(2);
        pool.submit(GenRequest::default(), queued.clone()).unwrap();
        assert_eq!(pool.submit(GenRequest::default(), sink(3)), Err(QueueFull));
        queued.cancel();
        // No waiting: the job and its request are gone, its place is free.
        assert_eq!(lock(&pool.shared.queue).jobs.len(), 0);
        assert_eq!(metrics.jobs_dropped_queued.load(Ordering::SeqCst), 1);
        let next = sink(4);
        pool.submit(GenRequest::default(), next.clone()).unwrap();
        running.cancel();
        wait_for("the next job", || next.started_at().is_some());
        assert_eq!(backend.started.load(Ordering::SeqCst), 2);
        assert!(queued.started_at().is_none());
        next.cancel();
    }

    #[test]
    fn a_finished_job_hands_its_end_after_its_tokens() {
        let (pool, _backend, _) = blocker_pool(1, 1);
        let (ready, _) = ready();
        let s = Arc::new(TokenSink::new(0, 1, 8, ready));
        pool.submit(GenRequest::default(), s.clone()).unwrap();
        wait_for("the first token", || s.has_pieces());
        assert_eq!(drain(&s), ["first"]);
        drop(pool);
        // The pool's drop cancelled the job: no end is handed over.
        assert!(!s.has_pieces());
    }

    /// Waits (bounded) for every thread to finish.
    fn all_finish(threads: Vec<JoinHandle<()>>) {
        wait_for("the threads to exit", || {
            threads.iter().all(|t| t.is_finished())
        });
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn dropping_the_pool_stops_idle_and_busy_workers() {
        let (mut pool, backend, metrics) = blocker_pool(3, 4);
        let busy = sink(1);
        pool.submit(GenRequest::default(), busy.clone()).unwrap();
        wait_for("one worker busy", || busy.started_at().is_some());
        let threads = std::mem::take(&mut pool.threads);
        assert_eq!(threads.len(), 3);
        drop(pool);
        all_finish(threads);
        // The busy worker's backend call was woken through its cancel.
        assert!(busy.is_cancelled());
        assert_eq!(backend.saw_cancel.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.jobs_dropped_queued.load(Ordering::SeqCst), 0);
        // The workers dropped their hold on the backend.
        assert_eq!(Arc::strong_count(&backend), 1);
    }

    #[test]
    fn dropping_the_pool_cancels_jobs_still_queued() {
        let (mut pool, backend, metrics) = blocker_pool(1, 4);
        let busy = sink(1);
        pool.submit(GenRequest::default(), busy.clone()).unwrap();
        wait_for("the worker busy", || busy.started_at().is_some());
        let queued = sink(2);
        pool.submit(GenRequest::default(), queued.clone()).unwrap();
        let threads = std::mem::take(&mut pool.threads);
        drop(pool);
        all_finish(threads);
        assert!(queued.is_cancelled());
        assert_eq!(backend.started.load(Ordering::SeqCst), 1);
        assert_eq!(metrics.jobs_dropped_queued.load(Ordering::SeqCst), 1);
    }

    struct Panics;

    impl Backend for Panics {
        fn generate(&self, _req: &GenRequest, out: &dyn TokenOut) -> Result<Finish, StreamError> {
            out.push_token("tok").ok();
            panic!("on purpose");
        }
    }

    #[test]
    fn a_panicking_backend_ends_its_stream_with_an_internal_error() {
        let pool = Pool::new(1, 1, Arc::new(Panics), Arc::new(Metrics::default()));
        let s = sink(1);
        pool.submit(GenRequest::default(), s.clone()).unwrap();
        let mut got = Vec::new();
        wait_for("the end", || {
            got.extend(drain(&s));
            got.last().is_some_and(|l| l.starts_with("error:"))
        });
        assert_eq!(got, ["tok", "error:the backend failed"]);
    }
}
