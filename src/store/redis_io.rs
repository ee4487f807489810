//! The Redis side of the resume store: four threads, each with its own
//! connection, and the keys they share with other instances.
//!
//! Keys (`SID` a stream id, `INST` an instance id):
//! - `sluice:s:SID`: the stream's owner record, a hash with `owner`,
//!   `principal`, `sub` (counts resumes: a client following the stream
//!   from another instance whose count is no longer the latest was
//!   superseded), and `ended` / `broken` once so;
//! - `sluice:e:SID`: its events, a Redis Stream whose entry ids are
//!   `0-<seq>` with fields `d` (the encoded event) and `t` (present on the
//!   terminal event);
//! - `sluice:i:INST`: the instance's heartbeat, refreshed every second
//!   with a 5 s TTL;
//! - channel `sluice:c:INST`: commands to the instance (`cancel SID`,
//!   `attach SID`, `detach SID`).
//!
//! A running stream's keys are refreshed with the heartbeat; after its
//! terminal event they expire `--resume-window-ms` later; a stream that
//! ends without one (its client left for good) is deleted.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;

use super::{Batch, Inbound, Kind, Query, Store};
use crate::backend::Finish;
use crate::metrics::Metrics;
use crate::pool::TokenSink;
use crate::sse::{ErrorCode, StreamError};

/// The heartbeat key's TTL: a resumed stream whose owner has not beaten
/// for this long gets `producer_lost`.
const HEARTBEAT_TTL_MS: u64 = 5000;
const BEAT_EVERY: Duration = Duration::from_secs(1);
/// Redis calls time out after this (a hung server is a failure).
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a live tail's `XREAD` blocks before looking at new tails.
const TAIL_BLOCK_MS: u64 = 50;
/// How long a stop waits for the owner's answer (seconds; then 404).
const STOP_ANSWER_WAIT_S: f64 = 1.0;
/// Events read per stream per `XREAD`.
const TAIL_COUNT: usize = 256;
/// Broken streams remembered during an outage, to mark once Redis is back.
const MAX_UNMARKED: usize = 100_000;

/// What every store thread knows.
pub(super) struct Io {
    pub url: String,
    pub shown: String,
    pub instance: String,
    pub window_ms: u64,
    pub max_events: usize,
    pub metrics: Arc<Metrics>,
}

impl Io {
    /// A running stream's keys live this long past their last refresh.
    fn live_ttl_ms(&self) -> u64 {
        self.window_ms.max(HEARTBEAT_TTL_MS) + HEARTBEAT_TTL_MS
    }
}

/// 72 random bits (12 characters of `[A-Za-z0-9_-]`): this process
/// among the instances.
pub(super) fn instance_id() -> String {
    let sid = crate::stream::random_sid();
    sid.chars().take(12).collect()
}

fn meta_key(sid: &str) -> String {
    format!("sluice:s:{sid}")
}

fn events_key(sid: &str) -> String {
    format!("sluice:e:{sid}")
}

fn beat_key(inst: &str) -> String {
    format!("sluice:i:{inst}")
}

/// Where the answer to stop question `id` goes.
fn reply_key(id: &str) -> String {
    format!("sluice:r:{id}")
}

fn channel(inst: &str) -> String {
    format!("sluice:c:{inst}")
}

/// The error a sink is finished with when there is nothing to resume (the
/// loop sees that the sink never started and answers 204/404).
pub(super) fn not_found() -> StreamError {
    StreamError::new(ErrorCode::Internal, "nothing to resume")
}

fn producer_lost() -> StreamError {
    StreamError::new(
        ErrorCode::ProducerLost,
        "the instance producing this stream is gone; retry the request",
    )
}

pub(super) fn spawn(io: Io, store: Store, writes: Receiver<Batch>, queries: Receiver<Query>) {
    let io = Arc::new(io);
    let (tails, tail_rx) = std::sync::mpsc::channel();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
            log::error!("resume store: cannot start thread {name}: {e}");
        }
    };
    let (i, s) = (io.clone(), store.clone());
    spawn("sluice-store-w", Box::new(move || writer(&i, &s, &writes)));
    let (i, s) = (io.clone(), store.clone());
    spawn(
        "sluice-store-q",
        Box::new(move || query_loop(&i, &s, &queries, &tails)),
    );
    let (i, s) = (io.clone(), store.clone());
    spawn(
        "sluice-store-t",
        Box::new(move || tail_loop(&i, &s, &tail_rx)),
    );
    spawn("sluice-store-l", Box::new(move || listener(&io, &store)));
}

