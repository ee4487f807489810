//! `--compare a.json b.json …`: earlier runs side by side, each figure
//! with its ratio to the first run; with `--html` the same table and every
//! run's CDFs and throughput on shared charts.

use serde_json::Value;
use std::path::{Path, PathBuf};

const ROWS: [&str; 24] = [
    "streams.started",
    "streams.done",
    "streams.errored",
    "streams.reset",
    "streams.timeout",
    "streams_per_s",
    "token_events_per_s",
    "ttft_ms.p50",
    "ttft_ms.p90",
    "ttft_ms.p99",
    "ttft_ms.p999",
    "ttft_ms.max",
    "ttft_ms.mean",
    "ttft_first_byte_ms.p50",
    "ttft_first_byte_ms.p99",
    "ttft_intended_ms.p50",
    "ttft_intended_ms.p99",
    "itl_ms.p50",
    "itl_ms.p99",
    "total_ms.p50",
    "head_ms.p50",
    "held.open_at_end",
    "goodput.ratio",
    "client.cpu_percent",
];

fn get(v: &Value, path: &str) -> Option<f64> {
    path.split('.').try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// The side-by-side table.
pub fn table(runs: &[(String, Value)]) -> String {
    let width = runs
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(8)
        .clamp(10, 24);
    let mut o = format!("{:<24}", "");
    for (i, (n, _)) in runs.iter().enumerate() {
        o += &format!(" {:>width$}", n);
        if i > 0 {
            o += &format!(" {:>7}", "ratio");
        }
    }
    o += "\n";
    for row in ROWS {
        let vals: Vec<Option<f64>> = runs.iter().map(|(_, j)| get(j, row)).collect();
        if vals.iter().all(Option::is_none) {
            continue;
        }
        o += &format!("{row:<24}");
        for (i, v) in vals.iter().enumerate() {
            o += &format!(
                " {:>width$}",
                v.map_or("-".into(), |x| format!("{}", (x * 1000.0).round() / 1000.0))
            );
            if i > 0 {
                let ratio = match (vals[0], v) {
                    (Some(a), Some(b)) if a != 0.0 => format!("{:.2}x", b / a),
                    _ => "-".into(),
                };
                o += &format!(" {ratio:>7}");
            }
        }
        o += "\n";
    }
    o
}

pub fn run(files: &[PathBuf], html: Option<&Path>) -> Result<(), String> {
    let mut runs = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("--compare {}: {e}", f.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("--compare {}: {e}", f.display()))?;
        if v["schema"] != "sluice-load/1" {
            return Err(format!(
                "--compare {}: not a sluice-load --json file",
                f.display()
            ));
        }
        let name = f
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().into_owned());
        runs.push((name, v));
    }
    let t = table(&runs);
    print!("{t}");
    if let Some(p) = html {
        std::fs::write(p, crate::html::compare_page(&runs, &t))
            .map_err(|e| format!("--html {}: {e}", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratios() {
        let a = json!({"ttft_ms": {"p50": 10.0}, "streams": {"done": 5}});
        let b = json!({"ttft_ms": {"p50": 25.0}, "streams": {"done": 5}});
        let t = table(&[("a".into(), a), ("b".into(), b)]);
        assert!(t.contains("2.50x"), "{t}");
        assert!(t.contains("1.00x"), "{t}");
        assert!(!t.contains("itl_ms.p50"));
    }
}
