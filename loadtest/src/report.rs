//! The results as JSON (stable keys, documented in loadtest/README.md) and
//! as the summary table printed at the end. Everything else (HTML,
//! comparisons) reads the JSON, so one run's file is enough to redraw it.

use crate::stats::{round3, Hist, Stats};
use serde_json::{json, Map, Value};

/// What the run knew besides the streams.
pub struct RunInfo {
    pub config: Value,
    pub wall_s: f64,
    pub held: Value,
    pub client_cpu_percent: f64,
    pub client_cpu_peak: f64,
    pub client_busy_seconds: u64,
    pub holder_cpu_percent: Option<f64>,
    pub server: Option<Value>,
    pub warnings: Vec<String>,
}

fn hist(h: &Hist) -> Value {
    h.summary()
}

pub fn to_json(s: &Stats, info: &RunInfo) -> Value {
    let secs = s.measured_secs();
    let per_s = |n: u64| {
        if secs > 0.0 {
            round3(n as f64 / secs)
        } else {
            0.0
        }
    };
    let mut root = Map::new();
    root.insert("schema".into(), json!("sluice-load/1"));
    root.insert("run".into(), {
        let mut r = info.config.clone();
        r["wall_s"] = json!(round3(info.wall_s));
        r["measured_s"] = json!(round3(secs));
        r
    });
    root.insert("streams".into(), s.streams_json());
    root.insert("ttft_ms".into(), hist(&s.ttft));
    root.insert("ttft_first_byte_ms".into(), hist(&s.ttft_first_byte));
    root.insert("ttft_first_event_ms".into(), hist(&s.ttft_first_event));
    root.insert(
        "ttft_intended_ms".into(),
        if s.open_loop {
            hist(&s.ttft_intended)
        } else {
            Value::Null
        },
    );
    root.insert("send_lag_ms".into(), hist(&s.send_lag));
    root.insert("itl_ms".into(), hist(&s.itl));
    root.insert("head_ms".into(), hist(&s.head));
    root.insert("total_ms".into(), hist(&s.total));
    root.insert("tokens".into(), json!(s.tokens));
    root.insert("bytes".into(), json!(s.bytes));
    root.insert("token_events_per_s".into(), json!(per_s(s.tokens)));
    root.insert("streams_per_s".into(), json!(per_s(s.done)));
    root.insert(
        "goodput".into(),
        if s.slos.is_empty() {
            Value::Null
        } else {
            let objectives: Map<String, Value> =
                s.slos.iter().map(|o| (o.metric.clone(), json!(o.max_ms))).collect();
            json!({
                "objectives": objectives,
                "met": s.goodput_met,
                "eligible": s.goodput_eligible,
                "ratio": if s.goodput_eligible > 0 { round3(s.goodput_met as f64 / s.goodput_eligible as f64) } else { 0.0 },
                "per_s": per_s(s.goodput_met),
            })
        },
    );
    root.insert("held".into(), info.held.clone());
    root.insert(
        "client".into(),
        json!({
            "cpu_percent": round3(info.client_cpu_percent),
            "cpu_peak_percent": round3(info.client_cpu_peak),
            "seconds_over_80_percent": info.client_busy_seconds,
            "threads": 1,
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "holder_cpu_percent": info.holder_cpu_percent.map(round3),
            "warnings": info.warnings,
        }),
    );
    let joined = s.server_ttft.count();
    root.insert(
        "server_join".into(),
        json!({
            "request_id_echoed": s.request_id_echoed,
            "joined": joined,
            "server_ttft_ms": hist(&s.server_ttft),
            "transport_ms": hist(&s.transport),
            "transport_share": if s.joined_ttft_sum_us > 0 { round3(s.transport_sum_us as f64 / s.joined_ttft_sum_us as f64) } else { 0.0 },
            "server_above_client": s.transport_negative,
            "server_above_client_max_ms": round3(s.transport_negative_max_us as f64 / 1000.0),
        }),
    );
    root.insert(
        "faults".into(),
        json!({
            "faulted_streams": s.faulted,
            "disconnected": s.disconnected,
            "resume": {
                "attempted": s.resume_attempted,
                "exactly_once": s.resume_exact,
                "duplicates": s.resume_duplicates,
                "missing": s.resume_missing,
                "unsupported": s.resume_unsupported,
            },
        }),
    );
    root.insert("server".into(), info.server.clone().unwrap_or(Value::Null));
    root.insert("series".into(), series(s));
    root.insert(
        "cdf".into(),
        json!({
            "ttft_ms": s.ttft.cdf(),
            "ttft_first_byte_ms": s.ttft_first_byte.cdf(),
            "ttft_first_event_ms": s.ttft_first_event.cdf(),
            "ttft_intended_ms": s.ttft_intended.cdf(),
            "itl_ms": s.itl.cdf(),
            "head_ms": s.head.cdf(),
        }),
    );
    Value::Object(root)
}

fn series(s: &Stats) -> Value {
    let n = s.series.len();
    let col = |f: &dyn Fn(&crate::stats::Second) -> Value| -> Value {
        Value::Array(s.series.iter().map(f).collect())
    };
    json!({
        "t_s": (0..n).collect::<Vec<_>>(),
        "started": col(&|x| json!(x.started)),
        "done": col(&|x| json!(x.done)),
        "failed": col(&|x| json!(x.failed)),
        "tokens": col(&|x| json!(x.tokens)),
        "ttft_p50_ms": col(&|x| json!(Stats::second_ttft_ms(x, 0.5).map(round3))),
        "ttft_p99_ms": col(&|x| json!(Stats::second_ttft_ms(x, 0.99).map(round3))),
        "inflight": col(&|x| json!(x.sampled.then_some(x.inflight))),
        "held_open": col(&|x| json!(x.sampled.then_some(x.held_open))),
        "cpu_percent": col(&|x| json!(x.sampled.then(|| round3(x.cpu_percent)))),
    })
}