/// One thread's connection: made on demand, dropped on any error, made
/// again after a backoff (100 ms doubling to 2 s). Logs once per change of
/// state, never the password.
struct Conn {
    io: Arc<Io>,
    role: &'static str,
    con: Option<redis::Connection>,
    backoff: Duration,
    retry_at: Instant,
    down: bool,
}

impl Conn {
    fn new(io: &Arc<Io>, role: &'static str) -> Conn {
        Conn {
            io: io.clone(),
            role,
            con: None,
            backoff: Duration::ZERO,
            retry_at: Instant::now(),
            down: false,
        }
    }

    fn get(&mut self) -> Option<&mut redis::Connection> {
        if self.con.is_none() && Instant::now() >= self.retry_at {
            match connect(&self.io.url) {
                Ok(c) => {
                    if self.down {
                        log::info!(
                            "resume store ({}): {} reachable again",
                            self.role,
                            self.io.shown
                        );
                    }
                    self.down = false;
                    self.backoff = Duration::ZERO;
                    self.con = Some(c);
                }
                Err(e) => self.fail(&e),
            }
        }
        self.con.as_mut()
    }

    /// Runs `f` on the connection; a connection that fails is made again
    /// at once and `f` tried once more (a connection left over from before
    /// a Redis restart fails on first use). `None` when Redis cannot be
    /// reached.
    fn call<T>(
        &mut self,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Option<T> {
        let fresh = self.con.is_none();
        let con = self.get()?;
        match f(con) {
            Ok(v) => return Some(v),
            Err(e) if fresh => {
                self.fail(&e);
                return None;
            }
            Err(_) => {
                self.con = None;
                self.retry_at = Instant::now();
            }
        }
        let con = self.get()?;
        match f(con) {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(&e);
                None
            }
        }
    }

    fn fail(&mut self, e: &redis::RedisError) {
        self.con = None;
        self.io.metrics.store_errors.fetch_add(1, Relaxed);
        if !self.down {
            log::warn!(
                "resume store ({}): {} unreachable: {}; streaming goes on, streams of other instances cannot be resumed here until it is back (retrying)",
                self.role,
                self.io.shown,
                scrub(&e.to_string(), &self.io.url)
            );
        }
        self.down = true;
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
        self.retry_at = Instant::now() + self.backoff;
    }
}

/// An error message with the URL (and so its password) taken out.
fn scrub(msg: &str, url: &str) -> String {
    msg.replace(url, "<resume store>")
}

fn connect(url: &str) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(url)?;
    let con = client.get_connection_with_timeout(IO_TIMEOUT)?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(con)
}

// ---- the writer ----

