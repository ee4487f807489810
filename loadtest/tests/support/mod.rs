//! A scripted fake streaming server on 127.0.0.1:0 for the end-to-end
//! tests: each request's prompt names a script (delays of 50 ms and more,
//! so scheduling noise cannot decide a result), one thread per connection,
//! keep-alive. Plus helpers to run the `sluice-load` binary and read its JSON.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub struct Fake {
    pub addr: String,
    pub requests: Arc<AtomicU64>,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn chunk(s: &str) -> Vec<u8> {
    format!("{:x}\r\n{s}\r\n", s.len()).into_bytes()
}

/// Starts the server; it lives until the test process ends.
pub fn start() -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let requests = Arc::new(AtomicU64::new(0));
    let r = requests.clone();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let r = r.clone();
            thread::spawn(move || {
                let _ = serve(s, r);
            });
        }
    });
    Fake { addr, requests }
}

fn serve(s: TcpStream, count: Arc<AtomicU64>) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut rd = BufReader::new(s.try_clone()?);
    let mut w = s;
    loop {
        // the request head
        let mut path = String::new();
        let mut len = 0usize;
        let mut rid = None;
        let mut last_id: Option<String> = None;
        let mut first = true;
        loop {
            let mut line = String::new();
            if rd.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if first {
                path = l.split(' ').nth(1).unwrap_or("").to_string();
                first = false;
                continue;
            }
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            } else if k.eq_ignore_ascii_case("last-event-id") {
                last_id = Some(v.trim().to_string());
            } else if k.eq_ignore_ascii_case("x-request-id") {
                rid = Some(v.trim().to_string());
            }
        }
        let mut body = vec![0; len];
        rd.read_exact(&mut body)?;
        // every delay is from this instant, so sleep overshoots do not add up
        let t0 = Instant::now();
        let at = |n: u64| {
            let due = t0 + ms(n);
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        };
        count.fetch_add(1, Ordering::Relaxed);
        let body = String::from_utf8_lossy(&body).to_string();
        let openai = path.contains("openai");
        let script = [
            "refuse",
            "reset",
            "error",
            "hang",
            "hold",
            "resumable",
            "many",
        ]
        .into_iter()
        .find(|k| body.contains(&format!("\"{k}")))
        .unwrap_or("ok");
        let rid_h = rid
            .map(|r| format!("X-Request-Id: {r}\r\n"))
            .unwrap_or_default();
        match script {
            "refuse" => {
                let b = r#"{"error":{"code":"overloaded","message":"busy"}}"#;
                write!(
                    w,
                    "HTTP/1.1 503 Service Unavailable\r\n{rid_h}Content-Length: {}\r\n\r\n{b}",
                    b.len()
                )?;
                continue;
            }
            "hang" => {
                thread::sleep(ms(5_000));
                return Ok(());
            }
            _ => {}
        }
        at(50);
        write!(w, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n{rid_h}\r\n")?;
        match script {
            "reset" => {
                at(100);
                w.write_all(&chunk(&ev(openai, "tok", "x")))?;
                return Ok(()); // close mid-stream
            }
            "error" => {
                at(100);
                let e = if openai {
                    "data: {\"error\":{\"code\":\"upstream_error\",\"message\":\"m\"}}\n\n"
                        .to_string()
                } else {
                    "event: error\ndata: {\"code\":\"upstream_error\",\"retryable\":true}\n\n"
                        .to_string()
                };
                w.write_all(&chunk(&e))?;
                w.write_all(b"0\r\n\r\n")?;
                continue;
            }
            "hold" => loop {
                // a stream that lasts until the client leaves
                thread::sleep(ms(200));
                if w.write_all(&chunk(": keep-alive\n\n")).is_err() {
                    return Ok(());
                }
            },
            "resumable" => {
                // six tokens with ids rs:1..rs:6, done rs:7; a Last-Event-ID
                // rs:k replays from k+1
                let from = last_id
                    .and_then(|l| l.rsplit(':').next().and_then(|n| n.parse::<u64>().ok()))
                    .unwrap_or(0);
                for seq in from + 1..=6 {
                    at(50 + 20 * seq);
                    let e = format!("id: rs:{seq}\nevent: token\ndata: {{\"t\":\"w{seq}\"}}\n\n");
                    if w.write_all(&chunk(&e)).is_err() {
                        return Ok(());
                    }
                }
                w.write_all(&chunk("id: rs:7\nevent: done\ndata: {}\n\n"))?;
                w.write_all(b"0\r\n\r\n")?;
                continue;
            }
            "many" => {
                for i in 0..20 {
                    thread::sleep(ms(10));
                    w.write_all(&chunk(&ev(openai, "tok", &format!("t{i}"))))?;
                }
                w.write_all(&chunk(&ev(openai, "done", "")))?;
                w.write_all(b"0\r\n\r\n")?;
                continue;
            }
            _ => {}
        }
        // "ok": head at 50 ms; a comment (first body byte) at 100; the first
        // event (not a token) at 150; an empty token at 200; "a" at 250;
        // "b" at 310; done at 360.
        at(100);
        w.write_all(&chunk(": hello\n\n"))?;
        at(150);
        w.write_all(&chunk(&ev(openai, "first", "")))?;
        at(200);
        w.write_all(&chunk(&ev(openai, "tok", "")))?;
        at(250);
        w.write_all(&chunk(&ev(openai, "tok", "a")))?;
        at(310);
        w.write_all(&chunk(&ev(openai, "tok", "b")))?;
        at(360);
        w.write_all(&chunk(&ev(openai, "done", "")))?;
        w.write_all(b"0\r\n\r\n")?;
    }
}

