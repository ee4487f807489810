//! Aggregates finished streams: outcome counters, µs histograms
//! (hdrhistogram) for each timing, the per-second series the HTML report
//! plots, the server-join figures (sluice's own `done.ttft_ms` against
//! ours) and goodput against `--goodput` objectives. Pure: records in,
//! numbers out.

use crate::exchange::{Outcome, Record};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::time::Instant;

/// A µs histogram with exact mean and max beside it.
#[derive(Debug, Clone)]
pub struct Hist {
    h: Histogram<u64>,
    sum: u128,
    max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            // 1 µs .. 1 hour at 3 significant digits.
            h: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            sum: 0,
            max: 0,
        }
    }
}

impl Hist {
    pub fn record(&mut self, us: u64) {
        let _ = self.h.record(us.clamp(1, 3_600_000_000));
        self.sum += us as u128;
        self.max = self.max.max(us);
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// The value at quantile `q`, in ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.count() == 0 {
            return 0.0;
        }
        // the histogram's bucket edge can pass the exact maximum
        (self
            .h
            .median_equivalent(self.h.value_at_quantile(q))
            .min(self.max)) as f64
            / 1000.0
    }

    /// `{p50, p90, p99, p999, max, mean, count}` in ms, or null when empty.
    pub fn summary(&self) -> Value {
        if self.count() == 0 {
            return Value::Null;
        }
        json!({
            "p50": round3(self.quantile_ms(0.50)),
            "p90": round3(self.quantile_ms(0.90)),
            "p99": round3(self.quantile_ms(0.99)),
            "p999": round3(self.quantile_ms(0.999)),
            "max": round3(self.max as f64 / 1000.0),
            "mean": round3(self.sum as f64 / self.count() as f64 / 1000.0),
            "count": self.count(),
        })
    }

    /// Points `[ms, fraction ≤]` of the CDF, for plots.
    pub fn cdf(&self) -> Vec<[f64; 2]> {
        if self.count() == 0 {
            return Vec::new();
        }
        let mut pts = Vec::new();
        let mut last = f64::NAN;
        for i in 0..=200 {
            let q = if i <= 180 {
                i as f64 / 200.0
            } else {
                // more points in the tail: 0.9 .. 0.9999
                1.0 - 0.1 * 10f64.powf(-3.0 * (i - 180) as f64 / 20.0)
            };
            let v = self.quantile_ms(q);
            if v != last {
                pts.push([round3(v), (q * 1e4).round() / 1e4]);
                last = v;
            }
        }
        pts.push([round3(self.max as f64 / 1000.0), 1.0]);
        pts
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One `--goodput` objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Slo {
    pub metric: String,
    pub max_ms: f64,
}

const SLO_METRICS: [&str; 6] = [
    "ttft_ms",
    "itl_ms",
    "itl_max_ms",
    "total_ms",
    "ttft_intended_ms",
    "ttft_first_byte_ms",
];

pub fn parse_goodput(s: &str) -> Result<Vec<Slo>, String> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, n) = part
            .split_once(':')
            .ok_or_else(|| format!("--goodput {part:?}: want metric:ms, e.g. ttft_ms:500"))?;
        let k = k.trim();
        if !SLO_METRICS.contains(&k) {
            return Err(format!(
                "--goodput: unknown metric {k:?} (known: {})",
                SLO_METRICS.join(", ")
            ));
        }
        let max_ms: f64 = n
            .trim()
            .parse()
            .map_err(|_| format!("--goodput {part:?}: {n:?} is not a number of ms"))?;
        v.push(Slo {
            metric: k.into(),
            max_ms,
        });
    }
    if v.is_empty() {
        return Err("--goodput: no objective given".into());
    }
    Ok(v)
}

