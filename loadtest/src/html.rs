//! The HTML report: one self-contained page (inline SVG and CSS, no
//! scripts, no external files) drawn from the JSON report — TTFT CDFs
//! (each definition), TTFT and throughput over time, inter-token gaps,
//! held connections and client CPU over time; and for `--compare`, every
//! run's TTFT CDF and throughput on one chart.

use serde_json::Value;
use std::fmt::Write;

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const W: f64 = 760.0;
const H: f64 = 300.0;
const ML: f64 = 64.0;
const MR: f64 = 16.0;
const MT: f64 = 34.0;
const MB: f64 = 44.0;

/// One line of a chart.
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Round tick steps: 1, 2, 5 × 10^k.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    if hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut v = Vec::new();
    let mut t = (lo / step).ceil() * step;
    while t <= hi + step * 1e-9 {
        v.push(t);
        t += step;
    }
    v
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{:.0}", x)
    } else if x.abs() >= 10.0 || x == x.round() {
        format!("{}", (x * 10.0).round() / 10.0)
    } else if x.abs() >= 0.1 {
        format!("{:.2}", x)
    } else {
        format!("{:.3}", x)
    }
}

/// An SVG line chart; `log_x` puts x on a log scale (values ≤ 0 dropped).
pub fn chart(title: &str, xlabel: &str, ylabel: &str, lines: &[Line], log_x: bool) -> String {
    let tx = |x: f64| if log_x { x.log10() } else { x };
    let pts: Vec<(f64, f64)> = lines
        .iter()
        .flat_map(|l| l.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
        .collect();
    let mut s = String::new();
    let _ = write!(s, "<figure><svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">", esc(title));
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"20\" class=\"t\">{}</text>",
        W / 2.0,
        esc(title)
    );
    if pts.is_empty() {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" class=\"n\">no data</text></svg></figure>",
            W / 2.0,
            H / 2.0
        );
        return s;
    }
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let mut y1 = f64::MIN;
    for &(x, y) in &pts {
        x0 = x0.min(tx(x));
        x1 = x1.max(tx(x));
        y1 = y1.max(y);
    }
    let y0 = 0.0;
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    if log_x {
        // widen to the nearest 1, 2 or 5 × 10^k on each side
        let steps = [1.0f64, 2.0, 5.0, 10.0];
        let (d0, d1) = (x0.floor(), x1.floor());
        x0 = steps
            .iter()
            .rev()
            .map(|m| d0 + m.log10())
            .find(|&v| v <= x0 + 1e-12)
            .unwrap_or(d0);
        x1 = steps
            .iter()
            .map(|m| d1 + m.log10())
            .find(|&v| v >= x1 - 1e-12)
            .unwrap_or(d1 + 1.0);
        if x1 <= x0 {
            x1 = x0 + 2f64.log10();
        }
    } else if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = y1 * 1.05;
    let px = |x: f64| ML + (tx(x) - x0) / (x1 - x0) * (W - ML - MR);
    let py = |y: f64| H - MB - (y - y0) / (y1 - y0) * (H - MT - MB);
    // axes and grid
    let _ = write!(
        s,
        "<rect x=\"{ML}\" y=\"{MT}\" width=\"{}\" height=\"{}\" class=\"f\"/>",
        W - ML - MR,
        H - MT - MB
    );
    let xt: Vec<f64> = if log_x {
        let mut v = Vec::new();
        let mut e = x0.floor();
        // less than about a decade shown: more ticks
        let mults: &[f64] = if x1 - x0 < 1.3 {
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
        } else {
            &[1.0, 2.0, 5.0]
        };
        while e <= x1 + 1e-9 {
            for &m in mults {
                let t = m * 10f64.powf(e);
                if t.log10() >= x0 - 1e-9 && t.log10() <= x1 + 1e-9 {
                    v.push(t);
                }
            }
            e += 1.0;
        }
        v
    } else {
        ticks(x0, x1)
    };
    for t in xt {
        let x = px(t);
        let _ = write!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{MT}\" x2=\"{x:.1}\" y2=\"{}\" class=\"g\"/><text x=\"{x:.1}\" y=\"{}\" class=\"xl\">{}</text>",
            H - MB,
            H - MB + 14.0,
            fmt_num(t)
        );
    }
    for t in ticks(y0, y1) {
        let y = py(t);
        let _ = write!(
            s,
            "<line x1=\"{ML}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" class=\"g\"/><text x=\"{}\" y=\"{:.1}\" class=\"yl\">{}</text>",
            W - MR,
            ML - 4.0,
            y + 4.0,
            fmt_num(t)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" class=\"al\">{}</text>",
        (ML + W - MR) / 2.0,
        H - 8.0,
        esc(xlabel)
    );
    let _ = write!(
        s,
        "<text x=\"14\" y=\"{}\" class=\"al\" transform=\"rotate(-90 14 {})\">{}</text>",
        (MT + H - MB) / 2.0,
        (MT + H - MB) / 2.0,
        esc(ylabel)
    );
    for (i, l) in lines.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let mut d = String::new();
        for &(x, y) in l
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
        {
            let _ = write!(d, "{:.1},{:.1} ", px(x), py(y));
        }
        let _ = write!(
            s,
            "<polyline points=\"{d}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"1.6\"/>"
        );
        let ly = MT + 14.0 + 15.0 * i as f64;
        let _ = write!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\" class=\"lg\">{}</text>",
            ML + 10.0,
            ly - 4.0,
            ML + 26.0,
            ly,
            esc(&l.name)
        );
    }
    s.push_str("</svg></figure>");
    s
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:820px}\
h1{font-size:20px}h2{font-size:16px;margin-top:28px}pre{background:#f6f6f6;padding:10px;overflow-x:auto;font-size:12px}\
figure{margin:8px 0}svg text{font:11px system-ui,sans-serif;fill:#333}.t{font-size:13px!important;font-weight:600;text-anchor:middle}\
.n{text-anchor:middle}.xl{text-anchor:middle}.yl{text-anchor:end}.al{text-anchor:middle}.f{fill:#fff;stroke:#999}.g{stroke:#e4e4e4}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}";

fn cdf_line(name: &str, v: &Value) -> Line {
    Line {
        name: name.into(),
        points: v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()? * 100.0)))
            .collect(),
    }
}

