//! Resumes and stops of streams another instance owns: the query thread
//! looks them up (waiting a bounded time for an owner's writes when the
//! client is ahead of them) and asks owners to stop; the tail thread
//! follows resumed streams live (`XREAD BLOCK`) and ends a follower that
//! was superseded or whose owner is gone.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Value;

use super::redis_conn::{
    beat_key, channel, events_key, meta_key, not_found, producer_lost, reply_key, Conn, Io,
};
use super::{Inbound, Query, Store};
use crate::backend::Finish;
use crate::pool::TokenSink;
use crate::sse::{ErrorCode, StreamError};

/// How long a live tail's `XREAD` blocks before looking at new tails.
const TAIL_BLOCK_MS: u64 = 50;
/// How long a stop waits for the owner's answer (seconds; then 404).
const STOP_ANSWER_WAIT_S: f64 = 1.0;
/// Events read per stream per `XREAD`.
const TAIL_COUNT: usize = 256;

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

/// A resume from a client ahead of what the owner has stored: the owner
/// writes to Redis a little after it writes to its client's socket, so a
/// client that reconnects here at once can be a few events ahead.
struct Behind {
    sid: Box<str>,
    after: u64,
    principal: Option<Box<str>>,
    sink: Arc<TokenSink>,
    /// When it was asked.
    since: Instant,
}

/// How long a resume ahead of the store waits for the owner's writes.
const BEHIND_WAIT: Duration = Duration::from_secs(2);
/// How long a resume of an id the store has no record of waits for one
/// (a client can have the id from the owner's response head before the
/// owner's first write reaches Redis). An unknown id is answered so late.
const UNKNOWN_WAIT: Duration = Duration::from_millis(500);
/// How often they look again.
const BEHIND_RETRY: Duration = Duration::from_millis(20);
/// Resumes waiting at most; more are answered at once. Each costs this
/// thread one or two round trips a retry ([`lookup`]), and stops and new
/// resumes queue behind a pass: 64 keep a pass to a few milliseconds.
const MAX_BEHIND: usize = 64;