/// One second of the run.
#[derive(Debug, Clone, Default)]
pub struct Second {
    pub started: u64,
    pub done: u64,
    pub failed: u64,
    pub tokens: u64,
    pub ttft_us: Vec<u32>,
    pub inflight: u64,
    pub held_open: u64,
    pub cpu_percent: f64,
    /// The loop sampled in-flight, held and CPU for this second.
    pub sampled: bool,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub started: u64,
    pub done: u64,
    pub errored: u64,
    pub reset: u64,
    pub timeout: u64,
    pub incomplete: u64,
    pub disconnected: u64,
    pub connect_error: u64,
    /// Streams given a client fault (kept out of the latency figures).
    pub faulted: u64,
    pub http_status: BTreeMap<u16, u64>,
    pub error_code: BTreeMap<String, u64>,
    pub ttft: Hist,
    pub ttft_first_byte: Hist,
    pub ttft_first_event: Hist,
    pub ttft_intended: Hist,
    pub send_lag: Hist,
    pub itl: Hist,
    pub head: Hist,
    pub total: Hist,
    pub server_ttft: Hist,
    pub transport: Hist,
    pub transport_negative: u64,
    /// The largest excess of the server's TTFT over ours, µs.
    pub transport_negative_max_us: u64,
    pub transport_sum_us: u128,
    pub joined_ttft_sum_us: u128,
    pub request_id_echoed: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub slos: Vec<Slo>,
    pub goodput_met: u64,
    pub goodput_eligible: u64,
    pub resume_attempted: u64,
    pub resume_exact: u64,
    pub resume_duplicates: u64,
    pub resume_missing: u64,
    pub resume_unsupported: u64,
    pub series: Vec<Second>,
    /// The moment the run began; the series counts seconds from it.
    pub origin: Option<Instant>,
    pub first_sent: Option<Instant>,
    pub last_end: Option<Instant>,
    pub open_loop: bool,
}

impl Stats {
    pub fn new(origin: Instant, slos: Vec<Slo>, open_loop: bool) -> Self {
        Stats {
            origin: Some(origin),
            slos,
            open_loop,
            ..Default::default()
        }
    }

    pub fn second(&mut self, t: Instant) -> &mut Second {
        let origin = self.origin.unwrap_or(t);
        let i = t.saturating_duration_since(origin).as_secs() as usize;
        if self.series.len() <= i {
            self.series.resize(i + 1, Second::default());
        }
        &mut self.series[i]
    }

    /// Adds one finished, counted stream.
    pub fn add(&mut self, r: &Record) {
        self.started += 1;
        match &r.outcome {
            Outcome::Done => self.done += 1,
            Outcome::Error(code) => {
                self.errored += 1;
                *self.error_code.entry(code.clone()).or_default() += 1;
            }
            Outcome::Http(status, code) => {
                self.errored += 1;
                let code = code.clone().unwrap_or_else(|| format!("http_{status}"));
                *self.error_code.entry(code).or_default() += 1;
            }
            Outcome::Incomplete => {
                self.errored += 1;
                self.incomplete += 1;
                *self
                    .error_code
                    .entry("no_terminal_event".into())
                    .or_default() += 1;
            }
            Outcome::Reset | Outcome::Pending => self.reset += 1,
            Outcome::Timeout => self.timeout += 1,
            Outcome::Disconnected => self.disconnected += 1,
            Outcome::ConnectError => self.connect_error += 1,
        }
        if let Some(s) = r.status {
            *self.http_status.entry(s).or_default() += 1;
        }
        self.tokens += r.tokens;
        self.bytes += r.bytes;
        if let Some(end) = r.end {
            self.last_end = Some(self.last_end.map_or(end, |l| l.max(end)));
        }
        if let Some(sent) = r.sent {
            self.first_sent = Some(self.first_sent.map_or(sent, |f| f.min(sent)));
        }
        if r.request_id_echoed {
            self.request_id_echoed += 1;
        }
        if r.faulted {
            self.faulted += 1;
            self.add_to_series(r, None);
            return;
        }
        let ttft = r.since_sent(r.first_token);
        if let Some(us) = ttft {
            self.ttft.record(us);
        }
        if let Some(us) = r.since_sent(r.first_byte) {
            self.ttft_first_byte.record(us);
        }
        if let Some(us) = r.since_sent(r.first_event) {
            self.ttft_first_event.record(us);
        }
        if let Some(us) = r.since_sent(r.head) {
            self.head.record(us);
        }
        let total = r.since_sent(r.end);
        if let Some(us) = total {
            if r.outcome == Outcome::Done {
                self.total.record(us);
            }
        }
        let intended = r
            .first_token
            .map(|t| t.saturating_duration_since(r.intended).as_micros() as u64);
        if let (true, Some(us)) = (self.open_loop, intended) {
            self.ttft_intended.record(us);
        }
        if let Some(sent) = r.sent {
            self.send_lag
                .record(sent.saturating_duration_since(r.intended).as_micros() as u64);
        }
        for &g in &r.gaps_us {
            self.itl.record(g as u64);
        }
        if let (Some(server_ms), Some(client_us)) = (r.server_ttft_ms, ttft) {
            let server_us = (server_ms * 1000.0).round().max(0.0) as u64;
            self.server_ttft.record(server_us);
            if client_us >= server_us {
                self.transport.record(client_us - server_us);
                self.transport_sum_us += (client_us - server_us) as u128;
            } else {
                self.transport_negative += 1;
                self.transport_negative_max_us =
                    self.transport_negative_max_us.max(server_us - client_us);
            }
            self.joined_ttft_sum_us += client_us as u128;
        }
        if !self.slos.is_empty() && r.outcome != Outcome::Disconnected {
            self.goodput_eligible += 1;
            if r.outcome == Outcome::Done && self.meets(r, ttft, intended, total) {
                self.goodput_met += 1;
            }
        }
        self.add_to_series(r, ttft);
    }