fn series_line(name: &str, j: &Value, key: &str, scale: f64) -> Line {
    let t = j["series"]["t_s"].as_array().cloned().unwrap_or_default();
    let v = j["series"][key].as_array().cloned().unwrap_or_default();
    Line {
        name: name.into(),
        points: t
            .iter()
            .zip(v.iter())
            .filter_map(|(t, v)| Some((t.as_f64()? + 0.5, v.as_f64()? * scale)))
            .collect(),
    }
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>\n",
        esc(title)
    )
}

/// The page for one run.
pub fn run_page(j: &Value) -> String {
    let mut b = String::new();
    let url = j["run"]["url"].as_str().unwrap_or("?");
    let _ = write!(b, "<h1>sluice-load: {}</h1>", esc(url));
    let _ = write!(
        b,
        "<p><code>{}</code></p>",
        esc(j["run"]["command"].as_str().unwrap_or(""))
    );
    let _ = write!(
        b,
        "<h2>Summary</h2><pre>{}</pre>",
        esc(&crate::report::table(j))
    );
    let mut cdfs = vec![
        cdf_line("first token (ttft_ms)", &j["cdf"]["ttft_ms"]),
        cdf_line("first event", &j["cdf"]["ttft_first_event_ms"]),
        cdf_line("first body byte", &j["cdf"]["ttft_first_byte_ms"]),
    ];
    if !j["ttft_intended_ms"].is_null() {
        cdfs.push(cdf_line(
            "first token, from intended send",
            &j["cdf"]["ttft_intended_ms"],
        ));
    }
    b += "<h2>Time to first token</h2><p>Share of streams (y, %) whose TTFT was at most x ms, for each definition; all from the moment the request's last byte was written (the intended-send line: from when the arrival process wanted it sent).</p>";
    b += &chart("TTFT CDF", "ms (log scale)", "% of streams", &cdfs, true);
    b += &chart(
        "TTFT over time (streams whose first token arrived in that second)",
        "s since start",
        "ms",
        &[
            series_line("p50", j, "ttft_p50_ms", 1.0),
            series_line("p99", j, "ttft_p99_ms", 1.0),
        ],
        false,
    );
    b += "<h2>Throughput</h2>";
    b += &chart(
        "Token events per second",
        "s since start",
        "tokens/s",
        &[series_line("tokens/s", j, "tokens", 1.0)],
        false,
    );
    b += &chart(
        "Streams per second",
        "s since start",
        "streams/s",
        &[
            series_line("started", j, "started", 1.0),
            series_line("done", j, "done", 1.0),
            series_line("failed", j, "failed", 1.0),
        ],
        false,
    );
    b += "<h2>Inter-token gaps</h2>";
    b += &chart(
        "Inter-token gap CDF",
        "ms (log scale)",
        "% of gaps",
        &[cdf_line("gap", &j["cdf"]["itl_ms"])],
        true,
    );
    b += "<h2>Connections</h2>";
    b += &chart(
        "Held and in-flight streams",
        "s since start",
        "streams",
        &[
            series_line("held open", j, "held_open", 1.0),
            series_line("measured in flight", j, "inflight", 1.0),
        ],
        false,
    );
    b += &chart(
        "Client CPU (measuring thread; 100 = one core)",
        "s since start",
        "%",
        &[series_line("cpu %", j, "cpu_percent", 1.0)],
        false,
    );
    page(&format!("sluice-load: {url}"), &b)
}

