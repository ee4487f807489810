//! Counters, gauges and histograms, and their Prometheus text exposition
//! (format 0.0.4).
//!
//! Updates are plain relaxed atomics: the event loop and the workers bump
//! them without locks; only a scrape reads them all.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::sse::ErrorCode;

/// Bucket bounds in seconds: from 50 µs of transport overhead to minutes of
/// model latency.
pub const BUCKETS: [f64; 22] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// [`BUCKETS`] in nanoseconds.
const BUCKETS_NS: [u64; BUCKETS.len()] = {
    let mut ns = [0; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        ns[i] = (BUCKETS[i] * 1e9 + 0.5) as u64;
        i += 1;
    }
    ns
};

/// For each power of two `2^k` (by `k`), the first bucket whose bound is at
/// least `2^k`: a duration of `[2^k, 2^(k+1))` nanoseconds falls in that
/// bucket or a later one, and bounds grow at least twofold, so at most one
/// more step finds it (the paced path observes one per token).
const FIRST_BUCKET: [u8; 64] = {
    let mut t = [0u8; 64];
    let mut k = 0;
    while k < 64 {
        let low = 1u64 << k;
        let mut i = 0;
        while i < BUCKETS_NS.len() && BUCKETS_NS[i] < low {
            i += 1;
        }
        t[k] = i as u8;
        k += 1;
    }
    t
};

/// The bucket of a duration of `ns` nanoseconds (the first bound it does
/// not exceed; `BUCKETS.len()` past the last).
#[inline]
fn bucket_of(ns: u64) -> usize {
    let mut i = usize::from(FIRST_BUCKET[63 - (ns | 1).leading_zeros() as usize]);
    while i < BUCKETS_NS.len() && ns > BUCKETS_NS[i] {
        i += 1;
    }
    i
}

/// The statuses `sluice_requests_refused_total` has a label for.
pub const REFUSAL_STATUSES: [u16; 12] =
    [400, 401, 404, 405, 408, 413, 417, 429, 431, 500, 503, 505];

/// Counter slots of `sluice_redactions_total`: the builtin rules, then the
/// custom ones (`crate::redact` asserts its rules fit).
pub const REDACTION_SLOTS: usize = 23;

/// A fixed-bucket histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.observe_ns(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// [`Histogram::observe`] of a duration in nanoseconds.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        // In whole nanoseconds: the same bucket as comparing seconds as
        // f64 (every bound is a whole number of nanoseconds), without the
        // float conversion.
        self.counts[bucket_of(ns)].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.counts[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cum}");
    }
}

/// Everything the server counts.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_open: AtomicI64,
    pub connections_accepted: AtomicU64,
    pub connections_timed_out: AtomicU64,
    pub accept_errors: AtomicU64,
    /// Idle keep-alive connections closed to admit a new one at the limit.
    pub connections_evicted: AtomicU64,
    /// Connections handed to the event loop owning the stream they named.
    pub connections_handed_over: AtomicU64,
    /// Request bytes held now (unread input and reserved bodies).
    pub request_bytes_buffered: AtomicI64,
    /// Bodies that had to wait for room in the buffered-bytes budget.
    pub budget_waits: AtomicU64,
    /// Times complete requests were left for the next phase of a loop turn.
    pub requests_deferred: AtomicU64,
    pub requests: AtomicU64,
    /// Requests answered with an error status before any stream, by status
    /// (see [`REFUSAL_STATUSES`]; the last slot counts any other).
    pub requests_refused: [AtomicU64; REFUSAL_STATUSES.len() + 1],
    pub streams_open: AtomicI64,
    pub streams_started: AtomicU64,
    pub streams_completed: AtomicU64,
    pub streams_errored: [AtomicU64; ErrorCode::ALL.len()],
    pub streams_disconnected: AtomicU64,
    /// Resumable streams running with no client attached.
    pub streams_detached: AtomicI64,
    /// Bytes held in replay logs.
    pub replay_bytes: AtomicI64,
    pub resumes: AtomicU64,
    pub resumes_not_found: AtomicU64,
    pub replayed_events: AtomicU64,
    pub cancels: AtomicU64,
    pub cancels_not_found: AtomicU64,
    /// The shared resume store (`--resume-store redis://…`): 1 while the
    /// writer reaches it.
    pub store_up: AtomicI64,
    pub store_configured: std::sync::atomic::AtomicBool,
    /// Failed calls to the shared resume store.
    pub store_errors: AtomicU64,
    /// Batches of events the shared store could not take (their streams
    /// are not resumable elsewhere).
    pub store_batches_lost: AtomicU64,
    /// Streams resumed from another instance's events.
    pub remote_resumes: AtomicU64,
    /// Generations cancelled (disconnect, timeout, or error) before their backend finished.
    pub generations_cancelled: AtomicU64,
    /// Queued jobs dropped without ever calling the backend.
    pub jobs_dropped_queued: AtomicU64,
    pub tokens_sent: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub log_lines_dropped: AtomicU64,
    /// Matches replaced by the redaction stage, by rule slot (the
    /// redaction module numbers its rules; this module only renders them).
    pub redactions: [AtomicU64; REDACTION_SLOTS],
    /// The configured rules' `(slot, label)`, set once by the redactor.
    pub redaction_labels: std::sync::OnceLock<Vec<(usize, String)>>,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub stream_duration: Histogram,
    pub queue_wait: Histogram,
}

