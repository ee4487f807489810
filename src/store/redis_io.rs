//! The Redis side of the resume store: four threads, each with its own
//! connection. Here the writer (stores each loop turn's events, refreshes
//! the heartbeat and the keys of running streams) and the listener
//! (commands from other instances over pub/sub); the query and tail
//! threads are in [`super::redis_read`], the keys and the connection in
//! [`super::redis_conn`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::redis_conn::{
    beat_key, channel, events_key, meta_key, reply_key, Conn, Io, HEARTBEAT_TTL_MS,
};
use super::redis_read::{query_loop, tail_loop};
use super::{Batch, Inbound, Kind, Query, Store};

const BEAT_EVERY: Duration = Duration::from_secs(1);
/// Broken streams remembered during an outage, to mark once Redis is back.
const MAX_UNMARKED: usize = 100_000;

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
