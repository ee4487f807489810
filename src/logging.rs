//! Logs to stderr that cost the event loop no syscall and never block it.
//!
//! A logger that writes synchronously (as `simple_logger` does) on a
//! stderr that nobody reads (a full pipe) would stall every stream; even a
//! hand-off that wakes a thread costs the loop a futex wake (~200 µs of
//! client TTFT on a small VM) if it happens before the response is written.
//! So the `log` facade is served by a small front that formats the line (escaped, see [`escape`]) on the
//! caller's thread and appends it to one bounded buffer; one thread,
//! `sluice-log`, takes the buffer, renders its lines (text in
//! `simple_logger`'s layout, [`text_line`], or JSON, [`json_line`]) into one
//! buffer and writes that to stderr with one `write`. It runs as
//! `SCHED_IDLE` (`background_priority`), so on a CPU it shares with an
//! event loop, the loop woken for a client preempts it at once.
//!
//! Who wakes that thread:
//! - the event loop never does from a `log` call: it marks itself with
//!   [`mark_loop_thread`] and calls [`end_of_turn`] once per loop turn,
//!   after its writes, which wakes the log thread only when the loop has
//!   queued [`LOOP_BATCH`] lines and the thread sleeps: under load a wake
//!   (a futex call, and a thread competing for the CPU with the clients)
//!   costs one per batch, not one per request; fewer lines wait at most
//!   [`POLL`];
//! - any other thread (workers, upstream probes, `main`) wakes it from the
//!   `log` call itself, so their lines reach stderr at once;
//! - as a safety net the log thread also looks every [`POLL`] on its own
//!   (so a loop that forgot `end_of_turn` delays its lines, never loses them).
//!
//! The buffer sits behind a mutex that is held only to copy a line in or to
//! swap the whole buffer out, never while formatting or writing, so a `log`
//! call on the loop takes it uncontended (an atomic, no syscall) in practice.
//!
//! When the buffer is full (stderr does not keep up) the line is dropped and
//! counted (`sluice_log_lines_dropped_total`). [`flush`] waits, bounded, for
//! what is queued to reach stderr: `main` calls it before the process exits.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

static LOGGER: OnceLock<Front> = OnceLock::new();

/// Lines waiting for stderr before new ones are dropped.
const MAX_LINES: usize = 8192;
/// Bytes of target and message text waiting for stderr before new lines are
/// dropped (the buffer and its spare twin hold at most twice this).
const MAX_BYTES: usize = 1 << 20;
/// How often the log thread looks for lines nobody woke it for.
const POLL: Duration = Duration::from_millis(100);
/// Lines the loop queues before its `end_of_turn` wakes the log thread.
const LOOP_BATCH: usize = 512;

thread_local! {
    /// Set on the event-loop thread: its `log` calls only append.
    static ON_LOOP: Cell<bool> = const { Cell::new(false) };
    /// Reused to format a message before taking the buffer's lock, so the
    /// lock is held for a copy, not for formatting.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

// ------------------------------------------------------------------ API

/// How lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `TIMESTAMP LEVEL [target] message`, as `simple_logger` writes it
    /// (see [`text_line`]).
    #[default]
    Text,
    /// One JSON object per line (see [`json_line`]).
    Json,
}

/// Installs the logger once per process (text lines); later calls only keep
/// the first level.
pub fn init(level: LevelFilter) {
    init_with(level, Format::Text)
}

/// [`init`], choosing the line format.
pub fn init_with(level: LevelFilter, format: Format) {
    let mut installed = false;
    let front = LOGGER.get_or_init(|| {
        installed = true;
        Front {
            level,
            queue: Queue::new(MAX_LINES, MAX_BYTES),
        }
    });
    if installed {
        std::thread::Builder::new()
            .name("sluice-log".into())
            .spawn(move || {
                background_priority();
                front.queue.run(&mut Stderr::new(format), POLL);
            })
            .expect("spawning the log thread");
        let _ = log::set_logger(front);
        log::set_max_level(level);
    }
}