impl Metrics {
    /// Counts a request answered with `status` (>= 400) before any stream.
    pub fn refused(&self, status: u16) {
        let i = REFUSAL_STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(REFUSAL_STATUSES.len());
        self.requests_refused[i].fetch_add(1, Relaxed);
    }

    /// Refused requests with this status so far.
    pub fn refused_count(&self, status: u16) -> u64 {
        REFUSAL_STATUSES
            .iter()
            .position(|s| *s == status)
            .map_or(0, |i| self.requests_refused[i].load(Relaxed))
    }

    pub fn errored(&self, code: ErrorCode) -> u64 {
        self.streams_errored[code.index()].load(Relaxed)
    }

    /// The whole exposition: Prometheus text format 0.0.4, or OpenMetrics
    /// 1.0 when `openmetrics` (counter families are then named without
    /// `_total`, and the text ends with `# EOF`).
    pub fn render(&self, openmetrics: bool) -> String {
        let mut out = String::with_capacity(8192);
        let family = |name: &'static str| -> &'static str {
            if openmetrics {
                name.strip_suffix("_total").unwrap_or(name)
            } else {
                name
            }
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &'static str, help: &str, v: &AtomicU64| {
            let v = v.load(Relaxed);
            let f = family(name);
            let _ = writeln!(out, "# HELP {f} {help}\n# TYPE {f} counter\n{name} {v}");
        };
        gauge(
            &mut out,
            "sluice_streams_open",
            "Streams running now.",
            self.streams_open.load(Relaxed),
        );
        gauge(
            &mut out,
            "sluice_connections_open",
            "Client connections open now.",
            self.connections_open.load(Relaxed),
        );
        counter(
            &mut out,
            "sluice_connections_accepted_total",
            "Client connections accepted.",
            &self.connections_accepted,
        );
        counter(
            &mut out,
            "sluice_connections_timed_out_total",
            "Connections closed by the header, idle or write timeout.",
            &self.connections_timed_out,
        );
        counter(
            &mut out,
            "sluice_accept_errors_total",
            "accept() failures (EMFILE and others).",
            &self.accept_errors,
        );
        counter(
            &mut out,
            "sluice_connections_evicted_total",
            "Idle keep-alive connections closed to admit new ones at --max-connections.",
            &self.connections_evicted,
        );
        counter(
            &mut out,
            "sluice_connections_handed_over_total",
            "Connections handed to the event loop that owns the stream their resume or cancel names (--threads).",
            &self.connections_handed_over,
        );
        gauge(
            &mut out,
            "sluice_request_bytes_buffered",
            "Request bytes held or reserved now (--max-buffered-bytes bounds them).",
            self.request_bytes_buffered.load(Relaxed),
        );
        counter(
            &mut out,
            "sluice_request_budget_waits_total",
            "Request bodies that waited, unread, for room in --max-buffered-bytes.",
            &self.budget_waits,
        );
        counter(
            &mut out,
            "sluice_requests_deferred_total",
            "Times complete requests waited for the next turn of the loop (routing is bounded per turn).",
            &self.requests_deferred,
        );
        counter(
            &mut out,
            "sluice_requests_total",
            "HTTP requests parsed.",
            &self.requests,
        );
        let name = "sluice_requests_refused_total";
        let f = family(name);
        let _ = writeln!(
            out,
            "# HELP {f} Requests answered with a 4xx or 5xx before any stream started, by status.\n# TYPE {f} counter"
        );
        for (i, c) in self.requests_refused.iter().enumerate() {
            let status = REFUSAL_STATUSES
                .get(i)
                .map_or("other".to_string(), |s| s.to_string());
            let _ = writeln!(out, "{name}{{status=\"{status}\"}} {}", c.load(Relaxed));
        }
        counter(
            &mut out,
            "sluice_streams_started_total",
            "Streams admitted.",
            &self.streams_started,
        );
        counter(
            &mut out,
            "sluice_streams_completed_total",
            "Streams that ended with done.",
            &self.streams_completed,
        );
        let name = "sluice_streams_errored_total";
        let f = family(name);
        let _ = writeln!(
            out,
            "# HELP {f} Streams that ended with an error event, by code.\n# TYPE {f} counter"
        );
        for code in ErrorCode::ALL {
            let v = self.errored(code);
            let _ = writeln!(out, "{name}{{code=\"{}\"}} {v}", code.as_str());
        }
        counter(
            &mut out,
            "sluice_streams_disconnected_total",
            "Streams whose client left before the end.",
            &self.streams_disconnected,
        );
        gauge(
            &mut out,
            "sluice_streams_detached",
            "Resumable streams running with no client attached.",
            self.streams_detached.load(Relaxed),
        );
        gauge(
            &mut out,
            "sluice_replay_bytes",
            "Bytes held in replay logs.",
            self.replay_bytes.load(Relaxed),
        );
        let by_outcome =
            |out: &mut String, name: &'static str, help: &str, pairs: [(&str, &AtomicU64); 2]| {
                let f = family(name);
                let _ = writeln!(out, "# HELP {f} {help}\n# TYPE {f} counter");
                for (outcome, v) in pairs {
                    let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {}", v.load(Relaxed));
                }
            };
        by_outcome(
            &mut out,
            "sluice_resumes_total",
            "Requests to resume a stream, by outcome.",
            [
                ("resumed", &self.resumes),
                ("not_found", &self.resumes_not_found),
            ],
        );
        counter(
            &mut out,
            "sluice_replayed_events_total",
            "Events sent again to clients that resumed.",
            &self.replayed_events,
        );
        by_outcome(
            &mut out,
            "sluice_cancels_total",
            "Requests to stop a stream by id, by outcome.",
            [
                ("stopped", &self.cancels),
                ("not_found", &self.cancels_not_found),
            ],
        );
        if self.store_configured.load(Relaxed) {
            gauge(
                &mut out,
                "sluice_resume_store_up",
                "Whether the shared resume store (--resume-store) is reachable.",
                self.store_up.load(Relaxed),
            );
            counter(
                &mut out,
                "sluice_resume_store_errors_total",
                "Failed calls to the shared resume store.",
                &self.store_errors,
            );
            counter(
                &mut out,
                "sluice_resume_store_batches_lost_total",
                "Batches of events not stored (their streams cannot be resumed elsewhere).",
                &self.store_batches_lost,
            );
            counter(
                &mut out,
                "sluice_remote_resumes_total",
                "Streams resumed here from another instance's stored events.",
                &self.remote_resumes,
            );
        }
        counter(
            &mut out,
            "sluice_generations_cancelled_total",
            "Generations cancelled before the backend finished.",
            &self.generations_cancelled,
        );
        counter(
            &mut out,
            "sluice_jobs_dropped_queued_total",
            "Queued generations dropped without calling the backend.",
            &self.jobs_dropped_queued,
        );
        counter(
            &mut out,
            "sluice_tokens_sent_total",
            "Token events sent.",
            &self.tokens_sent,
        );
        counter(
            &mut out,
            "sluice_heartbeats_sent_total",
            "Heartbeat events sent.",
            &self.heartbeats_sent,
        );
        counter(
            &mut out,
            "sluice_bytes_sent_total",
            "Bytes written to client sockets.",
            &self.bytes_sent,
        );
        counter(
            &mut out,
            "sluice_log_lines_dropped_total",
            "Log lines dropped because stderr was not keeping up.",
            &self.log_lines_dropped,
        );
        if let Some(rules) = self.redaction_labels.get() {
            let name = "sluice_redactions_total";
            let f = family(name);
            let _ = writeln!(
                out,
                "# HELP {f} Matches replaced before emission, by redaction rule.\n# TYPE {f} counter"
            );
            for (slot, rule) in rules {
                let v = self.redactions.get(*slot).map_or(0, |c| c.load(Relaxed));
                let _ = writeln!(out, "{name}{{rule=\"{rule}\"}} {v}");
            }
        }
        self.ttft.render(
            &mut out,
            "sluice_time_to_first_token_seconds",
            "Request fully parsed to the first token's bytes accepted by the socket.",
        );
        self.inter_token.render(
            &mut out,
            "sluice_inter_token_seconds",
            "Time between two token events of a stream.",
        );
        self.stream_duration.render(
            &mut out,
            "sluice_stream_duration_seconds",
            "Request fully parsed to the stream's end.",
        );
        self.queue_wait.render(
            &mut out,
            "sluice_queue_wait_seconds",
            "Time a generation waited for a worker.",
        );
        if openmetrics {
            out.push_str("# EOF\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_falls_in_the_first_bucket_it_does_not_exceed() {
        let linear = |ns: u64| {
            BUCKETS_NS
                .iter()
                .position(|b| ns <= *b)
                .unwrap_or(BUCKETS.len())
        };
        let mut cases = vec![0, 1, 2, u64::MAX, u64::MAX - 1];
        for &b in &BUCKETS_NS {
            cases.extend([b - 1, b, b + 1, b / 2, b * 2, b * 3 / 2]);
        }
        for k in 0..64 {
            cases.extend([1u64 << k, (1u64 << k).saturating_sub(1), (1u64 << k) | 1]);
        }
        for ns in cases {
            assert_eq!(bucket_of(ns), linear(ns), "{ns} ns");
        }
        // Every bound at least twice the one before: one step is enough.
        assert!(BUCKETS_NS.windows(2).all(|w| w[1] >= 2 * w[0]));
    }

    #[test]
    fn buckets_in_nanoseconds_sort_as_the_seconds_did() {
        let by_secs = |d: Duration| {
            let s = d.as_secs_f64();
            BUCKETS
                .iter()
                .position(|b| s <= *b)
                .unwrap_or(BUCKETS.len())
        };
        for (i, b) in BUCKETS.iter().enumerate() {
            assert_eq!(BUCKETS_NS[i] as f64 / 1e9, *b);
            for ns in [BUCKETS_NS[i] - 1, BUCKETS_NS[i], BUCKETS_NS[i] + 1] {
                let d = Duration::from_nanos(ns);
                let h = Histogram::default();
                h.observe(d);
                let got = h.counts.iter().position(|c| c.load(Relaxed) == 1);
                assert_eq!(got, Some(by_secs(d)), "{d:?}");
            }
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(1000));
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"0.00005\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"0.001\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"600\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
    }

    #[test]
    fn exposition_has_the_contract_families() {
        let m = Metrics::default();
        m.streams_errored[ErrorCode::SlowConsumer.index()].fetch_add(2, Relaxed);
        let s = m.render(false);
        for name in [
            "# TYPE sluice_streams_open gauge",
            "# TYPE sluice_connections_open gauge",
            "# TYPE sluice_streams_started_total counter",
            "# TYPE sluice_streams_completed_total counter",
            "sluice_streams_errored_total{code=\"slow_consumer\"} 2",
            "# TYPE sluice_streams_disconnected_total counter",
            "# TYPE sluice_tokens_sent_total counter",
            "# TYPE sluice_heartbeats_sent_total counter",
            "# TYPE sluice_time_to_first_token_seconds histogram",
            "# TYPE sluice_inter_token_seconds histogram",
            "# TYPE sluice_stream_duration_seconds histogram",
            "# TYPE sluice_queue_wait_seconds histogram",
        ] {
            assert!(s.contains(name), "missing {name}");
        }
        let om = m.render(true);
        assert!(
            om.contains("# TYPE sluice_streams_started counter\nsluice_streams_started_total 0\n")
        );
        assert!(om.ends_with("# EOF\n"));
        // OpenMetrics names counter families without the suffix everywhere.
        assert!(!om.contains("_total counter"), "{om}");
        assert!(!om.contains("# HELP sluice_streams_started_total"), "{om}");
    }
}
