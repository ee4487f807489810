//! End to end through the real binary: flags, `SLUICE_*` environment
//! variables, the `listening on` line on stderr, `--help`.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// Kills the child when the test ends, even by a panic.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn clean_command() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SLUICE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Starts the binary and reads its address from the `listening on` line;
/// stderr keeps being drained by a thread afterwards.
fn spawn(args: &[&str], env: &[(&str, &str)]) -> (Running, SocketAddr) {
    let mut cmd = clean_command();
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn sluice");
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a `listening on http://ADDR:PORT` line on stderr");
    let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
    assert_ne!(addr.port(), 0);
    (running, addr)
}

#[test]
fn binary_streams_with_env_and_flags() {
    let (_child, addr) = spawn(
        &["--listen", "127.0.0.1:0", "--sim-ttft-ms", "0"],
        &[("SLUICE_SIM_TOKENS", "3"), ("SLUICE_SIM_ITL_MS", "1")],
    );
    let (head, events) = stream_events(addr, &post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(tokens_until_done(&events).len(), 3, "{events:?}");
    let d = events.last().unwrap().json();
    assert_eq!(d["finish_reason"], "stop", "{d}");
    assert_eq!(d["usage"]["completion_tokens"], 3, "{d}");

    let mut c = Client::connect(addr);
    let r = c.roundtrip(&get("/metrics", ""));
    assert_eq!(
        prom_value(&r.text(), "sluice_streams_completed_total"),
        Some(1.0)
    );
}

#[test]
fn binary_flag_beats_env_and_boolean_env_works() {
    let (_child, addr) = spawn(
        &["--listen", "127.0.0.1:0", "--sim-tokens", "2"],
        &[
            ("SLUICE_SIM_TOKENS", "9"),
            ("SLUICE_SIM_TTFT_MS", "0"),
            ("SLUICE_SIM_ITL_MS", "1"),
            ("SLUICE_NO_STREAMING", "true"),
        ],
    );
    let mut c = Client::connect(addr);
    let r = c.roundtrip(&post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(r.status(), 200);
    assert_eq!(r.head.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
}

#[test]
fn binary_help_lists_flags_and_env_vars() {
    let out = clean_command().arg("--help").output().expect("run --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--heartbeat-ms",
        "SLUICE_HEARTBEAT_MS",
        "--listen",
        "SLUICE_LISTEN",
        "--max-streams",
        "--write-timeout-ms",
        "--no-streaming",
        "15000",
    ] {
        assert!(text.contains(want), "--help lacks {want:?}:\n{text}");
    }
}

#[test]
fn binary_refuses_a_bad_flag() {
    let out = clean_command()
        .args(["--listen", "127.0.0.1:0", "--heartbeat-ms", "soon"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}