/// The page comparing runs.
pub fn compare_page(runs: &[(String, Value)], table: &str) -> String {
    let mut b = String::from("<h1>sluice-load: comparison</h1>");
    let _ = write!(b, "<pre>{}</pre>", esc(table));
    let cdfs: Vec<Line> = runs
        .iter()
        .map(|(n, j)| cdf_line(n, &j["cdf"]["ttft_ms"]))
        .collect();
    b += &chart(
        "TTFT CDF (first token)",
        "ms (log scale)",
        "% of streams",
        &cdfs,
        true,
    );
    let fb: Vec<Line> = runs
        .iter()
        .map(|(n, j)| cdf_line(n, &j["cdf"]["ttft_first_byte_ms"]))
        .collect();
    b += &chart(
        "TTFT CDF (first body byte)",
        "ms (log scale)",
        "% of streams",
        &fb,
        true,
    );
    let itl: Vec<Line> = runs
        .iter()
        .map(|(n, j)| cdf_line(n, &j["cdf"]["itl_ms"]))
        .collect();
    b += &chart(
        "Inter-token gap CDF",
        "ms (log scale)",
        "% of gaps",
        &itl,
        true,
    );
    let tp: Vec<Line> = runs
        .iter()
        .map(|(n, j)| series_line(n, j, "tokens", 1.0))
        .collect();
    b += &chart(
        "Token events per second",
        "s since start",
        "tokens/s",
        &tp,
        false,
    );
    page("sluice-load: comparison", &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_contained_svg() {
        let j = serde_json::json!({
            "run": {"url": "http://127.0.0.1:1/<x>", "command": "c"},
            "cdf": {"ttft_ms": [[1.0, 0.0], [10.0, 0.5], [100.0, 1.0]]},
            "series": {"t_s": [0, 1], "tokens": [5, 7]},
        });
        let p = run_page(&j);
        assert!(p.starts_with("<!DOCTYPE html>"));
        assert!(!p.contains("<script") && !p.contains("http-equiv") && !p.contains("src="));
        assert!(p.contains("&lt;x&gt;"));
        assert!(p.matches("<svg").count() >= 6);
        assert!(p.contains("<polyline"));
    }

    #[test]
    fn tick_steps() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(0.0, 1.0).len(), 6);
    }
}
