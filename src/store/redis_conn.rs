//! What the Redis side's threads share: what each knows ([`Io`]), the
//! keys and channels instances share, and a connection that is made again
//! with backoff when it fails ([`Conn`]).
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

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::sse::{ErrorCode, StreamError};

/// The heartbeat key's TTL: a resumed stream whose owner has not beaten
/// for this long gets `producer_lost`.
pub(super) const HEARTBEAT_TTL_MS: u64 = 5000;
/// Redis calls time out after this (a hung server is a failure).
const IO_TIMEOUT: Duration = Duration::from_secs(2);

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
    pub(super) fn live_ttl_ms(&self) -> u64 {
        self.window_ms.max(HEARTBEAT_TTL_MS) + HEARTBEAT_TTL_MS
    }
}

/// 72 random bits (12 characters of `[A-Za-z0-9_-]`): this process
/// among the instances.
pub(super) fn instance_id() -> String {
    let sid = crate::stream::random_sid();
    sid.chars().take(12).collect()
}

pub(super) fn meta_key(sid: &str) -> String {
    format!("sluice:s:{sid}")
}

pub(super) fn events_key(sid: &str) -> String {
    format!("sluice:e:{sid}")
}

pub(super) fn beat_key(inst: &str) -> String {
    format!("sluice:i:{inst}")
}

/// Where the answer to stop question `id` goes.
pub(super) fn reply_key(id: &str) -> String {
    format!("sluice:r:{id}")
}

pub(super) fn channel(inst: &str) -> String {
    format!("sluice:c:{inst}")
}

/// The error a sink is finished with when there is nothing to resume (the
/// loop sees that the sink never started and answers 204/404).
pub(super) fn not_found() -> StreamError {
    StreamError::new(ErrorCode::Internal, "nothing to resume")
}

pub(super) fn producer_lost() -> StreamError {
    StreamError::new(
        ErrorCode::ProducerLost,
        "the instance producing this stream is gone; retry the request",
    )
}

/// One thread's connection: made on demand, dropped on any error, made
/// again after a backoff (100 ms doubling to 2 s). Logs once per change of
/// state, never the password.
pub(super) struct Conn {
    io: Arc<Io>,
    role: &'static str,
    pub(super) con: Option<redis::Connection>,
    backoff: Duration,
    pub(super) retry_at: Instant,
    down: bool,
}

impl Conn {
    pub(super) fn new(io: &Arc<Io>, role: &'static str) -> Conn {
        Conn {
            io: io.clone(),
            role,
            con: None,
            backoff: Duration::ZERO,
            retry_at: Instant::now(),
            down: false,
        }
    }

    pub(super) fn get(&mut self) -> Option<&mut redis::Connection> {
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
    pub(super) fn call<T>(
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

    pub(super) fn fail(&mut self, e: &redis::RedisError) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_the_url_from_errors() {
        let url = "redis://u:secret@h:1";
        assert_eq!(
            scrub(&format!("failed: {url}"), url),
            "failed: <resume store>"
        );
    }
}
