//! sluice-load against a scripted fake server on loopback: each TTFT
//! definition, the open-loop correction for coordinated omission, outcome
//! counts, faults and held streams. Delays are ≥ 50 ms and bounds allow
//! 40 ms of noise.

mod support;

use support::{f, run, serial, start, tmp, within};

#[test]
fn ttft_definitions_native() {
    let _g = serial();
    let s = start();
    let url = format!("http://{}/native", s.addr);
    let (v, table) = run(&[
        "--url",
        &url,
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--prompt",
        "ok",
    ]);
    assert_eq!(f(&v, "streams.started"), 4.0);
    assert_eq!(f(&v, "streams.done"), 4.0, "{table}");
    within(&v, "head_ms", 50.0, 90.0);
    within(&v, "ttft_first_byte_ms", 100.0, 140.0);
    within(&v, "ttft_first_event_ms", 150.0, 190.0);
    within(&v, "ttft_ms", 250.0, 290.0);
    within(&v, "itl_ms", 60.0 - 20.0, 100.0);
    assert_eq!(f(&v, "itl_ms.count"), 4.0);
    assert_eq!(f(&v, "tokens"), 8.0);
    // the server said 200 ms; the rest is transport and our own scheduling
    assert_eq!(f(&v, "server_join.joined"), 4.0);
    assert_eq!(f(&v, "server_join.request_id_echoed"), 4.0);
    within(&v["server_join"], "server_ttft_ms", 200.0, 200.5);
    within(&v["server_join"], "transport_ms", 50.0, 90.0);
    assert!(
        v["ttft_intended_ms"].is_null(),
        "closed loop has no intended time"
    );
    assert!(table.contains("ttft (first token)"));
}

#[test]
fn ttft_definitions_openai() {
    let _g = serial();
    let s = start();
    let url = format!("http://{}/openai/v1/chat/completions", s.addr);
    let (v, _) = run(&[
        "--url",
        &url,
        "--format",
        "openai",
        "--model",
        "m",
        "--concurrency",
        "3",
        "--requests",
        "3",
        "--prompt",
        "ok",
    ]);
    assert_eq!(f(&v, "streams.done"), 3.0);
    within(&v, "ttft_first_byte_ms", 100.0, 140.0);
    within(&v, "ttft_first_event_ms", 150.0, 190.0); // the role-only chunk
    within(&v, "ttft_ms", 250.0, 290.0); // the first non-empty delta.content
    assert_eq!(f(&v, "tokens"), 6.0);
}

#[test]
fn open_loop_shows_queueing_that_closed_loop_hides() {
    // 10/s, one stream at a time, each ~360 ms: request k waits ~k·260 ms
    // for its turn. ttft_ms cannot see it; ttft_intended_ms must.
    let _g = serial();
    let s = start();
    let url = format!("http://{}/native", s.addr);
    let (v, _) = run(&[
        "--url",
        &url,
        "--rate",
        "10",
        "--arrival",
        "constant",
        "--requests",
        "5",
        "--max-inflight",
        "1",
        "--prompt",
        "ok",
    ]);
    assert_eq!(f(&v, "streams.done"), 5.0);
    within(&v, "ttft_ms", 250.0, 290.0);
    let intended_max = f(&v, "ttft_intended_ms.max");
    // the 5th was due at 400 ms and sent after four streams of ≥ 360 ms
    assert!(
        intended_max >= 250.0 + 4.0 * 360.0 - 400.0,
        "{}",
        v["ttft_intended_ms"]
    );
    assert!(f(&v, "ttft_intended_ms.p50") > f(&v, "ttft_ms.p50") + 100.0);
}

#[test]
fn outcomes_are_counted() {
    let _g = serial();
    let s = start();
    let prompts = tmp("outcomes.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\":\"ok\"}\n{\"prompt\":\"refuse\"}\n{\"prompt\":\"reset\"}\n{\"prompt\":\"error\"}\n{\"prompt\":\"hang\"}\n",
    )
    .unwrap();
    let url = format!("http://{}/native", s.addr);
    let (v, table) = run(&[
        "--url",
        &url,
        "--concurrency",
        "5",
        "--requests",
        "10",
        "--timeout",
        "600ms",
        "--prompts",
        prompts.to_str().unwrap(),
        "--goodput",
        "ttft_ms:1000",
    ]);
    let n = |k: &str| f(&v, k) as u64;
    assert_eq!(n("streams.started"), 10, "{table}");
    assert_eq!(n("streams.done"), 2, "{table}");
    assert_eq!(n("streams.errored"), 4, "{table}"); // 2 refusals + 2 error events
    assert_eq!(n("streams.reset"), 2, "{table}");
    assert_eq!(n("streams.timeout"), 2, "{table}");
    assert_eq!(n("streams.http_status.503"), 2);
    assert_eq!(n("streams.http_status.200"), 6);
    assert_eq!(n("streams.error_code.overloaded"), 2);
    assert_eq!(n("streams.error_code.upstream_error"), 2);
    assert_eq!(n("goodput.met"), 2);
    assert_eq!(n("goodput.eligible"), 10);
}

#[test]
fn warmup_is_not_counted_and_duration_bounds() {
    let _g = serial();
    let s = start();
    let url = format!("http://{}/native", s.addr);
    let (v, _) = run(&[
        "--url",
        &url,
        "--concurrency",
        "2",
        "--requests",
        "2",
        "--warmup",
        "2",
        "--prompt",
        "ok",
    ]);
    assert_eq!(f(&v, "streams.started"), 2.0);
    assert_eq!(s.requests.load(std::sync::atomic::Ordering::Relaxed), 4);
    let (v, _) = run(&[
        "--url",
        &url,
        "--concurrency",
        "2",
        "--duration",
        "500ms",
        "--prompt",
        "ok",
    ]);
    // each user sends until 500 ms: 2 streams of 360 ms each, then 2 more
    let started = f(&v, "streams.started");
    assert!((2.0..=4.0).contains(&started), "{started}");
    assert_eq!(f(&v, "streams.done"), started);
}