/// One event of the given kind in either format.
fn ev(openai: bool, kind: &str, text: &str) -> String {
    match (openai, kind) {
        (false, "first") => "event: heartbeat\ndata: {\"phase\":\"generating\"}\n\n".into(),
        (false, "tok") => format!("event: token\ndata: {{\"t\":\"{text}\"}}\n\n"),
        (false, _) => "event: done\ndata: {\"finish_reason\":\"stop\",\"ttft_ms\":200.0}\n\n".into(),
        (true, "first") => "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n".into(),
        (true, "tok") => format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"),
        (true, _) => "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n".into(),
    }
}

/// A path for a test file, in cargo's temporary directory for integration
/// tests (under `target/`, not the system's /tmp).
pub fn tmp(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sluice-load-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Runs sluice-load with `args` (plus --json and --no-progress), bounded in
/// time; returns its JSON and stdout.
pub fn run(args: &[&str]) -> (Value, String) {
    static N: AtomicU64 = AtomicU64::new(0);
    let json = tmp(&format!("run-{}.json", N.fetch_add(1, Ordering::Relaxed)));
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-load"))
        .args(args)
        .arg("--no-progress")
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "sluice-load failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    (v, stdout)
}

pub fn f(v: &Value, path: &str) -> f64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

/// Asserts that no stream saw `key` before `lo` ms (a hard property: the
/// server had not sent it yet) and that the median is at most `hi` ms. The
/// median, not the maximum: on a shared 2-vCPU machine one thread can be
/// descheduled for tens of ms, which must not decide a test.
pub fn within(v: &Value, key: &str, lo: f64, hi: f64) {
    let p50 = f(v, &format!("{key}.p50"));
    let min = v["cdf"][key][0][0]
        .as_f64()
        .unwrap_or(p50.min(f(v, &format!("{key}.mean"))));
    assert!(
        min >= lo && p50 <= hi,
        "{key}: min {min}, p50 {p50}, want min >= {lo} and p50 <= {hi}: {}",
        v[key]
    );
}

/// Timing tests run one at a time (the machine has 2 cores).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