    fn meets(
        &self,
        r: &Record,
        ttft: Option<u64>,
        intended: Option<u64>,
        total: Option<u64>,
    ) -> bool {
        let gaps = &r.gaps_us;
        let mean_gap = if gaps.is_empty() {
            Some(0)
        } else {
            Some(gaps.iter().map(|&g| g as u64).sum::<u64>() / gaps.len() as u64)
        };
        let max_gap = Some(gaps.iter().copied().max().unwrap_or(0) as u64);
        self.slos.iter().all(|slo| {
            let v = match slo.metric.as_str() {
                "ttft_ms" => ttft,
                "itl_ms" => mean_gap,
                "itl_max_ms" => max_gap,
                "total_ms" => total,
                "ttft_intended_ms" => intended.or(ttft),
                "ttft_first_byte_ms" => r.since_sent(r.first_byte),
                _ => None,
            };
            v.is_some_and(|us| us as f64 / 1000.0 <= slo.max_ms)
        })
    }

    fn add_to_series(&mut self, r: &Record, ttft: Option<u64>) {
        if let Some(sent) = r.sent {
            self.second(sent).started += 1;
        }
        if let Some(end) = r.end {
            let ok = r.outcome == Outcome::Done;
            let s = self.second(end);
            if ok {
                s.done += 1;
            } else {
                s.failed += 1;
            }
        }
        if let Some(first) = r.first_token {
            if let Some(us) = ttft {
                self.second(first)
                    .ttft_us
                    .push(us.min(u32::MAX as u64) as u32);
            }
            // each token in the second it arrived
            let mut t = first;
            self.second(t).tokens += 1;
            for &g in &r.gaps_us {
                t += std::time::Duration::from_micros(g as u64);
                self.second(t).tokens += 1;
            }
        }
    }