fn writer(io: &Arc<Io>, store: &Store, rx: &Receiver<Batch>) {
    let mut conn = Conn::new(io, "writer");
    // Streams being stored, by id: the last seq written.
    let mut live: HashMap<Box<str>, u64> = HashMap::new();
    // Streams whose events were lost: not stored any further.
    let mut broken: HashSet<Box<str>> = HashSet::new();
    // Broken streams still to be marked so in Redis.
    let mut unmarked: Vec<Box<str>> = Vec::new();
    let mut next_beat = Instant::now();
    let live_ttl = io.live_ttl_ms();
    while !store.stopped() {
        let batch = match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(b) => Some(b),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let had_batch = batch.is_some();
        for sid in store.take_broken() {
            live.remove(&sid);
            broken.insert(sid.clone());
            unmarked.push(sid);
        }
        let mut pipe = redis::pipe();
        let mut written: Vec<Box<str>> = Vec::new();
        if let Some(b) = batch {
            let mut touched: HashSet<&str> = HashSet::new();
            for op in &b.ops {
                let sid = b.sid(op);
                match op.kind {
                    Kind::Begin => {
                        live.insert(sid.into(), 0);
                        broken.remove(sid);
                        let mk = meta_key(sid);
                        pipe.cmd("HSET")
                            .arg(&mk)
                            .arg("owner")
                            .arg(&io.instance)
                            .arg("principal")
                            .arg(b.text(op.data))
                            .ignore();
                        pipe.cmd("PEXPIRE").arg(&mk).arg(live_ttl).ignore();
                        written.push(sid.into());
                    }
                    Kind::Event { terminal } => {
                        if broken.contains(sid) {
                            if terminal {
                                broken.remove(sid);
                            }
                            continue;
                        }
                        let Some(last) = live.get_mut(sid) else {
                            continue;
                        };
                        if op.seq != *last + 1 {
                            // A gap: never serve this stream elsewhere.
                            live.remove(sid);
                            broken.insert(sid.into());
                            unmarked.push(sid.into());
                            continue;
                        }
                        *last = op.seq;
                        let ek = events_key(sid);
                        let mut xadd = redis::cmd("XADD");
                        xadd.arg(&ek)
                            .arg("MAXLEN")
                            .arg("~")
                            .arg(io.max_events)
                            .arg(format!("0-{}", op.seq))
                            .arg("d")
                            .arg(b.text(op.data));
                        if terminal {
                            xadd.arg("t").arg("1");
                        }
                        pipe.add_command(xadd).ignore();
                        written.push(sid.into());
                        if terminal {
                            live.remove(sid);
                            touched.remove(sid);
                            let mk = meta_key(sid);
                            pipe.cmd("HSET").arg(&mk).arg("ended").arg("1").ignore();
                            pipe.cmd("PEXPIRE").arg(&mk).arg(io.window_ms).ignore();
                            pipe.cmd("PEXPIRE").arg(&ek).arg(io.window_ms).ignore();
                        } else {
                            touched.insert(sid);
                        }
                    }
                    Kind::Reply => {
                        let rk = reply_key(sid);
                        pipe.cmd("RPUSH").arg(&rk).arg(op.seq).ignore();
                        pipe.cmd("PEXPIRE").arg(&rk).arg(HEARTBEAT_TTL_MS).ignore();
                    }
                    Kind::Attach => {
                        pipe.cmd("HINCRBY")
                            .arg(meta_key(sid))
                            .arg("sub")
                            .arg(1)
                            .ignore();
                    }
                    Kind::Gone => {
                        live.remove(sid);
                        broken.remove(sid);
                        pipe.cmd("DEL")
                            .arg(meta_key(sid))
                            .arg(events_key(sid))
                            .ignore();
                    }
                }
            }
            for sid in touched {
                pipe.cmd("PEXPIRE")
                    .arg(events_key(sid))
                    .arg(live_ttl)
                    .ignore();
            }
            store.recycle(b);
        }
        let now = Instant::now();
        if now >= next_beat {
            next_beat = now + BEAT_EVERY;
            pipe.cmd("SET")
                .arg(beat_key(&io.instance))
                .arg("1")
                .arg("PX")
                .arg(HEARTBEAT_TTL_MS)
                .ignore();
            for sid in live.keys() {
                pipe.cmd("PEXPIRE")
                    .arg(meta_key(sid))
                    .arg(live_ttl)
                    .ignore();
                pipe.cmd("PEXPIRE")
                    .arg(events_key(sid))
                    .arg(live_ttl)
                    .ignore();
            }
            // A broken stream still runs: it can still be stopped elsewhere.
            for sid in &broken {
                pipe.cmd("PEXPIRE")
                    .arg(meta_key(sid))
                    .arg(live_ttl)
                    .ignore();
            }
        }
        if conn.get().is_some() {
            for sid in &unmarked {
                mark_broken(&mut pipe, sid, io.window_ms);
            }
        }
        if pipe.is_empty() {
            if had_batch {
                store.written();
            }
            continue;
        }
        match conn.call(|con| pipe.query::<()>(con)) {
            Some(()) => {
                unmarked.clear();
                store.set_up(true);
                io.metrics.store_up.store(1, Relaxed);
            }
            None => {
                store.set_up(false);
                io.metrics.store_up.store(0, Relaxed);
                // What this batch carried is lost: those streams are not
                // resumable elsewhere (no gaps), marked so once Redis is back.
                for sid in written {
                    if live.remove(&sid).is_some() || !broken.contains(&sid) {
                        broken.insert(sid.clone());
                        unmarked.push(sid);
                    }
                }
                unmarked.sort();
                unmarked.dedup();
                // A long outage: the oldest are left to expire on their own.
                if unmarked.len() > MAX_UNMARKED {
                    let extra = unmarked.len() - MAX_UNMARKED;
                    unmarked.drain(..extra);
                }
                io.metrics.store_batches_lost.fetch_add(1, Relaxed);
            }
        }
        if had_batch {
            store.written();
        }
    }
}