/// A number as a person writes it (no `.0` on counts); `-` when missing.
fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x == x.trunc() && x.abs() < 1e15 => format!("{}", x as i64),
        Some(x) => format!("{x}"),
        None => "-".into(),
    }
}

fn ms(v: &Value, k: &str) -> String {
    match v.get(k).and_then(Value::as_f64) {
        Some(x) => format!("{x:.3}"),
        None => "-".into(),
    }
}

/// The summary table printed at the end.
pub fn table(j: &Value) -> String {
    let mut o = String::new();
    let st = &j["streams"];
    let run = &j["run"];
    o += &format!(
        "sluice-load: {} ({}), {} load, {:.1} s measured\n",
        run["url"].as_str().unwrap_or("?"),
        run["format"].as_str().unwrap_or("?"),
        run["load"].as_str().unwrap_or("?"),
        run["measured_s"].as_f64().unwrap_or(0.0)
    );
    o += &format!(
        "streams: {} started, {} done, {} errored, {} reset, {} timeout, {} disconnected (fault), {} connect errors\n",
        st["started"], st["done"], st["errored"], st["reset"], st["timeout"], st["disconnected"], st["connect_error"]
    );
    let codes = |v: &Value| -> String {
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    o += &format!("http status: {}\n", codes(&st["http_status"]));
    if st["error_code"].as_object().is_some_and(|m| !m.is_empty()) {
        o += &format!("error codes: {}\n", codes(&st["error_code"]));
    }
    o += &format!(
        "\n{:<30} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "ms", "p50", "p90", "p99", "p99.9", "max", "mean"
    );
    for (label, key) in [
        ("ttft (first token) *", "ttft_ms"),
        ("ttft (first event)", "ttft_first_event_ms"),
        ("ttft (first body byte)", "ttft_first_byte_ms"),
        ("ttft from intended send", "ttft_intended_ms"),
        ("response head", "head_ms"),
        ("inter-token gap", "itl_ms"),
        ("total (done streams)", "total_ms"),
        ("server ttft (joined)", "server_join.server_ttft_ms"),
        ("transport (client - server)", "server_join.transport_ms"),
        ("server /metrics ttft (buckets)", "server.ttft_ms"),
    ] {
        let v = key.split('.').fold(j, |v, k| &v[k]);
        if v.is_null()
            || v.as_object()
                .is_some_and(|m| m.get("p50").is_none_or(Value::is_null))
        {
            continue;
        }
        o += &format!(
            "{:<30} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            label,
            ms(v, "p50"),
            ms(v, "p90"),
            ms(v, "p99"),
            ms(v, "p999"),
            ms(v, "max"),
            ms(v, "mean")
        );
    }
    o += &format!(
        "\nthroughput: {} streams/s, {} token events/s ({} tokens)\n",
        j["streams_per_s"], j["token_events_per_s"], j["tokens"]
    );
    if !j["goodput"].is_null() {
        o += &format!(
            "goodput: {} of {} streams met {} ({:.1} %), {} /s\n",
            j["goodput"]["met"],
            j["goodput"]["eligible"],
            j["goodput"]["objectives"],
            j["goodput"]["ratio"].as_f64().unwrap_or(0.0) * 100.0,
            j["goodput"]["per_s"]
        );
    }
    let h = &j["held"];
    if h["target"].as_u64().unwrap_or(0) > 0 {
        o += &format!(
            "held ({}): target {}, open at start {}, open at end {}, reopened {}, lost {}, failed opens {} ({} processes)\n",
            h["mode"].as_str().unwrap_or("?"),
            h["target"],
            h["open_at_start"],
            h["open_at_end"],
            h["reopened"],
            h["lost"],
            h["failed_opens"],
            h["processes"]
        );
    }
    let sj = &j["server_join"];
    if sj["joined"].as_u64().unwrap_or(0) > 0 {
        o += &format!(
            "server join: {} streams joined by X-Request-Id/done.ttft_ms; transport share of TTFT {:.1} %\n",
            sj["joined"],
            sj["transport_share"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    let f = &j["faults"];
    if f["resume"]["attempted"].as_u64().unwrap_or(0) > 0 {
        o += &format!("resume: {}\n", f["resume"]);
    }
    let sv = &j["server"];
    if !sv.is_null() {
        o += &format!(
            "server /metrics: started {}, completed {}, errored {}, disconnected {}; streams open before {} after {}; back to baseline in {} ms\n",
            num(&sv["streams_started"]), num(&sv["streams_completed"]), num(&sv["streams_errored"]),
            num(&sv["streams_disconnected"]), num(&sv["streams_open_before"]), num(&sv["streams_open_after"]),
            num(&sv["streams_open_settle_ms"])
        );
    }
    let c = &j["client"];
    o += &format!(
        "client: {:.0} % CPU of one core on average, peak {:.0} % (1 measuring thread, {} cores)",
        c["cpu_percent"].as_f64().unwrap_or(0.0),
        c["cpu_peak_percent"].as_f64().unwrap_or(0.0),
        c["cores"]
    );
    if let Some(hc) = c["holder_cpu_percent"].as_f64() {
        o += &format!("; holders {hc:.0} %");
    }
    o += "\n";
    for w in c["warnings"].as_array().into_iter().flatten() {
        o += &format!("WARNING: {}\n", w.as_str().unwrap_or(""));
    }
    o
}