pub(super) fn query_loop(io: &Arc<Io>, store: &Store, rx: &Receiver<Query>, tails: &Sender<Tail>) {
    let mut conn = Conn::new(io, "queries");
    let mut behind: Vec<Behind> = Vec::new();
    let mut next_retry = Instant::now();
    while !store.stopped() {
        let wait = if behind.is_empty() {
            Duration::from_secs(1)
        } else {
            next_retry.saturating_duration_since(Instant::now())
        };
        match rx.recv_timeout(wait) {
            Ok(Query::Resume {
                sid,
                after,
                principal,
                sink,
            }) => {
                let b = Behind {
                    sid,
                    after,
                    principal,
                    sink,
                    since: Instant::now(),
                };
                let may_wait = behind.len() < MAX_BEHIND;
                if behind.is_empty() {
                    // Its first look again comes a whole retry later.
                    next_retry = Instant::now() + BEHIND_RETRY;
                }
                behind.extend(resume(&mut conn, tails, b, may_wait));
            }
            Ok(Query::Cancel {
                sid,
                principal,
                key,
                serial,
                inbox,
            }) => {
                let found = conn
                    .call(|con| stop(con, &sid, principal.as_deref()))
                    .unwrap_or(false);
                inbox.push(Inbound::CancelAnswer { key, serial, found });
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let now = Instant::now();
        if !behind.is_empty() && now >= next_retry {
            next_retry = now + BEHIND_RETRY;
            for b in std::mem::take(&mut behind) {
                if b.sink.is_cancelled() {
                    continue; // its client left while it waited
                }
                behind.extend(resume(&mut conn, tails, b, true));
            }
        }
    }
}

/// Looks up a resume of a foreign stream and starts relaying it, or ends
/// it as nothing to resume; gives it back when the client is ahead of
/// what the owner has stored so far, or the store has no record of the
/// id yet (and it `may_wait`, and has not waited too long).
fn resume(conn: &mut Conn, tails: &Sender<Tail>, b: Behind, may_wait: bool) -> Option<Behind> {
    // Redis unreachable: nothing to wait for.
    let found = conn
        .call(|con| lookup(con, &b.sid, b.after, b.principal.as_deref()))
        .unwrap_or(Lookup::Missing);
    if may_wait && keeps_waiting(&found, b.since.elapsed()) {
        return Some(b);
    }
    let Lookup::Found(found) = found else {
        b.sink.finish(Err(not_found()));
        return None;
    };
    let Behind {
        sid, after, sink, ..
    } = b;
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
    // Only what the sink has room for (it never blocks this thread); the
    // tail reads the rest.
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
    None
}

/// One stored event.
struct Entry {
    seq: u64,
    data: Vec<u8>,
    terminal: bool,
}

/// Whether a resume that found `l` after waiting `waited` looks again.
fn keeps_waiting(l: &Lookup, waited: Duration) -> bool {
    match l {
        Lookup::Behind => waited < BEHIND_WAIT,
        Lookup::Unknown => waited < UNKNOWN_WAIT,
        Lookup::Found(_) | Lookup::Missing => false,
    }
}

/// What a resume's lookup found.
enum Lookup {
    Found(Found),
    /// No record of the id (unknown, expired, or not written yet).
    Unknown,
    /// Nothing to resume: broken, foreign, ended, or trimmed.
    Missing,
    /// A running stream whose owner is alive, but the client has seen
    /// events it has not stored yet.
    Behind,
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
/// `after`, with the stored events after `after`. The record and the
/// first and last stored events come in one pipelined round trip; a
/// second asks whether the owner is alive (a client ahead of the store)
/// or reads the events (found). A resume waiting for an owner's writes
/// looks again every [`BEHIND_RETRY`], so this is what each look costs:
/// one round trip for an unknown id, two for a client ahead.
fn lookup(
    con: &mut redis::Connection,
    sid: &str,
    after: u64,
    principal: Option<&str>,
) -> redis::RedisResult<Lookup> {
    let ek = events_key(sid);
    let (meta, first, last): (HashMap<String, String>, Value, Value) = redis::pipe()
        .cmd("HGETALL")
        .arg(meta_key(sid))
        .cmd("XRANGE")
        .arg(&ek)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .cmd("XREVRANGE")
        .arg(&ek)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(con)?;
    let Some(owner) = meta.get("owner") else {
        return Ok(Lookup::Unknown);
    };
    if meta.contains_key("broken")
        || meta.get("principal").map_or("", String::as_str) != principal.unwrap_or("")
    {
        return Ok(Lookup::Missing);
    }
    let (first, last) = (entries(first), entries(last));
    let covers = match (first.first(), last.first()) {
        (Some(f), Some(l)) => after.saturating_add(1) >= f.seq && after <= l.seq,
        _ => after == 0,
    };
    let last_seq = last.first().map_or(0, |l| l.seq);
    let ended = meta.contains_key("ended");
    if !covers && after > last_seq && !ended {
        let alive: bool = redis::cmd("EXISTS").arg(beat_key(owner)).query(con)?;
        return Ok(if alive {
            Lookup::Behind
        } else {
            Lookup::Missing
        });
    }
    if !covers || (ended && last.is_empty()) {
        return Ok(Lookup::Missing);
    }
    // Read only now: a resume refused above (another principal, a point
    // already trimmed) must not cost a read of the whole stored stream.
    let rest = entries(
        redis::cmd("XRANGE")
            .arg(&ek)
            .arg(format!("0-{}", after.saturating_add(1)))
            .arg("+")
            .query(con)?,
    );
    // Trimmed between the reads: never hand out a gap.
    if rest.first().is_some_and(|e| e.seq != after + 1) {
        return Ok(Lookup::Missing);
    }
    Ok(Lookup::Found(Found {
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

pub(super) fn tail_loop(io: &Arc<Io>, store: &Store, rx: &Receiver<Tail>) {
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
    fn a_resume_ahead_of_the_store_waits_for_it_a_bounded_time() {
        let ms = Duration::from_millis;
        let found = || {
            Lookup::Found(Found {
                owner: String::new(),
                ended: false,
                last: 0,
                entries: Vec::new(),
            })
        };
        let cases = [
            (found(), ms(0), false),
            (Lookup::Missing, ms(0), false),
            (Lookup::Behind, ms(0), true),
            (Lookup::Behind, BEHIND_WAIT - ms(1), true),
            (Lookup::Behind, BEHIND_WAIT, false),
            (Lookup::Unknown, ms(0), true),
            (Lookup::Unknown, UNKNOWN_WAIT - ms(1), true),
            (Lookup::Unknown, UNKNOWN_WAIT, false),
        ];
        for (i, (l, waited, want)) in cases.iter().enumerate() {
            assert_eq!(keeps_waiting(l, *waited), *want, "case {i}");
        }
    }
}
