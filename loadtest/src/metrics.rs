//! The server's side of the story: scrapes a Prometheus text endpoint
//! (`--metrics-url`) before and after the run and turns the difference into
//! `server.*` figures — streams started/completed/errored/disconnected, the
//! TTFT histogram's quantiles (interpolated inside buckets, as PromQL's
//! `histogram_quantile` does), open streams, and how long
//! `sluice_streams_open` took to fall back after the run's clients left.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One scrape: `name{labels}` → value.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // name{labels} value [timestamp]; label values may hold spaces
            let split = match line.rfind('}') {
                Some(i) => i + 1,
                None => line.find(char::is_whitespace).unwrap_or(line.len()),
            };
            let (key, rest) = line.split_at(split);
            let Some(v) = rest.split_whitespace().next() else {
                continue;
            };
            let v = match v {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => match v.parse() {
                    Ok(x) => x,
                    Err(_) => continue,
                },
            };
            samples.insert(key.to_string(), v);
        }
        Scrape { samples }
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.samples.get(key).copied()
    }

    /// Sum of every series of `name` (any labels).
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut found = None;
        for (k, v) in &self.samples {
            let base = k.split('{').next().unwrap_or(k);
            if base == name {
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    /// `(le, cumulative count)` of histogram `name`, sorted by le.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{");
        let mut v: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, &c)| {
                let le = k.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, c))
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }

    /// Series `name{labels}` whose label `label` varies: label value → value.
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let prefix = format!("{name}{{");
        let pat = format!("{label}=\"");
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, &v)| Some((k.split(&pat).nth(1)?.split('"').next()?.to_string(), v)))
            .collect()
    }
}

/// `histogram_quantile` over the bucket difference `after − before`, in the histogram's unit.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, c)| {
            let b = before.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
            (le, c - b)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in &delta {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = if c > prev.1 {
                (rank - prev.1) / (c - prev.1)
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * within);
        }
        prev = (le, c);
    }
    None
}