fn mark_broken(pipe: &mut redis::Pipeline, sid: &str, window_ms: u64) {
    let mk = meta_key(sid);
    pipe.cmd("HSET").arg(&mk).arg("broken").arg("1").ignore();
    pipe.cmd("PEXPIRE")
        .arg(&mk)
        .arg(window_ms.max(HEARTBEAT_TTL_MS))
        .ignore();
    pipe.cmd("DEL").arg(events_key(sid)).ignore();
}

// ---- resumes and stops of foreign streams ----

/// A stream followed live for a client resumed here.
pub(super) struct Tail {
    sid: Box<str>,
    key: String,
    owner: String,
    last: u64,
    sink: Arc<TokenSink>,
    /// The stream's resume count when this client resumed it.
    epoch: i64,
    lost: bool,
    superseded: bool,
}

fn query_loop(io: &Arc<Io>, store: &Store, rx: &Receiver<Query>, tails: &Sender<Tail>) {
    let mut conn = Conn::new(io, "queries");
    while !store.stopped() {
        let q = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(q) => q,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match q {
            Query::Resume {
                sid,
                after,
                principal,
                sink,
            } => {
                let found = conn
                    .call(|con| lookup(con, &sid, after, principal.as_deref()))
                    .flatten();
                let Some(found) = found else {
                    sink.finish(Err(not_found()));
                    continue;
                };
                let mut epoch = 0;
                if !found.ended {
                    epoch = conn
                        .call(|con| {
                            redis::cmd("HINCRBY")
                                .arg(meta_key(&sid))
                                .arg("sub")
                                .arg(1)
                                .query(con)
                        })
                        .unwrap_or(0);
                    let msg = format!("attach {sid}");
                    let _: Option<i64> = conn.call(|con| {
                        redis::cmd("PUBLISH")
                            .arg(channel(&found.owner))
                            .arg(&msg)
                            .query(con)
                    });
                }
                sink.mark_started(Instant::now());
                let mut last = after;
                let mut ended = false;
                // Only what the sink has room for (it never blocks this
                // thread); the tail reads the rest.
                for e in found.entries.iter().take(sink.room().saturating_sub(1)) {
                    ended |= feed(&sink, e);
                    last = e.seq;
                }
                if found.ended && !ended && last >= found.last {
                    // The client had everything, the end too.
                    sink.finish(Ok(Finish {
                        finish_reason: "stop".into(),
                        prompt_tokens: None,
                        completion_tokens: None,
                    }));
                } else if !ended {
                    let key = events_key(&sid);
                    let _ = tails.send(Tail {
                        sid,
                        key,
                        owner: found.owner,
                        last,
                        sink,
                        epoch,
                        lost: false,
                        superseded: false,
                    });
                }
            }
            Query::Cancel {
                sid,
                principal,
                key,
                serial,
                inbox,
            } => {
                let found = conn
                    .call(|con| stop(con, &sid, principal.as_deref()))
                    .unwrap_or(false);
                inbox.push(Inbound::CancelAnswer { key, serial, found });
            }
        }
    }
}

/// One stored event.
struct Entry {
    seq: u64,
    data: Vec<u8>,
    terminal: bool,
}

struct Found {
    owner: String,
    ended: bool,
    /// The last seq stored.
    last: u64,
    entries: Vec<Entry>,
}

/// Hands one event to a relay sink; whether it was the terminal one.
fn feed(sink: &TokenSink, e: &Entry) -> bool {
    let text = String::from_utf8_lossy(&e.data);
    if e.terminal {
        let _ = sink.push_delta(&text);
        sink.finish(Ok(Finish {
            finish_reason: "stop".into(),
            prompt_tokens: None,
            completion_tokens: None,
        }));
        true
    } else {
        let _ = sink.push_token(&text);
        false
    }
}