/// Puts the calling thread (the log thread) in `SCHED_IDLE`, for this
/// thread only: on a CPU it shares with an event loop, the loop waking for
/// a client's bytes preempts it at once (a `nice` 19 thread may keep the
/// CPU until the end of its slice, ~0.75 ms), so writing the access log
/// costs no client latency (the `loglevel` benchmark). On a CPU that is
/// busy all the time it gets little CPU and its buffer may fill: lines are
/// then dropped and counted, never waited for. Best effort: a refusal
/// changes nothing but the scheduling.
fn background_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscalls on the calling thread (id 0 = itself), with a
    // pointer to a live local.
    unsafe {
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let _ = libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
    }
}

/// Marks the calling thread as the event loop: its log lines are only
/// appended to the buffer, and it promises to call [`end_of_turn`] once per
/// turn. Call it once, when the loop starts.
pub fn mark_loop_thread() {
    ON_LOOP.with(|f| f.set(true));
}

/// Called by the event loop once per turn, after its writes: wakes the log
/// thread if the loop queued lines during the turn (at most one wake per
/// turn; nothing at all when it logged nothing).
pub fn end_of_turn() {
    if let Some(front) = LOGGER.get() {
        front.queue.end_of_turn();
    }
}

/// Waits at most `timeout` for every line queued before the call to reach
/// stderr; true if they did. A blocked stderr holds the caller no longer
/// than `timeout`. Best effort: for the lines of a process about to exit.
pub fn flush(timeout: Duration) -> bool {
    LOGGER.get().is_none_or(|front| front.queue.flush(timeout))
}

/// A duration in milliseconds with `decimals` digits after the point
/// (rounded half up), formatted with integer arithmetic: the access log
/// writes two a request on the loop, where float formatting cost more than
/// the rest of the line. `None` reads `-1` (with the same decimals).
#[derive(Debug, Clone, Copy)]
pub struct Ms(pub Option<Duration>, pub u32);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Ms(d, decimals) = *self;
        let decimals = decimals.min(6);
        let scale = 10u128.pow(decimals);
        let Some(d) = d else {
            return match decimals {
                0 => f.write_str("-1"),
                n => write!(f, "-1.{:0n$}", 0, n = n as usize),
            };
        };
        // Units of 10^-decimals ms, rounded half up.
        let unit = 1_000_000 / scale;
        let units = (d.as_nanos() + unit / 2) / unit;
        match decimals {
            0 => write!(f, "{units}"),
            n => write!(f, "{}.{:0n$}", units / scale, units % scale, n = n as usize),
        }
    }
}

/// A client's address, or nothing, written without a `String` first.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<std::net::SocketAddr>);

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => fmt::Display::fmt(&p, f),
            None => Ok(()),
        }
    }
}

/// Lines dropped so far because stderr did not keep up.
pub fn dropped() -> u64 {
    LOGGER.get().map_or(0, |front| front.queue.dropped())
}

/// `s` with every character that is not printable ASCII escaped, so that
/// text a client chose (a method, a path, a request id) cannot end a log
/// line early, forge another one, or hide in look-alike characters: ASCII
/// controls and DEL become `\xNN`, and every non-ASCII character (C1
/// controls, U+2028/U+2029, and all the rest) becomes `\u{NNNN}`.
///
/// The backslash itself is left alone so that escaping is idempotent: the
/// access log may escape a field and the logger escape the whole message
/// again without doubling anything. (The price: a client can type a literal
/// `\x0a`, which reads like an escaped newline but forges nothing.)
pub fn escape(s: &str) -> Cow<'_, str> {
    match s.bytes().position(needs_escape) {
        None => Cow::Borrowed(s),
        Some(_) => {
            let mut out = String::with_capacity(s.len() + 16);
            escape_into(&mut out, s);
            Cow::Owned(out)
        }
    }
}

// ------------------------------------------------------------------ escaping

fn needs_escape(b: u8) -> bool {
    !(0x20..0x7f).contains(&b)
}