/// GET the URL (http or https), return the body.
pub fn fetch(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<String, String> {
    let t = crate::request::Target::parse(url)?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
        t.path, t.host_header
    );
    let sock = TcpStream::connect_timeout(&t.addr, Duration::from_secs(5))
        .map_err(|e| format!("{url}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut raw = Vec::new();
    if t.tls {
        let cfg = tls.ok_or("https metrics need TLS settings")?.clone();
        let name =
            rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
        let mut s = rustls::StreamOwned::new(conn, sock);
        s.write_all(req.as_bytes())
            .map_err(|e| format!("{url}: {e}"))?;
        let _ = s.read_to_end(&mut raw);
    } else {
        let mut s = sock;
        s.write_all(req.as_bytes())
            .map_err(|e| format!("{url}: {e}"))?;
        s.read_to_end(&mut raw).map_err(|e| format!("{url}: {e}"))?;
    }
    let (head, n) = crate::http::parse_head(&raw, false)
        .map_err(|e| format!("{url}: {e}"))?
        .ok_or_else(|| format!("{url}: incomplete response"))?;
    if head.status != 200 {
        return Err(format!("{url}: HTTP {}", head.status));
    }
    let mut body = Vec::new();
    let mut d = crate::http::BodyDecoder::new(head.framing);
    d.decode(&raw[n..], &mut body)
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

pub fn scrape(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Scrape, String> {
    fetch(url, tls).map(|t| Scrape::parse(&t))
}

const TTFT: &str = "sluice_time_to_first_token_seconds";

/// After the run: polls until `sluice_streams_open` is back to `baseline`
/// (or `limit` passes); returns the ms it took and the last value.
pub fn settle(
    url: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    baseline: f64,
    limit: Duration,
) -> (Option<f64>, Option<f64>) {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < limit {
        if let Ok(s) = scrape(url, tls) {
            last = s.get("sluice_streams_open");
            match last {
                Some(open) if open <= baseline => {
                    return (Some(start.elapsed().as_secs_f64() * 1000.0), last);
                }
                None => return (None, None),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (None, last)
}

/// The `server` object of the report.
pub fn server_json(
    before: &Scrape,
    after: &Scrape,
    settle_ms: Option<f64>,
    open_after_settle: Option<f64>,
) -> Value {
    let delta = |name: &str| -> Value {
        match (before.sum(name), after.sum(name)) {
            (Some(b), Some(a)) => json!(a - b),
            (None, Some(a)) => json!(a),
            _ => Value::Null,
        }
    };
    let mut m = Map::new();
    m.insert(
        "streams_started".into(),
        delta("sluice_streams_started_total"),
    );
    m.insert(
        "streams_completed".into(),
        delta("sluice_streams_completed_total"),
    );
    m.insert(
        "streams_errored".into(),
        delta("sluice_streams_errored_total"),
    );
    m.insert(
        "streams_disconnected".into(),
        delta("sluice_streams_disconnected_total"),
    );
    m.insert("tokens_sent".into(), delta("sluice_tokens_sent_total"));
    let mut codes = Map::new();
    let b = before.by_label("sluice_streams_errored_total", "code");
    for (code, a) in after.by_label("sluice_streams_errored_total", "code") {
        let d = a - b.get(&code).copied().unwrap_or(0.0);
        if d > 0.0 {
            codes.insert(code, json!(d));
        }
    }
    m.insert("streams_errored_by_code".into(), Value::Object(codes));
    m.insert(
        "streams_open_before".into(),
        json!(before.get("sluice_streams_open")),
    );
    m.insert(
        "streams_open_after".into(),
        json!(after.get("sluice_streams_open")),
    );
    m.insert(
        "connections_open_before".into(),
        json!(before.get("sluice_connections_open")),
    );
    m.insert(
        "connections_open_after".into(),
        json!(after.get("sluice_connections_open")),
    );
    m.insert(
        "streams_open_settle_ms".into(),
        json!(settle_ms.map(crate::stats::round3)),
    );
    m.insert("streams_open_after_settle".into(), json!(open_after_settle));
    let (bb, ab) = (before.buckets(TTFT), after.buckets(TTFT));
    let mut t = Map::new();
    if !ab.is_empty() {
        for (k, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
            t.insert(
                k.into(),
                json!(quantile(&bb, &ab, q).map(|s| crate::stats::round3(s * 1000.0))),
            );
        }
        let count = ab.last().map_or(0.0, |x| x.1) - bb.last().map_or(0.0, |x| x.1);
        let sum = after.sum(&format!("{TTFT}_sum")).unwrap_or(0.0)
            - before.sum(&format!("{TTFT}_sum")).unwrap_or(0.0);
        t.insert("count".into(), json!(count));
        t.insert(
            "mean".into(),
            json!((count > 0.0).then(|| crate::stats::round3(sum / count * 1000.0))),
        );
        let buckets: Vec<Value> = ab
            .iter()
            .map(|&(le, c)| {
                let b = bb.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
                json!([
                    if le.is_infinite() {
                        Value::from("+Inf")
                    } else {
                        json!(le * 1000.0)
                    },
                    c - b
                ])
            })
            .collect();
        t.insert("buckets_ms".into(), Value::Array(buckets));
    }
    m.insert("ttft_ms".into(), Value::Object(t));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE sluice_streams_open gauge\nsluice_streams_open 3\n\
sluice_streams_errored_total{code=\"overloaded\"} 2\nsluice_streams_errored_total{code=\"internal\"} 1\n\
sluice_time_to_first_token_seconds_bucket{le=\"0.01\"} 10\n\
sluice_time_to_first_token_seconds_bucket{le=\"0.1\"} 30\n\
sluice_time_to_first_token_seconds_bucket{le=\"+Inf\"} 40\n\
sluice_time_to_first_token_seconds_sum 2.5\nsluice_time_to_first_token_seconds_count 40\n";

    #[test]
    fn parses_and_interpolates() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.get("sluice_streams_open"), Some(3.0));
        assert_eq!(s.sum("sluice_streams_errored_total"), Some(3.0));
        assert_eq!(
            s.by_label("sluice_streams_errored_total", "code")["overloaded"],
            2.0
        );
        let b = s.buckets("sluice_time_to_first_token_seconds");
        assert_eq!(b.len(), 3);
        let empty = Scrape::default().buckets("x");
        // rank 20 of 40 falls halfway into (0.01, 0.1]
        let q = quantile(&empty, &b, 0.5).unwrap();
        assert!((q - 0.055).abs() < 1e-9, "{q}");
        // rank 4 of the first bucket, whose lower edge is 0
        assert!((quantile(&empty, &b, 0.1).unwrap() - 0.004).abs() < 1e-12);
        assert_eq!(quantile(&empty, &b, 0.99).unwrap(), 0.1);
        assert_eq!(quantile(&b, &b, 0.5), None);
    }

    #[test]
    fn server_deltas() {
        let before = Scrape::parse("sluice_streams_completed_total 5\nsluice_streams_open 1\n");
        let after = Scrape::parse(
            TEXT.to_string()
                .as_str()
                .replace(
                    "sluice_streams_open 3",
                    "sluice_streams_completed_total 9\nsluice_streams_open 3",
                )
                .as_str(),
        );
        let v = server_json(&before, &after, Some(12.0), Some(1.0));
        assert_eq!(v["streams_completed"], json!(4.0));
        assert_eq!(v["streams_errored_by_code"]["overloaded"], json!(2.0));
        assert_eq!(v["ttft_ms"]["count"], json!(40.0));
    }
}