/// The owner record of `sid`, if it may be resumed by `principal` after
/// `after`, with the stored events after `after`.
fn lookup(
    con: &mut redis::Connection,
    sid: &str,
    after: u64,
    principal: Option<&str>,
) -> redis::RedisResult<Option<Found>> {
    let meta: HashMap<String, String> = redis::cmd("HGETALL").arg(meta_key(sid)).query(con)?;
    let Some(owner) = meta.get("owner") else {
        return Ok(None);
    };
    if meta.contains_key("broken")
        || meta.get("principal").map_or("", String::as_str) != principal.unwrap_or("")
    {
        return Ok(None);
    }
    let ek = events_key(sid);
    let first = entries(
        redis::cmd("XRANGE")
            .arg(&ek)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query(con)?,
    );
    let last = entries(
        redis::cmd("XREVRANGE")
            .arg(&ek)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query(con)?,
    );
    let covers = match (first.first(), last.first()) {
        (Some(f), Some(l)) => after.saturating_add(1) >= f.seq && after <= l.seq,
        _ => after == 0,
    };
    let last_seq = last.first().map_or(0, |l| l.seq);
    let ended = meta.contains_key("ended");
    if !covers || (ended && last.is_empty()) {
        return Ok(None);
    }
    let rest = entries(
        redis::cmd("XRANGE")
            .arg(&ek)
            .arg(format!("0-{}", after.saturating_add(1)))
            .arg("+")
            .query(con)?,
    );
    // Trimmed between the two reads: never hand out a gap.
    if rest.first().is_some_and(|e| e.seq != after + 1) {
        return Ok(None);
    }
    Ok(Some(Found {
        owner: owner.clone(),
        ended,
        last: last_seq,
        entries: rest,
    }))
}

/// Asks the owner of `sid` to stop it; whether it runs and was asked.
fn stop(
    con: &mut redis::Connection,
    sid: &str,
    principal: Option<&str>,
) -> redis::RedisResult<bool> {
    let meta: HashMap<String, String> = redis::cmd("HGETALL").arg(meta_key(sid)).query(con)?;
    let Some(owner) = meta.get("owner") else {
        return Ok(false);
    };
    if meta.contains_key("ended")
        || meta.get("principal").map_or("", String::as_str) != principal.unwrap_or("")
    {
        return Ok(false);
    }
    let alive: bool = redis::cmd("EXISTS").arg(beat_key(owner)).query(con)?;
    if !alive {
        return Ok(false);
    }
    // The owner answers whether the stream was still running (it may have
    // ended since its record was read).
    let id = crate::stream::random_sid();
    let heard: i64 = redis::cmd("PUBLISH")
        .arg(channel(owner))
        .arg(format!("cancel {sid} {id}"))
        .query(con)?;
    if heard == 0 {
        return Ok(false);
    }
    let answer: Option<(String, i64)> = redis::cmd("BLPOP")
        .arg(reply_key(&id))
        .arg(STOP_ANSWER_WAIT_S)
        .query(con)?;
    Ok(answer.is_some_and(|(_, found)| found == 1))
}

/// The entries of an `XRANGE`/`XREVRANGE` reply (`[[id, [f, v, …]], …]`).
fn entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items.into_iter().filter_map(entry).collect()
}

fn entry(v: Value) -> Option<Entry> {
    let Value::Array(mut pair) = v else {
        return None;
    };
    if pair.len() != 2 {
        return None;
    }
    let fields = pair.pop()?;
    let id = bytes(pair.pop()?)?;
    let seq = std::str::from_utf8(&id)
        .ok()?
        .strip_prefix("0-")?
        .parse()
        .ok()?;
    let fields = match fields {
        Value::Array(f) => f,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return None,
    };
    let mut e = Entry {
        seq,
        data: Vec::new(),
        terminal: false,
    };
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        match bytes(k)?.as_slice() {
            b"d" => e.data = bytes(v)?,
            b"t" => e.terminal = true,
            _ => {}
        }
    }
    Some(e)
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// An `XREAD` reply: `[[key, entries], …]` (RESP2) or a map (RESP3).
fn xread(v: Value) -> Vec<(Vec<u8>, Vec<Entry>)> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|i| match i {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let e = kv.pop()?;
                    Some((kv.pop()?, e))
                }
                _ => None,
            })
            .collect(),
        Value::Map(m) => m,
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, e)| Some((bytes(k)?, entries(e))))
        .collect()
}