fn escape_into(out: &mut String, mut s: &str) {
    while let Some(i) = s.bytes().position(needs_escape) {
        out.push_str(&s[..i]);
        let c = s[i..].chars().next().expect("a char starts at i");
        let _ = if c.is_ascii() {
            write!(out, "\\x{:02x}", u32::from(c))
        } else {
            write!(out, "\\u{{{:04x}}}", u32::from(c))
        };
        s = &s[i + c.len_utf8()..];
    }
    out.push_str(s);
}

/// Escapes everything formatted through it (no temporary `String`).
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

fn format_escaped(out: &mut String, args: &fmt::Arguments) {
    out.clear();
    match args.as_str() {
        Some(s) => escape_into(out, s),
        None => {
            let _ = fmt::write(&mut Escaping(out), *args);
        }
    }
}

// ------------------------------------------------------------------ front

struct Front {
    level: LevelFilter,
    queue: Queue,
}

impl Log for Front {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let on_loop = ON_LOOP.try_with(Cell::get).unwrap_or(false);
        let push = |text: &str| {
            self.queue
                .push(record.level(), record.target(), text, !on_loop);
        };
        // The scratch buffer is busy if formatting this message logs too.
        let done = SCRATCH.try_with(|s| match s.try_borrow_mut() {
            Ok(mut s) => {
                format_escaped(&mut s, record.args());
                push(&s);
                true
            }
            Err(_) => false,
        });
        if !matches!(done, Ok(true)) {
            let mut s = String::new();
            format_escaped(&mut s, record.args());
            push(&s);
        }
    }

    fn flush(&self) {}
}

// ------------------------------------------------------------------ queue

/// Where the log thread puts lines: stderr, or a test's collector.
trait Sink {
    fn write(&mut self, level: Level, target: &str, message: &str);
    /// After a batch's lines: where a sink writes them out; false if it
    /// failed (and lost them).
    fn end_batch(&mut self) -> bool {
        true
    }
}

/// Renders a batch's lines into one buffer and writes it to stderr with
/// one `write` (a line a syscall, as `simple_logger` did, cost the log
/// thread more than the rendering).
struct Stderr {
    format: Format,
    out: String,
}

impl Stderr {
    fn new(format: Format) -> Stderr {
        Stderr {
            format,
            out: String::new(),
        }
    }
}

impl Sink for Stderr {
    fn write(&mut self, level: Level, target: &str, message: &str) {
        let now = std::time::SystemTime::now();
        match self.format {
            Format::Text => text_line(&mut self.out, now, level, target, message),
            Format::Json => json_line(&mut self.out, now, level, target, message),
        }
    }

    fn end_batch(&mut self) -> bool {
        let ok =
            std::io::Write::write_all(&mut std::io::stderr().lock(), self.out.as_bytes()).is_ok();
        self.out.clear();
        // A batch larger than usual leaves no big buffer behind.
        self.out.shrink_to(1 << 16);
        ok
    }
}

/// One text line, ending with a newline, in `simple_logger`'s layout:
/// `2026-12-03T14:38:28.123Z INFO  [target] message` (UTC, milliseconds,
/// the level padded to five).
pub fn text_line(
    out: &mut String,
    at: std::time::SystemTime,
    level: Level,
    target: &str,
    message: &str,
) {
    use std::fmt::Write as _;
    rfc3339(out, at);
    let _ = writeln!(out, " {:<5} [{target}] {message}", level.as_str());
}

/// The target of access-log lines: `METHOD PATH STATUS key=value…`, which
/// the JSON format turns into fields.
pub const ACCESS: &str = "sluice::access";