#[test]
fn disconnect_fault_leaves_after_k_tokens() {
    let _g = serial();
    let s = start();
    let url = format!("http://{}/native", s.addr);
    let (v, _) = run(&[
        "--url",
        &url,
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--prompt",
        "many",
        "--disconnect-after",
        "3",
        "--fault-fraction",
        "1",
    ]);
    assert_eq!(f(&v, "streams.disconnected"), 4.0);
    assert_eq!(f(&v, "tokens"), 12.0);
    assert_eq!(f(&v, "faults.faulted_streams"), 4.0);
}

#[test]
fn held_streams_live_in_child_processes() {
    let _g = serial();
    let s = start();
    let url = format!("http://{}/native", s.addr);
    let (v, table) = run(&[
        "--url",
        &url,
        "--concurrency",
        "1",
        "--requests",
        "2",
        "--prompt",
        "ok",
        "--hold-idle",
        "30",
        "--hold-per-process",
        "12",
        "--hold-max-tokens",
        "7",
        "--body",
        "{\"prompt\":\"ok\",\"max_tokens\":8}",
    ]);
    // --body wins for measured and held requests alike: held ones get "ok",
    // which ends after 360 ms and is reopened.
    assert_eq!(f(&v, "held.target"), 30.0, "{table}");
    assert_eq!(f(&v, "held.processes"), 3.0);
    assert_eq!(f(&v, "streams.done"), 2.0);
    assert!(f(&v, "held.reopened") >= 30.0, "{table}");

    // held streams that last: open before measuring, all still open at the end
    let (v, table) = run(&[
        "--url",
        &url,
        "--concurrency",
        "1",
        "--requests",
        "2",
        "--prompt",
        "ok",
        "--hold-idle",
        "30",
        "--hold-per-process",
        "12",
        "--hold-body",
        "{\"prompt\":\"hold\"}",
    ]);
    assert_eq!(f(&v, "held.open_at_start"), 30.0, "{table}");
    assert_eq!(f(&v, "held.open_at_end"), 30.0, "{table}");
    assert_eq!(f(&v, "held.lost"), 0.0, "{table}");
    assert_eq!(f(&v, "held.reopened"), 0.0, "{table}");
    assert_eq!(f(&v, "streams.done"), 2.0);
    within(&v, "ttft_ms", 250.0, 290.0);

    // noread: the server's writes pile up unread; idle: never a byte sent
    for mode in ["noread", "idle"] {
        let (v, table) = run(&[
            "--url",
            &url,
            "--concurrency",
            "1",
            "--requests",
            "1",
            "--prompt",
            "ok",
            "--hold-idle",
            "10",
            "--hold-mode",
            mode,
            "--hold-body",
            "{\"prompt\":\"hold\"}",
        ]);
        assert_eq!(f(&v, "held.open_at_end"), 10.0, "{mode}: {table}");
        assert_eq!(f(&v, "streams.done"), 1.0);
    }
}

#[test]
fn resume_with_last_event_id_gets_every_token_once() {
    let _g = serial();
    let s = start();
    let url = format!("http://{}/native", s.addr);
    let (v, table) = run(&[
        "--url",
        &url,
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--prompt",
        "resumable",
        "--resume-after",
        "2",
        "--fault-fraction",
        "1",
    ]);
    assert_eq!(f(&v, "streams.done"), 4.0, "{table}");
    assert_eq!(f(&v, "tokens"), 24.0, "{table}");
    assert_eq!(f(&v, "faults.resume.attempted"), 4.0, "{table}");
    assert_eq!(f(&v, "faults.resume.exactly_once"), 4.0, "{table}");
    assert_eq!(f(&v, "faults.resume.duplicates"), 0.0);
    assert_eq!(f(&v, "faults.resume.missing"), 0.0);
    // 4 first requests + 4 resumes
    assert_eq!(s.requests.load(std::sync::atomic::Ordering::Relaxed), 8);

    // a server without resume (no event ids): counted as unsupported
    let (v, _) = run(&[
        "--url",
        &url,
        "--concurrency",
        "1",
        "--requests",
        "2",
        "--prompt",
        "many",
        "--resume-after",
        "2",
        "--fault-fraction",
        "1",
    ]);
    assert_eq!(f(&v, "faults.resume.unsupported"), 2.0);
    assert_eq!(f(&v, "streams.disconnected"), 2.0);
}

#[test]
fn compare_prints_ratios_and_draws_one_chart() {
    let _g = serial();
    let s = start();
    let url = format!("http://{}/native", s.addr);
    let a = tmp("cmp-a.json");
    let b = tmp("cmp-b.json");
    for (p, n) in [(&a, "2"), (&b, "4")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-load"))
            .args([
                "--url",
                &url,
                "--concurrency",
                n,
                "--requests",
                n,
                "--prompt",
                "ok",
                "--no-progress",
                "--json",
            ])
            .arg(p)
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let html = tmp("cmp.html");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-load"))
        .arg("--compare")
        .arg(&a)
        .arg(&b)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("streams.done") && text.contains("2.00x"),
        "{text}"
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("cmp-a") && page.contains("cmp-b") && page.contains("<svg"));
    assert!(!page.contains("<script"));
}