    /// Wall time of the measured part: first request sent → last stream ended.
    pub fn measured_secs(&self) -> f64 {
        match (self.first_sent, self.last_end) {
            (Some(a), Some(b)) if b > a => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// The `streams` object of the JSON report.
    pub fn streams_json(&self) -> Value {
        let mut m = Map::new();
        for (k, v) in [
            ("started", self.started),
            ("done", self.done),
            ("errored", self.errored),
            ("reset", self.reset),
            ("timeout", self.timeout),
            ("disconnected", self.disconnected),
            ("connect_error", self.connect_error),
        ] {
            m.insert(k.into(), json!(v));
        }
        let hs: Map<String, Value> = self
            .http_status
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        m.insert("http_status".into(), Value::Object(hs));
        let ec: Map<String, Value> = self
            .error_code
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        m.insert("error_code".into(), Value::Object(ec));
        Value::Object(m)
    }

    /// Per-second p-quantile of TTFT, in ms (None when no stream had its first token then).
    pub fn second_ttft_ms(s: &Second, q: f64) -> Option<f64> {
        if s.ttft_us.is_empty() {
            return None;
        }
        let mut v = s.ttft_us.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i] as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(t0: Instant, ttft_ms: u64, gaps_ms: &[u64], outcome: Outcome) -> Record {
        let mut r = Record::new(true, t0);
        r.sent = Some(t0);
        r.status = Some(200);
        r.head = Some(t0 + Duration::from_millis(1));
        r.first_byte = Some(t0 + Duration::from_millis(ttft_ms));
        r.first_event = r.first_byte;
        r.first_token = r.first_byte;
        r.gaps_us = gaps_ms.iter().map(|g| (g * 1000) as u32).collect();
        r.tokens = 1 + gaps_ms.len() as u64;
        r.end = Some(t0 + Duration::from_millis(ttft_ms + gaps_ms.iter().sum::<u64>()));
        r.outcome = outcome;
        r
    }

    #[test]
    fn counts_percentiles_and_goodput() {
        let t0 = Instant::now();
        let slos = parse_goodput("ttft_ms:50,itl_ms:20").unwrap();
        let mut s = Stats::new(t0, slos, false);
        for i in 1..=100u64 {
            s.add(&rec(t0, i, &[10, 30], Outcome::Done));
        }
        s.add(&rec(t0, 5, &[], Outcome::Error("overloaded".into())));
        let mut r = Record::new(true, t0);
        r.outcome = Outcome::Timeout;
        s.add(&r);
        assert_eq!((s.started, s.done, s.errored, s.timeout), (102, 100, 1, 1));
        assert_eq!(s.error_code["overloaded"], 1);
        assert_eq!(s.http_status[&200], 101);
        // 3 significant digits: within 0.1 %
        assert!(
            (s.ttft.quantile_ms(0.5) - 50.0).abs() <= 0.05,
            "{}",
            s.ttft.quantile_ms(0.5)
        );
        assert!((s.ttft.quantile_ms(0.99) - 99.0).abs() <= 0.1);
        assert_eq!(s.ttft.summary()["max"], json!(100.0));
        assert_eq!(s.itl.count(), 200);
        // ttft ≤ 50 and mean gap 20 ≤ 20: streams 1..=50 meet; 102 eligible
        assert_eq!((s.goodput_met, s.goodput_eligible), (50, 102));
        let tokens: u64 = s.series.iter().map(|x| x.tokens).sum();
        assert_eq!(tokens, 301);
    }

    #[test]
    fn goodput_parse() {
        assert_eq!(
            parse_goodput("ttft_ms:500, itl_ms:50").unwrap(),
            vec![
                Slo {
                    metric: "ttft_ms".into(),
                    max_ms: 500.0
                },
                Slo {
                    metric: "itl_ms".into(),
                    max_ms: 50.0
                }
            ]
        );
        assert!(parse_goodput("tpot:5").is_err());
        assert!(parse_goodput("ttft_ms").is_err());
    }

    #[test]
    fn server_join() {
        let t0 = Instant::now();
        let mut s = Stats::new(t0, vec![], false);
        let mut r = rec(t0, 10, &[], Outcome::Done);
        r.server_ttft_ms = Some(7.5);
        s.add(&r);
        assert!((s.transport.quantile_ms(0.5) - 2.5).abs() < 0.003);
        assert!((s.server_ttft.quantile_ms(0.5) - 7.5).abs() < 0.008);
    }
}