/// One log line as JSON, ending with a newline: `time` (RFC 3339, UTC,
/// milliseconds), `level`, `target`, `message`; an access line (target
/// [`ACCESS`]) also has `method`, `path`, `status` and each `key=value` of
/// its message as a field (`request_id`, `peer`, `principal`, `stream`,
/// `outcome`, `tokens`, `ttft_ms`, `duration_ms`; numbers as numbers).
pub fn json_line(
    out: &mut String,
    at: std::time::SystemTime,
    level: Level,
    target: &str,
    message: &str,
) {
    use std::fmt::Write as _;
    let field = |out: &mut String, k: &str, v: &str, number: bool| {
        out.push(',');
        let _ = write!(out, "{}:", serde_json::Value::from(k));
        if number && v.parse::<f64>().is_ok_and(f64::is_finite) {
            out.push_str(v);
        } else {
            let _ = write!(out, "{}", serde_json::Value::from(v));
        }
    };
    out.push_str("{\"time\":\"");
    rfc3339(out, at);
    out.push('"');
    field(out, "level", level.as_str(), false);
    field(out, "target", target, false);
    field(out, "message", message, false);
    if target == ACCESS {
        let mut words = message.split(' ');
        for (k, number) in [("method", false), ("path", false), ("status", true)] {
            if let Some(w) = words.next() {
                field(out, k, w, number);
            }
        }
        for w in words {
            if let Some((k, v)) = w.split_once('=') {
                let number = matches!(k, "tokens" | "ttft_ms" | "duration_ms" | "after");
                field(out, k, v, number);
            }
        }
    }
    out.push_str("}\n");
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
fn rfc3339(out: &mut String, at: std::time::SystemTime) {
    use std::fmt::Write as _;
    let d = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    );
}

/// Lines as one text buffer plus where each ends, so that queueing a line
/// at steady state allocates nothing (the log thread hands back an emptied
/// batch with its capacity).
#[derive(Default)]
struct Batch {
    /// Every line's target then message, back to back.
    text: String,
    lines: Vec<LineEnd>,
}

struct LineEnd {
    level: Level,
    target_end: usize,
    end: usize,
}

impl Batch {
    fn len(&self) -> usize {
        self.lines.len()
    }

    fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    fn push(&mut self, level: Level, target: &str, message: &str) {
        self.text.push_str(target);
        let target_end = self.text.len();
        self.text.push_str(message);
        self.lines.push(LineEnd {
            level,
            target_end,
            end: self.text.len(),
        });
    }

    fn iter(&self) -> impl Iterator<Item = (Level, &str, &str)> {
        let mut start = 0;
        self.lines.iter().map(move |l| {
            let line = (
                l.level,
                &self.text[start..l.target_end],
                &self.text[l.target_end..l.end],
            );
            start = l.end;
            line
        })
    }

    fn clear(&mut self) {
        self.text.clear();
        self.lines.clear();
    }
}

struct State {
    batch: Batch,
    /// The log thread waits for a wake and nobody has sent one since; a
    /// wake is sent only then, so a burst of lines costs one.
    idle: bool,
    /// Lines ever queued, and of those, lines the sink has been through
    /// (written, or lost with a failed sink): what `flush` compares.
    queued: u64,
    done: u64,
    /// Callers of `flush` waiting on `written`.
    flushers: usize,
    /// The sink failed: nothing more is taken.
    closed: bool,
}

/// The bounded buffer between the threads that log and the log thread.
struct Queue {
    state: Mutex<State>,
    /// Wakes the log thread.
    wake: Condvar,
    /// Tells `flush` callers the log thread finished a batch.
    written: Condvar,
    /// The loop queued lines since its last `end_of_turn`.
    loop_lines: AtomicBool,
    dropped: AtomicU64,
    max_lines: usize,
    max_bytes: usize,
    /// Lines the loop queues before `end_of_turn` wakes the log thread.
    loop_batch: usize,
}

