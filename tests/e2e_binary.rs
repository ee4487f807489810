//! End to end through the real binary: flags, `SLUICE_*` environment
//! variables (given to the child only: it never inherits the test's), the
//! `listening on` line on stderr, `--help`.

mod support;

use support::*;

#[test]
fn binary_streams_with_env_and_flags() {
    let bin = Binary::spawn(
        &["--listen", "127.0.0.1:0", "--sim-ttft-ms", "0"],
        &[("SLUICE_SIM_TOKENS", "3"), ("SLUICE_SIM_ITL_MS", "1")],
    );
    let addr = bin.addr;
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
    let bin = Binary::spawn(
        &["--listen", "127.0.0.1:0", "--sim-tokens", "2"],
        &[
            ("SLUICE_SIM_TOKENS", "9"),
            ("SLUICE_SIM_TTFT_MS", "0"),
            ("SLUICE_SIM_ITL_MS", "1"),
            ("SLUICE_NO_STREAMING", "true"),
        ],
    );
    let mut c = Client::connect(bin.addr);
    let r = c.roundtrip(&post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(r.status(), 200);
    assert_eq!(r.head.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
}

#[test]
fn binary_help_lists_flags_and_env_vars() {
    let out = sluice_command().arg("--help").output().expect("run --help");
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
    let out = sluice_command()
        .args(["--listen", "127.0.0.1:0", "--heartbeat-ms", "soon"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}