// ---- following resumed streams ----

fn tail_loop(io: &Arc<Io>, store: &Store, rx: &Receiver<Tail>) {
    let mut conn = Conn::new(io, "tails");
    let mut tails: Vec<Tail> = Vec::new();
    let mut next_check = Instant::now();
    while !store.stopped() {
        if tails.is_empty() {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(t) => tails.push(t),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(t) = rx.try_recv() {
            tails.push(t);
        }
        let Some(con) = conn.get() else {
            // Redis is gone: whoever was following gets a retryable end.
            for t in tails.drain(..) {
                t.sink.finish(Err(producer_lost()));
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if follow(con, &mut tails, &mut next_check).is_ok() {
            continue;
        }
        // Once more on a new connection (this one may predate a restart).
        conn.con = None;
        conn.retry_at = Instant::now();
        let res = match conn.get() {
            Some(con) => follow(con, &mut tails, &mut next_check),
            None => continue,
        };
        if let Err(e) = res {
            conn.fail(&e);
            for t in tails.drain(..) {
                t.sink.finish(Err(producer_lost()));
            }
        }
    }
}

/// One round for every tail: let go of those whose client left, check
/// owners' heartbeats once a second, read what is new.
fn follow(
    con: &mut redis::Connection,
    tails: &mut Vec<Tail>,
    next_check: &mut Instant,
) -> redis::RedisResult<()> {
    let mut left = Vec::new();
    tails.retain(|t| {
        if t.sink.is_cancelled() {
            left.push((t.owner.clone(), t.sid.clone(), t.epoch));
            false
        } else {
            true
        }
    });
    for (owner, sid, epoch) in left {
        // Only the latest follower's leaving starts the owner's window.
        let sub: Option<i64> = redis::cmd("HGET")
            .arg(meta_key(&sid))
            .arg("sub")
            .query(con)?;
        if sub == Some(epoch) {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(channel(&owner))
                .arg(format!("detach {sid}"))
                .query(con)?;
        }
    }
    let now = Instant::now();
    if now >= *next_check {
        *next_check = now + Duration::from_millis(500);
        let mut owners: HashMap<String, bool> = HashMap::new();
        for t in tails.iter_mut() {
            let alive = match owners.get(&t.owner) {
                Some(&a) => a,
                None => {
                    let a: bool = redis::cmd("EXISTS").arg(beat_key(&t.owner)).query(con)?;
                    owners.insert(t.owner.clone(), a);
                    a
                }
            };
            let (owner, broken, sub): (Option<String>, Option<String>, Option<i64>) =
                redis::cmd("HMGET")
                    .arg(meta_key(&t.sid))
                    .arg("owner")
                    .arg("broken")
                    .arg("sub")
                    .query(con)?;
            // Gone from the store (ended without an end, expired) is lost too.
            t.lost = !alive || broken.is_some() || owner.is_none();
            t.superseded = sub.is_some_and(|s| s != t.epoch);
        }
    }
    let reading: Vec<usize> = (0..tails.len())
        .filter(|&i| tails[i].sink.room() >= TAIL_COUNT)
        .collect();
    if reading.is_empty() {
        std::thread::sleep(Duration::from_millis(TAIL_BLOCK_MS));
        return Ok(());
    }
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT")
        .arg(TAIL_COUNT)
        .arg("BLOCK")
        .arg(TAIL_BLOCK_MS)
        .arg("STREAMS");
    for &i in &reading {
        cmd.arg(&tails[i].key);
    }
    for &i in &reading {
        cmd.arg(format!("0-{}", tails[i].last));
    }
    let got = xread(cmd.query(con)?);
    let mut delivered: HashSet<usize> = HashSet::new();
    let mut done: HashSet<usize> = HashSet::new();
    let mut gapped: HashSet<usize> = HashSet::new();
    let read: HashSet<usize> = reading.iter().copied().collect();
    for (key, events) in got {
        let Some(i) = tails.iter().position(|t| t.key.as_bytes() == key) else {
            continue;
        };
        for e in &events {
            if e.seq <= tails[i].last {
                continue;
            }
            if e.seq != tails[i].last + 1 {
                // Trimmed before this client read it: end (retryable,
                // naming the last event it got) rather than skip.
                gapped.insert(i);
                break;
            }
            tails[i].last = e.seq;
            delivered.insert(i);
            if feed(&tails[i].sink, e) {
                done.insert(i);
                break;
            }
        }
    }
    let mut i = 0;
    tails.retain(|t| {
        let keep = if done.contains(&i) {
            false
        } else if t.superseded {
            // Another client resumed the stream since (the owner knows:
            // no detach is sent for this one).
            t.sink.finish(Err(StreamError::new(
                ErrorCode::Superseded,
                "another client resumed this stream",
            )));
            false
        } else if gapped.contains(&i) || (t.lost && read.contains(&i) && !delivered.contains(&i)) {
            // Everything stored was delivered and nobody will add more.
            t.sink.finish(Err(producer_lost()));
            false
        } else {
            true
        };
        i += 1;
        keep
    });
    Ok(())
}

// ---- commands from other instances ----

fn listener(io: &Arc<Io>, store: &Store) {
    let mut conn = Conn::new(io, "commands");
    let ch = channel(&io.instance);
    while !store.stopped() {
        let Some(con) = conn.get() else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let failed = {
            let mut ps = con.as_pubsub();
            let mut failed = ps
                .subscribe(&ch)
                .and_then(|()| ps.set_read_timeout(Some(Duration::from_secs(1))))
                .err();
            while failed.is_none() && !store.stopped() {
                match ps.get_message() {
                    Ok(msg) => command(store, msg.get_payload_bytes()),
                    Err(e) if e.is_timeout() => {}
                    Err(e) => failed = Some(e),
                }
            }
            failed
        };
        match failed {
            Some(e) => conn.fail(&e),
            None => break,
        }
    }
}

fn command(store: &Store, payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    let Some((verb, sid)) = text.split_once(' ') else {
        return;
    };
    if verb == "cancel" {
        let Some((sid, reply)) = sid.split_once(' ') else {
            return;
        };
        let (sid, reply): (Box<str>, Box<str>) = (sid.into(), reply.into());
        return store.broadcast(|| Inbound::Cancel {
            sid: sid.clone(),
            reply: reply.clone(),
        });
    }
    let sid: Box<str> = sid.into();
    match verb {
        "attach" => store.broadcast(|| Inbound::Attach { sid: sid.clone() }),
        "detach" => store.broadcast(|| Inbound::Detach { sid: sid.clone() }),
        _ => log::debug!("resume store: unknown command {verb:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_entries_and_xread_replies_in_both_protocols() {
        let e = |id: &str, d: &str, t: bool| {
            let mut f = vec![bulk("d"), bulk(d)];
            if t {
                f.extend([bulk("t"), bulk("1")]);
            }
            Value::Array(vec![bulk(id), Value::Array(f)])
        };
        let list = Value::Array(vec![
            e("0-1", "a", false),
            e("0-2", "b", true),
            bulk("junk"),
        ]);
        let got: Vec<(u64, Vec<u8>, bool)> = entries(list.clone())
            .into_iter()
            .map(|e| (e.seq, e.data, e.terminal))
            .collect();
        assert_eq!(
            got,
            vec![(1, b"a".to_vec(), false), (2, b"b".to_vec(), true)]
        );
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("k"), list.clone()])]);
        let resp3 = Value::Map(vec![(bulk("k"), list)]);
        for v in [resp2, resp3] {
            let r = xread(v);
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].0, b"k");
            assert_eq!(r[0].1.len(), 2);
        }
        assert!(xread(Value::Nil).is_empty());
        assert!(entries(Value::Array(vec![e("1-1", "x", false)])).is_empty());
    }

    #[test]
    fn scrubs_the_url_from_errors() {
        let url = "redis://u:secret@h:1";
        assert_eq!(
            scrub(&format!("failed: {url}"), url),
            "failed: <resume store>"
        );
    }
}