impl Queue {
    fn new(max_lines: usize, max_bytes: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                batch: Batch::default(),
                idle: false,
                queued: 0,
                done: 0,
                flushers: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            written: Condvar::new(),
            loop_lines: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            max_lines,
            max_bytes,
            loop_batch: LOOP_BATCH.min(max_lines),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere never leaves the state half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Queues a line, or drops and counts it when the buffer is full.
    /// `wake`: wake the log thread now (false on the loop, which wakes it
    /// in `end_of_turn`). Returns whether this call woke it.
    fn push(&self, level: Level, target: &str, message: &str, wake: bool) -> bool {
        let mut st = self.lock();
        let bytes = st.batch.text.len() + target.len() + message.len();
        if st.closed || st.batch.len() >= self.max_lines || bytes > self.max_bytes {
            drop(st);
            self.dropped.fetch_add(1, Relaxed);
            return false;
        }
        st.batch.push(level, target, message);
        st.queued += 1;
        if !wake {
            self.loop_lines.store(true, Relaxed);
            return false;
        }
        let woke = std::mem::take(&mut st.idle);
        drop(st);
        if woke {
            self.wake.notify_one();
        }
        woke
    }

    /// The loop's once-per-turn wake; returns whether it woke the thread.
    fn end_of_turn(&self) -> bool {
        // Most turns log nothing: one relaxed load, no lock.
        if !self.loop_lines.load(Relaxed) {
            return false;
        }
        self.loop_lines.store(false, Relaxed);
        let mut st = self.lock();
        let woke = st.batch.lines.len() >= self.loop_batch && std::mem::take(&mut st.idle);
        drop(st);
        if woke {
            self.wake.notify_one();
        }
        woke
    }

    /// The log thread: takes the whole buffer, writes it outside the lock,
    /// repeats; sleeps up to `poll` when there is nothing. Returns only if
    /// the sink panics (stderr gone).
    fn run(&self, sink: &mut dyn Sink, poll: Duration) {
        let mut batch = Batch::default();
        loop {
            self.take(&mut batch, poll);
            if batch.is_empty() {
                continue;
            }
            let mut written = 0;
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                for (level, target, message) in batch.iter() {
                    sink.write(level, target, message);
                    written += 1;
                }
                sink.end_batch()
            }));
            let failed = match outcome {
                Ok(true) => false,
                // Nothing of the batch got out.
                Ok(false) => {
                    written = 0;
                    true
                }
                Err(_) => true,
            };
            if self.finished(batch.len(), written, failed) {
                return;
            }
            batch.clear();
        }
    }

    /// Swaps the queued lines into `spare` (which must be empty), first
    /// sleeping up to `poll` if there are none.
    fn take(&self, spare: &mut Batch, poll: Duration) {
        let mut st = self.lock();
        if st.batch.is_empty() {
            st.idle = true;
            st = self
                .wake
                .wait_timeout(st, poll)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            st.idle = false;
        }
        std::mem::swap(&mut st.batch, spare);
    }

    /// Records a batch of `n` lines as done (`written` of them reached the
    /// sink) and tells `flush`; true if the sink failed and is now closed.
    fn finished(&self, n: usize, written: usize, failed: bool) -> bool {
        let mut st = self.lock();
        st.done += n as u64;
        if failed {
            st.closed = true;
            let lost = n - written + st.batch.len();
            st.done += st.batch.len() as u64;
            st.batch.clear();
            self.dropped.fetch_add(lost as u64, Relaxed);
        }
        let flushers = st.flushers > 0;
        drop(st);
        if flushers {
            self.written.notify_all();
        }
        failed
    }

    fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        let target = st.queued;
        if st.done >= target {
            return true;
        }
        if std::mem::take(&mut st.idle) {
            self.wake.notify_one();
        }
        st.flushers += 1;
        while st.done < target && !st.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .written
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.flushers -= 1;
        st.done >= target
    }

    /// What the log thread does just before it sleeps (tests have no thread).
    #[cfg(test)]
    fn park(&self) {
        self.lock().idle = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    #[test]
    fn milliseconds_table() {
        let us = Duration::from_micros;
        let ns = Duration::from_nanos;
        let cases = [
            (Some(us(1500)), 3, "1.500"),
            (Some(ns(1_234_500)), 3, "1.235"),
            (Some(ns(1_234_499)), 3, "1.234"),
            (Some(ns(999_999_999)), 3, "1000.000"),
            (Some(Duration::ZERO), 3, "0.000"),
            (Some(us(20_049)), 1, "20.0"),
            (Some(us(20_050)), 1, "20.1"),
            (Some(us(7)), 0, "0"),
            (Some(us(500)), 0, "1"),
            (None, 3, "-1.000"),
            (None, 1, "-1.0"),
            (None, 0, "-1"),
            (Some(Duration::from_secs(86_400 * 365)), 1, "31536000000.0"),
        ];
        for (d, decimals, want) in cases {
            assert_eq!(Ms(d, decimals).to_string(), want, "{d:?} {decimals}");
            if let Some(d) = d {
                let float = format!("{:.*}", decimals as usize, d.as_secs_f64() * 1000.0);
                assert!(
                    float.len() == want.len(),
                    "same shape as the float: {float} {want}"
                );
            }
        }
    }

    #[test]
    fn text_lines_have_simple_loggers_layout() {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_764_403_200_123);
        let cases = [
            (
                Level::Info,
                "sluice::access",
                "GET / 200",
                "2025-11-29T08:00:00.123Z INFO  [sluice::access] GET / 200\n",
            ),
            (
                Level::Error,
                "t",
                "",
                "2025-11-29T08:00:00.123Z ERROR [t] \n",
            ),
            (
                Level::Warn,
                "a::b",
                "x y",
                "2025-11-29T08:00:00.123Z WARN  [a::b] x y\n",
            ),
        ];
        for (level, target, message, want) in cases {
            let mut out = String::from("kept|");
            text_line(&mut out, at, level, target, message);
            assert_eq!(out, format!("kept|{want}"));
        }
    }

    #[test]
    fn json_lines_carry_the_access_fields() {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_764_403_200_123);
        let mut out = String::new();
        json_line(
            &mut out,
            at,
            Level::Info,
            ACCESS,
            "GET /v1/chat/stream 200 request_id=r1 peer=127.0.0.1:5 principal=alice stream=ab outcome=done tokens=3 ttft_ms=1.500 duration_ms=20.0",
        );
        assert!(out.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["time"], "2025-11-29T08:00:00.123Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/v1/chat/stream");
        assert_eq!(v["status"], 200);
        assert_eq!(v["request_id"], "r1");
        assert_eq!(v["principal"], "alice");
        assert_eq!(v["outcome"], "done");
        assert_eq!(v["tokens"], 3);
        assert_eq!(v["ttft_ms"], 1.5);
        assert_eq!(v["duration_ms"], 20.0);
        let mut out = String::new();
        json_line(
            &mut out,
            at,
            Level::Warn,
            "sluice::server",
            "a \"quoted\" line",
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["message"], "a \"quoted\" line");
        assert!(v.get("method").is_none());
    }

    #[test]
    fn escape_table() {
        let table: &[(&str, &str)] = &[
            ("", ""),
            ("GET /v1/chat/stream?x=1 200", "GET /v1/chat/stream?x=1 200"),
            ("a\nb", "a\\x0ab"),
            ("a\r\nINFO forged", "a\\x0d\\x0aINFO forged"),
            ("\t", "\\x09"),
            ("\0", "\\x00"),
            ("\x1b[31mred", "\\x1b[31mred"),
            ("del\x7f", "del\\x7f"),
            ("\u{85}next line", "\\u{0085}next line"),
            ("\u{9b}csi", "\\u{009b}csi"),
            ("ls\u{2028}ps\u{2029}", "ls\\u{2028}ps\\u{2029}"),
            ("héllo", "h\\u{00e9}llo"),
            ("🎉", "\\u{1f389}"),
            ("\u{202e}gnp.exe", "\\u{202e}gnp.exe"),
            ("\u{feff}bom", "\\u{feff}bom"),
            // The backslash stays: escaping is idempotent.
            ("a\\x0ab", "a\\x0ab"),
            (
                "~ !\"#$%&'()*+,-./:;<=>?@[]^_`{|}",
                "~ !\"#$%&'()*+,-./:;<=>?@[]^_`{|}",
            ),
        ];
        for (input, want) in table {
            let got = escape(input);
            assert_eq!(got, *want, "escape({input:?})");
            assert!(
                got.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "{got:?} is printable ASCII"
            );
            assert_eq!(escape(&got), got, "escape is idempotent on {input:?}");
        }
    }

    #[test]
    fn escape_borrows_when_nothing_needs_escaping() {
        assert!(matches!(escape("GET / 200"), Cow::Borrowed(_)));
        assert!(matches!(escape("GET /\n 200"), Cow::Owned(_)));
    }

    #[test]
    fn messages_are_escaped_while_formatting() {
        let mut out = String::from("stale");
        format_escaped(&mut out, &format_args!("path={} id={}", "/a\nb", "é"));
        assert_eq!(out, "path=/a\\x0ab id=\\u{00e9}");
        format_escaped(&mut out, &format_args!("plain\r"));
        assert_eq!(out, "plain\\x0d");
    }

    /// Collects what reaches the sink.
    #[derive(Default)]
    struct Lines(Vec<(Level, String, String)>);

    impl Sink for Lines {
        fn write(&mut self, level: Level, target: &str, message: &str) {
            self.0.push((level, target.into(), message.into()));
        }
    }

    /// One pass of the log thread, without a thread.
    fn drain(q: &Queue, sink: &mut dyn Sink) -> usize {
        let mut batch = Batch::default();
        q.take(&mut batch, Duration::ZERO);
        let n = batch.len();
        for (level, target, message) in batch.iter() {
            sink.write(level, target, message);
        }
        q.finished(n, n, false);
        n
    }

    #[test]
    fn lines_reach_the_sink_in_order_with_level_and_target() {
        let q = Queue::new(100, 10_000);
        q.push(Level::Info, "sluice::server", "GET / 200", true);
        q.push(Level::Warn, "", "empty target", false);
        q.push(Level::Error, "x", "", true);
        let mut sink = Lines::default();
        assert_eq!(drain(&q, &mut sink), 3);
        let want = [
            (Level::Info, "sluice::server", "GET / 200"),
            (Level::Warn, "", "empty target"),
            (Level::Error, "x", ""),
        ];
        let got: Vec<_> = sink
            .0
            .iter()
            .map(|(l, t, m)| (*l, t.as_str(), m.as_str()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(drain(&q, &mut sink), 0);
        assert_eq!(q.dropped(), 0);
    }

    #[test]
    fn the_loop_wakes_the_log_thread_once_per_batch_and_only_at_a_turns_end() {
        let mut q = Queue::new(100, 10_000);
        q.loop_batch = 5;
        q.park();
        for i in 0..4 {
            let woke = q.push(Level::Info, "t", &format!("line {i}"), false);
            assert!(!woke, "a log call on the loop never wakes");
        }
        assert!(!q.end_of_turn(), "fewer than a batch wait for the poll");
        assert!(!q.push(Level::Info, "t", "line 4", false));
        assert!(q.end_of_turn(), "a batch: the end of the turn wakes");
        assert!(!q.end_of_turn(), "once");
        // Asleep again with nothing new: a turn that logged nothing wakes nobody.
        drain(&q, &mut Lines::default());
        q.park();
        assert!(!q.end_of_turn());
        // A thread already awake is not woken again.
        q.lock().idle = false;
        for _ in 0..5 {
            q.push(Level::Info, "t", "x", false);
        }
        assert!(!q.end_of_turn());
        assert_eq!(drain(&q, &mut Lines::default()), 5);
    }

    #[test]
    fn other_threads_wake_the_log_thread_once_per_sleep() {
        let q = Queue::new(100, 10_000);
        assert!(!q.push(Level::Info, "t", "awake", true), "awake: no wake");
        q.park();
        assert!(q.push(Level::Info, "t", "a", true), "asleep: woken");
        assert!(!q.push(Level::Info, "t", "b", true), "already woken");
        assert_eq!(drain(&q, &mut Lines::default()), 3);
    }

    #[test]
    fn a_full_buffer_drops_and_counts_until_the_thread_catches_up() {
        let q = Queue::new(3, 10_000);
        for i in 0..5 {
            q.push(Level::Info, "t", &format!("{i}"), true);
        }
        assert_eq!(q.dropped(), 2);
        let mut sink = Lines::default();
        assert_eq!(drain(&q, &mut sink), 3);
        let kept: Vec<&str> = sink.0.iter().map(|l| l.2.as_str()).collect();
        assert_eq!(kept, ["0", "1", "2"], "the oldest lines are kept");
        q.push(Level::Info, "t", "after", true);
        assert_eq!(drain(&q, &mut sink), 1);
        assert_eq!(q.dropped(), 2);
    }

    #[test]
    fn the_byte_budget_bounds_the_buffer_too() {
        let q = Queue::new(100, 10);
        q.push(Level::Info, "tt", "12345678", true); // exactly 10 bytes
        q.push(Level::Info, "", "x", true);
        q.push(Level::Info, "", &"y".repeat(50), true);
        assert_eq!(q.dropped(), 2);
        assert_eq!(drain(&q, &mut Lines::default()), 1);
    }

    #[test]
    fn flush_without_pending_lines_returns_at_once() {
        let q = Queue::new(10, 1000);
        assert!(q.flush(Duration::from_secs(60)));
        q.push(Level::Info, "t", "x", true);
        drain(&q, &mut Lines::default());
        assert!(q.flush(Duration::from_secs(60)));
    }

    #[test]
    fn flush_gives_up_after_its_timeout() {
        let q = Queue::new(10, 1000);
        q.push(Level::Info, "t", "x", true);
        // No log thread at all (stderr blocked forever, say).
        assert!(!q.flush(Duration::ZERO));
        assert!(!q.flush(Duration::from_millis(1)));
    }

    struct Broken;

    impl Sink for Broken {
        fn write(&mut self, _: Level, _: &str, message: &str) {
            if message == "boom" {
                panic!("stderr is gone");
            }
        }
    }

    #[test]
    fn a_failing_sink_closes_the_queue_and_counts_what_it_lost() {
        let q = Queue::new(10, 1000);
        for m in ["ok", "boom", "lost"] {
            q.push(Level::Info, "t", m, true);
        }
        // `run` returns once the sink panics.
        q.run(&mut Broken, Duration::ZERO);
        assert_eq!(q.dropped(), 2, "the failed line and the one after it");
        q.push(Level::Info, "t", "later", true);
        assert_eq!(q.dropped(), 3);
        assert!(q.flush(Duration::from_secs(60)), "nothing left to wait for");
    }

    /// Takes every line, then fails to write the batch out.
    struct FailsAtTheEnd(usize);

    impl Sink for FailsAtTheEnd {
        fn write(&mut self, _: Level, _: &str, _: &str) {
            self.0 += 1;
        }
        fn end_batch(&mut self) -> bool {
            false
        }
    }

    #[test]
    fn a_batch_that_cannot_be_written_out_counts_all_its_lines_lost() {
        let q = Queue::new(10, 1000);
        for m in ["a", "b", "c"] {
            q.push(Level::Info, "t", m, true);
        }
        let mut sink = FailsAtTheEnd(0);
        q.run(&mut sink, Duration::ZERO);
        assert_eq!(sink.0, 3);
        assert_eq!(q.dropped(), 3);
        assert!(q.flush(Duration::from_secs(60)), "nothing left to wait for");
    }

    /// Sends every line to a channel.
    struct Channel(mpsc::Sender<String>);

    impl Sink for Channel {
        fn write(&mut self, _: Level, _: &str, message: &str) {
            let _ = self.0.send(message.to_owned());
        }
    }

    /// With a real log thread: lines arrive, and `flush` waits for them.
    /// The only waits are generous bounds, never a measure of speed.
    #[test]
    fn a_log_thread_writes_what_flush_waits_for() {
        let q = Arc::new(Queue::new(1000, 100_000));
        let (tx, rx) = mpsc::channel();
        let thread_q = q.clone();
        // A long poll: only wakes make this thread write.
        std::thread::spawn(move || thread_q.run(&mut Channel(tx), Duration::from_secs(3600)));
        q.push(Level::Info, "t", "from a worker", true);
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("a line");
        assert_eq!(got, "from a worker");
        for i in 0..100 {
            q.push(Level::Info, "t", &format!("loop {i}"), false);
        }
        assert!(q.flush(Duration::from_secs(10)), "flush wakes and waits");
        let rest: Vec<String> = rx.try_iter().collect();
        assert_eq!(rest.len(), 100);
        assert_eq!(rest[99], "loop 99");
    }
}
